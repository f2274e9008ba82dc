"""What a metric is to the tools: a ``MetricHook`` (the metrics of one answer file, and their text form). Each metric
module builds its ``HOOK``; ``llava.eval.metrics.registry`` lists them by the names benchmark specs use."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llava.errors import InvalidRequestError

__all__ = ["MetricHook", "need"]


@dataclass(frozen=True)
class MetricHook:
    """compute: (answer file, judgments or grades or None, ground truth or None) -> the metrics dict (what
    ``--json`` prints). text: that dict -> the lines of the plain-text report. usage: what it computes and the
    files it reads, as flags (for ``--help``)."""

    compute: Callable[[Path, Path | None, Path | None], dict[str, Any]]
    text: Callable[[dict[str, Any]], list[str]]
    usage: str


def need(value: Any, flag: str, benchmark: str) -> Any:
    """``value``, or an error saying the benchmark's metric needs ``flag``."""
    if not value:
        raise InvalidRequestError(f"{benchmark} needs {flag}" + (" (or answer rows that carry it in meta)"
                                                                if flag == "--ground-truth" else ""))
    return value
