"""Real annotation formats: PathCore XML with the real files' quirks, BRCA-M2C dots, layout detection.

References are independent of the code under test: hand-counted points of a hand-made fixture, the
XML reader of `cellulib.data.breastpathq` (ElementTree) on well-formed files, and plain line counts of the real
BRCA-M2C files.
"""
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellulib.constants import NUCLEUS_CLASSES
from cellulib.data.annotations import (
    BRCA_M2C_CLASSES,
    DESCRIPTION_TO_CLASS,
    detect_layout,
    parse_pathcore_xml,
    read_brca_m2c,
    read_brca_m2c_points,
)
from cellulib.data.synthset import cell_xml
from cellulib.files.imageio import DataError, DataWarning

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QUIRKY = FIXTURES / "quirky_key.xml"
COLUMNS = ["x", "y", "description", "cls"]

# tests/fixtures/quirky_key.xml, counted by hand: (x, y, description, cls) in file order.
QUIRKY_POINTS = [
    (72.0, 48.0, "IDC", "malignant"),
    (101.0, 230.0, "IDC", "malignant"),
    (711.5, 402.0, "IDC", "malignant"),  # beyond 512: the real crops are larger
    (15.0, 500.0, "TIL-S", "lymphocyte"),  # written "<point> 15 , 500 </point>"
    (33.0, 34.0, "TIL-S", "lymphocyte"),
    (640.0, 10.0, "IDC", "malignant"),  # IDC again, in a second graphic, description " IDC "
    (200.0, 201.0, "normal", "normal"),
]
QUIRKY_SKIPPED = Counter({"Fibroblast": 2})


def _table(points):
    return pd.DataFrame({
        "x": np.array([p[0] for p in points], dtype=np.float64),
        "y": np.array([p[1] for p in points], dtype=np.float64),
        "description": pd.Series([p[2] for p in points], dtype=object),
        "cls": pd.Series([p[3] for p in points], dtype=object),
    })


# --------------------------------------------------------------------------------------------------
# PathCore XML
# --------------------------------------------------------------------------------------------------
def test_fixture_has_the_real_quirks():
    raw = QUIRKY.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 20, "every line ends in CRLF"
    text = raw.decode()
    assert "<image " in text and "</image>" not in text
    assert 'type="Point"' in text and "type='point'" in text
    assert re.search(r'identifier="Y:\\[^"]* [^"]*\\17_Region 60_crop\.tif"', text)
    with pytest.raises(ET.ParseError):
        ET.fromstring(raw)  # not well-formed, as the real files are not


def test_parse_pathcore_quirky_fixture():
    pts, skipped = parse_pathcore_xml(QUIRKY)
    pd.testing.assert_frame_equal(pts, _table(QUIRKY_POINTS))
    assert skipped == QUIRKY_SKIPPED
    assert pts["cls"].value_counts().to_dict() == {"malignant": 4, "lymphocyte": 2, "normal": 1}


def _bom(raw):
    return b"\xef\xbb\xbf" + raw


def _no_session_end(raw):
    return raw.replace(b"</session>", b"")


def _no_session_at_all(raw):
    return re.sub(rb"</?session[^>]*>", b"", raw)


def _lf(raw):
    return raw.replace(b"\r\n", b"\n")


def _cr_only(raw):
    return raw.replace(b"\r\n", b"\r")


def _upper_tags(raw):
    return (raw.replace(b"<graphic", b"<Graphic").replace(b"</graphic", b"</GRAPHIC")
            .replace(b"<point>", b"<POINT>").replace(b"</point>", b"</Point>")
            .replace(b"<session", b"<Session"))


def _no_point_ends(raw):
    return raw.replace(b"</point>", b"")


def _no_graphic_ends(raw):
    return raw.replace(b"</graphic>", b"")


def _utf16(raw):
    return raw.decode().replace('encoding="utf-8"', 'encoding="utf-16"').encode("utf-16")


def _prefixed(raw):
    return (raw.replace(b"<session ", b'<pc:session xmlns:pc="urn:pathcore" ')
            .replace(b"<graphic ", b"<pc:graphic ").replace(b"</graphic>", b"</pc:graphic>")
            .replace(b"<point>", b"<pc:point>").replace(b"</point>", b"</pc:point>"))


