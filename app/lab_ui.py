"""The web chat's "Skill lab" tab: edit a draft skill file, see its problems as you type, its prompt and token count,
chat with it, see where the router ranks it, and save it (`app.lab` does the work).

The tab lives in the chat's own Gradio app, so the same login guards it, and its turns take the same admission slots
and rate limit as the chat's. A draft never reaches the running bot until it is saved, and a broken one cannot be.
"""
from __future__ import annotations

import time

import gradio as gr

from .lab import DraftInvalid, LabError, Rank, SkillLab

RANK_HEADERS = ["message", "rank", "score", "top 3"]


def errors_markdown(text: str, lab: SkillLab) -> str:
    """The problems box: ``line N: message`` for each problem, or what the draft is."""
    try:
        skill = lab.load(text)
    except DraftInvalid as exc:
        return "\n".join(f"- ❌ **line {e.line}:** {e.message}" for e in exc.errors)
    shadow = " (replaces the installed skill of that name while you try it)" if skill.name in lab.bot.skills else ""
    return f"✅ valid: {skill.kind} skill **{skill.name}**, {len(skill.examples)} examples{shadow}"


def sample_lines(samples: str) -> list[str]:
    return [line.strip() for line in (samples or "").splitlines() if line.strip()]


def rank_rows(ranks: list[Rank]) -> list[list]:
    rows = []
    for r in ranks:
        if r.rank is None:
            rows.append([r.message, "-", "", r.note])
            continue
        score = f"{r.score:.3f}" + ("" if r.shortlisted else " (embedding; not shortlisted)")
        rows.append([r.message, f"{r.rank} of {r.of}", score, ", ".join(f"{n} {s:.3f}" for n, s in r.top)])
    return rows


def _text(content) -> str:
    """A chat bubble's text: Gradio hands messages back with their content as a list of blocks."""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict))


