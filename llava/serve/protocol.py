"""The serving wire protocol as typed models.

Three families, all JSON:

* **LLaVA controller/worker** (``/register_worker`` ... ``/worker_generate_stream``), field for field what LLaVA's
  own controller, workers and clients send, so they interoperate with ours.
* **ECSO stream**: one request (image + query + options) answered by one event per pipeline step.
* **OpenAI chat completions** (``/v1/chat/completions``): request with ``image_url`` content parts, response,
  stream chunk, error body, plus an optional ``ecso`` switch.

Streams (LLaVA chunks and ECSO events) are framed as ``json + b"\\0"``; see :mod:`llava.http_client`.
Range checks live here, so every service rejects the same values with the same message, which names the field and
the value (:func:`describe_validation_error`).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llava.constants import ErrorCode
from llava.ecso.prompts import PROMPT_SETS
from llava.generation import MAX_NEW_TOKENS_LIMIT

__all__ = [
    # controller
    "WorkerStatus",
    "RegisterWorkerRequest",
    "RegisterWorkerResponse",
    "RefreshWorkersResponse",
    "ListModelsResponse",
    "WorkerAddressRequest",
    "WorkerAddressResponse",
    "HeartBeatRequest",
    "HeartBeatResponse",
    "HealthResponse",
    "WorkerHealthResponse",
    # LLaVA stream
    "GenerateStreamRequest",
    "StreamChunk",
    # ECSO stream
    "ECSOOptions",
    "ECSOStreamRequest",
    "ECSOEventType",
    "ECSOEvent",
    # OpenAI
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
    "describe_validation_error",
]

_REPR_LIMIT = 80
_MAX_LISTED = 5  # errors spelled out in one message

# Reusable field types: finite floats in range. ``allow_inf_nan=False`` because NaN passes no comparison and would
# otherwise slip through as "not less than 0".
Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False, description="sampling temperature; 0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass, in (0, 1]")]
MAX_STOP_STRINGS = 16  # each is searched for after every token; OpenAI allows 4


def _few_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    return value


Stop = Annotated[str | list[str] | None, AfterValidator(_few_stops)]


def _stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


# --------------------------------------------------------------------------------------------------- controller


class WorkerStatus(BaseModel):
    """What a worker (or a controller, summed over its workers) reports about itself."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_names: list[str] = Field(default_factory=list)
    speed: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="relative throughput; dispatch weight")
    queue_length: int = Field(0, ge=0)
    conv_mode: str | None = Field(None, description="the worker's chat template (LLaVA clients ignore it)")


class RegisterWorkerRequest(BaseModel):
    """``POST /register_worker``. ``worker_name`` is the worker's base URL, e.g. ``http://127.0.0.1:40000``."""

    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1)
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None

    @field_validator("worker_name")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be the worker's http(s) base URL, got {value!r}")
        return value.rstrip("/")


class RegisterWorkerResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    worker_name: str
    model_names: list[str]


class RefreshWorkersResponse(BaseModel):
    workers: int
    removed: list[str]


class ListModelsResponse(BaseModel):
    models: list[str]


class WorkerAddressRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str


class WorkerAddressResponse(BaseModel):
    address: str = Field(description='the chosen worker\'s base URL, "" when no worker serves the model')


class HeartBeatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1)
    queue_length: int = Field(0, ge=0)


class HeartBeatResponse(BaseModel):
    exist: bool = Field(description="false: the controller does not know this worker; it should re-register")


class HealthResponse(BaseModel):
    """A controller's ``GET /health``: its live ``workers``."""

    status: Literal["ok"] = "ok"
    workers: int = Field(0, ge=0)


class WorkerHealthResponse(BaseModel):
    """A model worker's ``GET /health`` (answered once the model is loaded)."""

    status: Literal["ok"] = "ok"
    models: list[str]
    queue_length: int = Field(0, ge=0)


# ------------------------------------------------------------------------------------------------- LLaVA stream


class GenerateStreamRequest(BaseModel):
    """``POST /worker_generate_stream`` (worker, and the controller's proxy). Unknown fields are kept and passed on."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str
    images: list[str] = Field(default_factory=list, description="base64-encoded images, one per <image> token")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    max_new_tokens: int = Field(256, ge=0, description="0 returns the prompt with no new tokens")
    stop: Stop = None

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list (LLaVA clients send one string)."""
        return _stop_list(self.stop)


class StreamChunk(BaseModel):
    """One frame of ``/worker_generate_stream``: cumulative ``text`` (prompt included, as LLaVA does) and
    ``error_code`` (:class:`~llava.constants.ErrorCode`); on errors ``text`` is a human message, ``detail`` the cause.
    ``error_code`` is a plain int so chunks from workers with codes we do not know still decode."""

    model_config = ConfigDict(extra="allow")

    text: str = ""
    error_code: int = Field(int(ErrorCode.OK), ge=0)
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code == ErrorCode.OK


# -------------------------------------------------------------------------------------------------- ECSO stream


