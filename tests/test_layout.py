"""The library's layout: the layers are folders. Every module sits in a sub-package (or is one of the
top-level ``constants``, ``__init__``, ``__main__``), every sub-package has one layer, imports point
down the layers (or across, within a layer) and never around in a cycle, the README's "What is here"
table names every folder and module in its layer, and every name is imported from the module that
defines it, never through another one that imported it.

Imports are read from the source (``import``/``from`` anywhere in a module, lazy ones in functions
included), so a cycle hidden inside a function fails here as well.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cellulib"

#: Lowest first: a module may import modules of its own layer or of layers below it. Each layer
#: names its sub-packages (folders of ``cellulib/``) and top-level modules.
LAYERS: dict[str, tuple[str, ...]] = {
    "facts": ("constants",),
    "files": ("files",),
    "data": ("data",),
    "metrics": ("metrics",),
    "models": ("models",),
    "inference": ("inference",),
    "training": ("training",),
    "reporting": ("reporting",),
    "commands": ("cli", "__init__", "__main__"),
    "tools": ("bench",),
}
RANK = {top: i for i, tops in enumerate(LAYERS.values()) for top in tops}


def _modules(package: Path) -> dict[str, Path]:
    """Every module by its dotted name under the package: ``data.synth``, ``data`` (the folder's
    ``__init__``), ``constants``, ``__init__``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name under ``cellulib`` refers to: itself, or the module holding it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(package: Path | None = None) -> dict[str, set[str]]:
    package = package or PACKAGE
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for me, path in modules.items():
        here = me if path.name == "__init__.py" and me != "__init__" else me.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".") if here else []
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                elif node.module == "cellulib" or (node.module or "").startswith("cellulib."):
                    mod = node.module[len("cellulib."):] if node.module != "cellulib" else ""
                else:
                    continue
                for a in node.names:
                    t = _target(f"{mod}.{a.name}" if mod else a.name, modules)
                    if t:
                        found.add(t)
            elif isinstance(node, ast.Import):
                found |= {t for a in node.names if a.name.startswith("cellulib.")
                          if (t := _target(a.name[len("cellulib."):], modules))}
        graph[me] = found - {me}
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer():
    tops = {_top(m) for m in _modules(PACKAGE)}
    assert tops - RANK.keys() == set(), "place new folders in LAYERS (and the README table)"
    assert RANK.keys() - tops == set()


def test_only_the_facts_and_the_entry_points_sit_outside_a_folder():
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat == {"constants", "__init__", "__main__"}, "a new module belongs in a folder"
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (folder / "__init__.py").is_file(), f"{folder.name}/ has no __init__.py"
        assert not [p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"{folder.name}/ has a folder inside: one level of sub-packages"


def test_every_sub_package_lists_its_modules():
    """Each folder's ``__init__`` has a docstring (its job) and ``__all__`` naming its modules."""
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        tree = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{folder.name}/__init__.py has no docstring"
        names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and any(getattr(t, "id", None) == "__all__" for t in n.targets)), None)
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__"))
        assert names is not None and sorted(names) == modules, f"{folder.name}/__init__.py: __all__"


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
            for m, targets in sorted(graph.items()) for t in sorted(targets)
            if RANK[_top(t)] > RANK[_top(m)]]


def test_imports_point_down_the_layers():
    wrong = _wrong_way(_imports())
    assert not wrong, "imports that point up: " + "; ".join(wrong)


def _layer(module: str) -> str:
    return next(name for name, tops in LAYERS.items() if _top(module) in tops)


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


def _package(tmp_path: Path, *folders: str) -> Path:
    """A ``cellulib`` package under ``tmp_path`` with an empty sub-package per folder."""
    pkg = tmp_path / "cellulib"
    for folder in folders:
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    return pkg


def test_the_check_sees_an_import_up_between_folders(tmp_path):
    # a module of data/ that imports from training/, in each spelling the library uses
    pkg = _package(tmp_path, "data", "training")
    (pkg / "training" / "train.py").write_text("def fit():\n    pass\n")
    (pkg / "data" / "a.py").write_text("from cellulib.training.train import fit\n")
    (pkg / "data" / "b.py").write_text("def g():\n    from cellulib.training import train\n")
    (pkg / "data" / "c.py").write_text("import cellulib.training.train\nfrom . import a\n")
    graph = _imports(pkg)
    assert graph["data.a"] == graph["data.b"] == {"training.train"}
    assert graph["data.c"] == {"training.train", "data.a"}
    assert _wrong_way(graph) == [f"data.{m} (data) imports training.train (training)" for m in "abc"]


def test_readme_names_every_module_in_its_layer():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    modules = _modules(PACKAGE)
    for layer, tops in LAYERS.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| {layer} ")), None)
        assert row is not None, f"README 'What is here' has no row for the layer {layer!r}"
        for top in tops:
            if top.startswith("_"):
                continue
            names = [top + ("/" if (PACKAGE / top).is_dir() else "")]
            names += [m.split(".")[1] for m in modules if m.startswith(f"{top}.")]
            for name in names:
                if not name.startswith("_"):
                    assert f"`{name}`" in row, f"README: {name} missing from the {layer} row"


def _foreign_names(package: Path) -> dict[str, dict[str, str]]:
    """Per module (dotted, as in :func:`_modules`), the names it imports at top level from another
    cellulib module: name -> home."""
    out: dict[str, dict[str, str]] = {}
    for mod, path in _modules(package).items():
        out[mod] = {a.asname or a.name: node.module
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
    (``from cellulib.data.breastpathq import read_image``, ``breastpathq.read_image``):
    "file:line module.name (home)"."""
    foreign = _foreign_names(package)
    mine = {path: mod for mod, path in _modules(package).items()}
    found = []
    for path in sources:
        me = mine.get(path)
        tree = ast.parse(_code(path))
        alias: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module == "cellulib"
                                                     or (node.module or "").startswith("cellulib.")):
                prefix = node.module[len("cellulib."):] + "." if node.module != "cellulib" else ""
                alias |= {a.asname or a.name: prefix + a.name for a in node.names
                          if prefix + a.name in foreign}
            elif isinstance(node, ast.Import):
                alias |= {a.asname: a.name[len("cellulib."):] for a in node.names
                          if a.asname and a.name[len("cellulib."):] in foreign}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellulib."):
                mod = node.module[len("cellulib."):]
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
    sources = sorted([*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"),
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


def test_the_home_check_sees_a_re_export_between_folders(tmp_path):
    pkg = _package(tmp_path, "x", "y")
    (pkg / "x" / "a.py").write_text("X = 1\n")
    (pkg / "y" / "b.py").write_text("from cellulib.x.a import X\n\nY = X\n")
    user = tmp_path / "user.py"
    user.write_text("from cellulib.y import b\nfrom cellulib.y.b import X, Y\n\nprint(b.X, b.Y)\n")
    assert imports_through_another_module(pkg, [pkg / "y" / "b.py", user]) == [
        "user.py:2 y.b.X (cellulib.x.a)", "user.py:4 y.b.X (cellulib.x.a)"]
