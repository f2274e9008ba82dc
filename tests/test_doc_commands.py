"""Every command and Python snippet in README.md and docs/*.md runs as written, or is marked as needing what this
machine does not have (tests/doc_commands.py: ``# needs: ...``, ``# runs until stopped``).

* Every ``python -m llava...`` command, marked or not, is parsed by its entry point's own parser (a flag that does
  not exist, or a bad value, fails here without running anything); scripts and files a command names must exist.
* The unmarked commands run, offline, on the tiny model: each block's commands in order, in a fresh folder that
  holds links to the checkout's top-level entries (``data/``, ``assets/``, ``scripts/`` ...), with this interpreter
  first on ``PATH`` as ``python``. Blocks run two at a time; tiny models are built once per test session.
  ``pip install`` lines are not run (they would change the test's environment; the quick start's are run by
  tests/test_readme.py in a venv of its own).
* The unmarked ``python`` snippets run in such a folder, each in a fresh namespace; ``# with: tiny worker`` gives a
  snippet a tiny model worker at ``OPENAI_BASE_URL``. Marked snippets are compiled.
* README.md's quick start and full-evaluation recipe are run by tests/test_readme.py, which checks what they print.
"""
from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.doc_commands import NEEDS, RUNS_UNTIL_STOPPED, WITH_WORKER, DocCommand, doc_commands, doc_snippets

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# (file name, section prefix) of the blocks a test of their own runs, checking what they print
OWNED = {("README.md", "Quick start"): "tests/test_readme.py",
         ("README.md", "A full evaluation"): "tests/test_readme.py",
         ("judge-and-metrics.md", "End to end on the tiny model"): "tests/eval/test_safety_loop.py"}
BLOCK_TIMEOUT_S = 300
PASSES_UNKNOWN_FLAGS = {"llava.serve.launch"}  # hands the flags it does not know to the worker
_ENV_ASSIGN = "="


def _owned(c: DocCommand) -> str | None:
    return next((t for (name, prefix), t in OWNED.items() if c.path.name == name and c.section.startswith(prefix)),
                None)


def _commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in doc_commands(doc)]


def _snippets() -> list[DocCommand]:
    return [s for doc in DOCS for s in doc_snippets(doc)]


def _installs(c: DocCommand) -> bool:
    """``pip install ...``: never run here (it would change the environment the tests run in)."""
    return any(w[:2] == ["pip", "install"] or w[:4] == ["python", "-m", "pip", "install"]
               for w in _simple_commands(c.text))


def _runnable(c: DocCommand) -> bool:
    return not (c.marked(NEEDS) or c.marked(RUNS_UNTIL_STOPPED) or _owned(c) or _installs(c))


def _simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command of a line (split at ``&&``, ``;``, ``|`` and a trailing ``&``), without
    leading ``VAR=value`` assignments."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, found = [], []
    for token in lexer:
        if token in ("&&", ";", "|", "||", "&"):
            found.append(words)
            words = []
        else:
            words.append(token)
    found.append(words)
    cleaned = []
    for words in found:
        while words and _ENV_ASSIGN in words[0] and not words[0].startswith("-"):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def _parser_of(module: str):
    mod = importlib.import_module(module)
    built = (mod if hasattr(mod, "build_parser") else importlib.import_module(f"{module}.cli")).build_parser()
    return built[0] if isinstance(built, tuple) else built  # some return (parser, what it needs to read back)


def _check_words(words: list[str], where: str) -> None:
    """A ``python -m llava...`` command parses with its entry point's parser; a script or file it runs exists."""
    if words[0] == "python" and len(words) > 2 and words[1] == "-m" and words[2].startswith("llava."):
        parser = _parser_of(words[2])
        try:
            if words[2] in PASSES_UNKNOWN_FLAGS:
                parser.parse_known_args(words[3:])
            else:
                parser.parse_args(words[3:])
        except SystemExit as e:
            raise AssertionError(f"{where}: {' '.join(words[:3])} rejects its arguments {words[3:]} (exit {e.code})")
    elif words[0] in ("python", "bash", "sh") and len(words) > 1 and not words[1].startswith("-"):
        assert (REPO_ROOT / words[1]).is_file(), f"{where}: {words[1]} is not a file of the checkout"
    elif words[0].startswith(("scripts/", "./scripts/", "llava/", "benchmarks/")):
        assert (REPO_ROOT / words[0]).is_file(), f"{where}: {words[0]} is not a file of the checkout"


