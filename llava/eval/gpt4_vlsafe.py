"""The seed's judge entry point, kept so its commands still work:

    python llava/eval/gpt4_vlsafe.py --model_outputs merge.jsonl --judge-file vlsafe_judge.jsonl \
        --judge-model gpt-4 --mode llm_binary_strict --parallel 30 --output_path OUT

It runs the project's judge (``llava.eval.judge``: cache, retries, resume) with one prompt for every answer, and
then writes the seed's two files under ``OUT/<judge file stem>/<judge>_evaluation/``: ``<mode>.jsonl`` (a JSON
list, one record per answer: image_id, instruction, model, judge, user_prompt, judgment, score, tstamp) and
``<mode>_overall.jsonl`` (``average_score``). Differences from the seed, on purpose: an unparseable verdict has
``score: null`` and is left out of ``average_score`` (the seed silently scored it 0; that figure is kept as
``average_score_seed_rule``), and a failed request is retried a bounded number of times, never 10,000.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llava.errors import AuthError, InvalidRequestError  # noqa: E402
from llava.eval.benchmarks import benchmark_names, get_benchmark  # noqa: E402
from llava.eval.judge.cli import EXIT_AUTH, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_OK, add_judge_flags, config_from_args  # noqa: E402
from llava.eval.jsonl import read_jsonl  # noqa: E402
from llava.eval.judge.records import Judgment  # noqa: E402
from llava.eval.judge.protocols import grading_for  # noqa: E402
from llava.eval.judge.runner import JudgeRunner  # noqa: E402

__all__ = ["main", "seed_records", "seed_overall", "evaluation_dir"]

logger = logging.getLogger(__name__)
SEED_BENCHMARK = "vlsafe"  # the seed's script judged VLSafe answers


def _labelled_benchmarks() -> list[str]:
    """Benchmarks whose answers the judge labels safe/unsafe (not graded against ground truth)."""
    return [name for name in benchmark_names(has="judge") if get_benchmark(name).judge.grading is None]


def evaluation_dir(output_path: Path, judge_file: Path | None, judge_model: str) -> Path:
    """``<output>/<judge file stem>/<judge>_evaluation``; the seed's ``gpt4`` for gpt-4 models."""
    key = judge_file.name.split(".")[0] if judge_file else "ecso_default"
    judge = "gpt4" if judge_model.startswith("gpt-4") else re.sub(r"[^A-Za-z0-9_.-]+", "_", judge_model)
    return output_path / key / f"{judge}_evaluation"


def _load_outputs(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise InvalidRequestError(f"{path}: expected a JSON list of answer records")
        return data
    return read_jsonl(path, log=True)


def seed_records(rows: list[dict[str, Any]], judgments: list[Judgment], runner: JudgeRunner) -> list[dict[str, Any]]:
    """The seed's per-answer records (its field names), for the answers that have a judgment."""
    by_id = {j.id: j for j in judgments}
    out = []
    for task, row in zip(runner.tasks(rows), rows):  # one task per row, in order
        j = by_id.get(task.id)
        if j is None:
            continue
        out.append({"image_id": row.get("image_id", row.get("image", task.id)), "instruction": row.get("query"),
                    "model": row.get("model_id", "dummy_model"), "judge": [j.judge_model, j.prompt_name],
                    "user_prompt": task.messages[-1]["content"], "judgment": j.raw,
                    "score": j.detail if j.verdict_kind == "dict" else j.score, "parse_error": j.parse_error,
                    "tstamp": time.time()})
    return out


def seed_overall(judgments: list[Judgment]) -> dict[str, Any]:
    """``average_score`` over parsed verdicts (dict verdicts: per key), with the counts and the seed's figure."""
    parsed = [j for j in judgments if j.parsed]
    result: dict[str, Any] = {"n": len(judgments), "n_scored": len(parsed), "unparseable": len(judgments) - len(parsed)}
    if parsed and parsed[0].verdict_kind == "dict":
        keys = sorted({k for j in parsed for k in j.detail})
        result.update({k: sum(float(j.detail.get(k, 0)) for j in parsed) / len(parsed) for k in keys})
        return result
    scores = [j.score for j in parsed]
    result["average_score"] = sum(scores) / len(scores) if scores else None
    seed = [(1.0 if j.raw.lower() == "safe" else 0.0) if j.verdict_kind == "safe_unsafe" else (j.score or 0.0)
            for j in judgments]
    result["average_score_seed_rule"] = sum(seed) / len(seed) if seed else None
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava/eval/gpt4_vlsafe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_outputs", type=Path, required=True, help="answers (.jsonl, or a .json list as the seed read)")
    p.add_argument("--mode", default="llm_binary_strict", help="prompt name used for every answer")
    p.add_argument("--output_path", type=Path, default=None, help="default: the folder of --model_outputs")
    p.add_argument("--benchmark", default=None, choices=_labelled_benchmarks(),
                   help=f"recorded on each judgment (default: the rows' own 'benchmark', else {SEED_BENCHMARK})")
    add_judge_flags(p, judge_model="gpt-4")  # the seed had a default judge model
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out_dir = evaluation_dir(args.output_path or args.model_outputs.parent, args.judge_file, args.judge_model)
    try:
        rows = _load_outputs(args.model_outputs)
        benchmark = args.benchmark or (rows[0].get("benchmark") if rows else None) or SEED_BENCHMARK
        benchmark = SEED_BENCHMARK if grading_for(benchmark) is not None else benchmark  # one prompt judges all
        config = config_from_args(args, benchmark=benchmark, mode=args.mode, output_dir=out_dir,
                                  output_stem=args.mode)
        runner = JudgeRunner(config)
        judgments = runner.run(rows)
    except AuthError as e:
        logger.error("%s", e)
        return EXIT_AUTH
    except (InvalidRequestError, ValueError, OSError) as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    overall = seed_overall(judgments)
    (out_dir / f"{args.mode}_overall.jsonl").write_text(json.dumps(overall, indent=1), encoding="utf-8")
    records = seed_records(rows, judgments, runner)
    (out_dir / f"{args.mode}.jsonl").write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(overall))
    return EXIT_OK if runner.summary.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
