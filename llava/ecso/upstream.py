"""The upstreams of a model served elsewhere: one or more OpenAI-compatible servers (vLLM, SGLang,
``transformers serve``, another ECSO worker) serving the same model, reached with async HTTP clients.

* **Round robin** over the upstreams that are up. One that fails (connection refused, 5xx, 429, a broken stream)
  is skipped for a cool-down (a 429's ``Retry-After`` when it gives one), then tried again; a health probe
  (:meth:`UpstreamPool.probe`, before each heartbeat of a worker) brings it back as soon as it answers.
* **Bounded retries where it is safe**: a request goes to the next upstream, at most ``retries`` more times, when
  nothing of its answer has been passed on: the connection was refused, the answer was a 5xx or a 429, or a stream
  broke before its first event. Never after part of an answer was passed on, never on a timeout waiting for an
  answer (the upstream may still be working on it), never on a 4xx.
* **Typed errors naming the upstream**: :class:`~llava.errors.UpstreamUnavailableError` (503) when no upstream can
  take the request, :class:`~llava.errors.BackendError` (502) for a failed, malformed or broken answer,
  :class:`~llava.errors.BackendTimeoutError` (504) for a timeout; a 4xx is the request's fault (400, context length)
  except 401/403/404, which say the upstream is not set up for us (502).

A pool is used from one event loop at a time (its clients are made there, on first use, and made again on another
loop). :class:`LoopThread` runs a private loop in a thread for blocking callers (command-line runs).
"""
from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from llava.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    ContextLengthError,
    ECSOError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamUnavailableError,
)
from llava.http_client import aiter_sse_data, auth_headers, error_from_response, httpx, is_loopback_url

__all__ = ["Upstream", "UpstreamPool", "LoopThread"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 5.0  # seconds to open a connection: a host that does not answer is skipped quickly
PROBE_TIMEOUT = 5.0
MAX_RETRY_AFTER = 30.0  # a 429's Retry-After longer than this is capped (the upstream is cooling down that long)
_RETRYABLE = (502, 503, 504)


@dataclass
class Upstream:
    """One server: its base URL (up to ``/v1``) and health. ``down_until``: monotonic time before which it is
    skipped; ``error``: why it was last marked down."""

    url: str
    down_until: float = 0.0
    error: str | None = None
    failures: int = 0
    requests: int = 0
    client: Any = field(default=None, repr=False)

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "up": self.up(now), "requests": self.requests}
        if self.error is not None:
            out["last_error"] = self.error
        if not self.up(now):
            out["retry_in_s"] = round(self.down_until - now, 1)
        return out


class _Attempt(Exception):
    """A failure after which the request may go to the next upstream (nothing was passed on)."""

    def __init__(self, error: ECSOError, cooldown: float | None = None) -> None:
        super().__init__(str(error))
        self.error, self.cooldown = error, cooldown


def _retry_after(resp: Any) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when is not None else None


def _answer_error(upstream: str, status: int, body: bytes) -> ECSOError:
    """The typed error for a non-2xx answer, naming the upstream: the request's fault (4xx: invalid, context
    length), or the upstream's (its setup: 401/403/404; its failure: 5xx, 429)."""
    err = error_from_response(status, body)
    if isinstance(err, AuthError) or status in (401, 403):
        return BackendError(f"upstream {upstream} refused our API key ({err}); the key comes from $OPENAI_API_KEY "
                            "(or the variable --openai-api-key-env names)")
    if isinstance(err, ModelNotFoundError) or status == 404:
        return BackendError(f"upstream {upstream} does not know the model or path ({err}): check --openai-model "
                            "and --openai-base-url (up to /v1)")
    if status >= 500 or status == 429 or not isinstance(err, InvalidRequestError):
        return BackendError(f"upstream {upstream} answered {err}")
    if "maximum context length" in str(err).lower():
        return ContextLengthError(f"upstream {upstream}: {err}")
    return type(err)(f"upstream {upstream}: {err}")


