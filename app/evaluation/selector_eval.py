"""``fsb eval selector``: accuracy, macro-F1, confusion matrix and median latency of the skill selectors.

The examples are JSON lines ``{"skill": label, "dialogue": [[user, assistant], ..., [user, ""]]}``.

By default the shipped selector is measured: the candidates are exactly the bot's (every selectable skill file, its
own examples, its own ``selector_shots``), nothing is derived from the evaluated examples, and ``--selector pipeline``
runs the bot's own `app.router.Router` (built by `app.router.build_router`, as the server builds it: triggers, the
last-message safety stage, the history selector). A prediction is a skill; its ``dataset:`` label is compared with
the data's label.

``--pool DIR`` measures against the paper's setting instead: the candidates are the labels of the shot pool
(one folder per label holding ``*.json`` lists of ``{"meta", "dialogue"}``):
every response-skill folder (not ``*-parse``; ``safety-*`` only with ``--safety``) plus any gold label the pool holds.
Each label's examples are the first 20 dialogues of each of its files (the dev examples come after them, so the two
never overlap). A label the pool lacks takes the examples of the skill in ``skills/`` whose ``dataset:`` or name
matches it, case-insensitively. The pool is evaluation-time material only; the product uses its own skill files.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import click

from ..selector import (BEST_METHOD, METHODS, Candidate, Selection, Selector, SelectorLayout, candidates_from_skills,
                        to_dialogue)

POOL_DIALOGUES = 20
DEFAULT_SHOTS = 4
DEFAULT_POOL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsb"


# ------------------------------------------------------------------------------------------------- data
def load_examples(path: Path, limit: int | None = None) -> list[dict]:
    """The selection examples; with ``limit``, a stratified subset (labels taken in turn, file order within each)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label, dialogue = str(row["skill"]), to_dialogue(row["dialogue"])
            except (ValueError, KeyError, TypeError) as exc:
                raise click.ClickException(f"{path}:{n}: not a selection example ({exc})") from None
            if not dialogue:
                raise click.ClickException(f"{path}:{n}: the dialogue is empty")
            rows.append({"skill": label, "dialogue": dialogue})
    if limit is None or limit >= len(rows):
        return rows
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["skill"]].append(r)
    out, i = [], 0
    while len(out) < limit:
        for label in by_label:
            if i < len(by_label[label]) and len(out) < limit:
                out.append(by_label[label][i])
        i += 1
    return out


def selectable_folder(name: str, safety: bool) -> bool:
    return not name.endswith("-parse") and (safety or not name.startswith("safety-"))


def pool_candidates(pool: Path, gold: Sequence[str], shots: int, skills=(), safety: bool = False) -> list[Candidate]:
    """One candidate per label: the pool's first 20 dialogues per file, else the matching skill file's examples."""
    folders = {p.name: p for p in sorted(Path(pool).iterdir()) if p.is_dir()} if Path(pool).is_dir() else {}
    labels = [n for n in folders if selectable_folder(n, safety)]
    labels += sorted({g for g in gold if g in folders and g not in labels})
    out = []
    for label in labels:
        dialogues = []
        for f in sorted(folders[label].glob("*.json")):
            records = json.loads(f.read_text(encoding="utf-8"))
            dialogues += [to_dialogue(r["dialogue"]) for r in records[:POOL_DIALOGUES] if r.get("dialogue")]
        if dialogues:
            out.append(Candidate(label, tuple(dialogues), shots, label))
    by_label = {c.label.casefold(): c for c in candidates_from_skills(skills)}
    by_label.update({c.name.casefold(): c for c in candidates_from_skills(skills)})
    have = {c.name for c in out}
    for g in sorted(set(gold) - have):
        match = by_label.get(g.casefold())
        if match:
            out.append(Candidate(g, match.examples, shots, g))
    return out


# ---------------------------------------------------------------------------------------------- metrics
def metrics(gold: Sequence[str], pred: Sequence[str]) -> dict:
    labels = sorted(set(gold) | set(pred))
    f1s = []
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, pred))
        fp = sum(p == label and g != label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    confusion = {g: dict(Counter(p for gg, p in zip(gold, pred) if gg == g)) for g in sorted(set(gold))}
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold)),
            "macro_f1": sum(f1s) / max(1, len(f1s)), "confusion": confusion}


