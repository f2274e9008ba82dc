"""The worker's ECSO stream: ``POST /worker_ecso_stream`` runs ECSO's four steps on the worker's model and sends
one NUL-delimited :class:`~llava.serve.protocol.ecso.ECSOEvent` per step as it happens:

``direct`` deltas (``done: false``) then ``direct`` done (just the done event when the request gives ``direct``,
the answer to check); ``verdict`` (flagged, harm_score in score mode);
when flagged, ``caption`` and ``safe`` the same way; then ``final``. A failure before the run starts is one
``error`` event with a real HTTP status (400 bad input, 404 unknown model, 413 too large); a failure during the run
ends the stream with an ``error`` event (``error_code``, ``detail``).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError

from llava.constants import ECSO_ALIAS_SUFFIX
from llava.ecso.pipeline import ECSO
from llava.errors import ECSOError, InvalidRequestError
from llava.http_client import encode_chunk
from llava.serve.protocol.ecso import ECSO_STREAM_PATH, ERROR_EVENT, ECSOEvent, ECSOStreamRequest
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.server import STREAM_MEDIA_TYPE, chunk_error_response, error_chunk, require_api_key
from llava.serve.worker_state import WorkerState, get_state

__all__ = ["error_event", "ecso_error_frame", "ecso_routes"]

logger = logging.getLogger(__name__)


def error_event(exc: BaseException) -> ECSOEvent:
    chunk = error_chunk(exc)
    return ECSOEvent(event=ERROR_EVENT, text=chunk.text, error_code=chunk.error_code, detail=chunk.detail)


def ecso_error_frame(exc: BaseException) -> bytes:
    return encode_chunk(error_event(exc))


async def _prepare(state: WorkerState, raw: bytes) -> tuple[ECSO, ECSOStreamRequest, list[Image.Image]]:
    try:
        req = ECSOStreamRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)[0]) from None
    if req.model is not None:
        state.check_model(req.model, [state.model_name + ECSO_ALIAS_SUFFIX])
    state.model.check_reachable()
    state.check_images(int(req.image is not None), req.query, req.direct)
    pipeline = state.pipeline(req.options.overrides(), streamed=True)
    images = [] if req.image is None else [await state.images.decode(req.image, "image")]
    await state.check_fits(pipeline, req.query, images, req.direct)
    return pipeline, req, images


async def _frames(state: WorkerState, pipeline: ECSO, req: ECSOStreamRequest, images: list[Image.Image],
                  stop: threading.Event) -> AsyncIterator[bytes]:
    try:
        async for event in state.model.stream_ecso(pipeline, images, req.query, req.direct, stop):
            yield encode_chunk(ECSOEvent.from_step(event))
    except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
        logger.warning("ECSO stream failed: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, ECSOError))
        yield encode_chunk(error_event(exc))
    finally:
        stop.set()  # the run ended or its client left: stop generating, end the pipeline, free the slot


def ecso_routes() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.post(ECSO_STREAM_PATH)
    async def worker_ecso_stream(request: Request) -> Response:
        state = get_state(request)
        try:
            pipeline, req, images = await _prepare(state, await request.body())
        except Exception as exc:  # noqa: BLE001 - one error event with a real status
            return chunk_error_response(exc, ecso_error_frame, where=ECSO_STREAM_PATH)
        logger.info("ECSO run: verdict %s, %d image(s), query %d chars%s", pipeline.verdict_mode, len(images),
                    len(req.query), "" if req.direct is None else f", direct answer given ({len(req.direct)} chars)")
        return StreamingResponse(_frames(state, pipeline, req, images, threading.Event()),
                                 media_type=STREAM_MEDIA_TYPE)

    return router
