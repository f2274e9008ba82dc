"""The upstream pool against scripted servers (httpx.MockTransport, async): round robin, cool-down, bounded retries
only where nothing was passed on, Retry-After, typed errors naming the server, broken/malformed/cut-off streams,
health probes; and the loop thread that gives blocking callers the same coroutines. The real servers (transformers
serve, our own worker) are in tests/serve/test_remote_worker.py."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from llava.ecso.upstream import MAX_RETRY_AFTER, LoopThread, UpstreamPool
from llava.errors import (
    BackendError,
    BackendTimeoutError,
    ContextLengthError,
    InvalidRequestError,
    UpstreamUnavailableError,
)

A, B, C = "http://a.test/v1", "http://b.test/v1", "http://c.test/v1"
DONE = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


class _Broken(httpx.AsyncByteStream):
    """A body that sends ``parts`` then breaks off (the server died mid-stream)."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    async def __aiter__(self):
        for part in self.parts:
            yield part
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def _sse(*events: object) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


class Servers:
    """Scripted servers by host: ``script[host](request) -> Response`` (or an exception to raise); every request is
    recorded as ``(host, path)``."""

    def __init__(self, **script) -> None:
        self.script, self.seen = script, []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.split(".")[0]
        self.seen.append((host, request.url.path))
        self.auth = request.headers.get("authorization")
        outcome = self.script[host](request)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def hosts(self) -> list[str]:
        return [h for h, _ in self.seen]


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})


def _pool(servers: Servers, urls=(A, B), **kw) -> UpstreamPool:
    return UpstreamPool(list(urls), transport=httpx.MockTransport(servers), api_key="k", **kw)


def run(coro):
    return asyncio.run(coro)


async def _events(pool: UpstreamPool) -> list[dict]:
    return [e async for e in pool.events("/chat/completions", {"stream": True})]


def test_round_robin_over_the_servers_that_are_up() -> None:
    servers = Servers(a=_ok, b=_ok)
    pool = _pool(servers)

    async def four():
        return [await pool.post("/chat/completions", {}) for _ in range(4)]

    run(four())
    assert sorted(servers.hosts()) == ["a", "a", "b", "b"] and pool.healthy and servers.auth == "Bearer k"
    assert [s["requests"] for s in pool.status()] == [2, 2]


def test_a_refused_connection_goes_to_the_next_server_which_is_then_skipped_for_the_cool_down() -> None:
    servers = Servers(a=lambda r: httpx.ConnectError("refused"), b=_ok)
    pool = _pool(servers, cooldown=30)

    async def three():
        return [await pool.post("/chat/completions", {}) for _ in range(3)]

    assert all(r["choices"] for r in run(three()))
    assert servers.hosts().count("a") == 1  # tried once, then skipped while it cools down
    a, b = pool.status()
    assert not a["up"] and "cannot connect" in a["last_error"] and 25 < a["retry_in_s"] <= 30 and b["up"]


def test_5xx_is_retried_elsewhere_at_most_retries_times_then_names_every_server() -> None:
    fail = lambda r: httpx.Response(500, text="exploded")  # noqa: E731
    servers = Servers(a=fail, b=fail, c=fail)
    pool = _pool(servers, urls=(A, B, C), retries=1)
    with pytest.raises(UpstreamUnavailableError) as info:
        run(pool.post("/chat/completions", {}))
    assert len(servers.seen) == 2  # one retry
    message = str(info.value)
    assert message.count("answered HTTP 500: exploded") == 2 and "c.test" not in message  # c was not tried
    assert info.value.status == 503 and info.value.error_code == 7


def test_one_server_5xx_is_a_502_with_its_message() -> None:
    pool = _pool(Servers(a=lambda r: httpx.Response(502, text="bad gateway")), urls=(A,))
    with pytest.raises(BackendError, match=r"upstream http://a.test/v1 answered HTTP 502: bad gateway") as info:
        run(pool.post("/chat/completions", {}))
    assert info.value.status == 502 and info.value.error_code == 1


def test_429_waits_out_retry_after_on_another_server_and_alone_is_a_503() -> None:
    busy = lambda r: httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "slow down"}})  # noqa
    servers = Servers(a=busy, b=_ok)
    pool = _pool(servers)
    run(pool.post("/chat/completions", {}))
    if servers.hosts()[0] == "a":
        assert servers.hosts() == ["a", "b"]
    a = pool.status()[0]
    assert not a["up"] and 2 < a["retry_in_s"] <= 3 and "overloaded (HTTP 429)" in a["last_error"]
    alone = _pool(Servers(a=lambda r: httpx.Response(429, headers={"Retry-After": "100000"})), urls=(A,))
    with pytest.raises(UpstreamUnavailableError, match="overloaded"):
        run(alone.post("/chat/completions", {}))
    assert alone.status()[0]["retry_in_s"] <= MAX_RETRY_AFTER


