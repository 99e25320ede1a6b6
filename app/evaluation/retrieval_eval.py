"""``fsb eval retrieval``: the knowledge sources and the parser skills that query them, on the shared data.

Three measurements, each on the data folder's own records (see ``shared/data/README.md``):

- **KB recall@5** (``wow``): a fresh knowledge base (the real SQLite FTS5 + embedding store) holds every knowledge
  sentence of the split's Wizard-of-Wikipedia records, one passage each, beside the starter documents
  (``retrievers/starter_kb``, as a user's knowledge base would hold them). Each scored turn is a query, built as the
  bot builds it for the ``wow`` skill's retriever (`app.knowledge.kb_query`: the previous reply and the message); a
  hit is a gold knowledge sentence among the top 5 passages. The queries are split in two halves with a fixed seed:
  hybrid search's fusion weights and relevance floor are fitted on the *fit* half, and every ``kb_recall_at_5*``
  figure is measured on the *report* half (the ``_fit`` figures are the fit half's). Reported for hybrid search and for BM25 and embeddings alone.
- **query F1** (``wit-parse``): the search-query parser skill generates a query for the dialogue; unigram F1 and exact
  match against the gold query.
- **triple F1** (``dialKG-parse``): the KG-path parser skill generates triples; F1 of the triple sets (and unigram F1).

All figures are fractions (0–1). ``n`` is the number of KB queries (``fit_n`` + ``report_n``); ``n_query`` and
``n_triple`` the parser samples.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import click

from ..settings import REPO_ROOT, Settings

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "fsb"
MODES = ("hybrid", "bm25", "dense")
K = 5
SPLIT_SEED = 15  # which queries fit and which report; fixed, so every run and every embedder splits alike
MIN_SPLIT = 20  # fewer queries than this: nothing is fitted, the shipped fusion is measured on every query
KB_LIMIT = 400
# The fit's grid: few parameters, coarse steps. bm25_weight 0 ranks by embeddings alone, 1 by BM25 alone.
BM25_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))  # 0 .. 1
BM25_HALVES = (5.0, 10.0, 20.0)
FLOOR_KEEPS = 0.95  # the floor is the score that this share of the gold passages found (fit half) score above


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _sentences(meta_turn) -> list[str]:
    if isinstance(meta_turn, str):
        meta_turn = [meta_turn]
    return [s for s in (" ".join(str(x).split()) for x in (meta_turn or [])) if s]


def kb_queries(records: Sequence[dict], limit: int | None) -> list[dict]:
    """One query per turn that has knowledge: ``{"query", "gold": [sentences]}``, the first ``limit`` of them. The
    query is what the bot asks its knowledge base at that turn (`app.knowledge.kb_query`)."""
    from ..knowledge import kb_query

    out: list[dict] = []
    for record in records:
        meta = record.get("meta") or []
        dialogue = [list(t) for t in record.get("dialogue") or []]
        for i, (user, _bot) in enumerate(dialogue):
            gold = _sentences(meta[i]) if i < len(meta) else []
            if user.strip() and gold:
                out.append({"query": kb_query(dialogue[:i] + [[user, ""]]), "gold": gold})
                if limit is not None and len(out) >= limit:
                    return out
    return out


def split_halves(n: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Query indices of the fit half and the report half (the report half gets the odd one)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n // 2]), sorted(order[n // 2:])


def _recall(ranked: list[list[int]], gold: list[set[int]], which: list[int], k: int = K) -> float:
    return sum(1 for i in which if gold[i] & set(ranked[i][:k])) / len(which) if which else 0.0


def _mrr(ranked: list[list[int]], gold: list[set[int]], which: list[int]) -> float:
    total = 0.0
    for i in which:
        total += next((1.0 / r for r, cid in enumerate(ranked[i], start=1) if cid in gold[i]), 0.0)
    return total / len(which) if which else 0.0


def fit_fusion(found: list, gold: list[set[int]], which: list[int]):
    """The grid point with the best recall@5 on ``which`` (ties: best mean reciprocal rank, then the lower weight),
    and the floor: the score that ``FLOOR_KEEPS`` of the gold passages found in the top 5 score above."""
    from retrievers.kb import Fusion

    best = None
    chosen = set(which)
    for half in BM25_HALVES:
        for weight in BM25_WEIGHTS:
            fusion = Fusion(weight, half)
            ranked = [[cid for cid, _ in c.ranked("hybrid", fusion)] if i in chosen else []
                      for i, c in enumerate(found)]
            key = (_recall(ranked, gold, which), _mrr(ranked, gold, which), -weight, -half)
            if best is None or key > best[0]:
                best = (key, fusion)
    fusion = best[1]
    scores = sorted(s for i in which for cid, s in found[i].ranked("hybrid", fusion)[:K] if cid in gold[i])
    floor = None
    if scores:
        floor = math.floor(100 * scores[int((1 - FLOOR_KEEPS) * len(scores))]) / 100
    return Fusion(fusion.bm25_weight, fusion.bm25_half, floor)


def kb_recall(records: Sequence[dict], limit: int | None, embedder, k: int = K, *, starter_kb: bool = False,
              log: Callable[[str], None] = lambda s: None, quiet: bool = True) -> dict:
    """Recall@k of the gold knowledge sentence, per search mode, over a KB made of every record's knowledge (and the
    starter documents with ``starter_kb``): fusion fitted on one half of the queries, figures from the other half."""
    from retrievers import starter_kb_dir
    from retrievers.db import open_db
    from retrievers.kb import KnowledgeBase, expand_paths

    passages = sorted({s for r in records for turn in (r.get("meta") or []) for s in _sentences(turn)})
    queries = kb_queries(records, limit)
    if not passages or not queries:
        raise click.ClickException("the wow data has no knowledge sentences to search")
    with tempfile.TemporaryDirectory(prefix="fsb-eval-kb-") as tmp:
        corpus = Path(tmp) / "wow-knowledge.jsonl"
        corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
        db = open_db(Path(tmp) / "kb.db")
        kb = KnowledgeBase(db, embedder)
        started = time.perf_counter()
        log(f"indexing {len(passages)} knowledge sentences (FTS5 + {getattr(embedder, 'name', 'embeddings')}) ...")
        from . import report

        files = [corpus] + (list(expand_paths([starter_kb_dir()])) if starter_kb else [])
        with report.progress_bar(sum(os.path.getsize(f) for f in files), "indexing", quiet=quiet) as bar:
            bar.unit, bar.unit_scale = "B", True
            result = kb.add(corpus, progress=bar.update)
            starter = [kb.add(f, progress=bar.update) for f in files[1:]]
        log(f"indexed {result.chunks} passages and {sum(r.chunks for r in starter)} starter passages in "
            f"{time.perf_counter() - started:.1f} s; {len(queries)} queries")
        texts = {r[0]: _norm(r[1]) for r in db.execute("SELECT id, text FROM kb_chunks").fetchall()}
        gold = [{cid for cid, t in texts.items() for g in q["gold"] if _norm(g) in t} for q in queries]
        started = time.perf_counter()
        found = []
        with report.progress_bar(len(queries), "searching", quiet=quiet) as bar:
            for q in queries:
                found.append(kb.candidates(q["query"], max(k * 4, 50)))
                bar.update(1)
        candidates_ms = 1000 * (time.perf_counter() - started) / len(queries)

        n = len(queries)
        if n >= MIN_SPLIT:
            fit, report = split_halves(n)
            fusion = fit_fusion(found, gold, fit)
        else:  # too few to fit anything: the shipped fusion, measured on every query
            fit, report, fusion = [], list(range(n)), kb.fusion
        shipped = kb.fusion
        ranked = {m: [[cid for cid, _ in c.ranked(m, fusion)] for c in found] for m in MODES}
        ranked_shipped = [[cid for cid, _ in c.ranked("hybrid", shipped)] for c in found]
        out = {"n": n, "passages": len(passages), "starter_passages": sum(r.chunks for r in starter),
               "embedder": getattr(embedder, "name", type(embedder).__name__),
               "split_seed": SPLIT_SEED if fit else None, "fit_n": len(fit), "report_n": len(report)}
        for m in MODES:
            key = "kb_recall_at_5" if m == "hybrid" else f"kb_recall_at_5_{m}"
            out[key] = round(_recall(ranked[m], gold, report, k), 4)
            if fit:
                out[f"{key}_fit"] = round(_recall(ranked[m], gold, fit, k), 4)
        out["kb_recall_at_5_shipped"] = round(_recall(ranked_shipped, gold, report, k), 4)
        # Either single method's own top 5 holds the gold: about what any fusion of the two top-5 lists can reach.
        either = [ranked["bm25"][i][:k] + ranked["dense"][i][:k] for i in range(n)]
        out["kb_recall_at_5_either"] = round(_recall(either, gold, report, 2 * k), 4)
        out["fusion"] = {"bm25_weight": fusion.bm25_weight, "bm25_half": fusion.bm25_half, "floor": fusion.floor,
                         "fitted": bool(fit)}
        out["fusion_shipped"] = {"bm25_weight": shipped.bm25_weight, "bm25_half": shipped.bm25_half,
                                 "floor": shipped.floor}
        if fusion.floor is not None:  # what the floor costs and saves, on the report half
            above = [[cid for cid, s in c.ranked("hybrid", fusion) if s >= fusion.floor] for c in found]
            out["kb_recall_at_5_above_floor"] = round(_recall(above, gold, report, k), 4)
            out["kb_no_passage_above_floor"] = round(sum(1 for i in report if not above[i]) / len(report), 4)

        # The search latency the bot sees, per mode, over the first report queries.
        timed = report[:50]
        for m in MODES:
            t = time.perf_counter()
            for i in timed:
                kb.search(queries[i]["query"], k=k, mode=m, fusion=fusion)
            out[f"kb_search_ms_{m}"] = round(1000 * (time.perf_counter() - t) / max(len(timed), 1), 2)
        out["kb_candidates_ms"] = round(candidates_ms, 2)
        db.close()
    return out


def parser_scores(settings: Settings, lm, skill_name: str, folder: Path, limit: int | None,
                  log: Callable[[str], None] = lambda s: None, quiet: bool = True) -> dict:
    """Run a parser skill over its data folder with ``fsb eval skill``'s code; metrics as fractions."""
    from ..skills import load_dir
    from .skill_eval import dataset_name, evaluate, read_records, samples_for

    skills = load_dir(settings.skills_dir).skills
    if skill_name not in skills:
        raise click.ClickException(f"skill {skill_name!r} is not in {settings.skills_dir}")
    skill = skills[skill_name]
    samples = samples_for(skill, read_records(folder), dataset_name(folder), turns="last", limit=limit,
                          history=settings.history_turns)
    log(f"{skill_name}: generating for {len(samples)} dialogues of {folder.name} ...")

    from . import report

    with report.progress_bar(len(samples), skill_name, quiet=quiet) as bar:
        result = evaluate(skill, samples, lm, dataset_name(folder), settings.context_tokens, perplexity=False,
                          progress=lambda done, total: bar.update(done - bar.n))
    return {"n": result.n, "seconds_per_sample": round(result.seconds / max(result.n, 1), 2),
            **{k: round(v / 100, 4) for k, v in result.metrics.items()}}


