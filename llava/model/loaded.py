"""A loaded model and what loading resolves once: the device, the dtype, and hub folders.

:class:`LoadedModel` is what :func:`llava.model.builder.load_model` and :func:`llava.model.tiny.build_loaded` return
and what :class:`llava.model.engine.LlavaEngine` runs on. The helpers here are shared by the loaders of both
checkpoint layouts (:mod:`llava.model.builder`, :mod:`llava.model.loader_original`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.errors import UnsupportedError

__all__ = ["LoadedModel", "resolve_device", "resolve_dtype", "hub_snapshot"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything generation needs, resolved once at load time."""

    tokenizer: Any
    model: Any
    image_processor: Any
    context_len: int
    model_name: str
    model_path: str
    layout: str  # "hf" or "original"; "hf+lora"/"original+lora": a LoRA checkpoint merged into its base
    image_token_id: int
    tokens_per_image: int
    image_aspect_ratio: str  # "pad" (LLaVA-1.5) or "crop" (llava-hf processors)
    conv_mode: str
    device: str
    dtype: Any
    suppress_token_ids: list[int] = field(default_factory=list)
    is_tiny: bool = False

    @property
    def multimodal(self) -> bool:
        """From the model's config (a vision tower is configured), never from its name."""
        return getattr(self.model.config, "vision_config", None) is not None

    def describe(self) -> dict:
        return {"model_name": self.model_name, "model_path": self.model_path, "model_family": "llava",
                "layout": self.layout,
                "image_aspect_ratio": self.image_aspect_ratio, "conv_mode": self.conv_mode, "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "context_len": self.context_len,
                "tiny_random_weights": self.is_tiny}


def resolve_device(device: str | None) -> str:
    """``auto``/``None``: CUDA when available, else the CPU; a CUDA device without CUDA falls back (a warning)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available: using cpu", device)
        return "cpu"
    return device


def resolve_dtype(device: str, dtype: Any) -> Any:
    """``auto``/``None``: float16 on CUDA, float32 elsewhere; names (``bf16``, ``float32``, ...) or a torch dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float32": torch.float32, "fp32": torch.float32}
        if dtype not in names:
            raise UnsupportedError(f"unknown dtype {dtype!r}; valid: {', '.join(names)}")
        return names[dtype]
    return dtype


_HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_snapshot(repo_id: str) -> Path:
    """A hub repository's folder with only what loading needs: configs, tokenizer files, and one weight format
    (safetensors when present, else ``.bin``), never the TF/Flax copies some repositories also hold."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.safetensors"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.bin"]))
    return folder
