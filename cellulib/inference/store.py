"""Model files and the result cache.

A model file is one ``torch.save`` archive holding the weights and everything needed to rebuild and use
the model without the book: its family and constructor arguments (``config``), the preprocessing, and
free-form metadata (training history, validation scores, data fingerprint). SPEC section 7:
``cellulib.save_model(model, path, **meta)`` and ``cellulib.load_model(path)``.

Trained models are cached under ``$CELLULIB_HOME/models`` by their training recipe (SPEC section 6),
so a later chapter reuses an earlier chapter's model instead of retraining. The recipe
(:func:`recipe`) is what decides the weights: the resolved settings (the precision and device type
actually used among them), the seed, the bytes of the data (:func:`data_fingerprint`), the recipe
version of the model family (``cellulib.training.train.RECIPE_VERSIONS``, guarded by the golden tests of
``tests/test_recipes.py``), the versions of the libraries doing the arithmetic
(:data:`RECIPE_LIBRARIES`) and the Python minor version. It is not the bytes of the source: a
docstring, comment, plot or report edit retrains nothing. Every cached model file records its recipe
(``meta["recipe"]``), so :func:`cache_entries` (``cellulib cache list``) can say whether the
running code would reuse it, and why not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cellulib.constants import IMAGE_SUFFIXES, MPP
from cellulib.data.profiles import fingerprint, home
from cellulib.data.stain import StainError, StainNormalizer
from cellulib.files.imageio import atomic_write_bytes

#: Bumped when the file layout changes; a file of another format version is refused with a clear error.
FORMAT_VERSION = 1
FORMAT_TAG = "cellulib-model"


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, of another format, or of an unknown family."""


def _build(family: str, config: dict[str, Any], booster: str | None = None):
    """Rebuild an untrained model of ``family`` from the ``config`` its factory recorded."""
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


def files_digest(paths: list[str | os.PathLike]) -> str:
    """Short sha256 over each file's absolute path and the sha256 of its bytes, in the given order
    (read once per process while unchanged, like :func:`data_fingerprint`). Used in the
    stain-shift chapter through :func:`cellulib.reporting.robustness.score_under_shifts`."""
    return _tree_digest(Path("/"), [str(Path(p).resolve()) for p in paths])


def data_fingerprint(root: str | os.PathLike) -> str:
    """Short hash of every image, label table and cell XML in a BreastPathQ folder, pixels included.

    Hashes each file's relative path and its full bytes (the bytes hold the pixels, so nothing is
    decoded), so a cached model is never reused after the data changed, even by one pixel of one
    image with the same name and size. Files are streamed, so a 2 GB BreastPathQ copy works; in one
    process a file not changed for a few seconds is read only once, so calling this again for the
    same folder costs a ``stat`` per file. Hidden files and folders (``.DS_Store``, ``._x.tif``)
    are left out, as the data readers skip them. Used in chapters 2-5 through :mod:`cellulib.training.train`.
    """
    root = Path(root).resolve()
    relpaths = sorted(
        rel.as_posix() for rel in (path.relative_to(root) for path in root.rglob("*")
                                   if path.suffix.lower() in _DATA_SUFFIXES and path.is_file())
        if not any(part.startswith(".") for part in rel.parts)
    )
    return _tree_digest(root, relpaths)


#: Bumped when the layout of a recipe (what :func:`recipe` puts in a key) changes.
KEY_SCHEME = 1

#: The installed distributions whose arithmetic decides the weights of each model family: torch
#: and torchvision (every layer), fastai (the training loop, schedules, metrics), albumentations
#: (augmentation), numpy and OpenCV (every resize, disc mask and crop of the pipeline),
#: scikit-image (the HED colour deconvolution of stain augmentation); timm builds the Xception
#: direct model; LightGBM and SciPy (the spatial features) fit the GBT route. A different version
#: of any of them makes a different recipe. pandas and the plotting libraries only move numbers
#: around and are not part of it.
_COMMON_LIBRARIES = ("torch", "torchvision", "fastai", "albumentations", "numpy", "opencv",
                     "scikit-image")
RECIPE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "seg": _COMMON_LIBRARIES,
    "direct": _COMMON_LIBRARIES + ("timm",),
    "sr": _COMMON_LIBRARIES,
    "gbt": _COMMON_LIBRARIES + ("lightgbm", "scipy"),
}
_OPENCV_DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                         "opencv-contrib-python")


