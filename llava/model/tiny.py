"""Deterministic tiny random-weight checkpoints, for tests and offline demos.

``python -m llava.model.tiny --out DIR [--layout hf|original] [--seed 0] [--preset tiny|bench]`` writes a LLaVA-1.5
checkpoint in either the llava-hf layout (a ``LlavaForConditionalGeneration`` folder) or the original LLaVA-1.5
layout (``LlavaLlamaForCausalLM`` config, original key names, a separate CLIP vision folder, ``tokenizer.model``
only). Both layouts from one seed hold the same weights. ``--family llava_next|qwen2_5_vl|idefics3|gemma3`` writes
that family's transformers checkpoint instead (:mod:`llava.model.tiny_families`). The models are random: their
outputs are random text.

``--model-path tiny`` (or ``tiny-original``, ``tiny-bench``, ``tiny-<family>`` such as ``tiny-gemma3``) anywhere in
the project builds once into the user cache dir (``$ECSO_CACHE_DIR`` or ``~/.cache/ecso``) and uses that folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, asdict
from pathlib import Path

from llava.constants import CLIP_MEAN, CLIP_STD, TINY_MARKER
from llava.model.convert import fill_new_vocab_rows, padded_vocab_size, to_original_state_dict
from llava.errors import MissingExtraError
from llava.model.loaded import LoadedModel
from llava.model.tiny_families import FAMILY_BUILDERS, SHAPES, build_family_model
from llava.model.tiny_text import corpus as _corpus  # noqa: F401 - the tests read the training text here
from llava.model.tiny_text import llama_tokenizer, patch_json, train_tokenizer, write_json, write_original_tokenizer

__all__ = ["TinySpec", "PRESETS", "build_tiny", "build_loaded", "tiny_model_path", "is_tiny_name", "TINY_NOTICE", "build_parser",
           "main"]

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
FAMILY_BUILDER_VERSION = 1  # the other families' builders (llava.model.tiny_families)
TINY_NOTICE = "tiny random-weight model: its outputs are random text, for wiring and tests only"


@dataclass(frozen=True)
class TinySpec:
    """Shapes of a built model. 336 px images with 14 px patches give LLaVA-1.5's 576 image tokens."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 336
    patch_size: int = 14
    vocab_size: int = 2000
    max_position_embeddings: int = 2048
    init_std: float = 0.02
    model_vocab_size: int | None = None  # rows of the embedding/lm_head (default: tokenizer + 2, padded to 64)


PRESETS = {
    "tiny": TinySpec(),
    # ~90 M parameters: large enough that compute, not Python overhead, dominates on a CPU (benchmarks only).
    "bench": TinySpec(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, vision_hidden_size=256,
                      vision_intermediate_size=1024, vision_layers=6, vision_heads=4, init_std=0.02),
    # LLaVA-1.5-7B's shapes (Vicuna-7B + CLIP ViT-L/14-336, 32064-row vocabulary): GPU benchmarks only, built in
    # memory with random weights by build_loaded(); never written to disk.
    "llava-1.5-7b": TinySpec(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                             vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=24,
                             vision_heads=16, max_position_embeddings=4096, model_vocab_size=32064),
}

def _padded_vocab(base: int) -> int:
    """Base vocab + <image> + <pad>, rounded as llava-hf does."""
    return padded_vocab_size(base + 2)


def _llava_config(spec: TinySpec, base_vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=spec.model_vocab_size or _padded_vocab(base_vocab), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=base_vocab + 1, tie_word_embeddings=False,
        initializer_range=spec.init_std,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.vision_hidden_size, hidden_act="quick_gelu",
    )
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=base_vocab, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2, pad_token_id=base_vocab + 1,
    )


