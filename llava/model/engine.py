"""LLaVA-1.5's generation engine: LLaVA-templated prompts + images in, text (batched, streamed) or yes/no scores out.

Prompts are tokenized as LLaVA's ``tokenizer_image_token`` does and images preprocessed as LLaVA-1.5 (pad to square
by default); batching, streaming, prefix reuse and scoring are :class:`~llava.model.engine_base.GenerationEngine`'s.
Used by the in-process ECSO backend, the CLI, ``run_llava``, the benchmark runner and the model worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from PIL import Image

from llava.errors import ContextLengthError, InvalidRequestError
from llava.generation import EarlyCheck, GenerationParams
from llava.mm_utils import (WORKING_SIDE_FACTOR, count_image_tags, process_images, reduce_image,
                             tokenizer_image_token, working_side)
from llava.model.engine_base import GenerationEngine
from llava.model.loaded import LoadedModel
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES, PixelMemo

__all__ = ["LlavaEngine", "Encoded"]

logger = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One prompt ready for the model: token ids (image tags expanded), its images, the length of the reusable
    prefix (up to and including the last image token; 0 without images) and how its images are preprocessed
    (``aspect_ratio``; empty: the model's)."""

    input_ids: list[int]
    images: tuple[Image.Image, ...] = ()
    prefix_len: int = 0
    aspect_ratio: str = ""


class LlavaEngine(GenerationEngine):
    """Batched, streamed and scored generation on a LLaVA-1.5 :class:`LoadedModel`.

    ``prefix_reuse``: keep the KV cache of each sample's ``system + USER: + <image>`` prefix (see
    :mod:`llava.model.prefix_cache`) so later steps on the same image skip the image encoder and the prefix
    prefill. Results equal the plain path (greedy tokens and scores; tested). ``cache_capacity``: prefixes kept.
    """

    loaded: LoadedModel

    def __init__(self, loaded: LoadedModel, prefix_reuse: bool = True, cache_capacity: int = 32,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(loaded, prefix_reuse, cache_capacity, cache_bytes)
        self.pixel_memo = PixelMemo(max(cache_capacity, 1), cache_bytes)

    @property
    def min_image_tokens(self) -> int:  # type: ignore[override]
        return self.loaded.tokens_per_image

    def fit_image(self, image: Image.Image) -> Image.Image:
        """``image`` reduced towards the working side of LLaVA's preprocessing whatever the aspect-ratio mode a step
        uses (:func:`~llava.mm_utils.reduce_image`); each mode's own reduction follows in preprocessing."""
        side = working_side(self.loaded.image_processor)
        return reduce_image(image, side, side // WORKING_SIDE_FACTOR)

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, prompt: str, images: Sequence[Image.Image] = (), max_new_tokens: int = 0,
               aspect_ratio: str | None = None) -> Encoded:
        """``prompt`` tokenized with its images; ``aspect_ratio`` (``pad``, ``crop``, ``resize``): how they are
        preprocessed, default the model's (``LoadedModel.image_aspect_ratio``)."""
        n_tags = count_image_tags(prompt)
        if n_tags != len(images):
            raise InvalidRequestError(f"the prompt has {n_tags} <image> tag(s) but {len(images)} image(s) were given")
        lm = self.loaded
        ids = tokenizer_image_token(prompt, self.tokenizer, lm.image_token_id, lm.tokens_per_image)
        if len(ids) >= lm.context_len:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens (images included); the context window is "
                                     f"{lm.context_len}. Shorten the text or send fewer images")
        prefix_len = 0
        if images:
            prefix_len = len(ids) - ids[::-1].index(lm.image_token_id)
        return Encoded(ids, tuple(images), prefix_len, aspect_ratio or lm.image_aspect_ratio)

    def pixel_values(self, images: Sequence[Image.Image], aspect_ratios: Sequence[str] | None = None):
        """Preprocessed pixels ([n, 3, H, W] on the model's device), each image preprocessed once per aspect-ratio
        mode (``aspect_ratios``, one per image; default the model's)."""
        import torch

        lm = self.loaded
        modes = aspect_ratios or [lm.image_aspect_ratio] * len(images)

        def compute(img, mode):
            pv = process_images([img], lm.image_processor, mode)
            return pv.to(device=lm.device, dtype=lm.dtype if lm.dtype.is_floating_point else None)

        return torch.cat([self.pixel_memo.pixels(img, mode, compute) for img, mode in zip(images, modes, strict=True)],
                         dim=0)

    def _pixels_of(self, encoded: Sequence[Encoded]):
        """The pixel values of the rows' images, each row's preprocessed its own way."""
        return self.pixel_values([img for e in encoded for img in e.images],
                                 [e.aspect_ratio or self.loaded.image_aspect_ratio for e in encoded for _ in e.images])

    def _batch(self, encoded: Sequence[Encoded]) -> dict:
        """Left-padded input ids, attention mask, position ids and concatenated pixel values."""
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[row, width - n:] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        inputs = {"input_ids": ids.to(self.loaded.device), "attention_mask": mask.to(self.loaded.device)}
        if any(e.images for e in encoded):
            inputs["pixel_values"] = self._pixels_of(encoded)
        return inputs

    def _prefill_inputs(self, rows: Sequence[Encoded], prefix_len: int) -> dict:
        import torch

        ids = torch.tensor([e.input_ids[:prefix_len] for e in rows], device=self.loaded.device)
        return {"input_ids": ids, "pixel_values": self._pixels_of(rows)}

    def _extend(self, e: Encoded, tokens: Sequence[int]) -> Encoded:
        return Encoded(e.input_ids + list(tokens), e.images, e.prefix_len, e.aspect_ratio)

    def _prefix_key(self, e: Encoded) -> tuple:
        """A cropped image's prefix is not a padded one's."""
        return (*super()._prefix_key(e), e.aspect_ratio)

    def clear_caches(self) -> None:
        super().clear_caches()
        self.pixel_memo.clear()

    def _token_kwargs(self) -> dict:
        return {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}

    # ---- LLaVA-templated prompts ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                 params: GenerationParams = GenerationParams(), early_check: EarlyCheck | None = None) -> list[str]:
        """Answers for a batch of templated prompts (left padding; greedy rows equal unbatched ones)."""
        encoded = [self.encode(p, imgs) for p, imgs in zip(prompts, images, strict=True)]
        return self.generate_encoded(encoded, params, early_check)

    def stream(self, prompt: str, images: Sequence[Image.Image], params: GenerationParams = GenerationParams(),
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated (stop strings honoured). ``should_stop`` (e.g. "the client
        disconnected") is polled at every decoding step and ends generation early."""
        return self.stream_encoded(self.encode(prompt, images), params, should_stop)

    def yes_no_scores(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the answer, one forward pass per batch, no decoding."""
        encoded = [self.encode(p, imgs) for p, imgs in zip(prompts, images, strict=True)]
        return self.yes_no_scores_encoded(encoded)
