"""The controller's stream proxy: ``/worker_generate_stream`` dispatched to a worker and relayed frame for frame.

The client's body is sent on as it came (validated; re-encoding could fail on what JSON allows). A worker that
refuses the connection is dropped and the next one tried, and so is one that timed out ``max_worker_timeouts``
times in a row; every failure, before or during the stream, is one LLaVA error chunk with a real status (never a
hang: every read is bounded by the worker timeout). A frame that is not a JSON object ends the stream with a
protocol error instead of reaching the client.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llava.errors import AuthError, BackendError, BackendTimeoutError, ECSOError, InvalidRequestError, NoWorkerError
from llava.http_client import (
    STREAM_DELIMITER,
    ChunkDecoder,
    auth_headers,
    decode_chunk,
    encode_chunk,
    error_from_response,
)
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import GenerateStreamRequest
from llava.serve.server import STREAM_MEDIA_TYPE, error_chunk

__all__ = ["expire", "dispatch", "generate_stream"]

logger = logging.getLogger(__name__)


def expire(app: FastAPI) -> None:
    """Drop the workers silent for longer than the heartbeat expiration."""
    state = app.state
    for name in state.registry.expire(state.config.heart_beat_expiration):
        logger.warning(
            "removed worker %s: no heartbeat for more than %.1f s", name, state.config.heart_beat_expiration
        )


def _timed_out(app: FastAPI, address: str) -> None:
    """Count a timeout against a worker; after ``max_worker_timeouts`` in a row it is dropped (a hung worker whose
    heartbeats still come gets no more traffic; it re-registers on its next heartbeat and is dropped again after as
    many timeouts if it is still hung)."""
    limit = app.state.config.max_worker_timeouts
    count = app.state.registry.timed_out(address)
    if count >= limit:
        logger.warning("removed worker %s: %d requests in a row timed out (--max-worker-timeouts %d)", address,
                       count, limit)
        app.state.registry.remove(address)


def _answered(app: FastAPI, address: str) -> None:
    app.state.registry.answered(address)


def dispatch(app: FastAPI, model: str) -> str:
    """The address of the worker picked for ``model`` ("" when none serves it)."""
    expire(app)
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
        address = dispatch(app, model)
        if not address:
            known = app.state.registry.models()
            extra = f"; unreachable workers dropped: {', '.join(unreachable)}" if unreachable else ""
            sick = app.state.registry.unhealthy(model)
            if sick:
                extra += f"; workers whose model cannot answer now (its servers are down): {', '.join(sick)}"
            raise NoWorkerError(f"no healthy worker serves model {model!r} (models available: {known}){extra}")
        request = app.state.http.build_request(
            "POST", f"{address}/worker_generate_stream", content=body, headers=headers
        )
        try:
            return address, await app.state.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            _timed_out(app, address)
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
                try:
                    decode_chunk(frame)  # a frame that is not a JSON object never reaches the client
                except BackendError as exc:
                    raise BackendError(f"worker {address} broke the stream protocol after {frames} chunks: "
                                       f"{exc}") from None
                frames += 1
                yield frame + STREAM_DELIMITER
        if decoder.pending:
            raise BackendError(f"worker {address} ended its stream inside a frame ({decoder.pending} bytes)")
        if not frames:
            raise BackendError(f"worker {address} ended its stream without sending anything")
        _answered(app, address)
    except httpx.TimeoutException:
        timeout = app.state.config.worker_timeout
        err: ECSOError = BackendTimeoutError(f"worker {address} sent nothing for {timeout:g} s after {frames} chunks")
        logger.warning("stream from %s: %s", address, err)
        _timed_out(app, address)
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


def _all_frames_json(body: bytes) -> bool:
    try:
        for frame in body.split(STREAM_DELIMITER):
            if frame:
                decode_chunk(frame)
    except BackendError:
        return False
    return True


def _chunk_response(exc: ECSOError) -> Response:
    return Response(encode_chunk(error_chunk(exc)), status_code=exc.status, media_type=STREAM_MEDIA_TYPE)


async def generate_stream(app: FastAPI, request: Request) -> Response:
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
        if STREAM_DELIMITER in body and _all_frames_json(body):  # the worker already answered with error chunks
            return Response(body, status_code=resp.status_code, media_type=STREAM_MEDIA_TYPE)
        err = error_from_response(resp.status_code, body, f"{address}/worker_generate_stream")
        if isinstance(err, AuthError):  # the worker refused *our* key: not the client's fault
            err = BackendError(f"worker {address} rejected the controller's API key: {err}")
        logger.warning("worker_generate_stream via %s: %s", address, err)
        return _chunk_response(err)
    return StreamingResponse(_relay(app, address, resp), media_type=STREAM_MEDIA_TYPE)
