"""Tests for cellulib.metrics.agreement against published values, scikit-learn, pingouin, scipy and hand counts."""
import ast
import doctest
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score, mean_squared_error

import cellulib.metrics.agreement as M
from cellulib.metrics.agreement import (
    ICC_KINDS,
    MetricWarning,
    UndefinedMetricError,
    bootstrap_ci,
    cellularity_bins,
    evaluate,
    format_ci,
    icc,
    icc_ci,
    kappa4,
    mse,
    pk_resamples,
    prediction_probability,
    spearman,
)
from cellulib.reporting.paper import PAPER

# pingouin 0.7 calls a pandas API that pandas 3.1 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.dropna")

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "rakhlin2019-cellularity.txt"

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; Table 4 gives the six ICCs.
SF_RATINGS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float
)
SF_PUBLISHED = {"ICC1": 0.17, "ICC2": 0.29, "ICC3": 0.71, "ICC1k": 0.44, "ICC2k": 0.62, "ICC3k": 0.91}
# Our kind -> pingouin 0.7 label (checked against its output order and formulas).
PINGOUIN_LABEL = {
    "ICC1": "ICC(1,1)", "ICC2": "ICC(A,1)", "ICC3": "ICC(C,1)",
    "ICC1k": "ICC(1,k)", "ICC2k": "ICC(A,k)", "ICC3k": "ICC(C,k)",
}


def _cellularity_pair(n, noise=0.12, seed=0, decimals=2):
    """Truth and a noisy prediction in [0, 1], rounded like BreastPathQ labels (so ties occur)."""
    rng = np.random.default_rng(seed)
    y_true = np.round(rng.beta(1.2, 1.2, n), decimals)
    y_pred = np.round(np.clip(y_true + rng.normal(0, noise, n), 0, 1), decimals)
    return y_true, y_pred


def _pk_brute_force(y_true, y_pred):
    """Smith et al. (1996) PK by the definition: loop over every pair of patches."""
    conc = disc = tied_pred = 0
    n = len(y_true)
    for i in range(n):
        for j in range(i + 1, n):
            dt, dp = y_true[j] - y_true[i], y_pred[j] - y_pred[i]
            if dt == 0:
                continue
            if dp == 0:
                tied_pred += 1
            elif (dt > 0) == (dp > 0):
                conc += 1
            else:
                disc += 1
    return (conc + tied_pred / 2) / (conc + disc + tied_pred)


def _pingouin_icc(x):
    long = pd.DataFrame(x).reset_index().melt(id_vars="index", var_name="rater", value_name="y")
    return pg.intraclass_corr(long, targets="index", raters="rater", ratings="y").set_index("Type")


# ---------------------------------------------------------------------------------- ICC


def test_icc_reproduces_shrout_fleiss_table4():
    for kind, published in SF_PUBLISHED.items():
        assert abs(icc(SF_RATINGS, kind) - published) < 0.005 + 1e-12, kind


@pytest.mark.parametrize("shape, seed", [((40, 2), 1), ((15, 4), 2), ((8, 3), 3)])
def test_icc_and_ci_match_pingouin(shape, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    # Target effect + rater bias + noise, so that the six forms really differ.
    x = rng.normal(0, 1, (shape[0], 1)) + rng.normal(0, 0.5, (1, shape[1]))
    x = x + rng.normal(0, 0.7, shape)
    # pingouin rounds the CI column to 2 decimals by default; compare at full precision instead.
    monkeypatch.setitem(pg.options, "round.column.CI95", None)
    ref = _pingouin_icc(x)
    for kind in ICC_KINDS:
        row = ref.loc[PINGOUIN_LABEL[kind]]
        assert icc(x, kind) == pytest.approx(row["ICC"], rel=1e-9, abs=1e-12), kind
        assert icc_ci(x, kind) == pytest.approx(tuple(row["CI95"]), rel=1e-7, abs=1e-10), kind


def test_icc_ci_matches_pingouin_rounded_default():
    x = SF_RATINGS
    ref = _pingouin_icc(x)  # default options: CI95 rounded to 2 decimals
    for kind in ICC_KINDS:
        lo, hi = icc_ci(x, kind)
        assert np.round([lo, hi], 2) == pytest.approx(list(ref.loc[PINGOUIN_LABEL[kind], "CI95"]))


def test_icc_ci_brackets_estimate_and_narrows_with_alpha():
    x = SF_RATINGS
    for kind in ICC_KINDS:
        lo95, hi95 = icc_ci(x, kind)
        lo50, hi50 = icc_ci(x, kind, alpha=0.5)
        assert lo95 < lo50 < icc(x, kind) < hi50 < hi95, kind


def test_icc_aliases_and_dataframe_input():
    df = pd.DataFrame(SF_RATINGS, columns=list("abcd"))
    assert icc(df, "ICC(2,1)") == icc(SF_RATINGS, "ICC2")
    assert icc(SF_RATINGS, "ICC(A,1)") == icc(SF_RATINGS, "icc2")
    assert icc(SF_RATINGS, "ICC(C,k)") == icc(SF_RATINGS, "ICC3k")
    assert icc(SF_RATINGS) == icc(SF_RATINGS, "ICC2")  # the book's default: ICC(2,1)


def test_icc_perfect_agreement_is_one():
    x = np.repeat(np.linspace(0, 1, 7)[:, None], 3, axis=1)
    for kind in ICC_KINDS:
        assert icc(x, kind) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "ratings, match",
    [
        (np.ones((5, 3)), "denominator is 0"),
        (np.arange(5.0), "2-D"),
        (np.ones((1, 3)), "at least 2 targets"),
        (np.ones((4, 1)), "at least 2 targets and 2 raters"),
        (np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.5]]), "row 1, column 0"),
    ],
)
def test_icc_bad_input(ratings, match):
    with pytest.raises(ValueError, match=match):
        icc(ratings)


