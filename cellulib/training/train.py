"""Training with fastai: Learners for every model family and cached training runs.

Each ``train_*`` function trains one model for a profile (SPEC 6), saves it as one model file with
its history and validation scores (:func:`cellulib.save_model`), and caches it by its training recipe
(:func:`cellulib.training.cache.recipe`: the data, the resolved settings, the seed, the family's
:data:`RECIPE_VERSIONS` entry and the library versions), so a later chapter reuses an earlier
chapter's model and re-running a chapter gives the same table. What is computed from the weights
afterwards (the stored validation predictions and the stain reference) is keyed on the weights and
:data:`cellulib.inference.predict.INFERENCE_VERSION` / :data:`cellulib.data.stain.REFERENCE_VERSION`, and is
recomputed in seconds, without retraining, when one of those versions changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.schedule import ParamScheduler, SchedExp
from fastai.learner import Learner, Metric
from fastai.torch_core import set_seed

from cellulib.constants import MPP, N_BINS
from cellulib.data import breastpathq
from cellulib.data.annotations import is_brca_m2c
from cellulib.data.fingerprint import data_fingerprint, fingerprint
from cellulib.data.profiles import (
    DECODER_NAMES,
    SYNTHETIC_DETECTOR_EPOCHS,
    SYNTHETIC_DETECTOR_STAIN,
    brca_m2c_decoders,
    brca_m2c_profile,
    check_side,
    get_profile,
    seg_scale_size,
)
from cellulib.files.imageio import DataError, read_image
from cellulib.inference.modelfile import ModelFileError, load_model, save_model, weights_digest
from cellulib.models import losses, networks
from cellulib.training.cache import cache_path, recipe, recipe_mismatch

#: The recipe version of each model family: bumped whenever a change of the training code (the
#: data pipeline, augmentation, model construction, loss, optimiser, schedule or features of that
#: family) changes the weights it learns from the same settings and data, so that cached models of
#: the old recipe are not reused (SPEC 6). ``tests/test_recipes.py`` fails when a family's tiny
#: training run changes while its version stays; an edit that changes no number (a docstring, a
#: comment, a plot) needs no bump. ``sr`` and ``gbt`` also follow their segmentation network's key.
RECIPE_VERSIONS: dict[str, int] = {"seg": 2, "direct": 1, "sr": 1, "gbt": 1}


class CacheWarning(UserWarning):
    """A cached model file that was not reused (unreadable, or of another recipe): it is trained
    again."""


@dataclass
class TrainResult:
    """A trained (or cached) model with what the book reports about it."""

    model: torch.nn.Module
    history: pd.DataFrame  # one row per epoch: train_loss, valid_loss and the metrics
    scores: dict[str, float]  # validation scores of the final model
    path: Path  # the model file
    cached: bool  # True when loaded from the cache instead of trained
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # training time (of the original run when cached)
    meta: dict[str, Any] = field(default_factory=dict)  # everything stored with the model file


def _history(learn: Learner) -> pd.DataFrame:
    names = [n for n in learn.recorder.metric_names if n not in ("epoch", "time")]
    rows = [dict(zip(names, map(float, values))) for values in learn.recorder.values]
    frame = pd.DataFrame(rows)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    return frame


@contextlib.contextmanager
def _quiet(learn: Learner, progress: bool):
    if progress:
        yield
        return
    # fastai's `no_bar` would put back a plain ProgressCallback, not the Learner's own bar
    bars = [cb for cb in learn.cbs if getattr(cb, "name", None) == "progress"]
    learn.remove_cbs(bars)
    try:
        with learn.no_logging():
            yield
    finally:
        learn.add_cbs(bars)


def _distributed(learn: Learner):
    """fastai's data-parallel context when started by ``accelerate launch`` with several processes."""
    from fastai.torch_core import num_distrib

    if num_distrib() <= 1:
        return contextlib.nullcontext()
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{num_distrib()} processes were launched but there is no CUDA GPU: fastai's "
            "distributed context (Learner.distrib_ctx) needs one GPU per process (NCCL); run "
            "without accelerate launch on a CPU")
    import fastai.distributed  # noqa: F401  (adds Learner.distrib_ctx)

    return learn.distrib_ctx()


