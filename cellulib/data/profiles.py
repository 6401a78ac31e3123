"""Profiles (``quick`` and ``paper``), where generated data and models live, and the dataset a chapter uses.

SPEC section 6: every chapter and command takes ``profile``; ``quick`` (the default) is sized so the
whole book executes on a 2-core CPU in minutes, ``paper`` holds the paper's hyperparameters and is meant
for the real BreastPathQ data on a GPU. Any value can be overridden (papermill parameters, CLI flags).
Used in every chapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cellulib.constants import DISC_DIAMETER, SEG_DOWNSCALE, STRIDE

#: Settings per profile. Comments give the paper's value where the quick profile departs from it.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        # synthetic data (SPEC 1.2): small patches at the paper's magnification
        "n_train": 160,
        "n_val": 60,
        "n_cells": 48,
        "size": 256,  # paper: 512
        # arithmetic (cellulib.models.engine): bf16 autocast on CPUs with native bf16, AMP on CUDA
        "precision": "auto",
        # weak segmentation (SPEC 2)
        "downscale": SEG_DOWNSCALE,
        "crop": 128,  # paper: 256
        "disc_diameter": DISC_DIAMETER,
        "seg_epochs": 8,  # paper: 150
        "seg_bs": 8,
        "seg_lr": 1e-3,  # paper: 1e-4 decaying to 1e-5 (a short CPU run needs a larger step)
        "seg_lr_end": 1e-4,
        "seg_schedule": "decay",  # the paper's exponential decay
        # class weights of the segmentation loss, channel order normal, lymphocyte, malignant,
        # background (paper 3.1: malignant counts 4 times)
        "seg_weights": (1.0, 1.0, 4.0, 1.0),
        "patches_per_epoch": 3,
        # cellularity models (SPEC 3, 4). The direct models see the patch resized to 96 px
        # (ResNet-34 (R) reaches validation ICC 0.97 at 96 px, 0.78 at 64 px, both after 30
        # one-cycle epochs; 128 px would cost 1.8x the time). SR and GBT read the segmentation
        # network's maps at its own scale (128 px here), as in the paper: SR at 96 px gave ICC
        # 0.86-0.92, at 128 px 0.97 (seed 0).
        "direct_size": 96,  # paper: 512 patches at the segmentation scale (256 px)
        "direct_epochs": 30,  # paper: not stated; until the validation MSE stops improving
        "direct_bs": 16,
        # Peak one-cycle rate, chosen by measurement on the seed-0 set, 96 px, batch 16, bf16:
        # fastai lr_find (80 steps from 1e-6) puts the valley at 1.5e-3 for ResNet34 (R) and 7.5e-4
        # for Xception (C). 3e-3 (a few times above the valley) gave validation ICC 0.975 without
        # stain jitter, but with HED jitter ResNet34 (R) stopped learning at seed 0 (ICC 0.10, on an
        # AMD and an Intel CPU; gradient clipping at norm 1 still left it at 0.40), while 1e-3,
        # between the two valleys, learned (ICC 0.95; seed 1 0.976 at either rate).
        "direct_lr": 1e-3,
        "direct_schedule": "one_cycle",  # paper: Adam, decaying rate
        # Xception (C): cross-entropy against a Gaussian over the bins, sigma in bins (paper: one-hot,
        # 0). With 160 labels for 101 bins, one-hot targets left it at ICC 0.85 after 30 epochs.
        "cls_sigma": 3.0,
        "sr_epochs": 15,  # stage 1, segmentation frozen
        "sr_finetune_epochs": 3,  # stage 2, end to end at a tenth of the rate
        "sr_lr": 3e-3,
        "sr_schedule": "one_cycle",
        "gbt_rounds": 600,
        # stain augmentation in training (cellulib.data.breastpathq.STAIN_AUGMENTS): "none" is the paper's
        # recipe (gamma, hue and saturation only); "hed" adds HED jitter (issue 12)
        "stain_augment": "none",
    },
    "paper": {
        "n_train": 2394,
        "n_val": 185,
        "n_cells": 153,
        "size": 512,
        "precision": "auto",
        "downscale": SEG_DOWNSCALE,
        "crop": 256,
        "disc_diameter": DISC_DIAMETER,
        "seg_epochs": 150,
        "seg_bs": 16,
        "seg_lr": 1e-4,
        "seg_lr_end": 1e-5,
        "seg_schedule": "decay",
        "seg_weights": (1.0, 1.0, 4.0, 1.0),
        "patches_per_epoch": 1,
        "direct_size": None,  # the segmentation scale (256 px), SR's input too
        "direct_epochs": 50,
        "direct_bs": 16,
        "direct_lr": 1e-4,
        "direct_schedule": "decay",
        "cls_sigma": 0.0,
        "sr_epochs": 30,
        "sr_finetune_epochs": 10,
        "sr_lr": 1e-4,
        "sr_schedule": "decay",
        "gbt_rounds": 600,
        "stain_augment": "none",
    },
}


#: Weak segmentation settings for BRCA-M2C (SPEC 1.4), applied by `cellulib.training.train.train_seg`
#: whenever its data folder is a BRCA-M2C copy (explicit overrides still win). Pixel scale: the
#: patches are at 20x (0.5 um/px) with nuclei a median 12.1 px across (haematoxylin segmentation
#: of 20 training images) and a median nearest-dot distance of 17.0 px (training split), so the images are not downscaled (the x2 of the paper would
#: leave 5-7 px nuclei, under 2 cells of the FPN's stride-4 grid, and halve the 6 px matching
#: radius of the detection protocol) and the discs are 11 px across, the size of a nucleus and below
#: the spacing of most neighbours. The real-H&E chapter shows the measurements behind these values.
BRCA_M2C_SEG: dict[str, dict[str, Any]] = {
    "quick": {
        "downscale": 1,
        "disc_diameter": 11.0,
        "crop": 128,
        # Measured on the validation split (FPN, seed 0, threshold 0.3), pooled / tumour F:
        # 8 epochs at 3e-3 gave 0.60 / 0.33, 24 at 3e-3 0.82 / 0.60, 48 at 3e-3 0.84 / 0.66,
        # 24 at 1e-2 0.83 / 0.65 and 32 at 1e-2 0.83 / 0.68 (about 11 s an epoch on 2 cores).
        "seg_epochs": 32,  # paper: 150
        "seg_lr": 1e-2,
        "seg_schedule": "one_cycle",
        "patches_per_epoch": 3,
    },
    "paper": {
        "downscale": 1,
        "disc_diameter": 11.0,
        "crop": 256,
    },
}


class ProfileError(ValueError):
    """An unknown profile or setting."""


def get_profile(profile: str = "quick", **overrides: Any) -> dict[str, Any]:
    """Return the settings of ``profile`` with ``overrides`` applied (``None`` values are ignored).

    Examples
    --------
    >>> get_profile("quick", seg_epochs=1)["seg_epochs"]
    1
    """
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    settings = dict(PROFILES[profile])
    unknown = sorted(k for k in overrides if k not in settings)
    if unknown:
        raise ProfileError(
            f"unknown setting(s) {unknown} for profile {profile!r}; known: {sorted(settings)}"
        )
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["profile"] = profile
    return settings


def brca_m2c_profile(profile: str = "quick", **overrides: Any) -> dict[str, Any]:
    """The settings `cellulib.training.train.train_seg` uses on a BRCA-M2C copy: ``profile`` with its
    `BRCA_M2C_SEG` values, then ``overrides`` (``None`` values are ignored). Used in the real-H&E
    chapter.

    Examples
    --------
    >>> s = brca_m2c_profile("quick", crop=64)
    >>> s["downscale"], s["disc_diameter"], s["crop"]
    (1, 11.0, 64)
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    return get_profile(profile, **{**BRCA_M2C_SEG.get(profile, {}), **given})


