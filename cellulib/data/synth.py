"""Synthetic H&E patches with known cellularity (SPEC 1.1-1.3), rendered one at a time
(:func:`render_patch`); :mod:`cellulib.data.synthset` writes them in the BreastPathQ layout.

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

The renderer is a sequence of stages (see :func:`render_patch`); every number it uses is a named,
documented entry of :class:`RenderParams`.

Length scale: one pixel at ``scale=1`` is one pixel of a 512x512 BreastPathQ patch (malignant nuclei
about 15 px across, lymphocytes about 7 px).  ``size`` is therefore a field of view, not a zoom: a
256-pixel patch shows a quarter of the area of a 512-pixel one at the same magnification.  Pass
``scale=0.5`` to mimic the half-size copies of the real data.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import pandas as pd

from cellulib.constants import E_STAIN_VECTOR, H_STAIN_VECTOR
from cellulib.data.profiles import check_int

__all__ = [
    "GENERATOR_VERSION",
    "SlideStyle",
    "SynthPatch",
    "sample_cellularity",
    "sample_slide_style",
    "render_patch",
    "RenderParams",
    "RENDER_PARAMS",
    "CALIBRATED_PARAMS",
    "GENERATORS",
    "MALIGNANT_DESCRIPTIONS",
    "NORMAL_DESCRIPTIONS",
    "LYMPHOCYTE_DESCRIPTIONS",
]


#: Bumped whenever the rendering or the label law changes, so cached synthetic datasets are
#: regenerated (2: labels drawn from the law fitted to the real BreastPathQ labels, SPEC 1.5).
GENERATOR_VERSION = 2

# Stain optical-density vectors (cellulib.constants). Macenko's estimate on the real BreastPathQ
# patch in data/real differs by at most 0.11 per entry.
_H_VECTOR = np.array(H_STAIN_VECTOR)
_E_VECTOR = np.array(E_STAIN_VECTOR)
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
    rounded to one decimal. :func:`cellulib.data.measure.law_distance` measures it against the real
    labels.
    Chapter 1 (data exploration) names it and compares the labels it gave the synthetic dataset
    (through :func:`cellulib.data.synthset.make_breastpathq`) with the real ones.

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
    n = check_int("n", n, 0)
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
    splits matter.  No notebook uses it directly: :func:`cellulib.data.synthset.make_breastpathq`
    draws one per slide.
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
    (IDC, ILC, DCIS 2, DCIS 3) are per slide too.  No notebook calls it directly: it is used through
    :func:`cellulib.data.synthset.make_breastpathq` (and :func:`render_patch` when no style is
    given).

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
# The renderer's parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderParams:
    """Every number of :func:`render_patch`, named, with its unit (SPEC 1.2).

    Units: ``_px`` lengths are pixels of a 512x512 BreastPathQ patch and are multiplied by the
    ``scale`` of :func:`render_patch`; ``(low, high)`` pairs are the bounds of a uniform draw;
    ``_rate`` values are expected counts (Poisson means) per ``reference_size``-pixel square patch,
    scaled to the field of view; ``p_`` values are probabilities; ``_jitter`` values are standard
    deviations as a fraction of a grid spacing; ``_od`` values are stain concentrations, i.e.
    optical densities (log10 units) along a unit stain vector, before the slide's stain intensity
    (:class:`SlideStyle`).  Suffixes ``_h`` and ``_e`` name the stain: haematoxylin or eosin.
    Changing any value changes every synthetic dataset, so bump `GENERATOR_VERSION` with it.
    """

    # ---- field of view and patch context (drawn first, independent of the target cellularity)
    reference_size: float = 512.0  # px: side of a BreastPathQ patch (SPEC 1.1); rates are per this
    p_no_fat: float = 0.7  # probability that a patch holds no fat
    fat_share: tuple = (0.05, 0.4)  # share of the patch area that is fat, when there is fat
    p_no_glass: float = 0.85  # probability that a patch holds no empty glass
    glass_share: tuple = (0.05, 0.3)  # share of the patch area that is glass, when there is glass
    duct_rate: tuple = (0.0, 3.0)  # isolated normal ducts per patch (range of the Poisson mean)
    p_lobules: float = 0.35  # probability that a patch holds lobules
    lobule_rate: tuple = (0.5, 2.0)  # lobules per patch when it holds any (range of the mean)
    lymphocytes_sparse: float = 0.05  # stromal lymphocyte level (acceptance prob.) when sparse
    lymphocytes_moderate: tuple = (0.1, 0.5)  # stromal lymphocyte level when moderate
    lymphocytes_dense: tuple = (0.5, 1.0)  # stromal lymphocyte level when dense
    p_lymphocyte_levels: tuple = (0.3, 0.35, 0.35)  # probabilities of sparse, moderate, dense
    p_aggregates: float = 0.3  # probability that a patch holds lymphoid aggregates
    aggregate_rate: tuple = (0.0, 2.0)  # lymphoid aggregates per patch (range of the mean)
    fibroblast_density: tuple = (0.4, 1.6)  # multiplier of the fibroblast share in open stroma
    stroma_eosin: tuple = (0.75, 1.25)  # multiplier of the stromal eosin density
    stain_jitter_sd: float = 0.06  # sd of the log of the per-patch H and E intensity factors
    p_udh: float = 0.2  # probability that the normal epithelium is described "UDH", not "normal"

    # ---- empty glass
    glass_edge_wiggle_px: float = 25  # px: amplitude of the wavy edge of the glass region
    glass_edge_length_px: float = 40  # px: correlation length of that wave

    # ---- fat
    fat_field_length_px: float = 70  # px: correlation length of the field that places fat
    adipocyte_spacing_px: tuple = (80, 130)  # px: distance between adipocyte centres
    adipocyte_jitter: float = 0.18  # sd of adipocyte centres, fraction of their spacing
    fat_membrane_px: int = 2  # px (not scaled): width of an adipocyte membrane

    # ---- normal ducts and lobules
    duct_lumen_px: tuple = (5, 24)  # px: semi-major axis of the lumen of an isolated duct
    p_duct_two_layers: float = 0.3  # probability of two luminal layers (SPEC 1.2: one or two)
    lobule_radius_px: tuple = (45, 100)  # px: radius of the disc the acini of a lobule fill
    acini_per_area: float = 0.9  # acini per (lobule radius / acinus spacing)^2
    acinus_spacing_px: float = 24  # px: nominal distance between acini of a lobule
    min_acini: int = 2  # acini added to every lobule on top of the area law
    acinus_lumen_px: tuple = (4, 9)  # px: semi-major axis of the lumen of an acinus
    p_acinus_two_layers: float = 0.0  # probability of two luminal layers in an acinus
    lumen_aspect: tuple = (0.5, 1.0)  # minor / major semi-axis of a lumen
    duct_attempts: int = 6  # tries to find free stroma for each duct before giving it up
    epithelial_layer_px: float = 9.5  # px: thickness of one luminal epithelial layer
    duct_rim_px: float = 3.5  # px: myoepithelium and basement membrane outside the epithelium
    duct_min_free: float = 0.97  # share of a duct's footprint that must be free stroma

    # ---- tumour nests
    nest_spacing_px: tuple = (110, 210)  # px: distance between nest centres (Voronoi seeds)
    nest_jitter: float = 0.3  # sd of nest centres, fraction of their spacing
    septum_warp_px: float = 14  # px: amplitude of the warp that bends the straight septa
    septum_warp_length_px: float = 35  # px: correlation length of that warp
    nest_bias_sd: float = 0.05  # sd of the per-nest preference at target 1 ...
    nest_bias_sd_low: float = 0.5  # ... plus this times (1 - target): picks whole nests when low
    nest_wiggle: float = 0.03  # amplitude of the noise on the nest field at target 1 ...
    nest_wiggle_low: tuple = (0.05, 0.35)  # ... plus a draw from this times (1 - target)
    nest_wiggle_length_px: float = 24  # px: correlation length of that noise
    nest_core_depth: float = 0.25  # depth into a nest, fraction of the nest spacing, where it is full
    cell_spacing_jitter: tuple = (0.93, 1.07)  # per-patch factor on the slide's cell spacing
    min_nest_area: float = 0.35  # smallest tumour component kept, squared cell spacings (~0.4 cell)

    # ---- retraction clefts
    p_clefts: float = 0.5  # probability that a patch with tumour shows retraction clefts
    cleft_width_px: float = 2  # px: width of a cleft (dilation steps, at least one)
    cleft_length_px: float = 30  # px: correlation length of the field that places clefts
    cleft_threshold: float = 0.6  # field level (in sd) above which the ring around nests is a cleft

    # ---- malignant cells
    malignant_jitter: float = 0.17  # sd of cell centres, fraction of the cell spacing
    malignant_radius_gain: float = 1.0  # factor on the slide's malignant nucleus radius
    malignant_size_sd: float = 0.14  # sd of log nucleus radius, per unit of slide pleomorphism
    malignant_aspect: float = 1.12  # smallest major / minor axis ratio of a malignant nucleus ...
    malignant_aspect_sd: float = 0.28  # ... plus |N(0, this x pleomorphism)| ...
    malignant_aspect_max_extra: float = 0.9  # ... capped at this
    malignant_offset_px: float = 1.2  # px: sd of a nucleus centre about its cell centre
    outline_harmonics: int = 3  # Fourier harmonics (orders 2, 3, 4) bending the outline
    outline_harmonic_sd: float = 0.05  # sd of their relative amplitude, per unit of pleomorphism
    malignant_h_sd: float = 0.18  # sd of log haematoxylin density between malignant nuclei
    cell_tone_sd: float = 0.1  # sd of log cytoplasm density between malignant cells
    nucleolus_offset: tuple = (0.0, 0.4)  # distance of the nucleolus from the centre, in radii
    nucleolus_radius_px: tuple = (1.1, 2.0)  # px: nucleolus radius
    p_nucleolus: float = 0.75  # probability that a malignant nucleus shows a nucleolus
    nucleus_reach_margin_px: float = 5  # px: margin on the largest nucleus when skipping pixels

    # ---- normal epithelial and myoepithelial nuclei (rings around each lumen)
    myoepithelial_offset_px: float = 1.7  # px: myoepithelial ring beyond the luminal layers
    luminal_spacing_px: float = 9.0  # px: distance between luminal nuclei along a ring
    myoepithelial_spacing_px: float = 24.0  # px: distance between myoepithelial nuclei
    min_ring_nuclei: int = 4  # fewest nuclei on a ring
    ring_jitter: float = 0.15  # sd of a nucleus' angular position, fraction of the spacing
    myoepithelial_major_px: tuple = (5.5, 7.0)  # px: semi-major axis of a myoepithelial nucleus
    luminal_major_px: tuple = (4.6, 5.6)  # px: semi-major axis of a luminal nucleus
    myoepithelial_minor_px: tuple = (1.8, 2.4)  # px: semi-minor axis of a myoepithelial nucleus
    luminal_minor_px: tuple = (3.6, 4.4)  # px: semi-minor axis of a luminal nucleus

    # ---- collagen fibres
    structure_distance_max_px: float = 70  # px: distance to nests/ducts/fat beyond which it is flat
    fibre_wrap: float = 0.9  # weight of that distance in the fibre phase (fibres wrap structures)
    fibre_drift: float = 1.0  # weight of a straight ramp in the phase (fibres run one way)
    fibre_wave_px: float = 25  # px: amplitude of the noise in the phase
    fibre_wave_length_px: float = 70  # px: correlation length of that noise
    fibre_smoothing_px: float = 3  # px: Gaussian sigma on the phase before taking its gradient
    fibre_direction_noise: float = 0.3  # rad: amplitude of the noise on the fibre direction
    fibre_direction_length_px: float = 10  # px: correlation length of that noise

    # ---- lymphocytes
    lymphocyte_base: float = 0.15  # mean of the stromal lymphocyte density field ...
    lymphocyte_patchiness: float = 0.35  # ... plus this times a unit noise field, clipped to [0, 1]
    lymphocyte_patch_length_px: float = 30  # px: correlation length of that noise
    aggregate_radius_px: tuple = (18, 55)  # px: Gaussian radius of a lymphoid aggregate
    aggregate_extent: float = 3  # radii: extent of the window an aggregate is drawn in
    aggregate_peak: float = 0.9  # lymphocyte density at the centre of an aggregate
    lymphocyte_spacing_px: float = 8.6  # px: spacing of the grid of candidate lymphocytes
    lymphocyte_jitter: float = 0.12  # sd of candidate centres, fraction of their spacing
    intratumoural_lymphocytes: float = 0.012  # acceptance inside tumour, times the stromal level
    lymphocyte_radius_px: tuple = (3.2, 3.9)  # px: nucleus radius (about 7 px across)
    lymphocyte_search_px: float = 4.0  # px: scaled part of the radius searched around a seed ...
    lymphocyte_search_margin: float = 3.0  # px (not scaled): ... plus this margin
    lymphocyte_cytoplasm_px: float = 1.2  # px: rim of cytoplasm around a lymphocyte nucleus

    # ---- fibroblasts
    fibroblast_spacing_px: float = 20  # px: spacing of the grid of candidate fibroblasts
    fibroblast_jitter: float = 0.3  # sd of candidate centres, fraction of their spacing
    septum_px: float = 5  # px: stroma closer than this to a structure counts as a thin septum
    p_septum_fibroblast: float = 0.5  # share of candidates kept in septa
    p_stroma_fibroblast: float = 0.25  # share kept in open stroma, times the patch density
    fibroblast_major_px: tuple = (6.5, 10.0)  # px: semi-major axis, along the fibres
    fibroblast_minor_px: tuple = (1.6, 2.4)  # px: semi-minor axis
    fibroblast_reach_px: float = 11  # px: pixels farther than this from every seed are skipped

    # ---- red blood cells
    capillary_rate: float = 1.2  # capillaries (short rows of red cells) per patch
    red_cells_per_capillary: tuple = (2, 9)  # integer range [low, high) of red cells in a row
    red_cell_step_px: float = 6  # px: distance between neighbouring red cells of a row
    red_cell_jitter_px: float = 1.5  # px: sd of a red cell about its place in the row
    red_cell_radius_px: float = 3.2  # px: red cell radius (at least one pixel)

    # ---- optical density: texture noise
    fine_noise_px: float = 0.8  # px: correlation length of the fine noise (chromatin, fibrils)
    grain_noise_px: float = 1.6  # px: correlation length of the coarser grain

    # ---- optical density: tissue (background glass first, then tissue, then nuclei on top)
    glass_h_od: float = 0.004  # H density of empty glass
    glass_e_od: float = 0.012  # E density of empty glass
    lumen_e_od: float = 0.05  # E density of faint secretion in lumina ...
    lumen_e_grain: float = 0.02  # ... plus this times the grain
    collagen_packing_px: float = 5.0  # px: decay length of the dense collagen hugging structures
    stroma_e_od: float = 0.05  # E density of stroma ...
    stroma_e_fibres: float = 0.4  # ... plus this times the fibre texture (0 to 1) ...
    stroma_e_packed: float = 0.15  # ... plus this times the packing (1 at a structure) ...
    stroma_e_fine: float = 0.08  # ... all times (1 + this times the fine noise)
    stroma_h_od: float = 0.035  # H density of stroma ...
    stroma_h_grain: float = 0.012  # ... plus this times the grain
    tumour_e_od: float = 0.19  # E density of malignant cytoplasm, times the cell's tone ...
    tumour_e_grain: float = 0.07  # ... times (1 + this times the grain ...
    tumour_e_fine: float = 0.12  # ... + this times the fine noise)
    tumour_h_od: float = 0.09  # H density of malignant cytoplasm, times the cell's tone ...
    tumour_h_grain: float = 0.2  # ... times (1 + this times the grain)
    cell_edge_e_od: float = 0.05  # E density added on membranes between malignant cells
    cell_edge_h_od: float = 0.02  # H density added on those membranes
    duct_e_od: float = 0.2  # E density of normal epithelium ...
    duct_e_grain: float = 0.15  # ... times (1 + this times the grain)
    duct_h_od: float = 0.05  # H density of normal epithelium
    fat_e_od: float = 0.33  # E density of an adipocyte membrane
    fat_h_od: float = 0.03  # H density of an adipocyte membrane

    # ---- optical density: nuclei
    chromatin_threshold: float = 0.1  # fine-noise level above which chromatin clumps ...
    chromatin_max: float = 1.5  # ... clipped to this
    malignant_h_od: float = 0.43  # H density of a malignant nucleus, times its own factor ...
    malignant_h_centre: float = 0.45  # ... times (this, pale centre: vesicular chromatin ...
    malignant_h_rim: float = 0.6  # ... + this times the rim profile ...
    malignant_h_clumps: float = 0.7  # ... + this times the chromatin clumps)
    malignant_rim_start: float = 0.6  # normalised radius where the dark rim starts (1 at the edge)
    malignant_e_od: float = 0.16  # E density of a malignant nucleus
    nucleolus_h_od: float = 0.25  # H density added on a nucleolus
    nucleolus_e_od: float = 0.3  # E density added on a nucleolus
    luminal_h_od: float = 0.5  # H density of a luminal nucleus ...
    myoepithelial_h_od: float = 0.55  # ... of a myoepithelial one ...
    normal_h_clumps: float = 0.2  # ... times (1 + this times the chromatin clumps)
    normal_e_od: float = 0.1  # E density of a normal epithelial nucleus
    fibroblast_h_od: float = 0.75  # H density of a fibroblast nucleus ...
    fibroblast_h_fine: float = 0.1  # ... times (1 + this times the fine noise)
    fibroblast_e_od: float = 0.12  # E density of a fibroblast nucleus
    lymphocyte_cytoplasm_e_od: float = 0.12  # E density of the cytoplasm rim of a lymphocyte
    lymphocyte_cytoplasm_h_od: float = 0.08  # H density of that rim
    lymphocyte_h_od: float = 0.8  # H density of a lymphocyte nucleus (the darkest) ...
    lymphocyte_h_fine: float = 0.08  # ... times (1 + this times the fine noise)
    lymphocyte_e_od: float = 0.15  # E density of a lymphocyte nucleus
    red_cell_e_od: float = 0.15  # E density of a red blood cell
    red_cell_h_od: float = 0.02  # H density of a red blood cell
    red_cell_od: float = 0.75  # density along the haemoglobin vector of a red blood cell

    # ---- camera
    sensor_noise: float = 3.5  # grey levels: half-width of the triangular sensor noise (sd 1.4)

    # ---- stain intensity of every patch (on top of the slide's and the patch's own draws)
    h_gain: float = 1.0  # factor on every haematoxylin density
    e_gain: float = 1.0  # factor on every eosin density


#: The parameters :func:`render_patch` renders with.
RENDER_PARAMS = RenderParams()

#: The generator calibrated to real tissue (issue 23): the default parameters with the changes
#: that bring the statistics of :func:`cellulib.data.measure.tissue_statistics` of its patches
#: closest to those of BRCA-M2C's training patients (chapter 1 shows both beside the real ones;
#: fitted by hand on 96 patches of 256 px, two seeds): lymphocytes about 20 times sparser and
#: larger (the default's median density was 20 times BRCA-M2C's, its nuclei 3.5 um across);
#: darker haematoxylin in stroma, cytoplasm, malignant nuclei and overall (the default's tissue
#: was 0.6 times as dark); larger malignant nuclei and broader fibroblasts; more fine texture
#: in stroma and cytoplasm, and more sensor noise (the default's local grey-level SD was 0.8
#: times the real one); slightly paler eosin.
CALIBRATED_PARAMS = replace(
    RENDER_PARAMS,
    lymphocytes_sparse=0.003, lymphocytes_moderate=(0.02, 0.1), lymphocytes_dense=(0.1, 0.5),
    p_lymphocyte_levels=(0.45, 0.3, 0.25), p_aggregates=0.15, lymphocyte_radius_px=(4.2, 5.0),
    lymphocyte_spacing_px=10.5, stroma_h_od=0.07, tumour_h_od=0.15, malignant_h_od=0.52,
    h_gain=1.35, e_gain=0.9, malignant_radius_gain=1.15, fibroblast_minor_px=(2.2, 3.0),
    stroma_e_fine=0.35, tumour_e_fine=0.35, stroma_e_fibres=0.55, sensor_noise=8.0,
)

#: The generators a synthetic set can be rendered with (``get_dataset(..., generator=...)``):
#: ``"default"`` (:data:`RENDER_PARAMS`, what every chapter trains on) and ``"calibrated"``
#: (:data:`CALIBRATED_PARAMS`, a lever of the real-tissue chapter).
GENERATORS: dict[str, RenderParams] = {"default": RENDER_PARAMS, "calibrated": CALIBRATED_PARAMS}


@dataclass(frozen=True)
class _PatchContext:
    """Per-patch draws made before, and independently of, the target cellularity."""

    fat_share: float  # share of the patch area that is fat
    glass_share: float  # share of the patch area that is empty glass
    duct_rate: float  # Poisson mean of isolated ducts in this field of view
    lobule_rate: float  # Poisson mean of lobules in this field of view
    lymphocyte_level: float  # stromal lymphocyte acceptance probability
    aggregate_rate: float  # Poisson mean of lymphoid aggregates in this field of view
    fibroblast_density: float  # multiplier of the fibroblast share in open stroma
    stroma_eosin: float  # multiplier of the stromal eosin density
    h_jitter: float  # per-patch haematoxylin intensity factor
    e_jitter: float  # per-patch eosin intensity factor
    normal_description: str  # "normal" or "UDH", written to the cell XML


def _draw_context(rng, area_factor: float, p: RenderParams) -> _PatchContext:
    """Draw the patch context: fat, glass, ducts, lobules, lymphocytes, stroma, stain jitter.

    These decide the colour and haematoxylin content of everything that is not tumour, and are
    drawn before the target cellularity is used, so neither depends on the other.  Rates are
    multiplied by ``area_factor``, the patch area in reference patches.
    """
    fat_share = 0.0 if rng.random() < p.p_no_fat else rng.uniform(*p.fat_share)
    glass_share = 0.0 if rng.random() < p.p_no_glass else rng.uniform(*p.glass_share)
    duct_rate = rng.uniform(*p.duct_rate) * area_factor
    lobule_rate = (rng.uniform(*p.lobule_rate) if rng.random() < p.p_lobules else 0.0) * area_factor
    lymphocyte_level = rng.choice([p.lymphocytes_sparse, rng.uniform(*p.lymphocytes_moderate),
                                   rng.uniform(*p.lymphocytes_dense)], p=p.p_lymphocyte_levels)
    aggregate_rate = ((rng.uniform(*p.aggregate_rate) if rng.random() < p.p_aggregates else 0.0)
                      * area_factor)
    fibroblast_density = rng.uniform(*p.fibroblast_density)
    stroma_eosin = rng.uniform(*p.stroma_eosin)
    h_jitter, e_jitter = np.exp(rng.normal(0.0, p.stain_jitter_sd, 2))
    normal_description = "UDH" if rng.random() < p.p_udh else "normal"
    return _PatchContext(fat_share, glass_share, duct_rate, lobule_rate, lymphocyte_level,
                         aggregate_rate, fibroblast_density, stroma_eosin, h_jitter, e_jitter,
                         normal_description)


# --------------------------------------------------------------------------------------------------
# The renderer's stages: state and layout
# --------------------------------------------------------------------------------------------------
@dataclass
class _RenderState:
    """What the stages of :func:`render_patch` share: the inputs, then what each stage adds.

    The stages run in a fixed order, each drawing from ``rng`` in a fixed order, so one seed gives
    one patch; a stage reads only fields that earlier stages have set.
    """

    rng: np.random.Generator
    size: int  # patch side, px
    scale: float  # pixels per BreastPathQ pixel
    style: SlideStyle
    target: float  # target cellularity
    context: _PatchContext
    params: RenderParams
    area_factor: float  # patch area in reference patches (scales the rates)
    xx: np.ndarray | None = None  # float32 column of every pixel
    yy: np.ndarray | None = None  # float32 row of every pixel
    # Layout: one compartment code per pixel (_WHITE, _STROMA, _TUMOUR, _DUCT, _FAT).
    compartments: np.ndarray | None = None
    lumen: np.ndarray | None = None  # duct and acinus lumina
    ducts: list = field(default_factory=list)  # (cx, cy, lumen semi-axes a, b, angle rad, layers)
    duct_masks: list = field(default_factory=list)  # (footprint, lumen) boolean masks per duct
    tumour: np.ndarray | None = None
    stroma: np.ndarray | None = None
    cell_spacing: float = 0.0  # px: distance between malignant cell centres in this patch
    # Cells, in the order they are placed.
    malignant: _MalignantCells | None = None
    normal: _NormalNuclei | None = None
    structure_distance: np.ndarray | None = None  # px to the nearest nest, duct or fat, capped
    has_structures: bool = False  # whether there is any nest, duct or fat
    fibre_direction: np.ndarray | None = None  # rad, collagen direction per pixel
    fibres: np.ndarray | None = None  # collagen texture in [0, 1]
    lymphocytes: _Lymphocytes | None = None
    fibroblasts: _Fibroblasts | None = None
    red_cells: np.ndarray | None = None  # bool red blood cell pixels
    # Truth (SPEC 1.2).
    tissue: np.ndarray | None = None  # everything but glass
    malignant_area: np.ndarray | None = None  # malignant cells, nucleus plus cytoplasm
    cellularity: float = 0.0  # malignant area / tissue area
    # Stain densities (float32 optical densities, before the slide's intensities) and their noise.
    fine: np.ndarray | None = None  # unit noise field, fine (chromatin, fibrils)
    grain: np.ndarray | None = None  # unit noise field, coarser grain
    h_od: np.ndarray | None = None
    e_od: np.ndarray | None = None
    red_od: np.ndarray | None = None  # along the haemoglobin vector


def _new_state(rng, size: int, scale: float, style: SlideStyle, target: float,
               params: RenderParams = RENDER_PARAMS) -> _RenderState:
    """The starting state: the patch context drawn (the first draws), stroma everywhere."""
    area_factor = (size / (params.reference_size * scale)) ** 2
    context = _draw_context(rng, area_factor, params)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return _RenderState(rng=rng, size=size, scale=scale, style=style, target=target,
                        context=context, params=params, area_factor=area_factor, xx=xx, yy=yy,
                        compartments=np.full((size, size), _STROMA, np.uint8),
                        lumen=np.zeros((size, size), bool))


def _add_glass(st: _RenderState) -> None:
    """Empty glass: ``glass_share`` of the patch, an irregular region entering from one side."""
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    if st.context.glass_share > 0:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (st.xx * np.cos(angle) + st.yy * np.sin(angle)
                + p.glass_edge_wiggle_px * s * _smooth_noise(rng, (size, size),
                                                             p.glass_edge_length_px * s))
        glass = _quantile_mask(ramp, np.ones_like(ramp, bool),
                               int(st.context.glass_share * size * size))
        st.compartments[glass] = _WHITE


def _add_fat(st: _RenderState) -> None:
    """Fat: ``fat_share`` of the patch, taken from the stroma, as big polygonal adipocytes.

    Adipocyte membranes (Voronoi edges of a jittered hexagonal grid) become the fat compartment;
    the cell interiors become glass, which is not tissue.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    if st.context.fat_share > 0:
        fat = _quantile_mask(_smooth_noise(rng, (size, size), p.fat_field_length_px * s),
                             st.compartments == _STROMA, int(st.context.fat_share * size * size))
        adipocytes = _hex_grid(rng, size, rng.uniform(*p.adipocyte_spacing_px) * s,
                               p.adipocyte_jitter)
        owner, _ = _nearest_seed(adipocytes, size)
        membrane = np.ones((p.fat_membrane_px, p.fat_membrane_px), np.uint8)
        edge = cv2.dilate(_boundaries(owner).astype(np.uint8), membrane) > 0
        st.compartments[fat & ~edge] = _WHITE
        st.compartments[fat & edge] = _FAT


