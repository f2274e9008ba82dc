"""Controller: registry, dispatch and stream proxy, against a real controller subprocess and fake workers (tiny
FastAPI apps served by uvicorn in threads on loopback)."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from service_procs import running_service

from llava.constants import ErrorCode
from llava.errors import AuthError, BackendTimeoutError, NoWorkerError
from llava.http_client import ServiceClient, auth_headers, raise_for_chunk
from llava.serve.controller import ControllerConfig, build_parser, config_from_args
from llava.serve.dispatch import WorkerInfo, WorkerRegistry, get_dispatch_method, lottery, shortest_queue
from llava.serve.protocol.llava import WorkerStatus

CONTROLLER = "llava.serve.controller"
WORKER_TIMEOUT = 1.0  # the controller's --worker-timeout in these tests


# ---------------------------------------------------------------------------------------------- fake workers


class FakeWorker:
    """A worker that streams ``chunks`` cumulative chunks. ``behaviour``: ok | die (one chunk, then the connection
    is dropped) | stall (one chunk, then silence) | slow_start (no answer for a while) | bad_request (HTTP 400) |
    long (a pause after each chunk)."""

    def __init__(self, models: list[str], *, speed: float = 1.0, queue_length: int = 0, behaviour: str = "ok",
                 api_key: str | None = None, chunks: int = 3) -> None:
        self.models, self.speed, self.queue_length, self.behaviour = models, speed, queue_length, behaviour
        self.api_key, self.chunks = api_key, chunks
        self.requests: list[dict] = []
        self.streams_ended: list[int] = []  # chunks sent, per stream, once the stream is over (or cancelled)
        self.auth: list[str | None] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self._app(), log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def _app(self) -> FastAPI:
        app = FastAPI()

        def authorized(request: Request) -> bool:
            self.auth.append(request.headers.get("authorization"))
            return not self.api_key or request.headers.get("authorization") == f"Bearer {self.api_key}"

        @app.post("/worker_get_status")
        async def status(request: Request):
            if not authorized(request):
                return JSONResponse({"error": {"message": "no", "type": "authentication_error"}}, status_code=401)
            return {"model_names": self.models, "speed": self.speed, "queue_length": self.queue_length}

        @app.post("/worker_generate_stream")
        async def generate(request: Request):
            params = await request.json()
            self.requests.append(params)
            if not authorized(request):
                return JSONResponse({"error": {"message": "no", "type": "authentication_error"}}, status_code=401)
            if self.behaviour == "bad_request":
                return JSONResponse({"error": {"message": "image is corrupt", "type": "invalid_request_error",
                                               "code": "invalid_image"}}, status_code=400)
            if self.behaviour == "slow_start":
                await asyncio.sleep(WORKER_TIMEOUT * 3)

            async def body():
                text, sent = params["prompt"], 0
                try:
                    for i in range(self.chunks):
                        text += f" w{i}"
                        yield json.dumps({"text": text, "error_code": 0}).encode() + b"\0"
                        sent += 1
                        if self.behaviour == "die":
                            raise RuntimeError("worker crashed mid-stream (test)")
                        if self.behaviour == "stall":
                            await asyncio.sleep(WORKER_TIMEOUT * 3)
                        if self.behaviour == "long":
                            await asyncio.sleep(0.05)
                finally:
                    self.streams_ended.append(sent)

            return StreamingResponse(body())

        return app

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake worker did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        assert not self._thread.is_alive(), "fake worker thread did not stop"

    @property
    def status(self) -> dict:
        return {"model_names": self.models, "speed": self.speed, "queue_length": self.queue_length}


def register(client: ServiceClient, worker: FakeWorker, *, with_status: bool = True, heart_beat: bool = False) -> dict:
    body = {"worker_name": worker.url, "check_heart_beat": heart_beat}
    if with_status:
        body["worker_status"] = worker.status
    return client.post("/register_worker", body)


def stream(client: ServiceClient, model: str, prompt: str = "USER: hi ASSISTANT:", **extra) -> list[dict]:
    return list(client.stream("/worker_generate_stream", {"model": model, "prompt": prompt, **extra}))


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def controller() -> Iterator[ServiceClient]:
    """A shared controller; tests use their own model names so they do not see each other's workers."""
    with running_service(CONTROLLER, "--worker-timeout", str(WORKER_TIMEOUT)) as svc:
        with ServiceClient(svc.url, timeout=10) as client:
            yield client


