"""Sandboxed Jinja2 rendering for stage prompts and aggregation templates.

Prompts come from config files and may quote model output, so rendering runs in Jinja's immutable
sandbox: Python internals (`__class__`, `__globals__`, `_private` names, mutating methods) are
refused with an error instead of silently rendering empty, and `include`/`import`/`extends` cannot
reach files. Undefined names render empty (a first stage may mention `previous`), but using an
attribute of an undefined value is an error, so `stages.typo.output` is caught.

Limits, all per render (`_Limits`), so one template cannot exhaust memory or hang the process:

- *Before* it builds anything, every operation whose output can grow with an argument (a width, a
  count, a string repeated per item) is checked: the operators `*`, `**`, `+`, `%`, `~`; the
  filters center, indent, wordwrap, replace, join, format, batch, slice, tojson, urlize; the widening
  `str`/`bytes` methods and `int.to_bytes`; `str.format` field by field; the global `lipsum`.
  No single value may pass `MAX_OUTPUT_CHARS` plus the size of the data the template was given.
- Sizes are of the value *as text*, shared references counted each time they print: `[b, b, b]` holds
  three pointers but prints `b` three times. So list, tuple and dict literals are checked like `*`, and
  every filter outside an allow-list of filters that never make text (`_BOUNDED_FILTERS`: length,
  first, map...) has its arguments' text size checked before it runs, as do the tests `lower`/`upper`.
- *After* every filter, call, operator and output, what was built is added to a running total
  (`MAX_BUILT_CHARS`); template text inside loops, macros and `{% set %}` blocks counts too.
- Every loop iteration, call and filter checks a wall-clock deadline (`RENDER_TIMEOUT_S`) and a stop
  flag, so nested loops end with a TemplateError, and `render_async` stops the work when its
  awaiting task is cancelled.

The limits are on what the template *adds*: quoting a large question or answer is data, not an attack,
so a 1 MB question renders (whether it fits the model's context is the server's to say).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import re
import string
import threading
import time
import traceback
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from functools import lru_cache, update_wrapper
from typing import Any, TypeVar, cast

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.constants import LOREM_IPSUM_WORDS
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Namespace, _PassArg, pass_eval_context

from launcher.errors import ChorusError

MAX_OUTPUT_CHARS = 1_000_000
"""What one render may add on top of its input data: the cap on its output and on any single value it builds."""

MAX_BUILT_CHARS = 50_000_000
"""All the values one render builds, added up (plus ten times its input data): bounds memory across loops."""

MAX_INT_BITS = 100_000
"""Integers may not grow past this many bits (`2 ** 1000000000` would hang the process)."""

RENDER_TIMEOUT_S = 5.0
"""Wall-clock limit of one render; real prompts take milliseconds."""

_STOP_GRACE_S = 1.0
"""How long `render_async` waits past the deadline for a worker stuck in one long C call before giving up on it."""

SANDBOX_HINT = ("Templates can use question, previous, context, stages.<name>.output and stages.<name>.responses; "
                "Python internals, private names and other template files are not reachable.")
SIZE_HINT = (f"Templates may add at most {MAX_OUTPUT_CHARS:,} characters to the data they are given, build at most "
             f"{MAX_BUILT_CHARS:,} characters in all, and use ranges of at most 100,000 items.")
TIME_HINT = ("Templates must finish within a few seconds; loops nested inside loops over large ranges are the "
             "usual cause.")


class TemplateError(ChorusError):
    """A prompt or aggregation template failed to parse or render; says where, on which line, and why.

    `refused`: the sandbox stopped it (internals, size or time); `timed_out`: it ran past its time limit.
    """

    def __init__(self, where: str, message: str, *, line: int | None = None, refused: bool = False,
                 hint: str | None = None, timed_out: bool = False) -> None:
        prefix = where + (f", line {line}" if line else "")
        super().__init__(f"{prefix}: {message}", hint=hint)
        self.where = where
        self.line = line
        self.detail = message
        self.refused = refused
        self.timed_out = timed_out


class _TooLarge(SecurityError):
    """A guarded operation would build (or has built) more than the render may."""


class _OutOfTime(Exception):
    """The render passed its deadline; raised from inside the template's own loops and calls."""


