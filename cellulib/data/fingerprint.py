"""Fingerprints: of an object (a short stable hash of its JSON) and of data: the digest of a folder's data files (images, tables, annotations) that
keys every cached model, read once per file and cached by size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cellulib.constants import IMAGE_SUFFIXES

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


def fingerprint(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-serialisable object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
