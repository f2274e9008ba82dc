"""The base model vs the fine-tuned one, direct answers (no ECSO) on a held-out safety set and on a utility set,
scored with the project's metrics:

    python -m llava.train.compare --model-path checkpoints/llava-v1.5-7b-ecso-lora \\
        --model-base liuhaotian/llava-v1.5-7b \\
        --safety-benchmark vlsafe --safety-question-file data/vlsafe/examine_sampled_500_VLSafe.jsonl \\
        --safety-image-folder coco/train2017 --utility-benchmark mme --utility-question-file llava_mme.jsonl \\
        --utility-image-folder MME_Benchmark_release_version --utility-gt-file data/mme/llava_mme_gt.jsonl \\
        --judge-model gpt-4o --out runs/compare

Each model answers each set with the generation runner (``OUT/<set>/<base|tuned>.jsonl`` with their manifests:
resumable, so a rerun only does what is missing); answers of a benchmark that is judged are judged, by default with
the refusal-match judge (no endpoint), or by an LLM with --judge-model (any OpenAI-compatible endpoint:
--judge-base-url, key from OPENAI_API_KEY; --judge-model '' judges none); the metrics are the ones
``llava.eval.metrics`` computes. Writes ``OUT/compare.md`` and ``OUT/compare.json``.
Exit status: 0 done, 1 a generation or judge run is incomplete (rerun to resume), 2 error.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llava.cli_args import add_backend_args, add_decoding_args, add_model_args, backend_from_args, setup_logging
from llava.ecso.config import ecso_config_from_args
from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks import add_benchmark_arguments, config_from_args, get_benchmark
from llava.eval.gen.config import GenerateConfig
from llava.eval.gen.manifest import write_manifest
from llava.eval.gen.runner import run_generation
from llava.eval.jsonl import read_jsonl
from llava.eval.judge.cli import add_judge_flags
from llava.eval.judge.cli import config_from_args as judge_config_from_args
from llava.eval.judge.local import REFUSAL_MATCH, local_judge
from llava.eval.judge.runner import JudgeRunner
from llava.eval.metrics.registry import compute
from llava.eval.metrics.stats import rate_text

__all__ = ["SETS", "MODELS", "build_parser", "compare", "main"]

logger = logging.getLogger("llava.train.compare")
SETS = ("safety", "utility")
MODELS = ("base", "tuned")


class _Incomplete(ECSOError):
    code = "incomplete"


class _Flags:
    """Adds another module's flags renamed by ``rename`` (``--benchmark`` -> ``--safety-benchmark``) and optional,
    remembering each flag's own dest in ``dests`` (own -> renamed): one declaration of the benchmark and judge
    flags serves each set here, and :func:`_own` gives a consumer the namespace it expects."""

    def __init__(self, target: Any, rename: Callable[[str], str], dests: dict[str, str] | None = None) -> None:
        self._target, self._rename = target, rename
        self.dests = {} if dests is None else dests

    def add_argument_group(self, title: str, *args: Any, **kwargs: Any) -> _Flags:
        return _Flags(self._target.add_argument_group(title, *args, **kwargs), self._rename, self.dests)

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        longs = [f for f in flags if f.startswith("--")]
        own = kwargs.pop("dest", None) or longs[0][2:].replace("-", "_")
        renamed = [self._rename(f) for f in longs]
        kwargs.update(required=False, dest=renamed[0][2:].replace("-", "_"))
        self.dests[own] = kwargs["dest"]
        return self._target.add_argument(*renamed, **kwargs)


def _own(args: argparse.Namespace, flags: _Flags) -> argparse.Namespace:
    return argparse.Namespace(**{own: getattr(args, renamed) for own, renamed in flags.dests.items()})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _Flags]]:
    """The parser, and the renamed flag groups (``safety``, ``utility``, ``judge``) to read back with :func:`_own`."""
    p = argparse.ArgumentParser(prog="python -m llava.train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="folder for the answers, judgments, compare.md and compare.json")
    g.add_argument("--base-model", default=None,
                   help="the model the fine-tuned one is compared with (default: --model-base)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="count", default=0, help="-v: debug logs")
    groups = {name: _Flags(p, lambda f, n=name: f"--{n}-{f[2:]}") for name in SETS}
    for flags in groups.values():
        add_benchmark_arguments(flags)  # type: ignore[arg-type]
    add_model_args(p, default_model=None)
    add_backend_args(p)
    add_decoding_args(p, temperature=0.0, max_new_tokens=1024)
    groups["judge"] = _Flags(p.add_argument_group("judge (safety sets are scored by their judgments; '' judges none)"),
                             lambda f: f if f.startswith("--judge-") else f"--judge-{f[2:]}")
    add_judge_flags(groups["judge"], judge_model=REFUSAL_MATCH.name)  # type: ignore[arg-type]
    groups["judge"].add_argument("--ground-truth", default=None,
                                 help="graded benchmarks (MM-Vet): the ground truth the judge grades against")
    return p, groups


def _set_args(args: argparse.Namespace, name: str, flags: _Flags) -> argparse.Namespace | None:
    """The set's benchmark flags under their own names (None when the set is not given)."""
    own = _own(args, flags)
    if not own.benchmark:
        return None
    if not own.question_file:
        raise InvalidRequestError(f"--{name}-benchmark needs --{name}-question-file")
    return own


@dataclass
class _Model:
    label: str
    args: argparse.Namespace  # model flags for backend_from_args


