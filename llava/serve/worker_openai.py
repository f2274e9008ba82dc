"""The worker's OpenAI-compatible API (``/v1/models``, ``/v1/chat/completions``). Work in progress."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from llava.serve.common import require_api_key

__all__ = ["openai_routes"]


def openai_routes() -> APIRouter:
    return APIRouter(dependencies=[Depends(require_api_key)])
