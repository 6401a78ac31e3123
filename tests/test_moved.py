"""Names that moved when the library was laid out by job (issue 13) keep their old import path: the
same object, with a DeprecationWarning that names the new home."""
from __future__ import annotations

import importlib
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
