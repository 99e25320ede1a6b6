"""``fsb eval retrieval``: the knowledge sources and the parser skills that query them, on the shared data.

Three measurements, each on the data folder's own records (see ``shared/data/README.md``):

- **KB recall@5** (``wow``): every knowledge sentence of every Wizard-of-Wikipedia record is ingested as one passage
  into a fresh knowledge base (the real SQLite FTS5 + embedding store); for each scored turn the user's message is the
  query, and a hit is a gold knowledge sentence among the top 5 passages. Reported for the hybrid (reciprocal-rank
  fusion) search the bot uses, and for BM25 and embeddings alone.
- **query F1** (``wit-parse``): the search-query parser skill generates a query for the dialogue; unigram F1 and exact
  match against the gold query.
- **triple F1** (``dialKG-parse``): the KG-path parser skill generates triples; F1 of the triple sets (and unigram F1).

All figures are fractions (0–1). ``n`` is the number of KB queries; ``n_query`` and ``n_triple`` the parser samples.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import click

from ..settings import REPO_ROOT, Settings

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "fsb"
MODES = ("hybrid", "bm25", "dense")


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _sentences(meta_turn) -> list[str]:
    if isinstance(meta_turn, str):
        meta_turn = [meta_turn]
    return [s for s in (" ".join(str(x).split()) for x in (meta_turn or [])) if s]


def kb_queries(records: Sequence[dict], limit: int | None) -> list[dict]:
    """One query per turn that has knowledge: ``{"query", "gold": [sentences]}``, the first ``limit`` of them."""
    out: list[dict] = []
    for record in records:
        meta = record.get("meta") or []
        for i, (user, _bot) in enumerate(record.get("dialogue") or []):
            gold = _sentences(meta[i]) if i < len(meta) else []
            if user.strip() and gold:
                out.append({"query": user, "gold": gold})
                if limit is not None and len(out) >= limit:
                    return out
    return out


def kb_recall(records: Sequence[dict], limit: int | None, embedder, k: int = 5,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Recall@k of the gold knowledge sentence, per search mode, over a KB made of every record's knowledge."""
    from retrievers.kb import KnowledgeBase

    from retrievers.db import open_db

    passages = sorted({s for r in records for turn in (r.get("meta") or []) for s in _sentences(turn)})
    queries = kb_queries(records, limit)
    if not passages or not queries:
        raise click.ClickException("the wow data has no knowledge sentences to search")
    with tempfile.TemporaryDirectory(prefix="fsb-eval-kb-") as tmp:
        corpus = Path(tmp) / "wow-knowledge.jsonl"
        corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
        kb = KnowledgeBase(open_db(Path(tmp) / "kb.db"), embedder)
        started = time.perf_counter()
        log(f"indexing {len(passages)} knowledge sentences (FTS5 + {getattr(embedder, 'name', 'embeddings')}) ...")
        result = kb.add(corpus)
        log(f"indexed {result.chunks} passages in {time.perf_counter() - started:.1f} s; {len(queries)} queries")
        hits = {mode: 0 for mode in MODES}
        latency = {mode: 0.0 for mode in MODES}
        for q in queries:
            gold = {_norm(s) for s in q["gold"]}
            for mode in MODES:
                t = time.perf_counter()
                found = kb.search(q["query"], k=k, mode=mode)
                latency[mode] += time.perf_counter() - t
                texts = [_norm(p.text) for p in found]
                if any(g == t or g in t for g in gold for t in texts):
                    hits[mode] += 1
        kb.db.conn.close()
    n = len(queries)
    return {"n": n, "passages": len(passages),
            **{("kb_recall_at_5" if m == "hybrid" else f"kb_recall_at_5_{m}"): round(hits[m] / n, 4) for m in MODES},
            **{f"kb_search_ms_{m}": round(1000 * latency[m] / n, 2) for m in MODES}}


