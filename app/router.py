"""The router: which skill takes a turn, and why. The one routing policy, called by the bot and every evaluation.

The stages, in order (the first that decides wins):

1. **Safety triggers.** A safety skill's regular expressions match the user's last message: the turn is declined.
   Unambiguous phrasings ("how do I build a pipe bomb") are caught without any scoring, and before a forced skill,
   so no caller can skip them.
2. **A forced skill** (``fsb:<skill>``, the native ``skill`` field, a session's skill, the web chat's dropdown) takes
   the turn, unless the safety stage (4) flags the last message: then the safety skill overrules it and the route
   says so (``overruled``). ``forced_safety=False`` (``FSB_FORCED_SAFETY=off``) lets a server owner trust callers.
3. **Response-skill triggers** ("search the web for …"): the user named what they want.
4. **The last message alone** is scored against every safety and response skill. A safety winner declines the turn;
   a turn-level winner (an aligned skill such as the general assistant, or a knowledge skill) takes it, because the
   history must not outvote a one-off instruction or a question about something new. Any other winner falls through.
5. **The history selector** (the paper's prompt-based classifier and its faster siblings, `app.selector`) picks among
   the response skills from the recent dialogue, without earlier declined exchanges (`without_declines`). When its
   winner belongs to a family (one task split by domain: the booking skills), the last message alone may hand the
   turn to the sibling it clearly asks for (the family vote), or to a chat skill when it clearly leaves the task; when
   it belongs to none (small talk), to the task skill the message clearly asks for (a chat turning into a task). When
   its winner is a knowledge skill (a kb, web or kg retriever) but the last message alone is clearly small talk (the
   first stage's turn vote below ``small_talk_floor``, ``prompts/first-stage.yaml``), the best chit-chat skill takes
   the turn instead: "Are you a robot?" is not a question for the knowledge graph.
6. **The default skill**, when no selector is configured.

`Route` records the outcome (skill, method, scores, why) for the turn trace.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from .selector import TURN_LEVEL_RETRIEVERS, turn_level
from .skills import Skill, SkillRegistry


class UnknownSkill(ValueError):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown skill {name!r}; available: {', '.join(sorted(known))}")
        self.name = name


@dataclass
class Route:
    """Where a turn goes and why."""

    skill: Skill
    method: str  # trigger | forced | safety | last-turn | the history selector's method (prompt, hybrid…) | default
    why: str
    scores: dict[str, float] = field(default_factory=dict)
    forced: str | None = None  # the skill the caller asked for
    overruled: str | None = None  # the forced skill the safety stage overruled
    trigger: str | None = None
    first_stage: dict | None = None  # the last-message stage's winner and scores, when it ran
    selection: dict | None = None  # the history selector's own trace, when it decided
    latency_s: float = 0.0

    @property
    def declined(self) -> bool:
        return self.skill.kind == "safety"

    def trace(self) -> dict:
        out = {"skill": self.skill.name, "method": self.method, "why": self.why, "forced": bool(self.forced),
               "scores": {k: round(v, 4) for k, v in self.scores.items()}, "latency_s": round(self.latency_s, 4)}
        if self.forced:
            out["forced_skill"] = self.forced
        if self.overruled:
            out["overruled"] = self.overruled
        if self.trigger:
            out["trigger"] = self.trigger
        if self.selection:
            out.update({k: v for k, v in self.selection.items() if k not in out})
        return out


class Router:
    """Holds the routing policy (see the module docstring).

    Args:
        skills: the `SkillRegistry` (re-read on every call, so edited skill files count at once).
        selector: the history selector over response skills (``None``: the default skill answers).
        first_stage: the selector over safety + response skills that scores the last message alone (``None``: no
            safety stage; triggers still apply).
        default_skill: the skill used when no selector is configured.
        forced_safety: whether the safety stage judges turns whose skill is forced (on by default).
        refusal_start: the words the alignment layer's refusals open with (``prompts/align-*.yaml``); an earlier
            exchange whose reply opens with them is left out of the history selector's history ("" keeps all).
    """

    def __init__(self, skills: SkillRegistry, selector=None, first_stage=None, default_skill: str = "persona",
                 forced_safety: bool = True, refusal_start: str = ""):
        self.skills = skills
        self.selector = selector
        self.first_stage = first_stage
        self.default_skill = default_skill
        self.forced_safety = forced_safety
        self.refusal_start = refusal_start.strip()

    def skill(self, name: str | None) -> Skill:
        name = name or self.default_skill
        try:
            return self.skills.get(name)
        except KeyError:
            raise UnknownSkill(name, [s.name for s in self.skills.all()]) from None

    def route(self, dialogue: Sequence[Sequence[str]], forced: str | None = None) -> Route:
        """The route for the open turn of ``dialogue`` (``[user, assistant]`` pairs, the last one open)."""
        started = time.perf_counter()
        route = self._route([list(t) for t in dialogue], forced)
        route.latency_s = time.perf_counter() - started
        return route

    def _route(self, dialogue, forced: str | None) -> Route:
        last = (dialogue[-1][0] if dialogue else "") or ""
        wanted = self.skill(forced) if forced else None
        triggered = self._triggered(last, kinds=("safety",))
        if triggered is not None:
            skill, pattern = triggered
            return Route(skill, "trigger", f"the message matches a trigger of {skill.name}", trigger=pattern,
                         forced=forced, overruled=forced)
        if wanted is not None:
            if self.forced_safety:
                winner, first = self.first_stage_winner(last)
                if winner is not None and winner.kind == "safety":
                    return Route(winner, "safety", f"the safety stage declined the message; the forced skill "
                                 f"{forced} was overruled", scores=first["scores"], forced=forced, overruled=forced,
                                 first_stage=first)
            return Route(wanted, "forced", "the caller forced this skill", forced=forced)
        triggered = self._triggered(last, kinds=("response",))
        if triggered is not None:
            skill, pattern = triggered
            return Route(skill, "trigger", f"the message matches a trigger of {skill.name}", trigger=pattern)
        winner, first = self.first_stage_winner(last)
        if winner is not None and turn_level(winner):
            method = "safety" if winner.kind == "safety" else "last-turn"
            why = ("the safety stage declined the message" if winner.kind == "safety" else
                   f"the last message alone is best explained by {winner.name}, a turn-level skill")
            return Route(winner, method, why, scores=first["scores"], first_stage=first)
        if self.selector is not None:
            history, declined = without_declines(dialogue, self.refusal_start)
            selection = self.selector.select(history)
            why = "the history selector chose it"
            moved = getattr(selection, "moved_from", None)
            if moved:
                was = self.skills.get(moved).family if moved in self.skills else ""
                now = self.skills.get(selection.skill).family if selection.skill in self.skills else ""
                asks = (f"its sibling {selection.skill}" if was and was == now else
                        f"the task skill {selection.skill}" if now else f"{selection.skill}, not a task")
                why = f"the history selector chose {moved}; the last message asks for {asks} (the family vote)"
            chosen, trace = self.skill(selection.skill), selection.trace()
            chat = self._small_talk_skill(chosen, first, selection.scores)
            if chat is not None:
                why = (f"the history selector chose {chosen.name}, a knowledge skill, but the last message is small "
                       f"talk (turn vote {first['vote']['turn']} < {self.first_stage.data.constants.small_talk_floor})"
                       f": the best chit-chat skill takes it")
                trace["small_talk_from"] = chosen.name
                chosen = chat
            if declined:
                trace["declined_exchanges_left_out"] = declined
            return Route(chosen, selection.method, why, scores=dict(selection.scores), first_stage=first,
                         selection=trace)
        return Route(self.skill(None), "default", "no selector is configured", first_stage=first)

    def _small_talk_skill(self, chosen: Skill, first: dict | None, scores) -> Skill | None:
        """Stage 5's small-talk floor: the chit-chat skill that takes a turn the history selector gave to a knowledge
        skill (kb, web or kg retriever) although the last message alone is clearly small talk (the first stage's
        turn vote below ``small_talk_floor``): the best-scored response skill that is neither turn-level nor part of
        a task family. None: the selector's choice stands."""
        data = getattr(self.first_stage, "data", None)  # a stand-in first stage has no constants: no floor
        floor = getattr(getattr(data, "constants", None), "small_talk_floor", None)
        vote = ((first or {}).get("vote") or {}).get("turn")
        if floor is None or vote is None or vote >= floor or chosen.retriever not in TURN_LEVEL_RETRIEVERS:
            return None
        chat = [(v, s) for n, v in dict(scores).items() if n in self.skills
                and (s := self.skills.get(n)).kind == "response" and not turn_level(s) and not s.family]
        return max(chat, key=lambda vs: vs[0])[1] if chat else None

    def flagged(self, message: str) -> Skill | None:
        """The safety skill that would decline ``message`` as a turn of its own, whatever skill is forced."""
        triggered = self._triggered(message, kinds=("safety",))
        if triggered is not None:
            return triggered[0]
        winner, _ = self.first_stage_winner(message)
        return winner if winner is not None and winner.kind == "safety" else None

    def first_stage_winner(self, message: str) -> tuple[Skill | None, dict | None]:
        """Stage 4: the last message alone against every safety and response skill.

        A `app.first_stage.FirstStage` (what `build_router` installs) makes the calibrated decision: the winner is the
        safety skill that declines, the turn-level skill that takes the turn, or a skill that is neither (the turn
        falls through); the returned trace carries its calibrated scores and thresholds. Any other selector (a
        stand-in) is taken at its word: its winner is the winner.
        """
        if self.first_stage is None or not message.strip():
            return None, None
        decide = getattr(self.first_stage, "decide", None)
        if decide is not None:
            decision = decide(message)
            first = decision.trace()
            name = first["skill"]
            winner = self.skills.get(name) if name in self.skills else None
            if decision.skill is None and winner is not None and turn_level(winner):
                winner = None  # nothing takes the turn (only when the stage has no anchor skill to name)
            return winner, first
        selection = self.first_stage.select([[message, ""]])
        winner = self.skills.get(selection.skill) if selection.skill in self.skills else None
        first = {"skill": selection.skill, "flagged": winner is not None and winner.kind == "safety",
                 "scores": {k: round(v, 4) for k, v in selection.scores.items()},
                 "latency_s": round(selection.latency_s, 4)}
        return winner, first

    def _triggered(self, message: str, kinds: Sequence[str]) -> tuple[Skill, str] | None:
        if not message:
            return None
        for kind in kinds:
            for skill in self.skills.all(kind=kind):
                pattern = skill.triggered_by(message)
                if pattern is not None:
                    return skill, pattern
        return None


