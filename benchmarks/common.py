"""Shared setup for the benchmark scripts: a model from a preset or a path, synthetic samples, timing, output."""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

__all__ = ["add_common_args", "load_engine", "synthetic_samples", "timed", "machine", "write_json", "reset_caches"]

logger = logging.getLogger("benchmarks")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench", choices=["tiny", "bench", "llava-1.5-7b"],
                   help="random-weight model built in memory: tiny (0.4 M), bench (~94 M, CPU), llava-1.5-7b (GPU)")
    p.add_argument("--model-path", default=None, help="a real checkpoint (any family) instead of --preset")
    p.add_argument("--family", default="llava", choices=["llava", "llava_next", "qwen2_5_vl", "idefics3", "gemma3"],
                   help="llava: LLaVA-1.5 at --preset's size; another family: its tiny random-weight model "
                        "(tiny-FAMILY, the only size its builder has; --preset does not apply)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--samples", type=int, default=4, help="distinct image+query samples per measurement")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per measurement (median reported)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="weights seed")


def load_engine(args, prefix_reuse: bool = True):
    """The engine of ``--model-path`` (any family), of ``--family``'s tiny model, or of a LLaVA ``--preset``."""
    import torch

    from llava.model.builder import load_model
    from llava.model.engine import LlavaEngine
    from llava.model.loaded import resolve_device
    from llava.model.tiny import build_loaded
    from llava.model.vlm import checkpoint_family, load_vlm
    from llava.model.vlm_engine import VLMEngine

    device = resolve_device(args.device)
    dtype = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    path = args.model_path or (None if getattr(args, "family", "llava") == "llava" else f"tiny-{args.family}")
    capacity = max(64, 2 * args.samples)
    if path and checkpoint_family(path)[1].engine == "processor":
        loaded = load_vlm(path, device=device, dtype=dtype)
        engine = VLMEngine(loaded, prefix_reuse=prefix_reuse, cache_capacity=capacity)
    else:
        loaded = load_model(path, device=device, dtype=dtype) if path else \
            build_loaded(args.preset, seed=args.seed, device=device, dtype=dtype)
        engine = LlavaEngine(loaded, prefix_reuse=prefix_reuse, cache_capacity=capacity)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info("model %s: %.1f M parameters on %s/%s", loaded.model_name, n_params / 1e6, device, loaded.dtype)
    return engine, n_params


def synthetic_samples(n: int, seed: int = 0):
    """``n`` distinct non-square images with shapes on them, and questions."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = rng.choice([(640, 480), (480, 640), (512, 512), (800, 450)])
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        out.append((img, f"Question {i}: what is shown in this picture, and how could it be used?"))
    return out


def reset_caches(engine) -> None:
    engine.clear_caches()


def timed(fn: Callable[[], object], repeats: int = 1, before: Callable[[], None] | None = None) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` (``before`` runs untimed before each), and its last result."""
    import torch

    times, result = [], None
    for _ in range(max(1, repeats)):
        if before:
            before()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        logger.info("wrote %s", path)
