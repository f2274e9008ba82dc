"""llava.train.compare: base vs fine-tuned direct answers on a held-out MM-SafetyBench scenario (judged by a scripted
OpenAI-compatible judge over HTTP) and on MME (scored against its ground truth), with the project's metrics."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from llava.eval.gen.answers import read_answer_rows
from llava.eval.judge.records import read_judgments
from llava.eval.metrics.registry import compute
from llava.train import compare
from tests.train.conftest import SCENARIO_HELD_OUT, questions

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from generate_testdata import make_mme  # noqa: E402
from judge_server import JudgeServer, ScriptState  # noqa: E402

pytestmark = pytest.mark.slow


def _verdict(messages: list[dict]) -> str:
    """A fixed verdict per judged answer (its prompt's hash), so the expected rates can be counted independently."""
    return "safe" if hashlib.sha256(messages[-1]["content"].encode()).digest()[0] % 2 else "unsafe"


def test_base_and_tuned_models_are_scored_side_by_side(lora_run, ref_data, typo_images, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    mme = make_mme(tmp_path, ref_data, 2)
    utility = [f"--utility-{flag[2:]}" if flag.startswith("--") else flag for flag in mme]
    out = tmp_path / "compare"
    with JudgeServer(ScriptState(default_reply=_verdict)) as judge:
        argv = ["--out", str(out), "--model-path", str(lora_run.out), "--model-base", "tiny", "--device", "cpu",
                "--max-new-tokens", "8", "--no-progress", "--safety-benchmark", "mmsafetybench",
                "--safety-mode", "TYPO",
                "--safety-question-file", str(questions(ref_data, SCENARIO_HELD_OUT)),
                "--safety-image-folder", str(typo_images), "--safety-limit", "3", *utility,
                "--utility-gt-file", str(ref_data / "mme" / "llava_mme_gt.jsonl"), "--judge-model", "stub",
                "--judge-base-url", judge.base_url, "--judge-backoff-base", "0.001"]
        assert compare.main(argv) == 0
        assert judge.state.requests == 6  # 3 answers per model; MME is not judged
    result = json.loads((out / "compare.json").read_text())
    assert result["models"]["tuned"] == {"model_path": str(lora_run.out), "model_base": "tiny"}
    assert result["models"]["base"] == {"model_path": "tiny", "model_base": None}
    texts = {}
    for model in compare.MODELS:
        safety = result["sets"]["safety"][model]
        rows = read_answer_rows(out / "safety" / f"{model}.jsonl")
        judgments = read_judgments(out / "safety" / f"{model}.judgments.jsonl")
        safe = sum(1 for j in judgments.values() if j.raw.strip().lower() == "safe")
        assert safety["judged"] and safety["metrics"]["n"] == len(rows) == len(judgments) == 3
        assert safety["metrics"]["harmless_rate_paper"]["k"] == safe
        assert all(r["method"] == "direct" and r["model_id"] == model for r in rows)
        texts[model] = [r["text"] for r in rows]
        mme_answers = out / "utility" / f"{model}.jsonl"
        expected = compute("mme", mme_answers, None, ref_data / "mme" / "llava_mme_gt.jsonl")
        assert result["sets"]["utility"][model]["metrics"] == {k: expected[k] for k in ("perception", "cognition")}
    assert texts["base"] != texts["tuned"]
    report = (out / "compare.md").read_text()
    assert "## safety: mmsafetybench" in report and "| harmless_rate_paper |" in report and "| perception |" in report


def test_by_default_safety_sets_are_judged_by_refusal_match(lora_run, ref_data, typo_images, tmp_path):
    """No endpoint: the refusal-match judge scores the held-out set; its counts are the classifier's own."""
    from llava.eval.refusal_match import classify

    out = tmp_path / "compare"
    argv = ["--out", str(out), "--model-path", str(lora_run.out), "--model-base", "tiny", "--device", "cpu",
            "--max-new-tokens", "8", "--no-progress", "--safety-benchmark", "mmsafetybench", "--safety-mode", "TYPO",
            "--safety-question-file", str(questions(ref_data, SCENARIO_HELD_OUT)),
            "--safety-image-folder", str(typo_images), "--safety-limit", "2"]
    assert compare.main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    for model in compare.MODELS:
        rows = read_answer_rows(out / "safety" / f"{model}.jsonl")
        judgments = read_judgments(out / "safety" / f"{model}.judgments.jsonl")
        assert {j.judge_model for j in judgments.values()} == {"refusal-match"}
        metrics = result["sets"]["safety"][model]["metrics"]
        assert metrics["harmless_rate_paper"]["n"] == len(rows) == 2
        assert metrics["harmless_rate_paper"]["k"] == sum(classify(r["text"]).refusal for r in rows)


def test_a_set_and_both_models_are_required(tmp_path, caplog):
    assert compare.main(["--out", str(tmp_path), "--model-path", "x", "--model-base", "tiny"]) == 2
    assert "give a --safety-benchmark or a --utility-benchmark" in caplog.text
    assert compare.main(["--out", str(tmp_path), "--model-path", "x", "--utility-benchmark", "mme",
                         "--utility-question-file", "q.jsonl"]) == 2
    assert "--model-base (or --base-model) are required" in caplog.text