def fit(learn: Learner, epochs: int, lr: float, schedule: str = "one_cycle",
        lr_end: float | None = None, progress: bool = True) -> None:
    """Train ``learn`` for ``epochs`` with Adam under the ``schedule`` of a profile.

    ``"one_cycle"``: fastai's ``fit_one_cycle`` with peak learning rate ``lr`` (warm-up, then cosine
    annealing; converges in far fewer steps than a constant or decaying rate, Smith 2018).
    ``"decay"``: the rate decays exponentially from ``lr`` to ``lr_end`` (paper section 4.2:
    "gradually decreasing learning rate from 1e-4 to 1e-5"; the ``paper`` profile). Under
    ``accelerate launch`` with several processes (one per GPU) training runs in fastai's distributed
    data-parallel context. Used in chapters 2 and 3 through :func:`cellulib.training.train.train_seg` and by
    ``cellulib train``, and in chapter 4 through :func:`cellulib.training.train.train_direct`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    with _distributed(learn), _quiet(learn, progress):
        if schedule == "one_cycle":
            learn.fit_one_cycle(epochs, lr)
        else:
            learn.fit(epochs, lr, cbs=[ParamScheduler({"lr": SchedExp(lr, lr_end or lr / 10)})])


def fit_decay(learn: Learner, epochs: int, lr: float, lr_end: float, progress: bool = True) -> None:
    """Adam with the learning rate decaying exponentially from ``lr`` to ``lr_end`` (paper 4.2).

    Shorthand for ``fit(learn, epochs, lr, "decay", lr_end)``, for chapter 2's exercise.
    """
    fit(learn, epochs, lr, "decay", lr_end, progress)


#: Learning-rate schedules a profile can name (``seg_schedule``, ``direct_schedule``, ``sr_schedule``).
SCHEDULES = ("one_cycle", "decay")


def learner(dls, model: torch.nn.Module, loss_func, metrics=(), precision: str = "auto") -> Learner:
    """A fastai Learner with Adam that trains with mixed precision and channels-last.

    :func:`cellulib.models.engine.training_callbacks` picks bf16 autocast on CPUs with native bf16, AMP on
    CUDA, float32 elsewhere; :func:`cellulib.models.engine.asynchronous` keeps fastai from waiting
    for a GPU at every batch. Every model of the book is trained through this. Used in chapter 2
    through :func:`cellulib.training.train.train_seg`, and in chapter 3 through
    :func:`cellulib.training.train.train_sr`, and in chapter 4 through :func:`cellulib.training.train.train_direct`.
    """
    from cellulib.models import engine

    return engine.asynchronous(
        Learner(dls, model, loss_func=loss_func, opt_func=adam, metrics=list(metrics),
                cbs=engine.training_callbacks(dls.device, precision)))


def adam(params, lr: float, **kwargs: Any):
    """fastai's Adam, computed by PyTorch's fused AdamW kernel.

    The same update as ``fastai.optimizer.Adam`` with its defaults (betas 0.9/0.99, eps 1e-5,
    decoupled weight decay 0.01) and the same hyper-parameter names for fastai's schedulers
    (``fit_one_cycle`` moves ``lr`` and the first beta), but one fused kernel instead of a Python loop
    over the parameters (on this project's loaded 2-core CPU a step took 17-62 ms against 32-186 ms
    for fastai's Adam; ``cellulib.bench.suite`` reports the step time of ours beside the plain loop's).
    Used by every Learner of the book (:func:`learner`).
    """
    import functools

    from fastai.optimizer import OptimWrapper

    def adamw(groups, **options):
        try:
            return torch.optim.AdamW(groups, fused=True, **options)
        except (RuntimeError, TypeError):  # a torch without a fused kernel for this device
            return torch.optim.AdamW(groups, **options)

    return OptimWrapper(params, opt=functools.partial(adamw, betas=(0.9, 0.99), eps=1e-5,
                                                      weight_decay=0.01), lr=lr, **kwargs)


def seg_learner(dls, decoder: str = "fpn", pretrained=None, dropout: float = 0.5,
                alpha: float = 0.15, weights=(1, 1, 4, 1), precision: str = "auto") -> Learner:
    """A fastai Learner for weak nucleus segmentation: BCE - Jaccard loss, Adam, per-class Jaccard.

    Paper sections 3.1 and 4.2; SPEC 2. Used in chapter 2 through :func:`cellulib.training.train.train_seg`
    (weak segmentation).
    """
    model = networks.seg_model(decoder=decoder, pretrained=pretrained, dropout=dropout)
    return learner(dls, model, losses.BCEJaccardLoss(alpha=alpha, weights=weights),
                   losses.jaccard_metrics(), precision)


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    """A trained model as it is saved and reloaded: on the CPU, contiguous layout, eval mode.

    Training ran in channels-last layout; converting back makes the returned model compute exactly
    as the one :func:`cellulib.load_model` rebuilds from the file.
    """
    return model.cpu().to(memory_format=torch.contiguous_format).eval()


def _recipe(kind: str, params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The cache path and :func:`cellulib.training.cache.recipe` of a training run: ``params`` with the
    precision resolved to what training uses on this machine (``"auto"`` and
    ``$CELLULIB_PRECISION`` resolved by :func:`cellulib.models.engine.amp_dtype`), the device type and,
    under ``accelerate launch``, the number of processes."""
    from fastai.torch_core import default_device, num_distrib

    from cellulib.models import engine

    device = default_device()
    resolved = dict(params, device=device.type)
    if "precision" in params:
        resolved["precision"] = engine.precision_name(engine.amp_dtype(device, params["precision"]))
    if num_distrib() > 1:
        resolved["processes"] = num_distrib()
    version = RECIPE_VERSIONS[kind.split("-", 1)[0]]
    return cache_path(kind, resolved, version), recipe(kind, resolved, version)


def derived_versions() -> dict[str, int]:
    """The code versions that outputs derived from trained weights depend on:
    :data:`cellulib.inference.predict.INFERENCE_VERSION` and :data:`cellulib.data.stain.REFERENCE_VERSION`. Used
    by ``cellulib cache list`` and, through the cache, in chapters 2-5."""
    from cellulib.data.stain import REFERENCE_VERSION
    from cellulib.inference.predict import INFERENCE_VERSION

    return {"inference": INFERENCE_VERSION, "stain": REFERENCE_VERSION}


def _derived(model: torch.nn.Module) -> dict[str, Any]:
    """What a model file's derived outputs (validation predictions, stain reference) were computed
    from: the :func:`cellulib.inference.modelfile.weights_digest` of the weights and the inference and stain
    reference versions, with their ``key``; stored as ``meta["derived"]``."""
    parts = {"weights": weights_digest(model), **derived_versions()}
    return {"key": fingerprint(parts), **parts}


def _cached(path: Path, rec: dict[str, Any], settings: dict[str, Any],
            derive: Any, stale: Any = None) -> TrainResult | None:
    """The cached model at ``path`` when it holds the recipe ``rec``, else None (train it).

    A corrupt file or one recording another recipe is not reused: a :class:`CacheWarning` says why,
    and the caller trains again (and overwrites it). When the derived outputs were computed by
    another inference or stain reference version, or ``stale(meta)`` is true (a family's own
    derived entry, such as a segmentation model's chosen detection threshold, is missing or of
    another version), ``derive(model, meta)`` recomputes them (a dict of ``meta`` entries) from
    the stored weights and the file is rewritten; the weights are the file's own, so their digest
    in ``meta["derived"]`` stays valid until the file is rewritten.
    """
    if not path.exists():
        return None
    try:
        model, info = load_model(path)
    except ModelFileError as exc:
        warnings.warn(f"{exc}: training it again", CacheWarning, stacklevel=3)
        return None
    meta = info["meta"]
    recorded = meta.get("recipe")
    if not isinstance(recorded, dict) or recorded.get("key") != rec["key"]:
        why = "; ".join(recipe_mismatch(recorded, RECIPE_VERSIONS)) or (
            f"it records recipe key {recorded.get('key')}, not {rec['key']}")
        warnings.warn(f"{path}: not reused ({why}): training it again", CacheWarning, stacklevel=3)
        return None
    stored = meta.get("derived") or {}
    if {k: stored.get(k) for k in ("inference", "stain")} != derived_versions() \
            or (stale is not None and stale(meta)):
        meta = {**meta, **derive(model, meta)}
        model = _trained(model)
        meta["derived"] = _derived(model)
        save_model(model, path, **meta)
    return TrainResult(model, pd.DataFrame(meta["history"]), meta["scores"], path, True,
                       settings, meta.get("seconds", 0.0), meta)


