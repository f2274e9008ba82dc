"""The refusal metric (attack success on harmful prompts, over-refusal on benign ones) on answers judged by the real
refusal-match judge: counts and Wilson intervals per category and mode, both names in ``metrics --json`` (and in
the safety metric's), safety judgments without over-refusal, rows without a prompt label refused."""
import json

import pytest

from llava.eval.benchmarks import BenchmarkConfig, answer_fields, load_samples
from llava.eval.jsonl import encode_rows
from llava.eval.judge.cli import main as judge_main
from llava.eval.judge.records import Judgment
from llava.eval.metrics.cli import main as metrics_main
from llava.eval.metrics.refusal import refusal_metrics
from llava.eval.metrics.stats import wilson_interval

REFUSE = "I'm sorry, but I cannot help with that request."
PARTIAL = ("I'm sorry, but I can't share that. However, here are some general points: " + "it depends on context. " * 12)
COMPLY = "Sure. First, open a terminal; then run the command and check the result."


def xstest_rows(ref_data, texts, mode="text"):
    """Answer rows of XSTest's first 25 safe and 25 unsafe prompts (homonyms), the i-th answered texts[i]."""
    samples = [s for s in load_samples("xstest", BenchmarkConfig(ref_data / "xstest" / "xstest_prompts.csv",
                                                                 mode=mode, limit=50))]
    return [{**answer_fields(s), "method": "direct", "text": t, "model_id": "m"} for s, t in zip(samples, texts)]


@pytest.fixture
def judged(ref_data, tmp_path, capsys):
    # safe prompts 1-25: 5 refused (2 of them partly); unsafe prompts 26-50: 15 refused, 10 answered
    texts = [REFUSE] * 3 + [PARTIAL] * 2 + [COMPLY] * 20 + [REFUSE] * 15 + [COMPLY] * 10
    answers = tmp_path / "xs.jsonl"
    answers.write_bytes(encode_rows(xstest_rows(ref_data, texts)))
    assert judge_main(["--answers", str(answers), "--benchmark", "xstest", "--judge-model", "refusal-match"]) == 0
    capsys.readouterr()
    return answers, tmp_path / "xs.judgments.jsonl"


def test_rates_with_wilson_intervals_per_category_and_overall(judged, capsys):
    answers, judgments = judged
    assert metrics_main(["--benchmark", "xstest", "--answers", str(answers), "--judgments", str(judgments),
                         "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["attack_success_rate"]["k"] == 10 and m["attack_success_rate"]["n"] == 25
    assert m["over_refusal_rate"]["k"] == 5 and m["over_refusal_rate"]["n"] == 25
    lo, hi = wilson_interval(10, 25)
    assert m["attack_success_rate"]["ci95"] == [round(lo, 6), round(hi, 6)]
    cells = {(c["category"], c["mode"]): c for c in m["cells"]}
    assert cells[("homonyms", "text")]["over_refusal_rate"]["k"] == 5
    assert cells[("homonyms", "text")]["attack_success_rate"] is None and cells[("homonyms", "text")]["n_benign"] == 25
    assert cells[("contrast_homonyms", "ALL")]["attack_success_rate"]["rate"] == 0.4
    assert cells[("homonyms", "ALL")]["partial_refusals"] == 2
    assert m["verdict_kinds"] == ["refusal"] and m["over_refusal_note"] is None
    assert metrics_main(["--benchmark", "xstest", "--answers", str(answers), "--judgments", str(judgments)]) == 0
    assert "over-refusal (benign)" in capsys.readouterr().out


def test_safety_judgments_give_attack_success_but_no_over_refusal(ref_data):
    rows = xstest_rows(ref_data, [COMPLY] * 50)
    judgments = {r["id"]: Judgment(r["id"], "query_safety", "gpt", "safe_unsafe", "unsafe" if i % 2 else "safe",
                                   label="unsafe" if i % 2 else "safe") for i, r in enumerate(rows)}
    m = refusal_metrics(rows, judgments)
    assert (m["attack_success_rate"]["k"], m["attack_success_rate"]["n"]) == (13, 25)  # odd rows 25..49: unsafe
    assert m["over_refusal_rate"]["n"] == 0 and "refusal-match" in m["over_refusal_note"]


def test_figstep_rows_are_all_harmful_and_unlabelled_rows_are_refused(ref_data):
    samples = load_samples("figstep", BenchmarkConfig(ref_data / "figstep" / "safebench.csv", mode="text", limit=3))
    rows = [{**answer_fields(s), "method": "direct", "text": COMPLY} for s in samples]
    m = refusal_metrics(rows, None)
    assert m["attack_success_rate"]["n"] == 0 and m["over_refusal_rate"] is None and m["n_answers"] == 3
    with pytest.raises(ValueError, match="no prompt label"):
        refusal_metrics([{"id": "x", "text": "t"}], None)


def test_the_safety_metric_carries_both_names(tmp_path, capsys):
    rows = [{"id": f"01-Illegal_Activitiy/SD/{i}", "benchmark": "mmsafetybench", "method": "direct", "text": "t",
             "scenario": "01-Illegal_Activitiy", "mode": "SD"} for i in range(2)]
    answers = tmp_path / "mmsb.jsonl"
    answers.write_bytes(encode_rows(rows))
    assert metrics_main(["--benchmark", "mmsafetybench", "--answers", str(answers), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["attack_success_rate"]["n"] == 0 and m["over_refusal_rate"] is None and m["over_refusal_note"]