def _duct_proposals(st: _RenderState) -> list:
    """Ducts to try: isolated ducts anywhere, and per lobule a tight cluster of small acini.

    Lobules (terminal duct lobular units) are as haematoxylin-rich as tumour but not malignant.
    Each proposal is (where, lumen semi-major axis range in px, probability of two layers), where
    ``where`` is None (anywhere) or (lobule centre, lobule radius in px).
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    proposals = []
    for _ in range(rng.poisson(st.context.duct_rate)):
        proposals.append((None, p.duct_lumen_px, p.p_duct_two_layers))
    for _ in range(rng.poisson(st.context.lobule_rate)):
        lobule_centre = rng.uniform(0, size, 2)
        lobule_radius = rng.uniform(*p.lobule_radius_px) * s
        n_acini = int(p.acini_per_area * (lobule_radius / (p.acinus_spacing_px * s)) ** 2)
        for _k in range(n_acini + p.min_acini):
            proposals.append(((lobule_centre, lobule_radius), p.acinus_lumen_px,
                              p.p_acinus_two_layers))
    return proposals


def _find_duct_place(st: _RenderState, where, lumen_px, p_two: float):
    """Random outlines for one duct until its footprint lies on free stroma.

    Returns (cx, cy, lumen semi-axes a and b in px, angle in degrees, layers, footprint mask), or
    None when ``duct_attempts`` tries all overlap something else.  The footprint is the lumen plus
    the epithelial layers and the rim.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    for _attempt in range(p.duct_attempts):
        lumen_a = rng.uniform(*lumen_px) * s
        lumen_b = lumen_a * rng.uniform(*p.lumen_aspect)
        layers = 2 if rng.random() < p_two else 1
        wall = layers * p.epithelial_layer_px * s + p.duct_rim_px * s
        if where is None:
            cx, cy = rng.uniform(0, size, 2)
        else:
            (lobule_x, lobule_y), lobule_radius = where
            distance = lobule_radius * math.sqrt(rng.random())
            phi = rng.uniform(0, 2 * np.pi)
            cx, cy = lobule_x + distance * math.cos(phi), lobule_y + distance * math.sin(phi)
        angle = rng.uniform(0, 180)
        footprint = _ellipse_mask(size, cx, cy, lumen_a + wall, lumen_b + wall, angle)
        if (footprint is not None
                and (st.compartments[footprint] == _STROMA).mean() > p.duct_min_free):
            return cx, cy, lumen_a, lumen_b, angle, layers, footprint
    return None


