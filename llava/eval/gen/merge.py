"""Chunk files -> one answer file. Each part must be a finished run (its manifest says ``complete``), the parts
must be chunks 0..N-1 of one plan with the same settings, and every planned id must be accounted for exactly once
(a row, or a recorded image failure); the merged rows are written in chunk order with a merged manifest."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from llava.errors import InvalidRequestError
from llava.eval.gen.answers import AnswerFileError, read_answer_rows, rewrite_rows
from llava.eval.gen.manifest import (file_digest, ids_digest, load_manifest, manifest_path, now_iso, settings_diff,
                                     write_manifest)

__all__ = ["MergeError", "merge_parts", "wait_for_parts"]

logger = logging.getLogger(__name__)


class MergeError(AnswerFileError):
    code = "merge_failed"


def _part_manifest(part: Path) -> dict[str, Any]:
    if not part.is_file():
        raise MergeError(f"part file not found: {part}")
    manifest = load_manifest(manifest_path(part))
    if manifest is None:
        raise MergeError(f"{part} has no manifest ({manifest_path(part).name}): only files written by "
                         "llava.eval.generate can be merged")
    if manifest.get("status") != "complete":
        counts = manifest.get("counts", {})
        raise MergeError(f"{part} is {manifest.get('status')} ({counts.get('answered')}/{counts.get('planned')} "
                         "answered): rerun its generate command to finish it, then merge")
    return manifest


def _ordered(parts: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Parts with their manifests, in chunk order; they must be exactly chunks 0..N-1 of N."""
    loaded = [(p, _part_manifest(p)) for p in parts]
    n = len(loaded)
    chunks = sorted((m["plan"]["num_chunks"], m["plan"]["chunk_idx"]) for _, m in loaded)
    if chunks != [(n, k) for k in range(n)]:
        raise MergeError(f"expected chunks 0..{n - 1} of {n}, got (num_chunks, chunk_idx) {chunks}; pass every "
                         "chunk file of one sharded run")
    loaded.sort(key=lambda pm: pm[1]["plan"]["chunk_idx"])
    first = loaded[0][1]["settings"]
    for part, m in loaded[1:]:
        diffs = settings_diff(first, m["settings"])
        if diffs:
            raise MergeError(f"{part} was made with other settings than {loaded[0][0]}: " + "; ".join(diffs))
    return loaded


def _part_rows(part: Path, manifest: dict[str, Any], seen: dict[str, Path]) -> list[dict[str, Any]]:
    rows = read_answer_rows(part)
    ids = [str(r["id"]) for r in rows]
    for key in ids:
        if key in seen:
            raise MergeError(f"id {key!r} is in both {seen[key]} and {part}" if seen[key] != part
                             else f"id {key!r} occurs twice in {part}")
        seen[key] = part
    failed = [str(e["id"]) for e in manifest.get("errors", [])]
    plan = manifest["plan"]
    if len(set(ids) | set(failed)) != plan["count"] or ids_digest(ids + failed) != plan["ids_sha256"]:
        raise MergeError(f"{part}: its rows and recorded failures do not match its plan of {plan['count']} samples "
                         f"({len(ids)} rows, {len(failed)} failures); was the file changed after the run?")
    return rows


def merge_parts(parts: Sequence[str | Path], out: str | Path, force: bool = False,
                remove_parts: bool = False) -> dict[str, Any]:
    """Merge ``parts`` into ``out`` (refused when ``out`` exists, unless ``force``); returns the merged manifest."""
    out = Path(out)
    parts = [Path(p) for p in parts]
    if not parts:
        raise MergeError("no part files to merge")
    if out.resolve() in {p.resolve() for p in parts}:
        raise MergeError(f"the merged file {out} is one of the parts")
    if out.exists() and not force:
        raise MergeError(f"{out} exists; pass --force to replace it")
    loaded = _ordered(parts)
    seen: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for part, manifest in loaded:
        rows += _part_rows(part, manifest, seen)
    merged = _merged_manifest(out, loaded, rows)
    rewrite_rows(out, rows)
    write_manifest(manifest_path(out), merged)
    logger.info("merged %d parts into %s: %d rows, %d failures", len(parts), out, len(rows), len(merged["errors"]))
    if remove_parts:
        for part in parts:
            part.unlink(missing_ok=True)
            manifest_path(part).unlink(missing_ok=True)
    return merged


def _merged_manifest(out: Path, loaded: list[tuple[Path, dict[str, Any]]],
                     rows: list[dict[str, Any]]) -> dict[str, Any]:
    manifests = [m for _, m in loaded]
    errors = [e for m in manifests for e in m.get("errors", [])]
    accounted = [str(r["id"]) for r in rows] + [str(e["id"]) for e in errors]
    first = manifests[0]
    return {
        "version": first["version"], "answers_file": str(out), "status": "complete", "settings": first["settings"],
        "inputs": first.get("inputs"),
        "plan": {"count": len(set(accounted)), "ids_sha256": ids_digest(accounted), "num_chunks": 1,
                 "chunk_idx": 0, "limit": first["plan"].get("limit")},
        "counts": {"planned": len(set(accounted)), "answered": len(rows),
                   "missing_images": sum(m["counts"].get("missing_images", 0) for m in manifests),
                   "errors": sum(m["counts"].get("errors", 0) for m in manifests)},
        "errors": errors,
        "merged_from": [{"path": str(p), "chunk_idx": m["plan"]["chunk_idx"], "num_chunks": m["plan"]["num_chunks"],
                         "rows": m["counts"].get("answered"), "sha256": file_digest(p)} for p, m in loaded],
        "started": min(m.get("started", "") for m in manifests), "updated": now_iso(),
        "runs": [{**r, "chunk_idx": m["plan"]["chunk_idx"]} for m in manifests for r in m.get("runs", [])],
    }


def wait_for_parts(parts: Sequence[Path], timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until every part's manifest says ``complete`` (rank 0 of a multi-process run); raise MergeError as
    soon as one ends otherwise, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = []
        for part in parts:
            try:
                status = (load_manifest(manifest_path(part)) or {}).get("status")
            except InvalidRequestError:  # not a manifest (yet)
                status = None
            if status in ("incomplete", "interrupted", "failed"):
                raise MergeError(f"{part} ended {status}; rerun the same launch command to resume, it will merge "
                                 "when every part is complete")
            if status != "complete":
                waiting.append(part)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise MergeError(f"timed out after {timeout_s:.0f} s waiting for {', '.join(map(str, waiting))}")
        time.sleep(poll_s)
