"""A model worker's membership in its controller: register at start (retrying with backoff while the controller
is down or refuses), heart-beat every ``heart_beat_interval`` seconds with the queue length and whether the model
can answer (a remote model's servers are probed first: the controller sends nothing to a worker whose servers are
down, and resumes when they answer again), and register again when the controller answers ``exist: false`` (it
restarted, or dropped this worker for silence)."""
from __future__ import annotations

import asyncio
import logging

from llava.errors import ECSOError
from llava.http_client import apost_json
from llava.serve.protocol.llava import HeartBeatRequest, RegisterWorkerRequest
from llava.serve.worker_state import WorkerState

__all__ = ["REGISTER_BACKOFF_MAX", "registration_loop"]

logger = logging.getLogger(__name__)

REGISTER_BACKOFF_MAX = 30.0  # seconds between registration attempts, at most


async def _register(state: WorkerState) -> None:
    cfg = state.config
    body = RegisterWorkerRequest(worker_name=cfg.address, check_heart_beat=True, worker_status=state.status())
    await apost_json(state.http, f"{cfg.controller_url}/register_worker", body, api_key=cfg.api_key, timeout=10.0)
    logger.info("registered with controller %s as %s (model %s)", cfg.controller_url, cfg.address, state.model_name)


async def _heart_beat(state: WorkerState, healthy: bool) -> bool:
    """One heartbeat; False when the controller does not know this worker (it must register again)."""
    cfg = state.config
    body = HeartBeatRequest(worker_name=cfg.address, queue_length=state.slots.queue_length, healthy=healthy)
    answer = await apost_json(state.http, f"{cfg.controller_url}/receive_heart_beat", body, api_key=cfg.api_key,
                              timeout=10.0)
    return bool(answer.get("exist"))


async def _check_model(state: WorkerState, was: bool) -> bool:
    """Whether the model can answer now; a change is logged."""
    now = await state.model.healthy()
    if now != was:
        if now:
            logger.info("the model answers again: reporting this worker healthy to %s", state.config.controller_url)
        else:
            logger.warning("the model's servers do not answer (%s): reporting this worker unhealthy to %s",
                           state.backend.status().get("upstream"), state.config.controller_url)
    return now


async def registration_loop(state: WorkerState) -> None:
    """Register (retrying with backoff), then heart-beat forever; re-register when told ``exist: false``."""
    cfg, registered, healthy = state.config, False, True
    first_delay = min(1.0, cfg.heart_beat_interval)
    delay = first_delay
    while True:
        if not registered:
            try:
                await _register(state)
                registered, delay = True, first_delay
            except ECSOError as exc:
                logger.warning("cannot register with controller %s (%s); retrying in %g s", cfg.controller_url,
                               exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REGISTER_BACKOFF_MAX)
                continue
        await asyncio.sleep(cfg.heart_beat_interval)
        healthy = await _check_model(state, healthy)
        try:
            if not await _heart_beat(state, healthy):
                logger.warning("controller %s does not know this worker (%s); registering again",
                               cfg.controller_url, cfg.address)
                registered = False
        except ECSOError as exc:
            logger.warning("heartbeat to controller %s failed: %s", cfg.controller_url, exc)
