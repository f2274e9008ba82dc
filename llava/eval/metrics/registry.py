"""Metrics by name. A benchmark's spec names its metric (``BenchmarkSpec.metric``); this table maps the name to the
hook that computes it, so the metrics CLI and the report dispatch on the spec, never on a benchmark's name. A new
metric: a module with its ``HOOK`` (``llava.eval.metrics.hook``), listed here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llava.errors import InvalidRequestError
from llava.eval.benchmarks import get_benchmark
from llava.eval.metrics.hook import MetricHook
from llava.eval.metrics.mmbench import HOOK as MMBENCH
from llava.eval.metrics.mme import HOOK as MME
from llava.eval.metrics.mmvet import HOOK as MMVET
from llava.eval.metrics.refusal import HOOK as REFUSAL
from llava.eval.metrics.safety import HOOK as SAFETY
from llava.eval.metrics.stats import rate_text

__all__ = ["METRICS", "metric_for", "compute", "format_text"]

METRICS: dict[str, MetricHook] = {"safety": SAFETY, "refusal": REFUSAL, "mme": MME, "mmbench": MMBENCH,
                                  "mmvet": MMVET}


def metric_for(benchmark: str) -> MetricHook:
    """The metric hook of a registered benchmark."""
    name = get_benchmark(benchmark).metric
    try:
        return METRICS[name]
    except KeyError:
        raise InvalidRequestError(f"benchmark {benchmark!r} names metric {name!r}; known metrics: "
                                  f"{', '.join(METRICS)}") from None


def compute(benchmark: str, answers: Path, judgments: Path | None = None, ground_truth: Path | None = None) -> dict:
    """The metrics dict of one answer file (what ``--json`` prints)."""
    return metric_for(benchmark).compute(answers, judgments, ground_truth)


def format_text(benchmark: str, m: dict[str, Any]) -> str:
    lines = metric_for(benchmark).text(m)
    if m.get("false_alarm_rate"):
        lines.append(f"ECSO false-alarm (flag) rate {rate_text(m['false_alarm_rate'])}")
    return "\n".join(lines)
