"""Is the history index in step with the session folders? A stamp per folder says, cheaply.

The index is a cache of the JSON files. It went stale without anyone noticing: a deleted index.db came
back empty ("no sessions yet" with 9 sessions on disk), a session edited or damaged after it was indexed
still listed as sound, folders copied in or removed by hand were missing or still listed. So each index
row keeps the stamp of its folder when it was indexed, and reading compares stamps first.

A folder's stamp is its count of files, their total size and the newest mtime (ns), from one scandir and
an lstat per file (~10 per session): a file added, removed, rewritten or truncated changes it. Hidden
files (the recorder's `.lock`, `.*.tmp` of atomic writes) do not count.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.history.serialize import SESSION_FILE


def folder_stamp(folder: Path) -> str | None:
    """'files:bytes:newest mtime_ns' of a session folder; None when it holds no session.json (nothing to index)."""
    count = size = newest = 0
    has_meta = False
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # removed while we looked: the next read sees the change
                    continue
                count += 1
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
                has_meta = has_meta or entry.name == SESSION_FILE
    except OSError:
        return None
    return f"{count}:{size}:{newest}" if has_meta else None


def folder_stamps(sessions_dir: Path, folders: list[str]) -> dict[str, str]:
    """The stamp of each session folder that holds a session, by id."""
    out: dict[str, str] = {}
    for sid in folders:
        stamp = folder_stamp(sessions_dir / sid)
        if stamp is not None:
            out[sid] = stamp
    return out
