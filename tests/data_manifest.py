"""The repository's reference data (``data/``) as ``data/SOURCES.md`` lists it: the listed paths (bash-style
``{a,b}`` and ``{1..3}`` groups expanded), the files actually there, and the checksums in ``data/SHA256SUMS``.

Used by the ``ref_data`` fixture (a missing file fails the tests that read the data, naming it) and by
``tests/test_data_manifest.py`` (the listing, the folder and the checksums stay in sync)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

__all__ = ["DATA_DIR", "SOURCES", "CHECKSUMS", "expand_braces", "listed_files", "present_files", "checksums",
           "missing_files"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SOURCES = DATA_DIR / "SOURCES.md"
CHECKSUMS = DATA_DIR / "SHA256SUMS"

_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_FIRST_CELL = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def expand_braces(pattern: str) -> list[str]:
    """``a/{x,y}_{1..2}.png`` -> ``a/x_1.png, a/x_2.png, a/y_1.png, a/y_2.png`` (bash order)."""
    m = _GROUP.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.fullmatch(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        step = 1 if hi >= lo else -1
        options = [str(i) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def listed_files(sources: Path = SOURCES) -> dict[str, int]:
    """Every path the tables of SOURCES.md list (first cell, in backticks), relative to data/, with its line."""
    listed: dict[str, int] = {}
    for lineno, line in enumerate(sources.read_text(encoding="utf-8").splitlines(), 1):
        m = _FIRST_CELL.match(line)
        if m:
            for path in expand_braces(m.group(1)):
                listed.setdefault(path, lineno)
    return listed


def _git_ignored(root: Path, paths: list[str]) -> set[str]:
    """The paths (relative to root's repository) that git ignores; none when root is not in a git checkout."""
    try:
        out = subprocess.run(["git", "check-ignore", "--stdin"], cwd=root, input="\n".join(paths),
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.stdout.splitlines()) if out.returncode in (0, 1) else set()


def present_files(data_dir: Path = DATA_DIR) -> list[str]:
    """The files under data/ (relative to it) that belong to the repository: git-ignored ones (benchmark downloads
    in the seed scripts' layout, see .gitignore) are left out."""
    files = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file())
    ignored = _git_ignored(data_dir.parent, [f"{data_dir.name}/{f}" for f in files])
    return [f for f in files if f"{data_dir.name}/{f}" not in ignored]


def checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """``sha256sum`` output: relative path -> hex digest."""
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def missing_files(data_dir: Path = DATA_DIR) -> list[str]:
    """Listed in SOURCES.md but not there (everything when data/ or SOURCES.md itself is missing)."""
    sources = data_dir / SOURCES.name
    if not sources.is_file():
        return [f"{data_dir.name}/{SOURCES.name}"]
    return [f"{data_dir.name}/{p}" for p in listed_files(sources) if not (data_dir / p).is_file()]
