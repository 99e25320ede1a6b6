"""Tables owned by the retrievers, as numbered migrations recorded in ``_fsb_migrations`` (owner ``"retrievers"``).

Knowledge base
    ``kb_docs``    one row per ingested file: resolved ``path`` (its identity, never shown), ``name`` (what
                   sources and listings call it: relative to what the user added), ``sha256``, ``mtime``, ``size``,
                   ``title``, the ``embedder`` that embedded it, and ``state``: ``"pending"`` while an ingest is
                   being written, ``"ready"`` once it is complete. Only ready documents are listed or searched, so a
                   failed or interrupted ingest never shows half a file, and a re-ingest swaps old for new in one
                   transaction.
    ``kb_chunks``  the passages: ``doc_id``, ``n`` (order in the file), ``title``, ``text``, ``source``
                   (``kb:<name>#<n>``, or the record's URL), ``meta`` (JSON), ``embedding`` (float32 blob,
                   L2-normalised). ``kb_chunks_fts`` is its FTS5 index (porter stemming), kept in step by
                   sqlite-utils' triggers.
Knowledge graph
    ``kg_triples`` ``subject, relation, object`` with normalised ``subject_key`` / ``object_key`` for fuzzy lookup.
Web search
    ``web_cache``  one row per (backend, region, safesearch, query): the cleaned results as JSON and ``fetched_at``.
Long-term memory
    ``memories``   per-user facts: ``user_id``, ``text``, ``key`` (normalised text for exact de-duplication),
                   ``created``, ``source_turn``, ``embedder``, ``embedding``.
"""
from __future__ import annotations

import json
from pathlib import Path

import sqlite_utils

from .db import Migrations

migrations = Migrations("retrievers")


@migrations()
def m001_knowledge_base(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE kb_docs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            mtime REAL NOT NULL,
            size INTEGER NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            embedder TEXT NOT NULL,
            chunks INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'pending',
            added TEXT NOT NULL
        )"""
    )
    # At most one ready version of a file; pending ones come and go beside it.
    db.execute("CREATE UNIQUE INDEX kb_docs_ready_path ON kb_docs(path) WHERE state = 'ready'")
    db.execute(
        """CREATE TABLE kb_chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            doc_id INTEGER NOT NULL REFERENCES kb_docs(id) ON DELETE CASCADE,
            n INTEGER NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            source TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}',
            embedding BLOB NOT NULL
        )"""
    )
    db.execute("CREATE INDEX kb_chunks_doc ON kb_chunks(doc_id)")
    db["kb_chunks"].enable_fts(["title", "text"], fts_version="FTS5", create_triggers=True, tokenize="porter")


@migrations()
def m002_knowledge_graph(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE kg_triples (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            subject TEXT NOT NULL,
            relation TEXT NOT NULL,
            object TEXT NOT NULL,
            subject_key TEXT NOT NULL,
            object_key TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT '',
            UNIQUE (subject, relation, object)
        )"""
    )
    db.execute("CREATE INDEX kg_triples_subject ON kg_triples(subject_key)")
    db.execute("CREATE INDEX kg_triples_object ON kg_triples(object_key)")


@migrations()
def m003_web_cache(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE web_cache (
            key TEXT PRIMARY KEY,
            query TEXT NOT NULL,
            requested INTEGER NOT NULL,
            results TEXT NOT NULL,
            fetched_at REAL NOT NULL
        )"""
    )


@migrations()
def m004_memories(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id TEXT NOT NULL,
            text TEXT NOT NULL,
            key TEXT NOT NULL,
            created TEXT NOT NULL,
            source_turn TEXT,
            embedder TEXT NOT NULL,
            embedding BLOB NOT NULL
        )"""
    )
    db.execute("CREATE INDEX memories_user ON memories(user_id)")


@migrations()
def m005_kb_document_names(db: sqlite_utils.Database) -> None:
    """Name each document relative to what was added, and rewrite its sources, which held the absolute path.

    Documents added before this have no record of the folder they came from: they are named by their file name,
    except the shipped starter documents (``starter_kb/<file>``).
    """
    db.execute("ALTER TABLE kb_docs ADD COLUMN name TEXT NOT NULL DEFAULT ''")
    starter = Path(__file__).resolve().parent / "starter_kb"
    for doc_id, path in db.execute("SELECT id, path FROM kb_docs").fetchall():
        p = Path(path)
        name = f"starter_kb/{p.relative_to(starter).as_posix()}" if p.is_relative_to(starter) else p.name
        db.execute("UPDATE kb_docs SET name = ? WHERE id = ?", [name, doc_id])
        for chunk_id, n, source, meta in db.execute(
            "SELECT id, n, source, meta FROM kb_chunks WHERE doc_id = ?", [doc_id]
        ).fetchall():
            meta = {**json.loads(meta or "{}"), "doc": name}
            if source.startswith("kb:"):
                source = f"kb:{name}#{n}"
            db.execute("UPDATE kb_chunks SET source = ?, meta = ? WHERE id = ?", [source, json.dumps(meta), chunk_id])


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create or upgrade the retrievers' tables; cheap to call again."""
    migrations.apply(db)
