"""Measurements that compare synthetic and real H&E: stain statistics in HED space, nucleus sizes,
the distance between label distributions, and the chapter-1 tables built from them. Used in
chapter 1.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cellulib.constants import IMAGE_SUFFIXES
from cellulib.data.synth import sample_cellularity
from cellulib.files.imageio import DataError, read_image

__all__ = [
    "load_real_examples",
    "compare_stains",
    "compare_nucleus_sizes",
    "label_distance",
    "hed_stats",
    "law_distance",
    "nucleus_sizes",
]


# --------------------------------------------------------------------------------------------------
# Measurements used to compare synthetic and real patches
# --------------------------------------------------------------------------------------------------
def _as_rgb(img, name="img") -> np.ndarray:
    """Validate an image array and return it as (H, W, 3) uint8 RGB (alpha dropped, grey expanded)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0 and np.nanmin(arr) >= 0:
            arr = np.rint(arr * 255.0)
        elif np.nanmin(arr) < 0 or np.nanmax(arr) > 255:
            raise ValueError(f"{name}: pixel values must lie in [0, 255] (or [0, 1] for floats)")
        arr = arr.astype(np.uint8)
    return arr


def hed_stats(img, mask=None) -> dict:
    """Mean and standard deviation of the H, E and D optical densities of an RGB image.

    Colour deconvolution of Ruifrok & Johnston (2001) as implemented by
    :func:`skimage.color.rgb2hed`; used to check that synthetic patches have the stain colours of
    the real BreastPathQ patches (SPEC 1.2, 1.3).  Used in chapter 1 through :func:`compare_stains`, and in the
    stain-shift chapter through :func:`cellulib.reporting.robustness.stain_table`.

    Parameters
    ----------
    img : array_like
        (H, W, 3) RGB image, uint8 (or float in [0, 1]); an alpha channel is ignored.
    mask : array_like of bool, optional
        (H, W) pixels to include; all when None.

    Returns
    -------
    dict
        ``H_mean, H_std, E_mean, E_std, D_mean, D_std`` (skimage's HED units).

    Examples
    --------
    >>> white = np.full((8, 8, 3), 255, np.uint8)
    >>> hed_stats(white)["H_mean"] == 0.0
    True
    """
    from skimage.color import rgb2hed

    rgb = _as_rgb(img)
    hed = rgb2hed(rgb)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask: shape {mask.shape} does not match the image {rgb.shape[:2]}")
        if not mask.any():
            raise ValueError("mask: selects no pixel")
        hed = hed[mask]
    else:
        hed = hed.reshape(-1, 3)
    out = {}
    for k, name in enumerate("HED"):
        out[f"{name}_mean"] = float(hed[:, k].mean())
        out[f"{name}_std"] = float(hed[:, k].std())
    return out


