"""Chat templates, byte-identical to LLaVA's (``llava/conversation.py`` of haotian-liu/LLaVA).

A template is a :class:`Conversation`; :data:`conv_templates` is the registry by name. A :class:`Chat` is a
conversation to answer, independent of templates; :func:`render_prompt` renders it in a template and
:func:`build_prompt` the single-turn prompt every ECSO step uses.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.errors import InvalidRequestError

__all__ = [
    "SeparatorStyle",
    "Conversation",
    "conv_templates",
    "default_conversation",
    "get_conv_template",
    "Chat",
    "render_prompt",
    "build_prompt",
    "parse_prompt",
    "chat_messages",
    "default_conv_mode",
]


class SeparatorStyle(enum.Enum):
    SINGLE = enum.auto()
    TWO = enum.auto()
    MPT = enum.auto()
    PLAIN = enum.auto()
    LLAMA_2 = enum.auto()


@dataclasses.dataclass
class Conversation:
    """A conversation in one template. ``messages`` holds ``[role, text-or-None]`` pairs; a trailing ``None``
    leaves the assistant turn open for generation. A first message may be a tuple ``(text, image, mode)`` as in
    LLaVA's demo; its ``<image>`` tag is then moved to the front."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]]
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def append_message(self, role: str, message: Any) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[[r, m] for r, m in self.messages])

    def _normalized_messages(self) -> list[list[Any]]:
        messages = [[r, m] for r, m in self.messages]
        if messages and isinstance(messages[0][1], tuple):
            role, first = messages[0]
            text = first[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            messages[0] = [role, DEFAULT_IMAGE_TOKEN + "\n" + text]
        return [[r, m[0] if isinstance(m, tuple) else m] for r, m in messages]

    def get_prompt(self) -> str:
        messages = self._normalized_messages()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, msg in messages:
                out += f"{role}: {msg}{self.sep}" if msg else f"{role}:"
            return out
        if style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, msg) in enumerate(messages):
                out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
            return out
        if style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, msg in messages:
                out += f"{role}{msg}{self.sep}" if msg else role
            return out
        if style == SeparatorStyle.LLAMA_2:
            return self._llama2_prompt(messages)
        if style == SeparatorStyle.PLAIN:
            seps = (self.sep, self.sep2)
            out = self.system
            for i, (_, msg) in enumerate(messages):
                if msg:
                    out += msg + seps[i % 2]
            return out
        raise ValueError(f"invalid separator style: {style}")

    def _llama2_prompt(self, messages: list[list[Any]]) -> str:
        out = ""
        for i, (role, msg) in enumerate(messages):
            if i == 0 and (not msg or role != self.roles[0]):
                raise InvalidRequestError("llama_2 templates need a first, non-empty user message")
            if not msg:
                continue
            if i == 0 and self.system:
                msg = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + msg
            if i % 2 == 0:
                out += self.sep + f"[INST] {msg} [/INST]"
            else:
                out += " " + msg + " " + self.sep2
        # LLaVA strips the leading separator with str.lstrip (characters, not a prefix); keep that exactly.
        return out.lstrip(self.sep)


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
    version="llama_v2",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_templates: dict[str, Conversation] = {
    "vicuna_v1": conv_vicuna_v1,
    "v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "llava_llama_2": conv_llava_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
}
default_conversation = conv_vicuna_v1


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template ``name``; unknown names list the valid ones."""
    try:
        return conv_templates[name].copy()
    except KeyError:
        raise InvalidRequestError(
            f"unknown conversation template {name!r}; valid: {', '.join(sorted(conv_templates))}"
        ) from None


@dataclasses.dataclass
class Chat:
    """A conversation to answer, independent of any template: the system text (``None``: the template's own),
    ``(user, assistant)`` turns with the last assistant ``None``, and each turn's images (whatever stands for them:
    URLs, loaded images; templates only count them)."""

    system: str | None
    turns: list[tuple[str, str | None]]
    turn_images: list[list[Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.turn_images:
            self.turn_images = [[] for _ in self.turns]
        if len(self.turn_images) != len(self.turns):
            raise InvalidRequestError(f"a chat of {len(self.turns)} turns got images for {len(self.turn_images)}")

    @classmethod
    def single(cls, text: str, images: Sequence[Any] = (), history: Sequence[tuple[str, str]] = ()) -> Chat:
        """One question after earlier ``(user, assistant)`` turns; the images belong to the first turn (LLaVA's
        chat convention)."""
        turns: list[tuple[str, str | None]] = [*history, (text, None)]
        return cls(None, turns, [list(images)] + [[] for _ in turns[1:]])

    @property
    def images(self) -> list[Any]:
        return [image for images in self.turn_images for image in images]

    def with_images(self, images: Sequence[Any]) -> Chat:
        """The same chat with its images replaced, in order (e.g. URLs by the images they point to)."""
        if len(images) != len(self.images):
            raise InvalidRequestError(f"the chat has {len(self.images)} images, got {len(images)} to put in")
        it = iter(images)
        return Chat(self.system, list(self.turns), [[next(it) for _ in turn] for turn in self.turn_images])


def render_prompt(conv_mode: str, chat: Chat) -> str:
    """The prompt of ``chat`` in template ``conv_mode``: each user message's images as ``<image>\\n`` in front of
    its text, as LLaVA does; ``chat.system`` replaces the template's system prompt."""
    conv = get_conv_template(conv_mode)
    if chat.system is not None:
        header = "<|im_start|>system\n" if conv.sep_style == SeparatorStyle.MPT else ""
        conv.system = header + chat.system
    for (user, assistant), images in zip(chat.turns, chat.turn_images):
        conv.append_message(conv.roles[0], (DEFAULT_IMAGE_TOKEN + "\n") * len(images) + user)
        conv.append_message(conv.roles[1], assistant)
    return conv.get_prompt()


