"""Benchmarks by name, the generic entry points over them, and the CLI flags that build a ``BenchmarkConfig``.

Adding a benchmark: write ``llava/eval/benchmarks/<name>.py`` with its reader and ``SPEC`` (see docs/architecture.md,
"Adding a benchmark"), and add its ``SPEC`` to ``BENCHMARKS`` below; every tool picks it up from here."""
from __future__ import annotations

import argparse
from typing import Any, Iterator

from llava.errors import InvalidRequestError
from llava.eval.benchmarks.base import BenchmarkConfig, Sample, iter_limited
from llava.eval.benchmarks.figstep import SPEC as FIGSTEP
from llava.eval.benchmarks.mmbench import SPEC as MMBENCH
from llava.eval.benchmarks.mme import SPEC as MME
from llava.eval.benchmarks.mmsafetybench import SPEC as MMSAFETYBENCH
from llava.eval.benchmarks.mmvet import SPEC as MMVET
from llava.eval.benchmarks.spec import BenchmarkSpec
from llava.eval.benchmarks.vlsafe import SPEC as VLSAFE
from llava.eval.benchmarks.xstest import SPEC as XSTEST

__all__ = [
    "BENCHMARKS",
    "benchmark_names",
    "get_benchmark",
    "iter_samples",
    "load_samples",
    "answer_fields",
    "add_benchmark_arguments",
    "config_from_args",
]

BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (VLSAFE, MMSAFETYBENCH, MME, MMBENCH, MMVET,
                                                                      FIGSTEP, XSTEST)}


def benchmark_names(has: str | None = None) -> list[str]:
    """Registered names, in registry order; with ``has``, only those whose spec sets that hook (e.g. ``judge``)."""
    return [name for name, spec in BENCHMARKS.items() if has is None or getattr(spec, has)]


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec registered under ``name``; an InvalidRequestError listing the valid names otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}") from None


def _validate(spec: BenchmarkSpec, config: BenchmarkConfig) -> None:
    unsupported = sorted(config.options_set() - set(spec.options))
    if unsupported:
        raise InvalidRequestError(f"benchmark {spec.name!r} does not take option(s) {', '.join(unsupported)}; "
                                  f"it takes: {', '.join(sorted(spec.options)) or 'none beyond the common ones'}")
    if config.limit is not None and config.limit < 1:
        raise InvalidRequestError(f"limit must be at least 1, got {config.limit}")


def iter_samples(name: str, config: BenchmarkConfig) -> Iterator[Sample]:
    """Samples of benchmark ``name`` in file order, filtered and limited as ``config`` says (lazy)."""
    spec = get_benchmark(name)
    _validate(spec, config)
    return iter_limited(spec.reader(config), config.limit)


def load_samples(name: str, config: BenchmarkConfig) -> list[Sample]:
    """All samples of benchmark ``name`` as a list (ids unique). Image files are not checked here: the runner
    calls ``check_images`` so that missing ones are reported, counted and skipped (or raise when strict)."""
    return list(iter_samples(name, config))


def answer_fields(sample: Sample) -> dict[str, Any]:
    """The answer-file fields a sample fixes (docs/answer-format.md): id, benchmark, image, query, the benchmark's
    id fields at top level, and the rest of ``meta`` under ``meta``. The runner adds method, text, model_id, ..."""
    id_fields = get_benchmark(sample.benchmark).id_fields
    row: dict[str, Any] = {"id": sample.id, "benchmark": sample.benchmark, "image": sample.image_name,
                           "query": sample.query}
    row.update({k: sample.meta.get(k) for k in id_fields})
    row["meta"] = {k: v for k, v in sample.meta.items() if k not in id_fields}
    return row


def _each(what: str) -> str:
    """``name: <spec's text>`` for every benchmark, from the spec attribute ``what``."""
    return "; ".join(f"{name}: {getattr(spec, what)}" for name, spec in BENCHMARKS.items())


def _option_help(option: str) -> str:
    """What a benchmark-specific option means, from the specs that take it."""
    takers = [spec for spec in BENCHMARKS.values() if option in spec.options]
    return "only for " + "; ".join(f"{spec.name}: {spec.options[option]}" for spec in takers)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that build a BenchmarkConfig (shared by the generation runner and llava.eval.datasets' CLI)."""
    group = parser.add_argument_group("benchmark data")
    group.add_argument("--benchmark", required=True, choices=benchmark_names(), help="which benchmark reader to use")
    group.add_argument("--question-file", required=True,
                       help=f"the benchmark's question file ({_each('question_file')})")
    group.add_argument("--image-folder", default="",
                       help=f"root of the images named in the question file ({_each('image_folder')}). "
                            "Default: current directory")
    modes = tuple(dict.fromkeys(mode for spec in BENCHMARKS.values() for mode in spec.modes))
    group.add_argument("--mode", default=None, choices=modes, help=_option_help("mode"))
    group.add_argument("--scenarios", default="", help=_option_help("scenarios"))
    group.add_argument("--tiny-list", default=None, help=_option_help("tiny_list"))
    group.add_argument("--gt-file", default=None, help=_option_help("gt_file"))
    group.add_argument("--limit", type=int, default=None, help="keep only the first N samples (after filters)")
    group.add_argument("--strict", action="store_true",
                       help="fail on the first missing image (or a question file without the images it should "
                            "hold) instead of reporting and skipping it")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The BenchmarkConfig that ``add_benchmark_arguments``' flags describe."""
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip()) if args.scenarios else ()
    return BenchmarkConfig(question_file=args.question_file, image_folder=args.image_folder, mode=args.mode,
                           scenarios=scenarios, tiny_list=args.tiny_list, gt_file=args.gt_file, limit=args.limit,
                           strict=args.strict)