def without_declines(dialogue: list[list[str]], refusal_start: str) -> tuple[list[list[str]], int]:
    """``dialogue`` without its earlier declined exchanges (a request and the refusal that answered it), and how many
    were left out. The history selector tells conversational skills apart by how the talk goes; a pipe-bomb request
    and its refusal say nothing about that, and scored as history they pull the next turn towards whatever skill
    explains a refusal best. The open last turn always stays (the bot leaves the same exchanges out of a reply's
    prompt, `app.bot.Bot`)."""
    if not refusal_start or len(dialogue) < 2:
        return dialogue, 0
    kept = [t for t in dialogue[:-1] if not (t[1] or "").lstrip().startswith(refusal_start)]
    left_out = len(dialogue) - 1 - len(kept)
    return (kept + dialogue[-1:], left_out) if left_out else (dialogue, 0)


def refusal_start(settings) -> str:
    """The opening words of the alignment layer's refusals (``refusal.answer_start`` of
    ``prompts/align-<variant>.yaml``); "" when that file cannot be read (the bot reports a broken alignment file)."""
    from .align import AlignError, load_align_prompt, prompt_path

    try:
        return load_align_prompt(prompt_path(settings.prompts_dir, settings.align_variant)).refusal.answer_start
    except (AlignError, OSError, ValueError):
        return ""


