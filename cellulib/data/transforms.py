"""Targets and transforms: the weak masks a segmentation network learns from, pixel normalisation,
resizing, and the albumentations pipelines of training (paper sections 4.2 and 4.4).

Every function here works on in-memory arrays; :mod:`cellulib.data.breastpathq` reads the files and builds the
DataLoaders from them.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch

from cellulib.constants import (
    BACKGROUND,
    CLASSES,
    DISC_DIAMETER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_BINS,
    NORMALIZATIONS,
    NUCLEUS_CLASSES,
)

__all__ = [
    "weak_label_map",
    "weak_mask",
    "normalize_image",
    "normalize_batch",
    "to_tensor_image",
    "downscale",
    "scale_points",
    "HEDJitter",
    "STAIN_AUGMENTS",
    "seg_transforms",
    "cellularity_transforms",
    "bins_target",
]

_IMAGENET_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_IMAGENET_STD = np.array(IMAGENET_STD, dtype=np.float32)


def _point_arrays(points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        x = np.asarray(points["x"], dtype=np.float64).reshape(-1)
        y = np.asarray(points["y"], dtype=np.float64).reshape(-1)
        cls = np.asarray(points["cls"]).reshape(-1)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"points need numeric 'x', 'y' and a 'cls' column ({e})") from e
    if not (len(x) == len(y) == len(cls)):
        raise ValueError("points: 'x', 'y' and 'cls' differ in length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("points: x and y must be finite")
    if cls.dtype.kind in "iu":
        idx = cls.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() > 2):
            raise ValueError("points: integer classes must be 0 (normal), 1 (lymphocyte) or "
                             "2 (malignant)")
    else:
        lookup = {c: i for i, c in enumerate(NUCLEUS_CLASSES)}
        bad = sorted({str(c) for c in cls if c not in lookup})
        if bad:
            raise ValueError(f"points: unknown classes {bad}; expected {list(NUCLEUS_CLASSES)}")
        idx = np.array([lookup[c] for c in cls], dtype=np.int64)
    return x, y, idx


def weak_label_map(points: Any, shape: Sequence[int], diameter: float = DISC_DIAMETER,
                   scale: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Class index per pixel: a disc at each centroid, nearest centroid wins, 3 elsewhere.

    SPEC 2 / paper sections 3.1 and 4.1 (the weak segmentation targets), as an (H, W) label map;
    `weak_mask` is its one-hot form. Used in chapter 2 through :func:`cellulib.data.transforms.weak_mask`
    (weak segmentation).

    A pixel (row ``r``, column ``c``, centre at integer coordinates) is inside the disc of centroid
    ``(cx, cy)`` when ``(c - cx)**2 + (r - cy)**2 <= (diameter / 2)**2``. A pixel inside several
    discs takes the class of the nearest centroid; exact ties go to the point listed first.
    Coordinates are mapped to the resized grid with pixel centres aligned,
    ``cx = (x + 0.5) * scale - 0.5``, which is exactly how ``cv2.resize`` maps a pixel; for
    ``scale = 0.5`` this is ``x / 2 - 0.25`` (plain ``x * scale`` would shift every disc by a quarter
    pixel). Fully vectorised: every point's (diameter + 3)^2 window is scored at once and a lexsort
    picks the winner per pixel.

    Parameters
    ----------
    points : pd.DataFrame or mapping
        Columns ``x``, ``y`` (pixels of the original crop) and ``cls`` (class names of
        `NUCLEUS_CLASSES` or integers 0-2), e.g. from `read_cell_points`.
    shape : sequence of int
        (H, W, ...) of the output grid; extra entries are ignored.
    diameter : float
        Disc diameter in output pixels (15 in the paper, at the x2-downscaled resolution).
    scale : float or (float, float)
        Output size / original size, or ``(scale_x, scale_y)``.

    Returns
    -------
    np.ndarray
        (H, W) uint8 with values 0 normal, 1 lymphocyte, 2 malignant, 3 background.
    """
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"shape must be positive, got {tuple(shape)}")
    if not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number, got {diameter}")
    sx, sy = (float(scale), float(scale)) if np.isscalar(scale) else map(float, scale)
    if not (sx > 0 and sy > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    label = np.full((h, w), BACKGROUND, dtype=np.uint8)
    x, y, cls = _point_arrays(points)
    if x.size == 0:
        return label
    cx = (x + 0.5) * sx - 0.5
    cy = (y + 0.5) * sy - 0.5
    r2 = (diameter / 2.0) ** 2
    k = int(np.ceil(diameter / 2.0)) + 1
    off = np.arange(-k, k + 1)
    n, m = cx.size, off.size
    px = np.broadcast_to(np.floor(cx).astype(np.int64)[:, None, None] + off[None, None, :],
                         (n, m, m))
    py = np.broadcast_to(np.floor(cy).astype(np.int64)[:, None, None] + off[None, :, None],
                         (n, m, m))
    d2 = (px - cx[:, None, None]) ** 2 + (py - cy[:, None, None]) ** 2
    keep = (d2 <= r2) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    pix = (py * w + px)[keep]
    dist = d2[keep]
    pid = np.broadcast_to(np.arange(n)[:, None, None], (n, m, m))[keep]
    if pix.size == 0:
        return label
    # Sort by pixel, then distance, then point order: the first row per pixel is its winner.
    order = np.lexsort((pid, dist, pix))
    pix_sorted = pix[order]
    first = np.ones(pix_sorted.size, dtype=bool)
    first[1:] = pix_sorted[1:] != pix_sorted[:-1]
    win = order[first]
    label.reshape(-1)[pix[win]] = cls[pid[win]].astype(np.uint8)
    return label


def weak_mask(points: Any, shape: Sequence[int], diameter: float = DISC_DIAMETER,
              scale: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Four-channel weak segmentation target from nucleus centroids.

    SPEC 2 / paper sections 3.1 and 4.1: channels 0 normal, 1 lymphocyte, 2 malignant,
    3 background; a disc of ``diameter`` pixels at each centroid (coordinates times ``scale``,
    pixel centres aligned), overlaps to the nearest centroid, background where no disc is. Exactly
    one channel is 1 at every pixel. See `weak_label_map` for the geometry. Used in chapter 1 through
    :func:`cellulib.reporting.plots.weak_mask_examples`, and in chapter 2 (weak segmentation).

    Parameters
    ----------
    points : pd.DataFrame or mapping
        Columns ``x``, ``y``, ``cls`` (see `weak_label_map`).
    shape : sequence of int
        (H, W) of the mask.
    diameter : float
        Disc diameter in mask pixels.
    scale : float or (float, float)
        Mask size / size of the image the coordinates refer to (0.5 after the x2 downscale).

    Returns
    -------
    np.ndarray
        (4, H, W) float32 of zeros and ones.

    Examples
    --------
    >>> pts = pd.DataFrame({"x": [10.0], "y": [10.0], "cls": ["malignant"]})
    >>> m = weak_mask(pts, (21, 21))
    >>> m.shape, int(m[2].sum()), int(m.sum(axis=0).min())
    ((4, 21, 21), 177, 1)
    """
    label = weak_label_map(points, shape, diameter=diameter, scale=scale)
    return one_hot(label)


def one_hot(label: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.eye(len(CLASSES), dtype=np.float32)[label].transpose(2, 0, 1))


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def normalize_image(img: np.ndarray, normalize: str = "minus_one_one") -> np.ndarray:
    """Scale (..., 3) pixels in [0, 255] for the networks, as float32.

    ``"minus_one_one"`` maps [0, 255] linearly to [-1, 1] (paper section 4.2, used everywhere by
    default); ``"imagenet"`` subtracts the ImageNet mean and divides by its std after scaling to
    [0, 1] (for torchvision/timm ImageNet weights). Shared by training and prediction; used in
    chapters 2 and 3 through :func:`cellulib.models.networks.segment`, and in chapter 4 through
    :func:`cellulib.data.transforms.to_tensor_image`, and in chapter 5 through
    :func:`cellulib.training.train.train_gbt`.

    Examples
    --------
    >>> normalize_image(np.array([[[0, 127.5, 255]]]))
    array([[[-1.,  0.,  1.]]], dtype=float32)
    """
    check_normalize(normalize)
    x = np.asarray(img, dtype=np.float32)
    if normalize == "minus_one_one":
        return x / np.float32(127.5) - np.float32(1.0)
    return (x / np.float32(255.0) - _IMAGENET_MEAN) / _IMAGENET_STD


def normalize_batch(x: torch.Tensor, normalize: str = "minus_one_one") -> torch.Tensor:
    """`normalize_image` for a float32 (B, 3, H, W) batch of [0, 255] pixels on any device, in place.

    Division, not multiplication by the reciprocal: bit for bit the pixels of `normalize_image`,
    which the models were trained on. The divisors are tensors on ``x``'s device because CUDA
    divides by a Python number as a multiplication by its reciprocal (one bit off on some
    pixels). Used by :class:`cellulib.inference.predict.Predictor`.
    """
    check_normalize(normalize)

    def divisor(value) -> torch.Tensor:
        return torch.tensor(value, dtype=x.dtype, device=x.device)

    if normalize == "minus_one_one":
        return x.div_(divisor(127.5)).sub_(1.0)
    mean = divisor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = divisor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.div_(divisor(255.0)).sub_(mean).div_(std)


def to_tensor_image(img: np.ndarray, normalize: str = "minus_one_one") -> torch.Tensor:
    """(H, W, 3) image with pixels in [0, 255] -> (3, H, W) float32 tensor, normalised.

    The one conversion used by the DataLoaders and by prediction, so that both see the same pixels
    (paper section 4.2: [0, 255] -> [-1, 1]). Used in chapter 4 and by `cellulib predict`, and in
    chapter 2 through :func:`cellulib.training.train.train_seg`, and in chapter 3 through
    :func:`cellulib.training.train.train_sr`, and in chapter 5 through :func:`cellulib.training.train.train_direct`.

    Parameters
    ----------
    img : np.ndarray
        (H, W, 3) array, typically uint8 from `read_image`.
    normalize : str
        One of `NORMALIZATIONS`.

    Returns
    -------
    torch.Tensor
        (3, H, W) float32.
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(normalize_image(img, normalize).transpose(2, 0, 1)))


def _shared_random_state(tfm: A.Compose, seed: int | None) -> A.Compose:
    # Compose(seed=s) gives every child its own generator seeded with the same s, so two
    # transforms with the same p fire together (HorizontalFlip and VerticalFlip always both or
    # neither, checked in albumentations 2.0.8). One shared generator avoids that correlation.
    tfm.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return tfm


#: Stain augmentations of the ``stain_augment`` profile setting (issue 12): ``none`` (the paper's
#: gamma and hue/saturation only) or ``hed`` (also `HEDJitter`).
STAIN_AUGMENTS = ("none", "hed")


class HEDJitter(A.ImageOnlyTransform):
    """Stain augmentation in HED space: haematoxylin and eosin optical densities scaled by a factor
    drawn from ``1 +/- scale`` and shifted by one from ``+/- shift`` (uniform, H and E drawn
    independently), as :func:`cellulib.data.stain.hed_perturb` applies them (Tellez et al. 2018's HED
    jitter). The defaults span the scale of the stain-shift chapter's ``hed`` shift up to strength
    0.6 and its tint up to 0.2. A larger tint (0.03) left ResNet34 (R) at the mean predictor after
    the quick profile's 30 epochs (seed 0; validation MSE 0.132): the synthetic patches' haematoxylin
    is pale (mean optical density 0.016), and +/- 0.03 erases or triples it. Used when the
    ``stain_augment`` setting is ``hed`` (``cellulib train --stain-augment hed``, and the two models
    the stain-shift chapter retrains)."""

    def __init__(self, scale: float = 0.3, shift: float = 0.01, p: float = 0.8):
        super().__init__(p=p)
        if not (0 <= scale < 1 and shift >= 0):
            raise ValueError(f"HEDJitter needs 0 <= scale < 1 and shift >= 0, got {scale}, {shift}")
        self.scale, self.shift = float(scale), float(shift)

    def get_params(self) -> dict[str, float]:
        s, t = self.scale, self.shift
        u = self.random_generator.uniform(-1.0, 1.0, size=4)
        return {"h_scale": 1 + s * u[0], "e_scale": 1 + s * u[1],
                "h_shift": t * u[2], "e_shift": t * u[3]}

    def apply(self, img: np.ndarray, h_scale: float = 1.0, e_scale: float = 1.0,
              h_shift: float = 0.0, e_shift: float = 0.0, **params: Any) -> np.ndarray:
        from cellulib.data.stain import hed_perturb

        return hed_perturb(img, h_scale, e_scale, h_shift, e_shift)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "shift")


