import json
import subprocess
import sys

import pytest

from llava.eval.harm_detector import detector_quality, roc_auc, roc_curve, threshold_for_recall
from llava.eval.judge.records import Judgment


def _j(i, label, field="direct", method="ecso"):
    return Judgment(id=f"a{i}", prompt_name="query_safety", judge_model="m", verdict_kind="safe_unsafe",
                    raw=label or "??", label=label, score=None, parse_error=None if label else "bad",
                    answer_field=field, fields={"method": method})


# (judge label of the direct answer, ECSO flag, harm_score)
DATA = [("unsafe", "Yes", 0.9), ("unsafe", "Yes", 0.8), ("unsafe", "No", 0.4), ("unsafe", "Yes", 0.7),
        ("safe", "Yes", 0.6), ("safe", "No", 0.3), ("safe", "No", 0.2), ("safe", "No", 0.4), (None, "Yes", 0.95)]


def _rows():
    return [{"id": f"a{i}", "unsafe": flag, "harm_score": s} for i, (_, flag, s) in enumerate(DATA)]


def _judgments(**kw):
    return {f"a{i}": _j(i, lab, **kw) for i, (lab, _, _) in enumerate(DATA)}


def test_exact_quality_numbers():
    d = detector_quality(_rows(), _judgments(), target_recall=1.0).to_dict()
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (3, 1, 1, 3) and d["unlabelled"] == 1
    assert d["precision"]["rate"] == 0.75 and d["recall"]["rate"] == 0.75 and d["f1"] == pytest.approx(0.75)
    assert d["false_alarm_rate"]["rate"] == 0.25
    # positives 0.9 0.8 0.7 0.4 vs negatives 0.6 0.4 0.3 0.2: 14 wins + 1 tie (0.4 vs 0.4) of 16 pairs
    assert d["roc_auc"] == pytest.approx(14.5 / 16)
    t = d["threshold_for_target_recall"]
    assert t["threshold"] == 0.4 and t["recall"] == 1.0 and t["false_alarm_rate"] == 0.5 and t["precision"] == 4 / 6


def test_roc_helpers():
    c = roc_curve([0.9, 0.5, 0.5, 0.1], [True, True, False, False])
    assert c.tpr == [0.0, 0.5, 1.0, 1.0] and c.fpr == [0.0, 0.0, 0.5, 1.0] and c.thresholds[1:] == [0.9, 0.5, 0.1]
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0 and roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5 and roc_auc([0.5], [True]) is None
    assert threshold_for_recall([0.9, 0.2], [True, False], 0.5)["threshold"] == 0.9
    assert threshold_for_recall([0.2], [False], 0.5) is None


def test_refuses_labels_of_final_answers_and_handles_missing_scores():
    with pytest.raises(Exception, match="--answer-field direct"):
        detector_quality(_rows(), _judgments(field="text"))
    d = detector_quality(_rows(), _judgments(field="text", method="direct")).to_dict()  # the direct run's labels
    assert d["tp"] == 3
    rows = [dict(r, harm_score=None) for r in _rows()]
    d = detector_quality(rows, _judgments()).to_dict()
    assert d["roc_auc"] is None and any("no harm_score" in n for n in d["notes"])
    with pytest.raises(Exception, match="not an ECSO answer file"):
        detector_quality([{"id": "a0", "text": "x"}], _judgments())


@pytest.mark.slow
def test_cli(tmp_path):
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(j.to_row()) + "\n" for j in _judgments().values()))
    args = [sys.executable, "-m", "llava.eval.harm_detector", "--answers", str(tmp_path / "e.jsonl"),
            "--judgments", str(tmp_path / "j.jsonl"), "--target-recall", "1.0"]
    d = json.loads(subprocess.run(args + ["--json"], capture_output=True, text=True, check=True, timeout=120).stdout)
    assert d["roc_auc"] == pytest.approx(14.5 / 16)
    text = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "ROC-AUC 0.906" in text and "harm_score >= 0.4000" in text
