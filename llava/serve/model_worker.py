"""Model worker: one loaded model behind LLaVA's worker protocol, an ECSO stream and an OpenAI-compatible API.

* LLaVA: ``POST /worker_get_status`` -> ``{model_names, speed, queue_length}``; ``POST /worker_generate_stream``
  (templated prompt + base64 images) -> NUL-delimited chunks with the cumulative text, prompt included.
* ECSO: ``POST /worker_ecso_stream`` (image + query + options) -> one NUL-delimited event per step
  (:mod:`llava.serve.worker_ecso`).
* OpenAI: ``GET /v1/models``, ``POST /v1/chat/completions`` (:mod:`llava.serve.worker_openai`).
* ``GET /health`` (no key needed; answers once the model is loaded).

The worker registers with its controller at start (retrying with backoff while the controller is down), heart-beats
every ``--heart-beat-interval`` seconds and registers again when the controller has forgotten it.

Run: ``python -m llava.serve.model_worker --controller http://localhost:10000 --port 40000 --worker
http://localhost:40000 --model-path llava-v1.5-7b`` (``--help`` lists every flag).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llava.cli_args import add_ecso_args, add_model_args
from llava.constants import CONTROLLER_PORT, DEFAULT_HOST, WORKER_HEART_BEAT_INTERVAL, WORKER_PORT
from llava.ecso.config import ECSOConfig, ecso_config_from_args
from llava.errors import ECSOError, InvalidRequestError, ModelNotFoundError
from llava.generation import MAX_NEW_TOKENS_LIMIT, GenerationParams
from llava.mm_utils import ImageLimits
from llava.http_client import encode_chunk, resolve_api_key
from llava.serve.server import (
    STREAM_MEDIA_TYPE,
    BodyLimitMiddleware,
    add_server_arguments,
    configure_logging,
    error_chunk,
    install_error_handlers,
    llava_error_frame,
    require_api_key,
    run_app,
)
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import GenerateStreamRequest, StreamChunk, WorkerHealthResponse, WorkerStatus
from llava.serve.worker_registration import registration_loop
from llava.serve.worker_runtime import ImagePolicy, ModelSlots, decode_images, stream_model

__all__ = ["WorkerConfig", "WorkerState", "create_app", "build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------- config


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
    """What the endpoints share (``app.state.worker``)."""

    config: WorkerConfig
    engine: Any  # llava.model.engine.LlavaEngine
    slots: ModelSlots
    http: httpx.AsyncClient  # registration, heartbeats, image URLs
    policy: ImagePolicy
    jobs: set[asyncio.Task] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        return self.engine.loaded.model_name

    @property
    def conv_mode(self) -> str:
        return self.engine.loaded.conv_mode

    @property
    def multimodal(self) -> bool:
        """From the model's config (a vision tower is configured), never from its name."""
        return getattr(self.engine.model.config, "vision_config", None) is not None

    def status(self) -> WorkerStatus:
        return WorkerStatus(model_names=[self.model_name], speed=1.0, queue_length=self.slots.queue_length,
                            conv_mode=self.conv_mode)

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


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker


# ------------------------------------------------------------------------------------------------- LLaVA API


def _chunk_response(exc: BaseException) -> Response:
    status = exc.status if isinstance(exc, ECSOError) else 500
    if status >= 500:
        logger.error("worker_generate_stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    else:
        logger.info("worker_generate_stream -> %d: %s", status, exc)
    return Response(encode_chunk(error_chunk(exc)), status_code=status, media_type=STREAM_MEDIA_TYPE)


async def _prepare_generate(state: WorkerState, raw: bytes) -> tuple[GenerateStreamRequest, list, GenerationParams]:
    try:
        req = GenerateStreamRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)[0]) from None
    state.check_model(req.model)
    state.check_images(len(req.images))
    images = await anyio.to_thread.run_sync(decode_images, req.images, state.policy)
    # Tokenizing checks the <image> count and the context length before anything is streamed.
    await anyio.to_thread.run_sync(state.engine.encode, req.prompt, images)
    params = GenerationParams(max_new_tokens=min(max(req.max_new_tokens, 1), MAX_NEW_TOKENS_LIMIT),
                              temperature=req.temperature, top_p=req.top_p, stop=tuple(req.stop_list))
    return req, images, params


