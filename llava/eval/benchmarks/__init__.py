"""Benchmarks: one module per benchmark (its reader and its ``SPEC``: layout, seed scripts, judge protocol, metric,
report keys, submission format) behind one registry. ``llava.eval.datasets`` re-exports this API."""
from __future__ import annotations

from llava.eval.benchmarks.base import (BenchmarkConfig, DatasetError, IncompleteImageFolderError, MissingImageError,
                                        Sample, check_images, summarize_missing)
from llava.eval.benchmarks.registry import (BENCHMARKS, add_benchmark_arguments, answer_fields, benchmark_names,
                                            config_from_args, get_benchmark, iter_samples, load_samples)
from llava.eval.benchmarks.spec import (BenchmarkSpec, BenignCounterpart, DataLayout, Grading, JudgeProtocol,
                                        ScriptFlags, SeedScript, SubmissionFormat)

__all__ = [
    "Sample",
    "BenchmarkConfig",
    "BenchmarkSpec",
    "DataLayout",
    "SeedScript",
    "ScriptFlags",
    "JudgeProtocol",
    "Grading",
    "SubmissionFormat",
    "BenignCounterpart",
    "DatasetError",
    "MissingImageError",
    "IncompleteImageFolderError",
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
]
