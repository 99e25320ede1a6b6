"""The knowledge base against a real SQLite database: ingest, re-ingest, remove, bad files, hybrid search."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from retrievers import KnowledgeBase, RetrieverError, starter_kb_dir
from retrievers.embed import HashingEmbedder
from retrievers.kb import expand_paths, fts_query


@pytest.fixture
def kb(db, hashing):
    return KnowledgeBase(db, hashing)


def chunk_rows(db):
    return [tuple(r) for r in db.execute("SELECT doc_id, n, text FROM kb_chunks ORDER BY id").fetchall()]


def test_add_list_search_remove(kb, tmp_path):
    doc = tmp_path / "cats.md"
    doc.write_text("# Cats\n\nCats purr when they are content.\n\nA cat sleeps up to sixteen hours a day.\n")
    result = kb.add(doc)
    assert (result.path, result.name, result.status, result.chunks) == (str(doc.resolve()), "cats.md", "added", 1)
    [listed] = kb.list()
    assert (listed.path, listed.name, listed.title, listed.chunks, listed.embedder) == (
        str(doc.resolve()), "cats.md", "Cats", 1, "hashing-256")
    [hit] = kb.search("how long do cats sleep", k=3)
    assert hit.source == "kb:cats.md#0"  # named as added: no absolute server path in sources
    assert hit.title == "Cats"
    assert hit.text == "Cats purr when they are content.\n\nA cat sleeps up to sixteen hours a day."
    assert hit.meta == {"doc": "cats.md", "chunk": 0, "bm25_rank": 1, "cosine": hit.meta["cosine"]}
    assert kb.remove(doc) is True
    assert kb.list() == [] and kb.search("cats") == [] and chunk_rows(kb.db) == []
    assert kb.remove(doc) is False


def test_unchanged_file_is_skipped_and_changed_file_replaced(kb, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("Version one talks about apples.\n")
    assert kb.add(doc).status == "added"
    before = chunk_rows(kb.db)
    assert kb.add(doc).status == "unchanged"
    assert chunk_rows(kb.db) == before
    doc.write_text("Version two talks about pears.\n")
    result = kb.add(doc)
    assert (result.status, result.chunks) == ("updated", 1)
    assert [r[2] for r in chunk_rows(kb.db)] == ["Version two talks about pears."]
    assert kb.search("apples", mode="bm25") == []
    assert len(kb.list()) == 1


def test_a_different_embedder_reingests(db, tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("Some text.\n")
    KnowledgeBase(db, HashingEmbedder(64)).add(doc)
    assert KnowledgeBase(db, HashingEmbedder(128)).add(doc).status == "updated"


def test_symlink_is_stored_under_its_target(kb, tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("Real content here.\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert kb.add(link).path == str(target.resolve())
    assert kb.add(target).status == "unchanged"
    assert kb.remove(link) is True


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "is a directory"),
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: (p / "empty.txt").write_text("") and None or p / "empty.txt", "is empty"),
        (lambda p: (p / "bin.txt").write_bytes(b"abc\x00\x01\x02") and None or p / "bin.txt", "binary"),
        (lambda p: (p / "doc.pdf").write_bytes(b"%PDF-1.4\n...") and None or p / "doc.pdf", "PDF"),
        (lambda p: (p / "bad.md").write_bytes(b"caf\xe9\n" * 10) and None or p / "bad.md", "UTF-8"),
    ],
)
def test_bad_paths_are_refused_with_a_clear_message(kb, tmp_path, make, message):
    with pytest.raises(RetrieverError, match=message):
        kb.add(make(tmp_path))
    assert kb.list() == [] and chunk_rows(kb.db) == []


def test_non_regular_files_are_refused(kb, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(RetrieverError, match="not a regular file"):
        kb.add(fifo)  # would block forever if it were opened
    with pytest.raises(RetrieverError, match="not a regular file"):
        kb.add("/dev/null")


def test_too_large_file_is_refused(db, hashing, tmp_path):
    doc = tmp_path / "big.txt"
    doc.write_text("word " * 1000)
    with pytest.raises(RetrieverError, match="over the"):
        KnowledgeBase(db, hashing, max_file_bytes=1000).add(doc)


def test_failed_reingest_leaves_the_old_version(kb, tmp_path):
    doc = tmp_path / "docs.jsonl"
    doc.write_text('{"text": "Good line about owls."}\n')
    kb.add(doc)
    before = (kb.list(), chunk_rows(kb.db))
    doc.write_text('{"text": "New line about hawks."}\n{"text": "fine"}\n{broken\n')
    with pytest.raises(RetrieverError, match=r"docs.jsonl:3: not valid JSON"):
        kb.add(doc)
    assert (kb.list(), chunk_rows(kb.db)) == before
    assert kb.db.execute("SELECT count(*) FROM kb_docs WHERE state = 'pending'").fetchone()[0] == 0
    assert [p.text for p in kb.search("owls")] == ["Good line about owls."]


class FailingEmbedder(HashingEmbedder):
    """Fails on its n-th call, like a model running out of memory half-way through a file."""

    def __init__(self, fail_on: int):
        super().__init__()
        self.calls = 0
        self.fail_on = fail_on

    def encode(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise MemoryError("out of memory")
        return super().encode(texts)


def test_crash_half_way_through_a_long_file_writes_nothing(db, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text("\n\n".join(f"Paragraph {i} " + "filler " * 150 for i in range(200)))
    kb = KnowledgeBase(db, FailingEmbedder(fail_on=3))
    with pytest.raises(MemoryError):
        kb.add(doc)
    assert kb.list() == [] and chunk_rows(db) == []
    assert db.execute("SELECT count(*) FROM kb_chunks_fts").fetchone()[0] == 0


def test_a_large_file_is_streamed_with_progress(kb, tmp_path):
    doc = tmp_path / "large.md"
    with doc.open("w") as f:
        for i in range(3000):
            f.write(f"Section {i} talks about topic number {i} in some detail. " * 3 + "\n\n")
    seen = []
    result = kb.add(doc, progress=seen.append)
    assert sum(seen) == doc.stat().st_size
    assert len(seen) > 100  # reported while reading, not once at the end
    assert result.chunks > 100
    assert kb.search("topic number 2718", k=1, mode="bm25")[0].text.count("2718") >= 1


def test_html_and_jsonl_sources(kb, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<title>Owls</title><script>var owls = 1;</script><p>Owls hunt at night &amp; see well.</p>")
    records = tmp_path / "recs.jsonl"
    records.write_text('{"text": "Hawks hunt by day.", "title": "Hawks", "url": "https://example.org/hawks"}\n')
    kb.add(page)
    kb.add(records)
    [owl] = kb.search("owls night", k=1)
    assert (owl.text, owl.title) == ("Owls hunt at night & see well.", "Owls")
    assert "var" not in owl.text
    [hawk] = kb.search("hawks day", k=1)
    assert (hawk.source, hawk.title, hawk.meta["line"]) == ("https://example.org/hawks", "Hawks", 1)


def test_fts_query_quotes_every_word():
    assert fts_query('cats AND "dogs" OR (NEAR x*') == '"cats" OR "and" OR "dogs" OR "or" OR "near" OR "x"'
    assert fts_query("?!* ()") == ""


def test_modes_rank_differently_and_hybrid_fuses(kb, tmp_path):
    for name, text in {
        "a.txt": "The quick brown fox jumps over the lazy dog.",
        "b.txt": "Foxes are small omnivorous mammals of the dog family.",
        "c.txt": "Interest rates rose again this quarter.",
    }.items():
        (tmp_path / name).write_text(text)
        kb.add(tmp_path / name)
    bm25 = kb.search("fox", k=3, mode="bm25")
    dense = kb.search("fox", k=3, mode="dense")
    hybrid = kb.search("fox", k=3)
    assert {p.source[-7:] for p in bm25} == {"a.txt#0", "b.txt#0"}  # porter stemming: "foxes" matches "fox"
    assert len(dense) == 3 and all(-1.0 <= p.score <= 1.0 + 1e-6 for p in dense)
    assert {p.source for p in hybrid} == {p.source for p in dense}
    assert hybrid[0].meta["bm25_rank"] == 1
    with pytest.raises(ValueError):
        kb.search("fox", mode="sparse")


def test_expand_paths_walks_folders_and_skips_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.md").write_text("c")
    files = expand_paths([tmp_path, tmp_path / "b.txt"])  # a file met twice keeps its first name
    assert [(f.path, f.name) for f in files] == [
        ((tmp_path / "b.txt").resolve(), f"{tmp_path.name}/b.txt"),
        ((tmp_path / "sub" / "a.md").resolve(), f"{tmp_path.name}/sub/a.md"),
    ]
    assert [(f.path, f.name) for f in expand_paths([tmp_path / "sub" / "a.md"])] == [
        ((tmp_path / "sub" / "a.md").resolve(), "a.md")]


def test_sources_name_documents_relative_to_the_folder_added(kb, tmp_path):
    """A folder's files are named from the folder; the name, never the absolute path, is in sources and meta."""
    docs = tmp_path / "docs"
    (docs / "birds").mkdir(parents=True)
    (docs / "birds" / "owls.md").write_text("# Owls\n\nOwls hunt at night and turn their heads far around.\n")
    results = [kb.add(f) for f in expand_paths([docs])]
    assert [(r.name, r.status) for r in results] == [("docs/birds/owls.md", "added")]
    [hit] = kb.search("owls hunt at night", k=1)
    assert (hit.source, hit.meta["doc"]) == ("kb:docs/birds/owls.md#0", "docs/birds/owls.md")
    assert str(tmp_path) not in repr(hit) and str(tmp_path) not in repr(kb.list()[0].name)
    assert kb.add(docs / "birds" / "owls.md", name="owls").status == "unchanged"  # the name is kept
    with pytest.raises(ValueError):
        kb.add(docs / "birds" / "owls.md", name=str(docs / "birds" / "owls.md"))
    assert kb.remove("docs/birds/owls.md") is True and kb.list() == []


