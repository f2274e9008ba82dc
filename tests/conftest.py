import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.data_manifest import DATA_DIR, missing_files

# One torch thread per process: the suite runs model servers and clients side by side on a 2-core machine, where
# competing thread pools made generation ~50x slower (measured in the worker tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# One cache of tiny models for the whole run, shared with the subprocesses tests start (they inherit the env).
_CACHE = tempfile.mkdtemp(prefix="ecso-test-cache-")
os.environ["ECSO_CACHE_DIR"] = _CACHE

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ref_data() -> Path:
    """The repository's reference data (data/, listed in data/SOURCES.md). Tests may read it; the package never
    does. A missing file fails every test that uses it, naming the file: these tests never skip."""
    missing = missing_files(DATA_DIR)
    if missing:
        pytest.fail(f"reference data missing ({len(missing)} files, listed in data/SOURCES.md): "
                    + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""), pytrace=False)
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_hf_path() -> Path:
    """The tiny llava-hf-layout model (built once per test session into the session cache)."""
    from llava.model.tiny import tiny_model_path

    return tiny_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_original_path() -> Path:
    """The tiny original-LLaVA-layout model from the same seed (same weights as tiny_hf_path)."""
    from llava.model.tiny import tiny_model_path

    return tiny_model_path("tiny-original")


@pytest.fixture(scope="session")
def transformers_serve(tiny_hf_path):
    """``transformers serve`` (a real third-party OpenAI-compatible server) on the tiny llava-hf model, started once
    per session (tests/serve/upstreams.py). A test that kills it starts it again on the same port before it ends."""
    from tests.serve.upstreams import TransformersServe

    server = TransformersServe(tiny_hf_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf_path):
    from llava.model.builder import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_engine(tiny_loaded):
    from llava.model.engine import LlavaEngine

    return LlavaEngine(tiny_loaded)


@pytest.fixture()
def sample_image():
    """A non-square RGB image with structure (so padding and features matter)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), (240, 230, 210))
    draw = ImageDraw.Draw(img)
    draw.ellipse((100, 40, 220, 160), fill=(220, 120, 30))
    draw.rectangle((0, 170, 320, 200), fill=(60, 140, 60))
    return img


def run_module(module: str, *args: str, timeout: float = 120, input: str | None = None):
    """Run ``python -m module args`` in a subprocess with the test environment; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          input=input, cwd=REPO_ROOT, env=os.environ.copy())


def _vlm_families() -> list[str]:
    """The tiny non-LLaVA families this machine can build: transformers' Qwen2.5-VL processor needs torchvision
    (tests/model/test_tiny_families.py checks the clear error where it is missing)."""
    from transformers.utils import is_torchvision_available

    return ["llava_next", "idefics3", "gemma3"] + (["qwen2_5_vl"] if is_torchvision_available() else [])


VLM_FAMILIES = _vlm_families()


@pytest.fixture(scope="session")
def vlm_backend():
    """``vlm_backend(family)``: the family's tiny model (built once per session) behind its in-process backend,
    loaded once per session."""
    from llava.ecso.local_vlm import load_local

    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_local(f"tiny-{family}", device="cpu")
        return loaded[family]

    return get
