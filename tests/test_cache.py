"""The model cache is keyed on the training recipe (SPEC 6): edits that change no number keep every
key, a setting, the precision or a library version changes it; ``cellulib cache list`` and
``cache prune`` say which files the running code would reuse; bad cached files are retrained."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cellulib
from cellulib import load_model, save_model
from cellulib.cli import commands
from cellulib.data import synth, synthset
from cellulib.data.datasets import synthetic_params
from cellulib.data.fingerprint import fingerprint
from cellulib.inference import modelfile
from cellulib.training import cache, train

PARAMS = {"seed": 0, "data": "0123456789ab", "seg_lr": 3e-3, "precision": "auto"}
KINDS = ("seg", "sr", "gbt", "direct-resnet34-regression", "direct-xception-classification")

# Run in a fresh interpreter with an edited copy of cellulib first on sys.path: every key the cache
# and the book's data use.
KEYS_SCRIPT = """
import json, sys, torch
import cellulib
from cellulib.data import datasets, fingerprint, synth
from cellulib.models import networks
from cellulib.training import train
params = json.loads(sys.argv[1])
torch.manual_seed(0)
keys = {kind: train._recipe(kind, params)[1]["key"] for kind in json.loads(sys.argv[2])}
keys["derived"] = train._derived(networks.direct_model("resnet34"))["key"]
keys["synth"] = fingerprint.fingerprint(datasets.synthetic_params("quick", 0)
                                        | {"v": synth.GENERATOR_VERSION})
print(json.dumps({"file": cellulib.__file__, "keys": keys}))
"""


def _keys_here() -> dict[str, str]:
    torch.manual_seed(0)
    from cellulib.models import networks

    keys = {kind: train._recipe(kind, PARAMS)[1]["key"] for kind in KINDS}
    keys["derived"] = train._derived(networks.direct_model("resnet34"))["key"]
    keys["synth"] = fingerprint(synthetic_params("quick", 0) | {"v": synth.GENERATOR_VERSION})
    return keys


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path.name}: {old!r} not found (update this test)"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_docstring_comment_plot_and_report_edits_keep_every_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CELLULIB_PRECISION", raising=False)
    package = shutil.copytree(Path(cellulib.__file__).parent, tmp_path / "lib" / "cellulib",
                              ignore=shutil.ignore_patterns("__pycache__"))
    # a docstring in the engine (issue 21: commit 43fdab5 retrained every model)
    _edit(package / "models" / "engine.py", '"""The hardware side of training',
          '"""The hardware side (edited) of training')
    _edit(package / "training" / "train.py", "def fit(", "# a comment\ndef fit(")
    for name in ("data/breastpathq.py", "data/transforms.py", "models/losses.py", "models/networks.py",
                 "models/features.py", "data/stain.py", "inference/predict.py", "inference/modelfile.py", "training/cache.py",
                 "data/annotations.py", "data/profiles.py", "data/synth.py", "data/synthset.py",
                 "data/fingerprint.py", "data/datasets.py", "data/paths.py", "inference/pixelsize.py"):
        (package / name).write_text((package / name).read_text() + "\n# an edited comment\n")
    # a plot and a report function: their bodies change
    _edit(package / "reporting" / "plots.py", "def ", "def _unused_plot():\n    return 'edited'\n\n\ndef ")
    _edit(package / "reporting" / "sentences.py", "def ",
          "def _unused_report():\n    return 'edited'\n\n\ndef ")
    # the edited copy first, then whatever the running interpreter was given (a GPU image's wheels)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(package.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, json.dumps(PARAMS),
                          json.dumps(KINDS)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).parent == package  # the edited copy was the one imported
    assert got["keys"] == _keys_here()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    monkeypatch.delenv("CELLULIB_PRECISION", raising=False)
    return tmp_path


