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
from llava.errors import ECSOError, InvalidRequestError
from llava.eval import generate
from llava.eval.benchmarks import BENCHMARKS, BenchmarkSpec, SeedScript, benchmark_names, get_benchmark
from llava.eval.gen.manifest import load_manifest, manifest_path

__all__ = ["SeedEntry", "SEED_ENTRIES", "build_seed_parser", "translate", "seed_main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedEntry:
    """One seed script: a benchmark's (``BenchmarkSpec.seed_scripts``), or one of LLaVA's generic VQA scripts
    (``benchmark`` None), which serve every benchmark whose spec ``recognizes`` a question-file row; the question
    file's first row tells which (``--benchmark`` overrides)."""

    script: SeedScript
    benchmark: BenchmarkSpec | None = None

    @property
    def name(self) -> str:
        return self.script.name


# LLaVA's generic VQA scripts: they read any LLaVA question file.
_VQA_SCRIPTS = (
    SeedScript("model_vqa_loader", "direct answers to a LLaVA VQA question file (LLaVA's loader script)", "direct",
               128),
    SeedScript("model_vqa", "direct answers to a LLaVA VQA question file (LLaVA's VQA script)", "direct", 1024),
    SeedScript("model_vqa_ask_unsafe", "ECSO answers to a LLaVA VQA question file (the seed's MME and MM-Vet "
               "script: harm check and caption on the center-cropped image, the whole answer checked)", "ecso", 1024,
               image_in_safe_step=True, check_crop=True, truncate_chars=0),
)
SEED_ENTRIES: dict[str, SeedEntry] = {e.name: e for e in (
    *(SeedEntry(script, spec) for spec in BENCHMARKS.values() for script in spec.seed_scripts),
    *(SeedEntry(script) for script in _VQA_SCRIPTS),
)}


def _add_data_flags(p: argparse.ArgumentParser, entry: SeedEntry) -> None:
    spec, script = entry.benchmark, entry.script
    if spec is None or not spec.inline_images:
        p.add_argument("--image-folder", default="", help="root of the images named in the question file")
    p.add_argument("--question-file", required=True,
                   help="the benchmark's question file" + (", or the answer file of a direct run (two-pass ECSO)"
                                                           if script.method == "ecso" else ""))
    if spec is not None and spec.modes:
        p.add_argument("--mode", default=None, help=f"{', '.join(spec.modes)} (default {spec.default_mode})")
    if spec is None:
        p.add_argument("--benchmark", default=None, choices=benchmark_names(has="recognizes"),
                       help="default: read from the question file's rows")
    if script.flags is not None:
        script.flags.add(p)


def build_seed_parser(entry: SeedEntry) -> argparse.ArgumentParser:
    script = entry.script
    p = argparse.ArgumentParser(
        prog=f"python -m llava.eval.{script.name}",
        description=f"{script.summary}: the seed's {script.name}.py flags over llava.eval.generate. Flags not "
                    "listed here are passed to generate (see python -m llava.eval.generate --help).")
    p.add_argument("--model-path", required=True, help="checkpoint folder or hub id ('tiny' for a test model)")
    p.add_argument("--model-base", default=None, help="base model for LoRA checkpoints")
    _add_data_flags(p, entry)
    p.add_argument("--answers-file", default="answer.jsonl", help="output JSON lines (resumed when it exists)")
    p.add_argument("--conv-mode", default="llava_v1",
                   help="chat template (default %(default)s, the seed's default; its shell scripts pass vicuna_v1, "
                        "LLaVA-1.5's, whose system line says 'curious user' where llava_v1's says 'curious human')")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into N contiguous chunks ...")
    p.add_argument("--chunk-idx", type=int, default=0, help="... and answer chunk K")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (the seed's scripts pass 0)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--num_beams", type=int, default=1, help="beam count")
    p.add_argument("--max_new_tokens", type=int, default=script.max_new_tokens,
                   help=f"new tokens per generated step (default {script.max_new_tokens}, as the seed's script)")
    return p


def _recognized_benchmark(question_file: str) -> str:
    """The benchmark whose spec recognizes the first row of a LLaVA VQA question file."""
    with open(question_file, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise InvalidRequestError(f"{question_file} is empty")
    row = json.loads(first)
    found = next((name for name in benchmark_names(has="recognizes") if get_benchmark(name).recognizes(row)), None)
    if found is None:
        raise InvalidRequestError(f"no benchmark recognizes the rows of {question_file}; pass --benchmark")
    return found


def _direct_run(question_file: str) -> dict | None:
    """The manifest of a direct run whose answer file is ``question_file`` (two-pass ECSO), else None."""
    manifest = load_manifest(manifest_path(question_file)) if Path(question_file).is_file() else None
    return manifest if manifest and manifest["settings"].get("method") == "direct" else None


def _seed_image_folder(entry: SeedEntry, image_folder: str, question_file: str) -> str:
    """The benchmark's fix for a seed script's ``--image-folder`` (when its spec has one)."""
    fix = entry.benchmark.seed_image_folder if entry.benchmark is not None else None
    return fix(image_folder, question_file) if fix is not None else image_folder


def _data_args(entry: SeedEntry, args: argparse.Namespace) -> list[str]:
    """--benchmark/--question-file/--image-folder/--mode(/--from-answers) for generate."""
    image_folder = getattr(args, "image_folder", "")
    mode = getattr(args, "mode", None)
    direct = _direct_run(args.question_file) if entry.script.method == "ecso" else None
    if direct is not None:
        s, inputs = direct["settings"], direct["inputs"]
        logger.info("%s is a direct run's answer file: ECSO checks its answers (two-pass)", args.question_file)
        if mode is not None and mode != s["data"].get("mode"):
            raise InvalidRequestError(f"--mode {mode} but the direct answers in {args.question_file} are mode "
                                      f"{s['data'].get('mode')}")
        image_folder = _seed_image_folder(entry, image_folder, inputs["question_file"]) or inputs["image_folder"]
        out = ["--benchmark", s["benchmark"], "--question-file", inputs["question_file"],
               "--image-folder", image_folder, "--from-answers", args.question_file]
        out += ["--mode", s["data"]["mode"]] if s["data"].get("mode") else []
        out += ["--scenarios", ",".join(s["data"]["scenarios"])] if s["data"].get("scenarios") else []
        for flag, key in (("--tiny-list", "tiny_list"), ("--gt-file", "gt_file")):
            out += [flag, inputs[key]] if inputs.get(key) else []
        return out
    benchmark = (entry.benchmark.name if entry.benchmark else None) or getattr(args, "benchmark", None) \
        or _recognized_benchmark(args.question_file)
    image_folder = _seed_image_folder(entry, image_folder, args.question_file)
    out = ["--benchmark", benchmark, "--question-file", args.question_file]
    out += ["--image-folder", image_folder] if image_folder else []
    return out + (["--mode", mode] if mode else [])


def translate(entry: SeedEntry, args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The generate command line equivalent to a seed invocation."""
    script = entry.script
    if script.flags is not None:
        script.flags.check(args)
    argv = _data_args(entry, args) + [
        "--method", script.method, "--model-path", args.model_path, "--answers-file", args.answers_file,
        "--conv-mode", args.conv_mode, "--num-chunks", str(args.num_chunks), "--chunk-idx", str(args.chunk_idx),
        "--temperature", str(args.temperature), "--num_beams", str(args.num_beams),
        "--max_new_tokens", str(args.max_new_tokens)]
    argv += ["--model-base", args.model_base] if args.model_base else []
    argv += ["--top_p", str(args.top_p)] if args.top_p is not None else []
    return argv + script.ecso_args() + list(rest)


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