async def _llava_chunks(state: WorkerState, prompt: str, images: list, params: GenerationParams) -> AsyncIterator[bytes]:
    """Cumulative chunks (prompt + text so far); a failure ends the stream with an error chunk. A client that goes
    away stops the generation at the next token (``stop``), which frees the slot."""
    text, sent, stop = "", False, threading.Event()
    try:
        async for delta in stream_model(state.slots, lambda: state.engine.stream(prompt, images, params,
                                                                                 should_stop=stop.is_set),
                                        state.jobs, stop):
            text += delta
            sent = True
            yield encode_chunk(StreamChunk(text=prompt + text))
        if not sent:
            yield encode_chunk(StreamChunk(text=prompt))
    except Exception as exc:  # noqa: BLE001 - reported to the client as a chunk
        logger.warning("worker_generate_stream failed mid-stream: %s: %s", type(exc).__name__, exc,
                       exc_info=not isinstance(exc, ECSOError))
        yield encode_chunk(error_chunk(exc))
    finally:
        stop.set()  # the stream ended or its client left (GeneratorExit / cancellation): nothing more is wanted


def _llava_routes() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post("/worker_get_status")
    async def worker_get_status(request: Request) -> WorkerStatus:
        return get_state(request).status()

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        state = get_state(request)
        try:
            req, images, params = await _prepare_generate(state, await request.body())
        except Exception as exc:  # noqa: BLE001 - every failure is a chunk with a real status
            return _chunk_response(exc)
        if req.max_new_tokens == 0:  # LLaVA's slider can send 0: the prompt, nothing generated
            return Response(encode_chunk(StreamChunk(text=req.prompt)), media_type=STREAM_MEDIA_TYPE)
        return StreamingResponse(_llava_chunks(state, req.prompt, images, params), media_type=STREAM_MEDIA_TYPE)

    return router


# ----------------------------------------------------------------------------------------------------- app


def _load_engine(config: WorkerConfig) -> Any:
    from llava.model.builder import load_model
    from llava.model.engine import LlavaEngine

    loaded = load_model(config.model_path, model_base=config.model_base, model_name=config.model_name,
                        load_8bit=config.load_8bit, load_4bit=config.load_4bit, device=config.device,
                        dtype=config.dtype, image_aspect_ratio=config.image_aspect_ratio, conv_mode=config.conv_mode)
    return LlavaEngine(loaded)


def create_app(config: WorkerConfig, engine: Any = None) -> FastAPI:
    """The worker app. ``engine``: an already loaded :class:`~llava.model.engine.LlavaEngine` (tests, one-process
    launchers); otherwise ``config.model_path`` is loaded in the lifespan handler, before the first request."""
    from llava.serve.protocol.ecso import ECSO_STREAM_PATH
    from llava.serve.worker_ecso import ecso_error_frame, ecso_routes
    from llava.serve.worker_openai import openai_routes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine if engine is not None else await anyio.to_thread.run_sync(_load_engine, config)
        async with httpx.AsyncClient(trust_env=False) as http:
            state = WorkerState(config, eng, ModelSlots(config.limit_model_concurrency), http, config.image_policy())
            app.state.worker = state
            tasks = []
            if config.register:
                tasks.append(asyncio.create_task(registration_loop(state), name="worker-registration"))
            logger.info("worker ready at %s: model %s (%s), template %s, multimodal %s, concurrency %d, auth %s, "
                        "controller %s", config.address, state.model_name, eng.loaded.layout, state.conv_mode,
                        state.multimodal, config.limit_model_concurrency, "on" if config.api_key else "off",
                        config.controller_url if config.register else "none (--no-register)")
            try:
                yield
            finally:
                for task in [*tasks, *state.jobs]:
                    task.cancel()
                await asyncio.gather(*tasks, *state.jobs, return_exceptions=True)

    app = FastAPI(title="ECSO model worker", lifespan=lifespan)
    app.state.config = config
    app.state.api_key = config.api_key
    app.state.log_ips = config.log_ips
    install_error_handlers(app)
    app.include_router(_llava_routes())
    app.include_router(ecso_routes())
    app.include_router(openai_routes())

    @app.get("/health")
    async def health(request: Request) -> WorkerHealthResponse:
        state = get_state(request)
        return WorkerHealthResponse(models=[state.model_name], queue_length=state.slots.queue_length)

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes,
                       error_bodies={"/worker_generate_stream": llava_error_frame, ECSO_STREAM_PATH: ecso_error_frame})
    return app


