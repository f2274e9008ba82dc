"""SFT data from ECSO: run ECSO over a benchmark's (image, query) pairs and keep the flagged ones with ECSO's safe
answers (and, with --keep-benign-ratio, a seeded share of the benign ones with their direct answers), as LLaVA's
conversation JSON:

    python -m llava.train.sft_data --benchmark vlsafe --question-file data/vlsafe/VLSafe_harmlessnss_alignment.jsonl \\
        --image-folder coco/train2017 --model-path liuhaotian/llava-v1.5-7b --out sft.json

ECSO's answers go to an answer file first (default: OUT's stem + ``.ecso.jsonl``, written by the generation runner:
batched, resumable, with its manifest); rerun the same command after a kill to resume. --from-answers starts from
an existing file: an ECSO answer file is converted without loading a model; a direct answer file has its answers
checked by ECSO (steps 2-4 only). Writes OUT (the SFT rows) and OUT's stem + ``.manifest.json`` (model, ECSO
options, counts, flag rate). Exit status: 0 done, 1 ECSO run incomplete (rerun to resume), 2 error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llava.cli_args import backend_from_args, setup_logging
from llava.ecso.backends import Backend
from llava.ecso.config import ecso_config_from_args
from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks import add_benchmark_arguments, config_from_args, get_benchmark
from llava.eval.benchmarks.base import DatasetError
from llava.eval.gen.answers import read_answer_rows
from llava.eval.gen.config import GenerateConfig
from llava.eval.gen.manifest import (ResumeMismatchError, environment, file_digest, load_manifest, manifest_path,
                                     now_iso, write_manifest)
from llava.eval.gen.runner import plan_samples, run_generation
from llava.eval.generate import add_answering_args, add_console_args
from llava.train.sft_rows import select_rows

__all__ = ["SFTDataConfig", "SFTResult", "build_parser", "config_from_cli", "make_sft_data", "main"]

logger = logging.getLogger("llava.train.sft_data")
SFT_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SFTDataConfig:
    """generate: the ECSO run (method ``ecso``; its answers file is the intermediate log). out: the SFT JSON.
    from_ecso: an existing ECSO answer file to convert instead of running ECSO. keep_benign_ratio, seed: the
    share of benign samples kept with their direct answers, and the seed of that draw."""

    generate: GenerateConfig
    out: Path
    keep_benign_ratio: float = 0.0
    seed: int = 0
    from_ecso: Path | None = None

    def __post_init__(self) -> None:
        if self.generate.method != "ecso":
            raise InvalidRequestError("SFT data comes from ECSO runs (method ecso)")
        if not 0.0 <= self.keep_benign_ratio <= 1.0:
            raise InvalidRequestError(f"--keep-benign-ratio must be in [0, 1], got {self.keep_benign_ratio}")
        if get_benchmark(self.generate.benchmark).inline_images:
            raise InvalidRequestError(f"{self.generate.benchmark} keeps its images inside the question file; SFT rows "
                                      "name image files: choose a benchmark whose images are files")
        if Path(self.out).suffix != ".json":
            raise InvalidRequestError(f"--out is LLaVA's JSON data file and must end in .json, got {self.out}")
        if self.manifest.resolve() == manifest_path(self.generate.answers_file).resolve():
            raise InvalidRequestError(f"--out {self.out} and --answers-file {self.generate.answers_file} would share "
                                      f"the manifest {self.manifest}: give them different names")

    @property
    def manifest(self) -> Path:
        return manifest_path(self.out)


@dataclass
class SFTResult:
    status: str  # complete, or the ECSO run's status when it did not complete
    out: Path | None
    counts: dict[str, Any] | None = None


def _ecso_rows_from_file(config: SFTDataConfig) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows of an existing ECSO answer file that answer this run's planned samples (queries checked)."""
    path = config.from_ecso
    manifest = load_manifest(manifest_path(path))
    status = (manifest or {}).get("status", "complete")
    if status != "complete" and not config.generate.force_mismatch:
        raise ResumeMismatchError(f"--from-answers {path} is {status}: finish that run first (rerun its command), "
                                  "or pass --force-mismatch to use the answers it has")
    planned = {s.id: s for s in plan_samples(config.generate)}
    rows = []
    for row in read_answer_rows(path):
        key = str(row["id"])
        if row.get("benchmark", config.generate.benchmark) != config.generate.benchmark:
            raise DatasetError(f"{path}: row {key} is a {row['benchmark']!r} answer, this run is "
                               f"{config.generate.benchmark!r}")
        if key in planned:
            if row.get("query") != planned[key].query:
                raise DatasetError(f"{path}: the query of {key!r} differs from the benchmark's; were the answers "
                                   "made with another --mode or question file?")
            rows.append(row)
    if len(rows) < len(planned):
        logger.warning("%d of the %d planned samples have no answer in %s: left out", len(planned) - len(rows),
                       len(planned), path)
    return rows, manifest


def _is_ecso_file(path: Path) -> bool:
    rows = read_answer_rows(path)
    return bool(rows) and rows[0].get("method") == "ecso"


