"""`fsb kb`, `fsb kg` and `fsb memory` used as a user would, on a database in a temporary data directory."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from app.cli_knowledge import kb, kg, memory
from retrievers.db import open_db
from app.settings import Settings
from retrievers import LongTermMemory, starter_kb_dir


@pytest.fixture
def settings(tmp_path):
    return Settings.load(env={}, data_dir=tmp_path / "data")


@pytest.fixture
def run(settings, minilm):  # the CLI's embedder is the shared MiniLM, already loaded by the fixture
    runner = CliRunner()

    def invoke(group, *args):
        return runner.invoke(group, list(args), obj=settings, catch_exceptions=False)

    return invoke


def test_kb_add_list_search_remove(run, settings, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("solar-system.md", "photosynthesis.md", "coffee-and-tea.md"):
        shutil.copy(starter_kb_dir() / name, docs / name)
    result = run(kb, "add", str(docs))
    assert result.exit_code == 0, result.output
    assert result.output.count("added") == 3 and "added      docs/solar-system.md  (1 passages)" in result.output
    assert settings.db_path.is_file()

    assert "unchanged" in run(kb, "add", str(docs / "solar-system.md")).output

    listed = json.loads(run(kb, "list", "--json").output)
    assert {d["title"] for d in listed} >= {"The solar system", "Photosynthesis"}
    assert [d["name"] for d in listed] == ["docs/coffee-and-tea.md", "docs/photosynthesis.md", "docs/solar-system.md"]
    plain_list = run(kb, "list").output
    assert str(tmp_path) not in plain_list + json.dumps(listed)  # no absolute server path
    assert plain_list.startswith("docs/coffee-and-tea.md  ")

    found = json.loads(run(kb, "search", "Which planet is the largest?", "--k", "2", "--json").output)
    assert len(found) == 2
    assert found[0]["title"] == "The solar system"
    assert set(found[0]) == {"text", "source", "score", "title", "meta"}
    plain = run(kb, "search", "largest planet")
    assert plain.output.startswith("1. [") and "] kb:docs/solar-system.md#0  (The solar system)" in plain.output

    assert run(kb, "remove", str(docs / "solar-system.md")).exit_code == 0
    assert "The solar system" not in run(kb, "list").output
    assert run(kb, "remove", "docs/photosynthesis.md").exit_code == 0  # by the name the list shows
    assert "Photosynthesis" not in run(kb, "list").output


def test_kb_errors_are_click_errors(settings, minilm, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Penguins cannot fly.\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    runner = CliRunner()
    result = runner.invoke(kb, ["add", str(good), str(empty), str(tmp_path / "missing.md")], obj=settings)
    assert result.exit_code == 1
    assert "added" in result.output and "good.txt" in result.output
    assert "empty.txt is empty" in result.output
    assert "missing.md: no such file" in result.output
    assert "Error: 2 of 3 file(s) could not be added." in result.output
    result = runner.invoke(kb, ["remove", str(tmp_path / "never-added.txt")], obj=settings)
    assert result.exit_code == 1 and "Not in the knowledge base" in result.output


def test_kg_add_and_search(run, tmp_path):
    facts = tmp_path / "facts.tsv"
    facts.write_text("GoldenEye\tdirected_by\tMartin Campbell\nGoldenEye\thas_genre\tSpy film\n")
    out = run(kg, "add", str(facts)).output
    assert "2 new triples" in out and "2 triples in the knowledge graph" in out
    found = json.loads(run(kg, "search", "golden eye", "--json").output)
    assert [p["text"] for p in found] == ["GoldenEye directed by Martin Campbell", "GoldenEye has genre Spy film"]


def test_kg_bad_file_is_a_click_error(settings, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("only\ttwo\n")
    result = CliRunner().invoke(kg, ["add", str(bad)], obj=settings)
    assert result.exit_code == 1 and "bad.tsv:1: expected subject, relation and object" in result.output


def test_memory_list_and_forget(run, settings, minilm):
    facts = LongTermMemory(open_db(settings.db_path), minilm).add("alice", ["I have two cats.", "I am a nurse."])
    LongTermMemory(open_db(settings.db_path), minilm).add("bob", ["I have a dog."])
    listed = json.loads(run(memory, "list", "alice", "--json").output)
    assert [f["text"] for f in listed] == ["I have two cats.", "I am a nurse."]
    assert run(memory, "forget", "alice", str(facts[0].id)).output == "Forgot 1 fact about alice.\n"
    assert "I have two cats." not in run(memory, "list", "alice").output
    result = CliRunner().invoke(memory, ["forget", "alice", "999"], obj=settings)
    assert result.exit_code == 1 and "alice has no fact with id 999" in result.output
    assert run(memory, "forget", "alice").output == "Forgot 1 fact about alice.\n"
    assert run(memory, "list", "alice").output == "Nothing is kept about alice.\n"
    assert "I have a dog." in run(memory, "list", "bob").output


def test_settings_come_from_the_environment_without_ctx_obj(tmp_path, monkeypatch):
    monkeypatch.setenv("FSB_DATA_DIR", str(tmp_path / "envdata"))
    result = CliRunner().invoke(memory, ["list", "nobody"])
    assert result.exit_code == 0 and (tmp_path / "envdata" / "fsb.db").is_file()
