"""The web chat (Gradio), mounted at ``/`` on the API's app: streaming replies, a skill override, resumable sessions.

The web chat is a client like any other: its turns take the same admission slots and rate limit as the API's, and
with API keys on it asks for a login. A failure is shown as a short message with an id; the full text goes to the
log only. The page never goes blank.
"""
from __future__ import annotations

import logging
import time
import uuid

import gradio as gr

from .bot import BadRequest, Bot
from .explain import explanation
from .http.errors import Busy, QueueTimeout, RateLimited
from .lab_ui import lab_tab

log = logging.getLogger(__name__)
AUTO = "auto"
LOCAL_USER = "web"  # the web chat's user when no API keys are configured (a single-user local install)


def sources_note(skill: str, passages: list[dict], trace: dict | None = None, memory_pending: bool = False) -> dict:
    """The collapsed message under a reply, "Why this reply · skill: <name>": its route, parser output, sources with
    their scores, memory used and written, and a bar of the step times (`app.explain`)."""
    return explanation({"passages": passages, **(trace or {})}, skill, memory_pending)


def transcript(messages: list[dict]) -> list[dict]:
    """Stored messages as chat bubbles, each reply followed by the same explanation as when it was live (the
    stored trace has everything, memory extraction included once it has finished)."""
    out = []
    for m in messages:
        out.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "assistant" and m.get("skill"):
            trace = m.get("trace") or {}
            out.append(sources_note(m["skill"], trace.get("passages", []), trace))
    return out


def friendly(exc: Exception) -> str:
    """What the chat shows for a failed turn: a short message, with an id that finds the full text in the log."""
    if isinstance(exc, Busy):
        return "⚠️ I'm busy with other chats right now; please try again in a few seconds."
    if isinstance(exc, QueueTimeout):
        return "⚠️ Too many chats are waiting; please try again in a moment."
    if isinstance(exc, RateLimited):
        return f"⚠️ You're sending messages faster than allowed; try again in {max(1, int(exc.retry_after + 1))} s."
    if isinstance(exc, BadRequest):
        return f"⚠️ {exc}"
    error_id = uuid.uuid4().hex[:8]
    log.error("web chat turn failed (error id %s)", error_id, exc_info=exc)
    return f"⚠️ Sorry, something went wrong (error id {error_id})."


