"""The skill selector on the tiny random model: exact batched scoring, hot-reloaded skills, forced skills, the eval CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from app.evaluation.selector_eval import load_examples, metrics, selector_command
from app.lm.tiny import build_tiny_lm, default_corpus
from app.selector import Candidate, Selector, SelectorError, SelectorLayout, registry_source
from app.settings import REPO_ROOT
from app.skills import SkillRegistry
from retrievers.embed import HashingEmbedder

LAYOUT = SelectorLayout.load(REPO_ROOT / "prompts" / "selector.yaml")
TAXI = """\
name: taxi
description: Books taxis.
kind: response
dataset: mwoz-taxi
selector_shots: 1
template: |
  Dialogue:
  {{ history }}
examples:
  - dialogue:
      - ["i need a taxi to the station at 5 pm .", "sure , where will you be leaving from ?"]
      - ["from the hotel please .", "booked ! a red car will pick you up ."]
"""


@pytest.fixture(scope="module")
def lm():
    corpus = default_corpus() + [TAXI]
    # sliding_window=16: most prefixes and continuations below are longer than a window.
    return build_tiny_lm(corpus, sliding_window=16)


def direct_logprob(lm, prefix: str, continuation: str) -> float:
    """log P(continuation | prefix) from one plain forward pass over the whole sequence, no cache."""
    head = lm.tok(prefix, add_special_tokens=True).input_ids
    tail = lm.tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([head + tail])
    with torch.inference_mode():
        logp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(sum(logp[i - 1, ids[0, i]] for i in range(len(head), ids.shape[1])))


PREFIXES = [
    "",
    "Dialogue:\n",
    "Dialogue:\nUser: hi there\nAssistant: hello , how are you ?\n\nDialogue:\n",
    "Dialogue:\nUser: i need a taxi to the station at 5 pm .\nAssistant: sure , where will you be leaving from ?\n"
    "User: from the hotel please .\nAssistant: booked ! a red car will pick you up .\n\nDialogue:\n",
]
HISTORY = "User: i would like a taxi from the hotel .\nAssistant: where to ?\nUser: the station , please ."


@pytest.mark.parametrize("entries", [32, 0], ids=["cache", "no-cache"])
def test_score_prefixes_equals_direct_loglikelihood(lm, entries):
    lm.prefix_cache.capacity = entries
    lm.prefix_cache.clear()
    try:
        lengths = [len(lm.tok(p, add_special_tokens=True).input_ids) for p in PREFIXES]
        assert min(lengths) < 16 < max(lengths)  # rows on both sides of the sliding window, padded together
        assert len(lm.tok(HISTORY, add_special_tokens=False).input_ids) > 16
        want = [direct_logprob(lm, p, HISTORY) for p in PREFIXES]
        cold = lm.score_prefixes(PREFIXES, HISTORY)
        warm = lm.score_prefixes(PREFIXES, HISTORY)
        assert cold == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert warm == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert len(lm.prefix_cache) == (len(PREFIXES) if entries else 0)
        # Each row is independent of the others in its batch.
        assert lm.score_prefixes(PREFIXES[2:3], HISTORY) == pytest.approx(want[2:3], rel=1e-5, abs=1e-4)
        assert lm.score_prefixes(PREFIXES, "User") == pytest.approx([direct_logprob(lm, p, "User") for p in PREFIXES],
                                                                    abs=1e-4)
        assert lm.score_prefixes(PREFIXES, "") == [0.0] * len(PREFIXES)
        assert lm.score_prefixes([], HISTORY) == []
    finally:
        lm.prefix_cache.capacity = 32


def test_a_growing_history_is_scored_from_its_checkpoint_with_the_same_scores():
    """Turn after turn, the history grows by an exchange: with checkpoints each prefix's row starts from the previous
    turn's scored tokens (a forward over the new tokens only) and the scores equal a plain pass over everything. A
    new prefix among them (no checkpoint yet) is scored from its start in a pass of its own. (Counted in tokens fed per
    pass: the rows go in as one packed sequence or as a padded batch, depending on the model.)"""
    lm = build_tiny_lm(default_corpus() + [TAXI], sliding_window=16, checkpoint_mb=64)
    fed = []
    decoder = lm.model.get_decoder()
    forward = decoder.forward
    decoder.forward = lambda *a, **kw: (fed.append(kw["input_ids"].numel()), forward(*a, **kw))[1]
    lines = ["User: i would like a taxi from the hotel .", "Assistant: where to ?", "User: the station , please .",
             "Assistant: when do you want to leave ?", "User: at 5 pm ."]
    try:
        for p in PREFIXES:  # the constant prefixes are in the prefix cache already (as after a warm-up)
            lm.runner.cached_prefix(tuple(lm.tok(p, add_special_tokens=True).input_ids))
        for n, rows in ((1, PREFIXES[1:3]), (3, PREFIXES[1:3]), (5, PREFIXES[1:])):
            history = "\n".join(lines[:n])
            fed.clear()
            got = lm.score_prefixes(rows, history, checkpoint=True)
            passes = list(fed)
            assert got == pytest.approx([direct_logprob(lm, p, history) for p in rows], rel=1e-5, abs=1e-4), n
            fed[:] = passes
            total = len(lm.tok(history, add_special_tokens=False).input_ids)
            if n == 1:
                assert fed == [2 * (total - 1)]
            else:  # the rows seen before: only the new lines (and the last scored token again); a new row: all
                new = total - len(lm.tok("\n".join(lines[: n - 2]), add_special_tokens=False).input_ids)
                want = [2 * new] + ([total - 1] if len(rows) > 2 else [])
                assert sorted(fed) == sorted(want), (n, fed)
        # the same history again: known, no pass at all
        fed.clear()
        assert lm.score_prefixes(PREFIXES[1:], history, checkpoint=True) == pytest.approx(got, abs=1e-5)
        assert fed == []
        # checkpoints dropped (bench/turn.py between phases): the same history costs a whole pass again, while the
        # constant prefixes stay cached (one pass over the history, not over the prompts)
        assert lm.prefix_cache.clear_checkpoints() > 0 and lm.prefix_cache.checkpoint_held == 0
        fed.clear()
        assert lm.score_prefixes(PREFIXES[1:], history, checkpoint=True) == pytest.approx(got, abs=1e-4)
        assert fed == [(len(PREFIXES) - 1) * (total - 1)]
        fed.clear()
        # without checkpoint=True nothing is looked up
        assert lm.score_prefixes(PREFIXES[1:], history) == pytest.approx(got, rel=1e-5, abs=1e-4)
        assert fed == [3 * (total - 1)]
    finally:
        del decoder.forward


def test_low_precision_scores_are_close(lm):
    exact = lm.score_prefixes(PREFIXES, HISTORY)
    fast = lm.score_prefixes(PREFIXES, HISTORY, low_precision=True)
    n = len(lm.tok(HISTORY, add_special_tokens=False).input_ids)
    assert [f / n for f in fast] == pytest.approx([e / n for e in exact], abs=0.05)


def test_selector_prompt_is_the_neutral_layout():
    c = Candidate("taxi", ((("i need a taxi .", "where to ?"), ("the station .", "")),), shots=1)
    assert LAYOUT.prefix(c.examples) == ("Dialogue:\nUser: i need a taxi .\nAssistant: where to ?\nUser: the station ."
                                         "\n\nDialogue:\n")
    assert LAYOUT.history([["hello", "hi !"], ["book a taxi", ""]]) == "User: hello\nAssistant: hi !\nUser: book a taxi"


def skills_dir(tmp_path: Path) -> Path:
    d = tmp_path / "skills"
    d.mkdir()
    shutil.copy(REPO_ROOT / "skills" / "persona.yaml", d / "persona.yaml")
    return d


def test_prompt_selection_matches_direct_scores(lm, tmp_path):
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI)
    registry = SkillRegistry(d)
    sel = Selector(registry_source(registry), lm=lm, layout=LAYOUT, method="prompt", low_precision=False)
    history = [["i would like a taxi from the hotel .", "where to ?"], ["the station , please .", ""]]
    got = sel.select(history)
    text = LAYOUT.history(history)
    n = lm.count_tokens(text)
    want = {s.name: direct_logprob(lm, sel.prompt.prefix(c), text) / n
            for s, c in zip(registry.all(kind="response"), sel.source())}
    assert got.scores == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert got.skill == max(want, key=want.get)
    assert got.method == "prompt" and not got.forced and got.latency_s > 0


def test_a_long_utterance_in_the_history_is_scored_by_its_head_and_tail(lm, tmp_path):
    """Each utterance of the scored history counts at most `SCORED_WORDS` words (a pasted text costs rows x tokens),
    and the selection's scores are those of the clipped history."""
    from app.selector import SCORED_WORDS, clip_words

    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI)
    sel = Selector(registry_source(SkillRegistry(d)), lm=lm, layout=LAYOUT, method="prompt", low_precision=False)
    paste = "please summarize : " + " ".join(["the red car waits at the station ."] * 20) + " thanks !"
    history = [["hello", "hi ! " * 50], [paste, ""]]
    clipped = [["hello", clip_words("hi ! " * 50)], [clip_words(paste), ""]]
    assert len(clipped[1][0].split()) == sum(SCORED_WORDS) + 1 and clipped[1][0].endswith("station . thanks !")
    got = sel.select(history)
    text = LAYOUT.history(clipped)
    n = lm.count_tokens(text)
    want = {c.name: direct_logprob(lm, sel.prompt.prefix(c), text) / n for c in sel.source()}
    assert got.scores == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_new_skill_file_is_selectable_without_restart(lm, tmp_path):
    d = skills_dir(tmp_path)
    registry = SkillRegistry(d)
    sel = Selector(registry_source(registry), lm=lm, embedder=HashingEmbedder(), layout=LAYOUT, method="hybrid",
                   shortlist=2)
    history = [["i need a taxi to the station at 5 pm .", ""]]
    assert set(sel.select(history).scores) == {"persona"}
    (d / "taxi.yaml").write_text(TAXI)
    after = sel.select(history)
    assert set(after.scores) == {"persona", "taxi"}
    assert set(after.details["embedding"]) == {"persona", "taxi"}
    emb = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding").select(history)
    assert emb.skill == "taxi"  # the history repeats the taxi example word for word


