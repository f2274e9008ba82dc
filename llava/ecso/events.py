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

__all__ = ["Step", "StepEvent", "ECSOProgress", "ECSOResult"]


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
    ``index``: the sample within a batch; ``elapsed``: seconds the step took (``final``: the whole run)."""

    step: Step
    index: int = 0
    text: str | None = None
    delta: str | None = None
    done: bool = True
    flagged: bool | None = None
    harm_score: float | None = None
    elapsed: float | None = None

    def __post_init__(self) -> None:
        self.step = Step(self.step)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ECSOProgress:
    """What a run's events said so far: each finished step's text (``safe`` is the safe answer), the verdict, the
    final answer and the seconds per step. :meth:`apply` takes one event and returns the text a delta adds
    (``None`` for a finished step)."""

    direct: str | None = None
    flagged: bool | None = None
    harm_score: float | None = None
    verdict_text: str | None = None
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
        else:
            setattr(self, step.value, (event.text or "").strip())
        return None

    @property
    def has_verdict(self) -> bool:
        return self.flagged is not None


@dataclass
class ECSOResult:
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_events(cls, query: str, events: Iterable[StepEvent], verdict_mode: str,
                    options: dict[str, Any] | None = None) -> ECSOResult:
        """The result of one sample's run from its events (deltas are skipped; the done events carry the text)."""
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
                   final=progress.final, verdict_mode=verdict_mode, timings=dict(progress.timings),
                   options=dict(options or {}))
