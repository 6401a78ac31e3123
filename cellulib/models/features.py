"""The 81 hand-crafted features of segmentation maps and the gradient-boosted trees on them.

Implements section 3.3 of Rakhlin et al. (2019) as fixed by SPEC 3.2: for each of the nucleus
channels normal, lymphocyte and malignant of a probability map, the total activation, the area and
activation above seven thresholds, and the number of Laplacian-of-Gaussian blobs and the activation
at their centres at six thresholds; then LightGBM regression (L2) of cellularity on those 81
numbers.

Two implementations of the features live here. :func:`extract_features_reference` is the authors'
way (``skimage.feature.blob_log`` once per threshold, numpy sums) and serves as the reference in
tests and benchmarks. :func:`extract_features` computes the same numbers an order of magnitude
faster: the scale-normalised LoG responses of all channels and scales come from one DCT pass and
are reused for every threshold, since a threshold only decides which scale-space maxima survive.

Used in chapter 3 (feature importance) (paper 3.3, 4.3, Fig. 9).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy.spatial import cKDTree

from cellulib.constants import NUCLEUS_CLASSES

__all__ = [
    "AREA_THRESHOLDS",
    "BLOB_THRESHOLDS",
    "FEATURE_NAMES",
    "GBT_PARAMS",
    "extract_features",
    "extract_features_reference",
    "log_blobs",
    "features_frame",
    "GBT_MIN_LEAF_GRID",
    "GBT_CV_FOLDS",
    "fit_gbt",
    "select_min_leaf",
    "predict_gbt",
    "gbt_importance",
    "gain_shares",
]

AREA_THRESHOLDS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.5)
"""Thresholds of the area/activation features (paper 3.3)."""

BLOB_THRESHOLDS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.5)
"""Detection thresholds of the LoG blob features (paper 3.3)."""

# LoG scale space of the blob features: sigma 1..4 in 4 linear steps, as skimage's
# blob_log(min_sigma=1, max_sigma=4, num_sigma=4); blobs overlapping by more than half are merged.
_MIN_SIGMA, _MAX_SIGMA, _NUM_SIGMA, _OVERLAP = 1.0, 4.0, 4, 0.5
# scipy.ndimage's default kernel radius is int(truncate * sigma + 0.5) with truncate 4.
_TRUNCATE = 4.0
# Tolerance for probabilities that a float32 sigmoid or a resize pushed a hair outside [0, 1].
_RANGE_TOL = 1e-6


def _feature_names() -> list[str]:
    names = []
    for cls in NUCLEUS_CLASSES:
        names.append(f"{cls}_total_activation")
        for t in AREA_THRESHOLDS:
            names += [f"{cls}_area_{t:.2f}", f"{cls}_activation_{t:.2f}"]
        for t in BLOB_THRESHOLDS:
            names += [f"{cls}_blob_count_{t:.2f}", f"{cls}_blob_activation_{t:.2f}"]
    return names


FEATURE_NAMES: list[str] = _feature_names()
"""The 81 feature names in SPEC 3.2 order: per class total activation, area/activation pairs, blob
count/activation pairs (``malignant_area_0.50``)."""

GBT_PARAMS: dict = {
    "objective": "regression",
    "metric": "l2",
    "num_iterations": 600,
    "learning_rate": 0.01,
    "max_depth": 5,
    "num_leaves": 8,
}
"""LightGBM settings of paper 3.3: L2 loss, 600 rounds, learning rate 0.01, depth 5, 8 leaves."""

GBT_MIN_LEAF_GRID: tuple[int, ...] = (20, 10, 5, 2)
"""The fewest training rows per leaf (LightGBM ``min_data_in_leaf``) that :func:`select_min_leaf`
compares, LightGBM's default of 20 first. The paper selected its boosting settings by
cross-validation on about 2400 patches; on the quick profile's 160 a leaf of 20 rows can pool the
few high-cellularity patches with lower ones, so that the booster's predictions stop short of the
top of the range."""

GBT_CV_FOLDS: int = 5
"""Folds of :func:`select_min_leaf`'s cross-validation."""


# --------------------------------------------------------------------------------------------------
# input checks


