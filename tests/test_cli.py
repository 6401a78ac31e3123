"""The command line: `cellulib synth`, help, and clear errors with a non-zero exit."""

import subprocess
import sys

import pandas as pd

from cellulib.cli import commands


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "cellulib", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "synth" in out.stdout


def test_synth_writes_the_breastpathq_layout(tmp_path, capsys):
    root = tmp_path / "synthetic"
    code = commands.main(["synth", str(root), "--n-train", "3", "--n-val", "2", "--n-cells", "1",
                     "--size", "128", "--seed", "5"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(root)
    labels = pd.read_csv(root / "datasets" / "train_labels.csv")
    assert list(labels.columns) == ["slide", "rid", "y"] and len(labels) == 3
    assert len(list((root / "datasets" / "validation").glob("*.tif"))) == 2
    assert len(list((root / "datasets" / "cells").glob("*_key.xml"))) == 1


def test_unknown_profile_exits_with_a_message(tmp_path, capsys):
    code = commands.main(["synth", str(tmp_path / "x"), "--profile", "fast"])
    assert code == 2
    assert "unknown profile 'fast'" in capsys.readouterr().err
