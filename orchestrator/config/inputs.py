"""The question as chorus accepts it: valid Unicode, not empty, checked before any session exists.

Text reaches chorus from argv (Python decodes undecodable bytes to lone surrogates, 'surrogateescape'),
from stdin, and from the UI and the API (JSON may carry lone surrogate escapes such as "\\ud800"). A lone
surrogate cannot be encoded as UTF-8, so it used to fail the first history write and lose the run. Here
every undecodable byte or lone surrogate becomes U+FFFD (the replacement character) and the user is told.
"""

from __future__ import annotations

import logging
import re

from launcher.errors import ChorusError

log = logging.getLogger("chorus.inputs")

REPLACEMENT = "\ufffd"


class QuestionError(ChorusError):
    """The question cannot be run (empty, or not text)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.detail = message


def clean_question(text: str | bytes) -> str:
    """`text` as valid Unicode (undecodable bytes and lone surrogates become U+FFFD); refuses an empty one."""
    if isinstance(text, bytes):
        raw = text
    elif isinstance(text, str):
        raw = _to_bytes(text)
    else:
        raise QuestionError(f"the question must be text, not {type(text).__name__}")
    cleaned = raw.decode("utf-8", errors="replace")
    replaced = cleaned.count(REPLACEMENT) - (text.count(REPLACEMENT) if isinstance(text, str) else 0)
    if replaced > 0:
        log.warning("the question is not valid UTF-8: %d undecodable byte(s) are shown as %s "
                    "(check the terminal's encoding, e.g. LANG=C.UTF-8)", replaced, REPLACEMENT)
    if not cleaned.strip():
        raise QuestionError("the question is empty", hint="Type a question, e.g. chorus run \"Why is the sky blue?\"")
    return cleaned


_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _to_bytes(text: str) -> bytes:
    """The bytes `text` stands for: argv's escaped bytes (U+DC80..U+DCFF) come back as they were; any
    other lone surrogate becomes one invalid byte, so the decoder puts one U+FFFD in its place."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _OTHER_SURROGATES.sub("\udcff", text).encode("utf-8", errors="surrogateescape")
