"""Knowledge sources behind one interface: ``search(query, k) -> list[Passage]``.

- :class:`KnowledgeBase` (``"kb"``): the user's documents; BM25 + embeddings.
- :class:`KnowledgeGraph` (``"kg"``): triples, fuzzy entity lookup, the KG-path parser's output.
- :class:`WebSearch` (``"web"``): the ``ddgs`` metasearch, cached; results marked untrusted.
- :class:`LongTermMemory` (``"memory"``): per-user facts; ``memory.for_user(user)`` is the retriever.

Heavy imports (sentence-transformers, ddgs) are deferred until used.
"""
from __future__ import annotations

from pathlib import Path

from .base import Passage, Retriever, RetrieverError
from .embed import Embedder, HashingEmbedder, MiniLMEmbedder, default_embedder
from .kb import AddResult, KBDoc, KBFile, KnowledgeBase
from .kg import KnowledgeGraph
from .memory import LongTermMemory, MemoryFact, UserMemory
from .web import WebSearch

__all__ = [
    "AddResult", "Embedder", "HashingEmbedder", "KBDoc", "KBFile", "KnowledgeBase", "KnowledgeGraph", "LongTermMemory",
    "MemoryFact", "MiniLMEmbedder", "Passage", "Retriever", "RetrieverError", "UserMemory", "WebSearch",
    "default_embedder", "starter_kb_dir",
]


def starter_kb_dir() -> Path:
    """The folder of starter documents shipped with the package (``fsb kb add`` it to try the knowledge skill)."""
    return Path(__file__).resolve().parent / "starter_kb"
