"""Where ECSO's generation happens. A backend generates answers for single-turn requests (text + optional
images) and, where it can, scores "yes" vs "no" as the first answer token. The interface is torch-free, so ECSO
can sit in front of any served VLM; the in-process backend wraps :class:`llava.model.engine.LlavaEngine`.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from llava.errors import UnsupportedError
from llava.generation import EarlyCheck, GenerationParams

__all__ = ["StepRequest", "Backend", "LocalBackend", "BACKENDS", "register_backend", "create_backend"]

logger = logging.getLogger(__name__)


@dataclass
class StepRequest:
    """A request: the user's text (untemplated) and its images (already loaded). ECSO's steps are single-turn;
    chat front-ends may pass earlier ``(user, assistant)`` turns in ``history`` (images belong to the first turn)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    params: GenerationParams = field(default_factory=GenerationParams)
    history: list[tuple[str, str]] = field(default_factory=list)


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

    def stream(self, request: StepRequest) -> Iterator[str]:
        """Text deltas of one answer; backends without streaming yield the whole answer once."""
        yield self.generate([request])[0]

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first answer token for each request."""
        raise UnsupportedError(f"backend {self.name!r} cannot score yes/no; use the exact or parse verdict")

    def describe(self) -> dict:
        return {"backend": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients, models)."""


class LocalBackend(Backend):
    """An in-process model: prompts templated with LLaVA's conversation templates, batched with left padding."""

    name = "local"
    supports_score = True
    supports_early_check = True

    def __init__(self, engine: Any, conv_mode: str | None = None, max_batch_size: int = 16,
                 should_stop: Callable[[], bool] | None = None):
        """``should_stop`` (e.g. "the client went away") ends streamed steps at the next token."""
        from llava.conversation import get_conv_template

        self.engine = engine
        self.should_stop = should_stop
        self.conv_mode = conv_mode or engine.loaded.conv_mode
        get_conv_template(self.conv_mode)  # fail fast on an unknown template
        self.max_batch_size = max(1, max_batch_size)

    def prompt(self, request: StepRequest) -> str:
        from llava.conversation import build_prompt

        return build_prompt(self.conv_mode, request.text, len(request.images), request.history)

    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        return self._generate(requests, None)

    def generate_checked(self, requests: Sequence[StepRequest], early_check: EarlyCheck) -> list[str]:
        return self._generate(requests, early_check)

    def _generate(self, requests: Sequence[StepRequest], early_check: EarlyCheck | None) -> list[str]:
        out: list[str] = [""] * len(requests)
        # Rows of one model call share decoding settings: group by params, keep the caller's order.
        for params, idxs in _group_by_params(requests).items():
            for chunk in _chunk_list(idxs, self.max_batch_size):
                answers = self.engine.generate([self.prompt(requests[i]) for i in chunk],
                                               [requests[i].images for i in chunk], params,
                                               _for_chunk(early_check, chunk))
                for i, answer in zip(chunk, answers):
                    out[i] = answer
        return out

    def stream(self, request: StepRequest) -> Iterator[str]:
        return self.engine.stream(self.prompt(request), request.images, request.params, should_stop=self.should_stop)

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float]:
        scores: list[float] = []
        for chunk in _chunk_list(list(range(len(requests))), self.max_batch_size):
            scores += self.engine.yes_no_scores([self.prompt(requests[i]) for i in chunk],
                                                [requests[i].images for i in chunk])
        return scores

    def describe(self) -> dict:
        return {"backend": self.name, **self.engine.loaded.describe(), "conv_mode": self.conv_mode}


def _group_by_params(requests: Sequence[StepRequest]) -> dict[GenerationParams, list[int]]:
    groups: dict[GenerationParams, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params, []).append(i)
    return groups


def _for_chunk(early_check: EarlyCheck | None, chunk: list[int]) -> EarlyCheck | None:
    """``early_check`` seen from one model call: its rows mapped back to the caller's indices."""
    if early_check is None:
        return None
    return EarlyCheck(early_check.at_tokens, lambda rows, texts: early_check.check([chunk[r] for r in rows], texts))


def _chunk_list(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    BACKENDS[name] = factory


def _local_factory(model_path: str, conv_mode: str | None = None, device: str | None = "auto",
                   image_aspect_ratio: str | None = None, max_batch_size: int = 16, **load_kwargs) -> Backend:
    from llava.model.builder import load_model
    from llava.model.engine import LlavaEngine

    loaded = load_model(model_path, device=device, image_aspect_ratio=image_aspect_ratio, conv_mode=conv_mode,
                        **load_kwargs)
    return LocalBackend(LlavaEngine(loaded), conv_mode=conv_mode, max_batch_size=max_batch_size)


register_backend("local", _local_factory)


def create_backend(name: str, **kwargs) -> Backend:
    """A backend by name (``local``, and ``worker``/``openai`` where :mod:`llava.ecso.remote` is available)."""
    if name not in BACKENDS:
        try:
            import llava.ecso.remote  # noqa: F401 - registers the HTTP backends
        except ImportError:
            pass
    if name not in BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**kwargs)
