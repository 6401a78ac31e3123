"""Tests of cellulib.models.features: the 81 features (paper 3.3, SPEC 3.2) and the LightGBM model.

References: hand-computed areas and activations, the analytic LoG response of a Gaussian blob,
scikit-image's ``blob_log`` (the authors' blob detector), scipy's ``gaussian_laplace``,
scikit-learn's mean predictor.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
from skimage.feature import blob_log

from cellulib.constants import NUCLEUS_CLASSES
from cellulib.models import features as F
from cellulib.models.features import (
    AREA_THRESHOLDS,
    BLOB_THRESHOLDS,
    FEATURE_NAMES,
    extract_features,
    extract_features_reference,
    features_frame,
    fit_gbt,
    gbt_importance,
    log_blobs,
    predict_gbt,
    select_min_leaf,
)

# --------------------------------------------------------------------------------------------------
# test maps


def _gaussian(shape, centre, sigma, amplitude):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return amplitude * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _blob_map(shape, n, rng, separated=True, noise=0.0, kind="gaussian", min_gap=30):
    """Blobs of radius 4-8 px and peak 0.1-1 (Gaussian or soft discs like a segmentation output)."""
    img = np.zeros(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = []
    for _ in range(100 * n):  # bounded: a crowded map simply gets fewer blobs
        if len(centres) == n:
            break
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        if separated and any((cy - a) ** 2 + (cx - b) ** 2 < min_gap**2 for a, b in centres):
            continue
        centres.append((cy, cx))
        radius, peak = rng.uniform(4, 8), rng.uniform(0.1, 1.0)
        dist2 = (yy - cy) ** 2 + (xx - cx) ** 2
        if kind == "gaussian":
            blob = peak * np.exp(-dist2 / (2 * (radius / 2) ** 2))
        else:
            blob = peak / (1 + np.exp(np.sqrt(dist2) - radius))
        img = np.maximum(img, blob)
    if noise:
        img = np.clip(img + rng.normal(0, noise, shape), 0, 1)
    return img


def _realistic_probs(shape=(160, 160), seed=0, separated=True):
    """A 4-channel sigmoid-like output: soft nucleus discs per class, background = 1 - max."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((4,) + shape)
    per_area = shape[0] * shape[1] / 160**2
    for c, n in enumerate((4, 5, 9)):
        n = max(1, round(n * per_area))
        probs[c] = _blob_map(shape, n, rng, separated, kind="disc", min_gap=22)
        probs[c] = np.clip(probs[c] + rng.exponential(0.004, shape), 0, 1)
    probs[3] = 1 - probs[:3].max(axis=0)
    return probs.astype(np.float32)


def _sorted_rows(a):
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    return a[np.lexsort(a.T[::-1])]


# --------------------------------------------------------------------------------------------------
# names


def test_feature_names_order_by_hand():
    assert len(FEATURE_NAMES) == 81 == 3 * (7 * 2 + 6 * 2 + 1)
    assert len(set(FEATURE_NAMES)) == 81
    assert NUCLEUS_CLASSES == ("normal", "lymphocyte", "malignant")
    assert AREA_THRESHOLDS == (0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.5)
    assert BLOB_THRESHOLDS == (0.02, 0.04, 0.08, 0.16, 0.24, 0.5)
    assert FEATURE_NAMES[0] == "normal_total_activation"
    assert FEATURE_NAMES[1] == "normal_area_0.02"
    assert FEATURE_NAMES[2] == "normal_activation_0.02"
    assert FEATURE_NAMES[13] == "normal_area_0.50"
    assert FEATURE_NAMES[14] == "normal_activation_0.50"
    assert FEATURE_NAMES[15] == "normal_blob_count_0.02"
    assert FEATURE_NAMES[16] == "normal_blob_activation_0.02"
    assert FEATURE_NAMES[26] == "normal_blob_activation_0.50"
    assert FEATURE_NAMES[27] == "lymphocyte_total_activation"
    assert FEATURE_NAMES[54] == "malignant_total_activation"
    assert FEATURE_NAMES[80] == "malignant_blob_activation_0.50"
    assert "malignant_area_0.50" in FEATURE_NAMES
    assert "malignant_area_0.5" not in FEATURE_NAMES


