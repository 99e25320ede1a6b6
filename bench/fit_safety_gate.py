"""The safety gate's weight, threshold and cascade margins, chosen on development data only (stops 29 and 30).

    python bench/fit_safety_gate.py score bench/results/safety-gate-evidence.pkl   # ~5 min on 2 cores
    python bench/fit_safety_gate.py grid  bench/results/safety-gate-evidence.pkl   # seconds

``score`` computes the first stage's evidence (both votes, and the LM's scores for every message: the cascade off) for
every development set: align dev, ``bench/data/safety-holdout{,-2..-9}``, ``tests/data/instructions-*`` and
selector-dev's last messages (all harmless; counted as declines). ``grid`` replays the shipped rule
(`app.first_stage.decide`) under each weight x threshold and prints the share of unsafe messages declined and of
harmless ones declined per set, then, for the chosen gates, the cascade margins: the largest distance from the
threshold at which the LM still overturned the vote on these items (+0.005), so the cascade changes no decision on
them. ``safety-holdout-10`` and ``-11`` are not read: in stop 30 they were the held-out checks (``fsb eval align
--data ... --route safety``; holdout-10's misses were read after its measurement). In stop 29 the held-out check was
holdout-7 and the sets were holdout{,-2..-6}; stop 30 re-ran the grid on these sets and kept the gate.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def score(out: str) -> None:
    from app.lm import load_lm
    from app.router import build_router
    from app.settings import Settings
    from app.skills import SkillRegistry
    from retrievers.embed import default_embedder

    settings = Settings.load()
    reg = SkillRegistry(settings.skills_dir)
    router = build_router(settings.replace(selector="hybrid", safety=True), reg, load_lm(settings), default_embedder())
    st = router.first_stage
    c0 = st.data.constants
    off = {"sure_above": None, "sure_below": None}
    st.data = dataclasses.replace(st.data, constants=c0.model_copy(update={
        "safety": c0.safety.model_copy(update=off), "turn": c0.turn.model_copy(update=off)}))
    sets: dict[str, list[tuple[str, bool]]] = {}

    def instructions(path: Path, name: str) -> None:
        for line in open(path):
            r = json.loads(line)
            sets.setdefault(name, []).append((r["instruction"], r["category"] == "safety"))

    instructions(SHARED / "alignment" / "dev.jsonl", "align-dev")
    for n in ["", "-2", "-3", "-4", "-5", "-6", "-7", "-8", "-9"]:
        instructions(ROOT / f"bench/data/safety-holdout{n}.jsonl", f"holdout{n or '-1'}")
    for f, unsafe in (("instructions-unsafe.jsonl", True), ("instructions-benign.jsonl", False)):
        for line in open(ROOT / "tests" / "data" / f):
            sets.setdefault("instructions", []).append((json.loads(line)["instruction"], unsafe))
    for line in open(SHARED / "fsb" / "selector-dev.jsonl"):
        sets.setdefault("selector-dev", []).append((json.loads(line)["dialogue"][-1][0], False))
    cands = list(st.source())
    evidence = {}
    for name, items in sets.items():
        evidence[name] = [(st.evidence(m, cands), u) for m, u in items]
        print(f"[fit_safety_gate] {name}: {len(items)} messages", file=sys.stderr, flush=True)
    pickle.dump((evidence, st.kinds(cands)), open(out, "wb"))


def grid(path: str) -> None:
    from app.first_stage import DECLINE, FirstStageData, decide, lm_needed

    evidence, kinds = pickle.load(open(path, "rb"))
    c0 = FirstStageData.load(ROOT / "prompts" / "first-stage.yaml").constants

    def gates(w, t, sure=(None, None)):
        return c0.model_copy(update={"safety": c0.safety.model_copy(update={
            "weight": w, "threshold": t, "sure_above": sure[0], "sure_below": sure[1]})})

    def show(tag, c):
        r = {}
        for name, rows in evidence.items():
            d = [(decide(e, kinds, c).action == DECLINE, u) for e, u in rows]
            un, be = [x for x, u in d if u], [x for x, u in d if not u]
            r[name] = (sum(un) / len(un) if un else None, sum(be) / len(be) if be else 0.0, sum(be))
        mean = [v[0] for v in r.values() if v[0] is not None]
        worst = max(v[1] for k, v in r.items() if k != "selector-dev")
        print(f"{tag:18} mean unsafe {sum(mean) / len(mean):.3f}  max benign {worst:.3f}  "
              + " ".join(f"{k}:{(v[0] or 0):.2f}/{v[1]:.2f}" for k, v in r.items() if k != "selector-dev")
              + f"  selector-dev declined {r['selector-dev'][2]}")

    show("shipped", c0)
    for w in (0.25, 0.5, 0.75, 1.0):
        for t in (-0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.18):
            show(f"w {w} t {t}", gates(w, t))
    # the cascade for the shipped gates: the largest distance from the threshold at which the LM overturned the vote
    rows = [e for rs in evidence.values() for e, _ in rs]
    w, t = c0.safety.weight, c0.safety.threshold
    full = gates(w, t)
    declined = [decide(e, kinds, full).action == DECLINE for e in rows]
    up = max([e.vote_safety - t for e, d in zip(rows, declined) if not d and e.vote_safety > t], default=0.0)
    down = max([t - e.vote_safety for e, d in zip(rows, declined) if d and e.vote_safety < t], default=0.0)
    c = gates(w, t, (round(up + 0.005, 3), round(down + 0.005, 3)))
    need = sum(lm_needed(c, e.vote_safety, e.vote_turn) for e in rows)
    same = sum((decide(e, kinds, c).action == DECLINE) == d for e, d in zip(rows, declined))
    print(f"cascade for weight {w}, threshold {t}: sure_above {c.safety.sure_above}, sure_below "
          f"{c.safety.sure_below}; the LM scores {need} of {len(rows)} messages; {same} decisions as without it")

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("score", "grid"):
        sys.exit(__doc__)
    (score if sys.argv[1] == "score" else grid)(sys.argv[2])
