"""Load YAML into pydantic models, turning every failure into a ConfigError with file, line and field.

PyYAML gives a line for syntax errors; for schema errors we walk the composed node tree along the
pydantic error's location to find the line of the offending key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a YAML file; return the data and its node tree (for line lookups)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found", hint="Create it, or point CHORUS_CONFIG_DIR / "
                          "--config-dir at a folder that has it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot be read ({exc})", hint="Check the file's permissions "
                          "and that it is UTF-8 text.") from None
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text (a file's, or a `--set` value) once; errors name `source` and the line.

    The expanded size is bounded before anything walks the data (see `BoundedLoader`).
    """
    try:
        data, node = parse_yaml(text)
    except ExpansionTooLarge as exc:
        raise ConfigError(source, str(exc), line=exc.line, hint=EXPANSION_HINT) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        lines = text.splitlines()
        line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        tab = "\t" in line[: len(line) - len(line.lstrip())]  # indented with a tab
        raise ConfigError(source, f"invalid YAML: {problem}",
                          line=mark.line + 1 if mark else None,
                          hint="YAML indents with spaces, not tabs: replace the tab on that line." if tab
                          else "Check indentation, colons and quotes on that line.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}", hint="Check the file's syntax.") from None
    except RecursionError:
        raise ConfigError(source, "YAML nests too deeply", hint="Flatten the file.") from None
    duplicate = _first_duplicate_key(node)
    if duplicate is not None:
        key, earlier, loc = duplicate
        raise ConfigError(source, f"duplicate key '{key.value}' (also on line {earlier.start_mark.line + 1}); "
                          "YAML would silently keep only the last one", line=key.start_mark.line + 1,
                          field=field_path(loc), hint="Remove or rename one of them.")
    return data, node


def parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The data and the node tree as written; raises yaml.YAMLError (ExpansionTooLarge for a bomb).

    The text is parsed once and the data constructed from that tree, unless it has merges (`<<: *base`)
    or `=` keys: constructing those rewrites the nodes it is given, and the tree must stay as written for
    duplicate-key checks and line lookups, so the data then comes from a second parse of its own.
    """
    try:
        node = yaml.compose(text, Loader=_FastComposer)
    except yaml.YAMLError:  # libyaml is stricter in places: PyYAML's own parser decides, and words the error
        node = yaml.compose(text, Loader=BoundedLoader)
    if node is None:
        return None, None
    _check_expansion(node, MAX_YAML_NODES)  # before constructing, so the error has the tree's line
    if _rewritten_by_construction(node):
        return yaml.load(text, Loader=BoundedLoader), node  # a SafeLoader, its expansion bounded
    loader = BoundedLoader("")
    try:
        return loader.construct_document(node), node
    finally:
        loader.dispose()


# the keys SafeConstructor.flatten_mapping rewrites in place
_REWRITTEN_KEY_TAGS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})


def _rewritten_by_construction(root: yaml.Node) -> bool:
    """Whether any mapping has a key that constructing rewrites in place (a merge `<<`, a value key `=`)."""
    stack: list[yaml.Node] = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag in _REWRITTEN_KEY_TAGS:
                    return True
                stack.append(key)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return False


MAX_YAML_NODES = 100_000
"""Nodes one YAML document may expand to, aliases copied in: real config files have a few hundred."""

EXPANSION_HINT = ("An alias (*name) copies its anchor's content each time it is used, so aliases of aliases "
                  "multiply; write the content out, or use fewer nested aliases.")


class ExpansionTooLarge(yaml.YAMLError):
    """The document would expand past MAX_YAML_NODES (or an alias refers to a node that contains it)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


