"""The router's first stage, calibrated: does the user's last message, on its own, decline the turn (a safety skill),
take it (the general assistant or a knowledge skill), or fall through to the history selector?

Two kinds of evidence, neither of them a trained classifier:

- **The LM's few-shot scores**, from the one batched scoring pass the stage always made: the message's mean
  log-probability per token under the selector prompt of each safety skill, each turn-level response skill
  (`app.selector.turn_level`) and a few conversational *anchor* skills (``anchors:``, e.g. persona, ed, dailydialog),
  each *calibrated* by the same prompt's score for a content-free input (``N/A``, Zhao et al. 2021; computed once per
  prompt), so a prompt that makes any text likely earns nothing from it. ``lm_safety`` is the best safety skill's
  calibrated score minus the best of the others'; ``lm_turn`` the best turn-level skill's minus the best anchor's.
- **A few-shot neighbour vote** (MiniLM, about 10 ms): the similarity-weighted share of the ``k`` nearest labelled
  example messages, in [-1, 1]. For safety: the safety skills' examples against benign counter-examples
  (``prompts/first-stage-examples.yaml``: requests that merely mention knives, drugs, dice, code or death, small
  talk, and ``benign``: harmless requests on the safety skills' own topics) and the response skills' own user turns.
  For the turn: requests (that file's ``requests``, filed under the turn-level skill that answers them, and the
  aligned skills' examples) against small talk (its ``small_talk`` and the conversational and task skills' user
  turns); ``benign`` is not in it.

The rule, with constants fitted on development data only (``prompts/first-stage.yaml``, `bench/fit_first_stage.py`):

    safety = vote_safety + w_safety * (lm_safety - center_safety)   declines the turn when  safety > threshold_safety
    turn   = vote_turn   + w_turn   * (lm_turn - center_turn)       a turn-level skill takes it when
                                                                    turn > threshold_turn (and it was not declined)

and otherwise the history selector decides. **The cascade:** the neighbour vote costs milliseconds and the LM's
scoring pass about a second on a 2-core CPU, so the votes come first, and where a vote is far enough from its
threshold that the LM term never overturned such a vote on the fit data (``sure_above`` / ``sure_below``), it
decides alone and the LM does not run (``lm_skipped`` in the trace); where only the safety vote is that sure (for
"not unsafe"), the LM scores for the turn gate alone, without the safety prompts' rows. The centers are the margins'
medians on the fit data, so an LM margin counts only where it is unusual (the safety prompts' many short questions
make any request a little likelier under them). Without LM scores (``FSB_SELECTOR=embedding``) the votes decide
alone, against the same thresholds.

The declining skill is the safety skill whose own examples are nearest the message (the mean similarity of its three
nearest); the taking skill is the turn-level skill whose request examples are nearest. Without an embedder, the LM's
best calibrated score picks.

`Decision.scores` restates the rule per skill on one scale where 0 is "fall through": a safety skill carries
``safety - threshold``, a turn-level skill ``min(turn - threshold, -(safety - threshold))``, an anchor its calibrated
score's distance to the best anchor (the best is 0), and the response skills the LM did not score rank last. Its
argmax is the decision.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrievers.embed import encode_examples

from .selector import Candidate, Selector, clip_words, turn_level
from .skills import FileProblem

log = logging.getLogger(__name__)

DECLINE, TAKE, PASS = "decline", "take", "pass"


class FirstStageError(FileProblem):
    """A problem in a first-stage data file, located at ``path:line``."""


# ------------------------------------------------------------------------------------------------- data files
class Gate(BaseModel):
    """One decision: ``vote + weight * (lm_margin - center) > threshold``; without LM scores, ``vote > threshold``."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(ge=0)
    threshold: float
    center: float = 0.0  # the LM margin's typical value (its median on the fit data): no evidence either way
    # The cascade: the vote decides alone, and the LM is not run, when ``vote - threshold`` is above ``sure_above``
    # (yes) or below ``-sure_below`` (no): margins the LM term did not overturn on the fit data. None: always ask.
    sure_above: float | None = Field(default=None, ge=0)
    sure_below: float | None = Field(default=None, ge=0)

    def score(self, vote_value: float, margin: float | None) -> float:
        return vote_value + (self.weight * (margin - self.center) if margin is not None else 0.0)

    def sure(self, vote_value: float) -> bool | None:
        """The gate's answer from the vote alone, where the cascade trusts it (True / False), else None."""
        if self.weight == 0:
            return vote_value > self.threshold
        e = vote_value - self.threshold
        if self.sure_above is not None and e > self.sure_above:
            return True
        if self.sure_below is not None and e < -self.sure_below:
            return False
        return None