# --------------------------------------------------------------------------------------------------
# areas and activations, by hand


def test_area_and_activation_hand_computed():
    probs = np.zeros((4, 40, 40), np.float32)
    # malignant: four isolated pixels; 0.5 is not *above* 0.5
    for (y, x), v in zip([(5, 5), (5, 30), (30, 5), (30, 30)], [0.03, 0.5, 0.6, 1.0]):
        probs[2, y, x] = v
    # lymphocyte: two pixels exactly at thresholds 0.24 and 0.32
    probs[1, 20, 20], probs[1, 10, 20] = 0.24, 0.32
    probs[3] = 0.7  # background must not matter
    f = extract_features(probs)
    v = [0.03, 0.5, 0.6, 1.0]
    expected_mal = {0.02: v, 0.04: v[1:], 0.08: v[1:], 0.16: v[1:], 0.24: v[1:], 0.32: v[1:],
                    0.5: v[2:]}
    expected_lym = {0.02: [0.24, 0.32], 0.04: [0.24, 0.32], 0.08: [0.24, 0.32],
                    0.16: [0.24, 0.32], 0.24: [0.32], 0.32: [], 0.5: []}
    for cls, expected in (("malignant", expected_mal), ("lymphocyte", expected_lym)):
        for t, above in expected.items():
            assert f[f"{cls}_area_{t:.2f}"] == len(above), (cls, t)
            # the float32 values enter the sums: float32(0.03) etc.
            assert f[f"{cls}_activation_{t:.2f}"] == pytest.approx(
                sum(float(np.float32(a)) for a in above), abs=1e-12), (cls, t)
    assert f["malignant_total_activation"] == pytest.approx(2.13, abs=1e-6)
    assert f["lymphocyte_total_activation"] == pytest.approx(0.56, abs=1e-6)
    assert (f[[n for n in FEATURE_NAMES if n.startswith("normal_")]] == 0).all()
    # the reference agrees, and dropping the background channel changes nothing
    pd.testing.assert_series_equal(f, extract_features(probs[:3]))
    ref = extract_features_reference(probs)
    np.testing.assert_allclose(f.to_numpy(), ref.to_numpy(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# blobs


def test_gaussian_blobs_counted_by_their_log_response():
    """A Gaussian of std s0 and peak A has scale-normalised LoG maximum A/2, at sigma = s0.

    For p = A exp(-r^2 / 2 s0^2), -s^2 LoG(p) at the centre is 2 A s0^2 s^2 / (s0^2 + s^2)^2, which
    peaks at s = s0 with value A / 2. Peaks A are chosen so that A / 2 = 0.03, 0.06, 0.12, 0.20,
    0.36 lies well between the thresholds: the expected counts are 5, 4, 3, 2, 1, 0.
    """
    peaks = [0.06, 0.12, 0.24, 0.40, 0.72]
    centres = [(20, 20), (20, 70), (20, 120), (70, 45), (70, 100)]
    prob_map = sum(_gaussian((96, 144), c, 2.0, a) for c, a in zip(centres, peaks))
    expected_counts = {0.02: 5, 0.04: 4, 0.08: 3, 0.16: 2, 0.24: 1, 0.5: 0}
    probs = np.zeros((3, 96, 144))
    probs[2] = prob_map
    f = extract_features(probs)
    for t, count in expected_counts.items():
        blobs = log_blobs(prob_map, t)
        assert len(blobs) == count, t
        found = {(int(y), int(x)) for y, x, _ in blobs}
        assert found == {c for c, a in zip(centres, peaks) if a / 2 > t}
        assert np.all(blobs[:, 2] == 2.0)  # detected at the blob's own scale
        np.testing.assert_array_equal(_sorted_rows(blobs), _sorted_rows(
            blob_log(prob_map, min_sigma=1, max_sigma=4, num_sigma=4, threshold=t)))
        assert f[f"malignant_blob_count_{t:.2f}"] == count
        assert f[f"malignant_blob_activation_{t:.2f}"] == pytest.approx(
            sum(a for a in peaks if a / 2 > t), abs=1e-12)
    assert f["normal_blob_count_0.02"] == 0 == f["lymphocyte_blob_activation_0.02"]


def test_log_cube_equals_scipy_gaussian_laplace():
    rng = np.random.default_rng(3)
    sigmas = np.linspace(1, 4, 4)
    for shape in [(64, 80), (20, 13), (5, 40)]:  # kernels wider than the image reflect repeatedly
        img = rng.random(shape)
        cube = F._log_cube(img[None], sigmas)[0]
        for k, s in enumerate(sigmas):
            np.testing.assert_allclose(cube[k], -ndi.gaussian_laplace(img, s) * s**2, atol=1e-13)


@pytest.mark.parametrize("kind", ["gaussian", "disc"])
@pytest.mark.parametrize("seed", [0, 1])
def test_log_blobs_equal_skimage_on_separated_blobs(kind, seed):
    rng = np.random.default_rng(seed)
    shape = (128, 128) if seed == 0 else (100, 150)
    prob_map = _blob_map(shape, 10, rng, separated=True, kind=kind, min_gap=25)
    for t in BLOB_THRESHOLDS + (0.1,):
        ours = log_blobs(prob_map, t)
        ref = blob_log(prob_map, min_sigma=1, max_sigma=4, num_sigma=4, threshold=t)
        np.testing.assert_array_equal(_sorted_rows(ours), _sorted_rows(ref), err_msg=f"t={t}")
    counts = [len(log_blobs(prob_map, t)) for t in BLOB_THRESHOLDS]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 10


def test_log_blobs_close_to_skimage_on_noisy_touching_maps():
    """Touching blobs and noise: plateaus and near-ties may break differently; measure."""
    rng = np.random.default_rng(7)
    n_ours = n_ref = n_same = 0
    for noise in (0.02, 0.05):
        prob_map = _blob_map((128, 128), 30, rng, separated=False, noise=noise, kind="disc")
        for t in BLOB_THRESHOLDS:
            ours = {tuple(r) for r in log_blobs(prob_map, t)}
            ref = {tuple(r) for r in blob_log(prob_map, 1, 4, 4, threshold=t)}
            n_ours, n_ref, n_same = n_ours + len(ours), n_ref + len(ref), n_same + len(ours & ref)
    print(f"noisy maps: {n_ours} blobs (ours) vs {n_ref} (blob_log), {n_same} identical")
    assert n_ref > 100
    assert abs(n_ours - n_ref) <= 0.01 * n_ref
    assert n_same >= 0.98 * n_ref


def test_chains_of_overlapping_blobs_pruned_in_skimage_order(monkeypatch):
    """When a blob loses one overlap and wins another, the visiting order decides; match it."""
    chains = []
    walk = F._prune_in_set_order
    monkeypatch.setattr(F, "_prune_in_set_order", lambda *a: chains.append(1) or walk(*a))
    for seed in (0, 3):
        noise = np.random.default_rng(seed).random((96, 96))
        prob_map = np.clip(3 * ndi.gaussian_filter(noise, 1.0) - 1, 0, 1)
        for t in (0.02, 0.08):
            np.testing.assert_array_equal(
                log_blobs(prob_map, t), blob_log(prob_map, 1, 4, 4, threshold=t))
    assert len(chains) >= 2  # the order-dependent path really ran


def test_log_blobs_on_real_haematoxylin(real_dir):
    """A real H&E field: the haematoxylin density (HED) as a stand-in probability map."""
    import cv2
    from skimage.color import rgb2hed

    path = real_dir / "amida13_example1.png"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[300:460, 300:460]
    hema = rgb2hed(rgb)[..., 0]
    prob_map = np.clip((hema - hema.min()) / (np.ptp(hema) + 1e-12), 0, 1)
    n_ours = n_ref = n_same = 0
    for t in (0.04, 0.08, 0.16):
        ours = {tuple(r) for r in log_blobs(prob_map, t)}
        ref = {tuple(r) for r in blob_log(prob_map, 1, 4, 4, threshold=t)}
        n_ours, n_ref, n_same = n_ours + len(ours), n_ref + len(ref), n_same + len(ours & ref)
    print(f"real haematoxylin: {n_ours} blobs (ours) vs {n_ref} (blob_log), {n_same} identical")
    assert n_ref > 0
    assert abs(n_ours - n_ref) <= 0.01 * n_ref and n_same >= 0.98 * n_ref


# --------------------------------------------------------------------------------------------------
# whole feature vector


def test_extract_features_equals_reference_on_realistic_map():
    probs = _realistic_probs(seed=0)
    ours, ref = extract_features(probs), extract_features_reference(probs)
    assert list(ours.index) == FEATURE_NAMES == list(ref.index)
    counts = [n for n in FEATURE_NAMES if "_area_" in n or "_blob_count_" in n]
    sums = [n for n in FEATURE_NAMES if n not in counts]
    pd.testing.assert_series_equal(ours[counts], ref[counts], check_exact=True)
    np.testing.assert_allclose(ours[sums].to_numpy(), ref[sums].to_numpy(), rtol=1e-12)
    # the map really has blobs in every class, fewer at higher thresholds
    for cls in NUCLEUS_CLASSES:
        blob_counts = ours[[f"{cls}_blob_count_{t:.2f}" for t in BLOB_THRESHOLDS]].to_numpy()
        assert blob_counts[0] >= 3 and np.all(np.diff(blob_counts) <= 0)
        areas = ours[[f"{cls}_area_{t:.2f}" for t in AREA_THRESHOLDS]].to_numpy()
        assert np.all(np.diff(areas) <= 0)
    # 3 or 4 channels, numpy or float64: the same 81 numbers
    pd.testing.assert_series_equal(ours, extract_features(probs[:3]))
    pd.testing.assert_series_equal(ours, extract_features(probs.astype(np.float64)))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((40, 40)), r"\(C, H, W\).*\(40, 40\)"),
        (np.zeros((2, 4, 40, 40)), r"shape \(2, 4, 40, 40\)"),
        (np.zeros((5, 40, 40)), r"3 channels.*\(5, 40, 40\)"),
        (np.zeros((40, 40, 4)), r"channels-last"),
        (np.full((4, 8, 8), np.nan), r"NaN.*\(4, 8, 8\)"),
        (np.full((4, 8, 8), 1.5), r"\[0, 1\].*1\.5"),
        (np.full((3, 8, 8), -0.01), r"\[0, 1\].*-0\.01"),
        (np.full((3, 8, 8), np.inf), r"\[0, 1\]"),
        (np.full((3, 8, 8), 200, np.uint8), r"8-bit"),
        (np.zeros((3, 0, 8)), r"empty"),
        (np.array([[["a"]]] * 3), r"numeric"),
    ],
)
def test_bad_input_is_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        extract_features(bad)


