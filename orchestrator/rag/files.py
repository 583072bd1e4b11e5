"""Reading a document file without trusting the folder it lies in.

A folder given to `chorus docs add` or the Documents page may hold things that are not documents under a
document's name: a symlink to /dev/zero (read_bytes() filled 1.9 GB, then MemoryError), a FIFO (open()
blocked for ever), a symlink to a file outside the folder (indexed, then searchable), a file of gigabytes.
So only regular files are read: the path is resolved first and must stay inside the folders it may come
from, the resolved file is opened with O_NOFOLLOW | O_NONBLOCK (a FIFO or device opened by mistake cannot
block), checked again on the open descriptor (fstat), and read in bounded chunks up to the size cap. Every
refusal is an UnreadableFile whose reason `add` lists as skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from orchestrator.rag.chunking import UnreadableFile

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 50 * MiB  # app.yaml docs.max_file_mib
READ_CHUNK = MiB
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def what_it_is(mode: int) -> str:
    """A file type as a reader says it: 'a FIFO', 'a character device'…"""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def size_text(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def is_inside(path: Path, folders: Sequence[Path]) -> bool:
    """`path` is one of `folders` or below one (all already resolved)."""
    return any(path == folder or path.is_relative_to(folder) for folder in folders)


def resolve_inside(path: Path, folders: Sequence[Path] | None) -> Path:
    """`path` with every symlink and '..' resolved; it must exist and, when `folders` is given, lie inside one."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise UnreadableFile(path, "a symbolic link to nothing" if path.is_symlink() else "not found") from None
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise UnreadableFile(path, f"the path cannot be resolved ({exc})") from None
    if folders is not None and not is_inside(real, folders):
        where = " or ".join(str(f) for f in folders)
        raise UnreadableFile(path, f"it leads to {real}, outside {where}")
    return real


def read_regular_file(path: Path, *, inside: Sequence[Path] | None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of `path` if it is (or links, within `inside`, to) a regular file of at most `max_bytes`.

    Raises UnreadableFile with the reason otherwise; never blocks on a FIFO, never reads past the cap.
    """
    real = resolve_inside(path, inside)
    try:
        before = os.lstat(real)  # what it is, before opening: a device is not even opened
    except OSError as exc:
        raise UnreadableFile(path, exc.strerror or str(exc)) from None
    _check(path, before, max_bytes)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:  # ELOOP: swapped for a symlink since it was resolved
        raise UnreadableFile(path, exc.strerror or str(exc)) from None
    try:
        _check(path, os.fstat(fd), max_bytes)  # the file actually opened
        parts: list[bytes] = []
        total = 0
        while data := os.read(fd, min(READ_CHUNK, max_bytes + 1 - total)):
            parts.append(data)
            total += len(data)
            if total > max_bytes:
                raise UnreadableFile(path, f"it grew past the {size_text(max_bytes)} limit while it was read "
                                           "(docs.max_file_mib)")
        return b"".join(parts)
    except OSError as exc:
        raise UnreadableFile(path, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def _check(path: Path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile(path, f"{what_it_is(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise UnreadableFile(path, f"{size_text(st.st_size)}, over the {size_text(max_bytes)} limit "
                                   "(docs.max_file_mib in app.yaml)")
