"""Fit the family vote's margin (`app.selector.FamilyVote`, ``FSB_SELECTOR_FAMILY_MARGIN``) on the fit halves only.

    .venv/bin/python bench/fit_family.py            # route every dialogue once (~5 min on 2 cores), then the grid

A booking conversation moves on ("I also need a taxi from the hotel to the station"), but the history selector
scores the whole recent history, so the hotel keeps the turn. The family vote lets the last message alone hand the
turn to a sibling skill (same ``family:`` in the skill file) whose opening requests it resembles more by ``margin``.

What runs is the bot's own router (`build_router`, the shipped skill files, the embedded model) with the vote off;
for each dialogue the history selector decided, the vote's scores over the winner's siblings are computed once, and
the grid applies each margin offline (the vote only ever changes a history-selector winner to one of its siblings,
so this is the same decision the router makes with the margin set).

Data and halves: ``shared/data/fsb/selector-dev.jsonl`` split as `bench/fit_selector.py` does (the 140 dialogues
``fsb eval selector --limit 140`` takes fit, the other 130 report); ``tests/data/live-chat.jsonl`` split as
`bench/fit_first_stage.py` does (seed 15, stratified by label). The margin is chosen on the fit halves (mean of the
two accuracies, the larger margin on a tie, which moves fewer turns); the report halves are printed, never used.
Results: ``bench/results/family-fit.txt``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

OUT = ROOT / "bench" / "results" / "family-fit.txt"
MARGINS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, None]  # None: the vote off


def routed(router, rows, vote):
    """Each row's gold label, the skill routed with the vote off, and the vote's scores over its family (None where
    the history selector did not decide or the skill has no family): `FamilyVote.sibling_scores`, as shipped."""
    candidates = list(router.selector.source())
    out = []
    for i, r in enumerate(rows):
        route = router.route(r["dialogue"])
        scores = (vote.sibling_scores(route.skill.name, r["dialogue"][-1][0], candidates)
                  if route.selection is not None else None)
        out.append({"gold": r["skill"], "skill": route.skill.name, "half": r["half"], "family": scores})
        print(f"\r[family] {i + 1}/{len(rows)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def decide(item, margin) -> str:
    """The skill the router answers with at ``margin`` (None: the vote off): `FamilyVote.pick`, as shipped."""
    from app.selector import FamilyVote

    if margin is None or not item["family"]:
        return item["skill"]
    return FamilyVote.pick(item["family"], item["skill"], margin)


def main() -> None:
    from app.lm import load_lm
    from app.router import build_router, warm
    from app.selector import FamilyVote
    from app.settings import Settings
    from app.skills import SkillRegistry
    from fit_first_stage import _halves
    from fit_selector import split
    from retrievers.embed import default_embedder

    settings = Settings.load().replace(selector_family_margin=0.0)
    skills = SkillRegistry(settings.skills_dir)
    lm, embedder = load_lm(settings), default_embedder()
    router = build_router(settings.replace(selector="hybrid", safety=True), skills, lm, embedder)
    warm(router)
    labels = {s.name: s.dataset or s.name for s in skills.all()}
    vote = FamilyVote(embedder, margin=1.0)

    rows, fit_idx = split()
    dev = [dict(r, half="fit" if i in fit_idx else "report") for i, r in enumerate(rows)]
    live = [json.loads(line) for line in (ROOT / "tests" / "data" / "live-chat.jsonl").read_text().splitlines()
            if line.strip()]
    live = _halves([dict(r, label=r["skill"]) for r in live], key=lambda it: it["label"])
    sets = {"selector-dev": routed(router, dev, vote), "live-chat": routed(router, live, vote)}

    def acc(items, margin):
        return sum(labels[decide(it, margin)] == it["gold"] for it in items) / max(1, len(items))

    table = {}
    for m in MARGINS:
        table[m] = {(name, half): acc([it for it in items if it["half"] == half], m)
                    for name, items in sets.items() for half in ("fit", "report")}
    best = max((m for m in MARGINS if m is not None),
               key=lambda m: ((table[m][("selector-dev", "fit")] + table[m][("live-chat", "fit")]) / 2, m))
    lines = ["margin   selector-dev fit  live-chat fit  |  selector-dev report  live-chat report   (fit halves "
             "choose; report halves held out)"]
    for m in MARGINS:
        t = table[m]
        tag = "off" if m is None else f"{m:.2f}"
        mark = "  <- chosen on the fit halves" if m == best else ""
        lines.append(f"{tag:>6}   {t[('selector-dev', 'fit')]:16.3f}  {t[('live-chat', 'fit')]:13.3f}  |  "
                     f"{t[('selector-dev', 'report')]:19.3f}  {t[('live-chat', 'report')]:16.3f}{mark}")
    moved = [(name, it["half"], it["gold"], labels[it["skill"]], labels[decide(it, best)])
             for name, items in sets.items() for it in items if decide(it, best) != it["skill"]]
    lines.append(f"\nturns moved at {best}: gold, routed without the vote -> with it")
    lines += [f"  {n} {h}: {g}, {p} -> {q}" for n, h, g, p, q in moved]
    text = "\n".join(lines)
    print(text)
    OUT.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
