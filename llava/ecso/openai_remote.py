"""The ``openai`` backend: a model served by OpenAI-compatible servers (vLLM, SGLang, ``transformers serve``,
another ECSO worker), for ECSO's steps (``run_llava``, ``generate``: blocking calls) and as a model worker's model
(``python -m llava.serve.model_worker --backend openai``: coroutines on the worker's event loop).

* Several base URLs serving the same model form one :class:`~llava.ecso.upstream.UpstreamPool` (round robin over
  the healthy ones, cool-down, bounded retries, typed errors naming the upstream).
* Images go as PNG ``data:`` URLs, in order with the text: where a LLaVA prompt's ``<image>`` tags stand, else
  before the text of their message. They are padded to a square with CLIP's mean colour first
  (``image_aspect_ratio="pad"``, the default), as LLaVA-1.5 does, so engines that serve llava-hf weights (which
  center-crop) see what LLaVA-1.5 saw; ``crop`` sends them as they are, ``resize`` squashes them to 336x336.
* The ``score`` verdict reads P(yes) / P(no) from the first token's ``top_logprobs`` when the upstream returns
  them (vLLM, SGLang and ECSO workers do; probed once, or set with ``logprobs=True/False``); otherwise the pipeline
  parses the verdict's text and each result says why (:attr:`no_score_reason`). A sample whose alternatives hold
  neither yes nor no has no score (``None``), never a made-up one.
* Blocking calls run the same coroutines on a private event loop (:class:`~llava.ecso.upstream.LoopThread`);
  ``generate`` sends its requests concurrently (``concurrency`` at once).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, ECSO_ALIAS_SUFFIX
from llava.conversation import Chat, get_conv_template, parse_prompt
from llava.ecso.backends import AsyncServingBackend, Prepared, StepRequest, StopFlag
from llava.ecso.remote import check_decoding, image_for_upload
from llava.ecso.upstream import LoopThread, UpstreamPool
from llava.errors import BackendError, InvalidRequestError, UnsupportedError
from llava.generation import FirstTokenLogprobs, GenerationParams, ScoredToken
from llava.http_client import OPENAI_API_KEY_ENV, openai_base_url
from llava.mm_utils import encode_image_base64, image_digest

__all__ = ["yes_no_score", "OpenAIBackend"]

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
_PROBE_TEXT = "Is the sky blue? Answer yes or no:"
_IMAGE_CACHE = 64  # encoded images kept (an ECSO run sends its image in three steps), keyed by content hash
_IMAGE_CACHE_BYTES = 256 * 1024 * 1024  # and at most this many bytes of them


def _norm_token(token: str) -> str:
    return token.replace("▁", " ").replace("Ġ", " ").strip().lower()


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def yes_no_score(entries: Sequence[tuple[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from first-token ``(token, logprob)`` alternatives: every token that spells
    yes/no (any case, leading space or not). A side missing from the list is bounded by the smallest listed
    probability; ``None`` when neither side is listed."""
    unique = set(entries)
    yes = [lp for tok, lp in unique if _norm_token(tok) == "yes"]
    no = [lp for tok, lp in unique if _norm_token(tok) == "no"]
    if not yes and not no:
        return None
    floor = min(lp for _, lp in unique)
    margin = (_logsumexp(yes) if yes else floor) - (_logsumexp(no) if no else floor)
    return 1.0 / (1.0 + math.exp(-margin))


def _first_choice(body: dict[str, Any], where: str) -> dict[str, Any]:
    choices = body.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise BackendError(f"{where} answered without choices: {str(body)[:200]}")
    return choices[0]


