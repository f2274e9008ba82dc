"""``python -m llava.eval.metrics``: print a benchmark's metrics (``--json``: one JSON object). What is computed, and
from which files, is the benchmark's metric (its spec's ``metric``, looked up in ``llava.eval.metrics.registry``).
Answer rows written by ``llava.eval.generate`` carry the ground truth a reader found in ``meta``; a --ground-truth
file, when given, is used instead."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llava.errors import InvalidRequestError
from llava.eval.benchmarks import benchmark_names
from llava.eval.metrics.registry import compute, format_text, metric_for

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    usage = "\n".join(f"  {name:14} {metric_for(name).usage}" for name in benchmark_names())
    p = argparse.ArgumentParser(prog="python -m llava.eval.metrics", description=f"{__doc__}\n\n{usage}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=benchmark_names(), required=True, help="which benchmark's metrics")
    p.add_argument("--answers", type=Path, required=True, help="answer file (see above for the benchmark's forms)")
    p.add_argument("--judgments", type=Path, default=None, help="judge output (judgments or grades; see above)")
    p.add_argument("--ground-truth", type=Path, default=None, help="the benchmark's ground truth (see above)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = compute(args.benchmark, args.answers, args.judgments, args.ground_truth)
    except (InvalidRequestError, OSError, ValueError, KeyError) as e:
        logger.error("%s", e)
        return 2
    print(json.dumps(metrics, ensure_ascii=False) if args.json else format_text(args.benchmark, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
