"""Optional dependencies, by the extra that installs them (``pip install -e ".[serve]"``).

A module that needs an extra asks for it here instead of importing it bare, so a missing package is one line that
says what to install (:class:`~llava.errors.MissingExtraError`), not a ``ModuleNotFoundError`` traceback. When that
happens while Python is locating a ``python -m llava...`` entry point, the process exits with the message alone.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from llava.errors import MissingExtraError

__all__ = ["EXTRAS", "install_hint", "check_extra", "require_extra"]

# What each extra of pyproject.toml brings that the package imports (top-level module names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("anyio", "fastapi", "uvicorn", "httpx", "pydantic", "gradio"),
    "eval": ("openai", "httpx", "pydantic", "pandas", "matplotlib"),
    "train": ("peft",),
}


def install_hint(extra: str) -> str:
    return f'pip install -e ".[{extra}]" (from a checkout) or pip install "ecso[{extra}]"'


def _fail(err: MissingExtraError) -> None:
    if sys.argv and sys.argv[0] == "-m":  # Python is still locating the module given to -m: an entry point
        sys.exit(f"error: {err}")
    raise err


def check_extra(extra: str, what: str, modules: Sequence[str] | None = None) -> None:
    """Raise :class:`MissingExtraError` (or exit, see the module docstring) unless ``modules`` (default: all of
    ``extra``'s) are importable; ``what`` names the part that needs them."""
    missing = [m for m in (modules if modules is not None else EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        _fail(MissingExtraError(f"{what} needs {', '.join(missing)} (the [{extra}] extra): {install_hint(extra)}",
                                name=missing[0]))


def require_extra(module: str, extra: str, what: str | None = None) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` naming ``extra`` (and, as ``name``, the missing module)
    when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there, something it imports is not: not ours to explain
        top = module.split(".")[0]
        _fail(MissingExtraError(f"{what or top} needs {top} (the [{extra}] extra): {install_hint(extra)}", name=top))
        raise  # unreachable: _fail raises or exits