def seg_scale_size(patch_side: float, downscale: float) -> int:
    """A patch's side at the segmentation network's scale: ``patch_side / downscale`` rounded to a
    multiple of the networks' stride (`cellulib.constants.STRIDE`, 32), at least one stride. The
    default input of the SR, GBT and direct models (:func:`cellulib.training.train.cellularity_input_size`) and of the bench.

    Examples
    --------
    >>> seg_scale_size(256, 2), seg_scale_size(500, 2)
    (128, 256)
    """
    return max(STRIDE, int(round(patch_side / downscale / STRIDE)) * STRIDE)


def home() -> Path:
    """Folder for generated data and cached models: ``$CELLULIB_HOME`` or ``~/.cache/cellulib``."""
    env = os.environ.get("CELLULIB_HOME")
    path = Path(env) if env else Path.home() / ".cache" / "cellulib"
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The environment variable naming a folder laid out like the project's ``shared/data/real``.
REAL_DATA_ENV = "CELLULIB_REAL_DATA"


def real_dir() -> Path | None:
    """The folder of real H&E data: ``$CELLULIB_REAL_DATA`` when set, else ``../shared/data/real``
    beside a checkout of the repository. Returns ``None`` when neither holds anything (an installed
    package has no checkout folder); :func:`real_data_missing` says so in words.

    The folder has the layout of the project's ``shared/data/real``: ``brca-m2c/`` (a BRCA-M2C
    copy), ``breastpathq_99788_1.tif``, ``breastpathq_train_labels.csv`` and other H&E images. A
    set but empty or missing folder means "no real data" (the checkout's is not used then).
    """
    env = os.environ.get(REAL_DATA_ENV)
    path = Path(env).expanduser() if env else _CHECKOUT_REAL
    return path if path.is_dir() and any(path.iterdir()) else None


