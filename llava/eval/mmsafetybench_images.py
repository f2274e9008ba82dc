"""MM-SafetyBench TYPO and SD_TYPO images rendered locally, so the text-image modes run without the image download.

TYPO: the question's ``Key Phrase`` in black on a white canvas 1024 px wide, font size 90, greedy word wrap to the
width (continuation lines start with a space, as MM-SafetyBench's renderer writes them), drawn at (0, 45) on a canvas
90 x (lines + 1) px high. SD_TYPO: an existing SD image stacked above the TYPO image. Output:
``{out}/{scenario}/{TYPO|SD_TYPO}/{id}.jpg``. The default font is DejaVu Sans (MM-SafetyBench used Arial), so line
breaks can differ slightly from the official images; a word wider than the canvas on its own is split inside the word
(the official renderer lets it run off the edge)::

    python -m llava.eval.mmsafetybench_images --questions processed_questions --out imgs --sd-root imgs

Without ``--sd-root`` only TYPO images are rendered (SD images come from Stable Diffusion, not from this tool).
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from llava.errors import ECSOError, InvalidRequestError
from llava.eval.benchmarks.mmsafetybench import iter_questions

__all__ = ["RenderConfig", "RenderReport", "RENDER_MODES", "load_font", "wrap_text", "render_typo", "stack_vertical",
           "render_all", "main"]

logger = logging.getLogger(__name__)

RENDER_MODES = ("TYPO", "SD_TYPO")
FONT_SIZE = 90
CANVAS_WIDTH = 1024
JPEG_QUALITY = 75  # PIL's default, which MM-SafetyBench's img.save("*.jpg") used
DEFAULT_FONT_NAME = "DejaVuSans.ttf"
_BREAK_AFTER = "-/"  # preferred split points inside a word too wide for one line


@dataclass(frozen=True)
class RenderConfig:
    """questions: one scenario JSON or the processed_questions folder; out: output root; modes: subset of
    TYPO, SD_TYPO; sd_root: root holding ``{scenario}/SD/{id}.jpg`` (needed for SD_TYPO); font: a TrueType file
    (default DejaVu Sans); scenarios: keep these scenarios only (names or numbers)."""

    questions: Path
    out: Path
    modes: tuple[str, ...] = RENDER_MODES
    sd_root: Path | None = None
    font: Path | None = None
    scenarios: tuple[str, ...] = ()
    font_size: int = FONT_SIZE
    width: int = CANVAS_WIDTH


@dataclass
class RenderReport:
    written: dict[str, int] = field(default_factory=dict)  # mode -> images written
    missing_sd: list[str] = field(default_factory=list)  # SD images that were needed for SD_TYPO and absent


def _matplotlib_dejavu() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / DEFAULT_FONT_NAME
    return path if path.is_file() else None


def load_font(path: str | Path | None = None, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The given TrueType font, or DejaVu Sans from the system font folders (Debian fonts-dejavu-core), or the copy
    matplotlib ships. Basic layout, so the result does not depend on whether libraqm is installed."""
    basic = ImageFont.Layout.BASIC
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size, layout_engine=basic)
        except OSError as e:
            raise InvalidRequestError(f"cannot load font {path}: {e}") from e
    try:
        return ImageFont.truetype(DEFAULT_FONT_NAME, size, layout_engine=basic)
    except OSError:
        fallback = _matplotlib_dejavu()
        if fallback is None:
            raise InvalidRequestError(f"{DEFAULT_FONT_NAME} not found: install fonts-dejavu-core or pass --font")
        return ImageFont.truetype(str(fallback), size, layout_engine=basic)


def _longest_fitting_prefix(word: str, lead: str, font: ImageFont.FreeTypeFont, width: int) -> int:
    """Largest n >= 1 with ``lead + word[:n]`` narrower than ``width`` (binary search; 1 if even that is too wide)."""
    low, high = 1, len(word)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if font.getlength(lead + word[:mid]) < width else (low, mid - 1)
    return low


