"""Synthetic H&E patches with known cellularity, written in the BreastPathQ layout (SPEC 1.1-1.3).

No real dataset can be downloaded where the book is built, so this generator is the embedded default
dataset: every chapter trains and evaluates on it, and one loader reads both it and the real
BreastPathQ data (Rakhlin et al. 2019, section 4.1, "Dataset").

A patch is built in optical-density space from a haematoxylin and an eosin stain vector (Macenko's
reference vectors, perturbed per slide) and holds five tissue compartments: tumour nests, normal ducts
with a lumen, collagenous stroma, fat and empty glass.  Four kinds of nuclei are drawn with distinct
size, shape and chromatin: malignant (large, pleomorphic, vesicular, crowded), normal epithelial
(small, regular, one or two layers around a lumen, plus flat myoepithelial nuclei), lymphocytes (small,
round, very dark) and fibroblasts (thin, elongated, along the collagen).  Truth cellularity is the area
of malignant cells (nucleus plus cytoplasm) divided by the tissue area (everything but glass, fat-cell
interiors, duct lumina and retraction clefts), the definition behind the BreastPathQ label (share of
the tumour bed occupied by malignant cells).  It is carried by the malignant cells and not by the
colour of the patch: stain intensity, fat, lymphocytic infiltrates, normal ducts and lobules and
stromal density are drawn independently of it.

Length scale: one pixel at ``scale=1`` is one pixel of a 512x512 BreastPathQ patch (malignant nuclei
about 15 px across, lymphocytes about 7 px).  ``size`` is therefore a field of view, not a zoom: a
256-pixel patch shows a quarter of the area of a 512-pixel one at the same magnification.  Pass
``scale=0.5`` to mimic the half-size copies of the real data.
"""
from __future__ import annotations

import io
import math
import numbers
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

#: Bumped whenever the rendering or the label law changes, so cached synthetic datasets are
#: regenerated (2: labels drawn from the law fitted to the real BreastPathQ labels, SPEC 1.5).
GENERATOR_VERSION = 2

__all__ = [
    "GENERATOR_VERSION",
    "load_real_examples",
    "compare_stains",
    "compare_nucleus_sizes",
    "SlideStyle",
    "SynthPatch",
    "sample_cellularity",
    "label_distance",
    "sample_slide_style",
    "render_patch",
    "make_breastpathq",
    "cell_xml",
    "hed_stats",
    "nucleus_sizes",
    "MALIGNANT_DESCRIPTIONS",
    "NORMAL_DESCRIPTIONS",
    "LYMPHOCYTE_DESCRIPTIONS",
]

# Stain optical-density vectors (log10 units, RGB order): Macenko et al. (2009) reference vectors.
# Macenko's estimate on the real BreastPathQ patch in data/real differs by at most 0.11 per entry.
_H_VECTOR = np.array([0.5626, 0.7201, 0.4062])
_E_VECTOR = np.array([0.2159, 0.8012, 0.5581])
# Red blood cells absorb green and blue but hardly red: a third, fixed "haemoglobin" vector.
_RBC_VECTOR = np.array([0.08, 0.78, 0.62])

MALIGNANT_DESCRIPTIONS = ("IDC", "ILC", "DCIS 2", "DCIS 3")
NORMAL_DESCRIPTIONS = ("normal", "UDH")
LYMPHOCYTE_DESCRIPTIONS = ("TIL-S", "TIL-E")

# Compartment codes of the internal layout map.
_WHITE, _STROMA, _TUMOUR, _DUCT, _FAT = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------------
# Random state, label sampler and slide appearance
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    """An integer argument >= minimum, or a ValueError that names the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(
        seed, (int, np.integer, np.random.SeedSequence)
    ):
        raise ValueError(f"seed must be an int, a SeedSequence or a numpy Generator, got {seed!r}")
    return np.random.default_rng(seed)


#: Label law of :func:`sample_cellularity` (SPEC 1.5): share of exact zeros in the real labels,
#: and the two Beta components of their positive part with the first one's share.
ZERO_SHARE = 0.28
LOW_SHARE = 0.61
LOW_BETA = (1.5, 4.0)
HIGH_BETA = (1.5, 0.6)


def sample_cellularity(n: int, seed=0) -> np.ndarray:
    """Draw target cellularities from a mixture fitted to the real BreastPathQ training labels.

    Paper section 4.1 and Figure 6 (cellularity score distribution); SPEC 1.5. The 2394 real
    training labels (``breastpathq_train_labels.csv``) hold 28 % exact zeros (patches without
    tumour); their positive part has a broad mass at low values and a second mode near 1. The
    mixture is `ZERO_SHARE` exact zeros and, for the rest, `LOW_SHARE` Beta(1.5, 4.0) and the
    remainder Beta(1.5, 0.6): a two-Beta maximum-likelihood fit to the 1724 positive real labels,
    rounded to one decimal. Its two-sample KS distance to the real labels is 0.05 on 200,000 draws
    rounded to 0.01 (the real labels are mostly multiples of 0.05, which a smooth law cannot copy).
    Used in chapter 1 (data exploration).

    Parameters
    ----------
    n : int
        Number of values.
    seed : int or numpy.random.Generator
        Seed or generator.

    Returns
    -------
    numpy.ndarray
        ``n`` floats in [0, 1].

    Examples
    --------
    >>> y = sample_cellularity(1000, seed=0)
    >>> bool(y.min() == 0.0 and y.max() <= 1.0 and 0.24 < np.mean(y == 0) < 0.32)
    True
    """
    n = _check_int("n", n, 0)
    rng = _as_rng(seed)
    kind = rng.choice(3, size=n, p=[ZERO_SHARE, (1 - ZERO_SHARE) * LOW_SHARE,
                                    (1 - ZERO_SHARE) * (1 - LOW_SHARE)])
    low = rng.beta(*LOW_BETA, size=n)
    high = rng.beta(*HIGH_BETA, size=n)
    return np.where(kind == 0, 0.0, np.where(kind == 1, low, high))


@dataclass(frozen=True)
class SlideStyle:
    """Appearance shared by all patches of one synthetic slide (staining, scanner, tumour grade).

    Real patches of one slide share their stain intensity, stain hue and tumour morphology; the
    generator draws one style per slide so that patches of a slide look alike and patient-level
    splits matter.  Used in chapter 1 (data exploration).
    """

    h_vector: np.ndarray
    e_vector: np.ndarray
    h_scale: float
    e_scale: float
    background: np.ndarray
    cell_spacing: float
    nucleus_radius: float
    pleomorphism: float
    blur: float
    tumour_type: str


def sample_slide_style(seed=0) -> SlideStyle:
    """Draw the appearance of one slide: stain vectors and intensities, background, tumour grade.

    Stain variation follows the spread seen between H&E laboratories (each stain vector perturbed by
    about 6 % per channel, haematoxylin intensity 0.65-1.45x, eosin 0.75-1.3x); it is independent
    of cellularity, so colour alone cannot give the label (SPEC 1.2).  The tumour grade (cell
    spacing, nucleus size, pleomorphism) and the malignant description written to the cell XML
    (IDC, ILC, DCIS 2, DCIS 3) are per slide too.  Used in chapter 1 (data exploration).

    Parameters
    ----------
    seed : int or numpy.random.Generator
        Seed or generator.

    Returns
    -------
    SlideStyle
    """
    rng = _as_rng(seed)

    def jitter(v, amount):
        v = v * np.exp(rng.normal(0.0, amount, 3))
        return v / np.linalg.norm(v)

    return SlideStyle(
        h_vector=jitter(_H_VECTOR, 0.06),
        e_vector=jitter(_E_VECTOR, 0.06),
        h_scale=float(rng.uniform(0.65, 1.45)),
        e_scale=float(rng.uniform(0.75, 1.3)),
        background=rng.uniform(238.0, 250.0) + rng.normal(0.0, 2.0, 3),
        cell_spacing=float(rng.uniform(23.0, 29.0)),
        nucleus_radius=float(rng.uniform(6.6, 8.2)),
        pleomorphism=float(rng.uniform(0.6, 1.4)),
        blur=float(rng.uniform(0.5, 0.85)),
        tumour_type=str(rng.choice(MALIGNANT_DESCRIPTIONS, p=[0.7, 0.1, 0.12, 0.08])),
    )


@dataclass
class SynthPatch:
    """One rendered patch with its exact truth.

    Attributes
    ----------
    img : numpy.ndarray
        (H, W, 3) uint8 RGB image.
    cellularity : float
        Exact truth: malignant-cell area / tissue area (SPEC 1.2).
    target : float
        The cellularity the layout aimed at (``cellularity`` is what was realised).
    counts : dict
        Number of nuclei per class: malignant, normal, lymphocyte, fibroblast.
    points : pandas.DataFrame
        Nucleus centres of the annotated classes: x, y (int pixels), cls (malignant | normal |
        lymphocyte) and description (the BreastPathQ string, e.g. IDC, normal, TIL-S).
    masks : dict or None
        Boolean (H, W) maps: tissue, malignant (malignant cells, nucleus plus cytoplasm), normal
        (normal epithelial cells), stroma, and the nuclei of each class (malignant_nuclei,
        normal_nuclei, lymphocyte_nuclei, fibroblast_nuclei).
    tissue_fraction : float
        Share of the patch covered by tissue.
    """

    img: np.ndarray
    cellularity: float
    target: float
    counts: dict
    points: pd.DataFrame
    masks: dict | None = field(default=None, repr=False)
    tissue_fraction: float = 1.0


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------
def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` pixels."""
    h, w = shape
    # Draw on a coarse grid and upsample: the same field as a wide blur at a fraction of the cost.
    step = max(1.0, sigma / 3.0)
    gh, gw = int(math.ceil(h / step)) + 4, int(math.ceil(w / step)) + 4
    # Uniform draws are cheaper than Gaussian ones; after the blur the field is Gaussian anyway.
    coarse = rng.random((gh, gw), dtype=np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT)
    field = cv2.resize(coarse, (int(round(gw * step)), int(round(gh * step))),
                       interpolation=cv2.INTER_CUBIC)
    off = int(2 * step)
    field = field[off:off + h, off:off + w]
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _hex_grid(rng, size, spacing, jitter) -> np.ndarray:
    """Jittered hexagonal grid of points (x, y) covering a size x size square."""
    dy = spacing * math.sqrt(3.0) / 2.0
    ox, oy = rng.uniform(0.0, spacing), rng.uniform(0.0, dy)
    ys = np.arange(oy - dy, size + dy, dy)
    xs = np.arange(ox - spacing, size + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2.0
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    pts = pts + rng.normal(0.0, jitter * spacing, pts.shape)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= size - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= size - 1)
    return pts[inside]


