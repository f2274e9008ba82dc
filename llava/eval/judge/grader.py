"""Grading against ground truth in MM-Vet's style, for benchmarks whose judge protocol has ``grading``: a few-shot
table prompt (question | ground truth | prediction | score) whose last row the judge completes; the score is the
first token of the reply, a number in [0, 1]. When the reply is not such a number, the request is repeated with a
digit-only suffix and the temperature raised by 0.5, up to ``tries`` replies; after that the sample scores 0.0
(MM-Vet's rule) and the judgment keeps ``parse_error``.

The project ships its own table (``judge_prompts/mmvet_grader.jsonl``). A grader's own prompt text (e.g. MM-Vet's)
can be passed as a plain-text file: ``prompt_set_from_preamble`` appends the row
``{question} | {ground_truth} | {answer} | `` exactly as MM-Vet builds it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from llava.eval.judge.client import JudgeClient
from llava.eval.judge.parsers import Verdict, parse_score01
from llava.eval.judge.prompts import JudgePrompt, JudgePromptSet, load_prompt_set
from llava.eval.judge.protocols import JudgeTask

__all__ = ["grade", "verdict_from_payload", "prompt_set_from_preamble", "load_grader_prompts", "DEFAULT_RETRY_SUFFIX"]

DEFAULT_RETRY_SUFFIX = "\nReply with the correctness score only, a number from 0.0 to 1.0: "
ROW_TEMPLATE = "\n{question} | {ground_truth} | {answer} | "


def grade(client: JudgeClient, task: JudgeTask, tries: int) -> dict[str, Any]:
    """Ask until a reply parses (at most ``tries`` replies). Payload: every reply text, for the cache."""
    replies: list[str] = []
    temperature = float(task.params.get("temperature", 0.0))
    attempts = 0
    for i in range(tries):
        messages = task.messages if i == 0 else task.retry_messages
        done = client.complete(messages, **dict(task.params, temperature=temperature))
        attempts += done.attempts
        replies.append(done.text)
        if parse_score01(done.text).ok:
            break
        temperature += 0.5
    return {"raw": replies[-1], "replies": replies, "attempts": attempts}


def verdict_from_payload(payload: dict[str, Any]) -> Verdict:
    """The first reply that parses gives the score; none parsing gives 0.0 with the error kept."""
    replies = payload.get("replies") or [payload.get("raw", "")]
    for text in replies:
        v = parse_score01(text)
        if v.ok:
            return v
    return Verdict(score=0.0, error=f"no score in {len(replies)} replies; scored 0.0 (MM-Vet's rule)")


def prompt_set_from_preamble(path: str | os.PathLike, name: str) -> JudgePromptSet:
    """A plain-text few-shot preamble (e.g. MM-Vet's own) as a one-prompt set whose prompt is called ``name``."""
    data = Path(path).read_bytes()
    preamble = data.decode("utf-8").rstrip("\n")
    prompt = JudgePrompt(name, "", preamble + ROW_TEMPLATE, "score", "score01", {"retry_suffix": DEFAULT_RETRY_SUFFIX})
    return JudgePromptSet(str(path), hashlib.sha256(data).hexdigest(), {prompt.name: prompt})


def load_grader_prompts(path: str | os.PathLike, name: str) -> JudgePromptSet:
    """A ``.jsonl`` prompt set, or any other file read as a plain-text preamble (its prompt called ``name``)."""
    return load_prompt_set(path) if str(path).endswith(".jsonl") else prompt_set_from_preamble(path, name)
