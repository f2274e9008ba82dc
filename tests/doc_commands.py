"""Commands and Python snippets as README.md and docs/*.md print them, so tests run what the docs say instead of a
retyped copy.

``doc_commands(path)`` reads the fenced ``bash``/``sh``/``shell``/``console`` blocks of a Markdown file and returns one
:class:`DocCommand` per command: continuation lines (a trailing backslash) joined as the shell joins them, comment
lines and blank lines dropped, each command with its file, its first line, the heading it sits under, the index of
its block in the file (so a test can tell two blocks of one section apart) and its marks. ``console`` blocks keep only
the lines that start with a ``$ `` prompt, without it. ``doc_snippets(path)`` returns the ``python`` blocks.

Marks (the doc-commands convention): a comment line ``# needs: WHAT`` (real weights, real data, GPU, a named engine
or service, network) or ``# runs until stopped`` (a server) marks the commands after it, up to the next blank line in
the block or the next mark that follows a command; a ``python`` block is marked by such a line before its first line of code. ``# with: tiny worker`` asks
the doc test for a tiny model worker (``OPENAI_BASE_URL`` points to it). Everything unmarked is run by
``tests/test_doc_commands.py`` (or by a test that owns it)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHELL_LANGS", "NEEDS", "RUNS_UNTIL_STOPPED", "WITH_WORKER", "DocCommand", "doc_commands",
           "doc_snippets", "section_commands"]

SHELL_LANGS = ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NEEDS, RUNS_UNTIL_STOPPED, WITH_WORKER = "needs:", "runs until stopped", "with: tiny worker"
_MARK = re.compile(rf"^\s*#\s*({NEEDS}\s*\S.*|{RUNS_UNTIL_STOPPED}\b.*|{WITH_WORKER}\b.*)$")


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int      # 1-based line of the command's first physical line
    section: str   # text of the nearest heading above the block ("" before any heading)
    block: int     # index of the fenced shell block in the file, from 0
    text: str      # the command as the shell reads it (continuations joined, no trailing newline)
    marks: tuple[str, ...] = ()  # the marks in effect ("needs: real weights", "runs until stopped", ...)

    def marked(self, kind: str) -> str | None:
        """The first mark of ``kind`` (``NEEDS``, ``RUNS_UNTIL_STOPPED``, ``WITH_WORKER``), or None."""
        return next((m for m in self.marks if m.startswith(kind)), None)

    def where(self) -> str:
        """``README.md:17`` for assertion messages."""
        return f"{self.path.name}:{self.line}"


def _block_commands(lines: list[tuple[int, str]], lang: str) -> list[tuple[int, str, tuple[str, ...]]]:
    commands: list[tuple[int, str, tuple[str, ...]]] = []
    pending: tuple[int, str] | None = None
    marks: tuple[str, ...] = ()
    after_command = False  # a mark after a command starts a new group
    for lineno, raw in lines:
        if lang == "console" and pending is None:
            if not raw.lstrip().startswith("$ "):
                continue  # program output in a console transcript
            raw = raw.lstrip()[2:]
        if pending is None:
            stripped = raw.strip()
            if not stripped:
                marks, after_command = (), False
                continue
            if stripped.startswith("#"):
                mark = _MARK.match(stripped)
                if mark:
                    marks = (() if after_command else marks) + (mark.group(1).strip(),)
                    after_command = False
                continue
            pending = (lineno, "")
            after_command = True
        start, text = pending
        if raw.endswith("\\"):
            pending = (start, text + raw[:-1])
            continue
        commands.append((start, (text + raw).strip(), marks))
        pending = None
    if pending is not None:  # a block that ends on a continuation: keep what is there
        commands.append((pending[0], pending[1].strip(), marks))
    return commands


def _blocks(path: Path) -> list[tuple[str, int, str, list[tuple[int, str]]]]:
    """``(language, index, section, body lines)`` of every fenced block of ``path``, in file order."""
    found = []
    section = ""
    fence: str | None = None
    lang = ""
    body: list[tuple[int, str]] = []
    block_section = ""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence, lang, body, block_section = m.group(2), m.group(3).lower(), [], section
                continue
            h = _HEADING.match(line)
            if h:
                section = h.group(2)
            continue
        if m and m.group(2).startswith(fence) and not m.group(3):
            found.append((lang, len(found), block_section, body))
            fence = None
            continue
        body.append((lineno, line))
    return found


def doc_commands(path: Path | str, langs: tuple[str, ...] = SHELL_LANGS) -> list[DocCommand]:
    """Every shell command in the fenced blocks of ``path`` whose language is one of ``langs``, in file order."""
    path = Path(path)
    found: list[DocCommand] = []
    shell_blocks = [b for b in _blocks(path) if b[0] in langs]
    for index, (lang, _, section, body) in enumerate(shell_blocks):
        for start, text, marks in _block_commands(body, lang):
            found.append(DocCommand(path, start, section, index, text, marks))
    return found


def doc_snippets(path: Path | str) -> list[DocCommand]:
    """Every ``python`` block of ``path`` as one :class:`DocCommand` (``text``: the code; ``line``: its first line;
    ``block``: its index among the file's python blocks; ``marks``: the marks before its first line of code)."""
    path = Path(path)
    found: list[DocCommand] = []
    python_blocks = [b for b in _blocks(path) if b[0] in ("python", "py")]
    for index, (_, _, section, body) in enumerate(python_blocks):
        marks: tuple[str, ...] = ()
        for _, line in body:
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                break
            mark = _MARK.match(stripped)
            if mark:
                marks += (mark.group(1).strip(),)
        text = "\n".join(line for _, line in body)
        found.append(DocCommand(path, body[0][0] if body else 0, section, index, text, marks))
    return found


def section_commands(path: Path | str, heading: str) -> list[DocCommand]:
    """The commands under the first heading that starts with ``heading`` (up to the next heading of any level)."""
    commands = doc_commands(path)
    sections = [c.section for c in commands if c.section.startswith(heading)]
    if not sections:
        raise LookupError(f"no shell commands under a heading starting with {heading!r} in {path}")
    return [c for c in commands if c.section == sections[0]]
