"""The generation runner on a deterministic fake backend: rows, resume, torn lines, manifests and mismatches,
chunks and merge, concurrency, failures, --from-answers. (The tiny model end to end: test_generate_tiny.py.)"""
import json

import pytest
from generate_testdata import FakeBackend, draw_image, make_mmsafe, make_vlsafe, read_rows

from llava.errors import InvalidRequestError
from llava.eval.benchmarks.base import DatasetError
from llava.eval.gen.manifest import ResumeMismatchError, load_manifest, manifest_path
from llava.eval.gen.merge import MergeError, merge_parts
from llava.eval.gen.runner import TooManyErrorsError, run_generation
from llava.eval.generate import build_parser, config_from_cli

FORMAT_DIRECT = ["id", "benchmark", "method", "image", "query", "text", "model_id", "model_family"]
FORMAT_ECSO = FORMAT_DIRECT + ["unsafe", "harm_score", "caption", "unsafe_answer", "direct"]


def config(*argv):
    defaults = ["--model-path", "fake", "--no-progress", "--max-new-tokens", "8"]
    return config_from_cli(build_parser().parse_args([*defaults, *argv]))


def run(*argv, backend=None):
    backend = backend or FakeBackend()
    return run_generation(config(*argv), lambda: backend), backend


def no_backend():
    raise AssertionError("the backend must not be created when nothing is left to answer")


@pytest.fixture()
def vlsafe(tmp_path, ref_data):
    return make_vlsafe(tmp_path, ref_data, 7)


def test_direct_and_ecso_rows_follow_the_answer_format(tmp_path, vlsafe):
    out = tmp_path / "d.jsonl"
    summary, backend = run(*vlsafe, "--answers-file", str(out), "--batch-size", "3")
    rows = read_rows(out)
    assert summary.status == "complete" and summary.done == 7 and backend.closed and backend.max_batch == 3
    assert list(rows[0])[:8] == FORMAT_DIRECT and list(rows[0])[-2:] == ["image_id", "meta"]
    assert [r["id"] for r in rows] == [r["image_id"] for r in rows]
    assert {r["model_id"] for r in rows} == {"fake-model"} and {r["method"] for r in rows} == {"direct"}

    eout = tmp_path / "e.jsonl"
    run(*vlsafe, "--answers-file", str(eout), "--method", "ecso")
    erows = read_rows(eout)
    assert list(erows[0])[:13] == FORMAT_ECSO
    flagged = [r for r in erows if r["unsafe"] == "Yes"]
    assert flagged and len(flagged) < len(erows), "the fake scores flag some rows, not all"
    for r, d in zip(erows, rows):
        assert r["direct"] == d["text"]
        if r["unsafe"] == "Yes":
            assert r["unsafe_answer"] == r["direct"] and r["caption"] and r["text"] != r["direct"]
        else:
            assert r["unsafe_answer"] is None and r["caption"] is None and r["text"] == r["direct"]
    m = load_manifest(manifest_path(eout))
    assert m["status"] == "complete" and m["settings"]["ecso"]["verdict"] == "score"
    assert m["settings"]["model"]["verdict_used"] == "score" and m["plan"]["count"] == 7
    assert m["settings"]["data"]["question_file_sha256"] and m["runs"][0]["environment"]["packages"]["torch"]


def test_resume_answers_only_what_is_missing(tmp_path, vlsafe):
    out = tmp_path / "a.jsonl"
    first, _ = run(*vlsafe[:-2], "--limit", "3", "--answers-file", str(out))
    second, _ = run(*vlsafe, "--answers-file", str(out))
    assert (first.done, second.done, second.skipped) == (3, 4, 3)
    third = run_generation(config(*vlsafe, "--answers-file", str(out)), no_backend)
    assert third.status == "complete" and third.done == 0 and third.skipped == 7
    single, _ = run(*vlsafe, "--answers-file", str(tmp_path / "single.jsonl"))
    assert read_rows(out) == read_rows(tmp_path / "single.jsonl")
    assert len(load_manifest(manifest_path(out))["runs"]) == 3