def lm_needed(constants: "Constants", vote_safety: float, vote_turn: float) -> bool:
    """Whether the LM's scores can still change the decision, given the votes (the cascade of `Gate.sure`)."""
    declined = constants.safety.sure(vote_safety)
    if declined is True:
        return False
    return declined is None or constants.turn.sure(vote_turn) is None


def safety_settled(constants: "Constants", vote_safety: float) -> bool:
    """Whether the safety vote alone says "not unsafe" (`Gate.sure`): the LM, if it scores at all, scores for the turn
    gate only, and the safety prompts need no rows (a third of the pass)."""
    return constants.safety.sure(vote_safety) is False


class Constants(BaseModel):
    """``prompts/first-stage.yaml``: the fitted constants and where the counter-examples are."""

    model_config = ConfigDict(extra="forbid")
    name: str = "first-stage"
    description: str = ""
    examples: str = Field(min_length=1)  # the counter-examples file, relative to this file's folder
    content_free: list[str] = Field(min_length=1)  # inputs that carry no content; each skill is calibrated by them
    neighbours: int = Field(ge=1)  # k of the neighbour vote
    # How sharply the vote favours the nearest of the k: weights exp((sim - best) / vote_temperature), so a near-copy
    # of an example outvotes a crowd of loosely related ones; None weighs each neighbour by its similarity.
    vote_temperature: float | None = Field(default=None, gt=0)
    anchors: list[str] = Field(min_length=1)  # conversational skills whose scores stand for "just talking"
    safety: Gate
    turn: Gate
    # The router's small-talk floor (`app.router`): a knowledge skill (kb, web, kg retriever) that the history selector
    # chose gives the turn to the best chit-chat skill when the last message's turn vote is below this (nearly all of
    # its nearest examples are small talk: "Are you a robot?", "What's your favourite food?"). None: off.
    small_talk_floor: float | None = Field(default=None, ge=-1, le=1)

    @field_validator("content_free")
    @classmethod
    def _not_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("a content-free input may not be blank (it would score nothing)")
        return v


class Examples(BaseModel):
    """``prompts/first-stage-examples.yaml``: example messages that no skill file holds."""

    model_config = ConfigDict(extra="forbid")
    name: str = "first-stage-examples"
    description: str = ""
    # safe instructions and questions, under the turn-level skill that takes them (assistant, wow, wit, dialkg)
    requests: dict[str, list[str]] = Field(min_length=1)
    small_talk: list[str] = Field(min_length=1)  # chit-chat, feelings, questions about the bot: the history decides
    # harmless requests on a safety skill's own topic (securing your Wi-Fi, a stray cat): the safety vote's benign side
    # only; the turn vote does not see them, so they do not change which turns the turn-level skills take
    benign: list[str] = []

    @property
    def all_requests(self) -> list[tuple[str, str]]:
        """``(skill, message)`` for every request example."""
        return [(skill, text) for skill, texts in self.requests.items() for text in texts]


def _load_yaml(path: Path, model: type[BaseModel]):
    """Parse ``path`` into ``model``; every problem is a `FirstStageError` at the file's line."""
    from .skills import read_mapping, validation_problem

    data, lines = read_mapping(path, FirstStageError,
                               f"the file must be a mapping of keys ({', '.join(model.model_fields)})")
    try:
        value = model(**data)
    except ValidationError as exc:
        line, msg, _ = validation_problem(exc, lines, f"(allowed: {', '.join(model.model_fields)})")
        raise FirstStageError(path, line, msg) from None
    return value, lines


