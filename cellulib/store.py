"""Model files and the result cache.

A model file is one ``torch.save`` archive holding the weights and everything needed to rebuild and use
the model without the book: its family and constructor arguments (``config``), the preprocessing, and
free-form metadata (training history, validation scores, data fingerprint). SPEC section 7:
``cellulib.save_model(model, path, **meta)`` and ``cellulib.load_model(path)``.

Results are cached by the hash of their inputs (SPEC section 6) under ``$CELLULIB_HOME/models``, so
a later chapter reuses an earlier chapter's model instead of retraining.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from cellulib.profiles import fingerprint, home

#: Bumped when the file layout changes; a file of another format version is refused with a clear error.
FORMAT_VERSION = 1
FORMAT_TAG = "cellulib-model"


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, of another format, or of an unknown family."""


def _build(family: str, config: dict[str, Any], booster: str | None = None):
    """Rebuild an untrained model of ``family`` from the ``config`` its factory recorded."""
    from cellulib import models

    def seg(cfg):
        return models.seg_model(decoder=cfg["decoder"], dropout=cfg.get("dropout", 0.5),
                                n_classes=cfg.get("n_classes", 4))

    if family == "seg":
        return seg(config)
    if family == "direct":
        return models.direct_model(config["arch"], task=config["task"])
    if family == "gbt":
        import lightgbm

        return models.GBTModel(seg(config["seg"]), lightgbm.Booster(model_str=booster))
    if family == "sr":
        return models.sr_model(seg(config["seg"]), arch=config.get("arch", "resnet34"),
                               drop_background=config.get("drop_background", False))
    raise ModelFileError(f"unknown model family {family!r}")


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` and rename it into place, so a crash
    never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(model, path: str | os.PathLike, *, family: str | None = None,
               config: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Save a torch model or a LightGBM booster with its config and metadata into one file.

    ``family`` is ``seg``, ``sr``, ``direct`` or ``gbt`` (a segmentation net with its LightGBM
    booster, :class:`cellulib.models.GBTModel`); all are torch modules rebuilt from ``config``. Models built by :mod:`cellulib.models` carry both in their
    ``config`` attribute (``config["kind"]`` is the family), so they need not be given. ``meta`` holds anything JSON-like or
    tensors (history, scores, preprocessing). The file is written atomically.
    """
    import torch

    if family is None or config is None:
        carried = dict(getattr(model, "config", None) or {})
        if "kind" not in carried and family is None:
            raise ModelFileError("save_model needs family= and config= for a model not built by cellulib")
        family = family or carried["kind"]
        config = config if config is not None else carried

    from cellulib import __version__

    payload: dict[str, Any] = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "cellulib_version": __version__,
        "family": family,
        "config": dict(config),
        "meta": meta,
    }
    if family == "gbt":
        payload["booster"] = model.booster.model_to_string()
    payload["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def load_model(path: str | os.PathLike, map_location: str = "cpu"):
    """Load a model file written by :func:`save_model`; returns ``(model, info)``.

    ``info`` is a dict with ``family``, ``config``, ``meta`` and ``cellulib_version``. Torch models
    come back in eval mode. A missing, corrupt, foreign or future-format file raises
    :class:`ModelFileError` naming the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ModelFileError(f"{path}: not a readable cellulib model file ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise ModelFileError(f"{path}: not a cellulib model file (no '{FORMAT_TAG}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format {payload.get('format_version')} was written by cellulib "
            f"{payload.get('cellulib_version')}; this cellulib reads format {FORMAT_VERSION}"
        )
    family, config = payload["family"], payload["config"]
    try:
        model = _build(family, config, payload.get("booster"))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit a {family} model {config}: {exc}") from None
    model.eval()
    info = {k: payload[k] for k in ("family", "config", "meta", "cellulib_version")}
    return model, info


def data_fingerprint(root: str | os.PathLike) -> str:
    """Hash of a BreastPathQ folder's label files and image names and sizes (cheap: no pixels read)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in {".csv", ".tif", ".tiff", ".xml", ".png", ".jpg"}:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(str(path.stat().st_size).encode())
            if path.suffix.lower() in {".csv", ".xml"}:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_path(kind: str, params: dict[str, Any], suffix: str = ".pt") -> Path:
    """Where the result of ``kind`` computed from ``params`` is cached (``$CELLULIB_HOME/models``)."""
    from cellulib import __version__

    key = fingerprint(params | {"cellulib": __version__})
    folder = home() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{key}{suffix}"
