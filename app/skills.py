"""Skills are prompt files: YAML under ``skills/`` loaded into a validated `Skill`, rendered into few-shot prompts.

A file holds metadata, a Jinja template that lays out one example, and the examples. The prompt for a turn is
``example + separator + example + ... + separator + query``, where the query is the same template rendered over the
live fields with the target (the reply, or a parser's output field) left open. The examples form a constant prefix,
so the LM backend encodes them once. Every problem is reported as ``file:line: message`` and never takes the bot down:
the registry keeps serving the last good version of a broken file.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

OPEN = "\x00"  # stands where the target goes in a query; the prompt is cut just before it
RETRIEVERS = ("none", "kb", "kg", "web", "memory")


class FileProblem(Exception):
    """A problem in a data file (a skill, the first stage's constants…), located at ``path:line``."""

    def __init__(self, path: Path | str, line: int, message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}")


class SkillError(FileProblem):
    """A problem in a skill file, located at ``path:line``."""


class Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(60, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    # Prompt-lookup decoding (app/lm/lookup.py) for a greedy parser whose output copies its prompt (the dialogue
    # state's slot names and values): the same text in fewer forward passes. Output that copies little is slower.
    lookup: bool = False
    # The reply may not copy a run of tokens (`app.lm.decoding.AVOID_NGRAM`) from the bot's own earlier replies in
    # its prompt: a small base model otherwise answers turn after turn with its previous reply, word for word.
    avoid_repeats: bool = True


class Speakers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = "User"
    bot: str = "Assistant"


class SafetyRefusal(BaseModel):
    """A safety skill's own refusal: what the assistant names as its concern and what it offers instead, both in its
    own voice. The alignment layer opens the refusal with them (`app.align.Aligner.refuse`)."""

    model_config = ConfigDict(extra="forbid")
    concern: str = Field(min_length=1)  # completes "I'm sorry, but I can't help with that, because ..."
    offer: str = Field(min_length=1)  # the next sentence: what the assistant can do instead


class Skill(BaseModel):
    """One skill file. Unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = Field(min_length=1)
    kind: Literal["response", "parser", "safety"]
    dataset: str = ""
    retriever: Literal["none", "kb", "kg", "web", "memory"] = "none"
    query_skill: str | None = None
    aligned: bool = False
    triggers: list[str] = []  # regular expressions; a user turn matching one picks this skill without scoring
    selector_shots: int = Field(2, ge=0)
    # Skills of one family are one task split by domain (the MultiWOZ booking skills: hotel, restaurant, taxi...): when
    # the selector picks one, the user's last message alone may hand the turn to a sibling it clearly asks about
    # (`app.selector.FamilyVote`), whatever the history was about; a chat whose last message clearly asks for a task
    # goes to the skill of a family that it asks for.
    family: str = Field("", pattern=r"^([a-z0-9][a-z0-9_-]*)?$")
    speakers: Speakers = Speakers()
    template: str
    target: str = "dialogue"
    separator: str = "\n\n"
    stop: list[str] = ["\n"]
    generation: Generation = Generation()
    defaults: dict[str, Any] = {}
    examples: list[dict[str, Any]] = Field(min_length=1)
    # More example dialogues for choosing the skill only (the selector's embedding ranking and, past ``examples``, its
    # prompt shots); never in the reply's prompt, so they cost a turn nothing. Each needs a ``dialogue``.
    selector_examples: list[dict[str, Any]] = []
    # How many of ``selector_examples`` the history selector's prompt shows after the first ``selector_shots`` of
    # ``examples`` (0: none; past ``examples`` as before). For a skill that stands for a dataset, its selector examples
    # can be dialogues of that dataset, which a history from it resembles more than our own replies. The last-message
    # stage never shows selector examples (its constants were fitted without them).
    selector_prompt_shots: int = Field(0, ge=0)
    refusal: SafetyRefusal | None = None  # safety skills: the concern their refusal names and what it offers instead

    path: str = Field("", exclude=True)
    example_lines: list[int] = Field(default_factory=list, exclude=True)

    @field_validator("triggers")
    @classmethod
    def _triggers_compile(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern.strip():
                raise ValueError("a trigger may not be empty")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"trigger {pattern!r} is not a valid regular expression: {exc}") from None
        return v

    def triggered_by(self, message: str) -> str | None:
        """The first trigger that matches ``message`` (case-insensitive), or None."""
        for pattern in self.triggers:
            if re.search(pattern, message, flags=re.IGNORECASE):
                return pattern
        return None

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("a stop string may not be empty")
        return v

    # ------------------------------------------------------------------------------------------ rendering
    def render_example(self, fields: dict[str, Any]) -> str:
        """Render one example (all fields present, target filled)."""
        return _compile(self.template).render(**self._context(fields)).strip("\n")

    def render_query(self, fields: dict[str, Any]) -> str:
        """Render the live turn with the target open: the text ends where the model's output begins."""
        values = {**self.defaults, **fields}
        if self.target == "dialogue":
            turns = [list(t) for t in values.get("dialogue", [])]
            if not turns:
                raise SkillError(self.path, 1, "the query needs a dialogue with at least one user turn")
            turns[-1] = [turns[-1][0], OPEN]
            values["dialogue"] = turns
        else:
            values[self.target] = OPEN
        text = _compile(self.template).render(**self._context(values)).lstrip("\n")
        cut = text.find(OPEN)
        if cut < 0:
            raise SkillError(self.path, 1, f"the template never shows the target {self.target!r}")
        text = text[:cut]
        # "Assistant: " + OPEN: leave the space to the model, which tokenises " word" as one piece.
        return text[:-1] if text.endswith(" ") else text

    def _context(self, values: dict[str, Any]) -> dict[str, Any]:
        turns = values.get("dialogue") or []
        lines = []
        for turn in turns:
            user, bot = (list(turn) + ["", ""])[:2]
            if user:
                lines.append(f"{self.speakers.user}: {user}")
            if bot:
                lines.append(f"{self.speakers.bot}: {bot}")
        return {**values, "history": "\n".join(lines), "user": self.speakers.user, "bot": self.speakers.bot}

    def prompt(
        self,
        fields: dict[str, Any],
        budget_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
        max_examples: int | None = None,
        max_new_tokens: int | None = None,
    ) -> "Prompt":
        """The few-shot prompt for ``fields``: as many examples as fit the token budget (less ``max_new_tokens`` for
        the reply, the skill's own setting by default), then the open query."""
        query = self.render_query(fields)
        shots = [self.render_example(e) for e in self.examples[: max_examples or len(self.examples)]]
        dropped = 0
        if budget_tokens is not None and count_tokens is not None:
            room = budget_tokens - (max_new_tokens or self.generation.max_new_tokens) - count_tokens(query)
            kept, used = [], 0
            for shot in shots:
                cost = count_tokens(shot + self.separator)
                if used + cost > room:
                    break
                kept.append(shot)
                used += cost
            dropped = len(shots) - len(kept)
            if dropped:
                log.info("skill %s: %d of %d examples dropped to fit %d tokens", self.name, dropped, len(shots),
                         budget_tokens)
            shots = kept
        prefix = "".join(s + self.separator for s in shots)
        return Prompt(text=prefix + query, prefix=prefix, examples=len(shots), dropped=dropped)


def context_budget(settings, lm) -> int:
    """The one context budget every prompt is built within (examples + knowledge + history + reply):
    ``FSB_CONTEXT_TOKENS``, capped by the model's own context length."""
    return min(settings.context_tokens, lm.context_length)


@dataclass(frozen=True)
class Prompt:
    text: str
    prefix: str  # the constant head (the examples), cached by the backend
    examples: int
    dropped: int = 0


_env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                          lstrip_blocks=True, autoescape=False)
_compiled: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    t = _compiled.get(template)
    if t is None:
        t = _compiled[template] = _env.from_string(template)
    return t


# ----------------------------------------------------------------------------------------------- loading
def _line_map(node, path=(), out=None) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return 1


def yaml_problem(exc: yaml.YAMLError) -> tuple[int, str]:
    """The 1-based line and the message of a YAML syntax error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return (mark.line + 1 if mark else 1), f"YAML syntax error: {getattr(exc, 'problem', None) or exc}"


def validation_problem(exc: ValidationError, lines: dict[tuple, int], unknown_hint: str) -> tuple[int, str, tuple]:
    """The line, the message and the key path of a data file's first validation error; ``unknown_hint`` follows an
    unknown key's name, e.g. ``"(allowed: a, b)"``."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    what = ".".join(str(p) for p in loc) or "file"
    if err["type"] == "missing":
        msg = f"missing required key '{what}'"
    elif err["type"] == "extra_forbidden":
        msg = f"unknown key '{what}' {unknown_hint}"
    else:
        msg = f"{what}: {err['msg']}"
    return _line_for(lines, loc), msg, loc


def read_mapping(path: Path, error: Callable[[Path, int, str], Exception],
                 not_mapping: str) -> tuple[dict, dict[tuple, int]]:
    """A YAML file that must hold a mapping: its data and the line of every key path. Unreadable files, YAML syntax
    errors and other top-level shapes raise ``error(path, line, message)`` (a `FileProblem` class, or any factory);
    ``not_mapping`` says what the file should be."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, 1, f"cannot read the file: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(path, *yaml_problem(exc)) from None
    if not isinstance(data, dict):
        raise error(path, 1, not_mapping)
    for key_node, _ in node.value:  # `1: x` or `null: x` are YAML keys, but not names
        if key_node.tag != "tag:yaml.org,2002:str":
            raise error(path, key_node.start_mark.line + 1,
                        f"{key_node.value!r} is not a key name: keys are words such as name:, kind:, examples:")
    return data, _line_map(node)


def load_skill(path: Path) -> Skill:
    """Parse and validate one skill file. Raises `SkillError` naming the file, the line and the fix."""
    data, lines = read_mapping(path, SkillError,
                               "a skill file must be a mapping of keys (name:, kind:, template:, examples: ...)")
    try:
        skill = Skill(**data)
    except ValidationError as exc:
        line, msg, loc = validation_problem(exc, lines, f"(allowed: {', '.join(sorted(Skill.model_fields))})")
        if loc and loc[0] == "retriever" and exc.errors()[0]["type"] not in ("missing", "extra_forbidden"):
            msg = f"unknown retriever {data.get('retriever')!r}; use one of: {', '.join(RETRIEVERS)}"
        raise SkillError(path, line, msg) from None
    skill.path = str(path)
    skill.example_lines = [_line_for(lines, ("examples", i)) for i in range(len(skill.examples))]
    if skill.name != path.stem:
        raise SkillError(path, _line_for(lines, ("name",)), f"name {skill.name!r} must match the file name "
                                                              f"{path.stem!r}")
    if skill.refusal is not None and skill.kind != "safety":
        raise SkillError(path, _line_for(lines, ("refusal",)), "refusal: only a safety skill declines a turn; remove "
                                                                 "it or set kind: safety")
    try:
        _compile(skill.template)
    except jinja2.TemplateSyntaxError as exc:
        raise SkillError(path, _line_for(lines, ("template",)) + exc.lineno, f"template: {exc.message}") from None
    for i, example in enumerate(skill.selector_examples):
        turns = example.get("dialogue") if isinstance(example, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(t, list) and t for t in turns)):
            raise SkillError(path, _line_for(lines, ("selector_examples", i)),
                             f"selector example {i + 1} needs a dialogue: a list of [user, assistant] turns")
    for i, example in enumerate(skill.examples):
        line = skill.example_lines[i]
        if skill.target != "dialogue" and skill.target not in example:
            raise SkillError(path, line, f"example {i + 1} lacks the target field {skill.target!r}")
        try:
            skill.render_example(example)
        except jinja2.UndefinedError as exc:
            raise SkillError(path, line, f"example {i + 1}: the template uses a field this example lacks "
                                         f"({exc.message}); add it to the example or to defaults:") from None
        except Exception as exc:  # noqa: BLE001 - any template failure is the author's to fix
            raise SkillError(path, line, f"example {i + 1}: cannot render: {exc}") from None
    return skill


@dataclass
class LoadReport:
    skills: dict[str, Skill]
    errors: list[SkillError] = field(default_factory=list)


def load_dir(directory: Path) -> LoadReport:
    """Load every ``*.yaml`` skill in ``directory``; problems are collected, never raised."""
    skills: dict[str, Skill] = {}
    errors: list[SkillError] = []
    for path in sorted(Path(directory).glob("*.y*ml")):
        try:
            skill = load_skill(path)
        except SkillError as exc:
            errors.append(exc)
            continue
        if skill.name in skills:
            errors.append(SkillError(path, 1, f"duplicate skill name {skill.name!r} (also in "
                                              f"{skills[skill.name].path})"))
            continue
        skills[skill.name] = skill
    for skill in skills.values():
        if skill.query_skill and skill.query_skill not in skills:
            errors.append(SkillError(skill.path, 1, f"query_skill {skill.query_skill!r} is not a loaded skill"))
    return LoadReport(skills, errors)


class SkillRegistry:
    """The skills in a folder, reloaded when files change; a broken file keeps its last good version serving."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._skills: dict[str, Skill] = {}
        self.errors: list[SkillError] = []
        self._stamp: tuple = ()
        self.refresh()

    def _current_stamp(self) -> tuple:
        """(name, mtime, size) of every skill file: checked on every lookup (a turn makes ~50), so one directory read
        and one stat per file (pathlib's glob and two stats per file took 2.5x as long, and under many concurrent
        turns every system call waits for the interpreter lock again)."""
        try:
            with os.scandir(self.directory) as entries:
                files = [(e.name, e.stat()) for e in entries if fnmatch.fnmatchcase(e.name, "*.y*ml")]
        except OSError:
            return ()
        return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in files))

    def refresh(self) -> bool:
        """Reload if any file was added, changed or removed. Returns True when something was reloaded."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        with self._lock:
            report = load_dir(self.directory)
            broken = {Path(e.path).stem for e in report.errors}
            merged = dict(report.skills)
            for name in broken:  # keep the last good version of a file that broke while serving
                if name in self._skills and name not in merged and (self.directory / Path(
                        self._skills[name].path).name).exists():
                    merged[name] = self._skills[name]
            for err in report.errors:
                log.error("skill file problem: %s", err)
            self._skills, self.errors, self._stamp = merged, report.errors, stamp
        return True

    def get(self, name: str) -> Skill:
        self.refresh()
        try:
            return self._skills[name]
        except KeyError:
            raise KeyError(f"unknown skill {name!r}; known: {', '.join(sorted(self._skills))}") from None

    def all(self, kind: str | None = None) -> list[Skill]:
        self.refresh()
        return [s for s in self._skills.values() if kind is None or s.kind == kind]

    def __contains__(self, name: str) -> bool:
        self.refresh()
        return name in self._skills
