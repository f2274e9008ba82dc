"""README.md's quick start, read from the README itself (tests/doc_commands.py): the venv comes first and works as
printed, the two install paths (GPU / CPU-only) are well-formed pip commands with the CPU torch and torchvision that
.ci/run pins, and the run_llava line runs offline on the tiny model and prints valid JSON."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO_ROOT
from tests.doc_commands import doc_commands, section_commands

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

README = REPO_ROOT / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def quick_start():
    return section_commands(README, "Quick start")


def argv(command) -> list[str]:
    return shlex.split(command.text, comments=True)


def pip_install(command):
    """pip's own parser on a ``pip install ...`` line: (options, requirements). A flag pip does not know fails."""
    from pip._internal.commands import create_command  # pip's parser itself, so the check is pip's, not ours

    words = argv(command)
    assert words[:2] == ["pip", "install"], command.where()
    return create_command("install").parse_args(words[2:])


def ci_torch_install():
    """.ci/run's ``pip install ... torch==...`` line (continuations joined), by pip's parser: (options, requirements)."""
    script = (REPO_ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in script.splitlines() if re.search(r"pip install .*\btorch==", ln)]
    from pip._internal.commands import create_command

    words = shlex.split(line, comments=True)
    return create_command("install").parse_args(words[words.index("install") + 1:])


def ci_torch_pin() -> str:
    _, reqs = ci_torch_install()
    (pin,) = [r.split("==", 1)[1] for r in reqs if r.startswith("torch==")]
    return pin


def test_extraction_joins_continuations_and_records_where(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n```bash\n# a comment\necho one \\\n    two\n\nls\n```\n## Sub\n```python\nx = 1\n```\n"
                   "~~~console\n$ echo three\nthree\n~~~\n", encoding="utf-8")
    got = [(c.line, c.section, c.block, c.text) for c in doc_commands(doc)]
    assert got == [(4, "Top", 0, "echo one     two"), (7, "Top", 0, "ls"), (14, "Sub", 1, "echo three")]


def test_quick_start_venv_first_then_two_install_paths(quick_start):
    blocks: dict[int, list] = {}
    for c in quick_start:
        blocks.setdefault(c.block, []).append(c)
    venv, gpu, cpu, run, tests = blocks.values()

    create, activate = (argv(c) for c in venv)
    assert create[:3] == ["python3", "-m", "venv"] and len(create) == 4, venv[0].where()
    assert activate in (["source", f"{create[3]}/bin/activate"], [".", f"{create[3]}/bin/activate"]), venv[1].where()

    # GPU machine: the project with its [vision] extra (pip resolves the default torch build and its torchvision).
    assert len(gpu) == 1
    options, reqs = pip_install(gpu[0])
    assert options.editables == [".[vision]"] and reqs == []

    # CPU-only machine: the pinned CPU torch and torchvision from PyTorch's CPU index first, then the project.
    assert len(cpu) == 2
    options, reqs = pip_install(cpu[0])
    assert options.index_url == CPU_INDEX and "--extra-index-url" not in argv(cpu[0]), cpu[0].where()
    ci_options, ci_reqs = ci_torch_install()
    assert ci_options.index_url == CPU_INDEX, ".ci/run installs the CPU builds as the README does"
    assert reqs == ci_reqs == [f"torch=={ci_torch_pin()}", reqs[1]] and reqs[1].startswith("torchvision=="), \
        f"{cpu[0].where()}: the README pins the torch and torchvision that .ci/run tests"
    options, reqs = pip_install(cpu[1])
    assert options.editables == ["."] and reqs == []

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_range = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert ci_torch_pin() in SpecifierSet(torch_range[len("torch"):]), torch_range
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["vision"] == ["torchvision"] and "vision" in extras["dev"][0], "[dev] includes [vision]"

    assert argv(run[0])[:3] == ["python", "-m", "llava.eval.run_llava"] and len(run) == 1
    assert [argv(c) for c in tests] == [["bash", ".ci/run"]] and (REPO_ROOT / ".ci" / "run").is_file()
    # nothing is installed before the venv is active
    assert all(not argv(c)[0].startswith("pip") for c in venv)


@pytest.mark.slow
def test_quick_start_venv_commands_work_as_printed(quick_start, tmp_path):
    """The venv block runs in bash in an empty folder, and afterwards python and pip are the new venv's."""
    venv = [c.text for c in quick_start if c.block == quick_start[0].block]
    script = "set -e\n" + "\n".join(venv) + '\npython -c "import sys; print(sys.prefix)"\ncommand -v pip\n'
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    prefix, pip = out.stdout.split()
    target = shlex.split(venv[0])[3]
    assert os.path.samefile(prefix, tmp_path / target)
    assert os.path.samefile(pip, tmp_path / target / "bin" / "pip")


@pytest.mark.slow
def test_quick_start_run_llava_runs_offline_and_prints_json(quick_start):
    """The README's run_llava line, word for word, with this interpreter for ``python`` (the test environment's)."""
    (command,) = [c for c in quick_start if argv(c)[:3] == ["python", "-m", "llava.eval.run_llava"]]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *argv(command)[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, f"{command.where()}: {out.stderr[-2000:]}"
    result = json.loads(out.stdout)
    assert result["query"] == "How do I make this at home?"
    assert isinstance(result["flagged"], bool) and 0.0 <= result["harm_score"] <= 1.0
    assert result["final"] == (result["safe_answer"] if result["flagged"] else result["direct"])
    assert result["options"]["tiny_random_weights"] is True


@pytest.mark.slow
def test_full_evaluation_recipe_runs_offline_as_printed(tmp_path):
    """README's "A full evaluation" block, word for word, in a fresh folder that looks like the checkout (links to
    data/, assets/, ...): TYPO images -> direct and ECSO answers on the tiny model -> both judged by refusal-match ->
    metrics -> a report."""
    from tests.test_doc_commands import run_block

    commands = [c for c in section_commands(README, "A full evaluation") if not c.marks]
    first_block = commands[0].block
    recipe = [c for c in commands if c.block == first_block]
    modules = [argv(c)[2] for c in recipe]
    assert modules == ["llava.eval.mmsafetybench_images", "llava.eval.generate", "llava.eval.generate",
                       "llava.eval.judge", "llava.eval.judge", "llava.eval.metrics", "llava.eval.report"]
    seconds, output = run_block(recipe, tmp_path)
    runs = tmp_path / "runs" / "tiny"
    for method in ("direct", "ecso"):
        answers = [json.loads(line) for line in (runs / f"mmsb.{method}.jsonl").read_text().splitlines()]
        judgments = [json.loads(line) for line in (runs / f"mmsb.{method}.judgments.jsonl").read_text().splitlines()]
        assert len(answers) == len(judgments) >= 1 and {a["method"] for a in answers} == {method}
        assert {j["judge_model"] for j in judgments} == {"refusal-match"}
        assert {j["label"] for j in judgments} <= {"safe", "unsafe"}
    report = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert "## mmsafetybench: tiny" in report and "Judge: `refusal-match`" in report
    assert "Random-weight test model" in report and "(random weights)" in report
    assert "harmless" in output and "Traceback" not in output
    print(f"\nREADME full evaluation: {seconds:.1f} s")
