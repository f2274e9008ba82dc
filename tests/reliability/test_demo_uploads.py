"""The demo's uploads (issue 18, item 10), on a real demo process on 127.0.0.1: gradio's upload limit is the
worker's body limit (413 beyond it), an image over the pixel limit is refused from its header before anything
decodes it (the demo's peak RSS stays flat), and the upload folder is gone once the demo stops."""
from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from rss import MiB, Meter  # noqa: E402
from service_procs import Service, start_demo, stop_service  # noqa: E402

pytestmark = pytest.mark.slow

LIMIT = 1_000_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[tuple[Service, Path]]:
    tmp = tmp_path_factory.mktemp("demo-tmp")
    svc = start_demo("http://127.0.0.1:9", "--log-dir", "", "--max-upload-bytes", str(LIMIT),
                     env={"TMPDIR": str(tmp)})
    try:
        yield svc, tmp
    finally:
        stop_service(svc)


def _grey_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 200).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_uploads_over_the_limit_are_413(demo) -> None:
    """Before the fix a 300 MB upload was accepted (no limit); now the page's limit is the worker's."""
    svc, _ = demo
    r = httpx.post(f"{svc.url}/gradio_api/upload", files={"files": ("big.png", b"\0" * (LIMIT + 1))},
                   timeout=30, trust_env=False)
    assert r.status_code == 413, r.text
    ok = httpx.post(f"{svc.url}/gradio_api/upload", files={"files": ("small.png", _grey_png(8))}, timeout=30,
                    trust_env=False)
    assert ok.status_code == 200, ok.text


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(demo, tmp_path) -> None:
    """A 144 MP greyscale PNG cost the demo +1.9 GB (gradio decoded it, then converted it to RGB); now the
    demo reads its header, refuses it with the reason, and decodes nothing."""
    from gradio_client import Client, handle_file

    svc, _ = demo
    path = tmp_path / "grey.png"
    path.write_bytes(_grey_png(12000))
    meter = Meter(svc.pid)
    client = Client(svc.url, verbose=False, download_files=False)
    result = client.predict(None, handle_file(str(path)), "What is this?", api_name="/run_ecso")
    status = next(v for v in result if isinstance(v, str) and "pixels" in v)
    assert "over the limit of 40000000" in status, result
    print(f"demo peak +{meter.peak / MiB:.0f} MiB for a 144 MP greyscale PNG")
    assert meter.peak < 150 * MiB, f"peak +{meter.peak / MiB:.0f} MiB"


def test_the_upload_folder_is_removed_on_exit(demo) -> None:
    """Before the fix the demo left every upload in gradio's temporary folder after it exited (6/6 files).
    Last in the module: it stops the module's demo."""
    svc, tmp = demo
    for i in range(3):
        r = httpx.post(f"{svc.url}/gradio_api/upload", files={"files": (f"f{i}.png", _grey_png(8 + i))},
                       timeout=30, trust_env=False)
        assert r.status_code == 200, r.text
    assert any(p.is_file() for p in tmp.rglob("*"))  # the uploads are there while the demo runs
    stop_service(svc)  # SIGTERM, as the launcher and service managers stop it
    assert [str(p) for p in tmp.rglob("*") if p.is_file()] == []