def _flips_and_colour(stain: str = "none") -> list[A.BasicTransform]:
    if stain not in STAIN_AUGMENTS:
        raise ValueError(f"unknown stain augmentation {stain!r}; choose one of {STAIN_AUGMENTS}")
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        *([HEDJitter()] if stain == "hed" else []),
        A.RandomGamma(gamma_limit=(80, 120), p=0.5),
        # Small hue shifts: H&E colour varies between labs, but haematoxylin must stay blue-purple.
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=0, p=0.5),
    ]


def seg_transforms(size: int = 256, train: bool = True, seed: int | None = None,
                   stain: str = "none") -> A.Compose:
    """Augmentation for the weak segmentation network (image and label mask together).

    Paper section 4.2 / SPEC 2: a random ``size`` x ``size`` crop of the x2-downscaled image with
    flips, rotation (RandomRotate90 and a small Rotate of up to 15 degrees, reflecting at the
    border), gamma (80-120) and hue/saturation shifts. The mask (an (H, W) label map from
    `weak_label_map`) follows every geometric step with nearest-neighbour interpolation, so it stays
    a valid label map. Images smaller than ``size`` are padded by reflection. Validation
    (``train=False``): pad if needed, then the centre crop; no randomness. Used in chapter 2 through
    :func:`cellulib.training.train.train_seg` (weak
    segmentation).

    Parameters
    ----------
    size : int
        Crop side in pixels.
    train : bool
        Random augmentation (True) or the deterministic centre crop.
    seed : int or None
        Seed of the random state (one generator shared by all steps).
    stain : str
        Stain augmentation, one of `STAIN_AUGMENTS` (``hed`` adds `HEDJitter`).

    Returns
    -------
    albumentations.Compose
        Call as ``tfm(image=img, mask=label)``.
    """
    pad = A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_REFLECT_101)
    if not train:
        return A.Compose([pad, A.CenterCrop(size, size)], seed=seed)
    steps = [
        pad,
        A.Rotate(limit=15, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomCrop(size, size),
        *_flips_and_colour(stain),
    ]
    return _shared_random_state(A.Compose(steps, seed=seed), seed)


def cellularity_transforms(size: int = 512, train: bool = True,
                           seed: int | None = None, stain: str = "none") -> A.Compose:
    """Augmentation for the cellularity regressors and classifiers (image only).

    Paper section 4.4 (with the augmentations of section 4.2): the whole patch is resized to
    ``size`` x ``size`` (INTER_AREA) rather than cropped, because a crop does not carry the
    patch's cellularity label; then flips, RandomRotate90, a small rotation (15 degrees, reflected
    border), gamma and hue/saturation shifts, all of which leave cellularity unchanged. Validation
    (``train=False``): the resize only. Used in chapter 3 through :func:`cellulib.training.train.train_sr`
    (SR) and chapter 4 (direct models).

    Parameters
    ----------
    size : int
        Output side in pixels.
    train : bool
        Random augmentation (True) or resize only.
    seed : int or None
        Seed of the random state (one generator shared by all steps).
    stain : str
        Stain augmentation, one of `STAIN_AUGMENTS` (``hed`` adds `HEDJitter`).

    Returns
    -------
    albumentations.Compose
        Call as ``tfm(image=img)``.
    """
    resize = A.Resize(size, size, interpolation=cv2.INTER_AREA)
    if not train:
        return A.Compose([resize], seed=seed)
    steps = [resize, A.Rotate(limit=15, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
             *_flips_and_colour(stain)]
    return _shared_random_state(A.Compose(steps, seed=seed), seed)


def downscale(img: np.ndarray, factor: float = 2) -> np.ndarray:
    """Shrink an image by ``factor`` with area averaging (cv2.INTER_AREA), as the loaders do.

    Paper section 4.2 (images downscaled x2 before segmentation). Used in chapters 1 and 2.
    """
    if factor <= 0:
        raise ValueError(f"downscale factor must be positive, got {factor}")
    if factor == 1:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def scale_points(points: pd.DataFrame, scale: float) -> pd.DataFrame:
    """Centroids in the pixel frame of an image resized by ``scale`` (pixel centres aligned, as in
    `weak_label_map`). Marks nuclei on downscaled patches; used in chapter 1 through
    :func:`cellulib.reporting.plots.weak_mask_examples`."""
    return points.assign(x=(points.x + 0.5) * scale - 0.5, y=(points.y + 0.5) * scale - 0.5)


def bins_target(y) -> torch.Tensor:
    """Class index ``round(100 * y)`` of each cellularity, the target of the 101-class models.

    Paper 3.4; SPEC 4. Rounds to the nearest bin (exact halves to the even bin, as ``torch.round``).
    The target of `cellulib.data.breastpathq.CellularityDataset` for ``task="classification"``.

    Parameters
    ----------
    y : float, sequence, numpy array or torch.Tensor
        Cellularity in [0, 1].

    Returns
    -------
    torch.LongTensor
        Same shape as ``y``, values 0..100.

    Raises
    ------
    ValueError
        When a value is NaN or outside [0, 1].

    Examples
    --------
    >>> bins_target([0.0, 0.29, 1.0])
    tensor([  0,  29, 100])
    """
    t = (y.as_subclass(torch.Tensor).detach() if isinstance(y, torch.Tensor)
         else torch.as_tensor(y))
    t = t.to(dtype=torch.float64)
    bad = torch.isnan(t) | (t < 0) | (t > 1)
    if bool(bad.any()):
        first = t[bad].reshape(-1)[0].item()
        raise ValueError(f"cellularity must lie in [0, 1]; {int(bad.sum())} value(s) outside, "
                         f"e.g. {first}")
    return torch.round(t * (N_BINS - 1)).long()
