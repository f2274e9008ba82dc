"""Direct or ECSO answers for a benchmark, one JSON line per sample (docs/answer-format.md), batched, resumable
and shardable; a manifest (``OUT.manifest.json``) records how the answers were made.

    python -m llava.eval.generate --benchmark mmsafetybench --mode SD_TYPO --method ecso \\
        --model-path liuhaotian/llava-v1.5-7b --question-file processed_questions --image-folder imgs \\
        --answers-file out/mmsafe_ecso.jsonl --batch-size 8

Resume: rerun the same command; ids already in the answer file are skipped (a torn last line is moved aside and
redone). Another --answers-file, --overwrite, or --force-mismatch when the settings changed.
Shards: --num-chunks N --chunk-idx K (LLaVA's contiguous chunks), then ``python -m llava.eval.merge``; or
``accelerate launch -m llava.eval.generate ...`` (one process per GPU, each writes OUT.part-K-of-N.jsonl, rank 0
merges into OUT); or --backend worker/openai with --concurrency N to keep N batches in flight from one process.
Environment: ECSO_LIMIT (default --limit), RANK/WORLD_SIZE/LOCAL_RANK (set by accelerate/torchrun).
Exit status: 0 complete, 1 incomplete (rerun to resume), 2 error (the message says what to do).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llava.cli_args import (add_backend_args, add_decoding_args, add_ecso_args, add_model_args, backend_from_args,
                            ecso_config, setup_logging)
from llava.ecso.defenses import get_defense
from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks import add_benchmark_arguments, config_from_args
from llava.eval.gen.config import METHODS, GenerateConfig
from llava.eval.gen.layout import layout_help, resolve_data_paths
from llava.eval.gen.merge import merge_parts, wait_for_parts
from llava.eval.gen.runner import RunSummary, run_generation
from llava.eval.gen.shards import DistributedEnv, distributed_env, part_path, part_paths

__all__ = ["build_parser", "add_console_args", "add_answering_args", "config_from_cli", "run", "main"]

logger = logging.getLogger("llava.eval.generate")
LIMIT_ENV = "ECSO_LIMIT"


class _DataFlags:
    """Adapter handed to ``add_benchmark_arguments``: the benchmark flags as declared, except that --question-file
    and --image-folder may come from --data-root (so neither is required nor defaulted here) and --limit also reads
    $ECSO_LIMIT. It changes the keyword arguments before argparse builds each flag."""

    _CHANGES: dict[str, dict[str, Any]] = {
        "--question-file": {"required": False, "help_suffix": "; optional with --data-root"},
        "--image-folder": {"default": None},
        "--limit": {"help_suffix": f"; default: ${LIMIT_ENV}"},
    }

    def __init__(self, target: Any) -> None:
        self._target = target

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _DataFlags:
        return _DataFlags(self._target.add_argument_group(*args, **kwargs))

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        for flag in flags:
            change = dict(self._CHANGES.get(flag, {}))
            if "help_suffix" in change:
                kwargs["help"] = kwargs.get("help", "") + change.pop("help_suffix")
            kwargs.update(change)
        return self._target.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(_DataFlags(p))  # type: ignore[arg-type]
    g = p.add_argument_group("run")
    g.add_argument("--data-root", default=None,
                   help=f"fill --question-file/--image-folder from the standard layout under this folder ({layout_help()})")
    g.add_argument("--method", default="direct", choices=METHODS,
                   help="the defense that answers (default direct): " + "; ".join(
                       f"{name}: {get_defense(name).summary}" for name in METHODS))
    g.add_argument("--answers-file", required=True, help="output JSON lines (resumed when it exists)")
    g.add_argument("--from-answers", default=None,
                   help="an ECSO method over the direct answers in this answer file (matched by id) instead of "
                        "generating them: the paper's two-pass evaluation")
    g.add_argument("--num-chunks", type=int, default=1, help="split the samples into N contiguous chunks ...")
    g.add_argument("--chunk-idx", type=int, default=0, help="... and answer chunk K (0-based)")
    g.add_argument("--concurrency", type=int, default=1,
                   help="batches in flight at once (threads) for --backend worker/openai; the local backend runs "
                        "one batch at a time")
    g.add_argument("--max-errors", type=int, default=100,
                   help="stop once this many samples failed in one run (failed image loads do not count)")
    g.add_argument("--overwrite", action="store_true", help="discard the answer file and its manifest, start again")
    g.add_argument("--force-mismatch", action="store_true",
                   help="resume even though the manifest's settings differ (or --from-answers is unfinished)")
    g.add_argument("--merge-timeout", type=float, default=48 * 3600,
                   help="multi-process runs: seconds rank 0 waits for the other parts before merging")
    add_console_args(g)
    add_answering_args(p)
    return p


def add_console_args(g: Any) -> None:
    """--no-progress, -v, -q (on a parser or a group): what a benchmark run prints; shared by the runner's tools."""
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="count", default=0, help="-v: debug logs")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def add_answering_args(p: argparse.ArgumentParser) -> None:
    """The model, backend, decoding (greedy, 1024 new tokens by default) and ECSO flags of a benchmark run."""
    add_model_args(p, default_model=None)
    add_backend_args(p)
    add_decoding_args(p, temperature=0.0, max_new_tokens=1024)
    add_ecso_args(p)


