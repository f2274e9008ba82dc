"""Hub ids resolve through the local Hugging Face cache (offline), for both layouts, exactly as real checkpoints
(llava-hf/llava-1.5-7b-hf, liuhaotian/llava-v1.5-7b + openai/clip-vit-large-patch14-336) would."""
import json
import os
import shutil

import pytest

from tests.conftest import run_module


def _cache_repo(cache, repo_id, src, mutate=None):
    snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    shutil.copytree(src, snap)
    (snap.parents[1] / "refs").mkdir(parents=True)
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    if mutate:
        mutate(snap)
    return snap


@pytest.mark.slow
def test_hub_ids_from_local_cache(tmp_path, tiny_hf_path, tiny_original_path, monkeypatch):
    cache = tmp_path / "hub"
    _cache_repo(cache, "llava-hf/llava-1.5-7b-hf", tiny_hf_path)
    clip_dir = next(p for p in tiny_original_path.iterdir() if p.is_dir())

    def point_at_hub_clip(snap):
        shutil.rmtree(snap / clip_dir.name)
        cfg = json.loads((snap / "config.json").read_text())
        cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
        (snap / "config.json").write_text(json.dumps(cfg))

    _cache_repo(cache, "liuhaotian/llava-v1.5-7b", tiny_original_path, point_at_hub_clip)
    _cache_repo(cache, "openai/clip-vit-large-patch14-336", clip_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outputs = []
    for repo in ("llava-hf/llava-1.5-7b-hf", "liuhaotian/llava-v1.5-7b"):
        proc = run_module("llava.eval.run_llava", "--model-path", repo, "--query", "hi", "--temperature", "0",
                          "--max_new_tokens", "8", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        outputs.append(result["final"])
        assert result["options"]["layout"] == ("hf" if "llava-hf" in repo else "original")
    assert outputs[0] == outputs[1]  # same weights in both layouts
