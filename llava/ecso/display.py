"""How a run is shown to people (``run_llava``'s summary line, the terminal chat, the demo): the verdict as it was
reached, which answer is final, a random-weight model named as such, and text without control characters."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["RANDOM_WEIGHTS_NOTE", "printable", "verdict_line", "final_line", "run_summary"]

RANDOM_WEIGHTS_NOTE = "random-weight model: its text is random"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls, line breaks and tabs kept


def printable(text: str | None) -> str:
    """``text`` without control characters (a random-weight model emits them; a terminal would act on them)."""
    return _CONTROL.sub("", text or "")


def verdict_line(flagged: bool, score: float | None, mode: str | None, threshold: float | None = None,
                 text: str | None = None, fallback: str | None = None) -> str:
    """One line saying how the verdict was reached: ``P(yes) 0.524 < threshold 0.5: not flagged`` for a score,
    ``parse verdict on the model's answer 'Yes': flagged`` for a read answer, then the fallback, if any."""
    outcome = "flagged" if flagged else "not flagged"
    if mode == "skipped":
        line = f"not checked (the answer matches --skip-check-regex): {outcome}"
    elif score is not None and threshold is not None:
        above = score >= threshold
        line = f"P(yes) {score:.3f} {'>=' if above else '<'} threshold {threshold:g}: {outcome}"
        if above != flagged:
            line += " (verdict forced)"
    elif score is not None:
        line = f"P(yes) {score:.3f}: {outcome}"
    else:
        answer = printable(text).strip()
        line = f"{mode or 'the'} verdict on the model's answer {answer!r}: {outcome}"
    if fallback:
        line += f" ({mode} instead of the configured verdict: {fallback})"
    return line


def final_line(flagged: bool, image_in_safe_step: bool = False, has_image: bool = True) -> str:
    """Which answer is final (``the direct answer (step 1)``), and how the safe answer was made."""
    if not flagged:
        return "the direct answer (step 1)"
    if not has_image:
        return "the safe answer (step 4; there was no image to leave out)"
    how = "with the image" if image_in_safe_step else "without the image"
    return f"the safe answer (step 4, from the query-aware caption, {how})"


def run_summary(result: Mapping[str, Any], has_image: bool = True) -> str:
    """One line for an ECSO result (``ECSOResult.to_dict()``): verdict, final answer, and a random-weight model."""
    options = result.get("options") or {}
    threshold = options.get("threshold") if result.get("verdict_mode") == "score" else None
    line = "ECSO: " + verdict_line(bool(result["flagged"]), result.get("harm_score"), result.get("verdict_mode"),
                                   threshold, result.get("verdict_text"), result.get("verdict_fallback"))
    line += "; final answer: " + final_line(bool(result["flagged"]), bool(options.get("image_in_safe_step")), has_image)
    if options.get("tiny_random_weights"):
        line += f" [{RANDOM_WEIGHTS_NOTE}]"
    return line
