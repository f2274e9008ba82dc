"""Runs the seed's own evaluation scripts (gyhdog99/ECSO, LLaVA 1.2.2) on a CPU in float32, unmodified: the shims
below are applied at run time, in this process, before a script runs. Started by ``seed_compare.py`` with the seed's
interpreter (a transformers 4.37 venv) and the seed checkout on ``PYTHONPATH``; it never imports this project.

    python seed_side.py --out timing.json [--cap 32] [--verdict-cap 2] [--force-yes] -- SCRIPT ARGS... [-- SCRIPT ARGS...]

The shims:

* CPU, float32: ``Tensor.cuda()`` is the identity, ``Tensor.half()`` and ``.to(torch.float16)`` keep float32,
  ``.to(device='cuda')`` stays on the CPU, and the seed's loader (``load_pretrained_model``) loads float32 weights
  on the CPU (its ``torch.float16`` reads as float32).
* What the scripts intend, not their crash: with transformers 4.37.2 ``LlavaLlamaForCausalLM.generate`` returns
  only the new tokens, and the scripts slice ``output_ids[:, input_token_len:]`` (direct: ``RuntimeError: The size
  of tensor a (...) must match the size of tensor b (...)``; the harm check: a wrong slice). The shim puts the
  prompt in front of the output, as the scripts expect.
* Token budgets: every generation is capped at ``--cap`` new tokens, the harm check (the user's turn ending in
  "Answer yes or no:") at ``--verdict-cap`` (the scripts ask for up to 1024). ``--force-yes``: the harm check's tokens are
  generated, then its answer reads "yes", so steps 3-4 run (random weights never answer "yes").

Each script's wall time and CPU time (its data-loader workers' included), model loading left out, are written to
``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
import time
import types

import torch

_STATE = {"load_s": 0.0, "load_cpu_s": 0.0, "tokenizer": None}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the scripts' data-loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _shim_tensors() -> None:
    to = torch.Tensor.to

    def to_cpu_float32(self, *args, **kwargs):
        args = tuple(torch.float32 if a is torch.float16 else "cpu" if a == "cuda" else a for a in args)
        if kwargs.get("dtype") is torch.float16:
            kwargs["dtype"] = torch.float32
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu_float32
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self.float()


def _shim_loader() -> None:
    import llava.model.builder as builder

    float32_torch = types.ModuleType("torch")
    float32_torch.__dict__.update(torch.__dict__)
    float32_torch.float16 = torch.float32
    builder.torch = float32_torch
    load = builder.load_pretrained_model

    def load_on_cpu(*args, **kwargs):
        t, c = time.perf_counter(), cpu_seconds()
        kwargs["device"] = "cpu"
        tokenizer, model, image_processor, context_len = load(*args, **kwargs)
        model.float().eval()
        _STATE["tokenizer"] = tokenizer
        _STATE["load_s"] += time.perf_counter() - t
        _STATE["load_cpu_s"] += cpu_seconds() - c
        return tokenizer, model, image_processor, context_len

    builder.load_pretrained_model = load_on_cpu


def _shim_generate(cap: int, verdict_cap: int, force_yes: bool) -> None:
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    generate = LlavaLlamaForCausalLM.generate

    def generate_as_intended(self, inputs=None, *args, **kwargs):
        text = _STATE["tokenizer"].decode(inputs[0][inputs[0] >= 0])  # the prompt's text (image positions left out)
        check = "Answer yes or no:" in text[-80:]  # the harm check's question ends the user's turn
        kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or cap, verdict_cap if check else cap)
        new = generate(self, inputs, *args, **kwargs)
        if check and force_yes:
            yes = _STATE["tokenizer"]("yes", add_special_tokens=False, return_tensors="pt").input_ids
            new = yes.to(new.device)
        return torch.cat([inputs, new], dim=1)

    LlavaLlamaForCausalLM.generate = generate_as_intended


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    own, runs = argv[:split], [[]]
    for arg in argv[split + 1:]:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cap", type=int, default=32)
    p.add_argument("--verdict-cap", type=int, default=2)
    p.add_argument("--force-yes", action="store_true")
    args = p.parse_args(own)
    torch.manual_seed(0)
    _shim_tensors()
    _shim_loader()
    _shim_generate(args.cap, args.verdict_cap, args.force_yes)
    timings = []
    for script, *script_args in runs:
        _STATE["load_s"] = _STATE["load_cpu_s"] = 0.0
        sys.argv = [script, *script_args]
        t, c = time.perf_counter(), cpu_seconds()
        runpy.run_path(script, run_name="__main__")
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
        timings.append({"script": script, "seconds": wall - _STATE["load_s"], "cpu_seconds": cpu - _STATE["load_cpu_s"],
                        "load_s": _STATE["load_s"]})
    with open(args.out, "w") as f:
        json.dump({"runs": timings, "torch": torch.__version__, "threads": torch.get_num_threads()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
