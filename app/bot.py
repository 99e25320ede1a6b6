"""The Few-Shot Bot turn: messages in, a streamed reply out, with a trace that explains it.

    messages -> dialogue pairs -> skill (forced, or the default) -> few-shot prompt within the token budget
             -> streamed reply (LM) -> stored with its trace

`Bot` only orchestrates the value objects (`Skill`, `Prompt`, `LM`, `Store`); each step appends to the turn trace.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .lm import LM, Sampling
from .selector import turn_level
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
    """Orchestrates one turn. Holds no per-request state: two requests may run at once.

    Args:
        settings: `Settings`.
        lm: the `LM` backend.
        skills: the `SkillRegistry`.
        store: sessions and messages (``None``: `turn` works, `chat` does not).
        selector: picks the skill when none is forced (``None``: the default skill answers).
        aligner: the alignment layer for aligned skills and safety refusals (``None``: those use their own prompts).
        knowledge: the retrievers (``None``: skills get no knowledge).
    """

    def __init__(self, settings, lm: LM, skills: SkillRegistry, store: Store | None = None, selector=None,
                 aligner=None, knowledge=None, messages: dict | None = None, safety=None):
        self.settings = settings
        self.lm = lm
        self.skills = skills
        self.store = store
        self.selector = selector
        self.aligner = aligner
        self.knowledge = knowledge
        self.messages = messages or {}
        self.safety = safety

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

    def _select(self, dialogue, forced: str | None, trace: dict) -> Skill:
        started = time.perf_counter()
        last = dialogue[-1][0] if dialogue else ""
        triggered = None if forced else self._triggered(last)
        if forced:
            skill = self.skill_for(forced)
            trace["selection"] = {"skill": skill.name, "method": "forced", "forced": True, "scores": {}}
        elif triggered is not None:
            skill, pattern = triggered
            trace["selection"] = {"skill": skill.name, "method": "trigger", "trigger": pattern, "forced": False,
                                  "scores": {}}
        elif (first := self._safety_check(last, trace)) is not None:
            skill = first
            trace["selection"] = {"skill": skill.name, "method": "safety" if skill.kind == "safety" else "last-turn",
                                  "forced": False, "scores": trace["safety"]["scores"]}
        elif self.selector is not None:
            selection = self.selector.select(dialogue)
            skill = self.skill_for(selection.skill)
            trace["selection"] = selection.trace()
        else:
            skill = self.skill_for(None)
            trace["selection"] = {"skill": skill.name, "method": "default", "forced": False, "scores": {}}
        _step(trace, "select", started, skill=skill.name)
        return skill

    def _triggered(self, message: str) -> tuple[Skill, str] | None:
        """A skill whose ``triggers`` match the user's message (safety skills first), with the matching pattern."""
        skills = self.skills.all(kind="safety") + self.skills.all(kind="response")
        for skill in skills:
            pattern = skill.triggered_by(message) if message else None
            if pattern is not None:
                return skill, pattern
        return None

    def flagged(self, message: str) -> Skill | None:
        """The safety skill that would decline ``message`` as a turn of its own (a trigger or the first stage)."""
        triggered = self._triggered(message)
        if triggered is not None:
            return triggered[0] if triggered[0].kind == "safety" else None
        winner = self._safety_check(message, {"steps": []})
        return winner if winner is not None and winner.kind == "safety" else None

    def _safety_check(self, message: str, trace: dict) -> Skill | None:
        """Score the user's last message alone against the safety and response skills.

        Some winners are taken from here, because the history must not outvote them (`app.selector.turn_level`): a
        safety skill (the turn is declined), an aligned skill such as the general assistant (a one-off instruction or
        question, answered by the alignment layer) and a knowledge skill (a question about something new). Any other
        winner returns None and the history-based selector decides.
        """
        if self.safety is None or not message.strip():
            return None
        started = time.perf_counter()
        selection = self.safety.select([[message, ""]])
        winner = self.skills.get(selection.skill) if selection.skill in self.skills else None
        flagged = winner is not None and winner.kind == "safety"
        takes = winner is not None and turn_level(winner)
        trace["safety"] = {"skill": selection.skill, "flagged": flagged,
                           "scores": {k: round(v, 4) for k, v in selection.scores.items()}}
        _step(trace, "safety", started, skill=selection.skill, flagged=flagged)
        return winner if takes else None

    # ------------------------------------------------------------------------------------------------ turn
    def turn(
        self,
        messages: Sequence[dict],
        skill: str | None = None,
        sampling: dict | None = None,
        max_tokens: int | None = None,
        user: str = "",
    ) -> TurnStream:
        """Start a turn over ``messages``; validation errors raise here, before any streaming begins.

        safety / selection -> parser skill (query) -> retriever -> response skill or alignment layer -> stream
        """
        self.check_messages(messages)
        dialogue = to_dialogue(messages)
        trace: dict = {"steps": []}
        chosen = self._select(dialogue, skill, trace)
        trace["skill"] = chosen.name
        trace["forced"] = bool(skill)
        stats: dict = {}
        passages: list = []
        notice = ""
        if chosen.kind == "safety" and self.aligner is not None:
            pieces, prompt_text, limit = self._aligned(messages, sampling, max_tokens, stats, trace,
                                                       refusal=chosen.description)
        else:
            fields: dict = {"dialogue": dialogue[-self.settings.history_turns:]}
            query = self._query(chosen, dialogue, trace)
            if chosen.retriever != "none" and self.knowledge is not None:
                started = time.perf_counter()
                got = self.knowledge.fetch(chosen.retriever, query, user, self._markers())
                fields.update(got.fields)
                passages = [_passage_dict(p) for p in got.passages]
                _step(trace, "retrieve", started, retriever=chosen.retriever, query=query, passages=passages,
                      error=got.error)
                if got.error and chosen.retriever == "web":
                    notice = self.messages.get("web_search_failed", "")
            if chosen.aligned and self.aligner is not None:
                pieces, prompt_text, limit = self._aligned(messages, sampling, max_tokens, stats, trace)
            else:
                pieces, prompt_text, limit = self._respond(chosen, fields, sampling, max_tokens, stats, trace)
        started = time.perf_counter()
        trace["passages"] = passages

        def finish(text: str) -> Reply:
            tokens = stats.get("tokens", 0)
            _step(trace, "generate", started, tokens=tokens, finish=stats.get("finish"))
            reply = Reply(text=text, skill=chosen.name, prompt=prompt_text, passages=passages, trace=trace,
                          finish_reason="length" if stats.get("finish") == "length" else "stop",
                          prompt_tokens=trace.get("prompt_tokens", 0), completion_tokens=tokens)
            if user and self.knowledge is not None and self.settings.memory and chosen.kind != "safety":
                self._remember(user, dialogue, trace)
            return reply

        stream = _with_notice(notice, _drop_leading_space(pieces))
        return TurnStream(stream, finish)

    def _markers(self) -> list[str]:
        """Every layout marker a retrieved page could imitate: speaker labels and header lines of all skill
        templates, and the alignment layer's block markers. Retrieved text has them broken (see `neutralise`)."""
        found = set()
        for skill in self.skills.all():
            found.update({skill.speakers.user + ":", skill.speakers.bot + ":"})
            found.update(line.strip() for line in skill.template.splitlines()
                         if line.strip().endswith(":") and "{" not in line and len(line.strip()) <= 40)
        if self.aligner is not None:
            found.update(m.strip() for m in self.aligner.prompt.leak_markers if m.strip())
        return sorted(found, key=len, reverse=True)

    def _query(self, skill: Skill, dialogue, trace: dict) -> str:
        """The retriever's query: the parser skill's output, or the user's last turn."""
        last = dialogue[-1][0]
        if not skill.query_skill or skill.query_skill not in self.skills:
            return last
        parser = self.skills.get(skill.query_skill)
        started = time.perf_counter()
        text = self._run_parser(parser, dialogue)
        _step(trace, "parse", started, skill=parser.name, output=text)
        return text.strip() or last

    def _run_parser(self, parser: Skill, dialogue) -> str:
        turns = [list(t) for t in dialogue[-self.settings.history_turns:]]
        prompt = parser.prompt({"dialogue": turns}, budget_tokens=self._budget(),
                               count_tokens=self.lm.count_tokens)
        g = parser.generation
        return "".join(self.lm.generate(prompt.text, stop=parser.stop, max_new_tokens=g.max_new_tokens,
                                        sampling=Sampling(g.temperature, g.top_p, g.top_k, g.repetition_penalty),
                                        prefix=prompt.prefix))

    def _remember(self, user: str, dialogue, trace: dict) -> None:
        """The persona-extraction parser reads the user's turn; the facts it finds go to long-term memory."""
        name = self.settings.memory_skill
        if name not in self.skills:
            return
        started = time.perf_counter()
        split = self.messages.get("fact_split", r"(?<=[.!?])\s+")
        # Questions reveal nothing lasting about the user: only the message's statements go to the parser.
        statements = [x.strip() for x in re.split(split, dialogue[-1][0].strip()) if x.strip()
                      and not x.strip().endswith("?")]
        if not statements:
            _step(trace, "remember", started, facts=[], added=0, skipped="no statements in the message")
            return
        try:
            text = self._run_parser(self.skills.get(name), [[" ".join(statements), ""]])
            no_facts = {x.lower() for x in self.messages.get("no_facts", ["none"])}
            keep = re.compile(self.messages.get("fact_keep", r"^(i|my|i'm|i've|i'd|i'll)\b"), re.IGNORECASE)
            found = [f.strip() for f in re.split(split, text.strip()) if f.strip()
                     and f.strip().rstrip(".").lower() not in no_facts]
            facts = [f for f in found if keep.search(f)]
            added = self.knowledge.remember(user, facts)
            _step(trace, "remember", started, facts=facts, added=len(added),
                  dropped=[f for f in found if f not in facts] or None)
        except Exception as exc:  # noqa: BLE001 - memory is best effort; the reply already went out
            log.warning("memory update failed: %s", exc)
            _step(trace, "remember", started, error=str(exc))

    def _budget(self) -> int:
        return min(self.settings.context_tokens, self.lm.context_length)

    def _respond(self, skill: Skill, fields: dict, sampling, max_tokens, stats, trace):
        started = time.perf_counter()
        prompt, kept = self._prompt(skill, fields)
        trace["prompt_tokens"] = self.lm.count_tokens(prompt.text)
        _step(trace, "prompt", started, examples=prompt.examples, dropped_examples=prompt.dropped,
              history_turns=kept, tokens=trace["prompt_tokens"])
        gen = skill.generation
        decoding = Sampling(gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty).with_overrides(
            **(sampling or {}))
        limit = max_tokens or gen.max_new_tokens
        pieces = self.lm.generate(prompt.text, stop=skill.stop, max_new_tokens=limit, sampling=decoding,
                                  prefix=prompt.prefix, stats=stats)
        return pieces, prompt.text, limit

    def _aligned(self, messages, sampling, max_tokens, stats, trace, refusal: str | None = None):
        """The alignment layer answers (or, for a safety skill, declines in the assistant's own style)."""
        started = time.perf_counter()
        convo = [(m["role"], m["content"]) for m in messages if m["role"] in ("user", "assistant")]
        overrides = {k: v for k, v in (sampling or {}).items() if v is not None}
        if max_tokens:
            overrides["max_new_tokens"] = max_tokens
        streamed = (self.aligner.refuse(convo, refusal, overrides) if refusal is not None
                    else self.aligner.answer(convo, overrides))
        reply = streamed.reply
        trace["prompt_tokens"] = self.lm.count_tokens(reply.prompt.text)
        _step(trace, "align", started, refusal=refusal is not None, tokens=trace["prompt_tokens"])

        def pieces():
            yield from streamed
            stats.update(tokens=self.lm.count_tokens(reply.text), finish=reply.finish or "stop")

        return pieces(), reply.prompt.text, reply.max_new_tokens

    def _prompt(self, skill: Skill, fields: dict):
        """The skill's prompt with the most recent history that fits the context budget."""
        budget = self._budget()
        turns = fields["dialogue"]
        while True:
            prompt = skill.prompt({**fields, "dialogue": turns}, budget_tokens=budget,
                                  count_tokens=self.lm.count_tokens)
            if len(turns) == 1 or self.lm.count_tokens(prompt.text) + skill.generation.max_new_tokens <= budget:
                return prompt, len(turns)
            turns = turns[1:]

    # ------------------------------------------------------------------------------------------- sessions
    def chat(self, session_id: str, message: str, skill: str | None = None, user: str | None = None,
             **kw) -> TurnStream:
        """A turn in a stored session: the user's message is saved first, the reply with its trace after."""
        if self.store is None:
            raise RuntimeError("this bot has no store")
        session = self.store.session(session_id)
        history = [{"role": m["role"], "content": m["content"]} for m in self.store.messages(session_id)]
        messages = history + [{"role": "user", "content": message}]
        stream = self.turn(messages, skill=skill or session["skill"] or None,
                           user=session["user"] if user is None else user, **kw)
        self.store.add_message(session_id, "user", message)
        inner = stream._finish

        def finish(text: str) -> Reply:
            reply = inner(text)
            self.store.add_message(session_id, "assistant", text, reply.skill, reply.trace)
            return reply

        stream._finish = finish
        return stream


def _step(trace: dict, name: str, started: float, **info) -> None:
    trace["steps"].append({"step": name, **{k: v for k, v in info.items() if v is not None},
                           "s": round(time.perf_counter() - started, 4)})


def _passage_dict(p) -> dict:
    return {"text": p.text, "source": p.source, "title": p.title, "score": round(float(p.score), 4),
            "untrusted": bool(p.meta.get("untrusted", False))}


def _with_notice(notice: str, pieces: Iterator[str]) -> Iterator[str]:
    if notice:
        yield notice + " "
    yield from pieces


def _drop_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    """The prompt ends at "Assistant:", so the reply starts with the space the model writes after it; drop that one."""
    first = True
    for piece in pieces:
        if first:
            piece = piece[1:] if piece.startswith(" ") else piece
            first = not piece
        if piece:
            yield piece