def _limit(args: argparse.Namespace) -> int | None:
    if args.limit is not None or not os.environ.get(LIMIT_ENV):
        return args.limit
    try:
        return int(os.environ[LIMIT_ENV])
    except ValueError:
        raise InvalidRequestError(f"{LIMIT_ENV} must be an integer, got {os.environ[LIMIT_ENV]!r}") from None


def config_from_cli(args: argparse.Namespace, dist: DistributedEnv | None = None) -> GenerateConfig:
    """The run's config from the parsed flags; under a multi-process launcher, this rank's chunk and part file."""
    args = copy.copy(args)
    args.question_file, args.image_folder = resolve_data_paths(args.benchmark, args.data_root, args.question_file,
                                                               args.image_folder)
    args.limit = _limit(args)
    num_chunks, chunk_idx, answers = args.num_chunks, args.chunk_idx, Path(args.answers_file)
    if dist is not None:
        if num_chunks != 1:
            raise InvalidRequestError(f"--num-chunks {num_chunks} under a launcher with WORLD_SIZE={dist.world_size}:"
                                      " the launcher's ranks are the chunks; drop --num-chunks/--chunk-idx")
        num_chunks, chunk_idx = dist.world_size, dist.rank
        answers = part_path(answers, num_chunks, chunk_idx)
    if args.model_path is None and args.backend == "local":
        raise InvalidRequestError("--model-path is required with the local backend (e.g. liuhaotian/llava-v1.5-7b)")
    return GenerateConfig(
        benchmark=args.benchmark, data=config_from_args(args), answers_file=answers, method=args.method,
        ecso=ecso_config(args), batch_size=args.batch_size, concurrency=args.concurrency,
        num_chunks=num_chunks, chunk_idx=chunk_idx,
        from_answers=Path(args.from_answers) if args.from_answers else None, force_mismatch=args.force_mismatch,
        overwrite=args.overwrite, max_errors=args.max_errors, progress=not args.no_progress,
        model_id=args.model_name)


def _backend_factory(args: argparse.Namespace, dist: DistributedEnv | None):
    def factory():
        backend_args = copy.copy(args)
        if dist is not None and args.device == "auto":
            import torch

            if torch.cuda.is_available():
                backend_args.device = f"cuda:{dist.local_rank}"
        return backend_from_args(backend_args)

    return factory


def run(args: argparse.Namespace) -> RunSummary:
    dist = distributed_env()
    config = config_from_cli(args, dist)
    if dist is not None:
        logger.info("rank %d of %d writes %s", dist.rank, dist.world_size, config.answers_file)
    summary = run_generation(config, _backend_factory(args, dist))
    if dist is not None and dist.rank == 0 and summary.status == "complete":
        parts = part_paths(args.answers_file, dist.world_size)
        wait_for_parts(parts, args.merge_timeout)
        merge_parts(parts, args.answers_file, force=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else 1 + args.verbose)
    try:
        summary = run(args)
    except ECSOError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:  # an unwritable --answers-file, a full disk while writing the manifest or the final sort
        logger.error("cannot write the results: %s: %s", type(exc).__name__, exc)
        return 2
    return 0 if summary.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
