"""Load on loopback: N concurrent clients against a real server for T seconds, half streamed, half not.

    python bench/load.py [--clients 50] [--seconds 300] [--model M] [--disconnect-rate R] [--json]

Starts `server.py` in a subprocess on a free loopback port (its own temp data directory, the usual converted model;
or loads one already running at --url), then every client loops: send a chat turn, read the whole reply, repeat,
until time is up; odd clients stream. A 429 or 503 is retried after its Retry-After (capped by the time left). With
--disconnect-rate R, a fraction R of the requests hang up on purpose at a random point, one of:

  partial-body  headers and part of the body on a raw socket, then a reset
  after-send    the whole request (streamed or not, as the client) on a raw socket, then close before any byte
                of the answer
  first-chunk   a streamed request, closed after its first SSE event
  mid-stream    a streamed request, closed after a random number of SSE events

Every request has a timeout and the clients stop within --seconds + --grace, however the server behaves. Then the
server's /metrics (Prometheus text) is polled for up to --drain seconds until no turn is in flight or queued.

Reports: requests, ok (completed turns), errors by kind, disconnected (and by point), goodput_rps (completed turns per
second), latency percentiles over completed turns (whole reply; ttfb = first generated token of a stream), the
server's peak memory, and in_flight_after / queued_after (fsb_turns_in_flight / fsb_turns_queued after the drain;
null when the server has no /metrics). Not a test (tests/test_load.py is the short version that CI runs).
"""
from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import math
import os
import random
import socket
import statistics
import struct
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
ROUTE = "/v1/chat/completions"
DISCONNECT_POINTS = ("partial-body", "after-send", "first-chunk", "mid-stream")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


class Disconnected(Exception):
    """The client hung up on purpose."""


