"""Every kind of writer at once, from threads and from a second process, on one database file.

Sessions and messages (``Store``), long-term memory, the web-search cache, knowledge-base ingests and knowledge-graph
triples all write through ``retrievers.db.write``. Here each kind runs in two threads of this process and two threads
of a second process at the same time, starting together on a fresh file (so the two processes also race to apply
the migrations), while a reader thread in each process keeps searching and listing. Every row must arrive and the
file must pass ``PRAGMA integrity_check``.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from app.settings import REPO_ROOT

OPS = 12  # operations per writer thread
THREADS = 2  # threads per kind of writer, in each process
KINDS = ("sessions", "memory", "web", "kb", "kg")


class FakeSearchClient:
    """Stands in for ddgs: one result named after the query (so every query is a new cache row)."""

    def __init__(self, timeout: float):
        pass

    def text(self, query: str, **kw) -> list[dict]:
        return [{"title": query, "href": f"https://example.org/{query.replace(' ', '-')}", "body": f"About {query}."}]


def run_writers(db_path: str, tag: str, docs_dir: str, go: threading.Event | None = None) -> list[str]:
    """Open the database, wait for ``go``, then run every kind of writer in threads (and one reader); the errors."""
    from app.storage import Store
    from retrievers import HashingEmbedder, KnowledgeBase, KnowledgeGraph, LongTermMemory, WebSearch
    from retrievers.db import open_db

    docs = Path(docs_dir)
    for t in range(THREADS):
        for i in range(OPS):
            (docs / f"{tag}-{t}-{i}.md").write_text(f"# Note {tag} {t} {i}\n\nA small document number {i} of {tag}.\n")
    db = open_db(db_path)
    if go is not None:
        go.wait()
    try:  # built after the start signal, in both processes at once: the migrations race too
        store = Store(db)
        memory = LongTermMemory(db, HashingEmbedder())
        web = WebSearch(db, backend="fake", client_factory=FakeSearchClient)
        kb = KnowledgeBase(db, HashingEmbedder())
        kg = KnowledgeGraph(db)
    except Exception as e:  # noqa: BLE001
        return [f"{tag} setup: {type(e).__name__}: {e}"]

    def write_one(kind: str, t: int, i: int) -> None:
        key = f"{tag}-{t}-{i}"
        if kind == "sessions":
            sid = store.create_session(user=tag, title=key)
            store.add_message(sid, "user", f"question {key}")
            store.add_message(sid, "assistant", f"answer {key}", "persona", {"key": key})
        elif kind == "memory":
            assert len(memory.add(key, [f"I am writer {key}."])) == 1
        elif kind == "web":
            assert web.search(f"query {key}", k=1)[0].meta["cached"] is False
        elif kind == "kb":
            assert kb.add(docs / f"{key}.md").status == "added"
        elif kind == "kg":
            assert kg.add([(f"entity {key}", "written_by", tag)]) == 1

    errors: list[str] = []
    writing = threading.Event()

    def writer(kind: str, t: int) -> None:
        for i in range(OPS):
            try:
                write_one(kind, t, i)
            except Exception as e:  # noqa: BLE001 - every failure is reported, with its kind
                errors.append(f"{tag} {kind}: {type(e).__name__}: {e}")

    def reader() -> None:
        while not writing.is_set():
            try:
                kb.search("small document", k=3)
                memory.search("writer", k=1, user=f"{tag}-0-0")
                store.sessions(user=tag)
                kg.search(f"entity {tag}-0-0")
            except Exception as e:  # noqa: BLE001
                errors.append(f"{tag} reader: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=writer, args=(kind, t)) for kind in KINDS for t in range(THREADS)]
    read = threading.Thread(target=reader)
    read.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    writing.set()
    read.join()
    return errors


CHILD = """
import json, sys
from tests.test_concurrent_writes import run_writers
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(run_writers(*sys.argv[1:4])), flush=True)
"""


def test_every_kind_of_writer_from_threads_and_a_second_process(tmp_path):
    db_path, docs = tmp_path / "fsb.db", tmp_path / "docs"
    docs.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db_path), "child", str(docs)], cwd=REPO_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        go = threading.Event()
        result: dict = {}
        here = threading.Thread(
            target=lambda: result.setdefault("errors", run_writers(str(db_path), "main", str(docs), go)))
        here.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        go.set()
        here.join()
        out, err = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    errors = result["errors"] + json.loads(out.strip().splitlines()[-1])
    assert errors == []

    n = 2 * THREADS * OPS  # rows of each kind: two processes, THREADS threads each, OPS operations each
    db = sqlite3.connect(db_path)
    count = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
    assert count("PRAGMA integrity_check") == "ok"
    assert count("SELECT count(*) FROM sessions") == n
    assert count("SELECT count(*) FROM messages") == 2 * n
    assert count("SELECT count(*) FROM sessions s "
                 "WHERE (SELECT count(*) FROM messages m WHERE m.session_id = s.id) = 2") == n
    assert count("SELECT count(*) FROM memories") == n
    assert count("SELECT count(*) FROM web_cache") == n
    assert count("SELECT count(*) FROM kb_docs WHERE state = 'ready'") == n
    assert count("SELECT count(*) FROM kb_docs WHERE state != 'ready'") == 0
    assert count("SELECT count(*) FROM kb_chunks") == n
    assert count("SELECT count(*) FROM kb_chunks_fts WHERE kb_chunks_fts MATCH 'small'") == n
    assert count("SELECT count(*) FROM kg_triples") == n
    db.close()
