"""Test helper: ``transformers serve``, a real third-party OpenAI-compatible server (transformers' own), serving the
tiny llava-hf model from its folder on a loopback port, offline:

    server = TransformersServe(model_dir)
    server.start()            # waits until its /health answers (the model is loaded before the server listens)
    server.url                # http://127.0.0.1:PORT/v1
    server.kill()             # SIGKILL: a crash (in-flight streams break off); start() again on the same port

What it needs: the ``transformers`` console script of this environment (transformers >= 5, the ``serve`` command)
with fastapi, uvicorn, pydantic, openai and rich installed (``transformers[serving]``; our ``[serve]`` and
``[eval]`` extras bring them). It returns no logprobs, and serves llava-hf models one request at a time (its
continuous batching does not take ``LlavaForConditionalGeneration``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.serve.service_procs import LOOPBACK, REPO_ROOT, Service, _wait_healthy, free_port, stop_service

__all__ = ["TRANSFORMERS_CLI", "OFFLINE_ENV", "TransformersServe"]

TRANSFORMERS_CLI = Path(sys.executable).with_name("transformers")
# Offline, and no version check against PyPI at start (transformers' CLI does one otherwise).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
               "PYTHONUNBUFFERED": "1"}


class TransformersServe:
    """``transformers serve MODEL_DIR --host 127.0.0.1 --port PORT --device cpu [ARGS]`` as a process group of its
    own; the same port across restarts."""

    def __init__(self, model_dir: Path | str, *args: str, port: int | None = None) -> None:
        self.model_dir, self.args = str(model_dir), args
        self.port = port or free_port()
        self.service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    @property
    def model_id(self) -> str:
        """The id its /v1/models lists: the folder as given."""
        return self.model_dir

    @property
    def running(self) -> bool:
        return self.service is not None and self.service.proc.poll() is None

    def argv(self) -> list[str]:
        """The command line after the ``transformers`` script (docs/serving.md prints the same one)."""
        return ["serve", self.model_dir, "--host", LOOPBACK, "--port", str(self.port), "--device", "cpu", *self.args]

    def start(self, timeout: float = 240.0) -> TransformersServe:
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        fd, log_name = tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(
                [str(TRANSFORMERS_CLI), *self.argv()],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.service = Service("transformers serve", self.port, proc, Path(log_name))
        if not _wait_healthy(self.service, timeout):
            stop_service(self.service)
            raise RuntimeError(f"transformers serve did not come up (exit {proc.returncode}):\n"
                               f"{self.service.output[-4000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: connections break off, nothing is cleaned up by the server."""
        if self.service is not None:
            os.killpg(self.service.proc.pid, 9)
            stop_service(self.service)
            self.service = None

    def stop(self) -> None:
        if self.service is not None:
            stop_service(self.service)
            self.service = None

    def log(self) -> str:
        return self.service.log() if self.service is not None else ""
