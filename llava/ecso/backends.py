"""Where generation happens: the interfaces a model sits behind (torch-free, so ECSO can sit in front of any served
VLM).

* :class:`Backend`: what ECSO's steps need. Answers for single-turn requests (text + optional images), streamed
  text and, where the model allows, a yes/no score of the first answer token.
* :class:`ServingBackend`: what a model worker needs on top, so its routes never reach under the model: render a
  chat (system, turns, images) to the model's prompt and check it fits (:meth:`~ServingBackend.prepare`, once per
  request; the :class:`Prepared` handle is reused for its generation), take a LLaVA-protocol prompt as it comes,
  generate or stream from a prepared prompt, the first answer token's log-probabilities, token counts, and the
  status fields the worker reports. The in-process :class:`~llava.ecso.local.LocalBackend` implements both;
  another model family or a remote model is one more implementation (docs/architecture.md).
* :class:`AsyncBackend`, :class:`AsyncServingBackend`: the same operations as coroutines, for a model reached over
  the network (:class:`~llava.ecso.openai_remote.OpenAIBackend`): a worker awaits them on its event loop instead of
  holding a thread per request, and ECSO runs them with :meth:`~llava.ecso.pipeline.ECSO.astream`.

Backends are created by name through :mod:`llava.ecso.registry`.
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from llava.conversation import Chat
from llava.errors import UnsupportedError
from llava.generation import EarlyCheck, FirstTokenLogprobs, GenerationParams

__all__ = ["StopFlag", "StepRequest", "Backend", "Prepared", "ServingBackend", "AsyncBackend", "AsyncServingBackend"]

StopFlag = Callable[[], bool]


@dataclass
class StepRequest:
    """A request: the user's text (untemplated) and its images (already loaded). ECSO's steps are single-turn;
    chat front-ends may pass earlier ``(user, assistant)`` turns in ``history`` (images belong to the first turn).
    ``image_aspect_ratio``: this request's image preprocessing (``pad``, ``crop``, ``resize``); ``None``: the
    backend's own."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    params: GenerationParams = field(default_factory=GenerationParams)
    history: list[tuple[str, str]] = field(default_factory=list)
    image_aspect_ratio: str | None = None

    def chat(self) -> Chat:
        return Chat.single(self.text, self.images, self.history)


