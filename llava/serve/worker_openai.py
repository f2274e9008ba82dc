"""The worker's OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

* Messages: ``system``/``developer`` text replaces the template's system prompt; ``user``/``assistant`` turns
  become the conversation (consecutive messages of one role are joined by newlines); the last message must be the
  user's. Each user message's images (``image_url`` parts: ``data:`` URLs, http(s) only with
  ``--allow-image-urls``) become ``<image>`` tags at its front, as LLaVA does.
* ``stream: true``: server-sent events ``data: {chunk}``, ending with ``data: [DONE]``; a failure mid-stream is a
  ``data: {"error": {...}}`` event (which the ``openai`` client raises as an ``APIError``).
* ``logprobs: true, top_logprobs: N``: log-probabilities of the first generated token and its N best alternatives
  (on the last chunk when streaming). That is what a yes/no score needs (the ``openai`` backend's score verdict).
* ECSO, by the worker's policy (``--ecso-stream``, :data:`~llava.serve.worker_state.ECSO_POLICIES`) and the
  request (``"ecso": true`` or the model ``<name>+ecso``; ``"ecso": false`` opts out where the worker allows it):
  ``hold`` answers with ECSO's final answer and ``ecso`` in the response holds the steps
  (:class:`~llava.serve.protocol.openai.ECSOInfo`); streaming sends nothing until the verdict, then the final answer
  (the direct answer in one piece once it passed the check, else the safe answer as it is generated) and the steps
  on the last chunk. ``monitor`` answers directly (streamed at once) and attaches the verdict of that answer, which
  never changes what was sent. ``off`` answers directly unless the request asks for ECSO. ECSO (hold) is
  single-turn: one user message, no system or assistant turns.

Each prompt is rendered and checked to fit once (:meth:`~llava.ecso.backends.ServingBackend.prepare`), and
generated from what that returned; the model is reached only through the worker's
:class:`~llava.serve.worker_model.WorkerModel`.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llava.constants import ECSO_ALIAS_SUFFIX
from llava.conversation import Chat
from llava.ecso.backends import Prepared
from llava.ecso.events import ECSOProgress, ECSOResult, Step, Verdict
from llava.ecso.pipeline import ECSO
from llava.errors import ECSOError, InvalidRequestError, PolicyError
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


def _usage(prompt_tokens: int | None, completion_tokens: int | None) -> Usage | None:
    if prompt_tokens is None or completion_tokens is None:
        return None  # a remote model that did not report it: no made-up numbers
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _ecso_info(state: WorkerState, result: ECSOResult, policy: str) -> ECSOInfo:
    return ECSOInfo(direct=result.direct, flagged=result.flagged, harm_score=result.harm_score,
                    verdict_text=result.verdict_text, verdict_mode=result.verdict_mode,
                    verdict_fallback=result.verdict_fallback, caption=result.caption,
                    safe_answer=result.safe_answer, timings=result.timings, policy=policy,
                    model_family=state.model_family)


def _monitor_info(state: WorkerState, direct: str, verdict: Verdict) -> ECSOInfo:
    return ECSOInfo(direct=direct, flagged=verdict.flagged, harm_score=verdict.score, verdict_text=verdict.text,
                    verdict_mode=verdict.mode, verdict_fallback=verdict.fallback, policy="monitor",
                    model_family=state.model_family)


def _entry(token: ScoredToken) -> dict[str, Any]:
    return {"token": token.token, "logprob": token.logprob, "bytes": list(token.token.encode())}


def _choice_logprobs(first: FirstTokenLogprobs) -> ChoiceLogprobs:
    alternatives = [TopLogprob(**_entry(t)) for t in first.alternatives]
    return ChoiceLogprobs(content=[TokenLogprob(**_entry(first.chosen), top_logprobs=alternatives)])


@dataclass
class _Request:
    """A request made ready: model name to report, its prepared prompt, decoding settings, how ECSO applies
    (``direct``, ``hold``, ``monitor``) with its pipeline, the query and images ECSO sees."""

    req: ChatCompletionRequest
    model: str
    prepared: Prepared
    params: GenerationParams
    top_logprobs: int | None
    mode: str = "direct"
    pipeline: ECSO | None = None
    query: str = ""
    images: list[Any] = field(default_factory=list)
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


def _mode(state: WorkerState, req: ChatCompletionRequest) -> str:
    """How ECSO applies to this request: the worker's policy, unless the request asks for ECSO or opts out."""
    policy = state.config.ecso_policy
    if req.ecso or req.model.endswith(ECSO_ALIAS_SUFFIX):
        return "hold"
    if req.ecso is False and policy != "off":
        if not state.config.allow_ecso_opt_out:
            raise PolicyError(f'"ecso": false is refused: this worker answers with ECSO (--ecso-stream {policy}); '
                              "start it with --allow-ecso-opt-out to let requests opt out")
        return "direct"
    return "direct" if policy == "off" else policy


