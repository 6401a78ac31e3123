"""Measurements that compare synthetic and real H&E: stain statistics in HED space, nucleus sizes,
the distance between label distributions, and the chapter-1 tables built from them. Used in
chapter 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cellulib.constants import IMAGE_SUFFIXES
from cellulib.data.synth import sample_cellularity
from cellulib.files.imageio import DataError, read_image

__all__ = [
    "TISSUE_STATISTICS",
    "calibration_table",
    "cells_statistics",
    "generator_calibration",
    "generator_statistics",
    "tissue_statistics",
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


# --------------------------------------------------------------------------------------------------
# Tissue statistics: the generator beside real tissue (issue 23)
# --------------------------------------------------------------------------------------------------
#: The statistics :func:`tissue_statistics` measures, in the order of the table: name ->
#: (unit, what one value is). "per image" statistics have one value per patch, "per nucleus" ones
#: one value per annotated nucleus (or per segmented nucleus, for the diameter).
TISSUE_STATISTICS: dict[str, tuple[str, str]] = {
    "tumour and lymphocyte nuclei per mm2 of tissue": ("1/mm2", "per image"),
    "tumour nuclei per mm2 of tissue": ("1/mm2", "per image"),
    "lymphocytes per mm2 of tissue": ("1/mm2", "per image"),
    "tumour share of tumour and lymphocyte nuclei": ("fraction", "per image"),
    "same-class nearest neighbour": ("fraction", "per image"),
    "nearest-nucleus distance": ("um", "per nucleus"),
    "tumour nearest-tumour distance": ("um", "per nucleus"),
    "nucleus diameter (segmented)": ("um", "per nucleus"),
    "haematoxylin OD at nuclei": ("OD", "per nucleus"),
    "haematoxylin OD of tissue": ("OD", "per image"),
    "haematoxylin OD spread in tissue (SD)": ("OD", "per image"),
    "eosin OD of tissue": ("OD", "per image"),
    "texture: local grey-level SD in tissue": ("grey levels", "per image"),
    "tissue share of the field": ("fraction", "per image"),
}
#: The two classes whose annotations mean the same thing in both sources, as
#: :func:`cellulib.data.breastpathq.annotation_points` names them: tumour (``malignant``:
#: BRCA-M2C's tumour/epithelial dots, the generator's malignant nuclei) and lymphocytes. The third
#: class differs (``normal``: BRCA-M2C's stromal dots, the generator's normal epithelium, which
#: like BreastPathQ leaves stromal nuclei unannotated), so the nucleus statistics leave it out.
_TUMOUR, _LYMPHOCYTE = "malignant", "lymphocyte"
#: Half the side of the square whose mean haematoxylin OD is a nucleus's darkness, in pixels.
_DOT_HALF = 1
#: The window of the local grey-level SD (texture), in pixels.
_TEXTURE_WINDOW = 5


def tissue_statistics(img, points: pd.DataFrame, mpp: float | None = None) -> pd.DataFrame:
    """What one annotated H&E patch looks like, in numbers that can be compared between the
    generator and real tissue (issue 23).

    ``img`` is an RGB patch; ``points`` its annotated nuclei (``x``, ``y`` in pixels, ``cls`` as
    :func:`cellulib.data.breastpathq.annotation_points` gives them: ``malignant``,
    ``lymphocyte``, ``normal``); ``mpp`` the pixel size in micrometres (default
    :data:`cellulib.constants.MPP`, the scale of BreastPathQ, BRCA-M2C and the generator). Tissue
    is every pixel that is not glass (:func:`cellulib.data.proxy.tissue_mask`). The statistics are
    those of :data:`TISSUE_STATISTICS`, on the tumour and lymphocyte nuclei (the classes both
    sources annotate alike; ``normal`` points are left out): nuclei per square millimetre of
    tissue (both classes, each), the tumour share of them, the share whose nearest neighbour has
    their class (how much nuclei of a kind cluster: sheets and nests, against scattered cells),
    nearest-neighbour distances, the diameter of the nuclei segmented from the haematoxylin channel
    (:func:`nucleus_sizes`), the haematoxylin optical density at each annotated nucleus (the mean
    over a 3x3 square), the H and E optical densities of the tissue and the spread of H, a texture
    (the mean grey-level SD over 5x5 windows in tissue), and the tissue share of the field.

    Returns
    -------
    pd.DataFrame
        Long table: ``statistic``, ``value``; one row per image statistic and one per nucleus for
        the per-nucleus ones. A statistic that is undefined for this patch (no tumour nuclei for the
        tumour distances, no tissue) has no rows.
    """
    from scipy.spatial import cKDTree
    from skimage.color import rgb2hed

    from cellulib.constants import MPP
    from cellulib.data.proxy import tissue_mask

    mpp = MPP if mpp is None else float(mpp)
    if not mpp > 0:
        raise ValueError(f"mpp must be a positive pixel size in micrometres, got {mpp}")
    rgb = _as_rgb(img)
    missing = {"x", "y", "cls"} - set(points.columns)
    if missing:
        raise ValueError(f"points: missing column(s) {sorted(missing)}")
    tissue = tissue_mask(rgb)
    rows: list[tuple[str, float]] = [("tissue share of the field", float(tissue.mean()))]
    if not tissue.any():
        return pd.DataFrame(rows, columns=["statistic", "value"])
    kept = points["cls"].astype(str).isin([_TUMOUR, _LYMPHOCYTE]).to_numpy()
    xy = points[["x", "y"]].to_numpy(dtype=np.float64)[kept]
    cls = points["cls"].astype(str).to_numpy()[kept]
    mm2 = tissue.sum() * (mpp * 1e-3) ** 2
    n_tumour, n_lymph = int((cls == _TUMOUR).sum()), int((cls == _LYMPHOCYTE).sum())
    rows += [("tumour and lymphocyte nuclei per mm2 of tissue", len(xy) / mm2),
             ("tumour nuclei per mm2 of tissue", n_tumour / mm2),
             ("lymphocytes per mm2 of tissue", n_lymph / mm2)]
    if len(xy):
        rows.append(("tumour share of tumour and lymphocyte nuclei", n_tumour / len(xy)))
    if len(xy) > 1:
        dist, idx = cKDTree(xy).query(xy, k=2)
        rows.append(("same-class nearest neighbour", float((cls[idx[:, 1]] == cls).mean())))
        rows += [("nearest-nucleus distance", d * mpp) for d in dist[:, 1]]
    tumour = xy[cls == _TUMOUR]
    if len(tumour) > 1:
        rows += [("tumour nearest-tumour distance", d * mpp)
                 for d in cKDTree(tumour).query(tumour, k=2)[0][:, 1]]
    rows += [("nucleus diameter (segmented)", d * mpp) for d in nucleus_sizes(rgb)]
    hed = rgb2hed(rgb)
    h = hed[..., 0]
    if len(xy):
        k = 2 * _DOT_HALF + 1
        local = cv2.blur(h.astype(np.float32), (k, k))
        col = np.clip(np.rint(xy[:, 0]).astype(int), 0, rgb.shape[1] - 1)
        row = np.clip(np.rint(xy[:, 1]).astype(int), 0, rgb.shape[0] - 1)
        rows += [("haematoxylin OD at nuclei", float(v)) for v in local[row, col]]
    rows += [("haematoxylin OD of tissue", float(h[tissue].mean())),
             ("haematoxylin OD spread in tissue (SD)", float(h[tissue].std())),
             ("eosin OD of tissue", float(hed[..., 1][tissue].mean()))]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    w = (_TEXTURE_WINDOW, _TEXTURE_WINDOW)
    mean = cv2.blur(grey, w)
    sd = np.sqrt(np.maximum(cv2.blur(grey * grey, w) - mean * mean, 0))
    rows.append(("texture: local grey-level SD in tissue", float(sd[tissue].mean())))
    return pd.DataFrame(rows, columns=["statistic", "value"])


def cells_statistics(cells: pd.DataFrame, source: str, mpp: float | None = None,
                     progress: bool = False) -> pd.DataFrame:
    """:func:`tissue_statistics` of every patch of an annotated-cells table
    (:func:`cellulib.data.breastpathq.read_cells`: synthetic ``cells`` patches or BRCA-M2C images),
    with ``source`` and ``image`` columns added. Used in chapter 1 through
    :func:`generator_calibration`."""
    from cellulib.data.breastpathq import annotation_points

    frames = []
    rows = cells.itertuples()
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, total=len(cells), desc=source, leave=False)
    for row in rows:
        stats = tissue_statistics(read_image(row.image_path), annotation_points(Path(row.xml_path)), mpp)
        frames.append(stats.assign(source=source, image=row.name))
    return pd.concat(frames, ignore_index=True)


def generator_statistics(generator: str = "default", n: int = 48, size: int = 256, seed: int = 0,
                         per_slide: int = 6) -> pd.DataFrame:
    """:func:`tissue_statistics` of ``n`` patches of side ``size`` rendered by one of the
    generators of :data:`cellulib.data.synth.GENERATORS`, ``per_slide`` patches per slide style,
    with the target cellularity drawn from the label law; ``source`` is ``"<generator>
    generator"``. The same ``seed`` gives every generator the same slides and draws, so two
    generators differ by their parameters only. Used in chapter 1 through
    :func:`generator_calibration`."""
    from cellulib.data.synth import GENERATORS, render_patch, sample_slide_style

    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    frames = []
    for k in range(n):
        style = sample_slide_style(np.random.default_rng([seed, 1, k // per_slide]))
        patch = render_patch(size, None, np.random.default_rng([seed, 2, k]), style=style,
                             with_masks=False, params=GENERATORS[generator])
        frames.append(tissue_statistics(patch.img, patch.points).assign(
            source=f"{generator} generator", image=f"{generator} {k}"))
    return pd.concat(frames, ignore_index=True)


def calibration_table(stats: pd.DataFrame, synthetic: Sequence[str] = ("synthetic",),
                      real: str = "BRCA-M2C") -> pd.DataFrame:
    """Synthetic patches beside real tissue, one row per statistic of :data:`TISSUE_STATISTICS`.

    ``stats`` holds :func:`tissue_statistics` rows of every source (column ``source``). Columns:
    ``unit``, ``per`` (image or nucleus), the median of ``real`` and of each ``synthetic`` source,
    and for each synthetic source its ``ratio`` to the real median and the two-sample
    Kolmogorov-Smirnov statistic ``KS`` (the largest gap between the two empirical distributions:
    0 when they agree, 1 when they do not overlap). A statistic missing from a source is left
    out. Issue 23: each statistic, synthetic against real, with a distance. Used in chapter 1
    through :func:`generator_calibration`.
    """
    from scipy import stats as sps

    synthetic = [synthetic] if isinstance(synthetic, str) else list(synthetic)
    rows = []
    for name, (unit, per) in TISSUE_STATISTICS.items():
        values = {src: stats.loc[(stats["source"] == src) & (stats["statistic"] == name),
                                 "value"].to_numpy(dtype=np.float64) for src in [real, *synthetic]}
        if any(len(v) == 0 for v in values.values()):
            continue
        ref = float(np.median(values[real]))
        row = {"statistic": name, "unit": unit, "per": per, real: ref}
        for src in synthetic:
            med = float(np.median(values[src]))
            row |= {src: med, f"ratio ({src})": med / ref if ref else np.nan,
                    f"KS ({src})": float(sps.ks_2samp(values[src], values[real]).statistic)}
        rows.append(row)
    return pd.DataFrame(rows).set_index("statistic")


def generator_calibration(brca_root: str | os.PathLike, seed: int = 0, n: int = 48,
                          size: int = 256) -> pd.DataFrame:
    """Every generator of :data:`cellulib.data.synth.GENERATORS` beside BRCA-M2C's training
    patients (:func:`cellulib.data.breastpathq.patient_split`: the patients the real-tissue
    chapter scores on are left out), as :func:`calibration_table`: ``n`` rendered patches of side
    ``size`` per generator (:func:`generator_statistics`) against the annotated BRCA-M2C images
    (:func:`cells_statistics`). Used in chapter 1."""
    from cellulib.data.breastpathq import patient_split, read_cells
    from cellulib.data.synth import GENERATORS

    cells = read_cells(brca_root)
    train_rows, _ = patient_split(cells, root=brca_root)
    frames = [cells_statistics(cells.iloc[train_rows], "BRCA-M2C")]
    frames += [generator_statistics(g, n=n, size=size, seed=seed) for g in GENERATORS]
    return calibration_table(pd.concat(frames, ignore_index=True),
                             [f"{g} generator" for g in GENERATORS])
