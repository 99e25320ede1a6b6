"""The turn's other paths on the tiny model: a safety skill hands the reply to the alignment layer's refusal, an aligned
turn uses the alignment prompt, and long-term memory is written after a turn and read by the memory-chat skill."""
from __future__ import annotations

import pytest

from retrievers.embed import HashingEmbedder
from app.settings import REPO_ROOT

MSG = [{"role": "user", "content": "tell me how to pick a lock"}]


def make_bot(settings, lm, **changes):
    from app.server import build_bot

    return build_bot(settings.replace(**changes), lm=lm, embedder=HashingEmbedder())


def test_a_safety_skill_hands_the_reply_to_the_alignment_layers_refusal(settings, tiny_lm):
    bot = make_bot(settings, tiny_lm)
    stream = bot.turn(MSG, skill="safety-topic", max_tokens=6)
    text = stream.text()
    reply = stream.reply
    assert [s["step"] for s in reply.trace["steps"]] == ["select", "align", "generate"]
    assert reply.trace["steps"][1]["refusal"] is True
    note = bot.aligner.prompt.refusal_note_for(bot.skills.get("safety-topic").description)
    assert note in reply.prompt and reply.prompt.startswith(bot.aligner.prefix)
    start = bot.aligner.prompt.refusal.answer_start.strip()
    assert start and text.startswith(start)  # the refusal opens in the assistant's voice; the model continues it
    assert reply.skill == "safety-topic"


def ScriptedFacts(lm, facts: str, label: str):
    """The tiny model, except that the persona-extraction parser's answer is scripted (its prompt ends with the
    parser's output label), so the memory path can be checked word for word."""
    from tests.test_parsers import ScriptedParser

    return ScriptedParser(lm, label, facts)


def test_facts_the_user_reveals_are_remembered_and_come_back_in_the_memory_skill(settings, tiny_lm):
    from app.server import build_bot

    lm = ScriptedFacts(tiny_lm, "I have two dogs. I work nights as a nurse.", "User Facts:")
    bot = build_bot(settings.replace(memory=True), lm=lm, embedder=HashingEmbedder())
    sid = bot.store.create_session(user="dana")
    stream = bot.chat(sid, "I just got home from my night shift and walked my two dogs", skill="persona",
                      max_tokens=4)
    stream.text()
    assert stream.reply.trace["steps"][-1]["step"] == "generate"  # memory is extracted after the reply is out
    bot.wait_for_memory("dana")
    remember = stream.reply.trace["steps"][-1]
    assert remember["step"] == "remember" and remember["facts"] == ["I have two dogs.", "I work nights as a nurse."]
    stored = bot.store.messages(sid)[-1]["trace"]["steps"][-1]  # ... and its step joins the stored trace
    assert stored["step"] == "remember" and stored["facts"] == remember["facts"]
    assert [f.text for f in bot.knowledge.memory.list("dana")] == ["I have two dogs.", "I work nights as a nurse."]
    assert bot.knowledge.memory.list("someone-else") == []
    # a later turn of the memory-chat skill gets them as the user's memory
    stream = bot.chat(sid, "do you remember my dogs?", skill="msc", max_tokens=4)
    stream.text()
    memory = stream.reply.prompt.rsplit("User Memory:\n", 1)[1].split("Assistant Memory:")[0]
    assert "I have two dogs." in memory
    assert {p["source"] for p in stream.reply.passages} <= {f"memory:{f.id}" for f in
                                                             bot.knowledge.memory.list("dana")}


def test_facts_the_parser_copies_from_its_examples_are_not_remembered(settings, tiny_lm):
    """gemma-3-270m answered "Hi!" with its last example's facts ("I am a student. I take care of my grandmother."):
    a fact is kept only when it shares a word with what the user said."""
    from app.server import build_bot

    lm = ScriptedFacts(tiny_lm, "I am a student. I take care of my grandmother. I have two dogs.", "User Facts:")
    bot = build_bot(settings.replace(memory=True), lm=lm, embedder=HashingEmbedder())
    stream = bot.turn([{"role": "user", "content": "Hi! I just got back from walking my dogs."}], skill="persona",
                      max_tokens=3, user="lee")
    stream.text()
    bot.wait_for_memory("lee")
    remember = stream.reply.trace["steps"][-1]
    assert remember["facts"] == ["I have two dogs."]
    assert remember["dropped"] == ["I am a student.", "I take care of my grandmother."]
    assert [f.text for f in bot.knowledge.memory.list("lee")] == ["I have two dogs."]


def test_the_memory_rules_keep_first_person_facts_about_what_was_said():
    import yaml

    from app.bot import memory_facts, memory_statements

    messages = yaml.safe_load((REPO_ROOT / "prompts" / "messages.yaml").read_text())
    said = memory_statements("Hi! I'm Sam and I work as a nurse. What about you?", messages)
    assert said == "Hi! I'm Sam and I work as a nurse."
    written, kept = memory_facts("My name is Sam. I am a nurse. I am a student. Sam is nice. none", said, messages)
    assert written == ["My name is Sam.", "I am a nurse.", "I am a student.", "Sam is nice."]
    assert kept == ["My name is Sam.", "I am a nurse."]  # not first person: dropped; no word in common: dropped
    assert memory_statements("Where do you live?", messages) == ""
    assert memory_facts("I am 19.", memory_statements("I'm 19 and love it", messages), messages)[1] == ["I am 19."]


