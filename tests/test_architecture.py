"""The design card's rules, checked on the source: imports point front ends -> orchestrator -> launcher; no
module imports itself back through others (no cycles), counting imports that run at import time; and the
sub-packages of `orchestrator` and `launcher` import one way only (LAYERS), counting every import: module
level, inside functions and under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("launcher", "orchestrator", "cli", "ui", "api")
pytestmark = pytest.mark.xdist_group("architecture")  # one worker parses the sources (`parse`), not each
FORBIDDEN = {
    "launcher": {"orchestrator", "ui", "api", "streamlit"},
    "orchestrator": {"ui", "api", "streamlit"},
    "cli": {"launcher", "ui", "api", "streamlit"},  # front ends talk to the orchestrator (orchestrator.app) only
    "ui": {"launcher", "api"},  # a front end talks to the orchestrator only
    "api": {"launcher", "ui", "streamlit"},
}


@functools.cache
def _parse_text(text: str) -> ast.Module:
    return ast.parse(text)


def parse(path: Path) -> ast.Module:
    """The file's syntax tree, parsed once per content: every check here walks the same ~200 files."""
    return _parse_text(path.read_text(encoding="utf-8"))


def imported_roots(path: Path) -> set[str]:
    tree = parse(path)
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package: str) -> None:
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & FORBIDDEN[package])
                 for p in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, outside `if TYPE_CHECKING:`."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _runtime_imports(parse(path)):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""])
            for target in targets:
                # the longest known module the import names (`from a.b import c` may name module a.b.c)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_modules() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ---------------------------------------------------------------- sub-packages, one direction
# Lowest first. A unit (a sub-package such as orchestrator.engine, or a top-level module such as
# orchestrator.runtime) may import units of LOWER layers only; units of one layer do not import each other.
# docs/architecture.md ("Imports, one direction") says the same in words.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("launcher", "launcher.units", "launcher.fileio", "launcher.paths", "launcher.cpus"),
    ("launcher.errors",),
    ("launcher.process",),                        # servers, pool, client, binary, rpc, state
    ("launcher.memory",),                         # gguf, estimate, probes, schedule, admission: uses process
    ("orchestrator", "orchestrator.units", "orchestrator.errors", "orchestrator.spelling", "orchestrator.records",
     "orchestrator.limits", "orchestrator.children"),  # light re-exports: the CLI parser, the ui/api supervisors
    ("orchestrator.config",),                     # schema, yaml, overrides, registry, aggregator allow-list
    ("orchestrator.rag", "orchestrator.logs"),    # document store and retrieval (the plan and engine read it)
    ("orchestrator.plan",),                       # resolve once; the memory what-if (no Runtime import)
    ("orchestrator.runtime",),                    # the process's long-lived objects: resolves plans, owns the pool
    ("orchestrator.engine",),                     # run loop, backends, aggregation, judge, templates, events
    ("orchestrator.history",),                    # recorder (an engine observer), store, index, export
    ("orchestrator.runs",),                       # Runner: plan -> engine with observers -> record
    ("orchestrator.eval",),                       # evals: runs of pipelines and members, judged and scored
    ("orchestrator.app", "orchestrator.charts"),  # the front door; figures for front ends
)
CORE = ("launcher", "orchestrator")


def unit_of(module: str) -> str:
    """The sub-package (or top-level module) a module belongs to: orchestrator.engine.run -> orchestrator.engine."""
    return ".".join(module.split(".")[:2])


def all_imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, dotted target) of every import in the file, wherever it is: module level, in a function, under
    `if TYPE_CHECKING:`; relative imports made absolute. `from a import b` names both a and a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
    return out


def subpackage_graph(root: Path = REPO) -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ['file:line', ...]} over launcher/ and orchestrator/, every import counted."""
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for pkg in CORE for p in (root / pkg).rglob("*.py")}
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in sorted(modules.items()):
        deps = graph.setdefault(unit_of(name), {})
        for line, target in all_imports(path, name):
            if target.split(".")[0] not in CORE:
                continue
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and unit_of(target) != unit_of(name):
                where = deps.setdefault(unit_of(target), [])
                if (loc := f"{path.relative_to(root)}:{line}") not in where:
                    where.append(loc)
    return graph


def against_direction(graph: dict[str, dict[str, list[str]]],
                      layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Every import of a unit in the same or a higher layer, and every unit with no place in the layers."""
    rank = {unit: i for i, layer in enumerate(layers) for unit in layer}
    out = [f"{unit}: not placed in LAYERS (tests/test_architecture.py); give it a layer"
           for unit in sorted(graph) if unit not in rank]
    for unit, deps in sorted(graph.items()):
        for dep, where in sorted(deps.items()):
            if unit in rank and dep in rank and rank[dep] >= rank[unit]:
                out.append(f"{unit} -> {dep} against the direction ({', '.join(where)})")
    return out


def test_subpackages_import_in_one_direction() -> None:
    assert against_direction(subpackage_graph()) == []


def test_no_import_cycles_between_subpackages() -> None:
    assert find_cycle({unit: set(deps) for unit, deps in subpackage_graph().items()}) is None


def test_every_unit_in_the_layers_exists() -> None:
    assert {u for layer in LAYERS for u in layer} - set(subpackage_graph()) == set()  # no stale names


def test_the_direction_checker_catches_a_back_import_and_a_cycle(tmp_path: Path) -> None:
    """A synthetic tree: config -> engine (a back-import, inside a function and under TYPE_CHECKING) and
    engine -> config: the checker names the file and line, the cycle finder the cycle."""
    files = {
        "orchestrator/__init__.py": "",
        "orchestrator/config/__init__.py": "",
        "orchestrator/config/overrides.py": "def f():\n    from orchestrator.engine import aggregators\n",
        "orchestrator/config/schema.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from ..engine.run import Engine\n",
        "orchestrator/engine/__init__.py": "",
        "orchestrator/engine/aggregators.py": "from orchestrator.config.schema import X\n",
        "orchestrator/engine/run.py": "import launcher.process.server\n",
        "launcher/__init__.py": "",
        "launcher/process/__init__.py": "",
        "launcher/process/server.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = subpackage_graph(tmp_path)
    assert graph["orchestrator.config"] == {"orchestrator.engine": ["orchestrator/config/overrides.py:2",
                                                                    "orchestrator/config/schema.py:3"]}
    layers = (("launcher", "launcher.process"), ("orchestrator",), ("orchestrator.config",), ("orchestrator.engine",))
    assert against_direction(graph, layers) == [
        "orchestrator.config -> orchestrator.engine against the direction "
        "(orchestrator/config/overrides.py:2, orchestrator/config/schema.py:3)"]
    assert find_cycle({u: set(d) for u, d in graph.items()}) == [
        "orchestrator.config", "orchestrator.engine", "orchestrator.config"]
    # the same tree with engine -> config only: nothing against the direction, no cycle
    (tmp_path / "orchestrator/config/overrides.py").write_text("")
    (tmp_path / "orchestrator/config/schema.py").write_text("")
    graph = subpackage_graph(tmp_path)
    assert against_direction(graph, layers) == [] and find_cycle({u: set(d) for u, d in graph.items()}) is None
    # a unit that has no layer is reported, not ignored
    assert against_direction(graph, layers[1:]) == [
        "launcher: not placed in LAYERS (tests/test_architecture.py); give it a layer",
        "launcher.process: not placed in LAYERS (tests/test_architecture.py); give it a layer"]
