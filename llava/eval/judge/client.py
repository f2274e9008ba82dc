"""The judge's HTTP side: the official ``openai`` client against any OpenAI-compatible endpoint, with our own
bounded retries (the client's built-in retries are off so every attempt is counted and budgeted).

Retried: 408, 409, 429, 5xx, timeouts, connection errors, malformed bodies (not JSON, no choices, no text).
Not retried: 401/403 (``AuthError``: the run stops), other 4xx and content-filter refusals (``BackendError`` for
that answer). ``Retry-After`` / ``retry-after-ms`` is honoured; otherwise exponential backoff with jitter.
"""
from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from llava.errors import AuthError, BackendError, BackendTimeoutError
from llava.eval.judge.config import JudgeConfig, RetryPolicy
from llava.extras import require_extra
from llava.http_client import openai_base_url

openai = require_extra("openai", "eval", "the judge (and the metrics and reports, which read its files)")

__all__ = ["JudgeClient", "Completion", "RequestStats", "BudgetExhaustedError", "MalformedResponseError", "make_openai"]

logger = logging.getLogger(__name__)
_RETRY_STATUS = {408, 409, 429}


class BudgetExhaustedError(BackendError):
    """The run's request budget (``max_requests``) is spent; the answer stays pending for a later run."""

    code = "budget_exhausted"


class MalformedResponseError(BackendError):
    code = "malformed_response"


@dataclass(frozen=True)
class Completion:
    text: str
    attempts: int


class RequestStats:
    """Thread-safe counters for one run: requests sent, successes, faults by kind, retries, give-ups."""

    def __init__(self, max_requests: int | None):
        self._lock = threading.Lock()
        self.max_requests = max_requests
        self.requests = 0
        self.successes = 0
        self.retries = 0
        self.faults: Counter[str] = Counter()
        self.delays: list[float] = []

    def take(self) -> bool:
        """Reserve one request from the budget; False when it is spent."""
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                return False
            self.requests += 1
            return True

    def record(self, *, fault: str | None = None, retry_delay: float | None = None, success: bool = False) -> None:
        with self._lock:
            if fault:
                self.faults[fault] += 1
            if retry_delay is not None:
                self.retries += 1
                self.delays.append(retry_delay)
            if success:
                self.successes += 1

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "successes": self.successes, "retries": self.retries,
                    "faults": dict(self.faults), "max_requests": self.max_requests}


def make_openai(config: JudgeConfig) -> openai.OpenAI:
    """The openai client: key from ``OPENAI_API_KEY``, base URL from the config or ``OPENAI_BASE_URL``."""
    base_url = openai_base_url(config.base_url)
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if base_url is None:
            raise AuthError("OPENAI_API_KEY is not set (needed for the default OpenAI endpoint)")
        logger.info("OPENAI_API_KEY is not set; sending a placeholder key to %s", base_url)
        key = "EMPTY"
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=config.timeout, max_retries=0)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (number or HTTP date); None when absent or unreadable."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def backoff_delay(policy: RetryPolicy, retry: int, rng: random.Random) -> float:
    base = min(policy.max_delay, policy.base_delay * (2 ** (retry - 1)))
    return base * (1.0 - policy.jitter * rng.random())


def _content(resp: Any) -> str:
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedResponseError(f"response without choices: {str(resp)[:120]!r}")
    choice = choices[0]
    content = getattr(getattr(choice, "message", None), "content", None)
    if getattr(choice, "finish_reason", None) == "content_filter":
        raise BackendError("the judge endpoint refused the request (finish_reason=content_filter)")
    if not isinstance(content, str):
        raise MalformedResponseError(f"response message has no text content: {str(choice)[:120]!r}")
    return content


class JudgeClient:
    """One per run; thread-safe. ``sleep`` and ``rng`` are injectable so tests can see and skip the delays."""

    def __init__(
        self,
        config: JudgeConfig,
        *,
        openai_client: openai.OpenAI | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.policy = config.retry
        self._client = openai_client or make_openai(config)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.stats = RequestStats(config.max_requests)

    def _classify(self, exc: Exception) -> tuple[str, float | None]:
        """(fault kind, Retry-After seconds) for a retryable error; raises for the rest."""
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            self.stats.record(fault=str(exc.status_code))
            raise AuthError(f"judge endpoint rejected the credentials (HTTP {exc.status_code}): {exc.message}") from exc
        if isinstance(exc, openai.APITimeoutError):
            return "timeout", None
        if isinstance(exc, openai.APIConnectionError):
            return "connection", None
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status in _RETRY_STATUS or status >= 500:
                return (str(status) if status < 500 else "5xx"), retry_after_seconds(exc.response.headers)
            self.stats.record(fault=str(status))
            raise BackendError(f"judge endpoint answered HTTP {status}: {exc.message}") from exc
        if isinstance(exc, (MalformedResponseError, ValueError, openai.APIResponseValidationError)):
            return "malformed", None
        raise exc

    def _delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.policy.max_retry_after)
        return backoff_delay(self.policy, retry, self._rng)

    def complete(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        """The judge's text for ``messages``; raises ``AuthError``, ``BudgetExhaustedError`` or ``BackendError``."""
        params = {k: v for k, v in params.items() if v is not None}
        last = "no attempt"
        for attempt in range(1, self.policy.max_attempts + 1):
            if not self.stats.take():
                raise BudgetExhaustedError(f"request budget of {self.stats.max_requests} spent")
            try:
                resp = self._client.chat.completions.create(model=self.config.judge_model, messages=messages, **params)
                text = _content(resp)
            except Exception as exc:  # noqa: BLE001 - sorted into retry / raise by _classify
                kind, retry_after = self._classify(exc)
                last = f"{kind}: {exc}"[:300]
                if attempt == self.policy.max_attempts:
                    self.stats.record(fault=kind)
                    break
                delay = self._delay(attempt, retry_after)
                self.stats.record(fault=kind, retry_delay=delay)
                logger.info("judge request failed (%s, attempt %d/%d); retrying in %.2fs", last, attempt,
                            self.policy.max_attempts, delay)
                self._sleep(delay)
                continue
            self.stats.record(success=True)
            return Completion(text, attempt)
        error = BackendTimeoutError if last.startswith("timeout") else BackendError
        raise error(f"judge request gave up after {self.policy.max_attempts} attempts; last error {last}")
