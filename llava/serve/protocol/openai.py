"""OpenAI's chat completions (``/v1/chat/completions``, ``/v1/models``) as this project's worker speaks them:
request with ``image_url`` content parts, response, stream chunk, error body, plus the optional ``ecso`` switch and
the :class:`ECSOInfo` attached to ECSO answers."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava.serve.protocol.ecso import ECSOOptions
from llava.serve.protocol.fields import Stop, TopP, short_repr, stop_list

__all__ = [
    "TextPart",
    "ImageURL",
    "ImageURLPart",
    "ContentPart",
    "ChatMessage",
    "StreamOptions",
    "ChatCompletionRequest",
    "ECSOInfo",
    "Usage",
    "TopLogprob",
    "TokenLogprob",
    "ChoiceLogprobs",
    "AssistantMessage",
    "ChatChoice",
    "ChatCompletionResponse",
    "ChunkDelta",
    "ChunkChoice",
    "ChatCompletionChunk",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorResponse",
]

class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL (data:image/png;base64,...) or an http(s) URL")
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("data:", "http://", "https://")):
            raise ValueError(f"must be a data: or http(s) URL, got {short_repr(value)}")
        return value


class ImageURLPart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content")
        return self

    @property
    def text(self) -> str:
        """The message's text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or [] if isinstance(p, TextPart))

    @property
    def image_urls(self) -> list[str]:
        if isinstance(self.content, str) or self.content is None:
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImageURLPart)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown OpenAI fields (penalties, logit_bias, ...) are ignored.
    ``ecso: true`` runs the ECSO pipeline instead of a direct answer; ``false`` asks for the direct answer where the
    worker's policy allows it; left out, the worker's policy decides."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: TopP = 1.0
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if both set")
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice is supported")
    seed: int | None = None
    user: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, description="alternatives per token (needs logprobs: true)")
    ecso: bool | None = Field(None, description="true: answer with ECSO; false: opt out where the worker allows it "
                              "(--allow-ecso-opt-out); null: the worker's policy (--ecso-stream)")
    ecso_options: ECSOOptions | None = Field(None, description="ECSO settings for this request (with ecso)")

    def token_limit(self, default: int) -> int:
        """Maximum new tokens: ``max_completion_tokens``, else ``max_tokens``, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default

    @property
    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls]


class ECSOInfo(BaseModel):
    """What ECSO did, attached to an OpenAI response (or the last stream chunk) when ``ecso`` was requested: the
    fields of :class:`llava.ecso.events.ECSOResult` except the query and the final answer (the message)."""

    direct: str = Field(description="step 1: the answer with the image")
    flagged: bool = Field(description="step 2: the model judged its direct answer harmful")
    harm_score: float | None = Field(None, ge=0.0, le=1.0,
                                     description="P(yes) of the harm check when the answer was scored, else null")
    verdict_text: str | None = None
    verdict_mode: str | None = Field(None, description="the verdict mode used (score falls back to parse)")
    verdict_fallback: str | None = Field(None, description="why the configured verdict mode was not used, e.g. 'the "
                                         "endpoint returns no logprobs'; null when it was")
    caption: str | None = Field(None, description="step 3, only when flagged")
    safe_answer: str | None = Field(None, description="step 4, only when flagged")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step")
    policy: Literal["hold", "monitor"] | None = Field(
        None, description="hold: the message is ECSO's final answer; monitor: the message is the direct answer, sent "
        "unchanged, and this is ECSO's verdict of it (no caption or safe answer)")
    model_family: str | None = Field(None, description="the model's family (llava, llava_next, qwen2_5_vl, idefics3, "
                                     "gemma3, transformers)")


class Usage(BaseModel):
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    total_tokens: int = Field(0, ge=0)


FinishReason = Literal["stop", "length", "content_filter"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Log-probabilities of generated tokens (this worker: the first generated token)."""

    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None = "stop"
    logprobs: ChoiceLogprobs | None = None


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    ecso: ECSOInfo | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data: {...}`` server-sent event of a streamed completion (the stream ends with ``data: [DONE]``)."""

    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    ecso: ECSOInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "ecso"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_error")
    code: str | None = None
    param: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "code", "param"}}``."""

    error: OpenAIError

