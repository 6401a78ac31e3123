"""Nucleus detection with a segmentation model, behind the ``detect`` command (SPEC 7).

A segmentation model file (family ``seg``, :func:`cellulib.training.train.train_seg`) gives one point per
detected nucleus: the LoG blob centres (paper 3.3, Fig. 5) of its nucleus map at the size of the
discs it was trained on, each with the class (normal, lymphocyte, malignant) its maps favour there,
mapped back to the pixels of the input image (:func:`nucleus_centres`)::

    cellulib detect --model SEG --images DIR_OR_FILES --out nuclei.csv [--geojson DIR]

Output: a CSV with the columns ``path,x,y,class,probability,error``, one row per nucleus (an image
that cannot be read gets one row with empty values and the message in ``error``), and with
``--geojson`` one QuPath-readable GeoJSON ``FeatureCollection`` of points per image. Images are
processed one at a time, so memory holds one image and its maps whatever their number.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from cellulib.constants import (
    CLASSES,
    DETECTION_THRESHOLD,
    DISC_DIAMETER,
    NUCLEUS_CLASSES,
    SEG_DOWNSCALE,
    STRIDE,
)
from cellulib.data.breastpathq import annotation_points
from cellulib.data.transforms import downscale, weak_label_map
from cellulib.files.imageio import atomic_open, atomic_write_text, collect_images, read_image
from cellulib.inference.modelfile import ModelFileError, model_and_info
from cellulib.inference.pixelsize import check_mpp, pixel_size
from cellulib.metrics.detection import DETECTION_RADIUS, detection_curve, detection_scores
from cellulib.models.engine import (
    amp_dtype,
    autocast,
    inference_model,
    precision_name,
    usable_device,
)
from cellulib.models.networks import segment

__all__ = ["COLUMNS", "DETECTION_VERSION", "THRESHOLD_GRID", "AnnotatedScores", "choose_threshold",
           "detect_nuclei", "detect_to_csv", "nucleus_centres", "nucleus_centres_grid",
           "recorded_threshold", "score_annotated", "to_geojson"]

#: Columns of :func:`detect_nuclei` and of the CSV of ``cellulib detect``.
COLUMNS: tuple[str, ...] = ("path", "x", "y", "class", "probability", "error")

PathLike = str | os.PathLike


#: How :func:`nucleus_centres` gives a detected nucleus its class: ``"disc"``, the class whose
#: probabilities summed over the disc of the trained diameter around the centre are largest
#: (issue 22); ``"peak"``, the class whose map, averaged over the 3x3 pixels at the centre, is
#: strongest (the rule before issue 22).
CLASS_RULES: tuple[str, ...] = ("disc", "peak")


def disc_kernel(diameter: float) -> np.ndarray:
    """A 0/1 float32 disc of ``diameter`` pixels, centred on an odd square grid: the pixels whose
    centres lie within ``diameter / 2`` of the middle one.

    Examples
    --------
    >>> disc_kernel(2).astype(int).tolist()
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    """
    r = float(diameter) / 2.0
    n = int(np.floor(r))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1]
    return (yy ** 2 + xx ** 2 <= r ** 2).astype(np.float32)


def nucleus_centres(probs: np.ndarray, diameter: float, threshold: float = 0.3,
                    class_rule: str = "disc") -> list[tuple[float, float, str, float]]:
    """Nucleus centres and classes from the 4 probability maps of a segmentation network.

    The network was trained on discs of ``diameter`` pixels (SPEC 2), so a nucleus appears as a
    blob of that size in its nucleus map ``1 - p(background)``. Centres are the local maxima of
    the map's scale-normalised Laplacian of Gaussian at the disc's scale (``sigma = d / (2 sqrt 2)``,
    where the LoG of a disc of diameter ``d`` responds most), 3x3 maxima whose nucleus
    probability is at least ``threshold``. Each centre is given one nucleus class (normal,
    lymphocyte, malignant), so a nucleus is reported once even where two class maps both see it:
    with ``class_rule="disc"`` the class whose probabilities, summed over the disc of ``diameter``
    around the centre (`disc_kernel`), are largest, the evidence of the whole nucleus; with
    ``"peak"`` the class with the highest probability averaged over the 3x3 pixels at the centre.
    Used by
    :func:`detect_nuclei` (``cellulib detect``) and the real-H&E chapter.

    Parameters
    ----------
    probs : numpy.ndarray, shape (4, H, W)
        Probabilities in the channel order of `cellulib.models.networks.CLASSES`.
    diameter : float
        Disc diameter the network was trained with, in pixels of ``probs``.
    threshold : float
        Smallest nucleus probability at a centre, in (0, 1).
    class_rule : {"disc", "peak"}
        How a centre gets its class (`CLASS_RULES`).

    Returns
    -------
    list of (row, column, class, probability)
        Row and column in pixels of ``probs`` (floats: equal neighbouring maxima, as for a disc
        centred between pixels, give one centre at their centroid), in raster order;
        ``probability`` is the chosen class's probability at the nearest pixel.

    Examples
    --------
    >>> yy, xx = np.mgrid[:40, :40]
    >>> disc = ((yy - 20) ** 2 + (xx - 12) ** 2 <= 5 ** 2).astype(np.float32)
    >>> probs = np.stack([0 * disc, 0.9 * disc, 0.2 * disc, 1 - 0.9 * disc])
    >>> nucleus_centres(probs, diameter=11)
    [(20.0, 12.0, 'lymphocyte', 0.9)]
    """
    return nucleus_centres_grid(probs, diameter, [threshold], class_rule)[0]


def nucleus_centres_grid(probs: np.ndarray, diameter: float, thresholds: Sequence[float],
                         class_rule: str = "disc") -> list[list[tuple[float, float, str, float]]]:
    """:func:`nucleus_centres` at each of ``thresholds``, the Laplacian of Gaussian and its
    maxima computed once: the same lists as one call per threshold, for a fraction of the time
    (:func:`choose_threshold` tries a grid of thresholds on every training image)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] != len(CLASSES):
        raise ValueError(f"probs must have shape ({len(CLASSES)}, H, W), got {probs.shape}")
    for threshold in thresholds:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    if not diameter > 0:
        raise ValueError(f"diameter must be positive, got {diameter}")
    if class_rule not in CLASS_RULES:
        raise ValueError(f"class_rule must be one of {CLASS_RULES}, got {class_rule!r}")
    nucleus = 1.0 - probs[CLASSES.index("background")].astype(np.float64)
    sigma = float(diameter) / (2.0 * np.sqrt(2.0))
    response = -sigma ** 2 * ndi.gaussian_laplace(nucleus, sigma, mode="reflect")
    maxima = (response == ndi.maximum_filter(response, size=3, mode="constant", cval=-np.inf)) \
        & (response > 0)
    return [_classified(probs, maxima & (nucleus >= threshold), diameter, class_rule)
            for threshold in thresholds]


