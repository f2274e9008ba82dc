"""Judgments on disk: the ``Judgment`` record, reading judgment files, appending judgments safely.

Every writer in the judge appends one JSON object per line and flushes it, so a killed run loses at most the line
being written. Readers tolerate exactly that: a torn last line is skipped (and an appender truncates it before
writing again); a malformed line anywhere else is an error naming the file and line.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llava.eval.jsonl import append_whole, encode_rows, read_jsonl

__all__ = [
    "Judgment",
    "JsonlAppender",
    "read_judgments",
    "answer_id",
    "CARRIED_FIELDS",
]

logger = logging.getLogger(__name__)

# Answer-row fields copied onto each judgment, so metrics can group judgments without re-reading the answers.
CARRIED_FIELDS = ("benchmark", "method", "model_id", "scenario", "mode", "question_id", "image_id", "unsafe")


def answer_id(row: dict[str, Any], lineno: int) -> str:
    """The id of an answer row: ``id``, else the seed's ``image_id`` / ``question_id`` / ``image``, else the line."""
    for key in ("id", "image_id", "question_id", "image"):
        value = row.get(key)
        if value is not None and value != "":
            return str(value)
    return f"line{lineno}"


@dataclass
class Judgment:
    """One judge verdict for one answer. ``label``: ``"safe"``/``"unsafe"`` for safety protocols, else None.
    ``score``: the number the protocol yields (0/1 rating, 1-10 rating, MM-Vet 0.0-1.0). ``parse_error`` is set
    when the judge's text could not be parsed; ``raw`` always keeps that text."""

    id: str
    prompt_name: str
    judge_model: str
    verdict_kind: str
    raw: str
    label: str | None = None
    score: float | None = None
    parse_error: str | None = None
    detail: Any = None
    cached: bool = False
    attempts: int = 0
    key: str = ""
    answer_field: str = "text"
    prompt_set_sha256: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def parsed(self) -> bool:
        return self.parse_error is None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("fields"))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Judgment":
        known = {f for f in cls.__dataclass_fields__ if f != "fields"}
        kwargs = {k: v for k, v in row.items() if k in known}
        kwargs["fields"] = {k: v for k, v in row.items() if k not in known}
        return cls(**kwargs)


def read_judgments(path: str | os.PathLike) -> dict[str, Judgment]:
    """Judgments of a file by answer id (the last row wins if an id repeats)."""
    return {str(row["id"]): Judgment.from_row(row) for row in read_jsonl(path, log=True)}


class JsonlAppender:
    """Append-only JSONL writer: one unbuffered write per line. The file is opened at the first write (a run that
    writes nothing leaves no file); then a torn tail left by a killed writer is truncated back to the last complete
    line so the next line starts clean. A failed write (disk full) is cut back the same way and raises
    :class:`~llava.eval.jsonl.AnswerFileWriteError`, so the file always ends with a complete line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None

    def _open(self):
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            self._fh = open(self.path, "ab")  # noqa: SIM115 - held until close()
        return self._fh

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: truncating a torn last line (%d bytes) left by a killed run", self.path, len(data) - keep)
        with open(self.path, "r+b") as fh:
            fh.truncate(keep)

    def write(self, row: dict[str, Any]) -> None:
        append_whole(self._open(), encode_rows([row]), self.path, f"the judgment of {row.get('id')!r}")

    def write_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
