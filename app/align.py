"""The alignment layer: a base LM answers like an aligned assistant through its prompt alone (URIAL, Lin et al. 2023).

A prompt file under ``prompts/`` (``align-<variant>.yaml``) holds a preamble, a layout for one query/answer exchange,
a few constant stylistic examples, the stop strings and the decoding defaults. A turn is rendered as

    preamble + example exchanges          <- constant: the backend's prefix KV cache encodes it once
    + earlier turns as further exchanges  <- the conversation so far, oldest dropped first to fit the budget
    + the open exchange                   <- the live query, the answer left open for the model

and the reply is cut at the first stop string (the answer's closing marker, the next query marker, an invented role
line). Clean-up is exact: the stop and everything after it go, whitespace at the reply's outer edges (the layout's line
breaks) goes, and nothing else — code fences, backticks and markup inside an answer are kept. No model-visible text
lives in this module.

Example:
    >>> aligner = Aligner(load_lm(settings), settings)
    >>> "".join(aligner.answer([("user", "How do I boil an egg?")]))
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jinja2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .lm.base import Sampling, StopScanner
from .skills import Generation, _compile, _line_for, context_budget, read_mapping, validation_problem

log = logging.getLogger(__name__)

OPEN = "\x00"  # stands where the answer goes in the open exchange; the prompt is cut just before it
ROLES = ("user", "assistant")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_new_tokens")
# A finish within this many tokens of the budget counts as hitting the limit (re-tokenising decoded text can differ
# from the generated ids by a token or so); see `_finish_reason`.
_LIMIT_SLACK = 2


class AlignError(Exception):
    """A problem in an alignment prompt file (``path:line: message``) or in a request to the layer."""

    def __init__(self, message: str, path: Path | str | None = None, line: int = 1):
        self.path, self.line, self.message = (str(path) if path else None), line, message
        super().__init__(f"{self.path}:{line}: {message}" if path else message)


# ------------------------------------------------------------------------------------------------ the prompt file
class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    note: str = ""
    refusal: bool = False  # a refusal example: left out of ordinary answers when a safety stage guards the layer


class Refusal(BaseModel):
    """How the layer steers a refusal when a safety skill fires: a note on the query and the answer's first words."""

    model_config = ConfigDict(extra="forbid")
    note: str = Field(min_length=1)  # Jinja over {{ reason }}
    answer_start: str = ""
    # Jinja over {{ concern }} and {{ offer }}: follows answer_start when the safety skill has its own refusal
    skill_start: str = ""


