"""Datasets: the BreastPathQ reader (labels, folders, patients, cell-centroid XML), the training
Datasets and splits, and their DataLoaders.

One loader reads the real BreastPathQ dataset and what `cellulib.data.synthset` writes (SPEC 1.1):

```
ROOT/datasets/{train,validation}/{slide}_{rid}.tif
ROOT/datasets/train_labels.csv, val_labels.csv        slide,rid,y  (or p)
ROOT/datasets/cells/{N}_Region {M}_crop.tif + _key.xml
ROOT/patient_ids.csv                                  optional: patient_id,slide
```

Every bad input raises `DataError` (a `ValueError`) or warns with `DataWarning`, and the message names
the file and the problem. Images are read by :mod:`cellulib.files.imageio`; masks, normalisation and
augmentation are in :mod:`cellulib.data.transforms`.
"""
from __future__ import annotations

import atexit
import math
import random
import re
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import to_device

from cellulib.constants import DISC_DIAMETER, IMAGE_SUFFIXES, NUCLEUS_CLASSES, SEG_DOWNSCALE
from cellulib.data import transforms
from cellulib.data.annotations import (
    DESCRIPTION_TO_CLASS,
    is_brca_m2c,
    parse_pathcore_xml,
    read_brca_m2c,
)
from cellulib.data.transforms import (
    bins_target,
    cellularity_transforms,
    check_normalize,
    one_hot,
    seg_transforms,
    to_tensor_image,
    weak_label_map,
)
from cellulib.files.imageio import DataError, DataWarning, listing, read_csv_strings, read_image

__all__ = [
    "DESCRIPTION_TO_CLASS",
    "read_labels",
    "read_breastpathq",
    "read_cell_points",
    "read_cells",
    "SegDataset",
    "CellularityDataset",
    "seg_split",
    "cells_split",
    "patient_code",
    "patient_split",
    "PATIENT_VALID_PCT",
    "VALIDATIONS",
    "seg_dataloaders",
    "cellularity_dataloaders",
    "describe_layout",
    "pick_across_range",
]


_LAYOUT = (
    "expected the BreastPathQ layout ROOT/datasets/{train,validation}/{slide}_{rid}.tif with "
    "ROOT/datasets/train_labels.csv and val_labels.csv (header slide,rid,y), annotated cells in "
    "ROOT/datasets/cells/ ('{N}_Region {M}_crop.tif' + '_key.xml'), optional ROOT/patient_ids.csv; "
    "ROOT may be the folder holding datasets/ or datasets/ itself"
)


# --------------------------------------------------------------------------------------------------
# Labels and the BreastPathQ folder
# --------------------------------------------------------------------------------------------------
def read_labels(csv_path: str | Path) -> pd.DataFrame:
    """Read a BreastPathQ label file (``train_labels.csv`` or ``val_labels.csv``).

    SPEC 1.1: header ``slide,rid,y``; some copies name the label column ``p``. Used in chapter 1
    (data exploration) and by `read_breastpathq`.

    Parameters
    ----------
    csv_path : str or Path
        The CSV file.

    Returns
    -------
    pd.DataFrame
        Columns ``slide`` and ``rid`` (strings, as written in the file, so ``007`` keeps its zeros and
        matches the image name ``{slide}_{rid}.tif``) and ``cellularity`` (float64 in [0, 1]), in file
        order. Exact duplicate rows are dropped with a `DataWarning`.

    Raises
    ------
    DataError
        Missing file or column, both ``y`` and ``p`` present, an empty identifier, a label that is
        missing, not a number or outside [0, 1], or one patch labelled twice with different values.
        The message names the file and the CSV line numbers.
    """
    csv_path = Path(csv_path)
    df = read_csv_strings(csv_path)
    missing = [c for c in ("slide", "rid") if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; expected header slide,rid,y "
                        f"(found {list(df.columns)})")
    label_cols = [c for c in ("y", "p") if c in df.columns]
    if not label_cols:
        raise DataError(f"{csv_path}: no label column 'y' (or 'p'); found {list(df.columns)}")
    if len(label_cols) == 2:
        raise DataError(f"{csv_path}: both 'y' and 'p' columns present; which one is the label?")
    lines = np.arange(len(df)) + 2  # header is line 1

    slide = df["slide"].str.strip()
    rid = df["rid"].str.strip()
    bad_id = (slide.isna() | (slide == "") | rid.isna() | (rid == "")).to_numpy()
    if bad_id.any():
        raise DataError(f"{csv_path}: empty slide or rid on line(s) {listing(lines[bad_id])}")

    raw = df[label_cols[0]].str.strip()
    value = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    nan = ~np.isfinite(value)
    if nan.any():
        shown = [f"line {n}: {v!r}" for n, v in zip(lines[nan], raw[nan].tolist())]
        raise DataError(f"{csv_path}: missing or non-numeric label in column "
                        f"{label_cols[0]!r} ({listing(shown)})")
    out = (value < 0) | (value > 1)
    if out.any():
        shown = [f"line {n}: {v:g}" for n, v in zip(lines[out], value[out])]
        raise DataError(f"{csv_path}: cellularity outside [0, 1] ({listing(shown)})")

    labels = pd.DataFrame({"slide": slide.to_numpy(dtype=object),
                           "rid": rid.to_numpy(dtype=object), "cellularity": value})
    dup = labels.duplicated(["slide", "rid"], keep=False).to_numpy()
    if dup.any():
        conflict = labels[dup].groupby(["slide", "rid"])["cellularity"].nunique() > 1
        if conflict.any():
            pairs = [f"{s}_{r}" for s, r in conflict[conflict].index]
            raise DataError(f"{csv_path}: patches labelled twice with different values: "
                            f"{listing(pairs)}")
        warnings.warn(f"{csv_path}: {int(dup.sum())} duplicated rows (same label) kept once",
                      DataWarning, stacklevel=2)
        labels = labels.drop_duplicates(["slide", "rid"])
    return labels.reset_index(drop=True)


