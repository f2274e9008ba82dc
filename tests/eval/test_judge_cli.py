"""The judge CLI in subprocesses against the stub server: kill -9 mid-run and resume, exit codes, the seed's
entry point, the wrapper scripts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import JudgeServer  # noqa: E402

from llava.eval.judge.cli import build_parser  # noqa: E402
from llava.eval.jsonl import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def server():
    with JudgeServer() as srv:
        yield srv


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_API_KEY="secret-test-key", PYTHONPATH=str(REPO), **extra)
    return env


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_cmd(answers, server, out, *extra):
    return [sys.executable, "-m", "llava.eval.judge", "--answers", str(answers), "--benchmark", "vlsafe",
            "--judge-model", "stub", "--judge-base-url", server.base_url, "--output", str(out),
            "--backoff-base", "0.001", *extra]


def test_sigkill_mid_run_then_resume(server, tmp_path):
    n = 40
    rows = [{"id": f"r{i}", "query": "q", "text": f"<<id:r{i}>><<sleep:0.05>><<say:Rating: [[{i % 2}]]>>"} for i in range(n)]
    answers = _write(tmp_path / "ans.jsonl", rows)
    out = tmp_path / "out"
    judgments = out / "ans.judgments.jsonl"
    proc = subprocess.Popen(_judge_cmd(answers, server, out, "--parallel", "2"), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if judgments.exists() and len(judgments.read_text().splitlines()) >= 8:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first = [r["id"] for r in read_jsonl(judgments, log=True)]
    assert 8 <= len(first) < n and len(set(first)) == len(first)
    requests_before = server.state.requests

    done = subprocess.run(_judge_cmd(answers, server, out, "--parallel", "4"), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    final = read_jsonl(judgments, log=True)
    ids = [r["id"] for r in final]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)) and len(ids) == n  # nothing lost, nothing twice
    assert ids[: len(first)] == first  # the first run's lines are kept as they were
    assert all(server.state.attempts[i] == 1 for i in first)  # judged answers were not asked again
    assert summary["resumed"] == len(first) and summary["resumed"] + summary["from_cache"] + summary["judged"] == n
    assert server.state.requests - requests_before == summary["judged"]
    # at most the requests in flight at the kill were repeated: per worker thread, one answered but not yet written
    # by the main thread and the next one it started meanwhile
    assert server.state.requests <= n + 2 * 2
    labels = {r["id"]: r["label"] for r in final}
    assert labels["r3"] == "safe" and labels["r2"] == "unsafe"


def test_exit_codes_and_no_key_in_output(server, tmp_path):
    answers = _write(tmp_path / "a.jsonl", [{"id": "x", "query": "q", "text": "<<id:x>><<faults:401>>"}])
    bad = subprocess.run(_judge_cmd(answers, server, tmp_path / "o"), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 4 and "HTTP 401" in bad.stderr
    assert "secret-test-key" not in bad.stderr + bad.stdout
    assert "secret-test-key" not in (tmp_path / "o" / "a.judge.json").read_text()
    missing = subprocess.run(_judge_cmd(tmp_path / "nope.jsonl", server, tmp_path / "o"), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    answers = _write(tmp_path / "b.jsonl", [{"id": f"y{i}", "query": "q", "text": f"<<id:y{i}>>"} for i in range(3)])
    budget = subprocess.run(_judge_cmd(answers, server, tmp_path / "o", "--max-requests", "2", "--parallel", "1"),
                            env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert budget.returncode == 3 and json.loads(budget.stdout)["pending"] == 1


def test_help_explains_every_flag():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    text = parser.format_help()
    assert "OPENAI_API_KEY" in text and "--max-requests" in text


def test_seed_entry_point_with_paper_prompts(server, tmp_path, ref_data):
    rows = [{"image_id": f"{i:012d}.jpg", "query": f"How to harm {i}?", "text": f"<<id:v{i}>><<say:{say}>>",
             "model_id": "llava-1.5-7b"}
            for i, say in enumerate(["Fine. Rating: [[1]]", "Bad. Rating: [[0]]", "Rating: [[1]]", "no rating"])]
    answers = _write(tmp_path / "merge.jsonl", rows)
    paper = ref_data / "judge_prompts/ecso_vlsafe_judge.jsonl"
    cmd = [sys.executable, str(REPO / "llava/eval/gpt4_vlsafe.py"), "--model_outputs", str(answers),
           "--judge-file", str(paper), "--judge-model", "gpt-4", "--mode", "llm_binary_strict", "--parallel", "30",
           "--output_path", str(tmp_path / "res"), "--judge-base-url", server.base_url, "--backoff-base", "0.001"]
    done = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "res/ecso_vlsafe_judge/gpt4_evaluation"
    overall = json.loads((folder / "llm_binary_strict_overall.jsonl").read_text())
    assert overall["average_score"] == pytest.approx(2 / 3) and overall["unparseable"] == 1
    assert overall["average_score_seed_rule"] == 0.5
    records = json.loads((folder / "llm_binary_strict.jsonl").read_text())
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, None]
    assert records[0]["image_id"] == "000000000000.jpg" and records[0]["judge"] == ["gpt-4", "llm_binary_strict"]
    template = json.loads(paper.read_text().splitlines()[2])["prompt_template"]
    assert records[0]["user_prompt"] == template.format(question="How to harm 0?", answer=rows[0]["text"])
    body = server.state.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    # rerun: everything resumes, nothing is sent
    before = server.state.requests
    again = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and server.state.requests == before


def test_wrapper_script_judges_mmsafetybench(server, tmp_path):
    rows = [{"id": f"{s}/SD/{i}", "benchmark": "mmsafetybench", "method": "direct", "scenario": s, "mode": "SD",
             "query": "q", "text": f"<<id:{s}{i}>><<say:{'safe' if i else 'unsafe'}>>"}
            for s in ("01-Illegal_Activitiy", "13-Gov_Decision") for i in range(2)]
    _write(tmp_path / "mmsb.jsonl", rows)
    env = _env(ANSWERS_DIR=str(tmp_path), JUDGE_MODEL="stub", JUDGE_BASE_URL=server.base_url, PARALLEL="2")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # the script's `python`
    done = subprocess.run(["bash", str(REPO / "llava/eval/eval_mmsafe_loop.sh"), "--backoff-base", "0.001"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "PAPER8" in done.stdout and " 50.0% " in done.stdout
    assert len(read_jsonl(tmp_path / "mmsb.judgments.jsonl", log=True)) == 4


def test_a_run_without_a_key_leaves_no_judgments_and_says_incomplete(tmp_path, monkeypatch, caplog):
    """No OPENAI_API_KEY for the default endpoint: exit 4, no (empty) judgments file, a summary that is not complete."""
    from llava.eval.judge.cli import main

    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    answers = _write(tmp_path / "a.jsonl", [{"id": f"x{i}", "query": "q", "text": "t"} for i in range(3)])
    assert main(["--answers", str(answers), "--benchmark", "vlsafe", "--judge-model", "gpt-4o"]) == 4
    assert "OPENAI_API_KEY is not set" in caplog.text
    assert not (tmp_path / "a.judgments.jsonl").exists()
    summary = json.loads((tmp_path / "a.judge.json").read_text())["summary"]
    assert summary["complete"] is False and summary["judged"] == 0 and summary["pending"] == 3
    assert "OPENAI_API_KEY" in summary["aborted"]
