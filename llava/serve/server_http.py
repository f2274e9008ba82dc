"""The HTTP side of running a service with uvicorn: a deadline for each request's head (slowloris), the keep-alive
timeout and connection limit every service runs with, and access lines without client addresses (unless asked)
and without query strings. :func:`llava.serve.server.run_app` uses them."""
from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT", "KEEP_ALIVE_TIMEOUT", "MAX_CONNECTIONS", "RedactQueryFilter", "HeaderTimeoutProtocol",
           "PERIODIC_PATHS", "PeriodicAccessFilter", "uvicorn_log_config"]

logger = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers (slowloris)
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection is kept
MAX_CONNECTIONS = 1024  # concurrent connections (and requests) per service; beyond it uvicorn answers 503


class RedactQueryFilter(logging.Filter):
    """uvicorn access lines without query strings (a key sent by mistake as ``?api_key=...`` stays out of the
    log): the path keeps ``?<redacted>`` in their place."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that has not sent a whole
    request head ``header_timeout`` seconds after it opened (or after its previous answer) is closed. uvicorn's
    keep-alive timeout only covers a silent connection; a client sending one header byte at a time held it
    forever."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection that sent no complete request head within %g s", self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


# Paths that services and the launcher call on a timer (heartbeats, health and status probes): their successful
# access lines are logged at debug level only, so they do not bury what a person needs to see.
PERIODIC_PATHS = frozenset({"/receive_heart_beat", "/health", "/worker_get_status", "/list_models"})


class PeriodicAccessFilter(logging.Filter):
    """Drops uvicorn's access line of a successful request to one of ``PERIODIC_PATHS`` unless the service logs at
    debug level; errors on those paths, and every other request, are kept."""

    def __init__(self, level: str = "info") -> None:
        super().__init__()
        self.debug = level.lower() == "debug"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if self.debug or len(args) < 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        return not (path in PERIODIC_PATHS and isinstance(status, int) and status < 400)


def uvicorn_log_config(log_ips: bool = False, log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration; without ``log_ips`` its access lines leave out the client address; periodic
    requests' access lines only at debug level (:class:`PeriodicAccessFilter`); query strings never
    (:class:`RedactQueryFilter`)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if not log_ips:
        config["formatters"]["access"]["fmt"] = '%(levelprefix)s "%(request_line)s" %(status_code)s'
    filters = config.setdefault("filters", {})
    filters["periodic"] = {"()": PeriodicAccessFilter, "level": log_level}
    filters["redact_query"] = {"()": RedactQueryFilter}
    config["handlers"]["access"]["filters"] = ["periodic", "redact_query"]
    return config
