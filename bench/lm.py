"""LM backend benchmark on the embedded model (or --model): start-up, time to first token with and without the cached
few-shot prefix, decode speed and peak memory. Prints a table, or one JSON object with --json. Not a test.

    python bench/lm.py [--model M] [--json] [--cold]

Prompt: a ~1,400-token few-shot prefix (rendered skill examples) + a ~100-token dialogue, as a skill turn would send.
Warm-up runs first; each timing is the median of --repeat runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.lm import Sampling, load_lm  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.skills import load_dir  # noqa: E402

PREFIX_TOKENS = 1400
DIALOGUE_TOKENS = 100


def build_prompt(lm, skills_dir: Path) -> tuple[str, str]:
    """A few-shot prefix of about PREFIX_TOKENS tokens and a dialogue of about DIALOGUE_TOKENS after it."""
    shots = [skill.render_example(e) + skill.separator
             for skill in load_dir(skills_dir).skills.values() if skill.kind == "response" for e in skill.examples]
    prefix, turns = "", []
    for shot in shots * 4:
        if lm.count_tokens(prefix + shot) > PREFIX_TOKENS:
            break
        prefix += shot
    for shot in shots:
        turns += [line for line in shot.splitlines() if line.startswith(("User:", "Assistant:"))]
    dialogue = ""
    for line in turns:
        if lm.count_tokens(dialogue + line + "\n") > DIALOGUE_TOKENS - 4:
            break
        dialogue += line + "\n"
    if dialogue.splitlines()[-1].startswith("Assistant:"):
        dialogue = "\n".join(dialogue.splitlines()[:-1]) + "\n"
    return prefix, prefix + "Dialogue:\n" + dialogue + "Assistant:"


def ttft(lm, prompt: str, prefix: str | None) -> float:
    started = time.perf_counter()
    for _ in lm.generate(prompt, max_new_tokens=1, prefix=prefix):
        break
    return time.perf_counter() - started


def decode_rate(lm, prompt: str, prefix: str, tokens: int) -> float:
    """Tokens per second after the first token (no stop strings, EOS permitting)."""
    stats: dict = {}
    stamps = []
    for _ in lm.generate(prompt, max_new_tokens=tokens, prefix=prefix, sampling=Sampling(), stats=stats):
        stamps.append(time.perf_counter())
    n = stats.get("tokens", 0)
    if len(stamps) < 2 or n < 2:
        return float("nan")
    return (n - 1) / (stamps[-1] - stamps[0]) if stamps[-1] > stamps[0] else float("nan")


def load_in_fresh_process(model: str, data_dir: Path) -> float:
    """Seconds for a new Python process to import and load the model, as a server start does."""
    code = ("import time; t=time.perf_counter(); from app.lm import load_lm; from app.settings import Settings; "
            f"load_lm(Settings.load(model={model!r}, data_dir={str(data_dir)!r})); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to measure (default: the embedded gemma-3-270m)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--cold", action="store_true", help="also time the first start (GGUF conversion) in a temp dir")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    settings = Settings.load(model=args.model)
    results: dict = {"model": settings.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"{platform.python_implementation()} {platform.python_version()}"}

    load_lm(settings)  # make sure the converted checkpoint exists before timing warm starts
    if args.cold and settings.model.startswith("embedded:"):
        tmp = Path(tempfile.mkdtemp(prefix="fsb-bench-"))
        try:
            results["load_cold_s"] = load_in_fresh_process(settings.model, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    results["load_warm_s"] = load_in_fresh_process(settings.model, settings.data_dir)

    lm = load_lm(settings)
    prefix, prompt = build_prompt(lm, settings.skills_dir)
    results["prefix_tokens"] = len(lm.encode(prompt, prefix)[0][: lm.encode(prompt, prefix)[1]])
    results["prompt_tokens"] = len(lm.encode(prompt, prefix)[0])
    ttft(lm, prompt, None)  # warm-up
    capacity = lm.prefix_cache.capacity
    lm.prefix_cache.capacity = 0
    results["ttft_cold_s"] = statistics.median(ttft(lm, prompt, prefix) for _ in range(args.repeat))
    lm.prefix_cache.capacity = capacity
    ttft(lm, prompt, prefix)  # encodes and caches the prefix
    results["ttft_cached_s"] = statistics.median(ttft(lm, prompt, prefix) for _ in range(args.repeat))
    results["ttft_ratio"] = results["ttft_cached_s"] / results["ttft_cold_s"]
    results["decode_tok_s"] = statistics.median(decode_rate(lm, prompt, prefix, args.decode_tokens)
                                                for _ in range(args.repeat))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if args.json:
        print(json.dumps(results))
        return
    targets = {"ttft_ratio": "<= 0.25", "decode_tok_s": ">= 7 (llama.cpp: 9.9)", "load_warm_s": "<= 10"}
    print(f"LM benchmark — {results['model']} on {results['machine']}")
    print(f"{'metric':<16} {'value':>10}  target")
    for key, value in results.items():
        if key in ("model", "machine"):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<16} {shown:>10}  {targets.get(key, '')}")


if __name__ == "__main__":
    main()