@dataclass(frozen=True)
class FirstStageData:
    """The constants and the counter-examples, validated. `load` reports problems as ``file:line: message``."""

    constants: Constants
    examples: Examples
    path: str = ""
    examples_path: str = ""
    lines: dict = field(default_factory=dict, compare=False)  # the examples file's key path -> line

    def where(self, *loc) -> str:
        """``file:line`` of a key path in the examples file (for messages)."""
        from .skills import _line_for

        return f"{self.examples_path}:{_line_for(self.lines, loc)}"

    @property
    def content_free(self) -> list[str]:
        return list(self.constants.content_free)

    @classmethod
    def load(cls, path: Path) -> "FirstStageData":
        """Load ``prompts/first-stage.yaml`` and the examples file it names. Raises `FirstStageError`."""
        from .skills import _line_for

        path = Path(path)
        constants, _ = _load_yaml(path, Constants)
        examples_path = path.parent / constants.examples
        if not examples_path.is_file():
            c_lines = _load_yaml(path, Constants)[1]
            raise FirstStageError(path, _line_for(c_lines, ("examples",)),
                                  f"examples: no file {examples_path.name} next to this one")
        examples, lines = _load_yaml(examples_path, Examples)
        seen: dict[str, str] = {}
        lists = [(("requests", skill), texts) for skill, texts in examples.requests.items()]
        for loc, texts in [*lists, (("small_talk",), examples.small_talk), (("benign",), examples.benign)]:
            what = ".".join(loc)
            if not texts and loc != ("benign",):
                raise FirstStageError(examples_path, _line_for(lines, loc), f"{what}: the list is empty")
            for i, text in enumerate(texts):
                line = _line_for(lines, (*loc, i))
                if not text.strip():
                    raise FirstStageError(examples_path, line, f"{what}: item {i + 1} is blank")
                norm = " ".join(text.casefold().split())
                if norm in seen:
                    raise FirstStageError(examples_path, line, f"{what}: item {i + 1} repeats {seen[norm]}")
                seen[norm] = f"{what} item {i + 1} (line {line})"
        return cls(constants, examples, str(path), str(examples_path), lines)

    def with_constants(self, **changes) -> "FirstStageData":
        """A copy with some constants replaced (``safety=Gate(...)``, ``neighbours=3``), for fitting."""
        return FirstStageData(self.constants.model_copy(update=changes), self.examples, self.path,
                              self.examples_path, self.lines)


# ------------------------------------------------------------------------------------------------- the pools
@dataclass(frozen=True)
class Pool:
    """Labelled example messages for one neighbour vote: ``+1`` on one side, ``-1`` on the other, and for the
    positive side the skill each stands for ("" when none: the negative side, or a request filed under a skill that
    is not a loaded turn-level skill)."""

    texts: tuple[str, ...]
    signs: tuple[int, ...]
    skills: tuple[str, ...]


def user_turns(candidate: Candidate) -> list[str]:
    return [u for d in candidate.examples for u, _ in d if u.strip()]


