"""Training with fastai: Learners for every model family and cached training runs.

Each ``train_*`` function trains one model for a profile (SPEC 6), saves it as one model file with
its history and validation scores (:func:`cellulib.save_model`), and caches it by the hash of its
inputs (the data, the settings, the seed), so a later chapter reuses an earlier chapter's model and
re-running a chapter gives the same table.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from fastai.callback.schedule import ParamScheduler, SchedExp
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed

from cellulib import data, losses, models
from cellulib.profiles import get_profile
from cellulib.store import cache_path, data_fingerprint, load_model, save_model


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
    else:
        with learn.no_bar(), learn.no_logging():
            yield


def fit_decay(learn: Learner, epochs: int, lr: float, lr_end: float, progress: bool = True) -> None:
    """Train with Adam, the learning rate decaying exponentially from ``lr`` to ``lr_end``.

    Paper section 4.2: "gradually decreasing learning rate from 1e-4 to 1e-5". Used in chapters 2-4.
    """
    sched = ParamScheduler({"lr": SchedExp(lr, lr_end)})
    with _quiet(learn, progress):
        learn.fit(epochs, lr, cbs=[sched])


def seg_learner(dls, decoder: str = "fpn", pretrained=None, dropout: float = 0.5,
                alpha: float = 0.15, weights=(1, 1, 4, 1)) -> Learner:
    """A fastai Learner for weak nucleus segmentation: BCE - Jaccard loss, Adam, per-class Jaccard.

    Paper sections 3.1 and 4.2; SPEC 2. Used in chapter 2 (weak segmentation).
    """
    model = models.seg_model(decoder=decoder, pretrained=pretrained, dropout=dropout)
    return Learner(
        dls, model, loss_func=losses.BCEJaccardLoss(alpha=alpha, weights=weights),
        opt_func=Adam, metrics=losses.jaccard_metrics(),
    )


def _cached(path: Path, settings: dict[str, Any]) -> TrainResult | None:
    if not path.exists():
        return None
    model, info = load_model(path)
    meta = info["meta"]
    return TrainResult(model, pd.DataFrame(meta["history"]), meta["scores"], path, True,
                       settings, meta.get("seconds", 0.0))


def _pretrained_key(pretrained) -> str | None:
    if pretrained is None:
        return None
    return str(pretrained) if str(pretrained) == "imagenet" else f"file:{Path(pretrained).name}"


def train_seg(root: str | os.PathLike, decoder: str = "fpn", pretrained=None, profile: str = "quick",
              seed: int = 0, epochs: int | None = None, progress: bool = True, cache: bool = True,
              **overrides: Any) -> TrainResult:
    """Train (or load from the cache) the weak segmentation network on the annotated patches.

    Paper section 4.2 and Table 1; SPEC 2. Settings come from ``profile`` (``seg_epochs``,
    ``seg_bs``, ``seg_lr`` -> ``seg_lr_end``, ``crop``, ``downscale``, ``disc_diameter``,
    ``patches_per_epoch``), any of them overridable. Validation: a fixed 20% of the annotated
    patches, centre crops. ``scores`` holds the per-class Jaccard at 0.5 and their mean
    (``jaccard_nuclei``, Table 1). Used in chapter 2 and, through the cache, chapter 3.
    """
    settings = get_profile(profile, seg_epochs=epochs, **overrides)
    params = {
        "kind": "seg", "decoder": decoder, "pretrained": _pretrained_key(pretrained),
        "seed": int(seed), "data": data_fingerprint(root),
        **{k: settings[k] for k in ("seg_epochs", "seg_bs", "seg_lr", "seg_lr_end", "crop",
                                    "downscale", "disc_diameter", "patches_per_epoch")},
    }
    path = cache_path("seg", params)
    if cache and (hit := _cached(path, settings)) is not None:
        return hit
    set_seed(seed, reproducible=True)
    n_cells = len(data.read_cells(root))
    dls = data.seg_dataloaders(
        root, size=settings["crop"], downscale=settings["downscale"], bs=settings["seg_bs"],
        diameter=settings["disc_diameter"], seed=seed,
        patches_per_epoch=settings["patches_per_epoch"] * max(1, round(n_cells * 0.8)),
    )
    learn = seg_learner(dls, decoder=decoder, pretrained=pretrained)
    start = time.perf_counter()
    fit_decay(learn, settings["seg_epochs"], settings["seg_lr"], settings["seg_lr_end"], progress)
    seconds = time.perf_counter() - start
    history = _history(learn)
    scores = {k: float(v) for k, v in history.iloc[-1].items() if k.startswith(("jaccard", "valid"))}
    model = learn.model.cpu().eval()
    save_model(model, path, history=history.to_dict("list"), scores=scores, seconds=seconds,
               params=params)
    return TrainResult(model, history, scores, path, False, settings, seconds)


def imagenet_status(arch: str = "resnet34", path=None) -> tuple[bool, str]:
    """Whether local ImageNet weights for ``arch`` are available, and a sentence saying so.

    Never downloads: looks at ``path`` or the torch hub cache (see
    :func:`cellulib.models.load_imagenet_resnet`). Used in chapters 2-4 to decide whether the
    ImageNet rows of the paper's tables can be run.
    """
    try:
        models.load_imagenet_resnet(arch, path)
    except (FileNotFoundError, ValueError) as exc:
        return False, str(exc)
    return True, f"ImageNet {arch} weights found" + (f" at {path}" if path else " in the cache")


def table1(results: dict[tuple[str, str], TrainResult | None]) -> pd.DataFrame:
    """Paper Table 1 with ours beside it: mean nuclear Jaccard, {random, ImageNet} x {U-Net, FPN}.

    ``results`` maps ``(init, decoder)`` (init in ``random``/``imagenet``, decoder in
    ``unet``/``fpn``) to a training result, or to None for a run that was not made (shown as
    "not run", never as a number). Used in chapters 2 and 5.
    """
    from cellulib.metrics import PAPER

    paper = PAPER[PAPER.table == "Table 1"].set_index(["init", "model"])["value"]
    names = {"unet": "U-Net decoder", "fpn": "FPN decoder"}
    rows = []
    for init, label in (("random", "Random"), ("imagenet", "ImageNet")):
        row = {"initialisation": label}
        for dec in ("unet", "fpn"):
            res = results.get((init, dec))
            short = "U-Net" if dec == "unet" else "FPN"
            row[f"{short} (paper)"] = f"{paper[(init, names[dec])]:.2f}"
            row[f"{short} (ours)"] = "not run" if res is None else f"{res.scores['jaccard_nuclei']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("initialisation")