def build_ui(bot: Bot, service=None) -> gr.Blocks:
    """The chat page. ``service`` (`app.http.service.Service`) gives it the API's admission and rate limit."""
    store = bot.store

    def skill_choices() -> list[str]:
        return [AUTO] + sorted(s.name for s in bot.skills.all() if s.kind == "response")

    def problems() -> str:
        errors = bot.skills.errors
        return "\n".join(["⚠️ Some skill files have problems (the last good version keeps serving):"] +
                         [f"- `{e}`" for e in errors]) if errors else ""

    def user_of(request: gr.Request | None) -> str:
        return (getattr(request, "username", None) if request is not None else None) or LOCAL_USER

    def memory_view(request: gr.Request):
        facts = bot.knowledge.memory.list(user_of(request)) if bot.knowledge else []
        return "\n".join(f"- `#{f.id}` {f.text}" for f in facts) or "_Nothing remembered yet._"

    def forget_everything(request: gr.Request):
        return forget(None, request)

    def forget(fact_id, request: gr.Request):
        if bot.knowledge:
            bot.knowledge.memory.forget(user_of(request), int(fact_id) if fact_id else None)
        return memory_view(request)

    def memory_follows(reply) -> bool:
        """Whether fact extraction runs after this reply (in the background, so its step may not be in yet)."""
        skill = bot.skills.get(reply.skill) if reply.skill in bot.skills else None
        return bool(bot.knowledge is not None and bot.settings.memory and skill is not None
                    and skill.kind != "safety" and bot.settings.memory_skill in bot.skills)

    def session_choices(user: str = "") -> list[tuple[str, str]]:
        return [(f"{s['title'] or '(empty)'} · {s['updated'][:16].replace('T', ' ')}", s["id"])
                for s in store.sessions(user=user, limit=30)]

    def load_session(session_id: str | None, request: gr.Request):
        if not session_id or store.session(session_id)["user"] != user_of(request):
            return [], None, ""
        return transcript(store.messages(session_id)), session_id, ""

    def new_chat(request: gr.Request):
        return [], None, "", gr.update(choices=session_choices(user_of(request)), value=None)

    def refresh_sessions(request: gr.Request):
        return gr.update(choices=session_choices(user_of(request)))

    def respond(message: str, history: list, session_id: str | None, skill: str, request: gr.Request):
        user = user_of(request)
        message = (message or "").strip()
        if not message:
            yield history, session_id, "", gr.update()
            return
        history = list(history or []) + [{"role": "user", "content": message}]
        yield history, session_id, "", gr.update()
        ticket = stream = None
        started = time.monotonic()
        try:
            bot.check_messages([{"role": "user", "content": message}])
            if service is not None:
                service.charge(user if service.auth_on else (getattr(request, "client", None) and
                                                             request.client.host) or LOCAL_USER)
                ticket = service.admit()
            if not session_id:
                session_id = store.create_session(user=user, title=message[:60])
            stream = bot.chat(session_id, message, skill=None if skill == AUTO else skill, user=user)
            history.append({"role": "assistant", "content": ""})
            first = True
            for piece in stream:
                if first and service is not None:
                    service.metrics.ttft.labels(route="web").observe(time.monotonic() - started)
                    first = False
                history[-1]["content"] += piece
                yield history, session_id, "", gr.update()
            reply = stream.reply
            if service is not None:
                service.metrics.turn.labels(route="web").observe(time.monotonic() - started)
                service.metrics.tokens.labels(route="web").inc(reply.completion_tokens)
            history.append(sources_note(reply.skill, reply.passages, dict(reply.trace),
                                        memory_pending=memory_follows(reply)))
            info = f"skill: **{reply.skill}**"
            yield history, session_id, info, gr.update(choices=session_choices(user), value=session_id)
        except GeneratorExit:  # the page went away mid-reply: stop generating
            if service is not None:
                service.metrics.disconnects.labels(route="web").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - shown to the user as a message, never a blank page
            if history and history[-1]["role"] == "assistant" and not history[-1]["content"]:
                history.pop()
            history.append({"role": "assistant", "content": friendly(exc)})
            yield history, session_id, "error", gr.update()
        finally:
            if stream is not None and stream.reply is None:
                stream.close()
            if ticket is not None:
                ticket.release()

    with gr.Blocks(title="Few-Shot Bot") as demo:
        session_state = gr.State(None)
        gr.Markdown("## Few-Shot Bot")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=1, min_width=220):
                    new_btn = gr.Button("New chat")
                    sessions = gr.Dropdown(label="Past chats", choices=[], value=None, interactive=True,
                                           elem_id="fsb-sessions")
                    skill = gr.Dropdown(label="Skill", choices=skill_choices(), value=AUTO, elem_id="fsb-skill")
                    with gr.Accordion("What I remember about you", open=False, elem_id="fsb-memory"):
                        memory = gr.Markdown("_Nothing remembered yet._", elem_id="fsb-memory-list")
                        fact_id = gr.Number(label="Fact #", precision=0, value=None)
                        with gr.Row():
                            forget_one = gr.Button("Forget #", size="sm")
                            forget_all = gr.Button("Forget all", size="sm", variant="stop", elem_id="fsb-forget-all")
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(label="Chat", height=480, elem_id="fsb-chat")
                    info = gr.Markdown("", elem_id="fsb-info")
                    warnings = gr.Markdown("", elem_id="fsb-problems")
                    with gr.Row():
                        box = gr.Textbox(placeholder="Say something…", show_label=False, scale=5, elem_id="fsb-input")
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="fsb-send")
        with gr.Tab("Skill lab"):
            lab_tab(bot, service)
        outputs = [chatbot, session_state, info, sessions]
        for trigger in (box.submit, send.click):
            trigger(respond, [box, chatbot, session_state, skill], outputs).then(lambda: "", None, box).then(
                memory_view, None, memory).then(problems, None, warnings)
        new_btn.click(new_chat, None, [chatbot, session_state, info, sessions])
        sessions.input(load_session, sessions, [chatbot, session_state, info])
        demo.load(refresh_sessions, None, sessions).then(memory_view, None, memory).then(problems, None, warnings)
        forget_one.click(forget, fact_id, memory)
        forget_all.click(forget_everything, None, memory)
    return demo
