"""The one JSON-lines reader: input data (strict) and logs our writers append to (a torn tail is skipped)."""
import pytest

from llava.eval.jsonl import DatasetError, encode_rows, read_jsonl


def test_input_data_is_strict(tmp_path):
    path = tmp_path / "q.jsonl"
    with pytest.raises(DatasetError, match="question file not found: .*q.jsonl"):
        read_jsonl(path)
    path.write_bytes(b"\n\n")
    with pytest.raises(DatasetError, match="ground truth .*q.jsonl has no rows"):
        read_jsonl(path, "ground truth")
    path.write_bytes(b'{"a": 1}\n{"a": \n')
    with pytest.raises(DatasetError, match=r"q.jsonl:2: not valid JSON \(Expecting value\)"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": 2')  # a torn last line is an error in input data
    with pytest.raises(DatasetError, match=":2: not valid JSON"):
        read_jsonl(path)
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DatasetError, match=":1: not valid UTF-8"):
        read_jsonl(path)
    path.write_bytes(b'[1]\n')
    with pytest.raises(DatasetError, match=":1: expected a JSON object, got list"):
        read_jsonl(path)


def test_logs_skip_a_torn_tail_only(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(encode_rows([{"id": "é"}, {"id": 2}]) + b'{"id": 3, "te')
    assert read_jsonl(path, log=True) == [{"id": "é"}, {"id": 2}]
    assert "line 3: torn last line skipped" in caplog.text
    path.write_bytes(b'{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(DatasetError, match="a.jsonl line 2: invalid JSON"):
        read_jsonl(path, log=True)
    path.write_bytes(b"")
    assert read_jsonl(path, log=True) == []
    with pytest.raises(OSError):
        read_jsonl(tmp_path / "absent.jsonl", log=True)
