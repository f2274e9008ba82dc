"""Samples -> answer rows (docs/answer-format.md) by a defense of ``llava.ecso.defenses`` (``direct``, ECSO's four
steps, a prompt defense, ...), a batch at a time.

A sample that cannot be answered never takes its batch down: its image is loaded on its own (a corrupt file is a
recorded failure), and a batch that a backend rejects is retried one sample at a time so only the culprit fails."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from PIL import Image

from llava.ecso.backends import Backend
from llava.ecso.config import ECSOConfig
from llava.ecso.defenses import create_defense
from llava.ecso.events import ECSOResult, StepEvent
from llava.ecso.pipeline import ECSOInput
from llava.errors import ECSOError, ImageError
from llava.eval.benchmarks import Sample, answer_fields
from llava.mm_utils import ImageLimits, load_image

__all__ = ["SampleFailure", "PreparedBatch", "BatchResult", "Answerer", "load_sample_images", "direct_row",
           "ecso_row", "DATA_FAILURE_KINDS"]

logger = logging.getLogger(__name__)

# Failures that a rerun cannot fix (the data is bad): a run whose only failures are these is complete.
DATA_FAILURE_KINDS = frozenset({"missing_image", ImageError.code})


@dataclass(frozen=True)
class SampleFailure:
    id: str
    kind: str  # the error's code (missing_image, invalid_image, context_length_exceeded, backend_error, ...)
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_error(cls, sample_id: str, exc: ECSOError) -> "SampleFailure":
        return cls(sample_id, exc.code, str(exc))


@dataclass
class PreparedBatch:
    """Samples with their images loaded; the ones that failed to load are in ``failures`` instead."""

    samples: list[Sample] = field(default_factory=list)
    images: list[list[Image.Image]] = field(default_factory=list)
    failures: list[SampleFailure] = field(default_factory=list)


@dataclass
class BatchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[SampleFailure] = field(default_factory=list)
    flagged: int = 0

    @property
    def attempted(self) -> int:
        return len(self.rows) + len(self.failures)


def _base_row(sample: Sample, method: str, text: str, model_id: str,
              model_family: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row's leading fields, and the id fields + meta (kept last, as in the format's table)."""
    fields = answer_fields(sample)
    head = {"id": fields.pop("id"), "benchmark": fields.pop("benchmark"), "method": method,
            "image": fields.pop("image"), "query": fields.pop("query"), "text": text, "model_id": model_id,
            "model_family": model_family}
    return head, fields


def direct_row(sample: Sample, text: str, model_id: str, method: str = "direct",
               model_family: str | None = None) -> dict[str, Any]:
    head, tail = _base_row(sample, method, text, model_id, model_family)
    return {**head, **tail}


def ecso_row(sample: Sample, result: ECSOResult, model_id: str, method: str = "ecso",
             model_family: str | None = None) -> dict[str, Any]:
    head, tail = _base_row(sample, method, result.final, model_id, model_family)
    ecso = {"unsafe": "Yes" if result.flagged else "No", "harm_score": result.harm_score,
            "caption": result.caption, "unsafe_answer": result.direct if result.flagged else None,
            "direct": result.direct}
    if result.options.get("early_check_tokens"):  # only runs that use the lever carry the field
        ecso["early_stopped"] = result.early_stopped
    if result.verdict_fallback is not None:  # the configured verdict mode could not be used for this sample
        ecso["verdict_mode"], ecso["verdict_fallback"] = result.verdict_mode, result.verdict_fallback
    if result.options.get("force_all_steps"):  # every sample's safe answer and step times: the threshold sweep
        ecso["safe_answer"], ecso["timings"] = result.safe_answer, result.timings
    return {**head, **ecso, **tail}


def load_sample_images(samples: Sequence[Sample], limits: ImageLimits = ImageLimits(),
                       strict: bool = False) -> PreparedBatch:
    """Each sample's image as RGB; a sample whose image cannot be read is a failure (raised when ``strict``)."""
    batch = PreparedBatch()
    for sample in samples:
        try:
            images = [] if sample.image is None else [load_image(sample.image, limits)]
        except ImageError as exc:
            if strict:
                raise
            logger.warning("sample %s: %s", sample.id, exc)
            batch.failures.append(SampleFailure.from_error(sample.id, exc))
            continue
        batch.samples.append(sample)
        batch.images.append(images)
    return batch


class Answerer:
    """Answers batches of samples with ``backend`` by the defense called ``method`` (``llava.ecso.defenses``).
    ``direct_answers`` (id -> direct answer) makes an ECSO method check those instead of generating step 1."""

    def __init__(self, method: str, backend: Backend, config: ECSOConfig, model_id: str,
                 direct_answers: dict[str, str] | None = None, image_limits: ImageLimits = ImageLimits(),
                 strict: bool = False):
        self.method = method
        self.backend = backend
        self.config = config
        self.model_id = model_id
        self.direct_answers = direct_answers
        self.image_limits = image_limits
        self.strict = strict
        self.defense = create_defense(method, backend, config, image_limits)
        self.pipeline = self.defense.pipeline
        self.model_family = backend.describe().get("model_family")  # None where a remote backend cannot tell

    def prepare(self, samples: Sequence[Sample]) -> PreparedBatch:
        """Load each sample's image (thread-safe; the runner calls it ahead of generation)."""
        return load_sample_images(samples, self.image_limits, self.strict)

    def answer(self, batch: PreparedBatch, on_event: Callable[[StepEvent], None] | None = None) -> BatchResult:
        """Answer one batch; ``on_event`` gets each ECSO step's events (progress). A batch that fails is retried one
        sample at a time, so one bad sample fails alone."""
        result = BatchResult(failures=list(batch.failures))
        try:
            rows, flagged = self._run(batch.samples, batch.images, on_event)
        except ECSOError as exc:
            if len(batch.samples) == 1:
                logger.warning("sample %s failed: %s", batch.samples[0].id, exc)
                result.failures.append(SampleFailure.from_error(batch.samples[0].id, exc))
                return result
            logger.info("a batch of %d failed (%s); retrying its samples one at a time", len(batch.samples), exc)
            for sample, images in zip(batch.samples, batch.images):
                one = self.answer(PreparedBatch([sample], [images]), on_event)
                result.rows += one.rows
                result.failures += one.failures
                result.flagged += one.flagged
            return result
        result.rows, result.flagged = rows, flagged
        return result

    def _run(self, samples: list[Sample], images: list[list[Image.Image]],
             on_event: Callable[[StepEvent], None] | None = None) -> tuple[list[dict[str, Any]], int]:
        if not samples:
            return [], 0
        direct = self.direct_answers or {}
        inputs = [ECSOInput(s.query, imgs, direct.get(s.id)) for s, imgs in zip(samples, images)]
        answers = self.defense.answer(inputs, on_event=on_event)
        rows = [ecso_row(s, a.result, self.model_id, self.method, self.model_family) if a.result is not None
                else direct_row(s, a.text, self.model_id, self.method, self.model_family)
                for s, a in zip(samples, answers)]
        return rows, sum(a.result.flagged for a in answers if a.result is not None)
