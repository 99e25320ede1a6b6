"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""
from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Request

from ..bot import BadRequest, Bot
from ..lm import Sampling
from .errors import error_response
from .schemas import ChatCompletionRequest, CompletionRequest
from .service import Service
from .streaming import HeldStream, chat_chunks, completion_chunks, finish_reason

log = logging.getLogger(__name__)
MODEL_AUTO = "fsb"


def skill_from_model(model: str, bot: Bot) -> str | None:
    """``fsb`` is automatic routing, ``fsb:<skill>`` forces a skill (the safety stage still judges the turn)."""
    if model == MODEL_AUTO:
        return None
    if model.startswith(MODEL_AUTO + ":"):
        name = model.split(":", 1)[1]
        bot.skill_for(name)  # raises UnknownSkill -> 404
        return name
    raise BadRequest(f"unknown model {model!r}; use 'fsb' (automatic skill) or 'fsb:<skill>' (see /v1/models)",
                     "model", "model_not_found")


def router(svc: Service) -> APIRouter:
    api = APIRouter(tags=["openai"])
    bot, settings, metrics = svc.bot, svc.settings, svc.metrics

    @api.get("/v1/models")
    def models() -> dict:
        created = int(time.time())
        names = [MODEL_AUTO] + [f"{MODEL_AUTO}:{s.name}" for s in bot.skills.all() if s.kind == "response"]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "fsb"}
                                           for n in names]}

    @api.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest, request: Request):
        started = time.monotonic()
        skill = skill_from_model(req.model, bot)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        bot.check_messages(messages)
        if req.session_id:
            svc.owned_session(request, req.session_id)
        svc.limited(request)
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        asked = req.max_completion_tokens or req.max_tokens
        limit = min(asked, settings.max_tokens) if asked else None  # None: the skill's own setting
        user = svc.caller(request, req.user)
        ticket = svc.admit()
        try:
            if req.session_id:
                stream = bot.chat(req.session_id, messages[-1]["content"], skill=skill, sampling=sampling,
                                  max_tokens=limit, user=user, stop=req.stops())
            else:
                stream = bot.turn(messages, skill=skill, sampling=sampling, max_tokens=limit, user=user,
                                  stop=req.stops())
        except BaseException:
            ticket.release()
            raise
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            chunks = chat_chunks(stream, cid, req.model, started, metrics, "chat")
            return HeldStream(chunks, ticket, lambda: metrics.disconnects.labels(route="chat").inc())
        try:
            text = "".join(stream)
        finally:
            ticket.release()
        reply = stream.reply
        metrics.turn.labels(route="chat").observe(time.monotonic() - started)
        metrics.tokens.labels(route="chat").inc(reply.completion_tokens)
        return {
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            "fsb": {"skill": reply.skill, "sources": reply.passages},
        }

    @api.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request):
        """Raw completion: the language model continues the prompt as it is (no skill, no alignment layer)."""
        started = time.monotonic()
        if req.model not in (MODEL_AUTO, bot.lm.name):
            raise BadRequest(f"unknown model {req.model!r}; raw completion serves 'fsb' (the loaded model, "
                             f"{bot.lm.name})", "model", "model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or not all(prompts):
            raise BadRequest("prompt must be a non-empty string or a list of non-empty strings", "prompt")
        if req.stream and len(prompts) > 1:
            raise BadRequest("stream: true takes one prompt", "prompt")
        limit = min(req.max_tokens or 16, settings.max_tokens)
        for p in prompts:
            if bot.lm.count_tokens(p) + limit > bot.lm.context_length:
                raise BadRequest(f"the prompt and max_tokens ({limit}) exceed the model's context of "
                                 f"{bot.lm.context_length} tokens", "prompt", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        svc.limited(request)
        sampling = Sampling().with_overrides(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def run_one(prompt: str):
            stats: dict = {}
            return stats, bot.lm.generate(prompt, stop=stops, max_new_tokens=limit, sampling=sampling, stats=stats)

        if req.stream:
            ticket = svc.admit()
            try:
                stats, pieces = run_one(prompts[0])
            except BaseException:
                ticket.release()
                raise
            chunks = completion_chunks(pieces, stats, cid, req.model, started, metrics)
            return HeldStream(chunks, ticket, lambda: metrics.disconnects.labels(route="completions").inc())
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            with svc.admit():
                stats, pieces = run_one(prompt)
                try:
                    text = "".join(pieces)
                except Exception as exc:  # noqa: BLE001 - a model failure is this request's error, not the server's
                    log.exception("completion %s failed", cid)
                    return error_response(500, f"the model failed: {exc}", type_="server_error",
                                          code="generation_failed")
            prompt_tokens += bot.lm.count_tokens(prompt)
            completion_tokens += int(stats.get("tokens", 0))
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": finish_reason(stats.get("finish"))})
        metrics.turn.labels(route="completions").observe(time.monotonic() - started)
        metrics.tokens.labels(route="completions").inc(completion_tokens)
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return api
