"""The ``cellulib`` command line, every command in one place: ``cellulib --help`` lists them (SPEC
section 7). Each command parses its options and calls the library; the work is done there."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from cellulib.constants import STRIDE  # noqa: E402 - after the environment variable


# -- option types: a value out of range is an argparse error naming the option (exit code 2) ------
def _min_leaf(text: str):
    """An argparse ``type`` for ``--min-leaf``: ``cv`` or an integer >= 1."""
    if text == "cv":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cv or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected cv or an integer >= 1, got {value}")
    return value


def _int_at_least(low: int, also: str = ""):
    """An argparse ``type``: an integer ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{also}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float, *, closed: bool = False, unit: str = ""):
    """An argparse ``type``: a float in ``(low, high)``, or ``[low, high]`` with ``closed``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = low <= value <= high if closed else low < value < high
        if not inside:  # NaN is outside too
            span = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
            raise argparse.ArgumentTypeError(f"must lie in {span}{unit}, got {text}")
        return value
    return parse


_EPOCHS = _int_at_least(1)
#: the networks' inputs: at least one stride of the encoders (cellulib.constants.STRIDE)
_SIDE = _int_at_least(STRIDE, " px (one stride of the networks)")
#: micrometres per pixel, as cellulib.inference.pixelsize.check_mpp accepts
_MPP = _float_in(0, 100, unit=" um/px")
_FRACTION = _float_in(0, 1, closed=True)


def _device(text: str) -> str:
    """An argparse ``type`` for ``--device``: a torch device this machine has."""
    from cellulib.models.engine import usable_device

    try:
        usable_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _check_out(path: str, option: str = "--out", *, folder: bool = False) -> None:
    """:func:`cellulib.files.imageio.check_writable` before any work starts, the message naming
    the option: ``--out PATH: is a folder; give a file name``."""
    from cellulib.files.imageio import check_writable

    try:
        check_writable(path, folder=folder)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, f"{option} {path}") from None


def _cmd_synth(args: argparse.Namespace) -> int:
    from cellulib.data import datasets, synthset

    overrides = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_cells": args.n_cells,
        "size": args.size,
    }
    if args.root is None:
        root = datasets.get_dataset(None, args.profile, args.seed, **overrides)
    else:
        params = datasets.synthetic_params(args.profile, args.seed, **overrides)
        root = synthset.make_breastpathq(Path(args.root), **params)
    print(root)
    return 0


#: The options of ``cellulib train`` each family reads (argparse ``dest`` names). An option given
#: to a family that does not read it is an error, not silently ignored.
TRAIN_OPTIONS: dict[str, tuple[str, ...]] = {
    "seg": ("decoder", "pretrained", "epochs", "crop"),
    "direct": ("arch", "task", "pretrained", "epochs", "input_size"),
    "sr": ("decoder", "pretrained", "epochs", "finetune_epochs", "input_size"),
    "gbt": ("decoder", "rounds", "min_leaf", "input_size"),
}
_OPTION_NAMES = {"decoder": "--decoder", "pretrained": "--pretrained", "epochs": "--epochs",
                 "crop": "--crop", "arch": "--arch", "task": "--task",
                 "input_size": "--input-size", "finetune_epochs": "--finetune-epochs",
                 "rounds": "--rounds", "min_leaf": "--min-leaf"}


def _train_options(args: argparse.Namespace) -> dict:
    """The family's options from ``args``: ``--size`` becomes ``--crop`` for seg and
    ``--input-size`` for the others; an option the family does not read raises ValueError."""
    family = args.family
    given = {dest: getattr(args, dest) for dest in _OPTION_NAMES if getattr(args, dest) is not None}
    if args.size is not None:
        dest = "crop" if family == "seg" else "input_size"
        if dest in given:
            raise ValueError(f"--size and {_OPTION_NAMES[dest]} say the same thing; give one")
        given[dest] = args.size
    wrong = [_OPTION_NAMES[d] for d in given if d not in TRAIN_OPTIONS[family]]
    if wrong:
        reads = ", ".join(_OPTION_NAMES[d] for d in TRAIN_OPTIONS[family])
        raise ValueError(f"{', '.join(wrong)} does not apply to 'train {family}', which reads "
                         f"{reads} (and --data, --profile, --stain-augment, --seed)")
    # the segmentation network's crops, and the SR and GBT inputs it maps, are whole strides
    # (checked here, before the segmentation network they build on is trained)
    from cellulib.data.profiles import check_side

    for dest in ("crop",) + (("input_size",) if family in ("sr", "gbt") else ()):
        if dest in given:
            check_side("--size" if args.size is not None else _OPTION_NAMES[dest], given[dest])
    return given


def _confirm_render(args: argparse.Namespace) -> None:
    """Say what ``train`` without ``--data`` renders first, and how long that takes; the paper
    profile's set (thousands of 512 px patches) needs ``--yes`` or a yes at the prompt."""
    import time

    from cellulib.data import datasets, synth

    root = datasets.synthetic_root(args.profile, args.seed)
    if datasets.synthetic_ready(root):
        return
    params = datasets.synthetic_params(args.profile, args.seed)
    n = params["n_train"] + params["n_val"] + params["n_cells"]
    start = time.perf_counter()
    synth.render_patch(params["size"], seed=args.seed)
    minutes = n * (time.perf_counter() - start) / 60
    print(f"no --data: first rendering the {args.profile} profile's synthetic set, {n} patches of "
          f"{params['size']} px, into {root} (about {minutes:.0f} min on this machine, from one "
          "patch timed just now)", file=sys.stderr)
    if args.profile == "quick" or args.yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise ValueError("the paper profile's synthetic set is large: pass --yes to render it, "
                         "or --data with a BreastPathQ folder")
    if input("render it now? [y/N] ").strip().lower() not in ("y", "yes"):
        raise ValueError("nothing rendered or trained: answer y, pass --yes, or give --data")


