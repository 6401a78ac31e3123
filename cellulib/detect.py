"""Nucleus detection with a segmentation model: the ``detect`` command (SPEC 7).

A segmentation model file (family ``seg``, :func:`cellulib.train.train_seg`) gives one point per
detected nucleus: the LoG blob centres (paper 3.3, Fig. 5) of its normal, lymphocyte and malignant
probability maps, mapped back to the pixels of the input image::

    cellulib detect --model SEG --images DIR_OR_FILES --out nuclei.csv [--geojson DIR]

Output: a CSV with the columns ``path,x,y,class,probability,error``, one row per nucleus (an image
that cannot be read gets one row with empty values and the message in ``error``), and with
``--geojson`` one QuPath-readable GeoJSON ``FeatureCollection`` of points per image. Images are
processed one at a time, so memory holds one image and its maps whatever their number.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "detect_nuclei", "detect_to_csv", "to_geojson",
           "add_command"]

#: Columns of :func:`detect_nuclei` and of the CSV of ``cellulib detect``.
COLUMNS: tuple[str, ...] = ("path", "x", "y", "class", "probability", "error")

_DEFAULT_DOWNSCALE = 2  # paper 4.2: images downscaled x2 before segmentation
PathLike = str | os.PathLike


class _SegModel:
    """A loaded segmentation model with the downscale it was trained at."""

    def __init__(self, model: Any, threshold: float, device: Any = None) -> None:
        from cellulib.engine import resolve_device
        from cellulib.models import CLASS_NAMES
        from cellulib.store import ModelFileError, model_and_info

        threshold = float(threshold)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.source, model, info = model_and_info(model)
        family = info.get("family")
        if family != "seg":
            raise ModelFileError(f"{self.source}: a {family!r} model cannot detect nuclei; "
                                 "give a segmentation model (family 'seg', cellulib train seg)")
        params = (info.get("meta") or {}).get("params") or {}
        factor = params.get("downscale", _DEFAULT_DOWNSCALE)
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) \
                or not factor > 0:
            raise ModelFileError(f"{self.source}: meta['params']['downscale'] must be a positive "
                                 f"number, the file records {factor!r}")
        self.threshold = threshold
        self.downscale = float(factor)
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        # the nucleus channels: every class of the segmentation output but background
        self.classes = tuple(c for c in CLASS_NAMES if c != "background")

    def detect(self, img: np.ndarray) -> list[tuple[float, float, str, float]]:
        """``(x, y, class, probability)`` of the nuclei of one uint8 RGB image, input pixels."""
        from cellulib.data import downscale
        from cellulib.features import log_blobs
        from cellulib.models import CLASS_NAMES, segment

        h_in, w_in = img.shape[:2]
        small = downscale(img, self.downscale)
        h_small, w_small = small.shape[:2]
        probs = segment(self.model, small, device=self.device)
        # the actual factors: the downscaled side is rounded to whole pixels
        sx, sy = w_in / w_small, h_in / h_small
        found = []
        for name in self.classes:
            prob_map = probs[CLASS_NAMES.index(name)]
            for y, x, _sigma in log_blobs(prob_map, self.threshold):
                yi, xi = int(y), int(x)
                # pixel centres aligned, as in cellulib.data.scale_points
                found.append(((xi + 0.5) * sx - 0.5, (yi + 0.5) * sy - 0.5, name,
                              float(prob_map[yi, xi])))
        return found



def _error_message(path: Path, exc: Exception) -> str:
    msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    if str(path) not in msg:
        msg = f"{path}: {msg}"
    return " ".join(msg.split())


def _iter_images(seg: _SegModel, files: list[Path], progress: bool
                 ) -> Iterator[tuple[Path, list[tuple[float, float, str, float]], str]]:
    """``(path, nuclei, error)`` per image, one image in memory at a time."""
    from tqdm import tqdm

    from cellulib.data import read_image

    for path in tqdm(files, desc="detect", unit="img", disable=not progress, file=sys.stderr,
                     leave=False, dynamic_ncols=True):
        try:
            yield path, seg.detect(read_image(path)), ""
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            yield path, [], _error_message(path, exc)


#: Default LoG threshold: the lowest of the paper's blob-feature thresholds (0.02-0.5, section 3.3).
#: The scale-normalised LoG of a 15 px disc peaks far below its probability (sigma 1-4 is smaller
#: than the disc), so 0.5 finds nothing: on a synthetic cells crop the quick-profile FPN gave 0 blobs
#: at 0.24 and 0.5, 13-30 per class at 0.05 and 83-158 at 0.02 (116 and 93 nuclei annotated). Not yet
#: tuned against a detection metric.
DEFAULT_THRESHOLD = 0.02


def detect_nuclei(model: Any, paths: PathLike | Sequence[PathLike],
                  threshold: float = DEFAULT_THRESHOLD,
                  progress: bool = True, *, device: Any = None,
                  recursive: bool = False) -> pd.DataFrame:
    """Detect and classify nuclei in image files with a segmentation model; one row per nucleus.

    SPEC 7 (``cellulib detect``), built on paper 3.3 (Fig. 5). Each image is read with
    :func:`cellulib.data.read_image`, downscaled by the model's recorded factor
    (``meta["params"]["downscale"]``, 2 when absent; paper 4.2) with
    :func:`cellulib.data.downscale`, segmented with :func:`cellulib.models.segment`, and the blobs
    of the normal, lymphocyte and malignant maps (not background) are found with
    :func:`cellulib.features.log_blobs` at ``threshold``. A nucleus seen in two maps gives two rows.
    Used by ``cellulib detect`` and the real-H&E chapter.

    Coordinates are in pixels of the input image with the index convention of
    :func:`cellulib.data.scale_points` and the cell annotations: the centre of pixel ``(row i,
    column j)`` is ``(x, y) = (j, i)``. A blob at pixel ``(xs, ys)`` of the downscaled image maps
    to ``x = (xs + 0.5) * w_in / w_small - 0.5`` and ``y = (ys + 0.5) * h_in / h_small - 0.5``
    (pixel centres aligned, with the actual factors after rounding of the downscaled size).

    Parameters
    ----------
    model : str, PathLike or (nn.Module, dict)
        A segmentation model file, or the ``(model, info)`` pair from :func:`cellulib.load_model`
        (a given module is moved to ``device`` in place).
    paths : path or sequence of paths
        Image files and/or folders (see :func:`cellulib.predict.collect_images`).
    threshold : float
        Absolute threshold of the scale-normalised LoG response, in (0, 1).
    progress : bool
        Show a tqdm bar on stderr.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    recursive : bool
        Also search subfolders.

    Returns
    -------
    pandas.DataFrame
        Columns ``path, x, y, class, probability, error``: per image its nuclei by class (in
        ``CLASS_NAMES`` order, strongest LoG response first), ``probability`` the map's value
        at the centre; a bad image gives one row with NaN values, empty ``class`` and the message
        naming the file in ``error`` (``""`` elsewhere).

    Raises
    ------
    cellulib.store.ModelFileError
        A missing or corrupt model file, or a model of another family; the message names the file.
    ValueError
        A threshold outside (0, 1), or no images.

    Examples
    --------
    >>> nuclei = detect_nuclei("seg.pt", "images/")  # doctest: +SKIP
    >>> nuclei.columns.tolist()  # doctest: +SKIP
    ['path', 'x', 'y', 'class', 'probability', 'error']
    """
    from cellulib.predict import collect_images

    seg = _SegModel(model, threshold, device=device)
    files = collect_images(paths, recursive=recursive)
    rows: list[tuple] = []
    for path, nuclei, error in _iter_images(seg, files, progress):
        if error:
            rows.append((str(path), np.nan, np.nan, "", np.nan, error))
        rows.extend((str(path), x, y, name, p, "") for x, y, name, p in nuclei)
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(
        {"x": "float64", "y": "float64", "probability": "float64", "class": "str", "error": "str"})


def to_geojson(nuclei: Sequence[tuple[float, float, str, float]]) -> dict[str, Any]:
    """A QuPath-readable GeoJSON FeatureCollection of nucleus points.

    SPEC 7 (``cellulib detect --geojson``). Each ``(x, y, class, probability)`` in the index
    convention of :func:`detect_nuclei` becomes a ``Point`` at ``[x + 0.5, y + 0.5]``: QuPath's
    pixel ``(0, 0)`` spans ``[0, 1) x [0, 1)``, so that is the same spot of the image. Its
    ``properties`` are ``{"objectType": "detection", "classification": {"name": class},
    "probability": p, "measurements": {"probability": p}}`` (QuPath shows ``measurements`` in its
    tables). Used by ``cellulib detect`` and the real-H&E chapter.
    """
    features = [{
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [round(x + 0.5, 3), round(y + 0.5, 3)]},
        "properties": {"objectType": "detection", "classification": {"name": name},
                       "probability": round(p, 6), "measurements": {"probability": round(p, 6)}},
    } for x, y, name, p in nuclei]
    return {"type": "FeatureCollection", "features": features}


def _geojson_names(files: list[Path]) -> list[str]:
    """``<stem>.geojson`` per image; a stem seen before gets ``-2``, ``-3``, ... appended."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen[f.stem] = seen.get(f.stem, 0) + 1
        names.append(f"{f.stem}.geojson" if n == 1 else f"{f.stem}-{n}.geojson")
    return names


