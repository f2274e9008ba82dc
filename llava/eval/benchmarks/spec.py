"""``BenchmarkSpec``: everything the tools know about one benchmark, in one value. Each benchmark module builds its
``SPEC`` from the hook types below and the registry lists them; generation, the seed scripts, the judge, the
metrics, the report and the submission converters ask the spec and never spell a benchmark's name.

The hooks are data or plain callables. A spec never imports the judge, the metrics or the generation runner (they
sit above it): it names its metric and judge prompts by name, and those layers look the names up.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from llava.eval.benchmarks.base import BenchmarkConfig, Sample

__all__ = ["BenchmarkSpec", "DataLayout", "SeedScript", "ScriptFlags", "JudgeProtocol", "Grading",
           "SubmissionFormat", "BenignCounterpart"]


@dataclass(frozen=True)
class DataLayout:
    """Where the benchmark's files live under ``--data-root`` (paths relative to it): the seed scripts' ``data/``
    layout for the safety benchmarks, LLaVA's ``playground/data/eval/`` for the utility ones. ``image_folder`` is
    "" when the images are inline in the question file."""

    question_file: str
    image_folder: str = ""


@dataclass(frozen=True)
class ScriptFlags:
    """The flags one seed script adds beyond the common ones, and the check that refuses values the runner does not
    support (raising a typed error, so the script exits 2 with the message)."""

    add: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None]


@dataclass(frozen=True)
class SeedScript:
    """One of the seed's (or LLaVA's) generation scripts, kept as ``python -m llava.eval.<name>`` with its flags and
    defaults and run by ``llava.eval.generate`` (``llava.eval.gen.seed`` does the mapping).

    method: ``direct`` or ``ecso``. image_in_safe_step: the script kept the image in ECSO's step 4 (the seed's
    utility scripts did). check_crop: the script center-cropped the image for the harm check and the caption
    (``image_processor.preprocess`` on the raw image) where the direct answer had it padded. truncate_chars: the
    characters of the direct answer its harm check saw (0: all of it; None: the prompt set's 1927). flags:
    script-specific flags (LLaVA's MMBench script), or None."""

    name: str
    summary: str
    method: str
    max_new_tokens: int
    image_in_safe_step: bool = False
    check_crop: bool = False
    truncate_chars: int | None = None
    flags: ScriptFlags | None = None

    def ecso_args(self) -> list[str]:
        """The ``llava.eval.generate`` flags that make ECSO's steps run as this script ran them."""
        out = ["--image-in-safe-step"] if self.image_in_safe_step else []
        if self.check_crop:
            out += ["--image-aspect-ratio-check", "crop", "--image-aspect-ratio-caption", "crop"]
        return out + (["--truncate-chars", str(self.truncate_chars)] if self.truncate_chars is not None else [])


@dataclass(frozen=True)
class Grading:
    """Grading against ground truth on a 0.0-1.0 scale (MM-Vet's grader) instead of a safe/unsafe label.

    prompt_file: the project's grader prompt set (``llava/eval/judge_prompts/<file>``), the default for
    ``--judge-file`` (which then also takes a plain-text few-shot preamble). ground_truth_file: the file
    ``--ground-truth`` expects, named in errors. load_ground_truth: reads it. values: the prompt values
    (``question``, ``ground_truth``) of one answer row given its id and the loaded ground truth."""

    prompt_file: str
    ground_truth_file: str
    load_ground_truth: Callable[[Path], dict[str, Any]]
    values: Callable[[dict[str, Any], str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class JudgeProtocol:
    """How ``python -m llava.eval.judge --mode auto`` judges the benchmark's answers.

    prompt: the prompt's name in the prompt set, or a function of the answer row that names it (per-scenario
    prompts). summary: one line for ``--help``. grading: set for benchmarks graded against ground truth (their
    prompt is one name: a plain-text grader preamble becomes a prompt of that name)."""

    prompt: str | Callable[[dict[str, Any]], str]
    summary: str
    grading: Grading | None = None

    def __post_init__(self) -> None:
        if self.grading is not None and not isinstance(self.prompt, str):
            raise TypeError(f"a graded protocol names one prompt, got {self.prompt!r}")

    def prompt_for(self, row: dict[str, Any]) -> str:
        return self.prompt(row) if callable(self.prompt) else self.prompt


@dataclass(frozen=True)
class SubmissionFormat:
    """The benchmark's official submission file(s), written by ``python -m llava.eval.formats <name>``.

    add_arguments: ``--out`` and the format's own flags (``--answers`` is common to all). write: answer rows (read,
    checked and deduplicated by the CLI) and the parsed flags -> a line saying what was written."""

    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    write: Callable[[list[dict[str, Any]], argparse.Namespace], str]


@dataclass(frozen=True)
class BenignCounterpart:
    """Where a benchmark of harmful prompts only gets its over-refusal column: the prompts labelled ``safe`` of
    ``benchmark``, asked in the mode that ``modes`` maps this benchmark's mode to (key None: rows without a mode).
    ``summary`` says why they are comparable (reports print it)."""

    benchmark: str
    modes: Mapping[str | None, str]
    summary: str = ""

    def mode_for(self, mode: str | None) -> str | None:
        return self.modes.get(mode)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark = data plus small hooks; the generic tools need nothing else.

    Reading: ``reader`` turns a config into samples (file order); ``id_fields`` are the ``meta`` keys the answer
    file carries at top level (docs/answer-format.md); ``options`` maps the benchmark-specific config options it
    takes (``mode``, ``scenarios``, ``tiny_list``, ``gt_file``) to their help text; ``modes`` / ``default_mode``
    are the valid ``mode`` values; ``question_file`` / ``image_folder`` describe the official files (``--help``,
    errors); ``inline_images``: the images are in the question file (no ``--image-folder``).

    Running: ``layout`` is the standard place under ``--data-root``; ``seed_scripts`` the seed's entry points for
    it; ``recognizes`` says whether a row of a LLaVA VQA question file belongs to this benchmark (LLaVA's generic
    VQA scripts serve several); ``seed_image_folder`` turns a seed script's ``--image-folder`` into the reader's.

    Scoring: ``judge`` (None: not judged), ``metric`` (the hook's name in ``llava.eval.metrics.registry``),
    ``report_keys`` (the metrics the report puts side by side; empty for a metric with its own report section),
    ``submission`` (None: no official submission format) and ``benign`` (the benign prompts whose over-refusal the
    report shows next to this benchmark's attack success; None: none, or the benchmark has its own).
    """

    name: str
    summary: str
    reader: Callable[[BenchmarkConfig], Iterable[Sample]]
    id_fields: tuple[str, ...]
    question_file: str
    image_folder: str
    metric: str
    options: Mapping[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ()
    default_mode: str | None = None
    inline_images: bool = False
    layout: DataLayout | None = None
    seed_scripts: tuple[SeedScript, ...] = ()
    recognizes: Callable[[dict[str, Any]], bool] | None = None
    seed_image_folder: Callable[[str, str], str] | None = None
    judge: JudgeProtocol | None = None
    report_keys: tuple[str, ...] = ()
    submission: SubmissionFormat | None = None
    benign: BenignCounterpart | None = None
