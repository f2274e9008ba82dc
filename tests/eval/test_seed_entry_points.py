"""The seed's entry points (llava/eval/model_*.py) with the seed's flags, mapped onto generate (tiny model)."""
import importlib

import pytest
from generate_testdata import TINY_ARGS, make_mme, make_mmsafe, make_mmvet, read_rows

from llava.eval import generate
from llava.eval.gen.manifest import load_manifest, manifest_path
from llava.eval.gen.seed import SEED_ENTRIES, build_seed_parser, translate

SEED = ["--model-path", "tiny", "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "8",
        "--device", "cpu", "--no-progress", "-q"]


def seed(name, *argv) -> int:
    return importlib.import_module(f"llava.eval.{name}").main([*SEED, *argv])


def strip_scores(rows):
    return [{k: v for k, v in r.items() if k != "harm_score"} for r in rows]


def test_every_seed_module_has_the_seed_flags():
    common = {"--model-path", "--model-base", "--question-file", "--answers-file", "--conv-mode", "--num-chunks",
              "--chunk-idx", "--temperature", "--top_p", "--num_beams", "--max_new_tokens"}
    for name, entry in SEED_ENTRIES.items():
        flags = {s for a in build_seed_parser(entry)._actions for s in a.option_strings}
        assert common <= flags, name
        assert ("--image-folder" in flags) == (name not in ("model_vqa_mmbench", "model_mmbench_ask_unsafe"))
        assert callable(importlib.import_module(f"llava.eval.{name}").main)
    assert {"--all-rounds", "--single-pred-prompt", "--lang"} <= {
        s for a in build_seed_parser(SEED_ENTRIES["model_vqa_mmbench"])._actions for s in a.option_strings}


def test_seed_defaults_and_passthrough_flags(tmp_path):
    entry = SEED_ENTRIES["model_vlsafe_tell_ask"]
    args, rest = build_seed_parser(entry).parse_known_args(
        ["--model-path", "m", "--question-file", str(tmp_path / "q.jsonl"), "--batch-size", "4"])
    argv = generate.build_parser().parse_args(translate(entry, args, rest))
    assert (argv.method, argv.temperature, argv.conv_mode, argv.max_new_tokens) == ("ecso", 0.2, "llava_v1", 1024)
    assert argv.batch_size == 4 and argv.benchmark == "vlsafe" and not argv.image_in_safe_step
    utility = SEED_ENTRIES["model_vqa_ask_unsafe"]
    args, rest = build_seed_parser(utility).parse_known_args(
        ["--model-path", "m", "--question-file", "q.jsonl", "--benchmark", "mmvet"])
    assert generate.build_parser().parse_args(translate(utility, args, rest)).image_in_safe_step


def test_mmsafe_two_pass_with_the_seed_layout_equals_one_pass(tmp_path, ref_data, tiny_hf_path):
    make_mmsafe(tmp_path, ref_data, 3)
    qf = ref_data / "mmsafetybench" / "processed_questions" / "01-Illegal_Activitiy.json"
    scenario_images = tmp_path / "imgs" / "01-Illegal_Activitiy"  # the seed passed the scenario's own folder
    direct = tmp_path / "q" / "4_0.jsonl"
    assert seed("model_mmsafe", "--question-file", str(qf), "--image-folder", str(scenario_images),
                "--answers-file", str(direct), "--mode", "SD_TYPO", "--limit", "3") == 0
    ecso = tmp_path / "tell_ask.jsonl"
    assert seed("model_mmsafe_tell_ask", "--question-file", str(direct), "--image-folder", str(scenario_images),
                "--answers-file", str(ecso), "--mode", "SD_TYPO", "--threshold", "0") == 0
    one = tmp_path / "one.jsonl"
    assert generate.main([*TINY_ARGS, "-q", "--benchmark", "mmsafetybench", "--question-file", str(qf),
                          "--image-folder", str(tmp_path / "imgs"), "--limit", "3", "--method", "ecso",
                          "--threshold", "0", "--answers-file", str(one)]) == 0
    assert len(read_rows(ecso)) == 3 and strip_scores(read_rows(ecso)) == strip_scores(read_rows(one))
    assert load_manifest(manifest_path(ecso))["settings"]["direct_answers"] == "from_answers"
    assert seed("model_mmsafe_tell_ask", "--question-file", str(direct), "--answers-file",
                str(tmp_path / "x.jsonl"), "--mode", "TYPO") == 2


def test_vqa_entries_tell_mme_from_mmvet_and_ecso_keeps_the_image(tmp_path, ref_data, tiny_hf_path):
    mme = make_mme(tmp_path, ref_data, 1)
    mmvet = make_mmvet(tmp_path, ref_data, 1)
    assert seed("model_vqa_loader", "--question-file", mme[3], "--image-folder", mme[5],
                "--answers-file", str(tmp_path / "mme.jsonl"), "--limit", "1") == 0
    assert read_rows(tmp_path / "mme.jsonl")[0]["benchmark"] == "mme"
    assert seed("model_vqa", "--question-file", mmvet[3], "--image-folder", mmvet[5],
                "--answers-file", str(tmp_path / "vet.jsonl"), "--limit", "1") == 0
    assert read_rows(tmp_path / "vet.jsonl")[0]["benchmark"] == "mmvet"
    assert seed("model_vqa_ask_unsafe", "--question-file", str(tmp_path / "vet.jsonl"),
                "--answers-file", str(tmp_path / "vet_ecso.jsonl"), "--threshold", "0") == 0
    m = load_manifest(manifest_path(tmp_path / "vet_ecso.jsonl"))
    assert m["settings"]["ecso"]["image_in_safe_step"] is True and m["counts"]["answered"] == 1


@pytest.mark.parametrize("flags", [["--all-rounds"], ["--lang", "cn"]])
def test_unsupported_mmbench_flags_are_refused(flags, tmp_path):
    assert seed("model_vqa_mmbench", "--question-file", str(tmp_path / "x.tsv"),
                "--answers-file", str(tmp_path / "a.jsonl"), *flags) == 2
