"""GPU serving benchmark: random-weight Llama-3-8B- and GPT-J-6B-shaped models (no download), through our own serving
path -- `TransformersLM` with the static-cache fast path for single streams, `BatchedLM` (continuous batching) for
concurrent chats -- next to the bandwidth floor measured on the same card.

    python bench/gpu.py                     # CUDA: both shapes, a table
    python bench/gpu.py --json              # one JSON object (device, floor_tok_s, decode_tok_s_single, ...)
    python bench/gpu.py --tiny --json       # CPU: the same code at a tiny size (numbers mean nothing)
    python bench/gpu.py --tiny --embedded --remote http://127.0.0.1:8080/v1   # + CPU rows for the embedded model

Speed does not depend on weight values, so random bf16 weights stand in for the real checkpoints. The tokenizer is a
small BPE trained in code; the output layer's rows past its vocabulary (and EOS's) are zeroed so greedy decoding
always produces text of the requested length. What each figure is:

    floor_tok_s        measured copy bandwidth / weight bytes: one stream can't decode faster than reading all weights
    decode_tok_s_single  one stream, greedy, tokens after the first / time after the first (fast path on CUDA)
    decode_tok_s_eager   the same through the ordinary eager loop
    ttft_uncached_ms   time to first token, 1,500-token prompt, nothing cached
    ttft_cached_ms     time to first token, the same prompt as a cached 1,400-token prefix + a 100-token suffix
    aggregate_tok_s    {chats: generated tokens / wall time} with that many concurrent chats through `BatchedLM`
                       (as served: a free fast path takes one of them, the rest share the running batch)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {  # the real models' shapes; --tiny shrinks them
    "llama3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "gptj-6b": dict(arch="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048),
}
TINY = {
    "llama3-8b": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
    "gptj-6b": dict(vocab_size=4096, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
}


# ---------------------------------------------------------------------------------------------- building
def random_lm(shape: str, tiny: bool, device: str):
    """A `TransformersLM` over a random-weight model of the named shape, and its weight bytes."""
    from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig

    from app.lm.hf import TransformersLM
    from app.lm.tiny import build_tokenizer, corpus_from
    from app.settings import REPO_ROOT

    tok = build_tokenizer(corpus_from([REPO_ROOT / "skills", REPO_ROOT / "prompts"]), vocab_size=1000)
    spec = {**SHAPES[shape], **(TINY[shape] if tiny else {})}
    arch = spec.pop("arch")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = (LlamaConfig if arch == "llama" else GPTJConfig)(**spec, **ids)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # only ids the tokenizer knows, never EOS: every generation runs its full length
        head = model.get_output_embeddings().weight
        head[len(tok):].zero_()
        head[tok.eos_token_id].zero_()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return TransformersLM(model, tok, name=shape, prefix_cache_entries=8), weight_bytes


def bandwidth_gbps(device: str) -> float:
    """Copy bandwidth (read + write) of a large buffer, GB/s: the floor's denominator."""
    n = (1 << 30) if device == "cuda" else (1 << 26)  # 2 GiB / 128 MiB of bf16... float16 copies
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / min(times) / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def text_of(lm, n_tokens: int, seed: int = 0) -> str:
    """A prompt of about ``n_tokens`` tokens (words from the product's own prompt files)."""
    from app.lm.tiny import corpus_from
    from app.settings import REPO_ROOT

    words = " ".join(corpus_from([REPO_ROOT / "skills", REPO_ROOT / "prompts"])).split()
    words = words[seed * 97 % len(words):] + words
    lo, hi = 1, min(len(words), 4 * n_tokens)
    while lo < hi:  # fewest words reaching n_tokens
        mid = (lo + hi) // 2
        if lm.count_tokens(" ".join(words[:mid])) < n_tokens:
            lo = mid + 1
        else:
            hi = mid
    return " ".join(words[:lo])