# ----------------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.model_worker",
        description="Serve one LLaVA model: LLaVA's worker protocol (/worker_generate_stream), the ECSO stream "
        "(/worker_ecso_stream) and an OpenAI-compatible API (/v1/chat/completions), registered with a controller.",
    )
    add_server_arguments(parser, default_port=WORKER_PORT)
    g = parser.add_argument_group("controller")
    g.add_argument("--controller-url", default=f"http://127.0.0.1:{CONTROLLER_PORT}",
                   help="controller to register with (default %(default)s); LLaVA's --controller works too")
    g.add_argument("--worker-address", default=None,
                   help="this worker's URL as the controller should reach it (default http://HOST:PORT, localhost "
                   "when HOST is 0.0.0.0); LLaVA's --worker works too")
    g.add_argument("--no-register", action="store_true", help="run standalone: do not register with a controller")
    g.add_argument("--heart-beat-interval", type=_seconds, default=float(WORKER_HEART_BEAT_INTERVAL),
                   help="seconds between heartbeats to the controller (default %(default)g; it drops workers "
                   "silent for 30 s)")
    add_model_args(parser, default_model=None)
    g = parser.add_argument_group("limits")
    g.add_argument("--limit-model-concurrency", type=_positive_int, default=5,
                   help="model jobs run at once; more wait (queue_length = waiting + running) (default %(default)s)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="new tokens when a request does not say (OpenAI without max_tokens, ECSO without "
                   "options.max_new_tokens) (default %(default)s)")
    g.add_argument("--max-request-bytes", type=_positive_int, default=64 * 1024 * 1024,
                   help="largest request body, base64 images included; larger ones get 413 (default %(default)s)")
    g.add_argument("--max-image-pixels", type=_positive_int, default=ImageLimits().max_pixels,
                   help="largest image (width x height), checked before decoding (default %(default)s)")
    g.add_argument("--max-images-per-request", type=_positive_int, default=8,
                   help="most images in one request (default %(default)s)")
    g.add_argument("--max-top-logprobs", type=int, default=20,
                   help="largest top_logprobs an OpenAI request may ask for (default %(default)s, as OpenAI)")
    g = parser.add_argument_group("image URLs (OpenAI API)")
    g.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image_url parts (default: data: URLs only). Fetches are capped at "
                   "--max-request-bytes and --image-url-timeout; loopback/private addresses are refused")
    g.add_argument("--allow-private-image-urls", action="store_true",
                   help="with --allow-image-urls, also fetch from loopback, private and link-local addresses")
    g.add_argument("--image-url-timeout", type=_seconds, default=10.0,
                   help="seconds to fetch one image URL (default %(default)g)")
    add_ecso_args(parser)  # defaults of ECSO runs (/worker_ecso_stream, OpenAI "ecso": true)
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> WorkerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_path:
        parser.error("--model-path is required (a checkpoint folder, a hub id, or 'tiny' for the test model)")
    try:
        ecso = ecso_config_from_args(args)
        return WorkerConfig(
            model_path=args.model_path, model_base=args.model_base, model_name=args.model_name, device=args.device,
            dtype=None if args.dtype == "auto" else args.dtype, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
            conv_mode=args.conv_mode, image_aspect_ratio=args.image_aspect_ratio, host=args.host, port=args.port,
            controller_url=args.controller_url.rstrip("/"), worker_address=args.worker_address,
            register=not args.no_register, heart_beat_interval=args.heart_beat_interval,
            limit_model_concurrency=args.limit_model_concurrency, max_new_tokens=args.max_new_tokens,
            max_image_pixels=args.max_image_pixels, max_request_bytes=args.max_request_bytes,
            max_images_per_request=args.max_images_per_request, allow_image_urls=args.allow_image_urls,
            allow_private_image_urls=args.allow_private_image_urls, image_url_timeout=args.image_url_timeout,
            max_top_logprobs=args.max_top_logprobs, ecso=ecso, api_key=resolve_api_key(args.api_key, environ),
            log_level=args.log_level, log_ips=args.log_ips,
        )
    except (ValueError, ECSOError) as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level)
    run_app(create_app(config), host=config.host, port=config.port, api_key=config.api_key, log_level=config.log_level,
            log_ips=config.log_ips)


if __name__ == "__main__":
    # Run the imported module's main, so log records name "llava.serve.model_worker" rather than "__main__".
    from llava.serve.model_worker import main as _main

    _main()