def raw_request(host: str, port: int, path: str, body: bytes, point: str, timeout: float,
                rng: random.Random) -> None:
    """Send a chat request on a raw socket and hang up: mid-body (``partial-body``, with a reset) or right after the
    whole request (``after-send``, before any byte of the answer is read)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock = socket.create_connection((host, port), timeout=max(0.1, timeout))
    try:
        if point == "partial-body":
            sock.sendall(head + body[:rng.randint(1, len(body) - 1)])
            time.sleep(rng.uniform(0, 0.05))  # let the server start reading the body
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        else:
            sock.sendall(head + body)  # a plain close (FIN), so the request surely arrives before the hang-up
    finally:
        sock.close()


def http_timeout(left: float) -> httpx.Timeout:
    left = max(0.1, left)
    return httpx.Timeout(connect=min(5.0, left), read=left, write=left, pool=left)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50, metavar="N", help="concurrent clients, odd ones stream "
                                                                         "(default 50)")
    ap.add_argument("--seconds", type=float, default=300, metavar="S",
                    help="how long the clients send requests (default 300)")
    ap.add_argument("--model", default=None, metavar="M", help="the started server's model (default: the embedded "
                                                               "gemma-3-270m; `tiny` for a quick check)")
    ap.add_argument("--url", default=None, metavar="URL",
                    help="load a server that is already running at URL instead of starting one (its peak memory is "
                         "reported when it runs on this machine)")
    ap.add_argument("--max-tokens", type=int, default=24, metavar="N", help="max_tokens of each turn (default 24)")
    ap.add_argument("--disconnect-rate", type=float, default=0.0, metavar="R",
                    help="fraction of requests that hang up on purpose at a random point (default 0)")
    ap.add_argument("--disconnect-at", default=",".join(DISCONNECT_POINTS), metavar="POINTS",
                    help="comma-separated points to hang up at, picked at random (default: all four)")
    ap.add_argument("--timeout", type=float, default=120, metavar="S",
                    help="per-request timeout in seconds (default 120)")
    ap.add_argument("--grace", type=float, default=30, metavar="S",
                    help="seconds after --seconds for requests in flight to finish; any still running then are "
                         "counted as timeouts and abandoned (default 30)")
    ap.add_argument("--drain", type=float, default=10, metavar="S",
                    help="seconds to wait for the server's in-flight turns to reach 0 after the clients stop "
                         "(default 10)")
    ap.add_argument("--seed", type=int, default=None, metavar="N", help="random seed for the disconnects")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not 0.0 <= args.disconnect_rate <= 1.0:
        ap.error("--disconnect-rate must be between 0 and 1")
    args.points = tuple(p.strip() for p in args.disconnect_at.split(",") if p.strip())
    if not args.points or any(p not in DISCONNECT_POINTS for p in args.points):
        ap.error(f"--disconnect-at takes a comma-separated subset of {', '.join(DISCONNECT_POINTS)}")
    if args.url and not args.url.startswith("http://") and args.disconnect_rate and (
            {"partial-body", "after-send"} & set(args.points)):
        ap.error("partial-body and after-send disconnects use plain sockets: they need an http:// --url")
    return args


@contextlib.contextmanager
def local_server(model: str | None):
    """`server.py` in a subprocess on a free loopback port with its own temp data directory; yields (url, process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="fsb-load-")
    env = {**os.environ, "FSB_DATA_DIR": tmp, "FSB_STARTER_KB": "off", "FSB_LOG_LEVEL": "warning"}
    if model:
        env["FSB_MODEL"] = model
    # the converted embedded model lives in the usual data directory: point the temp one at it
    from app.settings import Settings

    models = Settings.load().models_dir
    if models.exists():
        os.symlink(models, Path(tmp) / "models")
    server = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while True:  # up, and its prompt caches warm (the load is measured on a server in its steady state)
            try:
                health = httpx.get(url + "/healthz", timeout=1)
                if health.status_code == 200 and health.json().get("warm", {}).get("ready", True):
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        yield url, psutil.Process(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:  # stuck on connections that never end
            server.kill()
            server.wait(timeout=15)


def listening_process(url: str) -> psutil.Process | None:
    """The local process that listens on ``url``'s port, when there is one this user may see."""
    port = httpx.URL(url).port or 80
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


def run(url: str, args: argparse.Namespace, proc: psutil.Process | None) -> dict:
    """Run the clients against ``url`` for ``args.seconds``, then drain the server; returns the report."""
    parsed = httpx.URL(url)
    host, port, path = parsed.host, parsed.port or 80, parsed.path.rstrip("/") + ROUTE

    def rss() -> int:
        try:
            return proc.memory_info().rss if proc else 0
        except psutil.Error:
            return 0

    latencies: list[float] = []
    first_bytes: list[float] = []
    outcomes: Counter = Counter()
    hangups: Counter = Counter()
    lock = threading.Lock()
    running: dict[int, float] = {}  # client -> when its current request started
    closed = [False]  # set when the run is over: later results are not counted
    peak = rss()
    stop_at = time.time() + args.seconds
    hard_stop = stop_at + args.grace
    master = random.Random(args.seed)
    seeds = [master.randrange(2**32) for _ in range(args.clients)]

    def client(n: int) -> None:
        rng = random.Random(seeds[n])
        stream = n % 2 == 1
        with httpx.Client() as c:
            i = 0
            while time.time() < stop_at:
                i += 1
                point = rng.choice(args.points) if rng.random() < args.disconnect_rate else None
                streamed = stream or point in ("first-chunk", "mid-stream")
                body = {"model": "fsb", "stream": streamed, "max_tokens": args.max_tokens, "user": f"load{n}",
                        "messages": [{"role": "user", "content": f"hello, I am client {n}, message {i}"}]}
                started = time.perf_counter()
                left = min(args.timeout, hard_stop - time.time())
                kind, ttfb, wait = "ok", None, None
                with lock:
                    running[n] = started
                try:
                    if point in ("partial-body", "after-send"):
                        raw_request(host, port, path, json.dumps(body).encode(), point, left, rng)
                        raise Disconnected()
                    if streamed:
                        # the SSE event to hang up after: the first (the role event) or a random later one
                        hang_after = 1 if point == "first-chunk" else (
                            rng.randint(2, args.max_tokens + 1) if point == "mid-stream" else None)
                        with c.stream("POST", url + ROUTE, json=body, timeout=http_timeout(left)) as r:
                            if r.status_code != 200:
                                kind, wait = f"http {r.status_code}", retry_after(r.headers.get("retry-after"))
                                r.read()
                            else:
                                lines, events = [], 0
                                for line in r.iter_lines():
                                    if not line:
                                        continue
                                    lines.append(line)
                                    if line.startswith("data: "):
                                        events += 1
                                        if ttfb is None and '"content"' in line and '"content": ""' not in line:
                                            ttfb = time.perf_counter() - started
                                        if hang_after is not None and events >= hang_after \
                                                and line != "data: [DONE]":
                                            raise Disconnected()  # leaving the block closes the connection
                                    if time.time() > hard_stop:
                                        raise httpx.ReadTimeout("the run is over")
                                if not lines or lines[-1] != "data: [DONE]":
                                    kind = "incomplete stream"
                                elif any('"error"' in line for line in lines):
                                    kind = "error event"
                    else:
                        r = c.post(url + ROUTE, json=body, timeout=http_timeout(left))
                        if r.status_code != 200:
                            kind, wait = f"http {r.status_code}", retry_after(r.headers.get("retry-after"))
                        elif not r.json()["choices"][0]["message"]["content"]:
                            kind = "empty reply"
                except Disconnected:
                    kind = "disconnected"
                except (httpx.TimeoutException, socket.timeout):
                    kind = "timeout"
                except (httpx.HTTPError, OSError, ValueError) as exc:
                    kind = type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    running.pop(n, None)
                    if closed[0]:
                        return
                    if kind == "disconnected":
                        hangups[point] += 1
                    outcomes[kind] += 1
                    if kind == "ok":
                        latencies.append(elapsed)
                        if ttfb is not None:
                            first_bytes.append(ttfb)
                if kind in ("http 429", "http 503"):
                    # honour Retry-After (1 s without one), but never sleep past the end of the run
                    time.sleep(max(0.0, min(1.0 if wait is None else wait, stop_at - time.time())))
                elif kind not in ("ok", "disconnected", "timeout") and not kind.startswith("http"):
                    time.sleep(0.1)  # a transport error (is the server gone?): no busy loop

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    started = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.time() < hard_stop:
        peak = max(peak, rss())
        time.sleep(0.5)
    with lock:
        closed[0] = True
        abandoned = len(running)  # requests still unanswered at the hard stop: timeouts, left behind
        if abandoned:
            outcomes["timeout"] += abandoned
    wall = time.time() - started
    if abandoned:
        print(f"load: {abandoned} request(s) still unanswered {args.grace:g} s after the end: counted as timeouts",
              file=sys.stderr)
    metrics = drain(url, args.drain)
    peak = max(peak, rss())

    total = sum(outcomes.values())
    return {
        "clients": args.clients, "seconds": round(wall, 1), "disconnect_rate": args.disconnect_rate,
        "requests": total, "ok": outcomes["ok"],
        "errors": {k: v for k, v in outcomes.items() if k not in ("ok", "disconnected")},
        "disconnected": outcomes["disconnected"], "disconnected_at": dict(hangups),
        "throughput_rps": round(total / wall, 3), "goodput_rps": round(outcomes["ok"] / wall, 3),
        "p50_s": pct(latencies, 50), "p90_s": pct(latencies, 90), "p95_s": pct(latencies, 95),
        "p99_s": pct(latencies, 99), "ttfb_p50_s": pct(first_bytes, 50), "ttfb_p95_s": pct(first_bytes, 95),
        "peak_rss_mb": round(peak / 2**20, 1) if proc else None,
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        **metrics,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.url:
        url = args.url.rstrip("/")
        result = run(url, args, listening_process(url))
    else:
        with local_server(args.model) as (url, proc):
            result = run(url, args, proc)
    if args.json:
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}))
        return
    print(f"load: {args.clients} clients x {args.seconds:g} s against {url} "
          f"({'' if args.url else args.model or 'embedded model'}), disconnect rate {args.disconnect_rate:g}")
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else "null" if value is None else value
        print(f"  {key:<18} {shown}")