#: Where a checkout of the repository finds the real data: ``shared/data/real`` beside it.
_CHECKOUT_REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def real_data_missing(what: str, parameter: str | None = "real_data", part: str = "section",
                      given: str | os.PathLike | None = None) -> str:
    """The sentence a chapter prints when ``what`` (e.g. "BRCA-M2C") was not found: where it was
    looked for (``given``, the folder the chapter's ``parameter`` named, else the environment or the
    checkout) and how to give it, for a checkout and an installed package alike, and which ``part``
    of the chapter was skipped. Used in chapter 1, the real-H&E chapter and the stain-shift chapter."""
    env = os.environ.get(REAL_DATA_ENV)
    looked = (f"looked in {given}" if given is not None
              else f"${REAL_DATA_ENV} is {env}" if env
              else f"{REAL_DATA_ENV} is not set and there is no {_CHECKOUT_REAL}")
    give = f"give its folder as the {parameter} parameter, or " if parameter else ""
    return (f"{what} not found ({looked}; {give}set {REAL_DATA_ENV} to a folder laid out like "
            f"the project's shared/data/real), so this {part} was skipped.")


def brca_m2c_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The BRCA-M2C copy a chapter reads (SPEC 1.4): ``path`` when given, else ``brca-m2c`` in
    :func:`real_dir` when present, else None (the caller says the section was skipped).

    A given ``path`` must be a BRCA-M2C copy: otherwise `cellulib.data.breastpathq.DataError` says what the
    folder lacks. Used in the real-H&E chapter.
    """
    from cellulib.data.annotations import detect_layout
    from cellulib.files.imageio import DataError

    if path is not None:
        root = Path(path).expanduser()
        if detect_layout(root) != "brca-m2c":
            raise DataError(f"{root}: a BreastPathQ folder, not a BRCA-M2C copy (images/, labels/ "
                            "and brca_ds_{train,val,test}.txt)")
        return root
    real = real_dir()
    if real is not None and (real / "brca-m2c").is_dir():
        return real / "brca-m2c"
    return None


def fingerprint(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-serialisable object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def synthetic_params(profile: str = "quick", seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The arguments of :func:`cellulib.data.synth.make_breastpathq` for a profile."""
    get_profile(profile)  # a clear error for an unknown profile
    settings = get_profile(profile, **{k: v for k, v in overrides.items() if k in PROFILES[profile]})
    return {k: settings[k] for k in ("n_train", "n_val", "n_cells", "size")} | {"seed": int(seed)}


