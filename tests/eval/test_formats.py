"""Submission converters on answer rows built from the readers and LLaVA-1.5's published outputs."""
import json
import random

import pandas as pd
import pytest

from llava.eval import formats
from llava.eval.benchmarks.mme import MMEGroundTruth, mme_result_lines, write_mme
from llava.eval.benchmarks.mmvet import mmvet_results
from llava.eval.datasets import BenchmarkConfig, DatasetError, answer_fields, load_samples


def _answers(samples, texts):
    return [{**answer_fields(s), "method": "direct", "text": t, "model_id": "ref"} for s, t in zip(samples, texts)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mme_answers(ref_data):
    d = ref_data / "mme"
    samples = load_samples("mme", BenchmarkConfig(d / "llava_mme.jsonl", gt_file=d / "llava_mme_gt.jsonl"))
    ref = [json.loads(line) for line in (d / "reference_answers_llava-v1.5-13b.jsonl").read_text().splitlines()]
    return _answers(samples, [r["text"] for r in ref])


def _mme_score(lines):
    """MME eval_tool's per-category score (accuracy + accuracy+ over line pairs), times 100."""
    parse = lambda p: p.lower() if p.lower() in ("yes", "no") else ("yes" if "yes" in p.lower()[:4] else  # noqa
                                                                    "no" if "no" in p.lower()[:4] else "other")
    rows = [line.split("\t") for line in lines]
    right = [parse(pred) == gt.lower() for _, _, gt, pred in rows]
    pairs = [right[i:i + 2] for i in range(0, len(right), 2)]
    assert all(rows[i][0] == rows[i + 1][0] for i in range(0, len(rows), 2))  # the two questions of one image
    return 100 * sum(right) / len(right) + 100 * sum(all(p) for p in pairs) / len(pairs)


def test_mme_layout_and_published_score(mme_answers, tmp_path):
    shuffled = random.Random(0).sample(mme_answers, len(mme_answers))  # shards arrive in any order
    counts = write_mme(shuffled, tmp_path)
    assert len(counts) == 14 and sum(counts.values()) == 2374
    lines = (tmp_path / "code_reasoning.txt").read_text().splitlines()
    assert (tmp_path / "code_reasoning.txt").read_text() == "".join(
        line + "\n" for line in mme_result_lines(mme_answers)["code_reasoning"])  # order-independent
    lines = [line for line in lines if line.startswith("0020.png\t")]
    assert lines[0].split("\t")[:3] == ["0020.png", "Is a python code shown in the picture? Please answer yes or no.",
                                        "Yes"]
    assert lines[1].split("\t")[:3] == ["0020.png", "Is a c++ code shown in the picture? Please answer yes or no.",
                                        "No"]
    assert all(len(line.split("\t")) == 4 for c in counts for line in (tmp_path / f"{c}.txt").read_text().splitlines())
    perception = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR"]
    score = sum(_mme_score((tmp_path / f"{c}.txt").read_text().splitlines()) for c in perception)
    assert score == pytest.approx(1531.32, abs=0.01)


def test_mme_ground_truth_from_file_and_missing_ground_truth(mme_answers, ref_data, tmp_path):
    bare = [{**a, "meta": {}} for a in mme_answers[:4]]
    with pytest.raises(DatasetError, match="no ground truth"):
        mme_result_lines(bare)
    gt = MMEGroundTruth.load(ref_data / "mme" / "llava_mme_gt.jsonl")
    assert mme_result_lines(bare, gt) == mme_result_lines(mme_answers[:4])
    odd = [{**mme_answers[0], "text": "Yes,\tit is.\nReally."}]
    assert mme_result_lines(odd)["code_reasoning"][0].endswith("\tYes, it is. Really.")


def test_mmvet_json_matches_llavas_converter_output(ref_data, tmp_path):
    d = ref_data / "mmvet"
    samples = load_samples("mmvet", BenchmarkConfig(d / "llava-mm-vet.jsonl"))
    ref = [json.loads(line) for line in (d / "reference_llava-v1.5-7b" / "answers.jsonl").read_text().splitlines()]
    answers = _write_jsonl(tmp_path / "a.jsonl", _answers(samples, [r["text"] for r in ref])[::-1])
    assert formats.main(["mmvet", "--answers", str(answers), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    expected = json.loads((d / "reference_llava-v1.5-7b" / "results_for_grader.json").read_text())
    assert result == expected and list(result) == [f"v1_{i}" for i in range(218)]


def test_mmbench_xlsx_readable_with_predictions(ref_data, tmp_path):
    tsv = ref_data / "mmbench" / "mmbench_dev_20230712_text_only.tsv"
    samples = load_samples("mmbench", BenchmarkConfig(tsv))
    ref = pd.read_table(ref_data / "mmbench" / "reference_llava-v1.5-13b_predictions.tsv")
    pred = dict(zip(ref["index"], ref["prediction"]))
    answers = _answers(samples[:50], [pred[s.meta["index"]] for s in samples[:50]])
    a, b = _write_jsonl(tmp_path / "a.jsonl", answers[:20]), _write_jsonl(tmp_path / "b.jsonl", answers[20:])
    argv = ["mmbench", "--answers", str(a), str(b), "--question-file", str(tsv), "--out", str(tmp_path / "s.xlsx")]
    assert formats.main(argv) == 0
    table = pd.read_excel(tmp_path / "s.xlsx")
    assert list(table.columns) == ["index", "question", "hint", "A", "B", "C", "D", "prediction", "answer"]
    assert len(table) == 4377 and table["prediction"].notna().sum() == 50
    got = dict(zip(table["index"], table["prediction"]))
    assert all(got[s.meta["index"]] == pred[s.meta["index"]] for s in samples[:50])
    assert len(pd.read_table(tmp_path / "s.tsv")) == 4377


def test_read_answers_dedupes_and_checks_benchmark(tmp_path):
    rows = [{"id": "1", "benchmark": "mmvet", "question_id": 1, "text": "old"},
            {"id": "2", "benchmark": "mmvet", "question_id": 2, "text": "x"},
            {"id": "1", "benchmark": "mmvet", "question_id": 1, "text": "new"}]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    assert mmvet_results(formats.read_answers([path], "mmvet")) == {"v1_1": "new", "v1_2": "x"}
    with pytest.raises(DatasetError, match="'mmvet' answer, expected 'mme'"):
        formats.read_answers([path], "mme")
    _write_jsonl(tmp_path / "b.jsonl", [{"id": "1"}])
    with pytest.raises(DatasetError, match="no 'text'"):
        formats.read_answers([tmp_path / "b.jsonl"])


def test_bad_answers_are_one_line_not_a_traceback(ref_data, tmp_path, caplog):
    """LLaVA's own MME answer rows (no category) given to the converter: exit 2 with the reason."""
    from llava.eval.formats import main

    code = main(["mme", "--answers", str(ref_data / "mme" / "reference_answers_llava-v1.5-13b.jsonl"),
                 "--out", str(tmp_path / "mme")])
    assert code == 2 and "lacks category/question_id" in caplog.text
    assert main(["mmvet", "--answers", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.json")]) == 2
