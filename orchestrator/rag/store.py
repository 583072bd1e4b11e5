"""Document collections in SQLite beside the history: `<sessions_dir>/docs.db` (owner-only, 0600).

Tables: collections (chunk sizes and embedding model fixed at creation, a version bumped on every change),
files (per collection: absolute path, SHA-256 of the content, kind, chunk count), chunks (text, heading or
page, byte range) with an FTS5 mirror kept by triggers (BM25; `rank` is bm25 with the heading at half the
text's weight), and vectors (float32, unit length) when the
collection has an embedding model.

Re-adding is incremental by content hash: an unchanged file is not read again, a changed one is re-chunked,
and a file that was indexed under one of the given paths and is gone now is dropped; a given path that is
not there at all is no such path (a folder moved away does not empty its collection). Paths are normalised
('..' and symlinked folders above them resolved), so one file given twice is indexed once. Each file is one
transaction, so an interrupted add keeps what it finished; a new collection that got no file because the add
failed (its embedding model did) is removed again. Files are read by files.py: regular files only,
inside the folder they were found in, up to a size cap; anything else is skipped with its reason.

Several processes and threads use one docs.db at once (concurrent evals whose retrieve stages search it,
`docs add` and `docs search` meanwhile): WAL mode, a connection per operation in its own thread, writes that
take the lock first (BEGIN IMMEDIATE) and re-read what they replace, busy moments tried again, and the schema
made once per file (PRAGMA user_version) so a reader runs no DDL and writes nothing.

Dense search uses sqlite-vec's `vec_distance_cosine` when this Python's sqlite3 can load extensions; many
builds cannot (`enable_load_extension` missing), and then the stored vectors are scanned with numpy (a
brute-force cosine, as sqlite-vec's own scan is: milliseconds at 10k chunks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from launcher.errors import ChorusError
from orchestrator.rag.chunking import UnreadableFile, chunk_document, kind_of, read_document
from orchestrator.rag.files import DEFAULT_MAX_BYTES, is_inside, read_regular_file

if TYPE_CHECKING:  # numpy is imported where vectors are used: a run without retrieval never loads it
    import numpy as np

DB_NAME = "docs.db"
OWNER_ONLY = 0o600
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # config's NAME_PATTERN

SCHEMA_VERSION = 1  # PRAGMA user_version once the schema is made: later connections run no DDL
BUSY_TIMEOUT_S = 30.0  # how long a statement waits for another connection's lock (sqlite3's busy handler)
RETRIES = 6            # then a whole read or transaction is tried again, this many times in all
_BUSY_CODES = (5, 6)   # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes, by the low byte)

# One statement each: made once per file, in one BEGIN IMMEDIATE transaction (_make_schema), never by a reader.
_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, created_at REAL, updated_at REAL, "
    "chunk_chars INTEGER, overlap_chars INTEGER, embed_model TEXT, dims INTEGER, roots TEXT, version INTEGER)",
    "CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, collection TEXT, path TEXT, sha256 TEXT, "
    "size INTEGER, kind TEXT, chunks INTEGER, indexed_at REAL, UNIQUE (collection, path))",
    "CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, collection TEXT, file_id INTEGER, seq INTEGER, "
    "text TEXT, heading TEXT, page INTEGER, byte_start INTEGER, byte_end INTEGER)",
    "CREATE INDEX IF NOT EXISTS chunks_file ON chunks (file_id)",
    "CREATE INDEX IF NOT EXISTS chunks_collection ON chunks (collection)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, heading, content='chunks', "
    "content_rowid='id', tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN "
    "INSERT INTO chunks_fts (rowid, text, heading) VALUES (new.id, new.text, new.heading); END",
    "CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN "
    "INSERT INTO chunks_fts (chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading); END",
    "CREATE TABLE IF NOT EXISTS vectors (chunk_id INTEGER PRIMARY KEY, collection TEXT, vec BLOB)",
    "CREATE INDEX IF NOT EXISTS vectors_collection ON vectors (collection)",
)
# FTS5's ranking, kept in its config table: set once when the table is made. Written again on every connection
# (as it was), it changed the FTS5 config under concurrent searches: "SQL logic error", "vtable constructor failed".
_FTS_RANK = "INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('rank', 'bm25(1.0, 0.5)')"

# Words too common to rank by; dropping them keeps a question's OR-query small (FTS5 scans each term's list).
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has", "have", "how", "i",
    "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "what", "when", "where", "which",
    "who", "why", "will", "with", "you", "your",
))
_WORD = re.compile(r"\w+", re.UNICODE)


class DocsError(ChorusError):
    """docs.db cannot be opened or written, or a request about collections cannot be done; carries the path."""

    def __init__(self, path: str | Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = str(path)
        self.detail = message


class CollectionNotFound(ChorusError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no document collection '{name}'",
                         hint="`chorus docs list` shows the collections; `chorus docs add NAME PATH...` makes one.")
        self.collection = name


class EmbeddingMismatch(ChorusError):
    """Vectors of one collection must come from one model: a query embedded by another would rank noise."""

    def __init__(self, name: str, have: str | None, want: str | None) -> None:
        super().__init__(f"collection '{name}' was indexed with embedding model {have or '(none: BM25 only)'}, "
                         f"not {want or '(none)'}",
                         hint=f"Re-add with the same model, or `chorus docs rm {name}` and add it again.")
        self.collection, self.have, self.want = name, have, want


class DocsPathNotFound(ChorusError):
    """Paths given to `docs add` that do not exist: refused before anything is indexed or removed."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        names = ", ".join(str(p) for p in paths)
        super().__init__(f"not found: {names}",
                         hint="Nothing was indexed or removed. A collection keeps the files of a path that is gone "
                              "until that path is added again or the collection removed (`chorus docs rm`).")
        self.paths = [str(p) for p in paths]


