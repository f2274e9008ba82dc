"""ECSO's options, each declared once: a field of :class:`ECSOConfig` with its :class:`Option` spec (help, flag,
range, choices, whether an API request may override it, whether it only acts on batch runs, its control in the
demo). Everything else is generated from the declarations:

* the command-line flags: :func:`add_option_args`, and :func:`ecso_config_from_args` back;
* the API's request model (``ECSOOptions``, :mod:`llava.serve.protocol.ecso`): the options with ``api=True``;
* the demo's options panel (:mod:`llava.serve.gradio_web_server_ecso`): the options with a ``control``;
* the checks of :class:`ECSOConfig` itself (choices and ranges).

Adding an option is one more field here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llava.ecso.prompts import PROMPT_SETS, VERDICT_MODES, PromptSet, get_prompt_set
from llava.errors import InvalidRequestError
from llava.generation import MAX_NEW_TOKENS_LIMIT, GenerationParams
from llava.mm_utils import ASPECT_RATIOS

__all__ = ["Control", "Option", "ECSOConfig", "ecso_options", "add_option_args", "ecso_config_from_args",
           "ECSO_GROUP", "DECODING_GROUP"]

ECSO_GROUP = "ECSO"
DECODING_GROUP = "decoding"


@dataclass(frozen=True)
class Control:
    """An option's control in the demo's panel (UI-toolkit-free): ``radio`` over the choices, or a ``slider``."""

    kind: str
    label: str
    info: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    elem_id: str | None = None


@dataclass(frozen=True)
class Option:
    """One option's declaration (the field's metadata; ``name``, ``type``, ``nullable`` and ``default`` are filled
    in from the field by :func:`ecso_options`). ``flag=None``: no command-line flag. ``choices``: the valid values,
    or a function returning them (for registries that grow), named by ``noun`` in errors. ``minimum``/``maximum``:
    inclusive bounds (``exclusive_minimum`` for a strict lower one). ``api``: an API request may set it.
    ``batch_only``: front-ends that stream (the CLI, the demo) do not offer it; ``streamed=False``: streamed runs
    ignore it. ``record_when_set``: left out of a result's options while at its default, so settings of runs made
    before the option existed stay comparable. ``control``: its control in the demo's options panel.
    ``flag_values``: the words the flag takes for the values (``--force-verdict yes`` for ``True``)."""

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    group: str = ECSO_GROUP
    metavar: str | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    noun: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    api: bool = False
    batch_only: bool = False
    streamed: bool = True
    record_when_set: bool = False
    control: Control | None = None
    check: Callable[[Any], None] | None = None
    flag_values: dict[str, Any] | None = None
    name: str = ""
    type: type = str
    nullable: bool = False
    default: Any = None

    def valid_choices(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def validate(self, value: Any) -> None:
        """Raise :class:`InvalidRequestError` naming the option and the value unless ``value`` is allowed."""
        if value is None and self.nullable:
            return
        choices = self.valid_choices()
        if choices is not None and value not in choices:
            raise InvalidRequestError(f"unknown {self.noun or self.name} {value!r}; valid: {', '.join(choices)}")
        if self.type is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidRequestError(f"{self.name} must be an integer, got {value!r}")
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        high_ok = self.maximum is None or value <= self.maximum
        if not (low_ok and high_ok):
            raise InvalidRequestError(f"{self.name} must be {self.range_text()}, got {value!r}")
        if self.check is not None:
            self.check(value)

    def range_text(self) -> str:
        if self.maximum is None:
            kind = "an integer" if self.type is int else "a number"
            return f"{kind} {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        return f"in {'(' if self.exclusive_minimum else '['}{self.minimum:g}, {self.maximum:g}]"


def option(default: Any, **spec: Any) -> Any:
    """A field of :class:`ECSOConfig` with its :class:`Option` declaration."""
    return field(default=default, metadata={"option": Option(**spec)})


def _check_regex(value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise InvalidRequestError(f"skip_check_regex {value!r} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class ECSOConfig:
    """Options of the method; every result records them. Defaults follow the paper except ``verdict``:
    ``score`` (one forward pass, P(yes) vs P(no)) instead of the paper's ``exact`` string match, which fails open."""

    verdict: str = option(
        "score", flag="--verdict", choices=VERDICT_MODES, noun="verdict mode", api=True,
        help="score: P(yes) vs P(no) of the first answer token in one forward pass; exact: the paper's "
             "code, flagged only if the answer is exactly 'yes'/'yes.'; parse: first word yes/no",
        control=Control("radio", "Harm check", elem_id="verdict-mode",
                        info="score: P(yes) against the threshold; exact: the paper's 'yes' match; parse: the "
                             "answer's first word"))
    threshold: float = option(
        0.5, flag="--threshold", minimum=0.0, maximum=1.0, api=True,
        help="score verdict: flag when P(yes) >= threshold",
        control=Control("slider", "Harm threshold", info="score mode: flag when P(yes) >= this", minimum=0.0,
                        maximum=1.0, step=0.01, elem_id="threshold"))
    prompt_set: str = option(
        "paper", flag="--prompt-set", choices=lambda: sorted(PROMPT_SETS), noun="prompt set", api=True,
        help="ECSO prompt templates, by name")
    # Steps 1, 3 and 4 (the paper's setting).
    max_new_tokens: int = option(
        1024, flag="--max_new_tokens", aliases=("--max-new-tokens",), group=DECODING_GROUP, minimum=1,
        maximum=MAX_NEW_TOKENS_LIMIT, api=True, help="new tokens per generated step (direct, caption, safe)",
        control=Control("slider", "Max new tokens", minimum=1, maximum=2048, step=1, elem_id="max-new-tokens"))
    # exact/parse: enough to decide "yes"/"yes." vs anything longer.
    verdict_max_new_tokens: int = option(
        16, flag="--verdict-max-new-tokens",
        help="exact/parse verdicts: tokens to generate (enough to tell 'yes.' from anything longer)")
    temperature: float = option(
        0.0, flag="--temperature", group=DECODING_GROUP, minimum=0.0, api=True, help="sampling temperature; 0 = greedy",
        control=Control("slider", "Temperature", info="0 = greedy", minimum=0.0, maximum=1.0, step=0.05,
                        elem_id="temperature"))
    top_p: float | None = option(
        None, flag="--top_p", aliases=("--top-p",), group=DECODING_GROUP, minimum=0.0, exclusive_minimum=True,
        maximum=1.0, api=True, help="nucleus sampling mass, in (0, 1]")
    num_beams: int = option(1, flag="--num_beams", aliases=("--num-beams",), group=DECODING_GROUP, help="beam count")
    # The paper's safety scripts: off; its utility scripts kept the image.
    image_in_safe_step: bool = option(
        False, flag="--image-in-safe-step", api=True,
        help="keep the image in step 4, the safe answer (the paper's utility scripts did; its safety scripts did not)")
    # Not an API option: a request must never be able to turn the check off.
    force_verdict: bool | None = option(
        None, flag="--force-verdict", flag_values={"yes": True, "no": False},
        help="for demonstrations and benchmarks, never for protection: take this verdict whatever the harm check "
             "says (the check still runs; its score and text are kept). 'yes' shows steps 3-4 on any model, random "
             "or real; default: the check decides")
    min_new_tokens: int = option(0, help="benchmarks only: fixed answer lengths for steps 1, 3 and 4")
    # The seed's scripts differ here (README "Fidelity"): its VLSafe, MME and MM-Vet ECSO scripts center-crop the
    # image for the harm check and the caption, its MM-SafetyBench and MMBench ones pad it as for the direct answer.
    image_aspect_ratio_check: str | None = option(
        None, flag="--image-aspect-ratio-check", choices=ASPECT_RATIOS, noun="image aspect ratio", api=True,
        record_when_set=True,
        help="image preprocessing of step 2, the harm check (pad, crop, resize as --image-aspect-ratio); default: "
             "the direct step's")
    image_aspect_ratio_caption: str | None = option(
        None, flag="--image-aspect-ratio-caption", choices=ASPECT_RATIOS, noun="image aspect ratio", api=True,
        record_when_set=True,
        help="image preprocessing of step 3, the caption, and of step 4 with --image-in-safe-step (the seed passed "
             "the caption's image there); default: the direct step's")
    truncate_chars: int | None = option(
        None, flag="--truncate-chars", metavar="N", minimum=0, api=True,
        help="harm check: cut the direct answer to its first N characters; 0: the whole answer (the seed's MME, "
             "MM-Vet and MMBench scripts); default: the prompt set's (1927 for paper)")
    # Results are identical either way (the caption does not depend on step 1).
    speculative_caption: bool = option(
        False, flag="--speculative-caption", batch_only=True, streamed=False,
        help="generate the caption together with the direct answer (batched): flagged samples finish one "
             "generation sooner, benign ones pay for an unused caption; pays off on GPUs, not CPUs")
    early_check_tokens: int = option(
        0, flag="--early-check-tokens", metavar="K", minimum=0, batch_only=True, streamed=False, record_when_set=True,
        help="also check the direct answer after its first K tokens and stop it there if flagged (a flagged answer "
             "is discarded anyway); cuts flagged samples' cost, benign ones pay one more check. Batch runs on the "
             "local backend; 0 = off (the paper checks whole answers only)")
    skip_check_regex: str | None = option(
        None, flag="--skip-check-regex", metavar="RE", batch_only=True, record_when_set=True, check=_check_regex,
        help="answers fully matching RE skip the harm check and pass, e.g. '\\(?[A-E]\\)?\\.?' for lone option "
             "letters on multiple-choice benchmarks; default: every answer is checked (the paper)")
    force_all_steps: bool = option(
        False, flag="--force-all-steps", batch_only=True, streamed=False, record_when_set=True,
        help="compute steps 3-4 (caption, safe answer) for every sample, flagged or not; the verdict, its score and "
             "the final answer stay as the threshold decides, and results keep the safe answer of every sample, so "
             "one run gives the answers at every threshold (python -m llava.eval.sweep). Costs steps 3-4 on every "
             "sample; batch runs only")

    def __post_init__(self) -> None:
        for opt in ecso_options():
            opt.validate(getattr(self, opt.name))
        self.params()  # validates decoding settings

    def prompts(self) -> PromptSet:
        """The prompt set, with this config's truncation of the checked answer."""
        found = get_prompt_set(self.prompt_set)
        return found if self.truncate_chars is None else dataclasses.replace(found, truncate_chars=self.truncate_chars)

    def params(self, max_new_tokens: int | None = None) -> GenerationParams:
        """Decoding settings of steps 1, 3 and 4, or of the verdict when ``max_new_tokens`` is given."""
        return GenerationParams(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, num_beams=self.num_beams,
                                min_new_tokens=0 if max_new_tokens else self.min_new_tokens)

    def ignored_when_streaming(self) -> list[str]:
        """The options set here that streamed runs ignore."""
        return [o.name for o in ecso_options(lambda o: not o.streamed) if getattr(self, o.name) != o.default]

    def for_streaming(self) -> ECSOConfig:
        """This config with the options streamed runs ignore at their defaults."""
        return dataclasses.replace(self, **{o.name: o.default for o in ecso_options(lambda o: not o.streamed)})

    def to_dict(self) -> dict:
        d = asdict(self)
        for opt in ecso_options():
            if opt.record_when_set and d[opt.name] == opt.default:
                del d[opt.name]
        d["truncate_chars"] = self.prompts().truncate_chars  # what was applied (the prompt set's when unset)
        return d


