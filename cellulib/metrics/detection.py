"""Nucleus detection scores (SPEC 1.4, the MCSpatNet protocol): predicted points matched to
annotated dots within a radius, per class and pooled, as precision, recall and F, plus the
confusion between the classes of matched nuclei.

numpy, scipy and pandas only (no torch), like :mod:`cellulib.metrics.agreement`, so detections
read from a CSV can be scored without loading a model. Used by :mod:`cellulib.inference.detect` and
the real-H&E chapter.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cellulib.data.annotations import BRCA_M2C_CLASSES

__all__ = [
    "DETECTION_CLASSES",
    "DETECTION_RADIUS",
    "UNMATCHED",
    "class_confusion",
    "detection_counts",
    "detection_curve",
    "detection_scores",
    "match_points",
    "precision_recall_f1",
    "scores_from_counts",
]


#: MCSpatNet's matching radius at 20x, in pixels (Abousamra et al. 2021: 6 px = 3 um).
DETECTION_RADIUS = 6.0
#: The nucleus classes scored per class, in the order of the BRCA-M2C dot classes 1, 2, 3.
DETECTION_CLASSES: tuple[str, ...] = tuple(cls for _, cls in BRCA_M2C_CLASSES.values())


def _dot_map(xy: np.ndarray, first: bool = False):
    """Points as the protocol scores them: rounded to whole pixels, one per pixel, in raster
    order (by row ``y``, then column ``x``), as ``numpy.where`` lists the dots of a dot map.
    With ``first``, also the index of the first input point on each pixel."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        raise ValueError("point coordinates must be finite numbers")
    # pixel k (centre at k) spans [k - 0.5, k + 0.5): round half up, not to even
    pix, idx = np.unique(np.floor(xy + 0.5).astype(np.int64)[:, ::-1], axis=0,
                         return_index=True)  # (y, x), row-major
    return (pix[:, ::-1], idx) if first else pix[:, ::-1]


