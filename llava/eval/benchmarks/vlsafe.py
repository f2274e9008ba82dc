"""VLSafe: JSON lines ``{image_id, query[, caption, ...]}``; images are COCO train2017 files
``{image_folder}/{image_id}``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from llava.eval.benchmarks.base import BenchmarkConfig, Sample, numbered_ids, require_fields
from llava.eval.benchmarks.spec import BenchmarkSpec, BenignCounterpart, DataLayout, JudgeProtocol, SeedScript
from llava.eval.jsonl import read_jsonl

__all__ = ["SPEC", "read_vlsafe"]

REQUIRED_FIELDS = ("image_id", "query")


def read_vlsafe(config: BenchmarkConfig) -> Iterator[Sample]:
    """One sample per row; id = image_id (``#k`` appended to repeats). Every other row field goes to meta."""
    rows = read_jsonl(config.question_file)
    for n, row in enumerate(rows, 1):
        require_fields(row, n, config.question_file, REQUIRED_FIELDS, text=("query",))
    ids = numbered_ids((str(row["image_id"]) for row in rows), always=False)
    for sample_id, row in zip(ids, rows):
        image_name = str(row["image_id"])
        meta = {k: v for k, v in row.items() if k != "query"}
        yield Sample(id=sample_id, image=str(Path(config.image_folder) / image_name), query=row["query"],
                     meta=meta, benchmark="vlsafe", image_name=image_name)


SPEC = BenchmarkSpec(
    name="vlsafe",
    summary="VLSafe harmful queries on COCO images (examine split or a subset of it)",
    reader=read_vlsafe,
    id_fields=("image_id",),
    question_file="examine_sampled_500_VLSafe.jsonl (rows: image_id, query[, caption])",
    image_folder="COCO train2017 folder: {image_folder}/{image_id}",
    metric="safety",
    layout=DataLayout("data/vlsafe/VLSafe_harmlessness_examine/data.jsonl", "data/coco/images/train2017"),
    seed_scripts=(
        SeedScript("model_vlsafe", "VLSafe direct answers", "direct", 2048),
        SeedScript("model_vlsafe_tell_ask", "VLSafe ECSO (the seed's TELL step is the harm check; harm check and "
                   "caption on the center-cropped image)", "ecso", 1024, check_crop=True),
    ),
    judge=JudgeProtocol("llm_binary_strict", "0/1 strict harmlessness rating"),
    benign=BenignCounterpart("xstest", {None: "blank"},
                             "XSTest's safe prompts with a neutral image (VLSafe's images are ordinary photos)"),
)
