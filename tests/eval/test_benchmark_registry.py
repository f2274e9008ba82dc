"""A benchmark is one module plus one registry entry: every tool reads its spec. A toy benchmark registered for the
test goes through read -> judge (the stub judge, over HTTP) -> metrics -> report -> submission, and every CLI offers
exactly the registry's benchmarks."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import JudgeServer  # noqa: E402

from llava.errors import InvalidRequestError  # noqa: E402
from llava.eval import datasets, formats, generate  # noqa: E402
from llava.eval.benchmarks import (BENCHMARKS, BenchmarkConfig, BenchmarkSpec, JudgeProtocol, Sample,  # noqa: E402
                                   SubmissionFormat, answer_fields, benchmark_names, get_benchmark, load_samples)
from llava.eval.jsonl import read_jsonl  # noqa: E402
from llava.eval.judge import JudgeConfig, JudgeRunner  # noqa: E402
from llava.eval.judge.cli import build_parser as judge_parser  # noqa: E402
from llava.eval.judge.cli import main as judge_main  # noqa: E402
from llava.eval.judge.prompts import DEFAULT_PROMPT_FILE, default_prompt_set  # noqa: E402
from llava.eval.judge.protocols import prompt_name_for  # noqa: E402
from llava.eval.metrics import METRICS, compute  # noqa: E402
from llava.eval.metrics.cli import build_parser as metrics_parser  # noqa: E402
from llava.eval.metrics.cli import main as metrics_main  # noqa: E402
from llava.eval.report import build_report  # noqa: E402


def read_toy(config):
    for row in read_jsonl(config.question_file):
        yield Sample(id=row["id"], image=None, query=row["q"], meta={"topic": row["topic"]}, benchmark="toy")


def write_toy(answers, args):
    Path(args.out).write_text(json.dumps({a["id"]: a["text"] for a in answers}))
    return f"wrote {args.out}"


TOY = BenchmarkSpec(
    name="toy", summary="a toy text-only safety benchmark", reader=read_toy, id_fields=("topic",),
    question_file="toy.jsonl (id, q, topic)", image_folder="none", metric="safety",
    judge=JudgeProtocol("llm_binary_strict", "0/1 strict rating"),
    submission=SubmissionFormat("toy JSON {id: answer}", lambda p: p.add_argument("--out", required=True), write_toy))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "toy", TOY)
    return TOY


def _choices(parser, dest="benchmark"):
    return list(next(a.choices for a in parser._actions if a.dest == dest))


def test_every_cli_offers_the_registry(toy):
    every = benchmark_names()
    assert every[-1] == "toy"
    assert _choices(datasets.build_parser()) == every and _choices(generate.build_parser()) == every
    assert _choices(metrics_parser()) == every
    assert _choices(judge_parser()) == ["vlsafe", "mmsafetybench", "mmvet", "figstep", "xstest", "toy"]
    assert _choices(formats.build_parser(), "format") == ["mme", "mmbench", "mmvet", "toy"]


def test_a_registered_benchmark_runs_through_every_tool(toy, tmp_path, monkeypatch, capsys):
    qf = tmp_path / "toy.jsonl"
    qf.write_text("".join(json.dumps({"id": f"t{i}", "q": f"question {i}", "topic": "x"}) + "\n" for i in range(4)))
    samples = load_samples("toy", BenchmarkConfig(qf))
    rows = [{**answer_fields(s), "method": "direct", "text": f"<<id:{s.id}>><<say:Rating: [[{i % 2}]]>>",
             "model_id": "m"} for i, s in enumerate(samples)]
    assert rows[0]["topic"] == "x" and rows[0]["benchmark"] == "toy"
    answers = tmp_path / "run" / "toy.direct.jsonl"
    answers.parent.mkdir()
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with JudgeServer() as srv:
        assert judge_main(["--answers", str(answers), "--benchmark", "toy", "--judge-model", "stub",
                           "--judge-base-url", srv.base_url, "--backoff-base", "0.001"]) == 0
    judgments = answers.with_name("toy.direct.judgments.jsonl")
    assert {r["prompt_name"] for r in read_jsonl(judgments, log=True)} == {"llm_binary_strict"}
    overall = compute("toy", answers, judgments)["overall"]
    assert (overall["harmless_rate_paper"]["k"], overall["harmless_rate_paper"]["n"]) == (2, 4)
    capsys.readouterr()
    assert metrics_main(["--benchmark", "toy", "--answers", str(answers), "--judgments", str(judgments), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_judged"] == 4
    result = build_report([tmp_path / "run"], tmp_path / "report")
    assert result["sections"][0] == "toy: m" and "| ALL | ALL | 4 | 50.0 " in (tmp_path / "report/report.md").read_text()
    assert formats.main(["toy", "--answers", str(answers), "--out", str(tmp_path / "sub.json")]) == 0
    assert json.loads((tmp_path / "sub.json").read_text()) == {r["id"]: r["text"] for r in rows}


@pytest.mark.parametrize("name", benchmark_names())
def test_every_spec_names_hooks_that_exist(name):
    spec = get_benchmark(name)
    assert spec.metric in METRICS
    assert set(spec.options) <= {"mode", "scenarios", "tiny_list", "gt_file"}
    assert not spec.modes or (spec.default_mode in spec.modes and "mode" in spec.options)
    if spec.judge is not None and isinstance(spec.judge.prompt, str):
        grading = spec.judge.grading
        assert spec.judge.prompt in default_prompt_set(grading.prompt_file if grading else DEFAULT_PROMPT_FILE)


def test_unknown_or_unjudged_benchmarks_are_named():
    with pytest.raises(InvalidRequestError, match="unknown benchmark 'nope'; valid names: vlsafe, mmsafetybench"):
        compute("nope", Path("a.jsonl"))
    with pytest.raises(InvalidRequestError, match="'mme' is not judged; judged benchmarks: vlsafe, mmsafetybench, mmvet"):
        prompt_name_for("mme", "auto", {})
    assert prompt_name_for("mme", "llm_binary_strict", {}) == "llm_binary_strict"  # an explicit prompt judges any file
    with pytest.raises(InvalidRequestError, match="mmvet grading needs --ground-truth mm-vet.json"):
        JudgeRunner(JudgeConfig(judge_model="m", benchmark="mmvet")).tasks([{"question_id": 0, "text": "x"}])
