"""Write ``bench/data/selector-holdout.jsonl``: selection examples shaped like ``selector-dev.jsonl`` from dialogues
that neither it nor the shot pool uses.

    .venv/bin/python bench/selector_holdout.py [--per-label 10] [--seed 33]

For each label of ``selector-dev.jsonl``: the dialogues of its folder of ``../shared/data/fsb`` (the file
``bench/pool_shots.py`` reads) after the shot pool's first 20, minus every dialogue a selector-dev example comes from
(matched by its last user turn and gold reply), ``--per-label`` of them drawn with ``--seed``; each is cut at a random
user turn, its history the (at most) four turns before it, as selector-dev's examples are. A label with no dialogue
left (mwoz-train: 30 in all) is skipped. Written in stop 33 after the shot pool was chosen on selector-dev and
live-chat, to check that choice on dialogues nobody had read: it was measured once before and once after.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from pool_shots import DIALOGUES, POOL, pool_file  # noqa: E402  (the pool's file and size: never sampled here)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-label", type=int, default=10)
    ap.add_argument("--seed", type=int, default=33)
    ap.add_argument("--pool", type=Path, default=POOL, help="one folder per label and selector-dev.jsonl, as shared/data/fsb")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "data" / "selector-holdout.jsonl")
    args = ap.parse_args(argv)
    dev = [json.loads(line) for line in (args.pool / "selector-dev.jsonl").open(encoding="utf-8")]
    rng = random.Random(args.seed)
    out = []
    for label in dict.fromkeys(e["skill"] for e in dev):
        records = json.loads(pool_file(label, args.pool).read_text(encoding="utf-8"))
        used = {(e["dialogue"][-1][0], e["gold_reply"]) for e in dev if e["skill"] == label}
        free = [r for r in records[DIALOGUES:] if r["dialogue"] and not any(tuple(t) in used for t in r["dialogue"])]
        for r in rng.sample(free, min(args.per_label, len(free))):
            turns = [[u or "", b or ""] for u, b in r["dialogue"]]
            j = rng.randrange(len(turns))
            out.append({"skill": label, "dialogue": turns[max(0, j - 4):j] + [[turns[j][0], ""]],
                        "gold_reply": turns[j][1]})
        print(f"{label}: {min(args.per_label, len(free))} of {len(free)} unused dialogues")
    args.out.write_text("".join(json.dumps(e) + "\n" for e in out), encoding="utf-8")
    print(f"{args.out}: {len(out)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
