"""MME: LLaVA's ``llava_mme.jsonl`` (question_id, image, text, category; two questions per image) with images under
the ``MME_Benchmark_release_version`` folder, and the ground truth that MME's eval_tool scores against.

Ground truth comes from LLaVA-style ``llava_mme_gt.jsonl`` rows (question_id, category, mme_question, gt_answer) or
from the release folder itself (``{category}/questions_answers_YN/*.txt`` or ``{category}/*.txt``, lines
``question<TAB>answer``). Both are keyed like LLaVA's convert_answer_to_mme.py: (category, ``{image stem}.txt``,
MME question), where the MME question is LLaVA's prompt without its single-word suffix plus " Please answer yes or no."
(some official questions have two spaces before "Please"; both spellings are tried).

Submission: MME eval_tool result files ``{out}/{category}.txt``, lines ``image<TAB>question<TAB>gt<TAB>prediction``,
the question spelled as in MME's ground truth (like LLaVA's convert_answer_to_mme.py), the two questions of each
image on adjacent lines (eval_tool pairs lines two by two)."""
from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llava.eval.benchmarks.base import (BenchmarkConfig, DatasetError, Sample, answer_field, numbered_ids,
                                        require_fields)
from llava.eval.benchmarks.spec import BenchmarkSpec, DataLayout, SubmissionFormat
from llava.eval.jsonl import read_jsonl

__all__ = ["SPEC", "LLAVA_SUFFIX", "MME_SUFFIX", "MMEGroundTruth", "mme_question_variants", "gt_file_name",
           "resolve_mme_image", "read_mme", "is_mme_row", "mme_result_lines", "write_mme"]

logger = logging.getLogger(__name__)

LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."
_GT_KEY = tuple[str, str, str]  # (category, "{image stem}.txt", MME question)


def gt_file_name(question_id: str) -> str:
    """The eval_tool question file an MME image belongs to: ``code_reasoning/0020.png`` -> ``0020.txt``."""
    return question_id.split("/")[-1].split(".")[0] + ".txt"


def mme_question_variants(prompt: str) -> list[str]:
    """MME's own spelling(s) of a LLaVA prompt, in the order LLaVA's converter tries them."""
    question = prompt.replace(LLAVA_SUFFIX, "").strip() if LLAVA_SUFFIX in prompt else prompt
    if "Please answer yes or no." in question:
        return [question]
    return [question + MME_SUFFIX, question + " " + MME_SUFFIX]


@dataclass
class MMEGroundTruth:
    """(category, question file, MME question) -> "Yes"/"No"."""

    answers: dict[_GT_KEY, str] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "MMEGroundTruth":
        """From ``llava_mme_gt.jsonl`` (a file) or the ``MME_Benchmark_release_version`` folder."""
        path = Path(path).expanduser()
        if path.is_dir():
            return cls.from_folder(path)
        rows = read_jsonl(path, "MME ground-truth file")
        answers = {}
        for n, row in enumerate(rows, 1):
            try:
                key = (row["category"], gt_file_name(row["question_id"]), row["mme_question"])
                answers[key] = row["gt_answer"]
            except KeyError as e:
                raise DatasetError(f"{path}: row {n} lacks {e} (needs question_id, category, mme_question, "
                                   "gt_answer)") from e
        return cls(answers, str(path))

    @classmethod
    def from_folder(cls, root: Path) -> "MMEGroundTruth":
        answers = {}
        for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").is_dir() else category_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                for line in txt.read_text(encoding="utf-8").splitlines():
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise DatasetError(f"{txt}: expected 'question<TAB>answer', got {line!r}")
                    answers[(category_dir.name, txt.name, parts[0])] = parts[1]
        if not answers:
            raise DatasetError(f"no MME ground truth (*.txt question files) under {root}")
        return cls(answers, str(root))

    def lookup(self, category: str, question_id: str, prompt: str) -> tuple[str, str] | None:
        """(MME question as spelled in the ground truth, answer) for a LLaVA prompt, or None when unknown."""
        file = gt_file_name(question_id)
        for question in mme_question_variants(prompt):
            if (category, file, question) in self.answers:
                return question, self.answers[category, file, question]
        return None


