"""The dataset a chapter reads: the real BreastPathQ folder when given, else the synthetic set of a
profile and seed, generated once under ``$CELLULIB_HOME/synth`` and reused. Used in every chapter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cellulib.data.fingerprint import fingerprint
from cellulib.data.paths import home
from cellulib.data.profiles import PROFILES, get_profile


def synthetic_params(profile: str = "quick", seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The arguments of :func:`cellulib.data.synthset.make_breastpathq` for a profile.

    ``generator`` among the overrides picks the generator's parameters
    (:data:`cellulib.data.synth.GENERATORS`); the default one is left out of the arguments, so the
    sets rendered before it existed keep their folder."""
    from cellulib.data.synth import GENERATORS

    get_profile(profile)  # a clear error for an unknown profile
    settings = get_profile(profile, **{k: v for k, v in overrides.items() if k in PROFILES[profile]})
    params = {k: settings[k] for k in ("n_train", "n_val", "n_cells", "size")} | {"seed": int(seed)}
    generator = overrides.get("generator") or "default"
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    return params if generator == "default" else params | {"generator": generator}


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
    and reused by every chapter afterwards; processes that ask for it at the same time wait for the
    one that generates it (a file lock beside the folder). Used in every chapter.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir {root} does not exist; give the folder that holds BreastPathQ's "
                "'datasets/' (train/, validation/, train_labels.csv, val_labels.csv, cells/)"
            )
        return root
    from filelock import FileLock

    from cellulib.data import synthset

    params = synthetic_params(profile, seed, **overrides)
    root = synthetic_root(profile, seed, **overrides)
    if synthetic_ready(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Chapters executed side by side ask for the same set: one process generates it, the others
    # wait for it (without the lock each would delete the other's half-written folder).
    with FileLock(str(root) + ".lock"):
        if synthetic_ready(root):
            return root
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        synthset.make_breastpathq(tmp, progress=progress, **params)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root
