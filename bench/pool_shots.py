"""Write the paper's shot pool into the skill files as selector examples, the first ones the selector's prompt shows.

    .venv/bin/python bench/pool_shots.py            # skills/*.yaml, 20 dialogues each, the prompt shows 4
    .venv/bin/python bench/pool_shots.py --check    # exit 1 when a skill file's pool block is not what this writes

A skill that stands for a dataset (``dataset:`` names a folder of ``../shared/data/fsb``) gets, at the head of its
``selector_examples``, the first ``--dialogues`` dialogues of that folder's file: the paper's shot pool, which
``fsb eval selector --pool`` also reads, and which ``selector-dev.jsonl`` never uses (its dialogues come after them in
the same files). ``selector_prompt_shots: --shots`` makes the history selector's prompt show the first of them after its
``selector_shots`` of our own examples (the last-message stage shows ours only), and the embedding ranking sees all
of them.

Why: a history from a dataset resembles that dataset's dialogues more than our replies. On selector-dev (2026-12-05,
embedded gemma-3-270m, the whole router): 0.781 as before, 0.793 with the 20 dialogues for the embedding ranking only,
0.811 with 4 of them as the only prompt shots (fit half 0.814, report half 0.808), 0.811 with 8 (fit half 0.800),
0.807 with 4 before our 2, 0.815 with 4 after our 2 (shipped). tests/data/live-chat.jsonl: 0.706 before, 0.676 with
each of these (two empathetic turns go to msc).

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


def rewrite(text: str, block: list[str], shots: int) -> str:
    lines = text.splitlines()
    if any(line.startswith(BEGIN.split("{")[0]) for line in lines):  # drop the old block
        start = next(i for i, line in enumerate(lines) if line.startswith(BEGIN.split("{")[0]))
        end = lines.index(END, start)
        del lines[start : end + 1]
    at = lines.index("selector_examples:") + 1
    lines[at:at] = block
    setting = f"selector_prompt_shots: {shots}"
    have = [i for i, line in enumerate(lines) if line.startswith("selector_prompt_shots:")]
    if have:
        lines[have[0]] = setting
    else:
        after = next(i for i, line in enumerate(lines) if line.startswith("selector_shots:"))
        lines.insert(after + 1, setting)
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
