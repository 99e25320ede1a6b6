"""Write the paper's shot pool into the skill files as selector examples, the first ones the selector's prompt shows.

    .venv/bin/python bench/pool_shots.py            # skills/*.yaml, 20 dialogues each, the prompt shows 4 (shipped)
    .venv/bin/python bench/pool_shots.py --check    # exit 1 when a skill file's pool block is not what this writes

A skill that stands for a dataset (``dataset:`` names a folder of ``../shared/data/fsb``) gets, at the head of its
``selector_examples``, the first ``--dialogues`` dialogues of that folder's file: the paper's shot pool, which
``fsb eval selector --pool`` also reads, and which ``selector-dev.jsonl`` never uses (its dialogues come after them in
the same files). ``selector_prompt_shots: --shots`` makes the history selector's prompt show the first of them after
its ``selector_shots`` of our own examples (the last-message stage shows ours only), and the embedding ranking sees
all of them. ``--no-knowledge`` leaves the knowledge skills (retriever kb, web or kg: wow, wit, dialkg) without one.

The shipped skill files carry the pool in every dataset skill (stop 33). Measured with the whole router (``fsb eval
selector --selector pipeline``, embedded gemma-3-270m, bfloat16, 2-core Intel Xeon) on the code of 2026-12-06 (the
small-talk floor in place); selector-dev's fit part is the 140 dialogues ``bench/fit_selector.split`` names, on which
the floor and the shortlist were chosen; the report part is the other 130:

| pool in | selector-dev acc (fit / report) | live-chat acc (small talk to a knowledge skill) | live-chat-2 |
|---|---|---|---|
| no skill (stops 30-32) | 0.785 (0.807 / 0.762) | 0.721 (1 of 57) | 0.500 |
| every one but the knowledge skills (``--no-knowledge``) | 0.796 (0.807 / 0.785) | 0.691 (1) | 0.429 |
| every one, knowledge skills ranked by it but their prompts without it | 0.819 (0.829 / 0.808) | 0.706 (4) | 0.464 |
| every dataset skill (shipped) | **0.826 (0.829 / 0.823)** | 0.706 (4) | 0.464 |

On ``bench/data/selector-holdout.jsonl`` (``bench/selector_holdout.py``: 130 examples from dialogues that neither
selector-dev nor the pool uses, written after this choice and never read): 0.738 / 0.559 without the pool, 0.777 /
0.604 with it (accuracy / macro-F1).

Its price in live chat: a conversation about gardening goes to wow (the Wizard of Wikipedia's own dialogues are chats
about hobbies), and chit-chat turns move between persona, msc and dailydialog. Its price in time (``bench/turn.py``,
two interleaved runs each, same machine): time to first token p50 / p90 / max 0.31-0.34 / 0.94 / 1.19-1.60 s ->
0.39-0.41 / 1.04-1.08 / 1.54-1.58 s, whole turn median 0.93-1.00 -> 0.94-0.97 s, eight clients 35.6-36.5 -> 33.5-34.4
tok/s; start-up with an empty data directory 17 -> 31 s (300 more example dialogues embedded, 15 more prompt heads
warmed). On the code of 2026-12-05 the same pool had made a turn ~60% slower (median 1.26 -> 2.00 s), which is why
stops 30-32 shipped without it; the history selector's conversation checkpoints and the faster scoring passes since
then took that cost away.

Tried with the pool and not changed (stop 33, same measure): a shortlist of 5 (``FSB_SELECTOR_SHORTLIST``) gave
selector-dev's fit part 0.829 -> 0.843 but its report part 0.823 unchanged, live-chat 0.706 -> 0.691 and live-chat-2
0.464 -> 0.429. Keeping small talk from the knowledge skills costs what the pool gains (offline, on the routes of the
table's shipped row): handing a knowledge skill's turn to a chit-chat skill when the last message has no question
mark and its turn vote is below 0 keeps live-chat's small talk to a knowledge skill at 1 of 57 but selector-dev falls
to 0.789 (fit part 0.793); below -0.5, 0.815 and 3 of 57; the small-talk floor moved alone (-0.85 -> -0.5), 0.807 and
2 of 57. Pooling every skill but wit: selector-dev 0.804, live-chat 0.691 (4 of 57). Six pool shots in the prompt
(``--shots 6``): fit part 0.814, report part 0.815, live-chat 0.721, live-chat-2 0.500 (worse on the fit part, so
not taken). Forty pool dialogues (``--dialogues 40``): fit part 0.843, report part 0.815, live-chat and live-chat-2
unchanged: two fit dialogues more, one report dialogue less, for 300 more dialogues to embed at a first start.

(Earlier variants, 2026-12-05, every dataset skill: the 20 dialogues for the embedding ranking only 0.793; 4 pool
shots instead of ours 0.811, 8 instead of ours 0.811 but worse on selector-dev's fit half, 4 before ours 0.807.)

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
DIALOGUES = 20  # the pool's size per skill (--dialogues)
KNOWLEDGE = ("kb", "web", "kg")  # the knowledge skills' retrievers: --no-knowledge gives these skills no pool
BEGIN = "  # -- the shot pool: the first {n} dialogues of {src} (bench/pool_shots.py) --"
END = "  # -- end of the shot pool --"


def pool_file(label: str, pool: Path = POOL) -> Path | None:
    """The file of ``label``'s folder whose first dialogues are the pool (None: no such folder or file)."""
    files = sorted((pool / label).glob("*.json")) if (pool / label).is_dir() else []
    return files[0] if files else None


def pool_block(label: str, n: int, pool: Path = POOL) -> list[str] | None:
    path = pool_file(label, pool)
    if path is None:
        return None
    records = json.loads(path.read_text(encoding="utf-8"))[:n]
    src = Path(pool.name) / path.relative_to(pool) if pool != POOL else path.relative_to(ROOT.parent)
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
    ap.add_argument("--dialogues", type=int, default=DIALOGUES)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--no-knowledge", dest="knowledge", action="store_false",
                    help="leave the knowledge skills (wow, wit, dialkg) without a pool")
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
        if skill.get("retriever") in KNOWLEDGE and not args.knowledge:  # --no-knowledge
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
