"""The seed's ``model_mmsafe_tell_ask.py``: MM-SafetyBench ECSO, with its flags, run by ``llava.eval.generate``
(the mapping is in ``llava.eval.gen.seed``; ``--help`` lists the flags)."""
import sys

from llava.eval.gen.seed import SEED_ENTRIES, seed_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return seed_main(SEED_ENTRIES["model_mmsafe_tell_ask"], argv)


if __name__ == "__main__":
    sys.exit(main())
