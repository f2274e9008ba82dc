"""MM-Vet totals from per-sample grades: total = mean score x 100 per grading run (mean and std over runs), and,
with MM-Vet's ``mm-vet.json``, per capability (samples that need it) and per capability combination (the sorted
capability names joined by ``_``). Grades come from MM-Vet's ``gpt-4-grade-<n>runs.json``
(``{"v1_0": {"score": [...]}}``) or from this project's judgments JSONL (``python -m llava.eval.judge --benchmark
mmvet``).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from llava.errors import InvalidRequestError
from llava.eval.benchmarks.mmvet import load_ground_truth, mmvet_key
from llava.eval.jsonl import read_jsonl
from llava.eval.metrics.hook import MetricHook, need
from llava.eval.metrics.stats import flag_rate

__all__ = ["load_grades", "mmvet_scores", "HOOK"]


def load_grades(path: str | Path) -> list[dict[str, float]]:
    """One ``{sample key: score}`` per grading run."""
    path = Path(path)
    if path.suffix == ".jsonl":
        run = {}
        for row in read_jsonl(path, log=True):
            if row.get("score") is None:
                raise InvalidRequestError(f"{path}: judgment {row.get('id')!r} has no score")
            run[mmvet_key(row.get("question_id", row["id"]))] = float(row["score"])
        return [run]
    data = json.loads(path.read_text(encoding="utf-8"))
    n_runs = max(len(v["score"]) for v in data.values())
    return [{k: float(v["score"][i]) for k, v in data.items() if i < len(v["score"])} for i in range(n_runs)]


def _mean100(values: list[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def mmvet_scores(runs: list[dict[str, float]], ground_truth: dict[str, Any] | None = None,
                 answers: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    if not runs or not runs[0]:
        raise InvalidRequestError("no MM-Vet grades")
    totals = [_mean100(list(run.values())) for run in runs]
    answers = list(answers)
    result: dict[str, Any] = {
        "total": statistics.fmean(totals), "std": statistics.pstdev(totals) if len(totals) > 1 else 0.0,
        "runs": totals, "n": len(runs[0]),
    }
    if answers:
        answered = {mmvet_key(a.get("question_id", a.get("id"))) for a in answers}
        result["ungraded_answers"] = sorted(answered - set(runs[0]))
        fr = flag_rate(answers)
        result["false_alarm_rate"] = fr.to_dict() if fr else None
    if ground_truth:
        caps: dict[str, list[float]] = defaultdict(list)
        combos: dict[str, list[float]] = defaultdict(list)
        for key, score in runs[0].items() if len(runs) == 1 else _mean_run(runs).items():
            sample = ground_truth.get(key)
            if sample is None:
                raise InvalidRequestError(f"graded sample {key!r} is not in the MM-Vet ground truth")
            for cap in sample["capability"]:
                caps[cap].append(score)
            combos["_".join(sorted(sample["capability"]))].append(score)
        result["capabilities"] = {c: _mean100(v) for c, v in sorted(caps.items())}
        result["capability_combinations"] = {c: _mean100(v) for c, v in sorted(combos.items())}
    return result


def _mean_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(run[k] for run in runs if k in run) for k in runs[0]}


def from_files(answers: Path, judgments: Path | None, ground_truth: Path | None = None) -> dict[str, Any]:
    gt = load_ground_truth(ground_truth) if ground_truth else None
    return mmvet_scores(load_grades(need(judgments, "--judgments", "mmvet")), gt, read_jsonl(answers, log=True))


def as_text(m: dict[str, Any]) -> list[str]:
    lines = [f"MM-Vet total {m['total']:.2f} (std {m['std']:.2f}, {len(m['runs'])} run(s), n={m['n']})"]
    return lines + [f"  {cap:8} {v:.2f}" for cap, v in m.get("capabilities", {}).items()]


HOOK = MetricHook(from_files, as_text, "total (per capability with mm-vet.json): --answers A.jsonl --judgments "
                                       "grades.json|A.judgments.jsonl [--ground-truth mm-vet.json]")
