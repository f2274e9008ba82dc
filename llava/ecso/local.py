"""The in-process backends. :class:`EngineBackend` is what every in-process model shares (batches grouped by decoding
settings and cut to ``max_batch_size``, streaming, scoring, serving from a prepared prompt); :class:`LocalBackend` is
LLaVA-1.5's: a :class:`~llava.model.engine.LlavaEngine`, prompts templated with LLaVA's conversation templates. The
other families' backend is :class:`llava.ecso.local_vlm.VLMBackend`. Both serve ECSO's steps and a model worker
(:class:`~llava.ecso.backends.ServingBackend`)."""
from __future__ import annotations

import abc
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from PIL import Image

from llava.conversation import Chat, get_conv_template, render_prompt
from llava.ecso.backends import Prepared, ServingBackend, StepRequest, StopFlag
from llava.errors import UnsupportedError
from llava.generation import EarlyCheck, FirstTokenLogprobs, GenerationParams
from llava.model.builder import load_model
from llava.model.engine import LlavaEngine
from llava.model.engine_base import EncodedRow, GenerationEngine
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES

__all__ = ["EngineBackend", "LocalBackend"]


class EngineBackend(ServingBackend):
    """An in-process model behind a :class:`~llava.model.engine_base.GenerationEngine`; subclasses say how a chat
    becomes an encoded prompt (:meth:`encode_chat`)."""

    name = "local"
    supports_early_check = True

    def __init__(self, engine: GenerationEngine, max_batch_size: int = 16):
        self.engine = engine
        self.max_batch_size = max(1, max_batch_size)

    @abc.abstractmethod
    def encode_chat(self, chat: Chat) -> EncodedRow:
        """``chat`` (images loaded) encoded for the engine; checks the image count and the context length."""

    def encode_request(self, request: StepRequest) -> EncodedRow:
        """A step's request encoded. A step's own image preprocessing (``request.image_aspect_ratio``) is
        LLaVA-1.5's (:class:`LocalBackend`); other families preprocess with their processor and refuse it."""
        if request.image_aspect_ratio is not None:
            raise UnsupportedError(f"{self.model_name!r} preprocesses images with its own processor: a step's own "
                                   f"image preprocessing ({request.image_aspect_ratio!r}; --image-aspect-ratio-check, "
                                   "--image-aspect-ratio-caption) applies to LLaVA-1.5 checkpoints only")
        return self.encode_chat(request.chat())

    def _row_kind(self, request: StepRequest) -> Hashable:
        """Rows of different kinds never share a model call (LLaVA mixes rows with and without images)."""
        return None

    @property
    def supports_score(self) -> bool:  # type: ignore[override]
        return self.engine.can_score

    @property
    def no_score_reason(self) -> str:
        return f"the tokenizer of {self.model_name!r} cannot spell 'yes' and 'no' apart (no single tokens, no token " \
               "sequences)"

    # ---- ECSO's steps -----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        return self._generate(requests, None)

    def generate_checked(self, requests: Sequence[StepRequest], early_check: EarlyCheck) -> list[str]:
        return self._generate(requests, early_check)

    def _generate(self, requests: Sequence[StepRequest], early_check: EarlyCheck | None) -> list[str]:
        out: list[str] = [""] * len(requests)
        # Rows of one model call share decoding settings: group by params, keep the caller's order.
        for idxs in self._groups(requests, by_params=True):
            for chunk in _chunk_list(idxs, self.max_batch_size):
                encoded = [self.encode_request(requests[i]) for i in chunk]
                answers = self.engine.generate_encoded(encoded, requests[chunk[0]].params,
                                                       _for_chunk(early_check, chunk))
                for i, answer in zip(chunk, answers):
                    out[i] = answer
        return out

    def _groups(self, requests: Sequence[StepRequest], by_params: bool) -> list[list[int]]:
        """Indices of the requests that may share a model call (same kind and, to generate, same params)."""
        groups: dict[Hashable, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.params if by_params else None, self._row_kind(r)), []).append(i)
        return list(groups.values())

    def stream(self, request: StepRequest, should_stop: StopFlag | None = None) -> Iterator[str]:
        return self.engine.stream_encoded(self.encode_request(request), request.params, should_stop)

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float | None]:
        scores: list[float | None] = [None] * len(requests)
        for idxs in self._groups(requests, by_params=False):
            for chunk in _chunk_list(idxs, self.max_batch_size):
                found = self.engine.yes_no_scores_encoded([self.encode_request(requests[i]) for i in chunk])
                for i, score in zip(chunk, found):
                    scores[i] = score
        return scores  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"backend": self.name, **self.engine.loaded.describe(), "prefix_reuse": self.engine.prefix_reuse,
                "yes_no_score": self.engine.yes_no.mode if self.engine.can_score else "unavailable"}

    # ---- serving ----------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.loaded.model_name

    @property
    def multimodal(self) -> bool:
        return self.engine.loaded.multimodal

    def check_budget(self, text_chars: int, n_images: int) -> None:
        self.engine.check_budget(text_chars, n_images)

    def fit_image(self, image: Image.Image) -> Image.Image:
        return self.engine.fit_image(image)

    def prepare(self, chat: Chat) -> Prepared:
        encoded = self.encode_chat(chat)
        return Prepared(list(chat.images), len(encoded.input_ids), encoded)

    def complete(self, prepared: Prepared, params: GenerationParams) -> str:
        return self.engine.generate_encoded([prepared.handle], params)[0]

    def stream_prepared(self, prepared: Prepared, params: GenerationParams,
                        should_stop: StopFlag | None = None) -> Iterator[str]:
        return self.engine.stream_encoded(prepared.handle, params, should_stop)

    def first_token_logprobs(self, prepared: Prepared, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        return self.engine.first_token_choices(prepared.handle, top_n, answer, greedy)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)