def pools(candidates: Sequence[Candidate], kinds: dict[str, str], examples: Examples) -> tuple[Pool, Pool]:
    """The safety pool and the turn pool (see the module docstring).

    Args:
        candidates: the first stage's candidates (safety and response skills).
        kinds: skill name -> ``safety`` | ``turn`` (a turn-level response skill) | ``aligned`` (turn-level and
            aligned: its examples are requests) | ``anchor`` | ``other`` (`FirstStage.kinds`).
        examples: the counter-examples file.
    """
    s_texts, s_signs, s_skills = [], [], []
    t_texts, t_signs, t_skills = [], [], []

    def add(texts, signs, skills, items, sign, skill=""):
        for t in items:
            texts.append(t)
            signs.append(sign)
            skills.append(skill)

    for c in candidates:
        kind = kinds.get(c.name, "other")
        turns = user_turns(c)
        if kind == "safety":
            add(s_texts, s_signs, s_skills, turns, 1, c.name)
            continue
        add(s_texts, s_signs, s_skills, turns, -1)
        if kind == "aligned":
            add(t_texts, t_signs, t_skills, turns, 1, c.name)
        elif kind in ("anchor", "other"):
            add(t_texts, t_signs, t_skills, turns, -1)
        # knowledge skills' examples are chit-chat that leads to a question: on neither side of the turn vote
    for skill, text in examples.all_requests:
        add(s_texts, s_signs, s_skills, [text], -1)
        add(t_texts, t_signs, t_skills, [text], 1, skill if kinds.get(skill) in ("turn", "aligned") else "")
    add(s_texts, s_signs, s_skills, examples.small_talk, -1)
    add(t_texts, t_signs, t_skills, examples.small_talk, -1)
    add(s_texts, s_signs, s_skills, examples.benign, -1)
    return (Pool(tuple(s_texts), tuple(s_signs), tuple(s_skills)),
            Pool(tuple(t_texts), tuple(t_signs), tuple(t_skills)))


def vote(sims: np.ndarray, signs: Sequence[int], k: int,
         temperature: float | None = None) -> tuple[float, list[int]]:
    """The weighted share of the ``k`` nearest examples: ``sum(sign * w) / sum(w)`` over them, in [-1, 1], where ``w``
    is the similarity (negative similarities count as 0) or, with a ``temperature``, ``exp((sim - best) /
    temperature)``. Returns the vote and the neighbours' indices, nearest first."""
    if len(sims) == 0:
        return 0.0, []
    k = min(k, len(sims))
    top = np.argsort(-sims)[:k]
    if temperature:
        w = np.exp((sims[top] - sims[top[0]]) / temperature) * (sims[top] > 0)
    else:
        w = np.clip(sims[top], 0.0, None)
    total = float(w.sum())
    if total <= 0:
        return 0.0, [int(i) for i in top]
    s = np.asarray(signs)[top]
    return float((w * s).sum() / total), [int(i) for i in top]


# --------------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Evidence:
    """What the decision is computed from, for one message (the fitting script caches the LM part)."""

    lm: dict[str, float]  # raw mean log-prob per token, per scored skill
    content_free: dict[str, float]  # each skill's score on the content-free input(s)
    vote_safety: float
    vote_turn: float
    near: dict[str, float] = field(default_factory=dict)  # per safety / turn-level skill: its 3 nearest examples' mean
    neighbours: tuple[tuple[str, int, float], ...] = ()  # the safety vote's nearest (text, sign, sim)
    lm_skipped: bool = False  # the votes were decisive, so the LM did not score (the cascade)

    @property
    def calibrated(self) -> dict[str, float]:
        return {k: v - self.content_free.get(k, 0.0) for k, v in self.lm.items()}


@dataclass(frozen=True)
class Decision:
    """The first stage's outcome for one message; `trace` is what the turn trace shows."""

    action: str  # decline | take | pass
    skill: str | None  # the skill that declines or takes the turn; None when it falls through
    safety: float  # vote_safety + w * lm_safety
    turn: float  # vote_turn + w * lm_turn
    thresholds: dict[str, float]
    scores: dict[str, float]  # per skill, on the decision's scale (see the module docstring); argmax = the decision
    evidence: Evidence
    lm_margins: dict[str, float | None]  # None: the LM did not score (the votes decided alone)
    latency_s: float = 0.0

    @property
    def named(self) -> str:
        """The skill the stage names: the decider, else the best non-turn-level response skill."""
        if self.skill is not None:
            return self.skill
        return max(self.scores, key=self.scores.get) if self.scores else ""

    def trace(self) -> dict:
        r = lambda v: round(v, 4) if math.isfinite(v) else None  # noqa: E731
        return {"skill": self.named, "flagged": self.action == DECLINE, "decision": self.action,
                "scores": {k: r(v) for k, v in self.scores.items()},
                "calibrated": {"safety": r(self.safety), "turn": r(self.turn)},
                "threshold": dict(self.thresholds),
                "lm_margin": {k: (r(v) if v is not None else None) for k, v in self.lm_margins.items()},
                "vote": {"safety": r(self.evidence.vote_safety), "turn": r(self.evidence.vote_turn)},
                "lm": {k: r(v) for k, v in self.evidence.lm.items()},
                "lm_skipped": self.evidence.lm_skipped,
                "neighbours": [{"text": t[:80], "unsafe": s > 0, "sim": round(x, 3)}
                               for t, s, x in self.evidence.neighbours[:3]],
                "latency_s": round(self.latency_s, 4)}


