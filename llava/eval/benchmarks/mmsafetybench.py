"""MM-SafetyBench: ``processed_questions/{scenario}.json`` (a JSON object keyed by question id; ids are not
contiguous in every scenario, so the keys are iterated, never a range) and images
``{image_folder}/{scenario}/{SD|TYPO|SD_TYPO}/{id}.jpg``. Mode ``text`` asks the original question without an image.

Judged with a prompt per scenario (``SCENARIO_PROMPTS``): 01-07 and 09 general safety, 08 political lobbying
(refusing is safe), 10 legal, 11 financial, 12 health (safe only when the answer says it lacks the relevant
qualification and urges caution), 13 government decisions (refusing is safe). The paper's scripts judged only
``PAPER_SCENARIOS``; we judge all 13 and the metrics report both views."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from llava.errors import InvalidRequestError
from llava.eval.benchmarks.base import BenchmarkConfig, DatasetError, Sample
from llava.eval.benchmarks.spec import BenchmarkSpec, BenignCounterpart, DataLayout, JudgeProtocol, SeedScript

__all__ = [
    "SPEC",
    "MODES",
    "IMAGE_MODES",
    "QUERY_FIELD_BY_MODE",
    "TINY_LIST_NAME",
    "MMSB_SCENARIOS",
    "PAPER_SCENARIOS",
    "SCENARIO_PROMPTS",
    "scenario_number",
    "judge_prompt",
    "scenario_files",
    "select_scenarios",
    "load_tiny_ids",
    "iter_questions",
    "read_mmsafetybench",
    "seed_image_folder",
]

logger = logging.getLogger(__name__)

# The question field each mode asks (as MM-SafetyBench and the ECSO seed script model_mmsafe.py do).
QUERY_FIELD_BY_MODE = {
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
    "text": "Question",
}
MODES = tuple(QUERY_FIELD_BY_MODE)
IMAGE_MODES = ("SD", "TYPO", "SD_TYPO")
DEFAULT_MODE = "SD_TYPO"
TINY_LIST_NAME = "TinyVersion_ID_List.json"
_SCENARIO_PREFIX = re.compile(r"^(\d+)-")
MMSB_SCENARIOS = (
    "01-Illegal_Activitiy",  # sic: the dataset's spelling
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
PAPER_SCENARIOS = tuple(s for s in MMSB_SCENARIOS if s[:2] in ("01", "02", "03", "04", "05", "06", "07", "09"))
# The judge prompt (by name, in the judge's prompt set) of each scenario number.
SCENARIO_PROMPTS = {
    **{n: "query_safety" for n in ("01", "02", "03", "04", "05", "06", "07", "09")},
    "08": "query_political",
    "10": "query_safety_legal",
    "11": "query_safety_financial",
    "12": "query_safety_health",
    "13": "query_safety_gov",
}


def scenario_number(scenario: Any) -> str:
    """``"01-Illegal_Activitiy"``, ``"01"`` or ``1`` -> ``"01"``; anything else raises, listing the scenarios."""
    text = str(scenario or "").strip()
    number = text.split("-")[0].zfill(2) if text else ""
    if number not in SCENARIO_PROMPTS:
        raise InvalidRequestError(f"unknown MM-SafetyBench scenario {scenario!r}; valid: {list(MMSB_SCENARIOS)}")
    return number


def judge_prompt(row: dict[str, Any]) -> str:
    """The judge prompt of an answer row: its scenario's."""
    return SCENARIO_PROMPTS[scenario_number(row.get("scenario"))]


def scenario_files(question_file: str | Path) -> dict[str, Path]:
    """Scenario name -> question file, from one ``{scenario}.json`` or a folder of them (``processed_questions``;
    a folder that contains ``processed_questions`` is accepted too). Sorted by name."""
    path = Path(question_file).expanduser()
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        raise DatasetError(f"MM-SafetyBench question file or folder not found: {path}")
    if (path / "processed_questions").is_dir():
        path = path / "processed_questions"
    files = {p.stem: p for p in sorted(path.glob("*.json")) if p.name != TINY_LIST_NAME}
    if not files:
        raise DatasetError(f"no scenario files (*.json) in {path}")
    return files


def select_scenarios(available: list[str], wanted: tuple[str, ...]) -> list[str]:
    """``available`` filtered to ``wanted`` (full names, or number prefixes such as "01" / "1"), in file order."""
    if not wanted:
        return list(available)
    by_number = {int(m.group(1)): name for name in available if (m := _SCENARIO_PREFIX.match(name))}
    chosen = set()
    for want in wanted:
        name = want if want in available else by_number.get(int(want)) if want.isdigit() else None
        if name is None:
            raise DatasetError(f"unknown MM-SafetyBench scenario {want!r}; available: {', '.join(available)}")
        chosen.add(name)
    return [name for name in available if name in chosen]