def _cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from cellulib.data import datasets
    from cellulib.data.annotations import is_brca_m2c
    from cellulib.data.profiles import command_line_seg
    from cellulib.files.imageio import atomic_write_bytes
    from cellulib.training import train

    opts = _train_options(args)
    _check_out(args.out)
    if args.data is None:
        _confirm_render(args)
    root = datasets.get_dataset(args.data, args.profile, args.seed)
    seg_args = dict(profile=args.profile, seed=args.seed, stain_augment=args.stain_augment)
    decoder = opts.get("decoder", "fpn")
    if args.family == "seg":
        # the command line's longer BRCA-M2C recipe (issue 22); --epochs still wins
        recipe = command_line_seg(args.profile, is_brca_m2c(root), opts.get("epochs"))
        if len(recipe) > 1:
            extra = {k: v for k, v in recipe.items() if k != "epochs"}
            print(f"BRCA-M2C: the command line's recipe, {recipe['epochs']} epochs and {extra} "
                  "(profiles.BRCA_M2C_COMMAND_LINE)", file=sys.stderr)
        result = train.train_seg(root, decoder=decoder, pretrained=opts.get("pretrained"),
                                 crop=opts.get("crop"), **seg_args, **recipe)
    elif args.family == "direct":
        result = train.train_direct(root, arch=opts.get("arch", "resnet34"),
                                    task=opts.get("task", "regression"),
                                    pretrained=opts.get("pretrained"), epochs=opts.get("epochs"),
                                    size=opts.get("input_size"), **seg_args)
    else:  # sr and gbt start from the (cached) segmentation network of the profile
        seg = train.train_seg(root, decoder=decoder, **seg_args)
        if args.family == "sr":
            stages = {k: v for k, v in (("sr_epochs", opts.get("epochs")),
                                        ("sr_finetune_epochs", opts.get("finetune_epochs")))
                      if v is not None}
            result = train.train_sr(root, seg, pretrained=opts.get("pretrained"),
                                    input_size=opts.get("input_size"), **seg_args, **stages)
        else:
            gbt = {setting: opts[o] for o, setting in (("rounds", "gbt_rounds"), ("min_leaf", "gbt_min_leaf"))
                   if o in opts}
            result = train.train_gbt(root, seg, input_size=opts.get("input_size"), **seg_args, **gbt)
    out = Path(args.out)
    with open(result.path, "rb") as src:
        atomic_write_bytes(out, lambda dst: shutil.copyfileobj(src, dst))
    state = "loaded from the cache" if result.cached else f"trained in {result.seconds:.0f} s"
    print(f"{args.family} model {state}; written to {out}")
    for name, value in result.scores.items():
        print(f"  {name}: {value:.4f}")
    if chosen := (result.meta or {}).get("detection"):
        print(f"  detection threshold: {chosen['threshold']:g} (highest mean F on "
              f"{chosen['images']} training images; cellulib detect uses it by default)")
    return 0


