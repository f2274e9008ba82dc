"""Session fixtures of the training tests: MM-SafetyBench TYPO images rendered with the project's renderer, one
ECSO SFT data run on the tiny model, and one 30-step LoRA run on its rows (each made once per test session)."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava.eval.mmsafetybench_images import RenderConfig, render_all

SCENARIO_TRAIN, SCENARIO_HELD_OUT = "01-Illegal_Activitiy", "02-HateSpeech"
SFT_LIMIT = 4
LORA = {"max_steps": 30, "lora_r": 8, "lora_alpha": 16, "lr": 1e-2, "batch_size": 2, "seed": 0}


def questions(ref: Path, scenario: str) -> Path:
    return ref / "mmsafetybench" / "processed_questions" / f"{scenario}.json"


def sft_args(ref: Path, images: Path, out: Path, *extra: str) -> list[str]:
    """sft_data's flags for the first SFT_LIMIT TYPO questions of the training scenario on the tiny model, with the
    threshold at 0 so every sample is flagged and gets ECSO's safe answer."""
    return ["--benchmark", "mmsafetybench", "--mode", "TYPO", "--question-file", str(questions(ref, SCENARIO_TRAIN)),
            "--image-folder", str(images), "--limit", str(SFT_LIMIT), "--model-path", "tiny", "--device", "cpu",
            "--max-new-tokens", "8", "--threshold", "0", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def typo_images(ref_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmsb-typo")
    for scenario in (SCENARIO_TRAIN, SCENARIO_HELD_OUT):
        render_all(RenderConfig(questions(ref_data, scenario), out, modes=("TYPO",)))
    return out


@pytest.fixture(scope="session")
def sft_run(ref_data, typo_images, tmp_path_factory) -> Path:
    """The SFT JSON of an uninterrupted sft_data run (its .ecso.jsonl and manifests beside it)."""
    from llava.train.sft_data import main

    out = tmp_path_factory.mktemp("sft") / "sft.json"
    assert main(sft_args(ref_data, typo_images, out, "--batch-size", "4")) == 0
    return out


@pytest.fixture(scope="session")
def lora_run(sft_run, typo_images, tmp_path_factory):
    """30 LoRA steps on the SFT rows (tiny model, fixed seed): the TrainResult; the checkpoint is in .out."""
    from llava.train.lora import TrainConfig, train

    out = tmp_path_factory.mktemp("lora") / "tiny-ecso-lora"
    return train(TrainConfig(data=sft_run, image_folder=typo_images, model_path="tiny", out=out, **LORA))