def test_icc_unknown_kind():
    with pytest.raises(ValueError, match="unknown ICC kind 'ICC4'.*ICC1, ICC2"):
        icc(SF_RATINGS, "ICC4")
    with pytest.raises(ValueError, match="alpha"):
        icc_ci(SF_RATINGS, alpha=1.5)


# ---------------------------------------------------------------------------------- bins, kappa


def test_cellularity_bins_hand_computed_edges():
    y = [0, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 1.0]
    assert cellularity_bins(y).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cellularity_bins(pd.Series(y)).dtype == np.int64


def test_cellularity_bins_float_artifacts_at_edges():
    # 0.55 - 0.3 == 0.25000000000000006 and 0.35 - 0.1 == 0.24999999999999997: both are 0.25.
    y = [0.55 - 0.3, 0.35 - 0.1, np.nextafter(0.5, 1), np.nextafter(0.75, 1), 0.25 + 2e-9]
    assert cellularity_bins(y).tolist() == [0, 0, 1, 2, 1]
    assert cellularity_bins([-1e-12, 1 + 1e-12]).tolist() == [0, 3]


@pytest.mark.parametrize("bad", [[0.5, -0.01], [0.5, 1.01], [27.0, 50.0]])
def test_cellularity_bins_out_of_range(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*index"):
        cellularity_bins(bad)


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kappa4_matches_sklearn(weights, seed):
    y_true, y_pred = _cellularity_pair(150, seed=seed)
    ref = cohen_kappa_score(
        cellularity_bins(y_true), cellularity_bins(y_pred), labels=[0, 1, 2, 3], weights=weights
    )
    assert kappa4(y_true, y_pred, weights=weights) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("weights", ["linear", "quadratic"])
def test_kappa4_uses_all_four_bins_as_categories(weights):
    # Bin 1 is empty: the 0 -> 2 disagreement must weigh 2 (linear), not 1.
    y_true = [0.1, 0.1, 0.6, 0.6, 0.9, 0.9, 0.1]
    y_pred = [0.1, 0.6, 0.6, 0.9, 0.9, 0.1, 0.1]
    ref = cohen_kappa_score(
        cellularity_bins(y_true), cellularity_bins(y_pred), labels=[0, 1, 2, 3], weights=weights
    )
    assert kappa4(y_true, y_pred, weights=weights) == pytest.approx(ref, abs=1e-12)


def test_kappa4_hand_computed():
    # Bins (0, 1, 2, 3) vs (0, 1, 3, 3): p_o = 3/4, p_e = 1/4 -> kappa = (3/4 - 1/4) / (3/4).
    assert kappa4([0.1, 0.3, 0.6, 0.9], [0.2, 0.3, 0.9, 0.9]) == pytest.approx(2 / 3)
    # Truth in one bin but predictions spread: defined, and sklearn agrees.
    y_true, y_pred = [0.1, 0.2, 0.1, 0.05], [0.1, 0.6, 0.2, 0.9]
    ref = cohen_kappa_score(cellularity_bins(y_true), cellularity_bins(y_pred), labels=range(4))
    assert kappa4(y_true, y_pred) == pytest.approx(ref)


def test_kappa4_undefined_when_one_shared_bin():
    with pytest.raises(UndefinedMetricError, match="all fall into bin 2"):
        kappa4([0.6, 0.7, 0.55], [0.6, 0.74, 0.7])
    with pytest.raises(ValueError, match="weights"):
        kappa4([0.1, 0.9], [0.1, 0.9], weights="cubic")


# ---------------------------------------------------------------------------------- MSE


def test_mse_matches_sklearn_and_accepts_lists_and_series():
    y_true, y_pred = _cellularity_pair(300, seed=4)
    ref = mean_squared_error(y_true, y_pred)
    assert mse(y_true, y_pred) == pytest.approx(ref, rel=1e-12)
    assert mse(list(y_true), pd.Series(y_pred, index=np.arange(300)[::-1])) == pytest.approx(ref)
    assert mse([0.2], [0.5]) == pytest.approx(0.09)


# ---------------------------------------------------------------------------------- PK


def test_pk_hand_computed():
    # Pairs: (1,2) discordant; (1,3) (1,4) (2,3) (2,4) concordant; (3,4) tied in truth -> left out.
    assert prediction_probability([0.1, 0.2, 0.3, 0.3], [0.2, 0.1, 0.5, 0.5]) == pytest.approx(0.8)
    # P = 3 (1,4) (2,4) (3,4); Q = 2 (1,3) (2,3); T = 1 (1,2) -> (3 + 1/2) / 6.
    pk = prediction_probability([0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.1, 0.5])
    assert pk == pytest.approx(7 / 12)


def test_pk_limits():
    y = np.linspace(0, 1, 20)
    assert prediction_probability(y, y**2) == 1.0
    assert prediction_probability(y, 1 - y) == 0.0
    assert prediction_probability(y, np.full(20, 0.3)) == 0.5


@pytest.mark.parametrize("n, seed, decimals", [(60, 0, 1), (150, 1, 2), (97, 2, 6)])
def test_pk_matches_brute_force_and_somers_d(n, seed, decimals):
    y_true, y_pred = _cellularity_pair(n, noise=0.2, seed=seed, decimals=decimals)
    pk = prediction_probability(y_true, y_pred)
    assert pk == pytest.approx(_pk_brute_force(y_true, y_pred), abs=1e-12)
    # PK = (1 + Somers' D(pred | truth)) / 2 (Smith et al. 1996).
    assert pk == pytest.approx((1 + stats.somersd(y_true, y_pred).statistic) / 2, abs=1e-12)


def test_pk_is_fast_for_2000_patches():
    y_true, y_pred = _cellularity_pair(2000, seed=5)
    prediction_probability(y_true, y_pred)  # warm-up
    start = time.perf_counter()
    pk = prediction_probability(y_true, y_pred)
    assert time.perf_counter() - start < 0.5
    assert pk == pytest.approx((1 + stats.somersd(y_true, y_pred).statistic) / 2, abs=1e-12)


def test_pk_undefined_when_truth_all_tied():
    with pytest.raises(UndefinedMetricError, match="all 3 truth value"):
        prediction_probability([0.4, 0.4, 0.4], [0.1, 0.5, 0.9])
    with pytest.raises(UndefinedMetricError):
        prediction_probability([0.4], [0.1])


# ---------------------------------------------------------------------------------- bootstrap


def _scipy_percentile_ci(metric, y_true, y_pred, n_boot, seed):
    res = stats.bootstrap(
        (y_true, y_pred), metric, paired=True, vectorized=False, n_resamples=n_boot,
        method="percentile", rng=np.random.default_rng(seed),
    )
    return res.confidence_interval.low, res.confidence_interval.high


@pytest.mark.parametrize("metric", [mse, kappa4, prediction_probability])
def test_bootstrap_matches_scipy_percentile(metric):
    # Same seeded draw of resample indices as scipy.stats.bootstrap, so the limits agree exactly.
    y_true, y_pred = _cellularity_pair(120, seed=6)
    ours = bootstrap_ci(metric, y_true, y_pred, n_boot=400, seed=3)
    assert ours == pytest.approx(_scipy_percentile_ci(metric, y_true, y_pred, 400, 3), abs=1e-12)


@pytest.mark.parametrize("metric", [mse, kappa4])
def test_bootstrap_vectorised_paths_equal_generic_loop(metric):
    y_true, y_pred = _cellularity_pair(200, seed=7)
    fast = bootstrap_ci(metric, y_true, y_pred, n_boot=300, seed=11)
    slow = bootstrap_ci(lambda a, b: metric(a, b), y_true, y_pred, n_boot=300, seed=11)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_deterministic_contains_estimate_and_narrows():
    y_true, y_pred = _cellularity_pair(2000, seed=8)
    small = slice(0, 100)
    ci_a = bootstrap_ci(mse, y_true[small], y_pred[small], n_boot=500, seed=1)
    assert ci_a == bootstrap_ci(mse, y_true[small], y_pred[small], n_boot=500, seed=1)
    assert ci_a != bootstrap_ci(mse, y_true[small], y_pred[small], n_boot=500, seed=2)
    assert ci_a[0] < mse(y_true[small], y_pred[small]) < ci_a[1]
    ci_big = bootstrap_ci(mse, y_true, y_pred, n_boot=500, seed=1)
    assert ci_big[0] < mse(y_true, y_pred) < ci_big[1]
    # Width scales like 1 / sqrt(n): 20x the patches, about 4.5x narrower.
    assert (ci_big[1] - ci_big[0]) < 0.5 * (ci_a[1] - ci_a[0])
    assert bootstrap_ci(mse, y_true, y_pred, n_boot=500, alpha=0.5) != ci_big
    lo50, hi50 = bootstrap_ci(mse, y_true, y_pred, n_boot=500, alpha=0.5, seed=1)
    assert ci_big[0] < lo50 < hi50 < ci_big[1]


def test_bootstrap_skips_undefined_resamples_with_warning():
    # Truth all in bin 0: a resample without the one bin-2 prediction has kappa undefined.
    y_true = np.array([0.1, 0.15, 0.2, 0.1, 0.05])
    y_pred = np.array([0.1, 0.2, 0.6, 0.3, 0.1])
    n_boot, seed = 300, 4
    with pytest.warns(MetricWarning, match=r"undefined on \d+ of 300 resamples"):
        lo, hi = bootstrap_ci(kappa4, y_true, y_pred, n_boot=n_boot, seed=seed)
    # Independent recomputation with scikit-learn on the same documented draw.
    idx = np.random.default_rng(seed).integers(0, 5, (n_boot, 5))
    values = []
    for row in idx:
        bt, bp = cellularity_bins(y_true[row]), cellularity_bins(y_pred[row])
        if len(set(bt) | set(bp)) > 1:
            values.append(cohen_kappa_score(bt, bp, labels=[0, 1, 2, 3]))
    assert 0 < len(values) < n_boot
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    # The generic loop skips the same resamples.
    with pytest.warns(MetricWarning):
        generic = bootstrap_ci(lambda a, b: kappa4(a, b), y_true, y_pred, n_boot=n_boot, seed=seed)
    assert generic == pytest.approx((lo, hi), abs=1e-12)


def test_bootstrap_all_undefined_raises():
    with pytest.raises(UndefinedMetricError, match="undefined on all 50 resamples"):
        bootstrap_ci(prediction_probability, [0.3, 0.3, 0.3], [0.1, 0.2, 0.3], n_boot=50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 0}, "n_boot must be a positive integer"),
        ({"n_boot": 10.5}, "n_boot"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\)"),
        ({"metric": "mse"}, "metric must be callable"),
    ],
)
def test_bootstrap_bad_arguments(kwargs, match):
    args = {"metric": mse, "y_true": [0.1, 0.5], "y_pred": [0.2, 0.4], **kwargs}
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**args)


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("func", [mse, kappa4, prediction_probability])
def test_bad_input_messages(func):
    name = func.__name__
    with pytest.raises(ValueError, match=rf"{name}: y_pred has 1 non-finite value.*NaN at index 1"):
        func([0.1, 0.2, 0.3], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match=rf"{name}: y_true has 1 non-finite.*infinite at index 0"):
        func([np.inf, 0.2, 0.3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=rf"{name}: y_true has 3 values but y_pred has 2"):
        func([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match=rf"{name}: y_true is empty"):
        func([], [])
    with pytest.raises(ValueError, match=rf"{name}: y_true must be 1-D.*\(2, 2\)"):
        func([[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=rf"{name}: y_pred must be numeric"):
        func([0.1, 0.2], ["a", "b"])


def test_kappa_and_evaluate_reject_out_of_range():
    with pytest.raises(ValueError, match=r"kappa4: y_pred has 1 value\(s\) outside \[0, 1\]"):
        kappa4([0.1, 0.2], [0.1, 45.0])
    with pytest.raises(ValueError, match=r"evaluate: y_true .* outside \[0, 1\]"):
        evaluate([10.0, 20.0, 30.0], [0.1, 0.2, 0.3], n_boot=10)


def test_column_vectors_are_accepted():
    y_true, y_pred = _cellularity_pair(30, seed=9)
    assert mse(y_true[:, None], y_pred[None, :]) == pytest.approx(mse(y_true, y_pred))


# ---------------------------------------------------------------------------------- evaluate


def test_evaluate_against_independent_references(monkeypatch):
    y_true, y_pred = _cellularity_pair(185, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = evaluate(y_true, y_pred, n_boot=300, seed=2)
    assert table.index.tolist() == ["MSE", "kappa", "ICC(2,1)", "PK"]
    assert table.columns.tolist() == ["value", "ci_low", "ci_high", "ci_method", "n"]
    assert (table["n"] == 185).all()
    assert table.loc["MSE", "value"] == pytest.approx(mean_squared_error(y_true, y_pred))
    bt, bp = cellularity_bins(y_true), cellularity_bins(y_pred)
    assert table.loc["kappa", "value"] == pytest.approx(cohen_kappa_score(bt, bp, labels=range(4)))
    assert table.loc["PK", "value"] == pytest.approx(
        (1 + stats.somersd(y_true, y_pred).statistic) / 2
    )
    monkeypatch.setitem(pg.options, "round.column.CI95", None)
    ref = _pingouin_icc(np.column_stack([y_true, y_pred])).loc["ICC(A,1)"]
    assert table.loc["ICC(2,1)", "value"] == pytest.approx(ref["ICC"])
    assert table.loc["ICC(2,1)", ["ci_low", "ci_high"]].tolist() == pytest.approx(list(ref["CI95"]))
    assert table.loc["ICC(2,1)", "ci_method"] == "analytic"
    assert table.loc["PK", ["ci_low", "ci_high"]].tolist() == pytest.approx(
        list(_scipy_percentile_ci(prediction_probability, y_true, y_pred, 300, 2))
    )
    assert (table["ci_low"] < table["value"]).all() and (table["value"] < table["ci_high"]).all()


def test_evaluate_reports_undefined_kappa_as_nan():
    y = np.array([0.1, 0.2, 0.15, 0.05])
    with pytest.warns(MetricWarning, match="kappa is NaN"):
        table = evaluate(y, y * 0.9, n_boot=20)
    assert np.isnan(table.loc["kappa", "value"])
    assert table.loc["PK", "value"] == 1.0


# ---------------------------------------------------------------------------------- PAPER


def test_paper_numbers_match_spec():
    by = PAPER.set_index(["table", "model", "init", "metric"])["value"]
    assert by[("Table 2", "GBT", "random", "MSE")] == 0.023
    assert by[("Table 2", "Xception (C)", "imagenet", "MSE")] == 0.010
    assert by[("Table 3", "Xception (C)", "imagenet", "kappa")] == 0.689
    assert by[("Table 3", "ResNet50 (R)", "imagenet", "ICC")] == 0.867
    assert by[("Table 1", "FPN decoder", "imagenet", "Jaccard")] == 0.53
    pk = PAPER[PAPER["metric"] == "PK"]["value"].tolist()
    assert pk == [0.941, 0.927]
    assert len(PAPER) == 4 + 12 + 12 + 3 + 2
    assert PAPER["value"].notna().sum() == len(PAPER) - 1  # only Peikari's kappa range has none


def test_paper_transcription_matches_paper_text():
    if not PAPER_TEXT.is_file():
        pytest.skip(f"paper text not found at {PAPER_TEXT}")
    lines = PAPER_TEXT.read_text(encoding="utf-8").splitlines()
    printed = {"ResNet34 (SR)": "Resnet34 (SR)", "Peikari et al.": "Peikari et al. [29]",
               "Akbar et al.": "Akbar et al. [3]"}
    for row in PAPER[PAPER["source"].str.startswith("Rakhlin")].itertuples():
        if row.table == "Table 1":
            line = next(s for s in lines if s.startswith("Random " if row.init == "random"
                                                         else "ImageNet 0"))
            col = 1 if row.model == "U-Net decoder" else 2
            assert line.split()[col] == row.text
            continue
        name = printed.get(row.model, row.model)
        hits = [s for s in lines if s.startswith(name + " ")]
        line = hits[0] if row.table == "Table 2" else hits[-1]
        cell_re = r"\d\.\d+-\d\.\d+|\d\.\d+(?: \[\d\.\d+-\d\.\d+\])?|—"
        cells = re.findall(cell_re, line[len(name):])
        if row.table == "Table 2":
            cell = cells[0 if row.init == "random" else 1]
        else:
            cell = cells[0 if row.metric == "kappa" else 1]
        assert cell == row.text, (row.model, row.metric, row.init)
        nums = [float(v) for v in re.findall(r"\d\.\d+", cell)]
        parsed = [v for v in (row.value, row.ci_low, row.ci_high) if not np.isnan(v)]
        assert parsed == nums


def test_format_ci():
    assert format_ci(0.0226, 0.0189, 0.0262) == "0.023 [0.019-0.026]"
    assert format_ci(0.5, np.nan, np.nan, digits=2) == "0.50"
    assert format_ci(np.nan, 0.1, 0.2) == "n/a"
    # the mean predictor's kappa: resamples at +-1e-17 print as zero, without a sign
    assert format_ci(-0.0, -2e-17, 3e-17) == "0.000 [0.000-0.000]"
    assert format_ci(-0.0004, -0.0006, 0.2) == "0.000 [-0.001 to 0.200]"
    assert format_ci(-0.1, -0.2, -0.0004) == "-0.100 [-0.200 to 0.000]"


# ---------------------------------------------------------------------------------- module


def test_module_does_not_import_torch():
    tree = ast.parse(Path(M.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in {"torch", "fastai", "torchvision"}}


def test_docstring_examples():
    result = doctest.testmod(M, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# the resamples computed at once (PK from pair counts between clusters, Spearman on padded rows)


def _tied_clusters(seed: int):
    """Windows of uneven patients, with ties in the truth and in the prediction."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, 12)
    groups = np.repeat(np.arange(12), sizes)
    t = rng.integers(0, 6, groups.size) / 5  # few distinct values: many ties in the truth
    p = np.round(t + rng.normal(0, 0.3, groups.size), 1)  # rounded: ties in the prediction
    return t, p, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pk_resamples_equal_prediction_probability_of_each_pooled_resample(seed):
    t, p, groups = _tied_clusters(seed)
    members = [np.flatnonzero(groups == g) for g in range(12)]
    picks = np.random.default_rng(seed + 10).integers(0, 12, (300, 12))
    fast = pk_resamples(t, p, members, picks)
    for row, value in zip(picks, fast):
        rows = np.concatenate([members[g] for g in row])
        try:
            expected = prediction_probability(t[rows], p[rows])
        except UndefinedMetricError:
            assert np.isnan(value)
            continue
        assert value == expected  # the same whole-number counts: equal to the last bit


def test_pk_resamples_by_hand():
    # two patients: A = (truth 0.1, pred 0.2), (0.3, 0.1); B = (0.5, 0.9)
    t, p = np.array([0.1, 0.3, 0.5]), np.array([0.2, 0.1, 0.9])
    members = [np.array([0, 1]), np.array([2])]
    # A alone: one pair, discordant -> 0; A twice: pairs within and across copies, 4 untied, all
    # discordant -> 0; A and B: 3 pairs, 2 concordant -> 2/3; B twice: every pair tied -> NaN
    got = pk_resamples(t, p, members, np.array([[0, 0], [0, 1], [1, 1]]))
    assert got[0] == 0.0 and got[1] == pytest.approx(2 / 3) and np.isnan(got[2])


def test_bootstrap_pk_and_spearman_fast_paths_equal_the_generic_loop():
    t, p, groups = _tied_clusters(3)
    for metric in (prediction_probability, spearman):
        for g in (groups, None):
            fast = bootstrap_ci(metric, t, p, n_boot=400, seed=5, groups=g)
            slow = bootstrap_ci(lambda a, b, m=metric: m(a, b), t, p, n_boot=400, seed=5, groups=g)
            assert fast == pytest.approx(slow, abs=1e-12), (metric.__name__, g is None)
    # resamples where a side is constant are skipped by both, with the warning
    one = np.array([0.2, 0.2, 0.2, 0.2, 0.9])
    g = np.array([0, 0, 1, 1, 2])
    with pytest.warns(MetricWarning):
        fast = bootstrap_ci(spearman, one, one[::-1].copy(), n_boot=200, seed=1, groups=g)
    with pytest.warns(MetricWarning):
        slow = bootstrap_ci(lambda a, b: spearman(a, b), one, one[::-1].copy(), n_boot=200, seed=1, groups=g)
    assert fast == pytest.approx(slow, abs=1e-12)