def test_remove_by_a_name_two_documents_share_is_refused(kb, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.md").write_text(f"Notes from folder {folder}.\n")
        kb.add(tmp_path / folder / "notes.md")
    with pytest.raises(RetrieverError, match="2 documents are named 'notes.md'"):
        kb.remove("notes.md")
    assert kb.remove(tmp_path / "a" / "notes.md") is True
    assert kb.remove("notes.md") is True and kb.list() == []


def test_older_databases_get_names_instead_of_absolute_paths(tmp_path, hashing):
    """Migration m005 renames documents stored before names existed (their sources held the absolute path)."""
    import sqlite3

    from retrievers import schema
    from retrievers.db import open_db

    path = tmp_path / "old.db"
    db = open_db(path)
    steps = schema.migrations._steps
    old = schema.Migrations("retrievers")
    old._steps = [s for s in steps if s[0] < "m005"]
    old.apply(db)
    doc = (tmp_path / "old.md").resolve()
    starter = (starter_kb_dir() / "photosynthesis.md").resolve()
    for i, p in enumerate([doc, starter], start=1):
        db.execute("INSERT INTO kb_docs (id, path, sha256, mtime, size, embedder, state, added) "
                   "VALUES (?, ?, 'x', 0, 1, 'hashing-256', 'ready', 'then')", [i, str(p)])
        db.execute("INSERT INTO kb_chunks (doc_id, n, text, source, meta, embedding) "
                   "VALUES (?, 0, 'text', ?, ?, x'00')", [i, f"kb:{p}#0", f'{{"doc": "{p}", "chunk": 0}}'])
    db.close()
    KnowledgeBase(open_db(path), hashing)
    rows = sqlite3.connect(path).execute(
        "SELECT d.name, c.source, c.meta FROM kb_docs d JOIN kb_chunks c ON c.doc_id = d.id ORDER BY d.id").fetchall()
    assert rows == [("old.md", "kb:old.md#0", '{"doc": "old.md", "chunk": 0}'),
                    ("starter_kb/photosynthesis.md", "kb:starter_kb/photosynthesis.md#0",
                     '{"doc": "starter_kb/photosynthesis.md", "chunk": 0}')]


def test_search_survives_restart(tmp_path, hashing):
    from retrievers.db import open_db

    doc = tmp_path / "a.txt"
    doc.write_text("Persistent penguins.\n")
    KnowledgeBase(open_db(tmp_path / "fsb.db"), hashing).add(doc)
    kb = KnowledgeBase(open_db(tmp_path / "fsb.db"), hashing)
    assert [p.text for p in kb.search("penguins")] == ["Persistent penguins."]


def test_starter_kb_with_minilm_finds_answers_by_meaning(db, minilm, tmp_path):
    starter = tmp_path / "starter"
    shutil.copytree(starter_kb_dir(), starter)
    kb = KnowledgeBase(db, minilm)
    results = [kb.add(p) for p in expand_paths([starter])]
    assert len(results) >= 6 and all(r.status == "added" for r in results)
    # none of "trees", "nourishment", "sunshine" is in the document: found by meaning (embeddings only)
    top = kb.search("How do trees make their own nourishment from sunshine?", k=3, mode="dense")
    assert top[0].title == "Photosynthesis"
    hybrid = kb.search("How can I delete what the bot knows about me?", k=3)
    assert hybrid[0].title == "What the bot remembers about you"
    vecs = minilm.encode([hybrid[0].text])
    assert vecs.dtype == np.float32 and vecs.shape == (1, 384)