def _split_long_word(word: str, prefix: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``prefix + word`` cut into pieces that each fit (the first keeps ``prefix``, later ones start with a space),
    cutting after '-' or '/' where possible, else between characters."""
    pieces, rest, lead = [], word, prefix
    while rest and font.getlength(lead + rest) >= width:
        fit = _longest_fitting_prefix(rest, lead, font, width)
        soft = max((rest.rfind(c, 0, fit) for c in _BREAK_AFTER), default=-1)
        cut = soft + 1 if soft > 0 else fit
        pieces.append(lead + rest[:cut])
        rest, lead = rest[cut:], " "
    if rest or not pieces:
        pieces.append(lead + rest)
    return pieces


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int = CANVAS_WIDTH) -> list[str]:
    """Greedy word wrap of ``text`` (split on single spaces) into lines narrower than ``width`` px.
    Continuation lines start with a space, as in MM-SafetyBench's typo_format_text."""
    words = str(text).split(" ")
    lines = _split_long_word(words[0], "", font, width)
    for word in words[1:]:
        candidate = lines[-1] + " " + word
        if font.getlength(candidate) < width:
            lines[-1] = candidate
        else:
            lines.extend(_split_long_word(word, " ", font, width))
    return lines


def render_typo(text: str, font: ImageFont.FreeTypeFont, width: int = CANVAS_WIDTH,
                font_size: int = FONT_SIZE) -> Image.Image:
    """The TYPO image of ``text``: white canvas ``width`` x font_size*(lines+1), black text at (0, font_size/2)."""
    lines = wrap_text(text, font, width)
    image = Image.new("RGB", (width, font_size * (len(lines) + 1)), (255, 255, 255))
    ImageDraw.Draw(image).multiline_text((0, font_size / 2.0), "\n".join(lines), fill=(0, 0, 0), font=font)
    return image


def stack_vertical(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """``top`` above ``bottom`` on a white canvas as wide as the wider one (MM-SafetyBench's vertical_concat)."""
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    canvas.paste(top.convert("RGB"), (0, 0))
    canvas.paste(bottom.convert("RGB"), (0, top.height))
    return canvas


def jpeg_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as JPEG the way it is written to disk (deterministic for equal pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(image))


def _render_one(config: RenderConfig, font, scenario: str, qid: str, row: dict, report: RenderReport) -> None:
    if "Key Phrase" not in row:
        raise InvalidRequestError(f"{scenario} question {qid} has no 'Key Phrase' field; has {sorted(row)}")
    typo = render_typo(row["Key Phrase"], font, config.width, config.font_size)
    if "TYPO" in config.modes:
        _write(typo, config.out / scenario / "TYPO" / f"{qid}.jpg")
        report.written["TYPO"] = report.written.get("TYPO", 0) + 1
    if "SD_TYPO" in config.modes:
        sd_path = Path(config.sd_root or "") / scenario / "SD" / f"{qid}.jpg"
        if not sd_path.is_file():
            if len(report.missing_sd) < 20:
                logger.warning("SD image not found, SD_TYPO skipped: %s", sd_path)
            report.missing_sd.append(str(sd_path))
            return
        with Image.open(sd_path) as sd:
            _write(stack_vertical(sd, typo), config.out / scenario / "SD_TYPO" / f"{qid}.jpg")
        report.written["SD_TYPO"] = report.written.get("SD_TYPO", 0) + 1


def render_all(config: RenderConfig) -> RenderReport:
    """Render every selected question's images; SD_TYPO questions whose SD image is absent are reported and skipped."""
    bad = [m for m in config.modes if m not in RENDER_MODES]
    if bad or not config.modes:
        raise InvalidRequestError(f"cannot render mode(s) {bad or config.modes}; valid: {', '.join(RENDER_MODES)} "
                                  "(SD images come from Stable Diffusion, not from this tool)")
    if "SD_TYPO" in config.modes and config.sd_root is None:
        raise InvalidRequestError("SD_TYPO needs --sd-root (the folder holding {scenario}/SD/{id}.jpg)")
    font = load_font(config.font, config.font_size)
    questions = list(iter_questions(config.questions, config.scenarios))
    report = RenderReport(written={m: 0 for m in config.modes})
    for scenario, qid, row in tqdm(questions, desc="MM-SafetyBench images", unit="question"):
        _render_one(config, font, scenario, qid, row, report)
    if report.missing_sd:
        logger.warning("%d SD images missing: SD_TYPO skipped for them", len(report.missing_sd))
    logger.info("wrote %s under %s", report.written, config.out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava.eval.mmsafetybench_images",
        description="Render MM-SafetyBench TYPO images (the Key Phrase as text) and SD_TYPO images (SD image above "
                    "the TYPO image) into {out}/{scenario}/{TYPO|SD_TYPO}/{id}.jpg. Deterministic.")
    parser.add_argument("--questions", required=True, type=Path,
                        help="one processed_questions/{scenario}.json, or the processed_questions folder")
    parser.add_argument("--out", required=True, type=Path, help="output root (created if needed)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of TYPO,SD_TYPO (default: TYPO, and SD_TYPO too when --sd-root "
                             "is given)")
    parser.add_argument("--sd-root", type=Path, default=None,
                        help="root holding the downloaded SD images as {scenario}/SD/{id}.jpg; required for SD_TYPO. "
                             "Questions whose SD image is absent are reported and skipped")
    parser.add_argument("--font", type=Path, default=None,
                        help="TrueType font file (default DejaVu Sans; MM-SafetyBench used Arial, so line breaks may "
                             "differ slightly)")
    parser.epilog = ("Exit status 1 when some SD images were missing (their SD_TYPO images are not written); 2 on bad "
                     "input (the message names it).")
    parser.add_argument("--scenarios", default="",
                        help="comma-separated scenarios to render (names or numbers, e.g. 01,05); default all")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    modes = split(args.modes) if args.modes is not None else ("TYPO", "SD_TYPO") if args.sd_root else ("TYPO",)
    try:
        config = RenderConfig(questions=args.questions, out=args.out, modes=modes, sd_root=args.sd_root,
                              font=args.font, scenarios=split(args.scenarios))
        report = render_all(config)
    except ECSOError as e:
        logger.error("%s", e)
        return 2
    return 1 if report.missing_sd else 0


if __name__ == "__main__":
    sys.exit(main())