def _write(config: SFTDataConfig, rows: list[dict[str, Any]], answers: Path, answers_manifest: dict | None) -> dict:
    sft, counts = select_rows(rows, config.keep_benign_ratio, config.seed)
    write_manifest(config.out, sft)  # an atomic JSON write (the data file is one JSON list, as LLaVA reads it)
    settings = (answers_manifest or {}).get("settings", {})
    manifest = {
        "version": SFT_MANIFEST_VERSION, "out": str(config.out), "out_sha256": file_digest(config.out),
        "created": now_iso(),
        "source": {"answers_file": str(answers), "answers_sha256": file_digest(answers),
                   "from_answers": config.generate.from_answers and str(config.generate.from_answers),
                   "converted_from_ecso_file": config.from_ecso is not None},
        "benchmark": config.generate.benchmark, "model": settings.get("model"), "ecso": settings.get("ecso"),
        "decoding": settings.get("decoding"), "data": settings.get("data"),
        "selection": {"keep_benign_ratio": config.keep_benign_ratio, "seed": config.seed},
        "counts": counts.to_dict(rows), "ids": counts.ids, "environment": environment(),
    }
    write_manifest(config.manifest, manifest)
    logger.info("%s: %d SFT rows (%d safe answers of %d flagged, %d benign of %d), flag rate %s", config.out,
                counts.rows, counts.safe_rows, counts.flagged, counts.benign_rows, counts.benign,
                manifest["counts"]["flag_rate"]["rate"])
    return manifest["counts"]


def make_sft_data(config: SFTDataConfig, backend_factory: Callable[[], Backend]) -> SFTResult:
    """Run (or resume) ECSO, then write the SFT JSON and its manifest; see the module docstring.
    ``backend_factory`` is only called when ECSO has samples left to answer."""
    if config.from_ecso is not None:
        rows, manifest = _ecso_rows_from_file(config)
        return SFTResult("complete", config.out, _write(config, rows, config.from_ecso, manifest))
    summary = run_generation(config.generate, backend_factory)
    answers = config.generate.answers_file
    if summary.status != "complete":
        logger.warning("the ECSO run is %s: %s not written; rerun the same command to resume", summary.status,
                       config.out)
        return SFTResult(summary.status, None)
    planned = {s.id for s in plan_samples(config.generate)}  # the file may hold rows of an earlier, larger plan
    rows = [r for r in read_answer_rows(answers) if str(r["id"]) in planned]
    return SFTResult("complete", config.out, _write(config, rows, answers, load_manifest(manifest_path(answers))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.train.sft_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p)
    g = p.add_argument_group("SFT data")
    g.add_argument("--out", required=True, help="the SFT data: LLaVA's conversation JSON (a .json file)")
    g.add_argument("--answers-file", default=None,
                   help="ECSO's answers, the resumable intermediate (default: OUT's stem + .ecso.jsonl)")
    g.add_argument("--from-answers", default=None,
                   help="start from this answer file: an ECSO file is converted (no model loaded); a direct file "
                        "has its answers checked by ECSO instead of generating them")
    g.add_argument("--keep-benign-ratio", type=float, default=0.0,
                   help="share (0-1) of the samples ECSO did not flag kept with their direct answers, so the data "
                        "does not teach refusing everything (default 0: flagged samples only)")
    g.add_argument("--seed", type=int, default=0, help="seed of the benign draw (default 0)")
    g.add_argument("--overwrite", action="store_true", help="discard the ECSO answers file and start again")
    g.add_argument("--force-mismatch", action="store_true",
                   help="resume although the answers file's settings differ (or --from-answers is unfinished)")
    add_console_args(g)
    add_answering_args(p)
    return p


def config_from_cli(args: argparse.Namespace) -> SFTDataConfig:
    out = Path(args.out)
    answers = Path(args.answers_file) if args.answers_file else out.with_name(out.stem + ".ecso.jsonl")
    given = Path(args.from_answers) if args.from_answers else None
    from_ecso = given if given is not None and _is_ecso_file(given) else None
    if from_ecso is None and args.model_path is None and args.backend == "local":
        raise InvalidRequestError("--model-path is required with the local backend (e.g. liuhaotian/llava-v1.5-7b)")
    generate = GenerateConfig(
        benchmark=args.benchmark, data=config_from_args(args), answers_file=answers, method="ecso",
        ecso=ecso_config_from_args(args), batch_size=args.batch_size,
        from_answers=given if from_ecso is None else None, force_mismatch=args.force_mismatch,
        overwrite=args.overwrite, progress=not args.no_progress, model_id=args.model_name)
    return SFTDataConfig(generate, out, args.keep_benign_ratio, args.seed, from_ecso)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else 1 + args.verbose)
    try:
        config = config_from_cli(args)
        result = make_sft_data(config, lambda: backend_from_args(args))
    except ECSOError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        logger.error("cannot write the results: %s: %s", type(exc).__name__, exc)
        return 2
    if result.status != "complete":
        return 1
    print(f"{result.out}: {result.counts['sft_rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
