"""MM-Vet: LLaVA's ``llava-mm-vet.jsonl`` (image, text, category, question_id) with images ``{image_folder}/{image}``
(the official ``mm-vet/images`` folder). The question is asked as it is, without a prompt suffix (LLaVA's mmvet.sh).

Samples are keyed ``v1_{question_id}`` in MM-Vet's own files: its ground truth ``mm-vet.json``
(``{"v1_0": {"question", "answer", "capability", "imagename"}}``), its grades and the grader's submission JSON
``{"v1_{question_id}": answer}``. Answers are graded 0.0-1.0 against the ground truth by the judge's grader."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Iterator

from llava.errors import InvalidRequestError
from llava.eval.benchmarks.base import BenchmarkConfig, DatasetError, Sample, answer_field, require_fields
from llava.eval.benchmarks.spec import BenchmarkSpec, DataLayout, Grading, JudgeProtocol, SubmissionFormat
from llava.eval.jsonl import read_jsonl

__all__ = ["SPEC", "read_mmvet", "mmvet_key", "load_ground_truth", "grading_values", "is_mmvet_row", "mmvet_results",
           "write_mmvet"]

REQUIRED_FIELDS = ("image", "text", "question_id")


def read_mmvet(config: BenchmarkConfig) -> Iterator[Sample]:
    """One sample per row; id = str(question_id), which must be unique."""
    rows = read_jsonl(config.question_file)
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        require_fields(row, n, config.question_file, REQUIRED_FIELDS, text=("image", "text"))
        sample_id = str(row["question_id"])
        if sample_id in seen:
            raise DatasetError(f"{config.question_file}: row {n} repeats question_id {sample_id}")
        seen.add(sample_id)
        meta = {"question_id": row["question_id"], "category": row.get("category")}
        yield Sample(id=sample_id, image=str(Path(config.image_folder) / row["image"]), query=row["text"],
                     meta=meta, benchmark="mmvet", image_name=row["image"])


def mmvet_key(question_id: Any) -> str:
    """MM-Vet's sample key: ``0`` or ``"0"`` -> ``"v1_0"``; ``"v1_0"`` stays."""
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


def load_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """MM-Vet's ``mm-vet.json``: ``{"v1_0": {"question", "answer", "capability", "imagename"}, ...}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"cannot read MM-Vet ground truth {path}: {e}") from e
    bad = [k for k, v in data.items() if not isinstance(v, dict) or "question" not in v or "answer" not in v]
    if bad:
        raise InvalidRequestError(f"{path}: samples without question/answer: {bad[:5]}")
    return data


def grading_values(row: dict[str, Any], answer_id: str, ground_truth: dict[str, Any]) -> dict[str, Any]:
    """The grader prompt's question and ground truth for an answer (``<AND>``/``<OR>`` spaced as MM-Vet does)."""
    key = mmvet_key(row.get("question_id", answer_id))
    sample = ground_truth.get(key)
    if sample is None:
        raise InvalidRequestError(f"MM-Vet answer {answer_id!r} has no ground truth (key {key!r})")
    return {"question": sample["question"],
            "ground_truth": sample["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")}


def is_mmvet_row(row: dict[str, Any]) -> bool:
    """A LLaVA VQA question-file row that is not MME's (MME uses the image path as question_id)."""
    return str(row.get("question_id")) != str(row.get("image"))


def mmvet_results(answers: list[dict[str, Any]]) -> dict[str, str]:
    """``{"v1_{question_id}": answer}`` in question-id order (LLaVA's convert_mmvet_for_eval.py)."""
    ids = [(answer_field(a, "question_id"), a["text"]) for a in answers]
    if any(qid is None for qid, _ in ids):
        raise DatasetError("an MM-Vet answer has no question_id")
    ids.sort(key=lambda item: (not str(item[0]).isdigit(), int(item[0]) if str(item[0]).isdigit() else 0,
                               str(item[0])))
    return {mmvet_key(qid): text for qid, text in ids}


def write_mmvet(answers: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(mmvet_results(answers), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _submission_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSON path")


def _write_submission(answers: list[dict[str, Any]], args: argparse.Namespace) -> str:
    return f"wrote {write_mmvet(answers, args.out)}"


SPEC = BenchmarkSpec(
    name="mmvet",
    summary="MM-Vet open-ended questions (graded by GPT-4 from the v1_{question_id} JSON)",
    reader=read_mmvet,
    id_fields=("question_id",),
    question_file="llava-mm-vet.jsonl (rows: image, text, category, question_id)",
    image_folder="mm-vet/images: {image_folder}/{image}",
    metric="mmvet",
    layout=DataLayout("playground/data/eval/mm-vet/llava-mm-vet.jsonl", "playground/data/eval/mm-vet/images"),
    recognizes=is_mmvet_row,
    judge=JudgeProtocol("mmvet_grader", "0.0-1.0 correctness against --ground-truth mm-vet.json",
                        Grading("mmvet_grader.jsonl", "mm-vet.json", load_ground_truth, grading_values)),
    report_keys=("total",),
    submission=SubmissionFormat('MM-Vet grader JSON {"v1_{question_id}": answer}', _submission_arguments,
                                _write_submission),
)
