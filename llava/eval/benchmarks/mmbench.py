"""MMBench: the official tsv (index, question, hint, A-D, answer, image as base64, category, l2-category, ...;
"nan" for an absent cell), every row including the circular copies. The prompt is built exactly as LLaVA's
model_vqa_mmbench.py does with ``--single-pred-prompt`` (one round, options in file order).

Submission: the MMBench table as ``.xlsx`` (and a ``.tsv`` beside it): the question tsv without its image column,
with ``prediction`` after the option columns; rows without an answer keep an empty prediction."""
from __future__ import annotations

import argparse
import base64
import binascii
import logging
from pathlib import Path
from typing import Any, Iterator

from llava.errors import UnsupportedError
from llava.eval.benchmarks.base import BenchmarkConfig, DatasetError, Sample, answer_field, clean_value, is_missing
from llava.eval.benchmarks.spec import BenchmarkSpec, DataLayout, ScriptFlags, SeedScript, SubmissionFormat
from llava.eval.jsonl import require_file

__all__ = ["SPEC", "OPTION_LETTERS", "MMBENCH_PROMPT_SUFFIX", "build_mmbench_query", "row_options",
           "read_mmbench_table", "read_mmbench", "mmbench_table", "write_mmbench"]

logger = logging.getLogger(__name__)

OPTION_LETTERS = ("A", "B", "C", "D")
# LLaVA's single-prediction prompt (English), appended on its own line after the options.
MMBENCH_PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
# Columns copied into meta when present (besides index/question/hint/options/answer).
_EXTRA_COLUMNS = ("category", "l2-category", "split", "source")
# In some tsv exports a row's image cell holds another row's index instead of base64 (circular copies).
_IMAGE_REF_MAX_LEN = 64


def row_options(row: dict[str, Any]) -> list[str]:
    """Option texts A, B, ... up to the first absent one (LLaVA's get_options)."""
    options = []
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        if is_missing(value):
            break
        options.append(str(value))
    return options


