"""Sandboxed Jinja2 rendering for stage prompts and aggregation templates.

Prompts come from config files and may quote model output, so rendering runs in Jinja's immutable
sandbox: Python internals (`__class__`, `__globals__`, `_private` names, mutating methods) are
refused with an error instead of silently rendering empty, and `include`/`import`/`extends` cannot
reach files. Undefined names render empty (a first stage may mention `previous`), but using an
attribute of an undefined value is an error, so `stages.typo.output` is caught.

Size guards keep one template from exhausting memory: the operators `*`, `**`, `+`, `%` and `~`,
the widening filters (center, indent, wordwrap, replace, join, format, batch, slice), the filters
that turn a value into text, the widening `str` methods and every `{{ expression }}` are checked
against `MAX_OUTPUT_CHARS` *before* they allocate, and the rendered text is capped while it streams.
Ranges are capped by the sandbox (`MAX_RANGE`). CPU time is not bounded: deeply nested loops that
print nothing still run to completion.
"""

from __future__ import annotations

import inspect
import re
import string
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, update_wrapper
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from launcher.errors import ChorusError

MAX_OUTPUT_CHARS = 1_000_000
"""The most characters one render may produce, and the largest value any guarded operation may build."""

MAX_INT_BITS = 100_000
"""Integers may not grow past this many bits (`2 ** 1000000000` would hang the process)."""

SANDBOX_HINT = ("Templates can use question, previous, stages.<name>.output and stages.<name>.responses; "
                "Python internals, private names and other template files are not reachable.")
SIZE_HINT = f"Templates may build at most {MAX_OUTPUT_CHARS:,} characters and ranges of at most 100,000 items."


class TemplateError(ChorusError):
    """A prompt or aggregation template failed to parse or render; says where, on which line, and why."""

    def __init__(self, where: str, message: str, *, line: int | None = None, refused: bool = False,
                 hint: str | None = None) -> None:
        prefix = where + (f", line {line}" if line else "")
        super().__init__(f"{prefix}: {message}", hint=hint)
        self.where = where
        self.line = line
        self.detail = message
        self.refused = refused


class _TooLarge(SecurityError):
    """A guarded operation would build a value larger than the render may produce."""


# ---------------------------------------------------------------- size guards

