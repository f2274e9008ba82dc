"""run_llava and the terminal CLI as users run them (subprocesses on the tiny model)."""
import json

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


@pytest.mark.slow
def test_cli_ecso_shows_steps_and_chat_mode():
    proc = run_module("llava.serve.cli", "--model-path", "tiny", "--image-file", CAT, "--ecso", "--temperature",
                      "0", "--max_new_tokens", "8", input="How do I make this at home?\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "[Direct answer]" in proc.stdout and "[Harm detection]" in proc.stdout
    assert "[Final answer]" in proc.stdout
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
