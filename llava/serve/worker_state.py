"""A model worker's configuration and shared state: what its routes (:mod:`llava.serve.worker_llava`,
:mod:`llava.serve.worker_ecso`, :mod:`llava.serve.worker_openai`) and its registration import, so no route imports
the app module (:mod:`llava.serve.model_worker`). The routes reach the model only through the state's
:class:`~llava.serve.worker_model.WorkerModel` (its :class:`~llava.ecso.backends.ServingBackend` under the
concurrency slots): a model loaded here (``--backend local``) or served by OpenAI-compatible servers
(``--backend openai``: the worker is then an ECSO guardrail in front of them)."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from PIL import Image

from llava.constants import (CONTROLLER_PORT, DEFAULT_HOST, DEFAULT_IMAGE_TOKEN, WORKER_HEART_BEAT_INTERVAL,
                             WORKER_PORT)
from llava.conversation import Chat
from llava.ecso.backends import Prepared, ServingBackend
from llava.ecso.config import ECSOConfig
from llava.ecso.pipeline import ECSO
from llava.ecso.registry import create_backend
from llava.errors import InvalidRequestError, ModelNotFoundError, UnsupportedError
from llava.generation import MAX_NEW_TOKENS_LIMIT
from llava.http_client import OPENAI_API_KEY_ENV
from llava.mm_utils import ImageLimits
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES
from llava.serve.protocol.llava import WorkerStatus
from llava.serve.worker_model import WorkerModel
from llava.serve.worker_runtime import ImageIntake, ImagePolicy, ModelSlots

__all__ = ["ECSO_POLICIES", "RemoteModel", "WorkerConfig", "WorkerState", "get_state", "load_backend"]

# How ECSO applies to the OpenAI API's chat completions (--ecso-stream): every answer is ECSO's, streamed once the
# verdict is in (hold); every answer is direct and streamed at once, with ECSO's verdict of it attached (monitor);
# direct unless a request asks for ECSO (off).
ECSO_POLICIES = ("hold", "monitor", "off")


@dataclass(frozen=True)
class RemoteModel:
    """A worker's model served elsewhere (``--backend openai``): its OpenAI-compatible servers (base URLs up to
    ``/v1``, serving the same model), the model id there (``None``: the first their ``/v1/models`` lists), the
    environment variable holding their key (the key itself is never in the config), seconds per request, retries
    on other servers, the cool-down of a server that failed, and the first-token alternatives asked for when
    scoring yes/no."""

    base_urls: tuple[str, ...]
    model: str | None = None
    api_key_env: str = OPENAI_API_KEY_ENV
    timeout: float = 300.0
    retries: int = 2
    cooldown: float = 10.0
    top_logprobs: int = 20

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("--backend openai needs --openai-base-url (or OPENAI_BASE_URL)")
        for url in self.base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--openai-base-url must be http(s) URLs up to /v1, got {url!r}")
        if self.retries < 0 or not self.cooldown > 0 or not self.timeout > 0 or self.top_logprobs < 1:
            raise ValueError(f"retries must be >= 0, cooldown and timeout > 0 s, top_logprobs >= 1; got "
                             f"{self.retries}, {self.cooldown}, {self.timeout}, {self.top_logprobs}")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs; built from the command line by :func:`config_from_args`. ``ecso`` holds the
    defaults of ECSO runs (requests override them field by field)."""

    model_path: str = "tiny"
    backend: str = "local"
    remote: RemoteModel | None = None
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
    max_image_aspect_ratio: float = ImageLimits().max_aspect_ratio
    decode_concurrency: int = 2
    cache_bytes: int = DEFAULT_CACHE_BYTES
    allow_image_urls: bool = False
    allow_private_image_urls: bool = False
    image_url_timeout: float = 10.0
    max_top_logprobs: int = 20
    ecso: ECSOConfig = field(default_factory=lambda: ECSOConfig(max_new_tokens=512))
    ecso_stream: str | None = None  # the policy (ECSO_POLICIES); None: hold with a remote model, else off
    allow_ecso_opt_out: bool = False
    api_key: str | None = field(default=None, repr=False)
    log_level: str = "info"
    log_ips: bool = False

    def __post_init__(self) -> None:
        for name in ("limit_model_concurrency", "max_image_pixels", "max_request_bytes", "max_images_per_request",
                     "decode_concurrency", "cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_image_aspect_ratio < math.inf:
            raise ValueError(f"max_image_aspect_ratio must be a finite number >= 1, got {self.max_image_aspect_ratio!r}")
        for name in ("heart_beat_interval", "image_url_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
        if self.ecso_stream is not None and self.ecso_stream not in ECSO_POLICIES:
            raise ValueError(f"unknown --ecso-stream {self.ecso_stream!r}; valid: {', '.join(ECSO_POLICIES)}")
        if self.backend == "openai" and self.remote is None:
            raise ValueError("--backend openai needs --openai-base-url (or OPENAI_BASE_URL)")
        for name in ("controller_url", "worker_address"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL, got {value!r}")

    @property
    def ecso_policy(self) -> str:
        """How the OpenAI API applies ECSO (``--ecso-stream``): ``hold`` in front of a remote model (the guardrail),
        ``off`` (on request) for a model loaded here, unless set."""
        return self.ecso_stream or ("hold" if self.backend == "openai" else "off")

    @property
    def address(self) -> str:
        """The URL the controller reaches this worker at (its ``worker_name``)."""
        if self.worker_address:
            return self.worker_address.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            limits=ImageLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_request_bytes,
                               max_aspect_ratio=self.max_image_aspect_ratio),
            max_images=self.max_images_per_request,
            allow_urls=self.allow_image_urls,
            allow_private_urls=self.allow_private_image_urls,
            url_timeout=self.image_url_timeout,
        )


@dataclass
class WorkerState:
    """What the endpoints share (``app.state.worker``). The routes reach the model only through ``model``."""

    config: WorkerConfig
    backend: ServingBackend
    slots: ModelSlots
    http: httpx.AsyncClient  # registration, heartbeats, image URLs
    policy: ImagePolicy
    jobs: set[asyncio.Task] = field(default_factory=set)
    model: WorkerModel = field(init=False)
    images: ImageIntake = field(init=False)

    def __post_init__(self) -> None:  # runs in the app's lifespan (the intake's limiter needs the event loop)
        self.model = WorkerModel(self.backend, self.slots, self.jobs)
        self.images = ImageIntake(self.policy, self.backend.fit_image, self.config.decode_concurrency)

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
                            healthy=self.model.reachable, **self.backend.status())

    def check_model(self, name: str, aliases: Sequence[str] = ()) -> None:
        served = [self.model_name, *aliases]
        if name not in served:
            raise ModelNotFoundError(f"model {name!r} is not served by this worker; it serves {served}")

    def check_images(self, count: int, *texts: str | None) -> None:
        """Before any image is decoded or any text tokenized: the model takes images, ``count`` is within the
        limit, and ``texts`` (``<image>`` tags not counted) with ``count`` images can fit the context."""
        if count and not self.multimodal:
            raise InvalidRequestError(f"model {self.model_name!r} has no vision tower; send no images")
        self.policy.check_count(count)
        chars = sum(len(t) - t.count(DEFAULT_IMAGE_TOKEN) * len(DEFAULT_IMAGE_TOKEN) for t in texts if t)
        self.backend.check_budget(chars, count)

    def ecso_config(self, overrides: Mapping[str, Any]) -> ECSOConfig:
        """The worker's ECSO defaults with a request's options applied (validated by ``ECSOConfig``)."""
        return dataclasses.replace(self.config.ecso, **overrides)

    def pipeline(self, overrides: Mapping[str, Any], streamed: bool) -> ECSO:
        """ECSO on the worker's model with its defaults and a request's options; a streamed run leaves out the
        options streams ignore (the worker said so once, at start)."""
        config = self.ecso_config(overrides)
        return ECSO(self.backend, config.for_streaming() if streamed else config, image_limits=self.policy.limits)

    async def check_fits(self, pipeline: ECSO, query: str, images: Sequence[Image.Image],
                         direct: str | None = None) -> Prepared:
        """Prepare the first prompt the run will send: step 1's, or the harm check's when ``direct`` is given, so a
        context overflow is a 400 before anything runs."""
        text = query if direct is None else pipeline.prompts.fill_harm_check(query, direct)
        return await self.model.prepare(Chat.single(text, images))


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker


def load_backend(config: WorkerConfig) -> ServingBackend:
    """The worker's model, created through the backend registry (blocking: it loads a local model; a remote one
    gets ready in :meth:`~llava.ecso.backends.AsyncServingBackend.astart`)."""
    remote = config.remote
    if config.backend == "openai" and remote is not None:
        backend = create_backend("openai", base_url=list(remote.base_urls), model_name=remote.model,
                                 timeout=remote.timeout, image_aspect_ratio=config.image_aspect_ratio,
                                 api_key=os.environ.get(remote.api_key_env) or None,
                                 concurrency=config.limit_model_concurrency, retries=remote.retries,
                                 cooldown=remote.cooldown, serve_as=config.model_name, conv_mode=config.conv_mode,
                                 top_logprobs=remote.top_logprobs)
    elif config.backend == "local":
        backend = create_backend("local", model_path=config.model_path, model_base=config.model_base,
                                 model_name=config.model_name, load_8bit=config.load_8bit,
                                 load_4bit=config.load_4bit, device=config.device, dtype=config.dtype,
                                 image_aspect_ratio=config.image_aspect_ratio, conv_mode=config.conv_mode,
                                 cache_bytes=config.cache_bytes)
    else:
        backend = create_backend(config.backend)
    if not isinstance(backend, ServingBackend):
        raise UnsupportedError(f"backend {backend.name!r} cannot serve a worker (it is not a ServingBackend)")
    return backend