def _cmd_resave(args: argparse.Namespace) -> int:
    from cellulib.inference.modelfile import resave_trusted

    if not args.trust:
        raise ValueError("resave unpickles the old file with full Python, which can run code: "
                         "pass --trust to say that you wrote it and trust it")
    out = resave_trusted(args.old, args.new)
    print(f"{args.old} re-saved as data to {out}")
    return 0


def _print_failures(failed: list[dict[str, str]], command: str, what: str) -> None:
    for row in failed[:20]:
        print(f"cellulib {command}: {row['error']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"cellulib {command}: ... {len(failed) - 20} more {what} failed (see the CSV)",
              file=sys.stderr)


def _cmd_predict(args: argparse.Namespace) -> int:
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.inference.predict import predict_to_csv

    _check_out(args.out)
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


#: Fewest matched images ``cellulib evaluate`` scores: ICC(2,1) needs two, a bootstrap of two
#: patches is mostly ties.
MIN_EVALUATED = 3


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from cellulib.files.imageio import jsonable
    from cellulib.metrics.agreement import format_ci
    from cellulib.reporting.evaluation import evaluate_pairs, match_predictions, train_mean_source
    from cellulib.reporting.plots import agreement_figure, save_figure
    from cellulib.reporting.statistics import MEAN_PREDICTOR, learned

    if args.figure:
        _check_out(args.figure, "--figure")
        from matplotlib.figure import Figure

        kinds = Figure().canvas.get_supported_filetypes()
        suffix = Path(args.figure).suffix.lstrip(".").lower()
        if suffix and suffix not in kinds:
            raise ValueError(f"--figure {args.figure}: matplotlib cannot write .{suffix} files; "
                             f"name a .png, .pdf or .svg file (or one of {', '.join(sorted(kinds))})")
    if args.train_mean is not None and args.train_labels is not None:
        raise ValueError("--train-mean and --train-labels both give the mean predictor; give one")
    pairs = match_predictions(args.pred, args.labels)
    if len(pairs) < MIN_EVALUATED:
        raise ValueError(f"{args.pred} vs {args.labels}: {len(pairs)} matched image(s); the "
                         f"metrics and their confidence intervals need at least {MIN_EVALUATED}")
    proxy = "proxy" in pairs.columns
    if proxy:  # a proxy's scale is not cellularity's: a ranking is the fair comparison
        kinds = ", ".join(sorted(set(pairs["proxy"])))
        train_mean, source = None, (f"the labels are the {kinds} proxy of cellularity (cellulib "
                                    "proxy): only the ranking (PK, Spearman) is a fair comparison")
    else:
        train_mean, source = train_mean_source(args.pred, args.train_mean, args.train_labels)
    table = evaluate_pairs(pairs, args.n_boot, args.seed, train_mean)
    base_row = f"MSE ({MEAN_PREDICTOR.lower()})"
    model_learned = (None if train_mean is None else
                     learned(table.loc["MSE", "ci_high"], table.loc[base_row, "value"], len(pairs)))
    if args.figure:
        save_figure(agreement_figure(pairs["y_true"], pairs["y_pred"],
                                      title=Path(args.pred).name), Path(args.figure))
    if args.json:
        metrics = table.drop(index=base_row, errors="ignore")
        if train_mean is None:
            mean_predictor = {"available": False, "reason": source}
        else:
            mean_predictor = {"available": True, "train_mean": train_mean, "source": source,
                              "MSE": jsonable(table.loc[base_row].to_dict())}
        payload = {"pred": str(args.pred), "labels": str(args.labels), "n": int(len(pairs)),
                   "n_boot": args.n_boot, "seed": args.seed,
                   "metrics": {m: jsonable(row.to_dict()) for m, row in metrics.iterrows()},
                   "mean_predictor": mean_predictor, "learned": model_learned}
        print(json.dumps(payload, indent=2))
    else:
        shown = pd.DataFrame({
            "value [95% CI]": [format_ci(r.value, r.ci_low, r.ci_high) for r in table.itertuples()],
            "CI": table["ci_method"], "n": table["n"]}, index=table.index)
        print(f"{args.pred} vs {args.labels}: {len(pairs)} matched images")
        print(shown.to_string())
        if proxy:
            print(f"no mean predictor: {source}")
        elif train_mean is None:
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


