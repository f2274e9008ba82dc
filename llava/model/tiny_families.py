"""Tiny random-weight checkpoints of other vision-language families, for tests and offline demos.

Each builder uses transformers' own config, model, tokenizer and processor classes, scaled down (a 2-layer, 64-wide
text model, a 2-layer, 32-wide vision tower, the smallest image sizes and image-token counts the processor classes
allow) with a tokenizer trained on the spot (:mod:`llava.model.tiny_text`) and a chat template in the family's
format. The folder loads with plain ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)``. Same seed, same bytes. Built through ``python -m llava.model.tiny --family
F``; ``tiny-F`` works as ``--model-path`` anywhere.

Image tokens per image: ``llava_next`` 4 per 28-px tile (anyres over 28/56-px grids: up to 5 tiles plus row ends),
``qwen2_5_vl`` 4 (every image resized to 56x56), ``idefics3`` 1 per 28-px tile (up to 2x2 tiles plus the global
view, with their row/column markers), ``gemma3`` 4 (28-px SigLIP, 7-px patches pooled 2x2).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.constants import CLIP_MEAN, CLIP_STD
from llava.errors import MissingExtraError
from llava.model.tiny_text import llama_tokenizer, train_bpe, train_tokenizer

__all__ = ["FamilyShapes", "SHAPES", "FAMILY_BUILDERS", "build_family_model"]

_EXTRA_LINES = ["User: What is in the image?", "Assistant: It is a picture.", "user\nmodel\nassistant\nsystem",
                "You are a helpful assistant."]


@dataclass(frozen=True)
class FamilyShapes:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vocab_size: int = 1000
    max_position_embeddings: int = 2048
    init_std: float = 0.02


SHAPES = FamilyShapes()


def _text_kwargs(s: FamilyShapes, vocab: int, **ids: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                max_position_embeddings=s.max_position_embeddings, initializer_range=s.init_std, **ids)


def _vision_kwargs(s: FamilyShapes) -> dict[str, Any]:
    return dict(hidden_size=s.vision_hidden_size, intermediate_size=s.vision_intermediate_size,
                num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads)


def _content(image: str, text_filter: str = "") -> str:
    """Jinja for a message's content (a string, or a list of image/text parts): ``image`` per image part, the text
    parts after (``text_filter``, e.g. ``| trim``, applied to each)."""
    return ("{% if message['content'] is string %}{{ message['content']" + text_filter + " }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text']" + text_filter +
            " }}{% endif %}{% endfor %}{% endif %}")


# The families' chat formats, written here (images before the text of a message, as each family's own template).
_SYSTEM_FIRST = ("{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}"
                 "{% set ns.system = (message['content'] if message['content'] is string else message['content'] | "
                 "selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + '\\n\\n' %}")
LLAVA_NEXT_TEMPLATE = (
    _SYSTEM_FIRST + "{% elif message['role'] == 'user' %}[INST] {{ ns.system }}{% set ns.system = '' %}"
    + _content("<image>\n") + " [/INST]{% else %} " + _content("") + "</s>{% endif %}{% endfor %}")
QWEN2_5_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    + _content("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'] is not "
    "string and message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}" + _content("<image>")
    + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}" + _SYSTEM_FIRST + "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else 'user' }}\n{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    + _content("<start_of_image>", " | trim") + "<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _bpe_parts(vocab_size: int, seed: int, specials: list[str], style: str) -> tuple[dict, list]:
    data = train_bpe(vocab_size, seed, specials, style, extra_lines=_EXTRA_LINES)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def _llava_next(seed: int, s: FamilyShapes):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    with tempfile.TemporaryDirectory() as tmp:
        tok = llama_tokenizer(train_tokenizer(Path(tmp), s.vocab_size, seed), s.max_position_embeddings)
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=grid,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=LLAVA_NEXT_TEMPLATE)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        text_config=LlamaConfig(**_text_kwargs(s, len(tok), bos_token_id=1, eos_token_id=2,
                                               pad_token_id=tok.pad_token_id)),
        vision_config=CLIPVisionConfig(**_vision_kwargs(s), image_size=28, patch_size=14,
                                       projection_dim=s.vision_hidden_size),
        image_token_index=image_id, image_grid_pinpoints=grid, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    return LlavaNextForConditionalGeneration, config, processor


def _qwen2_5_vl(seed: int, s: FamilyShapes):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # transformers 5's Qwen2.5-VL processor holds a video processor
        raise MissingExtraError("the qwen2_5_vl family's processor needs torchvision (transformers' Qwen2.5-VL "
                                "processor includes its video processor): pip install torchvision", name="torchvision")
    from transformers import Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab, merges = _bpe_parts(s.vocab_size, seed, specials, "byte_level")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=specials[1:])
    pixels = 56 * 56
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels), tokenizer=tok,
        chat_template=QWEN2_5_VL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2_5_VLConfig(
        text_config=dict(**_text_kwargs(s, len(tok), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                                        pad_token_id=ids["<|endoftext|>"]),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=s.vision_layers, hidden_size=s.vision_hidden_size,
                           intermediate_size=s.vision_intermediate_size, num_heads=s.vision_heads,
                           out_hidden_size=s.hidden_size, window_size=56, fullatt_block_indexes=[s.vision_layers - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _idefics3(seed: int, s: FamilyShapes):
    from transformers import GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers import Idefics3VisionConfig, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    vocab, merges = _bpe_parts(s.vocab_size, seed, specials, "byte_level")
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>", additional_special_tokens=specials[1:])
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=1,
                                  chat_template=IDEFICS3_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials[:6]}
    config = Idefics3Config(
        text_config=LlamaConfig(**_text_kwargs(s, len(tok), bos_token_id=ids["<|im_start|>"],
                                               eos_token_id=ids["<end_of_utterance>"],
                                               pad_token_id=ids["<|endoftext|>"])),
        vision_config=Idefics3VisionConfig(**_vision_kwargs(s), image_size=28, patch_size=14),
        image_token_id=ids["<image>"], scale_factor=2, pad_token_id=ids["<|endoftext|>"])
    return Idefics3ForConditionalGeneration, config, processor


def _gemma3(seed: int, s: FamilyShapes):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers import GemmaTokenizer, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab, merges = _bpe_parts(s.vocab_size + 256, seed, specials, "metaspace")
    tok = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = _text_kwargs(s, len(tok), pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**text, head_dim=s.hidden_size // s.num_heads,
                                     query_pre_attn_scalar=s.hidden_size // s.num_heads, sliding_window=64),
        vision_config=SiglipVisionConfig(**_vision_kwargs(s), image_size=28, patch_size=7),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    return Gemma3ForConditionalGeneration, config, processor


FAMILY_BUILDERS: dict[str, Callable[[int, FamilyShapes], tuple[Any, Any, Any]]] = {
    "llava_next": _llava_next, "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3, "gemma3": _gemma3}


def build_family_model(family: str, out: Path, seed: int = 0, shapes: FamilyShapes = SHAPES) -> Path:
    """Write a tiny ``family`` checkpoint (model, processor with its chat template) into the empty folder ``out``."""
    import torch

    if family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILY_BUILDERS)}")
    model_class, config, processor = FAMILY_BUILDERS[family](seed, shapes)
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
