"""The package's layout: no module imports one that imports it back (directly or through others,
imports inside functions included), imports between the rooms go the way README's Architecture says,
and the documented commands exist.

The import graph is read from the source with `ast`, so nothing is imported to build it. An edge
A -> B means that A's code (anywhere in it) runs `import B`, `from B import name` or
`from PACKAGE import B` (B a submodule), relative forms included. Importing a submodule also runs its
parent package's __init__; that implicit edge is not drawn, or every lazy import from a package's
__init__-imported module into the package would count as a circle however the code is arranged.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lanit_rt", "lanit_kernels", "lanit_export", "training")
COMMANDS = ("training.run", "training.label", "training.eval", "training.align", "training.eval_labeler")

# Room -> the rooms (or single modules) its modules may import. A room is a top-level package, except
# that training/labeling and training/evaluation are rooms of their own beside the loop (training).
ROOM_IMPORTS = {
    "lanit_kernels": set(),
    "lanit_rt": {"lanit_kernels"},
    "lanit_export": {"lanit_rt", "lanit_kernels"},
    "training": {"lanit_rt", "training.labeling"},
    "training.labeling": {"lanit_rt", "training.data"},
    "training.evaluation": {"lanit_rt", "training", "training.labeling"},
}
# The thin entry modules that keep the commands' paths (`python -m training.eval`) belong to the
# room whose code they start.
ENTRY_MODULES = {
    "training.label": "training.labeling",
    "training.align": "training.labeling",
    "training.eval": "training.evaluation",
    "training.eval_labeler": "training.evaluation",
}
# Edges against the room order, each with its reason. None of them closes a circle (test below).
ROOM_EXCEPTIONS = {
    ("lanit_rt.translator", "lanit_export.onnx_export"):
        "Translator.from_checkpoint(export=True) calls the exporter, lazily",
    ("lanit_kernels.aot", "lanit_rt.config"): "the AOT tool compiles the kernels for the Generator's shapes",
    ("lanit_kernels.aot", "lanit_rt.networks"): "the AOT tool compiles the kernels for the Generator's shapes",
    ("lanit_kernels.selfcheck", "lanit_rt.config"): "the self-check runs the Generator on both paths",
    ("lanit_kernels.selfcheck", "lanit_rt.networks"): "the self-check runs the Generator on both paths",
    ("training.run", "training.evaluation.eval"): "the run command evaluates the model it trained, lazily",
    ("training.run", "training.evaluation.report"): "the run command prints the evaluation's headline",
}


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules (`pkg.mod.attr` -> `pkg.mod`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Our modules that module `name` imports anywhere in its code -> the first line that does."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import mod` imports the submodule; `from pkg import name` runs pkg.
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in modules else source)
        for target in targets:
            ours = _ours(target, modules)
            if ours is not None and ours != name:
                found.setdefault(ours, node.lineno)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    modules = module_files(root, packages)
    return {name: module_imports(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest circle [a, b, ..., a] per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start, members = group[0], set(group)
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:  # breadth first: the shortest way back to start
            following = []
            for node in frontier:
                for nxt in sorted(graph[node]):
                    if nxt in members and nxt not in parents:
                        parents[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = parents[start]
        while node != start:
            path.append(node)
            node = parents[node]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "import circle: " + " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def room(module: str) -> str:
    if module in ENTRY_MODULES:
        return ENTRY_MODULES[module]
    for sub in ("training.labeling", "training.evaluation"):
        if module == sub or module.startswith(sub + "."):
            return sub
    return module.split(".")[0]


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"lanit_rt.translator", "training.labeling.vl", "lanit_export.validate"} <= set(graph)
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(cycle, graph) for cycle in cycles)


def test_imports_between_rooms_go_one_way():
    graph = import_graph()
    wrong = []
    for module, imports in sorted(graph.items()):
        here = room(module)
        for target, line in sorted(imports.items()):
            there = room(target)
            allowed = ROOM_IMPORTS[here]
            if there == here or there in allowed or target in allowed or (module, target) in ROOM_EXCEPTIONS:
                continue
            wrong.append(f"{module} (line {line}) imports {target}: {here} may import {sorted(allowed)}")
    assert not wrong, "\n".join(wrong)
    for (module, target), reason in ROOM_EXCEPTIONS.items():
        assert target in graph[module], f"stale exception {module} -> {target} ({reason})"


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("b_imports_a", [
    "from pkg import a\n",  # a submodule by `from package import module`
    "from .. import a\n",  # relative
    "from ..a import thing\n",
    "import pkg.a\n",
    "def later():\n    from pkg.a import thing\n",  # inside a function
])
def test_the_cycle_check_finds_a_planted_circle(tmp_path, b_imports_a):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.sub import b\n\nthing = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": b_imports_a,
        "pkg/c.py": "from pkg import a\n",  # imports into the circle, not part of it
    })
    graph = import_graph(tmp_path, ("pkg",))
    cycles = import_cycles(graph)
    assert cycles == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    message = describe_cycle(cycles[0], graph)
    assert "pkg.a -> pkg.sub.b -> pkg.a" in message and "pkg.a (line 2) -> pkg.sub.b" in message


def test_the_cycle_check_finds_a_longer_circle_through_a_package_init(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.x import X\n",
        "pkg/x.py": "from pkg.y import Y\nX = 1\n",
        "pkg/y.py": "from pkg import X as Y\n",  # a name of the package: runs pkg/__init__.py
        "pkg/z.py": "from pkg import x\n",
    })
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg", "pkg.x", "pkg.y", "pkg"]]


@pytest.mark.parametrize("name", COMMANDS)
def test_documented_commands_exist_and_expose_main(name):
    assert name in (ROOT / "README.md").read_text(encoding="utf-8")
    module = importlib.import_module(name)
    assert callable(module.main)
    source = Path(module.__file__).read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in source