def synthetic_root(profile: str = "quick", seed: int = 0, **overrides: Any) -> Path:
    """Where :func:`get_dataset` keeps the synthetic set of ``profile`` and ``seed``
    (``home()/synth/<profile>-<hash>``); :func:`synthetic_ready` says whether it is complete."""
    from cellulib.data import synth

    params = synthetic_params(profile, seed, **overrides)
    return home() / "synth" / f"{profile}-{fingerprint(params | {'v': synth.GENERATOR_VERSION})}"


def synthetic_ready(root: str | os.PathLike) -> bool:
    """Whether the synthetic set in ``root`` (:func:`synthetic_root`) is complete: it holds
    ``datasets/val_labels.csv`` (:func:`get_dataset` renders into a temporary folder and renames it
    when done, so a half-written set is never at ``root``). Used by `get_dataset` and by
    ``cellulib train`` without ``--data``."""
    return (Path(root) / "datasets" / "val_labels.csv").exists()


def get_dataset(
    data_dir: str | os.PathLike | None = None,
    profile: str = "quick",
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """The BreastPathQ folder a chapter reads: ``data_dir`` when given, else the synthetic set.

    The synthetic set for a profile and seed is generated once into ``home()/synth/<hash>`` (into a
    temporary folder first, renamed when complete, so an interrupted run leaves nothing half-written)
    and reused by every chapter afterwards. Used in every chapter.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir {root} does not exist; give the folder that holds BreastPathQ's "
                "'datasets/' (train/, validation/, train_labels.csv, val_labels.csv, cells/)"
            )
        return root
    from cellulib.data import synth  # imported here: reading a real dataset does not need the generator

    params = synthetic_params(profile, seed, **overrides)
    root = synthetic_root(profile, seed, **overrides)
    if synthetic_ready(root):
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synth.make_breastpathq(tmp, progress=progress, **params)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


class ParameterError(TypeError):
    """A chapter parameter (papermill ``-p``) of the wrong type."""


_PARAMETER_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _expected_types(annotation: Any) -> tuple[tuple[type, ...], bool, str]:
    """(accepted types, None allowed, readable name) of a parameter annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace(" ", "")
    optional = text.startswith("Optional[") and text.endswith("]")
    if optional:
        text = text[len("Optional["):-1]
    if text.endswith("|None"):
        optional, text = True, text[: -len("|None")]
    if text not in _PARAMETER_TYPES:
        raise ParameterError(f"parameter annotation {annotation!r} is not one of "
                             f"{sorted(_PARAMETER_TYPES)} (optionally Optional[...])")
    return _PARAMETER_TYPES[text], optional, text + (" or None" if optional else "")


def check_parameters(namespace: dict[str, Any]) -> None:
    """Check the chapter's parameters (its annotated globals) against their annotations.

    A chapter's ``parameters`` cell declares ``seed: int = 0``; papermill's injected cell may then
    set ``seed = "abc"``. Called right after the imports of every chapter, this stops the chapter
    with a message naming the parameter instead of an error from deep inside a library.

    Examples
    --------
    >>> check_parameters({"__annotations__": {"seed": int}, "seed": "abc"})
    Traceback (most recent call last):
    ...
    cellulib.data.profiles.ParameterError: parameter 'seed' must be int, got 'abc' (str); e.g. papermill -p seed 0
    """
    for name, annotation in namespace.get("__annotations__", {}).items():
        if name not in namespace:
            continue
        value = namespace[name]
        types, optional, readable = _expected_types(annotation)
        if value is None and optional:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ParameterError(
                f"parameter {name!r} must be {readable}, got {value!r} ({type(value).__name__}); "
                f"e.g. papermill -p {name} {_example(types)}")
    if "profile" in namespace and namespace["profile"] not in PROFILES:
        raise ParameterError(f"parameter 'profile' must be one of {sorted(PROFILES)}, "
                             f"got {namespace['profile']!r}")


def _example(types: tuple[type, ...]) -> str:
    return {int: "0", float: "0.5", str: "text", bool: "True"}[types[-1]]
