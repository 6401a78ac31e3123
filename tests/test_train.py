"""Training runs: a tiny segmentation run trains, is cached by its inputs, and reloads identically."""

import pytest
import torch
from conftest import TEST_THREADS

from cellulib import load_model
from cellulib.cli import commands
from cellulib.data import synthset
from cellulib.training import train


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return synthset.make_breastpathq(root, n_train=4, n_val=2, n_cells=5, size=128, seed=0,
                                  progress=False)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    return tmp_path


def test_train_seg_is_cached_by_its_inputs(tiny_root, home):
    torch.set_num_threads(TEST_THREADS)
    # train_missing=False trains nothing: None before the model is cached, the model after
    assert train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64, patches_per_epoch=1,
                           seg_bs=2, train_missing=False) is None
    assert not list(home.rglob("*.pt"))
    first = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                            patches_per_epoch=1, seg_bs=2)
    assert not first.cached and first.path.exists()
    looked_up = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                                patches_per_epoch=1, seg_bs=2, train_missing=False)
    assert looked_up.cached and looked_up.path == first.path
    assert list(first.history.columns[:3]) == ["epoch", "train_loss", "valid_loss"]
    assert {"jaccard_normal", "jaccard_lymphocyte", "jaccard_malignant",
            "jaccard_nuclei"} <= set(first.scores)
    assert all(0.0 <= first.scores[k] <= 1.0 for k in first.scores if k.startswith("jaccard"))
    again = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                            patches_per_epoch=1, seg_bs=2)
    assert again.cached and again.path == first.path
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(first.model(x), again.model(x))
    other_seed = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                                 patches_per_epoch=1, seg_bs=2, seed=1)
    assert other_seed.path != first.path


def test_cli_train_seg_writes_a_model_file(tiny_root, home, capsys):
    out = home / "out" / "seg.pt"
    code = commands.main(["train", "seg", "--data", str(tiny_root), "--out", str(out), "--epochs", "1",
                     "--size", "64", "--decoder", "unet"])
    assert code == 0 and out.exists()
    model, info = load_model(out)
    assert info["family"] == "seg" and info["config"]["decoder"] == "unet"
    out_text = capsys.readouterr().out
    assert "jaccard_nuclei" in out_text
    # the threshold chosen on the training images, which cellulib detect then uses
    chosen = info["meta"]["detection"]["threshold"]
    assert f"detection threshold: {chosen:g} (highest mean F on 4 training images" in out_text


def test_cli_train_reports_a_missing_weights_file(tiny_root, home, capsys):
    code = commands.main(["train", "seg", "--data", str(tiny_root), "--out", str(home / "x.pt"),
                     "--epochs", "1", "--size", "64", "--pretrained", str(home / "nope.pth")])
    assert code == 2
    assert "nope.pth" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_seg(tiny_root, tmp_path_factory):
    import os

    os.environ["CELLULIB_HOME"] = str(tmp_path_factory.mktemp("seg_home"))
    return train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64, patches_per_epoch=1)


@pytest.mark.parametrize("arch, task", [("resnet34", "regression"), ("xception", "classification")])
def test_train_direct_records_validation_mse_per_epoch(tiny_root, home, arch, task):
    import numpy as np

    from cellulib.metrics.agreement import mse

    result = train.train_direct(tiny_root, arch, task, epochs=2, size=64, progress=False)
    assert list(result.history.epoch) == [1, 2] and result.history.valid_mse.notna().all()
    pred = train.predictions(result)
    assert len(pred) == 2 and pred.y_pred.between(0, 1).all()
    # the stored score is the MSE of the stored predictions, recomputed independently
    assert result.scores["valid_mse"] == pytest.approx(mse(pred.y_true, pred.y_pred))
    assert np.isclose(result.history.valid_mse.iloc[-1], result.scores["valid_mse"], rtol=1e-4)
    assert result.meta["preprocess"] == {"input_size": 64, "normalize": "minus_one_one"}
    again = train.train_direct(tiny_root, arch, task, epochs=2, size=64, progress=False)
    assert again.cached and again.scores == result.scores


def test_train_sr_fine_tunes_after_a_frozen_stage(tiny_root, tiny_seg):
    result = train.train_sr(tiny_root, tiny_seg, progress=False, sr_epochs=1, sr_finetune_epochs=1)
    assert list(result.history.stage) == ["frozen segmentation", "end to end"]
    # SR reads the segmentation maps at the network's scale, as GBT and the paper: the 128-pixel
    # patches at the x2 downscale; the direct models take direct_size, or that scale without one
    assert result.meta["preprocess"]["input_size"] == 64
    from cellulib.data.profiles import get_profile

    assert train.cellularity_input_size(tiny_root, {**get_profile("quick"), "direct_size": None}) == 64
    # stage 2 changed the segmentation weights (the cascade holds a copy: the original is untouched)
    before = tiny_seg.model.state_dict()
    after = result.model.seg.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_train_gbt_predicts_in_range_and_ranks_features(tiny_root, tiny_seg):
    from cellulib.models.features import FEATURE_NAMES

    result = train.train_gbt(tiny_root, tiny_seg, progress=False, gbt_rounds=10)
    pred = train.predictions(result)
    assert pred.y_pred.between(0, 1).all() and len(pred) == 2
    assert set(result.meta["importance"]) == set(FEATURE_NAMES)
    x = torch.zeros(1, 3, 64, 64)
    assert result.model(x).shape == (1, 1)