# ------------------------------------------------------------------------------------------- measurements
def decode_tok_s(lm, prompt: str, n: int, repeat: int = 3) -> float:
    """Tokens after the first / seconds after the first, one stream, greedy; the median of ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        stats: dict = {}
        first = None
        for _ in lm.generate(prompt, max_new_tokens=n, stats=stats):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        rates.append((stats.get("tokens", n) - 1) / max(end - first, 1e-9))
    return statistics.median(rates)


def ttft_ms(lm, prompt: str, prefix: str | None, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        next(iter(lm.generate(prompt, max_new_tokens=1, prefix=prefix)), None)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def aggregate_tok_s(lm, prompts: list[str], n: int) -> float:
    """Generated tokens / wall time with one thread per chat, all started together."""
    stats = [{} for _ in prompts]
    start = threading.Barrier(len(prompts) + 1)

    def chat(i):
        start.wait()
        for _ in lm.generate(prompts[i], max_new_tokens=n, stats=stats[i]):
            pass

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(s.get("tokens", 0) for s in stats) / (time.perf_counter() - t0)


def run_lm(lm, *, single, batched, tokens: int, concurrency: list[int], prefix_tokens: int, suffix_tokens: int):
    """The figures for one model, measured through ``single`` (one stream) and ``batched`` (many chats)."""
    decode_tok_s(single, text_of(lm, 20, seed=5), 4, repeat=1)  # first calls are slow (kernels, connections)
    head = text_of(lm, prefix_tokens, seed=1)
    tail = " " + text_of(lm, suffix_tokens, seed=2)
    out = {"decode_tok_s_single": decode_tok_s(single, text_of(lm, 100, seed=3), tokens)}
    out["ttft_uncached_ms"] = statistics.median(  # a fresh prompt each time: nothing reusable anywhere
        ttft_ms(single, f"{i} " + head + tail, None, repeat=1) for i in range(3))
    ttft_ms(single, head + tail, head, repeat=1)  # caches the prefix
    out["ttft_cached_ms"] = ttft_ms(single, head + tail, head)
    out["aggregate_tok_s"] = {}
    for c in concurrency:
        prompts = [text_of(lm, 100, seed=10 + i) for i in range(c)]
        out["aggregate_tok_s"][str(c)] = aggregate_tok_s(batched, prompts, tokens)
    return out


def bench_shape(shape: str, args, device: str, gbps: float) -> dict:
    from app.lm.batching import BatchedLM
    from app.lm.fast import FastPath

    t = time.perf_counter()
    lm, weight_bytes = random_lm(shape, args.tiny, device)
    row = {"model": shape + (" (tiny)" if args.tiny else ""), "params_b": weight_bytes / lm.model.dtype.itemsize / 1e9,
           "weight_gb": weight_bytes / 1e9, "floor_tok_s": gbps * 1e9 / weight_bytes, "build_s": time.perf_counter() - t}
    plain = lm.fast = None
    if device == "cuda" or args.fast_on_cpu:
        t = time.perf_counter()
        lm.fast = FastPath(lm, max_len=2048, compile=device == "cuda").warmup()
        row["warmup_s"] = time.perf_counter() - t
    kw = dict(tokens=args.tokens, concurrency=args.concurrency, prefix_tokens=args.prefix, suffix_tokens=args.suffix)
    batched = BatchedLM(lm, max_batch=max(args.concurrency))
    try:
        single = lm
        decode_tok_s(single, text_of(lm, 100, seed=4), 8, repeat=2)  # warm the eager paths too
        row.update(run_lm(lm, single=single, batched=batched, **kw))
        if lm.fast is not None:
            plain, lm.fast = lm.fast, None
            row["decode_tok_s_eager"] = decode_tok_s(lm, text_of(lm, 100, seed=3), args.tokens)
            lm.fast = plain
    finally:
        batched.close()
    del lm, batched
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_embedded(args) -> dict:
    """The embedded gemma-3-270m on this machine's CPU: one stream through the plain backend, chats as served."""
    from app.lm import load_lm
    from app.lm.batching import BatchedLM
    from app.settings import Settings

    served = load_lm(Settings.load(env={}))  # a BatchedLM unless batching is turned off
    lm = getattr(served, "inner", served)
    batched = served if served is not lm else BatchedLM(lm, max_batch=max(args.concurrency))
    try:
        row = {"model": "embedded gemma-3-270m (CPU, transformers)"}
        row.update(run_lm(lm, single=lm, batched=batched, tokens=args.tokens, concurrency=args.concurrency,
                          prefix_tokens=args.prefix, suffix_tokens=args.suffix))
    finally:
        batched.close()
    return row


