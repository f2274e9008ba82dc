"""The manifest written next to every answer file (``answers.jsonl`` -> ``answers.manifest.json``): what produced
the answers (model, checkpoint layout, template, preprocessing, decoding, ECSO options, prompt set, package
versions, dataset digests), the plan (which ids, which chunk), the status and counts, the samples that failed, and
one record per invocation. ``settings`` is the part a resume must match."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from llava.errors import InvalidRequestError

__all__ = ["MANIFEST_VERSION", "ResumeMismatchError", "manifest_path", "file_digest", "ids_digest",
           "package_versions", "environment", "load_manifest", "write_manifest", "settings_diff", "now_iso",
           "UNCOMPARED_MODEL_KEYS"]

MANIFEST_VERSION = 1
# Backend description keys that differ between equivalent runs (each rank of a multi-GPU run has its own device).
UNCOMPARED_MODEL_KEYS = frozenset({"device"})
_DIGEST_SUFFIXES = (".json", ".jsonl", ".tsv", ".txt", ".csv")


class ResumeMismatchError(InvalidRequestError):
    """An answer file was started with other settings than this run's."""

    code = "resume_mismatch"


def manifest_path(answers_file: str | Path) -> Path:
    out = Path(answers_file)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.manifest.json")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _sha256_file(path: Path, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file; of a folder, over the names and contents of its data files (json, jsonl, tsv, txt, csv;
    images are not read); None when ``path`` is None or absent."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_file():
        return _sha256_file(path).hexdigest()
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DIGEST_SUFFIXES):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        _sha256_file(f, h)
    return h.hexdigest()


def ids_digest(ids: Iterable[str]) -> str:
    """Order-free digest of a set of sample ids (a plan, or what a part file accounts for)."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in ("ecso", "torch", "transformers", "accelerate", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def environment() -> dict[str, Any]:
    return {"packages": package_versions(), "python": platform.python_version(), "host": socket.gethostname(),
            "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def load_manifest(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResumeMismatchError(f"{path} is not valid JSON ({e.msg}); delete it (and pass --force-mismatch) to "
                                  "resume without checking settings") from None
    if not isinstance(data, dict) or "settings" not in data:
        raise ResumeMismatchError(f"{path} is not a generation manifest (no 'settings')")
    return data


def write_manifest(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic write: readers (a merging rank 0, a resumed run) never see half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no half-written temporary behind


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (JSON-normalised, so tuples equal lists)."""
    a = _flatten(json.loads(json.dumps(old, default=str)))
    b = _flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
