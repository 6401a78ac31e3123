"""Cellularity maps of large images: tiled and pyramidal TIFF/OME-TIFF, OpenSlide formats, PNG/JPEG.

``cellulib slide --model M IMAGE --out DIR`` applies a patch model of the paper (sections 3.2-3.4)
to a whole slide or a large field: the image is cut into square tiles, background tiles are skipped,
tissue tiles are scored in batches, and the result is written as ``DIR/tiles.csv`` (one row per
tile of the grid), ``DIR/heatmap.png`` (the map over a thumbnail) and ``DIR/slide.json`` (how it was
made). Every file is written atomically.

Reading uses maintained libraries only: a TIFF pyramid level is tifffile's zarr store
(``series.aszarr(level=i)``) opened with zarr, and a region is a slice of that array, so tifffile
and imagecodecs read and decode only the tiles or strips that the region covers (JPEG, LZW,
Deflate, ... as tifffile supports them) and memory stays flat for any slide size; openslide-python
reads the vendor formats (SVS, NDPI, MRXS, ...) when it is installed; other images are read whole
with :func:`cellulib.files.imageio.read_image`.

Scale. A BreastPathQ patch is 512 x 512 pixels of a slide scanned at 20x (about 0.5 um/px), and
the models saw such patches resized to their ``input_size`` S; a model file records the pixel size
and patch side of its training images (``meta["pixel_size"]``). By default a tile covers that
field of view: ``patch_px * mpp`` micrometres, converted with the pixel size the image records
(OME-TIFF PhysicalSizeX, Aperio MPP, TIFF resolution; ``mpp`` overrides it), so a 40x scan gets
tiles twice as many pixels wide and the model sees nuclei at the size it learned them. A tile is
read from the coarsest pyramid level that still has at least S pixels across it (no upsampling,
least decoding) and resized to S x S with ``cv2.INTER_AREA``. ``tile_um`` or ``tile`` (pixels) set
the tile explicitly.

Tissue. A thumbnail (long side at most 2048 pixels) is thresholded on HSV saturation: glass is grey
or white (saturation below about 15/255), stained tissue is pink or purple. The threshold is Otsu's,
clamped to [15, 30] so that a field that is all tissue (Otsu would split pale from dark tissue) or
nearly all glass is not cut in two; a morphological opening and closing remove specks and holes.
A tile is scored when at least ``min_tissue`` of its area is tissue.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cellulib.constants import TIFF_MAGIC
from cellulib.files.imageio import (
    DataError,
    atomic_write_bytes,
    atomic_write_text,
    figure_png,
    jsonable,
    read_image,
    to_rgb8,
)

__all__ = [
    "SlideWarning",
    "open_slide",
    "tissue_mask",
    "tile_grid",
    "slide_map",
    "heatmap_figure",
]

_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}
_THUMB_SIDE = 2048
_BLOCK = 2048  # side of the blocks a thumbnail is assembled from (bounded memory)
_PIECE = 256  # a block that fails to decode is retried in pieces of this side
_DECODE_THREADS = 2  # > 1: the zarr store decodes tiles in zarr's thread pool, not on its loop
_SATURATION_CLAMP = (15.0, 30.0)


class SlideWarning(UserWarning):
    """A slide that is usable with a caveat: extra planes ignored, no tissue found, a bad block."""


# --------------------------------------------------------------------------------------------
# readers: level geometry and read_region(level, x, y, w, h) -> (h, w, 3) uint8


class _Reader:
    """Common geometry: ``dims[level] = (width, height)``, ``downsamples[level]`` vs level 0."""

    kind = "?"
    dims: list[tuple[int, int]]
    mpp: float | None = None

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def downsamples(self) -> list[float]:
        w0, h0 = self.dims[0]
        return [(w0 / w + h0 / h) / 2 for w, h in self.dims]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ArrayReader(_Reader):
    """A whole image in memory (PNG, JPEG, or a TIFF layout the tile reader does not handle)."""

    kind = "image"

    def __init__(self, path: Path, img: np.ndarray | None = None) -> None:
        super().__init__(path)
        self.img = read_image(path) if img is None else img
        self.dims = [(self.img.shape[1], self.img.shape[0])]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.img[y:y + h, x:x + w]


#: The oldest tifffile and zarr whose zarr stores this reader uses (pyproject.toml): older
#: tifffile writes zarr-2 stores without the axes attribute read below.
_MIN_VERSIONS = {"tifffile": (2025, 5, 26), "zarr": (3, 1, 5)}


def _check_versions(*modules) -> None:
    """An ImportError that names the package to upgrade, instead of an error deep in a TIFF read."""
    for module in modules:
        found = tuple(int(p) for p in re.findall(r"\d+", module.__version__)[:3])
        need = _MIN_VERSIONS[module.__name__]
        if found < need:
            want = ".".join(map(str, need))
            raise ImportError(f"reading TIFF slides needs {module.__name__} >= {want}, found "
                              f"{module.__version__}: pip install '{module.__name__}>={want}'")


class _TiffReader(_Reader):
    """Regions of a tiled or stripped (pyramidal) TIFF through tifffile's zarr interface.

    Each pyramid level is ``series.aszarr(level=i)`` (a ``ZarrTiffStore``) opened with
    ``zarr.open``; slicing it reads and decodes only the tiles or strips that the region covers
    and keeps nothing between reads. A missing (sparse) tile or strip reads as the largest sample
    value: white, the colour of glass. Several threads may read regions at once: zarr runs every
    read on its one I/O event loop, where the store reads the file under the file handle's lock,
    and decodes the chunks in zarr's thread pool.
    """

    kind = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        _check_versions(tifffile, zarr)
        super().__init__(path)
        self.tif = None
        self._stores: list = []
        self._levels: list[tuple[Any, tuple, bool]] = []  # (zarr array, plane index, planar)
        self.dims = []
        planes = None
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            levels = list(series.levels) or [series]
            for i, level in enumerate(levels):
                key = level.keyframe
                if not self._supported(key):
                    if i == 0:
                        raise _Unsupported
                    break  # keep the readable finer levels
                store = series.aszarr(level=i, fillvalue=np.iinfo(key.dtype).max,
                                      maxworkers=_DECODE_THREADS)
                self._stores.append(store)
                arr = zarr.open(store, mode="r")
                axes = "".join(arr.attrs["_ARRAY_DIMENSIONS"])
                yx = axes.find("YX")
                planar = yx > 0 and axes[yx - 1] == "S"  # samples in separate planes: SYX
                if yx < 0 or axes[yx + 2:] not in ("", "S") or len(axes) != arr.ndim:
                    if i == 0:
                        raise _Unsupported
                    break
                if i == 0 and int(np.prod(level.shape)) > int(np.prod(key.shape)):
                    planes = level.axes
                self._levels.append((arr, (0,) * (yx - planar), planar))
                self.dims.append((int(arr.shape[yx + 1]), int(arr.shape[yx])))
        except _Unsupported:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types for broken files
            self.close()
            raise DataError(f"{path}: corrupt, truncated or unreadable TIFF ({exc})") from None
        if planes is not None:
            warnings.warn(f"{path}: the image has several planes (axes {planes}); the first is "
                          "used", SlideWarning, stacklevel=3)
        self.mpp = _tiff_mpp(self.tif)

    @staticmethod
    def _supported(key) -> bool:
        # grey or RGB (with alpha) of 8 or 16 bits, or JPEG-compressed YCbCr (tifffile converts
        # it to RGB); samples interleaved or, for grey and RGB, in separate planes (the zarr array
        # is then S, Y, X). Palette, min-is-white, CMYK, Lab, float, 1-, 4- or 32-bit, volumes:
        # read whole by read_image.
        photometric = int(key.photometric)
        jpeg_ycbcr = photometric == 6 and int(key.compression) in _JPEG_COMPRESSIONS
        return ((photometric in (1, 2) or jpeg_ycbcr)
                and (key.planarconfig == 1 or photometric in (1, 2))
                and key.imagedepth == 1 and key.bitspersample in (8, 16)
                and key.sampleformat == 1 and key.samplesperpixel in (1, 2, 3, 4))

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr, plane, planar = self._levels[level]
        width, length = self.dims[level]
        x, y = max(0, min(x, width - w)), max(0, min(y, length - h))
        samples = (slice(None),) if planar else ()
        region = arr[plane + samples + (slice(y, y + h), slice(x, x + w))]
        if planar:
            region = np.moveaxis(region, 0, -1)
        return to_rgb8(region, f"{self.path} level {level}")

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores = []
        if self.tif is not None:
            self.tif.close()


class _Unsupported(Exception):
    """This TIFF layout is read whole by :func:`cellulib.files.imageio.read_image` instead."""


class _OpenSlideReader(_Reader):
    """Vendor whole-slide formats through openslide-python (only when it is installed)."""

    kind = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        super().__init__(path)
        try:
            self.osr = openslide.OpenSlide(str(path))
        except Exception as exc:  # noqa: BLE001 - OpenSlideError and friends
            raise DataError(f"{path}: OpenSlide cannot read this slide ({exc})") from None
        self.dims = [tuple(int(v) for v in d) for d in self.osr.level_dimensions]
        self._downsamples = [float(d) for d in self.osr.level_downsamples]
        try:
            self.mpp = float(self.osr.properties[openslide.PROPERTY_NAME_MPP_X])
        except (KeyError, ValueError):
            self.mpp = None

    @property
    def downsamples(self) -> list[float]:
        return self._downsamples

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._downsamples[level]
        # OpenSlide takes the top-left corner in level-0 pixels and returns un-premultiplied RGBA
        region = self.osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return to_rgb8(np.asarray(region), f"{self.path} level {level}")

    def close(self) -> None:
        self.osr.close()


def _tiff_mpp(tif) -> float | None:
    """Micrometres per pixel of level 0: OME PhysicalSizeX, Aperio MPP, or a cm resolution tag."""
    units = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
    try:
        if tif.is_ome and tif.ome_metadata:
            for el in ET.fromstring(tif.ome_metadata).iter():
                if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
                    factor = units.get(el.get("PhysicalSizeXUnit", "µm"))
                    if factor:
                        return float(el.get("PhysicalSizeX")) * factor
                    break
        page = tif.pages[0]
        match = re.search(r"MPP\s*=\s*([\d.]+)", page.description or "")
        if match:
            return float(match.group(1))
        tags = page.tags
        if "XResolution" in tags and int(tags.valueof("ResolutionUnit", 2)) == 3:  # centimetre
            num, den = tags["XResolution"].value
            mpp = 1e4 * den / num if num else None
            if mpp and 0.01 < mpp < 100:  # ignore placeholder resolutions
                return mpp
    except Exception:  # noqa: BLE001 - metadata is optional; a bad field means "unknown"
        return None
    return None


def open_slide(path: str | os.PathLike):
    """Open a large image for region reading; use as a context manager.

    Chooses the reader: openslide-python for vendor formats it recognises (when installed),
    tifffile's zarr store for TIFF files (tiles or strips decoded on demand, missing ones read as
    white glass; pyramid levels from ``series[0].levels``; the first plane of a multi-plane image,
    with a `SlideWarning`), :func:`cellulib.files.imageio.read_image` for PNG/JPEG and for TIFF layouts
    that are not read by region (palette, min-is-white, CMYK, float or 32-bit samples, ...). Used
    by :func:`slide_map`.

    Returns
    -------
    reader
        With ``kind`` ("openslide", "tifffile" or "image"), ``dims`` (width, height per level),
        ``downsamples``, ``mpp`` (micrometres per pixel or None) and
        ``read_region(level, x, y, w, h) -> (h, w, 3) uint8`` (level coordinates).

    Raises
    ------
    cellulib.files.imageio.DataError
        Missing, empty, corrupt or unsupported file; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        import openslide
    except ImportError:
        openslide = None
    if openslide is not None:
        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except Exception:  # noqa: BLE001 - unreadable: let the other readers report it
            fmt = None
        if fmt not in (None, "generic-tiff"):
            return _OpenSlideReader(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise DataError(f"{path}: empty file, not an image")
    if head in TIFF_MAGIC:
        try:
            return _TiffReader(path)
        except _Unsupported:
            pass
    return _ArrayReader(path)


# --------------------------------------------------------------------------------------------
# thumbnail, tissue, grid


def _thumbnail(reader, max_side: int = _THUMB_SIDE) -> tuple[np.ndarray, float]:
    """RGB thumbnail (long side <= max_side) assembled block by block, and its downsample."""
    w0, h0 = reader.dims[0]
    scale = max(1.0, max(w0, h0) / max_side)
    tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    downs = reader.downsamples
    level = max((i for i, d in enumerate(downs) if d <= scale * 1.001), key=lambda i: downs[i])
    lw, lh = reader.dims[level]
    fx, fy = tw / lw, th / lh
    thumb = np.full((th, tw, 3), 255, np.uint8)
    for y in range(0, lh, _BLOCK):
        for x in range(0, lw, _BLOCK):
            bw, bh = min(_BLOCK, lw - x), min(_BLOCK, lh - y)
            x0, x1 = round(x * fx), round((x + bw) * fx)
            y0, y1 = round(y * fy), round((y + bh) * fy)
            if x1 <= x0 or y1 <= y0:
                continue
            block = _read_block(reader, level, x, y, bw, bh)
            thumb[y0:y1, x0:x1] = cv2.resize(block, (x1 - x0, y1 - y0),
                                             interpolation=cv2.INTER_AREA)
    return thumb, (w0 / tw + h0 / th) / 2


def _read_block(reader, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A region for the thumbnail; a damaged part is read in small pieces and shown as glass."""
    try:
        return reader.read_region(level, x, y, w, h)
    except Exception:  # noqa: BLE001 - one damaged tile must not lose the whole slide
        pass
    block = np.full((h, w, 3), 255, np.uint8)
    bad = []
    for yy in range(0, h, _PIECE):
        for xx in range(0, w, _PIECE):
            pw, ph = min(_PIECE, w - xx), min(_PIECE, h - yy)
            try:
                block[yy:yy + ph, xx:xx + pw] = reader.read_region(level, x + xx, y + yy, pw, ph)
            except Exception as exc:  # noqa: BLE001
                bad.append(f"x={x + xx} y={y + yy} ({type(exc).__name__}: {exc})")
    warnings.warn(f"{reader.path}: {len(bad)} damaged region(s) of {_PIECE} px at level {level} "
                  f"shown as glass in the thumbnail: {'; '.join(bad[:3])}", SlideWarning,
                  stacklevel=4)
    return block


def tissue_mask(thumb: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB thumbnail: saturation above a clamped Otsu threshold.

    Glass is white or grey (HSV saturation below about 15/255), H&E-stained tissue is pink to
    purple. ``threshold`` None: Otsu's threshold on the median-filtered saturation, clamped to
    [15, 30] (an all-tissue field would otherwise be split into pale and dark tissue); then a 5x5
    opening and closing. Used by :func:`slide_map`.

    Returns
    -------
    mask : np.ndarray of bool
        Same height and width as ``thumb``.
    threshold : float
        The saturation threshold used (0-255).
    """
    sat = cv2.medianBlur(cv2.cvtColor(np.ascontiguousarray(thumb), cv2.COLOR_RGB2HSV)[..., 1], 5)
    if threshold is None:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, *_SATURATION_CLAMP))
    mask = (sat > threshold).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool), float(threshold)


