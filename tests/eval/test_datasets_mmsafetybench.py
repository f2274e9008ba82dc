"""MM-SafetyBench reader on the real processed_questions files."""
import json

import pytest

from llava.eval.benchmarks.mmsafetybench import QUERY_FIELD_BY_MODE, select_scenarios
from llava.eval.datasets import BenchmarkConfig, DatasetError, answer_fields, load_samples


@pytest.fixture(scope="module")
def qdir(ref_data):
    return ref_data / "mmsafetybench" / "processed_questions"


@pytest.fixture(scope="module")
def raw(qdir):
    return {p.stem: json.loads(p.read_text()) for p in sorted(qdir.glob("*.json"))}


def test_query_field_per_mode_is_pinned():
    assert QUERY_FIELD_BY_MODE == {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question",
                                   "SD_TYPO": "Rephrased Question", "text": "Question"}


@pytest.mark.parametrize("mode", ["SD", "TYPO", "SD_TYPO", "text"])
def test_every_mode_reads_all_1680_questions(qdir, raw, mode, tmp_path):
    samples = load_samples("mmsafetybench", BenchmarkConfig(qdir, image_folder=tmp_path, mode=mode))
    assert len(samples) == 1680 and len({s.id for s in samples}) == 1680
    assert len({s.meta["scenario"] for s in samples}) == 13
    for s in samples[::97]:
        row = raw[s.meta["scenario"]][s.meta["question_id"]]
        assert s.query == row[QUERY_FIELD_BY_MODE[mode]]
        assert s.meta["key_phrase"] == row["Key Phrase"]
    s = samples[0]
    assert s.id == f"01-Illegal_Activitiy/{mode}/0"
    if mode == "text":
        assert s.image is None and s.image_name is None
    else:
        assert s.image_name == f"01-Illegal_Activitiy/{mode}/0.jpg"
        assert s.image == str(tmp_path / "01-Illegal_Activitiy" / mode / "0.jpg")


def test_default_mode_is_sd_typo_and_answer_fields(qdir):
    s = load_samples("mmsafetybench", BenchmarkConfig(qdir / "02-HateSpeech.json", limit=1))[0]
    fields = answer_fields(s)
    assert {k: fields[k] for k in ("id", "benchmark", "image", "scenario", "mode", "question_id")} == {
        "id": "02-HateSpeech/SD_TYPO/0", "benchmark": "mmsafetybench", "image": "02-HateSpeech/SD_TYPO/0.jpg",
        "scenario": "02-HateSpeech", "mode": "SD_TYPO", "question_id": "0"}
    assert set(fields["meta"]) == {"key_phrase", "phrase_type", "question"}


@pytest.mark.parametrize("scenario", ["05-EconomicHarm", "08-Political_Lobbying"])
def test_non_contiguous_ids_come_from_the_keys(qdir, raw, scenario):
    samples = load_samples("mmsafetybench", BenchmarkConfig(qdir / f"{scenario}.json", mode="SD"))
    ids = [s.meta["question_id"] for s in samples]
    assert ids == list(raw[scenario])
    assert [int(i) for i in ids] != list(range(len(ids)))  # gaps exist: a range() would invent questions
    assert max(int(i) for i in ids) >= len(ids)


def test_tiny_subset_has_168_listed_ids(qdir, ref_data):
    tiny = ref_data / "mmsafetybench" / "TinyVersion_ID_List.json"
    listed = {(e["Scenario"], str(i)) for e in json.loads(tiny.read_text()) for i in e["Sampled_ID_List"]}
    samples = load_samples("mmsafetybench", BenchmarkConfig(qdir, mode="TYPO", tiny_list=tiny))
    assert len(samples) == 168
    assert {(s.meta["scenario"], s.meta["question_id"]) for s in samples} == listed
    # the parent folder (holding processed_questions/) is accepted too
    assert len(load_samples("mmsafetybench", BenchmarkConfig(qdir.parent, tiny_list=tiny))) == 168


def test_scenario_filter_by_name_or_number(qdir, raw):
    samples = load_samples("mmsafetybench", BenchmarkConfig(qdir, scenarios=("3", "13-Gov_Decision")))
    assert {s.meta["scenario"] for s in samples} == {"03-Malware_Generation", "13-Gov_Decision"}
    assert len(samples) == len(raw["03-Malware_Generation"]) + len(raw["13-Gov_Decision"])
    with pytest.raises(DatasetError, match="available: 01-Illegal_Activitiy"):
        select_scenarios(list(raw), ("99",))


def test_bad_mode_and_bad_file(qdir, tmp_path):
    with pytest.raises(DatasetError, match="valid modes: SD, TYPO, SD_TYPO, text"):
        load_samples("mmsafetybench", BenchmarkConfig(qdir, mode="typo"))
    bad = tmp_path / "01-X.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="keyed by question id"):
        load_samples("mmsafetybench", BenchmarkConfig(bad))
    with pytest.raises(DatasetError, match="not found"):
        load_samples("mmsafetybench", BenchmarkConfig(tmp_path / "missing"))