def _add_ducts(st: _RenderState) -> None:
    """Normal ducts and acini: a lumen (glass) in a footprint of epithelium (the duct compartment).

    The epithelium is one or two luminal layers and a myoepithelial layer (SPEC 1.2); its nuclei
    are placed later by :func:`_normal_nuclei`.
    """
    size = st.size
    for where, lumen_px, p_two in _duct_proposals(st):
        placed = _find_duct_place(st, where, lumen_px, p_two)
        if placed is None:
            continue
        cx, cy, lumen_a, lumen_b, angle, layers, footprint = placed
        lumen = _ellipse_mask(size, cx, cy, lumen_a, lumen_b, angle)
        lumen = np.zeros((size, size), bool) if lumen is None else lumen
        st.duct_masks.append((footprint, lumen))
        st.ducts.append((cx, cy, lumen_a, lumen_b, np.deg2rad(angle), layers))
        st.compartments[footprint] = _DUCT
        st.compartments[lumen] = _WHITE
        st.lumen |= lumen


def _tumour_pixels_needed(st: _RenderState) -> int:
    """Number of tumour pixels the target asks for: target cellularity times the tissue area.

    Very high targets leave no room for ducts: they are dropped, last placed first, until the free
    stroma can hold the tumour (their area turns back into stroma).
    """
    comp = st.compartments
    need = int(round(st.target * int((comp != _WHITE).sum())))
    while need > int((comp == _STROMA).sum()) and st.ducts:
        footprint, lumen = st.duct_masks.pop()
        st.ducts.pop()
        comp[footprint] = _STROMA
        st.lumen &= ~lumen
        need = int(round(st.target * int((comp != _WHITE).sum())))
    return need