def test_timeouts_and_4xx_are_not_retried_and_say_whose_fault() -> None:
    servers = Servers(a=lambda r: httpx.ReadTimeout("slow"), b=_ok)
    pool = _pool(servers, timeout=2.0)
    while servers.hosts()[:1] != ["a"]:  # make sure the timed-out request went to a
        servers.seen.clear()
        try:
            run(pool.post("/chat/completions", {}))
        except BackendTimeoutError as exc:
            assert "upstream http://a.test/v1 did not answer within 2 s" in str(exc) and exc.status == 504
    assert servers.hosts() == ["a"] and pool.status()[0]["up"]  # not retried, not marked down: it may be busy
    overflow = {"error": {"message": "This model's maximum context length is 4096 tokens", "code": None}}
    cases = [(400, overflow, ContextLengthError), (400, {"error": {"message": "bad field"}}, InvalidRequestError),
             (401, {"error": {"message": "no key"}}, BackendError), (404, {"error": {"message": "no model"}}, BackendError)]
    for status, body, error in cases:
        servers = Servers(a=lambda r, s=status, b=body: httpx.Response(s, json=b))
        with pytest.raises(error, match="upstream http://a.test/v1") as info:
            run(_pool(servers, urls=(A, B)).post("/chat/completions", {}))
        assert len(servers.seen) == 1 and type(info.value) is error, (status, info.value)


def test_streams_broken_before_their_first_event_move_on_later_ones_raise() -> None:
    servers = Servers(a=lambda r: httpx.Response(200, stream=_Broken()),
                      b=lambda r: httpx.Response(200, content=_sse(_delta("Hel"), _delta("lo"), DONE)))
    pool = _pool(servers)
    for _ in range(2):
        assert [e["choices"][0]["delta"].get("content") for e in run(_events(pool))] == ["Hel", "lo", None]
    cases = [
        (_Broken(_sse(_delta("Hel"))), "broke off its stream after 1 events"),
        (httpx.ByteStream(_sse(_delta("Hel"), "{not json")), "malformed event after 1"),
        (httpx.ByteStream(_sse(_delta("Hel"), _delta("lo"))), r"ended its stream mid-answer \(2 events"),
    ]
    for body, words in cases:
        pool = _pool(Servers(a=lambda r, b=body: httpx.Response(200, stream=b), b=_ok))
        with pytest.raises(BackendError, match=words):
            run(_events(pool))
        assert not pool.status()[0]["up"]  # a broken stream sends the server into its cool-down
    error_event = {"error": {"message": "the prompt is 9000 tokens", "code": "context_length_exceeded"}}
    pool = _pool(Servers(a=lambda r: httpx.Response(200, content=_sse(_delta("a"), error_event))), urls=(A,))
    with pytest.raises(ContextLengthError, match="upstream http://a.test/v1: the prompt is 9000 tokens"):
        run(_events(pool))
    transformers_style = _sse(_delta("a"), {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": {}})
    pool = _pool(Servers(a=lambda r: httpx.Response(200, content=transformers_style)), urls=(A,))
    assert len(run(_events(pool))) == 2  # a finish_reason without [DONE] is a whole answer


def test_all_servers_cooling_down_is_a_503_naming_each_and_a_probe_brings_them_back() -> None:
    state = {"up": False}
    answer = lambda r: _ok(r) if state["up"] else httpx.ConnectError("refused")  # noqa: E731
    pool = _pool(Servers(a=answer, b=answer), cooldown=60)
    assert not run(pool.probe()) and not pool.healthy
    with pytest.raises(UpstreamUnavailableError) as info:
        run(pool.post("/chat/completions", {}))
    assert A in str(info.value) and B in str(info.value) and "skipped for" in str(info.value)
    assert str(pool.unavailable_error()) == str(info.value)
    state["up"] = True
    assert run(pool.probe()) and all(s["up"] for s in pool.status())


def test_a_pool_moves_to_a_new_event_loop_with_new_clients() -> None:
    pool = _pool(Servers(a=_ok, b=_ok))
    run(pool.post("/chat/completions", {}))
    first = [u.client for u in pool.upstreams if u.client is not None]  # kept alive: ids stay unique
    run(pool.post("/chat/completions", {}))
    assert first and not any(u.client is c for u in pool.upstreams for c in first)


def test_loop_thread_runs_coroutines_and_iterates_for_blocking_callers() -> None:
    loop = LoopThread("test-loop")

    async def numbers():
        for i in range(5):
            await asyncio.sleep(0)
            yield i

    assert loop.run(asyncio.sleep(0, result="x")) == "x"
    assert list(loop.iterate(numbers())) == [0, 1, 2, 3, 4]
    stopped, seen = numbers(), []
    for i in loop.iterate(stopped, should_stop=lambda: len(seen) >= 2):
        seen.append(i)
    assert seen == [0, 1]
    closed = []
    loop.close(lambda: asyncio.sleep(0, result=closed.append(1)))
    assert closed == [1] and loop.loop.is_closed()
    t = time.monotonic()
    loop.close()  # twice is fine
    assert time.monotonic() - t < 1
