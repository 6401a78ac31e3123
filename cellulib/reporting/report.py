"""Reporting: the paper's published numbers (`PAPER`), its tables with ours beside them, and honest
comparisons.

Every results table carries a **mean predictor**: the training labels' mean, predicted for every
patch and scored like a model. A model has *learned* when the upper end of the 95% CI of its MSE is
below the mean predictor's MSE. A finding of the paper *holds* here only when both models compared
have learned and the 95% paired-bootstrap CI of their MSE difference excludes 0 on the side the paper
claims; it *does not hold* when both learned and the CI excludes 0 on the other side; otherwise it is
*undecided* (SPEC 5.1). Used in chapters 3, 4 and 5.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "AUTHORS_CODE",
    "all_learned",
    "importance_caveat",
    "learned_count",
    "route_cost_sentence",
    "schedule_text",
    "kappa_bin_counts",
    "labels_sentence",
    "stain_sources_sentence",
    "choose_detector",
    "claim_words",
    "brca_m2c_table",
    "brca_m2c_sentence",
    "pixel_scale_sentence",
    "training_sentence",
    "decoder_sentence",
    "real_he_finding",
    "confusion_sentence",
    "jaccard_sentence",
    "fraction_sentence",
    "dot_examples",
    "dots_sentence",
    "transfer_table",
    "transfer_sentence",
    "real_he_summary",
    "SCORE_STEP",
    "BRCA_M2C_NAMES",
    "MCSPATNET_F",
    "DENUC_F",
    "PUBLISHED_F",
    "REAL_FLOORS",
    "floors_missed",
    "MEAN_PREDICTOR",
    "PAPER",
    "MIN_PATCHES",
    "PAPER_ROWS",
    "VERDICTS",
    "Estimate",
    "best_detector",
    "bias_by_bin",
    "book_numbers",
    "compare",
    "detection_table",
    "findings",
    "glue_numbers",
    "jaccard_summary",
    "table1",
    "learned",
    "learned_sentence",
    "mean_predictor_predictions",
    "mse_ci",
    "mse_summary",
    "paired_detection_difference",
    "paired_jaccard_difference",
    "paired_mean",
    "paired_mse_difference",
    "paper_range",
    "paper_text",
    "regression_to_mean_sentence",
    "results_table",
    "segmentation_counts",
    "training_mean",
    "verdict",
]

#: Rows of the paper's Tables 2 and 3, in the paper's order.
PAPER_ROWS = ("GBT", "ResNet34 (SR)", "ResNet34 (R)", "ResNet50 (R)", "Xception (R)", "Xception (C)")

#: Name of the mean-predictor row in every table.
MEAN_PREDICTOR = "Mean predictor"

#: The three verdicts a paper finding can get here (SPEC 5.1).
VERDICTS = ("holds", "does not hold", "undecided")

#: Fewest validation patches (or images) on which a bootstrap CI is taken as evidence: with fewer,
#: the resamples repeat the same few values and the interval says nothing.
MIN_PATCHES = 5

_DIRECT = ("ResNet34 (R)", "ResNet50 (R)", "Xception (R)", "Xception (C)")
_SEGMENTATION = ("GBT", "ResNet34 (SR)")


# --------------------------------------------------------------------------------------------
# the paper's numbers

_PAPER_SRC = "Rakhlin et al. 2019"
_CHALLENGE_SRC = "BreastPathQ challenge (SPEC 5; not in the Rakhlin et al. text)"

# (table, model, init, metric, text exactly as printed, source); numbers are parsed from the text.
_PAPER_ROWS = [
    ("Table 1", "U-Net decoder", "random", "Jaccard", "0.35", _PAPER_SRC),
    ("Table 1", "FPN decoder", "random", "Jaccard", "0.47", _PAPER_SRC),
    ("Table 1", "U-Net decoder", "imagenet", "Jaccard", "0.50", _PAPER_SRC),
    ("Table 1", "FPN decoder", "imagenet", "Jaccard", "0.53", _PAPER_SRC),
    ("Table 2", "GBT", "random", "MSE", "0.023 [0.019-0.026]", _PAPER_SRC),
    ("Table 2", "GBT", "imagenet", "MSE", "0.022 [0.019-0.026]", _PAPER_SRC),
    ("Table 2", "ResNet34 (SR)", "random", "MSE", "0.013 [0.011-0.015]", _PAPER_SRC),
    ("Table 2", "ResNet34 (SR)", "imagenet", "MSE", "0.013 [0.011-0.015]", _PAPER_SRC),
    ("Table 2", "ResNet34 (R)", "random", "MSE", "0.015 [0.013-0.018]", _PAPER_SRC),
    ("Table 2", "ResNet34 (R)", "imagenet", "MSE", "0.011 [0.010-0.012]", _PAPER_SRC),
    ("Table 2", "ResNet50 (R)", "random", "MSE", "0.025 [0.022-0.028]", _PAPER_SRC),
    ("Table 2", "ResNet50 (R)", "imagenet", "MSE", "0.011 [0.009-0.012]", _PAPER_SRC),
    ("Table 2", "Xception (R)", "random", "MSE", "0.017 [0.015-0.020]", _PAPER_SRC),
    ("Table 2", "Xception (R)", "imagenet", "MSE", "0.010 [0.009-0.012]", _PAPER_SRC),
    ("Table 2", "Xception (C)", "random", "MSE", "0.012 [0.010-0.014]", _PAPER_SRC),
    ("Table 2", "Xception (C)", "imagenet", "MSE", "0.010 [0.009-0.012]", _PAPER_SRC),
    ("Table 3", "GBT", "imagenet", "kappa", "0.571 [0.520-0.622]", _PAPER_SRC),
    ("Table 3", "GBT", "imagenet", "ICC", "0.787 [0.744-0.823]", _PAPER_SRC),
    ("Table 3", "ResNet34 (SR)", "imagenet", "kappa", "0.658 [0.604-0.704]", _PAPER_SRC),
    ("Table 3", "ResNet34 (SR)", "imagenet", "ICC", "0.865 [0.835-0.891]", _PAPER_SRC),
    ("Table 3", "ResNet34 (R)", "imagenet", "kappa", "0.649 [0.599-0.700]", _PAPER_SRC),
    ("Table 3", "ResNet34 (R)", "imagenet", "ICC", "0.868 [0.840-0.892]", _PAPER_SRC),
    ("Table 3", "ResNet50 (R)", "imagenet", "kappa", "0.652 [0.603-0.701]", _PAPER_SRC),
    ("Table 3", "ResNet50 (R)", "imagenet", "ICC", "0.867 [0.844-0.894]", _PAPER_SRC),
    ("Table 3", "Xception (R)", "imagenet", "kappa", "0.669 [0.616-0.713]", _PAPER_SRC),
    ("Table 3", "Xception (R)", "imagenet", "ICC", "0.881 [0.853-0.904]", _PAPER_SRC),
    ("Table 3", "Xception (C)", "imagenet", "kappa", "0.689 [0.642-0.734]", _PAPER_SRC),
    ("Table 3", "Xception (C)", "imagenet", "ICC", "0.883 [0.858-0.905]", _PAPER_SRC),
    ("Table 3", "Peikari et al.", None, "kappa", "0.38-0.42", _PAPER_SRC),
    ("Table 3", "Peikari et al.", None, "ICC", "0.75 [0.71-0.79]", _PAPER_SRC),
    ("Table 3", "Akbar et al.", None, "ICC", "0.83 [0.79-0.86]", _PAPER_SRC),
    ("challenge", "best team (test set)", None, "PK", "0.941", _CHALLENGE_SRC),
    ("challenge", "pathologist vs pathologist", None, "PK", "0.927", _CHALLENGE_SRC),
]


def _parse_paper_text(text: str) -> tuple[float, float, float]:
    """'0.023 [0.019-0.026]' -> (0.023, 0.019, 0.026); '0.38-0.42' (a range) -> (nan, .38, .42)."""
    m = re.fullmatch(r"([\d.]+)(?: \[([\d.]+)-([\d.]+)\])?", text)
    if m:
        lo, hi = (float(g) if g else np.nan for g in m.group(2, 3))
        return float(m.group(1)), lo, hi
    lo, hi = text.split("-")
    return np.nan, float(lo), float(hi)


def _paper_table() -> pd.DataFrame:
    df = pd.DataFrame(_PAPER_ROWS, columns=["table", "model", "init", "metric", "text", "source"])
    parsed = np.array([_parse_paper_text(s) for s in df["text"]], dtype=float)
    df.insert(4, "value", parsed[:, 0])
    df.insert(5, "ci_low", parsed[:, 1])
    df.insert(6, "ci_high", parsed[:, 2])
    return df


#: The paper's anchor values, one row per number (SPEC 5), transcribed from Rakhlin et al. 2019
#: Tables 1-3 and the BreastPathQ challenge. Columns: ``table``, ``model``, ``init`` (``random``,
#: ``imagenet``, or missing for other studies and the challenge), ``metric`` (``Jaccard``, ``MSE``, ``kappa``, ``ICC``, ``PK``), ``value``,
#: ``ci_low``, ``ci_high`` (95 % CI; NaN when not reported), ``text`` (as printed in the paper) and
#: ``source``. Peikari et al.'s kappa is printed as a range (0.38-0.42) with no point value:
#: ``value`` is NaN and the range is stored in ``ci_low``/``ci_high``, see ``text``. The paper does
#: not name its ICC form. Its abstract quotes kappa 0.69 and ICC 0.89 for the best model, where
#: Table 3 prints 0.689 and 0.883; the table values are the ones kept here.
PAPER = _paper_table()


#: MCSpatNet's F on the BRCA-M2C test split at 6 px (their committed test predictions scored with
#: this protocol; SPEC 1.4), by class as this library names them ("normal" holds the stromal dots).
MCSPATNET_F = {"lymphocyte": 0.649, "malignant": 0.792, "normal": 0.548, "detection": 0.851}

#: DeNuC's F on the BRCA-M2C test split (2026; a small detector with the UNI2-h pathology foundation
#: model as classifier, scored at 40x with a 12 px radius: close to this protocol, not identical),
#: as quoted in issue 22.
DENUC_F = {"lymphocyte": 0.697, "malignant": 0.851, "normal": 0.611, "detection": 0.875}
#: DeNuC's matching radius in pixels (at 40x), for the sentence that says how its protocol differs.
DENUC_RADIUS_PX = 12

#: The published F on the test split that the real-H&E chapter puts beside its own, by column name.
PUBLISHED_F = {"MCSpatNet F (test)": MCSPATNET_F, "DeNuC F (test)": DENUC_F}

#: This book's floors for the real-H&E detector (issue 22): F per class and pooled on the
#: patient-disjoint validation split (:func:`cellulib.data.breastpathq.patient_split`), with the default recipe
#: of ``cellulib train seg --data <BRCA-M2C folder>`` (CPU, no pretrained weights, seed 0).
REAL_FLOORS = {"lymphocyte": 0.55, "malignant": 0.75, "normal": 0.55, "detection": 0.82}


def floors_missed(table: pd.DataFrame, floors: Mapping[str, float] | None = None) -> dict[str, float]:
    """The rows of a :func:`cellulib.metrics.agreement.detection_scores` table whose F is under its floor
    (`REAL_FLOORS` by default), with that F; empty when every floor is met. Used in the real-H&E
    chapter through :func:`decoder_sentence`.

    Examples
    --------
    >>> t = pd.DataFrame({"f1": [0.6, 0.7, 0.5, 0.85]},
    ...                  index=["lymphocyte", "malignant", "normal", "detection"])
    >>> floors_missed(t)
    {'malignant': 0.7, 'normal': 0.5}
    """
    floors = REAL_FLOORS if floors is None else floors
    return {c: float(table.loc[c, "f1"]) for c, floor in floors.items()
            if float(table.loc[c, "f1"]) < floor}


#: Settings of the authors' public code (github.com/alexander-rakhlin/BreastPathQ) where it departs
#: from the paper, transcribed like `PAPER`; chapter 2 sets them beside the paper's and the book's.
AUTHORS_CODE: dict[str, Any] = {
    "disc_radius_px": 12,  # at full size, drawn before a bicubic x2 downscale
    "background_weight": 0,
    "dropout": 0.3,
    "lr_steps": (5e-4, 1e-4, 5e-5, 2e-5),
}


def paper_text(table: str, model: str, metric: str, init: str | None = "random") -> str:
    """A number of the paper as it prints it (`PAPER`'s ``text``), for a chapter's prose.

    Examples
    --------
    >>> paper_text("Table 1", "FPN decoder", "Jaccard"), paper_text("Table 2", "GBT", "MSE")
    ('0.47', '0.023 [0.019-0.026]')
    """
    sel = PAPER[(PAPER.table == table) & (PAPER.model == model) & (PAPER.metric == metric)
                & ((PAPER.init == init) if init is not None else PAPER.init.isna())]
    if len(sel) != 1:
        raise KeyError(f"the paper has no single {metric} of {model!r} ({init}) in {table}")
    return str(sel["text"].iloc[0])


def paper_range(table: str, metric: str, models: Sequence[str] = PAPER_ROWS) -> str:
    """The smallest and largest of the paper's point values of ``metric`` in ``table`` over
    ``models`` (both initialisations), as printed: ``"0.010-0.025"``.

    Examples
    --------
    >>> paper_range("Table 2", "MSE"), paper_range("Table 3", "kappa")
    ('0.010-0.025', '0.571-0.689')
    """
    sel = PAPER[(PAPER.table == table) & (PAPER.metric == metric) & PAPER.model.isin(models)]
    low = sel.loc[sel["value"].idxmin(), "text"].split(" ")[0]
    high = sel.loc[sel["value"].idxmax(), "text"].split(" ")[0]
    return f"{low}-{high}"


def book_numbers() -> dict[str, Any]:
    """The settings and paper values the chapters' prose states, read from where they are
    defined (constants, profiles, function defaults, `PAPER`), so that no chapter types them;
    keys are the glue names (:func:`glue_numbers`). Used in chapters 1-5; used in the stain-shift
    chapter.

    Examples
    --------
    >>> n = book_numbers()
    >>> n["disc_px"], n["n_features"], n["n_bins"], n["paper_j_fpn"]
    (15, 81, 101, '0.47')
    """
    import inspect

    from cellulib import constants
    from cellulib.data import breastpathq, profiles, transforms
    from cellulib.metrics import agreement
    from cellulib.models import features, losses, networks

    def default(func, name):
        return inspect.signature(func).parameters[name].default

    paper = profiles.PROFILES["paper"]
    weights = default(losses.BCEJaccardLoss, "weights")
    valid = default(breastpathq.seg_split, "valid_pct")
    gbt = features.GBT_PARAMS

    def listed(values):
        return ", ".join(f"{v:g}" for v in values[:-1]) + f" and {values[-1]:g}"

    return {
        "disc_px": int(constants.DISC_DIAMETER),
        "malignant_weight": int(weights[constants.CLASSES.index("malignant")]),
        "background_weight": int(weights[constants.BACKGROUND]),
        "train_pct": round(100 * (1 - valid)), "valid_pct": round(100 * valid),
        "fpn_level_maps": default(networks.FPNDecoder, "segmentation_channels"),
        "fpn_maps": default(networks.FPNDecoder, "segmentation_channels")
        * len(default(networks.FPNDecoder, "encoder_channels")),
        "fpn_dropout": default(networks.seg_model, "dropout"),
        "n_outputs": len(constants.CLASSES),
        "jaccard_threshold": default(losses.jaccard_metrics, "threshold"),
        "log_sigma": f"{features._MIN_SIGMA:g} to {features._MAX_SIGMA:g}",
        "n_features": len(features.FEATURE_NAMES),
        "area_thresholds": listed(features.AREA_THRESHOLDS),
        "n_area_thresholds": len(features.AREA_THRESHOLDS),
        "n_blob_thresholds": len(features.BLOB_THRESHOLDS),
        "top_threshold": max(features.AREA_THRESHOLDS),
        "gbt_rounds": gbt["num_iterations"], "gbt_lr": gbt["learning_rate"],
        "gbt_depth": gbt["max_depth"], "gbt_leaves": gbt["num_leaves"],
        "n_bins": constants.N_BINS, "bin_step": 1 / (constants.N_BINS - 1),
        "detection_radius": agreement.DETECTION_RADIUS,
        "mpp": constants.MPP,
        "fpn_stride": networks.ResNetELUEncoder.strides[0],
        "hed_pct": round(100 * default(transforms.HEDJitter, "p")),
        "hed_scale": default(transforms.HEDJitter, "scale"),
        "hed_shift": default(transforms.HEDJitter, "shift"),
        "paper_seg_epochs": paper["seg_epochs"], "paper_crop": paper["crop"],
        "paper_patch_px": paper["size"],
        "paper_seg_side": profiles.seg_scale_size(paper["size"], paper["downscale"]),
        "code_disc_radius": AUTHORS_CODE["disc_radius_px"],
        "code_disc_diameter": 2 * AUTHORS_CODE["disc_radius_px"] / constants.SEG_DOWNSCALE,
        "code_background_weight": AUTHORS_CODE["background_weight"],
        "code_dropout": AUTHORS_CODE["dropout"],
        "code_lr_steps": ", ".join(f"{v:.0e}".replace("e-0", "e-") for v in AUTHORS_CODE["lr_steps"]),
        "paper_j_fpn": paper_text("Table 1", "FPN decoder", "Jaccard"),
        "paper_j_unet": paper_text("Table 1", "U-Net decoder", "Jaccard"),
        "paper_resnet50_random": paper_text("Table 2", "ResNet50 (R)", "MSE").split(" ")[0],
        "paper_resnet50_imagenet": paper_text("Table 2", "ResNet50 (R)", "MSE",
                                              "imagenet").split(" ")[0],
        "paper_pk_pathologists": paper_text("challenge", "pathologist vs pathologist", "PK", None),
        "paper_mse_range": paper_range("Table 2", "MSE"),
        "paper_kappa_range": paper_range("Table 3", "kappa"),
    }


def glue_numbers(values: Mapping[str, Any]) -> None:
    """Glue each of ``values`` under its key for the chapter's prose (myst-nb ``glue``, not
    displayed). Used in chapters 1-5, with :func:`book_numbers`; used in the stain-shift chapter."""
    from myst_nb import glue

    for name, value in values.items():
        glue(name, value, display=False)


class Estimate(NamedTuple):
    """A statistic with its 95% confidence interval; unpacks as ``value, ci_low, ci_high``."""

    value: float
    ci_low: float
    ci_high: float


# --------------------------------------------------------------------------------------------
# the mean predictor and "learned"


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
    through :func:`cellulib.reporting.report.mse_summary` and by
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
    :func:`cellulib.reporting.report.mse_summary`.
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


def learned_sentence(summary: pd.DataFrame, names: Sequence[str] | None = None) -> str:
    """One clause per model saying whether it learned, with the numbers that decide it.

    E.g. "GBT has learned (95% CI of its MSE 0.0081-0.0120, below the mean predictor's 0.0402)".
    ``summary`` is :func:`mse_summary` with a mean predictor. SPEC 5.1; used in chapters 3 and 4.
    """
    if MEAN_PREDICTOR not in summary.index:
        return "no mean predictor was given, so whether the models learned is not known"
    base = summary.loc[MEAN_PREDICTOR, "mse"]
    names = [n for n in (names or summary.index) if n != MEAN_PREDICTOR]
    parts = []
    for name in names:
        row = summary.loc[name]
        ci = f"95% CI of its MSE {row['ci_low']:.4f}-{row['ci_high']:.4f}"
        if row["learned"]:
            parts.append(f"{name} has learned ({ci}, below the mean predictor's {base:.4f})")
        elif row["n"] < MIN_PATCHES:
            parts.append(f"{name} cannot be shown to have learned (only {row['n']} validation "
                         "patches)")
        else:
            parts.append(f"{name} has not learned ({ci} reaches the mean predictor's {base:.4f})")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# paired comparisons


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
    used in chapters 3, 4 and 5 through :func:`cellulib.reporting.report.compare`.

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


def verdict(difference: Estimate, learned_a: bool, learned_b: bool,
            lower_is_better: bool = True) -> str:
    """The verdict on the paper's claim "A is better than B" (SPEC 5.1).

    ``difference`` is A minus B with its CI (:func:`paired_mse_difference`: lower is better).
    "holds" when both learned and the CI lies entirely on A's side of 0, "does not hold" when both
    learned and it lies entirely on B's side, else "undecided". Used in chapter 5, and in chapters 3
    and 4 through :func:`cellulib.reporting.report.compare`.

    Examples
    --------
    >>> verdict(Estimate(-0.004, -0.006, -0.002), True, True)
    'holds'
    >>> verdict(Estimate(-0.004, -0.006, -0.002), True, False)
    'undecided'
    """
    if not (learned_a and learned_b):
        return "undecided"
    lo, hi = (difference.ci_low, difference.ci_high) if lower_is_better else (
        -difference.ci_high, -difference.ci_low)
    if hi < 0:
        return "holds"
    if lo > 0:
        return "does not hold"
    return "undecided"


def learned_count(summary: pd.DataFrame, names: Sequence[str], what: str) -> str:
    """How many of the models ``names`` learned (:func:`mse_summary`), and which:
    ``"2 of the 2 segmentation routes learned (GBT, ResNet34 (SR))"``, ``what`` naming the
    models. Used in chapter 3."""
    ok = [name for name in names if summary.loc[name, "learned"]]
    return (f"{len(ok)} of the {len(names)} {what} learned"
            + (f" ({', '.join(ok)})" if ok else ""))


def importance_caveat(summary: pd.DataFrame, model: str = "GBT") -> str:
    """What a feature ranking of ``model`` says, given whether the model learned
    (:func:`mse_summary`): what its predictions rest on, or mostly noise. Used in chapter 3."""
    if summary.loc[model, "learned"]:
        return f"{model} has learned, so this ranking says what its predictions rest on."
    return (f"{model} has not learned at this budget (the 95% CI of its MSE reaches the mean "
            "predictor's), so this ranking reflects noise more than what predicts cellularity.")


def schedule_text(settings: Mapping[str, Any], prefix: str = "direct") -> str:
    """The learning-rate schedule of a profile's ``{prefix}`` models in words
    (``{prefix}_schedule``, ``{prefix}_lr``): one-cycle with its peak, or a rate decaying tenfold.
    Used in chapter 4."""
    lr = settings[f"{prefix}_lr"]
    if settings[f"{prefix}_schedule"] == "one_cycle":
        return f"a one-cycle schedule (peak learning rate {lr:g})"
    return f"a learning rate decaying from {lr:g} to {lr / 10:g}"


def _not_learned(summary: pd.DataFrame, names: Sequence[str]) -> list[str]:
    return [n for n in names if not summary.loc[n, "learned"]]


def compare(preds: Mapping[str, pd.DataFrame], better: str, worse: str, train_mean: float,
            n_boot: int = 2000, seed: int = 0, summary: pd.DataFrame | None = None
            ) -> dict[str, Any]:
    """Test the paper's claim that model ``better`` has a lower MSE than model ``worse``.

    Combines :func:`mse_summary` (who learned), :func:`paired_mse_difference` and :func:`verdict`
    into the pieces of a sentence a chapter glues: ``phrase`` is "beats", "does worse than",
    "cannot be told apart from" or "cannot be ranked against" (when one of them has not learned);
    ``detail`` gives the MSEs and the CI of the difference; ``sentence`` is
    ``f"{better} {phrase} {worse} ({detail})"``. SPEC 5.1; used in chapters 4 and 5.

    Returns
    -------
    dict
        ``better``, ``worse``, ``mse_better``, ``mse_worse``, ``difference`` (:class:`Estimate`,
        better minus worse), ``learned_better``, ``learned_worse``, ``verdict``, ``phrase``,
        ``detail``, ``sentence``.
    """
    if summary is None or MEAN_PREDICTOR not in summary.index:
        summary = mse_summary(preds, train_mean, n_boot=n_boot, seed=seed)
    diff = paired_mse_difference(preds[better], preds[worse], n_boot=n_boot, seed=seed)
    la, lb = bool(summary.loc[better, "learned"]), bool(summary.loc[worse, "learned"])
    result = verdict(diff, la, lb)
    detail = (f"MSE {summary.loc[better, 'mse']:.4f} vs {summary.loc[worse, 'mse']:.4f}, "
              f"difference {diff.value:+.4f}, 95% CI {diff.ci_low:+.4f} to {diff.ci_high:+.4f}")
    stuck = _not_learned(summary, (better, worse))
    if stuck:
        phrase = "cannot be ranked against"
        who = " and ".join(stuck)
        detail += (f"; {who} {'has' if len(stuck) == 1 else 'have'} not learned: the 95% CI "
                   f"of the MSE reaches the mean predictor's "
                   f"{summary.loc[MEAN_PREDICTOR, 'mse']:.4f}")
    else:
        phrase = claim_words(result, "beats", "does worse than", "cannot be told apart from")
        detail += ", which includes 0" if result == "undecided" else ""
    return {"better": better, "worse": worse, "mse_better": float(summary.loc[better, "mse"]),
            "mse_worse": float(summary.loc[worse, "mse"]), "difference": diff,
            "learned_better": la, "learned_worse": lb, "verdict": result, "phrase": phrase,
            "detail": detail, "sentence": f"{better} {phrase} {worse} ({detail})"}


def route_cost_sentence(comparison: Mapping[str, Any]) -> str:
    """What the interpretable route costs in accuracy, from :func:`compare` of the best
    segmentation-route model (``better``) against the best direct one: nothing (it is the more
    accurate), its paired MSE difference with the CI, or that the numbers cannot tell. Used in
    chapter 5."""
    diff = comparison["difference"]
    return {"holds": "Here the interpretable route costs no accuracy: it is the more accurate one.",
            "does not hold": (f"Here the interpretable route costs {diff.value:.4f} in MSE (95% CI "
                              f"{diff.ci_low:.4f} to {diff.ci_high:.4f})."),
            "undecided": ("Whether the interpretable route costs accuracy cannot be told from these "
                          "numbers.")}[comparison["verdict"]]


# --------------------------------------------------------------------------------------------
# regression to the mean


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
    :func:`cellulib.reporting.report.regression_to_mean_sentence`.
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


def regression_to_mean_sentence(preds: Mapping[str, pd.DataFrame], summary: pd.DataFrame) -> str:
    """What the errors by bin say about regression to the mean, for the models that learned only.

    A model that has not learned has not told low from high cellularity apart, so its errors by
    bin would show "regression to the mean" (or its opposite) without meaning anything; such
    models are left out, and when none learned the sentence says so. Used in chapter 4.
    """
    if MEAN_PREDICTOR not in summary.index:
        return "Without a mean predictor we cannot tell which models learned, so this is not analysed."
    ok = [n for n in preds if summary.loc[n, "learned"]]
    if not ok:
        return ("None of the models has learned (every MSE's 95% CI reaches the mean predictor's "
                f"{summary.loc[MEAN_PREDICTOR, 'mse']:.4f}), so their errors by bin cannot "
                "show regression to the mean here.")
    bias = bias_by_bin({n: preds[n] for n in ok})
    low, high = bias.columns[0], bias.columns[-1]
    parts = []
    for name, row in bias.iterrows():
        lo_txt = "no patch" if math.isnan(row[low]) else f"{row[low]:+.3f}"
        hi_txt = "no patch" if math.isnan(row[high]) else f"{row[high]:+.3f}"
        sign = (not math.isnan(row[low]) and not math.isnan(row[high]) and row[low] > 0 > row[high])
        parts.append(f"{name}: {lo_txt} in the lowest bin and {hi_txt} in the highest"
                     + (" (the signature)" if sign else ""))
    skipped = [n for n in preds if n not in ok]
    tail = (f" {', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} left out: "
            f"{'it has' if len(skipped) == 1 else 'they have'} not learned.") if skipped else ""
    return "Mean error by bin for the models that learned: " + "; ".join(parts) + "." + tail


# --------------------------------------------------------------------------------------------
# segmentation: per-image Jaccard for Table 1's comparison


def segmentation_counts(seg, root, threshold: float = 0.5) -> pd.DataFrame:
    """Per validation image and nucleus class: intersection and union at ``threshold``.

    Rebuilds the validation patches on which the segmentation network was scored (the split of
    :func:`cellulib.data.breastpathq.cells_split` with the run's seed, centre crops of the run's ``crop`` after
    its ``downscale``, discs of its ``disc_diameter``) and counts, per image, the pixels of each
    nucleus class in the prediction, the weak mask, both, and either. Summed over all images and
    averaged over the classes they give the run's ``jaccard_nuclei`` (paper Table 1). Used in
    chapter 5 through :func:`cellulib.reporting.report.findings` (the FPN-vs-U-Net finding).

    Parameters
    ----------
    seg : cellulib.training.train.TrainResult
        A trained segmentation network (``settings`` and ``meta["params"]["seed"]``).
    root : path
        The data folder it was trained on.

    Returns
    -------
    pandas.DataFrame
        One row per (image, class): ``image``, ``cls``, ``intersection``, ``union``, ``target``
        (mask pixels) and ``pixels`` (pixels of the crop).
    """
    import torch

    from cellulib.constants import NUCLEUS_CLASSES
    from cellulib.data import breastpathq

    settings = seg.settings
    params = seg.meta.get("params") or {}
    seed = int(params.get("seed", 0))
    cells = breastpathq.read_cells(root)
    _, valid_idx = breastpathq.cells_split(cells, seed=seed, root=root,
                                    validation=params.get("validation", "patients"))
    valid = cells.iloc[valid_idx]
    ds = breastpathq.SegDataset(valid["image_path"].tolist(), valid["xml_path"].tolist(),
                         size=settings["crop"], downscale=settings["downscale"],
                         diameter=settings["disc_diameter"], train=False)
    model = seg.model.eval()
    rows = []
    with torch.inference_mode():
        for i, name in enumerate(valid["name"]):
            x, mask = ds[i]
            pred = torch.sigmoid(model(x[None].float()))[0] > threshold
            target = mask > 0.5
            for c, cls in enumerate(NUCLEUS_CLASSES):
                p, t = pred[c], target[c]
                rows.append({"image": name, "cls": cls, "intersection": int((p & t).sum()),
                             "union": int((p | t).sum()), "target": int(t.sum()),
                             "pixels": int(t.numel())})
    return pd.DataFrame(rows)


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
    through :func:`cellulib.reporting.report.findings`.

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
    :func:`cellulib.reporting.report.findings`.
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


# --------------------------------------------------------------------------------------------
# the findings table


def table1(results: Mapping[tuple[str, str], Any]) -> pd.DataFrame:
    """Paper Table 1 with ours beside it: mean nuclear Jaccard, {random, ImageNet} x {U-Net, FPN}.

    ``results`` maps ``(init, decoder)`` (init in ``random``/``imagenet``, decoder in
    ``unet``/``fpn``) to a training result (:class:`cellulib.training.train.TrainResult`), or to None for a run that was not made (shown as
    "not run", never as a number). Used in chapters 2 and 5.
    """
    paper = PAPER[PAPER.table == "Table 1"].set_index(["init", "model"])["value"]
    names = {"unet": "U-Net decoder", "fpn": "FPN decoder"}
    rows = []
    for init, label in (("random", "Random"), ("imagenet", "ImageNet")):
        row = {"initialisation": label}
        for dec in ("unet", "fpn"):
            res = results.get((init, dec))
            short = "U-Net" if dec == "unet" else "FPN"
            row[f"{short} (paper)"] = f"{paper[(init, names[dec])]:.2f}"
            row[f"{short} (ours)"] = "not run" if res is None else f"{res.scores['jaccard_nuclei']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("initialisation")


def _paper_value(table: str, model: str, init: str, metric: str) -> float:
    sel = PAPER[(PAPER.table == table) & (PAPER.model == model) & (PAPER.init == init)
                & (PAPER.metric == metric)]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def _mse_finding(label: str, paper: str, preds, better: str, worse: str, train_mean: float,
                 summary: pd.DataFrame, n_boot: int, seed: int, note: str = "") -> dict:
    cmp = compare(preds, better, worse, train_mean, n_boot=n_boot, seed=seed, summary=summary)
    why = {"holds": "both learned; the CI of the difference excludes 0",
           "does not hold": "both learned; the CI of the difference excludes 0 on the other side",
           }.get(cmp["verdict"])
    if why is None:
        stuck = _not_learned(summary, (better, worse))
        why = (f"{' and '.join(stuck)} did not learn" if stuck
               else "the CI of the difference includes 0")
    return {"paper's finding": label, "verdict": cmp["verdict"],
            "ours": f"{better} vs {worse}: {cmp['detail']}", "paper": paper,
            "why": why + (f"; {note}" if note else "")}


def decoder_finding(seg, root=None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The paper's Table 1 finding "the FPN decoder beats the U-Net decoder", decided by a CI.

    ``seg`` maps ``"fpn"`` and ``"unet"`` to their training results (random init). With ``root``
    the per-image Jaccard (:func:`segmentation_counts`) gives a paired bootstrap CI of the
    difference (:func:`paired_jaccard_difference`) and each network's "learned" verdict
    (:func:`jaccard_summary`); without it the finding stays undecided. Returns one row of
    :func:`findings` (``paper's finding``, ``verdict``, ``ours``, ``paper``, ``why``). SPEC 5.1;
    used in chapter 2, and in chapter 5 through :func:`cellulib.reporting.report.findings`.
    """
    j = {d: _paper_value("Table 1", f"{n} decoder", "random", "Jaccard")
         for d, n in (("fpn", "FPN"), ("unet", "U-Net"))}
    row = {"paper's finding": "FPN decoder beats U-Net decoder (Table 1)",
           "paper": f"Jaccard {j['fpn']:.2f} vs {j['unet']:.2f} (random init)"}
    if root is None:
        fpn, unet = seg["fpn"].scores["jaccard_nuclei"], seg["unet"].scores["jaccard_nuclei"]
        return row | {"verdict": "undecided", "ours": f"Jaccard {fpn:.3f} vs {unet:.3f}",
                      "why": "no per-image Jaccard, so no confidence interval"}
    counts = {d: segmentation_counts(seg[d], root) for d in ("fpn", "unet")}
    js = jaccard_summary(counts, n_boot=n_boot, seed=seed)
    diff = paired_jaccard_difference(counts["fpn"], counts["unet"], n_boot=n_boot, seed=seed)
    result = verdict(diff, js.loc["fpn", "learned"], js.loc["unet", "learned"],
                     lower_is_better=False)
    stuck = [{"fpn": "FPN", "unet": "U-Net"}[d] for d in ("fpn", "unet")
             if not js.loc[d, "learned"]]
    if result == "holds":
        why = "both learned; the CI of the difference excludes 0"
    elif result == "does not hold":
        why = "both learned; the CI of the difference excludes 0 on the other side"
    elif js.loc["fpn", "n"] < MIN_PATCHES:
        why = f"only {js.loc['fpn', 'n']} validation image(s), too few for a confidence interval"
    elif stuck:
        why = (f"{' and '.join(stuck)} did not learn: the Jaccard's CI does not clear "
               f"the all-pixels baseline ({js.loc['fpn', 'baseline']:.3f})")
    else:
        why = "the CI of the difference includes 0"
    ours = (f"Jaccard {js.loc['fpn', 'jaccard']:.3f} vs {js.loc['unet', 'jaccard']:.3f}, "
            f"difference {diff.value:+.3f}, 95% CI {diff.ci_low:+.3f} to {diff.ci_high:+.3f} "
            f"over {js.loc['fpn', 'n']} validation image(s)")
    return row | {"verdict": result, "ours": ours, "why": why}


