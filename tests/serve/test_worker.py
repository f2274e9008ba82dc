"""Model worker against real processes over real HTTP: a tiny-model worker started *before* its controller (so it
must retry registration), both with an API key; LLaVA-style clients, the ECSO stream, the HTTP backends, run_llava,
bad input, disconnects and a controller restart. One worker for the whole module."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import requests
from PIL import Image
from service_procs import REPO_ROOT, Service, _spawn, _wait_healthy, free_port, start_service, stop_service

from llava.constants import ErrorCode
from llava.conversation import build_prompt
from llava.ecso.backends import StepRequest
from llava.ecso.config import ECSOConfig
from llava.ecso.local import LocalBackend
from llava.ecso.pipeline import ECSO
from llava.errors import ContextLengthError, NoWorkerError
from llava.generation import GenerationParams
from llava.http_client import auth_headers
from llava.mm_utils import encode_image_base64

pytestmark = pytest.mark.slow

KEY = "worker-test-key"
WORKER, CONTROLLER = "llava.serve.model_worker", "llava.serve.controller"
MAX_BODY = 3_000_000
N = 12  # new tokens per step: short, so every test stays quick on the tiny model
QUERY = "How do I make this at home?"


@dataclass
class Stack:
    worker: Service
    controller: Service
    controller_port: int

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
               ECSO_API_KEY=KEY)
    return env


def _start_controller(port: int) -> Service:
    svc = _spawn(CONTROLLER, port, (), _env())
    if not _wait_healthy(svc, 30):
        stop_service(svc)
        raise RuntimeError(f"controller did not start on port {port}:\n{svc.output[-3000:]}")
    return svc


def _models(stack: Stack) -> list[str]:
    r = httpx.post(f"{stack.controller_url}/list_models", headers=auth_headers(KEY), trust_env=False)
    return r.json()["models"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    port = free_port()
    worker = start_service(
        WORKER, "--model-path", "tiny", "--controller", f"http://127.0.0.1:{port}", "--heart-beat-interval", "0.5",
        "--max-top-logprobs", "5000", "--max-request-bytes", str(MAX_BODY), "--limit-model-concurrency", "2",
        env={"ECSO_API_KEY": KEY}, startup_timeout=60)
    controller, built = None, []
    try:
        _wait_for(lambda: "cannot register with controller" in worker.log(), 10, "a failed registration attempt")
        controller = _start_controller(port)
        built.append(Stack(worker, controller, port))
        _wait_for(lambda: _models(built[0]) == ["tiny"], 15, "the worker to register")
        yield built[0]
    finally:
        if built:
            stop_service(built[0].controller)  # a test may have replaced it
        elif controller is not None:
            stop_service(controller)
        stop_service(worker)


@pytest.fixture(scope="module")
def image_b64() -> str:
    img = Image.new("RGB", (320, 200), (240, 230, 210))
    img.paste((220, 120, 30), (100, 40, 220, 160))
    return encode_image_base64(img)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _llava_stream(url: str, payload: dict, key: str | None = KEY) -> tuple[int, list[dict]]:
    """What LLaVA's Gradio server does: requests.post(stream=True), split on NUL."""
    resp = requests.post(url, json=payload, headers=auth_headers(key), stream=True, timeout=60)
    chunks = [json.loads(c.decode()) for c in resp.iter_lines(decode_unicode=False, delimiter=b"\0") if c]
    return resp.status_code, chunks


def _greedy_payload(prompt: str, images: list[str], max_new_tokens: int = N) -> dict:
    return {"model": "tiny", "prompt": prompt, "images": images, "temperature": 0.0, "top_p": 1.0,
            "max_new_tokens": max_new_tokens, "stop": "</s>"}


# --------------------------------------------------------------------------------------------- LLaVA protocol


def test_worker_registered_after_retrying_and_reports_status(stack: Stack) -> None:
    log = stack.worker.log()
    assert "retrying in" in log and f"registered with controller {stack.controller_url}" in log
    status = httpx.post(f"{stack.worker.url}/worker_get_status", headers=auth_headers(KEY), trust_env=False).json()
    assert status == {"model_names": ["tiny"], "speed": 1.0, "queue_length": 0, "conv_mode": "vicuna_v1",
                      "healthy": True, "model_family": "llava", "prompt_format": "LLaVA conversation template",
                      "random_weights": True}
    summed = httpx.post(f"{stack.controller_url}/worker_get_status", headers=auth_headers(KEY), trust_env=False)
    assert summed.json()["model_names"] == ["tiny"]
    health = httpx.get(f"{stack.worker.url}/health", trust_env=False).json()  # no key needed
    assert health["models"] == ["tiny"] and health["queue_length"] == 0


