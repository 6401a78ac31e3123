"""Writing the synthetic dataset in the BreastPathQ layout (SPEC 1.2): rendered patches as TIFF
files, their cellularity labels as CSV tables and their nuclei as PathCore-style cell XML, so one
reader (:func:`cellulib.data.breastpathq.read_breastpathq`) reads real and synthetic data alike.
Used through :func:`cellulib.data.datasets.get_dataset` in every chapter.
"""

from __future__ import annotations

import io
import math
import numbers
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from cellulib.data.synth import (
    GENERATORS,
    render_patch,
    sample_cellularity,
    sample_slide_style,
)
from cellulib.data.profiles import check_int
from cellulib.files.imageio import atomic_write_bytes

__all__ = [
    "make_breastpathq",
    "cell_xml",
]


# --------------------------------------------------------------------------------------------------
# Writing the BreastPathQ layout
# --------------------------------------------------------------------------------------------------
def _tiff_bytes(img: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    # Uncompressed, no metadata: the same layout as the real BreastPathQ patches, and byte-identical
    # on every run (no timestamps).
    tifffile.imwrite(buf, img, photometric="rgb", metadata=None)
    return buf.getvalue()


def _csv_bytes(df: pd.DataFrame, float_format: str | None = None) -> bytes:
    return df.to_csv(index=False, float_format=float_format, lineterminator="\n").encode()


def cell_xml(identifier: str, points: pd.DataFrame, first_region: int = 1) -> str:
    """PathCore Session Printer XML with one point graphic per description (SPEC 1.1).

    The format of the BreastPathQ ``cells`` annotations (paper section 4.1: X, Y coordinates of
    lymphocytes, malignant and normal epithelial nuclei in 153 patches).  Used in chapter 2 through
    :func:`cellulib.data.datasets.get_dataset`, which writes the dataset with :func:`make_breastpathq`.

    Parameters
    ----------
    identifier : str
        Image file name, e.g. ``"17_Region 60_crop.tif"``.
    points : pandas.DataFrame
        Columns x, y (pixels) and description.
    first_region : int
        Number of the first graphic (``name="Region N"``); later groups count up.

    Returns
    -------
    str
        The XML document.
    """
    session = ET.Element("session", software="PathCore Session Printer")
    image = ET.SubElement(session, "image", identifier=identifier)
    overlays = ET.SubElement(image, "overlays")
    for k, (desc, grp) in enumerate(points.groupby("description", sort=True)):
        graphic = ET.SubElement(overlays, "graphic", type="point", name=f"Region {first_region + k}",
                                description=str(desc))
        plist = ET.SubElement(graphic, "point-list")
        for x, y in zip(grp["x"].to_numpy(), grp["y"].to_numpy()):
            ET.SubElement(plist, "point").text = f"{int(x)},{int(y)}"
    ET.indent(session, space="  ")
    return ET.tostring(session, encoding="unicode") + "\n"


def _slide_plan(rng, n_patches: int, ids: np.ndarray):
    """Assign patches to slides (about 12 per slide, 2 at least when possible, 64 at most)."""
    if n_patches == 0:
        return np.zeros(0, int), np.zeros(0, int), 0
    n_slides = int(min(n_patches, 64, max(2, math.ceil(n_patches / 12))))
    slide_of = rng.permutation(np.arange(n_patches) % n_slides)
    rid = np.zeros(n_patches, int)
    for k in range(n_slides):
        members = np.flatnonzero(slide_of == k)
        rid[members] = np.arange(1, len(members) + 1)
    return ids[:n_slides][slide_of], rid, n_slides


def make_breastpathq(root, n_train: int, n_val: int, n_cells: int, size: int = 512, seed: int = 0,
                     label_noise: float = 0.0, progress: bool = True, *,
                     scale: float = 1.0, generator: str = "default") -> Path:
    """Write a synthetic BreastPathQ dataset (SPEC 1.1 layout) with exact truth beside it.

    SPEC 1.2: the embedded default dataset of the book, standing in for the BreastPathQ data of
    paper section 4.1.  Writes ``ROOT/datasets/{train,validation}/{slide}_{rid}.tif``,
    ``train_labels.csv`` and ``val_labels.csv`` (``slide,rid,y``; y is the truth plus optional
    Gaussian rater noise, clipped to [0, 1] and rounded to 0.01), the ``cells`` crops with their
    PathCore XML, ``ROOT/patient_ids.csv`` and ``ROOT/truth.csv`` (split, slide, rid, exact
    cellularity, target, label written, nuclei per class, tissue fraction).

    Slides get 5-digit ids, patches of a slide share its :class:`cellulib.data.synth.SlideStyle`,
    and each patient owns
    one to three slides.  Validation patches come from held-out slides of held-out patients (in the
    real challenge data the split is not documented at slide level; held-out slides make the
    validation score an honest estimate for new slides).  Every file is written atomically; the
    same arguments give byte-identical files.  Prints nothing but the tqdm bar.  Used in chapter 1
    through :func:`cellulib.data.datasets.get_dataset`, and by ``cellulib synth ROOT``.

    Parameters
    ----------
    root : str or Path
        Output folder (created).
    n_train, n_val, n_cells : int
        Number of training, validation and annotated-cells patches.
    size : int
        Patch width and height in pixels.
    seed : int
        Seed of everything.
    label_noise : float
        Standard deviation of the Gaussian rater noise added to the labels (0 = exact truth).
    progress : bool
        Show a tqdm progress bar.
    scale : float
        Pixels per BreastPathQ pixel (see :func:`cellulib.data.synth.render_patch`).
    generator : str
        A key of :data:`cellulib.data.synth.GENERATORS`: ``"default"`` or ``"calibrated"`` (the
        parameters calibrated to real tissue, issue 23).

    Returns
    -------
    Path
        ``root``.
    """
    from tqdm import tqdm

    n_train = check_int("n_train", n_train, 0)
    n_val = check_int("n_val", n_val, 0)
    n_cells = check_int("n_cells", n_cells, 0)
    size = check_int("size", size, 32)
    seed = check_int("seed", seed, 0)
    if not (isinstance(label_noise, numbers.Real) and 0.0 <= label_noise <= 1.0):
        raise ValueError(f"label_noise must be a standard deviation in [0, 1], got {label_noise!r}")
    if not (isinstance(scale, numbers.Real) and 0.2 <= scale <= 4.0):
        raise ValueError(f"scale must be a number in [0.2, 4], got {scale!r}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    params = GENERATORS[generator]

    root = Path(root)
    data = root / "datasets"
    dirs = {"train": data / "train", "validation": data / "validation", "cells": data / "cells"}
    try:
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{root}: cannot create the dataset folders ({exc})") from exc

    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    slide_ids = plan_rng.choice(np.arange(10000, 100000), size=128, replace=False)
    tr_slide, tr_rid, n_tr_slides = _slide_plan(plan_rng, n_train, slide_ids[:64])
    va_slide, va_rid, n_va_slides = _slide_plan(plan_rng, n_val, slide_ids[64:])
    # Patients: one to three consecutive slides each, never shared between train and validation.
    patients, next_patient = [], 1
    for slides in (slide_ids[:n_tr_slides], slide_ids[64:64 + n_va_slides]):
        k = 0
        while k < len(slides):
            m = int(plan_rng.integers(1, 4))
            patients += [(next_patient, int(sl)) for sl in slides[k:k + m]]
            next_patient += 1
            k += m
    styles = {int(sl): sample_slide_style(np.random.default_rng(np.random.SeedSequence([seed, 1, k])))
              for k, sl in enumerate(slide_ids)}
    # Cells crops come from their own small-numbered slides, like "17_Region 60_crop.tif".
    n_cell_slides = max(1, math.ceil(n_cells / 6))
    cell_slides = np.sort(plan_rng.choice(np.arange(1, 100), size=min(n_cell_slides, 99),
                                          replace=False))
    cell_of = np.sort(np.arange(n_cells) % len(cell_slides))
    targets = sample_cellularity(n_train + n_val + n_cells,
                                 np.random.default_rng(np.random.SeedSequence([seed, 2])))
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))

    jobs = [("train", int(a), int(b)) for a, b in zip(tr_slide, tr_rid)]
    jobs += [("validation", int(a), int(b)) for a, b in zip(va_slide, va_rid)]
    region = {}
    for k in range(n_cells):
        sl = int(cell_slides[cell_of[k]])
        region[sl] = region.get(sl, int(plan_rng.integers(1, 40))) + int(plan_rng.integers(5, 12))
        jobs.append(("cells", sl, region[sl]))

    truth, labels = [], {"train": [], "validation": []}
    bar = tqdm(total=len(jobs), desc="synth", unit="patch", disable=not progress)
    for k, (split, slide, rid) in enumerate(jobs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 4, k]))
        style = styles.get(slide) or sample_slide_style(
            np.random.default_rng(np.random.SeedSequence([seed, 5, slide])))
        patch = render_patch(size, float(targets[k]), rng, style=style, scale=scale,
                             with_masks=False, params=params)
        y = patch.cellularity
        if label_noise > 0:
            y = float(np.clip(y + noise_rng.normal(0.0, label_noise), 0.0, 1.0))
        y = round(y, 2)
        if split == "cells":
            name = f"{slide}_Region {rid}_crop.tif"
            atomic_write_bytes(dirs["cells"] / name, _tiff_bytes(patch.img))
            xml = cell_xml(name, patch.points, first_region=rid + 1)
            atomic_write_bytes(dirs["cells"] / f"{slide}_Region {rid}_key.xml", xml.encode())
        else:
            atomic_write_bytes(dirs[split] / f"{slide}_{rid}.tif", _tiff_bytes(patch.img))
            labels[split].append((slide, rid, y))
        truth.append({"split": split, "slide": slide, "rid": rid,
                      "cellularity": patch.cellularity, "target": float(targets[k]), "y": y,
                      "n_malignant": patch.counts["malignant"], "n_normal": patch.counts["normal"],
                      "n_lymphocyte": patch.counts["lymphocyte"],
                      "n_fibroblast": patch.counts["fibroblast"],
                      "tissue_fraction": patch.tissue_fraction})
        bar.update(1)
    bar.close()

    cols = ["slide", "rid", "y"]
    atomic_write_bytes(data / "train_labels.csv",
                  _csv_bytes(pd.DataFrame(labels["train"], columns=cols), "%.2f"))
    atomic_write_bytes(data / "val_labels.csv",
                  _csv_bytes(pd.DataFrame(labels["validation"], columns=cols), "%.2f"))
    atomic_write_bytes(root / "patient_ids.csv",
                  _csv_bytes(pd.DataFrame(patients, columns=["patient_id", "slide"])))
    truth_cols = ["split", "slide", "rid", "cellularity", "target", "y", "n_malignant", "n_normal",
                  "n_lymphocyte", "n_fibroblast", "tissue_fraction"]
    atomic_write_bytes(root / "truth.csv", _csv_bytes(pd.DataFrame(truth, columns=truth_cols), "%.6f"))
    return root
