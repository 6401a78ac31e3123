"""Robustness to stain and scanner shift (issue 12, SPEC 8): models scored on shifted copies of the
same images, and the paper's claim that the segmentation routes generalise better, tested.

Every model sees the same shifted images (:func:`shift_image`, image ``i`` with seed ``seed + i``), made once per setting and scored by each model in turn. Cellularity models are scored
as a user who cuts patches of the training size would score them: each image is cut into windows of
the model's training patch (``Predictor(mpp=...)``), so a 40x scan (the ``scale`` shift at +1: the
same tissue in twice the pixels) gives four windows of half the field, each with nuclei twice the
size the model learned. The remedies are scored the same way: stain normalisation to the training
set's stain (the reference stored in the model file) and the true pixel size (``--mpp``).

The comparison follows SPEC 5.1 (:func:`cellulib.reporting.verdicts.verdict`): a difference counts only when its
95% paired-bootstrap CI excludes 0 and the models compared learned on the unshifted images. Used in
the stain-shift chapter.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cellulib.reporting.statistics import Estimate, paired_mean

__all__ = [
    "GRID",
    "NORMALISATION_EXAMPLES",
    "TISSUE_LEVEL",
    "ShiftPlan",
    "as_seen",
    "degradation_sentence",
    "detection_sentence",
    "detection_shift_table",
    "example_rows",
    "finding_sentence",
    "lost_to_mean",
    "normalisation_examples",
    "normalised",
    "remedy_scores",
    "remedy_sentence",
    "remedy_table",
    "remedy_tally",
    "route_table",
    "route_tally",
    "route_verdicts",
    "shift_plan",
    "stain_sentence",
    "stain_table",
    "strength_table",
    "summary_sentence",
    "SHIFT_VERSION",
    "MODERATE",
    "SHIFTS",
    "SHIFT_NAMES",
    "degradation",
    "degradation_difference",
    "degradation_table",
    "mse_change",
    "route_summary",
    "detection_under_shifts",
    "icc_table",
    "score_under_shifts",
    "shift_image",
    "shift_summary",
    "shifted_images",
    "strength_label",
]

#: The shifts of :func:`shift_image`.
SHIFTS = ("hed", "hestain", "brightness_contrast", "blur", "jpeg", "scale")
#: Shift kind -> strengths scored (:func:`shift_image`; 1 is the strongest tested).
GRID: dict[str, tuple[float, ...]] = {
    "hed": (0.5, 1.0),
    "hestain": (0.5, 1.0),
    "brightness_contrast": (0.5, 1.0),
    "blur": (0.5, 1.0),
    "jpeg": (0.5, 1.0),
    "scale": (-1.0, -0.5, 0.5, 1.0),
}
#: Bumped whenever what :func:`shift_image` makes of an image changes, or how
#: :func:`score_under_shifts` scores it: the stored scores (:func:`cellulib.training.cache.derived_frame`)
#: are then computed again.
SHIFT_VERSION = 1
#: The "moderate" strength of the degradation table (``scale``: +0.5, a 1.41x magnification).
MODERATE = 0.5
#: Readable names of the shift kinds.
SHIFT_NAMES = {"hed": "HED stain", "hestain": "HEStain preset",
               "brightness_contrast": "brightness/contrast", "blur": "blur (focus)",
               "jpeg": "JPEG compression", "scale": "pixel scale", "none": "none"}


def strength_label(kind: str, strength: float) -> str:
    """What ``strength`` means for ``kind``, in the shift's own units."""
    s = float(strength)
    if kind == "none" or s == 0:
        return "none"
    return {
        "hed": f"H, E OD x(1 ± {0.5 * s:.2g}), ± {0.05 * s:.2g}",
        "hestain": f"preset stain, intensity x(1 ± {0.5 * s:.2g})",
        "brightness_contrast": f"± {40 * s:.0f}% each",
        "blur": f"Gaussian sigma {2 * s:.2g} px",
        "jpeg": f"quality {round(95 - 85 * s)}",
        "scale": f"x{2 ** s:.2g} magnification",
    }[kind]


def _albumentations(transform, img: np.ndarray, seed: int) -> np.ndarray:
    import albumentations as A

    return A.Compose([transform], seed=int(seed))(image=img)["image"]


def shift_image(img: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """One controlled shift of an image at ``strength`` (0 = none, 1 = the strongest tested).

    SPEC 8. Kinds (``SHIFTS``), with what strength 1 means:

    - ``hed``: H and E optical densities scaled by 1 +/- 0.5 and shifted by +/- 0.05 (skimage HED
      units), signs drawn from ``seed`` (:func:`cellulib.data.stain.hed_perturb`);
    - ``hestain``: albumentations ``HEStain`` with a random preset stain matrix and intensity
      scale 1 +/- 0.5 (presets drawn from ``seed``);
    - ``brightness_contrast``: brightness and contrast each changed by +/- 40%;
    - ``blur``: Gaussian blur of sigma 2 px (focus);
    - ``jpeg``: JPEG at quality 10 (quality ``95 - 85 * strength``; scanner compression);
    - ``scale``: the same tissue scanned at ``2 ** strength`` times the magnification: the whole
      image resampled to that size (x2 at 1, a 40x scan of a 20x patch; x0.5 at -1), with area
      averaging when it shrinks and bilinear interpolation when it grows.

    The same ``(img, kind, strength, seed)`` gives the same image. Used in the stain-shift chapter.
    """
    import cv2

    from cellulib.data.stain import _rgb8, hed_perturb

    arr = _rgb8(img)
    s = float(strength)
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; choose one of {SHIFTS}")
    if not (-1.0 <= s <= 1.0) or (kind != "scale" and s < 0):
        raise ValueError(f"strength must lie in [0, 1] ([-1, 1] for scale), got {strength}")
    if s == 0:
        return arr.copy()
    rng = np.random.default_rng(seed)
    if kind == "hed":
        sign = rng.choice([-1.0, 1.0], size=4)
        return hed_perturb(arr, 1 + 0.5 * s * sign[0], 1 + 0.5 * s * sign[1],
                           0.05 * s * sign[2], 0.05 * s * sign[3])
    if kind == "hestain":
        import albumentations as A

        tfm = A.HEStain(method="random_preset", intensity_scale_range=(1 - 0.5 * s, 1 + 0.5 * s),
                        intensity_shift_range=(-0.1 * s, 0.1 * s), p=1.0)
        return _albumentations(tfm, arr, seed)
    if kind == "brightness_contrast":
        sign = rng.choice([-1.0, 1.0], size=2)
        alpha, beta = 1 + 0.4 * s * sign[0], 0.4 * s * sign[1] * 255
        mean = arr.reshape(-1, 3).mean(axis=0)
        out = (arr.astype(np.float64) - mean) * alpha + mean + beta
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if kind == "blur":
        return cv2.GaussianBlur(arr, (0, 0), sigmaX=2.0 * s, borderType=cv2.BORDER_REFLECT_101)
    if kind == "jpeg":
        quality = int(round(95 - 85 * s))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    zoom = 2.0 ** s
    h, w = arr.shape[:2]
    size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)