def _classified(probs: np.ndarray, peaks: np.ndarray, diameter: float, class_rule: str
                ) -> list[tuple[float, float, str, float]]:
    """The centres of ``peaks`` (a plateau of equal maxima as one, at its centroid) with their
    classes, as :func:`nucleus_centres` returns them."""
    # a plateau of equal maxima (a disc centred between pixels) is one nucleus, at its centroid
    labels, n = ndi.label(peaks, structure=np.ones((3, 3), dtype=bool))
    if not n:
        return []
    centres = np.asarray(ndi.center_of_mass(peaks, labels, range(1, n + 1)), dtype=np.float64)
    names = NUCLEUS_CLASSES
    channels = [CLASSES.index(c) for c in names]
    rows, cols = np.rint(centres[:, 0]).astype(int), np.rint(centres[:, 1]).astype(int)
    if class_rule == "disc":
        # the class maps summed over the disc at each centre (pixels outside the image add 0)
        kernel = disc_kernel(diameter)
        n = kernel.shape[0] // 2
        padded = np.pad(probs[channels], ((0, 0), (n, n), (n, n)))
        dy, dx = np.nonzero(kernel)
        evidence = padded[:, rows[:, None] + dy[None], cols[:, None] + dx[None]].sum(axis=2)
    else:
        local = ndi.uniform_filter(probs[channels], size=(1, 3, 3), mode="nearest")
        evidence = local[:, rows, cols]
    best = np.argmax(evidence, axis=0)
    return [(float(y), float(x), names[k], round(float(probs[channels[k], r, c]), 6))
            for (y, x), r, c, k in zip(centres, rows, cols, best)]


