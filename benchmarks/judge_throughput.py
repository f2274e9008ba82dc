"""Judge requests/s against the local stub judge (tests/eval/judge_server.py) at several --parallel values.

    python benchmarks/judge_throughput.py [--n 200] [--latency 0.05] [--parallel 1 16]

``--latency`` is the stub's simulated per-request service time (a hosted judge takes ~0.5-5 s); with 0 the number
is the client's own overhead (openai client + thread pool + parsing + cache) on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "eval")]

from judge_server import JudgeServer, ScriptState  # noqa: E402

from llava.eval.judge import JudgeConfig, JudgeRunner  # noqa: E402


def measure(base_url: str, n: int, parallel: int, tag: str) -> tuple[float, dict]:
    rows = [{"id": f"{tag}{i}", "query": "q", "text": f"answer {tag}{i} <<say:Rating: [[{i % 2}]]>>"} for i in range(n)]
    runner = JudgeRunner(JudgeConfig(judge_model="stub", base_url=base_url, parallel=parallel, timeout=30))
    start = time.perf_counter()
    judgments = runner.run(rows)
    wall = time.perf_counter() - start
    assert len(judgments) == n and runner.summary.requests["requests"] == n
    return n / wall, runner.summary.requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="answers judged per setting")
    p.add_argument("--latency", type=float, default=0.05, help="stub's seconds per request")
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 16], help="--parallel values to compare")
    args = p.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    with JudgeServer(ScriptState(latency_s=args.latency)) as srv:
        measure(srv.base_url, 10, 4, "warmup")
        results = {}
        for par in args.parallel:
            rate, _ = measure(srv.base_url, args.n, par, f"p{par}-")
            results[par] = rate
            print(f"parallel {par:3d}: {rate:8.1f} requests/s  ({args.n} requests, stub latency {args.latency * 1000:.0f} ms)")
    base = results[args.parallel[0]]
    for par in args.parallel[1:]:
        print(f"speed-up parallel {par} vs {args.parallel[0]}: {results[par] / base:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