def _approx_size(obj: Any, memo: dict[int, int] | None = None) -> int:
    """Roughly how many characters `str(obj)` would take; a shared container is measured once, counted per use."""
    if isinstance(obj, str | bytes):
        return len(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj.bit_length() // 3 + 1
    if not isinstance(obj, list | tuple | set | frozenset | dict):
        return 8
    memo = {} if memo is None else memo
    key = id(obj)
    if key not in memo:
        parts = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        memo[key] = 2 * len(obj) + sum(_approx_size(x, memo) for x in parts)
    return memo[key]


def _require(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise _TooLarge(f"{what} would build about {size:,} characters (limit {MAX_OUTPUT_CHARS:,})")


def _require_width(width: Any, what: str) -> None:
    if isinstance(width, int) and not isinstance(width, bool):
        _require(abs(width), what)


_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_printf(fmt: Any, what: str) -> None:
    """`'%*d' % (10**9, 1)` or `'%999999999s'`: refuse dynamic or huge widths in printf formats."""
    if not isinstance(fmt, str):
        return
    for match in _PRINTF_WIDTH.finditer(fmt):
        for part in match.groups():
            if part == "*":
                raise _TooLarge(f"{what}: '*' widths are not allowed in templates")
            if part:
                _require(int(part), what)


def _check_format_spec(fmt: str, what: str) -> None:
    """`'{:>999999999}'.format(x)`: refuse nested or huge widths in str.format specs."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error
    for _, _, spec, _ in parsed:
        if spec and "{" in spec:
            raise _TooLarge(f"{what}: nested format fields are not allowed in templates")
        for digits in _DIGITS.findall(spec or ""):
            _require(int(digits), what)


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
        _check_printf(left, what)
        _require(len(left) + _approx_size(right), what)


def _replace_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = (len(s) + 1) if old == "" else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(items: list[Any], sep: Any) -> int:
    return sum(_approx_size(x) for x in items) + max(len(items) - 1, 0) * len(str(sep))


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1


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
    s, old, new = a.get("s"), a.get("old"), a.get("new")
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        _require(_replace_size(s, old, new, a.get("count")), "the filter 'replace'")


def _check_join(a: dict[str, Any]) -> None:
    items = list(a.get("value") or [])
    a["value"] = items
    _require(_join_size(items, a.get("d", "")), "the filter 'join'")


def _check_format(a: dict[str, Any]) -> None:
    _check_printf(a.get("value"), "the filter 'format'")
    _require(_args_size(a.get("args", ()), a.get("kwargs", {})), "the filter 'format'")


def _args_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    memo: dict[int, int] = {}
    return sum(_approx_size(x, memo) for x in (*args, *kwargs.values()))


def _check_count_arg(name: str, arg: str) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        _require_width(a.get(arg), f"the filter '{name}'")
    return check


def _subject(a: dict[str, Any]) -> Any:
    """The value a filter works on; builtin filters name it `value`, `s` or `o`."""
    return next((a[k] for k in ("value", "s", "o") if k in a), None)


_SPECIFIC_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "join": _check_join,
    "format": _check_format,
    "batch": _check_count_arg("batch", "linecount"),
    "slice": _check_count_arg("slice", "slices"),
}

_STRINGIFYING = {"string", "pprint", "tojson", "e", "escape", "forceescape", "striptags", "urlize", "urlencode",
                 "title", "upper", "lower", "capitalize", "trim", "truncate", "wordcount", "center", "indent",
                 "wordwrap", "replace", "format"}
"""Filters that turn their input into text: a list of a million shared references would become huge."""


def _filter_check(name: str) -> Callable[[dict[str, Any]], None]:
    specific = _SPECIFIC_CHECKS.get(name)

    def check(a: dict[str, Any]) -> None:
        subject = _subject(a)
        if name in _STRINGIFYING and not isinstance(subject, str):
            _require(_approx_size(subject), f"the filter '{name}'")
        if specific:
            specific(a)
    return check


def _guarded_filter(fn: Callable[..., Any], check: Callable[[dict[str, Any]], None]) -> Callable[..., Any]:
    """Wrap a builtin filter with a size check; `update_wrapper` keeps Jinja's pass_context markers."""
    signature = inspect.signature(fn)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # let the filter report its own usage error
        bound.apply_defaults()
        check(bound.arguments)
        return fn(*bound.args, **bound.kwargs)

    return update_wrapper(wrapper, fn)


_STR_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def _check_str_method(s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size checks for the `str` methods that can widen a string; returns the (possibly materialised) args."""
    what = f"the method str.{name}"
    if name in _STR_WIDTH_METHODS and args:
        _require_width(args[0], what)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _require(len(s) + s.count("\t") * (tab if isinstance(tab, int) else 0), what)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 else kwargs.get("count")
        _require(_replace_size(s, args[0], args[1], count if isinstance(count, int) else None), what)
    elif name == "join" and args:
        items = list(args[0])
        _require(_join_size(items, s), what)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((_approx_size(v) for v in args[0].values()), default=1)
        _require(len(s) * max(widest, 1), what)
    return args


# ---------------------------------------------------------------- the environment

class _GuardedCodeGenerator(CodeGenerator):
    """Routes the `~` operator through the environment so its result size can be checked."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _NoFilesLoader(jinja2.BaseLoader):
    """Templates may not pull in other templates or files."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Any]:
        raise SecurityError(f"templates may not include, import or extend other templates ({template!r})")


class _GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict about internals and about the size of what it builds."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(loader=_NoFilesLoader(), undefined=jinja2.Undefined, autoescape=False,
                         finalize=self._finalize, keep_trailing_newline=True)
        for name in _STRINGIFYING | _SPECIFIC_CHECKS.keys():
            self.filters[name] = _guarded_filter(self.filters[name], _filter_check(name))

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Refuse at once: the stock sandbox returns an Undefined that renders empty and hides the attempt."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _binop_size(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and callable(__obj):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, what = value.__self__, f"the method str.{value.__name__}"
        _check_format_spec(fmt, what)

        def checked(*args: Any, **kwargs: Any) -> str:
            _require(len(fmt) + _args_size(args, kwargs), what)
            return wrapped(*args, **kwargs)

        return update_wrapper(checked, wrapped)

    def guarded_concat(self, parts: Sequence[Any]) -> str:
        memo: dict[int, int] = {}
        _require(sum(_approx_size(p, memo) for p in parts), "the operator '~'")
        return "".join(str(p) for p in parts)

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every `{{ expression }}` passes here before becoming text: refuse huge values before str()."""
        if isinstance(value, list | tuple | set | frozenset | dict):
            _require(_approx_size(value), "an output expression")
        return value


_ENV = _GuardedSandbox()


# ---------------------------------------------------------------- rendering

def render(template: str, context: Mapping[str, Any], *, where: str) -> str:
    """Render a user template in the sandbox; every failure becomes a TemplateError naming `where`."""
    try:
        return _collect(_compile(template).generate(dict(context)), where)
    except TemplateError:
        raise
    except TemplateSyntaxError as exc:
        raise TemplateError(where, f"syntax error: {exc.message}", line=exc.lineno,
                            hint="Check the {{ }} and {% %} tags near that line.") from None
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


@lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    """Prompts are rendered once per model and stage; compile each source once (errors are not cached)."""
    return _ENV.from_string(source)


def _collect(chunks: Iterator[str], where: str) -> str:
    """Join the streamed output, stopping as soon as it passes the cap."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise TemplateError(where, f"refused by the sandbox: output is longer than {MAX_OUTPUT_CHARS:,} "
                                       "characters", refused=True,
                                hint=SIZE_HINT)
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


def build_context(question: str, previous: str, stages: Sequence[Any]) -> dict[str, Any]:
    """The names a stage prompt may use; `stages` are StageRecord-likes (.name, .output, .responses)."""
    return {"question": question, "previous": previous, "stages": Stages([stage_view(s) for s in stages])}
