"""The one generation helper: templated prompts + images in, text (batched, streamed) or yes/no scores out.

Used by the in-process ECSO backend, the CLI, ``run_llava``, the benchmark runner and the model worker.
"""
from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from llava.errors import ContextLengthError, InvalidRequestError
from llava.generation import EarlyCheck, FirstTokenLogprobs, GenerationParams, truncate_at_stop
from llava.mm_utils import count_image_tags, process_images, tokenizer_image_token
from llava.model.first_token import first_token_choices, yes_no_token_ids
from llava.model.loaded import LoadedModel
from llava.model.prefix_cache import PixelMemo, PrefixEntry, PrefixStore, cache_around, generated_cache

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


class LlavaEngine:
    """Batched, streamed and scored generation on a :class:`LoadedModel`.

    ``prefix_reuse``: keep the KV cache of each sample's ``system + USER: + <image>`` prefix (see
    :mod:`llava.model.prefix_cache`) so later steps on the same image skip the image encoder and the prefix
    prefill. Results equal the plain path (greedy tokens and scores; tested). ``cache_capacity``: prefixes kept.
    """

    def __init__(self, loaded: LoadedModel, prefix_reuse: bool = True, cache_capacity: int = 32):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.prefix_reuse = prefix_reuse
        self.prefixes = PrefixStore(cache_capacity if prefix_reuse else 0)
        self.pixel_memo = PixelMemo(max(cache_capacity, 1))
        self._yes_no: tuple[list[int], list[int]] | None = None
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes.
        forward_params = inspect.signature(type(self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"

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

    # ---- prefix reuse ---------------------------------------------------------------------------------------
    def _prefix_batch(self, encoded: Sequence[Encoded], num_beams: int = 1) -> dict | None:
        """Inputs that continue from cached prefixes: ``[prefix | pads | suffix]`` per row with a matching mask and
        a batched cache of the prefixes; ``None`` when the batch does not qualify (rows without images, prefixes of
        different lengths, beam search)."""
        import torch

        if not self.prefix_reuse or num_beams != 1:
            return None
        plen = encoded[0].prefix_len
        if plen == 0 or any(e.prefix_len != plen or len(e.input_ids) <= plen for e in encoded):
            return None
        entries = self._prefix_entries(encoded)
        if len(entries) == 1:  # the stored tensors themselves: the cache's updates concatenate into new ones
            layers = entries[0].layers
        else:
            layers = [(torch.cat([en.layers[i][0] for en in entries]), torch.cat([en.layers[i][1] for en in entries]))
                      for i in range(len(entries[0].layers))]
        cache = cache_around(layers)
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n_suffix = len(e.input_ids) - plen
            ids[row, :plen] = torch.tensor(e.input_ids[:plen])
            ids[row, width - n_suffix:] = torch.tensor(e.input_ids[plen:])
            mask[row, :plen] = 1
            mask[row, width - n_suffix:] = 1
        dev = self.loaded.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), self._cache_kw: cache}

    def _prefix_entries(self, encoded: Sequence[Encoded]) -> list[PrefixEntry]:
        """The cached prefix of every row, prefilling (in one batch) the ones not cached yet."""
        import torch

        found = [self.prefixes.lookup(_prefix_key(e), e.images) for e in encoded]
        groups: dict[tuple, list[int]] = {}  # rows sharing a prefix (e.g. two steps of one sample) prefill once
        for i in (i for i, f in enumerate(found) if f is None):
            groups.setdefault(_prefix_key(encoded[i]), []).append(i)
        if groups:
            plen = encoded[0].prefix_len
            firsts = [rows[0] for rows in groups.values()]
            ids = torch.tensor([encoded[i].input_ids[:plen] for i in firsts], device=self.loaded.device)
            pixels = self._pixels_of([encoded[i] for i in firsts])
            with torch.inference_mode():
                out = self.model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in getattr(out, self._cache_kw).layers]
            for row, rows in enumerate(groups.values()):
                entry = PrefixEntry(_prefix_key(encoded[rows[0]]), encoded[rows[0]].images,
                                    [(k[row:row + 1], v[row:row + 1]) for k, v in layers])
                self.prefixes.add(entry)
                for i in rows:
                    found[i] = entry
        return found  # type: ignore[return-value]

    def _inputs(self, encoded: Sequence[Encoded], num_beams: int = 1) -> dict:
        return self._prefix_batch(encoded, num_beams) or self._batch(encoded)

    def _generation_inputs(self, encoded: Sequence[Encoded], num_beams: int, harvest: bool) -> tuple[dict, bool]:
        """Inputs of a generation, and whether to harvest its prefixes afterwards: a batch whose rows all have
        distinct prefixes none of which is cached yet (a sample's first step) runs in one forward pass like the
        plain path, and :meth:`_harvest` keeps the prefixes from its cache; other batches continue from cached
        prefixes (prefilling missing ones first)."""
        if harvest and self._harvestable(encoded, num_beams):
            return self._batch(encoded), True
        return self._inputs(encoded, num_beams), False

    def _harvestable(self, encoded: Sequence[Encoded], num_beams: int) -> bool:
        if not self.prefix_reuse or num_beams != 1 or any(e.prefix_len == 0 for e in encoded):
            return False
        if len({_prefix_key(e) for e in encoded}) < len(encoded):  # rows sharing a prefix: prefilling it once is cheaper
            return False
        return not any(self.prefixes.has(_prefix_key(e), e.images) for e in encoded)

    def _harvest(self, encoded: Sequence[Encoded], width: int, cache: Any) -> None:
        """Store each row's prefix keys/values out of a finished generation's cache (rows are left-padded to
        ``width``); copies, so the rest of that cache can be freed."""
        layers = getattr(cache, "layers", None)
        if not layers or not all(hasattr(layer, "keys") and getattr(layer.keys, "dim", lambda: 0)() == 4
                                 for layer in layers):
            return  # another cache layout: later steps prefill the prefix themselves
        for row, e in enumerate(encoded):
            start = width - len(e.input_ids)
            span = slice(start, start + e.prefix_len)
            kv = [(layer.keys[row:row + 1, :, span].clone(), layer.values[row:row + 1, :, span].clone())
                  for layer in layers]
            self.prefixes.add(PrefixEntry(_prefix_key(e), e.images, kv))

    def _generate_kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict:
        tok = self.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "num_beams": params.num_beams, "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "use_cache": True,
        }
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = min(params.min_new_tokens, max_new_tokens)
        if self.loaded.suppress_token_ids:
            kwargs["suppress_tokens"] = self.loaded.suppress_token_ids
        if params.temperature > 1e-5:  # smaller ones overflow logits / temperature (NaN probabilities): greedy
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
                 params: GenerationParams = GenerationParams(), early_check: EarlyCheck | None = None) -> list[str]:
        """Answers for a batch of templated prompts (left padding; greedy rows equal unbatched ones)."""
        encoded = [self.encode(p, imgs) for p, imgs in zip(prompts, images, strict=True)]
        return self.generate_encoded(encoded, params, early_check)

    def generate_encoded(self, encoded: Sequence[Encoded], params: GenerationParams,
                         early_check: EarlyCheck | None = None) -> list[str]:
        """Answers for encoded prompts; ``early_check`` may stop rows after its ``at_tokens`` new tokens."""
        import torch
        from transformers import StoppingCriteriaList

        if not encoded:
            return []
        # an early check looks up the prefixes during the generation: they must be stored before it starts
        inputs, harvest = self._generation_inputs(encoded, params.num_beams, harvest=early_check is None)
        budget = self._budget(encoded, params)
        kwargs = self._generate_kwargs(params, budget)
        width = inputs["input_ids"].shape[1]
        if early_check is not None and early_check.at_tokens < budget and params.num_beams == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_EarlyStop(self, width, params, early_check)])
        if harvest:
            kwargs["return_dict_in_generate"] = True
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        if harvest:
            self._harvest(encoded, width, generated_cache(out))
            out = out.sequences
        return self._texts(out[:, width:], params)

    def _texts(self, new_tokens, params: GenerationParams) -> list[str]:
        """Generated token rows as answer texts: special tokens dropped, cut at stop strings, stripped."""
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, params.stop).strip() for t in texts]

    def stream(self, prompt: str, images: Sequence[Image.Image], params: GenerationParams = GenerationParams(),
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated (stop strings honoured). ``should_stop`` (e.g. "the client
        disconnected") is polled at every decoding step and ends generation early."""
        return self.stream_encoded(self.encode(prompt, images), params, should_stop)

    def stream_encoded(self, encoded: Encoded, params: GenerationParams = GenerationParams(),
                       should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """:meth:`stream` for a prompt encoded already (e.g. by a fit check)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        inputs, harvest = self._generation_inputs([encoded], params.num_beams, harvest=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        kwargs = {**inputs, **self._generate_kwargs(params, self._budget([encoded], params)), "streamer": streamer}
        cancelled = threading.Event()  # set when the consumer stops reading (stop string, abandoned generator)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                stop = cancelled.is_set() or (should_stop is not None and bool(should_stop()))
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        if harvest:
            kwargs["return_dict_in_generate"] = True
        width = inputs["input_ids"].shape[1]
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    out = self.model.generate(**kwargs)
                if harvest:
                    self._harvest([encoded], width, generated_cache(out))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        emitted = 0
        try:
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
        finally:  # never leave the model generating for nobody
            cancelled.set()
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
        logp = self.first_token_logprobs(encoded)
        margin = torch.logsumexp(logp[:, yes], dim=-1) - torch.logsumexp(logp[:, no], dim=-1)
        return torch.sigmoid(margin).tolist()

    def first_token_logprobs(self, encoded: Sequence[Encoded]):
        """Log-probabilities ([n, vocab], float32) of the first answer token of each prompt: one forward pass per
        batch, no decoding, cached prefixes reused. Every first-token score of the engine comes from here."""
        import torch

        inputs = self._inputs(encoded)
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them: padding does not shift
        if self._cache_kw in inputs:
            past = inputs[self._cache_kw].get_seq_length()
            inputs["input_ids"] = inputs["input_ids"][:, past:]
            positions = positions[:, past:]
        with torch.inference_mode():
            logits = self.model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
        return torch.log_softmax(logits, dim=-1)

    def first_token_choices(self, encoded: Encoded, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        """The first answer token of ``answer`` (or the greedy one) and the ``top_n`` best alternatives the model
        may generate, with their log-probabilities (OpenAI's ``logprobs``)."""
        logp = self.first_token_logprobs([encoded])[0]
        return first_token_choices(self.tokenizer, logp, self.loaded.suppress_token_ids, top_n, answer, greedy)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as an answer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def _prefix_key(e: Encoded) -> tuple:
    """Rows with equal keys share a prefix: same tokens, same image objects, same preprocessing (a cropped image's
    prefix is not a padded one's)."""
    return tuple(e.input_ids[:e.prefix_len]), tuple(map(id, e.images)), e.aspect_ratio


class _EarlyStop:
    """Stopping criterion that runs an :class:`EarlyCheck` once, when the batch has ``at_tokens`` new tokens."""

    def __init__(self, engine: LlavaEngine, prompt_width: int, params: GenerationParams, early_check: EarlyCheck):
        self.engine, self.width, self.params, self.early = engine, prompt_width, params, early_check

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] - self.width != self.early.at_tokens:
            return stop
        new = input_ids[:, self.width:]
        finished = (new == self.engine.tokenizer.eos_token_id).any(dim=1).tolist()
        rows = [r for r, done in enumerate(finished) if not done]
        if rows:
            texts = self.engine._texts(new[rows], self.params)
            for r, flag in zip(rows, self.early.check(rows, texts), strict=True):
                stop[r] = bool(flag)
        return stop