class LocalBackend(EngineBackend):
    """LLaVA-1.5 in process: prompts templated with LLaVA's conversation templates, batched with left padding."""

    engine: LlavaEngine

    def __init__(self, engine: LlavaEngine, conv_mode: str | None = None, max_batch_size: int = 16):
        super().__init__(engine, max_batch_size)
        self.conv_mode = conv_mode or engine.loaded.conv_mode
        get_conv_template(self.conv_mode)  # fail fast on an unknown template

    @classmethod
    def load(cls, model_path: str, conv_mode: str | None = None, device: str | None = "auto",
             image_aspect_ratio: str | None = None, max_batch_size: int = 16,
             cache_bytes: int = DEFAULT_CACHE_BYTES, **load_kwargs: Any) -> LocalBackend:
        """Load ``model_path`` (:func:`~llava.model.builder.load_model`'s arguments) and wrap it; ``cache_bytes``
        bounds each of the engine's caches."""
        loaded = load_model(model_path, device=device, image_aspect_ratio=image_aspect_ratio, conv_mode=conv_mode,
                            **load_kwargs)
        return cls(LlavaEngine(loaded, cache_bytes=cache_bytes), conv_mode=conv_mode, max_batch_size=max_batch_size)

    def prompt(self, request: StepRequest) -> str:
        return render_prompt(self.conv_mode, request.chat())

    def encode_chat(self, chat: Chat) -> EncodedRow:
        return self.engine.encode(render_prompt(self.conv_mode, chat), chat.images)

    def encode_request(self, request: StepRequest) -> EncodedRow:
        """The request templated and encoded, its images preprocessed as it says."""
        chat = request.chat()
        return self.engine.encode(render_prompt(self.conv_mode, chat), chat.images,
                                  aspect_ratio=request.image_aspect_ratio)

    def describe(self) -> dict:
        return {**super().describe(), "conv_mode": self.conv_mode}

    def status(self) -> dict[str, Any]:
        return {"conv_mode": self.conv_mode, "model_family": "llava", "prompt_format": "LLaVA conversation template",
                "random_weights": self.engine.loaded.is_tiny}

    def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        encoded = self.engine.encode(prompt, images)  # checks the <image> count and the context length
        return Prepared(list(images), len(encoded.input_ids), encoded)


def _for_chunk(early_check: EarlyCheck | None, chunk: list[int]) -> EarlyCheck | None:
    """``early_check`` seen from one model call: its rows mapped back to the caller's indices."""
    if early_check is None:
        return None
    return EarlyCheck(early_check.at_tokens, lambda rows, texts: early_check.check([chunk[r] for r in rows], texts))


def _chunk_list(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
