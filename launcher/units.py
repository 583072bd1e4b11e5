"""Byte units and their one human format, shared by every layer."""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30


def fmt_bytes(n: int | float | None) -> str:
    """'1.25 GiB' from 1 GiB up, else '327 MiB'; '-' for unknown."""
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"