def _starts(length: int, tile: int, stride: int) -> np.ndarray:
    starts = np.arange(0, length - tile + 1, stride)
    if len(starts) and starts[-1] + tile < length:
        starts = np.append(starts, length - tile)  # flush with the edge, overlapping its neighbour
    return starts


def tile_grid(width: int, height: int, tile: int, stride: int | None = None) -> pd.DataFrame:
    """Top-left corners of square tiles that cover a ``width x height`` image.

    Tiles start at 0 and step by ``stride`` (default ``tile``: no overlap); where the steps leave a
    strip at the right or bottom edge, one more row or column of tiles is placed flush with that
    edge, overlapping its neighbours, so every pixel of an image at least one tile wide and high
    lies in a tile. Used by :func:`slide_map`.

    Examples
    --------
    >>> tile_grid(1100, 600, 512)[["x", "y"]].values.tolist()
    [[0, 0], [512, 0], [588, 0], [0, 88], [512, 88], [588, 88]]
    """
    stride = tile if stride is None else int(stride)
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    xs = _starts(int(width), int(tile), stride)
    ys = _starts(int(height), int(tile), stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return pd.DataFrame({"x": xx.ravel(), "y": yy.ravel(), "w": tile, "h": tile})


def _tissue_fractions(mask: np.ndarray, tiles: pd.DataFrame, downsample_x: float,
                      downsample_y: float) -> np.ndarray:
    """Share of each tile's area that is tissue, from the thumbnail mask (integral image)."""
    ii = cv2.integral(mask.astype(np.uint8))  # (h + 1, w + 1) int32
    mh, mw = mask.shape
    x0 = np.clip(np.round(tiles["x"].to_numpy() / downsample_x).astype(int), 0, mw - 1)
    y0 = np.clip(np.round(tiles["y"].to_numpy() / downsample_y).astype(int), 0, mh - 1)
    x1 = np.clip(np.round((tiles["x"] + tiles["w"]).to_numpy() / downsample_x).astype(int),
                 x0 + 1, mw)
    y1 = np.clip(np.round((tiles["y"] + tiles["h"]).to_numpy() / downsample_y).astype(int),
                 y0 + 1, mh)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


# --------------------------------------------------------------------------------------------
# the map


def heatmap_figure(thumb: np.ndarray, tiles: pd.DataFrame, width: int, height: int,
                   title: str | None = None, alpha: float = 0.55):
    """The cellularity of the scored tiles over the thumbnail, with a labelled colour bar.

    Overlapping tiles are averaged; unscored tiles (background, failed) stay transparent. Axes are
    in level-0 pixels. Used by :func:`slide_map`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    th, tw = thumb.shape[:2]
    fx, fy = tw / width, th / height
    total = np.zeros((th, tw), np.float64)
    count = np.zeros((th, tw), np.float64)
    scored = tiles[tiles["cellularity"].notna()]
    for x, y, w, h, c in scored[["x", "y", "w", "h", "cellularity"]].itertuples(index=False):
        x0, y0 = int(round(x * fx)), int(round(y * fy))
        x1, y1 = max(x0 + 1, int(round((x + w) * fx))), max(y0 + 1, int(round((y + h) * fy)))
        total[y0:y1, x0:x1] += c
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        cmap_values = np.where(count > 0, total / count, np.nan)
    aspect = width / height
    fig, ax = plt.subplots(figsize=(min(12.0, 5.0 * aspect) + 1.5, 5.0))
    extent = (0, width, height, 0)
    ax.imshow(thumb, extent=extent, interpolation="bilinear")
    cmap = plt.get_cmap("viridis").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    im = ax.imshow(np.ma.masked_invalid(cmap_values), cmap=cmap, vmin=0.0, vmax=1.0,
                   alpha=alpha, extent=extent, interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("cellularity (0-1)")
    bar.solids.set_alpha(1.0)
    ax.set_xlabel("x (level-0 pixels)")
    ax.set_ylabel("y (level-0 pixels)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _warn_tile_scale(image_path: Path, tile: int, predictor, image_mpp: float | None) -> None:
    """Warn (one line) when a ``tile`` given in pixels, without ``mpp``, is far from the model's
    training field of view at the image's pixel size (the model's own when the file records
    none): each tile is resized whole to the model's input, so its nuclei would not have the size
    the model learned."""
    from cellulib.inference.predict import FOV_TOLERANCE, ScaleWarning

    fov = predictor.model_patch_px * predictor.model_mpp / (image_mpp or predictor.model_mpp)
    if 1 / FOV_TOLERANCE <= tile / fov <= FOV_TOLERANCE:
        return
    where = (f"{image_mpp:g} um/px (recorded in the file)" if image_mpp else
             f"{predictor.model_mpp:g} um/px, as the file records no pixel size")
    warnings.warn(f"{image_path}: a tile of {tile} px is far from the model's training field of "
                  f"view ({predictor.model_patch_px} px at {predictor.model_mpp:g} um/px, {fov:.0f} "
                  f"px at {where}), and each tile is resized whole to {predictor.input_size} px; "
                  "give --mpp (micrometres per pixel of the image) and leave out --tile to cut "
                  "tiles of the model's field of view", ScaleWarning, stacklevel=3)


def _pick_level(reader, level: Any, target: float) -> int:
    downs = reader.downsamples
    if level in (None, "auto"):
        # the coarsest level that still has >= the model's pixels per tile: no upsampling
        # (level 0 when even it has fewer, i.e. the tile is enlarged to the model input)
        fine_enough = [i for i, d in enumerate(downs) if d <= target * 1.001]
        return max(fine_enough, key=lambda i: downs[i]) if fine_enough else 0
    try:
        level = int(level)
    except (TypeError, ValueError):
        raise ValueError(f"level must be 'auto' or an integer, got {level!r}") from None
    if not 0 <= level < len(downs):
        raise ValueError(f"{reader.path}: level {level} does not exist; the file has levels "
                         f"0-{len(downs) - 1} (downsamples "
                         f"{', '.join(f'{d:.3g}' for d in downs)})")
    return level


def slide_map(model: Any, image_path: str | os.PathLike, out_dir: str | os.PathLike,
              tile: int | None = None, *, tile_um: float | None = None, stride: int | None = None,
              min_tissue: float = 0.5, level: Any = "auto", tissue_threshold: float | None = None,
              mpp: float | None = None, batch_size: int = 16, tta: bool = False,
              device: Any = None, workers: int = 2, progress: bool = True) -> pd.DataFrame:
    """Cellularity map of a large image: tissue tiles scored, written as CSV, heatmap and JSON.

    Applies a patch model of paper sections 3.2-3.4 tile by tile (see the module notes for the
    scale and tissue detection). Writes ``out_dir/tiles.csv`` (every tile of the grid: ``x, y,
    w, h`` in level-0 pixels, ``tissue_fraction``, ``cellularity`` (empty for background and
    failed tiles), ``error``), ``out_dir/heatmap.png`` and ``out_dir/slide.json`` (model, reader,
    levels, pixel size, tile geometry, tissue threshold, counts), each atomically. A tile that
    cannot be decoded gets an error row; the others are still scored. Used by
    ``cellulib slide``.

    Parameters
    ----------
    model : str, PathLike, (nn.Module, dict) or cellulib.inference.predict.Predictor
        A direct, SR or GBT model.
    image_path : path
        The slide or large image.
    out_dir : path
        Output folder (created).
    tile : int, optional
        Tile side in level-0 pixels. Default: the model's training field of view
        (``meta["pixel_size"]``: ``patch_px`` pixels of ``mpp`` micrometres; a BreastPathQ patch,
        512 px at 0.5 um/px, when the file records none) converted with the image's pixel size,
        so that the model sees nuclei at the size it learned them (a 0.25 um/px scan gets
        tiles twice as wide); ``patch_px`` level-0 pixels when the pixel size is unknown.
    tile_um : float, optional
        Tile side in micrometres; overrides ``tile`` using the image's pixel size.
    stride : int, optional
        Step between tiles in level-0 pixels (default ``tile``).
    min_tissue : float
        Smallest tissue fraction of a scored tile.
    level : "auto" or int
        Pyramid level the tiles are read from.
    tissue_threshold : float, optional
        Saturation threshold (0-255) instead of the clamped Otsu of :func:`tissue_mask`.
    mpp : float, optional
        Micrometres per level-0 pixel, replacing what the file records (or its absence).
    batch_size, tta, device, workers, progress
        As in :class:`cellulib.inference.predict.Predictor`.

    Returns
    -------
    pandas.DataFrame
        The rows of ``tiles.csv``; ``attrs["summary"]`` holds the contents of ``slide.json``.

    Raises
    ------
    cellulib.files.imageio.DataError
        Unreadable image, or an image smaller than one tile; the message names the file.
    """
    import matplotlib.pyplot as plt

    from cellulib.inference.pixelsize import check_mpp
    from cellulib.inference.predict import Predictor

    start = time.perf_counter()
    image_path = Path(image_path)
    out_dir = Path(out_dir)
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise ValueError(f"min_tissue must lie in [0, 1], got {min_tissue}")
    mpp = check_mpp(mpp, "mpp (micrometres per pixel)")
    predictor = model if isinstance(model, Predictor) else Predictor(
        model, batch_size=batch_size, tta=tta, device=device, workers=workers)
    size = predictor.input_size
    with open_slide(image_path) as reader:
        w0, h0 = reader.dims[0]
        image_mpp = float(mpp) if mpp is not None else reader.mpp
        mpp_source = "given" if mpp is not None else ("file" if reader.mpp else None)
        if tile_um is not None:
            if not image_mpp:
                raise DataError(f"{image_path}: the pixel size is not recorded in the file, so "
                                "tile_um cannot be converted; give --mpp or the tile side in "
                                "pixels")
            tile, tile_from = int(round(float(tile_um) / image_mpp)), "tile_um"
        elif tile is None:
            if image_mpp:
                tile = int(round(predictor.model_patch_px * predictor.model_mpp / image_mpp))
                tile_from = "model field of view at the image's pixel size"
            else:
                tile, tile_from = predictor.model_patch_px, "model patch side (pixel size unknown)"
        else:
            tile_from = "tile"
        tile = int(tile)
        if tile < 1:
            raise ValueError(f"tile must be positive, got {tile}")
        if tile_from == "tile" and mpp is None and predictor.pixel_size_recorded:
            _warn_tile_scale(image_path, tile, predictor, image_mpp)
        if tile * predictor.max_upscale < size:
            raise DataError(f"{image_path}: a tile of {tile} px is too small for this model "
                            f"(input {size}x{size}); use a tile of at least "
                            f"{math.ceil(size / predictor.max_upscale)} px")
        if w0 < tile or h0 < tile:
            raise DataError(f"{image_path}: image {w0}x{h0} is smaller than one {tile}-px tile "
                            f"({tile_from}); give a smaller tile, or score it with cellulib "
                            "predict (with --mpp)")
        grid = tile_grid(w0, h0, tile, stride)
        read_level = _pick_level(reader, level, tile / size)
        ds = reader.downsamples[read_level]
        lw, lh = reader.dims[read_level]
        side = max(1, min(int(round(tile / ds)), lw, lh))

        thumb, thumb_ds = _thumbnail(reader)
        mask, threshold = tissue_mask(thumb, tissue_threshold)
        grid["tissue_fraction"] = _tissue_fractions(mask, grid, w0 / thumb.shape[1],
                                                    h0 / thumb.shape[0])
        todo = np.flatnonzero(grid["tissue_fraction"].to_numpy() >= min_tissue)

        def loader(x: int, y: int):
            def load():
                where = f"{image_path} tile x={x} y={y}"
                try:
                    region = reader.read_region(read_level, min(int(round(x / ds)), lw - side),
                                                min(int(round(y / ds)), lh - side), side, side)
                except DataError:
                    raise
                except Exception as exc:  # noqa: BLE001 - codec errors of a damaged tile
                    raise DataError(f"{where}: cannot decode ({type(exc).__name__}: {exc})"
                                    ) from None
                return predictor.prepare(region, where)
            return load

        jobs = ((i, loader(int(grid.at[i, "x"]), int(grid.at[i, "y"]))) for i in todo)
        cellularity = np.full(len(grid), np.nan)
        errors = np.full(len(grid), "", dtype=object)
        for i, value, error in predictor.stream(jobs, total=len(todo), progress=progress,
                                                desc="slide", unit="tile"):
            cellularity[i], errors[i] = value, error
        grid["cellularity"] = cellularity
        grid["error"] = errors
        grid["tissue_fraction"] = grid["tissue_fraction"].round(4)
        reader_info = {"reader": reader.kind, "levels": [list(d) for d in reader.dims],
                       "downsamples": [round(d, 4) for d in reader.downsamples],
                       "mpp": image_mpp, "mpp_source": mpp_source}

    n_scored = int(np.isfinite(cellularity).sum())
    n_failed = int((errors != "").sum())
    if len(todo) == 0:
        warnings.warn(f"{image_path}: no tile has at least {min_tissue:.0%} tissue (saturation "
                      f"threshold {threshold:.0f}); nothing was scored", SlideWarning, stacklevel=2)
    mean = float(np.nanmean(cellularity)) if n_scored else math.nan
    title = (f"{image_path.name}: {n_scored} tissue tiles of {tile} px"
             + (f", mean cellularity {mean:.2f}" if n_scored else ", no tissue scored"))
    fig = heatmap_figure(thumb, grid, w0, h0, title=title)
    png = figure_png(fig, dpi=120)
    plt.close(fig)

    summary = predictor.describe() | {
        "image": str(image_path), **reader_info,
        "tile": tile, "tile_from": tile_from,
        "tile_um": None if reader_info["mpp"] is None else tile * reader_info["mpp"],
        "stride": int(stride or tile), "read_level": read_level, "read_side": side,
        "thumbnail_downsample": round(thumb_ds, 4), "tissue_threshold": threshold,
        "min_tissue": float(min_tissue), "n_tiles": len(grid), "n_tissue": int(len(todo)),
        "n_scored": n_scored, "n_failed": n_failed,
        "mean_cellularity": None if not n_scored else mean,
        "seconds": round(time.perf_counter() - start, 3),
    }
    buf = io.StringIO()
    grid.to_csv(buf, index=False, float_format="%.6g")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tiles.csv", buf.getvalue())
    atomic_write_bytes(out_dir / "heatmap.png", png)
    atomic_write_text(out_dir / "slide.json", json.dumps(jsonable(summary), indent=2) + "\n")
    grid.attrs["summary"] = summary
    return grid
