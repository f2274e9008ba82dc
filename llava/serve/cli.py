"""Terminal chat with a LLaVA model, as LLaVA's ``llava.serve.cli``; ``--ecso`` shows each ECSO step.

    python -m llava.serve.cli --model-path tiny --image-file assets/examples/cat.png [--ecso]
    python -m llava.serve.cli --backend worker --controller-url http://127.0.0.1:10000 --model-name NAME ...

Without ``--ecso`` it is a multi-turn chat about the image. With ``--ecso`` every message is answered by the
ECSO pipeline (a single-turn method) and the four steps are printed as they complete. Empty input or EOF exits.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

from llava.cli_args import (add_backend_args, add_decoding_args, add_ecso_args, add_model_args, backend_from_args,
                            ecso_config, setup_logging)
from llava.ecso.display import RANDOM_WEIGHTS_NOTE, final_line, printable, verdict_line
from llava.ecso.events import Step
from llava.errors import ECSOError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("llava.serve.cli")

_HEADERS = {Step.DIRECT: "Direct answer", Step.VERDICT: "Harm detection", Step.CAPTION: "Query-aware caption",
            Step.SAFE: "Safe response", Step.FINAL: "Final answer"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--image-file", default=None, help="image to talk about (path; omit for text-only chat)")
    add_decoding_args(p, temperature=0.2, max_new_tokens=512)  # LLaVA's cli defaults
    p.add_argument("--ecso", action="store_true", help="answer each message with ECSO and show the four steps")
    add_ecso_args(p, batch_levers=False)
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress logs; -vv: debug logs")
    return p


def _chat_turn(backend, history, text, images, params, out: TextIO) -> str:
    from llava.ecso.backends import StepRequest

    answer = ""
    for delta in backend.stream(StepRequest(text, images, params, history=list(history))):
        out.write(printable(delta))
        out.flush()
        answer += delta
    out.write("\n")
    return answer.strip()


def _ecso_turn(pipeline, images, text, out: TextIO) -> None:
    streaming, flagged = None, False
    config = pipeline.config
    for event in pipeline.stream(images, text):
        if not event.done:
            if streaming != event.step:
                out.write(f"[{_HEADERS[event.step]}] ")
                streaming = event.step
            out.write(printable(event.delta))
            out.flush()
            continue
        if event.step is Step.VERDICT:
            mode = getattr(event, "verdict_mode", None) or pipeline.verdict_mode
            flagged = bool(event.flagged)
            line = verdict_line(flagged, event.harm_score, mode, config.threshold if mode == "score" else None,
                                event.text, getattr(event, "verdict_fallback", None))
            out.write(f"[{_HEADERS[Step.VERDICT]}] {line}\n")
        elif event.step is Step.FINAL:
            how = final_line(flagged, config.image_in_safe_step, bool(images))
            out.write(f"[{_HEADERS[Step.FINAL]}: {how}] {printable(event.text)}\n")
        elif streaming == event.step:
            out.write("\n")
        else:
            out.write(f"[{_HEADERS[event.step]}] {printable(event.text)}\n")
        streaming = None


def chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    from llava.ecso.pipeline import ECSO
    from llava.mm_utils import load_image

    images = [load_image(args.image_file)] if args.image_file else []
    backend = backend_from_args(args)
    config = ecso_config(args)
    pipeline = ECSO(backend, config)
    history: list[tuple[str, str]] = []
    if backend.describe().get("tiny_random_weights"):
        out.write(f"[{RANDOM_WEIGHTS_NOTE}]\n")
    try:
        while True:
            out.write("USER: ")
            out.flush()
            line = stdin.readline()
            if not line or not line.strip():
                out.write("\n")
                return
            text = line.strip()
            out.write("ASSISTANT: ")
            try:
                if args.ecso:
                    out.write("\n")
                    _ecso_turn(pipeline, images, text, out)
                else:
                    history.append((text, _chat_turn(backend, history, text, images, config.params(), out)))
            except ECSOError as exc:  # a bad turn (e.g. context overflow) does not end the chat
                out.write(f"\nerror: {exc}\n")
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        chat(args)
    except ECSOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
