"""Question sets: one JSON object per line, checked strictly; every error names the file and line.

A line: {"question": "...", "id": "...", and at most one reference: "answer" (text, or a list of
accepted texts), "number" (with an optional absolute "tolerance") or "regex"}. Blank lines are skipped.
Without a reference an item can only be judged. `basic.jsonl` ships with chorus and is the default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

BUNDLED = Path(__file__).parent / "questions" / "basic.jsonl"
_KEYS = {"id", "question", "answer", "number", "tolerance", "regex"}
MAX_FILE_BYTES = 50 * 1024 * 1024


class QuestionsError(ConfigError):
    """A question file cannot be read or a line does not fit the format (file, line and field say where)."""


@dataclass(frozen=True)
class EvalItem:
    """One question of an eval, with its reference (at most one kind) and where it came from."""

    index: int                      # 0-based position in the eval
    id: str
    question: str
    answer: tuple[str, ...] | None = None
    number: float | None = None
    tolerance: float = 0.0
    regex: str | None = None
    line: int | None = None

    @property
    def reference_kind(self) -> str | None:
        return "answer" if self.answer else "number" if self.number is not None else "regex" if self.regex else None

    @property
    def reference_text(self) -> str | None:
        """The reference as a judge should see it (a regex is not shown: it is not an answer)."""
        if self.answer:
            return self.answer[0]
        if self.number is not None:
            return f"{self.number:g}"
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["answer"] = list(self.answer) if self.answer else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalItem:
        answer = data.get("answer")
        return cls(**{**data, "answer": tuple(answer) if answer else None})


def load_questions(path: Path | str, *, limit: int | None = None) -> list[EvalItem]:
    """The items of a JSONL file, in order (the first `limit` when given)."""
    hint = "Give a .jsonl file of questions, or none for the bundled basic set."
    if not str(path).strip() or str(path).strip() == ".":  # an empty box: Path("") is the current folder
        raise QuestionsError("question file", "give the path of a .jsonl question file", hint=hint)
    path = Path(path)
    where = str(path)
    try:
        if path.is_dir():
            raise QuestionsError(where, "is a folder: give the path of a .jsonl question file", hint=hint)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise QuestionsError(where, f"is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB",
                                 hint="Split the question set.")
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a BOM, as some editors save UTF-8
    except FileNotFoundError:
        raise QuestionsError(where, "not found", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise QuestionsError(where, f"is not UTF-8 (byte {exc.start})", hint="Save the file as UTF-8.") from None
    except OSError as exc:
        raise QuestionsError(where, f"cannot be read ({exc.strerror or exc})") from None
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = parse_line(line, where=where, line=number, index=len(items))
        if item.id in seen:
            raise QuestionsError(where, f"id {item.id!r} is used twice (first on line {seen[item.id]})",
                                 line=number, field="id", hint="Give every question its own id.")
        seen[item.id] = number
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise QuestionsError(where, "holds no question", hint='Write one JSON object per line: {"question": "..."}.')
    return items


def parse_line(text: str, *, where: str, line: int, index: int) -> EvalItem:
    """One line as an item; a QuestionsError says which field is wrong and how to write it."""
    def fail(message: str, field: str | None = None, hint: str | None = None) -> QuestionsError:
        return QuestionsError(where, message, line=line, field=field, hint=hint)

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise fail(f"not valid JSON ({exc})", hint='Each line must be one JSON object: {"question": "..."}.') from None
    if not isinstance(data, dict):
        raise fail(f"a line must be a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}", field=unknown[0], hint=f"Allowed keys: {', '.join(sorted(_KEYS))}.")
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("needs a non-empty 'question' text", field="question")
    refs = [k for k in ("answer", "number", "regex") if data.get(k) is not None]
    if len(refs) > 1:
        raise fail(f"give one reference, not {' and '.join(refs)}", field=refs[1])
    item_id = data.get("id", line)
    if not isinstance(item_id, str | int) or isinstance(item_id, bool) or not str(item_id).strip():
        raise fail("'id' must be a non-empty text or an integer", field="id")
    answer = data.get("answer")
    if answer is not None:
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise fail("'answer' must be a non-empty text or a list of them", field="answer")
        answer = tuple(answers)
    number = _number(data.get("number"), "number", fail)
    tolerance = _number(data.get("tolerance", 0), "tolerance", fail)
    if tolerance is None or tolerance < 0:
        raise fail("'tolerance' must be a number >= 0", field="tolerance")
    if "tolerance" in data and number is None:
        raise fail("'tolerance' needs 'number'", field="tolerance")
    pattern = data.get("regex")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise fail("'regex' must be a non-empty text", field="regex")
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise fail(f"'regex' is not a valid pattern: {exc}", field="regex") from None
    return EvalItem(index, str(item_id), question, answer, number, tolerance, pattern, line)


def _number(value: Any, field: str, fail: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise fail(f"'{field}' must be a number, not a boolean", field=field)
    try:
        number = float(value.replace(",", "")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise fail(f"'{field}' must be a number, got {value!r}", field=field) from None
    if not math.isfinite(number):
        raise fail(f"'{field}' must be finite", field=field)
    return number
