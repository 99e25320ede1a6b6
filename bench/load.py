"""Load on loopback: N concurrent clients against a real server for T seconds, half streamed, half not.

    python bench/load.py [--clients 50] [--seconds 300] [--model M] [--json]

Starts `server.py` in a subprocess on a free loopback port (its own temp data directory, the usual converted model),
then every client loops: send a chat turn, read the whole reply, repeat, until time is up. Prints requests, errors by
kind, latency percentiles (whole reply; time to first byte for streams) and the server's peak memory. Not a test
(tests/test_load.py is the short version that CI runs).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--model", default=None, help="default: the embedded gemma-3-270m")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="fsb-load-")
    env = {**os.environ, "FSB_DATA_DIR": tmp, "FSB_STARTER_KB": "off", "FSB_LOG_LEVEL": "warning"}
    if args.model:
        env["FSB_MODEL"] = args.model
    # the converted embedded model lives in the usual data directory: point the temp one at it
    from app.settings import Settings

    models = Settings.load().models_dir
    if models.exists():
        os.symlink(models, Path(tmp) / "models")
    server = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)

        latencies: list[float] = []
        first_bytes: list[float] = []
        outcomes: Counter = Counter()
        lock = threading.Lock()
        peak = [proc.memory_info().rss]
        stop_at = time.time() + args.seconds

        def client(n: int) -> None:
            stream = n % 2 == 1
            with httpx.Client(timeout=600) as c:
                i = 0
                while time.time() < stop_at:
                    i += 1
                    body = {"model": "fsb", "stream": stream, "max_tokens": args.max_tokens, "user": f"load{n}",
                            "messages": [{"role": "user", "content": f"hello, I am client {n}, message {i}"}]}
                    started = time.perf_counter()
                    kind, ttfb = "ok", None
                    try:
                        if stream:
                            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                                if r.status_code != 200:
                                    kind = f"http {r.status_code}"
                                    r.read()
                                else:
                                    lines = []
                                    for line in r.iter_lines():
                                        if ttfb is None and line.startswith("data: ") and '"content"' in line:
                                            ttfb = time.perf_counter() - started
                                        if line:
                                            lines.append(line)
                                    if not lines or lines[-1] != "data: [DONE]":
                                        kind = "incomplete stream"
                                    elif any('"error"' in line for line in lines):
                                        kind = "error event"
                        else:
                            r = c.post(url + "/v1/chat/completions", json=body)
                            if r.status_code != 200:
                                kind = f"http {r.status_code}"
                            elif not r.json()["choices"][0]["message"]["content"]:
                                kind = "empty reply"
                    except httpx.HTTPError as exc:
                        kind = type(exc).__name__
                    elapsed = time.perf_counter() - started
                    with lock:
                        outcomes[kind] += 1
                        if kind == "ok":
                            latencies.append(elapsed)
                            if ttfb is not None:
                                first_bytes.append(ttfb)
                    if kind.startswith("http 429") or kind.startswith("http 503"):
                        time.sleep(1.0)

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
        started = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.5)
        wall = time.time() - started
    finally:
        server.terminate()
        server.wait(timeout=60)

    total = sum(outcomes.values())
    result = {
        "clients": args.clients, "seconds": round(wall, 1), "requests": total, "ok": outcomes["ok"],
        "errors": {k: v for k, v in outcomes.items() if k != "ok"}, "throughput_rps": round(total / wall, 3),
        "p50_s": pct(latencies, 50), "p90_s": pct(latencies, 90), "p95_s": pct(latencies, 95),
        "p99_s": pct(latencies, 99), "ttfb_p50_s": pct(first_bytes, 50), "ttfb_p95_s": pct(first_bytes, 95),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"load: {args.clients} clients x {args.seconds:.0f} s against {url} ({args.model or 'embedded model'})")
    for key, value in result.items():
        print(f"  {key:<16} {value:.3f}" if isinstance(value, float) else f"  {key:<16} {value}")


if __name__ == "__main__":
    main()
