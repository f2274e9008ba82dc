"""The HTTP backends against scripted servers (httpx.MockTransport): request shapes, streams, scores from logprobs,
and every failure as a typed error. The real-process round trips are in tests/serve/test_worker.py."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import time

import httpx
import pytest
from PIL import Image

from llava.constants import CLIP_MEAN
from llava.conversation import build_prompt
from llava.ecso.backends import StepRequest
from llava.ecso.config import ECSOConfig
from llava.ecso.pipeline import ECSO
from llava.ecso.registry import create_backend
from llava.ecso.openai_remote import OpenAIBackend, yes_no_score
from llava.ecso.remote import WorkerBackend, image_for_upload
from llava.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    ContextLengthError,
    InvalidRequestError,
    NoWorkerError,
    UnsupportedError,
)
from llava.generation import GenerationParams
from llava.mm_utils import pad_color

BASE = "http://llm.test/v1"
CONTROLLER = "http://controller.test"
WORKER = "http://worker.test:40000"


def _img() -> Image.Image:
    return Image.new("RGB", (40, 20), (255, 0, 0))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------- helpers


def test_yes_no_score_from_top_logprobs() -> None:
    ly, ln = math.log(0.3), math.log(0.1)
    entries = [("Yes", ly), (" yes", ly - 1), ("▁No", ln), ("Maybe", -0.5), ("Yes", ly)]  # chosen token repeated
    want = _sigmoid(math.log(math.exp(ly) + math.exp(ly - 1)) - ln)
    assert yes_no_score(entries) == pytest.approx(want)
    assert yes_no_score([("Yes", math.log(0.6)), ("Sure", math.log(0.05))]) == pytest.approx(
        _sigmoid(math.log(0.6) - math.log(0.05)))  # no missing: bounded by the smallest listed
    assert yes_no_score([("Sure", -0.1), ("Maybe", -2.0)]) is None
    assert yes_no_score([("yesterday", -0.1), ("NO", -0.2), ("x", -3.0)]) == pytest.approx(_sigmoid(-3.0 + 0.2))


def test_image_for_upload_pads_with_llava_15s_colour() -> None:
    assert pad_color(CLIP_MEAN) == (122, 116, 104)
    padded = image_for_upload(_img())
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == (122, 116, 104)
    assert padded.getpixel((20, 20)) == (255, 0, 0)
    assert image_for_upload(_img(), "crop").size == (40, 20) and image_for_upload(_img(), "resize").size == (336, 336)
    with pytest.raises(InvalidRequestError, match="unknown image aspect ratio 'zoom'"):
        image_for_upload(_img(), "zoom")


# ------------------------------------------------------------------------------------------------------ openai


class ScriptedOpenAI:
    """A chat endpoint: ``reply(body) -> httpx.Response`` decides each completion; requests are recorded."""

    def __init__(self, reply, models=("m",), delay: float = 0.0) -> None:
        self.reply, self.models, self.bodies, self.delay = reply, models, [], delay
        self.in_flight = self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:  # on the backend's event loop
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        body = json.loads(request.content)
        self.bodies.append(body)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return self.reply(body)
        finally:
            self.in_flight -= 1


def _completion(text: str, logprobs: list | None = None) -> httpx.Response:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return httpx.Response(200, json={"choices": [choice]})


def _openai(reply, **kw) -> tuple[OpenAIBackend, ScriptedOpenAI]:
    server = ScriptedOpenAI(reply, kw.pop("models", ("m",)), kw.pop("delay", 0.0))
    return OpenAIBackend(BASE, transport=httpx.MockTransport(server), api_key="k", **kw), server


def test_openai_request_shape_images_first_and_padded() -> None:
    backend, server = _openai(lambda body: _completion("  An answer. "))
    req = StepRequest("What is it?", [_img()], GenerationParams(max_new_tokens=7, top_p=0.9, stop=("###",)),
                      history=[("Hi", "Hello")])
    assert backend.generate([req]) == ["An answer."]
    body = server.bodies[0]
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["top_p"] == 0.9 and body["stop"] == ["###"]
    first, hello, last = body["messages"]
    assert [p["type"] for p in first["content"]] == ["image_url", "text"] and first["content"][1]["text"] == "Hi"
    assert hello == {"role": "assistant", "content": "Hello"} and last == {"role": "user", "content": "What is it?"}
    url = first["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (40, 40)


def test_openai_a_steps_own_preprocessing_shapes_its_upload_and_is_not_served_from_the_padded_cache() -> None:
    backend, server = _openai(lambda body: _completion("ok"))
    img = _img()
    reqs = [StepRequest("q", [img]), StepRequest("q", [img], image_aspect_ratio="crop"), StepRequest("q", [img])]
    for req in reqs:  # one at a time: the padded upload is cached before the cropped one is asked for
        backend.generate([req])
    sizes = [Image.open(io.BytesIO(base64.b64decode(
        body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1]))).size for body in server.bodies]
    assert sizes == [(40, 40), (40, 20), (40, 40)]


def test_openai_model_is_the_first_listed_unless_given(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    backend, _ = _openai(lambda b: _completion("x"), models=("tiny+ecso", "tiny"))
    assert backend.model_name == "tiny"  # this project's "+ecso" alias is never picked
    with caplog.at_level("INFO"):
        assert _openai(lambda b: _completion("x"), models=("a", "b"))[0].upstream_model == "a"
    assert "using the first, 'a' (choose with --openai-model)" in caplog.text
    assert _openai(lambda b: _completion("x"), model_name="b", serve_as="guarded")[0].model_name == "guarded"
    with pytest.raises(BackendError, match="lists no model"):
        _ = _openai(lambda b: _completion("x"), models=())[0].model_name
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InvalidRequestError, match="needs a base URL"):
        OpenAIBackend(None)


@pytest.mark.parametrize("response, error, words", [
    (httpx.Response(400, json={"error": {"message": "the prompt is too long", "type": "invalid_request_error",
                                         "code": "context_length_exceeded"}}), ContextLengthError, "too long"),
    (httpx.Response(401, json={"error": {"message": "bad key", "type": "authentication_error"}}), BackendError,
     r"refused our API key \(HTTP 401: bad key\)"),  # our key: not the caller's fault
    (httpx.Response(500, text="upstream exploded"), BackendError,
     "upstream http://llm.test/v1 answered HTTP 500: upstream exploded"),
    (httpx.Response(200, json={"choices": []}), BackendError, "answered without choices"),
    (httpx.Response(200, text="<html>"), BackendError, "not JSON"),
])
def test_openai_http_failures_are_typed(response, error, words) -> None:
    backend, _ = _openai(lambda body: response)
    with pytest.raises(error, match=words):
        backend.generate([StepRequest("q")])


def test_openai_timeouts_and_connection_failures_are_typed() -> None:
    def boom(exc):
        def reply(body):
            raise exc
        return reply

    backend, _ = _openai(boom(httpx.ReadTimeout("slow")), timeout=2.0)
    with pytest.raises(BackendTimeoutError, match="upstream http://llm.test/v1 did not answer within 2 s"):
        backend.generate([StepRequest("q")])
    backend, _ = _openai(boom(httpx.ConnectError("refused")))
    with pytest.raises(BackendError, match="ConnectError: refused"):
        backend.generate([StepRequest("q")])
    with pytest.raises(BackendTimeoutError):
        list(_openai(boom(httpx.ReadTimeout("slow")))[0].stream(StepRequest("q")))


def _sse(*events: object) -> httpx.Response:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_openai_stream_yields_deltas_until_done() -> None:
    backend, server = _openai(lambda body: _sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                                                _delta("  Hel"), _delta("lo"), _delta(" there"), "[DONE]",
                                                _delta("ignored")))
    assert list(backend.stream(StepRequest("q"))) == ["Hel", "lo", " there"]
    assert server.bodies[0]["stream"] is True


def test_openai_stream_error_event_is_raised_typed() -> None:
    error = {"error": {"message": "the prompt is 9000 tokens", "code": "context_length_exceeded"}}
    backend, _ = _openai(lambda body: _sse(_delta("a"), error, "[DONE]"))
    with pytest.raises(ContextLengthError, match="9000 tokens"):
        list(backend.stream(StepRequest("q")))


def test_openai_generate_runs_requests_concurrently_in_order() -> None:
    backend, server = _openai(lambda body: _completion(body["messages"][-1]["content"].upper()), concurrency=4,
                              delay=0.05)
    texts = [f"q{i}" for i in range(8)]
    assert backend.generate([StepRequest(t) for t in texts]) == [t.upper() for t in texts]
    assert server.peak == 4  # concurrency requests at once, no more
    backend.close()


def _logprobs(pairs: list[tuple[str, float]]) -> list:
    top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in pairs]
    return [{"token": pairs[0][0], "logprob": pairs[0][1], "top_logprobs": top}]


def test_openai_score_from_logprobs_with_probe() -> None:
    pairs = [("Yes", math.log(0.7)), ("No", math.log(0.2)), ("The", math.log(0.05))]
    backend, server = _openai(lambda body: _completion("Yes", _logprobs(pairs)), top_logprobs=7)
    assert backend.supports_score
    assert backend.score_yes_no([StepRequest("harmful?", [_img()])]) == pytest.approx([0.7 / 0.9])
    body = server.bodies[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 7 and body["max_tokens"] == 1
    assert body["temperature"] == 0.0


def test_openai_without_logprobs_falls_back_to_parse() -> None:
    backend, _ = _openai(lambda body: _completion("Yes."))  # ignores logprobs
    assert not backend.supports_score
    with pytest.raises(UnsupportedError, match="does not return logprobs"):
        backend.score_yes_no([StepRequest("q")])
    refusing, _ = _openai(lambda body: httpx.Response(400, json={"error": {"message": "logprobs not supported"}})
                          if body.get("logprobs") else _completion("x"))
    assert not refusing.supports_score
    told, server = _openai(lambda body: _completion("x"), logprobs=False)
    assert not told.supports_score and server.bodies == []  # no probe when told


def test_openai_gives_no_score_when_neither_word_is_listed_and_ecso_parses_that_row() -> None:
    pairs = [("Sure", -0.1), ("Maybe", -3.0)]
    backend, server = _openai(lambda body: _completion("Sure" if body.get("logprobs") else "Yes, it is.",
                                                       _logprobs(pairs) if body.get("logprobs") else None),
                              logprobs=True)
    assert backend.score_yes_no([StepRequest("q")]) == [None]  # never a made-up score
    result = ECSO(backend, ECSOConfig(max_new_tokens=4)).run(None, "q")
    assert result.verdict_mode == "parse" and result.harm_score is None and result.flagged
    assert result.verdict_text == "Yes, it is." and "neither yes nor no" in result.verdict_fallback
    checks = [b for b in server.bodies if str(b["messages"][-1]["content"]).startswith("QUERY:")]
    assert [("logprobs" in b, b["max_tokens"]) for b in checks] == [(True, 1), (False, 16)]  # scored, then generated


# ------------------------------------------------------------------------------------------------------ worker


class ScriptedStack:
    """A controller and one worker at fixed hosts; ``chunks(payload)`` makes the worker's stream frames."""

    def __init__(self, chunks, models=("tiny",), address=WORKER) -> None:
        self.chunks, self.models, self.address, self.payloads = chunks, list(models), address, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/list_models":
            return httpx.Response(200, json={"models": self.models})
        if path == "/get_worker_address":
            model = json.loads(request.content)["model"]
            return httpx.Response(200, json={"address": self.address if model in self.models else ""})
        assert str(request.url) == f"{WORKER}/worker_generate_stream"
        payload = json.loads(request.content)
        self.payloads.append(payload)
        body = b"".join(json.dumps(c).encode() + b"\0" for c in self.chunks(payload))
        return httpx.Response(200, content=body)