def _pretrained_key(pretrained) -> str | None:
    """How the initial weights enter the recipe: ``"imagenet"`` (torch hub's files, named by their
    hash), or a local file's name and the sha256 of its bytes, so that another file of the same
    name makes another recipe (a missing file keeps its name: loading it gives the error)."""
    if pretrained is None:
        return None
    if str(pretrained) == "imagenet":
        return "imagenet"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        return f"file:{path.name}"
    with open(path, "rb") as fh:
        return f"file:{path.name}:{hashlib.file_digest(fh, 'sha256').hexdigest()[:12]}"


def train_seg(root: str | os.PathLike, decoder: str = "fpn", pretrained=None, profile: str = "quick",
              seed: int = 0, epochs: int | None = None, progress: bool = True, cache: bool = True,
              validation: str = "patients", mix: str | os.PathLike | None = None,
              train_missing: bool = True, **overrides: Any) -> TrainResult | None:
    """Train (or load from the cache) the weak segmentation network on the annotated patches.

    Paper section 4.2 and Table 1; SPEC 2. Settings come from ``profile`` (``seg_epochs``,
    ``seg_bs``, ``seg_lr`` -> ``seg_lr_end`` under ``seg_schedule``, ``crop``, ``downscale``,
    ``disc_diameter``, ``patches_per_epoch``, ``seg_weights``, ``stain_augment``, ``precision``),
    any of them overridable; on a
    BRCA-M2C copy the profile's `cellulib.data.profiles.BRCA_M2C_SEG` settings (pixel scale, disc size,
    schedule) replace the BreastPathQ ones. Validation (:func:`cellulib.data.breastpathq.cells_split`): a fixed
    20% of the annotated BreastPathQ patches; on BRCA-M2C whole held-out patients
    (``validation="patients"``, :func:`cellulib.data.breastpathq.patient_split`, the default) or the official
    validation split (``validation="official"``, which shares patients with training); centre crops.
    ``mix``: a second annotated folder whose training patches join the training set at the same
    scale (:func:`cellulib.data.breastpathq.seg_dataloaders`), e.g. the synthetic patches beside BRCA-M2C, so
    that one network learns real and synthetic nuclei; part of the key. ``scores`` holds the
    per-class Jaccard at 0.5 and their mean (``jaccard_nuclei``, Table 1). ``train_missing=False``
    trains nothing: the cached model, or None when the cache does not hold it (the real-H&E
    chapter shows the command line's longer recipe only when it was trained). Used in chapter 2,
    the real-H&E chapter and, through the cache, chapter 3.
    """
    overrides = {**overrides, "seg_epochs": epochs}
    brca = is_brca_m2c(root)
    settings = (brca_m2c_profile(profile, **overrides) if brca
                else get_profile(profile, **overrides))
    if validation not in breastpathq.VALIDATIONS:
        raise ValueError(f"validation must be one of {breastpathq.VALIDATIONS}, got {validation!r}")
    params = {
        "kind": "seg", "decoder": decoder, "pretrained": _pretrained_key(pretrained),
        "seed": int(seed), "data": data_fingerprint(root),
        **{k: settings[k] for k in ("seg_epochs", "seg_bs", "seg_lr", "seg_lr_end", "seg_schedule",
                                    "crop", "downscale", "disc_diameter", "patches_per_epoch",
                                    "precision", "stain_augment")},
        "seg_weights": [float(w) for w in settings["seg_weights"]],
        # the split is part of a BRCA-M2C recipe (the data fingerprint does not see it)
        **({"validation": validation} if brca else {}),
        **({"mix": data_fingerprint(mix)} if mix is not None else {}),
    }
    path, rec = _recipe("seg", params)
    params = rec["params"]

    def train_images() -> list[str]:
        paths = []
        for folder in (root,) if mix is None else (root, mix):
            cells = breastpathq.read_cells(folder)
            paths += cells["image_path"].iloc[breastpathq.cells_split(
                cells, seed=seed, root=folder, validation=validation)[0]].tolist()
        return paths

    def derive(model, meta: dict) -> dict[str, Any]:
        return {**_provenance(train_images()),
                "detection": _choose_threshold(model, meta, root, seed, validation)}

    if cache and (hit := _cached(path, rec, settings, derive, _threshold_stale)) is not None:
        return hit
    if not train_missing:
        return None
    set_seed(seed, reproducible=True)
    # the same patch-level split seg_dataloaders makes (its default valid_pct)
    n_train = len(train_images())
    dls = breastpathq.seg_dataloaders(
        root, size=settings["crop"], downscale=settings["downscale"], bs=settings["seg_bs"],
        diameter=settings["disc_diameter"], seed=seed,
        patches_per_epoch=settings["patches_per_epoch"] * n_train, stain=settings["stain_augment"],
        validation=validation, mix=mix,
    )
    learn = seg_learner(dls, decoder=decoder, pretrained=pretrained, weights=settings["seg_weights"],
                        precision=settings["precision"])
    start = time.perf_counter()
    fit(learn, settings["seg_epochs"], settings["seg_lr"], settings["seg_schedule"],
        settings["seg_lr_end"], progress)
    seconds = time.perf_counter() - start
    breastpathq.close_workers(dls)  # the DataLoader workers of a GPU end with the training
    history = _history(learn)
    scores = {k: float(v) for k, v in history.iloc[-1].items() if k.startswith(("jaccard", "valid"))}
    model = _trained(learn.model)
    meta = {"history": history.to_dict("list"), "scores": scores, "seconds": seconds,
            "params": params, "recipe": rec}
    meta = {**meta, **derive(model, meta)}
    model = _trained(model)  # choosing the threshold may have moved it (device, layout)
    meta["derived"] = _derived(model)
    save_model(model, path, **meta)
    return TrainResult(model, history, scores, path, False, settings, seconds, meta)


