"""The Few-Shot Bot turn: messages in, a streamed reply out, with a trace that explains it.

    messages -> dialogue pairs -> route (`app.router`) -> parser -> retriever -> few-shot prompt within the token
             budget -> streamed reply (LM) -> stored with its trace -> memory extraction, after the reply

`Bot` only orchestrates the value objects (`Skill`, `Prompt`, `LM`, `Store`); each step appends to the turn trace.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .knowledge import kb_query
from .lm import LM, Sampling
from .lm.base import cut_at_stops
from .router import Route, Router
from .router import UnknownSkill as RouterUnknownSkill
from .skills import Skill, SkillRegistry, context_budget
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
    message_id: int | None = None  # the stored reply's row, for a turn in a session


class Activity:
    """Which turns are still before their first token (from their first routing step on), so background work (memory
    extraction) can wait until none is: routing, parsing and prefill hold the model for seconds, while generation
    shares its forward passes (continuous batching), so extraction that starts once every turn in flight is decoding
    costs those users little. Streams are held weakly: one dropped without being read stops counting when it is
    collected."""

    def __init__(self, settle_s: float = 0.2, limit_s: float = 10.0):
        self.settle_s, self.limit_s = settle_s, limit_s
        self._live: "weakref.WeakSet[TurnStream]" = weakref.WeakSet()
        self._starting: "weakref.WeakSet[TurnStream]" = weakref.WeakSet()  # no text out yet
        self._lock = threading.Lock()
        self._last_change = time.monotonic()

    def start(self, stream: "TurnStream") -> None:
        with self._lock:
            self._live.add(stream)
            self._starting.add(stream)

    def first_piece(self, stream: "TurnStream") -> None:
        with self._lock:
            self._starting.discard(stream)
            self._last_change = time.monotonic()

    def end(self, stream: "TurnStream") -> None:
        with self._lock:
            self._live.discard(stream)
            self._starting.discard(stream)
            self._last_change = time.monotonic()

    @property
    def busy(self) -> int:
        """Turns in flight."""
        with self._lock:
            return len(self._live)

    @property
    def starting(self) -> int:
        """Turns in flight that have not streamed their first piece."""
        with self._lock:
            return len(self._starting)

    def wait_quiet(self, urgent: threading.Event | None = None) -> float:
        """Block until no turn has been before its first token for ``settle_s`` (or ``limit_s`` passed, or
        ``urgent`` is set); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < self.limit_s and not (urgent is not None and urgent.is_set()):
            with self._lock:
                quiet = not self._starting and time.monotonic() - self._last_change >= self.settle_s
            if quiet:
                break
            time.sleep(0.02)
        return time.monotonic() - started


@dataclass(eq=False)
class _MemoryJob:
    """A queued memory extraction: whose, the event that lets it skip waiting for a quiet moment, its future."""

    user: str
    urgent: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None


class _BeforeStream:
    """A turn's place in `Activity` while it routes, parses and retrieves, before its `TurnStream` exists."""