async def _prepare(state: WorkerState, req: ChatCompletionRequest) -> _Request:
    state.check_model(req.model, [state.model_name + ECSO_ALIAS_SUFFIX])
    mode = _mode(state, req)
    state.model.check_reachable()
    chat = parse_chat(req.messages)
    top_logprobs = _top_logprobs(state, req)
    if mode == "hold" and (chat.system is not None or len(chat.turns) > 1):
        raise InvalidRequestError("ecso: ECSO answers a single user message; send no system or assistant messages")
    if mode == "hold" and top_logprobs is not None:
        raise InvalidRequestError("logprobs are not available with ecso")
    state.check_images(len(chat.images), chat.system, *(text for turn in chat.turns for text in turn))
    pipeline = state.pipeline(_ecso_overrides(req), streamed=req.stream) if mode != "direct" else None
    chat = chat.with_images(await state.images.load_urls(chat.images, state.http))
    params = GenerationParams(max_new_tokens=req.token_limit(state.config.max_new_tokens), temperature=req.temperature,
                              top_p=req.top_p if "top_p" in req.model_fields_set else None, stop=tuple(req.stop_list))
    query = chat.turns[-1][0]
    if pipeline is not None and mode == "hold":  # its first prompt: the query with its images, as the chat's own
        prepared = await state.check_fits(pipeline, query, chat.images)
    else:
        prepared = await state.model.prepare(chat)
    return _Request(req, req.model, prepared, params, top_logprobs, mode, pipeline, query, chat.images)


def _finish_reason(r: _Request, completion_tokens: int | None) -> str:
    if r.prepared.finish_reason in ("stop", "length"):
        return r.prepared.finish_reason
    return "length" if completion_tokens is not None and completion_tokens >= r.params.max_new_tokens else "stop"


async def _logprobs(state: WorkerState, r: _Request, text: str) -> ChoiceLogprobs | None:
    if r.top_logprobs is None:
        return None
    return _choice_logprobs(await state.model.first_token_logprobs(r.prepared, r.top_logprobs, text, r.params.greedy))


async def _monitor(state: WorkerState, r: _Request, text: str) -> ECSOInfo:
    assert r.pipeline is not None
    verdict = await state.model.check(r.pipeline, r.images, r.query, text)
    logger.info("ECSO monitor: %s (verdict %s, score %s%s) on a %d-character answer, sent unchanged",
                "flagged" if verdict.flagged else "passed", verdict.mode,
                "none" if verdict.score is None else f"{verdict.score:.3f}",
                f", fallback: {verdict.fallback}" if verdict.fallback else "", len(text))
    return _monitor_info(state, text, verdict)


# ---------------------------------------------------------------------------------------------------- answers


