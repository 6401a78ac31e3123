"""Profiles, overrides and the dataset a chapter reads."""

import pytest

from cellulib import profiles


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


def test_get_dataset_generates_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    root = profiles.get_dataset(None, "quick", seed=3, n_train=4, n_val=2, n_cells=2, size=128,
                                progress=False)
    assert (root / "datasets" / "train_labels.csv").exists()
    assert not list(root.parent.glob("*.tmp"))
    stamp = (root / "datasets" / "train_labels.csv").stat().st_mtime_ns
    again = profiles.get_dataset(None, "quick", seed=3, n_train=4, n_val=2, n_cells=2, size=128)
    assert again == root and (root / "datasets" / "train_labels.csv").stat().st_mtime_ns == stamp
    other = profiles.get_dataset(None, "quick", seed=4, n_train=4, n_val=2, n_cells=2, size=128,
                                 progress=False)
    assert other != root


def test_get_dataset_with_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        profiles.get_dataset(tmp_path / "nope")
    assert profiles.get_dataset(tmp_path) == tmp_path
