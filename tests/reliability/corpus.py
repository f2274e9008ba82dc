"""The bad-input corpus: one table of cases (:data:`CASES`), each built by a small function, run against every
entry point by the reliability tests (the worker's LLaVA stream, its OpenAI API, the ECSO stream, run_llava and the
benchmark reader + generation runner).

A case is one of three kinds:

* ``request``: :func:`Case.build` returns a :class:`Req`, an API-neutral request (the user's text, image files as
  bytes, decoding parameters under their LLaVA names, fields to leave out or to send with a wrong type). Each target
  turns it into its own body (``adapt_*`` below).
* ``raw``: the exact HTTP body bytes (empty, not JSON, invalid UTF-8, ...), sent as they are to the HTTP APIs.
* ``question_file``: the bytes of a VLSafe question file, for the benchmark reader.

``expect`` is the outcome for every target, or a dict of per-target outcomes (``"*"`` is the default): ``ok``,
``invalid`` (400), ``image`` (400, an image problem), ``context`` (400, context overflow), ``not_found`` (404),
``too_large`` (413), or ``None`` where a case does not apply to a target. ``words`` must appear in the error message.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Req", "Case", "CASES", "TARGETS", "MAX_BODY", "MAX_IMAGES", "QUERY", "good_png", "expected",
           "adapt_llava", "adapt_openai", "adapt_ecso", "BASE_PROMPT"]

TARGETS = ("llava", "openai", "ecso", "cli", "reader")
MAX_BODY = 2_000_000  # the workers under test run with --max-request-bytes MAX_BODY
MAX_IMAGES = 3  # ... and --max-images-per-request MAX_IMAGES
QUERY = "What is in this picture?"
BASE_PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: {tags}{text} ASSISTANT:"


# ------------------------------------------------------------------------------------------------------- images


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(size: tuple[int, int] = (64, 40), mode: str = "RGB") -> Image.Image:
    img = Image.new("RGB", size, (240, 230, 210))
    ImageDraw.Draw(img).ellipse((8, 4, size[0] - 8, size[1] - 4), fill=(220, 120, 30))
    return img.convert(mode) if mode != "RGB" else img


def good_png() -> bytes:
    return _save(_picture(), "PNG")


def _jpeg() -> bytes:
    return _save(_picture(), "JPEG")


def _png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares ``width x height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _cmyk_jpeg() -> bytes:
    return _save(_picture(mode="CMYK"), "JPEG")


def _grey16_png() -> bytes:
    arr = np.linspace(0, 65535, 48 * 32, dtype=np.uint16).reshape(32, 48)
    return _save(Image.fromarray(arr), "PNG")


def _palette_alpha_png() -> bytes:
    img = _picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return _save(img, "PNG", transparency=0)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return _save(_picture((60, 30)), "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _one_pixel() -> bytes:
    return _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")


def _webp_or_bmp() -> bytes:
    return _save(_picture(), "BMP")


def _truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def _corrupt_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]


# -------------------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Req:
    """An API-neutral request. ``images``: image files (bytes) sent base64-encoded, or ``encoded`` strings sent as
    they are; ``extra_tags``: ``<image>`` tags beyond one per image (negative: fewer); ``params`` under LLaVA's
    names (max_new_tokens, temperature, top_p); ``wrong_type``: a field sent with a value of the wrong type
    (``text``, ``images``, ``params``); ``drop``: fields left out (``text``, ``model``)."""

    text: str = QUERY
    images: tuple[bytes, ...] = ()
    encoded: tuple[str, ...] | None = None
    extra_tags: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: the served model
    wrong_type: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def image_strings(self) -> list[str]:
        if self.encoded is not None:
            return list(self.encoded)
        return [base64.b64encode(b).decode() for b in self.images]


def _img(build: Callable[[], bytes]) -> Callable[[], Req]:
    return lambda: Req(images=(build(),))


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # request | raw | question_file
    build: Callable[[], Any]
    expect: str | dict[str, str | None] | None
    words: str = ""

    def outcome(self, target: str) -> str | None:
        if isinstance(self.expect, dict):
            return self.expect.get(target, self.expect.get("*"))
        return self.expect


def expected(case: Case, target: str) -> str | None:
    """The outcome ``case`` must have on ``target``; ``None``: the case does not apply there."""
    applies = {"request": ("llava", "openai", "ecso", "cli", "reader"), "raw": ("llava", "openai", "ecso"),
               "question_file": ("reader",)}[case.kind]
    return case.outcome(target) if target in applies else None


HTTP_ONLY = {"cli": None, "reader": None}
_BIG = "hello " * 5000  # ~5000 tokens: over the tiny model's 2048-token context (and LLaVA-1.5's 4096)


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


def _vlsafe_rows(*rows: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" if not isinstance(r, bytes) else r for r in rows)


_GOOD_ROW = {"image_id": "a.jpg", "query": "How do I do this?"}

CASES: tuple[Case, ...] = (
    # ---- bodies ------------------------------------------------------------------------------------------------
    Case("empty body", "raw", lambda: b"", "invalid"),
    Case("not JSON", "raw", lambda: b"hello, worker", "invalid"),
    Case("JSON array", "raw", lambda: b"[1, 2, 3]", "invalid"),
    Case("JSON null", "raw", lambda: b"null", "invalid"),
    Case("invalid UTF-8 in the body", "raw", lambda: b'{"model": "tiny", "prompt": "caf\xe9 \xff\xfe"}', "invalid"),
    Case("NaN temperature (non-standard JSON)", "raw",
         lambda: b'{"model": "tiny", "prompt": "hi", "temperature": NaN, "messages": [], "query": "q"}', "invalid"),
    Case("deeply nested JSON", "raw", lambda: _nested(100_000), "invalid"),
    Case("body over the size limit", "raw", lambda: b'{"prompt": "' + b"A" * (MAX_BODY + 10) + b'"}', "too_large",
         "--max-request-bytes"),
    Case("body 8x over the size limit", "raw", lambda: b'{"prompt": "' + b"A" * (8 * MAX_BODY) + b'"}', "too_large",
         "--max-request-bytes"),  # read and dropped before the 413, so the client gets it, not a reset
    # ---- fields ------------------------------------------------------------------------------------------------
    Case("text of the wrong type", "request", lambda: Req(wrong_type={"text": 123}), {**HTTP_ONLY, "*": "invalid"}),
    Case("images of the wrong type", "request", lambda: Req(wrong_type={"images": "abc"}),
         {**HTTP_ONLY, "*": "invalid"}),
    Case("temperature of the wrong type", "request", lambda: Req(wrong_type={"temperature": "hot"}),
         {**HTTP_ONLY, "*": "invalid"}, "temperature"),
    Case("text missing", "request", lambda: Req(drop=("text",)), {**HTTP_ONLY, "*": "invalid"}),
    Case("model missing", "request", lambda: Req(drop=("model",)),
         {**HTTP_ONLY, "*": "invalid", "ecso": "ok"}),  # the ECSO stream's model is optional
    Case("unknown model", "request", lambda: Req(model="llava-v1.5-13b"), {"*": "not_found", "reader": None},
         "llava-v1.5-13b"),
    # ---- decoding parameters -----------------------------------------------------------------------------------
    Case("negative max_new_tokens", "request", lambda: Req(params={"max_new_tokens": -5}),
         {"*": "invalid", "reader": None}, "max_"),
    Case("absurd max_new_tokens", "request", lambda: Req(params={"max_new_tokens": 10**12}),
         # LLaVA's worker clamps max_new_tokens (to 1024); ours clamps to the context window and 8192
         {"*": "invalid", "llava": "ok", "reader": None}, "max_"),
    Case("negative temperature", "request", lambda: Req(params={"temperature": -1.0}),
         {"*": "invalid", "reader": None}, "temperature"),
    Case("absurd temperature", "request", lambda: Req(params={"temperature": 1e30}),
         {"*": "invalid", "reader": None}, "temperature"),
    Case("top_p of zero", "request", lambda: Req(params={"top_p": 0.0, "temperature": 0.7}),
         {"*": "invalid", "reader": None}, "top_p"),
    Case("top_p above one", "request", lambda: Req(params={"top_p": 7.5, "temperature": 0.7}),
         {"*": "invalid", "reader": None}, "top_p"),
    Case("a thousand stop strings", "request", lambda: Req(params={"stop": ["x"] * 1000}),
         {"*": "invalid", "ecso": None, "cli": None, "reader": None}, "stop strings"),
    # ---- text --------------------------------------------------------------------------------------------------
    Case("prompt longer than the context window", "request", lambda: Req(text=_BIG),
         {"*": "context", "reader": None}, "context window"),
    Case("control characters and NUL in the text", "request",
         lambda: Req(text="line\x00one\x1b[31m red\x07\x08\ttab\r\nend\x7f"), {"*": "ok", "reader": None}),
    Case("lone surrogates in the text", "request", lambda: Req(text="broken \ud800 half \udfff pair"),
         {"*": "invalid", "reader": None}),  # JSON allows "\ud800"; tokenizers do not
    Case("empty text", "request", lambda: Req(text=""), {"*": "ok", "ecso": "invalid", "cli": "ok", "reader": None}),
    # ---- images ------------------------------------------------------------------------------------------------
    Case("invalid base64", "request", lambda: Req(encoded=("not base64!",)), {**HTTP_ONLY, "*": "image"},
         "base64"),
    Case("base64 of a non-image", "request", lambda: Req(images=(b"just some text, not pixels",)), "image",
         "not a readable image"),
    Case("zero-byte image", "request", lambda: Req(images=(b"",)), "image", "empty"),
    Case("truncated PNG", "request", _img(lambda: _truncated(_save(_picture((200, 120)), "PNG"), 0.5)), "image"),
    Case("truncated JPEG", "request", _img(lambda: _truncated(_save(_picture((200, 120)), "JPEG"), 0.4)), "image"),
    Case("JPEG header only", "request", _img(lambda: _jpeg()[:20]), "image"),
    Case("corrupt PNG data", "request", _img(lambda: _corrupt_middle(_save(_picture((200, 120)), "PNG"))), "image"),
    Case("decompression bomb (50000 x 50000 PNG)", "request", _img(lambda: _png_declaring(50_000, 50_000)), "image",
         "pixels"),
    Case("over --max-image-pixels (8000 x 8000 PNG header)", "request", _img(lambda: _png_declaring(8000, 8000)),
         "image", "pixels"),
    Case("zero-width PNG header", "request", _img(lambda: _png_declaring(0, 16)), "image"),
    Case("1x1 image", "request", _img(_one_pixel), "ok"),
    Case("CMYK JPEG", "request", _img(_cmyk_jpeg), "ok"),
    Case("16-bit greyscale PNG", "request", _img(_grey16_png), "ok"),
    Case("palette PNG with transparency", "request", _img(_palette_alpha_png), "ok"),
    Case("EXIF-rotated JPEG", "request", _img(_exif_rotated_jpeg), "ok"),
    Case("animated GIF (first frame)", "request", _img(_animated_gif), "ok"),
    Case("BMP", "request", _img(_webp_or_bmp), "ok"),
    Case("more <image> tags than images", "request", lambda: Req(images=(good_png(),), extra_tags=1),
         {"*": "invalid", "reader": None, "cli": None}, "<image> tag"),
    Case("more images than <image> tags", "request", lambda: Req(images=(good_png(), good_png()), extra_tags=-1),
         {"*": "invalid", "openai": None, "ecso": None, "cli": None, "reader": None}, "<image> tag"),
    Case("more images than --max-images-per-request", "request",
         lambda: Req(images=(good_png(),) * (MAX_IMAGES + 1)),
         {"*": "invalid", "ecso": None, "cli": None, "reader": None}, "--max-images-per-request"),
    Case("text with an <image> tag but no image", "request", lambda: Req(text="<image>\nWhat is this?"),
         {"*": "invalid", "cli": "invalid", "reader": None}, "<image> tag"),
    # ---- question files (benchmark readers) --------------------------------------------------------------------
    Case("zero-byte question file", "question_file", lambda: b"", "invalid", "no rows"),
    Case("question file not JSON", "question_file", lambda: b"image_id,query\na.jpg,hi\n", "invalid", "not valid JSON"),
    Case("question file with invalid UTF-8", "question_file", lambda: b'{"image_id": "a.jpg", "query": "\xff\xfe"}\n',
         "invalid"),
    Case("question row without a query", "question_file", lambda: _vlsafe_rows({"image_id": "a.jpg"}), "invalid",
         "query"),
    Case("question row with a numeric query", "question_file", lambda: _vlsafe_rows({"image_id": "a.jpg", "query": 5}),
         "invalid", "query"),
    Case("question row that is a list", "question_file", lambda: _vlsafe_rows(_GOOD_ROW, [1, 2]), "invalid"),
    Case("question file with a torn last line", "question_file",
         lambda: _vlsafe_rows(_GOOD_ROW) + b'{"image_id": "b.jpg", "que', "invalid", "not valid JSON"),
)


# ----------------------------------------------------------------------------------------------------- adapters


def _params(req: Req) -> dict[str, Any]:
    return {"max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0, "stop": "</s>", **req.params}


def _apply_wrong_types(body: dict[str, Any], req: Req, names: dict[str, str]) -> dict[str, Any]:
    for key, value in req.wrong_type.items():
        body[names.get(key, key)] = value
    for key in req.drop:
        body.pop(names.get(key, key), None)
    return body


def adapt_llava(req: Req, model: str) -> dict[str, Any]:
    """``/worker_generate_stream``: a vicuna_v1 prompt with one ``<image>`` tag per image (plus ``extra_tags``)."""
    images = req.image_strings()
    tags = "<image>\n" * max(0, len(images) + req.extra_tags)
    prompt = BASE_PROMPT.format(tags=tags, text=req.text)
    p = _params(req)
    body = {"model": req.model or model, "prompt": prompt, "images": images, "temperature": p["temperature"],
            "top_p": p["top_p"], "max_new_tokens": p["max_new_tokens"], "stop": p["stop"]}
    return _apply_wrong_types(body, req, {"text": "prompt"})


def adapt_openai(req: Req, model: str) -> dict[str, Any]:
    """``/v1/chat/completions``: the images as data URLs, then the text (``<image>`` tags become literal text)."""
    images = req.image_strings()
    text = "<image>\n" * max(0, req.extra_tags) + req.text
    content: Any = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{s}"}} for s in images]
    content.append({"type": "text", "text": text})
    if "text" in req.wrong_type:
        content = req.wrong_type["text"]
    p = _params(req)
    body: dict[str, Any] = {"model": req.model or model, "messages": [{"role": "user", "content": content}],
                            "max_tokens": p["max_new_tokens"], "temperature": p["temperature"], "top_p": p["top_p"],
                            "stop": p["stop"]}
    if "images" in req.wrong_type:
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": req.wrong_type["images"]}]
    if "temperature" in req.wrong_type:
        body["temperature"] = req.wrong_type["temperature"]
    if "text" in req.drop:
        body["messages"] = [{"role": "user"}]
    if "model" in req.drop:
        body.pop("model")
    return body


def adapt_ecso(req: Req, model: str) -> dict[str, Any]:
    """``/worker_ecso_stream``: one image (or none) and the query; decoding parameters as options."""
    images = req.image_strings()
    p = _params(req)
    query = "<image>\n" * max(0, req.extra_tags) + req.text
    body: dict[str, Any] = {"model": req.model or model, "image": images[0] if images else None, "query": query,
                            "options": {"max_new_tokens": p["max_new_tokens"], "temperature": p["temperature"],
                                        "top_p": p["top_p"]}}
    if "temperature" in req.wrong_type:
        body["options"]["temperature"] = req.wrong_type["temperature"]
    wrong = {k: v for k, v in req.wrong_type.items() if k != "temperature"}
    return _apply_wrong_types(body, replace(req, wrong_type=wrong), {"text": "query", "images": "image"})
