"""Profiles (``quick`` and ``paper``): the settings every chapter and command starts from.

SPEC section 6: every chapter and command takes ``profile``; ``quick`` (the default) is sized so the
whole book executes on a 2-core CPU in minutes, ``paper`` holds the paper's hyperparameters and is meant
for the real BreastPathQ data on a GPU. Any value can be overridden (papermill parameters, CLI flags).
Used in every chapter.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

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
        # between the two valleys, learned (ICC 0.95; seed 1: 0.976 at 3e-3, 0.987 at 1e-3).
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
        # LightGBM's min_data_in_leaf: "cv" chooses it by 5-fold cross-validation on the training
        # patches (cellulib.models.features.select_min_leaf); an integer fixes it (LightGBM's default: 20)
        "gbt_min_leaf": "cv",
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
        "gbt_min_leaf": "cv",
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


#: The longer BRCA-M2C recipe that ``cellulib train seg --data <BRCA-M2C>`` trains by default
#: (issue 22; ``--epochs`` still wins), on top of `BRCA_M2C_SEG`. The book's chapters and
#: `cellulib.training.train.train_seg` train the shorter `BRCA_M2C_SEG` recipe, which fits the book's
#: time. Measured on held-out patients (FPN, disc class rule, threshold 0.3, AMD EPYC bf16, one
#: torch thread beside other runs), F detection / tumour / lymphocyte / stromal: 128 epochs, seeds
#: 0 and 1 (2634 s, 1829 s): 0.831 / 0.754 / 0.808 / 0.541 and 0.834 / 0.750 / 0.796 / 0.546, and
#: at the threshold each file records (`cellulib.inference.detect.choose_threshold`: 0.6 and 0.5),
#: which ``cellulib detect`` uses, 0.840 / 0.755 / 0.813 / 0.560 and 0.844 / 0.755 / 0.800 /
#: 0.557, every floor met (a third run, seed 0 with 2 threads alone on the machine, 1186 s: 0.838 /
#: 0.742 / 0.792 / 0.538, tumour and stromal missed); 96 epochs, seeds 0 and 1 (1420 s): 0.819 / 0.733 /
#: 0.799 / 0.520 and 0.826 / 0.736 / 0.791 / 0.523; 64 epochs without the class weights, seed 0:
#: 0.818 / 0.738 / 0.728 / 0.446; the book's 32 epochs, seed 0: 0.799 / 0.682 / 0.625 / 0.283.
#: The class weights (every nucleus class weighted as tumour) add most of the stromal gain.
BRCA_M2C_COMMAND_LINE: dict[str, dict[str, Any]] = {
    "quick": {"seg_epochs": 128, "seg_weights": (4.0, 4.0, 4.0, 1.0)},
}


def command_line_seg(profile: str = "quick", brca: bool = True,
                     epochs: int | None = None) -> dict[str, Any]:
    """The keyword arguments that ``cellulib train seg`` adds to
    :func:`cellulib.training.train.train_seg`: on a BRCA-M2C folder (``brca``) the profile's
    `BRCA_M2C_COMMAND_LINE` recipe, with its epochs as ``epochs``; a given ``epochs``
    (``--epochs``) wins. Used by the command line and the real-H&E chapter, which shows the
    command line's model beside the book's when the cache holds it.

    Examples
    --------
    >>> command_line_seg("quick")
    {'epochs': 128, 'seg_weights': (4.0, 4.0, 4.0, 1.0)}
    >>> command_line_seg("quick", epochs=5)
    {'epochs': 5, 'seg_weights': (4.0, 4.0, 4.0, 1.0)}
    >>> command_line_seg("quick", brca=False), command_line_seg("paper")
    ({'epochs': None}, {'epochs': None})
    """
    recipe = dict(BRCA_M2C_COMMAND_LINE.get(profile, {})) if brca else {}
    longer = recipe.pop("seg_epochs", None)
    return {"epochs": longer if epochs is None else epochs, **recipe}


#: Whether a profile's real-H&E chapter trains the U-Net decoder on BRCA-M2C beside the FPN, to
#: test the paper's ranking of the decoders on real nuclei (the chapter's ``compare_decoders``
#: parameter wins). Not a training setting, so not part of any model's cache key. The quick profile
#: leaves it out (issue 21: it was the largest single training run of a build, 340-386 s of 2
#: cores in bf16): the FPN was the better decoder on BRCA-M2C's held-out patients in every
#: comparison measured (the books' builds at 32 epochs, where the U-Net classed no nucleus as
#: lymphocyte or stromal in one of them, and 96 epochs, where it was worse on every class;
#: MEASUREMENTS.md), and chapter 2 compares the two decoders on synthetic patches in every build.
BRCA_M2C_COMPARE_DECODERS: dict[str, bool] = {"quick": False, "paper": True}

#: The stain augmentation (`cellulib.data.transforms.STAIN_AUGMENTS`) of the nucleus detector that
#: learns from synthetic patches only (:func:`cellulib.training.train.synthetic_detector`, issue
#: 23's floor: pooled F >= 0.60 on BRCA-M2C's held-out patients). Without jitter, at 32 epochs, its
#: F moved with the arithmetic: 0.584-0.722 in eight runs over seeds 0 and 1, bf16 and float32, 1
#: and 2 torch threads and several CPU kinds (0.584 in float32 on an AVX2 CPU, under the floor);
#: with chapter 4b's HED jitter the four runs measured (seeds 0 and 1, bf16 and float32, one CPU
#: kind) gave 0.679-0.715, a narrower spread above the floor (MEASUREMENTS.md).
SYNTHETIC_DETECTOR_STAIN: str = "hed"

#: The epochs of that detector per profile, where they differ from the profile's BRCA-M2C networks'
#: (`BRCA_M2C_SEG`; the paper profile trains it as long as them). An ``epochs`` given to
#: :func:`cellulib.training.train.synthetic_detector` (the real-H&E chapter's parameter) wins. With
#: HED jitter, 24 epochs were as good as 32 on BRCA-M2C's held-out patients (pooled F, seeds 0 and
#: 1, bf16 and float32, one CPU kind: 0.675-0.728 against 0.679-0.715) in three quarters of the
#: time (issue 21; MEASUREMENTS.md).
SYNTHETIC_DETECTOR_EPOCHS: dict[str, int] = {"quick": 24}

#: The segmentation decoders' names in the book's tables and sentences.
DECODER_NAMES: dict[str, str] = {"fpn": "FPN", "unet": "U-Net"}


def brca_m2c_decoders(profile: str = "quick", compare: bool | None = None) -> tuple[str, ...]:
    """The decoders the real-H&E chapter trains on BRCA-M2C: the FPN, and the U-Net when
    ``compare`` is true (None: the profile's `BRCA_M2C_COMPARE_DECODERS`). Used by
    :func:`cellulib.training.train.real_networks` in the real-H&E and stain-shift chapters.

    Examples
    --------
    >>> brca_m2c_decoders("quick"), brca_m2c_decoders("paper"), brca_m2c_decoders("quick", True)
    (('fpn',), ('fpn', 'unet'), ('fpn', 'unet'))
    >>> brca_m2c_decoders("quick", "yes")
    Traceback (most recent call last):
    ...
    cellulib.data.profiles.ProfileError: compare_decoders must be True, False or None, got 'yes'
    """
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    if compare is not None and not isinstance(compare, (bool, np.bool_)):
        raise ProfileError(f"compare_decoders must be True, False or None, got {compare!r}")
    compare = BRCA_M2C_COMPARE_DECODERS.get(profile, True) if compare is None else bool(compare)
    return ("fpn", "unet") if compare else ("fpn",)


class ProfileError(ValueError):
    """An unknown profile or setting."""


def _is_int(value) -> bool:
    """An integer, numpy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int, error: type[ValueError] = ValueError) -> int:
    """An integer argument >= minimum, or ``error`` (a ValueError) that names the argument. Used
    by :func:`get_profile` and the synthetic generator."""
    if not _is_int(value) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_side(name: str, value, error: type[ValueError] = ValueError) -> int:
    """A side the segmentation network reads whole (a training crop, an SR or GBT input): an
    integer multiple of `cellulib.constants.STRIDE`, or ``error`` naming the argument."""
    if not _is_int(value) or value < STRIDE or value % STRIDE:
        raise error(f"{name} must be a multiple of {STRIDE} px (at least {STRIDE}), got {value!r}")
    return int(value)


