"""The paper's own ECSO code and this project on one checkpoint, timed unit by unit, alternating, with their outputs
compared. Not part of CI: it needs a checkout of the seed (github.com/gyhdog99/ECSO) and a Python environment
where the seed's code runs (transformers 4.37); see README.md here.

    python benchmarks/seed_compare/seed_compare.py --seed-repo ~/src/ECSO --seed-python ~/seedvenv/bin/python \
        --work /tmp/seed_compare --samples 8 --tokens 32 --repeats 1 --json seed_compare.json

Units (MM-SafetyBench's scripts: ``model_mmsafe.py``, then ``model_mmsafe_tell_ask.py`` on its answers):

* ``direct1``: direct answers at batch 1 (the seed's ``model_mmsafe.py``; here ``generate`` at batch 1);
* ``benign1`` / ``benign8``: ECSO on answers the check passes (the seed's two scripts, whose exact verdict a random
  model never says "yes" to; here the score verdict, forced to "no" after it is computed), batch 1 / 8;
* ``flagged8``: ECSO with every answer flagged (the seed's harm check answers "yes" after generating its tokens;
  here ``--force-verdict yes``), steps 3-4 included, batch 8 here (the seed runs batch 1 only).

Each unit runs in a fresh process on each side (the seed's with its interpreter and checkout, shims in
``seed_side.py``; the project's with this interpreter), on ``--threads`` torch threads (1 by default); model loading
is left out of both times. Seed and project alternate within a unit, the order flipping every unit and repeat.
Printed: CPU seconds per side (with one thread, the work done, whatever else the machine runs), the seed/project
ratio of CPU time and of wall time (medians over ``--repeats``), and how many samples' outputs are identical
(direct answers, verdicts, and for ``flagged8`` captions and safe answers).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from common import synthetic_samples  # noqa: E402

logger = logging.getLogger("benchmarks.seed_compare")

MODE = "SD_TYPO"  # the seed's default MM-SafetyBench image mode: the query is the "Rephrased Question"
UNITS = {  # name -> (project batch size, every answer flagged)
    "direct1": (1, None),
    "benign1": (1, False),
    "benign8": (8, False),
    "flagged8": (8, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-repo", help="a checkout of github.com/gyhdog99/ECSO (its llava/ package and scripts)")
    p.add_argument("--seed-python", help="an interpreter where the seed's code runs (torch, transformers==4.37.2, "
                   "tokenizers 0.15, sentencepiece, shortuuid, accelerate)")
    p.add_argument("--work", default="seed_compare_work", help="folder for the checkpoint, data and answers")
    p.add_argument("--model-path", default=None,
                   help="an original-layout LLaVA-1.5 checkpoint whose folder name contains 'llava' (the seed's "
                        "loader needs it); default: the bench preset (93.5 M random weights) built into --work")
    p.add_argument("--samples", type=int, default=8, help="image + query pairs (default %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generated step (default %(default)s)")
    p.add_argument("--verdict-tokens", type=int, default=2,
                   help="the seed's harm check: tokens generated (its scripts allow 1024; default %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed pairs per unit (median reported)")
    p.add_argument("--units", default=",".join(UNITS), help=f"comma-separated, from {', '.join(UNITS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on each side (default %(default)s: CPU time is then the work done, whatever "
                        "else the machine runs)")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--project-unit", default=None, help=argparse.SUPPRESS)  # internal: one project unit
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.project_unit is None and not (args.seed_repo and args.seed_python):
        p.error("--seed-repo and --seed-python are required")
    unknown = [u for u in args.units.split(",") if u not in UNITS]
    if unknown:
        p.error(f"unknown unit(s) {', '.join(unknown)}; valid: {', '.join(UNITS)}")
    return args


# ------------------------------------------------------------------------------------------------------ setup


def prepare(args) -> tuple[Path, Path, Path]:
    """The checkpoint, the question file and the image folder (the seed's MM-SafetyBench layout)."""
    work = Path(args.work).resolve()
    model = Path(args.model_path).resolve() if args.model_path else work / "llava-bench-original"
    if not args.model_path and not (model / "config.json").is_file():
        from llava.model.tiny import build_tiny

        build_tiny(model, layout="original", preset="bench")
    if "llava" not in model.name.lower():
        raise SystemExit(f"the seed's loader takes only folders named *llava*: {model}")
    data = work / "data"
    questions = {}
    for i, (img, query) in enumerate(synthetic_samples(args.samples)):
        path = data / "images" / MODE / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")  # lossless, so both sides' Pillow decode the same pixels
        questions[str(i)] = {"Question": query, "Rephrased Question": query, "Rephrased Question(SD)": query,
                             "Key Phrase": "picture"}
    qfile = data / "questions.json"
    qfile.write_text(json.dumps(questions, indent=1))
    return model, qfile, data / "images"


def _env(threads: int | None, pythonpath: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------- the two sides


def run_seed(args, unit: str, model: Path, qfile: Path, images: Path, out: Path) -> dict:
    """The seed's scripts for ``unit`` in a fresh process; seconds (model loading left out) and their answers."""
    repo = Path(args.seed_repo).resolve()
    flagged = UNITS[unit][1]
    common = ["--model-path", str(model), "--image-folder", str(images), "--mode", MODE, "--temperature", "0",
              "--conv-mode", "vicuna_v1"]
    direct = out / "direct.jsonl"
    cmd = [args.seed_python, str(HERE / "seed_side.py"), "--out", str(out / "timing.json"), "--cap",
           str(args.tokens), "--verdict-cap", str(args.verdict_tokens), *(["--force-yes"] if flagged else []),
           "--", str(repo / "llava/eval/model_mmsafe.py"), "--question-file", str(qfile), "--answers-file",
           str(direct), "--max_new_tokens", str(args.tokens), *common]
    if flagged is not None:
        cmd += ["--", str(repo / "llava/eval/model_mmsafe_tell_ask.py"), "--question-file", str(direct),
                "--answers-file", str(out / "tell_ask.jsonl"), *common]
    proc = subprocess.run(cmd, cwd=model, env=_env(args.threads, str(repo)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the seed's scripts failed ({unit}):\n{proc.stderr[-4000:]}")
    timing = json.loads((out / "timing.json").read_text())
    rows = [json.loads(line) for line in direct.read_text().splitlines() if line.strip()]
    result = {"seconds": sum(r["seconds"] for r in timing["runs"]),
              "cpu_seconds": sum(r["cpu_seconds"] for r in timing["runs"]), "runs": timing["runs"],
              "direct": [r["text"] for r in rows]}
    if flagged is not None:
        ecso = [json.loads(line) for line in (out / "tell_ask.jsonl").read_text().splitlines() if line.strip()]
        result["flagged"] = [r["unsafe"] == "Yes" for r in ecso]
        result["caption"] = [r.get("caption") for r in ecso]
        result["safe"] = [r["text"] if r["unsafe"] == "Yes" else None for r in ecso]
    return result


def run_project_unit(args) -> None:
    """One unit of this project, in this process: the model loaded, then the unit timed."""
    from llava.ecso.backends import StepRequest
    from llava.ecso.config import ECSOConfig
    from llava.ecso.local import LocalBackend
    from llava.ecso.pipeline import ECSO, ECSOInput
    from llava.mm_utils import load_image

    model, qfile, images = Path(args.model_path), Path(args.work) / "data" / "questions.json", \
        Path(args.work) / "data" / "images"
    batch, flagged = UNITS[args.project_unit]
    backend = LocalBackend.load(str(model), conv_mode="vicuna_v1", device="cpu", dtype="float32",
                                max_batch_size=batch)
    questions = json.loads(qfile.read_text())
    samples = [(str(images / MODE / f"{key}.jpg"), q["Rephrased Question"]) for key, q in questions.items()]
    config = ECSOConfig(max_new_tokens=args.tokens, temperature=0.0,
                        force_verdict=flagged if flagged is not None else None)
    t, c = time.perf_counter(), time.process_time()
    if flagged is None:
        direct = backend.generate([StepRequest(q, [load_image(p)], config.params()) for p, q in samples])
        result = {"direct": direct}
    else:
        runs = ECSO(backend, config).run_batch([ECSOInput(q, [p]) for p, q in samples])
        result = {"direct": [r.direct for r in runs], "flagged": [r.flagged for r in runs],
                  "caption": [r.caption for r in runs], "safe": [r.safe_answer for r in runs]}
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
    Path(args.out).write_text(json.dumps(result))


def run_project(args, unit: str, model: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--project-unit", unit, "--out", str(out / "project.json"),
           "--work", str(Path(args.work).resolve()), "--model-path", str(model), "--tokens", str(args.tokens)]
    proc = subprocess.run(cmd, env=_env(args.threads, str(HERE.parents[1])), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the project's unit {unit} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "project.json").read_text())


# ------------------------------------------------------------------------------------------------------ report


def identical(seed: dict, project: dict, key: str) -> str:
    pairs = list(zip(seed.get(key) or [], project.get(key) or []))
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.project_unit:
        run_project_unit(args)
        return 0
    model, qfile, images = prepare(args)
    units = args.units.split(",")
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("project_unit", "out")},
                    "model": str(model), "units": {}}
    for unit in units:
        report["units"][unit] = {"pairs": []}
    for rep in range(args.repeats):
        for k, unit in enumerate(units):
            out = Path(args.work).resolve() / "runs" / f"{unit}-{rep}"
            out.mkdir(parents=True, exist_ok=True)
            order = ("seed", "project") if (rep + k) % 2 == 0 else ("project", "seed")
            got = {}
            for side in order:
                logger.info("%s, repeat %d: %s", unit, rep + 1, side)
                got[side] = run_seed(args, unit, model, qfile, images, out) if side == "seed" else \
                    run_project(args, unit, model, out)
            report["units"][unit]["pairs"].append(got)
    print(f"{'unit':<10} {'seed CPU s':>10} {'project CPU s':>13} {'seed/project':>12} {'(wall)':>7}  "
          "identical outputs")
    for unit in units:
        pairs = report["units"][unit]["pairs"]
        summary = {f"{side}_{kind}": statistics.median(p[side][kind] for p in pairs)
                   for side in ("seed", "project") for kind in ("seconds", "cpu_seconds")}
        ratio = statistics.median(p["seed"]["cpu_seconds"] / p["project"]["cpu_seconds"] for p in pairs)
        wall_ratio = statistics.median(p["seed"]["seconds"] / p["project"]["seconds"] for p in pairs)
        last = pairs[-1]
        same = {key: identical(last["seed"], last["project"], key)
                for key in ("direct", "flagged", "caption", "safe") if key in last["project"]}
        report["units"][unit].update(ratio=ratio, wall_ratio=wall_ratio, identical=same, **summary)
        print(f"{unit:<10} {summary['seed_cpu_seconds']:>10.1f} {summary['project_cpu_seconds']:>13.1f} "
              f"{ratio:>12.2f} {wall_ratio:>7.2f}  " + ", ".join(f"{k} {v}" for k, v in same.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
