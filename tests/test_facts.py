"""One definition per fact: the class order, the weak-mask disc and scale, the stain vectors, the
network stride and the book's budget live in one module, and every other module uses that name.

The checks read the library's source, so a fact typed again (a tuple of class names, ``15.0`` as a
default, a second ``BOOK_BUDGET_S``) fails here even when its value agrees today."""
from __future__ import annotations

import ast
import collections
import inspect
from pathlib import Path

import pytest

from cellulib import constants

PACKAGE = Path(__file__).resolve().parents[1] / "cellulib"
CLASS_NAMES = set(constants.CLASSES)


def _trees(package: Path = PACKAGE) -> dict[str, ast.Module]:
    """Every module by its dotted name under the package (``data.synth``), parsed."""
    return {".".join(p.relative_to(package).with_suffix("").parts): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(package.rglob("*.py"))}


def _module_constants(trees: dict[str, ast.Module]) -> list[tuple[str, str, ast.expr | None]]:
    """(module, NAME, value) of every upper-case module-level assignment."""
    out = []
    for mod, tree in trees.items():
        for node in tree.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            out += [(mod, t.id, node.value) for t in targets
                    if isinstance(t, ast.Name) and t.id.lstrip("_").isupper()]
    return out


def defined_twice(trees: dict[str, ast.Module]) -> list[str]:
    """Upper-case names assigned at module level in more than one module, and aliases (a constant
    that is just another constant's name under a second name)."""
    homes = collections.defaultdict(list)
    aliases = []
    for mod, name, value in _module_constants(trees):
        homes[name].append(mod)
        if isinstance(value, ast.Name) and value.id.lstrip("_").isupper():
            aliases.append(f"{mod}.{name} = {value.id}")
    return [f"{name} in {', '.join(mods)}" for name, mods in sorted(homes.items())
            if len(mods) > 1] + aliases


def class_tuples(trees: dict[str, ast.Module]) -> list[str]:
    """Tuples or lists of three or more class names typed outside `cellulib.constants`."""
    found = []
    for mod, tree in trees.items():
        if mod == "constants":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 3:
                values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if (len(values) == len(node.elts) and all(isinstance(v, str) for v in values)
                        and set(values) <= CLASS_NAMES):
                    found.append(f"{mod}:{node.lineno} {tuple(values)}")
    return found


#: Settings whose defaults and profile values must name the constant, never repeat its number.
NAMED_SETTINGS = {"diameter": "DISC_DIAMETER", "disc_diameter": "DISC_DIAMETER",
                  "downscale": "SEG_DOWNSCALE"}


