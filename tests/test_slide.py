"""`cellulib slide`: region reading (tifffile's zarr store) equals tifffile's full decode at every
pyramid level and for every TIFF layout it reads by region, missing tiles read as white glass, reads
from several threads agree, tissue tiles are found and scored exactly as the documented recipe on
the same pixels, background is skipped, damaged tiles give error rows, and the outputs are written
(synthetic pyramidal OME-TIFF, the real OpenSlide crop, an OpenSlide adapter)."""

import json
import sys
import types
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellulib import load_model, save_model
from cellulib.cli.commands import build_parser
from cellulib.data.synth import render_patch
from cellulib.files.imageio import DataError, to_rgb8
from cellulib.inference.slide import (
    SlideWarning,
    _thumbnail,
    open_slide,
    slide_map,
    tile_grid,
    tissue_mask,
)
from cellulib.models import networks


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
    model = networks.direct_model("resnet34").eval()
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
    args = build_parser().parse_args(argv)
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


def _rgba(h, w, seed):
    rng = np.random.default_rng(seed)
    rgb = cv2.resize(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8), (w, h))
    alpha = np.linspace(0, 255, w).astype(np.uint8)[None].repeat(h, 0)
    return np.dstack([rgb, alpha])


def _layouts(tmp_path):
    """One TIFF of each layout the region reader handles: name -> (path, level-0 pixels as
    ``to_rgb8`` converts a full decode)."""
    rgba = _rgba(300, 420, 7)
    rgb, grey = rgba[..., :3], rgba[..., 0]
    cases = {  # name: (tifffile.imwrite options, data written, the same pixels interleaved)
        "ycbcr_jpeg_tiles": ({"photometric": "ycbcr", "compression": "jpeg", "tile": (128, 128)},
                             rgb, None),  # lossy: compared with what tifffile decodes
        "rgba_tiles": ({"photometric": "rgb", "extrasamples": ["unassalpha"], "tile": (128, 128),
                        "compression": "zlib"}, rgba, rgba),
        "grey_alpha_strips": ({"photometric": "minisblack", "extrasamples": ["unassalpha"],
                               "rowsperstrip": 35}, rgba[..., [0, 3]], rgba[..., [0, 3]]),
        "rgb16_big_endian_tiles": ({"photometric": "rgb", "byteorder": ">", "tile": (64, 128),
                                    "compression": "zlib"}, rgb.astype(np.uint16) * 257, rgb),
        "planar_rgb_tiles": ({"photometric": "rgb", "planarconfig": "separate",
                              "tile": (128, 128)}, rgb.transpose(2, 0, 1), rgb),
        "grey8_tiles": ({"tile": (64, 64)}, grey, grey),
    }
    out = {}
    for name, (opts, data, pixels) in cases.items():
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, data, **opts)
        out[name] = (path, to_rgb8(tifffile.imread(path) if pixels is None else pixels, name))
    return out


def test_every_tiff_layout_reads_by_region_like_a_full_decode(tmp_path):
    for path, expected in _layouts(tmp_path).values():
        _check_regions(path, [expected], n=8)  # planar RGB too, read whole before zarr


def test_a_layout_not_read_by_region_is_read_whole(tmp_path):
    grey = _rgba(200, 300, 8)[..., 0]
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, grey // 16, photometric="palette", tile=(64, 64),
                     colormap=np.stack([np.arange(256) * 257] * 3).astype(np.uint16))
    with open_slide(path) as reader:
        assert reader.kind == "image" and reader.dims == [(300, 200)]
        assert reader.read_region(0, 10, 20, 30, 40).shape == (40, 30, 3)


def test_the_first_plane_of_a_multi_plane_tiff_with_a_warning(tmp_path):
    planes = np.stack([_rgba(200, 300, 9)[..., :3], _rgba(200, 300, 10)[..., :3]])
    path = tmp_path / "planes.tif"
    tifffile.imwrite(path, planes, photometric="rgb", tile=(64, 64))
    with pytest.warns(SlideWarning, match=r"planes\.tif: the image has several planes"):
        reader = open_slide(path)
    with reader:
        np.testing.assert_array_equal(reader.read_region(0, 37, 41, 150, 120),
                                      planes[0, 41:161, 37:187])


