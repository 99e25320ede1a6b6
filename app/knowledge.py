"""Knowledge for a turn: the skill's retriever, asked with the parser's query, turned into the skill's prompt fields.

Knowledge-base passages below the relevance floor (``KnowledgeBase.fusion.floor``, fitted per embedder by ``fsb eval
retrieval``) are dropped: they reach neither the prompt nor the sources. With none left the skill answers without
knowledge, and :attr:`Retrieved.note` (written into the turn trace's retrieve step) says how many were dropped and why.

Retrieved text is data, never instructions: every passage is neutralised before it reaches a prompt (folded onto one
line so it cannot start a dialogue line or close a block, speaker and layout markers broken, length capped), and the
skill templates put it under a labelled header, apart from the dialogue.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from retrievers import KnowledgeBase, KnowledgeGraph, LongTermMemory, Passage, RetrieverError, WebSearch

log = logging.getLogger(__name__)

FIELD_FOR = {"kb": "knowledge", "web": "knowledge", "kg": "knowledge", "memory": "user_memory"}
_ZWSP = "\u200b"


def kb_query(dialogue) -> str:
    """What the knowledge base is asked for the open turn of ``dialogue`` (``[user, assistant]`` pairs, the last one
    open) when no parser writes the query: the assistant's previous reply, which carries the topic so far, then the
    user's message. Follow-ups ("what else do they eat?") name no topic of their own. `fsb eval retrieval` builds its
    queries with this same function; on the Wizard-of-Wikipedia fit half it beat the user's message alone (recall@5
    0.575 against 0.410) and the two previous turns (0.555), and on the report half it holds (0.480 against 0.400)."""
    if not dialogue:
        return ""
    last = str(dialogue[-1][0] or "").strip()
    previous = str(dialogue[-2][1] or "").strip() if len(dialogue) > 1 and len(dialogue[-2]) > 1 else ""
    return f"{previous} {last}".strip() if previous else last


@dataclass
class Retrieved:
    fields: dict = field(default_factory=dict)
    passages: list[Passage] = field(default_factory=list)
    error: str | None = None
    # for the trace: {"floor": 0.xx, "dropped_below_floor": N, "reason": "..."} when the floor applied
    note: dict = field(default_factory=dict)


def neutralise(text: str, markers: list[str], limit: int = 600) -> str:
    """One line, markers broken with a zero-width space, at most ``limit`` characters."""
    text = " ".join(text.split())
    for marker in markers:
        if marker:
            text = re.sub(re.escape(marker), lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text,
                          flags=re.IGNORECASE)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Knowledge:
    """The four sources over one database; ``fetch`` answers a skill's retriever with prompt fields and passages."""

    def __init__(self, db, embedder, web: WebSearch | None = None, k: int = 3):
        self.kb = KnowledgeBase(db, embedder)
        self.kg = KnowledgeGraph(db)
        self.web = web or WebSearch(db)
        self.memory = LongTermMemory(db, embedder)
        self.k = k

    def fetch(self, retriever: str, query: str, user: str, markers: list[str]) -> Retrieved:
        if retriever == "none" or not query.strip():
            return Retrieved()
        note: dict = {}
        try:
            if retriever == "kb":
                passages, note = self._above_floor(self.kb.search(query, k=self.k))
            elif retriever == "web":
                passages = self.web.search(query, k=self.k)
            elif retriever == "kg":
                passages = self.kg.lookup_paths(query, k=self.k * 2) or self.kg.search(query, k=self.k * 2)
            elif retriever == "memory":
                passages = self.memory.search(query, k=5, user=user) if user else []
            else:
                return Retrieved(error=f"unknown retriever {retriever!r}")
        except RetrieverError as exc:
            log.warning("retriever %s failed: %s", retriever, exc)
            return Retrieved(error=str(exc))
        texts = [neutralise(p.text, markers) for p in passages]
        return Retrieved({FIELD_FOR[retriever]: texts}, passages, note=note)

    def _above_floor(self, passages: list[Passage]) -> tuple[list[Passage], dict]:
        """The passages scoring at least the knowledge base's relevance floor, and what the trace should say."""
        floor = self.kb.fusion.floor
        if floor is None:
            return passages, {}
        kept = [p for p in passages if p.score >= floor]
        note: dict = {"floor": floor}
        if len(kept) < len(passages):
            note["dropped_below_floor"] = len(passages) - len(kept)
            if not kept:
                note["reason"] = f"no passage above the relevance floor ({floor:.2f})"
        return kept, note

    def remember(self, user: str, facts: list[str]) -> list:
        return self.memory.add(user, facts) if user and facts else []
