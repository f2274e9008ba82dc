"""Answer files (docs/answer-format.md) -> the official submission formats.

- ``mme``: MME eval_tool result files ``{out}/{category}.txt``, lines ``image<TAB>question<TAB>gt<TAB>prediction``,
  the question spelled as in MME's ground truth (LLaVA's suffix replaced by " Please answer yes or no.", like LLaVA's
  convert_answer_to_mme.py), the two questions of each image on adjacent lines (eval_tool pairs lines two by two).
- ``mmbench``: the MMBench submission table as ``.xlsx`` (and a ``.tsv`` beside it): the question tsv without its
  image column, with ``prediction`` after the option columns; rows without an answer keep an empty prediction.
- ``mmvet``: the MM-Vet grader's JSON ``{"v1_{question_id}": answer}``.

::

    python -m llava.eval.formats mme --answers answers.jsonl --gt-file llava_mme_gt.jsonl --out mme_results/
    python -m llava.eval.formats mmbench --answers answers.jsonl --question-file mmbench_dev_20230712.tsv --out sub.xlsx
    python -m llava.eval.formats mmvet --answers answers.jsonl --out mmvet_results.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from llava.errors import UnsupportedError
from llava.eval.jsonl import DatasetError, read_jsonl
from llava.eval.benchmarks.mmbench import OPTION_LETTERS, read_mmbench_table
from llava.eval.benchmarks.mme import MMEGroundTruth, mme_question_variants

__all__ = ["read_answers", "mme_result_lines", "write_mme", "mmbench_table", "write_mmbench", "mmvet_results",
           "write_mmvet", "CONVERTERS", "main"]

logger = logging.getLogger(__name__)


def read_answers(paths: Iterable[str | Path], benchmark: str | None = None) -> list[dict[str, Any]]:
    """Answer rows from one or more files (shards), in file order; a repeated id keeps its last row. Rows of another
    benchmark (their ``benchmark`` field says so) or without ``text`` raise DatasetError."""
    by_id: dict[str, dict[str, Any]] = {}
    repeats = 0
    for path in paths:
        for n, row in enumerate(read_jsonl(path, "answer file"), 1):
            if "text" not in row:
                raise DatasetError(f"{path}: row {n} has no 'text' field (has {sorted(row)})")
            if benchmark and row.get("benchmark", benchmark) != benchmark:
                raise DatasetError(f"{path}: row {n} is a {row['benchmark']!r} answer, expected {benchmark!r}")
            key = str(row.get("id", f"{path}:{n}"))
            repeats += key in by_id
            by_id.pop(key, None)
            by_id[key] = row
    if repeats:
        logger.warning("%d answer rows repeat an earlier id; the last one of each was kept", repeats)
    return list(by_id.values())


def _field(row: dict[str, Any], name: str) -> Any:
    """An id field: top level (answer-format) or, for hand-made rows, under meta."""
    return row[name] if name in row else row.get("meta", {}).get(name)


def _mme_gt(row: dict[str, Any], gt: MMEGroundTruth | None) -> tuple[str, str] | None:
    category, question_id, prompt = _field(row, "category"), _field(row, "question_id"), row.get("query", "")
    if gt is not None:
        return gt.lookup(category, question_id, prompt)
    meta = row.get("meta", {})
    if meta.get("gt_answer") is not None:
        return meta.get("mme_question") or mme_question_variants(prompt)[0], meta["gt_answer"]
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").splitlines())


def _occurrence(row: dict[str, Any]) -> int:
    """k of an MME id ``{question_id}#{k}`` (0 when the id has no such suffix)."""
    _, sep, k = str(row.get("id", "")).rpartition("#")
    return int(k) if sep and k.isdigit() else 0


