"""What an answer file was made with (the manifest's ``settings``) and whether a run may continue it: the data and
method part is known before the model loads (enough to skip a finished file), the model part once it has."""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from llava.ecso.backends import Backend
from llava.ecso.defenses import get_defense
from llava.ecso.prompts import get_prompt_set
from llava.eval.gen.config import GenerateConfig
from llava.eval.gen.manifest import (UNCOMPARED_MODEL_KEYS, ResumeMismatchError, file_digest, ids_digest,
                                     manifest_path, settings_diff)

__all__ = ["data_settings", "model_settings", "check_resume"]

logger = logging.getLogger(__name__)


def data_settings(config: GenerateConfig) -> dict[str, Any]:
    """Benchmark, method, dataset digests and options, decoding, ECSO options, where direct answers come from."""
    d = config.data
    return {"benchmark": config.benchmark, "method": config.method,
            "data": {"question_file_sha256": file_digest(d.question_file), "mode": d.mode,
                     "scenarios": list(d.scenarios), "tiny_list_sha256": file_digest(d.tiny_list),
                     "gt_file_sha256": file_digest(d.gt_file)},
            "decoding": asdict(config.decoding),
            "ecso": _ecso_settings(config), "direct_answers": "from_answers" if config.from_answers else "generated",
            **_defense_settings(config)}


def _defense_settings(config: GenerateConfig) -> dict[str, Any]:
    """Methods other than direct and ecso record what they are (their prompts, their ECSO overrides); direct and
    ecso record nothing more, so the settings of answer files made before the defenses existed still match."""
    if config.method in ("direct", "ecso"):
        return {}
    return {"defense": get_defense(config.method).describe(config.ecso)}


def _ecso_settings(config: GenerateConfig) -> dict[str, Any] | None:
    if not config.uses_pipeline:
        return None
    ecso = get_defense(config.method).configured(config.ecso)
    prompts = get_prompt_set(ecso.prompt_set)
    return {**ecso.to_dict(), "prompts_sha256": ids_digest([prompts.harm_check, prompts.caption, prompts.safe])}


def model_settings(backend: Backend, verdict_used: str | None) -> dict[str, Any]:
    """The backend's description (its device left out: ranks differ) and, for ECSO, the verdict mode it allows."""
    desc = {k: v for k, v in backend.describe().items() if k not in UNCOMPARED_MODEL_KEYS}
    if verdict_used is not None:
        desc["verdict_used"] = verdict_used
    return desc


def check_resume(old: dict[str, Any] | None, has_rows: bool, new: dict[str, Any], config: GenerateConfig,
                  compare_model: bool) -> list[str]:
    """The differences between the answer file's settings and this run's; raises unless --force-mismatch."""
    if old is None:
        if not has_rows:
            return []
        diffs = [f"{config.answers_file} has answers but no manifest ({manifest_path(config.answers_file).name})"]
    else:
        a, b = dict(old["settings"]), dict(new)
        if not compare_model:
            a.pop("model", None)
            b.pop("model", None)
        diffs = settings_diff(a, b)
    if diffs and not config.force_mismatch:
        raise ResumeMismatchError(
            f"{config.answers_file} was started with other settings; resuming would mix answers:\n  "
            + "\n  ".join(diffs) + "\nUse another --answers-file, --overwrite to start again, or --force-mismatch "
            "to resume anyway")
    if diffs:
        logger.warning("resuming despite different settings (--force-mismatch): %s", "; ".join(diffs))
    return diffs
