"""Model files: round trips give identical outputs; bad files get clear errors; writes are atomic."""

import numpy as np
import pytest
import torch

from cellulib import load_model, models, save_model
from cellulib.store import ModelFileError, atomic_write_bytes, cache_path


def test_seg_model_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = models.seg_model("unet", dropout=0.3).eval()
    x = torch.randn(1, 3, 64, 64)
    path = save_model(model, tmp_path / "seg.pt", history={"epoch": [1]}, note="hello")
    loaded, info = load_model(path)
    assert info["family"] == "seg" and info["config"]["decoder"] == "unet"
    assert info["config"]["dropout"] == 0.3 and info["meta"]["note"] == "hello"
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_direct_model_round_trip(tmp_path, task):
    torch.manual_seed(1)
    model = models.direct_model("resnet34", task=task).eval()
    x = torch.randn(2, 3, 64, 64)
    loaded, info = load_model(save_model(model, tmp_path / "d.pt"))
    assert info["config"]["task"] == task
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_sr_model_round_trip(tmp_path):
    torch.manual_seed(2)
    model = models.sr_model(models.seg_model("fpn")).eval()
    x = torch.randn(1, 3, 64, 64)
    loaded, _ = load_model(save_model(model, tmp_path / "sr.pt"))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_gbt_round_trip(tmp_path):
    import lightgbm

    from cellulib.features import FEATURE_NAMES

    rng = np.random.default_rng(0)
    X, y = rng.random((200, len(FEATURE_NAMES))), rng.random(200)
    booster = lightgbm.train({"verbose": -1, "seed": 0},
                             lightgbm.Dataset(X, y, feature_name=list(FEATURE_NAMES)),
                             num_boost_round=5)
    model = models.GBTModel(models.seg_model("fpn"), booster)
    loaded, info = load_model(save_model(model, tmp_path / "g.pt"))
    assert info["family"] == "gbt" and info["config"]["seg"]["decoder"] == "fpn"
    np.testing.assert_array_equal(booster.predict(X), loaded.booster.predict(X))
    x = torch.randn(2, 3, 64, 64).clamp(-1, 1)
    out = loaded(x)
    assert out.shape == (2, 1) and torch.equal(out, model(x))
    assert ((out >= 0) & (out <= 1)).all()


def test_bad_model_files_name_the_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch archive")
    with pytest.raises(ModelFileError, match="junk.pt"):
        load_model(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelFileError, match="not a cellulib model file"):
        load_model(foreign)
    model = models.seg_model("fpn")
    path = save_model(model, tmp_path / "future.pt")
    payload = torch.load(path, weights_only=False)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="format 99"):
        load_model(path)
    with pytest.raises(ModelFileError, match="family"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "plain.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def explode(fh):
        fh.write(b"half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind


def test_cache_path_depends_on_every_input(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    a = cache_path("seg", {"seed": 0, "epochs": 3})
    assert a == cache_path("seg", {"epochs": 3, "seed": 0})  # order does not matter
    assert a != cache_path("seg", {"seed": 1, "epochs": 3})
    assert a.parent == tmp_path / "models" and a.name.startswith("seg-")
