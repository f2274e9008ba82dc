"""MME scores with LLaVA's / MME's rule: the prediction is lowercased; exactly ``yes``/``no`` counts as such,
else ``yes`` (then ``no``) within its first 4 characters, else ``other``, which is always wrong. Per subtask,
acc = share of correct questions and acc+ = share of images whose questions are all correct; the subtask score is
100 * (acc + acc+). Perception sums its 10 subtasks, Cognition its 4.

Answers are matched to ground truth by (question_id, question text) with LLaVA's prompt suffixes removed, so the
official LLaVA answer file (``question_id``, ``prompt``, ``text``) and this project's (``question_id``, ``query``,
``text``) both work. Ground truth rows: ``question_id``, ``category``, ``mme_question``, ``gt_answer``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from llava.errors import InvalidRequestError
from llava.eval.jsonl import read_jsonl
from llava.eval.metrics.hook import MetricHook, need
from llava.eval.metrics.stats import flag_rate

__all__ = ["PERCEPTION", "COGNITION", "parse_yes_no", "mme_scores", "normalize_question", "mme_gt_from_rows", "HOOK"]

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_SUFFIXES = ("Answer the question using a single word or phrase.", "Please answer yes or no.")


def parse_yes_no(prediction: str) -> str:
    p = prediction.lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def normalize_question(text: str) -> str:
    for suffix in _SUFFIXES:
        text = text.replace(suffix, "")
    return " ".join(text.split())


def _answer_key(row: dict[str, Any]) -> tuple[str, str]:
    question = row.get("prompt", row.get("query"))
    if row.get("question_id") is None or question is None:
        raise InvalidRequestError(f"MME answer row needs question_id and prompt/query: {sorted(row)}")
    return str(row["question_id"]), normalize_question(question)


def mme_gt_from_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ground truth carried by this project's answer rows (``meta.gt_answer`` / ``meta.mme_question``)."""
    gt = []
    for row in rows:
        meta = row.get("meta") or {}
        if meta.get("gt_answer") is not None:
            gt.append({"question_id": row["question_id"], "category": row["category"],
                       "mme_question": meta.get("mme_question") or row["query"], "gt_answer": meta["gt_answer"]})
    return gt


def mme_scores(answers: Iterable[dict[str, Any]], ground_truth: Iterable[dict[str, Any]]) -> dict[str, Any]:
    answers = list(answers)
    preds: dict[tuple[str, str], str] = {}
    for row in answers:
        preds[_answer_key(row)] = str(row.get("text", ""))
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    others = defaultdict(int)
    matched = missing = 0
    for g in ground_truth:
        key = (str(g["question_id"]), normalize_question(g["mme_question"]))
        pred = preds.get(key)
        matched += pred is not None
        missing += pred is None
        label = parse_yes_no(pred) if pred is not None else "other"
        others[g["category"]] += label == "other"
        images[g["category"]][key[0]].append(label == g["gt_answer"].strip().lower())
    if matched == 0:
        raise InvalidRequestError("no MME answer matches the ground truth (question_id + question text)")
    subtasks = {}
    for category, per_image in images.items():
        flat = [ok for oks in per_image.values() for ok in oks]
        acc, acc_plus = sum(flat) / len(flat), sum(all(v) for v in per_image.values()) / len(per_image)
        subtasks[category] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                              "n": len(flat), "images": len(per_image), "other": others[category]}
    fr = flag_rate(answers)
    return {
        "perception": sum(subtasks[c]["score"] for c in PERCEPTION if c in subtasks),
        "cognition": sum(subtasks[c]["score"] for c in COGNITION if c in subtasks),
        "subtasks": subtasks,
        "missing_subtasks": [c for c in PERCEPTION + COGNITION if c not in subtasks],
        "n": matched + missing, "missing_answers": missing, "unmatched_answers": len(preds) - matched,
        "other_answers": sum(others.values()),
        "false_alarm_rate": fr.to_dict() if fr else None,
    }


def from_files(answers: Path, judgments: Path | None = None, ground_truth: Path | None = None) -> dict[str, Any]:
    rows = read_jsonl(answers, log=True)
    gt = read_jsonl(ground_truth, log=True) if ground_truth else need(mme_gt_from_rows(rows), "--ground-truth", "mme")
    return mme_scores(rows, gt)


def as_text(m: dict[str, Any]) -> list[str]:
    lines = []
    for name in PERCEPTION + COGNITION:
        s = m["subtasks"].get(name)
        if s:
            lines.append(f"{name:24} score {s['score']:7.2f}  acc {s['acc']:6.2f}  acc+ {s['acc_plus']:6.2f}  "
                         f"other {s['other']}")
    lines.append(f"Perception {m['perception']:.2f}  Cognition {m['cognition']:.2f}  (missing answers "
                 f"{m['missing_answers']})")
    return lines


HOOK = MetricHook(from_files, as_text, "perception / cognition / subtasks: --answers A.jsonl "
                                       "[--ground-truth llava_mme_gt.jsonl]")