@functools.cache
def library_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``opencv``: whichever OpenCV wheel is
    installed), or None when it is not installed. Read from the package metadata, so nothing is
    imported."""
    from importlib import metadata

    for dist in _OPENCV_DISTRIBUTIONS if name == "opencv" else (name,):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _family(kind: str) -> str:
    family = kind.split("-", 1)[0]
    if family not in RECIPE_LIBRARIES:
        raise ValueError(f"unknown model kind {kind!r}: its family must be one of "
                         f"{', '.join(RECIPE_LIBRARIES)}")
    return family


def recipe(kind: str, params: dict[str, Any], version: int) -> dict[str, Any]:
    """The training recipe of a cached model, with its ``key`` (a short hash of the rest).

    ``kind`` is a cache kind of :mod:`cellulib.training.train`: ``seg``, ``sr``, ``gbt`` or
    ``direct-{arch}-{task}``; the part before the first ``-`` names the family. ``params`` are the
    resolved settings (precision and device type as actually used), the seed and the
    :func:`data_fingerprint`; ``version`` is the family's recipe version
    (``cellulib.training.train.RECIPE_VERSIONS``). The versions of the family's :data:`RECIPE_LIBRARIES` and
    the Python minor version are added here. The result holds plain JSON values only (stored as a
    model file's ``meta["recipe"]``). Used in chapters 2-5 through :mod:`cellulib.training.train`.
    """
    family = _family(kind)
    parts = {"scheme": KEY_SCHEME, "kind": kind, "family": family, "version": int(version),
             "params": params,
             "libraries": {name: library_version(name) for name in RECIPE_LIBRARIES[family]},
             "python": "{}.{}".format(*sys.version_info[:2])}
    parts = json.loads(json.dumps(parts, sort_keys=True, default=str))  # plain JSON values
    return {"key": fingerprint(parts), **parts}


def cache_path(kind: str, params: dict[str, Any], version: int, suffix: str = ".pt") -> Path:
    """Where the model of ``kind`` trained with ``params`` under recipe ``version`` is cached:
    ``$CELLULIB_HOME/models/{kind}-{key}.pt``, the key of its :func:`recipe`. Used in chapters 2-5
    through :mod:`cellulib.training.train`."""
    folder = home() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{recipe(kind, params, version)['key']}{suffix}"


def recipe_mismatch(recorded: Any, versions: dict[str, int]) -> list[str]:
    """Why a model file's recorded recipe (``meta["recipe"]``) would not be reused by the running
    code: each reason a short phrase; an empty list when it would.

    Compares the key scheme, the family's recipe version with ``versions``
    (``cellulib.training.train.RECIPE_VERSIONS``), the library versions with the installed ones and the
    Python minor version, and checks that the key is the hash of the recorded parts. The settings
    and data are not judged: another profile, seed or dataset makes another, equally valid, file.
    Used by :func:`cache_entries` and by :mod:`cellulib.training.train` before it reuses a file.
    """
    if not isinstance(recorded, dict) or "key" not in recorded:
        return ["no recipe recorded (written before recipe keys, when the cache was keyed on "
                "the bytes of the source)"]
    parts = {k: v for k, v in recorded.items() if k != "key"}
    if recorded.get("scheme") != KEY_SCHEME:
        return [f"recipe key scheme {recorded.get('scheme')}, this cellulib writes {KEY_SCHEME}"]
    if fingerprint(parts) != recorded["key"]:
        return ["its recipe key is not the hash of its recorded recipe (the file was edited)"]
    family = recorded.get("family")
    if family not in versions:
        return [f"unknown model family {family!r}"]
    why = []
    if recorded.get("version") != versions[family]:
        why.append(f"{family} recipe version {recorded.get('version')}, the code's is "
                   f"{versions[family]}")
    libraries = recorded.get("libraries") or {}
    for name in sorted(set(libraries) | set(RECIPE_LIBRARIES[family])):
        had, have = libraries.get(name), library_version(name)
        if had != have:
            why.append(f"{name} {had or 'absent'}, installed {have or 'absent'}")
    python = "{}.{}".format(*sys.version_info[:2])
    if recorded.get("python") != python:
        why.append(f"Python {recorded.get('python')}, running {python}")
    return why


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """A model file's ``family``, ``config``, ``meta`` and ``cellulib_version`` without loading
    its weights (the archive is memory-mapped, so this is fast for any size). Raises
    :class:`ModelFileError` naming the file when it is not a readable cellulib model file. Used by
    :func:`cache_entries`."""
    payload = _read_payload(Path(path), mmap=True)
    return {k: payload.get(k) for k in ("family", "config", "meta", "cellulib_version")}


#: A leftover temporary file of an interrupted write older than this is listed for pruning.
_STALE_TMP_S = 3600


def cache_entries(versions: dict[str, int], folder: str | os.PathLike | None = None,
                  derived_versions: dict[str, int] | None = None,
                  derived_folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every model file of the cache (``$CELLULIB_HOME/models`` unless ``folder``), oldest first.

    With ``derived_versions`` (the code versions of derived results, e.g. ``{"inference": 1,
    "shift": 1}``) the derived-results files of :func:`derived_frame` follow, family
    ``"derived"``: current when the versions they record match and every model they were computed
    from is a current model file of the cache.

    Each entry: ``path``, ``family``, ``kind``, ``key`` (from the file name), ``bytes``, ``age_s``
    (seconds since written), ``current`` (whether the running code, with ``versions``, i.e.
    ``cellulib.training.train.RECIPE_VERSIONS``, and these library versions would reuse it) and ``why``
    (the reasons it would not, joined by ``"; "``; empty when current; see
    :func:`recipe_mismatch`). Unreadable files and temporary files of interrupted writes (over an
    hour old) are listed as not current. Used by ``cellulib cache list`` and ``cache prune``.
    """
    folder = Path(folder) if folder is not None else home() / "models"
    now = time.time()
    paths = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    stale = [p for p in sorted(folder.glob(".*.tmp")) if now - p.stat().st_mtime > _STALE_TMP_S
             ] if folder.is_dir() else []
    entries = []
    for path in paths + stale:
        st = path.stat()
        kind, _, key = path.stem.rpartition("-")
        entry = {"path": str(path), "family": kind.split("-", 1)[0] or None, "kind": kind or None,
                 "key": key or None, "bytes": st.st_size, "age_s": round(now - st.st_mtime, 1),
                 "current": False, "why": ""}
        if path.suffix == ".tmp":
            entry.update(family=None, kind=None, key=None, why="an interrupted write")
            entries.append(entry)
            continue
        try:
            info = read_info(path)
        except ModelFileError as exc:
            entry["why"] = str(exc).removeprefix(f"{path}: ")
            entries.append(entry)
            continue
        recorded = (info.get("meta") or {}).get("recipe")
        why = recipe_mismatch(recorded, versions)
        if not why and recorded["key"] != key:
            why = [f"its name says key {key}, it records {recorded['key']}"]
        if isinstance(recorded, dict):
            entry["family"], entry["kind"] = recorded.get("family"), recorded.get("kind")
        entry.update(current=not why, why="; ".join(why))
        entry["weights"] = ((info.get("meta") or {}).get("derived") or {}).get("weights")
        entries.append(entry)
    entries.sort(key=lambda e: -e["age_s"])
    if derived_versions is not None:
        current = {e["weights"] for e in entries if e.get("weights") and e["current"]}
        entries += sorted(_derived_entries(_derived_folder(derived_folder), derived_versions,
                                           current, now), key=lambda e: -e["age_s"])
    for e in entries:
        e.pop("weights", None)
    return entries


def prune_cache(versions: dict[str, int], dry_run: bool = False,
                folder: str | os.PathLike | None = None,
                derived_versions: dict[str, int] | None = None,
                derived_folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Remove the model files (and, with ``derived_versions``, the derived-results files) of the
    cache that are not current (see :func:`cache_entries`); returns their entries. With
    ``dry_run`` nothing is removed. Used by ``cellulib cache prune``."""
    gone = [e for e in cache_entries(versions, folder, derived_versions, derived_folder)
            if not e["current"]]
    if not dry_run:
        for entry in gone:
            Path(entry["path"]).unlink(missing_ok=True)
    return gone


#: Bumped when the layout of a derived-results file (:func:`derived_frame`) changes.
DERIVED_SCHEME = 1


def _derived_folder(folder: str | os.PathLike | None = None) -> Path:
    return Path(folder) if folder is not None else home() / "derived"


def derived_frame(kind: str, parts: dict[str, Any], weights: list[str], versions: dict[str, int],
                  compute: Any, libraries: tuple[str, ...] = _COMMON_LIBRARIES,
                  folder: str | os.PathLike | None = None) -> Any:
    """A table computed from trained models (e.g. every model's scores under every shift), stored
    in ``$CELLULIB_HOME/derived`` and read back instead of recomputed when nothing it depends on
    changed.

    Its key is made of ``parts`` (what was computed, on which data, with which settings), the
    :func:`weights_digest` of each model it ran (``weights``), the code ``versions`` whose output it
    is (e.g. ``cellulib.inference.predict.INFERENCE_VERSION``), the versions of ``libraries`` and the Python
    minor version, so an edit to a docstring, a plot or a report leaves it valid and a retrained
    model, a new inference version or another library version does not. ``compute()`` returns the
    pandas DataFrame; it is written atomically, column by column with its dtypes, to a NumPy
    ``.npz`` file (no pickle: strings, numbers and booleans only). An unreadable file is computed
    again, with a warning naming it. ``cellulib cache list`` lists these files, and ``cache
    prune`` removes those whose models are no longer current. Used in the stain-shift chapter
    through :func:`cellulib.reporting.robustness.score_under_shifts`.
    """
    import warnings
    import zipfile

    import numpy as np
    import pandas as pd

    record = {"scheme": DERIVED_SCHEME, "kind": kind, "parts": parts,
              "weights": sorted(set(weights)), "versions": dict(versions),
              "libraries": {name: library_version(name) for name in libraries},
              "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    record = json.loads(json.dumps(record, default=str))  # plain JSON values, as stored
    path = _derived_folder(folder) / f"{kind}-{fingerprint(record)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                columns = [str(c) for c in stored["__columns__"]]
                frame = pd.DataFrame({c: stored[f"c{i}"] for i, c in enumerate(columns)})
            return frame
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            warnings.warn(f"{path}: not readable ({exc}): computing it again", stacklevel=2)
    frame = compute()
    arrays = {"__record__": np.array(json.dumps(record)),
              "__columns__": np.array([str(c) for c in frame.columns])}
    for i, column in enumerate(frame.columns):
        values = frame[column].to_numpy()
        arrays[f"c{i}"] = values.astype(str) if values.dtype == object else values
    atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))
    return frame


def _derived_entries(folder: Path, versions: dict[str, int], current_weights: set[str],
                     now: float) -> list[dict[str, Any]]:
    import numpy as np

    entries = []
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        st = path.stat()
        kind, _, key = path.stem.rpartition("-")
        entry = {"path": str(path), "family": "derived", "kind": kind or None, "key": key or None,
                 "bytes": st.st_size, "age_s": round(now - st.st_mtime, 1), "current": False,
                 "why": ""}
        try:
            with np.load(path, allow_pickle=False) as stored:
                record = json.loads(str(stored["__record__"]))
        except Exception as exc:  # noqa: BLE001 - any damage: listed as not current
            entry["why"] = f"not readable ({type(exc).__name__})"
            entries.append(entry)
            continue
        why = [f"{name} version {record['versions'].get(name)}, now {v}"
               for name, v in versions.items() if name in record["versions"]
               and record["versions"][name] != v]
        missing = [w for w in record.get("weights", []) if w not in current_weights]
        if missing:
            why.append(f"computed from weights no current model file holds ({', '.join(missing)})")
        entry.update(current=not why, why="; ".join(why))
        entries.append(entry)
    return entries


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


def normalizer_from_options(method: str | None, target: str | Path | None = None,
                            model: Any = None) -> StainNormalizer | None:
    """The normaliser of ``--stain-norm METHOD [--stain-target IMAGE]``; None without a method.

    The target image is fitted when given. Without one, the stored reference of ``model`` (a model
    file or the ``(model, info)`` pair of :func:`cellulib.load_model`; ``meta["stain"][method]``,
    the stain of its training set, :func:`cellulib.data.stain.training_reference`) is used; otherwise :class:`StainError` says that
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
