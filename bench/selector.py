"""Skill-selector benchmark: accuracy, macro-F1 and latency of prompt / embedding / hybrid on a selection set.

One pass scores every example under EVERY skill with both scorers and keeps the scores (``--out``), so hybrid variants
(shortlist size k, embedding weight w) are compared offline on the same numbers; their latency is then measured for
real on the first ``--latency-n`` examples. Not part of the test run.

    PYTHONPATH=. .venv/bin/python bench/selector.py --data ../shared/data/fsb/selector-dev.jsonl --shots 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from app.evaluation.selector_eval import DEFAULT_POOL, load_examples, metrics, pool_candidates
from app.selector import EmbeddingScorer, PromptScorer, Selector, SelectorLayout


def hybrid_pick(p: dict, e: dict, k: int, w: float) -> str:
    top = sorted(e, key=lambda n: -e[n])[:k]
    return max(top, key=lambda n: p[n] + w * e[n])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--history-turns", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None, help="append per-example scores here (JSON lines; resumes)")
    ap.add_argument("--scores", type=Path, default=None, help="only analyse the scores kept by an earlier --out")
    ap.add_argument("--latency-n", type=int, default=30)
    ap.add_argument("--precision", choices=["auto", "exact", "bf16"], default="auto")
    args = ap.parse_args()

    from app.lm import load_lm
    from app.settings import Settings
    from retrievers.embed import default_embedder

    settings = Settings.load(model=args.model)
    examples = load_examples(args.data, args.limit)
    cands = pool_candidates(args.pool, [x["skill"] for x in examples], args.shots)
    layout = SelectorLayout.load(settings.prompts_dir / "selector.yaml")
    embedder = default_embedder()
    lm = None
    low_precision = {"auto": "auto", "exact": False, "bf16": True}[args.precision]
    if args.scores:
        rows = [json.loads(line) for line in args.scores.read_text().splitlines() if line.strip()]
    else:
        # Rows are appended to --out as they come (JSON lines); a rerun with the same --out resumes after them.
        rows = []
        if args.out and args.out.exists():
            rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        lm = load_lm(settings)
        prompt, emb = PromptScorer(lm, layout, low_precision), EmbeddingScorer(embedder, args.history_turns)
        t = time.perf_counter()
        emb.warm(cands)
        prompt.warm(cands)
        print(f"warm-up {time.perf_counter() - t:.1f} s; {len(cands)} skills, {args.shots} shots each, "
              f"prefix tokens {[lm.count_tokens(prompt.prefix(c)) for c in cands]}, bf16 {prompt.low_precision}",
              flush=True)
        out = open(args.out, "a", encoding="utf-8") if args.out else None
        for i, x in enumerate(examples):
            if i < len(rows):
                continue
            turns = x["dialogue"][-args.history_turns:]
            t0 = time.perf_counter()
            e = emb.scores(turns, cands)
            t1 = time.perf_counter()
            p = prompt.scores(turns, cands)
            t2 = time.perf_counter()
            row = {"gold": x["skill"], "prompt": p, "embedding": e, "t_emb": t1 - t0, "t_prompt": t2 - t1,
                   "tokens": lm.count_tokens(layout.history(turns))}
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            if (i + 1) % 10 == 0:
                acc = sum(max(r["prompt"], key=r["prompt"].get) == r["gold"] for r in rows) / len(rows)
                print(f"{i + 1}/{len(examples)} prompt acc {acc:.3f} median {statistics.median(r['t_prompt'] for r in rows):.2f} s",
                      flush=True)

    gold = [r["gold"] for r in rows]
    table = []

    def add(name, pred, lat):
        m = metrics(gold, pred)
        table.append((name, m["accuracy"], m["macro_f1"], lat))

    add("prompt (all skills)", [max(r["prompt"], key=r["prompt"].get) for r in rows],
        statistics.median(r["t_prompt"] + r["t_emb"] * 0 for r in rows))
    add("embedding", [max(r["embedding"], key=r["embedding"].get) for r in rows],
        statistics.median(r["t_emb"] for r in rows))
    for k in (2, 3, 4, 5, 6):
        for w in (0.0, 1.0, 2.0, 4.0, 8.0):
            add(f"hybrid k={k} w={w}", [hybrid_pick(r["prompt"], r["embedding"], k, w) for r in rows], None)
    print(f"\nn={len(rows)}  shots={args.shots}")
    print(f"{'selector':24} {'acc':>6} {'macroF1':>8} {'median s':>9}")
    for name, acc, f1, lat in table:
        print(f"{name:24} {100 * acc:6.1f} {100 * f1:8.1f} {'' if lat is None else f'{lat:9.3f}'}")
    recall = {k: sum(r["gold"] in sorted(r["embedding"], key=lambda n: -r["embedding"][n])[:k] for r in rows) / len(rows)
              for k in (1, 2, 3, 4, 5, 6)}
    print("embedding top-k recall:", {k: round(v, 3) for k, v in recall.items()})

    if lm is not None and args.latency_n:
        for k in (3, 4):
            sel = Selector(lambda: cands, lm=lm, embedder=embedder, layout=layout, method="hybrid", shortlist=k,
                           history_turns=args.history_turns, low_precision=low_precision)
            lat = [sel.select(x["dialogue"]).latency_s for x in examples[: args.latency_n]]
            print(f"hybrid k={k}: measured median latency {statistics.median(lat):.3f} s over {len(lat)} selections")


if __name__ == "__main__":
    main()