def run(settings: Settings, data_dir: Path, limit: int | None, *, lm=None, embedder=None, parsers: bool = True,
        kb_limit: int | None = None, starter_kb: bool = False, log: Callable[[str], None] = lambda s: None,
        quiet: bool = True) -> dict:
    """Every measurement on ``data_dir``: at most ``limit`` parser dialogues and ``kb_limit`` KB queries (by default
    ``limit`` too; ``None``: all). ``starter_kb`` adds the starter documents to the KB's corpus (the command does)."""
    from .skill_eval import EvalError, read_records

    def folder(name: str) -> Path:
        for child in (data_dir / name, data_dir / name.lower()):
            if child.is_dir():
                return child
        raise click.ClickException(f"{data_dir} has no {name}/ folder (expected a layout like shared/data/fsb)")

    if embedder is None:
        from retrievers.embed import default_embedder

        embedder = default_embedder()
    try:
        kb = kb_recall(read_records(folder("wow")), limit if kb_limit is None else kb_limit, embedder,
                       starter_kb=starter_kb, log=log, quiet=quiet)
        out = {**kb, "n_kb": kb["n"]}
        if parsers:
            if lm is None:
                from ..lm import load_lm

                lm = load_lm(settings, progress=log)
            query = parser_scores(settings, lm, "wit-parse", folder("wit-parse"), limit, log, quiet)
            triple = parser_scores(settings, lm, "dialkg-parse", folder("dialKG-parse"), limit, log, quiet)
            out.update(query_f1=query["query_f1"], query_exact_match=query["exact_match"], n_query=query["n"],
                       triple_f1=triple.get("triple_f1"), triple_unigram_f1=triple["query_f1"],
                       triple_exact_match=triple["exact_match"], n_triple=triple["n"],
                       parser_seconds_per_sample=round((query["seconds_per_sample"] + triple["seconds_per_sample"]) / 2, 2),
                       model=getattr(lm, "name", settings.model))
    except EvalError as exc:
        raise click.ClickException(str(exc)) from None
    return out