class _Stopped(Exception):
    """The render was stopped from outside (its awaiting task was cancelled, or it was given up on)."""


# ---------------------------------------------------------------- per-render limits

class _Limits:
    """The budget of one render: value cap, running total of what was built, deadline and stop flag.

    Lives in a context variable of the thread that renders; `stop()` may be called from any thread.
    """

    def __init__(self, input_chars: int, timeout_s: float) -> None:
        self.input_chars = input_chars
        self.value_limit = MAX_OUTPUT_CHARS + input_chars
        self.built_limit = MAX_BUILT_CHARS + 10 * input_chars
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.built = 0
        self.stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def tick(self) -> None:
        if self.stop_reason is not None:
            raise _Stopped(self.stop_reason)
        if time.monotonic() > self.deadline:
            raise _OutOfTime(f"rendering took longer than {self.timeout_s:g} s")

    def charge(self, size: int, what: str) -> None:
        """Count `size` characters just built; refuse a value over the cap or a total over the budget."""
        if size > self.value_limit:
            raise _TooLarge(f"{what} built about {size:,} characters (limit {self.value_limit:,})")
        self.built += size
        if self.built > self.built_limit:
            raise _TooLarge(f"the template built about {self.built:,} characters in all "
                            f"(limit {self.built_limit:,})")
        self.tick()


_CURRENT: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("chorus_template_limits", default=None)


def _value_limit() -> int:
    limits = _CURRENT.get()
    return limits.value_limit if limits else MAX_OUTPUT_CHARS


def _tick() -> None:
    limits = _CURRENT.get()
    if limits is not None:
        limits.tick()


_T = TypeVar("_T")


def _charge_result(result: _T, what: str) -> _T:
    """Post-check: count what an operation returned (lazy iterators count when they are materialised)."""
    limits = _CURRENT.get()
    if limits is not None:
        if isinstance(result, (str, bytes, bytearray, *_SHOWS_CONTENTS)):
            limits.charge(_approx_size(result), what)
        else:
            limits.tick()
    return result


# ---------------------------------------------------------------- size estimates

def _approx_size(obj: Any, memo: dict[int, int] | None = None) -> int:
    """Roughly how many characters `str(obj)` would take; a shared container is measured once, counted per use.

    Every object a template can reach whose text shows its contents is measured by them: containers,
    mappings and their key/value/item views, `namespace()` and `cycler()` objects (their repr lists their
    values), stage views. Anything else prints as a short fixed repr.
    """
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj.bit_length() // 3 + 1
    if isinstance(obj, StageView):
        return len(obj.output) + _approx_size(obj.responses, memo)
    if isinstance(obj, Stages):
        return sum(_approx_size(v, memo) for v in obj)
    contents = _contents(obj)
    if contents is None:
        return 8
    memo = {} if memo is None else memo
    key = id(obj)
    if key not in memo:
        memo[key] = 0  # a container that holds itself is measured once, not forever
        memo[key] = 2 * len(contents) + sum(_approx_size(x, memo) for x in contents)
    return memo[key]


_SHOWS_CONTENTS = (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView, Namespace, Cycler, Mapping)
"""Objects whose text lists what they hold (`_contents` says what)."""


def _contents(obj: Any) -> Sequence[Any] | None:
    """What prints inside `obj`'s text (keys and values for a mapping), or None for a fixed-size repr."""
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, KeysView | ValuesView | ItemsView):
        return _contents(getattr(obj, "mapping", None) or getattr(obj, "_mapping", {}))
    if isinstance(obj, Namespace):
        return _contents(object.__getattribute__(obj, "_Namespace__attrs"))
    if isinstance(obj, Cycler):
        return list(obj.items)
    if isinstance(obj, Mapping) and not isinstance(obj, jinja2.runtime.Context):
        return [*obj.keys(), *obj.values()]
    return None


