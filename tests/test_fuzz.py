"""Hostile input: the HTTP API fuzzed from its own OpenAPI schema (schemathesis), the parsers with hypothesis,
oversized and deeply nested JSON, bytes that are not UTF-8. Zero server errors allowed."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from app.lm.tiny import build_tiny_lm, default_corpus
    from app.server import build_app, build_bot
    from app.settings import REPO_ROOT, Settings
    from retrievers.embed import HashingEmbedder

    settings = Settings.load(env={}, model="tiny", data_dir=tmp_path_factory.mktemp("fuzz"), selector="off",
                             starter_kb=False, max_tokens=8, max_active=8, max_waiting=64)
    lm = build_tiny_lm(default_corpus())
    bot = build_bot(settings, lm=lm, embedder=HashingEmbedder())
    with LiveServer(build_app(settings, bot=bot)) as server:
        yield server


def test_fuzzed_requests_never_cause_a_server_error(fuzz_server):
    """Every operation in /openapi.json, with cases generated from its schema (valid and invalid)."""
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen = {"cases": 0, "operations": 0}
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()
        seen["operations"] += 1

        @given(case=operation.as_strategy())
        @hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen["cases"] += 1
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))

        check()
    print(f"fuzzed {seen['cases']} requests over {seen['operations']} operations: {len(failures)} server errors")
    assert seen["operations"] >= 10 and seen["cases"] >= 60
    assert failures == []


def test_deeply_nested_and_oversized_json_and_bad_bytes_get_4xx(fuzz_server):
    url = fuzz_server.url + "/v1/chat/completions"
    nested = b'{"model": "fsb", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {"content-type": "application/json"}
    r = httpx.post(url, content=nested, headers=headers, timeout=60)
    assert 400 <= r.status_code < 500
    r = httpx.post(url, content=b'{"model": "fsb", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}',
                   headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b"\x00\x01\x02 not json at all", headers=headers, timeout=60)
    assert r.status_code == 400
    r = httpx.post(url, content=json.dumps({"model": "fsb", "messages": [{"role": "user", "content": "hi"}]}),
                   headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code < 500
    assert httpx.get(fuzz_server.url + "/healthz").status_code == 200


@given(st.text(max_size=400))
@hsettings(max_examples=150, deadline=None)
def test_any_text_as_a_skill_file_is_a_skill_or_a_located_error(tmp_path_factory, text):
    from app.skills import SkillError, load_skill

    path = tmp_path_factory.mktemp("fuzzskill") / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "replace"))
    try:
        load_skill(path)
    except SkillError as exc:
        assert exc.line >= 1 and str(exc).startswith(str(path))


@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                       "content": st.text(max_size=50)}), max_size=8))
@hsettings(max_examples=200, deadline=None)
def test_any_message_list_becomes_a_dialogue_or_a_bad_request(messages):
    from app.bot import BadRequest, to_dialogue

    try:
        pairs = to_dialogue(messages)
    except BadRequest:
        return
    assert pairs and pairs[-1][0] and pairs[-1][1] == ""


@given(st.text(max_size=300))
@hsettings(max_examples=200, deadline=None)
def test_kg_path_parser_takes_any_text(text):
    from retrievers.kg import parse_paths

    for triple in parse_paths(text):
        assert len(triple) >= 2 and all(isinstance(part, str) and part for part in triple)


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3), st.lists(st.text(max_size=6), max_size=12))
@hsettings(max_examples=300, deadline=None)
def test_streamed_text_never_shows_a_stop_or_anything_after_it(stops, pieces):
    from app.lm import StopScanner

    scanner, text, shown = StopScanner(stops), "", ""
    for piece in pieces:
        text += piece
        shown += scanner.feed(text)
        if scanner.done:
            break
    else:
        shown += scanner.finish(text)
    cuts = [text.find(s) for s in stops if s in text]
    expected = text[: min(cuts)] if cuts else text
    assert shown == expected.rstrip("\ufffd") if not cuts else shown == expected
