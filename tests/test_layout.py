"""The library's layout: every module has one layer, imports point down (or across) and never
around in a cycle, the README's "What is here" table names every module, and every name is
imported from the module that defines it, never through another one that imported it.

Imports are read from the source (``import``/``from`` anywhere in a module, lazy ones in functions
included), so a cycle hidden inside a function fails here as well.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cellulib"

#: Lowest first: a module may import modules of its own layer or of layers below it.
LAYERS: dict[str, tuple[str, ...]] = {
    "facts": ("constants",),
    "files": ("imageio",),
    "data": ("stain", "transforms", "annotations", "data", "synth", "profiles", "proxy"),
    "models": ("features", "losses", "metrics", "models", "engine", "store"),
    "training and inference": ("train", "predict", "detect", "slide"),
    "reporting": ("report", "plots", "evaluation", "robustness", "realtissue"),
    "commands and tools": ("cli", "bench", "bookstatus", "lab", "__init__", "__main__"),
}
RANK = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


def _imports() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "cellulib":
                    found |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("cellulib."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.level:
                found.add((node.module or "").split(".")[0])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cellulib.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - RANK.keys() == set(), "place new modules in LAYERS (and the README table)"
    assert RANK.keys() - modules == set()


def test_imports_point_down_the_layers():
    wrong = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
             for m, targets in sorted(_imports().items()) for t in sorted(targets)
             if RANK[t] > RANK[m]]
    assert not wrong, "imports that point up: " + "; ".join(wrong)


def _layer(module: str) -> str:
    return next(name for name, mods in LAYERS.items() if module in mods)


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    # the checker itself: two modules that import each other lazily form a cycle
    pkg = tmp_path / "cellulib"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from cellulib import b\n")
    (pkg / "b.py").write_text("def g():\n    from cellulib.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert _imports() == {"a": {"b"}, "b": {"a"}}


def test_readme_names_every_module_in_its_layer():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    for layer, mods in LAYERS.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| {layer} ")), None)
        assert row is not None, f"README 'What is here' has no row for the layer {layer!r}"
        for m in mods:
            if not m.startswith("_"):
                assert re.search(rf"`{m}`", row), f"README: module {m} missing from its layer row"


def _foreign_names(package: Path) -> dict[str, dict[str, str]]:
    """Per module, the names it imports at top level from another cellulib module: name -> home."""
    out: dict[str, dict[str, str]] = {}
    for path in package.glob("*.py"):
        out[path.stem] = {a.asname or a.name: node.module
                          for node in ast.parse(path.read_text(encoding="utf-8")).body
                          if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellulib.")
                          for a in node.names}
    return out


def _code(path: Path) -> str:
    """A module's or a chapter's Python source (a chapter's code cells, without IPython magics)."""
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))


def imports_through_another_module(package: Path, sources: list[Path]) -> list[str]:
    """Uses, in ``sources``, of a name through a cellulib module that only imported it
    (``from cellulib.data import read_image``, ``data.read_image``): "file:line module.name (home)"."""
    foreign = _foreign_names(package)
    found = []
    for path in sources:
        me = path.stem if path.parent == package else None
        tree = ast.parse(_code(path))
        alias: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cellulib":
                alias |= {a.asname or a.name: a.name for a in node.names if a.name in foreign}
            elif isinstance(node, ast.Import):
                alias |= {(a.asname or a.name.split(".")[-1]): a.name.split(".")[1]
                          for a in node.names if a.name.startswith("cellulib.")}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellulib."):
                mod = node.module.split(".")[1]
                found += [f"{path.name}:{node.lineno} {mod}.{a.name} ({foreign[mod][a.name]})"
                          for a in node.names if mod != me and a.name in foreign.get(mod, {})]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in alias):
                mod = alias[node.value.id]
                if mod != me and node.attr in foreign.get(mod, {}):
                    found.append(f"{path.name}:{node.lineno} {mod}.{node.attr} "
                                 f"({foreign[mod][node.attr]})")
    return found


def test_every_name_is_imported_from_its_home():
    """No re-exports: the library, the tests and the chapters import each name from the module
    that defines it, so a name has one home and removing an import never breaks another module."""
    sources = sorted([*PACKAGE.glob("*.py"), *(REPO / "tests").glob("*.py"),
                      *(REPO / "notebooks").glob("*.ipynb")])
    assert imports_through_another_module(PACKAGE, sources) == []


def test_the_home_check_sees_a_re_export(tmp_path):
    pkg = tmp_path / "cellulib"
    pkg.mkdir()
    (pkg / "a.py").write_text("X = 1\n")
    (pkg / "b.py").write_text("from cellulib.a import X\n\nY = X\n")
    user = tmp_path / "user.py"
    user.write_text("from cellulib import b\nfrom cellulib.b import X, Y\n\nprint(b.X, b.Y)\n")
    assert imports_through_another_module(pkg, [pkg / "b.py", user]) == [
        "user.py:2 b.X (cellulib.a)", "user.py:4 b.X (cellulib.a)"]