def test_a_setting_the_precision_or_a_library_version_changes_the_key(home, monkeypatch):
    from cellulib.models import engine

    def key(**changes):
        return train._recipe("seg", {**PARAMS, **changes})[1]["key"]

    base = key()
    assert key(seg_lr=1e-3) != base and key(seed=1) != base
    # "auto" is stored as the precision it resolves to on this machine, never literally
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    auto_f32 = train._recipe("seg", PARAMS)[1]
    device = auto_f32["params"]["device"]
    assert device in ("cpu", "cuda")
    # a CPU without native bf16 trains in float32; CUDA under automatic mixed precision (bf16 there)
    assert auto_f32["params"]["precision"] == ("float32" if device == "cpu" else
                                               engine.precision_name(engine.amp_dtype("cuda")))
    assert auto_f32["params"]["precision"] != "auto"
    if device == "cpu":
        assert key(precision="float32") == auto_f32["key"]
        monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
        assert key() == key(precision="bf16") != auto_f32["key"]
        monkeypatch.setenv("CELLULIB_PRECISION", "float32")
        assert key() == auto_f32["key"]  # CELLULIB_PRECISION=float32 never reuses bf16 models
        monkeypatch.delenv("CELLULIB_PRECISION")
        monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    assert key(precision="bf16") != key(precision="float32")
    # the device type
    import fastai.torch_core

    monkeypatch.setenv("CELLULIB_PRECISION", "float32")
    here = key()
    other = "cpu" if fastai.torch_core.default_device().type == "cuda" else "cuda"
    monkeypatch.setattr(fastai.torch_core, "default_device", lambda: torch.device(other))
    assert key() != here
    monkeypatch.undo()
    monkeypatch.setenv("CELLULIB_HOME", str(home))
    # a library version, as the metadata of the installed distribution reports it
    before = key()
    real = cache.library_version
    for name in ("torch", "fastai", "albumentations", "numpy", "opencv"):
        monkeypatch.setattr(cache, "library_version",
                            lambda n, name=name: "0.0.0" if n == name else real(n))
        assert key() != before, name
    monkeypatch.setattr(cache, "library_version", real)
    # the recipe version of the family
    monkeypatch.setitem(train.RECIPE_VERSIONS, "seg", train.RECIPE_VERSIONS["seg"] + 1)
    assert key() != before


# --------------------------------------------------------------------------------------------------
# cellulib cache list / prune
def _write(path: Path, **meta) -> Path:
    return save_model(torch.nn.Linear(2, 1), path, family="seg", config={"decoder": "fpn"}, **meta)


