"""The skill lab: try a draft skill file against the running bot without installing it.

A draft is YAML text. The lab validates it with the same loader as ``skills/`` (every problem as ``file:line:
message``), renders its prompt within the bot's token budget, answers with the draft forced through the bot's own
turn, and ranks the draft among the installed response skills with the bot's own history selector. All of that works
on a read-only view of the installed skills with the draft laid over them (`DraftView`); the running bot's registry
is never touched and nothing is written under ``skills_dir`` until `SkillLab.save`, which writes a valid draft only.
The registry re-reads its folder on every access, so a saved skill serves at once (``fsb:<name>`` in /v1/models).

    text --validate--> Skill --render--> Rendered(prompt, tokens / budget, examples kept)
                            --stream/chat--> Bot.turn(skill=<draft>) over DraftView
                            --rank--> Selector over candidates_from_skills(installed + draft) -> Rank per message
                            --save--> <skills_dir>/<name>.yaml (atomic), picked up by the registry

Used by ``fsb skills try`` (`app.cli_skills`) and the web chat's "Skill lab" tab (`app.lab_ui`).
"""
from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from .skills import Skill, SkillError, context_budget, load_skill

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class LabError(Exception):
    """A lab request that cannot be served; the message says what to fix."""


class DraftInvalid(LabError):
    """The draft does not load; ``errors`` are `SkillError` s, each with the draft's line."""

    def __init__(self, errors: Sequence[SkillError]):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


class SaveRefused(LabError):
    """The draft is valid, but saving it would replace a file (or the folder cannot be written)."""


# ------------------------------------------------------------------------------------------------ value objects
@dataclass(frozen=True)
class Rendered:
    """The draft's prompt for one message, measured against the context budget."""

    text: str
    tokens: int
    budget: int  # examples + live turn + reply must fit in this (`app.skills.context_budget`)
    max_new_tokens: int  # room kept for the reply
    examples: int  # examples kept
    dropped: int  # examples dropped to fit

    @property
    def fits(self) -> bool:
        return self.tokens + self.max_new_tokens <= self.budget

    def summary(self) -> str:
        return (f"{self.tokens} of {self.budget} tokens (+{self.max_new_tokens} for the reply), {self.examples} "
                f"examples fit" + (f", {self.dropped} dropped" if self.dropped else "")
                + ("" if self.fits else "; too long for the budget"))

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits}


@dataclass(frozen=True)
class Rank:
    """Where the history selector puts the draft for one message (a one-turn dialogue)."""

    message: str
    skill: str  # the draft's name
    rank: int | None  # 1 = the selector would pick the draft; None: the draft is not a candidate (see ``note``)
    of: int  # candidates ranked
    score: float | None
    method: str  # the selector's method (prompt, embedding, hybrid)
    winner: str
    top: list[tuple[str, float]] = field(default_factory=list)  # the first three, best first
    shortlisted: bool = True  # hybrid: whether the prompt scores reached the draft (else its embedding score)
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        out["top"] = [{"skill": n, "score": _round(s)} for n, s in self.top]
        out["score"] = _round(self.score)
        return out


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)