def test_train_gbt_leaf_minimum(tiny_root, tiny_seg):
    # 4 training patches, fewer than the 5 folds: LightGBM's default of 20, no cross-validation
    auto = train.train_gbt(tiny_root, tiny_seg, progress=False, gbt_rounds=10)
    assert auto.meta["gbt_min_leaf"] == 20 and auto.meta["gbt_cv_mse"] == {}
    assert auto.meta["params"]["min_leaf"] == "cv5:20,10,5,2"
    # a fixed value skips the cross-validation and is another recipe (another cache key)
    fixed = train.train_gbt(tiny_root, tiny_seg, progress=False, gbt_rounds=10, gbt_min_leaf=1)
    assert fixed.meta["gbt_min_leaf"] == 1 and fixed.meta["params"]["min_leaf"] == 1
    assert fixed.path != auto.path


def test_model_files_record_their_training_stain_and_pixel_size(tiny_root, tiny_seg, home,
                                                                tmp_path, capsys):
    import numpy as np

    from cellulib import constants
    from cellulib.data import breastpathq, stain
    from cellulib.inference import normalizer

    # the segmentation net: the stain of its training cells patches, the datasets' pixel size
    meta = tiny_seg.meta
    assert meta["pixel_size"] == {"mpp": constants.MPP, "patch_px": 128}
    cells = breastpathq.read_cells(tiny_root)
    train_idx = breastpathq.cells_split(cells, seed=0, root=tiny_root)[0]
    expected = stain.training_reference(cells["image_path"].iloc[train_idx].tolist())
    assert meta["stain"]["macenko"]["HERef"] == expected["macenko"]["HERef"]
    # --stain-norm macenko needs no target with such a file, and its reference is the stored one
    norm = normalizer.normalizer_from_options("macenko", None, tiny_seg.path)
    np.testing.assert_array_equal(norm._impl.HERef, np.asarray(expected["macenko"]["HERef"]))
    out = tmp_path / "nuclei.csv"
    assert commands.main(["detect", "--model", str(tiny_seg.path), "--images",
                     str(cells["image_path"].iloc[0]), "--out", str(out), "--quiet",
                     "--stain-norm", "reinhard", "--mpp", "0.25"]) == 0
    from cellulib.inference.detect import detect_to_csv

    # images at 0.25 um/px are halved to the training 0.5 um/px, then downscaled x2 as trained
    summary = detect_to_csv(tiny_seg.path, cells["image_path"].iloc[0], out, progress=False,
                            mpp=0.25)
    assert summary["downscale"] == 4.0 and summary["mpp"] == 0.25
    # a cellularity model records its training patches (128 px here) and their stain
    result = train.train_direct(tiny_root, progress=False, epochs=1, size=64)
    assert result.meta["pixel_size"] == {"mpp": constants.MPP, "patch_px": 128}
    assert set(result.meta["stain"]) == {"macenko", "reinhard"}


def test_stain_augment_is_part_of_the_cache_key(tiny_root, home):
    plain = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                            patches_per_epoch=1, seg_bs=2)
    jittered = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                               patches_per_epoch=1, seg_bs=2, stain_augment="hed")
    assert jittered.path != plain.path and jittered.meta["params"]["stain_augment"] == "hed"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(plain.model(x), jittered.model(x))


def test_cli_train_with_stain_augmentation(tiny_root, home):
    out = home / "jittered.pt"
    assert commands.main(["train", "direct", "--data", str(tiny_root), "--out", str(out), "--epochs",
                     "1", "--size", "64", "--stain-augment", "hed"]) == 0
    _, info = load_model(out)
    assert info["meta"]["params"]["stain_augment"] == "hed"


def test_cli_train_gbt_leaf_minimum(tiny_root, tiny_seg, home, monkeypatch):
    # the segmentation network it builds on is the fixture's; --min-leaf reaches the booster
    monkeypatch.setattr(train, "train_seg", lambda *args, **kwargs: tiny_seg)
    out = home / "gbt.pt"
    assert commands.main(["train", "gbt", "--data", str(tiny_root), "--out", str(out), "--rounds", "5",
                          "--min-leaf", "3"]) == 0
    meta = load_model(out)[1]["meta"]
    assert meta["gbt_min_leaf"] == 3 and meta["params"]["min_leaf"] == 3 and meta["params"]["rounds"] == 5