def evaluate(selector: Selector, examples: Sequence[dict], progress=None) -> dict:
    """Select for every example (caches warmed first, so latency is per warm selection)."""
    started = time.perf_counter()
    selector.warm()
    warm_s = time.perf_counter() - started
    gold, pred, lat = [], [], []
    for i, ex in enumerate(examples):
        sel = selector.select(ex["dialogue"])
        gold.append(ex["skill"])
        pred.append(sel.skill)
        lat.append(sel.latency_s)
        if progress:
            progress(i + 1, len(examples), sum(g == p for g, p in zip(gold, pred)) / len(gold))
    out = {"selector": selector.method, "n": len(examples), **metrics(gold, pred),
           "median_latency_s": statistics.median(lat) if lat else 0.0,
           "p90_latency_s": sorted(lat)[int(0.9 * (len(lat) - 1))] if lat else 0.0, "warmup_s": warm_s,
           "predictions": pred, "latencies_s": lat}
    return out


class RouterSelector:
    """The bot's own `Router` as a selector for evaluation; a prediction is the routed skill's dataset label."""

    method = "pipeline"

    def __init__(self, router):
        self.router = router

    def warm(self) -> None:
        from ..router import warm

        warm(self.router)

    def select(self, dialogue) -> Selection:
        route = self.router.route(dialogue)
        return Selection(label_of(route.skill), route.scores, route.method, route.latency_s, True)


class Labelled:
    """A selector whose predictions (skill names) are reported as the skills' dataset labels."""

    def __init__(self, selector: Selector, labels: dict[str, str]):
        self.selector, self.labels, self.method = selector, labels, selector.method

    def warm(self) -> None:
        self.selector.warm()

    def select(self, dialogue) -> Selection:
        sel = self.selector.select(dialogue)
        return dataclasses.replace(sel, skill=self.labels.get(sel.skill, sel.skill))


def label_of(skill) -> str:
    return skill.dataset or skill.name


def named_by_skills(candidates: Sequence[Candidate], skills) -> list[Candidate]:
    """Pool candidates renamed after the skill files whose label they carry, so the router can act on a winner."""
    by_label = {k.casefold(): s.name for s in skills for k in (s.name, s.dataset) if k}
    return [Candidate(by_label.get(c.label.casefold(), c.name), c.examples, c.shots, c.label) for c in candidates]


def format_report(r: dict) -> str:
    lines = [f"selector {r['selector']}  n={r['n']}  accuracy {100 * r['accuracy']:.1f}%  macro-F1 "
             f"{100 * r['macro_f1']:.1f}  median latency {r['median_latency_s']:.3f} s  (p90 {r['p90_latency_s']:.3f} s,"
             f" warm-up {r['warmup_s']:.1f} s)"]
    cols = sorted({p for row in r["confusion"].values() for p in row} | set(r["confusion"]))
    short = {c: c[:7] for c in cols}
    lines.append("gold \\ predicted".ljust(18) + " ".join(short[c].rjust(7) for c in cols))
    for g, row in r["confusion"].items():
        lines.append(g[:17].ljust(18) + " ".join(str(row.get(c, "")).rjust(7) for c in cols))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI
@click.command("selector")
@click.option("--data", "data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Selection examples, JSON lines shaped like shared/data/fsb/selector-dev.jsonl.")
@click.option("--pool", type=click.Path(path_type=Path), default=None,
              help="Measure the paper's setting: shots from this pool (one folder per label, e.g. "
                   "../shared/data/fsb) instead of the shipped skill files.")
@click.option("--selector", "methods", type=click.Choice([*METHODS, "best", "pipeline", "all"]), default="all",
              show_default=True, help="'pipeline': the bot's whole router (triggers, the last-message safety stage, "
              "then best), as shipped; --history-turns, --shortlist, --weight and --precision then do not apply.")
@click.option("--limit", type=int, default=None, help="Evaluate a stratified subset of N examples.")
@click.option("--shots", type=int, default=DEFAULT_SHOTS, show_default=True,
              help="Example dialogues per skill in each selector prompt.")
@click.option("--history-turns", type=int, default=5, show_default=True)
@click.option("--shortlist", type=int, default=None, help="Hybrid: skills shortlisted by embeddings [default: 3].")
@click.option("--weight", type=float, default=None, help="Hybrid: weight of the embedding score [default: 1.0].")
@click.option("--model", default=None, help="LM to score with [default: settings / FSB_MODEL].")
@click.option("--precision", type=click.Choice(["auto", "exact", "bf16"]), default="auto", show_default=True,
              help="Prompt scoring in exact float32 or bfloat16 (auto: bf16 where it is fast).")