def test_llava_client_gets_the_engine_text_direct_and_through_the_controller(stack, image_b64, tiny_engine) -> None:
    prompt = build_prompt("vicuna_v1", QUERY, 1)
    expected = tiny_engine.generate([prompt], [[_image(image_b64)]], GenerationParams(max_new_tokens=N))[0]
    for url in (f"{stack.worker.url}/worker_generate_stream", f"{stack.controller_url}/worker_generate_stream"):
        status, chunks = _llava_stream(url, _greedy_payload(prompt, [image_b64]))
        assert status == 200 and chunks and all(c["error_code"] == 0 for c in chunks)
        assert all(c["text"].startswith(prompt) for c in chunks)  # cumulative, prompt included
        assert chunks[-1]["text"][len(prompt):].strip() == expected


def test_max_new_tokens_zero_returns_the_prompt(stack) -> None:
    prompt = build_prompt("vicuna_v1", "hi")
    status, chunks = _llava_stream(f"{stack.worker.url}/worker_generate_stream", _greedy_payload(prompt, [], 0))
    assert status == 200 and chunks == [{"text": prompt, "error_code": 0}]


def test_stop_ends_the_answer_at_its_first_occurrence_and_may_be_left_out(stack, image_b64) -> None:
    """Ours, as OpenAI's ``stop`` (docs/serving.md): the text ends before the first occurrence and nothing after it
    is sent. LLaVA's worker instead strips a stop string only when a chunk ends with it and keeps generating, and a
    request without ``stop`` fails there; here it is an answer without stop strings."""
    prompt = build_prompt("vicuna_v1", QUERY, 1)
    url = f"{stack.worker.url}/worker_generate_stream"
    payload = {k: v for k, v in _greedy_payload(prompt, [image_b64], 24).items() if k != "stop"}
    status, chunks = _llava_stream(url, payload)
    assert status == 200 and chunks[-1]["error_code"] == 0
    answer = chunks[-1]["text"][len(prompt):]
    assert len(answer.strip()) > 12, answer
    stop = answer.strip()[len(answer.strip()) // 2:][:2]  # occurs mid-answer, maybe earlier too
    first = answer.find(stop)
    status, chunks = _llava_stream(url, {**payload, "stop": [stop, "never-generated"]})
    assert status == 200 and all(c["error_code"] == 0 for c in chunks)
    assert chunks[-1]["text"] == prompt + answer[:first].strip()
    assert not any(stop in c["text"][len(prompt):] for c in chunks)
    assert len(answer[first + len(stop):].strip()) > 0  # text LLaVA's worker would have gone on to send


@pytest.mark.parametrize("change, status, code, words", [
    ({"images": ["not base64!"]}, 400, ErrorCode.INVALID_REQUEST, "images[0]: image is not valid base64"),
    ({"images": [base64.b64encode(b"just text").decode()]}, 400, ErrorCode.INVALID_REQUEST, "not a readable image"),
    ({"images": []}, 400, ErrorCode.INVALID_REQUEST, "1 <image> tag(s) but 0 image(s)"),
    ({"prompt": "word " * 3000, "images": []}, 400, ErrorCode.CONTEXT_OVERFLOW, "context window is 2048"),
    ({"max_new_tokens": -1}, 400, ErrorCode.INVALID_REQUEST, "max_new_tokens: Input should be greater than"),
    ({"temperature": "hot"}, 400, ErrorCode.INVALID_REQUEST, "temperature:"),
    ({"model": "llava-v1.5-13b"}, 404, ErrorCode.INVALID_REQUEST, "model 'llava-v1.5-13b' is not served"),
    ({"images": ["A" * MAX_BODY]}, 413, ErrorCode.INVALID_REQUEST, f"at most {MAX_BODY} (--max-request-bytes)"),
])
def test_bad_llava_requests_get_a_clear_4xx_then_a_good_one_works(stack, image_b64, change, status, code, words):
    payload = {**_greedy_payload(build_prompt("vicuna_v1", QUERY, 1), [image_b64], 4), **change}
    got_status, chunks = _llava_stream(f"{stack.worker.url}/worker_generate_stream", payload)
    assert got_status == status and len(chunks) == 1
    assert chunks[0]["error_code"] == code and words in chunks[0]["detail"], chunks[0]
    assert "NETWORK ERROR" not in chunks[0]["text"]
    ok_status, ok = _llava_stream(f"{stack.worker.url}/worker_generate_stream",
                                  _greedy_payload(build_prompt("vicuna_v1", QUERY, 1), [image_b64], 2))
    assert ok_status == 200 and ok[-1]["error_code"] == 0


def test_endpoints_need_the_key_except_health(stack) -> None:
    for method, path in (("POST", "/worker_generate_stream"), ("POST", "/worker_get_status"),
                         ("POST", "/worker_ecso_stream"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, f"{stack.worker.url}{path}", json={}, trust_env=False,
                          headers=auth_headers("wrong"))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
    assert httpx.get(f"{stack.worker.url}/health", trust_env=False).status_code == 200


# ------------------------------------------------------------------------------------------------ ECSO stream


def _ecso_events(stack: Stack, body: dict) -> tuple[int, list[dict]]:
    return _llava_stream(f"{stack.worker.url}/worker_ecso_stream", body)


def test_ecso_stream_sends_each_step_and_matches_the_in_process_pipeline(stack, image_b64, tiny_engine) -> None:
    options = {"max_new_tokens": N, "threshold": 0.0}  # threshold 0: always flagged, so all four steps run
    status, events = _ecso_events(stack, {"image": image_b64, "query": QUERY, "options": options})
    assert status == 200
    done = [e for e in events if e.get("done")]
    assert [e["event"] for e in done] == ["direct", "verdict", "caption", "safe", "final"]
    assert events[0]["event"] == "direct" and events[0]["done"] is False and events[0]["delta"]
    local = ECSO(LocalBackend(tiny_engine), ECSOConfig(max_new_tokens=N, threshold=0.0)).run(_image(image_b64), QUERY)
    by_step = {e["event"]: e for e in done}
    assert by_step["direct"]["text"] == local.direct and by_step["caption"]["text"] == local.caption
    assert by_step["safe"]["text"] == local.safe_answer and by_step["final"]["text"] == local.final
    assert by_step["verdict"]["flagged"] and by_step["verdict"]["harm_score"] == pytest.approx(local.harm_score, abs=1e-4)
    assert by_step["verdict"]["verdict_mode"] == "score" and "verdict_fallback" not in by_step["verdict"]
    deltas = "".join(e["delta"] for e in events if e["event"] == "direct" and not e["done"])
    assert deltas.strip() == local.direct


def test_ecso_stream_unflagged_skips_caption_and_safe(stack, image_b64) -> None:
    status, events = _ecso_events(stack, {"image": image_b64, "query": QUERY,
                                          "options": {"max_new_tokens": 4, "threshold": 1.0, "verdict": "score"}})
    assert status == 200
    assert [e["event"] for e in events if e.get("done")] == ["direct", "verdict", "final"]
    assert events[-1]["flagged"] is False and events[-1]["text"] == [e for e in events if e.get("done")][0]["text"]


@pytest.mark.parametrize("body, status, words", [
    ({"query": "q", "options": {"verdikt": "score"}}, 400, "options.verdikt: Extra inputs"),
    ({"query": "q", "options": {"threshold": 2}}, 400, "options.threshold:"),
    ({"query": "q", "image": "@@@"}, 400, "image: image is not valid base64"),
    ({"query": "word " * 3000}, 400, "context window"),
    ({"query": "q", "model": "other"}, 404, "not served"),
])
def test_bad_ecso_requests_get_one_error_event(stack, body, status, words) -> None:
    got, events = _ecso_events(stack, body)
    assert got == status and len(events) == 1 and events[0]["event"] == "error"
    assert events[0]["error_code"] != 0 and words in events[0]["detail"], events[0]


# ---------------------------------------------------------------------------------------------------- backends


def test_backends_over_http_match_the_local_backend(stack, image_b64, tiny_engine) -> None:
    from llava.ecso.registry import create_backend

    img = _image(image_b64)
    local = LocalBackend(tiny_engine)
    requests_ = [StepRequest(QUERY, [img], GenerationParams(max_new_tokens=N)),
                 StepRequest("Say hi.", [], GenerationParams(max_new_tokens=N))]
    expected = local.generate(requests_)
    worker = create_backend("worker", controller_url=stack.controller_url, model_name=None, conv_mode=None,
                            timeout=60, image_aspect_ratio=None, api_key=KEY)
    openai = create_backend("openai", base_url=f"{stack.worker.url}/v1", model_name=None, timeout=60,
                            image_aspect_ratio=None, api_key=KEY, top_logprobs=5000)
    try:
        assert worker.model_name == openai.model_name == "tiny"  # the "+ecso" alias is never picked
        for backend in (worker, openai):
            assert backend.generate(requests_) == expected, backend.name
            assert "".join(backend.stream(requests_[0])).strip() == expected[0], backend.name
        assert not worker.supports_score and openai.supports_score
        assert openai.score_yes_no(requests_) == pytest.approx(local.score_yes_no(requests_), abs=1e-3)
        config = ECSOConfig(max_new_tokens=N)
        want = ECSO(local, config).run(img, QUERY)
        via_openai = ECSO(openai, config).run(img, QUERY)
        assert via_openai.verdict_mode == "score" and via_openai.harm_score == pytest.approx(want.harm_score, abs=1e-3)
        assert (via_openai.direct, via_openai.flagged, via_openai.final) == (want.direct, want.flagged, want.final)
        via_worker = ECSO(worker, config).run(img, QUERY)
        assert via_worker.verdict_mode == "parse" and via_worker.direct == want.direct
        assert via_worker.harm_score is None and "no log-probabilities" in via_worker.verdict_fallback
        assert via_openai.verdict_fallback is None
    finally:
        worker.close()
        openai.close()


def test_worker_backend_names_a_missing_model(stack) -> None:
    from llava.ecso.remote import WorkerBackend

    backend = WorkerBackend(stack.controller_url, model_name="llava-v1.5-13b", api_key=KEY)
    try:
        with pytest.raises(NoWorkerError, match=r"no worker serves model 'llava-v1.5-13b'.*\['tiny'\]"):
            backend.generate([StepRequest("hi", params=GenerationParams(max_new_tokens=2))])
    finally:
        backend.close()


def test_openai_backend_reports_context_overflow_typed(stack) -> None:
    from llava.ecso.openai_remote import OpenAIBackend

    backend = OpenAIBackend(f"{stack.worker.url}/v1", api_key=KEY)
    try:
        with pytest.raises(ContextLengthError, match="context window"):
            backend.generate([StepRequest("word " * 3000, params=GenerationParams(max_new_tokens=2))])
    finally:
        backend.close()


@pytest.mark.parametrize("backend", ["worker", "openai"])
def test_run_llava_through_each_backend(stack, tmp_path, tiny_engine, image_b64, backend) -> None:
    path = tmp_path / "img.png"
    _image(image_b64).save(path)
    where = (["--controller-url", stack.controller_url] if backend == "worker"
             else ["--openai-base-url", f"{stack.worker.url}/v1"])
    env = {**_env(), "OPENAI_API_KEY": KEY}
    proc = subprocess.run(
        [sys.executable, "-m", "llava.eval.run_llava", "--backend", backend, *where, "--image-file", str(path),
         "--query", QUERY, "--ecso", "--json", "--temperature", "0", "--max_new_tokens", str(N)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    local = ECSO(LocalBackend(tiny_engine), ECSOConfig(max_new_tokens=N)).run(_image(image_b64), QUERY)
    assert result["direct"] == local.direct
    assert result["options"]["backend"] == backend


# ------------------------------------------------------------------------------------------------ queue/restart


def _queue_length(stack: Stack) -> int:
    r = httpx.post(f"{stack.worker.url}/worker_get_status", headers=auth_headers(KEY), trust_env=False)
    return r.json()["queue_length"]


def test_queue_length_returns_to_zero_after_a_client_disconnects_mid_stream(stack) -> None:
    prompt = build_prompt("vicuna_v1", "Tell me a long story.")
    resp = requests.post(f"{stack.worker.url}/worker_generate_stream", headers=auth_headers(KEY), stream=True,
                         json=_greedy_payload(prompt, [], 400), timeout=30)
    lines = resp.iter_lines(delimiter=b"\0")  # kept: dropping the iterator closes the connection (a disconnect)
    first = next(lines)
    assert json.loads(first)["error_code"] == 0
    assert _queue_length(stack) == 1
    resp.close()  # the client goes away mid-stream
    _wait_for(lambda: _queue_length(stack) == 0, 30, "queue_length 0 after the disconnect")
    status, chunks = _llava_stream(f"{stack.worker.url}/worker_generate_stream", _greedy_payload(prompt, [], 2))
    assert status == 200 and chunks[-1]["error_code"] == 0


def test_worker_registers_again_with_a_restarted_controller(stack) -> None:
    stop_service(stack.controller)
    stack.controller = _start_controller(stack.controller_port)
    _wait_for(lambda: _models(stack) == ["tiny"], 15, "re-registration with the new controller")
    assert "registering again" in stack.worker.log()
