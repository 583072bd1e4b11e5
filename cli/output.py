"""Terminal output shared by the command groups: tables and byte figures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from orchestrator.units import GiB, MiB


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f} MiB"


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell; `out` defaults to sys.stdout as it is at the call (a redirect works)."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, with a one-line message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