def test_tiny_excursions_outside_unit_interval_are_clipped():
    probs = np.zeros((3, 16, 16))
    probs[2, 8, 8] = 1 + 5e-7
    probs[0, 1, 1] = -5e-7
    f = extract_features(probs)
    assert f["malignant_total_activation"] == 1.0 and f["normal_total_activation"] == 0.0


def test_log_blobs_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        log_blobs(np.zeros((3, 8, 8)), 0.1)
    with pytest.raises(ValueError, match="threshold"):
        log_blobs(np.zeros((8, 8)), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        log_blobs(np.full((8, 8), np.nan), 0.1)
    assert log_blobs(np.zeros((8, 8)), 0.02).shape == (0, 3)


def test_features_frame_rows_index_and_errors():
    maps = [_realistic_probs((48, 48), seed=s) for s in range(3)]
    frame = features_frame(maps, index=["a.tif", "b.tif", "c.tif"], progress=False)
    assert frame.shape == (3, 81) and list(frame.columns) == FEATURE_NAMES
    assert list(frame.index) == ["a.tif", "b.tif", "c.tif"]
    pd.testing.assert_series_equal(frame.loc["b.tif"], extract_features(maps[1]), check_names=False)
    # a generator, no index
    frame2 = features_frame((m for m in maps), progress=False)
    np.testing.assert_array_equal(frame2.to_numpy(), frame.to_numpy())
    assert features_frame([], progress=False).shape == (0, 81)
    bad = maps[:1] + [np.full((4, 48, 48), 2.0)]
    with pytest.raises(ValueError, match=r"map 1 \(y\.tif\).*\[0, 1\]"):
        features_frame(bad, index=["x.tif", "y.tif"], progress=False)
    with pytest.raises(ValueError, match="index labels"):
        features_frame(maps, index=["x.tif"], progress=False)


# --------------------------------------------------------------------------------------------------
# LightGBM


@pytest.fixture(scope="module")
def gbt_table():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.random((400, 81)), columns=FEATURE_NAMES)
    y = (0.7 * X["malignant_activation_0.50"] + 0.3 * X["normal_area_0.02"] ** 2
         + rng.normal(0, 0.03, 400)).clip(0, 1).to_numpy()
    return X, y