class TurnStream:
    """Iterate for the reply's text pieces; afterwards ``.reply`` holds the whole `Reply`.

    ``on_reply(fn)`` adds a step that runs with the `Reply` once the last piece is out (storing it, say), before the
    iteration ends; work that must not hold the reply (memory extraction) is handed to ``after`` and runs once
    every such step is done, off the caller's thread.
    """

    def __init__(self, pieces: Iterator[str], finish: Callable[[str], Reply],
                 after: Callable[[Reply], None] | None = None, ended: Callable[[], None] | None = None,
                 first: Callable[[], None] | None = None):
        self._pieces = pieces
        self._finish = finish
        self._steps: list[Callable[[Reply], None]] = []
        self._after = after
        self._ended = ended  # called once, when the reply is out or the stream was closed
        self._first = first  # called once, with the first piece of text
        self.reply: Reply | None = None

    def on_reply(self, step: Callable[[Reply], None]) -> "TurnStream":
        self._steps.append(step)
        return self

    def __iter__(self) -> Iterator[str]:
        parts: list[str] = []
        spent = False
        try:
            for piece in self._pieces:
                if self._first is not None:
                    first, self._first = self._first, None
                    first()
                parts.append(piece)
                yield piece
            spent = True
        finally:
            if not spent:  # the consumer stopped early (a client went away): stop the model too
                self.close()
        try:
            reply = self._finish("".join(parts))
            for step in self._steps:
                step(reply)
            self.reply = reply
        finally:
            self._end()
        if self._after is not None:
            self._after(reply)

    def close(self) -> None:
        """Stop generating (the client went away): the model's stream is closed, nothing is stored."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        self._end()

    def _end(self) -> None:
        ended, self._ended = self._ended, None
        if ended is not None:
            ended()

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
        selector: the history selector (``None``: the default skill answers unless a stage before it decides).
        safety: the selector that scores the last message alone against safety and response skills.
        router: the `Router` (built from ``selector`` and ``safety`` when not given).
        aligner: the alignment layer for aligned skills and safety refusals (``None``: those use their own prompts).
        knowledge: the retrievers (``None``: skills get no knowledge).
    """

    def __init__(self, settings, lm: LM, skills: SkillRegistry, store: Store | None = None, selector=None,
                 aligner=None, knowledge=None, messages: dict | None = None, safety=None, router: Router | None = None):
        self.settings = settings
        self.lm = lm
        self.skills = skills
        self.store = store
        self.router = router or Router(skills, selector=selector, first_stage=safety,
                                       default_skill=settings.default_skill,
                                       forced_safety=getattr(settings, "forced_safety", True))
        self.aligner = aligner
        self.knowledge = knowledge
        self.messages = messages or {}
        # Memory extraction runs after a reply is out, one job at a time, in this thread.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsb-memory")
        # ... once no turn in flight is still before its first token (see `Activity`).
        self.activity = Activity()
        self._queued: list[_MemoryJob] = []  # jobs not finished yet, in the worker's order
        self._pending_lock = threading.Lock()  # guards _queued

    @property
    def selector(self):
        """The history selector (the router's stage 5)."""
        return self.router.selector

    @selector.setter
    def selector(self, value) -> None:
        self.router.selector = value

    @property
    def safety(self):
        """The last-message selector over safety and response skills (the router's stage 4)."""
        return self.router.first_stage

    @safety.setter
    def safety(self, value) -> None:
        self.router.first_stage = value

    # --------------------------------------------------------------------------------------------- choices
    def skill_for(self, name: str | None) -> Skill:
        try:
            return self.router.skill(name)
        except RouterUnknownSkill:
            raise UnknownSkill(name or self.settings.default_skill, [s.name for s in self.skills.all()]) from None

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

    def route(self, dialogue, forced: str | None = None) -> Route:
        """The router's decision for the open turn (see `app.router`)."""
        try:
            return self.router.route(dialogue, forced)
        except RouterUnknownSkill as exc:
            raise UnknownSkill(exc.name, [s.name for s in self.skills.all()]) from None

    def flagged(self, message: str) -> Skill | None:
        """The safety skill that would decline ``message`` as a turn of its own (see `Router.flagged`)."""
        return self.router.flagged(message)

    # ------------------------------------------------------------------------------------------------ turn
    def turn(
        self,
        messages: Sequence[dict],
        skill: str | None = None,
        sampling: dict | None = None,
        max_tokens: int | None = None,
        user: str = "",
        stop: Sequence[str] = (),
    ) -> TurnStream:
        """Start a turn over ``messages``; validation errors raise here, before any streaming begins.

        route -> parser skill (its output fills the field it targets) -> retriever -> response skill or alignment
        layer -> stream; facts the user revealed go to long-term memory after the reply is out. ``stop``: the
        caller's stop strings (OpenAI's ``stop``): the reply ends before the first one, and so does the generation.
        """
        self.check_messages(messages)
        dialogue = self._without_notices(to_dialogue(messages))
        if skill is not None:
            self.skill_for(skill)  # an unknown skill is the caller's error, before any work
        # The turn counts as waiting for its first token from here, not from its stream: routing, parsing and prefill
        # are the work that background memory extraction must not slow down.
        before_stream = _BeforeStream()
        self.activity.start(before_stream)
        try:
            return self._turn(dialogue, messages, skill, sampling, max_tokens, user, [s for s in stop if s])
        finally:
            self.activity.end(before_stream)  # the stream (started before this) holds the place now

    def _turn(self, dialogue, messages, skill, sampling, max_tokens, user, stop: list[str]) -> TurnStream:
        trace: dict = {"steps": []}
        started = time.perf_counter()
        route = self.route(dialogue, skill)
        chosen = route.skill
        trace["selection"] = route.trace()
        if route.first_stage is not None:  # the last-message stage's own time, apart from the rest of routing
            first = route.first_stage
            trace["safety"] = first
            trace["steps"].append({"step": "safety", "skill": first["skill"], "flagged": first["flagged"],
                                   "s": first["latency_s"]})
        _step(trace, "select", started, skill=chosen.name, method=route.method, overruled=route.overruled)
        trace["skill"] = chosen.name
        trace["forced"] = bool(skill)
        stats: dict = {}
        passages: list = []
        notice = ""
        if chosen.kind == "safety" and self.aligner is not None:
            pieces, prompt_text, limit = self._aligned(messages, sampling, max_tokens, stats, trace,
                                                       refusal=chosen.description)
        else:
            messages, declined = self._without_declines(messages)
            if declined:
                trace["declined_exchanges_left_out"] = declined
                dialogue = self._without_notices(to_dialogue(messages))
            fields: dict = {"dialogue": dialogue[-self.settings.history_turns:]}
            if user and chosen.retriever == "memory":
                self.wait_for_memory(user, timeout=3.0)  # read your own writes, briefly: the last turn's facts
            parsed = self._parse(chosen, dialogue, trace)
            query = kb_query(dialogue) if chosen.retriever == "kb" else dialogue[-1][0]
            if parsed is not None:
                target, text = parsed
                if target == "query":
                    query = text or query
                elif text:
                    fields[target] = text
            if chosen.retriever != "none" and self.knowledge is not None:
                started = time.perf_counter()
                got = self.knowledge.fetch(chosen.retriever, query, user, self._markers())
                fields.update(got.fields)
                passages = [_passage_dict(p) for p in got.passages]
                _step(trace, "retrieve", started, retriever=chosen.retriever, query=query, passages=passages,
                      error=got.error, **got.note)
                if got.error and chosen.retriever == "web":
                    if asks_for_information(dialogue[-1][0], self.messages):
                        notice = self.messages.get("web_search_failed", "")
                    else:  # "Haha, my cat does that too." has no answer to vouch for; the trace keeps the error
                        trace["steps"][-1]["notice"] = "left out: the message asks for nothing"
            if chosen.aligned and self.aligner is not None:
                pieces, prompt_text, limit = self._aligned(messages, sampling, max_tokens, stats, trace)
            else:
                pieces, prompt_text, limit = self._respond(chosen, fields, sampling, max_tokens, stats, trace)
        started = time.perf_counter()
        trace["passages"] = passages

        def finish(text: str) -> Reply:
            tokens = stats.get("tokens", 0)
            _step(trace, "generate", started, tokens=tokens, finish=stats.get("finish"),
                  first_token_s=stats.get("ttft_s"), echo_retried=stats.get("echo_retried"))
            return Reply(text=text, skill=chosen.name, prompt=prompt_text, passages=passages, trace=trace,
                         finish_reason="length" if stats.get("finish") == "length" else "stop",
                         prompt_tokens=trace.get("prompt_tokens", 0), completion_tokens=tokens)

        remember = (user and self.knowledge is not None and self.settings.memory and chosen.kind != "safety"
                    and self.settings.memory_skill in self.skills)
        after = (lambda reply: self._remember_later(user, dialogue, reply)) if remember else None
        stream = _with_notice(notice, _drop_leading_space(pieces))
        if stop:
            stream = cut_at_stops(stream, stop)
        out = TurnStream(stream, finish, after, ended=lambda: self.activity.end(out),
                         first=lambda: self.activity.first_piece(out))
        self.activity.start(out)
        return out

    def _without_notices(self, dialogue: list[list[str]]) -> list[list[str]]:
        """The dialogue with the bot's own notices ("I couldn't search the web…") taken out of its earlier replies:
        they are the bot's words about a turn, not the conversation, and a model that sees them copies them."""
        notices = [n for n in (self.messages.get(k) for k in NOTICES) if isinstance(n, str) and n.strip()]
        out = []
        for user, bot in dialogue:
            for n in notices:
                if bot.startswith(n):
                    bot = bot[len(n):].lstrip()
            out.append([user, bot])
        return out

    def _refusal_start(self) -> str:
        """The words every refusal of the alignment layer opens with ("" without the layer)."""
        return (self.aligner.prompt.refusal.answer_start.strip() if self.aligner is not None else "")

    def _without_declines(self, messages: Sequence[dict]) -> tuple[list[dict], int]:
        """The messages without their earlier declined exchanges (a request and the refusal that answered it), and how
        many were left out. A base model that sees "I'm sorry, but I can't help with that" in the history refuses the
        next harmless question too ("What's the capital of France?" -> "I'm sorry, that sounds like a really bad
        question."); the exchange tells a non-safety skill nothing it needs. The open last turn always stays."""
        start = self._refusal_start()
        kept: list[dict] = []
        left_out = 0
        for m in messages:
            if start and m.get("role") == "assistant" and (m.get("content") or "").lstrip().startswith(start):
                while kept and kept[-1].get("role") == "user":
                    kept.pop()
                left_out += 1
                continue
            kept.append(m)
        return (kept, left_out) if left_out else (list(messages), 0)

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

    def _parse(self, skill: Skill, dialogue, trace: dict) -> tuple[str, str] | None:
        """Run the skill's parser (``query_skill``): its output and the field it fills (the parser's ``target``)."""
        if not skill.query_skill or skill.query_skill not in self.skills:
            return None
        parser = self.skills.get(skill.query_skill)
        started = time.perf_counter()
        text = self._run_parser(parser, dialogue).strip()
        _step(trace, "parse", started, skill=parser.name, target=parser.target, output=text)
        return parser.target, text

    def _run_parser(self, parser: Skill, dialogue) -> str:
        return run_parser(parser, self.lm, dialogue, self._budget(), self.settings.history_turns)

    # --------------------------------------------------------------------------------------------- memory
    def _remember_later(self, user: str, dialogue, reply: Reply) -> None:
        """Queue fact extraction for after the reply; its step joins the turn's trace (and the stored one)."""
        entry = _MemoryJob(user)

        def job():
            try:
                waited = self.activity.wait_quiet(entry.urgent)  # turns waiting for their first token go first
                self._remember(user, dialogue, reply.trace, waited)
                if reply.message_id is not None and self.store is not None:
                    self.store.set_trace(reply.message_id, reply.trace)
            finally:
                with self._pending_lock:
                    self._queued.remove(entry)

        with self._pending_lock:  # the job's own removal waits for this, so it never misses its entry
            entry.future = self._background.submit(_logged(job))
            self._queued.append(entry)

    def wait_for_memory(self, user: str | None = None, timeout: float = 30.0) -> None:
        """Wait until queued memory extraction (for ``user``, or everyone) is done; it starts at once, without
        waiting for a quiet moment, and so do the jobs queued before it (one worker runs them in order)."""
        with self._pending_lock:
            last = max((i for i, j in enumerate(self._queued) if user is None or j.user == user), default=-1)
            ahead = self._queued[:last + 1]
            for j in ahead:
                j.urgent.set()
        if ahead:  # one worker runs the jobs in order: when the last of them is done, so are the others
            try:
                ahead[-1].future.result(timeout=timeout)
            except Exception:  # noqa: BLE001 - logged by the job itself (or timed out); a read goes on without it
                pass

    def close(self) -> None:
        self._background.shutdown(wait=True)

    # ---------------------------------------------------------------------------------------------- warming
    def constant_prefixes(self) -> list[tuple[str, str]]:
        """Every constant prompt head a turn can use, as (what, text): each selectable skill's selector prompt,
        each response and parser skill's few-shot examples, the alignment layer's two heads. A turn whose prefixes
        are all cached pays only for its own new tokens."""
        out: list[tuple[str, str]] = []
        for stage in (self.router.first_stage, self.router.selector):
            if stage is not None and stage.prompt is not None:
                out += [(f"selector:{c.name}", stage.prompt.prefix(c)) for c in stage.source()]
        probe = {"dialogue": [["hello", ""]]}
        for skill in self.skills.all(kind="response") + self.skills.all(kind="parser"):
            try:
                out.append((f"skill:{skill.name}", skill.prompt(probe,
                                                                budget_tokens=self._budget(),
                                                                count_tokens=self.lm.count_tokens).prefix))
            except Exception as exc:  # noqa: BLE001 - a skill that cannot render now is reported on its turn
                log.debug("not warming %s: %s", skill.name, exc)
        if self.aligner is not None:
            out += [("align", p) for p in {self.aligner.prefix, self.aligner.answer_prefix}]
        seen: set[str] = set()
        return [(what, text) for what, text in out if text and not (text in seen or seen.add(text))]

    def warm(self, progress: Callable[[int, int, str], None] | None = None) -> int:
        """Encode every constant prefix into the model's prefix cache, and the selectors' example embeddings.

        Returns how many prefixes were encoded. Safe to run while turns are served (the cache is shared); it pauses
        between prefixes while a turn waits for its first token (`Activity.wait_quiet`)."""
        # In the order a turn arriving meanwhile needs them: the first stage's vote pools (every turn), the history
        # selector's example embeddings (every turn the first stage passes on), the first stage's scored prompts and
        # their content-free scores (turns its votes leave open), then every other prompt head.
        first, selector = self.router.first_stage, self.router.selector
        calibrated = first is not None and hasattr(first, "pools")
        if calibrated:
            first.pools(list(first.source()))
        for stage in (selector, None if calibrated else first):
            if stage is not None and stage.embedding is not None and stage.method != "prompt":
                stage.embedding.warm(list(stage.source()))
        if calibrated:
            first.warm()  # its pools are cached by now: the scored prompts and their content-free scores
        prefixes = self.constant_prefixes() if hasattr(self.lm, "score_prefixes") else []
        for i, (what, text) in enumerate(prefixes, 1):
            # A turn that arrives while the server warms goes first: it encodes the few prefixes it needs itself
            # instead of taking turns with the rest of the warm-up for the model.
            self.activity.wait_quiet()
            self.lm.score_prefixes([text], " ")
            if progress is not None:
                progress(i, len(prefixes), what)
        return len(prefixes)

    def _remember(self, user: str, dialogue, trace: dict, waited_s: float = 0.0) -> None:
        """The persona-extraction parser reads the user's turn; the facts it finds go to long-term memory.
        ``waited_s``: how long the job waited for a quiet moment (in the step's trace)."""
        name = self.settings.memory_skill
        if name not in self.skills:
            return
        started = time.perf_counter()

        def note(**info):  # the remember step, with how long it waited for a quiet moment
            _step(trace, "remember", started, waited_s=round(waited_s, 3), **info)

        statements = memory_statements(dialogue[-1][0], self.messages)
        if not statements:
            note(facts=[], added=0, skipped="no statements in the message")
            return
        try:
            text = self._run_parser(self.skills.get(name), [[statements, ""]])
            found, facts = memory_facts(text, statements, self.messages)
            added = self.knowledge.remember(user, facts)
            note(facts=facts, added=len(added), dropped=[f for f in found if f not in facts] or None)
        except Exception as exc:  # noqa: BLE001 - memory is best effort; the reply already went out
            log.warning("memory update failed: %s", exc)
            note(error=str(exc))

    # ------------------------------------------------------------------------------------------- prompting
    def _budget(self) -> int:
        return context_budget(self.settings, self.lm)

    def _respond(self, skill: Skill, fields: dict, sampling, max_tokens, stats, trace):
        started = time.perf_counter()
        limit = max_tokens or skill.generation.max_new_tokens
        prompt, kept = self._prompt(skill, fields, limit)
        trace["prompt_tokens"] = self.lm.count_tokens(prompt.text)
        shown = {k: v for k, v in fields.items() if k != "dialogue" and isinstance(v, str)}
        _step(trace, "prompt", started, examples=prompt.examples, dropped_examples=prompt.dropped,
              history_turns=kept, tokens=trace["prompt_tokens"], fields=shown or None)
        gen = skill.generation
        decoding = Sampling(gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty).with_overrides(
            **(sampling or {}))
        earlier = tuple(bot for _, bot in fields["dialogue"][-kept:] if bot)  # the bot's replies the prompt shows
        if gen.avoid_repeats and earlier:
            decoding = dataclasses.replace(decoding, avoid=earlier)
        pieces = self.lm.generate(prompt.text, stop=skill.stop, max_new_tokens=limit, sampling=decoding,
                                  prefix=prompt.prefix, stats=stats)
        return pieces, prompt.text, limit

    def _aligned(self, messages, sampling, max_tokens, stats, trace, refusal: str | None = None):
        """The alignment layer answers (or, for a safety skill, declines in the assistant's own style)."""
        started = time.perf_counter()
        convo = [(m["role"], m["content"]) for m in messages if m["role"] in ("user", "assistant")]
        while convo and convo[0][0] != "user":  # an opening assistant greeting has no query to pair with
            convo.pop(0)
        overrides = {k: v for k, v in (sampling or {}).items() if v is not None}
        if max_tokens:
            overrides["max_new_tokens"] = max_tokens
        streamed = (self.aligner.refuse(convo, refusal, overrides) if refusal is not None
                    else self.aligner.answer(convo, overrides))
        reply = streamed.reply
        trace["prompt_tokens"] = self.lm.count_tokens(reply.prompt.text)
        _step(trace, "align", started, refusal=refusal is not None, tokens=trace["prompt_tokens"])

        def pieces():
            try:
                yield from streamed
            finally:
                close = getattr(streamed, "close", None)
                if close is not None:
                    close()
            stats.update(tokens=self.lm.count_tokens(reply.text), finish=reply.finish or "stop")
            if reply.echo_retried:  # the first answer only repeated the message (`app.align.opening_echo`)
                stats["echo_retried"] = True

        return pieces(), reply.prompt.text, reply.max_new_tokens

    def _prompt(self, skill: Skill, fields: dict, max_new_tokens: int):
        """The skill's prompt with the most recent history that fits the context budget."""
        budget = self._budget()
        turns = fields["dialogue"]
        while True:
            prompt = skill.prompt({**fields, "dialogue": turns}, budget_tokens=budget,
                                  count_tokens=self.lm.count_tokens, max_new_tokens=max_new_tokens)
            if len(turns) == 1 or self.lm.count_tokens(prompt.text) + max_new_tokens <= budget:
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

        def store(reply: Reply) -> None:
            reply.message_id = self.store.add_message(session_id, "assistant", reply.text, reply.skill, reply.trace)

        return stream.on_reply(store)