def _cmd_proxy(args: argparse.Namespace) -> int:
    from cellulib.data.proxy import LABEL_COLUMNS, proxy_labels
    from cellulib.files.imageio import atomic_open

    _check_out(args.out)
    if args.crops:
        _check_out(args.crops, "--crops", folder=True)
    table = proxy_labels(args.data, kind=args.kind, splits=args.split, window=args.window,
                         radius=args.radius, min_tissue=args.min_tissue, crops_dir=args.crops)
    left_out = table[table["error"] != ""]
    if len(left_out) == len(table):
        raise ValueError(f"{args.data}: no image or window has a {args.kind} proxy: "
                         + "; ".join(left_out["error"].head(3)))
    with atomic_open(args.out, "w", newline="", encoding="utf-8") as fh:
        table[list(LABEL_COLUMNS)].to_csv(fh, index=False, float_format="%.6f", na_rep="")
    for error in left_out["error"].head(20):
        print(f"cellulib proxy: left out: {error}", file=sys.stderr)
    if len(left_out) > 20:
        print(f"cellulib proxy: ... {len(left_out) - 20} more left out (see the error column)",
              file=sys.stderr)
    fields = "windows" if args.window else "images"
    value = table["cellularity"].dropna()
    print(f"{len(value)} {args.kind}-proxy labels ({fields} of {table['image'].nunique()} images, "
          f"{table['patient'].nunique()} patients, splits {', '.join(table['split'].unique())}); "
          f"{len(left_out)} left out; median {value.median():.3f}, range {value.min():.3f}-"
          f"{value.max():.3f}; cell radius {table['radius_px'].iloc[0]:.1f} px; written to "
          f"{args.out}" + (f" (windows in {args.crops})" if args.window else ""))
    return 0


def _add_proxy_command(sub) -> None:
    """Register ``proxy``."""
    from cellulib.data.annotations import BRCA_M2C_SPLITS
    from cellulib.data.proxy import KINDS

    p = sub.add_parser(
        "proxy",
        help="cellularity proxies of BRCA-M2C images from their nucleus dots: path,cellularity",
        description="Write proxy labels of real tissue from a BRCA-M2C folder (SPEC 1.6): count, "
        "the tumour share of the annotated nuclei, or area, the tumour-cell area over the tissue "
        "area measured on the image (each dot's Voronoi region of the tissue, clipped to a cell "
        "radius measured from the tumour dots). They are not the pathologists' score: compare a "
        "model with them by rank (cellulib evaluate prints PK and Spearman with a bootstrap CI "
        "over patients). Writes path,cellularity,error,... (an image without a proxy gets an "
        "empty cellularity and the reason); with --window, each window is written as a PNG to "
        "--crops and labelled on its own.",
    )
    p.add_argument("--data", required=True, help="BRCA-M2C folder (brca_ds_*.txt, images/, labels/)")
    p.add_argument("--out", required=True, help="labels CSV to write (atomically)")
    p.add_argument("--kind", choices=KINDS, default="count",
                   help="count: tumour dots / all dots (default); area: tumour-cell area / "
                   "tissue area")
    p.add_argument("--split", nargs="+", choices=list(BRCA_M2C_SPLITS), default=None,
                   help="the official splits to label (default: every split the folder has)")
    p.add_argument("--window", type=_SIDE, default=None, metavar="PX",
                   help="label square windows of this side instead of whole images (e.g. the "
                   "model's field of view: 256 for a 256-px model at the same pixel size); needs "
                   "--crops")
    p.add_argument("--crops", default=None, metavar="DIR",
                   help="with --window: folder the windows are written to, for cellulib predict")
    p.add_argument("--radius", type=_float_in(0, float("inf"), unit=" px"), default=None, metavar="PX",
                   help="area: cell radius in pixels (default: half the median distance between "
                   "neighbouring tumour dots of the images labelled)")
    p.add_argument("--min-tissue", type=_FRACTION, default=0.5,
                   help="smallest tissue share of an image or window with a proxy (0.5)")
    p.set_defaults(func=_cmd_proxy)


