"""The seed's ``model_vqa_ask_unsafe.py``: MME / MM-Vet ECSO, with its flags, run by ``llava.eval.generate``
(the mapping is in ``llava.eval.gen.seed``; ``--help`` lists the flags). Like the seed: the harm check sees the whole
answer and the center-cropped image, the caption and the safe answer the center-cropped image."""
import sys

from llava.eval.gen.seed import SEED_ENTRIES, seed_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return seed_main(SEED_ENTRIES["model_vqa_ask_unsafe"], argv)


if __name__ == "__main__":
    sys.exit(main())