def build_router(settings, skills: SkillRegistry, lm, embedder) -> Router:
    """The router the bot runs, from settings: the history selector over the response skills and, with
    ``FSB_SAFETY`` on, the calibrated last-message stage over the safety and response skills (`app.first_stage`,
    its constants and counter-examples in ``prompts/first-stage.yaml``). Every caller (the server, each evaluation)
    builds it here, so what is measured is what ships."""
    from .first_stage import load_first_stage
    from .selector import Selector, SelectorLayout, registry_source

    selector = first = None
    if settings.selector != "off":
        layout = SelectorLayout.load(settings.prompts_dir / "selector.yaml")
        selector = Selector(registry_source(skills), lm=lm, embedder=embedder, layout=layout,
                            method=settings.selector, fallback=settings.fallback_skill or None,
                            sure_margin=settings.selector_sure_margin, shots=settings.selector_shots,
                            shortlist=settings.selector_shortlist, weight=settings.selector_weight, checkpoints=True,
                            family_margin=settings.selector_family_margin)
        if settings.safety:
            first = load_first_stage(settings, skills, lm, embedder, layout, settings.selector)
    return Router(skills, selector=selector, first_stage=first, default_skill=settings.default_skill,
                  forced_safety=settings.forced_safety, refusal_start=refusal_start(settings))


def warm(router: Router) -> None:
    """Encode every selector prompt now (prefix caches), not on the first user's turn."""
    for stage in (router.selector, router.first_stage):
        if stage is not None:
            stage.warm()