# -------------------------------------------------------------------------------------------------- validation
def draft_name(text: str) -> str:
    """The draft's ``name:`` when it is a valid skill name, else ``draft`` (the loader then reports the problem)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return "draft"
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and _NAME.match(name) else "draft"


def _key_line(text: str, key: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith(key + ":"):
            return i
    return 1


def load_draft(text: str, installed, source: str | None = None) -> Skill:
    """Load draft ``text`` as a skill file would load from ``skills/``, plus the checks a live turn needs.

    Args:
        text: the YAML of one skill file.
        installed: the installed skills (a `SkillRegistry` or a `DraftView`): a ``query_skill`` must be one of them.
        source: the name errors give the draft (``FILE`` for the CLI); default ``<name>.yaml``.
    Raises:
        DraftInvalid: every problem found, each naming ``source`` and the draft's line.
    """
    from .cli_skills import live_problems

    name = draft_name(text)
    label = source or f"{name}.yaml"
    # The loader reads a file, and checks that `name:` matches the file name: give it one named after the skill.
    with tempfile.TemporaryDirectory(prefix="fsb-lab-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            skill = load_skill(path)
        except SkillError as exc:
            raise DraftInvalid([SkillError(label, exc.line, exc.message)]) from None
        problems = [SkillError(label, e.line, e.message) for e in live_problems(skill)]
    skill.path = label
    if skill.query_skill and skill.query_skill not in installed:
        problems.append(SkillError(label, _key_line(text, "query_skill"),
                                   f"query_skill {skill.query_skill!r} is not an installed skill; installed: "
                                   f"{', '.join(sorted(s.name for s in installed.all())) or 'none'}"))
    if problems:
        raise DraftInvalid(problems)
    return skill


class DraftView:
    """The installed skills with one draft laid over them (it replaces an installed skill of the same name).

    Read-only and per request: it has the `SkillRegistry` methods a turn and a router use, and the registry itself
    never learns of the draft.
    """

    def __init__(self, installed, draft: Skill):
        self.installed, self.draft = installed, draft

    @property
    def directory(self) -> Path:
        return self.installed.directory

    @property
    def errors(self) -> list[SkillError]:
        return self.installed.errors

    def refresh(self) -> bool:
        return self.installed.refresh()

    def get(self, name: str) -> Skill:
        if name == self.draft.name:
            return self.draft
        try:
            return self.installed.get(name)
        except KeyError:
            raise KeyError(f"unknown skill {name!r}; known: {', '.join(sorted(s.name for s in self.all()))}") from None

    def all(self, kind: str | None = None) -> list[Skill]:
        others = [s for s in self.installed.all(kind) if s.name != self.draft.name]
        return others + ([self.draft] if kind is None or self.draft.kind == kind else [])

    def __contains__(self, name: str) -> bool:
        return name == self.draft.name or name in self.installed


# ------------------------------------------------------------------------------------------------------ the lab
class SkillLab:
    """Try draft skill files against a running `Bot` (see the module docstring).

    Args:
        bot: the running `app.bot.Bot`: its settings, LM, skills, router, alignment layer and retrievers are used
            as they are, and never changed (until `save` writes a file into ``settings.skills_dir``).
        embedder: the sentence embedder for ranking when the bot runs without a selector (``FSB_SELECTOR=off``);
            default: its knowledge base's (the process-wide MiniLM, `retrievers.default_embedder`).
    Example:
        >>> lab = SkillLab(bot)
        >>> lab.validate(open("drafts/recipes.yaml").read())
        []
        >>> lab.rank(text, ["what can I cook with leeks?"])[0].rank
        1
    """

    def __init__(self, bot, embedder=None):
        self.bot = bot
        self._embedder = embedder
        self._own_selectors: dict[bool, object] = {}
        self._lock = threading.Lock()

    @property
    def settings(self):
        return self.bot.settings

    # ------------------------------------------------------------------------------------------- checking
    def validate(self, text: str, source: str | None = None) -> list[SkillError]:
        """Every problem in the draft, each with its line (empty: the draft is valid)."""
        try:
            self.load(text, source)
        except DraftInvalid as exc:
            return exc.errors
        return []

    def load(self, text: str, source: str | None = None) -> Skill:
        """The draft as a `Skill`. Raises `DraftInvalid`."""
        return load_draft(text, self.bot.skills, source)

    def starter(self, like: str | None = None, name: str = "my-skill") -> str:
        """A draft to begin with: installed skill ``like``'s file (default: the default skill, else the first
        response skill) renamed ``name``. Raises `LabError` when there is no such skill file."""
        installed = {s.name: s for s in self.bot.skills.all()}
        responses = sorted(n for n, s in installed.items() if s.kind == "response")
        skill = installed.get(like or self.settings.default_skill) or (
            installed[responses[0]] if responses and not like else None)
        if skill is None:
            raise LabError(f"no installed skill {like!r} to start from")
        try:
            text = Path(skill.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise LabError(f"cannot read {skill.path}: {exc}") from None
        return re.sub(r"(?m)^name:.*$", f"name: {name}", text, count=1)

    def render(self, text: str, message: str) -> Rendered:
        """The draft's prompt for ``message`` as the first turn, as a turn builds it: as many examples as fit the
        budget after the live turn and the reply. Fields a turn would retrieve or parse take their ``defaults:``."""
        skill = self.load(text)
        budget = context_budget(self.settings, self.bot.lm)
        room = skill.generation.max_new_tokens
        prompt = skill.prompt({"dialogue": [[message, ""]]}, budget_tokens=budget,
                              count_tokens=self.bot.lm.count_tokens, max_new_tokens=room)
        return Rendered(prompt.text, self.bot.lm.count_tokens(prompt.text), budget, room, prompt.examples,
                        prompt.dropped)

    # ----------------------------------------------------------------------------------------------- turns
    def stream(self, text: str, messages: Sequence[dict], sampling: dict | None = None,
               max_tokens: int | None = None):
        """A turn over ``messages`` (OpenAI-style) with the draft forced, through the bot's own `Bot.turn`: the
        safety stage still judges it, its parser and retriever run. No session, no memory. Returns a `TurnStream`."""
        skill = self.load(text)
        return self._bot_with(DraftView(self.bot.skills, skill)).turn(messages, skill=skill.name, sampling=sampling,
                                                                      max_tokens=max_tokens)

    def chat(self, text: str, messages: Sequence[dict], **kw):
        """`stream`, consumed: the `Reply`."""
        stream = self.stream(text, messages, **kw)
        stream.text()
        return stream.reply

    def _bot_with(self, view: DraftView):
        from .bot import Bot
        from .router import Router

        r = self.bot.router
        router = Router(view, selector=r.selector, first_stage=r.first_stage, default_skill=r.default_skill,
                        forced_safety=r.forced_safety)
        return Bot(self.settings, self.bot.lm, view, store=None, router=router, aligner=self.bot.aligner,
                   knowledge=self.bot.knowledge, messages=self.bot.messages)

    # ------------------------------------------------------------------------------------------------ rank
    def rank(self, text: str, messages: Sequence[str]) -> list[Rank]:
        """For each message (a one-turn dialogue), where the bot's history selector ranks the draft among the
        installed response skills (for a safety draft: the last-message stage, among safety and response skills).

        The selector is the bot's own (same method, shortlist, caches) with the draft added to its candidates; with
        ``FSB_SELECTOR=off`` the lab uses the default method. Scores are higher-is-better (`app.selector`).
        """
        from .selector import candidates_from_skills

        skill = self.load(text)
        view = DraftView(self.bot.skills, skill)
        safety = skill.kind == "safety"
        if skill.kind == "parser":
            return [Rank(m, skill.name, None, 0, None, "", "", note="a parser is never routed to: the response skill "
                         "that names it as query_skill runs it") for m in messages]
        candidates = candidates_from_skills(view.all("response") + (view.all("safety") if safety else []))
        if skill.name not in {c.name for c in candidates}:
            return [Rank(m, skill.name, None, len(candidates), None, "", "",
                         note="selector_shots: 0 or no example dialogue: the selector never picks this skill")
                    for m in messages]
        selector = copy.copy(self._selector(safety))  # the bot's scorers and caches, our candidates
        selector.source, selector.fallback = (lambda: candidates), None
        out = []
        for message in messages:
            selection = selector.select([[message, ""]])
            scores, emb = selection.scores, selection.details.get("embedding", {})
            order = sorted(scores, key=lambda n: _key(scores[n]))
            order += sorted((n for n in emb if n not in scores), key=lambda n: _key(emb[n]))
            value = {**emb, **scores}
            rank = order.index(skill.name) + 1
            out.append(Rank(message, skill.name, rank, len(order), value[skill.name], selection.method, order[0],
                            [(n, value[n]) for n in order[:3]], shortlisted=skill.name in scores))
        return out

    def _selector(self, safety: bool):
        base = self.bot.router.first_stage if safety else self.bot.router.selector
        if base is not None:
            return base
        with self._lock:
            if safety not in self._own_selectors:
                from .selector import Selector, SelectorLayout

                if self._embedder is None:  # the one the bot's knowledge base uses (the process-wide MiniLM)
                    kb = getattr(self.bot.knowledge, "kb", None)
                    if kb is not None:
                        self._embedder = kb.embedder
                    else:
                        from retrievers import default_embedder

                        self._embedder = default_embedder()
                layout = SelectorLayout.load(self.settings.prompts_dir / "selector.yaml")
                method = self.settings.selector if self.settings.selector != "off" else "best"
                self._own_selectors[safety] = Selector(lambda: [], lm=self.bot.lm, embedder=self._embedder,
                                                       layout=layout, method=method,
                                                       **({"history_turns": 1} if safety else {}))
            return self._own_selectors[safety]

    # ------------------------------------------------------------------------------------------------ save
    def save(self, text: str, overwrite: bool = False) -> Path:
        """Write a valid draft to ``<skills_dir>/<name>.yaml``; the bot serves it from its next turn.

        Raises:
            DraftInvalid: the draft does not load (nothing is written).
            SaveRefused: a skill file of that name exists and ``overwrite`` is false, or the folder is not writable.
        """
        skill = self.load(text)
        directory = Path(self.settings.skills_dir)
        existing = [p for p in (directory / f"{skill.name}.yaml", directory / f"{skill.name}.yml") if p.exists()]
        if existing and not overwrite:
            shipped = " (a shipped skill)" if _shipped(skill.name) else ""
            raise SaveRefused(f"{existing[0]} already exists{shipped}; choose another name, or replace it "
                              f"(overwrite) on purpose")
        target = existing[0] if existing else directory / f"{skill.name}.yaml"
        tmp = None
        try:
            # Write beside it, then rename: the registry never reads a half-written file.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{skill.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
            os.replace(tmp, target)
        except OSError as exc:
            raise SaveRefused(f"cannot write {target}: {exc}") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        self.bot.skills.refresh()
        return target


def _key(score: float) -> float:
    return -score if math.isfinite(score) else math.inf


def _shipped(name: str) -> bool:
    """Whether the package's own skills/ folder has a skill of this name."""
    from .settings import packaged_dir

    try:
        return any((packaged_dir("skills") / f"{name}{ext}").exists() for ext in (".yaml", ".yml"))
    except RuntimeError:
        return False
