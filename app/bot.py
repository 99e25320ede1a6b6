"""The Few-Shot Bot turn: messages in, a streamed reply out, with a trace that explains it.

    messages -> dialogue pairs -> skill (forced, or the default) -> few-shot prompt within the token budget
             -> streamed reply (LM) -> stored with its trace

`Bot` only orchestrates the value objects (`Skill`, `Prompt`, `LM`, `Store`); each step appends to the turn trace.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .lm import LM, Sampling
from .skills import Skill, SkillRegistry
from .storage import Store

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The caller's input cannot make a turn (empty, too long, wrong shape). The message says what to fix."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class UnknownSkill(BadRequest):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown skill {name!r}; available: {', '.join(sorted(known))}", "model", "model_not_found")


@dataclass
class Reply:
    """What a finished turn produced, inspectable afterwards."""

    text: str
    skill: str
    prompt: str
    passages: list = field(default_factory=list)
    trace: dict = field(default_factory=dict)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TurnStream:
    """Iterate for the reply's text pieces; afterwards ``.reply`` holds the whole `Reply`."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces = pieces
        self._finish = finish
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        parts: list[str] = []
        for piece in self._pieces:
            parts.append(piece)
            yield piece
        self.reply = self._finish("".join(parts))

    def text(self) -> str:
        return "".join(self)


def to_dialogue(messages: Sequence[dict]) -> list[list[str]]:
    """OpenAI-style messages to [user, assistant] pairs; the last pair is the open user turn."""
    pairs: list[list[str]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role == "system":
            continue
        if role == "user":
            if pairs and not pairs[-1][1]:
                pairs[-1][0] = f"{pairs[-1][0]} {content}".strip()
            else:
                pairs.append([content, ""])
        elif role == "assistant":
            if not pairs:
                pairs.append(["", content])
            elif pairs[-1][1]:
                pairs[-1][1] = f"{pairs[-1][1]} {content}"
            else:
                pairs[-1][1] = content
    if not pairs or not pairs[-1][0] or pairs[-1][1]:
        raise BadRequest("the last message must be a non-empty user message", "messages")
    return pairs


class Bot:
    """Orchestrates one turn. Holds no per-request state: two requests may run at once."""

    def __init__(self, settings, lm: LM, skills: SkillRegistry, store: Store | None = None):
        self.settings = settings
        self.lm = lm
        self.skills = skills
        self.store = store

    # --------------------------------------------------------------------------------------------- choices
    def skill_for(self, name: str | None) -> Skill:
        name = name or self.settings.default_skill
        try:
            return self.skills.get(name)
        except KeyError:
            raise UnknownSkill(name, [s.name for s in self.skills.all()]) from None

    def check_messages(self, messages: Sequence[dict]) -> None:
        if not messages:
            raise BadRequest("messages must contain at least one message", "messages")
        if len(messages) > self.settings.max_messages:
            raise BadRequest(f"at most {self.settings.max_messages} messages per request", "messages")
        for i, m in enumerate(messages):
            if len(m.get("content") or "") > self.settings.max_message_chars:
                raise BadRequest(
                    f"message {i} has {len(m['content'])} characters; the limit is {self.settings.max_message_chars}",
                    f"messages[{i}].content", "message_too_long")

    # ------------------------------------------------------------------------------------------------ turn
    def turn(
        self,
        messages: Sequence[dict],
        skill: str | None = None,
        sampling: dict | None = None,
        max_tokens: int | None = None,
    ) -> TurnStream:
        """Start a turn over ``messages``; validation errors raise here, before any streaming begins."""
        self.check_messages(messages)
        dialogue = to_dialogue(messages)
        chosen = self.skill_for(skill)
        started = time.perf_counter()
        trace: dict = {"skill": chosen.name, "forced": bool(skill), "steps": []}
        prompt, kept = self._prompt(chosen, dialogue)
        trace["steps"].append({"step": "prompt", "examples": prompt.examples, "dropped_examples": prompt.dropped,
                               "history_turns": kept, "tokens": self.lm.count_tokens(prompt.text),
                               "s": round(time.perf_counter() - started, 4)})
        gen = chosen.generation
        decoding = Sampling(gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty).with_overrides(
            **(sampling or {}))
        limit = max_tokens or gen.max_new_tokens
        stats: dict = {}
        pieces = self.lm.generate(prompt.text, stop=chosen.stop, max_new_tokens=limit, sampling=decoding,
                                  prefix=prompt.prefix, stats=stats)

        def finish(text: str) -> Reply:
            tokens = stats.get("tokens", 0)
            trace["steps"].append({"step": "generate", "tokens": tokens, "finish": stats.get("finish"),
                                   "s": round(time.perf_counter() - started, 4)})
            return Reply(text=text, skill=chosen.name, prompt=prompt.text, trace=trace,
                         finish_reason="length" if stats.get("finish") == "length" else "stop",
                         prompt_tokens=trace["steps"][0]["tokens"], completion_tokens=tokens)

        return TurnStream(_drop_leading_space(pieces), finish)

    def _prompt(self, skill: Skill, dialogue: list[list[str]]):
        """The skill's prompt with the most recent history that fits the context budget."""
        budget = min(self.settings.context_tokens, self.lm.context_length)
        turns = dialogue[-self.settings.history_turns:]
        while True:
            prompt = skill.prompt({"dialogue": turns}, budget_tokens=budget, count_tokens=self.lm.count_tokens)
            if len(turns) == 1 or self.lm.count_tokens(prompt.text) + skill.generation.max_new_tokens <= budget:
                return prompt, len(turns)
            turns = turns[1:]

    # ------------------------------------------------------------------------------------------- sessions
    def chat(self, session_id: str, message: str, skill: str | None = None, **kw) -> TurnStream:
        """A turn in a stored session: the user's message is saved first, the reply with its trace after."""
        if self.store is None:
            raise RuntimeError("this bot has no store")
        session = self.store.session(session_id)
        history = [{"role": m["role"], "content": m["content"]} for m in self.store.messages(session_id)]
        messages = history + [{"role": "user", "content": message}]
        stream = self.turn(messages, skill=skill or session["skill"] or None, **kw)
        self.store.add_message(session_id, "user", message)
        inner = stream._finish

        def finish(text: str) -> Reply:
            reply = inner(text)
            self.store.add_message(session_id, "assistant", text, reply.skill, reply.trace)
            return reply

        stream._finish = finish
        return stream


def _drop_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    """The prompt ends at "Assistant:", so the reply starts with the space the model writes after it; drop that one."""
    first = True
    for piece in pieces:
        if first:
            piece = piece[1:] if piece.startswith(" ") else piece
            first = not piece
        if piece:
            yield piece
