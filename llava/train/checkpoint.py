"""A trained LoRA written as LLaVA's LoRA releases are, so it loads the LLaVA way: ``--model-path OUT --model-base
BASE`` (merged on load by :mod:`llava.model.lora`, no peft needed).

OUT holds ``adapter_config.json``, ``adapter_model.safetensors`` (peft's key names), ``non_lora_trainables.bin``
(the projector: trained with ``--tune-projector``, else the base's, as LLaVA always writes it) and the base's
``config.json``, all in the base's own layout: an original-layout base (``liuhaotian/llava-v1.5-7b``) gets the
original names (``base_model.model.model.layers.N...``, ``model.mm_projector.0``) and short ``target_modules``, as
LLaVA's ``train.py`` saves them; an llava-hf base gets transformers' names and peft's own ``adapter_config.json``, so
``PeftModel.from_pretrained`` on ``LlavaForConditionalGeneration`` loads it too.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from llava.extras import require_extra
from llava.model.convert import hf_key_to_original
from llava.model.loaded import LoadedModel
from llava.model.lora import ADAPTER_CONFIG, NON_LORA_TRAINABLES

__all__ = ["PROJECTOR", "write_checkpoint"]

logger = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."
PROJECTOR = "multi_modal_projector"


def _to_layout(key: str, original: bool) -> str:
    """A peft key (``base_model.model.<transformers name>``) in the base's layout."""
    if not original:
        return key
    part, name = hf_key_to_original(key[len(PEFT_PREFIX):])
    if part != "llm":
        raise ValueError(f"{key} is in the vision tower; LoRA and the projector are all this writer saves")
    return PEFT_PREFIX + name


def write_checkpoint(model: Any, loaded: LoadedModel, out: Path, base: str) -> dict[str, Any]:
    """Write ``model`` (a peft model over ``loaded.model``) to ``out``; ``base`` is what ``--model-base`` should
    name (recorded in the adapter config). Returns what was written (counts of tensors)."""
    peft = require_extra("peft", "train", "LoRA fine-tuning")
    from safetensors.torch import save_file
    import torch

    original = loaded.layout.startswith("original")
    out.mkdir(parents=True, exist_ok=True)
    lora = {_to_layout(k, original): v.detach().to("cpu").contiguous()
            for k, v in peft.get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    projector = {_to_layout(name, original): p.detach().to("cpu").contiguous()
                 for name, p in model.named_parameters() if f".{PROJECTOR}." in name}
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    torch.save(projector, out / NON_LORA_TRAINABLES)
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = base
    peft_config.save_pretrained(str(out))  # peft's own adapter_config.json
    if original:  # the names LLaVA's train.py finds (find_all_linear_names): the adapted layers' last component
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        config["target_modules"] = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora})
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(Path(loaded.model_path) / "config.json", out / "config.json")
    logger.info("wrote %s: %d LoRA tensors and %d projector tensors in the %s layout, to load with --model-path %s "
                "--model-base %s", out, len(lora), len(projector), "original" if original else "hf", out, base)
    return {"lora_tensors": len(lora), "non_lora_tensors": len(projector), "layout": loaded.layout}
