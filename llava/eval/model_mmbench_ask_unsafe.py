"""The seed's ``model_mmbench_ask_unsafe.py``: MMBench ECSO, with its flags, run by ``llava.eval.generate``
(the mapping is in ``llava.eval.gen.seed``; ``--help`` lists the flags). Like the seed: the harm check sees the whole
answer; every step sees the padded image, the safe answer included."""
import sys

from llava.eval.gen.seed import SEED_ENTRIES, seed_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return seed_main(SEED_ENTRIES["model_mmbench_ask_unsafe"], argv)


if __name__ == "__main__":
    sys.exit(main())
