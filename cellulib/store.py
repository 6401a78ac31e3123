"""Model files and the result cache.

A model file is one ``torch.save`` archive holding the weights and everything needed to rebuild and use
the model without the book: its family and constructor arguments (``config``), the preprocessing, and
free-form metadata (training history, validation scores, data fingerprint). SPEC section 7:
``cellulib.save_model(model, path, **meta)`` and ``cellulib.load_model(path)``.

Results are cached by the hash of their inputs (SPEC section 6) under ``$CELLULIB_HOME/models``, so
a later chapter reuses an earlier chapter's model instead of retraining. The inputs are the settings,
the bytes of the data (:func:`data_fingerprint`) and the bytes of the training code
(:func:`code_fingerprint`): a cached model is never reused after the code or the data changed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cellulib.constants import IMAGE_SUFFIXES, MPP
from cellulib.imageio import atomic_write_bytes  # noqa: F401  (its home before imageio)
from cellulib.profiles import fingerprint, home
from cellulib.stain import StainError, StainNormalizer

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


def load_model(path: str | os.PathLike, map_location: str = "cpu"):
    """Load a model file written by :func:`save_model`; returns ``(model, info)``.

    ``info`` is a dict with ``family``, ``config``, ``meta`` and ``cellulib_version``. Torch models
    come back in eval mode. A missing, corrupt, foreign or future-format file raises
    :class:`ModelFileError` naming the file. The file is read with ``torch.load(weights_only=True)``
    (SPEC 6): a pickle that names any Python callable other than torch's tensor rebuilders, as one
    that would run code does, is refused before anything in it runs.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:  # weights_only: tensors and plain data only, so no file can run code while it loads
        payload = torch.load(path, map_location=map_location, weights_only=True)
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


#: Files of a dataset folder that decide what a model learns: images, label tables, cell XML,
#: BRCA-M2C dot files and split lists (.txt).
_DATA_SUFFIXES = frozenset(IMAGE_SUFFIXES + (".csv", ".xml", ".txt"))

#: The cellulib modules whose source decides what each model family learns. Every family is built,
#: fed (stain augmentation included) and fitted by the common ten; the segmentation loss trains
#: ``seg`` and the seg net inside ``sr`` and ``gbt``; the 81 features feed ``gbt``; validation
#: predictions go through ``predict``.
_COMMON_SOURCES = ("annotations.py", "constants.py", "data.py", "engine.py", "imageio.py",
                   "models.py", "profiles.py", "stain.py", "train.py", "transforms.py")
TRAINING_SOURCES: dict[str, tuple[str, ...]] = {
    "seg": _COMMON_SOURCES + ("losses.py",),
    "direct": _COMMON_SOURCES + ("predict.py",),
    "sr": _COMMON_SOURCES + ("losses.py", "predict.py"),
    "gbt": _COMMON_SOURCES + ("features.py", "losses.py", "predict.py"),
}

#: The installed package (this file's folder); a test points it at an edited copy.
_PACKAGE_DIR = Path(__file__).resolve().parent

# sha256 of a file's bytes by (absolute path, size, mtime_ns, ctime_ns, inode): in one process an
# unchanged file is read once, and any write (even one that keeps the size and restores the mtime)
# changes the ctime and so the key.
_FILE_DIGESTS: dict[tuple[str, int, int, int, int], bytes] = {}
# File times are coarse on many systems (a kernel tick, or a second), so a file written less than
# this long ago could be written again without its times changing: its digest is used but not
# remembered, as git does for "racily clean" files.
_SETTLED_NS = 2_000_000_000


def _read_digest(path: str) -> bytes:
    """sha256 of a file's bytes, streamed in blocks so a 2 GB folder never sits in memory."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


def _tree_digest(root: Path, relpaths: list[str]) -> str:
    """Short sha256 over each file's relative path and the sha256 of its bytes, in the given order.

    Files unchanged for a few seconds are not read again in the same process (see ``_FILE_DIGESTS``);
    the others are read by a few threads, since hashlib and file reads release the GIL.
    """
    now = time.time_ns()
    keys = []
    for rel in relpaths:
        st = os.stat(root / rel)
        keys.append((str(root / rel), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    found = {key: _FILE_DIGESTS[key] for key in keys if key in _FILE_DIGESTS}
    todo = [key for key in keys if key not in found]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found.update(zip(todo, pool.map(_read_digest, [key[0] for key in todo])))
        _FILE_DIGESTS.update((key, found[key]) for key in todo
                             if now - max(key[2], key[3]) > _SETTLED_NS)
    digest = hashlib.sha256()
    for rel, key in zip(relpaths, keys):
        digest.update(rel.encode() + b"\0" + found[key])
    return digest.hexdigest()[:12]


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
    :func:`cellulib.train` ``_provenance``); :data:`DEFAULT_PIXEL_SIZE` with ``recorded`` False
    when the file holds none. Used by ``cellulib predict``/``detect`` (``--mpp``) and ``slide``."""
    ps = (info.get("meta") or {}).get("pixel_size")
    try:
        mpp, patch = float(ps["mpp"]), int(ps["patch_px"])
        if mpp > 0 and patch > 0:
            return mpp, patch, True
    except (TypeError, KeyError, ValueError):
        pass
    return DEFAULT_PIXEL_SIZE["mpp"], DEFAULT_PIXEL_SIZE["patch_px"], False