@pytest.mark.parametrize("mangle", [_bom, _no_session_end, _no_session_at_all, _lf, _cr_only, _upper_tags,
                                    _no_point_ends, _no_graphic_ends, _utf16, _prefixed],
                         ids=lambda f: f.__name__.strip("_"))
def test_parse_pathcore_more_quirks(tmp_path, mangle):
    path = tmp_path / "17_Region 60_key.xml"
    path.write_bytes(mangle(QUIRKY.read_bytes()))
    pts, skipped = parse_pathcore_xml(path)
    pd.testing.assert_frame_equal(pts, _table(QUIRKY_POINTS))
    assert skipped == QUIRKY_SKIPPED


def test_parse_pathcore_attributes_in_any_order_and_quotes(tmp_path):
    path = tmp_path / "k.xml"
    path.write_text("<session><image identifier='C:\\a b\\1_Region 2_crop.tif'>"
                    "<graphic name = 'R 1'  DESCRIPTION=\"TIL-E\" type=POINT>"
                    "<point-list><point>\t4 ,\n5\t</point></point-list></graphic>"
                    '<graphic description="a > b" name="R 2"><point>6,7</point></graphic>')
    pts, skipped = parse_pathcore_xml(path)
    pd.testing.assert_frame_equal(pts, _table([(4.0, 5.0, "TIL-E", "lymphocyte")]))
    assert skipped == Counter({"a > b": 1})


def test_parse_pathcore_custom_table():
    pts, skipped = parse_pathcore_xml(QUIRKY, description_to_class={"Fibroblast": "normal"})
    assert pts["x"].tolist() == [1.0, 3.0] and pts["cls"].tolist() == ["normal", "normal"]
    assert skipped == Counter({"IDC": 4, "TIL-S": 2, "normal": 1})


# Well-formed files: the tolerant reader must agree exactly with an XML parser. The oracle is the
# ElementTree reader that `cellulib.data.breastpathq` used before it called `parse_pathcore_xml`, frozen here so
# the comparison stays independent once it does.
def _elementtree_reference(path):
    def local(tag):
        return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""

    xs, ys, descs, skipped = [], [], [], Counter()
    for graphic in (el for el in ET.parse(path).getroot().iter() if local(el.tag) == "graphic"):
        desc = (graphic.get("description") or "").strip()
        for point in (el for el in graphic.iter() if local(el.tag) == "point"):
            x, y = (float(v) for v in point.text.split(","))
            if desc in DESCRIPTION_TO_CLASS:
                xs.append(x)
                ys.append(y)
                descs.append(desc)
            else:
                skipped[desc] += 1
    return _table([(x, y, d, DESCRIPTION_TO_CLASS[d]) for x, y, d in zip(xs, ys, descs)]), skipped


_SPEC = (Path(__file__).parent / "fixtures" / "spec_key.xml").read_text()  # SPEC 1.1's example

WELL_FORMED = {
    "spec": _SPEC,
    "declaration_crlf": '<?xml version="1.0" encoding="UTF-8"?>\r\n' + _SPEC.replace("\n", "\r\n"),
    "default_namespace": _SPEC.replace("<session ", '<session xmlns="urn:pathcore" '),
    "prefixed_namespace": re.sub(r"<(/?)(session|image|overlays|graphic|point-list|point)\b",
                                 r"<\1p:\2", _SPEC).replace("<p:session ",
                                                            '<p:session xmlns:p="urn:p" '),
    "unknown_descriptions": _SPEC.replace('"UDH"', '"Fibroblast"').replace(
        "</overlays>", '<graphic type="point" name="R" description="">'
                       "<point-list><point>1,1</point><point>2,2</point></point-list></graphic>"
                       '<graphic type="point" name="S"><point-list><point>3,3</point>'
                       "</point-list></graphic></overlays>"),
    "entities": _SPEC.replace('"IDC"', '"&#73;DC"').replace('"UDH"', '"U&amp;DH"').replace(
        "<point>0,0</point>", "<point>&#49;0,2&#x30;</point>"),
    "comments_and_cdata": _SPEC.replace(
        "<point>72,48</point>", "<!-- <point>999,999</point> --><point><![CDATA[72]]>,4<!--x-->8"
                                "</point>"),
    "newline_in_attribute": _SPEC.replace('description="UDH"', 'description="\nUDH\t"').replace(
        'description="IDC"', 'description="MC -\nC"'),
    "empty_session": '<session software="PathCore Session Printer"><image identifier="a.tif"/>'
                     "</session>",
    "graphic_without_points": '<session><graphic type="point" name="R" description="IDC"/>'
                              '<graphic type="point" description="ILC"><point-list/></graphic>'
                              "</session>",
    "point_outside_graphic": _SPEC.replace("<overlays>", "<overlays><point>9,9</point>"),
    "polygon_graphic": _SPEC.replace('type="point" name="Region 63"', 'type="polygon" name="x"'),
    "synth_generator": cell_xml("3_Region 7_crop.tif", pd.DataFrame(
        {"x": [10.0, 20.0, 30.0, 40.0], "y": [1.0, 2.0, 3.0, 4.0],
         "description": ["TIL-E", "DCIS 2", "normal", "stroma"]})),
}


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_parse_pathcore_agrees_with_elementtree(tmp_path, name):
    path = tmp_path / f"{name}_key.xml"
    path.write_bytes(WELL_FORMED[name].encode())
    ET.fromstring(path.read_bytes())  # the case is well-formed
    want, want_skipped = _elementtree_reference(path)
    got, got_skipped = parse_pathcore_xml(path)
    pd.testing.assert_frame_equal(got, want)
    assert got_skipped == want_skipped
    assert list(got.columns) == COLUMNS


