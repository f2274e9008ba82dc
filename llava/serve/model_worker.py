"""Model worker: one model behind LLaVA's worker protocol, an ECSO stream and an OpenAI-compatible API. The model
is loaded here (``--backend local``) or served by OpenAI-compatible servers (``--backend openai
--openai-base-url URL [URL ...]``: vLLM, SGLang, ``transformers serve``), which makes the worker an ECSO guardrail in
front of them: the controller, the demo and every API work unchanged, the OpenAI API answers with ECSO by
``--ecso-stream`` (hold, monitor, off), and heartbeats report whether the servers answer.

* LLaVA: ``POST /worker_get_status`` -> ``{model_names, speed, queue_length}``; ``POST /worker_generate_stream``
  (templated prompt + base64 images) -> NUL-delimited chunks with the cumulative text, prompt included
  (:mod:`llava.serve.worker_llava`).
* ECSO: ``POST /worker_ecso_stream`` (image + query + options) -> one NUL-delimited event per step
  (:mod:`llava.serve.worker_ecso`).
* OpenAI: ``GET /v1/models``, ``POST /v1/chat/completions`` (:mod:`llava.serve.worker_openai`).
* ``GET /health`` (no key needed; answers once the model is loaded).

This module is the app factory and the command line; the configuration and the state the routes share are in
:mod:`llava.serve.worker_state`, and the routes reach the model only through its
:class:`~llava.ecso.backends.ServingBackend`. The worker registers with its controller at start (retrying with backoff while the controller is down), heart-beats
every ``--heart-beat-interval`` seconds and registers again when the controller has forgotten it.

Run: ``python -m llava.serve.model_worker --controller http://localhost:10000 --port 40000 --worker
http://localhost:40000 --model-path llava-v1.5-7b`` (``--help`` lists every flag).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import anyio.to_thread
import httpx
from fastapi import FastAPI, Request

from llava.cli_args import add_backend_args, add_ecso_args, add_model_args, is_tiny_model
from llava.constants import CONTROLLER_PORT, TINY_MAX_NEW_TOKENS, WORKER_HEART_BEAT_INTERVAL, WORKER_PORT
from llava.ecso.backends import AsyncServingBackend, ServingBackend
from llava.ecso.config import ecso_config_from_args
from llava.ecso.local_vlm import backend_for_engine
from llava.errors import ECSOError
from llava.http_client import openai_base_url, resolve_api_key
from llava.mm_utils import ImageLimits
from llava.model.engine_base import GenerationEngine
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES
from llava.serve.protocol.ecso import ECSO_STREAM_PATH
from llava.serve.protocol.llava import WorkerHealthResponse
from llava.serve.server import (
    api_docs_urls,
    add_server_arguments,
    configure_logging,
    install_edge_middleware,
    install_error_handlers,
    llava_error_frame,
    positive_int,
    positive_seconds,
    run_app,
)
from llava.serve.worker_ecso import ecso_error_frame, ecso_routes
from llava.serve.worker_llava import GENERATE_STREAM_PATH, llava_routes
from llava.serve.worker_openai import openai_routes
from llava.serve.worker_registration import registration_loop
from llava.serve.worker_runtime import ModelSlots
from llava.serve.worker_state import ECSO_POLICIES, RemoteModel, WorkerConfig, WorkerState, get_state, load_backend

__all__ = ["create_app", "build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)

START_BACKOFF_MAX = 30.0  # seconds between attempts to reach a remote model's servers at start, at most


async def _start_remote(model: AsyncServingBackend) -> None:
    """Get a remote model ready, retrying with backoff while none of its servers answers (the worker is not ready,
    and does not answer /health, until one does)."""
    delay = 1.0
    while True:
        try:
            await model.astart()
            return
        except ECSOError as exc:
            logger.warning("the model's servers do not answer yet (%s); retrying in %g s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, START_BACKOFF_MAX)


def create_app(config: WorkerConfig, engine: GenerationEngine | None = None,
               backend: ServingBackend | None = None) -> FastAPI:
    """The worker app. ``backend``: the model, already loaded (tests, one-process launchers); ``engine``: an
    already loaded engine (:class:`~llava.model.engine.LlavaEngine` or :class:`~llava.model.vlm_engine.VLMEngine`),
    served in process; otherwise ``config.model_path`` is loaded in the lifespan handler, before the first
    request."""
    if backend is None and engine is not None:
        backend = backend_for_engine(engine, conv_mode=config.conv_mode)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = backend if backend is not None else await anyio.to_thread.run_sync(load_backend, config)
        if isinstance(model, AsyncServingBackend):
            await _start_remote(model)
        async with httpx.AsyncClient(trust_env=False) as http:
            state = WorkerState(config, model, ModelSlots(config.limit_model_concurrency), http, config.image_policy())
            app.state.worker = state
            tasks = []
            if config.register:
                tasks.append(asyncio.create_task(registration_loop(state), name="worker-registration"))
            logger.info("worker ready at %s: model %s (%s), multimodal %s, concurrency %d, auth %s, controller %s",
                        config.address, state.model_name, model.describe(), state.multimodal,
                        config.limit_model_concurrency, "on" if config.api_key else "off",
                        config.controller_url if config.register else "none (--no-register)")
            ignored = config.ecso.ignored_when_streaming()
            if ignored:
                logger.warning("streamed ECSO requests ignore %s (batch runs only)", ", ".join(ignored))
            try:
                yield
            finally:
                for task in [*tasks, *state.jobs]:
                    task.cancel()
                await asyncio.gather(*tasks, *state.jobs, return_exceptions=True)
                if isinstance(model, AsyncServingBackend) and backend is None:
                    await model.aclose()

    app = FastAPI(title="ECSO model worker", lifespan=lifespan, **api_docs_urls(config.api_key))
    app.state.config = config
    app.state.api_key = config.api_key
    app.state.log_ips = config.log_ips
    install_error_handlers(app)
    app.include_router(llava_routes())
    app.include_router(ecso_routes())
    app.include_router(openai_routes())

    @app.get("/health")
    async def health(request: Request) -> WorkerHealthResponse:
        state = get_state(request)
        return WorkerHealthResponse(models=[state.model_name], queue_length=state.slots.queue_length,
                                    healthy=state.model.reachable)

    install_edge_middleware(app, max_bytes=config.max_request_bytes, service="worker",
                            error_bodies={GENERATE_STREAM_PATH: llava_error_frame, ECSO_STREAM_PATH: ecso_error_frame})
    return app


# ----------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.model_worker",
        description="Serve one vision-language model (LLaVA-1.5 or any transformers image-text-to-text model with a "
        "chat template): LLaVA's worker protocol (/worker_generate_stream), the ECSO stream "
        "(/worker_ecso_stream) and an OpenAI-compatible API (/v1/chat/completions), registered with a controller.",
    )
    add_server_arguments(parser, default_port=WORKER_PORT)
    g = parser.add_argument_group("controller")
    g.add_argument("--controller-url", "--controller-address", "--controller", dest="controller_url",
                   default=f"http://127.0.0.1:{CONTROLLER_PORT}",
                   help="controller to register with (default %(default)s); --controller-address is LLaVA's and "
                   "FastChat's name, --controller its abbreviation")
    g.add_argument("--worker-address", default=None,
                   help="this worker's URL as the controller should reach it (default http://HOST:PORT, localhost "
                   "when HOST is 0.0.0.0); LLaVA's --worker works too")
    g.add_argument("--no-register", action="store_true", help="run standalone: do not register with a controller")
    g.add_argument("--heart-beat-interval", type=positive_seconds, default=float(WORKER_HEART_BEAT_INTERVAL),
                   help="seconds between heartbeats to the controller (default %(default)g; it drops workers "
                   "silent for 30 s)")
    add_model_args(parser, default_model=None)
    add_backend_args(parser, serving=True)
    g = parser.add_argument_group("limits")
    g.add_argument("--limit-model-concurrency", type=positive_int, default=5,
                   help="model jobs run at once; more wait (queue_length = waiting + running) (default %(default)s)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="new tokens when a request does not say (OpenAI without max_tokens, ECSO without "
                   f"options.max_new_tokens) (default 512; {TINY_MAX_NEW_TOKENS} for a tiny random-weight --model-path)")
    g.add_argument("--max-request-bytes", type=positive_int, default=64 * 1024 * 1024,
                   help="largest request body, base64 images included; larger ones get 413 (default %(default)s)")
    g.add_argument("--max-image-pixels", type=positive_int, default=ImageLimits().max_pixels,
                   help="largest image (width x height), checked before decoding (default %(default)s)")
    g.add_argument("--max-images-per-request", type=positive_int, default=8,
                   help="most images in one request (default %(default)s)")
    g.add_argument("--max-image-aspect-ratio", type=float, default=ImageLimits().max_aspect_ratio,
                   help="longest side over shortest side of an image, checked before decoding; degenerate shapes "
                   "(40000000 x 1) get 400 (default %(default)g)")
    g.add_argument("--decode-concurrency", type=positive_int, default=2,
                   help="images decoded at once across requests (each is reduced to the model's working size as "
                   "soon as it is decoded) (default %(default)s)")
    g.add_argument("--cache-bytes", type=positive_int, default=DEFAULT_CACHE_BYTES,
                   help="most bytes each of the model's caches holds (prefix KV cache, preprocessed pixels; keyed "
                   "by content hash, never holding decoded images) (default %(default)s = 1 GiB)")
    g.add_argument("--max-top-logprobs", type=int, default=20,
                   help="largest top_logprobs an OpenAI request may ask for (default %(default)s, as OpenAI)")
    g = parser.add_argument_group("image URLs (OpenAI API)")
    g.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image_url parts (default: data: URLs only). Fetches are capped at "
                   "--max-request-bytes and --image-url-timeout; loopback/private addresses are refused")
    g.add_argument("--allow-private-image-urls", action="store_true",
                   help="with --allow-image-urls, also fetch from loopback, private and link-local addresses")
    g.add_argument("--image-url-timeout", type=positive_seconds, default=10.0,
                   help="seconds to fetch a request's image URLs, all at once, in total (default %(default)g)")
    add_ecso_args(parser)  # defaults of ECSO runs (/worker_ecso_stream, OpenAI "ecso": true)
    g = parser.add_argument_group("ECSO policy (OpenAI API)")
    g.add_argument("--ecso-stream", choices=ECSO_POLICIES, default=None,
                   help="how /v1/chat/completions answers: hold = every answer is ECSO's (the guardrail; a stream "
                   "sends nothing until the verdict, then the final answer); monitor = every answer is the direct "
                   "one, streamed at once, with ECSO's verdict of it in the last chunk and the log (it never changes "
                   "what was sent: observe a deployment before enforcing); off = direct unless a request asks for "
                   "ECSO (\"ecso\": true or the model NAME+ecso). Default: hold with --backend openai, off otherwise")
    g.add_argument("--allow-ecso-opt-out", action="store_true",
                   help="let a request send \"ecso\": false to get the direct answer under hold or monitor (default: "
                   "such requests get 403)")
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> WorkerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_path and args.backend == "local":
        parser.error("--model-path is required (a checkpoint folder, a hub id, or 'tiny' for the test model)")
    if args.max_new_tokens is None:  # also the default of ECSO runs (the option shares the name)
        args.max_new_tokens = TINY_MAX_NEW_TOKENS if is_tiny_model(args.model_path) else 512
    try:
        ecso = ecso_config_from_args(args)
        remote = None
        if args.backend == "openai":
            env_url = openai_base_url(None, environ)
            urls = args.openai_base_url or ([env_url] if env_url else [])
            remote = RemoteModel(tuple(u.rstrip("/") for u in urls), args.openai_model, args.openai_api_key_env,
                                 args.request_timeout, args.upstream_retries, args.upstream_cooldown,
                                 args.openai_top_logprobs)
        return WorkerConfig(
            model_path=args.model_path or "", backend=args.backend, remote=remote, ecso_stream=args.ecso_stream,
            allow_ecso_opt_out=args.allow_ecso_opt_out,
            model_base=args.model_base, model_name=args.model_name, device=args.device,
            dtype=None if args.dtype == "auto" else args.dtype, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
            conv_mode=args.conv_mode, image_aspect_ratio=args.image_aspect_ratio, host=args.host, port=args.port,
            controller_url=args.controller_url.rstrip("/"), worker_address=args.worker_address,
            register=not args.no_register, heart_beat_interval=args.heart_beat_interval,
            limit_model_concurrency=args.limit_model_concurrency, max_new_tokens=args.max_new_tokens,
            max_image_pixels=args.max_image_pixels, max_request_bytes=args.max_request_bytes,
            max_images_per_request=args.max_images_per_request, max_image_aspect_ratio=args.max_image_aspect_ratio,
            decode_concurrency=args.decode_concurrency, cache_bytes=args.cache_bytes,
            allow_image_urls=args.allow_image_urls,
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