def build_prompt(conv_mode: str, text: str, num_images: int = 0,
                 history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt LLaVA builds for ``text``: ``<image>\\n`` per image in front of the first user message, the
    assistant turn left open. ``history`` holds earlier (user, assistant) turns of a chat."""
    return render_prompt(conv_mode, Chat.single(text, [None] * num_images, history))


def _placeholder(kind: str, i: int = 0) -> str:
    return f"\x00{kind}{i}\x00"


def _prompt_pattern(conv_mode: str, n_turns: int, custom_system: bool) -> re.Pattern:
    """A regex matching every prompt ``render_prompt`` gives for ``n_turns`` turns (the last one open): the chat
    is rendered with placeholders, which become the groups."""
    turns = [(_placeholder("U", i), _placeholder("A", i) if i < n_turns - 1 else None) for i in range(n_turns)]
    rendered = render_prompt(conv_mode, Chat(_placeholder("S") if custom_system else None, turns))
    pattern = re.sub("\x00([SUA])(\\d+)\x00", r"(?P<\1\2>.*?)", re.escape(rendered))  # re.escape keeps NUL
    return re.compile(pattern, re.DOTALL)


def _max_turns(conv_mode: str, prompt: str, limit: int = 64) -> int:
    """At most one turn per occurrence of what the template puts between a user message and its answer."""
    try:
        two = render_prompt(conv_mode, Chat(None, [(_placeholder("U"), _placeholder("A")), ("", None)]))
    except (TypeError, InvalidRequestError):  # a template without multi-turn chats (LLaVA's plain)
        return 1
    marker = two.split(_placeholder("U"), 1)[1].split(_placeholder("A"), 1)[0].strip()
    return min(limit, prompt.count(marker) + 1) if marker else 1


def parse_prompt(conv_mode: str, prompt: str, keep_image_tags: bool = False) -> Chat | None:
    """The :class:`Chat` that ``render_prompt(conv_mode, chat)`` turns into ``prompt`` (the assistant turn left
    open), each user turn's ``<image>`` tags counted into its images (``None`` placeholders); ``None`` when the
    prompt is not in that template. For serving a LLaVA-protocol prompt to a model with another chat format.
    ``keep_image_tags``: the tags stay in the user texts, where they stand (for messages that put each image where
    its tag is)."""
    # a template without a system text of its own cannot tell "none" from a custom one: try the custom one first
    systems = (True, False) if not get_conv_template(conv_mode).system else (False, True)
    for n_turns in range(_max_turns(conv_mode, prompt), 0, -1):
        for custom_system in systems:
            found = _prompt_pattern(conv_mode, n_turns, custom_system).fullmatch(prompt)
            if found is None:
                continue
            groups = found.groupdict()
            turns: list[tuple[str, str | None]] = []
            images: list[list[Any]] = []
            for i in range(n_turns):
                text = groups[f"U{i}"]
                tags = text.count(DEFAULT_IMAGE_TOKEN)
                if not keep_image_tags:
                    text = text.replace(DEFAULT_IMAGE_TOKEN + "\n", "").replace(DEFAULT_IMAGE_TOKEN, "")
                turns.append((text, groups.get(f"A{i}")))
                images.append([None] * tags)
            return Chat(groups["S0"] if custom_system and groups["S0"] else None, turns, images)
    return None


def chat_messages(chat: Chat) -> list[dict[str, Any]]:
    """``chat`` as transformers chat-template messages: each user turn's images as ``{"type": "image"}`` parts
    before its text (as LLaVA puts ``<image>`` first), the system text as a system message when set."""
    messages: list[dict[str, Any]] = []
    if chat.system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": chat.system}]})
    for (user, assistant), images in zip(chat.turns, chat.turn_images):
        messages.append({"role": "user", "content": [{"type": "image"} for _ in images]
                         + [{"type": "text", "text": user}]})
        if assistant is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


_CONV_MODE_BY_TEXT_MODEL = {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "chatml_direct"}


def default_conv_mode(text_model_type: str | None) -> str:
    """The template for a text backbone, read from the checkpoint's config (never from its folder name).
    LLaVA-1.5 (Vicuna/Llama) uses ``vicuna_v1``, as LLaVA's own evaluation scripts do."""
    return _CONV_MODE_BY_TEXT_MODEL.get(text_model_type or "llama", "vicuna_v1")
