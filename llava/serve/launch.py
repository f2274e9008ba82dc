"""One command for the whole serving stack: controller, one model worker and the ECSO demo.

    python -m llava.serve.launch --model-path tiny                 # or a real checkpoint
    python -m llava.serve.launch --model-path llava-hf/llava-1.5-7b-hf --device cuda --web-port 7861

Starts the controller, then the worker and the demo side by side, each as ``python -m llava.serve.<service>`` in its
own process group, and waits until each is ready (``/health``; the worker also listed by the controller's
``/list_models``; the demo page answering). Then it prints the URLs and watches: Ctrl-C (SIGINT) or SIGTERM stops
all three (exit status 0); a service that exits on its own stops the others, with a message naming it, and exit
status 1. So does a service that is not ready within ``--startup-timeout``. A port that is already taken is named,
with the flag that changes it, before anything starts. Periodic requests (heartbeats, health and status probes) are
logged at debug level only, so the "ready" lines stay on screen.

Flags this command does not know are passed to the worker (``--device``, ``--dtype``, ``--conv-mode``, ...).

Keyed with zero configuration: without ``--api-key``/``ECSO_API_KEY`` (or ``--no-api-key``) a random key is made
for the run (:mod:`llava.serve.launch_secrets`). Keys and the demo's logins reach the children in the environment.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from llava.cli_args import is_tiny_model
from llava.constants import CONTROLLER_PORT, DEFAULT_HOST, DEMO_AUTH_ENV, TINY_MAX_NEW_TOKENS, WEB_PORT, WORKER_PORT
from llava.http_client import API_KEY_ENV, auth_headers, is_loopback, resolve_api_key
from llava.serve.launch_secrets import split_demo_auth, write_private_key
from llava.serve.server import configure_logging

__all__ = ["LaunchConfig", "Child", "LaunchError", "Launcher", "port_in_use", "build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class LaunchConfig:
    """What to start and where. ``worker_args``/``demo_args`` are appended to those children's command lines."""

    model_path: str
    host: str = DEFAULT_HOST
    controller_port: int = CONTROLLER_PORT
    worker_port: int = WORKER_PORT
    web_port: int = WEB_PORT
    api_key: str | None = field(default=None, repr=False)
    api_key_generated: bool = False
    demo: bool = True
    worker_args: tuple[str, ...] = ()
    demo_args: tuple[str, ...] = ()
    demo_auth: tuple[str, ...] = field(default=(), repr=False)  # USER:PASSWORD logins, passed in ECSO_DEMO_AUTH
    startup_timeout: float = 600.0
    stop_timeout: float = 10.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        ports = [self.controller_port, self.worker_port] + ([self.web_port] if self.demo else [])
        if len(set(ports)) != len(ports):
            raise ValueError(f"the services need different ports, got controller {self.controller_port}, "
                             f"worker {self.worker_port}, web {self.web_port}")
        if self.startup_timeout <= 0 or self.stop_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got startup {self.startup_timeout}, "
                             f"stop {self.stop_timeout}")

    def url(self, port: int) -> str:
        """How this machine reaches a service bound to ``host`` (a wildcard address is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "*") else "[::1]" if self.host == "::" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def controller_url(self) -> str:
        return self.url(self.controller_port)

    @property
    def worker_url(self) -> str:
        return self.url(self.worker_port)

    @property
    def web_url(self) -> str:
        return self.url(self.web_port)


class LaunchError(RuntimeError):
    """The stack could not start or stopped on its own; the message says which service and why."""


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the launcher dies, even by SIGKILL (Linux only;
    ``None`` elsewhere). libc is looked up here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Launcher:
    """Starts, watches and stops the children. ``stop_event`` ends :meth:`run` (the signal handlers set it)."""

    def __init__(self, config: LaunchConfig, *, python: str = sys.executable,
                 environ: Mapping[str, str] = os.environ, out: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.python = python
        self.children: list[Child] = []
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self._env = self._child_env(environ)
        self._out = out or (lambda line: print(line, flush=True))
        self._http = httpx.Client(timeout=2.0, trust_env=False, headers=auth_headers(config.api_key))
        self._preexec = _parent_death_signal()
        self._key_dir: str | None = None
        self.key_file: str | None = None

    def _child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        env = dict(environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key
        if self.config.demo_auth:
            env[DEMO_AUTH_ENV] = "\n".join(self.config.demo_auth)
        return env

    def _write_key_file(self) -> None:
        """A generated key goes to a file only this user can read (removed at exit), for API clients."""
        if self.config.api_key and self.config.api_key_generated:
            self._key_dir, self.key_file = write_private_key(self.config.api_key)

    def _remove_key_file(self) -> None:
        if self._key_dir:
            shutil.rmtree(self._key_dir, ignore_errors=True)
            self._key_dir = None

    # ---- the three services -----------------------------------------------------------------------------------
    def controller_argv(self) -> list[str]:
        c = self.config
        return ["--host", c.host, "--port", str(c.controller_port), "--log-level", c.log_level]

    def worker_argv(self) -> list[str]:
        c = self.config
        return ["--host", c.host, "--port", str(c.worker_port), "--controller-url", c.controller_url,
                "--worker-address", c.worker_url, "--model-path", c.model_path, "--log-level", c.log_level,
                *c.worker_args]

    def demo_argv(self) -> list[str]:
        c = self.config
        short = ["--max-new-tokens", str(TINY_MAX_NEW_TOKENS)] if is_tiny_model(c.model_path) else []  # random text
        return ["--host", c.host, "--port", str(c.web_port), "--controller-url", c.controller_url,
                "--model-list-mode", "reload", "--log-level", c.log_level, *short, *c.demo_args]

    def busy_ports(self) -> list[str]:
        """One line per service whose port is taken on ``host``, naming the port, the flag that changes it and a
        free port to try."""
        c = self.config
        wanted = [("the controller", c.controller_port, "--controller-port"),
                  ("the worker", c.worker_port, "--worker-port")]
        if c.demo:
            wanted.append(("the demo page", c.web_port, "--web-port"))
        taken = {port for _, port, _ in wanted}
        found = []
        for what, port, flag in wanted:
            if port_in_use(c.host, port):
                free = next(p for p in range(port + 1, 65536) if p not in taken and not port_in_use(c.host, p))
                taken.add(free)
                found.append(f"port {port} on {c.host} ({what}) is in use: choose another with {flag}, e.g. "
                             f"{flag} {free}")
        return found

    def run(self) -> int:
        """Start everything, print the URLs, watch until stopped. Returns the exit status (0 on a requested stop)."""
        c = self.config
        busy = self.busy_ports()
        if busy:
            for line in busy:
                logger.error("%s", line)
            logger.error("nothing was started")
            self._http.close()
            return 1
        try:
            self._write_key_file()
            self._start("controller", "llava.serve.controller", self.controller_argv())
            self._wait("controller", lambda: self._get_ok(f"{c.controller_url}/health"))
            # The demo needs no worker to start (it asks the controller for models on each page load): start both.
            self._start("worker", "llava.serve.model_worker", self.worker_argv())
            if c.demo:
                self._start("demo", "llava.serve.gradio_web_server_ecso", self.demo_argv())
            self._wait("worker", lambda: self._get_ok(f"{c.worker_url}/health"))
            models = self._wait("worker registration", self._worker_listed)
            if c.demo:
                self._wait("demo", lambda: self._get_ok(c.web_url))
            self._announce(models)
            self._watch()
        except _Stopped:
            pass
        except LaunchError as exc:
            logger.error("%s; stopping the other services", exc)
            return 1
        finally:
            self.stop_all()
            self._http.close()
            self._remove_key_file()
        logger.info("stopped (%s)", self.stop_reason or "requested")
        return 0

    def _announce(self, models: list[str]) -> None:
        c = self.config
        lines = ["ECSO serving stack is ready:"]
        if c.demo:
            lines.append(f"  demo        {c.web_url}")
        lines += [f"  controller  {c.controller_url}", f"  worker      {c.worker_url} (model {', '.join(models)})"]
        if self.key_file:
            lines.append(f"  API key     in {self.key_file} (removed at exit): export {API_KEY_ENV}=$(cat {self.key_file})")
        lines.append("Press Ctrl-C to stop all of them.")
        self._out("\n".join(lines))

    # ---- children ---------------------------------------------------------------------------------------------
    def _start(self, name: str, module: str, args: Sequence[str]) -> Child:
        self._check_running()
        argv = [self.python, "-m", module, *args]
        proc = subprocess.Popen(argv, env=self._env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=self._preexec)
        child = Child(name, argv, proc)
        self.children.append(child)
        logger.info("started %s (pid %d): %s", name, proc.pid, shlex.join(argv[1:]))
        return child

    def _check_running(self) -> None:
        if self.stop_event.is_set():
            raise _Stopped()
        for child in self.children:
            if child.proc.poll() is not None:
                raise LaunchError(f"{child.name} (pid {child.pid}) {child.describe_exit()}")

    def _wait(self, what: str, probe: Callable[[], object]) -> object:
        """Poll ``probe`` until it returns something truthy; fail when a child dies or time runs out."""
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            self._check_running()
            result = probe()
            if result:
                logger.info("%s is ready", what)
                return result
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} was not ready after {self.config.startup_timeout:g} s (--startup-timeout)")
            self.stop_event.wait(0.2)

    def _watch(self) -> None:
        while True:
            try:
                self._check_running()
            except _Stopped:
                return
            self.stop_event.wait(0.5)

    def stop_all(self) -> None:
        """SIGTERM every child's process group (newest first), SIGKILL what is left after ``stop_timeout``."""
        alive = [c for c in reversed(self.children) if c.proc.poll() is None]
        for child in alive:
            logger.info("stopping %s (pid %d)", child.name, child.pid)
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %g s: killing it", child.name, child.pid,
                               self.config.stop_timeout)
                _signal_group(child.pid, signal.SIGKILL)
                child.proc.wait()
            if _signal_group(child.pid, 0):  # the leader is gone but something it started is not
                _signal_group(child.pid, signal.SIGKILL)

    # ---- probes -----------------------------------------------------------------------------------------------
    def _get_ok(self, url: str) -> bool:
        try:
            return self._http.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def _worker_listed(self) -> list[str]:
        """The worker's models once the controller lists all of them, else []."""
        try:
            status = self._http.post(f"{self.config.worker_url}/worker_get_status").json()
            listed = self._http.post(f"{self.config.controller_url}/list_models").json().get("models", [])
        except (httpx.HTTPError, ValueError):
            return []
        names = list(status.get("model_names") or [])
        return names if names and all(n in listed for n in names) else []

    # ---- signals ----------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            name = signal.Signals(signum).name
            if self.stop_event.is_set():
                logger.warning("%s again: killing the services now", name)
                for child in self.children:
                    _signal_group(child.pid, signal.SIGKILL)
                return
            self.stop_reason = name
            logger.info("%s: stopping the services", name)
            self.stop_event.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)


