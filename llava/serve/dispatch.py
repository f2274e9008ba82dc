"""The controller's worker registry and dispatch methods, without HTTP: workers by name (their base URL) with
their models, speed, queue length and health, expiry of silent workers, and how one worker is picked among the
healthy ones serving a model (``shortest_queue``, ``lottery``). A worker is unhealthy while its heartbeats say its
model cannot answer (a remote model whose servers are down); it stays registered and gets requests again once a
heartbeat says it is healthy."""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from llava.serve.protocol.llava import WorkerStatus

__all__ = ["WorkerInfo", "WorkerRegistry", "DispatchMethod", "shortest_queue", "lottery", "DISPATCH_METHODS",
           "get_dispatch_method"]


@dataclass
class WorkerInfo:
    name: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float  # clock() time
    healthy: bool = True
    timeouts: int = 0  # requests in a row that timed out


class WorkerRegistry:
    """Workers by name (their base URL). Not thread-safe: the controller touches it from its event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._clock = clock

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def names(self) -> list[str]:
        return list(self._workers)

    def get(self, name: str) -> WorkerInfo | None:
        return self._workers.get(name)

    def register(self, name: str, status: WorkerStatus, check_heart_beat: bool) -> WorkerInfo:
        info = WorkerInfo(
            name, list(status.model_names), status.speed, status.queue_length, check_heart_beat, self._clock(),
            status.healthy is not False,
        )
        self._workers[name] = info
        return info

    def remove(self, name: str) -> bool:
        return self._workers.pop(name, None) is not None

    def heart_beat(self, name: str, queue_length: int, healthy: bool = True) -> bool:
        info = self._workers.get(name)
        if info is None:
            return False
        info.queue_length, info.healthy = queue_length, healthy
        info.last_heart_beat = self._clock()
        return True

    def timed_out(self, name: str) -> int:
        """Count a timed-out request against a worker; the count in a row (0 for an unknown worker)."""
        info = self._workers.get(name)
        if info is None:
            return 0
        info.timeouts += 1
        return info.timeouts

    def answered(self, name: str) -> None:
        info = self._workers.get(name)
        if info is not None:
            info.timeouts = 0

    def expire(self, expiration: float) -> list[str]:
        """Remove and return the workers silent for more than ``expiration`` seconds. Every worker expires:
        ``check_heart_beat: false`` (LLaVA's flag) is kept for the protocol but exempts no one, or a registration
        that never heart-beats would stay forever."""
        now = self._clock()
        stale = [w.name for w in self._workers.values() if now - w.last_heart_beat > expiration]
        for name in stale:
            del self._workers[name]
        return stale

    def models(self) -> list[str]:
        return sorted({m for w in self._workers.values() for m in w.model_names})

    def candidates(self, model: str) -> list[WorkerInfo]:
        """The healthy workers serving ``model``."""
        return [w for w in self._workers.values() if model in w.model_names and w.healthy]

    def unhealthy(self, model: str) -> list[str]:
        """The workers serving ``model`` whose model cannot answer now."""
        return [w.name for w in self._workers.values() if model in w.model_names and not w.healthy]

    def total_status(self) -> WorkerStatus:
        workers = self._workers.values()
        return WorkerStatus.model_construct(  # sums of validated values: a sum may pass a single worker's bounds
            model_names=self.models(),
            speed=sum(w.speed for w in workers),
            queue_length=sum(w.queue_length for w in workers),
        )


DispatchMethod = Callable[[Sequence[WorkerInfo], random.Random], WorkerInfo]


def shortest_queue(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """Lowest ``queue_length / speed`` (ties at random). The winner's queue grows by one until its next heartbeat
    reports the real length, so a burst of requests spreads over the workers."""
    load = [w.queue_length / w.speed if w.speed > 0 else math.inf for w in workers]
    best = min(load)
    chosen = rng.choice([w for w, q in zip(workers, load) if q == best])
    chosen.queue_length += 1
    return chosen


def lottery(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """Random, weighted by ``speed`` (uniform when every speed is 0)."""
    weights = [w.speed for w in workers]
    if sum(weights) <= 0:
        return rng.choice(list(workers))
    return rng.choices(list(workers), weights=weights)[0]


DISPATCH_METHODS: Mapping[str, DispatchMethod] = MappingProxyType(
    {"shortest_queue": shortest_queue, "lottery": lottery}
)


def get_dispatch_method(name: str) -> DispatchMethod:
    try:
        return DISPATCH_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown dispatch method {name!r}; valid: {', '.join(sorted(DISPATCH_METHODS))}") from None