def _random_state_dict(spec: TinySpec, base_vocab: int, seed: int) -> dict:
    """Seeded weights in transformers' in-memory names, with the extra vocabulary rows filled as the converter
    fills them (so the original layout, converted on load, equals the hf layout bit for bit)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(_llava_config(spec, base_vocab))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    fill_new_vocab_rows(sd, base_vocab)
    return sd


def _write_hf(out: Path, spec: TinySpec, tok_model: Path, sd: dict, base_vocab: int) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    cfg = _llava_config(spec, base_vocab)
    model = LlavaForConditionalGeneration(cfg)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out)
    proc = LlavaProcessor(
        image_processor=_image_processor(spec), tokenizer=llama_tokenizer(tok_model, spec.max_position_embeddings), patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=_CHAT_TEMPLATE,
    )
    proc.save_pretrained(out)
    patch_json(out / "tokenizer_config.json", {"legacy": True, "padding_side": "left",
                                                 "model_max_length": spec.max_position_embeddings})


def _image_processor(spec: TinySpec):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_center_crop=True, do_resize=True, resample=3,
    )


# Vicuna-v1 chat in llava-hf's message format (for engines that apply the processor's chat template).
_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _write_original(out: Path, spec: TinySpec, tok_model: Path, sd: dict, base_vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    llm_sd, clip_sd = to_original_state_dict(sd, base_vocab)
    vision_dir = out / "clip-vit-tiny-patch14-336"
    vision_dir.mkdir(parents=True)
    save_file(clip_sd, str(vision_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(vision_dir / "config.json", _clip_config(spec))
    _image_processor(spec).save_pretrained(vision_dir)
    # Two .bin shards with an index, as the released llava-v1.5-7b.
    keys = sorted(llm_sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: llm_sd[k] for k in shard_keys}, out / name)
        weight_map.update({k: name for k in shard_keys})
    write_json(out / "pytorch_model.bin.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(out / "config.json", _original_config(spec, base_vocab, vision_dir.name))
    write_original_tokenizer(out, tok_model, spec.max_position_embeddings)


def _clip_config(spec: TinySpec) -> dict:
    """A CLIPModel-style config, as the openai/clip-vit-large-patch14-336 folder LLaVA points at."""
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": spec.vision_hidden_size,
        "vision_config": {
            "hidden_size": spec.vision_hidden_size, "intermediate_size": spec.vision_intermediate_size,
            "num_hidden_layers": spec.vision_layers, "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size, "patch_size": spec.patch_size, "hidden_act": "quick_gelu",
            "projection_dim": spec.vision_hidden_size, "layer_norm_eps": 1e-5,
        },
    }


def _original_config(spec: TinySpec, base_vocab: int, vision_dir: str) -> dict:
    return {
        "_name_or_path": "tiny-llava-v1.5", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads, "max_position_embeddings": spec.max_position_embeddings,
        "max_sequence_length": spec.max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "initializer_range": spec.init_std, "tie_word_embeddings": False, "torch_dtype": "float32",
        "vocab_size": base_vocab, "use_cache": True, "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad",
        "mm_hidden_size": spec.vision_hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": vision_dir, "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": spec.max_position_embeddings, "tokenizer_padding_side": "right",
    }


def build_tiny(out: str | os.PathLike, layout: str = "hf", seed: int = 0, preset: str = "tiny",
               family: str = "llava") -> Path:
    """Build a checkpoint folder at ``out`` (must not exist). Deterministic for a given (family, layout, seed,
    preset); families other than ``llava`` have one layout (transformers') and one preset (``tiny``)."""
    if family != "llava":
        return _build_family(Path(out), family, layout, seed, preset)
    if layout not in ("hf", "original"):
        raise ValueError(f"unknown layout {layout!r}; valid: hf, original")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok_model = train_tokenizer(Path(tmp), spec.vocab_size, seed)
        import sentencepiece as spm

        base_vocab = spm.SentencePieceProcessor(model_file=str(tok_model)).vocab_size()
        sd = _random_state_dict(spec, base_vocab, seed)
        out.mkdir(parents=True, exist_ok=True)
        (_write_hf if layout == "hf" else _write_original)(out, spec, tok_model, sd, base_vocab)
    write_json(out / TINY_MARKER, {"builder_version": BUILDER_VERSION, "layout": layout, "seed": seed,
                                         "preset": preset, "spec": asdict(spec), "notice": TINY_NOTICE})
    logger.info("built a random-weight model, preset %s (%s layout, seed %d), at %s in %.1fs", preset, layout, seed, out,
                time.perf_counter() - t0)
    return out


def _build_family(out: Path, family: str, layout: str, seed: int, preset: str) -> Path:
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; valid: llava, {', '.join(FAMILY_BUILDERS)}")
    if layout != "hf" or preset != "tiny":
        raise ValueError(f"the {family} family has one layout (hf) and one preset (tiny); got {layout}, {preset}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    t0 = time.perf_counter()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        build_family_model(family, out, seed)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_json(out / TINY_MARKER, {"builder_version": FAMILY_BUILDER_VERSION, "family": family, "seed": seed,
                                         "preset": preset, "shapes": asdict(SHAPES), "notice": TINY_NOTICE})
    logger.info("built a random-weight %s model (seed %d) at %s in %.1fs", family, seed, out, time.perf_counter() - t0)
    return out