def test_several_processes_without_a_gpu_is_a_clear_error(tiny_root, home, monkeypatch):
    # `accelerate launch --num_processes 2` sets WORLD_SIZE; fastai's distributed context needs CUDA
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: distributed training is possible here")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but there is no CUDA GPU"):
        train.train_direct(tiny_root, "resnet34", epochs=1, size=64, progress=False)


@pytest.fixture()
def brca_subset(real_dir, tmp_path):
    """Six training and two validation images of the real BRCA-M2C copy, with their dot files."""
    import shutil

    src = real_dir / "brca-m2c"
    if not src.is_dir():
        pytest.skip(f"BRCA-M2C not found at {src}")
    root = tmp_path / "brca"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for split, n in (("train", 6), ("val", 2)):
        names = (src / f"brca_ds_{split}.txt").read_text().split()[:n]
        (root / f"brca_ds_{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            shutil.copy(src / "images" / name, root / "images" / name)
            stem = name.rsplit(".", 1)[0]
            shutil.copy(src / "labels" / f"{stem}_gt_class_coords.txt", root / "labels")
    return root


def test_train_seg_reads_a_brca_m2c_folder_with_its_official_splits(brca_subset, home, capsys):
    from cellulib.data import breastpathq

    cells = breastpathq.read_cells(brca_subset)
    train_idx, valid_idx = breastpathq.cells_split(cells, validation="official")
    assert len(train_idx) == 6 and len(valid_idx) == 2  # the split files, not a random 20%
    # the default holds out whole patients of train + val, at least 20% of the 8 images
    train_idx, valid_idx = breastpathq.cells_split(cells)
    patients = cells["name"].str[:12]
    assert len(valid_idx) >= 2 and len(train_idx) + len(valid_idx) == 8
    assert not set(patients.iloc[train_idx]) & set(patients.iloc[valid_idx])
    result = train.train_seg(brca_subset, "fpn", epochs=1, progress=False, crop=64,
                             patches_per_epoch=1, seg_bs=2)
    assert 0.0 <= result.scores["jaccard_nuclei"] <= 1.0
    out = home / "brca-seg.pt"
    assert commands.main(["train", "seg", "--data", str(brca_subset), "--out", str(out),
                     "--epochs", "1", "--size", "64"]) == 0
    assert load_model(out)[1]["family"] == "seg"


class _Stop(BaseException):  # past the command line's error handler
    pass


def test_command_line_trains_the_longer_brca_m2c_recipe(brca_subset, tmp_path, monkeypatch, capsys):
    """Issue 22: `cellulib train seg --data <BRCA-M2C>` trains 128 epochs with every nucleus class
    weighted as tumour (held-out patients: stromal F 0.54 against 0.28 for the book's 32 epochs);
    --epochs still wins, and a synthetic BreastPathQ folder keeps its profile."""
    seen = []

    def fake_train_seg(root, **kwargs):
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(train, "train_seg", fake_train_seg)
    for extra in ([], ["--epochs", "5"]):
        with pytest.raises(_Stop):
            commands.main(["train", "seg", "--data", str(brca_subset), "--out",
                           str(tmp_path / "m.pt"), *extra])
    assert seen[0]["epochs"] == 128 and tuple(seen[0]["seg_weights"]) == (4, 4, 4, 1)
    assert seen[1]["epochs"] == 5 and tuple(seen[1]["seg_weights"]) == (4, 4, 4, 1)
    assert "BRCA_M2C_COMMAND_LINE" in capsys.readouterr().err
    synth = synthset.make_breastpathq(tmp_path / "synth", n_train=2, n_val=1, n_cells=2, size=128,
                                      seed=0, progress=False)
    with pytest.raises(_Stop):
        commands.main(["train", "seg", "--data", str(synth), "--out", str(tmp_path / "s.pt")])
    assert seen[2]["epochs"] is None and "seg_weights" not in seen[2]


def test_real_networks_train_the_u_net_only_when_the_decoders_are_compared(tmp_path, monkeypatch):
    """Issue 21: the quick profile's real-H&E chapter trains the FPN alone on BRCA-M2C (the U-Net
    was its largest single training run); the paper profile, or ``compare_decoders=True``, trains
    both with the same settings, and False wins over the paper profile."""
    seen = []

    def fake_train_seg(root, decoder="fpn", **kwargs):
        seen.append((decoder, kwargs))
        return decoder

    monkeypatch.setattr(train, "train_seg", fake_train_seg)
    root = tmp_path / "brca"
    assert train.real_networks(root, "quick", 3, epochs=2, crop=None) == {"FPN": "fpn"}
    assert seen == [("fpn", {"profile": "quick", "seed": 3, "progress": True, "epochs": 2})]
    assert train.real_networks(root, "paper") == {"FPN": "fpn", "U-Net": "unet"}
    assert train.real_networks(root, "quick", compare_decoders=True, crop=64) == {"FPN": "fpn", "U-Net": "unet"}
    assert seen[-1] == ("unet", {"profile": "quick", "seed": 0, "progress": True, "crop": 64})
    assert list(train.real_networks(root, "paper", compare_decoders=False)) == ["FPN"]
    with pytest.raises(ValueError, match="compare_decoders must be True, False or None, got 'yes'"):
        train.real_networks(root, "quick", compare_decoders="yes")


def test_synthetic_detector_trains_with_hed_jitter_at_the_brca_m2c_scale(tmp_path, monkeypatch):
    """Issue 23: the synthetic-only detector is the FPN at real tissue's pixel scale (the quick
    profile's BRCA-M2C settings: no downscale, 11 px discs) with HED stain jitter, which
    ``stain_augment="none"`` turns off, for 24 epochs in the quick profile (issue 21: the BRCA-M2C
    networks train 32) and the paper profile's 150; a given ``epochs`` wins."""
    seen = []

    def fake_train_seg(root, decoder="fpn", **kwargs):
        seen.append((decoder, kwargs))
        return decoder

    monkeypatch.setattr(train, "train_seg", fake_train_seg)
    assert train.synthetic_detector(tmp_path, "quick", 1, progress=False) == "fpn"
    kwargs = seen[-1][1]
    assert (kwargs["stain_augment"], kwargs["downscale"], kwargs["disc_diameter"], kwargs["epochs"],
            kwargs["seed"]) == ("hed", 1, 11.0, 24, 1)
    train.synthetic_detector(tmp_path, "quick", epochs=3, stain_augment="none")
    assert (seen[-1][1]["stain_augment"], seen[-1][1]["epochs"]) == ("none", 3)
    train.synthetic_detector(tmp_path, "paper")
    assert (seen[-1][1]["epochs"], seen[-1][1]["crop"]) == (150, 256)


def test_real_he_chapter_shows_the_command_line_model_only_when_cached(brca_subset, home):
    """Without ``train_missing`` the section trains nothing: the command line's model is missing
    from an empty cache, so the sentence says how to add it and there is no table."""
    import pandas as pd

    from cellulib.data import breastpathq
    from cellulib.reporting import realtissue

    cells = breastpathq.read_cells(brca_subset)
    book = pd.DataFrame({"f1": [0.6, 0.7, 0.3, 0.8]},
                        index=["lymphocyte", "malignant", "normal", "detection"])
    text, table = realtissue.command_line_section(brca_subset, "quick", 0, 32, book,
                                                  cells.iloc[breastpathq.cells_split(cells)[1]])
    assert table is None and "is not in this build's cache" in text and "128 epochs" in text
    assert not list(home.rglob("*.pt"))
    text, table = realtissue.command_line_section(brca_subset, "paper", 0, 150, book, cells)
    assert table is None and text == ("In the paper profile `cellulib train seg` trains the recipe "
                                      "of this chapter.")


def test_the_mixed_fpn_lever_learns_real_and_synthetic_nuclei_with_the_real_fpns_recipe(monkeypatch):
    """Issue 23: ``real_tissue_levers(..., mixed=<BRCA-M2C>)`` trains an FPN on that folder with the
    synthetic patches mixed in, for as many epochs, crops and patches as the real FPN it is
    compared with, and GBT on its maps of the synthetic patches; without it, neither is trained."""
    segs, gbts = [], []

    def fake_seg(root, **kwargs):
        segs.append((root, kwargs))
        return f"seg of {root}"

    def fake_gbt(root, seg, **kwargs):
        gbts.append((root, seg))
        return f"gbt on {seg}"

    monkeypatch.setattr(train, "train_seg", fake_seg)
    monkeypatch.setattr(train, "train_gbt", fake_gbt)
    real = train.TrainResult(None, None, {}, None, True,
                             {"seg_epochs": 7, "crop": 96, "patches_per_epoch": 2}, 0.0, {})
    levers = train.real_tissue_levers("synthetic", real, augment="none", mixed="brca")
    assert levers["GBT on the mixed FPN"] == ("GBT", "gbt on seg of brca")
    assert len(segs) == 1 and segs[0][0] == "brca"
    assert {k: segs[0][1][k] for k in ("mix", "epochs", "crop", "patches_per_epoch", "decoder")} \
        == {"mix": "synthetic", "epochs": 7, "crop": 96, "patches_per_epoch": 2, "decoder": "fpn"}
    assert gbts[-1] == ("synthetic", "seg of brca")
    segs.clear()
    assert "GBT on the mixed FPN" not in train.real_tissue_levers("synthetic", real, augment="none")
    assert not segs
