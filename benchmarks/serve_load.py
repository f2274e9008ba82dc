"""Load test of the serving stack: N concurrent streaming clients for D seconds against a controller's
``/worker_generate_stream`` (LLaVA's protocol, one image + a query per request), or against an OpenAI-compatible
``/v1/chat/completions`` (streamed, the same image and query).

    python benchmarks/serve_load.py --start-stack --model-path tiny --workers 2              # 50 clients, 60 s
    python benchmarks/serve_load.py --controller-url http://127.0.0.1:10000 --clients 10 --duration 10 \\
        --worker-url http://127.0.0.1:40000 --json load.json
    python benchmarks/serve_load.py --openai-url http://127.0.0.1:40000/v1 --model guarded --ecso-field true
    python benchmarks/serve_load.py --compare-remote --model-path tiny --clients 8 --duration 60

``--compare-remote`` measures the guard worker (``model_worker --backend openai``): it starts ``transformers serve
--continuous-batching`` on the model and a worker in front of it, then loads (a) the server directly, (b) the worker
without ECSO (``"ecso": false``, allowed by ``--allow-ecso-opt-out``) and (c) the worker with ECSO (``hold``), with
the same clients and duration one after the other, and prints one table (the worker's overhead is (b)/(a)).

Loopback only (a controller URL on another host is refused), bounded by ``--duration`` (no request starts after
it), ``--max-requests`` and ``--request-timeout``. Reports requests/s, latency and time-to-first-chunk percentiles
and errors, then checks that every worker's ``queue_length`` is back to 0 (no leaked concurrency slots). Prints one
summary line; ``--json`` writes everything. Exit status 0 when there were no errors and no leaked slots, else 1.
The key, when the stack has one, comes from ``--api-key`` or ``$ECSO_API_KEY``.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from llava.http_client import ChunkDecoder, auth_headers, decode_chunk, is_loopback, resolve_api_key  # noqa: E402

logger = logging.getLogger("benchmarks.serve_load")
PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in this picture? ASSISTANT:")


@dataclass
class Sample:
    ok: bool
    latency: float
    first_chunk: float | None
    error: str | None = None
    tokens: int | None = None  # completion tokens, when the server reports them


@dataclass
class Report:
    clients: int
    duration_s: float
    elapsed_s: float = 0.0
    requests: int = 0
    errors: int = 0
    requests_per_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_max_s: float | None = None
    first_chunk_p50_s: float | None = None
    first_chunk_p95_s: float | None = None
    completion_tokens_mean: float | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)
    queue_length_after: dict[str, int | None] = field(default_factory=dict)
    workers: int = 0
    max_new_tokens: int = 0
    config: dict = field(default_factory=dict)

    @property
    def leaked(self) -> bool:
        return any(q != 0 for q in self.queue_length_after.values())

    def line(self) -> str:
        def s(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f} s"

        return (f"serve_load: {self.clients} clients, {self.elapsed_s:.1f} s, {self.workers or '?'} workers: "
                f"{self.requests} requests, {self.errors} errors, {self.requests_per_s:.2f} req/s, "
                f"latency p50 {s(self.latency_p50_s)} p95 {s(self.latency_p95_s)} max {s(self.latency_max_s)}, "
                f"first chunk p50 {s(self.first_chunk_p50_s)} p95 {s(self.first_chunk_p95_s)}, "
                f"queue_length after {self.queue_length_after}")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def image_b64(height: int = 64) -> str:
    """A small PNG (96 x ``height``; a square one passes a worker's pad-to-square unchanged)."""
    import base64

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, height), (240, 230, 210))
    ImageDraw.Draw(img).ellipse((20, 8, 76, 56), fill=(220, 120, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------------------ clients


class Budget:
    """At most ``limit`` requests (None: unbounded), started before ``deadline``."""

    def __init__(self, limit: int | None, deadline: float) -> None:
        self.left, self.deadline = limit, deadline

    def take(self) -> bool:
        if time.monotonic() >= self.deadline or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


async def one_request(client: httpx.AsyncClient, url: str, payload: dict) -> Sample:
    """One LLaVA stream; ``first_chunk``: seconds to its first frame."""
    t0 = time.monotonic()
    first, error = None, None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            decoder, frames = ChunkDecoder(), 0
            async for data in resp.aiter_bytes():
                for frame in decoder.feed(data):
                    chunk = decode_chunk(frame)
                    frames += 1
                    if first is None:
                        first = time.monotonic() - t0
                    if chunk.get("error_code", 0):
                        error = f"error_code {chunk['error_code']}: {str(chunk.get('detail') or chunk.get('text'))[:200]}"
            if error is None and resp.status_code != 200:
                error = f"HTTP {resp.status_code}"
            if error is None and (decoder.pending or not frames):
                error = "stream ended inside a frame" if decoder.pending else "empty stream"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return Sample(error is None, time.monotonic() - t0, first, error)


async def one_openai_request(client: httpx.AsyncClient, url: str, payload: dict) -> Sample:
    """One streamed chat completion; ``first_chunk``: seconds to its first chunk with content (ECSO's hold policy
    sends the answer once the verdict is in)."""
    t0 = time.monotonic()
    first, error, done, tokens = None, None, False, None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        error = f"error event: {str(event['error'])[:200]}"
                        break
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                    choices = event.get("choices") or [{}]
                    if first is None and (choices[0].get("delta") or {}).get("content"):
                        first = time.monotonic() - t0
                    done = done or bool(choices[0].get("finish_reason"))
                if error is None and not done:
                    error = "stream ended mid-answer"
    except (httpx.HTTPError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return Sample(error is None, time.monotonic() - t0, first, error, tokens)


async def client_loop(send, budget: Budget, out: list[Sample]) -> None:
    while budget.take():
        out.append(await send())


async def run_clients(url: str, api_key: str | None, clients: int, duration: float, max_requests: int | None,
                      payload: dict, timeout: float, request=one_request) -> tuple[list[Sample], float]:
    """``clients`` loops of ``request(client, url, payload)`` until the budget is spent; the samples, the seconds."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    samples: list[Sample] = []
    start = time.monotonic()
    budget = Budget(max_requests, start + duration)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers(api_key),
                                 trust_env=False) as client:
        await asyncio.gather(*(client_loop(lambda: request(client, url, payload), budget, samples)
                               for _ in range(clients)))
    return samples, time.monotonic() - start


# ------------------------------------------------------------------------------------------------ queue lengths


def queue_lengths(worker_urls: list[str], controller: str, api_key: str | None, drain_timeout: float) -> dict:
    """Each worker's queue_length once it reaches 0 (or the last value seen after ``drain_timeout`` s); without
    worker URLs, the controller's sum over its workers (kept current by their heartbeats)."""
    targets = worker_urls or [controller]
    out: dict[str, int | None] = {}
    with httpx.Client(timeout=5, headers=auth_headers(api_key), trust_env=False) as http:
        for url in targets:
            deadline, value = time.monotonic() + drain_timeout, None
            while True:
                try:
                    value = int(http.post(f"{url}/worker_get_status").json()["queue_length"])
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    logger.warning("cannot read the status of %s: %s", url, exc)
                    value = None
                if value == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            out[url if worker_urls else f"{url} (sum)"] = value
    return out


# ---------------------------------------------------------------------------------------------------- the stack


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def service(module: str | list[str], port: int, args: list[str], env: dict, log_dir: Path,
            startup_timeout: float, cpus: set[int] | None = None) -> Iterator[str]:
    """``python -m module`` (or the command ``module`` as a list) on 127.0.0.1:port in its own process group;
    yields its URL once /health answers; SIGTERM (then SIGKILL) to the group on exit."""
    command = [sys.executable, "-m", module] if isinstance(module, str) else list(module)
    name = module.rsplit(".", 1)[-1] if isinstance(module, str) else Path(module[0]).name
    log = open(log_dir / f"{name}-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy after {startup_timeout} s; see {log.name}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)
        log.close()


@contextmanager
def stack(model_path: str, workers: int, api_key: str | None, worker_args: list[str],
          startup_timeout: float) -> Iterator[tuple[str, list[str]]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("ECSO_API_KEY", None)
    if api_key:
        env["ECSO_API_KEY"] = api_key
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    logger.info("starting a controller and %d workers (%s); logs in %s", workers, model_path, log_dir)
    with ExitStack() as stack_:
        controller = stack_.enter_context(service("llava.serve.controller", free_port(), [], env, log_dir, 60))
        urls = []
        for _ in range(workers):  # one at a time: loading models side by side only slows each down
            urls.append(stack_.enter_context(service(
                "llava.serve.model_worker", free_port(),
                ["--model-path", model_path, "--controller-url", controller, "--heart-beat-interval", "1",
                 *worker_args], env, log_dir, startup_timeout)))
        deadline = time.monotonic() + 30
        while httpx.get(f"{controller}/health", timeout=2, trust_env=False).json().get("workers", 0) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not register with {controller}; logs in {log_dir}")
            time.sleep(0.2)
        yield controller, urls


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--controller-url", help="a running controller on this machine (loopback only)")
    where.add_argument("--start-stack", action="store_true",
                       help="start a controller and --workers workers of --model-path here, stop them afterwards")
    where.add_argument("--openai-url", help="an OpenAI-compatible base URL (.../v1) on this machine: streamed chat "
                       "completions (with --model)")
    where.add_argument("--compare-remote", action="store_true",
                       help="start transformers serve --continuous-batching on --model-path and a guard worker in "
                       "front of it; load (a) the server, (b) the worker without ECSO, (c) with ECSO; one table")
    p.add_argument("--ecso-field", choices=["absent", "true", "false"], default="absent",
                   help="--openai-url: the request's \"ecso\" field (default: absent, the worker's policy)")
    p.add_argument("--model-path", default="tiny", help="--start-stack, --compare-remote: the model (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="--start-stack: how many workers (default %(default)s)")
    p.add_argument("--device", default="cpu", help="--compare-remote: transformers serve's device (default %(default)s)")
    p.add_argument("--warmup", type=float, default=10.0,
                   help="--compare-remote: seconds of the same load, unmeasured, before each target (default %(default)g)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--compare-remote: the targets take turns this many times, each for duration/rounds seconds a "
                        "turn (a machine whose load drifts weighs on each alike) (default %(default)s)")
    p.add_argument("--pin", action="store_true",
                   help="--compare-remote: the server on half of this machine's CPUs, the worker and the clients on "
                        "the other half (on a small machine, so the worker's CPU is not taken from the server)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="--start-stack: an extra flag for every worker, e.g. --worker-arg=--limit-model-concurrency=5")
    p.add_argument("--worker-url", action="append", default=[],
                   help="with --controller-url: a worker whose queue_length to check afterwards (repeatable); "
                        "default: the controller's sum over its workers")
    p.add_argument("--model", default=None, help="model name to request (default: the controller's only model; "
                   "with --openai-url, the first of /v1/models)")
    p.add_argument("--clients", type=int, default=50, help="concurrent streaming clients (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds during which requests start; in-flight ones then finish (default %(default)g)")
    p.add_argument("--max-requests", type=int, default=100_000, help="most requests in all (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per request (default %(default)s)")
    p.add_argument("--no-image", action="store_true", help="text-only requests (default: one small PNG each)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds to connect and between stream pieces of one request (default %(default)g)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to wait for queue_length 0 afterwards (default %(default)g)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="--start-stack: seconds for each worker to load its model (default %(default)g)")
    p.add_argument("--api-key", default=None, help="the stack's key (default: $ECSO_API_KEY)")
    p.add_argument("--json", default=None, help="write the report (and the settings) to this file")
    return p


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not host or not all(is_loopback(a) for a in addrs):
        raise SystemExit(f"refusing to load-test {url}: only loopback controllers (127.0.0.1, localhost, ::1)")
    return url.rstrip("/")


def summarize(args: argparse.Namespace, samples: list[Sample], elapsed: float, workers: int, config: dict) -> Report:
    ok = [s for s in samples if s.ok]
    firsts = [s.first_chunk for s in ok if s.first_chunk is not None]
    report = Report(clients=args.clients, duration_s=args.duration, elapsed_s=elapsed, requests=len(samples),
                    errors=len(samples) - len(ok), requests_per_s=len(ok) / elapsed if elapsed else 0.0,
                    latency_p50_s=percentile([s.latency for s in ok], 50),
                    latency_p95_s=percentile([s.latency for s in ok], 95),
                    latency_max_s=max((s.latency for s in ok), default=None),
                    first_chunk_p50_s=percentile(firsts, 50), first_chunk_p95_s=percentile(firsts, 95),
                    completion_tokens_mean=(sum(t) / len(t)) if (t := [s.tokens for s in ok if s.tokens]) else None,
                    workers=workers, max_new_tokens=args.max_new_tokens,
                    config={**config, "max_requests": args.max_requests, "request_timeout": args.request_timeout})
    for s in samples:
        if s.error:
            kind = s.error.split(":", 1)[0]
            report.error_kinds[kind] = report.error_kinds.get(kind, 0) + 1
    for s in [s for s in samples if s.error][:5]:
        logger.warning("failed request: %s", s.error)
    return report


def run(args: argparse.Namespace, controller: str, worker_urls: list[str], api_key: str | None) -> Report:
    model = args.model
    if model is None:
        with httpx.Client(timeout=10, headers=auth_headers(api_key), trust_env=False) as http:
            models = http.post(f"{controller}/list_models").json()["models"]
        if len(models) != 1:
            raise SystemExit(f"the controller serves {models}; pick one with --model")
        model = models[0]
    images = [] if args.no_image else [image_b64()]
    prompt = PROMPT if images else PROMPT.replace("<image>\n", "")
    payload = {"model": model, "prompt": prompt, "images": images, "temperature": 0.0, "top_p": 1.0,
               "max_new_tokens": args.max_new_tokens, "stop": "</s>"}
    logger.info("%d clients for %g s against %s (model %s, %d new tokens)", args.clients, args.duration, controller,
                model, args.max_new_tokens)
    samples, elapsed = asyncio.run(run_clients(f"{controller}/worker_generate_stream", api_key, args.clients,
                                               args.duration, args.max_requests, payload, args.request_timeout))
    report = summarize(args, samples, elapsed, len(worker_urls),
                       {"controller": controller, "model": model, "image": bool(images)})
    report.queue_length_after = queue_lengths(worker_urls, controller, api_key, args.drain_timeout)
    return report


def chat_payload(model: str, args: argparse.Namespace, ecso_field: str) -> dict:
    """A streamed chat completion: a square image (a data: URL; so a worker that pads sends the same pixels on) and
    the query of the LLaVA payload, greedy, usage asked for (the answers' lengths are reported)."""
    content: list[dict] = [] if args.no_image else [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64(96)}"}}]
    content.append({"type": "text", "text": "What is in this picture?"})
    payload = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
               "stream_options": {"include_usage": True}, "max_tokens": args.max_new_tokens, "temperature": 0.0}
    if ecso_field != "absent":
        payload["ecso"] = ecso_field == "true"
    return payload


def load_openai(args: argparse.Namespace, base_url: str, api_key: str | None, ecso_field: str,
                duration: float) -> tuple[list[Sample], float, str]:
    """``args.clients`` clients streaming chat completions from ``base_url`` (.../v1) for ``duration`` seconds:
    the samples, the seconds taken, the model asked for."""
    model = args.model
    if model is None:
        with httpx.Client(timeout=10, headers=auth_headers(api_key), trust_env=False) as http:
            model = http.get(f"{base_url}/models").json()["data"][0]["id"]
    logger.info("%d clients for %g s against %s (model %s, ecso %s, %d new tokens)", args.clients, duration,
                base_url, model, ecso_field, args.max_new_tokens)
    samples, elapsed = asyncio.run(run_clients(f"{base_url}/chat/completions", api_key, args.clients, duration,
                                               args.max_requests, chat_payload(model, args, ecso_field),
                                               args.request_timeout, request=one_openai_request))
    return samples, elapsed, model


def run_openai(args: argparse.Namespace, base_url: str, api_key: str | None, ecso_field: str) -> Report:
    samples, elapsed, model = load_openai(args, base_url, api_key, ecso_field, args.duration)
    return summarize(args, samples, elapsed, 0,
                     {"openai_url": base_url, "model": model, "image": not args.no_image, "ecso": ecso_field})


def model_folder(model_path: str) -> str:
    """A folder transformers serve can load: the path, or the tiny test model built into the cache."""
    if Path(model_path).is_dir():
        return model_path
    from llava.model.tiny import is_tiny_name, tiny_model_path

    if is_tiny_name(model_path):
        return str(tiny_model_path(model_path))
    return model_path  # a hub id: transformers serve downloads it


def compare_remote(args: argparse.Namespace) -> dict[str, Report]:
    """(a) transformers serve directly, (b) the guard worker without ECSO, (c) with ECSO (hold); same load each."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    env.pop("ECSO_API_KEY", None)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-remote-"))
    server_cmd = [str(Path(sys.executable).with_name("transformers")), "serve", model_folder(args.model_path),
                  "--device", args.device, "--continuous-batching"]
    logger.info("starting transformers serve and a guard worker (%s); logs in %s", args.model_path, log_dir)
    server_cpus = worker_cpus = None
    if args.pin:  # the server on one half of the CPUs, the worker and the clients on the other
        mine = sorted(os.sched_getaffinity(0))
        if len(mine) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        server_cpus, worker_cpus = set(mine[: len(mine) // 2]), set(mine[len(mine) // 2:])
        os.sched_setaffinity(0, worker_cpus)
        logger.info("CPUs: server %s, worker and clients %s", sorted(server_cpus), sorted(worker_cpus))
    reports: dict[str, Report] = {}
    with ExitStack() as stack_:
        upstream = stack_.enter_context(service(server_cmd, free_port(), [], env, log_dir, args.startup_timeout,
                                                server_cpus))
        worker = stack_.enter_context(service(
            "llava.serve.model_worker", free_port(),
            ["--backend", "openai", "--openai-base-url", f"{upstream}/v1", "--no-register", "--allow-ecso-opt-out",
             "--limit-model-concurrency", str(args.clients), "--max-new-tokens", str(args.max_new_tokens),
             "--log-level", "warning", *args.worker_arg], env, log_dir, args.startup_timeout, worker_cpus))
        with httpx.Client(timeout=10, trust_env=False) as http:
            args.model = http.get(f"{upstream}/v1/models").json()["data"][0]["id"]
        targets = {"(a) transformers serve": (f"{upstream}/v1", "absent", None),
                   "(b) guard worker, no ECSO": (f"{worker}/v1", "false", worker),
                   "(c) guard worker, ECSO hold": (f"{worker}/v1", "absent", worker)}
        for url, ecso, _ in targets.values():
            if args.warmup > 0:  # the same load, unmeasured: a server's first requests are slow
                load_openai(args, url, None, ecso, args.warmup)
        # Rounds interleave the targets, each measured for duration/rounds per round: a machine whose load drifts
        # over the run weighs on every target alike.
        runs: dict[str, list] = {name: [[], 0.0] for name in targets}
        for _ in range(args.rounds):
            for name, (url, ecso, _) in targets.items():
                samples, elapsed, _ = load_openai(args, url, None, ecso, args.duration / args.rounds)
                runs[name][0] += samples
                runs[name][1] += elapsed
        for name, (url, ecso, checked) in targets.items():
            reports[name] = summarize(args, runs[name][0], runs[name][1], 1 if checked else 0,
                                      {"openai_url": url, "model": args.model, "image": not args.no_image,
                                       "ecso": ecso, "rounds": args.rounds, "pinned": args.pin})
            if checked:
                reports[name].queue_length_after = queue_lengths([checked], checked, None, args.drain_timeout)
    return reports


def table(reports: dict[str, Report]) -> str:
    """The comparison as a markdown table; the last column is each row's p50 latency over the first row's."""
    def s(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    base = next(iter(reports.values())).latency_p50_s
    lines = ["| target | requests | errors | req/s | latency p50 / p95 (s) | first chunk p50 / p95 (s) | tokens/answer "
             "| p50 vs (a) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        ratio = f"{r.latency_p50_s / base:.2f}x" if base and r.latency_p50_s else "n/a"
        tokens = "n/a" if r.completion_tokens_mean is None else f"{r.completion_tokens_mean:.1f}"
        lines.append(f"| {name} | {r.requests} | {r.errors} | {r.requests_per_s:.2f} | {s(r.latency_p50_s)} / "
                     f"{s(r.latency_p95_s)} | {s(r.first_chunk_p50_s)} / {s(r.first_chunk_p95_s)} | {tokens} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1:
        raise SystemExit("--clients, --duration and --max-requests must be positive")
    api_key = resolve_api_key(args.api_key)
    if args.compare_remote:
        reports = compare_remote(args)
        for report in reports.values():
            print(report.line(), flush=True)
        print(table(reports), flush=True)
    elif args.start_stack:
        with stack(args.model_path, args.workers, api_key, args.worker_arg, args.startup_timeout) as (ctl, urls):
            reports = {"stack": run(args, ctl, urls, api_key)}
    elif args.openai_url:
        reports = {"openai": run_openai(args, check_loopback(args.openai_url), api_key, args.ecso_field)}
    else:
        reports = {"controller": run(args, check_loopback(args.controller_url),
                                     [u.rstrip("/") for u in args.worker_url], api_key)}
    if not args.compare_remote:
        print(next(iter(reports.values())).line(), flush=True)
    if args.json:
        out = {name: {**asdict(r), "leaked_slots": r.leaked} for name, r in reports.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2) + "\n")
    return 0 if all(r.errors == 0 and not r.leaked for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
