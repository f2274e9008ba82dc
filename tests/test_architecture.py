"""The package's shape: imports only go down the layers, with no cycles (imports inside functions and under
``TYPE_CHECKING`` count), and no module is over 450 lines (docs/architecture.md).

The graph is read with ``ast`` from the source (nothing is imported), so the check is fast and also sees imports
that only run inside functions.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava"
MAX_LINES = 450

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("llava", "llava.constants"),
    ("llava.errors",),
    ("llava.conversation", "llava.generation", "llava.mm_utils", "llava.http_client", "llava.extras"),
    ("llava.model",),
    ("llava.ecso",),
    ("llava.cli_args",),
    ("llava.eval", "llava.serve"),
    ("llava.train",),
)


def layer_of(module: str) -> int:
    """The layer of ``module``: the longest prefix (``llava.serve`` covers ``llava.serve.protocol.openai``)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _across(a: str, b: str) -> bool:
    """eval and serve share a layer and never import each other; train (above eval) never imports serve."""
    tops = {m.split(".")[1] if m.count(".") else "" for m in (a, b)}
    return tops in ({"eval", "serve"}, {"train", "serve"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (itself, or its closest enclosing module), or None if not ours."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(known: dict[str, Path]) -> dict[tuple[str, str], int]:
    """``(importer, imported) -> line`` for every import of a package module anywhere in a module's code.
    ``from pkg import sub`` imports both ``pkg`` and, when it is a module, ``pkg.sub``."""
    edges: dict[tuple[str, str], int] = {}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` runs ``pkg/__init__.py`` first: an edge to both
                targets = [base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)]
            for target in targets:
                resolved = _resolve(target, known) if target.startswith("llava") else None
                if resolved is not None and resolved != mod:
                    edges.setdefault((mod, resolved), node.lineno)
    return edges


def find_cycles(edges: dict[tuple[str, str], int]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@functools.cache
def report() -> tuple[list[str], list[str], list[str]]:
    """(cycle descriptions, upward imports, oversized modules), each a list of printable lines."""
    known = _modules()
    edges = import_edges(known)
    cycles = []
    for component in find_cycles(edges):
        inside = sorted(f"{a} -> {b} (line {line})" for (a, b), line in edges.items()
                        if a in component and b in component)
        cycles.append("cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(inside))
    upward = sorted(f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)}), line {line}"
                    for (a, b), line in edges.items() if layer_of(b) > layer_of(a) or _across(a, b))
    sizes = sorted(f"{known[m].relative_to(PACKAGE.parent)}: {n} lines"
                   for m in known if (n := len(known[m].read_text().splitlines())) > MAX_LINES)
    return cycles, upward, sizes


def test_no_import_cycles():
    cycles, _, _ = report()
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_imports_only_go_down_the_layers():
    _, upward, _ = report()
    assert not upward, "imports that go up a layer (or between eval and serve):\n" + "\n".join(upward)


def test_no_module_over_the_size_limit():
    _, _, sizes = report()
    assert not sizes, f"modules over {MAX_LINES} lines:\n" + "\n".join(sizes)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The checker itself: a cycle made only by an import inside a function is found, an upward import too."""
    edges = {("llava.model.a", "llava.model.b"): 1, ("llava.model.b", "llava.model.a"): 9,
             ("llava.errors", "llava.ecso.x"): 3}
    assert find_cycles(edges) == [["llava.model.a", "llava.model.b"]]
    assert _across("llava.eval.generate", "llava.serve.server") and not _across("llava.serve.cli", "llava.serve")
    assert _across("llava.train.lora", "llava.serve.server") and not _across("llava.train.lora", "llava.eval.jsonl")
    assert layer_of("llava.serve.protocol.openai") > layer_of("llava.cli_args") > layer_of("llava.ecso.config")
    source = "def f():\n    from llava.serve import server\n"
    known = {"llava.mm_utils": tmp_path / "m.py", "llava.serve": tmp_path / "__init__.py",
             "llava.serve.server": tmp_path / "s.py"}
    known["llava.mm_utils"].write_text(source)
    known["llava.serve"].write_text("")
    known["llava.serve.server"].write_text("")
    assert import_edges(known) == {("llava.mm_utils", "llava.serve"): 2, ("llava.mm_utils", "llava.serve.server"): 2}


if __name__ == "__main__":  # python tests/test_architecture.py: the whole report
    c, u, s = report()
    print(f"cycles: {len(c)}", *c, f"upward imports: {len(u)}", *u, f"modules over {MAX_LINES} lines: {len(s)}", *s,
          sep="\n")
