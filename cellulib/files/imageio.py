"""Image files: reading any TIFF, PNG or JPEG as RGB8, finding the images in folders, reading CSV
tables as strings, and writing output files atomically.

Every bad input raises `DataError` (a `ValueError`) or warns with `DataWarning`, and the message
names the file and the problem. Whole-slide images are read by :mod:`cellulib.inference.slide`.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile
from PIL import Image

from cellulib.constants import IMAGE_SUFFIXES, TIFF_MAGIC

__all__ = ["DataError", "DataWarning", "read_image", "to_rgb8", "collect_images", "read_csv_strings",
           "atomic_open", "check_writable",
           "atomic_write_bytes", "atomic_write_text", "write_bytes_if_changed", "jsonable",
           "figure_png"]

PathLike = str | os.PathLike


_N_LISTED = 5  # how many offending files an error or warning names before "..."


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


class DataWarning(UserWarning):
    """Suspicious but usable input data (unknown cell descriptions, unlabelled images, ...)."""


def listing(items: Sequence[Any], n: int = _N_LISTED) -> str:
    """The first ``n`` items, comma-separated, then how many there are in all: what an error or a
    warning about many files shows."""
    shown = ", ".join(str(i) for i in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def read_image(path: str | Path) -> np.ndarray:
    """Read a TIFF, PNG or JPEG image as an (H, W, 3) uint8 RGB array.

    Implements the image side of SPEC 1.1 and 1.3; used in chapter 1 (data exploration) and by every
    DataLoader and `cellulib predict`.

    TIFF files (recognised by their magic bytes, not their suffix) are read with tifffile: the first
    series at its full-resolution level, so pyramidal / OME-TIFF files give level 0; LZW, Deflate and
    JPEG compression are decoded by imagecodecs; min-is-white and palette images are converted. Other
    formats are read with Pillow. Conversions:

    * greyscale -> the grey value repeated in the three channels;
    * RGBA / grey+alpha -> alpha composited onto white (transparent pixels are no tissue, and white
      is the slide background; fully opaque images are unchanged);
    * 16-bit -> 8-bit by ``round(v / 257)``, so 0 -> 0, 65535 -> 255 and ``257 * k -> k`` exactly
      (Pillow reduces 16-bit *RGB* PNGs to 8 bits itself);
    * float images must lie in [0, 1] and are scaled by 255; a multi-plane stack gives its first
      plane with a `DataWarning`.

    Parameters
    ----------
    path : str or Path
        Image file.

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8, C-contiguous.

    Raises
    ------
    DataError
        Missing, empty, truncated, corrupt or non-image file, or an unsupported pixel layout; the
        message names the file.

    Examples
    --------
    >>> img = read_image("datasets/train/99788_1.tif")  # doctest: +SKIP
    >>> img.shape, img.dtype  # doctest: +SKIP
    ((512, 512, 3), dtype('uint8'))
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot open image file ({e})") from e
    if not head:
        raise DataError(f"{path}: empty file, not an image")
    if head[:4] in TIFF_MAGIC:
        arr = _read_tiff(path)
    else:
        arr = _read_pil(path)
    return to_rgb8(arr, path)