def _worker(chunks, **kw) -> tuple[WorkerBackend, ScriptedStack]:
    stack = ScriptedStack(chunks, **{k: kw.pop(k) for k in ("models", "address") if k in kw})
    return WorkerBackend(CONTROLLER, transport=httpx.MockTransport(stack), **kw), stack


def _cumulative(*pieces: str):
    def chunks(payload):
        text = payload["prompt"]
        out = []
        for piece in pieces:
            text += piece
            out.append({"text": text, "error_code": 0})
        return out
    return chunks


def test_worker_backend_templates_and_strips_the_prompt() -> None:
    backend, stack = _worker(_cumulative(" Hel", "lo", " world "))
    req = StepRequest("What is it?", [_img()], GenerationParams(max_new_tokens=5, stop=("</s>",)))
    assert list(backend.stream(req)) == ["Hel", "lo", " world "]
    assert backend.generate([req]) == ["Hello world"]
    payload = stack.payloads[0]
    assert payload["prompt"] == build_prompt("vicuna_v1", "What is it?", 1) and payload["model"] == "tiny"
    assert payload["stop"] == "</s>" and payload["max_new_tokens"] == 5 and payload["top_p"] == 1.0
    assert Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).size == (40, 40)


def test_worker_backend_errors_are_typed() -> None:
    with pytest.raises(NoWorkerError, match="has no workers; start a model worker"):
        _worker(_cumulative("x"), models=())
    with pytest.raises(InvalidRequestError, match="several models"):
        _worker(_cumulative("x"), models=("a", "b"))
    backend, _ = _worker(_cumulative("x"), address="")
    with pytest.raises(NoWorkerError, match=r"no worker serves model 'tiny' at controller .*\['tiny'\]"):
        backend.generate([StepRequest("q")])
    overflow = lambda p: [{"text": "Context", "error_code": 5, "detail": "the prompt is 3000 tokens"}]  # noqa: E731
    with pytest.raises(ContextLengthError, match="3000 tokens"):
        _worker(overflow)[0].generate([StepRequest("q")])
    with pytest.raises(BackendError, match="does not start with the prompt"):
        _worker(lambda p: [{"text": "something else", "error_code": 0}])[0].generate([StepRequest("q")])
    with pytest.raises(UnsupportedError, match="beam search"):
        _worker(_cumulative("x"))[0].generate([StepRequest("q", params=GenerationParams(num_beams=2))])


def test_backends_are_registered_with_the_cli_signatures() -> None:
    backend = create_backend("worker", controller_url=CONTROLLER, model_name="tiny", conv_mode="llava_v1",
                             timeout=5.0, image_aspect_ratio="crop", transport=httpx.MockTransport(
                                 ScriptedStack(_cumulative("ok"))))
    assert isinstance(backend, WorkerBackend) and backend.describe()["conv_mode"] == "llava_v1"
    assert backend.generate([StepRequest("q", [_img()])]) == ["ok"]
    backend = create_backend("openai", base_url=BASE, model_name="x", timeout=5.0, image_aspect_ratio=None,
                             transport=httpx.MockTransport(ScriptedOpenAI(lambda b: _completion("ok"))))
    assert isinstance(backend, OpenAIBackend) and backend.describe()["image_aspect_ratio"] == "pad"
