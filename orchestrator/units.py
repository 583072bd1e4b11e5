"""Byte units for the front ends (defined once in launcher.units)."""

from launcher.units import GiB, MiB, fmt_bytes

__all__ = ["GiB", "MiB", "fmt_bytes"]
