"""Opening the one SQLite database, and numbered migrations recorded in a table.

Every module that owns tables declares ``migrations = Migrations("name")`` and decorates numbered functions with
``@migrations()``; ``migrations.apply(db)`` runs those not yet recorded in ``_fsb_migrations``. The database object is
passed in by the caller (an in-memory one in tests), never opened deep inside a function.
"""
from __future__ import annotations

import datetime as _dt
import sqlite3
from pathlib import Path
from typing import Callable

import sqlite_utils


def open_db(path: Path | str | None) -> sqlite_utils.Database:
    """Open (creating if needed) the database at ``path``; ``None`` or ``":memory:"`` gives an in-memory one."""
    if path is None or str(path) == ":memory:":
        db = sqlite_utils.Database(sqlite3.connect(":memory:", check_same_thread=False))
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's worker threads; callers serialise writes with their own lock.
        db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False))
        db.enable_wal()
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA foreign_keys = ON")
    return db


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

    def apply(self, db: sqlite_utils.Database) -> None:
        table = db["_fsb_migrations"]
        if not table.exists():
            table.create({"owner": str, "name": str, "applied_at": str}, pk=("owner", "name"))
        done = {r["name"] for r in table.rows_where("owner = ?", [self.owner])}
        for name, fn in self._steps:
            if name in done:
                continue
            with db.conn:
                fn(db)
                table.insert({"owner": self.owner, "name": name, "applied_at": now()})