class ECSOOptions(BaseModel):
    """Options of one ECSO run, named as the fields of :class:`llava.ecso.pipeline.ECSOConfig`. A field left out
    (``null``) takes the serving worker's default (its ``--verdict``, ``--threshold``, ... flags). Closed: an
    unknown field is an error, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["score", "exact", "parse"] | None = Field(
        None,
        description="score: P(yes) vs P(no) of the first answer token; exact: the paper's string match "
        "('yes'/'yes.' only); parse: the first word of the answer",
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="score verdict: flag when P(yes) >= threshold"
    )
    prompt_set: str | None = Field(None, min_length=1, description="ECSO prompt templates, by name ('paper')")
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="new tokens per generated step (direct, caption, safe)"
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    image_in_safe_step: bool | None = Field(None, description="keep the image in step 4 (the safe answer)")

    @field_validator("prompt_set")
    @classmethod
    def _known_prompt_set(cls, value: str | None) -> str | None:
        if value is not None and value not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {value!r}; valid: {', '.join(sorted(PROMPT_SETS))}")
        return value

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as ``ECSOConfig`` keyword arguments."""
        return self.model_dump(exclude_none=True)


class ECSOStreamRequest(BaseModel):
    """Request of the ECSO stream endpoint: one image (base64, or none for text-only) and one query."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name, for routing; a worker serves its own model")
    image: str | None = Field(None, description="base64-encoded image; null for a text-only query")
    query: str = Field(min_length=1)
    options: ECSOOptions = Field(default_factory=ECSOOptions)
    direct: str | None = Field(None, description="check this answer instead of generating step 1 (the first event is "
                               "then a done 'direct' event with this text)")


ECSOEventType = Literal["direct", "verdict", "caption", "safe", "final", "error"]


class ECSOEvent(BaseModel):
    """One step of an ECSO run. A streaming step (``direct``, ``caption``, ``safe``) sends events with ``delta``
    (new text) and ``done: false``, then one with ``done: true`` and the step's full ``text``. ``verdict`` carries
    ``flagged``, the verdict ``text`` and (score mode) ``harm_score``; ``caption``/``safe`` only follow a flagged
    verdict; ``final`` carries the answer to show, ``flagged`` and ``harm_score``; ``error`` carries a non-zero
    ``error_code`` and ``detail`` and ends the stream. ``elapsed``: seconds the step took (``final``: the whole
    run)."""

    model_config = ConfigDict(extra="ignore")

    event: ECSOEventType
    text: str | None = None
    delta: str | None = None
    done: bool | None = None
    flagged: bool | None = None
    harm_score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    elapsed: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    error_code: int | None = Field(None, ge=0)
    detail: str | None = None

    @model_validator(mode="after")
    def _error_code_iff_error(self) -> ECSOEvent:
        if self.event == "error" and not self.error_code:
            raise ValueError(f"an error event needs a non-zero error_code, got {self.error_code!r}")
        if self.event != "error" and self.error_code:
            raise ValueError(f"error_code {self.error_code} on a {self.event!r} event; use event 'error'")
        return self


# ------------------------------------------------------------------------------------------------------- OpenAI


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
            raise ValueError(f"must be a data: or http(s) URL, got {_short(value)}")
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
    ``ecso: true`` runs the ECSO pipeline instead of a direct answer."""

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
    ecso: bool = False
    ecso_options: ECSOOptions | None = Field(None, description="ECSO settings for this request (with ecso)")

    def token_limit(self, default: int) -> int:
        """Maximum new tokens: ``max_completion_tokens``, else ``max_tokens``, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls]


class ECSOInfo(BaseModel):
    """What ECSO did, attached to an OpenAI response (or the last stream chunk) when ``ecso`` was requested: the
    fields of :class:`llava.ecso.pipeline.ECSOResult` except the query and the final answer (the message)."""

    direct: str = Field(description="step 1: the answer with the image")
    flagged: bool = Field(description="step 2: the model judged its direct answer harmful")
    harm_score: float | None = Field(None, ge=0.0, le=1.0, description="P(yes) of the harm check (score verdict)")
    verdict_text: str | None = None
    verdict_mode: str | None = Field(None, description="the verdict mode used (score falls back to parse)")
    caption: str | None = Field(None, description="step 3, only when flagged")
    safe_answer: str | None = Field(None, description="step 4, only when flagged")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per step")


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


# ------------------------------------------------------------------------------------------------------ helpers


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def describe_validation_error(err: ValidationError | Any) -> tuple[str, str | None]:
    """``(message, param)`` for a pydantic (or FastAPI request) validation error: one ``field: problem (got value)``
    per error (the first five), joined by ``; ``, and the first offending field's dotted path. A leading ``body``
    location (FastAPI) is dropped, and values are shortened so a base64 image does not end up in a log line."""
    parts: list[str] = []
    params: list[str] = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":  # FastAPI's body parser: loc ("body", offset), ctx {"error": ...}
            where = f" at character {loc[-1]}" if loc and loc[-1].isdigit() else ""
            parts.append(f"the request body is not valid JSON ({(e.get('ctx') or {}).get('error', msg)}{where})")
            continue
        field = ".".join(loc) or "request"
        if loc:
            params.append(field)
        if e.get("type") == "missing":
            parts.append(f"{field}: field required" if loc else "the request body is empty: send a JSON object")
        else:
            parts.append(f"{field}: {msg} (got {_short(e.get('input'))})")
    if len(parts) > _MAX_LISTED:
        parts[_MAX_LISTED:] = [f"and {len(parts) - _MAX_LISTED} more"]
    return "; ".join(parts) or "invalid request", (params[0] if params else None)
