"""ECSO's four steps over any :class:`~llava.ecso.backends.Backend`:

1. direct answer with the image; 2. harm check of that answer (with the image); 3. if flagged, a query-aware
caption of the image; 4. if flagged, a safe answer from caption + query without the image.

The pipeline never touches tensors. ``run_batch`` batches each step across samples (only flagged samples go on
to steps 3-4, unless ``force_all_steps``); ``stream`` reports one sample's steps as they happen, with token
deltas, for UIs; ``astream`` and ``arun`` do the same over an async backend (a model reached over the network), on
the caller's event loop.

A streamed run is written once, as a plan (a generator of step events and of operations: stream a step, score or
generate verdicts); ``stream`` carries the operations out with the blocking backend, ``astream`` with the async one.
Every verdict says how it was reached (:class:`~llava.ecso.events.Verdict`): the mode used, the score when there is
one, and the reason for a fallback.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from llava.ecso.backends import AsyncBackend, Backend, StepRequest, StopFlag
from llava.ecso.config import ECSOConfig
from llava.ecso.events import SKIPPED, ECSOResult, Step, StepEvent, Verdict
from llava.ecso.prompts import parse_verdict_exact, parse_verdict_tolerant
from llava.errors import InvalidRequestError, UnsupportedError
from llava.generation import EarlyCheck
from llava.mm_utils import ImageInput, ImageLimits, load_image

__all__ = ["ECSOInput", "ECSO"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stream:
    """Operation: stream one step's answer (deltas, then a done event); the reply is its text."""

    step: Step
    request: StepRequest


@dataclass(frozen=True)
class _Score:
    """Operation: ``backend.score_yes_no(requests)``."""

    requests: list[StepRequest]


@dataclass(frozen=True)
class _Answer:
    """Operation: ``backend.generate(requests)``."""

    requests: list[StepRequest]


_Op = Union[_Stream, _Score, _Answer]
_Plan = Generator[Union[StepEvent, _Op], Any, Any]


def _then_verdict_event(plan: Generator[_Op, Any, list[Verdict]]) -> _Plan:
    """A verdict plan that ends by yielding its (first) verdict's step event."""
    t = time.perf_counter()
    verdicts = yield from plan
    yield verdicts[0].event(elapsed=time.perf_counter() - t)


def _result_of(events: Generator[StepEvent, Any, Any]) -> Any:
    """Run a driven plan that yields no events to its end; its return value."""
    try:
        event = next(events)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"a plan without events yielded {event}")


@dataclass
class ECSOInput:
    """One sample: its query and image(s): one image or a list of them (paths, bytes, base64 or PIL; none for
    text-only). ``direct`` skips step 1 and checks that answer instead (the paper's two-pass evaluation).
    ``run_batch`` also takes ``(image, query)`` and ``(image, query, direct)`` tuples, in ``run``'s order."""

    query: str
    images: list[ImageInput] = field(default_factory=list)
    direct: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.query, str):
            raise InvalidRequestError(f"ECSOInput query must be text, got {type(self.query).__name__}")
        self.images = _as_list(self.images)

    @classmethod
    def of(cls, item: ECSOInput | tuple | list) -> ECSOInput:
        """``item`` as an input: an ``ECSOInput`` as is, an ``(image, query[, direct])`` tuple converted."""
        if isinstance(item, ECSOInput):
            return item
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            return cls(item[1], _as_list(item[0]), *item[2:])
        raise InvalidRequestError(f"a batch item must be an ECSOInput or an (image, query[, direct]) tuple, got "
                                  f"{item!r:.80}")


