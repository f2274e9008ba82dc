"""Training examples: the tokens before the answer are exactly the prompt inference encodes (LocalBackend's prompt,
LlavaEngine.encode), the labels supervise only the assistant's tokens (checked token by token, and against LLaVA's
own preprocess_v1 masking rule), images go through inference's preprocessing; bad rows are named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.ecso.backends import StepRequest
from llava.ecso.local import LocalBackend
from llava.eval.jsonl import DatasetError
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.train.sft_dataset import (LlavaTemplateFormat, SFTDataset, SFTExample, collate, encode_example,
                                     read_sft_json)


def llava_preprocess_v1_labels(conversation: str, tokenizer) -> tuple[list[int], list[int]]:
    """LLaVA's ``preprocess_v1`` (llava/train/train.py) for one rendered vicuna_v1 conversation, written from its
    published algorithm: ids with one IMAGE_TOKEN_INDEX per image, rounds split at ``</s>``, each round's
    instruction masked by lengths (``- 2``: the BOS and the space token the split leaves), BOS masked, the rest
    supervised. Its own consistency check (``cur_len == total_len``) must hold."""
    def ids(text):
        return tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX, 1)

    input_ids = ids(conversation)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2, rou
        round_len, instruction_len = len(ids(rou)), len(ids(parts[0] + sep)) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "LLaVA's own check: tokenization mismatch"
    return input_ids, target


def _expand(ids: list[int], labels: list[int], image_id: int, n: int) -> tuple[list[int], list[int]]:
    out_ids, out_labels = [], []
    for i, lab in zip(ids, labels):
        out_ids += [image_id] * n if i == IMAGE_TOKEN_INDEX else [i]
        out_labels += [IGNORE_INDEX] * n if i == IMAGE_TOKEN_INDEX else [lab]
    return out_ids, out_labels


@pytest.fixture(scope="module")
def fmt(tiny_loaded):
    return LlavaTemplateFormat(tiny_loaded)


def test_prompt_tokens_equal_inference_and_only_the_answer_is_supervised(sft_run, typo_images, tiny_loaded,
                                                                        tiny_engine, fmt):
    backend = LocalBackend(tiny_engine)
    tok = tiny_loaded.tokenizer
    for ex in read_sft_json(sft_run):
        enc = encode_example(ex, fmt)
        answer = ex.turns[0][1]
        image = load_image(typo_images / ex.image)
        prompt = tiny_engine.encode(backend.prompt(StepRequest(ex.turns[0][0], [image])), [image]).input_ids
        n = len(prompt)
        assert enc.input_ids[:n] == prompt  # token by token: what the model sees when it answers
        assert enc.labels[:n] == [IGNORE_INDEX] * n
        assert enc.labels[n:] == enc.input_ids[n:] and IGNORE_INDEX not in enc.labels[n:]
        assert enc.labels[-1] == tok.eos_token_id  # the template's end of turn, </s>, is learned
        assert tok.decode(enc.labels[n:-1]).strip() == answer
        assert enc.input_ids.count(tiny_loaded.image_token_id) == tiny_loaded.tokens_per_image


def test_masks_equal_llava_preprocess_v1(tiny_loaded, fmt, sft_run):
    """Single-turn rows (ECSO's) and a multi-turn text row: the same labels as LLaVA's length-based rule."""
    rows = read_sft_json(sft_run)
    multi = SFTExample("multi", None, (("What is shown?", "A cat on a mat."), ("And its colour?", "Orange, mostly.")))
    for ex in [*rows, multi]:
        enc = encode_example(ex, fmt)
        conversation = fmt.render(ex.chat(len(ex.turns) - 1, answered=True))
        ref_ids, ref_labels = _expand(*llava_preprocess_v1_labels(conversation, tiny_loaded.tokenizer),
                                      tiny_loaded.image_token_id, tiny_loaded.tokens_per_image)
        assert enc.input_ids == ref_ids and enc.labels == ref_labels, ex.id
    enc = encode_example(multi, fmt)
    supervised = [tiny_loaded.tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])]
    assert "A cat on a mat.</s>" in supervised[0] and "Orange, mostly.</s>" in supervised[0]
    assert "What is shown" not in supervised[0] and "USER" not in supervised[0]


class _TrailingSpace(LlavaTemplateFormat):
    """A format whose open prompt ends in a space (as some chat templates do): its tokens are not a prefix of the
    answered conversation's, so the row cannot be trained as inference sees it."""

    def render(self, chat):
        text = super().render(chat)
        return text + " " if chat.turns[-1][1] is None else text


def test_rows_that_inference_would_tokenize_differently_are_dropped(tiny_loaded, sft_run, typo_images):
    examples = read_sft_json(sft_run)
    with pytest.raises(DatasetError, match=r"none of the 4 SFT rows can be trained on: \{'tokenization_mismatch'"):
        SFTDataset(examples, _TrailingSpace(tiny_loaded), tiny_loaded, typo_images)


def test_collate_pads_right_and_keeps_pixels_in_row_order(tiny_loaded, fmt, sft_run, typo_images):
    text_only = SFTExample("t", None, (("Hello there", "Hi."),))
    ds = SFTDataset([*read_sft_json(sft_run)[:2], text_only], fmt, tiny_loaded, typo_images)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items, tiny_loaded.tokenizer.pad_token_id)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["pixel_values"].shape[0] == 2
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tiny_loaded.tokenizer.pad_token_id).all()
    image = load_image(typo_images / ds.encoded[1].example.image)
    assert torch.equal(batch["pixel_values"][1:2], process_images([image], tiny_loaded.image_processor, "pad"))
    assert "pixel_values" not in ds[2]