def missing_paths(paths: Sequence[str | Path]) -> list[str]:
    """The given paths that do not exist (a dangling symlink exists: `add` reports it as skipped)."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not (path.exists() or path.is_symlink()):
            out.append(str(raw))
    return out


class Embedder(Protocol):
    """Texts → vectors, by one named model (orchestrator/rag/embed.py)."""

    @property
    def model(self) -> str: ...  # read-only, so a frozen dataclass's field satisfies it

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    path: str


@dataclass
class AddReport:
    collection: str
    files: int = 0         # supported files found under the paths
    added: int = 0
    updated: int = 0       # content changed: re-chunked
    unchanged: int = 0
    removed: int = 0       # indexed before, gone now
    chunks: int = 0        # chunks written by this add
    embedded: int = 0      # of which got vectors
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why (unreadable, unsupported, not found)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise DocsError(DB_NAME, f"'{name}' is not a valid collection name",
                        hint="Use letters, digits, '.', '_' or '-' (up to 64, starting with a letter or digit).")
    return name


def fts_query(text: str) -> str | None:
    """A question as an FTS5 OR-query of its words, each quoted (so no FTS syntax gets through); None if empty."""
    words = [w.lower() for w in _WORD.findall(text)]
    keep = [w for w in words if w not in _STOPWORDS] or words
    unique = list(dict.fromkeys(keep))[:64]
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in unique) or None


def walk(root: Path) -> list[Path]:
    """Supported files under `root`, sorted; hidden files and folders (.git, .cache) are left out."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and kind_of(Path(f)))
    return out


def _normalised(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    import numpy as np

    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.isfinite(arr).all():
        raise ValueError("embeddings must be a non-empty list of equal-length finite vectors")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms == 0, 1, norms)


_VEC_CACHE: dict[tuple[str, str], tuple[int, np.ndarray, np.ndarray]] = {}
_VEC_LOCK = threading.Lock()


