"""The server edge every service shares: shared-key auth, a request body limit, the one mapping from typed errors to
HTTP statuses, OpenAI error bodies and LLaVA chunks, the flags of every service's ``main()`` and the uvicorn runner.

The API key is a shared secret: a service started with one requires ``Authorization: Bearer <key>`` on every
endpoint except ``/health`` (compared in constant time, never logged). Clients live in :mod:`llava.http_client`.
"""
from __future__ import annotations

import argparse
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
from llava.serve.server_http import (
    KEEP_ALIVE_TIMEOUT,
    MAX_CONNECTIONS,
    PERIODIC_PATHS,
    HeaderTimeoutProtocol,
    PeriodicAccessFilter,
    uvicorn_log_config,
)

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
    "api_docs_urls",
    "ApiKeyMiddleware",
    "BodyLimitMiddleware",
    "install_edge_middleware",
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


_AUTH_ERROR = "missing or invalid API key: send 'Authorization: Bearer <key>'"
OPEN_PATHS = frozenset({"/health"})  # the only endpoint a keyed service answers without the key


def _key_matches(authorization: bytes, expected: str) -> bool:
    """``Authorization: Bearer <key>`` (raw header bytes) against the key, in constant time. Keys are ASCII
    (:func:`llava.http_client.resolve_api_key`), so client and server compare the same bytes."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected.encode("ascii"))


def _log_rejected(app: Any, method: str, path: str, client: Any) -> None:
    where = ""
    if getattr(app.state, "log_ips", False):  # client addresses only when asked (--log-ips)
        where = f" from {client[0] if client else '?'}"
    logger.warning("rejected %s %s%s: missing or wrong bearer key", method, path, where)


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: when ``app.state.api_key`` is set, the request must carry ``Authorization: Bearer <key>``
    (compared in constant time). Raises :class:`AuthError`, which :func:`install_error_handlers` turns into 401.
    :class:`ApiKeyMiddleware` checks the same before any body is read; this stays as a second line."""
    expected: str | None = getattr(request.app.state, "api_key", None)
    if not expected:
        return
    if _key_matches(request.headers.get("authorization", "").encode("latin-1"), expected):
        return
    client = (request.client.host,) if request.client else None
    _log_rejected(request.app, request.method, request.url.path, client)
    raise AuthError(_AUTH_ERROR)


async def drain_body(receive: Callable, seen: int, limit: int) -> None:
    """Read and drop the rest of a request body (``seen`` bytes already read), piece by piece, up to ``limit``."""
    while seen <= limit:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class ApiKeyMiddleware:
    """Pure ASGI middleware, outermost: on a keyed service (``app.state.api_key``) a request without the right
    bearer key is answered 401 from its headers alone, before its body is read (an unauthenticated 60 MiB body costs
    no memory: it is dropped as it comes), on every path except ``/health`` (``/docs`` and ``/openapi.json``
    included)."""

    def __init__(self, app: Callable[..., Awaitable[None]], drain_bytes: int = 64 * 1024 * 1024) -> None:
        self.app = app
        self.drain_bytes = drain_bytes

    async def _discard(self, scope: dict, receive: Callable) -> None:
        """Read and drop a refused body (piece by piece, nothing kept) up to ``drain_bytes``, so a client still
        sending reads the 401 rather than a connection reset; a larger declared body is not read at all."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if scope.get("method") in ("GET", "HEAD") or not declared.isdigit() or int(declared) > self.drain_bytes:
            return
        await drain_body(receive, 0, self.drain_bytes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        owner = scope.get("app")
        expected = getattr(getattr(owner, "state", None), "api_key", None)
        if scope["type"] != "http" or not expected or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if _key_matches(dict(scope.get("headers") or []).get(b"authorization", b""), expected):
            await self.app(scope, receive, send)
            return
        _log_rejected(owner, scope.get("method", "?"), scope.get("path", "?"), scope.get("client"))
        await self._discard(scope, receive)
        payload = openai_error(AuthError(_AUTH_ERROR)).model_dump_json().encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def api_docs_urls(api_key: str | None) -> dict[str, str | None]:
    """FastAPI's ``docs_url``/``redoc_url``/``openapi_url``: served (behind the key) only by a keyed service; a
    keyless one has none, so it does not describe itself to whoever can reach it."""
    if api_key:
        return {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


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
        await drain_body(receive, seen, self.drain_bytes)

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


def install_edge_middleware(app: FastAPI, *, max_bytes: int, service: str,
                            error_bodies: Mapping[str, Callable[[Exception], bytes]] | None = None) -> None:
    """The service edge in order: the key checked from the headers (outermost, :class:`ApiKeyMiddleware`), then the
    body read under its limit (:class:`BodyLimitMiddleware`)."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, service=service, error_bodies=error_bodies)
    app.add_middleware(ApiKeyMiddleware, drain_bytes=max_bytes)  # added last = runs first


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


def run_app(app: FastAPI, *, host: str, port: int, api_key: str | None, log_level: str = "info",
            log_ips: bool = False) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; warns when it is reachable beyond loopback without a key.
    Client addresses are logged only with ``log_ips``, query strings never. Request heads must arrive within
    :mod:`llava.serve.server_http`'s deadline, idle keep-alive connections close after its ``KEEP_ALIVE_TIMEOUT``,
    and at most ``MAX_CONNECTIONS`` connections are served at once."""
    if not api_key and not is_loopback(host):
        logger.warning("serving on %s:%d without an API key: anyone who can reach this port can use the service "
                       "(and register workers); set --api-key or %s", host, port, API_KEY_ENV)
    app.state.log_ips = log_ips
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=uvicorn_log_config(log_ips, log_level),
                http=HeaderTimeoutProtocol, timeout_keep_alive=KEEP_ALIVE_TIMEOUT, limit_concurrency=MAX_CONNECTIONS)