def _input_size(context: Mapping[str, Any]) -> int:
    """The size of the data a template is given (question, answers, earlier stages): not the template's doing."""
    memo: dict[int, int] = {}
    return sum(_approx_size(v, memo) for v in context.values())


def _require(size: int, what: str) -> None:
    """Pre-check: refuse before building a value over the cap."""
    limit = _value_limit()
    if size > limit:
        raise _TooLarge(f"{what} would build about {size:,} characters (limit {limit:,})")


def _require_width(width: Any, what: str) -> None:
    if isinstance(width, int) and not isinstance(width, bool):
        _require(abs(width), what)


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])?")
_DIGITS = re.compile(r"\d+")


def _printf_size(fmt: Any, args: Any, what: str) -> int:
    """`fmt % args` before Python runs it: widths, '*' widths, and a mapping key used many times."""
    if not isinstance(fmt, str):
        return _approx_size(fmt) + _approx_size(args)
    conversions = 0
    widths = 0
    for match in _PRINTF_SPEC.finditer(fmt):
        width, precision, kind = match.groups()
        if kind == "%" and width is None and precision is None:
            continue
        conversions += 1
        for part in (width, precision):
            if part == "*":
                raise _TooLarge(f"{what}: '*' widths are not allowed in templates")
            if part:
                _require(int(part), what)
                widths += int(part)
    memo: dict[int, int] = {}
    if isinstance(args, Mapping):  # '%(a)s%(a)s' % {'a': big} uses one value many times
        biggest = max((_approx_size(v, memo) for v in args.values()), default=0)
        return len(fmt) + widths + conversions * biggest
    values = args if isinstance(args, tuple) else (args,)
    return len(fmt) + widths + sum(_approx_size(v, memo) for v in values)