def _datasets_dir(root: str | Path) -> Path:
    """Resolve ROOT (holding ``datasets/``) or ``datasets/`` itself to the ``datasets`` folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; {_LAYOUT}")
    if (root / "datasets").is_dir():
        return root / "datasets"
    markers = ("train", "validation", "cells", "train_labels.csv", "val_labels.csv")
    if root.name == "datasets" or any((root / m).exists() for m in markers):
        return root
    raise DataError(f"{root}: no datasets/ folder here; {_LAYOUT}")


def _image_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}


def read_breastpathq(root: str | Path) -> pd.DataFrame:
    """Index the labelled BreastPathQ patches (train and validation) without opening the images.

    SPEC 1.1 and 7. Reads ``train_labels.csv`` and ``val_labels.csv`` and pairs each row with
    ``datasets/{train|validation}/{slide}_{rid}.tif``. A split whose label file is absent is left out
    (with a `DataWarning` if its folder holds images). Images are not decoded here (this stays fast
    for thousands of patches); the datasets raise `DataError` naming a bad file when they read it.
    Used in chapter 1 (data exploration) and by `cellularity_dataloaders`.

    Parameters
    ----------
    root : str or Path
        The folder holding ``datasets/``, or ``datasets/`` itself.

    Returns
    -------
    pd.DataFrame
        One row per labelled patch, in label-file order (train first): ``path`` (str, absolute),
        ``slide``, ``rid`` (str), ``cellularity`` (float64 in [0, 1]), ``split`` (``"train"`` or
        ``"validation"``), and ``patient_id`` (str, missing as NaN) when ``ROOT/patient_ids.csv``
        exists.

    Raises
    ------
    DataError
        Missing folder or no label file (the message describes the expected layout), a bad label
        file (see `read_labels`), labelled images missing on disk (some of them are listed), or a
        malformed ``patient_ids.csv``.

    Warns
    -----
    DataWarning
        Images on disk without a label row (named; they are not in the result), slides without a
        patient id.
    """
    ds = _datasets_dir(root)
    frames = []
    for split, csv_name in (("train", "train_labels.csv"), ("validation", "val_labels.csv")):
        csv_path, folder = ds / csv_name, ds / split
        on_disk = _image_names(folder)
        if not csv_path.is_file():
            if on_disk:
                warnings.warn(f"{folder}: {len(on_disk)} images but no {csv_name}; they are "
                              f"ignored ({listing(sorted(on_disk))})", DataWarning, stacklevel=2)
            continue
        labels = read_labels(csv_path)
        names = [f"{s}_{r}.tif" for s, r in zip(labels["slide"], labels["rid"])]
        missing = [n for n in names if n not in on_disk]
        if missing:
            where = folder if folder.is_dir() else f"{folder} (folder missing)"
            raise DataError(f"{csv_path}: {len(missing)} of {len(names)} labelled images are "
                            f"missing from {where}: {listing(missing)}")
        extra = sorted(on_disk - set(names))
        if extra:
            warnings.warn(f"{folder}: {len(extra)} images have no row in {csv_name} and are "
                          f"ignored: {listing(extra)}", DataWarning, stacklevel=2)
        labels.insert(0, "path", [str((folder / n).resolve()) for n in names])
        labels["split"] = split
        frames.append(labels)
    if not frames:
        raise DataError(f"{ds}: neither train_labels.csv nor val_labels.csv found; {_LAYOUT}")
    df = pd.concat(frames, ignore_index=True)

    for pid_path in (ds.parent / "patient_ids.csv", ds / "patient_ids.csv"):
        if pid_path.is_file():
            df = _merge_patient_ids(df, pid_path)
            break
    return df


def _merge_patient_ids(df: pd.DataFrame, pid_path: Path) -> pd.DataFrame:
    pids = read_csv_strings(pid_path)
    missing = [c for c in ("patient_id", "slide") if c not in pids.columns]
    if missing:
        raise DataError(f"{pid_path}: missing column(s) {missing}; expected header "
                        f"patient_id,slide (found {list(pids.columns)})")
    pids = pd.DataFrame({"slide": pids["slide"].str.strip().to_numpy(dtype=object),
                         "patient_id": pids["patient_id"].str.strip().to_numpy(dtype=object)})
    if (pids.isna() | (pids == "")).any(axis=None):
        raise DataError(f"{pid_path}: empty patient_id or slide value")
    pids = pids.drop_duplicates()
    multi = pids["slide"][pids["slide"].duplicated()].unique().tolist()
    if multi:
        raise DataError(f"{pid_path}: slides assigned to more than one patient: {listing(multi)}")
    out = df.merge(pids, on="slide", how="left", validate="many_to_one")
    unknown = sorted(out.loc[out["patient_id"].isna(), "slide"].unique().tolist())
    if unknown:
        warnings.warn(f"{pid_path}: no patient_id for {len(unknown)} slides (left as NaN): "
                      f"{listing(unknown)}", DataWarning, stacklevel=3)
    return out


# --------------------------------------------------------------------------------------------------
# Cell centroids
# --------------------------------------------------------------------------------------------------
_POINT_COLUMNS = ("x", "y", "description", "cls")


def _parse_cell_xml(xml_path: Path) -> tuple[pd.DataFrame, Counter]:
    """Points of the known classes and a Counter of skipped descriptions, accepting the real
    files' quirks (SPEC 1.1; see :func:`cellulib.data.annotations.parse_pathcore_xml`)."""
    return parse_pathcore_xml(xml_path, DESCRIPTION_TO_CLASS)


def annotation_points(path: Path) -> pd.DataFrame:
    """Nucleus points of one annotation file: PathCore XML, or a BRCA-M2C dot file (``.txt``)."""
    if path.suffix.lower() == ".txt":
        from cellulib.data.annotations import read_brca_m2c_points

        return read_brca_m2c_points(path)
    return _parse_cell_xml(path)[0]


