"""The narrow LM interface every backend implements, and the stop-string logic they share.

    generate(prompt, stop, max_new_tokens, sampling, prefix=None) -> Iterator[str]   # streamed text pieces
    score(context, continuations, prefix=None) -> list[float]                       # log P(continuation | context)

``prefix`` names the constant head of ``prompt`` (a skill's examples, the alignment preamble): backends that keep a
prefix KV cache encode it once and reuse it. Tokenisation is always ``encode(prefix) + encode(rest)``, cached or not, so
greedy output with the cache equals output without it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence


class LMError(RuntimeError):
    """The model failed while producing an answer (raised mid-stream too)."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` is greedy; the repetition penalty applies to generated tokens only."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Texts the output must not copy: no run of `AVOID_NGRAM` tokens from any of them (a chat reply's earlier replies,
    # which a small base model otherwise repeats word for word). Backends that cannot enforce it ignore it.
    avoid: tuple[str, ...] = ()
    # Texts whose first word the output may not open with (an answer retried because it began by repeating the
    # user's message, `app.align`). Backends that cannot enforce it ignore it.
    not_first: tuple[str, ...] = ()

    def with_overrides(self, **kw) -> "Sampling":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


class LM(Protocol):
    name: str
    context_length: int

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self,
        prompt: str,
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: dict | None = None,
    ) -> Iterator[str]: ...

    def generate_batch(
        self,
        prompts: Sequence[str],
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        prefix: str | None = None,
        stats: list[dict] | None = None,
    ) -> Iterator[tuple[int, str]]: ...

    def score(self, context: str, continuations: Sequence[str], prefix: str | None = None) -> list[float]: ...


class StopScanner:
    """Finds stop strings in a growing text and says what is safe to show.

    A stop cuts the text at its first occurrence; a tail that could still become a stop is held back (never shown) until
    more text proves otherwise; nothing after a stop is ever returned. No characters are stripped.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.emitted = 0
        self.done = False

    def feed(self, text: str) -> str:
        """Take the whole text decoded so far; return the new piece that is safe to show."""
        if self.done:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            return self._emit(text, max(cut, self.emitted))
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._emit(text, len(text) - self._held_back(text))

    def finish(self, text: str) -> str:
        """The model ended (EOS or token limit): a held-back partial stop was real text after all."""
        if self.done:
            return ""
        self.done = True
        return self._emit(text, len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text))

    def _emit(self, text: str, end: int) -> str:
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def cut_at_stops(pieces: Iterable[str], stops: Sequence[str]) -> Iterator[str]:
    """The text of ``pieces`` up to the first of ``stops`` (`StopScanner`: a tail that could still become a stop is held
    back); at a stop the source is closed (a generation then stops decoding too)."""
    scanner, text = StopScanner(stops), ""
    try:
        for piece in pieces:
            text += piece
            out = scanner.feed(text)
            if out:
                yield out
            if scanner.done:
                return
        out = scanner.finish(text)
        if out:
            yield out
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def complete(lm: LM, prompt: str, **kw) -> str:
    """Join a streamed generation into one string."""
    return "".join(lm.generate(prompt, **kw))


def fast_bf16(cpuinfo: str | None = None, cuda: bool | None = None) -> bool:
    """True where bfloat16 matrix products are fast: a CUDA GPU, or a CPU with AMX or AVX512-BF16 instructions.

    On such a CPU the embedded gemma-3-270m runs about 1.7x faster in bfloat16 than in float32 (decode 17 against 10
    tokens/s, a 4-prompt scoring pass 0.67 against 1.40 s; AMD EPYC with AVX512-BF16, 2 cores); on one without them
    (AVX2 only) bfloat16 products are emulated and slower, so float32 stays. ``cpuinfo`` and ``cuda`` override what
    is read from ``/proc/cpuinfo`` and torch (tests).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "amx_bf16" in flags or "avx512_bf16" in flags