FACT_SPLIT = r"(?<=[.!?])\s+"  # prompts/messages.yaml's fact_split, when a messages file lacks it


def memory_statements(message: str, messages: dict) -> str:
    """What of a user's message goes to the memory parser: its statements (questions reveal nothing lasting about the
    user), joined; "" when there are none."""
    split = messages.get("fact_split", FACT_SPLIT)
    return " ".join(x.strip() for x in re.split(split, message.strip()) if x.strip() and not x.strip().endswith("?"))


def memory_facts(text: str, statements: str, messages: dict) -> tuple[list[str], list[str]]:
    """(everything the memory parser wrote, the facts kept): first-person sentences (``fact_keep``) that share a word
    with what the user said (``fact_words``, ``fact_ignore``). The second check drops what the parser copies from its
    own examples: "Hi!" came back as "I am a student. I take care of my grandmother."."""
    split = messages.get("fact_split", FACT_SPLIT)
    no_facts = {x.lower() for x in messages.get("no_facts", ["none"])}
    keep = re.compile(messages.get("fact_keep", r"^(i|my|i'm|i've|i'd|i'll)\b"), re.IGNORECASE)
    found = [f.strip() for f in re.split(split, text.strip()) if f.strip()
             and f.strip().rstrip(".").lower() not in no_facts]
    said = _content_words(statements, messages)
    return found, [f for f in found if keep.search(f) and _content_words(f, messages) & said]


