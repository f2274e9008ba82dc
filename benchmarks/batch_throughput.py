"""Benchmark generation throughput (samples/s) by batch size, measured in one run.

    python benchmarks/batch_throughput.py --preset bench --samples 16 --batch-sizes 1,4,8,16 --max-new-tokens 32

Runs the direct step (what ``llava.eval.generate --method direct`` does) over the same samples at each batch size,
with a fixed answer length, and prints samples/s and the speedup over batch 1; ``--method ecso`` runs the whole
pipeline (benign traffic) instead. Peak memory: CUDA max allocated on a GPU, max RSS on a CPU.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, load_engine, machine, reset_caches, synthetic_samples, timed, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.batch_throughput")


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args) -> dict:
    import torch

    from llava.ecso.backends import StepRequest
    from llava.ecso.local_vlm import backend_for_engine
    from llava.ecso.config import ECSOConfig
    from llava.ecso.pipeline import ECSO, ECSOInput

    engine, n_params = load_engine(args, prefix_reuse=True)
    samples = synthetic_samples(args.samples)
    cfg = ECSOConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, force_verdict=False)
    out: dict = {"settings": vars(args), "machine": machine(), "params_m": n_params / 1e6, "batch": {}}
    backend_for_engine(engine).generate([StepRequest(samples[0][1], [samples[0][0]], cfg.params())])  # warm-up
    for bs in args.batch_sizes:
        backend = backend_for_engine(engine, max_batch_size=bs)
        if args.method == "direct":
            reqs = [StepRequest(q, [img], cfg.params()) for img, q in samples]
            run = lambda: backend.generate(reqs)  # noqa: E731
        else:
            pipe = ECSO(backend, cfg)
            items = [ECSOInput(q, [img]) for img, q in samples]
            run = lambda: [pipe.run_batch(items[i:i + bs]) for i in range(0, len(items), bs)]  # noqa: E731
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t, _ = timed(run, args.repeats, lambda: reset_caches(engine))
        out["batch"][bs] = {"seconds": t, "samples_per_s": len(samples) / t, "peak_memory_mb": peak_memory_mb()}
        logger.info("batch %d: %.2f samples/s (%.2fs), peak %.0f MB", bs, len(samples) / t, t, peak_memory_mb())
        base = out["batch"][args.batch_sizes[0]]["samples_per_s"]
        out["speedup"] = {b: r["samples_per_s"] / base for b, r in out["batch"].items()}
        write_json(args.json, out)  # after each batch size: a killed run keeps its results
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated; the first is the baseline")
    p.add_argument("--max-new-tokens", type=int, default=32, help="fixed answer length")
    p.add_argument("--method", choices=["direct", "ecso"], default="direct", help="what each sample runs")
    p.set_defaults(samples=16)
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from llava.cli_args import setup_logging

    setup_logging(1)
    results = measure(args)
    print("batch_throughput: " + " ".join(
        f"bs{bs}={r['samples_per_s']:.2f}/s(x{results['speedup'][bs]:.2f})" for bs, r in results["batch"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
