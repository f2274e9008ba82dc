"""LLM judge over an OpenAI-compatible API: prompt sets as data, verdict parsers, a persistent cache, bounded
retries and concurrency, resumable append-only judgments. ``python -m llava.eval.judge --help`` for the CLI;
``judge_answers(rows, config)`` for library use. User docs: docs/judge-and-metrics.md."""
from llava.eval.judge.cache import JudgeCache
from llava.eval.judge.client import BudgetExhaustedError, JudgeClient, RequestStats
from llava.eval.judge.config import JudgeConfig, RetryPolicy
from llava.eval.judge.parsers import Verdict, parse_verdict
from llava.eval.judge.prompts import JudgePrompt, JudgePromptSet, PromptSetError, default_prompt_set, load_prompt_set
from llava.eval.judge.records import Judgment, read_judgments
from llava.eval.judge.runner import JudgeRunner, JudgeSummary, judge_answers

__all__ = [
    "JudgeCache",
    "JudgeClient",
    "RequestStats",
    "BudgetExhaustedError",
    "JudgeConfig",
    "RetryPolicy",
    "Verdict",
    "parse_verdict",
    "JudgePrompt",
    "JudgePromptSet",
    "PromptSetError",
    "default_prompt_set",
    "load_prompt_set",
    "Judgment",
    "read_judgments",
    "JudgeRunner",
    "JudgeSummary",
    "judge_answers",
]
