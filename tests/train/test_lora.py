"""llava.train.lora on the tiny model: 30 steps lower the training loss; the checkpoint is LLaVA's LoRA release
layout, loads through --model-base (equal to stock peft's merge), changes the greedy answer; an original-layout base
gets original names and loads to the same weights as the hf layout."""
from __future__ import annotations

import json
import re
from statistics import mean

import pytest
import torch

from llava.errors import InvalidRequestError
from llava.eval import run_llava
from llava.model.builder import load_model
from llava.train.lora import TrainConfig, language_model_targets, main, train
from tests.train.conftest import LORA


def test_thirty_steps_lower_the_training_loss(lora_run):
    state = json.loads((lora_run.out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses == lora_run.losses and len(losses) == LORA["max_steps"] == state["global_step"]
    first, last = mean(losses[:5]), mean(losses[-5:])
    assert last < first - 0.2, f"loss did not go down: first five {first:.3f}, last five {last:.3f}"
    manifest = json.loads((lora_run.out / "ecso_train.json").read_text())
    assert manifest["load_with"] == ["--model-path", str(lora_run.out), "--model-base", "tiny"]
    assert manifest["data"]["rows_used"] == 4 and manifest["config"]["lora_r"] == LORA["lora_r"]


def test_the_checkpoint_loads_with_model_base_as_stock_peft_merges_it(lora_run, tiny_hf_path, tiny_loaded):
    import peft
    from transformers import LlavaForConditionalGeneration

    out = lora_run.out
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "non_lora_trainables.bin", "config.json"}
    merged = load_model(str(out), model_base="tiny", device="cpu")
    assert merged.layout == "hf+lora" and merged.is_tiny  # over a random-weight base: flagged as random text
    reference = peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_hf_path), str(out))
    ref = reference.merge_and_unload().state_dict()
    got, base = merged.model.state_dict(), tiny_loaded.model.state_dict()
    assert set(got) == set(ref)
    for key in ref:
        assert torch.allclose(got[key], ref[key], atol=1e-6), key
    changed = sorted(k for k in got if not torch.equal(got[k], base[k]))
    linear = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
    assert changed and all(linear.fullmatch(k) for k in changed)  # the projector was not tuned: the base's


def test_the_fine_tuned_model_answers_differently(lora_run, sft_run, typo_images, capsys):
    row = json.loads(sft_run.read_text())[0]
    query = row["conversations"][0]["value"].removeprefix("<image>\n")
    common = ["--image-file", str(typo_images / row["image"]), "--query", query, "--temperature", "0",
              "--max-new-tokens", "12", "--device", "cpu"]
    assert run_llava.main(["--model-path", "tiny", *common]) == 0
    base = capsys.readouterr().out
    assert run_llava.main(["--model-path", str(lora_run.out), "--model-base", "tiny", *common]) == 0
    tuned = capsys.readouterr().out
    assert base.strip() and tuned.strip() and tuned != base


def test_an_original_layout_base_gets_llava_names_and_the_same_merged_weights(sft_run, typo_images, tmp_path):
    """Two steps with the projector tuned from the same weights in both layouts (tiny and tiny-original hold the
    same weights): the checkpoints differ in names only, and both load to the same model."""
    from safetensors.torch import load_file

    common = dict(data=sft_run, image_folder=typo_images, max_steps=2, lora_r=4, lora_alpha=8, lr=1e-2,
                  projector_lr=1e-2, batch_size=2, tune_projector=True, target_modules=("q_proj", "v_proj"))
    hf = train(TrainConfig(model_path="tiny", out=tmp_path / "hf", **common)).out
    orig = train(TrainConfig(model_path="tiny-original", out=tmp_path / "orig", **common)).out
    keys = list(load_file(str(orig / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("language_model" in k for k in keys)
    assert sorted(torch.load(orig / "non_lora_trainables.bin")) == [
        f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    assert json.loads((orig / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((orig / "config.json").read_text())["architectures"] == ["LlavaLlamaForCausalLM"]
    a = load_model(str(hf), model_base="tiny", device="cpu").model.state_dict()
    b = load_model(str(orig), model_base="tiny-original", device="cpu")
    assert b.layout == "original+lora"
    b_sd, base = b.model.state_dict(), load_model("tiny", device="cpu").model.state_dict()
    for key in a:
        assert torch.allclose(a[key], b_sd[key], atol=1e-6), key
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(a[proj], base[proj])  # the tuned projector came through non_lora_trainables.bin


def test_target_modules_are_the_language_models_linear_layers(tiny_loaded):
    model = tiny_loaded.model
    every = re.compile(language_model_targets(model))
    q_v = re.compile(language_model_targets(model, ("q_proj", "v_proj")))
    names = [n for n, _ in model.named_modules()]
    adapted = [n for n in names if every.fullmatch(n)]
    assert len(adapted) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in adapted)
    assert [n for n in names if q_v.fullmatch(n)] == [n for n in adapted if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(InvalidRequestError, match="--target-modules fc1: .*valid: down_proj, gate_proj"):
        language_model_targets(model, ("fc1",))  # the vision tower's


def test_bad_settings_are_refused(tmp_path, caplog):
    with pytest.raises(InvalidRequestError, match="--lora-r must be at least 1, got 0"):
        TrainConfig(data=tmp_path, image_folder=tmp_path, model_path="tiny", out=tmp_path, lora_r=0)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="already holds a checkpoint"):
        TrainConfig(data=tmp_path, image_folder=tmp_path, model_path="tiny", out=tmp_path)
    assert main(["--data", str(tmp_path / "none.json"), "--model-path", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read the SFT data" in caplog.text
    assert main(["--data", str(tmp_path / "none.json"), "--model-path", "tiny-gemma3", "--out", str(tmp_path / "g")]) == 2
    assert "tiny-gemma3 is a gemma3 checkpoint; LoRA fine-tuning covers LLaVA-1.5 (both layouts) for now" in caplog.text
