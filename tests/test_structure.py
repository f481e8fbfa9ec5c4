"""pmp_scale's import graph has no circle, between modules or between layers (subpackages).

Every import counts, at module level and inside functions: a function-level import only hides a
circle from the interpreter, not from a reader, and lazy imports are how the old 13-module
circle (release/audit -> secrecy -> finetune -> release) went unnoticed. Importing a submodule
also runs its packages' __init__ (an edge to each package the importer is not itself inside).
Static (ast): nothing is imported, so the check costs a fraction of a second.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pmp_scale

ROOT = Path(pmp_scale.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    """'pkg.sub.mod' -> file, for every .py under `root` (a package directory)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its code, any import form)."""
    modules = module_names(root)

    def existing(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                if target.split(".")[0] == root.name:
                    targets.add(existing(target))
        for target in list(targets):  # a submodule's import runs its packages' __init__ first
            parent = target.rpartition(".")[0]
            while "." in parent:
                if not (name + ".").startswith(parent + "."):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
        targets.discard(name)
        graph[name] = targets
    return graph


def layers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between layers: each subpackage or top-level module of the package."""
    def layer(module: str) -> str:
        return ".".join(module.split(".")[:2])
    out = {layer(m): set() for m in graph}
    for m, targets in graph.items():
        out[layer(m)] |= {layer(t) for t in targets} - {layer(m)}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_between_modules():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_between_layers():
    graph = layers(import_graph(ROOT))
    cycle = find_cycle(graph)
    assert cycle is None, "layers import each other: " + " -> ".join(cycle)
    # the directions the layers were given (higher imports lower, never the reverse)
    for low, high in [("pmp_scale.release", "pmp_scale.secrecy"),
                      ("pmp_scale.release", "pmp_scale.finetune"),
                      ("pmp_scale.mask", "pmp_scale.release"),
                      ("pmp_scale.zero3", "pmp_scale.mask"),
                      ("pmp_scale.data", "pmp_scale.nft")]:
        assert high not in graph[low], f"{low} imports {high}"


def test_graph_sees_every_import_form():
    """Function-level, relative (one and two dots), `from . import x` and absolute imports all
    give edges, and a package's __init__ is reached through its submodules."""
    graph = import_graph(ROOT)
    assert "pmp_scale.release.audit" in graph["pmp_scale.secrecy.audit"]   # from ..release.audit
    assert "pmp_scale.secrecy.stats" in graph["pmp_scale.secrecy.attacks"]  # from . import stats
    assert "pmp_scale.finetune.train" in graph["pmp_scale.secrecy.payoff"]  # inside a function
    assert "pmp_scale.finetune" in graph["pmp_scale.secrecy.payoff"]        # its package __init__
    assert "pmp_scale.ds_internals" in graph["pmp_scale.checkpoint"]        # from . import x
    assert "pmp_scale.zero3" not in graph["pmp_scale.zero3.partitions"]     # its own package


def test_planted_circles_are_caught(tmp_path):
    """A copy of the package with one lazy import planted the way the old circle ran
    (release -> secrecy inside a function), and a synthetic package whose two modules import
    each other, one of them only inside a function: both fail the check, naming the circle."""
    copy = tmp_path / "pmp_scale"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    publish = copy / "release" / "publish.py"
    publish.write_text(publish.read_text() + "\n\ndef _planted():\n"
                       "    from ..secrecy import run_attacks\n    return run_attacks\n")
    assert find_cycle(import_graph(ROOT)) is None
    cycle = find_cycle(import_graph(copy))
    assert cycle is not None and "pmp_scale.release.publish" in cycle and \
        any(m.startswith("pmp_scale.secrecy") for m in cycle), cycle
    assert find_cycle(layers(import_graph(copy))) is not None

    pkg = tmp_path / "synthetic" / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from .base import thing\n")
    (pkg / "low" / "base.py").write_text("def thing():\n    from ..high import top\n"
                                         "    return top\n")
    (pkg / "high.py").write_text("from pkg.low import thing\n\ntop = 1\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) == ["pkg.high", "pkg.low", "pkg.low.base", "pkg.high"]
    assert find_cycle(layers(graph)) == ["pkg.high", "pkg.low", "pkg.high"]
    (pkg / "low" / "base.py").write_text("def thing():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