def format_report(r: dict) -> str:
    half = f"report half, n={r['report_n']}" if r.get("fit_n") else f"n={r['n_kb']} (too few to fit: shipped fusion)"
    corpus = f"{r['passages']} sentences + {r.get('starter_passages', 0)} starter passages"
    f = r["fusion"]
    rows = [("KB recall@5, hybrid (cosine + BM25)", r["kb_recall_at_5"], f"{half}; {corpus}"),
            ("KB recall@5, BM25 only", r["kb_recall_at_5_bm25"], ""),
            ("KB recall@5, embeddings only", r["kb_recall_at_5_dense"], "")]
    if r.get("fit_n"):
        rows += [("KB recall@5 on the fit half: hybrid", r["kb_recall_at_5_fit"], f"fit half, n={r['fit_n']}"),
                 ("  BM25 only", r["kb_recall_at_5_bm25_fit"], ""),
                 ("  embeddings only", r["kb_recall_at_5_dense_fit"], ""),
                 ("KB recall@5, hybrid, shipped fusion", r["kb_recall_at_5_shipped"],
                  "report half, the weights in retrievers/kb.py FUSION_DEFAULTS")]
    if "kb_recall_at_5_either" in r:
        rows.append(("gold in BM25's or the embeddings' top 5", r["kb_recall_at_5_either"], "report half"))
    if "kb_recall_at_5_above_floor" in r:
        rows += [("KB recall@5, passages above the floor", r["kb_recall_at_5_above_floor"], "report half"),
                 ("queries with no passage above the floor", r["kb_no_passage_above_floor"], "report half")]
    if "query_f1" in r:
        rows += [("search query unigram F1 (wit-parse)", r["query_f1"], f"n={r['n_query']}"),
                 ("search query exact match", r["query_exact_match"], ""),
                 ("KG path triple F1 (dialKG-parse)", r["triple_f1"], f"n={r['n_triple']}"),
                 ("KG path unigram F1", r["triple_unigram_f1"], "")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value   notes", f"{'-' * width}  ------  -----"]
    lines += [f"{name.ljust(width)}  {'-' if v is None else f'{v:.3f}':>6}  {note}" for name, v, note in rows]
    floor = "none" if f["floor"] is None else f"{f['floor']:.2f}"
    lines.append(f"fusion ({'fitted on the fit half' if f['fitted'] else 'shipped'}, {r['embedder']}): "
                 f"{1 - f['bm25_weight']:.2f} * cosine + {f['bm25_weight']} * bm25 / (bm25 + {f['bm25_half']:g}); "
                 f"relevance floor {floor}")
    if f["fitted"]:
        lines.append(f"as a FUSION_DEFAULTS entry: {r['embedder']!r}: Fusion(bm25_weight={f['bm25_weight']}, "
                     f"bm25_half={f['bm25_half']}, floor={f['floor']})")
    if "model" in r:
        lines.append(f"parsers run on {r['model']}, {r['parser_seconds_per_sample']} s per sample")
    return "\n".join(lines)


@click.command("retrieval")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder laid out like shared/data/fsb (wow/, wit-parse/, dialKG-parse/) [default: ../shared/data/fsb].")
@click.option("--limit", type=int, default=None,
              help=f"At most this many KB queries, and this many dialogues per parser skill [default: {KB_LIMIT} KB "
                   "queries, 100 dialogues].")
@click.option("--model", default=None, help="LM for the parser skills [default: settings / FSB_MODEL].")
@click.option("--no-parsers", is_flag=True, help="Only the KB recall (no language model needed).")
@click.option("--embedder", type=click.Choice(["minilm", "hashing"]), default="minilm", show_default=True,
              help="The KB's embedder: the bot's all-MiniLM-L6-v2, or the model-free hashing stand-in of the tests.")
@click.option("--no-starter-kb", is_flag=True, help="Leave the starter documents out of the KB's corpus.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def retrieval_command(ctx, data_dir, limit, model, no_parsers, embedder, no_starter_kb, as_json) -> None:
    """Measure retrieval: KB recall@5 of the gold Wizard-of-Wikipedia sentence (hybrid, BM25 only, embeddings only;
    fusion weights and relevance floor fitted on half the queries, figures from the other half), search-query F1 of
    the wit-parse skill and triple F1 of the dialkg-parse skill. Figures are fractions (0-1)."""
    from retrievers.embed import HashingEmbedder, default_embedder

    from . import report

    if as_json:
        report.quiet_libraries()
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.load()
    settings = base.replace(model=model) if model else base
    data_dir = data_dir or DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        raise click.ClickException(f"no data folder at {data_dir}; pass --data-dir")
    out = run(settings, data_dir, 100 if limit is None else limit, kb_limit=KB_LIMIT if limit is None else limit,
              parsers=not no_parsers, embedder=HashingEmbedder() if embedder == "hashing" else default_embedder(),
              starter_kb=not no_starter_kb, quiet=as_json,
              log=(lambda line: None) if as_json else (lambda line: click.echo(line, err=True)))
    click.echo(json.dumps(out) if as_json else format_report(out))