def recorded_threshold(info: dict[str, Any], source: str = "<loaded model>") -> float:
    """The detection threshold a segmentation model file records (``meta["detection"]
    ["threshold"]``, chosen on its training images by :func:`choose_threshold` when
    :func:`cellulib.training.train.train_seg` trained it), or
    :data:`cellulib.constants.DETECTION_THRESHOLD` for a file that records none. What ``cellulib
    detect`` uses without ``--threshold`` (issue 22).

    Raises
    ------
    cellulib.inference.modelfile.ModelFileError
        The file records a threshold that is not a number in (0, 1); the message names the file.

    Examples
    --------
    >>> recorded_threshold({"meta": {"detection": {"threshold": 0.5}}})
    0.5
    >>> recorded_threshold({"meta": {}}) == DETECTION_THRESHOLD
    True
    """
    chosen = ((info.get("meta") or {}).get("detection") or {}).get("threshold")
    if chosen is None:
        return DETECTION_THRESHOLD
    if isinstance(chosen, bool) or not isinstance(chosen, (int, float, np.number)) \
            or not 0 < float(chosen) < 1:
        raise ModelFileError(f"{source}: meta['detection']['threshold'] must be a number in "
                             f"(0, 1), the file records {chosen!r}")
    return float(chosen)


#: How far ``mpp`` may rescale images to the model's pixel size: enlarged at most 4x (as
#: ``cellulib predict``'s ``max_upscale``) and shrunk at most 16x; beyond, nuclei are blurs or
#: specks and the detections meaningless (a wrong ``--mpp`` found 4478 "nuclei" in a 256 px patch).
MAX_RESCALE = (4.0, 16.0)


