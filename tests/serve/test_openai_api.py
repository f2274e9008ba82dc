"""The worker's OpenAI-compatible API, driven by the official ``openai`` client over real HTTP. The worker app runs
in this process (uvicorn in a thread, on the session's tiny engine: ``create_app(config, engine=...)``, as a
one-process launcher would), so its answers can be compared with the in-process engine and ECSO pipeline."""
from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
from inprocess import serving
from openai import OpenAI
from PIL import Image

from llava.conversation import build_prompt
from llava.ecso.config import ECSOConfig
from llava.ecso.local import LocalBackend
from llava.ecso.pipeline import ECSO
from llava.generation import GenerationParams
from llava.mm_utils import encode_image_base64
from llava.serve.model_worker import create_app
from llava.serve.worker_state import WorkerConfig

pytestmark = pytest.mark.slow

KEY = "openai-test-key"
N = 12
QUERY = "How do I make this at home?"


@pytest.fixture(scope="module")
def base_url(tiny_engine) -> Iterator[str]:
    config = WorkerConfig(register=False, api_key=KEY, max_top_logprobs=50, log_level="warning")
    with serving(create_app(config, engine=tiny_engine)) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    img = Image.new("RGB", (300, 180), (30, 90, 200))
    img.paste((250, 250, 20), (40, 40, 140, 120))
    return img


def _user(image: Image.Image | None, text: str = QUERY) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    url = f"data:image/png;base64,{encode_image_base64(image)}"
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def _local_ecso(engine, image, **config) -> object:
    return ECSO(LocalBackend(engine), ECSOConfig(max_new_tokens=N, **config)).run(image, QUERY)


def test_models_lists_the_model_and_its_ecso_alias(client) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "tiny+ecso"]


def test_completion_equals_the_engine_with_usage(client, tiny_engine, image) -> None:
    resp = client.chat.completions.create(model="tiny", messages=[_user(image)], max_tokens=N, temperature=0)
    prompt = build_prompt("vicuna_v1", QUERY, 1)
    assert resp.choices[0].message.content == tiny_engine.generate([prompt], [[image]],
                                                                   GenerationParams(max_new_tokens=N))[0]
    assert resp.usage.prompt_tokens == len(tiny_engine.encode(prompt, [image]).input_ids) > 576
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert getattr(resp, "ecso", None) is None


def test_streamed_completion_equals_the_non_streamed_one(client, image) -> None:
    kwargs = dict(model="tiny", messages=[_user(image)], temperature=0, max_completion_tokens=N)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_system_and_history_go_into_the_template(client, tiny_engine) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, _user(None, "Hi."),
                {"role": "assistant", "content": "Hello!"}, _user(None, "What is 2+2?")]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=N, temperature=0)
    prompt = "Answer briefly. USER: Hi. ASSISTANT: Hello!</s>USER: What is 2+2? ASSISTANT:"
    assert resp.choices[0].message.content == tiny_engine.generate([prompt], [[]], GenerationParams(max_new_tokens=N))[0]


def test_ecso_in_the_body_returns_the_final_answer_and_the_steps(client, tiny_engine, image) -> None:
    resp = client.chat.completions.create(model="tiny", messages=[_user(image)], max_tokens=N, temperature=0,
                                          extra_body={"ecso": True, "ecso_options": {"threshold": 0.0}})
    local = _local_ecso(tiny_engine, image, threshold=0.0)
    steps = resp.ecso
    assert resp.choices[0].message.content == local.final == steps["safe_answer"]
    assert (steps["direct"], steps["flagged"], steps["caption"]) == (local.direct, True, local.caption)
    assert steps["verdict_mode"] == "score" and steps["harm_score"] == pytest.approx(local.harm_score, abs=1e-4)
    assert set(steps["timings"]) == {"direct", "verdict", "caption", "safe"}