def _skipped_message(skipped: Counter) -> str:
    return ", ".join(f"{d!r} ({n})" for d, n in sorted(skipped.items(), key=lambda kv: -kv[1]))


def read_cell_points(xml_path: str | Path) -> pd.DataFrame:
    """Read nucleus centroids from a PathCore Session Printer XML file.

    SPEC 1.1 and 7 (paper section 4.1): each ``<graphic>`` carries a ``description`` (the class)
    and a ``<point-list>`` of ``x,y`` pixel coordinates of the crop. Descriptions map to classes by
    `DESCRIPTION_TO_CLASS` after stripping outer whitespace; points of other descriptions are skipped
    and counted in one `DataWarning`. Used in chapter 1 through
    :func:`cellulib.reporting.plots.weak_mask_examples`, and in chapter 2 (weak segmentation).

    Parameters
    ----------
    xml_path : str or Path
        The ``*_key.xml`` file.

    Returns
    -------
    pd.DataFrame
        Columns ``x``, ``y`` (float64 pixels), ``description`` (as written, stripped) and ``cls``
        (``normal``, ``lymphocyte`` or ``malignant``), in file order; empty with these columns when
        the file has no points.

    Raises
    ------
    DataError
        A missing file, a file that is not PathCore XML, or a malformed point (not two comma-separated numbers, or
        negative); the message names the file and quotes the offending text.

    Examples
    --------
    >>> pts = read_cell_points("datasets/cells/17_Region 60_key.xml")  # doctest: +SKIP
    >>> pts.head(2)  # doctest: +SKIP
           x      y description        cls
    0   72.0   48.0         IDC  malignant
    1  101.0  230.0         IDC  malignant
    """
    xml_path = Path(xml_path)
    df, skipped = _parse_cell_xml(xml_path)
    if skipped:
        warnings.warn(f"{xml_path}: skipped {sum(skipped.values())} points with unknown "
                      f"descriptions: {_skipped_message(skipped)}", DataWarning, stacklevel=2)
    return df


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_cells(root: str | Path) -> pd.DataFrame:
    """Index the annotated ``cells`` patches and count their nuclei per class.

    SPEC 1.1: ``datasets/cells/{N}_Region {M}_crop.tif`` paired with ``{N}_Region {M}_key.xml``.
    Parses every XML (small) but opens no image. Unknown descriptions over all files are reported in
    one `DataWarning`. Used in chapter 1 (data exploration) and by `seg_dataloaders`.

    Parameters
    ----------
    root : str or Path
        The folder holding ``datasets/``, or ``datasets/`` itself.

    Returns
    -------
    pd.DataFrame
        One row per annotated patch, in natural name order: ``name`` (``"17_Region 60"``),
        ``image_path``, ``xml_path`` (str, absolute), ``n_normal``, ``n_lymphocyte``,
        ``n_malignant`` (int64).

    Raises
    ------
    DataError
        No ``cells`` folder, no complete crop/XML pair, or a bad XML file.

    Warns
    -----
    DataWarning
        A crop without its XML or an XML without its crop (named), unknown descriptions.
    """

    if is_brca_m2c(root):
        # BRCA-M2C (SPEC 1.4): the same table; "xml_path" holds the dot file, "split" the
        # official split, which the segmentation loaders then use (see `cells_split`)
        return read_brca_m2c(root).rename(columns={"label_path": "xml_path"})
    ds = _datasets_dir(root)
    cells = ds / "cells"
    if not cells.is_dir():
        from cellulib.data.annotations import BRCA_M2C_LAYOUT

        raise DataError(f"{cells}: folder not found; {_LAYOUT}; or, for nucleus annotations "
                        f"only, {BRCA_M2C_LAYOUT}")
    crops = {p.name[: -len("_crop.tif")]: p for p in cells.glob("*_crop.tif")}
    keys = {p.name[: -len("_key.xml")]: p for p in cells.glob("*_key.xml")}
    lonely = sorted([crops[n].name for n in crops.keys() - keys.keys()]
                    + [keys[n].name for n in keys.keys() - crops.keys()])
    if lonely:
        warnings.warn(f"{cells}: {len(lonely)} files without their crop/XML partner are ignored: "
                      f"{listing(lonely)}", DataWarning, stacklevel=2)
    names = sorted(crops.keys() & keys.keys(), key=_natural_key)
    if not names:
        raise DataError(f"{cells}: no '{{N}}_Region {{M}}_crop.tif' with its '_key.xml'; {_LAYOUT}")
    rows = []
    skipped_all: Counter = Counter()
    n_files_skipping = 0
    for name in names:
        pts, skipped = _parse_cell_xml(keys[name])
        skipped_all.update(skipped)
        n_files_skipping += bool(skipped)
        counts = pts["cls"].value_counts()
        rows.append({"name": name, "image_path": str(crops[name].resolve()),
                     "xml_path": str(keys[name].resolve()),
                     **{f"n_{c}": int(counts.get(c, 0)) for c in NUCLEUS_CLASSES}})
    if skipped_all:
        warnings.warn(f"{cells}: skipped {sum(skipped_all.values())} points with unknown "
                      f"descriptions in {n_files_skipping} XML files: "
                      f"{_skipped_message(skipped_all)}", DataWarning, stacklevel=2)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Datasets and DataLoaders
# --------------------------------------------------------------------------------------------------
def _split_key(key: Any) -> tuple[int, int | None]:
    """Dataset keys are an index or (index, per-sample seed) from `_SeededDataLoader`."""
    if isinstance(key, tuple):
        return int(key[0]), (None if key[1] is None else int(key[1]))
    return int(key), None


