"""The web chat (Gradio), mounted at ``/`` on the API's app: streaming replies, a skill override, resumable sessions.

Every failure is shown in the chat as a message; the page never goes blank.
"""
from __future__ import annotations

import logging

import gradio as gr

from .bot import Bot

log = logging.getLogger(__name__)
AUTO = "auto"


def build_ui(bot: Bot) -> gr.Blocks:
    store = bot.store

    def skill_choices() -> list[str]:
        return [AUTO] + sorted(s.name for s in bot.skills.all() if s.kind == "response")

    def user_of(request: gr.Request | None) -> str:
        return (getattr(request, "username", None) or "") if request is not None else ""

    def session_choices(user: str = "") -> list[tuple[str, str]]:
        return [(f"{s['title'] or '(empty)'} · {s['updated'][:16].replace('T', ' ')}", s["id"])
                for s in store.sessions(user=user, limit=30)]

    def load_session(session_id: str | None, request: gr.Request):
        if not session_id or store.session(session_id)["user"] != user_of(request):
            return [], None, ""
        history = [{"role": m["role"], "content": m["content"]} for m in store.messages(session_id)]
        return history, session_id, ""

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
            sources = ", ".join(p.get("source", "") if isinstance(p, dict) else str(p) for p in reply.passages)
            info = f"skill: **{reply.skill}**" + (f" · sources: {sources}" if sources else "")
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
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="fsb-chat")
                info = gr.Markdown("", elem_id="fsb-info")
                with gr.Row():
                    box = gr.Textbox(placeholder="Say something…", show_label=False, scale=5, elem_id="fsb-input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="fsb-send")
        outputs = [chatbot, session_state, info, sessions]
        box.submit(respond, [box, chatbot, session_state, skill], outputs).then(lambda: "", None, box)
        send.click(respond, [box, chatbot, session_state, skill], outputs).then(lambda: "", None, box)
        new_btn.click(new_chat, None, [chatbot, session_state, info, sessions])
        sessions.input(load_session, sessions, [chatbot, session_state, info])
        demo.load(refresh_sessions, None, sessions)
    return demo