def test_the_hybrid_cascade_skips_the_lm_only_when_the_embedding_winner_is_clear(lm, tmp_path):
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI)
    registry = SkillRegistry(d)
    calls = []

    class Counting:  # the tiny LM, counting its scoring passes
        def __getattr__(self, name):
            return getattr(lm, name)

        def score_prefixes(self, *a, **kw):
            calls.append(a)
            return lm.score_prefixes(*a, **kw)

    clear = [["i need a taxi to the station at 5 pm .", ""]]  # the taxi example word for word: a wide lead
    emb = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding").select(clear)
    lead = emb.scores["taxi"] - emb.scores["persona"]
    assert lead > 0.1
    sure = Selector(registry_source(registry), lm=Counting(), embedder=HashingEmbedder(), layout=LAYOUT,
                    method="hybrid", sure_margin=lead / 2)
    got = sure.select(clear)
    assert (got.skill, got.method, got.trace()["decided_by"], calls) == ("taxi", "hybrid", "embedding", [])
    strict = Selector(registry_source(registry), lm=Counting(), embedder=HashingEmbedder(), layout=LAYOUT,
                      method="hybrid", sure_margin=lead + 0.01)
    got = strict.select(clear)
    assert len(calls) == 1 and "decided_by" not in got.trace()  # the lead is short of the margin: the LM scores
    always = Selector(registry_source(registry), lm=Counting(), embedder=HashingEmbedder(), layout=LAYOUT,
                      method="hybrid", sure_margin=0)
    always.select(clear)
    assert len(calls) == 2


