"""The text side of the tiny test models: their frozen training text and the tokenizers trained on it on the spot.

Shared by the LLaVA-1.5 builder (:mod:`llava.model.tiny`) and the other families' builders
(:mod:`llava.model.tiny_families`). Every trainer here is deterministic: the same seed gives the same bytes.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["corpus", "train_tokenizer", "write_original_tokenizer", "llama_tokenizer", "train_bpe", "write_json",
           "patch_json"]

_CORPUS_FILE = Path(__file__).with_name("tiny_corpus.json")


def corpus(seed: int) -> list[str]:
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

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # no model_prefix: a path would be stored in the model and break byte-identity
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", split_digits=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_original_tokenizer(out: Path, tok_model: Path, model_max_length: int) -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` as the released LLaVA-1.5 checkpoints ship them."""
    shutil.copyfile(tok_model, out / "tokenizer.model")
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": model_max_length, "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    })
    write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def llama_tokenizer(tok_model: Path, model_max_length: int):
    """The llava-hf tokenizer: the Llama tokenizer plus ``<image>`` (id = base vocab) and ``<pad>`` (next id)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_original_tokenizer(Path(tmp), tok_model, model_max_length)
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def train_bpe(vocab_size: int, seed: int, specials: Sequence[str], style: str,
              extra_lines: Iterable[str] = ()) -> dict[str, Any]:
    """A BPE trained on the corpus with the ``tokenizers`` library, as the ``tokenizer.json`` dict: ``style``
    ``byte_level`` (GPT-2/Qwen: bytes mapped to printable characters, ``Ġ`` marks a space) or ``metaspace``
    (Gemma: ``▁`` starts a word, 256 ``<0xNN>`` byte-fallback pieces right after the special tokens). Special
    tokens take the first ids, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif style == "metaspace":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*specials, *byte_pieces],
                                      show_progress=False)
    else:
        raise ValueError(f"unknown BPE style {style!r}; valid: byte_level, metaspace")
    tok.train_from_iterator([*extra_lines, *corpus(seed)], trainer)
    return json.loads(tok.to_str())


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def patch_json(path: Path, updates: dict) -> None:
    obj = json.loads(path.read_text())
    obj.update(updates)
    write_json(path, obj)
