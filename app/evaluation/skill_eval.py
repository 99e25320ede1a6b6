"""Run one skill over dialogue records shaped like ``shared/data/fsb`` and measure it with the paper's metrics.

Data plumbing only: each data folder's records become `Sample`s — the skill's input fields (``dialogue`` plus what the
folder's ``meta`` holds: persona sentences, memories, knowledge, KB rows, dialogue state) and the gold outputs (the
reply and, where the folder has them, a search query, KG triples, user facts or the dialogue state). The skill file
decides how those fields are laid out; nothing here is model-visible text.

Which turns: ``turns="last"`` (the default) scores the last turn of each record that has a gold answer for the skill's
target, so a small ``limit`` still spans many dialogues; ``turns="all"`` scores every such turn, as the paper did.
History is the last ``history_turns`` turns before the scored one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..skills import Skill
from . import metrics as M

# The paper's GPT-J-6B few-shot figures (shared/data/README.md), on the same 0-100 scale as ours.
PAPER: dict[str, dict[str, float]] = {
    "persona": {"ppl": 12.64, "f1": 18.67},
    "wow": {"ppl": 9.45, "f1": 23.69},
    "wit": {"ppl": 14.52, "f1": 15.8, "kf1": 12.2},
    "msc": {"ppl": 11.40, "f1": 19.5},
    "dialkg": {"bleu": 5.0, "f1": 26.6},
    "ed": {"ppl": 11.72, "f1": 18.1},
    "smd": {"bleu": 12.5, "entity_f1": 57.3},  # all three SMD domains together
    "mwoz-dst": {"joint_goal_accuracy": 13.9},  # five MultiWOZ domains together
}


class EvalError(Exception):
    """The data cannot be evaluated with this skill (unknown folder, no gold for the skill's target...)."""


@dataclass
class Sample:
    """One scored turn: the skill's input fields and every gold output the record has for it."""

    fields: dict[str, Any]
    gold: dict[str, str]  # "reply" and, where known, "query", "facts", "state"
    record: int
    turn: int
    knowledge: str = ""  # the text a knowledge-grounded reply should use (for kf1)
    entities: list[str] | None = None  # SMD gold entities of the reply
    kb_entities: set[str] = field(default_factory=set)  # SMD: every gold entity of the file, the global entity list


# ------------------------------------------------------------------------------------------------ adapters
def _window(dialogue: list, i: int, history: int) -> list[list[str]]:
    """Turns up to ``i`` with the bot side of turn ``i`` left open."""
    turns = [[str(t[0]), str(t[1]) if len(t) > 1 else ""] for t in dialogue[max(0, i - history + 1) : i]]
    return turns + [[str(dialogue[i][0]), ""]]


def _bot(dialogue: list, i: int) -> str:
    turn = dialogue[i]
    return str(turn[1]).strip() if len(turn) > 1 and turn[1] else ""


def _triples(node) -> list[list[str]]:
    """Every [subject, relation, object] inside OpenDialKG's nested per-turn paths."""
    if isinstance(node, list) and len(node) == 3 and all(isinstance(x, str) for x in node) and all(node):
        return [node]
    if isinstance(node, list):
        return [t for x in node for t in _triples(x)]
    return []


def _triple_text(t: list[str]) -> str:
    return f"{t[0]} {t[1].replace('_', ' ')} {t[2]}"  # the KG retriever's passage text


def _path_text(triples: list[list[str]]) -> str:
    return " ".join(f"[{', '.join(t)}]" for t in triples)  # the dialkg-parse output layout


def _state_text(raw: str) -> str:
    pairs = sorted(M.parse_state(raw))
    return ", ".join(f"{s}={v}" for s, v in pairs) or "none"


def _per_turn(record: dict, index: int, history: int, extra: Callable[[dict, int], tuple[dict, dict, dict]]):
    dialogue = record["dialogue"]
    for i in range(len(dialogue)):
        fields, gold, more = extra(record, i)
        reply = _bot(dialogue, i)
        gold = {**gold, **({"reply": reply} if reply and reply != "none" else {})}
        yield Sample({"dialogue": _window(dialogue, i, history), **fields}, gold, index, i, **more)


def _meta_turn(record: dict, i: int) -> list:
    meta = record.get("meta") or []
    return meta[i] if i < len(meta) and isinstance(meta[i], list) else []


def _plain(record, i):
    return {}, {}, {}


def _persona(record, i):
    return {"persona": list(record.get("meta") or [])}, {}, {}


def _msc(record, i):
    meta = record.get("meta") or {}
    return {"user_memory": list(meta.get("user", [])), "bot_memory": list(meta.get("assistant", []))}, {}, {}


def _wow(record, i):
    knowledge = [str(k) for k in _meta_turn(record, i)]
    return {"knowledge": knowledge}, {}, {"knowledge": " ".join(knowledge)}


def _wit(record, i):
    kb = record.get("KB") or []
    knowledge = [str(k) for k in (kb[i] if i < len(kb) else [])]
    queries = record.get("query") or []
    query = [q for q in (queries[i] if i < len(queries) else []) if q]
    return {"knowledge": knowledge}, ({"query": query[0]} if query else {}), {"knowledge": " ".join(knowledge)}


def _dialkg(record, i):
    paths = record.get("query") or []
    triples = _triples(paths[i]) if i < len(paths) else []
    knowledge = [_triple_text(t) for t in triples]
    return ({"knowledge": knowledge}, ({"query": _path_text(triples)} if triples else {}),
            {"knowledge": " ".join(knowledge)})


def _smd(record, i):
    rows = [str(r) for r in record.get("meta") or []]
    gold_ent = record.get("gold_ent") or []
    entities = [str(e) for e in (gold_ent[i] if i < len(gold_ent) else [])]
    return {"kb": rows}, {}, {"entities": entities}


def _mwoz(record, i):
    states = record.get("state") or []
    state = _state_text(states[i + 1]) if i + 1 < len(states) else "none"
    return {"state": state}, {"state": state}, {}


def _msc_parse(record, i):
    memory = record.get("user_memory") or []
    facts = " ".join(str(f) for f in (memory[i] if i < len(memory) else [])) or "none"
    return {}, {"facts": facts}, {}


def _whole_record(gold_key: str, to_text: Callable[[Any], str]):
    """Parser folders with one query per record, for the dialogue as given (its last turn may lack a bot side)."""

    def samples(record: dict, index: int, history: int) -> Iterator[Sample]:
        dialogue = [[str(t[0]), str(t[1]) if len(t) > 1 else ""] for t in record["dialogue"]][-history:]
        gold = to_text(record.get(gold_key))
        if gold:
            yield Sample({"dialogue": dialogue}, {gold_key: gold}, index, len(record["dialogue"]) - 1)

    return samples


def _per(extra, history: int | None = None):
    """Every turn of a record; ``history`` fixes the window where the runtime does (msc-parse sees one turn)."""
    return lambda record, index, window: _per_turn(record, index, history or window, extra)


ADAPTERS: dict[str, Callable[[dict, int, int], Iterator[Sample]]] = {
    "persona": _per(_persona),
    "msc": _per(_msc),
    "wow": _per(_wow),
    "wit": _per(_wit),
    "ed": _per(_plain),
    "dialkg": _per(_dialkg),
    "dailydialog": _per(_plain),
    "smd-navigate": _per(_smd),
    "smd-schedule": _per(_smd),
    "smd-weather": _per(_smd),
    **{f"mwoz-{d}": _per(_mwoz) for d in ("hotel", "restaurant", "taxi", "train", "attraction")},
    "msc-parse": _per(_msc_parse, history=1),  # the bot hands the memory writer the user's last message only
    "wit-parse": _whole_record("query", lambda q: str(q or "").strip()),
    "dialkg-parse": _whole_record("query", lambda q: _path_text(_triples(q or []))),
}


def dataset_name(path: Path) -> str:
    """The data folder's name, lower case: ``.../fsb/dialKG/valid.json`` and ``.../fsb/dialKG`` are both ``dialkg``."""
    return (path.name if path.is_dir() else path.parent.name).lower()


def read_records(path: Path) -> list[dict]:
    """A JSON list of records, or a folder holding ``valid.json`` (else ``train.json``)."""
    if path.is_dir():
        for name in ("valid.json", "test.json", "train.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise EvalError(f"{path}: no valid.json, test.json or train.json in this folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: cannot read the records: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "dialogue" in r for r in data):
        raise EvalError(f"{path}: expected a JSON list of {{\"meta\", \"dialogue\"}} records")
    return data


def gold_key(skill: Skill) -> str:
    return "reply" if skill.target == "dialogue" else skill.target


def samples_for(skill: Skill, records: list[dict], dataset: str, turns: str = "last", limit: int | None = None,
                history: int = 8) -> list[Sample]:
    """The turns to score: those with gold for the skill's target; the last one per record, or all of them."""
    adapter = ADAPTERS.get(dataset.lower())
    if adapter is None:
        raise EvalError(f"no adapter for data folder {dataset!r}; known: {', '.join(sorted(ADAPTERS))} "
                        f"(safety folders are measured by the selector evaluation)")
    key = gold_key(skill)
    out: list[Sample] = []
    for index, record in enumerate(records):
        usable = [s for s in adapter(record, index, history) if s.gold.get(key)]
        out.extend(usable[-1:] if turns == "last" else usable)
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise EvalError(f"data folder {dataset!r} has no gold {key!r} for skill {skill.name!r}")
    if any(s.entities is not None for s in out):
        # Entity F1 as in Mem2Seq: predicted entities are the words of the reply found in the file's entity list.
        vocabulary = {str(e).lower() for r in records for turn in r.get("gold_ent") or [] for e in turn}
        for s in out:
            s.kb_entities = vocabulary
    return out


# ------------------------------------------------------------------------------------------------- running
@dataclass
class EvalResult:
    skill: str
    dataset: str
    turns: str
    metrics: dict[str, float]
    paper: dict[str, float]
    n: int
    seconds: float
    model: str
    examples: int  # shots in the prompt (after the budget)
    predictions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"skill": self.skill, "dataset": self.dataset, "n": self.n, "turns": self.turns,
                **{k: round(v, 2) for k, v in self.metrics.items()},
                "paper": self.paper, "model": self.model, "examples": self.examples,
                "seconds": round(self.seconds, 1), "seconds_per_sample": round(self.seconds / max(self.n, 1), 2)}