class _AugmentedDataset(torch.utils.data.Dataset):
    n_inp = 1  # fastai: the first element of a sample is the input, the rest the target

    def __init__(self, tfm, train: bool, length: int, normalize: str):
        self.tfm, self.train, self.length = tfm, train, int(length)
        self.normalize = check_normalize(normalize)
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.length

    def _augment(self, sample_seed: int | None, **data: np.ndarray) -> dict[str, np.ndarray]:
        if self.train and sample_seed is not None:
            # Seeding per sample makes a batch depend on (seed, epoch, position) only, whatever the
            # number of workers or the order in which they run.
            self.tfm.set_random_state(np.random.default_rng(sample_seed), random.Random(sample_seed))
        return self.tfm(**data)

    def preload(self) -> None:
        """Read every image now (e.g. before forking workers) instead of on first use."""
        for i in range(self._n_images()):
            self._load(i)

    def _n_images(self) -> int:
        raise NotImplementedError

    def _load(self, i: int) -> Any:
        raise NotImplementedError


class SegDataset(_AugmentedDataset):
    """Annotated ``cells`` patches -> (image, 4-channel weak mask) pairs.

    Paper section 4.2 / SPEC 2. Each image is read once (first use) and cached after the
    ``downscale`` reduction (cv2.INTER_AREA), together with its label map drawn at the reduced
    resolution (`weak_label_map` with scale = reduced size / original size). Training samples are
    random crops (`seg_transforms`); sample ``i`` uses image ``i % n_images``, so a dataset longer
    than the number of images draws several crops per image per epoch. Used in chapter 2 through
    :func:`cellulib.training.train.train_seg`.

    Items are ``(image, mask)``: image (3, size, size) float32 (normalised, [-1, 1] by default),
    mask (4, size, size) float32 one-hot (channels `CLASSES`).
    """

    def __init__(self, image_paths: Sequence[str], xml_paths: Sequence[str], size: int = 256,
                 downscale: float = SEG_DOWNSCALE, diameter: float = DISC_DIAMETER,
                 train: bool = True,
                 seed: int | None = None, length: int | None = None,
                 normalize: str = "minus_one_one", stain: str = "none"):
        if len(image_paths) != len(xml_paths) or not len(image_paths):
            raise ValueError("SegDataset needs one XML file per image and at least one image")
        if downscale <= 0 or diameter <= 0 or size <= 0:
            raise ValueError("size, downscale and diameter must be positive")
        super().__init__(seg_transforms(size, train=train, seed=seed, stain=stain), train,
                         len(image_paths) if length is None else length, normalize)
        self.image_paths, self.xml_paths = list(map(str, image_paths)), list(map(str, xml_paths))
        self.size, self.downscale, self.diameter = int(size), float(downscale), float(diameter)

    def _n_images(self) -> int:
        return len(self.image_paths)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            img = read_image(self.image_paths[i])
            h, w = img.shape[:2]
            img = transforms.downscale(img, self.downscale)
            points = annotation_points(Path(self.xml_paths[i]))  # read_cells already warned
            label = weak_label_map(points, img.shape, self.diameter,
                                   scale=(img.shape[1] / w, img.shape[0] / h))
            self._cache[i] = (img, label)
        return self._cache[i]

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, sample_seed = _split_key(key)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        img, label = self._load(idx % len(self.image_paths))
        out = self._augment(sample_seed, image=img, mask=label)
        mask = torch.from_numpy(one_hot(np.asarray(out["mask"], dtype=np.uint8)))
        return to_tensor_image(out["image"], self.normalize), mask


