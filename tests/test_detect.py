"""`cellulib detect`: nuclei drawn at known places of an input image come back at those places of the
input image with their class, through the library and the command line; bad images give error rows,
GeoJSON files have QuPath's FeatureCollection/Point layout, and a cellularity model is refused."""

import csv
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import cellulib.inference.modelfile
from cellulib import load_model, save_model
from cellulib.cli import commands
from cellulib.inference.detect import COLUMNS, detect_nuclei, detect_to_csv
from cellulib.inference.modelfile import ModelFileError
from cellulib.models import networks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# nuclei in input-image pixels (x = column, y = row): each a dark disc in one colour channel,
# the one of its class. Centres at 2k + 0.5 are the centres of pixel k after the x2 downscale.
H, W, RADIUS = 96, 160, 6
NUCLEI = [(40.5, 20.5, "normal"), (100.5, 60.5, "lymphocyte"), (130.5, 30.5, "malignant"),
          (20.5, 70.5, "malignant")]
CHANNEL = {"normal": 0, "lymphocyte": 1, "malignant": 2}


def _image() -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    yy, xx = np.mgrid[:H, :W]
    for x, y, name in NUCLEI:
        img[..., CHANNEL[name]][(xx - x) ** 2 + (yy - y) ** 2 <= RADIUS**2] = 0
    return img


class _DarknessLogits(torch.nn.Module):
    """Logits whose sigmoid is the darkness of colour channel c in class channel c, and background
    1 - the darkest: a stand-in segmentation network with known output."""

    def forward(self, x):  # x in [-1, 1], (B, 3, H, W)
        dark = ((1 - x) / 2).clamp(1e-4, 1 - 1e-4)
        background = (1 - dark.amax(1, keepdim=True)).clamp(1e-4, 1 - 1e-4)
        return torch.logit(torch.cat([dark, background], 1))


def _fake(model):
    model.forward = _DarknessLogits().forward
    return model


@pytest.fixture(scope="module")
def seg_net():
    return networks.seg_model("fpn")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(_image(), cv2.COLOR_RGB2BGR))
    return folder


def _assert_found(found, tol=1.0):
    """Every drawn nucleus found once, with its class, within ``tol`` input pixels; nothing else."""
    assert len(found) == len(NUCLEI)
    for x, y, name in NUCLEI:
        near = found[np.hypot(found.x - x, found.y - y) <= tol]
        assert list(near["class"]) == [name], (x, y, name, found)
        assert near.probability.iloc[0] > 0.9


# after the x2 downscale a disc centred at 2k + 0.5 is symmetric about pixel k, whose centre maps
# back exactly (a corner-for-centre slip would be 0.5 px off); at x1 the four pixels around the
# centre tie, and their centroid is the centre
@pytest.mark.parametrize(("params", "tol"), [({"downscale": 2}, 0.1), ({}, 0.1),
                                             ({"downscale": 1}, 0.1)])
def test_detect_finds_nuclei_in_input_pixels(seg_net, images, params, tol):
    info = {"family": "seg", "meta": {"params": params} if params else {}}
    found = detect_nuclei((_fake(seg_net), info), images, progress=False, device="cpu")
    assert list(found.columns) == list(COLUMNS)
    assert (found.error == "").all() and (found.path == str(images / "a.png")).all()
    _assert_found(found, tol)


