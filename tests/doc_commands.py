"""Shell commands as README.md and docs/*.md print them, so tests run what the docs say instead of a retyped copy.

``doc_commands(path)`` reads the fenced ``bash``/``sh``/``shell``/``console`` blocks of a Markdown file and returns one
:class:`DocCommand` per command: continuation lines (a trailing backslash) joined as the shell joins them, comment
lines and blank lines dropped, each command with its file, its first line, the heading it sits under and the index of
its block in the file (so a test can tell two blocks of one section apart). ``console`` blocks keep only the lines
that start with a ``$ `` prompt, without it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHELL_LANGS", "DocCommand", "doc_commands", "section_commands"]

SHELL_LANGS = ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int      # 1-based line of the command's first physical line
    section: str   # text of the nearest heading above the block ("" before any heading)
    block: int     # index of the fenced shell block in the file, from 0
    text: str      # the command as the shell reads it (continuations joined, no trailing newline)

    def where(self) -> str:
        """``README.md:17`` for assertion messages."""
        return f"{self.path.name}:{self.line}"


def _block_commands(lines: list[tuple[int, str]], lang: str) -> list[tuple[int, str]]:
    commands: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, raw in lines:
        if lang == "console" and pending is None:
            if not raw.lstrip().startswith("$ "):
                continue  # program output in a console transcript
            raw = raw.lstrip()[2:]
        if pending is None:
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            pending = (lineno, "")
        start, text = pending
        if raw.endswith("\\"):
            pending = (start, text + raw[:-1])
            continue
        commands.append((start, (text + raw).strip()))
        pending = None
    if pending is not None:  # a block that ends on a continuation: keep what is there
        commands.append((pending[0], pending[1].strip()))
    return commands


def doc_commands(path: Path | str, langs: tuple[str, ...] = SHELL_LANGS) -> list[DocCommand]:
    """Every shell command in the fenced blocks of ``path`` whose language is one of ``langs``, in file order."""
    path = Path(path)
    found: list[DocCommand] = []
    section, block_index = "", 0
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
            if lang in langs:
                for start, text in _block_commands(body, lang):
                    found.append(DocCommand(path, start, block_section, block_index, text))
                block_index += 1
            fence = None
            continue
        body.append((lineno, line))
    return found


def section_commands(path: Path | str, heading: str) -> list[DocCommand]:
    """The commands under the first heading that starts with ``heading`` (up to the next heading of any level)."""
    commands = doc_commands(path)
    sections = [c.section for c in commands if c.section.startswith(heading)]
    if not sections:
        raise LookupError(f"no shell commands under a heading starting with {heading!r} in {path}")
    return [c for c in commands if c.section == sections[0]]
