"""Registry, config checks, missing-image handling, answer fields; VLSafe and MM-Vet readers on the real files."""
import argparse
import json

import pytest
from PIL import Image

from llava.errors import ImageError, InvalidRequestError
from llava.eval import datasets
from llava.eval.datasets import (BenchmarkConfig, DatasetError, MissingImageError, Sample, answer_fields,
                                 check_images, get_benchmark, load_samples, summarize_missing)


def _jpeg(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="JPEG")


@pytest.fixture(scope="module")
def vlsafe_file(ref_data):
    return ref_data / "vlsafe" / "examine_sampled_500_VLSafe.jsonl"


def test_registry_names_and_unknown_name_lists_valid_ones():
    assert datasets.benchmark_names() == ["vlsafe", "mmsafetybench", "mme", "mmbench", "mmvet", "figstep", "xstest"]
    with pytest.raises(InvalidRequestError) as e:
        get_benchmark("mmsafety")
    for name in datasets.benchmark_names():
        assert name in str(e.value)


def test_option_for_another_benchmark_is_rejected(vlsafe_file):
    with pytest.raises(InvalidRequestError, match="mode"):
        load_samples("vlsafe", BenchmarkConfig(vlsafe_file, mode="SD"))
    with pytest.raises(InvalidRequestError, match="limit"):
        load_samples("vlsafe", BenchmarkConfig(vlsafe_file, limit=0))


def test_missing_question_file_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl"):
        load_samples("vlsafe", BenchmarkConfig(tmp_path / "nope.jsonl"))


def test_vlsafe_real_file(vlsafe_file, tmp_path):
    samples = load_samples("vlsafe", BenchmarkConfig(vlsafe_file, image_folder=tmp_path))
    assert len(samples) == 500
    assert len({s.id for s in samples}) == 500
    first = json.loads(vlsafe_file.read_text().splitlines()[0])
    s = samples[0]
    assert (s.id, s.query, s.image_name) == (first["image_id"], first["query"], first["image_id"])
    assert s.image == str(tmp_path / first["image_id"])
    assert s.meta == {"image_id": first["image_id"], "caption": first["caption"]}
    assert answer_fields(s) == {"id": first["image_id"], "benchmark": "vlsafe", "image": first["image_id"],
                                "query": first["query"], "image_id": first["image_id"],
                                "meta": {"caption": first["caption"]}}
    assert len(load_samples("vlsafe", BenchmarkConfig(vlsafe_file, limit=7))) == 7


def test_vlsafe_repeated_image_gets_unique_ids_and_bad_rows_fail(tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"image_id": "a.jpg", "query": "q1"}\n\n{"image_id": "a.jpg", "query": "q2"}\n')
    assert [s.id for s in load_samples("vlsafe", BenchmarkConfig(qf))] == ["a.jpg", "a.jpg#1"]
    qf.write_text('{"image_id": "a.jpg"}\n')
    with pytest.raises(DatasetError, match="row 1 lacks"):
        load_samples("vlsafe", BenchmarkConfig(qf))
    qf.write_text('{"image_id": \n')
    with pytest.raises(DatasetError, match=":1: not valid JSON"):
        load_samples("vlsafe", BenchmarkConfig(qf))


def test_check_images_reports_missing_and_keeps_the_rest(vlsafe_file, tmp_path, caplog):
    samples = load_samples("vlsafe", BenchmarkConfig(vlsafe_file, image_folder=tmp_path, limit=5))
    for s in samples[:3]:
        _jpeg(tmp_path / s.image_name)
    extra = [Sample("b", b"\xff\xd8", "q"), Sample("t", None, "q")]
    ok, missing = check_images(samples + extra)
    assert [s.id for s in ok] == [s.id for s in samples[:3]] + ["b", "t"]
    assert missing == [samples[3].image, samples[4].image]
    assert samples[3].image in caplog.text
    report = summarize_missing(missing, limit=1)
    assert report.splitlines() == ["2 missing image(s):", f"  {samples[3].image}", "  ... and 1 more"]


def test_check_images_strict_raises_typed_error_naming_path(vlsafe_file, tmp_path):
    samples = load_samples("vlsafe", BenchmarkConfig(vlsafe_file, image_folder=tmp_path, limit=2))
    with pytest.raises(MissingImageError) as e:
        check_images(samples, strict=True)
    assert isinstance(e.value, ImageError)
    assert e.value.path == samples[0].image and samples[0].image in str(e.value)


def test_mmvet_real_file(ref_data, tmp_path):
    qf = ref_data / "mmvet" / "llava-mm-vet.jsonl"
    samples = load_samples("mmvet", BenchmarkConfig(qf, image_folder=tmp_path))
    assert len(samples) == 218 and len({s.id for s in samples}) == 218
    s = samples[1]
    assert (s.id, s.query, s.image_name, s.image) == ("1", "What is d in the last equation?", "v1_1.png",
                                                      str(tmp_path / "v1_1.png"))
    fields = answer_fields(s)
    assert fields["question_id"] == 1 and fields["meta"] == {"category": "conv"}


def test_cli_flags_build_the_config_and_check_cli_exit_status(vlsafe_file, tmp_path, capsys, caplog):
    parser = argparse.ArgumentParser()
    datasets.add_benchmark_arguments(parser)
    args = parser.parse_args(["--benchmark", "mmsafetybench", "--question-file", "q", "--scenarios", "01, 05",
                              "--mode", "text", "--limit", "3", "--strict"])
    assert datasets.config_from_args(args) == BenchmarkConfig("q", mode="text", scenarios=("01", "05"), limit=3,
                                                              strict=True)
    argv = ["--benchmark", "vlsafe", "--question-file", str(vlsafe_file), "--image-folder", str(tmp_path),
            "--limit", "2"]
    assert datasets.main(argv) == 1
    assert json.loads(capsys.readouterr().out)["missing_images"] == 2
    missing = [r.getMessage() for r in caplog.records if "image not found" in r.getMessage()]
    assert len(missing) == 2  # each missing image said once