def test_detect_uses_actual_scale_factors(seg_net, tmp_path):
    # 161 px wide: the x2 downscale rounds it to 80 px (factor 2.0125), 97 high to 48 (2.0208)
    img = np.full((H + 1, W + 1, 3), 255, np.uint8)
    img[:H, :W] = _image()
    cv2.imwrite(str(tmp_path / "odd.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    info = {"family": "seg", "meta": {"params": {"downscale": 2}}}
    found = detect_nuclei((_fake(seg_net), info), tmp_path / "odd.png", progress=False,
                          device="cpu")
    _assert_found(found, tol=1.5)


@pytest.fixture
def seg_file(tmp_path, seg_net, monkeypatch):
    """A real seg model file; loading it gives the stand-in network's known output."""
    path = tmp_path / "seg.pt"
    save_model(networks.seg_model("fpn"), path, params={"downscale": 2})
    real = cellulib.inference.modelfile.load_model

    def load_with_known_output(p, *args, **kwargs):
        model, info = real(p, *args, **kwargs)
        return _fake(model), info

    monkeypatch.setattr(cellulib.inference.modelfile, "load_model", load_with_known_output)
    return path


def test_cli_writes_csv_and_geojson(seg_file, images, tmp_path, capsys):
    out, gj = tmp_path / "out" / "nuclei.csv", tmp_path / "geojson"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images),
                     "--out", str(out), "--geojson", str(gj), "--quiet", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "in 1 of 1 images at threshold 0.3;" in printed.out  # the file records none
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "x", "y", "class", "probability", "error"]
    found = pd.read_csv(out, keep_default_na=False)
    _assert_found(found, tol=0.1)
    with open(gj / "a.geojson") as fh:
        doc = json.load(fh)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(NUCLEI)
    for feat, (_, row) in zip(doc["features"], found.iterrows()):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Point"
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == row["class"]
        assert props["probability"] == pytest.approx(row.probability, abs=1e-6)
        # QuPath's pixel (0, 0) spans [0, 1): index coordinates + 0.5
        assert feat["geometry"]["coordinates"] == pytest.approx([row.x + 0.5, row.y + 0.5],
                                                                abs=0.01)
    assert list(tmp_path.rglob("*.tmp")) == []


def test_cli_tta_and_class_rule_options(seg_file, images, tmp_path, capsys):
    # the stand-in network is pixelwise, so flips change nothing: the same nuclei either way
    out = tmp_path / "tta.csv"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images), "--out", str(out),
                     "--quiet", "--device", "cpu", "--tta", "--class-rule", "peak"])
    assert code == 0, capsys.readouterr().err
    _assert_found(pd.read_csv(out, keep_default_na=False), tol=0.1)


def test_bad_image_gives_error_row_and_exit_1(seg_file, images, tmp_path, capsys):
    bad = images / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a TIFF at all" * 3)
    out = tmp_path / "nuclei.csv"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images),
                     "--out", str(out), "--geojson", str(tmp_path / "gj"), "--quiet",
                     "--device", "cpu"])
    assert code == 1
    assert str(bad) in capsys.readouterr().err
    rows = pd.read_csv(out, keep_default_na=False)
    failed = rows[rows.error != ""]
    assert list(failed.path) == [str(bad)] and str(bad) in failed.error.iloc[0]
    assert (failed[["x", "y", "class", "probability"]] == "").all(axis=None)
    _assert_found(rows[rows.error == ""].astype({"x": float, "y": float, "probability": float}))
    assert sorted(p.name for p in (tmp_path / "gj").iterdir()) == ["a.geojson"]

    summary = detect_to_csv(seg_file, images, tmp_path / "again.csv", progress=False,
                            device="cpu")
    assert (summary["n_images"], summary["n_ok"], summary["n_failed"]) == (2, 1, 1)
    assert summary["n_nuclei"] == len(NUCLEI)
    assert summary["per_class"] == {"normal": 1, "lymphocyte": 1, "malignant": 2}


def test_an_image_without_nuclei_is_listed_in_the_sidecar(seg_file, images, tmp_path, capsys):
    # a white image: the stand-in network sees no dark disc, so no nucleus and no CSV row
    cv2.imwrite(str(images / "white.png"), np.full((H, W, 3), 255, np.uint8))
    out = tmp_path / "nuclei.csv"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images), "--out",
                          str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and "1 image(s) without a nucleus at threshold 0.3" in err and "white.png" in err
    assert set(pd.read_csv(out, keep_default_na=False).path) == {str(images / "a.png")}
    side = json.loads(out.with_name("nuclei.csv.json").read_text())
    assert side["no_nuclei"] == [str(images / "white.png")]
    assert side["nuclei_per_image"] == {str(images / "a.png"): len(NUCLEI),
                                        str(images / "white.png"): 0}
    assert side["n_images"] == 2 and side["threshold"] == 0.3


