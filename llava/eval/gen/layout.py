"""``--data-root``: each benchmark's files at their standard place under one folder (the layout each spec declares,
``BenchmarkSpec.layout``). Used by ``llava.eval.generate`` and by the shell scripts, which pass ``--data-root``
instead of repeating paths."""
from __future__ import annotations

from pathlib import Path

from llava.errors import InvalidRequestError
from llava.eval.benchmarks import BENCHMARKS, DataLayout

__all__ = ["DATA_LAYOUT", "resolve_data_paths", "layout_help"]

# Benchmark name -> its layout (benchmarks without a standard layout are left out).
DATA_LAYOUT: dict[str, DataLayout] = {name: spec.layout for name, spec in BENCHMARKS.items() if spec.layout}


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