class _QuietWhileReading(logging.Filter):
    """Drops the tifffile log records of the threads that are inside :func:`_tifffile_quiet`.

    Installed once on tifffile's logger: setting the logger's level around every read would do
    the same, but ``Logger.setLevel`` clears the cache of every logger of the process, which cost
    about 0.2 ms an image (a fifth of reading a small TIFF; measured with cProfile on
    ``python -m cellulib.bench --quick --cases predict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0) or record.levelno >= logging.ERROR


_TIFF_LOG_FILTER = _QuietWhileReading()
logging.getLogger("tifffile").addFilter(_TIFF_LOG_FILTER)


@contextlib.contextmanager
def _tifffile_quiet() -> Iterator[None]:
    """tifffile logs what it finds broken in a file as a warning; the DataError raised for that
    file says it in one line, so its log stays quiet meanwhile (in this thread; errors still
    pass)."""
    local = _TIFF_LOG_FILTER.local
    local.depth = getattr(local, "depth", 0) + 1
    try:
        yield
    finally:
        local.depth -= 1


def _read_tiff(path: Path) -> np.ndarray:
    try:
        with _tifffile_quiet(), tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 1:
                # one image (the common patch): read its page directly; working out the series
                # first costs half as long again as the read (measured on 256 px RGB patches)
                level = page = tif.pages.first
            else:
                if not tif.series:
                    raise DataError(f"{path}: TIFF file holds no image")
                series = tif.series[0]
                level = series.levels[0] if series.levels else series
                page = level.keyframe
            photometric = int(page.photometric)
            colormap = page.colormap
            arr = level.asarray()
            axes = level.axes
    except DataError:
        raise
    except Exception as e:  # tifffile/imagecodecs raise many types for broken files
        raise DataError(f"{path}: corrupt, truncated or unreadable TIFF ({e})") from e

    if photometric not in (0, 1, 2, 3, 6):  # not min-is-white/black, RGB, palette or YCbCr
        # CMYK, CIELab, ...: Pillow knows the colour conversions.
        return _read_pil(path)
    arr = _reduce_axes(arr, axes, path)
    if photometric == 0:  # min-is-white: invert so that 0 is black
        arr = ~arr if arr.dtype == bool else (
            np.iinfo(arr.dtype).max - arr if arr.dtype.kind in "ui" else 1.0 - arr)
    elif photometric == 3:
        if colormap is None or arr.ndim != 2:
            raise DataError(f"{path}: palette TIFF without a usable colour map")
        cmap = np.asarray(colormap)
        if arr.max(initial=0) >= cmap.shape[1]:
            raise DataError(f"{path}: palette index outside the colour map")
        arr = np.moveaxis(cmap[:, arr], 0, -1)  # (H, W, 3), 16-bit colour map
    return arr


def _reduce_axes(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Bring a tifffile array with named axes to (Y, X) or (Y, X, channels)."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes or len(axes) != arr.ndim:
        raise DataError(f"{path}: unsupported TIFF layout (axes {axes!r}, shape {arr.shape})")
    index: list[Any] = []
    kept = ""
    for ax, n in zip(axes, arr.shape):
        if ax in "YXSC" or n == 1:
            index.append(slice(None) if ax in "YXSC" else 0)
            kept += ax if ax in "YXSC" else ""
        else:
            warnings.warn(f"{path}: {n} planes along TIFF axis {ax!r}; reading the first",
                          DataWarning, stacklevel=4)
            index.append(0)
    arr = arr[tuple(index)]
    # S (samples) and C (OME channels) both mean colour; drop singleton ones, then order YX(S).
    for ax in "CS":
        if ax in kept and len(kept) == 4 and arr.shape[kept.index(ax)] == 1:
            arr = arr.squeeze(kept.index(ax))
            kept = kept.replace(ax, "")
    chan = [i for i, ax in enumerate(kept) if ax in "SC"]
    if len(chan) > 1:
        raise DataError(f"{path}: unsupported TIFF layout (axes {axes!r}, shape {arr.shape})")
    order = [kept.index("Y"), kept.index("X")] + chan
    return np.transpose(arr, order)


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if mode == "1" else "RGB")
            elif mode in ("RGBa", "La", "PA"):
                im = im.convert("RGBA")
            arr = np.array(im)
    except Exception as e:  # Pillow: UnidentifiedImageError, OSError, SyntaxError, DecompressionBomb
        raise DataError(f"{path}: not a readable image (corrupt, truncated or not an image: {e})") \
            from e
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(f"{path}: 32-bit integer image with values outside [0, 65535]")
    if mode == "I":
        arr = arr.astype(np.uint16)  # Pillow opens some 16-bit greyscale PNGs as 32-bit
    return arr


def to_rgb8(arr: np.ndarray, path: PathLike) -> np.ndarray:
    """Pixels as decoded -> (H, W, 3) uint8 RGB: 16 bits scaled by ``round(v / 257)``, floats in
    [0, 1] by 255, grey repeated, alpha composited onto white (the colour of glass). ``path`` names
    the source in errors. Shared by `read_image` and the whole-slide readers."""
    if not arr.dtype.isnative:  # big-endian TIFF/PNG samples
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise DataError(f"{path}: unsupported image shape {arr.shape} (expected grey, RGB or RGBA)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: image has no pixels (shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise DataError(f"{path}: floating-point image with values outside [0, 1]")
        arr = np.rint(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {arr.dtype} (expected 8 or 16 bit)")
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] in (2, 4):  # grey+alpha or RGBA: composite onto white
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        color = arr[..., :-1].astype(np.float32)
        if color.shape[2] == 1:
            color = np.repeat(color, 3, axis=2)
        arr = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def collect_images(paths: PathLike | Sequence[PathLike], recursive: bool = False) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to their images.

    A folder contributes its files ending in :data:`IMAGE_SUFFIXES` (sorted by name; hidden files
    skipped; subfolders too when ``recursive``). A named file is kept whatever its suffix (a bad
    one becomes an error row). Used by ``cellulib predict``.

    Raises
    ------
    ValueError
        A folder without images, or nothing to score; the message names the folder.
    FileNotFoundError
        A path that does not exist and has no image suffix (a mistyped folder); a missing file
        with an image suffix is kept, to become an error row beside the others.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            pattern = p.rglob("*") if recursive else p.iterdir()
            found = sorted(f for f in pattern if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise ValueError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this "
                                 f"folder{' or its subfolders' if recursive else ''}")
            out.extend(found)
        elif not p.exists() and p.suffix.lower() not in IMAGE_SUFFIXES:
            # a mistyped folder (or a file no reader would take): nothing to give an error row to
            raise FileNotFoundError(errno.ENOENT, "no such image file or folder", str(p))
        else:
            out.append(p)
    if not out:
        raise ValueError("no images given")
    return out


def read_csv_strings(path: PathLike, what: str = "", *, keep_default_na: bool = True,
                     missing: type[Exception] = DataError):
    """A CSV file as a DataFrame of strings with stripped column names; every failure is an error
    that names the file.

    ``what`` names the file's role in the not-found message (``labels file not found``) and
    ``missing`` is the error raised then; an empty or unparsable file raises `DataError`.
    ``keep_default_na=False`` keeps empty cells as ``""`` instead of NaN. Used by
    :mod:`cellulib.data.breastpathq` (label and patient-id files) and :mod:`cellulib.reporting.evaluation` (predictions
    and labels).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise missing(f"{path}: {what + ' ' if what else ''}file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=keep_default_na, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV file (expected a header row)") from None
    except Exception as exc:  # noqa: BLE001 - ParserError, UnicodeDecodeError, ...
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


