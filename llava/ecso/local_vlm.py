"""The in-process backend of every vision-language family other than LLaVA-1.5 (:class:`VLMBackend`), and the
``local`` backend's factory (:func:`load_local`), which reads a checkpoint's family from its ``config.json`` and
returns LLaVA-1.5's :class:`~llava.ecso.local.LocalBackend` or a :class:`VLMBackend`.

A :class:`VLMBackend` renders every request with the processor's chat template: ECSO's four prompts are the same
text for every family, each step a fresh single-turn chat (step 4 without the image). A LLaVA-protocol prompt sent
to its worker (already templated in LLaVA's ``--conv-mode``, ``vicuna_v1`` by default) is parsed back into a chat
first (:func:`llava.conversation.parse_prompt`), and the worker's status says so.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

from PIL import Image

from llava.conversation import Chat, chat_messages, get_conv_template, parse_prompt
from llava.ecso.backends import Prepared, StepRequest
from llava.ecso.local import EngineBackend, LocalBackend
from llava.errors import UnsupportedError
from llava.model.engine import LlavaEngine
from llava.model.engine_base import GenerationEngine
from llava.model.prefix_cache import DEFAULT_CACHE_BYTES
from llava.model.vlm import checkpoint_family, load_vlm
from llava.model.vlm_engine import VLMEncoded, VLMEngine

__all__ = ["VLMBackend", "load_local", "backend_for_engine"]

logger = logging.getLogger(__name__)

PROMPT_FORMAT = "processor chat template"


class VLMBackend(EngineBackend):
    """A non-LLaVA vision-language model in process: chats rendered with its processor's chat template, images
    preprocessed by its processor, batched with left padding. ``conv_mode``: the LLaVA template its LLaVA-protocol
    prompts arrive in (parsed back into chats)."""

    engine: VLMEngine

    def __init__(self, engine: VLMEngine, conv_mode: str | None = None, max_batch_size: int = 16):
        super().__init__(engine, max_batch_size)
        self.conv_mode = conv_mode or "vicuna_v1"
        get_conv_template(self.conv_mode)  # fail fast on an unknown template

    @classmethod
    def load(cls, model_path: str, conv_mode: str | None = None, device: str | None = "auto",
             image_aspect_ratio: str | None = None, max_batch_size: int = 16, model_base: str | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES, **load_kwargs: Any) -> VLMBackend:
        """Load ``model_path`` (:func:`~llava.model.vlm.load_vlm`'s arguments) and wrap it. LLaVA-only options
        (``image_aspect_ratio``, ``model_base``) are refused with the reason."""
        if image_aspect_ratio is not None:
            raise UnsupportedError(f"--image-aspect-ratio sets LLaVA-1.5's preprocessing; {model_path!r} is not "
                                   "LLaVA-1.5: its processor preprocesses images itself")
        if model_base is not None:
            raise UnsupportedError(f"--model-base merges LLaVA LoRA checkpoints; {model_path!r} is not one")
        return cls(VLMEngine(load_vlm(model_path, device=device, **load_kwargs), cache_bytes=cache_bytes),
                   conv_mode=conv_mode, max_batch_size=max_batch_size)

    def _row_kind(self, request: StepRequest) -> Hashable:
        return len(request.images)  # processors batch rows with the same number of images

    def encode_chat(self, chat: Chat) -> VLMEncoded:
        return self.engine.encode(chat_messages(chat), chat.images)

    def describe(self) -> dict:
        out = super().describe()
        if not self.engine.prefix_reuse:
            out["prefix_reuse_note"] = self.engine.loaded.family.prefix_reuse_note
        return out

    def status(self) -> dict[str, Any]:
        """The LLaVA template its LLaVA-protocol prompts are parsed with, its family, and that prompts are rendered
        with the processor's chat template."""
        return {"conv_mode": self.conv_mode, "model_family": self.engine.loaded.family.name,
                "prompt_format": PROMPT_FORMAT, "random_weights": self.engine.loaded.is_tiny}

    def prepare_templated(self, prompt: str, images: Sequence[Image.Image]) -> Prepared:
        """A LLaVA-protocol prompt: parsed back into a chat (``conv_mode``), rendered with the chat template."""
        chat = parse_prompt(self.conv_mode, prompt)
        if chat is None:  # not in the expected template: the whole prompt is the user's message
            logger.warning("a LLaVA-protocol prompt is not in the %s template; sending it as one user message",
                           self.conv_mode)
            chat = Chat(None, [(prompt.replace("<image>\n", "").replace("<image>", ""), None)],
                        [[None] * prompt.count("<image>")])
        return self.prepare(chat.with_images(images))


def backend_for_engine(engine: GenerationEngine, **kwargs: Any) -> EngineBackend:
    """The in-process backend of an engine loaded already (tests, launchers, benchmarks)."""
    if isinstance(engine, LlavaEngine):
        return LocalBackend(engine, **kwargs)
    if isinstance(engine, VLMEngine):
        return VLMBackend(engine, **kwargs)
    raise UnsupportedError(f"no in-process backend for {type(engine).__name__}")


def load_local(model_path: str, **kwargs: Any) -> EngineBackend:
    """The ``local`` backend for any checkpoint: its family is read from its ``config.json`` (never its name);
    LLaVA-1.5 keeps LLaVA's templates and engine, every other family gets a :class:`VLMBackend`."""
    _, family = checkpoint_family(model_path)
    if family.engine == "llava":
        return LocalBackend.load(model_path, **kwargs)
    return VLMBackend.load(model_path, **kwargs)