def _nest_preference(st: _RenderState) -> np.ndarray:
    """How strongly each pixel wants to be tumour: depth in its nest plus a per-nest offset.

    Nests are the cells of a Voronoi tessellation of jittered nest centres whose straight edges are
    warped into curved septa; depth is the distance to the nearest septum, saturating at
    ``nest_core_depth`` of the nest spacing, so filling the highest values first erodes nests from
    the septa inwards.  The per-nest offsets pick which nests are tumour when few are needed; they
    fade at high targets, where the stroma left over should be the septa between all nests.
    """
    p, rng, s, size, target = st.params, st.rng, st.scale, st.size, st.target
    nest_spacing = rng.uniform(*p.nest_spacing_px) * s
    nests = _hex_grid(rng, size, nest_spacing, p.nest_jitter)
    if len(nests) == 0:
        nests = rng.uniform(0, size, (1, 2))
    nest_of, _ = _nearest_seed(nests, size)
    warp_x = st.xx + p.septum_warp_px * s * _smooth_noise(rng, (size, size),
                                                          p.septum_warp_length_px * s)
    warp_y = st.yy + p.septum_warp_px * s * _smooth_noise(rng, (size, size),
                                                          p.septum_warp_length_px * s)
    nest_of = cv2.remap(nest_of.astype(np.float32), warp_x, warp_y, cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_REPLICATE).astype(np.int32)
    not_septum = (~_boundaries(nest_of)).astype(np.uint8)
    depth = cv2.distanceTransform(not_septum, cv2.DIST_L2, 5)
    nest_bias = rng.normal(0.0, p.nest_bias_sd + p.nest_bias_sd_low * (1 - target),
                           len(nests)).astype(np.float32)
    wiggle = p.nest_wiggle + rng.uniform(*p.nest_wiggle_low) * (1 - target)
    return (np.minimum(depth / (p.nest_core_depth * nest_spacing), 1.0) + nest_bias[nest_of]
            + wiggle * _smooth_noise(rng, (size, size), p.nest_wiggle_length_px * s))


def _grow_tumour(st: _RenderState, need: int) -> None:
    """Tumour: the ``need`` free-stroma pixels of highest nest preference, minus crumbs.

    Every tumour component must hold at least one cell: components smaller than
    ``min_nest_area`` squared cell spacings (about 0.4 of a cell) go back to stroma.  Draws this
    patch's cell spacing and sets ``tumour`` and ``cell_spacing``.
    """
    p, rng = st.params, st.rng
    tumour = _quantile_mask(_nest_preference(st), st.compartments == _STROMA, need)
    cell_spacing = st.style.cell_spacing * rng.uniform(*p.cell_spacing_jitter) * st.scale
    _, component, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8), 8)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < p.min_nest_area * cell_spacing ** 2) + 1
    if len(small):
        tumour &= ~np.isin(component, small)
    st.compartments[tumour] = _TUMOUR
    st.tumour, st.cell_spacing = tumour, cell_spacing


