"""The native routes: a turn with its skill, sources and trace; sessions; long-term memory; skills."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Path, Request

from ..bot import BadRequest
from .errors import NotFound
from .schemas import NativeChatRequest
from .service import Service

SQLITE_MAX_ID = 2**63 - 1  # a larger id is no row (and SQLite cannot even bind it)


def router(svc: Service) -> APIRouter:
    api = APIRouter(tags=["native"])
    bot, metrics = svc.bot, svc.metrics

    @api.post("/api/chat")
    def native_chat(req: NativeChatRequest, request: Request) -> dict:
        """One turn in a stored session (created when ``session_id`` is absent): reply, skill, sources and trace."""
        started = time.monotonic()
        if req.skill is not None:
            bot.skill_for(req.skill)
        bot.check_messages([{"role": "user", "content": req.message}])
        user = svc.caller(request, req.user)
        if req.session_id:
            svc.owned_session(request, req.session_id)
        svc.limited(request)
        with svc.admit():  # the session is created only once the turn is admitted: a 429 leaves nothing behind
            sid = req.session_id or bot.store.create_session(user=user)
            stream = bot.chat(sid, req.message, skill=req.skill, user=user)
            text = "".join(stream)
        reply = stream.reply
        metrics.turn.labels(route="native").observe(time.monotonic() - started)
        metrics.tokens.labels(route="native").inc(reply.completion_tokens)
        return {"session_id": sid, "reply": text, "skill": reply.skill, "sources": reply.passages,
                "trace": reply.trace}

    @api.get("/api/sessions")
    def list_sessions(request: Request, user: str | None = None) -> list[dict]:
        return bot.store.sessions(user=svc.caller(request) if svc.auth_on else user)

    @api.get("/api/sessions/{session_id}")
    def get_session(session_id: str, request: Request) -> dict:
        return {**svc.owned_session(request, session_id), "messages": bot.store.messages(session_id)}

    def memory_user(request: Request, user: str | None) -> str:
        who = svc.caller(request, user)
        if not who:
            raise BadRequest("name the user whose memories to read (?user=...)", "user")
        return who

    @api.get("/api/memory")
    def list_memory(request: Request, user: str | None = None) -> list[dict]:
        """What the bot keeps about a user (the caller's own when API keys are on)."""
        who = memory_user(request, user)
        return [vars(f) for f in bot.knowledge.memory.list(who)] if bot.knowledge else []

    @api.delete("/api/memory")
    def forget_all(request: Request, user: str | None = None) -> dict:
        who = memory_user(request, user)
        bot.wait_for_memory(who)  # a fact still being extracted would come back right after "forget everything"
        return {"deleted": bot.knowledge.memory.forget(who) if bot.knowledge else 0}

    @api.delete("/api/memory/{fact_id}")
    def forget_one(request: Request, fact_id: int = Path(ge=1, le=SQLITE_MAX_ID), user: str | None = None) -> dict:
        who = memory_user(request, user)
        deleted = bot.knowledge.memory.forget(who, fact_id) if bot.knowledge else 0
        if not deleted:
            raise NotFound(f"no memory {fact_id} for this user", "fact_id", "memory_not_found")
        return {"deleted": deleted}

    @api.get("/api/skills")
    def skills() -> list[dict[str, Any]]:
        return [{"name": s.name, "kind": s.kind, "retriever": s.retriever, "description": s.description}
                for s in bot.skills.all()]

    @api.get("/api/skills/problems")
    def skill_problems() -> list[dict[str, Any]]:
        """Skill files that failed to load (the last good version of each keeps serving)."""
        bot.skills.refresh()
        return [{"file": e.path, "line": e.line, "message": e.message} for e in bot.skills.errors]

    return api