def test_well_formed_cases_are_not_trivial(tmp_path):
    """The equality test above would pass vacuously on empty tables: check the oracle's counts."""
    counts = {}
    for name, text in WELL_FORMED.items():
        path = tmp_path / f"{name}.xml"
        path.write_text(text)
        pts, skipped = _elementtree_reference(path)
        counts[name] = (len(pts), sum(skipped.values()))
    assert counts["spec"] == counts["default_namespace"] == (4, 0)
    assert counts["entities"] == (3, 1)  # "U&amp;DH" is "U&DH", not UDH
    assert counts["prefixed_namespace"] == counts["comments_and_cdata"] == (4, 0)
    assert counts["unknown_descriptions"] == (3, 4)
    assert counts["synth_generator"] == (3, 1)
    assert counts["empty_session"] == counts["graphic_without_points"] == (0, 0)


def test_reference_matches_cellulib_data(tmp_path):
    """The frozen oracle and `cellulib.data.breastpathq` agree on the SPEC example."""
    from cellulib.data.breastpathq import read_cell_points

    path = tmp_path / "spec_key.xml"
    path.write_text(_SPEC)
    pd.testing.assert_frame_equal(read_cell_points(path), _elementtree_reference(path)[0])


@pytest.mark.parametrize("text", ["72;48", "a,b", "-3,4", "3,-4", "1,2,3", "", "nan,1", "7",
                                  "72 48"])
def test_parse_pathcore_malformed_point(tmp_path, text):
    path = tmp_path / "bad_key.xml"
    path.write_bytes(QUIRKY.read_bytes().replace(b"<point>33,34</point>",
                                                 f"<point>{text}</point>".encode()))
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        parse_pathcore_xml(path)
    assert repr(text) in str(err.value) and "'Region 62'" in str(err.value)


def test_parse_pathcore_self_closing_point_is_malformed(tmp_path):
    path = tmp_path / "k.xml"
    path.write_text('<session><graphic name="G" description="IDC"><point/></graphic></session>')
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*malformed point ''"):
        parse_pathcore_xml(path)


@pytest.mark.parametrize("content", [b"", b"<annotations><region/></annotations>",
                                     b"x,y\n72,48\n", b"II*\x00\x08\x00\x00\x00\xff\xfe\x00"])
def test_parse_pathcore_not_a_pathcore_file(tmp_path, content):
    path = tmp_path / "other_key.xml"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*PathCore"):
        parse_pathcore_xml(path)


def test_parse_pathcore_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.xml")) + ".*not found"):
        parse_pathcore_xml(tmp_path / "nope.xml")


def test_module_does_not_import_torch():
    code = "import sys, cellulib.data.annotations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# BRCA-M2C