#: The errors of a write that found no room: no space left, quota exceeded, file too large.
_FULL = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


def check_writable(path: PathLike, *, folder: bool = False) -> None:
    """Refuse, naming ``path``, an output that cannot be written: a folder where a file is to go
    (with ``folder``, a file where a folder is to go), a path below a file, or a folder without
    write permission. Missing folders are fine: the writers create them. Called by
    :func:`atomic_open`, and by the command line before any work starts."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    if not folder and path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(path))
    above = next(p for p in (path, *path.parents) if p.exists()) if folder else \
        next((p for p in path.parents if p.exists()), None)
    if above is None:
        return
    if not above.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot be written: {above} is a file, not a folder",
                                 str(path))
    if not os.access(above, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot be written: no permission to write in {above}",
                              str(path))


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing and rename it into place when the block
    ends without an error, so a crash never leaves a half-written file and an interrupted run
    leaves any previous ``path`` untouched. Rows can be streamed into it (``cellulib predict`` and
    ``detect``); ``kwargs`` go to :func:`open` (``newline=""``, ``encoding=``)."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, f"cannot be written ({exc.strerror} in {path.parent})",
                      str(path)) from exc
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in _FULL and exc.filename is None:  # a full disk names no file: name ours
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes | Callable[[IO], Any]) -> Path:
    """Write ``data`` (bytes, or ``data(fileobj)`` writes them) to a temporary file beside ``path``
    and rename it into place, so a crash never leaves a half-written file (see `atomic_open`)."""
    with atomic_open(path, "wb") as fh:
        if callable(data):
            data(fh)
        else:
            fh.write(data)
    return Path(path)


def write_bytes_if_changed(path: PathLike, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically (`atomic_write_bytes`) unless the file already holds
    exactly these bytes; returns whether it wrote.

    Outputs that a re-run derives again (the real-tissue windows cut from BRCA-M2C, written by the
    real-tissue chapter and the discussion alike) then keep their files and times, so a chapter
    that only read what was there counts as run from the cache (`cellulib.bench.bookstatus`)."""
    target = Path(path)
    try:
        if target.stat().st_size == len(data) and target.read_bytes() == data:
            return False
    except OSError:
        pass  # missing or unreadable: write it
    atomic_write_bytes(target, data)
    return True


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """Config dicts may hold tuples, numpy scalars or paths: make them JSON values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def figure_png(fig: Any, dpi: int = 120) -> bytes:
    """A matplotlib figure rendered to PNG bytes (tight bounding box): the book's glued figures
    and ``cellulib slide``'s heatmap."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
