"""Stain shifts and normalisation (SPEC 8): shifts (cellulib.reporting.robustness) are deterministic for a seed
and of the stated strength (measured on a real H&E patch), and normalisation moves a real image's stain statistics to
the target's, checked with skimage's colour spaces and a second implementation of Macenko's vectors."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hed, rgb2lab

from cellulib.data import stain
from cellulib.data.stain import StainError, StainNormalizer, hed_perturb
from cellulib.reporting.robustness import SHIFTS, shift_image


@pytest.fixture(scope="module")
def patch(real_dir):
    from cellulib.files.imageio import read_image

    path = real_dir / "breastpathq_99788_1.tif"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return read_image(path)


def _tissue_od(img, mask):
    hed = rgb2hed(img)
    return hed[..., 0][mask].mean(), hed[..., 1][mask].mean()


@pytest.mark.parametrize("kind", SHIFTS)
def test_shifts_are_deterministic_and_zero_is_identity(patch, kind):
    import cv2

    a = shift_image(patch, kind, 0.6, seed=3)
    b = shift_image(patch, kind, 0.6, seed=3)
    np.testing.assert_array_equal(a, b)
    if kind == "scale":  # the same tissue in 2 ** 0.6 times the pixels
        assert a.dtype == np.uint8 and a.shape == (776, 776, 3)
        a = cv2.resize(a, patch.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert a.dtype == np.uint8 and a.shape == patch.shape
    assert np.abs(a.astype(int) - patch).mean() > 1.0, "a shift of strength 0.6 changes the image"
    np.testing.assert_array_equal(shift_image(patch, kind, 0, seed=3), patch)


def test_hed_perturbation_has_the_stated_strength(patch):
    h0, e0 = rgb2hed(patch)[..., 0], rgb2hed(patch)[..., 1]
    tissue = (h0 + e0) > 0.02
    out = hed_perturb(patch, h_scale=1.4, e_scale=0.7)
    h1, e1 = _tissue_od(out, tissue)
    # measured mean optical density ratio on tissue; uint8 rounding and clipping at 0/255 cost a
    # few percent
    assert h1 / h0[tissue].mean() == pytest.approx(1.4, rel=0.06)
    assert e1 / e0[tissue].mean() == pytest.approx(0.7, rel=0.06)
    # the background keeps its colour
    np.testing.assert_array_equal(out[~tissue], patch[~tissue])
    # the shift's signs come from the seed: two seeds differ, stronger moves further
    d = [np.abs(shift_image(patch, "hed", s, seed=0).astype(int) - patch).mean() for s in (0.3, 1)]
    assert d[0] < d[1]
    assert not np.array_equal(shift_image(patch, "hed", 1, seed=0), shift_image(patch, "hed", 1, seed=1))


def test_blur_jpeg_brightness_and_scale_strengths(patch):
    import cv2

    sharp = cv2.Laplacian(cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
    blurred = [cv2.Laplacian(cv2.cvtColor(shift_image(patch, "blur", s), cv2.COLOR_RGB2GRAY),
                             cv2.CV_64F).var() for s in (0.25, 1.0)]
    assert sharp > blurred[0] > blurred[1]
    # JPEG quality 95 - 85 * strength: quality 10 at strength 1 loses more than quality 74
    err = [np.abs(shift_image(patch, "jpeg", s).astype(int) - patch).mean() for s in (0.25, 1.0)]
    assert 0 < err[0] < err[1]
    # brightness/contrast: the mean moves by 0.4 * 255 * strength (up or down, by the seed), before
    # clipping at 0 and 255
    moved = abs(shift_image(patch, "brightness_contrast", 0.25, seed=0).mean() - patch.mean())
    assert moved == pytest.approx(0.1 * 255, rel=0.15)


def test_scale_resamples_the_whole_image():
    img = np.full((64, 64, 3), 255, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 6 ** 2] = (80, 40, 120)
    area = lambda im: int((im[..., 0] < 160).sum())  # noqa: E731
    big, small = shift_image(img, "scale", 1.0), shift_image(img, "scale", -1.0)
    assert big.shape == (128, 128, 3) and small.shape == (32, 32, 3)
    # a x2 scan of the same tissue: the nucleus covers four times the pixels, a x0.5 scan a quarter
    assert area(big) == pytest.approx(4 * area(img), rel=0.1)
    assert area(small) == pytest.approx(area(img) / 4, rel=0.15)
    assert shift_image(img, "scale", 0.5).shape == (91, 91, 3)


def test_bad_shift_arguments(patch):
    with pytest.raises(ValueError, match="unknown shift"):
        shift_image(patch, "fog", 0.5)
    with pytest.raises(ValueError, match="strength"):
        shift_image(patch, "blur", -0.5)
    with pytest.raises(StainError, match="uint8"):
        shift_image(patch.astype(np.float32), "blur", 0.5)


# -------------------------------------------------------------------------------------------------
# normalisation
# -------------------------------------------------------------------------------------------------
def test_macenko_vectors_match_torchstain(patch):
    # a second implementation of Macenko's stain-vector estimate (ours, used to check targets)
    # against the fitted torchstain normaliser, up to each vector's length
    norm = StainNormalizer("macenko").fit(patch)
    fitted = np.asarray(norm._impl.HERef)
    fitted = fitted / np.linalg.norm(fitted, axis=0, keepdims=True)
    np.testing.assert_allclose(stain._macenko_vectors(patch), fitted, atol=1e-6)


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalisation_moves_stain_statistics_to_the_target(patch, method):
    # the target: the same tissue stained differently (H x1.5, E x0.6)
    target = hed_perturb(patch, h_scale=1.5, e_scale=0.6)
    norm = StainNormalizer(method).fit(target, name="target.png")
    out = norm.normalize(patch)
    if method == "macenko":
        tissue = (rgb2hed(patch)[..., :2].sum(-1)) > 0.02
        before = np.array(_tissue_od(patch, tissue))
        goal = np.array(_tissue_od(target, tissue))
        after = np.array(_tissue_od(out, tissue))
        # Macenko matches its own fitted stain vectors, skimage measures with Ruifrok's fixed ones:
        # each stain moves towards the target, and the pair ends at under 40% of its distance
        assert np.all(np.abs(after - goal) < np.abs(before - goal)), (before, after, goal)
        assert np.linalg.norm(after - goal) < 0.4 * np.linalg.norm(before - goal)
    else:
        # Reinhard matches each LAB channel's mean and spread (skimage's LAB, not torchstain's)
        lab_t, lab_o, lab_p = (rgb2lab(x).reshape(-1, 3) for x in (target, out, patch))
        assert np.all(np.abs(lab_o.mean(0) - lab_t.mean(0)) < 0.3 * np.abs(lab_p.mean(0) - lab_t.mean(0)) + 1.0)
        np.testing.assert_allclose(lab_o.std(0), lab_t.std(0), rtol=0.15)
    # the fitted reference round-trips through a model file's metadata
    again = StainNormalizer.from_reference(norm.reference()).normalize(patch)
    np.testing.assert_array_equal(again, out)
    assert norm.reference()["source"] == "target.png"


def test_blank_and_non_he_targets_are_refused(tmp_path, patch):
    with pytest.raises(StainError, match="blank"):
        StainNormalizer("macenko").fit(np.full((64, 64, 3), 250, np.uint8), name="white.png")
    rng = np.random.default_rng(0)
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = rng.integers(60, 200, (64, 64))
    with pytest.raises(StainError, match="does not look like H&E"):
        StainNormalizer("reinhard").fit(blue, name="blue.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(StainError, match="broken.png"):
        StainNormalizer().fit(bad)
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        StainNormalizer("vahadane")
    # a blank patch to normalise is returned as it is
    white = np.full((64, 64, 3), 250, np.uint8)
    np.testing.assert_array_equal(StainNormalizer().fit(patch).normalize(white), white)


def test_real_images_pass_the_he_check(real_dir):
    from cellulib.files.imageio import read_image

    for name in ("breastpathq_99788_1.tif", "openslide_OS-1-detail.ome.tif", "amida13_example1.png"):
        path = real_dir / name
        if path.is_file():
            StainNormalizer("macenko").fit(read_image(path), name=name)  # no error


def test_greyscale_and_tiny_targets_are_refused(real_dir, patch):
    from cellulib.files.imageio import read_image

    # the real BreastPathQ patch turned grey: its tissue has one colour, so no H and no E
    img = read_image(real_dir / "breastpathq_99788_1.tif")
    grey = np.repeat(img.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)
    with pytest.raises(StainError, match="grey.png: does not look like H&E .*one colour"):
        StainNormalizer("macenko").fit(grey, name="grey.png")
    # one black pixel is all "tissue" but far too little of it: said so, not called blank
    with pytest.raises(StainError, match=r"dot.png: too small .*\(1 tissue pixels of 1x1; .* 500\)"):
        StainNormalizer("reinhard").fit(np.zeros((1, 1, 3), np.uint8), name="dot.png")
    # the synthetic H&E patch has two stains
    StainNormalizer("macenko").fit(patch, name="synthetic")


# -------------------------------------------------------------------------------------------------
# cellulib predict --stain-norm on the real images
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def direct_file(tmp_path_factory):
    import torch

    from cellulib import save_model
    from cellulib.models import networks

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "direct.pt"
    save_model(networks.direct_model("resnet34"), path,
               preprocess={"input_size": 64, "normalize": "minus_one_one"})
    return path


def test_predict_with_stain_normalisation_on_real_images(direct_file, real_dir, tmp_path, capsys):
    import json

    import pandas as pd

    from cellulib.cli import commands
    from cellulib.inference.predict import predict_images

    target = real_dir / "breastpathq_99788_1.tif"
    images = sorted(p for p in real_dir.iterdir() if p.suffix.lower() in (".tif", ".png"))
    if not target.is_file() or len(images) < 3:
        pytest.skip("real H&E images not found")
    out = tmp_path / "preds.csv"
    code = commands.main(["predict", "--model", str(direct_file), "--images", str(real_dir),
                     "--out", str(out), "--quiet", "--device", "cpu", "--stain-norm", "macenko",
                     "--stain-target", str(target)])
    assert code == 0, capsys.readouterr().err
    rows = pd.read_csv(out, keep_default_na=False)
    assert len(rows) == len(images) and (rows.error == "").all()
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["stain_norm"] == {"method": "macenko", "target": str(target)}
    norm = StainNormalizer("macenko").fit(target)
    again = predict_images(direct_file, real_dir, progress=False, device="cpu", stain_norm=norm)
    np.testing.assert_allclose(rows.cellularity, again.cellularity, atol=1e-6)
    plain = predict_images(direct_file, real_dir, progress=False, device="cpu")
    assert not np.allclose(plain.cellularity, again.cellularity, atol=1e-4)


def test_predict_bad_stain_target_leaves_earlier_output(direct_file, real_dir, tmp_path, capsys):
    from cellulib.cli import commands

    out = tmp_path / "preds.csv"
    out.write_text("path,cellularity,error\nearlier,0.5,\n")
    target = tmp_path / "unreadable.tif"
    target.write_bytes(b"II*\x00 not a tiff")
    code = commands.main(["predict", "--model", str(direct_file), "--images", str(real_dir),
                     "--out", str(out), "--stain-norm", "reinhard", "--stain-target", str(target)])
    assert code == 2 and str(target) in capsys.readouterr().err
    assert out.read_text() == "path,cellularity,error\nearlier,0.5,\n"


# -------------------------------------------------------------------------------------------------
# detection under a shift (scoring under shift: tests/test_robustness.py)
# -------------------------------------------------------------------------------------------------
def test_score_annotated_under_a_shift(brca_full_copy):
    import torch

    from cellulib.data.breastpathq import read_cells
    from cellulib.inference.detect import score_annotated
    from cellulib.models import networks

    torch.manual_seed(0)
    pair = (networks.seg_model("fpn"), {"family": "seg", "meta": {"params": {"downscale": 2}}})
    cells = read_cells(brca_full_copy)
    test = cells[cells.split == "test"]
    seen = []

    def blur(img, i):
        seen.append(i)
        return shift_image(img, "blur", 1.0)

    shifted = score_annotated(pair, test, progress=False, device="cpu", transform=blur)
    plain = score_annotated(pair, test, progress=False, device="cpu")
    assert seen == [0, 1]
    assert len(shifted.truth) == len(plain.truth)  # the dots do not move
    assert not shifted.pred[["x", "y"]].equals(plain.pred[["x", "y"]])


# -------------------------------------------------------------------------------------------------
# stain augmentation in training (the stain_augment setting)
# -------------------------------------------------------------------------------------------------
def test_hed_jitter_draws_its_stated_law_and_applies_hed_perturb(patch):
    import random

    import albumentations as A

    from cellulib.data.transforms import HEDJitter

    img = np.ascontiguousarray(patch[:96, :96])
    jitter = HEDJitter(scale=0.3, shift=0.03, p=1.0)
    tfm = A.Compose([jitter])
    for seed in range(5):
        tfm.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = tfm(image=img)["image"]
        # the same draws by hand: four uniforms in [-1, 1) from the transform's generator
        u = np.random.default_rng(seed).uniform(-1.0, 1.0, size=4)
        expected = hed_perturb(img, 1 + 0.3 * u[0], 1 + 0.3 * u[1], 0.03 * u[2], 0.03 * u[3])
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="HEDJitter"):
        HEDJitter(scale=1.5)


def test_stain_augment_setting_adds_the_jitter_to_training_only():
    from cellulib.data.transforms import HEDJitter, cellularity_transforms, seg_transforms

    def has_jitter(tfm):
        return any(isinstance(t, HEDJitter) for t in tfm.transforms)

    assert has_jitter(cellularity_transforms(96, train=True, seed=0, stain="hed"))
    assert has_jitter(seg_transforms(64, train=True, seed=0, stain="hed"))
    assert not has_jitter(cellularity_transforms(96, train=True, seed=0))
    assert not has_jitter(cellularity_transforms(96, train=False, seed=0, stain="hed"))
    with pytest.raises(ValueError, match="unknown stain augmentation 'macenko'"):
        cellularity_transforms(96, train=True, stain="macenko")


def test_training_reference_fits_a_mosaic_of_the_images(real_dir, tmp_path):
    from PIL import Image

    from cellulib.files.imageio import read_image

    path = real_dir / "breastpathq_99788_1.tif"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    img = read_image(path)
    # four quarters of one real patch: the mosaic is the patch resized, so Reinhard's LAB means
    # must be the patch's own (within resampling)
    quarters = []
    for k, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        Image.fromarray(img[y:y + 256, x:x + 256]).save(tmp_path / f"q{k}.png")
        quarters.append(tmp_path / f"q{k}.png")
    ref = stain.training_reference(quarters, tile=256)
    assert set(ref) == {"macenko", "reinhard"}
    direct = StainNormalizer("reinhard").fit(img).reference()
    np.testing.assert_allclose(ref["reinhard"]["means"], direct["means"], atol=0.05)
    assert stain.training_reference([]) == {"unavailable": "no training images"}
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(blank)
    assert "blank" in stain.training_reference([blank])["unavailable"]