def _models(args: argparse.Namespace) -> list[_Model]:
    base = args.base_model or args.model_base
    if args.model_path is None or base is None:
        raise InvalidRequestError("--model-path (the fine-tuned checkpoint) and --model-base (or --base-model) are "
                                  "required: the two models compared")
    plain = copy.copy(args)
    plain.model_path, plain.model_base = base, None
    return [_Model("base", plain), _Model("tuned", args)]


def _judge(judge: argparse.Namespace, benchmark: str, answers: Path) -> Path | None:
    """Judge an answer file when its benchmark is judged and the judge can judge it (a benchmark graded against
    ground truth, MM-Vet, needs an LLM grader, not refusal-match); the judgments file or None."""
    protocol = get_benchmark(benchmark).judge
    if not judge.judge_model or protocol is None:
        return None
    if protocol.grading is not None and local_judge(judge.judge_model) is not None:
        logger.warning("%s is graded against its ground truth by an LLM; --judge-model %s cannot grade it: not scored",
                       benchmark, judge.judge_model)
        return None
    config = judge_config_from_args(judge, benchmark=benchmark, output_dir=answers.parent,
                                    output_stem=answers.name.removesuffix(".jsonl"),
                                    ground_truth=Path(judge.ground_truth) if judge.ground_truth else None)
    runner = JudgeRunner(config)
    runner.run(read_jsonl(answers, log=True))
    if not runner.summary.complete:
        raise _Incomplete(f"judging {answers} is incomplete ({len(runner.summary.failed)} failed); rerun to resume")
    return config.judgments_path


def _summary(benchmark: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers compared: the overall harmless rates for a safety benchmark, the spec's report_keys otherwise."""
    spec = get_benchmark(benchmark)
    if spec.report_keys:
        return {k: metrics.get(k) for k in spec.report_keys}
    overall = metrics.get("overall") or {}
    return {"harmless_rate_paper": overall.get("harmless_rate_paper"),
            "harmless_rate_mmsb": overall.get("harmless_rate_mmsb"), "n": metrics.get("n_answers"),
            "n_judged": metrics.get("n_judged")}


def _evaluate(args: argparse.Namespace, judge: argparse.Namespace, name: str, set_args: argparse.Namespace,
              model: _Model) -> dict[str, Any]:
    out = Path(args.out) / name / f"{model.label}.jsonl"
    config = GenerateConfig(benchmark=set_args.benchmark, data=config_from_args(set_args), answers_file=out,
                            method="direct", ecso=ecso_config_from_args(args), batch_size=args.batch_size,
                            progress=not args.no_progress, model_id=model.label)
    summary = run_generation(config, lambda: backend_from_args(model.args))
    if summary.status != "complete":
        raise _Incomplete(f"{out} is {summary.status}; rerun to resume")
    judgments = _judge(judge, set_args.benchmark, out)
    if get_benchmark(set_args.benchmark).judge is not None and judgments is None:
        return {"answers": str(out), "judged": False, "metrics": None}
    metrics = compute(set_args.benchmark, out, judgments, None)
    return {"answers": str(out), "judged": judgments is not None, "metrics": _summary(set_args.benchmark, metrics)}


def compare(args: argparse.Namespace, groups: dict[str, _Flags]) -> dict[str, Any]:
    """Answer, judge and score every given set with both models; writes compare.json and compare.md."""
    sets = {name: a for name in SETS if (a := _set_args(args, name, groups[name])) is not None}
    judge = _own(args, groups["judge"])
    if not sets:
        raise InvalidRequestError("give a --safety-benchmark or a --utility-benchmark set (or both)")
    models = _models(args)
    result: dict[str, Any] = {"models": {m.label: {"model_path": m.args.model_path, "model_base": m.args.model_base}
                                         for m in models}, "sets": {}}
    for name, set_args in sets.items():
        result["sets"][name] = {"benchmark": set_args.benchmark, "question_file": str(set_args.question_file),
                                **{m.label: _evaluate(args, judge, name, set_args, m) for m in models}}
    out = Path(args.out)
    write_manifest(out / "compare.json", result)
    (out / "compare.md").write_text(_markdown(result), encoding="utf-8")
    return result


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "k" in value:
        return rate_text(value)
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _markdown(result: dict[str, Any]) -> str:
    models = result["models"]
    lines = ["# Base vs fine-tuned: direct answers", "",
             f"base: `{models['base']['model_path']}`; tuned: `{models['tuned']['model_path']}` "
             f"(on `{models['tuned']['model_base']}`)", ""]
    for name, s in result["sets"].items():
        lines += [f"## {name}: {s['benchmark']} (`{s['question_file']}`)", ""]
        base, tuned = s["base"]["metrics"], s["tuned"]["metrics"]
        if base is None or tuned is None:
            lines += ["_not scored: this set needs judgments (see the log)_", ""]
            continue
        lines += ["| metric | base | tuned |", "|---|---|---|"]
        lines += [f"| {key} | {_cell(base[key])} | {_cell(tuned[key])} |" for key in base]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, groups = build_parser()
    args = parser.parse_args(argv)
    setup_logging(1 + args.verbose)
    try:
        result = compare(args, groups)
    except _Incomplete as exc:
        logger.warning("%s", exc)
        return 1
    except (ECSOError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps({name: {m: s[m]["metrics"] for m in MODELS} for name, s in result["sets"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
