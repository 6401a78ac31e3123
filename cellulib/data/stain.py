"""Stain (SPEC 8): stain perturbation in HED space, and stain normalisation.

Images from another hospital or scanner differ in stain colour and intensity. :func:`hed_perturb`
scales and shifts the haematoxylin and eosin densities of an image (the HED jitter of training with
``stain_augment="hed"``, and the HED shift of :mod:`cellulib.reporting.robustness`, which holds the other
graded shifts). :class:`StainNormalizer` is the remedy at predict time: Macenko (2009) or Reinhard (2001)
normalisation fitted on a target image, computed by torchstain's numpy backend (a maintained
implementation of both published algorithms), with checks that turn a blank or non-H&E target into
a clear error naming the file.

Every function takes and returns uint8 RGB arrays ``(H, W, 3)``. No torch import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellulib.constants import E_STAIN_VECTOR, H_STAIN_VECTOR

__all__ = [
    "METHODS",
    "StainError",
    "StainNormalizer",
    "hed_perturb",
    "tissue_fraction",
    "training_reference",
]

#: Stain normalisation methods of :class:`StainNormalizer`.
METHODS = ("macenko", "reinhard")

#: Optical density below which a pixel counts as background (Macenko et al. 2009's beta).
_BETA = 0.15
#: Transmitted light intensity of the optical density (Macenko's Io).
_IO = 240
#: Fewest tissue pixels (OD >= beta in every channel) for a stain estimate.
_MIN_TISSUE = 500
#: Largest angle between a fitted stain vector and the reference H or E vector of Ruifrok &
#: Johnston / Macenko for the image to count as H&E. The real H&E images in ../shared/data/real
#: (BreastPathQ, AMIDA13, OpenSlide) fit within 12 degrees; a pure blue, green or red image does not.
_MAX_STAIN_ANGLE = 35.0
#: Smallest angle between an image's two fitted stain vectors: 18-22 degrees on the real H&E
#: images, 0 on the same images turned grey (whose vectors then still lie near H and E's).
_MIN_STAIN_SEPARATION = 5.0
_REF_HE = np.array([H_STAIN_VECTOR, E_STAIN_VECTOR]).T  # (RGB, H/E)


class StainError(ValueError):
    """A stain target (or image) that cannot be used: blank, not H&E, or unreadable."""


def _rgb8(img: Any, what: str = "image") -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise StainError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    return arr


def _optical_density(img: np.ndarray) -> np.ndarray:
    """(N, 3) optical densities of an RGB image's pixels, as Macenko et al. compute them."""
    return -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / _IO)


def tissue_fraction(img: np.ndarray) -> float:
    """Share of pixels whose optical density is at least Macenko's beta (0.15) in every
    channel: stained tissue rather than white background. Used by :class:`StainNormalizer`."""
    return float(np.mean(np.all(_optical_density(_rgb8(img)) >= _BETA, axis=1)))


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


