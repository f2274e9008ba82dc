"""ECSO in front of models this process does not load: two HTTP backends (created by name through
:mod:`llava.ecso.registry`).

* ``worker``: LLaVA's worker protocol through a controller. The prompt is templated here with
  :func:`~llava.conversation.build_prompt` (``conv_mode``, default ``vicuna_v1``); the controller's
  ``/get_worker_address`` picks a worker and its ``/worker_generate_stream`` answers with cumulative text, prompt
  included. Works with LLaVA's own workers and with :mod:`llava.serve.model_worker`. No yes/no scores (the protocol
  has no log-probabilities): ECSO's verdict falls back to ``parse``.
* ``openai``: any OpenAI-compatible chat endpoint with image input (vLLM, SGLang, this project's worker). Images go
  as ``data:`` URLs before the text. The ``score`` verdict works when the endpoint returns ``logprobs`` with
  ``top_logprobs`` for the first token (probed once, or set with ``logprobs=True/False``); otherwise ``parse``.

Both pad images to a square with CLIP's mean colour before sending them (``image_aspect_ratio="pad"``, the default),
as LLaVA-1.5 does, so engines that serve llava-hf weights (which center-crop) see what LLaVA-1.5 saw; ``crop`` sends
them as they are, ``resize`` squashes them to 336x336. ``generate`` runs its requests concurrently (``concurrency``
threads): batching over HTTP. Timeouts raise :class:`~llava.errors.BackendTimeoutError`, HTTP errors the typed error
for the server's message (:func:`llava.http_client.error_from_response`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from llava.constants import CLIP_IMAGE_SIZE, CLIP_MEAN, ECSO_ALIAS_SUFFIX
from llava.conversation import build_prompt, get_conv_template
from llava.ecso.backends import Backend, StepRequest, StopFlag
from llava.errors import BackendError, InvalidRequestError, NoWorkerError, UnsupportedError
from llava.generation import GenerationParams
from llava.http_client import (
    OPENAI_API_KEY_ENV,
    ServiceClient,
    is_loopback_url,
    openai_base_url,
    raise_for_chunk,
    resolve_api_key,
)
from llava.mm_utils import aspect_ratio_image, encode_image_base64

__all__ = ["image_for_upload", "yes_no_score", "WorkerBackend", "OpenAIBackend"]

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
_PROBE_TEXT = "Is the sky blue? Answer yes or no:"


def image_for_upload(image: Image.Image, mode: str | None = "pad") -> Image.Image:
    """The image as LLaVA-1.5 would preprocess it before the vision tower's own resize/crop (CLIP's mean colour
    and 336 px side), as sent to a remote model."""
    return aspect_ratio_image(image, mode or "pad", CLIP_MEAN, CLIP_IMAGE_SIZE)


def _check_decoding(params: GenerationParams, backend: str) -> None:
    if params.num_beams != 1:
        raise UnsupportedError(f"the {backend} backend cannot do beam search (num_beams={params.num_beams})")


class _HTTPBackend(Backend):
    """Shared: image preparation, a lazily started thread pool for ``generate``, ``close``."""

    def __init__(self, image_aspect_ratio: str | None, concurrency: int, timeout: float) -> None:
        if concurrency < 1:
            raise InvalidRequestError(f"concurrency must be at least 1, got {concurrency}")
        if not timeout > 0:
            raise InvalidRequestError(f"timeout must be a positive number of seconds, got {timeout}")
        self.image_aspect_ratio = image_aspect_ratio or "pad"
        image_for_upload(Image.new("RGB", (1, 1)), self.image_aspect_ratio)  # fail fast on an unknown mode
        self.concurrency = concurrency
        self.timeout = timeout
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _images_b64(self, images: Sequence[Image.Image]) -> list[str]:
        return [encode_image_base64(image_for_upload(img, self.image_aspect_ratio)) for img in images]

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"ecso-{self.name}")
        return list(self._pool.map(fn, items))

    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        return self._map(lambda r: "".join(self.stream(r)).strip(), requests)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


# --------------------------------------------------------------------------------------------------- worker


class WorkerBackend(_HTTPBackend):
    """LLaVA's worker protocol through a controller (see the module docstring). ``api_key``: the services' shared
    key (default ``$ECSO_API_KEY``). ``model_name=None``: the controller's only model. ``transport``: an httpx
    transport (tests)."""

    name = "worker"
    supports_score = False
    no_score_reason = "LLaVA's worker protocol has no log-probabilities"

    def __init__(self, controller_url: str = "http://127.0.0.1:10000", model_name: str | None = None,
                 conv_mode: str | None = None, timeout: float = 300.0, image_aspect_ratio: str | None = None,
                 api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 transport: Any = None) -> None:
        super().__init__(image_aspect_ratio, concurrency, timeout)
        self.controller_url = controller_url.rstrip("/")
        self._transport = transport
        self.conv_mode = conv_mode or "vicuna_v1"
        get_conv_template(self.conv_mode)  # fail fast on an unknown template
        self.api_key = resolve_api_key(api_key)
        self.controller = ServiceClient(self.controller_url, api_key=self.api_key, timeout=min(timeout, 30.0),
                                        transport=transport)
        self._workers: dict[str, ServiceClient] = {}
        self.model_name = model_name or self._only_model()

    def _only_model(self) -> str:
        models = self.controller.post("/list_models").get("models", [])
        if len(models) == 1:
            return models[0]
        if not models:
            raise NoWorkerError(f"controller {self.controller_url} has no workers; start a model worker first")
        raise InvalidRequestError(f"controller {self.controller_url} serves several models {models}; choose one "
                                  "with --model-name")

    def _worker(self) -> ServiceClient:
        address = self.controller.post("/get_worker_address", {"model": self.model_name}).get("address", "")
        if not address:
            models = self.controller.post("/list_models").get("models", [])
            raise NoWorkerError(f"no worker serves model {self.model_name!r} at controller {self.controller_url} "
                                f"(models available: {models})")
        with self._lock:
            client = self._workers.get(address)
            if client is None:
                client = self._workers[address] = ServiceClient(address, api_key=self.api_key, timeout=self.timeout,
                                                                transport=self._transport)
        return client

    def prompt(self, request: StepRequest) -> str:
        return build_prompt(self.conv_mode, request.text, len(request.images), request.history)

    def payload(self, request: StepRequest) -> dict[str, Any]:
        p = request.params
        _check_decoding(p, self.name)
        stop: str | list[str] | None = list(p.stop) if len(p.stop) > 1 else (p.stop[0] if p.stop else None)
        return {"model": self.model_name, "prompt": self.prompt(request), "images": self._images_b64(request.images),
                "temperature": p.temperature, "top_p": p.top_p if p.top_p is not None else 1.0,
                "max_new_tokens": p.max_new_tokens, "stop": stop}

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        payload = self.payload(request)
        prompt, worker = payload["prompt"], self._worker()
        sent = ""
        for chunk in worker.stream("/worker_generate_stream", payload):
            if should_stop is not None and should_stop():
                return  # closing the stream tells the worker, which stops generating
            raise_for_chunk(chunk)
            text = str(chunk.get("text", ""))
            if not text.startswith(prompt):
                raise BackendError(f"worker {worker.base_url} sent text that does not start with the prompt")
            answer = text[len(prompt):].lstrip()
            if len(answer) > len(sent) and answer.startswith(sent):
                yield answer[len(sent):]
                sent = answer

    def describe(self) -> dict:
        return {"backend": self.name, "controller_url": self.controller_url, "model_name": self.model_name,
                "conv_mode": self.conv_mode, "image_aspect_ratio": self.image_aspect_ratio}

    def close(self) -> None:
        super().close()
        with self._lock:
            for client in self._workers.values():
                client.close()
            self._workers.clear()
        self.controller.close()


# --------------------------------------------------------------------------------------------------- openai


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


class OpenAIBackend(_HTTPBackend):
    """An OpenAI-compatible chat endpoint (see the module docstring). ``base_url``: up to ``/v1``; ``api_key``:
    default ``$OPENAI_API_KEY``; ``model_name=None``: the endpoint's only model; ``logprobs``: ``None`` probes
    whether first-token ``top_logprobs`` come back (one tiny request, on first use of ``supports_score``);
    ``top_logprobs``: alternatives asked for when scoring (OpenAI and vLLM allow 20 by default); ``transport``: an
    httpx transport (tests)."""

    name = "openai"

    def __init__(self, base_url: str | None = None, model_name: str | None = None, timeout: float = 300.0,
                 image_aspect_ratio: str | None = None, api_key: str | None = None, logprobs: bool | None = None,
                 top_logprobs: int = 20, concurrency: int = DEFAULT_CONCURRENCY, transport: Any = None) -> None:
        super().__init__(image_aspect_ratio, concurrency, timeout)
        base_url = openai_base_url(base_url)
        if not base_url:
            raise InvalidRequestError("the openai backend needs a base URL (--openai-base-url or OPENAI_BASE_URL), "
                                      "e.g. http://127.0.0.1:8000/v1")
        if not base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"the openai backend's base URL must be http(s), got {base_url!r}")
        if top_logprobs < 1:
            raise InvalidRequestError(f"top_logprobs must be at least 1, got {top_logprobs}")
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(OPENAI_API_KEY_ENV)
        # Proxy settings apply to remote endpoints, never to this machine's own services.
        self._http = ServiceClient(self.base_url, api_key=key, timeout=timeout, transport=transport,
                                   trust_env=not is_loopback_url(self.base_url))
        self._logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.model_name = model_name or self._only_model()

    def _only_model(self) -> str:
        ids = [m.get("id") for m in self._http.get("/models").get("data", [])]
        models = [m for m in ids if isinstance(m, str) and not m.endswith(ECSO_ALIAS_SUFFIX)]
        if len(models) == 1:
            return models[0]
        raise InvalidRequestError(f"{self.base_url} serves {len(models)} models {models}; choose one with "
                                  "--model-name")

    # ---- requests --------------------------------------------------------------------------------------------
    def messages(self, request: StepRequest) -> list[dict[str, Any]]:
        """Earlier turns as plain text, images (``data:`` URLs) in the first user message, before its text."""
        turns = [*request.history, (request.text, None)]
        out: list[dict[str, Any]] = []
        for k, (user, assistant) in enumerate(turns):
            if k == 0 and request.images:
                parts: Any = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}
                              for b64 in self._images_b64(request.images)]
                parts.append({"type": "text", "text": user})
                out.append({"role": "user", "content": parts})
            else:
                out.append({"role": "user", "content": user})
            if assistant is not None:
                out.append({"role": "assistant", "content": assistant})
        return out

    def payload(self, request: StepRequest, **extra: Any) -> dict[str, Any]:
        p = request.params
        _check_decoding(p, self.name)
        body: dict[str, Any] = {"model": self.model_name, "messages": self.messages(request),
                                "max_tokens": p.max_new_tokens, "temperature": p.temperature}
        if p.top_p is not None:
            body["top_p"] = p.top_p
        if p.stop:
            body["stop"] = list(p.stop)
        body.update(extra)
        return body

    def _complete(self, request: StepRequest) -> str:
        body = self._http.post("/chat/completions", self.payload(request))
        return (_first_choice(body, self.base_url).get("message") or {}).get("content") or ""

    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        return [text.strip() for text in self._map(self._complete, requests)]

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        started = False
        for event in self._http.events("/chat/completions", self.payload(request, stream=True)):
            if should_stop is not None and should_stop():
                return  # closing the stream tells the endpoint
            choices = event.get("choices") or [{}]
            delta = (choices[0].get("delta") or {}).get("content") or ""
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            if delta:
                yield delta

    # ---- scores ----------------------------------------------------------------------------------------------
    def _first_token(self, request: StepRequest) -> tuple[list[tuple[str, float]], str]:
        """The first answer token's ``(token, logprob)`` alternatives and the answer's text."""
        req = StepRequest(request.text, request.images, GenerationParams(max_new_tokens=1), request.history)
        body = self._http.post("/chat/completions", self.payload(req, logprobs=True, top_logprobs=self.top_logprobs))
        choice = _first_choice(body, self.base_url)
        content = (choice.get("logprobs") or {}).get("content") or []
        entries: list[tuple[str, float]] = []
        if content:
            first = content[0]
            entries = [(str(first.get("token", "")), float(first.get("logprob", -math.inf)))]
            entries += [(str(t.get("token", "")), float(t.get("logprob", -math.inf)))
                        for t in first.get("top_logprobs") or []]
        return entries, (choice.get("message") or {}).get("content") or ""

    @property
    def supports_score(self) -> bool:  # type: ignore[override]
        if self._logprobs is None:
            try:
                entries, _ = self._first_token(StepRequest(_PROBE_TEXT))
                self._logprobs = len(entries) > 1
            except InvalidRequestError as exc:
                logger.info("%s refuses logprobs (%s): ECSO verdicts will parse text", self.base_url, exc)
                self._logprobs = False
            logger.info("%s %s first-token logprobs", self.base_url, "returns" if self._logprobs else "does not return")
        return self._logprobs

    def _score(self, request: StepRequest) -> float | None:
        entries, text = self._first_token(request)
        score = yes_no_score(entries)
        if score is None:
            logger.info("neither yes nor no among the top %d first tokens (answer %r)", self.top_logprobs, text[:40])
        return score

    @property
    def no_score_reason(self) -> str:
        return "the endpoint returns no logprobs"

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        if not self.supports_score:
            raise UnsupportedError(f"{self.base_url} does not return logprobs: use the exact or parse verdict")
        return self._map(self._score, requests)

    def describe(self) -> dict:
        return {"backend": self.name, "base_url": self.base_url, "model_name": self.model_name,
                "image_aspect_ratio": self.image_aspect_ratio, "logprobs": self._logprobs}

    def close(self) -> None:
        super().close()
        self._http.close()


def _first_choice(body: dict[str, Any], where: str) -> dict[str, Any]:
    choices = body.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise BackendError(f"{where} answered without choices: {json.dumps(body)[:200]}")
    return choices[0]
