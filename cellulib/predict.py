"""Score images with a trained model, evaluate predictions; the ``predict``, ``evaluate`` and
``slide`` commands.

Every cellularity family (direct, SR, GBT; paper sections 3.2-3.4) is one model file written by
:func:`cellulib.save_model`, holding its weights, config and preprocessing (``meta["preprocess"]`` =
``{"input_size": S, "normalize": "minus_one_one"}``), so a model from the book scores new images
without the book::

    cellulib predict --model model.pt --images DIR_OR_FILES --out preds.csv [--tta]
    cellulib evaluate --pred preds.csv --labels val_labels.csv [--json] [--figure fig.png]
                      [--train-mean M | --train-labels train_labels.csv]
    cellulib slide --model model.pt SLIDE.ome.tif --out DIR

Output of ``predict``: a plain CSV with the columns ``path,cellularity,error`` (one row per image in
input order; a bad image has an empty ``cellularity`` and the message in ``error``) and a sidecar
``preds.csv.json`` with the model file, family, config, cellulib versions, options and the counts of
scored and failed images. The sidecar, rather than ``#`` comment lines, keeps the CSV readable by
``pandas.read_csv`` without options. Both files are written atomically.

Speed: images are decoded and resized by a pool of threads that runs ahead of the network (OpenCV,
tifffile and torch release the GIL), batches go through the model under ``torch.inference_mode`` in
channels-last layout (faster on CPU and GPU for these ResNets), on CUDA when available. Memory stays
flat: at most a window of prepared ``S x S`` inputs is held, never the decoded images, and rows are
streamed to the output file.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellulib.metrics import bland_altman

__all__ = [
    "FAMILIES",
    "IMAGE_SUFFIXES",
    "PredictWarning",
    "Predictor",
    "collect_images",
    "predict_images",
    "predict_to_csv",
    "read_predictions",
    "match_predictions",
    "evaluate_files",
    "bland_altman",
    "agreement_figure",
    "add_commands",
]

#: Model families that score cellularity (``seg`` predicts nucleus maps only).
FAMILIES: tuple[str, ...] = ("direct", "sr", "gbt")

#: Files picked up from a folder given to :func:`collect_images` (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

_STRIDE = 32  # SR and GBT models run a segmentation net whose input must be a multiple of 32
_MIN_INPUT = 32  # smallest input any of the networks accepts
_NORMALIZATIONS = ("minus_one_one", "imagenet")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
PathLike = str | os.PathLike


class PredictWarning(UserWarning):
    """Usable but suspicious input: unmatched predictions or labels, rows without a score."""


# --------------------------------------------------------------------------------------------
# the model wrapper


def _model_error(source: Any, message: str) -> Exception:
    from cellulib.store import ModelFileError

    return ModelFileError(f"{source}: {message}")


class Predictor:
    """A loaded cellularity model with its preprocessing, ready to score uint8 RGB images.

    Implements the inference side of paper sections 3.2-3.4: the whole image is resized to the
    model's ``input_size`` with ``cv2.INTER_AREA`` (how the training patches were fed), scaled as
    recorded in the model file, and scored in batches; ``tta=True`` averages the 8 flips and
    rotations of the square input (the dihedral group D4), to which cellularity is invariant.
    Used by ``cellulib predict`` and ``cellulib slide``, and in chapter 5 (discussion: new images).

    Parameters
    ----------
    model : str, PathLike or (nn.Module, dict)
        A model file, or the ``(model, info)`` pair returned by :func:`cellulib.load_model`. A
        given module is moved to ``device`` and to channels-last layout in place.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    batch_size : int
        Images per forward pass.
    tta : bool
        Average the 8 dihedral transforms (8 forward passes per batch).
    workers : int
        Threads that decode and resize images ahead of the network.
    max_upscale : float
        An image is refused as too small when its shorter side would be enlarged more than this
        factor to reach ``input_size`` (the model would see interpolated pixels, not tissue).
    max_aspect : float
        Images more elongated than this are cut into square tiles along the long side instead of
        being squashed to a square; their score is the mean over the tiles.
    stain_norm : cellulib.stain.StainNormalizer, optional
        Normalise each image's stain first (``--stain-norm``).
    mpp : float, optional
        Micrometres per pixel of the images (``--mpp``). The image is then cut into square windows
        of the model's training field of view (``meta["pixel_size"]``: ``patch_px`` pixels of
        ``mpp`` micrometres; 512 px at 0.5 um/px when the file records none), each resized to
        ``input_size``, and scored as their mean, instead of being resized whole.
    channels_last : bool
        Run convolutions in NHWC layout (measured 1.2-1.4x faster on a 2-core CPU for ResNet-34).
    precision : {"auto", "bf16", "fp16", "float32"}
        Arithmetic of the forward pass, as :func:`cellulib.engine.amp_dtype` decides it:
        ``"auto"`` autocasts to bf16 on a CPU with native bf16 and on CUDA (fp16 on GPUs without
        bf16), float32 elsewhere (``$CELLULIB_PRECISION`` overrides ``"auto"``); ``"float32"``
        forces full precision. Every family is autocast alike: the GBT model keeps its
        segmentation in float32 itself, since its features were computed in float32. Outputs
        are decoded to cellularity in float32 and returned as float64; bf16 moves the scores of
        cellulib's models by about 1e-3 (at most 0.007 measured on quick-profile models).

    Raises
    ------
    cellulib.store.ModelFileError
        A missing, corrupt or foreign model file, a segmentation model (it cannot score
        cellularity), or a file without usable preprocessing; the message names the file.
    ValueError
        An unknown ``precision``, or ``"fp16"`` without a CUDA device.
    """

    def __init__(self, model: Any, *, device: Any = None, batch_size: int = 16, tta: bool = False,
                 workers: int = 2, max_upscale: float = 4.0, max_aspect: float = 1.5,
                 channels_last: bool = True, precision: str = "auto",
                 stain_norm: Any = None, mpp: float | None = None) -> None:
        import torch

        from cellulib import __version__
        from cellulib.engine import amp_dtype, resolve_device
        from cellulib.store import model_and_info

        self.source, model, info = model_and_info(model)
        family = info.get("family")
        if family == "seg":
            raise _model_error(self.source, "a segmentation model (family 'seg') predicts nucleus "
                               "maps, not cellularity; give a direct, sr or gbt model")
        if family not in FAMILIES or not hasattr(model, "to_cellularity"):
            raise _model_error(self.source, f"model family {family!r} cannot score cellularity; "
                               f"expected one of {', '.join(FAMILIES)}")
        pre = (info.get("meta") or {}).get("preprocess")
        hint = ("re-save it with cellulib.save_model(model, path, preprocess={'input_size': S, "
                "'normalize': 'minus_one_one'})")
        if not isinstance(pre, dict) or "input_size" not in pre:
            raise _model_error(self.source,
                               f"no preprocessing recorded (meta['preprocess']); {hint}")
        size = pre["input_size"]
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_INPUT:
            raise _model_error(self.source, f"preprocess input_size must be an integer >= "
                               f"{_MIN_INPUT}, got {size!r}; {hint}")
        if family in ("sr", "gbt") and size % _STRIDE:
            raise _model_error(self.source, f"a {family} model needs an input_size divisible by "
                               f"{_STRIDE}, the file records {size}")
        normalize = pre.get("normalize", "minus_one_one")
        if normalize not in _NORMALIZATIONS:
            raise _model_error(self.source, f"unknown normalisation {normalize!r} in preprocess; "
                               f"this cellulib knows {', '.join(_NORMALIZATIONS)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not max_upscale >= 1 or not max_aspect >= 1:
            raise ValueError("max_upscale and max_aspect must be >= 1")
        if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < float(mpp) < 100):
            raise ValueError(f"mpp (micrometres per pixel of the images) must lie in (0, 100), "
                             f"got {mpp!r}")

        self.info = info
        self.family = family
        self.input_size = int(size)
        self.normalize = normalize
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.workers = int(workers)
        self.max_upscale = float(max_upscale)
        self.max_aspect = float(max_aspect)
        self.device = resolve_device(device)
        self.channels_last = bool(channels_last)
        # resolved once, so "auto" (and $CELLULIB_PRECISION) cannot change between batches
        self.amp_dtype = amp_dtype(self.device, precision)
        self.precision = {None: "float32", torch.bfloat16: "bf16",
                          torch.float16: "fp16"}[self.amp_dtype]
        model.eval().to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.cellulib_version = __version__
        # a cellulib.stain.StainNormalizer applied to each image before it is cut and resized
        self.stain_norm = stain_norm
        # the images' pixel size (--mpp): they are cut into windows of the training field of view
        from cellulib.store import pixel_size

        self.mpp = None if mpp is None else float(mpp)
        self.model_mpp, self.model_patch_px, self.pixel_size_recorded = pixel_size(info)

    # -- description -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the model and options (the sidecar's header)."""
        return {
            "model": self.source,
            "family": self.family,
            "config": _jsonable(self.info.get("config")),
            "model_cellulib_version": self.info.get("cellulib_version"),
            "cellulib_version": self.cellulib_version,
            "preprocess": {"input_size": self.input_size, "normalize": self.normalize},
            "tta": self.tta,
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "batch_size": self.batch_size,
            "stain_norm": None if self.stain_norm is None else {
                "method": self.stain_norm.method, "target": self.stain_norm.source},
            "mpp": self.mpp,
            "model_pixel_size": {"mpp": self.model_mpp, "patch_px": self.model_patch_px,
                                 "recorded": self.pixel_size_recorded},
        }

    # -- preprocessing -----------------------------------------------------------------------
    def prepare(self, img: np.ndarray, name: Any = "image") -> list[np.ndarray]:
        """Cut and resize one (H, W, 3) uint8 image into the model's ``S x S`` inputs (after
        stain normalisation when the predictor has one).

        A roughly square image (aspect ratio up to ``max_aspect``) is resized whole to ``S x S``
        with ``cv2.INTER_AREA``, as the training patches were (paper 4.1-4.4). A stretch keeps
        area fractions, hence cellularity, unchanged; only an elongated image is instead cut into
        ``ceil(long / short)`` evenly spaced square tiles of side ``short``, each resized to ``S``.

        Raises
        ------
        cellulib.data.DataError
            When the image is too small for the model (``name`` is the file in the message).
        """
        import cv2

        from cellulib.data import DataError

        if self.stain_norm is not None:
            img = self.stain_norm.normalize(img)
        if self.mpp is not None:
            return self._prepare_at_scale(img, name)
        h, w = img.shape[:2]
        short, long = min(h, w), max(h, w)
        s = self.input_size
        if short * self.max_upscale < s:
            raise DataError(f"{name}: image {w}x{h} is too small for this model (input "
                            f"{s}x{s}): it would be enlarged {s / short:.1f}x, more than "
                            f"max_upscale={self.max_upscale:g}")
        if long <= self.max_aspect * short:
            crops = [img]
        else:
            n = math.ceil(long / short)
            starts = np.linspace(0, long - short, n).round().astype(int)
            crops = ([img[:, a:a + short] for a in starts] if w > h
                     else [img[a:a + short] for a in starts])
        out = []
        for crop in crops:
            if crop.shape[0] != s or crop.shape[1] != s:
                crop = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
            out.append(np.ascontiguousarray(crop))
        return out

    def window_side(self) -> float:
        """With ``mpp`` set: the side, in image pixels, of the field of view of one training
        patch (``patch_px`` pixels of ``model_mpp`` micrometres)."""
        return self.model_patch_px * self.model_mpp / self.mpp

    def _prepare_at_scale(self, img: np.ndarray, name: Any) -> list[np.ndarray]:
        """``--mpp``: windows of the training patches' field of view, each resized to ``S``.

        The image is covered by evenly spaced square windows of :meth:`window_side` pixels (one
        when it is at most 2% larger; an image smaller than a window is first padded by
        reflection to the window's size), so the model sees nuclei at the size it learned them
        whatever the scan's magnification. The score is the mean over the windows.
        """
        import cv2

        from cellulib.data import DataError

        side = self.window_side()
        s = self.input_size
        if side * self.max_upscale < s:
            raise DataError(f"{name}: at {self.mpp:g} um/px a {self.model_mpp:g} um/px model's "
                            f"field of view is {side:.0f} px, which would be enlarged "
                            f"{s / side:.1f}x to its input {s}x{s} (more than max_upscale="
                            f"{self.max_upscale:g})")
        win = max(1, int(round(side)))
        h, w = img.shape[:2]
        pad_y, pad_x = max(0, win - h), max(0, win - w)
        if pad_y or pad_x:  # numpy's reflect (cv2's REFLECT_101) repeats for pads over the side
            img = np.pad(img, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2),
                               (0, 0)), mode="reflect")
            h, w = img.shape[:2]

        def starts(length: int) -> np.ndarray:
            n = max(1, math.ceil(length / win - 0.02))
            return np.linspace(0, length - win, n).round().astype(int)

        out = []
        for y in starts(h):
            for x in starts(w):
                crop = img[y:y + win, x:x + win]
                if crop.shape[0] != s or crop.shape[1] != s:
                    crop = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
                out.append(np.ascontiguousarray(crop))
        return out

    def load(self, path: PathLike) -> list[np.ndarray]:
        """Read an image file (:func:`cellulib.data.read_image`) and :meth:`prepare` it."""
        from cellulib.data import read_image

        return self.prepare(read_image(path), path)

    # -- the network -------------------------------------------------------------------------
    def _autocast(self):
        """The forward pass's mixed-precision context (a null context for float32)."""
        from cellulib.engine import autocast

        return autocast(self.device, self.amp_dtype)

    def _to_input(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # NHWC uint8 permuted to NCHW is already channels-last; float() keeps that layout
        x = x.permute(0, 3, 1, 2).float()
        if not self.channels_last:
            x = x.contiguous()
        # division, not multiplication by the reciprocal: bit for bit the pixels of
        # cellulib.data.normalize_image, which the model was trained on
        if self.normalize == "minus_one_one":
            return x.div_(127.5).sub_(1.0)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return x.div_(255.0).sub_(mean).div_(std)

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        """Cellularity of a batch of prepared inputs.

        Parameters
        ----------
        batch : np.ndarray
            ``(B, S, S, 3)`` uint8, as :meth:`prepare` returns them.

        Returns
        -------
        np.ndarray
            ``(B,)`` float64 cellularity in [0, 1] (NaN where the model returned a non-finite
            value).
        """
        import torch

        batch = np.asarray(batch)
        s = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (s, s, 3) or batch.dtype != np.uint8:
            raise ValueError(f"score_batch expects uint8 inputs shaped (B, {s}, {s}, 3), got "
                             f"{batch.dtype} {batch.shape}")
        x = self._to_input(batch)
        views = ([(k, flip) for flip in (False, True) for k in range(4)] if self.tta
                 else [(0, False)])
        total = None
        with torch.inference_mode():
            for k, flip in views:
                xv = torch.rot90(x, k, dims=(2, 3)) if k else x
                xv = xv.flip(3) if flip else xv
                with self._autocast():
                    output = self.model(xv)
                # decoding (e.g. the expectation over 101 bins) in float32, outside autocast
                c = self.model.to_cellularity(output.float()).reshape(-1).double()
                total = c if total is None else total + c
        out = (total / len(views)).cpu().numpy()
        out[~np.isfinite(out)] = np.nan
        return out

    # -- streaming engine --------------------------------------------------------------------
    def stream(self, jobs: Iterable[tuple[Any, Callable[[], list[np.ndarray]]]],
               total: int | None = None, progress: bool = True, desc: str = "predict",
               unit: str = "img") -> Iterator[tuple[Any, float, str]]:
        """Score a stream of jobs in order, decoding ahead of the network in threads.

        Each job is ``(key, load)`` where ``load()`` returns the prepared inputs of one image (one
        or more ``S x S`` arrays, averaged) or raises. Yields ``(key, cellularity, error)`` in the
        order of the jobs: ``error`` is ``""`` on success, else the message (and cellularity NaN).
        Memory holds the prepared inputs of at most ``max(2 * batch_size, 2 * workers)`` images
        read ahead plus less than one batch waiting, whatever the number of jobs.
        """
        from tqdm import tqdm

        window = max(2 * self.batch_size, 2 * self.workers)
        futures: deque = deque()
        records: deque = deque()  # [key, n_items, scores, error] in job order
        buffer: list[tuple[list, np.ndarray]] = []  # (record, input) waiting for a batch
        jobs = iter(jobs)
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr,
                   leave=False, dynamic_ncols=True)

        def run(load):
            try:
                return load(), ""
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                return None, " ".join(msg.split())

        def flush(n: int) -> None:
            chunk, buffer[:] = buffer[:n], buffer[n:]
            scores = self.score_batch(np.stack([item for _, item in chunk]))
            for (rec, _), value in zip(chunk, scores):
                rec[2].append(value)

        def completed() -> Iterator[tuple[Any, float, str]]:
            while records and (records[0][3] or len(records[0][2]) == records[0][1]):
                key, _, scores, error = records.popleft()
                value = float(np.mean(scores)) if not error else math.nan
                if not error and not math.isfinite(value):
                    error = "the model returned a non-finite value"
                bar.update(1)
                yield key, value, error

        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cellulib-load")
        try:
            exhausted = False
            while True:
                while not exhausted and len(futures) < window:
                    job = next(jobs, None)
                    if job is None:
                        exhausted = True
                        break
                    key, load = job
                    futures.append((key, pool.submit(run, load)))
                if not futures:
                    break
                key, fut = futures.popleft()
                items, error = fut.result()
                if not error and not items:
                    error = f"{key}: nothing to score"
                rec = [key, 0 if error else len(items), [], error]
                records.append(rec)
                for item in items or ():
                    buffer.append((rec, item))
                while len(buffer) >= self.batch_size:
                    flush(self.batch_size)
                yield from completed()
            if buffer:
                flush(len(buffer))
            yield from completed()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()