def test_cellularity_model_is_refused(tmp_path, images, capsys):
    path = tmp_path / "direct.pt"
    save_model(networks.direct_model("resnet34"), path,
               preprocess={"input_size": 64, "normalize": "minus_one_one"})
    out = tmp_path / "nuclei.csv"
    code = commands.main(["detect", "--model", str(path), "--images", str(images), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "seg" in err
    assert not out.exists()
    with pytest.raises(ModelFileError, match="direct"):
        detect_nuclei(load_model(path), images, progress=False)


def test_bad_threshold_and_missing_model(tmp_path, images, capsys):
    with pytest.raises(ValueError, match="threshold"):
        detect_nuclei(tmp_path / "whatever.pt", images, threshold=0)
    code = commands.main(["detect", "--model", str(tmp_path / "missing.pt"), "--images", str(images),
                     "--out", str(tmp_path / "n.csv")])
    assert code == 2 and "missing.pt" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# nucleus_centres: one nucleus per blob, its class the strongest map
# --------------------------------------------------------------------------------------------------
def _maps(discs, shape=(64, 96), diameter=11):
    """Probability maps with a disc of ``diameter`` per ``(x, y, {class: p})``."""
    probs = np.zeros((4, *shape), np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y, by_class in discs:
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= (diameter / 2) ** 2
        for name, p in by_class.items():
            probs[CHANNEL[name]][inside] = p
    probs[3] = 1 - probs[:3].max(0)
    return probs


def test_nucleus_centres_separates_touching_nuclei_and_picks_the_strongest_class():
    from cellulib.inference.detect import nucleus_centres

    # two discs 12 px apart (just touching at 11 px), a third seen by two maps
    probs = _maps([(20, 30, {"malignant": 0.95}), (32, 30, {"lymphocyte": 0.9}),
                   (70, 20, {"normal": 0.6, "malignant": 0.8})])
    found = nucleus_centres(probs, diameter=11, threshold=0.3)
    # the touching pair is resolved into two centres, each within a pixel of its disc's centre
    # (the neighbour's blob nudges the LoG maximum)
    assert [c for *_, c, _ in found] == ["malignant", "malignant", "lymphocyte"]
    centres = np.array([(x, y) for y, x, _, _ in found])
    assert np.abs(centres - [(70, 20), (20, 30), (32, 30)]).max() <= 1.0
    assert [p for *_, p in found] == pytest.approx([0.8, 0.95, 0.9])
    # the threshold applies to the nucleus probability 1 - p(background)
    weak = _maps([(20, 30, {"lymphocyte": 0.25}), (60, 30, {"lymphocyte": 0.5})])
    assert [round(x) for _, x, _, _ in nucleus_centres(weak, 11, threshold=0.3)] == [60]


def test_disc_rule_classes_a_nucleus_by_its_whole_disc():
    from cellulib.inference.detect import disc_kernel, nucleus_centres

    # one nucleus: the lymphocyte map covers the whole disc at 0.6, the malignant map only a
    # 3x3 spot at the centre at 0.9: the centre favours malignant, the disc lymphocyte
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 5.5 ** 2)
    spot = (np.abs(yy - 20) <= 1) & (np.abs(xx - 20) <= 1)
    lym, mal = 0.6 * disc, 0.9 * spot
    probs = np.stack([0 * lym, lym, mal, 1 - np.maximum(lym, mal)]).astype(np.float32)
    (y, x, peak, p_peak), = nucleus_centres(probs, 11, class_rule="peak")
    (_, _, whole, p_whole), = nucleus_centres(probs, 11, class_rule="disc")
    assert (y, x, peak, whole) == (20.0, 20.0, "malignant", "lymphocyte")
    assert (p_peak, p_whole) == pytest.approx((0.9, 0.6))
    # by hand: the disc of 11 px holds 97 pixels, 0.6 * 97 = 58.2 > 0.9 * 9 = 8.1
    assert disc_kernel(11).sum() == 97 == int(disc.sum())
    with pytest.raises(ValueError, match="class_rule"):
        nucleus_centres(probs, 11, class_rule="vote")


def test_flip_tta_is_the_mean_of_the_maps_of_the_flipped_images(seg_net):
    from cellulib.inference.detect import _SegModel

    info = {"family": "seg", "meta": {"params": {"downscale": 1, "disc_diameter": 11}}}
    img = _image()[:64, :96]
    torch.manual_seed(0)
    net = networks.seg_model("fpn").eval()  # random weights: not flip-equivariant
    plain = _SegModel((net, info), 0.3, device="cpu", precision="float32")
    tta = _SegModel((net, info), 0.3, device="cpu", precision="float32", tta=True)
    by_hand = [networks.segment(net, img)]
    for axes in ((0,), (1,), (0, 1)):
        maps = networks.segment(net, np.ascontiguousarray(np.flip(img, axes)))
        by_hand.append(np.flip(maps, tuple(a + 1 for a in axes)))
    expected = np.mean(by_hand, axis=0)
    np.testing.assert_allclose(tta.maps(img)[0], expected, atol=1e-6)
    assert np.abs(plain.maps(img)[0] - expected).max() > 1e-4


def test_bf16_maps_are_plain_autocast_bit_for_bit_and_the_given_net_stays_float32():
    """Detection casts the weights once (engine.precast_weights) instead of at every image: the
    maps are those of the float32 network under plain autocast, and the caller's net is not
    changed. The reference has detection's channels-last layout: on a CPU without native bf16
    (AVX2 only) the bf16 convolutions of the two layouts differ (by 0.42 in a map of this random
    network, whose logits are huge), where on the AVX-512 BF16 and AMX CPUs they agree."""
    import copy

    from cellulib.inference.detect import _SegModel

    info = {"family": "seg", "meta": {"params": {"downscale": 1, "disc_diameter": 11}}}
    img = _image()[:64, :96]
    torch.manual_seed(0)
    net = networks.seg_model("fpn").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_hand = networks.segment(copy.deepcopy(net).to(memory_format=torch.channels_last), img)
    seg = _SegModel((net, info), 0.3, device="cpu", precision="bf16")
    assert seg.model is not net and any(p.dtype == torch.bfloat16 for p in seg.model.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    np.testing.assert_array_equal(seg.maps(img)[0], by_hand)


def test_centres_at_a_grid_of_thresholds_are_those_found_one_threshold_at_a_time():
    """choose_threshold finds the nuclei at every threshold of its grid from one LoG of the maps
    (nucleus_centres_grid): each list must be what nucleus_centres gives at that threshold alone,
    here on blurred random blobs whose peaks lie at many heights."""
    from scipy import ndimage

    from cellulib.inference.detect import nucleus_centres, nucleus_centres_grid

    rng = np.random.default_rng(3)
    blobs = ndimage.gaussian_filter(rng.random((3, 80, 120)), (0, 3, 3))
    blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min())
    probs = np.concatenate([blobs, 1 - blobs.max(0, keepdims=True)]).astype(np.float32)
    grid = [0.2, 0.35, 0.5, 0.65, 0.8]
    for rule in ("disc", "peak"):
        together = nucleus_centres_grid(probs, 11, grid, rule)
        alone = [nucleus_centres(probs, 11, t, rule) for t in grid]
        assert together == alone
        counts = [len(found) for found in together]
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] > 0
    with pytest.raises(ValueError, match="threshold"):
        nucleus_centres_grid(probs, 11, [0.3, 1.0])


def test_nucleus_centres_rejects_bad_input():
    from cellulib.inference.detect import nucleus_centres

    with pytest.raises(ValueError, match="shape"):
        nucleus_centres(np.zeros((3, 8, 8)), 11)
    with pytest.raises(ValueError, match="threshold"):
        nucleus_centres(np.zeros((4, 8, 8)), 11, threshold=1.5)
    with pytest.raises(ValueError, match="diameter"):
        nucleus_centres(np.zeros((4, 8, 8)), 0)
    assert nucleus_centres(np.zeros((4, 8, 8)) + [[[0]], [[0]], [[0]], [[1]]], 11) == []


# --------------------------------------------------------------------------------------------------
# score_annotated == `cellulib detect` scored by an independent implementation of the protocol
# --------------------------------------------------------------------------------------------------
def test_score_annotated_equals_cli_output_scored_independently(seg_file, brca_full_copy, tmp_path):
    from mcspatnet_reference import reference_counts

    from cellulib.data.annotations import read_brca_m2c_points
    from cellulib.data.breastpathq import read_cells
    from cellulib.inference.detect import score_annotated
    from cellulib.metrics.detection import DETECTION_CLASSES

    cells = read_cells(brca_full_copy)
    test = cells[cells.split == "test"]
    assert len(test) == 2
    model = cellulib.inference.modelfile.load_model(seg_file)  # the stand-in network: dark pixels are nuclei
    scores = score_annotated(model, test, progress=False, device="cpu").scores()

    out = tmp_path / "nuclei.csv"
    assert commands.main(["detect", "--model", str(seg_file), "--images",
                     *[str(p) for p in test.image_path], "--out", str(out), "--quiet",
                     "--device", "cpu"]) == 0
    found = pd.read_csv(out, keep_default_na=False)
    expected = {c: np.zeros(3, dtype=int) for c in (*DETECTION_CLASSES, "detection")}
    for row in test.itertuples():
        dots = read_brca_m2c_points(row.xml_path)
        mine = found[found.path == str(row.image_path)]
        shape = (700, 700)
        for c in DETECTION_CLASSES:
            expected[c] += reference_counts(dots.loc[dots.cls == c, ["x", "y"]].to_numpy(),
                                            mine.loc[mine["class"] == c, ["x", "y"]].to_numpy(),
                                            6, shape)
        expected["detection"] += reference_counts(dots[["x", "y"]].to_numpy(),
                                                  mine[["x", "y"]].to_numpy(), 6, shape)
    assert scores.loc["detection", "tp"] > 0
    for c, counts in expected.items():
        assert scores.loc[c, ["tp", "fp", "fn"]].tolist() == counts.tolist(), c


# --------------------------------------------------------------------------------------------------
# --stain-norm: normalisation before segmentation, and bad targets
# --------------------------------------------------------------------------------------------------
def test_cli_stain_normalisation(seg_file, real_dir, tmp_path, capsys):
    from cellulib.data.stain import StainNormalizer

    target = real_dir / "breastpathq_99788_1.tif"
    source = real_dir / "amida13_example1.png"
    if not (target.is_file() and source.is_file()):
        pytest.skip("real H&E images not found")
    out = tmp_path / "nuclei.csv"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(source), "--out", str(out),
                     "--quiet", "--device", "cpu", "--stain-norm", "macenko",
                     "--stain-target", str(target)])
    assert code == 0, capsys.readouterr().err
    found = pd.read_csv(out, keep_default_na=False)
    model = cellulib.inference.modelfile.load_model(seg_file)
    expected = detect_nuclei(model, source, progress=False, device="cpu",
                             stain_norm=StainNormalizer("macenko").fit(target))
    plain = detect_nuclei(model, source, progress=False, device="cpu")
    assert len(found) == len(expected) != len(plain)
    np.testing.assert_allclose(found[["x", "y"]].to_numpy(), expected[["x", "y"]].to_numpy(),
                               atol=0.01)


