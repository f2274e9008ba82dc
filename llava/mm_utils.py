"""Image loading and validation, LLaVA-1.5's pad-to-square preprocessing, and image-token handling.

Every image that enters the package goes through :func:`load_image`, which turns files, bytes, base64 and
(when allowed) URLs into an RGB ``PIL.Image`` or raises :class:`~llava.errors.ImageError` naming the problem.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.errors import ImageError, InvalidRequestError

__all__ = [
    "ImageInput",
    "ImageLimits",
    "ASPECT_RATIOS",
    "WORKING_SIDE_FACTOR",
    "load_image",
    "decode_base64_image",
    "encode_image_base64",
    "expand2square",
    "pad_color",
    "aspect_ratio_image",
    "working_side",
    "fit_image",
    "reduce_image",
    "prepare_image",
    "process_images",
    "image_digest",
    "count_image_tags",
    "tokenizer_image_token",
]

logger = logging.getLogger(__name__)

ImageInput = Union[str, bytes, os.PathLike, Image.Image]
ASPECT_RATIOS = ("pad", "crop", "resize")
# An image is preprocessed at most at this many times the vision tower's input side (see :func:`fit_image`).
WORKING_SIDE_FACTOR = 4


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before an image is decoded. ``max_pixels`` guards against decompression bombs;
    ``max_aspect_ratio`` against degenerate shapes (40 000 000 x 1) no preprocessing can use."""

    max_pixels: int = 40_000_000
    max_bytes: int = 32 * 1024 * 1024
    min_side: int = 1
    max_aspect_ratio: float = 200.0

    def check_size(self, w: int, h: int, origin: str) -> None:
        """Refuse a ``w`` x ``h`` image (from its header, before decoding) over the limits."""
        if w * h > self.max_pixels:
            raise ImageError(f"image {origin} is {w}x{h} = {w * h} pixels, over the limit of {self.max_pixels}")
        if min(w, h) < self.min_side:
            raise ImageError(f"image {origin} is {w}x{h}; each side must be at least {self.min_side} px")
        if max(w, h) > self.max_aspect_ratio * min(w, h):
            raise ImageError(f"image {origin} is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):.0f}:1; at most "
                             f"{self.max_aspect_ratio:g}:1 is accepted (a degenerate shape)")


