"""The model worker's runtime pieces, shared by its three APIs (LLaVA stream, ECSO stream, OpenAI chat):

* :class:`ModelSlots`: the ``--limit-model-concurrency`` semaphore around model calls, with an honest queue length
  (requests waiting + running);
* :func:`call_model` / :func:`stream_model`: run blocking engine work in a thread while holding a slot. A stream is
  pumped by its own task, so a client that disconnects mid-stream never leaves a slot taken: the endpoint sets the
  stream's stop event, the engine's ``should_stop`` ends generation at the next token, and the slot is released;
* image intake: base64 / data URLs, and http(s) URLs only when allowed, with size caps, a timeout and a refusal of
  loopback and private addresses.
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
    "decode_images",
    "load_image_urls",
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


def decode_images(data: Sequence[str], policy: ImagePolicy, field: str = "images") -> list[Image.Image]:
    """Decode base64 images (blocking; call it in a thread), naming the bad one: ``images[1]: ...``."""
    policy.check_count(len(data))
    out = []
    for i, item in enumerate(data):
        try:
            out.append(decode_base64_image(item, policy.limits))
        except ImageError as exc:
            raise ImageError(f"{field}[{i}]: {exc}") from None
    return out


def check_public_host(host: str) -> None:
    """Refuse a host that is or resolves to a loopback, private, link-local, multicast or reserved address
    (blocking: DNS). The connection itself resolves again, so a DNS answer that changes in between is not caught."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"cannot resolve image host {host!r}: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not addr.is_global or addr.is_multicast:
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


async def load_image_urls(urls: Sequence[str], policy: ImagePolicy, http: httpx.AsyncClient) -> list[Image.Image]:
    """Images of OpenAI ``image_url`` parts: data URLs always, http(s) URLs only when the policy allows them."""
    policy.check_count(len(urls))
    out = []
    for i, url in enumerate(urls):
        try:
            if url.startswith("data:"):
                out.append(await anyio.to_thread.run_sync(decode_base64_image, url, policy.limits))
            elif not policy.allow_urls:
                raise ImageError("http(s) image URLs are not fetched by this worker (start it with "
                                 "--allow-image-urls); send the image as a data: URL")
            else:
                raw = await _fetch(url, policy, http)
                out.append(await anyio.to_thread.run_sync(load_image, raw, policy.limits))
        except ImageError as exc:
            raise ImageError(f"image {i}: {exc}") from None
    return out
