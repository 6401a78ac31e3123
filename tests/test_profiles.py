"""Profiles, overrides and the dataset a chapter reads."""

import time
from pathlib import Path

import pandas as pd
import pytest

from cellulib.data import datasets, paths, profiles


def test_quick_and_paper_profiles():
    paper = profiles.get_profile("paper")
    # the paper's hyperparameters (section 4.2, 4.3; SPEC 2, 3.2)
    assert paper["seg_epochs"] == 150 and paper["seg_lr"] == 1e-4 and paper["seg_lr_end"] == 1e-5
    assert paper["crop"] == 256 and paper["downscale"] == 2 and paper["disc_diameter"] == 15
    assert paper["gbt_rounds"] == 600 and paper["size"] == 512
    quick = profiles.get_profile("quick", seg_epochs=1, size=None)
    assert quick["seg_epochs"] == 1 and quick["size"] == profiles.PROFILES["quick"]["size"]
    assert quick["profile"] == "quick"


def test_unknown_profile_or_setting_is_a_clear_error():
    with pytest.raises(profiles.ProfileError, match="unknown profile 'fast'"):
        profiles.get_profile("fast")
    with pytest.raises(profiles.ProfileError, match="epochz"):
        profiles.get_profile("quick", epochz=3)


def test_gbt_leaf_minimum_setting():
    assert profiles.get_profile("quick")["gbt_min_leaf"] == "cv"
    assert profiles.get_profile("paper")["gbt_min_leaf"] == "cv"
    assert profiles.get_profile("quick", gbt_min_leaf=5)["gbt_min_leaf"] == 5
    for bad in (0, "CV", 2.5):
        with pytest.raises(profiles.ProfileError, match='gbt_min_leaf must be "cv" or an integer >= 1'):
            profiles.get_profile("quick", gbt_min_leaf=bad)


def test_get_dataset_generates_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    root = datasets.get_dataset(None, "quick", seed=3, n_train=4, n_val=2, n_cells=2, size=128,
                                progress=False)
    assert (root / "datasets" / "train_labels.csv").exists()
    assert not list(root.parent.glob("*.tmp"))
    stamp = (root / "datasets" / "train_labels.csv").stat().st_mtime_ns
    again = datasets.get_dataset(None, "quick", seed=3, n_train=4, n_val=2, n_cells=2, size=128)
    assert again == root and (root / "datasets" / "train_labels.csv").stat().st_mtime_ns == stamp
    other = datasets.get_dataset(None, "quick", seed=4, n_train=4, n_val=2, n_cells=2, size=128,
                                 progress=False)
    assert other != root


def _get_tiny_dataset(_):
    return str(datasets.get_dataset(None, "quick", seed=5, n_train=4, n_val=2, n_cells=2,
                                    size=128, progress=False))


def test_get_dataset_side_by_side_generates_once(tmp_path, monkeypatch):
    """Chapters executed side by side (the GPU check's JOBS) asked for one set at once, and each
    deleted the other's half-written folder ("image file not found"); now one generates it and the
    others wait for it."""
    import multiprocessing

    from cellulib.data import synthset

    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    calls = tmp_path / "calls.txt"
    real = synthset.make_breastpathq

    def slow_make(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("call\n")
        time.sleep(1.0)  # a window in which the other processes ask for the set too
        return real(*args, **kwargs)

    monkeypatch.setattr(synthset, "make_breastpathq", slow_make)
    with multiprocessing.get_context("fork").Pool(3) as pool:  # the children inherit the patch
        roots = pool.map(_get_tiny_dataset, range(3))
    assert len(set(roots)) == 1 and datasets.synthetic_ready(roots[0])
    assert calls.read_text().count("call") == 1
    labels = pd.read_csv(Path(roots[0]) / "datasets" / "train_labels.csv")
    assert all((Path(roots[0]) / "datasets" / "train" / f"{r.slide}_{r.rid}.tif").exists()
               for r in labels.itertuples())


def test_get_dataset_with_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.get_dataset(tmp_path / "nope")
    assert datasets.get_dataset(tmp_path) == tmp_path


def test_check_parameters_names_the_parameter_of_the_wrong_type():
    from cellulib.reporting.parameters import ParameterError, check_parameters

    ns = {"__annotations__": {"seed": int, "data_dir": "Optional[str]", "lr": float},
          "seed": 0, "data_dir": None, "lr": 1}  # an int is a fine float, None a fine Optional
    check_parameters(ns)
    with pytest.raises(ParameterError, match=r"parameter 'seed' must be int, got 'abc' \(str\)"):
        check_parameters(ns | {"seed": "abc"})
    with pytest.raises(ParameterError, match="parameter 'seed' must be int, got True"):
        check_parameters(ns | {"seed": True})  # a bool is not an int here
    with pytest.raises(ParameterError, match="parameter 'data_dir' must be str or None"):
        check_parameters(ns | {"data_dir": 3})
    with pytest.raises(ParameterError, match="parameter 'profile' must be one of"):
        check_parameters({"profile": "fast"})


def test_a_chapter_stops_on_a_parameter_of_the_wrong_type(tmp_path):
    """`papermill -p seed abc` stops the chapter with a message naming the parameter."""
    from pathlib import Path

    import papermill

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(repo / "notebooks" / "01_data_exploration.ipynb"),
                                   str(tmp_path / "out.ipynb"), parameters={"seed": "abc"},
                                   kernel_name="python3", progress_bar=False)
    assert "ParameterError" in str(err.value) and "parameter 'seed' must be int" in str(err.value)


def test_real_data_from_the_environment_or_the_checkout(tmp_path, monkeypatch):
    """CELLULIB_REAL_DATA names the real-data folder anywhere; without it a checkout finds
    ../shared/data/real, and an installed package (no such folder) finds nothing and says so."""
    given = tmp_path / "real"
    (given / "brca-m2c").mkdir(parents=True)
    monkeypatch.setenv("CELLULIB_REAL_DATA", str(given))
    assert paths.real_dir() == given
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CELLULIB_REAL_DATA", str(empty))
    assert paths.real_dir() is None and paths.brca_m2c_dir() is None
    text = paths.real_data_missing("BRCA-M2C")
    assert f"$CELLULIB_REAL_DATA is {empty}" in text and "section was skipped" in text

    monkeypatch.delenv("CELLULIB_REAL_DATA")
    installed = tmp_path / "site-packages" / "shared" / "data" / "real"  # never created
    monkeypatch.setattr(paths, "_CHECKOUT_REAL", installed)
    assert paths.real_dir() is None
    text = paths.real_data_missing("The real H&E images", parameter=None)
    assert text.startswith("The real H&E images not found (CELLULIB_REAL_DATA is not set")
    assert str(installed) in text and "parameter" not in text
    assert "looked in /data/x" in paths.real_data_missing("BRCA-M2C", given="/data/x")


def test_a_checkout_finds_the_shared_real_data(monkeypatch):
    monkeypatch.delenv("CELLULIB_REAL_DATA", raising=False)
    shared = paths._CHECKOUT_REAL
    if not shared.is_dir():
        pytest.skip(f"no real data beside this checkout ({shared})")
    assert paths.real_dir() == shared
    assert shared == Path(paths.__file__).resolve().parents[3] / "shared" / "data" / "real"
