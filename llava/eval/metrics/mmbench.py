"""MMBench accuracy with CircularEval. Each question appears several times with its options rotated (rows whose
``index % 1_000_000`` is equal); a question counts as correct only if every copy is answered correctly. The
choice is extracted from the prediction as the option letter, else the option text, else it is unmatched
(counted, and wrong: MMBench would ask ChatGPT to match it; we do not).
"""
from __future__ import annotations

import csv
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from llava.errors import InvalidRequestError
from llava.eval.jsonl import read_jsonl
from llava.eval.metrics.hook import MetricHook, need
from llava.eval.metrics.stats import flag_rate

__all__ = ["read_tsv", "options_of", "extract_choice", "mmbench_scores", "predictions_from_rows", "mmbench_gt_from_rows",
           "CIRCULAR_MOD", "HOOK"]

CIRCULAR_MOD = 1_000_000
_LETTERS = "ABCDEFGHI"
_MISSING = ("", "nan", "NaN")
_BARE = re.compile(r"[(\[]?([A-I])[)\]]?[.:]?")
_LEADING = re.compile(r"[(\[]?([A-I])[)\].:]\s*\S")
_STATED = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*[(\[]?([A-I])(?![A-Za-z])")


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a TSV as strings (no NaN conversion: an option reading "None" stays an option)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def options_of(row: dict[str, Any]) -> dict[str, str]:
    return {c: str(row[c]) for c in _LETTERS if row.get(c) is not None and str(row[c]).strip() not in _MISSING}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text).lower().split())


def extract_choice(prediction: str, options: dict[str, str]) -> tuple[str | None, str]:
    """(letter, how): how is ``letter``, ``text`` or ``unmatched`` (letter None)."""
    s = prediction.strip()
    # a bare letter ("B", "(B)", "B."), a leading one ("B. text", "(B) text"), or a stated one ("The answer is B")
    for m in (_BARE.fullmatch(s), _LEADING.match(s), _STATED.search(s)):
        if m and m.group(1) in options:
            return m.group(1), "letter"
    p = _words(s)
    texts = {c: _words(t) for c, t in options.items()}
    for test in (lambda t: t == p, lambda t: bool(t) and f" {t} " in f" {p} "):
        hits = [c for c, t in texts.items() if test(t)]
        if len(hits) == 1:
            return hits[0], "text"
    return None, "unmatched"


def predictions_from_rows(rows: Iterable[dict[str, Any]]) -> dict[int, str]:
    """index -> prediction from a TSV (``index``, ``prediction``) or answer rows (``index``/``question_id``, ``text``)."""
    preds = {}
    for row in rows:
        idx = row.get("index", row.get("question_id"))
        text = row.get("prediction", row.get("text"))
        if idx is None or text is None:
            raise InvalidRequestError(f"MMBench prediction row needs index and prediction/text: {sorted(row)}")
        preds[int(idx)] = str(text)
    return preds


def mmbench_gt_from_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ground truth carried by this project's answer rows (``meta.answer``, ``meta.options``, ``meta.category``)."""
    gt = []
    for row in rows:
        meta = row.get("meta") or {}
        if meta.get("answer") is not None and row.get("index") is not None:
            gt.append({"index": row["index"], "answer": meta["answer"], "category": meta.get("category"),
                       **dict(zip(_LETTERS, meta.get("options") or []))})
    return gt


def mmbench_scores(predictions: dict[int, str], ground_truth: Iterable[dict[str, Any]],
                   answers: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    groups: dict[int, list[bool]] = defaultdict(list)
    category: dict[int, str] = {}
    how_count: Counter[str] = Counter()
    vanilla, missing = [], 0
    for g in ground_truth:
        idx = int(g["index"])
        pred = predictions.get(idx)
        if pred is None:
            missing += 1
            ok = False
        else:
            letter, how = extract_choice(pred, options_of(g))
            how_count[how] += 1
            ok = letter == str(g["answer"]).strip()
        groups[idx % CIRCULAR_MOD].append(ok)
        if g.get("category"):
            category[idx % CIRCULAR_MOD] = g["category"]
        if idx < CIRCULAR_MOD:
            vanilla.append(ok)
    if not groups:
        raise InvalidRequestError("MMBench ground truth has no rows")
    correct = {q: all(oks) for q, oks in groups.items()}
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for q, ok in correct.items():
        if q in category:
            per_cat[category[q]].append(ok)
    fr = flag_rate(answers)
    return {
        "circular_accuracy": 100 * sum(correct.values()) / len(correct),
        "vanilla_accuracy": 100 * sum(vanilla) / len(vanilla) if vanilla else None,
        "n_questions": len(correct), "n_rows": sum(len(v) for v in groups.values()),
        "missing_predictions": missing, "unmatched": how_count["unmatched"], "extraction": dict(how_count),
        "per_category": {c: 100 * sum(v) / len(v) for c, v in sorted(per_cat.items())},
        "false_alarm_rate": fr.to_dict() if fr else None,
    }


def from_files(answers: Path, judgments: Path | None = None, ground_truth: Path | None = None) -> dict[str, Any]:
    """Answers as this project's JSONL or a predictions TSV (``index``, ``prediction``)."""
    rows = read_tsv(answers) if Path(answers).suffix == ".tsv" else read_jsonl(answers, log=True)
    gt = read_tsv(ground_truth) if ground_truth else need(mmbench_gt_from_rows(rows), "--ground-truth", "mmbench")
    return mmbench_scores(predictions_from_rows(rows), gt, rows)


def as_text(m: dict[str, Any]) -> list[str]:
    return [f"CircularEval accuracy {m['circular_accuracy']:.2f}% over {m['n_questions']} questions "
            f"({m['n_rows']} rows); unmatched {m['unmatched']}, missing {m['missing_predictions']}"]


HOOK = MetricHook(from_files, as_text, "CircularEval accuracy: --answers A.jsonl|P.tsv (index, prediction) "
                                       "[--ground-truth mmbench_dev.tsv]")
