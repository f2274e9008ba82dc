"""Benchmark readers (one module per benchmark) behind one registry. ``llava.eval.datasets`` re-exports this API."""
from __future__ import annotations

from llava.eval.benchmarks.base import (BenchmarkConfig, BenchmarkSpec, DatasetError, MissingImageError, Sample,
                                        check_images, summarize_missing)
from llava.eval.benchmarks.mmbench import MMBENCH_PROMPT_SUFFIX, build_mmbench_query
from llava.eval.benchmarks.mme import MMEGroundTruth
from llava.eval.benchmarks.mmsafetybench import MODES as MMSAFETYBENCH_MODES
from llava.eval.benchmarks.mmsafetybench import QUERY_FIELD_BY_MODE
from llava.eval.benchmarks.registry import (BENCHMARKS, add_benchmark_arguments, answer_fields, benchmark_names,
                                            config_from_args, get_benchmark, iter_samples, load_samples)

__all__ = [
    "Sample",
    "BenchmarkConfig",
    "BenchmarkSpec",
    "DatasetError",
    "MissingImageError",
    "BENCHMARKS",
    "benchmark_names",
    "get_benchmark",
    "iter_samples",
    "load_samples",
    "check_images",
    "summarize_missing",
    "answer_fields",
    "add_benchmark_arguments",
    "config_from_args",
    "MMBENCH_PROMPT_SUFFIX",
    "build_mmbench_query",
    "MMEGroundTruth",
    "MMSAFETYBENCH_MODES",
    "QUERY_FIELD_BY_MODE",
]
