"""Model families are read from config.json (model_type / architectures), never from the folder name; models without
a chat template or without image support are refused with the model's name and what is missing."""
import json
import shutil

import pytest

from llava.ecso.local_vlm import load_local
from llava.errors import UnsupportedError
from llava.model.family import FAMILIES, GENERIC, detect_family
from llava.model.vlm import checkpoint_family, load_vlm


@pytest.mark.parametrize("config, family", [
    ({"model_type": "llava", "text_config": {}, "vision_config": {}}, "llava"),
    ({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "clip"}, "llava"),
    ({"model_type": "llava_next"}, "llava_next"),
    ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl"),
    ({"model_type": "idefics3"}, "idefics3"),
    ({"model_type": "smolvlm"}, "idefics3"),
    ({"model_type": "gemma3"}, "gemma3"),
    ({"model_type": "paligemma"}, "transformers"),  # any other image-text-to-text model: the generic family
    ({"model_type": "llava", "vision_config": {"model_type": "pixtral"}}, "transformers"),  # Llava class, not 1.5
])
def test_family_from_config(config, family):
    assert detect_family(config).name == family


def test_text_only_model_has_no_image_support():
    with pytest.raises(UnsupportedError, match=r"model 'my-llm' \(model_type='llama'.*no image support.*vision model"):
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, where="model 'my-llm'")


def test_every_family_documents_reuse_and_scoring():
    for family in [*FAMILIES.values(), GENERIC]:
        assert family.prefix_reuse_note and family.yes_no and family.summary
        assert family.engine in ("llava", "processor")
    assert [f.name for f in FAMILIES.values() if f.prefix_reuse] == ["llava", "llava_next", "idefics3"]


def test_folder_name_never_decides(tmp_path, vlm_backend):
    """A Gemma 3 checkpoint in a folder named like LLaVA-1.5 is Gemma 3 (and the other way round for the name)."""
    source = checkpoint_family("tiny-gemma3")[0]
    misleading = tmp_path / "llava-v1.5-7b"
    shutil.copytree(source, misleading)
    assert checkpoint_family(str(misleading))[1].name == "gemma3"
    backend = load_local(str(misleading), device="cpu")
    assert backend.describe()["model_family"] == "gemma3" and backend.describe()["model_name"] == "llava-v1.5-7b"


def test_no_chat_template_is_named(tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(checkpoint_family("tiny-idefics3")[0], folder)
    (folder / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("chat_template", None)
        (folder / name).write_text(json.dumps(data))
    with pytest.raises(UnsupportedError, match=r"model 'no-template' has no chat template"):
        load_vlm(str(folder), device="cpu")


def test_llava_only_options_are_refused_for_other_families():
    with pytest.raises(UnsupportedError, match="--image-aspect-ratio sets LLaVA-1.5's preprocessing"):
        load_local("tiny-gemma3", device="cpu", image_aspect_ratio="pad")
    with pytest.raises(UnsupportedError, match="--model-base merges LLaVA LoRA checkpoints"):
        load_local("tiny-gemma3", device="cpu", model_base="tiny")
