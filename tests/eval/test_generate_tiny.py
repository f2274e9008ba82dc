"""``python -m llava.eval.generate`` end to end on the tiny model, in process: every benchmark, direct and ECSO,
batch 1 vs batch 4, --from-answers vs one pass, ranks of a launcher merged, and the CLI's exit codes."""
import pytest
from generate_testdata import MAKERS, TINY_ARGS, by_id, make_mmsafe, make_vlsafe, read_rows

from llava.eval import generate
from llava.eval.gen.manifest import load_manifest, manifest_path

N = 3
N_EACH = 2  # per benchmark (the machine is shared: keep the model calls few)


def strip_scores(rows):
    return [{k: v for k, v in r.items() if k != "harm_score"} for r in rows]


def gen(*argv) -> int:
    return generate.main([*TINY_ARGS, "-q", *argv])


@pytest.mark.parametrize("benchmark", list(MAKERS))
def test_every_benchmark_direct_batch_1_equals_batch_4_and_ecso_runs(benchmark, tmp_path, ref_data,
                                                                      tiny_hf_path):
    data = MAKERS[benchmark](tmp_path, ref_data, N_EACH)
    if benchmark == "mmbench":
        data += ["--limit", str(N_EACH)]
    for batch in ("1", "4"):
        assert gen(*data, "--answers-file", str(tmp_path / f"direct{batch}.jsonl"), "--batch-size", batch) == 0
    assert gen(*data, "--method", "ecso", "--threshold", "0", "--answers-file", str(tmp_path / "ecso.jsonl")) == 0
    direct, direct4, ecso = (read_rows(tmp_path / f) for f in ("direct1.jsonl", "direct4.jsonl", "ecso.jsonl"))
    assert len(direct) == N_EACH and direct == direct4
    assert [r["text"] for r in direct] == [r["direct"] for r in ecso]
    assert all(r["unsafe"] == "Yes" and r["caption"] and r["unsafe_answer"] == r["direct"] for r in ecso)
    assert all(r["benchmark"] == benchmark and r["model_id"] == "tiny" for r in direct + ecso)
    ids = {"vlsafe": ["image_id"], "mmsafetybench": ["scenario", "mode", "question_id"], "mme": ["question_id"],
           "mmbench": ["index"], "mmvet": ["question_id"]}[benchmark]
    assert all(r[k] is not None for r in direct for k in ids)
    m = load_manifest(manifest_path(tmp_path / "ecso.jsonl"))
    assert m["settings"]["model"]["layout"] == "hf" and m["settings"]["model"]["conv_mode"] == "vicuna_v1"
    assert m["settings"]["model"]["image_aspect_ratio"] == "pad" and m["status"] == "complete"


def test_ecso_batch_1_equals_batch_4(tmp_path, ref_data, tiny_hf_path):
    data = make_mmsafe(tmp_path, ref_data, N)
    ecso = ["--method", "ecso", "--threshold", "0"]  # flag every sample: all four steps run
    for batch in ("1", "4"):
        assert gen(*data, *ecso, "--answers-file", str(tmp_path / f"ecso{batch}.jsonl"), "--batch-size", batch) == 0
    ecso1, ecso4 = read_rows(tmp_path / "ecso1.jsonl"), read_rows(tmp_path / "ecso4.jsonl")
    assert len(ecso1) == N and strip_scores(ecso1) == strip_scores(ecso4)
    # Greedy text is identical; P(yes) comes from a float32 forward pass whose padding differs (~1e-7).
    assert [r["harm_score"] for r in ecso1] == pytest.approx([r["harm_score"] for r in ecso4], abs=1e-5)


def test_from_answers_gives_the_one_pass_ecso_rows(tmp_path, ref_data, tiny_hf_path):
    data = make_mmsafe(tmp_path, ref_data, N)
    assert gen(*data, "--method", "ecso", "--threshold", "1", "--answers-file", str(tmp_path / "probe.jsonl")) == 0
    scores = sorted(r["harm_score"] for r in read_rows(tmp_path / "probe.jsonl"))
    ecso = ["--method", "ecso", "--threshold", str(scores[1])]  # flags some samples, not all
    assert gen(*data, "--answers-file", str(tmp_path / "direct.jsonl")) == 0
    assert gen(*data, *ecso, "--from-answers", str(tmp_path / "direct.jsonl"),
               "--answers-file", str(tmp_path / "two.jsonl")) == 0
    assert gen(*data, *ecso, "--answers-file", str(tmp_path / "one.jsonl")) == 0
    two, one = read_rows(tmp_path / "two.jsonl"), read_rows(tmp_path / "one.jsonl")
    assert strip_scores(two) == strip_scores(one)
    assert [r["harm_score"] for r in two] == pytest.approx([r["harm_score"] for r in one], abs=1e-5)
    assert {r["unsafe"] for r in one} == {"Yes", "No"}
    m = load_manifest(manifest_path(tmp_path / "two.jsonl"))
    assert m["settings"]["direct_answers"] == "from_answers" and m["inputs"]["from_answers_sha256"]


