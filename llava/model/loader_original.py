"""Load LLaVA's original release layout (``LlavaLlamaForCausalLM`` + a separate CLIP folder) as transformers'
Llava, with the key and config mapping of :mod:`llava.model.convert`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_PAD_TOKEN
from llava.errors import ModelNotFoundError
from llava.model.loaded import hub_snapshot
from llava.model.lora import merge_lora, read_lora

__all__ = ["load_original", "resolve_vision_tower"]

logger = logging.getLogger(__name__)


def resolve_vision_tower(name: str, checkpoint: Path, base: Path | None = None) -> Path:
    """``mm_vision_tower`` as a path relative to the checkpoint (or to the base of a LoRA checkpoint), the working
    directory, or a hub id."""
    near = [checkpoint / name] + ([base / name] if base is not None else [])
    for candidate in (*near, Path(name).expanduser()):
        if (candidate / "config.json").exists():
            return candidate
    try:
        return hub_snapshot(name)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(
            f"vision tower {name!r} (mm_vision_tower of {checkpoint}) is not a folder next to the checkpoint or in "
            f"the working directory, nor in the hub cache ({type(exc).__name__}); download it or fix the path") from None


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (ImportError, ValueError, OSError) as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer of {folder} ({exc}); a tokenizer.model-only folder "
                                 "needs sentencepiece and protobuf installed") from None
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [DEFAULT_IMAGE_TOKEN]})
    tok.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    return tok, base


def _lora_tensors(folder: Path, base: Path) -> dict:
    """A LLaVA LoRA release (``adapter_*`` + ``non_lora_trainables.bin``) merged into its base's weights (the base
    LLM, or a whole LLaVA checkpoint of the original layout), no peft needed (:mod:`llava.model.lora`)."""
    from llava.model.convert import load_checkpoint_tensors

    sd = load_checkpoint_tensors(base)
    merge_lora(sd, read_lora(folder), str(base))
    return sd


def load_original(folder: Path, config: dict, torch_dtype, base: Path | None = None) -> tuple[Any, Any, Any, int]:
    """``base``: the base LLM folder for a LoRA checkpoint (``--model-base``); tokenizer and weights come from it."""
    import torch
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from llava.model.convert import (clip_to_hf_state_dict, grow_vocab, load_checkpoint_tensors,
                                     original_to_hf_state_dict, original_to_llava_config, padded_vocab_size)

    vision_path = resolve_vision_tower(config["mm_vision_tower"], folder, base)
    vision_cfg = json.loads((vision_path / "config.json").read_text())
    tokenizer, n_base = _load_tokenizer(base or folder)
    if n_base != config.get("vocab_size", n_base):
        logger.warning("tokenizer has %d tokens but config.json says vocab_size %s", n_base, config.get("vocab_size"))
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    vocab = padded_vocab_size(len(tokenizer))
    llava_cfg = original_to_llava_config(config, vision_cfg, image_id, tokenizer.pad_token_id, vocab)

    raw = _lora_tensors(folder, base) if base is not None else load_checkpoint_tensors(folder)
    sd = original_to_hf_state_dict(raw)
    if not any(k.startswith("model.vision_tower.") for k in sd):
        sd.update(clip_to_hf_state_dict(load_checkpoint_tensors(vision_path)))
    grow_vocab(sd, vocab)
    sd = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model = LlavaForConditionalGeneration.from_pretrained(None, config=llava_cfg, state_dict=sd, dtype=torch_dtype)
    missing = [k for k in model.state_dict() if k not in sd]
    if missing:
        raise ModelNotFoundError(f"checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[:3]}")
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    context_len = int(config.get("max_sequence_length") or 2048)  # LLaVA's rule
    del torch
    return tokenizer, model, image_processor, context_len
