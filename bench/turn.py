"""Chat-turn latency: scripted multi-turn conversations streamed through /v1/chat/completions, timed per turn type.

    python bench/turn.py [--model M] [--types kb,web] [--repeat N] [--clients 1,4,8] [--sweep-turns N] [--json]
    python bench/turn.py --url http://127.0.0.1:8000      # against a running server

What it does:

1. Starts the real server in this process (``build_bot`` + ``build_app`` from ``app.server``, uvicorn on a loopback
   port in a thread) with settings from the ``FSB_*`` environment, a temporary data directory (``--data-dir`` to
   keep one) and the model from the usual data directory (the embedded gemma is converted there once and reused).
   Web-search turns go to a stand-in search engine on loopback (ddgs' own DuckDuckGo engine code pointed at a local
   server; nothing leaves the machine) and the knowledge graph gets the triples from the conversations file.
   With ``--url`` nothing is started: web and knowledge-graph turns then depend on that server's own setup.
2. Plays every scripted conversation of ``bench/conversations.yaml`` (chit-chat, empathetic, knowledge base, web,
   knowledge graph, task-oriented with state tracking, an aligned instruction, refusals), each as one stored session
   with ``session_id``, every turn streamed (``stream: true``, ``max_tokens`` 30, the bot picks the skill itself).
   Per turn: time to the first content chunk (TTFT) and to ``[DONE]`` (turn), client side; the step breakdown comes
   from the turn trace the server stores with each reply (GET /api/sessions/{id}), read after the conversation so
   it does not disturb the timing. Steps (medians per type, seconds):

       safety    the user's last message scored against the safety and response skills
       select    the history-based skill selector (the trace's "select" step minus "safety")
       parse     the parser skill (query for the retriever, or the dialogue state)
       retrieve  the retriever (knowledge base, graph, web, memory)
       prompt    building the skill's prompt, or the alignment layer's ("align")
       first     TTFT minus the steps above: queueing, HTTP, prefill and the first token (client side)
       prefill   of which the server's own time to the first token (the trace's generate.first_token_s, if any)
       decode    first content chunk to the last one
       tail      the last content chunk to [DONE] (decoding past the shown text, stop handling, work after it)
       remember  the long-term-memory parser after the reply (before [DONE], or in the background)

3. A concurrency sweep: for each N in ``--clients``, N clients at once, each playing conversations (one session
   each) for ``--sweep-turns`` turns (or ``--sweep-seconds``); aggregate generated tokens/s (``usage`` in the stream
   if the server sends it, else the stored trace's token count, else the number of content chunks), TTFT p50/p95.

4. The same work one after another: one client plays the turns that the largest sweep's clients played together
   (``--same-work``); the sweep's tokens/s over this one's is what concurrency gains on equal work, where the ratio
   to the one-client sweep also compares different conversations.

The sweeps replay the scripted conversations; before each sweep and the same-work run the in-process server drops
its conversation checkpoints, so that no phase finds routing scores or prefills an earlier one computed for the same
text (a server at ``--url`` keeps them: its sweeps measure less routing work than new chats pay).

Against ``--url`` there is no way to create an empty session over the API, so the turns go stateless (the whole
history in ``messages``) and the step breakdown is empty unless the stream carries the trace itself. Progress goes
to stderr; ``--json`` prints one JSON object on stdout. Not a test (tests/test_bench_turn.py runs a tiny version).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPT = Path(__file__).resolve().parent / "conversations.yaml"
STEPS = ["safety", "select", "parse", "retrieve", "prompt", "first", "prefill", "decode", "tail", "remember"]
ENGINE = "fsbbench"  # the ddgs engine name registered for the stand-in search engine
USER = "bench"


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as bench/load.py); None for no values."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------- the script
def load_script(path: Path, types: set[str] | None = None) -> tuple[dict, list, list[dict]]:
    """(expected skills per type, KG triples, conversations); each turn is {text, type, expect}. With ``types``, only
    the conversations with a turn of one of them (played whole, so the history stays as written)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    expected = {k: list(v or []) for k, v in (data.get("types") or {}).items()}
    conversations = []
    for conv in data["conversations"]:
        turns = []
        for t in conv["turns"]:
            t = {"text": t} if isinstance(t, str) else dict(t)
            t.setdefault("type", conv["type"])
            t["expect"] = list(t.get("expect") or expected.get(t["type"], []))
            turns.append(t)
        if types is None or any(t["type"] in types for t in turns):
            conversations.append({"name": conv["name"], "type": conv["type"], "turns": turns})
    return expected, [tuple(str(x) for x in t) for t in data.get("kg_triples") or []], conversations


