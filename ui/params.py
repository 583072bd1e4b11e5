"""Generation controls rendered from `ui.params_form` (so from GenerationParams' fields).

The same renderer serves the stage builder (values edited in place) and the one-run / rerun forms (blank
widgets whose placeholders show what the pipeline already says; only what the user fills in changes).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from orchestrator.errors import ChorusError
from ui import params_form
from ui.params_form import ParamField

# Text a user typed that does not parse (JSON), by widget key, with its error: kept while its box is folded,
# so the run stays refused and the text is there again when the box opens.
UNPARSED_KEY = "unparsed-text"


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return params_form.lines_to_text(value).replace("\n", " | ")
    return str(value)


def _placeholder(field: ParamField, placeholders: dict[str, Any] | None, blank: str) -> str:
    if placeholders is None:
        return blank
    value = placeholders.get(field.name)
    return f"{blank}: {_shown(value)}"[:80] if value is not None else f"{blank} (not set)"


def param_input(field: ParamField, *, key: str, value: Any, hint: str, container: Any = st) -> Any:
    """One number or choice widget for `field` (key `{key}-{field}`); blank is None."""
    wkey = f"{key}-{field.name}"
    if field.kind == "choice":
        options = [None, *field.choices]
        return container.selectbox(field.name, options, options.index(value) if value in options else 0, key=wkey,
                                   help=field.help, format_func=lambda v: hint if v is None else str(v))
    if field.kind == "int":
        return container.number_input(
            field.name, min_value=None if field.minimum is None else int(field.minimum),
            max_value=None if field.maximum is None else int(field.maximum),
            value=None if value is None else int(value), step=1, key=wkey, placeholder=hint, help=field.help)
    return container.number_input(
        field.name, min_value=None if field.minimum is None else float(field.minimum),
        max_value=None if field.maximum is None else float(field.maximum),
        value=None if value is None else float(value), step=float(field.step), format="%.3f", key=wkey,
        placeholder=hint, help=field.help)


def param_inputs(fields: list[ParamField], *, key: str, values: dict[str, Any],
                 placeholders: dict[str, Any] | None = None, blank: str = "inherit",
                 columns: int = 4, errors: list[str]) -> dict[str, Any]:
    """One widget per field (keys `{key}-{field}`); returns the values, None where left blank.

    Numbers and choices go in a grid, text (stop strings, grammar, JSON) below it. Text that is not valid
    JSON is read as blank and its error added to `errors` (the caller shows them and refuses to run), so a
    pipeline is never built from half a value.
    """
    out: dict[str, Any] = {}
    grid = [f for f in fields if f.kind in ("int", "float", "choice")]
    cols = st.columns(columns) if grid else []
    for i, f in enumerate(grid):
        out[f.name] = param_input(f, key=key, value=values.get(f.name), container=cols[i % columns],
                                  hint=_placeholder(f, placeholders, blank))
    unparsed: dict[str, tuple[str, str]] = st.session_state.setdefault(UNPARSED_KEY, {})
    for f in fields:
        if f.kind in ("int", "float", "choice"):
            continue
        wkey = f"{key}-{f.name}"
        shown = unparsed[wkey][0] if wkey in unparsed else params_form.value_to_text(f, values.get(f.name))
        text = st.text_area(f.name, shown, key=wkey, height=68 if f.kind == "lines" else 100, help=f.help,
                            placeholder=_placeholder(f, placeholders, blank))
        try:
            out[f.name] = params_form.text_to_value(f, text, source=f.name)
            unparsed.pop(wkey, None)
        except ChorusError as exc:
            errors.append(str(exc))
            unparsed[wkey] = (text, str(exc))
            out[f.name] = None
    return out


def folded_errors(fields: list[ParamField], *, key: str, errors: list[str]) -> None:
    """`param_inputs`' errors while its box is folded: text that did not parse still refuses the run."""
    unparsed: dict[str, tuple[str, str]] = st.session_state.get(UNPARSED_KEY, {})
    errors.extend(unparsed[f"{key}-{f.name}"][1] for f in fields if f"{key}-{f.name}" in unparsed)


def fold(label: str, *, key: str) -> tuple[Any, bool]:
    """(an expander, whether it is open): its content is built only while it is open.

    Streamlit runs a closed expander's content on every rerun, and each widget costs time in proportion to
    the widgets already on the page (its session-state scan): the folded parameter grids of a builder with
    two stages of two calls made two thirds of each rerun.
    """
    box = st.expander(label, key=key, on_change="rerun")
    return box, bool(box.open)


def folded_inputs(label: str, fields: list[ParamField], *, box: str, key: str, values: dict[str, Any],
                  blank: str, errors: list[str]) -> dict[str, Any]:
    """`param_inputs` in a box of their own (`fold`): the values while it is open; folded, nothing (the
    values stay where they are kept) but the errors of text that did not parse."""
    container, is_open = fold(label, key=box)
    if not is_open:
        folded_errors(fields, key=key, errors=errors)
        return {}
    with container:
        return param_inputs(fields, key=key, values=values, blank=blank, errors=errors)


def split_common(fields: list[ParamField]) -> tuple[list[ParamField], list[ParamField]]:
    """(the common controls, the rest) so forms show the usual four and fold the others away."""
    common = params_form.COMMON
    return [f for f in fields if f.name in common], [f for f in fields if f.name not in common]


def overrides_form(fields: list[ParamField], *, key: str, current: dict[str, Any], errors: list[str],
                   filled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Blank controls whose placeholders show the current values; only what is filled in is returned set.

    `filled`: what the user filled in before (a folded box or another tab), shown again.
    """
    return param_inputs(fields, key=key, values=filled or {}, placeholders=current, blank="keep", errors=errors)
