"""The one small interface every knowledge source implements: ``search(query, k) -> list[Passage]``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Passage:
    """One piece of retrieved knowledge, ready to be shown to the response skill and to the user.

    Attributes:
        text: the passage itself, plain text.
        source: where it came from: a URL, ``"kb:<doc path>#<chunk n>"``, ``"kg"`` or ``"memory:<id>"``.
        score: higher is better; only comparable between passages of one ``search`` call.
        title: a document or page title, when there is one.
        meta: source-specific details (``{"untrusted": True}`` for web results, ranks, ids); not part of equality.
    """

    text: str
    source: str
    score: float
    title: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@runtime_checkable
class Retriever(Protocol):
    """A knowledge source. ``name`` is one of ``"kb" | "kg" | "web" | "memory"``.

    ``search`` returns at most ``k`` passages, best first; an empty or blank query returns ``[]``.
    It raises :class:`RetrieverError` (never a library's own exception) when the source cannot answer.
    """

    name: str

    def search(self, query: str, k: int = 5) -> list[Passage]: ...


class LangChainRetrievable:
    """Mixed into every knowledge source: ``as_langchain(k)`` is it as a LangChain ``BaseRetriever``."""

    def as_langchain(self, k: int = 5):
        from .langchain import as_langchain

        return as_langchain(self, k)


class RetrieverError(Exception):
    """A knowledge source could not do what was asked; the message is written to be shown to a user."""