def _as_probs(probs, what: str = "probs") -> np.ndarray:
    """Validate a (C, H, W) probability map (C = 3 or 4) and return it as float64."""
    if hasattr(probs, "detach"):  # a torch tensor, possibly on the GPU or requiring grad
        probs = probs.detach().cpu().numpy()
    arr = np.asarray(probs)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == bool
    ):
        raise ValueError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise ValueError(
            f"{what}: expected a (C, H, W) probability map with C = 3 or 4, got an array of shape "
            f"{arr.shape} ({arr.ndim} dimensions)"
        )
    if arr.shape[0] not in (3, 4):
        raise ValueError(
            f"{what}: expected 3 channels (normal, lymphocyte, malignant) or 4 (+ background) "
            f"first, got shape {arr.shape}; is the array channels-last?"
        )
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{what}: empty probability map of shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    return _check_range(arr, what)


def _check_range(arr: np.ndarray, what: str) -> np.ndarray:
    if np.isnan(arr).any():
        raise ValueError(f"{what}: contains NaN (shape {arr.shape}, {np.isnan(arr).sum()} values)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        hint = " (an 8-bit image or logits rather than probabilities?)" if hi > 1.5 else ""
        raise ValueError(
            f"{what}: probabilities must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}] "
            f"(shape {arr.shape}){hint}"
        )
    if lo < 0 or hi > 1:
        arr = np.clip(arr, 0.0, 1.0)
    return arr


# --------------------------------------------------------------------------------------------------
# Laplacian of Gaussian scale space, fast


def _sigma_list(min_sigma: float, max_sigma: float, num_sigma: int) -> np.ndarray:
    return np.linspace(min_sigma, max_sigma, num_sigma)


def _gaussian_kernel1d(sigma: float, order: int, radius: int) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian (order 0) or its second derivative (order 2)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    phi /= phi.sum()
    if order == 0:
        return phi
    return (x**2 / sigma**4 - 1.0 / sigma**2) * phi


def _symmetric_response(kernel: np.ndarray, n: int) -> np.ndarray:
    """Multipliers of a symmetric 1-D kernel in the DCT-II domain of a length-``n`` signal."""
    radius = (len(kernel) - 1) // 2
    taps = np.arange(-radius, radius + 1)
    return np.cos(np.pi / n * np.outer(np.arange(n), taps)) @ kernel


def _log_cube(maps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Scale-normalised ``-sigma^2 * LoG`` of each map at each sigma, shape (C, S, H, W).

    Equal (to ~1e-15) to ``-scipy.ndimage.gaussian_laplace(p, s) * s**2`` with its defaults
    (mode 'reflect', truncate 4). scipy's 'reflect' border (d c b a | a b c d | d c b a) is the
    half-sample symmetric extension that the DCT-II assumes, so filtering with a symmetric kernel
    is a product in the DCT domain, exact for any image size; the LoG kernel is the sum of two
    separable kernels, so its multipliers are outer products of 1-D responses. One forward
    transform per map is shared by all scales.
    """
    _, h, w = maps.shape
    spectrum = sfft.dctn(maps, type=2, axes=(1, 2), workers=1)
    multipliers = np.empty((len(sigmas), h, w))
    for i, s in enumerate(sigmas):
        s = float(s)
        radius = int(_TRUNCATE * s + 0.5)
        smooth, d2 = _gaussian_kernel1d(s, 0, radius), _gaussian_kernel1d(s, 2, radius)
        multipliers[i] = -(s * s) * (
            np.outer(_symmetric_response(d2, h), _symmetric_response(smooth, w))
            + np.outer(_symmetric_response(smooth, h), _symmetric_response(d2, w))
        )
    return sfft.idctn(spectrum[:, None] * multipliers[None], type=2, axes=(2, 3), workers=1)


def _scale_space_peaks(cube: np.ndarray, threshold: float):
    """Local maxima of one (S, H, W) LoG cube above ``threshold``, in blob_log's order.

    Mirrors ``skimage.feature.peak_local_max(cube, footprint=ones((3, 3, 3)), threshold_abs=t)``:
    a voxel is a peak when it equals the maximum of its 3x3x3 neighbourhood ('nearest' border,
    so plateaus give several peaks) and is strictly above the threshold; a cube that is one big
    plateau has none. Returns (values, y, x, scale index) sorted by decreasing value, ties in the
    cube's raster order (y, x, scale), as skimage's stable argsort does.
    """
    n_scales = cube.shape[0]
    footprint = np.ones((3, 3), np.uint8)
    spatial_max = np.stack(
        [cv2.dilate(c, footprint, borderType=cv2.BORDER_REPLICATE) for c in cube]
    )
    neighbourhood_max = spatial_max.copy()
    if n_scales > 1:
        np.maximum(neighbourhood_max[1:], spatial_max[:-1], out=neighbourhood_max[1:])
        np.maximum(neighbourhood_max[:-1], spatial_max[1:], out=neighbourhood_max[:-1])
    is_max = cube == neighbourhood_max
    empty = (np.empty(0), np.empty(0, int), np.empty(0, int), np.empty(0, int))
    if is_max.all():
        return empty
    s_idx, y, x = np.nonzero(is_max & (cube > threshold))
    if len(s_idx) == 0:
        return empty
    values = cube[s_idx, y, x]
    order = np.lexsort((s_idx, x, y, -values))
    return values[order], y[order], x[order], s_idx[order]


def _prune_overlapping(yx: np.ndarray, sigma: np.ndarray, overlap: float) -> np.ndarray:
    """Boolean mask of the blobs kept by skimage's ``_prune_blobs`` (2-D, one sigma per blob).

    skimage visits every pair closer than twice the largest blob radius, in the iteration order of
    the Python set that ``cKDTree.query_pairs`` returns, and when the discs of radius sigma*sqrt(2)
    overlap by more than ``overlap`` of the smaller one it removes the blob with the smaller sigma
    (the first one on a tie). A removed blob never removes another, so only overlapping pairs
    matter, and the visiting order matters only when some blob loses one pair and wins another
    (a chain); then, and only then, that set is rebuilt (same pairs, same insertion order, so the
    same iteration order) and walked.
    """
    n = len(sigma)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    root2 = math.sqrt(2.0)
    pairs = cKDTree(yx).query_pairs(2 * sigma.max() * root2, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    s1, s2 = sigma[i], sigma[j]
    first_bigger = s1 > s2
    big = np.where(first_bigger, s1, s2)
    r1 = np.where(first_bigger, 1.0, s1 / s2)
    r2 = np.where(first_bigger, s2 / s1, 1.0)
    # the same operations as skimage's _blob_overlap, so the rounding is the same too
    scale = (big * root2)[:, None]
    d = np.sqrt(np.sum((yx[j] / scale - yx[i] / scale) ** 2, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos1 = np.clip((d**2 + r1**2 - r2**2) / (2 * d * r1), -1, 1)
        cos2 = np.clip((d**2 + r2**2 - r1**2) / (2 * d * r2), -1, 1)
        a, b, c, e = -d + r2 + r1, d - r2 + r1, d + r2 - r1, d + r2 + r1
        lens = r1**2 * np.arccos(cos1) + r2**2 * np.arccos(cos2)
        lens -= 0.5 * np.sqrt(np.abs(a * b * c * e))
        fraction = lens / (np.pi * np.minimum(r1, r2) ** 2)
    fraction = np.where(d > r1 + r2, 0.0, np.where(d <= np.abs(r1 - r2), 1.0, fraction))
    hit = fraction > overlap
    loser = np.where(first_bigger, j, i)[hit]
    winner = np.where(first_bigger, i, j)[hit]
    if np.isin(winner, loser).any():
        return _prune_in_set_order(i, j, hit, sigma)
    keep[loser] = False
    return keep


def _prune_in_set_order(i: np.ndarray, j: np.ndarray, hit: np.ndarray, sigma: np.ndarray):
    """Walk the pairs (i, j) in skimage's order when overlapping blobs form chains.

    ``set(zip(i, j))`` holds the pairs that ``cKDTree.query_pairs`` would return as a set, inserted
    in the same order, so it iterates in the same order as the set skimage loops over.
    """
    keep = np.ones(len(sigma), bool)
    overlapping = set(zip(i[hit].tolist(), j[hit].tolist()))
    for p, q in set(zip(i.tolist(), j.tolist())):
        if (p, q) in overlapping and keep[p] and keep[q]:
            keep[q if sigma[p] > sigma[q] else p] = False
    return keep


def _blobs_at(peaks, threshold: float, sigmas: np.ndarray, overlap: float) -> np.ndarray:
    """The (N, 3) blobs (y, x, sigma) that blob_log returns at ``threshold``, from cube peaks."""
    values, y, x, s_idx = peaks
    sel = values > threshold
    yx = np.stack([y[sel], x[sel]], axis=1).astype(np.float64)
    sigma = sigmas[s_idx[sel]].astype(np.float64)
    keep = _prune_overlapping(yx, sigma, overlap)
    return np.column_stack([yx[keep], sigma[keep]]).reshape(-1, 3)


def log_blobs(
    prob_map,
    threshold: float,
    min_sigma: float = 1,
    max_sigma: float = 4,
    num_sigma: int = 4,
) -> np.ndarray:
    """Laplacian-of-Gaussian blobs of one probability map, a fast ``skimage.feature.blob_log``.

    Paper 3.3 (Fig. 5): nuclei blobs at a detection threshold. Same semantics as
    ``blob_log(prob_map, min_sigma, max_sigma, num_sigma, threshold=threshold, overlap=0.5)``:
    scale-normalised ``-sigma^2 LoG`` at ``linspace(min_sigma, max_sigma, num_sigma)`` (scipy's
    reflect border, kernel radius 4 sigma), 3x3x3 scale-space maxima strictly above the absolute
    threshold, then removal of blobs overlapping by more than half. The LoG responses are computed
    in float64 in the DCT domain instead of by scipy's direct filters, so they agree to rounding
    (~1e-15) and so do the blobs, unless two candidate responses tie to that precision. Used in the
    chapter 3 (Fig. 5) and chapter 2 (Fig. 7).

    Parameters
    ----------
    prob_map : array-like, shape (H, W)
        Probabilities in [0, 1] (one channel of the segmentation output).
    threshold : float
        Absolute detection threshold, > 0 (a threshold of 0 would count numerical noise).
    min_sigma, max_sigma : float
        Smallest and largest Gaussian standard deviation, in pixels.
    num_sigma : int
        Number of scales, evenly spaced on [min_sigma, max_sigma].

    Returns
    -------
    numpy.ndarray, shape (N, 3)
        Rows (y, x, sigma) in blob_log's order (strongest response first); integer y, x.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:32, :32]
    >>> p = np.exp(-((yy - 10) ** 2 + (xx - 20) ** 2) / (2 * 2.0**2))
    >>> log_blobs(p, threshold=0.1)
    array([[10., 20.,  2.]])
    """
    arr = np.asarray(prob_map.detach().cpu().numpy() if hasattr(prob_map, "detach") else prob_map)
    if arr.ndim != 2:
        raise ValueError(f"log_blobs: expected a 2-D (H, W) map, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or arr.size == 0:
        raise ValueError(
            f"log_blobs: expected a non-empty numeric map, got {arr.dtype} of shape {arr.shape}"
        )
    arr = _check_range(arr.astype(np.float64, copy=False), "log_blobs: prob_map")
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"log_blobs: threshold must be a positive number, got {threshold!r}")
    if not (0 < min_sigma <= max_sigma) or int(num_sigma) < 1:
        raise ValueError(
            f"log_blobs: need 0 < min_sigma <= max_sigma and num_sigma >= 1, got "
            f"min_sigma={min_sigma!r}, max_sigma={max_sigma!r}, num_sigma={num_sigma!r}"
        )
    sigmas = _sigma_list(float(min_sigma), float(max_sigma), int(num_sigma))
    cube = _log_cube(arr[None], sigmas)[0]
    return _blobs_at(_scale_space_peaks(cube, float(threshold)), float(threshold), sigmas, _OVERLAP)


# --------------------------------------------------------------------------------------------------
# the 81 features


def _area_features(p: np.ndarray) -> list[float]:
    values = []
    for t in AREA_THRESHOLDS:
        above = p > t
        values += [float(np.count_nonzero(above)), float(p.sum(where=above))]
    return values


def extract_features(probs) -> pd.Series:
    """The 81 features of one segmentation output (paper 3.3, SPEC 3.2), fast.

    Per nucleus channel (normal, lymphocyte, malignant): total activation (sum of p); for each of
    :data:`AREA_THRESHOLDS` the number of pixels with p strictly above t and the sum of p over them;
    for each of :data:`BLOB_THRESHOLDS` the number of LoG blobs (sigma 1-4, 4 scales, as
    :func:`log_blobs`) and the sum of p at their centres. The LoG scale space is computed once per
    channel and reused for all six thresholds; the numbers equal :func:`extract_features_reference`
    (counts exactly, sums to rounding). Comparisons are made in float64 against the decimal
    thresholds. Used in chapter 3 (feature importance).

    Parameters
    ----------
    probs : array-like, shape (C, H, W)
        Sigmoid probabilities in [0, 1], C = 3 (normal, lymphocyte, malignant) or 4 (+ background,
        ignored). A torch tensor is accepted. Values up to 1e-6 outside [0, 1] are clipped.

    Returns
    -------
    pandas.Series
        81 float values indexed by :data:`FEATURE_NAMES`.

    Raises
    ------
    ValueError
        Wrong number of dimensions or channels, NaN, or values outside [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.zeros((4, 8, 8)); probs[2, 3, 4] = 0.6
    >>> f = extract_features(probs)
    >>> f[["malignant_total_activation", "malignant_area_0.50", "malignant_area_0.02"]].tolist()
    [0.6, 1.0, 1.0]
    """
    probs = _as_probs(probs)[: len(NUCLEUS_CLASSES)]
    sigmas = _sigma_list(_MIN_SIGMA, _MAX_SIGMA, _NUM_SIGMA)
    cube = _log_cube(probs, sigmas)
    values: list[float] = []
    for p, channel_cube in zip(probs, cube):
        values.append(float(p.sum()))
        values += _area_features(p)
        peaks = _scale_space_peaks(channel_cube, min(BLOB_THRESHOLDS))
        for t in BLOB_THRESHOLDS:
            blobs = _blobs_at(peaks, t, sigmas, _OVERLAP)
            centres = blobs[:, :2].astype(np.intp)
            values += [float(len(blobs)), float(p[centres[:, 0], centres[:, 1]].sum())]
    return pd.Series(values, index=FEATURE_NAMES, dtype=np.float64)


def extract_features_reference(probs) -> pd.Series:
    """The 81 features computed the authors' way, as the reference for :func:`extract_features`.

    Paper 3.3: ``skimage.feature.blob_log(p, min_sigma=1, max_sigma=4, num_sigma=4, threshold=t)``
    run separately at every blob threshold, plain numpy masks and sums for the areas. The paper
    names OpenCV's LoG; SPEC 3.2 makes blob_log's counts the reference. Probabilities are
    promoted to float64 first. About 15x slower than :func:`extract_features` on a 4x512x512
    map; used by the tests and the speed benchmark in the chapter on hand-crafted features.

    Parameters
    ----------
    probs : array-like, shape (C, H, W)
        As for :func:`extract_features`.

    Returns
    -------
    pandas.Series
        81 float values indexed by :data:`FEATURE_NAMES`.
    """
    from skimage.feature import blob_log  # imported here: only the reference needs it

    probs = _as_probs(probs)[: len(NUCLEUS_CLASSES)]
    values: list[float] = []
    for p in probs:
        values.append(float(p.sum()))
        for t in AREA_THRESHOLDS:
            mask = p > t
            values += [float(mask.sum()), float(p[mask].sum())]
        for t in BLOB_THRESHOLDS:
            blobs = blob_log(
                p,
                min_sigma=_MIN_SIGMA,
                max_sigma=_MAX_SIGMA,
                num_sigma=_NUM_SIGMA,
                threshold=t,
                overlap=_OVERLAP,
                threshold_rel=None,
                exclude_border=False,
            )
            rows, cols = np.round(blobs[:, 0]).astype(int), np.round(blobs[:, 1]).astype(int)
            values += [float(len(blobs)), float(p[rows, cols].sum())]
    return pd.Series(values, index=FEATURE_NAMES, dtype=np.float64)


def features_frame(
    probs_iter: Iterable, index: Sequence | None = None, progress: bool = True
) -> pd.DataFrame:
    """The 81 features of many segmentation outputs, one row each, with a progress bar.

    Paper 3.3: the feature table the gradient-boosted trees learn from. Used in the chapter on
    hand-crafted features and gradient-boosted trees.

    Parameters
    ----------
    probs_iter : iterable of array-like, each (C, H, W)
        Probability maps (a list, a generator, a (N, C, H, W) array or tensor).
    index : sequence, optional
        Row labels (for example the patch paths), one per map.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    pandas.DataFrame
        Shape (N, 81), columns :data:`FEATURE_NAMES`.

    Raises
    ------
    ValueError
        A map is invalid (the message names its row), or ``index`` has the wrong length.
    """
    from tqdm import tqdm

    labels = None if index is None else list(index)
    try:
        total = len(probs_iter)  # type: ignore[arg-type]
    except TypeError:
        total = None if labels is None else len(labels)
    if labels is not None and total is not None and total != len(labels):
        raise ValueError(f"features_frame: {total} maps but {len(labels)} index labels")
    rows = []
    for k, probs in enumerate(tqdm(probs_iter, total=total, disable=not progress, desc="features")):
        name = f"map {k}" + ("" if labels is None or k >= len(labels) else f" ({labels[k]})")
        try:
            rows.append(extract_features(probs).to_numpy())
        except ValueError as err:
            raise ValueError(f"features_frame: {name}: {err}") from None
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"features_frame: {len(rows)} maps but {len(labels)} index labels")
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))
    return pd.DataFrame(data, columns=FEATURE_NAMES, index=labels)


# --------------------------------------------------------------------------------------------------
# gradient-boosted trees


def _as_table(X, what: str) -> pd.DataFrame:
    if isinstance(X, pd.Series):
        X = X.to_frame().T
    if isinstance(X, pd.DataFrame):
        table = X
    else:
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"{what}: expected a 2-D feature table, got shape {arr.shape}")
        names = FEATURE_NAMES if arr.shape[1] == len(FEATURE_NAMES) else None
        names = names or [f"feature_{k}" for k in range(arr.shape[1])]
        table = pd.DataFrame(arr, columns=names)
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"{what}: empty feature table of shape {table.shape}")
    return table


def fit_gbt(
    X,
    y,
    seed: int = 0,
    n_rounds: int = 600,
    learning_rate: float = 0.01,
    max_depth: int = 5,
    num_leaves: int = 8,
    **kw,
):
    """Fit LightGBM regression trees of cellularity on the 81 features (paper 3.3, SPEC 3.2).

    L2 objective, 600 rounds, learning rate 0.01, max_depth 5, num_leaves 8, seeded and
    deterministic (one thread, row-wise histograms), silent. Used in the chapter on hand-crafted
    features and gradient-boosted trees (Table 2 "GBT").

    Parameters
    ----------
    X : pandas.DataFrame or array-like, shape (n, n_features)
        Feature table; DataFrame columns become the model's feature names (an 81-column array
        gets :data:`FEATURE_NAMES`).
    y : array-like, shape (n,)
        Cellularity in [0, 1].
    seed : int
        Seed of every LightGBM random draw.
    n_rounds, learning_rate, max_depth, num_leaves
        The paper's boosting settings.
    **kw
        Further LightGBM parameters (for example ``num_threads=2`` or ``min_data_in_leaf=5``).

    Returns
    -------
    lightgbm.Booster
        The fitted model; ``model.params`` holds the settings used.
    """
    import lightgbm as lgb

    table = _as_table(X, "fit_gbt: X")
    target = np.asarray(y, dtype=np.float64).ravel()
    if len(target) != len(table):
        raise ValueError(f"fit_gbt: X has {len(table)} rows but y has {len(target)} values")
    if not np.isfinite(target).all():
        raise ValueError(f"fit_gbt: y contains {int((~np.isfinite(target)).sum())} NaN/inf values")
    params = dict(GBT_PARAMS)
    params.update(
        num_iterations=int(n_rounds),
        learning_rate=float(learning_rate),
        max_depth=int(max_depth),
        num_leaves=int(num_leaves),
        seed=int(seed),
        deterministic=True,
        force_row_wise=True,
        num_threads=1,
        verbose=-1,
    )
    params.update(kw)
    data = lgb.Dataset(
        table.to_numpy(np.float64), label=target, feature_name=[str(c) for c in table.columns],
        params={"verbose": -1}, free_raw_data=True,
    )
    return lgb.train(params, data)


def select_min_leaf(X, y, seed: int = 0, grid=GBT_MIN_LEAF_GRID, folds: int = GBT_CV_FOLDS,
                    **fit_kw) -> tuple[int, dict[int, float]]:
    """Choose LightGBM's ``min_data_in_leaf`` for :func:`fit_gbt` by k-fold cross-validation on the
    training rows.

    Each value of ``grid`` is fitted on ``folds - 1`` folds and scored on the one left out (mean
    squared error of the clipped predictions of :func:`predict_gbt`), with the same folds for every
    value (shuffled with ``seed``). The value of lowest mean error wins; a tie keeps the earlier
    value of ``grid``. The paper selected its boosting settings by cross-validation (section 4.3);
    the leaf minimum is the one its text does not give. Used by
    :func:`cellulib.training.train.train_gbt` (chapter 3).

    Parameters
    ----------
    X, y
        Feature table and cellularity, as for :func:`fit_gbt`.
    seed : int
        Seed of the fold shuffle and of every fit.
    grid : sequence of int
        Candidate values (each >= 1).
    folds : int
        Number of folds (>= 2, at most the number of rows).
    **fit_kw
        Passed to :func:`fit_gbt` (``n_rounds`` and the like).

    Returns
    -------
    (int, dict)
        The chosen value and each candidate's mean cross-validated MSE.
    """
    from sklearn.model_selection import KFold

    from cellulib.metrics.agreement import mse

    table = _as_table(X, "select_min_leaf: X")
    target = np.asarray(y, dtype=np.float64).ravel()
    if len(target) != len(table):
        raise ValueError(f"select_min_leaf: X has {len(table)} rows but y has {len(target)} values")
    grid = tuple(grid)
    if not grid or not all(isinstance(v, int | np.integer) and v >= 1 for v in grid):
        raise ValueError(f"select_min_leaf: grid must hold integers >= 1, got {grid!r}")
    if not isinstance(folds, int | np.integer) or not 2 <= folds <= len(target):
        raise ValueError(f"select_min_leaf: folds must be an integer from 2 to the {len(target)} rows, "
                         f"got {folds!r}")
    splits = list(KFold(int(folds), shuffle=True, random_state=int(seed)).split(table))
    errors: dict[int, float] = {}
    for value in grid:
        fold_errors = []
        for train, test in splits:
            model = fit_gbt(table.iloc[train], target[train], seed=seed, min_data_in_leaf=int(value),
                            **fit_kw)
            fold_errors.append(mse(target[test], predict_gbt(model, table.iloc[test])))
        errors[int(value)] = float(np.mean(fold_errors))
    best = min(errors, key=errors.get)  # the first of equal errors: grid order
    return best, errors


def predict_gbt(model, X) -> np.ndarray:
    """Cellularity predicted by a :func:`fit_gbt` model, clipped to [0, 1] (paper 3.3).

    A DataFrame's columns are matched to the model's features by name (order free, extras
    ignored). Used in chapter 3 through :func:`cellulib.training.train.train_gbt` (feature importance).

    Parameters
    ----------
    model : lightgbm.Booster
        From :func:`fit_gbt`.
    X : pandas.DataFrame, pandas.Series (one row) or array-like
        Feature table.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Predictions in [0, 1].
    """
    names = model.feature_name()
    if isinstance(X, pd.DataFrame | pd.Series):
        table = _as_table(X, "predict_gbt: X")
        missing = [n for n in names if n not in table.columns]
        if missing:
            raise ValueError(
                f"predict_gbt: X lacks {len(missing)} of the model's features, e.g. {missing[:3]}"
            )
        arr = table[names].to_numpy(np.float64)
    else:
        arr = np.asarray(X, dtype=np.float64)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise ValueError(
                f"predict_gbt: expected a table with {len(names)} feature columns, got shape "
                f"{arr.shape}"
            )
    return np.clip(model.predict(arr), 0.0, 1.0)


def gbt_importance(model) -> pd.Series:
    """Total gain of each feature in a :func:`fit_gbt` model, largest first (paper Fig. 9).

    Used in chapter 3 through :func:`cellulib.training.train.train_gbt` (feature importance).

    Parameters
    ----------
    model : lightgbm.Booster
        From :func:`fit_gbt`.

    Returns
    -------
    pandas.Series
        Gain per feature name, sorted in descending order (features never used have gain 0).
    """
    gain = model.feature_importance(importance_type="gain")
    series = pd.Series(gain, index=model.feature_name(), name="gain", dtype=np.float64)
    return series.sort_values(ascending=False, kind="stable")


def gain_shares(importance: pd.Series) -> pd.Series:
    """Each feature's share of the total gain of :func:`gbt_importance`; all 0 when the model
    made no split (every gain 0, as a GBT on constant features does), instead of 0/0.

    Used in chapter 3 (the malignant channel's share, paper Fig. 9).

    Examples
    --------
    >>> gain_shares(pd.Series({"malignant_area_0.50": 3.0, "normal_area_0.50": 1.0})).tolist()
    [0.75, 0.25]
    >>> gain_shares(pd.Series({"malignant_area_0.50": 0.0, "normal_area_0.50": 0.0})).tolist()
    [0.0, 0.0]
    """
    total = float(importance.sum())
    return importance / total if total > 0 else importance * 0.0
