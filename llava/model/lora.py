"""LoRA checkpoints in LLaVA's release form, read and merged into base weights without peft.

A LoRA checkpoint folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, optionally ``use_rslora``),
``adapter_model.safetensors`` (or ``.bin``) with peft's key names (``base_model.model.<module>.lora_A.weight``) and,
as LLaVA writes it, ``non_lora_trainables.bin``: the other trained tensors (the projector), loaded over the base's.
Merging is ``W += (lora_alpha / r) * B @ A`` (``lora_alpha / sqrt(r)`` with rsLoRA) for every adapted weight.

Key names follow the base they were trained on: the original LLaVA layout (``model.layers.N...``), or transformers'
in-memory Llava names (``model.language_model.layers.N...``; adapters saved from transformers 4.x's on-disk names,
``language_model.model.layers.N...``, are mapped to those).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.errors import ModelNotFoundError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "NON_LORA_TRAINABLES", "LoraAdapter", "is_lora_checkpoint",
           "read_lora", "merge_lora", "hf_legacy_key"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")  # ".default" adapter name optional
# transformers 4.x's on-disk llava-hf names -> transformers 5's in-memory names (longest prefix first)
_HF_LEGACY = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("multi_modal_projector.", "model.multi_modal_projector."), ("vision_tower.", "model.vision_tower."))


@dataclass
class LoraAdapter:
    """A checkpoint's LoRA pairs by the weight they adapt (``model.layers.0.self_attn.q_proj.weight`` -> (A, B)),
    their scale, and the non-LoRA tensors (by their key in the base's state dict)."""

    folder: Path
    r: int
    scale: float
    pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    non_lora: dict[str, Any] = field(default_factory=dict)


def is_lora_checkpoint(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _non_lora_key(key: str) -> str:
    """LLaVA's builder rule, made exact: peft's ``base_model.model.`` prefix goes, then a doubled ``model.``."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key[len("model."):] if key.startswith("model.model.") else key


def _load_tensors(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_lora(folder: Path) -> LoraAdapter:
    """The adapter of a LoRA checkpoint folder; :class:`ModelNotFoundError` names what is missing or malformed."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder / ADAPTER_CONFIG} is not a LoRA adapter config (needs r and "
                                 f"lora_alpha): {exc}") from None
    names = [n for n in ADAPTER_WEIGHTS if (folder / n).exists()]
    if not names:
        raise ModelNotFoundError(f"{folder} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in _load_tensors(folder / names[0]).items():
        m = _PAIR.match(key.removeprefix("base_model.model."))
        if m:
            halves.setdefault(m.group("module") + ".weight", {})[m.group("half")] = tensor
    broken = sorted(k for k, h in halves.items() if set(h) != {"A", "B"})
    if broken:
        raise ModelNotFoundError(f"{folder / names[0]}: LoRA weights without their other half for {broken[:3]}")
    extra = folder / NON_LORA_TRAINABLES
    non_lora = {_non_lora_key(k): v for k, v in _load_tensors(extra).items()} if extra.exists() else {}
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    return LoraAdapter(folder, r, scale, {k: (h["A"], h["B"]) for k, h in halves.items()}, non_lora)


def hf_legacy_key(key: str) -> str:
    """A transformers 4.x llava-hf key (``language_model.model.layers...``) in transformers 5's in-memory names."""
    for old, new in _HF_LEGACY:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def merge_lora(sd: dict, adapter: LoraAdapter, base: str, inplace: bool = False, legacy_names: bool = False) -> None:
    """Merge ``adapter`` into the state dict ``sd`` (``base`` names it in errors): the non-LoRA tensors replace the
    base's, then ``W += scale * B @ A`` in float32, cast back to W's dtype. ``inplace``: write into the tensors
    themselves (a loaded model's ``state_dict()``), else replace the dict's entries. ``legacy_names``: also try
    :func:`hf_legacy_key` for keys the base lacks."""
    import torch

    def target(key: str) -> str:
        if key not in sd and legacy_names and hf_legacy_key(key) in sd:
            return hf_legacy_key(key)
        if key not in sd:
            raise ModelNotFoundError(f"the LoRA checkpoint {adapter.folder} holds {key}, which the base {base} lacks")
        return key

    def put(key: str, value) -> None:
        if inplace:
            sd[key].copy_(value.to(sd[key].device, sd[key].dtype))
        else:
            sd[key] = value

    with torch.no_grad():
        for key, value in adapter.non_lora.items():
            key = key if key in sd or not legacy_names else hf_legacy_key(key)
            if inplace and key not in sd:
                raise ModelNotFoundError(f"{adapter.folder / NON_LORA_TRAINABLES} holds {key}, which the base "
                                         f"{base} lacks")
            put(key, value)
        for key, (a, b) in adapter.pairs.items():
            key = target(key)
            w = sd[key]
            delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
            put(key, (w.float() + adapter.scale * delta).to(w.dtype))
    logger.info("merged %d LoRA pairs (r=%d, scale %.3g) and %d other tensors from %s into %s", len(adapter.pairs),
                adapter.r, adapter.scale, len(adapter.non_lora), adapter.folder, base)
