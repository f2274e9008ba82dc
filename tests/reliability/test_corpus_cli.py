"""The bad-input corpus (corpus.py) against run_llava and the benchmark reader + generation runner: every case
ends with the documented outcome (exit 0 with an answer, or exit 2 with one ``error:`` line naming the problem; a
DatasetError naming the file; a sample recorded as failed), never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import CASES, QUERY, Case, Req, expected, good_png

from llava.errors import ECSOError, ImageError, InvalidRequestError
from llava.eval import generate, run_llava
from llava.eval.benchmarks.base import BenchmarkConfig, DatasetError
from llava.eval.benchmarks.registry import load_samples
from llava.eval.gen.manifest import load_manifest, manifest_path
from tests.conftest import REPO_ROOT

CLI_CASES = [c for c in CASES if expected(c, "cli") is not None]
READER_IMAGE_CASES = [c for c in CASES if c.kind == "request" and expected(c, "reader") is not None]
QUESTION_FILE_CASES = [c for c in CASES if c.kind == "question_file"]
BASE_ARGS = ["--model-path", "tiny", "--device", "cpu", "--temperature", "0", "--max_new_tokens", "2"]


def _cli_argv(req: Req, tmp_path: Path) -> list[str]:
    argv = list(BASE_ARGS)
    if req.model:
        argv[1] = req.model
    paths = []
    for i, data in enumerate(req.images):
        path = tmp_path / f"image{i}.bin"
        path.write_bytes(data)
        paths.append(str(path))
    if paths:
        argv += ["--image-file", ",".join(paths)]
    names = {"max_new_tokens": "--max_new_tokens", "temperature": "--temperature", "top_p": "--top_p"}
    for key, value in req.params.items():
        argv += [names[key], str(value)]
    return argv + ["--query", req.text]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_run_llava_answers_or_names_the_problem(case: Case, tmp_path, tiny_hf_path, capsys) -> None:
    want = expected(case, "cli")
    try:
        code = run_llava.main(_cli_argv(case.build(), tmp_path))
    except SystemExit as exc:  # argparse refusing a value: exit 2 with a usage line
        code = exc.code
    err = capsys.readouterr().err
    if want == "ok":
        assert code == 0, err[-2000:]
        return
    assert code == 2, f"{case.name}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err
    assert "error: " in err and case.words.lower() in err.lower(), err[-2000:]


@pytest.mark.slow
def test_run_llava_process_exits_cleanly_on_bad_and_good_images(tmp_path, tiny_hf_path) -> None:
    """The same outcomes as a real process: one error line and exit 2 for a corrupt image, an answer for a CMYK
    JPEG, no traceback either way."""
    bad, good = tmp_path / "bad.png", tmp_path / "cmyk.jpg"
    bad.write_bytes(good_png()[:40])
    cmyk = next(c for c in CASES if c.name == "CMYK JPEG").build()
    good.write_bytes(cmyk.images[0])
    for path, code in ((bad, 2), (good, 0)):
        proc = subprocess.run([sys.executable, "-m", "llava.eval.run_llava", *BASE_ARGS, "--image-file", str(path),
                               "--query", QUERY], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        if code == 2:
            assert proc.stderr.count("error: ") == 1 and str(path) in proc.stderr


# ------------------------------------------------------------------------------------------- benchmark readers


@pytest.mark.parametrize("case", QUESTION_FILE_CASES, ids=lambda c: c.name)
def test_reader_names_the_bad_question_file(case: Case, tmp_path) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_bytes(case.build())
    with pytest.raises(DatasetError) as info:
        load_samples("vlsafe", BenchmarkConfig(question_file=path, image_folder=tmp_path))
    assert str(path) in str(info.value) and case.words.lower() in str(info.value).lower()


def test_generate_refuses_a_bad_question_file_with_exit_2(tmp_path, caplog) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_bytes(b'{"image_id": "a.jpg", "query": "\xff"}\n')
    code = generate.main(["--benchmark", "vlsafe", "--question-file", str(path), "--image-folder", str(tmp_path),
                          "--answers-file", str(tmp_path / "out.jsonl"), "--model-path", "tiny", "-q"])
    assert code == 2 and "not valid UTF-8" in caplog.text


def test_generation_over_every_corpus_image(tmp_path, tiny_hf_path) -> None:
    """One VLSafe run whose samples use the corpus's images: readable ones are answered, the others are recorded
    as failed samples with the cause (the run still completes: a bad image is not something a rerun fixes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows, want = [], {}
    for i, case in enumerate(READER_IMAGE_CASES):
        name = f"{i:02d}.img"
        (folder / name).write_bytes(case.build().images[0])
        rows.append({"image_id": name, "query": f"{QUERY} ({case.name})"})
        want[name] = expected(case, "reader")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    code = generate.main(["--benchmark", "vlsafe", "--question-file", str(questions), "--image-folder", str(folder),
                          "--answers-file", str(out), "--model-path", "tiny", "--device", "cpu", "--max-new-tokens",
                          "2", "--batch-size", "4", "-q", "--no-progress"])
    assert code == 0
    answered = {json.loads(line)["id"] for line in out.read_text().splitlines()}
    failed = {e["id"]: e for e in load_manifest(manifest_path(out))["errors"]}
    assert answered == {name for name, w in want.items() if w == "ok"}
    assert set(failed) == {name for name, w in want.items() if w != "ok"}
    for error in failed.values():
        assert error["message"] and "Traceback" not in error["message"]


def test_every_image_case_is_an_image_error_or_an_image(tmp_path) -> None:
    """load_image itself: the corpus's images give an RGB image or an ImageError (an InvalidRequestError)."""
    from llava.mm_utils import load_image

    for case in READER_IMAGE_CASES:
        data = case.build().images[0]
        if expected(case, "reader") == "ok":
            assert load_image(data).mode == "RGB", case.name
        else:
            with pytest.raises(ImageError):
                load_image(data)
    assert issubclass(ImageError, InvalidRequestError) and issubclass(DatasetError, ECSOError)
