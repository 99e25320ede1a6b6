"""Request bodies. Unknown OpenAI options are accepted and ignored; the native body rejects unknown keys."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Union[StrictStr, list[TextPart]]

    @field_validator("role", mode="before")
    @classmethod
    def _no_tools(cls, role):
        if role in ("tool", "function"):
            raise ValueError(f"{role!r} messages are not served: the bot calls no tools; send the conversation's "
                             "text as user and assistant messages")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        """Say what is wrong in the client's terms, not the union's (a tool call with no text, an image part)."""
        if content is None:
            raise ValueError("a message needs text content (an assistant message that only calls tools has none: the "
                             "bot calls no tools)")
        if isinstance(content, list):
            kinds = {p.get("type") for p in content if isinstance(p, dict)} - {"text"}
            if kinds:
                raise ValueError(f"only text parts are served, not {', '.join(sorted(map(str, kinds)))}; send the "
                                 "text alone")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """The OpenAI request. ``session_id`` (extension) stores the exchange in that session."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage]
    stream: StrictBool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: int | None = None
    user: StrictStr | None = None
    session_id: StrictStr | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is served (one reply per request); send the request again for another reply")
        return n

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class CompletionRequest(BaseModel):
    """The OpenAI legacy completion request: the raw language model continues ``prompt`` (no skill, no alignment)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr]]
    stream: StrictBool = False
    max_tokens: int | None = Field(16, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    user: StrictStr | None = None


class NativeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: StrictStr = Field(min_length=1)
    session_id: StrictStr | None = None
    skill: StrictStr | None = None
    user: StrictStr = ""
