"""Robustness to stain and scanner shift (issue 12, SPEC 8): models scored on shifted copies of the
same images, and the paper's claim that the segmentation routes generalise better, tested.

Every model sees the same shifted images (:func:`shift_image`, image ``i`` with seed ``seed + i``), made once per setting and scored by each model in turn. Cellularity models are scored
as a user who cuts patches of the training size would score them: each image is cut into windows of
the model's training patch (``Predictor(mpp=...)``), so a 40x scan (the ``scale`` shift at +1: the
same tissue in twice the pixels) gives four windows of half the field, each with nuclei twice the
size the model learned. The remedies are scored the same way: stain normalisation to the training
set's stain (the reference stored in the model file) and the true pixel size (``--mpp``).

The comparison follows SPEC 5.1 (:func:`cellulib.report.verdict`): a difference counts only when its
95% paired-bootstrap CI excludes 0 and the models compared learned on the unshifted images. Used in
the stain-shift chapter.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellulib.report import Estimate, paired_mean

__all__ = [
    "GRID",
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
#: :func:`score_under_shifts` scores it: the stored scores (:func:`cellulib.store.derived_frame`)
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
      units), signs drawn from ``seed`` (:func:`cellulib.stain.hed_perturb`);
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

    from cellulib.stain import _rgb8, hed_perturb

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

    The table is stored (:func:`cellulib.store.derived_frame`) under a key of the models' weights,
    the images' bytes, the arguments, :data:`SHIFT_VERSION`,
    :data:`cellulib.predict.INFERENCE_VERSION`, :data:`cellulib.stain.REFERENCE_VERSION` and the
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
        reference in its file, :func:`cellulib.stain.training_reference`).
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
    from cellulib.predict import Predictor
    from cellulib.store import model_and_info, normalizer_from_options

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
    from cellulib.predict import INFERENCE_VERSION
    from cellulib.stain import REFERENCE_VERSION
    from cellulib.store import derived_frame, files_digest, weights_digest

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

    from cellulib.imageio import read_image

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
            from cellulib.report import MEAN_PREDICTOR

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
    from cellulib.metrics import icc, mse

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
    from cellulib.metrics import format_ci

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
    with the 95% CI of :func:`cellulib.metrics.icc_ci` (a constant prediction, the mean
    predictor, has ICC 0 and no interval)."""
    from cellulib.metrics import format_ci, icc, icc_ci

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
    :func:`cellulib.report.verdict` of "the segmentation routes lose less")."""
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
    ``{(kind, strength): counts}`` (:func:`cellulib.metrics.detection_counts`), the unshifted
    images as ``("none", 0.0)``. A ``scale`` shift resamples the whole image, and the detections
    are mapped back to the dots' pixels. ``stain_norm`` normalises each shifted image to the
    stain of the model's training set first. With ``cache`` the counts are stored
    (:func:`cellulib.store.derived_frame`) under a key of the model's weights, the images' and
    annotations' bytes, the arguments, :data:`SHIFT_VERSION` and
    :data:`cellulib.detect.DETECTION_VERSION`, and read back when none of them changed."""
    from tqdm.auto import tqdm

    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.detect import DETECTION_VERSION, score_annotated
    from cellulib.metrics import detection_counts
    from cellulib.stain import REFERENCE_VERSION
    from cellulib.store import (
        derived_frame,
        files_digest,
        model_and_info,
        normalizer_from_options,
        weights_digest,
    )

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
