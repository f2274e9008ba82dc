"""Persistent judge cache: sqlite, one row per judge request, keyed by ``protocols.cache_key`` (sha256 of judge
model, prompt name, filled messages and sampling parameters). It stores the judge's *text* (and, for MM-Vet, every
attempt), never a parsed verdict, so parser changes apply to cached answers too. Each ``put`` commits, so a
killed run keeps everything it paid for; several processes may share one file. A cache that fails (disk full)
is logged once and the run goes on without it.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["JudgeCache"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_cache (
    key TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    prompt_name TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class JudgeCache:
    """``path=None`` keeps the cache in memory (library use without persistence)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.broken = False
        try:
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                       timeout=30)
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.Error as exc:
            self._fail(exc)
            self._db = sqlite3.connect(":memory:", check_same_thread=False)

    def _fail(self, exc: sqlite3.Error) -> None:
        """The cache is an optimisation: after a failure (disk full, I/O error) the run goes on without it."""
        if not self.broken:
            logger.warning("judge cache %s failed (%s); continuing without it", self.path or ":memory:", exc)
        self.broken = True

    def get(self, key: str) -> dict[str, Any] | None:
        if self.broken:
            return None
        try:
            with self._lock:
                row = self._db.execute("SELECT payload FROM judge_cache WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._fail(exc)
            return None
        return json.loads(row[0]) if row else None

    def put(self, key: str, judge_model: str, prompt_name: str, payload: dict[str, Any]) -> None:
        if self.broken:
            return
        blob = json.dumps(payload, ensure_ascii=False)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO judge_cache (key, judge_model, prompt_name, payload, created) "
                    "VALUES (?,?,?,?,?)",
                    (key, judge_model, prompt_name, blob, time.time()),
                )
                self._db.commit()
        except sqlite3.Error as exc:
            self._fail(exc)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judge_cache").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - a broken database may refuse to close cleanly
                logger.warning("closing the judge cache %s: %s", self.path, exc)

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
