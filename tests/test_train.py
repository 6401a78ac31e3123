"""Training runs: a tiny segmentation run trains, is cached by its inputs, and reloads identically."""

import pytest
import torch

from cellulib import cli, load_model, synth, train


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return synth.make_breastpathq(root, n_train=4, n_val=2, n_cells=5, size=128, seed=0,
                                  progress=False)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    return tmp_path


def test_train_seg_is_cached_by_its_inputs(tiny_root, home):
    torch.set_num_threads(2)
    first = train.train_seg(tiny_root, "fpn", epochs=1, progress=False, crop=64,
                            patches_per_epoch=1, seg_bs=2)
    assert not first.cached and first.path.exists()
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
    code = cli.main(["train", "seg", "--data", str(tiny_root), "--out", str(out), "--epochs", "1",
                     "--size", "64", "--decoder", "unet"])
    assert code == 0 and out.exists()
    model, info = load_model(out)
    assert info["family"] == "seg" and info["config"]["decoder"] == "unet"
    assert "jaccard_nuclei" in capsys.readouterr().out


def test_cli_train_reports_a_missing_weights_file(tiny_root, home, capsys):
    code = cli.main(["train", "seg", "--data", str(tiny_root), "--out", str(home / "x.pt"),
                     "--epochs", "1", "--size", "64", "--pretrained", str(home / "nope.pth")])
    assert code == 2
    assert "nope.pth" in capsys.readouterr().err
