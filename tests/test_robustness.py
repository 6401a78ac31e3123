"""Scoring under shift (issue 12): every model sees the same shifted pixels, the unshifted scores
are those of ``cellulib predict``, the paired differences are what a hand computation gives, and a
detector's centres on a resampled image come back to the annotated image's pixels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellulib import detect, robustness, save_model, synth, train
from cellulib.predict import predict_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    import torch

    torch.set_num_threads(2)
    root = synth.make_breastpathq(tmp_path_factory.mktemp("tiny"), n_train=6, n_val=5, n_cells=3,
                                  size=128, seed=0, progress=False)
    os.environ["CELLULIB_HOME"] = str(tmp_path_factory.mktemp("home"))
    model = train.train_direct(root, epochs=1, size=64, progress=False)
    return root, model


def test_unshifted_scores_are_those_of_predict_and_shifts_are_shared(tiny):
    root, model = tiny
    valid = train.predictions(model)
    scores = robustness.score_under_shifts({"R34": model.path, "again": model.path}, valid.path,
                                           valid.y_true, {"hed": (1.0,), "scale": (1.0,)},
                                           seed=3, train_mean=0.4, progress=False)
    clean = scores[(scores.model == "R34") & (scores.kind == "none")]
    # the stored validation predictions went through cellulib predict on the files
    np.testing.assert_allclose(clean.y_pred, valid.y_pred, atol=1e-6)
    plain = predict_images(model.path, list(valid.path), progress=False)
    np.testing.assert_allclose(clean.y_pred, plain.cellularity, atol=1e-6)
    # a HED shift is shift_image with seed + i, the same for both copies of the model
    hed = scores[(scores.model == "R34") & (scores.kind == "hed")].y_pred.to_numpy()
    by_hand = predict_images(model.path, list(valid.path), progress=False,
                             transform=lambda img, i: robustness.shift_image(img, "hed", 1.0, 3 + i))
    np.testing.assert_allclose(hed, by_hand.cellularity, atol=1e-6)
    np.testing.assert_array_equal(hed, scores[(scores.model == "again") & (scores.kind == "hed")].y_pred)
    assert (scores[scores.model == "Mean predictor"].y_pred == 0.4).all()
    # a x2 scan cut into training-size windows: four windows of half the field, averaged (their
    # files scored by cellulib predict); with the true pixel size, the whole magnified patch
    import tifffile

    from cellulib.imageio import read_image

    zoomed = scores[(scores.model == "R34") & (scores.kind == "scale")].y_pred.to_numpy()
    true = robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true,
                                         {"scale": (1.0,)}, seed=3, true_mpp=True, progress=False)
    folder = root / "zoomed"
    folder.mkdir(exist_ok=True)
    for i, path in enumerate(valid.path):
        big = robustness.shift_image(read_image(path), "scale", 1.0)
        assert big.shape[:2] == (256, 256)
        tifffile.imwrite(folder / f"{i}.tif", big, photometric="rgb")
        for k, (y, x) in enumerate([(0, 0), (0, 128), (128, 0), (128, 128)]):
            tifffile.imwrite(folder / f"{i}_{k}.tif", big[y:y + 128, x:x + 128], photometric="rgb")
    windows = [predict_images(model.path, [folder / f"{i}_{k}.tif" for k in range(4)],
                              progress=False).cellularity.mean() for i in range(len(valid))]
    np.testing.assert_allclose(zoomed, windows, atol=1e-6)
    whole = predict_images(model.path, [folder / f"{i}.tif" for i in range(len(valid))], progress=False)
    np.testing.assert_allclose(true[true.kind == "scale"].y_pred, whole.cellularity, atol=1e-6)


def _frame(model, kind, strength, y_true, y_pred):
    return pd.DataFrame({"model": model, "kind": kind, "strength": strength,
                         "path": [f"p{i}" for i in range(len(y_true))], "y_true": y_true,
                         "y_pred": y_pred})


def test_degradation_and_differences_by_hand():
    t = np.array([0.1, 0.4, 0.7, 0.9])
    scores = pd.concat([
        _frame("A", "none", 0.0, t, t + 0.1),  # squared errors 0.01
        _frame("A", "blur", 1.0, t, t + 0.2),  # 0.04
        _frame("B", "none", 0.0, t, t),  # 0
        _frame("B", "blur", 1.0, t, t + np.array([0.1, 0.1, 0.3, 0.3])),  # 0.01, 0.01, 0.09, 0.09
    ], ignore_index=True)
    d = robustness.degradation(scores, "A", "blur", 1.0, n_boot=200)
    assert d.value == pytest.approx(0.03) and d.ci_low == pytest.approx(0.03)
    d = robustness.degradation(scores, "B", "blur", 1.0, n_boot=200)
    assert d.value == pytest.approx(0.05) and d.ci_low < 0.05 < d.ci_high
    diff = robustness.degradation_difference(scores, ["A"], ["B"], "blur", 1.0, n_boot=200)
    assert diff.value == pytest.approx(-0.02)
    both = robustness.degradation_difference(scores, ["A", "B"], ["B"], "blur", 1.0, n_boot=200)
    assert both.value == pytest.approx((0.03 + 0.05) / 2 - 0.05)
    change = robustness.mse_change(scores, scores, "A", "blur", 1.0)
    assert tuple(change) == (0.0, 0.0, 0.0)
    table = robustness.degradation_table(scores, strength=1.0, n_boot=200)
    assert table.loc["A", "MSE, no shift"] == "0.0100"
    assert table.loc["A", "blur (focus)"].startswith("0.0300")
    summary = robustness.shift_summary(scores).set_index(["model", "kind"])
    assert summary.loc[("B", "none"), "icc"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no scores for 'A' under jpeg"):
        robustness.degradation(scores, "A", "jpeg", 1.0)


def test_detections_on_a_resampled_image_come_back_to_the_dots(tmp_path, monkeypatch):
    """A stand-in network sees dark blobs; a x2 resample must still match every dot."""
    import cv2

    from cellulib import models

    yy, xx = np.mgrid[:96, :96]
    dots = [(20, 30), (60, 25), (45, 70), (80, 80)]  # (y, x)
    dark = sum(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0 ** 2)) for y, x in dots)
    img = np.repeat((255 * (1 - 0.8 * np.clip(dark, 0, 1)))[..., None], 3, axis=2).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("".join(f"{y} {x} 2\n" for y, x in dots))
    seg = save_model(models.seg_model("fpn"), tmp_path / "seg.pt",
                     params={"downscale": 1, "disc_diameter": 11.0})

    def maps(self, image):
        nucleus = 1 - image[..., 0].astype(np.float32) / 255 / 1.0
        nucleus = np.clip(nucleus / 0.8, 0, 1)
        probs = np.stack([0 * nucleus, 0 * nucleus, nucleus, 1 - nucleus])
        return probs, 1.0, 1.0

    monkeypatch.setattr(detect._SegModel, "maps", maps)
    cells = pd.DataFrame({"name": ["a"], "image_path": [str(tmp_path / "a.png")],
                          "xml_path": [str(tmp_path / "a.txt")]})
    plain = detect.score_annotated(seg, cells, progress=False).scores()
    assert plain.loc["detection", "f1"] == 1.0

    def double(image, i):
        return cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)

    found = detect.score_annotated(seg, cells, progress=False, transform=double)
    assert found.scores().loc["detection", "f1"] == 1.0
    centres = found.pred.sort_values(["y", "x"])[["y", "x"]].to_numpy()
    np.testing.assert_allclose(centres, sorted(dots), atol=1.0)
    counts = robustness.detection_under_shifts(seg, cells, {"scale": (1.0,), "blur": (0.5,)},
                                               progress=False)
    assert set(counts) == {("none", 0.0), ("scale", 1.0), ("blur", 0.5)}
    tp = counts[("scale", 1.0)].set_index("class").loc["detection", "tp"]
    assert tp == len(dots)
    # stored: read back as computed (the same frames, dtypes included), and the same as a fresh
    # computation without the store
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path / "home"))
    first = robustness.detection_under_shifts(seg, cells, {"blur": (0.5,)}, progress=False)
    assert len(list((tmp_path / "home" / "derived").glob("detection-shifts-*.npz"))) == 1
    again = robustness.detection_under_shifts(seg, cells, {"blur": (0.5,)}, progress=False)
    fresh = robustness.detection_under_shifts(seg, cells, {"blur": (0.5,)}, progress=False,
                                              cache=False)
    assert list(first) == list(again) == list(fresh) == [("none", 0.0), ("blur", 0.5)]
    for key in first:
        pd.testing.assert_frame_equal(again[key], first[key])
        pd.testing.assert_frame_equal(fresh[key], first[key])


def test_route_summary_says_what_the_verdicts_say():
    assert "every shift" in robustness.route_summary({"a": "holds", "b": "holds"})
    assert "all 2 undecided" in robustness.route_summary({"a": "undecided", "b": "undecided"})
    mixed = robustness.route_summary({"blur": "holds", "jpeg": "does not hold", "x": "undecided"})
    assert mixed == ("the segmentation routes lose less under blur, as the paper argues, and the "
                     "direct models lose less under jpeg, against it; the other setting is "
                     "undecided")


def test_icc_table_and_the_robustness_figure():
    import matplotlib

    matplotlib.use("Agg")
    from cellulib import metrics, plots

    rng = np.random.default_rng(0)
    t = rng.random(30)
    frames = [_frame("A", "none", 0.0, t, t + rng.normal(0, 0.05, 30)),
              _frame("A", "blur", 0.5, t, t + rng.normal(0, 0.2, 30)),
              _frame("M", "none", 0.0, t, np.full(30, 0.4)),
              _frame("M", "blur", 0.5, t, np.full(30, 0.4))]
    scores = pd.concat(frames, ignore_index=True)
    table = robustness.icc_table(scores, strength=0.5)
    ratings = frames[1][["y_true", "y_pred"]].to_numpy()
    expected = metrics.format_ci(metrics.icc(ratings), *metrics.icc_ci(ratings), digits=3)
    assert table.loc["A", "blur (focus)"] == expected
    assert table.loc["M", "no shift"] == "0 (constant)"
    fig = plots.robustness_curves(robustness.shift_summary(scores), {"seg": ["A"], "direct": []},
                                  mean_mse=0.1, shift_names=robustness.SHIFT_NAMES)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["blur (focus): MSE", "blur (focus): ICC"]
    assert fig.axes[0].get_ylabel() == "validation MSE (log scale)"


def test_scores_under_shift_are_stored_and_recomputed_only_when_an_input_changes(tiny, monkeypatch):
    import os
    import shutil
    from pathlib import Path

    from cellulib import store

    root, model = tiny
    valid = train.predictions(model).iloc[:3]
    grid = {"blur": (1.0,)}
    derived = Path(os.environ["CELLULIB_HOME"]) / "derived"
    shutil.rmtree(derived, ignore_errors=True)
    first = robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true, grid,
                                          seed=3, train_mean=0.4, progress=False)
    assert len(list(derived.glob("shifts-*.npz"))) == 1
    calls = []
    real = robustness._score_settings
    monkeypatch.setattr(robustness, "_score_settings",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true, grid,
                                          seed=3, train_mean=0.4, progress=False)
    assert not calls, "scored again although nothing changed"
    pd.testing.assert_frame_equal(again, first)  # values and dtypes, exactly
    # each of these is another table: scored again, stored beside the first
    robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true, grid, seed=4,
                                  train_mean=0.4, progress=False)
    monkeypatch.setattr(robustness, "SHIFT_VERSION", robustness.SHIFT_VERSION + 1)
    robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true, grid, seed=3,
                                  train_mean=0.4, progress=False)
    assert len(calls) == 2 and len(list(derived.glob("shifts-*.npz"))) == 3
    monkeypatch.setattr(robustness, "SHIFT_VERSION", robustness.SHIFT_VERSION - 1)
    # other weights: a model file whose weights differ by one value
    from cellulib.store import load_model

    net, info = load_model(model.path)
    with __import__("torch").no_grad():
        next(net.parameters()).view(-1)[0] += 1.0
    robustness.score_under_shifts({"R34": (net, info)}, valid.path, valid.y_true, grid, seed=3,
                                  train_mean=0.4, progress=False)
    assert len(calls) == 3
    # a damaged file is computed again, with a warning naming it
    stored = sorted(derived.glob("shifts-*.npz"), key=lambda p: p.stat().st_mtime)[0]
    stored.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match=f"{stored.name}: not readable"):
        redone = robustness.score_under_shifts({"R34": model.path}, valid.path, valid.y_true,
                                               grid, seed=3, train_mean=0.4, progress=False)
    assert len(calls) == 4
    pd.testing.assert_frame_equal(redone, first)
    # cache list: derived tables of current models are current; the one of the changed weights
    # (no model file holds them) and those of another shift version are not
    versions = {"inference": 1, "shift": robustness.SHIFT_VERSION, "stain": 1}
    entries = [e for e in store.cache_entries(train.RECIPE_VERSIONS, derived_versions=versions)
               if e["family"] == "derived"]
    assert len(entries) == 4
    assert sorted(e["current"] for e in entries) == [False, False, True, True]
    assert any("shift version 2, now 1" in e["why"] for e in entries)
    assert any("weights no current model file holds" in e["why"] for e in entries)
    gone = store.prune_cache(train.RECIPE_VERSIONS, derived_versions=versions)
    assert len(gone) == 2 and len(list(derived.glob("*.npz"))) == 2
