"""Decode speed at batch 1 against the memory-bandwidth bound, in one run.

    python benchmarks/decode_speed.py --preset llava-1.5-7b --device cuda --new-tokens 128

Each decode step reads every weight once, so tokens/s <= bandwidth / weight bytes. The bandwidth is measured in
the same run (a large device-to-device copy), so the bound is this machine's, not a datasheet's.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, load_engine, machine, synthetic_samples, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.decode_speed")


def measured_bandwidth_gbs(device: str, mb: int = 2048) -> float:
    """Bytes moved per second by a large copy (read + write counted)."""
    import torch

    n = mb * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t) / 1e9


def measure(args) -> dict:
    import torch

    from llava.ecso.backends import StepRequest
    from llava.ecso.local_vlm import backend_for_engine
    from llava.generation import GenerationParams

    engine, n_params = load_engine(args, prefix_reuse=False)
    backend = backend_for_engine(engine)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    img, q = synthetic_samples(1)[0]

    def run(n: int) -> float:
        params = GenerationParams(max_new_tokens=n, min_new_tokens=n)
        if engine.loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        backend.generate([StepRequest(q, [img], params)])
        if engine.loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)  # warm-up
    t_short, t_long = run(1), run(1 + args.new_tokens)
    per_token = (t_long - t_short) / args.new_tokens  # prefill cancels out
    bw = measured_bandwidth_gbs(engine.loaded.device)
    bound = bw * 1e9 / weight_bytes
    return {"settings": vars(args), "machine": machine(), "params_m": n_params / 1e6,
            "weight_gb": weight_bytes / 1e9, "decode_tokens_per_s": 1 / per_token, "prefill_plus_1_s": t_short,
            "measured_bandwidth_gbs": bw, "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": (1 / per_token) / bound}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    r = measure(args)
    write_json(args.json, r)
    print(f"decode_speed: {r['decode_tokens_per_s']:.1f} tok/s at batch 1; bound {r['bandwidth_bound_tokens_per_s']:.1f} "
          f"tok/s ({r['weight_gb']:.2f} GB weights, {r['measured_bandwidth_gbs']:.0f} GB/s measured) -> "
          f"{100 * r['fraction_of_bound']:.0f}% of the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
