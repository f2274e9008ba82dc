"""Real processes: a generate run killed with SIGKILL part-way resumes to exactly the uninterrupted result, and a
two-process launch (torchrun sets RANK/WORLD_SIZE as accelerate does) writes parts that rank 0 merges."""
import os
import signal
import subprocess
import sys
import time

import pytest
from generate_testdata import TINY_ARGS, make_vlsafe, read_rows

from llava.eval import generate
from llava.eval.gen.manifest import load_manifest, manifest_path
from tests.conftest import REPO_ROOT

N = 12


def _lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(tmp_path, ref_data, tiny_hf_path):
    data = make_vlsafe(tmp_path, ref_data, N)
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "llava.eval.generate", *TINY_ARGS, "-q", *data, "--answers-file", str(out),
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _lines(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = _lines(out)
    assert 3 <= written < N, f"the run should be killed part-way ({written} of {N} lines)"
    assert load_manifest(manifest_path(out))["status"] == "running"  # what a SIGKILL leaves behind
    with open(out, "ab") as f:
        f.write(b'{"id": "000000350510.jpg", "text": "a write cut sh')  # as if the kill hit a write
    assert generate.main([*TINY_ARGS, "-q", *data, "--answers-file", str(out), "--batch-size", "4"]) == 0
    assert generate.main([*TINY_ARGS, "-q", *data, "--answers-file", str(tmp_path / "whole.jsonl")]) == 0
    resumed = read_rows(out)
    assert len({r["id"] for r in resumed}) == len(resumed) == N
    assert resumed == read_rows(tmp_path / "whole.jsonl")
    assert len(list(tmp_path.glob("killed.jsonl.torn-*"))) == 1
    m = load_manifest(manifest_path(out))
    assert m["status"] == "complete" and [r["status"] for r in m["runs"]] == ["running", "complete"]


@pytest.mark.slow
def test_two_process_launch_writes_parts_and_rank_0_merges(tmp_path, ref_data, tiny_hf_path):
    data = make_vlsafe(tmp_path, ref_data, 5)
    out = tmp_path / "launched.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "llava.eval.generate", *TINY_ARGS, "-q", *data, "--answers-file", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert generate.main([*TINY_ARGS, "-q", *data, "--answers-file", str(tmp_path / "single.jsonl")]) == 0
    assert read_rows(out) == read_rows(tmp_path / "single.jsonl")
    merged = load_manifest(manifest_path(out))
    assert [p["chunk_idx"] for p in merged["merged_from"]] == [0, 1] and merged["counts"]["answered"] == 5