def test_gbt_learns_and_beats_the_mean(gbt_table):
    from sklearn.dummy import DummyRegressor
    from sklearn.metrics import mean_squared_error

    X, y = gbt_table
    train, test = slice(0, 300), slice(300, 400)
    model = fit_gbt(X.iloc[train], y[train], seed=0)
    y_pred = predict_gbt(model, X.iloc[test])
    assert y_pred.shape == (100,) and np.all((y_pred >= 0) & (y_pred <= 1))
    mean_pred = DummyRegressor().fit(X.iloc[train], y[train]).predict(X.iloc[test])
    mse_gbt = mean_squared_error(y[test], y_pred)
    mse_mean = mean_squared_error(y[test], mean_pred)
    assert mse_gbt < 0.2 * mse_mean, (mse_gbt, mse_mean)
    # deterministic for a seed; columns matched by name; arrays accepted in model order
    again = predict_gbt(fit_gbt(X.iloc[train], y[train], seed=0), X.iloc[test])
    np.testing.assert_array_equal(y_pred, again)
    shuffled = X.iloc[test][FEATURE_NAMES[::-1]]
    np.testing.assert_array_equal(predict_gbt(model, shuffled), y_pred)
    np.testing.assert_array_equal(predict_gbt(model, X.iloc[test].to_numpy()), y_pred)
    np.testing.assert_array_equal(predict_gbt(model, X.iloc[300]), y_pred[:1])
    # importance: informative feature first, sorted, one value per feature, total gain
    imp = gbt_importance(model)
    assert list(imp.index[:2]) == ["malignant_activation_0.50", "normal_area_0.02"]
    assert len(imp) == 81 and np.all(np.diff(imp.to_numpy()) <= 0)
    raw = dict(zip(model.feature_name(), model.feature_importance(importance_type="gain")))
    assert imp["normal_area_0.02"] == raw["normal_area_0.02"]


