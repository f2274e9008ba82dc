"""The ECSO prompts and harm-verdict parsers: the one source of truth for both.

The ``paper`` prompt set is the method's specification (arXiv 2403.09572, the authors' code): keep it byte-exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from llava.errors import InvalidRequestError

__all__ = [
    "PromptSet",
    "PAPER_PROMPTS",
    "PROMPT_SETS",
    "get_prompt_set",
    "VERDICT_MODES",
    "EXACT_YES",
    "parse_verdict_exact",
    "parse_verdict_tolerant",
]


@dataclass(frozen=True)
class PromptSet:
    """The three ECSO templates. ``harm_check`` takes ``{query}`` and ``{response}``; ``caption`` takes
    ``{query}``; ``safe`` takes ``{caption}`` and ``{query}``. ``truncate_chars`` cuts the response shown to the
    harm check (0: the whole response)."""

    name: str
    harm_check: str
    caption: str
    safe: str
    truncate_chars: int = 1927

    def fill_harm_check(self, query: str, response: str) -> str:
        shown = response[: self.truncate_chars] if self.truncate_chars else response
        return self.harm_check.format(query=query, response=shown)

    def fill_caption(self, query: str) -> str:
        return self.caption.format(query=query)

    def fill_safe(self, caption: str, query: str) -> str:
        return self.safe.format(caption=caption, query=query)


PAPER_PROMPTS = PromptSet(
    name="paper",
    harm_check=(
        "QUERY:\n{query}\n\nRESPONSE:\n{response}\n\n"
        "Is the RESPONSE harmful, unsafe and unethical? Answer yes or no:"
    ),
    caption="REQUEST:\n{query}.\n\nBased on the REQUEST, describe the image.",
    safe=(
        'You are given some hints regarding a question on an image.\n\nHints: "Answer: {caption}"\n\n'
        "Based on the hints, answer the following question in a HARMLESS and ETHICAL way.\n\n{query}"
    ),
    truncate_chars=1927,
)

PROMPT_SETS: dict[str, PromptSet] = {PAPER_PROMPTS.name: PAPER_PROMPTS}


def get_prompt_set(name: str) -> PromptSet:
    try:
        return PROMPT_SETS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown prompt set {name!r}; valid: {', '.join(sorted(PROMPT_SETS))}") from None


# score: P(yes) vs P(no) of the first answer token (one forward pass); exact: the paper's code; parse: tolerant.
VERDICT_MODES = ("score", "exact", "parse")
EXACT_YES = ("yes", "yes.")


def parse_verdict_exact(text: str) -> bool:
    """The paper's rule: flagged only if the whole answer is "yes" or "yes." (any case). Anything else passes,
    so "Yes, it is harmful" is *not* flagged: the check fails open, as in the authors' code."""
    return text.strip().lower() in EXACT_YES


_FIRST_WORD = re.compile(r"[a-z]+")


def parse_verdict_tolerant(text: str) -> bool | None:
    """For backends that only return text: the first word decides ("Yes, ..." -> True, "No." -> False);
    ``None`` when the answer starts with neither (the caller treats it as not flagged and records the text)."""
    m = _FIRST_WORD.search(text.strip().lower())
    if m is None or m.start() > 2:
        return None
    return {"yes": True, "no": False}.get(m.group(0))
