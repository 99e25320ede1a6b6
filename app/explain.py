""""Why this reply": a turn trace (`app.bot`) as a short, readable explanation for the web chat.

`explanation(trace)` gives one collapsed chat message (a Gradio "thought": ``metadata={"title", "status": "done"}``)
that shows, from the trace alone:

- the route: the method, why, the winning skill, the top three scores, the last-message (safety) stage's verdict,
  a forced skill overruled by safety, a trigger;
- the parser's output (the field it filled);
- the passages with their source and score (web pages as links), the memory facts used (``memory:<id>`` passages);
- the memory facts written (the ``remember`` step; it runs after the reply, so a live turn may not have it yet);
- a bar of the step times.

The same function renders a live turn and a stored one (`app.storage.Store.messages` keeps the trace), so a chat
reopened from the database explains itself the same way. Everything taken from the trace is escaped: passages are
untrusted text and must not turn into markup or links.
"""
from __future__ import annotations

import html
import re

TITLE = "Why this reply"
# One colour per step (works on light and dark themes); unknown steps get grey.
COLOURS = {"safety": "#e4572e", "select": "#f3a712", "parse": "#a8c686", "retrieve": "#29bf12", "prompt": "#669bbc",
           "align": "#9d4edd", "generate": "#3a86ff", "first token": "#1b4f9c", "remember": "#8d99ae"}