class DocStore:
    """Collections in one docs.db. Safe to use from several threads and processes at once: every operation
    opens its own connection in the calling thread (none is shared), the file is in WAL mode (readers never
    wait for a writer), writes take the write lock first (BEGIN IMMEDIATE, waiting up to BUSY_TIMEOUT_S), and
    a read or a transaction that still meets a busy or locked database is tried again (RETRIES). The schema
    is made once per file, in one transaction; a reader runs no DDL and writes nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._vec_ext: bool | None = None
        self._schema_seen = False  # the file has its schema: readers skip the check
        self._writer_ready = False  # this instance made sure of the schema and WAL mode

    @classmethod
    def beside(cls, sessions_dir: Path) -> DocStore:
        return cls(Path(sessions_dir) / DB_NAME)

    # ------------------------------------------------------------ connection

    def _open(self) -> sqlite3.Connection:
        """A connection to the existing file (mode=rw: it never creates one), in autocommit mode: every
        transaction is an explicit BEGIN IMMEDIATE (_transaction)."""
        conn = sqlite3.connect(self.path.absolute().as_uri() + "?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    def _has_schema(self, conn: sqlite3.Connection) -> bool:
        if not self._schema_seen:
            self._schema_seen = (conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION
                                 or conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()
                                 is not None)  # a docs.db made before user_version was set
        return self._schema_seen

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries: no DDL, no write, no file created. Before anything was indexed (no
        docs.db, or one whose schema another process is making now) it is an empty in-memory database, so
        the queries find nothing instead of failing."""
        conn = self._open() if self.path.exists() else None
        if conn is not None and not self._has_schema(conn):
            conn.close()
            conn = None
        if conn is None:
            conn = _empty_db()
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """A connection that may write; the first of this instance creates the file (owner-only), its WAL mode
        and its schema if another process has not."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, OWNER_ONLY))
            if self.path.stat().st_mode & 0o777 != OWNER_ONLY:
                self.path.chmod(OWNER_ONLY)
            conn = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise DocsError(self.path, f"cannot open ({getattr(exc, 'strerror', None) or exc})",
                            hint="Check sessions_dir in app.yaml and its permissions.") from None
        try:
            if not self._writer_ready:
                _retrying(lambda: self._make_schema(conn))
                self._writer_ready = self._schema_seen = True
            yield conn
        finally:
            conn.close()

    def _make_schema(self, conn: sqlite3.Connection) -> None:
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file; outside any transaction
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(str(self.path) + suffix).chmod(OWNER_ONLY)
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with _transaction(conn):  # the write lock first: two processes making it take turns
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone() is None
                for statement in _SCHEMA:
                    conn.execute(statement)
                if fresh:
                    conn.execute(_FTS_RANK)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        """`query` on a reader connection, tried again while the database is busy; DocsError if it fails."""
        with self._errors():
            return _retrying(lambda: _on(self._reader(), query))

    def _write(self, change: Callable[[sqlite3.Connection], _T]) -> _T:
        """`change` in one transaction of its own connection, tried again while the database is busy."""
        with self._errors(), self._writer() as conn:
            return _atomically(conn, change)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3's errors as DocsError, naming docs.db; chorus's own errors pass through."""
        try:
            yield
        except sqlite3.Error as exc:
            hint = ("Another process holds docs.db's write lock for longer than "
                    f"{BUSY_TIMEOUT_S:.0f} s: try again when it is done.") if _busy(exc) else None
            raise DocsError(self.path, f"database error: {exc}", hint=hint) from None

    @property
    def vector_backend(self) -> str:
        """'sqlite-vec' when the extension loads into this Python's sqlite3, else 'numpy'."""
        if self._vec_ext is None:
            probe = sqlite3.connect(":memory:")
            try:
                self._vec_ext = _load_vec(probe)
            finally:
                probe.close()
        return "sqlite-vec" if self._vec_ext else "numpy"

    # ------------------------------------------------------------ reading

    def collections(self) -> list[dict[str, Any]]:
        rows = self._read(lambda conn: conn.execute(
            "SELECT c.*, (SELECT COUNT(*) FROM files f WHERE f.collection = c.name) AS n_files, "
            "(SELECT COUNT(*) FROM chunks k WHERE k.collection = c.name) AS n_chunks "
            "FROM collections c ORDER BY c.name").fetchall())
        return [_collection_dict(r) for r in rows]

    def collection(self, name: str) -> dict[str, Any]:
        found = [c for c in self.collections() if c["name"] == name]
        if not found:
            raise CollectionNotFound(name)
        return found[0]

    def require(self, name: str) -> None:
        """CollectionNotFound unless `name` exists (cheap: no counts)."""
        if self._read(lambda conn: conn.execute("SELECT 1 FROM collections WHERE name = ?",
                                                (name,)).fetchone()) is None:
            raise CollectionNotFound(name)

    def find(self, name: str) -> dict[str, Any] | None:
        """The collection's row, or None; does not create docs.db (plan time must not write). A docs.db that
        cannot be read gives None too: the retrieve stage's search then fails with the reason."""
        try:
            row = self._read(lambda conn: conn.execute("SELECT embed_model, dims, version FROM collections "
                                                       "WHERE name = ?", (name,)).fetchone())
        except DocsError:
            return None
        return None if row is None else {"embed_model": row[0], "dims": row[1], "version": row[2]}

    def files(self, name: str) -> list[dict[str, Any]]:
        self.collection(name)
        rows = self._read(lambda conn: conn.execute("SELECT path, kind, size, sha256, chunks, indexed_at FROM files "
                                                    "WHERE collection = ? ORDER BY path", (name,)).fetchall())
        return [dict(r) for r in rows]

    def chunks(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(ids)
        if not ids:
            return {}
        rows = self._read(lambda conn: conn.execute(
            f"SELECT k.id, k.seq, k.text, k.heading, k.page, k.byte_start, k.byte_end, f.path, f.kind "
            f"FROM chunks k JOIN files f ON f.id = k.file_id WHERE k.id IN ({','.join('?' * len(ids))})",
            ids).fetchall())
        return {r["id"]: dict(r) for r in rows}

    def bm25(self, name: str, query: str, limit: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score: higher is better) of the best `limit` chunks of `name` for `query`."""
        match = fts_query(query)
        if match is None:
            return []
        rows = self._read(lambda conn: conn.execute(
            "SELECT k.id, chunks_fts.rank FROM chunks_fts JOIN chunks k ON k.id = chunks_fts.rowid "
            "WHERE chunks_fts MATCH ? AND k.collection = ? ORDER BY chunks_fts.rank LIMIT ?",
            (match, name, limit)).fetchall())
        return [(r[0], -r[1]) for r in rows]  # FTS5's bm25() is negative, lower better

    def dense(self, name: str, vector: Sequence[float], limit: int) -> list[tuple[int, float]]:
        import numpy as np

        """(chunk id, cosine similarity) of the nearest `limit` chunks of `name` to `vector`."""
        query = _normalised([vector])[0]
        if self.vector_backend == "sqlite-vec":
            def nearest(conn: sqlite3.Connection) -> list[sqlite3.Row]:
                _load_vec(conn)
                return conn.execute("SELECT chunk_id, vec_distance_cosine(vec, ?) AS d FROM vectors "
                                    "WHERE collection = ? ORDER BY d LIMIT ?",
                                    (query.tobytes(), name, limit)).fetchall()

            rows = self._read(nearest)
            return [(r[0], 1.0 - r[1]) for r in rows]
        ids, matrix = self._matrix(name)
        if matrix.shape[0] == 0:
            return []
        if matrix.shape[1] != query.shape[0]:
            raise DocsError(self.path, f"the query vector has {query.shape[0]} dimensions, collection '{name}' "
                                       f"{matrix.shape[1]}", hint="Embed the query with the collection's model.")
        sims = matrix @ query
        k = min(limit, sims.shape[0])
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return [(int(ids[i]), float(sims[i])) for i in top]

    def _matrix(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        """The collection's vectors as one matrix, cached per collection version (reloaded after a change)."""
        key = (str(self.path.absolute()), name)

        def load(conn: sqlite3.Connection) -> tuple[sqlite3.Row, list[sqlite3.Row] | None]:
            with _snapshot(conn):  # the version and the vectors of one moment, whatever a writer does meanwhile
                row = conn.execute("SELECT version, dims FROM collections WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise CollectionNotFound(name)
                with _VEC_LOCK:
                    cached = _VEC_CACHE.get(key)
                if cached is not None and cached[0] == row["version"]:
                    return row, None
                return row, conn.execute("SELECT chunk_id, vec FROM vectors WHERE collection = ? "
                                         "ORDER BY chunk_id", (name,)).fetchall()

        row, rows = self._read(load)
        if rows is None:
            with _VEC_LOCK:
                cached = _VEC_CACHE[key]
            return cached[1], cached[2]
        dims = row["dims"] or 0
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = (np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dims)
                  if rows else np.zeros((0, dims), dtype=np.float32))
        with _VEC_LOCK:
            _VEC_CACHE[key] = (row["version"], ids, matrix)
        return ids, matrix

    # ------------------------------------------------------------ writing

    def remove(self, name: str) -> int:
        """Drop a collection with its files, chunks and vectors; returns the number of files it had."""
        self.require(name)

        def drop(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is None:
                raise CollectionNotFound(name)  # removed by another process meanwhile
            return _drop(conn, name)

        return self._write(drop)

    def add(self, name: str, paths: Sequence[str | Path], *, chunk_chars: int = 1000, overlap_chars: int = 150,
            embedder: Embedder | None = None, progress: Callable[[Progress], None] | None = None,
            embed_batch: int = 16, max_file_bytes: int = DEFAULT_MAX_BYTES,
            within: Sequence[Path] | None = None) -> AddReport:
        """Index `paths` (files or folders) into collection `name`, incrementally by content hash.

        A new collection takes `chunk_chars`, `overlap_chars` and the embedder's model; an existing one keeps
        its own sizes, and an embedder of another model is refused (EmbeddingMismatch). A file found in a
        folder is read only if it resolves inside that folder; with `within` (the UI's allowed folders) every
        file must resolve inside one of those too. Files over `max_file_bytes` are skipped.
        """
        check_name(name)
        started = time.perf_counter()
        report = AddReport(name)
        fence = None if within is None else [Path(w).resolve() for w in within]
        roots, limits = self._found(paths, report, fence)
        found = list(limits)
        model = embedder.model if embedder is not None else None
        if not roots and self.find(name) is None:  # nothing given exists (or may be read): no empty collection
            report.seconds = time.perf_counter() - started
            return report
        with self._errors(), self._writer() as conn:
            def make(c: sqlite3.Connection) -> tuple[bool, sqlite3.Row]:
                made = c.execute("INSERT OR IGNORE INTO collections (name, created_at, updated_at, chunk_chars, "
                                 "overlap_chars, embed_model, dims, roots, version) "
                                 "VALUES (?, ?, ?, ?, ?, ?, NULL, '[]', 0)",
                                 (name, time.time(), time.time(), chunk_chars, overlap_chars, model)).rowcount == 1
                return made, c.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()

            created, coll = _atomically(conn, make)  # one row, if two adds make the collection at once
            if coll["embed_model"] != model:
                raise EmbeddingMismatch(name, coll["embed_model"], model)
            try:
                self._add_files(conn, name, found, limits, roots, (coll["chunk_chars"], coll["overlap_chars"]),
                                embedder, embed_batch, max_file_bytes, progress, report)
            except BaseException:
                if created:  # a new collection that got no file (its embedding model failed): not left behind
                    with contextlib.suppress(sqlite3.Error):
                        _atomically(conn, lambda c: _drop_if_empty(c, name))
                raise
        if progress is not None:
            progress(Progress(len(found), len(found), "done"))
        report.seconds = time.perf_counter() - started
        return report

    def _add_files(self, conn: sqlite3.Connection, name: str, found: list[Path], limits: dict[Path, list[Path] | None],
                   roots: list[Path], sizes: tuple[int, int], embedder: Embedder | None, embed_batch: int,
                   max_file_bytes: int, progress: Callable[[Progress], None] | None, report: AddReport) -> None:
        known: dict[str, str] = dict(_retrying(lambda: conn.execute(
            "SELECT path, sha256 FROM files WHERE collection = ?", (name,)).fetchall()))
        report.files = len(found)
        for i, path in enumerate(found):
            if progress is not None:
                progress(Progress(i, len(found), str(path)))
            self._add_file(conn, name, path, known.get(str(path)), sizes, embedder, embed_batch, report,
                           limits[path], max_file_bytes)
        readable = {str(f) for f in found} - set(report.skipped)  # a file skipped now keeps no old chunks
        # only under a root that exists now: a path not found is no root, so what was indexed from it stays.
        # A path indexed before paths were normalised ('..' in it, a symlinked folder above it) counts as under
        # the root it normalises into: gone, now that the file is indexed under its normal path.
        gone = [p for p in known if p not in readable and _under(_normal(Path(p)), roots)]

        def finish(c: sqlite3.Connection) -> int:
            removed = 0
            for p in gone:
                row = c.execute("SELECT id FROM files WHERE collection = ? AND path = ?", (name, p)).fetchone()
                if row is not None:
                    _delete_file(c, row["id"])
                    removed += 1
            row = c.execute("SELECT roots FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise DocsError(self.path, f"collection '{name}' was removed while files were added to it")
            old_roots = json.loads(row["roots"] or "[]")
            c.execute("UPDATE collections SET updated_at = ?, roots = ?, version = version + 1 WHERE name = ?",
                      (time.time(), json.dumps(list(dict.fromkeys([*old_roots, *map(str, roots)]))), name))
            return removed

        report.removed = _atomically(conn, finish)
        if report.added or report.updated or report.removed:  # one b-tree per term: queries read one segment
            _atomically(conn, lambda c: c.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('optimize')"))

    def _found(self, paths: Sequence[str | Path], report: AddReport,
               fence: list[Path] | None) -> tuple[list[Path], dict[Path, list[Path] | None]]:
        """The roots (normalised: '..' and symlinked folders above them resolved), and each file to read with
        the folders it must resolve inside (None: any); a file given twice is read once."""
        roots: list[Path] = []
        found: dict[Path, list[Path] | None] = {}
        for raw in paths:
            root = _normal(Path(raw))
            if fence is not None and not is_inside(_resolved(root), fence):
                report.skipped[str(root)] = "outside the folders the Documents page may index"
                continue  # not a root either: what was indexed under it stays
            if not (root.exists() or root.is_symlink()):
                report.skipped[str(root)] = "not found"
                continue  # not a root either: a folder moved away does not empty the collection
            if root not in roots:
                roots.append(root)
            if root.is_dir():
                real = _resolved(root)
                for path in walk(root):
                    found.setdefault(path, [real])
            elif not kind_of(root):
                report.skipped[str(root)] = f"unsupported type '{root.suffix}'"
            else:  # named on its own: a link is followed (within the fence); the reader refuses non-files
                found.setdefault(root, fence)
        return roots, found

    def _add_file(self, conn: sqlite3.Connection, name: str, path: Path, known: str | None,
                  sizes: tuple[int, int], embedder: Embedder | None, batch: int, report: AddReport,
                  inside: list[Path] | None, max_bytes: int) -> None:
        try:
            data = read_regular_file(path, inside=inside, max_bytes=max_bytes)
        except UnreadableFile as exc:
            report.skipped[str(path)] = exc.reason
            return
        sha = file_sha256(data)
        if known == sha:
            report.unchanged += 1
            return
        try:
            doc = read_document(path, data)
            chunks = chunk_document(doc, *sizes)
        except UnreadableFile as exc:
            report.skipped[str(path)] = exc.reason
            return
        vectors: np.ndarray | None = None
        if embedder is not None and chunks:
            texts = [c.text for c in chunks]
            raw: list[list[float]] = []
            for start in range(0, len(texts), batch):
                raw.extend(embedder.embed(texts[start:start + batch]))
            vectors = _normalised(raw)
        def write(db: sqlite3.Connection) -> str:
            """The file's rows, replacing what this path had: read again under the write lock, since another
            add of this collection may have written it since `known` was read (that was a UNIQUE error)."""
            row = db.execute("SELECT dims FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise DocsError(self.path, f"collection '{name}' was removed while files were added to it")
            if vectors is not None:
                if row["dims"] is not None and row["dims"] != vectors.shape[1]:
                    raise DocsError(self.path, f"{embedder.model if embedder else '?'} returned {vectors.shape[1]}-"
                                               f"dimensional vectors; collection '{name}' has {row['dims']}")
                db.execute("UPDATE collections SET dims = ? WHERE name = ?", (vectors.shape[1], name))
            old = db.execute("SELECT id, sha256 FROM files WHERE collection = ? AND path = ?",
                             (name, str(path))).fetchone()
            if old is not None and old["sha256"] == sha:
                return "unchanged"
            if old is not None:
                _delete_file(db, old["id"])
            cur = db.execute("INSERT INTO files (collection, path, sha256, size, kind, chunks, indexed_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (name, str(path), sha, len(data), doc.kind, len(chunks), time.time()))
            file_id = cur.lastrowid
            for j, c in enumerate(chunks):
                cid = db.execute("INSERT INTO chunks (collection, file_id, seq, text, heading, page, byte_start, "
                                 "byte_end) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (name, file_id, c.seq, c.text, c.heading, c.page, c.byte_start,
                                  c.byte_end)).lastrowid
                if vectors is not None:
                    db.execute("INSERT INTO vectors (chunk_id, collection, vec) VALUES (?, ?, ?)",
                               (cid, name, vectors[j].tobytes()))
            return "added" if old is None else "updated"

        outcome = _atomically(conn, write)
        if outcome == "unchanged":
            report.unchanged += 1
            return
        report.chunks += len(chunks)
        report.embedded += len(chunks) if vectors is not None else 0
        if outcome == "added":
            report.added += 1
        else:
            report.updated += 1


def _delete_file(conn: sqlite3.Connection, file_id: int) -> None:
    conn.execute("DELETE FROM vectors WHERE chunk_id IN (SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
    conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
    conn.execute("DELETE FROM files WHERE id = ?", (file_id,))


_T = TypeVar("_T")


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock; the same work may succeed again."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _BUSY_CODES
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _retrying(work: Callable[[], _T]) -> _T:
    """`work()`, again after a short pause while it fails busy or locked (each try already waited for the lock
    up to the busy timeout where SQLite could wait; in WAL mode a reader is refused at once only in rare
    moments, such as another connection recovering the WAL)."""
    for attempt in range(RETRIES):
        try:
            return work()
        except sqlite3.Error as exc:
            if attempt == RETRIES - 1 or not _busy(exc):
                raise
        time.sleep(min(0.05 * 2 ** attempt, 1.0))
    raise AssertionError("unreachable")


def _on(connection: contextlib.AbstractContextManager[sqlite3.Connection],
        query: Callable[[sqlite3.Connection], _T]) -> _T:
    with connection as conn:
        return query(conn)


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: every query inside sees the database as of its first one."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _drop(conn: sqlite3.Connection, name: str) -> int:
    """Delete a collection's rows (in the caller's transaction); the number of files it had."""
    n = conn.execute("SELECT COUNT(*) FROM files WHERE collection = ?", (name,)).fetchone()[0]
    conn.execute("DELETE FROM vectors WHERE collection = ?", (name,))
    conn.execute("DELETE FROM chunks WHERE collection = ?", (name,))
    conn.execute("DELETE FROM files WHERE collection = ?", (name,))
    conn.execute("DELETE FROM collections WHERE name = ?", (name,))
    return int(n)


def _drop_if_empty(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("SELECT 1 FROM files WHERE collection = ? LIMIT 1", (name,)).fetchone() is None:
        _drop(conn, name)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception): the write lock is taken first, so a transaction
    never reads, then finds another writer ahead of it (SQLITE_BUSY_SNAPSHOT, which no waiting fixes)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a COMMIT that failed too: a retry starts clean
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _atomically(conn: sqlite3.Connection, change: Callable[[sqlite3.Connection], _T]) -> _T:
    """`change` in one transaction, the whole transaction tried again while the database is busy."""
    return _retrying(lambda: _on(_transaction(conn), change))


def _empty_db() -> sqlite3.Connection:
    """An in-memory docs.db with the schema and nothing in it: what a reader sees before anything is indexed."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    for statement in _SCHEMA:
        conn.execute(statement)
    return conn


def _normal(path: Path) -> Path:
    """An absolute path without '.' or '..': the folder it is in resolved (symlinks too, as '..' needs), its
    own name kept, so a symlink named on its own is still that link (followed when it is read)."""
    path = path.expanduser().absolute()
    if path.name in ("", ".", ".."):
        return _resolved(path)
    return _resolved(path.parent) / path.name


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop: its own path, which no fence contains
        return Path(os.path.normpath(path))


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _collection_dict(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["roots"] = json.loads(data.get("roots") or "[]")
    return data


def _load_vec(conn: sqlite3.Connection) -> bool:
    """Load sqlite-vec into `conn`; False where this sqlite3 cannot load extensions or the package is absent."""
    try:
        import sqlite_vec

        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        return True
    except (ImportError, AttributeError, sqlite3.Error, OSError):
        return False