#: The smallest value of each integer training setting: an epoch count of 0 would write an
#: untrained model, and an input below one stride of the encoders fails inside the network
#: (``crop`` is checked by :func:`check_side`). ``sr_finetune_epochs=0`` skips the second SR stage.
SMALLEST: dict[str, int] = {
    "seg_epochs": 1, "direct_epochs": 1, "sr_epochs": 1, "sr_finetune_epochs": 0, "gbt_rounds": 1,
    "seg_bs": 1, "direct_bs": 1, "patches_per_epoch": 1, "direct_size": STRIDE,
}


def get_profile(profile: str = "quick", **overrides: Any) -> dict[str, Any]:
    """Return the settings of ``profile`` with ``overrides`` applied (``None`` values are ignored).

    Examples
    --------
    >>> get_profile("quick", seg_epochs=1)["seg_epochs"]
    1
    >>> get_profile("quick", seg_epochs=0)
    Traceback (most recent call last):
    ...
    cellulib.data.profiles.ProfileError: seg_epochs must be an integer >= 1, got 0
    """
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    settings = dict(PROFILES[profile])
    unknown = sorted(k for k in overrides if k not in settings)
    if unknown:
        raise ProfileError(
            f"unknown setting(s) {unknown} for profile {profile!r}; known: {sorted(settings)}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if key in SMALLEST:
            check_int(key, value, SMALLEST[key], ProfileError)
        elif key == "crop":
            check_side(key, value, ProfileError)
        elif key == "gbt_min_leaf" and value != "cv" and not (_is_int(value) and value >= 1):
            raise ProfileError(f'gbt_min_leaf must be "cv" or an integer >= 1, got {value!r}')
    settings.update(given)
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
