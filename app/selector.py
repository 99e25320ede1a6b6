"""The skill selector: which skill answers this turn.

Three ways to score the skills, one `Selector` that applies the user's hooks on top:

- ``prompt`` (the Few-Shot Bot paper's): every skill has a constant selector prompt, its first ``selector_shots`` example
  dialogues in one neutral layout (``prompts/selector.yaml``); the recent history is scored after each prompt and the
  skill under which it is most likely (lowest perplexity) wins. The prompts are prefix-cached and all skills are
  scored in ONE batched forward pass (`TransformersLM.score_prefixes`).
- ``embedding``: the history's all-MiniLM-L6-v2 embedding against every example window of every skill; a skill's
  score is the mean cosine of its nearest few windows.
- ``hybrid``: the embedding scores shortlist the top ``shortlist`` skills, the prompt scores decide among them
  (optionally plus ``weight`` x the embedding score). Fewer rows make it faster than ``prompt``. Its cascade
  (``sure_margin``): when the embedding winner leads clearly, it wins without the LM's pass at all.

Hooks: a forced skill (per session or per message, passed as ``force``) wins without scoring; each skill's score comes
back in `Selection.scores` for the turn trace; when the winner's margin over the runner-up is below ``min_margin`` the
``fallback`` skill answers instead.

Scores are "higher is better" everywhere: mean log-probability per history token for the prompt method (perplexity is
``exp(-score)``), cosine similarity for the embedding method.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jinja2
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict

from retrievers.embed import encode_examples

from .lm.base import fast_bf16

log = logging.getLogger(__name__)

Turn = tuple[str, str]  # (user, assistant); the live turn's assistant side is ""
Dialogue = tuple[Turn, ...]
METHODS = ("prompt", "embedding", "hybrid")
# The method `best` resolves to, with the Selector defaults shortlist=3, weight=1.0. On all 270 examples of
# selector-dev with the embedded gemma-3-270m, 4 pool shots per skill, 2 CPU cores: prompt 83.7% (median 2.1 s),
# hybrid 81.1% (macro-F1 81.0, median 0.36 s), embedding 71.1% (0.01 s). Hybrid is within 3 points of the prompt
# selector at a sixth of its latency, so it is the default.
BEST_METHOD = "hybrid"


class SelectorError(Exception):
    """A selection request that cannot be served (unknown forced skill, no selectable skill, bad layout file)."""


# ------------------------------------------------------------------------------------------------ the layout
class SelectorLayout(BaseModel):
    """``prompts/selector.yaml``: the neutral layout shared by every skill's selector prompt."""

    model_config = ConfigDict(extra="forbid")
    name: str = "selector"
    description: str = ""
    header: str
    user_line: str
    bot_line: str
    line_separator: str
    shot_separator: str

    @classmethod
    def load(cls, path: Path) -> "SelectorLayout":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
            raise SelectorError(f"{path}: cannot load the selector layout: {exc}") from None

    def lines(self, turns: Iterable[Sequence[str]]) -> list[str]:
        user, bot = _template(self.user_line), _template(self.bot_line)
        out = []
        for turn in turns:
            u, b = (list(turn) + ["", ""])[:2]
            if u:
                out.append(user.render(text=u))
            if b:
                out.append(bot.render(text=b))
        return out

    def dialogue(self, turns: Iterable[Sequence[str]]) -> str:
        """One example dialogue: the header and its lines."""
        return self.line_separator.join([self.header, *self.lines(turns)])

    def prefix(self, examples: Sequence[Dialogue]) -> str:
        """A skill's constant selector prompt: its example dialogues, then the header of the dialogue to score."""
        shots = "".join(self.dialogue(d) + self.shot_separator for d in examples)
        return shots + self.header + self.line_separator

    def history(self, turns: Iterable[Sequence[str]]) -> str:
        """The scored continuation: the history's lines (the header is part of the prefix)."""
        return self.line_separator.join(self.lines(turns))


_env: jinja2.Environment | None = None


def _jinja() -> jinja2.Environment:
    global _env
    if _env is None:
        _env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    return _env


@functools.lru_cache(maxsize=64)
def _template(text: str) -> jinja2.Template:
    """A layout line compiled once (every scoring call renders every candidate's examples with it)."""
    return _jinja().from_string(text)


