"""`cellulib predict` and `cellulib evaluate`: scores equal a hand-built forward pass for every
image mode and model family, bad inputs give error rows or clear errors, outputs are atomic, and the
metrics of `evaluate` equal hand-computed values (ICC against pingouin)."""

import argparse
import functools
import gc
import json
import math
import os
import re
import threading
import time
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellulib import load_model, save_model
from cellulib.cli.commands import build_parser
from cellulib.files.imageio import DataError, collect_images
from cellulib.inference.modelfile import ModelFileError
from cellulib.inference.predict import Predictor, predict_images, predict_to_csv
from cellulib.metrics.agreement import bland_altman
from cellulib.models import networks
from cellulib.reporting.evaluation import PredictWarning, evaluate_files, match_predictions
from cellulib.reporting.plots import agreement_figure

S = 64
PRE = {"input_size": S, "normalize": "minus_one_one"}


# ---------------------------------------------------------------------------------------------
# fixtures: tiny models of every family, images of every mode


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _float32_unless_asked(monkeypatch):
    """The value tests compare with a float32 recipe to 2e-5 on models made deliberately sensitive
    (`_sensitive`), where bf16 autocast moves a score by up to 0.05: here ``precision="auto"``
    means float32. The precision tests below ask for bf16 by name."""
    monkeypatch.setenv("CELLULIB_PRECISION", "float32")


