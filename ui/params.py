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
    for f in fields:
        if f.kind in ("int", "float", "choice"):
            continue
        text = st.text_area(f.name, params_form.value_to_text(f, values.get(f.name)), key=f"{key}-{f.name}",
                            height=68 if f.kind == "lines" else 100, help=f.help,
                            placeholder=_placeholder(f, placeholders, blank))
        try:
            out[f.name] = params_form.text_to_value(f, text, source=f.name)
        except ChorusError as exc:
            errors.append(str(exc))
            out[f.name] = None
    return out


def split_common(fields: list[ParamField]) -> tuple[list[ParamField], list[ParamField]]:
    """(the common controls, the rest) so forms show the usual four and fold the others away."""
    common = params_form.COMMON
    return [f for f in fields if f.name in common], [f for f in fields if f.name not in common]


def overrides_form(fields: list[ParamField], *, key: str, current: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """Blank controls whose placeholders show the current values; only what is filled in is returned set."""
    return param_inputs(fields, key=key, values={}, placeholders=current, blank="keep", errors=errors)
