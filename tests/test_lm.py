"""The LM backend contract: stops, streaming hold-back, batches, scoring and the prefix KV cache."""
from __future__ import annotations

import pytest
import torch

from app.lm import LMError, Sampling, StopScanner
from app.lm.prefix_cache import PrefixCache

PREFIX = "".join(f"Persona Information:\nI like {x}.\nDialogue:\nUser: hi\nAssistant: hello, I like {x}.\n\n"
                 for x in ("cats", "boats", "bread", "space"))
PROMPT = PREFIX + "Persona Information:\nI like tea.\nDialogue:\nUser: what do you like?\nAssistant:"


# ------------------------------------------------------------------------------------------- stop scanner
def stream_through(stops, pieces):
    """Feed growing text piece by piece; return what was shown at each step and in total."""
    scanner, text, shown = StopScanner(stops), "", []
    for piece in pieces:
        text += piece
        shown.append(scanner.feed(text))
        if scanner.done:
            break
    else:
        shown.append(scanner.finish(text))
    return shown, "".join(shown)


def test_stop_cuts_at_first_occurrence_and_nothing_after_leaks():
    shown, total = stream_through(["\nUser:"], ["Hello", " there.", "\nUs", "er: next", " question"])
    assert total == "Hello there."
    assert shown == ["Hello", " there.", "", ""]


def test_partial_stop_is_held_back_then_released_when_it_is_not_a_stop():
    shown, total = stream_through(["\nUser:"], ["a\nUs", "ually fine"])
    assert shown[0] == "a"  # "\nUs" could start a stop: held back
    assert total == "a\nUsually fine"


def test_earliest_of_several_stops_wins_and_no_characters_are_stripped():
    _, total = stream_through(["###", "\n"], ["  spaced  ", "###x\nmore"])
    assert total == "  spaced  "


def test_held_back_tail_is_real_text_when_the_model_ends():
    shown, total = stream_through(["</answer>"], ["done </ans"])
    assert shown == ["done ", "</ans"]
    assert total == "done </ans"


# ------------------------------------------------------------------------------------------------ tiny LM
def gen(lm, prompt, **kw):
    kw.setdefault("max_new_tokens", 24)
    return "".join(lm.generate(prompt, **kw))


def test_greedy_output_with_prefix_cache_equals_output_without(tiny_lm):
    tiny_lm.prefix_cache.clear()
    with_cache = [gen(tiny_lm, PROMPT, prefix=PREFIX) for _ in range(2)]  # miss, then hit
    assert tiny_lm.prefix_cache.hits >= 1
    capacity = tiny_lm.prefix_cache.capacity
    tiny_lm.prefix_cache.capacity = 0
    try:
        without = gen(tiny_lm, PROMPT, prefix=PREFIX)
    finally:
        tiny_lm.prefix_cache.capacity = capacity
    assert with_cache[0] == with_cache[1] == without
    assert without  # the tiny model does produce text


def test_prefix_is_encoded_once_and_reused(tiny_lm, monkeypatch):
    tiny_lm.prefix_cache.clear()
    seen = []
    real = tiny_lm.runner.forward

    def counting(ids, *a, **kw):
        seen.append(ids.shape[1])
        return real(ids, *a, **kw)

    monkeypatch.setattr(tiny_lm.runner, "forward", counting)
    gen(tiny_lm, PROMPT, prefix=PREFIX, max_new_tokens=1)
    first = list(seen)
    seen.clear()
    gen(tiny_lm, PROMPT, prefix=PREFIX, max_new_tokens=1)
    _, prefix_len = tiny_lm.encode(PROMPT, PREFIX)
    assert prefix_len in first  # the prefix was encoded on the first call...
    assert prefix_len not in seen and max(seen) < prefix_len  # ...and only the suffix afterwards