# --------------------------------------------------------------------------------------------
# predict


def collect_images(paths: PathLike | Sequence[PathLike], recursive: bool = False) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to their images.

    A folder contributes its files ending in :data:`IMAGE_SUFFIXES` (sorted by name; hidden files
    skipped; subfolders too when ``recursive``). A named file is kept whatever its suffix (a bad
    one becomes an error row). Used by ``cellulib predict``.

    Raises
    ------
    ValueError
        A folder without images, or nothing to score; the message names the folder.
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
        else:
            out.append(p)
    if not out:
        raise ValueError("no images given")
    return out


def _as_predictor(model: Any, **options: Any) -> Predictor:
    if isinstance(model, Predictor):
        return model
    return Predictor(model, **options)


def _iter_rows(predictor: Predictor, files: list[Path], progress: bool, transform=None):
    from cellulib.data import read_image

    def load(i: int, f: Path):
        if transform is None:
            return predictor.load(f)
        return predictor.prepare(transform(read_image(f), i), f)

    jobs = ((str(f), (lambda i=i, f=f: load(i, f))) for i, f in enumerate(files))
    yield from predictor.stream(jobs, total=len(files), progress=progress)


def predict_images(model: Any, paths: PathLike | Sequence[PathLike], batch_size: int = 16,
                   tta: bool = False, progress: bool = True, *, device: Any = None,
                   workers: int = 2, recursive: bool = False,
                   precision: str = "auto", stain_norm: Any = None, mpp: float | None = None,
                   transform: Callable[[np.ndarray, int], np.ndarray] | None = None
                   ) -> pd.DataFrame:
    """Score image files with a cellularity model; one row per image, bad images included.

    Paper sections 3.2-3.4 applied to new images (see :class:`Predictor` for the preprocessing and
    TTA). Used by ``cellulib predict`` and in chapter 5 (discussion: new images).

    Parameters
    ----------
    model : str, PathLike, (nn.Module, dict) or Predictor
        Model file, the pair from :func:`cellulib.load_model`, or a ready :class:`Predictor`.
    paths : path or sequence of paths
        Image files and/or folders (see :func:`collect_images`).
    batch_size : int
        Images per forward pass.
    tta : bool
        Average the 8 flips and rotations.
    progress : bool
        Show a tqdm bar on stderr.
    device, workers, precision, recursive, stain_norm, mpp
        See :class:`Predictor` and :func:`collect_images` (ignored for a ready Predictor, except
        ``recursive``).
    transform : callable, optional
        ``transform(img, i) -> img`` applied to image ``i`` (in file order) as read, before stain
        normalisation and resizing, e.g. a controlled shift (:func:`cellulib.robustness.shift_image`).

    Returns
    -------
    pandas.DataFrame
        Columns ``path``, ``cellularity`` (NaN for a bad image) and ``error`` (``""`` or the
        message naming the file), in input order.

    Examples
    --------
    >>> preds = predict_images("model.pt", "datasets/validation")  # doctest: +SKIP
    >>> preds.columns.tolist()  # doctest: +SKIP
    ['path', 'cellularity', 'error']
    """
    predictor = _as_predictor(model, batch_size=batch_size, tta=tta, device=device,
                              workers=workers, precision=precision, stain_norm=stain_norm, mpp=mpp)
    files = collect_images(paths, recursive=recursive)
    rows = list(_iter_rows(predictor, files, progress, transform))
    return pd.DataFrame(rows, columns=["path", "cellularity", "error"]).astype(
        {"cellularity": "float64", "error": "str"})