def _add_clefts(st: _RenderState) -> None:
    """Retraction clefts: thin glass gaps between some nests and the stroma, as in fixed tissue.

    With probability ``p_clefts`` (when there is tumour), the stroma in a ring of
    ``cleft_width_px`` around the tumour becomes glass where a smooth noise field is high.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    if st.tumour.any() and rng.random() < p.p_clefts:
        ring = cv2.dilate(st.tumour.astype(np.uint8), np.ones((3, 3), np.uint8),
                          iterations=max(1, int(round(p.cleft_width_px * s)))) > 0
        ring &= ((st.compartments == _STROMA)
                 & (_smooth_noise(rng, (size, size), p.cleft_length_px * s) > p.cleft_threshold))
        st.compartments[ring] = _WHITE


# --------------------------------------------------------------------------------------------------
# The renderer's stages: cells and stroma texture
# --------------------------------------------------------------------------------------------------
@dataclass
class _MalignantCells:
    """Malignant cells, one per seed, each with its nucleus (per-cell arrays, then pixel maps)."""

    seeds: np.ndarray  # (n, 2) cell centres x, y, px
    centre_x: np.ndarray  # nucleus centre, px (the seed plus a small offset)
    centre_y: np.ndarray
    major: np.ndarray  # semi-major axis, px
    minor: np.ndarray  # semi-minor axis, px
    angle: np.ndarray  # orientation of the major axis, rad
    harmonic_amplitude: np.ndarray  # (n, outline_harmonics) relative radius modulation
    harmonic_phase: np.ndarray  # (n, outline_harmonics) rad
    haematoxylin: np.ndarray  # factor on the nucleus H density
    tone: np.ndarray  # float32 factor on the cytoplasm densities
    nucleolus_x: np.ndarray  # nucleolus centre, px
    nucleolus_y: np.ndarray
    nucleolus_radius: np.ndarray  # px; 0 when the nucleus shows none
    owner: np.ndarray | None = None  # (H, W) int32 cell of each pixel (nearest seed), -1 none
    nuclei: np.ndarray | None = None  # (H, W) bool nucleus pixels
    radius: np.ndarray | None = None  # (H, W) float32 normalised radius in the nucleus (1: edge)
    nucleoli: np.ndarray | None = None  # (H, W) bool nucleolus pixels
    pixels: np.ndarray | None = None  # nucleus pixels per cell (0: the nucleus was not drawn)
    edges: np.ndarray | None = None  # (H, W) bool membranes between cells, inside the tumour


def _malignant_seeds(st: _RenderState) -> np.ndarray:
    """Malignant cell centres: a jittered hexagonal grid kept where it falls in the tumour.

    Tumour components that no grid point reached get one cell at their deepest pixel, so every
    component holds a cell.  Returns (n, 2) x, y in px.
    """
    size, tumour = st.size, st.tumour
    seeds = _hex_grid(st.rng, size, st.cell_spacing, st.params.malignant_jitter)
    if len(seeds):
        pix = np.clip(np.rint(seeds).astype(int), 0, size - 1)
        seeds = seeds[tumour[pix[:, 1], pix[:, 0]]]
    if tumour.any():
        n_comp, component, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8),
                                                                        8)
        pix = np.clip(np.rint(seeds).astype(int), 0, size - 1)
        seeded = np.zeros(n_comp, bool)
        seeded[component[pix[:, 1], pix[:, 0]]] = True
        extra = []
        depth = cv2.distanceTransform(tumour.astype(np.uint8), cv2.DIST_L2, 3)
        for c in np.flatnonzero(~seeded[1:]) + 1:
            x0, y0, w0, h0 = stats[c, :4]
            box = (slice(y0, y0 + h0), slice(x0, x0 + w0))
            sub = np.where(component[box] == c, depth[box], -1)
            py, px = np.unravel_index(int(np.argmax(sub)), sub.shape)
            extra.append((x0 + px, y0 + py))
        if extra:
            seeds = np.concatenate([seeds.reshape(-1, 2), np.array(extra, float)])
    return seeds


def _malignant_shapes(st: _RenderState, seeds: np.ndarray) -> _MalignantCells:
    """Draw size, shape and staining of every malignant nucleus: large, pleomorphic, vesicular.

    The radius is log-normal about the slide's nucleus radius with a spread that grows with its
    pleomorphism, as do the elongation and the Fourier harmonics that make the outline
    irregular; each nucleus gets its own haematoxylin factor, each cell its own cytoplasm tone,
    and most nuclei one prominent nucleolus off the centre.
    """
    p, rng, s = st.params, st.rng, st.scale
    n = len(seeds)
    pleo = st.style.pleomorphism
    radius = (st.style.nucleus_radius * p.malignant_radius_gain * s
              * np.exp(rng.normal(0.0, p.malignant_size_sd * pleo, n)))
    aspect = p.malignant_aspect + np.minimum(np.abs(rng.normal(0.0, p.malignant_aspect_sd * pleo,
                                                               n)), p.malignant_aspect_max_extra)
    major, minor = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    angle = rng.uniform(0, np.pi, n)
    centre_x = seeds[:, 0] + rng.normal(0, p.malignant_offset_px * s, n) if n else np.zeros(0)
    centre_y = seeds[:, 1] + rng.normal(0, p.malignant_offset_px * s, n) if n else np.zeros(0)
    harmonic_amplitude = rng.normal(0.0, p.outline_harmonic_sd * pleo, (n, p.outline_harmonics))
    harmonic_phase = rng.uniform(0, 2 * np.pi, (n, p.outline_harmonics))
    haematoxylin = np.exp(rng.normal(0.0, p.malignant_h_sd, n))
    tone = np.exp(rng.normal(0.0, p.cell_tone_sd, n)).astype(np.float32)
    nucleolus_angle = rng.uniform(0, 2 * np.pi, n)
    nucleolus_offset = rng.uniform(*p.nucleolus_offset, n) * radius
    nucleolus_radius = (rng.uniform(*p.nucleolus_radius_px, n) * s
                        * (rng.random(n) < p.p_nucleolus))
    return _MalignantCells(
        seeds=seeds, centre_x=centre_x, centre_y=centre_y, major=major, minor=minor, angle=angle,
        harmonic_amplitude=harmonic_amplitude, harmonic_phase=harmonic_phase,
        haematoxylin=haematoxylin, tone=tone,
        nucleolus_x=centre_x + nucleolus_offset * np.cos(nucleolus_angle),
        nucleolus_y=centre_y + nucleolus_offset * np.sin(nucleolus_angle),
        nucleolus_radius=nucleolus_radius)


def _draw_malignant(st: _RenderState, cells: _MalignantCells) -> None:
    """Rasterise the malignant cells: cell of each pixel, nuclei, nucleoli, membranes.

    Every tumour pixel belongs to the cell of its nearest seed (approximate Voronoi) and is nucleus
    where its normalised radius in that cell's irregular ellipse is at most 1.
    """
    p, size, n = st.params, st.size, len(cells.seeds)
    owner, distance = _nearest_seed(cells.seeds, size)
    # Only pixels near a seed can lie in its nucleus; skip the rest of the cytoplasm.
    reach = (float((cells.major * (1 + np.abs(cells.harmonic_amplitude).sum(1))).max())
             + p.nucleus_reach_margin_px * st.scale if n else 0.0)
    candidates = np.flatnonzero(st.tumour & (distance <= reach))
    nuclei = np.zeros((size, size), bool)
    radius = np.zeros((size, size), np.float32)
    nucleoli = np.zeros((size, size), bool)
    if n and len(candidates):
        own = owner.flat[candidates]
        ok = own >= 0
        candidates, own = candidates[ok], own[ok]
        rr = _ellipse_nuclei(candidates, own, size, cells.centre_x, cells.centre_y, cells.major,
                             cells.minor, cells.angle, cells.harmonic_amplitude,
                             cells.harmonic_phase)
        inside = rr <= 1.0
        nuclei.flat[candidates[inside]] = True
        radius.flat[candidates[inside]] = rr[inside]
        y, x = np.divmod(candidates[inside], size)
        own = own[inside]
        in_nucleolus = (np.hypot(x - cells.nucleolus_x[own], y - cells.nucleolus_y[own])
                        <= cells.nucleolus_radius[own])
        nucleoli.flat[candidates[inside][in_nucleolus]] = True
        pixels = np.bincount(own, minlength=n)
    else:
        pixels = np.zeros(n, int)
    cells.owner, cells.nuclei, cells.radius, cells.nucleoli = owner, nuclei, radius, nucleoli
    cells.pixels = pixels
    cells.edges = _boundaries(owner) & st.tumour


def _malignant_cells(st: _RenderState) -> None:
    """Malignant cells: place them (:func:`_malignant_seeds`), draw their nuclei's shapes and
    staining (:func:`_malignant_shapes`) and rasterise them (:func:`_draw_malignant`)."""
    cells = _malignant_shapes(st, _malignant_seeds(st))
    _draw_malignant(st, cells)
    st.malignant = cells


@dataclass
class _NormalNuclei:
    """Normal epithelial (luminal) and myoepithelial nuclei on the rings of the ducts."""

    seeds: np.ndarray  # (n, 3) centre x, y in px and major-axis angle in rad
    myoepithelial: np.ndarray  # (n,) bool
    major: np.ndarray  # semi-major axis, px
    minor: np.ndarray  # semi-minor axis, px
    nuclei: np.ndarray | None = None  # (H, W) bool nucleus pixels
    myoepithelial_pixels: np.ndarray | None = None  # (H, W) bool pixels of myoepithelial nuclei
    pixels: np.ndarray | None = None  # nucleus pixels per nucleus (0: not drawn)


def _normal_seeds(st: _RenderState) -> tuple[np.ndarray, np.ndarray]:
    """Centres and orientations of the normal nuclei, evenly spaced on rings around each lumen.

    One ring per luminal layer, whose nuclei point to the lumen, and an outer ring of flat
    myoepithelial nuclei lying along the outline; nuclei whose centre falls outside the patch are
    dropped.  Returns seeds (n, 3: x, y, major-axis angle) and the myoepithelial flags.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    seeds, kinds = [], []
    for cx, cy, lumen_a, lumen_b, angle, layers in st.ducts:
        ca, sa = math.cos(angle), math.sin(angle)
        rings = ([(k + 0.5) * p.epithelial_layer_px * s for k in range(layers)]
                 + [layers * p.epithelial_layer_px * s + p.myoepithelial_offset_px * s])
        for k, offset in enumerate(rings):
            myo = k == len(rings) - 1
            ring_a, ring_b = lumen_a + offset, lumen_b + offset
            # Ramanujan's approximation of the perimeter of an ellipse.
            perimeter = math.pi * (3 * (ring_a + ring_b)
                                   - math.sqrt((3 * ring_a + ring_b) * (ring_a + 3 * ring_b)))
            spacing = p.myoepithelial_spacing_px if myo else p.luminal_spacing_px
            n = max(p.min_ring_nuclei, int(perimeter / (spacing * s)))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            t = t + rng.normal(0, p.ring_jitter / n * 2 * np.pi, n)
            px, py = ring_a * np.cos(t), ring_b * np.sin(t)
            # Outline normal direction: luminal nuclei point to the lumen, myoepithelial ones lie flat.
            nx, ny = np.cos(t) / ring_a, np.sin(t) / ring_b
            normal_angle = np.arctan2(nx * sa + ny * ca, nx * ca - ny * sa)
            seeds.append(np.stack([cx + px * ca - py * sa, cy + px * sa + py * ca,
                                   normal_angle + (np.pi / 2 if myo else 0.0)], 1))
            kinds.append(np.full(n, myo))
    if not seeds:
        return np.zeros((0, 3)), np.zeros(0, bool)
    seeds, myoepithelial = np.concatenate(seeds), np.concatenate(kinds)
    keep = ((seeds[:, 0] >= 0) & (seeds[:, 0] <= size - 1) & (seeds[:, 1] >= 0)
            & (seeds[:, 1] <= size - 1))
    return seeds[keep], myoepithelial[keep]