def nucleus_sizes(img, sigma: float = 1.0, min_area: int = 20) -> np.ndarray:
    """Equivalent diameters (pixels) of the nuclei found by thresholding the haematoxylin channel.

    A deliberately simple, method-agnostic measurement for comparing synthetic with real patches:
    haematoxylin optical density (skimage ``rgb2hed``), Gaussian smoothing, Otsu threshold, holes
    filled (vesicular nuclei have pale centres), a one-pixel opening, touching nuclei split by a
    distance-transform watershed, objects under ``min_area`` pixels dropped.  The equivalent
    diameter is sqrt(4 area / pi).  Used in chapter 1 through :func:`compare_nucleus_sizes`,
    and in the real-H&E chapter.

    Parameters
    ----------
    img : array_like
        (H, W, 3) RGB image.
    sigma : float
        Gaussian smoothing of the haematoxylin channel, pixels.
    min_area : int
        Smallest object kept, pixels.

    Returns
    -------
    numpy.ndarray
        One equivalent diameter per nucleus (float, pixels); empty when none is found.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    rgb = _as_rgb(img)
    h = rgb2hed(rgb)[..., 0].astype(np.float32)
    h = cv2.GaussianBlur(h, (0, 0), sigma) if sigma > 0 else h
    if float(h.max() - h.min()) < 1e-6:
        return np.zeros(0)
    mask = h > threshold_otsu(h)
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, iterations=1)
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    comp, _ = ndi.label(mask)
    peaks = peak_local_max(cv2.GaussianBlur(dist, (0, 0), 1.0), min_distance=4, labels=comp,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (rare, flat plateaus) keep their own label.
    orphan = mask & ~np.isin(comp, np.unique(comp[markers > 0]))
    markers[orphan] = comp[orphan] + len(peaks)
    lab = watershed(-dist, markers, mask=mask)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= min_area]
    return np.sqrt(4.0 * areas / np.pi)


def label_distance(real, synthetic) -> dict[str, float]:
    """How far the synthetic cellularity labels are from real ones: the two-sample
    Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs) and its p-value
    (``scipy.stats.ks_2samp``), and the share of exact zeros in each. SPEC 1.5; used in chapter 1.

    Examples
    --------
    >>> d = label_distance([0, 0, 0.5, 1.0], [0, 0.5, 0.5, 1.0])
    >>> d["ks"], d["zeros_real"], d["zeros_synthetic"]
    (0.25, 0.5, 0.25)
    """
    from scipy import stats

    r = np.asarray(real, dtype=np.float64).ravel()
    s = np.asarray(synthetic, dtype=np.float64).ravel()
    if not len(r) or not len(s):
        raise ValueError("label_distance needs at least one real and one synthetic label")
    res = stats.ks_2samp(r, s)
    return {"ks": float(res.statistic), "p": float(res.pvalue), "n_real": int(len(r)),
            "n_synthetic": int(len(s)), "zeros_real": float(np.mean(r == 0)),
            "zeros_synthetic": float(np.mean(s == 0))}


def law_distance(real, n: int = 200_000, seed=0) -> dict[str, float]:
    """How far the label law itself (:func:`cellulib.data.synth.sample_cellularity`) is from real
    labels: `label_distance`
    to ``n`` draws rounded to 0.01, as pathologists' scores are. With many draws the KS statistic
    measures the law, not the size of a synthetic set; on the real training labels it is 0.05 (the
    real labels are mostly multiples of 0.05, which a smooth law cannot copy). Used in chapter 1.

    Examples
    --------
    >>> d = law_distance(sample_cellularity(5000, seed=1).round(2), n=5000, seed=2)
    >>> d["n_synthetic"], d["ks"] < 0.05
    (5000, True)
    """
    return label_distance(real, np.round(sample_cellularity(n, seed), 2))


def load_real_examples(real_dir) -> dict[str, np.ndarray]:
    """Read every image of a folder of real H&E examples (level 0 of pyramids), by file name.

    SPEC 1.3 (``data/real``). Files that cannot be read are skipped with a warning naming them.
    Used in chapter 1 (data exploration).
    """
    import warnings


    folder = Path(real_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder of real images not found")
    images = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                images[path.name] = read_image(path)
            except DataError as exc:
                warnings.warn(str(exc), stacklevel=2)
    return images


def _is_breastpathq(name: str) -> bool:
    # only the BreastPathQ patch shares the synthetic pixel scale; AMIDA13 and OpenSlide images are
    # at a higher magnification, so their nuclei are larger in pixels
    return name.lower().startswith("breastpathq") and "_256" not in name


def compare_stains(synthetic: list, real: dict[str, np.ndarray],
                   brca: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Mean H, E and D optical densities per image, one row per image, ``source`` synthetic, real
    or BRCA-M2C (the real TCGA patches of SPEC 1.4, when given).

    Used in chapter 1 to compare the generator with real H&E (SPEC 1.2).
    """
    rows = [{"source": "synthetic", "name": f"synthetic {i}", **_means(img)}
            for i, img in enumerate(synthetic)]
    rows += [{"source": "real", "name": name, **_means(img)} for name, img in real.items()]
    rows += [{"source": "BRCA-M2C", "name": name, **_means(img)}
             for name, img in (brca or {}).items()]
    return pd.DataFrame(rows)


def _means(img) -> dict[str, float]:
    stats = hed_stats(img)
    return {c: stats[f"{c}_mean"] for c in ("H", "E", "D")}


def compare_nucleus_sizes(synthetic: list, real: dict[str, np.ndarray],
                          brca: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Nucleus equivalent diameters (``diameter_px``) of synthetic patches, of the real
    BreastPathQ patches and of BRCA-M2C patches when given (all at 20x, the same pixel scale), with
    a ``source`` column. Used in chapter 1."""
    frames = [pd.DataFrame({"source": "synthetic", "diameter_px": nucleus_sizes(img)})
              for img in synthetic]
    frames += [pd.DataFrame({"source": f"real ({name})", "diameter_px": nucleus_sizes(img)})
               for name, img in real.items() if _is_breastpathq(name)]
    frames += [pd.DataFrame({"source": "BRCA-M2C", "diameter_px": nucleus_sizes(img)})
               for img in (brca or {}).values()]
    return pd.concat(frames, ignore_index=True)
