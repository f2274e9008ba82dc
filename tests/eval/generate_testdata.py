"""Shared by the generation runner tests: small benchmark layouts built in tmp_path from the real question files in data/
(images drawn with PIL), a deterministic fake backend, and an in-process ``generate`` call."""
from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from llava.ecso.backends import Backend, StepRequest
from llava.errors import BackendError

TINY_ARGS = ["--model-path", "tiny", "--device", "cpu", "--max-new-tokens", "8", "--no-progress"]


def draw_image(path: Path | None, seed: int, size=(48, 36)) -> bytes:
    """A small structured JPEG (different per seed); written to ``path`` when given; returns its bytes."""
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, 120))
    ImageDraw.Draw(img).rectangle((seed % 20, 4, seed % 20 + 12, 20), fill=(250, 250, (seed * 31) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _jsonl(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def make_vlsafe(root: Path, ref: Path, n: int) -> list[str]:
    """--question-file/--image-folder args for the first ``n`` VLSafe rows (images drawn under root/coco)."""
    qf = ref / "vlsafe" / "examine_sampled_500_VLSafe.jsonl"
    for i, row in enumerate(_jsonl(qf, n)):
        draw_image(root / "coco" / row["image_id"], i)
    return ["--benchmark", "vlsafe", "--question-file", str(qf), "--image-folder", str(root / "coco"),
            "--limit", str(n)]


def make_mmsafe(root: Path, ref: Path, n: int, scenario: str = "01-Illegal_Activitiy", mode: str = "SD_TYPO",
                layout_root: Path | None = None) -> list[str]:
    """Images ``{root}/imgs/{scenario}/{mode}/{id}.jpg`` for the scenario's first ``n`` questions."""
    qf = ref / "mmsafetybench" / "processed_questions" / f"{scenario}.json"
    keys = list(json.loads(qf.read_text(encoding="utf-8")))[:n]
    for i, key in enumerate(keys):
        draw_image((layout_root or root / "imgs") / scenario / mode / f"{key}.jpg", i)
    return ["--benchmark", "mmsafetybench", "--question-file", str(qf), "--image-folder", str(root / "imgs"),
            "--mode", mode, "--limit", str(n)]


def make_mme(root: Path, ref: Path, n: int) -> list[str]:
    qf = ref / "mme" / "llava_mme.jsonl"
    for i, row in enumerate(_jsonl(qf, n)):
        draw_image(root / "MME" / row["image"], i)
    return ["--benchmark", "mme", "--question-file", str(qf), "--image-folder", str(root / "MME"),
            "--limit", str(n)]


def make_mmvet(root: Path, ref: Path, n: int) -> list[str]:
    qf = ref / "mmvet" / "llava-mm-vet.jsonl"
    for i, row in enumerate(_jsonl(qf, n)):
        draw_image(root / "mmvet" / row["image"], i)
    return ["--benchmark", "mmvet", "--question-file", str(qf), "--image-folder", str(root / "mmvet"),
            "--limit", str(n)]


def make_mmbench(root: Path, ref: Path, n: int) -> list[str]:
    """The first ``n`` rows of the (text-only) MMBench dev tsv with a base64 image column added."""
    import pandas as pd

    table = pd.read_table(ref / "mmbench" / "mmbench_dev_20230712_text_only.tsv").head(n).copy()
    table["image"] = [base64.b64encode(draw_image(None, i)).decode() for i in range(len(table))]
    out = root / "mmbench.tsv"
    table.to_csv(out, sep="\t", index=False)
    return ["--benchmark", "mmbench", "--question-file", str(out)]


MAKERS = {"vlsafe": make_vlsafe, "mmsafetybench": make_mmsafe, "mme": make_mme, "mmbench": make_mmbench,
          "mmvet": make_mmvet}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def by_id(rows: Sequence[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


class FakeBackend(Backend):
    """Deterministic answers that depend on the prompt and the image (so a wrong image or prompt shows), a yes/no
    score from the text, optional failures for prompts containing ``fail_on``, and a count of calls."""

    name = "fake"
    supports_score = True

    def __init__(self, fail_on: str | None = None, delay: float = 0.0):
        self.fail_on = fail_on
        self.delay = delay
        self.calls = 0
        self.max_batch = 0
        self._lock = threading.Lock()
        self.closed = False

    def _answer(self, r: StepRequest) -> str:
        if self.fail_on and self.fail_on in r.text:
            raise BackendError(f"fake failure on {self.fail_on!r}")
        pixel = r.images[0].getpixel((0, 0)) if r.images else None
        return f"ans[{len(r.text)}|{pixel}|{r.params.max_new_tokens}]"

    def generate(self, requests: Sequence[StepRequest]) -> list[str]:
        import time

        with self._lock:
            self.calls += 1
            self.max_batch = max(self.max_batch, len(requests))
        if self.delay:
            time.sleep(self.delay)
        return [self._answer(r) for r in requests]

    def score_yes_no(self, requests: Sequence[StepRequest]) -> list[float]:
        for r in requests:
            self._answer(r)
        return [0.9 if len(r.text) % 3 == 0 else 0.1 for r in requests]

    def describe(self) -> dict:
        return {"backend": self.name, "model_name": "fake-model"}

    def close(self) -> None:
        self.closed = True
