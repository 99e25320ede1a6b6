"""LM backend benchmark on the embedded model (or --model): start-up, time to first token with and without the cached
few-shot prefix, decode speed and peak memory; with --concurrency, many chats at once. Prints a table, or one JSON
object with --json. Not a test.

    python bench/lm.py [--model M] [--json] [--cold] [--concurrency 1,4,8 [--only-concurrency]]

Prompt: a ~1,400-token few-shot prefix (rendered skill examples) + a ~100-token dialogue, as a skill turn would send.
Warm-up runs first; each timing is the median of --repeat runs.

--concurrency N,M,..: for each N, N chats (threads) start together, each with its own dialogue after the same cached
prefix, each generating --decode-tokens tokens greedily (no stop strings), through the served LM (`load_lm`: continuous
batching) and through the plain backend alone (`lm.inner`: calls serialised by the model's lock, token by token):

    agg_tok_s   generated tokens of all chats / wall time from the common start to the last token (prefills included)
    decode_tok_s  streamed pieces (about one a token) of all chats after the moment every chat had its first one
                / the time from that moment to the last: the decode rate once every prefill is done
    ttft_p50_s, ttft_max_s   time from the common start to each chat's first streamed piece
    cpu_ms_tok  this process's CPU time (all threads) per generated token: the figure that other work on a shared
                machine skews least (wall-clock figures there depend on what else runs)

The two paths alternate for each N, so a change in the machine's load hits both alike.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.lm import Sampling, load_lm  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.skills import load_dir  # noqa: E402

PREFIX_TOKENS = 1400
DIALOGUE_TOKENS = 100


def build_prompt(lm, skills_dir: Path, variant: int = 0) -> tuple[str, str]:
    """A few-shot prefix of about PREFIX_TOKENS tokens and a dialogue of about DIALOGUE_TOKENS after it (``variant``
    picks another dialogue after the same prefix)."""
    shots = [skill.render_example(e) + skill.separator
             for skill in load_dir(skills_dir).skills.values() if skill.kind == "response" for e in skill.examples]
    prefix, turns = "", []
    for shot in shots * 4:
        if lm.count_tokens(prefix + shot) > PREFIX_TOKENS:
            break
        prefix += shot
    for shot in shots:
        turns += [line for line in shot.splitlines() if line.startswith(("User:", "Assistant:"))]
    start = (variant * 7) % max(1, len(turns) - 12)
    turns = turns[start:] + turns[:start]
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


def concurrent_chats(lm, prompts: list[str], prefix: str, tokens: int) -> dict:
    """One thread per prompt, all started together: aggregate tokens/s and times to first token."""
    n = len(prompts)
    stats: list[dict] = [{} for _ in range(n)]
    stamps: list[list[float]] = [[] for _ in range(n)]
    done: list[float] = [0.0] * n
    gate = threading.Barrier(n + 1)

    def chat(i: int) -> None:
        gate.wait()
        for _ in lm.generate(prompts[i], max_new_tokens=tokens, prefix=prefix, sampling=Sampling(), stats=stats[i]):
            stamps[i].append(time.perf_counter())
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    firsts = [s[0] if s else d for s, d in zip(stamps, done)]
    ttfts = sorted(f - t0 for f in firsts)
    all_started, end = max(firsts), max(done)
    after = sum(1 for s in stamps for t in s if t > all_started)
    tokens = sum(s.get("tokens", 0) for s in stats)
    return {"agg_tok_s": tokens / (end - t0), "decode_tok_s": after / (end - all_started) if end > all_started else 0.0,
            "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1], "cpu_ms_tok": 1000 * cpu / max(tokens, 1),
            "tokens": tokens, "load_avg_1m": os.getloadavg()[0]}


def concurrency_table(lm, settings, counts: list[int], tokens: int) -> dict:
    """{path: {N: figures}} for the served LM and, when it wraps one, the plain backend alone."""
    prefix, _ = build_prompt(lm, settings.skills_dir)
    prompts = [build_prompt(lm, settings.skills_dir, variant=i)[1] for i in range(max(counts))]
    inner = getattr(lm, "inner", None)  # load_lm's BatchedLM wraps the plain backend; other LMs are served as they are
    paths = {"batched": lm, "unbatched": inner} if inner is not None else {"served": lm}
    out: dict = {name: {} for name in paths}
    for target in paths.values():
        concurrent_chats(target, prompts[:2], prefix, 4)  # warm-up: caches the prefix, first-call costs
    for c in counts:
        for name, target in paths.items():
            out[name][str(c)] = concurrent_chats(target, prompts[:c], prefix, tokens)
    return out


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
    ap.add_argument("--concurrency", default=None, help="comma-separated chat counts, e.g. 1,4,8: many chats at once")
    ap.add_argument("--only-concurrency", action="store_true", help="skip start-up and single-stream timings")
    args = ap.parse_args()
    settings = Settings.load(model=args.model)
    results: dict = {"model": settings.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                     f"{platform.python_implementation()} {platform.python_version()}"}

    if not args.only_concurrency:
        load_lm(settings)  # make sure the converted checkpoint exists before timing warm starts
    if args.cold and settings.model.startswith("embedded:"):
        tmp = Path(tempfile.mkdtemp(prefix="fsb-bench-"))
        try:
            results["load_cold_s"] = load_in_fresh_process(settings.model, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.only_concurrency:
        results["load_warm_s"] = load_in_fresh_process(settings.model, settings.data_dir)

    lm = load_lm(settings)
    prefix, prompt = build_prompt(lm, settings.skills_dir)
    results["prefix_tokens"] = len(lm.encode(prompt, prefix)[0][: lm.encode(prompt, prefix)[1]])
    results["prompt_tokens"] = len(lm.encode(prompt, prefix)[0])
    if not args.only_concurrency:
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
    if args.concurrency:
        counts = [int(c) for c in args.concurrency.split(",")]
        results["concurrency"] = concurrency_table(lm, settings, counts, args.decode_tokens)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["load_avg_1m"] = os.getloadavg()[0]  # other work on the machine skews every figure

    if args.json:
        print(json.dumps(results))
        return
    targets = {"ttft_ratio": "<= 0.25", "decode_tok_s": ">= 7 (llama.cpp: 9.9)", "load_warm_s": "<= 10"}
    print(f"LM benchmark — {results['model']} on {results['machine']}")
    print(f"{'metric':<16} {'value':>10}  target")
    for key, value in results.items():
        if key in ("model", "machine", "concurrency"):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<16} {shown:>10}  {targets.get(key, '')}")

    if "concurrency" in results:
        print_concurrency(results["concurrency"])


def print_concurrency(table: dict) -> None:
    """Chats x path; ``x 1``: the figure over the same path's single chat (when 1 was measured)."""
    counts = list(next(iter(table.values())))
    print(f"\n{'chats':>5} {'path':<10} {'agg tok/s':>10} {'x 1':>5} {'decode tok/s':>13} {'x 1':>5} "
          f"{'ttft p50 s':>11} {'ttft max s':>11} {'cpu ms/tok':>11} {'load':>5}")
    for c in counts:
        for name, rows in table.items():
            r, one = rows[c], rows.get("1")
            x = {k: f"{r[k] / one[k]:.2f}" if one and one[k] else "-" for k in ("agg_tok_s", "decode_tok_s")}
            print(f"{c:>5} {name:<10} {r['agg_tok_s']:>10.1f} {x['agg_tok_s']:>5} {r['decode_tok_s']:>13.1f} "
                  f"{x['decode_tok_s']:>5} {r['ttft_p50_s']:>11.2f} {r['ttft_max_s']:>11.2f} {r['cpu_ms_tok']:>11.0f} "
                  f"{r['load_avg_1m']:>5.1f}")


if __name__ == "__main__":
    main()
