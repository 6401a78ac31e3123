"""Models that learn: on an easy dataset, a few seconds of training beat the mean predictor.

The dataset is hand-made so that the answer is known and easy: each patch is pink "stroma" with a
band of purple "tumour" covering exactly its label's share of the rows. A direct model or the SR
cascade that cannot get well below the mean predictor's MSE on this, after a short one-cycle run,
has a broken training loop (a saturated output, a wrong target scale, a frozen body), which is what
made the book's direct models predict a constant before. Not a timed test: it checks learning, the
bench checks speed.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import TEST_THREADS

from cellulib.metrics import agreement
from cellulib.models import networks
from cellulib.training import train

SIDE = 64
PINK = np.array([236, 170, 200], dtype=np.float64)
PURPLE = np.array([90, 50, 140], dtype=np.float64)


def _patch(y: float, rng: np.random.Generator) -> np.ndarray:
    """A patch whose top ``round(y * SIDE)`` rows are purple, the rest pink, with pixel noise."""
    img = np.repeat(PINK[None, None], SIDE, 0).repeat(SIDE, 1)
    img[: int(round(y * SIDE))] = PURPLE
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    for split, csv_name, n in (("train", "train_labels.csv", 64), ("validation", "val_labels.csv", 24)):
        folder = root / "datasets" / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(n):
            y = round(float(rng.uniform(0, 1)) * SIDE) / SIDE  # exact share of rows
            tifffile.imwrite(folder / f"{split}_{i}.tif", _patch(y, rng), photometric="rgb")
            rows.append({"slide": split, "rid": i, "y": round(y, 4)})
        pd.DataFrame(rows).to_csv(root / "datasets" / csv_name, index=False)
    return root


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    torch.set_num_threads(TEST_THREADS)
    return tmp_path


def _mean_predictor_mse(result) -> tuple[float, float]:
    pred = train.predictions(result)
    mean_mse = agreement.mse(pred.y_true, np.full(len(pred), result.meta["train_mean"]))
    return agreement.mse(pred.y_true, pred.y_pred), mean_mse


def test_training_labels_mean_is_recorded(easy_root, home):
    result = train.train_direct(easy_root, "resnet34", epochs=1, size=32, direct_bs=16,
                                progress=False)
    labels = pd.read_csv(easy_root / "datasets" / "train_labels.csv")
    assert result.meta["train_mean"] == pytest.approx(labels.y.mean())


@pytest.mark.parametrize("arch, task", [("resnet34", "regression"), ("xception", "classification")])
def test_a_direct_model_beats_the_mean_predictor(easy_root, home, arch, task):
    result = train.train_direct(easy_root, arch, task, epochs=8, size=SIDE, direct_bs=8,
                                direct_lr=3e-3, progress=False)
    mse, mean_mse = _mean_predictor_mse(result)
    assert mse < 0.3 * mean_mse, f"{arch} ({task}) MSE {mse:.4f} vs mean predictor {mean_mse:.4f}"
    assert np.std(train.predictions(result).y_pred) > 0.15  # not a constant near the mean


def test_the_sr_cascade_beats_the_mean_predictor(easy_root, home):
    # a random (untrained) segmentation net still passes colour through its maps; the regressor
    # on top must learn from them
    seg_net = networks.seg_model("fpn")
    seg = train.TrainResult(seg_net, pd.DataFrame(), {}, Path("random-fpn.pt"), False)
    result = train.train_sr(easy_root, seg, progress=False, sr_epochs=8, sr_finetune_epochs=0,
                            direct_bs=8, sr_lr=3e-3)
    mse, mean_mse = _mean_predictor_mse(result)
    assert mse < 0.3 * mean_mse, f"SR MSE {mse:.4f} vs mean predictor {mean_mse:.4f}"


def test_outputs_start_at_the_uninformed_answer():
    y = np.array([0.1, 0.2, 0.2, 0.9])
    reg = networks.init_output(networks.direct_model("resnet34"), y).eval()
    with torch.no_grad():
        out = reg(torch.randn(3, 3, 64, 64))
    assert torch.allclose(out, torch.full_like(out, y.mean()), atol=0.01)
    clf = networks.init_output(networks.direct_model("resnet34", "classification"), y).eval()
    with torch.no_grad():
        probs = torch.softmax(clf(torch.randn(2, 3, 64, 64)), 1)[0]
    # the prior: (count + 0.5) / (n + 0.5 * 101), here bin 20 holds two of four labels
    assert float(probs[20]) == pytest.approx(2.5 / (4 + 50.5), abs=0.01)
    assert float(probs[50]) == pytest.approx(0.5 / (4 + 50.5), abs=0.005)


def test_cli_predict_and_evaluate_reproduce_the_stored_validation_scores(easy_root, home, capsys):
    """What the book reports for a model is what `cellulib predict` + `cellulib evaluate` give."""
    import json

    from cellulib.cli import commands
    from cellulib.metrics import agreement

    result = train.train_direct(easy_root, "resnet34", epochs=1, size=32, direct_bs=16,
                                progress=False)
    preds_csv = home / "preds.csv"
    assert commands.main(["predict", "--model", str(result.path), "--images",
                     str(easy_root / "datasets" / "validation"), "--out", str(preds_csv)]) == 0
    capsys.readouterr()
    assert commands.main(["evaluate", "--pred", str(preds_csv), "--labels",
                     str(easy_root / "datasets" / "val_labels.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stored = train.predictions(result)
    assert report["metrics"]["MSE"]["value"] == pytest.approx(result.scores["valid_mse"], rel=1e-6)
    assert report["metrics"]["MSE"]["value"] == pytest.approx(
        agreement.mse(stored.y_true, stored.y_pred), rel=1e-6)
    # the model file carries its training mean, so evaluate scores the mean predictor too
    assert report["mean_predictor"]["train_mean"] == pytest.approx(result.meta["train_mean"])