class _Stopped(Exception):
    """A stop was requested (SIGINT/SIGTERM) while starting or watching."""


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind ``host:port`` now (the probe binds as uvicorn does, with SO_REUSEADDR, so a
    port in TIME_WAIT counts as free)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return False  # the service itself will say what is wrong with the host
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled id that is not ours
        return False


# ------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True,
                   help="the worker's model: a checkpoint folder, a hub id, or 'tiny' (a random-weight test model)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="interface all three services bind (default %(default)s, this machine only). With 0.0.0.0 "
                        "set --api-key (or ECSO_API_KEY) and pass --auth to the demo with --demo-args.")
    p.add_argument("--controller-port", type=int, default=CONTROLLER_PORT, help="controller port (default %(default)s)")
    p.add_argument("--worker-port", type=int, default=WORKER_PORT, help="worker port (default %(default)s)")
    p.add_argument("--web-port", "--port", dest="web_port", type=int, default=WEB_PORT,
                   help="demo page port (default %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"shared key for all three services, passed to them in {API_KEY_ENV} (default: that "
                        f"environment variable; unset = a random key for this run, see --no-api-key)")
    p.add_argument("--no-api-key", action="store_true",
                   help="no authentication at all. Default: without --api-key or ECSO_API_KEY a random key is "
                        "generated for the run (written to a private file named in the ready message)")
    p.add_argument("--no-demo", dest="demo", action="store_false",
                   help="start only the controller and the worker (for API use)")
    p.add_argument("--demo-args", default="",
                   help="extra flags for the demo, one shell-quoted string, e.g. \"--threshold 0.3 --auth me:pw\" "
                        f"(--auth logins go to the demo in {DEMO_AUTH_ENV}, not on its command line)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds each service may take to become ready, model loading included (default %(default)g)")
    p.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds a service gets to exit after SIGTERM before SIGKILL (default %(default)g)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level of this command and the services (default %(default)s)")
    p.epilog = ("Any other flag goes to the worker (see python -m llava.serve.model_worker --help), e.g. --device, "
                "--dtype, --conv-mode, --model-name, --verdict, --threshold.")
    return p


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> LaunchConfig:
    parser = build_parser()
    args, worker_args = parser.parse_known_args(argv)
    try:
        api_key = None if args.no_api_key else resolve_api_key(args.api_key, environ)
        generated = not api_key and not args.no_api_key
        demo_args, demo_auth = split_demo_auth(shlex.split(args.demo_args))
        return LaunchConfig(
            model_path=args.model_path, host=args.host, controller_port=args.controller_port,
            worker_port=args.worker_port, web_port=args.web_port,
            api_key=secrets.token_urlsafe(32) if generated else api_key, api_key_generated=generated,
            demo=args.demo, worker_args=tuple(worker_args), demo_args=demo_args, demo_auth=demo_auth,
            startup_timeout=args.startup_timeout, stop_timeout=args.stop_timeout, log_level=args.log_level)
    except ValueError as exc:
        parser.error(str(exc))



def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not config.api_key and not is_loopback(config.host):
        logger.warning("launching on %s without an API key: anyone who can reach the ports can use the models and "
                       "register workers; set --api-key or %s (and pass --auth to the demo with --demo-args)",
                       config.host, API_KEY_ENV)
    launcher = Launcher(config)
    launcher.install_signal_handlers()
    logger.info("launching %s", config)
    return launcher.run()


if __name__ == "__main__":
    from llava.serve.launch import main as _main

    sys.exit(_main())
