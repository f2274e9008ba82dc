"""The seed's ``model_vlsafe_tell_ask.py``: VLSafe ECSO, with its flags, run by ``llava.eval.generate`` (the mapping
is in ``llava.eval.gen.seed``; ``--help`` lists the flags). In the seed's code TELL is the harm check (its
``TELL_PROMPT``), followed by the caption and the safe answer; like the seed, the harm check and the caption see the
center-cropped image."""
import sys

from llava.eval.gen.seed import SEED_ENTRIES, seed_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return seed_main(SEED_ENTRIES["model_vlsafe_tell_ask"], argv)


if __name__ == "__main__":
    sys.exit(main())
