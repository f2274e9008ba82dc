"""Templates byte-exact against LLaVA's conversation.py."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava.conversation import Chat, build_prompt, conv_templates, default_conv_mode, get_conv_template
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


@pytest.mark.parametrize("conv_mode", sorted(conv_templates))
def test_parse_prompt_inverts_render_prompt(conv_mode):
    """A LLaVA-protocol prompt is parsed back into the chat it was rendered from (a worker whose model has another
    chat format re-renders it)."""
    from llava.conversation import Chat, parse_prompt, render_prompt

    chats = [Chat.single("What is it?", [None]), Chat.single("Hi", [])]
    if conv_mode != "plain":  # plain has no roles: neither a system text nor turns can be told apart
        chats += [Chat("Be brief.", [("x <y>", None)], [[None]]), Chat.single("Second?", [], [("First one", "An answer.")]),
                  Chat("Sys.", [("a", "b"), ("c", "d"), ("e", None)], [[None, None], [], [None]])]
    for chat in chats:
        parsed = parse_prompt(conv_mode, render_prompt(conv_mode, chat))
        assert parsed is not None and render_prompt(conv_mode, parsed) == render_prompt(conv_mode, chat)
        assert (parsed.system, parsed.turns) == (chat.system, chat.turns)
        assert [len(i) for i in parsed.turn_images] == [len(i) for i in chat.turn_images]
    assert parse_prompt("vicuna_v1", "[INST] a prompt in another template [/INST]") is None


_WORDS = st.text(alphabet="abcdefghij XYZ?.,!'\n", min_size=1, max_size=30).filter(lambda t: t.strip() == t)


@st.composite
def _chats(draw):
    n = draw(st.integers(1, 3))
    turns = [(draw(_WORDS), draw(_WORDS) if k < n - 1 else None) for k in range(n)]
    images = [[None] * draw(st.integers(0, 2)) if k == 0 else [] for k in range(n)]
    return Chat(draw(st.none() | _WORDS), turns, images)


@pytest.mark.parametrize("conv_mode", sorted(set(conv_templates) - {"plain"}))
@settings(max_examples=30, deadline=None)
@given(chat=_chats())
def test_parse_prompt_inverts_render_prompt_on_any_text_and_keeps_image_tags_where_asked(conv_mode, chat):
    from llava.conversation import parse_prompt, render_prompt

    prompt = render_prompt(conv_mode, chat)
    parsed = parse_prompt(conv_mode, prompt)
    assert parsed is not None and render_prompt(conv_mode, parsed) == prompt
    tagged = parse_prompt(conv_mode, prompt, keep_image_tags=True)
    assert tagged.turns == [(("<image>\n" * len(images)) + user, answer)
                            for (user, answer), images in zip(chat.turns, chat.turn_images)]
    assert tagged.turn_images == parsed.turn_images


def test_parse_prompt_keeps_image_tags_where_they_stand():
    from llava.conversation import parse_prompt

    prompt = build_prompt("vicuna_v1", "Compare <image>\n with <image>", 0)
    chat = parse_prompt("vicuna_v1", prompt, keep_image_tags=True)
    assert chat.turns == [("Compare <image>\n with <image>", None)] and chat.turn_images == [[None, None]]
