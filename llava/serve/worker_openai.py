"""The worker's OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

* Messages: ``system``/``developer`` text replaces the template's system prompt; ``user``/``assistant`` turns
  become the conversation (consecutive messages of one role are joined by newlines); the last message must be the
  user's. Each user message's images (``image_url`` parts: ``data:`` URLs, http(s) only with
  ``--allow-image-urls``) become ``<image>`` tags at its front, as LLaVA does.
* ``stream: true``: server-sent events ``data: {chunk}``, ending with ``data: [DONE]``; a failure mid-stream is a
  ``data: {"error": {...}}`` event (which the ``openai`` client raises as an ``APIError``).
* ``logprobs: true, top_logprobs: N``: log-probabilities of the first generated token and its N best alternatives
  (on the last chunk when streaming). That is what a yes/no score needs (the ``openai`` backend's score verdict).
* ECSO: ``"ecso": true`` or the model ``<name>+ecso``. The message is ECSO's final answer and ``ecso`` in the
  response holds the steps (:class:`~llava.serve.protocol.openai.ECSOInfo`). Streaming sends the final answer (the
  direct answer once it passed the check, else the safe answer as it is generated) and the steps on the last chunk.
  ECSO is single-turn: one user message, no system or assistant turns.

Each prompt is rendered and checked to fit once (:meth:`~llava.ecso.backends.ServingBackend.prepare`), and
generated from what that returned; the model is reached only through the worker's backend.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llava.constants import ECSO_ALIAS_SUFFIX
from llava.conversation import Chat
from llava.ecso.backends import Prepared
from llava.ecso.events import ECSOProgress, ECSOResult, Step
from llava.ecso.pipeline import ECSO
from llava.errors import ECSOError, InvalidRequestError
from llava.generation import FirstTokenLogprobs, GenerationParams, ScoredToken
from llava.serve.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ECSOInfo,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llava.serve.server import SSE_MEDIA_TYPE, openai_error, require_api_key
from llava.serve.worker_runtime import call_model, load_image_urls, stream_model
from llava.serve.worker_state import WorkerState, get_state

__all__ = ["parse_chat", "openai_routes"]

logger = logging.getLogger(__name__)

_SYSTEM_ROLES = ("system", "developer")


# ---------------------------------------------------------------------------------------------- conversation


def parse_chat(messages: list[ChatMessage]) -> Chat:
    """Group OpenAI messages into turns (each turn's images are its ``image_url`` URLs); raises
    :class:`InvalidRequestError` naming the message."""
    system: list[str] = []
    merged: list[list[Any]] = []  # [role, texts, image urls]
    for i, msg in enumerate(messages):
        role = "system" if msg.role in _SYSTEM_ROLES else msg.role
        if role != "user" and msg.image_urls:
            raise InvalidRequestError(f"messages[{i}]: images are only accepted in user messages, not {msg.role!r}")
        if role == "system":
            if merged:
                raise InvalidRequestError(f"messages[{i}]: a {msg.role} message must come before the conversation")
            system.append(msg.text)
        elif merged and merged[-1][0] == role:
            merged[-1][1].append(msg.text)
            merged[-1][2].extend(msg.image_urls)
        else:
            merged.append([role, [msg.text], list(msg.image_urls)])
    if not merged or merged[0][0] != "user":
        raise InvalidRequestError("messages: the conversation must start with a user message")
    if merged[-1][0] != "user":
        raise InvalidRequestError("messages: the last message must be the user's (the assistant answers it)")
    turns: list[tuple[str, str | None]] = []
    images: list[list[Any]] = []
    for k in range(0, len(merged), 2):
        user = merged[k]
        assistant = merged[k + 1] if k + 1 < len(merged) else None
        turns.append(("\n".join(user[1]), "\n".join(assistant[1]) if assistant else None))
        images.append(user[2])
    return Chat("\n".join(system) if system else None, turns, images)


# ---------------------------------------------------------------------------------------------------- helpers


def _sse(obj: BaseModel | dict) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return b"data: " + data.encode() + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _ecso_info(state: WorkerState, result: ECSOResult) -> ECSOInfo:
    return ECSOInfo(direct=result.direct, flagged=result.flagged, harm_score=result.harm_score,
                    verdict_text=result.verdict_text, verdict_mode=result.verdict_mode,
                    verdict_fallback=result.verdict_fallback, caption=result.caption,
                    safe_answer=result.safe_answer, timings=result.timings, model_family=state.model_family)


def _entry(token: ScoredToken) -> dict[str, Any]:
    return {"token": token.token, "logprob": token.logprob, "bytes": list(token.token.encode())}


def _choice_logprobs(first: FirstTokenLogprobs) -> ChoiceLogprobs:
    alternatives = [TopLogprob(**_entry(t)) for t in first.alternatives]
    return ChoiceLogprobs(content=[TokenLogprob(**_entry(first.chosen), top_logprobs=alternatives)])


@dataclass
class _Request:
    """A request made ready: model name to report, its prepared prompt (direct answers) or pipeline (ECSO),
    decoding settings, prompt length in tokens."""

    req: ChatCompletionRequest
    model: str
    prepared: Prepared
    params: GenerationParams
    prompt_tokens: int
    top_logprobs: int | None
    pipeline: ECSO | None = None
    query: str = ""
    stop: threading.Event = field(default_factory=threading.Event)  # set when a streaming client goes away


def _ecso_overrides(req: ChatCompletionRequest) -> dict[str, Any]:
    """ECSO options: the request's own sampling fields when it set them, then ``ecso_options``."""
    given = req.model_fields_set
    out: dict[str, Any] = {}
    if "temperature" in given:
        out["temperature"] = req.temperature
    if "top_p" in given:
        out["top_p"] = req.top_p
    if req.max_completion_tokens or req.max_tokens:
        out["max_new_tokens"] = req.token_limit(0)
    if req.ecso_options is not None:
        out.update(req.ecso_options.overrides())
    return out


def _top_logprobs(state: WorkerState, req: ChatCompletionRequest) -> int | None:
    if not req.logprobs:
        if req.top_logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
        return None
    top = req.top_logprobs or 0
    if top > state.config.max_top_logprobs:
        raise InvalidRequestError(f"top_logprobs: at most {state.config.max_top_logprobs} on this worker, got "
                                  f"{top} (--max-top-logprobs)")
    return top


async def _prepare(state: WorkerState, req: ChatCompletionRequest) -> _Request:
    state.check_model(req.model, [state.model_name + ECSO_ALIAS_SUFFIX])
    ecso = req.ecso or req.model.endswith(ECSO_ALIAS_SUFFIX)
    chat = parse_chat(req.messages)
    top_logprobs = _top_logprobs(state, req)
    if ecso and (chat.system is not None or len(chat.turns) > 1):
        raise InvalidRequestError("ecso: ECSO answers a single user message; send no system or assistant messages")
    if ecso and top_logprobs is not None:
        raise InvalidRequestError("logprobs are not available with ecso")
    state.check_images(len(chat.images))
    pipeline = state.pipeline(_ecso_overrides(req), streamed=req.stream) if ecso else None
    chat = chat.with_images(await load_image_urls(chat.images, state.policy, state.http))
    params = GenerationParams(max_new_tokens=req.token_limit(state.config.max_new_tokens), temperature=req.temperature,
                              top_p=req.top_p, stop=tuple(req.stop_list))
    query = chat.turns[0][0]
    if pipeline is not None:  # its first prompt: the query with its images, as the chat's own prompt
        prepared = await anyio.to_thread.run_sync(state.check_fits, pipeline, query, chat.images)
    else:
        prepared = await anyio.to_thread.run_sync(state.backend.prepare, chat)
    return _Request(req, req.model, prepared, params, prepared.prompt_tokens or 0, top_logprobs, pipeline, query)


def _finish_reason(completion_tokens: int, params: GenerationParams) -> str:
    return "length" if completion_tokens >= params.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------------------- direct


def _logprobs(state: WorkerState, r: _Request, text: str) -> ChoiceLogprobs | None:
    if r.top_logprobs is None:
        return None
    first = state.backend.first_token_logprobs(r.prepared, r.top_logprobs, text, r.params.greedy)
    return _choice_logprobs(first)


def _generate(state: WorkerState, r: _Request) -> tuple[str, int, ChoiceLogprobs | None]:
    text = state.backend.complete(r.prepared, r.params)
    return text, state.backend.count_tokens(text), _logprobs(state, r, text)


async def _complete(state: WorkerState, r: _Request) -> ChatCompletionResponse:
    if r.pipeline is not None:
        pipeline = r.pipeline
        result = await call_model(state.slots, lambda: pipeline.run(r.prepared.images, r.query))
        n = await anyio.to_thread.run_sync(state.backend.count_tokens, result.final)
        choice = ChatChoice(message=AssistantMessage(content=result.final), finish_reason="stop")
        return ChatCompletionResponse(model=r.model, choices=[choice], usage=_usage(r.prompt_tokens, n),
                                      ecso=_ecso_info(state, result))
    text, n, logprobs = await call_model(state.slots, lambda: _generate(state, r))
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=_finish_reason(n, r.params),
                        logprobs=logprobs)
    return ChatCompletionResponse(model=r.model, choices=[choice], usage=_usage(r.prompt_tokens, n))