def mme_result_lines(answers: list[dict[str, Any]], gt: MMEGroundTruth | None = None) -> dict[str, list[str]]:
    """category -> eval_tool lines, images in question-id order, each image's questions adjacent in ``#k`` order.
    Ground truth from ``gt`` or else each row's meta (the reader's ``--gt-file``)."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)  # (category, question_id) -> lines
    unknown = []
    for row in answers:
        category, question_id = _field(row, "category"), _field(row, "question_id")
        if category is None or question_id is None:
            raise DatasetError(f"MME answer {row.get('id')!r} lacks category/question_id")
        found = _mme_gt(row, gt)
        if found is None:
            unknown.append(str(row.get("id")))
            continue
        line = "\t".join((str(question_id).split("/")[-1], found[0], found[1], _one_line(row["text"])))
        groups[category, question_id].append((_occurrence(row), line))
    if unknown:
        raise DatasetError(f"{len(unknown)} MME answers have no ground truth (first: {unknown[0]}); pass --gt-file "
                           "(llava_mme_gt.jsonl or the MME_Benchmark_release_version folder)")
    lines: dict[str, list[str]] = defaultdict(list)
    for (category, question_id), items in sorted(groups.items(), key=lambda g: g[0]):  # same for any shard order
        if len(items) != 2:
            logger.warning("MME image %s has %d answers, eval_tool expects 2", question_id, len(items))
        lines[category].extend(line for _, line in sorted(items, key=lambda item: item[0]))
    return dict(lines)


def write_mme(answers: list[dict[str, Any]], out_dir: str | Path, gt: MMEGroundTruth | None = None) -> dict[str, int]:
    """Write ``{out_dir}/{category}.txt``; returns category -> line count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for category, lines in mme_result_lines(answers, gt).items():
        (out_dir / f"{category}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        counts[category] = len(lines)
    return counts


def mmbench_table(answers: list[dict[str, Any]], question_file: str | Path):
    """The submission DataFrame: question tsv rows (no image column) with ``prediction`` after the options."""
    rows = read_mmbench_table(question_file)  # raises UnsupportedError when pandas is absent
    import pandas as pd

    predictions = {int(_field(a, "index")): a["text"] for a in answers if (_field(a, "round") or 0) == 0}
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


def mmvet_results(answers: list[dict[str, Any]]) -> dict[str, str]:
    """``{"v1_{question_id}": answer}`` in question-id order (LLaVA's convert_mmvet_for_eval.py)."""
    ids = [(_field(a, "question_id"), a["text"]) for a in answers]
    if any(qid is None for qid, _ in ids):
        raise DatasetError("an MM-Vet answer has no question_id")
    ids.sort(key=lambda item: (not str(item[0]).isdigit(), int(item[0]) if str(item[0]).isdigit() else 0,
                               str(item[0])))
    return {f"v1_{qid}": text for qid, text in ids}


def write_mmvet(answers: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(mmvet_results(answers), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _run_mme(args: argparse.Namespace) -> str:
    gt = MMEGroundTruth.load(args.gt_file) if args.gt_file else None
    counts = write_mme(read_answers(args.answers, "mme"), args.out, gt)
    return f"wrote {sum(counts.values())} lines in {len(counts)} category files under {args.out}"


def _run_mmbench(args: argparse.Namespace) -> str:
    xlsx, tsv = write_mmbench(read_answers(args.answers, "mmbench"), args.question_file, args.out)
    return f"wrote {xlsx} and {tsv}"


def _run_mmvet(args: argparse.Namespace) -> str:
    return f"wrote {write_mmvet(read_answers(args.answers, 'mmvet'), args.out)}"


CONVERTERS = {"mme": _run_mme, "mmbench": _run_mmbench, "mmvet": _run_mmvet}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.formats",
                                     description="Convert answer files to official submission formats.")
    sub = parser.add_subparsers(dest="format", required=True, metavar="{mme,mmbench,mmvet}")
    helps = {"mme": "MME eval_tool result files {out}/{category}.txt",
             "mmbench": "MMBench submission .xlsx (+ .tsv beside it)",
             "mmvet": "MM-Vet grader JSON {\"v1_{question_id}\": answer}"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--answers", nargs="+", required=True,
                       help="answer file(s) from llava.eval.generate (shards may be listed together)")
    sub.choices["mme"].add_argument("--out", required=True, help="output folder for the {category}.txt files")
    sub.choices["mme"].add_argument("--gt-file", default=None,
                                    help="llava_mme_gt.jsonl or the MME_Benchmark_release_version folder; default: "
                                         "the ground truth the reader put in each answer's meta")
    sub.choices["mmbench"].add_argument("--question-file", required=True,
                                        help="the MMBench tsv the answers were generated from")
    sub.choices["mmbench"].add_argument("--out", required=True, help="output .xlsx path (a .tsv is written beside)")
    sub.choices["mmvet"].add_argument("--out", required=True, help="output JSON path")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    logger.info("%s", CONVERTERS[args.format](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
