"""TYPO / SD_TYPO rendering: wrap width, canvas height, determinism, one image per question, missing SD images."""
import json

import pytest
from PIL import Image, ImageDraw

from llava.errors import InvalidRequestError
from llava.eval import mmsafetybench_images as mi


@pytest.fixture(scope="module")
def font():
    return mi.load_font()


@pytest.fixture(scope="module")
def qdir(ref_data):
    return ref_data / "mmsafetybench" / "processed_questions"


@pytest.fixture(scope="module")
def key_phrases(qdir):
    return [row["Key Phrase"] for p in sorted(qdir.glob("*.json")) for row in json.loads(p.read_text()).values()]


def test_every_key_phrase_wraps_within_the_canvas(font, key_phrases):
    assert len(key_phrases) == 1680
    for phrase in key_phrases:
        lines = mi.wrap_text(phrase, font)
        assert all(font.getlength(line) <= mi.CANVAS_WIDTH for line in lines), lines
        assert "".join(lines).replace(" ", "") == phrase.replace(" ", "")  # nothing lost or reordered
        if all(font.getlength(" " + word) < mi.CANVAS_WIDTH for word in phrase.split(" ")):
            assert "".join(lines) == phrase  # breaks only at spaces
        assert all(line.startswith(" ") for line in lines[1:])  # MM-SafetyBench's continuation lines


def test_wrap_is_greedy(font):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    lines = mi.wrap_text(" ".join(words), font)
    assert len(lines) > 1
    for line, following in zip(lines, lines[1:]):
        first_next = following.split()[0]
        assert font.getlength(line + " " + first_next) >= mi.CANVAS_WIDTH  # the next word would not have fit


def test_word_wider_than_canvas_is_split_at_hyphen_or_slash(font):
    lines = mi.wrap_text("attention-deficit/hyperactivity disorder", font)
    assert lines[0] == "attention-deficit/" and lines[1].startswith(" hyperactivity")
    assert all(font.getlength(line) < mi.CANVAS_WIDTH for line in lines)
    assert all(font.getlength(x) < mi.CANVAS_WIDTH for x in mi.wrap_text("x" * 200, font))


@pytest.mark.parametrize("phrase", ["bomb", "hack into someone's bank account and steal all of the money quickly"])
def test_canvas_size_and_text_inside(font, phrase):
    image = mi.render_typo(phrase, font)
    lines = mi.wrap_text(phrase, font)
    assert image.size == (1024, 90 * (len(lines) + 1))
    box = ImageDraw.Draw(image).multiline_textbbox((0, 45), "\n".join(lines), font=font)
    assert box[2] <= image.width and box[3] <= image.height
    assert image.getpixel((5, 2)) == (255, 255, 255) and image.convert("L").getextrema()[0] < 50


def test_rendering_is_deterministic(font):
    a = mi.jpeg_bytes(mi.render_typo("make a bomb at home", font))
    b = mi.jpeg_bytes(mi.render_typo("make a bomb at home", mi.load_font()))
    assert a == b and a[:2] == b"\xff\xd8"


def test_cli_renders_one_image_per_question_and_skips_missing_sd(qdir, tmp_path):
    scenario = "03-Malware_Generation"
    ids = list(json.loads((qdir / f"{scenario}.json").read_text()))
    sd_root = tmp_path / "sd"
    for qid in ids[:3]:
        (sd_root / scenario / "SD").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (1024, 1024), (0, 128, 0)).save(sd_root / scenario / "SD" / f"{qid}.jpg")
    out = tmp_path / "out"
    status = mi.main(["--questions", str(qdir), "--out", str(out), "--scenarios", "03", "--sd-root", str(sd_root)])
    assert status == 1  # some SD images were missing
    typo = sorted(p.stem for p in (out / scenario / "TYPO").glob("*.jpg"))
    assert typo == sorted(ids) and len(list(out.iterdir())) == 1
    stacked = sorted((out / scenario / "SD_TYPO").glob("*.jpg"))
    assert [p.stem for p in stacked] == sorted(ids[:3])
    with Image.open(stacked[0]) as im, Image.open(out / scenario / "TYPO" / stacked[0].name) as t:
        assert im.size == (1024, 1024 + t.height)
        assert im.getpixel((512, 500))[1] > 100  # SD image on top
    first = (out / scenario / "TYPO" / f"{ids[0]}.jpg").read_bytes()
    mi.main(["--questions", str(qdir / f"{scenario}.json"), "--out", str(out), "--modes", "TYPO"])
    assert (out / scenario / "TYPO" / f"{ids[0]}.jpg").read_bytes() == first


def test_bad_modes_and_missing_sd_root(qdir, tmp_path):
    with pytest.raises(InvalidRequestError, match="valid: TYPO, SD_TYPO"):
        mi.render_all(mi.RenderConfig(qdir, tmp_path, modes=("SD",)))
    with pytest.raises(InvalidRequestError, match="--sd-root"):
        mi.render_all(mi.RenderConfig(qdir, tmp_path, modes=("SD_TYPO",)))
    with pytest.raises(InvalidRequestError, match="cannot load font"):
        mi.load_font(tmp_path / "none.ttf")


def test_cli_defaults_render_typo_offline_and_name_bad_input(qdir, tmp_path, caplog):
    """No --modes and no --sd-root: TYPO only (what works offline); SD_TYPO without --sd-root is one clear line."""
    out = tmp_path / "out"
    assert mi.main(["--questions", str(qdir), "--out", str(out), "--scenarios", "03"]) == 0
    assert [p.name for p in (out / "03-Malware_Generation").iterdir()] == ["TYPO"]
    assert mi.main(["--questions", str(qdir), "--out", str(out), "--modes", "SD_TYPO"]) == 2
    assert "SD_TYPO needs --sd-root" in caplog.text