def findings(preds: Mapping[str, pd.DataFrame], train_mean: float,
             importance: pd.Series | None = None, seg: Mapping[str, Any] | None = None,
             root=None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The paper's findings, each with a verdict decided by our confidence intervals (SPEC 5.1).

    Rows, where their inputs are given:

    - FPN decoder beats U-Net decoder (Table 1): paired bootstrap over validation images of the
      mean nuclear Jaccard (``seg`` maps ``"fpn"``/``"unet"`` to segmentation results, ``root``
      is their data; :func:`segmentation_counts`, :func:`jaccard_summary`);
    - SR beats GBT (Table 2), the best direct model beats both segmentation routes, and
      Xception (C) beats Xception (R): :func:`compare` on the MSE;
    - the top GBT feature is from the malignant channel (Fig. 9; ``importance`` is the gain per
      feature): decided only when GBT has learned, since a model that has not learned ranks
      features by noise.

    A verdict is "holds" only when both models learned and the CI of the difference excludes 0
    on the paper's side, "does not hold" when both learned and it excludes 0 on the other side,
    else "undecided". Used in chapter 5.

    Returns
    -------
    pandas.DataFrame
        Index ``paper's finding``; columns ``verdict`` (one of :data:`VERDICTS`), ``ours`` (our
        numbers with CIs), ``paper`` (the paper's numbers) and ``why``.
    """
    summary = mse_summary(preds, train_mean, n_boot=n_boot, seed=seed)
    rows = []
    if seg is not None and {"fpn", "unet"} <= set(seg):
        rows.append(decoder_finding(seg, root, n_boot=n_boot, seed=seed))
    if {"GBT", "ResNet34 (SR)"} <= set(preds):
        paper = (f"MSE {_paper_value('Table 2', 'ResNet34 (SR)', 'random', 'MSE'):.3f} vs "
                 f"{_paper_value('Table 2', 'GBT', 'random', 'MSE'):.3f} (random init)")
        rows.append(_mse_finding("SR beats GBT (Table 2)", paper, preds, "ResNet34 (SR)", "GBT",
                                 train_mean, summary, n_boot, seed))
    direct = [n for n in _DIRECT if n in preds]
    segm = [n for n in _SEGMENTATION if n in preds]
    if direct and segm:
        best_d = min(direct, key=lambda n: summary.loc[n, "mse"])
        best_s = min(segm, key=lambda n: summary.loc[n, "mse"])
        p_d = min(_paper_value("Table 2", n, "random", "MSE") for n in _DIRECT)
        p_s = min(_paper_value("Table 2", n, "random", "MSE") for n in _SEGMENTATION)
        p_di = min(_paper_value("Table 2", n, "imagenet", "MSE") for n in _DIRECT)
        p_si = min(_paper_value("Table 2", n, "imagenet", "MSE") for n in _SEGMENTATION)
        paper = (f"best MSE {p_d:.3f} vs {p_s:.3f} (random init), {p_di:.3f} vs {p_si:.3f} "
                 "(ImageNet)")
        rows.append(_mse_finding("the best direct model beats both segmentation routes", paper,
                                 preds, best_d, best_s, train_mean, summary, n_boot, seed,
                                 note="each side's best is picked by its MSE on these patches"))
    if {"Xception (C)", "Xception (R)"} <= set(preds):
        paper = (f"MSE {_paper_value('Table 2', 'Xception (C)', 'random', 'MSE'):.3f} vs "
                 f"{_paper_value('Table 2', 'Xception (R)', 'random', 'MSE'):.3f} (random init)")
        rows.append(_mse_finding("Xception (C) beats Xception (R) (random init)", paper, preds,
                                 "Xception (C)", "Xception (R)", train_mean, summary, n_boot,
                                 seed))
    if importance is not None and len(importance):
        top = pd.Series(importance).sort_values(ascending=False).index[0]
        gbt_learned = "GBT" in summary.index and bool(summary.loc["GBT", "learned"])
        if gbt_learned:
            result = "holds" if str(top).startswith("malignant") else "does not hold"
            why = "GBT learned; the ranking is that of the fitted trees"
        else:
            result = "undecided"
            why = "GBT did not learn, so its feature ranking carries no information"
        rows.append({"paper's finding": "the top GBT feature is from the malignant channel "
                     "(Fig. 9)", "verdict": result, "ours": str(top),
                     "paper": "malignant_activation_0.50", "why": why})
    out = pd.DataFrame(rows, columns=["paper's finding", "verdict", "ours", "paper", "why"])
    return out.set_index("paper's finding")


# --------------------------------------------------------------------------------------------
# Tables 2 and 3


def results_table(preds: dict[str, pd.DataFrame], n_boot: int = 2000, seed: int = 0,
                  all_paper_rows: bool = False, train_mean: float | None = None) -> pd.DataFrame:
    """Tables 2 and 3 of the paper with ours beside them: MSE, kappa, ICC(2,1) and PK with 95% CIs.

    ``preds`` maps a model name (the paper's row names, e.g. ``"GBT"``, ``"Xception (C)"``) to its
    validation predictions (``y_true``, ``y_pred``; see :func:`cellulib.training.train.predictions`). Our
    models are trained from random initialisation, so our MSE sits beside the paper's random-init
    column and the paper's ImageNet column is shown for reference; the paper's kappa and ICC are
    ImageNet-only. With ``all_paper_rows`` every row of the paper appears, "not run" where we have
    no model. With ``train_mean`` (the training labels' mean) a :data:`MEAN_PREDICTOR` row is
    scored like a model and a ``learned`` column says "yes" when the upper end of a model's MSE CI
    is below the mean predictor's MSE (SPEC 5.1). Paper section 3.5; SPEC 5. Used in chapters 3,
    4 and 5.
    """
    from cellulib.metrics.agreement import evaluate, format_ci

    paper = PAPER.set_index(["table", "model", "init", "metric"])["text"]

    def paper_text(table, model, init, metric):
        key = (table, model, init, metric)
        return paper[key] if key in paper.index else "-"

    scored = dict(preds)
    if train_mean is not None:
        scored[MEAN_PREDICTOR] = mean_predictor_predictions(_first_truth(preds), train_mean)
    names = list(PAPER_ROWS) if all_paper_rows else []
    names += [n for n in scored if n not in names]
    tables = {n: evaluate(p.y_true, p.y_pred, n_boot=n_boot, seed=seed) for n, p in scored.items()}
    mean_mse = tables[MEAN_PREDICTOR].loc["MSE", "value"] if train_mean is not None else None
    rows = []
    for name in names:
        row = {"model": name}
        if name in tables:
            table = tables[name]
            for metric, label in (("MSE", "MSE"), ("kappa", "kappa"), ("ICC(2,1)", "ICC"),
                                  ("PK", "PK")):
                r = table.loc[metric]
                row[f"{label} (ours)"] = format_ci(r.value, r.ci_low, r.ci_high)
            if mean_mse is not None and name != MEAN_PREDICTOR:
                ok = learned(table.loc["MSE", "ci_high"], mean_mse, len(scored[name]))
                row["learned"] = "yes" if ok else "no"
        else:
            for label in ("MSE", "kappa", "ICC", "PK"):
                row[f"{label} (ours)"] = "not run"
        row.setdefault("learned", "-")
        row["MSE (paper, random)"] = paper_text("Table 2", name, "random", "MSE")
        row["MSE (paper, ImageNet)"] = paper_text("Table 2", name, "imagenet", "MSE")
        row["kappa (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "kappa")
        row["ICC (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "ICC")
        rows.append(row)
    order = ["model", "MSE (ours)", "MSE (paper, random)", "MSE (paper, ImageNet)", "kappa (ours)",
             "kappa (paper, ImageNet)", "ICC (ours)", "ICC (paper, ImageNet)", "PK (ours)"]
    if train_mean is not None:
        order.insert(2, "learned")
    return pd.DataFrame(rows)[order].set_index("model")


# --------------------------------------------------------------------------------------------
# nucleus detection on real H&E (the real-H&E chapter)

#: Display names of the detection classes on BRCA-M2C (SPEC 1.4): channel 0 ("normal", normal
#: epithelium in BreastPathQ) holds its stromal nuclei.
BRCA_M2C_NAMES = {"lymphocyte": "lymphocyte", "malignant": "tumour/epithelial",
                  "normal": "stromal", "detection": "detection (all classes)"}


def _f_boot(counts: pd.DataFrame, cls: str, images: list, idx: np.ndarray) -> np.ndarray:
    part = counts[counts["class"] == cls].set_index("image").loc[images, ["tp", "fp", "fn"]]
    from cellulib.metrics.agreement import precision_recall_f1

    tp, fp, fn = (part[c].to_numpy()[idx].sum(axis=-1) for c in ("tp", "fp", "fn"))
    return precision_recall_f1(tp, fp, fn)[2]


def paired_detection_difference(counts_a: pd.DataFrame, counts_b: pd.DataFrame,
                                cls: str = "detection", n_boot: int = 2000, seed: int = 0,
                                alpha: float = 0.05) -> Estimate:
    """Micro F of detector A minus B for one class on the same images, paired bootstrap 95% CI.

    ``counts_a``/``counts_b``: per-image counts from :func:`cellulib.metrics.agreement.detection_counts`.
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


def best_detector(scores: Mapping[str, pd.DataFrame]) -> str:
    """The detector to keep: the highest mean of pooled and tumour (``malignant``) F on the
    validation split. Cellularity rests on the tumour nuclei, and the other classes only need to be
    found. ``scores`` maps a name to its :func:`cellulib.metrics.agreement.detection_scores` table. Used in the
    real-H&E and stain-shift chapters through :func:`choose_detector`."""
    if not scores:
        raise ValueError("best_detector needs at least one detector's scores")
    return max(scores, key=lambda name: float(scores[name].loc["detection", "f1"])
               + float(scores[name].loc["malignant", "f1"]))


def choose_detector(models: Mapping[str, Any], cells: pd.DataFrame,
                    threshold: float | None = None) -> tuple[str, dict[str, pd.DataFrame]]:
    """The real-H&E chapter's choice between segmentation networks: each model (name -> model
    file) detects the nuclei of the annotated images ``cells`` (the held-out patients,
    :func:`cellulib.inference.detect.score_annotated`, ``threshold`` None: ``cellulib detect``'s default),
    and :func:`best_detector` keeps one. Returns its name and every model's
    :func:`cellulib.metrics.agreement.detection_scores` table. Used in the real-H&E and stain-shift
    chapters."""
    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.inference.detect import score_annotated

    threshold = DETECTION_THRESHOLD if threshold is None else threshold
    scores = {name: score_annotated(model, cells, threshold, progress=False).scores()
              for name, model in models.items()}
    return best_detector(scores), scores


def detection_table(scores: Mapping[str, pd.DataFrame], reference: Mapping[str, float] | None = None,
                    reference_name: str = "MCSpatNet F (test)",
                    names: Mapping[str, str] | None = None,
                    references: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """Precision, recall and F per class (and pooled) of several detectors side by side, with
    published F beside them: ``reference`` in the column ``reference_name``, and each of
    ``references`` (column name -> F by class, e.g. `PUBLISHED_F`). ``scores`` maps a detector's
    name to its :func:`cellulib.metrics.agreement.detection_scores` table. Used in the real-H&E chapter."""
    names = dict(BRCA_M2C_NAMES if names is None else names)
    first = next(iter(scores.values()))
    out = pd.DataFrame(index=[names.get(c, c) for c in first.index])
    for model, table in scores.items():
        for col, short in (("precision", "P"), ("recall", "R"), ("f1", "F")):
            out[f"{model} {short}"] = [round(float(v), 3) for v in table[col]]
    published = dict(references or {})
    if reference is not None:
        published = {reference_name: reference, **published}
    for column, values in published.items():
        out[column] = [values.get(c, np.nan) for c in first.index]
    out.index.name = "class"
    return out


def claim_words(verdict_: str, holds: str = "holds", does_not_hold: str = "does not hold",
                undecided: str = "is undecided") -> str:
    """A :func:`verdict` in words: by default the verb of a sentence on one of the paper's claims
    ("holds", "does not hold", "is undecided"), or the words a table or sentence uses for each
    verdict (a comparison's "beats", "does worse than", "cannot be told apart from"; a remedy's
    "helps", "hurts", "undecided"). The one place where a verdict becomes words. Used in chapter 2,
    and in the real-H&E chapter through :func:`decoder_sentence`.

    Examples
    --------
    >>> claim_words("undecided"), claim_words("holds", "helps", "hurts", "undecided")
    ('is undecided', 'helps')
    """
    words = {"holds": holds, "does not hold": does_not_hold, "undecided": undecided}
    if verdict_ not in words:
        raise ValueError(f"a verdict is one of {VERDICTS}, got {verdict_!r}")
    return words[verdict_]


def _roles(cells: pd.DataFrame, train_idx, val_idx) -> pd.Series:
    role = pd.Series("official test", index=cells.index)
    role.iloc[train_idx], role.iloc[val_idx] = "training", "validation (held-out patients)"
    return role


def brca_m2c_table(cells: pd.DataFrame, train_idx, val_idx,
                   names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Images, patients and annotated nuclei per class of a BRCA-M2C copy
    (:func:`cellulib.data.breastpathq.read_cells`), by what they are used for: training and validation
    (``train_idx``, ``val_idx``, :func:`cellulib.data.breastpathq.cells_split`), the rest the official test
    split. Used in the real-H&E chapter."""
    from cellulib.data.breastpathq import patient_code

    names = BRCA_M2C_NAMES if names is None else names
    role, patient = _roles(cells, train_idx, val_idx), cells["name"].map(patient_code)
    counts = (cells.groupby(role, sort=False)[["n_lymphocyte", "n_malignant", "n_normal"]].sum()
              .rename(columns=lambda c: names[c[2:]]))
    counts.insert(0, "patients", patient.groupby(role, sort=False).nunique())
    counts.insert(0, "images", role.value_counts(sort=False))
    counts.index.name = "used for"
    return counts


def brca_m2c_sentence(cells: pd.DataFrame, train_idx, val_idx, report_split: str) -> str:
    """How the real-H&E chapter splits a BRCA-M2C copy, in words: the held-out patients, the
    patients the official validation split would share with training, and which split the results
    are on (``report_split``, :func:`cellulib.reporting.realtissue.report_images`). Used in the real-H&E
    chapter."""
    from cellulib.data.breastpathq import patient_code

    patient = cells["name"].map(patient_code)
    official = cells["split"].to_numpy()
    shared = sorted(set(patient[official == "train"]) & set(patient[official == "val"]))
    return (
        f"This copy holds {len(cells)} images. Their names start with the TCGA patient code "
        "(`TCGA-A7-A0DB`, ...), and images of one patient share staining, scanning and tissue, so "
        f"a network is validated here on **patients it has not seen**: {len(val_idx)} of the "
        f"{len(train_idx) + len(val_idx)} training and validation images, "
        f"{patient.iloc[val_idx].nunique()} whole patients (`cellulib.data.breastpathq.patient_split`; the "
        "same patients for every seed, so runs compare on one set). The official validation split "
        f"would share {len(shared)} patients ({', '.join(shared)}) with the official training split "
        "and flatter the network. "
        + ("The official test split (patients in neither) is present: the results below are on it; "
           "validation only chooses between the two decoders."
           if report_split == "test" else
           "The official test split (images of other patients) is not in this copy, so the results "
           "below are on the held-out patients, which also choose between the two decoders. The "
           "README says how to get the full dataset."))


def pixel_scale_sentence(nn_distance, diameters, disc: float, factor: float,
                         low_pct: int = 5) -> str:
    """Why a dataset's disc diameter and downscale suit its nuclei, in words: the distances to the
    nearest annotated neighbour (``nn_distance``, px), the nuclei's diameters (px), the disc and
    the downscale chosen, the FPN's stride and the detection radius. Used in the real-H&E
    chapter."""
    from cellulib.metrics.agreement import DETECTION_RADIUS

    nn_distance, diameters = np.asarray(nn_distance, float), np.asarray(diameters, float)
    stride, size = book_numbers()["fpn_stride"], np.median(diameters)
    return (
        f"Neighbouring nuclei sit a median {np.median(nn_distance):.1f} px apart ({low_pct}% of "
        f"them closer than {np.percentile(nn_distance, low_pct):.1f} px), and nuclei segmented from "
        f"the haematoxylin channel measure a median {size:.1f} px across. The discs here are "
        f"therefore **{disc:g} px** across, about one nucleus and less than the distance between "
        f"{100 * np.mean(nn_distance > disc):.0f}% of neighbours, so that most discs do not touch. "
        f"The images are **{'not downscaled' if factor == 1 else f'downscaled x{factor:g}'}**: "
        f"the FPN predicts on a grid {stride} times coarser than its input, where a {size:.0f} px "
        f"nucleus spans {size / stride:.1f} cells at full size and half that after a x2 downscale, "
        f"and the detection protocol below asks for centres within {DETECTION_RADIUS:g} px of the "
        "dot.")


def training_sentence(settings: Mapping[str, Any], profile: str, seconds: float) -> str:
    """How a profile's segmentation networks were trained (``settings``,
    :func:`cellulib.data.profiles.brca_m2c_profile`), and how long the two took. Used in the real-H&E
    chapter."""
    return (f"The {profile} profile trains each network for {settings['seg_epochs']} epochs of "
            f"{settings['patches_per_epoch']} random {settings['crop']}-pixel crops per image "
            f"({settings['seg_schedule'].replace('_', '-')} schedule, peak rate "
            f"{settings['seg_lr']:g}); the two took {seconds / 60:.1f} minutes together.")


def decoder_sentence(val_scores: Mapping[str, pd.DataFrame], best: str, threshold: float,
                     report_split: str, n_images: int, difference: Estimate) -> str:
    """The real-H&E chapter's choice of decoder and its test of the paper's ranking, in words:
    pooled and tumour F of FPN and U-Net on the held-out patients (``val_scores``,
    :func:`cellulib.metrics.agreement.detection_scores` tables), the decoder :func:`best_detector` keeps,
    FPN minus U-Net in pooled F on the reported split (``difference``,
    :func:`paired_detection_difference`) with its :func:`verdict`, and the floors
    (:data:`REAL_FLOORS`, :func:`floors_missed`). Used in the real-H&E chapter."""
    names = BRCA_M2C_NAMES
    f = {name: (t.loc["detection", "f1"], t.loc["malignant", "f1"]) for name, t in val_scores.items()}
    missed = {name: floors_missed(t) for name, t in val_scores.items()}
    ranking = claim_words(verdict(difference, True, True, lower_is_better=False))
    return (
        f"The held-out patients pick the **{best}** decoder by the mean of pooled and tumour F, "
        "because cellularity rests on the tumour nuclei while the other classes only need to be "
        f"found (pooled / tumour F: FPN {f['FPN'][0]:.3f} / {f['FPN'][1]:.3f}, U-Net "
        f"{f['U-Net'][0]:.3f} / {f['U-Net'][1]:.3f}; threshold {threshold:g}). On the "
        f"{report_split} split ({n_images} images), FPN minus U-Net in pooled F is "
        f"{difference.value:+.3f} (95% CI {difference.ci_low:+.3f} to {difference.ci_high:+.3f}, "
        f"paired bootstrap over images): the paper's ranking of the decoders (FPN ahead) {ranking} "
        "here for detection. This book's floors for real H&E, F at least "
        + ", ".join(f"{names[c]} {v:g}" for c, v in REAL_FLOORS.items())
        + " on the held-out patients, are "
        + " and ".join(f"**met** by {name}" if not m else f"**not met** by {name} ("
                       + ", ".join(f"{names[c]} {v:.3f}" for c, v in m.items()) + ")"
                       for name, m in missed.items()) + ". "
        "DeNuC pairs a small detector with a pathology foundation model (UNI2-h) to class the "
        f"nuclei and is scored at 40x with a {DENUC_RADIUS_PX} px radius, close to this protocol "
        "but not identical to it.")


def _weakest(scores: pd.DataFrame) -> pd.Series:
    return scores.drop(index="detection")["f1"].nsmallest(2)


def real_he_finding(best: str, scores: pd.DataFrame, minutes: float, n_train: int,
                    report_split: str) -> str:
    """The real-H&E chapter's one-line finding: the kept network's pooled and tumour F on the
    reported split (``scores``) beside MCSpatNet's, and its two weakest classes. Used in the
    real-H&E chapter."""
    names = BRCA_M2C_NAMES
    return (f"Trained for {minutes:.0f} minutes on {n_train} real BRCA-M2C patches, the {best} "
            f"network detects nuclei with F {scores.loc['detection', 'f1']:.2f} and tumour nuclei "
            f"with F {scores.loc['malignant', 'f1']:.2f} on the {report_split} split (MCSpatNet on "
            f"the test split: {MCSPATNET_F['detection']:.2f} and {MCSPATNET_F['malignant']:.2f}); "
            "its weakest classes are "
            + " and ".join(f"{names[c]} (F {v:.2f})" for c, v in _weakest(scores).items()) + ".")


def confusion_sentence(confusion: pd.DataFrame) -> str:
    """A :func:`cellulib.metrics.agreement.class_confusion` table in words: the share of matched nuclei given
    their annotated class, per class, and the largest confusion. Used in the real-H&E chapter."""
    from cellulib.metrics.agreement import DETECTION_CLASSES

    names, classes = BRCA_M2C_NAMES, list(DETECTION_CLASSES)
    matched = confusion.loc[classes, classes]
    right = {c: matched.loc[c, c] / matched.loc[c].sum() for c in classes}
    off = matched.where(~np.eye(len(classes), dtype=bool)).stack()
    (worst_true, worst_called), n_worst = off.idxmax(), int(off.max())
    return (f"Of the matched nuclei, "
            f"{100 * np.trace(matched.to_numpy()) / matched.to_numpy().sum():.0f}% get their "
            "annotated class (" + ", ".join(f"{names[c]} {100 * v:.0f}%" for c, v in right.items())
            + f"). The largest confusion is {names[worst_true]} nuclei called "
            f"{names[worst_called]}: {n_worst} of {int(matched.loc[worst_true].sum())}.")


def jaccard_sentence(jaccard: pd.DataFrame) -> str:
    """The mean Jaccard of the FPN and U-Net columns of ``jaccard`` (rows named as in
    :data:`BRCA_M2C_NAMES`) beside the paper's Table 1, in words. Used in the real-H&E chapter."""
    numbers = book_numbers()
    return (f"The mean over the three classes is {jaccard.loc['mean (nuclei)', 'FPN']:.3f} for FPN "
            f"and {jaccard.loc['mean (nuclei)', 'U-Net']:.3f} for U-Net (the paper, BreastPathQ "
            f"with random initialisation: {numbers['paper_j_fpn']} and {numbers['paper_j_unet']}). "
            "A detector can count nuclei well with a modest Jaccard: a disc is not a nucleus, and "
            "only the centre matters for detection.")


def fraction_sentence(fractions: pd.DataFrame) -> str:
    """Agreement of the detected with the annotated tumour share per image (columns ``annotated``
    and ``detected``): ICC(2,1) with its 95% CI and the mean absolute difference. Used in the
    real-H&E chapter."""
    from cellulib.metrics.agreement import icc, icc_ci

    ratings = fractions[["annotated", "detected"]].to_numpy()
    lo, hi = icc_ci(ratings, "ICC2")
    return (f"Over {len(fractions)} images the agreement is ICC(2,1) {icc(ratings, 'ICC2'):.2f} "
            f"(95% CI {lo:.2f} to {hi:.2f}); the mean absolute difference is "
            f"{np.mean(np.abs(fractions['annotated'] - fractions['detected'])):.3f}.")


def dot_examples(cells: pd.DataFrame) -> list[str]:
    """The images to show of a BRCA-M2C split: the one with the most tumour dots, the most
    lymphocytes and the most stromal dots (each once). Used in the real-H&E chapter."""
    by_name = cells.set_index("name")
    return list(dict.fromkeys(by_name[c].idxmax() for c in ("n_malignant", "n_lymphocyte", "n_normal")))


def dots_sentence(fractions: pd.DataFrame, images: Sequence[str]) -> str:
    """Dots against detections per shown image, (a), (b), ... in the order of ``images``
    (``fractions``: :attr:`cellulib.inference.detect.AnnotatedScores.fractions`). Used in the real-H&E
    chapter."""
    per_image = fractions.set_index("image").loc[list(images), ["n_annotated", "n_detected"]]
    return ("Dots and detections per image: " + "; ".join(
        f"({chr(97 + i)}) {int(r.n_annotated)} vs {int(r.n_detected)}"
        for i, r in enumerate(per_image.itertuples()))
        + ". A nucleus the annotators did not mark counts as a false positive when it is found.")


def transfer_table(scored: Mapping[tuple[str, str], Any]) -> pd.DataFrame:
    """Pooled and tumour F of networks trained on one dataset and scored on another
    (``{(trained on, scored on): AnnotatedScores}``). Used in the real-H&E chapter."""
    return pd.DataFrame([
        {"trained on": a, "scored on": b, "detection F": s.scores().loc["detection", "f1"],
         "tumour F": s.scores().loc["malignant", "f1"]} for (a, b), s in scored.items()]).round(3)


def _transfer_f(scored: Mapping[tuple[str, str], Any]) -> dict[tuple[str, str], float]:
    return {k: s.scores().loc["detection", "f1"] for k, s in scored.items()}


def transfer_sentence(scored: Mapping[tuple[str, str], Any], settings: Mapping[str, Any]) -> str:
    """A :func:`transfer_table` of the synthetic- and the BRCA-M2C-trained network in words, with
    why the synthetic one does not count nuclei (its disc and downscale, ``settings``, against the
    spacing of the synthetic nuclei). Used in the real-H&E chapter."""
    from cellulib.data.annotations import nearest_dot_distances

    f = _transfer_f(scored)
    own = scored[("synthetic", "synthetic")]
    spacing = np.median(nearest_dot_distances(own.truth)) / settings["downscale"]
    return (
        f"Trained on synthetic patches, the network finds real nuclei with pooled F "
        f"{f[('synthetic', 'BRCA-M2C')]:.2f} against {f[('BRCA-M2C', 'BRCA-M2C')]:.2f} for the "
        "real-trained one; trained on real patches, it finds synthetic nuclei with F "
        f"{f[('BRCA-M2C', 'synthetic')]:.2f} against {f[('synthetic', 'synthetic')]:.2f} for the "
        "synthetic-trained one. That last figure is low on its own data: the synthetic-trained "
        f"network keeps chapter 2's setting, the paper's {settings['disc_diameter']:g} px discs "
        f"after a x{settings['downscale']:g} downscale, where neighbouring synthetic nuclei sit a "
        f"median {spacing:.1f} px apart at that scale, so its discs merge into blobs that hold "
        f"several nuclei (it finds {len(own.pred)} centres for {len(own.truth)} dots). Such a "
        "network segments tumour area, which is what cellularity needs, but it does not count "
        "nuclei. Neither dataset stands in for the other: numbers measured on synthetic data say "
        "how the methods compare, not how well they do on real tissue.")


def real_he_summary(nn_distance, diameters, settings: Mapping[str, Any], best: str,
                    minutes: float, scores: pd.DataFrame, report_split: str,
                    scored: Mapping[tuple[str, str], Any]) -> str:
    """The real-H&E chapter's summary, one bullet each: the pixel scale (``settings`` of the
    BRCA-M2C networks), the kept network against MCSpatNet (``scores`` on the reported split) and
    the transfer between datasets (``scored``, as :func:`transfer_table`). Used in the real-H&E
    chapter."""
    from cellulib.constants import DISC_DIAMETER, SEG_DOWNSCALE

    f = _transfer_f(scored)
    disc, factor = settings["disc_diameter"], settings["downscale"]
    lines = [
        f"Real nuclei need their own pixel scale: at 20x, with nuclei a median "
        f"{np.median(diameters):.0f} px across and neighbours {np.median(nn_distance):.0f} px "
        f"apart, BRCA-M2C is segmented "
        f"{'at full size' if factor == 1 else f'after a x{factor:g} downscale'} with {disc:g} px "
        f"discs, where the paper's x{SEG_DOWNSCALE:g} downscale and {DISC_DIAMETER:g} px discs would "
        "merge neighbours.",
        f"Chapter 2's weakly supervised {best} network, trained for {minutes:.0f} minutes on real "
        f"dots, detects nuclei with F {scores.loc['detection', 'f1']:.2f} on the {report_split} "
        f"split, against {MCSPATNET_F['detection']:.2f} for MCSpatNet, a dedicated detector, on "
        "the test split" + (" (different images: compare with care)." if report_split != "test"
                            else ".")
        + f" Telling {BRCA_M2C_NAMES[_weakest(scores).index[0]]} nuclei from the others is the "
        "hard part.",
        f"Across datasets: the real-trained network finds synthetic nuclei with F "
        f"{f[('BRCA-M2C', 'synthetic')]:.2f} (real ones: {f[('BRCA-M2C', 'BRCA-M2C')]:.2f}); the "
        "synthetic-trained one, whose large discs make it segment tumour area rather than count "
        f"nuclei, reaches {f[('synthetic', 'synthetic')]:.2f} on its own data and "
        f"{f[('synthetic', 'BRCA-M2C')]:.2f} on real nuclei.",
    ]
    return "\n".join(f"- {line}" for line in lines)


# --------------------------------------------------------------------------------------------
# the data: synthetic labels and stains beside real ones (chapter 1)

#: BreastPathQ's pathologists score cellularity in steps of this size.
SCORE_STEP = 0.05


def labels_sentence(real, synthetic, gap: Mapping[str, Any], law: Mapping[str, Any],
                    score_step: float = SCORE_STEP) -> str:
    """The real BreastPathQ labels beside the synthetic ones, in words: zeros, medians and the
    two-sample KS statistic (``gap``, :func:`cellulib.data.measure.label_distance`), and how close the
    generator's law itself comes (``law``, :func:`cellulib.data.measure.law_distance`). Used in chapter
    1."""
    return (f"{100 * gap['zeros_real']:.0f}% of the real labels are 0 and "
            f"{100 * gap['zeros_synthetic']:.0f}% of the synthetic ones; the medians are "
            f"{np.median(real):.2f} and {np.median(synthetic):.2f}. The two-sample KS statistic is "
            f"{gap['ks']:.3f} (p = {gap['p']:.2g}, {gap['n_synthetic']} synthetic labels): part of "
            "the gap is the size of the synthetic set, part is that pathologists score in steps of "
            f"{score_step:g}, which a smooth law does not copy ({law['n_synthetic']:,} draws of the "
            f"law sit at KS {law['ks']:.2f}).")


def stain_sources_sentence(stats: pd.DataFrame) -> str:
    """Mean H and E optical density per source of :func:`cellulib.data.measure.compare_stains`, in words,
    and how much darker in haematoxylin the BRCA-M2C patches are than the synthetic ones when
    they are there. Used in chapter 1."""
    od = stats.groupby("source")[["H", "E"]].mean()
    return ("Mean optical densities per source: "
            + "; ".join(f"{src} H {row.H:.3f}, E {row.E:.3f}" for src, row in od.iterrows()) + ". "
            + (f"The BRCA-M2C patches are stained {od.loc['BRCA-M2C', 'H'] / od.loc['synthetic', 'H']:.1f} "
               "times as dark in haematoxylin as the synthetic ones: staining differs between labs "
               "and scanners, and the generator sits at the pale end of what these real images span."
               if "BRCA-M2C" in od.index else ""))