def _image_from_bytes(data: bytes, origin: str, limits: ImageLimits) -> Image.Image:
    if not data:
        raise ImageError(f"image {origin} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image {origin} is {len(data)} bytes, over the limit of {limits.max_bytes}")
    # PIL's parsers meet untrusted bytes here and raise many kinds of exception on corrupt input (OSError,
    # SyntaxError, struct.error, IndexError, TypeError, ... found by fuzzing): every one is a bad image, not a
    # server error. MemoryError is not the image's fault and propagates.
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"image {origin} is not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {origin} declares too many pixels ({exc}); over the limit") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        raise ImageError(f"image {origin} cannot be opened: {_describe(exc)}") from None
    limits.check_size(*img.size, origin)
    try:
        if getattr(img, "n_frames", 1) > 1:
            logger.info("image %s has %d frames; using the first", origin, img.n_frames)
            img.seek(0)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # this image is ours: no copy of a large decode
        return _to_rgb(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        raise ImageError(f"image {origin} is truncated or corrupt: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc)[:200]
    return text if isinstance(exc, OSError) and text else f"{type(exc).__name__}: {text}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as LLaVA's ``convert('RGB')``, except 16/32-bit grey, which PIL would clip, is scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_base64_image(data: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """An image from base64 text, with or without a ``data:image/...;base64,`` prefix."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ImageError("data URL images must be base64-encoded (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image is not valid base64") from None
    return _image_from_bytes(raw, "(base64)", limits)


def load_image(
    source: ImageInput,
    limits: ImageLimits = ImageLimits(),
    allow_urls: bool = False,
    url_timeout: float = 10.0,
) -> Image.Image:
    """Load ``source`` (path, bytes, base64 text, data URL, http(s) URL if ``allow_urls``, or a PIL image)
    as an RGB image with its EXIF orientation applied."""
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, (bytes, bytearray)):
        return _image_from_bytes(bytes(source), "(bytes)", limits)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"unsupported image source of type {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError(f"image URLs are not fetched unless allowed (--allow-image-urls): {text[:200]}")
        return _image_from_bytes(_fetch_url(text, limits, url_timeout), text[:200], limits)
    if text.startswith("data:"):
        return decode_base64_image(text, limits)
    path = Path(text).expanduser()
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(f"image {path} is {size} bytes, over the limit of {limits.max_bytes}")
    return _image_from_bytes(path.read_bytes(), str(path), limits)


def _fetch_url(url: str, limits: ImageLimits, timeout: float) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "ecso"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            data = resp.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot fetch image {url[:200]}: {exc}") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"image at {url[:200]} is over the limit of {limits.max_bytes} bytes")
    return data


def encode_image_base64(image: Image.Image, fmt: str = "PNG", **save_options: Any) -> str:
    """``image`` in ``fmt`` as base64; ``save_options`` go to PIL's ``save`` (e.g. ``compress_level=1``)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_options)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pad_color(image_mean: Sequence[float]) -> tuple[int, ...]:
    """LLaVA's background for pad-to-square: ``tuple(int(x * 255) for x in image_mean)`` (122, 116, 104 for CLIP)."""
    return tuple(int(x * 255) for x in image_mean)


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square, the original centred, as LLaVA-1.5's ``image_aspect_ratio: pad``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _target_size(image_processor: Any) -> int:
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    for d in (crop, size):  # a dict, or transformers' SizeDict (attributes)
        for key in ("height", "shortest_edge"):
            value = d.get(key) if isinstance(d, dict) else getattr(d, key, None)
            if value:
                return int(value)
    return 336


def working_side(image_processor: Any) -> int:
    """The largest side an image is preprocessed at: :data:`WORKING_SIDE_FACTOR` times the vision tower's input."""
    return WORKING_SIDE_FACTOR * _target_size(image_processor)


def _scaled(img: Image.Image, scale: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def _reduced_square(img: Image.Image, background: tuple[int, ...], side: int, band_rows: int = 128) -> Image.Image:
    """``expand2square(img).reduce(k)`` for the integer ``k = long side // side``, without allocating the square:
    bands of the square's rows aligned to k x k blocks (so every block averages what it averages in the square) are
    assembled from the image and the background, ``band_rows`` output rows at a time, and reduced. At most
    2 x ``side`` a side."""
    w, h = img.size
    n = max(w, h)
    k = n // side
    if k < 2:
        return expand2square(img, background)
    ox, oy = (n - w) // 2, (n - h) // 2  # where expand2square pastes the image
    x0, y0 = ox - ox % k, oy - oy % k  # the image's blocks start on a block boundary of the square ...
    x1, y1 = min(-(-(ox + w) // k) * k, n), min(-(-(oy + h) // k) * k, n)  # ... and end on one (or its edge)
    out = Image.new(img.mode, (-(-n // k), -(-n // k)), background)
    for top in range(y0, y1, k * band_rows):
        bottom = min(top + k * band_rows, y1)
        strip = Image.new(img.mode, (x1 - x0, bottom - top), background)
        first, last = max(top, oy) - oy, min(bottom, oy + h) - oy  # the image's rows in this band
        if last > first:
            strip.paste(img.crop((0, first, w, last)), (ox - x0, first + oy - top))
        out.paste(strip.reduce(k), (x0 // k, top // k))
    return out


def fit_image(img: Image.Image, aspect_ratio: str, side: int, background: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """``img`` reduced to what an aspect-ratio mode can use at a working side of ``side`` px (see
    :func:`working_side`), so preprocessing allocates at most about (2 x ``side``)^2 pixels whatever the source:

    * ``pad``: a long side of 2 x ``side`` or more gives the padded square (filled with ``background``) reduced
      by the integer factor ``long side // side`` (box averages of the very square LLaVA pads to, computed without
      allocating it; the vision tower's resize then starts from that);
    * ``crop``: the short side down to ``side``, then the long side cut to ``WORKING_SIDE_FACTOR`` x ``side``
      around the centre (the processor keeps only the central square);
    * ``resize``: unchanged (it squashes in one step).

    Images with a long side under 2 x ``side`` are returned as they are, so ordinary images are preprocessed
    exactly as LLaVA does; larger ones differ from LLaVA's full-size path by a few levels (pinned by a test)."""
    w, h = img.size
    if aspect_ratio == "pad" and max(w, h) >= 2 * side:
        return _reduced_square(img, background, side)
    if aspect_ratio == "crop":
        if min(w, h) > side:
            img = _scaled(img, side / min(w, h))
            w, h = img.size
        keep = WORKING_SIDE_FACTOR * side
        if max(w, h) > keep:
            left, top = (w - min(w, keep)) // 2, (h - min(h, keep)) // 2
            img = img.crop((left, top, left + min(w, keep), top + min(h, keep)))
    return img


def reduce_image(img: Image.Image, side: int, min_short: int) -> Image.Image:
    """``img`` reduced (box averages) by the largest integer factor that keeps its long side at least ``side`` and
    its short side at least ``min_short``: what every aspect-ratio mode can still use (a worker reduces each image
    so as soon as it is decoded, before any mode is chosen). Images under twice those sides are returned as they are."""
    w, h = img.size
    k = min(max(w, h) // side, min(w, h) // min_short)
    return img.reduce(k) if k >= 2 else img


def aspect_ratio_image(img: Image.Image, aspect_ratio: str, mean: Sequence[float], side: int) -> Image.Image:
    """``img`` under an aspect-ratio mode, before a vision tower's own resize (+ center crop): ``pad`` to a square
    filled with ``mean`` (LLaVA-1.5), ``resize`` (squash) to ``side`` x ``side``, or ``crop`` (as it is)."""
    if aspect_ratio == "pad":
        return expand2square(img, pad_color(mean))
    if aspect_ratio == "resize":
        return img.resize((side, side), Image.BICUBIC)
    if aspect_ratio == "crop":
        return img
    raise InvalidRequestError(f"unknown image aspect ratio {aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}")


def prepare_image(img: Image.Image, image_processor: Any, aspect_ratio: str) -> Image.Image:
    """Apply the aspect-ratio mode before the processor's own resize (+ center crop), on the image first reduced
    to the working side (:func:`fit_image`): memory stays bounded for any accepted image."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise InvalidRequestError(f"unknown image aspect ratio {aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}")
    target = _target_size(image_processor)
    img = fit_image(img, aspect_ratio, WORKING_SIDE_FACTOR * target, pad_color(image_processor.image_mean))
    return aspect_ratio_image(img, aspect_ratio, image_processor.image_mean, target)


def process_images(images: Sequence[Image.Image], image_processor: Any, aspect_ratio: str = "pad"):
    """Pixel values (a ``torch.Tensor`` [n, 3, H, W]) for ``images`` under ``aspect_ratio``."""
    prepared = [prepare_image(img, image_processor, aspect_ratio) for img in images]
    return image_processor(prepared, return_tensors="pt")["pixel_values"]


_digests: dict[int, tuple[weakref.ref, bytes]] = {}
_digests_lock = threading.Lock()


def image_digest(img: Image.Image) -> bytes:
    """A content hash of ``img`` (mode, size and pixels; BLAKE2b-128): what caches key images by, so they never
    keep the image itself. Computed once per image object (remembered while the object lives)."""
    key = id(img)
    with _digests_lock:
        hit = _digests.get(key)
        if hit is not None and hit[0]() is img:
            return hit[1]
    h = hashlib.blake2b(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode(), digest_size=16)
    h.update(img.tobytes())
    digest = h.digest()

    def forget(_ref: weakref.ref, key: int = key) -> None:
        with _digests_lock:
            if _digests.get(key, (None,))[0] is _ref:
                del _digests[key]

    with _digests_lock:
        _digests[key] = (weakref.ref(img, forget), digest)
    return digest


def count_image_tags(prompt: str) -> int:
    return prompt.count(DEFAULT_IMAGE_TOKEN)


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_id: int, tokens_per_image: int = 1) -> list[int]:
    """Token ids as LLaVA's ``tokenizer_image_token``: each text chunk around ``<image>`` is tokenized on its own
    (so each starts with SentencePiece's ``▁`` prefix), the BOS of later chunks is dropped, and each ``<image>``
    becomes ``tokens_per_image`` copies of ``image_token_id`` (LLaVA: one -200; transformers' Llava: 576 copies)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates (JSON "\\ud800", surrogateescape'd argv): tokenizers refuse them
        raise InvalidRequestError(f"the text is not valid Unicode: {exc.reason} at character {exc.start} "
                                  f"({prompt[exc.start]!r})") from None
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([image_token_id] * tokens_per_image)
            if chunk and bos is not None and chunk[0] == bos:
                chunk = chunk[1:]
        ids.extend(chunk)
    return ids