class AlignPrompt(BaseModel):
    """One alignment prompt file. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = Field(min_length=1)
    preamble: str = Field(min_length=1)
    exchange: str = Field(min_length=1)  # Jinja over {{ query }}, {{ answer }}, {{ note }}
    separator: str = "\n\n"
    answer_close: str = Field(min_length=1)
    stop: list[str] = Field(min_length=1)
    leak_markers: list[str] = Field(min_length=1)
    defuse: str = Field("\u200b", min_length=1)  # inserted into a marker found inside user text
    refusal: Refusal
    generation: Generation = Generation(max_new_tokens=200, repetition_penalty=1.1)
    examples: list[Example] = Field(min_length=1)

    path: str = Field("", exclude=True)

    @field_validator("stop", "leak_markers")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("an empty string is not allowed here")
        return v

    def render_exchange(self, query: str, answer: str, note: str = "") -> str:
        return _compile(self.exchange).render(query=query, answer=answer, note=note).strip("\n")

    def open_exchange(self, query: str, note: str = "") -> str:
        """The live exchange, cut where the answer begins (the model writes from there)."""
        text = _compile(self.exchange).render(query=query, answer=OPEN, note=note).lstrip("\n")
        return text[: text.index(OPEN)]

    def refusal_note_for(self, reason: str) -> str:
        return _compile(self.refusal.note).render(reason=reason).strip("\n")

    def refusal_start_for(self, concern: str = "", offer: str = "") -> str:
        """The refusal's first words: ``answer_start``, then, given a safety skill's concern and offer,
        ``skill_start`` over them."""
        if not concern or not self.refusal.skill_start:
            return self.refusal.answer_start
        return self.refusal.answer_start + _compile(self.refusal.skill_start).render(concern=concern, offer=offer)

    @property
    def prefix(self) -> str:
        """Preamble and examples: the constant head of every prompt."""
        return self.prefix_of(self.examples)

    @property
    def answer_prefix(self) -> str:
        """Preamble and the examples that are not refusals (every example when all of them are)."""
        ordinary = [e for e in self.examples if not e.refusal]
        return self.prefix_of(ordinary or self.examples)

    def prefix_of(self, examples: Sequence[Example]) -> str:
        shots = [self.render_exchange(e.query, e.answer, e.note) for e in examples]
        return self.separator.join([self.preamble.strip("\n"), *shots]) + self.separator


def load_align_prompt(path: Path) -> AlignPrompt:
    """Parse and validate one alignment prompt file. Raises `AlignError` naming the file, the line and the fix."""
    data, lines = read_mapping(path, lambda p, line, msg: AlignError(msg, p, line), "an alignment prompt file must "
                               "be a mapping (name:, preamble:, exchange:, examples: ...)")
    try:
        prompt = AlignPrompt(**data)
    except ValidationError as exc:
        line, msg, _ = validation_problem(exc, lines, "(see prompts/README.md for the allowed keys)")
        raise AlignError(msg, path, line) from None
    prompt.path = str(path)
    _check(prompt, lines)
    return prompt


def _check(p: AlignPrompt, lines: dict) -> None:
    """Cross-field checks: the layout renders, the answer closes with answer_close, examples survive the stops."""
    at = lambda *loc: _line_for(lines, loc)  # noqa: E731
    if p.name != Path(p.path).stem:
        raise AlignError(f"name {p.name!r} must match the file name {Path(p.path).stem!r}", p.path, at("name"))
    templates = {"exchange": p.exchange, "refusal.note": p.refusal.note, "refusal.skill_start": p.refusal.skill_start}
    for key, template in templates.items():
        try:
            _compile(template)
        except jinja2.TemplateSyntaxError as exc:
            raise AlignError(f"{key}: {exc.message}", p.path, at(*key.split("."))) from None
    try:
        sample = p.render_exchange("Q", "A")
        p.refusal_note_for("a reason")
        p.refusal_start_for("a concern", "an offer")
    except jinja2.UndefinedError as exc:
        raise AlignError(f"a template uses an unknown variable ({exc.message}); exchange: may use query, answer "
                         f"and note, refusal.note may use reason, refusal.skill_start concern and offer", p.path,
                         at("exchange")) from None
    if OPEN in sample or "Q" not in sample:
        raise AlignError("exchange: must show {{ query }} and {{ answer }}", p.path, at("exchange"))
    after = sample[sample.rindex("A"):]
    if p.answer_close not in after:
        raise AlignError(f"exchange: the answer must be followed by answer_close {p.answer_close!r}", p.path,
                         at("exchange"))
    if p.answer_close not in p.stop:
        raise AlignError(f"stop: must include answer_close {p.answer_close!r}", p.path, at("stop"))
    if not any(s in p.open_exchange("Q") for s in p.stop):
        raise AlignError("stop: must include the marker that opens a query, so a reply never runs into an invented "
                         "next query", p.path, at("stop"))
    for i, e in enumerate(p.examples):
        hit = next((s for s in p.stop if s in e.answer), None)
        if hit is not None:
            raise AlignError(f"example {i + 1}: the answer contains the stop string {hit!r}, so the model learns to "
                             f"cut itself short; reword it or change stop:", p.path, at("examples", i))


def prompt_path(prompts_dir: Path, variant: str) -> Path:
    return Path(prompts_dir) / f"align-{variant}.yaml"


def variants(prompts_dir: Path) -> list[str]:
    """The alignment variants present in ``prompts_dir`` (``align-<variant>.yaml``)."""
    return sorted(p.stem[len("align-"):] for p in Path(prompts_dir).glob("align-*.yaml"))


# -------------------------------------------------------------------------------------------------- clean-up
class ReplyCleaner:
    """Turns a stream of raw model pieces into the reply's pieces.

    Cuts at the first stop string, even one split across pieces (a partial match is held back, never shown); drops the
    layout's blank lines before the first word and whitespace after the last one (trailing whitespace is held back
    until a word follows). Nothing else is removed.
    """

    def __init__(self, stops: Sequence[str]):
        self.scanner = StopScanner(stops)
        self.raw = ""  # everything the model produced
        self.text = ""  # the reply shown so far
        self._pending = ""  # trailing whitespace, shown only if a word follows
        self._started = False
        self.stopped = False  # a stop string was seen in the raw stream

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.raw += piece
        out = self._tidy(self.scanner.feed(self.raw))
        self.stopped = self.scanner.done
        return out

    def finish(self) -> str:
        out = self._tidy(self.scanner.finish(self.raw))
        self._pending = ""  # whitespace at the very end belongs to the layout
        return out

    def _tidy(self, safe: str) -> str:
        text = self._pending + safe
        if not self._started:
            text = text[_leading_blank_lines(text):]
            if not text.strip():
                self._pending = ""
                return ""
            self._started = True
        body = text.rstrip()
        self._pending = text[len(body):]
        self.text += body
        return body


def _leading_blank_lines(text: str) -> int:
    """Length of the whitespace-only lines at the start of ``text`` (indentation of the first word's line stays)."""
    m = re.match(r"(?:[ \t]*\r?\n)*", text)
    return m.end() if m else 0


# ------------------------------------------------------------------------------------------------- the layer
class Rendered(NamedTuple):
    text: str  # the whole prompt
    prefix: str  # its constant head (preamble + examples), for the backend's prefix cache


@dataclass
class AlignedText:
    """The alignment layer's side of a reply (its prompt, how it ended), filled in while it streams; the turn's
    `app.bot.Reply` is built from it."""

    prompt: Rendered
    max_new_tokens: int
    refusal: bool = False
    text: str = ""
    finish: str | None = None  # "stop": ended at a stop string or EOS; "length": ran out of tokens
    dropped_turns: int = 0
    echo_retried: bool = False  # the first answer opened by repeating the user's message and was generated again

    @property
    def clean(self) -> bool:
        return self.finish == "stop" and bool(self.text.strip())


class Streamed:
    """An iterator over a reply's pieces; ``.reply`` holds the text and how it ended once the stream is spent."""

    def __init__(self, pieces: Iterator[str], reply: AlignedText):
        self._pieces, self.reply = pieces, reply

    def __iter__(self) -> "Streamed":
        return self

    def __next__(self) -> str:
        return next(self._pieces)


class StreamedBatch:
    """An iterator over ``(row, piece)``; ``.replies[row]`` fills in as each row streams and ends."""

    def __init__(self, pieces: Iterator[tuple[int, str]], replies: list[AlignedText]):
        self._pieces, self.replies = pieces, replies

    def __iter__(self) -> "StreamedBatch":
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._pieces)