def test_max_length_cuts_rows_and_drops_those_left_without_an_answer(tiny_loaded, fmt, sft_run, typo_images):
    examples = read_sft_json(sft_run)
    full = encode_example(examples[0], fmt)
    first_label = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    cut = encode_example(examples[0], fmt, max_length=first_label + 2)
    assert cut.truncated and len(cut.input_ids) == first_label + 2 and cut.supervised == 2
    with pytest.raises(DatasetError, match="none of the 4 SFT rows"):
        SFTDataset(examples, fmt, tiny_loaded, typo_images, max_length=100)  # inside the image tokens


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "conversations": [{"from": "human", "value": "q"}]}, "alternate human, gpt"),
    ({"id": "b", "image": "x.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "exactly one <image> tag"),
    ({"id": "c", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "<image> in a row without an 'image'"),
    ({"id": "d", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "string 'value'"),
    ({"id": "e"}, "not a LLaVA row"),
])
def test_malformed_rows_are_named(tmp_path, row, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "ok", "conversations": [{"from": "human", "value": "q"},
                                                               {"from": "gpt", "value": "a"}]}, row]))
    with pytest.raises(DatasetError, match=f"row 1.*{message}|{message}") as err:
        read_sft_json(path)
    assert "row 1" in str(err.value)


def test_image_tag_moves_to_the_front_as_llava_does(tmp_path):
    path = tmp_path / "data.jsonl"  # JSON lines are read too
    row = {"id": 7, "image": "a.jpg", "conversations": [
        {"from": "gpt", "value": "skipped, as LLaVA skips a leading non-human message"},
        {"from": "human", "value": "Describe this.\n<image>"}, {"from": "gpt", "value": "A thing."}]}
    path.write_text(json.dumps(row) + "\n")
    (ex,) = read_sft_json(path)
    assert ex == SFTExample("7", "a.jpg", (("Describe this.", "A thing."),), 0)
    missing = tmp_path / "images"
    missing.mkdir()
    with pytest.raises(DatasetError, match="not in --image-folder .* a.jpg"):
        SFTDataset([ex], None, None, missing)  # type: ignore[arg-type]
