"""The pixel size a model was trained at (micrometres per pixel and patch side), read from its
model file, and the check of a ``--mpp`` value.
"""

from __future__ import annotations

from typing import Any

from cellulib.constants import MPP

#: Pixel size assumed for a model file that records none (``meta["pixel_size"]``): BreastPathQ's
#: 512-px patches at about 0.5 um/px (cellulib.constants.MPP).
DEFAULT_PIXEL_SIZE = {"mpp": MPP, "patch_px": 512}


def check_mpp(mpp: Any, what: str = "mpp (micrometres per pixel of the images)") -> float | None:
    """``mpp`` as a float, or None when not given; a clear error for anything outside (0, 100).
    The one check of ``--mpp`` for ``cellulib predict``, ``detect`` and ``slide``."""
    if mpp is None:
        return None
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0 < float(mpp) < 100:
        raise ValueError(f"{what} must lie in (0, 100), got {mpp!r}")
    return float(mpp)


def pixel_size(info: dict[str, Any]) -> tuple[float, int, bool]:
    """``(mpp, patch_px, recorded)`` of a model's training images, from ``info["meta"]`` (see
    :func:`cellulib.training.train` ``_provenance``); :data:`DEFAULT_PIXEL_SIZE` with ``recorded`` False
    when the file holds none. Used by ``cellulib predict``/``detect`` (``--mpp``) and ``slide``."""
    ps = (info.get("meta") or {}).get("pixel_size")
    try:
        mpp, patch = float(ps["mpp"]), int(ps["patch_px"])
        if mpp > 0 and patch > 0:
            return mpp, patch, True
    except (TypeError, KeyError, ValueError):
        pass
    return DEFAULT_PIXEL_SIZE["mpp"], DEFAULT_PIXEL_SIZE["patch_px"], False