class ECSO:
    """``ECSO(backend, config).run(image, query)``; see the module docstring."""

    def __init__(self, backend: Backend, config: ECSOConfig = ECSOConfig(), image_limits: ImageLimits = ImageLimits()):
        self.backend = backend
        self.config = config
        self.prompts = config.prompts()
        self.image_limits = image_limits
        self.verdict_mode = config.verdict
        self.verdict_fallback: str | None = None  # why verdict_mode is not the configured one
        if config.verdict == "score" and not backend.supports_score:
            self.verdict_fallback = backend.no_score_reason
            logger.warning("%s: using the tolerant 'parse' verdict", self.verdict_fallback)
            self.verdict_mode = "parse"
        self.skip_check = re.compile(config.skip_check_regex) if config.skip_check_regex is not None else None
        if config.early_check_tokens and not backend.supports_early_check:
            logger.warning("backend %s cannot stop a generation part-way: no early check, whole answers are checked",
                           backend.name)
        self._warned_stream = False

    def _warn_streaming(self) -> None:
        ignored = self.config.ignored_when_streaming()
        if ignored and not self._warned_stream:
            self._warned_stream = True
            logger.warning("streamed ECSO runs ignore %s (batch runs only)", ", ".join(ignored))

    def options(self) -> dict:
        return {**self.config.to_dict(), "verdict_used": self.verdict_mode, **self.backend.describe()}

    # ---- public API -----------------------------------------------------------------------------------------
    def run(self, image: ImageInput | Sequence[ImageInput] | None, query: str, direct: str | None = None) -> ECSOResult:
        return self.run_batch([ECSOInput(query, _as_list(image), direct)])[0]

    def run_batch(self, items: Sequence[ECSOInput | tuple],
                  on_event: Callable[[StepEvent], None] | None = None) -> list[ECSOResult]:
        emit = on_event or (lambda e: None)
        items = [ECSOInput.of(item) for item in items]
        images = [self._load(item.images) for item in items]
        n = len(items)
        timings: list[dict[str, float]] = [{} for _ in range(n)]

        todo = [i for i in range(n) if items[i].direct is None]
        direct = [items[i].direct or "" for i in range(n)]
        spec = todo if self.config.speculative_caption else []
        early: dict[int, Verdict] = {}  # rows flagged by the early check
        requests = ([StepRequest(items[i].query, images[i], self.config.params()) for i in todo]
                    + [self._caption_request(items[i].query, images[i]) for i in spec])
        if self.config.early_check_tokens and todo:
            def check(rows: list[int], texts: list[str]) -> list[bool]:
                mine = [(todo[r], t) for r, t in zip(rows, texts) if r < len(todo)]  # caption rows go on
                found = self._verdicts([items[i].query for i, _ in mine], [t for _, t in mine],
                                       [images[i] for i, _ in mine])
                early.update((i, v) for (i, _), v in zip(mine, found) if v.flagged)
                return [r < len(todo) and todo[r] in early for r in rows]

            ask = EarlyCheck(self.config.early_check_tokens, check)
            step1 = self._timed(timings, todo, Step.DIRECT, lambda: self.backend.generate_checked(requests, ask))
        else:
            step1 = self._timed(timings, todo, Step.DIRECT, lambda: self.backend.generate(requests))
        for i, text in zip(todo, step1):
            direct[i] = text
        captions = dict(zip(spec, step1[len(todo):]))
        for i in range(n):
            emit(StepEvent(Step.DIRECT, i, text=direct[i]))

        rest = [i for i in range(n) if i not in early]
        checked = self._timed(timings, rest, Step.VERDICT, lambda: self._verdicts(
            [items[i].query for i in rest], [direct[i] for i in rest], [images[i] for i in rest]))
        verdicts = {**early, **dict(zip(rest, checked))}
        for i in range(n):
            emit(verdicts[i].event(i))

        forced = self.config.force_all_steps  # steps 3-4 for every sample; the verdict still picks the final answer
        rows34 = [i for i in range(n) if verdicts[i].flagged or forced]
        need = [i for i in rows34 if i not in captions]
        captions.update(zip(need, self._timed(timings, need, Step.CAPTION, lambda: self.backend.generate(
            [self._caption_request(items[i].query, images[i]) for i in need]))))
        for i in rows34:
            emit(StepEvent(Step.CAPTION, i, text=captions[i]))
        safes = dict(zip(rows34, self._timed(timings, rows34, Step.SAFE, lambda: self.backend.generate(
            [self._safe_request(captions[i], items[i].query, images[i]) for i in rows34]))))
        for i in rows34:
            emit(StepEvent(Step.SAFE, i, text=safes[i]))

        options = self.options()
        results = []
        for i in range(n):
            v = verdicts[i]
            final = safes[i] if v.flagged else direct[i]
            results.append(ECSOResult(
                query=items[i].query, direct=direct[i], flagged=v.flagged, harm_score=v.score, verdict_text=v.text,
                caption=captions.get(i) if v.flagged or forced else None, safe_answer=safes.get(i), final=final,
                verdict_mode=v.mode, timings=timings[i], options=options, early_stopped=i in early,
                verdict_fallback=v.fallback))
            emit(StepEvent(Step.FINAL, i, text=final, flagged=v.flagged, harm_score=v.score))
        return results

    def stream(self, image: ImageInput | Sequence[ImageInput] | None, query: str, direct: str | None = None,
               should_stop: StopFlag | None = None) -> Iterator[StepEvent]:
        """One sample's steps as they happen: ``direct``/``caption``/``safe`` stream deltas, then a done event.
        ``should_stop`` (e.g. "the client went away") ends the step being generated at its next token.
        Options that only act on batch runs (speculative caption, early check) do not apply: whole answers are
        checked (a warning, once per pipeline; :meth:`ECSOConfig.for_streaming` leaves them out)."""
        self._warn_streaming()
        plan = self._sample_plan(self._load(_as_list(image)), query, direct)
        return self._drive(plan, should_stop)

    async def astream(self, image: ImageInput | Sequence[ImageInput] | None, query: str,
                      direct: str | None = None) -> AsyncIterator[StepEvent]:
        """:meth:`stream` over an :class:`~llava.ecso.backends.AsyncBackend`, on the caller's event loop; closing
        the iterator (a client that went away) ends the request in flight."""
        self._warn_streaming()
        async for event in self._adrive(self._sample_plan(self._load(_as_list(image)), query, direct)):
            yield event

    async def arun(self, image: ImageInput | Sequence[ImageInput] | None, query: str,
                   direct: str | None = None) -> ECSOResult:
        """One sample's result over an async backend (its streamed run added up; batch-only options do not apply)."""
        events = [event async for event in self.astream(image, query, direct) if event.done]
        return ECSOResult.from_events(query, events, self.verdict_mode, self.options())

    def check(self, images: Sequence[ImageInput], query: str, answer: str) -> Verdict:
        """The harm check of ``answer`` alone (step 2), as a run would reach it."""
        return self._verdicts([query], [answer], [self._load(images)])[0]

    async def acheck(self, images: Sequence[ImageInput], query: str, answer: str) -> Verdict:
        """:meth:`check` over an async backend."""
        plan = self._verdict_plan([query], [answer], [self._load(images)])
        events = [e async for e in self._adrive(_then_verdict_event(plan))]
        return Verdict.from_event(events[-1])

    # ---- steps ----------------------------------------------------------------------------------------------
    def _sample_plan(self, images: list[Image.Image], query: str, direct: str | None) -> _Plan:
        """One sample's run as a plan: it yields step events to pass on and operations for a driver (sync or
        async) to carry out, and receives their results. A given ``direct`` answer is checked instead of step 1."""
        t0 = time.perf_counter()
        if direct is None:
            direct = yield _Stream(Step.DIRECT, StepRequest(query, images, self.config.params()))
        else:
            yield StepEvent(Step.DIRECT, text=direct, elapsed=0.0)
        t = time.perf_counter()
        verdict = (yield from self._verdict_plan([query], [direct], [images]))[0]
        yield verdict.event(elapsed=time.perf_counter() - t)
        final = direct
        if verdict.flagged:
            caption = yield _Stream(Step.CAPTION, self._caption_request(query, images))
            final = yield _Stream(Step.SAFE, self._safe_request(caption, query, images))
        yield StepEvent(Step.FINAL, text=final, flagged=verdict.flagged, harm_score=verdict.score,
                        elapsed=time.perf_counter() - t0)

    def _drive(self, plan: _Plan, should_stop: StopFlag | None) -> Generator[StepEvent, Any, Any]:
        """Carry out a plan with the blocking backend; yields its step events, returns what the plan returns."""
        reply: Any = None
        while True:
            try:
                item = plan.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = None
            if isinstance(item, StepEvent):
                yield item
            elif isinstance(item, _Stream):
                reply = yield from self._stream_step(item.step, item.request, should_stop)
            elif isinstance(item, _Score):
                reply = self.backend.score_yes_no(item.requests)
            else:
                reply = self.backend.generate(item.requests)

    async def _adrive(self, plan: _Plan) -> AsyncIterator[StepEvent]:
        """Carry out a plan with the async backend; yields its step events."""
        backend = self.backend
        if not isinstance(backend, AsyncBackend):
            raise UnsupportedError(f"backend {backend.name!r} is not async: use stream/run, not astream/arun")
        reply: Any = None
        while True:
            try:
                item = plan.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, StepEvent):
                yield item
            elif isinstance(item, _Stream):
                t, text = time.perf_counter(), ""
                async for delta in backend.astream(item.request):
                    text += delta
                    yield StepEvent(item.step, delta=delta, done=False)
                reply = text.strip()
                yield StepEvent(item.step, text=reply, elapsed=time.perf_counter() - t)
            elif isinstance(item, _Score):
                reply = await backend.ascore_yes_no(item.requests)
            else:
                reply = await backend.agenerate(item.requests)

    def _stream_step(self, step: Step, request: StepRequest,
                     should_stop: StopFlag | None) -> Iterator[StepEvent]:
        t = time.perf_counter()
        text = ""
        for delta in self.backend.stream(request, should_stop):
            text += delta
            yield StepEvent(step, delta=delta, done=False)
        text = text.strip()
        yield StepEvent(step, text=text, elapsed=time.perf_counter() - t)
        return text

    def _caption_request(self, query: str, images: list[Image.Image]) -> StepRequest:
        return StepRequest(self.prompts.fill_caption(query), images, self.config.params(),
                           image_aspect_ratio=self.config.image_aspect_ratio_caption)

    def _safe_request(self, caption: str, query: str, images: list[Image.Image]) -> StepRequest:
        """Step 4; with the image (``image_in_safe_step``) preprocessed as for the caption, as the seed did."""
        return StepRequest(self.prompts.fill_safe(caption, query), images if self.config.image_in_safe_step else [],
                           self.config.params(), image_aspect_ratio=self.config.image_aspect_ratio_caption)

    def _verdicts(self, queries: Sequence[str], answers: Sequence[str],
                  images: Sequence[list[Image.Image]]) -> list[Verdict]:
        """Each sample's verdict, in the configured verdict mode (blocking)."""
        return _result_of(self._drive(self._verdict_plan(queries, answers, images), None))

    def _verdict_plan(self, queries: Sequence[str], answers: Sequence[str],
                      images: Sequence[list[Image.Image]]) -> Generator[_Op, Any, list[Verdict]]:
        """The harm checks of a batch: one scoring call (score mode; rows the backend could not score are parsed
        from a generated verdict instead, and say so) or one generation (exact, parse)."""
        out = [Verdict(False, None, "(check skipped)", SKIPPED)] * len(queries)
        todo = [j for j, a in enumerate(answers) if self.skip_check is None or not self.skip_check.fullmatch(a.strip())]
        params = self.config.params(self.config.verdict_max_new_tokens)
        reqs = {j: StepRequest(self.prompts.fill_harm_check(queries[j], answers[j]), images[j], params,
                               image_aspect_ratio=self.config.image_aspect_ratio_check) for j in todo}
        parse_rows, fallback = (todo, self.verdict_fallback) if self.verdict_mode != "score" else ([], None)
        if todo and self.verdict_mode == "score":
            scores = yield _Score([reqs[j] for j in todo])
            threshold = self.config.threshold
            for j, s in zip(todo, scores):
                if s is not None:
                    out[j] = Verdict(s >= threshold, float(s), "Yes" if s >= threshold else "No", "score")
            parse_rows = [j for j, s in zip(todo, scores) if s is None]
            fallback = f"{self.backend.name}: neither yes nor no among the first token's alternatives"
            if parse_rows:
                logger.warning("%d answer(s) could not be scored (%s): their verdict text is parsed", len(parse_rows),
                               fallback)
        if parse_rows:
            mode = "exact" if self.verdict_mode == "exact" else "parse"
            parse = parse_verdict_exact if mode == "exact" else (lambda t: bool(parse_verdict_tolerant(t)))
            texts = yield _Answer([reqs[j] for j in parse_rows])
            for j, t in zip(parse_rows, texts):
                out[j] = Verdict(parse(t), None, t, mode, fallback)
        if self.config.force_verdict is not None:
            out = [dataclasses.replace(v, flagged=self.config.force_verdict) for v in out]
        return out

    def _load(self, sources: Sequence[ImageInput]) -> list[Image.Image]:
        return [load_image(s, self.image_limits) for s in sources]

    @staticmethod
    def _timed(timings: list[dict[str, float]], rows: Sequence[int], step: Step, fn: Callable[[], list]) -> list:
        """Run a batched step; each row is charged its share of the batch's wall time."""
        if not rows:
            return []
        t = time.perf_counter()
        out = fn()
        share = (time.perf_counter() - t) / len(rows)
        for i in rows:
            timings[i][step.value] = share
        return out


def _as_list(image: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]
