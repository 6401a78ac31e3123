"""Model files: one ``torch.save`` archive per model, holding the weights and everything needed to
rebuild and use the model without the book: its family and constructor arguments (``config``), the
preprocessing, and free-form metadata (training history, validation scores, data fingerprint).
SPEC section 7: ``cellulib.save_model(model, path, **meta)`` and ``cellulib.load_model(path)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import threading
from pathlib import Path
from typing import Any

from cellulib.files.imageio import atomic_write_bytes

#: Bumped when the file layout changes; a file of another format version is refused with a clear error.
FORMAT_VERSION = 1
FORMAT_TAG = "cellulib-model"


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, of another format, or of an unknown family."""


#: Held while :func:`_no_random_init` has replaced ``torch.nn.init``'s functions: two threads
#: loading at once would otherwise save each other's no-ops and could leave them in place.
_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _no_random_init():
    """``torch.nn.init``'s initialisers (``kaiming_uniform_``, ``normal_``, ...) as no-ops while a
    model is rebuilt to receive its stored weights: the strict ``load_state_dict`` after it
    overwrites every parameter and persistent buffer, so drawing them first is wasted (about half
    of the time to load a ResNet-34 file on a 2-core CPU, and most of a book chapter's model loads).
    Modules look the initialisers up in ``torch.nn.init`` when they are called, so replacing them
    there for the duration of the build is enough; they are restored afterwards, also on error,
    and one thread at a time replaces them (:data:`_INIT_LOCK`)."""
    import torch.nn.init as init

    with _INIT_LOCK:
        names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_")
                 and callable(getattr(init, n))]
        saved = {n: getattr(init, n) for n in names}
        try:
            for n in names:
                setattr(init, n, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)


def _build(family: str, config: dict[str, Any], booster: str | None = None):
    """Rebuild an untrained model of ``family`` from the ``config`` its factory recorded (its
    parameters not initialised: :func:`load_model` loads the stored weights into it)."""
    from cellulib.models import networks

    def seg(cfg):
        return networks.seg_model(decoder=cfg["decoder"], dropout=cfg.get("dropout", 0.5),
                                n_classes=cfg.get("n_classes", 4))

    if family == "seg":
        return seg(config)
    if family == "direct":
        return networks.direct_model(config["arch"], task=config["task"])
    if family == "gbt":
        import lightgbm

        return networks.GBTModel(seg(config["seg"]), lightgbm.Booster(model_str=booster))
    if family == "sr":
        return networks.sr_model(seg(config["seg"]), arch=config.get("arch", "resnet34"),
                               drop_background=config.get("drop_background", False))
    raise ModelFileError(f"unknown model family {family!r}")


