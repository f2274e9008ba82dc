"""ECSO's cost relative to a direct answer, measured in one run on the same samples.

    python benchmarks/ecso_overhead.py --preset bench --samples 4 --lengths 1,64 --json out/ecso_overhead.json
    python benchmarks/ecso_overhead.py --family gemma3 --samples 4 --lengths 1,64   # another family's tiny model

For each fixed answer length (every generated step produces exactly that many tokens), it times the direct answer
alone, then ECSO on the same samples for benign traffic (verdict forced to "not harmful" after it is computed) and
flagged traffic (forced "harmful": steps 3-4 run), in each configuration of ``--configs`` (see ``CONFIGS``): the
defaults, the paper's ``exact`` verdict, the speculative caption, the early check, skipped checks (what lone-letter
answers cost with ``--skip-check-regex``; one-token answers only) and no prefix reuse. Random weights never answer "yes", hence the documented benchmark-only ``force_verdict``.
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


# name -> (prefix reuse, ECSOConfig overrides); every config is measured on benign and flagged traffic
CONFIGS = {
    "default": (True, {}),
    "exact": (True, {"verdict": "exact"}),
    "speculative": (True, {"speculative_caption": True}),
    "early": (True, {"early_check_tokens": None}),  # --early-tokens
    "skip": (True, {"skip_check_regex": r"(?s).*"}),  # every answer skips the check: what lone-letter answers cost
    "noreuse": (False, {}),
    "noreuse-exact": (False, {"verdict": "exact"}),
}


def measure(args) -> dict:
    """Each ECSO configuration is timed right after its own direct baseline (same samples, cold caches), so a
    drifting machine load cancels out of the ratio; the median over ``--repeats`` pairs is reported. Past
    ``--time-budget-s`` the remaining measurements are skipped (and listed), so a bounded run still reports."""
    import statistics
    import time

    from llava.ecso.backends import StepRequest
    from llava.ecso.local_vlm import backend_for_engine
    from llava.ecso.config import ECSOConfig
    from llava.ecso.pipeline import ECSO, ECSOInput

    start = time.perf_counter()
    samples = synthetic_samples(args.samples)
    engines = {True: load_engine(args, prefix_reuse=True)[0]}
    engines[False] = type(engines[True])(engines[True].loaded, prefix_reuse=False)
    results: dict = {"settings": vars(args), "machine": machine(), "runs": [], "skipped": []}
    items = [ECSOInput(q, [img]) for img, q in samples]
    for length in args.lengths:
        cfg = ECSOConfig(max_new_tokens=length, min_new_tokens=length)
        direct_reqs = [StepRequest(q, [img], cfg.params()) for img, q in samples]
        row = {"length": length, "configs": []}
        warm = set()
        for name in args.configs:
            reuse, overrides = CONFIGS[name]
            overrides = {k: (args.early_tokens if k == "early_check_tokens" else v) for k, v in overrides.items()}
            if overrides.get("early_check_tokens", 0) >= length or (name == "skip" and length > 1):
                continue  # the early check never fires before the end; skipping models one-token answers only
            eng = engines[reuse]
            backend = backend_for_engine(eng, max_batch_size=args.batch_size)
            if reuse not in warm:
                backend.generate(direct_reqs[:1])
                warm.add(reuse)
            for traffic, force in (("benign", False), ("flagged", True)):
                if name == "skip" and force:
                    continue  # a skipped check never flags
                if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                    results["skipped"].append(f"L{length}/{name}/{traffic}")
                    continue
                pipe = ECSO(backend, ECSOConfig(max_new_tokens=length, min_new_tokens=length, force_verdict=force,
                                                **overrides))
                pairs = []
                for _ in range(max(1, args.repeats)):
                    t_direct, _ = timed(lambda: backend.generate(direct_reqs), 1, lambda: reset_caches(eng))
                    t_ecso, res = timed(lambda: pipe.run_batch(items), 1, lambda: reset_caches(eng))
                    pairs.append((t_direct, t_ecso))
                ratio = statistics.median(e / d for d, e in pairs)
                steps = {s: sum(r.timings.get(s, 0.0) for r in res) for s in ("direct", "verdict", "caption", "safe")}
                row["configs"].append({"config": name, "prefix_reuse": reuse, "traffic": traffic,
                                       "overrides": overrides, "direct_s": statistics.median(d for d, _ in pairs),
                                       "ecso_s": statistics.median(e for _, e in pairs), "ratio": ratio,
                                       "steps_s": steps})
                logger.info("L=%d %s %s: ECSO/direct %.3f (%s)", length, name, traffic, ratio,
                            ", ".join(f"{k} {v:.3f}s" for k, v in steps.items()))
        results["runs"].append(row)
        results["elapsed_s"] = time.perf_counter() - start
        write_json(args.json, {**results, **headline(results)})  # after each length: a killed run keeps its results
    return results


def headline(results: dict) -> dict:
    """``benign_ratio``/``flagged_ratio``: the defaults (score verdict, prefix reuse), worst over the answer lengths;
    ``ratios``: the same for every configuration measured."""
    worst: dict = {}
    for r in results["runs"]:
        for c in r["configs"]:
            slot = worst.setdefault(c["config"], {})
            slot[c["traffic"]] = max(slot.get(c["traffic"], 0.0), c["ratio"])
    out = {"ratios": worst}
    for traffic in ("benign", "flagged"):
        out[f"{traffic}_ratio"] = worst.get("default", {}).get(traffic)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--lengths", default="1,64", help="fixed answer lengths in new tokens, comma-separated")
    p.add_argument("--batch-size", type=int, default=1, help="samples per model call (1 = one sample at a time)")
    p.add_argument("--configs", default="default,exact,speculative,early,skip,noreuse",
                   help=f"comma-separated configurations to time, in order: {', '.join(CONFIGS)}")
    p.add_argument("--early-tokens", type=int, default=16, help="the 'early' configuration's --early-check-tokens")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="skip (and list) the measurements left once this many seconds have passed; 0 = no limit")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; valid: {', '.join(CONFIGS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from llava.cli_args import setup_logging

    setup_logging(1)
    results = measure(args)
    results.update(headline(results))
    write_json(args.json, results)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    parts = [f"benign_ratio={fmt(results['benign_ratio'])}", f"flagged_ratio={fmt(results['flagged_ratio'])}"]
    for r in results["runs"]:
        for c in r["configs"]:
            parts.append(f"L{r['length']}/{c['config']}/{c['traffic']}={c['ratio']:.2f}")
    if results["skipped"]:
        parts.append(f"skipped={len(results['skipped'])}")
    print("ecso_overhead: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
