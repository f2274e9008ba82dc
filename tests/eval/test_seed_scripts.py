"""The seed's shell scripts end to end on the tiny model with LIMIT, in the seed's data layout under DATA_ROOT:
GPU list -> one process per chunk, merge, two-pass ECSO, no silent overwrite, a failing chunk stops the merge."""
import os
import shutil
import subprocess
import sys

import pytest
from generate_testdata import draw_image, read_rows

from llava.eval.gen.layout import DATA_LAYOUT
from llava.eval.gen.manifest import load_manifest, manifest_path
from tests.conftest import REPO_ROOT

SCENARIO = "01-Illegal_Activitiy"


def script(name: str, root, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DATA_ROOT": str(root), "MODEL": "tiny", "MODEL_PATH": "tiny", "LIMIT": "3",
            "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "0", "EXTRA_ARGS": "--max-new-tokens 8 --device cpu -q",
            **env}
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "v1_5" / name)], env=full, capture_output=True,
                          text=True, timeout=300, cwd=root)


@pytest.mark.slow
def test_gen_mmsafe_then_tell_ask_two_pass(tmp_path, ref_data, tiny_hf_path):
    questions = tmp_path / DATA_LAYOUT["mmsafetybench"].question_file
    questions.mkdir(parents=True)
    shutil.copy(ref_data / "mmsafetybench" / "processed_questions" / f"{SCENARIO}.json", questions)
    for i in range(3):
        draw_image(tmp_path / DATA_LAYOUT["mmsafetybench"].image_folder / SCENARIO / "SD_TYPO" / f"{i}.jpg", i)
    env = {"SCENARIOS": SCENARIO, "MODES": "SD_TYPO"}
    direct = script("eval_safe/gen_mmsafe.sh", tmp_path, CUDA_VISIBLE_DEVICES="0,1", **env)
    assert direct.returncode == 0, direct.stderr[-3000:]
    out = tmp_path / "data" / "mmsafe" / "outputs" / SCENARIO / "SD_TYPO" / "tiny"
    assert sorted(p.name for p in (out / "q").iterdir()) == ["merge.jsonl", "merge.manifest.json"]
    assert [p["chunk_idx"] for p in load_manifest(out / "q" / "merge.manifest.json")["merged_from"]] == [0, 1]

    ecso = script("eval_safe/gen_mmsafe_tell_ask.sh", tmp_path, **env)
    assert ecso.returncode == 0, ecso.stderr[-3000:]
    rows, direct_rows = read_rows(out / "tell_ask" / "merge.jsonl"), read_rows(out / "q" / "merge.jsonl")
    assert [r["direct"] for r in rows] == [r["text"] for r in direct_rows] and len(rows) == 3
    m = load_manifest(manifest_path(out / "tell_ask" / "merge.jsonl"))
    assert m["settings"]["direct_answers"] == "from_answers" and m["settings"]["decoding"]["temperature"] == 0.0
    assert {r["model_id"] for r in rows} == {"tiny"}

    again = script("eval_safe/gen_mmsafe_tell_ask.sh", tmp_path, **env)
    assert again.returncode == 0 and "skip:" in again.stderr and "FORCE=1" in again.stderr
    assert read_rows(out / "tell_ask" / "merge.jsonl") == rows


@pytest.mark.slow
def test_mme_utility_script_converts_and_a_failed_chunk_is_not_merged(tmp_path, ref_data, tiny_hf_path):
    layout = DATA_LAYOUT["mme"]
    qf = tmp_path / layout.question_file
    qf.parent.mkdir(parents=True)
    shutil.copy(ref_data / "mme" / "llava_mme.jsonl", qf)
    shutil.copy(ref_data / "mme" / "llava_mme_gt.jsonl", qf.parent)
    for i, row in enumerate(read_rows(qf)[:3]):
        draw_image(tmp_path / layout.image_folder / row["image"], i)
    broken = script("eval/mme.sh", tmp_path, MODEL_PATH=str(tmp_path / "no-such-model"))
    out = tmp_path / "data" / "mme" / "tiny" / "q"
    assert broken.returncode != 0 and "not merging" in broken.stderr and not (out / "merge.jsonl").exists()

    ok = script("eval/mme.sh", tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(read_rows(out / "merge.jsonl")) == 3
    assert list((out / "to_eval").glob("*.txt")), "the eval_tool files are written after merging"
