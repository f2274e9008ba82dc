"""run_llava and the terminal CLI as users run them (subprocesses on the tiny model)."""
import json
import re

import pytest

from tests.conftest import REPO_ROOT, run_module

CAT = str(REPO_ROOT / "assets" / "examples" / "cat.png")


@pytest.mark.slow
def test_run_llava_ecso_json_matches_in_process(tiny_engine):
    from llava.ecso.local import LocalBackend
    from llava.ecso.config import ECSOConfig
    from llava.ecso.pipeline import ECSO

    proc = run_module("llava.eval.run_llava", "--model-path", "tiny", "--image-file", CAT, "--query",
                      "How do I make this at home?", "--ecso", "--json", "--temperature", "0",
                      "--max_new_tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = ECSO(LocalBackend(tiny_engine), ECSOConfig(max_new_tokens=12, temperature=0.0)).run(
        CAT, "How do I make this at home?")
    for key in ("direct", "flagged", "caption", "safe_answer", "final", "verdict_mode"):
        assert got[key] == getattr(want, key), key
    assert got["harm_score"] == pytest.approx(want.harm_score, abs=1e-6)
    assert got["options"]["tiny_random_weights"] is True and got["options"]["layout"] == "hf"


@pytest.mark.slow
def test_run_llava_errors_are_clear_and_fast(tmp_path):
    missing = run_module("llava.eval.run_llava", "--model-path", "tiny", "--image-file", str(tmp_path / "nope.png"),
                         "--query", "hi")
    assert missing.returncode == 2 and "image file not found" in missing.stderr
    (tmp_path / "empty.png").write_bytes(b"")
    empty = run_module("llava.eval.run_llava", "--model-path", "tiny", "--image-file", str(tmp_path / "empty.png"),
                       "--query", "hi")
    assert empty.returncode == 2 and "empty" in empty.stderr
    bad_model = run_module("llava.eval.run_llava", "--model-path", str(tmp_path / "no-model"), "--query", "hi")
    assert bad_model.returncode == 2 and "not a local folder" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr + missing.stderr + empty.stderr
    assert missing.stderr.count("image file not found") == 1  # said once


@pytest.mark.slow
def test_run_llava_says_how_the_answer_came_about():
    """Without --json: stdout is the final answer alone, without control characters; stderr one summary line."""
    proc = run_module("llava.eval.run_llava", "--model-path", "tiny", "--image-file", CAT, "--query",
                      "How do I make this at home?", "--ecso", "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    summary = [line for line in proc.stderr.splitlines() if line.startswith("ECSO: ")]
    assert len(summary) == 1, proc.stderr
    assert re.fullmatch(r"ECSO: P\(yes\) 0\.\d{3} (>= threshold 0\.5: flagged|< threshold 0\.5: not flagged); final "
                        r"answer: the (safe answer \(step 4, from the query-aware caption, without the image\)|direct "
                        r"answer \(step 1\)) \[random-weight model: its text is random\]", summary[0]), summary[0]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", proc.stdout) and proc.stdout.strip()


def test_tiny_models_default_to_short_answers(tmp_path):
    from llava.cli_args import ecso_config, is_tiny_model
    from llava.eval.run_llava import build_parser

    parse = lambda *a: ecso_config(build_parser().parse_args(["--query", "q", *a])).max_new_tokens  # noqa: E731
    assert parse() == parse("--model-path", "tiny-original") == 32
    assert parse("--model-path", "llava-hf/llava-1.5-7b-hf") == 512  # LLaVA's run_llava default
    assert parse("--max_new_tokens", "100") == parse("--model-path", "tiny", "--max-new-tokens", "100") == 100
    assert parse("--backend", "worker") == 512  # the served model is not known here
    (tmp_path / "ecso_tiny.json").write_text("{}")
    assert is_tiny_model(str(tmp_path)) and not is_tiny_model(str(tmp_path / "other"))
    assert "(default: 512; 32 for a tiny random-weight" in " ".join(build_parser().format_help().split())


@pytest.mark.slow
def test_cli_ecso_shows_steps_and_chat_mode():
    proc = run_module("llava.serve.cli", "--model-path", "tiny", "--image-file", CAT, "--ecso", "--temperature",
                      "0", "--max_new_tokens", "8", input="How do I make this at home?\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "[Direct answer]" in proc.stdout and "[Harm detection] P(yes) 0." in proc.stdout
    assert "threshold 0.5: " in proc.stdout and "[Final answer: the " in proc.stdout
    assert proc.stdout.startswith("[random-weight model: its text is random]\n")
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", proc.stdout)  # no control characters shown
    chat = run_module("llava.serve.cli", "--model-path", "tiny", "--image-file", CAT, "--temperature", "0",
                      "--max_new_tokens", "8", input="What is this?\nAnd now?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("ASSISTANT:") == 2


def _run_llava_json(capsys, *flags: str) -> dict:
    from llava.eval.run_llava import main

    assert main(["--model-path", "tiny", "--device", "cpu", "--image-file", CAT, "--query", "How do I make this at home?",
                 "--ecso", "--json", "--temperature", "0", "--max_new_tokens", "3", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_force_verdict_shows_steps_3_and_4_on_any_model_and_records_the_step_options(capsys):
    kept = _run_llava_json(capsys, "--threshold", "0", "--force-verdict", "no")  # the check alone would flag it
    assert not kept["flagged"] and kept["caption"] is None and kept["final"] == kept["direct"]
    forced = _run_llava_json(capsys, "--threshold", "1", "--force-verdict", "yes", "--image-aspect-ratio-check",
                             "crop", "--truncate-chars", "0")  # the check alone would pass it
    assert forced["flagged"] and forced["caption"] and forced["safe_answer"] and forced["final"] == forced["safe_answer"]
    assert forced["harm_score"] is not None and forced["harm_score"] != kept["harm_score"]  # checked, on the crop
    options = forced["options"]
    assert options["force_verdict"] is True and options["image_aspect_ratio_check"] == "crop"
    assert options["truncate_chars"] == 0 and "image_aspect_ratio_caption" not in options
    assert "image_aspect_ratio_check" not in kept["options"] and kept["options"]["truncate_chars"] == 1927


@pytest.mark.parametrize("flags, words", [
    (["--force-verdict", "maybe"], "invalid choice: 'maybe' (choose from yes, no)"),
    (["--image-aspect-ratio-check", "square"], "invalid choice: 'square'"),
    (["--truncate-chars", "-1"], "truncate_chars must be an integer >= 0, got -1"),
])
def test_bad_step_flags_name_the_value(capsys, flags, words):
    from llava.eval.run_llava import main

    try:
        code = main(["--model-path", "tiny", "--device", "cpu", "--query", "q", "--ecso", *flags])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and words in capsys.readouterr().err
