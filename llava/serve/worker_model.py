"""The worker's model calls as coroutines, each under a concurrency slot: a blocking backend (a model in this
process) runs in threads (:func:`~llava.serve.worker_runtime.call_model`, ``stream_model``); an async one (a model
reached over the network, :class:`~llava.ecso.backends.AsyncServingBackend`) is awaited on the event loop, so a
worker forwards up to ``--limit-model-concurrency`` requests at once without a thread per request. The routes call
these and never the backend's generation methods themselves."""
from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from PIL import Image

from llava.conversation import Chat
from llava.ecso.backends import AsyncServingBackend, Prepared, ServingBackend
from llava.ecso.events import ECSOResult, StepEvent, Verdict
from llava.ecso.pipeline import ECSO
from llava.generation import FirstTokenLogprobs, GenerationParams
from llava.serve.worker_runtime import ModelSlots, call_model, stream_model

__all__ = ["WorkerModel"]

T = TypeVar("T")


async def _held(slots: ModelSlots, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items`` under a slot; however the consumer stops (done, error, a client that left and cancelled it), the
    iterator is closed (its request ends) before the slot is given back."""
    async with slots.slot():
        try:
            async for item in items:
                yield item
        finally:
            with anyio.CancelScope(shield=True):
                await items.aclose()  # type: ignore[attr-defined]


class WorkerModel:
    """``backend`` behind the worker's ``slots``; ``jobs`` keeps the tasks that pump blocking streams."""

    def __init__(self, backend: ServingBackend, slots: ModelSlots, jobs: set) -> None:
        self.backend, self.slots, self.jobs = backend, slots, jobs
        self.remote = backend if isinstance(backend, AsyncServingBackend) else None

    async def healthy(self) -> bool:
        """Whether the model can answer now (a remote model's servers are probed)."""
        return True if self.remote is None else await self.remote.ahealthy()

    @property
    def reachable(self) -> bool:
        """Whether the model could answer at the last probe or request (no network call)."""
        return True if self.remote is None else self.remote.reachable

    def check_reachable(self) -> None:
        """Refuse a request now (503, naming the servers) when a remote model's servers are all down."""
        if self.remote is not None:
            self.remote.check_reachable()

    async def prepare(self, chat: Chat) -> Prepared:
        return await anyio.to_thread.run_sync(self.backend.prepare, chat)

    async def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        return await anyio.to_thread.run_sync(self.backend.prepare_templated, prompt, images)

    async def complete(self, prepared: Prepared, params: GenerationParams) -> str:
        if self.remote is not None:
            async with self.slots.slot():
                return await self.remote.acomplete(prepared, params)
        return await call_model(self.slots, lambda: self.backend.complete(prepared, params))

    async def stream(self, prepared: Prepared, params: GenerationParams,
                     stop: threading.Event) -> AsyncIterator[str]:
        """Text deltas; ``stop`` (set when the client goes away) ends a blocking model's generation."""
        if self.remote is not None:
            async for delta in _held(self.slots, self.remote.astream_prepared(prepared, params)):
                yield delta
            return
        async for delta in stream_model(self.slots, lambda: self.backend.stream_prepared(prepared, params,
                                                                                      stop.is_set),
                                        self.jobs, stop):
            yield delta

    async def first_token_logprobs(self, prepared: Prepared, top_n: int, answer: str,
                                   greedy: bool) -> FirstTokenLogprobs:
        if self.remote is not None:
            async with self.slots.slot():
                return await self.remote.afirst_token_logprobs(prepared, top_n, answer, greedy)
        return await call_model(self.slots, lambda: self.backend.first_token_logprobs(prepared, top_n, answer,
                                                                                      greedy))

    async def completion_tokens(self, prepared: Prepared, text: str) -> int | None:
        """The answer's length in tokens: what the model reported for it, else counted here (``None``: unknown)."""
        if prepared.completion_tokens is not None:
            return prepared.completion_tokens
        return await anyio.to_thread.run_sync(self.backend.count_tokens, text)

    async def count_tokens(self, text: str) -> int | None:
        return await anyio.to_thread.run_sync(self.backend.count_tokens, text)

    # ---- ECSO -----------------------------------------------------------------------------------------------
    async def run_ecso(self, pipeline: ECSO, images: list[Image.Image], query: str) -> ECSOResult:
        if self.remote is not None:
            async with self.slots.slot():
                return await pipeline.arun(images, query)
        return await call_model(self.slots, lambda: pipeline.run(images, query))

    async def stream_ecso(self, pipeline: ECSO, images: list[Image.Image], query: str, direct: str | None,
                          stop: threading.Event) -> AsyncIterator[StepEvent]:
        """One run's step events; ``stop`` (set when the client goes away) ends a blocking model's run."""
        if self.remote is not None:
            async for event in _held(self.slots, pipeline.astream(images, query, direct)):
                yield event
            return
        async for event in stream_model(self.slots, lambda: pipeline.stream(images, query, direct, stop.is_set),
                                        self.jobs, stop):
            yield event

    async def check(self, pipeline: ECSO, images: list[Image.Image], query: str, answer: str) -> Verdict:
        """ECSO's harm check of an answer already given (the ``monitor`` policy)."""
        if self.remote is not None:
            async with self.slots.slot():
                return await pipeline.acheck(images, query, answer)
        return await call_model(self.slots, lambda: pipeline.check(images, query, answer))

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()
