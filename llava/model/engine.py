"""The one generation helper: templated prompts + images in, text (batched, streamed) or yes/no scores out.

Used by the in-process ECSO backend, the CLI, ``run_llava``, the benchmark runner and the model worker.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from PIL import Image

from llava.errors import ContextLengthError, InvalidRequestError, UnsupportedError
from llava.generation import GenerationParams, truncate_at_stop
from llava.mm_utils import count_image_tags, process_images, tokenizer_image_token
from llava.model.builder import LoadedModel

__all__ = ["LlavaEngine", "Encoded", "yes_no_token_ids"]

logger = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One prompt ready for the model: token ids (image tags expanded) and its images' pixel values."""

    input_ids: list[int]
    pixel_values: Any | None  # torch.Tensor [n_images, 3, H, W] or None


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of tokens that begin an answer "yes" / "no" (any case, with or without SentencePiece's ``▁``),
    keeping only single tokens that spell the whole word."""

    def ids_for(words: Sequence[str]) -> list[int]:
        found: set[int] = set()
        for w in words:
            ids = tokenizer(w, add_special_tokens=False).input_ids
            pieces = tokenizer.convert_ids_to_tokens(ids)
            while pieces and pieces[0] in ("▁", "Ġ", " "):
                ids, pieces = ids[1:], pieces[1:]
            if len(ids) == 1:
                found.add(ids[0])
            for variant in (w, "▁" + w, "Ġ" + w):
                tid = tokenizer.convert_tokens_to_ids(variant)
                if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                    found.add(tid)
        return sorted(found)

    yes, no = ids_for(("yes", "Yes", "YES")), ids_for(("no", "No", "NO"))
    if not yes or not no:
        raise UnsupportedError("the tokenizer has no single-token 'yes'/'no': use --verdict exact or parse")
    return yes, no


class LlavaEngine:
    """Batched, streamed and scored generation on a :class:`LoadedModel`."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self._yes_no: tuple[list[int], list[int]] | None = None

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, prompt: str, images: Sequence[Image.Image] = (), max_new_tokens: int = 0) -> Encoded:
        n_tags = count_image_tags(prompt)
        if n_tags != len(images):
            raise InvalidRequestError(f"the prompt has {n_tags} <image> tag(s) but {len(images)} image(s) were given")
        lm = self.loaded
        ids = tokenizer_image_token(prompt, self.tokenizer, lm.image_token_id, lm.tokens_per_image)
        if len(ids) + max(max_new_tokens, 1) > lm.context_len and len(ids) >= lm.context_len:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens (images included); the context window is "
                                     f"{lm.context_len}. Shorten the text or send fewer images")
        pixel_values = None
        if images:
            import torch

            pixel_values = process_images(images, lm.image_processor, lm.image_aspect_ratio)
            pixel_values = pixel_values.to(device=lm.device, dtype=lm.dtype if lm.dtype != torch.int8 else None)
        return Encoded(ids, pixel_values)

    def _batch(self, encoded: Sequence[Encoded]):
        """Left-padded input ids, attention mask and concatenated pixel values."""
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[row, width - n:] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
        inputs = {"input_ids": ids.to(self.loaded.device), "attention_mask": mask.to(self.loaded.device)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels, dim=0)
        return inputs

    def _generate_kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict:
        tok = self.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "num_beams": params.num_beams, "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "use_cache": True,
        }
        if self.loaded.suppress_token_ids:
            kwargs["suppress_tokens"] = self.loaded.suppress_token_ids
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _budget(self, encoded: Sequence[Encoded], params: GenerationParams) -> int:
        """``max_new_tokens`` clamped to the context window, as LLaVA's worker does."""
        room = self.loaded.context_len - max(len(e.input_ids) for e in encoded)
        if room < 1:
            raise ContextLengthError(f"no room left to generate: the prompt fills the {self.loaded.context_len}-token "
                                     "context window")
        return min(params.max_new_tokens, room)

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                 params: GenerationParams = GenerationParams()) -> list[str]:
        """Answers for a batch of templated prompts (left padding; greedy rows equal unbatched ones)."""
        encoded = [self.encode(p, imgs, params.max_new_tokens) for p, imgs in zip(prompts, images, strict=True)]
        return self.generate_encoded(encoded, params)

    def generate_encoded(self, encoded: Sequence[Encoded], params: GenerationParams) -> list[str]:
        import torch

        if not encoded:
            return []
        inputs = self._batch(encoded)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generate_kwargs(params, self._budget(encoded, params)))
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, params.stop).strip() for t in texts]

    def stream(self, prompt: str, images: Sequence[Image.Image],
               params: GenerationParams = GenerationParams()) -> Iterator[str]:
        """Yield text deltas as they are generated (stop strings honoured)."""
        import torch
        from transformers import TextIteratorStreamer

        encoded = self.encode(prompt, images, params.max_new_tokens)
        inputs = self._batch([encoded])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        kwargs = {**inputs, **self._generate_kwargs(params, self._budget([encoded], params)), "streamer": streamer}
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        emitted = 0
        for piece in streamer:
            text += piece
            cut = truncate_at_stop(text, params.stop)
            visible = cut.lstrip() if emitted == 0 else cut
            # hold back a possible partial stop string at the end
            hold = max((len(s) - 1 for s in params.stop), default=0)
            safe_end = len(visible) - hold if cut == text else len(visible)
            if safe_end > emitted:
                yield visible[emitted:safe_end]
                emitted = safe_end
            if cut != text:
                break
        thread.join()
        if failure:
            raise failure[0]
        final = truncate_at_stop(text, params.stop).strip()
        if len(final) > emitted:
            yield final[emitted:]

    # ---- scoring --------------------------------------------------------------------------------------------
    def yes_no_scores(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first answer token, one forward pass per batch, no decoding."""
        encoded = [self.encode(p, imgs) for p, imgs in zip(prompts, images, strict=True)]
        return self.yes_no_scores_encoded(encoded)

    def yes_no_scores_encoded(self, encoded: Sequence[Encoded]) -> list[float]:
        import torch

        if not encoded:
            return []
        if self._yes_no is None:
            self._yes_no = yes_no_token_ids(self.tokenizer)
        yes, no = self._yes_no
        inputs = self._batch(encoded)
        with torch.inference_mode():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        margin = torch.logsumexp(logp[:, yes], dim=-1) - torch.logsumexp(logp[:, no], dim=-1)
        return torch.sigmoid(margin).tolist()
