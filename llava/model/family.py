"""Model families: what kind of vision-language model a checkpoint is, read from its ``config.json`` (``model_type``,
``architectures``), never from its folder name, and what that means for ECSO.

* ``llava`` (LLaVA-1.5, both the llava-hf and the original release layout) keeps LLaVA's own path: its
  conversation templates, ``tokenizer_image_token``, pad preprocessing and :class:`~llava.model.engine.LlavaEngine`.
* every other family loads with ``AutoModelForImageTextToText`` + ``AutoProcessor`` and runs on
  :class:`~llava.model.vlm_engine.VLMEngine`: prompts from the processor's chat template, images through the
  processor, decoding with the model's own ``generate``.

Each family says whether the KV cache of a sample's image prefix can be reused across ECSO's steps (and why not
where it cannot), and how its tokenizer spells the verdict words (docs: README "Supported models").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava.errors import UnsupportedError
from llava.model.convert import is_original_layout

__all__ = ["ModelFamily", "FAMILIES", "GENERIC", "detect_family", "family_names", "get_family"]


@dataclass(frozen=True)
class ModelFamily:
    """``model_types``: the ``config.json`` ``model_type`` values it covers; ``engine``: ``llava`` (LLaVA's
    templates and engine) or ``processor`` (the processor's chat template, :class:`VLMEngine`); ``prefix_reuse``
    and ``prefix_reuse_note``: whether the image prefix's KV cache is shared across steps, and why (not);
    ``model_positions``: the model computes its own position ids (M-RoPE), so none are passed;
    ``yes_no``: how its tokenizers spell the verdict; ``hub_ids``: checkpoints of the family (README)."""

    name: str
    summary: str
    model_types: tuple[str, ...]
    engine: str
    prefix_reuse: bool
    prefix_reuse_note: str
    yes_no: str
    hub_ids: tuple[str, ...] = ()
    model_positions: bool = False


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily(
        "llava", "LLaVA-1.5 (llava-hf and original release layouts; a CLIP vision tower)", ("llava",), "llava", True,
        "the prompt is system + USER: + <image>, then the query: the image prefix is the same for every step",
        "Llama tokenizer: single tokens '▁Yes'/'▁No' and their spellings, first-token score",
        ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "liuhaotian/llava-v1.5-7b",
         "liuhaotian/llava-v1.5-13b")),
    ModelFamily(
        "llava_next", "LLaVA-NeXT / LLaVA-1.6 (anyres tiling)", ("llava_next",), "processor", True,
        "[INST] + the image's tiles come before the query: a stable prefix per image (its tiling depends on the "
        "image alone)",
        "Mistral/Vicuna/Llama-3 tokenizers: single tokens for Yes/No, first-token score",
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf")),
    ModelFamily(
        "qwen2_5_vl", "Qwen2.5-VL (dynamic resolution, M-RoPE)", ("qwen2_5_vl",), "processor", False,
        "M-RoPE: the positions after the image depend on its grid and transformers keeps them as model state "
        "between calls, so a cached prefix cannot be continued safely",
        "Qwen2 byte-level BPE: single tokens 'Yes'/'ĠYes'/'No'/'ĠNo', first-token score",
        ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"), model_positions=True),
    ModelFamily(
        "idefics3", "Idefics3 / SmolVLM (image split into tiles + a global view)", ("idefics3", "smolvlm"),
        "processor", True,
        "User: + the image's tiles come before the query: a stable prefix per image",
        "SmolLM byte-level BPE: single tokens for Yes/No, first-token score",
        ("HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceM4/Idefics3-8B-Llama3")),
    ModelFamily(
        "gemma3", "Gemma 3 (SigLIP, pan & scan off)", ("gemma3",), "processor", False,
        "sliding-window attention layers: their cache keeps a window, not the prefix, so it is not reused "
        "(measured: continuing a cached prefix changes the tokens)",
        "Gemma SentencePiece BPE: single tokens 'Yes'/'▁Yes'/'No'/'▁No', first-token score",
        ("google/gemma-3-4b-it", "google/gemma-3-12b-it")),
)}

GENERIC = ModelFamily(
    "transformers", "any other transformers image-text-to-text model with a chat template", (), "processor", False,
    "not known for this model type: off", "first-token score where the tokenizer has single-token yes/no, else "
    "token sequences")


def family_names() -> list[str]:
    return list(FAMILIES)


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name] if name != GENERIC.name else GENERIC
    except KeyError:
        raise UnsupportedError(f"unknown model family {name!r}; valid: {', '.join([*FAMILIES, GENERIC.name])}") \
            from None


def detect_family(config: dict[str, Any], where: str = "the checkpoint") -> ModelFamily:
    """The family of a checkpoint from its ``config.json`` contents. A model transformers does not list as
    image-text-to-text and without a vision config has no image support: :class:`UnsupportedError` naming it."""
    if is_original_layout(config):
        return FAMILIES["llava"]
    model_type = config.get("model_type")
    vision_type = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if model_type == "llava" and vision_type != "clip_vision_model":  # Llava-architecture models with another
        return GENERIC  # vision tower (Pixtral, LLaVA-Interleave's SigLIP): their processor, not LLaVA-1.5's path
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type in _image_text_to_text_types():
        return GENERIC
    missing = "a vision model (no vision_config)" if "vision_config" not in config else \
        "transformers' image-text-to-text support for this model type"
    raise UnsupportedError(
        f"{where} (model_type={model_type!r}, architectures={config.get('architectures')}) has no image support: "
        f"it lacks {missing}. ECSO needs a vision-language model; supported families: "
        f"{', '.join(FAMILIES)} and any other transformers image-text-to-text model")


def _image_text_to_text_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
