"""Judges that need no endpoint, chosen by name like a judge model (``--judge-model refusal-match``).

A local judge is a prompt set of one prompt (its template is the answer itself) and a function that replies to it,
so it runs through the same runner as an LLM judge: the same tasks, resume, judgments file, summary and parser
(its reply is JSON, read by the ``refusal`` verdict kind), and metrics and reports read its judgments unchanged.
Its "prompt set" hash is the hash of its rules, so judgments written under another version of the rules are
refused on resume. It sends no request and keeps no cache on disk.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from llava.errors import InvalidRequestError
from llava.eval import refusal_match
from llava.eval.judge.client import Completion, RequestStats
from llava.eval.judge.prompts import JudgePrompt, JudgePromptSet

__all__ = ["LocalJudge", "LocalJudgeClient", "LOCAL_JUDGES", "local_judge", "REFUSAL_MATCH"]


@dataclass(frozen=True)
class LocalJudge:
    """``reply``: the judge's text for an answer; ``rules``: what the judge applies (its hash versions the
    judgments); ``verdict_kind``: the parser of its replies (``llava.eval.judge.parsers``)."""

    name: str
    summary: str
    verdict_kind: str
    rules: str
    reply: Callable[[str], str]

    def prompt_set(self) -> JudgePromptSet:
        prompt = JudgePrompt(self.name, "", "{answer}", self.verdict_kind, self.verdict_kind)
        sha = hashlib.sha256(self.rules.encode("utf-8")).hexdigest()
        return JudgePromptSet(f"{refusal_match.__name__} ({self.name})", sha, {prompt.name: prompt})

    def mode(self, requested: str) -> str:
        """The prompt every answer is judged with: this judge's own (``--mode auto`` or its name)."""
        if requested not in ("auto", self.name):
            raise InvalidRequestError(f"--judge-model {self.name} judges every answer itself; --mode {requested!r} "
                                      f"names an LLM judge prompt (leave --mode at auto)")
        return self.name


class LocalJudgeClient:
    """Stands in for :class:`~llava.eval.judge.client.JudgeClient`: the reply comes from the local judge applied to
    the answer (the last message), no request is sent."""

    def __init__(self, judge: LocalJudge):
        self.judge = judge
        self.stats = RequestStats(None)

    def complete(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        return Completion(self.judge.reply(messages[-1]["content"]), attempts=1)


def _refusal_reply(answer: str) -> str:
    return json.dumps(refusal_match.classify(answer).to_dict(), ensure_ascii=False)


def _refusal_rules() -> str:
    return json.dumps({"cues": refusal_match.REFUSAL_CUES, "pivots": refusal_match.PIVOTS,
                       "opening_chars": refusal_match.OPENING_CHARS,
                       "partial_min_chars": refusal_match.PARTIAL_MIN_CHARS})


REFUSAL_MATCH = LocalJudge(
    name="refusal-match",
    summary="phrase/pattern refusal classifier, no endpoint (llava/eval/refusal_match.py): an answer that refuses "
            "is labelled safe, one that does not unsafe",
    verdict_kind="refusal",
    rules=_refusal_rules(),
    reply=_refusal_reply,
)
LOCAL_JUDGES: dict[str, LocalJudge] = {REFUSAL_MATCH.name: REFUSAL_MATCH}


def local_judge(name: str) -> LocalJudge | None:
    """The local judge called ``name``; None when ``name`` is a model of an endpoint."""
    return LOCAL_JUDGES.get(name)