#: At most this many training images choose a segmentation model's detection threshold
#: (BRCA-M2C's patient-disjoint training split has 72; a synthetic set may have hundreds).
THRESHOLD_IMAGES = 96


def _choose_threshold(model: torch.nn.Module, meta: dict[str, Any], root, seed: int,
                      validation: str) -> dict[str, Any]:
    """A segmentation model's detection threshold, chosen on the training images of ``root``
    (not on a ``mix`` folder's, nor on any held-out image) by
    :func:`cellulib.inference.detect.choose_threshold`; stored as ``meta["detection"]``, which
    ``cellulib detect`` reads (issue 22). At most `THRESHOLD_IMAGES` images, evenly spaced."""
    from cellulib.inference.detect import choose_threshold

    cells = breastpathq.read_cells(root)
    rows = breastpathq.cells_split(cells, seed=seed, root=root, validation=validation)[0]
    if len(rows) > THRESHOLD_IMAGES:
        rows = rows[np.linspace(0, len(rows) - 1, THRESHOLD_IMAGES).round().astype(int)]
    precision = (meta.get("params") or {}).get("precision", "auto")
    pair = (model, {"family": "seg", "meta": meta})
    return choose_threshold(pair, cells.iloc[rows], precision=precision)


def _threshold_stale(meta: dict[str, Any]) -> bool:
    """Whether a cached segmentation model's chosen threshold is missing or was chosen by
    another :data:`cellulib.inference.detect.DETECTION_VERSION`."""
    from cellulib.inference.detect import DETECTION_VERSION

    return (meta.get("detection") or {}).get("version") != DETECTION_VERSION


def imagenet_status(arch: str = "resnet34", path=None) -> tuple[bool, str]:
    """Whether local ImageNet weights for ``arch`` are available, and a sentence saying so.

    Never downloads: looks at ``path`` or the torch hub cache (see
    :func:`cellulib.models.networks.load_imagenet_resnet`). Used in chapters 2 and 4 to decide whether the
    ImageNet rows of the paper's tables can be run.
    """
    try:
        networks.load_imagenet_resnet(arch, path)
    except (FileNotFoundError, ValueError) as exc:
        return False, str(exc)
    return True, f"ImageNet {arch} weights found" + (f" at {path}" if path else " in the cache")


# --------------------------------------------------------------------------------------------------
# Cellularity models: direct (paper 3.4), SR cascade (3.2) and GBT (3.3)
# --------------------------------------------------------------------------------------------------
class CellularityMSE(Metric):
    """fastai metric: MSE of the cellularity score over the whole validation set (paper Fig. 8).

    Works for every family: the model's ``to_cellularity`` turns regression outputs or the 101-bin
    logits into scores; classification targets (bin indices) are turned back into cellularity.
    Used in chapter 3 through :func:`cellulib.training.train.train_sr`, and in chapter 4 through
    :func:`cellulib.training.train.train_direct`.
    """

    def __init__(self) -> None:
        self.reset()

    @property
    def name(self) -> str:
        return "valid_mse"

    def reset(self) -> None:
        self.sq, self.n = 0.0, 0

    def accumulate(self, learn) -> None:
        with torch.no_grad():
            y_pred = learn.model.to_cellularity(learn.pred.float()).reshape(-1)
            y = learn.yb[0]
            y_true = (y.float() / 100.0 if y.dtype in (torch.int64, torch.int32) else y.float()).reshape(-1)
            # summed in float64 on the device, read once in `value`: a read per batch would wait
            # for a GPU (the same sums as Python floats, which are float64 too)
            self.sq = self.sq + ((y_pred - y_true) ** 2).sum().double()
            self.n += int(y_true.numel())

    @property
    def value(self) -> float | None:
        return float(self.sq) / self.n if self.n else None


def _valid_predictions(model: torch.nn.Module, root, input_size: int,
                       precision: str = "auto") -> pd.DataFrame:
    """Validation patches with truth and prediction, scored exactly as ``cellulib predict`` does.

    The stored predictions (and so the book's tables) are those a user gets from the model file.
    """
    from cellulib.inference.predict import Predictor, predict_images

    valid = _validation_patches(root)
    info = {"family": model.config["kind"], "config": model.config,
            "meta": {"preprocess": {"input_size": int(input_size), "normalize": "minus_one_one"}}}
    scored = predict_images(Predictor((model.eval(), info), precision=precision),
                            valid["path"].tolist(), progress=False)
    bad = scored[scored["error"] != ""]
    if len(bad):
        raise DataError(f"validation patch {bad.path.iloc[0]}: {bad.error.iloc[0]}")
    return pd.DataFrame({"path": valid["path"].to_numpy(), "y_true": valid["cellularity"].to_numpy(),
                         "y_pred": scored["cellularity"].to_numpy(dtype=float)})


def _scores(pred: pd.DataFrame) -> dict[str, float]:
    from cellulib.metrics.agreement import mse

    return {"valid_mse": mse(pred.y_true, pred.y_pred)}


def _validation_patches(root) -> pd.DataFrame:
    """The validation split in the order ``cellulib predict`` lists a folder (sorted by path).

    Stored predictions in that order make ``cellulib evaluate`` on a ``cellulib predict`` of the
    validation folder resample the same patches, hence give the book's numbers, CIs included.
    """
    df = breastpathq.read_breastpathq(root)
    valid = df[df["split"] == "validation"]
    return valid.iloc[sorted(range(len(valid)), key=lambda i: Path(valid["path"].iloc[i]))
                      ].reset_index(drop=True)


def _train_paths(root) -> list[str]:
    df = breastpathq.read_breastpathq(root)
    return df.loc[df["split"] == "train", "path"].tolist()


