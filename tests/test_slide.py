"""`cellulib slide`: region reading equals tifffile's full decode at every pyramid level, tissue
tiles are found and scored exactly as the documented recipe on the same pixels, background is
skipped, damaged tiles give error rows, and the outputs are written (synthetic pyramidal OME-TIFF,
the real OpenSlide crop, an OpenSlide adapter)."""

import argparse
import json
import sys
import types
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellulib import load_model, models, save_model
from cellulib.data import DataError
from cellulib.predict import add_commands
from cellulib.slide import SlideWarning, open_slide, slide_map, tile_grid, tissue_mask
from cellulib.synth import render_patch


@pytest.fixture(autouse=True)
def _float32(monkeypatch):
    """These tests compare tiles and maps with float32 recipes on deliberately sensitive models,
    where bf16 autocast moves a score far more than their tolerance; bf16 itself is tested in
    test_predict.py."""
    monkeypatch.setenv("CELLULIB_PRECISION", "float32")

S = 64
PRE = {"input_size": S, "normalize": "minus_one_one"}
PATCH = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A direct regression model whose head is standardised so scores vary across tiles."""
    torch.manual_seed(0)
    model = models.direct_model("resnet34").eval()
    x = torch.from_numpy(np.stack([render_patch(S, seed=500 + i, with_masks=False).img
                                   for i in range(12)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = model.body(x.float() / 127.5 - 1)
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        w = torch.randn(1, feats.shape[1], generator=torch.Generator().manual_seed(1))
        w = 3 * w / (sd * feats.shape[1] ** 0.5)
        model.head.weight.copy_(w)
        model.head.bias.copy_(-w @ mu)
    return save_model(model, tmp_path_factory.mktemp("model") / "direct.pt", preprocess=PRE)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """A 1536 x 1024 slide: 4 x 4 synthetic H&E patches of 256 px on the left, glass on the
    right; a 3-level JPEG-tiled pyramidal OME-TIFF (downsamples 1, 2, 4; 0.5 um/px)."""
    img = np.full((1024, 1536, 3), 255, np.uint8)
    tissue = np.zeros((1024, 1536), bool)
    for r in range(4):
        for c in range(4):
            p = render_patch(PATCH, seed=20 + 4 * r + c)
            img[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = p.img
            tissue[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = p.masks["tissue"]
    path = tmp_path_factory.mktemp("slide") / "synthetic.ome.tif"
    _write_pyramid(path, img)
    return path, tissue


def _write_pyramid(path, img, compression="jpeg"):
    levels = [img]
    for _ in range(2):
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    opts = {"photometric": "rgb", "tile": (256, 256), "compression": compression}
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, **opts,
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **opts)


@pytest.fixture(scope="module")
def reference_model(model_file):
    return load_model(model_file)[0]


def _score(model, tile):
    """The documented recipe on given pixels: INTER_AREA to S, [-1, 1], one forward pass."""
    if tile.shape[:2] != (S, S):
        tile = cv2.resize(tile, (S, S), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(tile.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return float(model.to_cellularity(model(x))[0])


def _run(argv):
    parser = argparse.ArgumentParser(prog="cellulib")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------
# reading


def _check_regions(path, expected_levels, n=12, seed=0):
    rng = np.random.default_rng(seed)
    with open_slide(path) as reader:
        assert reader.kind == "tifffile"
        assert [d[::-1] for d in reader.dims] == [e.shape[:2] for e in expected_levels]
        for level, full in enumerate(expected_levels):
            height, width = full.shape[:2]
            for _ in range(n):  # unaligned regions spanning several TIFF tiles or strips
                w = int(rng.integers(1, min(width, 400) + 1))
                h = int(rng.integers(1, min(height, 400) + 1))
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                np.testing.assert_array_equal(reader.read_region(level, x, y, w, h),
                                              full[y:y + h, x:x + w])


def test_regions_equal_tifffile_full_decode_at_every_level(synthetic_slide):
    path, _ = synthetic_slide
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert len(levels) == 3
    _check_regions(path, levels)
    with open_slide(path) as reader:
        assert reader.downsamples == [1.0, 2.0, 4.0]
        assert reader.mpp == pytest.approx(0.5)


def test_stripped_16bit_and_grey_tiffs_read_by_region(tmp_path):
    rng = np.random.default_rng(1)
    rgb = cv2.resize(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), (700, 600))
    tifffile.imwrite(tmp_path / "strips.tif", rgb, photometric="rgb", rowsperstrip=37)
    _check_regions(tmp_path / "strips.tif", [rgb])
    grey16 = rgb[..., 0].astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "grey16.tif", grey16, tile=(128, 128), compression="zlib")
    _check_regions(tmp_path / "grey16.tif", [np.repeat(rgb[..., :1], 3, axis=2)])


def test_unreadable_inputs_are_clear_errors(tmp_path, model_file):
    (tmp_path / "notes.tif").write_text("not a tiff at all")
    with pytest.raises(DataError, match=r"notes\.tif"):
        open_slide(tmp_path / "notes.tif")
    good = tmp_path / "small.tif"
    tifffile.imwrite(good, np.zeros((300, 300, 3), np.uint8), photometric="rgb", tile=(128, 128))
    data = good.read_bytes()
    (tmp_path / "header_only.tif").write_bytes(data[:6])
    with pytest.raises(DataError, match=r"header_only\.tif"):
        open_slide(tmp_path / "header_only.tif")
    with pytest.raises(DataError, match=r"missing\.tif: image file not found"):
        open_slide(tmp_path / "missing.tif")
    with pytest.raises(DataError, match=r"small\.tif: image 300x300 is smaller than one 512-px"):
        slide_map(model_file, good, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"level 5 does not exist"):
        slide_map(model_file, good, tmp_path / "out", tile=128, level=5, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# tissue and the map


def test_tissue_mask_finds_stained_tissue_not_glass(synthetic_slide):
    path, truth = synthetic_slide
    img = tifffile.imread(path)
    mask, threshold = tissue_mask(img)
    assert 15 <= threshold <= 30
    assert mask[:, 1024:].mean() < 0.001  # glass
    agree = (mask[:, :1024] == truth[:, :1024]).mean()
    assert agree > 0.9, agree


def test_slide_map_scores_tissue_tiles_like_the_recipe(synthetic_slide, model_file,
                                                       reference_model, tmp_path):
    path, truth = synthetic_slide
    out = tmp_path / "map"
    tiles = slide_map(model_file, path, out, tile=PATCH, min_tissue=0.5, batch_size=5,
                      progress=False)
    summary = tiles.attrs["summary"]
    assert summary["read_level"] == 2  # 256 px tiles for a 64 px model: level with downsample 4
    assert len(tiles) == 6 * 4
    grid = tile_grid(1536, 1024, PATCH)
    assert tiles[["x", "y"]].values.tolist() == grid[["x", "y"]].values.tolist()
    glass = tiles["x"] >= 1024
    assert (tiles.loc[glass, "tissue_fraction"] < 0.01).all()
    assert tiles.loc[glass, "cellularity"].isna().all()
    truth_fraction = [truth[y:y + PATCH, x:x + PATCH].mean() for x, y in tiles[["x", "y"]].values]
    np.testing.assert_allclose(tiles.loc[~glass, "tissue_fraction"],
                               np.array(truth_fraction)[~glass], atol=0.1)
    scored = tiles["cellularity"].notna()
    assert (scored == (tiles["tissue_fraction"] >= 0.5)).all() and scored.sum() >= 12
    with tifffile.TiffFile(path) as tif:
        level2 = tif.series[0].levels[2].asarray()
    ref = [_score(reference_model, level2[y // 4:y // 4 + S, x // 4:x // 4 + S])
           for x, y in tiles.loc[scored, ["x", "y"]].values]
    np.testing.assert_allclose(tiles.loc[scored, "cellularity"], ref, atol=1e-4)
    assert np.std(ref) > 0.01  # the model tells these tiles apart

    written = pd.read_csv(out / "tiles.csv", keep_default_na=False)
    assert list(written.columns) == ["x", "y", "w", "h", "tissue_fraction", "cellularity", "error"]
    np.testing.assert_allclose(pd.to_numeric(written["cellularity"]).dropna(),
                               tiles["cellularity"].dropna(), rtol=1e-5)
    meta = json.loads((out / "slide.json").read_text())
    assert meta["n_scored"] == int(scored.sum()) and meta["n_failed"] == 0
    assert meta["levels"] == [[1536, 1024], [768, 512], [384, 256]] and meta["mpp"] == 0.5
    with Image.open(out / "heatmap.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "slide.json", "tiles.csv"]


def test_level_zero_tiles_and_tile_in_micrometres(synthetic_slide, model_file, reference_model,
                                                  tmp_path):
    path, _ = synthetic_slide
    tiles = slide_map(model_file, path, tmp_path / "l0", tile_um=256.0, level=0, stride=384,
                      progress=False)
    summary = tiles.attrs["summary"]
    assert summary["tile"] == 512 and summary["read_level"] == 0 and summary["stride"] == 384
    # 1536 x 1024 in steps of 384: a last column flush with the right edge (x = 1024) and a last
    # row flush with the bottom (y = 512) cover the strips the steps leave
    assert tiles[["x", "y"]].values.tolist() == [
        [x, y] for y in (0, 384, 512) for x in (0, 384, 768, 1024)]
    full = tifffile.imread(path)
    scored = tiles["cellularity"].notna()
    ref = [_score(reference_model, full[y:y + 512, x:x + 512])
           for x, y in tiles.loc[scored, ["x", "y"]].values]
    np.testing.assert_allclose(tiles.loc[scored, "cellularity"], ref, atol=1e-4)


def test_damaged_tile_gives_an_error_row_and_exit_1(synthetic_slide, model_file, tmp_path,
                                                    capsys):
    path, _ = synthetic_slide
    broken = tmp_path / "broken.ome.tif"
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].pages[0]
        offset = page.dataoffsets[1]  # level-0 TIFF tile at x=256, y=0
    data[offset:offset + 64] = bytes(64)  # no JPEG start marker any more
    broken.write_bytes(bytes(data))
    with pytest.warns(SlideWarning, match="shown as glass"):
        tiles = slide_map(model_file, broken, tmp_path / "out", tile=512, level=0,
                          progress=False)
    bad = tiles["error"] != ""
    assert tiles.loc[bad, ["x", "y"]].values.tolist() == [[0, 0]]
    message = tiles.loc[bad, "error"].iloc[0]
    assert "broken.ome.tif tile x=0 y=0" in message and "cannot decode" in message
    assert tiles.loc[~bad & (tiles["x"] < 1024), "cellularity"].notna().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlideWarning)
        code = _run(["slide", "--model", str(model_file), str(broken), "--out",
                     str(tmp_path / "cli"), "--level", "0", "--quiet"])
    assert code == 1
    assert "tile x=0 y=0" in capsys.readouterr().err


def test_glass_only_image_scores_nothing(model_file, tmp_path, capsys):
    glass = np.full((600, 600, 3), 242, np.uint8)
    Image.fromarray(glass).save(tmp_path / "glass.png")
    with pytest.warns(SlideWarning, match="no tile has at least 50% tissue"):
        tiles = slide_map(model_file, tmp_path / "glass.png", tmp_path / "out", tile=256,
                          progress=False)
    assert tiles["cellularity"].isna().all() and tiles.attrs["summary"]["reader"] == "image"
    assert (tmp_path / "out" / "heatmap.png").is_file()


def test_cli_slide_on_the_real_openslide_crop(real_dir, model_file, reference_model, tmp_path,
                                              capsys):
    path = real_dir / "openslide_OS-1-detail.ome.tif"
    if not path.is_file():
        pytest.skip(f"{path.name} not in {real_dir}")
    out = tmp_path / "real"
    assert _run(["slide", "--model", str(model_file), str(path), "--out", str(out), "--tile",
                 "512", "--quiet"]) == 0
    assert "9 tissue tiles scored" in capsys.readouterr().out
    tiles = pd.read_csv(out / "tiles.csv")
    # 1101 px: two whole tiles and one flush with the edge (x or y = 589), so the last 77 px count
    assert tiles[["x", "y"]].values.tolist() == [[x, y] for y in (0, 512, 589) for x in (0, 512, 589)]
    assert (tiles["tissue_fraction"] > 0.9).all()  # the crop is all tissue
    full = tifffile.imread(path)  # JPEG-compressed tiles, decoded by tifffile as a whole
    ref = [_score(reference_model, full[y:y + 512, x:x + 512]) for x, y in tiles[["x", "y"]].values]
    np.testing.assert_allclose(tiles["cellularity"], ref, atol=1e-4)
    meta = json.loads((out / "slide.json").read_text())
    assert meta["reader"] == "tifffile" and meta["mpp"] == pytest.approx(0.227, abs=0.001)


# ---------------------------------------------------------------------------------------------
# OpenSlide formats (openslide-python is optional: a stand-in module checks the adapter)


class _FakeOpenSlide:
    """The part of openslide.OpenSlide that cellulib uses, over an in-memory 2-level pyramid."""

    levels: list = []

    def __init__(self, path):
        self.level_dimensions = [(a.shape[1], a.shape[0]) for a in self.levels]
        self.level_downsamples = [self.levels[0].shape[1] / a.shape[1] for a in self.levels]
        self.properties = {"openslide.mpp-x": "0.25"}

    @staticmethod
    def detect_format(path):
        return "aperio" if str(path).endswith(".svs") else None

    def read_region(self, location, level, size):
        x0, y0 = location  # level-0 coordinates, as OpenSlide defines them
        ds = self.level_downsamples[level]
        x, y = int(round(x0 / ds)), int(round(y0 / ds))
        rgb = self.levels[level][y:y + size[1], x:x + size[0]]
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")

    def close(self):
        pass


def test_openslide_formats_go_through_openslide(synthetic_slide, model_file, reference_model,
                                                tmp_path, monkeypatch):
    path, _ = synthetic_slide
    full = tifffile.imread(path)
    half = cv2.resize(full, (768, 512), interpolation=cv2.INTER_AREA)
    _FakeOpenSlide.levels = [full, half]
    fake = types.ModuleType("openslide")
    fake.OpenSlide = _FakeOpenSlide
    fake.PROPERTY_NAME_MPP_X = "openslide.mpp-x"
    monkeypatch.setitem(sys.modules, "openslide", fake)
    svs = tmp_path / "slide.svs"
    svs.write_bytes(b"stand-in for a vendor file")
    tiles = slide_map(model_file, svs, tmp_path / "out", tile=128, progress=False)
    summary = tiles.attrs["summary"]
    assert summary["reader"] == "openslide" and summary["mpp"] == 0.25
    assert summary["read_level"] == 1  # 128 px tiles for 64 px inputs: downsample 2
    scored = tiles["cellularity"].notna()
    assert scored.sum() > 20
    ref = [_score(reference_model, half[y // 2:y // 2 + S, x // 2:x // 2 + S])
           for x, y in tiles.loc[scored, ["x", "y"]].values]
    np.testing.assert_allclose(tiles.loc[scored, "cellularity"], ref, atol=1e-4)


def test_tiles_smaller_than_the_input_are_enlarged_or_refused(model_file, reference_model,
                                                              tmp_path):
    img = render_patch(144, cellularity=0.6, seed=3, with_masks=False).img
    Image.fromarray(img).save(tmp_path / "field.png")
    tiles = slide_map(model_file, tmp_path / "field.png", tmp_path / "out", tile=48,
                      min_tissue=0.0, progress=False)
    assert tiles.attrs["summary"]["read_level"] == 0 and len(tiles) == 9
    ref = [_score(reference_model, img[y:y + 48, x:x + 48]) for x, y in tiles[["x", "y"]].values]
    np.testing.assert_allclose(tiles["cellularity"], ref, atol=1e-4)
    with pytest.raises(DataError, match=r"field\.png: a tile of 10 px is too small"):
        slide_map(model_file, tmp_path / "field.png", tmp_path / "out2", tile=10, progress=False)


@pytest.mark.parametrize(("width", "height", "tile", "stride"),
                         [(1101, 1101, 512, None), (1536, 1024, 512, None), (1000, 700, 256, 200),
                          (512, 513, 512, None)])
def test_tile_grid_covers_every_pixel(width, height, tile, stride):
    grid = tile_grid(width, height, tile, stride)
    covered = np.zeros((height, width), bool)
    for x, y, w, h in grid[["x", "y", "w", "h"]].values:
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        covered[y:y + h, x:x + w] = True
    assert covered.all()
    # whole steps only where they fit: the grid of an exact multiple is unchanged
    if stride is None and width % tile == 0 and height % tile == 0:
        assert len(grid) == (width // tile) * (height // tile)


# ---------------------------------------------------------------------------------------------
# scale: tiles cover the model's training field of view at the image's pixel size (issue 12)


@pytest.fixture(scope="module")
def sized_model_file(model_file, tmp_path_factory):
    """The same model, recording training patches of 256 px at 1.0 um/px (a 256 um field)."""
    model, info = load_model(model_file)
    return save_model(model, tmp_path_factory.mktemp("sized") / "direct.pt",
                      preprocess=info["meta"]["preprocess"],
                      pixel_size={"mpp": 1.0, "patch_px": 256})


def test_default_tile_is_the_model_field_of_view(synthetic_slide, sized_model_file, model_file,
                                                 tmp_path):
    path, _ = synthetic_slide  # 0.5 um/px in its OME metadata
    summary = slide_map(sized_model_file, path, tmp_path / "a", progress=False).attrs["summary"]
    assert summary["tile"] == 512 and summary["mpp_source"] == "file"  # 256 um / 0.5 um/px
    assert summary["tile_from"] == "model field of view at the image's pixel size"
    # the image's pixel size given by hand wins over the file's: 256 um / 0.25 um/px
    summary = slide_map(sized_model_file, path, tmp_path / "b", mpp=0.25,
                        progress=False).attrs["summary"]
    assert summary["tile"] == 1024 and summary["mpp"] == 0.25 and summary["mpp_source"] == "given"
    # a model file without a pixel size counts as BreastPathQ's: 512 px at 0.5 um/px
    assert slide_map(model_file, path, tmp_path / "c", progress=False
                     ).attrs["summary"]["tile"] == 512
    with pytest.raises(ValueError, match="mpp"):
        slide_map(model_file, path, tmp_path / "d", mpp=-1, progress=False)


def test_real_openslide_crop_is_tiled_at_the_model_scale(real_dir, model_file, reference_model,
                                                         tmp_path, capsys):
    path = real_dir / "openslide_OS-1-detail.ome.tif"
    if not path.is_file():
        pytest.skip(f"{path.name} not in {real_dir}")
    model, info = load_model(model_file)
    quick = save_model(model, tmp_path / "quick.pt", preprocess=info["meta"]["preprocess"],
                       pixel_size={"mpp": 0.5, "patch_px": 256})  # the quick profile's patches
    with open_slide(path) as reader:
        mpp = reader.mpp
    assert mpp == pytest.approx(0.227, abs=0.001)
    assert _run(["slide", "--model", str(quick), str(path), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    meta = json.loads((tmp_path / "o" / "slide.json").read_text())
    tile = round(256 * 0.5 / mpp)  # 128 um: 564 px of this 40x crop, where 256 px saw 58 um
    assert meta["tile"] == tile == 564
    tiles = pd.read_csv(tmp_path / "o" / "tiles.csv")
    assert tiles[["x", "y"]].values.tolist() == [[x, y] for y in (0, 537) for x in (0, 537)]
    full = tifffile.imread(path)
    ref = [_score(reference_model, full[y:y + tile, x:x + tile]) for x, y in tiles[["x", "y"]].values]
    np.testing.assert_allclose(tiles["cellularity"], ref, atol=1e-4)
    # a 256 um field (BreastPathQ's 512 px at 0.5 um/px) is 1127 px, more than the image: a
    # clear error that says where the tile size came from
    big = round(256 / mpp)
    assert big in (1127, 1128)
    with pytest.raises(DataError, match=rf"1101x1101 is smaller than one {big}-px tile \(model "
                       r"field of view at the image's pixel size\)"):
        slide_map(model_file, path, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
