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
  response holds the steps (:class:`~llava.serve.protocol.ECSOInfo`). Streaming sends the final answer (the
  direct answer once it passed the check, else the safe answer as it is generated) and the steps on the last chunk.
  ECSO is single-turn: one user message, no system or assistant turns.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel

from llava.constants import DEFAULT_IMAGE_TOKEN, ECSO_ALIAS_SUFFIX
from llava.conversation import SeparatorStyle, get_conv_template
from llava.ecso.events import ECSOProgress, ECSOResult, Step
from llava.ecso.pipeline import ECSO
from llava.errors import ECSOError, InvalidRequestError
from llava.generation import GenerationParams
from llava.serve.server import openai_error, require_api_key
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
from llava.serve.worker_ecso import build_pipeline, check_fits
from llava.serve.worker_runtime import call_model, load_image_urls, stream_model

if TYPE_CHECKING:
    from llava.serve.model_worker import WorkerState

__all__ = ["SSE_MEDIA_TYPE", "Chat", "parse_chat", "render_prompt", "first_token_logprobs", "openai_routes"]

logger = logging.getLogger(__name__)

SSE_MEDIA_TYPE = "text/event-stream"
_SYSTEM_ROLES = ("system", "developer")


# ---------------------------------------------------------------------------------------------- conversation


@dataclass
class Chat:
    """A request's conversation: the system text (``None``: the template's), ``(user, assistant)`` turns with the
    last assistant ``None``, and the image URLs of each turn."""

    system: str | None
    turns: list[tuple[str, str | None]]
    turn_images: list[list[str]] = field(default_factory=list)

    @property
    def image_urls(self) -> list[str]:
        return [u for urls in self.turn_images for u in urls]


def parse_chat(messages: list[ChatMessage]) -> Chat:
    """Group OpenAI messages into template turns; raises :class:`InvalidRequestError` naming the message."""
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
    images: list[list[str]] = []
    for k in range(0, len(merged), 2):
        user = merged[k]
        assistant = merged[k + 1] if k + 1 < len(merged) else None
        turns.append(("\n".join(user[1]), "\n".join(assistant[1]) if assistant else None))
        images.append(user[2])
    return Chat("\n".join(system) if system else None, turns, images)


def render_prompt(conv_mode: str, chat: Chat) -> str:
    """The templated prompt; for one user message and no system text it equals ``build_prompt(conv_mode, text, n)``."""
    conv = get_conv_template(conv_mode)
    if chat.system is not None:
        header = "<|im_start|>system\n" if conv.sep_style == SeparatorStyle.MPT else ""
        conv.system = header + chat.system
    for (user, assistant), urls in zip(chat.turns, chat.turn_images):
        conv.append_message(conv.roles[0], (DEFAULT_IMAGE_TOKEN + "\n") * len(urls) + user)
        conv.append_message(conv.roles[1], assistant)
    return conv.get_prompt()


# ---------------------------------------------------------------------------------------------------- logprobs


def _token_text(tokenizer: Any, token_id: int) -> str:
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if piece.startswith("▁") and not text.startswith(" "):  # SentencePiece word start: decode() drops the space
        text = " " + text
    return text


