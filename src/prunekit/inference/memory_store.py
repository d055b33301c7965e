"""Persistent storage behind `prunekit.inference.memory`: the `Store` interface and its SQLite implementation.

The memory logic (summaries, salience, forgetting, prompts) talks only to `Store`; a store keeps turns,
chunk embeddings, summaries and the forgetting log, and answers top-k cosine queries. Writes happen inside
``with store.transaction():`` so one turn (its text, chunks, summary and any forgetting it triggers) is
committed whole or not at all. A server-backed store (PostgreSQL with pgvector: ``embedding vector(d)``,
``ORDER BY embedding <#> $1 LIMIT k``, one SQL transaction per ``transaction()``) implements the same methods.

`SQLiteStore` (the default) is one file:

- WAL journal, ``synchronous=FULL`` by default: a process killed mid-write loses only the transaction it was
  in; every committed turn survives, and so does an OS crash (``synchronous="normal"`` keeps the first
  guarantee, not the second, and commits faster).
- Embeddings are little-endian float32 blobs (``dim * 4`` bytes), never pickles; a blob of the wrong size is
  reported as a damaged store.
- Search is an exact scan: the unit embeddings are held in memory as one float32 matrix, kept in step with this
  connection's own commits and reloaded when another connection has committed (``PRAGMA data_version``).
  Its cost is linear in the number of stored chunks, which is what forgetting reduces.
- One writer at a time (SQLite's rule); readers in other processes see every committed turn.
- ``readonly=True`` opens an existing store without writing to it. Where the file and its folder are writable
  and no ``-wal`` file holds commits, the connection is SQLite's usual one with ``PRAGMA query_only``: as the
  last connection it removes the ``-wal``/``-shm`` files it made when it closes (``mode=ro`` leaves them
  beside the store). If a writer committed meanwhile, a ``mode=ro`` connection is held across that close, so
  the last-closer's copy of the ``-wal`` into the main file is not made by a reader (the commits stay in the
  ``-wal`` for the next writer). Otherwise it is ``mode=ro``, so a store on a read-only folder or file system
  can still be read: where SQLite cannot make the WAL's shared-memory file there, the store is opened as
  immutable, which is refused while a non-empty ``-wal`` file is present (it may hold commits the main file
  does not have yet). A store opened through a symbolic link is judged by the files beside its target.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunekit.errors import InputError

QUERY_ONLY = "query_only"  # _connect's read-only connection that cleans up after itself
BUSY_SECONDS = 30.0  # how long a connection waits for another process's write to finish (SQLite's busy timeout)

__all__ = ["TurnRecord", "ChunkRecord", "SummaryRecord", "ForgetRecord", "Store", "SQLiteStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TurnRecord:
    turn: int  # 0-based position in the conversation
    role: str
    text: str
    summary: str  # the running one-sentence summary S_t after this turn


@dataclass(frozen=True)
class ChunkRecord:
    id: int
    turn: int
    role: str
    text: str
    last_retrieved: int | None  # the turn at which it was last retrieved, None if never


@dataclass(frozen=True)
class SummaryRecord:
    level: int  # 1: a block of turns; 2: the summary of all block summaries
    turn: int  # the last turn it covers
    text: str


@dataclass(frozen=True)
class ForgetRecord:
    chunk_id: int
    turn: int
    text: str
    salience: float
    at_turn: int  # the turn whose forgetting pass removed it


class Store(ABC):
    """What the memory needs from storage. Methods that write must be called inside `transaction()`."""

    @abstractmethod
    def transaction(self):
        """A context manager: everything written inside commits together, or not at all on an exception."""

    @abstractmethod
    def check_embedder(self, name: str, dim: int) -> None:
        """Record the embedder of a new store; refuse (InputError) one that differs from the recorded one."""

    @abstractmethod
    def setting(self, key: str) -> str | None:
        """A value recorded with `set_setting` (e.g. the CLI's forgetting options), or None."""

    @abstractmethod
    def set_setting(self, key: str, value: str) -> None:
        """Record a small named value with the store (replacing any earlier one)."""

    @abstractmethod
    def count_turns(self) -> int: ...

    @abstractmethod
    def recent_turns(self, n: int) -> list[TurnRecord]:
        """The last `n` turns, oldest first."""

    @abstractmethod
    def turns_between(self, first: int, last: int) -> list[TurnRecord]:
        """Turns ``first..last`` inclusive, oldest first."""

    @abstractmethod
    def add_turn(self, record: TurnRecord) -> None: ...

    @abstractmethod
    def add_chunks(self, turn: int, role: str, texts: list[str], embeddings: np.ndarray) -> list[int]:
        """Store chunks of `turn` with their unit embeddings ``[n, dim]``; returns their ids."""

    @abstractmethod
    def count_chunks(self) -> int: ...

    @abstractmethod
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` chunks of highest cosine with the unit vector `query` ``[dim]``: ``(id, cosine)``, best first."""

    @abstractmethod
    def chunks(self, ids: list[int]) -> list[ChunkRecord]:
        """The chunks with these ids, in the order given (ids no longer stored are left out)."""

    @abstractmethod
    def chunk_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every stored chunk's ``(id, turn, last_retrieved)`` as int64 arrays ``[n]``; -1 = never retrieved."""

    @abstractmethod
    def mark_retrieved(self, ids: list[int], turn: int) -> None: ...

    @abstractmethod
    def forget(self, records: list[ForgetRecord]) -> None:
        """Delete these chunks from the index and log them (id, turn, text, salience, at_turn)."""

    @abstractmethod
    def forgotten(self) -> list[ForgetRecord]: ...

    @abstractmethod
    def add_summary(self, record: SummaryRecord) -> None: ...

    @abstractmethod
    def summaries(self, level: int) -> list[SummaryRecord]:
        """Summaries of one level, oldest first."""

    @abstractmethod
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS turns (
    turn INTEGER PRIMARY KEY, role TEXT NOT NULL, text TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, turn INTEGER NOT NULL REFERENCES turns(turn), role TEXT NOT NULL,
    text TEXT NOT NULL, embedding BLOB NOT NULL, last_retrieved INTEGER);
CREATE INDEX IF NOT EXISTS chunks_turn ON chunks(turn);
CREATE TABLE IF NOT EXISTS summaries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, level INTEGER NOT NULL, turn INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten (
    chunk_id INTEGER PRIMARY KEY, turn INTEGER NOT NULL, text TEXT NOT NULL, salience REAL NOT NULL,
    at_turn INTEGER NOT NULL);
"""
_TABLES = {"meta", "turns", "chunks", "summaries", "forgotten"}
_SYNC = {"full": "FULL", "normal": "NORMAL"}


def _uri(real: Path) -> str:
    return "file:" + urllib.parse.quote(str(real))


def _wal_holds_commits(real: Path) -> bool:
    """Whether the ``-wal`` file beside the store file `real` (a link's target) is there and not empty."""
    wal = real.with_name(real.name + "-wal")
    return wal.exists() and wal.stat().st_size > 0


def _close_connection(db: sqlite3.Connection, reader_of: Path | None) -> None:
    """Close `db`. For a query_only reader of the store at `reader_of` whose ``-wal`` holds a writer's commits, a
    ``mode=ro`` connection is held across the close: as the last connection this reader would copy them into the
    main file. (A writer that commits and closes in the instant between the check and the close, or a guard that
    cannot be opened (no file descriptors left), can still leave the reader last and the commits copied: SQLite's
    no-checkpoint-on-close option needs Python 3.12.)"""
    guard = None
    if reader_of is not None and _wal_holds_commits(reader_of):
        try:
            guard = sqlite3.connect(_uri(reader_of) + "?mode=ro", uri=True, isolation_level=None,
                                    check_same_thread=False, timeout=BUSY_SECONDS)
            guard.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            if guard is not None:
                guard.close()
            guard = None
    try:
        db.close()
    finally:
        if guard is not None:
            guard.close()


class SQLiteStore(Store):
    """A memory store in one SQLite file, created if missing unless ``create=False`` (then a file without a
    store is an InputError and is left untouched). ``synchronous``: ``"full"`` or ``"normal"``.

    >>> import tempfile, os, numpy as np
    >>> s = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
    >>> s.check_embedder("toy", 2)
    >>> with s.transaction():
    ...     s.add_turn(TurnRecord(0, "user", "hi", "hi"))
    ...     ids = s.add_chunks(0, "user", ["hi"], np.array([[1.0, 0.0]], dtype=np.float32))
    >>> s.search(np.array([1.0, 0.0], dtype=np.float32), 1) == [(ids[0], 1.0)]
    True
    """

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "full", create: bool = True,
                 readonly: bool = False):
        if synchronous not in _SYNC:
            raise InputError(f"synchronous must be one of {', '.join(_SYNC)}, got {synchronous!r}")
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise InputError(f"memory store {self.path} is a folder; give a file path such as {self.path / 'memory.db'}")
        if not self.path.parent.is_dir():
            raise InputError(f"the folder of memory store {self.path} does not exist; create {self.path.parent} first")
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise InputError(f"{self.path} is not a memory store (not an SQLite database); give a new "
                                     "file name or a store made by prunekit memory")
        self.readonly = bool(readonly)
        self._query_only = False  # _connect's read-only connection that removes its side files on close
        if self.readonly:
            create = False
        if not create and not (self.path.is_file() and self.path.stat().st_size > 0):
            raise InputError(f"{self.path} holds no memory store yet; create it with prunekit memory add (Memory.add)")
        if not self.readonly and self.path.exists() and not os.access(self.path, os.W_OK):
            # "attempt to write a readonly database" came only at the first write, with -wal/-shm files left
            raise InputError(f"memory store {self.path} is a read-only file{self._readonly_hint() or ''}; make it "
                             "writable (chmod u+w) to add or mark")
        db = None
        try:  # look before writing anything: a file that is not ours is left exactly as it was
            db, tables, user_version = self._connect()
        except sqlite3.DatabaseError as e:
            if str(e) in ("disk I/O error", "database or disk is full"):  # the system's, not the store's: exit 1
                import errno

                raise OSError(errno.ENOSPC if "full" in str(e) else errno.EIO,
                              f"{e} opening the memory store (is the disk full?); the store itself was left as it "
                              "was", str(self.path)) from None
            hint = "" if self.readonly else self._readonly_hint()
            raise InputError(f"{self.path} is not a usable memory store ({e}){hint}") from None
        self._db = db
        tables.discard("sqlite_sequence")
        if (tables and not _TABLES <= tables) or (not tables and user_version):
            self._db.close()
            what = f"tables: {', '.join(sorted(tables))}" if tables else f"user_version {user_version}"
            raise InputError(f"{self.path} is an SQLite database of something else ({what}); give a new file name")
        if not tables and not create:
            self._db.close()
            raise InputError(f"{self.path} holds no memory store yet; create it with prunekit memory add (Memory.add)")
        if tables:  # a damaged page read as a healthy store: stats and add went on, only retrieval failed
            try:
                status = [r[0] for r in self._db.execute("PRAGMA quick_check(5)")]
            except sqlite3.DatabaseError as e:
                status = [str(e)]
            if status != ["ok"]:
                self._db.close()
                raise InputError(f"memory store {self.path} is damaged ({'; '.join(status)[:200]}); restore it from "
                                 "a copy, or recover what SQLite can read: sqlite3 OLD '.recover' | sqlite3 NEW")
            self._check_version()  # before anything is set on the file: a store this version cannot read is left as is
        if not self.readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={_SYNC[synchronous]}")
        self._db.execute("PRAGMA foreign_keys=ON")
        if not tables:
            self._db.executescript(f"BEGIN; {_SCHEMA} INSERT OR IGNORE INTO meta VALUES ('schema_version', "
                                   f"'{SCHEMA_VERSION}'); COMMIT;")
        self._in_tx = False
        try:
            self._dim: int | None = self._meta_dim()
        except InputError:
            self._db.close()
            raise
        self._pending_add: list[tuple[list[int], np.ndarray]] = []
        self._pending_del: list[int] = []
        self._index_version: int | None = None  # data_version when the matrix was loaded; None = not loaded
        self._ids = np.zeros(0, dtype=np.int64)  # [n]
        self._mat = np.zeros((0, 0), dtype=np.float32)  # [n, dim]
        self._buf_ids: np.ndarray | None = None  # [capacity] the buffers _ids and _mat are views of (_append)
        self._buf_mat: np.ndarray | None = None  # [capacity, dim]
        real = self.path.resolve()
        self._closer = weakref.finalize(self, _close_connection, self._db, real if self._query_only else None)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _connect(self) -> tuple[sqlite3.Connection, set[str], int]:
        """A connection (read-only when asked), the tables the file holds and its user_version."""
        uri = _uri(self.path.resolve())
        attempts: list[str | None] = [None]
        if self.readonly:
            attempts = [uri + "?mode=ro", uri + "?mode=ro&immutable=1"]
            real = self.path.resolve()  # SQLite keeps the -wal and -shm beside a link's target
            if self._wal_is_empty() and os.access(real, os.W_OK) and os.access(real.parent, os.W_OK):
                attempts.insert(0, QUERY_ONLY)  # a mode=ro connection leaves -wal and -shm files behind
        for i, target in enumerate(attempts):
            db = None
            try:
                if target in (None, QUERY_ONLY):
                    db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_SECONDS)
                    if target == QUERY_ONLY:
                        db.execute("PRAGMA query_only=1")
                else:
                    db = sqlite3.connect(target, uri=True, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_SECONDS)
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                self._query_only = target == QUERY_ONLY
                return db, tables, db.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError:
                if db is not None:
                    db.close()
                # mode=ro on a WAL file needs its -shm file, which a read-only folder cannot hold: read the file
                # as immutable then, unless a -wal file holds commits the main file does not have yet
                if target == QUERY_ONLY or (i + 1 < len(attempts) and self._wal_is_empty()):
                    continue
                raise
            except sqlite3.DatabaseError:
                if db is not None:
                    db.close()
                raise
        raise AssertionError("unreachable")

    def _wal_is_empty(self) -> bool:
        return not _wal_holds_commits(self.path.resolve())

    def _readonly_hint(self) -> str:
        if os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK):
            return ""
        return "; its file or folder cannot be written, so it can only be read (memory stats, memory ask --no-mark)"

    def _check_version(self) -> None:
        version = self._meta("schema_version")
        if version == str(SCHEMA_VERSION):
            return
        self._db.close()
        newer = version is not None and version.isdigit() and int(version) > SCHEMA_VERSION
        raise InputError(f"{self.path} has memory schema version {version}; this prunekit reads version "
                         f"{SCHEMA_VERSION}"
                         + ("; it was written by a newer prunekit: upgrade prunekit to use it" if newer else ""))

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _meta_dim(self) -> int | None:
        """The embedding width the store recorded (None before its first chunk), which must be a whole number."""
        dim = self._meta("dim")
        if not dim:
            return None
        if not (isinstance(dim, str) and dim.isascii() and dim.isdigit() and int(dim) > 0):
            raise InputError(f"memory store {self.path} records its embedding width as {str(dim)[:40]!r}, not a whole "
                             "number >= 1: its meta table is damaged; restore the store from a copy")
        return int(dim)

    def _need_tx(self) -> None:
        if not self._in_tx:
            raise RuntimeError("store writes must happen inside `with store.transaction():`")

    @contextlib.contextmanager
    def transaction(self):
        if self._in_tx:
            raise RuntimeError("store transactions do not nest")
        if self.readonly:
            raise InputError(f"memory store {self.path} was opened read-only; open it writable to change it "
                             "(a read-only reader retrieves with mark=False: prunekit memory ask --no-mark)")
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                self._db.execute("ROLLBACK")
            self._pending_add, self._pending_del = [], []
            self._index_version = None  # a search inside may have read rows now rolled back: read it again
            raise
        finally:
            self._in_tx = False
        self._apply_pending()

    def check_embedder(self, name: str, dim: int) -> None:
        have = self._meta("embedder")
        if have is None and self.readonly:
            return  # nothing recorded, nothing to compare, and nothing may be written
        if have is None:
            with self.transaction():  # read again under the write lock: another process may have recorded it
                have = self._meta("embedder")
                if have is None:
                    self._db.execute("INSERT INTO meta VALUES ('embedder', ?), ('dim', ?)", (name, str(dim)))
            if have is None:
                self._dim = dim
                return
        if have == name and self._meta_dim() == dim:
            self._dim = dim  # recorded by another store on this file after this one opened it
        else:
            raise InputError(f"{self.path} was built with embedder {have} ({self._meta('dim')}-d), not {name} ({dim}-d); "
                             f"open it with the same embedder (--embedder) or start a new store")

    def embedder(self) -> tuple[str | None, int | None]:
        # as recorded now: another store may have recorded it since this one opened
        return self._meta("embedder"), self._meta_dim()

    def setting(self, key: str) -> str | None:
        return self._meta("setting." + key)

    def set_setting(self, key: str, value: str) -> None:
        self._need_tx()
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("setting." + key, str(value)))

    # -- turns ---------------------------------------------------------------------------------------------
    def count_turns(self) -> int:
        # turns are numbered 0, 1, ... and never deleted: the count is the last number + 1, read from the primary
        # key's b-tree (COUNT(*) scanned every turn's row, three times a chat step: 56 of 87 ms at 64k turns)
        return self._db.execute("SELECT COALESCE(MAX(turn) + 1, 0) FROM turns").fetchone()[0]

    def recent_turns(self, n: int) -> list[TurnRecord]:
        rows = self._db.execute("SELECT turn, role, text, summary FROM turns ORDER BY turn DESC LIMIT ?", (n,)).fetchall()
        return [TurnRecord(*r) for r in reversed(rows)]

    def turns_between(self, first: int, last: int) -> list[TurnRecord]:
        rows = self._db.execute("SELECT turn, role, text, summary FROM turns WHERE turn BETWEEN ? AND ? ORDER BY turn",
                                (first, last)).fetchall()
        return [TurnRecord(*r) for r in rows]

    def add_turn(self, record: TurnRecord) -> None:
        self._need_tx()
        self._db.execute("INSERT INTO turns VALUES (?, ?, ?, ?)", (record.turn, record.role, record.text, record.summary))

    # -- chunks --------------------------------------------------------------------------------------------
    def add_chunks(self, turn: int, role: str, texts: list[str], embeddings: np.ndarray) -> list[int]:
        self._need_tx()
        emb = np.ascontiguousarray(embeddings, dtype="<f4")  # [n, dim]
        if emb.ndim != 2 or emb.shape[0] != len(texts) or (self._dim is not None and emb.shape[1] != self._dim):
            raise InputError(f"embeddings of shape {emb.shape} do not fit {len(texts)} chunks of dimension {self._dim}")
        ids = []
        for text, vec in zip(texts, emb):
            cur = self._db.execute("INSERT INTO chunks (turn, role, text, embedding) VALUES (?, ?, ?, ?)",
                                   (turn, role, text, vec.tobytes()))
            ids.append(cur.lastrowid)
        self._pending_add.append((ids, emb))
        return ids

    def count_chunks(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def chunks(self, ids: list[int]) -> list[ChunkRecord]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT id, turn, role, text, last_retrieved FROM chunks WHERE id IN ({marks})",
                                [int(i) for i in ids]).fetchall()
        found = {r[0]: ChunkRecord(*r) for r in rows}
        return [found[i] for i in ids if i in found]

    def chunk_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.array(self._db.execute("SELECT id, turn, COALESCE(last_retrieved, -1) FROM chunks ORDER BY id").fetchall(),
                        dtype=np.int64).reshape(-1, 3)  # [n, 3]
        return rows[:, 0], rows[:, 1], rows[:, 2]

    def mark_retrieved(self, ids: list[int], turn: int) -> None:
        self._need_tx()
        self._db.executemany("UPDATE chunks SET last_retrieved=? WHERE id=?", [(turn, int(i)) for i in ids])

    def forget(self, records: list[ForgetRecord]) -> None:
        self._need_tx()
        self._db.executemany("INSERT INTO forgotten VALUES (?, ?, ?, ?, ?)",
                             [(r.chunk_id, r.turn, r.text, float(r.salience), r.at_turn) for r in records])
        self._db.executemany("DELETE FROM chunks WHERE id=?", [(r.chunk_id,) for r in records])
        self._pending_del.extend(r.chunk_id for r in records)

    def forgotten(self) -> list[ForgetRecord]:
        rows = self._db.execute("SELECT chunk_id, turn, text, salience, at_turn FROM forgotten ORDER BY at_turn, chunk_id")
        return [ForgetRecord(*r) for r in rows.fetchall()]

    # -- summaries -----------------------------------------------------------------------------------------
    def add_summary(self, record: SummaryRecord) -> None:
        self._need_tx()
        self._db.execute("INSERT INTO summaries (level, turn, text) VALUES (?, ?, ?)", (record.level, record.turn, record.text))

    def summaries(self, level: int) -> list[SummaryRecord]:
        rows = self._db.execute("SELECT level, turn, text FROM summaries WHERE level=? ORDER BY id", (level,)).fetchall()
        return [SummaryRecord(*r) for r in rows]

    # -- the in-memory index -------------------------------------------------------------------------------
    def _data_version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _index_stale(self) -> bool:
        """The index must be read again: never read, another connection committed, or this transaction wrote
        (a search inside it sees its own rows, as the database does)."""
        return (self._index_version is None or self._data_version() != self._index_version
                or (self._in_tx and bool(self._pending_add or self._pending_del)))

    def _load_index(self) -> None:
        if self._dim is None:  # recorded by another store since this one opened the file, or still None
            self._dim = self._meta_dim()
        rows = self._db.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
        dim = self._dim or 0
        mat = np.empty((len(rows), dim), dtype=np.float32)  # [n, dim]
        for i, (_, blob) in enumerate(rows):
            if len(blob) != 4 * dim:
                raise InputError(f"{self.path} is damaged: chunk {rows[i][0]} has a {len(blob)}-byte embedding, "
                                 f"expected {4 * dim}")
            mat[i] = np.frombuffer(blob, dtype="<f4")
        self._ids = np.array([r[0] for r in rows], dtype=np.int64)
        self._mat = mat
        self._buf_ids, self._buf_mat = self._ids, self._mat  # full: the first add grows them
        self._index_version = self._data_version()
        if self._in_tx:  # read inside a transaction: its own rows so far are in; applying them again doubled them
            self._pending_add, self._pending_del = [], []

    def _append(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add rows to the index. `_ids` and `_mat` are views of the first rows of buffers that grow by doubling,
        so adding a turn's chunks writes them instead of copying the whole matrix (a copy per turn: 2 ms at 11k
        chunks, quadratic over a conversation)."""
        n, m = len(self._ids), len(ids)
        if self._buf_ids is None or n + m > len(self._buf_ids) or self._buf_mat.shape[1] != vecs.shape[1]:
            cap = max(n + m, 2 * (0 if self._buf_ids is None else len(self._buf_ids)), 64)
            buf_ids, buf_mat = np.empty(cap, dtype=np.int64), np.empty((cap, vecs.shape[1]), dtype=np.float32)
            if n:
                buf_ids[:n], buf_mat[:n] = self._ids, self._mat
            self._buf_ids, self._buf_mat = buf_ids, buf_mat
        self._buf_ids[n:n + m], self._buf_mat[n:n + m] = ids, vecs
        self._ids, self._mat = self._buf_ids[:n + m], self._buf_mat[:n + m]

    def _apply_pending(self) -> None:
        adds, dels = self._pending_add, self._pending_del
        self._pending_add, self._pending_del = [], []
        if self._index_version is None:
            return  # not loaded yet: the first search reads everything
        if adds:
            self._append(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in adds]),
                         np.concatenate([e.astype(np.float32) for _, e in adds]))
        if dels:
            keep = ~np.isin(self._ids, np.asarray(dels, dtype=np.int64))  # [n]
            m = int(keep.sum())
            self._ids[:m], self._mat[:m] = self._ids[keep], self._mat[keep]  # compacted in place
            self._ids, self._mat = self._ids[:m], self._mat[:m]

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self._index_stale():
            self._load_index()
        n = len(self._ids)
        if n == 0 or k <= 0:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)  # [dim]
        if q.shape[0] != self._mat.shape[1]:
            raise InputError(f"query vector has dimension {q.shape[0]}, the store {self._mat.shape[1]}")
        scores = self._mat @ q  # [n]
        k = min(k, n)
        if k < n:  # every chunk scoring at least the k-th best: argpartition alone picks among ties at random
            top = np.flatnonzero(scores >= scores[np.argpartition(-scores, k - 1)[k - 1]])  # [>= k]
        else:
            top = np.arange(n)
        top = top[np.lexsort((self._ids[top], -scores[top]))][:k]  # best first, ties to the older chunk
        return [(int(self._ids[i]), float(scores[i])) for i in top]

    def index_size(self) -> int:
        """Vectors in the search index (loads it if needed)."""
        if self._index_stale():
            self._load_index()
        return len(self._ids)

    def integrity(self) -> str:
        """SQLite's own check (``"ok"`` when healthy) plus chunks whose turn is missing."""
        status = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        orphans = self._db.execute("SELECT COUNT(*) FROM chunks WHERE turn NOT IN (SELECT turn FROM turns)").fetchone()[0]
        return status if not orphans else f"{status}; {orphans} chunks without their turn"

    def close(self) -> None:
        self._closer()  # once; also run when the store is dropped unclosed, or at exit