# name -> (layout, preset, family)
_TINY_NAMES = {"tiny": ("hf", "tiny", "llava"), "tiny-hf": ("hf", "tiny", "llava"),
               "tiny-original": ("original", "tiny", "llava"), "tiny-bench": ("hf", "bench", "llava"),
               "tiny-bench-original": ("original", "bench", "llava"),
               **{f"tiny-{family}": ("hf", "tiny", family) for family in FAMILY_BUILDERS}}


def build_loaded(preset: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None, conv_mode: str = "vicuna_v1"):
    """A random-weight model of ``preset``'s shapes built directly on ``device`` (no files), wrapped as a
    :class:`~llava.model.loaded.LoadedModel`. For benchmarks: ``llava-1.5-7b`` gives the real 7B architecture."""
    import torch
    from transformers import LlavaForConditionalGeneration

    spec = PRESETS[preset]
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tok_model = train_tokenizer(Path(tmp), spec.vocab_size, seed)
        tokenizer = llama_tokenizer(tok_model, spec.max_position_embeddings)
    base_vocab = len(tokenizer) - 2
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(_llava_config(spec, base_vocab)).eval()
    finally:
        torch.set_default_dtype(previous)
    vocab = model.config.text_config.vocab_size
    suppress = sorted({base_vocab, base_vocab + 1} | set(range(len(tokenizer), vocab)))
    return LoadedModel(
        tokenizer=tokenizer, model=model, image_processor=_image_processor(spec),
        context_len=spec.max_position_embeddings, model_name=f"random-{preset}", model_path=f"(in memory: {preset})",
        layout="hf", image_token_id=base_vocab, tokens_per_image=(spec.image_size // spec.patch_size) ** 2,
        image_aspect_ratio="pad", conv_mode=conv_mode, device=device, dtype=dtype, suppress_token_ids=suppress,
        is_tiny=True)


def is_tiny_name(name: str) -> bool:
    return name in _TINY_NAMES


def cache_dir() -> Path:
    return Path(os.environ.get("ECSO_CACHE_DIR") or Path.home() / ".cache" / "ecso")


def tiny_model_path(name: str = "tiny", seed: int = 0) -> Path:
    """The cached folder for ``tiny``/``tiny-original``/``tiny-bench``/``tiny-<family>``, built on first use (safe
    across processes: built in a temporary folder, then renamed into place)."""
    if name not in _TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; valid: {', '.join(_TINY_NAMES)}")
    layout, preset, family = _TINY_NAMES[name]
    target = cache_dir() / "models" / (f"{preset}-{layout}-seed{seed}-v{BUILDER_VERSION}" if family == "llava"
                                       else f"{family}-{preset}-seed{seed}-v{FAMILY_BUILDER_VERSION}")
    if (target / TINY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("building the %s model into %s (%s)", name, target, TINY_NOTICE)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build_tiny(tmp / "m", layout=layout, seed=seed, preset=preset, family=family)
        try:
            os.rename(tmp / "m", target)
        except OSError:
            if not (target / TINY_MARKER).exists():  # lost a race to another process: fine if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.model.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--family", choices=["llava", *FAMILY_BUILDERS], default="llava",
                        help="llava: LLaVA-1.5 (both layouts, both presets); llava_next, qwen2_5_vl, idefics3, "
                             "gemma3: that family's transformers classes, scaled down (hf layout, tiny preset only; "
                             "qwen2_5_vl needs torchvision) (default %(default)s)""")
    parser.add_argument("--layout", choices=["hf", "original"], default="hf",
                        help="hf: transformers' LlavaForConditionalGeneration folder; original: LLaVA-1.5's release "
                             "layout (LlavaLlamaForCausalLM + separate CLIP folder + tokenizer.model)")
    parser.add_argument("--seed", type=int, default=0, help="weight and tokenizer seed (same seed, same bytes)")
    parser.add_argument("--preset", choices=["tiny", "bench"], default="tiny",
                        help="tiny: ~0.4 M parameters for tests; bench: ~90 M parameters for CPU benchmarks "
                             "(the llava-1.5-7b preset is built in memory by the GPU benchmarks, not saved)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "CLIPImageProcessor requires torchvision": PIL's is what LLaVA uses
    hf_logging.disable_progress_bar()
    try:
        path = build_tiny(args.out, layout=args.layout, seed=args.seed, preset=args.preset, family=args.family)
    except (ValueError, MissingExtraError) as exc:
        parser.error(str(exc))
    print(path)


if __name__ == "__main__":
    main()
