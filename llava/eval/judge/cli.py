"""``python -m llava.eval.judge``: judge an answer file with an LLM over an OpenAI-compatible API.

Exit status: 0 every answer judged (unparseable verdicts included: they are counted, see the summary);
2 bad input; 3 incomplete (requests failed or the budget ran out: rerun to resume); 4 credentials rejected.
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from pathlib import Path

from llava.errors import AuthError, InvalidRequestError
from llava.eval.benchmarks import benchmark_names, get_benchmark
from llava.eval.jsonl import AnswerFileWriteError, read_jsonl
from llava.eval.judge.config import JudgeConfig, RetryPolicy
from llava.eval.judge.local import LOCAL_JUDGES
from llava.eval.judge.runner import JudgeRunner

__all__ = ["build_parser", "config_from_args", "main", "run_cli"]

logger = logging.getLogger(__name__)
EXIT_OK, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_AUTH = 0, 2, 3, 4


def add_judge_flags(p: argparse.ArgumentParser, judge_model: str | None = None) -> None:
    """Flags shared with the seed-compatible entry point (``gpt4_vlsafe.py``); ``judge_model``: a default judge
    model (None: the flag is required)."""
    p.add_argument("--judge-model", required=judge_model is None, default=judge_model,
                   help="model name sent to the endpoint, e.g. gpt-4o or the served name; or a judge that needs no "
                        "endpoint: " + ", ".join(f"{j.name} ({j.summary})" for j in LOCAL_JUDGES.values())
                        + (f" (default {judge_model})" if judge_model else ""))
    p.add_argument("--judge-base-url", default=None,
                   help="OpenAI-compatible base URL ending in /v1 (default: $OPENAI_BASE_URL, else api.openai.com). "
                        "The key is always read from $OPENAI_API_KEY, never from a flag")
    p.add_argument("--judge-file", type=Path, default=None,
                   help="prompt set JSONL (name, system_prompt, prompt_template, output_format per line); the "
                        "paper's vlsafe_judge.jsonl works unchanged. Default: the project's own set. For a "
                        "benchmark graded against ground truth a plain-text few-shot preamble (e.g. MM-Vet's prompt) "
                        "is accepted too")
    p.add_argument("--parallel", type=int, default=30, help="concurrent requests (default 30)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as a timeout")
    p.add_argument("--max-attempts", type=int, default=6, help="attempts per request incl. the first (default 6)")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay in seconds, doubled per retry")
    p.add_argument("--backoff-max", type=float, default=60.0, help="cap on a retry delay in seconds")
    p.add_argument("--max-retry-after", type=float, default=300.0, help="cap on a server's Retry-After in seconds")
    p.add_argument("--max-requests", type=int, default=None,
                   help="budget: most HTTP requests this run may send, retries included; the rest stay pending")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per reply (default: endpoint's default)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--cache", type=Path, default=None,
                   help="sqlite cache shared across runs (default: <output>/judge_cache.sqlite)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=Path, required=True, help="answer file (JSONL, docs/answer-format.md)")
    judged = {name: get_benchmark(name) for name in benchmark_names(has="judge")}
    p.add_argument("--benchmark", choices=list(judged), required=True,
                   help="protocol: " + ", ".join(f"{name} ({spec.judge.summary})" for name, spec in judged.items()))
    p.add_argument("--mode", default="auto",
                   help="'auto' picks the benchmark's protocol (a prompt per answer where the protocol says so, e.g. "
                        "per scenario); a prompt name (llm_binary_strict, query_safety, ...) judges every answer "
                        "with that prompt")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for <answers stem>[.<field>].judgments.jsonl and .judge.json (default: the answers' folder)")
    p.add_argument("--answer-field", default="text",
                   help="field judged: 'text' (final answer, the default), 'direct' (an ECSO row's direct answer, for "
                        "harm-detector labels and the threshold sweep) or 'safe_answer' (a --force-all-steps row's "
                        "safe answer, for the threshold sweep)")
    graded = [f"{name}: {spec.judge.grading.ground_truth_file}" for name, spec in judged.items() if spec.judge.grading]
    p.add_argument("--ground-truth", type=Path, default=None,
                   help=f"benchmarks graded against ground truth: the ground truth ({'; '.join(graded)})")
    add_judge_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace, **overrides) -> JudgeConfig:
    retry = RetryPolicy(max_attempts=args.max_attempts, base_delay=args.backoff_base, max_delay=args.backoff_max,
                        max_retry_after=args.max_retry_after)
    fields = dict(
        judge_model=args.judge_model, base_url=args.judge_base_url, judge_file=args.judge_file,
        parallel=args.parallel, timeout=args.timeout, temperature=args.temperature, max_tokens=args.max_tokens,
        max_requests=args.max_requests, retry=retry, cache_path=args.cache,
    )
    if hasattr(args, "answers"):
        fields.update(benchmark=args.benchmark, mode=args.mode, answer_field=args.answer_field,
                      output_dir=args.output or args.answers.parent, output_stem=args.answers.name.removesuffix(".jsonl"),
                      ground_truth=args.ground_truth)
    fields.update(overrides)
    return JudgeConfig(**fields)


def run_cli(config: JudgeConfig, answers: Path) -> int:
    """Run and map errors to exit codes (the one place where judge errors meet the user)."""
    try:
        rows = read_jsonl(answers, log=True)
        runner = JudgeRunner(config)
        runner.run(rows)
    except AuthError as e:
        logger.error("%s", e)
        return EXIT_AUTH
    except (InvalidRequestError, ValueError, OSError) as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    except (AnswerFileWriteError, sqlite3.Error) as e:  # a full disk, an unwritable --output or --cache
        logger.error("cannot write the results: %s", e)
        return EXIT_BAD_INPUT
    s = runner.summary
    print(json.dumps({"judgments": str(config.judgments_path), **s.to_dict(), "unparseable_ids": s.unparseable[:20]}))
    if not s.complete:
        logger.warning("incomplete: %d failed, %d pending; rerun the same command to resume", len(s.failed), len(s.pending))
        return EXIT_INCOMPLETE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except ValueError as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    return run_cli(config, args.answers)


if __name__ == "__main__":
    sys.exit(main())
