"""Fit and measure the router's first stage (`app.first_stage`): which last messages decline the turn, which take it.

Two steps, so the slow one runs once:

    .venv/bin/python bench/fit_first_stage.py score   # LM scores of every item, cached (resumes; slow on a CPU)
    .venv/bin/python bench/fit_first_stage.py fit     # fit the constants on the fit halves, print before/after
    .venv/bin/python bench/fit_first_stage.py report  # the before/after table with the constants in prompts/
    .venv/bin/python bench/fit_first_stage.py cascade # only the cascade's margins (part of ``fit``)
    .venv/bin/python bench/fit_first_stage.py selector  # the history selector's cascade margin

``score`` runs the embedded model once per message: the message alone under every safety and response skill's
selector prompt (`PromptScorer`, as the first stage does), the content-free input under each of them, the shipped
router's old first stage (the baseline commit's skill files, the hybrid selector, "any safety or turn-level winner
decides"), and the history selector's choice for multi-turn items. Everything lands in
``bench/results/first-stage-scores.jsonl`` keyed by the skill's prompt hash, so an edited skill file is rescored and
nothing else. ``fit`` and ``report`` only read that cache (the embedding votes are recomputed: MiniLM, milliseconds).

The data and its halves: every set is split in two with a fixed seed (`SEED`), stratified by label; the constants are
fitted on the ``fit`` halves only and the ``report`` halves are what the table calls held out.

- ``align-dev``: ``shared/data/alignment/dev.jsonl`` (100 regular, 50 safety): safety must be declined, regular not.
- ``safety-nonadv``, ``safety-topic``: a seeded sample of ``shared/data/fsb/safety-*`` user turns (the paper's
  "must catch"; safety-topic holds much ordinary talk about religion and politics, so it is reported, weighted low).
- ``selector-dev``: ``shared/data/fsb/selector-dev.jsonl`` (270 dialogues; 5 per label in each half are scored, 70 +
  70, to fit a 2-core CPU): nothing may be declined; the whole route (first stage, then the history selector) must
  give the label.
- ``live-chat``: ``tests/data/live-chat.jsonl``, every turn of our own conversations labelled with the expected skill.
- ``instructions``: ``tests/data/instructions-benign.jsonl`` and ``instructions-unsafe.jsonl``, our own.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 15
SHARED = ROOT.parent / "shared" / "data"
CACHE = ROOT / "bench" / "results" / "first-stage-scores.jsonl"
BASELINE_COMMIT = "9e97248"  # the router before issue 15: hybrid first stage, any safety / turn-level winner decides
SAMPLE = {"safety-nonadv": 40, "safety-topic": 40}
SELECTOR_PER_HALF = 5  # selector-dev: 5 dialogues per label in each half (70 + 70 of 270), for CPU time
SET_ORDER = ["content-free", "align-dev", "instructions", "live-chat", "selector-dev", "safety-nonadv",
             "safety-topic"]


# ------------------------------------------------------------------------------------------------------ items
def _halves(items: list[dict], key, per_half: int | None = None) -> list[dict]:
    """Mark each item ``fit`` or ``report``: per label (in sorted order), a seeded shuffle of its items in file order;
    the first half (rounded down) fits. With ``per_half``, only that many of each label's items per half are kept."""
    by = defaultdict(list)
    for it in items:
        by[key(it)].append(it)
    rng = random.Random(SEED)
    kept = []
    for label in sorted(by):
        group = list(by[label])
        rng.shuffle(group)
        cut = len(group) // 2
        for i, it in enumerate(group):
            it["half"] = "fit" if i < cut else "report"
            if per_half is None or (i < cut and i < per_half) or (i >= cut and i - cut < per_half):
                kept.append(it)
    return kept


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_items(shared: Path = SHARED, tests: Path = ROOT / "tests" / "data") -> list[dict]:
    """Every item: ``set``, ``id``, ``half``, ``text`` (the last user message), ``unsafe`` (must be declined),
    and for dialogue items ``dialogue`` and ``label`` (the expected skill's dataset label)."""
    items: list[dict] = []
    align = [{"set": "align-dev", "id": r["id"], "text": r["instruction"], "unsafe": r["category"] == "safety"}
             for r in _jsonl(shared / "alignment" / "dev.jsonl")]
    items += _halves(align, lambda it: it["unsafe"])
    for name, n in SAMPLE.items():
        rows = json.loads((shared / "fsb" / name / "valid.json").read_text(encoding="utf-8"))
        picked = random.Random(SEED).sample(range(len(rows)), min(n, len(rows)))
        part = [{"set": name, "id": i, "text": rows[i]["dialogue"][-1][0], "unsafe": True} for i in sorted(picked)]
        items += _halves(part, lambda it: True)
    dev = [{"set": "selector-dev", "id": i, "dialogue": r["dialogue"], "label": r["skill"],
            "text": r["dialogue"][-1][0], "unsafe": False}
           for i, r in enumerate(_jsonl(shared / "fsb" / "selector-dev.jsonl"))]
    items += _halves(dev, lambda it: it["label"], SELECTOR_PER_HALF)
    live = tests / "live-chat.jsonl"
    if live.exists():
        rows = [{"set": "live-chat", "id": i, "dialogue": r["dialogue"], "label": r["skill"],
                 "text": r["dialogue"][-1][0], "unsafe": r["skill"].startswith("safety-")}
                for i, r in enumerate(_jsonl(live))]
        items += _halves(rows, lambda it: it["label"])
    for name in ("instructions-benign.jsonl", "instructions-unsafe.jsonl"):
        path = tests / name
        if path.exists():
            rows = [{"set": "instructions", "id": f"{path.stem}:{r['id']}", "text": r["instruction"],
                     "unsafe": r["category"] == "safety"} for r in _jsonl(path)]
            items += _halves(rows, lambda it: it["unsafe"])
    return items


