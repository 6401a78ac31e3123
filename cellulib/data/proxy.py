"""A real-tissue yardstick: cellularity proxies from BRCA-M2C's nucleus dots and images (SPEC 1.6).

BRCA-M2C (SPEC 1.4) has no cellularity score, but its dots say which nuclei are tumour. Two proxies
are computed from the dots and the image, for whole images or for square windows of them:

**count**: tumour dots / all dots. The tumour share of the annotated nuclei. It ignores how large
the cells are and how much of the field is stroma without nuclei, so a field of a few tumour cells in
wide acellular stroma can score as high as a solid tumour sheet.

**area**: tumour-cell area / tissue area, both measured in pixels of the image:

- *tissue* is every pixel that is not glass. Glass is bright (grey level >= 200), unsaturated (HSV
  saturation < 25/255) and smooth (standard deviation of the grey level in a 5x5 window < 4),
  widened by that 5x5 window again (the window shrinks a glass region by 2 px at its edges) and
  kept only in connected regions of at least 100 px; everything else, pale fibrous stroma
  included, is tissue (:func:`tissue_mask`). A BRCA-M2C patch is mostly tissue: its median tissue
  share is 0.99, and the glass found is lumens, fat and tears.
- *each dot's cell* is its Voronoi region within the tissue (the pixels nearer to it than to any
  other dot of any class), clipped to a disc of radius ``radius`` around it (:func:`cell_regions`).
  ``radius`` is measured from the dots, not assumed: half the median distance from a tumour
  nucleus to the nearest other tumour nucleus (:func:`cell_radius`). In a sheet of touching
  tumour cells that distance is a cell's diameter, so a packed cell's region is about its Voronoi
  polygon and an isolated one gets a disc of a packed cell's size. On the 90 images of the
  train/val copy the radius is 9.3 px (4.7 um at 0.5 um/px).
- the proxy is the tumour dots' cell area over the tissue area.

Neither is the pathologists' cellularity score (BreastPathQ's: the share of the tumour bed's area
that tumour cells take up, judged by eye), and neither sees cytoplasm, cell borders or tumour
cells the annotators left without a dot. Against them a model's *ranking* is the fair comparison:
the prediction probability PK (and Spearman's rho), with a bootstrap CI over patients when the
labels name them (``cellulib evaluate``). MSE and ICC against a proxy measure the proxy's scale
as much as the model.

Undefined proxies are not guessed: an image without dots, a listed image or dot file that is
missing, or a field with less tissue than ``min_tissue`` gets an empty proxy and an ``error`` that
names the file; ``cellulib evaluate`` leaves such rows out and says how many.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cellulib.data.annotations import BRCA_M2C_SPLITS, detect_layout, read_brca_m2c_points
from cellulib.files.imageio import DataError, read_image

__all__ = ["KINDS", "LABEL_COLUMNS", "cell_radius", "cell_regions", "folder_radius", "image_proxies",
           "patient_of", "proxy_labels", "tissue_mask", "window_starts"]

PathLike = str | os.PathLike

#: The proxies: ``count`` (tumour dots / all dots) and ``area`` (tumour-cell area / tissue area).
KINDS: tuple[str, ...] = ("count", "area")

#: Glass: grey level at least this (0-255) ...
GLASS_MIN_GREY = 200
#: ... HSV saturation below this (0-255) ...
GLASS_MAX_SATURATION = 25
#: ... and standard deviation of the grey level in a ``GLASS_WINDOW`` square below this ...
GLASS_MAX_SD = 4.0
GLASS_WINDOW = 5
#: ... in a connected region of at least this many pixels.
GLASS_MIN_AREA = 100

#: Columns of :func:`proxy_labels`, in order (a labels file ``cellulib evaluate`` reads).
LABEL_COLUMNS: tuple[str, ...] = (
    "path", "cellularity", "error", "proxy", "image", "patient", "split", "x", "y", "size",
    "count", "area", "n_nuclei", "n_tumour", "tissue_fraction", "radius_px")

_LABEL_SUFFIX = "_gt_class_coords.txt"


def patient_of(name: str) -> str:
    """The TCGA patient code (``TCGA-XX-XXXX``) of a BRCA-M2C file name
    (:func:`cellulib.data.breastpathq.patient_code`), else the file stem.

    >>> patient_of("TCGA-A7-A0D9-01Z-00-DX2_18001_13001_1000_1000_0.9824.png")
    'TCGA-A7-A0D9'
    """
    from cellulib.data.breastpathq import patient_code

    try:
        return patient_code(name)
    except DataError:
        return Path(str(name)).stem


def tissue_mask(img: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB image: every pixel that is not glass (see the module notes).

    Glass is bright, unsaturated and smooth (`GLASS_MIN_GREY`, `GLASS_MAX_SATURATION`,
    `GLASS_MAX_SD` over a `GLASS_WINDOW` square), widened by that window (which had shrunk it by
    half a window at its edges), in regions of at least `GLASS_MIN_AREA` pixels. Pale stroma is
    tissue: it has fibres (texture) or colour where glass has neither.

    Returns
    -------
    np.ndarray of bool, shape (H, W)
    """
    import cv2

    img = np.ascontiguousarray(img)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    k = (GLASS_WINDOW, GLASS_WINDOW)
    mean = cv2.blur(grey, k)
    sd = np.sqrt(np.maximum(cv2.blur(grey * grey, k) - mean * mean, 0))
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    core = ((grey >= GLASS_MIN_GREY) & (sat < GLASS_MAX_SATURATION) & (sd < GLASS_MAX_SD))
    glass = cv2.dilate(core.astype(np.uint8), np.ones(k, np.uint8))
    glass &= ((grey >= GLASS_MIN_GREY) & (sat < GLASS_MAX_SATURATION)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(glass, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= GLASS_MIN_AREA
    return ~keep[lab]


def cell_radius(points: pd.DataFrame) -> float:
    """Half the median distance from a tumour nucleus to the nearest other tumour nucleus.

    ``points``: dots with ``x``, ``y``, ``cls`` and ``image`` (the image of each dot; distances
    are within an image), e.g. several :func:`cellulib.data.annotations.read_brca_m2c_points` tables
    with an ``image`` column. In a sheet of touching tumour cells the nearest-neighbour distance is
    a cell's diameter, so this is a packed tumour cell's radius, measured on the data.

    Raises
    ------
    ValueError
        Fewer than two tumour dots in any one image: nothing to measure.

    Examples
    --------
    >>> pts = pd.DataFrame({"image": ["a"] * 3, "x": [0, 20, 50.0], "y": [0, 0, 0.0],
    ...                     "cls": ["malignant"] * 3})
    >>> cell_radius(pts)  # nearest distances 20, 20, 30 -> median 20
    10.0
    """
    from cellulib.data.annotations import nearest_dot_distances

    tumour = points[points["cls"] == "malignant"]
    dist = nearest_dot_distances(tumour)
    if dist.size == 0:
        raise ValueError("cell_radius: no image has two tumour dots, so the tumour-cell radius "
                         "cannot be measured; give the radius in pixels")
    return float(np.median(dist) / 2)


def folder_radius(root: PathLike) -> float:
    """:func:`cell_radius` over the dots of every image a BRCA-M2C folder lists (all its splits),
    so that every subset of its images is labelled with the same cell size."""
    root = Path(root).expanduser()
    tables = []
    for _, name, _ in _listed_images(root, None):
        label = root / "labels" / (Path(name).stem + _LABEL_SUFFIX)
        if label.is_file():
            tables.append(read_brca_m2c_points(label).assign(image=name))
    return cell_radius(pd.concat(tables) if tables else
                       pd.DataFrame(columns=["x", "y", "cls", "image"]))


def cell_regions(shape: tuple[int, int], points: pd.DataFrame, radius: float,
                 tissue: np.ndarray | None = None) -> np.ndarray:
    """Each pixel's cell: the index (row of ``points``) of its nearest dot, or -1.

    A pixel belongs to the nearest dot (Euclidean, pixel centres at integer coordinates, as the
    dots are) when it is tissue and at most ``radius`` from it; other pixels are -1. That is the
    Voronoi partition of the tissue by the dots, clipped to discs of ``radius``. A pixel exactly
    as far from two dots goes to either (scipy's k-d tree decides).

    Parameters
    ----------
    shape : (H, W)
    points : DataFrame with ``x``, ``y``
    radius : float
        In pixels, > 0.
    tissue : bool array (H, W), optional
        Default: every pixel.

    Returns
    -------
    np.ndarray of int64, shape (H, W)
    """
    from scipy.spatial import cKDTree

    if not radius > 0:
        raise ValueError(f"cell_regions: radius must be positive, got {radius!r}")
    h, w = shape
    out = np.full((h, w), -1, np.int64)
    if len(points) == 0:
        return out
    mask = np.ones((h, w), bool) if tissue is None else np.asarray(tissue, bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    tree = cKDTree(points[["x", "y"]].to_numpy(np.float64))
    dist, idx = tree.query(np.column_stack([xs, ys]).astype(np.float64), k=1,
                           distance_upper_bound=float(radius) * (1 + 1e-12))
    inside = np.isfinite(dist)
    out[ys[inside], xs[inside]] = idx[inside]
    return out


def window_starts(length: int, window: int) -> list[int]:
    """Evenly spaced starts of square windows that cover ``length`` pixels: ``ceil(length /
    window)`` of them (one when ``window >= length``, flush with both edges), so neighbours overlap
    by less than a window. The same covering as `cellulib predict --mpp`.

    >>> window_starts(500, 256), window_starts(512, 256), window_starts(200, 256)
    ([0, 244], [0, 256], [0])
    """
    if window >= length:
        return [0]
    n = math.ceil(length / window)
    return [int(s) for s in np.linspace(0, length - window, n).round().astype(int)]


def image_proxies(img: np.ndarray, points: pd.DataFrame, radius: float,
                  window: int | None = None, min_tissue: float = 0.5,
                  tissue: np.ndarray | None = None, name: str = "image") -> pd.DataFrame:
    """Both proxies of one image, whole or per window (see the module notes).

    Parameters
    ----------
    img : (H, W, 3) uint8
    points : DataFrame
        The image's dots: ``x``, ``y``, ``cls`` (``malignant`` is tumour).
    radius : float
        The cells' radius in pixels (:func:`cell_radius`).
    window : int, optional
        Side of square windows (:func:`window_starts` on each axis); default: the whole image.
    min_tissue : float
        A field with a smaller share of tissue has no proxy.
    tissue : bool array, optional
        The tissue mask; default :func:`tissue_mask` of ``img``.
    name : str
        The file, for the messages.

    Returns
    -------
    pandas.DataFrame
        One row per field: ``x``, ``y``, ``size`` (the window; ``size`` is the image's longer
        side for a whole image), ``count`` and ``area`` (NaN when undefined), ``n_nuclei``,
        ``n_tumour`` (dots inside the field), ``tissue_fraction``, ``error`` (``""``, or why the
        proxies are undefined, naming ``name``). A whole image's area proxy counts the pixels of
        every cell; a window's, the pixels of the cells inside the window (a cell cut by the
        window's edge counts in part).
    """
    h, w = img.shape[:2]
    if tissue is None:
        tissue = tissue_mask(img)
    regions = cell_regions((h, w), points, radius, tissue)
    is_tumour = np.append((points["cls"] == "malignant").to_numpy(), False)  # index -1: no cell
    tumour_px = is_tumour[regions]
    xs, ys = points["x"].to_numpy(np.float64), points["y"].to_numpy(np.float64)
    tumour_dot = points["cls"].to_numpy() == "malignant"
    if window is None:
        fields = [(0, 0, w, h)]
    else:
        if int(window) < 1:
            raise ValueError(f"window must be a positive number of pixels, got {window}")
        win = int(window)
        fields = [(x, y, min(win, w), min(win, h))
                  for y in window_starts(h, win) for x in window_starts(w, win)]
    rows = []
    for x0, y0, fw, fh in fields:
        inside = (xs >= x0 - 0.5) & (xs < x0 + fw - 0.5) & (ys >= y0 - 0.5) & (ys < y0 + fh - 0.5)
        n, nt = int(inside.sum()), int((inside & tumour_dot).sum())
        t = tissue[y0:y0 + fh, x0:x0 + fw]
        frac = float(t.mean())
        where = name if window is None else f"{name} window x={x0} y={y0}"
        error = ""
        if n == 0:
            error = f"{where}: no annotated nuclei, so no proxy"
        elif frac < min_tissue or not t.any():
            error = (f"{where}: {frac:.0%} tissue, under min_tissue={min_tissue:g}, so no proxy")
        count = nt / n if not error else math.nan
        area = (float(tumour_px[y0:y0 + fh, x0:x0 + fw].sum()) / float(t.sum())
                if not error else math.nan)
        rows.append({"x": x0, "y": y0, "size": max(fw, fh), "count": count, "area": area,
                     "n_nuclei": n, "n_tumour": nt, "tissue_fraction": frac, "error": error})
    return pd.DataFrame(rows, columns=["x", "y", "size", "count", "area", "n_nuclei", "n_tumour",
                                       "tissue_fraction", "error"])


def _listed_images(root: Path, splits) -> list[tuple[str, str, Path]]:
    """(split, image file name, split file) of the chosen splits, in split-file order."""
    available = {s: root / f for s, f in BRCA_M2C_SPLITS.items() if (root / f).is_file()}
    chosen = list(available) if not splits else list(splits)
    unknown = [s for s in chosen if s not in BRCA_M2C_SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {list(BRCA_M2C_SPLITS)}")
    absent = [s for s in chosen if s not in available]
    if absent:
        raise DataError(f"{root}: no {', '.join(BRCA_M2C_SPLITS[s] for s in absent)} (this copy "
                        f"has the splits {list(available)})")
    out = []
    for s in chosen:
        for line in available[s].read_text(encoding="utf-8-sig", errors="replace").splitlines():
            if line.strip():
                out.append((s, line.strip(), available[s]))
    return out


def proxy_labels(root: PathLike, kind: str = "count", splits=None, window: int | None = None,
                 radius: float | None = None, min_tissue: float = 0.5,
                 crops_dir: PathLike | None = None, images=None) -> pd.DataFrame:
    """Proxy labels for the images of a BRCA-M2C folder, one row per image or window.

    Reads the split files the folder holds (or ``splits``), each listed ``images/{name}`` and its
    ``labels/{stem}_gt_class_coords.txt``, and computes both proxies with :func:`image_proxies`;
    ``cellularity`` holds the ``kind`` chosen. ``radius`` None measures it on the chosen images
    (:func:`cell_radius`). With ``window``, each window is written as a PNG to ``crops_dir``
    (``{stem}_x{X}_y{Y}.png``) and ``path`` names that file, so ``cellulib predict`` can score the
    same windows. ``images``: only these image stems (file names without suffix) of the chosen
    splits, e.g. the held-out patients of :func:`cellulib.data.breastpathq.patient_split`. Used by
    ``cellulib proxy`` and :mod:`cellulib.reporting.realtissue`.

    A listed image that is missing, a missing or empty dot file, and a field without a proxy
    (:func:`image_proxies`) give a row with an empty ``cellularity`` and the reason in ``error``,
    naming the file; the others are computed.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`LABEL_COLUMNS`: ``path``, ``cellularity``, ``error``, ``proxy``
        (the kind), ``image`` (stem), ``patient`` (:func:`patient_of`), ``split``, ``x``, ``y``,
        ``size``, ``count``, ``area``, ``n_nuclei``, ``n_tumour``, ``tissue_fraction``,
        ``radius_px``.

    Raises
    ------
    cellulib.DataError
        The folder is not BRCA-M2C (the message describes both dataset layouts), or a split asked
        for is not in it.
    """
    from cellulib.files.imageio import write_bytes_if_changed

    if kind not in KINDS:
        raise ValueError(f"unknown proxy kind {kind!r}; choose one of {list(KINDS)}")
    if window is not None and crops_dir is None:
        raise ValueError("windows need a folder to write them to (crops_dir, --crops), so that "
                         "cellulib predict can score the same windows")
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise ValueError(f"min_tissue must lie in [0, 1], got {min_tissue}")
    root = Path(root).expanduser()
    layout = detect_layout(root)  # names both layouts when it is neither
    if layout != "brca-m2c":
        raise DataError(f"{root}: a {layout} folder, but proxies need BRCA-M2C's nucleus dots; "
                        f"give a BRCA-M2C folder (brca_ds_*.txt beside images/ and labels/)")
    listed = _listed_images(root, splits)
    if images is not None:
        wanted = {str(i) for i in images}  # stems (which may hold dots) or file names
        listed = [item for item in listed if item[1] in wanted or Path(item[1]).stem in wanted]
    items = []  # (split, name, image path, points or None, error)
    for split, name, split_file in listed:
        image = root / "images" / name
        label = root / "labels" / (Path(name).stem + _LABEL_SUFFIX)
        error, pts = "", None
        if not image.is_file():
            error = f"{image}: image file not found (listed in {split_file.name})"
        elif not label.is_file():
            error = f"{image}: no dot file {label}"
        else:
            pts = read_brca_m2c_points(label)
            if pts.empty:
                error = f"{label}: no dots, so no proxy for {name}"
        items.append((split, name, image, pts, error))
    if radius is None:
        tables = [p.assign(image=name) for _, name, _, p, err in items if not err]
        radius = cell_radius(pd.concat(tables) if tables else
                             pd.DataFrame(columns=["x", "y", "cls", "image"]))
    elif not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    crops = None if crops_dir is None else Path(crops_dir)
    rows = []
    for split, name, image, pts, error in items:
        stem = Path(name).stem
        base = {"proxy": kind, "image": stem, "patient": patient_of(name), "split": split,
                "radius_px": round(float(radius), 3)}
        if error:
            rows.append(base | {"path": str(image), "cellularity": math.nan, "error": error})
            continue
        try:
            img = read_image(image)
        except (DataError, OSError) as exc:
            rows.append(base | {"path": str(image), "cellularity": math.nan,
                                "error": " ".join(str(exc).split())})
            continue
        table = image_proxies(img, pts, radius, window=window, min_tissue=min_tissue,
                              name=str(image))
        for r in table.itertuples(index=False):
            path = str(image)
            if window is not None:
                import cv2

                path = str(crops / f"{stem}_x{r.x}_y{r.y}.png")
                crop = np.ascontiguousarray(img[r.y:r.y + r.size, r.x:r.x + r.size, ::-1])
                ok, png = cv2.imencode(".png", crop)
                write_bytes_if_changed(path, png.tobytes())  # a re-run leaves the same file alone
            rows.append(base | r._asdict() | {"path": path,
                                              "cellularity": getattr(r, kind)})
    ints = ("x", "y", "size", "n_nuclei", "n_tumour")
    return pd.DataFrame(rows, columns=list(LABEL_COLUMNS)).astype(
        {c: "Int64" for c in ints} | {"cellularity": "float64", "count": "float64",
                                      "area": "float64", "tissue_fraction": "float64"})
