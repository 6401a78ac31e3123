"""The real-tissue yardstick (`cellulib.data.proxy`, SPEC 1.6): the count and area proxies against values
worked out by hand on a drawn image, their bad input, `cellulib proxy` and `cellulib evaluate` on
real BRCA-M2C images, the cluster bootstrap, and the scale warnings of `predict` and `slide`."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellulib import save_model
from cellulib.cli import commands
from cellulib.data.proxy import (
    cell_radius,
    cell_regions,
    folder_radius,
    image_proxies,
    patient_of,
    proxy_labels,
    tissue_mask,
    window_starts,
)
from cellulib.files.imageio import DataError
from cellulib.metrics.agreement import bootstrap_ci, mse, prediction_probability, spearman
from cellulib.models import networks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PINK, GLASS = (200, 120, 180), (245, 245, 245)


@pytest.fixture(autouse=True)
def _float32(monkeypatch):
    monkeypatch.setenv("CELLULIB_PRECISION", "float32")
    monkeypatch.delenv("CELLULIB_DEBUG", raising=False)


def _drawn():
    """40 x 20 px: the left 20 columns tissue (flat pink), the right 20 glass (flat white), and
    five dots: tumour T1 (5, 5) with a stromal S (8, 5) beside it, a lymphocyte (5, 15), tumour T2
    (18, 10) by the glass, and a lymphocyte (30, 10) on the glass."""
    img = np.empty((20, 40, 3), np.uint8)
    img[:, :20] = PINK
    img[:, 20:] = GLASS
    pts = pd.DataFrame({"x": [5.0, 8, 5, 18, 30], "y": [5.0, 5, 15, 10, 10],
                        "cls": ["malignant", "normal", "lymphocyte", "malignant", "lymphocyte"]})
    return img, pts


# By hand, radius 3: a disc of radius 3 holds 29 pixel centres (columns dx = -3..3 hold 1, 5, 5,
# 7, 5, 5, 1). T1's cell loses the columns nearer to S (x >= 7: dx = 2, 3 -> 5 + 1), so 23 px;
# T2's loses the glass (x >= 20: dx = 2, 3), so 23 px too. Tissue: 20 x 20 = 400 px.
T1_PX = T2_PX = 23
TISSUE_PX = 400


def test_tissue_is_everything_but_smooth_bright_unsaturated_glass():
    img, _ = _drawn()
    mask = tissue_mask(img)
    assert mask[:, :20].all() and not mask[:, 20:].any()
    # pale, unsaturated but textured stroma is tissue; a speck of glass under 100 px is too
    rng = np.random.default_rng(0)
    pale = np.clip(230 + rng.normal(0, 12, (60, 60, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    pale[20:28, 20:28] = 250  # 64 px of glass
    assert tissue_mask(pale).all()


def test_cells_are_voronoi_regions_of_the_tissue_clipped_to_the_radius():
    img, pts = _drawn()
    regions = cell_regions(img.shape[:2], pts, 3.0, tissue_mask(img))
    sizes = np.bincount(regions[regions >= 0], minlength=len(pts))
    # S (8, 5) keeps the pixels of its disc nearer to it than to T1 (x >= 7): its disc (29) less
    # the columns x = 5, 6 (1 + 5) = 23; the lymphocyte (5, 15) has no neighbour within 6: 29;
    # the lymphocyte on the glass has no tissue
    assert sizes.tolist() == [T1_PX, 23, 29, T2_PX, 0]
    assert (regions[:, 20:] == -1).all()


def test_proxies_of_the_drawn_image_by_hand():
    img, pts = _drawn()
    whole = image_proxies(img, pts, radius=3.0, name="drawn.png").iloc[0]
    assert whole["count"] == pytest.approx(2 / 5)
    assert whole["area"] == pytest.approx((T1_PX + T2_PX) / TISSUE_PX)
    assert (whole["n_nuclei"], whole["n_tumour"], whole["tissue_fraction"]) == (5, 2, 0.5)
    assert whole["error"] == ""


def test_window_proxies_by_hand():
    img, pts = _drawn()
    assert window_starts(40, 10) == [0, 10, 20, 30] and window_starts(20, 20) == [0]
    w = image_proxies(img, pts, radius=3.0, window=10, name="drawn.png").set_index(["x", "y"])
    assert len(w) == 8
    # window (0, 0): T1 and S, T1's whole cell (23 px) in 100 px of tissue
    assert w.loc[(0, 0), "count"] == pytest.approx(1 / 2)
    assert w.loc[(0, 0), "area"] == pytest.approx(T1_PX / 100)
    # window (0, 10): the lymphocyte only
    assert w.loc[(0, 10), "count"] == 0 and w.loc[(0, 10), "area"] == 0
    # window (10, 10): T2 at (18, 10); its cell's pixels with y >= 10, by column dx = -3..1:
    # 1, 3, 3, 4, 3 = 14 of its 23
    assert w.loc[(10, 10), "count"] == 1
    assert w.loc[(10, 10), "area"] == pytest.approx(14 / 100)
    # no dots in window (10, 0); glass in the windows of x >= 20: no proxy, and the file is named
    assert math.isnan(w.loc[(10, 0), "count"]) and "no annotated nuclei" in w.loc[(10, 0), "error"]
    assert re.search(r"drawn\.png window x=30 y=10: 0% tissue", w.loc[(30, 10), "error"])
    assert math.isnan(w.loc[(30, 10), "area"])


def test_cell_radius_is_half_the_median_tumour_neighbour_distance():
    _, pts = _drawn()
    assert cell_radius(pts.assign(image="a")) == pytest.approx(math.hypot(13, 5) / 2)
    with pytest.raises(ValueError, match="two tumour dots"):
        cell_radius(pts.assign(image=["a", "a", "a", "b", "b"]))


def test_patient_code():
    assert patient_of("TCGA-A7-A0D9-01Z-00-DX2_18001_13001_1000_1000_0.9824.png") == "TCGA-A7-A0D9"
    assert patient_of("other/file.png") == "file"


def _write_brca(root, images):
    """A BRCA-M2C folder of drawn images: {name: (image or None, dot rows or None)}."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, (img, rows) in images.items():
        if img is not None:
            Image.fromarray(img).save(root / "images" / name)
        if rows is not None:
            text = "".join(f"{int(y)} {int(x)} {c}\n" for x, y, c in rows)
            (root / "labels" / (name[:-4] + "_gt_class_coords.txt")).write_text(text)
    (root / "brca_ds_train.txt").write_text("\n".join(images) + "\n")
    return root