def _provenance(train_images: list[str]) -> dict[str, Any]:
    """What a model file records about its training images, for users of other scans: their
    stain (``meta["stain"]``, Macenko and Reinhard references fitted on a mosaic of them, so that
    ``--stain-norm`` needs no target) and pixel size (``meta["pixel_size"]``: ``mpp``, the
    `cellulib.MPP` of the datasets, and ``patch_px``, the median side of a training image;
    ``cellulib slide`` cuts tiles of ``patch_px * mpp`` micrometres)."""
    from cellulib.data.stain import training_reference

    sides = [min(read_image(p).shape[:2]) for p in train_images[:16]]
    return {"stain": training_reference(train_images),
            "pixel_size": {"mpp": MPP, "patch_px": int(np.median(sides))}}


def _train_labels(root) -> np.ndarray:
    df = breastpathq.read_breastpathq(root)
    return df.loc[df["split"] == "train", "cellularity"].to_numpy(dtype=float)


def _derive_cellularity(root, input_size: int, settings: dict, pred: pd.DataFrame | None = None):
    """``derive(model, meta)`` for :func:`_cached` and :func:`_finish` of a cellularity model: its
    validation predictions (``pred`` when given; scored by :func:`_valid_predictions` otherwise),
    their scores and the stain reference and pixel size of its training images."""
    def derive(model, meta: dict) -> dict[str, Any]:
        scored = pred if pred is not None else _valid_predictions(model, root, input_size,
                                                                  settings["precision"])
        return {"scores": _scores(scored), "predictions": scored.to_dict("list"),
                **_provenance(_train_paths(root))}
    return derive


def _derive_gbt(root):
    """``derive(model, meta)`` of a cached GBT model: its booster's validation predictions on the
    stored validation features (``meta["features_valid"]``), their scores and the training stain."""
    from cellulib.models import features

    def derive(model, meta: dict) -> dict[str, Any]:
        valid = _validation_patches(root)
        table = pd.DataFrame(meta["features_valid"])
        scored = pd.DataFrame({"path": valid["path"].to_numpy(),
                               "y_true": valid["cellularity"].to_numpy(),
                               "y_pred": features.predict_gbt(model.booster, table)})
        return {"scores": _scores(scored), "predictions": scored.to_dict("list"),
                **_provenance(_train_paths(root))}
    return derive


def _finish(model, path: Path, rec: dict, history: pd.DataFrame, root, seconds: float,
            settings: dict, input_size: int, pred: pd.DataFrame | None = None,
            **extra: Any) -> TrainResult:
    derived = _derive_cellularity(root, input_size, settings, pred)(model, {})
    model = _trained(model)  # after scoring: the predictor moved it to its device and layout
    meta = {"history": history.to_dict("list"), "seconds": seconds, "params": rec["params"],
            "recipe": rec, "train_mean": float(_train_labels(root).mean()),
            "preprocess": {"input_size": int(input_size), "normalize": "minus_one_one"},
            **derived, **extra, "derived": _derived(model)}
    save_model(model, path, **meta)
    return TrainResult(model, history, meta["scores"], path, False, settings, seconds, meta)


def predictions(result: TrainResult) -> pd.DataFrame:
    """The validation predictions stored with a trained cellularity model (path, y_true, y_pred).

    Chapters 3-5 compute Tables 2 and 3 from them with :func:`cellulib.metrics.agreement.evaluate`.
    """
    return pd.DataFrame(result.meta["predictions"])


def train_direct(root: str | os.PathLike, arch: str = "resnet34", task: str = "regression",
                 pretrained=None, profile: str = "quick", seed: int = 0, epochs: int | None = None,
                 size: int | None = None, progress: bool = True, cache: bool = True,
                 **overrides: Any) -> TrainResult:
    """Train (or load from the cache) a model that reads cellularity straight from the patch.

    Paper sections 3.4 and 4.4; SPEC 4: ResNet34/ResNet50/Xception, regression (MSE on a sigmoid
    output) or 101-bin classification (cross-entropy on the rounded label, decoded by the expectation
    over the bins; ``cls_sigma`` > 0 spreads the target over neighbouring bins, see
    :class:`cellulib.models.losses.SoftBinCrossEntropy`). The whole patch is resized to ``direct_size`` (default: the segmentation
    scale, the SR cascade's input size, so the two routes see the same pixels); the output starts
    at the training mean or the label prior (:func:`cellulib.models.networks.init_output`); Adam under
    ``direct_schedule`` with peak rate ``direct_lr``, mixed precision and channels-last
    (:func:`learner`); validation MSE recorded every epoch (Fig. 8). Used in chapter 4.
    """
    from fastai.losses import MSELossFlat

    settings = get_profile(profile, direct_epochs=epochs, direct_size=size, **overrides)
    input_size = cellularity_input_size(root, settings)
    params = {"kind": "direct", "arch": arch, "task": task, "pretrained": _pretrained_key(pretrained),
              "seed": int(seed), "data": data_fingerprint(root), "input_size": input_size,
              **{k: settings[k] for k in ("direct_epochs", "direct_bs", "direct_lr",
                                          "direct_schedule", "precision", "stain_augment")}}
    if task == "classification":
        params["cls_sigma"] = settings["cls_sigma"]
    path, rec = _recipe(f"direct-{arch}-{task}", params)
    derive = _derive_cellularity(root, input_size, settings)
    if cache and (hit := _cached(path, rec, settings, derive)) is not None:
        return hit
    set_seed(seed, reproducible=True)
    dls = breastpathq.cellularity_dataloaders(root, size=input_size, bs=settings["direct_bs"],
                                       seed=seed, task=task, stain=settings["stain_augment"])
    model = networks.init_output(networks.direct_model(arch, task=task, pretrained=pretrained),
                               _train_labels(root))
    loss = (MSELossFlat() if task == "regression"
            else losses.SoftBinCrossEntropy(settings["cls_sigma"], N_BINS))
    learn = learner(dls, model, loss, [CellularityMSE()], settings["precision"])
    start = time.perf_counter()
    fit(learn, settings["direct_epochs"], settings["direct_lr"], settings["direct_schedule"],
        settings["direct_lr"] / 10, progress)
    seconds = time.perf_counter() - start
    breastpathq.close_workers(dls)
    return _finish(learn.model, path, rec, _history(learn), root, seconds, settings, input_size)