def _content_words(text: str, messages: dict) -> set[str]:
    ignore = set(messages.get("fact_ignore", []))
    words = re.findall(messages.get("fact_words", r"[a-z0-9]+"), text.lower())
    return {w[:5] for w in words if w not in ignore and (len(w) >= 3 or w.isdigit())}


def run_parser(parser: Skill, lm: LM, dialogue, budget_tokens: int, history_turns: int) -> str:
    """A parser skill's output for the recent ``dialogue``: the one way a parser runs, in a turn and in
    ``fsb eval skill --chain``."""
    turns = [list(t) for t in dialogue[-history_turns:]]
    prompt = parser.prompt({"dialogue": turns}, budget_tokens=budget_tokens, count_tokens=lm.count_tokens)
    return parser_output(parser, lm, prompt)


def parser_output(parser: Skill, lm: LM, prompt) -> str:
    """Generate a parser's output for its built ``prompt`` (greedy, its stops and budget), stopping at a loop.

    A parser whose output copies its prompt (the dialogue state: slot names, the user's values) asks for prompt-lookup
    decoding (``generation.lookup``), where the backend has it (app/lm/lookup.py): the same greedy text, fewer passes.
    Only a class's own method counts: a wrapper that overrides ``generate`` and delegates the rest must keep the call.

    A small greedy model sometimes falls into a loop (``[Jane Austen, ~writer, Jane Austen, Jane Austen, ...`` until
    the token limit): generation stops as soon as the output repeats its last words (`loop_cut`), and the copy is
    dropped, which saves the rest of the budget and keeps the junk out of the retriever's query.
    """
    g = parser.generation
    lookup = g.lookup and getattr(type(lm), "generate_lookup", None) is not None
    generate = lm.generate_lookup if lookup else lm.generate
    pieces = generate(prompt.text, stop=parser.stop, max_new_tokens=g.max_new_tokens,
                      sampling=Sampling(g.temperature, g.top_p, g.top_k, g.repetition_penalty), prefix=prompt.prefix)
    text = ""
    try:
        for piece in pieces:
            text += piece
            cut = loop_cut(text)
            if cut is not None:
                text = cut
                break
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a generation left early frees its row (the batch scheduler) or its stream (a remote engine)
    return text.strip()


