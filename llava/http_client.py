"""The client side of the project's HTTP services and of OpenAI-compatible endpoints (no server code here):

* NUL framing of LLaVA streams: each frame is ``json + b"\\0"`` (:func:`encode_chunk`, :class:`ChunkDecoder`);
* typed errors from answers: an OpenAI error body, a LLaVA chunk's ``error_code``, or the HTTP status
  (:func:`error_from_response`, :func:`error_from_chunk`), so a typed error survives an HTTP round trip;
* :class:`ServiceClient`: JSON, NUL-framed streams and server-sent events with the bearer key; failures raise
  :mod:`llava.errors` types;
* the keys and URLs taken from the environment (``ECSO_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``).

The API key of our services is a shared secret: a service started with one requires ``Authorization: Bearer
<key>`` on every endpoint except ``/health`` and sends the same header on its own calls to other services.
Needs ``httpx`` (the ``[serve]`` or ``[eval]`` extra).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from llava import errors
from llava.constants import OPENAI_API_KEY_ENV, ErrorCode
from llava.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    ContextLengthError,
    ECSOError,
    InvalidRequestError,
    NoWorkerError,
    PolicyError,
    UpstreamUnavailableError,
)
from llava.extras import require_extra

httpx = require_extra("httpx", "serve")

__all__ = [
    "API_KEY_ENV",
    "OPENAI_API_KEY_ENV",
    "OPENAI_BASE_URL_ENV",
    "STREAM_DELIMITER",
    "encode_chunk",
    "decode_chunk",
    "ChunkDecoder",
    "iter_chunks",
    "aiter_chunks",
    "aiter_sse_data",
    "resolve_api_key",
    "auth_headers",
    "openai_base_url",
    "error_from_chunk",
    "raise_for_chunk",
    "error_from_response",
    "is_loopback",
    "is_loopback_url",
    "ServiceClient",
    "apost_json",
]

API_KEY_ENV = "ECSO_API_KEY"
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"
STREAM_DELIMITER = b"\0"
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # one frame; a peer that never sends the delimiter is cut off here

# ------------------------------------------------------------------------------------------------------ streams


def _jsonable(payload: Any) -> Any:
    """A pydantic model (anything with ``model_dump``, ``None`` fields left out), a mapping, or ``{}``."""
    if payload is None:
        return {}
    if hasattr(payload, "model_dump"):
        return payload.model_dump(mode="json", exclude_none=True)
    return dict(payload)


def encode_chunk(chunk: Any) -> bytes:
    """One frame: ``json + b"\\0"`` (what LLaVA's workers send; ``None`` fields of models are left out)."""
    return json.dumps(_jsonable(chunk)).encode() + STREAM_DELIMITER


def decode_chunk(frame: bytes) -> dict[str, Any]:
    """The JSON object of one frame (delimiter stripped or not). A frame that is not a JSON object is the peer
    breaking the protocol: :class:`BackendError`."""
    try:
        obj = json.loads(frame.rstrip(STREAM_DELIMITER))
    except ValueError:  # JSONDecodeError, invalid UTF-8
        raise BackendError(f"protocol error: stream frame is not JSON: {frame[:80]!r}") from None
    if not isinstance(obj, dict):
        raise BackendError(f"protocol error: stream frame is not a JSON object: {frame[:80]!r}")
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

    def check_finished(self) -> None:
        if self.pending:
            raise BackendError(f"stream ended inside a frame ({self.pending} bytes without the NUL delimiter)")


def iter_chunks(data: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Decode a byte stream of frames (e.g. ``requests``' ``iter_content()``). A trailing partial frame is an error."""
    decoder = ChunkDecoder()
    for block in data:
        for frame in decoder.feed(block):
            yield decode_chunk(frame)
    decoder.check_finished()


async def aiter_chunks(data: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    decoder = ChunkDecoder()
    async for block in data:
        for frame in decoder.feed(block):
            yield decode_chunk(frame)
    decoder.check_finished()


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines)."""
    buffer: list[str] = []
    for line in lines:
        if not line:
            if buffer:
                yield "\n".join(buffer)
                buffer = []
        elif line.startswith("data:"):
            buffer.append(line[5:].lstrip(" "))
    if buffer:
        yield "\n".join(buffer)


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _event_data(block: bytes) -> str | None:
    data = [line[5:].lstrip(b" ") for line in block.splitlines() if line.startswith(b"data:")]
    return b"\n".join(data).decode("utf-8") if data else None


async def aiter_sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event of a byte stream (e.g. httpx's ``aiter_bytes()``), split on the blank
    lines that end events: one pass over the bytes, no per-line decoding (a proxy relays many small events)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        start = 0
        for end in _EVENT_END.finditer(buffer):
            data = _event_data(buffer[start:end.start()])
            start = end.end()
            if data is not None:
                yield data
        buffer = buffer[start:]
    if buffer.strip():
        data = _event_data(buffer)
        if data is not None:
            yield data


def _json_object(data: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise BackendError(f"{where} sent an event that is not JSON: {data[:120]!r}") from None
    if not isinstance(obj, dict):
        raise BackendError(f"{where} sent an event that is not a JSON object: {data[:120]!r}")
    return obj


# ------------------------------------------------------------------------------------------------- environment


def resolve_api_key(value: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from ``--api-key``, else ``$ECSO_API_KEY``; empty means none. A key is printable ASCII without
    spaces (a header carries it: other characters would be encoded differently by client and server); anything
    else is a ``ValueError`` that names the position, not the key."""
    key = value if value is not None else environ.get(API_KEY_ENV)
    if key:
        bad = next((i for i, ch in enumerate(key) if not (ch.isascii() and ch.isprintable()) or ch == " "), None)
        if bad is not None:
            raise ValueError(f"the API key must be printable ASCII without spaces; character {bad + 1} of "
                             f"{len(key)} is not")
    return key or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def openai_base_url(value: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """An OpenAI-compatible endpoint's base URL: ``value``, else ``$OPENAI_BASE_URL``; empty means none."""
    return value or environ.get(OPENAI_BASE_URL_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")


# ------------------------------------------------------------------------------------------------------- errors

# Every typed error by its ``code`` (the base class's "internal_error" stays a failed backend to the caller).
_ERRORS_BY_CODE = MappingProxyType({cls.code: cls for cls in (getattr(errors, name) for name in errors.__all__)
                                    if issubclass(cls, ECSOError) and cls is not ECSOError})
_ERRORS_BY_STREAM_CODE = MappingProxyType({
    ErrorCode.NO_WORKER: NoWorkerError,
    ErrorCode.TIMEOUT: BackendTimeoutError,
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.CONTEXT_OVERFLOW: ContextLengthError,
    ErrorCode.UNAUTHORIZED: AuthError,
    ErrorCode.UPSTREAM_UNAVAILABLE: UpstreamUnavailableError,
    ErrorCode.POLICY: PolicyError,
})


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


def _transport_error(exc: httpx.HTTPError, url: str, timeout: float | None) -> ECSOError:
    if isinstance(exc, httpx.TimeoutException):
        within = f"no answer within {timeout:g} s" if timeout is not None else "timed out"
        return BackendTimeoutError(f"{url}: {within} ({type(exc).__name__})")
    return BackendError(f"{url}: {type(exc).__name__}: {exc}")


def _json_answer(resp: httpx.Response, url: str) -> dict[str, Any]:
    if not resp.content:
        return {}
    try:
        return resp.json()
    except ValueError:
        raise BackendError(f"{url} answered with something that is not JSON") from None


# ------------------------------------------------------------------------------------------------------- client


class ServiceClient:
    """Blocking client for a controller, a worker or an OpenAI-compatible endpoint: JSON GET/POST, NUL-delimited
    streams and server-sent events, with the bearer key. Failures raise typed :mod:`llava.errors` exceptions.
    ``trust_env=False`` (default) ignores proxy environment variables: services talk to each other directly."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, trust_env: bool = False) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._client = httpx.Client(base_url=self.base_url, headers=auth_headers(api_key), timeout=timeout,
                                    transport=transport, trust_env=trust_env)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _request(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        url = self.url(path)
        try:
            resp = self._client.request(method, path, json=_jsonable(payload) if method == "POST" else None)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url, self.timeout) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, url)
        return _json_answer(resp, url)

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def post(self, path: str, payload: Any = None) -> dict[str, Any]:
        """POST ``payload`` (a pydantic model or a mapping) as JSON; the answer's JSON object."""
        return self._request("POST", path, payload)

    def stream(self, path: str, payload: Any) -> Iterator[dict[str, Any]]:
        """POST and yield each frame's object. Error chunks are yielded like any other (see :func:`raise_for_chunk`);
        a non-2xx answer that is not a chunk stream, a broken connection or a partial frame raises."""
        url = self.url(path)
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
            raise _transport_error(exc, url, self.timeout) from exc

    def events(self, path: str, payload: Any) -> Iterator[dict[str, Any]]:
        """POST and yield the JSON object of each server-sent event until ``data: [DONE]``. An ``error`` event
        (OpenAI's mid-stream failure) raises its typed error."""
        url = self.url(path)
        try:
            with self._client.stream("POST", path, json=_jsonable(payload)) as resp:
                if resp.status_code >= 400:
                    raise error_from_response(resp.status_code, resp.read(), url)
                for data in _sse_data(resp.iter_lines()):
                    if data == "[DONE]":
                        return
                    event = _json_object(data, url)
                    if event.get("error"):
                        raise error_from_response(502, data.encode(), url)
                    yield event
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url, self.timeout) from exc


async def apost_json(client: httpx.AsyncClient, url: str, payload: Any = None, *, api_key: str | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
    """POST JSON with ``client`` (one the caller owns) and the bearer key; typed errors as :class:`ServiceClient`."""
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    try:
        resp = await client.post(url, json=_jsonable(payload), headers=auth_headers(api_key), **kwargs)
    except httpx.HTTPError as exc:
        raise _transport_error(exc, url, timeout) from exc
    if resp.status_code >= 400:
        raise error_from_response(resp.status_code, resp.content, url)
    return _json_answer(resp, url)
