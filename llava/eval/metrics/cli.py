"""``python -m llava.eval.metrics``: print a benchmark's metrics (``--json``: one JSON object).

  vlsafe / mmsafetybench  --answers A.jsonl [--judgments A.judgments.jsonl]   harmless rate, ASR, flag rate
  mme                     --answers A.jsonl [--ground-truth llava_mme_gt.jsonl]  perception / cognition / subtasks
  mmbench                 --answers A.jsonl|P.tsv [--ground-truth mmbench_dev.tsv]   CircularEval accuracy
(MME and MMBench answer rows written by llava.eval.generate carry their ground truth in ``meta``; a
--ground-truth file, when given, is used instead.)
  mmvet                   --answers A.jsonl --judgments grades.json|.jsonl [--ground-truth mm-vet.json]   total
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from llava.errors import InvalidRequestError
from llava.eval.judge.mmvet import load_ground_truth as load_mmvet_gt
from llava.eval.jsonl import read_jsonl
from llava.eval.judge.records import read_judgments
from llava.eval.metrics.mmbench import mmbench_gt_from_rows, mmbench_scores, predictions_from_rows, read_tsv
from llava.eval.metrics.mme import COGNITION, PERCEPTION, mme_gt_from_rows, mme_scores
from llava.eval.metrics.mmvet import load_grades, mmvet_scores
from llava.eval.metrics.safety import safety_metrics
from llava.eval.metrics.stats import Rate

__all__ = ["compute", "format_text", "build_parser", "main"]

logger = logging.getLogger(__name__)
BENCHMARKS = ("vlsafe", "mmsafetybench", "mme", "mmbench", "mmvet")


def _rows(path: Path) -> list[dict[str, Any]]:
    return read_tsv(path) if path.suffix == ".tsv" else read_jsonl(path, log=True)


def _need(value: Any, flag: str, benchmark: str) -> Any:
    if not value:
        raise InvalidRequestError(f"{benchmark} needs {flag}" + (" (or answer rows that carry it in meta)"
                                                                if flag == "--ground-truth" else ""))
    return value


def compute(benchmark: str, answers: Path, judgments: Path | None = None, ground_truth: Path | None = None) -> dict:
    """The metrics dict of one answer file (what ``--json`` prints)."""
    if benchmark in ("vlsafe", "mmsafetybench"):
        return safety_metrics(read_jsonl(answers, log=True), read_judgments(judgments) if judgments else None)
    if benchmark == "mme":
        rows = read_jsonl(answers, log=True)
        gt = read_jsonl(ground_truth, log=True) if ground_truth else _need(mme_gt_from_rows(rows), "--ground-truth", benchmark)
        return mme_scores(rows, gt)
    if benchmark == "mmbench":
        rows = _rows(answers)
        gt = read_tsv(ground_truth) if ground_truth else _need(mmbench_gt_from_rows(rows), "--ground-truth", benchmark)
        return mmbench_scores(predictions_from_rows(rows), gt, rows)
    if benchmark == "mmvet":
        gt = load_mmvet_gt(ground_truth) if ground_truth else None
        return mmvet_scores(load_grades(_need(judgments, "--judgments", benchmark)), gt, read_jsonl(answers, log=True))
    raise InvalidRequestError(f"unknown benchmark {benchmark!r}; valid: {list(BENCHMARKS)}")


def _rate(d: dict | None) -> str:
    return str(Rate(d["k"], d["n"])) if d else "-"


def format_text(benchmark: str, m: dict[str, Any]) -> str:
    lines = []
    if benchmark in ("vlsafe", "mmsafetybench"):
        lines.append(f"answers {m['n_answers']}, judged {m['n_judged']}, unparseable {m['unparseable']}, "
                     f"judge {m['judge_models']} prompts {m['prompt_names']}")
        lines.append(f"{'scenario':24} {'mode':8} {'harmless (paper rule)':34} {'harmless (MM-SafetyBench rule)':34} flag rate")
        for c in m["cells"]:
            lines.append(f"{c['scenario']:24} {c['mode']:8} {_rate(c['harmless_rate_paper']):34} "
                         f"{_rate(c['harmless_rate_mmsb']):34} {_rate(c['flag_rate'])}")
        lines += [f"rule {k}: {v}" for k, v in m["rules"].items()]
    elif benchmark == "mme":
        for name in PERCEPTION + COGNITION:
            s = m["subtasks"].get(name)
            if s:
                lines.append(f"{name:24} score {s['score']:7.2f}  acc {s['acc']:6.2f}  acc+ {s['acc_plus']:6.2f}  other {s['other']}")
        lines.append(f"Perception {m['perception']:.2f}  Cognition {m['cognition']:.2f}  (missing answers {m['missing_answers']})")
    elif benchmark == "mmbench":
        lines.append(f"CircularEval accuracy {m['circular_accuracy']:.2f}% over {m['n_questions']} questions "
                     f"({m['n_rows']} rows); unmatched {m['unmatched']}, missing {m['missing_predictions']}")
    elif benchmark == "mmvet":
        lines.append(f"MM-Vet total {m['total']:.2f} (std {m['std']:.2f}, {len(m['runs'])} run(s), n={m['n']})")
        for cap, v in m.get("capabilities", {}).items():
            lines.append(f"  {cap:8} {v:.2f}")
    fa = m.get("false_alarm_rate")
    if fa:
        lines.append(f"ECSO false-alarm (flag) rate {_rate(fa)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=BENCHMARKS, required=True, help="which benchmark's metrics")
    p.add_argument("--answers", type=Path, required=True,
                   help="answer file (JSONL; MMBench also a TSV with index/prediction)")
    p.add_argument("--judgments", type=Path, default=None,
                   help="judge output: safety judgments JSONL, or MM-Vet grades (MM-Vet's .json or our .jsonl)")
    p.add_argument("--ground-truth", type=Path, default=None,
                   help="MME llava_mme_gt.jsonl, MMBench dev TSV, or MM-Vet mm-vet.json (per-capability scores)")
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