def shifted_images(images: Sequence[np.ndarray], kind: str, strength: float,
                   seed: int = 0) -> list[np.ndarray]:
    """``images`` through one shift (:func:`shift_image`); image ``i`` gets seed ``seed + i``, so
    every model sees the same pixels."""
    if kind == "none" or strength == 0:
        return [np.asarray(img) for img in images]
    return [shift_image(img, kind, strength, seed + i) for i, img in enumerate(images)]


def _score(predictor, images: Sequence[np.ndarray]) -> np.ndarray:
    """Cellularity of in-memory images with a ready Predictor (its streaming engine)."""
    jobs = ((i, (lambda img=img, i=i: predictor.prepare(img, f"image {i}")))
            for i, img in enumerate(images))
    out = np.full(len(images), np.nan)
    for i, value, error in predictor.stream(jobs, total=len(images), progress=False):
        if error:
            raise ValueError(f"scoring a shifted image failed: {error}")
        out[i] = value
    return out


def _settings(grid: Mapping[str, Sequence[float]]) -> list[tuple[str, float]]:
    return [("none", 0.0)] + [(k, float(s)) for k, strengths in grid.items() for s in strengths]


def score_under_shifts(models: Mapping[str, Any], paths: Sequence, y_true: Sequence[float],
                       grid: Mapping[str, Sequence[float]] = GRID, seed: int = 0,
                       train_mean: float | None = None, stain_norm: str | None = None,
                       true_mpp: bool = False, progress: bool = True,
                       cache: bool = True) -> pd.DataFrame:
    """Every model's cellularity on every shifted copy of the images: one row per (model, shift,
    strength, image).

    The table is stored (:func:`cellulib.training.cache.derived_frame`) under a key of the models' weights,
    the images' bytes, the arguments, :data:`SHIFT_VERSION`,
    :data:`cellulib.inference.predict.INFERENCE_VERSION`, :data:`cellulib.data.stain.REFERENCE_VERSION` and the
    library versions, so re-executing the chapter after an edit elsewhere reads it back in a
    second instead of scoring every setting again.

    Parameters
    ----------
    models : mapping
        Name -> model file or ``(model, info)`` pair (direct, SR or GBT).
    paths, y_true : sequences
        The images and their labels.
    grid : mapping
        Shift kind -> strengths; the unshifted images are always scored (kind ``"none"``).
    seed : int
        Image ``i`` is shifted with seed ``seed + i``.
    train_mean : float, optional
        Adds the mean predictor (a constant, the same under every shift).
    stain_norm : ``"macenko"``, ``"reinhard"`` or None
        Normalise every image, after the shift, to the stain of the model's training set (the
        reference in its file, :func:`cellulib.data.stain.training_reference`).
    true_mpp : bool
        Give each model the true pixel size of a ``scale``-shifted image (``--mpp``), instead of
        cutting it into windows of the training patch's pixel size.
    progress : bool
        A bar over the settings.
    cache : bool
        Read a stored table when there is one, and store the one computed.

    Returns
    -------
    pandas.DataFrame
        ``model, kind, strength, path, y_true, y_pred``.
    """
    from cellulib.inference.modelfile import model_and_info
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.inference.predict import Predictor

    y_true = np.asarray(y_true, dtype=np.float64)
    paths = [str(p) for p in paths]
    if len(paths) != len(y_true) or not paths:
        raise ValueError("score_under_shifts needs one label per image and at least one image")
    loaded = {name: model_and_info(m)[1:] for name, m in models.items()}
    norms = {name: normalizer_from_options(stain_norm, None, pair) if stain_norm else None
             for name, pair in loaded.items()}
    predictors = {name: Predictor(pair, stain_norm=norms[name], mpp=1.0)
                  for name, pair in loaded.items()}

    def compute() -> pd.DataFrame:
        return _score_settings(predictors, paths, y_true, grid, seed, train_mean, true_mpp,
                               progress)

    if not cache:
        return compute()
    from cellulib.data.fingerprint import files_digest
    from cellulib.data.stain import REFERENCE_VERSION
    from cellulib.inference.modelfile import weights_digest
    from cellulib.inference.predict import INFERENCE_VERSION
    from cellulib.training.cache import derived_frame

    weights = {name: weights_digest(pair[0]) for name, pair in loaded.items()}
    described = {name: {k: v for k, v in pred.describe().items()
                        if k not in ("model", "cellulib_version", "model_cellulib_version")}
                 for name, pred in predictors.items()}
    parts = {"models": {name: {"weights": weights[name], "predictor": described[name]}
                        for name in predictors},
             "images": paths, "bytes": files_digest(paths), "y_true": y_true.tolist(),
             "grid": {k: [float(s) for s in v] for k, v in grid.items()}, "seed": int(seed),
             "train_mean": None if train_mean is None else float(train_mean),
             "stain_norm": stain_norm, "true_mpp": bool(true_mpp)}
    return derived_frame("shifts", parts, list(weights.values()),
                         {"inference": INFERENCE_VERSION, "shift": SHIFT_VERSION,
                          "stain": REFERENCE_VERSION}, compute,
                         libraries=("torch", "numpy", "opencv", "albumentations", "scikit-image",
                                    "lightgbm", "scipy", "timm"))