# ------------------------------------------------------------------------------------- stand-in search engine
PAGE_ITEM = """<div class="result results_links web-result"><div class="links_main links_deep result__body">
<h2 class="result__title"><a class="result__a" href="{href}">{title}</a></h2>
<a class="result__snippet" href="{href}">{body}</a>
</div></div>"""


class StandInSearch:
    """A loopback server answering like DuckDuckGo's HTML results page, three plausible results per query."""

    def __init__(self):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                q = html.escape(urllib.parse.parse_qs(body).get("q", [""])[0])
                outer.requests += 1
                items = [
                    PAGE_ITEM.format(href="https://example.org/news", title=f"{q} - latest news",
                                     body=f"The latest reports on {q}: what happened this week, who said what, and "
                                          "what experts expect next."),
                    PAGE_ITEM.format(href="https://example.org/guide", title=f"A guide to {q}",
                                     body=f"Everything you need to know about {q}, explained in plain words with "
                                          "examples and a short history."),
                    PAGE_ITEM.format(href="https://example.org/forum", title=f"{q}: what people say",
                                     body=f"Readers discuss {q}; most found it useful, a few disagreed."),
                ]
                data = ("<html><body>" + "\n".join(items) + "</body></html>").encode()
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def register(self) -> None:
        """ddgs' own DuckDuckGo engine under the name ENGINE, with its search URL pointed here."""
        from ddgs.engines import ENGINES
        from ddgs.engines.duckduckgo import Duckduckgo

        ENGINES["text"][ENGINE] = type("BenchStandIn", (Duckduckgo,), {"name": ENGINE,
                                                                        "search_url": f"{self.url}/html/"})


# ------------------------------------------------------------------------------------------ in-process server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    """The real app (model, skills, selector, retrievers, API, web chat) served by uvicorn in a thread."""

    def __init__(self, model: str | None, data_dir: str | None, triples: list, warm: str = "now"):
        from app.lm import load_lm
        from app.server import build_app, build_bot
        from app.settings import Settings

        base = Settings.load(model=model)
        self.tmp = None
        if data_dir is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="fsb-turn-")
            data_dir = self.tmp.name
        self.search = StandInSearch()
        self.search.register()
        self.settings = base.replace(data_dir=Path(data_dir), web_backend=ENGINE, log_level="warning")
        started = time.perf_counter()
        # the model from the usual data directory: the embedded gemma is converted there once and reused
        lm = load_lm(base)
        say(f"[turn] model {base.model} loaded in {time.perf_counter() - started:.1f} s "
            f"(data dir {self.settings.data_dir})")
        self.bot = build_bot(self.settings, lm=lm)
        if triples:
            self.bot.knowledge.kg.add(triples, source="bench/conversations.yaml")
        import inspect

        if "warm" in inspect.signature(build_app).parameters:  # servers that warm their prompt caches at start
            app = build_app(self.settings, bot=self.bot, warm=warm)
        else:
            app = build_app(self.settings, bot=self.bot)
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        self.model = base.model

    def new_session(self, user: str) -> str:
        return self.bot.store.create_session(user=user, title="bench/turn.py")

    def forget_checkpoints(self) -> int:
        """Drop the model's conversation checkpoints (the skills' constant prefixes stay cached). The sweeps replay the
        scripted conversations: without this, a phase would find their routing scores and prefills already computed
        by an earlier phase and measure less work than a new chat pays. Returns how many were dropped."""
        cache = getattr(self.bot.lm, "prefix_cache", None)
        return cache.clear_checkpoints() if hasattr(cache, "clear_checkpoints") else 0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.search.httpd.shutdown()
        if self.tmp is not None:
            self.tmp.cleanup()


