"""Merge the chunk files of a sharded generation run into one answer file.

    python -m llava.eval.merge --out answers/merge.jsonl answers/4_0.jsonl answers/4_1.jsonl answers/4_2.jsonl answers/4_3.jsonl

Every part must be a finished run of ``llava.eval.generate`` (its manifest says ``complete``), the parts must be
chunks 0..N-1 of one plan with identical settings, and every planned id must be present exactly once (a row, or
a failure its manifest records, e.g. a missing image). Rows are written in chunk order; a merged manifest is
written next to the output. Exit status: 0 merged, 2 refused (the message says why and what to do).
"""
from __future__ import annotations

import argparse
import logging
import sys

from llava.cli_args import setup_logging
from llava.errors import ECSOError
from llava.eval.gen.merge import merge_parts
from llava.eval.gen.shards import part_paths

__all__ = ["build_parser", "main"]

logger = logging.getLogger("llava.eval.merge")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", help="the chunk files, in any order (their manifests give the chunk index)")
    p.add_argument("--out", required=True, help="the merged answer file")
    p.add_argument("--num-chunks", type=int, default=None,
                   help="instead of listing parts: the N part files generate wrote under a launcher "
                        "(OUT.part-K-of-N.jsonl)")
    p.add_argument("--force", action="store_true", help="replace --out when it exists")
    p.add_argument("--remove-parts", action="store_true", help="delete the part files and their manifests after merging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else 1)
    parts = list(args.parts)
    if args.num_chunks:
        parts += [str(p) for p in part_paths(args.out, args.num_chunks)]
    try:
        merge_parts(parts, args.out, force=args.force, remove_parts=args.remove_parts)
    except ECSOError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
