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
