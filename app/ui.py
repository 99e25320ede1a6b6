"""The web chat (Gradio), mounted at ``/`` on the API's app: streaming replies, a skill override, resumable sessions.

Every failure is shown in the chat as a message; the page never goes blank.
"""
from __future__ import annotations

import logging

import gradio as gr

from .bot import Bot

log = logging.getLogger(__name__)
AUTO = "auto"
LOCAL_USER = "web"  # the web chat's user when no API keys are configured (a single-user local install)


def sources_note(skill: str, passages: list[dict]) -> dict:
    """The small message under a reply: the skill that answered and the sources it used (links for web pages)."""
    lines = []
    for p in passages:
        src = p.get("source", "")
        label = p.get("title") or src
        lines.append(f"- [{label}]({src})" if src.startswith(("http://", "https://")) else f"- {label}")
    return {"role": "assistant", "content": "\n".join(lines) or "no sources",
            "metadata": {"title": f"skill: {skill}" + (f" · {len(passages)} sources" if passages else "")}}


def transcript(messages: list[dict]) -> list[dict]:
    """Stored messages as chat bubbles, each reply followed by its skill and sources."""
    out = []
    for m in messages:
        out.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "assistant" and m.get("skill"):
            out.append(sources_note(m["skill"], (m.get("trace") or {}).get("passages", [])))
    return out


def build_ui(bot: Bot) -> gr.Blocks:
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
        try:
            if not session_id:
                session_id = store.create_session(user=user, title=message[:60])
            stream = bot.chat(session_id, message, skill=None if skill == AUTO else skill, user=user)
            history.append({"role": "assistant", "content": ""})
            for piece in stream:
                history[-1]["content"] += piece
                yield history, session_id, "", gr.update()
            reply = stream.reply
            history.append(sources_note(reply.skill, reply.passages))
            info = f"skill: **{reply.skill}**"
            yield history, session_id, info, gr.update(choices=session_choices(user), value=session_id)
        except Exception as exc:  # noqa: BLE001 - shown to the user as a message, never a blank page
            log.exception("web chat turn failed")
            if history and history[-1]["role"] == "assistant" and not history[-1]["content"]:
                history.pop()
            history.append({"role": "assistant", "content": f"⚠️ Sorry, something went wrong: {exc}"})
            yield history, session_id, "error", gr.update()

    with gr.Blocks(title="Few-Shot Bot") as demo:
        session_state = gr.State(None)
        gr.Markdown("## Few-Shot Bot")
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
