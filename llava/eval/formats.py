"""Answer files (docs/answer-format.md) -> the official submission formats. Each benchmark with one declares it in
its spec (``BenchmarkSpec.submission``: the flags it needs and the writer); ``python -m llava.eval.formats --help``
lists them::

    python -m llava.eval.formats mme --answers answers.jsonl --gt-file llava_mme_gt.jsonl --out mme_results/
    python -m llava.eval.formats mmbench --answers answers.jsonl --question-file mmbench_dev_20230712.tsv --out sub.xlsx
    python -m llava.eval.formats mmvet --answers answers.jsonl --out mmvet_results.json
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from llava.errors import ECSOError
from llava.eval.benchmarks import benchmark_names, get_benchmark
from llava.eval.jsonl import DatasetError, read_jsonl

__all__ = ["read_answers", "build_parser", "main"]

logger = logging.getLogger(__name__)


def read_answers(paths: Iterable[str | Path], benchmark: str | None = None) -> list[dict[str, Any]]:
    """Answer rows from one or more files (shards), in file order; a repeated id keeps its last row. Rows of another
    benchmark (their ``benchmark`` field says so) or without ``text`` raise DatasetError."""
    by_id: dict[str, dict[str, Any]] = {}
    repeats = 0
    for path in paths:
        for n, row in enumerate(read_jsonl(path, "answer file"), 1):
            if "text" not in row:
                raise DatasetError(f"{path}: row {n} has no 'text' field (has {sorted(row)})")
            if benchmark and row.get("benchmark", benchmark) != benchmark:
                raise DatasetError(f"{path}: row {n} is a {row['benchmark']!r} answer, expected {benchmark!r}")
            key = str(row.get("id", f"{path}:{n}"))
            repeats += key in by_id
            by_id.pop(key, None)
            by_id[key] = row
    if repeats:
        logger.warning("%d answer rows repeat an earlier id; the last one of each was kept", repeats)
    return list(by_id.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.formats",
                                     description="Convert answer files to official submission formats.")
    names = benchmark_names(has="submission")
    sub = parser.add_subparsers(dest="format", required=True, metavar="{" + ",".join(names) + "}")
    for name in names:
        fmt = get_benchmark(name).submission
        p = sub.add_parser(name, help=fmt.summary, description=fmt.summary)
        p.add_argument("--answers", nargs="+", required=True,
                       help="answer file(s) from llava.eval.generate (shards may be listed together)")
        fmt.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        logger.info("%s", get_benchmark(args.format).submission.write(read_answers(args.answers, args.format), args))
    except (ECSOError, OSError) as e:  # bad or missing input: one line naming it, no traceback
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