def lab_tab(bot, service=None) -> None:
    """Create the lab's components inside the current Blocks context (a ``gr.Tab``)."""
    lab = SkillLab(bot)

    def first_message(text: str, samples: str) -> str:
        lines = sample_lines(samples)
        if lines:
            return lines[0]
        try:
            skill = lab.load(text)
        except DraftInvalid:
            return ""
        return next((str(t[0]) for t in skill.examples[0].get("dialogue") or [] if t and t[0]), "")

    def check(text: str, samples: str):
        """Problems, prompt and token count for the draft as it is now (cheap: no generation)."""
        problems = errors_markdown(text, lab)
        try:
            rendered = lab.render(text, first_message(text, samples))
        except DraftInvalid:
            return problems, "", "_Fix the problems above to see the prompt._"
        except Exception as exc:  # noqa: BLE001 - a template that fails on a live turn: the author's to fix
            return problems, "", f"⚠️ cannot render a live turn: {exc}"
        mark = "✅" if rendered.fits else "⚠️"
        return problems, rendered.text, f"{mark} {rendered.summary()}"

    def start_from(name: str | None):
        try:
            return lab.starter(like=name, name=f"my-{name}") if name else gr.update()
        except LabError:
            return gr.update()

    def client(request: gr.Request | None) -> str:
        user = getattr(request, "username", None) if request is not None else None
        return user or (request.client.host if request is not None and request.client else "") or "web"

    def respond(text: str, message: str, history: list, request: gr.Request):
        from .ui import friendly

        message = (message or "").strip()
        if not message:
            yield history, ""
            return
        history = list(history or [])
        turn = [{"role": m["role"], "content": _text(m["content"])} for m in history if not m.get("metadata")]
        history.append({"role": "user", "content": message})
        yield history, ""
        ticket = stream = None
        started = time.monotonic()
        try:
            bot.check_messages(turn + [{"role": "user", "content": message}])
            if service is not None:
                service.charge(client(request))
                ticket = service.admit()
            stream = lab.stream(text, turn + [{"role": "user", "content": message}])
            history.append({"role": "assistant", "content": ""})
            for piece in stream:
                history[-1]["content"] += piece
                yield history, ""
            reply = stream.reply
            if not reply.text.strip():
                history[-1]["content"] = "_(empty reply: the model stopped at once)_"
            note = (f"{reply.prompt_tokens} prompt tokens, {reply.completion_tokens} new, "
                    f"{time.monotonic() - started:.1f} s")
            history.append({"role": "assistant", "content": note, "metadata": {"title": f"draft: {reply.skill}"}})
            yield history, ""
        except DraftInvalid as exc:
            history.append({"role": "assistant", "content": "⚠️ The draft has problems; fix them first: "
                                                            + "; ".join(f"line {e.line}: {e.message}"
                                                                        for e in exc.errors)})
            yield history, ""
        except Exception as exc:  # noqa: BLE001 - shown as a message, never a blank page
            if history and history[-1]["role"] == "assistant" and not history[-1]["content"]:
                history.pop()
            history.append({"role": "assistant", "content": friendly(exc)})
            yield history, ""
        finally:
            if stream is not None and stream.reply is None:
                stream.close()
            if ticket is not None:
                ticket.release()

    def rank(text: str, samples: str, request: gr.Request):
        from .ui import friendly

        lines = sample_lines(samples) or [first_message(text, "")]
        ticket = None
        try:
            if service is not None:
                service.charge(client(request))
                ticket = service.admit()
            return rank_rows(lab.rank(text, lines)), ""
        except DraftInvalid:
            return [], "⚠️ Fix the draft's problems first."
        except Exception as exc:  # noqa: BLE001
            return [], friendly(exc)
        finally:
            if ticket is not None:
                ticket.release()

    def save(text: str, overwrite: bool):
        try:
            path = lab.save(text, overwrite=bool(overwrite))
        except DraftInvalid as exc:
            return "⚠️ Not saved: the draft has problems (" + "; ".join(f"line {e.line}: {e.message}"
                                                                        for e in exc.errors) + ")."
        except LabError as exc:
            return f"⚠️ Not saved: {exc}"
        skill = bot.skills.get(path.stem)
        served = f"; the API serves it as `fsb:{skill.name}`" if skill.kind == "response" else ""
        return f"✅ Saved to `{path}`{served}."

    try:
        starter = lab.starter()
    except LabError:  # no skill file to copy: the author starts from an empty editor
        starter = ""
    problems, prompt_text, tokens_text = check(starter, "")
    gr.Markdown("Try a draft skill file on the running bot: its problems as you type, its prompt, a chat with it "
                "forced, and where the router ranks it. Nothing changes for the bot until you save.")
    with gr.Row():
        with gr.Column(scale=1):
            start = gr.Dropdown(label="Start from a copy of", value=None, interactive=True, elem_id="fsb-lab-start",
                                choices=sorted(s.name for s in bot.skills.all()))
            editor = gr.Code(value=starter, language="yaml", label="Draft skill (YAML)", lines=28, interactive=True,
                             elem_id="fsb-lab-editor")
            errors = gr.Markdown(problems, elem_id="fsb-lab-errors")
            with gr.Row():
                overwrite = gr.Checkbox(label="Replace an existing skill file", value=False,
                                        elem_id="fsb-lab-overwrite")
                save_btn = gr.Button("Save skill", variant="primary", elem_id="fsb-lab-save")
            saved = gr.Markdown("", elem_id="fsb-lab-saved")
        with gr.Column(scale=1):
            tokens = gr.Markdown(tokens_text, elem_id="fsb-lab-tokens")
            prompt = gr.Textbox(prompt_text, label="Rendered prompt (first sample message)", lines=12, max_lines=24,
                                interactive=False, elem_id="fsb-lab-prompt")
            chat = gr.Chatbot(label="Chat with the draft forced", height=280, elem_id="fsb-lab-chat")
            with gr.Row():
                box = gr.Textbox(placeholder="Say something to the draft…", show_label=False, scale=5,
                                 elem_id="fsb-lab-input")
                send = gr.Button("Send", scale=1, min_width=60, elem_id="fsb-lab-send")
                clear = gr.Button("Clear", scale=1, min_width=60, elem_id="fsb-lab-clear")
            samples = gr.Textbox(label="Sample messages, one per line", lines=4, elem_id="fsb-lab-samples")
            rank_btn = gr.Button("Rank the draft", elem_id="fsb-lab-rank")
            rank_note = gr.Markdown("", elem_id="fsb-lab-rank-note")
            ranks = gr.Dataframe(headers=RANK_HEADERS, value=[], interactive=False, wrap=True,
                                 label="Where the router's history selector ranks the draft",
                                 column_widths=["34%", "12%", "18%", "36%"], elem_id="fsb-lab-ranks")
    for changed in (editor.change, samples.change):
        changed(check, [editor, samples], [errors, prompt, tokens], trigger_mode="always_last",
                show_progress="hidden")
    start.input(start_from, start, editor)
    for trigger in (box.submit, send.click):
        trigger(respond, [editor, box, chat], [chat, box])
    clear.click(lambda: [], None, chat)
    rank_btn.click(rank, [editor, samples], [ranks, rank_note])
    save_btn.click(save, [editor, overwrite], saved)