def typed_settings(trees: dict[str, ast.Module]) -> list[str]:
    """Parameter defaults, keyword arguments and dict entries of `NAMED_SETTINGS` that type the
    constant's value as a number instead of using its name."""
    found = []

    def check(mod: str, name: str, value: ast.expr | None) -> None:
        const = NAMED_SETTINGS.get(name)
        if (const and isinstance(value, ast.Constant) and not isinstance(value.value, bool)
                and value.value == getattr(constants, const)):
            found.append(f"{mod}:{value.lineno} {name}={value.value!r} (use {const})")

    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                args = [*node.posonlyargs, *node.args]
                for arg, default in zip(args[len(args) - len(node.defaults):], node.defaults):
                    check(mod, arg.arg, default)
                for arg, default in zip(node.kwonlyargs, node.kw_defaults):
                    check(mod, arg.arg, default)
            elif isinstance(node, ast.keyword) and node.arg:
                check(mod, node.arg, node.value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        check(mod, key.value, value)
    return found


def typed_stain_vectors(trees: dict[str, ast.Module]) -> list[str]:
    """Numbers of the H&E stain vectors typed outside `cellulib.constants`."""
    values = set(constants.H_STAIN_VECTOR) | set(constants.E_STAIN_VECTOR)
    return [f"{mod}:{node.lineno} {node.value}" for mod, tree in trees.items() if mod != "constants"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value in values]


def test_no_constant_is_defined_in_two_modules():
    assert defined_twice(_trees()) == []


def test_the_class_order_is_typed_once():
    assert class_tuples(_trees()) == []


def test_disc_and_scale_settings_use_their_constants():
    assert typed_settings(_trees()) == []


def test_stain_vectors_are_typed_once():
    assert typed_stain_vectors(_trees()) == []


def test_users_see_the_one_definition():
    from cellulib.data import breastpathq, profiles, stain, synth, transforms
    from cellulib.data.annotations import BRCA_M2C_CLASSES
    from cellulib.metrics import detection

    for func in (breastpathq.SegDataset, breastpathq.seg_dataloaders):
        params = inspect.signature(func).parameters
        assert params["downscale"].default == constants.SEG_DOWNSCALE
        assert params["diameter"].default == constants.DISC_DIAMETER
    assert inspect.signature(transforms.weak_mask).parameters["diameter"].default == 15.0
    for name in profiles.PROFILES:
        s = profiles.get_profile(name)
        assert (s["downscale"], s["disc_diameter"]) == (2, 15.0)  # paper 4.2
    assert stain._REF_HE[:, 0].tolist() == list(synth._H_VECTOR) == [0.5626, 0.7201, 0.4062]
    assert stain._REF_HE[:, 1].tolist() == list(synth._E_VECTOR) == [0.2159, 0.8012, 0.5581]
    # detection tables list the classes in the order of BRCA-M2C's dot classes 1, 2, 3
    assert detection.DETECTION_CLASSES == ("lymphocyte", "malignant", "normal")
    assert [BRCA_M2C_CLASSES[k][1] for k in (1, 2, 3)] == list(detection.DETECTION_CLASSES)


# the checks themselves, on a small package with each kind of twin
_TWINS = {
    "constants": "CLASSES = ('normal', 'lymphocyte', 'malignant', 'background')\n",
    "a": ("BUDGET = 600.0\nNAMES = CLASSES\nORDER = ('lymphocyte', 'malignant', 'normal')\n"
          "def mask(points, diameter=15.0, downscale=2):\n    return points\n"
          "P = {'disc_diameter': 15.0, 'downscale': 1}\nH = [0.5626, 0.7201, 0.4062]\n"
          "x = mask([], diameter=15)\n"),
    "b": "BUDGET: float = 600.0\nPAIR = ('normal', 'normal')\n",
}


@pytest.fixture
def twins(tmp_path):
    for name, code in _TWINS.items():
        (tmp_path / f"{name}.py").write_text(code)
    return _trees(tmp_path)


def test_the_checks_see_each_kind_of_twin(twins):
    assert defined_twice(twins) == ["BUDGET in a, b", "a.NAMES = CLASSES"]
    assert class_tuples(twins) == ["a:3 ('lymphocyte', 'malignant', 'normal')"]
    assert typed_settings(twins) == [
        "a:4 diameter=15.0 (use DISC_DIAMETER)", "a:4 downscale=2 (use SEG_DOWNSCALE)",
        "a:6 disc_diameter=15.0 (use DISC_DIAMETER)", "a:8 diameter=15 (use DISC_DIAMETER)"]
    assert typed_stain_vectors(twins) == ["a:7 0.5626", "a:7 0.7201", "a:7 0.4062"]


def test_one_rule_tells_a_brca_m2c_folder(tmp_path):
    """`cellulib.data.annotations.is_brca_m2c` is the rule: a split file marks the folder, and the
    layout check, the cells reader and the training recipe follow it."""
    from cellulib.data import annotations, breastpathq
    from cellulib.files.imageio import DataError
    from cellulib.training import train

    # the recipe's choice of BRCA_M2C_SEG asks the same rule
    assert "is_brca_m2c(root)" in inspect.getsource(train.train_seg)
    root = tmp_path / "copy"
    root.mkdir()
    assert not annotations.is_brca_m2c(root)
    (root / "brca_ds_train.txt").write_text("a.png\n")
    assert annotations.is_brca_m2c(root) and annotations.detect_layout(root) == "brca-m2c"
    # the reader then names what the copy lacks
    with pytest.raises(DataError, match=r"images \(folder missing\)"):
        breastpathq.read_cells(root)


def test_one_rule_tells_a_complete_synthetic_set(tmp_path, monkeypatch, capsys):
    """`cellulib.data.datasets.synthetic_ready` decides for the chapters (`get_dataset`) and for
    ``cellulib train`` without ``--data`` alike."""
    import argparse

    from cellulib.cli import commands
    from cellulib.data import datasets

    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    root = datasets.synthetic_root("paper", 0)
    assert not datasets.synthetic_ready(root)
    (root / "datasets").mkdir(parents=True)
    (root / "datasets" / "val_labels.csv").write_text("slide,rid,y\n")
    assert datasets.synthetic_ready(root)
    assert datasets.get_dataset(profile="paper", seed=0) == root  # reused, nothing rendered
    commands._confirm_render(argparse.Namespace(profile="paper", seed=0, yes=False))  # no prompt
    assert capsys.readouterr().err == ""