def first_token_logprobs(engine: Any, prompt: str, images: list[Image.Image], top_n: int,
                         answer: str, greedy: bool) -> ChoiceLogprobs:
    """Log-probabilities of the first answer token (one forward pass; blocking). The chosen token is the best
    allowed token when decoding is greedy, else the first token of ``answer``."""
    import torch

    lm = engine.loaded
    encoded = engine.encode(prompt, images)
    ids = torch.tensor([encoded.input_ids], device=lm.device)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        inputs["pixel_values"] = engine.pixel_values(images)
    with torch.inference_mode():
        logits = engine.model(**inputs, logits_to_keep=1).logits[0, -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    allowed = logp.clone()
    banned = [t for t in lm.suppress_token_ids if t < allowed.numel()]
    allowed[banned] = float("-inf")
    tok = engine.tokenizer
    if greedy or not answer:
        chosen = int(allowed.argmax()) if greedy or answer else int(tok.eos_token_id)
    else:
        chosen = tok(answer, add_special_tokens=False).input_ids[0]
    k = min(top_n, int(torch.isfinite(allowed).sum()))
    top = torch.topk(allowed, k) if k else None

    def entry(token_id: int, value: float) -> dict:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    alternatives = [TopLogprob(**entry(int(i), float(v))) for v, i in zip(top.values, top.indices)] if top else []
    return ChoiceLogprobs(content=[TokenLogprob(**entry(chosen, float(logp[chosen])), top_logprobs=alternatives)])


# ---------------------------------------------------------------------------------------------------- helpers


def _sse(obj: BaseModel | dict) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return b"data: " + data.encode() + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _count_tokens(engine: Any, text: str) -> int:
    return len(engine.tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _ecso_info(result: ECSOResult) -> ECSOInfo:
    return ECSOInfo(direct=result.direct, flagged=result.flagged, harm_score=result.harm_score,
                    verdict_text=result.verdict_text, verdict_mode=result.verdict_mode, caption=result.caption,
                    safe_answer=result.safe_answer, timings=result.timings)


@dataclass
class _Prepared:
    """A request made ready: model name to report, prompt, images, decoding settings, prompt length in tokens."""

    req: ChatCompletionRequest
    model: str
    prompt: str
    images: list[Image.Image]
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


async def _prepare(state: WorkerState, req: ChatCompletionRequest) -> _Prepared:
    state.check_model(req.model, [state.model_name + ECSO_ALIAS_SUFFIX])
    ecso = req.ecso or req.model.endswith(ECSO_ALIAS_SUFFIX)
    chat = parse_chat(req.messages)
    top_logprobs = None
    if req.logprobs:
        top_logprobs = req.top_logprobs or 0
        if top_logprobs > state.config.max_top_logprobs:
            raise InvalidRequestError(f"top_logprobs: at most {state.config.max_top_logprobs} on this worker, got "
                                      f"{top_logprobs} (--max-top-logprobs)")
    elif req.top_logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    if ecso and (chat.system is not None or len(chat.turns) > 1):
        raise InvalidRequestError("ecso: ECSO answers a single user message; send no system or assistant messages")
    if ecso and top_logprobs is not None:
        raise InvalidRequestError("logprobs are not available with ecso")
    state.check_images(len(chat.image_urls))
    stop = threading.Event()
    pipeline = build_pipeline(state, _ecso_overrides(req), stop.is_set) if ecso else None
    images = await load_image_urls(chat.image_urls, state.policy, state.http)
    params = GenerationParams(max_new_tokens=req.token_limit(state.config.max_new_tokens), temperature=req.temperature,
                              top_p=req.top_p, stop=tuple(req.stop_list))
    prompt = render_prompt(state.conv_mode, chat)
    if pipeline is not None:
        await anyio.to_thread.run_sync(check_fits, state, chat.turns[0][0], images)
    encoded = await anyio.to_thread.run_sync(state.engine.encode, prompt, images)
    return _Prepared(req, req.model, prompt, images, params, len(encoded.input_ids), top_logprobs, pipeline,
                     chat.turns[0][0], stop)


def _finish_reason(completion_tokens: int, params: GenerationParams) -> str:
    return "length" if completion_tokens >= params.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------------------- direct


def _generate(state: WorkerState, p: _Prepared) -> tuple[str, int, ChoiceLogprobs | None]:
    engine = state.engine
    text = engine.generate([p.prompt], [p.images], p.params)[0]
    logprobs = None
    if p.top_logprobs is not None:
        logprobs = first_token_logprobs(engine, p.prompt, p.images, p.top_logprobs, text, p.params.greedy)
    return text, _count_tokens(engine, text), logprobs


async def _complete(state: WorkerState, p: _Prepared) -> ChatCompletionResponse:
    if p.pipeline is not None:
        pipeline = p.pipeline
        result = await call_model(state.slots, lambda: pipeline.run(p.images, p.query))
        n = await anyio.to_thread.run_sync(_count_tokens, state.engine, result.final)
        choice = ChatChoice(message=AssistantMessage(content=result.final), finish_reason="stop")
        return ChatCompletionResponse(model=p.model, choices=[choice], usage=_usage(p.prompt_tokens, n),
                                      ecso=_ecso_info(result))
    text, n, logprobs = await call_model(state.slots, lambda: _generate(state, p))
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=_finish_reason(n, p.params),
                        logprobs=logprobs)
    return ChatCompletionResponse(model=p.model, choices=[choice], usage=_usage(p.prompt_tokens, n))


def _direct_job(state: WorkerState, p: _Prepared) -> Iterator[tuple[str, Any]]:
    """Blocking: ("delta", text) items, then ("end", (completion tokens, logprobs))."""
    text = ""
    for delta in state.engine.stream(p.prompt, p.images, p.params, should_stop=p.stop.is_set):
        text += delta
        yield "delta", delta
    logprobs = None
    if p.top_logprobs is not None:
        logprobs = first_token_logprobs(state.engine, p.prompt, p.images, p.top_logprobs, text, p.params.greedy)
    yield "end", (_count_tokens(state.engine, text), logprobs)


def _ecso_job(state: WorkerState, p: _Prepared) -> Iterator[tuple[str, Any]]:
    """Blocking: the final answer's deltas (the direct answer in one piece once it passed the check, the safe answer
    as it streams), then ("end", (completion tokens, ECSOInfo))."""
    assert p.pipeline is not None
    progress = ECSOProgress()
    for event in p.pipeline.stream(p.images, p.query):
        delta = progress.apply(event)
        if event.step is Step.VERDICT and not progress.flagged:
            yield "delta", progress.direct
        elif event.step is Step.SAFE and delta:
            yield "delta", delta
    result = ECSOResult.from_progress(p.query, progress, p.pipeline.verdict_mode)
    yield "end", (_count_tokens(state.engine, result.final), _ecso_info(result))


async def _sse_stream(state: WorkerState, p: _Prepared) -> AsyncIterator[bytes]:
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
        name = request.app.state.worker.model_name
        return ModelList(data=[ModelCard(id=name), ModelCard(id=name + ECSO_ALIAS_SUFFIX)])

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state = request.app.state.worker
        prepared = await _prepare(state, body)
        if body.stream:
            return StreamingResponse(_sse_stream(state, prepared), media_type=SSE_MEDIA_TYPE,
                                     headers={"Cache-Control": "no-cache"})
        return (await _complete(state, prepared)).model_dump(exclude_none=True)

    return router
