"""ECSO's four steps over any :class:`~llava.ecso.backends.Backend`:

1. direct answer with the image; 2. harm check of that answer (with the image); 3. if flagged, a query-aware
caption of the image; 4. if flagged, a safe answer from caption + query without the image.

The pipeline never touches tensors. ``run_batch`` batches each step across samples (only flagged samples go on
to steps 3-4); ``stream`` reports one sample's steps as they happen, with token deltas, for UIs.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from PIL import Image

from llava.ecso.backends import Backend, StepRequest, StopFlag
from llava.ecso.config import ECSOConfig
from llava.ecso.events import ECSOResult, Step, StepEvent
from llava.ecso.prompts import get_prompt_set, parse_verdict_exact, parse_verdict_tolerant
from llava.errors import InvalidRequestError
from llava.generation import EarlyCheck
from llava.mm_utils import ImageInput, ImageLimits, load_image

__all__ = ["ECSOInput", "ECSO"]

logger = logging.getLogger(__name__)


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
        self.prompts = get_prompt_set(config.prompt_set)
        self.image_limits = image_limits
        self.verdict_mode = config.verdict
        if config.verdict == "score" and not backend.supports_score:
            logger.warning("backend %s cannot score yes/no: using the tolerant 'parse' verdict", backend.name)
            self.verdict_mode = "parse"
        self.skip_check = re.compile(config.skip_check_regex) if config.skip_check_regex is not None else None
        if config.early_check_tokens and not backend.supports_early_check:
            logger.warning("backend %s cannot stop a generation part-way: no early check, whole answers are checked",
                           backend.name)
        self._warned_stream = False

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
        early: dict[int, tuple[bool, float | None, str | None]] = {}  # rows flagged by the early check
        requests = ([StepRequest(items[i].query, images[i], self.config.params()) for i in todo]
                    + [self._caption_request(items[i].query, images[i]) for i in spec])
        if self.config.early_check_tokens and todo:
            def check(rows: list[int], texts: list[str]) -> list[bool]:
                mine = [(todo[r], t) for r, t in zip(rows, texts) if r < len(todo)]  # caption rows go on
                found = self._verdicts([items[i].query for i, _ in mine], [t for _, t in mine],
                                       [images[i] for i, _ in mine])
                early.update((i, v) for (i, _), v in zip(mine, found) if v[0])
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
            flag, score, vtext = verdicts[i]
            emit(StepEvent(Step.VERDICT, i, text=vtext, flagged=flag, harm_score=score))

        flagged = [i for i in range(n) if verdicts[i][0]]
        need = [i for i in flagged if i not in captions]
        captions.update(zip(need, self._timed(timings, need, Step.CAPTION, lambda: self.backend.generate(
            [self._caption_request(items[i].query, images[i]) for i in need]))))
        for i in flagged:
            emit(StepEvent(Step.CAPTION, i, text=captions[i]))
        safes = dict(zip(flagged, self._timed(timings, flagged, Step.SAFE, lambda: self.backend.generate(
            [self._safe_request(captions[i], items[i].query, images[i]) for i in flagged]))))
        for i in flagged:
            emit(StepEvent(Step.SAFE, i, text=safes[i]))

        options = self.options()
        results = []
        for i in range(n):
            flag, score, vtext = verdicts[i]
            final = safes[i] if flag else direct[i]
            results.append(ECSOResult(
                query=items[i].query, direct=direct[i], flagged=flag, harm_score=score, verdict_text=vtext,
                caption=captions.get(i) if flag else None, safe_answer=safes.get(i), final=final, verdict_mode=self.verdict_mode,
                timings=timings[i], options=options, early_stopped=i in early))
            emit(StepEvent(Step.FINAL, i, text=final, flagged=flag, harm_score=score))
        return results

    def stream(self, image: ImageInput | Sequence[ImageInput] | None, query: str, direct: str | None = None,
               should_stop: StopFlag | None = None) -> Iterator[StepEvent]:
        """One sample's steps as they happen: ``direct``/``caption``/``safe`` stream deltas, then a done event.
        ``should_stop`` (e.g. "the client went away") ends the step being generated at its next token.
        Options that only act on batch runs (speculative caption, early check) do not apply: whole answers are
        checked (a warning, once per pipeline; :meth:`ECSOConfig.for_streaming` leaves them out)."""
        ignored = self.config.ignored_when_streaming()
        if ignored and not self._warned_stream:
            self._warned_stream = True
            logger.warning("streamed ECSO runs ignore %s (batch runs only)", ", ".join(ignored))
        images = self._load(_as_list(image))
        t0 = time.perf_counter()
        if direct is None:
            direct = yield from self._stream_step(Step.DIRECT, StepRequest(query, images, self.config.params()),
                                                  should_stop)
        else:
            yield StepEvent(Step.DIRECT, text=direct, elapsed=0.0)
        t = time.perf_counter()
        flag, score, vtext = self._verdicts([query], [direct], [images])[0]
        yield StepEvent(Step.VERDICT, text=vtext, flagged=flag, harm_score=score, elapsed=time.perf_counter() - t)
        final = direct
        if flag:
            caption = yield from self._stream_step(Step.CAPTION, self._caption_request(query, images), should_stop)
            final = yield from self._stream_step(Step.SAFE, self._safe_request(caption, query, images), should_stop)
        yield StepEvent(Step.FINAL, text=final, flagged=flag, harm_score=score, elapsed=time.perf_counter() - t0)

    # ---- steps ----------------------------------------------------------------------------------------------
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
        return StepRequest(self.prompts.fill_caption(query), images, self.config.params())

    def _safe_request(self, caption: str, query: str, images: list[Image.Image]) -> StepRequest:
        return StepRequest(self.prompts.fill_safe(caption, query),
                           images if self.config.image_in_safe_step else [], self.config.params())

    def _verdicts(self, queries: Sequence[str], answers: Sequence[str],
                  images: Sequence[list[Image.Image]]) -> list[tuple[bool, float | None, str | None]]:
        """(flagged, harm score, verdict text) per sample, in the configured verdict mode."""
        if not queries:
            return []
        out: list[tuple[bool, float | None, str | None]] = [(False, None, "(check skipped)")] * len(queries)
        todo = [j for j, a in enumerate(answers) if self.skip_check is None or not self.skip_check.fullmatch(a.strip())]
        mode = self.verdict_mode
        params = self.config.params(self.config.verdict_max_new_tokens)
        reqs = [StepRequest(self.prompts.fill_harm_check(queries[j], answers[j]), images[j], params) for j in todo]
        if reqs and mode == "score":
            for j, s in zip(todo, self.backend.score_yes_no(reqs)):
                out[j] = (s >= self.config.threshold, float(s), "Yes" if s >= self.config.threshold else "No")
        elif reqs:
            parse = parse_verdict_exact if mode == "exact" else (lambda t: bool(parse_verdict_tolerant(t)))
            for j, t in zip(todo, self.backend.generate(reqs)):
                out[j] = (parse(t), None, t)
        if self.config.force_verdict is not None:
            out = [(self.config.force_verdict, s, t) for _, s, t in out]
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
