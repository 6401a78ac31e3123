"""Agreement metrics for cellularity (MSE, 4-bin Cohen's kappa, ICC, PK, bootstrap CIs); nucleus
detection scores are :mod:`cellulib.metrics.detection`.

Implements paper section 3.5 and SPEC section 5 with numpy, scipy and pandas only (no torch), so
the book can evaluate predictions read from a CSV without loading a model. The paper's published
numbers are :data:`cellulib.reporting.paper.PAPER`.

Degenerate inputs follow one rule everywhere: a statistic that is mathematically undefined for the
given data (kappa when both raters use one and the same bin, PK when every truth value is tied, an
ICC whose denominator is zero) raises :class:`UndefinedMetricError`, a ``ValueError`` subclass with a
message that says why. :func:`bootstrap_ci` skips resamples that raise it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "ICC_KINDS",
    "PK_CHANCE",
    "MetricWarning",
    "UndefinedMetricError",
    "bootstrap_ci",
    "group_rows",
    "cellularity_bins",
    "evaluate",
    "format_ci",
    "icc",
    "icc_ci",
    "kappa4",
    "mse",
    "pk_resamples",
    "prediction_probability",
    "spearman",
]

#: PK of a prediction that carries no information about the truth (every pair a coin toss, ties
#: counted one half): the chance level a ranking has to beat.
PK_CHANCE = 0.5

#: The six Shrout & Fleiss (1979) forms accepted by :func:`icc` (aliases in ``_ICC_ALIASES``).
ICC_KINDS = ("ICC1", "ICC2", "ICC3", "ICC1k", "ICC2k", "ICC3k")

# Shrout & Fleiss names, their (model, k) notation and the McGraw & Wong labels pingouin prints.
_ICC_ALIASES = {
    **{k.lower(): k for k in ICC_KINDS},
    "icc(1,1)": "ICC1", "icc(2,1)": "ICC2", "icc(3,1)": "ICC3",
    "icc(1,k)": "ICC1k", "icc(2,k)": "ICC2k", "icc(3,k)": "ICC3k",
    "icc(a,1)": "ICC2", "icc(c,1)": "ICC3", "icc(a,k)": "ICC2k", "icc(c,k)": "ICC3k",
}

_N_BINS = 4
# Decimals kept before comparing with the bin edges: 0.25 read from a CSV is 0.25000000000000001
# or 0.24999999999999998 depending on the arithmetic that produced it; both must fall in bin 0.
_BIN_DECIMALS = 9
_BIN_TOL = 10.0 ** -_BIN_DECIMALS


class UndefinedMetricError(ValueError):
    """The metric is mathematically undefined for these data (e.g. kappa with one shared class)."""


class MetricWarning(UserWarning):
    """A metric was undefined on part of the data: resamples skipped, or a NaN reported."""


# --------------------------------------------------------------------------------------------
# input validation


def _as_1d(x, name: str, func: str) -> np.ndarray:
    """Return ``x`` as a finite 1-D float array or raise a ValueError naming ``func`` and ``name``."""
    if isinstance(x, (pd.Series, pd.Index)):
        x = x.to_numpy()
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{func}: {name} must be numeric, got {type(x).__name__} ({err})") from None
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ValueError(f"{func}: {name} must be 1-D (one value per patch), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{func}: {name} is empty")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        what = "NaN" if np.isnan(arr[idx[0]]) else "infinite"
        raise ValueError(
            f"{func}: {name} has {idx.size} non-finite value(s) (first: {what} at index {idx[0]}); "
            "drop or impute those patches first"
        )
    return arr


def _pair(y_true, y_pred, func: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (truth, prediction) pair: both finite 1-D and of the same length."""
    t = _as_1d(y_true, "y_true", func)
    p = _as_1d(y_pred, "y_pred", func)
    if t.size != p.size:
        raise ValueError(
            f"{func}: y_true has {t.size} values but y_pred has {p.size}; "
            "they must hold one value per patch, in the same order"
        )
    return t, p


def _bins(arr: np.ndarray, name: str, func: str) -> np.ndarray:
    """Bin an already validated 1-D array; raises for values outside [0, 1]."""
    out = (arr < -_BIN_TOL) | (arr > 1 + _BIN_TOL)
    if out.any():
        idx = np.flatnonzero(out)
        raise ValueError(
            f"{func}: {name} has {idx.size} value(s) outside [0, 1] (first: {arr[idx[0]]!r} at "
            f"index {idx[0]}); cellularity is a fraction, not a percentage"
        )
    r = np.round(np.clip(arr, 0.0, 1.0), _BIN_DECIMALS)
    return (r > 0.25).astype(np.int64) + (r > 0.5) + (r > 0.75)


