"""LLaVA's controller and worker protocol, field for field what LLaVA's own controller, workers and clients send,
so they interoperate with ours.

Controller: ``/register_worker``, ``/refresh_all_workers``, ``/list_models``, ``/get_worker_address``,
``/receive_heart_beat``, ``/worker_get_status``, ``/worker_generate_stream`` (proxied). Worker:
``/worker_get_status`` and ``/worker_generate_stream``, whose answer is NUL-framed :class:`StreamChunk` objects
(:mod:`llava.http_client`) with the cumulative text, prompt included.
"""
from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llava.constants import ErrorCode
from llava.serve.protocol.fields import Stop, Temperature, TopP, stop_list

__all__ = [
    "MAX_SPEED",
    "MAX_QUEUE_LENGTH",
    "worker_base_url",
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
    "GenerateStreamRequest",
    "StreamChunk",
]

# --------------------------------------------------------------------------------------------------- controller

MAX_SPEED = 1e6  # a worker's reported speed, at most (LLaVA's workers send 1)
MAX_QUEUE_LENGTH = 1_000_000  # a worker's reported queue length, at most
MAX_WORKER_URL = 2048  # characters


def worker_base_url(value: str) -> str:
    """A worker's name: its ``http(s)://host[:port]`` base URL (a trailing slash dropped), without credentials,
    path, query, fragment, spaces or control characters. Anything else is refused: the controller POSTs to
    ``<name>/...`` and logs the name, so a path would aim its requests elsewhere and a newline would forge log
    lines."""
    value = value.rstrip("/")
    if len(value) > MAX_WORKER_URL or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"must be the worker's http(s) base URL (printable ASCII, at most {MAX_WORKER_URL} "
                         f"characters), got {value[:80]!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"must be the worker's http(s) base URL, got {value[:80]!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be the worker's http(s) base URL, got {value[:80]!r}")
    if parts.username is not None or parts.path or parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError(f"must be a base URL (http(s)://host:port, no credentials, path or query), got "
                         f"{value[:80]!r}")
    return value


class WorkerStatus(BaseModel):
    """What a worker (or a controller, summed over its workers) reports about itself."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_names: list[str] = Field(default_factory=list)
    speed: float = Field(1.0, ge=0.0, le=MAX_SPEED, allow_inf_nan=False,
                         description="relative throughput; dispatch weight")
    queue_length: int = Field(0, ge=0, le=MAX_QUEUE_LENGTH)
    conv_mode: str | None = Field(None, description="the worker's chat template (LLaVA clients ignore it)")
    healthy: bool | None = Field(None, description="whether the worker's model can answer now (a remote model's "
                                 "servers are up; null: not said, as LLaVA's workers); a controller sends no requests "
                                 "to a worker that says false")
    backend: str | None = Field(None, description="where the model runs: 'local', or 'openai' for a remote model")
    upstream: dict[str, Any] | None = Field(None, description="a remote model: its id, whether it returns "
                                            "logprobs, and each server's URL and health")
    model_family: str | None = Field(None, description="the model's family (llava, llava_next, qwen2_5_vl, idefics3, "
                                     "gemma3, transformers), read from its config")
    prompt_format: str | None = Field(None, description="what renders prompts: 'LLaVA conversation template' "
                                      "(conv_mode) or 'processor chat template' (the model's own; LLaVA-protocol "
                                      "prompts, in conv_mode, are parsed back into a chat first)")
    random_weights: bool | None = Field(None, description="the model is a random-weight test model (its text is "
                                                          "random); clients show it")


class RegisterWorkerRequest(BaseModel):
    """``POST /register_worker``. ``worker_name`` is the worker's base URL, e.g. ``http://127.0.0.1:40000``."""

    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1)
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None

    @field_validator("worker_name")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return worker_base_url(value)


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
    queue_length: int = Field(0, ge=0, le=MAX_QUEUE_LENGTH)
    healthy: bool = Field(True, description="whether the worker's model can answer now (LLaVA's workers do not "
                          "send it: healthy)")

    @field_validator("worker_name")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return worker_base_url(value)


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
    healthy: bool = Field(True, description="whether the model can answer now (a remote model's servers are up)")


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
        return stop_list(self.stop)


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

