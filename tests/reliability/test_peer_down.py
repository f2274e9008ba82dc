"""A peer that is not there: a worker whose controller is down retries registration with growing delays (1 s, 2 s,
4 s ... capped at 30 s) and one clear log line each; a judge whose endpoint is down retries with backoff, then
fails cleanly keeping every finished judgment, and a rerun once it is back judges only the rest.

(A worker started before its controller, and re-registration after a controller restart, run against real
processes in tests/serve/test_worker.py; the judge's 429/5xx/slow/malformed faults in tests/eval/test_judge_http.py.)
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from judge_server import JudgeServer  # noqa: E402
from service_procs import free_port  # noqa: E402

from llava.eval.judge.cli import main as judge_main  # noqa: E402
from llava.serve import worker_registration  # noqa: E402
from llava.serve.protocol.llava import WorkerStatus  # noqa: E402
from llava.serve.worker_state import WorkerConfig  # noqa: E402


class _Stop(Exception):
    pass


def test_registration_retries_with_capped_backoff_and_a_clear_line(monkeypatch, caplog) -> None:
    controller = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 8:
            raise _Stop

    monkeypatch.setattr(worker_registration.asyncio, "sleep", fake_sleep)
    caplog.set_level(logging.WARNING, logger="llava.serve.worker_registration")

    async def scenario() -> None:
        async with httpx.AsyncClient(trust_env=False) as http:
            state = SimpleNamespace(config=WorkerConfig(controller_url=controller, api_key="never-logged"),
                                    http=http, model_name="tiny", slots=SimpleNamespace(queue_length=0),
                                    status=lambda: WorkerStatus(model_names=["tiny"]))
            with pytest.raises(_Stop):
                await worker_registration.registration_loop(state)

    asyncio.run(scenario())
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8 and all(line.startswith(f"cannot register with controller {controller} (") for line in lines)
    assert lines[0].endswith("retrying in 1 s") and lines[-1].endswith("retrying in 30 s")
    assert "Connect" in lines[0] and "never-logged" not in caplog.text


def test_judge_endpoint_down_fails_cleanly_keeps_judgments_and_resumes(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    rows = [{"id": f"a{i}", "benchmark": "vlsafe", "query": f"q{i}", "text": f"<<id:a{i}>><<say:Rating: [[1]]>>"}
            for i in range(6)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))

    def argv(base_url: str) -> list[str]:
        return ["--answers", str(answers), "--benchmark", "vlsafe", "--judge-model", "stub", "--judge-base-url",
                base_url, "--output", str(tmp_path / "out"), "--max-attempts", "3", "--backoff-base", "0.01",
                "--backoff-max", "0.05", "--timeout", "2"]

    with JudgeServer() as server:  # the first half is judged while the endpoint is up
        assert judge_main(argv(server.base_url)) == 0
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    down = f"http://127.0.0.1:{free_port()}/v1"
    assert judge_main(argv(down)) == 3  # incomplete: rerun to resume
    judgments = tmp_path / "out" / "answers.judgments.jsonl"
    kept = [json.loads(line) for line in judgments.read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == ["a0", "a1", "a2"] and judgments.read_bytes().endswith(b"\n")
    summary = json.loads((tmp_path / "out" / "answers.judge.json").read_text())["summary"]
    assert sorted(summary["failed"]) == ["a3", "a4", "a5"] and summary["http_faults"] == {"connection": 9}
    assert all("gave up after 3 attempts" in why for why in summary["failed"].values())
    assert "rerun the same command to resume" in caplog.text
    with JudgeServer() as server:  # back up: only the rest is sent
        assert judge_main(argv(server.base_url)) == 0
        assert server.state.requests == 3
    assert sorted(json.loads(line)["id"] for line in judgments.read_text().splitlines()) == [f"a{i}" for i in range(6)]
