"""The ECSO stream: one request (image + query + options) answered by one NUL-framed :class:`ECSOEvent` per pipeline
step (``POST /worker_ecso_stream`` on a model worker)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava.ecso.events import Step, StepEvent
from llava.ecso.prompts import PROMPT_SETS
from llava.generation import MAX_NEW_TOKENS_LIMIT
from llava.serve.protocol.fields import Temperature, TopP

__all__ = ["ECSO_STREAM_PATH", "ERROR_EVENT", "ECSOOptions", "ECSOStreamRequest", "ECSOEventType", "ECSOEvent"]

ECSO_STREAM_PATH = "/worker_ecso_stream"

# -------------------------------------------------------------------------------------------------- ECSO stream


class ECSOOptions(BaseModel):
    """Options of one ECSO run, named as the fields of :class:`llava.ecso.pipeline.ECSOConfig`. A field left out
    (``null``) takes the serving worker's default (its ``--verdict``, ``--threshold``, ... flags). Closed: an
    unknown field is an error, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["score", "exact", "parse"] | None = Field(
        None,
        description="score: P(yes) vs P(no) of the first answer token; exact: the paper's string match "
        "('yes'/'yes.' only); parse: the first word of the answer",
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="score verdict: flag when P(yes) >= threshold"
    )
    prompt_set: str | None = Field(None, min_length=1, description="ECSO prompt templates, by name ('paper')")
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="new tokens per generated step (direct, caption, safe)"
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    image_in_safe_step: bool | None = Field(None, description="keep the image in step 4 (the safe answer)")

    @field_validator("prompt_set")
    @classmethod
    def _known_prompt_set(cls, value: str | None) -> str | None:
        if value is not None and value not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {value!r}; valid: {', '.join(sorted(PROMPT_SETS))}")
        return value

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as ``ECSOConfig`` keyword arguments."""
        return self.model_dump(exclude_none=True)


class ECSOStreamRequest(BaseModel):
    """Request of the ECSO stream endpoint: one image (base64, or none for text-only) and one query."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name, for routing; a worker serves its own model")
    image: str | None = Field(None, description="base64-encoded image; null for a text-only query")
    query: str = Field(min_length=1)
    options: ECSOOptions = Field(default_factory=ECSOOptions)
    direct: str | None = Field(None, description="check this answer instead of generating step 1 (the first event is "
                               "then a done 'direct' event with this text)")


ERROR_EVENT = "error"  # the wire's one event that is not a step: a failure, which ends the stream
ECSOEventType = Literal[(*(step.value for step in Step), ERROR_EVENT)]  # type: ignore[valid-type]


class ECSOEvent(BaseModel):
    """One step of an ECSO run. A streaming step (``direct``, ``caption``, ``safe``) sends events with ``delta``
    (new text) and ``done: false``, then one with ``done: true`` and the step's full ``text``. ``verdict`` carries
    ``flagged``, the verdict ``text`` and (score mode) ``harm_score``; ``caption``/``safe`` only follow a flagged
    verdict; ``final`` carries the answer to show, ``flagged`` and ``harm_score``; ``error`` carries a non-zero
    ``error_code`` and ``detail`` and ends the stream. ``elapsed``: seconds the step took (``final``: the whole
    run)."""

    model_config = ConfigDict(extra="ignore")

    event: ECSOEventType
    text: str | None = None
    delta: str | None = None
    done: bool | None = None
    flagged: bool | None = None
    harm_score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    elapsed: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    error_code: int | None = Field(None, ge=0)
    detail: str | None = None

    @model_validator(mode="after")
    def _error_code_iff_error(self) -> ECSOEvent:
        if self.event == ERROR_EVENT and not self.error_code:
            raise ValueError(f"an error event needs a non-zero error_code, got {self.error_code!r}")
        if self.event != ERROR_EVENT and self.error_code:
            raise ValueError(f"error_code {self.error_code} on a {self.event!r} event; use event 'error'")
        return self

    @property
    def is_error(self) -> bool:
        return self.event == ERROR_EVENT

    @classmethod
    def from_step(cls, event: StepEvent) -> ECSOEvent:
        """The pipeline's step event on the wire."""
        return cls(event=event.step.value, text=event.text, delta=event.delta, done=event.done,
                   flagged=event.flagged, harm_score=event.harm_score, elapsed=event.elapsed)

    def to_step(self) -> StepEvent:
        """The pipeline's step event this wire event carries (not for ``error`` events). An event without ``done``
        is a delta when it carries a ``delta`` and no ``text``."""
        if self.is_error:
            raise ValueError("an error event is not a step event")
        delta = self.done is False or (self.text is None and self.delta is not None)
        return StepEvent(Step(self.event), text=self.text, delta=self.delta, done=not delta, flagged=self.flagged,
                         harm_score=self.harm_score, elapsed=self.elapsed)

