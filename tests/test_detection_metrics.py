"""Detection scores (SPEC 1.4, the MCSpatNet protocol) against hand-computed cases and a second,
independent implementation written the way MCSpatNet's evaluation code works: dot maps,
``numpy.where`` raster order, brute-force distances."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mcspatnet_reference import reference_counts

from cellulib.metrics.detection import (
    DETECTION_RADIUS,
    class_confusion,
    detection_curve,
    detection_scores,
    match_points,
)


def test_hand_computed_cases():
    # one match at 2 px, one far prediction (FP), one unmatched dot (FN)
    assert match_points([[10, 10], [30, 30]], [[12, 10], [50, 50]]) == (1, 1, 1)
    # strictly closer than the radius: 6 px does not match, 5.9 does
    assert match_points([[10, 10]], [[16, 10]]) == (0, 1, 1)
    assert match_points([[10, 10]], [[15.9, 10]], radius=6.5) == (1, 0, 0)
    # one prediction between two dots is matched once; the first dot in raster order takes it
    assert match_points([[10, 10], [14, 10]], [[12, 10]]) == (1, 0, 1)
    # two predictions on one pixel are one dot
    assert match_points([[10, 10]], [[10.2, 9.8], [9.9, 10.1]]) == (1, 0, 0)
    # greedy, not optimal: dot A (raster first) takes the nearest prediction p1, so dot B, whose only
    # candidate was p1, is missed although a perfect matching exists
    assert match_points([[10, 10], [15, 10]], [[13, 10], [6, 10]], radius=4) == (1, 1, 1)
    assert match_points([], [[1, 1]]) == (0, 1, 0)
    assert match_points([[1, 1]], np.empty((0, 2))) == (0, 0, 1)


def test_bad_radius_and_points():
    with pytest.raises(ValueError, match="radius"):
        match_points([[1, 1]], [[1, 1]], radius=0)
    with pytest.raises(ValueError, match="finite"):
        match_points([[np.nan, 1]], [[1, 1]])


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_dot_map_implementation(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 200, size=(150, 2)).astype(float)
    # predictions near some dots (sub-pixel jitter, ties at integer distances), plus clutter
    near = truth[rng.random(len(truth)) < 0.7] + rng.normal(0, 3, size=(1, 2))
    pred = np.vstack([near + rng.normal(0, 2.5, size=near.shape),
                      rng.uniform(0, 200, size=(40, 2))])
    pred = np.clip(pred, 0, 199)
    for radius in (1, 2, 3, 4, 5, 6):
        assert match_points(truth, pred, radius) == reference_counts(truth, pred, radius)


def _frame(image, xy, cls):
    return pd.DataFrame({"image": image, "x": xy[:, 0], "y": xy[:, 1], "cls": cls})


def test_scores_micro_average_and_pooled_row():
    # image a: 2 lymphocytes found, 1 tumour dot labelled lymphocyte by the detector
    truth = pd.concat([
        _frame("a", np.array([[10.0, 10], [40, 40]]), "lymphocyte"),
        _frame("a", np.array([[80.0, 80]]), "malignant"),
        _frame("b", np.array([[10.0, 10]]), "normal"),
    ])
    pred = pd.concat([
        _frame("a", np.array([[11.0, 10], [40, 42], [80, 81]]), "lymphocyte"),
        _frame("c", np.array([[5.0, 5]]), "malignant"),  # an image without dots: one FP
    ])
    s = detection_scores(truth, pred)
    assert s.loc["lymphocyte", ["tp", "fp", "fn"]].tolist() == [2, 1, 0]
    assert s.loc["malignant", ["tp", "fp", "fn"]].tolist() == [0, 1, 1]
    assert s.loc["normal", ["tp", "fp", "fn"]].tolist() == [0, 0, 1]
    # pooled: the misclassified tumour dot is detected
    assert s.loc["detection", ["tp", "fp", "fn"]].tolist() == [3, 1, 1]
    assert s.loc["lymphocyte", "precision"] == pytest.approx(2 / 3)
    assert s.loc["detection", "f1"] == pytest.approx(0.75)
    # MCSpatNet's conventions: nothing predicted -> precision 1, and F 0 when P + R = 0
    assert s.loc["normal", "precision"] == 1.0 and s.loc["normal", "f1"] == 0.0
    assert s.loc["malignant", "f1"] == 0.0
    curve = detection_curve(truth, pred, radii=[1, 2, 6])
    assert curve.radius.tolist().count(1.0) == 4
    f_det = curve[curve["class"] == "detection"].set_index("radius").f1
    assert f_det[1.0] < f_det[2.0] <= f_det[6.0] == pytest.approx(0.75)


def test_real_dots_against_themselves(brca_dir):
    from cellulib.data.annotations import read_brca_m2c_points
    from cellulib.data.breastpathq import read_cells

    cells = read_cells(brca_dir)
    cells = cells[cells.split == "val"]
    truth = pd.concat([read_brca_m2c_points(p).assign(image=n)
                       for n, p in zip(cells["name"], cells["xml_path"])])
    s = detection_scores(truth, truth)
    assert (s.f1 == 1.0).all() and s.loc["detection", "fp"] == 0
    # every prediction moved right: at 6 px a dot's own prediction no longer counts, only
    # neighbours' do; both implementations agree image by image, with real crowding
    for shift in (3.0, DETECTION_RADIUS):
        moved = truth.assign(x=truth.x + shift)
        expected = np.zeros(3, dtype=int)
        for name in cells["name"]:
            t = truth.loc[truth.image == name, ["x", "y"]].to_numpy()
            p = moved.loc[moved.image == name, ["x", "y"]].to_numpy()
            expected += reference_counts(t, p, DETECTION_RADIUS, shape=(700, 700))
        got = detection_scores(truth, moved).loc["detection", ["tp", "fp", "fn"]].tolist()
        assert got == expected.tolist()
        if shift == DETECTION_RADIUS:
            assert got[0] < 0.1 * len(truth)


def test_class_confusion_hand_computed():
    classes = ("lymphocyte", "malignant", "normal")
    truth = pd.DataFrame([
        ("a", 10, 10, "malignant"),   # matched by a malignant detection: diagonal
        ("a", 40, 10, "lymphocyte"),  # matched by a malignant detection: lymphocyte -> malignant
        ("a", 70, 10, "normal"),      # no detection near: missed
        ("b", 10, 10, "normal"),      # matched by a lymphocyte detection
        ("b", 10, 20, "normal"),      # its only candidate was taken (raster order): missed
    ], columns=["image", "x", "y", "cls"])
    pred = pd.DataFrame([
        ("a", 12, 10, "malignant"),
        ("a", 43, 10, "malignant"),
        ("a", 90, 90, "lymphocyte"),  # far from every dot: a false detection
        ("b", 10, 15, "lymphocyte"),  # 5 px from both dots of image b
        ("b", 10.2, 15.1, "normal"),  # the same pixel: one dot of the map, the first point's class
    ], columns=["image", "x", "y", "cls"])
    got = class_confusion(truth, pred, classes=classes)
    expected = np.array([
        # lym mal nor unmatched   (detected)
        [0, 1, 0, 0],  # lymphocyte
        [0, 1, 0, 0],  # malignant
        [1, 0, 0, 2],  # normal
        [1, 0, 0, 0],  # unmatched detections
    ])
    assert got.to_numpy().tolist() == expected.tolist()
    assert got.index.tolist() == got.columns.tolist() == [*classes, "unmatched"]
    # the matched cells are the pooled TP of detection_scores, the margins its FN and FP
    pooled = detection_scores(truth, pred).loc["detection"]
    assert got.iloc[:3, :3].to_numpy().sum() == pooled.tp
    assert got.iloc[:3, 3].sum() == pooled.fn and got.iloc[3, :3].sum() == pooled.fp
    with pytest.raises(ValueError, match="outside"):
        class_confusion(truth.assign(cls="stroma"), pred)


def test_class_confusion_margins_agree_with_the_protocol_on_random_points():
    rng = np.random.default_rng(3)
    classes = ["lymphocyte", "malignant", "normal"]
    def points(n):
        return pd.DataFrame({"image": rng.integers(0, 4, n), "x": rng.uniform(0, 80, n),
                             "y": rng.uniform(0, 80, n), "cls": rng.choice(classes, n)})
    truth, pred = points(300), points(280)
    got = class_confusion(truth, pred)
    pooled = detection_scores(truth, pred).loc["detection"]
    assert got.iloc[:3, :3].to_numpy().sum() == pooled.tp
    assert got.iloc[:3, 3].sum() == pooled.fn and got.iloc[3, :3].sum() == pooled.fp
