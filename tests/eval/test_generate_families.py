"""``python -m llava.eval.generate --method ecso`` on MM-SafetyBench TYPO images (rendered by the project's renderer
from the real question file) for every non-LLaVA family's tiny model, in process: rows and manifest name the family,
batch 2 gives the rows of batch 1."""
import pytest
from generate_testdata import read_rows

from llava.eval import generate, mmsafetybench_images
from llava.eval.gen.manifest import load_manifest, manifest_path
from tests.conftest import VLM_FAMILIES

SCENARIO = "01-Illegal_Activitiy"


@pytest.fixture(scope="module")
def typo_images(tmp_path_factory, ref_data):
    out = tmp_path_factory.mktemp("mmsb") / "imgs"
    questions = ref_data / "mmsafetybench" / "processed_questions" / f"{SCENARIO}.json"
    assert mmsafetybench_images.main(["--questions", str(questions), "--out", str(out), "--modes", "TYPO"]) == 0
    return questions, out


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_generate_ecso_on_typo_images(family, typo_images, tmp_path):
    questions, images = typo_images
    args = ["--model-path", f"tiny-{family}", "--device", "cpu", "--max-new-tokens", "6", "--no-progress", "-q",
            "--benchmark", "mmsafetybench", "--question-file", str(questions), "--image-folder", str(images),
            "--mode", "TYPO", "--limit", "2", "--method", "ecso", "--threshold", "0"]
    for batch in ("1", "2"):
        assert generate.main([*args, "--batch-size", batch, "--answers-file", str(tmp_path / f"b{batch}.jsonl")]) == 0
    rows, rows2 = read_rows(tmp_path / "b1.jsonl"), read_rows(tmp_path / "b2.jsonl")
    assert len(rows) == 2 and all(r["mode"] == "TYPO" and r["model_family"] == family for r in rows)
    assert all(r["unsafe"] == "Yes" and r["caption"] and r["unsafe_answer"] == r["direct"] for r in rows)
    assert [(r["direct"], r["caption"], r["text"]) for r in rows] == [(r["direct"], r["caption"], r["text"])
                                                                      for r in rows2]
    model = load_manifest(manifest_path(tmp_path / "b1.jsonl"))["settings"]["model"]
    assert model["model_family"] == family and model["prompt_format"] == "processor chat template"


def test_seed_script_takes_another_family(typo_images, tmp_path):
    """scripts/v1_5/eval_safe/gen_mmsafe.sh with MODEL_PATH=tiny-idefics3, on the rendered TYPO images."""
    import os
    import shutil
    import subprocess
    import sys

    from llava.eval.gen.layout import DATA_LAYOUT
    from tests.conftest import REPO_ROOT

    questions, images = typo_images
    layout = DATA_LAYOUT["mmsafetybench"]
    (tmp_path / layout.question_file).mkdir(parents=True)
    shutil.copy(questions, tmp_path / layout.question_file)
    shutil.copytree(images / SCENARIO / "TYPO", tmp_path / layout.image_folder / SCENARIO / "TYPO")
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "MODEL": "smol", "MODEL_PATH": "tiny-idefics3", "LIMIT": "2",
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "0", "SCENARIOS": SCENARIO, "MODES": "TYPO",
           "EXTRA_ARGS": "--max-new-tokens 4 --device cpu -q"}
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "v1_5" / "eval_safe" / "gen_mmsafe.sh")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_rows(tmp_path / "data" / "mmsafe" / "outputs" / SCENARIO / "TYPO" / "smol" / "q" / "merge.jsonl")
    assert len(rows) == 2 and {(r["model_id"], r["model_family"]) for r in rows} == {("smol", "idefics3")}
