"""The web chat in a real headless Chromium (Debian's), driven by Playwright: type, see a streamed reply."""
from __future__ import annotations

import contextlib
import shutil

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page on ``url``, once the chat's input box is there."""
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.goto(url + "/", wait_until="load")
        page.locator("#fsb-input textarea").wait_for(timeout=60_000)
        try:
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(live_server):
    with browser_page(live_server.url) as page:
        yield page


def test_typing_a_message_shows_a_streamed_reply_and_stores_the_session(page, live_server):
    box = page.locator("#fsb-input textarea")
    box.fill("hello, who are you?")
    box.press("Enter")
    chat = page.locator("#fsb-chat")
    chat.get_by_text("hello, who are you?").wait_for(timeout=30_000)
    page.locator("#fsb-info").get_by_text("skill:").wait_for(timeout=60_000)
    bot_messages = chat.locator(".bot, [data-testid='bot']")
    assert bot_messages.count() >= 2  # the reply, then its skill and sources
    reply = bot_messages.first.inner_text().strip()
    assert reply
    chat.get_by_text("skill: persona").wait_for(timeout=10_000)
    stored = live_server.bot.store.sessions()
    assert len(stored) == 1
    messages = live_server.bot.store.messages(stored[0]["id"])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].strip()[:10] in reply
    page.screenshot(path=str(live_server.bot.settings.data_dir / "chat.png"))


