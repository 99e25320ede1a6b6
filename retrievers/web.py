"""Web search through the ``ddgs`` metasearch package, with timeouts, retries, a SQLite cache and cleaned snippets.

Results are untrusted text from the internet: every passage carries ``meta={"untrusted": True, ...}`` so the prompt
builder can fence it off, titles and snippets are stripped of HTML and capped in length, and only http(s) links are
kept. Successful searches are cached in ``web_cache`` for ``max_age_s`` seconds, keyed by backend, region, safesearch
and the normalised query; empty answers are not cached.

Failures become :class:`RetrieverError` with a message fit for the user. Rate limits and timeouts are retried with
exponential backoff (``backoff * 2**attempt`` seconds); other errors (no network, refused connection) are not, so
an offline bot answers at once.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import time
from typing import Any, Callable

import sqlite_utils

from .base import LangChainRetrievable, Passage, RetrieverError
from .db import write
from .schema import ensure_schema

_TAG = re.compile(r"<[^>]*>")


def clean_text(raw: str, limit: int) -> str:
    """Plain text from a snippet: tags dropped, entities decoded, whitespace collapsed, cut at a word to ``limit``."""
    text = html.unescape(_TAG.sub(" ", raw or ""))
    text = "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;:") + "…"


class WebSearch(LangChainRetrievable):
    """Text search on the web.

    Args:
        db: the open database (for the cache).
        backend: ddgs backend(s): "auto", or comma-separated engine names such as "duckduckgo,wikipedia".
        region / safesearch: passed to ddgs ("us-en"; "on" | "moderate" | "off").
        timeout: seconds for each search request.
        retries: extra attempts after a rate limit or a timeout.
        backoff: first retry delay in seconds; doubles each time.
        max_age_s: how long a cached answer is reused.
        snippet_chars / title_chars: length caps.
        fetch: how many results to ask for (at least ``k``), so later searches with a larger ``k`` hit the cache.
        client_factory: ``f(timeout) -> object with .text(query, **kw)``; ddgs' ``DDGS`` by default.
        clock / sleep: injectable for tests.

    Example:
        >>> web = WebSearch(db, backend="duckduckgo")
        >>> [p.source for p in web.search("few-shot bot prompting", k=3)]
        ['https://...', ...]
    """

    name = "web"

    def __init__(
        self,
        db: sqlite_utils.Database,
        *,
        backend: str = "auto",
        region: str = "us-en",
        safesearch: str = "moderate",
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_age_s: float = 6 * 3600,
        snippet_chars: int = 400,
        title_chars: int = 120,
        fetch: int = 10,
        client_factory: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.db = db
        self.backend = backend
        self.region = region
        self.safesearch = safesearch
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_age_s = max_age_s
        self.snippet_chars = snippet_chars
        self.title_chars = title_chars
        self.fetch = fetch
        self.client_factory = client_factory or _ddgs_client
        self.clock = clock
        self.sleep = sleep
        ensure_schema(db)

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """Up to ``k`` web results for ``query``, best first, each marked untrusted.

        Raises:
            RetrieverError: the search backend could not be reached, timed out, or keeps rate-limiting us.
        """
        query = " ".join((query or "").split())
        if not query or k <= 0:
            return []
        key = self._cache_key(query)
        results = self._cached(key, k)
        cached = results is not None
        if results is None:
            results = self._fetch(query, max(k, self.fetch))
            if results:
                with write(self.db):
                    self.db["web_cache"].upsert(
                        {"key": key, "query": query, "requested": max(k, self.fetch), "results": json.dumps(results),
                         "fetched_at": self.clock()},
                        pk="key",
                    )
        return [
            Passage(
                r["body"] or r["title"],
                r["href"],
                1.0 / (1 + rank),
                r["title"],
                {"untrusted": True, "rank": rank + 1, "cached": cached},
            )
            for rank, r in enumerate(results[:k])
        ]

    def _cache_key(self, query: str) -> str:
        raw = json.dumps([self.backend, self.region, self.safesearch, query.casefold()])
        return hashlib.sha256(raw.encode()).hexdigest()

    def _cached(self, key: str, k: int) -> list[dict] | None:
        row = self.db.execute(
            "SELECT requested, results, fetched_at FROM web_cache WHERE key = ?", [key]
        ).fetchone()
        if row is None:
            return None
        requested, results, fetched_at = row
        if self.clock() - fetched_at > self.max_age_s:
            return None
        results = json.loads(results)
        if requested < k and len(results) >= requested:  # the search might have more than we kept
            return None
        return results

    def _fetch(self, query: str, n: int) -> list[dict]:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

        attempt = 0
        while True:
            try:
                client = self.client_factory(self.timeout)
                raw = client.text(
                    query, region=self.region, safesearch=self.safesearch, max_results=n, backend=self.backend
                )
                return self._clean(raw or [])
            except (RatelimitException, TimeoutException) as e:
                if attempt >= self.retries:
                    if isinstance(e, RatelimitException):
                        raise RetrieverError(
                            "Web search is refusing requests for now (rate limited); try again in a few minutes."
                        ) from e
                    raise RetrieverError(f"Web search timed out after {self.timeout:g} s; try again later.") from e
                self.sleep(self.backoff * 2**attempt)
                attempt += 1
            except DDGSException as e:
                if "no results found" in str(e).casefold():
                    return []
                if re.search(r"connect|dns|resolve|network", str(e), re.I):
                    raise RetrieverError(
                        "Web search is unavailable: the search service cannot be reached (is this machine offline?)."
                    ) from e
                raise RetrieverError(f"Web search is unavailable: {_short(e)}") from e
            except Exception as e:  # anything else from the client library is still "search failed", not a crash
                raise RetrieverError(f"Web search failed: {_short(e)}") from e

    def _clean(self, raw: list[dict]) -> list[dict]:
        out, seen = [], set()
        for item in raw:
            href = str(item.get("href") or item.get("url") or "").strip()
            if not re.match(r"https?://", href, re.I) or href in seen:
                continue
            seen.add(href)
            title = clean_text(str(item.get("title") or ""), self.title_chars)
            body = clean_text(str(item.get("body") or ""), self.snippet_chars)
            if title or body:
                out.append({"title": title, "href": href, "body": body})
        return out


def _ddgs_client(timeout: float):
    from ddgs import DDGS

    return DDGS(timeout=timeout)


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "…"
