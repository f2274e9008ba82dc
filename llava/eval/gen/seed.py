"""The seed's (and LLaVA's) evaluation entry points, kept with their flags and defaults and mapped onto
``llava.eval.generate``: ``python -m llava.eval.model_vlsafe --model-path ... --question-file ... --answers-file ...``.

- LLaVA's flags keep their meaning: ``--model-path --model-base --image-folder --question-file --answers-file
  --conv-mode --num-chunks --chunk-idx --temperature --top_p --num_beams --max_new_tokens`` (defaults as the seed's
  scripts had them: temperature 0.2, conv-mode llava_v1, max_new_tokens per script).
- "tell_ask"/"ask_unsafe" entries run ECSO. Their ``--question-file`` may be, as in the seed's two-pass scripts, the
  answer file of a direct run: its manifest then names the benchmark data and the direct answers are checked
  (``--from-answers``). A benchmark question file runs all four steps instead.
- Any other flag (``--batch-size``, ``--verdict exact``, ``--limit``, ``-v`` ...) is passed on to generate.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava.cli_args import setup_logging
from llava.errors import ECSOError, InvalidRequestError, UnsupportedError
from llava.eval import generate
from llava.eval.gen.manifest import load_manifest, manifest_path

__all__ = ["SeedEntry", "SEED_ENTRIES", "build_seed_parser", "translate", "seed_main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedEntry:
    """One seed script. ``benchmark`` None: MME or MM-Vet, told apart by the question file's rows (LLaVA's MME
    file uses the image path as question_id); ``--benchmark`` overrides."""

    name: str
    summary: str
    benchmark: str | None
    method: str
    max_new_tokens: int
    image_in_safe_step: bool = False  # the seed's utility scripts kept the image in step 4
    has_mode: bool = False
    has_image_folder: bool = True
    mmbench_flags: bool = False


SEED_ENTRIES: dict[str, SeedEntry] = {e.name: e for e in (
    SeedEntry("model_vlsafe", "VLSafe direct answers", "vlsafe", "direct", 2048),
    SeedEntry("model_vlsafe_tell_ask", "VLSafe ECSO (tell = caption, ask = harm check)", "vlsafe", "ecso", 1024),
    SeedEntry("model_mmsafe", "MM-SafetyBench direct answers", "mmsafetybench", "direct", 2048, has_mode=True),
    SeedEntry("model_mmsafe_tell_ask", "MM-SafetyBench ECSO", "mmsafetybench", "ecso", 1024, has_mode=True),
    SeedEntry("model_vqa_loader", "MME / MM-Vet direct answers (LLaVA's loader script)", None, "direct", 128),
    SeedEntry("model_vqa", "MME / MM-Vet direct answers (LLaVA's VQA script)", None, "direct", 1024),
    SeedEntry("model_vqa_mmbench", "MMBench direct answers", "mmbench", "direct", 128, has_image_folder=False,
              mmbench_flags=True),
    SeedEntry("model_vqa_ask_unsafe", "MME / MM-Vet ECSO", None, "ecso", 1024, image_in_safe_step=True),
    SeedEntry("model_mmbench_ask_unsafe", "MMBench ECSO", "mmbench", "ecso", 1024, image_in_safe_step=True,
              has_image_folder=False),
)}


def build_seed_parser(entry: SeedEntry) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m llava.eval.{entry.name}",
        description=f"{entry.summary}: the seed's {entry.name}.py flags over llava.eval.generate. Flags not listed "
                    "here are passed to generate (see python -m llava.eval.generate --help).")
    p.add_argument("--model-path", required=True, help="checkpoint folder or hub id ('tiny' for a test model)")
    p.add_argument("--model-base", default=None, help="base model for LoRA checkpoints")
    if entry.has_image_folder:
        p.add_argument("--image-folder", default="", help="root of the images named in the question file")
    p.add_argument("--question-file", required=True,
                   help="the benchmark's question file" + (", or the answer file of a direct run (two-pass ECSO)"
                                                           if entry.method == "ecso" else ""))
    p.add_argument("--answers-file", default="answer.jsonl", help="output JSON lines (resumed when it exists)")
    p.add_argument("--conv-mode", default="llava_v1", help="chat template (llava_v1 = vicuna_v1 for LLaVA-1.5)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into N contiguous chunks ...")
    p.add_argument("--chunk-idx", type=int, default=0, help="... and answer chunk K")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (the seed's scripts pass 0)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--num_beams", type=int, default=1, help="beam count")
    p.add_argument("--max_new_tokens", type=int, default=entry.max_new_tokens,
                   help=f"new tokens per generated step (default {entry.max_new_tokens}, as the seed's script)")
    if entry.has_mode:
        p.add_argument("--mode", default=None, help="SD, TYPO, SD_TYPO (default) or text")
    if entry.benchmark is None:
        p.add_argument("--benchmark", default=None, choices=["mme", "mmvet"],
                       help="default: read from the question file's rows")
    if entry.mmbench_flags:
        p.add_argument("--single-pred-prompt", action="store_true",
                       help="accepted; the single-prediction prompt is always used (LLaVA-1.5's mmbench.sh sets it)")
        p.add_argument("--all-rounds", action="store_true", help="not supported (circular option rotation)")
        p.add_argument("--lang", default="en", help="only 'en'")
    return p


def _vqa_benchmark(question_file: str) -> str:
    with open(question_file, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise InvalidRequestError(f"{question_file} is empty")
    row = json.loads(first)
    return "mme" if str(row.get("question_id")) == str(row.get("image")) else "mmvet"


def _direct_run(question_file: str) -> dict | None:
    """The manifest of a direct run whose answer file is ``question_file`` (two-pass ECSO), else None."""
    manifest = load_manifest(manifest_path(question_file)) if Path(question_file).is_file() else None
    return manifest if manifest and manifest["settings"].get("method") == "direct" else None


def _scenario_parent(entry: SeedEntry, image_folder: str, question_file: str) -> str:
    """The seed passed MM-SafetyBench's per-scenario folder (``images/{scenario}``); the reader wants ``images``."""
    if entry.has_mode and image_folder and Path(image_folder).name == Path(question_file).stem:
        return str(Path(image_folder).parent)
    return image_folder


