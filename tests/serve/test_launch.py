"""``python -m llava.serve.launch`` as a real process: it starts controller, worker (tiny) and demo, serves a request,
and stops every child on SIGINT; when a child dies it stops the rest and exits non-zero."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_procs import REPO_ROOT, free_port, group_pids

from llava.errors import AuthError
from llava.serve.demo_client import DemoClient
from llava.serve.protocol.ecso import ECSOOptions

pytestmark = pytest.mark.slow

READY = "ECSO serving stack is ready"
STARTED = re.compile(r"started (\w+) \(pid (\d+)\)")


@dataclass
class Launch:
    proc: subprocess.Popen
    log_path: Path
    ports: dict[str, int]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@contextmanager
def launched(tmp_path: Path, *args: str, ready_timeout: float = 120.0) -> Iterator[Launch]:
    """Run launch in its own process group until it prints the ready line; afterwards make sure nothing it started
    is left (SIGKILL to every process group involved if a test failed half-way)."""
    controller, worker, web = distinct_ports(3)
    env = {k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p))
    log_path = tmp_path / "launch.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llava.serve.launch", "--model-path", "tiny", "--controller-port", str(controller),
             "--worker-port", str(worker), "--web-port", str(web), "--stop-timeout", "5", *args],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    launch = Launch(proc, log_path, {"controller": controller, "worker": worker, "demo": web})
    try:
        deadline = time.monotonic() + ready_timeout
        while READY not in launch.log():
            assert proc.poll() is None, f"launch exited with {proc.returncode} before it was ready:\n{launch.log()}"
            assert time.monotonic() < deadline, f"launch not ready after {ready_timeout} s:\n{launch.log()}"
            time.sleep(0.2)
        yield launch
    finally:
        groups = [proc.pid, *launch.children().values()]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for pgid in groups:
            for pid in group_pids(pgid):
                os.kill(pid, signal.SIGKILL)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch still running {timeout} s later")


def assert_all_gone(launch: Launch) -> None:
    children = launch.children()
    left = {name: pid for name, pid in children.items() if alive(pid) or group_pids(pid)}
    assert not left, f"processes left behind: {left}"
    assert not group_pids(launch.proc.pid)


def test_launch_serves_and_stops_everything_on_sigint(tmp_path, tiny_hf_path):
    key = "launch-test-key"
    with launched(tmp_path, "--api-key", key) as launch:
        children = launch.children()
        assert set(children) == {"controller", "worker", "demo"}
        for pid in children.values():  # the key reaches the children in the environment only
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert key not in launch.log()
        with pytest.raises(AuthError):
            DemoClient(launch.url("controller")).list_models()
        assert f"demo        {launch.url('demo')}" in launch.log()
        page = httpx.get(launch.url("demo"), timeout=10, trust_env=False)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        # One ECSO run through the worker address the controller hands out, as the demo does it.
        client = DemoClient(launch.url("controller"), api_key=key)
        try:
            assert client.list_models() == ["tiny"]
            events = list(client.ecso_stream("tiny", Image.new("RGB", (64, 48), (200, 30, 30)), "What is this?",
                                             ECSOOptions(verdict="score", threshold=0.0, max_new_tokens=8)))
        finally:
            client.close()
        done = [e.event for e in events if e.done is not False]
        assert done == ["direct", "verdict", "caption", "safe", "final"], done
        assert events[-1].flagged is True
        # the launcher's and the services' periodic probes are not logged at info level; other requests are
        log = launch.log()
        assert "/get_worker_address" in log and "/worker_ecso_stream" in log
        for periodic in ("/health", "/worker_get_status", "/list_models", "/receive_heart_beat"):
            assert f"{periodic} HTTP/1.1\" 200" not in log, periodic  # (errors on them are kept: the 401 above)

        launch.proc.send_signal(signal.SIGINT)
        assert wait_exit(launch.proc, 30) == 0, launch.log()
        assert_all_gone(launch)
        assert "stopped (SIGINT)" in launch.log()


def test_launch_stops_the_rest_and_fails_when_the_worker_dies(tmp_path, tiny_hf_path):
    with launched(tmp_path, "--no-demo") as launch:
        children = launch.children()
        assert set(children) == {"controller", "worker"}
        os.kill(children["worker"], signal.SIGKILL)
        assert wait_exit(launch.proc, 30) == 1, launch.log()
        assert f"worker (pid {children['worker']}) was killed by SIGKILL; stopping the other services" in launch.log()
        assert_all_gone(launch)


def test_a_busy_port_is_named_with_its_flag_before_anything_starts(tmp_path, caplog):
    import socket

    from llava.serve.launch import main

    controller, worker = distinct_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web = taken.getsockname()[1]
        code = main(["--model-path", "tiny", "--controller-port", str(controller), "--worker-port", str(worker),
                     "--web-port", str(web)])
    assert code == 1
    assert f"port {web} on 127.0.0.1 (the demo page) is in use: choose another with --web-port, e.g. --web-port" in \
        caplog.text
    assert "nothing was started" in caplog.text and "started controller" not in caplog.text
