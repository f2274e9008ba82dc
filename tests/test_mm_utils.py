"""Image loading, validation and LLaVA-1.5's pad-to-square."""
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llava.errors import ImageError
from llava.mm_utils import (ImageLimits, decode_base64_image, expand2square, load_image, pad_color, prepare_image,
                            tokenizer_image_token)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pad_color_is_llava_rounded_mean():
    assert pad_color(CLIP_MEAN) == (122, 116, 104)


def test_expand2square_centres_and_fills_with_background():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand2square(img, (122, 116, 104))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((0, 39)) == (122, 116, 104)
    assert sq.getpixel((20, 20)) == (255, 0, 0) and sq.getpixel((20, 10)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == (122, 116, 104)  # (40-20)//2 = 10 rows of padding on top
    tall = expand2square(Image.new("RGB", (10, 30), (0, 0, 255)), (1, 2, 3))
    assert tall.size == (30, 30) and tall.getpixel((9, 15)) == (1, 2, 3) and tall.getpixel((10, 15)) == (0, 0, 255)


def test_prepare_image_modes(tiny_loaded):
    proc = tiny_loaded.image_processor
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    assert prepare_image(img, proc, "pad").size == (300, 300)
    assert prepare_image(img, proc, "resize").size == (336, 336)
    assert prepare_image(img, proc, "crop").size == (300, 100)


def test_load_image_sources(tmp_path, sample_image):
    path = tmp_path / "a.png"
    sample_image.save(path)
    data = path.read_bytes()
    for src in (str(path), path, data, base64.b64encode(data).decode(),
                "data:image/png;base64," + base64.b64encode(data).decode()):
        img = load_image(src) if not isinstance(src, str) or not src.startswith(("iVBOR",)) else decode_base64_image(src)
        assert img.mode == "RGB" and img.size == (320, 200)


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"not an image at all"), "not a readable image"),
])
def test_bad_files(tmp_path, make, match):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageError, match=match):
        load_image(path)


def test_truncated_png_and_jpeg(sample_image):
    png = _png_bytes(sample_image)
    with pytest.raises(ImageError):
        load_image(png[: len(png) // 2])
    buf = io.BytesIO()
    sample_image.save(buf, format="JPEG")
    jpg = buf.getvalue()
    with pytest.raises(ImageError):
        load_image(jpg[: len(jpg) // 3])


def _bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (the pixel data is a tiny stub)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    with pytest.raises(ImageError, match="pixels"):
        load_image(_bomb_png(50000, 50000))


def test_limits_are_configurable(sample_image):
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png_bytes(sample_image), ImageLimits(max_pixels=1000))


def test_modes_become_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 0, 0))
    assert load_image(_jpeg(cmyk)).mode == "RGB"
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    out = load_image(_png_bytes(grey16))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped garbage
    pal = Image.new("P", (8, 8))
    pal.info["transparency"] = 0
    assert load_image(_png_bytes(pal)).mode == "RGB"


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and b < 50


def test_urls_refused_unless_allowed():
    with pytest.raises(ImageError, match="not fetched"):
        load_image("http://127.0.0.1:9/x.png")


def test_invalid_base64():
    with pytest.raises(ImageError, match="base64"):
        decode_base64_image("!!!not base64!!!")


def test_tokenizer_image_token_matches_llava_chunking(tiny_loaded):
    """Each chunk around <image> tokenized alone (with the SentencePiece prefix), later BOS dropped."""
    import sentencepiece as spm

    from llava.model.tiny import tiny_model_path

    tok = tiny_loaded.tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_path("tiny-original") / "tokenizer.model"))
    prompt = "A chat. USER: <image>\nWhat is this? ASSISTANT:"
    ids = tokenizer_image_token(prompt, tok, image_token_id=-200)
    expected = [1] + sp.encode("A chat. USER: ") + [-200] + sp.encode("\nWhat is this? ASSISTANT:")
    assert ids == expected
    expanded = tokenizer_image_token(prompt, tok, image_token_id=tiny_loaded.image_token_id, tokens_per_image=576)
    assert expanded.count(tiny_loaded.image_token_id) == 576