def test_launcher_ranks_write_parts_and_rank_0_merges(tmp_path, ref_data, tiny_hf_path, monkeypatch):
    data = make_vlsafe(tmp_path, ref_data, 5)
    out = tmp_path / "ranks.jsonl"
    assert gen(*data, "--answers-file", str(tmp_path / "single.jsonl")) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # rank 0 last: it finds rank 1's part complete and merges
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert gen(*data, "--answers-file", str(out)) == 0
    assert sorted(p.name for p in tmp_path.glob("ranks.part-*.jsonl")) == ["ranks.part-0-of-2.jsonl",
                                                                           "ranks.part-1-of-2.jsonl"]
    assert read_rows(out) == read_rows(tmp_path / "single.jsonl")
    assert gen(*data, "--answers-file", str(out), "--num-chunks", "2") == 2  # ranks are the chunks


def test_cli_exit_codes_and_messages(tmp_path, ref_data, tiny_hf_path, caplog):
    data = make_vlsafe(tmp_path, ref_data, 2)
    assert gen("--benchmark", "vlsafe", "--question-file", str(tmp_path / "nope.jsonl"),
               "--answers-file", str(tmp_path / "a.jsonl")) == 2
    assert "nope.jsonl" in caplog.text
    assert gen(*data, "--answers-file", str(tmp_path / "a.jsonl"), "--num-chunks", "2", "--chunk-idx", "2") == 2
    assert "--chunk-idx must be in [0, 1]" in caplog.text
    assert gen(*data, "--answers-file", str(tmp_path / "b.jsonl")) == 0
    assert gen(*data, "--answers-file", str(tmp_path / "b.jsonl"), "--max-new-tokens", "9") == 2
    assert "--overwrite" in caplog.text and "decoding.max_new_tokens: 8 -> 9" in caplog.text
    assert len(by_id(read_rows(tmp_path / "b.jsonl"))) == 2
    with pytest.raises(SystemExit):
        generate.build_parser().parse_args(["--help"])


def test_levers_early_check_and_skipped_check_through_the_cli(tmp_path, ref_data, tiny_hf_path):
    data = make_mmsafe(tmp_path, ref_data, N)
    flag_all = ["--method", "ecso", "--threshold", "0"]
    assert gen(*data, *flag_all, "--answers-file", str(tmp_path / "plain.jsonl")) == 0
    assert gen(*data, *flag_all, "--early-check-tokens", "2", "--answers-file", str(tmp_path / "early.jsonl")) == 0
    assert gen(*data, "--max-new-tokens", "2", "--answers-file", str(tmp_path / "two.jsonl")) == 0
    plain, early, two = (read_rows(tmp_path / f) for f in ("plain.jsonl", "early.jsonl", "two.jsonl"))
    assert "early_stopped" not in plain[0] and all(r["early_stopped"] for r in early)
    assert [r["direct"] for r in early] == [r["unsafe_answer"] for r in early] == [r["text"] for r in two]
    assert [(r["text"], r["caption"]) for r in early] == [(r["text"], r["caption"]) for r in plain]
    m = load_manifest(manifest_path(tmp_path / "early.jsonl"))
    assert m["settings"]["ecso"]["early_check_tokens"] == 2
    assert gen(*data, *flag_all, "--skip-check-regex", "(?s).*", "--answers-file", str(tmp_path / "skip.jsonl")) == 0
    skip = read_rows(tmp_path / "skip.jsonl")
    assert all(r["unsafe"] == "No" and r["harm_score"] is None and r["text"] == r["direct"] for r in skip)
    assert [r["direct"] for r in skip] == [r["direct"] for r in plain]
