"""Speed and memory benchmarks (``python -m cellulib.bench``).

Machines are shared and noisy, so no speed goal is an absolute number: every case times our code
and a reference side by side in one run (interleaved, after a warm-up, medians over repeats with
:func:`time.perf_counter`) and reports their ratio with the machine it ran on. The cases:

``features``
    The 81 features of paper section 3.3 (:func:`cellulib.models.features.extract_features`) against the
    authors' way (:func:`cellulib.models.features.extract_features_reference`: skimage ``blob_log`` once
    per threshold, numpy sums) on 4-channel probability maps. Goal: >= 10x faster, equal areas and
    blob counts, equal sums to rounding.
``predict``
    ``cellulib predict`` end to end (decode, resize, forward, CSV) against the fastest bare forward
    pass of the same model on this hardware (channels-last, autocast to the dtype
    :func:`cellulib.models.engine.amp_dtype` picks: bf16 on a CPU with native bf16 and on CUDA, else
    float32) on pre-loaded tensors of the same input size and batch size. Goal: >= 0.8 of the
    bare throughput, and the same scores for the same images in the same order (max |difference|
    <= :data:`PREDICT_ATOL`, else the case fails with an error).
``train``
    One training epoch of the segmentation (paper 3.1) and direct (paper 3.4) models in the fastai
    Learner as :mod:`cellulib.training.train` runs it (our DataLoaders, the callbacks of
    :func:`cellulib.models.engine.training_callbacks`), against the fastest plain PyTorch loop on this
    hardware (channels-last, the same autocast, fused AdamW) over the same model initialisation,
    the same data tensors pre-loaded, loss and batch size. Goal: >= 0.9 of its throughput
    (overhead <= 10%).
``book``
    The execution time of all chapters in the quick profile, read from the executed notebooks that
    papermill writes (or measured with ``--execute-book``). Goal: within
    `cellulib.bench.bookstatus.BOOK_BUDGET_S`.
``memory``
    Peak resident memory of ``predict`` over many images against few, each in a fresh process.
    Goal: flat (ratio <= 1.1).

Modes: ``--smallest`` (seconds; what the test runs), ``--quick`` (the quick profile's sizes:
about 1.5 minutes on a 2-core CPU with little other load, measured, over 4 minutes when other
jobs keep both cores busy) and the default full mode (the paper profile's sizes: 512 px patches,
256 px segmentation crops and cellularity inputs; meant for a GPU, many times longer on a CPU). On a shared machine ``--threads 1`` gives steadier ratios: two OpenMP threads
stall whenever another job takes one of the cores. ``$CELLULIB_PRECISION=float32`` benchmarks
both sides in float32. Used in the README's performance section. The book's execution-status page
is :mod:`cellulib.bench.bookstatus`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cellulib.bench.bookstatus import BOOK_BUDGET_S, chapter_times, execute_chapters, machine_info
from cellulib.models.engine import precision_label

__all__ = [
    "CASES",
    "MODES",
    "PREDICT_ATOL",
    "bench_features",
    "bench_predict",
    "bench_train",
    "bench_book",
    "bench_memory",
    "run_bench",
    "format_table",
    "main",
]

CASES: tuple[str, ...] = ("features", "predict", "train", "book", "memory")
"""The benchmark cases, in the order they run and print."""

PREDICT_ATOL: float = 0.02
"""Largest accepted |difference| between two scorings of the same image (cellularity, a sigmoid
output in [0, 1]): ours against the reference, and the bf16 forward pass against float32. bf16
keeps 8 significant bits: a logit is off by about 0.4%, and a sigmoid computed in bf16 moves in
steps of 1/256 near 1. Measured: the benchmark's random-init model moves by about 2e-3, the
direct and SR model files of quick-profile runs by at most 0.007 on synthetic patches."""

def _profile_sizes(name: str) -> dict[str, Any]:
    """The patch, crop, batch and cellularity-input sizes of a profile of :mod:`cellulib.data.profiles`.

    The cellularity models' input is ``direct_size`` or, when that is None, the segmentation scale
    (patch side / ``downscale``, a multiple of 32), as :func:`cellulib.training.train.cellularity_input_size`
    computes it for the synthetic patches.
    """
    from cellulib.data.profiles import get_profile, seg_scale_size

    profile = get_profile(name)
    side = int(profile.get("direct_size") or seg_scale_size(profile["size"], profile["downscale"]))
    return {"synth_size": profile["size"], "seg_crop": profile["crop"],
            "seg_bs": profile["seg_bs"], "direct_size": side, "direct_bs": profile["direct_bs"],
            "predict_file_size": profile["size"], "predict_input": side,
            "predict_bs": profile["direct_bs"]}


MODES: dict[str, dict[str, Any]] = {
    "smallest": {
        "repeats": 1, "train_repeats": 1, "profile": "quick",
        "feature_sizes": (64,),
        "predict_images": 8, "predict_file_size": 128, "predict_input": 64, "predict_bs": 4,
        "synth_size": 128, "seg_crop": 64, "seg_bs": 4, "seg_images": 4,
        "direct_size": 64, "direct_bs": 4, "direct_images": 4,
        "memory_counts": (24, 6), "memory_input": 64, "memory_file_size": 96,
    },
    # the sizes of the quick profile: what the book trains and scores on a CPU; 3 batches a timed
    # epoch
    "quick": {
        "repeats": 5, "train_repeats": 3, "profile": "quick",
        "feature_sizes": (256, 512),
        "predict_images": 32, "seg_images": 24, "direct_images": 48,
        "memory_counts": (200, 50), "memory_input": 64, "memory_file_size": 256,
        **_profile_sizes("quick"),
    },
    # the sizes of the paper profile (512 px patches, 256 px crops, batch 16)
    "full": {
        "repeats": 5, "train_repeats": 5, "profile": "paper",
        "feature_sizes": (256, 512),
        "predict_images": 64, "seg_images": 32, "direct_images": 32,
        "memory_counts": (1000, 100), "memory_input": 64, "memory_file_size": 256,
        **_profile_sizes("paper"),
    },
}
"""Sizes per mode; the quick and full modes take theirs from the quick and paper profiles
(:func:`_profile_sizes`), whose learning-rate schedules the ``train`` case uses. ``predict_input`` is the model's input side (the files are
``predict_file_size`` pixels and get resized to it, as ``cellulib predict`` does). Training epochs
are the slowest measurement, so the quick mode times them 3 times and the rest 5 times. A timed
epoch has 3 batches in the quick mode (a quick-profile epoch of the book has 10), so the set-up of
each fastai ``fit`` call weighs somewhat more here than in the book."""

_FEATURE_GOAL = 10.0
_PREDICT_GOAL = 0.8
_TRAIN_GOAL = 0.9  # fastai images/s over plain images/s: overhead <= 10%
_MEMORY_GOAL = 1.1
# Sums over the same pixels in another order differ by rounding only.
_SUM_RTOL = 1e-9


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _row(case: str, ours: float | None, reference: float | None, unit: str,
         ratio: float | None, goal: str, met: bool | None, note: str,
         details: dict | None = None) -> dict[str, Any]:
    return {"case": case, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "goal": goal, "met": met, "note": note, "details": details or {}}


def _unavailable(case: str, unit: str, goal: str, why: str) -> dict[str, Any]:
    return _row(case, None, None, unit, None, goal, None, f"not available: {why}")


def _time_side_by_side(fns: dict[str, Callable[[], Any]], repeats: int,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved so that drifting load hits all alike.

    After ``warmup`` untimed calls of each, every repeat calls each function once, in alternating
    order (forward, then reversed), so neither side always runs first after the other.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _best_ratio(times: dict[str, list[float]], faster: str = "ours",
                slower: str = "reference") -> float:
    """Ratio of the fastest call of each side: less sensitive to other jobs on a shared machine
    than the medians, reported beside them (``timeit`` reports minima for the same reason)."""
    return min(times[slower]) / min(times[faster])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# the machine


def _machine_line(machine: dict[str, Any], load_end: float | None = None) -> str:
    line = (f"machine: {machine['cpus_available']} of {machine['cpu_count']} CPU cores "
            f"({machine['cpu_model']}), torch {machine['torch']} with "
            f"{machine['torch_threads']} thread{'' if machine['torch_threads'] == 1 else 's'}, "
            f"device {machine['device']}"
            + (f" ({machine['precision']})" if machine.get("precision") else "")
            + f", Python {machine['python']}")
    if machine.get("load_average") is not None:
        line += f"; load average {machine['load_average']:.1f} at the start"
        if load_end is not None:
            line += f", {load_end:.1f} at the end"
    return line


# --------------------------------------------------------------------------------------------------
# 1. features


def _probability_maps(size: int, seed: int = 0):
    """A (4, size, size) float32 map shaped like a segmentation output on a synthetic patch.

    The nuclei masks of a rendered H&E patch (:func:`cellulib.data.synth.render_patch`), blurred into
    soft boundaries, scaled by a slowly varying confidence and given a low noise floor, as a
    sigmoid output has: crowded, touching malignant nuclei, scattered lymphocytes, few normal ones.
    """
    import cv2
    import numpy as np

    from cellulib.data.synth import render_patch

    patch = render_patch(size, cellularity=0.5, seed=seed)
    rng = np.random.default_rng(seed)
    probs = np.empty((4, size, size), np.float32)
    for c, key in enumerate(("normal_nuclei", "lymphocyte_nuclei", "malignant_nuclei")):
        soft = cv2.GaussianBlur(patch.masks[key].astype(np.float32), (0, 0), 1.5)
        field = cv2.GaussianBlur(rng.random((size, size), dtype=np.float32), (0, 0), 8)
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        noise = rng.exponential(0.004, (size, size)).astype(np.float32)
        probs[c] = np.clip(soft * (0.6 + 0.4 * field) + noise, 0, 1)
    probs[3] = 1 - probs[:3].max(axis=0)
    return probs


def _compare_features(ours, ref) -> tuple[bool, str]:
    """Whether two 81-feature Series agree: counts exactly, sums to rounding; and a summary."""
    import numpy as np

    counts = [n for n in ours.index if "_area_" in n or "_blob_count_" in n]
    sums = [n for n in ours.index if n not in counts]
    count_diff = [n for n in counts if ours[n] != ref[n]]
    scale = np.maximum(np.abs(ref[sums].to_numpy()), 1e-300)
    rel = float(np.max(np.abs(ours[sums].to_numpy() - ref[sums].to_numpy()) / scale))
    same = not count_diff and rel <= _SUM_RTOL
    verdict = "equal" if not count_diff else "DIFFER: " + ", ".join(count_diff[:4])
    text = f"areas and blob counts {verdict}, sums within {rel:.1e} relative"
    return same, text


def bench_features(sizes: Sequence[int] = (256, 512), repeats: int = 3, seed: int = 0,
                   verbose: bool = False) -> list[dict[str, Any]]:
    """Time the 81 features, ours against the authors' way, on 4-channel maps of each size.

    Paper section 3.3 / SPEC 3.2. The reference is
    :func:`cellulib.models.features.extract_features_reference` (skimage ``blob_log`` per threshold,
    numpy sums). Both run on the same map (:func:`_probability_maps`, a synthetic patch's nuclei as
    a segmentation output would show them); the values are compared as well as the times. Used in
    the README's performance section.

    Parameters
    ----------
    sizes : sequence of int
        Map sides (4 x size x size each).
    repeats : int
        Timed calls of each implementation per size (medians are reported).
    seed : int
        Seed of the synthetic maps.
    verbose : bool
        Log progress on stderr.

    Returns
    -------
    list of dict
        One row per size: ``ours`` and ``reference`` in ms per map, ``ratio`` = reference / ours
        (the speed-up), ``met`` when the speed-up is >= 10 and the values agree.
    """
    from cellulib.models.features import extract_features, extract_features_reference

    rows = []
    tiny = _probability_maps(32, seed)
    extract_features(tiny)  # imports and first-call costs are not what is measured
    extract_features_reference(tiny)
    goal = f"ratio >= {_FEATURE_GOAL:g} (speed-up), same values"
    for size in sizes:
        probs = _probability_maps(int(size), seed)
        _log(f"features {probs.shape}: {repeats} repeats", verbose)
        ours_f, ref_f = extract_features(probs), extract_features_reference(probs)
        same, agreement = _compare_features(ours_f, ref_f)
        times = _time_side_by_side({"ours": lambda p=probs: extract_features(p),
                                    "reference": lambda p=probs: extract_features_reference(p)},
                                   repeats, warmup=0)
        ours, ref = 1000 * _median(times["ours"]), 1000 * _median(times["reference"])
        ratio = ref / ours
        agreement += f"; best-of-{repeats} ratio {_best_ratio(times):.1f}"
        rows.append(_row(
            f"features 4x{size}x{size}", ours, ref, "ms/map", ratio, goal,
            bool(ratio >= _FEATURE_GOAL and same),
            f"81 features of one map; reference: skimage blob_log per threshold + numpy sums; "
            f"{agreement}; {int(ours_f.filter(like='blob_count').sum())} blobs in all",
            {"ours_s": times["ours"], "reference_s": times["reference"], "identical": same}))
    return rows


# --------------------------------------------------------------------------------------------------
# 2. predict


def _write_patches(folder: Path, n: int, size: int, seed: int = 0, distinct: int = 8) -> list[Path]:
    """Write ``n`` synthetic H&E TIFFs of ``size`` pixels (uncompressed RGB, as BreastPathQ's).

    ``distinct`` patches are rendered and written in turn under different names: decoding and
    resizing cost the same for any content of the same size.
    """
    import tifffile

    from cellulib.data.synth import render_patch

    folder.mkdir(parents=True, exist_ok=True)
    imgs = [render_patch(size, seed=seed + k, with_masks=False).img
            for k in range(min(n, distinct))]
    paths = []
    for k in range(n):
        path = folder / f"{90000 + k // 10}_{k % 10 + 1}.tif"
        tifffile.imwrite(path, imgs[k % len(imgs)], photometric="rgb", metadata=None)
        paths.append(path)
    return paths


def _save_direct_model(path: Path, input_size: int, seed: int = 0) -> Path:
    import torch

    from cellulib import save_model
    from cellulib.models.networks import direct_model

    torch.manual_seed(seed)
    model = direct_model("resnet34", task="regression")
    return save_model(model, path, preprocess={"input_size": int(input_size),
                                               "normalize": "minus_one_one"})


def _bare_scores(model, x, batch_size: int, device, dtype):
    """The plain inference loop: forward passes over pre-loaded inputs, batch by batch.

    ``torch.inference_mode`` and one autocast context around all batches (so float32 weights are
    cast to ``dtype`` once, not per batch; the predict case gives a model whose weights
    :func:`cellulib.models.engine.precast_weights` already stored in ``dtype``); the outputs
    decoded to cellularity in float32 (``to_cellularity``), as :meth:`cellulib.inference.predict.Predictor.score_batch` does.
    """
    import torch

    from cellulib.models import engine

    with torch.inference_mode():
        with engine.autocast(device, dtype):
            outputs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        scores = model.to_cellularity(torch.cat(outputs).float()).reshape(-1)
        result = scores.double().cpu().numpy()
    _sync(device)
    return result


def _check_same_predictions(preds, paths: Sequence[str], scores, what: str,
                            atol: float | None = None) -> float:
    """Largest |ours - reference| over the same images in the same order, or a RuntimeError.

    ``preds`` is our output (columns ``path``, ``cellularity``, ``error``), ``paths`` and
    ``scores`` the reference's images and scores in the reference's order. Ours must list exactly
    those images, in that order, all scored, each within ``atol`` (default
    :data:`PREDICT_ATOL`) of the reference: a comparison of other images, or of the same images
    in another order, says nothing about either side.
    """
    import numpy as np

    atol = PREDICT_ATOL if atol is None else atol
    ours_paths = [str(p) for p in preds["path"]]
    paths = [str(p) for p in paths]
    if ours_paths != paths:
        k = next((i for i, (a, b) in enumerate(zip(ours_paths, paths)) if a != b),
                 min(len(ours_paths), len(paths)))
        mine = ours_paths[k] if k < len(ours_paths) else "(nothing)"
        theirs = paths[k] if k < len(paths) else "(nothing)"
        raise RuntimeError(
            f"predict benchmark: ours and the {what} did not score the same images in the same "
            f"order ({len(ours_paths)} vs {len(paths)} rows); row {k}: ours {mine}, the {what} "
            f"{theirs}")
    errors = [str(e) for e in preds["error"] if isinstance(e, str) and e]
    if errors:
        raise RuntimeError(f"predict benchmark: {len(errors)} image(s) failed: {errors[0]}")
    diff = np.abs(np.asarray(preds["cellularity"], dtype=np.float64)
                  - np.asarray(scores, dtype=np.float64))
    worst = int(np.argmax(np.where(np.isfinite(diff), diff, np.inf)))
    if not np.isfinite(diff).all() or diff[worst] > atol:
        raise RuntimeError(
            f"predict benchmark: ours and the {what} disagree on {paths[worst]}: "
            f"{preds['cellularity'].iloc[worst]} vs {scores[worst]:.6f} (|difference| "
            f"{diff[worst]:.3g} > {atol:g}); a speed comparison of different answers means "
            "nothing")
    return float(diff.max()) if len(diff) else 0.0


def bench_predict(n_images: int = 48, file_size: int = 512, input_size: int = 128,
                  batch_size: int = 16, repeats: int = 3, workdir: str | os.PathLike | None = None,
                  seed: int = 0, workers: int = 2, verbose: bool = False) -> dict[str, Any]:
    """Time ``cellulib predict`` end to end against the fastest bare forward pass of the model.

    Paper section 3.4 applied to new images. Ours: :func:`cellulib.inference.predict.predict_to_csv` on a
    folder of ``n_images`` synthetic ``file_size`` TIFFs with a loaded ResNet-34 direct model
    (random init, ``input_size`` recorded in its file), precision ``"auto"``: decoding, resizing,
    [-1, 1] scaling, forward pass under :func:`cellulib.models.engine.amp_dtype`'s mixed precision and
    CSV writing. Reference: the fastest plain PyTorch inference loop on this hardware,
    :func:`_bare_scores` of the same model in channels-last layout with ``torch.autocast`` to the
    same dtype (bf16 on a CPU with native bf16 and on CUDA; float32 elsewhere), over the same
    images already decoded, resized, scaled, stacked on the device and in channels-last layout,
    in batches of ``batch_size``. The float32 NCHW forward pass (the textbook loop) is timed
    beside them. Loading the model file happens once and is reported separately. Both run on
    CUDA when available. Used in the README's performance section.

    The scores are checked, not only timed (:func:`_check_same_predictions`): ours must list the
    reference's images in the reference's order (the order of
    :func:`cellulib.inference.predict.collect_images`), each within :data:`PREDICT_ATOL` of the reference,
    and the mixed-precision reference within :data:`PREDICT_ATOL` of float32; otherwise a
    RuntimeError says which image differs.

    Returns
    -------
    dict
        ``ours`` and ``reference`` in images/s, ``ratio`` = ours / reference (goal >= 0.8). The
        note gives the float32 NCHW throughput and the two largest differences.
    """
    goal = f"ratio >= {_PREDICT_GOAL:g}, |diff| <= {PREDICT_ATOL:g}"
    try:
        from cellulib.files.imageio import collect_images
        from cellulib.inference.predict import Predictor, predict_to_csv
    except ImportError as exc:
        return _unavailable("predict", "img/s", goal,
                            f"cellulib.inference.predict cannot be imported ({exc})")
    import numpy as np
    import pandas as pd
    import torch

    from cellulib import load_model
    from cellulib.data.transforms import normalize_image
    from cellulib.files.imageio import read_image
    from cellulib.models import engine

    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        _log(f"predict: writing {n_images} images of {file_size} px", verbose)
        _write_patches(tmp / "images", n_images, file_size, seed)
        # the images in the order predict scores a folder (file-name order)
        files = collect_images(tmp / "images")
        model_path = _save_direct_model(tmp / "model.pt", input_size, seed)
        device = engine.resolve_device()
        amp = engine.amp_dtype(device)
        start = time.perf_counter()
        predictor = Predictor(model_path, device=device, batch_size=batch_size, workers=workers)
        load_s = time.perf_counter() - start
        textbook, _ = load_model(model_path)
        textbook.to(device).eval()
        fastest = copy.deepcopy(textbook).to(memory_format=torch.channels_last)
        # the pre-loaded batch: the same pixels predict feeds the network
        prepared = np.stack([predictor.prepare(read_image(p), p)[0] for p in files])
        x = torch.from_numpy(normalize_image(prepared)).permute(0, 3, 1, 2)
        x = x.contiguous().to(device)
        x_cl = engine.channels_last(x)
        # its weights stored in the autocast dtype once, as predict stores them: both forward
        # passes are the same arithmetic, bit for bit, and neither casts per batch
        fastest = engine.precast_weights(fastest, x_cl[:1], device, amp)
        out_csv = tmp / "preds.csv"

        def ours() -> None:
            predict_to_csv(predictor, tmp / "images", out_csv, progress=False)

        ref_label = precision_label(amp, channels_last=True)
        _log(f"predict: {repeats} repeats of {n_images} images at {input_size} px on {device}, "
             f"reference {ref_label}", verbose)
        times = _time_side_by_side({
            "ours": ours,
            "reference": lambda: _bare_scores(fastest, x_cl, batch_size, device, amp),
            "float32": lambda: _bare_scores(textbook, x, batch_size, device, None)}, repeats)
        preds = pd.read_csv(out_csv, keep_default_na=False,
                            converters={"cellularity": lambda s: float(s) if s else math.nan})
        ref_scores = _bare_scores(fastest, x_cl, batch_size, device, amp)
        f32_scores = _bare_scores(textbook, x, batch_size, device, None)
        diff = _check_same_predictions(preds, files, ref_scores, "reference")
        amp_diff = _check_same_predictions(
            pd.DataFrame({"path": files, "cellularity": ref_scores, "error": ""}), files,
            f32_scores, "float32 forward pass")
    ours_ips, ref_ips = n_images / _median(times["ours"]), n_images / _median(times["reference"])
    f32_ips = n_images / _median(times["float32"])
    ratio = ours_ips / ref_ips
    note = (f"best-of-{repeats} ratio {_best_ratio(times):.2f}; {n_images} TIFFs "
            f"{file_size}x{file_size} -> resnet34 direct model at {input_size}x{input_size}, "
            f"batch {batch_size}, {workers} decoding workers, device {device}, "
            f"{predictor.precision}; reference: bare forward on pre-loaded tensors, {ref_label}; "
            f"textbook float32 NCHW forward {f32_ips:.1f} img/s; the same {n_images} images in "
            f"the same order: ours vs reference max |diff| "
            f"{diff:.1e}, reference vs float32 {amp_diff:.1e} (tolerance {PREDICT_ATOL:g}); "
            f"loading the model file once: {load_s:.2f} s")
    return _row("predict", ours_ips, ref_ips, "img/s", ratio, goal, bool(ratio >= _PREDICT_GOAL),
                note, {"ours_s": times["ours"], "reference_s": times["reference"],
                       "float32_s": times["float32"], "model_load_s": load_s,
                       "max_abs_diff": diff, "amp_vs_float32_max_abs_diff": amp_diff,
                       "paths": [str(p) for p in files], "precision": predictor.precision,
                       "reference_precision": ref_label, "device": str(device)})


# --------------------------------------------------------------------------------------------------
# 3. train


def _train_only_callback():
    """A fastai callback that skips validation and counts the training images of an epoch."""
    from fastai.callback.core import Callback, CancelValidException

    class TrainOnly(Callback):
        order = -100  # before the Recorder, so validation never starts

        def __init__(self) -> None:
            self.n_images = 0

        def after_batch(self) -> None:
            if self.training:
                self.n_images += len(self.learn.xb[0])

        def before_validate(self) -> None:
            raise CancelValidException()

    return TrainOnly()


def _engine_callbacks(learn) -> list[str]:
    """Names of the Learner's callbacks that come from :func:`cellulib.models.engine.training_callbacks`
    (mixed precision and channels-last) and :func:`cellulib.models.engine.asynchronous` (the
    running losses kept on the device)."""
    names = {"ChannelsLast", "CPUAutocast", "MixedPrecision", "Float32", "DeviceLosses"}
    return [type(cb).__name__ for cb in learn.cbs if type(cb).__name__ in names]


def _adamw(params, lr: float):
    """The fastest stock Adam of this torch: fused AdamW (foreach where fused is unavailable),
    set to fastai's Adam defaults (decoupled weight decay 0.01, betas (0.9, 0.99), eps 1e-5)."""
    import torch

    kw = dict(lr=lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw)


class _PlainLoop:
    """The fastest plain PyTorch training loop on this hardware, one epoch per call.

    The model in channels-last layout, the batches pre-loaded and in channels-last layout,
    forward under ``torch.autocast`` to ``dtype`` (bf16 on a CPU with native bf16, CUDA AMP on a
    GPU, none for float32), the loss in float32, fused AdamW (:func:`_adamw`) at a constant
    learning rate, a gradient scaler for fp16 only. No callbacks, no logging, no data loading.
    """

    def __init__(self, model, batches, loss_func, lr: float, device, dtype) -> None:
        import torch

        from cellulib.models import engine

        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.batches = [(engine.channels_last(xb), yb) for xb, yb in batches]
        self.loss_func, self.device, self.dtype = loss_func, device, dtype
        self.opt = _adamw(self.model.parameters(), lr)
        self.scaler = (torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)

    def forward_backward(self, xb, yb) -> None:
        from cellulib.models import engine

        with engine.autocast(self.device, self.dtype):
            pred = self.model(xb)
        loss = self.loss_func(pred.float(), yb)
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def epoch(self) -> int:
        self.model.train()
        n = 0
        for xb, yb in self.batches:
            self.forward_backward(xb, yb)
            self.step()
            self.opt.zero_grad(set_to_none=True)
            n += len(xb)
        _sync(self.device)
        return n


def _opt_name(learn) -> str:
    opt = getattr(learn.opt, "opt", None)  # fastai's OptimWrapper around a torch optimizer
    if opt is not None:
        fused = " (fused)" if opt.defaults.get("fused") else ""
        return f"torch {type(opt).__name__}{fused}"
    return f"fastai {getattr(learn.opt_func, '__name__', type(learn.opt).__name__)}"


def _step_ms(forward_backward, step, zero_grad, device, n: int = 3) -> float:
    """Fastest of ``n`` optimizer steps after one forward/backward pass, in ms."""
    forward_backward()
    best = math.inf
    for _ in range(n):
        start = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    zero_grad()
    return 1000 * best


def _train_pair(name: str, learn, fit: Callable[[Any], None], lr: float, repeats: int,
                verbose: bool) -> dict[str, Any]:
    import torch

    from cellulib.models import engine

    device = learn.dls.device or torch.device("cpu")
    dtype = engine.amp_dtype(device)
    dl = learn.dls.train
    # the reference: a copy of the same initial weights over the same data tensors
    plain = _PlainLoop(copy.deepcopy(learn.model), [(xb, yb) for xb, yb in dl], learn.loss_func,
                       lr, device, dtype)
    counter = _train_only_callback()
    counts = {"ours": 0, "reference": 0}

    def ours() -> None:
        counter.n_images = 0
        learn.add_cb(counter)
        try:
            fit(learn)  # the callers' `train.fit(..., progress=False)`: no bar, no logging
        finally:
            learn.remove_cb(counter)
        _sync(device)
        counts["ours"] = counter.n_images

    def reference() -> None:
        counts["reference"] = plain.epoch()

    _log(f"train {name}: {repeats} repeats of {len(dl)} batches of {dl.bs}, "
         f"{precision_label(dtype, channels_last=True)}", verbose)
    times = _time_side_by_side({"ours": ours, "reference": reference}, repeats)
    if counts["ours"] != counts["reference"]:
        raise RuntimeError(f"train {name}: the Learner saw {counts['ours']} images per epoch, the "
                           f"plain loop {counts['reference']}")
    # where the time goes: one optimizer step of each side, after the same batch
    xb, yb = plain.batches[0]

    def ours_forward_backward() -> None:
        learn.model.train()
        with engine.autocast(device, dtype):
            pred = learn.model(engine.channels_last(xb))
        learn.loss_func(pred.float(), yb).backward()

    step_ms = {"ours": _step_ms(ours_forward_backward, learn.opt.step, learn.opt.zero_grad,
                                device),
               "reference": _step_ms(lambda: plain.forward_backward(xb, yb), plain.step,
                                     lambda: plain.opt.zero_grad(set_to_none=True), device)}
    n = counts["ours"]
    ours_ips, ref_ips = n / _median(times["ours"]), n / _median(times["reference"])
    ratio = ours_ips / ref_ips
    return _row(
        f"train {name}", ours_ips, ref_ips, "img/s", ratio,
        f"ratio >= {_TRAIN_GOAL:g} (overhead <= {100 * (1 - _TRAIN_GOAL):.0f}%)",
        bool(ratio >= _TRAIN_GOAL), "",
        {"ours_s": times["ours"], "reference_s": times["reference"], "images_per_epoch": n,
         "batches_per_epoch": len(plain.batches), "overhead": 1 - ratio,
         "best_ratio": _best_ratio(times), "device": str(device),
         "workers": int(dl.fake_l.num_workers),
         "precision": precision_label(dtype), "callbacks": _engine_callbacks(learn),
         "optimizer_step_ms": step_ms,
         "ours_optimizer": _opt_name(learn), "reference_optimizer": "torch AdamW"
         + (" (fused)" if plain.opt.defaults.get("fused") else " (foreach)")})


def bench_train(seg_crop: int = 96, seg_bs: int = 8, seg_images: int = 24,
                direct_size: int = 96, direct_bs: int = 16, direct_images: int = 48,
                synth_size: int = 192, repeats: int = 3, workdir: str | os.PathLike | None = None,
                seed: int = 0, verbose: bool = False, profile: str = "quick"
                ) -> list[dict[str, Any]]:
    """Training images/s of the fastai Learners against the fastest plain PyTorch loop.

    Paper sections 4.2 (weak segmentation: FPN on the ELU ResNet-34, BCE - Jaccard loss) and 4.4
    (direct ResNet-34 regression, MSE). Ours: one epoch of the Learner as :mod:`cellulib.training.train`
    builds and fits it (:func:`cellulib.training.train.seg_learner`, :func:`cellulib.training.train.learner`,
    :func:`cellulib.training.train.fit` with the learning rates and schedules of ``profile``: in the quick
    profile exponential decay for the segmentation net, one-cycle for the direct model): our
    DataLoaders (augmentation included), the optimizer of :func:`cellulib.training.train.learner`, the
    callbacks of :func:`cellulib.models.engine.training_callbacks` (on a CPU with native bf16:
    channels-last and bf16 autocast; on CUDA: channels-last and AMP), the DataLoader workers of
    :func:`cellulib.data.breastpathq.loader_workers` (none on a CPU; augmentation in workers on a GPU), no
    progress bar or logging, validation skipped. Reference: :class:`_PlainLoop`, the fastest plain loop on this hardware,
    over a copy of the same initial model, the same batches (taken from the same DataLoader once,
    before timing, and kept as tensors), the same loss and batch size. Data: a small synthetic
    BreastPathQ folder. The note gives one optimizer step of each side (fastai's Adam steps
    parameter by parameter in Python, torch's fused AdamW in one kernel), a large part of the
    difference on a CPU. Used in the README's performance section.

    Returns
    -------
    list of dict
        Rows ``train seg`` and ``train direct``: images/s, ``ratio`` = fastai / plain (goal
        >= 0.9, i.e. overhead <= 10%).
    """
    import torch
    from fastai.losses import MSELossFlat
    from fastai.torch_core import set_seed

    from cellulib.data import breastpathq
    from cellulib.data.profiles import get_profile
    from cellulib.data.synthset import make_breastpathq
    from cellulib.models import networks
    from cellulib.training.train import CellularityMSE, fit, learner, seg_learner

    profile = get_profile(profile)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-train-") as tmp:
        _log(f"train: synthetic data ({direct_images} patches of {synth_size} px)", verbose)
        root = make_breastpathq(Path(tmp) / "data", n_train=direct_images, n_val=2, n_cells=6,
                                size=synth_size, seed=seed, progress=False)
        rows = []
        set_seed(seed)
        dls = breastpathq.seg_dataloaders(root, size=seg_crop, downscale=profile["downscale"], bs=seg_bs,
                                   seed=seed, patches_per_epoch=seg_images)
        lr, schedule = profile["seg_lr"], profile["seg_schedule"]
        rows.append(_train_pair(
            "seg", seg_learner(dls),
            lambda lrn: fit(lrn, 1, lr, schedule, profile["seg_lr_end"], progress=False),
            lr, repeats, verbose))
        rows[-1]["note"] = (f"FPN segmentation net, {seg_crop}px crops, batch {seg_bs}, "
                            f"{rows[-1]['details']['images_per_epoch']} images/epoch, "
                            f"schedule {schedule}")
        set_seed(seed)
        dls = breastpathq.cellularity_dataloaders(root, size=direct_size, bs=direct_bs, seed=seed)
        learn = learner(dls, networks.direct_model("resnet34", task="regression"), MSELossFlat(),
                        [CellularityMSE()])
        lr2, schedule2 = profile["direct_lr"], profile["direct_schedule"]
        rows.append(_train_pair(
            "direct", learn, lambda lrn: fit(lrn, 1, lr2, schedule2, lr2 / 10, progress=False),
            lr2, repeats, verbose))
        rows[-1]["note"] = (f"resnet34 regression, {direct_size}px, batch {direct_bs}, "
                            f"{rows[-1]['details']['images_per_epoch']} images/epoch, "
                            f"schedule {schedule2}")
    for row in rows:
        d = row["details"]
        per_batch = 1000 * _median(d["reference_s"]) / d["batches_per_epoch"]
        row["note"] += (
            f"; overhead {100 * d['overhead']:+.1f}% (best-of-{repeats}: "
            f"{100 * (1 - d['best_ratio']):+.1f}%); {d['precision']} (Learner callbacks: "
            f"{', '.join(d['callbacks']) or 'none'}); reference: plain PyTorch loop on the same "
            f"model, data tensors pre-loaded, loss and batch size, {d['reference_optimizer']}; "
            f"optimizer step {d['optimizer_step_ms']['ours']:.0f} ms ({d['ours_optimizer']}) vs "
            f"{d['optimizer_step_ms']['reference']:.0f} ms, of a {per_batch:.0f} ms reference "
            f"batch; device {d['device']}, DataLoader workers {d['workers']} "
            f"(data.loader_workers); torch threads {torch.get_num_threads()}")
    return rows


# --------------------------------------------------------------------------------------------------
# 4. the book


def bench_book(chapters_dir: str | os.PathLike = "book/chapters",
               notebooks_dir: str | os.PathLike | None = "notebooks", execute: bool = False,
               verbose: bool = False) -> dict[str, Any]:
    """Total execution time of the book's chapters (quick profile) against the book's budget,
    `cellulib.bench.bookstatus.BOOK_BUDGET_S`.

    By default reads the executed chapters in ``chapters_dir`` (:func:`chapter_times`); with
    ``execute=True`` first executes the notebooks of ``notebooks_dir`` with papermill into a
    temporary folder (working directory ``chapters_dir``, as ``make chapters``) and reads those.
    Used in the README's performance section.

    Returns
    -------
    dict
        ``ours`` = total seconds, ``reference`` = the budget, ``ratio`` = total / budget (goal <= 1). Not
        available (``ratio`` None) when no executed chapter is found; ``met`` is None while some
        chapter is missing or has failed.
    """
    goal = f"ratio <= 1 (<= {BOOK_BUDGET_S:.0f} s from scratch, 2-core CPU)"
    chapters = Path(chapters_dir)
    if execute:
        with tempfile.TemporaryDirectory(prefix="bench-book-") as tmp:
            execute_chapters(notebooks_dir, tmp, cwd=chapters if chapters.is_dir() else None,
                             verbose=verbose)
            rows = chapter_times(tmp, notebooks_dir)
        source = f"executed now from {notebooks_dir}"
    else:
        if not chapters.is_dir():
            return _unavailable("book", "s", goal, f"no executed chapters: {chapters} is not a "
                                "folder (run `make chapters`, or pass --execute-book)")
        rows = chapter_times(chapters, notebooks_dir)
        source = f"read from the executed notebooks in {chapters}"
    timed = [r for r in rows if r["seconds"] is not None]
    if not timed:
        return _unavailable("book", "s", goal, f"no executed chapter with a recorded duration "
                            f"in {chapters} (run `make chapters`, or pass --execute-book)")
    total = float(sum(r["seconds"] for r in timed))
    incomplete = [r["chapter"] for r in rows if r["status"] != "ok"]
    ratio = total / BOOK_BUDGET_S
    per = ", ".join(f"{r['chapter']} {r['seconds']:.0f} s" for r in timed)
    note = f"{len(timed)} chapters {source}: {per}"
    if incomplete:
        note += f"; incomplete (not executed or failed): {', '.join(incomplete)}"
    return _row("book", total, BOOK_BUDGET_S, "s", ratio, goal,
                None if incomplete else bool(ratio <= 1), note, {"chapters": rows})


# --------------------------------------------------------------------------------------------------
# 5. memory


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory map.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` would not do in a subprocess: Linux carries the parent's
    resident size at fork time over exec into the child's ``ru_maxrss``, so a child of a large
    parent reports the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _memory_child(model_path: str, images_dir: str, n_images: int, batch_size: int,
                  out_csv: str, threads: int) -> None:
    """Run in a fresh interpreter: predict ``n_images`` files, print peak RSS as JSON."""
    import torch

    from cellulib.inference.predict import Predictor, predict_to_csv

    torch.set_num_threads(threads)
    files = sorted(Path(images_dir).glob("*.tif"))[:n_images]
    predictor = Predictor(model_path, batch_size=batch_size, workers=2)
    # one batch first: lazy imports, thread pools and allocator caches are set-up, not growth
    predict_to_csv(predictor, files[:batch_size], out_csv + ".warm.csv", progress=False)
    setup = _peak_rss_mib()
    summary = predict_to_csv(predictor, files, out_csv, progress=False)
    # Linux (6.2 on) keeps a process's resident size in per-CPU counters and reads them
    # approximately, so two reads of VmHWM can go down by a fraction of a MiB (1277.69 MiB at
    # set-up, 1277.50 at the end, in one run): a peak is the largest reading taken
    peak = max(setup, _peak_rss_mib())
    print(json.dumps({"setup_peak_mib": setup, "peak_mib": peak,
                      "n_ok": summary["n_ok"], "n_images": summary["n_images"]}))


def _start_memory_child(model_path: Path, images_dir: Path, n: int, batch_size: int,
                        out_csv: Path, threads: int) -> subprocess.Popen:
    code = ("import sys; from cellulib.bench.suite import _memory_child; "
            "_memory_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "
            "sys.argv[5], int(sys.argv[6]))")
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in
                                                            [env.get("PYTHONPATH")] if p])
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return subprocess.Popen([sys.executable, "-c", code, str(model_path), str(images_dir), str(n),
                             str(batch_size), str(out_csv), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _memory_result(proc: subprocess.Popen, n: int) -> dict[str, Any]:
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark: predicting {n} images in a subprocess failed "
                           f"(exit {proc.returncode}): {err.strip()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def bench_memory(counts: tuple[int, int] = (1000, 100), input_size: int = 64,
                 file_size: int = 256, batch_size: int = 16,
                 workdir: str | os.PathLike | None = None, seed: int = 0,
                 verbose: bool = False) -> dict[str, Any]:
    """Peak resident memory of ``cellulib predict`` on many images against few: flat or growing.

    Each count runs :func:`cellulib.inference.predict.predict_to_csv` in a fresh Python process (the peak RSS
    of a process never goes down, so the two runs cannot share one) on the first ``n`` of the
    same synthetic ``file_size`` TIFFs with a ResNet-34 direct model at ``input_size``, with this
    process's number of torch threads. The two processes run at the same time (memory is per
    process; only their speed would suffer). Each reports its peak after a one-batch warm-up
    (set-up: Python, torch, the model) and at the end.
    Used in the README's performance section.

    Returns
    -------
    dict
        ``ours`` = peak MiB with ``counts[0]`` images, ``reference`` = with ``counts[1]``,
        ``ratio`` = ours / reference (goal <= 1.1); the note gives the growth over set-up.
    """
    goal = f"ratio <= {_MEMORY_GOAL:g} (flat)"
    try:
        import resource  # noqa: F401  (Unix only)

        import cellulib.inference.predict  # noqa: F401
    except ImportError as exc:
        return _unavailable("memory", "MiB", goal, f"{exc}")
    import torch

    large, small = (int(c) for c in counts)
    if not large > small >= 1:
        raise ValueError(f"memory benchmark: counts must be (large, small) with large > small >= "
                         f"1, got {counts}")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        _log(f"memory: writing {large} images of {file_size} px", verbose)
        _write_patches(tmp / "images", large, file_size, seed)
        model_path = _save_direct_model(tmp / "model.pt", input_size, seed)
        _log(f"memory: predict on {small} and {large} images in two subprocesses", verbose)
        procs = {n: _start_memory_child(model_path, tmp / "images", n, batch_size,
                                        tmp / f"preds-{n}.csv", torch.get_num_threads())
                 for n in (small, large)}
        result = {}
        try:
            for n, proc in procs.items():
                result[n] = _memory_result(proc, n)
                if result[n]["n_ok"] != n:
                    raise RuntimeError(f"memory benchmark: {result[n]['n_ok']} of {n} images "
                                       "scored")
        finally:
            for proc in procs.values():  # a failed run must not leave the other one behind
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    ours, ref = result[large]["peak_mib"], result[small]["peak_mib"]
    growth = {n: result[n]["peak_mib"] - result[n]["setup_peak_mib"] for n in (small, large)}
    ratio = ours / ref
    note = (f"peak RSS of a predict process, {large} vs {small} images ({file_size}px TIFFs, "
            f"input {input_size}px, batch {batch_size}); growth after set-up "
            f"{growth[large]:.1f} MiB vs {growth[small]:.1f} MiB")
    return _row("memory", ours, ref, "MiB", ratio, goal, bool(ratio <= _MEMORY_GOAL), note,
                {"runs": {str(n): result[n] for n in result}})


# --------------------------------------------------------------------------------------------------
# the whole benchmark


def run_bench(mode: str = "quick", cases: Sequence[str] = CASES, repeats: int | None = None,
              chapters_dir: str | os.PathLike = "book/chapters",
              notebooks_dir: str | os.PathLike | None = "notebooks", execute_book: bool = False,
              seed: int = 0, verbose: bool = True, epoch_batches: int | None = None,
              predict_images: int | None = None) -> dict[str, Any]:
    """Run the benchmark cases of a mode and return the machine, the rows and the wall time.

    See the module description for the cases and :data:`MODES` for the sizes. Used by
    ``python -m cellulib.bench`` and the README's performance section.

    Parameters
    ----------
    mode : {"smallest", "quick", "full"}
    cases : sequence of str
        Any of :data:`CASES`, run in that order.
    repeats : int, optional
        Timed repeats per measurement, training included (default: the mode's).
    chapters_dir, notebooks_dir, execute_book
        For the ``book`` case (see :func:`bench_book`).
    seed : int
        Seed of the synthetic data and the model initialisations.
    verbose : bool
        Log progress on stderr.
    epoch_batches : int, optional
        Batches in a timed training epoch (default: the mode's, 2-3): the ``train`` case then
        trains on ``epoch_batches * bs`` crops and patches, so that a fast GPU runs epochs long
        enough to show whether the DataLoader keeps it fed.
    predict_images : int, optional
        Images of the ``predict`` case (default: the mode's, 8-64): on a GPU, where a forward
        pass of a batch takes a millisecond or two, a few dozen images time mostly the start.

    Returns
    -------
    dict
        ``mode``, ``repeats``, ``train_repeats``, ``machine`` (:func:`machine_info`), ``cases``
        (list of rows with the keys case, ours, reference, unit, ratio, goal, met, note,
        details), ``load_average_end``, ``seconds``, ``started`` and ``command``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cfg = dict(MODES[mode])
    if epoch_batches is not None:
        if epoch_batches < 1:
            raise ValueError(f"epoch_batches must be at least 1, got {epoch_batches}")
        cfg["seg_images"] = epoch_batches * cfg["seg_bs"]
        cfg["direct_images"] = epoch_batches * cfg["direct_bs"]
    if predict_images is not None:
        if predict_images < 1:
            raise ValueError(f"predict_images must be at least 1, got {predict_images}")
        cfg["predict_images"] = int(predict_images)
    reps = int(repeats or cfg["repeats"])
    train_reps = int(repeats or cfg["train_repeats"])
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    start = time.perf_counter()
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    for case in CASES:
        if case not in cases:
            continue
        t0 = time.perf_counter()
        if case == "features":
            rows += bench_features(cfg["feature_sizes"], reps, seed, verbose)
        elif case == "predict":
            rows.append(bench_predict(cfg["predict_images"], cfg["predict_file_size"],
                                      cfg["predict_input"], cfg["predict_bs"], reps, seed=seed,
                                      verbose=verbose))
        elif case == "train":
            rows += bench_train(cfg["seg_crop"], cfg["seg_bs"], cfg["seg_images"],
                                cfg["direct_size"], cfg["direct_bs"], cfg["direct_images"],
                                cfg["synth_size"], train_reps, seed=seed, verbose=verbose,
                                profile=cfg["profile"])
        elif case == "book":
            rows.append(bench_book(chapters_dir, notebooks_dir, execute_book, verbose))
        elif case == "memory":
            rows.append(bench_memory(cfg["memory_counts"], cfg["memory_input"],
                                     cfg["memory_file_size"], seed=seed, verbose=verbose))
        _log(f"{case} done in {time.perf_counter() - t0:.1f} s", verbose)
    return {"mode": mode, "repeats": reps, "train_repeats": train_reps, "machine": machine,
            "cases": rows,
            "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "seconds": time.perf_counter() - start, "started": started,
            "command": "python -m cellulib.bench" + ("" if mode == "full" else f" --{mode}")
            + ("" if epoch_batches is None else f" --epoch-batches {epoch_batches}")
            + ("" if predict_images is None else f" --predict-images {predict_images}")}


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ratio(value: float | None) -> str:
    """A ratio with 3 decimals below 10, so 0.897 against a goal of 0.9 does not print as 0.90."""
    if value is not None and math.isfinite(value) and abs(value) < 10:
        return f"{value:.3f}"
    return _fmt(value)


def _met(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The benchmark result as a text (or Markdown) table, the machine line and the notes.

    Columns: case, ours, reference, unit, ratio, goal, met; the notes (what was compared, on what)
    follow the table, numbered like its rows. Used by ``python -m cellulib.bench`` and for the
    README's performance section (``--markdown``).
    """
    head = ["case", "ours", "reference", "unit", "ratio", "goal", "met"]
    body = [[r["case"], _fmt(r["ours"]), _fmt(r["reference"]), r["unit"], _fmt_ratio(r["ratio"]),
             r["goal"], _met(r["met"])] for r in result["cases"]]
    reps = f"{result['repeats']}"
    if result.get("train_repeats", result["repeats"]) != result["repeats"]:
        reps += f" ({result['train_repeats']} for training)"
    lines = [f"cellulib benchmark ({result['mode']} mode, medians of {reps} repeats, "
             f"{result['seconds']:.0f} s in all, started {result['started']})",
             _machine_line(result["machine"], result.get("load_average_end")), ""]
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(" --- " if k in (0, 3, 5) else " ---: " for k in
                                    range(len(head))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        right = {1, 2, 4}

        def fmt_row(row):
            return "  ".join(str(x).rjust(w) if k in right else str(x).ljust(w)
                             for k, (x, w) in enumerate(zip(row, widths))).rstrip()

        lines += [fmt_row(head), fmt_row(["-" * w for w in widths])]
        lines += [fmt_row(row) for row in body]
    lines.append("")
    lines += [f"{k}. {r['case']}: {r['note']}" for k, r in enumerate(result["cases"], 1)]
    machine = result["machine"]
    loads = [x for x in (machine.get("load_average"), result.get("load_average_end"))
             if x is not None]
    if loads and max(loads) > 0.75 * machine["cpus_available"]:
        lines += ["", f"warning: other jobs were running (load average up to {max(loads):.1f} on "
                  f"{machine['cpus_available']} cores), so the timings are noisy; the best-of "
                  "ratios in the notes are steadier, `--threads 1` avoids threads waiting on "
                  "each other, and a quiet machine gives the figures to publish."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cellulib.bench",
        description="Speed and memory benchmarks: each case times our code and a reference side by "
        "side and prints their ratio against its goal. The book's execution-status page is "
        "written by `python -m cellulib.bench.bookstatus`.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="the quick profile's sizes (1.5-4 minutes on 2 CPU cores, "
                      "depending on other load)")
    size.add_argument("--smallest", action="store_const", dest="mode", const="smallest",
                      help="tiny sizes, one repeat: checks that every case runs (seconds)")
    p.set_defaults(mode="full")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default per mode)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--chapters", default="book/chapters", help="executed chapters (book case)")
    p.add_argument("--notebooks", default="notebooks", help="chapter sources (book case)")
    p.add_argument("--execute-book", action="store_true",
                   help="execute the chapters now instead of reading their recorded times")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch-batches", type=int, default=None, metavar="N",
                   help="batches in a timed training epoch (default: the mode's 2-3); more show "
                   "whether the DataLoader keeps a GPU fed")
    p.add_argument("--predict-images", type=int, default=None, metavar="N",
                   help="images of the predict case (default: the mode's, 8-64); a GPU needs "
                   "hundreds to time more than the start")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m cellulib.bench [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _bench_parser()
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        parser.error(f"--cases: unknown {', '.join(bad) or '(empty)'}; choose from "
                     f"{', '.join(CASES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.epoch_batches is not None and args.epoch_batches < 1:
        parser.error("--epoch-batches must be at least 1")
    if args.predict_images is not None and args.predict_images < 1:
        parser.error("--predict-images must be at least 1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_bench(args.mode, cases, args.repeats, args.chapters, args.notebooks,
                       args.execute_book, args.seed, verbose=not args.quiet,
                       epoch_batches=args.epoch_batches, predict_images=args.predict_images)
    print(format_table(result, markdown=args.markdown))
    if args.json:
        from cellulib.files.imageio import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nresult written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