def test_cli_bad_stain_target_writes_nothing(seg_file, images, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 64, 3), 250, np.uint8))
    out = tmp_path / "nuclei.csv"
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images), "--out", str(out),
                     "--stain-norm", "reinhard", "--stain-target", str(blank)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(blank) in err and "blank" in err
    assert not out.exists()
    # no target and no reference stored in the model file
    code = commands.main(["detect", "--model", str(seg_file), "--images", str(images), "--out", str(out),
                     "--stain-norm", "macenko"])
    assert code == 2 and "--stain-target" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------------------------------
# choose_threshold: the model's own detection threshold, chosen on annotated images
# --------------------------------------------------------------------------------------------------
# (x, y, class, pixel value, annotated): the stand-in network's nucleus probability at a disc is
# 1 - value / 255, so 0 is a sure nucleus, 89 one of probability 0.651 and 140 an unannotated
# faint blob of probability 0.451
GRADED = [(30, 30, "malignant", 0, True), (80, 30, "malignant", 0, True),
          (130, 30, "lymphocyte", 0, True), (30, 75, "normal", 89, True),
          (100, 75, "malignant", 140, False)]


def _graded(tmp_path):
    img = np.full((110, 170, 3), 255, np.uint8)
    yy, xx = np.mgrid[:110, :170]
    dots = []
    for x, y, name, value, annotated in GRADED:
        img[..., CHANNEL[name]][(xx - x) ** 2 + (yy - y) ** 2 <= 5.5 ** 2] = value
        if annotated:  # BRCA-M2C dots: "y x class", 1 lymphocyte, 2 tumour, 3 stromal
            dots.append(f"{y} {x} {dict(lymphocyte=1, malignant=2, normal=3)[name]}")
    cv2.imwrite(str(tmp_path / "g.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / "g_gt_class_coords.txt").write_text("\n".join(dots) + "\n")
    return pd.DataFrame({"name": ["g"], "image_path": [str(tmp_path / "g.png")],
                         "xml_path": [str(tmp_path / "g_gt_class_coords.txt")]})


def test_choose_threshold_keeps_the_best_mean_f_worked_out_by_hand(seg_net, tmp_path):
    from cellulib.inference.detect import THRESHOLD_GRID, choose_threshold

    cells = _graded(tmp_path)
    info = {"family": "seg", "meta": {"params": {"downscale": 1, "disc_diameter": 11.0}}}
    chosen = choose_threshold((_fake(seg_net), info), cells, device="cpu", precision="float32")
    # by hand, mean F of tumour, lymphocyte, stromal and detection:
    # t <= 0.4: the faint blob is a false tumour nucleus: tumour P 2/3, R 1, F 0.8; detection
    #           P 4/5, R 1, F 8/9; lymphocyte and stromal F 1: mean (0.8 + 1 + 1 + 8/9) / 4
    # 0.5, 0.6: every nucleus and nothing else: mean 1
    # t >= 0.7: the stromal nucleus (0.651) is missed: stromal F 0, detection R 3/4, F 6/7
    low, high = (0.8 + 2 + 8 / 9) / 4, (2 + 6 / 7) / 4
    assert chosen["grid"] == list(THRESHOLD_GRID) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert chosen["mean_f"] == pytest.approx([low, low, low, 1, 1, high, high], abs=1e-4)
    assert chosen["threshold"] == 0.5 and chosen["images"] == 1  # the lower of two equal ones


def test_detect_uses_the_threshold_the_model_file_records(seg_net, tmp_path):
    _graded(tmp_path)
    recorded = {"family": "seg", "meta": {"params": {"downscale": 1, "disc_diameter": 11.0},
                                          "detection": {"threshold": 0.5}}}
    plain = {"family": "seg", "meta": {"params": {"downscale": 1, "disc_diameter": 11.0}}}
    net = _fake(seg_net)
    found = {name: detect_nuclei((net, info), tmp_path / "g.png", progress=False, device="cpu",
                                 **kw)
             for name, info, kw in (("recorded", recorded, {}), ("default", plain, {}),
                                    ("given", recorded, {"threshold": 0.3}))}
    assert len(found["recorded"]) == 4  # 0.5: the faint unannotated blob is left out
    assert len(found["default"]) == len(found["given"]) == 5  # 0.3 finds it
    broken = {"family": "seg", "meta": {"detection": {"threshold": 1.5}}}
    with pytest.raises(ModelFileError, match=r"meta\['detection'\]\['threshold'\].*1\.5"):
        detect_nuclei((net, broken), tmp_path / "g.png", progress=False, device="cpu")
