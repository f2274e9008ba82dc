"""Binding and exposure: every service binds 127.0.0.1 unless told otherwise, and warns (without printing the key)
when told to bind elsewhere unprotected; access logs leave client addresses out unless --log-ips; the demo's
gradio login (--auth) guards its API over real HTTP."""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import httpx
import pytest

from llava.serve import controller, gradio_web_server_ecso, launch, model_worker, server

PARSERS = {"controller": controller.build_parser, "worker": model_worker.build_parser,
           "demo": gradio_web_server_ecso.build_parser, "launch": launch.build_parser}


@pytest.mark.parametrize("name", PARSERS)
def test_every_service_binds_loopback_by_default(name: str) -> None:
    argv = ["--model-path", "tiny"] if name in ("worker", "launch") else []
    assert PARSERS[name]().parse_args(argv).host == "127.0.0.1"


@pytest.fixture
def no_uvicorn(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize("main, extra", [(controller.main, []), (model_worker.main, ["--model-path", "tiny",
                                                                                     "--no-register"])])
def test_controller_and_worker_warn_when_exposed_without_a_key(main, extra, no_uvicorn, caplog, monkeypatch) -> None:
    monkeypatch.delenv("ECSO_API_KEY", raising=False)
    caplog.set_level(logging.WARNING)
    main(["--host", "0.0.0.0", "--port", "18001", *extra])
    assert "0.0.0.0:18001 without an API key" in caplog.text
    caplog.clear()
    monkeypatch.setenv("ECSO_API_KEY", "k-123456")
    main(["--host", "0.0.0.0", "--port", "18002", *extra])
    main(["--port", "18003", *extra])
    assert "without an API key" not in caplog.text and "k-123456" not in caplog.text
    assert [c["host"] for c in no_uvicorn] == ["0.0.0.0", "0.0.0.0", "127.0.0.1"]


def test_access_logs_carry_client_addresses_only_with_log_ips(no_uvicorn) -> None:
    controller.main(["--port", "18004"])
    controller.main(["--port", "18005", "--log-ips"])
    plain, with_ips = (c["log_config"]["formatters"]["access"]["fmt"] for c in no_uvicorn)
    assert "client_addr" not in plain and "request_line" in plain and "client_addr" in with_ips


class _Recorder:
    def __init__(self) -> None:
        self.launched: dict = {}

    def launch(self, **kw) -> None:
        self.launched = kw


def test_demo_warns_when_exposed_without_a_login(monkeypatch, caplog) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(gradio_web_server_ecso, "build_demo", lambda config, client: recorder)
    caplog.set_level(logging.WARNING)
    gradio_web_server_ecso.main(["--host", "0.0.0.0", "--port", "18006", "--log-dir", ""])
    assert "0.0.0.0 without --auth" in caplog.text and recorder.launched["server_name"] == "0.0.0.0"
    caplog.clear()
    gradio_web_server_ecso.main(["--host", "0.0.0.0", "--port", "18007", "--log-dir", "", "--auth", "ann:pw-77"])
    assert "without --auth" not in caplog.text and "pw-77" not in caplog.text
    assert recorder.launched["auth"] == [("ann", "pw-77")]


def test_launch_warns_when_exposed_without_a_key(monkeypatch, caplog) -> None:
    class NoLauncher:
        def __init__(self, config) -> None:
            self.config = config

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> int:
            return 0

    monkeypatch.setattr(launch, "Launcher", NoLauncher)
    monkeypatch.delenv("ECSO_API_KEY", raising=False)
    caplog.set_level(logging.WARNING)
    assert launch.main(["--model-path", "tiny", "--host", "0.0.0.0", "--no-api-key"]) == 0
    assert "on 0.0.0.0 without an API key" in caplog.text
    caplog.clear()
    assert launch.main(["--model-path", "tiny", "--host", "0.0.0.0"]) == 0  # a key is generated for the run
    assert "without an API key" not in caplog.text
    assert launch.main(["--model-path", "tiny", "--host", "0.0.0.0", "--api-key", "k-7788"]) == 0
    assert launch.main(["--model-path", "tiny"]) == 0
    assert "without an API key" not in caplog.text and "k-7788" not in caplog.text


# ------------------------------------------------------------------------------------------------- demo login


@pytest.fixture
def demo_url() -> Iterator[str]:
    from llava.serve.demo_client import DemoClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = gradio_web_server_ecso.DemoConfig(controller_url="http://127.0.0.1:9", port=port,
                                               auth=(("alice", "s3cret-pw"),), log_dir=None)
    client = DemoClient(config.controller_url, defaults=config.ecso)
    demo = gradio_web_server_ecso.build_demo(config, client)
    demo.launch(server_name="127.0.0.1", server_port=port, auth=list(config.auth), prevent_thread_lock=True,
                ssr_mode=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()
        client.close()


@pytest.mark.slow
def test_demo_login_guards_the_page_api(demo_url: str) -> None:
    with httpx.Client(base_url=demo_url, trust_env=False, timeout=10) as http:
        assert http.get("/").status_code == 200  # the login form
        for path in ("/config", "/gradio_api/info"):
            r = http.get(path)
            assert r.status_code == 401 and r.json()["detail"]["error"] == "Not authenticated", path
        join = http.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert join.status_code == 401
        assert http.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert http.get("/config").status_code == 401
        assert http.post("/login", data={"username": "alice", "password": "s3cret-pw"}).json() == {"success": True}
        assert http.get("/config").status_code == 200 and "run_ecso" in http.get("/gradio_api/info").text
