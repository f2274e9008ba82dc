"""MME reader: real question and ground-truth files, ids, image resolution, ground truth from the release folder."""
import json
from collections import Counter

import pytest

from llava.eval.benchmarks.mme import MMEGroundTruth, mme_question_variants, resolve_mme_image
from llava.eval.datasets import BenchmarkConfig, DatasetError, answer_fields, load_samples


@pytest.fixture(scope="module")
def mme_dir(ref_data):
    return ref_data / "mme"


@pytest.fixture(scope="module")
def gt_rows(mme_dir):
    return [json.loads(line) for line in (mme_dir / "llava_mme_gt.jsonl").read_text().splitlines()]


def test_real_file_count_unique_ids_and_ground_truth(mme_dir, gt_rows):
    samples = load_samples("mme", BenchmarkConfig(mme_dir / "llava_mme.jsonl", gt_file=mme_dir / "llava_mme_gt.jsonl"))
    assert len(samples) == 2374 and len({s.id for s in samples}) == 2374
    assert Counter(s.meta["question_id"] for s in samples).most_common(1)[0][1] == 2
    assert samples[0].id == "code_reasoning/0020.png#0" and samples[1].id == "code_reasoning/0020.png#1"
    assert [s.meta["gt_answer"] for s in samples] == [r["gt_answer"] for r in gt_rows]
    assert [s.meta["mme_question"] for s in samples] == [r["mme_question"] for r in gt_rows]
    assert len({s.meta["category"] for s in samples}) == 14
    fields = answer_fields(samples[0])
    assert (fields["question_id"], fields["category"], fields["image"]) == (
        "code_reasoning/0020.png", "code_reasoning", "code_reasoning/0020.png")
    assert fields["query"].endswith("\nAnswer the question using a single word or phrase.")


def test_without_gt_the_meta_says_unknown(mme_dir):
    s = load_samples("mme", BenchmarkConfig(mme_dir / "llava_mme.jsonl", limit=1))[0]
    assert s.meta["gt_answer"] is None and s.meta["mme_question"] is None


def test_question_variants_mirror_llava_converter():
    prompt = "Is there a dog?\nAnswer the question using a single word or phrase."
    assert mme_question_variants(prompt) == ["Is there a dog? Please answer yes or no.",
                                             "Is there a dog?  Please answer yes or no."]
    assert mme_question_variants("Is it? Please answer yes or no.") == ["Is it? Please answer yes or no."]


def _release_folder(root, gt_rows):
    """A tiny MME_Benchmark_release_version: artwork uses images/ + questions_answers_YN/, code_reasoning is flat.
    The artwork questions are written with MME's double space before 'Please'."""
    rows = [r for r in gt_rows if r["category"] in ("artwork", "code_reasoning")][:2]
    rows += [r for r in gt_rows if r["category"] == "artwork"][:2]
    for r in rows:
        cat, name = r["category"], r["question_id"].split("/")[-1]
        qa = root / cat / ("questions_answers_YN" if cat == "artwork" else "")
        qa.mkdir(parents=True, exist_ok=True)
        question = r["mme_question"].replace(" Please", "  Please") if cat == "artwork" else r["mme_question"]
        with (qa / (name.split(".")[0] + ".txt")).open("a") as f:
            f.write(f"{question}\t{r['gt_answer']}\n")
        if cat == "artwork":
            (root / cat / "images").mkdir(exist_ok=True)
    return rows


def test_ground_truth_from_release_folder(tmp_path, mme_dir, gt_rows):
    rows = _release_folder(tmp_path / "MME", gt_rows)
    gt = MMEGroundTruth.load(tmp_path / "MME")
    assert len(gt.answers) == 4
    questions = [json.loads(line) for line in (mme_dir / "llava_mme.jsonl").read_text().splitlines()]
    picked = {r["question_id"] for r in rows}
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in questions if q["question_id"] in picked))
    samples = load_samples("mme", BenchmarkConfig(qf, image_folder=tmp_path / "MME", gt_file=tmp_path / "MME"))
    assert len(samples) == 4
    assert all(s.meta["gt_answer"] in ("Yes", "No") for s in samples)
    assert any("  Please" in s.meta["mme_question"] for s in samples)


def test_unknown_ground_truth_raises_when_strict(tmp_path, mme_dir, gt_rows):
    _release_folder(tmp_path / "MME", gt_rows)
    with pytest.raises(DatasetError, match="no ground truth"):
        load_samples("mme", BenchmarkConfig(mme_dir / "llava_mme.jsonl", gt_file=tmp_path / "MME", strict=True))
    lax = load_samples("mme", BenchmarkConfig(mme_dir / "llava_mme.jsonl", gt_file=tmp_path / "MME"))
    assert sum(s.meta["gt_answer"] is not None for s in lax) == 4


def test_image_resolved_with_or_without_images_subfolder(tmp_path):
    (tmp_path / "artwork").mkdir()
    (tmp_path / "artwork" / "1.jpg").write_bytes(b"x")
    (tmp_path / "code" / "images").mkdir(parents=True)
    (tmp_path / "code" / "images" / "2.png").write_bytes(b"x")
    assert resolve_mme_image(tmp_path, "artwork/images/1.jpg") == tmp_path / "artwork" / "1.jpg"
    assert resolve_mme_image(tmp_path, "code/2.png") == tmp_path / "code" / "images" / "2.png"
    assert resolve_mme_image(tmp_path, "scene/3.jpg") == tmp_path / "scene" / "3.jpg"  # missing: LLaVA's path