# ------------------------------------------------------------------------------------------------- one turn
def stream_turn(client: httpx.Client, url: str, body: dict) -> dict:
    """POST one streamed chat turn; times are seconds from sending the request."""
    out: dict = {"ok": False, "error": None, "text": "", "chunks": 0, "usage": None, "trace": None,
                 "ttft": None, "first_at": None, "last_at": None, "turn": None, "skill": None}
    started = time.perf_counter()
    pieces = []
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                try:
                    code = r.json()["error"].get("code") or ""
                except (ValueError, KeyError, TypeError, AttributeError):
                    code = ""
                out["error"] = f"http {r.status_code} {code}".strip()
                out["turn"] = time.perf_counter() - started
                return out
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out["error"] = "error event: " + str(event["error"].get("message", ""))[:200]
                    continue
                content = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter() - started
                    if out["first_at"] is None:
                        out["first_at"] = now
                    out["last_at"] = now
                    out["chunks"] += 1
                    pieces.append(content)
                if event.get("usage"):
                    out["usage"] = event["usage"]
                extra = event.get("fsb") or {}
                if extra.get("trace"):
                    out["trace"] = extra["trace"]
                if extra.get("skill"):
                    out["skill"] = extra["skill"]
            if not done and out["error"] is None:
                out["error"] = "incomplete stream"
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    out["turn"] = time.perf_counter() - started
    out["text"] = "".join(pieces)
    out["ttft"] = out["first_at"]
    out["ok"] = out["error"] is None and out["ttft"] is not None
    if out["error"] is None and out["ttft"] is None:
        out["error"] = "no content"
    return out


class Conversation:
    """Plays turns of scripted conversations in sessions (in-process) or statelessly (``--url``)."""

    def __init__(self, client: httpx.Client, url: str, server: InProcessServer | None, max_tokens: int, user: str):
        self.client, self.url, self.server, self.max_tokens, self.user = client, url, server, max_tokens, user
        self.sessions: list[tuple[str, list[dict]]] = []  # (session id, the results of its turns)
        self.session_id: str | None = None
        self.messages: list[dict] = []

    def start(self) -> None:
        self.messages = []
        self.session_id = self.server.new_session(self.user) if self.server is not None else None
        self.sessions.append((self.session_id, []))

    def play(self, turn: dict) -> dict:
        self.messages.append({"role": "user", "content": turn["text"]})
        body = {"model": "fsb", "stream": True, "max_tokens": self.max_tokens, "user": self.user,
                "stream_options": {"include_usage": True}}
        if self.session_id is not None:
            body.update(session_id=self.session_id, messages=[self.messages[-1]])
        else:
            body["messages"] = list(self.messages)
        result = stream_turn(self.client, self.url, body)
        result.update(type=turn["type"], expect=turn["expect"], message=turn["text"])
        self.messages.append({"role": "assistant", "content": result["text"] or "…"})
        self.sessions[-1][1].append(result)
        return result

    def attach_traces(self) -> None:
        """The stored replies' traces, matched to this client's turns in order (by text; failed turns store none)."""
        for sid, results in self.sessions:
            if sid is None:
                continue
            try:
                r = self.client.get(f"{self.url}/api/sessions/{sid}")
                r.raise_for_status()
                stored = [m for m in r.json()["messages"] if m["role"] == "assistant"]
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                say(f"[turn] could not read session {sid}: {exc}")
                continue
            i = 0
            for result in results:
                for j in range(i, len(stored)):
                    if stored[j]["content"] == result["text"]:
                        result["trace"] = result["trace"] or stored[j].get("trace")
                        result["skill"] = result["skill"] or stored[j].get("skill")
                        i = j + 1
                        break


def tokens_of(result: dict) -> tuple[int, str]:
    """Generated tokens of a turn and where the count came from."""
    if result.get("usage") and result["usage"].get("completion_tokens") is not None:
        return int(result["usage"]["completion_tokens"]), "usage"
    for step in (result.get("trace") or {}).get("steps", []):
        if step.get("step") == "generate" and step.get("tokens") is not None:
            return int(step["tokens"]), "trace"
    return result.get("chunks", 0), "chunks"


