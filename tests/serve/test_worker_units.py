"""Worker pieces without a model: the command line, chat templating, concurrency slots, the body limit and image
URL fetching (scripted with httpx.MockTransport)."""
from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from llava.conversation import build_prompt
from llava.conversation import render_prompt
from llava.errors import ImageError, InvalidRequestError
from llava.mm_utils import ImageLimits, encode_image_base64
from llava.serve.model_worker import build_parser, config_from_args
from llava.serve.protocol.openai import ChatMessage
from llava.serve.server import BodyLimitMiddleware, llava_error_frame
from llava.serve.worker_openai import parse_chat
from llava.serve.worker_runtime import (
    ImageIntake,
    ImagePolicy,
    ModelSlots,
    call_model,
    check_public_host,
    stream_model,
)
from llava.serve.worker_state import WorkerConfig

SEED = ["--host", "0.0.0.0", "--controller", "http://localhost:10000", "--port", "40000", "--worker",
        "http://localhost:40000", "--model-path", "llava-v1.5-7b"]


# --------------------------------------------------------------------------------------------------------- CLI


def test_the_seed_command_line_parses_as_written() -> None:
    cfg = config_from_args(SEED, environ={})
    assert (cfg.host, cfg.port, cfg.model_path) == ("0.0.0.0", 40000, "llava-v1.5-7b")
    assert cfg.controller_url == "http://localhost:10000" and cfg.address == "http://localhost:40000"
    assert cfg.register and cfg.limit_model_concurrency == 5 and cfg.heart_beat_interval == 15
    assert cfg.api_key is None and cfg.ecso.verdict == "score"
    local = config_from_args(["--model-path", "tiny"], environ={"ECSO_API_KEY": "s3cret-key"})
    assert local.host == "127.0.0.1" and local.address == "http://127.0.0.1:40000" and local.api_key == "s3cret-key"
    assert "s3cret" not in repr(local)


def test_llava_abbreviations_stay_unambiguous() -> None:
    options = [o for a in build_parser()._actions for o in a.option_strings]
    assert [o for o in options if o.startswith("--controller")] == ["--controller-url", "--controller-address",
                                                                   "--controller"]
    assert [o for o in options if o.startswith("--worker")] == ["--worker-address"]


@pytest.mark.parametrize("flag", ["--controller-url", "--controller-address", "--controller", "--controller-addr"])
def test_the_controller_flag_takes_llava_and_fastchat_spellings(flag) -> None:
    cfg = config_from_args(["--model-path", "tiny", flag, "http://10.0.0.5:21001/"], environ={})
    assert cfg.controller_url == "http://10.0.0.5:21001"


def test_every_flag_is_explained() -> None:
    for action in build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_a_guard_worker_command_line() -> None:
    argv = ["--backend", "openai", "--openai-base-url", "http://a:8000/v1/", "http://b:8000/v1", "--model-name", "g"]
    cfg = config_from_args(argv, environ={"OPENAI_API_KEY": "upstream-s3cret"})
    assert cfg.backend == "openai" and cfg.remote.base_urls == ("http://a:8000/v1", "http://b:8000/v1")
    assert cfg.remote.api_key_env == "OPENAI_API_KEY" and "upstream-s3cret" not in repr(cfg)  # a name, not the key
    assert cfg.ecso_policy == "hold" and not cfg.allow_ecso_opt_out and cfg.model_name == "g"
    assert (cfg.remote.retries, cfg.remote.cooldown, cfg.remote.top_logprobs, cfg.remote.model) == (2, 10.0, 20, None)
    env_url = config_from_args(["--backend", "openai"], environ={"OPENAI_BASE_URL": "http://c:1/v1"})
    assert env_url.remote.base_urls == ("http://c:1/v1",)
    custom = config_from_args([*argv, "--ecso-stream", "monitor", "--allow-ecso-opt-out", "--openai-model", "m",
                               "--openai-api-key-env", "MY_KEY", "--upstream-cooldown", "3"], environ={})
    assert (custom.ecso_policy, custom.allow_ecso_opt_out, custom.remote.model) == ("monitor", True, "m")
    assert (custom.remote.api_key_env, custom.remote.cooldown) == ("MY_KEY", 3.0)
    assert config_from_args(["--model-path", "tiny"], environ={}).ecso_policy == "off"  # local: ECSO on request


