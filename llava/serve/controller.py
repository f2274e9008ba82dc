"""Controller: a registry of model workers and a dispatcher, speaking LLaVA's controller protocol.

Workers register (``/register_worker``) and heart-beat (``/receive_heart_beat``); clients ask for a worker
(``/get_worker_address``) or stream through the controller (``/worker_generate_stream``). Workers that stop
heart-beating for ``heart_beat_expiration`` seconds are dropped. ``/worker_get_status`` sums the workers, so a
controller can itself be registered as a worker of another controller.

Run: ``python -m llava.serve.controller --host 127.0.0.1 --port 10000`` (``--help`` lists every flag).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import anyio
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION, CONTROLLER_PORT, DEFAULT_HOST
from llava.errors import AuthError, BackendError, BackendTimeoutError, ECSOError, InvalidRequestError, NoWorkerError
from llava.http_client import (
    STREAM_DELIMITER,
    ChunkDecoder,
    apost_json,
    auth_headers,
    encode_chunk,
    error_from_response,
    resolve_api_key,
)
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
from llava.serve.protocol.llava import (
    GenerateStreamRequest,
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

__all__ = [
    "DISPATCH_METHODS",
    "ControllerConfig",
    "WorkerInfo",
    "WorkerRegistry",
    "shortest_queue",
    "lottery",
    "get_dispatch_method",
    "create_app",
    "build_parser",
    "config_from_args",
    "main",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class WorkerInfo:
    name: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float  # clock() time


class WorkerRegistry:
    """Workers by name (their base URL). Not thread-safe: the controller touches it from its event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._clock = clock

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def names(self) -> list[str]:
        return list(self._workers)

    def get(self, name: str) -> WorkerInfo | None:
        return self._workers.get(name)

    def register(self, name: str, status: WorkerStatus, check_heart_beat: bool) -> WorkerInfo:
        info = WorkerInfo(
            name, list(status.model_names), status.speed, status.queue_length, check_heart_beat, self._clock()
        )
        self._workers[name] = info
        return info

    def remove(self, name: str) -> bool:
        return self._workers.pop(name, None) is not None

    def heart_beat(self, name: str, queue_length: int) -> bool:
        info = self._workers.get(name)
        if info is None:
            return False
        info.queue_length = queue_length
        info.last_heart_beat = self._clock()
        return True

    def expire(self, expiration: float) -> list[str]:
        """Remove and return workers (with heartbeat checking on) silent for more than ``expiration`` seconds."""
        now = self._clock()
        stale = [
            w.name for w in self._workers.values() if w.check_heart_beat and now - w.last_heart_beat > expiration
        ]
        for name in stale:
            del self._workers[name]
        return stale

    def models(self) -> list[str]:
        return sorted({m for w in self._workers.values() for m in w.model_names})

    def candidates(self, model: str) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if model in w.model_names]

    def total_status(self) -> WorkerStatus:
        workers = self._workers.values()
        return WorkerStatus(
            model_names=self.models(),
            speed=sum(w.speed for w in workers),
            queue_length=sum(w.queue_length for w in workers),
        )


# ------------------------------------------------------------------------------------------------ dispatch

DispatchMethod = Callable[[Sequence[WorkerInfo], random.Random], WorkerInfo]