def breakdown(result: dict) -> dict | None:
    """The turn's steps in seconds (see the module docstring); None without a trace.

    Reads both trace layouts: "route" (safety stage + selector in one step, the safety stage's own time in
    ``trace["safety"]["latency_s"]``) or the older "select" step (which includes a separate "safety" step).
    """
    trace = result.get("trace")
    if not trace:
        return None
    raw: Counter = Counter()
    extra: dict = {}
    for step in trace.get("steps", []):
        raw[step.get("step")] += float(step.get("s") or 0.0)
        if step.get("step") == "generate" and step.get("first_token_s") is not None:
            extra["prefill"] = float(step["first_token_s"])
    route = raw["route"] + raw["select"]
    safety = raw["safety"] or float((trace.get("safety") or {}).get("latency_s") or 0.0)
    steps = {
        "safety": safety,
        "select": max(0.0, route - safety),
        "parse": raw["parse"],
        "retrieve": raw["retrieve"],
        "prompt": raw["prompt"] + raw["align"],
    }
    before = route + raw["parse"] + raw["retrieve"] + raw["prompt"] + raw["align"]
    steps["first"] = max(0.0, result["ttft"] - before) if result.get("ttft") is not None else 0.0
    steps["prefill"] = extra.get("prefill")  # the server's own time to the first token, when the trace has it
    steps["decode"] = (result["last_at"] - result["first_at"]) if result.get("first_at") is not None else 0.0
    steps["tail"] = (result["turn"] - result["last_at"]) if result.get("last_at") is not None else 0.0
    steps["remember"] = raw["remember"]
    steps["generate"] = raw["generate"]  # the server's own prefill + decode time (for reference)
    return steps


def per_turn(result: dict) -> dict:
    """One turn of the typed phase as it goes into the JSON: what was said, where it went, its times and steps."""
    steps = breakdown(result) if result["ok"] else None
    return {"type": result["type"], "message": result["message"], "skill": result.get("skill"), "ok": result["ok"],
            "error": result.get("error"), "ttft_s": result.get("ttft"), "turn_s": result.get("turn"),
            "tokens": tokens_of(result)[0] if result["ok"] else None,
            "steps": {k: round(v, 3) for k, v in steps.items() if v is not None} if steps else None}


# ------------------------------------------------------------------------------------------------- phases
def play_types(url: str, server, conversations: list[dict], types: set[str] | None, repeat: int,
               max_tokens: int) -> list[dict]:
    """Every conversation, turn after turn, one client; the results of the turns of the selected types."""
    results = []
    with httpx.Client(timeout=600) as client:
        for rep in range(repeat):
            for conv in conversations:
                player = Conversation(client, url, server, max_tokens, f"{USER}-{conv['name']}-{rep}")
                player.start()
                for turn in conv["turns"]:
                    r = player.play(turn)
                    state = "ok" if r["ok"] else r["error"]
                    say(f"[turn] {turn['type']:<12} ttft {r['ttft'] or 0:6.2f} s  turn {r['turn']:6.2f} s  "
                        f"{state}  {turn['text'][:50]!r}")
                player.attach_traces()
                for r in player.sessions[-1][1]:
                    if types is None or r["type"] in types:
                        results.append(r)
    return results