def _nearest_seed(pts: np.ndarray, size: int):
    """Index of the nearest seed and the distance to it, for every pixel (approximate Voronoi)."""
    if len(pts) == 0:
        return (np.full((size, size), -1, np.int32), np.full((size, size), np.inf, np.float32))
    src = np.ones((size, size), np.uint8)
    ix = np.clip(np.rint(pts[:, 0]).astype(int), 0, size - 1)
    iy = np.clip(np.rint(pts[:, 1]).astype(int), 0, size - 1)
    src[iy, ix] = 0
    dist, lab = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    # OpenCV numbers seed pixels in raster order; map its labels back to our seed indices.  When two
    # seeds share a pixel the later one wins, which only drops that seed's nucleus.
    lut = np.full(int(lab.max()) + 1, -1, np.int32)
    lut[lab[iy, ix]] = np.arange(len(pts), dtype=np.int32)
    return lut[lab], dist


def _boundaries(lab: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour carries a different label."""
    b = np.zeros(lab.shape, bool)
    b[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    b[:-1, :] |= lab[1:, :] != lab[:-1, :]
    return b


def _quantile_mask(field: np.ndarray, allowed: np.ndarray, n_pixels: int) -> np.ndarray:
    """The ``n_pixels`` allowed pixels with the highest field values."""
    out = np.zeros(field.shape, bool)
    idx = np.flatnonzero(allowed)
    if n_pixels <= 0 or len(idx) == 0:
        return out
    if n_pixels >= len(idx):
        out.flat[idx] = True
        return out
    vals = field.flat[idx]
    top = np.argpartition(vals, len(vals) - n_pixels)[len(vals) - n_pixels:]
    out.flat[idx[top]] = True
    return out


def _ellipse_nuclei(idx, owner, size, cx, cy, a, b, theta, harm_amp=None, harm_phase=None):
    """Normalised radius of each pixel in the (optionally irregular) ellipse of its owner nucleus.

    ``idx`` are flat pixel indices and ``owner`` the nucleus each belongs to.  Returns rr, which is
    <= 1 inside the outline; irregular outlines add a few Fourier harmonics to the radius, which is
    what makes malignant nuclei pleomorphic.
    """
    y, x = np.divmod(idx, size)
    dx = x - cx[owner]
    dy = y - cy[owner]
    c, s = np.cos(theta)[owner], np.sin(theta)[owner]
    u = (dx * c + dy * s) / a[owner]
    v = (-dx * s + dy * c) / b[owner]
    rho = np.hypot(u, v)
    if harm_amp is None:
        return rho
    phi = np.arctan2(v, u)
    outline = np.ones_like(rho)
    for k in range(harm_amp.shape[1]):
        outline += harm_amp[owner, k] * np.cos((k + 2) * phi + harm_phase[owner, k])
    return rho / outline


def _fibre_texture(rng, direction: np.ndarray, s: float, xx: np.ndarray,
                   yy: np.ndarray) -> np.ndarray:
    """Collagen-like streaks in [0, 1]: white noise smeared along a direction field.

    A line-integral convolution (straight segments of +-14 px along the local fibre direction)
    turns isotropic noise into long wavy fibres with pale gaps, the texture of breast stroma.
    """
    noise = cv2.GaussianBlur(rng.random(direction.shape, dtype=np.float32), (0, 0), 0.7 * s)
    dx, dy = np.cos(direction).astype(np.float32), np.sin(direction).astype(np.float32)
    acc = np.zeros_like(noise)
    steps = 7
    for k in range(-steps, steps + 1):
        w = np.float32(1.0 - abs(k) / (steps + 1.0))
        d = np.float32(2.0 * s * k)
        acc += w * cv2.remap(noise, xx + d * dx, yy + d * dy, cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
    acc = (acc - acc.mean()) / (acc.std() + 1e-6)
    return 1.0 / (1.0 + np.exp(-1.4 * acc))


def _ellipse_mask(size, cx, cy, a, b, angle_deg):
    """Filled ellipse as a boolean image, or None when it misses the image."""
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, ((float(cx), float(cy)), (2.0 * a, 2.0 * b), float(angle_deg)), 1, -1)
    m = m > 0
    return m if m.any() else None


def _smoothstep(lo, hi, x):
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------------------------------
# The renderer
# --------------------------------------------------------------------------------------------------
def render_patch(size: int = 512, cellularity: float | None = None, seed=0, *,
                 style: SlideStyle | None = None, scale: float = 1.0,
                 with_masks: bool = True) -> SynthPatch:
    """Render one synthetic H&E patch with exact cellularity, nucleus centres and class masks.

    Implements SPEC 1.2 (the synthetic stand-in for the BreastPathQ patches of paper section 4.1).
    The layout aims at ``cellularity`` (drawn from :func:`sample_cellularity` when None) by growing
    tumour nests over the right share of the tissue; the returned ``cellularity`` is the realised
    truth, recomputed from the masks, and usually within 0.02 of the target.  Used in chapter 1
    (data exploration) and, through :func:`make_breastpathq`, by every later chapter.

    Parameters
    ----------
    size : int
        Width and height in pixels (field of view; see the module notes on scale).
    cellularity : float or None
        Target cellularity in [0, 1]; 0 gives a patch without any malignant cell.
    seed : int or numpy.random.Generator
        Seed or generator; the same seed gives the same patch.
    style : SlideStyle or None
        Slide appearance; drawn from the seed when None.
    scale : float
        Pixels per BreastPathQ pixel (1 = the 512x512 patches, 0.5 = their half-size copies).
    with_masks : bool
        Return the boolean class masks in ``masks``.

    Returns
    -------
    SynthPatch

    Examples
    --------
    >>> p = render_patch(128, cellularity=0.5, seed=1)
    >>> p.img.shape, p.img.dtype
    ((128, 128, 3), dtype('uint8'))
    >>> bool(abs(p.cellularity - p.masks["malignant"].sum() / p.masks["tissue"].sum()) < 1e-12)
    True
    """
    size = _check_int("size", size, 32)
    if not (isinstance(scale, numbers.Real) and 0.2 <= scale <= 4.0):
        raise ValueError(f"scale must be a number in [0.2, 4], got {scale!r}")
    rng = _as_rng(seed)
    if style is None:
        style = sample_slide_style(rng)
    if cellularity is None:
        target = float(sample_cellularity(1, rng)[0])
    else:
        target = float(cellularity)
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"cellularity must lie in [0, 1], got {cellularity!r}")
    s = float(scale)
    area_factor = (size / (512.0 * s)) ** 2

    # Context of the patch, drawn before and independently of the target cellularity: these decide
    # the colour and haematoxylin content of everything that is not tumour.
    fat_frac = 0.0 if rng.random() < 0.7 else rng.uniform(0.05, 0.4)
    empty_frac = 0.0 if rng.random() < 0.85 else rng.uniform(0.05, 0.3)
    duct_rate = rng.uniform(0.0, 3.0) * area_factor
    lobule_rate = (rng.uniform(0.5, 2.0) if rng.random() < 0.35 else 0.0) * area_factor
    lymph_level = rng.choice([0.05, rng.uniform(0.1, 0.5), rng.uniform(0.5, 1.0)],
                             p=[0.3, 0.35, 0.35])
    agg_rate = (rng.uniform(0.0, 2.0) if rng.random() < 0.3 else 0.0) * area_factor
    fibro_density = rng.uniform(0.4, 1.6)
    stroma_e = rng.uniform(0.75, 1.25)
    h_jit, e_jit = np.exp(rng.normal(0.0, 0.06, 2))
    normal_desc = "UDH" if rng.random() < 0.2 else "normal"

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    comp = np.full((size, size), _STROMA, np.uint8)

    # Empty glass: an irregular region entering from one side of the patch.
    if empty_frac > 0:
        ang = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(ang) + yy * np.sin(ang) + 25 * s * _smooth_noise(rng, (size, size), 40 * s)
        empty = _quantile_mask(ramp, np.ones_like(ramp, bool), int(empty_frac * size * size))
        comp[empty] = _WHITE

    # Fat: big polygonal adipocytes with thin membranes; the cell interiors are not tissue.
    fat_membrane = np.zeros((size, size), bool)
    if fat_frac > 0:
        fat = _quantile_mask(_smooth_noise(rng, (size, size), 70 * s), comp == _STROMA,
                             int(fat_frac * size * size))
        adipo = _hex_grid(rng, size, rng.uniform(80, 130) * s, 0.18)
        lab, _ = _nearest_seed(adipo, size)
        edge = cv2.dilate(_boundaries(lab).astype(np.uint8), np.ones((2, 2), np.uint8)) > 0
        fat_membrane = fat & edge
        comp[fat & ~edge] = _WHITE
        comp[fat_membrane] = _FAT

    # Normal ducts: lumen ringed by one or two layers of epithelium and a myoepithelial layer.
    # Isolated ducts anywhere, and lobules: tight clusters of small acini (terminal duct lobular
    # units), which are as haematoxylin-rich as tumour but not malignant.
    proposals = []
    for _ in range(rng.poisson(duct_rate)):
        proposals.append((None, (5, 24), 0.3))
    for _ in range(rng.poisson(lobule_rate)):
        lob_c, lob_r = rng.uniform(0, size, 2), rng.uniform(45, 100) * s
        for _k in range(int(0.9 * (lob_r / (24 * s)) ** 2) + 2):
            proposals.append(((lob_c, lob_r), (4, 9), 0.0))
    lumen = np.zeros((size, size), bool)
    duct_masks, ducts = [], []
    for centre, (r_lo, r_hi), p_two in proposals:
        for _attempt in range(6):
            la = rng.uniform(r_lo, r_hi) * s
            lb = la * rng.uniform(0.5, 1.0)
            layers = 2 if rng.random() < p_two else 1
            thick = layers * 9.5 * s + 3.5 * s
            if centre is None:
                cx, cy = rng.uniform(0, size, 2)
            else:
                rad, phi = centre[1] * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
                cx, cy = centre[0][0] + rad * math.cos(phi), centre[0][1] + rad * math.sin(phi)
            ang = rng.uniform(0, 180)
            m = _ellipse_mask(size, cx, cy, la + thick, lb + thick, ang)
            if m is not None and (comp[m] == _STROMA).mean() > 0.97:
                break
        else:
            continue
        lm = _ellipse_mask(size, cx, cy, la, lb, ang)
        lm = np.zeros((size, size), bool) if lm is None else lm
        duct_masks.append((m, lm))
        ducts.append((cx, cy, la, lb, np.deg2rad(ang), layers))
        comp[m] = _DUCT
        comp[lm] = _WHITE
        lumen |= lm

    tissue_px = int((comp != _WHITE).sum())
    need = int(round(target * tissue_px))
    # Very high targets leave no room for ducts: drop them (their area turns back into candidates).
    while need > int((comp == _STROMA).sum()) and ducts:
        m, lm = duct_masks.pop()
        ducts.pop()
        comp[m] = _STROMA
        lumen &= ~lm
        tissue_px = int((comp != _WHITE).sum())
        need = int(round(target * tissue_px))

    # Tumour nests: a Voronoi tessellation of nest seeds, eroded from the septa inwards.  High
    # targets keep all but thin fibrous septa; low targets keep the cores of a few nests.
    nest_sp = rng.uniform(110, 210) * s
    nests = _hex_grid(rng, size, nest_sp, 0.3)
    if len(nests) == 0:
        nests = rng.uniform(0, size, (1, 2))
    nest_lab, _ = _nearest_seed(nests, size)
    # Bend the straight Voronoi edges into curved septa.
    wx = xx + 14 * s * _smooth_noise(rng, (size, size), 35 * s)
    wy = yy + 14 * s * _smooth_noise(rng, (size, size), 35 * s)
    nest_lab = cv2.remap(nest_lab.astype(np.float32), wx, wy, cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_REPLICATE).astype(np.int32)
    sept = (~_boundaries(nest_lab)).astype(np.uint8)
    d_sept = cv2.distanceTransform(sept, cv2.DIST_L2, 5)
    # Per-nest offsets pick which nests are tumour when few are needed; they must fade at high
    # targets, where the stroma left over should be the septa between all nests.
    nest_bias = rng.normal(0.0, 0.05 + 0.5 * (1 - target), len(nests)).astype(np.float32)
    wiggle = 0.03 + rng.uniform(0.05, 0.35) * (1 - target)
    nest_field = (np.minimum(d_sept / (0.25 * nest_sp), 1.0) + nest_bias[nest_lab]
                  + wiggle * _smooth_noise(rng, (size, size), 24 * s))
    tumour = _quantile_mask(nest_field, comp == _STROMA, need)

    # Every tumour component must hold at least one cell; crumbs smaller than about 0.4 of a cell
    # go back to stroma.
    cell_sp = style.cell_spacing * rng.uniform(0.93, 1.07) * s
    n_comp, comp_lab, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8), 8)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < 0.35 * cell_sp ** 2) + 1
    if len(small):
        tumour &= ~np.isin(comp_lab, small)
    comp[tumour] = _TUMOUR

    # Retraction clefts: thin white gaps between some nests and the stroma, as in fixed tissue.
    if tumour.any() and rng.random() < 0.5:
        ring = cv2.dilate(tumour.astype(np.uint8), np.ones((3, 3), np.uint8),
                          iterations=max(1, int(round(2 * s)))) > 0
        ring &= (comp == _STROMA) & (_smooth_noise(rng, (size, size), 30 * s) > 0.6)
        comp[ring] = _WHITE

    stroma = comp == _STROMA

    # ---------------------------------------------------------------- malignant cells
    mal_seeds = _hex_grid(rng, size, cell_sp, 0.17)
    if len(mal_seeds):
        mi = np.clip(np.rint(mal_seeds).astype(int), 0, size - 1)
        mal_seeds = mal_seeds[tumour[mi[:, 1], mi[:, 0]]]
    if tumour.any():
        n_comp, comp_lab, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8), 8)
        mi = np.clip(np.rint(mal_seeds).astype(int), 0, size - 1)
        seeded = np.zeros(n_comp, bool)
        seeded[comp_lab[mi[:, 1], mi[:, 0]]] = True
        extra = []
        dt = cv2.distanceTransform(tumour.astype(np.uint8), cv2.DIST_L2, 3)
        for c in np.flatnonzero(~seeded[1:]) + 1:
            x0, y0, w0, h0 = stats[c, :4]
            sub = np.where(comp_lab[y0:y0 + h0, x0:x0 + w0] == c, dt[y0:y0 + h0, x0:x0 + w0], -1)
            py, px = np.unravel_index(int(np.argmax(sub)), sub.shape)
            extra.append((x0 + px, y0 + py))
        if extra:
            mal_seeds = np.concatenate([mal_seeds.reshape(-1, 2), np.array(extra, float)])
    n_mal = len(mal_seeds)
    pleo = style.pleomorphism
    r0 = style.nucleus_radius * s * np.exp(rng.normal(0.0, 0.14 * pleo, n_mal))
    aspect = 1.12 + np.minimum(np.abs(rng.normal(0.0, 0.28 * pleo, n_mal)), 0.9)
    m_a, m_b = r0 * np.sqrt(aspect), r0 / np.sqrt(aspect)
    m_theta = rng.uniform(0, np.pi, n_mal)
    m_cx = mal_seeds[:, 0] + rng.normal(0, 1.2 * s, n_mal) if n_mal else np.zeros(0)
    m_cy = mal_seeds[:, 1] + rng.normal(0, 1.2 * s, n_mal) if n_mal else np.zeros(0)
    harm_amp = rng.normal(0.0, 0.05 * pleo, (n_mal, 3))
    harm_phase = rng.uniform(0, 2 * np.pi, (n_mal, 3))
    m_h = np.exp(rng.normal(0.0, 0.18, n_mal))
    cell_tone = np.exp(rng.normal(0.0, 0.1, n_mal)).astype(np.float32)
    # Prominent nucleoli: one per nucleus (sometimes none), off-centre.
    nuc_ang = rng.uniform(0, 2 * np.pi, n_mal)
    nuc_off = rng.uniform(0.0, 0.4, n_mal) * r0
    nl_x, nl_y = m_cx + nuc_off * np.cos(nuc_ang), m_cy + nuc_off * np.sin(nuc_ang)
    nl_r = rng.uniform(1.1, 2.0, n_mal) * s * (rng.random(n_mal) < 0.75)

    mal_lab, mal_d = _nearest_seed(mal_seeds, size)
    # Only pixels near a seed can lie in its nucleus; skip the rest of the cytoplasm.
    reach = float((m_a * (1 + np.abs(harm_amp).sum(1))).max()) + 5 * s if n_mal else 0.0
    t_idx = np.flatnonzero(tumour & (mal_d <= reach))
    mal_nuc = np.zeros((size, size), bool)
    mal_rr = np.zeros((size, size), np.float32)
    nucleolus = np.zeros((size, size), bool)
    if n_mal and len(t_idx):
        own = mal_lab.flat[t_idx]
        ok = own >= 0
        t_idx, own = t_idx[ok], own[ok]
        rr = _ellipse_nuclei(t_idx, own, size, m_cx, m_cy, m_a, m_b, m_theta, harm_amp, harm_phase)
        ins = rr <= 1.0
        mal_nuc.flat[t_idx[ins]] = True
        mal_rr.flat[t_idx[ins]] = rr[ins]
        y, x = np.divmod(t_idx[ins], size)
        o = own[ins]
        nucleolus.flat[t_idx[ins][np.hypot(x - nl_x[o], y - nl_y[o]) <= nl_r[o]]] = True
        mal_count = np.bincount(o, minlength=n_mal)
    else:
        mal_count = np.zeros(n_mal, int)
    cell_edges = _boundaries(mal_lab) & tumour

    # ---------------------------------------------------------------- normal ducts
    seeds, kinds = [], []
    for cx, cy, la, lb, ang, layers in ducts:
        ca, sa = math.cos(ang), math.sin(ang)
        rings = [(k + 0.5) * 9.5 * s for k in range(layers)] + [layers * 9.5 * s + 1.7 * s]
        for k, off in enumerate(rings):
            myo = k == len(rings) - 1
            ea, eb = la + off, lb + off
            perim = math.pi * (3 * (ea + eb) - math.sqrt((3 * ea + eb) * (ea + 3 * eb)))
            n = max(4, int(perim / ((24.0 if myo else 9.0) * s)))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            t = t + rng.normal(0, 0.15 / n * 2 * np.pi, n)
            px, py = ea * np.cos(t), eb * np.sin(t)
            # Outline normal direction: luminal nuclei point to the lumen, myoepithelial ones lie flat.
            nx, ny = np.cos(t) / ea, np.sin(t) / eb
            norm_ang = np.arctan2(nx * sa + ny * ca, nx * ca - ny * sa)
            seeds.append(np.stack([cx + px * ca - py * sa, cy + px * sa + py * ca,
                                   norm_ang + (np.pi / 2 if myo else 0.0)], 1))
            kinds.append(np.full(n, myo))
    if seeds:
        nseeds = np.concatenate(seeds)
        nmyo = np.concatenate(kinds)
        keep = ((nseeds[:, 0] >= 0) & (nseeds[:, 0] <= size - 1) & (nseeds[:, 1] >= 0)
                & (nseeds[:, 1] <= size - 1))
        nseeds, nmyo = nseeds[keep], nmyo[keep]
    else:
        nseeds, nmyo = np.zeros((0, 3)), np.zeros(0, bool)
    n_nrm = len(nseeds)
    n_a = np.where(nmyo, rng.uniform(5.5, 7.0, n_nrm), rng.uniform(4.6, 5.6, n_nrm)) * s
    n_b = np.where(nmyo, rng.uniform(1.8, 2.4, n_nrm), rng.uniform(3.6, 4.4, n_nrm)) * s
    nrm_lab, _ = _nearest_seed(nseeds[:, :2], size)
    d_idx = np.flatnonzero(comp == _DUCT)
    nrm_nuc = np.zeros((size, size), bool)
    nrm_count = np.zeros(n_nrm, int)
    myo_img = np.zeros((size, size), bool)
    if n_nrm and len(d_idx):
        own = nrm_lab.flat[d_idx]
        rr = _ellipse_nuclei(d_idx, own, size, nseeds[:, 0], nseeds[:, 1], n_a, n_b, nseeds[:, 2])
        ins = rr <= 1.0
        nrm_nuc.flat[d_idx[ins]] = True
        myo_img.flat[d_idx[ins]] = nmyo[own[ins]]
        nrm_count = np.bincount(own[ins], minlength=n_nrm)

    # ---------------------------------------------------------------- stroma texture
    struct = (comp == _TUMOUR) | (comp == _DUCT) | (comp == _FAT)
    if struct.any():
        d_struct = cv2.distanceTransform((~struct).astype(np.uint8), cv2.DIST_L2, 5)
        d_struct = np.minimum(d_struct, 70 * s)
    else:
        d_struct = np.zeros((size, size), np.float32)
    fang = rng.uniform(0, np.pi)
    # Collagen runs along the isolines of this phase: around nests and ducts, else in one direction.
    phase = (0.9 * d_struct + 1.0 * (xx * np.cos(fang) + yy * np.sin(fang))
             + 25 * s * _smooth_noise(rng, (size, size), 70 * s))
    gy, gx = np.gradient(cv2.GaussianBlur(phase, (0, 0), 3 * s))
    fibre_dir = np.arctan2(gy, gx) + np.pi / 2 + 0.3 * _smooth_noise(rng, (size, size), 10 * s)
    fibres = _fibre_texture(rng, fibre_dir, s, xx, yy)

    # ---------------------------------------------------------------- lymphocytes
    dens = lymph_level * np.clip(0.15 + 0.35 * _smooth_noise(rng, (size, size), 30 * s), 0.0, 1.0)
    for _ in range(rng.poisson(agg_rate)):
        ax, ay = rng.uniform(0, size, 2)
        rad = rng.uniform(18, 55) * s
        x0, x1 = int(max(0, ax - 3 * rad)), int(min(size, ax + 3 * rad + 1))
        y0, y1 = int(max(0, ay - 3 * rad)), int(min(size, ay + 3 * rad + 1))
        if x0 < x1 and y0 < y1:
            bump = np.exp(-((xx[y0:y1, x0:x1] - ax) ** 2 + (yy[y0:y1, x0:x1] - ay) ** 2)
                          / (2 * rad ** 2))
            dens[y0:y1, x0:x1] = np.maximum(dens[y0:y1, x0:x1], 0.9 * bump)
    lym = _hex_grid(rng, size, 8.6 * s, 0.12)
    if len(lym):
        li = np.clip(np.rint(lym).astype(int), 0, size - 1)
        where = comp[li[:, 1], li[:, 0]]
        p_acc = np.where(where == _STROMA, dens[li[:, 1], li[:, 0]],
                         np.where(where == _TUMOUR, 0.012 * lymph_level, 0.0))
        acc = rng.random(len(lym)) < p_acc
        lym, lym_in_tumour = lym[acc], (where == _TUMOUR)[acc]
    else:
        lym_in_tumour = np.zeros(0, bool)
    n_lym = len(lym)
    l_r = rng.uniform(3.2, 3.9, n_lym) * s
    lym_lab, lym_d = _nearest_seed(lym, size)
    lym_cell = np.zeros((size, size), bool)
    lym_nuc = np.zeros((size, size), bool)
    if n_lym:
        # Exact distances to the owning seed: the chamfer distance would draw square lymphocytes.
        near = np.flatnonzero(lym_d <= 4.0 * s + 3.0)
        own = lym_lab.flat[near]
        yq, xq = np.divmod(near, size)
        dist = np.hypot(xq - lym[own, 0], yq - lym[own, 1])
        lym_cell.flat[near[dist <= l_r[own] + 1.2 * s]] = True
        lym_nuc.flat[near[dist <= l_r[own]]] = True
    lym_cell &= comp != _WHITE
    lym_nuc &= comp != _WHITE

    # ---------------------------------------------------------------- fibroblasts
    fib = _hex_grid(rng, size, 20 * s, 0.3)
    if len(fib):
        fi = np.clip(np.rint(fib).astype(int), 0, size - 1)
        # Sparse in open stroma, crowded in the thin septa between nests (as in the real patch).
        p_fib = np.where(d_struct[fi[:, 1], fi[:, 0]] < 5 * s, 0.5, 0.25 * fibro_density)
        fib = fib[stroma[fi[:, 1], fi[:, 0]] & ~lym_cell[fi[:, 1], fi[:, 0]]
                  & (rng.random(len(fib)) < p_fib)]
    n_fib = len(fib)
    fi = np.clip(np.rint(fib).astype(int), 0, size - 1)
    f_theta = fibre_dir[fi[:, 1], fi[:, 0]]
    f_a = rng.uniform(6.5, 10.0, n_fib) * s
    f_b = rng.uniform(1.6, 2.4, n_fib) * s
    fib_lab, fib_d = _nearest_seed(fib, size)
    s_idx = np.flatnonzero(stroma & (fib_d <= 11 * s) & ~lym_cell)
    fib_nuc = np.zeros((size, size), bool)
    if n_fib and len(s_idx):
        own = fib_lab.flat[s_idx]
        rr = _ellipse_nuclei(s_idx, own, size, fib[:, 0], fib[:, 1], f_a, f_b, f_theta)
        fib_nuc.flat[s_idx[rr <= 1.0]] = True
        fib_count = np.bincount(own[rr <= 1.0], minlength=n_fib)
    else:
        fib_count = np.zeros(n_fib, int)

    # Red blood cells in a few capillaries.
    rbc = np.zeros((size, size), np.uint8)
    for _ in range(rng.poisson(1.2 * area_factor)):
        x0, y0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        for k in range(int(rng.integers(2, 9))):
            cx = x0 + k * 6 * s * math.cos(ang) + rng.normal(0, 1.5 * s)
            cy = y0 + k * 6 * s * math.sin(ang) + rng.normal(0, 1.5 * s)
            cv2.circle(rbc, (int(round(cx)), int(round(cy))), max(1, int(round(3.2 * s))), 1, -1)
    rbc = (rbc > 0) & stroma & ~lym_cell & ~fib_nuc

    # ---------------------------------------------------------------- truth
    malignant = tumour & ~lym_cell & (comp != _WHITE)
    tissue = comp != _WHITE
    mal_nuc &= malignant
    nrm_nuc &= ~lym_cell
    n_tissue = int(tissue.sum())
    realised = float(malignant.sum() / n_tissue) if n_tissue else 0.0

    # ---------------------------------------------------------------- optical density
    fine = _smooth_noise(rng, (size, size), 0.8 * s)
    grain = _smooth_noise(rng, (size, size), 1.6 * s)
    f32 = np.float32
    tm, du, fm = comp == _TUMOUR, comp == _DUCT, comp == _FAT
    # Whole-array arithmetic selected with np.where is several times faster than masked
    # gather/scatter on these sizes.  Background glass first, then tissue, then nuclei on top.
    cE = np.full((size, size), 0.012, f32)
    cH = np.full((size, size), 0.004, f32)
    cE = np.where(lumen, f32(0.05) + f32(0.02) * grain, cE)  # faint secretion in lumina
    # Collagen is packed densest in the septa hugging nests and ducts.
    packed = np.exp(-d_struct / f32(5.0 * s)) if struct.any() else f32(0.0)
    cE = np.where(stroma, f32(stroma_e) * (f32(0.05) + f32(0.4) * fibres + f32(0.15) * packed)
                  * (f32(1) + f32(0.08) * fine), cE)
    cH = np.where(stroma, f32(0.035) + f32(0.012) * grain, cH)
    tone = cell_tone[np.maximum(mal_lab, 0)] if n_mal else f32(1.0)
    cE = np.where(tm, f32(0.19) * tone * (f32(1) + f32(0.07) * grain + f32(0.12) * fine), cE)
    cH = np.where(tm, f32(0.09) * tone * (f32(1) + f32(0.2) * grain), cH)
    cE += f32(0.05) * cell_edges
    cH += f32(0.02) * cell_edges
    cE = np.where(du, f32(0.2) * (f32(1) + f32(0.15) * grain), cE)
    cH = np.where(du, f32(0.05), cH)
    cE = np.where(fm, f32(0.33), cE)
    cH = np.where(fm, f32(0.03), cH)
    clumps = np.clip(fine - f32(0.1), 0.0, 1.5)
    if n_mal and mal_nuc.any():
        m_h_img = m_h.astype(f32)[np.maximum(mal_lab, 0)]
        rim = _smoothstep(f32(0.6), f32(1.0), mal_rr)
        cH = np.where(mal_nuc, f32(0.43) * m_h_img * (f32(0.45) + f32(0.6) * rim
                                                      + f32(0.7) * clumps), cH)
        cE = np.where(mal_nuc, f32(0.16), cE)
        cH += f32(0.25) * nucleolus
        cE += f32(0.3) * nucleolus
    cH = np.where(nrm_nuc, np.where(myo_img, f32(0.55), f32(0.5)) * (f32(1) + f32(0.2) * clumps),
                  cH)
    cE = np.where(nrm_nuc, f32(0.1), cE)
    cH = np.where(fib_nuc, f32(0.75) * (f32(1) + f32(0.1) * fine), cH)
    cE = np.where(fib_nuc, f32(0.12), cE)
    rim_cyto = lym_cell & ~lym_nuc
    cE = np.where(rim_cyto, f32(0.12), cE)
    cH = np.where(rim_cyto, f32(0.08), cH)
    cH = np.where(lym_nuc, f32(0.8) * (f32(1) + f32(0.08) * fine), cH)
    cE = np.where(lym_nuc, f32(0.15), cE)
    cE = np.where(rbc, f32(0.15), cE)
    cH = np.where(rbc, f32(0.02), cH)
    cR = f32(0.75) * rbc

    # Beer-Lambert: I = I0 10^-(cH h + cE e + cR r), channel by channel (2-D arrays are much
    # faster than broadcasting over a trailing axis of 3).
    cH *= f32(style.h_scale * h_jit)
    cE *= f32(style.e_scale * e_jit)
    ln10 = f32(-math.log(10.0))
    channels = []
    for c in range(3):
        od = (cH * f32(style.h_vector[c]) + cE * f32(style.e_vector[c])
              + cR * f32(_RBC_VECTOR[c]))
        channels.append(f32(style.background[c]) * np.exp(od * ln10))
    rgb = cv2.GaussianBlur(cv2.merge(channels), (0, 0), style.blur * s)
    # Sensor noise: a sum of two uniforms (triangular, sd 1.4 grey levels) is 4x cheaper to draw
    # than Gaussian noise and indistinguishable at this amplitude.
    rgb += f32(3.5) * (rng.random(rgb.shape, dtype=f32) - rng.random(rgb.shape, dtype=f32))
    img = np.clip(rgb + f32(0.5), 0, 255).astype(np.uint8)

    # ---------------------------------------------------------------- annotations
    rows = []
    mal_keep = mal_count > 0
    desc_mal = style.tumour_type
    for x, y in zip(m_cx[mal_keep], m_cy[mal_keep]):
        rows.append((x, y, "malignant", desc_mal))
    nrm_keep = nrm_count > 0
    for x, y in nseeds[nrm_keep, :2]:
        rows.append((x, y, "normal", normal_desc))
    lym_keep = np.zeros(n_lym, bool)
    if n_lym:
        lym_keep[np.unique(lym_lab[lym_nuc])] = True
    for (x, y), intra in zip(lym[lym_keep], lym_in_tumour[lym_keep]):
        rows.append((x, y, "lymphocyte", "TIL-E" if intra else "TIL-S"))
    points = pd.DataFrame(rows, columns=["x", "y", "cls", "description"])
    points["x"] = np.clip(np.rint(points["x"].to_numpy(float)), 0, size - 1).astype(int)
    points["y"] = np.clip(np.rint(points["y"].to_numpy(float)), 0, size - 1).astype(int)
    counts = {"malignant": int(mal_keep.sum()), "normal": int(nrm_keep.sum()),
              "lymphocyte": int(lym_keep.sum()), "fibroblast": int((fib_count > 0).sum())}
    masks = None
    if with_masks:
        masks = {
            "tissue": tissue,
            "malignant": malignant,
            "normal": (comp == _DUCT) & ~lym_cell,
            "stroma": stroma,
            "malignant_nuclei": mal_nuc,
            "normal_nuclei": nrm_nuc,
            "lymphocyte_nuclei": lym_nuc,
            "fibroblast_nuclei": fib_nuc,
        }
    return SynthPatch(img=img, cellularity=realised, target=target, counts=counts, points=points,
                      masks=masks, tissue_fraction=n_tissue / float(size * size))


# --------------------------------------------------------------------------------------------------
# Measurements used to compare synthetic and real patches
# --------------------------------------------------------------------------------------------------
def _as_rgb(img, name="img") -> np.ndarray:
    """Validate an image array and return it as (H, W, 3) uint8 RGB (alpha dropped, grey expanded)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0 and np.nanmin(arr) >= 0:
            arr = np.rint(arr * 255.0)
        elif np.nanmin(arr) < 0 or np.nanmax(arr) > 255:
            raise ValueError(f"{name}: pixel values must lie in [0, 255] (or [0, 1] for floats)")
        arr = arr.astype(np.uint8)
    return arr


def hed_stats(img, mask=None) -> dict:
    """Mean and standard deviation of the H, E and D optical densities of an RGB image.

    Colour deconvolution of Ruifrok & Johnston (2001) as implemented by
    :func:`skimage.color.rgb2hed`; used to check that synthetic patches have the stain colours of
    the real BreastPathQ patches (SPEC 1.2, 1.3).  Used in chapter 1 (data exploration).

    Parameters
    ----------
    img : array_like
        (H, W, 3) RGB image, uint8 (or float in [0, 1]); an alpha channel is ignored.
    mask : array_like of bool, optional
        (H, W) pixels to include; all when None.

    Returns
    -------
    dict
        ``H_mean, H_std, E_mean, E_std, D_mean, D_std`` (skimage's HED units).

    Examples
    --------
    >>> white = np.full((8, 8, 3), 255, np.uint8)
    >>> hed_stats(white)["H_mean"] == 0.0
    True
    """
    from skimage.color import rgb2hed

    rgb = _as_rgb(img)
    hed = rgb2hed(rgb)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask: shape {mask.shape} does not match the image {rgb.shape[:2]}")
        if not mask.any():
            raise ValueError("mask: selects no pixel")
        hed = hed[mask]
    else:
        hed = hed.reshape(-1, 3)
    out = {}
    for k, name in enumerate("HED"):
        out[f"{name}_mean"] = float(hed[:, k].mean())
        out[f"{name}_std"] = float(hed[:, k].std())
    return out


def nucleus_sizes(img, sigma: float = 1.0, min_area: int = 20) -> np.ndarray:
    """Equivalent diameters (pixels) of the nuclei found by thresholding the haematoxylin channel.

    A deliberately simple, method-agnostic measurement for comparing synthetic with real patches:
    haematoxylin optical density (skimage ``rgb2hed``), Gaussian smoothing, Otsu threshold, holes
    filled (vesicular nuclei have pale centres), a one-pixel opening, touching nuclei split by a
    distance-transform watershed, objects under ``min_area`` pixels dropped.  The equivalent
    diameter is sqrt(4 area / pi).  Used in chapter 1 (data exploration).

    Parameters
    ----------
    img : array_like
        (H, W, 3) RGB image.
    sigma : float
        Gaussian smoothing of the haematoxylin channel, pixels.
    min_area : int
        Smallest object kept, pixels.

    Returns
    -------
    numpy.ndarray
        One equivalent diameter per nucleus (float, pixels); empty when none is found.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    rgb = _as_rgb(img)
    h = rgb2hed(rgb)[..., 0].astype(np.float32)
    h = cv2.GaussianBlur(h, (0, 0), sigma) if sigma > 0 else h
    if float(h.max() - h.min()) < 1e-6:
        return np.zeros(0)
    mask = h > threshold_otsu(h)
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, iterations=1)
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    comp, _ = ndi.label(mask)
    peaks = peak_local_max(cv2.GaussianBlur(dist, (0, 0), 1.0), min_distance=4, labels=comp,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (rare, flat plateaus) keep their own label.
    orphan = mask & ~np.isin(comp, np.unique(comp[markers > 0]))
    markers[orphan] = comp[orphan] + len(peaks)
    lab = watershed(-dist, markers, mask=mask)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= min_area]
    return np.sqrt(4.0 * areas / np.pi)


# --------------------------------------------------------------------------------------------------
# Writing the BreastPathQ layout
# --------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file and os.replace, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tiff_bytes(img: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    # Uncompressed, no metadata: the same layout as the real BreastPathQ patches, and byte-identical
    # on every run (no timestamps).
    tifffile.imwrite(buf, img, photometric="rgb", metadata=None)
    return buf.getvalue()


def _csv_bytes(df: pd.DataFrame, float_format: str | None = None) -> bytes:
    return df.to_csv(index=False, float_format=float_format, lineterminator="\n").encode()


def cell_xml(identifier: str, points: pd.DataFrame, first_region: int = 1) -> str:
    """PathCore Session Printer XML with one point graphic per description (SPEC 1.1).

    The format of the BreastPathQ ``cells`` annotations (paper section 4.1: X, Y coordinates of
    lymphocytes, malignant and normal epithelial nuclei in 153 patches).  Used in chapter 2 (weak
    segmentation) through the dataset written by :func:`make_breastpathq`.

    Parameters
    ----------
    identifier : str
        Image file name, e.g. ``"17_Region 60_crop.tif"``.
    points : pandas.DataFrame
        Columns x, y (pixels) and description.
    first_region : int
        Number of the first graphic (``name="Region N"``); later groups count up.

    Returns
    -------
    str
        The XML document.
    """
    session = ET.Element("session", software="PathCore Session Printer")
    image = ET.SubElement(session, "image", identifier=identifier)
    overlays = ET.SubElement(image, "overlays")
    for k, (desc, grp) in enumerate(points.groupby("description", sort=True)):
        graphic = ET.SubElement(overlays, "graphic", type="point", name=f"Region {first_region + k}",
                                description=str(desc))
        plist = ET.SubElement(graphic, "point-list")
        for x, y in zip(grp["x"].to_numpy(), grp["y"].to_numpy()):
            ET.SubElement(plist, "point").text = f"{int(x)},{int(y)}"
    ET.indent(session, space="  ")
    return ET.tostring(session, encoding="unicode") + "\n"


def _slide_plan(rng, n_patches: int, ids: np.ndarray):
    """Assign patches to slides (about 12 per slide, 2 at least when possible, 64 at most)."""
    if n_patches == 0:
        return np.zeros(0, int), np.zeros(0, int), 0
    n_slides = int(min(n_patches, 64, max(2, math.ceil(n_patches / 12))))
    slide_of = rng.permutation(np.arange(n_patches) % n_slides)
    rid = np.zeros(n_patches, int)
    for k in range(n_slides):
        members = np.flatnonzero(slide_of == k)
        rid[members] = np.arange(1, len(members) + 1)
    return ids[:n_slides][slide_of], rid, n_slides


def make_breastpathq(root, n_train: int, n_val: int, n_cells: int, size: int = 512, seed: int = 0,
                     label_noise: float = 0.0, progress: bool = True, *,
                     scale: float = 1.0) -> Path:
    """Write a synthetic BreastPathQ dataset (SPEC 1.1 layout) with exact truth beside it.

    SPEC 1.2: the embedded default dataset of the book, standing in for the BreastPathQ data of
    paper section 4.1.  Writes ``ROOT/datasets/{train,validation}/{slide}_{rid}.tif``,
    ``train_labels.csv`` and ``val_labels.csv`` (``slide,rid,y``; y is the truth plus optional
    Gaussian rater noise, clipped to [0, 1] and rounded to 0.01), the ``cells`` crops with their
    PathCore XML, ``ROOT/patient_ids.csv`` and ``ROOT/truth.csv`` (split, slide, rid, exact
    cellularity, target, label written, nuclei per class, tissue fraction).

    Slides get 5-digit ids, patches of a slide share its :class:`SlideStyle`, and each patient owns
    one to three slides.  Validation patches come from held-out slides of held-out patients (in the
    real challenge data the split is not documented at slide level; held-out slides make the
    validation score an honest estimate for new slides).  Every file is written atomically; the
    same arguments give byte-identical files.  Prints nothing but the tqdm bar.  Used in chapter 1
    (data exploration) and by ``cellulib synth ROOT``.

    Parameters
    ----------
    root : str or Path
        Output folder (created).
    n_train, n_val, n_cells : int
        Number of training, validation and annotated-cells patches.
    size : int
        Patch width and height in pixels.
    seed : int
        Seed of everything.
    label_noise : float
        Standard deviation of the Gaussian rater noise added to the labels (0 = exact truth).
    progress : bool
        Show a tqdm progress bar.
    scale : float
        Pixels per BreastPathQ pixel (see :func:`render_patch`).

    Returns
    -------
    Path
        ``root``.
    """
    from tqdm import tqdm

    n_train = _check_int("n_train", n_train, 0)
    n_val = _check_int("n_val", n_val, 0)
    n_cells = _check_int("n_cells", n_cells, 0)
    size = _check_int("size", size, 32)
    seed = _check_int("seed", seed, 0)
    if not (isinstance(label_noise, numbers.Real) and 0.0 <= label_noise <= 1.0):
        raise ValueError(f"label_noise must be a standard deviation in [0, 1], got {label_noise!r}")
    if not (isinstance(scale, numbers.Real) and 0.2 <= scale <= 4.0):
        raise ValueError(f"scale must be a number in [0.2, 4], got {scale!r}")

    root = Path(root)
    data = root / "datasets"
    dirs = {"train": data / "train", "validation": data / "validation", "cells": data / "cells"}
    try:
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{root}: cannot create the dataset folders ({exc})") from exc

    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    slide_ids = plan_rng.choice(np.arange(10000, 100000), size=128, replace=False)
    tr_slide, tr_rid, n_tr_slides = _slide_plan(plan_rng, n_train, slide_ids[:64])
    va_slide, va_rid, n_va_slides = _slide_plan(plan_rng, n_val, slide_ids[64:])
    # Patients: one to three consecutive slides each, never shared between train and validation.
    patients, next_patient = [], 1
    for slides in (slide_ids[:n_tr_slides], slide_ids[64:64 + n_va_slides]):
        k = 0
        while k < len(slides):
            m = int(plan_rng.integers(1, 4))
            patients += [(next_patient, int(sl)) for sl in slides[k:k + m]]
            next_patient += 1
            k += m
    styles = {int(sl): sample_slide_style(np.random.default_rng(np.random.SeedSequence([seed, 1, k])))
              for k, sl in enumerate(slide_ids)}
    # Cells crops come from their own small-numbered slides, like "17_Region 60_crop.tif".
    n_cell_slides = max(1, math.ceil(n_cells / 6))
    cell_slides = np.sort(plan_rng.choice(np.arange(1, 100), size=min(n_cell_slides, 99),
                                          replace=False))
    cell_of = np.sort(np.arange(n_cells) % len(cell_slides))
    targets = sample_cellularity(n_train + n_val + n_cells,
                                 np.random.default_rng(np.random.SeedSequence([seed, 2])))
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))

    jobs = [("train", int(a), int(b)) for a, b in zip(tr_slide, tr_rid)]
    jobs += [("validation", int(a), int(b)) for a, b in zip(va_slide, va_rid)]
    region = {}
    for k in range(n_cells):
        sl = int(cell_slides[cell_of[k]])
        region[sl] = region.get(sl, int(plan_rng.integers(1, 40))) + int(plan_rng.integers(5, 12))
        jobs.append(("cells", sl, region[sl]))

    truth, labels = [], {"train": [], "validation": []}
    bar = tqdm(total=len(jobs), desc="synth", unit="patch", disable=not progress)
    for k, (split, slide, rid) in enumerate(jobs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 4, k]))
        style = styles.get(slide) or sample_slide_style(
            np.random.default_rng(np.random.SeedSequence([seed, 5, slide])))
        patch = render_patch(size, float(targets[k]), rng, style=style, scale=scale,
                             with_masks=False)
        y = patch.cellularity
        if label_noise > 0:
            y = float(np.clip(y + noise_rng.normal(0.0, label_noise), 0.0, 1.0))
        y = round(y, 2)
        if split == "cells":
            name = f"{slide}_Region {rid}_crop.tif"
            _atomic_write(dirs["cells"] / name, _tiff_bytes(patch.img))
            xml = cell_xml(name, patch.points, first_region=rid + 1)
            _atomic_write(dirs["cells"] / f"{slide}_Region {rid}_key.xml", xml.encode())
        else:
            _atomic_write(dirs[split] / f"{slide}_{rid}.tif", _tiff_bytes(patch.img))
            labels[split].append((slide, rid, y))
        truth.append({"split": split, "slide": slide, "rid": rid,
                      "cellularity": patch.cellularity, "target": float(targets[k]), "y": y,
                      "n_malignant": patch.counts["malignant"], "n_normal": patch.counts["normal"],
                      "n_lymphocyte": patch.counts["lymphocyte"],
                      "n_fibroblast": patch.counts["fibroblast"],
                      "tissue_fraction": patch.tissue_fraction})
        bar.update(1)
    bar.close()

    cols = ["slide", "rid", "y"]
    _atomic_write(data / "train_labels.csv",
                  _csv_bytes(pd.DataFrame(labels["train"], columns=cols), "%.2f"))
    _atomic_write(data / "val_labels.csv",
                  _csv_bytes(pd.DataFrame(labels["validation"], columns=cols), "%.2f"))
    _atomic_write(root / "patient_ids.csv",
                  _csv_bytes(pd.DataFrame(patients, columns=["patient_id", "slide"])))
    truth_cols = ["split", "slide", "rid", "cellularity", "target", "y", "n_malignant", "n_normal",
                  "n_lymphocyte", "n_fibroblast", "tissue_fraction"]
    _atomic_write(root / "truth.csv", _csv_bytes(pd.DataFrame(truth, columns=truth_cols), "%.6f"))
    return root


# --------------------------------------------------------------------------------------------------
# Synthetic vs real, as tables for chapter 1
# --------------------------------------------------------------------------------------------------
_REAL_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def label_distance(real, synthetic) -> dict[str, float]:
    """How far the synthetic cellularity labels are from real ones: the two-sample
    Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs) and its p-value
    (``scipy.stats.ks_2samp``), and the share of exact zeros in each. SPEC 1.5; used in chapter 1.

    Examples
    --------
    >>> d = label_distance([0, 0, 0.5, 1.0], [0, 0.5, 0.5, 1.0])
    >>> d["ks"], d["zeros_real"], d["zeros_synthetic"]
    (0.25, 0.5, 0.25)
    """
    from scipy import stats

    r = np.asarray(real, dtype=np.float64).ravel()
    s = np.asarray(synthetic, dtype=np.float64).ravel()
    if not len(r) or not len(s):
        raise ValueError("label_distance needs at least one real and one synthetic label")
    res = stats.ks_2samp(r, s)
    return {"ks": float(res.statistic), "p": float(res.pvalue), "n_real": int(len(r)),
            "n_synthetic": int(len(s)), "zeros_real": float(np.mean(r == 0)),
            "zeros_synthetic": float(np.mean(s == 0))}


def load_real_examples(real_dir) -> dict[str, np.ndarray]:
    """Read every image of a folder of real H&E examples (level 0 of pyramids), by file name.

    SPEC 1.3 (``data/real``). Files that cannot be read are skipped with a warning naming them.
    Used in chapter 1 (data exploration).
    """
    import warnings

    from cellulib.data import DataError, read_image

    folder = Path(real_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder of real images not found")
    images = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in _REAL_SUFFIXES:
            try:
                images[path.name] = read_image(path)
            except DataError as exc:
                warnings.warn(str(exc), stacklevel=2)
    return images


def _is_breastpathq(name: str) -> bool:
    # only the BreastPathQ patch shares the synthetic pixel scale; AMIDA13 and OpenSlide images are
    # at a higher magnification, so their nuclei are larger in pixels
    return name.lower().startswith("breastpathq") and "_256" not in name


def compare_stains(synthetic: list, real: dict[str, np.ndarray],
                   brca: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Mean H, E and D optical densities per image, one row per image, ``source`` synthetic, real
    or BRCA-M2C (the real TCGA patches of SPEC 1.4, when given).

    Used in chapter 1 to compare the generator with real H&E (SPEC 1.2).
    """
    rows = [{"source": "synthetic", "name": f"synthetic {i}", **_means(img)}
            for i, img in enumerate(synthetic)]
    rows += [{"source": "real", "name": name, **_means(img)} for name, img in real.items()]
    rows += [{"source": "BRCA-M2C", "name": name, **_means(img)}
             for name, img in (brca or {}).items()]
    return pd.DataFrame(rows)


def _means(img) -> dict[str, float]:
    stats = hed_stats(img)
    return {c: stats[f"{c}_mean"] for c in ("H", "E", "D")}


def compare_nucleus_sizes(synthetic: list, real: dict[str, np.ndarray],
                          brca: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Nucleus equivalent diameters (``diameter_px``) of synthetic patches, of the real
    BreastPathQ patches and of BRCA-M2C patches when given (all at 20x, the same pixel scale), with
    a ``source`` column. Used in chapter 1."""
    frames = [pd.DataFrame({"source": "synthetic", "diameter_px": nucleus_sizes(img)})
              for img in synthetic]
    frames += [pd.DataFrame({"source": f"real ({name})", "diameter_px": nucleus_sizes(img)})
               for name, img in real.items() if _is_breastpathq(name)]
    frames += [pd.DataFrame({"source": "BRCA-M2C", "diameter_px": nucleus_sizes(img)})
               for img in (brca or {}).values()]
    return pd.concat(frames, ignore_index=True)
