"""LangChain: `FewShotBotChat` is a `BaseChatModel`, so the bot drops into any LangChain chain.

In process (``FewShotBotChat(bot=bot)``) it runs the turn directly; against a server (``base_url=...``) it speaks the
OpenAI-compatible API. The chosen skill and the sources come back in ``response_metadata``.

Example:
    >>> from langchain_core.prompts import ChatPromptTemplate
    >>> chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | FewShotBotChat(bot=bot)
    >>> chain.invoke({"question": "hi! what do you like to do?"}).content
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import httpx
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def _messages(messages: list[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        if m.type not in _ROLES:
            raise ValueError(f"FewShotBotChat takes human, ai and system messages, not {m.type!r}")
        out.append({"role": _ROLES[m.type], "content": m.content if isinstance(m.content, str) else str(m.content)})
    return out


class FewShotBotChat(BaseChatModel):
    """The Few-Shot Bot as a LangChain chat model.

    Args:
        bot: an in-process `app.bot.Bot` (or None to use ``base_url``).
        base_url: the FSB server, e.g. ``http://127.0.0.1:8000``.
        skill: force a skill (``None``: the selector picks one per turn).
        api_key: sent as ``Authorization: Bearer`` to a server with keys.
        max_tokens: cap on the reply's tokens (``None``: the skill's setting).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    bot: Any = None
    base_url: Optional[str] = None
    skill: Optional[str] = None
    api_key: Optional[str] = None
    max_tokens: Optional[int] = None
    timeout: float = 120.0

    @property
    def _llm_type(self) -> str:
        return "few-shot-bot"

    @property
    def _identifying_params(self) -> dict:
        return {"skill": self.skill, "base_url": self.base_url}

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        text, meta = "", {}
        for piece, info in self._pieces(messages):
            text += piece
            meta = info or meta
        text = _cut(text, stop)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text, response_metadata=meta))])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for piece, info in self._pieces(messages):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece, response_metadata=info or {}))
            if run_manager and piece:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _pieces(self, messages: list[BaseMessage]) -> Iterator[tuple[str, dict | None]]:
        payload = _messages(messages)
        if self.bot is not None:
            stream = self.bot.turn(payload, skill=self.skill, max_tokens=self.max_tokens)
            for piece in stream:
                yield piece, None
            reply = stream.reply
            yield "", {"skill": reply.skill, "sources": reply.passages, "finish_reason": reply.finish_reason}
            return
        if not self.base_url:
            raise ValueError("FewShotBotChat needs a bot or a base_url")
        body = {"model": f"fsb:{self.skill}" if self.skill else "fsb", "messages": payload, "stream": True}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.stream("POST", self.base_url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers,
                          timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"FSB server answered {r.status_code}: {r.text}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                choice = event["choices"][0]
                yield choice["delta"].get("content") or "", (
                    {"finish_reason": choice["finish_reason"]} if choice.get("finish_reason") else None)


def _cut(text: str, stop: Optional[list[str]]) -> str:
    cuts = [text.find(s) for s in stop or [] if s and s in text]
    return text[: min(cuts)] if cuts else text