CODE = {"lymphocyte": 1, "malignant": 2, "normal": 3}


@pytest.fixture
def drawn_brca(tmp_path):
    img, pts = _drawn()
    rows = [(x, y, CODE[c]) for x, y, c in pts.itertuples(index=False)]
    return _write_brca(tmp_path / "brca", {
        "TCGA-AA-0001-01Z_a.png": (img, rows),
        "TCGA-AA-0001-01Z_b.png": (img, rows[::-1]),  # the same dots in another order
        "TCGA-BB-0002-01Z_nodots.png": (img, []),
        "TCGA-BB-0002-01Z_noimage.png": (None, rows),
        "TCGA-CC-0003-01Z_nolabel.png": (img, None),
    })


def test_labels_of_a_folder_with_bad_images_left_out_and_named(drawn_brca, tmp_path):
    t = proxy_labels(drawn_brca, kind="area", radius=3.0).set_index("image")
    ok = t.loc[["TCGA-AA-0001-01Z_a", "TCGA-AA-0001-01Z_b"]]
    assert (ok["error"] == "").all() and (ok["patient"] == "TCGA-AA-0001").all()
    assert ok["cellularity"].tolist() == pytest.approx([46 / 400] * 2)
    assert ok["count"].tolist() == pytest.approx([0.4, 0.4])
    assert re.search(r"nodots_gt_class_coords\.txt: no dots", t.loc["TCGA-BB-0002-01Z_nodots", "error"])
    assert re.search(r"noimage\.png: image file not found",
                     t.loc["TCGA-BB-0002-01Z_noimage", "error"])
    assert re.search(r"nolabel\.png: no dot file", t.loc["TCGA-CC-0003-01Z_nolabel", "error"])
    assert t["cellularity"].isna().sum() == 3
    # the radius is measured on the images labelled: T1-T2 in each
    measured = proxy_labels(drawn_brca, kind="area")
    assert measured["radius_px"].iloc[0] == pytest.approx(math.hypot(13, 5) / 2, abs=1e-3)
    # windows are written as images, each labelled on its own
    win = proxy_labels(drawn_brca, window=20, crops_dir=tmp_path / "crops", radius=3.0)
    done = win[win["error"] == ""]
    assert len(done) == 2 and done["cellularity"].tolist() == pytest.approx([0.5, 0.5])
    crop = np.array(Image.open(done["path"].iloc[0]))
    assert crop.shape == (20, 20, 3) and (crop == PINK).all()
    # a re-run writes the same windows again only where a file differs: the others keep their time
    first, second = (Path(p) for p in done["path"])
    os.utime(first, (1_000_000, 1_000_000))
    second.write_bytes(b"not the window")
    again = proxy_labels(drawn_brca, window=20, crops_dir=tmp_path / "crops", radius=3.0)
    assert again["path"].tolist() == win["path"].tolist()
    assert first.stat().st_mtime == 1_000_000
    assert (np.array(Image.open(second)) == PINK).all()
    with pytest.raises(ValueError, match="crops"):
        proxy_labels(drawn_brca, window=20)