def test_prefix_cache_is_a_bounded_lru():
    cache = PrefixCache(capacity=2)
    from app.lm.prefix_cache import CachedPrefix

    for ids in [(1,), (2,), (1,), (3,)]:  # touching (1,) makes (2,) the oldest
        if cache.get(ids) is None:
            cache.put(CachedPrefix(ids, None, torch.zeros(1)))
    assert len(cache) == 2
    assert cache.get((2,)) is None and cache.get((1,)) is not None and cache.get((3,)) is not None


def test_stop_string_cuts_generation(tiny_lm):
    free = gen(tiny_lm, PROMPT, max_new_tokens=30)
    assert len(free) > 4
    stop = free[3:5]
    cut = gen(tiny_lm, PROMPT, max_new_tokens=30, stop=[stop])
    assert cut == free[: free.find(stop)]


def test_batch_rows_stop_independently_and_match_single_rows(tiny_lm):
    prompts = [PROMPT, PREFIX + "Persona Information:\nI like long walks in the rain.\nDialogue:\nUser: tell me "
                                "about your favourite weather and why?\nAssistant:"]
    singles = [gen(tiny_lm, p, prefix=PREFIX) for p in prompts]
    stop = singles[0][2:4]  # a stop that ends row 0 early
    expected = [gen(tiny_lm, p, prefix=PREFIX, stop=[stop]) for p in prompts]
    out = ["", ""]
    stats = [{}, {}]
    for row, piece in tiny_lm.generate_batch(prompts, stop=[stop], max_new_tokens=24, prefix=PREFIX, stats=stats):
        out[row] += piece
    assert out == expected
    assert stats[0]["finish"] == "stop" and stats[0]["tokens"] < 24


def test_padded_batch_matches_single_rows_without_prefix(tiny_lm):
    prompts = ["User: hi\nAssistant:", "User: a much longer opening question about boats?\nAssistant:"]
    out = ["", ""]
    for row, piece in tiny_lm.generate_batch(prompts, max_new_tokens=12):
        out[row] += piece
    assert out == [gen(tiny_lm, p, max_new_tokens=12) for p in prompts]