class _SegModel:
    """A loaded segmentation model with the downscale it was trained at."""

    def __init__(self, model: Any, threshold: float | None, device: Any = None,
                 stain_norm: Any = None, mpp: float | None = None,
                 precision: str = "auto", class_rule: str = "disc", tta: bool = False) -> None:
        if threshold is not None:
            threshold = float(threshold)
            if not 0 < threshold < 1:
                raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.source, model, info = model_and_info(model)
        family = info.get("family")
        if family != "seg":
            raise ModelFileError(f"{self.source}: a {family!r} model cannot detect nuclei; "
                                 "give a segmentation model (family 'seg', cellulib train seg)")
        if threshold is None:  # the model's own, chosen on its training images
            threshold = recorded_threshold(info, self.source)
        params = (info.get("meta") or {}).get("params") or {}
        factor = params.get("downscale", SEG_DOWNSCALE)
        diameter = params.get("disc_diameter", DISC_DIAMETER)
        for key, value in (("downscale", factor), ("disc_diameter", diameter)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not value > 0:
                raise ModelFileError(f"{self.source}: meta['params']['{key}'] must be a positive "
                                     f"number, the file records {value!r}")
        mpp = check_mpp(mpp)
        if class_rule not in CLASS_RULES:
            raise ValueError(f"class_rule must be one of {CLASS_RULES}, got {class_rule!r}")
        self.class_rule = class_rule
        self.tta = bool(tta)
        self.threshold = threshold
        # --mpp: the images are first brought to the training images' pixel size
        self.mpp = None if mpp is None else float(mpp)
        model_mpp = pixel_size(info)[0]
        ratio = 1.0 if mpp is None else model_mpp / mpp  # > 1: images shrunk to the model's
        if not 1 / MAX_RESCALE[0] <= ratio <= MAX_RESCALE[1]:
            how = (f"enlarged {1 / ratio:.3g}x (at most {MAX_RESCALE[0]:g}x)" if ratio < 1
                   else f"shrunk {ratio:.3g}x (at most {MAX_RESCALE[1]:g}x)")
            raise ValueError(f"mpp {mpp:g} um/px: the images would be {how} to the "
                             f"{model_mpp:g} um/px the model {self.source} was trained at; "
                             "check the images' pixel size")
        self.downscale = float(factor) * ratio
        self.diameter = float(diameter)
        self.device = usable_device(device)
        # resolved once, as cellulib predict does: bf16 autocast and channels-last on a CPU with
        # native bf16 (3.5x faster on a 500 px BRCA-M2C patch), float32 with precision="float32"
        self.amp_dtype = amp_dtype(self.device, precision)
        # channels-last with mixed precision; the weights autocast would cast for every image,
        # cast once (the same maps, bit for bit); a model given in memory is copied first, so the
        # caller's stays float32
        self.model = inference_model(model, self.device, self.amp_dtype, 2 * STRIDE,
                                     layout_channels_last=self.amp_dtype is not None,
                                     copy=self.source == "<loaded model>", name=self.source)
        self.stain_norm = stain_norm  # a cellulib.data.stain.StainNormalizer, or None
        self.classes = NUCLEUS_CLASSES  # every class of the segmentation output but background

    def maps(self, img: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The model's 4 probability maps of one uint8 RGB image at its own scale, and the
        factors ``(sx, sy)`` from that scale back to the input pixels."""
        if self.stain_norm is not None:
            img = self.stain_norm.normalize(img)
        small = downscale(img, self.downscale)
        with autocast(self.device, self.amp_dtype):
            probs = segment(self.model, small, device=self.device)
            if self.tta:  # the mean over the four flips, each flipped back
                for axes in ((0,), (1,), (0, 1)):
                    flipped = np.ascontiguousarray(np.flip(small, axes))
                    probs += np.flip(segment(self.model, flipped, device=self.device),
                                     tuple(a + 1 for a in axes))
                probs /= 4.0
        # the actual factors: the downscaled side is rounded to whole pixels
        return probs, img.shape[1] / small.shape[1], img.shape[0] / small.shape[0]

    def centres(self, probs: np.ndarray, sx: float, sy: float
                ) -> list[tuple[float, float, str, float]]:
        """``(x, y, class, probability)`` of the nuclei in ``probs``, in input pixels."""
        return self.centres_grid(probs, sx, sy, [self.threshold])[0]

    def centres_grid(self, probs: np.ndarray, sx: float, sy: float, thresholds: Sequence[float]
                     ) -> list[list[tuple[float, float, str, float]]]:
        """:meth:`centres` at each of ``thresholds`` (:func:`nucleus_centres_grid`)."""
        # pixel centres aligned, as in cellulib.data.breastpathq.scale_points; to 0.01 px, as the CSV holds
        # them, so that scoring the CSV gives exactly what scoring these gives
        return [[(round((xi + 0.5) * sx - 0.5, 2), round((yi + 0.5) * sy - 0.5, 2), name, p)
                 for yi, xi, name, p in found]
                for found in nucleus_centres_grid(probs, self.diameter, thresholds,
                                                  self.class_rule)]

    def detect(self, img: np.ndarray) -> list[tuple[float, float, str, float]]:
        """``(x, y, class, probability)`` of the nuclei of one uint8 RGB image, input pixels."""
        return self.centres(*self.maps(img))


def _error_message(path: Path, exc: Exception) -> str:
    msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    if str(path) not in msg:
        msg = f"{path}: {msg}"
    return " ".join(msg.split())


def _iter_images(seg: _SegModel, files: list[Path], progress: bool
                 ) -> Iterator[tuple[Path, list[tuple[float, float, str, float]], str]]:
    """``(path, nuclei, error)`` per image, one image in memory at a time."""

    for path in tqdm(files, desc="detect", unit="img", disable=not progress, file=sys.stderr,
                     leave=False, dynamic_ncols=True):
        try:
            yield path, seg.detect(read_image(path)), ""
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            yield path, [], _error_message(path, exc)


#: Bumped whenever what :func:`detect_nuclei` or :func:`score_annotated` finds in an image changes
#: (peak finding, classing, scaling): stored detection results
#: (:func:`cellulib.reporting.robustness.detection_under_shifts`) are then computed again.
DETECTION_VERSION = 2  # 2: classes from the maps summed over each nucleus's disc (issue 22)


def detect_nuclei(model: Any, paths: PathLike | Sequence[PathLike],
                  threshold: float | None = None,
                  progress: bool = True, *, device: Any = None,
                  recursive: bool = False, stain_norm: Any = None,
                  mpp: float | None = None, precision: str = "auto",
                  class_rule: str = "disc", tta: bool = False) -> pd.DataFrame:
    """Detect and classify nuclei in image files with a segmentation model; one row per nucleus.

    SPEC 7 (``cellulib detect``), built on paper 3.3 (Fig. 5). Each image is read with
    :func:`cellulib.data.breastpathq.read_image`, downscaled by the model's recorded factor
    (``meta["params"]["downscale"]``, 2 when absent; paper 4.2) with
    :func:`cellulib.data.breastpathq.downscale`, segmented with :func:`cellulib.models.networks.segment`, and its
    nuclei found and classified by :func:`nucleus_centres` at the recorded disc diameter
    (``meta["params"]["disc_diameter"]``, 15 when absent) and ``threshold``: one row per nucleus.
    Used by ``cellulib detect`` and the real-H&E chapter.

    Coordinates are in pixels of the input image with the index convention of
    :func:`cellulib.data.breastpathq.scale_points` and the cell annotations: the centre of pixel ``(row i,
    column j)`` is ``(x, y) = (j, i)``. A blob at pixel ``(xs, ys)`` of the downscaled image maps
    to ``x = (xs + 0.5) * w_in / w_small - 0.5`` and ``y = (ys + 0.5) * h_in / h_small - 0.5``
    (pixel centres aligned, with the actual factors after rounding of the downscaled size).

    Parameters
    ----------
    model : str, PathLike or (nn.Module, dict)
        A segmentation model file, or the ``(model, info)`` pair from :func:`cellulib.load_model`
        (a given module is moved to ``device`` in place).
    paths : path or sequence of paths
        Image files and/or folders (see :func:`cellulib.inference.predict.collect_images`).
    threshold : float, optional
        Smallest nucleus probability ``1 - p(background)`` at a centre, in (0, 1). None: the
        threshold the model file records (:func:`recorded_threshold`: chosen on its training
        images), else :data:`cellulib.constants.DETECTION_THRESHOLD`.
    progress : bool
        Show a tqdm bar on stderr.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    recursive : bool
        Also search subfolders.
    stain_norm : cellulib.data.stain.StainNormalizer, optional
        Normalise each image's stain before segmenting it (``--stain-norm``).
    mpp : float, optional
        Micrometres per pixel of the images (``--mpp``): they are resized by ``mpp / model mpp``
        (the model's ``meta["pixel_size"]``, 0.5 when absent) on top of the recorded downscale,
        so nuclei have the size the network learned; coordinates stay in input pixels.
    precision : {"auto", "bf16", "fp16", "float32"}
        Arithmetic of the network, as in :class:`cellulib.inference.predict.Predictor`: ``"auto"`` autocasts
        to bf16 (channels-last) on a CPU with native bf16 and on CUDA, else float32.
    class_rule : {"disc", "peak"}
        How each nucleus gets its class (:func:`nucleus_centres`).
    tta : bool
        Average the maps over the four flips of the image (4 times the network's time).

    Returns
    -------
    pandas.DataFrame
        Columns ``path, x, y, class, probability, error``: per image its nuclei in raster order
        of the model's grid, ``probability`` the chosen class's map value at the centre; a bad
        image gives one row with NaN values, empty ``class`` and the message naming the file in
        ``error`` (``""`` elsewhere).

    Raises
    ------
    cellulib.inference.modelfile.ModelFileError
        A missing or corrupt model file, or a model of another family; the message names the file.
    ValueError
        A threshold outside (0, 1), or no images.

    Examples
    --------
    >>> nuclei = detect_nuclei("seg.pt", "images/")  # doctest: +SKIP
    >>> nuclei.columns.tolist()  # doctest: +SKIP
    ['path', 'x', 'y', 'class', 'probability', 'error']
    """
    seg = _SegModel(model, threshold, device=device, stain_norm=stain_norm, mpp=mpp,
                    precision=precision, class_rule=class_rule, tta=tta)
    files = collect_images(paths, recursive=recursive)
    rows: list[tuple] = []
    for path, nuclei, error in _iter_images(seg, files, progress):
        if error:
            rows.append((str(path), np.nan, np.nan, "", np.nan, error))
        rows.extend((str(path), x, y, name, p, "") for x, y, name, p in nuclei)
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(
        {"x": "float64", "y": "float64", "probability": "float64", "class": "str", "error": "str"})


@dataclass
class AnnotatedScores:
    """What :func:`score_annotated` measured on a set of annotated images.

    ``truth`` and ``pred``: one row per annotated / detected nucleus (``image``, ``x``, ``y``,
    ``cls``; ``pred`` also ``probability``), input pixels. ``jaccard``: per nucleus class, the
    Jaccard (IoU) at 0.5 of the model's maps against the disc targets it was trained on, pixels
    summed over all images (``intersection``, ``union``, ``jaccard``), plus the mean of the three
    classes (Table 1's figure). ``fractions``: per image, the tumour (malignant) share of the
    nuclei, annotated and detected.
    """
    truth: pd.DataFrame
    pred: pd.DataFrame
    jaccard: pd.DataFrame
    fractions: pd.DataFrame

    def scores(self, radius: float | None = None) -> pd.DataFrame:
        """Detection P, R and F per class and pooled (:func:`cellulib.metrics.detection.detection_scores`)."""
        radius = DETECTION_RADIUS if radius is None else radius
        return detection_scores(self.truth, self.pred, radius, images=self.fractions["image"])

    def curve(self, radii=range(1, 7)) -> pd.DataFrame:
        """:meth:`scores` over matching radii (MCSpatNet's 1-6 px)."""
        return detection_curve(self.truth, self.pred, radii, images=self.fractions["image"])


def _segmented(seg: _SegModel, cells: pd.DataFrame, desc: str, progress: bool,
               transform: Any = None) -> Iterator[tuple[Any, pd.DataFrame, np.ndarray, float, float]]:
    """Each annotated image of ``cells`` segmented once, in order, with a tqdm bar: ``(row, its
    annotation_points, maps, sx, sy)``, where ``sx, sy`` map the network's grid to the annotated
    image's pixels. ``transform(img, i)`` may resample the whole image first (another pixel
    size): the factors still lead back to the annotated pixels."""
    for i, row in enumerate(tqdm(list(cells.itertuples()), desc=desc, unit="img",
                                 disable=not progress, file=sys.stderr, leave=False,
                                 dynamic_ncols=True)):
        img = read_image(row.image_path)
        h0, w0 = img.shape[:2]
        if transform is not None:
            img = transform(img, i)
        sx0, sy0 = img.shape[1] / w0, img.shape[0] / h0
        probs, sx, sy = seg.maps(img)
        yield row, annotation_points(Path(row.xml_path)), probs, sx / sx0, sy / sy0


def _found_frame(found: list, image: Any) -> pd.DataFrame:
    """Nuclei from :meth:`_SegModel.centres` as the rows that
    :func:`cellulib.metrics.detection.detection_scores` reads."""
    return pd.DataFrame(found, columns=["x", "y", "cls", "probability"]).assign(image=image)


def score_annotated(model: Any, cells: pd.DataFrame, threshold: float | None = None,
                    progress: bool = True, *, device: Any = None,
                    transform: Any = None, precision: str = "auto", class_rule: str = "disc",
                    tta: bool = False) -> AnnotatedScores:
    """Run a segmentation model on annotated images and keep what the real-H&E chapter scores.

    Each image of ``cells`` (a table from :func:`cellulib.data.breastpathq.read_cells`: ``name``,
    ``image_path``, ``xml_path``; BreastPathQ XML or BRCA-M2C dots) is segmented once. Its nuclei
    are found as ``cellulib detect`` finds them (:func:`nucleus_centres` on the maps at the model's
    scale, mapped back to input pixels), and the maps are compared at 0.5 with the disc targets
    the model was trained on (its recorded disc diameter and downscale; SPEC 2). Used in the
    real-H&E chapter.

    Parameters
    ----------
    model : str, PathLike or (nn.Module, dict)
        A segmentation model file or the pair from :func:`cellulib.load_model`.
    cells : pandas.DataFrame
        The annotated images.
    threshold : float
        As in :func:`detect_nuclei`.
    progress : bool
        Show a tqdm bar on stderr.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    transform : callable, optional
        ``transform(img, i) -> img`` applied to image ``i`` (in the order of ``cells``) before it
        is segmented, e.g. a stain shift (`cellulib.reporting.robustness.shift_image`). It must not move the
        tissue, but it may resample the whole image to another size (another pixel size): the
        detections are mapped back to the annotated image's pixels.
    precision, class_rule, tta
        As in :func:`detect_nuclei`.
    """

    if not len(cells):
        raise ValueError("score_annotated needs at least one annotated image")
    seg = _SegModel(model, threshold, device=device, precision=precision, class_rule=class_rule,
                    tta=tta)
    truth, pred, fractions = [], [], []
    nuclei = [CLASSES.index(c) for c in seg.classes]
    inter = np.zeros(len(nuclei), dtype=np.int64)
    union = np.zeros(len(nuclei), dtype=np.int64)
    for row, points, probs, sx, sy in _segmented(seg, cells, "score", progress, transform):
        found = seg.centres(probs, sx, sy)
        truth.append(points[["x", "y", "cls"]].assign(image=row.name))
        pred.append(_found_frame(found, row.name))
        label = weak_label_map(points, probs.shape[1:], seg.diameter, scale=(1 / sx, 1 / sy))
        hard = probs[nuclei] > 0.5
        for k, ch in enumerate(nuclei):
            target = label == ch
            inter[k] += int((hard[k] & target).sum())
            union[k] += int((hard[k] | target).sum())
        n_true, n_found = len(points), len(found)
        fractions.append({
            "image": row.name, "n_annotated": n_true, "n_detected": n_found,
            "annotated": float((points["cls"] == "malignant").mean()) if n_true else np.nan,
            "detected": (sum(c == "malignant" for _, _, c, _ in found) / n_found
                         if n_found else np.nan),
        })
    jac = pd.DataFrame({"intersection": inter, "union": union}, index=list(seg.classes))
    jac["jaccard"] = np.where(jac["union"] > 0, jac["intersection"] / jac["union"].clip(lower=1),
                              np.nan)
    jac.loc["mean (nuclei)"] = [np.nan, np.nan, float(jac["jaccard"].mean())]
    cols = ["image", "x", "y", "cls"]
    return AnnotatedScores(pd.concat(truth, ignore_index=True)[cols],
                           pd.concat(pred, ignore_index=True)[[*cols, "probability"]],
                           jac, pd.DataFrame(fractions))


#: The detection thresholds :func:`choose_threshold` tries (issue 22). The F of a nucleus map is
#: flat near its best (BRCA-M2C, 128 epochs: the mean F of the training images moves by under
#: 0.01 between 0.3 and 0.7), so a coarse grid, which holds the global default.
THRESHOLD_GRID: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def choose_threshold(model: Any, cells: pd.DataFrame, grid: Sequence[float] = THRESHOLD_GRID,
                     progress: bool = False, *, device: Any = None, precision: str = "auto",
                     class_rule: str = "disc") -> dict[str, Any]:
    """The detection threshold that serves a segmentation model best on annotated images.

    Each image of ``cells`` (as :func:`score_annotated` takes them; the model's own training
    images, so that no held-out image chooses anything) is segmented once; at each threshold of
    ``grid`` its nuclei are found as ``cellulib detect`` finds them and scored with
    :func:`cellulib.metrics.detection.detection_scores` (the MCSpatNet radius). The threshold with
    the highest mean F, over the nucleus classes and the pooled detection, is kept (the lowest of
    equal ones). :func:`cellulib.training.train.train_seg` records the result as
    ``meta["detection"]``, and ``cellulib detect`` uses its ``threshold`` when given none (issue
    22).

    Returns
    -------
    dict
        ``threshold``, ``rule`` (the sentence above, short), ``grid``, ``mean_f`` (per threshold,
        4 decimals), ``images`` (how many scored it) and ``version`` (:data:`DETECTION_VERSION`).

    Raises
    ------
    ValueError
        No images, or a threshold of ``grid`` outside (0, 1).
    """
    grid = [float(t) for t in grid]
    if not len(cells) or not grid:
        raise ValueError("choose_threshold needs at least one annotated image and one threshold")
    for t in grid:
        if not 0 < t < 1:
            raise ValueError(f"every threshold must lie in (0, 1), got {t}")
    seg = _SegModel(model, grid[0], device=device, precision=precision, class_rule=class_rule)
    truth, found = [], [[] for _ in grid]  # per threshold, each image's nuclei
    for row, points, probs, sx, sy in _segmented(seg, cells, "threshold", progress):
        truth.append(points[["x", "y", "cls"]].assign(image=row.name))
        for k, nuclei in enumerate(seg.centres_grid(probs, sx, sy, grid)):
            found[k].append(_found_frame(nuclei, row.name))
    truth_all = pd.concat(truth, ignore_index=True)
    mean_f = []
    for frames in found:
        pred = pd.concat(frames, ignore_index=True)
        scores = detection_scores(truth_all, pred, DETECTION_RADIUS, images=cells["name"])
        f = scores["f1"].to_numpy(dtype=float)
        mean_f.append(float(np.nanmean(f)) if np.isfinite(f).any() else 0.0)
    best = int(np.argmax(mean_f))
    return {"threshold": grid[best],
            "rule": "highest mean F (nucleus classes and detection) on the training images",
            "grid": grid, "mean_f": [round(f, 4) for f in mean_f], "images": int(len(cells)),
            "version": DETECTION_VERSION}


def to_geojson(nuclei: Sequence[tuple[float, float, str, float]]) -> dict[str, Any]:
    """A QuPath-readable GeoJSON FeatureCollection of nucleus points.

    SPEC 7 (``cellulib detect --geojson``). Each ``(x, y, class, probability)`` in the index
    convention of :func:`detect_nuclei` becomes a ``Point`` at ``[x + 0.5, y + 0.5]``: QuPath's
    pixel ``(0, 0)`` spans ``[0, 1) x [0, 1)``, so that is the same spot of the image. Its
    ``properties`` are ``{"objectType": "detection", "classification": {"name": class},
    "probability": p, "measurements": {"probability": p}}`` (QuPath shows ``measurements`` in its
    tables). Used by ``cellulib detect`` and the real-H&E chapter.
    """
    features = [{
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [round(x + 0.5, 3), round(y + 0.5, 3)]},
        "properties": {"objectType": "detection", "classification": {"name": name},
                       "probability": round(p, 6), "measurements": {"probability": round(p, 6)}},
    } for x, y, name, p in nuclei]
    return {"type": "FeatureCollection", "features": features}


def _geojson_names(files: list[Path]) -> list[str]:
    """``<stem>.geojson`` per image; a stem seen before gets ``-2``, ``-3``, ... appended."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen[f.stem] = seen.get(f.stem, 0) + 1
        names.append(f"{f.stem}.geojson" if n == 1 else f"{f.stem}-{n}.geojson")
    return names


def detect_to_csv(model: Any, paths: PathLike | Sequence[PathLike], out: PathLike,
                  geojson_dir: PathLike | None = None, threshold: float | None = None,
                  progress: bool = True, *, device: Any = None,
                  recursive: bool = False, stain_norm: Any = None,
                  mpp: float | None = None, precision: str = "auto",
                  class_rule: str = "disc", tta: bool = False) -> dict[str, Any]:
    """Detect nuclei in image files and write them to a CSV (and GeoJSON files), atomically.

    SPEC 7 (``cellulib detect``). Rows (see :func:`detect_nuclei`; ``x``, ``y`` with 2 decimals,
    ``probability`` with 6) are streamed to a temporary file beside ``out``, renamed into place at
    the end, so ``out`` is never half-written. With ``geojson_dir`` every readable image also gets
    ``geojson_dir/<image stem>.geojson`` (:func:`to_geojson`; a repeated stem gets ``-2``, ...),
    each written atomically. ``out + ".json"`` records the returned summary, with the nuclei of
    every image read (an image without a nucleus has no row in the CSV: it is listed there under
    ``no_nuclei``). Used by ``cellulib detect`` and the real-H&E chapter.

    Parameters
    ----------
    out : path
        The CSV to write.
    geojson_dir : path, optional
        Folder of the GeoJSON files (created when missing).
    model, paths, threshold, progress, device, recursive, stain_norm, mpp, precision, class_rule, tta
        As in :func:`detect_nuclei`.

    Returns
    -------
    dict
        ``n_images``, ``n_ok``, ``n_failed``, ``n_nuclei``, ``per_class`` (nuclei per class),
        ``failed`` (list of ``{"path", "error"}``), ``nuclei_per_image`` (path -> count, images
        read), ``no_nuclei`` (the paths among them without a nucleus), ``output`` and
        ``geojson`` (files written); the model, threshold and options.
    """
    seg = _SegModel(model, threshold, device=device, stain_norm=stain_norm, mpp=mpp,
                    precision=precision, class_rule=class_rule, tta=tta)
    files = collect_images(paths, recursive=recursive)
    names = _geojson_names(files)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if geojson_dir is not None:
        geojson_dir = Path(geojson_dir)
        geojson_dir.mkdir(parents=True, exist_ok=True)
    per_class = dict.fromkeys(seg.classes, 0)
    failed, written, counts = [], [], {}
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for (path, nuclei, error), name in zip(_iter_images(seg, files, progress), names):
            if error:
                writer.writerow([str(path), "", "", "", "", error])
                failed.append({"path": str(path), "error": error})
                continue
            for x, y, cls, p in nuclei:
                writer.writerow([str(path), f"{x:.2f}", f"{y:.2f}", cls, f"{p:.6f}", ""])
                per_class[cls] += 1
            counts[str(path)] = len(nuclei)
            if geojson_dir is not None:
                target = geojson_dir / name
                atomic_write_text(target, json.dumps(to_geojson(nuclei)) + "\n")
                written.append(str(target))
    summary = {"model": seg.source, "downscale": seg.downscale, "threshold": seg.threshold,
               "stain_norm": None if seg.stain_norm is None else seg.stain_norm.method,
               "mpp": seg.mpp,
               "precision": precision_name(seg.amp_dtype),
               "n_images": len(files), "n_ok": len(files) - len(failed), "n_failed": len(failed),
               "n_nuclei": sum(per_class.values()), "per_class": per_class, "failed": failed,
               "no_nuclei": [p for p, n in counts.items() if n == 0],
               "nuclei_per_image": counts, "output": str(out), "geojson": written}
    atomic_write_text(Path(f"{out}.json"), json.dumps(summary, indent=2) + "\n")
    return summary


