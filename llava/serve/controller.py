"""Controller: a registry of model workers and a dispatcher, speaking LLaVA's controller protocol. This module is
the app (routes, heartbeat sweep) and the command line; the registry and the dispatch methods are in
:mod:`llava.serve.dispatch`, the stream proxy in :mod:`llava.serve.controller_relay`.

Workers register (``/register_worker``) and heart-beat (``/receive_heart_beat``); clients ask for a worker
(``/get_worker_address``) or stream through the controller (``/worker_generate_stream``). Workers that stop
heart-beating for ``heart_beat_expiration`` seconds are dropped. ``/worker_get_status`` sums the workers, so a
controller can itself be registered as a worker of another controller.

Who may register is in :mod:`llava.serve.controller_admission` (never itself; without a key only allowed hosts and
no takeover of a live worker's name). Run: ``python -m llava.serve.controller --host 127.0.0.1 --port 10000``
(``--help`` lists every flag).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION, CONTROLLER_PORT, DEFAULT_HOST
from llava.http_client import resolve_api_key
from llava.serve.controller_admission import (
    LOOPBACK_HOSTS,
    check_replacement,
    check_worker_url,
    fetch_status,
    parse_allowed_hosts,
)
from llava.serve.controller_relay import dispatch, expire, generate_stream
from llava.serve.dispatch import DISPATCH_METHODS, WorkerRegistry, get_dispatch_method
from llava.serve.protocol.llava import (
    HealthResponse,
    HeartBeatRequest,
    HeartBeatResponse,
    ListModelsResponse,
    RefreshWorkersResponse,
    RegisterWorkerRequest,
    RegisterWorkerResponse,
    WorkerAddressRequest,
    WorkerAddressResponse,
    WorkerStatus,
)
from llava.serve.server import (
    api_docs_urls,
    add_server_arguments,
    configure_logging,
    install_edge_middleware,
    install_error_handlers,
    llava_error_frame,
    positive_int,
    positive_seconds,
    require_api_key,
    run_app,
)

__all__ = ["ControllerConfig", "create_app", "build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ registry


# -------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ControllerConfig:
    """``worker_timeout``: seconds to connect to a worker and to wait for each piece of its stream;
    ``status_timeout``: seconds for a worker's ``/worker_get_status``; ``allowed_worker_hosts``: where a keyless
    controller accepts workers (:mod:`llava.serve.controller_admission`); ``max_worker_timeouts``: timeouts in a
    row after which a worker is dropped."""

    host: str = DEFAULT_HOST
    port: int = CONTROLLER_PORT
    dispatch_method: str = "shortest_queue"
    heart_beat_expiration: float = float(CONTROLLER_HEART_BEAT_EXPIRATION)
    worker_timeout: float = 20.0
    status_timeout: float = 5.0
    api_key: str | None = field(default=None, repr=False)
    log_level: str = "info"
    log_ips: bool = False
    max_request_bytes: int = 64 * 1024 * 1024
    seed: int | None = None
    allowed_worker_hosts: tuple[str, ...] = (LOOPBACK_HOSTS,)
    max_worker_timeouts: int = 3

    def __post_init__(self) -> None:
        get_dispatch_method(self.dispatch_method)
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_worker_timeouts < 1:
            raise ValueError(f"max_worker_timeouts must be at least 1, got {self.max_worker_timeouts}")
        for name in ("heart_beat_expiration", "worker_timeout", "status_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


# ----------------------------------------------------------------------------------------------------- app


async def _sweep(app: FastAPI) -> None:
    interval = app.state.config.heart_beat_expiration / 3
    while True:
        await asyncio.sleep(interval)
        expire(app)


async def _fetch_status(app: FastAPI, worker: str) -> WorkerStatus:
    cfg = app.state.config
    return await fetch_status(app.state.http, worker, api_key=cfg.api_key, timeout=cfg.status_timeout)


def _routes() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post("/register_worker")
    async def register_worker(body: RegisterWorkerRequest, request: Request) -> RegisterWorkerResponse:
        app, cfg = request.app, request.app.state.config
        keyed = bool(cfg.api_key)
        check_worker_url(body.worker_name, own_host=cfg.host, own_port=cfg.port, keyed=keyed,
                         allowed=cfg.allowed_worker_hosts)
        status = body.worker_status or await _fetch_status(app, body.worker_name)
        expire(app)
        check_replacement(app.state.registry, body.worker_name, status, keyed=keyed,
                          expiration=cfg.heart_beat_expiration)
        again = body.worker_name in app.state.registry
        app.state.registry.register(body.worker_name, status, body.check_heart_beat)
        logger.info(
            "%s worker %s: models %s, speed %g, queue %d, heartbeat check %s%s",
            "re-registered" if again else "registered",
            body.worker_name,
            status.model_names,
            status.speed,
            status.queue_length,
            body.check_heart_beat,
            ", its model unreachable for now" if status.healthy is False else "",
        )
        return RegisterWorkerResponse(worker_name=body.worker_name, model_names=status.model_names)

    @router.post("/refresh_all_workers")
    async def refresh_all_workers(request: Request) -> RefreshWorkersResponse:
        app, removed = request.app, []
        registry: WorkerRegistry = app.state.registry
        names = registry.names()
        results = await asyncio.gather(*(_fetch_status(app, n) for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            info = registry.get(name)
            if info is None:  # removed while we waited
                continue
            if isinstance(result, WorkerStatus):
                registry.register(name, result, info.check_heart_beat)
            else:
                logger.warning("removed worker %s on refresh: %s", name, result)
                registry.remove(name)
                removed.append(name)
        return RefreshWorkersResponse(workers=len(registry), removed=removed)

    @router.post("/list_models")
    async def list_models(request: Request) -> ListModelsResponse:
        expire(request.app)
        return ListModelsResponse(models=request.app.state.registry.models())

    @router.post("/get_worker_address")
    async def get_worker_address(body: WorkerAddressRequest, request: Request) -> WorkerAddressResponse:
        address = dispatch(request.app, body.model)
        if not address:
            logger.info("no worker for model %r", body.model)
        return WorkerAddressResponse(address=address)

    @router.post("/receive_heart_beat")
    async def receive_heart_beat(body: HeartBeatRequest, request: Request) -> HeartBeatResponse:
        expire(request.app)
        registry: WorkerRegistry = request.app.state.registry
        info = registry.get(body.worker_name)
        if info is not None and info.healthy != body.healthy:
            logger.warning("worker %s reports its model %s: %s", body.worker_name,
                           "answering again" if body.healthy else "unreachable", "dispatching to it again"
                           if body.healthy else "no requests go to it until it is healthy")
        exist = registry.heart_beat(body.worker_name, body.queue_length, body.healthy)
        if not exist:
            logger.info("heartbeat from unknown worker %s; told it to re-register", body.worker_name)
        return HeartBeatResponse(exist=exist)

    @router.post("/worker_get_status", response_model_exclude_none=True)  # LLaVA's three fields (no conv_mode)
    async def worker_get_status(request: Request) -> WorkerStatus:
        expire(request.app)
        return request.app.state.registry.total_status()

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        return await generate_stream(request.app, request)

    return router


def create_app(config: ControllerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.worker_timeout)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            app.state.http = http
            sweeper = asyncio.create_task(_sweep(app), name="controller-heartbeat-sweep")
            logger.info("controller ready: %s, auth %s", config, "on" if config.api_key else "off")
            try:
                yield
            finally:
                sweeper.cancel()
                await asyncio.gather(sweeper, return_exceptions=True)

    app = FastAPI(title="ECSO controller", lifespan=lifespan, **api_docs_urls(config.api_key))
    app.state.config = config
    app.state.api_key = config.api_key
    app.state.log_ips = config.log_ips
    app.state.registry = WorkerRegistry()
    app.state.dispatch = get_dispatch_method(config.dispatch_method)
    app.state.rng = random.Random(config.seed)
    install_error_handlers(app)
    app.include_router(_routes())

    @app.get("/health")
    async def health() -> HealthResponse:
        return HealthResponse(workers=len(app.state.registry))

    install_edge_middleware(app, max_bytes=config.max_request_bytes, service="controller",
                            error_bodies={"/worker_generate_stream": llava_error_frame})
    return app


# ----------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.controller",
        description="LLaVA-compatible controller: registers model workers, drops those that stop heart-beating, "
        "and dispatches requests (or proxies /worker_generate_stream) to a worker serving the requested model.",
    )
    add_server_arguments(parser, default_port=CONTROLLER_PORT)
    parser.add_argument(
        "--dispatch-method",
        default="shortest_queue",
        choices=sorted(DISPATCH_METHODS),
        help="how to pick among workers serving a model: shortest_queue = lowest queue_length/speed (ties at "
        "random); lottery = random, weighted by speed (default %(default)s)",
    )
    parser.add_argument(
        "--heart-beat-expiration",
        type=positive_seconds,
        default=float(CONTROLLER_HEART_BEAT_EXPIRATION),
        help="seconds without a heartbeat after which a worker is dropped (default %(default)g; workers beat "
        "every 15 s)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=positive_seconds,
        default=20.0,
        help="seconds to connect to a worker and to wait for each piece of its stream before answering "
        "error_code 3 (timeout) (default %(default)g)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=64 * 1024 * 1024,
        help="largest request body (a /worker_generate_stream body carries its base64 images); larger ones get 413 "
        "(default %(default)s, the worker's default)",
    )
    parser.add_argument(
        "--allowed-worker-hosts",
        type=parse_allowed_hosts,
        default=(LOOPBACK_HOSTS,),
        help="without an API key, the hosts whose worker URLs may register: comma-separated 'loopback', IP "
        "addresses, networks (10.0.0.0/8) or host names (as written, no DNS lookup). Default: loopback. With "
        "--api-key every host may (the key is the check)",
    )
    parser.add_argument(
        "--max-worker-timeouts",
        type=positive_int,
        default=3,
        help="requests in a row that time out on a worker before it is dropped (a hung worker whose heartbeats "
        "still come; it re-registers on its next heartbeat) (default %(default)s)",
    )
    parser.add_argument(
        "--status-timeout",
        type=positive_seconds,
        default=5.0,
        help="seconds to wait for a worker's /worker_get_status on registration and refresh (default %(default)g)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> ControllerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        api_key = resolve_api_key(args.api_key, environ)
    except ValueError as exc:
        parser.error(str(exc))
    return ControllerConfig(
        host=args.host,
        port=args.port,
        dispatch_method=args.dispatch_method,
        heart_beat_expiration=args.heart_beat_expiration,
        worker_timeout=args.worker_timeout,
        status_timeout=args.status_timeout,
        api_key=api_key,
        log_level=args.log_level,
        log_ips=args.log_ips,
        max_request_bytes=args.max_request_bytes,
        allowed_worker_hosts=args.allowed_worker_hosts,
        max_worker_timeouts=args.max_worker_timeouts,
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level)
    run_app(create_app(config), host=config.host, port=config.port, api_key=config.api_key, log_level=config.log_level,
            log_ips=config.log_ips)


if __name__ == "__main__":
    # Run the imported module's main, so log records name "llava.serve.controller" rather than "__main__".
    from llava.serve.controller import main as _main

    _main()
