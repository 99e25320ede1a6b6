"""Chat sessions and their messages, with each reply's turn trace, in the one SQLite database.

Tables (created by the numbered migrations below):
    sessions(id TEXT pk, user, title, skill, created, updated)   skill: a forced skill for the session, or ''
    messages(id INTEGER pk, session_id -> sessions.id, role, content, skill, trace JSON, created)
A reply is stored with the trace that explains it. Every write is one `retrievers.db.write` transaction, the same
discipline as the retrievers' tables (one lock per database file in this process, `BEGIN IMMEDIATE` across
processes); reads take no lock (each thread reads a committed WAL snapshot on its own connection), and WAL survives a
killed process.
"""
from __future__ import annotations

import json
import uuid

import sqlite_utils

from retrievers.db import Migrations, now, write

migrations = Migrations("core")


@migrations()
def m001_sessions_and_messages(db: sqlite_utils.Database) -> None:
    db["sessions"].create(
        {"id": str, "user": str, "title": str, "skill": str, "created": str, "updated": str}, pk="id"
    )
    db["messages"].create(
        {"id": int, "session_id": str, "role": str, "content": str, "skill": str, "trace": str, "created": str},
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["messages"].create_index(["session_id", "id"])
    db["sessions"].create_index(["user", "updated"])


class SessionNotFound(KeyError):
    pass


class Store:
    """Sessions and messages. The database is passed in (in-memory in tests)."""

    def __init__(self, db: sqlite_utils.Database):
        migrations.apply(db)
        self.db = db

    def create_session(self, user: str = "", title: str = "", skill: str = "", session_id: str | None = None) -> str:
        sid = session_id or uuid.uuid4().hex
        stamp = now()
        with write(self.db):
            self.db["sessions"].insert(
                {"id": sid, "user": user, "title": title, "skill": skill, "created": stamp, "updated": stamp},
                ignore=True,
            )
        return sid

    def session(self, session_id: str) -> dict:
        try:
            return self.db["sessions"].get(session_id)
        except sqlite_utils.db.NotFoundError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def sessions(self, user: str | None = None, limit: int = 50) -> list[dict]:
        where, args = ("user = ?", [user]) if user is not None else (None, None)
        return list(self.db["sessions"].rows_where(where, args, order_by="updated desc", limit=limit))

    def add_message(self, session_id: str, role: str, content: str, skill: str = "", trace: dict | None = None) -> int:
        stamp = now()
        with write(self.db):
            row = self.db["messages"].insert(
                {"session_id": session_id, "role": role, "content": content, "skill": skill,
                 "trace": json.dumps(trace or {}), "created": stamp}
            )
            title = self.db["sessions"].get(session_id)["title"] or (content[:60] if role == "user" else "")
            self.db["sessions"].update(session_id, {"updated": stamp, "title": title})
        return row.last_pk

    def messages(self, session_id: str) -> list[dict]:
        rows = self.db["messages"].rows_where("session_id = ?", [session_id], order_by="id")
        return [{**r, "trace": json.loads(r["trace"] or "{}")} for r in rows]

    def set_session_skill(self, session_id: str, skill: str) -> None:
        with write(self.db):
            self.db["sessions"].update(session_id, {"skill": skill})

    def set_trace(self, message_id: int, trace: dict) -> None:
        """Replace a stored reply's trace (work after the reply, such as memory extraction, adds its step)."""
        with write(self.db):
            self.db["messages"].update(message_id, {"trace": json.dumps(trace or {})})
