"""Write the paper's shot pool into the skill files as selector examples, the first ones the selector's prompt shows.

    .venv/bin/python bench/pool_shots.py            # skills/*.yaml, 20 dialogues each, the prompt shows 4
    .venv/bin/python bench/pool_shots.py --check    # exit 1 when a skill file's pool block is not what this writes

A skill that stands for a dataset (``dataset:`` names a folder of ``../shared/data/fsb``) gets, at the head of its
``selector_examples``, the first ``--dialogues`` dialogues of that folder's file: the paper's shot pool, which
``fsb eval selector --pool`` also reads, and which ``selector-dev.jsonl`` never uses (its dialogues come after them in
the same files). ``selector_prompt_shots: --shots`` makes the history selector's prompt show the first of them after
its ``selector_shots`` of our own examples (the last-message stage shows ours only), and the embedding ranking sees
all of them. The knowledge skills (retriever kb, web or kg: wow, wit, dialkg) get none: their pools are chit-chat
about hobbies and topics, and with them users' small talk ("Do you like the outdoors?") went to a knowledge skill.

Measured (2026-12-05, embedded gemma-3-270m, ``fsb eval selector --selector pipeline``: the whole router), chosen on
these two development sets:

| pool in | selector-dev acc / macro-F1 | live-chat acc | live-chat small talk sent to a knowledge skill |
|---|---|---|---|
| no skill (before) | 0.781 / 0.682 | 0.691 | 6 of 57 |
| every dataset skill, 4 pool shots after our 2 | 0.815 / 0.679 | 0.676 | 10 of 57 |
| every one but wow | 0.819 / 0.679 | 0.676 | 10 of 57 (to wit now) |
| every one but the knowledge skills (shipped) | 0.800 / 0.655 | 0.676 | 5 of 57 |

Not shipped: on the 2-core Intel Xeon of 2026-12-05, `bench/turn.py` on the last variant against the code before it:
time to first token p50 / p90 / max 0.46 / 1.34 / 2.00 s -> 0.64 / 2.42 / 3.16 and 0.60 / 1.96 / 2.82 (two runs), whole
turn median 1.26 -> 1.80 and 2.00 s: every step after routing slowed too (the scored histories kept as conversation
checkpoints hold the longer prompts' keys and values; not confirmed). The skill files in ``skills/`` carry no pool.

(Earlier variants, every dataset skill: the 20 dialogues for the embedding ranking only 0.793; 4 pool shots instead
of ours 0.811, 8 instead of ours 0.811 but worse on selector-dev's fit half, 4 before ours 0.807.) The shipped
variant's cost: live-chat's empathetic turns go to msc more often (5 of 7, against 3 of 7 before).

The block sits between two marker comments, so running this again replaces it and nothing else; the dialogues are
written as JSON strings (valid YAML), each entry noting its file and index.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "fsb"
KNOWLEDGE = ("kb", "web", "kg")  # the knowledge skills' retrievers: these skills get no pool (see the docstring)
BEGIN = "  # -- the shot pool: the first {n} dialogues of {src} (bench/pool_shots.py) --"
END = "  # -- end of the shot pool --"


def pool_block(label: str, n: int, pool: Path = POOL) -> list[str] | None:
    files = sorted((pool / label).glob("*.json")) if (pool / label).is_dir() else []
    if not files:
        return None
    records = json.loads(files[0].read_text(encoding="utf-8"))[:n]
    src = Path(pool.name) / files[0].relative_to(pool) if pool != POOL else files[0].relative_to(ROOT.parent)
    out = [BEGIN.format(n=len(records), src=src)]
    for i, record in enumerate(records):
        out.append(f"  - dialogue:  # {src} #{i}")
        for user, bot in record["dialogue"]:
            out.append(f"      - [{json.dumps(user or '')}, {json.dumps(bot or '')}]")
    out.append(END)
    return out


def drop(text: str) -> str:
    """``text`` without a pool block and its ``selector_prompt_shots``."""
    lines = text.splitlines()
    marker = BEGIN.split("{")[0]
    start = next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
    if start is not None:
        del lines[start : lines.index(END, start) + 1]
    return "\n".join(line for line in lines if not line.startswith("selector_prompt_shots:")) + "\n"


def rewrite(text: str, block: list[str], shots: int) -> str:
    lines = drop(text).splitlines()
    at = lines.index("selector_examples:") + 1
    lines[at:at] = block
    after = next(i for i, line in enumerate(lines) if line.startswith("selector_shots:"))
    lines.insert(after + 1, f"selector_prompt_shots: {shots}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skills", type=Path, default=ROOT / "skills")
    ap.add_argument("--pool", type=Path, default=POOL, help="one folder per dataset label, as shared/data/fsb")
    ap.add_argument("--dialogues", type=int, default=20)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file differs")
    args = ap.parse_args(argv)
    differ = []
    for path in sorted(args.skills.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        skill = yaml.safe_load(text)
        if skill.get("kind") != "response" or not skill.get("selector_shots", 2) or "selector_examples" not in skill:
            continue
        block = pool_block(skill.get("dataset") or skill["name"], args.dialogues, args.pool)
        if block is None:
            continue
        if skill.get("retriever") in KNOWLEDGE:  # no pool: it would pull users' small talk about hobbies
            block, new = [], drop(text)
        else:
            new = rewrite(text, block, args.shots)
        if new != text:
            differ.append(path.name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
        print(f"{path.name}: {sum(1 for b in block if b.startswith('  - dialogue'))} pool dialogues"
              f"{' (changed)' if new != text else ''}")
    if args.check and differ:
        print(f"not as bench/pool_shots.py writes them: {', '.join(differ)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
