"""ECSO answer rows -> SFT rows in LLaVA's conversation format.

A flagged row (``unsafe == "Yes"``) becomes a sample whose answer is ECSO's safe answer (step 4, written without
the image); a benign row is kept, with its direct answer, only when drawn into the ``keep_benign_ratio`` share (a
seeded draw over the benign ids, so a rerun keeps the same ones). Rows keep the answer file's order::

    {"id": "...", "image": "<relative to the image folder>",
     "conversations": [{"from": "human", "value": "<image>\\n<query>"}, {"from": "gpt", "value": "<answer>"}]}

A text-only sample has no ``image`` and no ``<image>`` tag.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.errors import InvalidRequestError
from llava.eval.metrics.stats import Rate, flag_rate

__all__ = ["SAFE", "BENIGN", "SFTCounts", "conversation_row", "select_rows"]

logger = logging.getLogger(__name__)
SAFE, BENIGN = "safe", "benign"  # where a row's answer comes from: ECSO's safe answer, or the direct answer


@dataclass
class SFTCounts:
    """answered: ECSO rows read; flagged/benign: by the self-check; safe_rows/benign_rows: SFT rows written of each
    kind; empty: rows left out because their answer was empty; ids: the SFT rows' ids by kind."""

    answered: int = 0
    flagged: int = 0
    benign: int = 0
    safe_rows: int = 0
    benign_rows: int = 0
    empty: int = 0
    ids: dict[str, list[str]] = field(default_factory=lambda: {SAFE: [], BENIGN: []})

    @property
    def rows(self) -> int:
        return self.safe_rows + self.benign_rows

    def to_dict(self, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
        rate = flag_rate(rows) or Rate(0, 0)
        return {"answered": self.answered, "flagged": self.flagged, "benign": self.benign,
                "sft_rows": self.rows, "safe_rows": self.safe_rows, "benign_rows": self.benign_rows,
                "dropped_empty_answer": self.empty, "flag_rate": rate.to_dict()}


def conversation_row(sample_id: str, image: str | None, query: str, answer: str) -> dict[str, Any]:
    """One single-turn sample in LLaVA's format (the image tag in front of the query, as LLaVA's data has it)."""
    row: dict[str, Any] = {"id": sample_id}
    if image is not None:
        row["image"] = image
    human = f"{DEFAULT_IMAGE_TOKEN}\n{query}" if image is not None else query
    row["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return row


def _benign_kept(ids: list[str], ratio: float, seed: int) -> set[str]:
    if not 0.0 <= ratio <= 1.0:
        raise InvalidRequestError(f"keep_benign_ratio must be in [0, 1], got {ratio}")
    count = round(ratio * len(ids))
    return set(random.Random(seed).sample(sorted(ids), count))


def select_rows(rows: list[dict[str, Any]], keep_benign_ratio: float = 0.0,
                seed: int = 0) -> tuple[list[dict[str, Any]], SFTCounts]:
    """The SFT rows of ECSO answer ``rows`` (see the module docstring) and what was kept."""
    counts = SFTCounts(answered=len(rows))
    for row in rows:
        if row.get("method") != "ecso" or row.get("unsafe") not in ("Yes", "No"):
            raise InvalidRequestError(f"row {row.get('id')!r} is not an ECSO answer (method {row.get('method')!r}, "
                                      f"unsafe {row.get('unsafe')!r}); SFT data is made from ECSO runs")
    benign_ids = [str(r["id"]) for r in rows if r["unsafe"] == "No"]
    kept = _benign_kept(benign_ids, keep_benign_ratio, seed)
    out = []
    for row in rows:
        key = str(row["id"])
        if row["unsafe"] == "Yes":
            counts.flagged += 1
            answer, kind = (row.get("text") or "").strip(), SAFE
        else:
            counts.benign += 1
            if key not in kept:
                continue
            answer, kind = (row.get("direct") or row.get("text") or "").strip(), BENIGN
        if not answer:
            counts.empty += 1
            logger.warning("sample %s: its %s answer is empty; left out", key, kind)
            continue
        out.append(conversation_row(key, row.get("image"), row["query"], answer))
        counts.ids[kind].append(key)
    counts.safe_rows, counts.benign_rows = len(counts.ids[SAFE]), len(counts.ids[BENIGN])
    return out, counts