def _sensitive(model, gain=3.0):
    """A random network scores every image about the same; standardise its pooled features so
    that the head's logits vary by about ``gain`` across images. Then a wrong channel order, crop
    or resize changes the output far more than the test tolerance."""
    model.eval()
    x = torch.from_numpy(np.stack([_rgb(S, S, 1000 + i) for i in range(16)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = model.body(x.float() / 127.5 - 1)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    g = torch.Generator().manual_seed(0)
    w = torch.randn(model.head.out_features, feats.shape[1], generator=g) * gain
    w = w / (sd * feats.shape[1] ** 0.5)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(-w @ mu)
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    import lightgbm  # noqa: F401  (fit_gbt needs it)

    from cellulib.models.features import FEATURE_NAMES, fit_gbt

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    files = {}
    files["regression"] = save_model(_sensitive(networks.direct_model("resnet34")),
                                     folder / "reg.pt", preprocess=PRE)
    files["classification"] = save_model(
        _sensitive(networks.direct_model("resnet34", task="classification")), folder / "cls.pt",
        preprocess=PRE)
    files["sr"] = save_model(networks.sr_model(networks.seg_model("fpn")), folder / "sr.pt",
                             preprocess=PRE)
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.random((300, len(FEATURE_NAMES))) * 50, columns=FEATURE_NAMES)
    booster = fit_gbt(table, rng.random(300), n_rounds=20, min_data_in_leaf=5)
    files["gbt"] = save_model(networks.GBTModel(networks.seg_model("fpn"), booster), folder / "gbt.pt",
                              preprocess=PRE)
    files["seg"] = save_model(networks.seg_model("fpn"), folder / "seg.pt", preprocess=PRE)
    files["no_preprocess"] = save_model(networks.direct_model("resnet34"), folder / "nopre.pt")
    files["sr_bad_size"] = save_model(networks.sr_model(networks.seg_model("fpn")),
                                      folder / "sr48.pt",
                                      preprocess={"input_size": 48, "normalize": "minus_one_one"})
    return files


def _rgb(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)  # smooth, not pure noise
    return np.ascontiguousarray(img)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files of every mode and the RGB uint8 image each should read as (computed here, not by
    cellulib)."""
    folder = tmp_path_factory.mktemp("images")
    expected = {}

    img = _rgb(80, 80, 1)
    Image.fromarray(img).save(folder / "a_rgb8.png")
    expected["a_rgb8.png"] = img

    img = _rgb(72, 72, 2)
    alpha = np.random.default_rng(3).integers(0, 256, (72, 72), dtype=np.uint8)
    Image.fromarray(np.dstack([img, alpha]), "RGBA").save(folder / "b_rgba.png")
    a = alpha[..., None].astype(np.float64) / 255
    expected["b_rgba.png"] = np.rint(img * a + 255 * (1 - a)).astype(np.uint8)

    grey = _rgb(70, 70, 4)[..., 0]
    tifffile.imwrite(folder / "c_grey.tif", grey)
    expected["c_grey.tif"] = np.repeat(grey[..., None], 3, axis=2)

    img = _rgb(96, 96, 5)
    tifffile.imwrite(folder / "d_rgb16.tif", img.astype(np.uint16) * 257, photometric="rgb")
    expected["d_rgb16.tif"] = img

    grey = _rgb(66, 66, 6)[..., 1]
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "e_grey16.png")
    expected["e_grey16.png"] = np.repeat(grey[..., None], 3, axis=2)

    Image.fromarray(_rgb(128, 128, 7)).save(folder / "f_rgb.jpg", quality=92)
    with Image.open(folder / "f_rgb.jpg") as im:
        expected["f_rgb.jpg"] = np.array(im.convert("RGB"))

    img = _rgb(90, 110, 8)  # not square, within the aspect limit: resized whole
    tifffile.imwrite(folder / "g_lzw.tif", img, photometric="rgb", compression="lzw")
    expected["g_lzw.tif"] = img

    img = _rgb(64, 64, 9)  # already S x S: no resize
    tifffile.imwrite(folder / "h_exact.tiff", img, photometric="rgb")
    expected["h_exact.tiff"] = img
    return folder, expected


@functools.cache
def _reference_model(path):
    return load_model(path)[0]


def _reference(path, img):
    """Cellularity by the documented recipe: INTER_AREA resize to S, [0,255] -> [-1,1], one image
    per forward pass, on a separately loaded copy of the model."""
    model = _reference_model(path)
    x = img if img.shape[:2] == (S, S) else cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA)
    t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return float(model.to_cellularity(model(t))[0])


def _parser():
    return build_parser()


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------
# predict: values


def test_every_image_mode_matches_the_reference_recipe(model_files, images):
    folder, expected = images
    preds = predict_images(model_files["classification"], folder, batch_size=3, progress=False)
    assert preds["path"].map(lambda p: p.rsplit("/", 1)[-1]).tolist() == sorted(expected)
    assert (preds["error"] == "").all(), preds["error"].tolist()
    ref = [_reference(model_files["classification"], expected[name]) for name in sorted(expected)]
    np.testing.assert_allclose(preds["cellularity"], ref, atol=1e-4)
    # the check has teeth: swapping to BGR moves the score by far more than the tolerance
    img = expected["a_rgb8.png"]
    assert abs(_reference(model_files["classification"], img)
               - _reference(model_files["classification"], img[..., ::-1].copy())) > 1e-2


@pytest.mark.parametrize("family", ["regression", "sr", "gbt"])
def test_each_model_family_matches_the_reference(model_files, images, family):
    folder, expected = images
    names = ["a_rgb8.png", "d_rgb16.tif", "g_lzw.tif"]
    preds = predict_images(model_files[family], [folder / n for n in names], batch_size=2,
                           progress=False)
    ref = [_reference(model_files[family], expected[n]) for n in names]
    np.testing.assert_allclose(preds["cellularity"], ref, atol=1e-4)
    assert preds["cellularity"].between(0, 1).all()


def test_tta_averages_the_eight_flips_and_rotations(model_files, images):
    folder, expected = images
    img = expected["g_lzw.tif"]
    # resizing commutes with flips and quarter turns only for square images: resize first
    square = cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA)
    views = [np.ascontiguousarray(np.rot90(v, k)) for v in (square, square[:, ::-1])
             for k in range(4)]
    ref = np.mean([_reference(model_files["regression"], v) for v in views])
    got = predict_images(model_files["regression"], folder / "g_lzw.tif", tta=True,
                         progress=False)["cellularity"].iloc[0]
    plain = predict_images(model_files["regression"], folder / "g_lzw.tif",
                           progress=False)["cellularity"].iloc[0]
    assert got == pytest.approx(ref, abs=2e-5)
    assert abs(got - plain) > 1e-4  # the 8 views do differ for this model


def test_elongated_image_is_scored_as_the_mean_of_square_tiles(model_files, tmp_path):
    img = _rgb(64, 200, 11)
    tifffile.imwrite(tmp_path / "strip.tif", img, photometric="rgb")
    # ceil(200 / 64) = 4 tiles of 64 x 64 at x = 0, 45, 91, 136 (evenly spaced, covering)
    ref = np.mean([_reference(model_files["regression"], np.ascontiguousarray(img[:, a:a + 64]))
                   for a in (0, 45, 91, 136)])
    got = predict_images(model_files["regression"], tmp_path / "strip.tif", progress=False)
    assert got["cellularity"].iloc[0] == pytest.approx(ref, abs=2e-5)


def test_mpp_scores_windows_of_the_training_field_of_view(model_files, tmp_path):
    # the model learned 64-px patches at 0.5 um/px (a 32 um field of view)
    reg, info = load_model(model_files["regression"])
    sized = save_model(reg, tmp_path / "sized.pt", preprocess=PRE,
                       pixel_size={"mpp": 0.5, "patch_px": 64})
    img = _rgb(256, 256, 12)
    tifffile.imwrite(tmp_path / "x40.tif", img, photometric="rgb")
    # at 0.25 um/px the field is 128 px: the four quadrants, each resized to 64, averaged
    ref = np.mean([_reference(model_files["regression"], np.ascontiguousarray(img[y:y + 128, x:x + 128]))
                   for y in (0, 128) for x in (0, 128)])
    got = predict_images(sized, tmp_path / "x40.tif", progress=False, mpp=0.25)
    assert got["cellularity"].iloc[0] == pytest.approx(ref, abs=2e-5)
    # at 0.125 um/px the field is 256 px: the whole image, as without --mpp
    whole = predict_images(sized, tmp_path / "x40.tif", progress=False, mpp=0.125)
    assert whole["cellularity"].iloc[0] == pytest.approx(_reference(model_files["regression"], img),
                                                         abs=2e-5)
    # a smaller field than the model's is padded by reflection, not enlarged
    small = _rgb(48, 48, 13)
    tifffile.imwrite(tmp_path / "small.tif", small, photometric="rgb")
    padded = cv2.copyMakeBorder(small, 8, 8, 8, 8, cv2.BORDER_REFLECT_101)
    got = predict_images(sized, tmp_path / "small.tif", progress=False, mpp=0.5)
    assert got["cellularity"].iloc[0] == pytest.approx(_reference(model_files["regression"], padded),
                                                       abs=2e-5)
    # a file without a pixel size counts as BreastPathQ's (512 px at 0.5 um/px: a 256 um field)
    pred = Predictor(model_files["regression"], mpp=0.5)
    assert pred.window_side() == 512 and not pred.describe()["model_pixel_size"]["recorded"]
    with pytest.raises(ValueError, match="mpp"):
        Predictor(sized, mpp=0)
    # at 8 um/px the field is 4 px: refused as too small, in an error row naming the file
    bad = predict_images(sized, tmp_path / "small.tif", progress=False, mpp=8.0)
    assert np.isnan(bad["cellularity"].iloc[0])
    assert re.search(r"small\.tif: at 8 um/px .* field of view is 4 px, which would be enlarged",
                     bad["error"].iloc[0])


def test_cli_predict_mpp(model_files, images, tmp_path):
    out = tmp_path / "p.csv"
    assert _run(["predict", "--model", str(model_files["regression"]), "--images",
                 str(images[0]), "--out", str(out), "--mpp", "4", "--quiet"]) == 0
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["mpp"] == 4 and side["model_pixel_size"]["mpp"] == 0.5
    # at 0.25 um/px the model's 256 um field is 1024 px, over twice the 80 px image: refused
    assert _run(["predict", "--model", str(model_files["regression"]), "--images",
                 str(images[0]), "--out", str(out), "--mpp", "0.25", "--quiet"]) == 1
    error = pd.read_csv(out, keep_default_na=False)["error"].iloc[0]
    assert re.search(r"a_rgb8\.png: image 80x80 .* \(1024 px a side\): it would be mostly mirrored "
                     r"padding", error), error


def test_real_images_are_scored(model_files, real_dir):
    files = collect_images(real_dir)
    assert len(files) >= 3
    preds = predict_images(model_files["regression"], files, batch_size=4, progress=False)
    assert (preds["error"] == "").all(), preds["error"].tolist()
    for path, value in zip(files, preds["cellularity"]):
        if path.suffix.lower() == ".png":  # an independent decoder for the reference
            with Image.open(path) as im:
                img = np.array(im.convert("RGB"))
        else:
            img = tifffile.imread(path)
        assert value == pytest.approx(_reference(model_files["regression"], img), abs=2e-5)


# ---------------------------------------------------------------------------------------------
# predict: bad input, files, CLI


def _bad_files(folder, images_folder):
    (folder / "z_text.png").write_text("this is not an image\n")
    (folder / "z_empty.tif").write_bytes(b"")
    data = (images_folder / "d_rgb16.tif").read_bytes()
    (folder / "z_truncated.tif").write_bytes(data[: len(data) // 3])
    Image.fromarray(_rgb(12, 12, 12)).save(folder / "z_tiny.png")  # 64 / 12 > 4x enlargement
    return ["z_text.png", "z_empty.tif", "z_truncated.tif", "z_tiny.png"]


def test_bad_files_give_error_rows_and_the_others_are_scored(model_files, images, tmp_path):
    folder, expected = images
    bad = _bad_files(tmp_path, folder)
    paths = [folder / "a_rgb8.png", *[tmp_path / b for b in bad], tmp_path / "missing.tif",
             folder / "c_grey.tif"]
    preds = predict_images(model_files["regression"], paths, batch_size=2, progress=False)
    assert len(preds) == len(paths) and preds["path"].tolist() == [str(p) for p in paths]
    ok = preds["error"] == ""
    assert ok.tolist() == [True] + [False] * 5 + [True]
    assert preds.loc[~ok, "cellularity"].isna().all()
    for path, error in zip(preds.loc[~ok, "path"], preds.loc[~ok, "error"]):
        assert path in error  # every message names its file
    assert "too small" in preds["error"].iloc[4]
    assert "not found" in preds["error"].iloc[5]
    assert preds["cellularity"].iloc[-1] == pytest.approx(
        _reference(model_files["regression"], expected["c_grey.tif"]), abs=2e-5)


def test_cli_predict_writes_csv_and_sidecar_and_exits_1_on_a_bad_file(model_files, images,
                                                                     tmp_path, capsys):
    folder, expected = images
    (tmp_path / "in").mkdir()
    bad = _bad_files(tmp_path / "in", folder)
    out = tmp_path / "out" / "preds.csv"
    code = _run(["predict", "--model", str(model_files["regression"]), "--images", str(folder),
                 str(tmp_path / "in" / bad[0]), "--out", str(out), "--batch-size", "3",
                 "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "z_text.png" in err
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "cellularity", "error"]
    assert len(table) == len(expected) + 1
    assert (table["error"].iloc[:-1] == "").all() and table["cellularity"].iloc[-1] == ""
    side = json.loads((out.parent / "preds.csv.json").read_text())
    assert side["family"] == "direct" and side["config"]["task"] == "regression"
    assert side["n_ok"] == len(expected) and side["n_failed"] == 1
    assert side["preprocess"] == PRE and side["cellulib_version"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.csv", "preds.csv.json"]
    # the CSV holds what predict_images returns
    ref = predict_images(model_files["regression"], folder, progress=False)
    np.testing.assert_allclose(table["cellularity"].iloc[:-1].astype(float), ref["cellularity"],
                               atol=1e-5)
    assert _run(["predict", "--model", str(model_files["regression"]), "--images",
                 str(folder / "a_rgb8.png"), "--out", str(out), "--quiet"]) == 0


def test_output_is_never_half_written(model_files, images, tmp_path, monkeypatch):
    folder, _ = images
    out = tmp_path / "preds.csv"
    out.write_text("previous,content\n")
    calls = {"n": 0}
    original = Predictor.score_batch

    def failing(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in the middle of the run")
        return original(self, batch)

    monkeypatch.setattr(Predictor, "score_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_to_csv(model_files["regression"], folder, out, batch_size=2, progress=False)
    assert out.read_text() == "previous,content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no temporary files


def test_model_file_problems_are_clear_errors(model_files, tmp_path):
    with pytest.raises(ModelFileError, match="segmentation model"):
        Predictor(model_files["seg"])
    with pytest.raises(ModelFileError, match=r"nopre\.pt: no preprocessing"):
        Predictor(model_files["no_preprocess"])
    with pytest.raises(ModelFileError, match=r"sr48\.pt: .*divisible by 32"):
        Predictor(model_files["sr_bad_size"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFileError, match=r"junk\.pt"):
        Predictor(junk)
    payload = torch.load(model_files["regression"], weights_only=False)
    payload["format_version"] = 99
    future = tmp_path / "future.pt"
    torch.save(payload, future)
    with pytest.raises(ModelFileError, match=r"future\.pt: model file format 99"):
        Predictor(future)
    # and through the command line: a ValueError for cli.main to report with exit 2
    with pytest.raises(ValueError, match=r"seg\.pt"):
        _run(["predict", "--model", str(model_files["seg"]), "--images", str(tmp_path),
              "--out", str(tmp_path / "p.csv")])


def test_empty_folder_is_a_clear_error(model_files, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path}: no image files"):
        predict_images(model_files["regression"], tmp_path, progress=False)


def test_cli_main_reports_errors_with_exit_2(model_files, tmp_path, capsys):
    from cellulib.cli import commands

    parser = commands.build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "predict" not in choices:
        pytest.skip("predict is not wired into cellulib.cli.commands yet")
    code = commands.main(["predict", "--model", str(model_files["seg"]), "--images", str(tmp_path),
                     "--out", str(tmp_path / "p.csv")])
    assert code == 2
    assert "cellulib predict: error:" in capsys.readouterr().err


def test_stream_keeps_order_and_reads_ahead_only_a_window(model_files):
    predictor = Predictor(model_files["regression"], batch_size=4, workers=2)
    started = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    inputs = [_rgb(S, S, 100 + i) for i in range(40)]

    def job(i):
        def load():
            with lock:
                started.append(i)
            time.sleep(0.02 if i == 0 else float(rng.random()) * 0.002)  # first one is slowest
            return [inputs[i]]
        return load

    stream = predictor.stream(((i, job(i)) for i in range(40)), progress=False)
    first = next(stream)
    assert first[0] == 0
    assert len(started) <= 2 * predictor.batch_size + 2 * predictor.workers + predictor.batch_size
    rest = list(stream)
    assert [k for k, _, _ in [first, *rest]] == list(range(40))
    ref = predictor.score_batch(np.stack(inputs))
    np.testing.assert_allclose([v for _, v, _ in [first, *rest]], ref, atol=1e-6)


# the engine behind Predictor.stream: a DataLoader over the jobs, in-process first, then workers
REGIMES = ["in-process", "workers"]


def _engine(path, regime, **options):
    """A Predictor whose stream loads every job in-process, or every job in worker processes."""
    predictor = Predictor(path, **options)
    if regime == "workers":
        predictor._WORKER_START_S, predictor._LOAD_BOUND = 0.0, 0.0
    else:
        predictor._WORKER_START_S = float("inf")
    return predictor


def _mixed_jobs(n=31):
    """Jobs of 1-5 inputs each, with raising jobs of two kinds and an empty one between them;
    returns the jobs and, per key, the inputs or the expected error message."""
    spec = {}
    for i in range(n):
        if i % 7 == 3:
            spec[i] = ValueError(f"job {i}: broken\n   pixels"), f"job {i}: broken pixels"
        elif i % 11 == 5:
            spec[i] = OSError(f"job {i}: gone"), f"OSError: job {i}: gone"
        elif i == 8:
            spec[i] = [], "8: nothing to score"
        else:
            spec[i] = [_rgb(S, S, 300 + 7 * i + j) for j in range(1 + (i * 5) % 5)], ""

    def job(i):
        def load():
            what = spec[i][0]
            if isinstance(what, Exception):
                raise what
            return what
        return load

    return ((i, job(i)) for i in range(n)), spec


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_stream_order_errors_and_batches_across_images(model_files, monkeypatch, regime,
                                                        batch_size):
    predictor = _engine(model_files["regression"], regime, batch_size=batch_size, workers=2)
    jobs, spec = _mixed_jobs()
    sizes = []
    original = Predictor.score_batch

    def recording(self, batch):
        sizes.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(Predictor, "score_batch", recording)
    rows = list(predictor.stream(jobs, progress=False))
    assert [k for k, _, _ in rows] == list(spec)  # job order, errors included
    assert [e for _, _, e in rows] == [spec[k][1] for k in spec]  # the same messages as ever
    assert all(np.isnan(v) == bool(e) for _, v, e in rows)
    # the inputs of consecutive images fill whole batches; only the last one is partial
    flat = [x for k in spec if not spec[k][1] for x in spec[k][0]]
    assert sum(sizes) == len(flat) and all(s == batch_size for s in sizes[:-1])
    # bit for bit what scoring those batches and averaging each image's windows gives
    monkeypatch.setattr(Predictor, "score_batch", original)
    scores = np.concatenate([predictor.score_batch(np.stack(flat[a:a + batch_size]))
                             for a in range(0, len(flat), batch_size)])
    expected, at = {}, 0
    for k in spec:
        if not spec[k][1]:
            n = len(spec[k][0])
            expected[k] = float(np.mean(list(scores[at:at + n])))
            at += n
    assert {k: v for k, v, e in rows if not e} == expected


def test_stream_workers_read_ahead_only_a_window(model_files, tmp_path):
    predictor = _engine(model_files["regression"], "workers", batch_size=4, workers=2)
    log = tmp_path / "started.txt"

    def job(i):
        def load():
            with open(log, "a") as fh:  # visible across processes, unlike a list
                fh.write(f"{i} {os.getpid()}\n")
            return [_rgb(S, S, 100 + i)]
        return load

    stream = predictor.stream(((i, job(i)) for i in range(60)), progress=False)
    first = next(stream)
    time.sleep(0.5)  # give the workers every chance to run further ahead
    started = log.read_text().split("\n")[:-1]
    window = max(2 * predictor.batch_size, 2 * predictor.workers)
    assert first[0] == 0
    assert len(started) <= predictor.batch_size + window
    rest = list(stream)
    assert [k for k, _, _ in [first, *rest]] == list(range(60))
    pids = {int(line.split()[1]) for line in log.read_text().split("\n")[:-1]}
    assert len(pids) == predictor.workers and os.getpid() not in pids  # forked workers loaded


def test_stream_hands_over_to_workers_once_loading_costs_their_start(model_files, tmp_path):
    LOAD_S = 0.25
    predictor = Predictor(model_files["regression"], batch_size=3, workers=2)
    budget = predictor.workers * predictor._WORKER_START_S
    inputs = [_rgb(S, S, 200 + i) for i in range(16)]

    def jobs():
        def job(i):
            def load():
                (tmp_path / f"{i}.pid").write_text(str(os.getpid()))
                # loading dominates, on any CPU and under load (a float32 forward of a batch on a
                # busy AVX2 core took longer than the 0.06 s this test slept before), and spends the
                # budget within two jobs
                time.sleep(LOAD_S)
                return [inputs[i], inputs[-1 - i]] if i % 2 else [inputs[i]]
            return load
        return ((i, job(i)) for i in range(16))

    rows = list(predictor.stream(jobs(), total=16, progress=False))
    assert [k for k, _, _ in rows] == list(range(16)) and all(not e for _, _, e in rows)
    loaded_by = [int((tmp_path / f"{i}.pid").read_text()) for i in range(16)]
    here = [i for i in range(16) if loaded_by[i] == os.getpid()]
    assert here == list(range(len(here)))  # the first jobs in-process, then the workers
    assert 1 <= len(here) <= math.ceil(budget / LOAD_S) + 1 < 16
    # the scores do not depend on where a job was loaded
    again = _engine(model_files["regression"], "in-process", batch_size=3, workers=2)
    assert rows == list(again.stream(jobs(), progress=False))


def test_stream_stays_in_process_while_the_network_dominates(model_files, monkeypatch, tmp_path):
    # loading is a small part of the time (a CPU busy with the forward passes): no worker helps
    predictor = Predictor(model_files["regression"], batch_size=2, workers=2)
    image = _rgb(S, S, 3)
    original = Predictor.score_batch

    def slow(self, batch):
        time.sleep(0.1)
        return original(self, batch)

    def job(i):
        def load():
            (tmp_path / f"{i}.pid").write_text(str(os.getpid()))
            time.sleep(0.02)
            return [image]
        return load

    monkeypatch.setattr(Predictor, "score_batch", slow)
    rows = list(predictor.stream(((i, job(i)) for i in range(24)), progress=False))
    assert [k for k, _, _ in rows] == list(range(24))
    assert {int((tmp_path / f"{i}.pid").read_text()) for i in range(24)} == {os.getpid()}
    # nor when the jobs left would load in less time than starting the workers takes
    monkeypatch.setattr(Predictor, "score_batch", original)
    rows = list(predictor.stream(((i, job(i)) for i in range(14)), total=14, progress=False))
    assert {int((tmp_path / f"{i}.pid").read_text()) for i in range(14)} == {os.getpid()}


def test_stream_workers_read_files_opened_before_the_stream(model_files, tmp_path):
    # a reader opened here (a slide's TIFF): after fork its seek + read must not race
    data = np.arange(1 << 16, dtype=np.uint32)
    data.tofile(tmp_path / "blob.bin")
    fh = open(tmp_path / "blob.bin", "rb", buffering=0)
    image = _rgb(S, S, 7)

    def job(i):
        def load():
            offset = (i * 997) % ((1 << 16) - 256)
            fh.seek(offset * 4)
            time.sleep(0.002)  # the other worker seeks meanwhile
            got = np.frombuffer(fh.read(1024), np.uint32)
            if not np.array_equal(got, data[offset:offset + 256]):
                raise ValueError(f"job {i}: read another job's bytes")
            return [image]
        return load

    try:
        predictor = _engine(model_files["regression"], "workers", batch_size=8, workers=2)
        rows = list(predictor.stream(((i, job(i)) for i in range(60)), progress=False))
        assert [e for _, _, e in rows] == [""] * 60
        assert fh.tell() == 0  # the parent's own offset is untouched
    finally:
        fh.close()


def test_stream_leaves_no_workers_and_no_rng_change(model_files, capsys):
    import multiprocessing

    predictor = _engine(model_files["regression"], "workers", batch_size=2, workers=2)
    jobs, spec = _mixed_jobs(12)
    state, frozen = torch.get_rng_state(), gc.get_freeze_count()
    stream = predictor.stream(jobs, total=12, desc="tiles-bar", unit="tile")
    next(stream)
    assert multiprocessing.active_children()
    stream.close()  # stopped early: the workers are shut down
    assert not multiprocessing.active_children()
    assert torch.equal(torch.get_rng_state(), state)  # workers' seeds from a private generator
    assert gc.get_freeze_count() == frozen  # frozen only while the workers were forked
    captured = capsys.readouterr()
    assert "tiles-bar" in captured.err and captured.out == ""  # the bar is on stderr



def test_stream_in_a_daemonic_process_loads_in_process(model_files):
    # a multiprocessing.Pool worker may not start processes: the jobs are loaded where it runs
    import multiprocessing

    predictor = _engine(model_files["regression"], "workers", batch_size=2, workers=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def bad(i):
        def load():
            raise ValueError(f"job {i}: unreadable in pid {os.getpid()}")
        return load

    def run():
        try:
            rows = list(predictor.stream(((i, bad(i)) for i in range(5)), progress=False))
            queue.put((os.getpid(), rows))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            queue.put((os.getpid(), repr(exc)))

    proc = ctx.Process(target=run, daemon=True)
    proc.start()
    try:
        pid, rows = queue.get(timeout=120)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert [k for k, _, _ in rows] == list(range(5))
    assert [e for _, _, e in rows] == [f"job {i}: unreadable in pid {pid}" for i in range(5)]

# ---------------------------------------------------------------------------------------------
# predict: precision (bf16 autocast or float32)

#: Largest difference between bf16 and float32 scores accepted on the same images: bf16 keeps 8
#: significant bits, so a logit is off by about 0.4%; on trained models the scores moved by at
#: most 0.007. The same tolerance as the benchmark (cellulib.bench.suite.PREDICT_ATOL).
BF16_ATOL = 0.02


@pytest.fixture(scope="module")
def plain_model_file(tmp_path_factory):
    """A random-init direct model, not sensitised: bf16 rounding is not amplified here."""
    torch.manual_seed(1)
    return save_model(networks.direct_model("resnet34"), tmp_path_factory.mktemp("plain") / "p.pt",
                      preprocess=PRE)


@pytest.mark.parametrize("family", ["plain", "sr", "gbt"])
def test_bf16_and_float32_give_close_scores_on_the_same_images(model_files, plain_model_file,
                                                                images, family):
    folder, expected = images
    path = plain_model_file if family == "plain" else model_files[family]
    names = sorted(expected)
    f32 = Predictor(path, precision="float32", batch_size=3)
    bf16 = Predictor(path, precision="bf16", batch_size=3)
    assert (f32.precision, bf16.precision) == ("float32", "bf16")
    assert bf16.describe()["precision"] == "bf16" and f32.describe()["precision"] == "float32"
    got = {p.precision: predict_images(p, folder, progress=False) for p in (f32, bf16)}
    for preds in got.values():  # the same images in the same order on both sides
        assert preds["path"].map(lambda s: s.rsplit("/", 1)[-1]).tolist() == names
        assert (preds["error"] == "").all()
    diff = np.abs(got["bf16"]["cellularity"] - got["float32"]["cellularity"])
    assert diff.max() <= BF16_ATOL, diff.tolist()
    # float32 is the documented recipe
    ref = [_reference(path, expected[n]) for n in names]
    np.testing.assert_allclose(got["float32"]["cellularity"], ref, atol=1e-4)


def test_bf16_really_runs_in_bf16_and_auto_follows_the_engine(plain_model_file, images,
                                                                monkeypatch):
    from cellulib.models import engine

    folder, expected = images
    batch = np.stack([cv2.resize(expected[n], (S, S), interpolation=cv2.INTER_AREA)
                      for n in sorted(expected)])
    f32 = Predictor(plain_model_file, precision="float32").score_batch(batch)
    bf16 = Predictor(plain_model_file, precision="bf16").score_batch(batch)
    assert np.abs(bf16 - f32).max() > 0  # autocast is applied, not silently skipped
    assert bf16.dtype == np.float64 and np.isfinite(bf16).all()
    # "auto": $CELLULIB_PRECISION (float32 in this module), else what the engine picks here
    assert Predictor(plain_model_file).precision == "float32"
    monkeypatch.delenv("CELLULIB_PRECISION")
    picked = {None: "float32", torch.bfloat16: "bf16"}[engine.amp_dtype("cpu")]
    assert Predictor(plain_model_file, device="cpu").precision == picked
    with pytest.raises(ValueError, match="precision"):
        Predictor(plain_model_file, precision="fp64")
    with pytest.raises(ValueError, match="CUDA"):
        Predictor(plain_model_file, device="cpu", precision="fp16")


@pytest.mark.parametrize("family", ["plain", "sr", "gbt"])
def test_bf16_scores_are_plain_autocast_bit_for_bit_and_a_given_model_stays_float32(
        model_files, plain_model_file, images, family):
    """The predictor stores the weights autocast casts at every batch in bf16 once
    (engine.precast_weights): the scores are those of a plain autocast forward of the float32
    model, and a model handed over in memory is not changed. The GBT route runs its
    segmentation in float32: nothing of it is cast."""
    folder, expected = images
    path = plain_model_file if family == "plain" else model_files[family]
    batch = np.stack([cv2.resize(expected[n], (S, S), interpolation=cv2.INTER_AREA)
                      for n in sorted(expected)])
    model, info = load_model(path)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = Predictor(path, precision="float32")._to_input(batch)  # the same pixels
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.to_cellularity(model(x).float()).double().numpy()
    for given in (path, (model, info)):
        pred = Predictor(given, precision="bf16", batch_size=len(batch))
        cast = [n for n, p in pred.model.named_parameters() if p.dtype == torch.bfloat16]
        if family == "gbt":  # nothing to cast: nothing copied either
            assert cast == [] and (given == path or pred.model is model)
        else:
            assert cast and "head.weight" not in cast  # a float32 head is left alone
        np.testing.assert_array_equal(pred.score_batch(batch), plain)
    if family == "gbt":
        return
    assert pred.model is not model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # float32: nothing cast, the given model itself is used
    assert Predictor((model, info), precision="float32").model is model


def test_a_network_that_fails_on_its_own_input_size_is_named_when_loaded(plain_model_file):
    """The one-time cast runs the network once on a zero image of its input size: a network
    that cannot run there is refused with the model named, not with torch's message alone."""
    model, info = load_model(plain_model_file)

    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model.forward = broken
    with pytest.raises(RuntimeError, match=rf"<loaded model>: the network fails on a {S}x{S} "
                                           "image: mat1 and mat2"):
        Predictor((model, info), precision="bf16")


@pytest.mark.parametrize("normalize", ["minus_one_one", "imagenet"])
def test_prediction_pixels_are_the_training_pixels(tmp_path, normalize):
    from cellulib.data.transforms import normalize_image

    path = save_model(networks.direct_model("resnet34"), tmp_path / "m.pt",
                      preprocess={"input_size": S, "normalize": normalize})
    batch = np.stack([_rgb(S, S, 40 + i) for i in range(3)])
    for channels_last in (True, False):
        x = Predictor(path, channels_last=channels_last)._to_input(batch)
        # bit for bit what the DataLoaders feed the model in training
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).cpu().numpy(),
                                      normalize_image(batch, normalize))
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_cli_precision_flag(plain_model_file, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "preds.csv"
    for precision in ("float32", "bf16"):
        assert _run(["predict", "--model", str(plain_model_file), "--images", str(folder),
                     "--out", str(out), "--precision", precision, "--quiet"]) == 0
        assert json.loads((tmp_path / "preds.csv.json").read_text())["precision"] == precision
    args = _parser().parse_args(["slide", "--model", "m.pt", "s.tif", "--out", "o",
                                 "--precision", "float32"])
    assert args.precision == "float32"
    assert _parser().parse_args(["predict", "--model", "m.pt", "--images", "d", "--out",
                                 "o.csv"]).precision == "auto"
    with pytest.raises(SystemExit):
        _parser().parse_args(["predict", "--model", "m.pt", "--images", "d", "--out", "o.csv",
                              "--precision", "fp64"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# evaluate


def _write_eval_case(tmp_path):
    # hand-computed case: y_true 0.1 0.3 0.6 0.9, y_pred 0.2 0.3 0.3 0.7
    labels = tmp_path / "val_labels.csv"
    labels.write_text("slide,rid,y\n1001,1,0.1\n1001,2,0.3\n1002,1,0.6\n1002,2,0.9\n1003,7,0.5\n")
    pred = tmp_path / "preds.csv"
    pred.write_text(
        "path,cellularity,error\n"
        "data/validation/1002_2.tif,0.700000,\n"
        "data/validation/1001_1.tif,0.200000,\n"
        "data/validation/broken.tif,,data/validation/broken.tif: not a readable image\n"
        "data/validation/1002_1.tif,0.300000,\n"
        "data/validation/9999_1.tif,0.400000,\n"
        "data/validation/1001_2.tif,0.300000,\n")
    return pred, labels


def test_evaluate_equals_hand_computed_metrics(tmp_path):
    import pingouin

    pred, labels = _write_eval_case(tmp_path)
    with pytest.warns(PredictWarning) as record:
        pairs = match_predictions(pred, labels)
    messages = " ".join(str(w.message) for w in record)
    assert "1 row(s) have no cellularity" in messages  # the failed image
    assert "9999_1" in messages and "1003_7" in messages  # unmatched, both ways
    assert pairs["key"].tolist() == ["1002_2", "1001_1", "1002_1", "1001_2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bootstrap resamples of 4 patches can be degenerate
        table = evaluate_files(pred, labels, n_boot=200, seed=0)
    # MSE = (0.01 + 0 + 0.09 + 0.04) / 4
    assert table.loc["MSE", "value"] == pytest.approx(0.035)
    # bins true 0 1 2 3, pred 0 1 1 2: p_o = 1/2, p_e = 1/4 -> kappa = (1/2 - 1/4) / (3/4)
    assert table.loc["kappa", "value"] == pytest.approx(1 / 3)
    # 6 pairs, none tied in truth: 5 concordant, 1 tied in prediction -> (5 + 1/2) / 6
    assert table.loc["PK", "value"] == pytest.approx(5.5 / 6)
    long = pd.DataFrame({"target": np.tile(np.arange(4), 2), "rater": np.repeat(["t", "p"], 4),
                         "score": [0.1, 0.3, 0.6, 0.9, 0.2, 0.3, 0.3, 0.7]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pingouin's own pandas deprecation warnings
        ref = pingouin.intraclass_corr(long, "target", "rater", "score").set_index("Type")
    # two-way random, absolute agreement, single rater: "ICC(A,1)" (pingouin >= 0.7) or "ICC2"
    icc_ref = ref.loc["ICC(A,1)" if "ICC(A,1)" in ref.index else "ICC2", "ICC"]
    assert table.loc["ICC(2,1)", "value"] == pytest.approx(icc_ref, abs=1e-9)
    assert (table["n"] == 4).all()
    assert table.loc["MSE", "ci_low"] <= 0.035 <= table.loc["MSE", "ci_high"]


def test_labels_with_path_column_and_no_match_error(tmp_path):
    pred, _ = _write_eval_case(tmp_path)
    labels = tmp_path / "labels_paths.csv"
    labels.write_text("path,cellularity\nx/1001_1.png,0.1\nx/1001_2.png,0.3\nx/1002_1.png,0.6\n"
                      "x/1002_2.png,0.9\nx/9999_1.png,0.4\n")
    with pytest.warns(PredictWarning):
        pairs = match_predictions(pred, labels)
    assert len(pairs) == 5
    np.testing.assert_allclose(pairs["y_true"] - pairs["y_pred"], [0.2, -0.1, 0.3, 0, 0])
    other = tmp_path / "other.csv"
    other.write_text("slide,rid,y\n5,5,0.5\n")
    with pytest.warns(PredictWarning), pytest.raises(ValueError, match="no prediction matches"):
        match_predictions(pred, other)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,score\na.tif,0.5\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column"):
        match_predictions(bad, labels)
    out_of_range = tmp_path / "range.csv"
    out_of_range.write_text("path,cellularity\na.tif,1.5\n")
    with pytest.raises(DataError, match=r"range\.csv: cellularity outside \[0, 1\]"):
        match_predictions(out_of_range, labels)


def test_bland_altman_by_hand():
    # d = pred - true = 0.1, 0, -0.3, -0.2: mean -0.1, squared deviations .04 .01 .04 .01
    ba = bland_altman([0.1, 0.3, 0.6, 0.9], [0.2, 0.3, 0.3, 0.7])
    sd = np.sqrt(0.1 / 3)
    assert ba["bias"] == pytest.approx(-0.1)
    assert ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(-0.1 - 1.96 * sd)
    assert ba["loa_high"] == pytest.approx(-0.1 + 1.96 * sd)
    fig = agreement_figure([0.1, 0.3, 0.6, 0.9], [0.2, 0.3, 0.3, 0.7])
    labels = [ax.get_xlabel() + ax.get_ylabel() for ax in fig.axes]
    assert all("cellularity" in text for text in labels)


def test_cli_evaluate_table_json_and_figure(tmp_path, capsys):
    pred, labels = _write_eval_case(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels),
                     "--n-boot", "100"]) == 0
        text = capsys.readouterr().out
        assert "MSE" in text and "0.035" in text and "ICC(2,1)" in text and "4 matched" in text
        figure = tmp_path / "fig" / "agreement.png"
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json",
                     "--n-boot", "100", "--figure", str(figure)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["n"] == 4
    assert payload["metrics"]["PK"]["value"] == pytest.approx(5.5 / 6)
    with Image.open(figure) as im:
        assert im.format == "PNG" and im.size[0] > 500


def _write_eval_case_10(tmp_path, y_pred):
    """10 validation patches with labels 0.05, 0.15, ..., 0.95 and the given predictions."""
    y_true = np.round(np.arange(10) / 10 + 0.05, 2)
    labels = tmp_path / "val10.csv"
    labels.write_text("slide,rid,y\n" + "".join(f"2000,{i},{y}\n" for i, y in enumerate(y_true)))
    pred = tmp_path / "preds10.csv"
    pred.write_text("path,cellularity,error\n"
                    + "".join(f"v/2000_{i}.tif,{p:.6f},\n" for i, p in enumerate(y_pred)))
    return pred, labels, y_true


def test_cli_evaluate_json_has_the_mean_predictor_and_learned(tmp_path, capsys):
    # perfect predictions: MSE 0 with CI [0, 0]; mean predictor 0.5: MSE = mean((y - 0.5)^2)
    pred, labels, y_true = _write_eval_case_10(tmp_path, np.round(np.arange(10) / 10 + 0.05, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json",
                     "--n-boot", "200", "--train-mean", "0.5"]) == 0
    payload = json.loads(capsys.readouterr().out)
    base = payload["mean_predictor"]
    assert base["available"] and base["train_mean"] == 0.5 and base["source"] == "--train-mean"
    assert base["MSE"]["value"] == pytest.approx(np.mean((y_true - 0.5) ** 2))
    assert base["MSE"]["ci_low"] <= base["MSE"]["value"] <= base["MSE"]["ci_high"]
    assert payload["learned"] is True
    assert set(payload["metrics"]) == {"MSE", "kappa", "ICC(2,1)", "PK"}

    # a constant at the training mean has not learned; the text output says so
    const, labels, _ = _write_eval_case_10(tmp_path, np.full(10, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(["evaluate", "--pred", str(const), "--labels", str(labels), "--json",
                     "--n-boot", "200", "--train-mean", "0.5"]) == 0
        assert json.loads(capsys.readouterr().out)["learned"] is False
        assert _run(["evaluate", "--pred", str(const), "--labels", str(labels),
                     "--n-boot", "200", "--train-mean", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "MSE (mean predictor)" in text and "learned: no" in text


def test_evaluate_training_mean_from_labels_or_model_file_never_guessed(tmp_path, capsys):
    pred, labels, _ = _write_eval_case_10(tmp_path, np.full(10, 0.3))
    train_labels = tmp_path / "train_labels.csv"
    train_labels.write_text("slide,rid,y\n1,1,0.2\n1,2,0.4\n1,3,0.3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = evaluate_files(pred, labels, n_boot=100, train_mean=0.3)
        assert table.loc["MSE (mean predictor)", "value"] == pytest.approx(
            table.loc["MSE", "value"])  # the model is the constant 0.3
        # --train-labels: the mean of 0.2, 0.4, 0.3
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json",
                     "--n-boot", "50", "--train-labels", str(train_labels)]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["mean_predictor"]["train_mean"] == pytest.approx(0.3)
        # no source at all: said plainly, no number made up
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json",
                     "--n-boot", "50"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["mean_predictor"]["available"] is False and payload["learned"] is None
        assert "--train-mean" in payload["mean_predictor"]["reason"]
        # the model file named by the sidecar records train_mean
        model = save_model(networks.direct_model("resnet34"), tmp_path / "m.pt", preprocess=PRE,
                           train_mean=0.42)
        (tmp_path / "preds10.csv.json").write_text(json.dumps({"model": str(model)}))
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json",
                     "--n-boot", "50"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["mean_predictor"]["train_mean"] == pytest.approx(0.42)
        assert "m.pt" in payload["mean_predictor"]["source"]
        # a model file without it: no mean predictor, and the text output says why
        bare = save_model(networks.direct_model("resnet34"), tmp_path / "bare.pt", preprocess=PRE)
        (tmp_path / "preds10.csv.json").write_text(json.dumps({"model": str(bare)}))
        assert _run(["evaluate", "--pred", str(pred), "--labels", str(labels),
                     "--n-boot", "50"]) == 0
    text = capsys.readouterr().out
    assert "no mean predictor" in text and "records no training mean" in text