# A scored utterance counts at most this many words: its first and its last ones (a pasted text's request is usually
# at one end). A scoring pass costs rows x tokens; 2 of selector-dev's 978 history lines and none of align dev's
# instructions are longer.
SCORED_WORDS = (40, 20)


def clip_words(text: str) -> str:
    """``text`` itself, or its first and last words (`SCORED_WORDS`) around an ellipsis when it is longer. Clipping a
    clipped text changes nothing."""
    words = text.split()
    head, tail = SCORED_WORDS
    if len(words) <= head + tail:
        return text
    return " ".join(words[:head]) + " … " + " ".join(words[-tail:])


# --------------------------------------------------------------------------------------------- value objects
@functools.lru_cache(maxsize=1024)
def _content_key(name: str, examples: tuple) -> str:
    # candidates are built again for every turn from the same skills: hash each content once, not on every lookup
    return hashlib.blake2b(repr((name, examples)).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A selectable skill as the selector sees it: a name, its example dialogues, how many the prompt uses."""

    name: str
    examples: tuple[Dialogue, ...]
    shots: int = 2
    label: str = ""  # the dataset label (``dataset:`` in the skill file), for evaluation
    family: str = ""  # skills of one family are one task split by domain (``family:`` in the skill file)

    @property
    def key(self) -> str:
        """Content hash: a changed skill file gets fresh embeddings and a fresh prompt."""
        return _content_key(self.name, self.examples)


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection, for the reply and the turn trace."""

    skill: str
    scores: dict[str, float]  # the deciding scores, higher is better (see the module docstring)
    method: str  # prompt | embedding | hybrid | forced
    latency_s: float
    confident: bool
    margin: float = math.inf  # best score minus the runner-up's
    forced: bool = False
    fallback: bool = False  # the fallback skill answered because no score was confident
    details: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. hybrid's embedding scores
    decided_by: str | None = None  # "embedding" when the hybrid's cascade skipped the LM
    moved_from: str | None = None  # the family vote handed the turn from this skill to a sibling or a task (`FamilyVote`)

    def trace(self) -> dict:
        out = {"skill": self.skill, "method": self.method, "scores": {k: round(v, 4) for k, v in self.scores.items()},
               "confident": self.confident, "margin": None if math.isinf(self.margin) else round(self.margin, 4),
               "forced": self.forced, "fallback": self.fallback, "latency_s": round(self.latency_s, 4)}
        if self.decided_by:
            out["decided_by"] = self.decided_by
        if "family" in self.details:
            out["family"] = {"scores": {k: round(v, 4) for k, v in self.details["family"].items()},
                             "moved_from": self.moved_from}
        return out


def to_dialogue(turns: Iterable[Sequence[str]]) -> Dialogue:
    return tuple((str((list(t) + ["", ""])[0] or ""), str((list(t) + ["", ""])[1] or "")) for t in turns)


def candidates_from_skills(skills: Iterable, selector_examples: bool = True) -> list[Candidate]:
    """One candidate per skill (`app.skills.Skill`): its examples' ``dialogue`` fields, then (unless
    ``selector_examples`` is false) its ``selector_examples``; the prompt takes the first ``selector_shots``. For a skill
    with ``selector_prompt_shots`` the prompt takes that many selector examples after them (they are listed there)."""
    out = []
    for s in skills:
        extra = s.selector_examples if selector_examples else []
        shots = s.selector_shots
        if extra and s.selector_prompt_shots:  # the prompt: the first selector_shots examples, then that many of these
            shown, more = s.examples[:shots], min(s.selector_prompt_shots, len(extra))
            ordered, shots = [*shown, *extra[:more], *s.examples[len(shown):], *extra[more:]], len(shown) + more
        else:
            ordered = [*s.examples, *extra]
        dialogues = tuple(to_dialogue(e["dialogue"]) for e in ordered if e.get("dialogue"))
        if dialogues and s.selector_shots > 0:  # selector_shots: 0 means "never chosen by the selector"
            out.append(Candidate(s.name, dialogues, shots, s.dataset or s.name, s.family))
    return out


# Skills that the user's last message decides on its own, whatever the history was about: a safety skill (decline),
# an aligned skill such as the general assistant (a one-off instruction or question), and a skill that looks
# knowledge up (a question about something new). The bot's turn and `fsb eval selector --selector pipeline` use it.
TURN_LEVEL_RETRIEVERS = ("kb", "web", "kg")


def turn_level(skill) -> bool:
    return skill.kind == "safety" or bool(skill.aligned) or skill.retriever in TURN_LEVEL_RETRIEVERS


def registry_source(registry, include_safety: bool = False,
                    selector_examples: bool = True) -> Callable[[], list[Candidate]]:
    """Candidates from a `SkillRegistry`, re-read on every call (so a new or edited skill file counts at once);
    ``selector_examples=False`` leaves the skills' ``selector_examples`` out (see `candidates_from_skills`)."""

    def source() -> list[Candidate]:
        skills = registry.all(kind="response") + (registry.all(kind="safety") if include_safety else [])
        return candidates_from_skills(skills, selector_examples)

    return source


# ------------------------------------------------------------------------------------------------- scorers
class PromptScorer:
    """Mean log-probability per token of the history under each candidate's selector prompt.

    ``low_precision`` scores in bfloat16 (`TransformersLM.score_prefixes`): 2-3x faster on AMX CPUs, per-token scores
    within ~0.01-0.02 nats of the exact ones; ``"auto"`` turns it on where bf16 is fast (`fast_bf16`).
    """

    def __init__(self, lm, layout: SelectorLayout, low_precision: bool | str = "auto", checkpoints: bool = False):
        self.lm, self.layout = lm, layout
        self.low_precision = fast_bf16() if low_precision == "auto" else bool(low_precision)
        self.checkpoints = checkpoints  # score a history from the checkpoint of its previous turn (`score_prefixes`)
        self._prefixes: dict[tuple, str] = {}  # a candidate's shots -> its rendered selector prompt

    def prefix(self, c: Candidate) -> str:
        shots = c.examples[: c.shots]
        text = self._prefixes.get(shots)
        if text is None:  # rendered once per skill's shots (every scoring call needs every candidate's)
            if len(self._prefixes) > 512:
                self._prefixes.clear()
            text = self._prefixes[shots] = self.layout.prefix(shots)
        return text

    def warm(self, candidates: Sequence[Candidate]) -> None:
        """Encode every selector prompt once (into the LM's prefix cache)."""
        if hasattr(self.lm, "score_prefixes"):
            for c in candidates:
                self.lm.score_prefixes([self.prefix(c)], self.layout.header)

    def scores(self, history: Dialogue, candidates: Sequence[Candidate]) -> dict[str, float]:
        # a pass costs rows x tokens: a pasted text counts by its head and tail (`clip_words`), as in the first stage
        text = self.layout.history([[clip_words(u) for u in turn] for turn in history])
        prefixes = [self.prefix(c) for c in candidates]
        if hasattr(self.lm, "score_prefixes"):
            more = {"checkpoint": True} if self.checkpoints else {}
            logps = self.lm.score_prefixes(prefixes, text, low_precision=self.low_precision, **more)
        else:  # any LM backend: one scoring call per skill
            logps = [self.lm.score(p, [text], prefix=p)[0] for p in prefixes]
        n = max(1, self.lm.count_tokens(text))
        return {c.name: lp / n for c, lp in zip(candidates, logps)}


class EmbeddingScorer:
    """Cosine similarity of the history to each candidate's nearest example windows (mean of the top ``top``)."""

    def __init__(self, embedder, history_turns: int = 5, top: int = 3):
        self.embedder, self.history_turns, self.top = embedder, history_turns, top
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._building = threading.Lock()  # one thread embeds a missing skill's windows; the others wait for it

    @staticmethod
    def text(turns: Sequence[Turn]) -> str:
        return "\n".join(x for t in turns for x in t if x)

    def windows(self, c: Candidate) -> list[str]:
        """Every history an example dialogue passes through: up to ``history_turns`` turns ending at a user turn."""
        out = []
        for d in c.examples:
            for t in range(len(d)):
                turns = list(d[max(0, t - self.history_turns + 1) : t + 1])
                turns[-1] = (turns[-1][0], "")
                out.append(self.text(turns))
        return [w for w in out if w] or [c.name]

    def matrix(self, c: Candidate) -> np.ndarray:
        key = c.key
        with self._lock:
            m = self._cache.get(key)
        if m is not None:
            return m
        with self._building:  # a turn during the start-up warm-up takes the warm-up's result, not a second copy
            with self._lock:
                m = self._cache.get(key)
            if m is None:
                m = encode_examples(self.embedder, self.windows(c))
                with self._lock:
                    self._cache[key] = m
        return m

    def warm(self, candidates: Sequence[Candidate]) -> None:
        for c in candidates:
            self.matrix(c)

    def scores(self, history: Dialogue, candidates: Sequence[Candidate]) -> dict[str, float]:
        q = self.embedder.encode([self.text(history[-self.history_turns :])])[0]
        out = {}
        for c in candidates:
            sims = self.matrix(c) @ q
            k = min(self.top, len(sims))
            out[c.name] = float(np.sort(sims)[-k:].mean())
        return out


class FamilyVote:
    """Which sibling of a family the user's last message asks for.

    A task split by domain (the booking skills: hotel, restaurant, taxi, train, attraction) keeps its history when the
    user moves on: "I also need a taxi to the station" after four turns about a hotel. Scored over the history, the
    hotel still wins. This vote compares the last user message alone with each sibling's opening requests (the first
    user line of each of its example dialogues, where a user says what they want) by cosine similarity, the mean of
    the nearest ``top``; the selected skill hands the turn on only when a sibling leads it by ``margin``. Closing lines
    ("thanks, that's all") resemble no opening request more than another and move nothing.

    The same vote lets a chat *enter* a task: "Anyway, I need a taxi to the station at 9." after three turns of small
    talk, where the history still makes a chit-chat skill win. When the selected skill has no family, the best skill
    of any family takes the turn if its openings lead the best opening of every skill without a family (the
    conversational ones, the selected one among them) by ``margin``. Compared with the best of them, not with the
    selected one alone, so a message that reads like the opening of a chat is never moved (on selector-dev's fit part
    the same margin moved none of 140 dialogues; bench/data/switch-dev.jsonl: 4 of 7 task requests after small talk).
    And a task is *left* the same way: when no sibling is asked for, a skill without a family takes the turn if its
    openings lead those of every skill with one ("How are you doing today?" after a hotel booking leads by 0.48; a
    closing line such as "thanks, that's all" by at most 0.10 on selector-dev, which this margin moves none of).
    """

    def __init__(self, embedder, margin: float, top: int = 3):
        self.embedder, self.margin, self.top = embedder, margin, top
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @staticmethod
    def openings(c: Candidate) -> list[str]:
        return [d[0][0] for d in c.examples if d and d[0][0]] or [c.name]

    def matrix(self, c: Candidate) -> np.ndarray:
        with self._lock:
            m = self._cache.get(c.key)
        if m is None:
            m = encode_examples(self.embedder, self.openings(c))
            with self._lock:
                self._cache[c.key] = m
        return m

    def warm(self, candidates: Sequence[Candidate]) -> None:
        if any(c.family for c in candidates):
            for c in candidates:
                self.matrix(c)

    def scores(self, message: str, siblings: Sequence[Candidate]) -> dict[str, float]:
        q = self.embedder.encode([message])[0]
        out = {}
        for c in siblings:
            sims = self.matrix(c) @ q
            out[c.name] = float(np.sort(sims)[-min(self.top, len(sims)):].mean())
        return out

    def sibling_scores(self, skill: str, message: str, candidates: Sequence[Candidate]) -> dict[str, float] | None:
        """The vote's scores over ``skill``'s family (``skill`` included), or None when it has no siblings."""
        chosen = next((c for c in candidates if c.name == skill), None)
        if chosen is None or not chosen.family or not message.strip():
            return None
        siblings = [c for c in candidates if c.family == chosen.family]
        return self.scores(clip_words(message), siblings) if len(siblings) > 1 else None

    @staticmethod
    def pick(scores: dict[str, float], chosen: str, margin: float) -> str:
        """The sibling that leads ``chosen`` by ``margin`` or more, else ``chosen``."""
        best = max(scores, key=scores.get)
        return best if best != chosen and scores[best] - scores[chosen] >= margin else chosen

    def move(self, selection: Selection, message: str, candidates: Sequence[Candidate]) -> Selection:
        """``selection``, or the same with the sibling the message clearly asks for or, failing that, the best skill
        on the other side of the line between tasks (skills with a family) and chat (skills without one) when the
        message's openings lead every skill on the selected one's side by the margin: a chat that turns into a
        booking, or a booking that turns into a chat. The message is scored against every candidate once; the trace
        keeps those scores."""
        chosen = next((c for c in candidates if c.name == selection.skill), None)
        if chosen is None or not message.strip() or not any(c.family for c in candidates):
            return selection
        scores = self.scores(clip_words(message), candidates)
        details = {**selection.details, "family": scores}
        if chosen.family:
            siblings = {c.name: scores[c.name] for c in candidates if c.family == chosen.family}
            skill = self.pick(siblings, chosen.name, self.margin)
            if skill != chosen.name:
                return dataclasses.replace(selection, skill=skill, details=details, moved_from=chosen.name)
        mine = [scores[c.name] for c in candidates if bool(c.family) == bool(chosen.family)]
        theirs = [c.name for c in candidates if bool(c.family) != bool(chosen.family)]
        if theirs:
            best = max(theirs, key=scores.get)
            if scores[best] - max(mine) >= self.margin:
                return dataclasses.replace(selection, skill=best, details=details, moved_from=chosen.name)
        return dataclasses.replace(selection, details=details)


# ------------------------------------------------------------------------------------------------ selector
def _with_shots(source: Callable[[], Sequence[Candidate]], shots: int) -> Callable[[], list[Candidate]]:
    """``source`` with each candidate's prompt holding at least ``shots`` of its dialogues (as many as it has)."""

    def more() -> list[Candidate]:
        return [dataclasses.replace(c, shots=max(c.shots, min(shots, len(c.examples)))) for c in source()]

    return more


class Selector:
    """Chooses the skill for a turn.

    Args:
        source: returns the selectable candidates (see `registry_source`); called on every selection.
        lm: the LM for the prompt and hybrid methods (``score_prefixes`` makes them one batched pass).
        embedder: a sentence embedder (``encode(texts) -> unit rows``) for the embedding and hybrid methods.
        layout: the neutral layout, usually ``SelectorLayout.load(settings.prompts_dir / "selector.yaml")``.
        method: ``prompt``, ``embedding``, ``hybrid`` or ``best`` (= `BEST_METHOD`).
        history_turns: how many recent turns are scored (the paper: 3-5).
        shortlist: the hybrid's number of embedding-shortlisted skills scored by the prompt.
        weight: the hybrid adds ``weight`` x the embedding score to the prompt score.
        fallback: the skill that answers when the margin is below ``min_margin`` (None: keep the winner).
        min_margin: the margin (best minus runner-up score) below which a selection is not confident.
        low_precision: score in bfloat16 (True / False / "auto": where bf16 is fast); see `PromptScorer`.
        sure_margin: the hybrid's cascade: when the embedding winner leads the runner-up by at least this much, it
            wins without the LM's scoring pass (``method`` stays ``hybrid``; the trace says ``decided_by``). None or
            0: the LM always scores the shortlist.
        shots: the prompt method's example dialogues per skill, at least (more where a skill's ``selector_shots``
            says so, never more than it has); None or 0: each candidate's own count.
        family_margin: the family vote (`FamilyVote`): a winner with a ``family`` hands the turn to the sibling that
            the last user message alone prefers by at least this cosine margin. None or 0: off.
        checkpoints: keep each scored history in the LM's conversation checkpoints, so that the next turn's history
            (the same lines and a few new ones) is scored from there (`TransformersLM.score_prefixes`). For a selector
            that scores growing dialogue histories; the scores are the same up to rounding.
    Raises:
        SelectorError: from `select`, for an unknown forced skill or when no skill is selectable.
    Example:
        >>> sel = Selector(registry_source(registry), lm=lm, embedder=default_embedder(), layout=layout)
        >>> sel.select([["can you book me a taxi to the station ?", ""]]).skill
        'mwoz-taxi'
    """

    def __init__(self, source: Callable[[], Sequence[Candidate]], lm=None, embedder=None,
                 layout: SelectorLayout | None = None, method: str = "best", history_turns: int = 5,
                 shortlist: int = 3, weight: float = 1.0, fallback: str | None = None, min_margin: float = 0.0,
                 embedding_top: int = 3, low_precision: bool | str = "auto", sure_margin: float | None = None,
                 shots: int | None = None, checkpoints: bool = False, family_margin: float | None = None):
        method = BEST_METHOD if method == "best" else method
        if method not in METHODS:
            raise SelectorError(f"unknown selector method {method!r}; use one of: {', '.join(METHODS)}, best")
        if method in ("prompt", "hybrid") and (lm is None or layout is None):
            raise SelectorError(f"the {method} selector needs an LM and the selector layout")
        if method in ("embedding", "hybrid") and embedder is None:
            raise SelectorError(f"the {method} selector needs a sentence embedder")
        self.source, self.method = (_with_shots(source, shots) if shots else source), method
        self.history_turns, self.shortlist, self.weight = history_turns, shortlist, weight
        self.fallback, self.min_margin = fallback, min_margin
        self.sure_margin = sure_margin or None
        self.prompt = (PromptScorer(lm, layout, low_precision, checkpoints) if lm is not None and layout is not None
                       else None)
        self.embedding = EmbeddingScorer(embedder, history_turns, embedding_top) if embedder is not None else None
        self.family = FamilyVote(embedder, family_margin) if embedder is not None and family_margin else None

    def warm(self) -> None:
        """Compute every cache a selection needs (selector prompts, example embeddings) ahead of the first turn."""
        candidates = list(self.source())
        if self.embedding is not None and self.method != "prompt":
            self.embedding.warm(candidates)
        if self.prompt is not None and self.method != "embedding":
            self.prompt.warm(candidates)
        if self.family is not None:
            self.family.warm(candidates)

    def select(self, history: Sequence[Sequence[str]], force: str | None = None) -> Selection:
        """The skill for the turn whose history (``[[user, assistant], ..., [user, ""]]``) is given."""
        started = time.perf_counter()
        candidates = list(self.source())
        names = [c.name for c in candidates]
        if force:
            if force not in names:
                raise SelectorError(f"cannot force unknown skill {force!r}; selectable: {', '.join(names)}")
            return Selection(force, {}, "forced", time.perf_counter() - started, True, forced=True)
        if not candidates:
            raise SelectorError("no selectable skill: add a response skill file under skills/")
        turns = to_dialogue(history)[-self.history_turns :]
        if not turns:
            raise SelectorError("the history is empty: there is nothing to select a skill for")
        details: dict[str, dict[str, float]] = {}
        if len(candidates) == 1:
            scores = {names[0]: 0.0}
        elif self.method == "embedding":
            scores = self.embedding.scores(turns, candidates)
        elif self.method == "prompt":
            scores = self.prompt.scores(turns, candidates)
        else:
            emb = self.embedding.scores(turns, candidates)
            details["embedding"] = emb
            ranked = sorted(candidates, key=lambda c: -emb[c.name])
            lead = emb[ranked[0].name] - emb[ranked[1].name]
            if self.sure_margin is not None and lead >= self.sure_margin:
                # the cascade: the embedding winner is clear, no LM pass
                sel = dataclasses.replace(self._decide(emb, names, started, details), decided_by="embedding")
                return self._moved(sel, turns, candidates, started)
            top = ranked[: max(1, self.shortlist)]
            scores = self.prompt.scores(turns, top)
            scores = {k: v + self.weight * emb[k] for k, v in scores.items()}
        return self._moved(self._decide(scores, names, started, details), turns, candidates, started)

    def _moved(self, sel: Selection, turns: Dialogue, candidates, started: float) -> Selection:
        """The family vote on the winner (not on a fallback): the last user message may pick a sibling."""
        if self.family is None or sel.fallback:
            return sel
        sel = self.family.move(sel, turns[-1][0], candidates)
        return dataclasses.replace(sel, latency_s=time.perf_counter() - started)

    def _decide(self, scores: dict[str, float], names: list[str], started: float, details) -> Selection:
        ranked = sorted(scores.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else -math.inf, reverse=True)
        best, best_score = ranked[0]
        margin = best_score - ranked[1][1] if len(ranked) > 1 else math.inf
        confident = math.isfinite(best_score) and (margin > self.min_margin or (margin == math.inf))
        use_fallback = not confident and self.fallback in names and self.fallback != best
        skill = self.fallback if use_fallback else best
        return Selection(skill, scores, self.method, time.perf_counter() - started, confident, margin,
                         fallback=use_fallback, details=details)