def _score_settings(predictors: Mapping[str, Any], paths: list[str], y_true: np.ndarray,
                    grid: Mapping[str, Sequence[float]], seed: int, train_mean: float | None,
                    true_mpp: bool, progress: bool) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from cellulib.files.imageio import read_image

    originals = [read_image(p) for p in paths]
    rows = []
    for kind, strength in tqdm(_settings(grid), desc="shifts", disable=not progress):
        images = shifted_images(originals, kind, strength, seed)
        zoom = 2.0 ** strength if kind == "scale" else 1.0
        for name, pred in predictors.items():
            # windows of the training patch in pixels; with true_mpp, of the training field
            pred.mpp = pred.model_mpp / (zoom if true_mpp else 1.0)
            rows.append(pd.DataFrame({"model": name, "kind": kind, "strength": strength,
                                      "path": paths, "y_true": y_true,
                                      "y_pred": _score(pred, images)}))
        if train_mean is not None:
            from cellulib.reporting.statistics import MEAN_PREDICTOR

            rows.append(pd.DataFrame({"model": MEAN_PREDICTOR, "kind": kind, "strength": strength,
                                      "path": paths, "y_true": y_true,
                                      "y_pred": float(train_mean)}))
    return pd.concat(rows, ignore_index=True)


def _errors(scores: pd.DataFrame, model: str, kind: str, strength: float) -> np.ndarray:
    part = scores[(scores["model"] == model) & (scores["kind"] == kind)
                  & np.isclose(scores["strength"], strength)]
    if part.empty:
        raise KeyError(f"no scores for {model!r} under {kind} at strength {strength}")
    return (part["y_pred"].to_numpy() - part["y_true"].to_numpy()) ** 2


def shift_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """MSE and ICC(2,1) of each model at each (kind, strength): one row each, the unshifted
    images as kind ``none``."""
    from cellulib.metrics.agreement import icc, mse

    rows = []
    for (model, kind, strength), part in scores.groupby(["model", "kind", "strength"], sort=False):
        t, p = part["y_true"].to_numpy(), part["y_pred"].to_numpy()
        rows.append({"model": model, "kind": kind, "strength": strength, "mse": mse(t, p),
                     "icc": icc(np.column_stack([t, p])) if np.ptp(p) > 0 else 0.0})
    return pd.DataFrame(rows)


def degradation(scores: pd.DataFrame, model: str, kind: str, strength: float,
                n_boot: int = 2000, seed: int = 0) -> Estimate:
    """MSE under the shift minus MSE on the unshifted images, with a 95% paired-bootstrap CI
    (the images resampled once per replicate for both)."""
    d = _errors(scores, model, kind, strength) - _errors(scores, model, "none", 0.0)
    return paired_mean(d, n_boot, seed)


