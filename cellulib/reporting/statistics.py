"""Bootstrap statistics of the book's comparisons (SPEC 5.1): the mean predictor, MSE with its
95% CI and whether a model has *learned*, paired bootstrap differences of MSE, Jaccard and
detection F, and the bias per cellularity bin. Used in chapters 3-5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from cellulib.reporting.paper import PAPER

__all__ = [
    "all_learned",
    "kappa_bin_counts",
    "MEAN_PREDICTOR",
    "MIN_PATCHES",
    "Estimate",
    "bias_by_bin",
    "jaccard_summary",
    "learned",
    "mean_predictor_predictions",
    "mse_ci",
    "mse_summary",
    "paired_detection_difference",
    "paired_jaccard_difference",
    "paired_mean",
    "paired_mse_difference",
    "training_mean",
]


#: Name of the mean-predictor row in every table.
MEAN_PREDICTOR = "Mean predictor"

#: Fewest validation patches (or images) on which a bootstrap CI is taken as evidence: with fewer,
#: the resamples repeat the same few values and the interval says nothing.
MIN_PATCHES = 5


class Estimate(NamedTuple):
    """A statistic with its 95% confidence interval; unpacks as ``value, ci_low, ci_high``."""

    value: float
    ci_low: float
    ci_high: float


def training_mean(root=None, result=None) -> float:
    """The training labels' mean cellularity: what the mean predictor predicts for every patch.

    Taken from ``result.meta["train_mean"]`` when the trained model recorded it, else computed
    from the training split of the BreastPathQ folder ``root`` (column ``cellularity``). SPEC 5.1;
    used in chapters 3, 4 and 5.

    Raises
    ------
    ValueError
        When neither gives a training mean (no silent guess).
    """
    meta = getattr(result, "meta", None) or {}
    if meta.get("train_mean") is not None:
        return float(meta["train_mean"])
    if root is None:
        raise ValueError("training_mean: the model records no train_mean and no data folder "
                         "was given to compute it from")
    from cellulib.data.breastpathq import read_breastpathq

    df = read_breastpathq(root)
    train = df.loc[df["split"] == "train", "cellularity"]
    if train.empty:
        raise ValueError(f"training_mean: {root} has no training patches")
    return float(train.mean())


def _check_train_mean(train_mean) -> float:
    value = float(train_mean)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"train_mean must be a cellularity in [0, 1], got {train_mean!r}")
    return value


def mean_predictor_predictions(y_true, train_mean: float) -> pd.DataFrame:
    """Predictions of the mean predictor: ``train_mean`` for every patch, beside the truth.

    SPEC 5.1: the baseline row of every results table. ``y_true`` is an array of labels or a
    predictions table (its ``path`` and ``y_true`` columns are kept). Used in chapters 3, 4 and 5
    through :func:`cellulib.reporting.statistics.mse_summary` and by
    ``cellulib evaluate``.

    Returns
    -------
    pandas.DataFrame
        Columns (``path``,) ``y_true``, ``y_pred``, like :func:`cellulib.training.train.predictions`.

    Examples
    --------
    >>> mean_predictor_predictions([0.1, 0.5], 0.3).y_pred.tolist()
    [0.3, 0.3]
    """
    value = _check_train_mean(train_mean)
    if isinstance(y_true, pd.DataFrame):
        frame = y_true[[c for c in ("path", "y_true") if c in y_true.columns]].copy()
    else:
        frame = pd.DataFrame({"y_true": np.asarray(y_true, dtype=float).ravel()})
    frame["y_pred"] = value
    return frame.reset_index(drop=True)


def mse_ci(y_true, y_pred, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """MSE with its percentile bootstrap CI over patches (paper section 3.5, Table 2).

    The resamples are those of :func:`cellulib.metrics.agreement.bootstrap_ci` with the same seed, so two
    models scored on the same patches are resampled alike. Used in chapters 3, 4 and 5 through
    :func:`cellulib.reporting.statistics.mse_summary`.
    """
    from cellulib.metrics.agreement import bootstrap_ci, mse

    lo, hi = bootstrap_ci(mse, y_true, y_pred, n_boot=n_boot, alpha=alpha, seed=seed)
    return Estimate(mse(y_true, y_pred), lo, hi)


def learned(mse_ci_high: float, mean_mse: float, n: int | None = None) -> bool:
    """Whether a model has learned: the upper end of its MSE's 95% CI is below the mean predictor's.

    SPEC 5.1. With ``n`` (the number of validation patches) below :data:`MIN_PATCHES` nothing
    counts as learned: a bootstrap over so few patches gives no evidence. Used in chapters 4 and 5,
    in chapter 3 through :func:`mse_summary`, and by ``cellulib evaluate``.

    Examples
    --------
    >>> learned(0.010, 0.040), learned(0.045, 0.040)
    (True, False)
    """
    if n is not None and n < MIN_PATCHES:
        return False
    if mse_ci_high is None or mean_mse is None or math.isnan(mse_ci_high) or math.isnan(mean_mse):
        return False
    return bool(mse_ci_high < mean_mse)


def _first_truth(preds: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    if not preds:
        raise ValueError("no predictions given")
    return next(iter(preds.values()))


def mse_summary(preds: Mapping[str, pd.DataFrame], train_mean: float | None = None,
                n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Every model's validation MSE with its 95% CI, the mean predictor, "learned" and the paper's MSE.

    ``preds`` maps a model name to its validation predictions (``y_true``, ``y_pred``; all on the
    same patches). With ``train_mean`` a :data:`MEAN_PREDICTOR` row is added and ``learned`` says
    whether each model's upper CI is below its MSE (:func:`learned`); without it ``learned`` is
    missing (None). Paper Table 2; SPEC 5.1. Used in chapters 3-5 and by
    :func:`cellulib.reporting.plots.mse_summary`.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns ``mse``, ``ci_low``, ``ci_high``, ``n``, ``learned`` (True, False,
        or None for the mean predictor and when there is no mean predictor), ``paper_random`` and
        ``paper_imagenet`` (the paper's MSE, NaN where it has none).
    """
    paper = PAPER[(PAPER.table == "Table 2") & (PAPER.metric == "MSE")]
    paper = paper.set_index(["model", "init"])["value"]
    rows = {}
    for name, p in preds.items():
        est = mse_ci(p.y_true, p.y_pred, n_boot=n_boot, seed=seed, alpha=alpha)
        rows[name] = {"mse": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high,
                      "n": len(p)}
    if train_mean is not None:
        base = mean_predictor_predictions(_first_truth(preds), train_mean)
        est = mse_ci(base.y_true, base.y_pred, n_boot=n_boot, seed=seed, alpha=alpha)
        rows[MEAN_PREDICTOR] = {"mse": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high,
                                "n": len(base)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "model"
    mean_mse = out.loc[MEAN_PREDICTOR, "mse"] if train_mean is not None else None
    out["learned"] = pd.Series(
        [None if mean_mse is None or name == MEAN_PREDICTOR
         else learned(row["ci_high"], mean_mse, row["n"]) for name, row in out.iterrows()],
        index=out.index, dtype=object)
    out["paper_random"] = [paper.get((name, "random"), np.nan) for name in out.index]
    out["paper_imagenet"] = [paper.get((name, "imagenet"), np.nan) for name in out.index]
    return out


def all_learned(summary: pd.DataFrame) -> bool:
    """Whether every model of a :func:`mse_summary` table learned (its mean-predictor row left out):
    what SPEC 5.1 asks before any comparison between them is decided. Used in the stain-shift
    chapter.

    Examples
    --------
    >>> table = pd.DataFrame({"learned": [True, False]}, index=["A", MEAN_PREDICTOR])
    >>> all_learned(table)
    True
    """
    return bool(summary["learned"].drop(MEAN_PREDICTOR, errors="ignore").astype(bool).all())


def _aligned(pred_a: pd.DataFrame, pred_b: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """Truth and both predictions on the same patches (matched by ``path`` when both have it)."""
    if "path" in pred_a.columns and "path" in pred_b.columns:
        merged = pred_a[["path", "y_true", "y_pred"]].merge(
            pred_b[["path", "y_true", "y_pred"]], on="path", suffixes=("_a", "_b"))
        if len(merged) != len(pred_a) or len(merged) != len(pred_b):
            raise ValueError(f"paired comparison needs predictions on the same patches; "
                             f"{len(pred_a)} and {len(pred_b)} given, {len(merged)} shared")
        t, t_b = merged["y_true_a"].to_numpy(float), merged["y_true_b"].to_numpy(float)
        a, b = merged["y_pred_a"].to_numpy(float), merged["y_pred_b"].to_numpy(float)
    else:
        if len(pred_a) != len(pred_b):
            raise ValueError(f"paired comparison needs predictions on the same patches; "
                             f"{len(pred_a)} and {len(pred_b)} given")
        t, t_b = pred_a["y_true"].to_numpy(float), pred_b["y_true"].to_numpy(float)
        a, b = pred_a["y_pred"].to_numpy(float), pred_b["y_pred"].to_numpy(float)
    if not np.allclose(t, t_b):
        raise ValueError("paired comparison: the two tables hold different labels for the same "
                         "patches")
    if t.size == 0:
        raise ValueError("paired comparison: no patches")
    return t, a, b


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_mse_difference(pred_a: pd.DataFrame, pred_b: pd.DataFrame, n_boot: int = 2000,
                          seed: int = 0, alpha: float = 0.05) -> Estimate:
    """MSE of model A minus MSE of model B on the same patches, with a paired bootstrap 95% CI.

    Each replicate draws n patches with replacement once (``numpy.random.default_rng(seed)
    .integers(0, n, (n_boot, n))``, the draw of :func:`cellulib.metrics.agreement.bootstrap_ci`) and takes
    ``MSE_A - MSE_B`` over those same patches, so what the two models share (hard patches, easy
    patches) cancels; the limits are the percentiles. A negative difference favours A. SPEC 5.1;
    used in chapters 3, 4 and 5 through :func:`cellulib.reporting.verdicts.compare`.

    Parameters
    ----------
    pred_a, pred_b : pandas.DataFrame
        Validation predictions (``y_true``, ``y_pred``, optionally ``path``): matched by ``path``
        when both have it, else by row.
    n_boot : int
        Bootstrap replicates.
    seed : int
        Seed of the resampling.
    alpha : float
        1 - confidence level.

    Returns
    -------
    Estimate
        ``value`` (the difference on all patches), ``ci_low``, ``ci_high``.

    Examples
    --------
    >>> a = pd.DataFrame({"y_true": [0.1, 0.5, 0.9], "y_pred": [0.1, 0.5, 0.9]})
    >>> paired_mse_difference(a, a)
    Estimate(value=0.0, ci_low=0.0, ci_high=0.0)
    """
    t, a, b = _aligned(pred_a, pred_b)
    return paired_mean(((a - t) ** 2 - (b - t) ** 2), n_boot, seed, alpha)


def paired_mean(diff, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Mean of per-patch differences with a percentile bootstrap 95% CI over the patches.

    The draw of :func:`paired_mse_difference` (``numpy.random.default_rng(seed).integers(0, n,
    (n_boot, n))``): with ``diff`` the per-patch squared error of A minus that of B, it is the
    paired MSE difference. Also used by :mod:`cellulib.reporting.robustness` for rises in MSE under a shift
    and differences between them (the stain-shift chapter).
    """
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    diff = np.asarray(diff, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, diff.size, (int(n_boot), diff.size))
    lo, hi = _percentile_ci(diff[idx].mean(axis=1), alpha)
    return Estimate(float(diff.mean()), lo, hi)


def _not_learned(summary: pd.DataFrame, names: Sequence[str]) -> list[str]:
    return [n for n in names if not summary.loc[n, "learned"]]


_BIN_LABELS = ("[0, 0.25]", "(0.25, 0.5]", "(0.5, 0.75]", "(0.75, 1]")


def kappa_bin_counts(cellularity) -> pd.DataFrame:
    """Patches per bin of Cohen's kappa (:func:`cellulib.metrics.agreement.cellularity_bins`: [0, 0.25],
    (0.25, 0.5], (0.5, 0.75], (0.75, 1]), an empty bin as 0. Used in chapter 1.

    Examples
    --------
    >>> kappa_bin_counts([0.0, 0.1, 0.3, 1.0]).iloc[:, 0].tolist()
    [2, 1, 0, 1]
    """
    from cellulib.metrics.agreement import cellularity_bins

    bins = pd.Series(cellularity_bins(cellularity)).value_counts().reindex(range(4), fill_value=0)
    bins.index = list(_BIN_LABELS)
    return bins.rename("patches (the 4 bins of Cohen's kappa)").to_frame()


def bias_by_bin(preds: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean error (prediction - label) per true cellularity bin, one row per model.

    The signature of regression to the mean (paper section 4.4) is a positive error in the lowest
    bin and a negative one in the highest. Bins are those of Cohen's kappa
    (:func:`cellulib.metrics.agreement.cellularity_bins`); an empty bin is NaN. Used in chapter 4 through
    :func:`cellulib.reporting.sentences.regression_to_mean_sentence`.
    """
    from cellulib.metrics.agreement import cellularity_bins

    rows = {}
    for name, p in preds.items():
        bins = cellularity_bins(p.y_true)
        err = p.y_pred.to_numpy(float) - p.y_true.to_numpy(float)
        rows[name] = [float(err[bins == b].mean()) if (bins == b).any() else np.nan
                      for b in range(4)]
    out = pd.DataFrame.from_dict(rows, orient="index", columns=list(_BIN_LABELS))
    out.index.name = "model"
    return out


def _jaccard_boot(counts: pd.DataFrame, idx: np.ndarray, baseline: bool = False) -> np.ndarray:
    """Mean nuclear Jaccard (pooled over images, then averaged over classes) per resample."""
    wide = counts.pivot(index="image", columns="cls")
    inter = wide["target" if baseline else "intersection"].to_numpy(float)
    union = wide["pixels" if baseline else "union"].to_numpy(float)
    i_sum, u_sum = inter[idx].sum(axis=-2), union[idx].sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(u_sum > 0, i_sum / np.where(u_sum > 0, u_sum, 1), np.nan)
    return np.nanmean(iou, axis=-1)


def jaccard_summary(counts: Mapping[str, pd.DataFrame], n_boot: int = 2000, seed: int = 0,
                    alpha: float = 0.05) -> pd.DataFrame:
    """Mean nuclear Jaccard per network with a bootstrap CI over images, and whether it learned.

    The baseline, playing the mean predictor's part, marks every pixel as every class (its IoU
    is the share of mask pixels, the best any constant map reaches); a network has learned when
    the lower end of its CI is above that (SPEC 5.1 by analogy). Paper Table 1; used in chapter 5
    through :func:`cellulib.reporting.verdicts.findings`.

    Returns
    -------
    pandas.DataFrame
        Index: the names of ``counts``; columns ``jaccard``, ``ci_low``, ``ci_high``, ``n``,
        ``baseline``, ``learned``.
    """
    rows = {}
    for name, c in counts.items():
        n = c["image"].nunique()
        idx = np.random.default_rng(seed).integers(0, n, (int(n_boot), n))
        value = float(_jaccard_boot(c, np.arange(n)))
        lo, hi = _percentile_ci(_jaccard_boot(c, idx), alpha)
        base = float(_jaccard_boot(c, np.arange(n), baseline=True))
        rows[name] = {"jaccard": value, "ci_low": lo, "ci_high": hi, "n": n, "baseline": base,
                      "learned": bool(n >= MIN_PATCHES and lo > base)}
    return pd.DataFrame.from_dict(rows, orient="index")


def paired_jaccard_difference(counts_a: pd.DataFrame, counts_b: pd.DataFrame, n_boot: int = 2000,
                              seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Mean nuclear Jaccard of network A minus B on the same images, paired bootstrap 95% CI.

    Each replicate resamples the validation images once and recomputes both pooled Jaccards on
    them (paper Table 1; SPEC 5.1). A positive difference favours A. Used in chapter 5 through
    :func:`cellulib.reporting.verdicts.findings`.
    """
    images = sorted(set(counts_a["image"]))
    if images != sorted(set(counts_b["image"])):
        raise ValueError("paired Jaccard difference needs counts on the same images")
    n = len(images)
    idx = np.random.default_rng(seed).integers(0, n, (int(n_boot), n))
    boot = _jaccard_boot(counts_a, idx) - _jaccard_boot(counts_b, idx)
    value = float(_jaccard_boot(counts_a, np.arange(n)) - _jaccard_boot(counts_b, np.arange(n)))
    lo, hi = _percentile_ci(boot, alpha)
    return Estimate(value, lo, hi)


def _f_boot(counts: pd.DataFrame, cls: str, images: list, idx: np.ndarray) -> np.ndarray:
    part = counts[counts["class"] == cls].set_index("image").loc[images, ["tp", "fp", "fn"]]
    from cellulib.metrics.detection import precision_recall_f1

    tp, fp, fn = (part[c].to_numpy()[idx].sum(axis=-1) for c in ("tp", "fp", "fn"))
    return precision_recall_f1(tp, fp, fn)[2]


def paired_detection_difference(counts_a: pd.DataFrame, counts_b: pd.DataFrame,
                                cls: str = "detection", n_boot: int = 2000, seed: int = 0,
                                alpha: float = 0.05) -> Estimate:
    """Micro F of detector A minus B for one class on the same images, paired bootstrap 95% CI.

    ``counts_a``/``counts_b``: per-image counts from :func:`cellulib.metrics.detection.detection_counts`.
    Each replicate resamples the images once and recomputes both F from the summed counts (SPEC
    5.1). A positive difference favours A. Used in the real-H&E chapter.
    """
    images = list(pd.unique(counts_a["image"]))
    if sorted(map(str, images)) != sorted(map(str, pd.unique(counts_b["image"]))):
        raise ValueError("paired detection difference needs counts on the same images")
    n = len(images)
    idx = np.random.default_rng(seed).integers(0, n, (int(n_boot), n))
    full = np.arange(n)[None]
    boot = _f_boot(counts_a, cls, images, idx) - _f_boot(counts_b, cls, images, idx)
    value = float((_f_boot(counts_a, cls, images, full) - _f_boot(counts_b, cls, images, full))[0])
    lo, hi = _percentile_ci(boot, alpha)
    return Estimate(value, lo, hi)
