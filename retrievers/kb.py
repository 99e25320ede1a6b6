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

Search scores candidates from two sources: FTS5's BM25 over the query's content words (each quoted, so user text is
never parsed as FTS syntax; stopwords dropped, words ORed) and the cosine similarity of embeddings. Hybrid search adds
them (see :class:`Fusion`): ``cosine + bm25_weight * bm25 / (bm25 + bm25_half)``, an absolute score (not a rank), so a
relevance floor can be set on it. The weights and the floor are fitted per embedder by ``fsb eval retrieval`` and
shipped in :data:`FUSION_DEFAULTS`.
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

EMBED_BATCH = 64
MAX_QUERY_TERMS = 32

Mode = Literal["hybrid", "bm25", "dense"]

# Words dropped from BM25 queries: function words and chit-chat fillers ("hi", "yeah", "really"), which match
# everything and so only add noise to the ranking (and let small talk match documents by its filler words).
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be been being below between both but by can
could d did didn do does doing don down during each else few for from further get gets going gonna got had has have
having he hello her here hers herself hey hi him himself his how i if in into is it its itself just know let like ll
lol lot lots m many me might more most much must my myself no nor not now of off oh ok okay on once only or other our
ours ourselves out over own re really s same shall she should so some such t than that the their theirs them
themselves then there these they thing things think this those through to too under until up us ve very want was we
well were what when where which while who whom whose why will with would yeah yes you your yours yourself yourselves
""".split())


@dataclass(frozen=True)
class Fusion:
    """How hybrid search scores a passage, and below which score a passage counts as not relevant.

    ``score = (1 - bm25_weight) * cosine + bm25_weight * bm25 / (bm25 + bm25_half)``: the cosine of the embeddings
    (-1..1) and BM25 squashed to 0..1 (``bm25_half`` is the BM25 score that counts half; 0 for a passage sharing no
    word with the query). Both parts are absolute, not ranks, so a score means the same from one query to the next and
    ``floor`` can be compared with it (``None``: no floor). ``bm25_weight`` 0 ranks by embeddings alone, 1 by BM25.
    """

    bm25_weight: float
    bm25_half: float
    floor: float | None = None

    def score(self, cosine: float | None, bm25: float | None) -> float:
        lexical = bm25 / (bm25 + self.bm25_half) if bm25 and bm25 > 0 else 0.0
        return (1.0 - self.bm25_weight) * (cosine or 0.0) + self.bm25_weight * lexical


# Fitted by `fsb eval retrieval --no-parsers [--embedder hashing]` (app/evaluation/retrieval_eval.py): the
# Wizard-of-Wikipedia validation split (../shared/data/fsb/wow/valid.json); the corpus is every knowledge sentence of
# the split (2,799) plus the starter KB (11 passages); each query is what the bot asks at that turn
# (`app.knowledge.kb_query`: the previous reply, then the user's message); the first 400 queries are split in halves
# with seed 15. On the fit half (200 queries): the grid point (bm25_weight 0..1 in steps of 0.05, bm25_half 5/10/20)
# with the best recall@5, and the floor that 95% of the gold passages found in the top 5 score above. Measured on the
# other half (200 queries), recall@5:
#   all-MiniLM-L6-v2: hybrid 0.480, BM25 alone 0.315, embeddings alone 0.470 (fit half: 0.575 / 0.380 / 0.525);
#                     with the floor 0.470, and 2.5% of the queries keep no passage. (With the user's message alone
#                     as the query, as before: 0.400 / 0.260 / 0.385.)
#   hashing-256:      hybrid 0.320 with these weights (fitted on the message-alone queries; a refit on the new
#                     queries, 0.85 / 10, gives 0.325), BM25 alone 0.315, embeddings alone 0.060.
# Small talk finds nothing above MiniLM's floor in the starter KB, real questions do (tests/retrievers/test_relevance.py).
# The hashing stand-in ships no floor: its fused score is mostly BM25, whose scale collapses in a knowledge base of a
# few documents (FTS5's IDF is ~0 for a word found in every document), so a floor fitted on 2,810 passages would drop
# the one relevant document of a small test KB.
FUSION_DEFAULTS: dict[str, Fusion] = {
    "all-MiniLM-L6-v2": Fusion(bm25_weight=0.15, bm25_half=20.0, floor=0.33),
    "hashing-256": Fusion(bm25_weight=0.7, bm25_half=20.0, floor=None),  # fitted floor 0.22, not shipped (above)
}
# An embedder without a fitted entry: MiniLM's weights, and no floor (cosines of another model have another scale).
FALLBACK_FUSION = Fusion(bm25_weight=0.15, bm25_half=10.0, floor=None)


def default_fusion(embedder_name: str) -> Fusion:
    """The shipped fusion weights and relevance floor for an embedder (see :data:`FUSION_DEFAULTS`)."""
    return FUSION_DEFAULTS.get(embedder_name, FALLBACK_FUSION)


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


def fts_query(text: str, stopwords: frozenset[str] = frozenset()) -> str:
    """An FTS5 MATCH expression that ORs the words of ``text`` (less ``stopwords``), each quoted: safe for any user
    input ("" if none)."""
    words = re.findall(r"\w+", text.casefold())
    seen: dict[str, None] = {}
    for w in words:
        if w not in stopwords:
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
        fusion: hybrid search's weights and relevance floor; by default the ones fitted for this embedder
            (:func:`default_fusion`).

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
        fusion: Fusion | None = None,
    ):
        self.db = db
        self.embedder = embedder
        self.fusion = fusion or default_fusion(embedder.name)
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

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid", fusion: Fusion | None = None) -> list[Passage]:
        """The ``k`` passages that best answer ``query``.

        Args:
            query: free text; any characters are safe.
            k: how many passages at most.
            mode: "hybrid" (BM25 and embeddings, scored by ``fusion``), "bm25" or "dense" (for evaluation).
            fusion: overrides the knowledge base's :class:`Fusion` for this call.

        A passage's ``score`` is the fused score (hybrid), the BM25 score (bm25) or the cosine (dense); the floor is
        not applied here (``fusion.floor`` is for the caller: see ``app.knowledge``).
        """
        if not query or not query.strip() or k <= 0:
            return []
        if mode not in ("hybrid", "bm25", "dense"):
            raise ValueError(f"mode must be hybrid, bm25 or dense, not {mode!r}")
        found = self.candidates(query, max(k * 4, 50), mode)
        top = found.ranked(mode, fusion or self.fusion)[:k]
        if not top:
            return []
        ids = [cid for cid, _ in top]
        rows = {
            r["id"]: r
            for r in self.db.query(
                f"SELECT id, title, text, source, meta FROM kb_chunks WHERE id IN ({','.join('?' * len(ids))})", ids
            )
        }
        bm25_rank = {cid: r for r, cid in enumerate(found.bm25_order, start=1)}
        out = []
        for cid, score in top:
            row = rows[cid]
            meta = json.loads(row["meta"])
            if cid in bm25_rank:
                meta["bm25_rank"] = bm25_rank[cid]
            if cid in found.cosine:
                meta["cosine"] = round(float(found.cosine[cid]), 4)
            out.append(Passage(row["text"], row["source"], float(score), row["title"], meta))
        return out

    def candidates(self, query: str, depth: int = 50, mode: Mode = "hybrid") -> "Candidates":
        """The passages worth scoring for ``query``, with both of their scores (what :meth:`search` ranks).

        The ``depth`` best by BM25 and the ``depth`` best by cosine; in hybrid mode every candidate gets both its
        BM25 score (0 when it shares no word with the query) and its cosine, so the fused score is exact.
        """
        bm25: dict[int, float] = {}
        cosine: dict[int, float] = {}
        bm25_order: list[int] = []
        dense_order: list[int] = []
        match = fts_query(query, STOPWORDS) if mode in ("hybrid", "bm25") else ""
        if match:
            for cid, s in self._bm25(match, depth):
                bm25[cid] = s
                bm25_order.append(cid)
        if mode in ("hybrid", "dense"):
            ids, sims = self._cosines(query)
            if len(ids):
                for i in np.argsort(-sims, kind="stable")[:depth]:
                    cosine[int(ids[i])] = float(sims[i])
                    dense_order.append(int(ids[i]))
                if mode == "hybrid":
                    pos = np.searchsorted(ids, bm25_order)
                    for cid, p in zip(bm25_order, pos):
                        if p < len(ids) and ids[p] == cid:
                            cosine.setdefault(cid, float(sims[p]))
                    unscored = [cid for cid in dense_order if cid not in bm25]
                    if match and unscored:
                        bm25.update(self._bm25(match, len(unscored), unscored))
        return Candidates(bm25, cosine, bm25_order, dense_order)

    def _bm25(self, match: str, limit: int, among: list[int] | None = None) -> list[tuple[int, float]]:
        """(passage id, BM25 score, higher is better), best first, for an FTS5 MATCH expression."""
        only = f" AND c.id IN ({','.join('?' * len(among))})" if among else ""
        rows = self.db.execute(
            "SELECT c.id, bm25(kb_chunks_fts) AS s FROM kb_chunks_fts "
            "JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid JOIN kb_docs d ON d.id = c.doc_id "
            f"WHERE kb_chunks_fts MATCH ? AND d.state = 'ready'{only} ORDER BY s LIMIT ?",
            [match, *(among or []), limit],
        ).fetchall()
        return [(r[0], -r[1]) for r in rows]

    def _cosines(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Every ready passage's id (ascending) and its cosine with ``query``."""
        ids, matrix = self._embeddings()
        if not len(ids):
            return ids, np.zeros(0, dtype=np.float32)
        q = self.embedder.encode([query])[0]
        return ids, matrix @ q

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


@dataclass(frozen=True)
class Candidates:
    """A query's candidate passages (by id) and their scores: what one search ranks, in any mode or fusion."""

    bm25: dict[int, float]  # BM25 score (higher is better; absent: no word in common)
    cosine: dict[int, float]
    bm25_order: list[int]  # best first, by BM25
    dense_order: list[int]  # best first, by cosine

    def ranked(self, mode: Mode, fusion: Fusion) -> list[tuple[int, float]]:
        """(passage id, score), best first; ties broken by id."""
        if mode == "bm25":
            return [(cid, self.bm25[cid]) for cid in self.bm25_order]
        if mode == "dense":
            return [(cid, self.cosine[cid]) for cid in self.dense_order]
        fused = {cid: fusion.score(self.cosine.get(cid), self.bm25.get(cid))
                 for cid in dict.fromkeys(self.bm25_order + self.dense_order)}
        return sorted(fused.items(), key=lambda x: (-x[1], x[0]))
