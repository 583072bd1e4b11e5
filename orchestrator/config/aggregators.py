"""Which custom aggregation functions a pipeline may call, and loading them: the only door to Python code.

A stage's `function: module:function` is allowed only when it names
- a file in the config folder's `aggregators/` (`votes:pick` loads `<config>/aggregators/votes.py`,
  `team.votes:pick` loads `<config>/aggregators/team/votes.py`), or
- an entry the operator listed in app.yaml under `aggregators: {allowed: ["package.module:function"]}`
  (an installed module, imported by name).

Anything else is refused with an AggregationError that names the field and lists what is allowed,
*before* anything is imported. Text from the UI or `--set` can therefore only choose among functions
the operator put there; it can never make the host import a module of its choosing (`os:system`).
Listing reads the files with `ast` and never runs them.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from launcher.errors import ChorusError
from orchestrator.config.schema import AppConfig, PipelineSpec
from orchestrator.config.yamlio import load_model
from orchestrator.errors import ConfigError

AGGREGATORS_DIR = "aggregators"
FIELD = "aggregation.function"
_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class AggregatorNotAllowed(ChorusError):
    """A custom aggregation names a function that is neither in aggregators/ nor listed in app.yaml."""

    def __init__(self, name: str, allowed: Sequence[str], config_dir: Path | None, *, field: str = FIELD) -> None:
        folder = f"{config_dir / AGGREGATORS_DIR}/" if config_dir else f"the config folder's {AGGREGATORS_DIR}/"
        listed = ", ".join(allowed) if allowed else "none"
        self.reason = (f"{name!r} is not an allowed aggregator: it must name a function in {folder} "
                       f"or one listed under aggregators.allowed in app.yaml (allowed: {listed})")
        super().__init__(
            f"{field} {self.reason}",
            hint=f"Put the function in {folder}<module>.py and write 'function: <module>:<function>', or, "
                 "for an installed package, add 'package.module:function' to aggregators.allowed in app.yaml.")
        self.function = name
        self.field = field
        self.allowed = list(allowed)


@dataclass(frozen=True)
class AllowedFunction:
    """One function a stage may name: from a file under aggregators/, or listed by the operator."""

    name: str
    path: Path | None  # the file under aggregators/; None for a module listed in app.yaml

    @property
    def source(self) -> str:
        return str(self.path) if self.path else f"module {self.name.partition(':')[0]} (app.yaml aggregators.allowed)"


def operator_allowed(config_dir: Path | None) -> list[str]:
    """app.yaml's aggregators.allowed; a broken app.yaml is a ConfigError, as everywhere else."""
    if config_dir is None or not (config_dir / "app.yaml").is_file():
        return []
    return list(load_model(AppConfig, config_dir / "app.yaml").aggregators.allowed)


def allowed_functions(config_dir: Path | None, allowed: Sequence[str] | None = None) -> list[AllowedFunction]:
    """Every function a stage may name, sorted: public top-level functions of aggregators/**/*.py, then the
    operator's list. `allowed` is app.yaml's list when the caller has it loaded already."""
    found: dict[str, AllowedFunction] = {}
    folder = config_dir / AGGREGATORS_DIR if config_dir else None
    if folder is not None and folder.is_dir():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if not all(p.isidentifier() and not p.startswith("_") for p in parts):
                continue
            for fn in _public_functions(path):
                name = f"{'.'.join(parts)}:{fn}"
                found[name] = AllowedFunction(name, path.resolve())
    for name in operator_allowed(config_dir) if allowed is None else allowed:
        found.setdefault(name, AllowedFunction(name, None))
    return sorted(found.values(), key=lambda f: f.name)


def _public_functions(path: Path) -> list[str]:
    """Top-level `def`/`async def` names not starting with '_', read without running the file."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []  # offered nowhere; naming it still reports the error when it is loaded
    return [n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and not n.name.startswith("_")]


def resolve(name: str, config_dir: Path | None, allowed: Sequence[str] | None = None, *,
            field: str = FIELD) -> AllowedFunction:
    """The allowed function `name` refers to, or AggregatorNotAllowed; looks at files and app.yaml, imports nothing."""
    if _NAME.match(name):
        module, _, _ = name.partition(":")
        if config_dir is not None:
            path = config_dir.joinpath(AGGREGATORS_DIR, *module.split(".")).with_suffix(".py")
            if path.is_file():
                return AllowedFunction(name, path.resolve())
        if name in (operator_allowed(config_dir) if allowed is None else allowed):
            return AllowedFunction(name, None)
    names = [f.name for f in allowed_functions(config_dir, allowed)]
    raise AggregatorNotAllowed(name, names, config_dir, field=field)


def check_pipeline(pipeline: PipelineSpec, config_dir: Path | None, allowed: Sequence[str] | None = None, *,
                   source: str = "pipeline") -> None:
    """Refuse a pipeline whose custom stages name functions that are not allowed, before any model starts."""
    for stage in pipeline.stages:
        if stage.aggregation.type == "custom":
            field = f"stages.{stage.name}.{FIELD}"
            try:
                resolve(stage.aggregation.function or "", config_dir, allowed, field=field)
            except AggregatorNotAllowed as exc:
                raise ConfigError(source, exc.reason, field=field, hint=exc.hint) from None


# ---------------------------------------------------------------- loading

_loaded: dict[Path, tuple[tuple[int, int], ModuleType]] = {}
"""aggregators/ modules by path, with the (mtime_ns, size) they were loaded at."""


def load(fn: AllowedFunction) -> Callable[..., Any]:
    """Import an allowed function: its file under a private module name, or the operator-listed module."""
    module_name, _, attr = fn.name.partition(":")
    module = _load_file(fn.path) if fn.path else importlib.import_module(module_name)
    function: Callable[..., Any] = getattr(module, attr)  # the allow-list names a function
    return function


def _load_file(path: Path) -> ModuleType:
    """Load an aggregators/ module under a private name; reloaded when the file changes."""
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(path)
    if cached and cached[0] == version:
        return cached[1]
    private = "_chorus_aggregator_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(private, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[private] = module  # dataclasses and pickling look a module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(private, None)
        raise
    _loaded[path] = (version, module)
    return module