# ------------------------------------------------------------------------------------------------------ cache
def text_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def load_cache(path: Path = CACHE) -> dict[str, dict]:
    """``{text_key: {"text", "scores": {"skill@prefixhash": mean log-prob}, "before": {...}, "history": {...}}}``."""
    out: dict[str, dict] = {}
    if path.exists():
        for row in _jsonl(path):
            entry = out.setdefault(row["key"], {"text": row.get("text", ""), "scores": {}, "before": {},
                                                "history": {}})
            for field in ("scores", "before", "history"):
                entry[field].update(row.get(field, {}))
    return out


def baseline_skills(commit: str) -> Path:
    """The skill files of ``commit``, extracted into a temporary folder."""
    data = subprocess.run(["git", "archive", commit, "skills"], cwd=ROOT, check=True, capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="fsb-baseline-"))
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(folder)
    return folder / "skills"


def prefix_id(name: str, prefix: str) -> str:
    return f"{name}@{hashlib.blake2b(prefix.encode(), digest_size=5).hexdigest()}"


def dialogue_key(dialogue, candidates) -> str:
    blob = json.dumps([dialogue, sorted(c.key for c in candidates)])
    return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def score(args) -> None:
    """Fill the cache for ``args.phase``: ``first`` (the first stage's LM rows of every item and the content-free
    inputs), ``before`` (the old router's first stage), ``history`` (the history selector, dialogue items)."""
    from app.first_stage import load_first_stage
    from app.lm import load_lm
    from app.selector import PromptScorer, Selector, SelectorLayout, registry_source
    from app.settings import Settings
    from app.skills import SkillRegistry
    from retrievers.embed import default_embedder

    settings = Settings.load()
    started = time.perf_counter()
    lm = load_lm(settings)
    print(f"model {lm.name} loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    embedder = default_embedder()
    layout = SelectorLayout.load(settings.prompts_dir / "selector.yaml")
    registry = SkillRegistry(settings.skills_dir)
    stage = load_first_stage(settings, registry, lm, embedder, layout, "prompt")
    scorer = PromptScorer(lm, layout, low_precision=False)
    rows = stage.rows(list(stage.source()))
    ids = {c.name: prefix_id(c.name, scorer.prefix(c)) for c in rows}
    cache = load_cache(args.cache)
    items = load_items(args.shared)
    if args.sets:
        items = [it for it in items if it["set"] in args.sets]
    if args.half:
        items = [it for it in items if it["half"] == args.half]
    if args.phase == "first":
        extra = stage.data.content_free + list(args.texts or [])
        order = [{"set": "content-free", "text": t} for t in extra] + items
    elif args.phase == "before":
        old = SkillRegistry(baseline_skills(args.baseline))
        before = Selector(registry_source(old, include_safety=True), lm=lm, embedder=embedder, layout=layout,
                          method="hybrid", history_turns=1, low_precision=False)
        order = items
    else:
        history = Selector(registry_source(registry), lm=lm, embedder=embedder, layout=layout, method="hybrid",
                           low_precision=False)
        response = list(history.source())
        order = [it for it in items if "dialogue" in it]
    order = sorted(order, key=lambda it: (it.get("half") == "report", SET_ORDER.index(it["set"])))
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    with open(args.cache, "a", encoding="utf-8") as sink:
        for n, it in enumerate(order):
            key = text_key(it["text"])
            entry = cache.setdefault(key, {"text": it["text"], "scores": {}, "before": {}, "history": {}})
            row: dict = {"key": key, "text": it["text"]}
            if args.phase == "first":
                todo = [c for c in rows if ids[c.name] not in entry["scores"]]
                if todo:
                    got = scorer.scores(((it["text"], ""),), todo)
                    row["scores"] = {ids[name]: round(v, 5) for name, v in got.items()}
            elif args.phase == "before" and args.baseline not in entry["before"]:
                row["before"] = {args.baseline: before.select([[it["text"], ""]]).skill}
            elif args.phase == "history":
                dk = dialogue_key(it["dialogue"], response)
                if dk not in entry["history"]:
                    row["history"] = {dk: history.select(it["dialogue"]).skill}
            if len(row) > 2:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                done += 1
                for field in ("scores", "before", "history"):
                    entry[field].update(row.get(field, {}))
            if n % 10 == 0:
                print(f"{args.phase}: {n}/{len(order)} items ({done} new) {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)
    print(f"{args.phase}: done, {done} new of {len(order)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- offline parts
class CachedEmbedder:
    """An embedder that remembers every text it encoded (the offline fit embeds the same messages many times)."""

    def __init__(self, embedder):
        self.embedder, self.name, self.dim = embedder, embedder.name, embedder.dim
        self._rows: dict[str, object] = {}

    def encode(self, texts):
        import numpy as np

        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            for t, v in zip(missing, self.embedder.encode(missing)):
                self._rows[t] = v
        return np.stack([self._rows[t] for t in texts]) if texts else self.embedder.encode([])


class Offline:
    """The first stage's decision on cached LM scores: the same `app.first_stage.decide`, the votes recomputed."""

    def __init__(self, args):
        from app.first_stage import FirstStage, FirstStageData
        from app.selector import PromptScorer, SelectorLayout, registry_source
        from app.settings import Settings
        from app.skills import SkillRegistry
        from retrievers.embed import default_embedder

        settings = Settings.load()
        self.registry = SkillRegistry(settings.skills_dir)
        self.old = SkillRegistry(baseline_skills(args.baseline))
        self.baseline = args.baseline
        layout = SelectorLayout.load(settings.prompts_dir / "selector.yaml")
        self.data = FirstStageData.load(settings.prompts_dir / "first-stage.yaml")
        self.items = load_items(args.shared)
        embedder = CachedEmbedder(default_embedder())
        embedder.encode([it["text"] for it in self.items])  # one batch, then every lookup is a dict hit
        self.stage = FirstStage(registry_source(self.registry, include_safety=True, selector_examples=False),
                                data=self.data,
                                kind_of=self.registry.get, embedder=embedder, layout=layout, method="embedding")
        self.candidates = list(self.stage.source())
        self.kinds = self.stage.kinds(self.candidates)
        scorer = PromptScorer(None, layout, low_precision=False)
        self.rows = self.stage.rows(self.candidates)
        self.ids = {c.name: prefix_id(c.name, scorer.prefix(c)) for c in self.rows}
        self.response = [c for c in self.candidates if self.registry.get(c.name).kind == "response"]
        self.cache = load_cache(args.cache)
        cf = [self.lm_scores(t) for t in self.data.content_free]
        self.content_free = ({n: sum(d[n] for d in cf) / len(cf) for n in self.ids}
                             if all(d is not None for d in cf) else None)
        self._evidence: dict[str, object] = {}
        self._labels: dict[tuple, str] = {}
        self._triggers: dict[tuple, str | None] = {}

    def lm_scores(self, text: str) -> dict[str, float] | None:
        entry = self.cache.get(text_key(text))
        if entry is None or any(self.ids[n] not in entry["scores"] for n in self.ids):
            return None
        return {n: entry["scores"][self.ids[n]] for n in self.ids}

    def evidence(self, text: str, stage=None):
        """The evidence for ``text`` (None without cached LM scores); ``stage`` may hold other counter-examples."""
        import dataclasses

        stage = stage or self.stage
        key = (id(stage), stage.data.constants.neighbours, text)
        if key not in self._evidence:
            lm = self.lm_scores(text)
            if lm is None or self.content_free is None:
                self._evidence[key] = None
            else:
                ev = stage.evidence(text, self.candidates, lm_scores=lm)
                self._evidence[key] = dataclasses.replace(ev, content_free=dict(self.content_free))
        return self._evidence[key]

    def label(self, name: str | None, registry=None) -> str | None:
        if name is None:
            return None
        key = (id(registry or self.registry), name)
        if key not in self._labels:
            skill = (registry or self.registry).get(name)
            self._labels[key] = skill.dataset or skill.name
        return self._labels[key]

    def triggered(self, text: str, registry, kind: str):
        key = (id(registry), kind, text)
        if key not in self._triggers:
            self._triggers[key] = next((s.name for s in registry.all(kind=kind) if s.triggered_by(text)), None)
        return self._triggers[key]

    def history(self, it: dict) -> str | None:
        if "dialogue" not in it:
            return None
        entry = self.cache.get(text_key(it["text"]), {})
        return entry.get("history", {}).get(dialogue_key(it["dialogue"], self.response))

    def route(self, it: dict, constants, stage=None) -> dict | None:
        """The new router on ``it``: ``declined`` (a safety skill name or None), ``taken``, ``label`` (the routed
        skill's label; None when the history selector decided and its choice is not cached)."""
        from app.first_stage import DECLINE, TAKE, decide

        text = it["text"]
        hit = self.triggered(text, self.registry, "safety")
        if hit:
            return {"declined": hit, "taken": None, "label": self.label(hit)}
        hit = self.triggered(text, self.registry, "response")
        if hit:
            return {"declined": None, "taken": hit, "label": self.label(hit)}
        ev = self.evidence(text, stage)
        if ev is None:
            return None
        d = decide(ev, self.kinds, constants)
        if d.action == DECLINE:
            return {"declined": d.skill, "taken": None, "label": self.label(d.skill)}
        if d.action == TAKE:
            return {"declined": None, "taken": d.skill, "label": self.label(d.skill)}
        return {"declined": None, "taken": None, "label": self.label(self.history(it))}

    def route_before(self, it: dict) -> dict | None:
        """The baseline router: its triggers, then any safety or turn-level winner of its hybrid first stage."""
        from app.selector import turn_level

        text = it["text"]
        hit = self.triggered(text, self.old, "safety")
        if hit:
            return {"declined": hit, "taken": None, "label": self.label(hit, self.old)}
        hit = self.triggered(text, self.old, "response")
        if hit:
            return {"declined": None, "taken": hit, "label": self.label(hit, self.old)}
        winner = self.cache.get(text_key(text), {}).get("before", {}).get(self.baseline)
        if winner is None:
            return None
        skill = self.old.get(winner)
        if skill.kind == "safety":
            return {"declined": winner, "taken": None, "label": self.label(winner, self.old)}
        if turn_level(skill):
            return {"declined": None, "taken": winner, "label": self.label(winner, self.old)}
        return {"declined": None, "taken": None, "label": self.label(self.history(it))}


TURN_LABELS = ("assistant", "wow", "wit", "dialKG")
SAFETY_SETS = ("align-dev", "instructions", "live-chat", "safety-nonadv")  # fitted on; safety-topic reported only
# The turn gate is fitted under a floor: selector-dev accuracy (fit half) at least that of the history selector alone
# (the turn gate closed) less one item in 70.
SELECTOR_SLACK = 0.015
BENIGN_TARGET = 0.05  # the ceiling on benign messages declined


def table(off: Offline, routes: dict[str, dict | None], half: str) -> dict:
    """The figures of one router on one half: per set, declined on unsafe / benign, routing accuracy where labelled,
    the share of benign instructions a turn-level skill takes."""
    out: dict = {}
    for name in ("align-dev", "instructions", "live-chat", "selector-dev", "safety-nonadv", "safety-topic"):
        items = [it for it in off.items if it["set"] == name and it["half"] == half]
        got = [(it, routes.get(_ikey(it))) for it in items]
        got = [(it, r) for it, r in got if r is not None]
        if not got:
            continue
        row: dict = {"n": len(got), "of": len(items)}
        unsafe = [r for it, r in got if it["unsafe"]]
        benign = [(it, r) for it, r in got if not it["unsafe"]]
        if unsafe:
            row["declined_unsafe"] = _rate(r["declined"] is not None for r in unsafe)
        if benign:
            row["declined_benign"] = _rate(r["declined"] is not None for _, r in benign)
        if name in ("align-dev", "instructions") and benign:
            row["taken_benign"] = _rate(r["taken"] is not None for _, r in benign)
        labelled = [(it, r) for it, r in got if "label" in it and r["label"] is not None]
        if labelled:
            row["accuracy"] = _rate(r["label"] == it["label"] for it, r in labelled)
            row["n_accuracy"] = len(labelled)
        out[name] = row
    return out


def _ikey(it: dict) -> str:
    return f"{it['set']}:{it['id']}"


def _rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 3) if flags else float("nan")


def routes_after(off: Offline, constants, stage=None) -> dict:
    return {_ikey(it): off.route(it, constants, stage) for it in off.items}


def routes_before(off: Offline) -> dict:
    return {_ikey(it): off.route_before(it) for it in off.items}


def objective(t: dict) -> tuple[tuple, float]:
    """(safety, turn) figures of merit on one half's table, higher is better.

    safety, the issue's targets as a constrained choice: first whether the mean share of benign messages declined
    (align-dev, instructions, live-chat, selector-dev) is within 0.05, then the mean share of unsafe ones declined
    (`SAFETY_SETS`), then the fewer benign declined. turn: the mean of the routing accuracy on live-chat, on
    selector-dev, and the share of benign instructions a turn-level skill takes (align-dev and instructions together).
    """
    rec = [t[s]["declined_unsafe"] for s in SAFETY_SETS if s in t and "declined_unsafe" in t[s]]
    fpr = [t[s]["declined_benign"] for s in ("align-dev", "instructions", "live-chat", "selector-dev")
           if s in t and "declined_benign" in t[s]]
    recall, declined = (sum(rec) / len(rec) if rec else 0.0), (sum(fpr) / len(fpr) if fpr else 0.0)
    safety = (max(fpr, default=0.0) <= BENIGN_TARGET + 1e-9, round(recall, 6), -round(declined, 6))
    turn = [t[s]["accuracy"] for s in ("live-chat", "selector-dev") if s in t and "accuracy" in t[s]]
    taken = [t[s]["taken_benign"] for s in ("align-dev", "instructions") if s in t and "taken_benign" in t[s]]
    if taken:
        turn.append(sum(taken) / len(taken))
    return safety, (sum(turn) / len(turn) if turn else 0.0)


def fit(args) -> None:
    """Grid search on the fit halves: first the safety gate (and k) on the safety merit, then the turn gate on the
    turn merit, among the settings that keep selector-dev at the history selector's own accuracy (`SELECTOR_SLACK`);
    prints the constants and the before/after table."""
    from app.first_stage import Gate

    import statistics

    from app.first_stage import decide

    off = Offline(args)
    base = off.data.constants
    # the LM margins of every fit item: the cascade off, or a decisive vote would leave its margin out
    uncascaded = base.model_copy(update={g: getattr(base, g).model_copy(update={"sure_above": None,
                                                                                  "sure_below": None})
                                         for g in ("safety", "turn")})
    margins = {"safety": [], "turn": []}
    for it in off.items:
        ev = off.evidence(it["text"]) if it["half"] == "fit" else None
        if ev is not None:
            for gate, m in decide(ev, off.kinds, uncascaded).lm_margins.items():
                margins[gate].append(m)
    c_s, c_t = (round(statistics.median(margins[g]), 3) for g in ("safety", "turn"))
    best = None
    for k in args.neighbours:
        for temp in args.temperatures:
            temp = temp or None  # 0: similarity weights
            stage = _with_k(off, k, temp)
            for w in args.weights:
                for th in _grid(-1.0, 1.0, 0.025):
                    c = base.model_copy(update={"neighbours": k, "vote_temperature": temp,
                                                "safety": Gate(weight=w, threshold=th, center=c_s),
                                                "turn": Gate(weight=0.0, threshold=99.0)})
                    s, _ = objective(table(off, routes_after(off, c, stage), "fit"))
                    if best is None or s > best[0]:
                        best = (s, k, temp, w, th)
    _, k, temp, w_s, th_s = best
    stage = _with_k(off, k, temp)
    base = base.model_copy(update={"vote_temperature": temp})
    closed = base.model_copy(update={"neighbours": k, "safety": Gate(weight=w_s, threshold=th_s, center=c_s),
                                     "turn": Gate(weight=0.0, threshold=99.0)})
    floor = table(off, routes_after(off, closed, stage), "fit")["selector-dev"]["accuracy"] - SELECTOR_SLACK
    best_t = None
    for w in args.weights:
        for th in _grid(-1.0, 1.0, 0.025):
            c = base.model_copy(update={"neighbours": k, "safety": Gate(weight=w_s, threshold=th_s, center=c_s),
                                        "turn": Gate(weight=w, threshold=th, center=c_t)})
            figures = table(off, routes_after(off, c, stage), "fit")
            if figures["selector-dev"]["accuracy"] < floor:
                continue  # the stage may not cost the history selector its selector-dev accuracy
            _, t = objective(figures)
            if best_t is None or t > best_t[0] + 1e-9:
                best_t = (t, w, th)
    _, w_t, th_t = best_t
    print(f"fitted on the fit halves: neighbours {k}, vote temperature {temp}, safety weight {w_s} threshold {th_s:.2f} center {c_s}, "
          f"turn weight {w_t} threshold {th_t:.2f} center {c_t}  (safety: within target {best[0][0]}, recall "
          f"{best[0][1]:.3f}, declined benign {-best[0][2]:.3f}; turn merit {best_t[0]:.3f})")
    fitted = base.model_copy(update={"neighbours": k,
                                     "safety": Gate(weight=w_s, threshold=round(th_s, 2), center=c_s),
                                     "turn": Gate(weight=w_t, threshold=round(th_t, 2), center=c_t)})
    fitted = fit_cascade(off, fitted, stage)
    report_tables(off, fitted, stage)


def fit_cascade(off: Offline, constants, stage=None):
    """The cascade's margins (`app.first_stage.Gate.sure_above` / ``sure_below``), fitted on the fit halves, one gate
    after the other (safety, then the turn): for a quantile q, the gate's margins are the q-quantiles of how far its
    LM term pushed the score the other way over the fit items; the smallest q (in 0.50..1.00 by 0.01) under which no
    fit-half decision changes wins. Prints the share
    of messages the LM still scores and the decisions changed, on both halves. Returns the constants with them."""
    import numpy as np

    from app.first_stage import decide, lm_needed

    c0 = constants.model_copy(update={
        "safety": constants.safety.model_copy(update={"sure_above": None, "sure_below": None}),
        "turn": constants.turn.model_copy(update={"sure_above": None, "sure_below": None})})
    rows = []
    for it in off.items:
        ev = off.evidence(it["text"], stage)
        if ev is None:
            continue
        d = decide(ev, off.kinds, c0)
        terms = {g: (getattr(c0, g).weight * (m - getattr(c0, g).center) if m is not None else 0.0)
                 for g, m in d.lm_margins.items()}
        rows.append((it["half"], ev, d.action, d.skill, terms))
    fit_terms = {g: np.array([t[g] for h, _, _, _, t in rows if h == "fit"]) for g in ("safety", "turn")}

    def with_q(c, g: str, q: float):
        """``c`` with gate ``g``'s margins at the q-quantiles of the fit items' LM terms."""
        up = float(np.quantile(-fit_terms[g], q))  # a "yes" the LM term pulled down by this much
        down = float(np.quantile(fit_terms[g], q))  # a "no" the LM term pushed up by this much
        gate = getattr(c, g).model_copy(update={"sure_above": round(max(up, 0.0), 3),
                                                "sure_below": round(max(down, 0.0), 3)})
        return c.model_copy(update={g: gate})

    def outcome(c, half):
        items = [(ev, a, sk) for h, ev, a, sk, _ in rows if h == half]
        skipped = changed = 0
        for ev, action, skill in items:
            d = decide(ev, off.kinds, c)
            skipped += d.lm_margins["safety"] is None
            changed += (d.action, d.skill) != (action, skill)
        return len(items), skipped, changed

    # Each gate on its own quantile (the safety gate first, the turn gate then with the safety margins fitted): the
    # smallest q under which no fit-half decision changes.
    c, qs = c0, {}
    for g in ("safety", "turn"):
        chosen = None
        for q in [round(1.0 - 0.01 * i, 2) for i in range(51)]:
            trial = with_q(c, g, q)
            if outcome(trial, "fit")[2]:
                break
            chosen = (q, trial)
        if chosen is None:
            print(f"cascade: every quantile changes a fit decision; the LM always scores for the {g} gate")
            continue
        qs[g], c = chosen
    print(f"cascade fitted on the fit halves: q {qs}, safety sure_above {c.safety.sure_above} sure_below "
          f"{c.safety.sure_below}, turn sure_above {c.turn.sure_above} sure_below {c.turn.sure_below}")
    needed = lambda half: sum(lm_needed(c, ev.vote_safety, ev.vote_turn)  # noqa: E731
                              for h, ev, *_ in rows if h == half)
    for half in ("fit", "report"):
        n, skipped, changed = outcome(c, half)
        scored = needed(half)
        print(f"  {half:6} half: the LM scores {scored}/{n} messages ({scored / max(n, 1):.0%}), the safety rows "
              f"for {n - skipped}; decisions changed against the full rule: {changed}")
    return c


def fit_selector_cascade(off: Offline) -> float | None:
    """The hybrid history selector's cascade margin (``FSB_SELECTOR_SURE_MARGIN``), fitted on selector-dev's fit
    half: the smallest margin (0.01..0.30 by 0.01) at which letting a clear embedding winner decide alone (the LM
    not run) routes the fit half's dialogues no worse than the hybrid always scoring. The hybrid's choices come
    from the cache (``score --phase history``); the embedding scores are recomputed. Prints both halves."""
    from app.selector import EmbeddingScorer, registry_source, to_dialogue

    scorer = EmbeddingScorer(off.stage.embedding.embedder, history_turns=5, top=3)
    candidates = list(registry_source(off.registry)())
    rows = []
    for it in off.items:
        chosen = off.history(it) if it["set"] == "selector-dev" else None
        if chosen is None:
            continue
        emb = scorer.scores(to_dialogue(it["dialogue"])[-5:], candidates)
        (first, a), (_, b) = sorted(emb.items(), key=lambda kv: -kv[1])[:2]
        rows.append((it["half"], it["label"], off.label(chosen), off.label(first), a - b))

    def figures(margin, half):
        got = [(label, (emb if margin is not None and lead >= margin else hybrid), lead)
               for h, label, hybrid, emb, lead in rows if h == half]
        acc = sum(label == pick for label, pick, _ in got) / max(len(got), 1)
        skipped = sum(margin is not None and lead >= margin for _, _, lead in got) / max(len(got), 1)
        return len(got), acc, skipped

    _, always, _ = figures(None, "fit")
    chosen = next((m for m in _grid(0.01, 0.30, 0.01) if figures(m, "fit")[1] >= always - 1e-9), None)
    print(f"selector cascade fitted on selector-dev's fit half: sure margin {chosen}")
    for half in ("fit", "report"):
        n, base, _ = figures(None, half)
        _, acc, skipped = figures(chosen, half)
        print(f"  {half:6} half ({n} dialogues): accuracy {base:.3f} with the LM always -> {acc:.3f} with the "
              f"cascade; the LM skipped on {skipped:.0%}")
    return chosen


def _grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 4) for i in range(n + 1)]


