"""Memory a worker spends on hostile images and prompts (issue 18, items 1-4), measured on a real worker process
on 127.0.0.1: its peak resident set (``VmHWM``, reset through ``/proc/PID/clear_refs`` before each attack) and
its resident set after, against a baseline taken after a warm-up request. Each attack is the issue's, each bound
far below what it cost before the fix (figures in docs/reliability.md)."""
from __future__ import annotations

import base64
import io
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from corpus import BASE_PROMPT, good_png
from rss import MiB, Meter
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from service_procs import Service, start_service, stop_service  # noqa: E402

pytestmark = pytest.mark.slow

def _png(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> bytes:
    """A compressible picture (a few shapes on a flat background), so large images stay small on the wire."""
    img = Image.new(mode, size, (seed * 37 % 256, 90, 160) if mode == "RGB" else seed % 256)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle((w // 5, h // 5, w // 2, h // 2), fill=(250, seed % 256, 20) if mode == "RGB" else 250)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1 if w * h < 1e7 else 6)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def worker(tiny_hf_path) -> Iterator[Service]:
    svc = start_service("llava.serve.model_worker", "--model-path", "tiny", "--no-register",
                        "--limit-model-concurrency", "3", startup_timeout=90)
    try:
        _llava(svc, [_b64(good_png())])  # warm-up: lazy allocations belong to the baseline, not to an attack
        yield svc
    finally:
        stop_service(svc)


def _llava(svc: Service, images: list[str], text: str = "What is this?") -> tuple[int, dict]:
    prompt = BASE_PROMPT.format(tags="<image>\n" * len(images), text=text)
    body = {"model": "tiny", "prompt": prompt, "images": images, "max_new_tokens": 1, "temperature": 0}
    r = httpx.post(f"{svc.url}/worker_generate_stream", json=body, timeout=120, trust_env=False)
    frames = [json.loads(f) for f in r.content.split(b"\0") if f.strip()]
    return r.status_code, frames[-1]


def _at_once(svc: Service, n: int, images: list[str]) -> list[tuple[int, dict]]:
    """``n`` concurrent LLaVA stream requests with ``images``."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: _llava(svc, images), range(n)))


def _openai(svc: Service, data_url: str) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "What is this?"}]}]}
    return httpx.post(f"{svc.url}/v1/chat/completions", json=body, timeout=120, trust_env=False)


def test_cached_images_are_not_kept_decoded(worker) -> None:
    """Item 2: the pixel and prefix caches kept each decoded source image (ten large ones: +1.1 GB until small
    ones evicted them); now they are keyed by content hash and hold only tensors at the model's size. First in
    the module: freed heap that other attacks leave resident would hide what the caches keep."""
    images = [_png((4000, 3000), seed) for seed in range(6)]  # 36 MB each once decoded
    meter = Meter(worker.pid)
    for data in images:
        status, frame = _llava(worker, [_b64(data)])
        assert status == 200 and frame["error_code"] == 0, frame
    print(f"resident +{meter.now / MiB:.0f} MiB after 6 images of 4000x3000")
    assert meter.now < 150 * MiB, f"resident +{meter.now / MiB:.0f} MiB after 6 large images"


def test_concurrent_decoding_is_bounded(worker) -> None:
    """Item 4: 5 concurrent requests of 3 images of 4000x4000 (which fit the context) decoded 15 images at once and
    held them at full size; now at most --decode-concurrency (2) are decoded at once, each reduced at once. Early
    in the module: freed heap that other attacks leave resident would hide this peak."""
    meter = Meter(worker.pid)
    for status, frame in _at_once(worker, 5, [_b64(_png((4000, 4000)))] * 3):
        assert status == 200 and frame["error_code"] == 0, frame
    print(f"peak +{meter.peak / MiB:.0f} MiB for 5 x 3 images of 4000x4000")
    assert meter.peak < 700 * MiB, f"peak +{meter.peak / MiB:.0f} MiB"


def test_a_long_thin_image_is_padded_at_the_working_size(worker) -> None:
    """Item 1: a 16000x100 PNG (1.6 MP, under the pixel limit) was padded to 16000x16000 (+3.4 GB) before the
    vision tower's resize; now it is reduced first and answered with bounded memory."""
    meter = Meter(worker.pid)
    status, frame = _llava(worker, [_b64(_png((16000, 100)))])
    assert status == 200 and frame["error_code"] == 0, frame
    print(f"peak +{meter.peak / MiB:.0f} MiB for a 16000x100 image")
    assert meter.peak < 150 * MiB, f"peak +{meter.peak / MiB:.0f} MiB"


def test_degenerate_aspect_ratio_is_a_400_with_the_reason(worker) -> None:
    """Item 3: a 40 000 000 x 1 image (exactly the pixel limit) raised MemoryError: OpenAI 500, LLaVA code 1."""
    data = _png((40_000_000, 1), mode="L")
    r = _openai(worker, "data:image/png;base64," + _b64(data))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    assert "aspect ratio of 40000000:1" in r.json()["error"]["message"]
    status, frame = _llava(worker, [_b64(data)])
    assert status == 400 and frame["error_code"] == 4 and "aspect ratio" in frame["text"], frame


def test_token_budget_is_checked_before_decoding(worker) -> None:
    """Item 4: 3 concurrent requests of 8 images of 6000x6000 (116 KB PNGs) reached +3.3 GB before their
    context-length 400; now the image count is checked against the context first (nothing decoded)."""
    meter = Meter(worker.pid)
    for status, frame in _at_once(worker, 3, [_b64(_png((6000, 6000)))] * 8):
        assert status == 400 and frame["error_code"] == 5, frame
    print(f"peak +{meter.peak / MiB:.0f} MiB for 3 x 8 images of 6000x6000")
    assert meter.peak < 100 * MiB, f"peak +{meter.peak / MiB:.0f} MiB"


def test_a_huge_prompt_is_refused_by_its_length(worker) -> None:
    """Item 4: a 24 MB prompt reached +2.6 GB tokenizing before its context-length 400; now its length in
    characters refuses it (the body itself, 24 MB, still has to be read and parsed)."""
    text = "hello world " * 2_000_000
    meter = Meter(worker.pid)
    start = time.monotonic()
    status, frame = _llava(worker, [], text=text)
    elapsed = time.monotonic() - start
    assert status == 400 and frame["error_code"] == 5 and "characters" in frame["text"], frame
    print(f"peak +{meter.peak / MiB:.0f} MiB, {elapsed:.2f} s for a 24 MB prompt")
    assert meter.peak < 300 * MiB, f"peak +{meter.peak / MiB:.0f} MiB"
    assert elapsed < 10, elapsed