def test_torn_last_line_is_moved_aside_and_redone(tmp_path, vlsafe):
    out = tmp_path / "t.jsonl"
    run(*vlsafe, "--answers-file", str(out))
    want = out.read_bytes()
    out.write_bytes(want[:-25])  # a kill in the middle of the last write
    summary, _ = run(*vlsafe, "--answers-file", str(out))
    assert summary.done == 1 and out.read_bytes() == want
    torn = list(tmp_path.glob("t.jsonl.torn-*"))
    assert len(torn) == 1 and torn[0].read_bytes() == want[want.rfind(b"\n", 0, len(want) - 1) + 1:-25]


def test_corrupt_line_before_the_end_is_refused(tmp_path, vlsafe):
    out = tmp_path / "c.jsonl"
    run(*vlsafe, "--answers-file", str(out))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "{garbage\n" + "".join(lines[1:]))
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        run(*vlsafe, "--answers-file", str(out))


def test_resume_with_other_settings_is_refused(tmp_path, vlsafe):
    out = tmp_path / "m.jsonl"
    run(*vlsafe[:-2], "--limit", "3", "--answers-file", str(out))
    with pytest.raises(ResumeMismatchError, match=r"decoding.max_new_tokens: 8 -> 16"):
        run(*vlsafe, "--answers-file", str(out), "--max-new-tokens", "16")
    with pytest.raises(ResumeMismatchError, match="method"):
        run(*vlsafe, "--answers-file", str(out), "--method", "ecso")
    other = FakeBackend()
    other.describe = lambda: {"backend": "fake", "model_name": "another-model"}
    with pytest.raises(ResumeMismatchError, match="model.model_name"):
        run(*vlsafe, "--answers-file", str(out), backend=other)
    forced, _ = run(*vlsafe, "--answers-file", str(out), "--temperature", "0.5", "--force-mismatch")
    assert forced.done == 4 and load_manifest(manifest_path(out))["runs"][-1]["forced_mismatch"]
    fresh, _ = run(*vlsafe, "--answers-file", str(out), "--temperature", "0.5", "--overwrite")
    assert fresh.done == 7 and len(load_manifest(manifest_path(out))["runs"]) == 1


def test_answer_file_without_manifest_is_refused(tmp_path, vlsafe):
    out = tmp_path / "x.jsonl"
    run(*vlsafe, "--answers-file", str(out))
    manifest_path(out).unlink()
    with pytest.raises(ResumeMismatchError, match="no manifest"):
        run_generation(config(*vlsafe, "--answers-file", str(out)), no_backend)


def test_chunks_merged_equal_a_single_run(tmp_path, vlsafe):
    single, _ = run(*vlsafe, "--answers-file", str(tmp_path / "single.jsonl"))
    parts = [tmp_path / f"3_{k}.jsonl" for k in range(3)]
    sizes = []
    for k in (2, 0, 1):
        s, _ = run(*vlsafe, "--num-chunks", "3", "--chunk-idx", str(k), "--answers-file", str(parts[k]))
        sizes.append(s.planned)
    assert sorted(sizes) == [1, 3, 3]  # ceil(7 / 3) = 3: LLaVA's chunks
    merged = merge_parts(list(reversed(parts)), tmp_path / "merge.jsonl")
    assert read_rows(tmp_path / "merge.jsonl") == read_rows(tmp_path / "single.jsonl")
    assert merged["counts"]["answered"] == 7 and merged["plan"]["ids_sha256"] == \
        load_manifest(manifest_path(tmp_path / "single.jsonl"))["plan"]["ids_sha256"]
    with pytest.raises(MergeError, match="exists"):
        merge_parts(parts, tmp_path / "merge.jsonl")
    with pytest.raises(MergeError, match="chunks 0..1 of 2"):
        merge_parts(parts[:2], tmp_path / "m2.jsonl")
    rows = parts[1].read_text().splitlines(keepends=True)
    parts[1].write_text("".join(rows[:-1]))
    with pytest.raises(MergeError, match="do not match its plan"):
        merge_parts(parts, tmp_path / "m3.jsonl")