def unique(name: str) -> str:
    return f"{name}-{random.randrange(10**9)}"


# ----------------------------------------------------------------------------------------- in-process units


def _info(name: str, queue: int, speed: float = 1.0) -> WorkerInfo:
    return WorkerInfo(name, ["m"], speed, queue, True, 0.0)


def test_shortest_queue_prefers_lowest_load_and_counts_the_dispatch() -> None:
    rng = random.Random(0)
    a, b = _info("a", 2), _info("b", 1, speed=0.25)  # loads 2 and 4
    assert shortest_queue([a, b], rng) is a and a.queue_length == 3
    assert shortest_queue([_info("z", 0, speed=0.0), _info("y", 9)], rng).name == "y"  # speed 0 = never first


def test_lottery_is_weighted_by_speed() -> None:
    rng = random.Random(1)
    picks = [lottery([_info("fast", 0, 9.0), _info("slow", 0, 1.0)], rng).name for _ in range(400)]
    assert 300 < picks.count("fast") < 400 and "slow" in picks
    assert lottery([_info("a", 0, 0.0)], rng).name == "a"


def test_unknown_dispatch_method_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'fastest'.*lottery, shortest_queue"):
        get_dispatch_method("fastest")
    with pytest.raises(ValueError, match="heart_beat_expiration.*-1"):
        ControllerConfig(heart_beat_expiration=-1)


def test_registry_expiry_uses_the_clock() -> None:
    now = [100.0]
    reg = WorkerRegistry(clock=lambda: now[0])
    reg.register("http://a", WorkerStatus(model_names=["m", "k"]), check_heart_beat=True)
    reg.register("http://b", WorkerStatus(model_names=["m"], speed=2, queue_length=3), check_heart_beat=False)
    now[0] = 120.0
    assert reg.heart_beat("http://a", 4) and not reg.heart_beat("http://nobody", 0)
    now[0] = 131.0
    assert reg.expire(30) == ["http://b"]  # check_heart_beat false exempts no one: every worker expires
    assert reg.models() == ["k", "m"] and reg.total_status() == WorkerStatus(model_names=["k", "m"], queue_length=4)
    now[0] = 151.0
    assert reg.expire(30) == ["http://a"] and len(reg) == 0


def test_cli_flags_and_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_args(["--host", "0.0.0.0", "--port", "10000"], environ={})
    assert (cfg.host, cfg.port, cfg.dispatch_method, cfg.heart_beat_expiration, cfg.api_key) == (
        "0.0.0.0", 10000, "shortest_queue", 30.0, None)
    assert config_from_args([], environ={"ECSO_API_KEY": "k1"}).api_key == "k1"
    assert config_from_args(["--api-key", "k2"], environ={"ECSO_API_KEY": "k1"}).api_key == "k2"
    assert "k2" not in repr(config_from_args(["--api-key", "k2"], environ={}))
    text = build_parser().format_help()
    for flag in ("--host", "--port", "--api-key", "--dispatch-method", "--heart-beat-expiration", "--worker-timeout",
                 "--status-timeout", "--log-level", "ECSO_API_KEY"):
        assert flag in text
    with pytest.raises(SystemExit):
        config_from_args(["--dispatch-method", "fastest"], environ={})
    with pytest.raises(SystemExit):
        config_from_args(["--heart-beat-expiration", "0"], environ={})


# ------------------------------------------------------------------------------------------ against the service