def mse_change(scores_a: pd.DataFrame, scores_b: pd.DataFrame, model: str, kind: str,
               strength: float, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """MSE of ``model`` in run A minus in run B at one setting (e.g. with and without a remedy),
    with a 95% paired-bootstrap CI over the images. Negative: A is better."""
    d = _errors(scores_a, model, kind, strength) - _errors(scores_b, model, kind, strength)
    return paired_mean(d, n_boot, seed)


def degradation_difference(scores: pd.DataFrame, group_a: Sequence[str], group_b: Sequence[str],
                           kind: str, strength: float, n_boot: int = 2000, seed: int = 0,
                           scores_b: pd.DataFrame | None = None) -> Estimate:
    """Mean degradation of the models in ``group_a`` minus that of ``group_b`` (each the mean
    over its models of MSE shifted minus MSE unshifted), with a 95% paired-bootstrap CI over the
    images. Negative: group A loses less under the shift. ``scores_b`` scores group B when it
    comes from another run (a remedy), on the same images."""
    scores_b = scores if scores_b is None else scores_b

    def per_image(frame, group):
        return np.mean([_errors(frame, m, kind, strength) - _errors(frame, m, "none", 0.0)
                        for m in group], axis=0)

    return paired_mean(per_image(scores, group_a) - per_image(scores_b, group_b), n_boot, seed)


def degradation_table(scores: pd.DataFrame, models: Sequence[str] | None = None,
                      strength: float = MODERATE, n_boot: int = 2000, seed: int = 0
                      ) -> pd.DataFrame:
    """The rise in MSE of each model under each shift at ``strength`` (``scale`` at +``strength``),
    ``"d [lo, hi]"`` with the 95% paired-bootstrap CI, and the unshifted MSE beside it."""
    from cellulib.metrics.agreement import format_ci

    models = list(pd.unique(scores["model"])) if models is None else list(models)
    kinds = [k for k in pd.unique(scores["kind"]) if k != "none"]
    out = pd.DataFrame(index=models)
    out["MSE, no shift"] = [f"{_errors(scores, m, 'none', 0.0).mean():.4f}" for m in models]
    for kind in kinds:
        est = [degradation(scores, m, kind, strength, n_boot, seed) for m in models]
        out[SHIFT_NAMES[kind]] = [format_ci(e.value, e.ci_low, e.ci_high, digits=4) for e in est]
    out.index.name = "model"
    return out


def icc_table(scores: pd.DataFrame, models: Sequence[str] | None = None,
              strength: float = MODERATE) -> pd.DataFrame:
    """ICC(2,1) of each model unshifted and under each shift at ``strength``, ``"icc [lo, hi]"``
    with the 95% CI of :func:`cellulib.metrics.agreement.icc_ci` (a constant prediction, the mean
    predictor, has ICC 0 and no interval)."""
    from cellulib.metrics.agreement import format_ci, icc, icc_ci

    models = list(pd.unique(scores["model"])) if models is None else list(models)
    kinds = ["none"] + [k for k in pd.unique(scores["kind"]) if k != "none"]

    def cell(model, kind):
        part = scores[(scores["model"] == model) & (scores["kind"] == kind)
                      & np.isclose(scores["strength"], 0.0 if kind == "none" else strength)]
        ratings = part[["y_true", "y_pred"]].to_numpy(dtype=np.float64)
        if np.ptp(ratings[:, 1]) == 0:
            return "0 (constant)"
        return format_ci(icc(ratings), *icc_ci(ratings), digits=3)

    out = pd.DataFrame({"no shift" if k == "none" else SHIFT_NAMES[k]: [cell(m, k) for m in models]
                        for k in kinds}, index=pd.Index(models, name="model"))
    return out


def route_summary(verdicts: Mapping[str, str]) -> str:
    """One sentence on the paper's argument from the verdicts of the route comparison (setting ->
    :func:`cellulib.reporting.verdicts.verdict` of "the segmentation routes lose less")."""
    holds = [k for k, v in verdicts.items() if v == "holds"]
    against = [k for k, v in verdicts.items() if v == "does not hold"]
    n = len(verdicts)
    if n and len(holds) == n:
        return "the segmentation routes lose less under every shift tested, as the paper argues"
    if not holds and not against:
        return (f"no shift setting separates the routes (all {n} undecided), so these data neither "
                "support nor contradict the paper's argument")
    parts = []
    if holds:
        parts.append(f"the segmentation routes lose less under {'; '.join(holds)}, as the paper "
                     "argues")
    if against:
        parts.append(f"the direct models lose less under {'; '.join(against)}, against it")
    rest = n - len(holds) - len(against)
    tail = ("" if not rest else "; the other setting is undecided" if rest == 1
            else f"; the other {rest} settings are undecided")
    return ", and ".join(parts) + tail


def detection_under_shifts(model: Any, cells: pd.DataFrame,
                           grid: Mapping[str, Sequence[float]], seed: int = 0,
                           threshold: float | None = None, stain_norm: str | None = None,
                           progress: bool = True,
                           cache: bool = True) -> dict[tuple[str, float], pd.DataFrame]:
    """Per-image detection counts of a segmentation model on annotated images under each shift:
    ``{(kind, strength): counts}`` (:func:`cellulib.metrics.detection.detection_counts`), the unshifted
    images as ``("none", 0.0)``. A ``scale`` shift resamples the whole image, and the detections
    are mapped back to the dots' pixels. ``stain_norm`` normalises each shifted image to the
    stain of the model's training set first. With ``cache`` the counts are stored
    (:func:`cellulib.training.cache.derived_frame`) under a key of the model's weights, the images' and
    annotations' bytes, the arguments, :data:`SHIFT_VERSION` and
    :data:`cellulib.inference.detect.DETECTION_VERSION`, and read back when none of them changed."""
    from tqdm.auto import tqdm

    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.data.fingerprint import files_digest
    from cellulib.data.stain import REFERENCE_VERSION
    from cellulib.inference.detect import DETECTION_VERSION, score_annotated
    from cellulib.inference.modelfile import model_and_info, weights_digest
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.metrics.detection import detection_counts
    from cellulib.training.cache import derived_frame

    threshold = DETECTION_THRESHOLD if threshold is None else float(threshold)
    _, net, info = model_and_info(model)
    model = (net, info)
    norm = normalizer_from_options(stain_norm, None, model) if stain_norm else None

    def compute() -> pd.DataFrame:
        frames = []
        for kind, strength in tqdm(_settings(grid), desc="detection shifts",
                                   disable=not progress):
            def transform(img, i, kind=kind, strength=strength):
                if kind != "none":
                    img = shift_image(img, kind, strength, seed + i)
                return norm.normalize(img) if norm is not None else img

            res = score_annotated(model, cells, threshold, progress=False, transform=transform)
            counts = detection_counts(res.truth, res.pred, images=res.fractions["image"])
            frames.append(counts.assign(kind=kind, strength=float(strength)))
        return pd.concat(frames, ignore_index=True)

    if cache:
        files = [str(p) for pair in zip(cells["image_path"], cells["xml_path"]) for p in pair]
        weights = weights_digest(net)
        parts = {"weights": weights, "config": info.get("config"),
                 "preprocess": (info.get("meta") or {}).get("preprocess"),
                 "files": files, "bytes": files_digest(files), "names": list(cells["name"]),
                 "grid": {k: [float(s) for s in v] for k, v in grid.items()}, "seed": int(seed),
                 "threshold": threshold, "stain_norm": stain_norm}
        table = derived_frame("detection-shifts", parts, [weights],
                              {"detection": DETECTION_VERSION, "shift": SHIFT_VERSION,
                               "stain": REFERENCE_VERSION}, compute,
                              libraries=("torch", "numpy", "opencv", "albumentations",
                                         "scikit-image", "scipy"))
    else:
        table = compute()
    return {(kind, float(strength)): part.drop(columns=["kind", "strength"]).reset_index(drop=True)
            for (kind, strength), part in table.groupby(["kind", "strength"], sort=False)}


# --------------------------------------------------------------------------------------------
# the stain-shift chapter's tables and sentences


class ShiftPlan(NamedTuple):
    """The settings the stain-shift chapter scores, each kind -> strengths. Used in the stain-shift
    chapter through :func:`shift_plan`."""

    grid: dict[str, tuple[float, ...]]  # every setting of the cellularity models
    strong: dict[str, tuple[float, ...]]  # the strongest: 1, and -1 (x0.5) for ``scale``
    compared: dict[str, tuple[float, ...]]  # the route comparison: moderate and the strongest
    detection: dict[str, tuple[float, ...]]  # the real nucleus detector: moderate and 1 (and -1)
    stain: dict[str, tuple[float, ...]]  # the stain shifts the stain remedies address


def shift_plan(moderate: float = MODERATE, augment: str = "hed") -> ShiftPlan:
    """The shift settings of the stain-shift chapter, with ``moderate`` added to :data:`GRID`
    (``scale`` at both +``moderate`` and -``moderate``); ``augment`` (a stain augmentation of
    :data:`cellulib.data.transforms.STAIN_AUGMENTS`) is only checked. Used in the stain-shift chapter.

    Examples
    --------
    >>> shift_plan(0.3).grid["scale"]
    (-1.0, -0.5, -0.3, 0.3, 0.5, 1.0)
    >>> shift_plan().compared["hed"], shift_plan().compared["scale"]
    ((0.5, 1.0), (0.5, -1.0, 1.0))
    """
    from cellulib.data.transforms import STAIN_AUGMENTS

    if not 0 < moderate <= 1:
        raise ValueError(f"moderate must lie in (0, 1], got {moderate}")
    if augment not in STAIN_AUGMENTS:
        raise ValueError(f"augment must be one of {STAIN_AUGMENTS}, got {augment!r}")
    grid = {kind: tuple(sorted(set(strengths) | ({moderate, -moderate} if kind == "scale"
                                                 else {moderate})))
            for kind, strengths in GRID.items()}
    strong = {kind: (-1.0, 1.0) if kind == "scale" else (1.0,) for kind in grid}
    return ShiftPlan(
        grid, strong, {kind: (moderate, *strong[kind]) for kind in grid},
        {kind: (-1.0, moderate, 1.0) if kind == "scale" else (moderate, 1.0) for kind in grid},
        {kind: (moderate, 1.0) for kind in ("hed", "hestain", "brightness_contrast")})


def as_seen(img: np.ndarray, side: int) -> np.ndarray:
    """The first ``side`` x ``side`` window of a resampled image, as the scoring cuts it; an image
    smaller than that is padded by reflection on both sides. Used in the stain-shift chapter
    through :func:`example_rows`."""
    h, w = img.shape[:2]
    if h >= side and w >= side:
        return img[:side, :side]
    py, px = max(0, side - h), max(0, side - w)
    return np.pad(img, ((py // 2, py - py // 2), (px // 2, px - px // 2), (0, 0)), mode="reflect")


def example_rows(examples: Mapping[str, np.ndarray], kinds: Sequence[str],
                 strengths: Sequence[float], seed: int = 0) -> tuple[list[list[np.ndarray]], list[str]]:
    """Rows of a figure of the shifts: for each example image and strength, the image and its
    shifted copies under ``kinds`` as the model sees them (:func:`as_seen`), with row labels
    ``"{source}, strength {s}"``. Used in the stain-shift chapter."""
    rows, labels = [], []
    for source, img in examples.items():
        for s in strengths:
            rows.append([img] + [as_seen(shift_image(img, kind, s, seed), img.shape[0])
                                 for kind in kinds])
            labels.append(f"{source}, strength {s:g}")
    return rows, labels


def strength_table(kinds: Sequence[str], strengths: Sequence[float]) -> pd.DataFrame:
    """What each strength means for each shift (:func:`strength_label`), one row per shift. Used
    in the stain-shift chapter."""
    return pd.DataFrame({f"strength {s:g}": [strength_label(k, s) for k in kinds] for s in strengths},
                        index=pd.Index([SHIFT_NAMES[k] for k in kinds], name="shift"))


def lost_to_mean(scores: pd.DataFrame, models: Sequence[str], settings: Mapping[str, Sequence[float]],
                 mean_mse: float, n_boot: int = 2000, seed: int = 0) -> list[tuple[str, float, str]]:
    """The floor under shift: ``(kind, strength, model)`` for every model and setting at which the
    model no longer beats the mean predictor (the upper end of its MSE's 95% CI is not below
    ``mean_mse``, :func:`cellulib.reporting.statistics.learned`). Used in the stain-shift chapter."""
    from cellulib.reporting.statistics import learned, mse_ci

    lost = []
    for kind, strengths in settings.items():
        for s in strengths:
            for model in models:
                part = scores[(scores["model"] == model) & (scores["kind"] == kind)
                              & np.isclose(scores["strength"], s)]
                high = mse_ci(part["y_true"], part["y_pred"], n_boot=n_boot, seed=seed).ci_high
                if not learned(high, mean_mse, len(part)):
                    lost.append((kind, s, model))
    return lost


def degradation_sentence(clean: pd.DataFrame, summary: pd.DataFrame,
                         routes: Mapping[str, Sequence[str]], lost: Sequence[tuple[str, float, str]],
                         strong: Mapping[str, Sequence[float]]) -> str:
    """How much the worst shift costs each route, and which model-shift pairs fall to the mean
    predictor (:func:`lost_to_mean` at the ``strong`` settings), in words. ``clean`` is the
    unshifted :func:`cellulib.reporting.statistics.mse_summary`, ``summary`` the :func:`shift_summary`. Used in
    the stain-shift chapter."""
    from cellulib.reporting.statistics import MEAN_PREDICTOR, all_learned

    models = [m for ms in routes.values() for m in ms]
    worst = summary[summary.kind != "none"].sort_values("mse").groupby("model").tail(1).set_index("model")
    ratio = {m: worst.loc[m, "mse"] / clean.loc[m, "mse"] for m in models}
    by_route = {r: np.mean([ratio[m] for m in ms]) for r, ms in routes.items()}
    text = ("Unshifted, every model has learned (chapters 3 and 4). " if all_learned(clean) else
            "Unshifted, not every model has learned ("
            + ", ".join(n for n in models if not clean.loc[n, "learned"])
            + " did not), so no comparison below can be decided. ")
    text += (f"The worst shift multiplies a model's MSE by {min(ratio.values()):.1f} to "
             f"{max(ratio.values()):.1f} (on average {by_route['segmentation']:.1f}x for the "
             f"segmentation routes and {by_route['direct']:.1f}x for the direct models). ")
    if not lost:
        return text + "Even at strength 1 every model still beats the mean predictor."
    grouped: dict[tuple[str, float], list[str]] = {}
    for kind, s, model in lost:
        grouped.setdefault((kind, s), []).append(model)
    n_pairs = len(models) * sum(len(v) for v in strong.values())
    return (text + f"At strength 1 (and x0.5), {len(lost)} of {n_pairs} model-shift pairs no longer "
            "beat the mean predictor (the upper end of the MSE's 95% CI is not below its "
            f"{float(clean.loc[MEAN_PREDICTOR, 'mse']):.4f}): " + "; ".join(
                f"{SHIFT_NAMES[k]} at {s:g}: "
                + (f"all {len(models)} models" if len(ms) == len(models) else ", ".join(ms))
                for (k, s), ms in grouped.items()) + ".")


def route_table(scores: pd.DataFrame, settings: Mapping[str, Sequence[float]],
                routes: Mapping[str, Sequence[str]], pair: Sequence[str], all_learned: bool,
                n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The paper's claim per shift setting: the mean rise in MSE of the segmentation routes minus
    that of the direct models (:func:`degradation_difference`), and the same for one ``pair`` of
    models (segmentation, direct), each with its :func:`cellulib.reporting.verdicts.verdict` (undecided unless
    ``all_learned``). Used in the stain-shift chapter."""
    from cellulib.metrics.agreement import format_ci
    from cellulib.reporting.verdicts import verdict

    rows = []
    for kind, strengths in settings.items():
        for s in strengths:
            both = degradation_difference(scores, routes["segmentation"], routes["direct"], kind, s,
                                          n_boot, seed)
            one = degradation_difference(scores, [pair[0]], [pair[1]], kind, s, n_boot, seed)
            rows.append({"shift": SHIFT_NAMES[kind], "strength": strength_label(kind, s),
                         "segmentation - direct": format_ci(*both, digits=4),
                         "verdict (routes)": verdict(both, all_learned, all_learned),
                         f"{pair[0]} - {pair[1]}": format_ci(*one, digits=4),
                         "verdict (pair)": verdict(one, all_learned, all_learned)})
    return pd.DataFrame(rows).set_index(["shift", "strength"])


def route_verdicts(table: pd.DataFrame) -> dict[str, str]:
    """``"{shift} ({strength})" -> verdict`` of the routes in a :func:`route_table`, as
    :func:`route_summary` reads them. Used in the stain-shift chapter through
    :func:`route_tally`."""
    return {f"{s} ({t})": v for (s, t), v in table["verdict (routes)"].items()}


def route_tally(table: pd.DataFrame, all_learned: bool) -> str:
    """A :func:`route_table` in words: how many settings hold, do not hold and are undecided, then
    :func:`route_summary`. Used in the stain-shift chapter."""
    counts = table["verdict (routes)"].value_counts()
    return (f"Over the {len(table)} shift settings the claim holds in {counts.get('holds', 0)}, "
            f"does not hold in {counts.get('does not hold', 0)} and is undecided in "
            f"{counts.get('undecided', 0)}: " + route_summary(route_verdicts(table)) + "."
            + ("" if all_learned else
               " Not every model learned on the unshifted patches, so every verdict is undecided."))


def detection_shift_table(counts: Mapping[tuple[str, float], pd.DataFrame], n_boot: int = 2000,
                          seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pooled and tumour F of a detector under each shift (:func:`detection_under_shifts`), and
    the change against the unshifted images with a 95% paired-bootstrap CI over the images
    (:func:`cellulib.reporting.statistics.paired_detection_difference`): the table, and the changes as rows of
    :func:`cellulib.reporting.plots.estimate_whiskers`. Used in the stain-shift chapter."""
    from cellulib.metrics.agreement import format_ci
    from cellulib.metrics.detection import scores_from_counts
    from cellulib.reporting.statistics import paired_detection_difference

    base = counts[("none", 0.0)]
    rows, whisk = [], []
    for (kind, s), part in counts.items():
        f = scores_from_counts(part.groupby("class")[["tp", "fp", "fn"]].sum())["f1"]
        row = {"shift": SHIFT_NAMES[kind], "strength": strength_label(kind, s),
               "pooled F": round(f["detection"], 3), "tumour F": round(f["malignant"], 3)}
        if kind != "none":
            for cls, label in (("detection", "pooled"), ("malignant", "tumour")):
                d = paired_detection_difference(part, base, cls, n_boot=n_boot, seed=seed)
                row[f"change in {label} F"] = format_ci(*d)
                whisk.append({"label": f"{SHIFT_NAMES[kind]}, {strength_label(kind, s)}",
                              "group": f"{label} F", "value": d.value, "ci_low": d.ci_low,
                              "ci_high": d.ci_high})
        rows.append(row)
    return (pd.DataFrame(rows).set_index(["shift", "strength"]).fillna(""), pd.DataFrame(whisk))


def detection_sentence(detector: str, n_images: int, split: str, table: pd.DataFrame,
                       whisk: pd.DataFrame) -> str:
    """A :func:`detection_shift_table` in words: the unshifted F, and under how many settings
    pooled F falls with its CI below 0. Used in the stain-shift chapter."""
    if not len(whisk):
        return "No shift was scored."
    pooled = whisk[whisk.group == "pooled F"]
    drops = pooled[pooled.ci_high < 0]
    worst = whisk.loc[pooled["value"].idxmin()]
    return (f"The {detector} network on the {n_images} images of BRCA-M2C's {split} split finds "
            f"nuclei with pooled F {table.iloc[0]['pooled F']:.3f} and tumour F "
            f"{table.iloc[0]['tumour F']:.3f} unshifted. Pooled F falls significantly (the CI "
            f"below 0) under {len(drops)} of {len(whisk) // 2} shift settings; the largest fall "
            f"is {-worst.value:.3f} ({worst.label}).")


#: The real H&E images of ``../shared/data/real`` the stain-normalisation figure shows.
NORMALISATION_EXAMPLES = {"BreastPathQ": "breastpathq_99788_1.tif",
                          "AMIDA13": "amida13_example1.png",
                          "OpenSlide CMU-1": "openslide_OS-1-detail.ome.tif"}
#: Tissue in :func:`stain_table`: pixels darker than this in every channel.
TISSUE_LEVEL = 220


def normalisation_examples(real_dir: str | os.PathLike | None, side: int = 512
                           ) -> dict[str, np.ndarray]:
    """The :data:`NORMALISATION_EXAMPLES` present in ``real_dir``, each its top-left ``side`` px
    square. Used in the stain-shift chapter."""
    from cellulib.files.imageio import read_image

    if real_dir is None:
        return {}
    return {name: np.ascontiguousarray(read_image(Path(real_dir) / file)[:side, :side])
            for name, file in NORMALISATION_EXAMPLES.items() if (Path(real_dir) / file).is_file()}


def normalised(images: Mapping[str, np.ndarray], model: Any) -> dict[str, list[np.ndarray]]:
    """``images`` as they are and normalised to the stain stored in ``model``'s file by each
    method of :data:`cellulib.data.stain.METHODS`: ``{"as is": [...], "Macenko": [...], ...}``. Used in
    the stain-shift chapter."""
    from cellulib.data.stain import METHODS
    from cellulib.inference.normalizer import normalizer_from_options

    out = {"as is": list(images.values())}
    for method in METHODS:
        norm = normalizer_from_options(method, None, model)
        out[method.capitalize()] = [norm.normalize(img) for img in images.values()]
    return out


def stain_table(versions: Mapping[str, Sequence[np.ndarray]], names: Sequence[str],
                tissue_level: int = TISSUE_LEVEL) -> pd.DataFrame:
    """Mean haematoxylin (H) and eosin (E) optical density of each image's tissue (pixels darker
    than ``tissue_level`` in every channel; :func:`cellulib.data.measure.hed_stats`), per image (rows,
    ``names``) and version (columns, :func:`normalised`). Used in the stain-shift chapter."""
    from cellulib.data.measure import hed_stats

    stats = []
    for version, row in versions.items():
        for name, img in zip(names, row):
            tissue = np.all(img < tissue_level, axis=2)
            st = hed_stats(img, tissue if np.any(tissue) else None)
            stats.append({"image": name, "version": version, "H": st["H_mean"], "E": st["E_mean"]})
    return pd.DataFrame(stats).pivot(index="image", columns="version", values=["H", "E"]).round(3)


def stain_sentence(stats: pd.DataFrame, tissue_level: int = TISSUE_LEVEL) -> str:
    """A :func:`stain_table` in words: how far normalisation brings the images' mean H together.
    Used in the stain-shift chapter."""
    spread = {v: float(stats[("H", v)].std()) for v in ("as is", "Macenko", "Reinhard")}
    return (f"The table gives the mean haematoxylin (H) and eosin (E) optical density of each "
            f"image's tissue (skimage's colour deconvolution, pixels darker than {tissue_level} in "
            f"every channel). Across the {len(stats)} images the spread (standard deviation) of "
            f"mean H is {spread['as is']:.3f} as they are, {spread['Macenko']:.3f} after Macenko "
            f"and {spread['Reinhard']:.3f} after Reinhard.")


def remedy_table(remedies: Mapping[str, pd.DataFrame], scores: pd.DataFrame, models: Sequence[str],
                 all_learned: bool, augmented: pd.DataFrame | None = None, augment: str = "hed",
                 n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What each remedy changes: for every remedy (name -> its :func:`score_under_shifts` table,
    :func:`remedy_scores`), model and setting it addresses, the MSE without (``scores``) and with
    it, the change with a 95% paired-bootstrap CI (:func:`mse_change`) and its verdict
    ("helps", "hurts" or "undecided", :func:`cellulib.reporting.verdicts.claim_words`). The true pixel size addresses the ``scale`` shifts only (it changes
    nothing on unshifted patches); stain normalisation and jitter address the stain shifts and the
    unshifted patches, which they must not spoil. A verdict is undecided unless the model learned
    without the remedy (``all_learned``) and with it: the retrained models of ``"{AUGMENT}
    jitter"`` by their unshifted :func:`cellulib.reporting.statistics.mse_summary`, ``augmented``. Returns the
    table and the changes as rows of :func:`cellulib.reporting.plots.estimate_whiskers`. Used in the
    stain-shift chapter."""
    from cellulib.metrics.agreement import format_ci
    from cellulib.reporting.verdicts import claim_words, verdict

    order = list(GRID)
    rows, whisk = [], []
    for remedy, frame in remedies.items():
        settings = sorted(set(zip(frame.kind, frame.strength)),
                          key=lambda ks: (order.index(ks[0]) if ks[0] in order else -1, ks[1]))
        for kind, s in settings:
            if remedy == "true pixel size" and kind != "scale":
                continue
            for model in models:
                change = mse_change(frame, scores, model, kind, s, n_boot, seed)
                label = ("no shift" if kind == "none"
                         else f"{SHIFT_NAMES[kind]}, {strength_label(kind, s)}")
                learned_with = (bool(augmented.loc[model, "learned"])
                                if augmented is not None and remedy == f"{augment.upper()} jitter"
                                else all_learned)
                rows.append({"remedy": remedy, "model": model, "shift": label,
                             "MSE without": _errors(scores, model, kind, s).mean(),
                             "MSE with": _errors(frame, model, kind, s).mean(),
                             "change [95% CI]": format_ci(*change, digits=4),
                             "verdict": claim_words(verdict(change, learned_with, all_learned),
                                                    "helps", "hurts", "undecided")})
                whisk.append({"label": label, "group": f"{model}: {remedy}", "value": change.value,
                              "ci_low": change.ci_low, "ci_high": change.ci_high})
    table = (pd.DataFrame(rows).round({"MSE without": 4, "MSE with": 4})
             .set_index(["remedy", "model", "shift"]))
    return table, pd.DataFrame(whisk)


def remedy_tally(table: pd.DataFrame) -> dict[str, str]:
    """Per remedy of a :func:`remedy_table`: ``"helps in a, hurts in b, undecided in c of n"``.
    Used in the stain-shift chapter through :func:`remedy_sentence`."""
    return {remedy: (f"helps in {(v == 'helps').sum()}, hurts in {(v == 'hurts').sum()}, "
                     f"undecided in {(v == 'undecided').sum()} of {len(v)}")
            for remedy, v in table.groupby(level="remedy", sort=False)["verdict"]}


def remedy_sentence(table: pd.DataFrame, clean: pd.DataFrame, augmented: pd.DataFrame | None,
                    augment: str) -> str:
    """A :func:`remedy_table` in words, with the unshifted MSE of the models retrained with stain
    augmentation (``augmented``, their :func:`cellulib.reporting.statistics.mse_summary`; None when ``augment``
    is ``"none"``) beside those without (``clean``). Used in the stain-shift chapter."""
    from cellulib.reporting.sentences import learned_sentence

    text = ("Per remedy, over the cheapest model of each route and the shifts it addresses (a "
            "change counts when its CI excludes 0): "
            + "; ".join(f"**{r}** {t}" for r, t in remedy_tally(table).items()) + ".")
    if augmented is None or augment == "none":
        return text + " Stain augmentation was not retrained (augment='none')."
    return (text + f" Retrained with {augment.upper()} jitter, GBT reaches MSE "
            f"{augmented.loc['GBT', 'mse']:.4f} and ResNet34 (R) "
            f"{augmented.loc['ResNet34 (R)', 'mse']:.4f} on the unshifted patches (without: "
            f"{clean.loc['GBT', 'mse']:.4f} and {clean.loc['ResNet34 (R)', 'mse']:.4f}): "
            + learned_sentence(augmented) + ".")


def summary_sentence(scores: pd.DataFrame, grid: Mapping[str, Sequence[float]],
                     models: Sequence[str], lost: Sequence[tuple[str, float, str]],
                     routes: pd.DataFrame, remedies: pd.DataFrame,
                     detection: pd.DataFrame | None = None, n_boot: int = 2000,
                     seed: int = 0) -> str:
    """The stain-shift chapter's closing paragraph: how many model-shift settings raise the MSE
    significantly (:func:`degradation`), the pairs :func:`lost_to_mean`, the route verdicts
    (:func:`route_table`), the real detector's falls (the whiskers of
    :func:`detection_shift_table`, when scored) and the remedies (:func:`remedy_table`). Used in
    the stain-shift chapter."""
    settings = [(k, s) for k in grid for s in grid[k]]
    worse = [(k, s, m) for k, s in settings for m in models
             if degradation(scores, m, k, s, n_boot, seed).ci_low > 0]
    bits = [
        f"Under {len(worse)} of {len(settings) * len(models)} model-shift settings a cellularity "
        "model's MSE rises significantly (the CI of the rise above 0); the mean predictor, which "
        f"ignores the image, does not move. At strength 1 (and x0.5), {len(lost)} model-shift "
        "pairs fall to the mean predictor or worse.",
        "On the paper's argument that the segmentation routes generalise better: "
        f"{route_summary(route_verdicts(routes))}.",
    ]
    if detection is not None:
        drops = detection[(detection.group == "pooled F") & (detection.ci_high < 0)]
        bits.append(f"The real nucleus detector loses pooled F significantly under {len(drops)} of "
                    f"{len(detection) // 2} shift settings.")
    bits.append("Of the remedies: " + "; ".join(f"{r} {t}" for r, t in remedy_tally(remedies).items())
                + ".")
    return " ".join(bits)


def finding_sentence(routes: pd.DataFrame) -> str:
    """The stain-shift chapter's one-line finding, from its :func:`route_table`. Used in the
    stain-shift chapter."""
    verdicts = routes["verdict (routes)"]
    return ("Does the segmentation route generalise better to other stains and scanners, as the "
            f"paper argues? Here it holds for {int((verdicts == 'holds').sum())} of {len(verdicts)} "
            f"shift settings and is contradicted by {int((verdicts == 'does not hold').sum())}; "
            "stain normalisation and the true pixel size are the remedies that need no retraining.")


def remedy_scores(models: Mapping[str, Any], paths: Sequence, y_true: Sequence[float],
                  plan: ShiftPlan, seed: int = 0, augmented: Mapping[str, Any] | None = None,
                  augment: str = "hed") -> dict[str, pd.DataFrame]:
    """The remedies of the stain-shift chapter, each scored with :func:`score_under_shifts`:
    ``"Macenko"`` (``models`` with stain normalisation, under ``plan.stain``), ``"true pixel
    size"`` (``models`` given the true ``--mpp``, under the ``scale`` shifts of ``plan.grid``) and,
    with ``augmented`` (the same models retrained with ``augment``), ``"{AUGMENT} jitter"`` under
    ``plan.stain``. Used in the stain-shift chapter."""
    out = {"Macenko": score_under_shifts(models, paths, y_true, plan.stain, seed=seed,
                                         stain_norm="macenko", progress=False),
           "true pixel size": score_under_shifts(models, paths, y_true, {"scale": plan.grid["scale"]},
                                                 seed=seed, true_mpp=True, progress=False)}
    if augmented:
        out[f"{augment.upper()} jitter"] = score_under_shifts(augmented, paths, y_true, plan.stain,
                                                              seed=seed, progress=False)
    return out
