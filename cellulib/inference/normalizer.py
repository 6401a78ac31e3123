"""The stain normaliser an image gets before a model, from the command line's options: a method,
a target image, or the stain reference the model recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellulib.data.stain import StainError, StainNormalizer
from cellulib.inference.modelfile import model_and_info


def normalizer_from_options(method: str | None, target: str | Path | None = None,
                            model: Any = None) -> StainNormalizer | None:
    """The normaliser of ``--stain-norm METHOD [--stain-target IMAGE]``; None without a method.

    The target image is fitted when given. Without one, the stored reference of ``model`` (a model
    file or the ``(model, info)`` pair of :func:`cellulib.load_model`; ``meta["stain"][method]``,
    the stain of its training set, :func:`cellulib.data.stain.training_reference`) is used;
    otherwise :class:`cellulib.data.stain.StainError` says that
    a target is needed. Called before anything is written, so a bad target loses nothing. Used by
    ``cellulib predict``, ``detect`` and ``slide``.
    """
    if method is None:
        if target is not None:
            raise StainError("--stain-target needs --stain-norm macenko or reinhard")
        return None
    if target is not None:
        return StainNormalizer(method).fit(target)
    meta = {}
    if model is not None:
        meta = model_and_info(model)[2].get("meta") or {}
    stored = meta.get("stain")
    # meta["stain"] maps method -> reference (cellulib.training.train); one bare reference is read too
    ref = (stored.get(method) if isinstance(stored, dict) and "method" not in stored else stored)
    if isinstance(ref, dict) and ref.get("method") == method:
        return StainNormalizer.from_reference(ref)
    why = (f" ({stored['unavailable']})" if isinstance(stored, dict) and "unavailable" in stored
           else "")
    raise StainError(f"--stain-norm {method} needs --stain-target IMAGE (an H&E image stained "
                     "the way the model's training data were): this model file carries no "
                     f"{method} stain reference{why}")