def _entries(choice: dict[str, Any]) -> list[tuple[str, float]]:
    """The first answer token's ``(token, logprob)`` and its alternatives, as an OpenAI choice reports them."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return []
    first = content[0]
    entries = [(str(first.get("token", "")), float(first.get("logprob", -math.inf)))]
    return entries + [(str(t.get("token", "")), float(t.get("logprob", -math.inf)))
                      for t in first.get("top_logprobs") or []]


class OpenAIBackend(AsyncServingBackend):
    """A model behind OpenAI-compatible servers (see the module docstring). ``base_url``: one URL up to ``/v1``, or
    several serving the same model (default ``$OPENAI_BASE_URL``); ``model_name``: the upstream's model id
    (default: the first id of its ``/v1/models``, this project's ``+ecso`` aliases left out); ``serve_as``: the name
    a worker serves it under (default the upstream id); ``api_key``: default ``$OPENAI_API_KEY``; ``logprobs``:
    ``None`` probes whether first-token ``top_logprobs`` come back; ``top_logprobs``: alternatives asked for when
    scoring; ``conv_mode``: the template of the LLaVA-protocol prompts a worker receives (turned back into chat
    messages); ``retries``, ``cooldown``: the pool's; ``transport``: an httpx async transport (tests)."""

    name = "openai"

    def __init__(self, base_url: str | Sequence[str] | None = None, model_name: str | None = None,
                 timeout: float = 300.0, image_aspect_ratio: str | None = None, api_key: str | None = None,
                 logprobs: bool | None = None, top_logprobs: int = 20, concurrency: int = DEFAULT_CONCURRENCY,
                 retries: int = 2, cooldown: float = 10.0, serve_as: str | None = None, conv_mode: str | None = None,
                 transport: Any = None) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
        if not urls and openai_base_url():
            urls = [str(openai_base_url())]
        if not urls:
            raise InvalidRequestError("the openai backend needs a base URL (--openai-base-url or OPENAI_BASE_URL), "
                                      "e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1 or top_logprobs < 1:
            raise InvalidRequestError(f"concurrency and top_logprobs must be at least 1, got {concurrency}, "
                                      f"{top_logprobs}")
        self.image_aspect_ratio = image_aspect_ratio or "pad"
        image_for_upload(Image.new("RGB", (1, 1)), self.image_aspect_ratio)  # fail fast on an unknown mode
        self.conv_mode = conv_mode or "vicuna_v1"
        get_conv_template(self.conv_mode)
        key = api_key if api_key is not None else os.environ.get(OPENAI_API_KEY_ENV)
        self.pool = UpstreamPool(urls, api_key=key, timeout=timeout, retries=retries, cooldown=cooldown,
                                 max_connections=max(concurrency, 8), transport=transport)
        self.concurrency, self.top_logprobs, self.timeout = concurrency, top_logprobs, timeout
        self._model, self._serve_as, self._logprobs = model_name, serve_as, logprobs
        self._bridge: LoopThread | None = None
        self._encoded: OrderedDict[tuple[bytes, str], str] = OrderedDict()  # (content hash, mode) -> URL
        self._encoded_bytes = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.pool.urls[0]

    # ---- readiness ----------------------------------------------------------------------------------------------
    async def astart(self) -> None:
        """Learn the upstream's model (unless given) and whether it returns logprobs; raises when no upstream
        answers (a worker retries)."""
        await self._amodel()
        await self._ascores()

    async def _amodel(self) -> str:
        if self._model is None:
            self._model = await self._afind_model()
        return self._model

    async def _ascores(self) -> bool:
        if self._logprobs is None:
            self._logprobs = await self._aprobe_logprobs()
        return self._logprobs

    async def _afind_model(self) -> str:
        ids = [m.get("id") for m in (await self.pool.get("/models")).get("data", []) if isinstance(m, dict)]
        models = [m for m in ids if isinstance(m, str) and not m.endswith(ECSO_ALIAS_SUFFIX)]
        if not models:
            raise BackendError(f"{self.base_url}/models lists no model")
        if len(models) > 1:
            logger.info("%s serves %s: using the first, %r (choose with --openai-model)", self.base_url, models,
                        models[0])
        return models[0]

    async def _aprobe_logprobs(self) -> bool:
        try:
            entries, _ = await self._afirst_token(StepRequest(_PROBE_TEXT).chat(), self.top_logprobs)
        except InvalidRequestError as exc:
            logger.info("%s refuses logprobs (%s)", self.base_url, exc)
            return False
        found = len(entries) > 1
        logger.info("%s %s first-token logprobs: ECSO's score verdict %s", self.base_url,
                    "returns" if found else "does not return", "works" if found else "falls back to parse")
        return found

    @property
    def upstream_model(self) -> str:
        if self._model is None:
            self._model = self._run(self._afind_model())
        return self._model

    @property
    def supports_score(self) -> bool:  # type: ignore[override]
        if self._logprobs is None:
            self._logprobs = self._run(self._aprobe_logprobs())
        return self._logprobs

    @property
    def no_score_reason(self) -> str:
        return "the endpoint returns no logprobs"

    async def ahealthy(self) -> bool:
        return await self.pool.probe()

    @property
    def reachable(self) -> bool:
        return self.pool.healthy

    def check_reachable(self) -> None:
        if not self.pool.healthy:
            raise self.pool.unavailable_error()

    # ---- requests -------------------------------------------------------------------------------------------
    def _data_url(self, image: Image.Image, mode: str | None = None) -> str:
        """The image as uploaded: ``mode`` (a step's own preprocessing), else this backend's."""
        key = (image_digest(image), mode or self.image_aspect_ratio)
        with self._lock:
            hit = self._encoded.get(key)
            if hit is not None:
                self._encoded.move_to_end(key)
                return hit
        # Lossless, and fast to write (the request is the worker's own work before the upstream can start).
        url = "data:image/png;base64," + encode_image_base64(image_for_upload(image, key[1]), compress_level=1)
        with self._lock:
            if key not in self._encoded:
                self._encoded[key] = url
                self._encoded_bytes += len(url)
            while len(self._encoded) > _IMAGE_CACHE or self._encoded_bytes > _IMAGE_CACHE_BYTES:
                self._encoded_bytes -= len(self._encoded.popitem(last=False)[1])
        return url

    def _user_content(self, text: str, images: Sequence[Image.Image], mode: str | None) -> Any:
        if not images:
            return text.replace(DEFAULT_IMAGE_TOKEN, "").strip() if DEFAULT_IMAGE_TOKEN in text else text
        pieces = text.split(DEFAULT_IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):  # no tags (or not one per image): images first, as LLaVA puts them
            pieces = ["", *([""] * (len(images) - 1)), text.replace(DEFAULT_IMAGE_TOKEN, "")]
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(pieces):
            piece = piece.strip("\n") if k else piece.rstrip("\n")
            if piece.strip():
                parts.append({"type": "text", "text": piece})
            if k < len(images):
                parts.append({"type": "image_url", "image_url": {"url": self._data_url(images[k], mode)}})
        return parts

    def messages(self, chat: Chat, mode: str | None = None) -> list[dict[str, Any]]:
        """OpenAI messages of a chat, images (``data:`` URLs) in order with their message's text; ``mode``: the
        images' preprocessing when not this backend's (a step's own, ``StepRequest.image_aspect_ratio``)."""
        out: list[dict[str, Any]] = [{"role": "system", "content": chat.system}] if chat.system is not None else []
        for (user, assistant), images in zip(chat.turns, chat.turn_images):
            out.append({"role": "user", "content": self._user_content(user, images, mode)})
            if assistant is not None:
                out.append({"role": "assistant", "content": assistant})
        return out

    async def payload(self, messages: list[dict[str, Any]], params: GenerationParams, **extra: Any) -> dict[str, Any]:
        """The chat completion request (the upstream's model looked up first when it was not given)."""
        check_decoding(params, self.name)
        body: dict[str, Any] = {"model": await self._amodel(), "messages": messages,
                                "max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        return {**body, **extra}

    async def _achat(self, messages: list[dict[str, Any]], params: GenerationParams,
                     prepared: Prepared | None = None) -> str:
        body = await self.pool.post("/chat/completions", await self.payload(messages, params))
        choice = _first_choice(body, self.base_url)
        if prepared is not None:
            _record(prepared, body.get("usage"), choice.get("finish_reason"))
        return str((choice.get("message") or {}).get("content") or "")

    async def _astream(self, messages: list[dict[str, Any]], params: GenerationParams,
                       prepared: Prepared | None = None) -> AsyncIterator[str]:
        extra: dict[str, Any] = {"stream": True}
        if prepared is not None:
            extra["stream_options"] = {"include_usage": True}
        started = False
        async for event in self.pool.events("/chat/completions", await self.payload(messages, params, **extra)):
            choices = event.get("choices") or [{}]
            choice = choices[0] if isinstance(choices[0], dict) else {}
            if prepared is not None:
                _record(prepared, event.get("usage"), choice.get("finish_reason"))
            delta = str((choice.get("delta") or {}).get("content") or "")
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            if delta:
                yield delta

    async def _afirst_token(self, chat: Chat, top_n: int,
                            mode: str | None = None) -> tuple[list[tuple[str, float]], str]:
        """The first answer token's ``(token, logprob)`` alternatives (greedy) and its text."""
        body = await self.pool.post("/chat/completions", await self.payload(
            self.messages(chat, mode), GenerationParams(max_new_tokens=1), logprobs=True, top_logprobs=top_n))
        choice = _first_choice(body, self.base_url)
        return _entries(choice), str((choice.get("message") or {}).get("content") or "")

    # ---- ECSO's steps (async) -------------------------------------------------------------------------------
    async def _gather(self, coros: list[Any]) -> list[Any]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(coro: Any) -> Any:
            async with gate:
                return await coro

        return list(await asyncio.gather(*(one(c) for c in coros)))

    async def agenerate(self, requests: Sequence[StepRequest]) -> list[str]:
        texts = await self._gather([self._achat(self.messages(r.chat(), r.image_aspect_ratio), r.params)
                                    for r in requests])
        return [t.strip() for t in texts]

    async def astream(self, request: StepRequest) -> AsyncIterator[str]:
        async for delta in self._astream(self.messages(request.chat(), request.image_aspect_ratio), request.params):
            yield delta

    async def ascore_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        if not await self._ascores():
            raise UnsupportedError(f"{self.base_url} does not return logprobs: use the exact or parse verdict")
        found = await self._gather([self._afirst_token(r.chat(), self.top_logprobs, r.image_aspect_ratio) for r in requests])
        scores = [yes_no_score(entries) for entries, _ in found]
        for score, (_, text) in zip(scores, found):
            if score is None:
                logger.info("neither yes nor no among the top %d first tokens (answer %r)", self.top_logprobs,
                            text[:40])
        return scores

    # ---- ECSO's steps (blocking) ----------------------------------------------------------------------------
    def _thread(self) -> LoopThread:
        """The private event loop of blocking calls (started on first use). On an event loop's own thread they
        are refused: a worker uses the coroutines."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("a blocking call of the openai backend on an event loop: await astart() first and "
                               "use the coroutines (agenerate, astream, acomplete, ...)")
        with self._lock:
            if self._bridge is None:
                self._bridge = LoopThread(f"ecso-{self.name}")
            return self._bridge

    def _run(self, coro: Any) -> Any:
        return self._thread().run(coro)

    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        return self._run(self.agenerate(requests))

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        return self._thread().iterate(self.astream(request), should_stop)

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        return self._run(self.ascore_yes_no(requests))

    # ---- serving --------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self._serve_as or self.upstream_model

    @property
    def multimodal(self) -> bool:
        return True  # the upstream refuses images if its model takes none

    def status(self) -> dict[str, Any]:
        return {"conv_mode": self.conv_mode, "backend": self.name,
                "upstream": {"model": self._model, "logprobs": self._logprobs, "servers": self.pool.status()}}

    def prepare(self, chat: Chat) -> Prepared:
        return Prepared(chat.images, None, self.messages(chat))

    def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        tags = prompt.count(DEFAULT_IMAGE_TOKEN)
        if tags != len(images):
            raise InvalidRequestError(f"the prompt has {tags} {DEFAULT_IMAGE_TOKEN} tags for {len(images)} images")
        chat = parse_prompt(self.conv_mode, prompt, keep_image_tags=True)
        if chat is None:
            raise InvalidRequestError(f"the prompt is not in the {self.conv_mode!r} template (--conv-mode): "
                                      f"{prompt[:120]!r}")
        if chat.turns[-1][1] is not None:
            raise InvalidRequestError("the prompt's last turn must be the user's, with the assistant's left open")
        it = iter(images)
        return self.prepare(Chat(chat.system, chat.turns, [[next(it) for _ in t] for t in chat.turn_images]))

    async def acomplete(self, prepared: Prepared, params: GenerationParams) -> str:
        return (await self._achat(prepared.handle, params, prepared)).strip()

    async def astream_prepared(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[str]:
        async for delta in self._astream(prepared.handle, params, prepared):
            yield delta

    async def afirst_token_logprobs(self, prepared: Prepared, top_n: int, answer: str,
                                    greedy: bool) -> FirstTokenLogprobs:
        """The upstream's greedy first token and its ``top_n`` alternatives (one more request, one token)."""
        body = await self.pool.post("/chat/completions", await self.payload(
            prepared.handle, GenerationParams(max_new_tokens=1), logprobs=True, top_logprobs=max(top_n, 1)))
        entries = _entries(_first_choice(body, self.base_url))
        if not entries:
            raise UnsupportedError(f"{self.base_url} returns no logprobs")
        chosen, *alternatives = [ScoredToken(t, lp) for t, lp in entries]
        return FirstTokenLogprobs(chosen, tuple(alternatives[:top_n]))

    def complete(self, prepared: Prepared, params: GenerationParams) -> str:
        return self._run(self.acomplete(prepared, params))

    def stream_prepared(self, prepared: Prepared, params: GenerationParams,
                        should_stop: StopFlag | None = None) -> Iterator[str]:
        return self._thread().iterate(self.astream_prepared(prepared, params), should_stop)

    def first_token_logprobs(self, prepared: Prepared, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        return self._run(self.afirst_token_logprobs(prepared, top_n, answer, greedy))

    def count_tokens(self, text: str) -> int | None:
        return None  # the upstream's tokenizer is not here; usage comes from the upstream's own reports

    def describe(self) -> dict:
        return {"backend": self.name, "base_url": self.base_url if len(self.pool.urls) == 1 else self.pool.urls,
                "model_name": self.upstream_model, "image_aspect_ratio": self.image_aspect_ratio,
                "logprobs": self._logprobs}

    async def aclose(self) -> None:
        await self.pool.aclose()

    def close(self) -> None:
        with self._lock:
            bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.close(self.pool.aclose)


def _record(prepared: Prepared, usage: Any, finish_reason: Any) -> None:
    """What the upstream reported about a generation, for the worker's usage statistics."""
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            prepared.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            prepared.completion_tokens = usage["completion_tokens"]
    if isinstance(finish_reason, str):
        prepared.finish_reason = finish_reason
