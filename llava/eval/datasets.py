"""Benchmark data layer: the readers of every registered benchmark yield ``Sample``s. The readers live in
``llava.eval.benchmarks`` (one module per benchmark); this module is the public entry point and a small CLI that
checks a data layout before a model run::

    python -m llava.eval.datasets --benchmark mme --question-file llava_mme.jsonl \\
        --image-folder MME_Benchmark_release_version --gt-file llava_mme_gt.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

from llava.eval.benchmarks import (BENCHMARKS, BenchmarkConfig, BenchmarkSpec, DataLayout, DatasetError, Grading,
                                   JudgeProtocol, MissingImageError, Sample, ScriptFlags, SeedScript,
                                   SubmissionFormat, add_benchmark_arguments, answer_fields, benchmark_names,
                                   check_images, config_from_args, get_benchmark, iter_samples, load_samples,
                                   summarize_missing)
from llava.eval.benchmarks import __all__ as _BENCHMARKS_API

__all__ = [*_BENCHMARKS_API, "main"]  # the benchmarks package's API, re-exported

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.eval.datasets",
        description="Read a benchmark the way the generation runner will, check that every image file exists, and "
                    "print a JSON summary (sample count, missing images, the first sample). Exit status 1 when "
                    "images are missing.")
    add_benchmark_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    samples = load_samples(args.benchmark, config)
    ok, missing = check_images(samples, strict=config.strict)
    first = answer_fields(samples[0]) if samples else None
    summary = {"benchmark": args.benchmark, "samples": len(samples), "with_image_ok": len(ok),
               "missing_images": len(missing),
               "image_kinds": dict(Counter(type(s.image).__name__ for s in samples)), "first": first}
    sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return 1 if missing else 0  # check_images has listed the missing images (the first few, then a count)


if __name__ == "__main__":
    sys.exit(main())
