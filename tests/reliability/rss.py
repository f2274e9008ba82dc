"""Resident memory of a service process, from /proc: what the memory tests measure attacks with."""
from __future__ import annotations

from pathlib import Path

MiB = 1024 * 1024


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


class Meter:
    """Peak and current RSS of a process relative to its RSS when the meter starts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
        self.base = _status(pid, "VmRSS")

    @property
    def peak(self) -> int:
        return _status(self.pid, "VmHWM") - self.base

    @property
    def now(self) -> int:
        return _status(self.pid, "VmRSS") - self.base