class StainNormalizer:
    """Stain normalisation fitted on a target image: ``macenko`` or ``reinhard``.

    Macenko et al. (2009) estimate the H and E stain vectors and concentrations of an image in
    optical-density space and re-synthesise it with the target's vectors and 99th-percentile
    concentrations; Reinhard et al. (2001) match the mean and standard deviation of each channel
    in LAB space. Both come from torchstain (numpy backend). Used by ``cellulib predict``,
    ``detect`` and ``slide`` (``--stain-norm``) and the stain-shift chapter.

    Examples
    --------
    >>> norm = StainNormalizer("reinhard").fit(target_img)  # doctest: +SKIP
    >>> out = norm.normalize(img)  # doctest: +SKIP
    """

    def __init__(self, method: str = "macenko") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown stain normalisation {method!r}; choose one of {METHODS}")
        import torchstain

        self.method = method
        self._impl = torchstain.normalizers.__dict__[
            "MacenkoNormalizer" if method == "macenko" else "ReinhardNormalizer"](backend="numpy")
        self.source: str | None = None

    # ---------------------------------------------------------------------------------------------
    def fit(self, target: Any, name: str | None = None) -> StainNormalizer:
        """Fit on a target: an image array or an image file. A blank target (under 5% tissue or
        fewer than 500 tissue pixels) or one whose stain vectors are not H and E raises
        :class:`StainError` naming it."""
        if isinstance(target, (str, Path)):
            from cellulib.files.imageio import DataError, read_image

            name = str(target)
            try:
                target = read_image(target)
            except DataError as exc:
                raise StainError(f"stain target {exc}") from exc
        label = name or "stain target"
        img = _rgb8(target, label)
        self._check_he(img, label)
        self._impl.fit(img)
        self.source = name
        return self

    def _check_he(self, img: np.ndarray, label: str) -> None:
        frac = tissue_fraction(img)
        n_tissue = frac * img.shape[0] * img.shape[1]
        if frac < 0.05:
            raise StainError(f"{label}: blank as a stain target ({100 * frac:.1f}% of its pixels "
                             "are stained tissue); give an H&E image with tissue")
        if n_tissue < _MIN_TISSUE:
            raise StainError(f"{label}: too small as a stain target ({n_tissue:.0f} tissue "
                             f"pixels of {img.shape[1]}x{img.shape[0]}; a stain estimate needs "
                             f"at least {_MIN_TISSUE}); give a larger H&E image")
        vectors = _macenko_vectors(img)
        if _angle(vectors[:, 0], vectors[:, 1]) < _MIN_STAIN_SEPARATION:
            raise StainError(f"{label}: does not look like H&E (its tissue has one colour, as a "
                             "greyscale or single-stain image has, not the two of haematoxylin "
                             "and eosin)")
        angles = [_angle(vectors[:, k], _REF_HE[:, k]) for k in range(2)]
        if max(angles) > _MAX_STAIN_ANGLE:
            raise StainError(f"{label}: does not look like H&E (its two stain vectors lie "
                             f"{angles[0]:.0f} and {angles[1]:.0f} degrees from haematoxylin and "
                             f"eosin; at most {_MAX_STAIN_ANGLE:.0f} expected)")

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """The image with the target's stain. An image with too little tissue for a stain
        estimate (a blank patch) is returned unchanged."""
        arr = _rgb8(img)
        if tissue_fraction(arr) * arr.shape[0] * arr.shape[1] < _MIN_TISSUE:
            return arr.copy()
        if self.method == "macenko":
            out, _, _ = self._impl.normalize(I=arr, Io=_IO, beta=_BETA, stains=False)
        else:
            out = self._impl.normalize(I=arr)
        return np.ascontiguousarray(out, dtype=np.uint8)

    __call__ = normalize

    # ---------------------------------------------------------------------------------------------
    def reference(self) -> dict[str, Any]:
        """The fitted target as plain lists, to store in a model file (``meta["stain"]``)."""
        if self.method == "macenko":
            return {"method": "macenko", "HERef": np.asarray(self._impl.HERef).tolist(),
                    "maxCRef": np.asarray(self._impl.maxCRef).tolist(), "source": self.source}
        if getattr(self._impl, "target_means", None) is None:
            raise StainError("the Reinhard normaliser has not been fitted")
        return {"method": "reinhard", "means": np.asarray(self._impl.target_means).tolist(),
                "stds": np.asarray(self._impl.target_stds).tolist(), "source": self.source}

    @classmethod
    def from_reference(cls, ref: dict[str, Any]) -> StainNormalizer:
        """A normaliser from :meth:`reference` (e.g. read back from a model file)."""
        norm = cls(ref.get("method", "macenko"))
        if norm.method == "macenko":
            norm._impl.HERef = np.asarray(ref["HERef"], dtype=np.float64)
            norm._impl.maxCRef = np.asarray(ref["maxCRef"], dtype=np.float64)
        else:
            # float32, as torchstain's Reinhard fit leaves them: in float64 the arithmetic of
            # normalize rounds differently, and a few pixels came out one grey level apart on an
            # AVX2 CPU (the lists hold the float32 values exactly)
            norm._impl.target_means = np.asarray(ref["means"], dtype=np.float32)
            norm._impl.target_stds = np.asarray(ref["stds"], dtype=np.float32)
        norm.source = ref.get("source")
        return norm


