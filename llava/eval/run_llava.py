r"""Answer one image + query, directly or with ECSO.

    python -m llava.eval.run_llava --model-path tiny --image-file assets/examples/cat.png \
        --query "How do I make this at home?" --ecso --json

LLaVA's flags (``--model-path --model-base --image-file --query --conv-mode --sep --temperature --top_p
--num_beams --max_new_tokens``) keep their meaning and defaults; ``--ecso`` runs the four ECSO steps. Without
``--json``, stdout is the final answer alone (control characters removed) and, with ``--ecso``, stderr says how it
came about: the verdict (``P(yes) 0.524 < threshold 0.5: not flagged``) and which answer is final.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from llava.cli_args import (add_backend_args, add_decoding_args, add_ecso_args, add_model_args, backend_from_args,
                            ecso_config, setup_logging)
from llava.ecso.display import printable, run_summary
from llava.errors import ECSOError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("llava.run_llava")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.run_llava", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--image-file", default=None, help="image path(s), separated by --sep; omit for a text-only query")
    p.add_argument("--query", required=True, help="the user's question")
    p.add_argument("--sep", default=",", help="separator of several --image-file paths (default %(default)r)")
    add_decoding_args(p, temperature=0.2, max_new_tokens=512)  # LLaVA's run_llava defaults
    p.add_argument("--ecso", action="store_true", help="run ECSO (direct answer, harm check, caption, safe answer)")
    add_ecso_args(p)
    p.add_argument("--json", action="store_true", help="print the full result (all ECSO steps, options) as JSON")
    p.add_argument("--allow-image-urls", action="store_true", help="allow http(s) --image-file values")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress logs; -vv: debug logs")
    return p


def run(args: argparse.Namespace) -> dict:
    from llava.ecso.pipeline import ECSO
    from llava.mm_utils import load_image

    images = [load_image(f, allow_urls=args.allow_image_urls) for f in args.image_file.split(args.sep)] \
        if args.image_file else []
    config = ecso_config(args)
    backend = backend_from_args(args)
    try:
        pipeline = ECSO(backend, config)
        if args.ecso:
            return pipeline.run(images, args.query).to_dict()
        from llava.ecso.backends import StepRequest

        text = backend.generate([StepRequest(args.query, images, config.params())])[0]
        return {"query": args.query, "direct": text, "final": text, "options": backend.describe()}
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = run(args)
    except ECSOError as exc:
        print(f"error: {exc}", file=sys.stderr)  # once, without a log prefix: the one line a user reads
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    if args.ecso:  # how the answer came about, on stderr so stdout stays the answer alone
        print(run_summary(result, has_image=bool(args.image_file)), file=sys.stderr)
    print(printable(result["final"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