class Aligner:
    """Makes a base LM answer like an aligned assistant, with the prompt from ``prompts/align-<variant>.yaml``.

    The aligner holds no per-request state: every call builds its own cleaner and `AlignedText`, so concurrent chats can share
    one instance.

    Args:
        lm: an `LM` backend (``generate`` / ``generate_batch`` / ``count_tokens``).
        settings: `Settings`; ``prompts_dir``, ``context_tokens`` and ``history_turns`` are read.
        variant: ``"short"`` (preamble + 3 examples, for small models) or ``"long"`` (about 8 examples, for large ones),
            or any other ``align-<variant>.yaml`` in ``prompts_dir``.
        guarded: a safety stage runs before the layer (the bot's safety skills): ordinary answers then leave out the
            examples marked ``refusal: true``, which a small model otherwise copies onto harmless requests; refusals
            (`refuse`) always see every example.
    Raises:
        AlignError: the prompt file is missing or invalid (``file:line: message``).
    Example:
        >>> aligner = Aligner(lm, settings, variant="short")
        >>> for piece in aligner.answer([("user", "Name three primary colours.")]):
        ...     print(piece, end="")
    """

    def __init__(self, lm, settings, variant: str = "short", guarded: bool = False):
        path = prompt_path(settings.prompts_dir, variant)
        if not path.exists():
            known = ", ".join(variants(settings.prompts_dir)) or "none"
            raise AlignError(f"no alignment prompt for variant {variant!r} (looked for {path}); known: {known}")
        self.lm, self.settings, self.variant = lm, settings, variant
        self.prompt = load_align_prompt(path)
        self.prefix = self.prompt.prefix
        self.guarded = guarded
        self.answer_prefix = self.prompt.answer_prefix if guarded else self.prefix
        self._prefix_tokens = {p: lm.count_tokens(p) for p in {self.prefix, self.answer_prefix}}
        self._skills = None  # the safety skills, read on the first refusal (`_safety_skill`)

    # ------------------------------------------------------------------------------------------- rendering
    def render(self, messages: Sequence[tuple[str, str]], note: str = "", answer_start: str = "") -> Rendered:
        """The prompt for ``messages`` (``(role, text)``, roles ``user`` / ``assistant``, ending on ``user``).

        Consecutive messages of one role are joined by a blank line. Earlier turns beyond ``settings.history_turns`` or
        the ``settings.context_tokens`` budget are dropped, oldest first.
        """
        return self._render(messages, note, answer_start)[0]

    def _render(self, messages, note: str = "", answer_start: str = "",
                max_new_tokens: int | None = None) -> tuple[Rendered, int]:
        prefix = self.prefix if note or answer_start else self.answer_prefix  # the refusal path sees every example
        pairs, query = _pairs(messages)
        p = self.prompt
        tail = p.open_exchange(self._defuse(query), note=self._defuse(note)) + answer_start
        history = [p.render_exchange(self._defuse(q), self._defuse(a)) + p.separator for q, a in pairs]
        dropped = max(0, len(history) - self.settings.history_turns)
        history = history[dropped:]
        budget = context_budget(self.settings, self.lm) - (max_new_tokens or p.generation.max_new_tokens)
        room = budget - self._prefix_tokens[prefix] - self.lm.count_tokens(tail)
        while history and sum(self.lm.count_tokens(h) for h in history) > room:
            history.pop(0)
            dropped += 1
        if dropped:
            log.info("align: %d earlier turn(s) dropped to fit %d tokens", dropped, self.settings.context_tokens)
        return Rendered(prefix + "".join(history) + tail, prefix), dropped

    def _defuse(self, text: str) -> str:
        """Break any layout marker inside conversation text, so a user cannot open or close an exchange."""
        for marker in self.prompt.leak_markers:
            core = marker.lstrip()
            if core and core in text:
                text = text.replace(core, core[0] + self.prompt.defuse + core[1:])
        return text

    # -------------------------------------------------------------------------------------------- answering
    def sampling(self, overrides: dict[str, Any] | None = None) -> tuple[Sampling, int]:
        """The decoding settings: the prompt file's defaults with per-request ``overrides`` on top."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(SAMPLING_KEYS)
        if unknown:
            raise AlignError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; use: {', '.join(SAMPLING_KEYS)}")
        g = self.prompt.generation
        max_new = int(overrides.pop("max_new_tokens", None) or g.max_new_tokens)
        if max_new < 1:
            raise AlignError("max_new_tokens must be at least 1")
        base = Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                        repetition_penalty=g.repetition_penalty)
        return base.with_overrides(**overrides), max_new

    def answer(self, messages: Sequence[tuple[str, str]], sampling_overrides: dict[str, Any] | None = None) -> Streamed:
        """Stream the assistant's answer to the last user message.

        Args:
            messages: the conversation, ``(role, text)`` with roles ``user`` / ``assistant``, ending on ``user``.
            sampling_overrides: any of ``temperature, top_p, top_k, repetition_penalty, seed, max_new_tokens``.
        Returns:
            a `Streamed` iterator of text pieces; its ``.reply`` holds the text and ``finish`` once spent.
        Raises:
            AlignError: a malformed conversation or an unknown sampling setting.
            LMError: the model failed (also mid-stream).
        """
        return self._one(messages, sampling_overrides)

    def refuse(self, messages: Sequence[tuple[str, str]], reason,
               sampling_overrides: dict[str, Any] | None = None) -> Streamed:
        """Stream a refusal in the assistant's own style, for a turn a safety skill flagged for ``reason``.

        The prompt file's ``refusal.note`` (naming the reason) is added to the open query and its ``answer_start``
        opens the answer. When the safety skill has its own ``refusal:`` (`app.skills.SafetyRefusal`), its concern and
        offer follow in the layout of ``refusal.skill_start``, so each skill declines for its own reason and offers
        its own alternative; the model writes the rest, so the refusal fits the conversation.

        Args:
            reason: the safety `Skill`, or its description (the bot passes the description; the skill is then
                found among the safety skills in ``settings.skills_dir`` by that description), or any other text.
        """
        skill = reason if hasattr(reason, "description") else self._safety_skill(str(reason))
        text = skill.description if skill is not None else str(reason)
        own = getattr(skill, "refusal", None)
        start = self.prompt.refusal_start_for(own.concern, own.offer) if own else self.prompt.refusal.answer_start
        note = self.prompt.refusal_note_for(text)
        return self._one(messages, sampling_overrides, note=note, answer_start=start)

    def _safety_skill(self, description: str):
        """The safety skill whose description is ``description`` (None when there is none)."""
        if self._skills is None:
            from .skills import SkillRegistry

            folder = getattr(self.settings, "skills_dir", None)
            if folder is None:
                return None
            self._skills = SkillRegistry(folder)
        return next((s for s in self._skills.all(kind="safety") if s.description == description), None)

    def answer_batch(self, conversations: Sequence[Sequence[tuple[str, str]]],
                     sampling_overrides: dict[str, Any] | None = None) -> StreamedBatch:
        """Answer several conversations decoded together: yields ``(row, piece)``; each row stops on its own."""
        sampling, max_new = self.sampling(sampling_overrides)
        replies = []
        for messages in conversations:
            rendered, dropped = self._render(messages, max_new_tokens=max_new)
            replies.append(AlignedText(rendered, max_new, dropped_turns=dropped))
        return StreamedBatch(self._stream_batch(replies, sampling, max_new), replies)

    def _one(self, messages, overrides, note: str = "", answer_start: str = "") -> Streamed:
        sampling, max_new = self.sampling(overrides)
        rendered, dropped = self._render(messages, note, answer_start, max_new)
        if not note:
            # An answer does not copy the assistant's earlier replies that the prompt shows (a small base model
            # repeats the last one: "I'm sorry to say that." to "Write a haiku"); a refusal may repeat its wording.
            earlier = tuple(a for _, a in _pairs(messages)[0][dropped:] if a and a.strip())
            if earlier:
                sampling = dataclasses.replace(sampling, avoid=earlier)
        reply = AlignedText(rendered, max_new, refusal=bool(note), dropped_turns=dropped)
        echo = "" if note or answer_start else _pairs(messages)[1]
        return Streamed(self._stream(reply, sampling, max_new, answer_start, echo), reply)

    def _stream(self, reply: AlignedText, sampling: Sampling, max_new: int, answer_start: str,
                echo: str = "") -> Iterator[str]:
        """The reply's pieces, cleaned. ``echo``: the user's message. An answer that opens by repeating it (a small
        base model's habit after a few instructions in a row: "List three benefits of regular exercise." answered
        with that very line) is held back while it could be one (`opening_echo`); once it is, it is dropped and the
        answer generated again, not allowed to open with the message's first word (`Sampling.not_first`)."""
        cleaner = ReplyCleaner(self.prompt.stop)
        if answer_start:  # the answer's first words are part of the reply
            first = cleaner.feed(answer_start)
            if first:
                yield first

        def generate(sampling: Sampling):
            return self.lm.generate(reply.prompt.text, stop=self.prompt.stop, max_new_tokens=max_new,
                                    sampling=sampling, prefix=reply.prompt.prefix)

        pieces = generate(sampling)
        try:
            shown = self._pieces(pieces, cleaner, reply)
            if echo:
                held: list[str] = []  # not shown yet: the answer so far could still be the message repeated
                for out in shown:
                    held.append(out)
                    seen = opening_echo(cleaner.text, echo)
                    if seen is None:
                        continue
                    if seen:
                        log.info("the answer opened by repeating the message; generating it again")
                        _close_stream(pieces)
                        reply.echo_retried, reply.text, held = True, "", []
                        cleaner = ReplyCleaner(self.prompt.stop)
                        pieces = generate(dataclasses.replace(sampling, not_first=(echo,)))
                        shown = self._pieces(pieces, cleaner, reply)
                    break
                if held:  # not an echo, or the stream ended while it was still the message's first words
                    yield "".join(held)
            yield from shown
        finally:
            _close_stream(pieces)  # stops the backend's decoding now, also when the caller stops reading
        out = cleaner.finish()
        reply.text = cleaner.text
        reply.finish = self._finish_reason(cleaner, max_new, skip=len(answer_start))
        if out:
            yield out

    @staticmethod
    def _pieces(pieces, cleaner: ReplyCleaner, reply: AlignedText) -> Iterator[str]:
        """The cleaned text of ``pieces`` as it becomes safe to show, kept in ``reply.text``."""
        for piece in pieces:
            out = cleaner.feed(piece)
            reply.text = cleaner.text
            if out:
                yield out
            if cleaner.stopped:
                break  # a backend that ignored the stop strings: nothing after the stop is wanted

    def _stream_batch(self, replies: list[AlignedText], sampling: Sampling, max_new: int) -> Iterator[tuple[int, str]]:
        cleaners = [ReplyCleaner(self.prompt.stop) for _ in replies]
        prefix = self.answer_prefix
        pieces = self.lm.generate_batch([r.prompt.text for r in replies], stop=self.prompt.stop,
                                        max_new_tokens=max_new, sampling=sampling, prefix=prefix)
        try:
            for row, piece in pieces:
                c = cleaners[row]
                if c.stopped:
                    continue
                out = c.feed(piece)
                replies[row].text = c.text
                if out:
                    yield row, out
                if c.stopped:  # this row is done; the others go on
                    yield from self._close(row, c, replies[row], max_new)
        finally:
            _close_stream(pieces)
        for row, c in enumerate(cleaners):
            if replies[row].finish is None:
                yield from self._close(row, c, replies[row], max_new)

    def _close(self, row: int, cleaner: ReplyCleaner, reply: AlignedText, max_new: int) -> Iterator[tuple[int, str]]:
        out = cleaner.finish()
        reply.text = cleaner.text
        reply.finish = self._finish_reason(cleaner, max_new)
        if out:
            yield row, out

    def _finish_reason(self, cleaner: ReplyCleaner, max_new: int, skip: int = 0) -> str:
        """``stop`` or ``length``. The backend cuts stops itself and does not say why a stream ended, so a stream
        whose raw text is (within a token or two) as long as the budget is taken to have hit the limit."""
        if cleaner.stopped:
            return "stop"  # we saw the stop string ourselves
        generated = cleaner.raw[skip:]
        if generated and self.lm.count_tokens(generated) >= max_new - _LIMIT_SLACK:
            return "length"
        return "stop"