def _macenko_vectors(img: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The (3, 2) H and E optical-density vectors of Macenko's method (H first), unit length."""
    od = _optical_density(img)
    od_hat = od[np.all(od >= _BETA, axis=1)]
    _, eigvecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = eigvecs[:, 1:3]
    proj = od_hat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_max, v_min], 1) if v_min[0] <= v_max[0] else np.stack([v_min, v_max], 1)
    he *= np.sign(he.sum(axis=0, keepdims=True))  # eigenvector signs are arbitrary: OD >= 0
    return he / np.linalg.norm(he, axis=0, keepdims=True)


#: Bumped whenever :func:`training_reference` (or the fit it makes) changes: the references stored in
#: cached model files (``meta["stain"]``) are then recomputed, without retraining.
REFERENCE_VERSION = 1


def training_reference(paths, n: int = 16, tile: int = 128) -> dict[str, Any]:
    """The stain of a training set, for a model file's ``meta["stain"]``.

    Up to ``n`` images, evenly spaced through ``paths``, are resized to ``tile`` px and laid side by
    side in a square mosaic; :class:`StainNormalizer` is fitted on it with each method. Returns
    ``{"macenko": ref, "reinhard": ref}`` (see :meth:`StainNormalizer.reference`), or
    ``{"unavailable": reason}`` when the mosaic is not usable H&E. Used by :mod:`cellulib.training.train`
    when it saves a model, so that ``--stain-norm METHOD`` needs no target image.
    """
    import cv2

    from cellulib.files.imageio import read_image

    paths = [str(p) for p in paths]
    if not paths:
        return {"unavailable": "no training images"}
    picks = sorted({round(i) for i in np.linspace(0, len(paths) - 1, min(n, len(paths)))})
    tiles = [cv2.resize(read_image(paths[i]), (tile, tile), interpolation=cv2.INTER_AREA)
             for i in picks]
    side = int(np.ceil(np.sqrt(len(tiles))))
    while len(tiles) < side * side:  # fill the square with the first images again
        tiles.append(tiles[len(tiles) % len(picks)])
    mosaic = np.vstack([np.hstack(tiles[r * side:(r + 1) * side]) for r in range(side)])
    label = f"mosaic of {len(picks)} training images"
    try:
        return {m: {**StainNormalizer(m).fit(mosaic, name=label).reference()} for m in METHODS}
    except StainError as exc:
        return {"unavailable": str(exc)}


# -------------------------------------------------------------------------------------------------
# stain perturbation (HED jitter in training, the HED shift of cellulib.reporting.robustness)
# -------------------------------------------------------------------------------------------------
def hed_perturb(img: np.ndarray, h_scale: float = 1.0, e_scale: float = 1.0,
                h_shift: float = 0.0, e_shift: float = 0.0) -> np.ndarray:
    """Scale and shift the haematoxylin and eosin optical densities of an image.

    Colour deconvolution of Ruifrok & Johnston (2001) (``skimage.color.rgb2hed``), then
    ``H' = h_scale * H + h_shift`` (and E likewise, the residual D unchanged) on tissue pixels,
    and back to RGB (``hed2rgb``). Background (white) pixels keep their colour, as a scanner's
    white balance would. Used by `cellulib.data.transforms.HEDJitter` (training) and
    `cellulib.reporting.robustness.shift_image` (the stain-shift chapter).
    """
    from skimage.color import hed2rgb, rgb2hed

    arr = _rgb8(img)
    hed = rgb2hed(arr)
    tissue = (hed[..., 0] + hed[..., 1]) > 0.02
    hed[..., 0] = np.where(tissue, hed[..., 0] * h_scale + h_shift, hed[..., 0])
    hed[..., 1] = np.where(tissue, hed[..., 1] * e_scale + e_shift, hed[..., 1])
    hed[..., :2] = np.maximum(hed[..., :2], 0)
    rgb = hed2rgb(hed)
    out = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    return np.where(tissue[..., None], out, arr)