def shortest_queue(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """Lowest ``queue_length / speed`` (ties at random). The winner's queue grows by one until its next heartbeat
    reports the real length, so a burst of requests spreads over the workers."""
    load = [w.queue_length / w.speed if w.speed > 0 else math.inf for w in workers]
    best = min(load)
    chosen = rng.choice([w for w, q in zip(workers, load) if q == best])
    chosen.queue_length += 1
    return chosen


def lottery(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """Random, weighted by ``speed`` (uniform when every speed is 0)."""
    weights = [w.speed for w in workers]
    if sum(weights) <= 0:
        return rng.choice(list(workers))
    return rng.choices(list(workers), weights=weights)[0]


DISPATCH_METHODS: Mapping[str, DispatchMethod] = MappingProxyType(
    {"shortest_queue": shortest_queue, "lottery": lottery}
)


def get_dispatch_method(name: str) -> DispatchMethod:
    try:
        return DISPATCH_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown dispatch method {name!r}; valid: {', '.join(sorted(DISPATCH_METHODS))}") from None


# -------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ControllerConfig:
    """``worker_timeout``: seconds to connect to a worker and to wait for each piece of its stream;
    ``status_timeout``: seconds for a worker's ``/worker_get_status``."""

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

    def __post_init__(self) -> None:
        get_dispatch_method(self.dispatch_method)
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        for name in ("heart_beat_expiration", "worker_timeout", "status_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


# ----------------------------------------------------------------------------------------------------- app


def _expire(app: FastAPI) -> None:
    state = app.state
    for name in state.registry.expire(state.config.heart_beat_expiration):
        logger.warning(
            "removed worker %s: no heartbeat for more than %.1f s", name, state.config.heart_beat_expiration
        )


async def _sweep(app: FastAPI) -> None:
    interval = app.state.config.heart_beat_expiration / 3
    while True:
        await asyncio.sleep(interval)
        _expire(app)


async def _fetch_status(app: FastAPI, worker: str) -> WorkerStatus:
    cfg = app.state.config
    try:
        body = await apost_json(
            app.state.http, f"{worker}/worker_get_status", {}, api_key=cfg.api_key, timeout=cfg.status_timeout
        )
        return WorkerStatus.model_validate(body)
    except ECSOError as exc:
        raise BackendError(f"cannot get the status of worker {worker}: {exc}") from exc
    except ValidationError as exc:
        raise BackendError(f"worker {worker} sent a bad status: {describe_validation_error(exc)[0]}") from exc


def _dispatch(app: FastAPI, model: str) -> str:
    _expire(app)
    candidates = app.state.registry.candidates(model)
    if not candidates:
        return ""
    return app.state.dispatch(candidates, app.state.rng).name


async def _open_stream(app: FastAPI, model: str, body: bytes) -> tuple[str, httpx.Response]:
    """Dispatch and open the worker's stream, sending the client's body as it came (validated JSON; re-encoding
    could fail on what JSON allows, such as lone surrogate escapes). A worker that refuses the connection is dropped
    (it re-registers when its next heartbeat is answered ``exist: false``) and the next one is tried."""
    cfg, unreachable = app.state.config, []
    headers = {**auth_headers(cfg.api_key), "content-type": "application/json"}
    while True:
        address = _dispatch(app, model)
        if not address:
            known = app.state.registry.models()
            extra = f"; unreachable workers dropped: {', '.join(unreachable)}" if unreachable else ""
            raise NoWorkerError(f"no worker serves model {model!r} (models available: {known}){extra}")
        request = app.state.http.build_request(
            "POST", f"{address}/worker_generate_stream", content=body, headers=headers
        )
        try:
            return address, await app.state.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise BackendTimeoutError(
                f"worker {address} did not answer within {cfg.worker_timeout:g} s ({type(exc).__name__})"
            ) from exc
        except httpx.ConnectError as exc:
            logger.warning("removed worker %s: connection failed: %s", address, exc)
            app.state.registry.remove(address)
            unreachable.append(address)
        except httpx.HTTPError as exc:
            raise BackendError(f"worker {address} failed before streaming: {type(exc).__name__}: {exc}") from exc


async def _relay(app: FastAPI, address: str, resp: httpx.Response) -> AsyncIterator[bytes]:
    """Forward the worker's frames byte for byte, whole frames only; any failure ends the stream with one error
    chunk (never a hang: every read is bounded by the worker timeout)."""
    decoder, frames = ChunkDecoder(), 0
    try:
        async for data in resp.aiter_bytes():
            for frame in decoder.feed(data):
                frames += 1
                yield frame + STREAM_DELIMITER
        if decoder.pending:
            raise BackendError(f"worker {address} ended its stream inside a frame ({decoder.pending} bytes)")
        if not frames:
            raise BackendError(f"worker {address} ended its stream without sending anything")
    except httpx.TimeoutException:
        timeout = app.state.config.worker_timeout
        err: ECSOError = BackendTimeoutError(f"worker {address} sent nothing for {timeout:g} s after {frames} chunks")
        logger.warning("stream from %s: %s", address, err)
        yield encode_chunk(error_chunk(err))
    except httpx.HTTPError as exc:
        err = BackendError(f"worker {address} broke off its stream after {frames} chunks: {type(exc).__name__}: {exc}")
        logger.warning("stream from %s: %s", address, err)
        yield encode_chunk(error_chunk(err))
    except BackendError as exc:
        logger.warning("stream from %s: %s", address, exc)
        yield encode_chunk(error_chunk(exc))
    finally:
        with anyio.CancelScope(shield=True):  # the client may have gone: still release the worker connection
            await resp.aclose()


def _chunk_response(exc: ECSOError) -> Response:
    return Response(encode_chunk(error_chunk(exc)), status_code=exc.status, media_type=STREAM_MEDIA_TYPE)


async def _generate_stream(app: FastAPI, request: Request) -> Response:
    try:
        body = await request.body()
        params = json.loads(body)
        GenerateStreamRequest.model_validate(params)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and ValidationError are ValueErrors; deep nesting
        detail = describe_validation_error(exc)[0] if isinstance(exc, ValidationError) else f"body is not JSON: {exc}"
        return _chunk_response(InvalidRequestError(detail))
    try:
        address, resp = await _open_stream(app, params["model"], body)
    except ECSOError as exc:
        logger.warning("worker_generate_stream for %r: %s", params.get("model"), exc)
        return _chunk_response(exc)
    if resp.status_code >= 400:
        body = await resp.aread()
        await resp.aclose()
        if STREAM_DELIMITER in body:  # the worker already answered with error chunks
            return Response(body, status_code=resp.status_code, media_type=STREAM_MEDIA_TYPE)
        err = error_from_response(resp.status_code, body, f"{address}/worker_generate_stream")
        if isinstance(err, AuthError):  # the worker refused *our* key: not the client's fault
            err = BackendError(f"worker {address} rejected the controller's API key: {err}")
        logger.warning("worker_generate_stream via %s: %s", address, err)
        return _chunk_response(err)
    return StreamingResponse(_relay(app, address, resp), media_type=STREAM_MEDIA_TYPE)


def _routes() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post("/register_worker")
    async def register_worker(body: RegisterWorkerRequest, request: Request) -> RegisterWorkerResponse:
        app = request.app
        status = body.worker_status or await _fetch_status(app, body.worker_name)
        again = body.worker_name in app.state.registry
        app.state.registry.register(body.worker_name, status, body.check_heart_beat)
        logger.info(
            "%s worker %s: models %s, speed %g, queue %d, heartbeat check %s",
            "re-registered" if again else "registered",
            body.worker_name,
            status.model_names,
            status.speed,
            status.queue_length,
            body.check_heart_beat,
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
        _expire(request.app)
        return ListModelsResponse(models=request.app.state.registry.models())

    @router.post("/get_worker_address")
    async def get_worker_address(body: WorkerAddressRequest, request: Request) -> WorkerAddressResponse:
        address = _dispatch(request.app, body.model)
        if not address:
            logger.info("no worker for model %r", body.model)
        return WorkerAddressResponse(address=address)

    @router.post("/receive_heart_beat")
    async def receive_heart_beat(body: HeartBeatRequest, request: Request) -> HeartBeatResponse:
        _expire(request.app)
        exist = request.app.state.registry.heart_beat(body.worker_name, body.queue_length)
        if not exist:
            logger.info("heartbeat from unknown worker %s; told it to re-register", body.worker_name)
        return HeartBeatResponse(exist=exist)

    @router.post("/worker_get_status", response_model_exclude_none=True)  # LLaVA's three fields (no conv_mode)
    async def worker_get_status(request: Request) -> WorkerStatus:
        _expire(request.app)
        return request.app.state.registry.total_status()

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        return await _generate_stream(request.app, request)

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

    app = FastAPI(title="ECSO controller", lifespan=lifespan)
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

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes, service="controller",
                       error_bodies={"/worker_generate_stream": llava_error_frame})
    return app


# ----------------------------------------------------------------------------------------------------- CLI


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


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
        type=_seconds,
        default=float(CONTROLLER_HEART_BEAT_EXPIRATION),
        help="seconds without a heartbeat after which a worker is dropped (default %(default)g; workers beat "
        "every 15 s)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=_seconds,
        default=20.0,
        help="seconds to connect to a worker and to wait for each piece of its stream before answering "
        "error_code 3 (timeout) (default %(default)g)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=64 * 1024 * 1024,
        help="largest request body (a /worker_generate_stream body carries its base64 images); larger ones get 413 "
        "(default %(default)s, the worker's default)",
    )
    parser.add_argument(
        "--status-timeout",
        type=_seconds,
        default=5.0,
        help="seconds to wait for a worker's /worker_get_status on registration and refresh (default %(default)g)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> ControllerConfig:
    args = build_parser().parse_args(argv)
    return ControllerConfig(
        host=args.host,
        port=args.port,
        dispatch_method=args.dispatch_method,
        heart_beat_expiration=args.heart_beat_expiration,
        worker_timeout=args.worker_timeout,
        status_timeout=args.status_timeout,
        api_key=resolve_api_key(args.api_key, environ),
        log_level=args.log_level,
        log_ips=args.log_ips,
        max_request_bytes=args.max_request_bytes,
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
