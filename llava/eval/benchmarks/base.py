"""What every benchmark reader shares: the ``Sample`` it yields, the typed ``BenchmarkConfig`` it reads, the data
errors, small row helpers, and the missing-image check the runner calls."""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from llava.errors import ImageError
from llava.eval.jsonl import DatasetError, require_file

__all__ = [
    "Sample",
    "BenchmarkConfig",
    "DatasetError",
    "MissingImageError",
    "IncompleteImageFolderError",
    "check_images",
    "require_all_images",
    "read_csv_rows",
    "summarize_missing",
    "require_fields",
    "answer_field",
    "numbered_ids",
    "is_missing",
    "clean_value",
]

logger = logging.getLogger(__name__)

# How many missing images check_images names one by one in the log before it only counts.
MISSING_LOG_LIMIT = 20


class MissingImageError(ImageError):
    """A sample's image file does not exist (raised only in strict mode). ``path`` is the path that was looked up."""

    code = "missing_image"

    def __init__(self, path: str, sample_id: str = "") -> None:
        where = f" (sample {sample_id})" if sample_id else ""
        super().__init__(f"image not found: {path}{where}")
        self.path = path
        self.sample_id = sample_id


class IncompleteImageFolderError(DatasetError):
    """A benchmark whose images must all be there (rendered ones: a partial folder means a broken render) lacks some;
    the message lists them."""

    code = "incomplete_image_folder"