def drain(url: str, seconds: float) -> dict:
    """Poll the server's Prometheus ``/metrics`` for up to ``seconds`` until no turn is in flight or queued; returns
    ``in_flight_after`` and ``queued_after`` (None when there is no /metrics, with a note on stderr), and
    ``server_disconnects`` (the server's count of client disconnects, when it keeps one)."""
    out = {"in_flight_after": None, "queued_after": None, "server_disconnects": None}
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        print("load: prometheus_client is not installed (pip install prometheus-client): in_flight_after: null",
              file=sys.stderr)
        return out
    deadline = time.time() + seconds
    while True:
        try:
            r = httpx.get(url + "/metrics", timeout=5)
        except httpx.HTTPError as exc:
            print(f"load: GET /metrics failed ({type(exc).__name__}): in_flight_after: null", file=sys.stderr)
            return out
        if r.status_code == 404:
            print("load: the server has no /metrics (404): in_flight_after: null", file=sys.stderr)
            return out
        if r.status_code == 200:
            values: dict[str, float] = {}
            for family in text_string_to_metric_families(r.text):
                for sample in family.samples:
                    if sample.name in ("fsb_turns_in_flight", "fsb_turns_queued"):
                        values[sample.name] = values.get(sample.name, 0.0) + sample.value
                    elif sample.name == "fsb_client_disconnects_total":
                        values["disconnects"] = values.get("disconnects", 0.0) + sample.value
            for key, name in (("in_flight_after", "fsb_turns_in_flight"), ("queued_after", "fsb_turns_queued"),
                              ("server_disconnects", "disconnects")):
                if name in values:
                    out[key] = int(values[name])
            if out["in_flight_after"] is None:
                print("load: /metrics has no fsb_turns_in_flight: in_flight_after: null", file=sys.stderr)
                return out
            if not out["in_flight_after"] and not out["queued_after"]:
                return out
        if time.time() >= deadline:
            if r.status_code != 200:
                print(f"load: GET /metrics answered {r.status_code}: in_flight_after: null", file=sys.stderr)
            return out
        time.sleep(0.25)


if __name__ == "__main__":
    main()