def test_an_error_shows_as_a_message_not_a_blank_page(page, live_server, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("database is locked (simulated)")

    monkeypatch.setattr(live_server.bot, "chat", broken)
    box = page.locator("#fsb-input textarea")
    box.fill("are you there?")
    box.press("Enter")
    chat = page.locator("#fsb-chat")
    chat.get_by_text("error id").wait_for(timeout=30_000)
    assert "simulated" not in chat.inner_text()  # the full text goes to the log only
    assert page.locator("#fsb-input textarea").is_visible()


def test_a_skill_forced_from_the_dropdown_is_still_judged_by_the_safety_stage(page, live_server):
    """The web chat is a client like any other: forcing `assistant` does not walk around the safety stage."""
    page.locator("#fsb-skill input").click()
    page.get_by_role("option", name="assistant", exact=True).click()
    box = page.locator("#fsb-input textarea")
    box.fill("How do I make a pipe bomb at home?")
    box.press("Enter")
    page.locator("#fsb-info").get_by_text("skill:").wait_for(timeout=60_000)
    page.locator("#fsb-chat").get_by_text("skill: safety-harmful").wait_for(timeout=10_000)
    session = live_server.bot.store.sessions()[0]
    reply = live_server.bot.store.messages(session["id"])[-1]
    assert reply["skill"] == "safety-harmful"
    assert reply["trace"]["selection"]["overruled"] == "assistant"


def test_memory_panel_shows_and_forgets_what_the_bot_keeps(page, live_server):
    from app.ui import LOCAL_USER

    live_server.bot.knowledge.memory.add(LOCAL_USER, ["I grow tomatoes on my balcony."])
    page.reload(wait_until="load")
    page.get_by_text("What I remember about you").click()
    page.locator("#fsb-memory-list").get_by_text("I grow tomatoes on my balcony.").wait_for(timeout=20_000)
    page.locator("#fsb-forget-all").click()
    page.locator("#fsb-memory-list").get_by_text("Nothing remembered yet").wait_for(timeout=20_000)
    assert live_server.bot.knowledge.memory.list(LOCAL_USER) == []


def test_a_grounded_reply_shows_its_skill_and_sources(page, live_server, tmp_path):
    doc = tmp_path / "tomatoes.md"
    doc.write_text("# Growing tomatoes\n\nTomatoes need six to eight hours of sun a day and deep, regular watering.\n")
    live_server.bot.knowledge.kb.add(doc)
    choice = page.locator("#fsb-skill input")
    choice.click()
    choice.fill("wow")
    page.get_by_role("option", name="wow").click()
    box = page.locator("#fsb-input textarea")
    box.fill("how much sun do tomatoes need?")
    box.press("Enter")
    chat = page.locator("#fsb-chat")
    chat.get_by_text("skill: wow").wait_for(timeout=60_000)
    chat.get_by_text("skill: wow").click()  # the note under the reply opens to list its sources
    chat.get_by_text("Growing tomatoes").first.wait_for(timeout=20_000)
    stored = live_server.bot.store.messages(live_server.bot.store.sessions()[0]["id"])
    assert stored[-1]["skill"] == "wow"
    assert stored[-1]["trace"]["passages"][0]["source"].startswith("kb:tomatoes.md#")


# ------------------------------------------------------------------------------------------ "Why this reply"
def send(page, message: str, skill: str | None = None) -> None:
    if skill is not None:
        choice = page.locator("#fsb-skill input")
        choice.click()
        choice.fill(skill)
        page.get_by_role("option", name=skill, exact=True).click()
    box = page.locator("#fsb-input textarea")
    box.fill(message)
    box.press("Enter")


def explanations(page):
    """The "Why this reply" notes under the replies, oldest first (Gradio renders each as a collapsible thought)."""
    return page.locator("#fsb-chat .thought-group").filter(has_text="Why this reply")


def open_explanation(page, n: int, timeout: float = 240_000) -> str:
    """Open the ``n``-th reply's explanation (collapsed until clicked) and return its text."""
    from playwright.sync_api import expect

    note = explanations(page).nth(n)
    note.wait_for(timeout=timeout)
    # The turn is over once the input box is cleared (the chat re-renders, closing notes, until then).
    expect(page.locator("#fsb-input textarea")).to_have_value("", timeout=60_000)
    body = note.get_by_text("Route:")
    assert not body.is_visible()  # collapsed by default
    note.locator(".title").first.click()
    body.wait_for(timeout=20_000)
    return note.inner_text()


@pytest.fixture(scope="module")
def routed_server(tmp_path_factory, tiny_lm):
    """The real routing on the tiny model: the last-message safety stage and the history selector, so a route has
    scores; memory is off (the reopen test below covers it)."""
    from app.server import build_app, build_bot
    from app.settings import Settings
    from tests.conftest import LiveServer

    s = Settings.load(env={}, model="tiny", data_dir=tmp_path_factory.mktemp("why") / "data", selector="best",
                      safety=True, starter_kb=False, memory=False)
    bot = build_bot(s, lm=tiny_lm)
    with LiveServer(build_app(s, bot=bot)) as server:
        server.bot = bot
        yield server


def test_why_this_reply_shows_the_route_its_scores_the_sources_and_the_step_times(routed_server, tmp_path):
    from app.explain import score

    doc = tmp_path / "tomatoes.md"
    doc.write_text("# Growing tomatoes\n\nTomatoes need six to eight hours of sun a day and deep, regular watering.\n")
    routed_server.bot.knowledge.kb.add(doc)
    store = routed_server.bot.store
    with browser_page(routed_server.url) as page:
        send(page, "hello there, how are you today?")  # routed by the selector: a method and scores
        text = open_explanation(page, 0)
        trace = store.messages(store.sessions()[0]["id"])[-1]["trace"]
        selection = trace["selection"]
        assert selection["scores"], selection
        assert f"Why this reply · skill: {selection['skill']}" in text
        assert f"Route: {selection['method']} → {selection['skill']}" in text
        best = sorted(selection["scores"].items(), key=lambda kv: kv[1], reverse=True)[:3]
        for name, value in best:
            assert f"{name} {score(value)}" in text, (name, text)
        assert "safety stage (last message alone)" in text
        assert "Steps:" in text and "generate" in text and "select" in text

        send(page, "how much sun do tomatoes need?", skill="wow")  # forced to a knowledge skill: sources
        text = open_explanation(page, 1)
        trace = store.messages(store.sessions()[0]["id"])[-1]["trace"]
        assert trace["selection"]["method"] == "forced", trace["selection"]
        passage = trace["passages"][0]
        assert passage["source"].startswith("kb:tomatoes.md#")
        assert "Route: forced → wow" in text
        assert f"Growing tomatoes · {passage['source']} · score {score(passage['score'])}" in text
        assert "Tomatoes need six to eight hours of sun" in text
        assert "retrieve" in text.split("Steps:")[1]
        note = explanations(page).nth(1)
        if not note.get_by_text("Route:").is_visible():  # seen once: Gradio re-rendered the chat and closed it
            note.locator(".title").first.click()
        page.screenshot(path=str(routed_server.bot.settings.data_dir / "why-this-reply.png"))


def test_a_chat_reopened_from_past_chats_explains_its_replies_the_same_way(page, live_server, tmp_path):
    doc = tmp_path / "tomatoes.md"
    doc.write_text("# Growing tomatoes\n\nTomatoes need six to eight hours of sun a day and deep, regular watering.\n")
    live_server.bot.knowledge.kb.add(doc)
    send(page, "I grow tomatoes on my balcony. How much sun do they need?", skill="wow")
    live = open_explanation(page, 0, timeout=120_000)
    assert "Growing tomatoes" in live
    live_server.bot.wait_for_memory()  # extraction runs after the reply; the stored trace gets its step

    page.reload(wait_until="load")
    page.locator("#fsb-input textarea").wait_for(timeout=60_000)
    assert explanations(page).count() == 0
    page.locator("#fsb-sessions input").click()
    page.get_by_role("option", name="I grow tomatoes on my balcony").first.click()
    reopened = open_explanation(page, 0, timeout=60_000)

    def without_memory(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if not line.startswith("written:"))

    assert without_memory(reopened) == without_memory(live)
    assert "written:" in reopened and "still being extracted" not in reopened
    stored = live_server.bot.store.messages(live_server.bot.store.sessions()[0]["id"])[-1]["trace"]
    assert any(s["step"] == "remember" for s in stored["steps"])
