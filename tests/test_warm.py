"""Start-up warming: every constant prompt head a turn can use is in the prefix cache before the first turn."""
from __future__ import annotations

import httpx

from retrievers import HashingEmbedder
from tests.conftest import LiveServer


def test_warm_caches_every_selector_skill_and_alignment_prefix_and_health_reports_it(settings, tiny_lm):
    from app.server import build_app, build_bot

    s = settings.replace(selector="best", safety=True)
    bot = build_bot(s, lm=tiny_lm, embedder=HashingEmbedder())
    prefixes = bot.constant_prefixes()
    kinds = {what.split(":")[0] for what, _ in prefixes}
    assert kinds == {"selector", "skill", "align"}
    assert {f"skill:{k.name}" for k in bot.skills.all(kind="parser")} <= {what for what, _ in prefixes}
    assert "selector:style" not in {what for what, _ in prefixes}  # never selected, never warmed
    with LiveServer(build_app(s, bot=bot, warm="now")) as server:
        warm = httpx.get(server.url + "/healthz").json()["warm"]
        assert warm["ready"] is True and warm["done"] == warm["total"] == len(prefixes)
    cache = tiny_lm.prefix_cache
    for what, text in prefixes:
        assert cache.get(tuple(tiny_lm.tok(text, add_special_tokens=True).input_ids)) is not None, what


def test_the_warm_up_pauses_while_a_turn_waits_for_its_first_token(settings, tiny_lm):
    """A turn that arrives while the server warms goes first: no prompt head is encoded until its first token."""
    import threading
    import time

    from app.server import build_bot

    bot = build_bot(settings.replace(selector="best", safety=True), lm=tiny_lm, embedder=HashingEmbedder())

    class Turn:  # what the bot's activity tracks: any object it can hold weakly
        pass

    turn, encoded, done = Turn(), [], []
    bot.activity.start(turn)
    worker = threading.Thread(target=lambda: done.append(bot.warm(lambda i, n, what: encoded.append(what))))
    worker.start()
    time.sleep(1.0)
    assert encoded == [] and not done  # waiting for the turn
    bot.activity.first_piece(turn)
    worker.join(timeout=60)
    assert done and len(encoded) == done[0] == len(bot.constant_prefixes())
