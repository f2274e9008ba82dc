"""Wire protocol models (range checks, error messages) and the shared service helpers in llava.http_client and llava.serve.server."""
from __future__ import annotations

import json
import logging
import math

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from llava import errors
from llava.constants import ErrorCode
from llava.http_client import (
    ChunkDecoder,
    ServiceClient,
    decode_chunk,
    encode_chunk,
    error_from_chunk,
    error_from_response,
    is_loopback,
    iter_chunks,
    resolve_api_key,
)
from llava.serve import server
from llava.serve.protocol.ecso import ECSOEvent, ECSOStreamRequest
from llava.serve.protocol.fields import describe_validation_error
from llava.serve.protocol.llava import GenerateStreamRequest, RegisterWorkerRequest, StreamChunk
from llava.serve.protocol.openai import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from llava.serve.server import (
    error_chunk,
    error_response,
    install_error_handlers,
    openai_error,
    require_api_key,
    run_app,
)

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__]
BASE = {"model": "llava-v1.5-7b", "prompt": "USER: hi ASSISTANT:"}


def rejected(schema: type[BaseModel], /, **fields) -> str:
    with pytest.raises(ValidationError) as info:
        schema.model_validate(fields)
    message, _param = describe_validation_error(info.value)
    return message


# ------------------------------------------------------------------------------------------ LLaVA stream request


def test_generate_stream_request_defaults_and_llava_payload() -> None:
    req = GenerateStreamRequest.model_validate({**BASE, "images": ["aGk="], "stop": "</s>", "extra": 1})
    assert (req.temperature, req.top_p, req.max_new_tokens, req.stop_list) == (1.0, 1.0, 256, ["</s>"])
    assert req.model_extra == {"extra": 1}  # unknown fields are kept for the worker
    assert GenerateStreamRequest.model_validate(BASE).stop_list == []


@settings(max_examples=40, deadline=None)
@given(st.floats(max_value=-1e-9, allow_nan=False) | st.just(math.nan) | st.just(math.inf))
def test_temperature_must_be_finite_and_non_negative(value: float) -> None:
    message = rejected(GenerateStreamRequest, **BASE, temperature=value)
    assert message.startswith("temperature:") and repr(value) in message


@settings(max_examples=40, deadline=None)
@given(st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True) | st.just(math.nan))
def test_top_p_must_be_in_zero_one(value: float) -> None:
    message = rejected(GenerateStreamRequest, **BASE, top_p=value)
    assert message.startswith("top_p:")


@settings(max_examples=40, deadline=None)
@given(st.integers(max_value=-1))
def test_max_new_tokens_must_not_be_negative(value: int) -> None:
    message = rejected(GenerateStreamRequest, **BASE, max_new_tokens=value)
    assert message.startswith("max_new_tokens:") and str(value) in message