def parser_scores(settings: Settings, lm, skill_name: str, folder: Path, limit: int | None,
                  log: Callable[[str], None] = lambda s: None) -> dict:
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

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            click.echo(f"\r  {done}/{total}", nl=done == total, err=True)

    result = evaluate(skill, samples, lm, dataset_name(folder), settings.context_tokens, perplexity=False,
                      progress=progress)
    return {"n": result.n, "seconds_per_sample": round(result.seconds / max(result.n, 1), 2),
            **{k: round(v / 100, 4) for k, v in result.metrics.items()}}


def run(settings: Settings, data_dir: Path, limit: int | None, *, lm=None, embedder=None, parsers: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict:
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
        kb = kb_recall(read_records(folder("wow")), limit, embedder, log=log)
        out = {**kb, "n_kb": kb["n"]}
        if parsers:
            if lm is None:
                from ..lm import load_lm

                lm = load_lm(settings, progress=log)
            query = parser_scores(settings, lm, "wit-parse", folder("wit-parse"), limit, log)
            triple = parser_scores(settings, lm, "dialkg-parse", folder("dialKG-parse"), limit, log)
            out.update(query_f1=query["query_f1"], query_exact_match=query["exact_match"], n_query=query["n"],
                       triple_f1=triple.get("triple_f1"), triple_unigram_f1=triple["query_f1"],
                       triple_exact_match=triple["exact_match"], n_triple=triple["n"],
                       parser_seconds_per_sample=round((query["seconds_per_sample"] + triple["seconds_per_sample"]) / 2, 2),
                       model=getattr(lm, "name", settings.model))
    except EvalError as exc:
        raise click.ClickException(str(exc)) from None
    return out


def format_report(r: dict) -> str:
    rows = [("KB recall@5, hybrid (RRF)", r["kb_recall_at_5"], f"n={r['n_kb']} queries, {r['passages']} passages"),
            ("KB recall@5, BM25 only", r["kb_recall_at_5_bm25"], ""),
            ("KB recall@5, embeddings only", r["kb_recall_at_5_dense"], "")]
    if "query_f1" in r:
        rows += [("search query unigram F1 (wit-parse)", r["query_f1"], f"n={r['n_query']}"),
                 ("search query exact match", r["query_exact_match"], ""),
                 ("KG path triple F1 (dialKG-parse)", r["triple_f1"], f"n={r['n_triple']}"),
                 ("KG path unigram F1", r["triple_unigram_f1"], "")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value   notes", f"{'-' * width}  ------  -----"]
    lines += [f"{name.ljust(width)}  {'-' if v is None else f'{v:.3f}':>6}  {note}" for name, v, note in rows]
    if "model" in r:
        lines.append(f"parsers run on {r['model']}, {r['parser_seconds_per_sample']} s per sample")
    return "\n".join(lines)


@click.command("retrieval")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder laid out like shared/data/fsb (wow/, wit-parse/, dialKG-parse/) [default: ../shared/data/fsb].")
@click.option("--limit", type=int, default=100, show_default=True,
              help="At most this many KB queries, and this many dialogues per parser skill.")
@click.option("--model", default=None, help="LM for the parser skills [default: settings / FSB_MODEL].")
@click.option("--no-parsers", is_flag=True, help="Only the KB recall (no language model needed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def retrieval_command(ctx, data_dir, limit, model, no_parsers, as_json) -> None:
    """Measure retrieval: KB recall@5 of the gold Wizard-of-Wikipedia sentence (hybrid, BM25 only, embeddings only),
    search-query F1 of the wit-parse skill and triple F1 of the dialkg-parse skill. Figures are fractions (0-1)."""
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.load()
    settings = base.replace(model=model) if model else base
    data_dir = data_dir or DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        raise click.ClickException(f"no data folder at {data_dir}; pass --data-dir")
    out = run(settings, data_dir, limit, parsers=not no_parsers, log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(out) if as_json else format_report(out))