def resolve_mme_image(image_folder: str | Path, image: str) -> Path:
    """``{image_folder}/{image}`` as LLaVA resolves it; when absent, the same image with or without the
    ``images/`` subfolder some categories use (``artwork/images/x.jpg`` vs ``artwork/x.jpg``)."""
    root = Path(image_folder)
    primary = root / image
    parts = image.split("/")
    if len(parts) == 3 and parts[1] == "images":
        alternatives = [root / parts[0] / parts[2]]
    elif len(parts) == 2:
        alternatives = [root / parts[0] / "images" / parts[1]]
    else:
        alternatives = []
    if primary.is_file():
        return primary
    return next((p for p in alternatives if p.is_file()), primary)


def read_mme(config: BenchmarkConfig) -> Iterator[Sample]:
    """One sample per row; id ``{question_id}#{k}`` (k-th question on that image); meta gets gt_answer and
    mme_question when a ground truth is given (None otherwise)."""
    rows = read_jsonl(config.question_file)
    gt = MMEGroundTruth.load(config.gt_file) if config.gt_file is not None else None
    ids = numbered_ids((str(row.get("question_id")) for row in rows), always=True)
    unknown = 0
    for n, (sample_id, row) in enumerate(zip(ids, rows), 1):
        require_fields(row, n, config.question_file, ("question_id", "image", "text", "category"),
                       text=("image", "text"))
        found = gt.lookup(row["category"], row["question_id"], row["text"]) if gt is not None else None
        if gt is not None and found is None:
            if config.strict:
                raise DatasetError(f"no ground truth in {gt.source} for MME question {sample_id}: {row['text']!r}")
            unknown += 1
        meta = {"question_id": row["question_id"], "category": row["category"],
                "mme_question": found[0] if found else None, "gt_answer": found[1] if found else None}
        yield Sample(id=sample_id, image=str(resolve_mme_image(config.image_folder, row["image"])),
                     query=row["text"], meta=meta, benchmark="mme", image_name=row["image"])
    if unknown:
        logger.warning("%d MME questions have no ground truth in %s", unknown, gt.source if gt else None)


def is_mme_row(row: dict[str, Any]) -> bool:
    """LLaVA's MME question file uses the image path as question_id (other LLaVA VQA files do not)."""
    return str(row.get("question_id")) == str(row.get("image"))


def _answer_gt(row: dict[str, Any], gt: MMEGroundTruth | None) -> tuple[str, str] | None:
    category, question_id = answer_field(row, "category"), answer_field(row, "question_id")
    prompt = row.get("query", "")
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
        category, question_id = answer_field(row, "category"), answer_field(row, "question_id")
        if category is None or question_id is None:
            raise DatasetError(f"MME answer {row.get('id')!r} lacks category/question_id")
        found = _answer_gt(row, gt)
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


def _submission_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the {category}.txt files")
    p.add_argument("--gt-file", default=None, help="llava_mme_gt.jsonl or the MME_Benchmark_release_version folder; "
                                                   "default: the ground truth the reader put in each answer's meta")


def _write_submission(answers: list[dict[str, Any]], args: argparse.Namespace) -> str:
    counts = write_mme(answers, args.out, MMEGroundTruth.load(args.gt_file) if args.gt_file else None)
    return f"wrote {sum(counts.values())} lines in {len(counts)} category files under {args.out}"


SPEC = BenchmarkSpec(
    name="mme",
    summary="MME perception and cognition yes/no questions (LLaVA's question file)",
    reader=read_mme,
    id_fields=("question_id", "category"),
    question_file="llava_mme.jsonl (rows: question_id, image, text, category)",
    image_folder="MME_Benchmark_release_version: {image_folder}/{category}[/images]/{file}",
    metric="mme",
    options={"gt_file": "llava_mme_gt.jsonl or the MME_Benchmark_release_version folder; puts the ground truth "
                        "into each sample's meta"},
    layout=DataLayout("playground/data/eval/MME/llava_mme.jsonl",
                      "playground/data/eval/MME/MME_Benchmark_release_version"),
    recognizes=is_mme_row,
    report_keys=("perception", "cognition"),
    submission=SubmissionFormat("MME eval_tool result files {out}/{category}.txt", _submission_arguments,
                                _write_submission),
)
