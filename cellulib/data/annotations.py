"""Real nucleus annotations: PathCore cell XML as BreastPathQ ships it, and BRCA-M2C dot files.

Two formats give nucleus centroids with a class; both are read into one table, ``x``, ``y``
(float64 pixels of the image), ``description`` (the class as the annotators wrote it) and ``cls``
(``normal``, ``lymphocyte`` or ``malignant``, the channels of `cellulib.constants.CLASSES`).

**PathCore Session Printer XML** (SPEC 1.1, BreastPathQ ``datasets/cells/*_key.xml``)::

    <session software="PathCore Session Printer">
      <image identifier="Y:\\histology\\...\\17_Region 60_crop.tif"><overlays>
        <graphic type="Point" name="Region 61" description="IDC">
          <point-list><point>72,48</point><point>101,230</point></point-list>
        </graphic> ...

The real files are not well-formed XML: ``<image>`` is never closed, lines end in CRLF, the graphic
type is ``point`` or ``Point``, one class can be spread over several ``<graphic>`` blocks, and the
crops are larger than 512x512 (points reach x ~ 710). `parse_pathcore_xml` therefore tokenises the
text (``<graphic ...>`` start and end tags, ``<point>x,y</point>``) instead of building a tree; on a
well-formed file written with the usual lower-case names it returns exactly what an XML parser
would (an XML parser would also ignore ``<Graphic>``, which this reader accepts).

**BRCA-M2C dot files** (SPEC 1.4, Abousamra et al. 2021, GitHub TopoXLab/Dataset-BRCA-M2C)::

    ROOT/images/{stem}.png
    ROOT/labels/{stem}_gt_class_coords.txt     one nucleus per line: "<y> <x> <class>"
    ROOT/brca_ds_{train,val,test}.txt          one image file name per line (the official split)

Note the order: row (y) first. Classes 1 lymphocyte, 2 tumour/epithelial, 3 stromal map to
``lymphocyte``, ``malignant`` and ``normal``: channel 0 holds "other nuclei", normal epithelium in
BreastPathQ but stromal nuclei here.

Every bad input raises `cellulib.DataError` naming the file. This module imports neither torch
nor `cellulib.data.breastpathq` at import time (`cellulib.data.breastpathq` is imported inside the functions that need its
class table and errors), so `cellulib.data.breastpathq` can import it.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from cellulib.constants import IMAGE_SUFFIXES, NUCLEUS_CLASSES
from cellulib.files.imageio import DataError, DataWarning, listing

__all__ = [
    "BRCA_M2C_CLASSES",
    "BRCA_M2C_SPLITS",
    "detect_layout",
    "is_brca_m2c",
    "nearest_dot_distances",
    "parse_pathcore_xml",
    "read_brca_m2c",
    "read_brca_m2c_points",
]

#: BRCA-M2C dot class -> (description, nucleus class) (SPEC 1.4). Stromal nuclei go to channel 0,
#: "other nuclei" (normal epithelium in BreastPathQ).
BRCA_M2C_CLASSES: dict[int, tuple[str, str]] = {
    1: ("lymphocyte", "lymphocyte"),
    2: ("tumor/epithelial", "malignant"),
    3: ("stromal", "normal"),
}

#: BRCA-M2C split name -> split file, in the order the table lists them.
BRCA_M2C_SPLITS: dict[str, str] = {
    "train": "brca_ds_train.txt",
    "val": "brca_ds_val.txt",
    "test": "brca_ds_test.txt",
}

_BRCA_LABEL_SUFFIX = "_gt_class_coords.txt"

_BREASTPATHQ_LAYOUT = (
    "BreastPathQ (SPEC 1.1): ROOT/datasets/ with train_labels.csv and/or val_labels.csv "
    "(patches in datasets/train/ and datasets/validation/) and/or cells/ "
    "('{N}_Region {M}_crop.tif' + '_key.xml'); ROOT may also be datasets/ itself"
)
#: PathCore ``description`` -> nucleus class (SPEC 1.1), matched after stripping outer whitespace.
DESCRIPTION_TO_CLASS: dict[str, str] = {
    **{d: "malignant" for d in (
        "IDC", "ILC", "Muc C", "DCIS 1", "DCIS 2", "DCIS 3", "MC- E", "MC - C", "MC - M")},
    **{d: "normal" for d in ("normal", "UDH", "ADH")},
    **{d: "lymphocyte" for d in ("TIL-E", "TIL-S")},
}

BRCA_M2C_LAYOUT = (
    "BRCA-M2C (SPEC 1.4): ROOT/brca_ds_train.txt, brca_ds_val.txt and/or brca_ds_test.txt "
    f"(image file names), ROOT/images/*.png and ROOT/labels/{{stem}}{_BRCA_LABEL_SUFFIX}"
)


def _points_table(xs: list[float], ys: list[float], descs: list[str],
                  classes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "x": np.asarray(xs, dtype=np.float64),
        "y": np.asarray(ys, dtype=np.float64),
        "description": pd.Series(descs, dtype=object),
        "cls": pd.Series(classes, dtype=object),
    })


# --------------------------------------------------------------------------------------------------
# PathCore Session Printer XML
# --------------------------------------------------------------------------------------------------
# Comments vanish and CDATA becomes (escaped) text, as an XML parser would see them.
_COMMENT_OR_CDATA = re.compile(r"<!--.*?-->|<!\[CDATA\[(.*?)\]\]>", re.S)
# A start or end tag of the three elements that matter, any namespace prefix, any case; attribute
# values may hold '>' inside quotes. "(?=[\s/>])" keeps <point-list> from matching <point.
_TAG = re.compile(
    r"""<(/?)(?:[A-Za-z_][\w.-]*:)?(graphic|point|session)(?=[\s/>])"""
    r"""((?:[^>"']|"[^"]*"|'[^']*')*)>""",
    re.I,
)
_ATTR = re.compile(r"""([^\s=/"'<>]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'<>]+))""")
_ENTITY = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|amp|lt|gt|quot|apos);")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_ENCODING = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def _unescape(text: str) -> str:
    def repl(m: re.Match) -> str:
        ref = m.group(1)
        if ref[0] != "#":
            return _NAMED[ref]
        code = int(ref[2:], 16) if ref[1] in "xX" else int(ref[1:])
        return chr(code) if 0 < code < 0x110000 else m.group(0)

    return _ENTITY.sub(repl, text)


def _decode(raw: bytes) -> str:
    """Text of an XML file: BOM first, then the declared encoding, then UTF-8, then Latin-1."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"),
                       (b"\xfe\xff", "utf-16-be")):
        if raw.startswith(bom):
            return raw[len(bom):].decode(codec, errors="replace")
    if raw.startswith(b"<\x00"):
        return raw.decode("utf-16-le", errors="replace")
    if raw.startswith(b"\x00<"):
        return raw.decode("utf-16-be", errors="replace")
    declared = _ENCODING.match(raw)
    for codec in ([declared.group(1).decode("ascii")] if declared else []) + ["utf-8"]:
        try:
            return raw.decode(codec)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")  # never fails; tags, numbers and class names are ASCII


def _attributes(attr_text: str) -> dict[str, str]:
    """Attributes of a start tag: first occurrence wins; XML attribute-value normalisation (tab
    and newline become a space) and entity references applied."""
    exact: dict[str, str] = {}
    for m in _ATTR.finditer(attr_text):
        value = next(v for v in m.group(2, 3, 4) if v is not None)
        exact.setdefault(m.group(1), _unescape(re.sub(r"[\t\n]", " ", value)))
    folded = {k.lower(): v for k, v in reversed(exact.items())}
    return {**folded, **exact}


def _parse_xy(text: str, path: Path, name: str | None) -> tuple[float, float]:
    """``"x,y"`` -> (x, y); the same checks and message as the XML reader of `cellulib.data.breastpathq`."""
    parts = text.strip().split(",")
    where = f" in graphic {name!r}" if name else ""
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise DataError(f"{path}: malformed point {text!r}{where} (expected 'x,y' in "
                                f"pixels)") from None
    if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
        raise DataError(f"{path}: point {text!r}{where} is negative or not finite")
    return x, y


def parse_pathcore_xml(path: str | Path,
                       description_to_class: dict[str, str] | None = None,
                       ) -> tuple[pd.DataFrame, Counter]:
    """Nucleus centroids of a PathCore Session Printer file, accepting the real files' quirks.

    SPEC 1.1 (paper section 4.1). Tokenises the text rather than parsing a tree, so it reads the
    real BreastPathQ ``*_key.xml`` files, which are not well-formed XML: an unclosed ``<image>``
    (or ``<session>``), CRLF line ends, a byte-order mark, ``type="point"`` or ``type='Point'``,
    attributes in any order and quote style, tag and attribute names in any case or with a
    namespace prefix, one class over several ``<graphic>`` blocks, spaces inside a point
    (``<point> 72 , 48 </point>``), coordinates beyond 512. Each ``<point>`` takes the
    ``description`` of the ``<graphic>`` it is in (a graphic ends at ``</graphic>`` or at the next
    ``<graphic``); points outside any graphic are ignored, as an XML reader ignores them. Every
    graphic counts whatever its ``type``, as an XML reader of the format counts it. On a
    well-formed file with lower-case names the result equals that of an XML parser. Used in chapter
    2
    through `cellulib.data.breastpathq.read_cell_points`, and in the real-H&E chapter through
    `cellulib.data.breastpathq.read_cells`.

    Parameters
    ----------
    path : str or Path
        The ``*_key.xml`` file.
    description_to_class : dict, optional
        ``description`` (stripped) -> nucleus class; default `DESCRIPTION_TO_CLASS`.

    Returns
    -------
    points : pd.DataFrame
        Points of known descriptions, in file order: ``x``, ``y`` (float64 pixels of the crop),
        ``description`` (as written, stripped) and ``cls`` (object); empty with these columns when
        the file has none (a ``<session>`` without graphics, or graphics without points).
    skipped : collections.Counter
        Description -> number of points skipped because the description is not in the table.

    Raises
    ------
    DataError
        The file is missing, holds neither ``<session>`` nor ``<graphic>`` (not a PathCore file:
        no point can be recovered), or a point is not two comma-separated non-negative numbers
        (the message quotes its text and the graphic's name). Every message names the file.

    Examples
    --------
    >>> pts, skipped = parse_pathcore_xml("datasets/cells/17_Region 60_key.xml")  # doctest: +SKIP
    >>> pts.head(2)  # doctest: +SKIP
           x      y description        cls
    0   72.0   48.0         IDC  malignant
    1  101.0  230.0         IDC  malignant
    """
    path = Path(path)
    if description_to_class is None:
        description_to_class = DESCRIPTION_TO_CLASS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = _decode(path.read_bytes())
    # XML end-of-line handling, then comments out and CDATA in as text.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _COMMENT_OR_CDATA.sub(
        lambda m: "" if m.group(1) is None
        else m.group(1).replace("&", "&amp;").replace("<", "&lt;"), text)

    xs: list[float] = []
    ys: list[float] = []
    descs: list[str] = []
    skipped: Counter = Counter()
    seen_graphic = seen_session = False
    graphic: dict[str, str] | None = None  # attributes of the open <graphic>
    for tag in _TAG.finditer(text):
        closing, element, attr_text = tag.group(1), tag.group(2).lower(), tag.group(3)
        self_closing = attr_text.rstrip().endswith("/")
        if element == "session":
            seen_session |= not closing
        elif element == "graphic":
            graphic = None if (closing or self_closing) else _attributes(attr_text)
            seen_graphic |= not closing
        elif not closing and graphic is not None:  # a <point> inside a graphic
            # The text runs to the next tag, so a missing </point> costs nothing.
            end = text.find("<", tag.end())
            end = len(text) if end < 0 else end
            point_text = "" if self_closing else _unescape(text[tag.end():end])
            x, y = _parse_xy(point_text, path, graphic.get("name"))
            desc = (graphic.get("description") or "").strip()
            if desc not in description_to_class:
                skipped[desc] += 1
                continue
            xs.append(x)
            ys.append(y)
            descs.append(desc)
    if not seen_graphic and not seen_session:
        raise DataError(
            f"{path}: not a PathCore Session Printer file (no <session> or <graphic> element, "
            f"so no <point> can be assigned a class)")
    return _points_table(xs, ys, descs, [description_to_class[d] for d in descs]), skipped


# --------------------------------------------------------------------------------------------------
# BRCA-M2C
# --------------------------------------------------------------------------------------------------
def read_brca_m2c_points(label_path: str | Path) -> pd.DataFrame:
    """Nucleus centres of one BRCA-M2C image from its ``*_gt_class_coords.txt`` dot file.

    SPEC 1.4. One nucleus per line, ``<y> <x> <class>`` in pixels (row first; integers in the
    published files, floats accepted; spaces, tabs or commas between fields); blank lines are
    skipped. Classes map by `BRCA_M2C_CLASSES`: 1 -> ``lymphocyte``, 2 (tumour/epithelial) ->
    ``malignant``, 3 (stromal) -> ``normal``, channel 0, "other nuclei". Used in the real-H&E
    chapter.

    Parameters
    ----------
    label_path : str or Path
        The dot file.

    Returns
    -------
    pd.DataFrame
        Columns ``x``, ``y`` (float64 pixels), ``description`` (``"lymphocyte"``,
        ``"tumor/epithelial"`` or ``"stromal"``) and ``cls``, in file order, as
        `parse_pathcore_xml` returns them; empty with these columns for an empty file.

    Raises
    ------
    DataError
        Missing file, or a line that is not three fields ``y x class`` with non-negative finite
        coordinates and a class of 1, 2 or 3 (the message gives the line number and quotes it).

    Examples
    --------
    >>> read_brca_m2c_points("labels/TCGA-A7-A0D9-01Z-00-DX2_18001_13001_1000_1000_0.9824"
    ...                      "_gt_class_coords.txt").head(2)  # doctest: +SKIP
           x      y description         cls
    0  376.0  178.0  lymphocyte  lymphocyte
    1  128.0  180.0  lymphocyte  lymphocyte
    """
    label_path = Path(label_path)
    if not label_path.is_file():
        raise DataError(f"{label_path}: file not found")
    xs: list[float] = []
    ys: list[float] = []
    descs: list[str] = []
    classes: list[str] = []
    lines = label_path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            if len(fields) != 3:
                raise ValueError
            y, x, code = float(fields[0]), float(fields[1]), float(fields[2])
            if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
                raise ValueError
            description, cls = BRCA_M2C_CLASSES[int(code) if code.is_integer() else code]
        except (ValueError, KeyError):
            raise DataError(
                f"{label_path}: line {number} {line!r} is not '<y> <x> <class>' with "
                f"non-negative pixel coordinates and class 1 (lymphocyte), 2 "
                f"(tumour/epithelial) or 3 (stromal)") from None
        xs.append(x)
        ys.append(y)
        descs.append(description)
        classes.append(cls)
    return _points_table(xs, ys, descs, classes)


def _split_names(split_path: Path) -> list[str]:
    names = [line.strip() for line in
             split_path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    names = [n for n in names if n]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{split_path}: images listed more than once: "
                                f"{listing(repeated)}")
    return names


def read_brca_m2c(root: str | Path) -> pd.DataFrame:
    """Index a BRCA-M2C copy: one row per image of the official splits, with nuclei per class.

    SPEC 1.4. Reads whichever of ``brca_ds_train.txt``, ``brca_ds_val.txt`` and
    ``brca_ds_test.txt`` the copy holds (the copy in ``data/real/`` has train and val; a clone of
    TopoXLab/Dataset-BRCA-M2C also has test), pairs each listed ``images/{stem}.png`` with
    ``labels/{stem}_gt_class_coords.txt`` and counts its dots per class with
    `read_brca_m2c_points`. Opens no image. The columns shared with `cellulib.data.breastpathq.read_cells` have
    the same names; ``label_path`` plays the part of its ``xml_path``. Used in the real-H&E chapter
    through :func:`cellulib.data.breastpathq.read_cells`.

    Parameters
    ----------
    root : str or Path
        The folder holding the split files, ``images/`` and ``labels/``.

    Returns
    -------
    pd.DataFrame
        One row per listed image, train then val then test, each in split-file order: ``name``
        (the image stem), ``image_path``, ``label_path`` (str, absolute), ``split`` (``"train"``,
        ``"val"`` or ``"test"``), ``n_normal`` (stromal), ``n_lymphocyte``, ``n_malignant``
        (tumour/epithelial; int64).

    Raises
    ------
    DataError
        No split file (the message describes the layout), an image listed twice or in two
        splits, a listed image or its dot file missing (some are named), or a bad dot file.

    Warns
    -----
    DataWarning
        Images in ``images/`` that no split file lists (named; they are not in the result).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; expected {BRCA_M2C_LAYOUT}")
    splits = {s: root / f for s, f in BRCA_M2C_SPLITS.items() if (root / f).is_file()}
    if not splits:
        raise DataError(f"{root}: no split file; expected {BRCA_M2C_LAYOUT}")
    images, labels = root / "images", root / "labels"
    rows = []
    split_of: dict[str, str] = {}
    for split, split_path in splits.items():
        names = _split_names(split_path)
        twice = [f"{n} ({split_of[n]})" for n in names if n in split_of]
        if twice:
            raise DataError(f"{split_path}: images already in another split: "
                                 f"{listing(twice)}")
        missing = [n for n in names if not (images / n).is_file()]
        if missing:
            where = images if images.is_dir() else f"{images} (folder missing)"
            raise DataError(f"{split_path}: {len(missing)} of {len(names)} listed images are "
                                 f"missing from {where}: {listing(missing)}")
        label_paths = [labels / (Path(n).stem + _BRCA_LABEL_SUFFIX) for n in names]
        unlabelled = [p.name for p in label_paths if not p.is_file()]
        if unlabelled:
            where = labels if labels.is_dir() else f"{labels} (folder missing)"
            raise DataError(f"{split_path}: {len(unlabelled)} of {len(names)} listed images "
                                 f"have no dot file in {where}: {listing(unlabelled)}")
        for name, label_path in zip(names, label_paths, strict=True):
            split_of[name] = split
            counts = read_brca_m2c_points(label_path)["cls"].value_counts()
            rows.append({"name": Path(name).stem, "image_path": str((images / name).resolve()),
                         "label_path": str(label_path.resolve()), "split": split,
                         **{f"n_{c}": int(counts.get(c, 0)) for c in NUCLEUS_CLASSES}})
    unlisted = sorted(p.name for p in (images.iterdir() if images.is_dir() else ())
                      if p.is_file() and not p.name.startswith(".") and p.name not in split_of
                      and p.suffix.lower() in IMAGE_SUFFIXES)
    if unlisted:
        warnings.warn(f"{images}: {len(unlisted)} images are in no split file and are ignored: "
                      f"{listing(unlisted)}", DataWarning, stacklevel=2)
    table = pd.DataFrame(rows, columns=["name", "image_path", "label_path", "split",
                                        *(f"n_{c}" for c in NUCLEUS_CLASSES)])
    return table.astype({f"n_{c}": np.int64 for c in NUCLEUS_CLASSES})


# --------------------------------------------------------------------------------------------------
# Which dataset is this?
# --------------------------------------------------------------------------------------------------
def _is_breastpathq(folder: Path) -> bool:
    return (any((folder / f).is_file() for f in ("train_labels.csv", "val_labels.csv"))
            or (folder / "cells").is_dir())


def is_brca_m2c(root: str | Path) -> bool:
    """Whether ``root`` is meant as a BRCA-M2C copy (SPEC 1.4): it holds at least one of
    ``brca_ds_{train,val,test}.txt``, the dataset's split files. The one rule for telling a
    BRCA-M2C folder from a BreastPathQ one (`detect_layout`, `cellulib.data.breastpathq.read_cells`, the
    training recipe); `read_brca_m2c` then names whatever else the copy lacks (``images/``,
    ``labels/``, a listed file). Looks at names only.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> is_brca_m2c(d)
    False
    >>> _ = (Path(d) / "brca_ds_val.txt").write_text("a.png")
    >>> is_brca_m2c(d)
    True
    """
    return any((Path(root) / f).is_file() for f in BRCA_M2C_SPLITS.values())


def detect_layout(root: str | Path) -> str:
    """Say which annotated dataset a folder holds: ``"breastpathq"`` or ``"brca-m2c"``.

    SPEC 1.1 and 1.4. BreastPathQ: ``ROOT/datasets/`` (or ROOT being ``datasets/``) with
    ``train_labels.csv`` and/or ``val_labels.csv`` and/or ``cells/``. BRCA-M2C: at least one
    ``brca_ds_{train,val,test}.txt`` (`is_brca_m2c`; its reader names a missing ``images/`` or
    ``labels/``). Looks at names only.
    Used in the real-H&E chapter through :func:`cellulib.data.paths.brca_m2c_dir` and wherever a
    reader is chosen from a folder.

    Parameters
    ----------
    root : str or Path
        The dataset folder.

    Returns
    -------
    str
        ``"breastpathq"`` (read it with `cellulib.data.breastpathq.read_breastpathq` and
        `cellulib.data.breastpathq.read_cells`) or ``"brca-m2c"`` (read it with `read_brca_m2c`).

    Raises
    ------
    DataError
        The folder is missing, or matches neither layout or both; the message names the folder
        and describes both layouts.
    """
    root = Path(root).expanduser()
    both = f"expected either {_BREASTPATHQ_LAYOUT}; or {BRCA_M2C_LAYOUT}"
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; {both}")
    breastpathq = _is_breastpathq(root / "datasets") or (
        root.name == "datasets" and _is_breastpathq(root))
    brca_m2c = is_brca_m2c(root)
    if breastpathq and brca_m2c:
        raise DataError(f"{root}: holds both layouts, so it is unclear which to read; "
                                f"{both}")
    if breastpathq:
        return "breastpathq"
    if brca_m2c:
        return "brca-m2c"
    raise DataError(f"{root}: neither dataset layout found; {both}")


def nearest_dot_distances(points: pd.DataFrame) -> np.ndarray:
    """Distance from each annotated nucleus to the nearest other one of the same image, in pixels.

    ``points``: ``x``, ``y`` and an ``image`` column naming the image of each dot. Images with a
    single dot contribute nothing. An upper bound on the nucleus size and the scale at which two
    nuclei become hard to tell apart; the real-H&E chapter sets its disc diameter from it.

    Examples
    --------
    >>> pts = pd.DataFrame({"image": ["a", "a", "a", "b"], "x": [0, 3, 10, 5.0], "y": [0, 4, 0, 5.0]})
    >>> nearest_dot_distances(pts).round(3).tolist()  # 3-4-5 triangle; sqrt(7**2 + 4**2)
    [5.0, 5.0, 8.062]
    """
    from scipy.spatial import cKDTree

    out = []
    for _, part in points.groupby("image", sort=False):
        xy = part[["x", "y"]].to_numpy(dtype=np.float64)
        if len(xy) > 1:
            dist, _ = cKDTree(xy).query(xy, k=2)
            out.append(dist[:, 1])
    return np.concatenate(out) if out else np.empty(0)
