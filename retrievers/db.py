"""The one SQLite database: opening it, the single way to write to it, and numbered migrations.

A leaf module (it imports nothing from ``app`` or the rest of ``retrievers``), so both packages use it without an
import cycle. The database object is passed in by the caller, never opened deep inside a function.

Design: a connection per thread, and one write discipline.
    The server answers turns on many threads, and the CLI (``fsb kb add``) or a second server may write to the same
    file from another process. :func:`open_db` returns a :class:`Database` whose ``conn`` is the calling thread's own
    connection to the file (opened on first use), not one connection shared by every thread. A shared connection
    has one transaction state for all threads: a reader's statements run inside whichever writer's transaction is
    open, see its uncommitted rows, and sqlite-utils' own ``SAVEPOINT``/``RELEASE`` around ``query()`` interleave
    with the writer's ``BEGIN``/``COMMIT`` ("cannot start a transaction within a transaction", "no such savepoint"),
    so reads would need the lock too. With a connection per thread, SQLite's WAL gives each read a committed
    snapshot and reads never wait for writers, nor take any lock here.

    Every write goes through :func:`write` (``with write(db): ...``): it takes the database file's process-wide
    re-entrant lock, then ``BEGIN IMMEDIATE``, and commits (or rolls back on any exception) at the end. The lock
    queues this process's writers without polling; ``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so a
    writer in another process waits up to ``busy_timeout`` for it instead of failing with SQLITE_BUSY when a read
    transaction cannot be upgraded. A ``write`` inside a ``write`` on the same thread joins the outer transaction
    as a savepoint. Keep the block short: compute (embed, parse, fetch) first, then write; never ``yield`` inside
    it (a generator may resume on another thread, which does not hold the lock).

    Connections are opened with ``isolation_level=None``: Python opens no implicit transactions, so a statement
    outside :func:`write` commits on its own instead of leaving a transaction open that holds SQLite's write lock.

    ``open_db(None)`` (tests) gives a fresh private database in a temporary file, removed when the object is
    garbage-collected, so tests run the same per-thread code as the server.

Migrations: every module that owns tables declares ``migrations = Migrations("name")`` and decorates numbered
functions with ``@migrations()``; ``migrations.apply(db)`` runs those not yet recorded in ``_fsb_migrations``, in
one write transaction, so two processes starting at once never apply one twice.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
import sqlite3
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils

BUSY_TIMEOUT_MS = 5000  # tests/test_faults.py counts on a lock held 7 s giving up before it ends

_file_locks: dict[str, threading.RLock] = {}
_file_locks_guard = threading.Lock()


class _Connection(sqlite3.Connection):
    """A plain connection that can be weakly referenced (``sqlite3.Connection`` cannot), so ``close()`` finds it."""


class Database(sqlite_utils.Database):
    """A ``sqlite_utils.Database`` on a file whose ``conn`` is the calling thread's own connection.

    Args:
        path: the database file (created if needed; WAL mode is switched on).
        synchronous: SQLite's ``PRAGMA synchronous`` for every connection; ``None`` keeps SQLite's default.
    """

    def __init__(self, path: Path | str, *, synchronous: str | None = None):
        self.path = str(path)
        self._synchronous = synchronous
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._connections_guard = threading.Lock()
        with _file_locks_guard:
            self.write_lock = _file_locks.setdefault(str(Path(path).resolve()), threading.RLock())
        super().__init__(self._connect())
        self.enable_wal()

    @property
    def conn(self) -> sqlite3.Connection:  # type: ignore[override]
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @conn.setter
    def conn(self, value: sqlite3.Connection) -> None:  # sqlite_utils.Database.__init__ assigns it
        self._local.conn = value

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() (and the garbage collector) may close it from another thread.
        conn = sqlite3.connect(self.path, factory=_Connection, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA recursive_triggers = ON")  # as sqlite-utils sets it, for its FTS triggers
        if self._synchronous:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        with self._connections_guard:
            self._connections.add(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (a thread that uses the database again gets an error)."""
        with self._connections_guard:
            conns = list(self._connections)
        for conn in conns:
            conn.close()

    def __repr__(self) -> str:
        return f"<Database {self.path}>"


def open_db(path: Path | str | None) -> Database:
    """Open (creating if needed) the database at ``path``; ``None`` or ``":memory:"`` gives a private throwaway one."""
    if path is None or str(path) == ":memory:":
        folder = tempfile.mkdtemp(prefix="fsb-db-")
        db = Database(Path(folder) / f"{uuid.uuid4().hex}.db", synchronous="OFF")
        weakref.finalize(db, shutil.rmtree, folder, True)
        return db
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Database(path)


def _write_lock(db: sqlite_utils.Database) -> threading.RLock:
    lock = getattr(db, "write_lock", None)
    if lock is None:  # a plain sqlite_utils.Database: one lock per object
        with _file_locks_guard:
            lock = db.__dict__.setdefault("write_lock", threading.RLock())
    return lock


@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction: the database's writer lock, ``BEGIN IMMEDIATE``, then COMMIT, or ROLLBACK on error.

    Nested on the same thread, it becomes a savepoint of the outer transaction.

    Example:
        >>> with write(db):
        ...     db.execute("INSERT INTO t (x) VALUES (?)", [1])
    """
    with _write_lock(db):
        conn = db.conn
        if conn.in_transaction:
            name = f"fsb_{uuid.uuid4().hex}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield db
            except BaseException:
                if conn.in_transaction:
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
            if not conn.in_transaction:  # e.g. `with db.conn:` or a COMMIT inside the block: atomicity was lost
                raise RuntimeError("The transaction of `with write(db)` was ended inside the block.")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Migrations:
    """An ordered list of schema changes for one owner, each applied once per database."""

    def __init__(self, owner: str):
        self.owner = owner
        self._steps: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = []

    def __call__(self) -> Callable:
        def register(fn: Callable[[sqlite_utils.Database], None]):
            self._steps.append((fn.__name__, fn))
            return fn

        return register

    def _pending(self, db: sqlite_utils.Database) -> list[tuple[str, Callable]]:
        table = db["_fsb_migrations"]
        done = {r["name"] for r in table.rows_where("owner = ?", [self.owner])} if table.exists() else set()
        return [(name, fn) for name, fn in self._steps if name not in done]

    def apply(self, db: sqlite_utils.Database) -> None:
        if not self._pending(db):  # the usual case: a lock-free read
            return
        with write(db):
            table = db["_fsb_migrations"]
            if not table.exists():
                table.create({"owner": str, "name": str, "applied_at": str}, pk=("owner", "name"))
            for name, fn in self._pending(db):  # again, now that no other writer can run
                fn(db)
                table.insert({"owner": self.owner, "name": name, "applied_at": now()})
