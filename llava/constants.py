"""Constants shared across the package: the image placeholder, serving defaults, heartbeat timing, stream error codes."""
from __future__ import annotations

import enum

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "DEFAULT_PAD_TOKEN",
    "CONTROLLER_PORT",
    "WORKER_PORT",
    "WEB_PORT",
    "DEFAULT_HOST",
    "WORKER_HEART_BEAT_INTERVAL",
    "CONTROLLER_HEART_BEAT_EXPIRATION",
    "ECSO_ALIAS_SUFFIX",
    "TINY_MARKER",
    "TINY_MAX_NEW_TOKENS",
    "OPENAI_API_KEY_ENV",
    "DEMO_AUTH_ENV",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_IMAGE_SIZE",
    "ErrorCode",
]

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_PAD_TOKEN = "<pad>"
IMAGE_TOKEN_INDEX = -200  # what LLaVA's tokenizer_image_token inserts; we expand to the model's own image token id
IGNORE_INDEX = -100

# CLIP's normalization (LLaVA-1.5's vision tower); its mean is LLaVA-1.5's pad colour, (122, 116, 104) in 8 bits.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 336  # LLaVA-1.5's vision tower input side (pixels)

DEFAULT_HOST = "127.0.0.1"
CONTROLLER_PORT = 10000
WORKER_PORT = 40000
WEB_PORT = 7860

# "<model>+ecso": the name under which a model worker's OpenAI API answers with ECSO; clients never pick it by
# themselves when they look for "the" model of an endpoint.
ECSO_ALIAS_SUFFIX = "+ecso"

# The file that marks a folder ``llava.model.tiny`` built (a random-weight test model), and the answer length entry
# points default to for such models (their text is random).
TINY_MARKER = "ecso_tiny.json"
TINY_MAX_NEW_TOKENS = 32

# The environment variable an OpenAI-compatible endpoint's key is read from by default (never a command line).
OPENAI_API_KEY_ENV = "OPENAI_API_KEY"
# The demo's logins, one USER:PASSWORD per line (how the launcher passes them: never on a command line).
DEMO_AUTH_ENV = "ECSO_DEMO_AUTH"

WORKER_HEART_BEAT_INTERVAL = 15  # seconds
CONTROLLER_HEART_BEAT_EXPIRATION = 30  # seconds


class ErrorCode(enum.IntEnum):
    """``error_code`` of LLaVA stream chunks. 0-3 are LLaVA's meanings; 4+ are ours (LLaVA clients treat any
    non-zero value as an error, so they keep working)."""

    OK = 0
    WORKER_ERROR = 1
    NO_WORKER = 2
    TIMEOUT = 3
    INVALID_REQUEST = 4
    CONTEXT_OVERFLOW = 5
    UNAUTHORIZED = 6
    UPSTREAM_UNAVAILABLE = 7  # the model's upstream server cannot take the request (down, overloaded, cooling down)
    POLICY = 8  # the service's policy refuses the request (e.g. opting out of ECSO)
