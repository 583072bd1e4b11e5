"""Document collections in SQLite beside the history: `<sessions_dir>/docs.db` (owner-only, 0600).

Tables: collections (chunk sizes and embedding model fixed at creation, a version bumped on every change),
files (per collection: absolute path, SHA-256 of the content, kind, chunk count), chunks (text, heading or
page, byte range) with an FTS5 mirror kept by triggers (BM25; `rank` is bm25 with the heading at half the
text's weight), and vectors (float32, unit length) when the
collection has an embedding model.

Re-adding is incremental by content hash: an unchanged file is not read again, a changed one is re-chunked,
and a file that was indexed under one of the given paths and is gone now is dropped. Each file is one
transaction, so an interrupted add keeps what it finished. Files are read by files.py: regular files only,
inside the folder they were found in, up to a size cap; anything else is skipped with its reason.

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
from typing import TYPE_CHECKING, Any, Protocol

from launcher.errors import ChorusError
from orchestrator.rag.chunking import UnreadableFile, chunk_document, kind_of, read_document
from orchestrator.rag.files import DEFAULT_MAX_BYTES, is_inside, read_regular_file

if TYPE_CHECKING:  # numpy is imported where vectors are used: a run without retrieval never loads it
    import numpy as np

DB_NAME = "docs.db"
OWNER_ONLY = 0o600
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # config's NAME_PATTERN

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, created_at REAL, updated_at REAL,
    chunk_chars INTEGER, overlap_chars INTEGER, embed_model TEXT, dims INTEGER, roots TEXT, version INTEGER);
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, collection TEXT, path TEXT, sha256 TEXT, size INTEGER,
    kind TEXT, chunks INTEGER, indexed_at REAL, UNIQUE (collection, path));
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, collection TEXT, file_id INTEGER, seq INTEGER,
    text TEXT, heading TEXT, page INTEGER, byte_start INTEGER, byte_end INTEGER);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks (file_id);
CREATE INDEX IF NOT EXISTS chunks_collection ON chunks (collection);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, heading, content='chunks', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, heading) VALUES (new.id, new.text, new.heading); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading); END;
INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('rank', 'bm25(1.0, 0.5)');
CREATE TABLE IF NOT EXISTS vectors (chunk_id INTEGER PRIMARY KEY, collection TEXT, vec BLOB);
CREATE INDEX IF NOT EXISTS vectors_collection ON vectors (collection);
"""

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
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._vec_ext: bool | None = None
        self._ready = False  # schema made by this instance already: queries skip the script

    @classmethod
    def beside(cls, sessions_dir: Path) -> DocStore:
        return cls(Path(sessions_dir) / DB_NAME)

    # ------------------------------------------------------------ connection

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (autocommit off: one transaction per `with conn`); the file is created owner-only.

        The first connection of this instance creates the file, the schema and WAL mode (kept in the file);
        later ones only connect (a query's whole budget is milliseconds).
        """
        first = not (self._ready and self.path.exists())
        try:
            if first:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, OWNER_ONLY))
                if self.path.stat().st_mode & 0o777 != OWNER_ONLY:
                    self.path.chmod(OWNER_ONLY)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise DocsError(self.path, f"cannot open ({getattr(exc, 'strerror', None) or exc})",
                            hint="Check sessions_dir in app.yaml and its permissions.") from None
        conn.row_factory = sqlite3.Row
        try:
            if first:
                with contextlib.suppress(sqlite3.OperationalError):
                    conn.execute("PRAGMA journal_mode=WAL")
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        Path(str(self.path) + suffix).chmod(OWNER_ONLY)
                conn.executescript(_SCHEMA)
                self._ready = True
            yield conn
        except sqlite3.Error as exc:
            raise DocsError(self.path, f"database error: {exc}") from None
        finally:
            conn.close()

    @property
    def vector_backend(self) -> str:
        """'sqlite-vec' when the extension loads into this Python's sqlite3, else 'numpy'."""
        if self._vec_ext is None:
            self._vec_ext = _load_vec(sqlite3.connect(":memory:"))
        return "sqlite-vec" if self._vec_ext else "numpy"

    # ------------------------------------------------------------ reading

    def collections(self) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM files f WHERE f.collection = c.name) AS n_files, "
                "(SELECT COUNT(*) FROM chunks k WHERE k.collection = c.name) AS n_chunks "
                "FROM collections c ORDER BY c.name").fetchall()
        return [_collection_dict(r) for r in rows]

    def collection(self, name: str) -> dict[str, Any]:
        found = [c for c in self.collections() if c["name"] == name]
        if not found:
            raise CollectionNotFound(name)
        return found[0]

    def require(self, name: str) -> None:
        """CollectionNotFound unless `name` exists (cheap: no counts)."""
        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is None:
                raise CollectionNotFound(name)

    def find(self, name: str) -> dict[str, Any] | None:
        """The collection's row, or None; does not create docs.db (plan time must not write)."""
        if not self.path.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("SELECT embed_model, dims, version FROM collections WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error:
            return None
        finally:
            conn.close()
        return None if row is None else {"embed_model": row[0], "dims": row[1], "version": row[2]}

    def files(self, name: str) -> list[dict[str, Any]]:
        self.collection(name)
        with self._connect() as conn:
            rows = conn.execute("SELECT path, kind, size, sha256, chunks, indexed_at FROM files "
                                "WHERE collection = ? ORDER BY path", (name,)).fetchall()
        return [dict(r) for r in rows]

    def chunks(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(ids)
        if not ids:
            return {}
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT k.id, k.seq, k.text, k.heading, k.page, k.byte_start, k.byte_end, f.path, f.kind "
                f"FROM chunks k JOIN files f ON f.id = k.file_id WHERE k.id IN ({','.join('?' * len(ids))})",
                ids).fetchall()
        return {r["id"]: dict(r) for r in rows}

    def bm25(self, name: str, query: str, limit: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score: higher is better) of the best `limit` chunks of `name` for `query`."""
        match = fts_query(query)
        if match is None:
            return []
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT k.id, chunks_fts.rank FROM chunks_fts JOIN chunks k ON k.id = chunks_fts.rowid "
                "WHERE chunks_fts MATCH ? AND k.collection = ? ORDER BY chunks_fts.rank LIMIT ?",
                (match, name, limit)).fetchall()
        return [(r[0], -r[1]) for r in rows]  # FTS5's bm25() is negative, lower better

    def dense(self, name: str, vector: Sequence[float], limit: int) -> list[tuple[int, float]]:
        import numpy as np

        """(chunk id, cosine similarity) of the nearest `limit` chunks of `name` to `vector`."""
        query = _normalised([vector])[0]
        if self.vector_backend == "sqlite-vec":
            with self._connect() as conn:
                _load_vec(conn)
                rows = conn.execute("SELECT chunk_id, vec_distance_cosine(vec, ?) AS d FROM vectors "
                                    "WHERE collection = ? ORDER BY d LIMIT ?",
                                    (query.tobytes(), name, limit)).fetchall()
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
        with self._connect() as conn:
            row = conn.execute("SELECT version, dims FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise CollectionNotFound(name)
            key = (str(self.path.absolute()), name)
            with _VEC_LOCK:
                cached = _VEC_CACHE.get(key)
            if cached is not None and cached[0] == row["version"]:
                return cached[1], cached[2]
            rows = conn.execute("SELECT chunk_id, vec FROM vectors WHERE collection = ? ORDER BY chunk_id",
                                (name,)).fetchall()
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
        self.collection(name)
        with self._connect() as conn, conn:
            n = conn.execute("SELECT COUNT(*) FROM files WHERE collection = ?", (name,)).fetchone()[0]
            conn.execute("DELETE FROM vectors WHERE collection = ?", (name,))
            conn.execute("DELETE FROM chunks WHERE collection = ?", (name,))
            conn.execute("DELETE FROM files WHERE collection = ?", (name,))
            conn.execute("DELETE FROM collections WHERE name = ?", (name,))
        return int(n)

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
        with self._connect() as conn:
            coll = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
            if coll is not None and coll["embed_model"] != model:
                raise EmbeddingMismatch(name, coll["embed_model"], model)
            if coll is None:
                with conn:
                    conn.execute("INSERT INTO collections (name, created_at, updated_at, chunk_chars, overlap_chars, "
                                 "embed_model, dims, roots, version) VALUES (?, ?, ?, ?, ?, ?, NULL, '[]', 0)",
                                 (name, time.time(), time.time(), chunk_chars, overlap_chars, model))
                coll = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
            sizes = (coll["chunk_chars"], coll["overlap_chars"])
            known = {r["path"]: (r["id"], r["sha256"]) for r in
                     conn.execute("SELECT id, path, sha256 FROM files WHERE collection = ?", (name,))}
            report.files = len(found)
            for i, path in enumerate(found):
                if progress is not None:
                    progress(Progress(i, len(found), str(path)))
                self._add_file(conn, name, path, known.get(str(path)), sizes, embedder, embed_batch, report,
                               limits[path], max_file_bytes)
            readable = {str(f) for f in found} - set(report.skipped)  # a file skipped now keeps no old chunks
            gone = [p for p in known if p not in readable and _under(Path(p), roots)]
            with conn:
                for p in gone:
                    _delete_file(conn, known[p][0])
                report.removed = len(gone)
                old_roots = json.loads(coll["roots"] or "[]")
                conn.execute("UPDATE collections SET updated_at = ?, roots = ?, version = version + 1 WHERE name = ?",
                             (time.time(), json.dumps(list(dict.fromkeys([*old_roots, *map(str, roots)]))), name))
            if report.added or report.updated or report.removed:  # one b-tree per term: queries read one segment
                with conn:
                    conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('optimize')")
        if progress is not None:
            progress(Progress(len(found), len(found), "done"))
        report.seconds = time.perf_counter() - started
        return report

    def _found(self, paths: Sequence[str | Path], report: AddReport,
               fence: list[Path] | None) -> tuple[list[Path], dict[Path, list[Path] | None]]:
        """The roots as given, and each file to read with the folders it must resolve inside (None: any)."""
        roots: list[Path] = []
        found: dict[Path, list[Path] | None] = {}
        for raw in paths:
            root = Path(raw).expanduser().absolute()
            if fence is not None and not is_inside(_resolved(root), fence):
                report.skipped[str(root)] = "outside the folders the Documents page may index"
                continue  # not a root either: what was indexed under it stays
            roots.append(root)
            if root.is_dir():
                real = root.resolve()
                for path in walk(root):
                    found.setdefault(path, [real])
            elif not (root.exists() or root.is_symlink()):
                report.skipped[str(root)] = "not found"
            elif not kind_of(root):
                report.skipped[str(root)] = f"unsupported type '{root.suffix}'"
            else:  # named on its own: a link is followed (within the fence); the reader refuses non-files
                found.setdefault(root, fence)
        return roots, found

    def _add_file(self, conn: sqlite3.Connection, name: str, path: Path, known: tuple[int, str] | None,
                  sizes: tuple[int, int], embedder: Embedder | None, batch: int, report: AddReport,
                  inside: list[Path] | None, max_bytes: int) -> None:
        try:
            data = read_regular_file(path, inside=inside, max_bytes=max_bytes)
        except UnreadableFile as exc:
            report.skipped[str(path)] = exc.reason
            return
        sha = file_sha256(data)
        if known is not None and known[1] == sha:
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
        with conn:
            if vectors is not None:
                dims = conn.execute("SELECT dims FROM collections WHERE name = ?", (name,)).fetchone()[0]
                if dims is not None and dims != vectors.shape[1]:
                    raise DocsError(self.path, f"{embedder.model if embedder else '?'} returned {vectors.shape[1]}-"
                                               f"dimensional vectors; collection '{name}' has {dims}")
                conn.execute("UPDATE collections SET dims = ? WHERE name = ?", (vectors.shape[1], name))
            if known is not None:
                _delete_file(conn, known[0])
            cur = conn.execute("INSERT INTO files (collection, path, sha256, size, kind, chunks, indexed_at) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (name, str(path), sha, len(data), doc.kind, len(chunks), time.time()))
            file_id = cur.lastrowid
            for j, c in enumerate(chunks):
                cid = conn.execute("INSERT INTO chunks (collection, file_id, seq, text, heading, page, byte_start, "
                                   "byte_end) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (name, file_id, c.seq, c.text, c.heading, c.page, c.byte_start,
                                    c.byte_end)).lastrowid
                if vectors is not None:
                    conn.execute("INSERT INTO vectors (chunk_id, collection, vec) VALUES (?, ?, ?)",
                                 (cid, name, vectors[j].tobytes()))
        report.chunks += len(chunks)
        report.embedded += len(chunks) if vectors is not None else 0
        if known is None:
            report.added += 1
        else:
            report.updated += 1


def _delete_file(conn: sqlite3.Connection, file_id: int) -> None:
    conn.execute("DELETE FROM vectors WHERE chunk_id IN (SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
    conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
    conn.execute("DELETE FROM files WHERE id = ?", (file_id,))


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop: its own path, which no fence contains
        return path


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
