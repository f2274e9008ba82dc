"""No lost results: generation (tiny model) and judging (the stub judge server) run as real processes, are
SIGKILLed at random points and resumed each time; the final file equals an uninterrupted run's, every id exactly
once, no torn line.

``ECSO_KILL_POINTS`` (default 5) sets the kills per run; set it higher for a slow, thorough mode (e.g. 50).
``ECSO_KILL_SEED`` replays a failing schedule (each test prints the seed it used)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from generate_testdata import TINY_ARGS, make_vlsafe, read_rows  # noqa: E402
from judge_server import JudgeServer, ScriptState  # noqa: E402

from llava.eval import generate  # noqa: E402
from llava.eval.judge.cli import main as judge_main  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("ECSO_KILL_POINTS", "5"))


def _rng(name: str) -> random.Random:
    seed = int(os.environ.get("ECSO_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{name}: ECSO_KILL_SEED={seed}")
    return random.Random(seed)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _complete_rows(path: Path) -> list[dict]:
    """The rows of the file's complete lines (a torn tail, left by a kill mid-write, is allowed: the next run
    repairs it); each parses, each id appears once."""
    data = path.read_bytes() if path.exists() else b""
    whole = data[: data.rfind(b"\n") + 1]
    rows = [json.loads(line) for line in whole.decode().splitlines() if line.strip()]
    ids = [str(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)), f"repeated ids after a kill: {sorted(ids)}"
    return rows


def _kill_at_random_points(cmd: list[str], out: Path, rng: random.Random, env: dict, new_lines: tuple[int, int],
                           max_delay: float) -> int:
    """Start ``cmd`` again and again; each time SIGKILL it once ``out`` has grown by a random number of lines
    (possibly none: a kill during start-up) plus a random delay. Returns the kills made (fewer when the work ran
    out first)."""
    kills = 0
    for _attempt in range(3 * KILLS):
        if kills == KILLS:
            break
        target = _lines(out) + rng.randint(*new_lines)
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while _lines(out) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, max_delay))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, err.decode()[-3000:]
            break  # it finished: nothing left to kill
        _complete_rows(out)
    return kills


def test_generation_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path, ref_data,
                                                                                 tiny_hf_path) -> None:
    rng = _rng("generate")
    n = min(500, 8 * KILLS + 16)  # enough work that every kill lands before the run could finish (500: the file)
    data = make_vlsafe(tmp_path, ref_data, n)
    whole = tmp_path / "whole.jsonl"  # greedy rows do not depend on the batch size: batch 16 is just quicker
    assert generate.main([*TINY_ARGS, "-q", *data, "--answers-file", str(whole), "--batch-size", "16"]) == 0
    out = tmp_path / "killed.jsonl"
    argv = [*TINY_ARGS, "-q", *data, "--answers-file", str(out)]
    kills = _kill_at_random_points([sys.executable, "-m", "llava.eval.generate", *argv, "--batch-size", "2"], out,
                                   rng, dict(os.environ), new_lines=(0, 3), max_delay=0.15)
    assert kills == KILLS, f"only {kills} of {KILLS} kills landed before the run finished"
    assert generate.main([*argv, "--batch-size", "16"]) == 0
    assert out.read_bytes().endswith(b"\n")
    assert read_rows(out) == read_rows(whole)


def test_judging_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch) -> None:
    rng = _rng("judge")
    n = 20 * KILLS
    rows = [{"id": f"r{i}", "benchmark": "vlsafe", "query": f"q{i}",
             "text": f"<<id:r{i}>><<sleep:0.03>><<say:Reason {i}. Rating: [[{i % 2}]]>>"} for i in range(n)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = "kill-test-key"
    monkeypatch.setenv("OPENAI_API_KEY", "kill-test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with JudgeServer(ScriptState()) as server:
        def argv(out: Path) -> list[str]:
            return ["--answers", str(answers), "--benchmark", "vlsafe", "--judge-model", "stub", "--judge-base-url",
                    server.base_url, "--output", str(out), "--parallel", "4", "--backoff-base", "0.001"]

        assert judge_main(argv(tmp_path / "whole")) == 0
        out = tmp_path / "killed"
        judgments = out / "answers.judgments.jsonl"
        kills = _kill_at_random_points([sys.executable, "-m", "llava.eval.judge", *argv(out)], judgments, rng, env,
                                       new_lines=(0, 4), max_delay=0.1)
        assert kills == KILLS, f"only {kills} of {KILLS} kills landed before the run finished"
        assert judge_main(argv(out)) == 0

    def normal(path: Path) -> dict[str, tuple]:
        got = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(got) == len({r["id"] for r in got}) == n and path.read_bytes().endswith(b"\n")
        return {r["id"]: (r["label"], r["score"], r["raw"], r["prompt_name"], r["key"]) for r in got}

    assert normal(judgments) == normal(tmp_path / "whole" / "answers.judgments.jsonl")
