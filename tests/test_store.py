"""Model files: round trips give identical outputs; bad files get clear errors; writes are atomic;
cache keys change with every pixel of the data and every part of the training recipe."""

import hashlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellulib import load_model, save_model
from cellulib.data import fingerprint
from cellulib.data.fingerprint import data_fingerprint
from cellulib.files.imageio import atomic_write_bytes
from cellulib.inference import modelfile
from cellulib.inference.modelfile import ModelFileError
from cellulib.models import networks
from cellulib.training import cache
from cellulib.training.cache import cache_path


def test_seg_model_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = networks.seg_model("unet", dropout=0.3).eval()
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
    model = networks.direct_model("resnet34", task=task).eval()
    x = torch.randn(2, 3, 64, 64)
    loaded, info = load_model(save_model(model, tmp_path / "d.pt"))
    assert info["config"]["task"] == task
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_sr_model_round_trip(tmp_path):
    torch.manual_seed(2)
    model = networks.sr_model(networks.seg_model("fpn")).eval()
    x = torch.randn(1, 3, 64, 64)
    loaded, _ = load_model(save_model(model, tmp_path / "sr.pt"))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_gbt_round_trip(tmp_path):
    import lightgbm

    from cellulib.models.features import FEATURE_NAMES

    rng = np.random.default_rng(0)
    X, y = rng.random((200, len(FEATURE_NAMES))), rng.random(200)
    booster = lightgbm.train({"verbose": -1, "seed": 0},
                             lightgbm.Dataset(X, y, feature_name=list(FEATURE_NAMES)),
                             num_boost_round=5)
    model = networks.GBTModel(networks.seg_model("fpn"), booster)
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
    model = networks.seg_model("fpn")
    path = save_model(model, tmp_path / "future.pt")
    payload = torch.load(path, weights_only=False)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="format 99"):
        load_model(path)
    with pytest.raises(ModelFileError, match="family"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "plain.pt")


def test_loading_skips_the_random_init_but_never_returns_an_unloaded_weight(tmp_path):
    # the rebuild draws no random weights (the load overwrites them all), so a file missing one
    # weight must be refused, not returned with that weight left as it was built
    model = networks.seg_model("fpn")
    path = save_model(model, tmp_path / "seg.pt")
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    load_model(path)
    assert torch.equal(torch.rand(3), before)  # nothing drawn from the global generator
    payload = torch.load(path, weights_only=False)
    dropped = sorted(payload["state_dict"])[0]
    del payload["state_dict"][dropped]
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=f"(?s)seg.pt: weights do not fit.*{dropped}"):
        load_model(path)
    # the initialisers are torch's own again after a load, a failed one included, and after
    # loads in several threads at once
    assert torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"
    good = save_model(model, tmp_path / "good.pt")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: load_model(good), range(8)))
    assert torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"
    w = torch.zeros(4, 4)
    torch.nn.init.normal_(w)
    assert w.abs().sum() > 0


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
    a = cache_path("seg", {"seed": 0, "epochs": 3}, 1)
    assert a == cache_path("seg", {"epochs": 3, "seed": 0}, 1)  # order does not matter
    assert a != cache_path("seg", {"seed": 1, "epochs": 3}, 1)
    assert a != cache_path("seg", {"seed": 0, "epochs": 3}, 2)  # the recipe version
    assert a.parent == tmp_path / "models" and a.name.startswith("seg-")