def _cmd_slide(args: argparse.Namespace) -> int:
    from cellulib.inference.normalizer import normalizer_from_options
    from cellulib.inference.predict import Predictor
    from cellulib.inference.slide import slide_map

    _check_out(args.out, folder=True)
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
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="images per forward pass (16)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips and rotations")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--workers", type=_int_at_least(1), default=2, help="worker processes decoding images ahead (2)")
    p.add_argument("--precision", choices=("auto", "bf16", "float32"), default="auto",
                   help="forward-pass arithmetic: auto (bf16 autocast on a CPU with native bf16 "
                   "and on CUDA, else float32), bf16, or float32 to force full precision")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_stain_options(p)


def _add_inference_commands(sub) -> None:
    """Register ``predict``, ``evaluate`` and ``slide``."""
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
    p.add_argument("--mpp", type=_MPP, default=None, metavar="UM",
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
        "of its MSE's 95% CI below the mean predictor's MSE. A path,cellularity file may carry a "
        "patient column (the bootstrap then resamples whole patients), an image column (windows "
        "of one image resampled together) and an error column (rows without a label are left out "
        "and counted); labels of cellulib proxy (a proxy column) add Spearman's rho and no mean "
        "predictor, since only the ranking is a fair comparison with a proxy.",
    )
    p.add_argument("--pred", required=True, help="predictions CSV (path,cellularity[,error])")
    p.add_argument("--labels", required=True,
                   help="labels CSV (slide,rid,y or path,cellularity[,error,patient,image,proxy], "
                   "e.g. from cellulib proxy)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--figure", default=None, help="write a calibration + Bland-Altman figure")
    p.add_argument("--train-mean", type=_FRACTION, default=None, metavar="FLOAT",
                   help="mean of the training labels: scores the mean predictor and says whether "
                   "the model learned (default: from --train-labels, or the train_mean recorded "
                   "in the model file named by PRED.json)")
    p.add_argument("--train-labels", default=None, metavar="CSV",
                   help="training labels (slide,rid,y or path,cellularity) whose mean is the mean "
                   "predictor")
    p.add_argument("--n-boot", type=_int_at_least(1), default=2000, help="bootstrap resamples (2000)")
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
    p.add_argument("--tile", type=_int_at_least(1), default=None,
                   help="tile side in level-0 pixels, resized to the model input (default: the "
                   "model's training field of view at the image's pixel size, else 512)")
    p.add_argument("--tile-um", type=_float_in(0, float("inf"), unit=" um"), default=None,
                   help="tile side in micrometres (needs the pixel size in the file); "
                   "overrides --tile")
    p.add_argument("--mpp", type=_MPP, default=None, metavar="UM",
                   help="micrometres per level-0 pixel, when the file does not record it (or "
                   "records it wrongly)")
    p.add_argument("--stride", type=_int_at_least(1), default=None,
                   help="tile step in level-0 pixels (default: the tile side, tiles edge to edge)")
    p.add_argument("--min-tissue", type=_FRACTION, default=0.5,
                   help="smallest tissue fraction of a scored tile (0.5)")
    p.add_argument("--level", default="auto",
                   help="pyramid level to read tiles from (default auto: the coarsest level that "
                   "still has at least the model's input resolution)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_slide)


def _cmd_detect(args: argparse.Namespace) -> int:
    from cellulib.inference.detect import detect_to_csv
    from cellulib.inference.normalizer import normalizer_from_options

    _check_out(args.out)
    if args.geojson:
        _check_out(args.geojson, "--geojson", folder=True)
    norm = normalizer_from_options(args.stain_norm, args.stain_target, args.model)
    summary = detect_to_csv(args.model, args.images, args.out, geojson_dir=args.geojson,
                            threshold=args.threshold, progress=not args.quiet,
                            device=args.device, recursive=args.recursive, stain_norm=norm,
                            mpp=args.mpp, precision=args.precision, class_rule=args.class_rule,
                            tta=args.tta)
    _print_failures(summary["failed"], "detect", "images")
    if empty := summary["no_nuclei"]:
        print(f"cellulib detect: {len(empty)} image(s) without a nucleus at threshold "
              f"{summary['threshold']:g} (no rows in the CSV; listed in {args.out}.json): "
              + ", ".join(Path(p).name for p in empty[:5]) + (", ..." if len(empty) > 5 else ""),
              file=sys.stderr)
    counts = ", ".join(f"{n} {c}" for c, n in summary["per_class"].items())
    print(f"{summary['n_nuclei']} nuclei ({counts}) in {summary['n_ok']} of "
          f"{summary['n_images']} images at threshold {summary['threshold']:g}; written to "
          f"{args.out} (+ {args.out}.json)"
          + (f" and {len(summary['geojson'])} GeoJSON files in {args.geojson}"
             if args.geojson else ""))
    return 1 if summary["n_failed"] else 0


def _add_detect_command(sub) -> None:
    """Register ``detect``."""
    from cellulib.constants import DETECTION_THRESHOLD

    p = sub.add_parser(
        "detect",
        help="detect and classify nuclei with a segmentation model: path,x,y,class,probability",
        description="Detect nuclei in TIFF/PNG/JPEG images with a segmentation model file "
        "(cellulib train seg): the LoG blob centres of its nucleus map at the trained disc size, "
        "each classed normal, lymphocyte or malignant by the maps there (paper 3.3), in pixels "
        "of the input image (pixel centres at integers). Writes a CSV with "
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
    p.add_argument("--threshold", type=_float_in(0, 1), default=None,
                   help="smallest nucleus probability at a centre, in (0, 1) (default: the "
                   "threshold the model file records, chosen on its training images by cellulib "
                   f"train seg; {DETECTION_THRESHOLD} for a file that records none)")
    p.add_argument("--recursive", action="store_true", help="also search subfolders")
    p.add_argument("--mpp", type=_MPP, default=None, metavar="UM",
                   help="micrometres per pixel of the images: resized to the model's training "
                   "pixel size first (e.g. 0.25 for a 40x scan seen by a 20x model)")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--precision", choices=("auto", "bf16", "float32"), default="auto",
                   help="network arithmetic: auto (bf16 autocast on a CPU with native bf16 and on "
                   "CUDA, else float32), bf16, or float32")
    p.add_argument("--class-rule", choices=("disc", "peak"), default="disc",
                   help="how a nucleus gets its class: disc (the class maps summed over its disc, "
                   "default) or peak (the strongest map at its centre)")
    p.add_argument("--tta", action="store_true",
                   help="average the maps over the four flips of each image (4x slower)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_stain_options(p)
    p.set_defaults(func=_cmd_detect)


def _add_stain_options(parser) -> None:
    """Add ``--stain-norm`` and ``--stain-target`` to an argparse (sub)parser."""
    from cellulib.data.stain import METHODS

    parser.add_argument("--stain-norm", choices=METHODS, default=None,
                        help="normalise each image's stain before scoring: macenko or reinhard")
    parser.add_argument("--stain-target", default=None, metavar="IMAGE",
                        help="H&E image whose stain the images are normalised to")


def _cmd_cache(args: argparse.Namespace) -> int:
    import json

    from cellulib.inference.detect import DETECTION_VERSION
    from cellulib.reporting.realtissue import REAL_TISSUE_VERSION
    from cellulib.reporting.robustness import SHIFT_VERSION
    from cellulib.training import cache, train

    # derived results (cache.derived_frame) are current for these code versions
    derived = {**train.derived_versions(), "shift": SHIFT_VERSION, "detection": DETECTION_VERSION,
               "real_tissue": REAL_TISSUE_VERSION}
    if args.action == "list":
        entries = cache.cache_entries(train.RECIPE_VERSIONS, derived_versions=derived)
    else:
        entries = cache.prune_cache(train.RECIPE_VERSIONS, dry_run=args.dry_run,
                                    derived_versions=derived)
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    if args.action == "prune":
        verb = "would remove" if args.dry_run else "removed"
        for e in entries:
            print(f"{verb} {e['path']} ({e['bytes'] / 1e6:.1f} MB): {e['why']}")
        total = sum(e["bytes"] for e in entries)
        print(f"{verb} {len(entries)} file(s), {total / 1e6:.1f} MB")
        return 0
    print(f"{'family':8} {'key':12} {'MB':>8} {'age':>6}  current")
    for e in entries:
        age = next(f"{e['age_s'] / s:.0f}{unit}" for s, unit in ((86400, "d"), (3600, "h"), (60, "m"),
                                                                  (1, "s")) if e["age_s"] >= s or s == 1)
        state = "yes" if e["current"] else f"no: {e['why']}"
        print(f"{e['family'] or '?':8} {e['key'] or '?':12} {e['bytes'] / 1e6:8.1f} {age:>6}  "
              f"{state}  {Path(e['path']).name}")
    stale = [e for e in entries if not e["current"]]
    print(f"{len(entries)} file(s), {sum(e['bytes'] for e in entries) / 1e6:.1f} MB; "
          f"{len(stale)} not current ({sum(e['bytes'] for e in stale) / 1e6:.1f} MB; "
          "cellulib cache prune removes them)")
    return 0


def _add_cache_command(sub) -> None:
    """``cellulib cache list|prune``: the cached model files of ``$CELLULIB_HOME/models``."""
    p = sub.add_parser(
        "cache",
        help="list the cached model files, or remove those the running code would not reuse",
        description="The model files cached under $CELLULIB_HOME/models by their training recipe "
        "(SPEC 6). list: each file's family, recipe key, size, age and whether the running code "
        "and library versions would reuse it (and why not); prune: remove those that are not "
        "current (another recipe version, other library versions, unreadable).",
    )
    p.add_argument("action", choices=["list", "prune"], help="list or prune")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of objects (path, family, kind, key, bytes, age_s, "
                   "current, why)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be removed")
    p.set_defaults(func=_cmd_cache)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line as every other failure is (see :func:`main`):
    ``cellulib COMMAND: error: argument --epochs: ...``, exit code 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} "
                     "--help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (kept separate so the README and tests can inspect it)."""
    from cellulib import __version__

    parser = _Parser(
        prog="cellulib",
        description="Breast tumour cellularity from H&E patches (Rakhlin et al., 2019).",
    )
    parser.add_argument("--version", action="version", version=f"cellulib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="write a synthetic H&E dataset in the BreastPathQ layout",
        description="Write a synthetic H&E dataset in the BreastPathQ layout (SPEC 1.2). Without "
        "ROOT the profile's dataset is generated into the cache the chapters read "
        "($CELLULIB_HOME/synth) and its path is printed.",
    )
    p.add_argument("root", nargs="?", default=None, help="output folder (default: the cache)")
    p.add_argument("--profile", default="quick", help="quick (default) or paper")
    p.add_argument("--n-train", type=_int_at_least(1), default=None, help="training patches")
    p.add_argument("--n-val", type=_int_at_least(1), default=None, help="validation patches")
    p.add_argument("--n-cells", type=_int_at_least(1), default=None, help="patches with annotated nuclei")
    p.add_argument("--size", type=_SIDE, default=None, help="patch side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "train",
        help="train a model (cached by its training recipe) and write its model file",
        description="Train a model family on a BreastPathQ folder (default: the profile's synthetic "
        "data) with the settings of a profile, and write one model file with its config, history "
        "and validation scores. The same recipe (settings, seed, data, recipe version, library "
        "versions) is loaded from the cache: cellulib cache list shows what is there.",
    )
    p.add_argument("family", choices=["seg", "sr", "gbt", "direct"],
                   help="seg: weak nucleus segmentation (chapter 2); sr: segmentation -> ResNet-34 "
                   "cascade and gbt: 81 features + LightGBM (chapter 3); direct: a CNN on the patch "
                   "(chapter 4)")
    p.add_argument("--data", default=None, help="BreastPathQ folder (default: synthetic data)")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--profile", default="quick", help="quick (default) or paper")
    p.add_argument("--epochs", type=_EPOCHS, default=None,
                   help="seg, direct: training epochs; sr: stage 1 epochs, segmentation frozen "
                   "(default: the profile's)")
    p.add_argument("--finetune-epochs", type=_int_at_least(0), default=None,
                   help="sr: stage 2 epochs, end to end (default: the profile's)")
    p.add_argument("--rounds", type=_int_at_least(1), default=None,
                   help="gbt: LightGBM boosting rounds (default: the profile's)")
    p.add_argument("--min-leaf", type=_min_leaf, default=None,
                   help="gbt: fewest training patches per LightGBM leaf, or 'cv' to choose it by "
                   "5-fold cross-validation (default: the profile's, cv)")
    p.add_argument("--crop", type=_SIDE, default=None,
                   help="seg: side of the random training crops, after the x2 downscale "
                   "(default: the profile's)")
    p.add_argument("--input-size", type=_SIDE, default=None,
                   help="direct, sr, gbt: side the whole patch is resized to (default: the "
                   "profile's)")
    p.add_argument("--size", type=_SIDE, default=None,
                   help="--crop for seg, --input-size for direct, sr and gbt")
    p.add_argument("--decoder", choices=["fpn", "unet"], default=None,
                   help="seg: the segmentation decoder (fpn); sr, gbt: the decoder of the "
                   "segmentation network they build on")
    p.add_argument("--arch", choices=["resnet34", "resnet50", "xception"], default=None,
                   help="direct: the architecture (resnet34)")
    p.add_argument("--task", choices=["regression", "classification"], default=None,
                   help="direct: regression (default) or 101-bin classification")
    p.add_argument("--pretrained", default=None,
                   help="seg, direct, sr: ImageNet weights, 'imagenet' (torch hub cache) or a "
                   "weights file")
    p.add_argument("--stain-augment", choices=["none", "hed"], default=None,
                   help="stain augmentation in training (default: the profile's, none): hed adds "
                   "HED jitter of the haematoxylin and eosin densities (for sr and gbt, to "
                   "their segmentation network too)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--yes", action="store_true",
                   help="without --data in the paper profile: render its synthetic set without "
                   "asking")
    p.set_defaults(func=_cmd_train)

    _add_inference_commands(sub)  # predict, evaluate, slide
    _add_detect_command(sub)
    _add_proxy_command(sub)
    _add_cache_command(sub)

    p = sub.add_parser(
        "resave",
        help="re-save a model file of an older cellulib as data (only for a file you trust)",
        description="Model files are loaded as data (torch.load with weights_only=True), so a file "
        "that holds other Python objects is refused. A model file you wrote yourself with an older "
        "cellulib can be converted once: this command unpickles it with full Python (which can run "
        "code: --trust says you trust the file) and writes NEW holding only tensors and plain data.",
    )
    p.add_argument("old", help="the model file to convert")
    p.add_argument("new", help="the model file to write")
    p.add_argument("--trust", action="store_true", help="I wrote this file and trust it")
    p.set_defaults(func=_cmd_resave)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception as one line that names the file: an OSError as ``FILE: what happened``."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        text = str(exc).strip() or exc.__class__.__name__
        if isinstance(exc, KeyError):  # str(KeyError) is the key's repr alone
            text = f"missing {text}"
    return " ".join(text.split())


#: Failures of the user's input: a bad option, file, folder, dataset or model file (exit code 2).
_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Every failure becomes one line on stderr, ``cellulib COMMAND: error: ...``, naming the file or
    option: exit code 2 for bad input (options, files, folders, datasets, model files) and 1 for a
    failure while running (a full disk, a training run that fails). Ctrl-C prints
    ``interrupted`` and exits with 130; outputs are written atomically, so none is left half
    written. Warnings are one line each too, ``cellulib COMMAND: warning: ...``, each shown once.
    ``CELLULIB_DEBUG=1`` re-raises instead, with the traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a bad option (2, one line printed)
        return exc.code if isinstance(exc.code, int) else 2

    shown: set[str] = set()

    def one_line_warning(message, category, *_args, **_kwargs) -> None:
        text = " ".join(str(message).split())
        if text not in shown:  # a reader called from several places warns once
            shown.add(text)
            print(f"cellulib {args.command}: warning: {text}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return args.func(args)
    except KeyboardInterrupt:
        print(f"cellulib {args.command}: interrupted; nothing was left half written", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CELLULIB_DEBUG"):
            raise
        code = 2 if isinstance(exc, _INPUT_ERRORS) else 1
        kind = "" if code == 2 or isinstance(exc, (OSError, RuntimeError)) else f"{type(exc).__name__}: "
        print(f"cellulib {args.command}: error: {kind}{_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
