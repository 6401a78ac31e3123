"""The ``cellulib`` command line: ``cellulib --help`` lists the commands (SPEC section 7)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _cmd_synth(args: argparse.Namespace) -> int:
    from cellulib import profiles, synth

    overrides = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_cells": args.n_cells,
        "size": args.size,
    }
    if args.root is None:
        root = profiles.get_dataset(None, args.profile, args.seed, **overrides)
    else:
        params = profiles.synthetic_params(args.profile, args.seed, **overrides)
        root = synth.make_breastpathq(Path(args.root), **params)
    print(root)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from cellulib import profiles, train
    from cellulib.store import atomic_write_bytes

    root = profiles.get_dataset(args.data, args.profile, args.seed)
    seg_args = dict(profile=args.profile, seed=args.seed, stain_augment=args.stain_augment)
    if args.family == "seg":
        result = train.train_seg(root, decoder=args.decoder, pretrained=args.pretrained,
                                 epochs=args.epochs, crop=args.size, **seg_args)
    elif args.family == "direct":
        result = train.train_direct(root, arch=args.arch, task=args.task,
                                    pretrained=args.pretrained, epochs=args.epochs, size=args.size,
                                    **seg_args)
    else:  # sr and gbt start from the (cached) FPN segmentation network of the profile
        seg = train.train_seg(root, decoder=args.decoder, **seg_args)
        if args.family == "sr":
            overrides = {"sr_epochs": args.epochs} if args.epochs else {}
            result = train.train_sr(root, seg, pretrained=args.pretrained, input_size=args.size,
                                    **seg_args, **overrides)
        else:
            result = train.train_gbt(root, seg, input_size=args.size, **seg_args)
    out = Path(args.out)
    with open(result.path, "rb") as src:
        atomic_write_bytes(out, lambda dst: shutil.copyfileobj(src, dst))
    state = "loaded from the cache" if result.cached else f"trained in {result.seconds:.0f} s"
    print(f"{args.family} model {state}; written to {out}")
    for name, value in result.scores.items():
        print(f"  {name}: {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (kept separate so the README and tests can inspect it)."""
    from cellulib import __version__

    parser = argparse.ArgumentParser(
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
    p.add_argument("--n-train", type=int, default=None, help="training patches")
    p.add_argument("--n-val", type=int, default=None, help="validation patches")
    p.add_argument("--n-cells", type=int, default=None, help="patches with annotated nuclei")
    p.add_argument("--size", type=int, default=None, help="patch side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "train",
        help="train a model (cached by the hash of its inputs) and write its model file",
        description="Train a model family on a BreastPathQ folder (default: the profile's synthetic "
        "data) with the settings of a profile, and write one model file with its config, history "
        "and validation scores. The same run with the same inputs is loaded from the cache.",
    )
    p.add_argument("family", choices=["seg", "sr", "gbt", "direct"],
                   help="seg: weak nucleus segmentation (chapter 2); sr: segmentation -> ResNet-34 "
                   "cascade and gbt: 81 features + LightGBM (chapter 3); direct: a CNN on the patch "
                   "(chapter 4)")
    p.add_argument("--data", default=None, help="BreastPathQ folder (default: synthetic data)")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--profile", default="quick", help="quick (default) or paper")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the profile's)")
    p.add_argument("--size", type=int, default=None,
                   help="input side: seg training crop after the x2 downscale, direct/sr/gbt "
                   "input size (default: the profile's)")
    p.add_argument("--decoder", choices=["fpn", "unet"], default="fpn",
                   help="segmentation decoder (seg; sr and gbt build on it)")
    p.add_argument("--arch", choices=["resnet34", "resnet50", "xception"], default="resnet34",
                   help="direct model architecture")
    p.add_argument("--task", choices=["regression", "classification"], default="regression",
                   help="direct model task: regression or 101-bin classification")
    p.add_argument("--pretrained", default=None,
                   help="ImageNet weights: 'imagenet' (torch hub cache) or a weights file")
    p.add_argument("--stain-augment", choices=["none", "hed"], default=None,
                   help="stain augmentation in training (default: the profile's, none): hed adds "
                   "HED jitter of the haematoxylin and eosin densities (for sr and gbt, to "
                   "their segmentation network too)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_train)

    from cellulib.predict import add_commands

    add_commands(sub)  # predict, evaluate, slide
    from cellulib.detect import add_command

    add_command(sub)  # detect
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from cellulib.profiles import ProfileError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ProfileError, FileNotFoundError, ValueError) as exc:
        print(f"cellulib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellulib {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
