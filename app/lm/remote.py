"""RemoteLM: the `LM` interface over an existing OpenAI-compatible completions server (vLLM, SGLang, llama.cpp's
``llama-server``, llama-cpp-python's server), for users who run the model on their own cluster.

    settings.model = "openai:http://127.0.0.1:8080/v1"                 # the server's only model
    settings.model = "openai:http://gpu-box:8000/v1#model=meta-llama/Llama-3.1-8B&context=8192"

Generation streams ``POST /v1/completions`` (``stream: true``). Stop strings go to the server *and* through our own
`StopScanner`, because servers differ in how (and whether) they cut: the scanner guarantees the same contract as the
local backends (cut at the first stop, a partial stop held back, nothing after it shown).

Scoring uses prompt log-probabilities: ``echo: true, logprobs: 1, max_tokens: 1`` over ``context + continuation``,
one request per continuation. Why one request each, over the *same* context text: vLLM computes prompt log-probs
outside its prefix cache (such requests neither hit nor fill it), so batching continuations into one request buys
nothing there, while servers that do reuse the KV of a common text prefix (llama.cpp, llama-cpp-python) reuse the
context across the sequence of requests. The continuation's tokens are the last ``n(context + continuation) -
n(context)`` prompt tokens, counted with the server's tokenizer (the lm-eval-harness convention), which is immune to
how a server writes BOS or text offsets. Servers that refuse ``echo`` (llama.cpp's ``llama-server`` answers 400) or
ignore it (only the generated token's log-prob comes back) are detected once and scored by teacher forcing instead:
one request per continuation token, reading the token's log-prob from the top-``k`` alternatives of the next token
(exact for tokens within the top ``k``; one outside counts as the ``k``-th best's log-prob, an upper bound; see
docs/scaling.md).

Token counts come from the server's tokenizer endpoint (llama.cpp and vLLM ``/tokenize``, llama-cpp-python
``/extras/tokenize``), from a local tokenizer when one is given, or, failing both, from ``usage.prompt_tokens``.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence
from urllib.parse import parse_qsl

from .base import LMError, Sampling, StopScanner

log = logging.getLogger(__name__)

PREFIX = "openai:"


def parse_spec(spec: str) -> dict:
    """``openai:URL[#model=NAME&context=N&timeout=S]`` -> keyword arguments for `RemoteLM`."""
    if not spec.startswith(PREFIX):
        raise ValueError(f"a remote model is written {PREFIX}URL, e.g. {PREFIX}http://127.0.0.1:8080/v1 (got {spec!r})")
    url, _, fragment = spec[len(PREFIX):].partition("#")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the remote model's URL must start with http:// or https:// (got {url!r})")
    kw: dict = {"base_url": url}
    known = {"model": str, "context": int, "timeout": float, "concurrency": int}
    for key, value in parse_qsl(fragment):
        if key not in known:
            raise ValueError(f"unknown option {key!r} after '#' in {spec!r}; known: {', '.join(known)}")
        kw[{"context": "context_length", "concurrency": "max_concurrency"}.get(key, key)] = known[key](value)
    return kw


class RemoteLM:
    """An OpenAI-compatible completions server behind the `LM` interface.

    Args:
        base_url: the server's OpenAI base, e.g. ``http://127.0.0.1:8080/v1``.
        model: the served model's name; default: the first one ``/v1/models`` lists.
        api_key: sent as ``Authorization: Bearer``.
        timeout: seconds to wait for any answer or the next streamed piece (a stalled stream fails after this).
        connect_timeout: seconds to wait for a connection.
        context_length: the server's context size; default: what ``/v1/models`` says (vLLM), else 2048.
        tokenizer: a local tokenizer (anything callable like a transformers tokenizer) to count tokens without asking.
        max_concurrency: requests in flight at once for `generate_batch` and `score` (the server batches them).
        score_mode: ``"auto"`` (echo, falling back to teacher forcing when the server cannot echo), ``"echo"`` or
            ``"forced"``.
        top_logprobs: alternatives asked for per token in the teacher-forcing fallback.
    Raises:
        LMError: from every call, when the server cannot be reached, answers with an HTTP error, or breaks a stream.
    Example:
        >>> lm = RemoteLM("http://127.0.0.1:8080/v1")
        >>> "".join(lm.generate("User: hi\\nAssistant:", stop=["\\nUser:"]))
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, context_length: int | None = None, tokenizer=None,
                 max_concurrency: int = 8, score_mode: str = "auto", top_logprobs: int = 20, name: str | None = None):
        import httpx

        if score_mode not in ("auto", "echo", "forced"):
            raise ValueError(f"score_mode must be auto, echo or forced, not {score_mode!r}")
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.name = name or f"{PREFIX}{self.base_url}"
        self._model = model
        self._context_length = context_length
        self.local_tokenizer = tokenizer
        self.max_concurrency = max(1, max_concurrency)
        self.score_mode = score_mode
        self.top_logprobs = top_logprobs
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), headers=headers,
                                  limits=httpx.Limits(max_connections=self.max_concurrency + 2))
        self._timeout = timeout
        self._tokenize_via: Callable[[str], list[int]] | None = None
        self._specials: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "RemoteLM":
        """Build from a ``settings.model`` string such as ``openai:http://127.0.0.1:8080/v1#model=x``."""
        return cls(**{**parse_spec(spec), **kw}, name=spec)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, url: str, body: dict | None = None) -> dict:
        import httpx

        try:
            resp = self._http.request(method, url, json=body)
        except httpx.ConnectTimeout as exc:
            raise LMError(f"cannot reach the inference server at {url}: connection timed out") from exc
        except httpx.TimeoutException as exc:
            raise LMError(f"the inference server at {url} did not answer within {self._timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise LMError(f"cannot reach the inference server at {url}: {exc or type(exc).__name__}. "
                          "Is it running, and is the URL in settings.model right?") from exc
        if resp.status_code >= 400:
            raise _http_error(url, resp.status_code, resp.text)
        try:
            return resp.json()
        except ValueError as exc:
            raise LMError(f"the inference server at {url} answered with something that is not JSON: "
                          f"{resp.text[:200]!r}") from exc

    def _stream(self, body: dict, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Server-sent events of a streamed completion, one parsed chunk at a time."""
        import httpx

        url = f"{self.base_url}/completions"
        try:
            with self._http.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise _http_error(url, resp.status_code, resp.read().decode("utf-8", "replace"))
                for line in resp.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return
                    if not line.startswith("data:"):
                        continue  # blank separators, ": ping" comments, "event:" lines
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise LMError(f"the inference server sent a malformed stream event: {data[:200]!r}") from exc
                    if "error" in chunk:
                        raise LMError(f"the inference server failed mid-stream: {_message(chunk['error'])}")
                    yield chunk
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise LMError(f"cannot reach the inference server at {url}: {exc or type(exc).__name__}. "
                          "Is it running, and is the URL in settings.model right?") from exc
        except httpx.TimeoutException as exc:
            raise LMError(f"the inference server at {url} stalled: nothing for {self._timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise LMError(f"the connection to the inference server at {url} broke mid-stream: "
                          f"{exc or type(exc).__name__}") from exc

    # ----------------------------------------------------------------------------------------- server facts
    @property
    def model(self) -> str | None:
        if self._model is None:
            self._read_models()
        return self._model

    @property
    def context_length(self) -> int:
        if self._context_length is None:
            self._read_models()
        return self._context_length or 2048

    def _read_models(self) -> None:
        data = self._request("GET", f"{self.base_url}/models").get("data") or []
        first = data[0] if data else {}
        if self._model is None:
            self._model = first.get("id")
        if self._context_length is None:
            meta = first.get("meta") or {}
            self._context_length = int(first.get("max_model_len") or meta.get("n_ctx") or meta.get("n_ctx_train") or 0)

    def _body(self, **kw) -> dict:
        body = {k: v for k, v in kw.items() if v is not None}
        if self.model:
            body["model"] = self.model
        return body

    # ------------------------------------------------------------------------------------------- tokenising
    def count_tokens(self, text: str) -> int:
        return max(0, len(self.tokenize(text)) - self._special_count())

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the server sees ``text`` (with whatever special tokens its tokenizer adds)."""
        if self.local_tokenizer is not None:
            return list(self.local_tokenizer(text, add_special_tokens=False).input_ids)
        with self._lock:
            if self._tokenize_via is None:
                self._tokenize_via = self._probe_tokenizer()
        return self._tokenize_via(text)

    def _special_count(self) -> int:
        if self.local_tokenizer is not None:
            return 0
        if self._specials is None:
            try:
                self._specials = len(self.tokenize(""))
            except LMError:
                self._specials = 0
        return self._specials

    def _probe_tokenizer(self) -> Callable[[str], list[int]]:
        """The first tokenizer endpoint the server has: llama.cpp / vLLM ``/tokenize``, llama-cpp-python's
        ``/extras/tokenize``; else token counts from ``usage.prompt_tokens`` of a one-token completion."""
        def native(text):  # one body both llama.cpp ("content", "add_special") and vLLM ("prompt", ...) understand
            return self._request("POST", f"{self.root}/tokenize", self._body(
                content=text, prompt=text, add_special=False, add_special_tokens=False))["tokens"]

        def extras(text):
            return self._request("POST", f"{self.root}/extras/tokenize", self._body(input=text))["tokens"]

        def usage(text):
            got = self._request("POST", f"{self.base_url}/completions",
                                self._body(prompt=text, max_tokens=1, temperature=0.0))
            return [0] * int(got["usage"]["prompt_tokens"])

        for way in (native, extras):
            try:
                tokens = way("probe")
            except (LMError, KeyError, TypeError):
                continue
            if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
                return way
        log.warning("the inference server has no tokenizer endpoint: counting tokens through completions' usage")
        return usage

    # ------------------------------------------------------------------------------------------- generation
    def generate(
        self,
        prompt: str,
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: dict | None = None,
        _cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream the server's continuation of ``prompt``, cut at the first stop string.

        ``prefix`` is accepted for the interface; the server keeps its own prefix cache (vLLM's automatic prefix
        caching, llama.cpp's ``cache_prompt``). ``stats`` gets ``tokens`` and ``finish`` ("stop", "eos", "length").
        """
        stops = [s for s in stop if s]
        body = self._body(prompt=prompt, max_tokens=max_new_tokens, stream=True, stop=stops or None,
                          cache_prompt=True, **_sampling_fields(sampling))
        scanner, text, tokens, reason = StopScanner(stops), "", 0, None
        for chunk in self._stream(body, _cancel):
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") or ""
                if piece:
                    tokens += 1
                    text += piece
                    shown = scanner.feed(text)
                    if shown:
                        yield shown
                reason = choice.get("finish_reason") or reason
            usage = chunk.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or tokens)
            if scanner.done:
                break  # our own cut: closing the stream tells the server to stop decoding
        if _cancel is not None and _cancel.is_set():
            return
        if not scanner.done and reason is None:
            raise LMError("the inference server ended the stream without finishing the completion")
        finish = "stop" if scanner.done else ("length" if reason == "length" else "stop" if stops else "eos")
        tail = scanner.finish(text)
        if tail:
            yield tail
        if stats is not None:
            stats.update(tokens=tokens, finish=finish)

    def generate_batch(
        self,
        prompts: Sequence[str],
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: list[dict] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Stream ``(row, piece)`` for several prompts, each its own concurrent request; the server batches them."""
        if not prompts:
            return
        out: queue.Queue = queue.Queue()
        cancel = threading.Event()
        slots = threading.BoundedSemaphore(self.max_concurrency)
        done = object()

        def run(row: int, prompt: str) -> None:
            try:
                with slots:
                    row_stats = None if stats is None else stats[row]
                    for piece in self.generate(prompt, stop, max_new_tokens, sampling, prefix, row_stats, cancel):
                        out.put((row, piece))
                        if cancel.is_set():
                            break
            except Exception as exc:  # handed to the consumer, raised there
                out.put((row, exc))
            finally:
                out.put((row, done))

        threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        try:
            remaining = len(threads)
            while remaining:
                row, item = out.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item if isinstance(item, LMError) else LMError(f"generation failed: {item}")
                else:
                    yield row, item
        finally:
            cancel.set()

    # --------------------------------------------------------------------------------------------- scoring
    def score(self, context: str, continuations: Sequence[str], prefix: str | None = None) -> list[float]:
        """log P(continuation | context) for each continuation, from the server's prompt log-probabilities.

        One request per continuation over the same context text (see the module docstring for why), sent
        concurrently; the server's own prefix cache does the sharing where it can.
        """
        if not continuations:
            return []
        if self.score_mode != "forced":
            try:
                base = len(self.tokenize(context))
                with ThreadPoolExecutor(self.max_concurrency) as pool:
                    return list(pool.map(lambda c: self._score_echo(context, c, base) if c else 0.0, continuations))
            except _EchoUnsupported as exc:
                if self.score_mode == "echo":
                    raise LMError(f"the inference server cannot return prompt log-probabilities: {exc}") from exc
                log.warning("the inference server cannot echo prompt log-probabilities (%s); scoring by teacher "
                            "forcing from now on (one request per token, approximate outside the top %d)",
                            exc, self.top_logprobs)
                self.score_mode = "forced"
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda c: self._score_forced(context, c) if c else 0.0, continuations))

    def _score_echo(self, context: str, continuation: str, context_tokens: int) -> float:
        n_cont = len(self.tokenize(context + continuation)) - context_tokens
        if n_cont <= 0:
            return 0.0
        try:
            got = self._request("POST", f"{self.base_url}/completions", self._body(
                prompt=context + continuation, max_tokens=1, temperature=0.0, echo=True, logprobs=1))
        except LMError as exc:
            if "echo" in str(exc).lower():  # llama-server: 400 "Only no echo is supported"
                raise _EchoUnsupported(str(exc)) from exc
            raise
        choice = (got.get("choices") or [{}])[0]
        entries = _logprob_entries(choice.get("logprobs"))
        generated = int((got.get("usage") or {}).get("completion_tokens", 1))
        prompt_entries = entries[: len(entries) - generated] if generated else entries
        if len(prompt_entries) <= n_cont:  # only the generated token came back: echo was ignored
            raise _EchoUnsupported(f"{len(entries)} log-probs for a {n_cont}+-token prompt")
        values = [lp for _, lp, _ in prompt_entries[-n_cont:]]
        if any(v is None for v in values):
            raise _EchoUnsupported("prompt log-probs are missing")
        return float(sum(values))

    def _score_forced(self, context: str, continuation: str) -> float:
        """Teacher forcing: for each continuation token, its log-prob among the top-k alternatives of the next token
        after ``context`` + the tokens before it. A token outside the top k counts as the k-th best (an upper bound).

        Tokens and their text come from the server's tokenizer and detokenizer; a server without them is walked by
        text instead, taking the longest top-k token that continues the text (a character at a time, bounded, where
        none does).
        """
        pieces = self._pieces(context, continuation)
        if pieces is not None:
            total = 0.0
            for i, piece in enumerate(pieces):
                top = self._top_logprobs(context + "".join(pieces[:i]))
                total += top.get(piece, min(top.values()))
            return total
        total, done = 0.0, 0
        while done < len(continuation):
            top = self._top_logprobs(context + continuation[:done])
            match = max((t for t in top if t and continuation.startswith(t, done)), key=len, default=None)
            total += top[match] if match else min(top.values())
            done += len(match) if match else 1
        return total

    def _top_logprobs(self, prompt: str) -> dict[str, float]:
        got = self._request("POST", f"{self.base_url}/completions", self._body(
            prompt=prompt, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs, n_probs=self.top_logprobs,
            cache_prompt=True))
        entries = _logprob_entries((got.get("choices") or [{}])[0].get("logprobs"))
        if not entries or not entries[0][2]:
            raise LMError("the inference server returns no log-probabilities: it cannot score")
        return entries[0][2]

    def _pieces(self, context: str, continuation: str) -> list[str] | None:
        """The continuation's tokens as text (as tokenized after ``context``), or None when the server cannot say."""
        try:
            ids = self.tokenize(context + continuation)[len(self.tokenize(context)):]
            pieces = [self._detokenize([i]) for i in ids]
        except (LMError, KeyError, TypeError):
            return None
        return pieces if pieces and "".join(pieces) == continuation else None

    def _detokenize(self, ids: list[int]) -> str:
        if self.local_tokenizer is not None:
            return self.local_tokenizer.decode(ids)
        for path, key in (("/detokenize", "content"), ("/extras/detokenize", "text"), ("/detokenize", "prompt")):
            try:
                text = self._request("POST", f"{self.root}{path}", self._body(tokens=ids))[key]
            except (LMError, KeyError):
                continue
            if isinstance(text, str):
                return text
        raise LMError("the inference server has no detokenizer endpoint")


class _EchoUnsupported(Exception):
    """The server cannot return prompt log-probabilities."""


def _sampling_fields(s: Sampling) -> dict:
    """Request fields for our sampling settings, in the spellings of vLLM, llama.cpp and llama-cpp-python.

    Sent explicitly because servers' defaults differ from ours (llama-cpp-python: top_k 40, min_p 0.05, repeat
    penalty 1.1). The repetition penalty's scope differs too: prompt + output (vLLM), the last n tokens (llama.cpp).
    """
    penalty = s.repetition_penalty
    return {"temperature": max(0.0, s.temperature), "top_p": s.top_p, "top_k": max(0, s.top_k),  # 0: off
            "min_p": 0.0, "repeat_penalty": penalty, "repetition_penalty": penalty, "seed": s.seed}


def _logprob_entries(logprobs) -> list[tuple[str, float | None, dict[str, float]]]:
    """(token, logprob, top alternatives) per token, from the legacy completions shape (``tokens``,
    ``token_logprobs``, ``top_logprobs``) or the chat shape (``content: [{token, logprob, top_logprobs}]``)."""
    if not logprobs:
        return []
    if isinstance(logprobs.get("content"), list):
        return [(e.get("token", ""), e.get("logprob"),
                 {t["token"]: t["logprob"] for t in e.get("top_logprobs") or [] if "token" in t})
                for e in logprobs["content"]]
    tokens = logprobs.get("tokens") or []
    lps = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [(t, lp, dict(top or {})) for t, lp, top in zip(tokens, lps, tops)]


def _message(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _http_error(url: str, status: int, text: str) -> LMError:
    try:
        detail = json.loads(text)
        detail = _message(detail.get("error") or detail.get("detail") or detail)
    except (ValueError, AttributeError):
        detail = text[:300]
    return LMError(f"the inference server answered HTTP {status} to {url}: {detail}")
