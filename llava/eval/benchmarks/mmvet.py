"""MM-Vet: LLaVA's ``llava-mm-vet.jsonl`` (image, text, category, question_id) with images ``{image_folder}/{image}``
(the official ``mm-vet/images`` folder). The question is asked as it is, without a prompt suffix (LLaVA's mmvet.sh)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from llava.eval.benchmarks.base import BenchmarkConfig, BenchmarkSpec, DatasetError, Sample, require_fields
from llava.eval.jsonl import read_jsonl

__all__ = ["SPEC", "read_mmvet"]

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


SPEC = BenchmarkSpec(
    name="mmvet",
    summary="MM-Vet open-ended questions (graded by GPT-4 from the v1_{question_id} JSON)",
    reader=read_mmvet,
    id_fields=("question_id",),
    question_file="llava-mm-vet.jsonl (rows: image, text, category, question_id)",
    image_folder="mm-vet/images: {image_folder}/{image}",
)
