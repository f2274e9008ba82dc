"""Backends by name. Each entry names its factory by module path, imported when the backend is created, so the
registry imports no backend module (no cycle) and a backend whose optional dependency is missing says which extra
to install instead of being "unknown".

    create_backend("local", model_path="tiny")
    create_backend("worker", controller_url="http://127.0.0.1:10000")    # needs the [serve] extra (httpx)
    create_backend("openai", base_url="http://127.0.0.1:8000/v1")
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from llava.ecso.backends import Backend
from llava.errors import MissingExtraError, UnsupportedError
from llava.extras import install_hint

__all__ = ["BackendEntry", "register_backend", "backend_names", "create_backend"]


@dataclass(frozen=True)
class BackendEntry:
    """``factory``: ``"module:attribute"`` (dotted attributes allowed) or a callable; ``extra``: the optional
    dependencies it needs (``pip install -e ".[extra]"``), ``None`` for the base install."""

    factory: str | Callable[..., Backend]
    extra: str | None = None
    help: str = ""

    def resolve(self, name: str) -> Callable[..., Backend]:
        if callable(self.factory):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        try:
            target: Any = importlib.import_module(module)
        except ImportError as exc:
            missing = isinstance(exc, MissingExtraError) or (isinstance(exc, ModuleNotFoundError) and exc.name
                                                             and not exc.name.startswith("llava"))
            if self.extra is None or not missing:
                raise
            raise MissingExtraError(f"the {name!r} backend needs the [{self.extra}] extra ({exc.name} is not "
                                    f"installed): {install_hint(self.extra)}", name=exc.name) from None
        for part in attribute.split("."):
            target = getattr(target, part)
        return target


_BACKENDS: dict[str, BackendEntry] = {
    "local": BackendEntry("llava.ecso.local_vlm:load_local",
                          help="load the model in this process (LLaVA-1.5 or any transformers vision-language model)"),
    "worker": BackendEntry("llava.ecso.remote:WorkerBackend", "serve",
                           help="a LLaVA worker behind a controller (LLaVA's worker protocol)"),
    "openai": BackendEntry("llava.ecso.openai_remote:OpenAIBackend", "serve",
                           help="an OpenAI-compatible chat endpoint (vLLM, SGLang, transformers serve, ...)"),
}


def register_backend(name: str, factory: str | Callable[..., Backend], extra: str | None = None,
                     help: str = "") -> None:
    """Add (or replace) a backend: ``factory`` as ``"module:attribute"`` or a callable taking keyword arguments."""
    _BACKENDS[name] = BackendEntry(factory, extra, help)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **kwargs: Any) -> Backend:
    """A backend by name, built with ``kwargs`` (the factory's keyword arguments)."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise UnsupportedError(f"unknown backend {name!r}; valid: {', '.join(backend_names())}")
    return entry.resolve(name)(**kwargs)
