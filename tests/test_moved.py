"""Names that moved when the library was laid out by job (issue 13) keep their old import path: the
same object, with a DeprecationWarning that names the new home."""
from __future__ import annotations

import ast
import importlib
import json
import pathlib
import warnings

import pytest

MOVED = [
    ("cellulib.data", "weak_mask", "cellulib.transforms"),
    ("cellulib.data", "downscale", "cellulib.transforms"),
    ("cellulib.data", "HEDJitter", "cellulib.transforms"),
    ("cellulib.metrics", "PAPER", "cellulib.report"),
    ("cellulib.metrics", "MCSPATNET_F", "cellulib.report"),
    ("cellulib.train", "table1", "cellulib.report"),
    ("cellulib.train", "results_table", "cellulib.report"),
    ("cellulib.stain", "normalizer_from_options", "cellulib.store"),
    ("cellulib.predict", "match_predictions", "cellulib.evaluation"),
    ("cellulib.predict", "evaluate_files", "cellulib.evaluation"),
    ("cellulib.predict", "PredictWarning", "cellulib.evaluation"),
    ("cellulib.predict", "agreement_figure", "cellulib.plots"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_path_gives_the_same_object_with_a_warning(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
        obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(new), name)


def test_from_import_of_an_old_path_works():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from cellulib.metrics import PAPER  # noqa: F401
    assert any("cellulib.report.PAPER" in str(w.message) for w in caught)


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError, match="nothing_here"):
        importlib.import_module("cellulib.data").nothing_here  # noqa: B018


OLD_HOMES = ("cellulib.data", "cellulib.metrics", "cellulib.predict", "cellulib.stain", "cellulib.train")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sources():
    """(name, code) of every library module, test and chapter notebook but the old paths' own."""
    for path in sorted([*ROOT.glob("cellulib/*.py"), *ROOT.glob("tests/*.py")]):
        if path.name not in ("_moved.py", "test_moved.py"):
            yield path.name, path.read_text()
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path.name, "\n".join(line for line in code.splitlines()
                                   if not line.lstrip().startswith(("%", "!")))


def test_the_project_itself_imports_moved_names_from_their_new_home():
    moves = {old: importlib.import_module(old).__getattr__.moves for old in OLD_HOMES}
    short = {old.split(".")[1]: old for old in OLD_HOMES}
    assert moves["cellulib.data"]["weak_mask"] == "cellulib.transforms"  # the table is read
    old_uses = []
    for name, code in _sources():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module in moves:
                old_uses += [f"{name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                             if a.name in moves[node.module]]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in short and node.attr in moves[short[node.value.id]]):
                old_uses.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    # test_report checks train.results_table's old path on purpose
    assert old_uses == ["test_report.py:180 train.results_table"]