def _seg_input_size(root, settings: dict, seg: TrainResult | None = None) -> int:
    """The patch side at the segmentation network's scale, a multiple of 32: the downscale that
    ``seg`` recorded (x1 for a network trained on BRCA-M2C), else the profile's (x2)."""
    first = breastpathq.read_breastpathq(root)["path"].iloc[0]
    recorded = ((seg.meta or {}).get("params") or {}).get("downscale") if seg is not None else None
    return seg_scale_size(read_image(first).shape[0], recorded or settings["downscale"])


def cellularity_input_size(root, settings: dict) -> int:
    """The side the direct models resize a patch to: ``direct_size``, or by default the
    segmentation scale (the patch side / ``downscale``, a multiple of 32), which SR and GBT use.

    The paper gives the direct models and the SR cascade the same input; the quick profile gives
    the direct models a smaller one (``direct_size``) to fit the CPU budget. Used in chapter 4.
    """
    return int(settings.get("direct_size") or _seg_input_size(root, settings))


def train_sr(root: str | os.PathLike, seg: TrainResult, pretrained=None, profile: str = "quick",
             seed: int = 0, progress: bool = True, cache: bool = True, input_size: int | None = None,
             **overrides: Any) -> TrainResult:
    """Train the segmentation -> regression cascade (SR) in the paper's two stages.

    Paper sections 3.2 and 4.3; SPEC 3.1. Stage 1: the trained segmentation network ``seg`` is
    frozen and a ResNet-34 with a 4-channel stem, its output starting at the training mean, learns
    cellularity from its probability maps (MSE, ``sr_epochs`` under ``sr_schedule`` with peak rate
    ``sr_lr``); stage 2: everything is fine-tuned end to end at a tenth of the rate
    (``sr_finetune_epochs``). ImageNet init (``pretrained``) drops the background channel to fit
    the 3-channel stem. The patch is resized to ``input_size`` (default: the segmentation
    network's scale, the patch side / ``downscale``, as for GBT and in the paper, so the frozen
    network sees nuclei at the size it was trained on; on the synthetic seed-0 set this gave
    validation ICC 0.97 at 128 px where 96 px gave 0.86-0.92 depending on the run). Used in
    chapter 3.
    """
    import copy

    from fastai.losses import MSELossFlat

    settings = get_profile(profile, **overrides)
    input_size = _seg_input_size(root, settings, seg) if input_size is None else input_size
    check_side("input_size", input_size)
    params = {"kind": "sr", "seg": seg.path.name, "pretrained": _pretrained_key(pretrained),
              "seed": int(seed), "data": data_fingerprint(root), "input_size": input_size,
              **{k: settings[k] for k in ("sr_epochs", "sr_finetune_epochs", "sr_lr", "sr_schedule",
                                          "direct_bs", "precision", "stain_augment")}}
    path, rec = _recipe("sr", params)
    derive = _derive_cellularity(root, input_size, settings)
    if cache and (hit := _cached(path, rec, settings, derive)) is not None:
        return hit
    set_seed(seed, reproducible=True)
    dls = breastpathq.cellularity_dataloaders(root, size=input_size, bs=settings["direct_bs"], seed=seed,
                                       stain=settings["stain_augment"])
    model = networks.sr_model(copy.deepcopy(seg.model), pretrained=pretrained, freeze_seg=True)
    networks.init_output(model, _train_labels(root))
    learn = learner(dls, model, MSELossFlat(), [CellularityMSE()], settings["precision"])
    lr, schedule = settings["sr_lr"], settings["sr_schedule"]
    start = time.perf_counter()
    fit(learn, settings["sr_epochs"], lr, schedule, lr / 10, progress)
    stage1 = _history(learn).assign(stage="frozen segmentation")
    if settings["sr_finetune_epochs"]:
        model.unfreeze_seg()
        learn.create_opt()  # the optimiser must see the unfrozen segmentation parameters
        fit(learn, settings["sr_finetune_epochs"], lr / 10, schedule, lr / 100, progress)
        stage2 = _history(learn).assign(stage="end to end")
        stage2["epoch"] += len(stage1)
        stage1 = pd.concat([stage1, stage2], ignore_index=True)
    seconds = time.perf_counter() - start
    breastpathq.close_workers(dls)
    model.freeze_seg()
    return _finish(model, path, rec, stage1, root, seconds, settings, input_size)


def segment_patches(seg_model: torch.nn.Module, paths, input_size: int,
                    progress: bool = True) -> list:
    """Probability maps of the segmentation network for patches resized to ``input_size``.

    Used by the GBT route (chapter 3) to extract the 81 features of every patch.
    """
    import cv2
    from tqdm import tqdm

    maps = []
    for p in tqdm(list(paths), desc="segment", unit="patch", disable=not progress):
        img = cv2.resize(read_image(p), (input_size, input_size), interpolation=cv2.INTER_AREA)
        maps.append(networks.segment(seg_model, img))
    return maps


