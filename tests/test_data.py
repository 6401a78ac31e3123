"""Tests for cellulib.data.breastpathq: readers, weak masks, augmentation, DataLoaders.

References are independent of the code under test: pixel values written by hand (or by tifffile /
Pillow / OpenCV), Gauss-circle counts computed by hand, a per-pixel brute-force mask, OpenCV's
resize geometry, the raw JPEG tile of the real OME-TIFF decoded by Pillow, scikit-learn's
GroupShuffleSplit rule.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellulib.constants import CLASSES
from cellulib.data import breastpathq, transforms
from cellulib.data.annotations import DESCRIPTION_TO_CLASS
from cellulib.data.breastpathq import (
    cellularity_dataloaders,
    read_breastpathq,
    read_cell_points,
    read_cells,
    read_labels,
    seg_dataloaders,
    split_by_patient,
)
from cellulib.data.transforms import (
    cellularity_transforms,
    normalize_batch,
    normalize_image,
    seg_transforms,
    to_tensor_image,
    weak_label_map,
    weak_mask,
)
from cellulib.files.imageio import DataError, DataWarning, read_image

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _rgb(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _cell_xml(graphics, identifier="x_crop.tif"):
    """graphics: list of (description, [point texts])."""
    parts = [f'<session software="PathCore Session Printer"><image identifier="{identifier}">'
             "<overlays>"]
    for i, (desc, pts) in enumerate(graphics):
        plist = "".join(f"<point>{p}</point>" for p in pts)
        parts.append(f'<graphic type="point" name="Region {i}" description="{desc}">'
                     f"<point-list>{plist}</point-list></graphic>")
    parts.append("</overlays></image></session>")
    return "".join(parts)


def _write_labels(path, rows, col="y"):
    path.write_text(f"slide,rid,{col}\n" + "".join(f"{s},{r},{v}\n" for s, r, v in rows))


def _make_bpq(root, train_rows, val_rows, size=8, val_col="y"):
    """A BreastPathQ tree with uniform-colour patches; colour encodes the row for checks."""
    ds = root / "datasets"
    for split, rows, csv, col in (("train", train_rows, "train_labels.csv", "y"),
                                  ("validation", val_rows, "val_labels.csv", val_col)):
        (ds / split).mkdir(parents=True, exist_ok=True)
        _write_labels(ds / csv, rows, col)
        for k, (s, r, _) in enumerate(rows):
            img = np.full((size, size, 3), (10 * k, 255 - 10 * k, 51), dtype=np.uint8)
            tifffile.imwrite(ds / split / f"{s}_{r}.tif", img, photometric="rgb")
    return ds


# A cells dataset: white 96x96 crops with dark discs (diameter 30 px) at the annotated nuclei,
# so that after the x2 downscale image discs and 15-px mask discs coincide.
_CELL_POINTS = [
    [("IDC", [(20, 20), (60, 30)]), ("TIL-S", [(30, 70)]), ("normal", [(75, 75)])],
    [("DCIS 2", [(48, 48)]), ("UDH", [(15, 80), (80, 15)])],
    [("TIL-E", [(20, 50), (70, 60)]), ("ILC", [(50, 20)])],
    [("MC - C", [(30, 30), (66, 66)])],
    [("ADH", [(40, 70)]), ("IDC", [(70, 35)])],
    [("Muc C", [(25, 60)]), ("TIL-S", [(60, 25), (75, 80)])],
]


def _make_cells(root, size=96, points=_CELL_POINTS):
    cells = root / "datasets" / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    for n, graphics in enumerate(points):
        img = np.full((size, size, 3), 245, dtype=np.uint8)
        for _, pts in graphics:
            for x, y in pts:
                cv2.circle(img, (x, y), 15, (60, 20, 90), thickness=-1)
        tifffile.imwrite(cells / f"{n + 1}_Region {n + 10}_crop.tif", img, photometric="rgb")
        xml = _cell_xml([(d, [f"{x},{y}" for x, y in pts]) for d, pts in graphics])
        (cells / f"{n + 1}_Region {n + 10}_key.xml").write_text(xml)
    return cells


def _batches(dl):
    return [tuple(t.clone() for t in b) for b in dl]


# --------------------------------------------------------------------------------------------------
# read_image
# --------------------------------------------------------------------------------------------------
def test_read_image_rgb_tiff_png_lzw_exact(tmp_path):
    img = _rgb()
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    tifffile.imwrite(tmp_path / "b.tif", img, photometric="rgb", compression="lzw")
    Image.fromarray(img).save(tmp_path / "c.png")
    Image.fromarray(img).save(tmp_path / "d_png_named.tif", format="PNG")  # magic, not suffix
    for name in ("a.tif", "b.tif", "c.png", "d_png_named.tif"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (12, 16, 3) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, img, err_msg=name)


def test_read_image_jpeg(tmp_path):
    yy, xx = np.mgrid[0:32, 0:48]
    img = np.stack([xx * 5, yy * 7, 255 - xx * 5], axis=2).astype(np.uint8)  # smooth: JPEG-friendly
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(float) - img).mean() < 3


def test_read_image_rgba_composited_on_white(tmp_path):
    px = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [100, 0, 200, 128]]], dtype=np.uint8)
    # hand: c * a/255 + 255 * (1 - a/255); a=128: 100 -> 177.2, 0 -> 127.0, 200 -> 227.4
    want = np.array([[[10, 20, 30], [255, 255, 255], [177, 127, 227]]], dtype=np.uint8)
    Image.fromarray(px, mode="RGBA").save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", px, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), want)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), want)


def test_read_image_greyscale_and_miniswhite(tmp_path):
    grey = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", grey)
    tifffile.imwrite(tmp_path / "w.tif", grey, photometric="miniswhite")
    for name in ("g.png", "g.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (2, 3, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey, err_msg=name)
    np.testing.assert_array_equal(read_image(tmp_path / "w.tif")[..., 1], 255 - grey)


def test_read_image_palette_png(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[[255, 0, 0], [0, 0, 255]]])


def test_read_image_16_bit(tmp_path):
    # hand: round(v / 257): 0 -> 0, 257 -> 1, 385 -> 1, 386 -> 2, 32896 -> 128, 65535 -> 255
    v = np.array([[0, 257, 385], [386, 32896, 65535]], dtype=np.uint16)
    want = np.array([[0, 1, 1], [2, 128, 255]], dtype=np.uint8)
    rgb16 = np.stack([v, v[::-1, ::-1], np.full_like(v, 257 * 7)], axis=2)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    tifffile.imwrite(tmp_path / "grey16.tif", v)
    tifffile.imwrite(tmp_path / "grey16_be.tif", v, byteorder=">")
    Image.fromarray(v).save(tmp_path / "grey16.png")
    out = read_image(tmp_path / "rgb16.tif")
    np.testing.assert_array_equal(out[..., 0], want)
    np.testing.assert_array_equal(out[..., 1], want[::-1, ::-1])
    np.testing.assert_array_equal(out[..., 2], 7)
    for name in ("grey16.tif", "grey16_be.tif", "grey16.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name)[..., 2], want, err_msg=name)


def test_read_image_pyramid_gives_level_0(tmp_path):
    big, small = _rgb(64, 64, 1), _rgb(32, 32, 2)
    with tifffile.TiffWriter(tmp_path / "pyr.ome.tif", ome=True) as tw:
        tw.write(big, subifds=1, photometric="rgb", tile=(16, 16), compression="zlib")
        tw.write(small, subfiletype=1, photometric="rgb", tile=(16, 16), compression="zlib")
    np.testing.assert_array_equal(read_image(tmp_path / "pyr.ome.tif"), big)


@pytest.mark.parametrize("kind", ["tif", "lzw.tif", "png", "jpg"])
def test_read_image_truncated(tmp_path, kind):
    img = _rgb(64, 64)
    full = tmp_path / f"full.{kind}"
    if kind == "lzw.tif":
        tifffile.imwrite(full, img, photometric="rgb", compression="lzw")
    elif kind == "tif":
        tifffile.imwrite(full, img, photometric="rgb")
    else:
        Image.fromarray(img).save(full)
    data = full.read_bytes()
    bad = tmp_path / f"cut.{kind}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(bad))):
        read_image(bad)


@pytest.mark.parametrize("content", [b"slide,rid,y\n1,1,0.5\n", b"II*\x00garbage", b""])
def test_read_image_not_an_image(tmp_path, content):
    bad = tmp_path / "notes.tif"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        read_image(bad)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_read_real_images(real_dir):
    shapes = {"breastpathq_99788_1.tif": (512, 512, 3),
              "breastpathq_99788_1_256_lzw.tif": (256, 256, 3),
              "amida13_example1.png": (1024, 1024, 3), "amida13_example2.png": (1024, 1024, 3),
              "openslide_OS-1-detail.ome.tif": (1101, 1101, 3)}
    imgs = {}
    for name, shape in shapes.items():
        imgs[name] = read_image(real_dir / name)
        assert imgs[name].shape == shape and imgs[name].dtype == np.uint8, name
        # H&E: eosin pink and haematoxylin purple both leave green the darkest channel
        mean = imgs[name].reshape(-1, 3).mean(axis=0)
        assert mean[1] < mean[0] and mean[1] < mean[2], name
    # Pillow (a second reader) agrees on the uncompressed TIFF and on the PNG.
    for name in ("breastpathq_99788_1.tif", "amida13_example1.png"):
        np.testing.assert_array_equal(imgs[name], np.array(Image.open(real_dir / name)))
    # The LZW copy is the INTER_AREA half-size of the full patch, pixel for pixel.
    half = cv2.resize(imgs["breastpathq_99788_1.tif"], (256, 256), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(imgs["breastpathq_99788_1_256_lzw.tif"], half)
    # The OME-TIFF's JPEG tiles defeat libtiff (Pillow, OpenCV); its first tile, decoded by Pillow
    # as a plain JPEG stream, must equal the top-left corner of level 0.
    path = real_dir / "openslide_OS-1-detail.ome.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count, tile = page.dataoffsets[0], page.databytecounts[0], page.tilewidth
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(count)
    first_tile = np.array(Image.open(io.BytesIO(raw)).convert("RGB"))
    np.testing.assert_array_equal(imgs["openslide_OS-1-detail.ome.tif"][:tile, :tile], first_tile)


# --------------------------------------------------------------------------------------------------
# read_labels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("col", ["y", "p"])
def test_read_labels(tmp_path, col):
    csv = tmp_path / "labels.csv"
    csv.write_text(f"slide,rid,{col}\n99788,1,0.97\n007,12, 0\n99788,2,1.0\n")
    df = read_labels(csv)
    assert list(df.columns) == ["slide", "rid", "cellularity"]
    assert df["slide"].tolist() == ["99788", "007", "99788"]
    assert df["rid"].tolist() == ["1", "12", "2"]
    np.testing.assert_array_equal(df["cellularity"].to_numpy(), [0.97, 0.0, 1.0])


@pytest.mark.parametrize("text, problem", [
    ("rid,y\n1,0.5\n", "slide"),
    ("slide,y\n1,0.5\n", "rid"),
    ("slide,rid,z\n1,1,0.5\n", "label column"),
    ("slide,rid,y,p\n1,1,0.5,0.5\n", "both"),
    ("slide,rid,y\n1,1,0.5\n1,2,\n", "line 3"),
    ("slide,rid,y\n1,1,abc\n", "non-numeric"),
    ("slide,rid,y\n1,1,nan\n", "missing"),
    ("slide,rid,y\n1,1,1.2\n", "outside"),
    ("slide,rid,y\n1,1,0.2\n1,2,-0.1\n", "line 3"),
    ("slide,rid,y\n1,1,0.2\n1,1,0.3\n", "twice"),
    ("", "empty"),
])
def test_read_labels_errors(tmp_path, text, problem):
    csv = tmp_path / "train_labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=re.escape(str(csv))) as err:
        read_labels(csv)
    assert problem in str(err.value)


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(DataError, match="val_labels.csv"):
        read_labels(tmp_path / "val_labels.csv")


# --------------------------------------------------------------------------------------------------
# read_breastpathq
# --------------------------------------------------------------------------------------------------
TRAIN_ROWS = [("10", "1", 0.1), ("10", "2", 0.25), ("11", "1", 0.9), ("12", "3", 0.0)]
VAL_ROWS = [("20", "1", 0.5), ("21", "3", 1.0)]


def test_read_breastpathq_rows_match_files(tmp_path):
    ds = _make_bpq(tmp_path, TRAIN_ROWS, VAL_ROWS, val_col="p")
    df = read_breastpathq(tmp_path)
    assert list(df.columns) == ["path", "slide", "rid", "cellularity", "split"]
    assert len(df) == 6
    assert df["split"].tolist() == ["train"] * 4 + ["validation"] * 2
    want = [(str((ds / sp / f"{s}_{r}.tif").resolve()), s, r, y)
            for sp, rows in (("train", TRAIN_ROWS), ("validation", VAL_ROWS)) for s, r, y in rows]
    assert list(df[["path", "slide", "rid", "cellularity"]].itertuples(index=False,
                                                                         name=None)) == want
    pd.testing.assert_frame_equal(read_breastpathq(ds), df)  # datasets/ itself works too


def test_read_breastpathq_patient_ids(tmp_path):
    _make_bpq(tmp_path, TRAIN_ROWS, VAL_ROWS)
    (tmp_path / "patient_ids.csv").write_text("patient_id,slide\nA,10\nA,11\nB,12\nC,20\n")
    with pytest.warns(DataWarning, match="21"):
        df = read_breastpathq(tmp_path)
    assert df["patient_id"].iloc[:5].tolist() == ["A", "A", "A", "B", "C"]
    assert pd.isna(df["patient_id"].iloc[5])
    (tmp_path / "patient_ids.csv").write_text("patient_id,slide\nA,10\nB,10\n")
    with pytest.raises(DataError, match="more than one patient"):
        read_breastpathq(tmp_path)
    (tmp_path / "patient_ids.csv").write_text("patient,slide\nA,10\n")
    with pytest.raises(DataError, match="patient_ids.csv"):
        read_breastpathq(tmp_path)


def test_read_breastpathq_missing_and_extra_images(tmp_path):
    ds = _make_bpq(tmp_path, TRAIN_ROWS, VAL_ROWS)
    tifffile.imwrite(ds / "train" / "99_9.tif", _rgb(4, 4), photometric="rgb")
    with pytest.warns(DataWarning, match="99_9.tif"):
        df = read_breastpathq(tmp_path)
    assert len(df) == 6 and "99" not in df["slide"].tolist()
    (ds / "validation" / "21_3.tif").unlink()
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"val_labels\.csv.*1 of 2.*21_3\.tif"):
        read_breastpathq(tmp_path)


def test_read_breastpathq_layout_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        read_breastpathq(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="datasets/"):
        read_breastpathq(tmp_path / "empty")
    (tmp_path / "empty" / "datasets").mkdir()
    with pytest.raises(DataError, match="train_labels.csv"):
        read_breastpathq(tmp_path / "empty")


def test_read_breastpathq_does_not_open_images(tmp_path):
    ds = _make_bpq(tmp_path, TRAIN_ROWS, VAL_ROWS)
    bad = ds / "train" / "11_1.tif"
    bad.write_text("not an image")
    df = read_breastpathq(tmp_path)  # fast: only names are checked
    assert len(df) == 6
    with pytest.raises(DataError, match=re.escape("11_1.tif")):
        read_image(df["path"].iloc[2])


# --------------------------------------------------------------------------------------------------
# cell XML
# --------------------------------------------------------------------------------------------------
# The SPEC 1.1 example, well-formed (tests/fixtures/quirky_key.xml holds the real files' quirks)
SPEC_XML = (Path(__file__).parent / "fixtures" / "spec_key.xml").read_text()


def test_read_cell_points_spec_example(tmp_path):
    path = tmp_path / "17_Region 60_key.xml"
    path.write_text(SPEC_XML)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_cell_points(path)
    assert list(df.columns) == ["x", "y", "description", "cls"]
    assert df["x"].tolist() == [72.0, 101.0, 5.5, 0.0]
    assert df["y"].tolist() == [48.0, 230.0, 6.0, 0.0]
    assert df["description"].tolist() == ["IDC", "IDC", "TIL-S", "UDH"]
    assert df["cls"].tolist() == ["malignant", "malignant", "lymphocyte", "normal"]


def test_description_mapping_is_spec():
    spec = {"malignant": "IDC|ILC|Muc C|DCIS 1|DCIS 2|DCIS 3|MC- E|MC - C|MC - M",
            "normal": "normal|UDH|ADH", "lymphocyte": "TIL-E|TIL-S"}
    want = {d: cls for cls, ds in spec.items() for d in ds.split("|")}
    assert DESCRIPTION_TO_CLASS == want
    assert CLASSES == ("normal", "lymphocyte", "malignant", "background")


def test_read_cell_points_unknown_descriptions_one_warning(tmp_path):
    path = tmp_path / "k.xml"
    path.write_text(_cell_xml([("IDC", ["1,2"]), ("foo", ["3,4", "5,6"]), ("bar", ["7,8"]),
                               ("foo", ["9,9"]), ("MC-E", ["1,1"])]))
    with pytest.warns(DataWarning) as rec:
        df = read_cell_points(path)
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1
    assert str(path) in msgs[0] and "5 points" in msgs[0]
    assert "'foo' (3)" in msgs[0] and "'bar' (1)" in msgs[0] and "'MC-E' (1)" in msgs[0]
    assert df["cls"].tolist() == ["malignant"]


@pytest.mark.parametrize("text", ["72;48", "a,b", "-3,4", "3,-4", "1,2,3", "", "nan,1", "7"])
def test_read_cell_points_malformed(tmp_path, text):
    path = tmp_path / "bad_key.xml"
    path.write_text(_cell_xml([("IDC", ["1,2", text])]))
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        read_cell_points(path)
    assert repr(text) in str(err.value)


def test_read_cell_points_bad_xml_and_empty(tmp_path):
    # the real files never close <image> (SPEC 1.1): a PathCore session without points is empty
    unclosed = tmp_path / "unclosed.xml"
    unclosed.write_text("<session><image></session>")
    assert len(read_cell_points(unclosed)) == 0
    bad = tmp_path / "bad.xml"
    bad.write_text('<session><graphic description="IDC"><point>12;x</point></graphic></session>')
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*malformed point '12;x'"):
        read_cell_points(bad)
    other = tmp_path / "other.xml"
    other.write_text("<annotations><region/></annotations>")
    with pytest.raises(DataError, match=re.escape(str(other)) + ".*PathCore"):
        read_cell_points(other)
    namespaced = tmp_path / "ns.xml"
    namespaced.write_text(SPEC_XML.replace('<session ', '<session xmlns="urn:x" '))
    assert read_cell_points(namespaced)["cls"].tolist() == [
        "malignant", "malignant", "lymphocyte", "normal"]
    empty = tmp_path / "empty.xml"
    empty.write_text(_cell_xml([]))
    df = read_cell_points(empty)
    assert len(df) == 0 and list(df.columns) == ["x", "y", "description", "cls"]


def test_read_cells(tmp_path):
    cells = _make_cells(tmp_path)
    (cells / "99_Region 1_crop.tif").write_bytes(b"")  # no XML partner
    (cells / "3_Region 12_key.xml").write_text(
        _cell_xml([("TIL-E", ["20,50", "70,60"]), ("ILC", ["50,20"]), ("?", ["1,1"])]))
    (cells / "5_Region 14_key.xml").write_text(
        _cell_xml([("ADH", ["40,70"]), ("IDC", ["70,35"]), ("?", ["1,1", "2,2"])]))
    with pytest.warns(DataWarning) as rec:
        df = read_cells(tmp_path)
    msgs = [str(w.message) for w in rec]
    assert any("99_Region 1_crop.tif" in m for m in msgs)
    unknown = [m for m in msgs if "unknown" in m]
    assert len(unknown) == 1 and "3 points" in unknown[0] and "2 XML files" in unknown[0]
    assert df["name"].tolist() == [f"{n + 1}_Region {n + 10}" for n in range(6)]
    assert df[["n_normal", "n_lymphocyte", "n_malignant"]].values.tolist() == [
        [1, 1, 2], [2, 0, 1], [0, 2, 1], [0, 0, 2], [1, 0, 1], [0, 2, 1]]
    with pytest.raises(DataError, match="cells"):
        read_cells(tmp_path / "datasets" / "train")


# --------------------------------------------------------------------------------------------------
# weak masks
# --------------------------------------------------------------------------------------------------
def _brute_force_label(x, y, cls, shape, diameter, scale):
    """Per-pixel loop: nearest centroid within the radius, first point on ties, else background."""
    cx = [(xi + 0.5) * scale - 0.5 for xi in x]
    cy = [(yi + 0.5) * scale - 0.5 for yi in y]
    r2 = (diameter / 2) ** 2
    out = np.full(shape, 3, dtype=np.uint8)
    for row in range(shape[0]):
        for col in range(shape[1]):
            best, best_d = None, None
            for k in range(len(cx)):
                d = (col - cx[k]) ** 2 + (row - cy[k]) ** 2
                if d <= r2 and (best_d is None or d < best_d):
                    best, best_d = k, d
            if best is not None:
                out[row, col] = cls[best]
    return out


@pytest.mark.parametrize("diameter, scale, seed", [(15.0, 1.0, 0), (6.3, 0.5, 1), (9.0, 1.0, 2)])
def test_weak_mask_matches_brute_force(diameter, scale, seed):
    rng = np.random.default_rng(seed)
    shape = (23, 29)
    n = 14
    x = rng.uniform(0, shape[1] / scale, n).round(1)
    y = rng.uniform(0, shape[0] / scale, n).round(1)
    x[:2], y[:2] = 0.0, 0.0  # a duplicated centroid (exact tie) at the corner
    cls = rng.integers(0, 3, n)
    pts = pd.DataFrame({"x": x, "y": y, "cls": [CLASSES[c] for c in cls]})
    want = _brute_force_label(x, y, cls, shape, diameter, scale)
    np.testing.assert_array_equal(weak_label_map(pts, shape, diameter, scale), want)
    mask = weak_mask(pts, shape, diameter, scale)
    assert mask.shape == (4, *shape) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.sum(axis=0), 1.0)
    np.testing.assert_array_equal(mask.argmax(axis=0), want)


def test_weak_mask_hand_cases():
    # Gauss circle, radius 7.5 (i^2 + j^2 <= 56.25): 177 lattice points, pi * 7.5^2 = 176.7
    one = pd.DataFrame({"x": [20.0], "y": [15.0], "cls": ["malignant"]})
    m = weak_mask(one, (31, 41))
    assert m[2].sum() == 177 and abs(m[2].sum() / (math.pi * 7.5**2) - 1) < 0.01
    assert m[3].sum() == 31 * 41 - 177 and m[0].sum() == 0 and m[1].sum() == 0
    # at the corner: the quarter disc with both axes, 8+8+8+7+7+6+5+3 = 52 pixels
    corner = pd.DataFrame({"x": [0.0], "y": [0.0], "cls": ["lymphocyte"]})
    assert weak_mask(corner, (20, 20))[1].sum() == 52
    # two touching discs 10 px apart: x < 15 is A's, x > 15 is B's, the tie column 15 goes to the
    # point listed first
    two = pd.DataFrame({"x": [10.0, 20.0], "y": [10.0, 10.0], "cls": ["malignant", "normal"]})
    lab = weak_label_map(two, (21, 31))
    assert set(np.unique(lab[:, :15])) == {2, 3} and set(np.unique(lab[:, 16:])) == {0, 3}
    assert lab[10, 15] == 2 and lab[10, 14] == 2 and lab[10, 16] == 0
    assert weak_label_map(two.iloc[::-1], (21, 31))[10, 15] == 0
    disc = [(i, j) for i in range(-8, 9) for j in range(-8, 9) if i * i + j * j <= 56.25]
    lens = [(i, j) for i, j in disc if (i - 10) ** 2 + j * j <= 56.25]
    assert (lab == 2).sum() + (lab == 0).sum() == 2 * 177 - len(lens)
    # integer classes, nothing, far away
    ints = pd.DataFrame({"x": [5.0], "y": [5.0], "cls": [0]})
    assert weak_label_map(ints, (11, 11))[5, 5] == 0
    empty = pd.DataFrame({"x": [], "y": [], "cls": []})
    np.testing.assert_array_equal(weak_mask(empty, (4, 5))[3], 1.0)
    far = pd.DataFrame({"x": [500.0], "y": [5.0], "cls": ["normal"]})
    np.testing.assert_array_equal(weak_label_map(far, (4, 5)), 3)
    with pytest.raises(ValueError, match="unknown classes"):
        weak_mask(pd.DataFrame({"x": [1.0], "y": [1.0], "cls": ["tumour"]}), (4, 4))


def test_weak_mask_scale_follows_cv2_resize():
    # A disc drawn at full resolution and reduced x2 by INTER_AREA has its centre where the
    # half-scale mask puts it ((x + 0.5) / 2 - 0.5), not at x / 2.
    for x0, y0 in ((41, 30), (40, 31)):
        big = np.zeros((96, 96), np.float32)
        cv2.circle(big, (x0, y0), 15, 1.0, thickness=-1)
        small = cv2.resize(big, (48, 48), interpolation=cv2.INTER_AREA)
        yy, xx = np.mgrid[0:48, 0:48]
        img_c = ((small * xx).sum() / small.sum(), (small * yy).sum() / small.sum())
        m = weak_mask(pd.DataFrame({"x": [x0], "y": [y0], "cls": ["normal"]}), (48, 48),
                      diameter=15, scale=0.5)[0]
        mask_c = ((m * xx).sum() / m.sum(), (m * yy).sum() / m.sum())
        assert abs(img_c[0] - (x0 / 2 - 0.25)) < 0.05 and abs(img_c[1] - (y0 / 2 - 0.25)) < 0.05
        assert abs(mask_c[0] - img_c[0]) < 0.3 and abs(mask_c[1] - img_c[1]) < 0.3


# --------------------------------------------------------------------------------------------------
# splits, normalisation, transforms
# --------------------------------------------------------------------------------------------------
def test_patient_split_of_brca_m2c_holds_out_whole_patients(brca_dir, tmp_path):
    import hashlib

    from conftest import make_brca_full_copy

    from cellulib.data.breastpathq import cells_split, patient_code, patient_split

    cells = read_cells(brca_dir)
    codes = cells["name"].str[:12]
    tr, va = cells_split(cells)
    # every train+val image on exactly one side, no patient on both, about 20% held out
    assert sorted([*tr, *va]) == list(range(len(cells))) and len(va) == 18
    assert not set(codes.iloc[tr]) & set(codes.iloc[va])
    # the official val split shares two patients with the official train split; this one does not
    official = cells["split"].to_numpy()
    assert set(codes[official == "train"]) & set(codes[official == "val"]) == {
        "TCGA-A7-A0DB", "TCGA-A7-A13G"}
    # independent of the seed and of valid_pct (the BreastPathQ argument), deterministic
    for seed in (1, 7):
        assert [a.tolist() for a in cells_split(cells, 0.3, seed)] == [tr.tolist(), va.tolist()]
    # the rule by hand: patients in SHA-256 order of their code until 18 images are held out
    order = sorted(set(codes), key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    held, n = [], 0
    for c in order:
        if n >= round(0.2 * len(cells)):
            break
        held.append(c)
        n += int((codes == c).sum())
    assert sorted(set(codes.iloc[va])) == sorted(held)
    # the official split on request
    otr, ova = cells_split(cells, validation="official")
    assert (official[otr] == "train").all() and (official[ova] == "val").all() and len(ova) == 10
    # a copy with a test split: test images are on neither side
    full = read_cells(make_brca_full_copy(brca_dir, tmp_path / "full"))
    ftr, fva = patient_split(full)
    assert not set(full["split"].iloc[[*ftr, *fva]]) & {"test"} and len(ftr) + len(fva) == 3
    assert len(fva) >= 1 and not set(full["name"].str[:12].iloc[ftr]) & set(full["name"].str[:12].iloc[fva])
    assert patient_code("TCGA-A7-A0DB-01Z-00-DX1_1_2_3_4_0.98") == "TCGA-A7-A0DB"
    with pytest.raises(DataError, match="not a TCGA image name"):
        patient_code("slide_12.png")
    with pytest.raises(ValueError, match="validation"):
        cells_split(cells, validation="test")


def test_split_by_patient():
    from sklearn.model_selection import GroupShuffleSplit

    rng = np.random.default_rng(0)
    patients = [f"P{i}" for i in range(10)]
    rows = [(f"S{i}{k}", patients[i]) for i in range(10) for k in range(rng.integers(1, 4))]
    df = pd.DataFrame([(s, p) for s, p in rows for _ in range(3)], columns=["slide", "patient_id"])
    tr, va = split_by_patient(df, valid_pct=0.25, seed=3)
    assert len(set(df.patient_id.iloc[tr]) & set(df.patient_id.iloc[va])) == 0
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(df)))
    gss = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=0)
    _, va_ref = next(gss.split(df, groups=df.patient_id))
    assert df.patient_id.iloc[va].nunique() == df.patient_id.iloc[va_ref].nunique() == 3
    np.testing.assert_array_equal(split_by_patient(df.iloc[::-1].reset_index(drop=True), 0.25, 3)[1],
                                  len(df) - 1 - va[::-1])  # same patients whatever the row order
    others = {tuple(sorted(set(df.patient_id.iloc[split_by_patient(df, 0.25, s)[1]])))
              for s in range(6)}
    assert len(others) > 1
    no_pid = df.drop(columns="patient_id")  # falls back to slides
    tr2, va2 = split_by_patient(no_pid, 0.25, 0)
    assert len(set(no_pid.slide.iloc[tr2]) & set(no_pid.slide.iloc[va2])) == 0
    with pytest.raises(ValueError, match="valid_pct"):
        split_by_patient(df, 1.0, 0)


def test_normalisation_hand_values():
    img = np.array([[[0, 127.5, 255], [255, 255, 255]]])
    np.testing.assert_allclose(normalize_image(img), [[[-1, 0, 1], [1, 1, 1]]])
    t = to_tensor_image(np.array([[[0, 51, 255]]], dtype=np.uint8))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    np.testing.assert_allclose(t[:, 0, 0].numpy(), [-1.0, -0.6, 1.0], atol=1e-6)
    np.testing.assert_allclose(normalize_image(np.array([[[255, 0, 0]]]), "imagenet")[0, 0],
                               [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-5)
    img8 = _rgb(5, 7)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    undo = {"minus_one_one": lambda a: (a + 1) * 127.5, "imagenet": lambda a: (a * std + mean) * 255}
    for norm in ("minus_one_one", "imagenet"):
        x = to_tensor_image(img8, norm)
        back = np.rint(undo[norm](x.numpy().transpose(1, 2, 0).astype(np.float64)))
        np.testing.assert_array_equal(back, img8)
        # the predictors' in-place batch version gives the same bits as the DataLoaders' pixels
        batch = torch.from_numpy(img8).permute(2, 0, 1)[None].float()
        assert torch.equal(normalize_batch(batch, norm)[0], x)
    with pytest.raises(ValueError, match="normalize"):
        normalize_image(img8, "zscore")


def _dihedral(a):
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1]]
    return out


def test_seg_transforms_flips_are_independent_and_aligned():
    # albumentations 2.0.8's Compose(seed=) seeds every step alike, so HorizontalFlip and
    # VerticalFlip fire together and only rotations come out; all 8 symmetries must appear.
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (16, 16)).astype(np.uint8)
    img = np.repeat((label * 60)[:, :, None], 3, axis=2).astype(np.uint8)
    tfm = seg_transforms(16, train=True, seed=0)
    seen = set()
    refs = _dihedral(label)
    for _ in range(120):
        out = tfm(image=img, mask=label)
        dist = [(out["mask"] != r).mean() for r in refs]
        seen.add(int(np.argmin(dist)))
        assert out["mask"].dtype == np.uint8 and out["image"].shape == (16, 16, 3)
        assert set(np.unique(out["mask"])) <= {0, 1, 2, 3}
    assert seen == set(range(8))


def test_validation_transforms_are_plain_crops_and_resizes():
    img = _rgb(100, 90, 3)
    label = np.random.default_rng(1).integers(0, 4, (100, 90)).astype(np.uint8)
    out = seg_transforms(64, train=False)(image=img, mask=label)
    np.testing.assert_array_equal(out["image"], img[18:82, 13:77])
    np.testing.assert_array_equal(out["mask"], label[18:82, 13:77])
    small = _rgb(20, 20, 4)  # smaller than the crop: reflected padding, centred
    padded = seg_transforms(32, train=False)(image=small)["image"]
    np.testing.assert_array_equal(padded[6:26, 6:26], small)
    res = cellularity_transforms(48, train=False)(image=img)["image"]
    np.testing.assert_array_equal(res, cv2.resize(img, (48, 48), interpolation=cv2.INTER_AREA))
    assert cellularity_transforms(48, train=True, seed=0)(image=img)["image"].shape == (48, 48, 3)


# --------------------------------------------------------------------------------------------------
# DataLoaders
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def cells_root(tmp_path):
    _make_cells(tmp_path)
    return tmp_path


def test_seg_dataloaders_batches(cells_root):
    dls = seg_dataloaders(cells_root, size=32, downscale=2, bs=2, diameter=15, valid_pct=0.34,
                          seed=0, device="cpu")
    assert len(dls.train.dataset) == 4 and len(dls.valid.dataset) == 2
    assert len(dls.train) == 2 and len(dls.valid) == 1
    inter = union = 0
    for xb, yb in _batches(dls.train) + _batches(dls.train) + _batches(dls.valid):
        assert xb.shape == (2, 3, 32, 32) and xb.dtype == torch.float32
        assert yb.shape == (2, 4, 32, 32) and yb.dtype == torch.float32
        assert xb.min() >= -1 and xb.max() <= 1
        assert set(torch.unique(yb).tolist()) <= {0.0, 1.0}
        assert torch.equal(yb.sum(1), torch.ones(2, 32, 32))
        # image discs (dark) and mask discs (any nucleus class) stay aligned through the
        # crops, flips, rotations and colour changes
        dark = xb.mean(1) < 0.0
        nucleus = yb[:, :3].sum(1) > 0
        inter += (dark & nucleus).sum().item()
        union += (dark | nucleus).sum().item()
    assert inter / union > 0.85


def test_seg_dataloaders_mix_adds_the_other_folders_training_patches(cells_root, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    _make_cells(other)
    dls = seg_dataloaders(cells_root, size=32, downscale=2, bs=2, diameter=15, valid_pct=0.34,
                          seed=0, device="cpu", mix=other)
    # 4 training patches of each folder; validation stays on the first folder's 2
    assert len(dls.train.dataset) == 8 and len(dls.valid.dataset) == 2
    assert sum(str(other) in p for p in dls.train.dataset.image_paths) == 4
    assert not any(str(other) in p for p in dls.valid.dataset.image_paths)


def test_seg_dataloaders_deterministic(cells_root):
    def run(seed, num_workers=0):
        dls = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=seed, device="cpu",
                              num_workers=num_workers)
        return _batches(dls.train) + _batches(dls.train)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for ba, bc in zip(a, c) for x, y in zip(ba, bc))
    assert not torch.equal(a[0][0], a[2][0])  # a new epoch draws new crops
    w = run(0, num_workers=2)
    assert all(torch.equal(x, y) for ba, bw in zip(a, w) for x, y in zip(ba, bw))


def test_loader_workers_cpu_gpu_and_override(monkeypatch):
    monkeypatch.delenv(breastpathq.WORKERS_ENV, raising=False)
    assert breastpathq.loader_workers("cpu") == 0  # the 2 cores stay with the arithmetic
    # a GPU: all CPUs but one, at most MAX_GPU_WORKERS, at least one
    assert [breastpathq.loader_workers("cuda", cpus=n) for n in (1, 2, 5, 16, 64)] == [1, 1, 4, 8, 8]
    monkeypatch.setenv(breastpathq.WORKERS_ENV, "3")
    assert breastpathq.loader_workers("cpu") == 3 and breastpathq.loader_workers("cuda", cpus=16) == 3
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(breastpathq.WORKERS_ENV, bad)
        with pytest.raises(ValueError, match="CELLULIB_WORKERS must be a non-negative integer"):
            breastpathq.loader_workers("cpu")


def test_dataloaders_take_their_workers_from_loader_workers(cells_root, monkeypatch):
    monkeypatch.delenv(breastpathq.WORKERS_ENV, raising=False)
    dls = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=0, device="cpu")
    assert dls.train.fake_l.num_workers == 0 and not dls.train.pin_memory
    first = _batches(dls.train)
    monkeypatch.setenv(breastpathq.WORKERS_ENV, "2")
    dls = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=0, device="cpu")
    assert dls.train.fake_l.num_workers == 2 and dls.valid.fake_l.num_workers == 2
    assert not dls.train.pin_memory  # pinning only helps a copy to a GPU
    assert all(torch.equal(x, y) for a, b in zip(first, _batches(dls.train)) for x, y in zip(a, b))


def test_seg_dataloaders_patches_per_epoch_and_learner(cells_root):
    from fastai.learner import Learner

    dls = seg_dataloaders(cells_root, size=32, bs=4, valid_pct=0.34, seed=0, device="cpu",
                          patches_per_epoch=10)
    assert len(dls.train.dataset) == 10 and len(dls.train) == 2  # drop_last: 10 // 4
    idx = [s[0] for s in dls.train.get_idxs()]
    assert sorted(idx) == list(range(10))
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    learn = Learner(dls, model, loss_func=torch.nn.BCEWithLogitsLoss())
    with learn.no_logging():
        learn.fit(1, lr=1e-3)
    assert np.isfinite(learn.recorder.values[-1][0])


def test_seg_dataloaders_corrupt_image(cells_root):
    bad = cells_root / "datasets" / "cells" / "2_Region 11_crop.tif"
    bad.write_bytes(b"II*\x00 this is no image")
    dls = seg_dataloaders(cells_root, size=32, bs=6, valid_pct=0.0, seed=0, device="cpu")
    with pytest.raises(DataError, match=re.escape("2_Region 11_crop.tif")):
        list(dls.train)


@pytest.fixture
def bpq_root(tmp_path):
    train = [(f"{10 + i // 2}", f"{i}", round(0.1 * i, 2)) for i in range(8)]
    _make_bpq(tmp_path, train, VAL_ROWS + [("22", "1", 0.33)], size=24)
    return tmp_path


def test_cellularity_dataloaders_batches(bpq_root):
    dls = cellularity_dataloaders(bpq_root, size=16, bs=4, seed=0, device="cpu")
    assert len(dls.train) == 2 and len(dls.valid) == 1
    for xb, yb in _batches(dls.train):
        assert xb.shape == (4, 3, 16, 16) and xb.dtype == torch.float32
        assert yb.shape == (4, 1) and yb.dtype == torch.float32
        assert xb.min() >= -1 and xb.max() <= 1
        labels = np.round(0.1 * np.arange(8), 2)
        assert np.abs(yb.numpy() - labels[None, :]).min(axis=1).max() < 1e-6
    (xb, yb), = _batches(dls.valid)
    np.testing.assert_allclose(yb[:, 0].numpy(), [0.5, 1.0, 0.33], rtol=1e-6)
    # the k-th validation image is uniform (10k, 255 - 10k, 51): hand-normalised pixels
    for k in range(3):
        want = np.array([10 * k, 255 - 10 * k, 51]) / 127.5 - 1
        np.testing.assert_allclose(xb[k].numpy(), np.broadcast_to(want[:, None, None],
                                                                  (3, 16, 16)), atol=1e-6)
    dls_c = cellularity_dataloaders(bpq_root, size=16, bs=4, seed=0, device="cpu",
                                    task="classification")
    (_, yc), = _batches(dls_c.valid)
    assert yc.dtype == torch.int64 and yc.tolist() == [50, 100, 33]


def test_cellularity_dataloaders_deterministic_and_patient_split(bpq_root):
    def run(seed):
        return _batches(cellularity_dataloaders(bpq_root, size=16, bs=4, seed=seed,
                                                device="cpu").train)

    a, b, c = run(0), run(0), run(5)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for ba, bc in zip(a, c) for x, y in zip(ba, bc))
    (bpq_root / "patient_ids.csv").write_text(
        "patient_id,slide\nA,10\nA,11\nB,12\nC,13\nD,20\nD,21\nD,22\n")
    dls = cellularity_dataloaders(bpq_root, size=16, bs=2, seed=0, device="cpu", valid_pct=0.3)
    df = read_breastpathq(bpq_root).set_index("path")
    pid_tr = set(df.loc[dls.train.dataset.paths, "patient_id"])
    pid_va = set(df.loc[dls.valid.dataset.paths, "patient_id"])
    assert pid_va and pid_tr and not pid_tr & pid_va and "D" not in pid_tr | pid_va


def test_cellularity_dataloaders_errors(bpq_root):
    bad = bpq_root / "datasets" / "train" / "11_2.tif"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    dls = cellularity_dataloaders(bpq_root, size=16, bs=8, seed=0, device="cpu")
    with pytest.raises(DataError, match=re.escape(str(bad.resolve()))):
        list(dls.train)
    (bpq_root / "datasets" / "val_labels.csv").unlink()
    with pytest.warns(DataWarning, match="no val_labels.csv"), \
            pytest.raises(DataError, match="valid_pct"):
        cellularity_dataloaders(bpq_root, size=16, bs=8, seed=0, device="cpu")


# ------------------------------------------------------------------------------------------------
# exploration helpers
# ------------------------------------------------------------------------------------------------
def test_downscale_by_two_is_the_mean_of_2x2_blocks():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    small = transforms.downscale(img, 2)
    assert small.shape == (2, 3, 3)
    # hand-computed: top-left block holds rows 0-1, columns 0-1
    expected = (img[0, 0].astype(int) + img[0, 1] + img[1, 0] + img[1, 1]) / 4
    assert np.allclose(small[0, 0], expected, atol=0.5)
    assert transforms.downscale(img, 1) is img
    with pytest.raises(ValueError):
        transforms.downscale(img, 0)


def test_scale_points_aligns_pixel_centres():
    pts = pd.DataFrame({"x": [0.0, 10.0], "y": [1.0, 3.0], "cls": ["malignant", "normal"]})
    out = transforms.scale_points(pts, 0.5)
    assert out.x.tolist() == [0.0 / 2 - 0.25, 10.0 / 2 - 0.25]
    assert out.y.tolist() == [1.0 / 2 - 0.25, 3.0 / 2 - 0.25]
    assert out.cls.tolist() == pts.cls.tolist()


def test_pick_across_range_spans_the_scores():
    patches = pd.DataFrame({"cellularity": [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 0.05]})
    picked = breastpathq.pick_across_range(patches, 3, seed=0)
    assert picked.cellularity.tolist() == [0.0, 0.3, 1.0]
    assert len(breastpathq.pick_across_range(patches, 50)) == len(patches)
    with pytest.raises(ValueError):
        breastpathq.pick_across_range(patches, 0)



def test_tifffile_log_is_quiet_only_while_reading(caplog):
    """tifffile's warnings about a broken file are dropped while imageio reads it (the DataError
    says it), and only then: other code that uses tifffile still sees them."""
    import logging

    from cellulib.files import imageio

    log = logging.getLogger("tifffile")
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        with imageio._tifffile_quiet():
            log.warning("inside")
            with imageio._tifffile_quiet():  # nested reads stay quiet
                log.warning("nested")
            log.warning("inside again")
            log.error("an error passes")
        log.warning("outside")
    assert [r.getMessage() for r in caplog.records] == ["an error passes", "outside"]
    assert log.level == logging.NOTSET  # the level of the logger is never touched


def test_loader_workers_persist_across_epochs_with_the_same_batches(cells_root):
    """fastai starts new worker processes every epoch; ours start once and keep serving (issue 21:
    a GPU starved between small epochs), and stop with `close_workers`."""
    import multiprocessing

    def workers():
        return sorted(p.pid for p in multiprocessing.active_children())

    before = workers()
    plain = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=3, device="cpu",
                            num_workers=0)
    dls = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=3, device="cpu",
                          num_workers=2)
    epochs = []
    for _ in range(3):
        epochs.append(_batches(dls.train))
        started = [p for p in workers() if p not in before]
        assert len(started) == 2
        if len(epochs) == 1:
            first = started
        assert started == first  # the same two processes served every epoch
    expected = [_batches(plain.train) for _ in range(3)]
    assert all(torch.equal(x, y) for e, f in zip(epochs, expected) for a, b in zip(e, f)
               for x, y in zip(a, b))
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # a new epoch, new crops
    _batches(dls.valid)
    assert len([p for p in workers() if p not in before]) == 4  # and the validation loader's 2
    breastpathq.close_workers(dls)  # joins them: none is left, without waiting for the collector
    assert [p for p in workers() if p not in before] == []
    assert len(_batches(dls.train)) == len(epochs[0])  # a closed loader starts again
    breastpathq._close_all_workers()  # what runs at exit
    assert [p for p in workers() if p not in before] == []


def test_pinned_batches_go_to_the_device_without_waiting(cells_root, monkeypatch):
    """With workers and pinned memory (a GPU) each batch's copy to the device is queued
    (``non_blocking``), so the host goes on with the next batch; without pinning it is not, since
    a non-blocking copy from pageable memory is not safe to reuse."""
    calls = []
    real = breastpathq.to_device

    def to_device(b, device=None, non_blocking=False):
        calls.append(non_blocking)
        return real(b, device)

    monkeypatch.setattr(breastpathq, "to_device", to_device)
    dls = seg_dataloaders(cells_root, size=32, bs=2, valid_pct=0.34, seed=3, device="cpu",
                          num_workers=1)
    try:
        _batches(dls.train)
        assert calls and not any(calls)  # a CPU: nothing pinned
        calls.clear()
        dls.train.pin_memory = True  # what `_dataloaders` sets for a GPU
        dls.train.close_workers()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pin_memory ... no accelerator is found"
            _batches(dls.train)
        assert calls and all(calls)
    finally:
        breastpathq.close_workers(dls)
