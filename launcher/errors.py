"""The one error hierarchy of chorus. Errors carry data (file, line, need vs. have), not just text.

It lives in the launcher, the lowest layer, so every layer above can raise and catch the same types.
"""

from __future__ import annotations


class ChorusError(Exception):
    """Base of every error chorus raises on purpose; the CLI prints these without a traceback."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe record, for storing the error on a step or printing it with --json."""
        data = {k: v for k, v in vars(self).items() if _json_safe(v)}
        data["type"] = type(self).__name__
        return data


def _json_safe(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | tuple | dict)


class GGUFError(ChorusError):
    """A file is not a readable GGUF model (wrong magic, truncated, unsupported version...)."""

    def __init__(self, path: str, message: str, *, offset: int | None = None) -> None:
        super().__init__(f"{path}: {message}", hint="Check that the file is a complete .gguf model.")
        self.path = path
        self.offset = offset