def detect_to_csv(model: Any, paths: PathLike | Sequence[PathLike], out: PathLike,
                  geojson_dir: PathLike | None = None, threshold: float = DEFAULT_THRESHOLD,
                  progress: bool = True, *, device: Any = None,
                  recursive: bool = False) -> dict[str, Any]:
    """Detect nuclei in image files and write them to a CSV (and GeoJSON files), atomically.

    SPEC 7 (``cellulib detect``). Rows (see :func:`detect_nuclei`; ``x``, ``y`` with 2 decimals,
    ``probability`` with 6) are streamed to a temporary file beside ``out``, renamed into place at
    the end, so ``out`` is never half-written. With ``geojson_dir`` every readable image also gets
    ``geojson_dir/<image stem>.geojson`` (:func:`to_geojson`; a repeated stem gets ``-2``, ...),
    each written atomically. Used by ``cellulib detect`` and the real-H&E chapter.

    Parameters
    ----------
    out : path
        The CSV to write.
    geojson_dir : path, optional
        Folder of the GeoJSON files (created when missing).
    model, paths, threshold, progress, device, recursive
        As in :func:`detect_nuclei`.

    Returns
    -------
    dict
        ``n_images``, ``n_ok``, ``n_failed``, ``n_nuclei``, ``per_class`` (nuclei per class),
        ``failed`` (list of ``{"path", "error"}``), ``output`` and ``geojson`` (files written).
    """
    from cellulib.predict import _atomic_text, collect_images

    seg = _SegModel(model, threshold, device=device)
    files = collect_images(paths, recursive=recursive)
    names = _geojson_names(files)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if geojson_dir is not None:
        geojson_dir = Path(geojson_dir)
        geojson_dir.mkdir(parents=True, exist_ok=True)
    per_class = dict.fromkeys(seg.classes, 0)
    failed, written = [], []
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            for (path, nuclei, error), name in zip(_iter_images(seg, files, progress), names):
                if error:
                    writer.writerow([str(path), "", "", "", "", error])
                    failed.append({"path": str(path), "error": error})
                    continue
                for x, y, cls, p in nuclei:
                    writer.writerow([str(path), f"{x:.2f}", f"{y:.2f}", cls, f"{p:.6f}", ""])
                    per_class[cls] += 1
                if geojson_dir is not None:
                    target = geojson_dir / name
                    _atomic_text(target, json.dumps(to_geojson(nuclei)) + "\n")
                    written.append(str(target))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"model": seg.source, "downscale": seg.downscale, "threshold": seg.threshold,
            "n_images": len(files), "n_ok": len(files) - len(failed), "n_failed": len(failed),
            "n_nuclei": sum(per_class.values()), "per_class": per_class, "failed": failed,
            "output": str(out), "geojson": written}


