"""The `fsb` console script as a user runs it: skills list/check, and every `fsb eval` command, including the retrieval
evaluation's KB recall worked out by hand on a small data folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import cli
from app.evaluation.retrieval_eval import kb_queries, run
from app.settings import REPO_ROOT

FSB = [sys.executable, "-m", "app.cli"]


def fsb(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FSB, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=env)


def test_console_script_has_every_group_and_eval_command():
    out = fsb("--help").stdout
    for group in ("chat", "serve", "skills", "kb", "kg", "memory", "eval"):
        assert f"  {group} " in out, out
    out = fsb("eval", "--help").stdout
    for command in ("skill", "selector", "align", "retrieval"):
        assert f"  {command} " in out, out


def test_skills_check_and_list_from_the_command_line(tmp_path):
    good = fsb("skills", "check")
    assert good.returncode == 0, good.stderr
    rows = json.loads(fsb("skills", "list", "--json").stdout)
    assert {"persona", "wow", "wit-parse", "safety-topic"} <= {r["name"] for r in rows}
    assert all({"name", "kind", "retriever"} <= set(r) for r in rows)

    broken = tmp_path / "skills"
    shutil.copytree(REPO_ROOT / "skills", broken)
    text = (broken / "wow.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith("retriever:"))
    text[line] = "retriever: nowhere"
    (broken / "wow.yaml").write_text("\n".join(text) + "\n")
    bad = fsb("skills", "check", "--dir", str(broken))
    assert bad.returncode != 0
    assert f"{broken / 'wow.yaml'}:{line + 1}:" in bad.stdout + bad.stderr
    assert "nowhere" in bad.stdout + bad.stderr

    missing = tmp_path / "no-such-folder"  # a mistyped FSB_SKILLS_DIR: listed nothing and exited 0 before
    for command in ("list", "check"):
        out = fsb("skills", command, env={**os.environ, "FSB_SKILLS_DIR": str(missing)})
        assert out.returncode == 1 and f"{missing}: not a folder (set FSB_SKILLS_DIR" in out.stderr, command


def _write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "valid.json").write_text(json.dumps(records))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "fsb"
    _write(root / "wow", [
        {"meta": [["The kiwi is a flightless bird native to New Zealand."],
                  ["Espresso is brewed by forcing hot water through finely ground coffee."]],
         "dialogue": [["Tell me about the kiwi bird from New Zealand", "It cannot fly."],
                      ["zzz qqq", "Sure."]]},
        {"meta": [["Mount Everest is the highest mountain above sea level."], ["Jazz originated in New Orleans."]],
         "dialogue": [["How high is Mount Everest above sea level?", "Very high."]]},
    ])
    _write(root / "wit-parse", [{"query": "kiwi bird", "dialogue": [["do kiwis fly?"]]},
                                {"query": "everest height", "dialogue": [["how tall is everest?"]]}])
    _write(root / "dialKG-parse", [{"query": [["Inception", "directed_by", "Christopher Nolan"]],
                                    "dialogue": [["Who directed Inception?"]]}])
    return root


def test_kb_queries_pair_each_user_turn_with_its_knowledge(data_dir):
    records = json.loads((data_dir / "wow" / "valid.json").read_text())
    queries = kb_queries(records, None)
    # each query is what the bot would ask (app.knowledge.kb_query): a follow-up carries the previous reply
    assert [q["query"] for q in queries] == ["Tell me about the kiwi bird from New Zealand", "It cannot fly. zzz qqq",
                                             "How high is Mount Everest above sea level?"]
    assert kb_queries(records, 1) == queries[:1]


def test_the_bot_asks_its_knowledge_base_what_the_evaluation_measures(settings, tiny_lm):
    from retrievers.embed import HashingEmbedder

    from app.knowledge import kb_query
    from app.server import build_bot

    assert kb_query([["Tell me about kiwis", ""]]) == "Tell me about kiwis"
    assert kb_query([["Tell me about kiwis", "Kiwis are flightless birds."], ["what do they eat?", ""]]) == \
        "Kiwis are flightless birds. what do they eat?"
    bot = build_bot(settings, lm=tiny_lm, embedder=HashingEmbedder())
    messages = [{"role": "user", "content": "Tell me about kiwis"},
                {"role": "assistant", "content": "Kiwis are flightless birds."},
                {"role": "user", "content": "what do they eat?"}]
    stream = bot.turn(messages, skill="wow", max_tokens=2)
    stream.text()
    step = next(s for s in stream.reply.trace["steps"] if s["step"] == "retrieve")
    assert step["retriever"] == "kb" and step["query"] == "Kiwis are flightless birds. what do they eat?"


def test_retrieval_recall_by_hand_on_the_real_kb(data_dir, settings, tiny_lm):
    from retrievers.embed import HashingEmbedder

    out = run(settings, data_dir, None, lm=tiny_lm, embedder=HashingEmbedder())
    # 4 passages; "zzz qqq" shares no word with any passage, so BM25 finds nothing for it; the other two queries share
    # their distinctive words with their gold sentence. With 4 passages and k=5, dense search returns every passage.
    assert (out["n"], out["passages"]) == (3, 4)
    assert out["kb_recall_at_5_bm25"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["kb_recall_at_5_dense"] == 1.0 and out["kb_recall_at_5"] == 1.0
    assert (out["n_query"], out["n_triple"]) == (2, 1)
    assert 0.0 <= out["query_f1"] <= 1.0 and 0.0 <= out["triple_f1"] <= 1.0


def test_fsb_eval_retrieval_prints_one_json_object(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FSB_DATA_DIR", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["eval", "retrieval", "--data-dir", str(data_dir), "--limit", "2", "--json",
                                      "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --json: no progress bars, no indexing lines
    out = json.loads(result.stdout)
    assert {"kb_recall_at_5", "kb_recall_at_5_bm25", "kb_recall_at_5_dense", "query_f1", "triple_f1", "n"} <= set(out)
    assert out["n"] == 2 and out["n_query"] == 2 and out["n_triple"] == 1


def test_fsb_eval_retrieval_names_a_missing_folder(tmp_path):
    (tmp_path / "wow").mkdir()
    result = CliRunner().invoke(cli, ["eval", "retrieval", "--data-dir", str(tmp_path), "--no-parsers"])
    assert result.exit_code == 1
    assert "no valid.json" in result.output


@pytest.mark.parametrize("env, message", [({"FSB_DTYPE": "fp8"}, "FSB_DTYPE must be one of auto, float32, bfloat16, "
                                                                  "float16, got 'fp8'"),
                                          ({"FSB_PORT": "abc"}, "FSB_PORT must be a whole number, got 'abc'")])
def test_a_bad_setting_is_a_one_line_error_not_a_traceback(env, message):
    result = CliRunner().invoke(cli, ["skills", "list"], env=env)
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output and "Traceback" not in result.output