def _drop_tiles(path, level, indices):
    """Make tiles or strips of a level sparse: offset and byte count 0, as GDAL writes tiles
    that hold nothing."""
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.series[0].levels[level].pages[0]
        prefix = "Tile" if page.is_tiled else "Strip"
        for tag in (f"{prefix}Offsets", f"{prefix}ByteCounts"):
            values = list(page.tags[tag].value)
            for i in indices:
                values[i] = 0
            page.tags[tag].overwrite(values)


def test_missing_tiles_read_as_white_glass(synthetic_slide, tmp_path):
    path, _ = synthetic_slide
    sparse = tmp_path / "sparse.ome.tif"
    sparse.write_bytes(path.read_bytes())
    _drop_tiles(sparse, 0, [0, 7])  # level 0 (6 x 4 tiles of 256): x=0 y=0 and x=256 y=256
    _drop_tiles(sparse, 2, [0])  # the single tile of level 2 holds x < 256, y < 256
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    levels[0][:256, :256] = levels[0][256:512, 256:512] = 255
    levels[2][:256, :256] = 255
    _check_regions(sparse, levels)
    grey = _rgba(300, 400, 11)[..., 0].astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "grey16.tif", grey, tile=(128, 128), compression="zlib")
    _drop_tiles(tmp_path / "grey16.tif", 0, [1])
    with open_slide(tmp_path / "grey16.tif") as reader:
        region = reader.read_region(0, 100, 0, 200, 200)
        assert (region[:128, 28:156] == 255).all()  # 65535 -> 255
        np.testing.assert_array_equal(region[128:, :, 0], np.rint(grey[128:200, 100:300] / 257))


def test_regions_read_from_several_threads_equal_serial_reads(synthetic_slide):
    path, _ = synthetic_slide
    rng = np.random.default_rng(3)
    with open_slide(path) as reader:
        jobs = []
        for level, (width, height) in enumerate(reader.dims):
            for _ in range(20):
                w, h = int(rng.integers(1, min(width, 300))), int(rng.integers(1, min(height, 300)))
                jobs.append((level, int(rng.integers(0, width - w)), int(rng.integers(0, height - h)),
                             w, h))
        serial = [reader.read_region(*job) for job in jobs]
        with ThreadPoolExecutor(6) as pool:
            threaded = list(pool.map(lambda job: reader.read_region(*job), jobs * 3))
    for a, b in zip(serial * 3, threaded):
        np.testing.assert_array_equal(a, b)


def test_a_truncated_tiff_reads_its_whole_tiles_and_reports_the_rest(tmp_path):
    img = _rgba(600, 800, 12)[..., :3]
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, img, photometric="rgb", tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(full) as tif:
        page = tif.pages[0]
        cut = page.dataoffsets[14] + 50  # 7 tiles a row: rows 0-1 whole, the rest cut or gone
        assert page.offset < page.dataoffsets[0]  # tifffile writes the IFD first
    short = tmp_path / "short.tif"
    short.write_bytes(full.read_bytes()[:cut])
    with open_slide(short) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 800, 256), img[:256])
        with pytest.raises(Exception):  # noqa: B017 - the codec's error for a cut tile
            reader.read_region(0, 0, 256, 128, 128)
        with pytest.warns(SlideWarning, match=r"short\.tif: \d+ damaged region"):
            thumb, _ = _thumbnail(reader)
    np.testing.assert_array_equal(thumb[:256], img[:256])
    assert (thumb[256:] == 255).all()


def test_too_old_tifffile_or_zarr_is_named_instead_of_a_corrupt_file(tmp_path, monkeypatch):
    # seen on a GPU machine with tifffile 2024: its zarr-2 store lacks the axes attribute, which
    # surfaced as "corrupt, truncated or unreadable TIFF ('_ARRAY_DIMENSIONS')"
    import zarr

    path = tmp_path / "small.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb", tile=(32, 32))
    assert open_slide(path).dims == [(64, 64)]  # the installed versions read it
    monkeypatch.setattr(tifffile, "__version__", "2024.8.30")
    with pytest.raises(ImportError, match=r"tifffile >= 2025\.5\.26, found 2024\.8\.30"):
        open_slide(path)
    monkeypatch.undo()
    monkeypatch.setattr(zarr, "__version__", "2.18.3")
    with pytest.raises(ImportError, match=r"zarr >= 3\.1\.5, found 2\.18\.3: pip install"):
        open_slide(path)


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
