"""The runner's building blocks without a model: LLaVA's chunks, launcher ranks, the answer file (torn lines, lock,
corruption), manifest helpers, waiting for parts."""
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava.errors import InvalidRequestError
from llava.eval.gen.answers import AnswerFile, AnswerFileBusyError, AnswerFileError, parse_rows, read_answer_rows
from llava.eval.gen.manifest import file_digest, ids_digest, manifest_path, settings_diff, write_manifest
from llava.eval.gen.merge import MergeError, wait_for_parts
from llava.eval.gen.shards import chunk_bounds, distributed_env, part_path, select_chunk


def llava_get_chunk(lst, n, k):
    """LLaVA's split_list/get_chunk, the reference (it raises IndexError for a chunk past the end)."""
    size = math.ceil(len(lst) / n)
    chunks = [lst[i:i + size] for i in range(0, len(lst), size)]
    return chunks[k]


@given(st.integers(0, 60), st.integers(1, 12))
def test_chunks_are_llavas_and_cover_every_item_once(n_items, n_chunks):
    items = list(range(n_items))
    got = [select_chunk(items, n_chunks, k) for k in range(n_chunks)]
    assert sum(got, []) == items
    for k in range(n_chunks):
        try:
            want = llava_get_chunk(items, n_chunks, k)
        except (IndexError, ValueError):  # LLaVA: past the end (or range step 0 on an empty list)
            want = []
        assert got[k] == want


def test_chunk_arguments_are_checked():
    assert chunk_bounds(10, 4, 3) == (9, 10)
    with pytest.raises(InvalidRequestError, match=r"\[0, 3\]"):
        chunk_bounds(10, 4, 4)
    with pytest.raises(InvalidRequestError, match="at least 1"):
        chunk_bounds(10, 0, 0)


def test_launcher_environment_and_part_names(tmp_path):
    assert distributed_env({}) is None and distributed_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = distributed_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (env.rank, env.world_size, env.local_rank) == (2, 4, 0)
    with pytest.raises(InvalidRequestError, match="outside"):
        distributed_env({"WORLD_SIZE": "2", "RANK": "2"})
    assert part_path(tmp_path / "a.jsonl", 4, 2).name == "a.part-2-of-4.jsonl"
    assert manifest_path(tmp_path / "merge.jsonl").name == "merge.manifest.json"


def test_parse_rows_keeps_the_intact_prefix():
    good = b'{"id": "a"}\n{"id": "b"}\n'
    assert parse_rows(good, "f") == ([{"id": "a"}, {"id": "b"}], len(good))
    assert parse_rows(good + b'{"id": "c", "te', "f")[1] == len(good)
    assert parse_rows(good + b'{"id": "c"}', "f")[1] == len(good), "no newline yet: not a finished row"
    assert parse_rows(good + b"\0\0\0\n", "f")[1] == len(good), "garbage a crash left at the end"
    assert parse_rows(b'{"id": "a"}\n\n\n{"id": "b"}\n', "f")[0] == [{"id": "a"}, {"id": "b"}]
    with pytest.raises(AnswerFileError, match="line 1 is not valid JSON"):
        parse_rows(b'{"id": \n{"id": "b"}\n', "f")
    with pytest.raises(AnswerFileError, match="no 'id'"):
        parse_rows(b'{"text": "x"}\n', "f")


def test_answer_file_repairs_locks_and_appends(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "a"}\n{"id": "b", "te')
    with AnswerFile(path) as f:
        scan = f.open()
        assert scan.ids == ["a"] and scan.duplicates == 1 and scan.torn_to.read_bytes() == b'{"id": "b", "te'
        with pytest.raises(AnswerFileBusyError, match="another process"):
            AnswerFile(path).open()
        f.append([{"id": "b", "text": "é"}])
    assert [r["id"] for r in read_answer_rows(path)] == ["a", "a", "b"]
    with AnswerFile(path) as f:  # the lock is released on close
        assert f.open(overwrite=True).ids == []
    assert path.read_bytes() == b""


def test_settings_diff_and_digests(tmp_path):
    assert settings_diff({"a": {"b": (1, 2)}, "c": 1}, {"a": {"b": [1, 2]}, "c": 1}) == []
    assert settings_diff({"a": {"b": 1}}, {"a": {"b": 2, "x": None}}) == ["a.b: 1 -> 2"]
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "01.json").write_text("{}")
    (tmp_path / "q" / "img.jpg").write_bytes(b"\xff")
    before = file_digest(tmp_path / "q")
    (tmp_path / "q" / "img.jpg").write_bytes(b"\x00")  # images are not part of the digest
    assert file_digest(tmp_path / "q") == before and file_digest(tmp_path / "none") is None
    (tmp_path / "q" / "01.json").write_text('{"0": {}}')
    assert file_digest(tmp_path / "q") != before
    assert ids_digest(["b", "a", "a"]) == ids_digest(["a", "b"])


def test_waiting_for_parts_ends_on_failure_or_timeout(tmp_path):
    parts = [tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"]
    write_manifest(manifest_path(parts[0]), {"settings": {}, "status": "complete"})
    with pytest.raises(MergeError, match="timed out"):
        wait_for_parts(parts, timeout_s=0.05, poll_s=0.01)
    manifest_path(parts[1]).write_text(json.dumps({"settings": {}, "status": "failed"}))
    with pytest.raises(MergeError, match="ended failed"):
        wait_for_parts(parts, timeout_s=5, poll_s=0.01)
    manifest_path(parts[1]).write_text(json.dumps({"settings": {}, "status": "complete"}))
    wait_for_parts(parts, timeout_s=5, poll_s=0.01)
