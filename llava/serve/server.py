"""The server edge every service shares: shared-key auth, a request body limit, the one mapping from typed errors to
HTTP statuses, OpenAI error bodies and LLaVA chunks, the flags of every service's ``main()`` and the uvicorn runner.

The API key is a shared secret: a service started with one requires ``Authorization: Bearer <key>`` on every
endpoint except ``/health`` (compared in constant time, never logged). Clients live in :mod:`llava.http_client`.
"""
from __future__ import annotations

import argparse
import copy
import hmac
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava.constants import DEFAULT_HOST, ErrorCode
from llava.errors import AuthError, ECSOError, InvalidRequestError, RequestTooLargeError
from llava.http_client import API_KEY_ENV, encode_chunk, is_loopback
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import StreamChunk
from llava.serve.protocol.openai import OpenAIError, OpenAIErrorResponse

__all__ = [
    "STREAM_MEDIA_TYPE",
    "SSE_MEDIA_TYPE",
    "require_api_key",
    "error_status",
    "openai_error",
    "error_response",
    "error_chunk",
    "llava_error_frame",
    "chunk_error_response",
    "install_error_handlers",
    "BodyLimitMiddleware",
    "positive_int",
    "positive_seconds",
    "add_server_arguments",
    "configure_logging",
    "uvicorn_log_config",
    "PERIODIC_PATHS",
    "PeriodicAccessFilter",
    "run_app",
]

logger = logging.getLogger(__name__)

STREAM_MEDIA_TYPE = "application/octet-stream"  # NUL-framed LLaVA chunks and ECSO events
SSE_MEDIA_TYPE = "text/event-stream"

# --------------------------------------------------------------------------------------------------------- auth


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: when ``app.state.api_key`` is set, the request must carry ``Authorization: Bearer <key>``
    (compared in constant time). Raises :class:`AuthError`, which :func:`install_error_handlers` turns into 401."""
    expected: str | None = getattr(request.app.state, "api_key", None)
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
        return
    where = ""
    if getattr(request.app.state, "log_ips", False):  # client addresses only when asked (--log-ips)
        where = f" from {request.client.host if request.client else '?'}"
    logger.warning("rejected %s %s%s: missing or wrong bearer key", request.method, request.url.path, where)
    raise AuthError("missing or invalid API key: send 'Authorization: Bearer <key>'")


# -------------------------------------------------------------------------------------------------- error edges

_SUMMARY = MappingProxyType({
    ErrorCode.WORKER_ERROR: "Model worker error",
    ErrorCode.NO_WORKER: "No model worker available",
    ErrorCode.TIMEOUT: "Model worker timed out",
    ErrorCode.INVALID_REQUEST: "Invalid request",
    ErrorCode.CONTEXT_OVERFLOW: "The conversation is too long for the model's context",
    ErrorCode.UNAUTHORIZED: "Unauthorized",
    ErrorCode.UPSTREAM_UNAVAILABLE: "The model's upstream server is unavailable",
    ErrorCode.POLICY: "Refused by this service's policy",
})


def error_status(exc: BaseException) -> int:
    return exc.status if isinstance(exc, ECSOError) else 500


def openai_error(exc: BaseException, param: str | None = None) -> OpenAIErrorResponse:
    """OpenAI-style body. Unexpected exceptions become a generic 500 (their text may hold internals; it is logged)."""
    status = error_status(exc)
    if isinstance(exc, ECSOError):
        code, message = exc.code, str(exc) or exc.code
    else:
        code, message = "internal_error", "internal server error"
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return OpenAIErrorResponse(error=OpenAIError(message=message, type=kind, code=code, param=param))


def error_response(exc: BaseException, param: str | None = None) -> JSONResponse:
    status = error_status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(openai_error(exc, param).model_dump(), status_code=status, headers=headers)


def error_chunk(exc: BaseException) -> StreamChunk:
    """LLaVA chunk for a failure: the typed error's ``error_code`` (never 0), a human ``text``, the cause in
    ``detail``."""
    if isinstance(exc, ECSOError):
        code, detail = ErrorCode(exc.error_code), str(exc) or exc.code
    else:
        code, detail = ErrorCode.WORKER_ERROR, f"{type(exc).__name__}: {exc}"
    if code == ErrorCode.OK:
        code = ErrorCode.WORKER_ERROR
    return StreamChunk(text=f"{_SUMMARY.get(code, 'Error')}: {detail}", error_code=int(code), detail=detail)


def llava_error_frame(exc: BaseException) -> bytes:
    """One LLaVA error chunk, framed."""
    return encode_chunk(error_chunk(exc))


def chunk_error_response(exc: BaseException, frame: Callable[[BaseException], bytes] = llava_error_frame,
                         where: str = "") -> Response:
    """A stream endpoint's refusal before it streams: one error frame with the error's real HTTP status (logged as
    an error when the status is 5xx)."""
    status = error_status(exc)
    if status >= 500:
        logger.error("%s failed: %s: %s", where or "stream", type(exc).__name__, exc, exc_info=exc)
    else:
        logger.info("%s -> %d: %s", where or "stream", status, exc)
    return Response(frame(exc), status_code=status, media_type=STREAM_MEDIA_TYPE)


def install_error_handlers(app: FastAPI) -> None:
    """Map typed errors, request validation errors (400, not FastAPI's 422), HTTP errors and anything unexpected
    (500) to OpenAI-style bodies. Stream endpoints that answer with chunks call :func:`error_chunk` themselves."""

    async def on_ecso_error(request: Request, exc: Exception) -> JSONResponse:
        level = logging.WARNING if error_status(exc) >= 500 else logging.INFO
        logger.log(level, "%s %s -> %d: %s", request.method, request.url.path, error_status(exc), exc)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        message, param = describe_validation_error(exc)
        logger.info("%s %s -> 400: %s", request.method, request.url.path, message)
        return error_response(InvalidRequestError(message), param)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "invalid_request" if exc.status_code == 400 else f"http_{exc.status_code}"  # e.g. a body not UTF-8
        body = OpenAIErrorResponse(error=OpenAIError(message=str(exc.detail), type=kind, code=code))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(exc)

    app.add_exception_handler(ECSOError, on_ecso_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


# ---------------------------------------------------------------------------------------------- request size


class BodyLimitMiddleware:
    """Pure ASGI middleware: buffer each HTTP request body up to ``max_bytes`` and answer 413 beyond it. The body of
    the 413 is what the path's clients read: ``error_bodies[path](exc)`` (frames for stream endpoints), else an
    OpenAI error body. The buffered body is then replayed to the app.

    Before a 413 the rest of the body is read and dropped (up to ``drain_bytes``): a peer still sending (a
    controller relaying to a worker with a smaller limit) then reads the 413 instead of a connection reset."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int,
                 error_bodies: Mapping[str, Callable[[Exception], bytes]] | None = None, service: str = "worker",
                 drain_bytes: int = 256 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.error_bodies = dict(error_bodies or {})
        self.service = service
        self.drain_bytes = drain_bytes

    async def _drain(self, receive: Callable, seen: int) -> None:
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            seen += len(message.get("body", b""))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._refuse(scope, send, int(declared))
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                if more:
                    await self._drain(receive, len(body))
                await self._refuse(scope, send, len(body), at_least=True)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, send: Callable, size: int, at_least: bool = False) -> None:
        err = RequestTooLargeError(f"request body is {'over ' if at_least else ''}{size} bytes; this {self.service} "
                                   f"accepts at most {self.max_bytes} (--max-request-bytes)")
        logger.info("%s %s -> 413: %s", scope.get("method"), scope.get("path"), err)
        encoder = self.error_bodies.get(scope.get("path", ""))
        if encoder is not None:
            payload, media = encoder(err), STREAM_MEDIA_TYPE
        else:
            payload, media = openai_error(err).model_dump_json().encode(), "application/json"
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", media.encode()), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