def _cmd_detect(args: argparse.Namespace) -> int:
    from cellulib.predict import _print_failures

    summary = detect_to_csv(args.model, args.images, args.out, geojson_dir=args.geojson,
                            threshold=args.threshold, progress=not args.quiet,
                            device=args.device, recursive=args.recursive)
    _print_failures(summary["failed"], "detect", "images")
    counts = ", ".join(f"{n} {c}" for c, n in summary["per_class"].items())
    print(f"{summary['n_nuclei']} nuclei ({counts}) in {summary['n_ok']} of "
          f"{summary['n_images']} images; written to {args.out}"
          + (f" and {len(summary['geojson'])} GeoJSON files in {args.geojson}"
             if args.geojson else ""))
    return 1 if summary["n_failed"] else 0


def add_command(sub) -> None:
    """Register ``detect`` on the ``cellulib`` subparsers."""
    p = sub.add_parser(
        "detect",
        help="detect and classify nuclei with a segmentation model: path,x,y,class,probability",
        description="Detect nuclei in TIFF/PNG/JPEG images with a segmentation model file "
        "(cellulib train seg): the LoG blob centres of its normal, lymphocyte and malignant maps "
        "(paper 3.3), in pixels of the input image (pixel centres at integers). Writes a CSV with "
        "the columns path,x,y,class,probability,error (a bad image gets one row with its error; "
        "the others are still processed, and the exit code is 1) and, with --geojson, one "
        "QuPath-readable GeoJSON file of points per image.",
    )
    p.add_argument("--model", required=True, help="segmentation model file (family seg)")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="CSV to write (atomically)")
    p.add_argument("--geojson", default=None, metavar="DIR",
                   help="also write DIR/<image stem>.geojson per image (QuPath detections)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"LoG blob threshold in (0, 1) ({DEFAULT_THRESHOLD})")
    p.add_argument("--recursive", action="store_true", help="also search subfolders")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_detect)