@click.option("--safety/--no-safety", default=False, help="Also offer the pool's safety-* labels.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list under 'results' for 'all').")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DIR/selector.html: confusion heat map, per-skill precision/recall, latency histogram.")
def selector_command(data, pool, methods, limit, shots, history_turns, shortlist, weight, model, precision, safety,
                     as_json, report_dir):
    """Accuracy, macro-F1, confusion matrix and median latency of the skill selector(s)."""
    from . import report
    from ..settings import Settings
    from ..skills import SkillRegistry

    from ..router import Router, build_router
    from ..selector import registry_source

    if report_dir is not None:
        try:
            report.require()
        except report.ReportError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        report.quiet_libraries()
    settings = Settings.load(model=model)
    examples = load_examples(data, limit)
    if not examples:
        raise click.ClickException(f"{data}: no examples")
    registry = SkillRegistry(settings.skills_dir)
    skills = registry.all()
    if pool is not None:
        if not Path(pool).is_dir():
            raise click.ClickException(f"no shot pool at {pool}: pass --pool DIR (one folder per skill label)")
        candidates = named_by_skills(pool_candidates(pool, [e["skill"] for e in examples], shots, skills, safety),
                                     skills)
        if not candidates:
            raise click.ClickException(f"{pool}: no skill folders with dialogues")
    names = [BEST_METHOD if m in ("best", "pipeline") else m for m in ([methods] if methods != "all" else METHODS)]
    lm = embedder = None
    if any(m in ("prompt", "hybrid") for m in names):
        from ..lm import load_lm

        lm = load_lm(settings)
    if any(m in ("embedding", "hybrid") for m in names):
        from retrievers.embed import default_embedder

        embedder = default_embedder()
    layout = SelectorLayout.load(settings.prompts_dir / "selector.yaml")
    labels = {s.name: label_of(s) for s in skills}
    results = []
    for m in names:
        kw = {k: v for k, v in {"shortlist": shortlist, "weight": weight}.items() if v is not None}
        precise = {"auto": "auto", "exact": False, "bf16": True}[precision]
        if pool is None and methods == "pipeline":  # the shipped router, exactly as the server builds it
            sel = RouterSelector(build_router(settings.replace(selector=m, safety=True), registry, lm, embedder))
        elif pool is None:  # the shipped history selector alone (the router's last stage)
            sel = Labelled(Selector(registry_source(registry), lm=lm, embedder=embedder, layout=layout, method=m,
                                    history_turns=history_turns, low_precision=precise, **kw), labels)
        else:
            sel = Selector(lambda: candidates, lm=lm, embedder=embedder, layout=layout, method=m,
                           history_turns=history_turns, low_precision=precise, **kw)
            if methods == "pipeline":  # the bot's router over the pool's candidates
                have = {c.name for c in candidates}
                extra = [c for c in candidates_from_skills([s for s in skills if s.kind == "safety" or s.aligned])
                         if c.name not in have]
                last = Selector(lambda: candidates + extra, lm=lm, embedder=embedder, layout=layout, method=m,
                                history_turns=1, low_precision=precise, **kw)
                sel = RouterSelector(Router(registry, selector=sel, first_stage=last,
                                            default_skill=settings.default_skill))
            else:
                sel = Labelled(sel, labels)
        with report.progress_bar(len(examples), f"selector {m}", quiet=as_json) as bar:
            def progress(done, total, accuracy):
                bar.set_postfix(accuracy=f"{accuracy:.2f}", refresh=False)
                bar.update(1)

            r = evaluate(sel, examples, progress=progress)
        r["method"] = m
        if methods in ("best", "pipeline"):
            r["selector"] = methods
        results.append(r)
        if not as_json:
            click.echo(format_report(r))
            click.echo("")
    if report_dir is not None:
        try:
            path = report.write(report_dir, "selector",
                                report.selector_report(results, report.command_line(click.get_current_context())))
        except report.ReportError as exc:
            raise click.ClickException(str(exc)) from None
        if not as_json:
            click.echo(f"report: {path}", err=True)
    if as_json:
        for r in results:
            r.pop("predictions", None)
            r.pop("latencies_s", None)
        click.echo(json.dumps(results[0] if len(results) == 1 else {"results": results, "n": len(examples)}))
