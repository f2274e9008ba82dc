"""What every generation engine shares, whatever renders and encodes its prompts: batched and streamed generation
with left padding, prefix KV reuse across ECSO's steps, the one-pass yes/no score and first-token log-probabilities.

:class:`GenerationEngine` works on encoded rows (:class:`EncodedRow`: token ids with image placeholders expanded,
the images, the length of the reusable prefix). Its subclasses say how a prompt becomes such a row and how rows
become model inputs: :class:`llava.model.engine.LlavaEngine` (LLaVA-1.5: LLaVA's templates,
``tokenizer_image_token``, pad preprocessing) and :class:`llava.model.vlm_engine.VLMEngine` (any other
transformers vision-language model: its processor's chat template and image preprocessing).
"""
from __future__ import annotations

import abc
import inspect
import threading
from typing import Any, Callable, Iterator, Protocol, Sequence

from llava.errors import ContextLengthError, UnsupportedError
from llava.generation import EarlyCheck, FirstTokenLogprobs, GenerationParams, truncate_at_stop
from llava.model.first_token import first_token_choices
from llava.model.prefix_cache import (DEFAULT_CACHE_BYTES, PrefixEntry, PrefixStore, cache_around, generated_cache,
                                      image_keys)
from llava.model.yes_no import YesNoVariants, margin_from_first_token, margin_from_sequences

__all__ = ["EncodedRow", "GenerationEngine"]


class EncodedRow(Protocol):
    """One prompt ready for the model: token ids (image placeholders expanded), its images, and the length of the
    reusable prefix (up to and including the last image token; 0 without images or where reuse is off)."""

    input_ids: list[int]
    images: tuple[Any, ...]
    prefix_len: int