def test_gbt_uses_the_paper_parameters(gbt_table):
    X, y = gbt_table
    model = fit_gbt(X, y, seed=3)
    assert model.params["objective"] == "regression"
    assert model.params["num_iterations"] == 600 and model.num_trees() == 600
    assert model.params["learning_rate"] == 0.01
    assert model.params["max_depth"] == 5 and model.params["num_leaves"] == 8
    assert model.params["seed"] == 3 and model.params["deterministic"] is True
    # the trees respect the depth and leaf limits
    trees = model.trees_to_dataframe()
    assert trees.groupby("tree_index")["node_depth"].max().max() <= 5 + 1
    assert (trees["left_child"].isna() & trees["right_child"].isna()).groupby(
        trees["tree_index"]).sum().max() <= 8


def test_gbt_predictions_are_clipped_and_inputs_checked(gbt_table):
    X, y = gbt_table
    model = fit_gbt(X, y * 1.5 - 0.2, n_rounds=200, learning_rate=0.1)
    raw = model.predict(X.to_numpy())
    assert raw.max() > 1 and raw.min() < 0
    clipped = predict_gbt(model, X)
    np.testing.assert_array_equal(clipped, np.clip(raw, 0, 1))
    with pytest.raises(ValueError, match="rows"):
        fit_gbt(X, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        fit_gbt(X, np.where(np.arange(len(y)) == 3, np.nan, y))
    with pytest.raises(ValueError, match="lacks"):
        predict_gbt(model, X.drop(columns=["malignant_area_0.50"]))
    with pytest.raises(ValueError, match="81 feature columns"):
        predict_gbt(model, X.to_numpy()[:, :80])


# --------------------------------------------------------------------------------------------------
# the leaf minimum chosen by cross-validation


def test_select_min_leaf_matches_scikit_learn_grid_search():
    """A second implementation: scikit-learn's GridSearchCV over LightGBM's own scikit-learn model,
    with the same folds, gives the same choice and the same cross-validated errors."""
    from lightgbm import LGBMRegressor
    from sklearn.model_selection import GridSearchCV, KFold

    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.random((60, 81)), columns=FEATURE_NAMES)
    y = 0.2 + 0.6 * (X["malignant_activation_0.50"] > 0.8) + rng.normal(0, 0.02, 60)
    chosen, errors = select_min_leaf(X, y, seed=3, n_rounds=50, learning_rate=0.1)
    reference = GridSearchCV(
        LGBMRegressor(n_estimators=50, learning_rate=0.1, max_depth=5, num_leaves=8, random_state=3,
                      deterministic=True, force_row_wise=True, n_jobs=1, verbose=-1),
        {"min_child_samples": [20, 10, 5, 2]}, cv=KFold(5, shuffle=True, random_state=3),
        scoring="neg_mean_squared_error").fit(X, y)
    assert chosen == reference.best_params_["min_child_samples"]
    np.testing.assert_allclose([errors[m] for m in (20, 10, 5, 2)],
                               -reference.cv_results_["mean_test_score"], rtol=1e-9)
    assert list(errors) == [20, 10, 5, 2]


