"""Tiny checkpoints (both layouts) and faithful loading through load_pretrained_model."""
import hashlib
import json
import time

import pytest
import torch

from llava.conversation import build_prompt
from llava.errors import ModelNotFoundError
from llava.generation import GenerationParams
from llava.model.builder import load_model, load_pretrained_model
from llava.model.convert import is_original_layout, original_key_to_hf
from llava.model.engine import LlavaEngine
from llava.model.tiny import build_tiny


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_build_is_deterministic(tmp_path):
    t0 = time.perf_counter()
    a = build_tiny(tmp_path / "a", layout="original", seed=0)
    elapsed = time.perf_counter() - t0
    b = build_tiny(tmp_path / "b", layout="original", seed=0)
    c = build_tiny(tmp_path / "c", layout="original", seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert elapsed < 60
    assert sum(p.stat().st_size for p in a.rglob("*") if p.is_file()) < 10 * 2**20


def test_original_layout_files(tiny_original_path):
    cfg = json.loads((tiny_original_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava"
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_use_im_start_end"] is False and is_original_layout(cfg)
    assert (tiny_original_path / cfg["mm_vision_tower"] / "config.json").exists()
    assert (tiny_original_path / "tokenizer.model").exists()
    index = json.loads((tiny_original_path / "pytorch_model.bin.index.json").read_text())
    keys = set(index["weight_map"])
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.mm_projector.0.weight",
            "model.mm_projector.2.bias", "model.layers.0.self_attn.q_proj.weight"} <= keys


def test_key_mapping():
    assert original_key_to_hf("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert original_key_to_hf("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert original_key_to_hf("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == \
        "model.vision_tower.post_layernorm.weight"
    assert original_key_to_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert original_key_to_hf("lm_head.weight") == "lm_head.weight"


def test_both_layouts_same_logits_and_tokens(tiny_hf_path, tiny_original_path, sample_image):
    tok_a, model_a, proc_a, ctx_a = load_pretrained_model(str(tiny_hf_path), device="cpu")
    tok_b, model_b, proc_b, ctx_b = load_pretrained_model(str(tiny_original_path), device="cpu")
    assert ctx_a == ctx_b == 2048
    a = LlavaEngine(load_model(str(tiny_hf_path), device="cpu"))
    b = LlavaEngine(load_model(str(tiny_original_path), device="cpu"))
    prompt = build_prompt("vicuna_v1", "What is in the image?", 1)
    ea, eb = a.encode(prompt, [sample_image]), b.encode(prompt, [sample_image])
    assert ea.input_ids == eb.input_ids
    assert torch.equal(a.pixel_values(ea.images), b.pixel_values(eb.images))
    with torch.inference_mode():
        la = a.model(**a._batch([ea])).logits
        lb = b.model(**b._batch([eb])).logits
    assert torch.allclose(la, lb, atol=1e-5)
    params = GenerationParams(max_new_tokens=24)
    assert a.generate([prompt], [[sample_image]], params) == b.generate([prompt], [[sample_image]], params)


def test_576_image_tokens(tiny_loaded, tiny_engine, sample_image):
    assert tiny_loaded.tokens_per_image == 576
    enc = tiny_engine.encode(build_prompt("vicuna_v1", "hi", 1), [sample_image])
    assert enc.input_ids.count(tiny_loaded.image_token_id) == 576
    assert tuple(tiny_engine.pixel_values(enc.images).shape) == (1, 3, 336, 336)


def test_tokenizer_pads_left_and_knows_image_token(tiny_loaded):
    tok = tiny_loaded.tokenizer
    assert tok.padding_side == "left"
    assert tok.convert_tokens_to_ids("<image>") == tiny_loaded.image_token_id
    assert tiny_loaded.image_token_id in tiny_loaded.suppress_token_ids


def test_pad_preprocessing_uses_mean_background(tiny_engine):
    from PIL import Image

    black_wide = Image.new("RGB", (336, 168), (0, 0, 0))
    pv = tiny_engine.pixel_values([black_wide])[0]
    # Padding rows hold the mean colour, which normalises to ~0; image rows are black (strongly negative).
    assert pv[:, 5, 168].abs().max() < 0.02
    assert pv[:, 168, 168].max() < -1.4


def test_unknown_model_path_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="tiny"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelNotFoundError):
        load_model("llava-v1.5-7b", device="cpu")  # the seed README's bare name, absent here
    with pytest.raises(ModelNotFoundError, match="hub cache"):
        load_model("nobody/not-a-model", device="cpu")  # hub id, offline
    assert time.perf_counter() - t0 < 10


def test_folder_without_llava_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelNotFoundError, match="not a LLaVA checkpoint"):
        load_model(str(tmp_path), device="cpu")


def test_tiny_tokenizer_corpus_holds_what_ecso_sends():
    """The tiny tokenizer's frozen training text (tiny_corpus.json) still holds the ECSO prompt templates and the
    chat templates' system prompts; when a prompt changes, refreeze the corpus and bump BUILDER_VERSION."""
    from llava.conversation import conv_templates
    from llava.ecso.prompts import PROMPT_SETS
    from llava.model.tiny import _corpus

    lines = set(_corpus(0))
    expected = {c.system for c in conv_templates.values() if c.system}
    expected |= {t for ps in PROMPT_SETS.values() for t in (ps.harm_check, ps.caption, ps.safe)}
    assert expected <= lines
