"""The layout rules of DESIGN.md, read from the source with ``ast``: no import cycles among asib's
modules, and the direction ``cli -> pipeline -> methods -> engine -> models, data``.

Every import statement counts, including those inside functions. ``from asib.x import y``
imports ``asib.x.y`` when y is a submodule, else ``asib.x``; importing ``asib.a.b`` also runs
the package ``asib.a`` (its ``__init__``), so for cycles that counts as importing it too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "asib"


@dataclass(frozen=True)
class Edge:
    """One import of an asib module by another: where it is written, what it names."""

    source: str
    target: str
    path: Path
    line: int
    implied: bool = False  # a package whose __init__ runs because a module inside it is imported

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is an asib module (``asib.x.y.attr`` -> ``asib.x.y``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _named(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The asib modules one import statement names directly."""
    if isinstance(node, ast.Import):
        names = [_known(alias.name) for alias in node.names]
    else:
        base = _absolute(node, module)
        names = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in MODULES else _known(base))
    return sorted({n for n in names if n is not None and n != module})


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@cache
def _edges() -> list[Edge]:
    """Every import of an asib module by another, read once."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _named(node, module):
                edges.append(Edge(module, target, path, node.lineno))
                parent = target.rpartition(".")[0]
                while parent and parent in MODULES:
                    if not _inside(module, parent):  # an enclosing package has already started
                        edges.append(Edge(module, parent, path, node.lineno, implied=True))
                    parent = parent.rpartition(".")[0]
    return edges


# ---------------------------------------------------------------- cycles


def _components(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _shortest_cycle(start: str, members: set[str], by_pair: dict[tuple[str, str], Edge]) -> list[str]:
    """A shortest cycle from ``start`` back to it inside one component (breadth-first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for a, b in by_pair:
                if a != node or b not in members:
                    continue
                if b == start:
                    return paths[node]
                if b not in paths:
                    paths[b] = paths[node] + [b]
                    nxt.append(b)
        frontier = nxt
    return [start]


def _cycles(component: list[str], by_pair: dict[tuple[str, str], Edge]) -> list[str]:
    """The shortest cycle through each module of a component (duplicates dropped), each step
    with the file and line of its import."""
    seen, out = set(), []
    for start in component:
        cycle = _shortest_cycle(start, set(component), by_pair)
        first = cycle.index(min(cycle))
        key = tuple(cycle[first:] + cycle[:first])
        if key in seen:
            continue
        seen.add(key)
        closed = [*key, key[0]]
        steps = [f"{a} ({by_pair[(a, b)].where()})" for a, b in zip(closed, closed[1:], strict=False)]
        out.append(" -> ".join(steps) + f" -> {key[0]}")
    return out


def test_no_import_cycles() -> None:
    by_pair: dict[tuple[str, str], Edge] = {}
    for edge in _edges():
        if edge.source != edge.target:
            by_pair.setdefault((edge.source, edge.target), edge)
    graph: dict[str, list[str]] = {m: [] for m in MODULES}
    for a, b in by_pair:
        graph[a].append(b)
    cycles = [cycle for component in _components(graph) for cycle in _cycles(component, by_pair)]
    shown = cycles[:15] + ([f"... and {len(cycles) - 15} more"] if len(cycles) > 15 else [])
    assert not cycles, "import cycles among asib's modules:\n  " + "\n  ".join(shown)


# ---------------------------------------------------------------- direction

# (importers, what they must not import, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("asib.models", "asib.data"), ("asib.engine", "asib.methods", "asib.pipeline"),
     "models and data sit below the engine"),
    (("asib.engine",), ("asib.methods", "asib.pipeline", "asib.cli", "asib.bench", "asib.report"),
     "the engine knows no method, step, command, bench or report"),
    (("asib.methods",), ("asib.pipeline", "asib.cli"), "methods sit below the pipeline steps"),
]
CLI_IMPORTERS = ("asib.cli", "asib.__main__")  # the only ones that may import asib.cli


def _violations() -> list[str]:
    out = []
    for edge in _edges():
        if edge.implied:
            continue
        for importers, banned, why in RULES:
            if any(_inside(edge.source, p) for p in importers) and any(_inside(edge.target, b) for b in banned):
                out.append(f"{edge.where()}: {edge.source} imports {edge.target} ({why})")
        if _inside(edge.target, "asib.cli") and not any(_inside(edge.source, p) for p in CLI_IMPORTERS):
            out.append(f"{edge.where()}: {edge.source} imports {edge.target} (nothing imports the CLI)")
    return sorted(set(out))


def test_import_direction() -> None:
    bad = _violations()
    assert not bad, "imports against the layout of DESIGN.md:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------- the checker itself


def test_checker_sees_every_kind_of_import() -> None:
    """The parser finds lazy, relative and submodule imports, so the rules above are not vacuous."""
    pairs = {(e.source, e.target) for e in _edges() if not e.implied}
    assert ("asib.__main__", "asib.cli") in pairs
    assert ("asib.data.prepared", "asib.data.sources") in pairs
    assert any(s.startswith("asib.data.sources.") and t == "asib.data.sources.base" for s, t in pairs)
    assert ("asib.cli.report", "asib.report") in pairs  # imported inside the command function
    src = "from . import base\nfrom .base import RawData\nfrom .. import loader\n"
    node_a, node_b, node_c = ast.parse(src).body
    assert _named(node_a, "asib.data.sources.cifar") == ["asib.data.sources.base"]
    assert _named(node_b, "asib.data.sources.cifar") == ["asib.data.sources.base"]
    assert _named(node_c, "asib.data.sources") == ["asib.data.loader"]
    cyclic = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert _components(cyclic) == [["a", "b", "c"]]
