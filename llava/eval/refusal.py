"""``python -m llava.eval.refusal``: classify answers as refusals with ``refusal-match`` (no endpoint, no model).

Reads a CSV or JSONL file and writes one JSON line per input row, in input order:
``{"refusal": true|false, "kind": "full"|"partial"|null, "matched": "<the text the cue matched>"|null}``.
The rules are in ``llava/eval/refusal_match.py``; their agreement with XSTest's human labels is in
docs/judge-and-metrics.md. To judge an answer file for metrics and reports instead, use
``python -m llava.eval.judge --judge-model refusal-match``.

Exit status: 0 done; 2 bad input (the message names the file, the line or row, and the column).
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from llava.eval.jsonl import DatasetError, encode_rows, read_jsonl, require_file
from llava.eval.refusal_match import classify

__all__ = ["read_texts", "classify_file", "build_parser", "main"]

logger = logging.getLogger(__name__)


def read_texts(path: Path, column: str) -> Iterator[str]:
    """The ``column`` of every row of a ``.csv`` (header row) or ``.jsonl`` file, in order. A missing column or a
    value that is not text is an error naming the file and line (an empty value is an empty answer)."""
    path = require_file(path, "input file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DatasetError(f"{path}: no column {column!r}; columns: {reader.fieldnames or []}")
            for row in reader:
                if row[column] is None:
                    raise DatasetError(f"{path} line {reader.line_num}: the row ends before column {column!r}")
                yield row[column]
        return
    if path.suffix.lower() != ".jsonl":
        raise DatasetError(f"{path}: expected a .csv or .jsonl file")
    for index, row in enumerate(read_jsonl(path, "input file"), 1):
        value = row.get(column)
        if not isinstance(value, str):
            raise DatasetError(f"{path} row {index}: {column!r} is {value!r}, not text (fields: {sorted(row)})")
        yield value


def classify_file(path: Path, column: str) -> list[dict[str, Any]]:
    """One ``{"refusal", "kind", "matched"}`` row per input row."""
    return [classify(text).to_dict() for text in read_texts(path, column)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.refusal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="a .csv (with a header row) or .jsonl file of answers")
    p.add_argument("--column", default="completion",
                   help="the column (CSV) or field (JSONL) holding the answer text (default completion)")
    p.add_argument("--out", type=Path, default=None, help="output JSONL (default: standard output)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = classify_file(args.input, args.column)
    except DatasetError as e:
        logger.error("%s", e)
        return 2
    text = encode_rows(rows)
    if args.out is None:
        sys.stdout.buffer.write(text)
    else:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_bytes(text)
        except OSError as e:
            logger.error("cannot write %s: %s", args.out, e)
            return 2
    kinds = Counter(r["kind"] for r in rows)
    logger.info("%d answers: %d refusals (%d full, %d partial), %d not refused%s", len(rows),
                kinds["full"] + kinds["partial"], kinds["full"], kinds["partial"], kinds[None],
                f"; written to {args.out}" if args.out else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
