"""--model-base with a LLaVA LoRA release: adapters merged into the base LLM (no peft needed)."""
import json
import shutil

import pytest
import torch

from llava.errors import UnsupportedError
from llava.model.builder import load_model


def _make_lora(tmp_path, original):
    """Split the tiny original checkpoint into a base LLM folder + a LoRA folder, as liuhaotian's -lora releases."""
    from llava.model.convert import load_checkpoint_tensors

    sd = load_checkpoint_tensors(original)
    base, lora = tmp_path / "vicuna-tiny", tmp_path / "llava-tiny-lora"
    base.mkdir(), lora.mkdir()
    torch.save({k: v for k, v in sd.items() if "mm_projector" not in k}, base / "pytorch_model.bin")
    cfg = json.loads((original / "config.json").read_text())
    base_cfg = {k: v for k, v in cfg.items() if not k.startswith("mm_")}
    base_cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (base / "config.json").write_text(json.dumps(base_cfg))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(original / name, base / name)
    cfg["mm_vision_tower"] = str(original / cfg["mm_vision_tower"])
    (lora / "config.json").write_text(json.dumps(cfg))
    (lora / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                          "target_modules": ["q_proj", "v_proj"]}))
    g = torch.Generator().manual_seed(1)
    adapter = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            w = sd[f"model.layers.{layer}.self_attn.{proj}.weight"]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
    torch.save(adapter, lora / "adapter_model.bin")
    torch.save({f"base_model.model.{k}": v for k, v in sd.items() if "mm_projector" in k},
               lora / "non_lora_trainables.bin")
    return base, lora, adapter


def test_lora_merge(tmp_path, tiny_original_path):
    base, lora, adapter = _make_lora(tmp_path, tiny_original_path)
    merged = load_model(str(lora), model_base=str(base), device="cpu")
    plain = load_model(str(tiny_original_path), device="cpu")
    assert merged.layout == "original+lora"
    m, p = merged.model.state_dict(), plain.model.state_dict()
    key = "model.language_model.layers.1.self_attn.v_proj.weight"
    a = adapter["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(m[key], p[key] + 2.0 * (b @ a), atol=1e-6)
    assert torch.equal(m["model.multi_modal_projector.linear_2.weight"], p["model.multi_modal_projector.linear_2.weight"])
    assert torch.equal(m["model.language_model.layers.0.mlp.up_proj.weight"], p["model.language_model.layers.0.mlp.up_proj.weight"])


def test_model_base_on_a_full_checkpoint_is_refused(tiny_original_path):
    with pytest.raises(UnsupportedError, match="LoRA checkpoints"):
        load_model(str(tiny_original_path), model_base=str(tiny_original_path), device="cpu")


def _hf_lora(tmp_path, tiny_hf_path, keys: dict[str, str]):
    """A LoRA folder for the llava-hf tiny model: ``keys`` maps each adapted weight (in-memory name) to the name the
    adapter file uses for it."""
    from safetensors.torch import save_file

    lora = tmp_path / "hf-lora"
    lora.mkdir()
    shutil.copy(tiny_hf_path / "config.json", lora / "config.json")
    (lora / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 6, "peft_type": "LORA"}))
    g = torch.Generator().manual_seed(2)
    pairs, tensors = {}, {}
    for weight, name in keys.items():
        rows = 128 if weight.endswith(("up_proj", "gate_proj")) else 64  # the tiny model's shapes
        a, b = torch.randn(2, 64, generator=g), torch.randn(rows, 2, generator=g)
        pairs[weight] = (a, b)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    return lora, pairs


def test_an_hf_layout_lora_merges_into_its_base_with_either_naming(tmp_path, tiny_hf_path, tiny_loaded):
    """transformers 5's in-memory names and transformers 4.x's on-disk llava-hf names (adapters saved by other
    tools) both land on the same weights: W + alpha/r * B @ A."""
    keys = {"model.language_model.layers.0.self_attn.q_proj": "model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.1.mlp.up_proj": "language_model.model.layers.1.mlp.up_proj"}
    lora, pairs = _hf_lora(tmp_path, tiny_hf_path, keys)
    merged = load_model(str(lora), model_base="tiny", device="cpu")
    assert merged.layout == "hf+lora"
    got, base = merged.model.state_dict(), tiny_loaded.model.state_dict()
    for module, (a, b) in pairs.items():
        assert torch.allclose(got[module + ".weight"], base[module + ".weight"] + 3.0 * (b @ a), atol=1e-6)
    unchanged = [k for k in base if k.removesuffix(".weight") not in pairs]
    assert all(torch.equal(got[k], base[k]) for k in unchanged)


def test_a_broken_lora_folder_is_named(tmp_path, tiny_hf_path):
    from llava.errors import ModelNotFoundError

    lora, _ = _hf_lora(tmp_path, tiny_hf_path, {"x": "model.language_model.layers.0.self_attn.nope_proj"})
    with pytest.raises(ModelNotFoundError, match="holds model.language_model.layers.0.self_attn.nope_proj.weight, "
                                                 "which the base .* lacks"):
        load_model(str(lora), model_base="tiny", device="cpu")
    (lora / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="has adapter_config.json but no adapter_model.safetensors"):
        load_model(str(lora), model_base="tiny", device="cpu")