def test_every_command_is_run_or_marked_and_parses(capsys):
    commands = _commands()
    assert commands, "no commands found"
    problems = []
    for c in commands:
        for words in _simple_commands(c.text):
            try:
                _check_words(words, c.where())
            except AssertionError as e:
                problems.append(str(e))
    capsys.readouterr()  # argparse's own messages
    assert not problems, "\n".join(problems)
    assert [c for c in commands if _runnable(c)], "no doc command is run"
    for snippet in _snippets():
        compile(snippet.text, snippet.where(), "exec")  # every snippet is Python


def _sandbox(folder: Path) -> Path:
    """A folder that looks like the checkout (links to its top-level entries) where outputs land."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name not in (".git",) and not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry)
    return folder


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ECSO_API_KEY"))}
    env.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
               PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(extra or {}))
    return env


def run_block(commands: list[DocCommand], folder: Path, extra_env: dict[str, str] | None = None,
              timeout: float = BLOCK_TIMEOUT_S) -> tuple[float, str]:
    """Run ``commands`` in order with bash (stopping at the first failure) in a sandbox at ``folder``; returns the
    seconds taken and the output. A failure raises AssertionError naming the command and its output's tail."""
    _sandbox(folder)
    t0 = time.monotonic()
    output = []
    for c in commands:
        done = subprocess.run(["bash", "-c", c.text], cwd=folder, env=_env(extra_env), capture_output=True,
                              text=True, timeout=timeout)
        output.append(f"$ {c.text}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, f"{c.where()} exited {done.returncode}: {c.text}\n{(done.stdout + done.stderr)[-3000:]}"
    return time.monotonic() - t0, "\n".join(output)


def _groups() -> list[list[DocCommand]]:
    groups: dict[tuple[Path, int], list[DocCommand]] = {}
    for c in _commands():
        if _runnable(c):
            groups.setdefault((c.path, c.block), []).append(c)
    return list(groups.values())


@pytest.fixture(scope="module")
def tiny_worker():
    from tests.serve.service_procs import running_service

    with running_service("llava.serve.model_worker", "--model-path", "tiny", "--no-register",
                         startup_timeout=180) as svc:
        yield svc


def _worker_env(commands: list[DocCommand], request) -> dict[str, str]:
    if not any(c.marked(WITH_WORKER) for c in commands):
        return {}
    svc = request.getfixturevalue("tiny_worker")
    return {"OPENAI_BASE_URL": f"{svc.url}/v1", "OPENAI_API_KEY": "EMPTY"}


@pytest.mark.slow
def test_doc_commands_run_offline(tmp_path, request):
    groups = _groups()
    envs = [_worker_env(g, request) for g in groups]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_block, g, tmp_path / f"block{i}", env) for i, (g, env) in
                   enumerate(zip(groups, envs))]
        timings = [(g[0].where(), f.result()[0]) for g, f in zip(groups, futures)]
    print("\n" + "\n".join(f"{where}: {seconds:.1f} s" for where, seconds in timings))


@pytest.mark.slow
def test_doc_python_snippets_run(tmp_path, monkeypatch, request):
    ran = []
    for i, snippet in enumerate(_snippets()):
        if snippet.marked(NEEDS) or snippet.marked(RUNS_UNTIL_STOPPED):
            continue
        folder = _sandbox(tmp_path / f"snippet{i}")
        with monkeypatch.context() as m:
            m.chdir(folder)
            for key, value in _worker_env([snippet], request).items():
                m.setenv(key, value)
            t0 = time.monotonic()
            try:
                exec(compile(snippet.text, snippet.where(), "exec"), {"__name__": "__doc_snippet__"})
            except Exception as e:  # noqa: BLE001 - reported with the snippet's place
                raise AssertionError(f"{snippet.where()} failed: {type(e).__name__}: {e}") from e
            ran.append((snippet.where(), time.monotonic() - t0))
    assert ran, "no snippet ran"
    print("\n" + "\n".join(f"{where}: {seconds:.1f} s" for where, seconds in ran))