def _with_k(off: Offline, k: int, temperature: float | None = None):
    from app.first_stage import FirstStage

    if k == off.data.constants.neighbours and temperature == off.data.constants.vote_temperature:
        return off.stage
    key = (k, temperature)
    off.stages = getattr(off, "stages", {})
    if key in off.stages:
        return off.stages[key]
    data = off.data.with_constants(neighbours=k, vote_temperature=temperature)
    stage = FirstStage(off.stage.source, data=data, kind_of=off.registry.get, embedder=off.stage.embedding.embedder,
                       layout=None, method="embedding")
    off.stages[key] = stage
    return stage


def report_tables(off: Offline, constants, stage=None) -> None:
    before, after = routes_before(off), routes_after(off, constants, stage)
    cols = [("declined_unsafe", "declined unsafe"), ("declined_benign", "declined benign"),
            ("taken_benign", "benign taken by a turn-level skill"), ("accuracy", "routing accuracy")]
    for half in ("fit", "report"):
        tb, ta = table(off, before, half), table(off, after, half)
        print(f"\n{half} half   (before: commit {off.baseline}'s router; after: the calibrated first stage)")
        print(f"{'set':14} {'n':>8}  " + "  ".join(f"{label[:22]:>22}" for _, label in cols))
        for name in [n for n in SET_ORDER if n in ta or n in tb]:
            a, b = ta.get(name, {}), tb.get(name, {})
            cells = []
            for key, _ in cols:
                if key in a or key in b:
                    cells.append(f"{_fmt(b.get(key))} -> {_fmt(a.get(key))}".rjust(22))
                else:
                    cells.append(" " * 22)
            n = f"{a.get('n', b.get('n', 0))}/{a.get('of', b.get('of', 0))}"
            print(f"{name:14} {n:>8}  " + "  ".join(cells))


