"""How a tokenizer spells "yes" and "no", and the harm score read from a model's probabilities of those spellings.

Two ways, chosen once per tokenizer by :meth:`YesNoVariants.of`:

* **first token** (every tokenizer with single-token spellings of both words: LLaVA-1.5's Llama tokenizer, and the
  Mistral, Qwen, Gemma and SmolVLM tokenizers): the ids of the single tokens that spell the whole word (any case,
  with or without a leading space marker); the score is P(yes) / (P(yes) + P(no)) over the first answer token, one
  forward pass with no decoding. A spelling that takes several tokens is left out where single-token ones exist
  (that is LLaVA-1.5's exact score, pinned by tests).
* **sequences** (tokenizers without a single-token "yes" or "no"): the full token sequences of the variants
  ``yes``/``Yes``/``YES`` and ``no``/``No``/``NO``, with and without a leading space; each variant's log-probability
  is the sum of its tokens' log-probabilities after the prompt (one batched forward pass over the prompt + variant
  rows), and the score is sum over yes-variants / sum over all variants.

Where neither works (a tokenizer that cannot spell the words apart) :meth:`YesNoVariants.of` raises
:class:`~llava.errors.UnsupportedError`, and ECSO falls back, visibly, to the parsed verdict.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llava.errors import UnsupportedError

__all__ = ["YES_WORDS", "NO_WORDS", "YesNoVariants", "single_token_ids", "margin_from_first_token",
           "margin_from_sequences"]

YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")
_SPACE_MARKERS = ("▁", "Ġ", " ")


def single_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Ids of single tokens that spell one of ``words`` whole (with or without SentencePiece's ``▁`` or GPT-2's
    ``Ġ``); a tokenizer that splits the word contributes nothing."""
    found: set[int] = set()
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(ids)
        while pieces and pieces[0] in _SPACE_MARKERS:
            ids, pieces = ids[1:], pieces[1:]
        if len(ids) == 1:
            found.add(ids[0])
        for variant in (w, "▁" + w, "Ġ" + w):
            tid = tokenizer.convert_tokens_to_ids(variant)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                found.add(tid)
    return sorted(found)


def _sequences(tokenizer: Any, words: Sequence[str]) -> list[tuple[int, ...]]:
    """The distinct token sequences of each word, with and without a leading space, as an answer spells them."""
    unk = tokenizer.unk_token_id
    found: list[tuple[int, ...]] = []
    for w in words:
        for text in (w, " " + w):
            ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
            if ids and (unk is None or unk not in ids) and ids not in found:
                found.append(ids)
    return found


@dataclass(frozen=True)
class YesNoVariants:
    """The spellings of "yes" and "no" a score is read from: ``yes_ids``/``no_ids`` (single tokens, mode
    ``first_token``) or ``yes_seqs``/``no_seqs`` (token sequences, mode ``sequences``)."""

    mode: str  # "first_token" or "sequences"
    yes_ids: tuple[int, ...] = ()
    no_ids: tuple[int, ...] = ()
    yes_seqs: tuple[tuple[int, ...], ...] = ()
    no_seqs: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, tokenizer: Any) -> YesNoVariants:
        yes, no = single_token_ids(tokenizer, YES_WORDS), single_token_ids(tokenizer, NO_WORDS)
        if yes and no:
            return cls("first_token", tuple(yes), tuple(no))
        yes_seqs, no_seqs = _sequences(tokenizer, YES_WORDS), _sequences(tokenizer, NO_WORDS)
        if not yes_seqs or not no_seqs or set(yes_seqs) & set(no_seqs):
            raise UnsupportedError("the tokenizer cannot spell 'yes' and 'no' apart (no single tokens, and their "
                                   "token sequences are missing or shared): use --verdict exact or parse")
        return cls("sequences", yes_seqs=tuple(yes_seqs), no_seqs=tuple(no_seqs))

    @property
    def sequences(self) -> tuple[tuple[int, ...], ...]:
        """Every variant sequence, yes-variants first."""
        return self.yes_seqs + self.no_seqs

    def describe(self) -> str:
        if self.mode == "first_token":
            return f"first token ({len(self.yes_ids)} yes / {len(self.no_ids)} no token ids)"
        return f"sequences ({len(self.yes_seqs)} yes / {len(self.no_seqs)} no variants, summed log-probabilities)"


def margin_from_first_token(logp: Any, variants: YesNoVariants) -> Any:
    """log P(yes) - log P(no) per row of first-token log-probabilities ``[n, vocab]``."""
    import torch

    yes, no = list(variants.yes_ids), list(variants.no_ids)
    return torch.logsumexp(logp[:, yes], dim=-1) - torch.logsumexp(logp[:, no], dim=-1)


def margin_from_sequences(seq_logp: Any, variants: YesNoVariants) -> Any:
    """log P(yes) - log P(no) per row of variant log-probabilities ``[n, len(variants.sequences)]`` (yes-variants
    first, as :attr:`YesNoVariants.sequences`)."""
    import torch

    n_yes = len(variants.yes_seqs)
    return torch.logsumexp(seq_logp[:, :n_yes], dim=-1) - torch.logsumexp(seq_logp[:, n_yes:], dim=-1)
