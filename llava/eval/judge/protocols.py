"""Which prompt judges which answer, and the task list a run sends. Each benchmark's protocol is its spec's
``judge`` (``llava.eval.benchmarks``): the prompt name, or a function of the answer row naming it (per-scenario
prompts), and for benchmarks graded against ground truth, how to fill the grader's prompt.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from llava.errors import InvalidRequestError
from llava.eval.benchmarks import BENCHMARKS, Grading, JudgeProtocol, benchmark_names, get_benchmark
from llava.eval.judge.prompts import JudgePrompt, JudgePromptSet
from llava.eval.judge.records import CARRIED_FIELDS, answer_id

__all__ = [
    "JudgeTask",
    "judge_protocol",
    "grading_for",
    "prompt_name_for",
    "build_tasks",
    "cache_key",
]

@dataclass(frozen=True)
class JudgeTask:
    """One judge request (or, for MM-Vet, one grading loop) for one answer."""

    id: str
    prompt: JudgePrompt
    messages: list[dict[str, str]]
    key: str
    params: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    retry_messages: list[dict[str, str]] | None = None


def judge_protocol(benchmark: str) -> JudgeProtocol:
    """The judge protocol of a registered benchmark; an error naming the judged benchmarks otherwise."""
    protocol = get_benchmark(benchmark).judge
    if protocol is None:
        raise InvalidRequestError(f"benchmark {benchmark!r} is not judged; judged benchmarks: "
                                  f"{', '.join(benchmark_names(has='judge'))}")
    return protocol


def grading_for(benchmark: str) -> Grading | None:
    """How a benchmark is graded against ground truth; None when it is not (or is not a judged benchmark: an
    explicit ``--mode`` prompt may judge any answer file)."""
    spec = BENCHMARKS.get(benchmark)
    return spec.judge.grading if spec is not None and spec.judge is not None else None


def prompt_name_for(benchmark: str, mode: str, row: dict[str, Any]) -> str:
    return mode if mode != "auto" else judge_protocol(benchmark).prompt_for(row)


def cache_key(model: str, prompt_name: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 over (judge model, prompt name, the filled messages, sampling parameters)."""
    blob = json.dumps([model, prompt_name, messages, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _values(benchmark: str, row: dict[str, Any], rid: str, answer_field: str, gt: dict | None) -> dict[str, Any]:
    answer = row.get(answer_field)
    if answer is None:
        raise InvalidRequestError(f"answer {rid!r} has no {answer_field!r} field (fields: {sorted(row)})")
    values = {"question": row.get("query", row.get("prompt", row.get("instruction"))), "answer": answer,
              "critic": row.get("analyze")}
    grading = grading_for(benchmark)
    if grading is not None:
        values.update(grading.values(row, rid, gt or {}))
    return values


def build_tasks(
    rows: Iterable[dict[str, Any]],
    *,
    benchmark: str,
    mode: str,
    prompts: JudgePromptSet,
    judge_model: str,
    params: dict[str, Any],
    answer_field: str = "text",
    ground_truth: dict[str, Any] | None = None,
) -> list[JudgeTask]:
    """One task per answer row, in input order. Duplicate ids are an error (judgments are keyed by id)."""
    tasks: list[JudgeTask] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows, 1):
        rid = answer_id(row, lineno)
        if rid in seen:
            raise InvalidRequestError(f"duplicate answer id {rid!r} (rows {seen[rid]} and {lineno})")
        seen[rid] = lineno
        prompt = prompts.get(prompt_name_for(benchmark, mode, row))
        values = _values(benchmark, row, rid, answer_field, ground_truth)
        messages = prompt.messages(**values)
        task_params = dict(params, max_tokens=3) if prompt.verdict_kind == "score01" else dict(params)
        retry = None
        if prompt.verdict_kind == "score01":
            retry = [{"role": m["role"], "content": m["content"]} for m in messages]
            retry[-1]["content"] += prompt.extra.get("retry_suffix", "")
        fields = {k: row[k] for k in CARRIED_FIELDS if k in row}
        fields.setdefault("benchmark", benchmark)
        key = cache_key(judge_model, prompt.name, messages, task_params)
        tasks.append(JudgeTask(rid, prompt, messages, key, task_params, fields, retry))
    return tasks