@functools.cache
def _declared() -> tuple[Option, ...]:
    """Every field's declaration, completed from the field (read once: the annotations need the finished class)."""
    hints = typing.get_type_hints(ECSOConfig)
    found = []
    for f in fields(ECSOConfig):
        hint, nullable = hints[f.name], False
        if type(None) in typing.get_args(hint):
            hint, nullable = next(a for a in typing.get_args(hint) if a is not type(None)), True
        found.append(dataclasses.replace(f.metadata["option"], name=f.name, type=hint, nullable=nullable,
                                         default=f.default))
    return tuple(found)


def ecso_options(where: Callable[[Option], bool] | None = None) -> tuple[Option, ...]:
    """The declared options in field order, with name, type and default filled in; those ``where`` accepts."""
    return tuple(o for o in _declared() if where is None or where(o))


# ------------------------------------------------------------------------------------------------ command line


def _flag_type(opt: Option) -> Callable[[str], Any]:
    if opt.flag_values is not None:
        words = opt.flag_values

        def parse(text: str) -> Any:
            if text not in words:
                raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(words)})")
            return words[text]

        return parse
    return opt.type if opt.type in (int, float, str) else str


def add_option_args(parser: argparse.ArgumentParser, options: Iterable[Option], title: str,
                    defaults: dict[str, Any] | None = None, default_text: dict[str, str] | None = None) -> None:
    """Flags for ``options`` in an argument group ``title``; ``defaults`` overrides declared defaults by name,
    ``default_text`` what ``--help`` says the default is (for a default resolved after parsing)."""
    group = parser.add_argument_group(title)
    for opt in options:
        if opt.flag is None:
            continue
        default = (defaults or {}).get(opt.name, opt.default)
        if opt.type is bool and opt.flag_values is None:
            group.add_argument(opt.flag, *opt.aliases, dest=opt.name, action="store_true", default=default,
                               help=opt.help)
            continue
        shown = "" if default is None else " (default: %(default)s)"
        if default_text and opt.name in default_text:
            shown = f" (default: {default_text[opt.name]})"
        metavar = opt.metavar or ("{" + ",".join(opt.flag_values) + "}" if opt.flag_values is not None else None)
        group.add_argument(opt.flag, *opt.aliases, dest=opt.name, type=_flag_type(opt), default=default,
                           choices=opt.valid_choices(), metavar=metavar, help=opt.help + shown)


def ecso_config_from_args(args: argparse.Namespace, **overrides: Any) -> ECSOConfig:
    """:class:`ECSOConfig` from parsed flags: every option whose flag the parser has, then ``overrides``; options
    without a flag there keep their declared defaults."""
    given = vars(args)
    values = {o.name: given[o.name] for o in ecso_options() if o.flag is not None and o.name in given}
    return ECSOConfig(**{**values, **overrides})
