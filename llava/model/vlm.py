"""Loading any transformers vision-language model other than LLaVA-1.5: ``AutoModelForImageTextToText`` +
``AutoProcessor``, with the checks ECSO needs (a chat template, image support), resolved once into a
:class:`LoadedVLM` that :class:`~llava.model.vlm_engine.VLMEngine` runs on.

:func:`checkpoint_family` tells which family a ``--model-path`` is (from its ``config.json``) before anything loads;
LLaVA-1.5 checkpoints keep :func:`llava.model.builder.load_model`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.constants import TINY_MARKER
from llava.errors import ModelNotFoundError, UnsupportedError
from llava.extras import check_extra
from llava.model.builder import quantization_config, resolve_model_path
from llava.model.family import ModelFamily, detect_family
from llava.model.loaded import resolve_device, resolve_dtype
from llava.model.tiny import is_tiny_name

__all__ = ["LoadedVLM", "checkpoint_family", "load_vlm"]

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedVLM:
    """Everything :class:`~llava.model.vlm_engine.VLMEngine` needs, resolved once at load time."""

    processor: Any
    tokenizer: Any
    model: Any
    family: ModelFamily
    context_len: int
    model_name: str
    model_path: str
    image_token_id: int | None
    device: str
    dtype: Any
    suppress_token_ids: list[int] = field(default_factory=list)  # none: generation is the model's own
    is_tiny: bool = False

    @property
    def multimodal(self) -> bool:
        return getattr(self.model.config, "vision_config", None) is not None

    def describe(self) -> dict:
        return {"model_name": self.model_name, "model_path": self.model_path, "model_family": self.family.name,
                "prompt_format": "processor chat template", "image_preprocessing": "processor",
                "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "context_len": self.context_len, "tiny_random_weights": self.is_tiny}


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {folder / 'config.json'}: {exc}") from None


def checkpoint_family(model_path: str) -> tuple[Path, ModelFamily]:
    """The local folder of ``model_path`` and its family, read from ``config.json`` (never the folder name)."""
    folder = resolve_model_path(model_path)
    return folder, detect_family(_read_config(folder), where=f"model {model_path!r}")


def _model_name(model_path: str, folder: Path) -> str:
    if is_tiny_name(model_path) or (_HUB_ID.match(model_path) and not Path(model_path).exists()):
        return model_path.rsplit("/", 1)[-1]
    return folder.name


def load_vlm(model_path: str, model_name: str | None = None, device: str | None = "auto", dtype: Any = None,
             load_8bit: bool = False, load_4bit: bool = False, device_map: str | None = "auto") -> LoadedVLM:
    """Load a non-LLaVA vision-language model with its processor. Fails with the model's name and what is missing
    when it has no chat template or no image support."""
    folder, family = checkpoint_family(model_path)
    if family.engine != "processor":
        raise UnsupportedError(f"model {model_path!r} is a {family.name} checkpoint: load it with "
                               "llava.model.builder.load_model")
    name = model_name or _model_name(model_path, folder)
    processor = _processor(folder, name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dev, dtype)
    model = _model(folder, name, torch_dtype, quantization_config(load_8bit, load_4bit, dev),
                   device_map if dev.startswith("cuda") else None)
    if not getattr(model, "hf_device_map", None):
        model.to(dev)
    model.eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation needs left padding
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    context_len = int(getattr(text_cfg, "max_position_embeddings", None) or tokenizer.model_max_length)
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(cfg, "image_token_index", None)
    loaded = LoadedVLM(processor=processor, tokenizer=tokenizer, model=model, family=family, context_len=context_len,
                       model_name=name, model_path=str(folder), image_token_id=image_token_id, device=dev,
                       dtype=torch_dtype, is_tiny=(folder / TINY_MARKER).exists())
    if loaded.is_tiny:
        logger.warning("%s is a tiny random-weight model: its outputs are random text", name)
    logger.info("loaded %s (%s family, %s) on %s/%s, context %d, prompts from the processor's chat template", name,
                family.name, type(model).__name__, dev, loaded.describe()["dtype"], context_len)
    return loaded


def _processor(folder: Path, name: str) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError) as exc:  # e.g. a processor class that needs torchvision
        if "torchvision" in str(exc).lower():
            check_extra("vision", f"the processor of model {name!r}")
        raise UnsupportedError(f"cannot load the processor of model {name!r}: it needs "
                               f"{type(exc).__name__}: {exc}") from None
    if getattr(processor, "image_processor", None) is None:
        raise UnsupportedError(f"model {name!r} has no image support: its processor ({type(processor).__name__}) "
                               "has no image processor")
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                    "chat_template", None)
    if not template:
        raise UnsupportedError(f"model {name!r} has no chat template (none in its processor or tokenizer config, "
                               f"no chat_template.jinja in {folder}): ECSO renders every step with it; add one")
    return processor


def _model(folder: Path, name: str, torch_dtype: Any, quant: Any, device_map: str | None) -> Any:
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        raise UnsupportedError(f"model {name!r} does not load as an image-text-to-text model: {exc}") from None
