"""The package graph runs one way: store <- extractors <- trainers <- analytics (bench may use
all), and no module imports itself back through others (no import cycle, lazy imports included).
Inside a package, capability rooms (subfolders: trainers/sae/, extractors/ingest/, ...) import
one way too: the graph of rooms and top-level modules has no cycle. No folder holds more than
MAX_MODULES modules, so a newcomer finds a capability by its folder name.

Imports are read from the source with `ast`, so imports inside functions count too: a
lazy import hides a cycle from Python's import machinery, not from this test.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"store": 0, "extractors": 1, "trainers": 2, "analytics": 3}
PACKAGES = [*RANK, "bench"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `path` imports (at top level or inside functions)."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = me.split(".") if is_pkg else me.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when it is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def test_packages_import_one_way_only():
    modules = all_modules()
    upward = []
    for name, path in modules.items():
        pkg = name.split(".")[0]
        if pkg == "bench":
            continue
        for dep in imports_of(path, modules):
            dpkg = dep.split(".")[0]
            if dpkg == "bench" or RANK[dpkg] > RANK[pkg]:
                upward.append(
                    f"{name} imports {dep} ({pkg} may import only "
                    f"{', '.join(p for p, r in RANK.items() if r <= RANK[pkg])})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


MAX_MODULES = 12


def room_of(name: str, modules: dict[str, Path]) -> str:
    """A module's capability room: its subfolder below the top package (`trainers.sae` for
    trainers/sae/run.py), or the module itself when it sits at a package's top level."""
    parts = name.split(".")
    in_subfolder = len(parts) >= 3 or (len(parts) == 2 and modules[name].name == "__init__.py")
    return ".".join(parts[:2]) if in_subfolder else name


def test_capability_rooms_import_one_way():
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        a = room_of(name, modules)
        graph.setdefault(a, set()).update(b for b in (room_of(d, modules) for d in imports_of(path, modules)) if b != a)
    assert not _cycles(graph), f"rooms that import each other: {_cycles(graph)}"
    rooms = {".".join(n.split(".")[:2]) for n, path in modules.items() if len(path.relative_to(ROOT).parts) >= 3}
    assert {
        "trainers.sae",
        "trainers.probes",
        "trainers.steering",
        "trainers.finetune",
        "trainers.selection",
        "extractors.ingest",
        "extractors.sae",
        "store.catalog",
    } <= rooms


def test_no_folder_holds_more_than_a_dozen_modules():
    modules = all_modules()
    per_folder: dict[Path, list[str]] = {}
    for name, path in modules.items():
        if path.name not in ("__init__.py", "__main__.py"):
            per_folder.setdefault(path.parent, []).append(name)
    crowded = {str(f.relative_to(ROOT)): len(v) for f, v in per_folder.items() if len(v) > MAX_MODULES}
    assert not crowded, f"folders over {MAX_MODULES} modules (give the capability a subfolder): {crowded}"


def test_no_import_cycles_between_modules():
    modules = all_modules()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "store"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from trainers.x import y\n    from . import b\n")
    (pkg / "b.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = {
        "store": pkg / "__init__.py",
        "store.a": pkg / "a.py",
        "store.b": pkg / "b.py",
        "trainers.x": tmp_path / "x.py",
    }
    assert imports_of(pkg / "a.py", modules) == {"trainers.x", "store.b"}