def test_merge_refuses_an_unfinished_part(tmp_path, vlsafe):
    parts = [tmp_path / f"2_{k}.jsonl" for k in range(2)]
    word = [json.loads(line) for line in open(vlsafe[3])][5]["query"].split()[-1]  # row 5 is in chunk 1 of 2
    run(*vlsafe, "--num-chunks", "2", "--chunk-idx", "0", "--answers-file", str(parts[0]))
    run(*vlsafe, "--num-chunks", "2", "--chunk-idx", "1", "--answers-file", str(parts[1]),
        backend=FakeBackend(fail_on=word))
    with pytest.raises(MergeError, match="incomplete"):
        merge_parts(parts, tmp_path / "m.jsonl")


def test_concurrency_keeps_batches_in_flight_and_the_file_in_order(tmp_path, vlsafe):
    backend = FakeBackend(delay=0.05)
    summary, _ = run(*vlsafe, "--answers-file", str(tmp_path / "c.jsonl"), "--batch-size", "1",
                     "--concurrency", "4", backend=backend)
    run(*vlsafe, "--answers-file", str(tmp_path / "s.jsonl"))
    assert summary.status == "complete" and backend.calls == 7
    assert read_rows(tmp_path / "c.jsonl") == read_rows(tmp_path / "s.jsonl")
    assert summary.elapsed_s < 7 * 0.05, "4 batches in flight should beat one at a time"


def test_a_failing_sample_is_recorded_and_retried_on_resume(tmp_path, vlsafe):
    out = tmp_path / "f.jsonl"
    rows = [json.loads(line) for line in open(vlsafe[3])][:7]
    word = rows[2]["query"].split()[-1]
    summary, _ = run(*vlsafe, "--answers-file", str(out), "--batch-size", "4", backend=FakeBackend(fail_on=word))
    failed = {f["id"] for f in summary.failures}
    assert summary.status == "incomplete" and rows[2]["image_id"] in failed and summary.done == 7 - len(failed)
    assert {f["kind"] for f in summary.failures} == {"backend_error"}
    again, _ = run(*vlsafe, "--answers-file", str(out))
    assert again.status == "complete" and again.done == len(failed)
    run(*vlsafe, "--answers-file", str(tmp_path / "s.jsonl"))
    assert read_rows(out) == read_rows(tmp_path / "s.jsonl"), "a finished file is rewritten in sample order"


def test_too_many_failures_stop_the_run(tmp_path, vlsafe):
    out = tmp_path / "f.jsonl"
    with pytest.raises(TooManyErrorsError, match="2 samples failed"):
        run(*vlsafe, "--answers-file", str(out), "--batch-size", "1", "--max-errors", "2",
            backend=FakeBackend(fail_on="?"))  # every VLSafe query is a question
    assert load_manifest(manifest_path(out))["status"] == "failed"


def test_missing_and_corrupt_images_are_recorded_and_the_run_goes_on(tmp_path, vlsafe):
    rows = [json.loads(line) for line in open(vlsafe[3])][:7]
    (tmp_path / "coco" / rows[1]["image_id"]).unlink()
    (tmp_path / "coco" / rows[4]["image_id"]).write_bytes(b"not a jpeg")
    out = tmp_path / "i.jsonl"
    summary, _ = run(*vlsafe, "--answers-file", str(out))
    assert summary.status == "complete" and summary.done == 5 and summary.missing_images == 1
    errors = {e["id"]: e["kind"] for e in load_manifest(manifest_path(out))["errors"]}
    assert errors == {rows[1]["image_id"]: "missing_image", rows[4]["image_id"]: "invalid_image"}
    rerun = run_generation(config(*vlsafe, "--answers-file", str(out)), no_backend)  # only the bad images left
    assert rerun.status == "complete" and [f["kind"] for f in rerun.failures] == ["invalid_image"]
    with pytest.raises(InvalidRequestError, match="not found"):
        run(*vlsafe, "--answers-file", str(tmp_path / "strict.jsonl"), "--strict")
    draw_image(tmp_path / "coco" / rows[1]["image_id"], 1)
    resumed, _ = run(*vlsafe, "--answers-file", str(out))
    assert resumed.done == 1 and resumed.status == "complete"


