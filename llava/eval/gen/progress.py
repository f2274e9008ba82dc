"""The generation progress bar: it advances per step of a batch, not only per finished batch, and says which step
runs, so a slow first batch does not sit at 0 with no rate or ETA.

A sample counts 1 when done. An ECSO sample earns its share as its steps finish: the direct answer 0.4, the harm
check the rest when it is not flagged (0.1 when it is), then the caption and the safe answer 0.25 each. A direct run
has one step, so its samples count when their batch is answered. The bar redraws every ``TICK_S`` seconds in between,
so the elapsed time moves while a step runs.
"""
from __future__ import annotations

import threading

from tqdm import tqdm

from llava.ecso.events import Step, StepEvent

__all__ = ["STEP_CREDIT", "GenerationProgress", "BatchProgress"]

TICK_S = 2.0
# A step's share of a sample (verdict: when the sample is flagged; a sample that is not gets the rest of its 1).
STEP_CREDIT = {Step.DIRECT: 0.4, Step.VERDICT: 0.1, Step.CAPTION: 0.25, Step.SAFE: 0.25}
_LABELS = {Step.DIRECT: "answer", Step.VERDICT: "harm check", Step.CAPTION: "caption", Step.SAFE: "safe answer"}


class GenerationProgress:
    """A tqdm bar over ``total`` samples (``enabled=False``: nothing is drawn)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, file=None):
        self.bar = tqdm(total=total, unit="sample", desc=desc, disable=not enabled, dynamic_ncols=True, file=file,
                        mininterval=0.5, bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, "
                                                    "{rate_fmt}{postfix}]")
        self._lock = threading.Lock()
        self._step = ""
        self._stats: dict[str, object] = {}
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress-tick", daemon=True)
        if enabled:
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                self.bar.refresh()

    def _postfix(self) -> None:
        parts = {"step": self._step} if self._step else {}
        self.bar.set_postfix({**parts, **self._stats}, refresh=True)

    def batch(self, size: int) -> BatchProgress:
        """The tracker of one batch of ``size`` samples (its events, then its end)."""
        return BatchProgress(self, size)

    def stats(self, **values: object) -> None:
        with self._lock:
            self._stats.update(values)
            self._postfix()

    def _advance(self, amount: float, step: str | None = None) -> None:
        with self._lock:
            if step is not None:
                self._step = step
            if amount:
                self.bar.update(amount)
            self._postfix()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.bar.close()


class BatchProgress:
    """One batch's share of the bar: step events move it (``on_event``), ``finish`` adds what they did not."""

    def __init__(self, progress: GenerationProgress, size: int):
        self.progress = progress
        self.size = size
        self.credited = 0.0
        self._flagged: set[int] = set()
        progress._advance(0, f"{_LABELS[Step.DIRECT]} x{size}")

    def on_event(self, event: StepEvent) -> None:
        """Take a finished step of one sample (deltas and the final event are ignored)."""
        if not event.done or event.step not in STEP_CREDIT:
            return
        credit = STEP_CREDIT[event.step]
        if event.step is Step.VERDICT:
            if event.flagged:
                self._flagged.add(event.index)
            else:
                credit = 1.0 - STEP_CREDIT[Step.DIRECT]
        nxt = {Step.DIRECT: Step.VERDICT, Step.VERDICT: Step.CAPTION, Step.CAPTION: Step.SAFE}.get(event.step)
        label = f"{_LABELS[nxt]} x{len(self._flagged) if nxt is not Step.VERDICT else self.size}" if nxt else None
        if nxt is Step.CAPTION and not self._flagged:
            label = None
        credit = min(credit, self.size - self.credited)  # a failed batch retried one sample at a time re-sends steps
        self.credited += credit
        self.progress._advance(credit, label)

    def finish(self, attempted: int) -> None:
        """The batch is done: ``attempted`` samples count in full."""
        rest = attempted - self.credited
        self.credited = float(attempted)
        self.progress._advance(max(rest, 0.0))
