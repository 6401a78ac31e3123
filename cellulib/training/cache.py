"""The training cache: trained models under ``$CELLULIB_HOME/models`` by their training recipe
(SPEC section 6), and derived outputs (predictions of cached models) under
``$CELLULIB_HOME/derived``, so a later chapter reuses an earlier chapter's work instead of redoing it.

The recipe (:func:`recipe`) is what decides the weights: the resolved settings (the precision and
device type actually used among them), the seed, the bytes of the data
(:func:`cellulib.data.fingerprint.data_fingerprint`), the recipe version of the model family
(``cellulib.training.train.RECIPE_VERSIONS``, guarded by the golden tests of
``tests/test_recipes.py``), the versions of the libraries doing the arithmetic
(:data:`RECIPE_LIBRARIES`) and the Python minor version. It is not the bytes of the source: a
docstring, comment, plot or report edit retrains nothing. Every cached model file records its recipe
(``meta["recipe"]``), so :func:`cache_entries` (``cellulib cache list``) can say whether the
running code would reuse it, and why not.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cellulib.data.fingerprint import fingerprint
from cellulib.data.paths import home
from cellulib.files.imageio import atomic_write_bytes
from cellulib.inference.modelfile import ModelFileError, read_info

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
    :func:`cellulib.data.fingerprint.data_fingerprint`; ``version`` is the family's recipe version
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
    :func:`cellulib.inference.modelfile.weights_digest` of each model it ran (``weights``), the
    code ``versions`` whose output it
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