# libyaml (C) scans and parses 5-10x faster than PyYAML's Python parser, with the same nodes and marks: a UI
# render read its pipeline files in 20 ms, and the cold path reads every config file before the first start.
# A text libyaml refuses is parsed again by PyYAML, which words the error (and reads what it can: fuzzing
# found a text PyYAML reads as a mapping and libyaml refuses). libyaml in turn reads a tab inside a line as
# the YAML spec does (`key:<tab>value`, `a<tab>b`), where PyYAML refused it; a tab that indents is refused by
# both. Where both read a text, the data is the same (20,000 mutated config files compared).
_FastComposer: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts a document's nodes, each alias expanded, before constructing it.

    A 567-byte file with 9 levels of 9 aliases is 387 M nodes once expanded: PyYAML shares them cheaply,
    but pydantic and every later walk copy them out (90 s and 3 GB before). The count is memoized per
    node, so it costs one pass over the nodes as written, however far they would expand.
    """

    max_nodes = MAX_YAML_NODES

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node, self.max_nodes)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node, limit: int) -> None:
    """Raise ExpansionTooLarge naming the first node (in document order, innermost first) that passes `limit`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            sizes[key] = total
            if total > limit:
                line = node.start_mark.line + 1
                raise ExpansionTooLarge(f"the YAML expands to more than {limit:,} nodes once its aliases (*name) "
                                        f"are copied in ({total:,} in the node on line {line})", line)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            line = node.start_mark.line + 1
            raise ExpansionTooLarge(f"the node anchored on line {line} contains an alias (*name) of itself, so "
                                    "it would expand without end", line)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_children(node)) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _first_duplicate_key(
        root: yaml.Node | None) -> tuple[yaml.ScalarNode, yaml.ScalarNode, tuple[str | int, ...]] | None:
    """The first key repeated within one mapping (PyYAML keeps the last silently), with the earlier one."""
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())] if root is not None else []
    seen_nodes: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:  # aliases share nodes
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, yaml.ScalarNode] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        return key, keys[key.value], (*loc, key.value)
                    keys[key.value] = key
                    stack.append((value, (*loc, key.value)))
                else:
                    stack.append((value, loc))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in reversed(list(enumerate(node.value))))
    return None


def line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the deepest node reachable along `loc` (a pydantic error location)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if found is None:
                return line
            key, node = found
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def field_path(loc: Sequence[str | int]) -> str:
    """'stages[2].aggregation.type' from ('stages', 2, 'aggregation', 'type'); drops pydantic's tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union", "union[")) or part in {"str", "ModelSlot"}:
            continue
        else:
            out += ("." if out else "") + (part if part else "''")  # an empty key is still a field
    return out


_HINTS = {
    "extra_forbidden": "Remove the key or check its spelling; unknown keys are rejected.",
    "missing": "Add the required key.",
    "literal_error": "Use one of the allowed values.",
    "int_parsing": "Use a whole number.",
    "float_parsing": "Use a number.",
    "bool_parsing": "Use true or false.",
    "string_type": "Use a string (quote it if needed).",
    "dict_type": "Use a mapping (key: value lines).",
    "model_type": "Use a mapping (key: value lines).",
    "list_type": "Use a list (lines starting with '- ').",
}


def validate(model: type[M], data: Any, path: Path, node: yaml.Node | None,
             context: dict[str, Any] | None = None) -> M:
    """Validate parsed YAML against a schema; the first error becomes a ConfigError."""
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {str(data)[:40]!r}"
        raise ConfigError(str(path), f"the file must be a mapping of keys (key: value lines), not {kind}",
                          line=node.start_mark.line + 1 if node is not None else None,
                          hint="See the configuration reference in README.md.")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        line = line_of(node, loc[:-1] if err.get("type") == "missing" else loc)
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise ConfigError(str(path), msg + more, line=line, field=field_path(loc) or None,
                          hint=_HINTS.get(err.get("type", ""), "See the configuration reference in README.md.")
                          ) from None


def load_model(model: type[M], path: Path, context: dict[str, Any] | None = None) -> M:
    data, node = read_yaml(path)
    if data is None:
        data = {}
    return validate(model, data, path, node, context)
