"""Scoring under shift (issue 12): every model sees the same shifted pixels, the unshifted scores
are those of ``cellulib predict``, the paired differences are what a hand computation gives, and a
detector's centres on a resampled image come back to the annotated image's pixels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_THREADS
from PIL import Image

from cellulib import save_model
from cellulib.data import synthset
from cellulib.inference import detect
from cellulib.inference.predict import predict_images
from cellulib.reporting import robustness
from cellulib.training import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    import torch

    torch.set_num_threads(TEST_THREADS)
    root = synthset.make_breastpathq(tmp_path_factory.mktemp("tiny"), n_train=6, n_val=5, n_cells=3,
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

    from cellulib.files.imageio import read_image

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

    from cellulib.models import networks

    yy, xx = np.mgrid[:96, :96]
    dots = [(20, 30), (60, 25), (45, 70), (80, 80)]  # (y, x)
    dark = sum(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0 ** 2)) for y, x in dots)
    img = np.repeat((255 * (1 - 0.8 * np.clip(dark, 0, 1)))[..., None], 3, axis=2).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("".join(f"{y} {x} 2\n" for y, x in dots))
    seg = save_model(networks.seg_model("fpn"), tmp_path / "seg.pt",
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
    from cellulib.metrics import agreement
    from cellulib.reporting import plots

    rng = np.random.default_rng(0)
    t = rng.random(30)
    frames = [_frame("A", "none", 0.0, t, t + rng.normal(0, 0.05, 30)),
              _frame("A", "blur", 0.5, t, t + rng.normal(0, 0.2, 30)),
              _frame("M", "none", 0.0, t, np.full(30, 0.4)),
              _frame("M", "blur", 0.5, t, np.full(30, 0.4))]
    scores = pd.concat(frames, ignore_index=True)
    table = robustness.icc_table(scores, strength=0.5)
    ratings = frames[1][["y_true", "y_pred"]].to_numpy()
    expected = agreement.format_ci(agreement.icc(ratings), *agreement.icc_ci(ratings), digits=3)
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

    from cellulib.training import cache

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
    from cellulib.inference.modelfile import load_model

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
    entries = [e for e in cache.cache_entries(train.RECIPE_VERSIONS, derived_versions=versions)
               if e["family"] == "derived"]
    assert len(entries) == 4
    assert sorted(e["current"] for e in entries) == [False, False, True, True]
    assert any("shift version 2, now 1" in e["why"] for e in entries)
    assert any("weights no current model file holds" in e["why"] for e in entries)
    gone = cache.prune_cache(train.RECIPE_VERSIONS, derived_versions=versions)
    assert len(gone) == 2 and len(list(derived.glob("*.npz"))) == 2


# --------------------------------------------------------------------------------------------------
# the stain-shift chapter's tables and sentences, on frames whose errors are the same on every image
# (so every bootstrap CI collapses onto its value and the expected text is written by hand)
def _scores(errors: dict, y_true: float = 0.5, n: int = 6) -> pd.DataFrame:
    """A score_under_shifts table: {(model, kind, strength): error of every image's prediction}."""
    return pd.DataFrame([{"model": m, "kind": k, "strength": s, "path": f"p{i}", "y_true": y_true,
                          "y_pred": y_true + e} for (m, k, s), e in errors.items() for i in range(n)])


def test_shift_plan_adds_the_moderate_strength():
    plan = robustness.shift_plan(0.3, "none")
    assert plan.grid["hed"] == (0.3, 0.5, 1.0)
    assert plan.grid["scale"] == (-1.0, -0.5, -0.3, 0.3, 0.5, 1.0)
    assert plan.strong == {**{k: (1.0,) for k in robustness.SHIFTS[:-1]}, "scale": (-1.0, 1.0)}
    assert plan.compared["jpeg"] == (0.3, 1.0) and plan.compared["scale"] == (0.3, -1.0, 1.0)
    assert plan.detection["blur"] == (0.3, 1.0) and plan.detection["scale"] == (-1.0, 0.3, 1.0)
    assert plan.stain == {"hed": (0.3, 1.0), "hestain": (0.3, 1.0), "brightness_contrast": (0.3, 1.0)}
    assert robustness.shift_plan().grid == robustness.GRID
    for moderate, augment in ((0.0, "hed"), (1.5, "hed"), (0.5, "jitter")):
        with pytest.raises(ValueError):
            robustness.shift_plan(moderate, augment)


def test_as_seen_crops_a_large_image_and_pads_a_small_one_by_reflection():
    img = np.arange(4 * 4 * 3).reshape(4, 4, 3)
    np.testing.assert_array_equal(robustness.as_seen(img, 2), img[:2, :2])
    small = np.array([[[1], [2]], [[3], [4]]])  # 2 x 2, one channel
    np.testing.assert_array_equal(robustness.as_seen(small, 4)[..., 0],
                                  [[4, 3, 4, 3], [2, 1, 2, 1], [4, 3, 4, 3], [2, 1, 2, 1]])


def test_example_rows_and_strength_table():
    img = np.full((16, 16, 3), 128, np.uint8)
    rows, labels = robustness.example_rows({"a": img}, ["blur", "scale"], (0.5,), seed=0)
    assert labels == ["a, strength 0.5"] and len(rows) == 1 and len(rows[0]) == 3
    assert rows[0][0] is img and all(r.shape == img.shape for r in rows[0])
    table = robustness.strength_table(["jpeg", "scale"], (0.5, 1.0))
    assert list(table.index) == ["JPEG compression", "pixel scale"]
    assert table.to_dict("list") == {"strength 0.5": ["quality 52", "x1.4 magnification"],
                                     "strength 1": ["quality 10", "x2 magnification"]}


def test_lost_to_mean_finds_the_models_that_fall_to_the_mean_predictor():
    # MSE 0 (good) and 0.09 (bad) against the mean predictor's 0.05, on 6 patches
    scores = _scores({("good", "hed", 1.0): 0.0, ("bad", "hed", 1.0): 0.3,
                      ("good", "blur", 1.0): 0.0, ("bad", "blur", 1.0): 0.1})
    lost = robustness.lost_to_mean(scores, ["good", "bad"], {"hed": (1.0,), "blur": (1.0,)}, 0.05,
                                   n_boot=50)
    assert lost == [("hed", 1.0, "bad")]


def _clean(mse: dict, learned: dict | None = None) -> pd.DataFrame:
    from cellulib.reporting.statistics import MEAN_PREDICTOR

    learned = learned or {m: True for m in mse}
    return pd.DataFrame({"mse": {**mse, MEAN_PREDICTOR: 0.05},
                         "learned": {**learned, MEAN_PREDICTOR: False}})


def test_degradation_sentence_by_hand():
    clean = _clean({"A": 0.01, "B": 0.02})
    summary = pd.DataFrame({"model": ["A", "B", "A", "B", "A", "B"],
                            "kind": ["none", "none", "hed", "hed", "blur", "blur"],
                            "strength": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
                            "mse": [0.01, 0.02, 0.03, 0.03, 0.02, 0.04]})
    routes = {"segmentation": ["A"], "direct": ["B"]}
    strong = {"hed": (1.0,), "blur": (1.0,)}
    lost = [("hed", 1.0, "A"), ("hed", 1.0, "B"), ("blur", 1.0, "B")]
    assert robustness.degradation_sentence(clean, summary, routes, lost, strong) == (
        "Unshifted, every model has learned (chapters 3 and 4). The worst shift multiplies a model's "
        "MSE by 2.0 to 3.0 (on average 3.0x for the segmentation routes and 2.0x for the direct "
        "models). At strength 1 (and x0.5), 3 of 4 model-shift pairs no longer beat the mean "
        "predictor (the upper end of the MSE's 95% CI is not below its 0.0500): HED stain at 1: all 2 "
        "models; blur (focus) at 1: B.")
    not_b = robustness.degradation_sentence(_clean({"A": 0.01, "B": 0.02}, {"A": True, "B": False}),
                                            summary, routes, [], strong)
    assert not_b.startswith("Unshifted, not every model has learned (B did not), so no comparison")
    assert not_b.endswith("Even at strength 1 every model still beats the mean predictor.")


def test_route_table_and_its_tally_by_hand():
    # unshifted every prediction is exact; under HED the segmentation model A errs by 0.1 (MSE 0.01)
    # and the direct model B by 0.2 (0.04): A minus B is -0.03 on every image
    scores = _scores({("A", "none", 0.0): 0.0, ("B", "none", 0.0): 0.0,
                      ("A", "hed", 1.0): 0.1, ("B", "hed", 1.0): 0.2})
    routes = {"segmentation": ["A"], "direct": ["B"]}
    table = robustness.route_table(scores, {"hed": (1.0,)}, routes, ("A", "B"), True, n_boot=50)
    row = table.loc[("HED stain", "H, E OD x(1 ± 0.5), ± 0.05")]
    assert row.to_dict() == {"segmentation - direct": "-0.0300 [-0.0300 to -0.0300]",
                             "verdict (routes)": "holds", "A - B": "-0.0300 [-0.0300 to -0.0300]",
                             "verdict (pair)": "holds"}
    assert robustness.route_tally(table, True) == (
        "Over the 1 shift settings the claim holds in 1, does not hold in 0 and is undecided in 0: "
        "the segmentation routes lose less under every shift tested, as the paper argues.")
    stuck = robustness.route_table(scores, {"hed": (1.0,)}, routes, ("A", "B"), False, n_boot=50)
    assert set(stuck[["verdict (routes)", "verdict (pair)"]].to_numpy().ravel()) == {"undecided"}
    assert robustness.route_tally(stuck, False).endswith(
        "so every verdict is undecided.")
    assert robustness.finding_sentence(table).startswith(
        "Does the segmentation route generalise better to other stains and scanners, as the paper "
        "argues? Here it holds for 1 of 1 shift settings and is contradicted by 0;")


def _counts(detection: tuple, malignant: tuple, images=("a", "b")) -> pd.DataFrame:
    return pd.DataFrame([{"image": i, "class": c, "tp": tp, "fp": fp, "fn": fn}
                         for i in images for c, (tp, fp, fn) in (("detection", detection),
                                                                 ("malignant", malignant))])


def test_detection_shift_table_and_sentence_by_hand():
    # unshifted: F = 2*8 / (2*8 + 2 + 2) = 0.8 pooled, 2*4 / (2*4 + 1 + 1) = 0.8 tumour; blurred:
    # 12 / 20 = 0.6 and 4 / 10 = 0.4, on both images (so the CIs collapse)
    counts = {("none", 0.0): _counts((8, 2, 2), (4, 1, 1)), ("blur", 1.0): _counts((6, 4, 4), (2, 3, 3))}
    table, whisk = robustness.detection_shift_table(counts, n_boot=50)
    assert table.to_dict("index") == {
        ("none", "none"): {"pooled F": 0.8, "tumour F": 0.8, "change in pooled F": "",
                           "change in tumour F": ""},
        ("blur (focus)", "Gaussian sigma 2 px"): {
            "pooled F": 0.6, "tumour F": 0.4, "change in pooled F": "-0.200 [-0.200 to -0.200]",
            "change in tumour F": "-0.400 [-0.400 to -0.400]"}}
    assert list(whisk["group"]) == ["pooled F", "tumour F"]
    assert robustness.detection_sentence("FPN", 2, "test", table, whisk) == (
        "The FPN network on the 2 images of BRCA-M2C's test split finds nuclei with pooled F 0.800 "
        "and tumour F 0.800 unshifted. Pooled F falls significantly (the CI below 0) under 1 of 1 "
        "shift settings; the largest fall is 0.200 (blur (focus), Gaussian sigma 2 px).")
    assert robustness.detection_sentence("FPN", 2, "test", table, whisk.iloc[:0]) == "No shift was scored."


def test_normalisation_examples_stain_table_and_sentence(tmp_path):
    Image.fromarray(np.full((600, 700, 3), 255, np.uint8)).save(tmp_path / "amida13_example1.png")
    found = robustness.normalisation_examples(tmp_path)
    assert list(found) == ["AMIDA13"] and found["AMIDA13"].shape == (512, 512, 3)
    assert robustness.normalisation_examples(None) == {}
    # white glass has no optical density in any stain
    stats = robustness.stain_table({"as is": [found["AMIDA13"]]}, ["AMIDA13"])
    assert stats.loc["AMIDA13", ("H", "as is")] == 0 and stats.loc["AMIDA13", ("E", "as is")] == 0
    h = pd.DataFrame({("H", "as is"): [0.1, 0.3], ("H", "Macenko"): [0.2, 0.2],
                      ("H", "Reinhard"): [0.2, 0.25]}, index=["x", "y"])
    # standard deviations (n - 1): 0.1414, 0 and 0.0354
    assert robustness.stain_sentence(h).endswith(
        "Across the 2 images the spread (standard deviation) of mean H is 0.141 as they are, 0.000 "
        "after Macenko and 0.035 after Reinhard.")


def test_remedy_table_tally_and_sentences_by_hand():
    # without a remedy: MSE 0.01 unshifted, 0.09 under HED and under a x2 scale
    scores = _scores({("A", "none", 0.0): 0.1, ("A", "hed", 1.0): 0.3, ("A", "scale", 1.0): 0.3})
    remedies = {
        # Macenko: unchanged unshifted (a change of 0: undecided), 0.04 under HED (-0.05: helps)
        "Macenko": _scores({("A", "none", 0.0): 0.1, ("A", "hed", 1.0): 0.2}),
        # the true pixel size: 0.16 under the scale shift (+0.07: hurts); its unshifted row is left out
        "true pixel size": _scores({("A", "none", 0.0): 0.1, ("A", "scale", 1.0): 0.4}),
        # jitter helps under HED (-0.08), but the retrained model has not learned: undecided
        "HED jitter": _scores({("A", "none", 0.0): 0.1, ("A", "hed", 1.0): 0.1}),
    }
    augmented = pd.DataFrame({"mse": [0.01], "learned": [False]}, index=["A"])
    table, whisk = robustness.remedy_table(remedies, scores, ["A"], True, augmented, "hed", n_boot=50)
    assert list(table.index) == [
        ("Macenko", "A", "no shift"), ("Macenko", "A", "HED stain, H, E OD x(1 ± 0.5), ± 0.05"),
        ("true pixel size", "A", "pixel scale, x2 magnification"),
        ("HED jitter", "A", "no shift"), ("HED jitter", "A", "HED stain, H, E OD x(1 ± 0.5), ± 0.05")]
    assert list(table["verdict"]) == ["undecided", "helps", "hurts", "undecided", "undecided"]
    assert list(table["MSE without"]) == [0.01, 0.09, 0.09, 0.01, 0.09]
    assert list(table["MSE with"]) == [0.01, 0.04, 0.16, 0.01, 0.01]
    assert table["change [95% CI]"].iloc[1] == "-0.0500 [-0.0500 to -0.0500]"
    assert len(whisk) == 5 and whisk["value"].round(4).tolist() == [0.0, -0.05, 0.07, 0.0, -0.08]
    assert robustness.remedy_tally(table) == {
        "Macenko": "helps in 1, hurts in 0, undecided in 1 of 2",
        "true pixel size": "helps in 0, hurts in 1, undecided in 0 of 1",
        "HED jitter": "helps in 0, hurts in 0, undecided in 2 of 2"}
    assert robustness.remedy_sentence(table, _clean({"A": 0.01}), None, "none").endswith(
        "**HED jitter** helps in 0, hurts in 0, undecided in 2 of 2. Stain augmentation was not "
        "retrained (augment='none').")
    # the closing paragraph: the HED rise (+0.08 on every image) is the one significant rise
    routes = robustness.route_table(
        _scores({("A", "none", 0.0): 0.1, ("B", "none", 0.0): 0.1, ("A", "hed", 1.0): 0.3,
                 ("B", "hed", 1.0): 0.3}), {"hed": (1.0,)},
        {"segmentation": ["A"], "direct": ["B"]}, ("A", "B"), True, n_boot=50)
    assert robustness.summary_sentence(scores, {"hed": (1.0,)}, ["A"], [("hed", 1.0, "A")], routes,
                                       table, n_boot=50) == (
        "Under 1 of 1 model-shift settings a cellularity model's MSE rises significantly (the CI of "
        "the rise above 0); the mean predictor, which ignores the image, does not move. At strength "
        "1 (and x0.5), 1 model-shift pairs fall to the mean predictor or worse. On the paper's "
        "argument that the segmentation routes generalise better: no shift setting separates the "
        "routes (all 1 undecided), so these data neither support nor contradict the paper's "
        "argument. Of the remedies: Macenko helps in 1, hurts in 0, undecided in 1 of 2; true pixel "
        "size helps in 0, hurts in 1, undecided in 0 of 1; HED jitter helps in 0, hurts in 0, "
        "undecided in 2 of 2.")


def test_glue_skipped_glues_every_key_a_skipped_section_shows(monkeypatch):
    import myst_nb

    from cellulib.reporting import plots

    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.update({name: value}))
    plots.glue_skipped("BRCA-M2C not found.", ["finding", "data_md"], ["fig_a"], "none here")
    assert glued["finding"].data == "BRCA-M2C not found."
    assert glued["data_md"].data == "*BRCA-M2C not found.*"
    assert glued["fig_a"].format == "png" and set(glued) == {"finding", "data_md", "fig_a"}