def _greedy_pairs(t: np.ndarray, p: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """``(truth, prediction)`` index pairs of the protocol's greedy matching of two dot maps."""
    from scipy.spatial import cKDTree

    if not len(t) or not len(p):
        return []
    tree = cKDTree(p)
    taken = np.zeros(len(p), dtype=bool)
    pairs = []
    for i, (cand, point) in enumerate(zip(tree.query_ball_point(t, r=radius), t)):
        cand = np.asarray(cand, dtype=np.int64)
        cand = cand[~taken[cand]]
        if not len(cand):
            continue
        d2 = ((p[cand] - point) ** 2).sum(axis=1)
        keep = d2 < radius * radius
        if not keep.any():
            continue
        cand, d2 = cand[keep], d2[keep]
        # nearest first; p is in raster order, so the smaller index wins a tie
        best = int(cand[np.lexsort((cand, d2))[0]])
        taken[best] = True
        pairs.append((i, best))
    return pairs


def match_points(truth, pred, radius: float = DETECTION_RADIUS) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of one image's detections.

    The MCSpatNet protocol (Abousamra et al. 2021, their evaluation code; SPEC 1.4): truth and
    predictions are dot maps, so coordinates are rounded to whole pixels and points falling on one
    pixel count once. Each truth dot, in raster order, takes the nearest still unmatched prediction
    strictly closer than ``radius``; ties in distance go to the prediction first in raster order.
    Matched dots are true positives, unmatched dots false negatives, and unmatched predictions
    false positives. Used by :func:`detection_scores` (the real-H&E chapter).

    Parameters
    ----------
    truth, pred : array-like, shape (N, 2)
        ``(x, y)`` pixel coordinates of annotated and detected nuclei.
    radius : float
        Matching distance in pixels, > 0 (6 px at 20x in MCSpatNet).

    Examples
    --------
    >>> match_points([[10, 10], [30, 30]], [[12, 10], [50, 50]])
    (1, 1, 1)
    >>> match_points([[10, 10]], [[16, 10]])  # 6 px is not strictly closer than 6 px
    (0, 1, 1)
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    t, p = _dot_map(truth), _dot_map(pred)
    tp = len(_greedy_pairs(t, p, radius))
    return tp, len(p) - tp, len(t) - tp


def precision_recall_f1(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F from TP, FP and FN counts (numbers or arrays, elementwise).

    MCSpatNet's conventions: an empty denominator gives 1, and P + R = 0 gives F = 0. Used by
    :func:`scores_from_counts` and by the bootstrap of `cellulib.reporting.statistics` (the real-H&E chapter).

    Examples
    --------
    >>> [float(v) for v in precision_recall_f1(3, 1, 1)]
    [0.75, 0.75, 0.75]
    >>> [float(v) for v in precision_recall_f1(0, 0, 2)]
    [1.0, 0.0, 0.0]
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 1.0)
        f1 = np.where(precision + recall > 0,
                      2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def _points_frame(df, name: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{name} must be a DataFrame with columns image, x, y, cls; "
                        f"got {type(df).__name__}")
    missing = [c for c in ("image", "x", "y", "cls") if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}; it needs image, x, y, cls")
    return df


def detection_scores(truth: pd.DataFrame, pred: pd.DataFrame, radius: float = DETECTION_RADIUS,
                     classes=DETECTION_CLASSES, images=None) -> pd.DataFrame:
    """Per-class and pooled detection precision, recall and F (micro-averaged over images).

    SPEC 1.4, the MCSpatNet protocol: for each class, the predictions of that class are matched to
    that class's dots image by image with :func:`match_points`; TP, FP and FN are summed over the
    images and P, R and F computed once. The ``detection`` row pools the classes: every dot against
    every prediction, whatever their class. Used in the real-H&E chapter through
    :func:`cellulib.metrics.detection.detection_curve`.

    Parameters
    ----------
    truth, pred : pandas.DataFrame
        One row per nucleus with columns ``image`` (any key naming the image), ``x``, ``y``
        (pixels) and ``cls``.
    radius : float
        Matching distance in pixels (strictly closer counts).
    classes : sequence of str
        The classes scored one by one (rows in this order).
    images : sequence, optional
        The images scored; by default every image of ``truth`` or ``pred``. An image without dots
        or without predictions still counts its predictions as FP or its dots as FN.

    Returns
    -------
    pandas.DataFrame
        Index ``classes`` + ``detection``; columns ``tp``, ``fp``, ``fn`` (ints), ``precision``,
        ``recall``, ``f1``.
    """
    counts = detection_counts(truth, pred, radius, classes, images)
    return scores_from_counts(counts.groupby("class", sort=False)[["tp", "fp", "fn"]].sum())


def detection_counts(truth: pd.DataFrame, pred: pd.DataFrame, radius: float = DETECTION_RADIUS,
                     classes=DETECTION_CLASSES, images=None) -> pd.DataFrame:
    """TP, FP and FN per image and class (``classes`` then ``detection``), as
    :func:`detection_scores` counts them before summing: a long table with columns ``image``,
    ``class``, ``tp``, ``fp``, ``fn``. Image-level counts let a bootstrap resample images. Used
    in the real-H&E chapter."""
    truth, pred = _points_frame(truth, "truth"), _points_frame(pred, "pred")
    keys = (pd.unique(pd.concat([truth["image"], pred["image"]], ignore_index=True))
            if images is None else list(images))
    t_groups = dict(tuple(truth.groupby("image", sort=False)))
    p_groups = dict(tuple(pred.groupby("image", sort=False)))
    empty = truth.iloc[:0]
    rows = []
    for key in keys:
        t_img, p_img = t_groups.get(key, empty), p_groups.get(key, empty)
        for c in classes:
            rows.append((key, c, *match_points(
                t_img.loc[t_img["cls"] == c, ["x", "y"]].to_numpy(),
                p_img.loc[p_img["cls"] == c, ["x", "y"]].to_numpy(), radius)))
        rows.append((key, "detection", *match_points(t_img[["x", "y"]].to_numpy(),
                                                     p_img[["x", "y"]].to_numpy(), radius)))
    out = pd.DataFrame(rows, columns=["image", "class", "tp", "fp", "fn"])
    return out.astype({"tp": "int64", "fp": "int64", "fn": "int64"})


def scores_from_counts(counts: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall and F from summed ``tp``, ``fp``, ``fn`` (one row per class), with
    MCSpatNet's conventions: an empty denominator gives 1, and P + R = 0 gives F = 0."""
    rows = {}
    for c, (tp, fp, fn) in counts[["tp", "fp", "fn"]].iterrows():
        precision, recall, f1 = (float(v) for v in precision_recall_f1(tp, fp, fn))
        rows[c] = {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision,
                   "recall": recall, "f1": f1}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "class"
    return out


def detection_curve(truth: pd.DataFrame, pred: pd.DataFrame, radii=range(1, 7),
                    classes=DETECTION_CLASSES, images=None) -> pd.DataFrame:
    """:func:`detection_scores` at each matching radius (MCSpatNet reports 1-6 px): a long table
    with a ``radius`` column. Used in the real-H&E chapter."""
    parts = [detection_scores(truth, pred, r, classes, images).assign(radius=float(r))
             for r in radii]
    return pd.concat(parts).reset_index()


#: Row label of :func:`class_confusion` for detections that match no dot, and column label for
#: dots that no detection matches.
UNMATCHED = "unmatched"


def class_confusion(truth: pd.DataFrame, pred: pd.DataFrame, radius: float = DETECTION_RADIUS,
                    classes=DETECTION_CLASSES, images=None) -> pd.DataFrame:
    """Confusion matrix of matched nuclei: annotated class (rows) against detected class (columns).

    Detections are matched to dots image by image as the pooled ``detection`` row of
    :func:`detection_scores` matches them (:func:`match_points`, every dot against every detection
    whatever their class, the MCSpatNet protocol's rounding to dot maps, where a pixel keeps the
    class of its first point); each matched pair counts once in the cell (its dot's class, its
    detection's class). The column ``unmatched`` counts the dots of each class that no detection
    matches (false negatives), the row ``unmatched`` the detections of each class that match no dot
    (false positives); so the matched cells sum to the pooled TP. Used in the real-H&E chapter.

    Parameters
    ----------
    truth, pred : pandas.DataFrame
        One row per nucleus: ``image``, ``x``, ``y``, ``cls``.
    radius : float
        Matching distance in pixels (strictly closer counts).
    classes : sequence of str
        Row and column order; points of another class raise ValueError.
    images : sequence, optional
        The images counted; by default every image of ``truth`` or ``pred``.

    Returns
    -------
    pandas.DataFrame
        int64 counts, index ``classes + ("unmatched",)`` (annotated), columns
        ``classes + ("unmatched",)`` (detected); the ``("unmatched", "unmatched")`` cell is 0.

    Examples
    --------
    >>> truth = pd.DataFrame({"image": 0, "x": [10, 40], "y": [10, 10], "cls": ["malignant", "normal"]})
    >>> pred = pd.DataFrame({"image": 0, "x": [11, 80], "y": [10, 10], "cls": ["normal", "normal"]})
    >>> class_confusion(truth, pred, classes=("malignant", "normal")).to_numpy().tolist()
    [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    """
    truth, pred = _points_frame(truth, "truth"), _points_frame(pred, "pred")
    classes = list(classes)
    for name, df in (("truth", truth), ("pred", pred)):
        other = sorted(set(df["cls"]) - set(classes))
        if other:
            raise ValueError(f"{name} has classes {other} outside {classes}")
    labels = [*classes, UNMATCHED]
    code = {c: i for i, c in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    keys = (pd.unique(pd.concat([truth["image"], pred["image"]], ignore_index=True))
            if images is None else list(images))
    t_groups = dict(tuple(truth.groupby("image", sort=False)))
    p_groups = dict(tuple(pred.groupby("image", sort=False)))
    empty = truth.iloc[:0]
    u = code[UNMATCHED]
    for key in keys:
        t_img, p_img = t_groups.get(key, empty), p_groups.get(key, empty)
        t, t_first = _dot_map(t_img[["x", "y"]].to_numpy(), first=True)
        p, p_first = _dot_map(p_img[["x", "y"]].to_numpy(), first=True)
        t_cls = np.array([code[c] for c in t_img["cls"].to_numpy()[t_first]], dtype=np.int64)
        p_cls = np.array([code[c] for c in p_img["cls"].to_numpy()[p_first]], dtype=np.int64)
        pairs = np.array(_greedy_pairs(t, p, radius), dtype=np.int64).reshape(-1, 2)
        np.add.at(counts, (t_cls[pairs[:, 0]], p_cls[pairs[:, 1]]), 1)
        t_free = np.ones(len(t), dtype=bool)
        t_free[pairs[:, 0]] = False
        p_free = np.ones(len(p), dtype=bool)
        p_free[pairs[:, 1]] = False
        np.add.at(counts, (t_cls[t_free], u), 1)
        np.add.at(counts, (u, p_cls[p_free]), 1)
    out = pd.DataFrame(counts, index=pd.Index(labels, name="annotated"),
                       columns=pd.Index(labels, name="detected"))
    return out