def test_ecso_alias_streams_the_final_answer_with_the_steps_last(client, tiny_engine, image) -> None:
    local = _local_ecso(tiny_engine, image)
    chunks = list(client.chat.completions.create(model="tiny+ecso", messages=[_user(image)], max_tokens=N,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == local.final
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and last.ecso["direct"] == local.direct
    assert last.ecso["flagged"] == local.flagged and all(getattr(c, "ecso", None) is None for c in chunks[:-1])


def test_unflagged_ecso_stream_sends_the_direct_answer(client, tiny_engine, image) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[_user(image)], max_tokens=N, temperature=0, stream=True,
        extra_body={"ecso": True, "ecso_options": {"threshold": 1.0}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].ecso["flagged"] is False and text == chunks[-1].ecso["direct"] == _local_ecso(
        tiny_engine, image, threshold=1.0).direct


def test_first_token_logprobs(client, tiny_engine, image) -> None:
    resp = client.chat.completions.create(model="tiny", messages=[_user(image)], max_tokens=2, temperature=0,
                                          logprobs=True, top_logprobs=5)
    first = resp.choices[0].logprobs.content[0]
    tops = [t.logprob for t in first.top_logprobs]
    assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
    assert first.token == first.top_logprobs[0].token and first.logprob == pytest.approx(tops[0])
    assert resp.choices[0].message.content.startswith(first.token.strip())


def test_each_prompt_is_tokenized_once(client, tiny_engine, image, monkeypatch) -> None:
    """The fit check's encoded prompt is what the answer, its stream and its logprobs are computed from."""
    calls = []
    encode = tiny_engine.encode
    monkeypatch.setattr(tiny_engine, "encode", lambda *a, **kw: calls.append(a[0]) or encode(*a, **kw))
    for stream in (False, True):
        calls.clear()
        resp = client.chat.completions.create(model="tiny", messages=[_user(image)], max_tokens=2, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
        assert calls == [build_prompt("vicuna_v1", QUERY, 1)]


@pytest.mark.parametrize("kwargs, error, words", [
    ({"model": "llava-v1.5-7b"}, openai.NotFoundError, "not served by this worker"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, openai.BadRequestError, "image 0:"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/cat.png"}}]}]}, openai.BadRequestError, "--allow-image-urls"),
    ({"messages": [_user(None, "word " * 3000)]}, openai.BadRequestError, "context window is 2048"),
    ({"messages": [_user(None), {"role": "assistant", "content": "ok"}]}, openai.BadRequestError, "last message"),
    ({"messages": [{"role": "system", "content": "s"}, _user(None)], "extra_body": {"ecso": True}},
     openai.BadRequestError, "single user message"),
    ({"max_tokens": -3}, openai.BadRequestError, "max_tokens:"),
    ({"logprobs": True, "top_logprobs": 51}, openai.BadRequestError, "at most 50"),
    ({"extra_body": {"ecso": True, "ecso_options": {"verdict": "maybe"}}}, openai.BadRequestError, "verdict"),
])
def test_bad_requests_get_openai_errors(client, kwargs, error, words) -> None:
    request = {"model": "tiny", "messages": [_user(None, "hi")], "max_tokens": 2, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**request)
    assert words in info.value.message, info.value.message
    assert client.chat.completions.create(model="tiny", messages=[_user(None, "hi")], max_tokens=2).choices


def test_context_overflow_has_its_code(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[_user(None, "word " * 3000)], max_tokens=2)
    assert info.value.code == "context_length_exceeded"


def test_wrong_key_is_an_authentication_error(base_url) -> None:
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base_url, api_key="nope", max_retries=0).models.list()


def test_image_bytes_reach_the_model_unchanged(client, tiny_engine, image) -> None:
    """A data URL of a JPEG decodes to the same pixels the engine gets from the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = client.chat.completions.create(model="tiny", max_tokens=N, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUERY}]}])
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    want = tiny_engine.generate([build_prompt("vicuna_v1", QUERY, 1)], [[jpeg]], GenerationParams(max_new_tokens=N))
    assert resp.choices[0].message.content == want[0]


def test_the_ecso_policies_apply_to_a_local_model_too(tiny_engine, image) -> None:
    """--ecso-stream on the in-process model: hold answers every request with ECSO and refuses "ecso": false;
    monitor answers directly (streamed at once) and attaches the verdict of that answer, as the in-process check
    reaches it; --allow-ecso-opt-out lets a request out."""
    local = _local_ecso(tiny_engine, image)
    direct = LocalBackend(tiny_engine)
    verdict = ECSO(direct, ECSOConfig(max_new_tokens=N)).check([image], QUERY, local.direct)
    for policy in ("hold", "monitor"):
        config = WorkerConfig(register=False, ecso_stream=policy, allow_ecso_opt_out=policy == "monitor",
                              max_new_tokens=N, log_level="warning")
        with serving(create_app(config, engine=tiny_engine)) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            ask = dict(model="tiny", messages=[_user(image)], max_tokens=N, temperature=0)
            resp = client.chat.completions.create(**ask)
            assert resp.ecso["policy"] == policy and resp.ecso["direct"] == local.direct
            assert resp.ecso["harm_score"] == pytest.approx(verdict.score, abs=1e-4)
            if policy == "hold":
                assert resp.choices[0].message.content == local.final
                with pytest.raises(openai.PermissionDeniedError, match="policy_refused|allow-ecso-opt-out"):
                    client.chat.completions.create(**ask, extra_body={"ecso": False})
                continue
            assert resp.choices[0].message.content == local.direct and "safe_answer" not in resp.ecso
            chunks = list(client.chat.completions.create(**ask, stream=True))
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert len(pieces) > 1 and "".join(pieces) == local.direct  # streamed as it was generated
            assert chunks[-1].ecso["flagged"] == verdict.flagged and chunks[-1].ecso["policy"] == "monitor"
            out = client.chat.completions.create(**ask, extra_body={"ecso": False})
            assert out.choices[0].message.content == local.direct and getattr(out, "ecso", None) is None