def _normal_nuclei(st: _RenderState) -> None:
    """Normal nuclei: small and regular, luminal ovals and thin myoepithelial ellipses.

    Seeds from :func:`_normal_seeds`; every duct pixel belongs to its nearest seed and is nucleus
    inside that seed's ellipse.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    seeds, myoepithelial = _normal_seeds(st)
    n = len(seeds)
    major = np.where(myoepithelial, rng.uniform(*p.myoepithelial_major_px, n),
                     rng.uniform(*p.luminal_major_px, n)) * s
    minor = np.where(myoepithelial, rng.uniform(*p.myoepithelial_minor_px, n),
                     rng.uniform(*p.luminal_minor_px, n)) * s
    owner, _ = _nearest_seed(seeds[:, :2], size)
    candidates = np.flatnonzero(st.compartments == _DUCT)
    nuclei = np.zeros((size, size), bool)
    pixels = np.zeros(n, int)
    myoepithelial_pixels = np.zeros((size, size), bool)
    if n and len(candidates):
        own = owner.flat[candidates]
        rr = _ellipse_nuclei(candidates, own, size, seeds[:, 0], seeds[:, 1], major, minor,
                             seeds[:, 2])
        inside = rr <= 1.0
        nuclei.flat[candidates[inside]] = True
        myoepithelial_pixels.flat[candidates[inside]] = myoepithelial[own[inside]]
        pixels = np.bincount(own[inside], minlength=n)
    st.normal = _NormalNuclei(seeds=seeds, myoepithelial=myoepithelial, major=major, minor=minor,
                              nuclei=nuclei, myoepithelial_pixels=myoepithelial_pixels,
                              pixels=pixels)


def _collagen_fibres(st: _RenderState) -> None:
    """Collagen fibre direction and texture of the stroma.

    Fibres run along the isolines of a phase that grows with the distance to nests, ducts and fat
    (so fibres wrap around them) and along one random direction elsewhere, plus noise; the texture
    is noise smeared along that direction (:func:`_fibre_texture`).  Sets ``structure_distance``,
    ``has_structures``, ``fibre_direction`` and ``fibres``.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    comp = st.compartments
    structures = (comp == _TUMOUR) | (comp == _DUCT) | (comp == _FAT)
    st.has_structures = bool(structures.any())
    if st.has_structures:
        distance = cv2.distanceTransform((~structures).astype(np.uint8), cv2.DIST_L2, 5)
        distance = np.minimum(distance, p.structure_distance_max_px * s)
    else:
        distance = np.zeros((size, size), np.float32)
    drift = rng.uniform(0, np.pi)
    phase = (p.fibre_wrap * distance
             + p.fibre_drift * (st.xx * np.cos(drift) + st.yy * np.sin(drift))
             + p.fibre_wave_px * s * _smooth_noise(rng, (size, size), p.fibre_wave_length_px * s))
    gy, gx = np.gradient(cv2.GaussianBlur(phase, (0, 0), p.fibre_smoothing_px * s))
    direction = (np.arctan2(gy, gx) + np.pi / 2
                 + p.fibre_direction_noise * _smooth_noise(rng, (size, size),
                                                           p.fibre_direction_length_px * s))
    st.structure_distance, st.fibre_direction = distance, direction
    st.fibres = _fibre_texture(rng, direction, s, st.xx, st.yy)


@dataclass
class _Lymphocytes:
    """Lymphocytes: small, round, very dark nuclei with a thin rim of cytoplasm."""

    centres: np.ndarray  # (n, 2) x, y, px
    in_tumour: np.ndarray  # (n,) bool: intratumoural (TIL-E) rather than stromal (TIL-S)
    radius: np.ndarray  # nucleus radius, px
    owner: np.ndarray  # (H, W) int32 nearest lymphocyte of each pixel, -1 none
    cells: np.ndarray  # (H, W) bool nucleus plus cytoplasm, on tissue
    nuclei: np.ndarray  # (H, W) bool nucleus, on tissue


def _lymphocyte_density(st: _RenderState) -> np.ndarray:
    """Share of candidate stromal lymphocytes kept, per pixel (float64).

    The patch's lymphocyte level times a patchy field, raised towards ``aggregate_peak`` at the
    centres of lymphoid aggregates (Gaussian bumps).
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    density = st.context.lymphocyte_level * np.clip(
        p.lymphocyte_base + p.lymphocyte_patchiness * _smooth_noise(
            rng, (size, size), p.lymphocyte_patch_length_px * s), 0.0, 1.0)
    for _ in range(rng.poisson(st.context.aggregate_rate)):
        ax, ay = rng.uniform(0, size, 2)
        radius = rng.uniform(*p.aggregate_radius_px) * s
        half = p.aggregate_extent * radius
        x0, x1 = int(max(0, ax - half)), int(min(size, ax + half + 1))
        y0, y1 = int(max(0, ay - half)), int(min(size, ay + half + 1))
        if x0 < x1 and y0 < y1:
            box = (slice(y0, y1), slice(x0, x1))
            bump = np.exp(-((st.xx[box] - ax) ** 2 + (st.yy[box] - ay) ** 2) / (2 * radius ** 2))
            density[box] = np.maximum(density[box], p.aggregate_peak * bump)
    return density


def _lymphocyte_masks(centres: np.ndarray, radius: np.ndarray, size: int, scale: float,
                      p: RenderParams = RENDER_PARAMS):
    """Round lymphocytes as pixel maps: (owner, cells, nuclei).

    A pixel is nucleus when it lies within ``radius`` of its nearest centre, and cell when within
    the radius plus ``lymphocyte_cytoplasm_px``.  Distances to the owning centre are exact (the
    chamfer distance would draw square lymphocytes).
    """
    owner, chamfer = _nearest_seed(centres, size)
    cells = np.zeros((size, size), bool)
    nuclei = np.zeros((size, size), bool)
    if len(centres):
        near = np.flatnonzero(chamfer <= p.lymphocyte_search_px * scale
                              + p.lymphocyte_search_margin)
        own = owner.flat[near]
        yq, xq = np.divmod(near, size)
        distance = np.hypot(xq - centres[own, 0], yq - centres[own, 1])
        cells.flat[near[distance <= radius[own] + p.lymphocyte_cytoplasm_px * scale]] = True
        nuclei.flat[near[distance <= radius[own]]] = True
    return owner, cells, nuclei


def _lymphocytes(st: _RenderState) -> None:
    """Lymphocytes: scattered in the stroma, a few among the tumour cells, none elsewhere.

    Candidates on a dense jittered grid are kept with the probability of
    :func:`_lymphocyte_density` in stroma and ``intratumoural_lymphocytes`` times the patch level
    in tumour; each gets a radius and is drawn by :func:`_lymphocyte_masks`, on tissue only.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    comp = st.compartments
    density = _lymphocyte_density(st)
    centres = _hex_grid(rng, size, p.lymphocyte_spacing_px * s, p.lymphocyte_jitter)
    if len(centres):
        pix = np.clip(np.rint(centres).astype(int), 0, size - 1)
        where = comp[pix[:, 1], pix[:, 0]]
        p_keep = np.where(where == _STROMA, density[pix[:, 1], pix[:, 0]],
                          np.where(where == _TUMOUR,
                                   p.intratumoural_lymphocytes * st.context.lymphocyte_level, 0.0))
        keep = rng.random(len(centres)) < p_keep
        centres, in_tumour = centres[keep], (where == _TUMOUR)[keep]
    else:
        in_tumour = np.zeros(0, bool)
    radius = rng.uniform(*p.lymphocyte_radius_px, len(centres)) * s
    owner, cells, nuclei = _lymphocyte_masks(centres, radius, size, s, p)
    cells &= comp != _WHITE
    nuclei &= comp != _WHITE
    st.lymphocytes = _Lymphocytes(centres=centres, in_tumour=in_tumour, radius=radius,
                                  owner=owner, cells=cells, nuclei=nuclei)