def load_tiny_ids(path: str | Path) -> dict[str, set[str]]:
    """TinyVersion_ID_List.json (a list of ``{"Scenario": name, "Sampled_ID_List": [int, ...]}``) as
    scenario -> set of question ids (strings, the keys of the scenario files)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"tiny subset list not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {e["Scenario"]: {str(i) for i in e["Sampled_ID_List"]} for e in entries}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: expected a list of {{Scenario, Sampled_ID_List}} objects ({e!r})") from e


def _read_scenario(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DatasetError(f"{path}: expected a JSON object keyed by question id, each value an object")
    return data


def iter_questions(question_file: str | Path, scenarios: tuple[str, ...] = (),
                   tiny_list: str | Path | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(scenario, question id, question row) in scenario order, then file key order; filtered by scenario and by
    the tiny subset when given. Shared by the reader and the TYPO image renderer."""
    files = scenario_files(question_file)
    tiny = load_tiny_ids(tiny_list) if tiny_list is not None else None
    for scenario in select_scenarios(list(files), scenarios):
        data = _read_scenario(files[scenario])
        keep = None if tiny is None else tiny.get(scenario, set())
        if keep is not None and (absent := sorted(keep - set(data), key=int)):
            logger.warning("tiny list ids not in %s: %s", files[scenario], absent)
        for qid, row in data.items():
            if keep is None or qid in keep:
                yield scenario, qid, row


def _resolve_mode(mode: str | None) -> str:
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in QUERY_FIELD_BY_MODE:
        raise DatasetError(f"unknown MM-SafetyBench mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def read_mmsafetybench(config: BenchmarkConfig) -> Iterator[Sample]:
    """One sample per question for the configured mode; id ``{scenario}/{mode}/{question_id}``."""
    mode = _resolve_mode(config.mode)
    field = QUERY_FIELD_BY_MODE[mode]
    for scenario, qid, row in iter_questions(config.question_file, config.scenarios, config.tiny_list):
        if field not in row:
            raise DatasetError(f"{scenario} question {qid} has no {field!r} field (mode {mode}); has {sorted(row)}")
        if not isinstance(row[field], str):
            raise DatasetError(f"{scenario} question {qid}: {field!r} must be a string, got {row[field]!r:.80}")
        image_name = None if mode == "text" else f"{scenario}/{mode}/{qid}.jpg"
        image = None if image_name is None else str(Path(config.image_folder) / image_name)
        meta = {"scenario": scenario, "mode": mode, "question_id": qid, "key_phrase": row.get("Key Phrase"),
                "phrase_type": row.get("Phrase Type"), "question": row.get("Question")}
        yield Sample(id=f"{scenario}/{mode}/{qid}", image=image, query=row[field], meta=meta,
                     benchmark="mmsafetybench", image_name=image_name)


def seed_image_folder(image_folder: str, question_file: str) -> str:
    """The seed passed a scenario's own image folder (``images/{scenario}`` with ``{scenario}.json``); the reader
    wants the folder above it."""
    if image_folder and Path(image_folder).name == Path(question_file).stem:
        return str(Path(image_folder).parent)
    return image_folder


SPEC = BenchmarkSpec(
    name="mmsafetybench",
    summary="MM-SafetyBench: 13 scenarios x modes SD / TYPO / SD_TYPO (images) and text (no image)",
    reader=read_mmsafetybench,
    id_fields=("scenario", "mode", "question_id"),
    question_file="processed_questions/{scenario}.json, or the processed_questions folder",
    image_folder="{image_folder}/{scenario}/{SD|TYPO|SD_TYPO}/{id}.jpg",
    metric="safety",
    options={"mode": f"image kind SD, TYPO, SD_TYPO, or text (no image); default {DEFAULT_MODE}",
             "scenarios": "comma-separated scenarios to keep (names or numbers, e.g. 01,05)",
             "tiny_list": f"path to {TINY_LIST_NAME}; keep the tiny subset"},
    modes=MODES,
    default_mode=DEFAULT_MODE,
    layout=DataLayout("data/mmsafe/processed_questions", "data/mmsafe/images"),
    seed_scripts=(SeedScript("model_mmsafe", "MM-SafetyBench direct answers", "direct", 2048),
                  SeedScript("model_mmsafe_tell_ask", "MM-SafetyBench ECSO", "ecso", 1024)),
    seed_image_folder=seed_image_folder,
    judge=JudgeProtocol(judge_prompt, "per-scenario safe/unsafe prompts"),
    benign=BenignCounterpart("xstest", {"TYPO": "typo", "SD_TYPO": "typo", "SD": "blank", "text": "text"},
                             "XSTest's safe prompts: TYPO images of their key phrase for TYPO and SD_TYPO, a blank "
                             "image for SD, text for text"),
)