def test_select_min_leaf_hand_made_cases():
    # 4 of 30 patches at 0.9, the rest at 0.1, told apart by one feature: a training fold holds
    # about 3 of the four, so only a leaf of 2 can isolate them, and 20 cannot split them off
    X = pd.DataFrame(np.zeros((30, 81)), columns=FEATURE_NAMES)
    X["malignant_activation_0.50"] = np.arange(30, dtype=float)
    y = np.where(np.arange(30) >= 26, 0.9, 0.1)
    chosen, errors = select_min_leaf(X, y, seed=0, n_rounds=100, learning_rate=0.1)
    assert chosen == 2 and errors[2] < errors[5] < errors[20]
    # a constant target: every leaf size fits it exactly, and the tie keeps LightGBM's default 20
    chosen, errors = select_min_leaf(X, np.full(30, 0.4), seed=0, n_rounds=20)
    assert chosen == 20 and len(set(errors.values())) == 1 and max(errors.values()) < 1e-12


def test_select_min_leaf_refuses_bad_arguments():
    X = pd.DataFrame(np.zeros((6, 81)), columns=FEATURE_NAMES)
    y = np.linspace(0, 1, 6)
    with pytest.raises(ValueError, match="folds must be an integer from 2 to the 6 rows"):
        select_min_leaf(X, y, folds=7)
    with pytest.raises(ValueError, match="grid must hold integers >= 1"):
        select_min_leaf(X, y, grid=(5, 0))
    with pytest.raises(ValueError, match="6 rows but y has 5"):
        select_min_leaf(X, y[:-1])
