"""Property-based tests (hypothesis): image loading on arbitrary and on mutated real image bytes raises only
ImageError; the protocol models reject anything with a ValidationError whose description never fails; the worker
answers arbitrary requests on all three APIs with a success or a 4xx, never a 5xx or a failed stream."""
from __future__ import annotations

import base64
import json

import pytest
from corpus import CASES, good_png
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from llava.errors import ImageError
from llava.mm_utils import ImageLimits, decode_base64_image, load_image
from llava.serve.model_worker import create_app
from llava.serve.protocol.ecso import ECSOStreamRequest
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import GenerateStreamRequest, HeartBeatRequest, RegisterWorkerRequest
from llava.serve.protocol.openai import ChatCompletionRequest
from llava.serve.worker_state import WorkerConfig

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ImageLimits(max_pixels=2_000_000)
_SEEDS = [good_png()] + [c.build().images[0] for c in CASES if c.kind == "request" and c.expect == "ok"
                         and len(getattr(c.build(), "images", ())) == 1]


def _load(data: bytes) -> None:
    try:
        load_image(data, LIMITS)
    except ImageError:
        pass


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_an_image_or_an_image_error(data: bytes) -> None:
    _load(data)


@st.composite
def mutated_images(draw) -> bytes:
    """A real image (PNG, JPEG, GIF, BMP, CMYK, 16-bit ...) with bytes overwritten, cut, or inserted."""
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        if len(data) < 2:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "cut", "insert", "truncate"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_mutated_images_are_an_image_or_an_image_error(data: bytes) -> None:
    _load(data)


@FAST
@given(st.text(max_size=300))
def test_arbitrary_base64_text_is_an_image_or_an_image_error(text: str) -> None:
    for candidate in (text, "data:image/png;base64," + text, "data:" + text):
        try:
            decode_base64_image(candidate, LIMITS)
        except ImageError:
            pass


# ------------------------------------------------------------------------------------------------- protocol

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
MODELS: list[type[BaseModel]] = [GenerateStreamRequest, ECSOStreamRequest, ChatCompletionRequest,
                                 RegisterWorkerRequest, HeartBeatRequest]
FIELDS = {"model": st.text(max_size=8) | JSON, "prompt": st.text(max_size=30) | JSON, "query": st.text(max_size=30),
          "images": st.lists(st.text(max_size=12)) | JSON, "temperature": JSON, "top_p": JSON,
          "max_new_tokens": JSON, "stop": JSON, "messages": JSON, "options": JSON, "worker_name": JSON,
          "queue_length": JSON, "image": JSON, "direct": JSON, "ecso_options": JSON}


def _check(model: type[BaseModel], parse) -> None:
    try:
        parse()
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        assert message and isinstance(message, str) and len(message) < 2000
        assert param is None or isinstance(param, str)


@FAST
@given(st.sampled_from(MODELS), st.binary(max_size=300))
def test_protocol_models_reject_arbitrary_bytes_with_a_described_validation_error(model, raw: bytes) -> None:
    _check(model, lambda: model.model_validate_json(raw))


@FAST
@given(st.sampled_from(MODELS), st.fixed_dictionaries({}, optional=FIELDS))
def test_protocol_models_reject_arbitrary_fields_with_a_described_validation_error(model, body: dict) -> None:
    _check(model, lambda: model.model_validate(body))


# ------------------------------------------------------------------------------------------- the worker itself

_PNG = base64.b64encode(good_png()).decode()


U8 = st.characters(codec="utf-8")
ANY_TEXT = st.text(max_size=40)  # lone surrogates included
VALID_TEXT = st.text(U8, min_size=1, max_size=40)
IMAGE_OK = st.sampled_from([_PNG, "data:image/png;base64," + _PNG])
IMAGE_BAD = st.sampled_from(["", "%%%", "data:text/plain,hi", base64.b64encode(b"not an image").decode()])
NUMBER_BAD = st.floats() | st.sampled_from([None, "x", -1, 11, 10**20])


class Fields:
    """Draws each field valid, except (in about half the examples) one chosen field, drawn from its bad values:
    so a request is valid or differs from a valid one in exactly one place, and many run all the way."""

    def __init__(self, draw, names: list[str]) -> None:
        self.draw = draw
        self.bad = draw(st.sampled_from([None] * len(names) + names))

    def __call__(self, name: str, good: st.SearchStrategy, bad: st.SearchStrategy):
        return self.draw(bad if name == self.bad else good)


@st.composite
def llava_bodies(draw) -> dict:
    f = Fields(draw, ["model", "images", "tags", "text", "tokens", "temperature", "top_p", "stop"])
    images = f("images", st.lists(IMAGE_OK, max_size=2), st.lists(IMAGE_BAD, min_size=1, max_size=2))
    tags = f("tags", st.just(len(images)), st.integers(0, 3).filter(lambda n: n != len(images)))
    return {"model": f("model", st.just("tiny"), st.sampled_from(["other", ""])), "images": images,
            "prompt": "USER: " + "<image>\n" * tags + f("text", VALID_TEXT, ANY_TEXT) + " ASSISTANT:",
            "max_new_tokens": f("tokens", st.integers(0, 3), st.sampled_from([-1, None, "3", 1.5])),
            "temperature": f("temperature", st.sampled_from([0, 0.0, 0.7]), NUMBER_BAD),
            "top_p": f("top_p", st.sampled_from([1.0, 0.9]), NUMBER_BAD),
            "stop": f("stop", st.none() | VALID_TEXT | st.lists(VALID_TEXT, max_size=2), st.integers() | JSON)}