@dataclass(frozen=True)
class Sample:
    """One benchmark question.

    ``image`` is what the model gets: a file path, raw encoded bytes (MMBench keeps images inline as base64), or
    ``None`` for a text-only question. ``image_name`` is the image as written to the answer file (relative to the
    image folder; ``None`` when there is no file). ``meta`` holds the benchmark id fields of docs/answer-format.md
    and whatever metrics need (ground truth, options, category ...), JSON-serialisable.
    """

    id: str
    image: str | bytes | None
    query: str
    meta: dict[str, Any] = field(default_factory=dict)
    benchmark: str = ""
    image_name: str | None = None


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to read. Built once at the entry point (``config_from_args`` maps the CLI flags) and passed to
    ``load_samples``.

    question_file: the benchmark's question file (or folder, where the benchmark reads one).
    image_folder: root the image names in the question file are relative to ("" = current directory).
    mode, scenarios, tiny_list, gt_file: benchmark-specific options; a benchmark's spec lists the ones it takes
    (``BenchmarkSpec.options``, with their meaning) and any other one set is an error.
    limit: keep the first N samples after every filter.
    strict: raise on what would otherwise be reported and skipped (missing images, a question file without them).
    """

    question_file: str | Path
    image_folder: str | Path = ""
    mode: str | None = None
    scenarios: tuple[str, ...] = ()
    tiny_list: str | Path | None = None
    gt_file: str | Path | None = None
    limit: int | None = None
    strict: bool = False

    def options_set(self) -> set[str]:
        """Names of the benchmark-specific options this config sets (for the spec's option check)."""
        given = {"mode": self.mode is not None, "scenarios": bool(self.scenarios),
                 "tiny_list": self.tiny_list is not None, "gt_file": self.gt_file is not None}
        return {name for name, is_set in given.items() if is_set}


def is_missing(value: Any) -> bool:
    """LLaVA's ``is_none``: None, NaN, or the strings "nan"/"none" (any case) count as absent."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def clean_value(value: Any) -> Any:
    """A table cell made JSON-safe: absent -> None, numpy scalars -> Python scalars."""
    if is_missing(value):
        return None
    return value.item() if hasattr(value, "item") else value


def require_fields(row: dict[str, Any], n: int, path: str | Path, fields: Iterable[str],
                   text: Iterable[str] = ()) -> None:
    """Row ``n`` of ``path`` has every field of ``fields``, and those in ``text`` are strings; DatasetError
    naming the row otherwise."""
    absent = [f for f in fields if f not in row]
    if absent:
        raise DatasetError(f"{path}: row {n} lacks {absent} (has {sorted(row)})")
    for f in text:
        if not isinstance(row[f], str):
            raise DatasetError(f"{path}: row {n}: {f!r} must be a string, got {type(row[f]).__name__} "
                               f"{str(row[f])[:80]!r}")


def answer_field(row: dict[str, Any], name: str) -> Any:
    """An id field of an answer row: at top level (docs/answer-format.md) or, in hand-made rows, under ``meta``."""
    return row[name] if name in row else row.get("meta", {}).get(name)


def numbered_ids(keys: Iterable[str], always: bool) -> list[str]:
    """Unique ids from possibly repeating keys: the k-th occurrence of a key becomes ``{key}#{k}``.

    ``always=True`` numbers every key (MME: two questions per image, so ``...png#0``/``...png#1``); otherwise the
    first occurrence keeps the bare key and only repeats get a suffix."""
    seen: Counter[str] = Counter()
    ids = []
    for key in keys:
        k = seen[key]
        seen[key] += 1
        ids.append(f"{key}#{k}" if always or k else key)
    return ids


def check_images(samples: Iterable[Sample], strict: bool = False) -> tuple[list[Sample], list[str]]:
    """Split samples into those whose image is usable and the paths of image files that do not exist.

    Bytes and text-only samples always pass. Missing files are logged (the first few by path, then a count);
    with ``strict`` the first one raises MissingImageError naming the path instead."""
    ok: list[Sample] = []
    missing: list[str] = []
    for sample in samples:
        if isinstance(sample.image, str) and not os.path.isfile(sample.image):
            if strict:
                raise MissingImageError(sample.image, sample.id)
            if len(missing) < MISSING_LOG_LIMIT:
                logger.warning("image not found, skipping sample %s: %s", sample.id, sample.image)
            missing.append(sample.image)
            continue
        ok.append(sample)
    if missing:
        logger.warning("%d of %d samples skipped: image file missing", len(missing), len(ok) + len(missing))
    return ok, missing


def summarize_missing(missing: list[str], limit: int = MISSING_LOG_LIMIT) -> str:
    """A multi-line end-of-run report of missing image paths (all counted, the first ``limit`` listed)."""
    if not missing:
        return "no missing images"
    lines = [f"{len(missing)} missing image(s):"] + [f"  {p}" for p in missing[:limit]]
    if len(missing) > limit:
        lines.append(f"  ... and {len(missing) - limit} more")
    return "\n".join(lines)


def iter_limited(samples: Iterable[Sample], limit: int | None) -> Iterator[Sample]:
    """The first ``limit`` samples (all when ``limit`` is None)."""
    for n, sample in enumerate(samples):
        if limit is not None and n >= limit:
            return
        yield sample


def require_all_images(samples: list[Sample], image_folder: str | Path, how_to_make: str) -> None:
    """Raise IncompleteImageFolderError listing the samples' image files that do not exist (the first
    ``MISSING_LOG_LIMIT``, then a count) and saying how to make them; nothing when all are there."""
    missing = [s.image for s in samples if isinstance(s.image, str) and not os.path.isfile(s.image)]
    if missing:
        raise IncompleteImageFolderError(f"{len(missing)} of {len(samples)} images are missing from "
                                         f"{str(image_folder) or '.'} ({how_to_make}); refusing to start. "
                                         + summarize_missing(missing))


def read_csv_rows(path: str | Path, required: Iterable[str], nonempty: Iterable[str] = ()) -> list[tuple[int, dict]]:
    """The rows of a CSV file with a header row, each with the line it starts on. A missing file, a header without a
    ``required`` column, a row cut short, or an empty (blank) value in a ``nonempty`` column is a DatasetError naming
    the file and line."""
    path = require_file(path, "question file")
    required, nonempty = list(required), list(nonempty)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            absent = [c for c in required if c not in (reader.fieldnames or [])]
            if absent:
                raise DatasetError(f"{path} line 1: the header lacks column(s) {absent} (has {reader.fieldnames or []})")
            rows, start = [], reader.line_num + 1
            for row in reader:
                short = [c for c in required if row.get(c) is None]
                if short:
                    raise DatasetError(f"{path} line {start}: the row ends before column(s) {short}")
                blank = [c for c in nonempty if not row[c].strip()]
                if blank:
                    raise DatasetError(f"{path} line {start}: empty {', '.join(map(repr, blank))}")
                rows.append((start, row))
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a valid CSV file ({e})") from None
    return rows