ORDER = ("safety", "select", "parse", "retrieve", "prompt", "align", "generate")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md(text, limit: int | None = None) -> str:
    """``text`` as literal Markdown: HTML escaped, Markdown's specials backslashed, newlines folded, cut to
    ``limit`` characters (with an ellipsis)."""
    text = " ".join(str(text if text is not None else "").split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def code(text, limit: int = 120) -> str:
    """``text`` as a Markdown code span (literal: the renderer escapes it), fenced with more backticks than it holds."""
    text = " ".join(str(text if text is not None else "").split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def seconds(s: float) -> str:
    s = float(s or 0)
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def score(v) -> str:
    try:
        return f"{float(v):.3f}".replace("-", "−")
    except (TypeError, ValueError):
        return md(v)


def title(trace: dict, skill: str | None = None) -> str:
    """The collapsed line: ``Why this reply · skill: wow · 2 sources``."""
    skill = skill or trace.get("skill") or (trace.get("selection") or {}).get("skill") or "?"
    n = len(trace.get("passages") or [])
    return f"{TITLE} · skill: {skill}" + (f" · {n} source{'s' if n != 1 else ''}" if n else "")


def top(scores: dict | None, n: int = 3, winner: str | None = None) -> str:
    """The ``n`` best scores, best first, the winner in bold: ``**wow** 0.812 · wit 0.634 · persona 0.101``."""
    if not scores:
        return ""
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return " · ".join((f"**{md(k)}**" if k == winner else md(k)) + " " + score(v) for k, v in ranked)


def steps_of(trace: dict) -> dict[str, dict]:
    """The trace's steps by name (the last of each name)."""
    return {s.get("step"): s for s in trace.get("steps") or [] if isinstance(s, dict)}


def timings(trace: dict) -> list[tuple[str, float]]:
    """The reply's step times in order, as (name, seconds), each counted once.

    The ``select`` step times the whole route, so it contains the ``safety`` stage when that ran; here ``select`` is
    the rest. ``generate`` is split into the wait for the first token and the streaming after it when the backend
    reported ``first_token_s``. ``remember`` runs after the reply and is left out.
    """
    steps = steps_of(trace)
    out: list[tuple[str, float]] = []
    for name in ORDER:
        step = steps.get(name)
        if step is None:
            continue
        s = max(0.0, float(step.get("s") or 0))
        if name == "select" and "safety" in steps:
            s = max(0.0, s - float(steps["safety"].get("s") or 0))
        if name == "generate" and step.get("first_token_s") is not None:
            first = min(s, max(0.0, float(step["first_token_s"])))
            out += [("first token", first), ("generate", s - first)]
            continue
        out.append((name, s))
    return out


def step_bar(trace: dict) -> str:
    """The step times as one proportional HTML bar with a legend beneath (plain text carries the numbers)."""
    parts = timings(trace)
    total = sum(s for _, s in parts)
    if not parts:
        return ""
    segments = "".join(
        f'<span title="{html.escape(name)} {seconds(s)}" style="display:inline-block;height:10px;'
        f'width:{max(100 * s / total, 0.5) if total else 100 / len(parts):.2f}%;'
        f'background:{COLOURS.get(name, "#adb5bd")}"></span>' for name, s in parts)
    bar = (f'<div class="fsb-steps" style="display:flex;width:100%;border-radius:4px;overflow:hidden;'
           f'margin:4px 0">{segments}</div>')
    legend = " · ".join(f'<span style="color:{COLOURS.get(name, "#adb5bd")}">■</span> {html.escape(name)} '
                        f"{seconds(s)}" for name, s in parts)
    return f"{bar}\n\n{legend}"


def route_lines(trace: dict) -> list[str]:
    sel = trace.get("selection") or {}
    if not sel:
        return ["**Route:** not recorded for this reply"]
    skill = sel.get("skill") or trace.get("skill") or "?"
    method = sel.get("method") or "?"
    lines = [f"**Route:** {code(method)} → **{md(skill)}**" + (f" — {md(sel['why'])}" if sel.get("why") else "")]
    if sel.get("overruled"):
        lines.append(f"- ⚠️ forced skill **{md(sel['overruled'])}** was overruled by safety → **{md(skill)}**")
    elif sel.get("forced_skill"):
        lines.append(f"- forced skill: **{md(sel['forced_skill'])}**")
    if sel.get("trigger"):
        lines.append(f"- trigger: {code(sel['trigger'])}")
    if sel.get("scores"):
        lines.append(f"- scores (top 3): {top(sel['scores'], winner=skill)}")
    extra = []
    if sel.get("margin") is not None:
        extra.append(f"margin {score(sel['margin'])}")
    if sel.get("confident") is False:
        extra.append("not confident")
    if sel.get("fallback"):
        extra.append("fallback skill")
    if extra:
        lines.append("- " + ", ".join(extra))
    first = trace.get("safety")
    if first:
        verdict = (f"flagged by **{md(first.get('skill'))}**" if first.get("flagged") else "not flagged")
        scored = top(first.get("scores"), winner=first.get("skill"))
        lines.append(f"- safety stage (last message alone): {verdict}" + (f"; {scored}" if scored else ""))
    return lines


def parse_lines(trace: dict) -> list[str]:
    step = steps_of(trace).get("parse")
    if step is None:
        return []
    output = step.get("output") or ""
    shown = f"“{md(output, 300)}”" if output else "_(empty)_"
    return [f"**Parser:** {md(step.get('skill'))} → {md(step.get('target') or 'query')}: {shown}"]


def source_line(i: int, p: dict) -> str:
    """``1. Title · `source` · score 0.812`` and an excerpt; a web page's title links to it."""
    src = str(p.get("source") or "")
    titled = (p.get("title") or "") not in ("", src)
    label = md(p["title"], 80) if titled else code(src, 80)
    if titled and src.startswith(("http://", "https://")) and not re.search(r"[\s()<>]", src):
        label = f"[{label}]({src})"
    line = f"{i}. {label}" + (f" · {code(src, 80)}" if titled else "") + f" · score {score(p.get('score'))}"
    if p.get("untrusted"):
        line += " · untrusted"
    text = md(p.get("text"), 160)
    return line + (f"<br>_{text}_" if text else "")


def passage_lines(trace: dict) -> list[str]:
    passages = trace.get("passages") or []
    step = steps_of(trace).get("retrieve")
    if not passages:
        if step is None:
            return ["**Sources:** none"]
        why = f" ({md(step['error'], 120)})" if step.get("error") else ""
        return [f"**Sources:** none found by {md(step.get('retriever'))} for “{md(step.get('query'), 120)}”{why}"]
    head = "**Sources:**"
    if step is not None:
        head += f" {md(step.get('retriever'))}, query “{md(step.get('query'), 120)}”"
    return [head] + [source_line(i, p) for i, p in enumerate(passages, 1)]


def memory_lines(trace: dict, pending: bool = False) -> list[str]:
    """Long-term memory: the facts the reply used (``memory:<id>`` passages) and the facts the turn wrote."""
    used = [p for p in trace.get("passages") or [] if str(p.get("source", "")).startswith("memory:")]
    lines = []
    if used:
        lines.append("- used: " + "; ".join(
            f"{code('#' + str(p['source']).split(':', 1)[1])} {md(p.get('text'), 120)}" for p in used))
    step = steps_of(trace).get("remember")
    if step is not None:
        facts = step.get("facts") or []
        if step.get("error"):
            lines.append(f"- written: failed ({md(step['error'], 120)})")
        elif facts:
            added = step.get("added", len(facts))
            lines.append(f"- written: {added} new of {len(facts)} fact{'s' if len(facts) != 1 else ''}: "
                         + "; ".join(md(f, 120) for f in facts) + f" ({seconds(step.get('s'))}, after the reply)")
        else:
            lines.append(f"- written: nothing ({md(step.get('skipped') or 'no facts found')})")
    elif pending:
        lines.append("- written: still being extracted after the reply; reopen the chat from Past chats to see it")
    return ["**Memory:**"] + lines if lines else []


def explanation_text(trace: dict, memory_pending: bool = False) -> str:
    """The explanation's body (Markdown with a little inline HTML)."""
    trace = trace or {}
    blocks = ["\n".join(route_lines(trace)), "\n".join(parse_lines(trace)), "\n".join(passage_lines(trace)),
              "\n".join(memory_lines(trace, memory_pending))]
    bar = step_bar(trace)
    if bar:
        total = sum(s for _, s in timings(trace))
        blocks.append(f"**Steps:** {seconds(total)} in all\n\n{bar}")
    return "\n\n".join(b for b in blocks if b)


def explanation(trace: dict, skill: str | None = None, memory_pending: bool = False) -> dict:
    """The chat message under a reply: collapsed, titled ``Why this reply · skill: <name>[ · N sources]``."""
    trace = trace or {}
    return {"role": "assistant", "content": explanation_text(trace, memory_pending),
            "metadata": {"title": title(trace, skill), "status": "done"}}
