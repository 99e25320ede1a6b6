"""The knowledge base: the user's own documents, split into passages and searched by BM25 + embeddings.

Storage (see :mod:`retrievers.schema`): ``kb_docs`` (one row per file), ``kb_chunks`` (passages with float32
embeddings) and the FTS5 index ``kb_chunks_fts``. An ingest streams the file, embedding a batch of passages and then
writing it in one short transaction (:func:`retrievers.db.write`) under a ``pending`` document row that search
ignores; only when every passage is written does one short transaction delete the previous version and mark the new
one ``ready``. A failure, or a process killed mid-ingest, leaves only pending rows (deleted by the next ingest of that
file), so the knowledge base is as it was; and the write lock is never held while embedding, so the server keeps
answering and writing while a long file is ingested.

A document is identified by its resolved path, but it is *named* relative to what the user added: a file added on
its own by its file name (``notes.md``), a file found in an added folder by its path from that folder, the folder's
own name included (``starter_kb/photosynthesis.md``). Sources, passage metadata and listings use the name, so no
absolute server path ever reaches a reply, a trace or the API.

Search fuses two rankings with reciprocal-rank fusion (score = sum of ``1 / (60 + rank)``): FTS5's BM25 over the
query's words (each quoted, so user text is never parsed as FTS syntax) and the cosine similarity of embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import sqlite_utils

from .base import LangChainRetrievable, Passage, RetrieverError
from .db import now, write
from .embed import Embedder, from_blobs, to_blob
from .schema import ensure_schema
from .text import SUPPORTED_SUFFIXES, chunk_blocks, kind_for, read_blocks, sniff_text

RRF_K = 60
EMBED_BATCH = 64
MAX_QUERY_TERMS = 32

Mode = Literal["hybrid", "bm25", "dense"]


@dataclass(frozen=True)
class AddResult:
    """What ``KnowledgeBase.add`` did to one file: ``status`` is "added", "updated" or "unchanged"."""

    path: str
    status: Literal["added", "updated", "unchanged"]
    chunks: int
    name: str = ""


@dataclass(frozen=True)
class KBDoc:
    id: int
    path: str
    name: str
    title: str
    sha256: str
    mtime: float
    size: int
    chunks: int
    added: str
    embedder: str


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression that ORs the words of ``text``, each quoted: safe for any user input ("" if none)."""
    words = re.findall(r"\w+", text.casefold())
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    terms = list(seen)[:MAX_QUERY_TERMS]
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class KBFile:
    """A file to ingest (``path``, resolved) and its ``name`` in the knowledge base; usable wherever a path is."""

    path: Path
    name: str

    def __fspath__(self) -> str:
        return str(self.path)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[KBFile]:
    """Files to ingest: each path resolved; a directory stands for its supported, non-hidden files, recursively.

    A file given on its own is named by its file name; a file found in a folder by its path from that folder, the
    folder's name included (``docs/sub/a.md`` for ``sub/a.md`` in ``docs``).
    """
    out: dict[Path, KBFile] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            folder = path.name or path.resolve().name  # "." or "~" name the folder they stand for
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if child.suffix.lower() in SUPPORTED_SUFFIXES and child.is_file() and not child.is_symlink():
                    name = f"{folder}/{rel.as_posix()}" if folder else rel.as_posix()
                    out.setdefault(child.resolve(), KBFile(child.resolve(), name))
        else:
            out.setdefault(path.resolve(), KBFile(path.resolve(), path.name))
    return list(out.values())


