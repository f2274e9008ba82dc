"""Test helper: run ``python -m llava.serve.<service>`` as a real subprocess on a free loopback port.

    with running_service("llava.serve.controller", "--heart-beat-expiration", "2") as svc:
        httpx.get(f"{svc.url}/health")

The process gets its own process group; stopping sends SIGTERM to that group (SIGKILL after a grace period) and
asserts that the process and every child in its group are gone. Output goes to a temporary file: ``svc.log()``
while it runs, ``svc.output`` after it stopped.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["REPO_ROOT", "Service", "free_port", "group_pids", "start_service", "stop_service", "running_service"]

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the service binds it itself; :func:`start_service` retries a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


@dataclass
class Service:
    module: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    output: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self.output


def _spawn(module: str, port: int, args: tuple[str, ...], env: Mapping[str, str]) -> Service:
    fd, name = tempfile.mkstemp(prefix=f"{module.rsplit('.', 1)[-1]}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", LOOPBACK, "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(module, port, proc, Path(name))


def _wait_healthy(svc: Service, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{svc.url}/health", timeout=1.0, trust_env=False).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start_service(
    module: str, *args: str, env: Mapping[str, str] | None = None, startup_timeout: float = 30.0
) -> Service:
    """Start ``module`` on a free loopback port and wait until ``GET /health`` answers 200. ``env`` is added to a copy
    of this environment from which ``ECSO_API_KEY`` is removed (pass it in ``env`` to set it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path})
    full_env.update(env or {})
    for _attempt in range(3):
        svc = _spawn(module, free_port(), args, full_env)
        if _wait_healthy(svc, startup_timeout):
            return svc
        stop_service(svc)
        if "address already in use" not in svc.output.lower():
            break
    raise RuntimeError(
        f"{module} did not become healthy (exit code {svc.proc.returncode}); output:\n{svc.output[-4000:]}"
    )


def stop_service(svc: Service, grace: float = 10.0) -> None:
    """SIGTERM the service's process group, SIGKILL after ``grace`` seconds; assert nothing of it is left."""
    pgid = svc.proc.pid  # start_new_session: the leader's pid is the group id
    if svc.proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            svc.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            svc.proc.wait(timeout=grace)
    deadline = time.monotonic() + grace
    while group_pids(pgid) and time.monotonic() < deadline:  # children outliving the leader
        time.sleep(0.05)
    leftover = group_pids(pgid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    svc.output = svc.log()
    svc.log_path.unlink(missing_ok=True)
    assert svc.proc.poll() is not None, f"{svc.module} pid {svc.pid} is still running"
    assert not leftover, f"{svc.module} left processes {leftover} in group {pgid}"


@contextmanager
def running_service(
    module: str, *args: str, env: Mapping[str, str] | None = None, startup_timeout: float = 30.0
) -> Iterator[Service]:
    svc = start_service(module, *args, env=env, startup_timeout=startup_timeout)
    try:
        yield svc
    finally:
        stop_service(svc)


DEMO = "llava.serve.gradio_web_server_ecso"


def start_demo(controller_url: str, *args: str, startup_timeout: float = 60.0,
               env: Mapping[str, str] | None = None) -> Service:
    """The demo as a subprocess in its own process group on a free port; ready when its page answers 200.
    ``env`` is added to a copy of this environment without ``ECSO_API_KEY`` and ``GRADIO_TEMP_DIR``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("ECSO_API_KEY", "GRADIO_TEMP_DIR")}
    full_env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
                    PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p))
    full_env.update(env or {})
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="demo-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", DEMO, "--host", "127.0.0.1", "--port", str(port),
                                 "--controller-url", controller_url, *args],
                                cwd=REPO_ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(DEMO, port, proc, Path(log_name))
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(svc.url, timeout=1.0, trust_env=False).status_code == 200:
                return svc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_service(svc)
    raise RuntimeError(f"the demo did not come up (exit code {proc.returncode}); output:\n{svc.output[-4000:]}")
