"""Typed generation settings shared by every backend (torch-free)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from llava.errors import InvalidRequestError

__all__ = ["GenerationParams", "EarlyCheck", "MAX_NEW_TOKENS_LIMIT", "ScoredToken", "FirstTokenLogprobs"]

MAX_NEW_TOKENS_LIMIT = 8192


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. ``temperature == 0`` means greedy (LLaVA's convention); ``stop`` strings end the text."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_new_tokens: int = 0  # generate at least this many tokens (benchmarks fix answer lengths with it)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidRequestError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], "
                                      f"got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or not 0 <= self.temperature <= 10:
            raise InvalidRequestError(f"temperature must be in [0, 10], got {self.temperature!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequestError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not isinstance(self.num_beams, int) or not 1 <= self.num_beams <= 16:
            raise InvalidRequestError(f"num_beams must be an integer in [1, 16], got {self.num_beams!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1

    def with_max_new_tokens(self, n: int) -> "GenerationParams":
        return replace(self, max_new_tokens=n)


@dataclass(frozen=True)
class EarlyCheck:
    """A look at partial answers, once, after ``at_tokens`` new tokens: ``check(rows, texts)`` gets the rows still
    generating (indices into the batch) with their text so far and returns, per row, whether to stop it there."""

    at_tokens: int
    check: Callable[[list[int], list[str]], list[bool]]

    def __post_init__(self) -> None:
        if not isinstance(self.at_tokens, int) or self.at_tokens < 1:
            raise InvalidRequestError(f"an early check needs at_tokens >= 1, got {self.at_tokens!r}")


@dataclass(frozen=True)
class ScoredToken:
    """A token as text (a word-start token's leading space included) and its log-probability."""

    token: str
    logprob: float


@dataclass(frozen=True)
class FirstTokenLogprobs:
    """The first answer token's log-probability and its best alternatives (most likely first), as OpenAI's
    ``logprobs`` report them."""

    chosen: ScoredToken
    alternatives: tuple[ScoredToken, ...] = ()


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut ``text`` at the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]
