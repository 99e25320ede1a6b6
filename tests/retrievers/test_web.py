"""Web search: ddgs' real engine code against a stand-in server on 127.0.0.1 (see conftest.py). No internet."""
from __future__ import annotations

import time

import pytest
from ddgs.exceptions import DDGSException, RatelimitException

from retrievers import RetrieverError, WebSearch
from retrievers.web import clean_text


def test_results_are_cleaned_capped_and_marked_untrusted(db, engines):
    web = WebSearch(db, backend="loopback", snippet_chars=120)
    passages = web.search("barn owls", k=5)
    assert [(p.source, p.title, p.score) for p in passages] == [
        ("https://example.org/one", "About barn owls", 1.0),
        ("https://example.org/two", "barn owls explained", 0.5),
        ("https://example.org/three", "More on barn owls", 1 / 3),
    ]  # the javascript: link is dropped
    assert passages[0].text == "The first page about barn owls & more."
    assert passages[1].text.startswith("A long snippet on barn owls: word word")
    assert len(passages[1].text) <= 121 and passages[1].text.endswith("…")
    assert all(p.meta["untrusted"] is True for p in passages)
    # the query went to the server as ddgs' DuckDuckGo engine sends it
    [(path, form)] = engines.requests
    assert path == "/html/" and form["q"] == "barn owls" and form["l"] == "us-en"


def test_second_search_is_served_from_the_cache(db, engines):
    web = WebSearch(db, backend="loopback")
    first = web.search("owls", k=3)
    assert len(engines.requests) == 1
    again = web.search("  OWLS ", k=2)
    assert len(engines.requests) == 1
    assert again == first[:2] and again[0].meta["cached"] is True


def test_cache_entries_expire(db, engines):
    now = [1000.0]
    web = WebSearch(db, backend="loopback", max_age_s=60, clock=lambda: now[0])
    web.search("owls")
    now[0] += 59
    web.search("owls")
    assert len(engines.requests) == 1
    now[0] += 2
    web.search("owls")
    assert len(engines.requests) == 2


def test_cache_survives_restart(tmp_path, engines):
    from retrievers.db import open_db

    WebSearch(open_db(tmp_path / "fsb.db"), backend="loopback").search("owls")
    WebSearch(open_db(tmp_path / "fsb.db"), backend="loopback").search("owls")
    assert len(engines.requests) == 1


def test_no_results_is_an_empty_list_and_not_cached(db, engines):
    web = WebSearch(db, backend="empty")
    assert web.search("owls") == []
    assert web.search("owls") == []
    assert len(engines.requests) == 2


def test_dead_server_fails_fast_with_a_clear_message(db, engines):
    web = WebSearch(db, backend="dead", timeout=5, retries=3)
    start = time.monotonic()
    with pytest.raises(RetrieverError, match="cannot be reached"):
        web.search("owls")
    assert time.monotonic() - start < 2  # connection refused is not retried
    assert db.execute("SELECT count(*) FROM web_cache").fetchone()[0] == 0


def test_slow_server_times_out_after_retries(db, engines):
    delays = []
    web = WebSearch(db, backend="slow", timeout=0.5, retries=1, backoff=0.01, sleep=delays.append)
    start = time.monotonic()
    with pytest.raises(RetrieverError, match="timed out after 0.5 s"):
        web.search("owls")
    assert time.monotonic() - start < 2.8  # two attempts of ~0.5 s, not the server's 3 s
    assert delays == [0.01]
    assert [p for p, _ in engines.requests] == ["/slow/", "/slow/"]


class ScriptedClient:
    """Stands in for DDGS at its public method, raising the real ddgs exceptions in order."""

    def __init__(self, script):
        self.script = script

    def text(self, query, **kwargs):
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def test_rate_limits_are_retried_with_exponential_backoff(db):
    script = [RatelimitException("202 Ratelimit"), RatelimitException("202 Ratelimit"),
              [{"title": "<b>T</b>", "href": "https://e.org/", "body": "B"}]]
    delays = []
    web = WebSearch(db, retries=2, backoff=0.5, sleep=delays.append, client_factory=lambda t: ScriptedClient(script))
    [p] = web.search("owls")
    assert (p.title, p.text, p.source) == ("T", "B", "https://e.org/")
    assert delays == [0.5, 1.0]


def test_persistent_rate_limit_becomes_a_retriever_error(db):
    script = [RatelimitException("202 Ratelimit")] * 3
    web = WebSearch(db, retries=2, backoff=0, sleep=lambda s: None, client_factory=lambda t: ScriptedClient(script))
    with pytest.raises(RetrieverError, match="rate limited"):
        web.search("owls")


def test_unexpected_library_errors_become_retriever_errors(db):
    web = WebSearch(db, client_factory=lambda t: ScriptedClient([DDGSException("engine exploded")]))
    with pytest.raises(RetrieverError, match="Web search is unavailable: engine exploded"):
        web.search("owls")
    web = WebSearch(db, client_factory=lambda t: ScriptedClient([KeyError("href")]))
    with pytest.raises(RetrieverError, match="Web search failed"):
        web.search("owls")


def test_clean_text():
    assert clean_text("<p>a &amp; <i>b</i></p>\n\n c", 100) == "a & b c"
    assert clean_text("one two three four", 9) == "one two…"
    assert clean_text("x" * 20, 5) == "xxxxx…"
    assert clean_text("bell\x07 char", 100) == "bell char"
