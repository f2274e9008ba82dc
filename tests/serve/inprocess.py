"""Test helper: serve an ASGI app (e.g. a worker app on an already loaded model) over loopback HTTP from a thread of
this process, so its answers can be compared with the in-process objects it wraps.

    with serving(create_app(config, backend=backend)) as url:
        httpx.post(f"{url}/worker_get_status")
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

__all__ = ["serving"]


@contextmanager
def serving(app, startup_timeout: float = 20.0) -> Iterator[str]:
    """``app`` on a free 127.0.0.1 port until the block ends; yields its base URL. The server must stop cleanly."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "app did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()
