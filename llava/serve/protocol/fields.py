"""Shared pieces of the wire models: field types with range checks, and the one description of a validation
error (which names the field and the bad value, shortened so a base64 image never ends up in a log line)."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

__all__ = ["Temperature", "TopP", "Stop", "MAX_STOP_STRINGS", "stop_list", "short_repr", "describe_validation_error"]

_REPR_LIMIT = 80
_MAX_LISTED = 5  # errors spelled out in one message

# Reusable field types: finite floats in range. ``allow_inf_nan=False`` because NaN passes no comparison and would
# otherwise slip through as "not less than 0".
Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False, description="sampling temperature; 0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass, in (0, 1]")]
MAX_STOP_STRINGS = 16  # each is searched for after every token; OpenAI allows 4


def _few_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    return value


Stop = Annotated[str | list[str] | None, AfterValidator(_few_stops)]


def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def describe_validation_error(err: ValidationError | Any) -> tuple[str, str | None]:
    """``(message, param)`` for a pydantic (or FastAPI request) validation error: one ``field: problem (got value)``
    per error (the first five), joined by ``; ``, and the first offending field's dotted path. A leading ``body``
    location (FastAPI) is dropped, and values are shortened so a base64 image does not end up in a log line."""
    parts: list[str] = []
    params: list[str] = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":  # FastAPI's body parser: loc ("body", offset), ctx {"error": ...}
            where = f" at character {loc[-1]}" if loc and loc[-1].isdigit() else ""
            parts.append(f"the request body is not valid JSON ({(e.get('ctx') or {}).get('error', msg)}{where})")
            continue
        field = ".".join(loc) or "request"
        if loc:
            params.append(field)
        if e.get("type") == "missing":
            parts.append(f"{field}: field required" if loc else "the request body is empty: send a JSON object")
        else:
            parts.append(f"{field}: {msg} (got {short_repr(e.get('input'))})")
    if len(parts) > _MAX_LISTED:
        parts[_MAX_LISTED:] = [f"and {len(parts) - _MAX_LISTED} more"]
    return "; ".join(parts) or "invalid request", (params[0] if params else None)
