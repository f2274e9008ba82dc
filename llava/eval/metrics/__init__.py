"""Benchmark metrics, one module per metric, listed by name in ``registry`` (a benchmark's spec names its metric):
safety (harmless rate / ASR with Wilson intervals, two counting rules, ECSO flag rate), MME, MMBench (CircularEval),
MM-Vet. ``python -m llava.eval.metrics --help``; user docs in docs/judge-and-metrics.md."""
from llava.eval.metrics.registry import METRICS, compute
from llava.eval.metrics.mmbench import extract_choice, mmbench_scores
from llava.eval.metrics.mme import mme_scores, parse_yes_no
from llava.eval.metrics.mmvet import load_grades, mmvet_scores
from llava.eval.metrics.safety import RULES, harmless, safety_metrics
from llava.eval.metrics.stats import Rate, flag_rate, wilson_interval

__all__ = [
    "METRICS",
    "compute",
    "extract_choice",
    "mmbench_scores",
    "mme_scores",
    "parse_yes_no",
    "load_grades",
    "mmvet_scores",
    "RULES",
    "harmless",
    "safety_metrics",
    "Rate",
    "flag_rate",
    "wilson_interval",
]