def _atomic_text(path: Path, text: str) -> None:
    from cellulib.store import atomic_write_bytes

    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def _jsonable(obj: Any) -> Any:
    """Config dicts may hold tuples, numpy scalars or paths: make them JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def predict_to_csv(model: Any, paths: PathLike | Sequence[PathLike], out: PathLike,
                   batch_size: int = 16, tta: bool = False, progress: bool = True, *,
                   device: Any = None, workers: int = 2, recursive: bool = False,
                   precision: str = "auto", stain_norm: Any = None,
                   mpp: float | None = None) -> dict[str, Any]:
    """Score image files and stream ``path,cellularity,error`` rows to a CSV, plus a JSON sidecar.

    The rows go to a temporary file beside ``out`` as they are scored (memory stays flat for any
    number of images) and the file is renamed into place at the end, so ``out`` is never
    half-written; an interrupted run leaves any previous ``out`` untouched. The sidecar
    ``out + ".json"`` records the model (file, family, config, cellulib version that wrote it),
    the cellulib version that scored, the options, the counts and the failures. Used by
    ``cellulib predict``.

    Parameters
    ----------
    out : path
        The CSV to write (``cellularity`` with 6 decimals; ``error`` empty for scored images).
    model, paths, batch_size, tta, progress, device, workers, recursive, precision, stain_norm, mpp
        As in :func:`predict_images`.

    Returns
    -------
    dict
        The sidecar contents: ``n_images``, ``n_ok``, ``n_failed``, ``failed`` (list of
        ``{"path", "error"}``), ``seconds``, ``images_per_second`` and the model description.
    """
    predictor = _as_predictor(model, batch_size=batch_size, tta=tta, device=device,
                              workers=workers, precision=precision, stain_norm=stain_norm, mpp=mpp)
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = collect_images(given, recursive=recursive)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    n_ok, failed = 0, []
    start = time.perf_counter()
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "cellularity", "error"])
            for path, value, error in _iter_rows(predictor, files, progress):
                writer.writerow([path, "" if error else f"{value:.6f}", error])
                if error:
                    failed.append({"path": path, "error": error})
                else:
                    n_ok += 1
        seconds = time.perf_counter() - start
        summary = predictor.describe() | {
            "images": [str(p) for p in given],
            "output": str(out),
            "columns": ["path", "cellularity", "error"],
            "n_images": len(files),
            "n_ok": n_ok,
            "n_failed": len(failed),
            "failed": failed,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(files) / seconds, 3) if seconds > 0 else None,
        }
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _atomic_text(Path(f"{out}.json"), json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# evaluate


def _read_table(path: Path, what: str) -> pd.DataFrame:
    from cellulib.data import DataError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV file (expected a header row)") from None
    except Exception as exc:  # noqa: BLE001 - ParserError, UnicodeDecodeError, ...
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _cellularity_column(df: pd.DataFrame, path: Path, column: str, allow_empty: bool) -> np.ndarray:
    from cellulib.data import DataError

    raw = df[column].str.strip()
    value = pd.to_numeric(raw.replace("", np.nan), errors="coerce").to_numpy(np.float64)
    bad = (raw != "") & ~np.isfinite(value) if allow_empty else ~np.isfinite(value)
    lines = np.arange(len(df)) + 2
    if bad.any():
        shown = ", ".join(f"line {n}: {v!r}" for n, v in zip(lines[bad][:5], raw[bad][:5]))
        raise DataError(f"{path}: missing or non-numeric {column!r} ({shown})")
    out = np.isfinite(value) & ((value < 0) | (value > 1))
    if out.any():
        shown = ", ".join(f"line {n}: {v:g}" for n, v in zip(lines[out][:5], value[out][:5]))
        raise DataError(f"{path}: {column} outside [0, 1] ({shown})")
    return value


def read_predictions(pred_csv: PathLike) -> pd.DataFrame:
    """Read a ``cellulib predict`` CSV (``path,cellularity[,error]``), keyed by the file stem.

    Rows without a cellularity (images that failed) are left out with a :class:`PredictWarning`.
    Used by :func:`evaluate_files` and in chapter 5 (discussion).

    Returns
    -------
    pandas.DataFrame
        Columns ``key`` (file name without folder and suffix, e.g. ``99788_1``), ``path``,
        ``cellularity``.

    Raises
    ------
    cellulib.data.DataError
        Missing columns, a value that is not a number or outside [0, 1], or two predictions for
        the same file stem; the message names the file.
    """
    from cellulib.data import DataError

    path = Path(pred_csv)
    df = _read_table(path, "predictions")
    missing = [c for c in ("path", "cellularity") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the header "
                        f"path,cellularity[,error] written by cellulib predict "
                        f"(found {list(df.columns)})")
    value = _cellularity_column(df, path, "cellularity", allow_empty=True)
    keep = np.isfinite(value)
    if (~keep).any():
        warnings.warn(f"{path}: {int((~keep).sum())} row(s) have no cellularity (failed images) "
                      "and are left out", PredictWarning, stacklevel=2)
    paths = df["path"].str.strip()
    out = pd.DataFrame({"key": [Path(p.replace("\\", "/")).stem for p in paths], "path": paths,
                        "cellularity": value})[keep].reset_index(drop=True)
    dup = out["key"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{path}: several predictions for the same image name "
                        f"{sorted(set(out.loc[dup, 'key']))[:5]}; labels are matched by file "
                        "name, so score each image once")
    return out


def _read_label_table(labels_csv: PathLike) -> pd.DataFrame:
    from cellulib.data import DataError, read_labels

    path = Path(labels_csv)
    df = _read_table(path, "labels")
    if "path" in df.columns:
        column = next((c for c in ("cellularity", "y", "p") if c in df.columns), None)
        if column is None:
            raise DataError(f"{path}: a labels file with a 'path' column needs a 'cellularity' "
                            f"column (found {list(df.columns)})")
        value = _cellularity_column(df, path, column, allow_empty=False)
        keys = [Path(p.strip().replace("\\", "/")).stem for p in df["path"]]
        labels = pd.DataFrame({"key": keys, "label": value})
    else:
        bp = read_labels(path)  # slide,rid,y|p with its own checks and messages
        labels = pd.DataFrame({"key": bp["slide"] + "_" + bp["rid"], "label": bp["cellularity"]})
    dup = labels["key"].duplicated(keep=False)
    if dup.any():
        conflict = labels[dup].groupby("key")["label"].nunique() > 1
        if conflict.any():
            raise DataError(f"{path}: images labelled twice with different values: "
                            f"{list(conflict[conflict].index[:5])}")
        labels = labels.drop_duplicates("key")
    return labels


def match_predictions(pred_csv: PathLike, labels_csv: PathLike) -> pd.DataFrame:
    """Pair predictions with labels by image name: ``{slide}_{rid}`` or the stem of ``path``.

    ``labels_csv`` is a BreastPathQ label file (``slide,rid,y``, or ``p``) or a CSV with
    ``path,cellularity`` columns. Predictions without a label and labels without a prediction are
    left out with a :class:`PredictWarning` that names a few. Used by :func:`evaluate_files` and
    in chapter 5 (discussion).

    Returns
    -------
    pandas.DataFrame
        Columns ``key``, ``path``, ``y_true``, ``y_pred`` in the order of the predictions.

    Raises
    ------
    ValueError
        When no prediction matches any label (both files are named).
    """
    pred = read_predictions(pred_csv)
    labels = _read_label_table(labels_csv)
    merged = pred.merge(labels, on="key", how="inner", sort=False)
    no_label = sorted(set(pred["key"]) - set(labels["key"]))
    no_pred = sorted(set(labels["key"]) - set(pred["key"]))
    if merged.empty:
        raise ValueError(f"{pred_csv}: no prediction matches a label in {labels_csv} (images are "
                         f"matched by name: e.g. prediction {pred['key'].head(3).tolist()} vs "
                         f"label {labels['key'].head(3).tolist()})")
    if no_label:
        warnings.warn(f"{pred_csv}: {len(no_label)} prediction(s) have no label in {labels_csv} "
                      f"and are left out, e.g. {no_label[:5]}", PredictWarning, stacklevel=2)
    if no_pred:
        warnings.warn(f"{labels_csv}: {len(no_pred)} labelled image(s) have no prediction in "
                      f"{pred_csv}, e.g. {no_pred[:5]}", PredictWarning, stacklevel=2)
    return merged.rename(columns={"label": "y_true", "cellularity": "y_pred"})[
        ["key", "path", "y_true", "y_pred"]]


def evaluate_files(pred_csv: PathLike, labels_csv: PathLike, n_boot: int = 2000,
                   seed: int = 0, train_mean: float | None = None) -> pd.DataFrame:
    """MSE, kappa, ICC(2,1) and PK with 95% CIs for a predictions CSV against a labels CSV.

    Paper section 3.5 and SPEC 5 (Tables 2 and 3, the challenge's PK) through
    :func:`cellulib.metrics.evaluate` on the pairs of :func:`match_predictions`. With
    ``train_mean`` (the mean of the model's training labels) the mean predictor is scored on the
    same patches and its MSE added as a row ``MSE (mean predictor)``, same seed, so same
    resamples; the model has learned when ``MSE``'s ``ci_high`` is below that row's ``value``
    (:func:`cellulib.report.learned`, SPEC 5.1). Used by ``cellulib evaluate`` and in chapter 5
    (discussion).

    Returns
    -------
    pandas.DataFrame
        Index ``metric`` (``MSE``, ``kappa``, ``ICC(2,1)``, ``PK`` and, with ``train_mean``,
        ``MSE (mean predictor)``); columns ``value``, ``ci_low``, ``ci_high``, ``ci_method``,
        ``n``.
    """
    pairs = match_predictions(pred_csv, labels_csv)
    return _evaluate_pairs(pairs, n_boot, seed, train_mean)


def _evaluate_pairs(pairs: pd.DataFrame, n_boot: int, seed: int,
                    train_mean: float | None) -> pd.DataFrame:
    from cellulib.metrics import evaluate
    from cellulib.report import MEAN_PREDICTOR, mean_predictor_predictions, mse_ci

    y_true, y_pred = pairs["y_true"].to_numpy(), pairs["y_pred"].to_numpy()
    table = evaluate(y_true, y_pred, n_boot=n_boot, seed=seed)
    if train_mean is not None:
        base = mean_predictor_predictions(y_true, train_mean)
        est = mse_ci(base.y_true, base.y_pred, n_boot=n_boot, seed=seed)
        table.loc[f"MSE ({MEAN_PREDICTOR.lower()})"] = [est.value, est.ci_low, est.ci_high,
                                                        "bootstrap", len(base)]
    return table


def _train_mean_source(pred_csv: PathLike, train_mean: float | None = None,
                       train_labels: PathLike | None = None) -> tuple[float | None, str]:
    """The training mean for the mean predictor and where it came from, or why there is none.

    In order: ``train_mean``; the mean of ``train_labels`` (a BreastPathQ ``slide,rid,y`` or a
    ``path,cellularity`` file); the ``train_mean`` recorded in the model file named by the
    predictions' sidecar ``pred_csv + ".json"``. Never a guess: ``(None, reason)`` otherwise.
    """
    from cellulib.report import _check_train_mean

    if train_mean is not None:
        return _check_train_mean(train_mean), "--train-mean"
    if train_labels is not None:
        labels = _read_label_table(train_labels)
        return float(labels["label"].mean()), f"mean of the {len(labels)} labels in {train_labels}"
    hint = "give --train-mean or --train-labels"
    sidecar = Path(f"{pred_csv}.json")
    if not sidecar.is_file():
        return None, f"no sidecar {sidecar} naming the model; {hint}"
    try:
        model = json.loads(sidecar.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError) as exc:
        return None, f"{sidecar} is not a readable sidecar ({exc}); {hint}"
    if not model:
        return None, f"{sidecar} names no model file; {hint}"
    path = Path(model)
    if not path.is_file() and (sidecar.parent / path).is_file():
        path = sidecar.parent / path
    from cellulib.store import ModelFileError, load_model

    try:
        _, info = load_model(path)
    except (ModelFileError, OSError) as exc:
        return None, f"the model named in {sidecar} cannot be read ({exc}); {hint}"
    value = (info.get("meta") or {}).get("train_mean")
    if value is None:
        return None, f"the model file {path} records no training mean; {hint}"
    return _check_train_mean(value), f"train_mean recorded in the model file {path}"


def agreement_figure(y_true, y_pred, title: str | None = None, n_bins: int = 10):
    """Calibration plot and Bland-Altman plot of predictions against labels, side by side.

    Left: each patch (dots), the mean label within ``n_bins`` equal-width bins of the prediction
    (line with +-1 sd bars) and the identity. Right: difference against mean with the bias and
    the 95% limits of agreement of :func:`bland_altman`. Used in chapter 5 (discussion) and by
    ``cellulib evaluate --figure``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    ba = bland_altman(t, p)
    fig, (ax_cal, ax_ba) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax_cal.scatter(p, t, s=10, alpha=0.4, color="0.4", label="patches")
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    used = counts > 0
    mean_p = np.bincount(idx, p, n_bins)[used] / counts[used]
    mean_t = np.bincount(idx, t, n_bins)[used] / counts[used]
    sd_t = np.sqrt(np.maximum(np.bincount(idx, t * t, n_bins)[used] / counts[used] - mean_t ** 2,
                              0))
    ax_cal.errorbar(mean_p, mean_t, yerr=sd_t, color="C3", marker="o", capsize=3,
                    label=f"mean label per prediction bin (+-1 sd, {n_bins} bins)")
    ax_cal.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="identity")
    ax_cal.set_xlim(-0.02, 1.02)
    ax_cal.set_ylim(-0.02, 1.02)
    ax_cal.set_xlabel("predicted cellularity (fraction, 0-1)")
    ax_cal.set_ylabel("label cellularity (fraction, 0-1)")
    ax_cal.set_title("calibration")
    ax_cal.legend(fontsize=8, loc="upper left")
    mean = (p + t) / 2
    ax_ba.scatter(mean, p - t, s=10, alpha=0.4, color="0.4")
    ax_ba.axhline(ba["bias"], color="C3", label=f"bias {ba['bias']:+.3f}")
    for key in ("loa_low", "loa_high"):
        ax_ba.axhline(ba[key], color="C0", ls="--")
    ax_ba.plot([], [], color="C0", ls="--",
               label=f"95% limits {ba['loa_low']:+.3f} to {ba['loa_high']:+.3f}")
    ax_ba.axhline(0, color="k", lw=0.8)
    ax_ba.set_xlim(-0.02, 1.02)
    ax_ba.set_xlabel("mean of prediction and label (cellularity, 0-1)")
    ax_ba.set_ylabel("prediction - label (cellularity)")
    ax_ba.set_title(f"Bland-Altman (n = {ba['n']})")
    ax_ba.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from cellulib.store import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=120,
                bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


# --------------------------------------------------------------------------------------------
# command line


def _print_failures(failed: list[dict[str, str]], command: str, what: str) -> None:
    for row in failed[:20]:
        print(f"cellulib {command}: {row['error']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"cellulib {command}: ... {len(failed) - 20} more {what} failed (see the CSV)",
              file=sys.stderr)


def _cmd_predict(args: argparse.Namespace) -> int:
    from cellulib.stain import normalizer_from_options

    summary = predict_to_csv(args.model, args.images, args.out, batch_size=args.batch_size,
                             tta=args.tta, progress=not args.quiet, device=args.device,
                             workers=args.workers, recursive=args.recursive,
                             precision=args.precision, mpp=args.mpp,
                             stain_norm=normalizer_from_options(args.stain_norm, args.stain_target,
                                                                args.model))
    _print_failures(summary["failed"], "predict", "images")
    print(f"scored {summary['n_ok']} of {summary['n_images']} images with the "
          f"{summary['family']} model {args.model} ({summary['images_per_second']} img/s); "
          f"written to {args.out} (+ {args.out}.json)")
    return 1 if summary["n_failed"] else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellulib.metrics import format_ci
    from cellulib.report import MEAN_PREDICTOR, learned

    pairs = match_predictions(args.pred, args.labels)
    train_mean, source = _train_mean_source(args.pred, args.train_mean, args.train_labels)
    table = _evaluate_pairs(pairs, args.n_boot, args.seed, train_mean)
    base_row = f"MSE ({MEAN_PREDICTOR.lower()})"
    model_learned = (None if train_mean is None else
                     learned(table.loc["MSE", "ci_high"], table.loc[base_row, "value"], len(pairs)))
    if args.figure:
        _save_figure(agreement_figure(pairs["y_true"], pairs["y_pred"],
                                      title=Path(args.pred).name), Path(args.figure))
    if args.json:
        metrics = table.drop(index=base_row, errors="ignore")
        if train_mean is None:
            mean_predictor = {"available": False, "reason": source}
        else:
            mean_predictor = {"available": True, "train_mean": train_mean, "source": source,
                              "MSE": _jsonable(table.loc[base_row].to_dict())}
        payload = {"pred": str(args.pred), "labels": str(args.labels), "n": int(len(pairs)),
                   "n_boot": args.n_boot, "seed": args.seed,
                   "metrics": {m: _jsonable(row.to_dict()) for m, row in metrics.iterrows()},
                   "mean_predictor": mean_predictor, "learned": model_learned}
        print(json.dumps(payload, indent=2))
    else:
        shown = pd.DataFrame({
            "value [95% CI]": [format_ci(r.value, r.ci_low, r.ci_high) for r in table.itertuples()],
            "CI": table["ci_method"], "n": table["n"]}, index=table.index)
        print(f"{args.pred} vs {args.labels}: {len(pairs)} matched images")
        print(shown.to_string())
        if train_mean is None:
            print(f"no mean predictor, so whether the model learned is unknown: {source}")
        else:
            verdict = ("yes: the upper end of its MSE's 95% CI is below" if model_learned
                       else "no: its MSE's 95% CI is not entirely below")
            print(f"mean predictor: training mean {train_mean:.4f} ({source})")
            print(f"learned: {verdict} the mean predictor's MSE "
                  f"{table.loc[base_row, 'value']:.4f}")
    if args.figure:
        print(f"figure written to {args.figure}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_slide(args: argparse.Namespace) -> int:
    from cellulib.slide import slide_map
    from cellulib.stain import normalizer_from_options

    predictor = Predictor(args.model, batch_size=args.batch_size, tta=args.tta,
                          device=args.device, workers=args.workers, precision=args.precision,
                          stain_norm=normalizer_from_options(args.stain_norm, args.stain_target,
                                                             args.model))
    tiles = slide_map(predictor, args.image, args.out, tile=args.tile, tile_um=args.tile_um,
                      stride=args.stride, min_tissue=args.min_tissue, level=args.level,
                      mpp=args.mpp, progress=not args.quiet)
    failed = tiles[tiles["error"] != ""]
    _print_failures([{"error": e} for e in failed["error"]], "slide", "tiles")
    scored = tiles["cellularity"].notna()
    mean = tiles.loc[scored, "cellularity"].mean()
    print(f"{args.image}: {len(tiles)} tiles, {int(scored.sum())} tissue tiles scored"
          + (f" (mean cellularity {mean:.3f})" if scored.any() else "")
          + f"; written to {Path(args.out) / 'tiles.csv'} and {Path(args.out) / 'heatmap.png'}")
    return 1 if len(failed) or not scored.any() else 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model file (cellulib train / save_model)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (16)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips and rotations")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images ahead (2)")
    p.add_argument("--precision", choices=("auto", "bf16", "float32"), default="auto",
                   help="forward-pass arithmetic: auto (bf16 autocast on a CPU with native bf16 "
                   "and on CUDA, else float32), bf16, or float32 to force full precision")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from cellulib.stain import add_options

    add_options(p)


def add_commands(sub) -> None:
    """Register ``predict``, ``evaluate`` and ``slide`` on the ``cellulib`` subparsers."""
    p = sub.add_parser(
        "predict",
        help="score images with a trained model and write path,cellularity rows",
        description="Score TIFF/PNG/JPEG images (any size; RGB, RGBA, grey, 16-bit) with a "
        "direct, SR or GBT model file. Writes a CSV with the columns path,cellularity,error (a "
        "bad image gets an empty cellularity and its error; the others are still scored, and the "
        "exit code is 1) and a sidecar OUT.json with the model, options and counts.",
    )
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="CSV to write (atomically)")
    p.add_argument("--recursive", action="store_true", help="also search subfolders")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="micrometres per pixel of the images: they are cut into windows of the "
                   "model's training field of view (its pixel size times its patch side), so a "
                   "40x scan (0.25) is seen at the 20x (0.5) scale the models learned")
    _add_model_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="MSE, kappa, ICC and PK with 95%% CIs of predictions against labels",
        description="Compare a predictions CSV (cellulib predict) with labels, matched by image "
        "name: a BreastPathQ label file (slide,rid,y) or a CSV with path,cellularity. Prints MSE, "
        "4-bin kappa, ICC(2,1) and PK with 95% confidence intervals (paper section 3.5), and the "
        "mean predictor (the training labels' mean) with whether the model learned: the upper end "
        "of its MSE's 95% CI below the mean predictor's MSE.",
    )
    p.add_argument("--pred", required=True, help="predictions CSV (path,cellularity[,error])")
    p.add_argument("--labels", required=True, help="labels CSV (slide,rid,y or path,cellularity)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--figure", default=None, help="write a calibration + Bland-Altman figure")
    p.add_argument("--train-mean", type=float, default=None, metavar="FLOAT",
                   help="mean of the training labels: scores the mean predictor and says whether "
                   "the model learned (default: from --train-labels, or the train_mean recorded "
                   "in the model file named by PRED.json)")
    p.add_argument("--train-labels", default=None, metavar="CSV",
                   help="training labels (slide,rid,y or path,cellularity) whose mean is the mean "
                   "predictor")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "slide",
        help="cellularity map of a large (pyramidal) image: tiles.csv and heatmap.png",
        description="Cut a large image (tiled or pyramidal TIFF/OME-TIFF, JPEG tiles included; "
        "OpenSlide formats when openslide-python is installed; PNG/JPEG) into tiles, skip "
        "background (Otsu on saturation of a thumbnail), score tissue tiles and write "
        "OUT/tiles.csv (x,y,w,h,tissue_fraction,cellularity,error at level 0), OUT/heatmap.png "
        "and OUT/slide.json.",
    )
    p.add_argument("image", help="the slide or large image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in level-0 pixels, resized to the model input (default: the "
                   "model's training field of view at the image's pixel size, else 512)")
    p.add_argument("--tile-um", type=float, default=None,
                   help="tile side in micrometres (needs the pixel size in the file); "
                   "overrides --tile")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="micrometres per level-0 pixel, when the file does not record it (or "
                   "records it wrongly)")
    p.add_argument("--stride", type=int, default=None, help="tile step in level-0 pixels (= tile)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="smallest tissue fraction of a scored tile (0.5)")
    p.add_argument("--level", default="auto",
                   help="pyramid level to read tiles from (default auto: the coarsest level that "
                   "still has at least the model's input resolution)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_slide)