def _tiny_breastpathq(root: Path) -> Path:
    """Two 16x16 patches, their label table and one cell XML, laid out as BreastPathQ."""
    rng = np.random.default_rng(0)
    train = root / "datasets" / "train"
    train.mkdir(parents=True)
    for name in ("1_1.tif", "1_2.tif"):
        tifffile.imwrite(train / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (root / "datasets" / "train_labels.csv").write_text("slide,rid,y\n1,1,0.5\n1,2,0.0\n")
    (root / "datasets" / "cells").mkdir()
    (root / "datasets" / "cells" / "1_1.xml").write_text("<Annotations/>")
    return root


def test_data_fingerprint_sees_one_pixel(tmp_path, monkeypatch):
    root = _tiny_breastpathq(tmp_path / "bpq")
    image = root / "datasets" / "train" / "1_1.tif"
    before, size = data_fingerprint(root), image.stat().st_size
    img = tifffile.imread(image)
    img[3, 4, 0] ^= 1
    tifffile.imwrite(image, img)  # same name, same size, one pixel one grey level apart
    assert image.stat().st_size == size
    after = data_fingerprint(root)
    assert after != before
    monkeypatch.setattr(fingerprint, "_FILE_DIGESTS", {})
    assert data_fingerprint(root) == after  # a fresh process agrees
    img[3, 4, 0] ^= 1
    tifffile.imwrite(image, img)
    assert data_fingerprint(root) == before  # the hash is of the content, not of the edit history


def test_data_fingerprint_follows_names_and_labels_and_nothing_else(tmp_path):
    root = _tiny_breastpathq(tmp_path / "bpq")
    base = data_fingerprint(root)
    assert data_fingerprint(shutil.copytree(root, tmp_path / "copy")) == base  # location-free
    train = root / "datasets" / "train"
    (root / "datasets" / "notes.md").write_text("not data")
    (train / "._1_1.tif").write_bytes(b"macOS resource fork")  # hidden: the readers skip it
    assert data_fingerprint(root) == base
    (train / "1_1.tif").rename(train / "1_3.tif")
    assert data_fingerprint(root) != base
    (train / "1_3.tif").rename(train / "1_1.tif")
    assert data_fingerprint(root) == base
    labels = root / "datasets" / "train_labels.csv"
    labels.write_text(labels.read_text().replace("0.5", "0.6"))  # same size
    assert data_fingerprint(root) != base


def test_data_fingerprint_covers_brca_m2c_dot_files(tmp_path):
    """BRCA-M2C keeps its nuclei and its splits in .txt files: they are data too (SPEC 1.4)."""
    (tmp_path / "labels").mkdir()
    dots = tmp_path / "labels" / "a_gt_class_coords.txt"
    dots.write_text("10 20 1\n30 40 2\n")
    (tmp_path / "brca_ds_train.txt").write_text("a.png\n")
    base = data_fingerprint(tmp_path)
    dots.write_text("10 20 1\n30 40 3\n")  # one class changed, same size
    assert data_fingerprint(tmp_path) != base


def test_data_fingerprint_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    root = _tiny_breastpathq(tmp_path / "bpq")
    monkeypatch.setattr(fingerprint, "_FILE_DIGESTS", {})
    monkeypatch.setattr(fingerprint, "_SETTLED_NS", -1)  # remember files however recently written
    reads, read = [], fingerprint._read_digest
    monkeypatch.setattr(fingerprint, "_read_digest", lambda path: reads.append(Path(path).name) or read(path))
    first = data_fingerprint(root)
    assert sorted(reads) == ["1_1.tif", "1_1.xml", "1_2.tif", "train_labels.csv"]
    reads.clear()
    assert data_fingerprint(root) == first and reads == []
    with open(root / "datasets" / "train_labels.csv", "a") as fh:
        fh.write("1,3,0.25\n")
    assert data_fingerprint(root) != first and reads == ["train_labels.csv"]


def test_recipe_key_is_the_hash_of_its_parts(monkeypatch):
    # the key, recomputed by hand from what the SPEC (section 6) says it is made of
    versions = {"torch": "2.0.0", "torchvision": "0.1", "fastai": "2.7", "albumentations": "1.4",
                "numpy": "1.26", "opencv": "4.9", "scikit-image": "0.22", "lightgbm": "4.3",
                "scipy": "1.12"}
    monkeypatch.setattr(cache, "library_version", versions.get)
    params = {"seed": 0, "data": "0123456789ab", "precision": "float32", "device": "cpu"}
    got = cache.recipe("gbt", params, 3)
    parts = {"scheme": 1, "kind": "gbt", "family": "gbt", "version": 3, "params": params,
             "libraries": versions, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    blob = json.dumps(parts, sort_keys=True).encode()
    assert got == {"key": hashlib.sha256(blob).hexdigest()[:12], **parts}
    # the segmentation net is not fitted by LightGBM: its recipe does not name it
    assert "lightgbm" not in cache.recipe("seg", params, 3)["libraries"]
    assert "timm" in cache.recipe("direct-xception-regression", params, 3)["libraries"]


def test_a_library_version_or_the_python_version_changes_the_key(monkeypatch):
    params = {"seed": 0}
    before = cache.recipe("seg", params, 1)["key"]
    real = cache.library_version
    monkeypatch.setattr(cache, "library_version",
                        lambda name: "9.9.9" if name == "torch" else real(name))
    assert cache.recipe("seg", params, 1)["key"] != before
    monkeypatch.setattr(cache, "library_version", real)
    assert cache.recipe("seg", params, 1)["key"] == before
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    assert cache.recipe("seg", params, 1)["key"] != before


def test_recipe_mismatch_names_each_reason(monkeypatch):
    rec = cache.recipe("sr", {"seed": 0}, 2)
    assert cache.recipe_mismatch(rec, {"sr": 2}) == []
    assert cache.recipe_mismatch(rec, {"sr": 3}) == ["sr recipe version 2, the code's is 3"]
    real = cache.library_version
    monkeypatch.setattr(cache, "library_version",
                        lambda name: "0.0.1" if name == "fastai" else real(name))
    why = cache.recipe_mismatch(rec, {"sr": 2})
    assert why == [f"fastai {real('fastai')}, installed 0.0.1"]
    monkeypatch.setattr(cache, "library_version", real)
    edited = {**rec, "params": {"seed": 1}}  # the key no longer matches what it records
    assert "edited" in cache.recipe_mismatch(edited, {"sr": 2})[0]
    assert "no recipe recorded" in cache.recipe_mismatch(None, {"sr": 2})[0]


def test_weights_digest_follows_every_weight():
    torch.manual_seed(0)
    a = networks.seg_model("unet", dropout=0.3)
    b = networks.seg_model("unet", dropout=0.3)
    b.load_state_dict(a.state_dict())
    assert modelfile.weights_digest(a) == modelfile.weights_digest(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert modelfile.weights_digest(a) != modelfile.weights_digest(b)


def test_families_get_different_keys_for_the_same_params(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    params = {"seed": 0, "data": "0123456789ab"}
    kinds = ["seg", "sr", "gbt", "direct-resnet34-regression", "direct-resnet34-classification"]
    keys = {cache_path(kind, params, 1).stem.rsplit("-", 1)[1] for kind in kinds}
    assert len(keys) == len(kinds)
    with pytest.raises(ValueError, match="unknown model kind 'svm'"):
        cache_path("svm", params, 1)


# --------------------------------------------------------------------------------------------------
# model files are data (issue 20): weights_only loading, plain payloads, re-saving old files
# --------------------------------------------------------------------------------------------------
def test_save_model_writes_plain_data_only(tmp_path):
    model = networks.direct_model("resnet34")
    path = save_model(model, tmp_path / "d.pt", scores={"mse": np.float64(0.25)},
                      sides=np.array([3, 4]), where=tmp_path / "x", pair=(1, 2))
    meta = load_model(path)[1]["meta"]
    assert meta["scores"]["mse"] == 0.25 and type(meta["scores"]["mse"]) is float
    assert meta["sides"] == [3, 4] and meta["pair"] == [1, 2]
    assert meta["where"] == str(tmp_path / "x")
    payload = torch.load(path, weights_only=True)  # torch's own safe loader reads it as it is
    assert payload["format"] == "cellulib-model"
    with pytest.raises(ModelFileError, match=r"\['meta'\]\['callback'\]: a function cannot go"):
        save_model(model, tmp_path / "bad.pt", callback=lambda: None)
    assert not (tmp_path / "bad.pt").exists()


def test_an_old_file_with_numpy_values_is_refused_then_resaved(tmp_path):
    torch.manual_seed(3)
    model = networks.seg_model("fpn").eval()
    payload = {"format": "cellulib-model", "format_version": 1, "cellulib_version": "0.1.0",
               "family": "seg", "config": dict(model.config),
               "meta": {"train_mean": np.float64(0.4), "sides": np.arange(3)},
               "state_dict": model.state_dict()}
    old = tmp_path / "old.pt"
    torch.save(payload, old)  # as a cellulib that saved NumPy values would have
    with pytest.raises(ModelFileError, match=r"old\.pt: refused: .*cellulib resave --trust"):
        load_model(old)
    new = modelfile.resave_trusted(old, tmp_path / "new.pt")
    loaded, info = load_model(new)
    assert info["meta"] == {"train_mean": 0.4, "sides": [0, 1, 2]}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
