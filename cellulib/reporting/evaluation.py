"""Evaluate a predictions file against labels: read both, match them by image name, and compute the
paper's metrics with the mean predictor beside them (``cellulib evaluate``; paper section 3.5).

Predictions are the ``path,cellularity,error`` CSV of ``cellulib predict``; labels a BreastPathQ
``slide,rid,y`` file or a ``path,cellularity`` CSV.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cellulib.data.breastpathq import read_labels
from cellulib.files.imageio import DataError, listing, read_csv_strings

__all__ = ["PredictWarning", "read_predictions", "match_predictions", "evaluate_files",
           "evaluate_pairs", "bootstrap_clusters", "train_mean_source"]

PathLike = str | os.PathLike


class PredictWarning(UserWarning):
    """Usable but suspicious input: unmatched predictions or labels, rows without a score."""


def _cellularity_column(df: pd.DataFrame, path: Path, column: str, allow_empty: bool) -> np.ndarray:
    raw = df[column].str.strip()
    value = pd.to_numeric(raw.replace("", np.nan), errors="coerce").to_numpy(np.float64)
    bad = (raw != "") & ~np.isfinite(value) if allow_empty else ~np.isfinite(value)
    lines = np.arange(len(df)) + 2
    if bad.any():
        shown = ", ".join(f"line {n}: {v!r}" for n, v in zip(lines[bad][:5], raw[bad][:5]))
        raise DataError(f"{path}: missing or non-numeric {column!r} ({shown})")
    out = np.isfinite(value) & ((value < 0) | (value > 1))
    if out.any():
        shown = ", ".join(f"line {n}: {v:g}" for n, v in zip(lines[out][:5], value[out][:5]))
        raise DataError(f"{path}: {column} outside [0, 1] ({shown})")
    return value


def read_predictions(pred_csv: PathLike) -> pd.DataFrame:
    """Read a ``cellulib predict`` CSV (``path,cellularity[,error]``), keyed by the file stem.

    Rows without a cellularity (images that failed) are left out with a :class:`PredictWarning`.
    Used by :func:`evaluate_files` and in chapter 5 (discussion).

    Returns
    -------
    pandas.DataFrame
        Columns ``key`` (file name without folder and suffix, e.g. ``99788_1``), ``path``,
        ``cellularity``.

    Raises
    ------
    cellulib.data.breastpathq.DataError
        Missing columns, a value that is not a number or outside [0, 1], or two predictions for
        the same file stem; the message names the file.
    """
    path = Path(pred_csv)
    df = read_csv_strings(path, "predictions", keep_default_na=False, missing=FileNotFoundError)
    missing = [c for c in ("path", "cellularity") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the header "
                        f"path,cellularity[,error] written by cellulib predict "
                        f"(found {list(df.columns)})")
    value = _cellularity_column(df, path, "cellularity", allow_empty=True)
    keep = np.isfinite(value)
    if (~keep).any():
        warnings.warn(f"{path}: {int((~keep).sum())} row(s) have no cellularity (failed images) "
                      "and are left out", PredictWarning, stacklevel=2)
    paths = df["path"].str.strip()
    out = pd.DataFrame({"key": [Path(p.replace("\\", "/")).stem for p in paths], "path": paths,
                        "cellularity": value})[keep].reset_index(drop=True)
    dup = out["key"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{path}: several predictions for the same image name "
                        f"{sorted(set(out.loc[dup, 'key']))[:5]}; labels are matched by file "
                        "name, so score each image once")
    return out


#: Columns of a ``path,cellularity`` labels file that are kept beside the label: ``patient`` and
#: ``image`` (clusters for the bootstrap) and ``proxy`` (the labels are a proxy of cellularity,
#: :mod:`cellulib.data.proxy`).
EXTRA_LABEL_COLUMNS: tuple[str, ...] = ("patient", "image", "proxy")


def _read_label_table(labels_csv: PathLike) -> pd.DataFrame:
    path = Path(labels_csv)
    df = read_csv_strings(path, "labels", keep_default_na=False, missing=FileNotFoundError)
    if "path" in df.columns:
        column = next((c for c in ("cellularity", "y", "p") if c in df.columns), None)
        if column is None:
            raise DataError(f"{path}: a labels file with a 'path' column needs a 'cellularity' "
                            f"column (found {list(df.columns)})")
        # a row may say why it has no label (an ``error``, as cellulib proxy writes): left out
        explained = (df["error"].str.strip() != "") if "error" in df.columns else None
        value = _cellularity_column(df, path, column, allow_empty=explained is not None)
        if explained is not None:
            unexplained = ~np.isfinite(value) & ~explained.to_numpy()
            if unexplained.any():
                lines = (np.flatnonzero(unexplained) + 2)[:5].tolist()
                raise DataError(f"{path}: empty {column!r} without an error saying why "
                                f"(lines {lines})")
            gone = ~np.isfinite(value)
            if gone.any():
                reasons = df.loc[gone, "error"].str.strip().tolist()
                warnings.warn(f"{path}: {int(gone.sum())} of {len(df)} labelled image(s) have no "
                              f"label and are left out of the score: {listing(reasons, 3)}",
                              PredictWarning, stacklevel=3)
            df, value = df[~gone].reset_index(drop=True), value[~gone]
        keys = [Path(p.strip().replace("\\", "/")).stem for p in df["path"]]
        labels = pd.DataFrame({"key": keys, "label": value})
        for extra in EXTRA_LABEL_COLUMNS:
            if extra in df.columns:
                labels[extra] = df[extra].str.strip().to_numpy()
    else:
        bp = read_labels(path)  # slide,rid,y|p with its own checks and messages
        labels = pd.DataFrame({"key": bp["slide"] + "_" + bp["rid"], "label": bp["cellularity"]})
    dup = labels["key"].duplicated(keep=False)
    if dup.any():
        conflict = labels[dup].groupby("key")["label"].nunique() > 1
        if conflict.any():
            raise DataError(f"{path}: images labelled twice with different values: "
                            f"{list(conflict[conflict].index[:5])}")
        labels = labels.drop_duplicates("key")
    return labels


def match_predictions(pred_csv: PathLike, labels_csv: PathLike) -> pd.DataFrame:
    """Pair predictions with labels by image name: ``{slide}_{rid}`` or the stem of ``path``.

    ``labels_csv`` is a BreastPathQ label file (``slide,rid,y``, or ``p``) or a CSV with
    ``path,cellularity`` columns. Predictions without a label and labels without a prediction are
    left out with a :class:`PredictWarning` that names a few. Used by :func:`evaluate_files` and
    in chapter 5 (discussion).

    Returns
    -------
    pandas.DataFrame
        Columns ``key``, ``path``, ``y_true``, ``y_pred`` in the order of the predictions, and the
        labels' ``patient``, ``image`` and ``proxy`` columns where the labels file has them.

    Raises
    ------
    ValueError
        When no prediction matches any label (both files are named).
    """
    pred = read_predictions(pred_csv)
    labels = _read_label_table(labels_csv)
    merged = pred.merge(labels, on="key", how="inner", sort=False)
    no_label = sorted(set(pred["key"]) - set(labels["key"]))
    no_pred = sorted(set(labels["key"]) - set(pred["key"]))
    if merged.empty:
        raise ValueError(f"{pred_csv}: no prediction matches a label in {labels_csv} (images are "
                         f"matched by name: e.g. prediction {pred['key'].head(3).tolist()} vs "
                         f"label {labels['key'].head(3).tolist()})")
    if no_label:
        warnings.warn(f"{pred_csv}: {len(no_label)} prediction(s) have no label in {labels_csv} "
                      f"and are left out, e.g. {no_label[:5]}", PredictWarning, stacklevel=2)
    if no_pred:
        warnings.warn(f"{labels_csv}: {len(no_pred)} labelled image(s) have no prediction in "
                      f"{pred_csv}, e.g. {no_pred[:5]}", PredictWarning, stacklevel=2)
    extras = [c for c in EXTRA_LABEL_COLUMNS if c in merged.columns]
    return merged.rename(columns={"label": "y_true", "cellularity": "y_pred"})[
        ["key", "path", "y_true", "y_pred", *extras]]


def evaluate_files(pred_csv: PathLike, labels_csv: PathLike, n_boot: int = 2000,
                   seed: int = 0, train_mean: float | None = None) -> pd.DataFrame:
    """MSE, kappa, ICC(2,1) and PK with 95% CIs for a predictions CSV against a labels CSV.

    Paper section 3.5 and SPEC 5 (Tables 2 and 3, the challenge's PK) through
    :func:`cellulib.metrics.agreement.evaluate` on the pairs of :func:`match_predictions`. With
    ``train_mean`` (the mean of the model's training labels) the mean predictor is scored on the
    same patches and its MSE added as a row ``MSE (mean predictor)``, same seed, so same
    resamples; the model has learned when ``MSE``'s ``ci_high`` is below that row's ``value``
    (:func:`cellulib.reporting.statistics.learned`, SPEC 5.1). Used by ``cellulib evaluate`` and in chapter 5
    (discussion).

    Returns
    -------
    pandas.DataFrame
        Index ``metric`` (``MSE``, ``kappa``, ``ICC(2,1)``, ``PK`` and, with ``train_mean``,
        ``MSE (mean predictor)``); columns ``value``, ``ci_low``, ``ci_high``, ``ci_method``,
        ``n``.
    """
    pairs = match_predictions(pred_csv, labels_csv)
    return evaluate_pairs(pairs, n_boot, seed, train_mean)


def bootstrap_clusters(pairs: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """What the bootstrap resamples: ``(groups, "patients")`` when the labels name patients,
    ``(groups, "images")`` when they name the image of each window (several rows per image), else
    ``(None, "images")`` (each row on its own)."""
    if "patient" in pairs.columns and (pairs["patient"] != "").all():
        return pairs["patient"].to_numpy(), "patients"
    if "image" in pairs.columns and (pairs["image"] != "").all() and pairs["image"].duplicated().any():
        return pairs["image"].to_numpy(), "images"
    return None, "images"


def evaluate_pairs(pairs: pd.DataFrame, n_boot: int, seed: int,
                    train_mean: float | None) -> pd.DataFrame:
    """The metrics of :func:`evaluate_files` on matched pairs (:func:`match_predictions`).

    The bootstrap resamples whole patients when the labels have a ``patient`` column, whole images
    when they have an ``image`` column naming several windows of one image
    (:func:`bootstrap_clusters`); ``ci_method`` then says ``bootstrap over N patients``. Labels
    with a ``proxy`` column (:mod:`cellulib.data.proxy`) add Spearman's rho, the second rank measure.
    """
    from cellulib.metrics.agreement import (
        MetricWarning,
        UndefinedMetricError,
        bootstrap_ci,
        evaluate,
        spearman,
    )
    from cellulib.reporting.statistics import MEAN_PREDICTOR, mean_predictor_predictions, mse_ci

    y_true, y_pred = pairs["y_true"].to_numpy(), pairs["y_pred"].to_numpy()
    groups, what = bootstrap_clusters(pairs)
    table = evaluate(y_true, y_pred, n_boot=n_boot, seed=seed, groups=groups)
    if groups is not None:
        n_groups = len(set(groups))
        table.loc[table["ci_method"] == "bootstrap", "ci_method"] = f"bootstrap over {n_groups} {what}"
    if "proxy" in pairs.columns:
        try:
            value = spearman(y_true, y_pred)
            lo, hi = bootstrap_ci(spearman, y_true, y_pred, n_boot=n_boot, seed=seed, groups=groups)
        except UndefinedMetricError as err:
            warnings.warn(f"evaluate: Spearman is NaN: {err}", MetricWarning, stacklevel=2)
            value = lo = hi = np.nan
        method = table.loc["PK", "ci_method"]
        table.loc["Spearman"] = [value, lo, hi, method, len(y_true)]
    if train_mean is not None:
        base = mean_predictor_predictions(y_true, train_mean)
        est = mse_ci(base.y_true, base.y_pred, n_boot=n_boot, seed=seed)
        table.loc[f"MSE ({MEAN_PREDICTOR.lower()})"] = [est.value, est.ci_low, est.ci_high,
                                                        "bootstrap", len(base)]
    return table


def train_mean_source(pred_csv: PathLike, train_mean: float | None = None,
                       train_labels: PathLike | None = None) -> tuple[float | None, str]:
    """The training mean for the mean predictor and where it came from, or why there is none.

    In order: ``train_mean``; the mean of ``train_labels`` (a BreastPathQ ``slide,rid,y`` or a
    ``path,cellularity`` file); the ``train_mean`` recorded in the model file named by the
    predictions' sidecar ``pred_csv + ".json"``. Never a guess: ``(None, reason)`` otherwise.
    """
    from cellulib.reporting.statistics import _check_train_mean

    if train_mean is not None:
        return _check_train_mean(train_mean), "--train-mean"
    if train_labels is not None:
        labels = _read_label_table(train_labels)
        return float(labels["label"].mean()), f"mean of the {len(labels)} labels in {train_labels}"
    hint = "give --train-mean or --train-labels"
    sidecar = Path(f"{pred_csv}.json")
    if not sidecar.is_file():
        return None, f"no sidecar {sidecar} naming the model; {hint}"
    try:
        model = json.loads(sidecar.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError) as exc:
        return None, f"{sidecar} is not a readable sidecar ({exc}); {hint}"
    if not model:
        return None, f"{sidecar} names no model file; {hint}"
    path = Path(model)
    if not path.is_file() and (sidecar.parent / path).is_file():
        path = sidecar.parent / path
    from cellulib.inference.modelfile import ModelFileError, load_model

    try:
        _, info = load_model(path)
    except (ModelFileError, OSError) as exc:
        return None, f"the model named in {sidecar} cannot be read ({exc}); {hint}"
    value = (info.get("meta") or {}).get("train_mean")
    if value is None:
        return None, f"the model file {path} records no training mean; {hint}"
    return _check_train_mean(value), f"train_mean recorded in the model file {path}"