def data_fingerprint(root: str | os.PathLike) -> str:
    """Short hash of every image, label table and cell XML in a BreastPathQ folder, pixels included.

    Hashes each file's relative path and its full bytes (the bytes hold the pixels, so nothing is
    decoded), so a cached model is never reused after the data changed, even by one pixel of one
    image with the same name and size. Files are streamed, so a 2 GB BreastPathQ copy works; in one
    process a file not changed for a few seconds is read only once, so calling this again for the
    same folder costs a ``stat`` per file. Hidden files and folders (``.DS_Store``, ``._x.tif``)
    are left out, as the data readers skip them. Used in chapters 2-5 through :mod:`cellulib.train`.
    """
    root = Path(root).resolve()
    relpaths = sorted(
        rel.as_posix() for rel in (path.relative_to(root) for path in root.rglob("*")
                                   if path.suffix.lower() in _DATA_SUFFIXES and path.is_file())
        if not any(part.startswith(".") for part in rel.parts)
    )
    return _tree_digest(root, relpaths)


def code_fingerprint(kind: str) -> str:
    """Short hash of the cellulib source files that decide how a model of ``kind`` is trained.

    ``kind`` is a cache kind of :mod:`cellulib.train`: ``seg``, ``sr``, ``gbt`` or
    ``direct-{arch}-{task}``; the part before the first ``-`` names the family, whose modules are
    listed in :data:`TRAINING_SOURCES`. Hashes each file's name and bytes, so a cached model is
    never reused after the code that trained it changed. Files are re-read only when they change
    on disk. Used in chapters 2-5 through :mod:`cellulib.train` (via :func:`cache_path`).
    """
    family = kind.split("-", 1)[0]
    if family not in TRAINING_SOURCES:
        raise ValueError(f"unknown model kind {kind!r}: its family must be one of "
                         f"{', '.join(TRAINING_SOURCES)}")
    return _tree_digest(_PACKAGE_DIR, sorted(TRAINING_SOURCES[family]))


def cache_path(kind: str, params: dict[str, Any], suffix: str = ".pt") -> Path:
    """Where the result of ``kind`` computed from ``params`` is cached (``$CELLULIB_HOME/models``).

    The key hashes ``params`` (settings, seed and the :func:`data_fingerprint` of the data),
    ``kind``, the cellulib version and the :func:`code_fingerprint` of the family's training code,
    so a cached model is never reused after the code or the data changed. Used in chapters 2-5
    through :mod:`cellulib.train`.
    """
    from cellulib import __version__

    key = fingerprint({"params": params, "kind": kind, "cellulib": __version__,
                       "code": code_fingerprint(kind)})
    folder = home() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{key}{suffix}"


def normalizer_from_options(method: str | None, target: str | Path | None = None,
                            model: Any = None) -> StainNormalizer | None:
    """The normaliser of ``--stain-norm METHOD [--stain-target IMAGE]``; None without a method.

    The target image is fitted when given. Without one, the stored reference of ``model`` (a model
    file or the ``(model, info)`` pair of :func:`cellulib.load_model`; ``meta["stain"][method]``,
    the stain of its training set, :func:`cellulib.stain.training_reference`) is used; otherwise :class:`StainError` says that
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
    # meta["stain"] maps method -> reference (cellulib.train); one bare reference is read too
    ref = (stored.get(method) if isinstance(stored, dict) and "method" not in stored else stored)
    if isinstance(ref, dict) and ref.get("method") == method:
        return StainNormalizer.from_reference(ref)
    why = (f" ({stored['unavailable']})" if isinstance(stored, dict) and "unavailable" in stored
           else "")
    raise StainError(f"--stain-norm {method} needs --stain-target IMAGE (an H&E image stained "
                     "the way the model's training data were): this model file carries no "
                     f"{method} stain reference{why}")