# --------------------------------------------------------------------------------------------
# point metrics


def mse(y_true, y_pred) -> float:
    """Mean squared error between true and predicted cellularity.

    The main metric of paper section 3.5 (Table 2). Used in chapters 3-5 (Table 2) and in every
    training chapter for the validation curve.

    Parameters
    ----------
    y_true, y_pred : array-like of float, shape (n,)
        Pathologist and predicted cellularity, one value per patch (lists, arrays or Series).

    Returns
    -------
    float
        ``mean((y_true - y_pred) ** 2)``.

    Examples
    --------
    >>> round(mse([0.1, 0.5, 0.9], [0.2, 0.5, 0.7]), 6)
    0.016667
    """
    t, p = _pair(y_true, y_pred, "mse")
    return float(np.mean((t - p) ** 2))


def cellularity_bins(y) -> np.ndarray:
    """Map cellularity in [0, 1] to the four clinical bins 0..3.

    Paper section 3.5 (after Peikari et al.): 0-25 %, 26-50 %, 51-75 %, 76-100 %, here as
    [0, 0.25] -> 0, (0.25, 0.5] -> 1, (0.5, 0.75] -> 2, (0.75, 1] -> 3 (SPEC 5). Values are rounded
    to 1e-9 first so that a 0.25 produced by float arithmetic stays in bin 0, and values within 1e-9
    outside [0, 1] are clipped. Used in chapter 4 through :func:`cellulib.reporting.plots.residuals_by_bin`
    (kappa in Table 3).

    Parameters
    ----------
    y : array-like of float, shape (n,)
        Cellularity fractions (not percentages).

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        Bin index per value.

    Raises
    ------
    ValueError
        If a value is NaN, infinite or outside [0, 1] by more than 1e-9.

    Examples
    --------
    >>> cellularity_bins([0, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 1.0]).tolist()
    [0, 0, 1, 1, 2, 2, 3, 3]
    """
    return _bins(_as_1d(y, "y", "cellularity_bins"), "y", "cellularity_bins")


def _weight_matrix(weights) -> np.ndarray:
    """Disagreement weights for the 4 ordinal bins; the scale cancels in the kappa ratio."""
    d = np.abs(np.subtract.outer(np.arange(_N_BINS), np.arange(_N_BINS))).astype(float)
    if weights is None:
        return (d > 0).astype(float)
    if weights == "linear":
        return d
    if weights == "quadratic":
        return d**2
    raise ValueError(f"kappa4: weights must be None, 'linear' or 'quadratic', got {weights!r}")