@dataclass
class _Fibroblasts:
    """Fibroblasts: thin elongated nuclei along the collagen."""

    centres: np.ndarray  # (n, 2) x, y, px
    nuclei: np.ndarray  # (H, W) bool
    pixels: np.ndarray  # nucleus pixels per fibroblast


def _fibroblasts(st: _RenderState) -> None:
    """Fibroblasts in the stroma (not under a lymphocyte), along the local fibre direction.

    Candidates on a jittered grid are kept with probability ``p_septum_fibroblast`` in thin septa
    (closer than ``septum_px`` to a structure: crowded, as in the real patch) and
    ``p_stroma_fibroblast`` times the patch density in open stroma (sparse).
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    lymphocyte_cells = st.lymphocytes.cells
    centres = _hex_grid(rng, size, p.fibroblast_spacing_px * s, p.fibroblast_jitter)
    if len(centres):
        pix = np.clip(np.rint(centres).astype(int), 0, size - 1)
        p_keep = np.where(st.structure_distance[pix[:, 1], pix[:, 0]] < p.septum_px * s,
                          p.p_septum_fibroblast,
                          p.p_stroma_fibroblast * st.context.fibroblast_density)
        centres = centres[st.stroma[pix[:, 1], pix[:, 0]] & ~lymphocyte_cells[pix[:, 1], pix[:, 0]]
                          & (rng.random(len(centres)) < p_keep)]
    n = len(centres)
    pix = np.clip(np.rint(centres).astype(int), 0, size - 1)
    angle = st.fibre_direction[pix[:, 1], pix[:, 0]]
    major = rng.uniform(*p.fibroblast_major_px, n) * s
    minor = rng.uniform(*p.fibroblast_minor_px, n) * s
    owner, distance = _nearest_seed(centres, size)
    candidates = np.flatnonzero(st.stroma & (distance <= p.fibroblast_reach_px * s)
                                & ~lymphocyte_cells)
    nuclei = np.zeros((size, size), bool)
    if n and len(candidates):
        own = owner.flat[candidates]
        rr = _ellipse_nuclei(candidates, own, size, centres[:, 0], centres[:, 1], major, minor,
                             angle)
        nuclei.flat[candidates[rr <= 1.0]] = True
        pixels = np.bincount(own[rr <= 1.0], minlength=n)
    else:
        pixels = np.zeros(n, int)
    st.fibroblasts = _Fibroblasts(centres=centres, nuclei=nuclei, pixels=pixels)


def _red_cells(st: _RenderState) -> None:
    """Red blood cells in a few capillaries: short rows of discs, in stroma not under a nucleus."""
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    red = np.zeros((size, size), np.uint8)
    for _ in range(rng.poisson(p.capillary_rate * st.area_factor)):
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for k in range(int(rng.integers(*p.red_cells_per_capillary))):
            cx = x0 + k * p.red_cell_step_px * s * math.cos(angle) + rng.normal(
                0, p.red_cell_jitter_px * s)
            cy = y0 + k * p.red_cell_step_px * s * math.sin(angle) + rng.normal(
                0, p.red_cell_jitter_px * s)
            cv2.circle(red, (int(round(cx)), int(round(cy))),
                       max(1, int(round(p.red_cell_radius_px * s))), 1, -1)
    st.red_cells = (red > 0) & st.stroma & ~st.lymphocytes.cells & ~st.fibroblasts.nuclei


# --------------------------------------------------------------------------------------------------
# The renderer's stages: truth, stain densities, image, annotations
# --------------------------------------------------------------------------------------------------
def _measure_truth(st: _RenderState) -> None:
    """Exact truth (SPEC 1.2): malignant-cell area over tissue area.

    Malignant cells are the tumour pixels not under a lymphocyte; tissue is everything but glass.
    Clips the malignant nuclei to the malignant cells and the normal nuclei to outside the
    lymphocytes, as the image is painted.
    """
    st.tissue = st.compartments != _WHITE
    lymphocyte_cells = st.lymphocytes.cells
    st.malignant_area = st.tumour & ~lymphocyte_cells & st.tissue
    st.malignant.nuclei &= st.malignant_area
    st.normal.nuclei &= ~lymphocyte_cells
    n_tissue = int(st.tissue.sum())
    st.cellularity = float(st.malignant_area.sum() / n_tissue) if n_tissue else 0.0


def _tissue_densities(st: _RenderState) -> None:
    """Haematoxylin and eosin densities of everything but the nuclei (float32).

    Glass first, then lumen secretion, stroma (fibres, and collagen packed densest in the septa
    hugging nests and ducts), malignant cytoplasm (each cell its tone) and membranes, normal
    epithelium, fat membranes.  Draws the fine and grain noise fields (also used for nuclei).
    Whole-array arithmetic selected with np.where is several times faster than masked
    gather/scatter on these sizes.
    """
    p, rng, s, size = st.params, st.rng, st.scale, st.size
    f32 = np.float32
    st.fine = fine = _smooth_noise(rng, (size, size), p.fine_noise_px * s)
    st.grain = grain = _smooth_noise(rng, (size, size), p.grain_noise_px * s)
    comp, cells = st.compartments, st.malignant
    tumour, duct, fat = comp == _TUMOUR, comp == _DUCT, comp == _FAT
    e_od = np.full((size, size), p.glass_e_od, f32)
    h_od = np.full((size, size), p.glass_h_od, f32)
    e_od = np.where(st.lumen, f32(p.lumen_e_od) + f32(p.lumen_e_grain) * grain, e_od)
    packed = (np.exp(-st.structure_distance / f32(p.collagen_packing_px * s))
              if st.has_structures else f32(0.0))
    e_od = np.where(st.stroma, f32(st.context.stroma_eosin)
                    * (f32(p.stroma_e_od) + f32(p.stroma_e_fibres) * st.fibres
                       + f32(p.stroma_e_packed) * packed)
                    * (f32(1) + f32(p.stroma_e_fine) * fine), e_od)
    h_od = np.where(st.stroma, f32(p.stroma_h_od) + f32(p.stroma_h_grain) * grain, h_od)
    tone = cells.tone[np.maximum(cells.owner, 0)] if len(cells.seeds) else f32(1.0)
    e_od = np.where(tumour, f32(p.tumour_e_od) * tone
                    * (f32(1) + f32(p.tumour_e_grain) * grain + f32(p.tumour_e_fine) * fine), e_od)
    h_od = np.where(tumour, f32(p.tumour_h_od) * tone * (f32(1) + f32(p.tumour_h_grain) * grain),
                    h_od)
    e_od += f32(p.cell_edge_e_od) * cells.edges
    h_od += f32(p.cell_edge_h_od) * cells.edges
    e_od = np.where(duct, f32(p.duct_e_od) * (f32(1) + f32(p.duct_e_grain) * grain), e_od)
    h_od = np.where(duct, f32(p.duct_h_od), h_od)
    e_od = np.where(fat, f32(p.fat_e_od), e_od)
    h_od = np.where(fat, f32(p.fat_h_od), h_od)
    st.h_od, st.e_od = h_od, e_od


def _nucleus_densities(st: _RenderState) -> None:
    """Paint the nuclei and red cells over the tissue densities (float32), class by class.

    Malignant nuclei are vesicular (pale centre, dark rim, chromatin clumps) with nucleoli; normal
    and myoepithelial nuclei are uniform with fine clumps; fibroblasts dark; lymphocytes darkest,
    with their rim of cytoplasm; then red blood cells, which also set the haemoglobin density.
    """
    p = st.params
    f32 = np.float32
    h_od, e_od, fine = st.h_od, st.e_od, st.fine
    cells, normal, lymphocytes = st.malignant, st.normal, st.lymphocytes
    clumps = np.clip(fine - f32(p.chromatin_threshold), 0.0, p.chromatin_max)
    if len(cells.seeds) and cells.nuclei.any():
        haematoxylin = cells.haematoxylin.astype(f32)[np.maximum(cells.owner, 0)]
        rim = _smoothstep(f32(p.malignant_rim_start), f32(1.0), cells.radius)
        h_od = np.where(cells.nuclei, f32(p.malignant_h_od) * haematoxylin
                        * (f32(p.malignant_h_centre) + f32(p.malignant_h_rim) * rim
                           + f32(p.malignant_h_clumps) * clumps), h_od)
        e_od = np.where(cells.nuclei, f32(p.malignant_e_od), e_od)
        h_od += f32(p.nucleolus_h_od) * cells.nucleoli
        e_od += f32(p.nucleolus_e_od) * cells.nucleoli
    h_od = np.where(normal.nuclei, np.where(normal.myoepithelial_pixels, f32(p.myoepithelial_h_od),
                                            f32(p.luminal_h_od))
                    * (f32(1) + f32(p.normal_h_clumps) * clumps), h_od)
    e_od = np.where(normal.nuclei, f32(p.normal_e_od), e_od)
    fibroblasts = st.fibroblasts.nuclei
    h_od = np.where(fibroblasts, f32(p.fibroblast_h_od) * (f32(1) + f32(p.fibroblast_h_fine) * fine),
                    h_od)
    e_od = np.where(fibroblasts, f32(p.fibroblast_e_od), e_od)
    cytoplasm = lymphocytes.cells & ~lymphocytes.nuclei
    e_od = np.where(cytoplasm, f32(p.lymphocyte_cytoplasm_e_od), e_od)
    h_od = np.where(cytoplasm, f32(p.lymphocyte_cytoplasm_h_od), h_od)
    h_od = np.where(lymphocytes.nuclei,
                    f32(p.lymphocyte_h_od) * (f32(1) + f32(p.lymphocyte_h_fine) * fine), h_od)
    e_od = np.where(lymphocytes.nuclei, f32(p.lymphocyte_e_od), e_od)
    e_od = np.where(st.red_cells, f32(p.red_cell_e_od), e_od)
    h_od = np.where(st.red_cells, f32(p.red_cell_h_od), h_od)
    st.h_od, st.e_od = h_od, e_od
    st.red_od = f32(p.red_cell_od) * st.red_cells


def _beer_lambert(h_od: np.ndarray, e_od: np.ndarray, red_od: np.ndarray, style: SlideStyle,
                  h_gain: float = 1.0, e_gain: float = 1.0) -> np.ndarray:
    """Transmitted light, (H, W, 3) float32 grey levels: I = I0 10^-(cH h + cE e + cR r).

    Per channel, with the slide's stain vectors h and e, the haemoglobin vector r, the slide's
    background I0, and the stain densities cH and cE times the slide's intensities (and the
    patch's ``h_gain``, ``e_gain``).  Channel by channel: 2-D arrays are much faster than
    broadcasting over a trailing axis of 3.
    """
    f32 = np.float32
    h_od = h_od * f32(style.h_scale * h_gain)
    e_od = e_od * f32(style.e_scale * e_gain)
    ln10 = f32(-math.log(10.0))
    channels = []
    for c in range(3):
        od = (h_od * f32(style.h_vector[c]) + e_od * f32(style.e_vector[c])
              + red_od * f32(_RBC_VECTOR[c]))
        channels.append(f32(style.background[c]) * np.exp(od * ln10))
    return cv2.merge(channels)


def _camera(st: _RenderState, rgb: np.ndarray) -> np.ndarray:
    """What the scanner records: the slide's optical blur, sensor noise, rounding to uint8.

    The noise is the difference of two uniforms (triangular, half-width ``sensor_noise``, sd 1.4
    grey levels): 4x cheaper to draw than Gaussian noise and indistinguishable at this amplitude.
    """
    f32 = np.float32
    rgb = cv2.GaussianBlur(rgb, (0, 0), st.style.blur * st.scale)
    rgb += f32(st.params.sensor_noise) * (st.rng.random(rgb.shape, dtype=f32)
                                          - st.rng.random(rgb.shape, dtype=f32))
    return np.clip(rgb + f32(0.5), 0, 255).astype(np.uint8)


def _annotations(st: _RenderState) -> tuple[pd.DataFrame, dict]:
    """Nucleus centres of the annotated classes, and the number of nuclei per class.

    A nucleus counts when at least one of its pixels was drawn.  Malignant centres carry the
    slide's tumour type, normal ones "normal" or "UDH", lymphocytes TIL-E inside tumour and TIL-S
    in stroma; coordinates are rounded and clipped to the patch.
    """
    size = st.size
    cells, normal, lymphocytes = st.malignant, st.normal, st.lymphocytes
    rows = []
    malignant_drawn = cells.pixels > 0
    for x, y in zip(cells.centre_x[malignant_drawn], cells.centre_y[malignant_drawn]):
        rows.append((x, y, "malignant", st.style.tumour_type))
    normal_drawn = normal.pixels > 0
    for x, y in normal.seeds[normal_drawn, :2]:
        rows.append((x, y, "normal", st.context.normal_description))
    lymphocyte_drawn = np.zeros(len(lymphocytes.centres), bool)
    if len(lymphocytes.centres):
        lymphocyte_drawn[np.unique(lymphocytes.owner[lymphocytes.nuclei])] = True
    for (x, y), intratumoural in zip(lymphocytes.centres[lymphocyte_drawn],
                                     lymphocytes.in_tumour[lymphocyte_drawn]):
        rows.append((x, y, "lymphocyte", "TIL-E" if intratumoural else "TIL-S"))
    points = pd.DataFrame(rows, columns=["x", "y", "cls", "description"])
    points["x"] = np.clip(np.rint(points["x"].to_numpy(float)), 0, size - 1).astype(int)
    points["y"] = np.clip(np.rint(points["y"].to_numpy(float)), 0, size - 1).astype(int)
    counts = {"malignant": int(malignant_drawn.sum()), "normal": int(normal_drawn.sum()),
              "lymphocyte": int(lymphocyte_drawn.sum()),
              "fibroblast": int((st.fibroblasts.pixels > 0).sum())}
    return points, counts


def _class_masks(st: _RenderState) -> dict:
    """The boolean class maps of :class:`SynthPatch` ``masks``."""
    return {
        "tissue": st.tissue,
        "malignant": st.malignant_area,
        "normal": (st.compartments == _DUCT) & ~st.lymphocytes.cells,
        "stroma": st.stroma,
        "malignant_nuclei": st.malignant.nuclei,
        "normal_nuclei": st.normal.nuclei,
        "lymphocyte_nuclei": st.lymphocytes.nuclei,
        "fibroblast_nuclei": st.fibroblasts.nuclei,
    }


# --------------------------------------------------------------------------------------------------
# The renderer
# --------------------------------------------------------------------------------------------------
def render_patch(size: int = 512, cellularity: float | None = None, seed=0, *,
                 style: SlideStyle | None = None, scale: float = 1.0,
                 with_masks: bool = True, params: RenderParams | None = None) -> SynthPatch:
    """Render one synthetic H&E patch with exact cellularity, nucleus centres and class masks.

    Implements SPEC 1.2 (the synthetic stand-in for the BreastPathQ patches of paper section 4.1).
    The layout aims at ``cellularity`` (drawn from :func:`sample_cellularity` when None) by growing
    tumour nests over the right share of the tissue; the returned ``cellularity`` is the realised
    truth, recomputed from the masks, and usually within 0.02 of the target.  No notebook calls it
    directly: :func:`cellulib.data.synthset.make_breastpathq` renders every synthetic patch with it,
    and that dataset (``datasets.get_dataset``) is what every chapter reads on synthetic data;
    ``cellulib.bench.suite``
    times it.

    The patch is built by a fixed sequence of stages (layout, cells, truth, stain densities,
    scanner), each a function of this module operating on a :class:`_RenderState`; every number
    they use is a named entry of :class:`RenderParams`.

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
    params : RenderParams or None
        The numbers to render with (:data:`GENERATORS`); None: :data:`RENDER_PARAMS`.

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
    size = check_int("size", size, 32)
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
    params = RENDER_PARAMS if params is None else params
    if not isinstance(params, RenderParams):
        raise TypeError(f"params must be a RenderParams, got {type(params).__name__}")
    st = _new_state(rng, size, float(scale), style, target, params)
    # Layout: glass, fat and ducts (independent of the target), then tumour nests sized by it.
    _add_glass(st)
    _add_fat(st)
    _add_ducts(st)
    _grow_tumour(st, _tumour_pixels_needed(st))
    _add_clefts(st)
    st.stroma = st.compartments == _STROMA  # the layout is final from here on
    # Cells and the stroma's texture.
    _malignant_cells(st)
    _normal_nuclei(st)
    _collagen_fibres(st)
    _lymphocytes(st)
    _fibroblasts(st)
    _red_cells(st)
    _measure_truth(st)
    # Stain densities, then the image a scanner records.
    _tissue_densities(st)
    _nucleus_densities(st)
    img = _camera(st, _beer_lambert(st.h_od, st.e_od, st.red_od, style,
                                    st.context.h_jitter * params.h_gain,
                                    st.context.e_jitter * params.e_gain))
    points, counts = _annotations(st)
    return SynthPatch(img=img, cellularity=st.cellularity, target=target, counts=counts,
                      points=points, masks=_class_masks(st) if with_masks else None,
                      tissue_fraction=int(st.tissue.sum()) / float(size * size))