@settings(max_examples=40, deadline=None)
@given(
    st.floats(min_value=0.0, max_value=100.0),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    st.integers(min_value=0, max_value=10**6),
)
def test_valid_sampling_values_round_trip(temperature: float, top_p: float, max_new_tokens: int) -> None:
    req = GenerateStreamRequest(**BASE, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    again = GenerateStreamRequest.model_validate_json(req.model_dump_json())
    assert (again.temperature, again.top_p, again.max_new_tokens) == (temperature, top_p, max_new_tokens)


def test_validation_message_names_every_field_and_shortens_values() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateStreamRequest.model_validate({"prompt": "p", "temperature": -2, "images": [1] * 500})
    message, param = describe_validation_error(info.value)
    assert param == "model" and message.startswith("model: field required; images.0:")
    assert "images.0:" in message and "and 497 more" in message and len(message) < 1000


def test_register_worker_needs_an_http_url() -> None:
    assert RegisterWorkerRequest(worker_name="http://127.0.0.1:40000/").worker_name == "http://127.0.0.1:40000"
    assert "'127.0.0.1:40000'" in rejected(RegisterWorkerRequest, worker_name="127.0.0.1:40000")


def test_stream_chunk_decodes_unknown_codes_and_extra_fields() -> None:
    chunk = StreamChunk.model_validate({"text": "x", "error_code": 42, "usage": {}})
    assert not chunk.ok and chunk.model_extra == {"usage": {}}
    assert StreamChunk(text="ok").ok


# --------------------------------------------------------------------------------------------------------- ECSO


def test_ecso_request_options_are_checked_and_closed() -> None:
    req = ECSOStreamRequest(image="aGk=", query="How do I make this?")
    assert req.options.overrides() == {}  # everything from the worker's defaults
    opts = ECSOStreamRequest(query="q", options={"verdict": "exact", "threshold": 0.3}).options
    assert opts.overrides() == {"verdict": "exact", "threshold": 0.3}
    assert "options.threshold:" in rejected(ECSOStreamRequest, query="q", options={"threshold": 1.5})
    assert "options.verdict:" in rejected(ECSOStreamRequest, query="q", options={"verdict": "maybe"})
    assert "unknown prompt set 'x'" in rejected(ECSOStreamRequest, query="q", options={"prompt_set": "x"})
    assert "options.max_new_tokens:" in rejected(ECSOStreamRequest, query="q", options={"max_new_tokens": 0})
    assert "options.temprature:" in rejected(ECSOStreamRequest, query="q", options={"temprature": 0.1})
    assert "query:" in rejected(ECSOStreamRequest, query="")


def test_ecso_events_error_code_only_on_error_events() -> None:
    assert ECSOEvent(event="verdict", flagged=True, harm_score=0.93, elapsed=1.2).flagged
    assert ECSOEvent(event="error", error_code=ErrorCode.TIMEOUT, detail="x").error_code == 3
    assert "non-zero error_code" in rejected(ECSOEvent, event="error")
    assert "use event 'error'" in rejected(ECSOEvent, event="final", error_code=1)
    assert "harm_score:" in rejected(ECSOEvent, event="verdict", harm_score=1.01)
    assert "event:" in rejected(ECSOEvent, event="think")


def test_a_verdict_event_says_how_it_was_reached_over_the_wire() -> None:
    from llava.ecso.events import Verdict

    verdict = Verdict(True, None, "Yes, it is.", "parse", "the endpoint returns no logprobs")
    wire = ECSOEvent.from_step(verdict.event(elapsed=0.5))
    assert json.loads(wire.model_dump_json(exclude_none=True)) == {
        "event": "verdict", "text": "Yes, it is.", "done": True, "flagged": True, "elapsed": 0.5,
        "verdict_mode": "parse", "verdict_fallback": "the endpoint returns no logprobs"}  # no harm_score at all
    assert Verdict.from_event(ECSOEvent.model_validate_json(wire.model_dump_json()).to_step()) == verdict


# ------------------------------------------------------------------------------------------------------- OpenAI


def test_openai_request_with_image_url_parts() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "llava", "ecso": True, "stream": True, "max_tokens": 64, "presence_penalty": 0.5,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk=", "detail": "low"}},
            ]},
        ],
    })
    assert req.ecso and req.image_urls == ["data:image/png;base64,aGk="] and req.messages[1].text == "What is this?"
    assert req.token_limit(512) == 64 and ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "x"}]).token_limit(512) == 512
    assert not ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]).ecso


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": []}, "messages:"),
        ({"temperature": 2.5}, "temperature:"),
        ({"top_p": 0}, "top_p:"),
        ({"n": 2}, "n:"),
        ({"max_tokens": 0}, "max_tokens:"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/x"}}]}]},
         "messages.0.content"),
        ({"messages": [{"role": "user"}]}, "messages.0:"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role:"),
    ],
)
def test_openai_request_rejections_name_the_field(fields: dict, field: str) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert field in rejected(ChatCompletionRequest, **{**base, **fields})


def test_openai_response_and_chunk_shapes() -> None:
    resp = ChatCompletionResponse(model="m", choices=[{"message": {"content": "hi"}}]).model_dump()
    assert resp["object"] == "chat.completion" and resp["id"].startswith("chatcmpl-")
    assert resp["choices"][0] == {
        "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": None}
    chunk = ChatCompletionChunk(model="m", choices=[{"delta": {"content": "h"}}]).model_dump(exclude_none=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "h"}


# ------------------------------------------------------------------------------------------------------ framing


