"""The model worker's runtime pieces, shared by its three APIs (LLaVA stream, ECSO stream, OpenAI chat):

* :class:`ModelSlots`: the ``--limit-model-concurrency`` semaphore around model calls, with an honest queue length
  (requests waiting + running);
* :func:`call_model` / :func:`stream_model`: run blocking engine work in a thread while holding a slot. A stream is
  pumped by its own task, so a client that disconnects mid-stream never leaves a slot taken: the endpoint sets the
  stream's stop event, the engine's ``should_stop`` ends generation at the next token, and the slot is released;
* image intake (:class:`ImageIntake`): base64 / data URLs, and http(s) URLs only when allowed, with size caps, one
  total deadline and a refusal of loopback and private addresses; bounded decoding concurrency, each image reduced to
  the model's working size once decoded.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from PIL import Image

from llava.errors import ImageError, InvalidRequestError
from llava.mm_utils import ImageLimits, decode_base64_image, load_image

__all__ = [
    "ModelSlots",
    "call_model",
    "stream_model",
    "ImagePolicy",
    "ImageIntake",
    "check_public_host",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


# ------------------------------------------------------------------------------------------------------- slots


class ModelSlots:
    """At most ``limit`` model jobs at once; ``queue_length`` = jobs waiting for a slot + jobs running. Create it
    inside the event loop that uses it (the app's lifespan)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit_model_concurrency must be at least 1, got {limit}")
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.waiting = 0
        self.running = 0

    @property
    def queue_length(self) -> int:
        return self.waiting + self.running

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()


async def call_model(slots: ModelSlots, fn: Callable[[], T]) -> T:
    """Run blocking ``fn`` in a thread while holding a slot. A cancelled caller still waits for the thread (it
    cannot be stopped), so the slot is held exactly as long as the model works."""
    async with slots.slot():
        return await anyio.to_thread.run_sync(fn)


@dataclass
class _Failure:
    exc: BaseException


async def _pump(slots: ModelSlots, make: Callable[[], Iterator[Any]], queue: asyncio.Queue,
                stop: threading.Event | None) -> None:
    try:
        async with slots.slot():
            items = await anyio.to_thread.run_sync(make)
            while True:
                if stop is not None and stop.is_set():  # the consumer left: stop pulling, end the iterator
                    close = getattr(items, "close", None)
                    if close is not None:
                        await anyio.to_thread.run_sync(close)
                    queue.put_nowait(_DONE)
                    return
                item = await anyio.to_thread.run_sync(next, items, _DONE)
                queue.put_nowait(item)
                if item is _DONE:
                    return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        queue.put_nowait(_Failure(exc))
        if not isinstance(exc, Exception):
            raise


def stream_model(slots: ModelSlots, make: Callable[[], Iterator[T]], jobs: set[asyncio.Task],
                 stop: threading.Event | None = None) -> AsyncIterator[T]:
    """Items of the blocking iterator ``make()``, produced in a thread under a slot by a task of its own (kept in
    ``jobs`` until it ends). An exception of the iterator is raised in the consumer.

    The consumer may stop at any time. Without ``stop`` the task still runs the iterator to its end, then releases
    the slot. With ``stop`` (set by the consumer when its client goes away; the iterator's own ``should_stop``
    should poll it too) the task stops pulling items at once, closes the iterator and releases the slot."""
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(_pump(slots, make, queue, stop), name="model-stream")
    jobs.add(task)
    task.add_done_callback(jobs.discard)

    async def consume() -> AsyncIterator[T]:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    return consume()


# ------------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class ImagePolicy:
    """What the worker accepts as images. ``allow_urls``: fetch http(s) image URLs (OpenAI API);
    ``allow_private_urls``: also from loopback, private, link-local and reserved addresses."""

    limits: ImageLimits = ImageLimits()
    max_images: int = 8
    allow_urls: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 10.0

    def check_count(self, n: int) -> None:
        if n > self.max_images:
            raise InvalidRequestError(f"{n} images in one request; this worker accepts at most {self.max_images} "
                                      "(--max-images-per-request)")


class ImageIntake:
    """A worker's images in: decoded in threads, at most ``concurrency`` at once (a decoded image is the largest
    transient allocation of a request), each reduced by ``fit`` (the model's working size) as soon as it is
    decoded, so a request holds no more than its images at that size. Create it inside the app's event loop."""

    def __init__(self, policy: ImagePolicy, fit: Callable[[Image.Image], Image.Image] = lambda img: img,
                 concurrency: int = 2) -> None:
        self.policy, self.fit = policy, fit
        self.limiter = anyio.CapacityLimiter(concurrency)

    def _decode_fit(self, data: str | bytes) -> Image.Image:
        if isinstance(data, bytes):
            return self.fit(load_image(data, self.policy.limits))
        return self.fit(decode_base64_image(data, self.policy.limits))

    async def decode(self, data: str | bytes, label: str) -> Image.Image:
        """One image (base64 / data URL text, or raw bytes), its errors prefixed with ``label``."""
        try:
            return await anyio.to_thread.run_sync(self._decode_fit, data, limiter=self.limiter)
        except ImageError as exc:
            raise ImageError(f"{label}: {exc}") from None

    async def decode_all(self, data: Sequence[str], field: str = "images") -> list[Image.Image]:
        """Decode base64 images, naming the bad one: ``images[1]: ...``."""
        self.policy.check_count(len(data))
        return [await self.decode(item, f"{field}[{i}]") for i, item in enumerate(data)]

    async def load_urls(self, urls: Sequence[str], http: httpx.AsyncClient) -> list[Image.Image]:
        """Images of OpenAI ``image_url`` parts: data URLs always, http(s) URLs only when the policy allows them.
        Every http(s) URL is fetched at once, all of them within one total deadline of ``url_timeout`` seconds
        (a server dripping bytes cannot stretch it), before any is decoded."""
        policy = self.policy
        policy.check_count(len(urls))
        fetched: dict[int, bytes] = {}
        remote = [i for i, url in enumerate(urls) if not url.startswith("data:")]
        if remote and not policy.allow_urls:
            raise ImageError(f"image {remote[0]}: http(s) image URLs are not fetched by this worker (start it with "
                             "--allow-image-urls); send the image as a data: URL")

        async def fetch(i: int) -> None:
            try:
                fetched[i] = await _fetch(urls[i], policy, http)
            except ImageError as exc:
                raise ImageError(f"image {i}: {exc}") from None

        if remote:
            try:
                with anyio.fail_after(policy.url_timeout):
                    async with anyio.create_task_group() as tg:
                        for i in remote:
                            tg.start_soon(fetch, i)
            except TimeoutError:
                slow = [i for i in remote if i not in fetched]
                raise ImageError(f"fetching image(s) {slow} took longer than {policy.url_timeout:g} s in total "
                                 "(--image-url-timeout)") from None
            except BaseExceptionGroup as group:  # the first failure names its image; the others were cancelled
                raise next(e for e in _leaves(group) if isinstance(e, ImageError)) from None
        return [await self.decode(fetched[i] if i in fetched else url, f"image {i}") for i, url in enumerate(urls)]


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to: IPv4-mapped (``::ffff:a.b.c.d``),
    IPv4-translated (``::ffff:0:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64 (``64:ff9b::/96``,
    ``64:ff9b:1::/48``), 6to4 (``2002::/16``) and Teredo (server and client)."""
    value = int(addr)
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    out = []
    if addr.ipv4_mapped is not None:
        out.append(addr.ipv4_mapped)
    if value >> 32 == 0xFFFF0000 or value >> 32 == 0:  # ::ffff:0:a.b.c.d, ::a.b.c.d
        out.append(low)
    if addr in _NAT64 or addr in _NAT64_LOCAL:
        out.append(low)
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)
    return out


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not addr.is_global or addr.is_multicast:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        return all(_public(v4) for v4 in _embedded_ipv4(addr))
    return True


def check_public_host(host: str) -> None:
    """Refuse a host that is or resolves to a loopback, private, link-local, multicast or reserved address, also
    one embedded in an IPv6 address (``::127.0.0.1``, ``64:ff9b::7f00:1``, ``2002:7f00:1::1``,
    ``::ffff:0:7f00:1``) (blocking: DNS). The connection itself resolves again, so a DNS answer that changes in
    between is not caught."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"cannot resolve image host {host!r}: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not _public(addr):
            raise ImageError(f"image host {host!r} resolves to the non-public address {addr}; refused (start the "
                             "worker with --allow-private-image-urls to allow it)")


async def _fetch(url: str, policy: ImagePolicy, http: httpx.AsyncClient, redirects: int = 3) -> bytes:
    limit = policy.limits.max_bytes
    for _hop in range(redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image URL must be http(s) with a host, got {url[:200]!r}")
        if not policy.allow_private_urls:
            await anyio.to_thread.run_sync(check_public_host, parts.hostname)
        try:
            async with http.stream("GET", url, timeout=policy.url_timeout, follow_redirects=False) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    url = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code >= 400:
                    raise ImageError(f"fetching image {url[:200]} failed: HTTP {resp.status_code}")
                data = bytearray()
                async for block in resp.aiter_bytes():
                    data += block
                    if len(data) > limit:
                        raise ImageError(f"image at {url[:200]} is over the limit of {limit} bytes")
                return bytes(data)
        except httpx.TimeoutException:
            raise ImageError(f"fetching image {url[:200]} timed out after {policy.url_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot fetch image {url[:200]}: {type(exc).__name__}: {exc}") from None
    raise ImageError(f"image URL {url[:200]} redirects more than {redirects} times")
