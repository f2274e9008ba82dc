"""What a tokenizer says about a first answer token: which ids spell "yes"/"no", a token's text, and the chosen
token with its best alternatives from a row of log-probabilities (computed by
:meth:`llava.model.engine.LlavaEngine.first_token_logprobs`, the one place that runs the forward pass)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llava.errors import UnsupportedError
from llava.generation import FirstTokenLogprobs, ScoredToken
from llava.model.yes_no import NO_WORDS, YES_WORDS, single_token_ids

__all__ = ["yes_no_token_ids", "token_text", "first_token_choices"]


def yes_no_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of tokens that begin an answer "yes" / "no" (any case, with or without SentencePiece's ``▁``),
    keeping only single tokens that spell the whole word (:func:`llava.model.yes_no.single_token_ids`)."""
    yes, no = single_token_ids(tokenizer, YES_WORDS), single_token_ids(tokenizer, NO_WORDS)
    if not yes or not no:
        raise UnsupportedError("the tokenizer has no single-token 'yes'/'no': use --verdict exact or parse")
    return yes, no


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text; a SentencePiece word start keeps its leading space (``decode`` alone drops it)."""
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if piece.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


def first_token_choices(tokenizer: Any, logp: Any, banned: Sequence[int], top_n: int, answer: str,
                        greedy: bool) -> FirstTokenLogprobs:
    """From ``logp`` (one row of first-token log-probabilities, a tensor): the chosen token (the best allowed one
    when decoding is greedy, else the first token of ``answer``; end of text for an empty answer) and the
    ``top_n`` best allowed alternatives. ``banned``: ids the model never generates."""
    import torch

    allowed = logp.clone()
    allowed[[t for t in banned if t < allowed.numel()]] = float("-inf")
    if greedy or not answer:
        chosen = int(allowed.argmax()) if greedy or answer else int(tokenizer.eos_token_id)
    else:
        chosen = tokenizer(answer, add_special_tokens=False).input_ids[0]
    k = min(top_n, int(torch.isfinite(allowed).sum()))
    top = torch.topk(allowed, k) if k else None
    alternatives = tuple(ScoredToken(token_text(tokenizer, int(i)), float(v))
                         for v, i in zip(top.values, top.indices)) if top is not None else ()
    return FirstTokenLogprobs(ScoredToken(token_text(tokenizer, chosen), float(logp[chosen])), alternatives)