async def _complete(state: WorkerState, r: _Request) -> ChatCompletionResponse:
    if r.mode == "hold":
        assert r.pipeline is not None
        result = await state.model.run_ecso(r.pipeline, r.images, r.query)
        n = await state.model.count_tokens(result.final)
        choice = ChatChoice(message=AssistantMessage(content=result.final), finish_reason="stop")
        return ChatCompletionResponse(model=r.model, choices=[choice], usage=_usage(r.prepared.prompt_tokens, n),
                                      ecso=_ecso_info(state, result, "hold"))
    text = await state.model.complete(r.prepared, r.params)
    n = await state.model.completion_tokens(r.prepared, text)
    logprobs = await _logprobs(state, r, text)
    info = await _monitor(state, r, text) if r.mode == "monitor" else None
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=_finish_reason(r, n), logprobs=logprobs)
    return ChatCompletionResponse(model=r.model, choices=[choice], usage=_usage(r.prepared.prompt_tokens, n),
                                  ecso=info)


async def _direct_deltas(state: WorkerState, r: _Request, end: dict[str, Any]) -> AsyncIterator[str]:
    """The answer's deltas as they come (``direct`` and ``monitor``); then fills ``end`` for the last chunk."""
    text = ""
    async for delta in state.model.stream(r.prepared, r.params, r.stop):
        text += delta
        yield delta
    n = await state.model.completion_tokens(r.prepared, text)
    end.update(tokens=n, finish=_finish_reason(r, n), logprobs=await _logprobs(state, r, text))
    if r.mode == "monitor":
        end["ecso"] = await _monitor(state, r, text.strip())


async def _held_deltas(state: WorkerState, r: _Request, end: dict[str, Any]) -> AsyncIterator[str]:
    """ECSO's final answer (``hold``): the direct answer in one piece once it passed the check, the safe answer as
    it streams; then fills ``end`` for the last chunk."""
    assert r.pipeline is not None
    progress = ECSOProgress()
    async for event in state.model.stream_ecso(r.pipeline, r.images, r.query, None, r.stop):
        delta = progress.apply(event)
        if event.step is Step.VERDICT and not progress.flagged:
            yield progress.direct or ""
        elif event.step is Step.SAFE and delta:
            yield delta
    result = ECSOResult.from_progress(r.query, progress, r.pipeline.verdict_mode)
    end.update(tokens=await state.model.count_tokens(result.final), finish="stop", ecso=_ecso_info(state, result, "hold"))


async def _sse_stream(state: WorkerState, p: _Request) -> AsyncIterator[bytes]:
    req, base = p.req, {"model": p.model}
    first = ChatCompletionChunk(**base, choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    base["id"], base["created"] = first.id, first.created
    yield _sse(first)
    end: dict[str, Any] = {}
    deltas = _held_deltas(state, p, end) if p.mode == "hold" else _direct_deltas(state, p, end)
    try:
        async for delta in deltas:
            if delta:
                yield _sse(ChatCompletionChunk(**base, choices=[ChunkChoice(delta=ChunkDelta(content=delta))]))
        last = ChunkChoice(delta=ChunkDelta(), finish_reason=end["finish"], logprobs=end.get("logprobs"))
        yield _sse(ChatCompletionChunk(**base, choices=[last], ecso=end.get("ecso")))
        usage = _usage(p.prepared.prompt_tokens, end["tokens"])
        if req.stream_options is not None and req.stream_options.include_usage and usage is not None:
            yield _sse(ChatCompletionChunk(**base, choices=[], usage=usage))
    except Exception as exc:  # noqa: BLE001 - an error event the openai client raises as APIError
        logger.warning("chat completion stream failed: %s: %s", type(exc).__name__, exc,
                       exc_info=not isinstance(exc, ECSOError))
        yield _sse(openai_error(exc).model_dump(exclude_none=True))
    finally:
        p.stop.set()  # the stream ended or its client left: stop generating and free the slot
        with anyio.CancelScope(shield=True):  # a client that left cancels us: still end the model's stream
            await deltas.aclose()
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
