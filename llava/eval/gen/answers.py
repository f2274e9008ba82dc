"""The answer file as a resumable log: one JSON object per line, appended in whole lines, flushed and fsync'd per
batch. Opening it takes an exclusive lock (a second writer fails fast), reads the ids already answered, and repairs a
torn last line (a write cut short by a kill or a crash) by moving it aside, so the sample is simply redone."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from llava.errors import InvalidRequestError
from llava.eval.jsonl import DatasetError, append_whole, encode_rows

try:  # POSIX; elsewhere the file is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AnswerFileError", "AnswerFileBusyError", "AnswerScan", "AnswerFile", "read_answer_rows", "parse_rows",
           "rewrite_rows", "sort_in_plan_order"]

logger = logging.getLogger(__name__)


class AnswerFileError(DatasetError):
    """An answer file that cannot be resumed or merged (a corrupt line before the last, a row without ``id``)."""

    code = "invalid_answer_file"


class AnswerFileBusyError(InvalidRequestError):
    """Another process is writing the same answer file."""

    code = "answer_file_busy"


@dataclass
class AnswerScan:
    """What an answer file holds: ids in file order (first occurrence), how many rows repeat an earlier id, and
    where a torn last line was moved (None when the file was intact)."""

    ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    torn_to: Path | None = None


def parse_rows(data: bytes, origin: str) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSON-lines byte string and the length of its intact prefix. An unparseable *last* line (no
    newline yet, or garbage a crash left) ends the prefix; an unparseable line before it raises AnswerFileError."""
    rows: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    offset = 0
    for n, line in enumerate(lines, 1):
        complete = n < len(lines)  # the text after the last newline is never complete
        end = offset + len(line) + (1 if complete else 0)
        if line.strip():
            try:
                row = json.loads(line) if complete else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if any(rest.strip() for rest in lines[n:]):
                    raise AnswerFileError(f"{origin}: line {n} is not valid JSON ({e}); only a torn last line is "
                                          "repaired automatically: fix or delete the line, then rerun") from None
                row = None
            if row is None:
                return rows, offset
            if not isinstance(row, dict) or "id" not in row:
                raise AnswerFileError(f"{origin}: line {n} has no 'id' field; is this an answer file written by "
                                      "llava.eval.generate?")
            rows.append(row)
        offset = end
    return rows, offset


def read_answer_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of an answer file (a torn last line is ignored, not repaired)."""
    path = Path(path)
    if not path.is_file():
        raise AnswerFileError(f"answer file not found: {path}")
    return parse_rows(path.read_bytes(), str(path))[0]


def _move_aside(path: Path, data: bytes) -> Path:
    aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    aside.write_bytes(data)
    return aside


class AnswerFile:
    """An answer file opened for resuming: ``open()`` locks, scans and repairs it; ``append(rows)`` adds whole
    lines and makes them durable; ``close()`` releases it. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh: IO[bytes] | None = None

    def open(self, overwrite: bool = False) -> AnswerScan:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+b")  # noqa: SIM115 - held until close()
        self._lock()
        if overwrite:
            self._fh.truncate(0)
            return AnswerScan()
        self._fh.seek(0)
        data = self._fh.read()
        rows, good = parse_rows(data, str(self.path))
        scan = AnswerScan()
        if good < len(data):
            scan.torn_to = _move_aside(self.path, data[good:])
            self._fh.truncate(good)
            self._sync()
            logger.warning("%s: the last line was torn (%d bytes, a run was cut off while writing); moved it to %s "
                           "and will redo that sample", self.path, len(data) - good, scan.torn_to)
        seen: set[str] = set()
        for row in rows:
            key = str(row["id"])
            if key in seen:
                scan.duplicates += 1
                continue
            seen.add(key)
            scan.ids.append(key)
        if scan.duplicates:
            logger.warning("%s: %d rows repeat an earlier id", self.path, scan.duplicates)
        return scan

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            self._fh = None
            raise AnswerFileBusyError(f"another process is writing {self.path}; wait for it to finish (or stop it) "
                                      "before resuming, or give this run its own --answers-file") from None

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write rows as whole lines and fsync (what a kill can lose is what is in flight). A failed write (disk
        full, I/O error) is undone: the file is cut back to its last complete line and AnswerFileWriteError says
        so, so a write error never leaves a torn or partial line behind."""
        if self._fh is None:
            raise RuntimeError("AnswerFile.append before open()")
        rows = list(rows)
        data = encode_rows(rows)
        if data:
            append_whole(self._fh, data, self.path, f"{len(rows)} answer row(s)")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rewrite_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` atomically (a temporary file in the same folder, fsync'd, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(encode_rows(rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sort_in_plan_order(path: str | Path, plan_ids: list[str]) -> None:
    """Rewrite a finished answer file in plan order (batches finish out of order with --concurrency, and a resumed
    run appends retried samples last), so every finished run, merged or not, reads the same."""
    rows = read_answer_rows(path)
    order = {i: n for n, i in enumerate(plan_ids)}
    keys = [str(r["id"]) for r in rows]
    planned = [k for k in keys if k in order]
    if len(set(keys)) == len(keys) and planned == sorted(planned, key=order.__getitem__):
        return
    first: dict[str, dict[str, Any]] = {}
    for key, row in zip(keys, rows):
        first.setdefault(key, row)
    ordered = sorted((k for k in first if k in order), key=order.__getitem__)
    rewrite_rows(path, [first[k] for k in ordered] + [first[k] for k in first if k not in order])
    logger.info("%s rewritten in sample order", path)
