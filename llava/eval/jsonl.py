"""JSON lines on disk, for every eval tool: the one reader, the whole-line appender, and the errors they raise.

Two kinds of file are read:

* input data (question files, ground truth, answer files handed to a converter): the file must exist and hold
  rows, and every line must be a JSON object; errors read ``{path}:{line}: not valid JSON (...)``.
* logs our own writers append to (answer files, judgments; ``log=True``): a torn last line, what a killed writer
  leaves behind, is skipped with a warning; an empty file has no rows; errors read ``{path} line {n}: ...``.

Writers append whole lines with ``append_whole`` (fsync'd; a failed write is cut back), so a log never ends in a
partial line that a later append would glue onto.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Iterable

from llava.errors import ECSOError, InvalidRequestError

__all__ = ["DatasetError", "AnswerFileWriteError", "require_file", "read_jsonl", "encode_rows", "append_whole"]

logger = logging.getLogger(__name__)


class DatasetError(InvalidRequestError):
    """A data file (benchmark, answer or judgment file) that is absent or malformed, or does not match the options
    given; the message names the file, row or value."""

    code = "invalid_dataset"


class AnswerFileWriteError(ECSOError):
    """Appending to an answer (or judgments) file failed; the file was cut back to its last complete line."""

    code = "write_failed"


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a DatasetError naming it when it is not an existing file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _where(path: Path, lineno: int, log: bool) -> str:
    return f"{path} line {lineno}" if log else f"{path}:{lineno}"


def _parse_line(raw: bytes, path: Path, lineno: int, log: bool) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{_where(path, lineno, log)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        reason = f"invalid JSON ({e})" if log else f"not valid JSON ({e.msg})"
        raise DatasetError(f"{_where(path, lineno, log)}: {reason}") from None


def read_jsonl(path: str | Path, what: str = "question file", *, log: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, blank lines skipped; see the module doc for ``log``. A line that is
    not UTF-8, not JSON or not an object raises DatasetError naming the file and line."""
    path = require_file(path, what) if not log else Path(path)
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = _parse_line(raw, path, lineno, log)
        except DatasetError as e:
            if not (log and lineno == len(lines)):  # text after the last newline: a write that never finished
                raise
            logger.warning("%s line %d: torn last line skipped (%s)", path, lineno, e)
            continue
        if not isinstance(row, dict):
            raise DatasetError(f"{_where(path, lineno, log)}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows and not log:
        raise DatasetError(f"{what} {path} has no rows (empty file?)")
    return rows


def encode_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows as whole JSON lines (each ending in a newline), UTF-8."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def append_whole(fh: IO[Any], data: bytes, path: Path, what: str) -> None:
    """Append ``data`` (whole lines) to the file open as ``fh`` (in append mode) and fsync it; on any OSError cut
    the file back to its size before the write and raise :class:`AnswerFileWriteError` naming ``path`` and the
    cause. Unbuffered (``os.write``), so no half-written buffer is flushed later."""
    fh.flush()
    fd = fh.fileno()
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, end)
            kept = "the file was cut back to its last complete line"
        except OSError as again:  # pragma: no cover - a truncate that fails too; the next open repairs the tail
            kept = f"cutting it back failed too ({again.strerror}); the next run moves the torn line aside"
        raise AnswerFileWriteError(f"cannot write {what} to {path}: {exc.strerror or exc}; nothing of them was "
                                   f"kept ({kept}). Free space or fix the path, then rerun the same command to "
                                   "resume") from exc
