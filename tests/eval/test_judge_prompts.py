import json

import pytest

from llava.eval.judge.prompts import PromptSetError, default_prompt_set, load_prompt_set
from llava.eval.benchmarks.mmsafetybench import MMSB_SCENARIOS, PAPER_SCENARIOS, SCENARIO_PROMPTS, scenario_number
from llava.eval.judge.protocols import build_tasks, prompt_name_for
from llava.errors import InvalidRequestError

PAPER_FILE = "judge_prompts/ecso_vlsafe_judge.jsonl"
VALUES = {"question": "How do I {answer} this? 100% \\n {{x}}", "answer": "Step 1: {question}. Done — ünïcode ✓",
          "critic": "The critique {critic}."}


def _line(**over):
    obj = {"name": "p", "system_prompt": "s", "prompt_template": "Q: {question} A: {answer}", "output_format": "[[rating]]"}
    obj.update(over)
    return json.dumps(obj)


def test_paper_file_fills_byte_for_byte(ref_data):
    path = ref_data / PAPER_FILE
    ps = load_prompt_set(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert {r["name"] for r in raw} == set(ps.prompts)
    for r in raw:
        p = ps.get(r["name"])
        # the seed filled with str.format(question=..., answer=..., critic=...)
        expected = r["prompt_template"].format(**VALUES)
        filled = p.fill(**VALUES)
        assert filled.encode("utf-8") == expected.encode("utf-8"), r["name"]
        assert p.messages(**VALUES) == [{"role": "system", "content": r["system_prompt"]},
                                        {"role": "user", "content": expected}]
    assert ps.sha256 != default_prompt_set().sha256


def test_paper_file_query_prompts_need_only_the_answer(ref_data):
    ps = load_prompt_set(ref_data / PAPER_FILE)
    for name in set(SCENARIO_PROMPTS.values()):
        assert ps.get(name).placeholders == ("answer",)
        assert ps.get(name).verdict_kind == "safe_unsafe"
    assert ps.get("llm_binary_strict").verdict_kind == "binary"
    assert ps.get("llm_score").verdict_kind == "rating"


def test_default_set_covers_every_protocol():
    ps = default_prompt_set()
    assert "llm_binary_strict" in ps
    for scenario in MMSB_SCENARIOS:
        name = prompt_name_for("mmsafetybench", "auto", {"scenario": scenario})
        assert ps.get(name).verdict_kind == "safe_unsafe"
        assert "{answer}" in ps.get(name).prompt_template
    assert ps.get("llm_binary_strict").verdict_kind == "binary"


def test_scenarios():
    assert len(MMSB_SCENARIOS) == 13 and len(PAPER_SCENARIOS) == 8
    assert [s[:2] for s in PAPER_SCENARIOS] == ["01", "02", "03", "04", "05", "06", "07", "09"]
    assert SCENARIO_PROMPTS["08"] == "query_political" and SCENARIO_PROMPTS["12"] == "query_safety_health"
    assert scenario_number("8") == "08" and scenario_number("13-Gov_Decision") == "13"
    with pytest.raises(InvalidRequestError, match="14-Nope"):
        scenario_number("14-Nope")


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 2: invalid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({"name": "x", "system_prompt": "", "prompt_template": "t"}), "line 2: missing field 'output_format'"),
    (_line(name="x", system_prompt=3), "line 2: field 'system_prompt' must be a string"),
    (_line(name="x", prompt_template="Q {question} {foo}"), r"line 2: prompt 'x' has unknown placeholders \['foo'\]"),
    (_line(name="x", output_format="weird"), "line 2: .*cannot tell how to parse"),
    (_line(name="x", verdict="nope"), "line 2: .*unknown verdict kind 'nope'"),
    (_line(name="p", prompt_template="other {answer}"), "line 2: prompt 'p' differs from the one on line 1"),
])
def test_loader_errors_name_the_line(tmp_path, line, match):
    path = tmp_path / "set.jsonl"
    path.write_text(_line() + "\n" + line + "\n")
    with pytest.raises(PromptSetError, match=match):
        load_prompt_set(path)


def test_identical_duplicates_and_extra_fields_are_accepted(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(_line(type="single") + "\n\n" + _line(type="single") + "\n")
    ps = load_prompt_set(path)
    assert list(ps.prompts) == ["p"] and ps.get("p").extra == {"type": "single"}
    with pytest.raises(PromptSetError, match=r"no prompt named 'q'.*\['p'\]"):
        ps.get("q")
    with pytest.raises(PromptSetError, match="cannot read"):
        load_prompt_set(tmp_path / "missing.jsonl")


def test_fill_requires_values_and_is_single_pass():
    p = default_prompt_set().get("llm_binary_strict")
    with pytest.raises(InvalidRequestError, match=r"needs \['answer'\]"):
        p.fill(question="q")
    text = p.fill(question="{answer}", answer="{question}")
    assert "[User request]\n{answer}\n" in text and "[Assistant reply]\n{question}\n" in text


def test_build_tasks_ids_prompts_and_keys():
    ps = default_prompt_set()
    rows = [{"id": "a", "query": "q", "text": "t", "scenario": "08-Political_Lobbying", "mode": "SD", "unsafe": "No"},
            {"id": "b", "query": "q", "text": "t", "scenario": "12-Health_Consultation", "mode": "TYPO"}]
    tasks = build_tasks(rows, benchmark="mmsafetybench", mode="auto", prompts=ps, judge_model="m", params={"temperature": 0})
    assert [t.prompt.name for t in tasks] == ["query_political", "query_safety_health"]
    assert tasks[0].fields == {"benchmark": "mmsafetybench", "scenario": "08-Political_Lobbying", "mode": "SD", "unsafe": "No"}
    other = build_tasks(rows, benchmark="mmsafetybench", mode="auto", prompts=ps, judge_model="m2", params={"temperature": 0})
    assert tasks[0].key != other[0].key and len(tasks[0].key) == 64
    forced = build_tasks(rows, benchmark="mmsafetybench", mode="query_safety", prompts=ps, judge_model="m", params={})
    assert {t.prompt.name for t in forced} == {"query_safety"}
    with pytest.raises(InvalidRequestError, match="duplicate answer id 'a'"):
        build_tasks(rows + rows[:1], benchmark="mmsafetybench", mode="auto", prompts=ps, judge_model="m", params={})
    with pytest.raises(InvalidRequestError, match="has no 'direct' field"):
        build_tasks(rows, benchmark="mmsafetybench", mode="auto", prompts=ps, judge_model="m", params={},
                    answer_field="direct")
