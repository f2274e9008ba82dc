"""Counts and rates with 95% Wilson score intervals, and the ECSO flag rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Rate", "wilson_interval", "flag_rate", "rate_text", "Z95"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def complement(self) -> "Rate":
        return Rate(self.n - self.k, self.n)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci95
        clean = lambda x: None if math.isnan(x) else round(x, 6)  # noqa: E731 - JSON has no NaN
        return {"k": self.k, "n": self.n, "rate": clean(self.value), "ci95": [clean(lo), clean(hi)]}

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        lo, hi = self.ci95
        return f"{100 * self.value:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({self.k}/{self.n})"


def flag_rate(rows: Iterable[dict[str, Any]]) -> Rate | None:
    """Share of answers ECSO's self-check replaced (``unsafe == "Yes"``); None for rows without the field
    (direct runs). On a utility benchmark this is the false-alarm rate."""
    marks = [r["unsafe"] for r in rows if r.get("unsafe") is not None]
    if not marks:
        return None
    return Rate(sum(1 for m in marks if str(m).strip().lower() == "yes"), len(marks))


def rate_text(d: dict[str, Any] | None) -> str:
    """A rate as ``Rate.to_dict`` wrote it, as text (``-`` when absent)."""
    return str(Rate(d["k"], d["n"])) if d else "-"