def _format_size(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> int:
    """`fmt.format(*args, **kwargs)` before it runs: each field counts the argument it names ('{0}{0}' twice)."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return len(fmt)  # str.format raises its own error
    memo: dict[int, int] = {}
    sizes = [_approx_size(a, memo) for a in args]
    named = {k: _approx_size(v, memo) for k, v in kwargs.items()}
    biggest = max([0, *sizes, *named.values()])
    total, auto = len(fmt), 0
    for _, field, spec, _ in parsed:
        if spec and "{" in spec:
            raise _TooLarge(f"{what}: nested format fields are not allowed in templates")
        for digits in _DIGITS.findall(spec or ""):
            _require(int(digits), what)
            total += int(digits)
        if field is None:
            continue
        head = re.split(r"[.\[]", field, maxsplit=1)[0]
        if head == "":
            head, auto = str(auto), auto + 1
        if head.isdigit():
            total += sizes[int(head)] if int(head) < len(sizes) else biggest
        else:
            total += named.get(head, biggest)
    return total


def _binop_size(operator: str, left: Any, right: Any) -> None:
    """Check an intercepted binary operation before Python runs it."""
    what = f"the operator '{operator}'"
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS:
            raise _TooLarge(f"{what} would build an integer over {MAX_INT_BITS:,} bits")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _TooLarge(f"{what} would build an integer over {MAX_INT_BITS:,} bits")
        elif isinstance(right, int):
            _require(_approx_size(left) * max(right, 0), what)
        elif isinstance(left, int):
            _require(_approx_size(right) * max(left, 0), what)
    elif operator == "+" and not (isinstance(left, int | float) and isinstance(right, int | float)):
        _require(_approx_size(left) + _approx_size(right), what)
    elif operator == "%" and isinstance(left, str):
        _require(_printf_size(left, right, what), what)


def _replace_size(s: str | bytes | bytearray, old: str | bytes | bytearray, new: str | bytes | bytearray,
                  count: int | None) -> int:
    hits = (len(s) + 1) if len(old) == 0 else s.count(old)  # type: ignore[arg-type]  # caller: old is of s's type
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(items: list[Any], sep: Any) -> int:
    memo: dict[int, int] = {}
    return sum(_approx_size(x, memo) for x in items) + max(len(items) - 1, 0) * _approx_size(sep)


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1


def _depth(obj: Any, limit: int = 100) -> int:
    """Nesting depth of lists and dicts (tojson indents each level)."""
    if limit <= 0 or not isinstance(obj, list | tuple | dict):
        return 0
    children = obj.values() if isinstance(obj, dict) else obj
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


# Filter checks get the bound arguments by name and may replace them (join materialises its input).
def _check_center(a: dict[str, Any]) -> None:
    _require_width(a.get("width"), "the filter 'center'")


def _check_indent(a: dict[str, Any]) -> None:
    width, s = a.get("width"), str(a.get("s", ""))
    if isinstance(width, str):
        _require(len(s) + _lines(s) * len(width), "the filter 'indent'")
    else:
        _require_width(width, "the filter 'indent'")
        _require(len(s) + _lines(s) * abs(width or 0), "the filter 'indent'")


def _check_wordwrap(a: dict[str, Any]) -> None:
    s, wrap = str(a.get("s", "")), a.get("wrapstring") or "\n"
    _require(len(s) + (len(s) + 1) * len(str(wrap)), "the filter 'wordwrap'")


def _check_replace(a: dict[str, Any]) -> None:
    s, old, new, count = str(a.get("s", "")), str(a.get("old", "")), str(a.get("new", "")), a.get("count")
    _require(_replace_size(s, old, new, count if isinstance(count, int) else None), "the filter 'replace'")


def _check_join(a: dict[str, Any]) -> None:
    items = list(a.get("value") or [])
    a["value"] = items
    _require(_join_size(items, a.get("d", "")), "the filter 'join'")


def _check_format(a: dict[str, Any]) -> None:
    args, kwargs = a.get("args", ()), a.get("kwargs", {})
    _require(_printf_size(a.get("value"), kwargs or tuple(args), "the filter 'format'"), "the filter 'format'")


def _check_tojson(a: dict[str, Any]) -> None:
    indent = a.get("indent")
    step = len(indent) if isinstance(indent, str) else (indent if isinstance(indent, int) else 0)
    if step:
        value = a.get("value")
        _require_width(step, "the filter 'tojson'")
        _require(_approx_size(value) * (2 + abs(step) * _depth(value)), "the filter 'tojson'")


def _check_urlize(a: dict[str, Any]) -> None:
    value = str(a.get("value", ""))
    extra = sum(len(str(a.get(k) or "")) for k in ("target", "rel")) + 64
    _require(2 * len(value) + len(value.split()) * extra, "the filter 'urlize'")


def _check_count_arg(name: str, arg: str) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        _require_width(a.get(arg), f"the filter '{name}'")
    return check


_SPECIFIC_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "join": _check_join,
    "format": _check_format,
    "tojson": _check_tojson,
    "urlize": _check_urlize,
    "batch": _check_count_arg("batch", "linecount"),
    "slice": _check_count_arg("slice", "slices"),
}

_BOUNDED_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int", "items",
    "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse", "round",
    "select", "selectattr", "slice", "sort", "unique"})
"""Filters whose result is never new text: a number, one of their arguments, or references to its items.

Every other filter (and any filter a newer Jinja adds) may turn its arguments into text, which for a list of
a million shared references is a gigabyte (`(e|safe)|length` built 900 M characters): their arguments' text
size is checked before they run. An allow-list, so a filter nobody thought about is checked, not trusted.
"""

_BOUNDED_TESTS = frozenset({
    "!=", "<", "<=", "==", ">", ">=", "boolean", "callable", "defined", "divisibleby", "eq", "equalto",
    "escaped", "even", "false", "filter", "float", "ge", "greaterthan", "gt", "in", "integer", "iterable",
    "le", "lessthan", "lt", "mapping", "ne", "none", "number", "odd", "sameas", "sequence", "string", "test",
    "true", "undefined"})
"""Tests that never turn their value into text (`lower` and `upper` run `str(value)` first)."""


def _require_text_of(values: Iterable[Any], what: str) -> None:
    """Pre-check: the arguments of an operation that may print them are not too large as text."""
    memo: dict[int, int] = {}
    _require(sum(_approx_size(v, memo) for v in values), what)


def _filter_check(name: str, passed: str | None) -> Callable[[dict[str, Any]], None]:
    """The checks one filter runs on its bound arguments; `passed` names the context argument Jinja adds."""
    specific = _SPECIFIC_CHECKS.get(name)
    what = f"the filter '{name}'"

    def check(a: dict[str, Any]) -> None:
        if name not in _BOUNDED_FILTERS:
            _require_text_of((v for k, v in a.items() if k != passed), what)
        if specific:
            specific(a)
    return check


def _guarded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a builtin filter: deadline, size pre-check, then count what it built.

    Jinja passes the context/eval context first when the filter asks for it; filters with an async
    variant ask for it without naming it in their (sync) signature, so that argument is set aside
    before binding the rest by name. `update_wrapper` keeps Jinja's pass_* markers.
    """
    inner = inspect.unwrap(fn)
    signature = inspect.signature(inner)
    skip = 1 if _PassArg.from_obj(fn) is not None and _PassArg.from_obj(inner) is None else 0
    passed = next(iter(signature.parameters), None) if _PassArg.from_obj(inner) is not None else None
    check = _filter_check(name, passed)
    what = f"the filter '{name}'"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _tick()
        head, rest = args[:skip], args[skip:]
        try:
            bound = signature.bind(*rest, **kwargs)
        except TypeError:  # let the filter report its own usage error, but never print unchecked arguments
            if name not in _BOUNDED_FILTERS:
                _require_text_of([*rest[1 if passed else 0:], *kwargs.values()], what)
            return _charge_result(fn(*args, **kwargs), what)
        bound.apply_defaults()
        check(bound.arguments)
        return _charge_result(fn(*head, *bound.args, **bound.kwargs), what)

    return update_wrapper(wrapper, fn)


def _guarded_test(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a builtin test: deadline, and a text-size pre-check for the tests that print their value."""
    what = f"the test '{name}'"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if name not in _BOUNDED_TESTS:
            _require_text_of([*args, *kwargs.values()], what)
        return fn(*args, **kwargs)

    return update_wrapper(wrapper, fn)


_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def _check_method(owner: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size checks for the `str`/`bytes` methods that can widen a value, and `int.to_bytes`.

    Returns the (possibly materialised) positional arguments.
    """
    if isinstance(owner, int) and not isinstance(owner, bool):
        if name == "to_bytes":
            _require_width(args[0] if args else kwargs.get("length", 1), "the method int.to_bytes")
        return args
    if not isinstance(owner, str | bytes | bytearray):
        return args
    s, what = owner, f"the method {type(owner).__name__}.{name}"
    if name in _WIDTH_METHODS and args:
        _require_width(args[0], what)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = s.count("\t") if isinstance(s, str) else s.count(b"\t")
        _require(len(s) + tabs * (tab if isinstance(tab, int) else 0), what)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(s)) and isinstance(args[1], type(s)):
        count = args[2] if len(args) > 2 else kwargs.get("count")
        _require(_replace_size(s, args[0], args[1], count if isinstance(count, int) else None), what)
    elif name == "join" and args:
        items = list(args[0])
        _require(_join_size(items, s), what)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((_approx_size(v) for v in args[0].values()), default=1)
        _require(len(s) * max(widest, 1), what)
    elif name == "translate" and args and isinstance(args[0], bytes | bytearray):
        pass  # a 256-byte table: same length out
    return args


_LIPSUM_WORD = max(len(w) for w in LOREM_IPSUM_WORDS.split()) + 2  # a word, a comma or full stop, a space


def _guarded_lipsum(lipsum: Callable[..., str]) -> Callable[..., str]:
    """`lipsum(300000, min=99, max=100)` built 904 MiB before: refuse by its largest possible size first."""
    signature = inspect.signature(lipsum)

    def checked(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        n, high, html = bound.arguments["n"], bound.arguments["max"], bound.arguments["html"]
        if isinstance(n, int) and isinstance(high, int):
            _require(max(n, 0) * (max(high, 0) * _LIPSUM_WORD + (9 if html else 2)), "the global 'lipsum'")
        return lipsum(*args, **kwargs)

    return update_wrapper(checked, lipsum)


# ---------------------------------------------------------------- the environment

class _GuardedCodeGenerator(CodeGenerator):
    """Routes `~` through the environment, and counts template text as it is output."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._guarded_literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._guarded_literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":  # a `{% for a, b in ... %}` target is not a value
            self._guarded_literal(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def _guarded_literal(self, visit: Callable[[Any, Frame], None], node: nodes.Expr, frame: Frame) -> None:
        """`[b, b, b]` of a large `b` grows what its text would be tenfold per level: checked like `*`."""
        self.write("environment.guarded_literal(")
        visit(node, frame)
        self.write(")")

    def visit_Output(self, node: nodes.Output, frame: Frame) -> None:
        """Template text repeated by a loop inside a macro or `{% set %}` block builds a string too: count it."""
        literal = sum(len(child.data) for child in node.nodes if isinstance(child, nodes.TemplateData))
        if literal:
            self.writeline(f"environment.charge_text({literal})")
        super().visit_Output(node, frame)


class _NoFilesLoader(jinja2.BaseLoader):
    """Templates may not pull in other templates or files."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Any]:
        raise SecurityError(f"templates may not include, import or extend other templates ({template!r})")


class _GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict about internals, and about the size and time of what it builds.

    Constant folding is off (`optimized=False`, a context-taking finalize), so every expression is
    evaluated at render time under the render's limits rather than once at compile time without them.
    """

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(loader=_NoFilesLoader(), undefined=jinja2.Undefined, autoescape=False,
                         finalize=_finalize, keep_trailing_newline=True, optimized=False)
        for name, fn in list(self.filters.items()):
            self.filters[name] = _guarded_filter(name, fn)
        for name, fn in list(self.tests.items()):
            self.tests[name] = _guarded_test(name, cast(Callable[..., Any], fn))  # typeshed: `function`
        self.globals["lipsum"] = _guarded_lipsum(
            cast(Callable[..., str], self.globals["lipsum"]))  # jinja2's generate_lorem_ipsum; globals hold objects

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every `{% for %}` iterates through `guarded_iter`, so each iteration checks the deadline."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            guard = nodes.EnvironmentAttribute("guarded_iter", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        return tree

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _named_stage(self, obj, attribute, super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _named_stage(self, obj, argument, super().getitem(obj, argument))

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Refuse at once: the stock sandbox returns an Undefined that renders empty and hides the attempt."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _binop_size(operator, left, right)
        return _charge_result(super().call_binop(context, operator, left, right), f"the operator '{operator}'")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", None) or getattr(__obj, "name", None) or type(__obj).__name__
        if owner is not None and callable(__obj):
            args = _check_method(owner, name, args, kwargs)
        return _charge_result(super().call(__context, __obj, *args, **kwargs), f"the call {name}()")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, what = value.__self__, f"the method str.{value.__name__}"
        _format_size(fmt, (), {}, what)  # nested or huge widths are refused before any argument is seen

        def checked(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map":
                mapping = args[0] if args and isinstance(args[0], Mapping) else {}
                _require(_format_size(fmt, (), mapping, what), what)
            else:
                _require(_format_size(fmt, args, kwargs, what), what)
            return wrapped(*args, **kwargs)

        return update_wrapper(checked, wrapped)

    def guarded_concat(self, parts: Sequence[Any]) -> str:
        memo: dict[int, int] = {}
        _require(sum(_approx_size(p, memo) for p in parts), "the operator '~'")
        return _charge_result("".join(str(p) for p in parts), "the operator '~'")

    def guarded_literal(self, value: _T) -> _T:
        """A list, tuple or dict written in the template holds references, but prints every one of them."""
        if _CURRENT.get() is not None:
            _require(_approx_size(value), "a literal " + type(value).__name__)
        return value

    def guarded_iter(self, iterable: Iterable[Any]) -> Iterable[Any]:
        limits = _CURRENT.get()
        return iterable if limits is None else _ticking(iterable, limits)

    def charge_text(self, size: int) -> None:
        limits = _CURRENT.get()
        if limits is not None:
            limits.charge(size, "template text")


def _named_stage(env: jinja2.Environment, obj: Any, name: Any, value: Any) -> Any:
    """`stages.nosuch` is undefined with a message that names the stages a template can use, not the class
    behind `stages` ("'...Stages object' has no attribute 'nosuch'"); it still renders empty on its own."""
    if isinstance(obj, Stages) and isinstance(value, jinja2.Undefined):
        names = ", ".join(v.name for v in obj)
        return env.undefined(hint=f"no stage named {str(name)!r} before this one "
                                  + (f"(stages: {names})" if names else "(it is the first stage)"), obj=obj, name=name)
    return value


def _ticking(iterable: Iterable[Any], limits: _Limits) -> Iterator[Any]:
    for item in iterable:
        limits.tick()
        yield item


@pass_eval_context
def _finalize(eval_ctx: Any, value: Any) -> Any:
    """Every `{{ expression }}` passes here before becoming text: refuse huge values before str(), count the rest."""
    if isinstance(value, list | tuple | set | frozenset | dict):
        _require(_approx_size(value), "an output expression")
    limits = _CURRENT.get()
    if limits is not None:
        limits.charge(_approx_size(value), "an output expression")
    return value


_ENV = _GuardedSandbox()


# ---------------------------------------------------------------- rendering

def render(template: str, context: Mapping[str, Any], *, where: str, timeout_s: float = RENDER_TIMEOUT_S) -> str:
    """Render a user template in the sandbox, in this thread; every failure becomes a TemplateError naming `where`.

    The deadline is checked by the template's own loops and calls, so a runaway template ends here too;
    from async code use `render_async`, which keeps the event loop free and can be cancelled.
    """
    return _render_limited(template, context, where, _Limits(_input_size(context), timeout_s))


async def render_async(source: str, context: Mapping[str, Any], *, where: str,
                       timeout_s: float = RENDER_TIMEOUT_S) -> str:
    """`render` in a worker thread: the event loop stays free, and cancelling the awaiting task stops the render.

    Raises TemplateError (`timed_out=True`) once `timeout_s` passes. The worker is a daemon thread that
    checks a stop flag at every loop iteration, call and filter, so it ends within moments of a cancel.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    limits = _Limits(0, timeout_s)

    def settle(result: str | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result or "")

    def work() -> None:
        try:
            limits.input_chars = size = _input_size(context)
            limits.value_limit += size
            limits.built_limit += 10 * size
            outcome: tuple[str | None, BaseException | None] = (_render_limited(source, context, where, limits), None)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed while we rendered: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="chorus-render", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout_s + _STOP_GRACE_S)
    except TimeoutError:
        limits.stop("given up: past the deadline")
        done.cancel()  # nobody awaits it now: a late error must not print "Future exception was never retrieved"
        raise _timeout_error(where, limits) from None
    except asyncio.CancelledError:
        limits.stop("cancelled")
        done.cancel()
        raise


def _render_limited(template: str, context: Mapping[str, Any], where: str, limits: _Limits) -> str:
    token = _CURRENT.set(limits)
    try:
        return _collect(_compile(template).generate(dict(context)), where, limits)
    except TemplateError:
        raise
    except TemplateSyntaxError as exc:
        raise TemplateError(where, f"syntax error: {exc.message}", line=exc.lineno,
                            hint="Check the {{ }} and {% %} tags near that line.") from None
    except _OutOfTime as exc:
        raise _timeout_error(where, limits, _template_line(exc)) from None
    except _Stopped as exc:
        raise TemplateError(where, f"rendering was stopped ({exc})", refused=True) from None
    except _TooLarge as exc:
        raise TemplateError(where, f"refused by the sandbox: {exc}", line=_template_line(exc), refused=True,
                            hint=SIZE_HINT) from None
    except SecurityError as exc:
        raise TemplateError(where, f"refused by the sandbox: {exc}", line=_template_line(exc), refused=True,
                            hint=SANDBOX_HINT) from None
    except (MemoryError, OverflowError, RecursionError) as exc:
        raise TemplateError(where, f"refused by the sandbox: {type(exc).__name__}: {exc}",
                            line=_template_line(exc), refused=True,
                            hint=SIZE_HINT) from None
    except UndefinedError as exc:
        raise TemplateError(where, f"undefined value: {exc.message}", line=_template_line(exc),
                            hint=_undefined_hint(context)) from None
    except Exception as exc:
        raise TemplateError(where, f"{type(exc).__name__}: {exc}", line=_template_line(exc)) from None
    finally:
        _CURRENT.reset(token)


def _timeout_error(where: str, limits: _Limits, line: int | None = None) -> TemplateError:
    return TemplateError(where, f"refused by the sandbox: rendering took longer than {limits.timeout_s:g} s "
                                "and was stopped", line=line, refused=True, timed_out=True, hint=TIME_HINT)


@lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    """Prompts are rendered once per model and stage; compile each source once (errors are not cached)."""
    return _ENV.from_string(source)


def _collect(chunks: Iterator[str], where: str, limits: _Limits) -> str:
    """Join the streamed output, stopping as soon as it passes the cap; the message names size and limit."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limits.value_limit:
            given = (f" ({MAX_OUTPUT_CHARS:,} for the template plus the {limits.input_chars:,} characters of "
                     "question and answers it was given)") if limits.input_chars else ""
            raise TemplateError(where, f"refused by the sandbox: output is longer than {limits.value_limit:,} "
                                       f"characters{given}", refused=True, hint=SIZE_HINT)
        out.append(chunk)
    return "".join(out)


def _template_line(exc: BaseException) -> int | None:
    """Jinja rewrites tracebacks so template code shows as '<template>' frames with template line numbers."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return lines[-1] if lines else None


def _undefined_hint(context: Mapping[str, Any]) -> str:
    stages = context.get("stages")
    names = ", ".join(v.name for v in stages) if isinstance(stages, Stages) else ""
    return "Check the names used in the template" + (f"; stages so far: {names}." if names else ".")


# ---------------------------------------------------------------- context helpers

@dataclass(frozen=True)
class StageView:
    """What a template sees of an earlier stage: `stages.review.output`, `stages.review.responses`."""

    name: str
    output: str
    responses: list[dict[str, str]]

    def __str__(self) -> str:
        return self.output


class Stages:
    """Earlier stages by name: `stages.review` or `stages["my-stage"]`; iterating yields StageViews in order.

    It has no public methods, so a stage may be called `items` or `keys` and still be reached with a dot.
    """

    def __init__(self, views: Sequence[StageView]) -> None:
        self._views = {v.name: v for v in views}

    def __getitem__(self, name: str) -> StageView:
        return self._views[name]

    def __getattr__(self, name: str) -> StageView:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._views[name]
        except KeyError:
            raise AttributeError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._views

    def __iter__(self) -> Iterator[StageView]:
        return iter(self._views.values())

    def __len__(self) -> int:
        return len(self._views)


def response_dicts(responses: Sequence[Any]) -> list[dict[str, str]]:
    """The successful responses as plain dicts, the shape templates and custom functions receive."""
    return [{"label": r.label, "model": r.model, "text": r.text} for r in responses if getattr(r, "ok", True)]


def stage_view(stage: Any) -> StageView:
    return StageView(name=stage.name, output=stage.output or "", responses=response_dicts(stage.responses))


def build_context(question: str, previous: str, stages: Sequence[Any],
                  history: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """The names a stage prompt may use; `stages` are StageRecord-likes (.name, .output, .responses).

    `history` is the conversation before the question (a chat client's earlier turns: {role, content}).

    `context` is the latest retrieve stage's numbered passages with the instruction to cite them as [n]
    (empty when no stage retrieved).
    """
    retrieved = [s for s in stages if getattr(getattr(s, "aggregation", None), "kind", None) == "retrieve"]
    context = str(retrieved[-1].aggregation.details.get("context", "")) if retrieved else ""
    return {"question": question, "previous": previous, "stages": Stages([stage_view(s) for s in stages]),
            "context": context, "history": [dict(turn) for turn in history]}
