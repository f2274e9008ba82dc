"""Optional dependencies: an entry point or a backend whose extra is not installed says what to install, with no
traceback. The missing packages are hidden from a real ``python -m`` process by a ``sitecustomize`` that removes them
from the import path finder's view."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llava.ecso import registry
from llava.ecso.registry import BackendEntry, create_backend
from llava.errors import MissingExtraError, UnsupportedError
from llava.extras import require_extra
from tests.conftest import REPO_ROOT

SERVE = ("fastapi", "uvicorn", "httpx", "gradio", "pydantic", "anyio", "starlette")
HIDE = '''
import importlib.machinery, sys
HIDDEN = set({hidden!r})
class _Hiding(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in HIDDEN else super().find_spec(name, path, target)
sys.meta_path[:] = [_Hiding if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def _run_without(tmp_path, *args: str, hidden: tuple[str, ...] = SERVE) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE.format(hidden=hidden))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_entry_points_without_the_serve_extra_say_what_to_install(tmp_path):
    server = _run_without(tmp_path, "llava.serve.controller", "--help")
    assert server.returncode == 1 and "Traceback" not in server.stderr
    assert 'pip install -e ".[serve]"' in server.stderr and "fastapi" in server.stderr
    remote = _run_without(tmp_path, "llava.eval.run_llava", "--query", "q", "--backend", "worker")
    assert remote.returncode == 2 and "Traceback" not in remote.stderr
    assert "the 'worker' backend needs the [serve] extra (httpx is not installed)" in remote.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", ["llava.eval.judge", "llava.eval.metrics"])
def test_judge_and_metrics_without_the_eval_extra_say_what_to_install(tmp_path, module):
    done = _run_without(tmp_path, module, "--help", hidden=("openai",))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert 'pip install -e ".[eval]"' in done.stderr and "openai" in done.stderr


def test_a_backend_or_module_whose_dependency_is_missing_names_its_extra(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "needs-extra", BackendEntry("ecso_no_such_package.mod:Backend", "serve"))
    with pytest.raises(MissingExtraError, match=r"'needs-extra' backend needs the \[serve\] extra"):
        create_backend("needs-extra")
    with pytest.raises(UnsupportedError, match="unknown backend 'nope'; valid: .*local.*openai.*worker"):
        create_backend("nope")
    with pytest.raises(MissingExtraError, match=r"the demo needs ecso_no_such_package \(the \[serve\] extra\)"):
        require_extra("ecso_no_such_package", "serve", "the demo")


@pytest.mark.slow
def test_lora_training_without_the_train_extra_says_what_to_install(tmp_path):
    proc = _run_without(tmp_path, "llava.train.lora", "--data", "sft.json", "--model-path", "tiny", "--out",
                        str(tmp_path / "out"), hidden=("peft",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert 'LoRA fine-tuning needs peft (the [train] extra): pip install -e ".[train]"' in proc.stderr