def test_proxy_labels_of_chosen_images(drawn_brca, tmp_path):
    everything = proxy_labels(drawn_brca, radius=3.0)
    chosen = proxy_labels(drawn_brca, radius=3.0, images=["TCGA-AA-0001-01Z_b"])
    assert len(everything) == 5 and chosen["image"].tolist() == ["TCGA-AA-0001-01Z_b"]
    # a stem with dots in it (BRCA-M2C's names end in a magnification like _0.9824) still matches
    assert folder_radius(drawn_brca) == pytest.approx(
        proxy_labels(drawn_brca)["radius_px"].iloc[0], abs=1e-3)


def test_a_folder_that_is_not_brca_m2c_names_both_layouts(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "train_labels.csv").write_text("slide,rid,y\n1,1,0.5\n")
    with pytest.raises(DataError, match=r"a breastpathq folder.*BRCA-M2C"):
        proxy_labels(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: neither dataset layout.*BreastPathQ.*BRCA-M2C"):
        proxy_labels(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# the cluster bootstrap and Spearman


def test_cluster_bootstrap_of_singletons_is_the_plain_bootstrap():
    rng = np.random.default_rng(3)
    t, p = rng.uniform(size=30), rng.uniform(size=30)
    for metric in (mse, prediction_probability):
        assert bootstrap_ci(metric, t, p, n_boot=300, groups=np.arange(30)) == pytest.approx(
            bootstrap_ci(metric, t, p, n_boot=300))


def test_cluster_bootstrap_of_doubled_rows_is_the_plain_bootstrap_of_the_rows():
    # every row twice, as one cluster: each resample is a plain resample with its rows doubled,
    # which changes neither MSE nor PK (the pairs within a cluster are tied in truth)
    rng = np.random.default_rng(4)
    t, p = rng.uniform(size=25), rng.uniform(size=25)
    groups = np.repeat(np.arange(25), 2)
    for metric in (mse, prediction_probability):
        assert bootstrap_ci(metric, np.repeat(t, 2), np.repeat(p, 2), n_boot=300,
                            groups=groups) == pytest.approx(bootstrap_ci(metric, t, p, n_boot=300))


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4, 5], [2, 1, 3, 5, 4]) == pytest.approx(1 - 6 * 4 / 120)
    with pytest.raises(ValueError, match="constant"):
        spearman([1, 2, 3], [1, 1, 1])


# ---------------------------------------------------------------------------------------------
# cellulib proxy, predict and evaluate from the command line


def test_cli_evaluate_with_proxy_labels_by_patient(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({
        "path": [f"i{k}.png" for k in range(7)],
        "cellularity": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, ""],
        "error": ["", "", "", "", "", "", "i6.png: no dots, so no proxy"],
        "proxy": "count", "patient": ["a", "a", "b", "b", "c", "c", "c"]}).to_csv(labels, index=False)
    pred = tmp_path / "pred.csv"
    y = [0.3, 0.2, 0.35, 0.5, 0.45, 0.9, 0.1]
    pd.DataFrame({"path": [f"x/i{k}.png" for k in range(7)], "cellularity": y,
                  "error": ""}).to_csv(pred, index=False)
    assert commands.main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--n-boot",
                     "200"]) == 0
    out = capsys.readouterr()
    assert re.search(r"labels\.csv: 1 of 7 labelled image\(s\) have no label and are left out "
                     r"of the score: i6\.png: no dots", out.err)
    # PK by hand: 15 pairs, discordant (0.1, 0.2: 0.3 > 0.2) and (0.4, 0.5: 0.5 > 0.45) -> 13/15
    pk = next(ln for ln in out.out.splitlines() if ln.startswith("PK"))
    assert f"{13 / 15:.3f}" in pk and "bootstrap over 3 patients" in pk
    assert prediction_probability([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], y[:6]) == pytest.approx(13 / 15)
    assert re.search(r"^Spearman\s+0\.886", out.out, re.M)  # 1 - 6 * 4 / 210
    assert "only the ranking (PK, Spearman) is a fair comparison" in out.out


