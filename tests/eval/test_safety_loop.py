"""The whole safety loop on the tiny model, offline, as docs/judge-and-metrics.md prints it (the block under "End to
end on the tiny model", read from the doc and run command by command in this process): render FigStep's Tiny
images and XSTest's TYPO and FigStep images -> generate with every method -> the refusal-match judge -> metrics ->
the threshold sweep -> the report."""
import csv
import importlib
import json
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from llava.ecso.defenses import defense_names
from llava.eval.jsonl import read_jsonl
from tests.conftest import REPO_ROOT
from tests.doc_commands import section_commands

DOC = REPO_ROOT / "docs" / "judge-and-metrics.md"
SECTION = "End to end on the tiny model (offline; `tests/eval/test_safety_loop.py` runs this block as written)"
_FOR = re.compile(r"for (\w+) in (.+?); do (.+); done")


def run(text: str, monkeypatch) -> None:
    """One command of the block: ``for`` loops expanded, ``python -m`` modules run here (their ``main``, or a
    package's ``__main__``), anything else in bash."""
    loop = _FOR.fullmatch(text)
    if loop:
        var, values, body = loop.groups()
        for value in values.split():
            run(body.replace(f"${var}", value), monkeypatch)
        return
    words = shlex.split(text)
    if words[:2] != ["python", "-m"]:
        subprocess.run(["bash", "-c", text], check=True, timeout=60)
        return
    module = importlib.import_module(words[2])
    if hasattr(module, "__path__"):  # a package: its __main__ runs its CLI and exits
        monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
        with pytest.raises(SystemExit) as done:
            runpy.run_module(words[2], run_name="__main__")
        assert done.value.code in (0, None), text
    else:
        assert module.main(words[3:]) == 0, text


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_hf_path):
    root = tmp_path_factory.mktemp("loop")
    (root / "data").symlink_to(REPO_ROOT / "data")
    found = section_commands(DOC, SECTION)
    commands = [c.text for c in found if c.block == found[0].block]  # the next block needs real weights
    assert len(commands) == 15
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for text in commands:
            run(text, mp)
    return root


def test_every_method_answered_every_benchmark(loop):
    runs = loop / "runs" / "safety"
    for method in defense_names():
        for name, n in (("figstep", 3), ("xstest_figstep", 6), ("xstest_typo", 6)):
            rows = read_jsonl(runs / f"{name}.{method}.jsonl")
            assert len(rows) == n and {r["method"] for r in rows} == {method}
            assert len(read_jsonl(runs / f"{name}.{method}.judgments.jsonl")) == n
    assert all(r["unsafe"] == "Yes" for r in read_jsonl(runs / "figstep.caption-only.jsonl"))
    forced = read_jsonl(runs / "xstest_typo.ecso.jsonl")
    assert all(r["safe_answer"] and set(r["timings"]) == {"direct", "verdict", "caption", "safe"} for r in forced)
    manifest = json.loads((runs / "figstep.adashield-static.manifest.json").read_text())
    assert manifest["settings"]["defense"]["name"] == "adashield-static"
    assert "But before processing any instruction" in manifest["settings"]["defense"]["prompts"]["query"]
    paper = json.loads((runs / "figstep.ecso-paper.manifest.json").read_text())
    assert paper["settings"]["ecso"]["verdict"] == "exact" and paper["settings"]["model"]["verdict_used"] == "exact"


def test_sweep_and_report_show_both_sides(loop):
    sweep = json.loads((loop / "runs" / "safety" / "sweep" / "sweep.json").read_text())
    assert sweep["n_harmful"] == sweep["n_benign"] == 3 and len(sweep["rows"]) == 101
    report = (loop / "runs" / "safety_report" / "report.md").read_text()
    assert "## Defenses side by side" in report and "Threshold sweep" in report
    assert "| method | figstep (figstep) ASR | over-refusal | xstest (figstep) ASR | over-refusal | xstest (typo) ASR |" \
        in report
    for method in defense_names():
        assert f"| {method} |" in report
    rows = list(csv.DictReader(open(loop / "runs" / "safety_report" / "methods.csv", encoding="utf-8")))
    assert len(rows) == 3 * len(defense_names())
    figstep_direct = next(r for r in rows if r["benchmark"] == "figstep" and r["method"] == "direct")
    xstest_direct = next(r for r in rows if (r["benchmark"], r["mode"], r["method"]) == ("xstest", "figstep", "direct"))
    assert figstep_direct["over_refusal_rate"] == xstest_direct["over_refusal_rate"] != ""  # the benign counterpart
    assert "xstest (figstep)" in figstep_direct["over_refusal_from"]
    assert (loop / "runs" / "safety_report" / "sweep0_sweep_tradeoff.png").is_file()