def save_model(model, path: str | os.PathLike, *, family: str | None = None,
               config: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Save a torch model or a LightGBM booster with its config and metadata into one file.

    ``family`` is ``seg``, ``sr``, ``direct`` or ``gbt`` (a segmentation net with its LightGBM
    booster, :class:`cellulib.models.networks.GBTModel`); all are torch modules rebuilt from ``config``. Models built by :mod:`cellulib.models.networks` carry both in their
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
    payload = _plain(payload, "payload")
    return atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as the data a model file may hold: dicts with string keys, lists, strings, numbers,
    booleans, None and tensors. NumPy scalars and arrays become numbers and lists, tuples lists,
    paths strings; anything else raises :class:`ModelFileError` naming where it sits, so that no
    file is written that :func:`load_model` would refuse."""
    import numpy as np
    import torch

    if isinstance(obj, np.generic):  # first: np.float64 is a float, but pickles as NumPy's
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ModelFileError(f"{where}: a model file holds dicts with string keys only")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ModelFileError(f"{where}: a {type(obj).__name__} cannot go into a model file, which holds "
                         "only tensors, numbers, strings, lists and dicts (data, never code)")


def _read_payload(path: Path, map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A model file's payload, read as data: ``torch.load(weights_only=True)``, so a pickle that
    names any Python callable (as one that would run code does) is refused before anything in it
    runs. Raises :class:`ModelFileError` naming the file for a refused, corrupt or foreign file."""
    import torch

    try:
        payload = torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc).upper():  # a pickle torch cannot parse at all: corrupt bytes
            raise ModelFileError(f"{path}: not a readable cellulib model file (corrupt or not a "
                                 "torch archive)") from None
        raise ModelFileError(f"{path}: refused: {_forbidden(exc)}; a model file holds only tensors "
                             "and plain data, and cellulib loads none that could run code. If it is "
                             "a cellulib model file of your own from an older version, re-save it "
                             f"as data: cellulib resave --trust {path} NEW.pt (this one step runs "
                             "the file's pickle: never for a file from elsewhere)") from None
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ModelFileError(f"{path}: not a readable cellulib model file "
                             f"({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise ModelFileError(f"{path}: not a cellulib model file (no '{FORMAT_TAG}' header)")
    return payload


def load_model(path: str | os.PathLike, map_location: str = "cpu"):
    """Load a model file written by :func:`save_model`; returns ``(model, info)``.

    ``info`` is a dict with ``family``, ``config``, ``meta`` and ``cellulib_version``. Torch models
    come back in eval mode. A missing, corrupt, foreign or future-format file raises
    :class:`ModelFileError` naming the file. The file is read with ``torch.load(weights_only=True)``
    (SPEC 6): a pickle that names any Python callable other than torch's tensor rebuilders, as one
    that would run code does, is refused before anything in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    payload = _read_payload(path, map_location)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format {payload.get('format_version')} was written by cellulib "
            f"{payload.get('cellulib_version')}; this cellulib reads format {FORMAT_VERSION}"
        )
    family, config = payload["family"], payload["config"]
    try:
        with _no_random_init():
            model = _build(family, config, payload.get("booster"))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit a {family} model {config}: {exc}") from None
    model.eval()
    info = {k: payload[k] for k in ("family", "config", "meta", "cellulib_version")}
    return model, info


def resave_trusted(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Re-save a model file written by an older cellulib as data (``cellulib resave --trust``).

    The one place that unpickles with full Python (``weights_only=False``): only for a file the
    user wrote and trusts. NumPy values in it become plain numbers and lists (:func:`_plain`); the
    result loads with :func:`load_model`, and ``dst`` is written atomically.
    """
    import torch

    src = Path(src)
    if not src.is_file():
        raise ModelFileError(f"{src}: no such model file")
    try:
        payload = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelFileError(f"{src}: not a readable model file ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise ModelFileError(f"{src}: not a cellulib model file (no '{FORMAT_TAG}' header)")
    payload = _plain(payload, str(src))
    out = atomic_write_bytes(dst, lambda fh: torch.save(payload, fh))
    load_model(out)  # proves it reads back as data
    return out


def _forbidden(exc: Exception) -> str:
    """What a weights-only load refused, from torch's message (the global it named, if any)."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return (f"it asks to call {found.group(1)}" if found
            else "it holds Python objects other than tensors and plain data")


def model_and_info(model: Any) -> tuple[str, Any, dict[str, Any]]:
    """``(source, model, info)`` of a model file or of the ``(model, info)`` pair of :func:`load_model`.

    ``source`` names the file (``"<loaded model>"`` for a pair) for error messages. Used by
    ``cellulib predict``, ``slide`` and ``detect``.
    """
    import torch

    if isinstance(model, (str, os.PathLike)):
        loaded, info = load_model(model)
        return str(model), loaded, info
    if isinstance(model, tuple) and len(model) == 2:
        loaded, info = model
        if isinstance(info, dict) and isinstance(loaded, torch.nn.Module):
            return "<loaded model>", loaded, info
        raise ValueError("model must be the (model, info) pair from cellulib.load_model")
    raise ValueError("model must be a model file or the (model, info) pair from "
                     f"cellulib.load_model, got {type(model).__name__}")


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """A model file's ``family``, ``config``, ``meta`` and ``cellulib_version`` without loading
    its weights (the archive is memory-mapped, so this is fast for any size). Raises
    :class:`ModelFileError` naming the file when it is not a readable cellulib model file. Used by
    :func:`cellulib.training.cache.cache_entries`."""
    payload = _read_payload(Path(path), mmap=True)
    return {k: payload.get(k) for k in ("family", "config", "meta", "cellulib_version")}


def weights_digest(model: Any) -> str:
    """Short sha256 of a model's weights: every tensor of its ``state_dict`` (name, dtype, shape and
    bytes, in name order) and, for a GBT model, its LightGBM booster. Outputs derived from a model
    (its stored validation predictions, in :mod:`cellulib.training.train`) are keyed on it."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    booster = getattr(model, "booster", None)
    if booster is not None:
        digest.update(booster.model_to_string().encode())
    return digest.hexdigest()[:12]
