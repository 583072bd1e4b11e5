"""Where the UI's Documents page may take documents from: the operator's allowed folders, and uploads.

A visitor of the UI is not the operator (docs/security.md). When the page took any server path, a visitor
could index a folder holding `PASSWORD=...` and read it back through search. Now the page offers only the
folders listed in app.yaml `docs.allowed_roots` (and paths inside them: symlinks and '..' are resolved
before the check), and files uploaded through the browser, saved under `<sessions_dir>/uploads/<collection>/`
(folders 0700, files 0600). With no allowed folder configured, uploads are the only source. The CLI
(`chorus docs add`) is the operator's own and may index any path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import ChorusError
from orchestrator.rag.chunking import KINDS, kind_of
from orchestrator.rag.files import is_inside, size_text
from orchestrator.rag.store import AddReport, DocStore, Embedder, Progress, check_name

UPLOADS = "uploads"
_MAX_NAME_BYTES = 200


class PathNotAllowed(ChorusError):
    """A path the Documents page may not index; carries the path and the folders it may."""

    def __init__(self, path: str | Path, allowed: Sequence[Path], reason: str = "") -> None:
        where = ", ".join(str(a) for a in allowed)
        hint = (f"The page may index only inside: {where} (app.yaml docs.allowed_roots), or files uploaded on it."
                if allowed else "No folder is allowed (app.yaml docs.allowed_roots is empty): upload the files "
                                "on the page, or index the folder with `chorus docs add` on the command line.")
        super().__init__(f"{path}: {reason or 'not inside a folder the Documents page may index'}", hint=hint)
        self.path = str(path)
        self.allowed = [str(a) for a in allowed]


class UploadRefused(ChorusError):
    """An uploaded file that is not saved: its name, and why (type, size, a name that is not a plain name)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"upload '{name[:80]}': {reason}", hint="The other uploaded files are indexed.")
        self.name = name
        self.reason = reason


def _real(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a loop, a NUL byte: matches no allowed folder
        return Path(path)


def allowed_path(root: str | Path, relative: str, allowed: Sequence[Path]) -> Path:
    """`relative` (may be empty) inside `root`, which must be one of the `allowed` folders: the resolved path.

    After resolving symlinks and '..' the result must still lie inside `root`, and exist. Raises
    PathNotAllowed naming the path and the allowed folders.
    """
    reals = [_real(a) for a in allowed]
    base = _real(Path(root))
    if base not in reals:
        raise PathNotAllowed(root, allowed, "not one of the folders the Documents page may index")
    rel = relative.strip()
    if "\x00" in rel:
        raise PathNotAllowed(rel.replace("\x00", "\\0"), allowed, "a path cannot contain a NUL character")
    target = _real(base / rel) if rel else base
    if not is_inside(target, [base]):
        raise PathNotAllowed(base / rel, allowed, f"it leads to {target}, outside {base}")
    if not target.exists():
        raise PathNotAllowed(base / rel, allowed, "not found")
    return target


def uploads_root(sessions_dir: Path) -> Path:
    """Every collection's uploads: chorus's own folder beside docs.db."""
    return Path(sessions_dir) / UPLOADS


def uploads_dir(sessions_dir: Path, collection: str) -> Path:
    return uploads_root(sessions_dir) / check_name(collection)


def upload_name(name: str) -> str:
    """An uploaded file's name as saved: its last component, a supported type, not hidden, not too long."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base or base.startswith(".") or "\x00" in base or len(base.encode("utf-8", "replace")) > _MAX_NAME_BYTES:
        raise UploadRefused(name, "not a plain file name (empty, hidden, over 200 bytes or with a NUL)")
    if kind_of(Path(base)) is None:
        raise UploadRefused(name, f"unsupported type (supported: {', '.join(sorted(KINDS))})")
    return base


def save_upload(sessions_dir: Path, collection: str, name: str, data: bytes, max_bytes: int) -> Path:
    """Write an uploaded file into the collection's uploads folder (0600, never through a symlink)."""
    filename = upload_name(name)
    if len(data) > max_bytes:
        raise UploadRefused(name, f"{size_text(len(data))}, over the {size_text(max_bytes)} limit "
                                  "(docs.max_file_mib in app.yaml)")
    folder = uploads_dir(sessions_dir, collection)
    path, tmp = folder / filename, folder / f".{filename}.part"
    try:
        Path(sessions_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (folder.parent, folder):
            d.mkdir(mode=0o700, exist_ok=True)
            if d.is_symlink() or not d.is_dir():
                raise UploadRefused(name, f"{d} is not a folder chorus made")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UploadRefused(name, f"cannot be saved to {path} ({exc.strerror or exc})") from None
    return path


def remove_uploads(sessions_dir: Path, collection: str) -> None:
    """Delete a removed collection's uploaded copies (the operator's own folders are never touched)."""
    folder = uploads_dir(sessions_dir, collection)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


class NothingToIndex(ChorusError):
    def __init__(self) -> None:
        super().__init__("nothing to index", hint="Upload files, or choose one of the allowed folders.")


@dataclass
class PageAdd:
    """What one Index click did: a report per source indexed, and the uploads not saved (name -> why)."""

    reports: list[AddReport] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def add_from_page(store: DocStore, name: str, *, sessions_dir: Path, allowed: Sequence[Path], max_file_bytes: int,
                  uploads: Sequence[tuple[str, bytes]] = (), root: str | Path | None = None, relative: str = "",
                  chunk_chars: int = 1000, overlap_chars: int = 150, embedder: Embedder | None = None,
                  progress: Callable[[Progress], None] | None = None) -> PageAdd:
    """Index what the Documents page was given: uploaded files (saved first, then their folder is indexed)
    and an allowed folder or a path inside one. The folder is checked before anything is written."""
    check_name(name)
    if not uploads and root is None:
        raise NothingToIndex()
    target = allowed_path(root, relative, allowed) if root is not None else None
    out = PageAdd()
    saved = 0
    for filename, data in uploads:
        try:
            save_upload(sessions_dir, name, filename, data, max_file_bytes)
            saved += 1
        except UploadRefused as exc:
            out.refused[filename] = exc.reason

    def index(path: Path, within: Sequence[Path]) -> None:
        out.reports.append(store.add(name, [path], chunk_chars=chunk_chars, overlap_chars=overlap_chars,
                                     embedder=embedder, progress=progress, max_file_bytes=max_file_bytes,
                                     within=within))

    if saved:
        folder = uploads_dir(sessions_dir, name)
        index(folder, [folder])
    if target is not None:
        index(target, allowed)
    return out