@pytest.mark.slow
def test_endpoint_shapes_on_a_fresh_controller() -> None:
    with running_service(CONTROLLER) as svc, ServiceClient(svc.url, timeout=10) as c:
        assert httpx.get(f"{svc.url}/health").json() == {"status": "ok", "workers": 0}
        assert c.post("/list_models") == {"models": []}
        assert c.post("/get_worker_address", {"model": "x"}) == {"address": ""}
        assert c.post("/worker_get_status") == {"model_names": [], "speed": 0.0, "queue_length": 0}
        with FakeWorker(["b", "a"], speed=2, queue_length=1) as w1, FakeWorker(["a", "c"], queue_length=4) as w2:
            assert register(c, w1) == {"worker_name": w1.url, "model_names": ["b", "a"]}
            assert register(c, w2, with_status=False)["model_names"] == ["a", "c"]  # fetched from the worker
            assert c.post("/list_models") == {"models": ["a", "b", "c"]}
            assert c.post("/worker_get_status") == {"model_names": ["a", "b", "c"], "speed": 3.0, "queue_length": 5}
            assert httpx.get(f"{svc.url}/health").json() == {"status": "ok", "workers": 2}
            assert c.post("/get_worker_address", {"model": "c"}) == {"address": w2.url}
            assert c.post("/receive_heart_beat", {"worker_name": w1.url, "queue_length": 0}) == {"exist": True}
            w2.models = ["d"]
            assert c.post("/refresh_all_workers") == {"workers": 2, "removed": []}
            assert c.post("/list_models") == {"models": ["a", "b", "d"]}
        # both workers are gone now: a refresh drops them
        refreshed = c.post("/refresh_all_workers")
        assert refreshed["workers"] == 0 and sorted(refreshed["removed"]) == sorted([w1.url, w2.url])
        with pytest.raises(Exception, match="cannot get the status"):
            register(c, w1, with_status=False)
        bad = httpx.post(f"{svc.url}/get_worker_address", json={"modle": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        bad = httpx.post(f"{svc.url}/register_worker", json={"worker_name": "localhost:1"})
        assert bad.status_code == 400 and "'localhost:1'" in bad.json()["error"]["message"]
        bad = httpx.post(f"{svc.url}/receive_heart_beat", json={"worker_name": "http://a", "queue_length": -1})
        assert bad.status_code == 400 and "queue_length" in bad.json()["error"]["message"]
    assert "Traceback" not in svc.output


@pytest.mark.slow
def test_llava_clients_unchanged(controller: ServiceClient) -> None:
    """The calls LLaVA's own worker and Gradio server make, with ``requests`` as they do."""
    url, model = controller.base_url, unique("llava")
    with FakeWorker([model]) as w:
        status = requests.post(f"{w.url}/worker_get_status").json()
        r = requests.post(f"{url}/register_worker",
                          json={"worker_name": w.url, "check_heart_beat": True, "worker_status": status})
        assert r.status_code == 200
        assert requests.post(f"{url}/receive_heart_beat", json={"worker_name": w.url, "queue_length": 0}).json()[
            "exist"] is True
        assert requests.post(f"{url}/refresh_all_workers").status_code == 200
        assert model in requests.post(f"{url}/list_models").json()["models"]
        assert requests.post(f"{url}/get_worker_address", json={"model": model}).json()["address"] == w.url
        pload = {"model": model, "prompt": "USER: hi ASSISTANT:", "temperature": 0.2, "top_p": 0.7,
                 "max_new_tokens": 512, "stop": "</s>", "images": []}
        response = requests.post(f"{url}/worker_generate_stream", json=pload, stream=True, timeout=10)
        texts = [json.loads(c.decode())["text"] for c in response.iter_lines(decode_unicode=False, delimiter=b"\0")
                 if c]
    assert texts == ["USER: hi ASSISTANT: w0", "USER: hi ASSISTANT: w0 w1", "USER: hi ASSISTANT: w0 w1 w2"]


@pytest.mark.slow
def test_heart_beat_for_unknown_worker_says_register_again(controller: ServiceClient) -> None:
    assert controller.post("/receive_heart_beat", {"worker_name": "http://127.0.0.1:9", "queue_length": 0}) == {
        "exist": False}


@pytest.mark.slow
def test_shortest_queue_picks_the_shorter_queue(controller: ServiceClient) -> None:
    model = unique("sq")
    with FakeWorker([model], queue_length=5) as busy, FakeWorker([model], queue_length=0) as idle:
        register(controller, busy)
        register(controller, idle)
        for _ in range(3):  # idle's queue grows 0 -> 3, still below 5
            assert controller.post("/get_worker_address", {"model": model})["address"] == idle.url
        controller.post("/receive_heart_beat", {"worker_name": idle.url, "queue_length": 9})
        assert controller.post("/get_worker_address", {"model": model})["address"] == busy.url


@pytest.mark.slow
def test_proxy_relays_chunks_byte_for_byte(controller: ServiceClient) -> None:
    model = unique("relay")
    with FakeWorker([model], chunks=4) as w:
        register(controller, w)
        payload = {"model": model, "prompt": "USER: <image>\nhi ASSISTANT:", "images": ["aGk="], "temperature": 0.2,
                   "top_p": 0.7, "max_new_tokens": 16, "stop": "</s>", "custom": [1]}
        direct = httpx.post(f"{w.url}/worker_generate_stream", json=payload).content
        proxied = httpx.post(f"{controller.base_url}/worker_generate_stream", json=payload)
    assert proxied.status_code == 200 and proxied.content == direct and direct.count(b"\0") == 4
    assert w.requests[-1] == payload  # passed on unchanged, unknown fields included
    chunks = [json.loads(f) for f in proxied.content.split(b"\0") if f]
    assert chunks[-1] == {"text": payload["prompt"] + " w0 w1 w2 w3", "error_code": 0}


@pytest.mark.slow
def test_proxy_releases_the_worker_when_the_client_leaves(controller: ServiceClient) -> None:
    model = unique("leave")
    with FakeWorker([model], behaviour="long", chunks=200) as w:
        register(controller, w)
        with httpx.stream("POST", f"{controller.base_url}/worker_generate_stream",
                          json={"model": model, "prompt": "p"}) as resp:
            first = next(resp.iter_bytes())
        assert first.startswith(b'{"text": "p w0"')
        deadline = time.monotonic() + 3
        while not w.streams_ended:
            assert time.monotonic() < deadline, "the worker's stream was not cancelled"
            time.sleep(0.05)
    assert w.streams_ended[0] < 100


@pytest.mark.slow
def test_proxy_without_worker_answers_no_worker(controller: ServiceClient) -> None:
    resp = httpx.post(f"{controller.base_url}/worker_generate_stream", json={"model": "nobody", "prompt": "p"})
    assert resp.status_code == 503 and resp.content.endswith(b"\0")
    chunk = json.loads(resp.content[:-1])
    assert chunk["error_code"] == ErrorCode.NO_WORKER and "'nobody'" in chunk["detail"] and chunk["text"]
    with pytest.raises(NoWorkerError, match="nobody"):
        raise_for_chunk(stream(controller, "nobody")[0])


@pytest.mark.slow
def test_proxy_rejects_invalid_request_with_named_field(controller: ServiceClient) -> None:
    (chunk,) = stream(controller, "m", temperature=-0.5)
    assert chunk["error_code"] == ErrorCode.INVALID_REQUEST and "temperature" in chunk["detail"]
    assert "-0.5" in chunk["detail"]
    resp = httpx.post(f"{controller.base_url}/worker_generate_stream", content=b"{not json")
    assert resp.status_code == 400 and json.loads(resp.content[:-1])["error_code"] == ErrorCode.INVALID_REQUEST


@pytest.mark.slow
def test_proxy_worker_dying_mid_stream_ends_with_an_error_chunk(controller: ServiceClient) -> None:
    model = unique("die")
    with FakeWorker([model], behaviour="die") as w:
        register(controller, w)
        start = time.monotonic()
        chunks = stream(controller, model)
        elapsed = time.monotonic() - start
    assert elapsed < WORKER_TIMEOUT  # noticed from the closed connection, not from a timeout
    assert [c["error_code"] for c in chunks] == [0, ErrorCode.WORKER_ERROR]
    assert w.url in chunks[-1]["detail"] and "after 1 chunks" in chunks[-1]["detail"]


@pytest.mark.slow
def test_proxy_worker_stalling_mid_stream_times_out(controller: ServiceClient) -> None:
    model = unique("stall")
    with FakeWorker([model], behaviour="stall") as w:
        register(controller, w)
        start = time.monotonic()
        chunks = stream(controller, model)
        assert time.monotonic() - start < WORKER_TIMEOUT + 1.5
    assert [c["error_code"] for c in chunks] == [0, ErrorCode.TIMEOUT]
    with pytest.raises(BackendTimeoutError):
        raise_for_chunk(chunks[-1])


@pytest.mark.slow
def test_proxy_worker_not_answering_times_out(controller: ServiceClient) -> None:
    model = unique("slow")
    with FakeWorker([model], behaviour="slow_start") as w:
        register(controller, w)
        resp = httpx.post(f"{controller.base_url}/worker_generate_stream", json={"model": model, "prompt": "p"},
                          timeout=10)
    assert resp.status_code == 504
    assert json.loads(resp.content[:-1])["error_code"] == ErrorCode.TIMEOUT


@pytest.mark.slow
def test_proxy_maps_worker_http_errors_to_chunks(controller: ServiceClient) -> None:
    model = unique("bad")
    with FakeWorker([model], behaviour="bad_request") as w:
        register(controller, w)
        (chunk,) = stream(controller, model)
    assert chunk["error_code"] == ErrorCode.INVALID_REQUEST and "image is corrupt" in chunk["detail"]
    with FakeWorker([model], api_key="the-workers-own-key") as locked:
        register(controller, locked)
        resp = httpx.post(f"{controller.base_url}/worker_generate_stream", json={"model": model, "prompt": "p"})
    chunk = json.loads(resp.content[:-1])  # the controller's key was refused: not the client's fault
    assert resp.status_code == 502 and chunk["error_code"] == ErrorCode.WORKER_ERROR
    assert "rejected the controller's API key" in chunk["detail"]


@pytest.mark.slow
def test_proxy_skips_and_drops_an_unreachable_worker(controller: ServiceClient) -> None:
    model = unique("gone")
    with FakeWorker([model], queue_length=0) as gone:
        register(controller, gone)
    with FakeWorker([model], queue_length=3) as alive:
        register(controller, alive)
        chunks = stream(controller, model)  # shortest_queue picks `gone` first: refused, dropped, `alive` answers
    assert chunks[-1]["error_code"] == 0 and len(alive.requests) == 1
    assert controller.post("/get_worker_address", {"model": model})["address"] == alive.url


@pytest.mark.slow
def test_lottery_and_heart_beat_expiry() -> None:
    model, expiration = unique("lot"), 1.5
    with running_service(CONTROLLER, "--dispatch-method", "lottery", "--heart-beat-expiration", str(expiration)) \
            as svc, ServiceClient(svc.url, timeout=10) as c:
        with FakeWorker([model]) as w1, FakeWorker([model]) as w2:
            register(c, w1)
            register(c, w2)
            picks = {c.post("/get_worker_address", {"model": model})["address"] for _ in range(40)}
            assert picks == {w1.url, w2.url}
        with FakeWorker(["hb"]) as beating, FakeWorker(["hb", "quiet"]) as silent:
            register(c, beating, heart_beat=True)
            register(c, silent, heart_beat=True)
            deadline = time.monotonic() + expiration + 0.5
            while time.monotonic() < deadline:
                assert c.post("/receive_heart_beat", {"worker_name": beating.url, "queue_length": 0})["exist"]
                time.sleep(0.3)
            # w1, w2 (registered with check_heart_beat false: that exempts no one) and silent expired
            assert c.post("/list_models")["models"] == ["hb"]
            assert c.post("/receive_heart_beat", {"worker_name": silent.url, "queue_length": 0}) == {"exist": False}
            assert httpx.get(f"{svc.url}/health").json()["workers"] == 1
            # no more heartbeats: the background sweep (not a request) drops `beating`; /health does not sweep
            deadline = time.monotonic() + expiration * 2 + 1
            while httpx.get(f"{svc.url}/health").json()["workers"] != 0:
                assert time.monotonic() < deadline, "stale worker was not swept"
                time.sleep(0.1)
    assert f"removed worker {silent.url}: no heartbeat" in svc.output
    assert f"removed worker {beating.url}: no heartbeat" in svc.output


@pytest.mark.slow
def test_api_key_guards_every_endpoint_but_health() -> None:
    key, model = "s3cret-test-key", unique("auth")
    with running_service(CONTROLLER, env={"ECSO_API_KEY": key}) as svc, FakeWorker([model], api_key=key) as w:
        url = svc.url
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/register_worker", "/refresh_all_workers", "/list_models", "/get_worker_address",
                     "/receive_heart_beat", "/worker_get_status", "/worker_generate_stream"):
            for headers in ({}, auth_headers("wrong"), {"Authorization": key}):
                resp = httpx.post(f"{url}{path}", json={"worker_name": w.url}, headers=headers)
                assert resp.status_code == 401, (path, headers)
        resp = httpx.post(f"{url}/register_worker", json={"worker_name": w.url})
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
        with pytest.raises(AuthError), ServiceClient(url) as anonymous:
            anonymous.post("/list_models")
        with ServiceClient(url, api_key=key, timeout=10) as c:
            assert register(c, w, with_status=False)["model_names"] == [model]  # status fetched with the key
            assert c.post("/list_models") == {"models": [model]}
            assert stream(c, model)[-1]["error_code"] == 0
        assert set(w.auth) == {f"Bearer {key}"}
    assert key not in svc.output and "rejected POST /register_worker" in svc.output
