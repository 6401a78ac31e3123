"""Score images with a trained cellularity model: the inference engine behind ``cellulib predict``
and ``cellulib slide``.

Every cellularity family (direct, SR, GBT; paper sections 3.2-3.4) is one model file written by
:func:`cellulib.save_model`, holding its weights, config and preprocessing (``meta["preprocess"]`` =
``{"input_size": S, "normalize": "minus_one_one"}``), so a model from the book scores new images
without the book::

    cellulib predict --model model.pt --images DIR_OR_FILES --out preds.csv [--tta]

Output of ``predict``: a plain CSV with the columns ``path,cellularity,error`` (one row per image in
input order; a bad image has an empty ``cellularity`` and the message in ``error``) and a sidecar
``preds.csv.json`` with the model file, family, config, cellulib versions, options and the counts of
scored and failed images. The sidecar, rather than ``#`` comment lines, keeps the CSV readable by
``pandas.read_csv`` without options. Both files are written atomically.

Speed: images are read through a ``torch.utils.data.DataLoader`` over the jobs
(:meth:`Predictor.stream`). They are decoded in this process at first; once loading has taken at
least half of the time and as long as starting worker processes would (about 0.1 s each), with
more of it to come, the rest are decoded and resized ahead of the network by ``workers`` forked
processes (no GIL between them; they never touch CUDA) and come back in order. Few or cheap files
(or a CPU busy with the network) thus never pay for the processes' start. The inputs of
consecutive images fill batches of ``batch_size``, which go through the
model under ``torch.inference_mode`` in channels-last layout (faster on CPU and GPU for these
ResNets), on CUDA when available. Memory stays flat: at most a window of prepared ``S x S`` inputs
is held (the DataLoader's ``prefetch_factor``), never the decoded images, and rows are streamed to
the output file.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import IterableDataset, get_worker_info

from cellulib.constants import NORMALIZATIONS, STRIDE
from cellulib.data.transforms import normalize_batch
from cellulib.files.imageio import (
    DataError,
    atomic_open,
    atomic_write_text,
    collect_images,
    jsonable,
    read_image,
)
from cellulib.inference.pixelsize import check_mpp

__all__ = [
    "FAMILIES",
    "FOV_TOLERANCE",
    "INFERENCE_VERSION",
    "Predictor",
    "ScaleWarning",
    "field_of_view_warning",
    "predict_images",
    "predict_to_csv",
]

#: Bumped whenever what :class:`Predictor` computes for an image changes (resizing, scaling,
#: batching, decoding): the validation predictions stored in cached model files
#: (:func:`cellulib.training.train.predictions`) are recomputed from their weights, not retrained.
INFERENCE_VERSION = 1

#: An image (without ``--mpp``) whose shorter side is more than this factor above or below the
#: model's training patch side is "far from the model's field of view" and gets a warning
#: (:func:`field_of_view_warning`).
FOV_TOLERANCE = 1.5


class ScaleWarning(UserWarning):
    """Images scored at a scale far from the one the model learned (no ``--mpp``)."""


#: Model families that score cellularity (``seg`` predicts nucleus maps only).
FAMILIES: tuple[str, ...] = ("direct", "sr", "gbt")

_MIN_INPUT = 32  # smallest input any of the networks accepts
#: With ``mpp``: an image smaller than its window is padded by reflection up to the window, but
#: not beyond twice its side (a mistyped pixel size would otherwise score a tiny image mirrored
#: many times over, or ask numpy for an array of terabytes).
MAX_PAD = 2.0
PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# the model wrapper


def _model_error(source: Any, message: str) -> Exception:
    from cellulib.inference.modelfile import ModelFileError

    return ModelFileError(f"{source}: {message}")


class Predictor:
    """A loaded cellularity model with its preprocessing, ready to score uint8 RGB images.

    Implements the inference side of paper sections 3.2-3.4: the whole image is resized to the
    model's ``input_size`` with ``cv2.INTER_AREA`` (how the training patches were fed), scaled as
    recorded in the model file, and scored in batches; ``tta=True`` averages the 8 flips and
    rotations of the square input (the dihedral group D4), to which cellularity is invariant.
    Used by ``cellulib predict`` and ``cellulib slide``, by :func:`cellulib.training.train.train_direct` and
    :func:`cellulib.training.train.train_sr` for the validation predictions stored in their model files,
    and in chapter 4b (stain and scanner shift) through
    :func:`cellulib.reporting.robustness.score_under_shifts`.

    Parameters
    ----------
    model : str, PathLike or (nn.Module, dict)
        A model file, or the ``(model, info)`` pair returned by :func:`cellulib.load_model`. A
        given module is moved to ``device`` and to channels-last layout in place; with mixed
        precision the predictor scores with a copy whose weights are stored in bf16 or fp16, and
        the given module keeps its float32 weights.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    batch_size : int
        Images per forward pass.
    tta : bool
        Average the 8 dihedral transforms (8 forward passes per batch).
    workers : int
        Worker processes that decode and resize images ahead of the network (:meth:`stream`);
        none is started for images that load in less time than starting them would take.
    max_upscale : float
        An image is refused as too small when its shorter side would be enlarged more than this
        factor to reach ``input_size`` (the model would see interpolated pixels, not tissue).
    max_aspect : float
        Images more elongated than this are cut into square tiles along the long side instead of
        being squashed to a square; their score is the mean over the tiles.
    stain_norm : cellulib.data.stain.StainNormalizer, optional
        Normalise each image's stain first (``--stain-norm``).
    mpp : float, optional
        Micrometres per pixel of the images (``--mpp``). The image is then cut into square windows
        of the model's training field of view (``meta["pixel_size"]``: ``patch_px`` pixels of
        ``mpp`` micrometres; 512 px at 0.5 um/px when the file records none), each resized to
        ``input_size``, and scored as their mean, instead of being resized whole.
    channels_last : bool
        Run convolutions in NHWC layout (measured 1.2-1.4x faster on a 2-core CPU for ResNet-34).
    precision : {"auto", "bf16", "fp16", "float32"}
        Arithmetic of the forward pass, as :func:`cellulib.models.engine.amp_dtype` decides it:
        ``"auto"`` autocasts to bf16 on a CPU with native bf16 and on CUDA (fp16 on GPUs without
        bf16), float32 elsewhere (``$CELLULIB_PRECISION`` overrides ``"auto"``); ``"float32"``
        forces full precision. Every family is autocast alike: the GBT model keeps its
        segmentation in float32 itself, since its features were computed in float32. Outputs
        are decoded to cellularity in float32 and returned as float64; bf16 moves the scores of
        cellulib's models by about 1e-3 (at most 0.007 measured on quick-profile models). The
        weights that autocast would cast at every batch are cast once, here
        (:func:`cellulib.models.engine.precast_weights`): the same scores, bit for bit, and
        ``cellulib predict`` about 15% faster (ResNet-34 at 96 px, a 2-core Intel Xeon with AMX).

    Raises
    ------
    cellulib.inference.modelfile.ModelFileError
        A missing, corrupt or foreign model file, a segmentation model (it cannot score
        cellularity), or a file without usable preprocessing; the message names the file.
    ValueError
        An unknown ``precision``, or ``"fp16"`` without a CUDA device.
    """

    def __init__(self, model: Any, *, device: Any = None, batch_size: int = 16, tta: bool = False,
                 workers: int = 2, max_upscale: float = 4.0, max_aspect: float = 1.5,
                 channels_last: bool = True, precision: str = "auto",
                 stain_norm: Any = None, mpp: float | None = None) -> None:
        from cellulib import __version__
        from cellulib.inference.modelfile import model_and_info
        from cellulib.models.engine import amp_dtype, inference_model, precision_name, usable_device

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
        if family in ("sr", "gbt") and size % STRIDE:
            raise _model_error(self.source, f"a {family} model needs an input_size divisible by "
                               f"{STRIDE}, the file records {size}")
        normalize = pre.get("normalize", "minus_one_one")
        if normalize not in NORMALIZATIONS:
            raise _model_error(self.source, f"unknown normalisation {normalize!r} in preprocess; "
                               f"this cellulib knows {', '.join(NORMALIZATIONS)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not max_upscale >= 1 or not max_aspect >= 1:
            raise ValueError("max_upscale and max_aspect must be >= 1")
        mpp = check_mpp(mpp)

        self.info = info
        self.family = family
        self.input_size = int(size)
        self.normalize = normalize
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.workers = int(workers)
        self.max_upscale = float(max_upscale)
        self.max_aspect = float(max_aspect)
        self.device = usable_device(device)
        self.channels_last = bool(channels_last)
        # resolved once, so "auto" (and $CELLULIB_PRECISION) cannot change between batches
        self.amp_dtype = amp_dtype(self.device, precision)
        self.precision = precision_name(self.amp_dtype)
        # the weights autocast would cast at every batch, cast once (the same scores, bit for
        # bit); a model given in memory is copied first, so the caller's stays float32
        self.model = inference_model(model, self.device, self.amp_dtype, self.input_size,
                                     layout_channels_last=self.channels_last,
                                     copy=self.source == "<loaded model>", name=self.source)
        self.cellulib_version = __version__
        # a cellulib.data.stain.StainNormalizer applied to each image before it is cut and resized
        self.stain_norm = stain_norm
        # the images' pixel size (--mpp): they are cut into windows of the training field of view
        from cellulib.inference.pixelsize import pixel_size

        self.mpp = None if mpp is None else float(mpp)
        self.model_mpp, self.model_patch_px, self.pixel_size_recorded = pixel_size(info)

    # -- description -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the model and options (the sidecar's header)."""
        return {
            "model": self.source,
            "family": self.family,
            "config": jsonable(self.info.get("config")),
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
        cellulib.data.breastpathq.DataError
            When the image is too small for the model (``name`` is the file in the message).
        """
        import cv2
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
        reflection to the window's size, when the window is at most :data:`MAX_PAD` times its
        longer side), so the model sees nuclei at the size it learned them
        whatever the scan's magnification. The score is the mean over the windows.
        """
        import cv2
        side = self.window_side()
        s = self.input_size
        if side * self.max_upscale < s:
            raise DataError(f"{name}: at {self.mpp:g} um/px a {self.model_mpp:g} um/px model's "
                            f"field of view is {side:.0f} px, which would be enlarged "
                            f"{s / side:.1f}x to its input {s}x{s} (more than max_upscale="
                            f"{self.max_upscale:g})")
        win = max(1, int(round(side)))
        h, w = img.shape[:2]
        if win > MAX_PAD * max(h, w):
            raise DataError(f"{name}: image {w}x{h} is less than 1/{MAX_PAD:g} of the field of "
                            f"view a {self.model_mpp:g} um/px model sees at {self.mpp:g} um/px "
                            f"({win} px a side): it would be mostly mirrored padding; check the "
                            "pixel size (mpp)")
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
        """Read an image file (:func:`cellulib.data.breastpathq.read_image`) and :meth:`prepare` it."""
        return self.prepare(read_image(path), path)

    # -- the network -------------------------------------------------------------------------
    def _autocast(self):
        """The forward pass's mixed-precision context (a null context for float32)."""
        from cellulib.models.engine import autocast

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
        return normalize_batch(x, self.normalize)

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
        """Score a stream of jobs in order, decoding ahead of the network in worker processes.

        Each job is ``(key, load)`` where ``load()`` returns the prepared inputs of one image (one
        or more ``S x S`` arrays, averaged) or raises. Yields ``(key, cellularity, error)`` in the
        order of the jobs: ``error`` is ``""`` on success, else the message (and cellularity NaN).
        The inputs of consecutive images fill the forward passes of ``batch_size`` together.

        The jobs are read by a :class:`torch.utils.data.DataLoader` over an iterable dataset of
        the jobs (:class:`_JobStream`). The first jobs are loaded in this process. Once loading
        has taken as long as starting the workers would (``_WORKER_START_S`` a worker), and at
        least ``_LOAD_BOUND`` of the time so far, and (given ``total``) the jobs left would take
        as long again, the rest go to ``workers`` forked processes (round-robin, so the
        DataLoader's in-order fetch keeps the job order), each given its own offsets of the files
        it inherited (:func:`_worker_init`). Scores do not depend on where a job was loaded.
        A job's ``load`` runs in a worker as a copy of this process: a closure over the predictor,
        paths or images needs no pickling, but what it changes is not seen here; the inputs and
        keys come back pickled. Memory holds the prepared inputs of at most
        ``max(2 * batch_size, 2 * workers)`` images read ahead (the DataLoader's
        ``prefetch_factor`` times ``workers``) plus less than one batch waiting, whatever the
        number of jobs; a generator of jobs is consumed lazily, never listed.
        """
        from tqdm import tqdm

        records: deque = deque()  # [key, n_items, scores, error] in job order
        buffer: list[tuple[list, np.ndarray]] = []  # (record, input) waiting for a batch
        jobs = iter(jobs)
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr,
                   leave=False, dynamic_ncols=True)

        def take(row: tuple[Any, list | None, str]) -> None:
            key, items, error = row
            if not error and not items:
                error = f"{key}: nothing to score"
            rec = [key, 0 if error else len(items), [], error]
            records.append(rec)
            for item in items or ():
                buffer.append((rec, item))
            while len(buffer) >= self.batch_size:
                flush(self.batch_size)

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

        # the workers' start-up, paid once loading in-process has cost as much (and more remains)
        budget = self.workers * self._WORKER_START_S if _can_fork() else math.inf
        rows = None
        start = time.perf_counter()
        try:
            rows = iter(_JobStream(jobs))  # in this process: no DataLoader between
            spent, done, handed_over = 0.0, 0, False
            while True:
                t0 = time.perf_counter()
                if (spent >= budget and spent >= self._LOAD_BOUND * (t0 - start)
                        and (total is None or (total - done) * spent >= budget * max(done, 1))):
                    handed_over = True
                    break
                row = next(rows, None)
                spent += time.perf_counter() - t0
                if row is None:
                    break
                done += 1
                take(row)
                yield from completed()
            if handed_over:  # the rest of the jobs in worker processes
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about any fork of a process with threads (torch's
                    # own); the workers only run the jobs' loads, which take no lock of ours
                    warnings.filterwarnings("ignore", "This process .* is multi-threaded, use "
                                            "of fork", DeprecationWarning)
                    # frozen, this process's objects are left out of the workers' garbage
                    # collections, which would otherwise write to (and so copy) every page of them:
                    # a worker's own memory stays ~10 MiB instead of growing with the jobs it runs
                    # (unless the program froze objects itself: then gc is left as it is)
                    freeze = gc.get_freeze_count() == 0
                    if freeze:
                        gc.freeze()
                    try:
                        rows = iter(self._job_loader(jobs, self.workers))
                    finally:
                        if freeze:
                            gc.unfreeze()
                for row in rows:
                    take(row)
                    yield from completed()
            if buffer:
                flush(len(buffer))
            yield from completed()
        finally:
            del rows  # the last reference: a multi-process iterator shuts its workers down
            bar.close()

    #: Seconds one worker process costs to start and stop: the fork of a process holding torch and
    #: a model, the DataLoader's set-up, the first items' way through it and the shutdown (measured
    #: 0.05-0.1 s on a 2-core CPU).
    _WORKER_START_S = 0.1
    #: Workers take over only while loading is at least this fraction of the time so far: when the
    #: forward passes dominate (a CPU running torch on every core, cheap files) processes decoding
    #: beside them mostly compete for the same cores.
    _LOAD_BOUND = 0.5

    def _job_loader(self, jobs: Iterator, workers: int):
        """A DataLoader over the jobs, one ``(key, inputs, error)`` row per job, in job order."""
        from torch.utils.data import DataLoader

        window = max(2 * self.batch_size, 2 * self.workers)
        options: dict[str, Any] = {}
        if workers:
            options = {"multiprocessing_context": "fork", "worker_init_fn": _worker_init,
                       "prefetch_factor": math.ceil(window / workers)}
        # batch_size=None: one image's list of inputs per item, batched here across images;
        # the identity collate keeps the numpy arrays (no conversion to tensors); the generator
        # keeps the workers' seeds off torch's global random state
        return DataLoader(_JobStream(jobs), batch_size=None, collate_fn=_identity,
                          num_workers=workers, generator=_seed_generator(), **options)


# --------------------------------------------------------------------------------------------
# the job stream behind Predictor.stream


class _JobStream(IterableDataset):
    """The ``(key, load)`` jobs of one :meth:`Predictor.stream` call as an iterable dataset of
    ``(key, inputs, error)`` rows.

    Job ``i`` is loaded by DataLoader worker ``i % num_workers`` (or here, without workers). The
    DataLoader asks its workers for items round-robin and returns them in that order, so the rows
    come back in job order. Every worker walks the whole job iterator, as copied when it was
    forked, and skips the others' jobs: making a job must be cheap, loading it may be slow.
    """

    def __init__(self, jobs: Iterator) -> None:
        self.jobs = jobs

    def __iter__(self) -> Iterator[tuple[Any, list | None, str]]:
        info = get_worker_info()
        n, k = (1, 0) if info is None else (info.num_workers, info.id)
        for i, (key, load) in enumerate(self.jobs):
            if i % n == k:
                yield _load_job(key, load)


def _load_job(key: Any, load: Callable[[], list[np.ndarray]]) -> tuple[Any, list | None, str]:
    """``(key, load())``, or ``(key, None, message)`` when it raises: one bad file must not stop
    the others."""
    try:
        return key, load(), ""
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return key, None, " ".join(msg.split())


def _identity(row: Any) -> Any:
    return row


def _seed_generator():
    import torch

    return torch.Generator().manual_seed(0)


def _can_fork() -> bool:
    """Whether :meth:`Predictor.stream` may start worker processes.

    They are forked, explicitly (Python 3.14 makes ``forkserver`` the default on Linux), since a
    job's closure cannot be pickled for a spawned process: so Linux and the BSDs. On macOS (fork
    is unsafe with its system libraries), on Windows (no fork) and inside a daemonic process (a
    ``multiprocessing.Pool`` worker may not have children) every job loads in-process.
    """
    import multiprocessing

    return (sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _worker_init(worker_id: int) -> None:
    """In a freshly forked worker: give the regular files it inherited open for reading their own
    file offsets.

    After ``fork`` a file descriptor shares one offset with the parent and the other workers, so
    the ``seek`` + ``read`` of a reader opened before the stream (a slide's TIFF file handle in
    :func:`cellulib.inference.slide.slide_map`) would read another worker's bytes: each such descriptor is
    replaced by a new one on the same file (checked by device and inode) at the same offset.
    Writable files, pipes, sockets, devices and deleted files are left alone.
    """
    import fcntl
    import stat

    fd_dir = "/proc/self/fd"
    try:
        fds = [int(name) for name in os.listdir(fd_dir)]
    except OSError:  # no /proc: nothing to do
        return
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            st = os.fstat(fd)
            if flags & os.O_ACCMODE != os.O_RDONLY or not stat.S_ISREG(st.st_mode):
                continue
            path = os.readlink(f"{fd_dir}/{fd}")
            if not path.startswith("/") or path.startswith(("/proc/", "/sys/", "/dev/")):
                continue
            new = os.open(path, os.O_RDONLY | (flags & os.O_NONBLOCK))
        except OSError:  # closed meanwhile (the listing's own descriptor), deleted, or renamed
            continue
        try:
            again = os.fstat(new)
            if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
                os.lseek(new, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
                os.dup2(new, fd, inheritable=os.get_inheritable(fd))
        except OSError:
            pass
        finally:
            os.close(new)


# --------------------------------------------------------------------------------------------
# predict


def _as_predictor(model: Any, **options: Any) -> Predictor:
    if isinstance(model, Predictor):
        return model
    return Predictor(model, **options)


def _iter_rows(predictor: Predictor, files: list[Path], progress: bool, transform=None):
    def load(i: int, f: Path):
        if transform is None:
            return predictor.load(f)
        return predictor.prepare(transform(read_image(f), i), f)

    jobs = ((str(f), (lambda i=i, f=f: load(i, f))) for i, f in enumerate(files))
    yield from predictor.stream(jobs, total=len(files), progress=progress)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when PIL cannot tell (the run then
    reports the file itself)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - a bad file is reported by the run, not here
        return None


def field_of_view_warning(predictor: Predictor, files: Sequence[PathLike]) -> str | None:
    """The one-line warning for images far from the model's training field of view, or None.

    Without ``--mpp`` an image is resized whole to the model's input, so a 512 px patch at 20x
    shown to a model that learned 256 px patches at 20x has its nuclei shrunk to half the size it
    learned. When the model file records its training pixel size (``meta["pixel_size"]``) and
    ``mpp`` is not set, each image's shorter side (read from the file's header, nothing decoded)
    is compared with the training patch side; more than :data:`FOV_TOLERANCE` times larger or
    smaller is far. The message names both sizes, how many images are concerned and
    ``--mpp``. Used by :func:`predict_to_csv`.
    """
    if predictor.mpp is not None or not predictor.pixel_size_recorded:
        return None
    patch = predictor.model_patch_px
    far = []
    for f in files:
        size = _image_size(Path(f))
        if size and not 1 / FOV_TOLERANCE <= min(size) / patch <= FOV_TOLERANCE:
            far.append((Path(f), size))
    if not far:
        return None
    path, (w, h) = far[0]
    return (f"{len(far)} of {len(files)} images are far from the model's training field of view "
            f"({patch} px at {predictor.model_mpp:g} um/px), e.g. {path} is {w}x{h} px: without "
            f"--mpp each image is resized whole to {predictor.input_size} px, so its nuclei look "
            f"{patch / min(w, h):.2g}x the size the model learned; give --mpp (micrometres per "
            f"pixel of the images) to score windows of the model's field of view")


def predict_images(model: Any, paths: PathLike | Sequence[PathLike], batch_size: int = 16,
                   tta: bool = False, progress: bool = True, *, device: Any = None,
                   workers: int = 2, recursive: bool = False,
                   precision: str = "auto", stain_norm: Any = None, mpp: float | None = None,
                   transform: Callable[[np.ndarray, int], np.ndarray] | None = None
                   ) -> pd.DataFrame:
    """Score image files with a cellularity model; one row per image, bad images included.

    Paper sections 3.2-3.4 applied to new images (see :class:`Predictor` for the preprocessing and
    TTA). Used by :func:`cellulib.training.train.train_direct` and :func:`cellulib.training.train.train_sr` to score
    the validation patches (the predictions behind the tables of chapters 3 to 5).

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
        normalisation and resizing, e.g. a controlled shift (:func:`cellulib.reporting.robustness.shift_image`).

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
    note = field_of_view_warning(predictor, files)
    if note:
        warnings.warn(note, ScaleWarning, stacklevel=2)
    out = Path(out)
    n_ok, failed = 0, []
    start = time.perf_counter()
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
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
    atomic_write_text(Path(f"{out}.json"), json.dumps(summary, indent=2) + "\n")
    return summary