class CellularityDataset(_AugmentedDataset):
    """Labelled BreastPathQ patches -> (image, cellularity) pairs.

    Paper sections 3.4 and 4.4. Images are resized to ``size`` (cv2.INTER_AREA) when first read and
    cached at that size when ``cache`` is true (2394 patches at 512 px take 1.9 GB). Used in chapter
    3 through :func:`cellulib.training.train.train_sr` (SR) and chapter 4 (direct models).

    Items are ``(image, target)``: image (3, size, size) float32 (normalised, [-1, 1] by default);
    target for ``task="regression"`` a float32 tensor of shape (1,) holding the cellularity (so a
    batch is (B, 1), like the regression head's output), for ``task="classification"`` an int64
    scalar bin ``round(100 * cellularity)`` in 0..100 (a batch is (B,), as cross-entropy expects).
    """

    def __init__(self, paths: Sequence[str], cellularity: Sequence[float], size: int = 512,
                 train: bool = True, seed: int | None = None, normalize: str = "minus_one_one",
                 task: str = "regression", cache: bool = True, stain: str = "none"):
        if len(paths) != len(cellularity):
            raise ValueError("one cellularity per image path is needed")
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        super().__init__(cellularity_transforms(size, train=train, seed=seed, stain=stain), train,
                         len(paths), normalize)
        self.paths = list(map(str, paths))
        self.cellularity = np.asarray(cellularity, dtype=np.float64)
        self.size, self.task, self.cache = int(size), task, cache

    def _n_images(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        img = read_image(self.paths[i])
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.cache:
            self._cache[i] = img
        return img

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, sample_seed = _split_key(key)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        out = self._augment(sample_seed, image=self._load(idx))
        y = float(self.cellularity[idx])
        target = (torch.tensor([y], dtype=torch.float32) if self.task == "regression"
                  else bins_target(y))
        return to_tensor_image(out["image"], self.normalize), target


class _SeededDataLoader(DataLoader):
    """fastai DataLoader whose shuffling and augmentation follow one seed.

    fastai seeds its shuffling from Python's global `random` when the loader is built; here the
    loader's own generator starts from ``seed`` and, each epoch, also draws one seed per sample,
    passed to the dataset with the index. Batches then depend on (seed, epoch) only.
    """

    def __init__(self, dataset: Any = None, seed: int | None = None, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.seed = seed
        if seed is not None:
            self.rng = random.Random(seed)

    def get_idxs(self) -> list[tuple[int, int]]:
        idxs = super().get_idxs()
        return [(int(i), self.rng.randrange(2**32)) for i in idxs]

    def __iter__(self):
        # fastai starts its worker processes anew for every epoch (a new torch iterator per
        # `__iter__`), which costs more than a whole epoch of small batches on a GPU. With workers,
        # the batches go through one torch DataLoader whose workers persist across epochs (and
        # across `fit` calls on these DataLoaders); the epoch's keys are drawn here, in the main
        # process, exactly as fastai draws them, so the batches are the same for any worker count.
        if self.fake_l.num_workers == 0:
            yield from super().__iter__()
            return
        self.randomize()
        self.before_iter()
        keys = self.get_idxs()
        batches = [keys[i:i + self.bs] for i in range(0, len(keys), self.bs)]
        if batches and self.drop_last and len(batches[-1]) < self.bs:
            batches.pop()
        loader = self._persistent_loader()
        loader.sampler.batches = batches
        for b in loader:
            if self.pin_memory and type(b) == list:  # noqa: E721 (fastai's own test)
                b = tuple(b)
            if self.device is not None:
                # from pinned memory the copy is queued and the host goes on with the next batch
                b = to_device(b, self.device, non_blocking=self.pin_memory)
            yield self.after_batch(b)
        self.after_iter()

    def _persistent_loader(self) -> torch.utils.data.DataLoader:
        loader = getattr(self, "_workers_loader", None)
        if loader is None:
            loader = torch.utils.data.DataLoader(
                _Batches(self), sampler=_EpochBatches(), batch_size=None, collate_fn=_first,
                num_workers=self.fake_l.num_workers, persistent_workers=True,
                pin_memory=self.pin_memory, worker_init_fn=_one_thread,
                timeout=self.timeout or 0)
            self._workers_loader = loader
            _WITH_WORKERS.add(self)
        return loader

    def close_workers(self) -> None:
        """Stop the worker processes that `__iter__` keeps between epochs (also done when the
        loader is garbage collected and at exit); the next epoch starts new ones."""
        loader = self.__dict__.pop("_workers_loader", None)
        _WITH_WORKERS.discard(self)
        running = getattr(loader, "_iterator", None)
        if running is not None:
            running._shutdown_workers()  # joins the pin-memory thread, then the workers
            loader._iterator = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy sent to a worker process never carries the pool of workers
        return {k: v for k, v in self.__dict__.items() if k != "_workers_loader"}


#: Loaders whose worker processes are running, stopped at exit (`close_workers`): left to the
#: interpreter's shutdown, a loader in a reference cycle with pinned memory can hang the exit.
_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all_workers() -> None:
    for dl in list(_WITH_WORKERS):
        dl.close_workers()


def close_workers(dls: Any) -> None:
    """Stop the DataLoader worker processes of ``dls`` (fastai DataLoaders or one loader), kept
    between epochs on a GPU (`_SeededDataLoader`); used after training, so that the workers and
    their copies of the images do not outlive the model's training. Nothing happens without
    workers; iterating again starts new ones."""
    for dl in getattr(dls, "loaders", [dls]):
        if isinstance(dl, _SeededDataLoader):
            dl.close_workers()


class _EpochBatches:
    """Sampler of the persistent workers: the current epoch's batches of (index, seed) keys, one
    list per batch (a `_Batches` item), set by `_SeededDataLoader.__iter__` in the main process before each epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Batches(torch.utils.data.Dataset):
    """A batch of keys -> the batch fastai would make of them (`do_item`, then `do_batch`), made in a
    worker process."""

    def __init__(self, dl: _SeededDataLoader):
        self.dl = dl

    def __getitem__(self, keys: list[tuple[int, int]]) -> Any:
        items = [o for o in map(self.dl.do_item, keys) if o is not None]
        return self.dl.do_batch(items)


def _first(batch: Any) -> Any:
    return batch  # `_Batches` already collated (module level: picklable for the workers)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # as fastai's workers: the cores are shared among the workers


#: Environment variable that sets the DataLoader worker count of training (`loader_workers`).
WORKERS_ENV = "CELLULIB_WORKERS"

#: Most DataLoader workers `loader_workers` starts for a GPU.
MAX_GPU_WORKERS = 8


def loader_workers(device: Any = None, cpus: int | None = None) -> int:
    """DataLoader worker processes for training on ``device`` (None: the GPU when there is one).

    On a CPU, 0: reading and augmenting in the training process leaves every core to the
    arithmetic (on 2 cores, workers would compete with it). On a GPU the augmentation would leave
    the GPU idle between batches (issue 21 measured it idle in most samples of chapter 2), so it
    moves to ``min(MAX_GPU_WORKERS, cpus - 1)`` worker processes, at least 1, where ``cpus`` is
    the number of CPUs this process may use. `WORKERS_ENV` (``CELLULIB_WORKERS``), a
    non-negative integer, overrides both. Batches are the same for any count (`seg_dataloaders`),
    so the count is not part of a model's recipe. Used by :func:`cellulib.training.train.train_seg`,
    :func:`cellulib.training.train.train_direct` and :func:`cellulib.training.train.train_sr` through the data
    loaders.

    Examples
    --------
    >>> loader_workers("cpu"), loader_workers("cuda", cpus=16), loader_workers("cuda", cpus=1)
    (0, 8, 1)
    """
    import os

    given = os.environ.get(WORKERS_ENV, "").strip()
    if given:
        if not given.isdigit():
            raise ValueError(f"${WORKERS_ENV} must be a non-negative integer, got {given!r}")
        return int(given)
    dev = torch.device(device if device is not None
                       else "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return 0
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    return max(1, min(MAX_GPU_WORKERS, cpus - 1))


def _dataloaders(train_ds: _AugmentedDataset, valid_ds: _AugmentedDataset, bs: int, seed: int,
                 device: Any, num_workers: int | None) -> DataLoaders:
    if bs < 1:
        raise ValueError(f"bs must be at least 1, got {bs}")
    if device is None:
        from fastai.torch_core import default_device
        device = default_device()
    if num_workers is None:
        num_workers = loader_workers(device)
    if num_workers > 0:
        # Read in the parent once: forked workers share the cache instead of each re-reading.
        train_ds.preload()
        valid_ds.preload()
    # Pinned batches copy to a GPU without a staging copy, while the GPU computes.
    pin = num_workers > 0 and torch.device(device).type == "cuda"
    # drop_last keeps batch sizes equal (BatchNorm), unless the dataset is smaller than one batch.
    train = _SeededDataLoader(train_ds, seed=seed, bs=bs, shuffle=True,
                              drop_last=len(train_ds) >= bs, num_workers=num_workers,
                              pin_memory=pin)
    valid = _SeededDataLoader(valid_ds, seed=seed, bs=bs, shuffle=False, drop_last=False,
                              num_workers=num_workers, pin_memory=pin)
    return DataLoaders(train, valid, device=device)


def split_by_patient(df: pd.DataFrame, valid_pct: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level train/validation split: no patient has patches on both sides.

    Patches of one patient are correlated, so a patch-level split leaks (SPEC 1.1, patient_ids.csv).
    Groups are ``patient_id`` where the column exists and is set, else the slide. The sorted groups
    are permuted with ``numpy.random.default_rng(seed)`` and the first ``ceil(valid_pct * n_groups)``
    go to validation (the rule of scikit-learn's ``GroupShuffleSplit``), so the split depends on the
    set of groups and the seed only, not on row order. Used by `cellularity_dataloaders` when
    ``valid_pct`` is given (a BreastPathQ copy without validation labels).

    Parameters
    ----------
    df : pd.DataFrame
        Rows with a ``slide`` column (and optionally ``patient_id``), e.g. from `read_breastpathq`.
    valid_pct : float
        Fraction of groups (patients) for validation, in [0, 1).
    seed : int
        Seed of the permutation.

    Returns
    -------
    (np.ndarray, np.ndarray)
        Positional row indices (int64, ascending) of the training and validation rows.
    """
    if not 0 <= valid_pct < 1:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
    if "slide" not in df.columns and "patient_id" not in df.columns:
        raise ValueError("split_by_patient needs a 'slide' or 'patient_id' column")
    slide = df["slide"].astype(str) if "slide" in df.columns else pd.Series([""] * len(df))
    group = ("slide:" + slide).to_numpy(dtype=object)
    if "patient_id" in df.columns:
        pid = df["patient_id"]
        has = pid.notna().to_numpy()
        group[has] = ("patient:" + pid[has].astype(str)).to_numpy(dtype=object)
    groups = np.array(sorted(set(group)), dtype=object)
    n_valid = math.ceil(valid_pct * len(groups) - 1e-12)
    if valid_pct > 0 and n_valid >= len(groups):
        raise ValueError(f"valid_pct={valid_pct} leaves no training patient "
                         f"({len(groups)} patients/slides)")
    perm = np.random.default_rng(seed).permutation(len(groups))
    is_valid = np.isin(group, groups[perm[:n_valid]])
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def seg_split(n: int, valid_pct: float = 0.2, seed: int = 0,
              root: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of ``n`` annotated patches, as `seg_dataloaders` splits them.

    ``round(valid_pct * n)`` patches (at least 1 when valid_pct > 0), drawn with
    ``numpy.random.default_rng(seed)``, go to validation. Used through `cells_split` (chapter 2) for datasets without
    official splits.
    """
    if not 0 <= valid_pct < 1:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
    n_valid = int(round(valid_pct * n))
    if valid_pct > 0:
        n_valid = max(1, n_valid)
    if n - n_valid < 1:
        raise DataError(f"{root}: {n} annotated cells patches cannot be split into training and "
                        f"validation (valid_pct={valid_pct})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


#: How BRCA-M2C's training images are split for validation (issue 22): ``"patients"`` (the
#: default) holds out whole patients from the official train and val splits together
#: (`patient_split`); ``"official"`` keeps the official split, whose validation images share
#: patients with its training images (TCGA-A7-A0DB and TCGA-A7-A13G are in both).
VALIDATIONS: tuple[str, ...] = ("patients", "official")

#: Share of BRCA-M2C's train+val images held out, as whole patients, by `patient_split`.
PATIENT_VALID_PCT = 0.2

_TCGA_PATIENT = re.compile(r"TCGA-[0-9A-Z]{2}-[0-9A-Z]{4}")


def patient_code(name: str) -> str:
    """The TCGA patient of a BRCA-M2C image: the first 12 characters of its name
    (``"TCGA-A7-A0DB-01Z-00-DX1_..."`` -> ``"TCGA-A7-A0DB"``, the TCGA barcode's project, site
    and participant). Used by `patient_split`.

    Examples
    --------
    >>> patient_code("TCGA-A7-A0DB-01Z-00-DX1_20001_9001_1000_1000_0.9824")
    'TCGA-A7-A0DB'
    """
    code = Path(str(name)).name[:12]
    if not _TCGA_PATIENT.fullmatch(code):
        raise DataError(f"{name}: not a TCGA image name (expected it to start with a patient "
                        "code such as TCGA-A7-A0DB)")
    return code


def _patient_rank(code: str) -> str:
    import hashlib

    return hashlib.sha256(code.encode()).hexdigest()


def patient_split(cells: pd.DataFrame, valid_pct: float = PATIENT_VALID_PCT,
                  root: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """Patient-disjoint training and validation rows of a BRCA-M2C table (issue 22).

    The rows of the official ``train`` and ``val`` splits are pooled; their patients
    (`patient_code`) are ordered by the SHA-256 of the code and taken in that order, whole,
    until they hold at least ``max(1, round(valid_pct * n))`` of the ``n`` pooled images: those
    images validate, the others train, and no patient is on both sides. ``test`` rows are in
    neither (the official test split is for final numbers only). The split does not depend on a
    seed: every seed and every setting is compared on the same patients, so a difference between
    two runs is not a difference between two validation sets; and a patient's side depends on
    its own code only, not on which other images a copy holds. Used by `cells_split` (the
    default for BRCA-M2C), :func:`cellulib.training.train.train_seg` and the real-H&E chapter.

    Returns
    -------
    (np.ndarray, np.ndarray)
        Positional row indices (int64, ascending) of the training and validation rows.
    """
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be in (0, 1), got {valid_pct}")
    pool = np.flatnonzero(cells["split"].isin(["train", "val"]).to_numpy())
    codes = np.array([patient_code(n) for n in cells["name"].iloc[pool]], dtype=object)
    target = max(1, int(round(valid_pct * len(pool))))
    held: set[str] = set()
    n_held = 0
    for code in sorted(set(codes), key=_patient_rank):
        if n_held >= target:
            break
        held.add(code)
        n_held += int((codes == code).sum())
    is_valid = np.isin(codes, list(held))
    if is_valid.all():
        raise DataError(f"{root}: the {len(pool)} train and val images belong to "
                        f"{len(set(codes))} patient(s); holding out {valid_pct:.0%} of the images as "
                        "whole patients leaves none for training")
    return pool[~is_valid], pool[is_valid]


def cells_split(cells: pd.DataFrame, valid_pct: float = 0.2, seed: int = 0,
                root: str | Path = "", validation: str = "patients") -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows of an annotated-cells table (`read_cells`).

    A dataset with official splits (BRCA-M2C: a ``split`` column) is split by patient: with
    ``validation="patients"`` (the default), `patient_split` holds out
    `PATIENT_VALID_PCT` of the train+val images as whole patients, whatever ``valid_pct`` and
    ``seed``; with ``validation="official"`` the official ``train`` and ``val`` rows are kept.
    ``test`` rows are in neither. Otherwise `seg_split` draws ``valid_pct`` of the patches with
    ``seed``. Used by `seg_dataloaders`, by :func:`cellulib.training.train.train_seg` and in chapter 2.
    """
    if validation not in VALIDATIONS:
        raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
    if "split" in cells.columns and cells["split"].isin(["train", "val"]).any():
        if validation == "patients":
            return patient_split(cells, root=root)
        split = cells["split"].to_numpy()
        return np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    return seg_split(len(cells), valid_pct, seed, root)


def seg_dataloaders(root: str | Path, size: int = 256, downscale: float = SEG_DOWNSCALE,
                    bs: int = 8, diameter: float = DISC_DIAMETER, valid_pct: float = 0.2,
                    seed: int = 0, device: Any = None, num_workers: int | None = None,
                    patches_per_epoch: int | None = None,
                    normalize: str = "minus_one_one", stain: str = "none",
                    validation: str = "patients", mix: str | Path | None = None) -> DataLoaders:
    """fastai DataLoaders for the weak segmentation network from the annotated ``cells`` patches.

    Paper section 4.2 / SPEC 2: images downscaled by ``downscale`` (INTER_AREA), weak masks with
    discs of ``diameter`` pixels at that resolution, random ``size`` crops with flips, rotations,
    gamma, hue and saturation for training; centre crops without augmentation for validation. The
    patches are split by `cells_split`: at patch level, ``round(valid_pct * n)`` (at least 1 when
    valid_pct > 0) patches drawn with ``numpy.random.default_rng(seed)`` go to validation; a
    BRCA-M2C copy is split by patient (``validation``). Used in chapter 2
    through :func:`cellulib.training.train.train_seg`
    (weak segmentation).

    Batches are ``(xb, yb)``: xb (B, 3, size, size) float32 in [-1, 1] (or ImageNet-normalised),
    yb (B, 4, size, size) float32 one-hot in the channel order `CLASSES`. Given ``seed`` the
    batches (order, crops, augmentation) are the same on every run and for any ``num_workers``;
    each epoch draws new crops.

    Parameters
    ----------
    root : str or Path
        Folder holding ``datasets/`` (or ``datasets/`` itself) with a ``cells`` folder.
    size : int
        Crop side after downscaling (256 in the paper).
    downscale : float
        Reduction factor applied when an image is read (2 in the paper).
    bs : int
        Batch size.
    diameter : float
        Disc diameter in pixels at the downscaled resolution (15 in the paper).
    valid_pct : float
        Fraction of patches for validation, in [0, 1).
    seed : int
        Seed of the split, the shuffling and the augmentation.
    device : torch.device, str or None
        Where batches go; None picks fastai's default device (the GPU when there is one).
    num_workers : int or None
        DataLoader worker processes (images are then read in the parent first); None:
        `loader_workers` for ``device`` (0 on a CPU).
    patches_per_epoch : int or None
        Training samples per epoch; sample ``i`` is a random crop of image ``i % n_train``, so
        ``patches_per_epoch = 4 * n_train`` draws four crops of every image per epoch. None: one
        crop per image.
    normalize : str
        Pixel normalisation, one of `NORMALIZATIONS`.
    stain : str
        Stain augmentation of the training crops, one of `STAIN_AUGMENTS`.
    validation : str
        BRCA-M2C only, one of `VALIDATIONS`: whole held-out patients (``"patients"``) or the
        official validation split (``"official"``).
    mix : str or Path, optional
        A second annotated folder (e.g. synthetic patches beside BRCA-M2C) whose *training*
        patches (its own `cells_split`) join the training set, read at the same ``downscale`` and
        ``diameter``; validation stays on ``root``'s patches. Both must be drawn at the same pixel
        size (`cellulib.constants.MPP`).

    Returns
    -------
    fastai.data.core.DataLoaders
        ``dls.train``, ``dls.valid``; their datasets are `SegDataset` objects.
    """
    cells = read_cells(root)
    train_idx, valid_idx = cells_split(cells, valid_pct, seed, root, validation)
    n_valid = len(valid_idx)
    common = dict(size=size, downscale=downscale, diameter=diameter, normalize=normalize)
    tr, va = cells.iloc[train_idx], cells.iloc[valid_idx]
    if mix is not None:
        other = read_cells(mix)
        tr = pd.concat([tr, other.iloc[cells_split(other, valid_pct, seed, mix, validation)[0]]],
                       ignore_index=True)
    train_ds = SegDataset(tr["image_path"].tolist(), tr["xml_path"].tolist(), train=True,
                          seed=seed, length=patches_per_epoch, stain=stain, **common)
    if n_valid:
        valid_ds = SegDataset(va["image_path"].tolist(), va["xml_path"].tolist(), train=False,
                              **common)
    else:
        valid_ds = SegDataset(tr["image_path"].tolist(), tr["xml_path"].tolist(), train=False,
                              length=0, **common)
    return _dataloaders(train_ds, valid_ds, bs, seed, device, num_workers)


def cellularity_dataloaders(root: str | Path, size: int = 512, bs: int = 8, seed: int = 0,
                            device: Any = None, num_workers: int | None = None,
                            normalize: str = "minus_one_one", task: str = "regression",
                            valid_pct: float | None = None, cache: bool = True,
                            stain: str = "none") -> DataLoaders:
    """fastai DataLoaders of labelled patches for the cellularity models (SR and direct).

    Paper sections 3.2, 3.4, 4.3 and 4.4: the ``train`` split for training with
    `cellularity_transforms` augmentation, the ``validation`` split (resize only, file order) for
    validation. With ``valid_pct`` both come from the train split instead, split by patient with
    `split_by_patient`. Used in chapter 3 through :func:`cellulib.training.train.train_sr` (SR) and chapter 4
    (direct models).

    Batches are ``(xb, yb)``: xb (B, 3, size, size) float32 in [-1, 1] (or ImageNet-normalised);
    yb (B, 1) float32 cellularity for ``task="regression"`` or (B,) int64 bins 0..100 for
    ``task="classification"``. Deterministic for a seed, for any ``num_workers``.

    Parameters
    ----------
    root : str or Path
        Folder holding ``datasets/`` (or ``datasets/`` itself).
    size : int
        Images are resized to ``size`` x ``size``.
    bs : int
        Batch size.
    seed : int
        Seed of the shuffling, the augmentation and the optional patient split.
    device : torch.device, str or None
        Where batches go; None picks fastai's default device.
    num_workers : int or None
        DataLoader worker processes; None: `loader_workers` for ``device`` (0 on a CPU).
    normalize : str
        Pixel normalisation, one of `NORMALIZATIONS`.
    task : str
        ``"regression"`` or ``"classification"`` (101 bins), which sets the target format.
    valid_pct : float or None
        None: use the validation split. A fraction: patient-level validation set from train.
    cache : bool
        Keep resized images in memory.
    stain : str
        Stain augmentation of the training patches, one of `STAIN_AUGMENTS`.

    Returns
    -------
    fastai.data.core.DataLoaders
        ``dls.train``, ``dls.valid``; their datasets are `CellularityDataset` objects.
    """
    df = read_breastpathq(root)
    train = df[df["split"] == "train"]
    if valid_pct is None:
        valid = df[df["split"] == "validation"]
        if valid.empty:
            raise DataError(f"{root}: no validation split (val_labels.csv); pass valid_pct to "
                            "split the training patches by patient")
    else:
        tr_idx, va_idx = split_by_patient(train, valid_pct=valid_pct, seed=seed)
        train, valid = train.iloc[tr_idx], train.iloc[va_idx]
    if train.empty:
        raise DataError(f"{root}: no training patches (train_labels.csv)")
    common = dict(size=size, normalize=normalize, task=task, cache=cache)
    train_ds = CellularityDataset(train["path"].tolist(), train["cellularity"].to_numpy(),
                                  train=True, seed=seed, stain=stain, **common)
    valid_ds = CellularityDataset(valid["path"].tolist(), valid["cellularity"].to_numpy(),
                                  train=False, **common)
    return _dataloaders(train_ds, valid_ds, bs, seed, device, num_workers)


# --------------------------------------------------------------------------------------------------
# Exploration helpers
# --------------------------------------------------------------------------------------------------


def describe_layout(root: str | Path) -> pd.DataFrame:
    """Count the files of each part of a BreastPathQ folder (SPEC 1.1): one row per part with its
    relative path, what it holds and how many files. Used in chapter 1 (data exploration)."""
    ds = _datasets_dir(root)
    base = ds.parent
    parts = [
        ("datasets/train/", "training patches", len(list((ds / "train").glob("*.tif")))),
        ("datasets/validation/", "validation patches", len(list((ds / "validation").glob("*.tif")))),
        ("datasets/train_labels.csv", "training labels (slide, rid, y)",
         len(read_labels(ds / "train_labels.csv")) if (ds / "train_labels.csv").exists() else 0),
        ("datasets/val_labels.csv", "validation labels",
         len(read_labels(ds / "val_labels.csv")) if (ds / "val_labels.csv").exists() else 0),
        ("datasets/cells/*_crop.tif", "patches with marked nuclei",
         len(list((ds / "cells").glob("*_crop.tif")))),
        ("datasets/cells/*_key.xml", "nucleus centroids (PathCore XML)",
         len(list((ds / "cells").glob("*_key.xml")))),
        ("patient_ids.csv", "patient of each slide (optional)",
         len(pd.read_csv(base / "patient_ids.csv")) if (base / "patient_ids.csv").exists() else 0),
    ]
    return pd.DataFrame(parts, columns=["path", "holds", "rows or files"])


def pick_across_range(patches: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` patches at evenly spaced quantiles of cellularity (ties broken by ``seed``), sorted by
    cellularity. Used in chapter 1 to show patches across the range."""
    if n <= 0 or len(patches) == 0:
        raise ValueError(f"need n > 0 and at least one patch (n={n}, {len(patches)} patches)")
    shuffled = patches.sample(frac=1.0, random_state=seed).sort_values("cellularity", kind="stable")
    positions = np.unique(np.round(np.linspace(0, len(shuffled) - 1, min(n, len(shuffled)))).astype(int))
    return shuffled.iloc[positions].reset_index(drop=True)