def paper_figures(skill: Skill, dataset: str) -> dict[str, float]:
    if skill.target == "state":
        return PAPER["mwoz-dst"]
    if skill.target != "dialogue":
        return {}
    return PAPER.get("smd" if dataset.startswith("smd-") else dataset, {})


def chained(samples: list[Sample], parser: Skill, lm, budget_tokens: int, history_turns: int) -> list[Sample]:
    """The samples as the bot's turn would see them: the parser's own output in the field it fills (its
    ``target``), where the dataset put the gold input (`app.bot.run_parser`, the bot's own call)."""
    from ..bot import run_parser

    out = []
    for sample in samples:
        fields = dict(sample.fields)
        fields[parser.target] = run_parser(parser, lm, sample.fields["dialogue"], budget_tokens, history_turns) \
            or "none"
        out.append(Sample(fields, sample.gold, sample.record, sample.turn, knowledge=sample.knowledge,
                          entities=sample.entities, kb_entities=sample.kb_entities))
    return out


def chainable(skill: Skill, parser: Skill | None) -> bool:
    """Whether ``--chain`` changes the input: the parser fills a field the response skill's template shows (the
    dialogue state). A search query or KG path feeds a live retriever instead, whose results the dataset gives."""
    return parser is not None and parser.target not in ("query", "dialogue") and \
        ("{{ " + parser.target) in skill.template