def test_from_answers_checks_the_direct_answers_it_has(tmp_path, ref_data):
    data = make_mmsafe(tmp_path, ref_data, 6)
    direct = tmp_path / "direct.jsonl"
    run(*data[:-2], "--limit", "4", "--answers-file", str(direct))
    backend = FakeBackend()
    summary, _ = run(*data, "--method", "ecso", "--from-answers", str(direct), "--answers-file",
                     str(tmp_path / "ecso.jsonl"), backend=backend)
    assert summary.planned == 4 and load_manifest(manifest_path(tmp_path / "ecso.jsonl"))["plan"][
        "without_direct_answer"] == 2
    one_pass, _ = run(*data[:-2], "--limit", "4", "--method", "ecso", "--answers-file", str(tmp_path / "one.jsonl"))
    assert read_rows(tmp_path / "ecso.jsonl") == read_rows(tmp_path / "one.jsonl")

    with pytest.raises(InvalidRequestError, match="--method ecso"):
        config(*data, "--from-answers", str(direct), "--answers-file", str(tmp_path / "x.jsonl"))
    other_mode = [a if a != "SD_TYPO" else "TYPO" for a in data]
    with pytest.raises(DatasetError, match="none of the 6 planned samples"):
        run(*other_mode, "--method", "ecso", "--from-answers", str(direct), "--answers-file",
            str(tmp_path / "y.jsonl"))
    tampered = tmp_path / "tampered.jsonl"
    rows = read_rows(direct)
    rows[1]["query"] = "another question"
    tampered.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="differs"):
        run(*data, "--method", "ecso", "--from-answers", str(tampered), "--answers-file", str(tmp_path / "y.jsonl"))
    m = load_manifest(manifest_path(direct))
    m["status"] = "incomplete"
    manifest_path(direct).write_text(json.dumps(m))
    with pytest.raises(ResumeMismatchError, match="finish that run"):
        run(*data, "--method", "ecso", "--from-answers", str(direct), "--answers-file", str(tmp_path / "z.jsonl"))


def test_limit_from_the_environment_and_data_root_layout(tmp_path, ref_data, monkeypatch):
    from llava.eval.gen.layout import DATA_LAYOUT

    root = tmp_path / "root"
    qf = root / DATA_LAYOUT["mmvet"].question_file
    qf.parent.mkdir(parents=True)
    qf.write_text((ref_data / "mmvet" / "llava-mm-vet.jsonl").read_text())
    for i, row in enumerate(read_rows(qf)[:3]):
        draw_image(root / DATA_LAYOUT["mmvet"].image_folder / row["image"], i)
    monkeypatch.setenv("ECSO_LIMIT", "3")
    summary, _ = run("--benchmark", "mmvet", "--data-root", str(root), "--answers-file", str(tmp_path / "v.jsonl"))
    assert summary.planned == 3 and summary.status == "complete" and summary.missing_images == 0
    with pytest.raises(InvalidRequestError, match="--question-file"):
        config("--benchmark", "mmvet", "--answers-file", str(tmp_path / "w.jsonl"))
    monkeypatch.setenv("ECSO_LIMIT", "three")
    with pytest.raises(InvalidRequestError, match="ECSO_LIMIT"):
        config("--benchmark", "mmvet", "--data-root", str(root), "--answers-file", str(tmp_path / "w.jsonl"))


def test_openai_backend_with_concurrency_keeps_requests_in_flight(tmp_path, vlsafe):
    """--backend openai (a vLLM/SGLang fleet) driven from one process: batches of 1, 4 in flight."""
    import asyncio

    import httpx

    from llava.ecso.openai_remote import OpenAIBackend

    state = {"now": 0, "peak": 0}

    async def server(request: httpx.Request) -> httpx.Response:  # on the backend's event loop
        body = json.loads(request.content)
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        text = f"answer to {body['messages'][-1]['content'][-1]['text'][:30]}"
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": text}}]})

    backend = OpenAIBackend("http://fleet.test/v1", model_name="llava-served", logprobs=False,
                            transport=httpx.MockTransport(server))
    out = tmp_path / "o.jsonl"
    summary = run_generation(config(*vlsafe, "--backend", "openai", "--answers-file", str(out), "--batch-size", "1",
                                    "--concurrency", "4"), lambda: backend)
    rows = read_rows(out)
    assert summary.status == "complete" and state["peak"] >= 2 and len(rows) == 7
    assert rows[0]["model_id"] == "llava-served" and rows[0]["text"].startswith("answer to How")
    assert load_manifest(manifest_path(out))["settings"]["model"]["base_url"] == "http://fleet.test/v1"
