"""Deterministic tiny random-weight LLaVA checkpoints, for tests and offline demos.

``python -m llava.model.tiny --out DIR [--layout hf|original] [--seed 0] [--preset tiny|bench]`` writes either
the llava-hf layout (a ``LlavaForConditionalGeneration`` folder) or the original LLaVA-1.5 layout
(``LlavaLlamaForCausalLM`` config, original key names, a separate CLIP vision folder, ``tokenizer.model`` only).
Both layouts from one seed hold the same weights. The models are random: their outputs are random text.

``--model-path tiny`` (or ``tiny-original``, ``tiny-bench``) anywhere in the project builds once into the user
cache dir (``$ECSO_CACHE_DIR`` or ``~/.cache/ecso``) and uses that folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, asdict
from pathlib import Path

from llava.constants import CLIP_MEAN, CLIP_STD, TINY_MARKER, TINY_MODELS
from llava.model.convert import fill_new_vocab_rows, padded_vocab_size, to_original_state_dict
from llava.model.loaded import LoadedModel

__all__ = ["TinySpec", "PRESETS", "build_tiny", "build_loaded", "tiny_model_path", "is_tiny_name", "TINY_NOTICE",
           "build_parser", "main"]

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
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

_CORPUS_FILE = Path(__file__).with_name("tiny_corpus.json")


def _corpus(seed: int) -> list[str]:
    """Deterministic training text: the frozen lines of ``tiny_corpus.json`` (chat template system prompts, the
    ECSO prompt templates), plus seeded sentences over its small lexicon."""
    data = json.loads(_CORPUS_FILE.read_text(encoding="utf-8"))
    words = data["words"].split()
    rng = random.Random(seed)
    lines = list(data["lines"]) + [data["repeated_line"]] * data["repeats"]
    for _ in range(6000):
        n = rng.randint(3, 14)
        chosen = [rng.choice(words) for _ in range(n)]
        lines.append(" ".join(chosen).capitalize() + rng.choice([".", "?", "!", ",", ":", "\n"]))
    return lines


def train_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0) -> Path:
    """A Llama-style SentencePiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2) trained on the spot."""
    import sentencepiece as spm

    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # no model_prefix: a path would be stored in the model and break byte-identity
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", split_digits=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


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


def _write_original_tokenizer(out: Path, tok_model: Path, spec: TinySpec) -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` as the released LLaVA-1.5 checkpoints ship them."""
    shutil.copyfile(tok_model, out / "tokenizer.model")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": spec.max_position_embeddings, "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def _hf_tokenizer(tok_model: Path, spec: TinySpec):
    """The llava-hf tokenizer: the Llama tokenizer plus ``<image>`` (id = base vocab) and ``<pad>`` (next id)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_original_tokenizer(Path(tmp), tok_model, spec)
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def _write_hf(out: Path, spec: TinySpec, tok_model: Path, sd: dict, base_vocab: int) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    cfg = _llava_config(spec, base_vocab)
    model = LlavaForConditionalGeneration(cfg)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out)
    proc = LlavaProcessor(
        image_processor=_image_processor(spec), tokenizer=_hf_tokenizer(tok_model, spec), patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=_CHAT_TEMPLATE,
    )
    proc.save_pretrained(out)
    _patch_json(out / "tokenizer_config.json", {"legacy": True, "padding_side": "left",
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
    _write_json(vision_dir / "config.json", _clip_config(spec))
    _image_processor(spec).save_pretrained(vision_dir)
    # Two .bin shards with an index, as the released llava-v1.5-7b.
    keys = sorted(llm_sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: llm_sd[k] for k in shard_keys}, out / name)
        weight_map.update({k: name for k in shard_keys})
    _write_json(out / "pytorch_model.bin.index.json", {"metadata": {}, "weight_map": weight_map})
    _write_json(out / "config.json", _original_config(spec, base_vocab, vision_dir.name))
    _write_original_tokenizer(out, tok_model, spec)


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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _patch_json(path: Path, updates: dict) -> None:
    obj = json.loads(path.read_text())
    obj.update(updates)
    _write_json(path, obj)


def build_tiny(out: str | os.PathLike, layout: str = "hf", seed: int = 0, preset: str = "tiny") -> Path:
    """Build a checkpoint folder at ``out`` (must not exist). Deterministic for a given (layout, seed, preset)."""
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
    _write_json(out / TINY_MARKER, {"builder_version": BUILDER_VERSION, "layout": layout, "seed": seed,
                                         "preset": preset, "spec": asdict(spec), "notice": TINY_NOTICE})
    logger.info("built a random-weight model, preset %s (%s layout, seed %d), at %s in %.1fs", preset, layout, seed, out,
                time.perf_counter() - t0)
    return out




def build_loaded(preset: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None, conv_mode: str = "vicuna_v1"):
    """A random-weight model of ``preset``'s shapes built directly on ``device`` (no files), wrapped as a
    :class:`~llava.model.loaded.LoadedModel`. For benchmarks: ``llava-1.5-7b`` gives the real 7B architecture."""
    import torch
    from transformers import LlavaForConditionalGeneration

    spec = PRESETS[preset]
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tok_model = train_tokenizer(Path(tmp), spec.vocab_size, seed)
        tokenizer = _hf_tokenizer(tok_model, spec)
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
    return name in TINY_MODELS


def cache_dir() -> Path:
    return Path(os.environ.get("ECSO_CACHE_DIR") or Path.home() / ".cache" / "ecso")


def tiny_model_path(name: str = "tiny", seed: int = 0) -> Path:
    """The cached folder for ``tiny``/``tiny-original``/``tiny-bench``, built on first use (safe across processes:
    built in a temporary folder, then renamed into place)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid: {', '.join(TINY_MODELS)}")
    layout, preset = TINY_MODELS[name]
    target = cache_dir() / "models" / f"{preset}-{layout}-seed{seed}-v{BUILDER_VERSION}"
    if (target / TINY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("building the %s model into %s (%s)", name, target, TINY_NOTICE)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build_tiny(tmp / "m", layout=layout, seed=seed, preset=preset)
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
    parser.add_argument("--layout", choices=["hf", "original"], default="hf",
                        help="hf: transformers' LlavaForConditionalGeneration folder; original: LLaVA-1.5's release "
                             "layout (LlavaLlamaForCausalLM + separate CLIP folder + tokenizer.model)")
    parser.add_argument("--seed", type=int, default=0, help="weight and tokenizer seed (same seed, same bytes)")
    parser.add_argument("--preset", choices=["tiny", "bench"], default="tiny",
                        help="tiny: ~0.4 M parameters for tests; bench: ~90 M parameters for CPU benchmarks "
                             "(the llava-1.5-7b preset is built in memory by the GPU benchmarks, not saved)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "CLIPImageProcessor requires torchvision": PIL's is what LLaVA uses
    hf_logging.disable_progress_bar()
    path = build_tiny(args.out, layout=args.layout, seed=args.seed, preset=args.preset)
    print(path)


if __name__ == "__main__":
    main()
