"""Which workers a controller lets in: the checks of ``/register_worker`` before a worker joins the registry, and
the one status fetch a registration without ``worker_status`` makes.

* never the controller's own address (a request would loop back into the controller until it timed out);
* without an API key, only worker URLs on ``allowed_worker_hosts`` (default: loopback), and no registration that
  replaces a live worker with a different model list (anyone who can reach a keyless controller can register; these
  keep it from taking over a worker's name or being aimed at other machines);
* the status fetch goes to ``<worker>/worker_get_status`` only, is bounded in time and size, and its failures name
  the cause, never the body that came back (the controller is no proxy that reflects what an arbitrary URL says).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio
import httpx
from pydantic import ValidationError

from llava.errors import BackendError, BackendTimeoutError, ConflictError, InvalidRequestError
from llava.http_client import auth_headers, is_loopback
from llava.serve.dispatch import WorkerRegistry
from llava.serve.protocol.llava import WorkerStatus

__all__ = ["LOOPBACK_HOSTS", "MAX_STATUS_BYTES", "parse_allowed_hosts", "check_worker_url", "check_replacement",
           "fetch_status"]

LOOPBACK_HOSTS = "loopback"  # the word in --allowed-worker-hosts for every loopback address and "localhost"
MAX_STATUS_BYTES = 1024 * 1024  # a worker's /worker_get_status answer, at most
_WILDCARDS = ("0.0.0.0", "::", "")


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--allowed-worker-hosts``: comma-separated entries, each ``loopback``, an IP address, a network
    (``10.0.0.0/8``) or a host name (compared as written, case-insensitively; no DNS lookup)."""
    entries = tuple(e.strip().lower() for e in text.split(",") if e.strip())
    if not entries:
        raise ValueError(f"--allowed-worker-hosts needs at least one entry, got {text!r}")
    for entry in entries:
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"--allowed-worker-hosts: {entry!r} is not a network ({exc})") from None
    return entries


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowed:
        if entry == LOOPBACK_HOSTS:
            if is_loopback(host):
                return True
        elif "/" in entry:
            if address is not None and address in ipaddress.ip_network(entry, strict=False):
                return True
        elif entry.strip("[]") == host or (address is not None and _same_address(entry, address)):
            return True
    return False


def _same_address(entry: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(entry.strip("[]")) == address
    except ValueError:
        return False


def _is_own_address(host: str, port: int, own_host: str, own_port: int) -> bool:
    if port != own_port:
        return False
    host, own = host.lower().strip("[]"), own_host.lower().strip("[]")
    return host == own or is_loopback(host) and (is_loopback(own) or own in _WILDCARDS)


def check_worker_url(url: str, *, own_host: str, own_port: int, keyed: bool, allowed: Sequence[str]) -> None:
    """Refuse (``InvalidRequestError``, 400) the controller's own address, and on a keyless controller a host not
    in ``allowed``. ``url`` is already a validated base URL (:func:`~llava.serve.protocol.llava.worker_base_url`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if _is_own_address(host, port, own_host, own_port):
        raise InvalidRequestError(f"worker {url} is this controller's own address: a controller cannot be its own "
                                  f"worker")
    if not keyed and not _host_allowed(host, allowed):
        raise InvalidRequestError(f"worker {url}: host {host!r} is not in --allowed-worker-hosts "
                                  f"({','.join(allowed)}); a controller without an API key accepts workers only there")


def check_replacement(registry: WorkerRegistry, name: str, status: WorkerStatus, *, keyed: bool,
                      expiration: float) -> None:
    """On a keyless controller, a registration may not change a live worker's model list (409): a process that
    could register any name would otherwise take over another worker's traffic or hide its models. The live
    worker's own re-registration (same models) is fine; a worker restarted with other models waits until its old
    entry expires (``expiration`` seconds without heartbeats), or the controller gets a key."""
    info = registry.get(name)
    if keyed or info is None or sorted(info.model_names) == sorted(status.model_names):
        return
    raise ConflictError(f"worker {name} is registered with models {info.model_names} and still heart-beating; a "
                        f"registration with models {status.model_names} cannot replace it on a controller without "
                        f"an API key (it expires {expiration:g} s after its last heartbeat)")


async def fetch_status(http: httpx.AsyncClient, worker: str, *, api_key: str | None, timeout: float) -> WorkerStatus:
    """``POST <worker>/worker_get_status``, within ``timeout`` seconds in all and :data:`MAX_STATUS_BYTES`. A bad
    answer is an ``InvalidRequestError`` naming the cause (status, size, the invalid fields), never its content;
    an unreachable worker a ``BackendError``."""
    url = f"{worker}/worker_get_status"
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async with http.stream("POST", url, json={}, headers=auth_headers(api_key), timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise InvalidRequestError(f"worker {worker} answered HTTP {resp.status_code} to its status "
                                              f"request (/worker_get_status)")
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_STATUS_BYTES:
                        raise InvalidRequestError(f"worker {worker} sent a status of more than {MAX_STATUS_BYTES} "
                                                  f"bytes")
    except TimeoutError as exc:
        raise BackendTimeoutError(f"worker {worker} did not send its status within {timeout:g} s") from exc
    except httpx.TimeoutException as exc:
        raise BackendTimeoutError(f"worker {worker} did not send its status within {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot get the status of worker {worker}: {type(exc).__name__}") from exc
    try:
        return WorkerStatus.model_validate_json(bytes(body))
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(the body)" for e in exc.errors()})
        raise InvalidRequestError(f"worker {worker} sent a status that is not a valid worker status (JSON object "
                                  f"with model_names, speed, queue_length); invalid: {', '.join(fields)}") from None
