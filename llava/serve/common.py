"""What every service shares: NUL-delimited JSON streams, shared-key auth, the one mapping from typed errors to
HTTP/OpenAI bodies and LLaVA chunks, a small HTTP client with the bearer key, and the uvicorn runner behind each
service's ``main()``.

The API key is a shared secret: a service started with one requires ``Authorization: Bearer <key>`` on every
endpoint except ``/health`` and sends the same header on its own calls to other services. It is compared in constant
time and never logged.
"""
from __future__ import annotations

import argparse
import copy
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import httpx
from pydantic import BaseModel

try:  # the server side; clients (the HTTP backends in llava.ecso.remote) need only httpx and pydantic
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - exercised only without the [serve] extra
    uvicorn = FastAPI = Request = RequestValidationError = JSONResponse = StarletteHTTPException = None  # type: ignore

from llava.constants import DEFAULT_HOST, ErrorCode
from llava.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    ContextLengthError,
    ECSOError,
    ImageError,
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkerError,
    RequestTooLargeError,
    UnsupportedError,
)
from llava.serve.protocol import OpenAIError, OpenAIErrorResponse, StreamChunk, describe_validation_error

__all__ = [
    "API_KEY_ENV",
    "STREAM_DELIMITER",
    "STREAM_MEDIA_TYPE",
    "encode_chunk",
    "decode_chunk",
    "ChunkDecoder",
    "iter_chunks",
    "aiter_chunks",
    "require_api_key",
    "auth_headers",
    "resolve_api_key",
    "error_status",
    "openai_error",
    "error_response",
    "error_chunk",
    "error_from_chunk",
    "raise_for_chunk",
    "error_from_response",
    "install_error_handlers",
    "BodyLimitMiddleware",
    "llava_error_frame",
    "ServiceClient",
    "apost_json",
    "add_server_arguments",
    "configure_logging",
    "is_loopback",
    "uvicorn_log_config",
    "run_app",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "ECSO_API_KEY"
STREAM_DELIMITER = b"\0"
STREAM_MEDIA_TYPE = "application/octet-stream"
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # one frame; a peer that never sends the delimiter is cut off here

# ------------------------------------------------------------------------------------------------------ streams


def _jsonable(payload: BaseModel | Mapping[str, Any] | None) -> Any:
    if payload is None:
        return {}
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", exclude_none=True)
    return dict(payload)


def encode_chunk(chunk: BaseModel | Mapping[str, Any]) -> bytes:
    """One frame: ``json + b"\\0"`` (what LLaVA's workers send; ``None`` fields of models are left out)."""
    return json.dumps(_jsonable(chunk)).encode() + STREAM_DELIMITER


def decode_chunk(frame: bytes) -> dict[str, Any]:
    """The JSON object of one frame (delimiter stripped or not)."""
    obj = json.loads(frame.rstrip(STREAM_DELIMITER))
    if not isinstance(obj, dict):
        raise ValueError(f"stream frame is not a JSON object: {frame[:80]!r}")
    return obj


class ChunkDecoder:
    """Incremental splitter: ``feed(bytes)`` returns the complete frames (raw bytes, delimiter removed, empty frames
    skipped); ``pending`` counts bytes of an unfinished frame, which must be 0 when a stream ends cleanly."""

    def __init__(self, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_chunk_bytes

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *frames, rest = bytes(self._buffer).split(STREAM_DELIMITER)
        self._buffer = bytearray(rest)
        if len(self._buffer) > self._max:
            raise BackendError(f"stream frame exceeds {self._max} bytes without a NUL delimiter")
        return [f for f in frames if f]


def iter_chunks(data: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Decode a byte stream of frames (e.g. ``requests``' ``iter_content()``). A trailing partial frame is an error."""
    decoder = ChunkDecoder()
    for block in data:
        for frame in decoder.feed(block):
            yield decode_chunk(frame)
    if decoder.pending:
        raise BackendError(f"stream ended inside a frame ({decoder.pending} bytes without the NUL delimiter)")


async def aiter_chunks(data: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    decoder = ChunkDecoder()
    async for block in data:
        for frame in decoder.feed(block):
            yield decode_chunk(frame)
    if decoder.pending:
        raise BackendError(f"stream ended inside a frame ({decoder.pending} bytes without the NUL delimiter)")


# --------------------------------------------------------------------------------------------------------- auth


def resolve_api_key(value: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from ``--api-key``, else ``$ECSO_API_KEY``; empty means none."""
    key = value if value is not None else environ.get(API_KEY_ENV)
    return key or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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

_SUMMARY = MappingProxyType(
    {
        ErrorCode.WORKER_ERROR: "Model worker error",
        ErrorCode.NO_WORKER: "No model worker available",
        ErrorCode.TIMEOUT: "Model worker timed out",
        ErrorCode.INVALID_REQUEST: "Invalid request",
        ErrorCode.CONTEXT_OVERFLOW: "The conversation is too long for the model's context",
        ErrorCode.UNAUTHORIZED: "Unauthorized",
    }
)
_ERRORS_BY_CODE = MappingProxyType(
    {
        cls.code: cls
        for cls in (
            InvalidRequestError,
            ImageError,
            ContextLengthError,
            RequestTooLargeError,
            ModelNotFoundError,
            UnsupportedError,
            NoWorkerError,
            BackendError,
            BackendTimeoutError,
            AuthError,
        )
    }
)
_ERRORS_BY_STREAM_CODE = MappingProxyType(
    {
        ErrorCode.NO_WORKER: NoWorkerError,
        ErrorCode.TIMEOUT: BackendTimeoutError,
        ErrorCode.INVALID_REQUEST: InvalidRequestError,
        ErrorCode.CONTEXT_OVERFLOW: ContextLengthError,
        ErrorCode.UNAUTHORIZED: AuthError,
    }
)


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


def error_from_chunk(chunk: Mapping[str, Any]) -> ECSOError | None:
    """The typed error a chunk reports, or ``None`` for a good chunk."""
    code = int(chunk.get("error_code", 0) or 0)
    if code == ErrorCode.OK:
        return None
    cls = _ERRORS_BY_STREAM_CODE.get(code, BackendError)  # type: ignore[call-overload]
    return cls(str(chunk.get("detail") or chunk.get("text") or f"error_code {code}"))


def raise_for_chunk(chunk: Mapping[str, Any]) -> None:
    err = error_from_chunk(chunk)
    if err is not None:
        raise err


def error_from_response(status: int, body: bytes, url: str = "") -> ECSOError:
    """Typed error for a non-2xx answer: the OpenAI body's ``code`` when there is one, else by status."""
    where = f" from {url}" if url else ""
    try:
        err = json.loads(body)["error"]
        message, code = str(err["message"]), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = body[:200].decode(errors="replace").strip() or "(empty body)", None
    if code in _ERRORS_BY_CODE:
        return _ERRORS_BY_CODE[code](message)
    if status == 401:
        return AuthError(f"HTTP 401{where}: {message}")
    if status in (400, 422):
        return InvalidRequestError(f"HTTP {status}{where}: {message}")
    if status == 504:
        return BackendTimeoutError(f"HTTP 504{where}: {message}")
    return BackendError(f"HTTP {status}{where}: {message}")


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
        error = OpenAIError(message=str(exc.detail), type=kind, code=code)
        body = OpenAIErrorResponse(error=error)
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(exc)

    app.add_exception_handler(ECSOError, on_ecso_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


# ---------------------------------------------------------------------------------------------- request size


def llava_error_frame(exc: Exception) -> bytes:
    """One LLaVA error chunk, framed."""
    return encode_chunk(error_chunk(exc))


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
        err = RequestTooLargeError(f"request body is {'over ' if at_least else ''}{size} bytes; this {self.service} accepts at "
                                   f"most {self.max_bytes} (--max-request-bytes)")
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


# ------------------------------------------------------------------------------------------------------- client


def _transport_error(exc: httpx.HTTPError, url: str) -> ECSOError:
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeoutError(f"{url}: timed out ({type(exc).__name__})")
    return BackendError(f"{url}: {type(exc).__name__}: {exc}")


class ServiceClient:
    """Blocking client for a controller or worker: JSON POST/GET and NUL-delimited streams, with the bearer key.
    Failures raise typed :mod:`llava.errors` exceptions. Proxy environment variables are ignored (services talk to
    each other directly)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url, headers=auth_headers(api_key), timeout=timeout, transport=transport, trust_env=False
        )

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            resp = self._client.request(method, path, json=_jsonable(payload) if method == "POST" else None)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, url)
        return resp.json() if resp.content else {}

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def post(self, path: str, payload: BaseModel | Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._request("POST", path, payload)

    def stream(self, path: str, payload: BaseModel | Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each frame's object. Error chunks are yielded like any other (see :func:`raise_for_chunk`);
        a non-2xx answer that is not a chunk stream, a broken connection or a partial frame raises."""
        url = f"{self.base_url}{path}"
        try:
            with self._client.stream("POST", path, json=_jsonable(payload)) as resp:
                if resp.status_code >= 400:
                    body = resp.read()
                    if STREAM_DELIMITER not in body:
                        raise error_from_response(resp.status_code, body, url)
                    yield from iter_chunks([body])
                    return
                yield from iter_chunks(resp.iter_bytes())
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc


async def apost_json(
    client: httpx.AsyncClient,
    url: str,
    payload: BaseModel | Mapping[str, Any] | None = None,
    *,
    api_key: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """POST JSON with ``client`` (one the caller owns) and the bearer key; typed errors as :class:`ServiceClient`."""
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    try:
        resp = await client.post(url, json=_jsonable(payload), headers=auth_headers(api_key), **kwargs)
    except httpx.HTTPError as exc:
        raise _transport_error(exc, url) from exc
    if resp.status_code >= 400:
        raise error_from_response(resp.status_code, resp.content, url)
    return resp.json() if resp.content else {}


# ------------------------------------------------------------------------------------------------------- runner


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """``--host``, ``--port``, ``--api-key``, ``--log-level``: the flags every service's ``main()`` has."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to bind (default %(default)s, this machine only). 0.0.0.0 exposes the service to the "
        "network; set --api-key then, or a warning is logged.",
    )
    parser.add_argument("--port", type=_port, default=default_port, help="TCP port to listen on (default %(default)s)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"shared secret. When set, every endpoint except /health requires 'Authorization: Bearer KEY', and "
        f"this service sends it on its own calls to other services. Default: the {API_KEY_ENV} environment "
        f"variable (preferred: a command line is visible to other users); unset or empty = no authentication.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging level for this service and uvicorn (default %(default)s)",
    )
    parser.add_argument(
        "--log-ips",
        action="store_true",
        help="put client IP addresses in the logs (uvicorn's access lines, rejected keys). Default: the access "
        "lines carry method, path and status only",
    )


def configure_logging(level: str = "info") -> None:
    """Log records with time, level and logger name. httpx's one line per request (heartbeats every 15 s) only
    at debug level."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level.lower() != "debug":
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def uvicorn_log_config(log_ips: bool = False) -> dict[str, Any]:
    """uvicorn's logging configuration; without ``log_ips`` its access lines leave out the client address."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if not log_ips:
        config["formatters"]["access"]["fmt"] = '%(levelprefix)s "%(request_line)s" %(status_code)s'
    return config


def run_app(app: FastAPI, *, host: str, port: int, api_key: str | None, log_level: str = "info",
            log_ips: bool = False) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; warns when it is reachable beyond loopback without a key.
    Client addresses are logged only with ``log_ips``."""
    if not api_key and not is_loopback(host):
        logger.warning(
            "serving on %s:%d without an API key: anyone who can reach this port can use the service "
            "(and register workers); set --api-key or %s",
            host,
            port,
            API_KEY_ENV,
        )
    app.state.log_ips = log_ips
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=uvicorn_log_config(log_ips))
