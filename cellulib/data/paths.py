"""Where things live: generated data and cached models under ``$CELLULIB_HOME``, the real H&E
data under ``$CELLULIB_REAL_DATA`` (or ``shared/data/real`` beside a checkout), and the sentence a
chapter prints when real data is missing. Used in every chapter.
"""

from __future__ import annotations

import os
from pathlib import Path


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