@pytest.mark.parametrize("argv, words", [
    ([], "--model-path is required"),
    (["--backend", "openai"], "needs --openai-base-url"),
    (["--backend", "openai", "--openai-base-url", "localhost:8000"], "must be http(s) URLs up to /v1"),
    (["--backend", "worker"], "invalid choice: 'worker'"),
    (["--model-path", "tiny", "--ecso-stream", "strict"], "invalid choice: 'strict'"),
    (["--model-path", "tiny", "--limit-model-concurrency", "0"], "must be a positive integer"),
    (["--model-path", "tiny", "--threshold", "2"], "threshold must be in [0, 1]"),
    (["--model-path", "tiny", "--controller-url", "localhost:10000"], "controller_url must be an http(s) URL"),
    (["--model-path", "tiny", "--heart-beat-interval", "0"], "positive number of seconds"),
])
def test_bad_flags_fail_with_the_reason(argv, words, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(argv, environ={})
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_config_checks_its_limits() -> None:
    with pytest.raises(ValueError, match="max_request_bytes must be at least 1"):
        WorkerConfig(max_request_bytes=0)
    assert WorkerConfig(host="::", port=1).address == "http://localhost:1"


# -------------------------------------------------------------------------------------------------------- chat


def _msgs(*pairs) -> list[ChatMessage]:
    return [ChatMessage.model_validate(p) for p in pairs]


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}


def test_single_turn_prompt_equals_build_prompt() -> None:
    for conv in ("vicuna_v1", "llava_llama_2", "chatml_direct", "mistral_instruct"):
        chat = parse_chat(_msgs({"role": "user", "content": [{"type": "text", "text": "What?"}, IMG, IMG]}))
        assert render_prompt(conv, chat) == build_prompt(conv, "What?", 2)
        assert len(chat.images) == 2


def test_history_and_system_prompt() -> None:
    chat = parse_chat(_msgs({"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Really."},
                            {"role": "user", "content": [IMG, {"type": "text", "text": "A?"}]},
                            {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"},
                            {"role": "user", "content": "D?"}))
    assert chat.system == "Be brief.\nReally." and chat.turns == [("A?", "B."), ("C?\nD?", None)]
    assert render_prompt("vicuna_v1", chat) == "Be brief.\nReally. USER: <image>\nA? ASSISTANT: B.</s>USER: C?\nD? ASSISTANT:"
    no_system = parse_chat(_msgs({"role": "user", "content": [IMG, {"type": "text", "text": "A?"}]},
                                 {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"}))
    assert render_prompt("vicuna_v1", no_system) == build_prompt("vicuna_v1", "C?", 1, [("A?", "B.")])
    assert render_prompt("chatml_direct", chat).startswith("<|im_start|>system\nBe brief.")


@pytest.mark.parametrize("messages, words", [
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}], "must start with a user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message must be the user's"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
     "messages[1]: a system message must come before"),
    ([{"role": "system", "content": [IMG]}, {"role": "user", "content": "q"}], "messages[0]: images are only"),
])
def test_bad_conversations_are_named(messages, words) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat(_msgs(*messages))
    assert words in str(info.value)


# ------------------------------------------------------------------------------------------------------- slots


def test_slots_count_waiting_and_running_and_release_on_failure() -> None:
    async def scenario() -> None:
        slots = ModelSlots(1)
        gate = threading.Event()
        first = asyncio.create_task(call_model(slots, gate.wait))
        second = asyncio.create_task(call_model(slots, lambda: 42))
        await asyncio.sleep(0.1)
        assert (slots.running, slots.waiting, slots.queue_length) == (1, 1, 2)
        gate.set()
        assert await second == 42 and await first is True
        assert slots.queue_length == 0
        with pytest.raises(ZeroDivisionError):
            await call_model(slots, lambda: 1 / 0)
        assert slots.queue_length == 0

    asyncio.run(scenario())


def test_a_stream_abandoned_by_its_consumer_still_runs_to_the_end_then_frees_its_slot() -> None:
    produced: list[int] = []

    def numbers():
        for i in range(5):
            time.sleep(0.02)
            produced.append(i)
            yield i

    async def scenario() -> None:
        slots, jobs = ModelSlots(2), set()
        stream = stream_model(slots, numbers, jobs)
        assert await stream.__anext__() == 0
        await stream.aclose()  # the client went away
        assert slots.queue_length == 1 and len(jobs) == 1
        await asyncio.gather(*jobs)
        assert slots.queue_length == 0 and produced == [0, 1, 2, 3, 4] and not jobs

        def failing():
            yield 1
            raise ValueError("engine broke")

        with pytest.raises(ValueError, match="engine broke"):
            async for _ in stream_model(slots, failing, jobs):
                pass
        await asyncio.sleep(0.05)
        assert slots.queue_length == 0

    asyncio.run(scenario())


# -------------------------------------------------------------------------------------------------- body limit


def _echo_app(limit: int) -> httpx.AsyncClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    app.add_middleware(BodyLimitMiddleware, max_bytes=limit, error_bodies={"/stream": llava_error_frame})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w")


def test_body_limit_refuses_declared_and_streamed_bodies() -> None:
    async def scenario() -> None:
        async with _echo_app(100) as client:
            assert (await client.post("/echo", content=b"x" * 100)).json() == {"n": 100}
            r = await client.post("/echo", content=b"x" * 101)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert "at most 100 (--max-request-bytes)" in r.json()["error"]["message"]

            async def chunked():
                for _ in range(5):
                    yield b"y" * 40

            r = await client.post("/echo", content=chunked())  # no content-length
            assert r.status_code == 413 and "over 120 bytes" in r.json()["error"]["message"]
            r = await client.post("/stream", content=b"z" * 200)
            assert r.status_code == 413 and r.content.endswith(b"\0") and b'"error_code": 4' in r.content

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------------ images


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_images_names_the_bad_one_and_counts() -> None:
    good = encode_image_base64(Image.new("RGB", (4, 4)))

    async def scenario() -> None:
        with pytest.raises(ImageError, match=r"images\[1\]: image is not valid base64"):
            await ImageIntake(ImagePolicy()).decode_all([good, "%%%"])
        with pytest.raises(InvalidRequestError, match="at most 1 .--max-images-per-request"):
            await ImageIntake(ImagePolicy(max_images=1)).decode_all([good, good])
        with pytest.raises(ImageError, match="over the limit of 10"):
            await ImageIntake(ImagePolicy(limits=ImageLimits(max_pixels=10))).decode_all([good])
        halved = ImageIntake(ImagePolicy(), fit=lambda img: img.resize((2, 2)))
        assert [im.size for im in await halved.decode_all([good])] == [(2, 2)]

    asyncio.run(scenario())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "::1", "192.168.0.9"])