class Backend(abc.ABC):
    """Generation for ECSO's steps. Subclasses template the prompt as their model expects."""

    name: str = "abstract"
    supports_score: bool = False
    supports_early_check: bool = False  # generate_checked can stop rows part-way

    @abc.abstractmethod
    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        """Answers for a batch of requests, in order."""

    def generate_checked(self, requests: Sequence[StepRequest], early_check: EarlyCheck) -> list[str]:
        """:meth:`generate`, with ``early_check`` run on the partial answers (indices into ``requests``) and rows
        stopped where it says so. Backends that cannot look inside a generation answer in full (the default)."""
        return self.generate(requests)

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        """Text deltas of one answer; backends without streaming yield the whole answer once. ``should_stop``
        (e.g. "the client went away") ends the answer early where the backend can tell its model."""
        yield self.generate([request])[0]

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        """P(yes) / (P(yes) + P(no)) of the first answer token for each request; ``None`` for a request the backend
        could not score (e.g. neither yes nor no among the alternatives a remote model returned): ECSO then parses
        that answer's text and says so in its result."""
        raise UnsupportedError(f"backend {self.name!r} cannot score yes/no; use the exact or parse verdict")

    @property
    def no_score_reason(self) -> str:
        """Why ``supports_score`` is false, as a result's ``verdict_fallback`` states it."""
        return f"backend {self.name!r} cannot score yes/no"

    def describe(self) -> dict:
        return {"backend": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients, models)."""


@dataclass
class Prepared:
    """A prompt made ready once: rendered in the model's format, checked to fit its context, tokenized where the
    backend tokenizes. ``prompt_tokens``: its length (``None`` where the model counts elsewhere); ``handle``: what
    the backend generates from (its own type)."""

    images: list[Any]
    prompt_tokens: int | None
    handle: Any
    # What a remote model reported about the last generation from it (usage statistics), when it reports them.
    completion_tokens: int | None = None
    finish_reason: str | None = None


class ServingBackend(Backend):
    """What a model worker needs from its model (see the module docstring). Every method that runs the model
    blocks; the worker calls them in threads, within its concurrency slots."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """The name the worker serves the model under."""

    @property
    @abc.abstractmethod
    def multimodal(self) -> bool:
        """Whether the model takes images (from its configuration, never its name)."""

    def status(self) -> dict[str, Any]:
        """Extra fields of the worker's status (e.g. the chat template its LLaVA prompts use)."""
        return {}

    @abc.abstractmethod
    def prepare(self, chat: Chat) -> Prepared:
        """``chat`` (images loaded) rendered to the model's prompt and checked to fit: raises
        :class:`~llava.errors.ContextLengthError` or :class:`~llava.errors.InvalidRequestError` before anything
        runs."""

    def check_budget(self, text_chars: int, n_images: int) -> None:
        """Refuse (:class:`~llava.errors.ContextLengthError`) a request that cannot fit the context whatever its
        text tokenizes to, from its length in characters (``<image>`` tags not counted) and its image count:
        cheap, before any image is decoded or any text tokenized. No check where the tokenizer is elsewhere."""

    def fit_image(self, image: Image.Image) -> Image.Image:
        """``image`` reduced to the largest size the model's preprocessing can use (called as soon as it is
        decoded, so a request holds no more than that); as it is by default."""
        return image

    def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        """A LLaVA-protocol prompt (already templated, one ``<image>`` tag per image), checked to fit."""
        raise UnsupportedError(f"backend {self.name!r} does not take LLaVA-templated prompts")

    @abc.abstractmethod
    def complete(self, prepared: Prepared, params: GenerationParams) -> str:
        """The answer to a prepared prompt."""

    @abc.abstractmethod
    def stream_prepared(self, prepared: Prepared, params: GenerationParams,
                        should_stop: StopFlag | None = None) -> Iterator[str]:
        """Text deltas of the answer to a prepared prompt; ``should_stop`` ends it early."""

    def first_token_logprobs(self, prepared: Prepared, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        """The first answer token (of ``answer``, or the greedy one) and its ``top_n`` best alternatives."""
        raise UnsupportedError(f"backend {self.name!r} cannot report log-probabilities")

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` as an answer (usage statistics, ``finish_reason``); ``None`` where the tokenizer is
        not here (a remote model: its own usage reports are used, see :class:`Prepared`)."""


class AsyncBackend(Backend):
    """ECSO's steps as coroutines (a model reached over the network). The blocking methods stay available (for
    command-line runs); an event loop uses these."""

    @abc.abstractmethod
    async def agenerate(self, requests: Sequence[StepRequest]) -> list[str]:
        """Answers for a batch of requests, in order (sent concurrently)."""

    @abc.abstractmethod
    def astream(self, request: StepRequest) -> AsyncIterator[str]:
        """Text deltas of one answer; closing the iterator ends the request."""

    async def ascore_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        """:meth:`Backend.score_yes_no` as a coroutine."""
        raise UnsupportedError(f"backend {self.name!r} cannot score yes/no; use the exact or parse verdict")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the event loop holds (connections)."""


class AsyncServingBackend(AsyncBackend, ServingBackend):
    """A worker's model reached over the network: :class:`ServingBackend`'s generation as coroutines, plus its
    readiness and health, which the worker reports to its controller."""

    async def astart(self) -> None:  # noqa: B027 - optional hook
        """Get ready to serve (e.g. learn the remote model's name and what it returns), before the first request."""

    @abc.abstractmethod
    async def acomplete(self, prepared: Prepared, params: GenerationParams) -> str:
        """:meth:`ServingBackend.complete` as a coroutine."""

    @abc.abstractmethod
    def astream_prepared(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[str]:
        """:meth:`ServingBackend.stream_prepared` as an async iterator; closing it ends the request."""

    async def afirst_token_logprobs(self, prepared: Prepared, top_n: int, answer: str,
                                    greedy: bool) -> FirstTokenLogprobs:
        """:meth:`ServingBackend.first_token_logprobs` as a coroutine."""
        raise UnsupportedError(f"backend {self.name!r} cannot report log-probabilities")

    async def ahealthy(self) -> bool:
        """Whether the model can answer now, checked (before each heartbeat: a controller sends no requests to a
        worker whose model cannot answer)."""
        return True

    @property
    def reachable(self) -> bool:
        """Whether the model could answer at the last check or request (no network call)."""
        return True

    def check_reachable(self) -> None:
        """Raise :class:`~llava.errors.UpstreamUnavailableError` now when the model cannot answer (so a stream is
        refused with a real status instead of failing once it has started)."""