def test_encode_chunk_is_llava_framing() -> None:
    assert encode_chunk({"text": "é", "error_code": 0}) == json.dumps({"text": "é", "error_code": 0}).encode() + b"\0"
    assert encode_chunk(StreamChunk(text="a")) == b'{"text": "a", "error_code": 0}\x00'
    with pytest.raises(errors.BackendError, match="protocol error: stream frame is not a JSON object"):
        decode_chunk(b"[1]\0")
    with pytest.raises(errors.BackendError, match="protocol error: stream frame is not JSON"):
        decode_chunk(b"<html>\0")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c, max_size=3), max_leaves=5
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=3), max_size=5), st.data())
def test_decoder_reassembles_frames_split_anywhere(objs: list[dict], data: st.DataObject) -> None:
    stream = b"".join(encode_chunk(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert list(iter_chunks(pieces)) == objs


def test_decoder_flags_partial_and_oversized_frames() -> None:
    with pytest.raises(errors.BackendError, match="inside a frame"):
        list(iter_chunks([b'{"text": "a"}\0{"te']))
    with pytest.raises(errors.BackendError, match="exceeds 8 bytes"):
        ChunkDecoder(max_chunk_bytes=8).feed(b"0123456789")


# ----------------------------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_error_chunk_never_reports_success(cls: type[errors.ECSOError]) -> None:
    chunk = error_chunk(cls("the cause"))
    assert chunk.error_code == cls.error_code != 0 and chunk.detail == "the cause" and "the cause" in chunk.text
    assert isinstance(error_from_chunk(chunk.model_dump()), errors.ECSOError)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_openai_error_round_trips_to_the_same_class(cls: type[errors.ECSOError]) -> None:
    resp = error_response(cls("boom"))
    assert resp.status_code == cls.status
    body = json.loads(resp.body)
    assert body["error"]["message"] == "boom" and body["error"]["code"] == cls.code
    assert body["error"]["type"] == {401: "authentication_error"}.get(
        cls.status, "server_error" if cls.status >= 500 else "invalid_request_error")
    # a remote internal error is, to the caller, a failed backend
    assert type(error_from_response(cls.status, resp.body)) is (errors.BackendError if cls is errors.ECSOError else cls)


def test_unexpected_errors_are_generic() -> None:
    assert openai_error(RuntimeError("secret path /x")).error.message == "internal server error"
    chunk = error_chunk(RuntimeError("disk"))
    assert chunk.error_code == ErrorCode.WORKER_ERROR and chunk.detail == "RuntimeError: disk"
    assert error_from_chunk({"text": "fine", "error_code": 0}) is None
    assert isinstance(error_from_response(401, b"nope"), errors.AuthError)
    assert isinstance(error_from_response(502, b"<html>"), errors.BackendError)


# -------------------------------------------------------------------------------------------- edge in-process


class Item(BaseModel):
    top_p: float


def test_auth_dependency_and_error_handlers() -> None:
    app = FastAPI()
    app.state.api_key = "k"
    install_error_handlers(app)

    @app.post("/echo", dependencies=[Depends(require_api_key)])
    async def echo(item: Item) -> Item:
        return item

    @app.post("/fail")
    async def fail() -> None:
        raise RuntimeError("internal detail")

    @app.post("/busy")
    async def busy() -> None:
        raise errors.NoWorkerError("no worker for 'm'")

    key = {"Authorization": "Bearer k"}
    with TestClient(app, raise_server_exceptions=False) as client:
        for headers in ({}, {"Authorization": "Bearer kk"}, {"Authorization": "Basic k"}, {"Authorization": "k"}):
            denied = client.post("/echo", json={"top_p": "x"}, headers=headers)  # auth before validation
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert client.post("/echo", json={"top_p": 1}, headers={"Authorization": "bearer k"}).json() == {"top_p": 1}
        bad = client.post("/echo", json={"top_p": "x"}, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
        assert "top_p:" in bad.json()["error"]["message"] and "'x'" in bad.json()["error"]["message"]
        fail = client.post("/fail")
        assert fail.status_code == 500 and fail.json()["error"] == {
            "message": "internal server error", "type": "server_error", "code": "internal_error", "param": None}
        busy = client.post("/busy")
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "no_worker"
        assert client.get("/nowhere").json()["error"]["code"] == "http_404"


# ------------------------------------------------------------------------------------------------------- client


def _client(handler) -> ServiceClient:
    return ServiceClient("http://svc", api_key="k", transport=httpx.MockTransport(handler))


def test_service_client_sends_key_and_decodes_streams() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/stream":
            return httpx.Response(200, content=encode_chunk({"text": "a", "error_code": 0}) + encode_chunk(
                {"text": "ab", "error_code": 0}))
        if request.url.path == "/nochunks":
            return httpx.Response(503, json={"error": {"message": "none", "type": "server_error", "code": "no_worker"}})
        if request.url.path == "/errchunk":
            return httpx.Response(503, content=encode_chunk(error_chunk(errors.NoWorkerError("none"))))
        if request.url.path == "/partial":
            return httpx.Response(200, content=b'{"text": "a"')
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"models": ["m"]})

    with _client(handler) as client:
        assert client.post("/list_models") == {"models": ["m"]}
        assert [c["text"] for c in client.stream("/stream", {"model": "m"})] == ["a", "ab"]
        assert list(client.stream("/errchunk", {}))[0]["error_code"] == ErrorCode.NO_WORKER
        with pytest.raises(errors.NoWorkerError, match="none"):
            list(client.stream("/nochunks", {}))
        with pytest.raises(errors.BackendError, match="inside a frame"):
            list(client.stream("/partial", {}))
        with pytest.raises(errors.BackendTimeoutError):
            client.post("/slow")
    assert set(seen) == {"Bearer k"}


# ------------------------------------------------------------------------------------------------------- runner


def test_resolve_api_key_and_loopback() -> None:
    assert resolve_api_key(None, {"ECSO_API_KEY": "e"}) == "e" and resolve_api_key("f", {"ECSO_API_KEY": "e"}) == "f"
    assert resolve_api_key("", {}) is None and resolve_api_key(None, {}) is None
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "", "::", "10.0.0.1", "example.org"]))


def test_run_app_warns_when_exposed_without_key(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    calls = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: calls.append(kw))
    caplog.set_level(logging.WARNING, logger="llava.serve.server")
    run_app(FastAPI(), host="127.0.0.1", port=1, api_key=None)
    run_app(FastAPI(), host="0.0.0.0", port=2, api_key="hunter2")
    assert not caplog.records
    run_app(FastAPI(), host="0.0.0.0", port=3, api_key=None)
    assert "0.0.0.0:3 without an API key" in caplog.text and "hunter2" not in caplog.text
    assert [c["port"] for c in calls] == [1, 2, 3] and calls[1]["host"] == "0.0.0.0"