# ------------------------------------------------------------------------------------------------------- runner


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """``--host``, ``--port``, ``--api-key``, ``--log-level``, ``--log-ips``: the flags every service's ``main()``
    has."""
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to bind (default %(default)s, this machine only). 0.0.0.0 exposes the service "
                        "to the network; set --api-key then, or a warning is logged.")
    parser.add_argument("--port", type=_port, default=default_port, help="TCP port to listen on (default %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"shared secret. When set, every endpoint except /health requires 'Authorization: Bearer "
                        f"KEY', and this service sends it on its own calls to other services. Default: the "
                        f"{API_KEY_ENV} environment variable (preferred: a command line is visible to other users); "
                        f"unset or empty = no authentication.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging level for this service and uvicorn (default %(default)s)")
    parser.add_argument("--log-ips", action="store_true",
                        help="put client IP addresses in the logs (uvicorn's access lines, rejected keys). Default: "
                        "the access lines carry method, path and status only")


def configure_logging(level: str = "info") -> None:
    """Log records with time, level and logger name. httpx's one line per request (heartbeats every 15 s) only
    at debug level."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level.lower() != "debug":
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# Paths that services and the launcher call on a timer (heartbeats, health and status probes): their successful
# access lines are logged at debug level only, so they do not bury what a person needs to see.
PERIODIC_PATHS = frozenset({"/receive_heart_beat", "/health", "/worker_get_status", "/list_models"})


class PeriodicAccessFilter(logging.Filter):
    """Drops uvicorn's access line of a successful request to one of ``PERIODIC_PATHS`` unless the service logs at
    debug level; errors on those paths, and every other request, are kept."""

    def __init__(self, level: str = "info") -> None:
        super().__init__()
        self.debug = level.lower() == "debug"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if self.debug or len(args) < 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        return not (path in PERIODIC_PATHS and isinstance(status, int) and status < 400)


def uvicorn_log_config(log_ips: bool = False, log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration; without ``log_ips`` its access lines leave out the client address; periodic
    requests' access lines only at debug level (:class:`PeriodicAccessFilter`)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if not log_ips:
        config["formatters"]["access"]["fmt"] = '%(levelprefix)s "%(request_line)s" %(status_code)s'
    config.setdefault("filters", {})["periodic"] = {"()": PeriodicAccessFilter, "level": log_level}
    config["handlers"]["access"].setdefault("filters", []).append("periodic")
    return config


def run_app(app: FastAPI, *, host: str, port: int, api_key: str | None, log_level: str = "info",
            log_ips: bool = False) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; warns when it is reachable beyond loopback without a key.
    Client addresses are logged only with ``log_ips``."""
    if not api_key and not is_loopback(host):
        logger.warning("serving on %s:%d without an API key: anyone who can reach this port can use the service "
                       "(and register workers); set --api-key or %s", host, port, API_KEY_ENV)
    app.state.log_ips = log_ips
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=uvicorn_log_config(log_ips, log_level))