def train_gbt(root: str | os.PathLike, seg: TrainResult, profile: str = "quick", seed: int = 0,
              progress: bool = True, cache: bool = True, input_size: int | None = None,
              **overrides: Any) -> TrainResult:
    """Fit LightGBM on the 81 features of the segmentation maps (the GBT route).

    Paper sections 3.3 and 4.3; SPEC 3.2: L2 regression, 600 rounds, learning rate 0.01, max depth
    5, 8 leaves. The fewest patches per leaf (``gbt_min_leaf``) is chosen by 5-fold cross-validation
    on the training patches (:func:`cellulib.models.features.select_min_leaf`) unless the setting
    fixes it. ``scores`` has the validation MSE; the model file holds the feature tables, the gain
    importance (Fig. 9), the chosen ``gbt_min_leaf`` and the CV errors (``gbt_cv_mse``). Used in
    chapter 3.
    """
    from cellulib.models import features

    settings = get_profile(profile, **overrides)
    input_size = _seg_input_size(root, settings, seg) if input_size is None else input_size
    check_side("input_size", input_size)
    min_leaf = settings["gbt_min_leaf"]
    params = {"kind": "gbt", "seg": seg.path.name, "seed": int(seed), "data": data_fingerprint(root),
              "input_size": input_size, "rounds": settings["gbt_rounds"],
              "min_leaf": (f"cv{features.GBT_CV_FOLDS}:" + ",".join(map(str, features.GBT_MIN_LEAF_GRID))
                           if min_leaf == "cv" else int(min_leaf))}
    path, rec = _recipe("gbt", params)
    if cache and (hit := _cached(path, rec, settings, _derive_gbt(root))) is not None:
        return hit
    df = breastpathq.read_breastpathq(root)
    start = time.perf_counter()
    parts = {"train": df[df["split"] == "train"], "validation": _validation_patches(root)}
    tables = {}
    for split, part in parts.items():
        maps = segment_patches(seg.model, part["path"], input_size, progress)
        tables[split] = features.features_frame(maps, index=part["path"].tolist(), progress=progress)
    y_train = parts["train"]["cellularity"].to_numpy()
    cv_mse: dict[int, float] = {}
    if min_leaf == "cv" and len(y_train) < features.GBT_CV_FOLDS:  # too few patches for the folds
        min_leaf = features.GBT_MIN_LEAF_GRID[0]
    elif min_leaf == "cv":  # the leaf minimum of lowest 5-fold CV error on the training patches
        min_leaf, cv_mse = features.select_min_leaf(tables["train"], y_train, seed=seed,
                                                    n_rounds=settings["gbt_rounds"])
    booster = features.fit_gbt(tables["train"], y_train, seed=seed, n_rounds=settings["gbt_rounds"],
                               min_data_in_leaf=int(min_leaf))
    pred = pd.DataFrame({"path": parts["validation"]["path"].to_numpy(),
                         "y_true": parts["validation"]["cellularity"].to_numpy(),
                         "y_pred": features.predict_gbt(booster, tables["validation"])})
    seconds = time.perf_counter() - start
    importance = features.gbt_importance(booster)
    model = networks.GBTModel(seg.model, booster)
    history = pd.DataFrame({"epoch": [1], "train_loss": [float("nan")], "valid_loss": [float("nan")]})
    return _finish(model, path, rec, history, root, seconds, settings, input_size, pred=pred,
                   importance=importance.to_dict(), gbt_min_leaf=int(min_leaf),
                   gbt_cv_mse={str(k): v for k, v in cv_mse.items()}, features_train=tables["train"].to_dict("list"),
                   features_valid=tables["validation"].to_dict("list"))


#: The direct models of the book (chapter 4): name -> (architecture, task).
DIRECT_MODELS: dict[str, tuple[str, str]] = {
    "ResNet34 (R)": ("resnet34", "regression"), "ResNet50 (R)": ("resnet50", "regression"),
    "Xception (R)": ("xception", "regression"), "Xception (C)": ("xception", "classification")}
#: The two routes of the paper and the book's models on each.
ROUTES: dict[str, tuple[str, ...]] = {"segmentation": ("GBT", "ResNet34 (SR)"),
                                      "direct": tuple(DIRECT_MODELS)}


def book_models(root: str | os.PathLike, profile: str = "quick", seed: int = 0, *,
                seg_epochs: int | None = None, crop: int | None = None,
                patches_per_epoch: int | None = None, sr_epochs: int | None = None,
                sr_finetune_epochs: int | None = None, gbt_rounds: int | None = None,
                epochs: int | None = None, input_size: int | None = None,
                progress: bool = False) -> tuple[TrainResult, dict[str, TrainResult]]:
    """The FPN segmentation network and the book's six cellularity models (chapters 2-4), from the
    cache or trained, with the chapters' settings: ``(seg, {name: result})`` in the order of
    :data:`ROUTES`. ``None`` keeps a profile's setting. Used in the real-tissue chapter."""
    seg = train_seg(root, decoder="fpn", profile=profile, seed=seed, epochs=seg_epochs,
                    progress=progress, **{k: v for k, v in {"crop": crop,
                                                             "patches_per_epoch": patches_per_epoch}.items()
                                           if v is not None})
    sr_args = {k: v for k, v in {"sr_epochs": sr_epochs,
                                 "sr_finetune_epochs": sr_finetune_epochs}.items() if v}
    gbt_args = {"gbt_rounds": gbt_rounds} if gbt_rounds else {}
    results = {"GBT": train_gbt(root, seg, profile=profile, seed=seed, progress=progress, **gbt_args),
               "ResNet34 (SR)": train_sr(root, seg, profile=profile, seed=seed, progress=progress,
                                         **sr_args)}
    for name, (arch, task) in DIRECT_MODELS.items():
        results[name] = train_direct(root, arch, task, profile=profile, seed=seed, epochs=epochs,
                                     size=input_size, progress=progress)
    return seg, results