@st.composite
def openai_bodies(draw) -> dict:
    f = Fields(draw, ["model", "parts", "roles", "tokens", "temperature", "logprobs", "ecso_options"])
    text_part = st.builds(lambda t: {"type": "text", "text": t}, VALID_TEXT)
    image_part = st.builds(lambda u: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + u}},
                           st.just(_PNG))
    parts = f("parts", st.lists(text_part | image_part, min_size=1, max_size=3), st.lists(st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, ANY_TEXT),
        st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}},
                  st.sampled_from(["data:image/png;base64,@@", "http://127.0.0.1/x.png", "ftp://x"])),
        st.just({"type": "audio"})), min_size=1, max_size=3))
    roles = f("roles", st.just(["user"]), st.lists(st.sampled_from(["system", "user", "assistant", "developer",
                                                                    "tool"]), max_size=3))
    messages = [{"role": r, "content": parts if r == "user" else draw(VALID_TEXT)} for r in roles]
    ecso = draw(st.booleans())
    body = {"model": f("model", st.sampled_from(["tiny", "tiny+ecso"]), st.just("nope")), "messages": messages,
            "max_tokens": f("tokens", st.integers(1, 3), st.sampled_from([0, -1, None, "3", 10**9])),
            "temperature": f("temperature", st.sampled_from([0, 0.7]), NUMBER_BAD), "stream": draw(st.booleans()),
            "ecso": ecso}
    if f.bad == "logprobs" or (not ecso and draw(st.booleans())):
        body.update(logprobs=True, top_logprobs=f("logprobs", st.integers(0, 5), st.sampled_from([-1, 10**6, "x"])))
    if ecso or body["model"] == "tiny+ecso":
        body["ecso_options"] = {"max_new_tokens": draw(st.integers(1, 3)),
                                "verdict": f("ecso_options", st.sampled_from(["score", "exact", "parse"]),
                                             st.sampled_from(["bogus", None, 3]))}
    return body


@st.composite
def ecso_bodies(draw) -> dict:
    f = Fields(draw, ["query", "image", "direct", "tokens", "threshold", "verdict"])
    return {"query": f("query", VALID_TEXT, ANY_TEXT | st.just("")),
            "image": f("image", st.sampled_from([None, _PNG]), IMAGE_BAD),
            "direct": f("direct", st.none() | VALID_TEXT, ANY_TEXT | st.integers()),
            "options": {"max_new_tokens": f("tokens", st.integers(1, 3), st.sampled_from([0, -1, "3", 10**9])),
                        "threshold": f("threshold", st.sampled_from([0.0, 0.5, 1.0]), NUMBER_BAD),
                        "verdict": f("verdict", st.sampled_from(["score", "exact", "parse"]), st.just("bogus"))}}


@pytest.fixture(scope="module")
def worker(tiny_engine):
    with TestClient(create_app(WorkerConfig(register=False, max_new_tokens=3), engine=tiny_engine),
                    raise_server_exceptions=False) as client:
        yield client


def _frames(content: bytes) -> list[dict]:
    return [json.loads(f) for f in content.split(b"\0") if f]


WORKER_FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                               HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@WORKER_FUZZ
@given(body=llava_bodies())
def test_llava_stream_answers_anything_with_text_or_a_4xx(worker, body) -> None:
    r = worker.post("/worker_generate_stream", content=json.dumps(body).encode())
    event(f"HTTP {r.status_code}")
    frames = _frames(r.content)
    assert r.status_code < 500, (body, r.content[:300])
    if r.status_code == 200:
        assert frames and all(f["error_code"] == 0 for f in frames), (body, frames[-1])
    else:
        assert len(frames) == 1 and frames[0]["error_code"] in (4, 5) and frames[0]["detail"]


@pytest.mark.slow
@WORKER_FUZZ
@given(body=openai_bodies())
def test_openai_api_answers_anything_with_a_completion_or_a_4xx(worker, body) -> None:
    r = worker.post("/v1/chat/completions", content=json.dumps(body).encode(),
                    headers={"content-type": "application/json"})
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (body, r.content[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and error["code"]
    elif body.get("stream") is True:
        assert b'"error"' not in r.content and r.content.rstrip().endswith(b"data: [DONE]"), r.content[-300:]


@pytest.mark.slow
@WORKER_FUZZ
@given(body=ecso_bodies())
def test_ecso_stream_answers_anything_with_events_or_a_4xx(worker, body) -> None:
    r = worker.post("/worker_ecso_stream", content=json.dumps(body).encode())
    event(f"HTTP {r.status_code}")
    frames = _frames(r.content)
    assert r.status_code < 500, (body, r.content[:300])
    if r.status_code == 200:
        assert frames[-1]["event"] == "final", (body, frames[-1])
    else:
        assert len(frames) == 1 and frames[0]["event"] == "error" and frames[0]["error_code"] in (4, 5)