def test_private_hosts_are_refused(host) -> None:
    with pytest.raises(ImageError, match="non-public address"):
        check_public_host(host)


def test_public_literal_passes() -> None:
    check_public_host("8.8.8.8")


def test_image_urls_policy_fetch_redirect_and_caps() -> None:
    png = _png()

    def serve(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/moved":
            return httpx.Response(302, headers={"location": "/cat.png"})
        if path == "/cat.png":
            return httpx.Response(200, content=png)
        if path == "/big.png":
            return httpx.Response(200, content=b"\0" * 5000)
        if path == "/slow.png":
            raise httpx.ReadTimeout("slow")
        return httpx.Response(404)

    async def scenario() -> None:
        def load_image_urls(urls, policy, http):
            return ImageIntake(policy).load_urls(urls, http)

        async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as http:
            with pytest.raises(ImageError, match="image 0: http.s. image URLs are not fetched"):
                await load_image_urls(["http://img.test/cat.png"], ImagePolicy(), http)
            with pytest.raises(ImageError, match="non-public address 127.0.0.1"):
                await load_image_urls(["http://127.0.0.1/cat.png"], ImagePolicy(allow_urls=True), http)
            ok = ImagePolicy(allow_urls=True, allow_private_urls=True, limits=ImageLimits(max_bytes=4000))
            images = await load_image_urls(["http://127.0.0.1/moved", f"data:image/png;base64,"
                                            f"{encode_image_base64(Image.new('RGB', (3, 3)))}"], ok, http)
            assert [im.size for im in images] == [(8, 6), (3, 3)]
            for path, words in (("/big.png", "over the limit of 4000 bytes"), ("/gone.png", "HTTP 404"),
                                ("/slow.png", "timed out")):
                with pytest.raises(ImageError, match=words):
                    await load_image_urls([f"http://127.0.0.1{path}"], ok, http)

    asyncio.run(scenario())