class KnowledgeBase(LangChainRetrievable):
    """Documents the user owns, searchable by meaning and by words.

    Args:
        db: the open database (tables are created on first use).
        embedder: anything with ``name``, ``dim`` and ``encode``; usually :func:`retrievers.embed.default_embedder`.
        target_words / max_words / overlap_words: passage sizes, in words.
        max_file_bytes: larger files are refused.

    Example:
        >>> kb = KnowledgeBase(open_db(None), HashingEmbedder())
        >>> kb.add("notes.md").status
        'added'
        >>> kb.search("what is a skill?", k=3)[0].source
        'kb:notes.md#0'
    """

    name = "kb"

    def __init__(
        self,
        db: sqlite_utils.Database,
        embedder: Embedder,
        *,
        target_words: int = 160,
        max_words: int = 200,
        overlap_words: int = 30,
        max_file_bytes: int = 256 * 1024 * 1024,
    ):
        self.db = db
        self.embedder = embedder
        self.target_words = target_words
        self.max_words = max_words
        self.overlap_words = overlap_words
        self.max_file_bytes = max_file_bytes
        self._matrix_key: tuple | None = None
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None
        ensure_schema(db)

    # -- ingest ---------------------------------------------------------------------------------------------------

    def add(
        self,
        path: str | os.PathLike | KBFile,
        progress: Callable[[int], None] | None = None,
        *,
        name: str | None = None,
    ) -> AddResult:
        """Ingest one file (text, Markdown, HTML or JSONL), replacing an older version of it.

        Args:
            path: the file; it is resolved (symlinks followed) and identified by its resolved path. A
                :class:`KBFile` from :func:`expand_paths` brings its name.
            progress: called with a number of bytes each time that many more have been read.
            name: what sources call the document (relative, never absolute); by default the ``KBFile``'s name, or
                else the file name as given.

        Returns:
            an :class:`AddResult`; "unchanged" (and nothing written) when the file's sha256 is already stored.

        Raises:
            RetrieverError: the path is not a regular readable file, is empty, binary, not UTF-8, too large, or a
                JSONL line is malformed. The knowledge base is then left exactly as it was.
        """
        name = name or (path.name if isinstance(path, KBFile) else Path(path).expanduser().name)
        if Path(name).is_absolute():
            raise ValueError(f"a document's name is relative to what was added, not {name!r}")
        resolved = self._check_file(path)
        st = resolved.stat()
        digest = file_sha256(resolved)
        old = self._ready_doc(str(resolved))
        if old and old["sha256"] == digest and old["embedder"] == self.embedder.name:
            if progress:
                progress(st.st_size)
            return AddResult(str(resolved), "unchanged", old["chunks"], old["name"])
        sniff_text(resolved)

        # Leftovers of an interrupted ingest of this same path are never visible; clear them now.
        with write(self.db):
            for row in self.db.execute(
                "SELECT id FROM kb_docs WHERE path = ? AND state = 'pending'", [str(resolved)]
            ).fetchall():
                self._delete_doc(row[0])
            cur = self.db.execute(
                "INSERT INTO kb_docs (path, name, sha256, mtime, size, title, embedder, state, added) "
                "VALUES (?, ?, ?, ?, ?, '', ?, 'pending', ?)",
                [str(resolved), name, digest, st.st_mtime, st.st_size, self.embedder.name, now()],
            )
            doc_id = cur.lastrowid
        try:
            n, title = self._write_chunks(doc_id, resolved, name, progress)
            if n == 0:
                raise RetrieverError(f"{resolved} has no text to add.")
            with write(self.db):
                if old:
                    self._delete_doc(old["id"])
                self.db.execute(
                    "UPDATE kb_docs SET state = 'ready', chunks = ?, title = ? WHERE id = ?", [n, title, doc_id]
                )
        except BaseException:
            with write(self.db):
                self._delete_doc(doc_id)
            raise
        return AddResult(str(resolved), "updated" if old else "added", n, name)

    def _check_file(self, path: str | os.PathLike) -> Path:
        raw = Path(path).expanduser()
        try:
            resolved = raw.resolve(strict=True)
            st = resolved.stat()
        except FileNotFoundError:
            raise RetrieverError(f"{raw}: no such file.") from None
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise RetrieverError(f"{raw}: cannot be read ({e}).") from None
        if stat.S_ISDIR(st.st_mode):
            raise RetrieverError(f"{raw} is a directory: add the files inside it.")
        if not stat.S_ISREG(st.st_mode):
            raise RetrieverError(f"{raw} is not a regular file.")
        if st.st_size > self.max_file_bytes:
            raise RetrieverError(
                f"{raw} is {st.st_size / 2**20:.0f} MB, over the {self.max_file_bytes / 2**20:.0f} MB limit."
            )
        if not os.access(resolved, os.R_OK):
            raise RetrieverError(f"{raw}: permission denied.")
        return resolved

    def _write_chunks(self, doc_id: int, path: Path, name: str, progress) -> tuple[int, str]:
        kind = kind_for(path)
        blocks = read_blocks(path, kind, on_bytes=progress)
        chunks = chunk_blocks(blocks, self.target_words, self.max_words, self.overlap_words)
        n = 0
        title = ""
        batch = []
        for chunk in chunks:
            title = title or chunk.title
            batch.append(chunk)
            if len(batch) >= EMBED_BATCH:
                n = self._insert_batch(doc_id, name, batch, n)
                batch = []
        if batch:
            n = self._insert_batch(doc_id, name, batch, n)
        return n, title

    def _insert_batch(self, doc_id: int, name: str, batch, start: int) -> int:
        # Embed first, then take the write lock only for the insert: a chat's writes wait milliseconds, not the ingest.
        vecs = self.embedder.encode([f"{c.title}\n{c.text}" if c.title else c.text for c in batch])
        rows = []
        for i, (chunk, vec) in enumerate(zip(batch, vecs), start=start):
            meta = {"doc": name, "chunk": i}
            if chunk.url:
                meta["url"] = chunk.url
            if chunk.record:
                meta["line"] = chunk.record
            rows.append(
                (doc_id, i, chunk.title, chunk.text, chunk.url or f"kb:{name}#{i}", json.dumps(meta), to_blob(vec))
            )
        with write(self.db):
            self.db.conn.executemany(
                "INSERT INTO kb_chunks (doc_id, n, title, text, source, meta, embedding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return start + len(batch)

    def _delete_doc(self, doc_id: int) -> None:
        self.db.execute("DELETE FROM kb_chunks WHERE doc_id = ?", [doc_id])
        self.db.execute("DELETE FROM kb_docs WHERE id = ?", [doc_id])

    def _ready_doc(self, path: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM kb_docs WHERE path = ? AND state = 'ready'", [path]))
        return rows[0] if rows else None

    # -- list / remove --------------------------------------------------------------------------------------------

    def list(self) -> list[KBDoc]:
        """Every ingested file, by name."""
        rows = self.db.query(
            "SELECT id, path, name, title, sha256, mtime, size, chunks, added, embedder FROM kb_docs "
            "WHERE state = 'ready' ORDER BY name, path"
        )
        return [KBDoc(**r) for r in rows]

    def remove(self, path: str | os.PathLike) -> bool:
        """Forget a file (given as added, by its resolved path, or by its name in the knowledge base; the file itself
        may be gone). True if it was there.

        Raises:
            RetrieverError: ``path`` is the name of several documents (give the path instead).
        """
        candidates = [str(path)]
        try:
            candidates.append(str(Path(path).expanduser().resolve()))
        except (OSError, RuntimeError):
            pass
        doc = next(filter(None, map(self._ready_doc, candidates)), None)
        if doc is None:
            named = list(self.db.query("SELECT * FROM kb_docs WHERE name = ? AND state = 'ready'", [str(path)]))
            if len(named) > 1:
                raise RetrieverError(f"{len(named)} documents are named {str(path)!r}: remove one by its path.")
            doc = named[0] if named else None
        if doc is None:
            return False
        with write(self.db):
            self._delete_doc(doc["id"])
        return True

    # -- search ---------------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid") -> list[Passage]:
        """The ``k`` passages that best answer ``query``.

        Args:
            query: free text; any characters are safe.
            k: how many passages at most.
            mode: "hybrid" (BM25 and embeddings fused by reciprocal rank), "bm25" or "dense" (for evaluation).
        """
        if not query or not query.strip() or k <= 0:
            return []
        if mode not in ("hybrid", "bm25", "dense"):
            raise ValueError(f"mode must be hybrid, bm25 or dense, not {mode!r}")
        depth = max(k * 4, 50)
        lexical = self._bm25(query, depth) if mode in ("hybrid", "bm25") else []
        dense = self._dense(query, depth) if mode in ("hybrid", "dense") else []
        if mode == "bm25":
            scored = [(cid, -s) for cid, s in lexical]
        elif mode == "dense":
            scored = dense
        else:
            fused: dict[int, float] = {}
            for ranking in (lexical, dense):
                for rank, (cid, _) in enumerate(ranking, start=1):
                    fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
            scored = sorted(fused.items(), key=lambda x: (-x[1], x[0]))
        top = scored[:k]
        if not top:
            return []
        bm25_rank = {cid: r for r, (cid, _) in enumerate(lexical, start=1)}
        dense_score = dict(dense)
        ids = [cid for cid, _ in top]
        rows = {
            r["id"]: r
            for r in self.db.query(
                f"SELECT id, title, text, source, meta FROM kb_chunks WHERE id IN ({','.join('?' * len(ids))})", ids
            )
        }
        out = []
        for cid, score in top:
            row = rows[cid]
            meta = json.loads(row["meta"])
            if cid in bm25_rank:
                meta["bm25_rank"] = bm25_rank[cid]
            if cid in dense_score:
                meta["cosine"] = round(float(dense_score[cid]), 4)
            out.append(Passage(row["text"], row["source"], float(score), row["title"], meta))
        return out

    def _bm25(self, query: str, limit: int) -> list[tuple[int, float]]:
        match = fts_query(query)
        if not match:
            return []
        rows = self.db.execute(
            "SELECT c.id, bm25(kb_chunks_fts) AS s FROM kb_chunks_fts "
            "JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid JOIN kb_docs d ON d.id = c.doc_id "
            "WHERE kb_chunks_fts MATCH ? AND d.state = 'ready' ORDER BY s LIMIT ?",
            [match, limit],
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def _dense(self, query: str, limit: int) -> list[tuple[int, float]]:
        ids, matrix = self._embeddings()
        if not len(ids):
            return []
        q = self.embedder.encode([query])[0]
        sims = matrix @ q
        top = np.argsort(-sims, kind="stable")[:limit]
        return [(int(ids[i]), float(sims[i])) for i in top]

    def _embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """All ready passages' ids and embeddings from this embedder, cached until the knowledge base changes."""
        name = self.embedder.name
        key = self.db.execute(
            "SELECT count(*), coalesce(max(c.id), 0) FROM kb_chunks c JOIN kb_docs d ON d.id = c.doc_id "
            "WHERE d.state = 'ready' AND d.embedder = ?",
            [name],
        ).fetchone()
        key = (name, *key)
        if self._matrix_key != key:
            rows = self.db.execute(
                "SELECT c.id, c.embedding FROM kb_chunks c JOIN kb_docs d ON d.id = c.doc_id "
                "WHERE d.state = 'ready' AND d.embedder = ? ORDER BY c.id",
                [name],
            ).fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            self._matrix = (ids, from_blobs([r[1] for r in rows], self.embedder.dim))
            self._matrix_key = key
        return self._matrix