def _best(values: dict[str, float], names: Iterable[str]) -> float:
    got = [values[n] for n in names if n in values and math.isfinite(values[n])]
    return max(got) if got else -math.inf


def _margin(a: float, b: float) -> float | None:
    return a - b if math.isfinite(a) and math.isfinite(b) else None


def decide(evidence: Evidence, kinds: dict[str, str], constants: Constants) -> Decision:
    """The rule of the module docstring over ``evidence``; ``kinds`` maps each skill to safety / turn / aligned /
    anchor / other (`FirstStage.kinds`). Pure: the fitting script calls it on cached evidence."""
    cal = evidence.calibrated
    safety = [n for n, k in kinds.items() if k == "safety"]
    turn = [n for n, k in kinds.items() if k in ("turn", "aligned")]
    anchors = [n for n, k in kinds.items() if k == "anchor"]
    best_s, best_t, best_a = _best(cal, safety), _best(cal, turn), _best(cal, anchors)
    lm_safety = _margin(best_s, max(best_t, best_a))
    lm_turn = _margin(best_t, best_a)
    s_gate, t_gate = constants.safety, constants.turn
    if not lm_needed(constants, evidence.vote_safety, evidence.vote_turn):
        lm_safety = lm_turn = None  # the cascade: the votes decide (the same decision whether or not the LM scored)
    elif safety_settled(constants, evidence.vote_safety):
        lm_safety = None  # the safety vote decides alone; the LM scored for the turn gate (without the safety rows)
    z_s = s_gate.score(evidence.vote_safety, lm_safety)
    z_t = t_gate.score(evidence.vote_turn, lm_turn)
    e_s, e_t = z_s - s_gate.threshold, z_t - t_gate.threshold

    def pick(names):
        """The skill whose own examples are nearest the message; without a vote, the LM's best."""
        by = evidence.near if any(n in evidence.near for n in names) else cal
        pairs = {n: by.get(n, -math.inf) for n in names}
        pairs = {n: v if math.isfinite(v) else -1e9 for n, v in pairs.items()}
        return (max(pairs, key=pairs.get), pairs) if pairs else (None, {})

    s_pick, s_vals = pick(safety)
    t_pick, t_vals = pick(turn)
    scores: dict[str, float] = {}
    for n in anchors:
        scores[n] = cal[n] - best_a if n in cal and math.isfinite(best_a) else -1.0
    floor = min(scores.values(), default=0.0) - 1.0
    for n, k in kinds.items():
        if k == "other":
            scores[n] = floor  # not scored by the LM: ranks last
    for n in turn:
        scores[n] = min(e_t, -e_s) - (t_vals[t_pick] - t_vals[n])
    for n in safety:
        scores[n] = e_s - (s_vals[s_pick] - s_vals[n])
    if e_s > 0 and s_pick is not None:
        action, skill = DECLINE, s_pick
    elif e_t > 0 and t_pick is not None:
        action, skill = TAKE, t_pick
    else:
        action, skill = PASS, None
    return Decision(action, skill, z_s, z_t, {"safety": s_gate.threshold, "turn": t_gate.threshold}, scores,
                    evidence, {"safety": lm_safety, "turn": lm_turn})