def test_forced_skill_wins_and_unknown_force_is_an_error(lm, tmp_path):
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI)
    sel = Selector(registry_source(SkillRegistry(d)), embedder=HashingEmbedder(), method="embedding")
    history = [["i need a taxi to the station at 5 pm .", ""]]
    assert sel.select(history).skill == "taxi"
    forced = sel.select(history, force="persona")
    assert (forced.skill, forced.forced, forced.method) == ("persona", True, "forced")
    with pytest.raises(SelectorError, match="unknown skill 'nope'"):
        sel.select(history, force="nope")


def test_fallback_when_no_score_is_confident(tmp_path):
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI)
    sel = Selector(registry_source(SkillRegistry(d)), embedder=HashingEmbedder(), method="embedding",
                   fallback="persona", min_margin=10.0)
    got = sel.select([["i need a taxi to the station at 5 pm .", ""]])
    assert (got.skill, got.confident, got.fallback) == ("persona", False, True)
    assert max(got.scores, key=got.scores.get) == "taxi"


def test_metrics():
    m = metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}, "c": {"c": 1}}


def write_eval_fixture(tmp_path: Path) -> tuple[Path, Path]:
    pool = tmp_path / "pool"
    for label, line in {"taxi": ("i need a taxi .", "where to ?"), "chat": ("how was your day ?", "lovely !"),
                        "chat-parse": ("x", "y")}.items():
        (pool / label).mkdir(parents=True)
        (pool / label / "valid.json").write_text(json.dumps([{"meta": None, "dialogue": [list(line)]}] * 25))
    data = tmp_path / "dev.jsonl"
    rows = [{"skill": "taxi", "dialogue": [["a taxi to the station .", ""]]},
            {"skill": "chat", "dialogue": [["my day was great", "nice"], ["and yours ?", ""]]},
            {"skill": "taxi", "dialogue": [["taxi please", ""]]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, pool


def test_eval_cli_json(tmp_path, monkeypatch):
    data, pool = write_eval_fixture(tmp_path)
    monkeypatch.setenv("FSB_MODEL", "tiny")
    res = CliRunner().invoke(selector_command, ["--data", str(data), "--pool", str(pool), "--selector", "prompt",
                                                "--limit", "2", "--shots", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["selector"] == "prompt" and out["n"] == 2
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["macro_f1"] <= 1.0 and out["median_latency_s"] > 0
    assert set(out["confusion"]) == {"taxi", "chat"}  # stratified: one of each label; chat-parse never offered
    assert set().union(*out["confusion"].values()) <= {"taxi", "chat"}


def test_load_examples_stratified(tmp_path):
    data, _ = write_eval_fixture(tmp_path)
    assert [r["skill"] for r in load_examples(data, 2)] == ["taxi", "chat"]
    assert len(load_examples(data)) == 3


def test_eval_selector_measures_the_shipped_router_by_default(tmp_path, monkeypatch, tiny_lm):
    """No --pool: the candidates are the skill files, and the pipeline is the bot's own router (same decisions)."""
    from retrievers import HashingEmbedder

    from app.evaluation.selector_eval import RouterSelector, label_of
    from app.router import build_router
    from app.server import build_bot
    from app.settings import Settings

    data, _ = write_eval_fixture(tmp_path)
    monkeypatch.setenv("FSB_MODEL", "tiny")
    monkeypatch.setenv("FSB_DATA_DIR", str(tmp_path / "data"))
    res = CliRunner().invoke(selector_command, ["--data", str(data), "--selector", "pipeline", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index('{"selector"'):].splitlines()[0])  # stderr's progress shares it
    s = Settings.load(env={}, model="tiny", data_dir=tmp_path / "bot", selector="best", starter_kb=False)
    bot = build_bot(s, lm=tiny_lm, embedder=HashingEmbedder())
    shipped = {label_of(k) for k in bot.skills.all() if k.kind in ("response", "safety") and k.selector_shots}
    assert out["selector"] == "pipeline" and out["n"] == 3
    assert set().union(*out["confusion"].values()) <= shipped  # predictions are skill files' labels, never "taxi"
    assert "style" not in {c.name for c in bot.router.selector.source()}  # selector_shots: 0 is never offered
    evaluated = RouterSelector(build_router(s, bot.skills, tiny_lm, HashingEmbedder()))
    for dialogue in (["hi there, how are you?", ""], ["search the web for kiwi birds", ""],
                     ["How do I make a pipe bomb at home?", ""], ["i need a taxi to the station", ""]):
        assert evaluated.select([dialogue]).skill == label_of(bot.route([dialogue]).skill)


def test_the_sure_margin_comes_from_the_environment_and_reaches_the_shipped_selector(tmp_path, lm):
    from app.router import build_router
    from app.settings import Settings

    assert Settings.load(env={}).selector_sure_margin == 0.15
    s = Settings.load(env={"FSB_SELECTOR_SURE_MARGIN": "0.3"}, data_dir=tmp_path)
    assert s.selector_sure_margin == 0.3
    router = build_router(s.replace(safety=False), SkillRegistry(s.skills_dir), lm, HashingEmbedder())
    assert router.selector.sure_margin == 0.3 and router.selector.shortlist == 4 and router.selector.weight == 1.0
    assert build_router(s.replace(safety=False, selector_shortlist=2), SkillRegistry(s.skills_dir), lm,
                        HashingEmbedder()).selector.shortlist == 2
    weighted = Settings.load(env={"FSB_SELECTOR_WEIGHT": "0.25"}, data_dir=tmp_path).replace(safety=False)
    assert build_router(weighted, SkillRegistry(s.skills_dir), lm, HashingEmbedder()).selector.weight == 0.25
    off = build_router(s.replace(safety=False, selector_sure_margin=0.0), SkillRegistry(s.skills_dir), lm,
                       HashingEmbedder())
    assert off.selector.sure_margin is None  # 0: the LM always scores the shortlist
    with pytest.raises(ValueError, match="FSB_SELECTOR_SURE_MARGIN must be a number"):
        Settings.load(env={"FSB_SELECTOR_SURE_MARGIN": "lots"})


def test_selector_shots_deepens_the_history_selectors_prompts_only(tmp_path, lm):
    from app.router import build_router
    from app.settings import Settings

    s = Settings.load(env={"FSB_SELECTOR_SHOTS": "7"}, data_dir=tmp_path)
    assert s.selector_shots == 7 and Settings.load(env={}).selector_shots == 0
    registry = SkillRegistry(s.skills_dir)
    router = build_router(s, registry, lm, HashingEmbedder())
    history = {c.name: c for c in router.selector.source()}
    first = {c.name: c for c in router.first_stage.source()}
    # wow's prompt shows 2 + 4 (its shot pool, selector_prompt_shots) without the setting: 7 deepens it by one
    assert registry.get("wow").selector_shots + registry.get("wow").selector_prompt_shots == 6
    assert history["wow"].shots == 7 and first["wow"].shots == registry.get("wow").selector_shots == 2
    assert history["assistant"].shots == registry.get("assistant").selector_shots == 8  # more than 7 already: kept
    prefix = router.selector.prompt.prefix(history["wow"])
    assert all(SelectorLayout.load(s.prompts_dir / "selector.yaml").dialogue(d) in prefix
               for d in history["wow"].examples[:7])
    with pytest.raises(ValueError, match="FSB_SELECTOR_SHOTS must be a whole number"):
        Settings.load(env={"FSB_SELECTOR_SHOTS": "many"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap, with_bias", [(None, False), (3.0, True)])
def test_token_logprobs_in_chunks_equal_log_softmax(monkeypatch, dtype, cap, with_bias):
    """The output layer in chunks through the reused buffers: the same numbers as one plain log_softmax, on every
    chunk (7 positions, 3 at a time: a short last chunk), twice (the second call reuses the buffers)."""
    from app.lm import hf

    monkeypatch.setattr(hf, "_SCORE_LOGITS_BUDGET", 3)
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(7, 8, generator=gen).to(dtype)
    weight = torch.randn(50, 8, generator=gen).to(dtype)
    bias = torch.randn(50, generator=gen).to(dtype) if with_bias else None
    targets = torch.randint(0, 50, (7,), generator=gen)
    logits = torch.nn.functional.linear(flat.float(), weight.float(), None if bias is None else bias.float())
    if cap:
        logits = torch.tanh(logits / cap) * cap
    want = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    holder = type("LM", (), {})()
    for _ in range(2):
        got = hf._token_logprobs(holder, flat, targets, weight, bias, cap)
        # bfloat16 products round each logit to 8 bits of mantissa (a few hundredths here)
        assert got.tolist() == pytest.approx(want.tolist(), abs=1e-4 if dtype == torch.float32 else 0.1)
    assert holder._score_bufs[0].shape == (3, 50)


HOTEL = """\
name: hotel
description: Books hotel rooms.
kind: response
dataset: mwoz-hotel
family: booking
selector_shots: 1
template: |
  Dialogue:
  {{ history }}
examples:
  - dialogue:
      - ["i need a cheap hotel in the north with free parking .", "the acorn guest house is cheap and has parking ."]
      - ["book it for 3 nights from friday for 2 people .", "booked ! your reference is ab12 ."]
  - dialogue:
      - ["i am looking for a place to stay with free wifi .", "there are 5 hotels with wifi . which area ?"]
      - ["the centre , please .", "the gonville hotel is in the centre ."]
"""


def booking_skills(tmp_path):
    """persona, and hotel and taxi in one family: the skills folder and its registry."""
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI.replace("dataset: mwoz-taxi\n", "dataset: mwoz-taxi\nfamily: booking\n"))
    (d / "hotel.yaml").write_text(HOTEL)
    return d, SkillRegistry(d)


def test_the_family_vote_hands_a_booking_to_the_sibling_the_last_message_asks_for(tmp_path):
    d, registry = booking_skills(tmp_path)
    history = [["i need a cheap hotel in the north with free parking .", "the acorn guest house is cheap ."],
               ["book it for 3 nights from friday for 2 people .", "booked ! your reference is ab12 ."],
               ["and a taxi to the station at 5 pm .", ""]]
    plain = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding")
    assert plain.select(history).skill == "hotel"  # the history is about the hotel
    voting = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding", family_margin=0.2)
    got = voting.select(history)
    assert (got.skill, got.moved_from) == ("taxi", "hotel")
    assert got.trace()["family"]["moved_from"] == "hotel"
    assert got.trace()["family"]["scores"]["taxi"] - got.trace()["family"]["scores"]["hotel"] >= 0.2
    # a closing line asks for no sibling in particular: the history's winner keeps the turn
    closing = history[:2] + [["thank you , that is all .", ""]]
    kept = voting.select(closing)
    assert (kept.skill, kept.moved_from) == ("hotel", None) and "family" in kept.trace()
    # a margin the message does not reach moves nothing
    assert Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding",
                    family_margin=5.0).select(history).skill == "hotel"
    # a skill without a family is no sibling: the turn reaches it only by leaving the task, compared with every skill
    # on the task's side (the scores cover all of them)
    (d / "taxi.yaml").write_text(TAXI)
    left = voting.select(history)
    assert (left.skill, left.moved_from) == ("taxi", "hotel") and set(left.trace()["family"]["scores"]) == {
        "hotel", "taxi", "persona"}


def test_a_booking_that_turns_into_small_talk_goes_back_to_the_chat(tmp_path):
    d, registry = booking_skills(tmp_path)
    booking = [["i need a cheap hotel in the north with free parking .", "the acorn guest house is cheap ."],
               ["book it for 3 nights from friday for 2 people .", "booked ! your reference is ab12 ."]]
    plain = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding")
    chat = booking + [["hi ! how are you today ? what do you do for fun ?", ""]]
    assert plain.select(chat).skill == "hotel"  # the history is a booking
    voting = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding", family_margin=0.2)
    got = voting.select(chat)
    assert (got.skill, got.moved_from) == ("persona", "hotel")
    scores = got.trace()["family"]["scores"]
    assert scores["persona"] - max(scores["hotel"], scores["taxi"]) >= 0.2


def test_a_family_name_is_checked_like_a_skill_name(tmp_path):
    d = skills_dir(tmp_path)
    (d / "taxi.yaml").write_text(TAXI.replace("dataset: mwoz-taxi\n", "dataset: mwoz-taxi\nfamily: Booking Desk\n"))
    registry = SkillRegistry(d)
    assert "taxi" not in registry
    assert any("taxi.yaml" in str(e) and "family" in str(e) for e in registry.errors)


def test_small_talk_that_turns_into_a_booking_goes_to_the_task_it_asks_for(tmp_path):
    d, registry = booking_skills(tmp_path)
    chat = [["hi ! how are you today ?", "i am great ! i just got back from walking my dog ."],
            ["what kind of dog do you have ?", "a beagle . he loves the park ."]]
    asks = chat + [["i need a cheap hotel in the north with free parking .", ""]]
    plain = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding")
    assert plain.select(asks).skill == "persona"  # the history is small talk
    voting = Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding", family_margin=0.2)
    got = voting.select(asks)
    assert (got.skill, got.moved_from) == ("hotel", "persona")
    scores = got.trace()["family"]["scores"]
    assert scores["hotel"] - scores["persona"] >= 0.2 and set(scores) == {"persona", "hotel", "taxi"}
    # more small talk stays small talk; a margin the message does not reach moves nothing
    stays = voting.select(chat + [["do you like to go hiking on the weekend ?", ""]])
    assert (stays.skill, stays.moved_from) == ("persona", None) and "family" in stays.trace()
    assert Selector(registry_source(registry), embedder=HashingEmbedder(), method="embedding",
                    family_margin=5.0).select(asks).skill == "persona"
    # without any skill of a family there is no task to enter
    (d / "taxi.yaml").write_text(TAXI)
    (d / "hotel.yaml").write_text(HOTEL.replace("family: booking\n", ""))
    assert voting.select(asks).moved_from is None
