"""The original LLaVA-1.5 checkpoint layout -> transformers' ``LlavaForConditionalGeneration`` (keys and config).

Key mapping (original ``LlavaLlamaForCausalLM`` / CLIP folder -> transformers 5 in-memory names):

====================================================  ==============================================
``model.embed_tokens.*``, ``model.layers.N.*``,        ``model.language_model.<same>``
``model.norm.*``
``lm_head.weight``                                     ``lm_head.weight``
``model.mm_projector.0.*`` / ``model.mm_projector.2.*``  ``model.multi_modal_projector.linear_1/2.*``
CLIP ``vision_model.X`` (or ``model.vision_tower.vision_tower.vision_model.X``)  ``model.vision_tower.X``
``*.rotary_emb.inv_freq``, ``*position_ids``, CLIP text tower  dropped (not parameters of the target)
====================================================  ==============================================
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

__all__ = [
    "is_original_layout",
    "original_key_to_hf",
    "original_to_hf_state_dict",
    "clip_to_hf_state_dict",
    "to_original_state_dict",
    "hf_key_to_original",
    "fill_new_vocab_rows",
    "padded_vocab_size",
    "original_to_llava_config",
    "load_checkpoint_tensors",
]

logger = logging.getLogger(__name__)

_ORIGINAL_ARCHS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
EMBED = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_DROP = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


def is_original_layout(config: dict) -> bool:
    """True for LLaVA's own release layout. Checked before any Auto class: transformers 5 would otherwise read
    the released ``model_type: llava`` config as an HF ``LlavaConfig`` with 7B defaults, silently."""
    archs = config.get("architectures") or []
    return any(a in _ORIGINAL_ARCHS for a in archs) or "mm_vision_tower" in config


def original_key_to_hf(key: str) -> str | None:
    """Map one original LLM-checkpoint key; ``None`` for keys that are not parameters of the target."""
    if _DROP.search(key):
        return None
    if key == LM_HEAD:
        return key
    m = re.match(r"model\.mm_projector\.(\d+)\.(weight|bias)$", key)
    if m:
        idx = {"0": "linear_1", "2": "linear_2"}.get(m.group(1))
        if idx is None:
            raise ValueError(f"unexpected projector key {key!r}: only mlp2x_gelu (indices 0 and 2) is supported")
        return f"model.multi_modal_projector.{idx}.{m.group(2)}"
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
    if key.startswith("model.vision_tower."):
        return None  # other vision-tower wrappers (e.g. unused heads)
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    raise ValueError(f"unexpected key {key!r} in an original LLaVA checkpoint")


def original_to_hf_state_dict(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        new = original_key_to_hf(k)
        if new is not None:
            out[new] = v
    return out


def clip_to_hf_state_dict(sd: dict) -> dict:
    """The vision half of a CLIP folder (``vision_model.*``); the text tower and projections are dropped."""
    prefix = "vision_model."
    return {"model.vision_tower." + k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not _DROP.search(k)}


def hf_key_to_original(key: str) -> tuple[str, str]:
    """The inverse of :func:`original_key_to_hf` for one key (a parameter's, or a module path inside one, such as a
    LoRA weight's): ``("llm", key)`` in the LLM checkpoint's names or ``("clip", key)`` in the CLIP folder's."""
    if key.startswith("model.vision_tower."):
        return "clip", "vision_model." + key[len("model.vision_tower."):]
    m = re.match(r"model\.multi_modal_projector\.linear_([12])\.(.+)$", key)
    if m:
        return "llm", f"model.mm_projector.{'0' if m.group(1) == '1' else '2'}.{m.group(2)}"
    if key.startswith("model.language_model."):
        return "llm", "model." + key[len("model.language_model."):]
    return "llm", key


def to_original_state_dict(sd: dict, base_vocab: int) -> tuple[dict, dict]:
    """Inverse mapping (used to write the tiny original-layout checkpoint): (LLM keys, CLIP folder keys)."""
    llm, clip = {}, {}
    for k, v in sd.items():
        part, key = hf_key_to_original(k)
        (clip if part == "clip" else llm)[key] = v
    llm["model.embed_tokens.weight"] = llm["model.embed_tokens.weight"][:base_vocab].clone()
    llm[LM_HEAD] = llm[LM_HEAD][:base_vocab].clone()
    return llm, clip


def padded_vocab_size(n_tokens: int) -> int:
    """llava-hf's rule: round the vocabulary (with <image> and <pad>) up to a multiple of 64."""
    return (n_tokens + 63) // 64 * 64


def fill_new_vocab_rows(sd: dict, base_vocab: int) -> None:
    """Rows past the original vocabulary: input embeddings get the mean embedding, output rows are zero.
    Logits over the original vocabulary are then unchanged; generation also suppresses the new ids."""
    import torch

    for key, fill in ((EMBED, "mean"), (LM_HEAD, "zero")):
        w = sd[key]
        if w.shape[0] <= base_vocab:
            continue
        with torch.no_grad():
            w[base_vocab:] = w[:base_vocab].mean(dim=0, keepdim=True) if fill == "mean" else 0.0


def grow_vocab(sd: dict, new_size: int) -> None:
    """Resize embedding and output matrices of an original checkpoint to ``new_size`` rows, filling new rows."""
    import torch

    base = sd[EMBED].shape[0]
    for key in (EMBED, LM_HEAD):
        w = sd[key]
        grown = torch.empty((new_size, w.shape[1]), dtype=w.dtype)
        grown[:base] = w
        sd[key] = grown
    fill_new_vocab_rows(sd, base)


def original_to_llava_config(orig: dict, vision: dict, image_token_id: int, pad_token_id: int, vocab_size: int):
    """A transformers ``LlavaConfig`` from an original ``config.json`` and the CLIP folder's ``config.json``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig

    if orig.get("mm_use_im_start_end") or orig.get("mm_use_im_patch_token"):
        raise ValueError("mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported (all LLaVA-1.5 "
                         "releases set both to false)")
    proj = orig.get("mm_projector_type", "linear")
    if proj != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {proj!r} is not supported; LLaVA-1.5 uses mlp2x_gelu")
    select = orig.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported; valid: {', '.join(strategies)}")
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
                 "bos_token_id", "eos_token_id", "initializer_range", "rope_scaling", "tie_word_embeddings")
    text_kwargs = {k: orig[k] for k in text_keys if orig.get(k) is not None}
    text_cls = MistralConfig if "Mistral" in " ".join(orig.get("architectures") or []) else LlamaConfig
    text = text_cls(vocab_size=vocab_size, pad_token_id=pad_token_id, **text_kwargs)
    vision_dict = vision.get("vision_config", vision) if vision.get("model_type") == "clip" else vision
    vision_dict = {k: v for k, v in vision_dict.items() if k not in ("model_type", "architectures", "transformers_version")}
    return LlavaConfig(
        text_config=text, vision_config=CLIPVisionConfig(**vision_dict), image_token_index=image_token_id,
        vision_feature_layer=orig.get("mm_vision_select_layer", -2), vision_feature_select_strategy=strategies[select],
        projector_hidden_act="gelu", multimodal_projector_bias=True, pad_token_id=pad_token_id,
        image_seq_length=(vision_dict.get("image_size", 336) // vision_dict.get("patch_size", 14)) ** 2,
    )


def load_checkpoint_tensors(folder: Path) -> dict:
    """All tensors of a checkpoint folder: safetensors or ``.bin``, single file or sharded with an index."""
    import torch
    from safetensors.torch import load_file

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()][:1]
    if not files:
        raise FileNotFoundError(f"no weights (model.safetensors, pytorch_model.bin or a sharded index) in {folder}")
    sd: dict[str, Any] = {}
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            sd.update(load_file(str(path)))
        else:
            sd.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return sd
