"""Cellularity models on real tissue: BRCA-M2C windows, their proxies, and rank agreement.

The book's cellularity models learn on synthetic patches. This module measures them on real H&E,
with the yardstick of :mod:`cellulib.data.proxy` (SPEC 1.6): BRCA-M2C images of patients that no
network of the book trained on are cut into windows of a model's field of view, each window is
labelled with its tumour share of nuclei (``count``) and tumour-cell area share (``area``), and
every model scores the same windows. The comparison is by rank (PK, Spearman's rho), with 95%
bootstrap CIs over *patients*, since windows of one patient are not independent. The mean
predictor gives every window the same score, so its PK is 0.5 exactly: a model whose PK interval
lies above 0.5 ranks real tissue better than chance.

A detector trained on real nuclei gives a baseline beside the models: the share of its detections
classed as tumour in each window. It is what the count proxy measures, so agreeing with it says
little about cellularity; it shows how much of the signal a segmentation that sees real nuclei
carries. Used in the real-tissue chapter.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellulib import constants
from cellulib.metrics.agreement import (
    PK_CHANCE,
    UndefinedMetricError,
    bootstrap_ci,
    format_ci,
    group_rows,
    pk_resamples,
    prediction_probability,
    spearman,
)
from cellulib.reporting.statistics import Estimate
from cellulib.reporting.verdicts import claim_words, verdict

__all__ = ["BASELINE", "BREASTPATHQ_PATCH", "FLOORS", "REAL_TISSUE_VERSION", "breastpathq_truth",
           "detector_share", "finding_sentence", "floors_table", "lever_sentence", "lever_table",
           "model_window",
           "patch_sentence", "rank_sentence", "rank_table", "report_images", "route_difference",
           "route_sentence", "score_breastpathq_patch", "score_windows", "summary_sentence",
           "validation_images",
           "synthetic_floors", "synthetic_icc", "windows", "windows_sentence", "with_levers",
           "RealTissue", "ROUTE_TESTS", "STAIN_NORMS", "measure", "normalisation_sentence",
           "normalisation_table", "route_sentences", "discussion_sentence"]

PathLike = str | os.PathLike

#: Bumped when what :func:`score_windows` or :func:`detector_share` compute changes (their stored
#: tables, :func:`cellulib.training.cache.derived_frame`, are keyed on it).
REAL_TISSUE_VERSION = 1

#: Issue 23's floors: the best segmentation-route model's PK against the count proxy on windows of
#: held-out patients; the best cellularity model's PK there and the lower end of its 95% CI; and
#: the best model's score on the real BreastPathQ patch (truth 0.97).
FLOORS: dict[str, float] = {"segmentation route PK": 0.70, "best model PK": 0.75,
                            "best model PK CI low": 0.60, "BreastPathQ patch": 0.85}

#: Issue 23's floor for a nucleus detector trained on synthetic patches only: its pooled F
#: (MCSpatNet's protocol) on BRCA-M2C's held-out patients.
SYNTHETIC_DETECTOR_FLOOR = 0.60

#: Issue 10's floor on the synthetic validation patches, which every model keeps: ICC(2,1) at least
#: this, and MSE at most ``SYNTHETIC_MSE_FLOOR`` times the mean predictor's.
SYNTHETIC_ICC_FLOOR = 0.90
SYNTHETIC_MSE_FLOOR = 0.25

#: The row name of the detector baseline in :func:`rank_table`.
BASELINE = "tumour share of detections"

#: The real BreastPathQ patch of ``../shared/data/real`` (slide 99788, region 1).
BREASTPATHQ_PATCH = "breastpathq_99788_1.tif"


def report_images(root: PathLike) -> tuple[str, pd.DataFrame]:
    """The BRCA-M2C images a chapter reports on, and their name: the official test split when the
    copy has one (its patients are in neither train nor val), else the held-out patients of
    :func:`validation_images` (what the real-H&E chapter validates on). Used in the real-tissue
    chapter through :func:`measure`, and in the stain-shift chapter."""
    from cellulib.data import breastpathq

    cells = breastpathq.read_cells(root)
    if (cells["split"] == "test").any():
        return "test", cells[cells["split"] == "test"]
    return "patient-disjoint validation", validation_images(root, cells)


def validation_images(root: PathLike, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """The BRCA-M2C images of the whole patients held out from training
    (:func:`cellulib.data.breastpathq.cells_split`, :func:`cellulib.data.breastpathq.patient_split`): what the real-H&E
    chapter validates and chooses its decoder on. ``cells``: the folder's
    :func:`cellulib.data.breastpathq.read_cells`, when already read. Used in the stain-shift chapter."""
    from cellulib.data import breastpathq

    cells = breastpathq.read_cells(root) if cells is None else cells
    return cells.iloc[breastpathq.cells_split(cells)[1]]


def model_window(model: Any, mpp: float = constants.MPP) -> int:
    """A model's field of view in pixels of images scanned at ``mpp`` micrometres per pixel: its
    training patch side times its pixel size over ``mpp`` (256 px for the quick profile's models
    on BRCA-M2C at 0.5 um/px)."""
    from cellulib.inference.predict import Predictor

    pred = model if isinstance(model, Predictor) else Predictor(model)
    return int(round(pred.model_patch_px * pred.model_mpp / float(mpp)))


def windows(root: PathLike, crops_dir: PathLike, window: int, images: Sequence[str] | None = None,
            min_tissue: float = 0.5) -> pd.DataFrame:
    """Proxy labels for square windows of BRCA-M2C images, the windows written as PNG files.

    :func:`cellulib.data.proxy.proxy_labels` on ``images`` (stems or file names; default: the
    :func:`report_images`) with the tumour-cell radius measured on every dot of the folder
    (:func:`cellulib.data.proxy.folder_radius`), so the labels do not depend on which images are
    chosen. Windows without a proxy (no dots, too little tissue) are dropped.

    Returns
    -------
    pandas.DataFrame
        One row per window: ``path`` (the PNG in ``crops_dir``), ``image``, ``image_path``,
        ``patient``, ``x``, ``y``, ``size``, ``count``, ``area``, ``n_nuclei``, ``n_tumour``,
        ``tissue_fraction``, in image order.
    """
    from cellulib.data import breastpathq
    from cellulib.data.proxy import folder_radius, proxy_labels

    if images is None:
        images = report_images(root)[1]["name"].tolist()
    radius = folder_radius(root)
    table = proxy_labels(root, "count", window=int(window), radius=radius, min_tissue=min_tissue,
                         crops_dir=crops_dir, images=images)
    table = table[table["error"] == ""].reset_index(drop=True)
    cells = breastpathq.read_cells(root)
    image_path = dict(zip(cells["name"].astype(str), cells["image_path"].astype(str)))
    table["image_path"] = table["image"].astype(str).map(image_path)
    return table[["path", "image", "image_path", "patient", "x", "y", "size", "count", "area",
                  "n_nuclei", "n_tumour", "tissue_fraction"]]


def _derived(kind: str, parts: dict, weights: list[str], compute,
             extra: dict[str, int] | None = None) -> pd.DataFrame:
    from cellulib.inference.predict import INFERENCE_VERSION
    from cellulib.training.cache import derived_frame

    return derived_frame(kind, parts, weights,
                         {"inference": INFERENCE_VERSION, "real_tissue": REAL_TISSUE_VERSION,
                          **(extra or {})},
                         compute, libraries=("torch", "numpy", "opencv", "lightgbm", "timm",
                                             "scikit-image", "scipy"))


def _loaded(models: Mapping[str, Any]) -> dict[str, Any]:
    """``models`` with every model file read (:func:`cellulib.load_model`); ``(model, info)`` pairs
    pass through."""
    from cellulib.inference.modelfile import load_model

    return {name: load_model(m) if isinstance(m, (str, os.PathLike)) else m
            for name, m in models.items()}


def score_windows(models: Mapping[str, Any], table: pd.DataFrame, mpp: float = constants.MPP,
                  progress: bool = False, cache: bool = True,
                  stain_norm: str | None = None) -> pd.DataFrame:
    """Every model's cellularity score of every window of :func:`windows`.

    Each window is scored by :func:`cellulib.inference.predict.predict_images` with its pixel size ``mpp``,
    so a model whose field of view differs from the window's still sees tissue at the scale it
    learned. With ``stain_norm`` (``"macenko"`` or ``"reinhard"``, as ``cellulib predict
    --stain-norm``) each window's stain is first normalised to that of the model's own training set
    (the reference its model file stores). The table is stored
    (:func:`cellulib.training.cache.derived_frame`) under a key of the models' weights, the windows'
    bytes and the normalisation, so a re-executed chapter reads it back.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` and one column per model (its score, NaN where an image failed), in the
        order of ``table``.

    Raises
    ------
    cellulib.DataError
        A window could not be scored by some model (the message names the file and the model).
    """
    from cellulib.data.fingerprint import files_digest
    from cellulib.files.imageio import DataError
    from cellulib.inference.modelfile import weights_digest
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.inference.predict import predict_images

    paths = table["path"].astype(str).tolist()
    loaded = _loaded(models)

    def compute() -> pd.DataFrame:
        out = pd.DataFrame({"path": paths})
        for name, pair in loaded.items():
            norm = normalizer_from_options(stain_norm, None, pair) if stain_norm else None
            pred = predict_images(pair, paths, mpp=mpp, progress=progress, stain_norm=norm)
            bad = pred[pred["error"] != ""]
            if len(bad):
                raise DataError(f"{name}: {bad['error'].iloc[0]}")
            out[name] = pred["cellularity"].to_numpy()
        return out

    if not cache:
        return compute()
    weights = {name: weights_digest(pair[0]) for name, pair in loaded.items()}
    parts = {"models": weights, "images": paths, "bytes": files_digest(paths), "mpp": float(mpp)}
    if stain_norm:  # without it the key is the one the tables stored before normalisation existed
        parts["stain_norm"] = str(stain_norm)
    return _derived("real-windows", parts, list(weights.values()), compute)


def detector_share(model: Any, table: pd.DataFrame, threshold: float = constants.DETECTION_THRESHOLD,
                   progress: bool = False, cache: bool = True) -> pd.DataFrame:
    """The baseline: the share of a nucleus detector's detections classed as tumour, per window.

    :func:`cellulib.inference.detect.detect_nuclei` runs once on each whole image of ``table``
    (``image_path``), at the pixel scale the detector learned, and its nuclei are counted in each
    window by their centres (the window's pixels, as the proxies count dots). A window without
    detections gets NaN. Stored like :func:`score_windows`.

    Returns
    -------
    pandas.DataFrame
        Columns ``path``, ``n_detected``, ``share`` (tumour detections / all detections).
    """
    from cellulib.data.fingerprint import files_digest
    from cellulib.inference.detect import DETECTION_VERSION, detect_nuclei
    from cellulib.inference.modelfile import load_model, weights_digest

    pair = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    images = list(dict.fromkeys(table["image_path"].astype(str)))

    def compute() -> pd.DataFrame:
        found = detect_nuclei(pair, images, threshold=threshold, progress=progress)
        rows = []
        for r in table.itertuples(index=False):
            mine = found[found["path"].astype(str) == str(r.image_path)]
            inside = ((mine["x"] >= r.x - 0.5) & (mine["x"] < r.x + r.size - 0.5)
                      & (mine["y"] >= r.y - 0.5) & (mine["y"] < r.y + r.size - 0.5))
            n = int(inside.sum())
            tumour = int((inside & (mine["class"] == "malignant")).sum())
            rows.append({"path": r.path, "n_detected": n, "share": tumour / n if n else np.nan})
        return pd.DataFrame(rows, columns=["path", "n_detected", "share"])

    if not cache:
        return compute()
    weights = weights_digest(pair[0])
    parts = {"weights": weights, "images": images, "bytes": files_digest(images),
             "windows": table[["path", "x", "y", "size"]].astype(str).to_numpy().tolist(),
             "threshold": float(threshold)}
    return _derived("real-detector", parts, [weights], compute, {"detection": DETECTION_VERSION})


def _with_ci(metric, y_true: np.ndarray, y_pred: np.ndarray, patients: np.ndarray, n_boot: int,
             seed: int) -> tuple[float, float, float]:
    """``metric`` and its 95% cluster-bootstrap CI over patients
    (:func:`cellulib.metrics.agreement.bootstrap_ci`); NaN where it is undefined."""
    try:
        value = metric(y_true, y_pred)
    except UndefinedMetricError:
        return np.nan, np.nan, np.nan
    try:
        lo, hi = bootstrap_ci(metric, y_true, y_pred, n_boot=n_boot, seed=seed, groups=patients)
    except UndefinedMetricError:
        return float(value), np.nan, np.nan
    return float(value), lo, hi


def _clusters(table: pd.DataFrame, n_boot: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    members = group_rows(table["patient"].astype(str).to_numpy(), len(table))
    idx = np.random.default_rng(seed).integers(0, len(members), (int(n_boot), len(members)))
    return members, idx


def rank_table(scores: pd.DataFrame, table: pd.DataFrame, routes: Mapping[str, Sequence[str]],
               synthetic_icc: Mapping[str, float] | None = None, baseline: pd.DataFrame | None = None,
               mean_name: str = "Mean predictor", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """PK and Spearman's rho of every model against both proxies, with 95% CIs over patients.

    Each resample draws as many patients as there are, with replacement, and pools their windows
    (the same draws for every model and proxy, so the rows are comparable). The mean predictor's
    row is 0.5 by definition (every pair of windows tied in the prediction); the detector
    baseline, when given, is scored on the windows where it found nuclei.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns ``route``, ``PK (count)``, ``PK (area)``, ``Spearman (count)``
        (formatted with CIs), ``synthetic ICC``, and the numbers behind them: ``pk``, ``pk_low``,
        ``pk_high``, ``pk_area``, ``pk_area_low``, ``pk_area_high``, ``above_chance`` (the PK
        interval against the count proxy lies above 0.5), ``n``.
    """
    route_of = {m: r for r, ms in routes.items() for m in ms}
    rows = []
    columns: dict[str, np.ndarray] = {name: scores[name].to_numpy(np.float64)
                                      for name in route_of if name in scores}
    if baseline is not None:
        columns[BASELINE] = baseline["share"].to_numpy(np.float64)
    for name, pred in columns.items():
        ok = np.isfinite(pred)
        sub = table[ok]
        count, area = sub["count"].to_numpy(np.float64), sub["area"].to_numpy(np.float64)
        patients = sub["patient"].astype(str).to_numpy()
        pk, pka, rho = (_with_ci(metric, truth, pred[ok], patients, n_boot, seed)
                        for metric, truth in ((prediction_probability, count),
                                              (prediction_probability, area), (spearman, count)))
        rows.append({"model": name, "route": route_of.get(name, "baseline"),
                     "PK (count)": format_ci(*pk), "PK (area)": format_ci(*pka),
                     "Spearman (count)": format_ci(*rho),
                     "synthetic ICC": (synthetic_icc or {}).get(name, np.nan),
                     "pk": pk[0], "pk_low": pk[1], "pk_high": pk[2], "pk_area": pka[0],
                     "pk_area_low": pka[1], "pk_area_high": pka[2],
                     "above_chance": bool(pk[1] > PK_CHANCE), "n": int(ok.sum())})
    chance = (PK_CHANCE,) * 3
    rows.append({"model": mean_name, "route": "baseline", "PK (count)": format_ci(*chance),
                 "PK (area)": format_ci(*chance), "Spearman (count)": "n/a",
                 "synthetic ICC": np.nan, "pk": PK_CHANCE, "pk_low": PK_CHANCE, "pk_high": PK_CHANCE,
                 "pk_area": PK_CHANCE, "pk_area_low": PK_CHANCE, "pk_area_high": PK_CHANCE,
                 "above_chance": False,
                 "n": len(table)})
    return pd.DataFrame(rows).set_index("model")


def route_difference(scores: pd.DataFrame, table: pd.DataFrame, better: Sequence[str],
                     worse: Sequence[str], proxy: str = "count", n_boot: int = 2000,
                     seed: int = 0) -> tuple[Estimate, str]:
    """The paper's claim on real tissue: mean PK of the ``better`` models minus that of the
    ``worse`` ones, against ``proxy``, with a 95% paired bootstrap CI over patients (every model
    scored on the same resampled windows), and its verdict (SPEC 5.1, higher is better).

    The verdict needs both routes to rank above chance first (the lower end of their mean PK's
    CI above 0.5, the analogue of "learned"); otherwise it is "undecided".
    """
    truth = table[proxy].to_numpy(np.float64)
    a0, b0 = (float(np.mean([prediction_probability(truth, scores[m].to_numpy()) for m in group]))
              for group in (better, worse))
    return _paired_difference(a0, b0, _mean_pk_resamples(scores, table, (better, worse), proxy,
                                                         n_boot, seed))


def _paired_difference(a0: float, b0: float, boot: np.ndarray) -> tuple[Estimate, str]:
    """``a0 - b0`` with the 95% CI of the paired resamples ``boot`` (two columns, the mean PKs of
    :func:`_mean_pk_resamples`), and its verdict: both sides must rank above chance first."""
    diff = boot[:, 0] - boot[:, 1]
    est = Estimate(a0 - b0, float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5)))
    above = [bool(np.percentile(boot[:, k], 2.5) > PK_CHANCE) for k in (0, 1)]
    return est, verdict(est, above[0], above[1], lower_is_better=False)


def _mean_pk_resamples(scores: pd.DataFrame, table: pd.DataFrame, groups: Sequence[Sequence[str]],
                       proxy: str, n_boot: int, seed: int) -> np.ndarray:
    """The mean PK of each group of models on the same cluster resamples of patients (one column
    per group); a resample whose proxy is all tied is left out."""
    members, idx = _clusters(table, n_boot, seed)
    truth = table[proxy].to_numpy(np.float64)
    # every model's PK on every resample at once
    boot = np.column_stack([np.mean([pk_resamples(truth, scores[m].to_numpy(), members, idx)
                                     for m in group], axis=0) for group in groups])
    return boot[~np.isnan(boot).any(axis=1)]


def breastpathq_truth(labels_csv: PathLike, slide: int = 99788, rid: int = 1) -> float:
    """The pathologists' cellularity of one BreastPathQ patch, read from a ``slide,rid,y`` labels
    file (SPEC 1.5)."""
    labels = pd.read_csv(labels_csv)
    row = labels[(labels["slide"] == slide) & (labels["rid"] == rid)]
    if row.empty:
        raise KeyError(f"{labels_csv}: no label for slide {slide}, region {rid}")
    return float(row["y"].iloc[0])


def score_breastpathq_patch(models: Mapping[str, Any], patch: PathLike,
                            mpp: float = constants.MPP, stain_norm: str | None = None) -> pd.Series:
    """Every model's score of one real patch given its pixel size (``--mpp``): the image is cut
    into windows of each model's field of view and the window scores averaged
    (:class:`cellulib.inference.predict.Predictor`); with ``stain_norm``, normalised to each
    model's training stain first, as in :func:`score_windows`."""
    from cellulib.files.imageio import DataError
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.inference.predict import predict_images

    out = {}
    for name, m in models.items():
        norm = normalizer_from_options(stain_norm, None, m) if stain_norm else None
        pred = predict_images(m, [patch], mpp=mpp, progress=False, stain_norm=norm)
        if pred["error"].iloc[0]:
            raise DataError(pred["error"].iloc[0])
        out[name] = float(pred["cellularity"].iloc[0])
    return pd.Series(out, name="score")


def floors_table(ranks: pd.DataFrame, segmentation: Sequence[str], patch_scores: pd.Series | None,
                 synthetic: pd.DataFrame | None = None) -> pd.DataFrame:
    """Issue 23's floors beside what was measured: the best segmentation-route model's PK against
    the count proxy (among ``segmentation``, with its CI); the best cellularity model's PK and the
    lower end of its CI (every row of ``ranks`` whose route is not ``"baseline"``: a model that
    meets both, the highest PK among them, else the highest PK); the best model's score of the real
    BreastPathQ patch, and, with ``synthetic`` (index model; columns ``icc``, ``mse``,
    ``mean_mse``), the models that miss issue 10's floor on the synthetic validation patches
    (ICC(2,1) >= 0.90 and MSE <= 0.25 x the mean predictor's).

    Returns
    -------
    pandas.DataFrame
        Index ``floor``; columns ``required``, ``measured``, ``by``, ``met``.
    """
    rows = []
    names = [m for m in segmentation if m in ranks.index]
    best = max(names, key=lambda m: ranks.loc[m, "pk"])
    rows.append({"floor": "best segmentation-route model: PK against the count proxy",
                 "required": f">= {FLOORS['segmentation route PK']:.2f}",
                 "measured": ranks.loc[best, "PK (count)"], "by": best,
                 "met": bool(ranks.loc[best, "pk"] >= FLOORS["segmentation route PK"])})
    models = ranks[ranks["route"] != "baseline"]
    meets = models[(models["pk"] >= FLOORS["best model PK"])
                   & (models["pk_low"] >= FLOORS["best model PK CI low"])]
    leader = (meets if len(meets) else models)["pk"].idxmax()
    rows.append({"floor": "best cellularity model: PK against the count proxy, and its CI's lower end",
                 "required": (f">= {FLOORS['best model PK']:.2f}, lower end "
                              f">= {FLOORS['best model PK CI low']:.2f}"),
                 "measured": ranks.loc[leader, "PK (count)"], "by": leader, "met": bool(len(meets))})
    if patch_scores is not None and len(patch_scores):
        top = patch_scores.idxmax()
        rows.append({"floor": "best model's score of the BreastPathQ patch",
                     "required": f">= {FLOORS['BreastPathQ patch']:.2f}",
                     "measured": f"{patch_scores[top]:.3f}", "by": top,
                     "met": bool(patch_scores[top] >= FLOORS["BreastPathQ patch"])})
    if synthetic is not None and len(synthetic):
        ok = (synthetic["icc"] >= SYNTHETIC_ICC_FLOOR) & (
            synthetic["mse"] <= SYNTHETIC_MSE_FLOOR * synthetic["mean_mse"])
        missing = synthetic.index[~ok].tolist()
        rows.append({"floor": "every model on the synthetic validation patches",
                     "required": (f"ICC >= {SYNTHETIC_ICC_FLOOR:.2f} and MSE <= "
                                  f"{SYNTHETIC_MSE_FLOOR:.2f} x the mean predictor's"),
                     "measured": (f"ICC {synthetic['icc'].min():.3f}-{synthetic['icc'].max():.3f}; "
                                  f"MSE / mean {(synthetic['mse'] / synthetic['mean_mse']).max():.3f} "
                                  f"at most"),
                     "by": ", ".join(missing) if missing else f"all {len(synthetic)}",
                     "met": not missing})
    return pd.DataFrame(rows).set_index("floor")


def synthetic_icc(preds: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """ICC(2,1) of each model on its synthetic validation patches (``y_true``, ``y_pred``), to
    stand beside its PK on real tissue."""
    from cellulib.metrics.agreement import icc

    return {name: float(icc(np.column_stack([p["y_true"].to_numpy(), p["y_pred"].to_numpy()])))
            for name, p in preds.items()}


def _names(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def rank_sentence(ranks: pd.DataFrame, routes: Mapping[str, Sequence[str]]) -> str:
    """What :func:`rank_table` says, in words: which models rank real windows above chance, the
    best of each route against the floor, and the detector baseline."""
    models = [m for r in routes.values() for m in r if m in ranks.index]
    above = [m for m in models if ranks.loc[m, "above_chance"]]
    parts = [(f"{len(above)} of the {len(models)} cellularity models rank the real windows better "
              f"than chance against the count proxy (the lower end of their PK's 95% CI above {PK_CHANCE}"
              + (f": {_names(above)})" if above else ")"))]
    for route, label in (("segmentation", "segmentation route"), ("direct", "direct route")):
        names = [m for m in routes[route] if m in ranks.index]
        best = max(names, key=lambda m: ranks.loc[m, "pk"])
        parts.append(f"the best of the {label} is {best} at PK {ranks.loc[best, 'PK (count)']}")
    text = "; ".join(parts) + "."
    if BASELINE in ranks.index:
        text += (f" The baseline, the tumour share of a real-nuclei detector's detections, reaches "
                 f"PK {ranks.loc[BASELINE, 'PK (count)']}: that is how much of the count proxy a "
                 f"segmentation that sees real nuclei recovers.")
    return text


def route_sentence(difference: Estimate, verdict_: str, better: str = "segmentation route",
                   worse: str = "direct models") -> str:
    """The route comparison of :func:`route_difference` in words."""
    d = format_ci(*difference)
    includes_zero = difference.ci_low <= 0 <= difference.ci_high
    why = claim_words(verdict_, "the CI lies above 0, so the claim holds on real tissue",
                      "the CI lies below 0, so on real tissue the claim does not hold",
                      "the CI includes 0, so real tissue does not decide the claim"
                      if includes_zero else
                      "the CI excludes 0, but a route does not rank above chance, so real "
                      "tissue does not decide the claim")
    return f"Mean PK of the {better} minus that of the {worse}: {d}; {why}."


def patch_sentence(scores: pd.Series, truth: float, side: int | None = None,
                   window: int | None = None) -> str:
    """The models' scores of the real BreastPathQ patch in words, against its truth and floor;
    with ``side`` and ``window``, the patch's size against the models' field of view."""
    best = scores.idxmax()
    floor = FLOORS["BreastPathQ patch"]
    size = (f"The patch is {side} px square, {side / window:.2g} times the {window} px field of "
            f"view. " if side and window else "")
    return (f"{size}The pathologists scored this patch {truth:.2f}. The models predict "
            f"{scores.min():.2f} to {scores.max():.2f}; the highest, {best} at {scores.max():.2f}, "
            + (f"meets the floor of {floor:.2f}." if scores.max() >= floor else
               f"is under the floor of {floor:.2f}."))


def windows_sentence(table: pd.DataFrame, split: str, window: int) -> str:
    """What :func:`windows` produced, in words."""
    return (f"On the {split} split: {len(table)} windows of {window} px from "
            f"{table['image'].nunique()} images of {table['patient'].nunique()} patients. "
            f"The count proxy's median is {table['count'].median():.2f} (range "
            f"{table['count'].min():.2f}-{table['count'].max():.2f}), the area proxy's "
            f"{table['area'].median():.2f} ({table['area'].min():.2f}-{table['area'].max():.2f}); "
            f"their Spearman correlation over the windows is "
            f"{spearman(table['count'].to_numpy(), table['area'].to_numpy()):.2f}.")


def lever_sentence(levers: pd.DataFrame) -> str:
    """:func:`lever_table` in words: what each lever changed in PK, and whether the CI decides it."""
    bits = []
    for lever, r in levers.iterrows():
        judged = claim_words(r["verdict"], "a gain the CI supports", "a loss the CI supports",
                             "not decided by the CI")
        bits.append(f"{lever} moves the PK of {r['changes']} from {r['pk_before']:.2f} to "
                    f"{r['pk']:.2f} ({r['difference']}; {judged})")
    return "; ".join(bits) + "."


def finding_sentence(ranks: pd.DataFrame, routes: Mapping[str, Sequence[str]],
                     kept: Sequence[str], verdict_: str) -> str:
    """The chapter's one-line finding: the six models as trained (``routes``), the segmentation
    route reading a real-nuclei network (``kept``, rows of ``ranks``), and the route verdict with
    ``kept`` as the segmentation route."""
    models = [m for r in routes.values() for m in r if m in ranks.index]
    above = sum(bool(ranks.loc[m, "above_chance"]) for m in models)
    best = max(models, key=lambda m: ranks.loc[m, "pk"])
    claim = claim_words(verdict_, undecided="is not decided")
    text = (f"Do the book's cellularity models, trained on synthetic patches, rank real H&E by its "
            f"tumour content? As chapters 3 and 4 trained them, {above} of {len(models)} do better "
            f"than chance (the best, {best}, at PK {ranks.loc[best, 'pk']:.2f}).")
    kept = [m for m in kept if m in ranks.index]
    if kept:
        top = max(kept, key=lambda m: ranks.loc[m, "pk"])
        text += (f" When the segmentation route reads nuclei from a network trained on real ones, "
                 f"{top} reaches PK {ranks.loc[top, 'pk']:.2f}, and the paper's claim that this "
                 f"route carries over better {claim} on real tissue.")
    return text


def summary_sentence(floors: pd.DataFrame, verdicts: Mapping[str, str],
                     levers: pd.DataFrame | None,
                     normalisation: pd.DataFrame | None = None) -> str:
    """The chapter's closing paragraph: the floors (:func:`floors_table`), the route verdicts
    (``{comparison: verdict}``), the levers (:func:`lever_table`) and stain normalisation at
    inference (the per-method table of :func:`normalisation_table`)."""
    missed = floors.index[~floors["met"].astype(bool)].tolist()
    text = (f"All {len(floors)} floors are met." if not missed else
            f"{len(floors) - len(missed)} of {len(floors)} floors are met; not met: "
            + "; ".join(f"{f} ({floors.loc[f, 'measured']}, required {floors.loc[f, 'required']})"
                        for f in missed) + ".")
    text += " " + " ".join(f"The route claim, {k}: {v}." for k, v in verdicts.items())
    if levers is not None and len(levers):
        gains = levers.index[levers["verdict"] == "holds"].tolist()
        losses = levers.index[levers["verdict"] == "does not hold"].tolist()
        text += (f" Of the {len(levers)} levers, "
                 + (f"{_names(gains)} raised PK with a CI above 0" if gains else
                    "none raised PK with a CI above 0")
                 + (f", and {_names(losses)} lowered it" if losses else "") + ".")
    if normalisation is not None and len(normalisation):
        moves = [f"{method.capitalize()} {r['difference']}" for method, r in normalisation.iterrows()]
        helped = normalisation.index[normalisation["verdict"] == "holds"].tolist()
        text += (f" Normalising the stain at inference changes the models' mean PK by "
                 f"{_names(moves)}: "
                 + (f"{_names([m.capitalize() for m in helped])} raised it with a CI above 0."
                    if helped else "none raised it with a CI above 0."))
    return text


def lever_table(scores: pd.DataFrame, table: pd.DataFrame, levers: Mapping[str, str],
                synthetic_icc: Mapping[str, float] | None = None, n_boot: int = 2000,
                seed: int = 0) -> pd.DataFrame:
    """What each lever bought on real tissue: its PK against the count proxy beside the PK of the
    model it changes (``levers``: ``{lever: original}``), the paired difference with a 95% CI over
    patients (:func:`route_difference`) and its verdict, and both synthetic ICCs.

    Returns
    -------
    pandas.DataFrame
        Index ``lever``; columns ``changes``, ``PK``, ``PK before``, ``difference`` (formatted),
        ``verdict`` ("holds": the lever raises PK), ``synthetic ICC``, ``synthetic ICC before``, and
        ``pk``, ``pk_before``, ``diff``, ``diff_low``, ``diff_high``.
    """
    both = scores
    icc = synthetic_icc or {}
    rows = []
    for lever, original in levers.items():
        diff, say = route_difference(both, table, [lever], [original], n_boot=n_boot, seed=seed)
        pk = prediction_probability(table["count"], both[lever])
        before = prediction_probability(table["count"], both[original])
        rows.append({"lever": lever, "changes": original, "PK": round(pk, 3),
                     "PK before": round(before, 3), "difference": format_ci(*diff),
                     "verdict": say, "synthetic ICC": icc.get(lever, np.nan),
                     "synthetic ICC before": icc.get(original, np.nan), "pk": pk,
                     "pk_before": before, "diff": diff.value, "diff_low": diff.ci_low,
                     "diff_high": diff.ci_high})
    return pd.DataFrame(rows).set_index("lever")


#: The stain normalisations :func:`measure` tries at inference (issue 23's normalisation lever), as
#: ``cellulib predict --stain-norm`` does them: each window normalised to the stain of the model's
#: own training set.
STAIN_NORMS = ("macenko", "reinhard")


def normalisation_table(scores: pd.DataFrame, normalised: Mapping[str, pd.DataFrame],
                        table: pd.DataFrame, models: Sequence[str],
                        patch: Mapping[str, pd.Series] | None = None, n_boot: int = 2000,
                        seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What normalising the real windows' stain at inference buys each model.

    ``scores``: :func:`score_windows` as the models were scored; ``normalised``: ``{method: the
    same with stain_norm=method}``; ``models``: the columns compared (the book's six); ``patch``:
    ``{"none" or method: scores of the BreastPathQ patch}`` (:func:`score_breastpathq_patch`).

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        Per model (and a last row, ``mean of the N``): its PK against the count proxy without
        normalisation (``PK, none``) and with each method (``PK, <method>``), then its patch
        score each way (``patch, none``, ``patch, <method>``). Per method: ``mean PK`` and ``mean
        PK before`` (formatted with 95% CIs over patients), ``difference`` (the paired difference
        of the mean PK, formatted) and its ``verdict`` (as :func:`route_difference` decides it,
        "holds": normalising raises it), ``raised`` and ``lowered`` (how many models' PK moved
        which way), and the numbers: ``pk``, ``pk_low``, ``pk_high``, ``pk_before``,
        ``pk_before_low``, ``pk_before_high``, ``diff``, ``diff_low``, ``diff_high``,
        ``above_chance`` (the normalised mean PK's CI lies above 0.5).
    """
    models = list(models)
    truth = table["count"].to_numpy(np.float64)
    per = {"none": {m: prediction_probability(truth, scores[m].to_numpy()) for m in models}}
    summary = []
    for method, normed in normalised.items():
        per[method] = {m: prediction_probability(truth, normed[m].to_numpy()) for m in models}
        tagged = [f"{m} [{method}]" for m in models]
        both = pd.concat([scores[models], normed[models].set_axis(tagged, axis=1)], axis=1)
        # the same patients' resamples for both sides, as route_difference draws them
        boot = _mean_pk_resamples(both, table, (tagged, models), "count", n_boot, seed)
        pk = float(np.mean(list(per[method].values())))
        before = float(np.mean(list(per["none"].values())))
        diff, say = _paired_difference(pk, before, boot)
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        moved = np.array([per[method][m] - per["none"][m] for m in models])
        summary.append({"method": method, "mean PK": format_ci(pk, lo[0], hi[0]),
                        "mean PK before": format_ci(before, lo[1], hi[1]),
                        "difference": format_ci(*diff), "verdict": say,
                        "raised": int((moved > 0).sum()), "lowered": int((moved < 0).sum()),
                        "pk": pk, "pk_low": float(lo[0]), "pk_high": float(hi[0]),
                        "pk_before": before, "pk_before_low": float(lo[1]),
                        "pk_before_high": float(hi[1]), "diff": diff.value,
                        "diff_low": diff.ci_low, "diff_high": diff.ci_high,
                        "above_chance": bool(lo[0] > PK_CHANCE)})
    out = pd.DataFrame(per).reindex(models).add_prefix("PK, ")
    for method, patch_scores in (patch or {}).items():
        out[f"patch, {method}"] = pd.Series(patch_scores).reindex(models)
    out.loc[f"mean of the {len(models)}"] = out.mean()
    out.index.name = "model"
    return out, pd.DataFrame(summary).set_index("method")


def _normalisation_words(row: pd.Series) -> str:
    """What a row of :func:`normalisation_table`'s summary decides, in words (SPEC 5.1: a
    comparison needs both sides above chance)."""
    if row["verdict"] == "holds":
        return "a gain the CI supports"
    if row["verdict"] == "does not hold":
        return "a loss the CI supports"
    if not row["above_chance"]:
        return ("with it the models no longer rank above chance as a group, so the CI cannot "
                "decide it")
    if row["pk_before_low"] <= PK_CHANCE:
        return "without it the models do not rank above chance as a group, so the CI cannot decide it"
    return "not decided by the CI"


def _moved_words(raised: int, lowered: int, n: int) -> str:
    """How many of ``n`` models a change raised and lowered, in words.

    >>> _moved_words(0, 6, 6), _moved_words(6, 0, 6), _moved_words(0, 1, 2), _moved_words(3, 3, 6)
    ('it lowers all 6', 'it raises all 6', 'it lowers 1 of them and raises none', 'it raises 3 of them and lowers 3')
    """
    if lowered == n or raised == n:
        return f"it {'lowers' if lowered == n else 'raises'} all {n}"
    if raised == 0 or lowered == 0:
        return (f"it {'lowers' if raised == 0 else 'raises'} {lowered or raised} of them and "
                f"{'raises' if raised == 0 else 'lowers'} none")
    return f"it raises {raised} of them and lowers {lowered}"


def normalisation_sentence(per_model: pd.DataFrame, summary: pd.DataFrame) -> str:
    """:func:`normalisation_table` in words: for each method, the mean PK before and after with the
    paired CI and what it decides, the models it raised and lowered the most, and the best patch
    score with and without it."""
    rows, bits = per_model.iloc[:-1], []
    for method, r in summary.iterrows():
        before, after = rows["PK, none"], rows[f"PK, {method}"]
        moved = (after - before).sort_values()
        judged = _normalisation_words(r)
        extremes = [f"most raised: {m}, {before[m]:.2f} to {after[m]:.2f}"
                    for m in moved.index[-1:] if moved[m] > 0]
        extremes += [f"most lowered: {m}, {before[m]:.2f} to {after[m]:.2f}"
                     for m in moved.index[:1] if moved[m] < 0]
        text = (f"{method.capitalize()} moves the mean PK of the {len(rows)} models from "
                f"{r['mean PK before']} to {r['mean PK']} ({r['difference']}; {judged}); "
                f"{_moved_words(int(r['raised']), int(r['lowered']), len(rows))}"
                + (f" ({'; '.join(extremes)})" if extremes else ""))
        if f"patch, {method}" in rows and "patch, none" in rows:
            text += (f"; the best score of the BreastPathQ patch goes from "
                     f"{rows['patch, none'].max():.2f} to {rows[f'patch, {method}'].max():.2f}")
        bits.append(text)
    return ". ".join(bits) + "." if bits else ""


def with_levers(routes: Mapping[str, Sequence[str]], changes: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """``routes`` with each lever added to the route of the model it changes (``{lever:
    original}``), for one :func:`rank_table` of every model."""
    return {route: (*names, *(lever for lever, original in changes.items() if original in names))
            for route, names in routes.items()}


def synthetic_floors(preds: Mapping[str, pd.DataFrame], train_mean: float) -> pd.DataFrame:
    """Each model's ICC(2,1) and MSE on its synthetic validation patches, beside the mean
    predictor's MSE on the same patches (``train_mean`` for every patch), for :func:`floors_table`."""
    icc = synthetic_icc(preds)
    rows = {name: {"icc": icc[name], "mse": float(np.mean((p["y_pred"] - p["y_true"]) ** 2)),
                   "mean_mse": float(np.mean((float(train_mean) - p["y_true"]) ** 2))}
            for name, p in preds.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


@dataclass
class RealTissue:
    """Everything the real-tissue chapter reports, from :func:`measure`."""

    split: str  # the BRCA-M2C images reported on (:func:`report_images`)
    window: int  # window side in pixels (:func:`model_window`)
    windows: pd.DataFrame  # :func:`windows`
    scores: pd.DataFrame  # :func:`score_windows` of every model, levers included
    baseline: pd.DataFrame  # :func:`detector_share`
    ranks: pd.DataFrame  # :func:`rank_table` of every model, the baseline and the mean predictor
    levers: pd.DataFrame  # :func:`lever_table`
    real_route: list[str]  # the segmentation route reading the real-nuclei network
    differences: dict[str, Estimate]  # the route claim, as trained / reading real nuclei
    verdicts: dict[str, str]
    patch_scores: pd.Series | None  # every model's score of the BreastPathQ patch
    patch_truth: float | None
    patch_side: int | None
    floors: pd.DataFrame  # :func:`floors_table`
    # :func:`normalisation_table` of the six (per model, per method); None without ``stain_norms``
    normalisation: pd.DataFrame | None = None
    normalisation_summary: pd.DataFrame | None = None


#: The two route comparisons of :func:`measure`, by the segmentation models they use.
ROUTE_TESTS = ("as trained in chapter 3", "reading the real-nuclei network")


def measure(models: Mapping[str, Any], routes: Mapping[str, Sequence[str]],
            changes: Mapping[str, str], real_seg: Any, brca_root: PathLike,
            synthetic_preds: Mapping[str, pd.DataFrame], train_mean: float,
            real_dir: PathLike | None = None, crops_dir: PathLike | None = None,
            n_boot: int = 2000, seed: int = 0, stain_norms: Sequence[str] = ()) -> RealTissue:
    """Score every model on windows of held-out BRCA-M2C patients and on the real BreastPathQ
    patch, and gather what the real-tissue chapter and the discussion report.

    ``models``: name -> model file, the book's six (``routes``) and the levers (``changes``:
    ``{lever: model it changes}``); the levers named ``... on the real FPN`` form the segmentation
    route that reads the real-nuclei network ``real_seg`` (also the detector baseline).
    ``synthetic_preds``: each model's synthetic validation predictions, for the ICC column and the
    synthetic floor. ``stain_norms`` (e.g. `STAIN_NORMS`): the book's six are scored again with each
    stain normalisation at inference, for :func:`normalisation_table`. Stored scores are read back
    (:func:`score_windows`). Used in the real-tissue chapter and chapter 5.
    """
    from cellulib.data.paths import home
    from cellulib.files.imageio import read_image

    split, images = report_images(brca_root)
    models = _loaded(models)  # each model file is read once, for the windows and the patch
    first = next(iter(models.values()))
    window = model_window(first)
    crops = Path(crops_dir) if crops_dir is not None else home() / "derived" / f"real-windows-{window}"
    table = windows(brca_root, crops, window, images["name"])
    scores = score_windows(models, table)
    baseline = detector_share(real_seg, table)
    icc = synthetic_icc(synthetic_preds)
    ranks = rank_table(scores, table, with_levers(routes, changes), icc, baseline, n_boot=n_boot,
                       seed=seed)
    levers = lever_table(scores, table, changes, icc, n_boot=n_boot, seed=seed)
    real_route = [name for name in changes if name.endswith("on the real FPN")]
    differences, verdicts = {}, {}
    for label, seg_models in zip(ROUTE_TESTS, (routes["segmentation"], real_route)):
        if seg_models:
            differences[label], verdicts[label] = route_difference(
                scores, table, seg_models, routes["direct"], n_boot=n_boot, seed=seed)
    patch_scores = truth = side = None
    patch = None if real_dir is None else Path(real_dir) / BREASTPATHQ_PATCH
    labels = None if real_dir is None else Path(real_dir) / "breastpathq_train_labels.csv"
    if patch is not None and patch.is_file() and labels.is_file():
        truth = breastpathq_truth(labels)
        patch_scores = score_breastpathq_patch(models, patch)
        side = int(min(read_image(patch).shape[:2]))
    floors = floors_table(ranks, [*routes["segmentation"], *real_route], patch_scores,
                          synthetic_floors(synthetic_preds, train_mean))
    normalisation = summary = None
    if stain_norms:
        six = [m for names in routes.values() for m in names]
        chosen = {m: models[m] for m in six}
        normed = {method: score_windows(chosen, table, stain_norm=method) for method in stain_norms}
        patch_normed = None
        if patch_scores is not None:
            patch_normed = {"none": patch_scores.reindex(six),
                            **{method: score_breastpathq_patch(chosen, patch, stain_norm=method)
                               for method in stain_norms}}
        normalisation, summary = normalisation_table(scores, normed, table, six, patch_normed,
                                                     n_boot=n_boot, seed=seed)
    return RealTissue(split, window, table, scores, baseline, ranks, levers, real_route,
                      differences, verdicts, patch_scores, truth, side, floors, normalisation,
                      summary)


def route_sentences(result: RealTissue) -> str:
    """Both route comparisons of :func:`measure` in words, one paragraph each."""
    return "\n\n".join(f"**Segmentation route {label}.** "
                       + route_sentence(result.differences[label], result.verdicts[label])
                       for label in result.differences)


def discussion_sentence(result: RealTissue, routes: Mapping[str, Sequence[str]]) -> str:
    """What the discussion says about real tissue: the finding and the floors, computed; with
    :func:`measure`'s ``stain_norms``, what normalising the stain at inference did."""
    verdict_ = result.verdicts.get(ROUTE_TESTS[1], result.verdicts.get(ROUTE_TESTS[0], "undecided"))
    met = int(result.floors["met"].sum())
    text = (finding_sentence(result.ranks, routes, result.real_route, verdict_)
            + f" On the {result.split} split of BRCA-M2C ({len(result.windows)} windows of "
            f"{result.windows['patient'].nunique()} patients), {met} of {len(result.floors)} of the "
            f"real-tissue chapter's floors are met.")
    norm = result.normalisation_summary
    if norm is not None and len(norm):
        moves = [f"{r['difference']} with {method.capitalize()} ({_normalisation_words(r)})"
                 for method, r in norm.iterrows()]
        text += (f" Normalising real tissue to the stain the models trained on moves their mean PK "
                 f"by {_names(moves)}.")
    return text


def command_line_section(root: Any, profile: str, seed: int, book_epochs: int,
                         book_val: pd.DataFrame, val_cells: pd.DataFrame,
                         threshold: float | None = None, train_missing: bool = False,
                         epochs: int | None = None, test_cells: pd.DataFrame | None = None
                         ) -> tuple[str, pd.DataFrame | None]:
    """The real-H&E chapter's section on the recipe that ``cellulib train seg --data <root>``
    trains (:func:`cellulib.data.profiles.command_line_seg`, ``epochs`` replacing its epochs):
    its FPN from the cache, trained here only with ``train_missing``, scored on the held-out
    patients ``val_cells`` (and on ``test_cells``, the official test split, when given) beside the
    chapter's FPN (``book_val``, trained for ``book_epochs``). Returns the
    :func:`cellulib.reporting.sentences.command_line_sentence` and a
    :func:`cellulib.reporting.tables.detection_table` with the floors and the published F, or None
    when there is no such model. Used in the real-H&E chapter."""
    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.data.profiles import command_line_seg
    from cellulib.inference.detect import recorded_threshold, score_annotated
    from cellulib.reporting import paper, sentences, tables, verdicts
    from cellulib.training import train

    threshold = DETECTION_THRESHOLD if threshold is None else threshold
    recipe = command_line_seg(profile, epochs=epochs)
    own = len(recipe) > 1 or recipe["epochs"] is not None  # the profile has a recipe of its own
    result = (train.train_seg(root, profile=profile, seed=seed, train_missing=train_missing, **recipe)
              if own else None)
    if result is None:
        return sentences.command_line_sentence(recipe, profile, book_epochs, book_val), None
    # the chapter's threshold, as the FPN above; and the one its file records (chosen on its
    # training images), which `cellulib detect` uses without --threshold
    recorded = recorded_threshold({"meta": result.meta}, str(result.path))
    scores = {"FPN, this chapter": book_val,
              "FPN, command line": score_annotated(result.path, val_cells, threshold,
                                                   progress=False).scores()}
    cli = "FPN, command line"
    if recorded != threshold:
        cli = f"FPN, command line, threshold {recorded:g}"
        scores[cli] = score_annotated(result.path, val_cells, recorded, progress=False).scores()
    if test_cells is not None:
        scores[f"{cli}, test"] = score_annotated(result.path, test_cells, recorded,
                                                 progress=False).scores()
    text = sentences.command_line_sentence(
        recipe, profile, book_epochs, book_val, scores[cli], result.seconds, threshold=recorded,
        threshold_images=(result.meta.get("detection") or {}).get("images"))
    return text, tables.detection_table(scores, reference=verdicts.REAL_FLOORS,
                                        reference_name="floor (held-out patients)",
                                        references=paper.PUBLISHED_F)


def synthetic_detector_sentence(scores: pd.DataFrame, settings: Mapping[str, Any], seconds: float,
                                generator: str, paper_scale_f: float | None = None,
                                paper_scale_split: str = "") -> str:
    """The synthetic-only detector (:func:`cellulib.training.train.synthetic_detector`) in words:
    its pooled P, R and F on the held-out patients (``scores``, a
    :func:`cellulib.metrics.detection.detection_scores` table) against
    `SYNTHETIC_DETECTOR_FLOOR`, the settings it was trained with, and chapter 2's network at the
    paper's scale (pooled F ``paper_scale_f`` on ``paper_scale_split``). Used in the real-H&E
    chapter through :func:`synthetic_detector_section`.

    Examples
    --------
    >>> t = pd.DataFrame({"precision": [0.2, 0.5, 0.1, 0.5], "recall": [0.01, 0.4, 0.5, 0.76],
    ...                   "f1": [0.02, 0.45, 0.18, 0.6035]},
    ...                  index=["lymphocyte", "malignant", "normal", "detection"])
    >>> s = {"disc_diameter": 11.0, "downscale": 1, "seg_epochs": 32}
    >>> synthetic_detector_sentence(t, s, 350, "calibrated", 0.08, "test").split("; ")[-1]
    'the floor for such a detector (0.60) is **met**. Its weakest class is lymphocyte (F 0.020).'
    """
    from cellulib.reporting.sentences import minutes_text
    from cellulib.reporting.tables import BRCA_M2C_NAMES

    d = scores.loc["detection"]
    where = "the generator calibrated to real tissue (chapter 1)" if generator == "calibrated" \
        else f"the {generator} generator"
    scale = ("at full size" if settings["downscale"] == 1
             else f"after a x{settings['downscale']:g} downscale")
    stain = settings.get("stain_augment", "none")
    jitter = "" if stain == "none" else f" and {stain.upper()} stain jitter"
    floor = SYNTHETIC_DETECTOR_FLOOR
    weakest = scores.drop(index="detection")["f1"].idxmin()
    text = (f"Trained only on synthetic patches of {where}, {scale} with "
            f"{settings['disc_diameter']:g} px discs{jitter} for {settings['seg_epochs']} epochs "
            f"({minutes_text(seconds)}), the FPN finds the nuclei of the held-out patients with "
            f"pooled precision {d['precision']:.3f}, recall {d['recall']:.3f} and F "
            f"{d['f1']:.3f}")
    if paper_scale_f is not None:
        text += (f", where chapter 2's network, trained at the paper's scale, reaches F "
                 f"{paper_scale_f:.3f} on the {paper_scale_split} split")
    text += (f"; the floor for such a detector ({floor:.2f}) is "
             f"{'**met**' if d['f1'] >= floor else '**not met**'}. Its weakest class is "
             f"{BRCA_M2C_NAMES.get(weakest, weakest)} (F {scores.loc[weakest, 'f1']:.3f}).")
    return text


def synthetic_detector_section(profile: str, seed: int, val_cells: pd.DataFrame,
                               threshold: float | None = None, *, epochs: int | None = None,
                               crop: int | None = None, patches_per_epoch: int | None = None,
                               test_cells: pd.DataFrame | None = None,
                               generator: str = "calibrated", paper_scale_f: float | None = None,
                               paper_scale_split: str = "", **data_args: Any
                               ) -> tuple[str, pd.DataFrame]:
    """Issue 23's synthetic-only detector in the real-H&E chapter: the synthetic set of
    ``generator`` (``data_args``: its sizes, as :func:`cellulib.data.datasets.get_dataset` takes
    them), :func:`cellulib.training.train.synthetic_detector` trained on it (``epochs``,
    ``crop``, ``patches_per_epoch`` replace the BRCA-M2C settings'), scored on the held-out
    patients ``val_cells`` (and on ``test_cells`` when given). Returns
    :func:`synthetic_detector_sentence` and a :func:`cellulib.reporting.tables.detection_table`
    with the floor and the published F. Used in the real-H&E chapter."""
    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.data import datasets
    from cellulib.inference.detect import score_annotated
    from cellulib.reporting import paper, tables
    from cellulib.training import train

    threshold = DETECTION_THRESHOLD if threshold is None else threshold
    root = datasets.get_dataset(None, profile, seed, generator=generator, progress=False,
                                **data_args)
    result = train.synthetic_detector(root, profile, seed, epochs=epochs, crop=crop,
                                      patches_per_epoch=patches_per_epoch, progress=False)
    scores = {"synthetic only": score_annotated(result.path, val_cells, threshold,
                                                progress=False).scores()}
    if test_cells is not None:
        scores["synthetic only, test"] = score_annotated(result.path, test_cells, threshold,
                                                         progress=False).scores()
    text = synthetic_detector_sentence(scores["synthetic only"], result.settings, result.seconds,
                                       generator, paper_scale_f, paper_scale_split)
    return text, tables.detection_table(scores, reference={"detection": SYNTHETIC_DETECTOR_FLOOR},
                                        reference_name="floor (held-out patients)",
                                        references=paper.PUBLISHED_F)


def transfer_scores(profile: str, seed: int, real_model: Any, real_scored: Any,
                    report_cells: pd.DataFrame, threshold: float | None = None, *,
                    seg_epochs: int | None = None, seg_crop: int | None = None,
                    seg_patches_per_epoch: int | None = None, **data_args: Any
                    ) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """Chapter 2's synthetic-trained FPN (from the cache; ``seg_*`` and ``data_args`` as chapter 2
    takes them) and a BRCA-M2C-trained one (``real_model``, already scored on ``report_cells``:
    ``real_scored``), each scored on the other's data: ``{(trained on, scored on):``
    :class:`cellulib.inference.detect.AnnotatedScores` ``}``, as
    :func:`cellulib.reporting.tables.transfer_table` reads it, and the synthetic network's settings.
    Used in the real-H&E chapter."""
    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.data import breastpathq, datasets
    from cellulib.inference.detect import score_annotated
    from cellulib.training import train

    threshold = DETECTION_THRESHOLD if threshold is None else threshold
    root = datasets.get_dataset(None, profile, seed, **data_args)
    seg = train.train_seg(root, decoder="fpn", profile=profile, seed=seed, epochs=seg_epochs,
                          crop=seg_crop, patches_per_epoch=seg_patches_per_epoch, progress=False)
    cells = breastpathq.read_cells(root)
    val = cells.iloc[breastpathq.cells_split(cells, 0.2, seed, root=root)[1]]
    transfer = {
        ("synthetic", "synthetic"): score_annotated(seg.path, val, threshold, progress=False),
        ("synthetic", "BRCA-M2C"): score_annotated(seg.path, report_cells, threshold,
                                                   progress=False),
        ("BRCA-M2C", "synthetic"): score_annotated(real_model, val, threshold, progress=False),
        ("BRCA-M2C", "BRCA-M2C"): real_scored,
    }
    return transfer, seg.settings
