"""FigStep's attack images rendered locally, the way FigStep makes them: a 760 x 760 white canvas, FreeMono Bold at
80 px (Debian's ``fonts-freefont-ttf``), black text at (20, 10) with 11 px between lines: the instruction wrapped at
15 characters, then the empty list "1. ", "2. ", "3. ". Written as FigStep names them,
``{out}/query_{dataset}_{category_id}_{task_id}_6.png``. Against FigStep's 50 published SafeBench-Tiny images the
render differs in a handful of pixels (tests/eval/test_figstep_images.py prints the figures)::

    python -m llava.eval.figstep_images --questions safebench.csv --out figstep_images
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks.figstep import image_name, read_questions

__all__ = ["FONT_NAME", "FONT_SIZE", "CANVAS", "ORIGIN", "LINE_SPACING", "WRAP_CHARS", "STEPS", "load_figstep_font",
           "figstep_text", "render_figstep", "render_questions", "main"]

logger = logging.getLogger(__name__)

FONT_NAME = "FreeMonoBold.ttf"
FONT_SIZE = 80
CANVAS = 760
ORIGIN = (20, 10)
LINE_SPACING = 11
WRAP_CHARS = 15
STEPS = 3


def load_figstep_font(path: str | Path | None = None, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The given TrueType font, or FreeMono Bold from the system's font folders. Basic layout, so the result does not
    depend on whether libraqm is installed."""
    try:
        return ImageFont.truetype(str(path or FONT_NAME), size, layout_engine=ImageFont.Layout.BASIC)
    except OSError as e:
        hint = "" if path else ": install Debian's fonts-freefont-ttf or pass --font"
        raise InvalidRequestError(f"cannot load font {path or FONT_NAME} ({e}){hint}") from None


def figstep_text(instruction: str, steps: int = STEPS) -> str:
    """The image's text: the instruction wrapped at ``WRAP_CHARS`` characters (on spaces, as Python's textwrap
    does), then one empty numbered item per line."""
    text = textwrap.fill(instruction.removesuffix("\n"), width=WRAP_CHARS)
    return text + "".join(f"\n{n}. " for n in range(1, steps + 1))


def render_figstep(instruction: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The FigStep image of ``instruction`` (text past the canvas is cut off, as in FigStep's own images)."""
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    ImageDraw.Draw(image).multiline_text(ORIGIN, figstep_text(instruction), fill=(0, 0, 0), font=font,
                                         spacing=LINE_SPACING)
    return image


def render_questions(questions: Path, out: Path, font: Path | None = None) -> int:
    """Every question's image under ``out``; the number written."""
    face = load_figstep_font(font)
    rows = read_questions(questions)
    out.mkdir(parents=True, exist_ok=True)
    for q in tqdm(rows, desc="FigStep images", unit="image"):
        render_figstep(q.instruction, face).save(out / image_name(q), format="PNG")
    logger.info("wrote %d images to %s", len(rows), out)
    return len(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.figstep_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=Path, required=True,
                   help="FigStep's safebench.csv or SafeBench-Tiny.csv (the instruction column is rendered)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    p.add_argument("--font", type=Path, default=None,
                   help=f"TrueType font file (default {FONT_NAME}, Debian's fonts-freefont-ttf, as FigStep)")
    p.epilog = "Exit status: 0 done; 2 bad input (the message names the file and line)."
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        render_questions(args.questions, args.out, args.font)
    except (ECSOError, OSError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