def _kappa_from_counts(counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Kappa for a stack of 4x4 confusion counts, shape (..., 4, 4); NaN where undefined."""
    n = counts.sum(axis=(-2, -1), keepdims=True)
    observed = counts / n
    expected = observed.sum(axis=-1, keepdims=True) * observed.sum(axis=-2, keepdims=True)
    num = (w * observed).sum(axis=(-2, -1))
    den = (w * expected).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        # Expected disagreement 0 means both raters put every patch in one and the same bin.
        return np.where(den > 0, 1.0 - num / np.where(den > 0, den, 1.0), np.nan)


def kappa4(y_true, y_pred, weights=None) -> float:
    """Cohen's kappa between true and predicted cellularity after binning into 4 classes.

    Paper section 3.5 and Table 3 ("Kappa (4 class binning)"); bins from :func:`cellularity_bins`.
    All four bins are always used as categories, so the linear and quadratic weights are the
    distances between bin indices even when a bin is empty (scikit-learn's ``cohen_kappa_score``
    agrees only when given ``labels=[0, 1, 2, 3]``). Used in chapters 3, 4 and 5 through
    :func:`cellulib.reporting.tables.results_table` (Table 3).

    Parameters
    ----------
    y_true, y_pred : array-like of float, shape (n,)
        Cellularity fractions in [0, 1].
    weights : {None, "linear", "quadratic"}
        None (default, as in the paper) counts every disagreement equally.

    Returns
    -------
    float
        ``1 - sum(w * observed) / sum(w * expected)``, i.e. ``(p_o - p_e) / (1 - p_e)`` unweighted.

    Raises
    ------
    UndefinedMetricError
        If both truth and prediction fall into one and the same bin (expected disagreement 0).

    Examples
    --------
    Bins (0, 1, 2, 3) vs. (0, 1, 3, 3): p_o = 3/4, p_e = 1/4, kappa = 2/3.

    >>> round(kappa4([0.1, 0.3, 0.6, 0.9], [0.2, 0.3, 0.9, 0.9]), 4)
    0.6667
    """
    w = _weight_matrix(weights)
    t, p = _pair(y_true, y_pred, "kappa4")
    bt, bp = _bins(t, "y_true", "kappa4"), _bins(p, "y_pred", "kappa4")
    counts = np.bincount(bt * _N_BINS + bp, minlength=_N_BINS**2).reshape(_N_BINS, _N_BINS)
    kappa = float(_kappa_from_counts(counts, w))
    if math.isnan(kappa):
        raise UndefinedMetricError(
            f"kappa4: undefined because truth and prediction all fall into bin {bt[0]} "
            "(expected disagreement is 0)"
        )
    return kappa


def _canonical_kind(kind: str, func: str) -> str:
    key = str(kind).replace(" ", "").lower()
    if key not in _ICC_ALIASES:
        raise ValueError(
            f"{func}: unknown ICC kind {kind!r}; use one of {', '.join(ICC_KINDS)} "
            "(or ICC(2,1), ICC(A,1), ICC(C,k), ...)"
        )
    return _ICC_ALIASES[key]


def _ratings(ratings, func: str) -> np.ndarray:
    if isinstance(ratings, pd.DataFrame):
        ratings = ratings.to_numpy()
    try:
        x = np.asarray(ratings, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{func}: ratings must be a numeric (n_targets, n_raters) array ({err})"
                         ) from None
    if x.ndim != 2:
        raise ValueError(f"{func}: ratings must be 2-D (n_targets, n_raters), got shape {x.shape}")
    n, k = x.shape
    if n < 2 or k < 2:
        raise ValueError(
            f"{func}: ratings need at least 2 targets and 2 raters, got shape {x.shape} "
            "(rows are patches, columns are raters)"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"{func}: ratings has {int(bad.sum())} non-finite value(s) (first at row {r}, "
            f"column {c}); ICC needs complete, balanced ratings"
        )
    return x


def _mean_squares(x: np.ndarray) -> dict:
    """Two-way ANOVA mean squares of Shrout & Fleiss (1979), Table 1 (one rating per cell)."""
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    # Rounding can leave a perfectly additive table with a -1e-30 residual; it is exactly 0.
    ss_err = max(ss_err, 0.0)
    return {
        "n": n,
        "k": k,
        "bms": ss_rows / (n - 1),  # between targets
        "jms": ss_cols / (k - 1),  # between judges (raters)
        "ems": ss_err / ((n - 1) * (k - 1)),  # residual
        "wms": (ss_cols + ss_err) / (n * (k - 1)),  # within targets (one-way model)
    }


def _icc_from_ms(ms: dict, kind: str) -> float:
    n, k = ms["n"], ms["k"]
    bms, jms, ems, wms = ms["bms"], ms["jms"], ms["ems"], ms["wms"]
    num, den = {
        "ICC1": (bms - wms, bms + (k - 1) * wms),
        "ICC2": (bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
        "ICC3": (bms - ems, bms + (k - 1) * ems),
        "ICC1k": (bms - wms, bms),
        "ICC2k": (bms - ems, bms + (jms - ems) / n),
        "ICC3k": (bms - ems, bms),
    }[kind]
    if den == 0:
        raise UndefinedMetricError(
            f"icc: {kind} is undefined because its denominator is 0 (the ratings do not vary "
            "between targets nor show any error)"
        )
    return float(num / den)


def icc(ratings, kind: str = "ICC2") -> float:
    """Intraclass correlation of an (n_targets, n_raters) rating matrix, Shrout & Fleiss (1979).

    Paper section 3.5 and Table 3; SPEC 5 asks for all six forms from the two-way ANOVA mean
    squares. ICC1: one-way random; ICC2: two-way random, absolute agreement (McGraw & Wong's
    ICC(A,1)); ICC3: two-way mixed, consistency (ICC(C,1)); the ``k`` forms are the reliability of
    the mean of the k raters. The book reports ICC2 = ICC(2,1) for model vs. pathologist, where the
    two columns are the truth and the prediction. Used in chapters 3, 4 and 5 through
    :func:`cellulib.reporting.tables.results_table` (Table 3).

    Parameters
    ----------
    ratings : array-like, shape (n_targets, n_raters)
        One row per patch, one column per rater; complete (no NaN).
    kind : str
        One of ``ICC1 ICC2 ICC3 ICC1k ICC2k ICC3k``; ``ICC(2,1)``, ``ICC(A,1)``, ``ICC(C,k)``, ...
        are accepted as aliases.

    Returns
    -------
    float

    References
    ----------
    Shrout, P. E., & Fleiss, J. L. (1979). Intraclass correlations: uses in assessing rater
    reliability. Psychological Bulletin, 86(2), 420-428.

    Examples
    --------
    Shrout & Fleiss (1979), Table 2 data (6 targets, 4 judges); Table 4 gives .29 for ICC(2,1):

    >>> x = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    >>> round(icc(x, "ICC2"), 2), round(icc(x, "ICC3k"), 2)
    (0.29, 0.91)
    """
    kind = _canonical_kind(kind, "icc")
    return _icc_from_ms(_mean_squares(_ratings(ratings, "icc")), kind)


def icc_ci(ratings, kind: str = "ICC2", alpha: float = 0.05) -> tuple[float, float]:
    """Analytic F-based confidence interval of an ICC (Shrout & Fleiss 1979; McGraw & Wong 1996).

    The same formulas as pingouin's ``intraclass_corr`` and R's ``psych::ICC``: exact F intervals
    for ICC1/ICC3 and their k forms, and the Satterthwaite approximation (degrees of freedom ``v``)
    for ICC2, whose k form is the Spearman-Brown transform of the ICC2 limits. Paper Table 3
    brackets. Used in chapters 3, 4 and 5 through :func:`cellulib.reporting.tables.results_table` (Table 3).

    Parameters
    ----------
    ratings : array-like, shape (n_targets, n_raters)
    kind : str
        As in :func:`icc`.
    alpha : float
        1 - confidence level (0.05 gives the 95 % interval).

    Returns
    -------
    (float, float)
        Lower and upper limits.

    References
    ----------
    McGraw, K. O., & Wong, S. P. (1996). Forming inferences about some intraclass correlation
    coefficients. Psychological Methods, 1(1), 30-46.

    Examples
    --------
    >>> x = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    >>> [round(v, 2) for v in icc_ci(x, "ICC3")]
    [0.34, 0.95]
    """
    kind = _canonical_kind(kind, "icc_ci")
    if not 0 < alpha < 1:
        raise ValueError(f"icc_ci: alpha must be in (0, 1), got {alpha!r}")
    ms = _mean_squares(_ratings(ratings, "icc_ci"))
    n, k = ms["n"], ms["k"]
    bms, jms, ems, wms = ms["bms"], ms["jms"], ms["ems"], ms["wms"]
    q = 1 - alpha / 2
    df_b = n - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind in ("ICC1", "ICC1k", "ICC3", "ICC3k"):
            # F = BMS / WMS (one-way) or BMS / EMS (two-way) with its exact F distribution.
            within, df_w = (wms, n * (k - 1)) if kind.startswith("ICC1") else (ems, df_b * (k - 1))
            f_obs = bms / within
            f_lo = f_obs / stats.f.ppf(q, df_b, df_w)
            f_hi = f_obs * stats.f.ppf(q, df_w, df_b)
            if kind.endswith("k"):
                return float(1 - 1 / f_lo), float(1 - 1 / f_hi)
            return float((f_lo - 1) / (f_lo + k - 1)), float((f_hi - 1) / (f_hi + k - 1))
        rho = _icc_from_ms(ms, "ICC2")
        fj = jms / ems
        df_e = df_b * (k - 1)
        vn = df_e * (k * rho * fj + n * (1 + (k - 1) * rho) - k * rho) ** 2
        vd = df_b * k**2 * rho**2 * fj**2 + (n * (1 + (k - 1) * rho) - k * rho) ** 2
        v = vn / vd
        f_u = stats.f.ppf(q, df_b, v)
        f_l = stats.f.ppf(q, v, df_b)
        lo = n * (bms - f_u * ems) / (f_u * (k * jms + (k * n - k - n) * ems) + n * bms)
        hi = n * (f_l * bms - ems) / (k * jms + (k * n - k - n) * ems + n * f_l * bms)
    if kind == "ICC2k":
        lo, hi = lo * k / (1 + lo * (k - 1)), hi * k / (1 + hi * (k - 1))
    return float(lo), float(hi)


def _pairs_tied(codes: np.ndarray) -> int:
    """Number of unordered pairs sharing a value, sum over groups of C(size, 2)."""
    counts = np.unique(codes, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _strict_inversions(seq: np.ndarray) -> int:
    """Count pairs i < j with seq[i] > seq[j] for non-negative ints, in O(n log n log max).

    Works bit by bit from the most significant: a pair is inverted at the first bit where the two
    values differ, i.e. they share the higher bits (same ``seq >> (b + 1)``) and have bit b set in
    the earlier element only. A stable sort by the shared prefix keeps positions in order, so each
    level is a grouped running count, all vectorised.
    """
    if seq.size < 2 or seq.max() == 0:
        return 0
    total = 0
    for b in range(int(seq.max()).bit_length()):
        prefix = seq >> (b + 1)
        order = np.argsort(prefix, kind="stable")
        pre, bit = prefix[order], (seq[order] >> b) & 1
        ones = np.cumsum(bit)
        starts = np.r_[True, pre[1:] != pre[:-1]]
        # Ones seen before this position within its prefix group.
        group_offset = np.maximum.accumulate(np.where(starts, ones - bit, 0))
        before = ones - bit - group_offset
        total += int(before[bit == 0].sum())
    return total


def prediction_probability(y_true, y_pred) -> float:
    """Prediction probability PK of Smith et al. (1996), the BreastPathQ challenge metric.

    SPEC 5: PK = (P + T/2) / (P + Q + T) over all pairs of patches whose truth differs, with P
    concordant pairs, Q discordant pairs and T pairs tied in the prediction only; pairs tied in the
    truth are left out. Equivalently PK = (1 + Somers' D(pred | truth)) / 2. Computed in
    O(n log^2 n) without forming the pairs. The paper does not report PK; the challenge's best test
    PK (.941) and the pathologists' (.927) are in :data:`cellulib.reporting.paper.PAPER`. Used in chapters 3,
    4 and 5 through :func:`cellulib.reporting.tables.results_table`.

    Parameters
    ----------
    y_true, y_pred : array-like of float, shape (n,)
        Truth and prediction; only their order matters.

    Returns
    -------
    float
        In [0, 1]; 0.5 for a constant prediction, 1 for a perfect ranking.

    Raises
    ------
    UndefinedMetricError
        If every pair is tied in the truth (all truth values equal, or a single patch): there is
        no ordering to predict. We raise rather than return NaN so that a silent NaN cannot reach a
        table; :func:`bootstrap_ci` skips such resamples.

    References
    ----------
    Smith, W. D., Dutton, R. C., & Smith, N. T. (1996). Measuring the performance of anesthetic
    depth indicators. Anesthesiology, 84(1), 38-51.

    Examples
    --------
    >>> prediction_probability([0.1, 0.2, 0.3, 0.3], [0.2, 0.1, 0.5, 0.5])  # P=4, Q=1, T=0
    0.8
    """
    t, p = _pair(y_true, y_pred, "prediction_probability")
    n = t.size
    rt = np.unique(t, return_inverse=True)[1].astype(np.int64)
    rp = np.unique(p, return_inverse=True)[1].astype(np.int64)
    n_untied = n * (n - 1) // 2 - _pairs_tied(rt)
    if n_untied == 0:
        raise UndefinedMetricError(
            f"prediction_probability: undefined because all {n} truth value(s) are tied; "
            "PK needs at least two patches with different truth"
        )
    t_only = _pairs_tied(rp) - _pairs_tied(rt * (rp.max() + 1) + rp)
    # Sorting by truth, then prediction, makes pairs tied in truth non-inverted, so the strict
    # inversions of the prediction ranks are exactly the discordant pairs.
    order = np.lexsort((rp, rt))
    q = _strict_inversions(rp[order])
    concordant = n_untied - t_only - q
    return float((concordant + 0.5 * t_only) / n_untied)


# --------------------------------------------------------------------------------------------
# bootstrap


def _mse_rows(t: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return ((t - p) ** 2)[idx].mean(axis=1)


def _kappa4_rows(t: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    codes = (_bins(t, "y_true", "kappa4") * _N_BINS + _bins(p, "y_pred", "kappa4"))[idx]
    rows = np.arange(idx.shape[0])[:, None] * _N_BINS**2
    counts = np.bincount((rows + codes).ravel(), minlength=idx.shape[0] * _N_BINS**2)
    return _kappa_from_counts(counts.reshape(-1, _N_BINS, _N_BINS), _weight_matrix(None))


# Exact vectorised equivalents of the generic per-resample loop (tests check they agree).
_VECTORISED = {mse: _mse_rows, kappa4: _kappa4_rows}

#: Clusters above this many make :func:`pk_resamples`' cluster-by-cluster count matrices too
#: large; :func:`bootstrap_ci` then calls :func:`prediction_probability` once per resample.
_PK_MAX_CLUSTERS = 500


def _membership(members: list[np.ndarray], n: int) -> np.ndarray:
    """The (n, clusters) 0/1 matrix of which cluster each patch belongs to."""
    a = np.zeros((n, len(members)))
    for g, rows in enumerate(members):
        a[rows, g] = 1.0
    return a


def pk_resamples(y_true, y_pred, members: list[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """:func:`prediction_probability` of many cluster resamples at once: one value per row of
    ``picks`` (the clusters drawn, with replacement; ``members[g]`` the patch indices of cluster
    ``g``), NaN where every pair of the resample is tied in the truth.

    A resample's pairs are the pairs of its drawn clusters' patches, so each of PK's three counts
    (pairs untied in the truth, concordant pairs, pairs tied in the prediction only) is
    ``sum over g, h of m_g m_h C[g, h]``, with ``m`` how often each cluster was drawn and ``C`` the
    count over the ordered pairs between clusters ``g`` and ``h`` (a patch paired with its own copy
    is tied in the truth and counts nowhere). The counts are whole numbers, exact in float64, so
    each value equals :func:`prediction_probability` of the pooled resample exactly
    (``tests/test_metrics.py`` checks it against the one-resample-at-a-time loop). The plain
    bootstrap is the case of one patch per cluster. Used by :func:`bootstrap_ci` and by
    :func:`cellulib.reporting.realtissue.route_difference`.
    """
    t, p = _pair(y_true, y_pred, "pk_resamples")
    picks = np.asarray(picks, dtype=np.int64)
    dt = np.sign(t[:, None] - t[None, :])  # 0 exactly where two finite values are equal
    dp = np.sign(p[:, None] - p[None, :])
    untied = dt != 0
    pairs = np.stack([untied, dt * dp > 0, untied & (dp == 0)]).astype(np.float64)
    a = _membership(members, t.size)
    drawn = np.zeros((picks.shape[0], len(members)))
    np.add.at(drawn, (np.arange(picks.shape[0])[:, None], picks), 1.0)
    # (whole numbers below 2**53: every order of summation gives the same, exact counts)
    untied_n, concordant, t_only = (((drawn @ (a.T @ k @ a)) * drawn).sum(1) / 2 for k in pairs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(untied_n > 0, (concordant + 0.5 * t_only) / untied_n, np.nan)


def _spearman_resamples(t: np.ndarray, p: np.ndarray, idx: list[np.ndarray]) -> np.ndarray:
    """:func:`spearman` of each resample (rows of ``t`` and ``p`` at ``idx[r]``, of any lengths),
    NaN where either side is constant: the resamples padded to one width with NaN, ranked by
    ``scipy.stats.rankdata`` along the rows (ties get their mean rank, the padding none), and
    Pearson's r of the ranks over each row's own entries. Equal to :func:`spearman` to rounding
    (``tests/test_metrics.py``)."""
    width = max(len(rows) for rows in idx)
    pos = np.zeros((len(idx), width), dtype=np.int64)
    valid = np.zeros((len(idx), width), dtype=bool)
    for r, rows in enumerate(idx):
        pos[r, :len(rows)], valid[r, :len(rows)] = rows, True
    centred, constant = [], np.zeros(len(idx), dtype=bool)
    for values in (t, p):
        x = np.where(valid, values[pos], np.nan)
        constant |= ~(np.nanmax(x, axis=1) > np.nanmin(x, axis=1))
        rk = stats.rankdata(x, axis=1, nan_policy="omit")
        centred.append(np.where(valid, rk - np.nanmean(rk, axis=1, keepdims=True), 0.0))
    a, b = centred
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def spearman(y_true, y_pred) -> float:
    """Spearman's rank correlation of prediction and truth (ties get their mean rank).

    Beside PK, the rank comparison against a proxy of cellularity (SPEC 1.6, `cellulib.data.proxy`).

    Raises
    ------
    UndefinedMetricError
        If either side is constant (no ranking to correlate).

    Examples
    --------
    >>> round(spearman([0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.5, 0.9]), 6)  # 1 - 6 * 2 / (4 * 15)
    0.8
    """
    t, p = _pair(y_true, y_pred, "spearman")
    if np.ptp(t) == 0 or np.ptp(p) == 0:
        raise UndefinedMetricError("spearman: undefined because the truth or the prediction is "
                                   "constant")
    return float(stats.spearmanr(t, p).statistic)


def group_rows(groups, n: int) -> list[np.ndarray]:
    """The row indices of each group (in order of first appearance): the clusters that
    :func:`bootstrap_ci` and :func:`pk_resamples` resample whole.

    >>> [m.tolist() for m in group_rows(["b", "a", "b", "c"], 4)]
    [[0, 2], [1], [3]]
    """
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"bootstrap_ci: groups must have one entry per patch ({n}), got shape "
                         f"{g.shape}")
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.flatnonzero(inverse == k) for k in order]


def bootstrap_ci(
    metric: Callable, y_true, y_pred, n_boot: int = 2000, alpha: float = 0.05, seed=0,
    groups=None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(y_true, y_pred)`` over patches.

    Paper Table 2 and Table 3 brackets (SPEC 5: 95 % percentile bootstrap, seeded). Each resample
    draws n patches with replacement (``numpy.random.default_rng(seed).integers(0, n, (n_boot,
    n))``, the same draw as ``scipy.stats.bootstrap``); the limits are the ``alpha/2`` and
    ``1 - alpha/2`` quantiles (linear interpolation) of the resampled metric. :func:`mse`,
    unweighted :func:`kappa4` and :func:`prediction_probability` (:func:`pk_resamples`, up to 500
    patches or clusters) are computed for all resamples at once, and so is :func:`spearman` with
    ``groups``; other metrics are called once per resample. Resamples on which the metric is
    undefined (it raises
    :class:`UndefinedMetricError` or returns NaN, e.g. kappa when every drawn patch falls in one
    bin) are skipped and a :class:`MetricWarning` says how many. Used in chapters 3, 4 and 5 through
    :func:`cellulib.reporting.tables.results_table`.

    Parameters
    ----------
    metric : callable
        ``metric(y_true, y_pred) -> float``, e.g. :func:`mse`, :func:`kappa4`,
        :func:`prediction_probability`.
    y_true, y_pred : array-like of float, shape (n,)
    n_boot : int
        Number of resamples.
    alpha : float
        1 - confidence level.
    seed : int or numpy.random.Generator
        Seed of the resampling; the interval is deterministic for a given seed.
    groups : array-like, shape (n,), optional
        A cluster label per patch (a patient, an image cut into windows): each resample then
        draws as many whole clusters as there are, with replacement, and pools their patches (the
        cluster bootstrap), since patches of one patient are not independent. Metrics are called
        once per resample.

    Returns
    -------
    (float, float)
        Lower and upper limits.

    Raises
    ------
    UndefinedMetricError
        If the metric is undefined on every resample.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> y_true = rng.uniform(size=200)
    >>> y_pred = np.clip(y_true + rng.normal(0, 0.1, 200), 0, 1)
    >>> lo, hi = bootstrap_ci(mse, y_true, y_pred, n_boot=500)
    >>> bool(lo < mse(y_true, y_pred) < hi)
    True
    """
    if not callable(metric):
        raise ValueError(f"bootstrap_ci: metric must be callable, got {type(metric).__name__}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha!r}")
    name = getattr(metric, "__name__", "metric")
    t, p = _pair(y_true, y_pred, f"bootstrap_ci({name})")
    rng = np.random.default_rng(seed)
    if groups is not None:
        members = group_rows(groups, t.size)
        picks = rng.integers(0, len(members), (int(n_boot), len(members)))
        idx = [np.concatenate([members[k] for k in row]) for row in picks]
        fast = None
    else:
        idx = rng.integers(0, t.size, (int(n_boot), t.size))
        picks, fast = idx, _VECTORISED.get(metric)
    if metric is prediction_probability and picks.shape[1] <= _PK_MAX_CLUSTERS:
        clusters = members if groups is not None else [np.array([i]) for i in range(t.size)]
        values = pk_resamples(t, p, clusters, picks)
    elif metric is spearman and groups is not None:
        values = _spearman_resamples(t, p, idx)
    elif fast is not None:
        values = fast(t, p, idx)
    else:
        values = np.empty(len(idx))
        for i, row in enumerate(idx):
            try:
                values[i] = metric(t[row], p[row])
            except UndefinedMetricError:
                values[i] = np.nan
    ok = ~np.isnan(values)
    if not ok.any():
        raise UndefinedMetricError(
            f"bootstrap_ci: {name} is undefined on all {n_boot} resamples of {t.size} patches"
        )
    if not ok.all():
        warnings.warn(
            f"bootstrap_ci: {name} was undefined on {int((~ok).sum())} of {n_boot} resamples "
            f"of {t.size} patches; they were skipped, so the interval is conditional on a "
            "defined metric",
            MetricWarning,
            stacklevel=2,
        )
    lo, hi = np.quantile(values[ok], [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# reporting


def evaluate(y_true, y_pred, n_boot: int = 2000, seed=0, alpha: float = 0.05,
             groups=None) -> pd.DataFrame:
    """All of the paper's agreement metrics with confidence intervals, one row per metric.

    Paper section 3.5, Tables 2 and 3, plus the challenge's PK (SPEC 5). MSE, kappa (unweighted,
    4 bins) and PK get a percentile bootstrap interval (:func:`bootstrap_ci`, same seed for each);
    ICC(2,1) gets the analytic interval (:func:`icc_ci`) with the truth and the prediction as the
    two raters of an (n, 2) matrix. A metric that is undefined on these data is NaN, with a
    warning. Used in chapters 3, 4 and 5 through :func:`cellulib.reporting.tables.results_table` to print
    Tables 2 and 3 beside :data:`cellulib.reporting.paper.PAPER`.

    Parameters
    ----------
    y_true, y_pred : array-like of float, shape (n,)
        Cellularity fractions in [0, 1].
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the bootstrap.
    alpha : float
        1 - confidence level.
    groups : array-like, optional
        A cluster per patch (patient): the bootstrap resamples whole clusters (see
        :func:`bootstrap_ci`).

    Returns
    -------
    pandas.DataFrame
        Index ``metric`` = ``MSE``, ``kappa``, ``ICC(2,1)``, ``PK``; columns ``value``,
        ``ci_low``, ``ci_high``, ``ci_method`` (``bootstrap`` or ``analytic``) and ``n``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y_true = rng.uniform(size=100)
    >>> y_pred = np.clip(y_true + rng.normal(0, 0.1, 100), 0, 1)
    >>> evaluate(y_true, y_pred, n_boot=200).index.tolist()
    ['MSE', 'kappa', 'ICC(2,1)', 'PK']
    """
    t, p = _pair(y_true, y_pred, "evaluate")
    # Check the [0, 1] range once, before any metric, so that MSE is not reported for bad input.
    _bins(t, "y_true", "evaluate")
    _bins(p, "y_pred", "evaluate")
    rows = []
    for label, metric in (("MSE", mse), ("kappa", kappa4), ("PK", prediction_probability)):
        try:
            value = metric(t, p)
            lo, hi = bootstrap_ci(metric, t, p, n_boot=n_boot, alpha=alpha, seed=seed,
                                  groups=groups)
        except UndefinedMetricError as err:
            warnings.warn(f"evaluate: {label} is NaN: {err}", MetricWarning, stacklevel=2)
            value = lo = hi = np.nan
        rows.append((label, value, lo, hi, "bootstrap"))
    ratings = np.column_stack([t, p])
    try:
        value = icc(ratings, "ICC2")
        lo, hi = icc_ci(ratings, "ICC2", alpha=alpha)
    except UndefinedMetricError as err:
        warnings.warn(f"evaluate: ICC(2,1) is NaN: {err}", MetricWarning, stacklevel=2)
        value = lo = hi = np.nan
    rows.insert(2, ("ICC(2,1)", value, lo, hi, "analytic"))
    out = pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high", "ci_method"])
    out["n"] = t.size
    return out.set_index("metric")


def format_ci(value: float, lo: float, hi: float, digits: int = 3) -> str:
    """Format a value with its interval as the paper prints it: ``0.023 [0.019-0.026]``.

    An interval with a negative end reads ``[lo to hi]``, since a hyphen beside a minus sign
    (``[-0.175--0.022]``) reads as neither. Used in chapters 3, 4 and 5 through
    :func:`cellulib.reporting.tables.results_table` so that our tables read like paper Tables 2
    and 3, and for every difference a chapter reports.

    Examples
    --------
    >>> format_ci(0.0231, 0.0189, 0.0262)
    '0.023 [0.019-0.026]'
    >>> format_ci(-0.107, -0.175, -0.022)
    '-0.107 [-0.175 to -0.022]'

    A number that rounds to zero has no sign (a kappa of ``-1e-17`` is ``0.000``, not ``-0.000``):

    >>> format_ci(0.0, -1e-17, 1e-17)
    '0.000 [0.000-0.000]'
    """
    if value is None or math.isnan(value):
        return "n/a"

    def fmt(x: float) -> str:
        text = f"{x:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text

    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return fmt(value)
    low, high = fmt(lo), fmt(hi)
    between = " to " if low.startswith("-") or high.startswith("-") else "-"
    return f"{fmt(value)} [{low}{between}{high}]"


def bland_altman(y_true, y_pred) -> dict[str, float]:
    """Bias and 95% limits of agreement of prediction minus label (Bland & Altman 1986).

    ``bias`` = mean(d), ``sd`` = sample standard deviation of d (ddof 1), limits
    ``bias -/+ 1.96 sd``, with ``d = y_pred - y_true``. Complements the agreement metrics of paper
    section 3.5; used in chapter 4 and by ``cellulib evaluate --figure``.

    Examples
    --------
    >>> round(bland_altman([0.1, 0.5, 0.9], [0.2, 0.5, 0.7])["bias"], 4)
    -0.0333
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape or t.size < 2:
        raise ValueError(f"bland_altman needs two equally long arrays of at least 2 values, got "
                         f"{t.size} and {p.size}")
    d = p - t
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd,
            "n": int(t.size)}
