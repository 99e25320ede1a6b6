"""Long-term memory: facts each user revealed, kept per user and retrieved by meaning.

``memories`` rows hold ``user_id``, the fact ``text``, a normalised ``key`` for exact de-duplication, ``created``,
the optional ``source_turn`` it was extracted from, and its embedding. Every read and delete is scoped by
``user_id`` in SQL, so one user's facts can never come back for another. Near-duplicates (same key, or cosine
>= ``dedup_threshold`` with a fact the user already has) are not stored twice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import sqlite_utils

from .base import LangChainRetrievable, Passage, RetrieverError
from .db import now, write
from .embed import Embedder, from_blobs, to_blob
from .schema import ensure_schema

MAX_USER_ID = 200
MAX_FACT_CHARS = 1000


@dataclass(frozen=True)
class MemoryFact:
    id: int
    user_id: str
    text: str
    created: str
    source_turn: str | None = None


def fact_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise RetrieverError("A user id is needed to read or write memories.")
    if len(user) > MAX_USER_ID:
        raise RetrieverError(f"User ids are at most {MAX_USER_ID} characters.")
    return user


class LongTermMemory:
    """Per-user facts.

    Args:
        db: the open database.
        embedder: shared with the knowledge base (:func:`retrievers.embed.default_embedder`).
        dedup_threshold: cosine at or above which a new fact counts as one the user already has.

    Example:
        >>> mem = LongTermMemory(open_db(None), HashingEmbedder())
        >>> [f.text for f in mem.add("alice", ["I have a cat.", "I have a cat!"])]
        ['I have a cat.']
        >>> mem.for_user("alice").search("pets", k=1)[0].source
        'memory:1'
    """

    name = "memory"

    def __init__(self, db: sqlite_utils.Database, embedder: Embedder, *, dedup_threshold: float = 0.92):
        self.db = db
        self.embedder = embedder
        self.dedup_threshold = dedup_threshold
        ensure_schema(db)

    def add(self, user: str, facts: Iterable[str], source_turn: str | None = None) -> list[MemoryFact]:
        """Store the facts ``user`` revealed; returns those that were new (near-duplicates are skipped)."""
        _check_user(user)
        cleaned = []
        for fact in facts:
            text = " ".join(str(fact).split())[:MAX_FACT_CHARS]
            if fact_key(text):
                cleaned.append(text)
        if not cleaned:
            return []
        vecs = self.embedder.encode(cleaned)  # the slow part, before taking the write lock
        out = []
        with write(self.db):  # compared with the user's facts inside the write, so two adds cannot both store one
            existing = self._rows(user)
            keys = {r["key"] for r in existing}
            old_vecs = from_blobs([r["embedding"] for r in existing], self.embedder.dim)
            kept: list[tuple[str, np.ndarray]] = []
            for text, vec in zip(cleaned, vecs):
                key = fact_key(text)
                if key in keys:
                    continue
                if len(old_vecs) and float(np.max(old_vecs @ vec)) >= self.dedup_threshold:
                    continue
                if any(float(v @ vec) >= self.dedup_threshold for _, v in kept):
                    continue
                keys.add(key)
                kept.append((text, vec))
            for text, vec in kept:
                created = now()
                cur = self.db.execute(
                    "INSERT INTO memories (user_id, text, key, created, source_turn, embedder, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [user, text, fact_key(text), created, source_turn, self.embedder.name, to_blob(vec)],
                )
                out.append(MemoryFact(cur.lastrowid, user, text, created, source_turn))
        return out

    def _rows(self, user: str) -> list[dict]:
        # Facts embedded by another model are listed and forgotten like any other, but not compared by vector.
        return list(
            self.db.query(
                "SELECT id, text, key, created, source_turn, embedding FROM memories "
                "WHERE user_id = ? AND embedder = ? ORDER BY id",
                [user, self.embedder.name],
            )
        )

    def search(self, query: str, k: int = 5, *, user: str) -> list[Passage]:
        """The ``k`` facts of ``user`` closest in meaning to ``query`` (never another user's)."""
        _check_user(user)
        if not query or not query.strip() or k <= 0:
            return []
        rows = self._rows(user)
        if not rows:
            return []
        matrix = from_blobs([r["embedding"] for r in rows], self.embedder.dim)
        sims = matrix @ self.embedder.encode([query])[0]
        order = np.argsort(-sims, kind="stable")[:k]
        return [
            Passage(
                rows[i]["text"],
                f"memory:{rows[i]['id']}",
                float(sims[i]),
                meta={"user": user, "id": rows[i]["id"], "created": rows[i]["created"]},
            )
            for i in order
        ]

    def list(self, user: str) -> list[MemoryFact]:
        """Everything kept about ``user``, oldest first."""
        _check_user(user)
        return [
            MemoryFact(**r)
            for r in self.db.query(
                "SELECT id, user_id, text, created, source_turn FROM memories WHERE user_id = ? ORDER BY id", [user]
            )
        ]

    def forget(self, user: str, id: int | None = None) -> int:
        """Delete one fact of ``user`` (by id) or all of them; returns how many were deleted."""
        _check_user(user)
        with write(self.db):
            if id is None:
                cur = self.db.execute("DELETE FROM memories WHERE user_id = ?", [user])
            else:
                cur = self.db.execute("DELETE FROM memories WHERE user_id = ? AND id = ?", [user, int(id)])
        return cur.rowcount

    def for_user(self, user: str) -> "UserMemory":
        """This memory seen as a :class:`~retrievers.base.Retriever` bound to one user."""
        return UserMemory(self, _check_user(user))


class UserMemory(LangChainRetrievable):
    """One user's memories behind the plain ``search(query, k)`` interface."""

    name = "memory"

    def __init__(self, memory: LongTermMemory, user: str):
        self.memory = memory
        self.user = user

    def search(self, query: str, k: int = 5) -> list[Passage]:
        return self.memory.search(query, k, user=self.user)
