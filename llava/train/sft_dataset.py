"""LLaVA's conversation JSON as training examples: token ids, labels that supervise only the assistant's tokens,
and the image.

Tokens are the ones inference sees. A row's conversation is rendered with the model's prompt format (LLaVA's
``vicuna_v1`` template for LLaVA-1.5) and tokenized as the engine tokenizes a prompt (``tokenizer_image_token``,
576 image positions per ``<image>``). For each assistant turn, the prompt inference would build at that point (the
earlier turns, this user message, the open assistant turn) must tokenize to a prefix of the conversation's tokens;
the tokens from there to the end of the turn (its answer and the template's end of turn, ``</s>``) are supervised,
every other position is ``IGNORE_INDEX``. A row where the prefix property fails is dropped with a warning (LLaVA
masks such rows whole: "tokenization mismatch"). Images are padded to a square (LLaVA-1.5's ``pad``) or as the model
is configured, by the function inference uses.

Another model family plugs in as another :class:`PromptFormat` (its processor's chat template and tokenization);
the masking rule above does not change.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.conversation import Chat, get_conv_template, render_prompt
from llava.eval.jsonl import DatasetError
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.loaded import LoadedModel

__all__ = ["SFTExample", "PromptFormat", "LlavaTemplateFormat", "EncodedExample", "TokenizationMismatch",
           "read_sft_json", "encode_example", "SFTDataset", "collate"]

logger = logging.getLogger(__name__)
_ROLES = {"human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class SFTExample:
    """One row: its id, its image file (relative to the image folder; None for text-only rows), and its turns as
    (user, assistant) pairs with the ``<image>`` tag taken out of the text (``image_turn`` says which turn had it)."""

    id: str
    image: str | None
    turns: tuple[tuple[str, str], ...]
    image_turn: int = 0

    def chat(self, upto: int, answered: bool, image: Any = None) -> Chat:
        """The first ``upto + 1`` turns, the last one answered or left open for generation."""
        turns: list[tuple[str, str | None]] = list(self.turns[:upto + 1])
        if not answered:
            turns[-1] = (turns[-1][0], None)
        images = [[image] if self.image is not None and i == self.image_turn else [] for i in range(len(turns))]
        return Chat(None, turns, images)


def _row_example(row: Any, where: str) -> SFTExample:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise DatasetError(f"{where}: not a LLaVA row (an object with a 'conversations' list)")
    messages = row["conversations"]
    if messages and messages[0].get("from") != "human":  # LLaVA skips a leading non-human message
        messages = messages[1:]
    roles = [m.get("from") if isinstance(m, dict) else None for m in messages]
    if not messages or len(messages) % 2 or any(r != ("human", "gpt")[i % 2] for i, r in enumerate(roles)):
        raise DatasetError(f"{where}: conversations must alternate human, gpt, ... and end with gpt; got {roles}")
    texts = [m.get("value") for m in messages]
    if not all(isinstance(t, str) for t in texts):
        raise DatasetError(f"{where}: every message needs a string 'value'")
    image = row.get("image")
    tags = [t.count(DEFAULT_IMAGE_TOKEN) for t in texts]
    if image is not None and (sum(tags) != 1 or any(tags[1::2])):
        raise DatasetError(f"{where}: a row with an image needs exactly one {DEFAULT_IMAGE_TOKEN} tag, in a human "
                           f"message; found {sum(tags)}")
    if image is None and sum(tags):
        raise DatasetError(f"{where}: {DEFAULT_IMAGE_TOKEN} in a row without an 'image'")
    # LLaVA's preprocess_multimodal: the tag leaves the text, which is stripped; the template puts it in front
    users = [t.replace(DEFAULT_IMAGE_TOKEN, "").strip() if n else t for t, n in zip(texts[0::2], tags[0::2])]
    turns = tuple(zip(users, texts[1::2]))
    image_turn = tags[0::2].index(1) if image is not None else 0
    return SFTExample(str(row.get("id", where)), None if image is None else str(image), turns, image_turn)


def read_sft_json(path: str | Path) -> list[SFTExample]:
    """The rows of a LLaVA-format JSON file (a list; JSON lines are accepted too), checked; errors name the row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read the SFT data {path}: {exc}") from None
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is neither a JSON list of rows (LLaVA's format) nor JSON lines: {exc}") from None
    return [_row_example(row, f"{path} row {n}") for n, row in enumerate(rows)]


class PromptFormat(Protocol):
    """How a model family writes a chat as text and turns text into the ids inference feeds the model."""

    def render(self, chat: Chat) -> str: ...

    def tokenize(self, text: str) -> list[int]: ...


@dataclass
class LlavaTemplateFormat:
    """LLaVA's conversation templates (``vicuna_v1`` for LLaVA-1.5) and ``tokenizer_image_token``: what
    :class:`~llava.ecso.local.LocalBackend` and :class:`~llava.model.engine.LlavaEngine` do at inference."""

    loaded: LoadedModel
    conv_mode: str | None = None

    def __post_init__(self) -> None:
        self.conv_mode = self.conv_mode or self.loaded.conv_mode
        get_conv_template(self.conv_mode)

    def render(self, chat: Chat) -> str:
        return render_prompt(self.conv_mode, chat)

    def tokenize(self, text: str) -> list[int]:
        lm = self.loaded
        return tokenizer_image_token(text, lm.tokenizer, lm.image_token_id, lm.tokens_per_image)


class TokenizationMismatch(DatasetError):
    """A turn's inference prompt does not tokenize to a prefix of the whole conversation's tokens."""

    code = "tokenization_mismatch"


@dataclass
class EncodedExample:
    example: SFTExample
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_example(example: SFTExample, fmt: PromptFormat, max_length: int | None = None) -> EncodedExample:
    """Token ids and labels of one row (see the module docstring); cut to ``max_length`` tokens as LLaVA does."""
    ids = fmt.tokenize(fmt.render(example.chat(len(example.turns) - 1, answered=True)))
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(len(example.turns)):
        start = fmt.tokenize(fmt.render(example.chat(k, answered=False)))
        end = fmt.tokenize(fmt.render(example.chat(k, answered=True)))
        if ids[:len(start)] != start or ids[:len(end)] != end or len(end) <= len(start):
            raise TokenizationMismatch(f"row {example.id}, turn {k}: the prompt of this turn does not tokenize to a "
                                       "prefix of the conversation's tokens; the row cannot be trained on as inference "
                                       "sees it")
        labels[len(start):len(end)] = ids[len(start):len(end)]
    cut = max_length is not None and len(ids) > max_length
    if cut:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(example, ids, labels, cut)


@dataclass
class SFTDataset:
    """A torch-style dataset (``len``, ``[i]``) of encoded rows; images are loaded when a row is fetched. Rows that
    cannot be trained on (a tokenization mismatch, nothing supervised left after the cut, an image tag cut off) are
    left out and counted in ``dropped``."""

    examples: Sequence[SFTExample]
    fmt: PromptFormat
    loaded: LoadedModel
    image_folder: Path
    max_length: int | None = None
    encoded: list[EncodedExample] = field(init=False, default_factory=list)
    dropped: dict[str, list[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        folder = Path(self.image_folder)
        missing = [e for e in self.examples if e.image is not None and not (folder / e.image).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of the SFT data are not in --image-folder "
                               f"{self.image_folder}, e.g. {missing[0].image} (row {missing[0].id})")
        image_id = self.loaded.image_token_id
        for example in self.examples:
            try:
                enc = encode_example(example, self.fmt, self.max_length)
            except TokenizationMismatch as exc:
                self._drop("tokenization_mismatch", example, str(exc))
                continue
            if example.image is not None and enc.input_ids.count(image_id) != self.loaded.tokens_per_image:
                self._drop("image_cut_off", example, f"row {example.id}: --max-length cuts into its image tokens")
            elif not enc.supervised:
                self._drop("nothing_supervised", example, f"row {example.id}: no answer token within --max-length")
            else:
                self.encoded.append(enc)
        if not self.encoded:
            raise DatasetError(f"none of the {len(self.examples)} SFT rows can be trained on: {self.dropped}")

    def _drop(self, why: str, example: SFTExample, message: str) -> None:
        logger.warning("%s; row left out", message)
        self.dropped.setdefault(why, []).append(example.id)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        enc = self.encoded[i]
        item: dict[str, Any] = {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels)}
        if enc.example.image is not None:
            image = load_image(Path(self.image_folder) / enc.example.image)
            item["pixel_values"] = process_images([image], self.loaded.image_processor, self.loaded.image_aspect_ratio)
        return item


def collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded ids (``pad_token_id``), labels (``IGNORE_INDEX``) and attention mask, as LLaVA's collator; the
    pixels of the rows that have an image, in row order."""
    import torch

    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = it["input_ids"], it["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
    return batch
