"""The published numbers, from the official reference outputs in data/ (data/SOURCES.md)."""
import json
import subprocess
import sys

import pytest

from llava.eval.jsonl import read_jsonl
from llava.eval.metrics import compute, load_grades, mme_scores, mmvet_scores
from llava.eval.metrics.mme import COGNITION, PERCEPTION


def test_mme_llava_13b_reproduces_1531_32_and_295_36(ref_data):
    m = compute("mme", ref_data / "mme/reference_answers_llava-v1.5-13b.jsonl",
                ground_truth=ref_data / "mme/llava_mme_gt.jsonl")
    assert round(m["perception"], 2) == 1531.32
    assert round(m["cognition"], 2) == 295.36
    assert set(m["subtasks"]) == set(PERCEPTION + COGNITION) and m["missing_answers"] == 0
    assert round(m["subtasks"]["existence"]["score"], 2) == 185.00
    assert m["subtasks"]["artwork"]["other"] == 11  # free-form answers ("Church", ...) count as wrong


def test_mme_accepts_project_answer_rows(ref_data):
    ref = read_jsonl(ref_data / "mme/reference_answers_llava-v1.5-13b.jsonl")
    ours = [{"id": f"mme/{r['question_id']}/{i}", "question_id": r["question_id"], "query": r["prompt"],
             "text": r["text"], "unsafe": "Yes" if i % 100 == 0 else "No"} for i, r in enumerate(reversed(ref))]
    m = mme_scores(ours, read_jsonl(ref_data / "mme/llava_mme_gt.jsonl"))
    assert round(m["perception"], 2) == 1531.32 and round(m["cognition"], 2) == 295.36
    assert m["false_alarm_rate"]["k"] == 24 and m["false_alarm_rate"]["n"] == 2374


def test_mmbench_llava_13b_reproduces_67_69(ref_data):
    m = compute("mmbench", ref_data / "mmbench/reference_llava-v1.5-13b_predictions.tsv",
                ground_truth=ref_data / "mmbench/mmbench_dev_20230712_text_only.tsv")
    assert round(m["circular_accuracy"], 2) == 67.69
    assert m["n_questions"] == 1176 and m["n_rows"] == 4377
    assert m["unmatched"] == 0 and m["missing_predictions"] == 0
    assert m["vanilla_accuracy"] > m["circular_accuracy"]


def test_mmvet_llava_7b_total_31_19(ref_data):
    ref = ref_data / "mmvet/reference_llava-v1.5-7b"
    m = compute("mmvet", ref / "answers.jsonl", judgments=ref / "gpt-4-grade-1runs.json")
    assert round(m["total"], 2) == 31.19 and m["n"] == 218 and m["ungraded_answers"] == []
    m13 = mmvet_scores(load_grades(ref_data / "mmvet/reference_llava-v1.5-13b/gpt-4-grade-1runs.json"))
    assert round(m13["total"], 1) == 36.1


def test_mmvet_from_project_judgments_and_capabilities(ref_data, tmp_path):
    grades = json.loads((ref_data / "mmvet/reference_llava-v1.5-7b/gpt-4-grade-1runs.json").read_text())
    path = tmp_path / "grades.judgments.jsonl"
    path.write_text("".join(json.dumps({"id": k.removeprefix("v1_"), "question_id": int(k[3:]), "score": v["score"][0]}) + "\n"
                            for k, v in grades.items()))
    caps = {k: {"question": "q", "answer": "a", "capability": ["rec"] if int(k[3:]) % 2 else ["ocr", "math"]}
            for k in grades}
    m = mmvet_scores(load_grades(path), caps)
    assert round(m["total"], 2) == 31.19
    odd = [v["score"][0] for k, v in grades.items() if int(k[3:]) % 2]
    assert m["capabilities"]["rec"] == pytest.approx(100 * sum(odd) / len(odd))
    assert m["capability_combinations"]["math_ocr"] == m["capabilities"]["ocr"]


@pytest.mark.slow
def test_cli_json(ref_data):
    out = subprocess.run([sys.executable, "-m", "llava.eval.metrics", "--benchmark", "mme", "--json",
                          "--answers", str(ref_data / "mme/reference_answers_llava-v1.5-13b.jsonl"),
                          "--ground-truth", str(ref_data / "mme/llava_mme_gt.jsonl")],
                         capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout)
    assert {"perception", "cognition", "subtasks"} <= set(m) and round(m["perception"], 2) == 1531.32
    bad = subprocess.run([sys.executable, "-m", "llava.eval.metrics", "--benchmark", "mme",
                          "--answers", str(ref_data / "mme/llava_mme.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "needs --ground-truth" in bad.stderr