def _direct_job(state: WorkerState, r: _Request) -> Iterator[tuple[str, Any]]:
    """Blocking: ("delta", text) items, then ("end", (completion tokens, logprobs))."""
    text = ""
    for delta in state.backend.stream_prepared(r.prepared, r.params, r.stop.is_set):
        text += delta
        yield "delta", delta
    yield "end", (state.backend.count_tokens(text), _logprobs(state, r, text))


def _ecso_job(state: WorkerState, r: _Request) -> Iterator[tuple[str, Any]]:
    """Blocking: the final answer's deltas (the direct answer in one piece once it passed the check, the safe answer
    as it streams), then ("end", (completion tokens, ECSOInfo))."""
    assert r.pipeline is not None
    progress = ECSOProgress()
    for event in r.pipeline.stream(r.prepared.images, r.query, should_stop=r.stop.is_set):
        delta = progress.apply(event)
        if event.step is Step.VERDICT and not progress.flagged:
            yield "delta", progress.direct
        elif event.step is Step.SAFE and delta:
            yield "delta", delta
    result = ECSOResult.from_progress(r.query, progress, r.pipeline.verdict_mode)
    yield "end", (state.backend.count_tokens(result.final), _ecso_info(state, result))


async def _sse_stream(state: WorkerState, p: _Request) -> AsyncIterator[bytes]:
    req, base = p.req, {"model": p.model}
    first = ChatCompletionChunk(**base, choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    base["id"], base["created"] = first.id, first.created
    yield _sse(first)
    job = _ecso_job if p.pipeline is not None else _direct_job
    try:
        async for kind, value in stream_model(state.slots, lambda: job(state, p), state.jobs, p.stop):
            if kind == "delta":
                if value:
                    yield _sse(ChatCompletionChunk(**base, choices=[ChunkChoice(delta=ChunkDelta(content=value))]))
                continue
            n, extra = value
            finish = "stop" if p.pipeline is not None else _finish_reason(n, p.params)
            last = ChunkChoice(delta=ChunkDelta(), finish_reason=finish,
                               logprobs=extra if isinstance(extra, ChoiceLogprobs) else None)
            yield _sse(ChatCompletionChunk(**base, choices=[last],
                                           ecso=extra if isinstance(extra, ECSOInfo) else None))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse(ChatCompletionChunk(**base, choices=[], usage=_usage(p.prompt_tokens, n)))
    except Exception as exc:  # noqa: BLE001 - an error event the openai client raises as APIError
        logger.warning("chat completion stream failed: %s: %s", type(exc).__name__, exc,
                       exc_info=not isinstance(exc, ECSOError))
        yield _sse(openai_error(exc).model_dump(exclude_none=True))
    finally:
        p.stop.set()  # the stream ended or its client left: stop generating and free the slot
    yield _SSE_DONE


# ---------------------------------------------------------------------------------------------------- routes


def openai_routes() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @router.get("/models")
    async def list_models(request: Request) -> ModelList:
        name = get_state(request).model_name
        return ModelList(data=[ModelCard(id=name), ModelCard(id=name + ECSO_ALIAS_SUFFIX)])

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state = get_state(request)
        prepared = await _prepare(state, body)
        if body.stream:
            return StreamingResponse(_sse_stream(state, prepared), media_type=SSE_MEDIA_TYPE,
                                     headers={"Cache-Control": "no-cache"})
        return (await _complete(state, prepared)).model_dump(exclude_none=True)

    return router
