"""The judge against a real HTTP server (tests/eval/judge_server.py) through the official openai client."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import JudgeServer, ScriptState  # noqa: E402

from llava.errors import AuthError  # noqa: E402
from llava.eval.judge import JudgeCache, JudgeClient, JudgeConfig, JudgeRunner, RetryPolicy, judge_answers  # noqa: E402
from llava.eval.jsonl import read_jsonl  # noqa: E402

FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01, jitter=0.5)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with JudgeServer(ScriptState(retry_after="0")) as srv:
        yield srv


def cfg(server, tmp_path, **kw):
    base = dict(judge_model="stub-judge", base_url=server.base_url, parallel=4, timeout=5.0, retry=FAST,
                output_dir=tmp_path / "out", output_stem="answers")
    base.update(kw)
    return JudgeConfig(**base)


def row(i, say="Rating: [[1]]", faults="", **extra):
    text = f"answer {i} <<id:a{i}>><<say:{say}>>" + (f"<<faults:{faults}>>" if faults else "")
    return {"id": f"a{i}", "benchmark": "vlsafe", "method": "direct", "query": f"question {i}", "text": text, **extra}


def test_verdicts_and_judgments_file(server, tmp_path):
    rows = [row(0, "Looks fine. Rating: [[1]]"), row(1, "Gives steps. Rating: [[0]]"), row(2, "no idea")]
    config = cfg(server, tmp_path)
    js = judge_answers(rows, config)
    assert [(j.id, j.label, j.score) for j in js] == [("a0", "safe", 1.0), ("a1", "unsafe", 0.0), ("a2", None, None)]
    assert js[2].raw == "no idea" and "no [[rating]]" in js[2].parse_error
    stored = read_jsonl(config.judgments_path, log=True)
    assert sorted(r["id"] for r in stored) == ["a0", "a1", "a2"]
    assert all(r["judge_model"] == "stub-judge" and r["prompt_name"] == "llm_binary_strict" for r in stored)
    summary = json.loads(config.summary_path.read_text())
    assert summary["summary"]["unparseable"] == 1 and summary["summary"]["unparseable_ids"] == ["a2"]
    assert summary["summary"]["complete"] is True and summary["summary"]["http_requests"] == 3
    assert "test-key" not in config.summary_path.read_text()
    runner = JudgeRunner(config)  # resumed: nothing sent, the unparseable one still reported
    runner.run(rows)
    assert runner.summary.resumed == 3 and runner.summary.unparseable == ["a2"] and server.state.requests == 3
    # what went over the wire: system + user, temperature 0, the model name
    body = server.state.bodies[0]
    assert body["model"] == "stub-judge" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_faults_are_retried_and_counted(server, tmp_path):
    rows = [row(0, faults="429,500"), row(1, faults="malformed,nochoices,503"), row(2), row(3, faults="slow")]
    runner = JudgeRunner(cfg(server, tmp_path, timeout=0.5))
    server.state.slow_s = 2.0
    js = runner.run(rows)
    assert [j.label for j in js] == ["safe"] * 4
    assert [j.attempts for j in js] == [3, 4, 1, 2]
    stats = runner.summary.requests
    assert stats["faults"] == {"429": 1, "5xx": 2, "malformed": 2, "timeout": 1}
    assert stats["requests"] == 10 and stats["retries"] == 6 and stats["successes"] == 4
    assert server.state.attempts["a1"] == 4


def test_retry_after_is_honoured_and_backoff_grows(server, tmp_path):
    server.state.retry_after = "7"
    config = cfg(server, tmp_path, parallel=1, retry=RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=100, jitter=0))
    slept = []
    client = JudgeClient(config, sleep=slept.append)
    judge_answers([row(0, faults="429,500,500,500")], config, client=client)
    assert slept == [7.0, 1.0, 2.0, 4.0]
    client = JudgeClient(config, sleep=slept.append)
    with pytest.raises(Exception, match="gave up after 5 attempts"):
        client.complete([{"role": "user", "content": "<<id:z>><<faults:500,500,500,500,500,500>>"}])


def test_give_up_leaves_answer_pending_for_rerun(server, tmp_path):
    config = cfg(server, tmp_path)
    runner = JudgeRunner(config)
    js = runner.run([row(0), row(1, faults="500,500,500,500")])
    assert [j.id for j in js] == ["a0"] and list(runner.summary.failed) == ["a1"]
    assert "gave up after 4 attempts" in runner.summary.failed["a1"]
    before = server.state.requests
    js = judge_answers([row(0), row(1, faults="500,500,500,500")], config)  # 5th attempt for a1 succeeds
    assert [j.id for j in js] == ["a0", "a1"] and server.state.requests == before + 1


@pytest.mark.parametrize("status", ["401", "403"])
def test_auth_errors_stop_the_run_without_retry(server, tmp_path, status):
    config = cfg(server, tmp_path, parallel=1)
    rows = [row(0, faults=status)] + [row(i) for i in range(1, 6)]
    runner = JudgeRunner(config)
    with pytest.raises(AuthError, match=f"HTTP {status}"):
        runner.run(rows)
    assert server.state.attempts["a0"] == 1 and server.state.requests == 1
    assert runner.summary.aborted and len(runner.summary.pending) == 6


def test_other_4xx_is_not_retried(server, tmp_path):
    runner = JudgeRunner(cfg(server, tmp_path))
    js = runner.run([row(0, faults="400"), row(1)])
    assert [j.id for j in js] == ["a1"] and "HTTP 400" in runner.summary.failed["a0"]
    assert server.state.attempts["a0"] == 1


def test_budget_caps_requests(server, tmp_path):
    config = cfg(server, tmp_path, parallel=1, max_requests=4)
    runner = JudgeRunner(config)
    js = runner.run([row(0, faults="500"), row(1), row(2), row(3), row(4)])
    assert server.state.requests == 4 and len(js) == 3 and len(runner.summary.pending) == 2
    assert not runner.summary.complete
    js = judge_answers([row(i) for i in range(5)], cfg(server, tmp_path, parallel=1))
    assert len(js) == 5 and server.state.requests == 6


def test_cache_hit_on_rerun_costs_nothing(server, tmp_path):
    rows = [row(i, "Rating: [[0]]" if i % 2 else "Rating: [[1]]") for i in range(6)]
    shared = tmp_path / "cache.sqlite"
    first = judge_answers(rows, cfg(server, tmp_path, output_dir=tmp_path / "o1", cache_path=shared))
    assert server.state.requests == 6 and len(JudgeCache(shared)) == 6
    server.state.reset()
    runner = JudgeRunner(cfg(server, tmp_path, output_dir=tmp_path / "o2", cache_path=shared))
    again = runner.run(rows)
    assert server.state.requests == 0 and runner.summary.from_cache == 6
    assert [(j.id, j.label) for j in again] == [(j.id, j.label) for j in first] and all(j.cached for j in again)
    # a different judge model is a different key
    judge_answers(rows[:2], cfg(server, tmp_path, output_dir=tmp_path / "o3", cache_path=shared, judge_model="other"))
    assert server.state.requests == 2


def test_resume_skips_judged_and_refuses_other_judge(server, tmp_path):
    config = cfg(server, tmp_path)
    judge_answers([row(0), row(1)], config)
    server.state.reset()
    runner = JudgeRunner(config)
    js = runner.run([row(0), row(1), row(2)])
    assert server.state.requests == 1 and runner.summary.resumed == 2 and [j.id for j in js] == ["a0", "a1", "a2"]
    with pytest.raises(Exception, match="choose another --output"):
        judge_answers([row(0)], cfg(server, tmp_path, judge_model="someone-else"))


def test_torn_last_line_is_repaired(server, tmp_path):
    config = cfg(server, tmp_path)
    judge_answers([row(0)], config)
    with open(config.judgments_path, "a") as fh:
        fh.write('{"id": "a1", "prompt_na')  # what a SIGKILL mid-write leaves
    js = judge_answers([row(0), row(1)], config)
    assert [j.id for j in js] == ["a0", "a1"]
    assert [r["id"] for r in read_jsonl(config.judgments_path, log=True)] == ["a0", "a1"]


def test_mmsafetybench_per_scenario_prompts(server, tmp_path):
    rows = [{"id": f"s{n}", "benchmark": "mmsafetybench", "scenario": s, "mode": "SD", "query": "q",
             "text": f"<<id:s{n}>><<say:{'unsafe' if n % 2 else 'safe'}>>"}
            for n, s in enumerate(["01-Illegal_Activitiy", "08-Political_Lobbying", "12-Health_Consultation"])]
    js = judge_answers(rows, cfg(server, tmp_path, benchmark="mmsafetybench"))
    assert [(j.prompt_name, j.label, j.fields["scenario"]) for j in js] == [
        ("query_safety", "safe", "01-Illegal_Activitiy"), ("query_political", "unsafe", "08-Political_Lobbying"),
        ("query_safety_health", "safe", "12-Health_Consultation")]
    sent = [b["messages"][-1]["content"] for b in server.state.bodies]
    assert any("political campaigning" in s for s in sent) and any("medical professional" in s for s in sent)


def test_mmvet_grader_retries_then_scores(server, tmp_path):
    gt = {"v1_0": {"question": "What is x?", "answer": "3<OR>x=3", "capability": ["math"]},
          "v1_1": {"question": "Color?", "answer": "red<AND>blue", "capability": ["rec"]},
          "v1_2": {"question": "Count?", "answer": "4", "capability": ["rec"]}}
    (tmp_path / "mm-vet.json").write_text(json.dumps(gt))
    rows = [{"question_id": 0, "text": "<<id:m0>><<say:0.8>>"},
            {"question_id": 1, "text": "<<id:m1>><<say:The score is||0.5>>"},
            {"question_id": 2, "text": "<<id:m2>><<say:dunno>>"}]
    config = cfg(server, tmp_path, benchmark="mmvet", ground_truth=tmp_path / "mm-vet.json")
    js = judge_answers(rows, config)
    assert [(j.id, j.score) for j in js] == [("0", 0.8), ("1", 0.5), ("2", 0.0)]
    assert js[2].parse_error and "MM-Vet's rule" in js[2].parse_error and js[0].parse_error is None
    assert server.state.attempts["m1"] == 2 and server.state.attempts["m2"] == 5
    temps = [b["temperature"] for b in server.state.bodies if "<<id:m2>>" in b["messages"][-1]["content"]]
    assert temps == [0, 0.5, 1.0, 1.5, 2.0]
    first = [b for b in server.state.bodies if "<<id:m0>>" in b["messages"][-1]["content"]]
    assert len(first) == 1 and len(first[0]["messages"]) == 1 and first[0]["max_tokens"] == 3
    assert first[0]["messages"][0]["content"].endswith("\nWhat is x? | 3 <OR> x=3 | <<id:m0>><<say:0.8>> | ")
    retry = [b for b in server.state.bodies if "<<id:m1>>" in b["messages"][-1]["content"]][1]
    assert retry["messages"][-1]["content"].endswith("a number from 0.0 to 1.0: ")


def test_resume_refuses_another_mode(server, tmp_path):
    rows = [{"id": "m0", "benchmark": "mmsafetybench", "scenario": "08-Political_Lobbying", "mode": "SD",
             "query": "q", "text": "<<id:m0>><<say:safe>>"}]
    judge_answers(rows, cfg(server, tmp_path, benchmark="mmsafetybench"))
    with pytest.raises(Exception, match="prompt 'query_political'.*'query_safety'"):
        judge_answers(rows, cfg(server, tmp_path, benchmark="mmsafetybench", mode="query_safety"))


def test_read_jsonl_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(Exception, match="line 2: invalid JSON"):
        read_jsonl(path, log=True)
    path.write_text('{"id": 1}\n[1]\n')
    with pytest.raises(Exception, match="line 2: expected a JSON object"):
        read_jsonl(path, log=True)
    path.write_text('{"id": 1}\n{"id": 2')
    assert read_jsonl(path, log=True) == [{"id": 1}]
