"""Image loading, validation and LLaVA-1.5's pad-to-square."""
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from llava.errors import ImageError
from llava.mm_utils import (ImageLimits, decode_base64_image, expand2square, fit_image, image_digest, load_image,
                            pad_color, prepare_image, tokenizer_image_token)

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


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Gradients, a sine pattern, noise and sharp-edged shapes: what resampling differences show on."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    arr = np.concatenate([255 * x * np.ones((h, 1, 1)), 255 * y * np.ones((1, w, 1)),
                          128 + 100 * np.sin(12 * x + 7 * y)], axis=2) + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x0, y0, x0 + w // 8, y0 + h // 8), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


# (size, max difference, mean difference) in 8-bit levels between LLaVA's exact path (pad to the full square,
# then the processor) and ours (reduced first); measured: 0 / 0 up to a long side of 2687, then 2 / 0.06-0.12 for
# photos and 14 / 0.07 at the sharp pad edge of a 5000x600 strip.
PAD_TOLERANCE = [((640, 480), 0, 0), ((1280, 720), 0, 0), ((1920, 1080), 0, 0), ((1080, 1920), 0, 0),
                 ((3000, 1000), 3, 0.1), ((2800, 2100), 3, 0.2), ((5000, 600), 16, 0.1)]


@pytest.mark.parametrize("size,max_levels,mean_levels", PAD_TOLERANCE)
def test_pad_at_the_working_size_matches_llava_within_tolerance(tiny_loaded, size, max_levels, mean_levels):
    """Issue 18 item 1: pad-to-square no longer allocates the full square; the vision tower's input stays LLaVA's
    (identical for ordinary sizes, within a few levels for large ones)."""
    proc = tiny_loaded.image_processor
    img = _photo(*size)
    exact = proc([expand2square(img, pad_color(proc.image_mean))], return_tensors="np")["pixel_values"][0]
    ours = proc([prepare_image(img, proc, "pad")], return_tensors="np")["pixel_values"][0]
    levels = np.abs(exact - ours) * np.asarray(proc.image_std).reshape(3, 1, 1) * 255
    assert levels.max() <= max_levels + 1e-3 and levels.mean() <= mean_levels + 1e-6, (levels.max(), levels.mean())


def test_fit_image_bounds_any_accepted_shape():
    """The padded square LLaVA would allocate for 16000x100 is 256 MP; fitted, it is under (2 x 1344)^2."""
    bg = (122, 116, 104)
    for size in ((16000, 100), (100, 16000), (8000, 300), (2688, 1)):
        out = fit_image(Image.new("RGB", size, (0, 0, 0)), "pad", 1344, bg)
        assert out.size[0] == out.size[1] and out.size[0] < 2 * 1344, (size, out.size)
    for size in ((5000, 600), (601, 3001), (2689, 2688)):  # the square LLaVA pads to, reduced by an integer factor
        img = _photo(*size)
        exact = expand2square(img, bg).reduce(max(size) // 1344)
        assert np.array_equal(np.asarray(fit_image(img, "pad", 1344, bg)), np.asarray(exact)), size
    band = fit_image(Image.new("RGB", (16000, 100), (0, 0, 0)), "pad", 1344, bg)
    assert band.getpixel((0, 0)) == bg and band.getpixel((0, band.size[1] // 2)) == (0, 0, 0)
    assert fit_image(Image.new("RGB", (20000, 400)), "crop", 1344).size == (5376, 400)
    assert fit_image(Image.new("RGB", (9000, 3000)), "crop", 1344).size == (4032, 1344)


def test_degenerate_aspect_ratios_are_refused_from_the_header():
    limits = ImageLimits()
    with pytest.raises(ImageError, match="aspect ratio of 40000000:1; at most 200:1"):
        limits.check_size(40_000_000, 1, "x")
    limits.check_size(16000, 100, "x")  # 160:1 is accepted
    with pytest.raises(ImageError, match="aspect ratio of 300:1"):
        decode_base64_image(base64.b64encode(_png_bytes(Image.new("L", (300, 1)))).decode())


def test_image_digest_is_by_content():
    a, b = Image.new("RGB", (4, 4), (1, 2, 3)), Image.new("RGB", (4, 4), (1, 2, 3))
    assert image_digest(a) == image_digest(b) and image_digest(a) == image_digest(a)
    assert image_digest(a) != image_digest(Image.new("RGB", (4, 4), (1, 2, 4)))
    assert image_digest(a) != image_digest(Image.new("RGB", (2, 8), (1, 2, 3)))


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
