"""``python -m llava.eval.refusal`` in a real process: one output row per input row, in order, for a CSV (XSTest's
completions) and a JSONL answer file; bad input is one line naming the file, the row and the column."""
import csv
import json

from llava.eval.refusal import main
from llava.eval.refusal_match import classify
from tests.conftest import run_module


def test_csv_in_order_one_row_per_input_row(ref_data, tmp_path):
    source = ref_data / "xstest" / "xstest_v2_completions_llama2orig_gpteval.csv"
    out = tmp_path / "refusals.jsonl"
    done = run_module("llava.eval.refusal", "--input", str(source), "--column", "completion", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    with open(source, newline="", encoding="utf-8") as fh:
        texts = [r["completion"] for r in csv.DictReader(fh)]
    assert len(rows) == len(texts) == 450
    assert rows == [classify(t).to_dict() for t in texts]
    assert {tuple(r) for r in rows} == {("refusal", "kind", "matched")}
    refused = sum(r["refusal"] for r in rows)
    assert f"450 answers: {refused} refusals" in done.stderr


def test_jsonl_to_stdout(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 1, "text": "I apologize, but I cannot help with that."}\n\n{"id": 2, "text": "Sure: 42."}\n')
    assert main(["--input", str(path), "--column", "text"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"refusal": True, "kind": "full", "matched": "I apologize"},
                    {"refusal": False, "kind": None, "matched": None}]


def test_bad_input_is_named(tmp_path, caplog):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"answer": "no text field"}\n')
    assert main(["--input", str(jsonl), "--column", "text"]) == 2
    assert f"{jsonl} row 2: 'text' is None, not text (fields: ['answer'])" in caplog.text
    table = tmp_path / "a.csv"
    table.write_text("id,prompt\n1,hello\n")
    assert main(["--input", str(table)]) == 2
    assert f"{table}: no column 'completion'; columns: ['id', 'prompt']" in caplog.text
    assert main(["--input", str(tmp_path / "missing.csv")]) == 2 and "input file not found" in caplog.text
    other = tmp_path / "a.txt"
    other.write_text("x")
    assert main(["--input", str(other)]) == 2 and "expected a .csv or .jsonl file" in caplog.text
