"""A model worker's configuration and shared state: what its routes (:mod:`llava.serve.worker_llava`,
:mod:`llava.serve.worker_ecso`, :mod:`llava.serve.worker_openai`) and its registration import, so no route imports
the app module (:mod:`llava.serve.model_worker`). The routes reach the model only through the state's
:class:`~llava.ecso.backends.ServingBackend`."""
from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from PIL import Image

from llava.constants import CONTROLLER_PORT, DEFAULT_HOST, WORKER_HEART_BEAT_INTERVAL, WORKER_PORT
from llava.conversation import Chat
from llava.ecso.backends import Prepared, ServingBackend
from llava.ecso.config import ECSOConfig
from llava.ecso.pipeline import ECSO
from llava.ecso.registry import create_backend
from llava.errors import InvalidRequestError, ModelNotFoundError, UnsupportedError
from llava.generation import MAX_NEW_TOKENS_LIMIT
from llava.mm_utils import ImageLimits
from llava.serve.protocol.llava import WorkerStatus
from llava.serve.worker_runtime import ImagePolicy, ModelSlots

__all__ = ["WorkerConfig", "WorkerState", "get_state", "load_backend"]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs; built from the command line by :func:`config_from_args`. ``ecso`` holds the
    defaults of ECSO runs (requests override them field by field)."""

    model_path: str = "tiny"
    model_base: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    conv_mode: str | None = None
    image_aspect_ratio: str | None = None
    host: str = DEFAULT_HOST
    port: int = WORKER_PORT
    controller_url: str = f"http://127.0.0.1:{CONTROLLER_PORT}"
    worker_address: str | None = None  # default: http://<host>:<port> (localhost for 0.0.0.0)
    register: bool = True
    heart_beat_interval: float = float(WORKER_HEART_BEAT_INTERVAL)
    limit_model_concurrency: int = 5
    max_new_tokens: int = 512
    max_image_pixels: int = ImageLimits().max_pixels
    max_request_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 8
    allow_image_urls: bool = False
    allow_private_image_urls: bool = False
    image_url_timeout: float = 10.0
    max_top_logprobs: int = 20
    ecso: ECSOConfig = field(default_factory=lambda: ECSOConfig(max_new_tokens=512))
    api_key: str | None = field(default=None, repr=False)
    log_level: str = "info"
    log_ips: bool = False

    def __post_init__(self) -> None:
        for name in ("limit_model_concurrency", "max_image_pixels", "max_request_bytes", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("heart_beat_interval", "image_url_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
        for name in ("controller_url", "worker_address"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL, got {value!r}")

    @property
    def address(self) -> str:
        """The URL the controller reaches this worker at (its ``worker_name``)."""
        if self.worker_address:
            return self.worker_address.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            limits=ImageLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_request_bytes),
            max_images=self.max_images_per_request,
            allow_urls=self.allow_image_urls,
            allow_private_urls=self.allow_private_image_urls,
            url_timeout=self.image_url_timeout,
        )


@dataclass
class WorkerState:
    """What the endpoints share (``app.state.worker``). The routes reach the model only through ``backend``."""

    config: WorkerConfig
    backend: ServingBackend
    slots: ModelSlots
    http: httpx.AsyncClient  # registration, heartbeats, image URLs
    policy: ImagePolicy
    jobs: set[asyncio.Task] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    @property
    def multimodal(self) -> bool:
        return self.backend.multimodal

    @property
    def model_family(self) -> str | None:
        return self.backend.status().get("model_family")

    def status(self) -> WorkerStatus:
        return WorkerStatus(model_names=[self.model_name], speed=1.0, queue_length=self.slots.queue_length,
                            **self.backend.status())

    def check_model(self, name: str, aliases: Sequence[str] = ()) -> None:
        served = [self.model_name, *aliases]
        if name not in served:
            raise ModelNotFoundError(f"model {name!r} is not served by this worker; it serves {served}")

    def check_images(self, count: int) -> None:
        if count and not self.multimodal:
            raise InvalidRequestError(f"model {self.model_name!r} has no vision tower; send no images")

    def ecso_config(self, overrides: Mapping[str, Any]) -> ECSOConfig:
        """The worker's ECSO defaults with a request's options applied (validated by ``ECSOConfig``)."""
        return dataclasses.replace(self.config.ecso, **overrides)

    def pipeline(self, overrides: Mapping[str, Any], streamed: bool) -> ECSO:
        """ECSO on the worker's model with its defaults and a request's options; a streamed run leaves out the
        options streams ignore (the worker said so once, at start)."""
        config = self.ecso_config(overrides)
        return ECSO(self.backend, config.for_streaming() if streamed else config, image_limits=self.policy.limits)

    def check_fits(self, pipeline: ECSO, query: str, images: Sequence[Image.Image],
                   direct: str | None = None) -> Prepared:
        """Prepare the first prompt the run will send (blocking): step 1's, or the harm check's when ``direct`` is
        given, so a context overflow is a 400 before anything runs."""
        text = query if direct is None else pipeline.prompts.fill_harm_check(query, direct)
        return self.backend.prepare(Chat.single(text, images))


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker


def load_backend(config: WorkerConfig) -> ServingBackend:
    """The worker's model, created through the backend registry (blocking: it loads the model)."""
    backend = create_backend("local", model_path=config.model_path, model_base=config.model_base,
                             model_name=config.model_name, load_8bit=config.load_8bit, load_4bit=config.load_4bit,
                             device=config.device, dtype=config.dtype, image_aspect_ratio=config.image_aspect_ratio,
                             conv_mode=config.conv_mode)
    if not isinstance(backend, ServingBackend):
        raise UnsupportedError(f"backend {backend.name!r} cannot serve a worker (it is not a ServingBackend)")
    return backend
