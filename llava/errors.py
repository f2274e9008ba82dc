"""Typed exceptions. Library code raises these; each service maps them once, at its edge, to an HTTP status,
an OpenAI-style error body or a LLaVA stream ``error_code``."""
from __future__ import annotations

from llava.constants import ErrorCode

__all__ = [
    "ECSOError",
    "InvalidRequestError",
    "ImageError",
    "ContextLengthError",
    "RequestTooLargeError",
    "ConflictError",
    "ModelNotFoundError",
    "UnsupportedError",
    "MissingExtraError",
    "NoWorkerError",
    "BackendError",
    "BackendTimeoutError",
    "AuthError",
    "UpstreamUnavailableError",
    "PolicyError",
]


class ECSOError(Exception):
    """Base class. ``status``: HTTP status; ``code``: short machine-readable code; ``error_code``: LLaVA stream code."""

    status: int = 500
    code: str = "internal_error"
    error_code: ErrorCode = ErrorCode.WORKER_ERROR


class InvalidRequestError(ECSOError, ValueError):
    status = 400
    code = "invalid_request"
    error_code = ErrorCode.INVALID_REQUEST


class ImageError(InvalidRequestError):
    """An image that cannot be read, is corrupt, too large, or of an unsupported kind."""

    code = "invalid_image"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"
    error_code = ErrorCode.CONTEXT_OVERFLOW


class RequestTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class ConflictError(InvalidRequestError):
    """The request conflicts with the service's state (e.g. a registration that would replace a live worker)."""

    status = 409
    code = "conflict"


class ModelNotFoundError(ECSOError, FileNotFoundError):
    status = 404
    code = "model_not_found"
    error_code = ErrorCode.INVALID_REQUEST


class UnsupportedError(ECSOError):
    """A feature the chosen backend or environment cannot provide (e.g. 4-bit without bitsandbytes)."""

    status = 400
    code = "unsupported"
    error_code = ErrorCode.INVALID_REQUEST


class MissingExtraError(UnsupportedError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install -e ".[serve]"``)."""

    code = "missing_dependency"


class NoWorkerError(ECSOError):
    status = 503
    code = "no_worker"
    error_code = ErrorCode.NO_WORKER


class BackendError(ECSOError):
    """A remote model (worker, controller, OpenAI-compatible endpoint) failed."""

    status = 502
    code = "backend_error"
    error_code = ErrorCode.WORKER_ERROR


class BackendTimeoutError(BackendError):
    status = 504
    code = "timeout"
    error_code = ErrorCode.TIMEOUT


class AuthError(ECSOError):
    status = 401
    code = "unauthorized"
    error_code = ErrorCode.UNAUTHORIZED


class UpstreamUnavailableError(BackendError):
    """No upstream server of a remote model can take the request now: unreachable, overloaded (429) or cooling
    down after a failure."""

    status = 503
    code = "upstream_unavailable"
    error_code = ErrorCode.UPSTREAM_UNAVAILABLE


class PolicyError(ECSOError):
    """The service's policy refuses the request (e.g. ``"ecso": false`` where ECSO is enforced)."""

    status = 403
    code = "policy_refused"
    error_code = ErrorCode.POLICY