def test_repetition_penalty_and_sampling_change_output_deterministically(tiny_lm):
    greedy = gen(tiny_lm, PROMPT)
    penalised = gen(tiny_lm, PROMPT, sampling=Sampling(repetition_penalty=5.0))
    sampled = [gen(tiny_lm, PROMPT, sampling=Sampling(temperature=1.5, seed=7)) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert penalised != greedy or sampled[0] != greedy


def direct_logprob(lm, context: str, continuation: str) -> float:
    """log P(continuation | context) from one plain forward pass over the whole sequence, no cache."""
    ctx = lm.tok(context, add_special_tokens=True).input_ids
    cont = lm.tok(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_score_equals_direct_log_likelihood_with_and_without_cache(tiny_lm):
    context = "Dialogue:\nUser: do you like boats?\nAssistant:"
    conts = [" yes, I love boats.", " no", " I prefer bread and space travel, honestly.", ""]
    expected = [direct_logprob(tiny_lm, context, c) if c else 0.0 for c in conts]
    tiny_lm.prefix_cache.clear()
    for _ in range(2):
        got = tiny_lm.score(context, conts, prefix="Dialogue:\n")
        assert got == pytest.approx(expected, abs=1e-3)
    assert tiny_lm.score(context, conts) == pytest.approx(expected, abs=1e-3)


def test_model_failure_mid_stream_raises_lm_error(tiny_lm, monkeypatch):
    real = tiny_lm.runner.forward
    calls = {"n": 0}

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(tiny_lm.runner, "forward", failing)
    got = []
    with pytest.raises(LMError, match="simulated"):
        for piece in tiny_lm.generate("User: hi\nAssistant:", max_new_tokens=20):
            got.append(piece)


# ------------------------------------------------------------------------------------------- dtype choice
AVX2_ONLY = "flags\t\t: fpu sse2 avx avx2 fma avx512f_missing\n"  # a substring must not count as the flag
AVX512_BF16 = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni\n"
AMX = "flags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n"


def test_fast_bf16_reads_the_cpu_flags_and_trusts_a_gpu():
    from app.lm.base import fast_bf16

    assert fast_bf16(AVX512_BF16, cuda=False) and fast_bf16(AMX, cuda=False)
    assert not fast_bf16(AVX2_ONLY, cuda=False)
    assert not fast_bf16("flags: avx512_bf16x\n", cuda=False)  # whole flags only
    assert fast_bf16(AVX2_ONLY, cuda=True)


def test_auto_dtype_is_bfloat16_only_where_it_is_fast_and_names_are_checked():
    from app.lm.hf import resolve_dtype

    assert resolve_dtype("auto", cuda=False, cpuinfo=AVX2_ONLY) is torch.float32
    assert resolve_dtype("auto", cuda=False, cpuinfo=AVX512_BF16) is torch.bfloat16
    assert resolve_dtype("auto", cuda=True, cpuinfo=AVX2_ONLY) is torch.bfloat16
    assert resolve_dtype("float32", cuda=True) is torch.float32  # an explicit name wins
    assert resolve_dtype("bfloat16", cuda=False, cpuinfo=AVX2_ONLY) is torch.bfloat16
    with pytest.raises(ValueError, match="FSB_DTYPE must be auto, float32, bfloat16, float16; got 'fp8'"):
        resolve_dtype("fp8", cuda=False)


# ------------------------------------------------------------------------------------------- kernel choice
def spy_on(model, seen: list):
    """Record (tokens fed, oneDNN on?, weights' dtype) for every forward of ``model``."""
    real = model.forward

    def spy(*a, **kw):
        seen.append((kw["input_ids"].numel(), torch._C._get_mkldnn_enabled(), model.dtype))
        return real(*a, **kw)

    model.forward = spy


def test_small_decode_steps_go_around_onednn_and_everything_else_through_it(tiny_lm):
    """A decode step of at most ``native_tokens`` tokens runs with oneDNN off (its one-row bfloat16 product is slow on
    AVX512-BF16 CPUs); a prefill and a one-token scoring forward do not; the setting is restored, also on error."""
    from app.lm.decoding import ModelRunner

    runner = ModelRunner(tiny_lm.model, PrefixCache(0))
    runner.native_tokens = 2
    seen = []
    before = torch._C._get_mkldnn_enabled()
    spy_on(tiny_lm.model, seen)
    try:
        cache, _ = runner.forward(torch.tensor([[5, 6, 7, 8]]))  # a prefill: 4 tokens
        runner.forward(torch.tensor([[9]]), cache, positions=torch.tensor([[4]]), decode=True)  # a decode step
        runner.forward(torch.tensor([[9]] * 3), None, decode=True)  # three rows: through oneDNN
        runner.forward(torch.tensor([[9]]))  # one token, but not a decode step
        with pytest.raises(AttributeError):  # a failing forward inside the block
            runner.forward(torch.tensor([[9]]), "not a cache", decode=True)
    finally:
        del tiny_lm.model.forward
    assert [(n, on) for n, on, _ in seen[:4]] == [(4, before), (1, False), (3, before), (1, before)]
    assert torch._C._get_mkldnn_enabled() == before


def test_the_kernel_choice_and_the_decoder_apply_only_where_they_can_pay(tiny_lm):
    import copy

    from app.lm.decoding import bfloat16_decoder, native_kernel_tokens

    assert tiny_lm.model.dtype == torch.float32 and native_kernel_tokens(tiny_lm.model) == 0  # no bfloat16 weights
    assert bfloat16_decoder(tiny_lm.model, max_parameters=1000) is None  # too large for a second copy
    assert bfloat16_decoder(copy.deepcopy(tiny_lm.model).to(torch.bfloat16)) is None  # already bfloat16


def test_packed_linear_layers_compute_what_the_plain_ones_do(tiny_lm):
    """`pack_linears` on a bfloat16 model: every linear layer is packed, a one-row product stays on the plain weight
    (the output layer's weight still tied to the embeddings), and a prefill, a one-row and a three-row decode step
    give the logits the unpacked model gives; a greedy generation through the batch scheduler gives the same text."""
    import copy

    from app.lm.batching import BatchedLM
    from app.lm.decoding import ModelRunner, PackedLinear, pack_linears
    from app.lm.hf import TransformersLM

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert pack_linears(tiny_lm.model, force=True) is None  # float32: nothing to pack
    plain = copy.deepcopy(tiny_lm.model).to(torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    assert pack_linears(packed, force=True) == 1
    linears = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert packed.get_output_embeddings().weight is packed.get_input_embeddings().weight

    def logits(model, ids):
        runner = ModelRunner(model, PrefixCache(0), pack=False)
        runner.native_tokens = 1
        cache, prefill = runner.forward(torch.tensor(ids), keep=0)
        step = torch.tensor([[7]] * len(ids))
        _, decode = runner.forward(step, cache, positions=torch.full((len(ids), 1), len(ids[0])), decode=True)
        return prefill.float(), decode.float()

    for rows in ([[5, 6, 7, 8, 9]], [[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [4, 4, 4, 4, 4]]):
        for want, got in zip(logits(plain, rows), logits(packed, rows)):
            assert torch.allclose(want, got, atol=0.05, rtol=0.02), (want - got).abs().max()

    def text(model):
        lm = TransformersLM(model, tiny_lm.tok, prefix_cache_entries=0, pack_weights=False)
        batched = BatchedLM(lm)
        try:
            return "".join(batched.generate(PROMPT, max_new_tokens=8))
        finally:
            batched.close()

    assert text(packed) == text(plain)
    assert not any(type(m) is PackedLinear for m in plain.modules())


def test_a_bfloat16_decoder_runs_the_decode_steps_and_nothing_else(tiny_lm):
    """With a bfloat16 copy attached, prefill and scoring stay on the float32 model and every decode step (plain
    loop, batch scheduler with rows joining a running batch) runs on the copy; scores are unchanged by it."""
    import copy
    import threading

    from app.lm.batching import BatchedLM

    scores = tiny_lm.score("User: hi", [" hello there", " no"])
    runner = tiny_lm.runner
    runner.use_decoder(copy.deepcopy(tiny_lm.model).to(torch.bfloat16).eval())
    main, dec = [], []
    spy_on(tiny_lm.model, main)
    spy_on(runner.decoder, dec)
    batched = BatchedLM(tiny_lm)
    try:
        assert tiny_lm.score("User: hi", [" hello there", " no"]) == scores
        text = "".join(tiny_lm.generate(PROMPT, max_new_tokens=6))
        assert len(dec) == 5 and all(n == 1 and dt == torch.bfloat16 for n, _, dt in dec)
        assert "".join(tiny_lm.generate_lookup(PROMPT, max_new_tokens=6)) and len(dec) > 5  # drafts verified on it
        assert all(dt == torch.float32 for _, _, dt in main)
        outs = [None] * 3

        def chat(i):
            outs[i] = "".join(batched.generate(PROMPT + " " * i, max_new_tokens=12))

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(isinstance(o, str) and o for o in outs) and text
        assert max(n for n, _, _ in dec) > 1  # rows shared decode steps, their caches cast on joining
    finally:
        batched.close()
        runner.use_decoder(None)
        del tiny_lm.model.forward


# ------------------------------------------------------------------------------------ conversation checkpoints
def chat_prompt(turns):
    """A chat prompt after PREFIX: every earlier exchange, then the open turn (the last user message and the cue)."""
    lines = ["Persona Information:", "I like tea.", "Dialogue:"]
    for user, bot in turns[:-1]:
        lines += [f"User: {user}", f"Assistant: {bot}"]
    return PREFIX + "\n".join(lines + [f"User: {turns[-1][0]}", "Assistant:"])


def test_a_body_only_prefill_keeps_a_checkpoint_without_logits_that_later_prefills_still_use():
    """``prefill(head=False)`` (a chat joining a running batch) computes no logits at all, and the checkpoint it
    stores keeps none; the next turn still starts from it, and a prompt that is exactly that checkpoint feeds its last
    token again instead of returning logits it does not have. Every cache and logits equal a plain forward's."""
    from app.lm.tiny import build_tiny_lm, default_corpus

    lm = build_tiny_lm(default_corpus(), checkpoint_mb=64)
    turns = [["hi there", "hello, I like tea."], ["what do you like?", ""]]
    ids, prefix_len = lm.encode(chat_prompt(turns), PREFIX)
    cache, logits = lm.runner.prefill(ids, prefix_len, head=False)
    assert logits is None
    checkpoint = lm.prefix_cache.longest_checkpoint(ids)
    assert checkpoint is not None and checkpoint.last_logits is None
    _, after = lm.runner.forward(torch.tensor([[ids[-1]]]), cache, positions=torch.tensor([[len(ids)]]))
    with torch.inference_mode():
        want = lm.model(input_ids=torch.tensor([ids + ids[-1:]])).logits[0, -1]
    assert torch.allclose(after[0, -1].float(), want.float(), atol=1e-4)
    exact = list(checkpoint.ids)
    _, logits = lm.runner.prefill(exact, prefix_len)
    with torch.inference_mode():
        want = lm.model(input_ids=torch.tensor([exact])).logits[0, -1]
    assert torch.allclose(logits.float(), want.float(), atol=1e-4)
    hits = lm.prefix_cache.checkpoint_hits
    _, logits = lm.runner.prefill(lm.encode(chat_prompt([turns[0], ["and bread?", ""]]), PREFIX)[0], prefix_len)
    assert lm.prefix_cache.checkpoint_hits == hits + 1  # the next turn starts from the logit-less checkpoint


def test_the_next_turn_prefills_only_what_is_new_and_gets_the_same_logits():
    """Turn after turn of one conversation: each prefill starts from the previous turn's checkpoint (the prompt up
    to its last two lines), feeds only the tokens after it, and gives the logits of a plain prefill of the whole
    prompt. A prompt that differs before the history (other persona) does not use the checkpoint."""
    from app.lm.tiny import build_tiny_lm, default_corpus

    lm = build_tiny_lm(default_corpus(), checkpoint_mb=64)
    fed = []
    forward = lm.runner.forward
    lm.runner.forward = lambda ids, *a, **kw: (fed.append(ids.shape[1]), forward(ids, *a, **kw))[1]
    turns = [["hi there", "hello, I like tea."], ["what do you like?", "tea and boats."],
             ["do you like bread?", "yes, fresh bread."], ["and space?", ""]]
    for n in range(1, len(turns) + 1):
        prompt = chat_prompt(turns[:n])
        ids, prefix_len = lm.encode(prompt, PREFIX)
        fed.clear()
        _, logits = lm.runner.prefill(ids, prefix_len)
        with torch.inference_mode():
            want = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(logits.float(), want.float(), atol=1e-4), n
        last_two = len(lm.tok("User: " + turns[n - 1][0] + "\nAssistant:", add_special_tokens=False).input_ids)
        if n > 1:  # from the previous checkpoint: the last exchange, then the open turn
            exchange = len(lm.tok(f"User: {turns[n - 2][0]}\nAssistant: {turns[n - 2][1]}\n",
                                  add_special_tokens=False).input_ids)
            assert fed == [exchange + last_two], n  # one forward; the checkpoint is cut back from its cache
    assert lm.prefix_cache.checkpoint_hits == 3
    # a prompt that is exactly a checkpoint: its stored logits, no forward, and a cache that goes on correctly
    ids = list(lm.prefix_cache.longest_checkpoint(ids).ids)
    fed.clear()
    cache, logits = lm.runner.prefill(ids, prefix_len)
    assert fed == []
    _, after = lm.runner.forward(torch.tensor([[ids[-1]]]), cache, positions=torch.tensor([[len(ids)]]))
    with torch.inference_mode():
        want = lm.model(input_ids=torch.tensor([ids + ids[-1:]])).logits[0]
    assert torch.allclose(logits.float(), want[-2].float(), atol=1e-4)
    assert torch.allclose(after[0, -1].float(), want[-1].float(), atol=1e-4)
    # Another persona: the history is the same, the text before it is not; only the constant prefix is reused.
    other = chat_prompt(turns).replace("I like tea.\nDialogue", "I like coffee.\nDialogue")
    ids, prefix_len = lm.encode(other, PREFIX)
    fed.clear()
    _, logits = lm.runner.prefill(ids, prefix_len)
    assert sum(fed) == len(ids) - prefix_len
    with torch.inference_mode():
        assert torch.allclose(logits.float(), lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), atol=1e-4)


def test_checkpoints_are_bounded_by_bytes_and_off_at_zero():
    from app.lm.prefix_cache import CachedPrefix, cache_bytes
    from app.lm.tiny import build_tiny_lm, default_corpus

    lm = build_tiny_lm(default_corpus(), checkpoint_mb=1)
    ids, prefix_len = lm.encode(chat_prompt([["hi there", "hello"], ["and you?", ""]]), PREFIX)
    cache, _ = lm.runner.prefill(ids, prefix_len)
    size = cache_bytes(cache)
    pool = PrefixCache(capacity=0, checkpoint_bytes=2 * size + 1)
    for i in range(3):
        pool.put_checkpoint(CachedPrefix((i, 1, 2), cache, torch.zeros(1)))
    assert pool.checkpoint_held == 2 * size  # the oldest went
    assert pool.longest_checkpoint((0, 1, 2, 3)) is None and pool.longest_checkpoint((2, 1, 2, 3)).ids == (2, 1, 2)
    assert pool.longest_checkpoint((2, 1, 2), longer_than=3) is None
    # the two kinds never stand in for each other: a scoring checkpoint has no logits and may hold bfloat16 KV
    pool.put_checkpoint(CachedPrefix((2, 1, 2, 3), cache, None, scored=(2, -1.0, 3)))
    assert pool.longest_checkpoint((2, 1, 2, 3, 4)).ids == (2, 1, 2)
    assert pool.longest_checkpoint((2, 1, 2, 3, 4), scoring=True).ids == (2, 1, 2, 3)

    off = build_tiny_lm(default_corpus())  # checkpoint_mb=0: a prefill stores nothing and feeds the rest at once
    fed = []
    forward = off.runner.forward
    off.runner.forward = lambda ids, *a, **kw: (fed.append(ids.shape[1]), forward(ids, *a, **kw))[1]
    off.runner.prefill(ids, prefix_len)
    assert fed[-1] == len(ids) - prefix_len and off.prefix_cache.checkpoint_held == 0


def test_fsb_pack_weights_decides_whether_the_weights_are_packed(tiny_lm, tmp_path, monkeypatch):
    """``FSB_PACK_WEIGHTS=off`` reaches the model runner through `load_lm` (a local model folder): the weights are
    never offered to `pack_linears`; on (the default) they are. A bad value names the variable."""
    import app.lm.decoding as decoding
    from app.lm import load_lm
    from app.settings import Settings

    assert Settings.load(env={}).pack_weights is True
    assert Settings.load(env={"FSB_PACK_WEIGHTS": "off"}).pack_weights is False
    with pytest.raises(ValueError, match="FSB_PACK_WEIGHTS must be on or off"):
        Settings.load(env={"FSB_PACK_WEIGHTS": "maybe"})
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tok.save_pretrained(tmp_path)
    offered = []
    monkeypatch.setattr(decoding, "pack_linears", lambda model, **kw: offered.append(model))  # returns None: nothing packed
    for on in (False, True):
        settings = Settings.load(env={"FSB_PACK_WEIGHTS": "on" if on else "off"}, model=str(tmp_path), device="cpu",
                                 dtype="bfloat16", batching=False, data_dir=tmp_path / "data")
        lm = load_lm(settings)
        assert lm.runner.pack is on
        assert len(offered) == int(on)