@pytest.fixture
def three_real(brca_dir, tmp_path):
    """Three real BRCA-M2C images (links) as a one-split folder."""
    root = tmp_path / "three"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    names = [n for n in (brca_dir / "brca_ds_val.txt").read_text().split() if n][:3]
    for n in names:
        (root / "images" / n).symlink_to(brca_dir / "images" / n)
        label = n[:-4] + "_gt_class_coords.txt"
        (root / "labels" / label).symlink_to(brca_dir / "labels" / label)
    (root / "brca_ds_val.txt").write_text("\n".join(names) + "\n")
    return root


def test_cli_proxy_predict_evaluate_on_real_images(three_real, tmp_path, capsys):
    torch.manual_seed(0)
    model = save_model(networks.direct_model("resnet34"), tmp_path / "m.pt",
                       preprocess={"input_size": 32, "normalize": "minus_one_one"},
                       pixel_size={"mpp": 0.5, "patch_px": 256}, train_mean=0.4)
    labels = tmp_path / "labels.csv"
    assert commands.main(["proxy", "--data", str(three_real), "--kind", "area", "--out",
                     str(labels)]) == 0
    assert "3 area-proxy labels (images of 3 images" in capsys.readouterr().out
    table = pd.read_csv(labels, keep_default_na=False)
    assert len(table) == 3 and (table["error"] == "").all()
    assert ((table["area"] > 0) & (table["area"] < 1)).all()
    # without --mpp the ~500 px images are twice the model's 256 px field of view: one warning
    pred = tmp_path / "pred.csv"
    assert commands.main(["predict", "--model", str(model), "--images", str(three_real / "images"),
                     "--out", str(pred), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: 3 of 3 images are far from the model's training field of view "
                     r"\(256 px at 0\.5 um/px\), e\.g\. .*\.png is \d+x\d+ px: .* give --mpp", err)
    assert commands.main(["predict", "--model", str(model), "--images", str(three_real / "images"),
                     "--out", str(pred), "--quiet", "--mpp", "0.5"]) == 0
    assert "far from" not in capsys.readouterr().err
    assert commands.main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--n-boot",
                     "100", "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    p = pd.read_csv(pred).assign(key=lambda d: d["path"].map(lambda s: s.rsplit("/", 1)[1]))
    lab = table.assign(key=lambda d: d["path"].map(lambda s: s.rsplit("/", 1)[1]))
    both = p.merge(lab, on="key")
    assert got["n"] == 3
    assert got["metrics"]["PK"]["value"] == pytest.approx(
        prediction_probability(both["cellularity_y"], both["cellularity_x"]))
    assert got["metrics"]["PK"]["ci_method"] == "bootstrap over 3 patients"
    assert got["mean_predictor"]["available"] is False


def test_cli_proxy_on_a_folder_that_is_not_brca_m2c(tmp_path, capsys):
    assert commands.main(["proxy", "--data", str(tmp_path), "--out", str(tmp_path / "l.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BreastPathQ" in err[0] and "BRCA-M2C" in err[0]


# ---------------------------------------------------------------------------------------------
# slide: a tile far from the model's field of view


def test_slide_warns_of_a_tile_far_from_the_field_of_view(tmp_path):
    from cellulib.inference.predict import ScaleWarning
    from cellulib.inference.slide import slide_map

    torch.manual_seed(0)
    model = save_model(networks.direct_model("resnet34"), tmp_path / "m.pt",
                       preprocess={"input_size": 32, "normalize": "minus_one_one"},
                       pixel_size={"mpp": 0.5, "patch_px": 64})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 200, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    with pytest.warns(ScaleWarning, match=r"f\.png: a tile of 128 px is far from the model's "
                                          r"training field of view \(64 px at 0\.5 um/px.*--mpp"):
        slide_map(model, tmp_path / "f.png", tmp_path / "a", tile=128, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleWarning)
        slide_map(model, tmp_path / "f.png", tmp_path / "b", tile=64, progress=False)
        slide_map(model, tmp_path / "f.png", tmp_path / "c", progress=False)