def _fmt(v) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="LM scores of every item into the cache (resumes)")
    sc.add_argument("--sets", nargs="*", default=None, help="only these sets (align-dev, selector-dev, ...)")
    sc.add_argument("--phase", choices=["first", "before", "history"], default="first")
    sc.add_argument("--half", choices=["fit", "report"], default=None)
    sc.add_argument("--texts", nargs="*", default=None, help="also score these texts (e.g. content-free candidates)")
    ft = sub.add_parser("fit", help="fit the constants on the fit halves; print them and the before/after table")
    ft.add_argument("--neighbours", type=int, nargs="*", default=[5, 9, 15])
    ft.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.25, 0.5, 1.0],
                    help="LM weights tried (up to 1: the neighbour vote leads, the LM adjusts)")
    ft.add_argument("--temperatures", type=float, nargs="*", default=[0.0, 0.1, 0.05, 0.025],
                    help="vote temperatures tried (0: similarity weights)")
    rp = sub.add_parser("report", help="the before/after table with the constants in prompts/first-stage.yaml")
    cs = sub.add_parser("cascade", help="fit only the cascade's margins (the gates as in prompts/first-stage.yaml)")
    sl = sub.add_parser("selector", help="fit the hybrid history selector's cascade margin (selector-dev fit half)")
    for p in (sc, ft, rp, cs, sl):
        p.add_argument("--cache", type=Path, default=CACHE)
        p.add_argument("--shared", type=Path, default=SHARED)
        p.add_argument("--baseline", default=BASELINE_COMMIT)
    args = ap.parse_args()
    if args.command == "score":
        score(args)
    elif args.command == "fit":
        fit(args)
    elif args.command == "selector":
        fit_selector_cascade(Offline(args))
    elif args.command == "cascade":
        off = Offline(args)
        fit_cascade(off, off.data.constants)
    else:
        off = Offline(args)
        report_tables(off, off.data.constants)


if __name__ == "__main__":
    main()
