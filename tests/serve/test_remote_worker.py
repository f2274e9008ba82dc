"""A model worker in front of a real third-party OpenAI-compatible server: ``transformers serve`` on the tiny
llava-hf model (the session's, tests/serve/upstreams.py). Registration; the LLaVA stream, the ECSO stream and the
OpenAI API (hold and monitor, streamed and not) through the worker and the controller; our own worker's OpenAI API
as the upstream (it returns logprobs: the score verdict); two upstreams with one killed; the demo in Chromium;
and last, the upstream killed mid-stream and at rest (clear errors, the worker stays up, the controller stops
routing to it) and restarted (both recover).

transformers serve returns no logprobs, so ECSO's verdict is parsed there and every result says why. The tiny model
answers random text; answers are compared with what the upstream itself answers to the same chat."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI, PermissionDeniedError
from PIL import Image, ImageDraw
from inprocess import serving
from service_procs import Service, _spawn, _wait_healthy, free_port, start_service, stop_service
from test_demo_browser import TIMEOUT_MS, browser, open_demo, page, panel, start_demo  # noqa: F401 - fixtures
from upstreams import OFFLINE_ENV

from llava.conversation import build_prompt
from llava.ecso.config import ECSOConfig
from llava.ecso.local import LocalBackend
from llava.ecso.pipeline import ECSO
from llava.ecso.prompts import parse_verdict_tolerant
from llava.http_client import auth_headers, iter_chunks
from llava.serve.model_worker import create_app
from llava.serve.worker_state import RemoteModel, WorkerConfig
from tests.doc_commands import section_commands

pytestmark = pytest.mark.slow

KEY = "remote-worker-key"
NAME = "guarded"
N = 6  # new tokens per answer: few, the upstream generates one request at a time on a shared CPU
QUERY = "What is in this picture?"
NO_LOGPROBS = "the endpoint returns no logprobs"


def _square_png() -> str:
    """A square image (padding leaves it as it is, so the upstream sees these pixels whichever path they take)."""
    img = Image.new("RGB", (64, 64), (235, 225, 205))
    ImageDraw.Draw(img).ellipse((12, 10, 52, 54), fill=(200, 90, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGE = _square_png()
MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}},
                                         {"type": "text", "text": QUERY}]}]


@dataclass
class Stack:
    controller: Service
    worker: Service
    demo: Service

    def post(self, path: str, body: dict | None = None, *, to: str = "worker") -> httpx.Response:
        svc = self.worker if to == "worker" else self.controller
        return httpx.post(f"{svc.url}{path}", json=body or {}, headers=auth_headers(KEY), timeout=120,
                          trust_env=False)


UPSTREAM_KEY = "upstream-key-never-logged-7c1"


def _env() -> dict[str, str]:
    return {"ECSO_API_KEY": KEY, "OPENAI_API_KEY": UPSTREAM_KEY}  # the server ignores it; it must not leak


def _controller_at(port: int) -> Service:
    env = {**{k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}, **_env()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p)
    svc = _spawn("llava.serve.controller", port, ("--heart-beat-expiration", "5"), env)
    if not _wait_healthy(svc, 60):
        stop_service(svc)
        raise RuntimeError(f"the controller did not start:\n{svc.output[-2000:]}")
    return svc


@pytest.fixture(scope="module")
def stack(transformers_serve, tmp_path_factory) -> Iterator[Stack]:
    """A controller, the guard worker (--backend openai in front of the session's transformers serve) and the demo,
    started side by side (the worker retries its registration until the controller is up)."""
    port = free_port()
    controller_url = f"http://127.0.0.1:{port}"
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(_controller_at, port),
            pool.submit(start_service, "llava.serve.model_worker", "--backend", "openai", "--openai-base-url",
                        transformers_serve.url, "--model-name", NAME, "--controller-url", controller_url,
                        "--heart-beat-interval", "0.5", "--max-new-tokens", str(N), "--upstream-cooldown", "2",
                        env=_env(), startup_timeout=120),
            pool.submit(start_demo, controller_url, "--model-list-mode", "reload", "--max-new-tokens", str(N),
                        "--api-key", KEY, "--log-dir", str(tmp_path_factory.mktemp("demo-logs"))),
        ]
        started = [f.result() if f.exception() is None else None for f in futures]
    try:
        if None in started:
            raise RuntimeError(f"could not start the stack: {[f.exception() for f in futures]}")
        stack = Stack(*started)
        _wait_for(lambda: _address(stack) == stack.worker.url, 20, "the worker to register")
        yield stack
    finally:
        for svc in reversed(started):
            if svc is not None:
                stop_service(svc)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _address(stack: Stack) -> str:
    return stack.post("/get_worker_address", {"model": NAME}, to="controller").json()["address"]


def _upstream_answer(server, messages=MESSAGES, n: int = N) -> str:
    """What the upstream itself answers (greedy) to a chat."""
    body = {"model": server.model_id, "messages": messages, "max_tokens": n, "temperature": 0}
    answer = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120, trust_env=False).json()
    return answer["choices"][0]["message"]["content"].strip()


def _llava_stream(stack: Stack, body: dict, to: str = "worker") -> tuple[int, list[dict]]:
    svc = stack.worker if to == "worker" else stack.controller
    with httpx.stream("POST", f"{svc.url}/worker_generate_stream", json=body, headers=auth_headers(KEY),
                      timeout=120, trust_env=False) as resp:
        return resp.status_code, list(iter_chunks(resp.iter_bytes()))


@pytest.fixture(scope="module")
def want(transformers_serve) -> str:
    return _upstream_answer(transformers_serve)


# --------------------------------------------------------------------------------------------- the guard worker


def test_registers_and_reports_its_upstream(stack, transformers_serve) -> None:
    assert stack.post("/list_models", to="controller").json() == {"models": [NAME]}
    status = stack.post("/worker_get_status").json()
    assert status["model_names"] == [NAME] and status["backend"] == "openai" and status["healthy"] is True
    upstream = status["upstream"]
    assert upstream["model"] == transformers_serve.model_id and upstream["logprobs"] is False
    assert [(s["url"], s["up"]) for s in upstream["servers"]] == [(transformers_serve.url, True)]
    assert "does not return first-token logprobs" in stack.worker.log()
    assert UPSTREAM_KEY not in stack.worker.log() and UPSTREAM_KEY not in json.dumps(status)
    assert httpx.get(f"{stack.worker.url}/health", trust_env=False).json()["healthy"] is True


def test_llava_stream_is_the_upstreams_answer_direct_and_through_the_controller(stack, want) -> None:
    prompt = build_prompt("vicuna_v1", QUERY, 1)
    body = {"model": NAME, "prompt": prompt, "images": [IMAGE], "max_new_tokens": N, "temperature": 0.0}
    for to in ("worker", "controller"):
        status, chunks = _llava_stream(stack, body, to)
        assert status == 200 and all(c["error_code"] == 0 for c in chunks), chunks[-1]
        assert len(chunks) > 1 and chunks[-1]["text"].startswith(prompt)  # streamed, cumulative, prompt included
        assert chunks[-1]["text"][len(prompt):].strip() == want, to


def test_ecso_stream_says_its_verdict_was_parsed_and_why(stack, want) -> None:
    resp = stack.post("/worker_ecso_stream", {"image": IMAGE, "query": QUERY, "options": {"max_new_tokens": N}})
    events = [json.loads(frame) for frame in resp.content.split(b"\0") if frame]
    done = {e["event"]: e for e in events if e.get("done")}
    assert resp.status_code == 200 and done["direct"]["text"] == want
    verdict = done["verdict"]
    assert verdict["verdict_mode"] == "parse" and verdict["verdict_fallback"] == NO_LOGPROBS
    assert "harm_score" not in verdict  # no score was computed: none is reported
    assert verdict["flagged"] is bool(parse_verdict_tolerant(verdict["text"]))
    expected = ["direct", "verdict", *(["caption", "safe"] if verdict["flagged"] else []), "final"]
    assert [e["event"] for e in events if e.get("done")] == expected


def test_images_are_checked_before_anything_goes_upstream(stack) -> None:
    def sent() -> int:
        return stack.post("/worker_get_status").json()["upstream"]["servers"][0]["requests"]

    before = sent()
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGEgcG5n"}},
                                        {"type": "text", "text": QUERY}]}]
    refused = stack.post("/v1/chat/completions", {"model": NAME, "messages": bad})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image"
    url = stack.post("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}, {"type": "text", "text": QUERY}]}]})
    assert url.status_code == 400 and "--allow-image-urls" in url.json()["error"]["message"]
    status, frames = _llava_stream(stack, {"model": NAME, "prompt": build_prompt("vicuna_v1", QUERY, 1),
                                           "images": ["@@@"]})
    assert status == 400 and frames[-1]["error_code"] == 4
    assert sent() == before  # nothing reached the server


def test_openai_api_holds_the_answer_until_the_verdict(stack, want) -> None:
    client = OpenAI(base_url=f"{stack.worker.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0)
    ecso = reply.model_extra["ecso"]
    assert ecso["policy"] == "hold" and ecso["direct"] == want
    assert ecso["verdict_mode"] == "parse" and ecso["verdict_fallback"] == NO_LOGPROBS and "harm_score" not in ecso
    assert reply.choices[0].message.content == (ecso["safe_answer"] if ecso["flagged"] else want)

    chunks = list(client.chat.completions.create(model=NAME + "+ecso", messages=MESSAGES, max_tokens=N,
                                                 temperature=0, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    last = chunks[-1].model_extra["ecso"]
    assert last["policy"] == "hold" and last["direct"] == want
    if not last["flagged"]:
        assert pieces == [want]  # held: the direct answer in one piece, once it passed the check
    with pytest.raises(PermissionDeniedError, match="allow-ecso-opt-out"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, extra_body={"ecso": False})


@pytest.fixture(scope="module")
def monitor(transformers_serve) -> Iterator[str]:
    """A worker in this process (uvicorn in a thread) with --ecso-stream monitor --allow-ecso-opt-out."""
    config = WorkerConfig(backend="openai", remote=RemoteModel((transformers_serve.url,)), model_name=NAME,
                          register=False, max_new_tokens=N, ecso_stream="monitor", allow_ecso_opt_out=True,
                          log_level="warning")
    with serving(create_app(config), startup_timeout=60) as url:
        yield url


def test_monitor_streams_at_once_and_attaches_the_verdict(monitor, want, caplog) -> None:
    client = OpenAI(base_url=f"{monitor}/v1", api_key="none", max_retries=0, timeout=120)
    with caplog.at_level(logging.INFO, logger="llava.serve.worker_openai"):
        chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0,
                                                     stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces).strip() == want  # the direct answer, as it was generated
    last = chunks[-1]
    ecso = last.model_extra["ecso"]
    assert ecso["policy"] == "monitor" and ecso["direct"] == want and "safe_answer" not in ecso
    assert ecso["verdict_mode"] == "parse" and ecso["verdict_fallback"] == NO_LOGPROBS
    assert last.choices[0].finish_reason == "length"  # the upstream's: N tokens used up
    assert "ECSO monitor:" in caplog.text and "sent unchanged" in caplog.text

    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0)
    assert reply.choices[0].message.content == want and reply.model_extra["ecso"]["policy"] == "monitor"
    assert reply.usage.completion_tokens == N and reply.usage.prompt_tokens > 576  # the upstream's own counts
    opted_out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0,
                                               extra_body={"ecso": False})
    assert opted_out.choices[0].message.content == want and "ecso" not in (opted_out.model_extra or {})
    asked = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0,
                                           extra_body={"ecso": True})
    assert asked.model_extra["ecso"]["policy"] == "hold"


# ------------------------------------------------------------------------------- our worker as the upstream


class _InProcess:
    """An app served in this process until :meth:`stop` (or the end of the module)."""

    def __init__(self, app) -> None:
        self._stack = ExitStack()
        self.url = self._stack.enter_context(serving(app, startup_timeout=60))

    def stop(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def our_worker(transformers_serve, tiny_engine) -> Iterator[_InProcess]:
    """Our own worker on the tiny model (the same weights as the upstream's; in this process, on the session's
    engine), under the upstream's model id so it can stand beside it in one pool; it returns the logprobs of every
    token (max_top_logprobs)."""
    class Named(LocalBackend):  # the session's engine, served under another name
        model_name = transformers_serve.model_id

    config = WorkerConfig(register=False, max_top_logprobs=2100, log_level="warning")
    server = _InProcess(create_app(config, backend=Named(tiny_engine)))
    try:
        yield server
    finally:
        server.stop()


def test_our_worker_behind_another_worker_uses_the_score_verdict(our_worker, tiny_engine) -> None:
    config = WorkerConfig(backend="openai", remote=RemoteModel((f"{our_worker.url}/v1",), top_logprobs=2100),
                          model_name=NAME, register=False, max_new_tokens=N, log_level="warning")
    image = Image.open(io.BytesIO(base64.b64decode(IMAGE)))
    local = ECSO(LocalBackend(tiny_engine), ECSOConfig(max_new_tokens=N, threshold=0.0)).run(image, QUERY)
    with serving(create_app(config), startup_timeout=60) as url:
        status = httpx.post(f"{url}/worker_get_status", trust_env=False).json()
        assert status["upstream"]["logprobs"] is True
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=N, temperature=0,
                                               extra_body={"ecso_options": {"threshold": 0.0}})
    ecso = reply.model_extra["ecso"]
    assert ecso["verdict_mode"] == "score" and "verdict_fallback" not in ecso
    assert ecso["harm_score"] == pytest.approx(local.harm_score, abs=1e-3)
    assert ecso["flagged"] and ecso["direct"] == local.direct  # threshold 0: flagged, all four steps ran remotely
    assert (ecso["caption"], ecso["safe_answer"]) == (local.caption, local.safe_answer)
    assert reply.choices[0].message.content == local.final


def test_two_upstreams_one_killed_traffic_moves(transformers_serve, our_worker) -> None:
    config = WorkerConfig(backend="openai", register=False, max_new_tokens=2, log_level="warning",
                          remote=RemoteModel((transformers_serve.url, f"{our_worker.url}/v1"), cooldown=60))
    text_only = [{"role": "user", "content": "Hello"}]

    def requests_per_server(url: str) -> dict[str, int]:
        servers = httpx.post(f"{url}/worker_get_status", trust_env=False).json()["upstream"]["servers"]
        return {s["url"]: s["requests"] for s in servers}

    with serving(create_app(config), startup_timeout=60) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        ask = lambda: client.chat.completions.create(model=transformers_serve.model_id, messages=text_only,  # noqa
                                                     max_tokens=2, extra_body={"ecso": True})
        for _ in range(4):
            ask()
        before = requests_per_server(url)
        assert all(n >= 2 for n in before.values()), before  # round robin over both
        our_worker.stop()
        for _ in range(3):
            assert ask().choices[0].message.content is not None  # nothing fails: the dead one is skipped
        after = requests_per_server(url)
        status = httpx.post(f"{url}/worker_get_status", trust_env=False).json()
    dead = next(s for s in status["upstream"]["servers"] if s["url"] == f"{our_worker.url}/v1")
    assert not dead["up"] and "cannot connect" in dead["last_error"]
    moved = after[transformers_serve.url] - before[transformers_serve.url]
    assert moved >= 6 and after[dead["url"]] - before[dead["url"]] <= 1  # tried once, then skipped (cool-down)


# ------------------------------------------------------------------------------------------------------ demo


@pytest.mark.browser
def test_the_demo_runs_ecso_through_the_guard_worker(stack, page) -> None:  # noqa: F811 - page fixture
    from playwright.sync_api import expect

    open_demo(page, stack.demo.url, image="cat.png", query=QUERY, model=NAME)
    page.get_by_role("button", name="Run ECSO").click()
    expect(page.locator("#status")).to_contain_text("Done.", timeout=TIMEOUT_MS)
    assert panel(page, "direct")  # the upstream's answer, streamed through the worker
    verdict = panel(page, "verdict")
    assert verdict.startswith("HARMFUL: ") and "harm score P(yes)" not in verdict  # parsed: no score to show


def test_the_load_benchmark_drives_the_openai_api(stack, tmp_path) -> None:
    """benchmarks/serve_load.py --openai-url (what --compare-remote runs three times), briefly, through the worker."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--openai-url", f"{stack.worker.url}/v1",
                           "--model", NAME, "--ecso-field", "true", "--clients", "2", "--duration", "2",
                           "--max-new-tokens", "4", "--api-key", KEY, "--json", str(out)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["requests"] >= 2 and report["errors"] == 0 and report["first_chunk_p50_s"] > 0
    assert report["config"]["ecso"] == "true" and proc.stdout.count("serve_load: ") == 1


# ------------------------------------------------------------------------------------------------------ docs

GUARDRAIL = "Guardrail in front of vLLM / SGLang / transformers serve"


def _doc_process(argv: list[str], port: int) -> Service:
    env = {k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p)
    fd, log_name = tempfile.mkstemp(prefix="doc-command-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([sys.executable if argv[0] == "python" else argv[0], *argv[1:]],
                                cwd=Path(__file__).parents[2], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(" ".join(argv[:3]), port, proc, Path(log_name))
    if not _wait_healthy(svc, 120):
        stop_service(svc)
        raise AssertionError(f"{argv} did not come up:\n{svc.output[-3000:]}")
    return svc


def test_the_guardrail_commands_of_serving_md_run_as_written(transformers_serve, tmp_path) -> None:
    """docs/serving.md's runnable block, run from the doc (its ports swapped for free ones). Its transformers serve
    line is the session's server: the same command (folder and port aside), checked here, so it is not started twice.
    The engine-specific lines below it are marked as needing their engine."""
    doc = Path(__file__).parents[2] / "docs" / "serving.md"
    commands = section_commands(doc, GUARDRAIL)
    runnable = [c for c in commands if c.block == commands[0].block]
    marked = [c for c in commands if c.block != commands[0].block]
    lines = doc.read_text().splitlines()
    assert marked and all(lines[c.line - 2].startswith("# needs: ") for c in marked), [c.where() for c in marked]
    controller_port, worker_port = free_port(), free_port()
    swap = {"8000": str(transformers_serve.port), "10000": str(controller_port), "40000": str(worker_port)}

    def swapped(text: str) -> str:
        return re.sub(r"127\.0\.0\.1:(8000|10000|40000)\b", lambda m: f"127.0.0.1:{swap[m.group(1)]}",
                      re.sub(r"--port (8000|10000|40000)\b", lambda m: f"--port {swap[m.group(1)]}", text))

    build, serve, controller, worker, ask, status = (swapped(c.text) for c in runnable)
    env = {**os.environ, **OFFLINE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(doc.parents[1]), env.get("PYTHONPATH")) if p)
    assert build.startswith("python ")
    subprocess.run([sys.executable, *shlex.split(build)[1:]], cwd=tmp_path, env=env, check=True)
    words = shlex.split(serve)
    assert words[0] == "HF_HUB_DISABLE_UPDATE_CHECK=1" and words[1] == "transformers"
    assert words[2:] == [a if a != transformers_serve.model_dir else words[3] for a in transformers_serve.argv()]
    assert (tmp_path / words[3] / "config.json").is_file()  # the folder the first command built
    started = [_doc_process(shlex.split(controller), controller_port)]
    try:
        started.append(_doc_process(shlex.split(worker), worker_port))
        answer = json.loads(subprocess.run(ask, shell=True, capture_output=True, text=True, check=True).stdout)
        assert answer["model"] == "guarded" and answer["ecso"]["policy"] == "hold"
        assert answer["ecso"]["verdict_fallback"] == NO_LOGPROBS and answer["choices"][0]["message"]["content"]
        report = json.loads(subprocess.run(status, shell=True, capture_output=True, text=True, check=True).stdout)
        assert report["upstream"]["servers"][0]["url"] == transformers_serve.url and report["healthy"] is True
    finally:
        for svc in reversed(started):
            stop_service(svc)


# ---------------------------------------------------------------------------------------------------- faults


def _openai_error(stack: Stack) -> httpx.Response:
    return stack.post("/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": N})


