"""Write errors while saving results: a disk that fills up (a tiny tmpfs where this test may mount one, else a
file-size limit, RLIMIT_FSIZE, in a subprocess) and an unwritable path. Generation answers and judge outputs get a
clear error (exit 2, the path and the cause, no traceback) and never a torn or truncated file: every line is a
complete row, every id once; freeing the space and rerunning resumes to the complete result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from generate_testdata import TINY_ARGS, make_vlsafe, read_rows  # noqa: E402
from judge_server import JudgeServer  # noqa: E402

from llava.eval import generate  # noqa: E402
from llava.eval.judge.cli import main as judge_main  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402

pytestmark = pytest.mark.slow

N = 24


@contextmanager
def small_disk(where: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB mounted at ``where`` (skips where mounting is not allowed)."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0777", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:100]}); the RLIMIT_FSIZE variant covers it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def grow(mount: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mount)], check=True)


def assert_whole_lines(path: Path) -> list[dict]:
    """The file holds complete JSON lines only (or nothing), each id once."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), f"{path} ends with a torn line: {data[-80:]!r}"
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    ids = [str(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)), f"repeated ids in {path}"
    return rows


def run_limited(code: str, limit_bytes: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a Python subprocess whose files may not grow past ``limit_bytes`` (writes fail with EFBIG;
    Python ignores SIGXFSZ)."""
    prelude = ("import resource, sys\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=180,
                          cwd=REPO_ROOT, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def vlsafe(tmp_path_factory, ref_data) -> list[str]:
    return make_vlsafe(tmp_path_factory.mktemp("vlsafe"), ref_data, N)


@pytest.fixture(scope="module")
def reference(vlsafe, tmp_path_factory, tiny_hf_path) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "answers.jsonl"
    assert generate.main([*TINY_ARGS, "-q", *vlsafe, "--answers-file", str(out), "--batch-size", "4"]) == 0
    return read_rows(out)


def test_generation_on_a_full_disk_stops_cleanly_and_resumes(vlsafe, reference, tmp_path, caplog) -> None:
    with small_disk(tmp_path / "disk", 12) as disk:
        out = disk / "answers.jsonl"
        argv = [*TINY_ARGS, "-q", *vlsafe, "--answers-file", str(out), "--batch-size", "4"]
        assert generate.main(argv) == 2
        assert "No space left on device" in caplog.text and str(out) in caplog.text
        assert "Traceback" not in caplog.text
        partial = assert_whole_lines(out)
        assert len(partial) < N and not list(disk.glob(".*tmp*"))  # no half-written temporaries either
        grow(disk, 1024)
        caplog.clear()
        assert generate.main(argv) == 0, caplog.text
        assert read_rows(out) == reference


def test_generation_past_a_file_size_limit_stops_cleanly_and_resumes(vlsafe, reference, tmp_path) -> None:
    out = tmp_path / "answers.jsonl"
    argv = [*TINY_ARGS, "-q", *vlsafe, "--answers-file", str(out), "--batch-size", "4"]
    proc = run_limited(f"from llava.eval import generate\nsys.exit(generate.main({argv!r}))", 6000)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "File too large" in proc.stderr and str(out) in proc.stderr and "Traceback" not in proc.stderr
    partial = assert_whole_lines(out)
    assert 0 < len(partial) < N and out.stat().st_size <= 6000
    assert generate.main(argv) == 0
    assert read_rows(out) == reference


def test_generation_into_an_unwritable_path_is_a_clear_error(vlsafe, tmp_path, caplog) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    code = generate.main([*TINY_ARGS, "-q", *vlsafe, "--answers-file", str(blocker / "answers.jsonl")])
    assert code == 2 and "cannot write the results" in caplog.text and str(blocker) in caplog.text


# ----------------------------------------------------------------------------------------------------- judge


@pytest.fixture
def judge_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    rows = [{"id": f"a{i}", "benchmark": "vlsafe", "query": f"question {i}",
             "text": f"answer {i} {'x' * 300} <<id:a{i}>><<say:Fine. Rating: [[{i % 2}]]>>"} for i in range(N)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with JudgeServer() as server:
        yield server, answers


def _judge_argv(server, answers: Path, out: Path, cache: Path) -> list[str]:
    return ["--answers", str(answers), "--benchmark", "vlsafe", "--judge-model", "stub", "--judge-base-url",
            server.base_url, "--output", str(out), "--cache", str(cache), "--parallel", "2", "--backoff-base", "0.001"]


def test_judge_on_a_full_disk_keeps_every_finished_judgment_and_resumes(judge_setup, tmp_path, caplog) -> None:
    server, answers = judge_setup
    with small_disk(tmp_path / "disk", 8) as disk:
        argv = _judge_argv(server, answers, disk / "out", tmp_path / "cache.sqlite")
        assert judge_main(argv) == 2
        assert "No space left on device" in caplog.text and "Traceback" not in caplog.text
        judgments = disk / "out" / "answers.judgments.jsonl"
        partial = assert_whole_lines(judgments)
        assert 0 < len(partial) < N
        grow(disk, 1024)
        before = server.state.requests
        assert judge_main(argv) == 0
        done = assert_whole_lines(judgments)
        assert {r["id"] for r in done} == {f"a{i}" for i in range(N)}
        assert server.state.requests - before <= N - len(partial)  # finished judgments were kept (or cached)


def test_judge_past_a_file_size_limit_keeps_whole_lines(judge_setup, tmp_path) -> None:
    server, answers = judge_setup
    out = tmp_path / "out"
    argv = _judge_argv(server, answers, out, tmp_path / "cache.sqlite")
    proc = run_limited(f"from llava.eval.judge.cli import main\nsys.exit(main({argv!r}))", 9000,
                       env={"OPENAI_API_KEY": "test-key"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    partial = assert_whole_lines(out / "answers.judgments.jsonl")
    assert 0 < len(partial) < N
    assert judge_main(argv) == 0
    assert {r["id"] for r in assert_whole_lines(out / "answers.judgments.jsonl")} == {f"a{i}" for i in range(N)}


def test_judge_into_an_unwritable_path_is_a_clear_error(judge_setup, tmp_path, caplog) -> None:
    server, answers = judge_setup
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert judge_main(_judge_argv(server, answers, blocker / "out", tmp_path / "cache.sqlite")) == 2
    assert str(blocker) in caplog.text and "Traceback" not in caplog.text
    caplog.clear()
    assert judge_main(_judge_argv(server, answers, tmp_path / "out", blocker / "cache.sqlite")) == 2
    assert str(blocker) in caplog.text and "Traceback" not in caplog.text