def sweep(url: str, server, conversations: list[dict], clients: int, turns: int, seconds: float | None,
          max_tokens: int) -> dict:
    """``clients`` concurrent clients, each playing conversations for ``turns`` turns (or ``seconds``)."""
    players: list[Conversation] = []
    http = [httpx.Client(timeout=600) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    done_at = [0.0] * clients  # when each client played its last turn (perf_counter)

    def run(n: int) -> None:
        player = players[n]
        k = n  # client n starts on conversation n and moves on to the next one when a script runs out
        barrier.wait()
        stop_at = time.perf_counter() + seconds if seconds else None
        played = 0
        while (played < turns) if stop_at is None else (time.perf_counter() < stop_at):
            conv = conversations[k % len(conversations)]
            player.start()
            for turn in conv["turns"]:
                if (played >= turns) if stop_at is None else (time.perf_counter() >= stop_at):
                    break
                r = player.play(turn)
                played += 1
                if not r["ok"] and r["error"] and r["error"].startswith("http 429"):
                    time.sleep(1.0)
            k += 1
        done_at[n] = time.perf_counter()

    for n in range(clients):
        players.append(Conversation(http[n], url, server, max_tokens, f"{USER}-sweep{clients}-{n}"))
    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for p in players:
        p.attach_traces()
    for c in http:
        c.close()
    results = [r for p in players for _, rs in p.sessions for r in rs]
    ok = [r for r in results if r["ok"]]
    counted = [tokens_of(r) for r in ok]
    ttfts = [r["ttft"] for r in ok]
    out = {
        "clients": clients, "turns": len(results), "errors": dict(Counter(r["error"] for r in results if not r["ok"])),
        "wall_s": wall, "tokens": sum(n for n, _ in counted), "tokens_from": dict(Counter(s for _, s in counted)),
        "tokens_per_s": sum(n for n, _ in counted) / wall if wall > 0 else None,
        "turns_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95),
        "turn_p50_s": pct([r["turn"] for r in ok], 50), "turn_p95_s": pct([r["turn"] for r in ok], 95),
        # each client's last turn's end, seconds from the start: a fixed number of turns per client ends with a
        # drain, the last clients decoding in a batch of one or two while the others are done
        "clients_done_s": sorted(round(t - started, 2) for t in done_at),
    }
    say(f"[turn] sweep {clients} clients: {len(ok)}/{len(results)} turns in {wall:.1f} s, "
        f"{out['tokens_per_s'] or 0:.2f} tok/s, TTFT p50 {out['ttft_p50_s'] or 0:.2f} s")
    return out


def same_work_serially(url: str, server, conversations: list[dict], clients: int, turns: int,
                       max_tokens: int) -> dict:
    """The turns that ``clients`` concurrent sweep clients play (client n: conversation n on, ``turns`` turns), played
    by one client one after another: the concurrent sweep's tokens/s over this one's is what concurrency gains on the
    same work (the one-client sweep plays only the first conversation, whose replies are short)."""
    player = Conversation(httpx.Client(timeout=600), url, server, max_tokens, f"{USER}-serial{clients}")
    started = time.perf_counter()
    results = []
    for n in range(clients):
        k, played = n, 0
        while played < turns:
            player.start()
            for turn in conversations[k % len(conversations)]["turns"]:
                if played >= turns:
                    break
                results.append(player.play(turn))
                played += 1
            k += 1
    wall = time.perf_counter() - started
    player.attach_traces()
    player.client.close()
    ok = [r for r in results if r["ok"]]
    tokens = sum(tokens_of(r)[0] for r in ok)
    out = {"clients": clients, "turns": len(results), "ok": len(ok), "wall_s": wall, "tokens": tokens,
           "tokens_per_s": tokens / wall if wall > 0 else None}
    say(f"[turn] the {clients} clients' turns one after another: {len(ok)}/{len(results)} turns in {wall:.1f} s, "
        f"{out['tokens_per_s'] or 0:.2f} tok/s")
    return out


# ------------------------------------------------------------------------------------------------- reports
def summarise(results: list[dict], order: list[str]) -> dict:
    by_type: dict = {}
    for kind in order + sorted({r["type"] for r in results} - set(order)):
        rs = [r for r in results if r["type"] == kind]
        if not rs:
            continue
        ok = [r for r in rs if r["ok"]]
        ttft = [r["ttft"] for r in ok]
        turn = [r["turn"] for r in ok]
        parts = [b for b in (breakdown(r) for r in ok) if b is not None]
        skills = Counter(r["skill"] or "?" for r in ok)
        by_type[kind] = {
            "n": len(rs), "ok": len(ok), "errors": dict(Counter(r["error"] for r in rs if not r["ok"])),
            "ttft_median_s": median(ttft), "ttft_p90_s": pct(ttft, 90), "ttft_max_s": max(ttft) if ttft else None,
            "turn_median_s": median(turn), "turn_p90_s": pct(turn, 90), "turn_max_s": max(turn) if turn else None,
            "tokens_median": median([tokens_of(r)[0] for r in ok]),
            "routed": (sum(1 for r in ok if r["skill"] in r["expect"]) / len(ok)
                       if ok and any(r["skill"] for r in ok) else None),
            "skills": dict(skills.most_common()),
            "steps": {k: median([p[k] for p in parts if p[k] is not None]) for k in STEPS + ["generate"]}
            if parts else {},
        }
    return by_type


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def code_version() -> str | None:
    """The checkout's commit (with "+changes" when app/, retrievers/, skills/ or prompts/ differ from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "retrievers", "skills", "prompts"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FSB_BENCH_CODE") or None
    return head + ("+changes" if dirty else "")


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmark runs (to tell a busy machine)."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        return {"load1_median": round(median(self.samples), 2) if self.samples else None,
                "load1_max": round(max(self.samples), 2) if self.samples else None, "samples": len(self.samples)}


def fmt(x: float | None, width: int = 6) -> str:
    return f"{x:{width}.2f}" if x is not None else f"{'-':>{width}}"


def print_table(res: dict, out) -> None:
    m = res["machine"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    started = f", server up in {res['startup_s']:.0f} s" if res.get("startup_s") else ""
    p(f"Chat-turn latency — {res['model']} ({res['server']}{started}), max_tokens {res['max_tokens']}, "
      f"{res['ok']}/{res['turns']} turns ok, repeat {res['repeat']}")
    if res.get("code"):
        p(f"code: {res['code']}")
    p(f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpu_count']} cpus, {m['platform']}, Python {m['python']}; "
      f"load avg {m['load_avg_start']} at start, {m['load_avg_end']} at end, 1-min load during the run: median "
      f"{m['load_during']['load1_median']}, max {m['load_during']['load1_max']}")
    p("")
    p(f"{'type':<12} {'n':>3} {'routed':>6} | {'TTFT p50':>8} {'p90':>6} {'max':>6} | {'turn p50':>8} {'p90':>6} "
      f"{'max':>6} | {'tokens':>6}  skills chosen")
    for kind, s in res["by_type"].items():
        routed = f"{s['routed'] * 100:5.0f}%" if s["routed"] is not None else f"{'-':>6}"
        skills = ", ".join(f"{k} {v}" for k, v in s["skills"].items())
        errors = f"  errors: {s['errors']}" if s["errors"] else ""
        p(f"{kind:<12} {s['n']:>3} {routed} | {fmt(s['ttft_median_s'], 8)} {fmt(s['ttft_p90_s'])} "
          f"{fmt(s['ttft_max_s'])} | {fmt(s['turn_median_s'], 8)} {fmt(s['turn_p90_s'])} {fmt(s['turn_max_s'])} | "
          f"{fmt(s['tokens_median'], 6).replace('.00', '   ')}  {skills}{errors}")
    p(f"{'all':<12} {res['turns']:>3} {'':>6} | {fmt(res['ttft_median_s'], 8)} {fmt(res['ttft_p90_s'])} "
      f"{fmt(res['ttft_max_s'])} | {fmt(res['turn_median_s'], 8)} {fmt(res['turn_p90_s'])} {fmt(res['turn_max_s'])} |")
    p("")
    p("median step breakdown, seconds (select = routing without the safety stage; first = TTFT minus the steps")
    p("before it: queueing, HTTP, prefill, first token; prefill = the server's own time to the first token, part of")
    p("first; decode = first to last chunk; tail = last chunk to [DONE]; remember = memory parser after the reply,")
    p("possibly in the background; a turn ~ safety + select + parse + retrieve + prompt + first + decode + tail)")
    p(f"{'type':<12} " + " ".join(f"{k:>8}" for k in STEPS) + f" {'turn':>8}")
    for kind, s in res["by_type"].items():
        if s["steps"]:
            p(f"{kind:<12} " + " ".join(fmt(s["steps"][k], 8) for k in STEPS) + f" {fmt(s['turn_median_s'], 8)}")
        else:
            p(f"{kind:<12} (no trace: the server did not store this turn)")
    if res["sweep"]:
        p("")
        p(f"concurrency sweep ({res['sweep_desc']}, max_tokens {res['max_tokens']})")
        p(f"{'clients':>7} {'turns':>5} {'errors':>6} {'wall s':>7} {'tok/s':>7} {'turns/s':>7} | {'TTFT p50':>8} "
          f"{'p95':>6} | {'turn p50':>8} {'p95':>6}")
        for s in res["sweep"]:
            p(f"{s['clients']:>7} {s['turns']:>5} {sum(s['errors'].values()):>6} {s['wall_s']:7.1f} "
              f"{fmt(s['tokens_per_s'], 7)} {fmt(s['turns_per_s'], 7)} | {fmt(s['ttft_p50_s'], 8)} "
              f"{fmt(s['ttft_p95_s'])} | {fmt(s['turn_p50_s'], 8)} {fmt(s['turn_p95_s'])}")
        for s in res["sweep"]:
            done = s.get("clients_done_s") or []
            if len(done) > 1:
                p(f"{s['clients']} clients: the first finished after {done[0]:.1f} s, the last after {done[-1]:.1f} s "
                  f"({done[0] / done[-1]:.0%} of the wall with every client busy)")
        sources = Counter()
        for s in res["sweep"]:
            sources.update(s["tokens_from"])
        p(f"(generated tokens counted from: {dict(sources)})")
        same = res.get("same_work")
        if same:
            conc = next((s for s in res["sweep"] if s["clients"] == same["clients"]), None)
            gain = (conc["tokens_per_s"] / same["tokens_per_s"]
                    if conc and conc["tokens_per_s"] and same["tokens_per_s"] else None)
            p(f"the same {same['turns']} turns as the {same['clients']}-client sweep, one client after another: "
              f"{same['wall_s']:.1f} s, {fmt(same['tokens_per_s'], 0).strip()} tok/s; concurrency gain on the same "
              f"work {fmt(gain, 0).strip()}x")
    if res.get("notes"):
        p("")
        for note in res["notes"]:
            p(f"note: {note}")


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server to measure (default: start one in this process)")
    ap.add_argument("--model", default=None,
                    help="model for the in-process server (default: FSB_MODEL or the embedded gemma-3-270m; "
                         "'tiny' for a quick plumbing run)")
    ap.add_argument("--data-dir", default=None,
                    help="data directory for the in-process server (default: a temporary one; the model still "
                         "comes from the usual data directory)")
    ap.add_argument("--script", default=str(SCRIPT), help="conversations file (default: bench/conversations.yaml)")
    ap.add_argument("--types", default=None,
                    help="comma-separated turn types to measure, e.g. kb,web (default: all); conversations with "
                         "such a turn are played whole")
    ap.add_argument("--repeat", type=int, default=1, help="play the conversations this many times (default 1)")
    ap.add_argument("--max-tokens", type=int, default=30, help="max_tokens of every reply (default 30)")
    ap.add_argument("--clients", default="1,4,8",
                    help="concurrency sweep: comma-separated client counts (default 1,4,8; '' or 0 to skip)")
    ap.add_argument("--sweep-turns", type=int, default=4, help="turns each sweep client plays (default 4)")
    ap.add_argument("--sweep-seconds", type=float, default=None,
                    help="instead of --sweep-turns: each sweep client plays for this many seconds")
    ap.add_argument("--same-work", type=int, default=None,
                    help="after the sweep, one client plays the turns of this many sweep clients one after another "
                         "(default: the largest client count; 0 to skip; not with --sweep-seconds)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one unmeasured warm-up turn")
    ap.add_argument("--warm", choices=["now", "background", "off"], default="now",
                    help="the in-process server's prompt-cache warming at start, where build_app has it (default "
                         "now: turns are measured on a warmed server; off: quicker start for plumbing runs)")
    ap.add_argument("--note", action="append", default=[],
                    help="a note to print with the results (repeatable), e.g. what else was running")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress still goes to stderr)")
    ap.add_argument("--save-json", metavar="PATH", default=None,
                    help="also write the JSON object to PATH (one run gives both the table and the JSON)")
    args = ap.parse_args(argv)

    types = {t.strip() for t in args.types.split(",") if t.strip()} if args.types else None
    expected, triples, conversations = load_script(Path(args.script), types)
    if not conversations:
        raise SystemExit(f"no conversation has a turn of type {sorted(types or [])}; types: {sorted(expected)}")
    clients = [int(c) for c in (args.clients or "").split(",") if c.strip() and int(c) > 0]
    info = machine()
    load = LoadSampler()

    # In --json mode stdout carries the one JSON object only: anything else printed goes to stderr.
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    server = None
    startup_s = None
    results, sweeps, typed_s, same_work = [], [], 0.0, None
    notes = list(args.note)
    try:
        if args.url:
            url = args.url.rstrip("/")
            model = args.model or "?"
            try:
                model = httpx.get(url + "/healthz", timeout=10).json().get("model") or model
            except Exception:  # noqa: BLE001 - only a label
                pass
            notes.append("measured against --url: web and knowledge-graph turns depend on that server's setup; "
                         "turns are stateless (history in messages), so no step breakdown from stored traces")
        else:
            say("[turn] starting the server in this process …")
            t0 = time.perf_counter()
            server = InProcessServer(args.model, args.data_dir, triples, warm=args.warm)
            startup_s = time.perf_counter() - t0
            url, model = server.url, server.model
            say(f"[turn] serving on {url} after {startup_s:.1f} s")
        if not args.no_warmup:  # torch's first call and the HTTP path; the skills' prefix caches stay cold
            with httpx.Client(timeout=600) as c:
                w = stream_turn(c, url, {"model": "fsb", "stream": True, "max_tokens": args.max_tokens,
                                         "messages": [{"role": "user", "content": "Hello there!"}]})
                say(f"[turn] warm-up turn: {w['turn']:.2f} s ({'ok' if w['ok'] else w['error']})")

        say(f"[turn] playing {len(conversations)} conversations x {args.repeat} …")
        started = time.perf_counter()
        results = play_types(url, server, conversations, types, args.repeat, args.max_tokens)
        typed_s = time.perf_counter() - started

        for n in clients:
            say(f"[turn] sweep: {n} clients …")
            if server is not None:  # each phase pays for its routing and prefill, as new chats would
                server.forget_checkpoints()
            sweeps.append(sweep(url, server, conversations, n, args.sweep_turns, args.sweep_seconds,
                                args.max_tokens))
        same_n = max(clients, default=0) if args.same_work is None else args.same_work
        if same_n > 0 and not args.sweep_seconds:
            say(f"[turn] the {same_n} clients' turns, one client after another …")
            if server is not None:
                server.forget_checkpoints()
            same_work = same_work_serially(url, server, conversations, same_n, args.sweep_turns, args.max_tokens)
        if server is not None and server.search.requests == 0 and any(r["type"] == "web" for r in results):
            notes.append("the stand-in search engine got no request")
    finally:
        if server is not None:
            server.close()
        sys.stdout = real_stdout
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["load_during"] = load.stop()
    if info["load_during"]["load1_median"] and info["load_during"]["load1_median"] > (info["cpus_usable"] or 1):
        notes.append(f"the machine was busy: 1-minute load average {info['load_during']['load1_median']} (median; "
                     f"max {info['load_during']['load1_max']}) on {info['cpus_usable']} cpus during the run")

    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    turn = [r["turn"] for r in ok]
    res: dict = {
        "model": model, "server": url if args.url else "in-process", "machine": info, "code": code_version(),
        "startup_s": startup_s, "warm": None if args.url else args.warm, "max_tokens": args.max_tokens,
        "repeat": args.repeat, "turns": len(results), "ok": len(ok),
        "errors": dict(Counter(r["error"] for r in results if not r["ok"])), "typed_wall_s": typed_s,
        "ttft_median_s": median(ttft), "ttft_p90_s": pct(ttft, 90), "ttft_max_s": max(ttft) if ttft else None,
        "turn_median_s": median(turn), "turn_p90_s": pct(turn, 90), "turn_max_s": max(turn) if turn else None,
        "by_type": summarise(results, list(expected)),
        "sweep": sweeps,
        "sweep_desc": (f"{args.sweep_seconds:g} s per client" if args.sweep_seconds
                       else f"{args.sweep_turns} turns per client"),
        "notes": notes,
        "per_turn": [per_turn(r) for r in results],
        "same_work": same_work,
    }
    for s in sweeps:
        res[f"tokens_per_s_{s['clients']}"] = s["tokens_per_s"]
        res[f"ttft_p50_s_{s['clients']}"] = s["ttft_p50_s"]
        res[f"ttft_p95_s_{s['clients']}"] = s["ttft_p95_s"]
    if same_work and same_work["tokens_per_s"]:
        res[f"tokens_per_s_{same_work['clients']}_serial"] = same_work["tokens_per_s"]
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res, sys.stdout)


if __name__ == "__main__":
    main()
