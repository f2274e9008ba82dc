"""Load a LLaVA checkpoint into transformers' ``LlavaForConditionalGeneration``.

Accepts the llava-hf layout and LLaVA's original release layout (converted on load), detected from
``config.json``, never from the folder name; ``tiny``/``tiny-original`` build a local random model. A LoRA
checkpoint of either layout (``--model-path LORA --model-base BASE``) is merged into its base on load
(:mod:`llava.model.lora`).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_PAD_TOKEN, TINY_MARKER
from llava.conversation import default_conv_mode
from llava.errors import ModelNotFoundError, UnsupportedError
from llava.mm_utils import ASPECT_RATIOS
from llava.model.convert import is_original_layout
from llava.model.loaded import LoadedModel, hub_snapshot, resolve_device, resolve_dtype
from llava.model.loader_original import load_original
from llava.model.lora import ADAPTER_CONFIG, is_lora_checkpoint, merge_lora, read_lora
from llava.model.tiny import is_tiny_name, tiny_model_path

__all__ = ["load_model", "load_pretrained_model", "resolve_model_path", "quantization_config"]

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model_path: str) -> Path:
    """A local folder for ``model_path``: a folder, a tiny model name, or a hub id already in the local cache
    (or downloadable when online). Raises :class:`ModelNotFoundError` fast with what to do."""
    if is_tiny_name(model_path):
        return tiny_model_path(model_path)
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a model checkpoint")
        return path
    if not _HUB_ID.match(model_path) or path.exists():
        raise ModelNotFoundError(
            f"model path {model_path!r} is not a local folder or a hub id (owner/name). "
            "Pass a checkpoint folder, a hub id such as llava-hf/llava-1.5-7b-hf, or 'tiny' for the offline test model")
    try:
        return hub_snapshot(model_path)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear error
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"model {model_path!r} is not in the local hub cache and could not be downloaded"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(exc).__name__}. Download it first or pass its "
            "local folder") from None


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {folder / 'config.json'}: {exc}") from None


def load_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | None = "auto",
    device: str | None = "auto",
    dtype: Any = None,
    image_aspect_ratio: str | None = None,
    conv_mode: str | None = None,
) -> LoadedModel:
    """Load ``model_path`` (either layout). ``image_aspect_ratio`` overrides the checkpoint's preprocessing
    (default: ``pad`` for LLaVA-1.5, the original release's setting, for both layouts)."""
    folder = resolve_model_path(model_path)
    config = _read_config(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dev, dtype)
    quant = quantization_config(load_8bit, load_4bit, dev)
    base = None
    if model_base is not None:
        if not is_lora_checkpoint(folder):
            raise UnsupportedError(f"--model-base is for LoRA checkpoints (a folder with {ADAPTER_CONFIG}, as LLaVA's "
                                   f"-lora releases and llava.train.lora write them); {folder} is not one")
        base = resolve_model_path(model_base)
    if is_original_layout(config):
        parts = load_original(folder, config, torch_dtype, base=base)
        layout = "original" if base is None else "original+lora"
    elif config.get("model_type") == "llava" and "text_config" in config:
        if base is not None and quant is not None:
            raise UnsupportedError("a LoRA checkpoint is merged into 16/32-bit weights: drop --load-8bit/--load-4bit "
                                   "with --model-base (or merge and save the model first)")
        parts = _load_hf(base or folder, torch_dtype, quant, device_map if dev.startswith("cuda") else None)
        if base is not None:
            merge_lora(parts[1].state_dict(), read_lora(folder), str(base), inplace=True, legacy_names=True)
        layout = "hf" if base is None else "hf+lora"
    else:
        raise ModelNotFoundError(
            f"{folder} is not a LLaVA checkpoint (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')}); supported: llava-hf Llava folders and the original "
            "LLaVA-1.5 layout (LlavaLlamaForCausalLM); other vision-language families load with "
            "llava.model.vlm.load_vlm (the local backend picks the loader by family)")
    tokenizer, model, image_processor, context_len = parts
    if not getattr(model, "hf_device_map", None):
        model.to(dev)
    model.eval()
    return _finish(tokenizer, model, image_processor, context_len, folder, model_path, model_name, layout, dev,
                   torch_dtype, image_aspect_ratio, conv_mode, config, base)


def quantization_config(load_8bit: bool, load_4bit: bool, device: str):
    """bitsandbytes settings for --load-8bit/--load-4bit (CUDA only), or None."""
    if not (load_8bit or load_4bit):
        return None
    if not device.startswith("cuda"):
        raise UnsupportedError("--load-8bit/--load-4bit need a CUDA device")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UnsupportedError("--load-8bit/--load-4bit need bitsandbytes: pip install bitsandbytes") from None
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    import torch

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4")


def _load_hf(folder: Path, torch_dtype, quant, device_map):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map:
        kwargs["device_map"] = device_map
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    cfg = model.config
    context_len = getattr(cfg, "max_sequence_length", None) or cfg.text_config.max_position_embeddings
    return tokenizer, model, image_processor, int(context_len)


def _finish(tokenizer, model, image_processor, context_len, folder, model_path, model_name, layout, dev, torch_dtype,
            image_aspect_ratio, conv_mode, raw_config, base: Path | None = None) -> LoadedModel:
    cfg = model.config
    image_token_id = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
    if tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) != image_token_id:
        raise ModelNotFoundError(f"tokenizer of {folder} has no {DEFAULT_IMAGE_TOKEN} token with the model's id "
                                 f"{image_token_id}; the checkpoint is inconsistent")
    tokenizer.padding_side = "left"  # batched generation needs left padding (right padding gives wrong rows)
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tokens_per_image = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    aspect = image_aspect_ratio or "pad"
    if aspect not in ASPECT_RATIOS:
        raise UnsupportedError(f"unknown image aspect ratio {aspect!r}; valid: {', '.join(ASPECT_RATIOS)}")
    vocab = cfg.text_config.vocab_size
    suppress = sorted({image_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id} | set(range(len(tokenizer), vocab)))
    name = model_name or (model_path if is_tiny_name(model_path) else Path(str(folder)).name.rstrip("/"))
    loaded = LoadedModel(
        tokenizer=tokenizer, model=model, image_processor=image_processor, context_len=context_len, model_name=name,
        model_path=str(folder), layout=layout, image_token_id=image_token_id, tokens_per_image=tokens_per_image,
        image_aspect_ratio=aspect, conv_mode=conv_mode or default_conv_mode(cfg.text_config.model_type),
        device=dev, dtype=torch_dtype, suppress_token_ids=suppress,
        is_tiny=((base or folder) / TINY_MARKER).exists(),  # a LoRA over a tiny base is random text too
    )
    if loaded.is_tiny:
        logger.warning("model %r is a tiny random-weight test model: its outputs are random text", name)
    logger.info("loaded %s (%s layout) on %s/%s, %d image tokens, context %d, template %s, preprocessing %s",
                name, layout, dev, loaded.describe()["dtype"], tokens_per_image, context_len, loaded.conv_mode, aspect)
    return loaded


def load_pretrained_model(model_path, model_base=None, model_name=None, load_8bit=False, load_4bit=False,
                          device_map="auto", device="cuda", **kwargs):
    """LLaVA's signature and return value ``(tokenizer, model, image_processor, context_len)``, so forked scripts
    keep working. ``device="cuda"`` falls back to the CPU (with a warning) when CUDA is absent."""
    loaded = load_model(model_path, model_base=model_base, model_name=model_name, load_8bit=load_8bit,
                        load_4bit=load_4bit, device_map=device_map, device=device, **kwargs)
    return loaded.tokenizer, loaded.model, loaded.image_processor, loaded.context_len
