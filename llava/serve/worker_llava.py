"""The worker's LLaVA protocol: ``POST /worker_get_status`` -> ``{model_names, speed, queue_length}`` (plus the chat
template its prompts use); ``POST /worker_generate_stream`` (a templated prompt + base64 images) -> NUL-delimited
chunks with the cumulative text, prompt included, as LLaVA's workers send them.

The prompt is checked to fit (and tokenized) once, before anything is streamed; a failure before the stream is one
error chunk with a real HTTP status, a failure during it ends the stream with an error chunk.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llava.ecso.backends import Prepared
from llava.errors import ECSOError, InvalidRequestError
from llava.generation import MAX_NEW_TOKENS_LIMIT, GenerationParams
from llava.http_client import encode_chunk
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import GenerateStreamRequest, StreamChunk, WorkerStatus
from llava.serve.server import STREAM_MEDIA_TYPE, chunk_error_response, error_chunk, require_api_key
from llava.serve.worker_state import WorkerState, get_state

__all__ = ["GENERATE_STREAM_PATH", "llava_routes"]

logger = logging.getLogger(__name__)

GENERATE_STREAM_PATH = "/worker_generate_stream"


async def _prepare(state: WorkerState, raw: bytes) -> tuple[GenerateStreamRequest, Prepared, GenerationParams]:
    try:
        req = GenerateStreamRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)[0]) from None
    state.check_model(req.model)
    state.model.check_reachable()
    state.check_images(len(req.images), req.prompt)
    images = await state.images.decode_all(req.images)
    # Checks the <image> count and the context length before anything is streamed; the result is streamed from.
    prepared = await state.model.prepare_templated(req.prompt, images)
    params = GenerationParams(max_new_tokens=min(max(req.max_new_tokens, 1), MAX_NEW_TOKENS_LIMIT),
                              temperature=req.temperature, top_p=req.top_p, stop=tuple(req.stop_list))
    return req, prepared, params


async def _chunks(state: WorkerState, prompt: str, prepared: Prepared, params: GenerationParams) -> AsyncIterator[bytes]:
    """Cumulative chunks (prompt + text so far); a failure ends the stream with an error chunk. A client that goes
    away stops the generation at the next token (``stop``), which frees the slot."""
    text, sent, stop = "", False, threading.Event()
    try:
        async for delta in state.model.stream(prepared, params, stop):
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


def llava_routes() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post("/worker_get_status", response_model_exclude_none=True)
    async def worker_get_status(request: Request) -> WorkerStatus:
        return get_state(request).status()

    @router.post(GENERATE_STREAM_PATH)
    async def worker_generate_stream(request: Request) -> Response:
        state = get_state(request)
        try:
            req, prepared, params = await _prepare(state, await request.body())
        except Exception as exc:  # noqa: BLE001 - every failure is a chunk with a real status
            return chunk_error_response(exc, where=GENERATE_STREAM_PATH)
        if req.max_new_tokens == 0:  # LLaVA's slider can send 0: the prompt, nothing generated
            return Response(encode_chunk(StreamChunk(text=req.prompt)), media_type=STREAM_MEDIA_TYPE)
        return StreamingResponse(_chunks(state, req.prompt, prepared, params), media_type=STREAM_MEDIA_TYPE)

    return router
