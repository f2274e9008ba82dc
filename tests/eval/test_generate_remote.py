"""``python -m llava.eval.generate --backend openai`` against a real third-party OpenAI-compatible server
(``transformers serve`` on the tiny llava-hf model, the session's): MM-SafetyBench TYPO images rendered here, direct
and ECSO answers through the server, each ECSO row saying that its verdict was parsed and why (the server returns no
logprobs), and the direct answers the server's own."""
from __future__ import annotations

import json

import httpx
import pytest
from generate_testdata import read_rows

from llava.ecso.remote import image_for_upload
from llava.eval import generate, mmsafetybench_images
from llava.eval.gen.manifest import load_manifest, manifest_path
from llava.mm_utils import encode_image_base64, load_image

pytestmark = pytest.mark.slow

SCENARIO = "01-Illegal_Activitiy"
N = 2


def test_generate_on_mmsafetybench_typo_through_transformers_serve(tmp_path, ref_data, transformers_serve) -> None:
    questions = ref_data / "mmsafetybench" / "processed_questions" / f"{SCENARIO}.json"
    assert mmsafetybench_images.main(["--questions", str(questions), "--out", str(tmp_path / "imgs"),
                                      "--modes", "TYPO"]) == 0
    common = ["--benchmark", "mmsafetybench", "--question-file", str(questions), "--image-folder",
              str(tmp_path / "imgs"), "--mode", "TYPO", "--limit", str(N), "--backend", "openai",
              "--openai-base-url", transformers_serve.url, "--max-new-tokens", "4", "--no-progress", "-q"]
    assert generate.main([*common, "--answers-file", str(tmp_path / "direct.jsonl")]) == 0
    assert generate.main([*common, "--method", "ecso", "--answers-file", str(tmp_path / "ecso.jsonl")]) == 0
    direct, ecso = read_rows(tmp_path / "direct.jsonl"), read_rows(tmp_path / "ecso.jsonl")
    assert len(direct) == len(ecso) == N and [r["mode"] for r in ecso] == ["TYPO"] * N
    assert all(r["model_id"] == transformers_serve.model_id for r in direct + ecso)
    for row in ecso:
        assert row["harm_score"] is None and row["verdict_mode"] == "parse"  # no made-up score
        assert row["verdict_fallback"] == "the endpoint returns no logprobs"
    assert [r["direct"] for r in ecso] == [r["text"] for r in direct]

    # The direct answers are the server's own to the padded TYPO image and the query, as sent.
    row = direct[0]
    image = load_image(tmp_path / "imgs" / SCENARIO / "TYPO" / f"{row['question_id']}.jpg")
    url = "data:image/png;base64," + encode_image_base64(image_for_upload(image))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": row["query"]}]}]
    answer = httpx.post(f"{transformers_serve.url}/chat/completions", trust_env=False, timeout=120, json={
        "model": transformers_serve.model_id, "messages": messages, "max_tokens": 4, "temperature": 0}).json()
    assert answer["choices"][0]["message"]["content"].strip() == row["text"]
    settings = load_manifest(manifest_path(tmp_path / "ecso.jsonl"))["settings"]
    assert settings["model"]["verdict_used"] == "parse" and settings["model"]["logprobs"] is False
    assert json.dumps(settings).find(transformers_serve.url) >= 0
