"""bench/turn.py end to end on the tiny model: the in-process server, the scripted conversations streamed turn by turn,
the step breakdown from the stored traces and a small concurrency sweep, as one JSON object on stdout."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from app.settings import REPO_ROOT


def test_turn_benchmark_prints_one_json_object_with_positive_numbers(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/turn.py", "--model", "tiny", "--json", "--types", "web,kg,refusal",
         "--clients", "1,2", "--sweep-turns", "2", "--warm", "off", "--data-dir", str(tmp_path / "data")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FSB_SELECTOR": "embedding"},  # routing and safety stage without warming LM prompts
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)  # stdout holds the JSON object and nothing else

    for key in ("ttft_median_s", "ttft_p90_s", "ttft_max_s", "turn_median_s", "tokens_per_s_1", "tokens_per_s_2",
                "ttft_p50_s_2", "ttft_p95_s_2"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["ttft_median_s"] <= res["ttft_p90_s"] <= res["ttft_max_s"]
    assert res["model"] == "tiny" and res["machine"]["cpu_count"] >= 1 and res["machine"]["platform"]
    assert res["ok"] == res["turns"] > 0 and not res["errors"]

    assert set(res["by_type"]) >= {"web", "kg", "refusal"}
    for kind, s in res["by_type"].items():
        assert s["n"] >= 1 and s["ok"] == s["n"], (kind, s)
        for key in ("ttft_median_s", "ttft_p90_s", "ttft_max_s", "turn_median_s", "turn_p90_s"):
            assert s[key] > 0, (kind, key)
        # the breakdown comes from the stored trace of every turn
        assert set(s["steps"]) >= {"safety", "select", "parse", "retrieve", "prompt", "first", "decode", "tail",
                                   "remember"}
        assert all(v >= 0 for v in s["steps"].values() if v is not None) and s["steps"]["first"] > 0, (kind, s["steps"])
    # web turns went through the stand-in search engine (their parser writing the query), KG turns through the graph
    assert res["by_type"]["web"]["skills"] == {"wit": res["by_type"]["web"]["ok"]}  # the trigger routes them
    assert res["by_type"]["web"]["steps"]["retrieve"] > 0
    assert "the stand-in search engine got no request" not in res["notes"]
    # every typed turn is listed with its message, route and steps (to find the slow ones after a run)
    assert len(res["per_turn"]) == res["turns"]
    assert {t["type"] for t in res["per_turn"]} == set(res["by_type"])
    assert all(t["message"] and t["skill"] and t["ttft_s"] > 0 and t["steps"]["first"] > 0 for t in res["per_turn"])
    # the 2 clients' turns again, one after another (same conversations, same count)
    assert res["same_work"]["clients"] == 2 and res["same_work"]["turns"] == res["same_work"]["ok"] == 4
    assert res["tokens_per_s_2_serial"] > 0
    assert [s["clients"] for s in res["sweep"]] == [1, 2]
    assert all(s["turns"] == 2 * s["clients"] and s["tokens"] > 0 for s in res["sweep"])
    for s in res["sweep"]:  # when each client was done, from the sweep's start: within its wall time
        assert len(s["clients_done_s"]) == s["clients"] and all(0 < t <= s["wall_s"] + 0.01 for t in s["clients_done_s"])
