"""Judge prompt sets: data files, one JSON object per line with ``name``, ``system_prompt``, ``prompt_template``
and ``output_format`` (optional: ``verdict``, the parser kind, and ``retry_suffix`` for the MM-Vet grader; any
other field, e.g. the paper's ``type``/``description``/``category``, is kept and ignored).

Templates use ``{question}``, ``{answer}`` (and ``{critic}``, ``{ground_truth}``). Filling replaces exactly those
placeholders in one pass and leaves every other character alone, so the paper's file fills byte for byte as its
``str.format`` call did, and answers that contain braces cannot break or inject into a prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llava.errors import InvalidRequestError
from llava.eval.judge.parsers import verdict_kind_for

__all__ = [
    "PLACEHOLDERS",
    "PromptSetError",
    "JudgePrompt",
    "JudgePromptSet",
    "load_prompt_set",
    "default_prompt_set",
    "DEFAULT_PROMPT_FILE",
]

PLACEHOLDERS = ("question", "answer", "critic", "ground_truth")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REQUIRED = {"name": str, "system_prompt": str, "prompt_template": str, "output_format": str}
DEFAULT_PROMPT_FILE = "ecso_default.jsonl"


class PromptSetError(InvalidRequestError):
    """A prompt file that cannot be used; the message names the file and line."""

    code = "invalid_prompt_set"


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str
    output_format: str
    verdict_kind: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_PLACEHOLDER.findall(self.prompt_template)))

    def fill(self, **values: str) -> str:
        """The template with each placeholder replaced by its value (one pass, nothing else touched)."""
        missing = [p for p in self.placeholders if values.get(p) is None]
        if missing:
            raise InvalidRequestError(f"prompt {self.name!r} needs {missing} but got only {sorted(values)}")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.prompt_template)

    def messages(self, **values: str) -> list[dict[str, str]]:
        """OpenAI chat messages: the system prompt (when not empty), then the filled template as the user turn."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": self.fill(**values)})
        return msgs


@dataclass(frozen=True)
class JudgePromptSet:
    source: str
    sha256: str
    prompts: dict[str, JudgePrompt]

    @property
    def name(self) -> str:
        return Path(self.source).name.split(".")[0]

    def get(self, name: str) -> JudgePrompt:
        try:
            return self.prompts[name]
        except KeyError:
            raise PromptSetError(f"{self.source}: no prompt named {name!r}; it has {sorted(self.prompts)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.prompts


def _parse_line(source: str, lineno: int, line: str) -> JudgePrompt:
    where = f"{source} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{where}: invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise PromptSetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in _REQUIRED.items():
        if key not in obj:
            raise PromptSetError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], typ):
            raise PromptSetError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["name"].strip():
        raise PromptSetError(f"{where}: empty 'name'")
    unknown = sorted(set(_PLACEHOLDER.findall(obj["prompt_template"])) - set(PLACEHOLDERS))
    if unknown:
        raise PromptSetError(f"{where}: prompt {obj['name']!r} has unknown placeholders {unknown}; known: {PLACEHOLDERS}")
    try:
        kind = verdict_kind_for(obj["name"], obj["output_format"], obj.get("verdict"))
    except ValueError as e:
        raise PromptSetError(f"{where}: {e}") from None
    extra = {k: v for k, v in obj.items() if k not in _REQUIRED and k != "verdict"}
    return JudgePrompt(obj["name"], obj["system_prompt"], obj["prompt_template"], obj["output_format"], kind, extra)


def _parse(source: str, data: bytes) -> JudgePromptSet:
    prompts: dict[str, JudgePrompt] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        prompt = _parse_line(source, lineno, line)
        if prompt.name in prompts and prompts[prompt.name] != prompt:
            raise PromptSetError(
                f"{source} line {lineno}: prompt {prompt.name!r} differs from the one on line {first_line[prompt.name]}"
            )
        prompts.setdefault(prompt.name, prompt)
        first_line.setdefault(prompt.name, lineno)
    if not prompts:
        raise PromptSetError(f"{source}: no prompts")
    return JudgePromptSet(source, hashlib.sha256(data).hexdigest(), prompts)


def load_prompt_set(path: str | os.PathLike) -> JudgePromptSet:
    """Load and validate a prompt file. Identical repeated names are allowed (the paper's file repeats one)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PromptSetError(f"cannot read prompt file {path}: {e}") from e
    return _parse(str(path), data)


def default_prompt_set(filename: str = DEFAULT_PROMPT_FILE) -> JudgePromptSet:
    """One of the prompt sets shipped in ``llava/eval/judge_prompts/``."""
    ref = resources.files("llava.eval").joinpath("judge_prompts", filename)
    return _parse(f"llava/eval/judge_prompts/{filename}", ref.read_bytes())
