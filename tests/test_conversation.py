"""Templates byte-exact against LLaVA's conversation.py."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava.conversation import (
    Chat,
    build_prompt,
    chat_from_prompt,
    conv_templates,
    default_conv_mode,
    get_conv_template,
    render_prompt,
)
from llava.errors import InvalidRequestError

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYS = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_vicuna_v1_single_turn_with_image():
    assert build_prompt("vicuna_v1", "What is this?", 1) == VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT:"


def test_llava_v1_says_human_and_vicuna_says_user():
    assert build_prompt("llava_v1", "Hi") == LLAVA_V1_SYS + " USER: Hi ASSISTANT:"
    assert "curious user" in conv_templates["vicuna_v1"].system
    assert conv_templates["vicuna_v1"].sep == " " and conv_templates["vicuna_v1"].sep2 == "</s>"


def test_multi_turn_uses_sep2_after_assistant():
    got = build_prompt("vicuna_v1", "b", 1, [("a", "x")])
    assert got == VICUNA_SYS + " USER: <image>\na ASSISTANT: x</s>USER: b ASSISTANT:"


def test_llava_llama_2():
    sys_ = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
            "user provides, and assist the user with a variety of tasks using natural language.")
    assert build_prompt("llava_llama_2", "Hi", 1) == f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\n<image>\nHi [/INST]"


def test_mistral_instruct_chatml_plain():
    assert build_prompt("mistral_instruct", "Hi", 1) == "[INST] <image>\nHi [/INST]"
    assert build_prompt("chatml_direct", "Hi", 1) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nHi<|im_end|>"
        "<|im_start|>assistant\n")
    assert build_prompt("plain", "Hi", 1) == "<image>\nHi\n"


def test_tuple_first_message_moves_image_tag_to_front():
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", ("What is <image> this?", None, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt().endswith("USER: <image>\nWhat is  this? ASSISTANT:")


def test_unknown_template_lists_valid_names():
    with pytest.raises(InvalidRequestError, match="vicuna_v1"):
        get_conv_template("nope")


def test_default_conv_mode_from_text_model_type():
    assert default_conv_mode("llama") == "vicuna_v1"
    assert default_conv_mode("mistral") == "mistral_instruct"


# ---------------------------------------------------------------------------- LLaVA prompts back into chats

_WORDS = st.text(alphabet="abcdefghij XYZ?.,!'\n", min_size=1, max_size=30).filter(lambda t: t.strip() == t)


@st.composite
def _chats(draw):
    n = draw(st.integers(1, 3))
    turns = [(draw(_WORDS), draw(_WORDS) if k < n - 1 else None) for k in range(n)]
    images = [[None] * draw(st.integers(0, 2)) if k == 0 else [] for k in range(n)]
    system = draw(st.none() | _WORDS)
    return Chat(system, turns, images)


@pytest.mark.parametrize("mode", sorted(set(conv_templates) - {"plain"}))
@settings(max_examples=60, deadline=None)
@given(chat=_chats())
def test_chat_from_prompt_is_render_prompts_inverse(mode, chat):
    got = chat_from_prompt(mode, render_prompt(mode, chat))
    tagged = [(("<image>\n" * len(imgs)) + user, answer) for (user, answer), imgs in zip(chat.turns, chat.turn_images)]
    assert got.turns == tagged and got.system == chat.system
    assert [len(i) for i in got.turn_images] == [len(i) for i in chat.turn_images]
    assert render_prompt(mode, Chat(got.system, [(u.replace("<image>\n", ""), a) for u, a in got.turns],
                                    got.turn_images)) == render_prompt(mode, chat)


def test_chat_from_prompt_keeps_image_positions_and_refuses_other_templates():
    prompt = build_prompt("vicuna_v1", "Compare <image> with this", 0).replace("Compare <image> with this",
                                                                             "Compare <image>\n with <image>")
    chat = chat_from_prompt("vicuna_v1", prompt)
    assert chat.turns == [("Compare <image>\n with <image>", None)] and chat.turn_images == [[None, None]]
    assert chat_from_prompt("plain", "<image>\nDescribe.").turns == [("<image>\nDescribe.", None)]
    with pytest.raises(InvalidRequestError, match="not in the 'vicuna_v1' template"):
        chat_from_prompt("vicuna_v1", "Just some text")
    with pytest.raises(InvalidRequestError, match="last turn must be the user's"):
        chat_from_prompt("vicuna_v1", build_prompt("vicuna_v1", "q") + " an answer</s>USER: x ASSISTANT: y</s>"
                         "ASSISTANT:")
