"""Issue 18, the network half: each attack of the red-team pass replayed on loopback against real services (a keyed
worker, a keyed and a keyless controller, rogue workers served from this process), with the figures it measured
(RSS deltas, status codes, times) printed as ``FIGURE name: value`` (run with ``-s`` to see them).

Covered: the key checked before the body is read; /docs, /redoc, /openapi.json; controller hijack (allowed hosts, no
takeover of a live worker, no fetched body reflected, a URL with a path); registrations and heartbeats validated,
every worker expiring; the controller's own address; non-JSON frames from a rogue worker; a hung worker dropped
after N timeouts; newlines in worker names; ASCII-only keys; the launcher's generated key and the demo's password
kept off command lines and logs; query strings out of access lines; a header deadline and a connection limit."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from service_procs import Service, start_service, stop_service  # noqa: E402

from llava.errors import BackendError  # noqa: E402
from llava.http_client import ServiceClient, auth_headers  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "net-hardening-key-5e1d"
SECRET = "reflected-secret-0b7a"  # what a rogue status endpoint answers; must never come back to the registrant
EXPIRY = 1.5  # the keyed controller's --heart-beat-expiration
WORKER_TIMEOUT = 1.0  # the keyless controller's --worker-timeout
MAX_TIMEOUTS = 2  # the keyless controller's --max-worker-timeouts


def figure(name: str, value: object) -> None:
    print(f"FIGURE {name}: {value}", file=sys.stderr)


def rss(svc: Service) -> int:
    return psutil.Process(svc.pid).memory_info().rss


def post(url: str, body: object = None, *, key: str | None = None, **kw) -> httpx.Response:
    return httpx.post(url, json=body, headers=auth_headers(key), trust_env=False, timeout=kw.pop("timeout", 30), **kw)


# ------------------------------------------------------------------------------------------------ rogue workers


class RogueWorker:
    """A worker that breaks the protocol, served by the standard library in a thread: ``status`` = "html" answers
    its status with an HTML page holding :data:`SECRET`; ``stream`` = "garbage" sends one good frame then a frame
    that is not JSON ("garbage_error": the same with status 400), "hung" holds the connection without a byte until the test ends."""

    def __init__(self, *, status: str = "json", stream: str = "garbage", models: tuple[str, ...] = ("rogue",)):
        self.hits = 0
        release = self.release = threading.Event()
        rogue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/worker_get_status":
                    if status == "html":
                        body, kind = f"<html><body>{SECRET}</body></html>".encode(), "text/html"
                    else:
                        body, kind = json.dumps({"model_names": list(models)}).encode(), "application/json"
                    self._answer(body, kind)
                    return
                rogue.hits += 1
                if stream == "hung":
                    release.wait(30)
                    return
                self._answer(b'{"text": "hello", "error_code": 0}\0<html>not a frame</html>\0', "text/plain",
                             400 if stream == "garbage_error" else 200)

            def _answer(self, body: bytes, kind: str, code: int = 200) -> None:
                self.send_response(code)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.models = list(models)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def services(tiny_hf_path) -> Iterator[dict[str, Service]]:
    env = {"ECSO_API_KEY": KEY}
    with ThreadPoolExecutor(3) as pool:
        futures = {
            "worker": pool.submit(start_service, "llava.serve.model_worker", "--model-path", "tiny", "--no-register",
                                  env=env, startup_timeout=90),
            "keyed": pool.submit(start_service, "llava.serve.controller", "--heart-beat-expiration", str(EXPIRY),
                                 env=env),
            "open": pool.submit(start_service, "llava.serve.controller", "--worker-timeout", str(WORKER_TIMEOUT),
                                "--max-worker-timeouts", str(MAX_TIMEOUTS)),
        }
        started = {}
        for name, future in futures.items():
            if future.exception() is None:
                started[name] = future.result()
    try:
        for name, future in futures.items():
            if future.exception() is not None:
                raise future.exception()
        yield started
    finally:
        for svc in started.values():
            stop_service(svc)


# -------------------------------------------------------------------------------- item 5: auth before the body


def test_an_unauthenticated_body_is_refused_before_it_is_read(services) -> None:
    worker = services["worker"]
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (46 * 1024 * 1024)}}]}]})
    before = rss(worker)
    started = time.monotonic()
    r = httpx.post(f"{worker.url}/v1/chat/completions", content=big, trust_env=False, timeout=60,
                   headers={"content-type": "application/json", **auth_headers("wrong-key")})
    elapsed = time.monotonic() - started
    one = rss(worker) - before
    figure("item5 46 MB unauthenticated body: status, RSS delta MB, seconds", (r.status_code, one >> 20,
                                                                                round(elapsed, 2)))

    def send() -> int:
        body = b"x" * (60 * 1024 * 1024)
        return httpx.post(f"{worker.url}/worker_generate_stream", content=body, trust_env=False, timeout=60).status_code

    before = rss(worker)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: send(), range(6)))
    six = rss(worker) - before
    figure("item5 six 60 MiB unauthenticated bodies: statuses, RSS delta MB", (statuses, six >> 20))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert statuses == [401] * 6
    assert one < 24 * 1024 * 1024 and six < 24 * 1024 * 1024  # before: +511 MB and +275 MB
    ok = post(f"{worker.url}/worker_get_status", {}, key=KEY)  # the keyed path still works
    assert ok.status_code == 200 and ok.json()["model_names"] == ["tiny"]


def test_api_docs_are_behind_the_key_or_off(services) -> None:
    codes = {}
    for path in ("/docs", "/redoc", "/openapi.json"):
        codes[path] = (httpx.get(f"{services['open'].url}{path}", trust_env=False).status_code,
                       httpx.get(f"{services['keyed'].url}{path}", trust_env=False).status_code,
                       httpx.get(f"{services['keyed'].url}{path}", headers=auth_headers(KEY),
                                 trust_env=False).status_code)
    figure("low /docs /redoc /openapi.json: keyless, keyed without key, keyed with key", codes)
    assert all(c == (404, 401, 200) for c in codes.values()), codes


# ---------------------------------------------------------------------------- item 6: the controller hijack


def _register(url: str, name: str, models: list[str] | None = None, *, key: str | None = None,
              **extra) -> httpx.Response:
    body: dict = {"worker_name": name, "check_heart_beat": True, **extra}
    if models is not None:
        body["worker_status"] = {"model_names": models, "speed": 1.0, "queue_length": 0}
    return post(f"{url}/register_worker", body, key=key)


def test_a_keyless_controller_accepts_workers_only_on_allowed_hosts(services) -> None:
    url = services["open"].url
    away = _register(url, "http://10.1.2.3:40000", ["tiny"])
    named = _register(url, "http://example.com:40000", ["tiny"])
    path = _register(url, "http://127.0.0.1:9/steal/this?x=", ["tiny"])
    figure("item6 keyless controller: off-loopback worker, host name, URL with a path",
           (away.status_code, named.status_code, path.status_code))
    assert away.status_code == named.status_code == path.status_code == 400
    assert "--allowed-worker-hosts" in away.json()["error"]["message"]
    assert "no credentials, path or query" in path.json()["error"]["message"]
    assert "10.1.2.3" not in post(f"{url}/list_models").text
    # A keyed controller: the key is the check, any host may register.
    keyed = _register(services["keyed"].url, "http://10.1.2.3:40000", ["far"], key=KEY)
    assert keyed.status_code == 200


def test_a_registration_cannot_take_over_a_live_worker(services) -> None:
    url = services["open"].url
    name = "http://127.0.0.1:45001"
    assert _register(url, name, ["victim-model"]).status_code == 200
    hijack = _register(url, name, ["victim-model", "bait"])
    again = _register(url, name, ["victim-model"])  # the worker itself re-registering
    figure("item6 takeover of a live worker's name: hijack, same models", (hijack.status_code, again.status_code))
    assert hijack.status_code == 409 and "cannot replace it" in hijack.json()["error"]["message"]
    assert again.status_code == 200
    models = post(f"{url}/list_models").json()["models"]
    assert "victim-model" in models and "bait" not in models


def test_a_status_fetch_reflects_nothing(services) -> None:
    rogue = RogueWorker(status="html")
    try:
        r = _register(services["open"].url, rogue.url)  # no worker_status: the controller fetches it
    finally:
        rogue.close()
    figure("item6/7 registration whose status fetch returns HTML: status, body reflected",
           (r.status_code, SECRET in r.text))
    assert r.status_code == 400 and SECRET not in r.text
    assert "not a valid worker status" in r.json()["error"]["message"]


def test_the_launcher_generates_a_key_and_keeps_it_in_a_private_file(tmp_path) -> None:
    from llava.serve.launch import Launcher, config_from_args

    config = config_from_args(["--model-path", "tiny"], environ={})
    assert config.api_key and len(config.api_key) >= 32 and config.api_key_generated
    assert config.api_key not in repr(config)
    assert config_from_args(["--model-path", "tiny"], environ={}).api_key != config.api_key  # random each run
    assert config_from_args(["--model-path", "tiny", "--no-api-key"], environ={}).api_key is None
    assert config_from_args(["--model-path", "tiny"], environ={"ECSO_API_KEY": "given"}).api_key == "given"
    launcher = Launcher(config, environ={})
    argv = launcher.controller_argv() + launcher.worker_argv() + launcher.demo_argv()
    assert config.api_key not in " ".join(argv) and launcher._env["ECSO_API_KEY"] == config.api_key
    launcher._write_key_file()
    key_file = Path(launcher.key_file)
    assert key_file.read_text().strip() == config.api_key and oct(key_file.stat().st_mode & 0o777) == "0o600"
    launcher._remove_key_file()
    assert not key_file.exists()


# ------------------------------------------------------------------------- item 7: validation and expiry


def test_heartbeats_and_registrations_are_validated(services) -> None:
    url = services["keyed"].url
    name = "http://127.0.0.1:45002"
    assert _register(url, name, ["hb-model"], key=KEY).status_code == 200
    huge_queue = httpx.post(f"{url}/receive_heart_beat", content=f'{{"worker_name": "{name}", "queue_length": '
                            f'{"9" * 400}}}', headers={"content-type": "application/json", **auth_headers(KEY)},
                            trust_env=False)
    huge_speed = _register(url, "http://127.0.0.1:45003", None, key=KEY,
                           worker_status={"model_names": ["hb-model"], "speed": 1.7e308, "queue_length": 0})
    wrong_type = post(f"{url}/receive_heart_beat", {"worker_name": name, "queue_length": "many"}, key=KEY)
    address = post(f"{url}/get_worker_address", {"model": "hb-model"}, key=KEY)
    status = post(f"{url}/worker_get_status", {}, key=KEY)
    figure("item7 queue_length 10**400, speed 1.7e308, wrong type; then get_worker_address, worker_get_status",
           (huge_queue.status_code, huge_speed.status_code, wrong_type.status_code, address.status_code,
            status.status_code))
    assert (huge_queue.status_code, huge_speed.status_code, wrong_type.status_code) == (400, 400, 400)
    assert "queue_length" in huge_queue.json()["error"]["message"]
    assert address.status_code == 200 and address.json()["address"] == name
    assert status.status_code == 200 and status.json()["speed"] < 1e300


def test_every_worker_expires(services) -> None:
    url = services["keyed"].url
    name = "http://127.0.0.1:45004"
    r = post(f"{url}/register_worker", {"worker_name": name, "check_heart_beat": False,
                                        "worker_status": {"model_names": ["never-beats"]}}, key=KEY)
    assert r.status_code == 200
    started = time.monotonic()
    while "never-beats" in post(f"{url}/list_models", key=KEY).json()["models"]:
        assert time.monotonic() - started < EXPIRY * 4, "a worker registered with check_heart_beat false stayed"
        time.sleep(0.2)
    figure("item7 check_heart_beat false: dropped after s (expiration 1.5)", round(time.monotonic() - started, 1))


# ------------------------------------------------------------------------- item 8: the controller's own address


def test_the_controller_refuses_itself_as_a_worker(services) -> None:
    outcomes = {}
    for which, key in (("open", None), ("keyed", KEY)):
        svc = services[which]
        for name in (svc.url, f"http://localhost:{svc.port}", f"http://[::1]:{svc.port}"):
            started = time.monotonic()
            r = _register(svc.url, name, key=key)  # would fetch its own status
            outcomes[(which, name.split("//")[1].rsplit(":", 1)[0])] = (r.status_code,
                                                                        round(time.monotonic() - started, 2), r.text)
    figure("item8 registering the controller's own address: status, seconds", {k: v[:2] for k, v in outcomes.items()})
    for status, _, text in outcomes.values():
        assert status == 400 and "own address" in json.loads(text)["error"]["message"], text


# --------------------------------------------------------------------------------- low items: protocol, hangs


def test_a_rogue_workers_non_json_frame_is_a_protocol_error(services) -> None:
    url = services["open"].url
    rogue = RogueWorker(models=("garbage-model",))
    failing = RogueWorker(stream="garbage_error", models=("garbage-error-model",))
    try:
        assert _register(url, rogue.url, ["garbage-model"]).status_code == 200
        assert _register(url, failing.url, ["garbage-error-model"]).status_code == 200
        with ServiceClient(url, timeout=10) as client:
            chunks = list(client.stream("/worker_generate_stream", {"model": "garbage-model", "prompt": "hi"}))
            error_chunks = list(client.stream("/worker_generate_stream", {"model": "garbage-error-model",
                                                                          "prompt": "hi"}))
        with ServiceClient(rogue.url, timeout=10) as direct, pytest.raises(BackendError, match="protocol error"):
            list(direct.stream("/worker_generate_stream", {"model": "garbage-model", "prompt": "hi"}))
    finally:
        rogue.close()
        failing.close()
    figure("low rogue frame through the controller: chunks' error codes (200, 400 answer)",
           ([c["error_code"] for c in chunks], [c["error_code"] for c in error_chunks]))
    assert [c["error_code"] for c in chunks] == [0, 1]
    assert "broke the stream protocol" in chunks[-1]["detail"] and "not JSON" in chunks[-1]["detail"]
    assert len(error_chunks) == 1 and error_chunks[0]["error_code"] == 4  # a 400, relayed as one typed chunk


def test_a_hung_worker_stops_getting_traffic(services) -> None:
    url = services["open"].url
    hung = RogueWorker(stream="hung", models=("hung-model",))
    try:
        assert _register(url, hung.url, ["hung-model"]).status_code == 200
        codes, started = [], time.monotonic()
        for _ in range(MAX_TIMEOUTS + 2):
            r = httpx.post(f"{url}/worker_generate_stream", json={"model": "hung-model", "prompt": "hi"},
                           trust_env=False, timeout=10)
            codes.append(json.loads(r.content.split(b"\0")[0])["error_code"])
        elapsed = time.monotonic() - started
    finally:
        hung.close()
    figure("low hung worker (--max-worker-timeouts 2): error codes, worker hits, seconds",
           (codes, hung.hits, round(elapsed, 1)))
    assert codes == [3] * MAX_TIMEOUTS + [2, 2] and hung.hits == MAX_TIMEOUTS
    assert "2 requests in a row timed out" in services["open"].log()


def test_newlines_in_worker_names_are_refused(services) -> None:
    url = services["open"].url
    forged = "http://127.0.0.1:45005\n2026-01-01 00:00:00 INFO forged: admin logged in"
    reg = _register(url, forged, ["x"])
    beat = post(f"{url}/receive_heart_beat", {"worker_name": forged})
    figure("low newline in worker_name: register, heartbeat", (reg.status_code, beat.status_code))
    assert reg.status_code == beat.status_code == 400
    assert "\n2026-01-01 00:00:00 INFO forged" not in services["open"].log()


def test_api_keys_must_be_ascii(monkeypatch, capsys) -> None:
    from llava.serve import controller, launch, model_worker

    for config_from_args, extra in ((controller.config_from_args, []), (model_worker.config_from_args,
                                                                        ["--model-path", "tiny"]),
                                    (launch.config_from_args, ["--model-path", "tiny"])):
        with pytest.raises(SystemExit) as exc:
            config_from_args(extra, environ={"ECSO_API_KEY": "clé-secrète"})
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "printable ASCII" in err and "clé" not in err


# --------------------------------------------------------------------------------------- item 11: secrets


def test_the_demo_password_stays_off_command_lines_and_logs(caplog) -> None:
    from llava.serve.launch import Launcher, config_from_args

    config = config_from_args(["--model-path", "tiny", "--demo-args", "--threshold 0.3 --auth ann:pw-31337"],
                              environ={})
    launcher = Launcher(config, environ={})
    argv = launcher.controller_argv() + launcher.worker_argv() + launcher.demo_argv()
    figure("item11 password on child command lines, in repr(LaunchConfig)",
           ("pw-31337" in " ".join(argv), "pw-31337" in repr(config)))
    assert "pw-31337" not in " ".join(argv) and "pw-31337" not in repr(config)
    assert launcher.demo_argv()[-2:] == ["--threshold", "0.3"]
    assert launcher._env["ECSO_DEMO_AUTH"] == "ann:pw-31337"
    from llava.serve.gradio_web_server_ecso import config_from_args as demo_config

    assert demo_config(["--log-dir", ""], environ=launcher._env).auth == (("ann", "pw-31337"),)


def test_query_strings_stay_out_of_access_lines(services) -> None:
    svc = services["open"]
    r = httpx.post(f"{svc.url}/get_worker_address?api_key=leaked-{SECRET}", json={"model": "m"}, trust_env=False)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while "/get_worker_address?<redacted>" not in svc.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    figure("item11 key in a query string reaches the access log", SECRET in svc.log())
    assert "/get_worker_address?<redacted>" in svc.log() and SECRET not in svc.log()


# ---------------------------------------------------------------------------------- low: slowloris, limits


def test_a_slow_request_head_is_cut_off() -> None:
    """The header deadline, on an in-process uvicorn with a 1 s deadline (the services use 10 s)."""
    import uvicorn
    from fastapi import FastAPI

    from llava.serve.server_http import HeaderTimeoutProtocol

    protocol = type("OneSecondHeads", (HeaderTimeoutProtocol,), {"header_timeout": 1.0})
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            started = time.monotonic()
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            closed = False
            for _ in range(8):  # one header byte every 0.4 s: never a whole head
                time.sleep(0.4)
                try:
                    slow.sendall(b"X")
                    if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                    break
            held = time.monotonic() - started
        with httpx.Client(trust_env=False) as fast:  # a normal request on the same server still works
            assert fast.get(f"http://127.0.0.1:{port}/health").json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(5)
    figure("low slowloris head: connection closed, held seconds (deadline 1 s)", (closed, round(held, 1)))
    assert closed and held < 2.5


def test_services_run_with_a_header_deadline_and_a_connection_limit(monkeypatch) -> None:
    from llava.serve import controller, server, server_http

    calls: list[dict] = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: calls.append(kw))
    controller.main(["--port", "18011"])
    (kw,) = calls
    assert kw["http"] is server_http.HeaderTimeoutProtocol and server_http.HEADER_TIMEOUT == 10.0
    assert kw["limit_concurrency"] == server_http.MAX_CONNECTIONS == 1024
    assert kw["timeout_keep_alive"] == server_http.KEEP_ALIVE_TIMEOUT == 5
    assert "redact_query" in kw["log_config"]["handlers"]["access"]["filters"]