def build_mmbench_query(question: str, hint: Any, options: list[str]) -> str:
    """``{hint}\\n{question}`` (hint only when present), then ``\\nA. ...`` per option, then the suffix line."""
    text = question if is_missing(hint) else f"{hint}\n{question}"
    for letter, option in zip(OPTION_LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"{text}\n{MMBENCH_PROMPT_SUFFIX}"


def read_mmbench_table(path) -> list[dict[str, Any]]:
    """The tsv rows as dicts, read the way LLaVA reads it (``pandas.read_table`` with default NA handling)."""
    try:
        import pandas as pd
    except ImportError as e:  # pandas is in the [eval] extra
        raise UnsupportedError("reading MMBench needs pandas: pip install 'ecso[eval]'") from e
    path = require_file(path, "MMBench tsv")
    table = pd.read_table(path)
    for column in ("index", "question"):
        if column not in table.columns:
            raise DatasetError(f"{path}: no {column!r} column (columns: {list(table.columns)})")
    return table.to_dict("records")


def _decode_image(row: dict[str, Any], by_index: dict[int, str]) -> bytes | None:
    value = row.get("image")
    if is_missing(value):
        return None
    value = str(value)
    if len(value) <= _IMAGE_REF_MAX_LEN and value.isdigit() and int(value) in by_index:
        value = by_index[int(value)]
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as e:
        raise DatasetError(f"MMBench row index {row['index']}: image cell is not base64 ({e})") from e


def _meta(row: dict[str, Any], options: list[str]) -> dict[str, Any]:
    meta = {"index": int(row["index"]), "round": 0, "question": str(row["question"]),
            "hint": clean_value(row.get("hint")), "options": options,
            "option_letters": list(OPTION_LETTERS[: len(options)]), "answer": clean_value(row.get("answer"))}
    meta.update({column: clean_value(row[column]) for column in _EXTRA_COLUMNS if column in row})
    return meta


def read_mmbench(config: BenchmarkConfig) -> Iterator[Sample]:
    """One sample per tsv row; id = str(index); image = decoded bytes, or None when the tsv has no image
    (a text-only derivative; an error with ``strict``)."""
    rows = read_mmbench_table(config.question_file)
    has_images = bool(rows) and "image" in rows[0]
    if not has_images:
        if config.strict:
            raise DatasetError(f"{config.question_file} has no image column (a text-only derivative?)")
        logger.warning("%s has no image column: every MMBench question is asked without its image",
                       config.question_file)
    by_index = {int(r["index"]): r["image"] for r in rows if not is_missing(r.get("image"))} if has_images else {}
    for row in rows:
        image = _decode_image(row, by_index) if has_images else None
        if has_images and image is None and config.strict:
            raise DatasetError(f"{config.question_file}: row index {row['index']} has no image")
        options = row_options(row)
        yield Sample(id=str(int(row["index"])), image=image,
                     query=build_mmbench_query(str(row["question"]), row.get("hint"), options),
                     meta=_meta(row, options), benchmark="mmbench", image_name=None)


def mmbench_table(answers: list[dict[str, Any]], question_file: str | Path):
    """The submission DataFrame: question tsv rows (no image column) with ``prediction`` after the options."""
    rows = read_mmbench_table(question_file)  # raises UnsupportedError when pandas is absent
    import pandas as pd

    predictions = {int(answer_field(a, "index")): a["text"] for a in answers if (answer_field(a, "round") or 0) == 0}
    table = pd.DataFrame(rows).drop(columns=["image"], errors="ignore")
    after = max((i for i, c in enumerate(table.columns) if c in OPTION_LETTERS), default=len(table.columns) - 1)
    table.insert(after + 1, "prediction", [predictions.get(int(i)) for i in table["index"]])
    absent = int(table["prediction"].isna().sum())
    if absent:
        logger.warning("%d of %d MMBench questions have no answer (empty prediction)", absent, len(table))
    unknown = set(predictions) - set(int(i) for i in table["index"])
    if unknown:
        raise DatasetError(f"{len(unknown)} MMBench answers have an index not in {question_file} "
                           f"(e.g. {sorted(unknown)[:5]})")
    return table


def write_mmbench(answers: list[dict[str, Any]], question_file: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write the submission as ``out`` (.xlsx) and the same table as a .tsv beside it; returns both paths."""
    try:
        import openpyxl  # noqa: F401  (pandas' xlsx engine)
    except ImportError as e:
        raise UnsupportedError("writing xlsx needs openpyxl: pip install 'ecso[eval]'") from e
    table = mmbench_table(answers, question_file)
    xlsx = Path(out).with_suffix(".xlsx")
    xlsx.parent.mkdir(parents=True, exist_ok=True)
    table.to_excel(xlsx, index=False, engine="openpyxl")
    tsv = xlsx.with_suffix(".tsv")
    table.to_csv(tsv, sep="\t", index=False)
    return xlsx, tsv


def _submission_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question-file", required=True, help="the MMBench tsv the answers were generated from")
    p.add_argument("--out", required=True, help="output .xlsx path (a .tsv is written beside)")


def _write_submission(answers: list[dict[str, Any]], args: argparse.Namespace) -> str:
    xlsx, tsv = write_mmbench(answers, args.question_file, args.out)
    return f"wrote {xlsx} and {tsv}"


def _add_llava_flags(p: argparse.ArgumentParser) -> None:
    """LLaVA's model_vqa_mmbench.py flags."""
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="accepted; the single-prediction prompt is always used (LLaVA-1.5's mmbench.sh sets it)")
    p.add_argument("--all-rounds", action="store_true", help="not supported (circular option rotation)")
    p.add_argument("--lang", default="en", help="only 'en'")


def _check_llava_flags(args: argparse.Namespace) -> None:
    if args.all_rounds:
        raise UnsupportedError("--all-rounds (circular option rotation) is not supported: the reader asks every "
                               "tsv row once, circular copies included")
    if args.lang != "en":
        raise UnsupportedError(f"--lang {args.lang!r}: only 'en' prompts are supported")


SPEC = BenchmarkSpec(
    name="mmbench",
    summary="MMBench multiple choice (all rows of the tsv, circular copies included; single-prediction prompt)",
    reader=read_mmbench,
    id_fields=("index", "round"),
    question_file="mmbench_dev_20230712.tsv (index, question, hint, A-D, answer, image as base64, category, ...)",
    image_folder="none: images are inline (base64 'image' column)",
    metric="mmbench",
    inline_images=True,
    layout=DataLayout("playground/data/eval/mmbench/mmbench_dev_20230712.tsv"),
    seed_scripts=(
        SeedScript("model_vqa_mmbench", "MMBench direct answers", "direct", 128,
                   flags=ScriptFlags(_add_llava_flags, _check_llava_flags)),
        SeedScript("model_mmbench_ask_unsafe", "MMBench ECSO (the whole answer checked)", "ecso", 1024,
                   image_in_safe_step=True, truncate_chars=0),
    ),
    report_keys=("circular_accuracy",),
    submission=SubmissionFormat("MMBench submission .xlsx (+ .tsv beside it)", _submission_arguments,
                                _write_submission),
)