def test_no_user_means_nothing_is_remembered(settings, tiny_lm):
    lm = ScriptedFacts(tiny_lm, "I have a cat.", "User Facts:")
    from app.server import build_bot

    bot = build_bot(settings.replace(memory=True), lm=lm, embedder=HashingEmbedder())
    stream = bot.turn([{"role": "user", "content": "my cat is called Tom"}], skill="persona", max_tokens=3)
    stream.text()
    assert "remember" not in [s["step"] for s in stream.reply.trace["steps"]]
    assert not any(p.endswith("User Facts:") for p in lm.prompts)


def test_memory_extraction_waits_while_a_turn_is_before_its_first_token(settings, tiny_lm):
    """Extraction after a reply does not take the model from a turn that is still routing or prefilling: it starts
    once every turn in flight has streamed its first piece (decoding shares the batched model); a turn that reads
    the user's memory makes it start at once."""
    import time

    from app.server import build_bot

    lm = ScriptedFacts(tiny_lm, "I have a cat.", "User Facts:")
    bot = build_bot(settings.replace(memory=True), lm=lm, embedder=HashingEmbedder())
    bot.activity.limit_s = 30.0
    other = bot.turn([{"role": "user", "content": "hello there"}], skill="persona", max_tokens=3)  # not started
    assert (bot.activity.busy, bot.activity.starting) == (1, 1)
    stream = bot.turn([{"role": "user", "content": "my cat is called Tom"}], skill="persona", max_tokens=2,
                      user="dana")
    stream.text()
    time.sleep(0.6)
    assert bot.knowledge.memory.list("dana") == [] and not any(p.endswith("User Facts:") for p in lm.prompts)
    pieces = iter(other)
    next(pieces)  # the other turn streams its first piece: it is decoding now, and extraction may go
    assert (bot.activity.busy, bot.activity.starting) == (1, 0)
    deadline = time.monotonic() + 10
    while not bot.knowledge.memory.list("dana") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [f.text for f in bot.knowledge.memory.list("dana")] == ["I have a cat."]
    assert stream.reply.trace["steps"][-1]["waited_s"] >= 0.5
    list(pieces)
    assert bot.activity.busy == 0
    # a turn before its first token, but someone needs the memory now: no waiting
    busy = bot.turn([{"role": "user", "content": "hi again"}], skill="persona", max_tokens=2)
    again = bot.turn([{"role": "user", "content": "I have a dog called Rex."}], skill="persona", max_tokens=2,
                     user="lee")
    again.text()
    started = time.monotonic()
    bot.wait_for_memory("lee")
    assert time.monotonic() - started < 10 and again.reply.trace["steps"][-1]["step"] == "remember"
    assert again.reply.trace["steps"][-1]["waited_s"] < 5
    busy.close()
    assert bot.activity.busy == 0


def test_a_turn_counts_as_before_its_first_token_while_it_routes_and_parses(settings, tiny_lm):
    """Memory extraction from the last turn must not start while the next turn routes or runs its parser (the
    seconds before its stream exists): the turn holds its place in the bot's activity from its first step."""
    from app.server import build_bot

    bot = build_bot(settings, lm=tiny_lm, embedder=HashingEmbedder())
    seen = {}
    route, parse = bot.route, bot._parse

    def routing(*args, **kwargs):
        seen["route"] = (bot.activity.busy, bot.activity.starting)
        return route(*args, **kwargs)

    def parsing(*args, **kwargs):
        seen["parse"] = (bot.activity.busy, bot.activity.starting)
        return parse(*args, **kwargs)

    bot.route, bot._parse = routing, parsing
    stream = bot.turn([{"role": "user", "content": "i need a cheap hotel in the north ."}], skill="mwoz-hotel",
                      max_tokens=2)
    assert seen == {"route": (1, 1), "parse": (1, 1)}
    assert (bot.activity.busy, bot.activity.starting) == (1, 1)  # the stream holds the place until its first piece
    stream.text()
    assert (bot.activity.busy, bot.activity.starting) == (0, 0)

    def failing(*args, **kwargs):
        raise RuntimeError("the router broke")

    bot.route = failing
    with pytest.raises(RuntimeError):
        bot.turn([{"role": "user", "content": "hi"}])
    assert (bot.activity.busy, bot.activity.starting) == (0, 0)  # a turn that failed leaves no place behind


def test_a_turn_that_reads_memory_gets_the_jobs_queued_before_its_users_done_too(settings, tiny_lm):
    """One worker runs memory jobs in order: a turn that needs Lee's facts now must not wait behind Dana's job, or
    behind Lee's own earlier one, while they wait for a quiet moment (a turn before its first token holds it off)."""
    import time

    from app.server import build_bot

    lm = ScriptedFacts(tiny_lm, "I have a cat.", "User Facts:")
    bot = build_bot(settings.replace(memory=True), lm=lm, embedder=HashingEmbedder())
    bot.activity.limit_s = 60.0
    busy = bot.turn([{"role": "user", "content": "hello there"}], skill="persona", max_tokens=3)  # not started
    for user, text in (("dana", "my cat is called Tom"), ("lee", "I keep a cat too."), ("lee", "I like cats.")):
        bot.turn([{"role": "user", "content": text}], skill="persona", max_tokens=2, user=user).text()
    started = time.monotonic()
    bot.wait_for_memory("lee", timeout=20)
    assert time.monotonic() - started < 15
    assert [f.text for f in bot.knowledge.memory.list("lee")] == ["I have a cat."]  # the same fact, kept once
    assert [f.text for f in bot.knowledge.memory.list("dana")] == ["I have a cat."]  # ran first, as queued
    busy.close()
