"""Typed judge configuration, built once (from argparse or by a library caller) and passed down.

The API key is deliberately *not* a field: it is read from ``OPENAI_API_KEY`` when the client is made, so it
never lands in a config dump, a summary file or a log line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RetryPolicy", "JudgeConfig"]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on 429 / 5xx / timeouts / connection errors / malformed bodies. Delay before retry ``n`` (1-based)
    is ``min(max_delay, base_delay * 2**(n-1))`` scaled by a random factor in ``[1 - jitter, 1]``; a
    ``Retry-After`` header replaces it (capped at ``max_retry_after``). 401/403 and other 4xx are never retried."""

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.5
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad backoff: base {self.base_delay}, max {self.max_delay}, jitter {self.jitter}")


@dataclass
class JudgeConfig:
    judge_model: str
    benchmark: str = "vlsafe"
    base_url: str | None = None  # None: OPENAI_BASE_URL, else the openai client's default
    judge_file: Path | None = None  # None: the project's prompt set for the benchmark
    mode: str = "auto"  # "auto" or a prompt name used for every answer
    answer_field: str = "text"  # "direct" judges an ECSO row's direct answer (harm-detector labels)
    parallel: int = 30
    output_dir: Path | None = None  # None: no judgments file (library use)
    output_stem: str = "answers"  # judgments go to <output_dir>/<stem>[.<field>].judgments.jsonl
    cache_path: Path | None = None  # None: <output_dir>/judge_cache.sqlite (in memory without an output dir)
    timeout: float = 60.0
    temperature: float = 0.0
    max_tokens: int | None = None
    max_requests: int | None = None  # budget: HTTP requests this run may send, retries included
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ground_truth: Path | None = None  # graded benchmarks: their ground truth (MM-Vet: mm-vet.json)
    grader_tries: int = 5  # graded benchmarks: replies asked for before a sample scores 0.0

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {self.max_requests}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")

    @property
    def judgments_path(self) -> Path | None:
        if self.output_dir is None:
            return None
        infix = "" if self.answer_field == "text" else f".{self.answer_field}"
        return Path(self.output_dir) / f"{self.output_stem}{infix}.judgments.jsonl"

    @property
    def summary_path(self) -> Path | None:
        path = self.judgments_path
        return None if path is None else path.with_name(path.name.replace(".judgments.jsonl", ".judge.json"))

    @property
    def resolved_cache_path(self) -> Path | None:
        if self.cache_path is not None:
            return Path(self.cache_path)
        return None if self.output_dir is None else Path(self.output_dir) / "judge_cache.sqlite"

    def params(self) -> dict[str, Any]:
        """Sampling parameters sent with every request (part of the cache key)."""
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        return params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
