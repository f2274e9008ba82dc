"""The ECSO stream: one request (image + query + options) answered by one NUL-framed :class:`ECSOEvent` per pipeline
step (``POST /worker_ecso_stream`` on a model worker)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from llava.ecso.config import Option, ecso_options
from llava.ecso.events import Step, StepEvent

__all__ = ["ECSO_STREAM_PATH", "ERROR_EVENT", "ECSOOptions", "ECSOStreamRequest", "ECSOEventType", "ECSOEvent"]

ECSO_STREAM_PATH = "/worker_ecso_stream"

# -------------------------------------------------------------------------------------------------- ECSO stream


def _field(opt: Option) -> tuple[Any, Any]:
    """The request field of one option: its type (a Literal of fixed choices), range and help; ``None`` = unset."""
    kind: Any = Literal[opt.choices] if isinstance(opt.choices, tuple) else opt.type  # type: ignore[valid-type]
    limits: dict[str, Any] = {"le": opt.maximum}
    limits["gt" if opt.exclusive_minimum else "ge"] = opt.minimum
    if opt.type is float:
        limits["allow_inf_nan"] = False
    if opt.type is str and opt.choices is None:
        limits["min_length"] = 1
    return kind | None, Field(None, description=opt.help, **{k: v for k, v in limits.items() if v is not None})


def _choice_check(opt: Option) -> Any:
    """A validator for choices that are looked up when checked (registries that grow, e.g. prompt sets)."""

    def check(cls: type, value: Any) -> Any:
        if value is not None:
            opt.validate(value)
        return value

    return field_validator(opt.name)(check)


_API_OPTIONS = ecso_options(lambda o: o.api)


class ECSOOptions(create_model(  # type: ignore[misc]
        "ECSOOptionFields", __config__=ConfigDict(extra="forbid"),
        __validators__={f"_check_{o.name}": _choice_check(o) for o in _API_OPTIONS if callable(o.choices)},
        **{o.name: _field(o) for o in _API_OPTIONS})):
    """Options of one ECSO run: the fields of :class:`llava.ecso.config.ECSOConfig` that a request may set
    (generated from their declarations, ``api=True``). A field left out (``null``) takes the serving worker's default
    (its ``--verdict``, ``--threshold``, ... flags). Closed: an unknown field is an error, so a typo never silently
    falls back to a default."""

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
    verdict_mode: str | None = Field(None, description="verdict events: the verdict mode used")
    verdict_fallback: str | None = Field(None, description="verdict events: why the configured mode was not used")
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
                   flagged=event.flagged, harm_score=event.harm_score, elapsed=event.elapsed,
                   verdict_mode=event.verdict_mode, verdict_fallback=event.verdict_fallback)

    def to_step(self) -> StepEvent:
        """The pipeline's step event this wire event carries (not for ``error`` events). An event without ``done``
        is a delta when it carries a ``delta`` and no ``text``."""
        if self.is_error:
            raise ValueError("an error event is not a step event")
        delta = self.done is False or (self.text is None and self.delta is not None)
        return StepEvent(Step(self.event), text=self.text, delta=self.delta, done=not delta, flagged=self.flagged,
                         harm_score=self.harm_score, elapsed=self.elapsed, verdict_mode=self.verdict_mode,
                         verdict_fallback=self.verdict_fallback)

