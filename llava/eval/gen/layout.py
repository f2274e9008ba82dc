"""Where each benchmark's files live under ``--data-root`` (the seed scripts' ``data/`` layout for the safety
benchmarks, LLaVA's ``playground/data/eval/`` for the utility ones). One table, used by ``--data-root`` and by the
shell scripts, which pass ``--data-root`` instead of repeating paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava.errors import InvalidRequestError

__all__ = ["DataLayout", "DATA_LAYOUT", "resolve_data_paths", "layout_help"]


@dataclass(frozen=True)
class DataLayout:
    question_file: str
    image_folder: str = ""


DATA_LAYOUT: dict[str, DataLayout] = {
    "vlsafe": DataLayout("data/vlsafe/VLSafe_harmlessness_examine/data.jsonl", "data/coco/images/train2017"),
    "mmsafetybench": DataLayout("data/mmsafe/processed_questions", "data/mmsafe/images"),
    "mme": DataLayout("playground/data/eval/MME/llava_mme.jsonl",
                      "playground/data/eval/MME/MME_Benchmark_release_version"),
    "mmbench": DataLayout("playground/data/eval/mmbench/mmbench_dev_20230712.tsv"),
    "mmvet": DataLayout("playground/data/eval/mm-vet/llava-mm-vet.jsonl", "playground/data/eval/mm-vet/images"),
}


def resolve_data_paths(benchmark: str, data_root: str | None, question_file: str | None,
                       image_folder: str | None) -> tuple[str, str]:
    """(question file, image folder): the flags when given, else the layout's paths under ``data_root``."""
    layout = DATA_LAYOUT.get(benchmark)
    if question_file is None:
        if data_root is None or layout is None:
            raise InvalidRequestError("give --question-file (or --data-root, to use the standard layout under it)")
        question_file = str(Path(data_root) / layout.question_file)
    if image_folder is None:
        image_folder = str(Path(data_root) / layout.image_folder) if data_root and layout and layout.image_folder \
            else ""
    return question_file, image_folder


def layout_help() -> str:
    return "; ".join(f"{name}: {lay.question_file}" + (f", images {lay.image_folder}" if lay.image_folder else "")
                     for name, lay in DATA_LAYOUT.items())
