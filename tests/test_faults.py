"""Faults: a skill file broken while serving, the database locked by another process, the process killed with
kill -9 in the middle of writes. Each gives a clean message, and the rest of the service keeps working."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx as _httpx
import pytest

from app.settings import REPO_ROOT
from tests.conftest import LiveServer, free_port

httpx = _httpx.Client(timeout=60)
CHAT = {"model": "fsb:persona", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_a_skill_file_broken_while_serving_keeps_its_last_good_version(settings, tiny_lm, tmp_path):
    from app.server import build_app, build_bot

    skills = tmp_path / "skills"
    shutil.copytree(REPO_ROOT / "skills", skills, ignore=shutil.ignore_patterns("*.md"))
    settings = settings.replace(skills_dir=skills)
    with LiveServer(build_app(settings, bot=build_bot(settings, lm=tiny_lm))) as server:
        assert httpx.get(server.url + "/api/skills/problems").json() == []
        good = (skills / "persona.yaml").read_text()
        (skills / "persona.yaml").write_text(good.replace("kind: response", "kind: [response"))
        problems = httpx.get(server.url + "/api/skills/problems").json()
        kind_line = good.splitlines().index("kind: response") + 1
        assert [p["file"].rsplit("/", 1)[-1] for p in problems] == ["persona.yaml"]
        assert problems[0]["line"] in (kind_line, kind_line + 1)  # YAML reports the open bracket or where it broke
        assert "YAML syntax error" in problems[0]["message"]
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["fsb"]["skill"] == "persona"
        (skills / "persona.yaml").write_text(good)
        assert httpx.get(server.url + "/api/skills/problems").json() == []


def test_a_database_locked_by_another_process_gives_a_clean_503_then_recovers(settings, tiny_lm):
    from app.server import build_app, build_bot

    with LiveServer(build_app(settings, bot=build_bot(settings, lm=tiny_lm))) as server:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
             "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(7)", str(settings.db_path)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            r = httpx.post(server.url + "/api/chat", json={"message": "are you there?"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json()["error"]["code"] == "storage_unavailable" and "locked" in r.json()["error"]["message"]
            assert httpx.post(server.url + "/v1/chat/completions", json=CHAT).status_code == 200  # stateless works
        finally:
            holder.wait(timeout=30)
        r = httpx.post(server.url + "/api/chat", json={"message": "and now?"})
        assert r.status_code == 200


def test_a_port_already_in_use_fails_at_once_and_says_what_to_do(tmp_path):
    """`python server.py` on a taken port: exit status 1 before anything loads, with the reason and another port to
    try (it used to load the model, print uvicorn's error, and abort with "terminate called without an active
    exception" from the threads still warming up)."""
    port = free_port()
    env = {**os.environ, "FSB_MODEL": "tiny", "FSB_DATA_DIR": str(tmp_path / "data"), "FSB_LOG_LEVEL": "warning"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.run([sys.executable, "server.py", "--port", str(port)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in proc.stderr
    assert f"--port {port + 1}" in proc.stderr and f"FSB_PORT={port + 1}" in proc.stderr
    assert "loading model" not in proc.stderr and "terminate called" not in proc.stderr


def test_a_skill_folder_that_is_not_there_stops_the_server_before_it_loads(tmp_path):
    """A mistyped FSB_SKILLS_DIR used to serve a bot without a single skill; now it is an error at start."""
    missing = tmp_path / "skils"
    env = {**os.environ, "FSB_MODEL": "tiny", "FSB_DATA_DIR": str(tmp_path / "data"), "FSB_SKILLS_DIR": str(missing)}
    proc = subprocess.run([sys.executable, "server.py", "--port", str(free_port())], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{missing}: not a folder; FSB_SKILLS_DIR must name the folder" in proc.stderr
    assert "loading model" not in proc.stderr


SLOW_WARM_UP = """
import signal, sys, torch
from app.bot import Bot

# Ctrl-C as in a terminal: a runner started as a background job passes SIGINT on ignored, and uvicorn then restores
# "ignored" after its graceful shutdown, so the process would exit 0 instead of 130
signal.signal(signal.SIGINT, signal.default_int_handler)
from app.cli import cli

def warm(self, progress=None):  # a warm-up that is always in the middle of a long forward pass
    for n in range(10**6):
        with torch.inference_mode():
            self.lm.inner.model(input_ids=torch.randint(0, 100, (32, 256)))
        progress(n + 1, 10**6, "slow")

Bot.warm = warm
cli(["serve", "--port", sys.argv[1]])
"""


def test_ctrl_c_while_the_server_warms_up_stops_it_in_order(tmp_path):
    """Ctrl-C right after start, with the background warm-up in a forward pass: the warm-up ends after that pass,
    uvicorn shuts down, and the process exits with the usual 130 (it used to print "Aborted!" and then abort with
    "terminate called without an active exception" from the thread still running the model)."""
    port = free_port()
    env = {**os.environ, "FSB_MODEL": "tiny", "FSB_DATA_DIR": str(tmp_path / "data"), "FSB_SELECTOR": "off",
           "FSB_STARTER_KB": "off", "FSB_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WARM_UP, str(port)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            try:
                warm = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["warm"]
                if warm["done"] >= 1:
                    break
            except _httpx.TransportError:
                pass
            time.sleep(0.2)
        assert not warm["ready"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "terminate called" not in err and "Aborted" not in err


def start_server(port: int, data_dir) -> subprocess.Popen:
    env = {**os.environ, "FSB_MODEL": "tiny", "FSB_DATA_DIR": str(data_dir), "FSB_SELECTOR": "off",
           "FSB_STARTER_KB": "off", "FSB_MEMORY": "off", "FSB_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except _httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def test_kill_9_in_the_middle_of_writes_loses_nothing_committed(tmp_path):
    port, data = free_port(), tmp_path / "data"
    proc = start_server(port, data)
    done: list[str] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        while not stop.is_set():
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/api/chat", json={"message": f"writer {n}", "user": f"w{n}"},
                               timeout=30)
                if r.status_code == 200:
                    done.append(r.json()["session_id"])
            except _httpx.TransportError:
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(done) < 6 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(done) >= 6

    db = sqlite3.connect(data / "fsb.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    proc = start_server(port, data)
    try:
        for sid in done:  # every answered turn is there, question and reply
            session = httpx.get(f"http://127.0.0.1:{port}/api/sessions/{sid}").json()
            assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
            assert session["messages"][0]["content"] == f"writer {session['user'][1:]}"
        r = httpx.post(f"http://127.0.0.1:{port}/api/chat", json={"message": "after the crash"})
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_kill_9_during_a_knowledge_base_ingest_leaves_nothing_half_written(tmp_path):
    """`fsb kb add` killed mid-ingest: the knowledge base and the memories stored before are as they were; the
    half-written document is invisible to list and search, and adding it again completes."""
    from retrievers.db import open_db
    from retrievers import HashingEmbedder, KnowledgeBase, LongTermMemory

    data = tmp_path / "data"
    db = open_db(data / "fsb.db")
    kept = tmp_path / "kept.md"
    kept.write_text("# Kept\n\nThis document was added before the crash and must survive it.\n")
    KnowledgeBase(db, HashingEmbedder()).add(kept)
    LongTermMemory(db, HashingEmbedder()).add("dana", ["I have a dog called Biscuit."])
    db.close()
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(f"Paragraph {i} about river boats, lighthouses and the tides of the northern sea."
                               for i in range(5000)))
    env = {**os.environ, "FSB_DATA_DIR": str(data)}
    add = [sys.executable, "-m", "app.cli", "kb", "add", str(big)]
    proc = subprocess.Popen(add, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = sqlite3.connect(data / "fsb.db", timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once it has started writing the new document's passages
        if watch.execute("SELECT count(*) FROM kb_docs WHERE state = 'pending'").fetchone()[0]:
            break
        assert proc.poll() is None, "the ingest ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert watch.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    watch.close()

    db = open_db(data / "fsb.db")
    kb = KnowledgeBase(db, HashingEmbedder())
    assert [d.path for d in kb.list()] == [str(kept.resolve())]
    assert all(p.source.startswith("kb:kept.md#") for p in kb.search("river boats lighthouses", k=5))
    assert [f.text for f in LongTermMemory(db, HashingEmbedder()).list("dana")] == ["I have a dog called Biscuit."]
    db.close()
    again = subprocess.run(add, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    db = open_db(data / "fsb.db")
    assert sorted(d.path for d in KnowledgeBase(db, HashingEmbedder()).list()) == sorted(
        [str(kept.resolve()), str(big.resolve())])
    assert db.execute("SELECT count(*) FROM kb_docs WHERE state = 'pending'").fetchone()[0] == 0
