"""The generator beside real tissue (issue 23): the tissue statistics of one patch worked out by
hand, the table's medians, ratios and Kolmogorov-Smirnov distances on hand-made samples, and the
calibrated generator moving the statistics it was calibrated on."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hed

from cellulib.data import measure, synth

PINK = (200, 120, 160)  # saturated: tissue, not glass


def _points(rows):
    return pd.DataFrame(rows, columns=["x", "y", "cls"])


def test_tissue_statistics_by_hand():
    img = np.zeros((100, 100, 3), np.uint8) + np.array(PINK, np.uint8)
    pts = _points([(10, 10, "malignant"), (13, 14, "malignant"), (50, 50, "lymphocyte"),
                   (11, 11, "normal")])  # the classes differ between sources: left out
    got = measure.tissue_statistics(img, pts, mpp=0.5)
    one = got.groupby("statistic")["value"].apply(list).to_dict()
    mm2 = 100 * 100 * 0.5 ** 2 / 1e6  # 0.0025 mm2 of tissue
    assert one["tissue share of the field"] == [1.0]
    assert one["tumour and lymphocyte nuclei per mm2 of tissue"] == pytest.approx([3 / mm2])
    assert one["tumour nuclei per mm2 of tissue"] == pytest.approx([2 / mm2])
    assert one["lymphocytes per mm2 of tissue"] == pytest.approx([1 / mm2])
    assert one["tumour share of tumour and lymphocyte nuclei"] == pytest.approx([2 / 3])
    # the two malignant nuclei are each other's nearest (3-4-5), the lymphocyte's is malignant
    assert one["same-class nearest neighbour"] == pytest.approx([2 / 3])
    far = np.hypot(50 - 13, 50 - 14) * 0.5
    assert sorted(one["nearest-nucleus distance"]) == pytest.approx([2.5, 2.5, far])
    assert one["tumour nearest-tumour distance"] == pytest.approx([2.5, 2.5])
    h = rgb2hed(img[:1, :1])[0, 0]  # one colour everywhere: every mean is that pixel's density
    assert one["haematoxylin OD at nuclei"] == pytest.approx([h[0]] * 3, abs=1e-6)
    assert one["haematoxylin OD of tissue"] == pytest.approx([h[0]], abs=1e-6)
    assert one["eosin OD of tissue"] == pytest.approx([h[1]], abs=1e-6)
    assert one["haematoxylin OD spread in tissue (SD)"] == pytest.approx([0.0], abs=1e-6)
    assert one["texture: local grey-level SD in tissue"] == pytest.approx([0.0], abs=1e-3)
    assert "nucleus diameter (segmented)" not in one  # a flat image has no nucleus to segment


def test_glass_has_no_tissue_statistics_but_its_share():
    glass = np.full((64, 64, 3), 245, np.uint8)
    got = measure.tissue_statistics(glass, _points([(5, 5, "malignant")]))
    assert got.to_dict("list") == {"statistic": ["tissue share of the field"], "value": [0.0]}


def test_tissue_statistics_refuses_bad_points():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cls'\]"):
        measure.tissue_statistics(np.zeros((8, 8, 3), np.uint8), pd.DataFrame({"x": [1], "y": [1]}))


def test_calibration_table_medians_ratios_and_ks():
    rows = [("real", "eosin OD of tissue", v) for v in (1.0, 2.0, 3.0)]
    rows += [("same", "eosin OD of tissue", v) for v in (1.0, 2.0, 3.0)]
    rows += [("apart", "eosin OD of tissue", v) for v in (10.0, 20.0, 30.0, 40.0)]
    rows += [("real", "tumour nuclei per mm2 of tissue", 0.5)]  # missing from the synthetic sources
    stats = pd.DataFrame(rows, columns=["source", "statistic", "value"])
    table = measure.calibration_table(stats, ["same", "apart"], real="real")
    assert list(table.index) == ["eosin OD of tissue"]
    row = table.loc["eosin OD of tissue"]
    assert (row["real"], row["same"], row["apart"]) == (2.0, 2.0, 25.0)
    assert (row["ratio (same)"], row["ratio (apart)"]) == (1.0, 12.5)
    assert (row["KS (same)"], row["KS (apart)"]) == (0.0, 1.0)  # identical; no overlap
    assert (row["unit"], row["per"]) == ("OD", "per image")


def test_the_calibrated_generator_moves_what_it_was_calibrated_on():
    stats = pd.concat([measure.generator_statistics(g, n=6, size=128, seed=3) for g in synth.GENERATORS])
    med = stats.groupby(["statistic", "source"])["value"].median()
    lymph = med["lymphocytes per mm2 of tissue"]
    assert lymph["calibrated generator"] < lymph["default generator"] / 3
    h = med["haematoxylin OD of tissue"]
    assert h["calibrated generator"] > 1.2 * h["default generator"]
    with pytest.raises(ValueError, match="generator must be one of"):
        measure.generator_statistics("nope", n=1)


def test_the_default_generator_is_unchanged_by_the_calibrated_one():
    a = synth.render_patch(64, 0.5, seed=1)
    b = synth.render_patch(64, 0.5, seed=1, params=synth.GENERATORS["default"])
    c = synth.render_patch(64, 0.5, seed=1, params=synth.CALIBRATED_PARAMS)
    assert np.array_equal(a.img, b.img) and not np.array_equal(a.img, c.img)
    with pytest.raises(TypeError, match="RenderParams"):
        synth.render_patch(64, 0.5, seed=1, params={"h_gain": 2})


def test_a_calibrated_set_has_its_own_folder_and_the_default_keeps_its_own(tmp_path, monkeypatch):
    from cellulib.data import datasets

    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path))
    assert "generator" not in datasets.synthetic_params("quick", 0)
    assert datasets.synthetic_params("quick", 0, generator="calibrated")["generator"] == "calibrated"
    assert datasets.synthetic_root("quick", 0) == datasets.synthetic_root("quick", 0, generator="default")
    assert datasets.synthetic_root("quick", 0) != datasets.synthetic_root("quick", 0, generator="calibrated")
    with pytest.raises(ValueError, match="generator must be one of"):
        datasets.synthetic_params("quick", 0, generator="v9")