class GenerationEngine(abc.ABC):
    """Batched, streamed and scored generation on a loaded model (``loaded``: ``tokenizer``, ``model``, ``device``,
    ``context_len``, ``suppress_token_ids``, ``describe()``).

    ``prefix_reuse``: keep the KV cache of each sample's prefix (everything up to its last image token, see
    :mod:`llava.model.prefix_cache`) so later steps on the same image skip the image encoder and the prefix
    prefill. Results equal the plain path (greedy tokens and scores; tested). ``cache_capacity``: prefixes kept;
    ``cache_bytes``: the most bytes of tensors each cache (prefixes, pixels) holds.
    """

    positions_from_mask = True  # position ids from the attention mask (False: the model computes its own, M-RoPE)

    def __init__(self, loaded: Any, prefix_reuse: bool = True, cache_capacity: int = 32,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.prefix_reuse = prefix_reuse
        self.cache_bytes = cache_bytes
        self.prefixes = PrefixStore(cache_capacity if prefix_reuse else 0, cache_bytes)
        self._yes_no: YesNoVariants | None = None
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes.
        forward_params = inspect.signature(type(self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"

    # ---- what a subclass provides ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _batch(self, encoded: Sequence[EncodedRow]) -> dict:
        """Left-padded model inputs for whole rows (token ids, attention mask, image inputs)."""

    @abc.abstractmethod
    def _prefill_inputs(self, rows: Sequence[EncodedRow], prefix_len: int) -> dict:
        """Model inputs for the first ``prefix_len`` tokens of ``rows`` (same length, no padding) with their images."""

    @abc.abstractmethod
    def _token_kwargs(self) -> dict:
        """The ``generate`` arguments naming special tokens (padding, end of text)."""

    @abc.abstractmethod
    def _extend(self, e: EncodedRow, tokens: Sequence[int]) -> EncodedRow:
        """``e`` with ``tokens`` appended (scoring token sequences after a prompt)."""

    def eos_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def _generate_kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict:
        """``generate`` keyword arguments for ``params`` (greedy below a temperature of 1e-5)."""
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": params.num_beams,
                                  **self._token_kwargs(), "use_cache": True}
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = min(params.min_new_tokens, max_new_tokens)
        if self.loaded.suppress_token_ids:
            kwargs["suppress_tokens"] = self.loaded.suppress_token_ids
        if params.temperature > 1e-5:  # smaller ones overflow logits / temperature (NaN probabilities): greedy
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    # ---- early checks ---------------------------------------------------------------------------------------
    min_image_tokens = 0  # the fewest context tokens one image takes (0: it depends on the image)

    def fit_image(self, image: Any) -> Any:
        """``image`` reduced to what this engine's preprocessing can use (as it is by default)."""
        return image

    def check_budget(self, text_chars: int, n_images: int) -> None:
        """Refuse a request that cannot fit the context whatever its text tokenizes to: no token spans more
        characters than the longest in the vocabulary, so ``text_chars`` characters are at least
        ``text_chars / longest`` tokens. Cheap: run it before decoding images or tokenizing the text."""
        least = n_images * self.min_image_tokens + -(-max(text_chars, 0) // self._longest_token_chars())
        if least >= self.loaded.context_len:
            raise ContextLengthError(
                f"the request cannot fit the {self.loaded.context_len}-token context window: {text_chars} characters "
                f"of text are at least {least - n_images * self.min_image_tokens} tokens"
                + (f" and {n_images} image(s) take {n_images * self.min_image_tokens}" if self.min_image_tokens
                   and n_images else "") + ". Shorten the text or send fewer images")

    def _longest_token_chars(self) -> int:
        longest = getattr(self, "_longest", None)
        if longest is None:
            longest = self._longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        return longest

    def _prefix_key(self, e: EncodedRow) -> tuple:
        """Rows with equal keys share a prefix: same tokens, same images by content (an engine whose rows carry more,
        such as how their images are preprocessed, adds it)."""
        return tuple(e.input_ids[:e.prefix_len]), image_keys(e.images)

    def clear_caches(self) -> None:
        """Forget every cached prefix (benchmarks time cold runs)."""
        self.prefixes.clear()

    # ---- prefix reuse ---------------------------------------------------------------------------------------
    def _prefix_batch(self, encoded: Sequence[EncodedRow], num_beams: int = 1) -> dict | None:
        """Inputs that continue from cached prefixes: ``[pads | prefix | pads | suffix]`` per row (prefixes
        right-aligned at the longest one, suffixes at the end) with a matching mask and a batched cache of the
        prefixes (zeros where a shorter prefix is padded; masked); ``None`` when the batch does not qualify (rows
        without images, beam search)."""
        import torch

        if not self.prefix_reuse or num_beams != 1:
            return None
        if any(e.prefix_len == 0 or len(e.input_ids) <= e.prefix_len for e in encoded):
            return None
        pmax = max(e.prefix_len for e in encoded)
        entries = self._prefix_entries(encoded)
        if len(entries) == 1:  # the stored tensors themselves: the cache's updates concatenate into new ones
            layers = entries[0].layers
        else:
            layers = [(torch.cat([_left_pad(en.layers[i][0], pmax) for en in entries]),
                       torch.cat([_left_pad(en.layers[i][1], pmax) for en in entries]))
                      for i in range(len(entries[0].layers))]
        cache = cache_around(layers)
        width = pmax + max(len(e.input_ids) - e.prefix_len for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            plen, n_suffix = e.prefix_len, len(e.input_ids) - e.prefix_len
            ids[row, pmax - plen:pmax] = torch.tensor(e.input_ids[:plen])
            ids[row, width - n_suffix:] = torch.tensor(e.input_ids[plen:])
            mask[row, pmax - plen:pmax] = 1
            mask[row, width - n_suffix:] = 1
        dev = self.loaded.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), self._cache_kw: cache}

    def _prefix_entries(self, encoded: Sequence[EncodedRow]) -> list[PrefixEntry]:
        """The cached prefix of every row, prefilling the ones not cached yet (one batch per prefix length)."""
        import torch

        found = [self.prefixes.lookup(self._prefix_key(e)) for e in encoded]
        groups: dict[tuple, list[int]] = {}  # rows sharing a prefix (e.g. two steps of one sample) prefill once
        for i in (i for i, f in enumerate(found) if f is None):
            groups.setdefault(self._prefix_key(encoded[i]), []).append(i)
        by_length: dict[int, list[list[int]]] = {}
        for rows in groups.values():
            by_length.setdefault(encoded[rows[0]].prefix_len, []).append(rows)
        for plen, row_groups in by_length.items():
            inputs = self._prefill_inputs([encoded[rows[0]] for rows in row_groups], plen)
            with torch.inference_mode():
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in getattr(out, self._cache_kw).layers]
            for row, rows in enumerate(row_groups):
                entry = PrefixEntry(self._prefix_key(encoded[rows[0]]),
                                    [(k[row:row + 1], v[row:row + 1]) for k, v in layers])
                self.prefixes.add(entry)
                for i in rows:
                    found[i] = entry
        return found  # type: ignore[return-value]

    def _inputs(self, encoded: Sequence[EncodedRow], num_beams: int = 1) -> dict:
        return self._prefix_batch(encoded, num_beams) or self._batch(encoded)

    def _generation_inputs(self, encoded: Sequence[EncodedRow], num_beams: int, harvest: bool) -> tuple[dict, bool]:
        """Inputs of a generation, and whether to harvest its prefixes afterwards: a batch whose rows all have
        distinct prefixes none of which is cached yet (a sample's first step) runs in one forward pass like the
        plain path, and :meth:`_harvest` keeps the prefixes from its cache; other batches continue from cached
        prefixes (prefilling missing ones first)."""
        if harvest and self._harvestable(encoded, num_beams):
            return self._batch(encoded), True
        return self._inputs(encoded, num_beams), False

    def _harvestable(self, encoded: Sequence[EncodedRow], num_beams: int) -> bool:
        if not self.prefix_reuse or num_beams != 1 or any(e.prefix_len == 0 for e in encoded):
            return False
        if len({self._prefix_key(e) for e in encoded}) < len(encoded):  # rows sharing a prefix: prefilling it once is cheaper
            return False
        return not any(self.prefixes.has(self._prefix_key(e)) for e in encoded)

    def _harvest(self, encoded: Sequence[EncodedRow], width: int, cache: Any) -> None:
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
            self.prefixes.add(PrefixEntry(self._prefix_key(e), kv))

    def _budget(self, encoded: Sequence[EncodedRow], params: GenerationParams) -> int:
        """``max_new_tokens`` clamped to the context window, as LLaVA's worker does."""
        room = self.loaded.context_len - max(len(e.input_ids) for e in encoded)
        if room < 1:
            raise ContextLengthError(f"no room left to generate: the prompt fills the {self.loaded.context_len}-token "
                                     "context window")
        return min(params.max_new_tokens, room)

    # ---- generation -----------------------------------------------------------------------------------------
    def generate_encoded(self, encoded: Sequence[EncodedRow], params: GenerationParams,
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

    def stream_encoded(self, encoded: EncodedRow, params: GenerationParams = GenerationParams(),
                       should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Text deltas of one answer as they are generated (stop strings honoured). ``should_stop`` (e.g. "the
        client disconnected") is polled at every decoding step and ends generation early."""
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
    @property
    def yes_no(self) -> YesNoVariants:
        """How this tokenizer spells yes/no (:mod:`llava.model.yes_no`); raises where it cannot."""
        if self._yes_no is None:
            self._yes_no = YesNoVariants.of(self.tokenizer)
        return self._yes_no

    @property
    def can_score(self) -> bool:
        """Whether a yes/no score can be read (single tokens or token sequences of the two words)."""
        try:
            return self.yes_no is not None
        except UnsupportedError:
            return False

    def yes_no_scores_encoded(self, encoded: Sequence[EncodedRow]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) per prompt: from the first answer token (one forward pass per batch, no
        decoding) or, for tokenizers without single-token yes/no, from the variants' token sequences."""
        import torch

        if not encoded:
            return []
        variants = self.yes_no
        if variants.mode == "first_token":
            margin = margin_from_first_token(self.first_token_logprobs(encoded), variants)
        else:
            margin = margin_from_sequences(self.sequence_logprobs(encoded, variants.sequences), variants)
        return torch.sigmoid(margin).tolist()

    def _forward_last(self, inputs: dict, keep: int):
        """Logits ([n, keep, vocab], float32) of the last ``keep`` positions of ``inputs`` (from :meth:`_inputs`):
        one forward pass, position ids as ``generate`` computes them (padding does not shift them)."""
        import torch

        mask = inputs["attention_mask"]
        kwargs = {}
        if self.positions_from_mask:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._cache_kw in inputs:
            past = inputs[self._cache_kw].get_seq_length()
            inputs["input_ids"] = inputs["input_ids"][:, past:]
            if "position_ids" in kwargs:
                kwargs["position_ids"] = kwargs["position_ids"][:, past:]
        with torch.inference_mode():
            return self.model(**inputs, **kwargs, logits_to_keep=keep).logits[:, -keep:, :].float()

    def first_token_logprobs(self, encoded: Sequence[EncodedRow]):
        """Log-probabilities ([n, vocab], float32) of the first answer token of each prompt: one forward pass per
        batch, no decoding, cached prefixes reused. Every first-token score of the engine comes from here."""
        import torch

        logits = self._forward_last(self._inputs(encoded), 1)[:, -1, :]
        return torch.log_softmax(logits, dim=-1)

    def sequence_logprobs(self, encoded: Sequence[EncodedRow], sequences: Sequence[Sequence[int]]):
        """Log-probability ([n, len(sequences)]) of each token sequence as the start of each prompt's answer: the
        sum of its tokens' log-probabilities, from one forward pass over every prompt + sequence row."""
        import torch

        rows = [self._extend(e, s) for e in encoded for s in sequences]
        keep = max(len(s) for s in sequences) + 1
        logp = torch.log_softmax(self._forward_last(self._inputs(rows), keep), dim=-1)
        out = torch.zeros(len(encoded), len(sequences))
        for i in range(len(encoded)):
            for j, seq in enumerate(sequences):
                row = logp[i * len(sequences) + j]
                start = keep - len(seq) - 1  # the position that predicts the sequence's first token
                out[i, j] = sum(row[start + t, tok] for t, tok in enumerate(seq))
        return out

    def first_token_choices(self, encoded: EncodedRow, top_n: int, answer: str, greedy: bool) -> FirstTokenLogprobs:
        """The first answer token of ``answer`` (or the greedy one) and the ``top_n`` best alternatives the model
        may generate, with their log-probabilities (OpenAI's ``logprobs``)."""
        logp = self.first_token_logprobs([encoded])[0]
        return first_token_choices(self.tokenizer, logp, self.loaded.suppress_token_ids, top_n, answer, greedy)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as an answer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def _left_pad(kv, length: int):
    """Cached keys or values ``[1, heads, n, dim]`` padded with zeros in front to ``length`` positions."""
    import torch

    missing = length - kv.shape[-2]
    return kv if missing == 0 else torch.nn.functional.pad(kv, (0, 0, missing, 0))


class _EarlyStop:
    """Stopping criterion that runs an :class:`EarlyCheck` once, when the batch has ``at_tokens`` new tokens."""

    def __init__(self, engine: GenerationEngine, prompt_width: int, params: GenerationParams,
                 early_check: EarlyCheck):
        self.engine, self.width, self.params, self.early = engine, prompt_width, params, early_check

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] - self.width != self.early.at_tokens:
            return stop
        new = input_ids[:, self.width:]
        eos = torch.tensor(self.engine.eos_token_ids(), device=input_ids.device)
        finished = torch.isin(new, eos).any(dim=1).tolist()
        rows = [r for r, done in enumerate(finished) if not done]
        if rows:
            texts = self.engine._texts(new[rows], self.params)
            for r, flag in zip(rows, self.early.check(rows, texts), strict=True):
                stop[r] = bool(flag)
        return stop
