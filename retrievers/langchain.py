"""Every knowledge source as a LangChain retriever: ``as_langchain(source, k)`` wraps anything with
``search(query, k) -> list[Passage]`` (knowledge base, knowledge graph, web search, one user's memory) in a
``langchain_core.retrievers.BaseRetriever``, so a LangChain app uses it unchanged (``invoke``, ``batch``, chains).

Example:
    >>> from retrievers.langchain import as_langchain
    >>> docs = as_langchain(kb, k=3).invoke("how do plants make food?")
    >>> docs[0].metadata["source"]
    'kb:/home/me/notes/photosynthesis.md#0'
"""
from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from .base import Passage


def to_document(passage: Passage) -> Document:
    """A passage as a LangChain document: its text, and its source, score, title and details as metadata."""
    return Document(page_content=passage.text,
                    metadata={"source": passage.source, "score": passage.score, "title": passage.title,
                              **passage.meta})


class FSBRetriever(BaseRetriever):
    """A Few-Shot Bot knowledge source behind LangChain's retriever interface."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Any
    """Anything with ``search(query, k) -> list[Passage]``."""
    k: int = 5

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [to_document(p) for p in self.source.search(query, k=self.k)]


def as_langchain(source, k: int = 5) -> FSBRetriever:
    """Wrap a knowledge source (``KnowledgeBase``, ``KnowledgeGraph``, ``WebSearch``, ``UserMemory``)."""
    return FSBRetriever(source=source, k=k)