def _data_args(entry: SeedEntry, args: argparse.Namespace) -> list[str]:
    """--benchmark/--question-file/--image-folder/--mode(/--from-answers) for generate."""
    image_folder = getattr(args, "image_folder", "")
    mode = getattr(args, "mode", None)
    direct = _direct_run(args.question_file) if entry.method == "ecso" else None
    if direct is not None:
        s, inputs = direct["settings"], direct["inputs"]
        logger.info("%s is a direct run's answer file: ECSO checks its answers (two-pass)", args.question_file)
        if mode is not None and mode != s["data"].get("mode"):
            raise InvalidRequestError(f"--mode {mode} but the direct answers in {args.question_file} are mode "
                                      f"{s['data'].get('mode')}")
        image_folder = _scenario_parent(entry, image_folder, inputs["question_file"]) or inputs["image_folder"]
        out = ["--benchmark", s["benchmark"], "--question-file", inputs["question_file"],
               "--image-folder", image_folder, "--from-answers", args.question_file]
        out += ["--mode", s["data"]["mode"]] if s["data"].get("mode") else []
        out += ["--scenarios", ",".join(s["data"]["scenarios"])] if s["data"].get("scenarios") else []
        for flag, key in (("--tiny-list", "tiny_list"), ("--gt-file", "gt_file")):
            out += [flag, inputs[key]] if inputs.get(key) else []
        return out
    benchmark = entry.benchmark or getattr(args, "benchmark", None) or _vqa_benchmark(args.question_file)
    image_folder = _scenario_parent(entry, image_folder, args.question_file)
    out = ["--benchmark", benchmark, "--question-file", args.question_file]
    out += ["--image-folder", image_folder] if image_folder else []
    return out + (["--mode", mode] if mode else [])


def translate(entry: SeedEntry, args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The generate command line equivalent to a seed invocation."""
    if entry.mmbench_flags:
        if args.all_rounds:
            raise UnsupportedError("--all-rounds (circular option rotation) is not supported: the reader asks every "
                                   "tsv row once, circular copies included")
        if args.lang != "en":
            raise UnsupportedError(f"--lang {args.lang!r}: only 'en' prompts are supported")
    argv = _data_args(entry, args) + [
        "--method", entry.method, "--model-path", args.model_path, "--answers-file", args.answers_file,
        "--conv-mode", args.conv_mode, "--num-chunks", str(args.num_chunks), "--chunk-idx", str(args.chunk_idx),
        "--temperature", str(args.temperature), "--num_beams", str(args.num_beams),
        "--max_new_tokens", str(args.max_new_tokens)]
    argv += ["--model-base", args.model_base] if args.model_base else []
    argv += ["--top_p", str(args.top_p)] if args.top_p is not None else []
    argv += ["--image-in-safe-step"] if entry.image_in_safe_step else []
    return argv + list(rest)


def seed_main(entry: SeedEntry, argv: list[str] | None = None) -> int:
    args, rest = build_seed_parser(entry).parse_known_args(argv)
    try:
        gen_argv = translate(entry, args, rest)
    except (ECSOError, OSError, json.JSONDecodeError) as exc:
        setup_logging(1)
        logger.error("%s", exc)
        return 2
    logger.debug("generate %s", " ".join(gen_argv))
    return generate.main(gen_argv)