def real_networks(root: str | os.PathLike, profile: str = "quick", seed: int = 0,
                  compare_decoders: bool | None = None, progress: bool = True,
                  **overrides: Any) -> dict[str, TrainResult]:
    """The segmentation networks the real-H&E chapter trains on the BRCA-M2C copy ``root``, from
    the cache or trained (:func:`train_seg`, ``overrides`` such as ``epochs``, ``crop`` and
    ``patches_per_epoch``; None keeps the profile's): ``{"FPN": result}``, with ``"U-Net"`` too
    when ``compare_decoders`` is true (None: the profile's,
    :data:`cellulib.data.profiles.BRCA_M2C_COMPARE_DECODERS`: the quick profile trains the FPN
    only). Used in the real-H&E and stain-shift chapters, which choose between them the same way."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return {DECODER_NAMES[dec]: train_seg(root, decoder=dec, profile=profile, seed=seed,
                                          progress=progress, **given)
            for dec in brca_m2c_decoders(profile, compare_decoders)}


def synthetic_detector(root: str | os.PathLike, profile: str = "quick", seed: int = 0,
                       epochs: int | None = None, crop: int | None = None,
                       patches_per_epoch: int | None = None, progress: bool = True,
                       stain_augment: str | None = None) -> TrainResult:
    """A nucleus detector that learns from synthetic patches only (``root``), at real tissue's
    pixel scale: the FPN with the profile's BRCA-M2C settings
    (:func:`cellulib.data.profiles.brca_m2c_profile`: no downscale and 11 px discs in the quick
    profile, its crop, schedule and rate), where chapter 2's network keeps the paper's x2
    downscale, whose discs merge neighbouring nuclei; and with stain jitter (``stain_augment``,
    None: :data:`cellulib.data.profiles.SYNTHETIC_DETECTOR_STAIN`, HED), which narrowed the spread
    of its F on real nuclei over seeds and precisions, above the floor (MEASUREMENTS.md). ``epochs``
    (None: :data:`cellulib.data.profiles.SYNTHETIC_DETECTOR_EPOCHS`, 24 in the quick profile, or
    where a profile has none there, its BRCA-M2C epochs). Issue 23 measures it on real BRCA-M2C
    nuclei (the real-H&E chapter, through
    :func:`cellulib.reporting.realtissue.synthetic_detector_section`)."""
    if epochs is None:
        epochs = SYNTHETIC_DETECTOR_EPOCHS.get(profile)
    s = brca_m2c_profile(profile, seg_epochs=epochs, crop=crop, patches_per_epoch=patches_per_epoch)
    stain = SYNTHETIC_DETECTOR_STAIN if stain_augment is None else stain_augment
    return train_seg(root, decoder="fpn", profile=profile, seed=seed, epochs=s["seg_epochs"],
                     progress=progress, stain_augment=stain,
                     **{k: s[k] for k in ("crop", "patches_per_epoch", "downscale",
                                          "disc_diameter", "seg_lr", "seg_schedule")})


def real_tissue_levers(root: str | os.PathLike, real_seg: TrainResult, profile: str = "quick",
                       seed: int = 0, augment: str = "hed", sr: bool = False, *,
                       seg_epochs: int | None = None,
                       crop: int | None = None, patches_per_epoch: int | None = None,
                       sr_epochs: int | None = None, sr_finetune_epochs: int | None = None,
                       gbt_rounds: int | None = None, epochs: int | None = None,
                       input_size: int | None = None, calibrated: str | os.PathLike | None = None,
                       mixed: str | os.PathLike | None = None,
                       progress: bool = False) -> dict[str, tuple[str, TrainResult]]:
    """The levers the real-tissue chapter measures, each as ``{name: (model it changes, result)}``:

    - GBT (and with ``sr``, SR) trained on the synthetic patches from the maps of ``real_seg``, a
      segmentation network that learned real nuclei (BRCA-M2C), instead of the synthetic-trained
      FPN. SR is off by default: its cascade runs that network at full resolution (no x2
      downscale) in every training step: 895 s on one loaded thread of a 2-core machine (more
      than 33 minutes beside a book build), for no PK gain over SR at seed 0 (MEASUREMENTS.md);
    - with ``augment`` (``"hed"``; ``"none"`` leaves them out) the stain-shift chapter's models
      trained with stain jitter: GBT on a jittered FPN, and ResNet34 (R);
    - with ``calibrated`` (a synthetic set rendered by the generator calibrated to real tissue,
      ``get_dataset(..., generator="calibrated")``) GBT, on an FPN trained on that set, and
      ResNet34 (R), both trained on it as chapters 2-4 train on the default set; and the two
      levers together: GBT learning on that set from the maps of ``real_seg``;
    - with ``mixed`` (the BRCA-M2C folder ``real_seg`` learned) GBT on an FPN that learned that
      folder's nuclei and the synthetic patches of ``root`` together (:func:`train_seg` with
      ``mix=root``, ``real_seg``'s epochs, crop and patches per epoch). Off by default: it trains
      a second real-nuclei network, about 1.5 times as long as ``real_seg``, and its PK gain over
      GBT on ``real_seg`` was undecided at seeds 0 and 1 (MEASUREMENTS.md).

    All come from the cache when the chapters that train them have run. Used in the real-tissue
    chapter."""
    sr_args = {k: v for k, v in {"sr_epochs": sr_epochs,
                                 "sr_finetune_epochs": sr_finetune_epochs}.items() if v}
    gbt_args = {"gbt_rounds": gbt_rounds} if gbt_rounds else {}
    levers = {"GBT on the real FPN": ("GBT", train_gbt(root, real_seg, profile=profile, seed=seed,
                                                       progress=progress, **gbt_args))}
    if sr:
        levers["ResNet34 (SR) on the real FPN"] = ("ResNet34 (SR)", train_sr(
            root, real_seg, profile=profile, seed=seed, progress=progress, **sr_args))
    if augment != "none":
        seg_aug = train_seg(root, decoder="fpn", profile=profile, seed=seed, epochs=seg_epochs,
                            crop=crop, patches_per_epoch=patches_per_epoch, stain_augment=augment,
                            progress=progress)
        label = augment.upper()
        levers[f"GBT, {label} jitter"] = ("GBT", train_gbt(root, seg_aug, profile=profile, seed=seed,
                                                           progress=progress, **gbt_args))
        levers[f"ResNet34 (R), {label} jitter"] = ("ResNet34 (R)", train_direct(
            root, "resnet34", "regression", profile=profile, seed=seed, epochs=epochs,
            size=input_size, stain_augment=augment, progress=progress))
    if calibrated is not None:
        seg_cal = train_seg(calibrated, decoder="fpn", profile=profile, seed=seed, epochs=seg_epochs,
                            crop=crop, patches_per_epoch=patches_per_epoch, progress=progress)
        levers["GBT, calibrated generator"] = ("GBT", train_gbt(
            calibrated, seg_cal, profile=profile, seed=seed, progress=progress, **gbt_args))
        levers["ResNet34 (R), calibrated generator"] = ("ResNet34 (R)", train_direct(
            calibrated, "resnet34", "regression", profile=profile, seed=seed, epochs=epochs,
            size=input_size, progress=progress))
        levers["GBT on the real FPN, calibrated generator"] = ("GBT", train_gbt(
            calibrated, real_seg, profile=profile, seed=seed, progress=progress, **gbt_args))
    if mixed is not None:
        recipe = {k: real_seg.settings[k] for k in ("crop", "patches_per_epoch")}
        seg_mixed = train_seg(mixed, decoder="fpn", profile=profile, seed=seed, mix=root,
                              epochs=real_seg.settings["seg_epochs"], progress=progress, **recipe)
        levers["GBT on the mixed FPN"] = ("GBT", train_gbt(root, seg_mixed, profile=profile,
                                                           seed=seed, progress=progress, **gbt_args))
    return levers
