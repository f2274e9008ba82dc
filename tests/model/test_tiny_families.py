"""The tiny builders of the other families: transformers' own classes, plain AutoModelForImageTextToText /
AutoProcessor loading with a chat template, a few image tokens per image, same seed same bytes."""
import hashlib
import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from llava.errors import MissingExtraError
from llava.model.tiny import build_tiny, main, tiny_model_path
from tests.conftest import VLM_FAMILIES

# Most image tokens one image may cost (the processors' smallest sizes; a 640x480 image).
MAX_IMAGE_TOKENS = {"llava_next": 24, "qwen2_5_vl": 4, "idefics3": 5, "gemma3": 4}
MODEL_CLASS = {"llava_next": "LlavaNextForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "idefics3": "Idefics3ForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_loads_with_plain_transformers_and_has_a_chat_template(family):
    folder = tiny_model_path(f"tiny-{family}")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == MODEL_CLASS[family] and processor.chat_template
    assert json.loads((folder / "ecso_tiny.json").read_text())["family"] == family
    assert sum(p.numel() for p in model.parameters()) < 400_000
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (640, 480), (200, 30, 30))], text=[prompt], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 1 <= image_tokens <= MAX_IMAGE_TOKENS[family]
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 or int(out[0, -1]) in model.generation_config.eos_token_id


def test_same_seed_same_bytes(tmp_path):
    """One family per run of the suite (the builders share the code path; each was checked by hand)."""
    a = build_tiny(tmp_path / "a", family="idefics3", seed=0)
    b = build_tiny(tmp_path / "b", family="idefics3", seed=0)
    c = build_tiny(tmp_path / "c", family="idefics3", seed=1)
    assert _digest(a) == _digest(b) and _digest(a) != _digest(c)


def test_family_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--family", "gemma3", "--layout", "original", "--out", str(tmp_path / "x")])
    assert "the gemma3 family has one layout (hf) and one preset (tiny)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(is_torchvision_available(), reason="checks the message shown where torchvision is missing")
def test_qwen2_5_vl_without_torchvision_names_it(tmp_path):
    with pytest.raises(MissingExtraError, match="needs torchvision"):
        build_tiny(tmp_path / "q", family="qwen2_5_vl")
    assert not (tmp_path / "q").exists()