# ------------------------------------------------------------------------------------------------ the stage
class FirstStage(Selector):
    """The last-message stage: a `Selector` over the safety and response skills (``select`` works as before, for
    anything that wants the plain ranking) that also makes the calibrated `decide`.

    Args:
        source, lm, embedder, layout, method: as for `Selector` (``history_turns`` is 1: the message alone). The LM
            scores the safety, turn-level and anchor skills (`rows`) in one batched pass unless ``method`` is
            ``embedding``; the embedder votes.
        data: the constants and counter-examples (`FirstStageData.load(prompts_dir / "first-stage.yaml")`).
        kind_of: skill name -> its `app.skills.Skill` (for `turn_level`), usually ``registry.get``.
    Example:
        >>> stage = FirstStage(registry_source(reg, include_safety=True), lm=lm, embedder=emb, layout=layout,
        ...                    data=FirstStageData.load(prompts / "first-stage.yaml"), kind_of=reg.get)
        >>> stage.decide("How do I take care of a wooden table?").action
        'take'
    """

    def __init__(self, source: Callable[[], Sequence[Candidate]], *, data: FirstStageData, kind_of: Callable,
                 lm=None, embedder=None, layout=None, method: str = "best", low_precision: bool | str = "auto"):
        super().__init__(source, lm=lm, embedder=embedder, layout=layout, method=method, history_turns=1,
                         low_precision=low_precision)
        self.data, self.kind_of = data, kind_of
        self._lock = threading.Lock()
        # One thread computes a missing cache entry while the others wait for it: a turn that arrives during the
        # start-up warm-up takes the warm-up's result instead of computing the same embeddings beside it.
        self._building = threading.Lock()
        self._cf: dict[str, float] = {}  # candidate key -> content-free score
        self._pools: dict[tuple, tuple] = {}  # (candidate keys, data) -> the two pools and their embeddings

    # the pieces, each cached
    def kinds(self, candidates: Sequence[Candidate]) -> dict[str, str]:
        out = {}
        for c in candidates:
            skill = self.kind_of(c.name)
            if skill.kind == "safety":
                out[c.name] = "safety"
            elif turn_level(skill):
                out[c.name] = "aligned" if skill.aligned else "turn"
            else:
                out[c.name] = "anchor" if c.name in self.data.constants.anchors else "other"
        return out

    def rows(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates the LM scores: safety, turn-level and anchor skills (the others do not enter the rule)."""
        kinds = self.kinds(candidates)
        return [c for c in candidates if kinds[c.name] != "other"]

    def uses_lm(self) -> bool:
        return self.prompt is not None and self.method != "embedding"

    def content_free(self, candidates: Sequence[Candidate]) -> dict[str, float]:
        """Each scored candidate's mean score over the content-free inputs (computed once per prompt)."""
        if not self.uses_lm():
            return {}
        candidates = self.rows(candidates)
        if any(c.key not in self._cf for c in candidates):
            with self._building:
                missing = [c for c in candidates if c.key not in self._cf]  # what another thread has not added
                sums = {c.key: 0.0 for c in missing}
                for text in self.data.content_free if missing else ():
                    got = self.prompt.scores(((text, ""),), missing)
                    for c in missing:
                        sums[c.key] += got[c.name]
                with self._lock:
                    self._cf.update({k: v / len(self.data.content_free) for k, v in sums.items()})
        return {c.name: self._cf[c.key] for c in candidates}

    def pools(self, candidates: Sequence[Candidate]):
        key = (tuple(c.key for c in candidates), id(self.data))
        with self._lock:
            got = self._pools.get(key)
        if got is not None:
            return got
        with self._building:
            with self._lock:
                got = self._pools.get(key)
            if got is not None:  # another thread built it while this one waited
                return got
            kinds = self.kinds(candidates)
            stray = [k for k in self.data.examples.requests if kinds.get(k) not in ("turn", "aligned")]
            for name in stray:
                log.warning("%s: requests filed under %r, which is not a loaded turn-level skill: they count as "
                            "requests but never pick a skill", self.data.where("requests", name), name)
            s_pool, t_pool = pools(candidates, kinds, self.data.examples)
            emb = self.embedding.embedder if self.embedding is not None else None
            mats = ((encode_examples(emb, list(s_pool.texts)), encode_examples(emb, list(t_pool.texts)))
                    if emb is not None else (None, None))
            got = (s_pool, t_pool, *mats)
            with self._lock:
                self._pools = {key: got}  # only the current skill files' pools are kept
        return got

    def warm(self) -> None:
        """The example embeddings of the votes, then the prompts the LM scores (prefix caches) and their
        content-free scores. (Not the `Selector` embedding windows: `decide` votes over the pools instead.)"""
        candidates = list(self.source())
        self.pools(candidates)
        if self.uses_lm():
            self.prompt.warm(self.rows(candidates))
            self.content_free(candidates)

    def evidence(self, message: str, candidates: Sequence[Candidate] | None = None,
                 lm_scores: dict[str, float] | None = None) -> Evidence:
        """The evidence for ``message``: the votes, then the LM scores (``lm_scores`` when the caller has them
        already), unless the votes alone decide (`lm_needed`)."""
        candidates = list(self.source()) if candidates is None else list(candidates)
        s_pool, t_pool, s_mat, t_mat = self.pools(candidates)
        k = self.data.constants.neighbours
        vote_s = vote_t = 0.0
        near: dict[str, float] = {}
        neighbours: tuple = ()
        if s_mat is not None:
            q = self.embedding.embedder.encode([message])[0]
            s_sims, t_sims = s_mat @ q, t_mat @ q
            temperature = self.data.constants.vote_temperature
            vote_s, top = vote(s_sims, s_pool.signs, k, temperature)
            vote_t, _ = vote(t_sims, t_pool.signs, k, temperature)
            neighbours = tuple((s_pool.texts[i], s_pool.signs[i], float(s_sims[i])) for i in top)
            for pool, sims in ((s_pool, s_sims), (t_pool, t_sims)):
                for name in {n for n in pool.skills if n}:
                    own = np.sort(sims[[i for i, n in enumerate(pool.skills) if n == name]])[-3:]
                    near[name] = float(own.mean())
        skipped = False
        if lm_scores is None:
            rows = self.rows(candidates)
            if not (self.uses_lm() and rows):
                lm_scores = {}
            elif s_mat is not None and not lm_needed(self.data.constants, vote_s, vote_t):
                lm_scores, skipped = {}, True  # the votes are decisive: no scoring pass
            else:
                if s_mat is not None and safety_settled(self.data.constants, vote_s):
                    kinds = self.kinds(candidates)
                    rows = [c for c in rows if kinds[c.name] != "safety"]
                # at most the head and tail of a long paste (rows x tokens); the vote above read all of it
                lm_scores = self.prompt.scores(((clip_words(message), ""),), rows)
        # The content-free scores calibrate the LM's; without LM scores they are not needed (nor computed: on a turn
        # during the start-up warm-up they cost a scoring pass over every safety prompt).
        cf = self.content_free(candidates) if lm_scores else {}
        return Evidence(dict(lm_scores), cf, vote_s, vote_t, near, neighbours, lm_skipped=skipped)

    def decide(self, message: str) -> Decision:
        """The calibrated decision for ``message`` (the user's last message, alone)."""
        started = time.perf_counter()
        candidates = list(self.source())
        decision = decide(self.evidence(message, candidates), self.kinds(candidates), self.data.constants)
        return dataclasses.replace(decision, latency_s=time.perf_counter() - started)


def load_first_stage(settings, skills, lm, embedder, layout, method: str) -> FirstStage:
    """The first stage `app.router.build_router` installs, from ``prompts/first-stage.yaml``."""
    from .selector import registry_source

    data = FirstStageData.load(Path(settings.prompts_dir) / "first-stage.yaml")
    # the skills' own examples only: its votes and constants were fitted with them (selector_examples are the
    # history selector's, for telling conversational skills apart)
    return FirstStage(registry_source(skills, include_safety=True, selector_examples=False), data=data, kind_of=skills.get, lm=lm,
                      embedder=embedder, layout=layout, method=method)
