"""A scripted OpenAI-compatible judge for tests: FastAPI on a free 127.0.0.1 port, run in a thread.

The script lives in the prompt itself, so it holds however requests are ordered or retried. Directives in the
last user message (any may be absent):
  <<id:KEY>>            names the answer (default: a hash of the message)
  <<faults:F1,F2,...>>  what the first attempts for KEY get, in order: 429 (with Retry-After), 500, 503, slow
                        (sleeps past the client timeout), malformed (200, not JSON), nochoices (200, JSON without
                        choices), 400, 401, 403. Later attempts succeed.
  <<say:TEXT>>          the reply; "A||B" gives A to the first successful reply for KEY, B to later ones
Without <<say:...>> the reply is ``ScriptState.default_reply`` (a string or a function of the messages).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

__all__ = ["ScriptState", "JudgeServer", "create_app", "completion_body", "directives"]

_DIRECTIVE = re.compile(r"<<(id|faults|say|sleep):(.*?)>>", re.DOTALL)


@dataclass
class ScriptState:
    default_reply: str | Callable[[list[dict[str, Any]]], str] = "Rating: [[1]]"
    retry_after: str = "0"
    slow_s: float = 2.0
    latency_s: float = 0.0
    requests: int = 0
    attempts: Counter = field(default_factory=Counter)
    successes: Counter = field(default_factory=Counter)
    outcomes: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.attempts.clear()
            self.successes.clear()
            self.outcomes.clear()
            self.bodies.clear()


def directives(text: str) -> dict[str, str]:
    return {k: v for k, v in _DIRECTIVE.findall(text)}


def completion_body(text: str, model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "stub", "code": str(status)}}, status_code=status,
                        headers=headers)


def create_app(state: ScriptState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        messages = body.get("messages", [])
        text = messages[-1]["content"] if messages else ""
        d = directives(text)
        key = d.get("id") or hashlib.sha256(text.encode()).hexdigest()[:16]
        with state.lock:
            state.requests += 1
            attempt = state.attempts[key]
            state.attempts[key] += 1
            state.bodies.append(body)
        faults = [f.strip() for f in d.get("faults", "").split(",") if f.strip()]
        fault = faults[attempt] if attempt < len(faults) else None
        state.outcomes.append((key, fault or "ok"))
        if state.latency_s or "sleep" in d:
            await asyncio.sleep(float(d.get("sleep", state.latency_s)))
        if fault == "429":
            return _error(429, "rate limited", {"Retry-After": state.retry_after})
        if fault in ("400", "401", "403", "500", "502", "503"):
            return _error(int(fault), f"scripted {fault}")
        if fault == "slow":
            await asyncio.sleep(state.slow_s)
        if fault == "malformed":
            return Response("{this is not json", media_type="application/json")
        if fault == "nochoices":
            return JSONResponse({"id": "chatcmpl-stub", "object": "chat.completion"})
        if "say" in d:
            replies = d["say"].split("||")
            reply = replies[min(state.successes[key], len(replies) - 1)]
        else:
            reply = state.default_reply(messages) if callable(state.default_reply) else state.default_reply
        with state.lock:
            state.successes[key] += 1
        return JSONResponse(completion_body(reply, body.get("model", "stub")))

    return app


class JudgeServer:
    """``with JudgeServer() as srv: ... srv.base_url ...``: started on a free loopback port, stopped on exit."""

    def __init__(self, state: ScriptState | None = None):
        self.state = state or ScriptState()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted sockets inherit it; without it uvicorn's pre-bound socket adds ~40 ms (Nagle + delayed ACK)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.state), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "JudgeServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub judge server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
