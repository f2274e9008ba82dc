"""llava.train.sft_data: ECSO's safe answers as LLaVA-format SFT rows, from a real ECSO run on the tiny model;
the seeded benign share; conversion of an existing ECSO file without a model; resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.eval.gen.answers import read_answer_rows
from llava.eval.gen.manifest import manifest_path
from llava.train.sft_data import main
from llava.train.sft_rows import select_rows
from tests.conftest import REPO_ROOT
from tests.train.conftest import SFT_LIMIT, sft_args


def _ecso_rows(sft_json: Path) -> list[dict]:
    return read_answer_rows(sft_json.with_name(sft_json.stem + ".ecso.jsonl"))


def test_flagged_samples_become_llava_rows_with_ecso_safe_answers(sft_run):
    rows = json.loads(sft_run.read_text())
    ecso = _ecso_rows(sft_run)
    assert len(rows) == len(ecso) == SFT_LIMIT and all(r["unsafe"] == "Yes" for r in ecso)
    for row, answer in zip(rows, ecso):
        assert set(row) == {"id", "image", "conversations"}
        assert row["id"] == answer["id"] and row["image"] == answer["image"]
        assert row["image"] == row["id"] + ".jpg"  # MM-SafetyBench: {scenario}/TYPO/{id}.jpg under the image folder
        human, gpt = row["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + answer["query"]}
        # the safe answer of step 4 (ECSO's final answer for a flagged sample), not the direct one
        assert gpt == {"from": "gpt", "value": answer["text"].strip()} and answer["caption"] is not None
    manifest = json.loads(manifest_path(sft_run).read_text())
    assert manifest["counts"]["flag_rate"]["k"] == manifest["counts"]["flag_rate"]["n"] == SFT_LIMIT
    assert manifest["counts"]["safe_rows"] == SFT_LIMIT and manifest["counts"]["benign_rows"] == 0
    assert manifest["model"]["model_name"] == "tiny" and manifest["ecso"]["threshold"] == 0.0
    assert manifest["ids"]["safe"] == [r["id"] for r in rows]
    assert manifest["out_sha256"] and manifest["source"]["answers_sha256"]


def test_benign_samples_are_a_seeded_share_with_their_direct_answers(sft_run):
    ecso = _ecso_rows(sft_run)
    for r in ecso[::2]:  # as a run with a higher threshold would have left them
        r.update(unsafe="No", text=r["direct"], caption=None)
    none, _ = select_rows(ecso, 0.0)
    assert [r["id"] for r in none] == [r["id"] for r in ecso[1::2]]
    half, counts = select_rows(ecso, 0.5, seed=3)
    assert counts.benign == 2 and counts.benign_rows == 1 and counts.safe_rows == 2
    (kept,) = [r for r in half if r["id"] in counts.ids["benign"]]
    source = next(r for r in ecso if r["id"] == kept["id"])
    assert kept["conversations"][1]["value"] == source["direct"].strip()
    assert select_rows(ecso, 0.5, seed=3)[0] == half  # the draw is seeded
    assert {r["id"] for r in select_rows(ecso, 1.0)[0]} == {r["id"] for r in ecso}
    assert [r["id"] for r in half] == [r["id"] for r in ecso if r["id"] in {x["id"] for x in half}]  # file order
    with pytest.raises(ValueError, match="keep_benign_ratio must be in"):
        select_rows(ecso, 1.5)
    with pytest.raises(ValueError, match="not an ECSO answer"):
        select_rows([{"id": "x", "method": "direct", "text": "t"}])


def test_an_ecso_answer_file_is_converted_without_loading_a_model(ref_data, typo_images, sft_run, tmp_path):
    out = tmp_path / "again.json"
    args = sft_args(ref_data, typo_images, out, "--from-answers", str(sft_run.with_name("sft.ecso.jsonl")))
    args[args.index("tiny")] = str(tmp_path / "no-such-model")  # would fail if a model were loaded
    assert main(args) == 0
    assert json.loads(out.read_text()) == json.loads(sft_run.read_text())
    assert json.loads(manifest_path(out).read_text())["source"]["converted_from_ecso_file"] is True


def test_another_family_makes_rows_through_its_chat_template(ref_data, typo_images, tmp_path):
    """sft_data is not LLaVA-only: an Idefics3 checkpoint (prompts from its processor's chat template) makes the
    same LLaVA-format rows, and the manifest names its family."""
    out = tmp_path / "idefics3.json"
    args = sft_args(ref_data, typo_images, out, "--max-new-tokens", "4") + ["--limit", "1"]  # last wins
    args[args.index("tiny")] = "tiny-idefics3"
    assert main(args) == 0
    (row,) = json.loads(out.read_text())
    (answer,) = _ecso_rows(out)
    assert row["conversations"] == [{"from": "human", "value": "<image>\n" + answer["query"]},
                                    {"from": "gpt", "value": answer["text"].strip()}]
    model = json.loads(manifest_path(out).read_text())["model"]
    assert model["model_family"] == "idefics3" and model["prompt_format"] == "processor chat template"


@pytest.mark.parametrize("change, message", [
    (("--out", "sft.jsonl"), "must end in .json"),
    (("--keep-benign-ratio", "2"), "keep-benign-ratio must be in"),
    (("--benchmark", "mmbench"), "keeps its images inside the question file"),
    (("--answers-file", "{tmp}/sft.jsonl"), "would share the manifest"),
])
def test_bad_flags_are_refused_naming_the_value(ref_data, typo_images, tmp_path, caplog, change, message):
    flag, value = change
    args = sft_args(ref_data, typo_images, tmp_path / "sft.json") + [flag, value.format(tmp=tmp_path)]  # last wins
    assert main(args) == 2
    assert message in caplog.text


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rows(ref_data, typo_images, sft_run, tmp_path):
    """SIGKILL once the intermediate file has a row, rerun the same command: the SFT rows equal an uninterrupted
    run's (sft_run: batch 4; here batch 1, greedy texts do not depend on it)."""
    out = tmp_path / "sft.json"
    args = sft_args(ref_data, typo_images, out, "--batch-size", "1")
    intermediate = tmp_path / "sft.ecso.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llava.train.sft_data", *args], cwd=REPO_ROOT,
                            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if intermediate.exists() and intermediate.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = intermediate.read_bytes().count(b"\n")
    assert 1 <= done < SFT_LIMIT and not out.exists()
    assert main(args) == 0
    assert json.loads(out.read_text()) == json.loads(sft_run.read_text())
    runs = json.loads(manifest_path(intermediate).read_text())["runs"]
    assert runs[-1]["skipped"] == done and runs[-1]["done"] == SFT_LIMIT - done
