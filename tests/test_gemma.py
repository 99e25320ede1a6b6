"""End to end on the embedded default model, gemma-3-270m base (converted once, then cached in the data directory).

These check properties, not wording: non-empty, stopped cleanly, identical with and without the prefix cache.
"""
from __future__ import annotations

import openai
import pytest

from app.skills import SkillRegistry
from app.settings import REPO_ROOT
from tests.conftest import LiveServer

pytestmark = pytest.mark.gemma


def persona_prompt(lm, user_turn: str):
    skill = SkillRegistry(REPO_ROOT / "skills").get("persona")
    return skill, skill.prompt({"dialogue": [[user_turn, ""]]}, budget_tokens=2048, count_tokens=lm.count_tokens)


def test_gemma_greedy_output_with_prefix_cache_equals_output_without(gemma_lm):
    skill, prompt = persona_prompt(gemma_lm, "hi! what do you like to do on weekends?")
    assert gemma_lm.count_tokens(prompt.prefix) > 512  # past gemma's sliding window: the cache handles both layer kinds
    gemma_lm.prefix_cache.clear()
    cached = ["".join(gemma_lm.generate(prompt.text, stop=skill.stop, max_new_tokens=24, prefix=prompt.prefix))
              for _ in range(2)]
    cache = gemma_lm.prefix_cache
    assert cache.hits + cache.checkpoint_hits >= 1  # the second run started from the first one's KV (either kind)
    cache.clear()
    (cache.capacity, capacity), (cache.checkpoint_bytes, held) = (0, cache.capacity), (0, cache.checkpoint_bytes)
    try:  # nothing cached at all
        plain = "".join(gemma_lm.generate(prompt.text, stop=skill.stop, max_new_tokens=24, prefix=prompt.prefix))
    finally:
        cache.capacity, cache.checkpoint_bytes = capacity, held
    assert cached[0] == cached[1] == plain
    assert plain.strip() and "\n" not in plain


def test_gemma_chat_completion_through_the_server(tmp_path, gemma_lm):
    from app.server import build_app, build_bot
    from app.settings import Settings

    settings = Settings.load(env={}, data_dir=tmp_path / "data")
    with LiveServer(build_app(settings, bot=build_bot(settings, lm=gemma_lm))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hello! do you have any pets?"}]
        reply = client.chat.completions.create(model="fsb", messages=messages)
        text = reply.choices[0].message.content
        assert text.strip() and "\n" not in text and "User:" not in text and "Assistant:" not in text
        assert reply.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="fsb", messages=messages, stream=True))
        assert streamed == text