# An answer that opens with the first ECHO_WORDS words of the user's message (all of them when it has fewer, from
# ECHO_MIN_WORDS on) repeats it rather than answering. Shorter messages ("Hello there") may be answered in kind.
ECHO_WORDS = 4
ECHO_MIN_WORDS = 3
_WORD = re.compile(r"\w+")


def opening_echo(text: str, message: str) -> bool | None:
    """Whether ``text`` (an answer so far) opens by repeating ``message``'s first words, ignoring case and
    punctuation: True, False, or None while it cannot tell yet (``text`` is still a start of those words)."""
    target = _WORD.findall(message.lower())
    if len(target) < ECHO_MIN_WORDS:
        return False
    target = target[:ECHO_WORDS]
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[: len(target)] == target:
        return True
    n = len(words)
    if n <= len(target) and words[: n - 1] == target[: n - 1] and target[n - 1].startswith(words[-1]):
        return None  # the last word may still be growing ("Lis" of "List")
    return False


def _close_stream(stream) -> None:
    close = getattr(stream, "close", None)
    if close:
        close()


def _pairs(messages: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """Earlier (query, answer) pairs and the open query. Consecutive messages of one role are joined."""
    merged: list[list[str]] = []
    for i, item in enumerate(messages):
        try:
            role, text = item
        except (TypeError, ValueError):
            raise AlignError(f"message {i + 1} must be a (role, text) pair") from None
        if role not in ROLES:
            raise AlignError(f"message {i + 1}: unknown role {role!r}; use one of: {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise AlignError(f"message {i + 1}: the text must be a string")
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n\n" + text
        else:
            merged.append([role, text])
    if not merged or merged[-1][0] != "user":
        raise AlignError("the conversation must end with a user message")
    if merged[0][0] != "user":
        raise AlignError("the conversation must start with a user message")
    query = merged.pop()[1]
    if not query.strip():
        raise AlignError("the last user message is empty")
    return [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged), 2)], query
