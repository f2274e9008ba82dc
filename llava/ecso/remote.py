"""ECSO in front of a LLaVA worker this process does not load (``worker``, created by name through
:mod:`llava.ecso.registry`), and what every HTTP backend shares: images prepared for upload and the decoding
settings a remote model can take. (``openai``, any OpenAI-compatible endpoint: :mod:`llava.ecso.openai_remote`.)

``worker`` speaks LLaVA's worker protocol through a controller. The prompt is templated here with
:func:`~llava.conversation.build_prompt` (``conv_mode``, default ``vicuna_v1``); the controller's
``/get_worker_address`` picks a worker and its ``/worker_generate_stream`` answers with cumulative text, prompt
included. Works with LLaVA's own workers and with :mod:`llava.serve.model_worker`. No yes/no scores (the protocol
has no log-probabilities): ECSO's verdict falls back to ``parse``, and every result says so.

Images are padded to a square with CLIP's mean colour before they are sent (``image_aspect_ratio="pad"``, the
default), as LLaVA-1.5 does; ``crop`` sends them as they are, ``resize`` squashes them to 336x336. ``generate`` runs
its requests concurrently (``concurrency`` threads): batching over HTTP. Timeouts raise
:class:`~llava.errors.BackendTimeoutError`, HTTP errors the typed error for the server's message
(:func:`llava.http_client.error_from_response`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from llava.constants import CLIP_IMAGE_SIZE, CLIP_MEAN
from llava.conversation import build_prompt, get_conv_template
from llava.ecso.backends import Backend, StepRequest, StopFlag
from llava.errors import BackendError, InvalidRequestError, NoWorkerError, UnsupportedError
from llava.generation import GenerationParams
from llava.http_client import ServiceClient, raise_for_chunk, resolve_api_key
from llava.mm_utils import aspect_ratio_image, encode_image_base64, fit_image, pad_color

__all__ = ["image_for_upload", "check_decoding", "WorkerBackend"]

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8


UPLOAD_SIDE = 4096  # the largest side of an image sent to a remote model (it resizes to its own input size)


def image_for_upload(image: Image.Image, mode: str | None = "pad") -> Image.Image:
    """The image as LLaVA-1.5 would preprocess it before the vision tower's own resize/crop (CLIP's mean colour
    and 336 px side), as sent to a remote model: first reduced to :data:`UPLOAD_SIDE` (so padding a long, thin
    image never allocates its long side squared)."""
    mode = mode or "pad"
    return aspect_ratio_image(fit_image(image, mode, UPLOAD_SIDE, pad_color(CLIP_MEAN)), mode, CLIP_MEAN,
                              CLIP_IMAGE_SIZE)


def check_decoding(params: GenerationParams, backend: str) -> None:
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

    def _images_b64(self, images: Sequence[Image.Image], mode: str | None = None) -> list[str]:
        """The images as uploaded: ``mode`` (a request's own preprocessing), else this backend's."""
        return [encode_image_base64(image_for_upload(img, mode or self.image_aspect_ratio)) for img in images]

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
        check_decoding(p, self.name)
        stop: str | list[str] | None = list(p.stop) if len(p.stop) > 1 else (p.stop[0] if p.stop else None)
        return {"model": self.model_name, "prompt": self.prompt(request),
                "images": self._images_b64(request.images, request.image_aspect_ratio),
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