_WORD = re.compile(r"\S+")


def loop_cut(text: str, min_words: int = 2, min_chars: int = 8) -> str | None:
    """``text`` without its last words when they repeat the words right before them (a loop), else None.

    The repeated span has at least ``min_words`` words and ``min_chars`` characters, so "very very" or a slot name
    that recurs further apart is no loop.

    >>> loop_cut("[Jane Austen, ~writer, Jane Austen, Jane Austen,")
    '[Jane Austen, ~writer, Jane Austen,'
    >>> loop_cut("[Adele, ~artist, 21] [Adele, ~artist, 21]")
    '[Adele, ~artist, 21]'
    >>> loop_cut("hotel-area=centre, hotel-parking=yes") is None
    True
    """
    words = list(_WORD.finditer(text))
    n = len(words)
    for k in range(min_words, n // 2 + 1):
        tail = [w.group() for w in words[n - k:]]
        if tail == [w.group() for w in words[n - 2 * k:n - k]] and words[-1].end() - words[n - k].start() >= min_chars:
            return text[:words[n - k].start()].rstrip()
    return None


def _logged(job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - background work: logged, never a failed reply
            log.exception("work after the reply failed")

    return run


def _step(trace: dict, name: str, started: float, **info) -> None:
    trace["steps"].append({"step": name, **{k: v for k, v in info.items() if v is not None},
                           "s": round(time.perf_counter() - started, 4)})


def _passage_dict(p) -> dict:
    return {"text": p.text, "source": p.source, "title": p.title, "score": round(float(p.score), 4),
            "untrusted": bool(p.meta.get("untrusted", False))}


ASKS = r"\?"  # prompts/messages.yaml's asks, when a messages file lacks it


def asks_for_information(message: str, messages: dict | None = None) -> bool:
    """Whether ``message`` asks for something (``asks`` of prompts/messages.yaml matches it), so that an answer from
    memory needs the could-not-search notice. A remark ("Haha, my cat does exactly that.") that the history selector
    gave to the web skill gets its reply without it: there is no answer to vouch for, and the notice in front of small
    talk reads as a malfunction."""
    return bool(re.search((messages or {}).get("asks", ASKS), message or "", re.IGNORECASE))


# The keys of prompts/messages.yaml whose text the bot puts in front of a reply (`_with_notice`).
NOTICES = ("web_search_failed",)


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
