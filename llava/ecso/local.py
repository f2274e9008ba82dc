"""The in-process backend: a :class:`~llava.model.engine.LlavaEngine`, prompts templated with LLaVA's conversation
templates, batches with left padding. It serves both ECSO's steps and a model worker
(:class:`~llava.ecso.backends.ServingBackend`)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from llava.conversation import Chat, get_conv_template, render_prompt
from llava.ecso.backends import Prepared, ServingBackend, StepRequest, StopFlag
from llava.generation import EarlyCheck, FirstTokenLogprobs, GenerationParams
from llava.model.builder import load_model
from llava.model.engine import LlavaEngine

__all__ = ["LocalBackend"]


class LocalBackend(ServingBackend):
    """An in-process model: prompts templated with LLaVA's conversation templates, batched with left padding."""

    name = "local"
    supports_score = True
    supports_early_check = True

    def __init__(self, engine: LlavaEngine, conv_mode: str | None = None, max_batch_size: int = 16):
        self.engine = engine
        self.conv_mode = conv_mode or engine.loaded.conv_mode
        get_conv_template(self.conv_mode)  # fail fast on an unknown template
        self.max_batch_size = max(1, max_batch_size)

    @classmethod
    def load(cls, model_path: str, conv_mode: str | None = None, device: str | None = "auto",
             image_aspect_ratio: str | None = None, max_batch_size: int = 16, **load_kwargs: Any) -> LocalBackend:
        """Load ``model_path`` (:func:`~llava.model.builder.load_model`'s arguments) and wrap it."""
        loaded = load_model(model_path, device=device, image_aspect_ratio=image_aspect_ratio, conv_mode=conv_mode,
                            **load_kwargs)
        return cls(LlavaEngine(loaded), conv_mode=conv_mode, max_batch_size=max_batch_size)

    # ---- ECSO's steps -----------------------------------------------------------------------------------------
    def prompt(self, request: StepRequest) -> str:
        return render_prompt(self.conv_mode, request.chat())

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

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        return self.engine.stream(self.prompt(request), request.images, request.params, should_stop=should_stop)

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float]:
        scores: list[float] = []
        for chunk in _chunk_list(list(range(len(requests))), self.max_batch_size):
            scores += self.engine.yes_no_scores([self.prompt(requests[i]) for i in chunk],
                                                [requests[i].images for i in chunk])
        return scores

    def describe(self) -> dict:
        return {"backend": self.name, **self.engine.loaded.describe(), "conv_mode": self.conv_mode}

    # ---- serving ----------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.loaded.model_name

    @property
    def multimodal(self) -> bool:
        return self.engine.loaded.multimodal

    def status(self) -> dict[str, Any]:
        return {"conv_mode": self.conv_mode, "random_weights": self.engine.loaded.is_tiny}

    def prepare(self, chat: Chat) -> Prepared:
        return self.prepare_templated(render_prompt(self.conv_mode, chat), chat.images)

    def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        encoded = self.engine.encode(prompt, images)  # checks the <image> count and the context length
        return Prepared(list(images), len(encoded.input_ids), encoded)

    def complete(self, prepared: Prepared, params: GenerationParams) -> str:
        return self.engine.generate_encoded([prepared.handle], params)[0]

    def stream_prepared(self, prepared: Prepared, params: GenerationParams,
                        should_stop: StopFlag | None = None) -> Iterator[str]:
        return self.engine.stream_encoded(prepared.handle, params, should_stop)

    def first_token_logprobs(self, prepared: Prepared, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        return self.engine.first_token_choices(prepared.handle, top_n, answer, greedy)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)


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
