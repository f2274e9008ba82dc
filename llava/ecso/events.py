"""ECSO's steps, the events a run emits, and the result they add up to.

:class:`Step` names the steps once (the wire adds ``error``, see :mod:`llava.serve.protocol.ecso`). A run emits
:class:`StepEvent` objects (``ECSO.stream`` with text deltas, ``ECSO.run_batch(on_event=...)`` per sample);
:class:`ECSOProgress` adds events up, for a front-end that shows a run as it happens, and
:meth:`ECSOResult.from_events` turns a whole run's events back into its :class:`ECSOResult`.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Step", "StepEvent", "Verdict", "SKIPPED", "ECSOProgress", "ECSOResult"]

SKIPPED = "skipped"  # the verdict mode of an answer that skipped the check (``skip_check_regex``)


class Step(str, enum.Enum):
    """A step of an ECSO run, in order. ``direct``, ``caption`` and ``safe`` generate text (and stream it);
    ``verdict`` is the harm check; ``final`` closes the run with the answer to show."""

    DIRECT = "direct"
    VERDICT = "verdict"
    CAPTION = "caption"
    SAFE = "safe"
    FINAL = "final"

    def __str__(self) -> str:  # f"{step}" is its name on the wire, as for a plain string
        return self.value

    @property
    def generates(self) -> bool:
        """Whether the step generates text (and streams deltas)."""
        return self in (Step.DIRECT, Step.CAPTION, Step.SAFE)


@dataclass
class StepEvent:
    """A step's progress: ``delta`` while a step streams, then one event with ``done=True`` and its ``text``.
    ``index``: the sample within a batch; ``elapsed``: seconds the step took (``final``: the whole run). A
    ``verdict`` event says how it was reached: ``verdict_mode`` (the mode used) and ``verdict_fallback`` (why that is
    not the configured one), see :class:`Verdict`."""

    step: Step
    index: int = 0
    text: str | None = None
    delta: str | None = None
    done: bool = True
    flagged: bool | None = None
    harm_score: float | None = None
    elapsed: float | None = None
    verdict_mode: str | None = None
    verdict_fallback: str | None = None

    def __post_init__(self) -> None:
        self.step = Step(self.step)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Verdict:
    """The harm check of one answer, as it was actually reached. ``mode``: the verdict mode used (``score``,
    ``exact``, ``parse``, or ``skipped`` when the answer skipped the check); ``score``: P(yes) when the answer was
    scored, else ``None`` (never a made-up number); ``text``: the model's verdict text; ``fallback``: why ``mode``
    is not the configured one (e.g. "the endpoint returns no logprobs"), ``None`` when it is."""

    flagged: bool
    score: float | None
    text: str | None
    mode: str
    fallback: str | None = None

    @classmethod
    def from_event(cls, event: StepEvent) -> Verdict:
        """The verdict a ``verdict`` step event carries."""
        return cls(bool(event.flagged), event.harm_score, event.text, event.verdict_mode or "", event.verdict_fallback)

    def event(self, index: int = 0, elapsed: float | None = None) -> StepEvent:
        return StepEvent(Step.VERDICT, index, text=self.text, flagged=self.flagged, harm_score=self.score,
                         elapsed=elapsed, verdict_mode=self.mode, verdict_fallback=self.fallback)


@dataclass
class ECSOProgress:
    """What a run's events said so far: each finished step's text (``safe`` is the safe answer), the verdict, the
    final answer and the seconds per step. :meth:`apply` takes one event and returns the text a delta adds
    (``None`` for a finished step)."""

    direct: str | None = None
    flagged: bool | None = None
    harm_score: float | None = None
    verdict_text: str | None = None
    verdict_mode: str | None = None
    verdict_fallback: str | None = None
    caption: str | None = None
    safe: str | None = None
    final: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def apply(self, event: StepEvent) -> str | None:
        if not event.done:
            return event.delta or ""
        step = event.step
        if step is Step.FINAL:
            self.final = event.text
            if event.flagged is not None:
                self.flagged = event.flagged
            return None
        if event.elapsed is not None:
            self.timings[step.value] = event.elapsed
        if step is Step.VERDICT:
            self.flagged, self.harm_score, self.verdict_text = bool(event.flagged), event.harm_score, event.text
            self.verdict_mode, self.verdict_fallback = event.verdict_mode, event.verdict_fallback
        else:
            setattr(self, step.value, (event.text or "").strip())
        return None

    @property
    def has_verdict(self) -> bool:
        return self.flagged is not None


@dataclass
class ECSOResult:
    """One sample's run. ``verdict_mode``, ``harm_score`` and ``verdict_fallback`` say how its verdict was reached
    (:class:`Verdict`)."""

    query: str
    direct: str
    flagged: bool
    harm_score: float | None
    verdict_text: str | None
    caption: str | None
    safe_answer: str | None
    final: str
    verdict_mode: str
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    early_stopped: bool = False  # flagged by the early check: ``direct`` holds only its first tokens
    verdict_fallback: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_events(cls, query: str, events: Iterable[StepEvent], verdict_mode: str,
                    options: dict[str, Any] | None = None) -> ECSOResult:
        """The result of one sample's run from its events (deltas are skipped; the done events carry the text).
        ``verdict_mode``: the mode when the verdict event does not say."""
        progress = ECSOProgress()
        for event in events:
            progress.apply(event)
        return cls.from_progress(query, progress, verdict_mode, options)

    @classmethod
    def from_progress(cls, query: str, progress: ECSOProgress, verdict_mode: str,
                      options: dict[str, Any] | None = None) -> ECSOResult:
        if progress.final is None or progress.direct is None or progress.flagged is None:
            raise ValueError("the run's events end before its direct answer, verdict and final answer")
        return cls(query=query, direct=progress.direct, flagged=progress.flagged, harm_score=progress.harm_score,
                   verdict_text=progress.verdict_text, caption=progress.caption, safe_answer=progress.safe,
                   final=progress.final, verdict_mode=progress.verdict_mode or verdict_mode,
                   timings=dict(progress.timings), options=dict(options or {}),
                   verdict_fallback=progress.verdict_fallback)