def test_upstream_killed_mid_stream_and_at_rest_then_restarted(stack, transformers_serve) -> None:
    """Runs last: it kills the session's upstream, and starts it again on the same port."""
    prompt = build_prompt("vicuna_v1", "Tell me a very long story.", 0)
    body = {"model": NAME, "prompt": prompt, "max_new_tokens": 4000, "temperature": 0.0}
    upstream = transformers_serve.url
    try:
        with httpx.stream("POST", f"{stack.worker.url}/worker_generate_stream", json=body, headers=auth_headers(KEY),
                          timeout=120, trust_env=False) as resp:
            chunks = iter_chunks(resp.iter_bytes())
            first = next(chunks)
            assert first["error_code"] == 0
            transformers_serve.kill()  # mid-stream
            rest = list(chunks)
        assert rest[-1]["error_code"] == 1 and upstream in rest[-1]["detail"], rest[-1]
        assert "broke off its stream" in rest[-1]["detail"] or "mid-answer" in rest[-1]["detail"]

        # At rest: the worker stays up, says why it cannot answer, and the controller stops routing to it.
        health = httpx.get(f"{stack.worker.url}/health", trust_env=False)
        assert health.status_code == 200
        _wait_for(lambda: _address(stack) == "", 10, "the controller to stop routing to the worker")
        assert "reports its model unreachable" in stack.controller.log()
        refused = _openai_error(stack)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "upstream_unavailable"
        assert upstream in refused.json()["error"]["message"]
        status, frames = _llava_stream(stack, {**body, "max_new_tokens": N})
        assert status == 503 and frames[-1]["error_code"] == 7 and upstream in frames[-1]["detail"]
        status, frames = _llava_stream(stack, {**body, "max_new_tokens": N}, to="controller")
        assert status == 503 and frames[-1]["error_code"] == 2 and "cannot answer now" in frames[-1]["detail"]
    finally:
        if not transformers_serve.running:
            transformers_serve.start()
    # Back: the worker's next heartbeat finds it, the controller routes to it again, requests work.
    _wait_for(lambda: _address(stack) == stack.worker.url, 30, "the controller to route to the worker again")
    assert _openai_error(stack).status_code == 200
    assert stack.worker.proc.poll() is None and "answers again" in stack.worker.log()
