""""Why this reply" (app/explain.py): a turn trace rendered for the web chat, without a browser."""
from __future__ import annotations

from app.explain import explanation, explanation_text, score, step_bar, timings, title
from app.ui import sources_note, transcript

ROUTED = {
    "skill": "wow",
    "steps": [
        {"step": "safety", "skill": "persona", "flagged": False, "s": 0.2},
        {"step": "select", "skill": "wow", "method": "hybrid", "s": 0.5},
        {"step": "parse", "skill": "wow-parse", "target": "query", "output": "tomato sun hours", "s": 0.1},
        {"step": "retrieve", "retriever": "kb", "query": "tomato sun hours", "passages": [], "s": 0.05},
        {"step": "prompt", "examples": 4, "s": 0.05},
        {"step": "generate", "tokens": 40, "first_token_s": 0.4, "s": 1.0},
        {"step": "remember", "facts": ["I grow tomatoes."], "added": 1, "s": 0.3},
    ],
    "selection": {"skill": "wow", "method": "hybrid", "why": "the history selector chose it",
                  "scores": {"persona": -5.7, "wow": -5.1, "msc": -5.8, "ed": -6.0}, "margin": 0.6},
    "safety": {"skill": "persona", "flagged": False, "scores": {"persona": -5.6, "safety-harmful": -7.25}},
    "passages": [
        {"text": "Tomatoes need six to eight hours of sun.", "source": "kb:tomatoes.md#0",
         "title": "Growing tomatoes", "score": 0.0328},
        {"text": "I have a dog called Biscuit.", "source": "memory:7", "title": "", "score": 0.91},
        {"text": "News", "source": "https://example.com/jwst", "title": "JWST news", "score": 0.5, "untrusted": True},
    ],
}


def test_the_title_names_the_skill_and_counts_the_sources_and_the_note_starts_collapsed():
    note = explanation(ROUTED)
    assert note["role"] == "assistant"
    assert note["metadata"] == {"title": "Why this reply · skill: wow · 3 sources", "status": "done"}
    assert title({"skill": "persona", "passages": []}) == "Why this reply · skill: persona"
    assert title({"passages": [{"source": "kg"}]}, "wow") == "Why this reply · skill: wow · 1 source"


def test_the_route_shows_the_method_the_top_three_scores_and_the_safety_stage():
    text = explanation_text(ROUTED)
    assert "**Route:** `hybrid` → **wow** — the history selector chose it" in text
    assert "scores (top 3): **wow** −5.100 · persona −5.700 · msc −5.800" in text
    assert "ed −6.000" not in text  # only the top three
    assert "margin 0.600" in text
    assert "safety stage (last message alone): not flagged; **persona** −5.600 · safety\\-harmful −7.250" in text


def test_a_forced_skill_overruled_by_safety_and_a_trigger_are_shown():
    trace = {"skill": "safety-harmful", "steps": [{"step": "select", "s": 0.01}, {"step": "generate", "s": 0.5}],
             "selection": {"skill": "safety-harmful", "method": "trigger", "forced_skill": "assistant",
                           "overruled": "assistant", "trigger": r"\b(pipe ?bomb)`x", "scores": {}}}
    text = explanation_text(trace)
    assert "forced skill **assistant** was overruled by safety → **safety\\-harmful**" in text
    assert r"trigger: ``\b(pipe ?bomb)`x``" in text  # a code span, backslashes kept, fenced past its backtick
    assert "scores" not in text
    forced = {"selection": {"skill": "wow", "method": "forced", "forced_skill": "wow", "scores": {}}}
    assert "forced skill: **wow**" in explanation_text(forced)


def test_the_parser_output_the_sources_with_scores_and_the_memory_used_and_written():
    text = explanation_text(ROUTED)
    assert "**Parser:** wow\\-parse → query: “tomato sun hours”" in text
    assert "**Sources:** kb, query “tomato sun hours”" in text
    assert "1. Growing tomatoes · `kb:tomatoes.md#0` · score 0.033" in text
    assert "2. `memory:7` · score 0.910" in text
    assert "3. [JWST news](https://example.com/jwst) · `https://example.com/jwst` · score 0.500 · untrusted" in text
    assert "- used: `#7` I have a dog called Biscuit\\." in text
    assert "- written: 1 new of 1 fact: I grow tomatoes\\. (300 ms, after the reply)" in text


def test_memory_still_being_extracted_is_said_so_and_a_skipped_extraction_says_why():
    live = {**ROUTED, "steps": [s for s in ROUTED["steps"] if s["step"] != "remember"]}
    assert "still being extracted" in explanation_text(live, memory_pending=True)
    assert "written" not in explanation_text(live)  # no memory for this turn at all
    skipped = {"steps": [{"step": "remember", "facts": [], "added": 0, "skipped": "no statements in the message"}]}
    assert "- written: nothing (no statements in the message)" in explanation_text(skipped)
    failed = {"steps": [{"step": "remember", "error": "database is locked"}]}
    assert "- written: failed (database is locked)" in explanation_text(failed)


def test_the_step_bar_counts_each_step_once_and_splits_the_first_token():
    parts = dict(timings(ROUTED))
    assert parts["safety"] == 0.2 and abs(parts["select"] - 0.3) < 1e-9  # select's time contains the safety stage
    assert parts["first token"] == 0.4 and abs(parts["generate"] - 0.6) < 1e-9
    assert "remember" not in parts  # after the reply
    bar = step_bar(ROUTED)
    assert bar.count('<span title="') == 7
    assert "safety 200 ms" in bar and "generate 600 ms" in bar
    assert "**Steps:** 1.70 s in all" in explanation_text(ROUTED)
    assert step_bar({"steps": []}) == ""


def test_text_from_a_trace_cannot_become_markup_or_links():
    trace = {"passages": [{"text": "<img src=x onerror=alert(1)> [click](javascript:alert(1)) **bold**",
                           "source": "https://evil.example/a (b)", "title": "<b>t</b>", "score": "n/a"}],
             "steps": [{"step": "parse", "skill": "p", "target": "query", "output": "<script>x</script>"}]}
    text = explanation_text(trace)
    assert "<img" not in text and "<script>" not in text and "<b>" not in text
    assert "](javascript:" not in text and "\\*\\*bold\\*\\*" in text
    assert "](https://evil.example/a (b))" not in text  # a URL that would break the link stays code only
    assert score("n/a") == "n/a"


def test_a_stored_reply_reopened_gets_the_same_note_as_the_live_one():
    stored = [{"role": "user", "content": "how much sun?"},
              {"role": "assistant", "content": "Six hours.", "skill": "wow", "trace": ROUTED}]
    chat = transcript(stored)
    assert [m["role"] for m in chat] == ["user", "assistant", "assistant"]
    assert chat[2] == sources_note("wow", ROUTED["passages"], ROUTED) == explanation(ROUTED, "wow")
    old = transcript([{"role": "assistant", "content": "hi", "skill": "persona", "trace": {}}])  # an old row
    assert old[1]["metadata"]["title"] == "Why this reply · skill: persona"
    assert "**Route:** not recorded" in old[1]["content"] and "**Sources:** none" in old[1]["content"]
