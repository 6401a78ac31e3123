"""Golden tests of the training recipes and of the synthetic-data generator.

A cached model is reused as long as its recipe key holds (SPEC 6), and the key holds the family's
recipe version (``cellulib.training.train.RECIPE_VERSIONS``), not the bytes of the source. So a change of
the training code that changes what a family learns must bump that version. These tests run each
family's recipe, and each variant with its own code path (the decay and one-cycle schedules, HED stain
augmentation, the BRCA-M2C settings, pretrained initialisation, 101-bin classification), on a tiny
synthetic set, on the CPU in float32 with one torch thread, and compare what came out with the
golden file of ``tests/fixtures/golden/``: the loss trace (every loss of the history), statistics of
the trained weights (sum, sum of squares and sum of absolute values, accumulated in float64) and
the outputs on a fixed input. The generator is checked the same way against
``cellulib.data.synth.GENERATOR_VERSION``.

The comparison is a tolerance (relative 1e-3 plus absolute 1e-6), not a digest: on one CPU kind
float32 results move by about 1e-6 relative between runs and BLAS builds, and a changed recipe (a
learning rate, a loss weight, an augmentation) moves them by far more
(``test_a_changed_recipe_fails_its_golden_test``). Thresholded metrics (the Jaccard indices at 0.5)
are left out, since one pixel near the threshold flips them.

The training runs are not the same across CPU kinds: the same code gave a seg training loss of 0.583
on an AVX2-only AMD EPYC and 0.681 on an Intel Xeon with AMX (the kernels that oneDNN and OpenCV
dispatch differ by instruction set), so their golden files are kept per CPU kind
(``tests/fixtures/golden/{kind}/``, :func:`cpu_kind`): ``amx`` recorded on an Intel Xeon with AMX,
``avx2`` on an AMD EPYC with AVX2 only, ``avx512`` on an AMD EPYC with AVX-512 BF16 (every run but
GBT's, whose 1-epoch segmentation net gives constant features there). On a kind without golden
files the recipe tests skip and say how to record them; the generator's output is the same on both kinds, so its
golden file is shared. They hold for the libraries ``constraints.txt`` pins: in an environment with
others (a GPU image's own torch), a run that differs skips and names them.

When a run no longer matches and its version did not change, the test fails with what to do: bump
the version, then refresh the golden files with ``CELLULIB_REFRESH_GOLDEN=1 python -m pytest
tests/test_recipes.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cellulib.data import profiles, synth, synthset
from cellulib.files.imageio import read_image
from cellulib.training import cache, train

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
REFRESH = os.environ.get("CELLULIB_REFRESH_GOLDEN", "") not in ("", "0")
REFRESH_HOW = ("refresh the golden files with CELLULIB_REFRESH_GOLDEN=1 python -m pytest "
               "tests/test_recipes.py (and commit them)")
RTOL, ATOL = 1e-3, 1e-6


@pytest.fixture(scope="module", autouse=True)
def float32_cpu_one_thread(tmp_path_factory):
    """Every run on the CPU, in float32, with one torch thread, and its own cache folder."""
    from fastai.torch_core import defaults

    saved = (torch.get_num_threads(), defaults.use_cuda, os.environ.get("CELLULIB_PRECISION"),
             os.environ.get("CELLULIB_HOME"))
    torch.set_num_threads(1)
    defaults.use_cuda = False
    os.environ["CELLULIB_PRECISION"] = "float32"
    os.environ["CELLULIB_HOME"] = str(tmp_path_factory.mktemp("recipes_home"))
    yield
    torch.set_num_threads(saved[0])
    defaults.use_cuda = saved[1]
    for name, value in (("CELLULIB_PRECISION", saved[2]), ("CELLULIB_HOME", saved[3])):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthset.make_breastpathq(tmp_path_factory.mktemp("tiny"), n_train=4, n_val=2, n_cells=5,
                                  size=64, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_brca(tiny, tmp_path_factory):
    """A BRCA-M2C-like copy (images/*.png, labels/*_gt_class_coords.txt, the split files) made of
    the tiny set's patches with seeded dots, so the BRCA-M2C settings run without the real copy."""
    import cv2

    root = tmp_path_factory.mktemp("brca")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i, src in enumerate(sorted((tiny / "datasets" / "train").glob("*.tif"))[:3]):
        name = f"TCGA-XX-{i:04d}_0_0_64_64_0.5.png"
        cv2.imwrite(str(root / "images" / name), cv2.cvtColor(read_image(src), cv2.COLOR_RGB2BGR))
        dots = [f"{x} {y} {c}" for x, y, c in zip(rng.integers(4, 60, 12), rng.integers(4, 60, 12),
                                                  rng.integers(1, 4, 12))]
        (root / "labels" / f"{Path(name).stem}_gt_class_coords.txt").write_text("\n".join(dots))
        names.append(name)
    (root / "brca_ds_train.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "brca_ds_val.txt").write_text(names[2] + "\n")
    return root


@pytest.fixture(scope="module")
def gbt_root(tmp_path_factory):
    """Enough training patches (40) for LightGBM to split: its default needs 20 per leaf."""
    return synthset.make_breastpathq(tmp_path_factory.mktemp("gbt"), n_train=40, n_val=4, n_cells=2,
                                  size=64, seed=0, progress=False)


SEG = dict(epochs=1, progress=False, crop=32, patches_per_epoch=2, seg_bs=2, cache=False)


@pytest.fixture(scope="module")
def seg(tiny):
    return train.train_seg(tiny, "fpn", **SEG)


def _stats(values: torch.Tensor | np.ndarray) -> list[float]:
    x = torch.as_tensor(np.asarray(values, dtype=np.float64))
    return [float(x.sum()), float((x * x).sum()), float(x.abs().sum())]


def _record(result: train.TrainResult, probe_side: int = 32) -> dict[str, list[float]]:
    """What a run is compared on: its losses, its weights and its outputs on a fixed input."""
    values = {}
    for name in result.history.columns:
        if (name.endswith("loss") or name.endswith("mse")) and result.history[name].notna().any():
            values[f"history.{name}"] = [float(v) for v in result.history[name]]
    params = [t.detach().double().reshape(-1) for n, t in sorted(result.model.state_dict().items())
              if t.is_floating_point()]
    values["weights"] = _stats(torch.cat(params).numpy())
    x = torch.randn(2, 3, probe_side, probe_side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = result.model.eval()(x)
    values["probe"] = _stats(out.float().numpy()) + [float(v) for v in out.reshape(-1)[:4]]
    if "predictions" in result.meta:
        values["predictions"] = [float(v) for v in result.meta["predictions"]["y_pred"]]
    return values


def _libraries(family: str) -> dict[str, str | None]:
    return {name: cache.library_version(name) for name in cache.RECIPE_LIBRARIES[family]}


def _mismatches(want: dict, got: dict) -> list[str]:
    out = []
    for name in sorted(set(want) | set(got)):
        a, b = want.get(name), got.get(name)
        if a is None or b is None or len(a) != len(b):
            out.append(f"{name}: golden {a}, now {b}")
        elif not np.allclose(b, a, rtol=RTOL, atol=ATOL, equal_nan=True):
            out.append(f"{name}: golden {a}, now {b}")
    return out


def cpu_kind() -> str:
    """The CPU kind whose golden files a training run is compared with: ``amx`` (Intel with AMX
    tiles), ``avx512`` (AVX-512 without AMX), ``avx2``, else ``other``; from ``/proc/cpuinfo``."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), [])
    except OSError:
        flags = []
    for kind, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "other"


def _pinned(name: str) -> str | None:
    """The version ``constraints.txt`` pins for library ``name`` (as :func:`cache.library_version`
    names it: ``opencv`` is whichever OpenCV wheel is pinned), or None."""
    from conftest import constraint_pins

    pins = constraint_pins()
    return next((pins[d] for d in (cache._OPENCV_DISTRIBUTIONS if name == "opencv" else (name,))
                 if d in pins), None)


def check_golden(name: str, version_name: str, version: int, values: dict,
                 libraries: dict, per_cpu: bool = True) -> None:
    """Compare ``values`` with ``tests/fixtures/golden/{kind}/{name}.json`` (``per_cpu``, the
    training runs) or ``tests/fixtures/golden/{name}.json`` (or write it when refreshing), failing
    with what to do: bump ``version_name`` or refresh the golden file. A training run on a CPU kind
    without golden files skips."""
    folder = GOLDEN / cpu_kind() if per_cpu else GOLDEN
    path = folder / f"{name}.json"
    if per_cpu and not REFRESH and not folder.is_dir():
        pytest.skip(f"no golden training runs for this CPU kind ({cpu_kind()}; recorded: "
                    f"{sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())}): record them on it "
                    f"with CELLULIB_REFRESH_GOLDEN=1 python -m pytest tests/test_recipes.py")
    record = {"name": name, "version": version, "libraries": libraries,
              "python": "{}.{}".format(*__import__("sys").version_info[:2]),
              "tolerance": {"rtol": RTOL, "atol": ATOL}, "values": values}
    if REFRESH:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing: {REFRESH_HOW}")
    golden = json.loads(path.read_text())
    if golden["version"] != version:
        pytest.fail(f"{path.name} was recorded for {version_name} = {golden['version']}, the code "
                    f"says {version}: {REFRESH_HOW}")
    wrong = _mismatches(golden["values"], values)
    if not wrong:
        return
    pinned = {k: _pinned(k) for k in libraries}
    foreign = {k: (v, pinned[k]) for k, v in libraries.items()
               if golden["libraries"].get(k) != v and v != pinned[k]}
    if foreign:
        # another environment (a GPU image's own torch, say): the golden runs were recorded under
        # the project's pinned libraries and say nothing about others, whose keys differ anyway
        pytest.skip("this environment's libraries are not the project's pins (constraints.txt) that "
                    f"{path.name} was recorded with: " + ", ".join(
                        f"{k} {v} (pinned {pin}, recorded {golden['libraries'].get(k)})"
                        for k, (v, pin) in sorted(foreign.items())))
    libs = {k: (golden["libraries"].get(k), v) for k, v in libraries.items()
            if golden["libraries"].get(k) != v}
    if libs:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in libs.items())
        pytest.fail(f"the {name} run changed, and so did libraries ({changed}), which are part of "
                    f"the recipe key already: no version bump is needed for them; {REFRESH_HOW}. "
                    "Differences: " + "; ".join(wrong))
    pytest.fail(f"the {name} run no longer gives its golden output, but {version_name} is still "
                f"{version}. If the change is meant, bump {version_name} (cached models of the "
                f"old recipe are then retrained) and {REFRESH_HOW}; if not, the edit changed what "
                "the model learns. Differences: " + "; ".join(wrong))


def _check(name: str, family: str, values: dict) -> None:
    check_golden(name, f"cellulib.training.train.RECIPE_VERSIONS[{family!r}]",
                 train.RECIPE_VERSIONS[family], values, _libraries(family))


# --------------------------------------------------------------------------------------------------
def test_seg_recipe_decay_schedule(seg):
    """The quick and paper profiles train the segmentation net under the paper's decaying rate;
    the direct, SR and BRCA-M2C runs below cover the one-cycle schedule."""
    assert not seg.cached and seg.settings["seg_schedule"] == "decay"
    _check("seg", "seg", _record(seg))


def test_seg_recipe_hed_stain_augmentation(tiny):
    result = train.train_seg(tiny, "fpn", stain_augment="hed", **SEG)
    _check("seg-hed", "seg", _record(result))


def test_seg_recipe_brca_m2c_settings(tiny_brca):
    result = train.train_seg(tiny_brca, "fpn", **SEG)
    assert result.settings["downscale"] == 1 and result.settings["disc_diameter"] == 11.0
    assert result.settings["seg_schedule"] == "one_cycle"
    _check("seg-brca-m2c", "seg", _record(result))


def test_seg_recipe_pretrained_initialisation(tiny, tmp_path):
    import torchvision

    torch.manual_seed(1)
    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), weights)
    result = train.train_seg(tiny, "fpn", pretrained=weights, **SEG)
    _check("seg-pretrained", "seg", _record(result))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_direct_recipe(tiny, task):
    """The rate is pinned to the one the golden files were recorded with: a profile's settings are
    in the recipe key by value (the quick profile's ``direct_lr`` went from 3e-3 to 1e-3 without a
    version bump), while this run guards the code."""
    result = train.train_direct(tiny, "resnet34", task, epochs=1, size=32, direct_bs=2,
                                direct_lr=3e-3, progress=False, cache=False)
    _check(f"direct-{task}", "direct", _record(result))


def test_sr_recipe(tiny, seg):
    result = train.train_sr(tiny, seg, sr_epochs=1, sr_finetune_epochs=1, direct_bs=2,
                            progress=False, cache=False)
    _check("sr", "sr", _record(result))


def test_gbt_recipe(gbt_root, seg):
    """The leaf minimum is pinned to LightGBM's default, with which the golden runs were recorded;
    the cross-validated choice is checked by ``test_gbt_recipe_leaf_minimum_by_cross_validation``."""
    result = train.train_gbt(gbt_root, seg, gbt_rounds=20, gbt_min_leaf=20, progress=False, cache=False)
    values = _record(result)
    values["features_train"] = _stats(np.nan_to_num(
        np.array(list(result.meta["features_train"].values()), dtype=np.float64)))
    if cpu_kind() == "avx512" and len(set(values["predictions"])) == 1:
        # On the AVX-512 EPYC the 1-epoch segmentation net's features are constant and the booster
        # predicts the mean, so a golden run there could not see a changed GBT recipe; the other
        # recipes have golden runs on that kind, and GBT's are recorded on the AMX and AVX2 kinds.
        pytest.skip("the 1-epoch segmentation net gives constant features on this CPU kind "
                    "(avx512): no GBT golden run is recorded on it")
    _check("gbt", "gbt", values)  # skips on a CPU kind without golden runs
    # A golden run must be able to see a change: its booster has to split.
    assert len(set(values["predictions"])) > 1, "the booster should split on 40 patches"


def test_gbt_recipe_leaf_minimum_by_cross_validation(gbt_root, seg):
    """``train_gbt`` by default chooses the leaf minimum by 5-fold CV on its training features
    (recorded in the model file); the same choice comes back from the stored features and labels."""
    import pandas as pd

    from cellulib.data import breastpathq
    from cellulib.models import features

    result = train.train_gbt(gbt_root, seg, gbt_rounds=20, progress=False, cache=False)
    errors = {int(k): v for k, v in result.meta["gbt_cv_mse"].items()}
    assert list(errors) == list(features.GBT_MIN_LEAF_GRID)
    assert result.meta["gbt_min_leaf"] == min(errors, key=errors.get)
    labels = breastpathq.read_breastpathq(gbt_root)
    again = features.select_min_leaf(pd.DataFrame(result.meta["features_train"]),
                                     labels[labels["split"] == "train"]["cellularity"], seed=0,
                                     n_rounds=20)
    assert again == (result.meta["gbt_min_leaf"], errors)


def test_gbt_leaf_minimum_golden():
    """The cross-validated leaf choice on a fixed feature table (no network, so the same on every
    CPU kind: one golden file): the choice, each candidate's CV error and the refitted booster's
    predictions."""
    from cellulib.models import features

    rng = np.random.default_rng(7)
    X = rng.random((80, 81))
    y = np.clip(0.8 * X[:, 5] ** 3 + 0.15 * X[:, 40] + rng.normal(0, 0.03, 80), 0, 1)
    chosen, errors = features.select_min_leaf(X, y, seed=0, n_rounds=100)
    booster = features.fit_gbt(X, y, seed=0, n_rounds=100, min_data_in_leaf=chosen)
    values = {"chosen": [chosen], "cv_mse": list(errors.values()),
              "predictions": features.predict_gbt(booster, X[:10]).tolist()}
    check_golden("gbt-min-leaf", "cellulib.training.train.RECIPE_VERSIONS['gbt']",
                 train.RECIPE_VERSIONS["gbt"], values, _libraries("gbt"), per_cpu=False)


def test_a_changed_recipe_fails_its_golden_test(tiny):
    """The tolerance is tight enough to see a 10% larger learning rate in the seg run."""
    if REFRESH:
        pytest.skip("refreshing")
    result = train.train_seg(tiny, "fpn", seg_lr=profiles.get_profile("quick")["seg_lr"] * 1.1, **SEG)
    with pytest.raises(pytest.fail.Exception, match="bump cellulib.training.train.RECIPE_VERSIONS"):
        _check("seg", "seg", _record(result))


def test_golden_failure_says_to_refresh_after_a_version_bump(seg, monkeypatch):
    if REFRESH:
        pytest.skip("refreshing")
    monkeypatch.setitem(train.RECIPE_VERSIONS, "seg", train.RECIPE_VERSIONS["seg"] + 1)
    with pytest.raises(pytest.fail.Exception, match="CELLULIB_REFRESH_GOLDEN=1"):
        _check("seg", "seg", _record(seg))


# --------------------------------------------------------------------------------------------------
def test_generator(tiny):
    """A rendered patch and the labels of the tiny set, against ``synth.GENERATOR_VERSION``."""
    patch = synth.render_patch(64, seed=0)
    img = patch.img.astype(np.float64)
    blocks = img.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))
    labels = (tiny / "datasets" / "train_labels.csv").read_text().splitlines()[1:]
    values = {"blocks": [float(v) for v in blocks.reshape(-1)],
              "channels": [float(v) for v in img.mean(axis=(0, 1))] + [float(img.std())],
              "labels": [float(line.split(",")[-1]) for line in labels],
              "truth": [patch.cellularity, float(sum(patch.counts.values()))]}
    libraries = {name: cache.library_version(name) for name in ("numpy", "opencv", "scikit-image")}
    check_golden("generator", "cellulib.data.synth.GENERATOR_VERSION", synth.GENERATOR_VERSION, values,
                 libraries, per_cpu=False)
    # for the record: whether the patch is bit-identical to the one the golden file was made from
    print("patch sha256", hashlib.sha256(patch.img.tobytes()).hexdigest()[:12])


def test_golden_runs_skip_outside_the_pinned_libraries(tmp_path, monkeypatch):
    """A GPU image's own torch (2.11 there, 2.13 pinned) skips the comparison and says why; the pinned
    libraries against a golden file recorded under others fail and say to refresh it."""
    if REFRESH:
        pytest.skip("refreshing")
    monkeypatch.setitem(globals(), "GOLDEN", tmp_path)
    pinned = _pinned("torch")
    assert pinned and pinned.count(".") == 2
    (tmp_path / "x.json").write_text(json.dumps({"version": 1, "libraries": {"torch": "0.0.1"},
                                                 "values": {"a": [1.0]}}))
    with pytest.raises(pytest.skip.Exception, match=r"torch 9\.9 \(pinned " + pinned.replace(".", r"\.")):
        check_golden("x", "V", 1, {"a": [2.0]}, {"torch": "9.9"}, per_cpu=False)
    with pytest.raises(pytest.fail.Exception, match=r"torch 0\.0\.1 -> " + pinned.replace(".", r"\.")):
        check_golden("x", "V", 1, {"a": [2.0]}, {"torch": pinned}, per_cpu=False)
    check_golden("x", "V", 1, {"a": [1.0 + 1e-9]}, {"torch": "9.9"}, per_cpu=False)
