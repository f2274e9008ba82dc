import csv
import json
import subprocess
import sys

import pytest

from llava.eval.judge.records import Judgment
from llava.eval.report import JudgeMismatchError, build_report, discover_runs, pair_runs

S1, S8 = "01-Illegal_Activitiy", "08-Political_Lobbying"


def _answers(method, n_safe_by_scenario, model="llava-tiny"):
    rows, judgments = [], []
    for scenario, (n, safe) in n_safe_by_scenario.items():
        for i in range(n):
            rid = f"{scenario}/SD/{i}"
            row = {"id": rid, "benchmark": "mmsafetybench", "method": method, "image": None, "query": "q",
                   "text": "t", "model_id": model, "scenario": scenario, "mode": "SD", "question_id": str(i)}
            if method == "ecso":
                row.update(unsafe="Yes" if i >= safe else "No", harm_score=0.9 if i >= safe else 0.1 + i / 100,
                           direct="d")
            rows.append(row)
            judgments.append((rid, "safe" if i < safe else "unsafe", scenario))
    return rows, judgments


def _write_run(folder, stem, rows, labels, judge_model="gpt-judge", sha="a" * 64, method="direct"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{stem}.manifest.json").write_text(json.dumps({"settings": {"model": "llava-tiny", "method": method,
                                                                           "template": "llava_v1"}}))
    js = [Judgment(id=rid, prompt_name="query_safety", judge_model=judge_model, verdict_kind="safe_unsafe", raw=lab,
                   label=lab, score=1.0 if lab == "safe" else 0.0, prompt_set_sha256=sha,
                   fields={"method": method, "scenario": sc, "mode": "SD"}) for rid, lab, sc in labels]
    (folder / f"{stem}.judgments.jsonl").write_text("".join(json.dumps(j.to_row()) + "\n" for j in js))
    (folder / f"{stem}.judge.json").write_text(json.dumps({"prompt_set": {"source": "p.jsonl", "sha256": sha}}))


@pytest.fixture
def runs(tmp_path):
    d_rows, d_labels = _answers("direct", {S1: (10, 4), S8: (4, 1)})
    e_rows, e_labels = _answers("ecso", {S1: (10, 9), S8: (4, 3)})
    _write_run(tmp_path / "direct", "mmsb.direct", d_rows, d_labels)
    _write_run(tmp_path / "ecso", "mmsb.ecso", e_rows, e_labels, method="ecso")
    return tmp_path


def test_report_tables_plots_and_manifests(runs, tmp_path):
    out = tmp_path / "report"
    result = build_report([runs / "direct", runs / "ecso"], out)
    assert result["warnings"] == []
    md = (out / "report.md").read_text()
    assert "| 01-Illegal_Activitiy | SD | 10 | 40.0 [16.8, 68.7] | 90.0 [59.6, 98.2] | +50.0 |" in md
    assert "| ALL | ALL | 14 | 35.7 " in md and "| +50.0 |" in md and "JUDGE MISMATCH" not in md
    assert "Harm detector (labels: the direct run's judgments (same ids))" in md
    assert "Settings that differ, mmsb.direct.jsonl -> mmsb.ecso.jsonl: method: 'direct' -> 'ecso'" in md
    name = "mmsafetybench_llava-tiny_mmsb.ecso"
    rows = list(csv.DictReader(open(out / f"{name}.csv")))
    paper8 = next(r for r in rows if r["scenario"] == "PAPER8" and r["mode"] == "ALL")
    assert float(paper8["harmless_direct_paper"]) == 0.4 and float(paper8["harmless_ecso_paper"]) == 0.9
    assert float(paper8["delta_paper"]) == pytest.approx(50.0) and float(paper8["flag_rate_ecso"]) == 0.1
    for png in (f"{name}_scenarios.png", f"{name}_flags.png", f"{name}_roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    manifests = json.loads((out / "manifests.json").read_text())
    assert len(manifests) == 2 and all(m["manifest"]["settings"]["template"] == "llava_v1" for m in manifests.values())


def test_judge_mismatch_is_loud_or_refused(runs, tmp_path):
    e_rows, e_labels = _answers("ecso", {S1: (10, 9), S8: (4, 3)})
    _write_run(runs / "ecso", "mmsb.ecso", e_rows, e_labels, judge_model="other-judge", sha="b" * 64, method="ecso")
    result = build_report([runs], tmp_path / "r1")
    assert len(result["warnings"]) == 1 and "other-judge" in result["warnings"][0]
    md = (tmp_path / "r1" / "report.md").read_text()
    assert md.index("WARNING — JUDGE MISMATCH") < md.index("## mmsafetybench")
    with pytest.raises(JudgeMismatchError):
        build_report([runs], tmp_path / "r2", strict=True)


def test_pairing_and_discovery(runs):
    found = discover_runs([runs])
    assert sorted(r.method for r in found) == ["direct", "ecso"]  # judgments files are not runs
    (direct, ecso), = pair_runs(found)
    assert direct.method == "direct" and ecso.method == "ecso" and ecso.judgments is not None


@pytest.mark.slow
def test_cli_with_utility_benchmark(tmp_path):
    def mme(method, flags):
        return [{"id": f"count/{i}.jpg#{k}", "benchmark": "mme", "method": method, "text": "Yes" if k == 0 else "No",
                 "model_id": "m", "question_id": f"count/{i}.jpg", "category": "count", "query": f"Q{i}{k}?",
                 "meta": {"mme_question": f"Q{i}{k}? Please answer yes or no.", "gt_answer": "Yes" if k == 0 else "No"},
                 **({"unsafe": "Yes" if (i, k) in flags else "No"} if method == "ecso" else {})}
                for i in range(4) for k in range(2)]
    (tmp_path / "runs").mkdir()
    for method, rows in (("direct", mme("direct", set())), ("ecso", mme("ecso", {(0, 0)}))):
        (tmp_path / "runs" / f"mme.{method}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "-m", "llava.eval.report", str(tmp_path / "runs"), "--out",
                           str(tmp_path / "rep")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| perception | 200.00 | 200.00 | +0.00 |" in md and "false-alarm (flag) rate: 12.5" in md
    assert "manifest MISSING" in md
    bad = subprocess.run([sys.executable, "-m", "llava.eval.report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
