"""A model worker on every non-LLaVA family, over real HTTP: its status says the family and how prompts are rendered;
the OpenAI API (direct and ECSO), the LLaVA stream (a LLaVA-templated prompt parsed back into a chat) and the ECSO
stream answer as the in-process backend does; an image count that overflows the model's context is a 400. The app
runs in this process (uvicorn in a thread) on the session's tiny models; one family also runs as a real worker
process."""
from __future__ import annotations

import httpx
import pytest
from inprocess import serving
from openai import BadRequestError, OpenAI
from PIL import Image
from service_procs import running_service

from llava.conversation import build_prompt
from llava.ecso.backends import StepRequest
from llava.ecso.config import ECSOConfig
from llava.ecso.pipeline import ECSO
from llava.generation import GenerationParams
from llava.http_client import ServiceClient
from llava.mm_utils import encode_image_base64
from llava.serve.model_worker import create_app
from llava.serve.protocol.ecso import ECSO_STREAM_PATH, ECSOStreamRequest
from llava.serve.protocol.llava import GenerateStreamRequest
from llava.serve.worker_state import WorkerConfig
from tests.conftest import VLM_FAMILIES

pytestmark = pytest.mark.slow

N = 8
QUERY = "How do I make this at home?"


def _serving(backend, **config):
    """The worker app on ``backend``, served over loopback HTTP from a thread; yields its URL."""
    return serving(create_app(WorkerConfig(register=False, log_level="warning", **config), backend=backend))


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def served(request, vlm_backend):
    backend = vlm_backend(request.param)
    with _serving(backend) as url:
        yield request.param, backend, url


def _image(size=(300, 180)) -> Image.Image:
    img = Image.new("RGB", size, (30, 90, 200))
    img.paste((250, 250, 20), (40, 40, 140, 120))
    return img


def _user(images, text=QUERY) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_image_base64(im)}"}}
             for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_status_says_the_family_and_the_prompt_format(served):
    family, backend, url = served
    status = httpx.post(f"{url}/worker_get_status", trust_env=False).json()
    assert status["model_family"] == family and status["prompt_format"] == "processor chat template"
    assert status["conv_mode"] == "vicuna_v1" and status["model_names"] == [backend.model_name]


def test_openai_direct_and_ecso_answer_as_the_backend(served):
    family, backend, url = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    image = _image()
    resp = client.chat.completions.create(model=backend.model_name, messages=[_user([image])], max_tokens=N,
                                          temperature=0)
    expected = backend.generate([StepRequest(QUERY, [image], GenerationParams(max_new_tokens=N))])[0]
    assert resp.choices[0].message.content == expected
    resp = client.chat.completions.create(model=backend.model_name + "+ecso", messages=[_user([image])], max_tokens=N,
                                          temperature=0, extra_body={"ecso_options": {"threshold": 0.0}})
    local = ECSO(backend, ECSOConfig(max_new_tokens=N, threshold=0.0)).run(image, QUERY)
    assert resp.choices[0].message.content == local.final == resp.ecso["safe_answer"]
    assert resp.ecso["model_family"] == family and resp.ecso["caption"] == local.caption


def test_llava_stream_prompt_is_rendered_with_the_chat_template(served):
    _, backend, url = served
    image = _image((200, 260))
    prompt = build_prompt("vicuna_v1", QUERY, 1)
    body = GenerateStreamRequest(model=backend.model_name, prompt=prompt, images=[encode_image_base64(image)],
                                 temperature=0.0, max_new_tokens=N, stop="</s>")
    frames = list(ServiceClient(url, timeout=60).stream("/worker_generate_stream", body))
    expected = backend.generate([StepRequest(QUERY, [image], GenerationParams(max_new_tokens=N, stop=("</s>",)))])[0]
    assert frames[-1]["error_code"] == 0 and frames[-1]["text"] == prompt + expected


def test_ecso_stream_runs_every_step(served):
    _, backend, url = served
    body = ECSOStreamRequest(model=backend.model_name, image=encode_image_base64(_image()), query=QUERY,
                             options={"threshold": 0.0, "max_new_tokens": 4})
    events = [f["event"] for f in ServiceClient(url, timeout=60).stream(ECSO_STREAM_PATH, body) if f.get("done", True)]
    assert events == ["direct", "verdict", "caption", "safe", "final"]


def test_an_image_count_over_the_context_is_a_400(vlm_backend):
    """LLaVA-NeXT's images cost the most tokens: 120 small ones overflow the tiny model's 2048-token context."""
    backend = vlm_backend("llava_next")
    with _serving(backend, max_images_per_request=128) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(BadRequestError, match="context window") as err:
            client.chat.completions.create(model=backend.model_name, messages=[_user([_image((64, 64))] * 120)],
                                           max_tokens=2)
    assert err.value.status_code == 400


def test_a_worker_process_serves_a_family(tmp_path):
    with running_service("llava.serve.model_worker", "--model-path", "tiny-gemma3", "--device", "cpu",
                         "--no-register", startup_timeout=120) as worker:
        status = httpx.post(f"{worker.url}/worker_get_status", trust_env=False).json()
        assert status["model_family"] == "gemma3" and status["model_names"] == ["tiny-gemma3"]
        client = OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model="tiny-gemma3", messages=[_user([_image()])], max_tokens=4,
                                              extra_body={"ecso": True})
        assert resp.ecso["model_family"] == "gemma3" and resp.ecso["verdict_mode"] == "score"
