"""XSTest's prompts as attack images, for ``--benchmark xstest --mode typo|figstep``:

* ``typo``: the prompt's key phrase (``llava.eval.benchmarks.xstest.key_phrase``) as an MM-SafetyBench TYPO image
  (``llava.eval.mmsafetybench_images``: black on white, 1024 px wide, font size 90), ``{out}/typo/{id}.jpg``;
* ``figstep``: the prompt's FigStep instruction ("Steps to <activity>." or the question) as a FigStep image
  (``llava.eval.figstep_images``), ``{out}/figstep/{id}.png``::

    python -m llava.eval.xstest_images --questions xstest_prompts.csv --out xstest_images
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks.xstest import IMAGE_FILES, figstep_instruction, key_phrase, read_prompts
from llava.eval.figstep_images import load_figstep_font, render_figstep
from llava.eval.mmsafetybench_images import jpeg_bytes, load_font, render_typo

__all__ = ["RENDER_MODES", "render_prompts", "main"]

logger = logging.getLogger(__name__)
RENDER_MODES = tuple(IMAGE_FILES)


def render_prompts(questions: Path, out: Path, modes: tuple[str, ...] = RENDER_MODES, typo_font: Path | None = None,
                   figstep_font: Path | None = None) -> dict[str, int]:
    """The images of every prompt in ``modes`` under ``out``; mode -> images written."""
    bad = [m for m in modes if m not in RENDER_MODES]
    if bad or not modes:
        raise InvalidRequestError(f"cannot render mode(s) {bad or list(modes)}; valid: {', '.join(RENDER_MODES)}")
    fonts = {"typo": load_font(typo_font) if "typo" in modes else None,
             "figstep": load_figstep_font(figstep_font) if "figstep" in modes else None}
    prompts = read_prompts(questions)
    for mode in modes:
        (out / IMAGE_FILES[mode]).parent.mkdir(parents=True, exist_ok=True)
    for p in tqdm(prompts, desc="XSTest images", unit="prompt"):
        if "typo" in modes:
            (out / IMAGE_FILES["typo"].format(id=p.id)).write_bytes(
                jpeg_bytes(render_typo(key_phrase(p.prompt).text, fonts["typo"])))
        if "figstep" in modes:
            render_figstep(figstep_instruction(p.prompt), fonts["figstep"]).save(
                out / IMAGE_FILES["figstep"].format(id=p.id), format="PNG")
    written = {mode: len(prompts) for mode in modes}
    logger.info("wrote %s under %s", written, out)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.xstest_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=Path, required=True, help="XSTest's xstest_prompts.csv")
    p.add_argument("--out", type=Path, required=True, help="output folder (the --image-folder of generate)")
    p.add_argument("--modes", default=",".join(RENDER_MODES),
                   help=f"comma-separated subset of {','.join(RENDER_MODES)} (default both)")
    p.add_argument("--typo-font", type=Path, default=None,
                   help="TrueType font of the TYPO images (default DejaVu Sans, as llava.eval.mmsafetybench_images)")
    p.add_argument("--figstep-font", type=Path, default=None,
                   help="TrueType font of the FigStep images (default FreeMono Bold, as llava.eval.figstep_images)")
    p.epilog = "Exit status: 0 done; 2 bad input (the message names the file and line)."
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    try:
        render_prompts(args.questions, args.out, modes, args.typo_font, args.figstep_font)
    except (ECSOError, OSError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