# --------------------------------------------------------------------------------------------------
def _split_lines(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def test_read_brca_m2c_real_splits(brca_dir):
    table = read_brca_m2c(brca_dir)
    assert list(table.columns) == ["name", "image_path", "label_path", "split",
                                   "n_normal", "n_lymphocyte", "n_malignant"]
    for split in ("train", "val", "test"):
        split_file = brca_dir / f"brca_ds_{split}.txt"
        want = _split_lines(split_file) if split_file.is_file() else []
        got = table.loc[table["split"] == split, "image_path"].map(lambda p: Path(p).name)
        assert got.tolist() == want
    assert (table["split"] == "train").sum() == 80 and (table["split"] == "val").sum() == 10
    assert all(Path(p).is_file() for p in table["image_path"])
    assert all(Path(p).is_file() for p in table["label_path"])
    assert table[["n_normal", "n_lymphocyte", "n_malignant"]].dtypes.eq(np.int64).all()


def test_read_brca_m2c_counts_match_plain_line_counts(brca_dir):
    table = read_brca_m2c(brca_dir)
    want = Counter()
    for label_path in table["label_path"]:
        for line in Path(label_path).read_text().splitlines():
            if line.strip():
                want[line.split()[2]] += 1
    assert table["n_lymphocyte"].sum() == want["1"]
    assert table["n_malignant"].sum() == want["2"]
    assert table["n_normal"].sum() == want["3"]


def test_read_brca_m2c_points_real_file(brca_dir):
    label = (brca_dir / "labels"
             / "TCGA-A7-A0D9-01Z-00-DX2_18001_13001_1000_1000_0.9824_gt_class_coords.txt")
    lines = [ln.split() for ln in label.read_text().splitlines() if ln.strip()]
    pts = read_brca_m2c_points(label)
    assert list(pts.columns) == COLUMNS and len(pts) == len(lines)
    # first line of the file, read by hand: "178 376 1" = row 178, column 376, a lymphocyte
    assert pts.iloc[0].tolist() == [376.0, 178.0, "lymphocyte", "lymphocyte"]
    by_class = Counter(fields[2] for fields in lines)
    counts = pts["cls"].value_counts()
    assert counts.get("lymphocyte", 0) == by_class["1"]
    assert counts.get("malignant", 0) == by_class["2"]
    assert counts.get("normal", 0) == by_class["3"]
    assert pts["x"].tolist() == [float(f[1]) for f in lines]
    assert pts["y"].tolist() == [float(f[0]) for f in lines]


def test_brca_m2c_dots_sit_on_nuclei(brca_dir):
    """Row-first order checked on the pixels: dots read as (y, x) land on dark nuclei, swapped
    they land on average tissue."""
    from PIL import Image

    row = read_brca_m2c(brca_dir).iloc[0]
    grey = np.asarray(Image.open(row["image_path"]).convert("L"), dtype=np.float64)
    pts = read_brca_m2c_points(row["label_path"])
    inside = (pts["x"] < min(grey.shape)) & (pts["y"] < min(grey.shape))
    x = pts.loc[inside, "x"].to_numpy().astype(int)
    y = pts.loc[inside, "y"].to_numpy().astype(int)
    assert grey[y, x].mean() < grey[x, y].mean() - 20


def test_brca_m2c_class_table():
    assert {cls for _, cls in BRCA_M2C_CLASSES.values()} == set(NUCLEUS_CLASSES)
    assert BRCA_M2C_CLASSES[1][1] == "lymphocyte" and BRCA_M2C_CLASSES[2][1] == "malignant"
    assert BRCA_M2C_CLASSES[3] == ("stromal", "normal")


def _make_brca(root, splits, dots=None):
    """A tiny BRCA-M2C copy: splits {split: [image names]}, dots {stem: file text}."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for split, names in splits.items():
        (root / f"brca_ds_{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for n in names:
            (root / "images" / n).write_bytes(b"\x89PNG")  # never opened
            stem = Path(n).stem
            text = (dots or {}).get(stem, "10 20 1\n30 40 2\n50 60 3\n70 80 2\n")
            (root / "labels" / f"{stem}_gt_class_coords.txt").write_text(text)
    return root


def test_read_brca_m2c_synthetic(tmp_path):
    root = _make_brca(tmp_path, {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["d.png"]},
                      dots={"b": "", "d": "1.5\t2.25\t3\r\n\r\n4,5,1\r\n"})
    table = read_brca_m2c(root)
    assert table["name"].tolist() == ["a", "b", "c", "d"]
    assert table["split"].tolist() == ["train", "train", "val", "test"]
    assert table["n_malignant"].tolist() == [2, 0, 2, 0]
    assert table["n_lymphocyte"].tolist() == [1, 0, 1, 1]
    assert table["n_normal"].tolist() == [1, 0, 1, 1]
    pts = read_brca_m2c_points(table["label_path"].iloc[3])
    pd.testing.assert_frame_equal(pts, _table([(2.25, 1.5, "stromal", "normal"),
                                               (5.0, 4.0, "lymphocyte", "lymphocyte")]))
    empty = read_brca_m2c_points(table["label_path"].iloc[1])
    assert len(empty) == 0 and list(empty.columns) == COLUMNS


@pytest.mark.parametrize("line", ["10 20", "10 20 4", "10 20 0", "a 20 1", "10 -2 1",
                                  "10 20 1 5", "10 20 1.5", "nan 3 1"])
def test_read_brca_m2c_points_bad_line(tmp_path, line):
    path = tmp_path / "x_gt_class_coords.txt"
    path.write_text(f"1 2 1\n{line}\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*line 2") as err:
        read_brca_m2c_points(path)
    assert repr(line) in str(err.value)


def test_read_brca_m2c_missing_image_or_label(tmp_path):
    root = _make_brca(tmp_path / "a", {"train": ["a.png"]})
    (root / "brca_ds_val.txt").write_text("ghost.png\n")
    with pytest.raises(DataError, match=re.escape(str(root / "brca_ds_val.txt"))
                       + ".*missing.*ghost.png"):
        read_brca_m2c(root)
    root = _make_brca(tmp_path / "b", {"train": ["a.png"]})
    (root / "labels" / "a_gt_class_coords.txt").unlink()
    with pytest.raises(DataError, match="no dot file.*a_gt_class_coords.txt"):
        read_brca_m2c(root)


def test_read_brca_m2c_leaks_and_strays(tmp_path):
    root = _make_brca(tmp_path / "a", {"train": ["a.png"], "val": ["b.png"]})
    (root / "brca_ds_test.txt").write_text("a.png\n")
    with pytest.raises(DataError, match=r"brca_ds_test.txt.*another split.*a.png \(train\)"):
        read_brca_m2c(root)
    root = _make_brca(tmp_path / "b", {"train": ["a.png", "b.png", "a.png"]})
    with pytest.raises(DataError, match="more than once: a.png"):
        read_brca_m2c(root)
    root = _make_brca(tmp_path / "c", {"train": ["a.png"]})
    (root / "images" / "stray.png").write_bytes(b"")
    with pytest.warns(DataWarning, match="1 images are in no split file.*stray.png"):
        assert len(read_brca_m2c(root)) == 1
    with pytest.raises(DataError, match="no split file.*brca_ds_train.txt"):
        read_brca_m2c(tmp_path)


# --------------------------------------------------------------------------------------------------
# detect_layout
# --------------------------------------------------------------------------------------------------
def _make_breastpathq(root):
    ds = root / "datasets"
    (ds / "train").mkdir(parents=True)
    (ds / "train_labels.csv").write_text("slide,rid,y\n99788,1,0.3\n")
    tifffile.imwrite(ds / "train" / "99788_1.tif", np.zeros((8, 8, 3), np.uint8))
    return root


def test_detect_layout_breastpathq(tmp_path):
    root = _make_breastpathq(tmp_path)
    assert detect_layout(root) == "breastpathq"
    assert detect_layout(root / "datasets") == "breastpathq"
    cells_only = tmp_path / "cells_only"
    (cells_only / "datasets" / "cells").mkdir(parents=True)
    assert detect_layout(cells_only) == "breastpathq"


def test_detect_layout_brca_m2c(brca_dir):
    assert detect_layout(brca_dir) == "brca-m2c"


def test_detect_layout_brca_m2c_synthetic(tmp_path):
    assert detect_layout(_make_brca(tmp_path, {"val": ["a.png"]})) == "brca-m2c"


def test_detect_layout_neither(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        detect_layout(empty)
    msg = str(err.value)
    assert msg.startswith(str(empty))
    for part in ("BreastPathQ", "datasets/", "train_labels.csv", "cells/",
                 "BRCA-M2C", "brca_ds_train.txt", "images/", "labels/"):
        assert part in msg, part
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*not found"):
        detect_layout(tmp_path / "nope")
    both = _make_brca(_make_breastpathq(tmp_path / "both"), {"train": ["a.png"]})
    with pytest.raises(DataError, match="both layouts"):
        detect_layout(both)
