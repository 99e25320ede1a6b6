"""What long-term memory keeps: the bot's memory path over Multi-Session Chat's user turns, against their gold facts.

    .venv/bin/python bench/memory_facts.py [--start 0] [--records 40]      # ~2 min on 2 cores

Each user turn of ``--records`` dialogues from ``--start`` of ``shared/data/fsb/msc-parse/valid.json`` goes through what
the bot runs after a reply (`app.bot.memory_statements`, the msc-parse skill through `app.bot.run_parser`,
`app.bot.memory_facts`), with the shipped skill file, messages and embedded model. A kept fact is right when its
words overlap a gold fact of that turn (unigram F1 >= 0.5); a gold fact is found when a kept fact matches it.
Printed for the facts the bot keeps and, beside them, for the rule before the word check (first person only), so both
come from one parser run. Turns with no statements are skipped, as the bot skips them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "fsb" / "msc-parse" / "valid.json"


def f1(a: str, b: str) -> float:
    x, y = re.findall(r"[a-z0-9]+", a.lower()), re.findall(r"[a-z0-9]+", b.lower())
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if not common:
        return 0.0
    p, r = common / len(x), common / len(y)
    return 2 * p * r / (p + r)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--records", type=int, default=40)
    args = ap.parse_args(argv)
    import yaml

    from app.bot import memory_facts, memory_statements, run_parser
    from app.lm import load_lm
    from app.settings import Settings
    from app.skills import SkillRegistry, context_budget

    settings = Settings.load()
    messages = yaml.safe_load((settings.prompts_dir / "messages.yaml").read_text(encoding="utf-8"))
    parser = SkillRegistry(settings.skills_dir).get(settings.memory_skill)
    lm = load_lm(settings)
    budget = context_budget(settings, lm)
    keep = re.compile(messages["fact_keep"], re.IGNORECASE)
    tally = {"kept": [0, 0], "first person only": [0, 0]}  # [right, written]
    found = {"kept": 0, "first person only": 0}
    gold_n = turns = 0
    dropped_examples = []
    for record in json.loads(DATA.read_text())[args.start : args.start + args.records]:
        for (user, _), gold in zip(record["dialogue"], record["user_memory"]):
            statements = memory_statements(user, messages)
            if not statements:
                continue
            turns += 1
            gold_facts = [g for x in gold for g in re.split(messages["fact_split"], x) if g.strip()]
            gold_n += len(gold_facts)
            text = run_parser(parser, lm, [[statements, ""]], budget, 1)
            written, kept = memory_facts(text, statements, messages)
            for name, facts in (("kept", kept), ("first person only", [f for f in written if keep.search(f)])):
                tally[name][1] += len(facts)
                tally[name][0] += sum(any(f1(f, g) >= 0.5 for g in gold_facts) for f in facts)
                found[name] += sum(any(f1(f, g) >= 0.5 for f in facts) for g in gold_facts)
            dropped_examples += [(statements, f) for f in written if keep.search(f) and f not in kept]
    print(f"msc-parse valid, dialogues {args.start}-{args.start + args.records - 1}: {turns} user turns with statements, {gold_n} gold facts")
    print(f"{'rule':20} {'facts':>6} {'right':>6} {'precision':>9} {'recall':>7}")
    for name, (right, written) in tally.items():
        print(f"{name:20} {written:6} {right:6} {right / max(written, 1):9.3f} {found[name] / max(gold_n, 1):7.3f}")
    print("dropped by the word check (first 15):")
    for statements, fact in dropped_examples[:15]:
        print(f"  {fact!r:50} <- {statements[:70]!r}")


if __name__ == "__main__":
    main()