def evaluate(skill: Skill, samples: list[Sample], lm, dataset: str, budget_tokens: int, turns: str = "last",
             perplexity: bool = True, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Generate the skill's output for every sample and score it; response skills also get the gold's perplexity."""
    from ..bot import parser_output
    from ..lm import Sampling

    g = skill.generation
    sampling = Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, repetition_penalty=g.repetition_penalty,
                        seed=0)
    key = gold_key(skill)
    started = time.perf_counter()
    preds, golds, rows = [], [], []
    nll = tokens = 0.0
    shots = 0
    for done, sample in enumerate(samples, 1):
        prompt = skill.prompt(sample.fields, budget_tokens=budget_tokens, count_tokens=lm.count_tokens)
        shots = prompt.examples
        if skill.kind == "parser":  # the bot's own parser call: lookup decoding where asked, loops cut
            text = parser_output(skill, lm, prompt)
        else:
            text = "".join(lm.generate(prompt.text, stop=skill.stop, max_new_tokens=g.max_new_tokens,
                                       sampling=sampling, prefix=prompt.prefix)).strip()
        gold = sample.gold[key]
        preds.append(text)
        golds.append(gold)
        if perplexity and key == "reply":
            continuation = " " + gold
            nll -= lm.score(prompt.text, [continuation], prefix=prompt.prefix)[0]
            tokens += lm.count_tokens(continuation)
        rows.append({"record": sample.record, "turn": sample.turn, "prediction": text, "gold": gold})
        if progress:
            progress(done, len(samples))
    result = score(skill, samples, preds, golds)
    if perplexity and key == "reply" and tokens:
        result["ppl"] = math.exp(nll / tokens)
    return EvalResult(skill.name, dataset, turns, result, paper_figures(skill, dataset), len(samples),
                      time.perf_counter() - started, getattr(lm, "name", "?"), shots, rows)


def score(skill: Skill, samples: list[Sample], preds: list[str], golds: list[str]) -> dict[str, float]:
    """The metrics that apply to this skill's target, in percent."""
    n = max(len(preds), 1)
    key = gold_key(skill)
    out: dict[str, float] = {}
    if key == "reply":
        out["f1"] = 100 * sum(M.unigram_f1(p, g) for p, g in zip(preds, golds)) / n
        out["bleu"] = 100 * M.corpus_bleu(preds, golds)
        grounded = [(p, s.knowledge) for p, s in zip(preds, samples) if s.knowledge]
        if grounded:
            out["kf1"] = 100 * sum(M.unigram_f1(p, k) for p, k in grounded) / len(grounded)
        with_entities = [(p, s) for p, s in zip(preds, samples) if s.entities]
        if with_entities:
            out["entity_f1"] = 100 * sum(M.set_f1(_entities_in(p, s.kb_entities), s.entities)
                                         for p, s in with_entities) / len(with_entities)
    elif key == "state":
        pred_states, gold_states = [M.parse_state(p) for p in preds], [M.parse_state(g) for g in golds]
        out["joint_goal_accuracy"] = 100 * M.joint_goal_accuracy(pred_states, gold_states)
        out["slot_f1"] = 100 * sum(M.set_f1(p, g) for p, g in zip(pred_states, gold_states)) / n
    else:
        out["exact_match"] = 100 * sum(M.exact_match(p, g) for p, g in zip(preds, golds)) / n
        out["query_f1"] = 100 * sum(M.unigram_f1(p, g) for p, g in zip(preds, golds)) / n
        if any(g.startswith("[") for g in golds):  # KG paths: also compare the triples as sets
            out["triple_f1"] = 100 * sum(M.set_f1(_triple_set(p), _triple_set(g)) for p, g in zip(preds, golds)) / n
    return out


def _entities_in(prediction: str, vocabulary: set[str]) -> set[str]:
    words = set(prediction.lower().split())
    return {e for e in vocabulary if e.lower() in words}


def _triple_set(text: str) -> set[tuple[str, ...]]:
    from retrievers.kg import parse_paths  # the KG retriever's own reading of the parser's output

    return {tuple(" ".join(p.lower().split()) for p in t) for t in parse_paths(text)}