def test_cache_list_and_prune(home, capsys, monkeypatch):
    models_dir = home / "models"
    rec = cache.recipe("seg", PARAMS, train.RECIPE_VERSIONS["seg"])
    current = _write(models_dir / f"seg-{rec['key']}.pt", recipe=rec)
    old_rec = cache.recipe("sr", PARAMS, train.RECIPE_VERSIONS["sr"] - 1)
    old_version = _write(models_dir / f"sr-{old_rec['key']}.pt", recipe=old_rec)
    before_keys = _write(models_dir / "seg-abcdefabcdef.pt")  # the source-bytes era: no recipe
    corrupt = models_dir / "gbt-0123456789ab.pt"
    corrupt.write_bytes(b"not a model")
    renamed = models_dir / "seg-111111111111.pt"
    shutil.copy(current, renamed)

    assert commands.main(["cache", "list", "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {p.name for p in (current, old_version, before_keys, corrupt, renamed)}
    assert all({"path", "family", "key", "bytes", "current"} <= set(r) for r in rows.values())
    assert rows[current.name]["current"] is True and rows[current.name]["why"] == ""
    assert rows[current.name]["key"] == rec["key"] and rows[current.name]["family"] == "seg"
    assert rows[current.name]["bytes"] == current.stat().st_size
    assert rows[old_version.name]["current"] is False
    assert (f"sr recipe version {train.RECIPE_VERSIONS['sr'] - 1}, the code's is "
            f"{train.RECIPE_VERSIONS['sr']}") in rows[old_version.name]["why"]
    assert "no recipe recorded" in rows[before_keys.name]["why"]
    assert "not a readable cellulib model file" in rows[corrupt.name]["why"]
    assert rows[renamed.name]["current"] is False and "111111111111" in rows[renamed.name]["why"]

    # the table says the same in words
    assert commands.main(["cache", "list"]) == 0
    text = capsys.readouterr().out
    assert "no: sr recipe version" in text and "4 not current" in text

    # another installed torch makes every file stale, and says so
    real = cache.library_version
    monkeypatch.setattr(cache, "library_version", lambda n: "9.9.9" if n == "torch" else real(n))
    assert commands.main(["cache", "list", "--json"]) == 0
    row = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}[current.name]
    assert not row["current"] and f"torch {real('torch')}, installed 9.9.9" in row["why"]
    monkeypatch.setattr(cache, "library_version", real)

    assert commands.main(["cache", "prune", "--dry-run"]) == 0
    assert "would remove 4 file(s)" in capsys.readouterr().out
    assert len(list(models_dir.glob("*.pt"))) == 5
    assert commands.main(["cache", "prune"]) == 0
    assert "removed 4 file(s)" in capsys.readouterr().out
    assert [p.name for p in models_dir.glob("*.pt")] == [current.name]


def test_cache_list_of_an_empty_cache(home, capsys):
    assert commands.main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# --------------------------------------------------------------------------------------------------
# bad cached files, and derived outputs recomputed without retraining
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthset.make_breastpathq(tmp_path_factory.mktemp("tiny"), n_train=4, n_val=2, n_cells=5,
                                  size=64, seed=0, progress=False)


SEG = dict(epochs=1, progress=False, crop=32, patches_per_epoch=1, seg_bs=2)


def test_a_corrupt_or_foreign_cached_file_is_retrained_with_a_message(tiny, home, one_torch_thread):
    first = train.train_seg(tiny, "fpn", **SEG)
    first.path.write_bytes(b"truncated")
    with pytest.warns(train.CacheWarning, match="not a readable cellulib model file.*training it again"):
        again = train.train_seg(tiny, "fpn", **SEG)
    assert not again.cached and again.path == first.path
    assert load_model(again.path)[1]["meta"]["recipe"]["key"] == again.meta["recipe"]["key"]
    # a file at the right place that records another recipe is not reused either
    model, info = load_model(again.path)
    other = {**info["meta"]["recipe"], "version": 0}
    other["key"] = fingerprint({k: v for k, v in other.items() if k != "key"})
    save_model(model, again.path, **{**info["meta"], "recipe": other})
    with pytest.warns(train.CacheWarning, match="seg recipe version 0, the code's is"):
        third = train.train_seg(tiny, "fpn", **SEG)
    assert not third.cached
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.train_seg(tiny, "fpn", **SEG).cached


def test_a_new_inference_version_recomputes_predictions_without_retraining(tiny, home, monkeypatch,
                                                                          one_torch_thread):
    from cellulib.inference import predict

    first = train.train_direct(tiny, "resnet34", epochs=1, size=32, direct_bs=2, progress=False)
    assert first.meta["derived"]["inference"] == predict.INFERENCE_VERSION
    assert first.meta["derived"]["weights"] == modelfile.weights_digest(first.model)
    # spoil the stored predictions, then bump the inference version: they are scored again
    model, info = load_model(first.path)
    spoiled = {**info["meta"]["predictions"], "y_pred": [0.5] * len(first.meta["predictions"]["y_pred"])}
    save_model(model, first.path, **{**info["meta"], "predictions": spoiled})
    monkeypatch.setattr(predict, "INFERENCE_VERSION", predict.INFERENCE_VERSION + 1)

    def no_training(*args, **kwargs):
        raise AssertionError("a new inference version must not retrain")

    monkeypatch.setattr(train, "fit", no_training)
    again = train.train_direct(tiny, "resnet34", epochs=1, size=32, direct_bs=2, progress=False)
    assert again.cached and again.path == first.path
    assert again.meta["predictions"]["path"] == first.meta["predictions"]["path"]
    assert again.meta["predictions"]["y_pred"] == pytest.approx(first.meta["predictions"]["y_pred"])
    assert again.scores == pytest.approx(first.scores)
    assert again.meta["derived"]["inference"] == predict.INFERENCE_VERSION
    assert load_model(first.path)[1]["meta"]["derived"]["inference"] == predict.INFERENCE_VERSION


def test_new_stain_and_inference_versions_refresh_seg_and_gbt_files(tiny, home, monkeypatch,
                                                                    one_torch_thread):
    from cellulib.data import stain
    from cellulib.inference import predict
    from cellulib.models import features

    seg = train.train_seg(tiny, "fpn", **SEG)
    gbt = train.train_gbt(tiny, seg, gbt_rounds=5, progress=False)
    for result in (seg, gbt):  # spoil what is derived from the weights
        model, info = load_model(result.path)
        meta = {**info["meta"], "stain": {"unavailable": "spoiled"}}
        if "predictions" in meta:
            meta["predictions"] = {**meta["predictions"], "y_pred": [-1.0, -1.0]}
        save_model(model, result.path, **meta)
    monkeypatch.setattr(stain, "REFERENCE_VERSION", stain.REFERENCE_VERSION + 1)
    monkeypatch.setattr(predict, "INFERENCE_VERSION", predict.INFERENCE_VERSION + 1)

    def no_training(*args, **kwargs):
        raise AssertionError("a new stain or inference version must not retrain")

    monkeypatch.setattr(train, "fit", no_training)
    monkeypatch.setattr(features, "fit_gbt", no_training)
    seg2 = train.train_seg(tiny, "fpn", **SEG)
    gbt2 = train.train_gbt(tiny, seg2, gbt_rounds=5, progress=False)
    assert seg2.cached and gbt2.cached and gbt2.path == gbt.path
    assert seg2.meta["stain"] == seg.meta["stain"] and gbt2.meta["stain"] == gbt.meta["stain"]
    assert gbt2.meta["predictions"]["y_pred"] == pytest.approx(gbt.meta["predictions"]["y_pred"])
    assert load_model(gbt.path)[1]["meta"]["derived"]["stain"] == stain.REFERENCE_VERSION


def test_the_bytes_of_a_pretrained_weights_file_are_part_of_the_key(tmp_path):
    a, b = tmp_path / "a" / "w.pth", tmp_path / "b" / "w.pth"
    for path, value in ((a, 0.0), (b, 1.0)):
        path.parent.mkdir()
        torch.save({"w": torch.full((2,), value)}, path)
    assert train._pretrained_key(a) != train._pretrained_key(b)  # same name, other weights
    assert train._pretrained_key(a).startswith("file:w.pth:")
    assert train._pretrained_key("imagenet") == "imagenet" and train._pretrained_key(None) is None


def test_a_seg_file_without_a_chosen_threshold_gets_one_without_retraining(tiny, home, monkeypatch,
                                                                           one_torch_thread):
    """Issue 22: train_seg records the detection threshold chosen on its training images; a
    cached file from before (or from another detection version) gets one from its own weights."""
    from cellulib.data import breastpathq
    from cellulib.inference import detect

    seg = train.train_seg(tiny, "fpn", **SEG)
    chosen = seg.meta["detection"]
    cells = breastpathq.read_cells(tiny)
    rows = breastpathq.cells_split(cells, seed=0, root=tiny)[0]
    assert chosen["images"] == len(rows) and chosen["version"] == detect.DETECTION_VERSION
    assert chosen["threshold"] == chosen["grid"][chosen["mean_f"].index(max(chosen["mean_f"]))]
    # the recorded mean F at the chosen threshold is what scoring the training images gives
    scores = detect.score_annotated(seg.path, cells.iloc[rows], chosen["threshold"],
                                    progress=False).scores()
    assert max(chosen["mean_f"]) == pytest.approx(scores["f1"].mean(), abs=1e-4)
    model, info = load_model(seg.path)
    save_model(model, seg.path, **{k: v for k, v in info["meta"].items() if k != "detection"})

    def no_training(*args, **kwargs):
        raise AssertionError("a missing threshold must not retrain")

    monkeypatch.setattr(train, "fit", no_training)
    again = train.train_seg(tiny, "fpn", **SEG)
    assert again.cached and again.meta["detection"] == chosen
    assert load_model(seg.path)[1]["meta"]["detection"] == chosen
    monkeypatch.setattr(detect, "DETECTION_VERSION", detect.DETECTION_VERSION + 1)
    assert train.train_seg(tiny, "fpn", **SEG).meta["detection"]["version"] == \
        detect.DETECTION_VERSION
