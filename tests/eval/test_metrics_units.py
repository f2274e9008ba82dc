import math

import pytest

from llava.eval.metrics import Rate, extract_choice, flag_rate, mmbench_scores, parse_yes_no, wilson_interval
from llava.eval.metrics.mme import mme_scores


@pytest.mark.parametrize("k, n, lo, hi", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                          (50, 100, 0.4038, 0.5962), (1, 3, 0.0615, 0.7923)])
def test_wilson_textbook_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_rate():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert Rate(0, 0).to_dict() == {"k": 0, "n": 0, "rate": None, "ci95": [None, None]}
    r = Rate(3, 4)
    assert r.complement() == Rate(1, 4) and r.to_dict()["rate"] == 0.75
    assert str(r).startswith(" 75.0% [")
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_flag_rate():
    assert flag_rate([{"text": "x"}]) is None
    assert flag_rate([{"unsafe": "Yes"}, {"unsafe": "No"}, {"unsafe": "yes"}, {"text": "no field"}]) == Rate(2, 3)


@pytest.mark.parametrize("pred, label", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"),
                                         ("Church", "other"), ("", "other"), ("Not sure", "no"), ("nyes", "yes"), ("I no", "no")])
def test_mme_yes_no_rule(pred, label):
    assert parse_yes_no(pred) == label


def test_mme_scoring_small():
    gt = [{"question_id": "count/1.jpg", "category": "count", "mme_question": "Two cats? Please answer yes or no.", "gt_answer": "Yes"},
          {"question_id": "count/1.jpg", "category": "count", "mme_question": "Three cats? Please answer yes or no.", "gt_answer": "No"},
          {"question_id": "count/2.jpg", "category": "count", "mme_question": "One dog? Please answer yes or no.", "gt_answer": "Yes"},
          {"question_id": "count/2.jpg", "category": "count", "mme_question": "Two dogs? Please answer yes or no.", "gt_answer": "No"}]
    suffix = "\nAnswer the question using a single word or phrase."
    answers = [{"question_id": "count/1.jpg", "prompt": "Two cats?" + suffix, "text": "Yes"},
               {"question_id": "count/1.jpg", "prompt": "Three cats?" + suffix, "text": "No"},
               {"question_id": "count/2.jpg", "prompt": "One dog?" + suffix, "text": "Maybe"}]
    m = mme_scores(answers, gt)
    s = m["subtasks"]["count"]
    assert (s["acc"], s["acc_plus"], s["score"]) == (50.0, 50.0, 100.0)
    assert m["perception"] == 100.0 and m["cognition"] == 0 and m["missing_answers"] == 1 and s["other"] == 2


OPTS = {"A": "a red apple", "B": "a banana", "C": "None", "D": "cat"}


@pytest.mark.parametrize("pred, letter, how", [
    ("B", "B", "letter"), ("(C)", "C", "letter"), ("D.", "D", "letter"), ("A. a red apple", "A", "letter"),
    ("The answer is B.", "B", "letter"), ("Answer: (D)", "D", "letter"),
    ("a banana", "B", "text"), ("It is a red apple.", "A", "text"), ("None", "C", "text"),
    ("E", None, "unmatched"), ("a banana or a cat", None, "unmatched"), ("I don't know", None, "unmatched"),
    ("A cat sits there", "D", "text"),
])
def test_mmbench_extraction(pred, letter, how):
    assert extract_choice(pred, OPTS) == (letter, how)


def test_mmbench_circular_eval():
    def q(idx, ans, **opts):
        return {"index": str(idx), "question": "?", "answer": ans, "A": "x", "B": "y", "C": "nan", "D": "", **opts}
    gt = [q(1, "A"), q(1_000_001, "B"), q(2, "B"), q(1_000_002, "A"), q(3, "A", category="c1")]
    preds = {1: "A", 1_000_001: "B", 2: "B", 1_000_002: "B", 3: "zzz"}
    m = mmbench_scores(preds, gt)
    assert m["circular_accuracy"] == pytest.approx(100 / 3)
    assert m["vanilla_accuracy"] == pytest.approx(200 / 3)
    assert m["n_questions"] == 3 and m["n_rows"] == 5 and m["unmatched"] == 1
    assert m["per_category"] == {"c1": 0.0}
    m = mmbench_scores({1: "A"}, gt[:2])
    assert m["missing_predictions"] == 1 and m["circular_accuracy"] == 0.0


def test_ground_truth_from_project_rows():
    from llava.eval.metrics.mmbench import mmbench_gt_from_rows
    from llava.eval.metrics.mme import mme_gt_from_rows

    mme_rows = [{"id": "count/1.jpg#0", "question_id": "count/1.jpg", "category": "count", "query": "Two?",
                 "text": "Yes", "meta": {"mme_question": "Two? Please answer yes or no.", "gt_answer": "Yes"}},
                {"id": "count/1.jpg#1", "question_id": "count/1.jpg", "category": "count", "query": "Three?",
                 "text": "Yes", "meta": {"mme_question": "Three? Please answer yes or no.", "gt_answer": "No"}}]
    m = mme_scores(mme_rows, mme_gt_from_rows(mme_rows))
    assert m["subtasks"]["count"]["acc"] == 50.0 and m["subtasks"]["count"]["acc_plus"] == 0.0
    mmb_rows = [{"id": "5", "index": 5, "text": "B", "meta": {"answer": "B", "options": ["cat", "dog"], "category": "c"}},
                {"id": "1000005", "index": 1000005, "text": "dog", "meta": {"answer": "A", "options": ["dog", "cat"]}}]
    m = mmbench_scores({5: "B", 1000005: "dog"}, mmbench_gt_from_rows(mmb_rows))
    assert m["circular_accuracy"] == 100.0 and m["extraction"] == {"letter": 1, "text": 1}
