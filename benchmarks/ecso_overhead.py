"""ECSO's cost relative to a direct answer, measured in one run on the same samples.

    python benchmarks/ecso_overhead.py --preset bench --samples 4 --lengths 1,64 --json out/ecso_overhead.json

For each fixed answer length (every generated step produces exactly that many tokens), it times the direct answer
alone, then ECSO on the same samples for benign traffic (verdict forced to "not harmful" after it is computed) and
flagged traffic (forced "harmful": steps 3-4 run), with prefix reuse on and off and the verdict in ``score`` and
``exact`` mode. Random weights never answer "yes", hence the documented benchmark-only ``force_verdict``.
Prints one summary line of ratios and writes every number (with per-step times) to ``--json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, load_engine, machine, reset_caches, synthetic_samples, timed, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.ecso_overhead")


def measure(args) -> dict:
    """Each ECSO configuration is timed right after its own direct baseline (same samples, cold caches), so a
    drifting machine load cancels out of the ratio; the median over ``--repeats`` pairs is reported."""
    import statistics

    from llava.ecso.backends import LocalBackend, StepRequest
    from llava.ecso.pipeline import ECSO, ECSOConfig, ECSOInput

    samples = synthetic_samples(args.samples)
    engines = {True: load_engine(args, prefix_reuse=True)[0]}
    engines[False] = type(engines[True])(engines[True].loaded, prefix_reuse=False)
    results: dict = {"settings": vars(args), "machine": machine(), "runs": []}
    for length in args.lengths:
        cfg = ECSOConfig(max_new_tokens=length, min_new_tokens=length)
        direct_reqs = [StepRequest(q, [img], cfg.params()) for img, q in samples]
        row = {"length": length, "configs": []}
        for reuse in (True, False):
            eng = engines[reuse]
            backend = LocalBackend(eng, max_batch_size=args.batch_size)
            backend.generate(direct_reqs[:1])  # warm-up
            variants = [("score", False), ("exact", False), ("score", True)] if reuse else [("score", False)]
            if not reuse and args.full:
                variants.append(("exact", False))
            for verdict, speculative in variants:
                for traffic, force in (("benign", False), ("flagged", True)):
                    pipe = ECSO(backend, ECSOConfig(max_new_tokens=length, min_new_tokens=length, verdict=verdict,
                                                    force_verdict=force, speculative_caption=speculative))
                    items = [ECSOInput(q, [img]) for img, q in samples]
                    pairs = []
                    for _ in range(max(1, args.repeats)):
                        t_direct, _ = timed(lambda: backend.generate(direct_reqs), 1, lambda: reset_caches(eng))
                        t_ecso, res = timed(lambda: pipe.run_batch(items), 1, lambda: reset_caches(eng))
                        pairs.append((t_direct, t_ecso))
                    ratio = statistics.median(e / d for d, e in pairs)
                    steps = {s: sum(r.timings.get(s, 0.0) for r in res) for s in ("direct", "verdict", "caption", "safe")}
                    row["configs"].append({"prefix_reuse": reuse, "verdict": verdict, "traffic": traffic,
                                           "speculative_caption": speculative,
                                           "direct_s": statistics.median(d for d, _ in pairs),
                                           "ecso_s": statistics.median(e for _, e in pairs), "ratio": ratio,
                                           "steps_s": steps})
                    logger.info("L=%d reuse=%s verdict=%s spec=%s %s: ECSO/direct %.3f (%s)", length, reuse, verdict,
                                speculative, traffic, ratio, ", ".join(f"{k} {v:.3f}s" for k, v in steps.items()))
        results["runs"].append(row)
    return results


def headline(results: dict) -> dict:
    """benign/flagged ratios with the defaults (score verdict, prefix reuse, no speculation), worst over the answer
    lengths; ``*_speculative`` the same with the speculative caption."""
    out = {}
    for traffic in ("benign", "flagged"):
        for spec, suffix in ((False, ""), (True, "_speculative")):
            out[f"{traffic}_ratio{suffix}"] = max(
                c["ratio"] for r in results["runs"] for c in r["configs"] if c["traffic"] == traffic
                and c["verdict"] == "score" and c["prefix_reuse"] and c["speculative_caption"] == spec)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--lengths", default="1,64", help="fixed answer lengths in new tokens, comma-separated")
    p.add_argument("--batch-size", type=int, default=1, help="samples per model call (1 = one sample at a time)")
    p.add_argument("--full", action="store_true", help="also time the exact verdict without prefix reuse (slow)")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from llava.cli_args import setup_logging

    setup_logging(1)
    results = measure(args)
    results.update(headline(results))
    write_json(args.json, results)
    parts = [f"benign_ratio={results['benign_ratio']:.3f}", f"flagged_ratio={results['flagged_ratio']:.3f}"]
    for r in results["runs"]:
        for c in r["configs"]:
            parts.append(f"L{r['length']}/{'reuse' if c['prefix_reuse'] else 'noreuse'}/{c['verdict']}"
                         f"{'+spec' if c['speculative_caption'] else ''}/{c['traffic']}={c['ratio']:.2f}")
    print("ecso_overhead: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
