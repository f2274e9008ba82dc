"""The generation engine of every transformers vision-language model other than LLaVA-1.5.

A prompt is a chat in transformers' message format (``[{"type": "image"}, {"type": "text", ...}]`` content), rendered
with the processor's chat template (``apply_chat_template(..., add_generation_prompt=True)``) and encoded by the
processor with its images (its own resizing and tiling), exactly as plain transformers does; decoding is the model's
own ``generate``. Rows are batched with left padding from each row's processor output (image tensors with a
varying tile count are zero-padded, as the processors pad them); batching, streaming, prefix reuse and scoring are
:class:`~llava.model.engine_base.GenerationEngine`'s. Prefix reuse follows the family
(:attr:`~llava.model.family.ModelFamily.prefix_reuse`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from llava.errors import ContextLengthError, InvalidRequestError
from llava.model.engine_base import GenerationEngine
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES
from llava.model.vlm import LoadedVLM

__all__ = ["VLMEncoded", "VLMEngine"]


@dataclass
class VLMEncoded:
    """One prompt encoded by the processor: ``input_ids`` (image placeholders expanded), its images, the length of
    the reusable prefix (through its last image token; 0 without images), the processor's output for this row
    alone (``features``: tensors with a batch dimension of 1) and the rendered ``prompt``."""

    input_ids: list[int]
    images: tuple[Image.Image, ...] = ()
    prefix_len: int = 0
    features: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""


class VLMEngine(GenerationEngine):
    """Batched, streamed and scored generation on a :class:`~llava.model.vlm.LoadedVLM`. ``prefix_reuse`` applies
    where the model's family allows it (and is off otherwise, whatever is asked)."""

    loaded: LoadedVLM

    def __init__(self, loaded: LoadedVLM, prefix_reuse: bool = True, cache_capacity: int = 32,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(loaded, prefix_reuse and loaded.family.prefix_reuse, cache_capacity, cache_bytes)
        self.processor = loaded.processor
        self.positions_from_mask = not loaded.family.model_positions

    # ---- encoding -------------------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> str:
        """The prompt text of ``messages`` from the processor's chat template, the assistant turn opened."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, messages: list[dict], images: Sequence[Image.Image] = ()) -> VLMEncoded:
        lm = self.loaded
        prompt = self.render(messages)
        try:
            features = self.processor(text=[prompt], images=[list(images)] if images else None, return_tensors="pt")
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidRequestError(f"model {lm.model_name!r} ({lm.family.name}) cannot take this request with "
                                      f"{len(images)} image(s): {exc}") from None
        ids = features["input_ids"][0].tolist()
        if len(ids) >= lm.context_len:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens (images included); the context window of "
                                     f"{lm.model_name!r} is {lm.context_len}. Shorten the text or send fewer images")
        prefix_len = 0
        if images and lm.image_token_id in ids:
            prefix_len = len(ids) - ids[::-1].index(lm.image_token_id)
        return VLMEncoded(ids, tuple(images), prefix_len, dict(features), prompt)

    # ---- model inputs ---------------------------------------------------------------------------------------
    def _per_token(self, features: dict[str, Any]) -> set[str]:
        """The keys holding one value per token (ids, mask, token types); the rest are image inputs."""
        shape = features["input_ids"].shape
        return {k for k, v in features.items() if hasattr(v, "shape") and tuple(v.shape) == tuple(shape)}

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        lm = self.loaded
        return {k: v.to(device=lm.device, dtype=lm.dtype) if v.is_floating_point() else v.to(lm.device)
                for k, v in inputs.items()}

    def _stack_images(self, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
        """Image inputs of several rows in one batch: concatenated along the first dimension, zero-padded where
        their other dimensions differ (a varying tile count), as the processors pad a batch."""
        import torch

        out = {}
        for key in keys:
            values = [r[key] for r in rows]
            shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
            padded = []
            for v in values:
                pads = [p for d in reversed(range(1, v.dim())) for p in (0, shape[d] - v.shape[d])]
                padded.append(torch.nn.functional.pad(v, pads) if any(pads) else v)
            out[key] = torch.cat(padded, dim=0)
        return out

    def _batch(self, encoded: Sequence[VLMEncoded]) -> dict:
        """Left-padded rows: token ids (padded with the pad token), mask and token types (with zeros), images."""
        import torch

        features = [e.features for e in encoded]
        if len(features) == 1:
            return self._to_device(features[0])
        per_token = self._per_token(features[0])
        width = max(f["input_ids"].shape[1] for f in features)
        inputs = {}
        for key in per_token:
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            rows = [torch.nn.functional.pad(f[key], (width - f[key].shape[1], 0), value=fill) for f in features]
            inputs[key] = torch.cat(rows, dim=0)
        inputs.update(self._stack_images(features, [k for k in features[0] if k not in per_token]))
        return self._to_device(inputs)

    def _prefill_inputs(self, rows: Sequence[VLMEncoded], prefix_len: int) -> dict:
        import torch

        features = [e.features for e in rows]
        per_token = self._per_token(features[0])
        inputs = {k: torch.cat([f[k][:, :prefix_len] for f in features]) for k in per_token}
        inputs.update(self._stack_images(features, [k for k in features[0] if k not in per_token]))
        return self._to_device(inputs)

    def _extend(self, e: VLMEncoded, tokens: Sequence[int]) -> VLMEncoded:
        import torch

        features = dict(e.features)
        extra = torch.tensor([list(tokens)], dtype=torch.long)
        for key in self._per_token(e.features):
            value = e.features[key]
            tail = extra if key == "input_ids" else torch.ones_like(extra) if key == "attention_mask" else \
                torch.zeros_like(extra)
            features[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
        return VLMEncoded(e.input_ids + list(tokens), e.images, e.prefix_len, features, e.prompt)

    # ---- decoding -------------------------------------------------------------------------------------------
    def _token_kwargs(self) -> dict:
        """End of text as the model's generation config says (often several ids); padding only where it has none."""
        if self.model.generation_config.pad_token_id is None:
            return {"pad_token_id": self.tokenizer.pad_token_id}
        return {}

    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return sorted(ids | {self.tokenizer.eos_token_id} - {None})