def bench_remote(url: str, args) -> dict:
    from app.lm.remote import RemoteLM

    lm = RemoteLM(url, timeout=600)
    row = {"model": f"remote {lm.model} at {url}"}
    row.update(run_lm(lm, single=lm, batched=lm, tokens=args.tokens, concurrency=args.concurrency,
                      prefix_tokens=args.prefix, suffix_tokens=args.suffix))
    lm.close()
    return row


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, runs on CPU (a smoke run; figures mean nothing)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--models", default="llama3-8b,gptj-6b")
    p.add_argument("--tokens", type=int, default=None, help="tokens generated per stream (default 256; tiny 24)")
    p.add_argument("--concurrency", default=None, help="comma-separated chat counts (default 1,4,16,64; tiny 1,4)")
    p.add_argument("--prefix", type=int, default=1400, help="cached prefix tokens for ttft_cached_ms")
    p.add_argument("--suffix", type=int, default=100, help="suffix tokens after the cached prefix")
    p.add_argument("--embedded", action="store_true", help="add a row for the embedded model on this CPU")
    p.add_argument("--remote", default=None, help="add a row for an OpenAI-compatible server at this /v1 URL")
    p.add_argument("--fast-on-cpu", action="store_true", help="exercise the fast path eagerly on CPU (--tiny)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench/gpu.py: no CUDA device here. The GPU figures need a CUDA machine; run with --tiny to exercise "
              "the same code on CPU at a tiny size (its numbers are not GPU figures).", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.tiny else "cpu"
    args.tokens = args.tokens or (24 if args.tiny else 256)
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if args.tiny else "1,4,16,64")).split(",")]
    if args.tiny:
        args.prefix, args.suffix = min(args.prefix, 140), min(args.suffix, 10)
    gbps = bandwidth_gbps(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "tiny": args.tiny, "bandwidth_gbps": gbps, "tokens_per_stream": args.tokens,
              "prefix_tokens": args.prefix, "suffix_tokens": args.suffix, "models": []}
    for shape in filter(None, args.models.split(",")):
        result["models"].append(bench_shape(shape, args, device, gbps))
    if args.embedded:
        result["models"].append(bench_embedded(args))
    if args.remote:
        result["models"].append(bench_remote(args.remote, args))
    first = result["models"][0]  # the headline fields are the first model's (the 8B shape by default)
    for key in ("floor_tok_s", "decode_tok_s_single", "ttft_cached_ms", "ttft_uncached_ms", "aggregate_tok_s"):
        result[key] = first.get(key)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


def print_table(result: dict) -> None:
    conc = list(result["models"][0]["aggregate_tok_s"])
    print(f"device: {result['device']}   copy bandwidth {result['bandwidth_gbps']:.0f} GB/s   "
          f"{result['tokens_per_stream']} tokens/stream   cached prefix {result['prefix_tokens']} + suffix "
          f"{result['suffix_tokens']} tokens" + ("   (TINY: smoke run, not GPU figures)" if result["tiny"] else ""))
    cols = ["model", "floor tok/s", "decode tok/s", "eager tok/s", "ttft uncached ms", "ttft cached ms"] + [
        f"{c} chats tok/s" for c in conc]
    rows = [[m["model"], m.get("floor_tok_s"), m.get("decode_tok_s_single"), m.get("decode_tok_s_eager"),
             m.get("ttft_uncached_ms"), m.get("ttft_cached_ms")] + [m["aggregate_tok_s"].get(c) for c in conc]
            for m in result["models"]]
    cells = [[c if isinstance(c, str) else "-" if c is None else f"{c:,.1f}" for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *cells)]
    for r in [cols] + cells:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    sys.exit(main())