class UpstreamPool:
    """Upstreams of one model (see the module docstring). ``api_key``: sent as a bearer key (never logged);
    ``timeout``: seconds to wait for an answer and between pieces of a stream; ``retries``: more upstreams to try
    for one request when it is safe; ``cooldown``: seconds a failed upstream is skipped; ``max_connections``: per
    upstream; ``transport``: an httpx async transport (tests)."""

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 2, cooldown: float = 10.0, max_connections: int = 64,
                 transport: Any = None) -> None:
        if not urls:
            raise InvalidRequestError("an upstream pool needs at least one base URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise InvalidRequestError(f"an upstream base URL must be http(s), got {url!r}")
        if retries < 0 or not cooldown > 0 or not timeout > 0:
            raise InvalidRequestError(f"retries must be >= 0 and cooldown, timeout > 0 seconds (got {retries}, "
                                      f"{cooldown}, {timeout})")
        self.upstreams = [Upstream(url.rstrip("/")) for url in urls]
        self.timeout, self.retries, self.cooldown = timeout, retries, cooldown
        self._headers = auth_headers(api_key)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._transport = transport
        self._turn = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- health -----------------------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [u.url for u in self.upstreams]

    @property
    def healthy(self) -> bool:
        """Whether some upstream is up (not cooling down after a failure)."""
        now = time.monotonic()
        return any(u.up(now) for u in self.upstreams)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [u.status(now) for u in self.upstreams]

    def _mark_down(self, upstream: Upstream, error: ECSOError, cooldown: float | None = None) -> None:
        seconds = min(cooldown, MAX_RETRY_AFTER) if cooldown is not None else self.cooldown
        upstream.down_until, upstream.error = time.monotonic() + seconds, str(error)
        upstream.failures += 1
        logger.warning("upstream %s is skipped for %g s: %s", upstream.url, seconds, error)

    def _mark_up(self, upstream: Upstream) -> None:
        if upstream.failures:
            logger.info("upstream %s answers again", upstream.url)
        upstream.down_until, upstream.failures = 0.0, 0

    async def probe(self) -> bool:
        """Ask every upstream for its model list (concurrently); mark each up or down. Whether some is up."""
        async def one(upstream: Upstream) -> None:
            try:
                resp = await self._client(upstream).get("/models", timeout=PROBE_TIMEOUT)
            except httpx.HTTPError as exc:
                self._mark_down(upstream, UpstreamUnavailableError(f"{type(exc).__name__}: {exc}"))
                return
            if resp.status_code >= 400:
                self._mark_down(upstream, _answer_error(upstream.url, resp.status_code, resp.content))
            else:
                self._mark_up(upstream)

        await asyncio.gather(*(one(u) for u in self.upstreams))
        return self.healthy

    # ---- requests ---------------------------------------------------------------------------------------------
    def _client(self, upstream: Upstream) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # clients belong to the loop that made them: a new loop gets its own
            for u in self.upstreams:
                u.client = None
            self._loop = loop
        if upstream.client is None:
            timeout = httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout))
            # Proxy settings apply to remote upstreams, never to this machine's own servers.
            upstream.client = httpx.AsyncClient(base_url=upstream.url, headers=self._headers, timeout=timeout,
                                                limits=self._limits, transport=self._transport,
                                                trust_env=not is_loopback_url(upstream.url))
        return upstream.client

    def _candidates(self) -> list[Upstream]:
        """The upstreams to try, in turn: those up, round robin from the next one."""
        now = time.monotonic()
        up = [u for u in self.upstreams if u.up(now)]
        if not up:
            return []
        start = next(self._turn) % len(up)
        return up[start:] + up[:start]

    def unavailable_error(self) -> ECSOError:
        """The error for a request that finds every upstream cooling down, naming each and why."""
        return self._unavailable([])

    def _unavailable(self, tried: list[tuple[Upstream, ECSOError]]) -> ECSOError:
        if len(tried) == 1 and not isinstance(tried[0][1], UpstreamUnavailableError):
            return tried[0][1]  # one upstream's own answer says more than "unavailable"
        parts = [str(e) for _, e in tried]  # each names its server
        now = time.monotonic()
        parts += [f"{u.url}: skipped for {u.down_until - now:.1f} s more after: {u.error}"
                  for u in self.upstreams if not u.up(now) and u not in [t for t, _ in tried]]
        return UpstreamUnavailableError("no upstream could take the request (" + "; ".join(parts) + ")")

    async def _with_failover(self, attempt: Callable[[Upstream], Awaitable[T]]) -> T:
        tried: list[tuple[Upstream, ECSOError]] = []
        for upstream in self._candidates()[: self.retries + 1]:
            upstream.requests += 1
            try:
                result = await attempt(upstream)
            except _Attempt as failed:
                self._mark_down(upstream, failed.error, failed.cooldown)
                tried.append((upstream, failed.error))
                continue
            self._mark_up(upstream)
            return result
        raise self._unavailable(tried)

    async def _open(self, upstream: Upstream, path: str, body: dict[str, Any], stream: bool) -> Any:
        """Send the request; a 2xx response (open when ``stream``), or :class:`_Attempt` / a typed error."""
        client = self._client(upstream)
        try:
            resp = await client.send(client.build_request("POST", path, json=body), stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Attempt(UpstreamUnavailableError(f"upstream {upstream.url}: cannot connect "
                                                    f"({type(exc).__name__}: {exc})")) from None
        except httpx.TimeoutException:
            raise BackendTimeoutError(f"upstream {upstream.url} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _Attempt(BackendError(f"upstream {upstream.url} failed before answering: "
                                        f"{type(exc).__name__}: {exc}")) from None
        if resp.status_code < 400:
            return resp
        content = await resp.aread()
        await resp.aclose()
        err = _answer_error(upstream.url, resp.status_code, content)
        if resp.status_code == 429:
            raise _Attempt(UpstreamUnavailableError(f"upstream {upstream.url} is overloaded (HTTP 429): {err}"),
                           _retry_after(resp))
        if resp.status_code >= 500:
            raise _Attempt(err)
        raise err

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to a healthy upstream; its JSON answer."""
        async def attempt(upstream: Upstream) -> dict[str, Any]:
            resp = await self._open(upstream, path, body, stream=False)
            try:
                answer = resp.json()
            except ValueError:
                raise _Attempt(BackendError(f"upstream {upstream.url} answered with something that is not "
                                            "JSON")) from None
            if not isinstance(answer, dict):
                raise _Attempt(BackendError(f"upstream {upstream.url} answered with JSON that is not an object"))
            return answer

        return await self._with_failover(attempt)

    async def get(self, path: str) -> dict[str, Any]:
        """GET JSON from a healthy upstream (e.g. ``/models``)."""
        async def attempt(upstream: Upstream) -> dict[str, Any]:
            try:
                resp = await self._client(upstream).get(path)
            except httpx.HTTPError as exc:
                raise _Attempt(UpstreamUnavailableError(f"upstream {upstream.url}: {type(exc).__name__}: {exc}"))
            if resp.status_code >= 400:
                raise _Attempt(_answer_error(upstream.url, resp.status_code, resp.content))
            try:
                return dict(resp.json())
            except (ValueError, TypeError):
                raise _Attempt(BackendError(f"upstream {upstream.url} answered {path} with something that is not "
                                            "a JSON object")) from None

        return await self._with_failover(attempt)

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST and yield the JSON object of each server-sent event of a chat completion stream. A stream that
        breaks before its first event goes to the next upstream; after that, a break, a malformed event, an error
        event or an end without ``finish_reason`` or ``[DONE]`` (an answer cut off) raises, naming the upstream."""
        for_later: list[tuple[Upstream, Any]] = []

        async def attempt(upstream: Upstream) -> Any:
            resp = await self._open(upstream, path, body, stream=True)
            lines = aiter_sse_data(resp.aiter_bytes())
            try:
                first = await lines.__anext__()
            except StopAsyncIteration:
                await resp.aclose()
                raise _Attempt(BackendError(f"upstream {upstream.url} ended its stream before sending anything"))
            except httpx.TimeoutException:
                await resp.aclose()
                raise BackendTimeoutError(f"upstream {upstream.url} sent nothing for {self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                await resp.aclose()
                raise _Attempt(BackendError(f"upstream {upstream.url} broke off its stream before its first event: "
                                            f"{type(exc).__name__}: {exc}")) from None
            for_later.append((upstream, resp))
            return first, lines

        first, lines = await self._with_failover(attempt)
        upstream, resp = for_later[-1]
        try:
            async for event in _checked_events(upstream, first, lines, self.timeout):
                yield event
        except BackendError as exc:
            if not isinstance(exc, BackendTimeoutError):
                self._mark_down(upstream, exc)
            raise
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled consumer (a client that left) still ends the request
                await resp.aclose()

    async def aclose(self) -> None:
        clients = [u.client for u in self.upstreams if u.client is not None]
        for u in self.upstreams:
            u.client = None
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


async def _checked_events(upstream: Upstream, first: str, lines: AsyncIterator[str],
                          timeout: float) -> AsyncIterator[dict[str, Any]]:
    """The stream's events from its first ``data``; raises on a malformed, error or cut-off stream."""
    where, count, finished, data = upstream.url, 0, False, first
    try:
        while True:
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise BackendError(f"upstream {where} sent a malformed event after {count}: {data[:120]!r}") from None
            if not isinstance(event, dict):
                raise BackendError(f"upstream {where} sent an event that is not a JSON object: {data[:120]!r}")
            if event.get("error"):
                err = error_from_response(502, data.encode())
                if isinstance(err, InvalidRequestError):  # the request's fault, as the upstream says
                    raise type(err)(f"upstream {where}: {err}")
                raise BackendError(f"upstream {where} sent an error event after {count} events: {err}")
            finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                       for c in event.get("choices") or [])
            count += 1
            yield event
            try:
                data = await lines.__anext__()
            except StopAsyncIteration:
                break
    except httpx.TimeoutException:
        raise BackendTimeoutError(f"upstream {where} sent nothing for {timeout:g} s after {count} events") from None
    except httpx.HTTPError as exc:
        raise BackendError(f"upstream {where} broke off its stream after {count} events: {type(exc).__name__}: "
                           f"{exc}") from None
    if not finished:
        raise BackendError(f"upstream {where} ended its stream mid-answer ({count} events, no finish_reason and no "
                           "[DONE])")


class LoopThread:
    """An event loop in a daemon thread, for blocking callers of async code: :meth:`run` a coroutine,
    :meth:`iterate` an async iterator, :meth:`close` when done."""

    def __init__(self, name: str = "ecso-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Awaitable[T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T]) -> T:
        if _in_loop(self.loop):
            raise RuntimeError("LoopThread.run called from its own loop (it would wait for itself)")
        return self.submit(coro).result()

    def iterate(self, items: AsyncIterator[T], should_stop: Callable[[], bool] | None = None) -> Iterator[T]:
        """The items of ``items`` (produced on the loop); ``should_stop`` or leaving early closes it."""
        try:
            while should_stop is None or not should_stop():
                try:
                    yield self.run(items.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            closer = getattr(items, "aclose", None)
            if closer is not None:
                self.run(closer())

    def close(self, final: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Run ``final()`` on the loop (e.g. closing clients), then stop the loop and its thread."""
        if self.loop.is_closed():
            return
        if final is not None:
            self.run(final())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
