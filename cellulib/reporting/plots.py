"""Every figure of the book: small functions that take arrays and tables and return a matplotlib Figure.

Colours follow the paper's Fig. 3: malignant red, normal epithelial green, lymphocyte blue.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from cellulib.constants import NUCLEUS_CLASSES
from cellulib.files.imageio import figure_png

#: Display colour of each weak-mask channel (normal, lymphocyte, malignant), as in the paper's Fig. 3.
CLASS_COLOURS = {"normal": "#2ca02c", "lymphocyte": "#1f77b4", "malignant": "#d62728"}


def _hex_to_rgb(colour: str) -> np.ndarray:
    return np.array(matplotlib.colors.to_rgb(colour))


def cellularity_histogram(
    cellularity: pd.Series | np.ndarray,
    hue: pd.Series | np.ndarray | None = None,
    bins: int = 20,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """Histogram of cellularity scores, optionally split by ``hue`` (e.g. the split); paper Fig. 6.

    Used in chapter 1 (data exploration).
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    fig = ax.figure
    frame = pd.DataFrame({"cellularity": np.asarray(cellularity, dtype=float)})
    if hue is not None:
        frame["split"] = np.asarray(hue)
    sns.histplot(
        frame,
        x="cellularity",
        hue="split" if hue is not None else None,
        bins=np.linspace(0, 1, bins + 1),
        multiple="stack",
        ax=ax,
    )
    ax.set_xlabel("cellularity (fraction of tumour bed, 0-1)")
    ax.set_ylabel("patches")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def patch_gallery(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    size: float = 2.6,
) -> plt.Figure:
    """A grid of RGB patches with titles. Used in chapter 1."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def mask_to_rgb(mask: np.ndarray) -> np.ndarray:
    """Colour a (4, H, W) or (3, H, W) weak mask or probability map: normal green, lymphocyte blue,
    malignant red, background black. Returns an (H, W, 3) float image in [0, 1]."""
    mask = np.asarray(mask, dtype=float)
    colours = np.stack([_hex_to_rgb(CLASS_COLOURS[c]) for c in NUCLEUS_CLASSES])  # (3, 3)
    rgb = np.einsum("chw,ck->hwk", np.clip(mask[:3], 0, 1), colours)
    return np.clip(rgb, 0, 1)


def overlay_mask(img: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a coloured weak mask over an RGB uint8 image where any nucleus channel is on."""
    base = np.asarray(img, dtype=float) / 255.0
    colour = mask_to_rgb(mask)
    on = (np.asarray(mask[:3]).max(axis=0) > 0.5)[..., None]
    return np.where(on, (1 - alpha) * base + alpha * colour, base)


def weak_mask_panels(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    points: Sequence[pd.DataFrame] | None = None,
    size: float = 2.8,
) -> plt.Figure:
    """Patches (top row) and the weak masks drawn from their nucleus centroids (bottom row); paper
    Fig. 3. ``points`` (x, y, cls in the mask's pixel frame) are marked on the top row when given.
    Used in chapter 1 through :func:`weak_mask_examples`."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(size * n, 2 * size + 0.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        if points is not None:
            for cls in NUCLEUS_CLASSES:
                sel = points[i][points[i]["cls"] == cls]
                axes[0, i].scatter(sel["x"], sel["y"], s=6, c=CLASS_COLOURS[cls], label=cls)
        axes[1, i].imshow(overlay_mask(images[i], masks[i]))
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("patch + centroids")
    axes[1, 0].set_ylabel("weak mask")
    handles = [
        matplotlib.patches.Patch(color=CLASS_COLOURS[c], label=c) for c in NUCLEUS_CLASSES
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def weak_mask_examples(cells: pd.DataFrame, downscale: float, diameter: float,
                       n: int = 4) -> plt.Figure:
    """:func:`weak_mask_panels` of the first ``n`` annotated patches of ``cells``
    (:func:`cellulib.data.breastpathq.read_cells`), downscaled by ``downscale`` with the weak masks
    of ``diameter``-pixel discs that the segmentation networks learn from (paper Fig. 3). Used in
    chapter 1."""
    from cellulib.data import breastpathq, transforms
    from cellulib.files.imageio import read_image

    imgs, masks, pts = [], [], []
    for row in cells.head(min(n, len(cells))).itertuples():
        img = transforms.downscale(read_image(row.image_path), downscale)
        points = breastpathq.read_cell_points(row.xml_path)
        imgs.append(img)
        masks.append(transforms.weak_mask(points, img.shape[:2], diameter=diameter, scale=1 / downscale))
        pts.append(transforms.scale_points(points, 1 / downscale))
    return weak_mask_panels(imgs, masks, pts)


def class_counts_bar(counts: pd.DataFrame, ax: plt.Axes | None = None) -> plt.Figure:
    """Bar chart of annotated nuclei per class (columns normal, lymphocyte, malignant). Used in
    chapter 1."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    fig = ax.figure
    totals = counts[list(NUCLEUS_CLASSES)].sum()
    ax.bar(totals.index, totals.values, color=[CLASS_COLOURS[c] for c in totals.index])
    ax.set_xlabel("nucleus class")
    ax.set_ylabel("annotated nuclei (count)")
    for x, v in enumerate(totals.values):
        ax.annotate(f"{int(v)}", (x, v), ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    return fig


def stain_comparison(stats: pd.DataFrame) -> plt.Figure:
    """Compare stain optical densities of synthetic and real patches in HED space.

    ``stats`` has one row per patch with columns ``source`` (e.g. synthetic / real) and the mean
    optical densities ``H``, ``E`` (and optionally ``D``). Used in chapter 1.
    """
    channels = [c for c in ("H", "E", "D") if c in stats.columns]
    long = stats.melt(id_vars="source", value_vars=channels, var_name="stain", value_name="od")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.stripplot(long, x="stain", y="od", hue="source", dodge=True, alpha=0.7, ax=ax)
    ax.set_xlabel("stain channel (colour deconvolution, Ruifrok & Johnston)")
    ax.set_ylabel("mean optical density (OD units)")
    fig.tight_layout()
    return fig


def size_comparison(sizes: pd.DataFrame) -> plt.Figure:
    """Distributions of nucleus equivalent diameters (column ``diameter_px``) by ``source``.
    Used in chapter 1."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.histplot(
        sizes, x="diameter_px", hue="source", stat="density", common_norm=False,
        element="step", bins=30, ax=ax,
    )
    ax.set_xlabel("nucleus equivalent diameter (pixels at 512x512 patch scale)")
    ax.set_ylabel("density")
    fig.tight_layout()
    return fig


def glue_figure(name: str, fig: plt.Figure, dpi: int = 120) -> None:
    """Store ``fig`` as a PNG under ``name`` for a ``{glue:figure}`` directive of the book, then
    close it so the notebook does not show it twice. Rendering to PNG here makes the page independent
    of the kernel's matplotlib backend. Used in every chapter."""
    from IPython.display import Image
    from myst_nb import glue

    glue(name, Image(data=figure_png(fig, dpi), format="png"), display=False)
    plt.close(fig)


def glue_skipped(message: str, texts: Sequence[str] = (), figures: Sequence[str] = (),
                 figure_text: str = "section skipped", plain: Sequence[str] = ("finding",)) -> None:
    """Glue what a chapter shows when its data are missing: ``message`` in italics under each of
    ``texts`` (as it is under those of ``plain``, such as the one-line finding), and a
    :func:`message_figure` saying ``figure_text`` under each of ``figures``, so that every glue
    directive of the skipped sections still finds a value. Used in the real-H&E and stain-shift
    chapters."""
    from IPython.display import Markdown
    from myst_nb import glue

    for key in texts:
        glue(key, Markdown(message if key in plain else f"*{message}*"), display=False)
    for key in figures:
        glue_figure(key, message_figure(figure_text))


def training_curves(histories: dict[str, pd.DataFrame], metric: str) -> plt.Figure:
    """Loss (train solid, validation dashed) and a validation metric per epoch, one colour per run.

    ``histories`` maps a run name to its history table (``epoch``, ``train_loss``, ``valid_loss``,
    ``metric``). Used in chapters 2-4 (training curves, paper Fig. 8).
    """
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, hist) in enumerate(histories.items()):
        colour = f"C{i}"
        ax_loss.plot(hist.epoch, hist.train_loss, color=colour, label=f"{name} train")
        ax_loss.plot(hist.epoch, hist.valid_loss, color=colour, ls="--", label=f"{name} validation")
        ax_metric.plot(hist.epoch, hist[metric], color=colour, marker="o", label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric.replace('_', ' ')}")
    ax_metric.legend(fontsize=8)
    fig.tight_layout()
    return fig


def segmentation_panels(img: np.ndarray, mask: np.ndarray, probs: np.ndarray,
                        blobs: np.ndarray) -> plt.Figure:
    """Paper Fig. 7: (a) patch, (b) weak ground truth over it, (c) malignant activation map,
    (d) LoG blobs of the activation map (circles of radius sigma * sqrt(2)). Used in chapter 2."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    axes[0].imshow(img)
    axes[0].set_title("(a) patch")
    axes[1].imshow(overlay_mask(img, mask))
    axes[1].set_title("(b) weak ground truth")
    shown = axes[2].imshow(probs[2], cmap="magma", vmin=0, vmax=1)
    axes[2].set_title("(c) malignant activation")
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02, label="probability")
    axes[3].imshow(img)
    for y, x, sigma in np.asarray(blobs).reshape(-1, 3):
        axes[3].add_patch(plt.Circle((x, y), sigma * np.sqrt(2), color="#d62728", fill=False, lw=1.2))
    axes[3].set_title(f"(d) LoG blobs ({len(np.asarray(blobs).reshape(-1, 3))})")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def threshold_panels(img: np.ndarray, prob: np.ndarray, thresholds: Sequence[float]) -> plt.Figure:
    """Paper Fig. 4: the malignant channel thresholded at each value, over the patch. Used in chapter 3."""
    fig, axes = plt.subplots(1, len(thresholds), figsize=(3.2 * len(thresholds), 3.4))
    base = np.asarray(img, dtype=float) / 255.0
    red = _hex_to_rgb(CLASS_COLOURS["malignant"])
    for ax, t in zip(axes, thresholds):
        on = (prob > t)[..., None]
        ax.imshow(np.where(on, 0.45 * base + 0.55 * red, base))
        ax.set_title(f"p > {t:.2f}: {on.mean():.0%} of pixels", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def blob_panels(img: np.ndarray, blobs_by_threshold: dict[float, np.ndarray]) -> plt.Figure:
    """Paper Fig. 5: LoG blobs of the malignant map at several detection thresholds (circles of
    radius sigma * sqrt(2)). Used in chapter 3."""
    n = len(blobs_by_threshold)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
    for ax, (t, blobs) in zip(np.atleast_1d(axes), blobs_by_threshold.items()):
        ax.imshow(img)
        blobs = np.asarray(blobs).reshape(-1, 3)
        for y, x, sigma in blobs:
            ax.add_patch(plt.Circle((x, y), sigma * np.sqrt(2), color=CLASS_COLOURS["malignant"],
                                    fill=False, lw=1.0))
        ax.set_title(f"threshold {t:.2f}: {len(blobs)} blobs", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def importance_bar(importance: pd.Series, top: int = 15) -> plt.Figure:
    """Paper Fig. 9: the top features by total gain, coloured by channel (a model that made no
    split has no gain to share, and its title says so). Used in chapter 3."""
    from cellulib.models.features import gain_shares

    shares = gain_shares(importance)
    top_imp = shares.sort_values(ascending=False).head(top)[::-1]
    colours = [CLASS_COLOURS[name.split("_")[0]] for name in top_imp.index]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(top_imp) + 1))
    ax.barh(top_imp.index, top_imp.values, color=colours)
    if not shares.any():  # gain_shares gives all 0 exactly when no feature has a gain
        ax.set_title("no split: every feature's gain is 0", fontsize=9)
    ax.set_xlabel("share of the total gain")
    ax.set_ylabel("feature")
    fig.tight_layout()
    return fig


def _identity_axes(ax: plt.Axes) -> None:
    """Both axes over [0, 1] with the dashed identity line: agreement plots of two shares."""
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)


def pred_vs_true(preds: dict[str, pd.DataFrame], ncols: int | None = None) -> plt.Figure:
    """Predicted against true cellularity, one panel per model, with the identity line.
    Used in chapters 3 and 4."""
    n = len(preds)
    ncols = ncols or min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, p) in zip(axes.flat, preds.items()):
        ax.scatter(p.y_true, p.y_pred, s=12, alpha=0.6)
        _identity_axes(ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("true cellularity")
        ax.set_ylabel("predicted cellularity")
    fig.tight_layout()
    return fig


def residuals_by_bin(preds: dict[str, pd.DataFrame]) -> plt.Figure:
    """Prediction error (predicted - true) by the 4 cellularity bins of Cohen's kappa: regression to
    the mean shows as positive errors at low cellularity and negative ones at high. Used in chapter 4."""
    from cellulib.metrics.agreement import cellularity_bins

    labels = ["[0, .25]", "(.25, .5]", "(.5, .75]", "(.75, 1]"]
    frames = [pd.DataFrame({"model": name, "bin": [labels[b] for b in cellularity_bins(p.y_true)],
                            "error": p.y_pred - p.y_true}) for name, p in preds.items()]
    long = pd.concat(frames, ignore_index=True)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    sns.boxplot(long, x="bin", y="error", hue="model", order=labels, ax=ax, fliersize=2)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("true cellularity bin")
    ax.set_ylabel("predicted - true cellularity")
    fig.tight_layout()
    return fig


def bin_probabilities(probs: np.ndarray, y_true: Sequence[float], y_pred: Sequence[float]) -> plt.Figure:
    """The classification model's probability over the 101 cellularity bins for a few patches, with
    the true score and the decoded expectation. Used in chapter 4."""
    n = len(probs)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3), squeeze=False)
    grid = np.linspace(0, 1, probs.shape[1])
    for ax, p, t, e in zip(axes.flat, probs, y_true, y_pred):
        ax.bar(grid, p, width=0.01, color="C0")
        ax.axvline(t, color="k", lw=1.2, label=f"true {t:.2f}")
        ax.axvline(e, color="C3", lw=1.2, ls="--", label=f"expectation {e:.2f}")
        ax.set_xlabel("cellularity bin")
        ax.set_ylabel("probability")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _bland_altman_axes(ax: plt.Axes, y_true: Sequence[float], y_pred: Sequence[float]) -> None:
    """Difference (model - label) against the mean of the two, with the bias and the 95% limits of
    agreement of :func:`cellulib.metrics.agreement.bland_altman`, on ``ax``."""
    from cellulib.metrics.agreement import bland_altman as limits

    y_true, y_pred = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    stats = limits(y_true, y_pred)
    ax.scatter((y_true + y_pred) / 2, y_pred - y_true, s=10, alpha=0.5, color="0.4")
    ax.axhline(stats["bias"], color="C3", label=f"mean difference {stats['bias']:+.3f}")
    for key in ("loa_low", "loa_high"):
        ax.axhline(stats[key], color="C0", ls="--")
    ax.plot([], [], color="C0", ls="--",
            label=f"95% limits of agreement {stats['loa_low']:+.3f} to {stats['loa_high']:+.3f}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("mean of model and label (cellularity, 0-1)")
    ax.set_ylabel("model - label (cellularity)")
    ax.legend(fontsize=8)


def bland_altman(y_true: Sequence[float], y_pred: Sequence[float], title: str = "") -> plt.Figure:
    """Bland-Altman agreement plot: difference (model - label) against the mean of the two, with the
    mean difference and the 95% limits of agreement. Used in chapter 4."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _bland_altman_axes(ax, y_true, y_pred)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def agreement_figure(y_true: Sequence[float], y_pred: Sequence[float], title: str | None = None,
                     n_bins: int = 10) -> plt.Figure:
    """Calibration plot and Bland-Altman plot of predictions against labels, side by side.

    Left: each patch (dots), the mean label within ``n_bins`` equal-width bins of the prediction
    (line with +-1 sd bars) and the identity. Right: :func:`bland_altman`'s plot. Used by
    ``cellulib evaluate --figure``.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    fig, (ax_cal, ax_ba) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax_cal.scatter(p, t, s=10, alpha=0.4, color="0.4", label="patches")
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    used = counts > 0
    mean_p = np.bincount(idx, p, n_bins)[used] / counts[used]
    mean_t = np.bincount(idx, t, n_bins)[used] / counts[used]
    sd_t = np.sqrt(np.maximum(np.bincount(idx, t * t, n_bins)[used] / counts[used] - mean_t ** 2,
                              0))
    ax_cal.errorbar(mean_p, mean_t, yerr=sd_t, color="C3", marker="o", capsize=3,
                    label=f"mean label per prediction bin (+-1 sd, {n_bins} bins)")
    ax_cal.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="identity")
    ax_cal.set_xlim(-0.02, 1.02)
    ax_cal.set_ylim(-0.02, 1.02)
    ax_cal.set_xlabel("predicted cellularity (fraction, 0-1)")
    ax_cal.set_ylabel("label cellularity (fraction, 0-1)")
    ax_cal.set_title("calibration")
    ax_cal.legend(fontsize=8, loc="upper left")
    _bland_altman_axes(ax_ba, t, p)
    ax_ba.set_title(f"Bland-Altman (n = {len(t)})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (png by default), and
    close it. Used by ``cellulib evaluate --figure``."""
    import io

    from cellulib.files.imageio import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def mse_summary(summary: pd.DataFrame, title: str = "") -> plt.Figure:
    """Every model's validation MSE with its 95% CI, the mean predictor and the paper's MSE.

    ``summary`` is :func:`cellulib.reporting.statistics.mse_summary`: one row per model (``mse``, ``ci_low``,
    ``ci_high``, ``learned``, ``paper_random``, ``paper_imagenet``) and a ``Mean predictor`` row,
    drawn as a vertical line with its CI as a band. Models that learned (their CI ends left of the
    line, SPEC 5.1) are filled dots, the others open. The paper's random-init and ImageNet values
    (Table 2, on the real data) are marked beside ours. Used in chapter 5.
    """
    from cellulib.reporting.statistics import MEAN_PREDICTOR

    models = summary.drop(index=MEAN_PREDICTOR, errors="ignore")
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(models) + 1.9))
    y = np.arange(len(models))[::-1]
    if MEAN_PREDICTOR in summary.index:
        base = summary.loc[MEAN_PREDICTOR]
        ax.axvspan(base["ci_low"], base["ci_high"], color="0.85", zorder=0,
                   label="mean predictor, 95% CI")
        ax.axvline(base["mse"], color="0.35", ls="--", zorder=1,
                   label=f"mean predictor ({base['mse']:.4f})")
    for yi, row in zip(y, models.to_dict("records")):
        ax.errorbar(row["mse"], yi, xerr=[[row["mse"] - row["ci_low"]], [row["ci_high"] - row["mse"]]],
                    fmt="o", color="C0", capsize=3, mfc="C0" if row.get("learned") else "white",
                    zorder=3)
    # the paper's markers sit just above (random init) and below (ImageNet) our point
    for column, marker, colour, label, dy in (("paper_random", "^", "C3", "paper, random init", 0.22),
                                              ("paper_imagenet", "s", "C2", "paper, ImageNet", -0.22)):
        if column in models and models[column].notna().any():
            ax.scatter(models[column], y + dy, marker=marker, color=colour, s=30, zorder=4,
                       label=label)
    for fill, label in (("C0", "ours, learned (95% CI)"), ("white", "ours, not learned (95% CI)")):
        ax.plot([], [], "o-", color="C0", mfc=fill, label=label)
    ax.set_yticks(y)
    ax.set_yticklabels(models.index)
    ax.set_ylim(-0.7, len(models) - 0.3)
    ax.set_xlim(left=0)
    ax.set_xlabel("validation MSE (cellularity as a fraction 0-1, squared)")
    ax.set_ylabel("model")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Real H&E: nucleus detection on BRCA-M2C (the real-H&E chapter)
# --------------------------------------------------------------------------------------------------
def _class_label(cls: str, labels: dict[str, str] | None) -> str:
    return (labels or {}).get(cls, cls)


def pixel_scale(nn_distance: Sequence[float], diameter: Sequence[float], disc_diameter: float,
                radius: float | None = None) -> plt.Figure:
    """Two histograms that set the pixel scale of weak segmentation on a dataset: distances from
    each annotated nucleus to its nearest neighbour, and nucleus diameters measured in the
    haematoxylin channel, with the chosen disc diameter (and the detection matching radius).
    Used in the real-H&E chapter."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    panels = ((axes[0], nn_distance, "distance to the nearest annotated nucleus (px)", "dots"),
              (axes[1], diameter, "nucleus equivalent diameter (px)", "nuclei"))
    for ax, values, xlabel, ylabel in panels:
        values = np.asarray(values, dtype=float)
        ax.hist(values, bins=np.arange(0, min(60.0, float(np.nanmax(values)) + 2.0), 1.0),
                color="#7f7f7f")
        ax.axvline(disc_diameter, color="#d62728", lw=1.5,
                   label=f"disc diameter {disc_diameter:g} px")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if radius is not None:
        axes[0].axvline(radius, color="#1f77b4", lw=1.5, ls="--",
                        label=f"matching radius {radius:g} px")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def detection_curve(curve: pd.DataFrame, reference: dict[str, float] | None = None,
                    labels: dict[str, str] | None = None) -> plt.Figure:
    """Detection F against the matching radius, one line per class and one for pooled detection
    (the long table of :func:`cellulib.metrics.detection.detection_curve`); ``reference`` marks published F
    values at the protocol's radius (6 px) with crosses. Used in the real-H&E chapter."""
    colours = {**CLASS_COLOURS, "detection": "#000000"}
    fig, ax = plt.subplots(figsize=(7.6, 3.6))
    for cls, part in curve.groupby("class", sort=False):
        part = part.sort_values("radius")
        colour = colours.get(cls)
        ax.plot(part["radius"], part["f1"], marker="o", color=colour, label=_class_label(cls, labels))
        if reference and cls in reference:
            ax.plot([part["radius"].max()], [reference[cls]], marker="x", ms=9, mew=2, ls="none",
                    color=colour)
    if reference:
        ax.plot([], [], marker="x", ls="none", color="grey", label="MCSpatNet (test split)")
    ax.set_xlabel("matching radius (px at 20x, 0.5 um/px)")
    ax.set_ylabel("F (harmonic mean of precision and recall)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def dots_vs_detections(images: Sequence[np.ndarray], truth: Sequence[pd.DataFrame],
                       pred: Sequence[pd.DataFrame], titles: Sequence[str] | None = None,
                       labels: dict[str, str] | None = None) -> plt.Figure:
    """Real patches with the annotated nucleus dots (top row) and the detections (bottom row),
    coloured by class; ``truth``/``pred`` hold ``x``, ``y``, ``cls`` per image. Used in the
    real-H&E chapter."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 7.4), squeeze=False)
    for j, img in enumerate(images):
        for i, (points, what) in enumerate(((truth[j], "annotated"), (pred[j], "detected"))):
            ax = axes[i, j]
            ax.imshow(img)
            for cls in NUCLEUS_CLASSES:
                part = points[points["cls"] == cls]
                ax.scatter(part["x"], part["y"], s=16, c=CLASS_COLOURS[cls], edgecolors="white",
                           linewidths=0.5, label=_class_label(cls, labels))
            ax.set_title(f"{titles[j] if titles else ''} {what} ({len(points)})".strip(),
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, loc="upper right", markerscale=1.5)
    fig.tight_layout()
    return fig


def fraction_scatter(annotated: Sequence[float], detected: Sequence[float],
                     title: str = "") -> plt.Figure:
    """Per-image tumour share of the nuclei, detected against annotated, with the identity line.
    Used in the real-H&E chapter."""
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.scatter(annotated, detected, s=22, alpha=0.8)
    _identity_axes(ax)
    ax.set_xlabel("annotated tumour share of nuclei")
    ax.set_ylabel("detected tumour share of nuclei")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def proxy_scatter(scores: pd.DataFrame, proxy: Sequence[float], names: Sequence[str],
                  pks: dict[str, float] | None = None, proxy_label: str = "tumour share of nuclei (count proxy)",
                  ncols: int = 4) -> plt.Figure:
    """Each model's predicted cellularity of real windows against their proxy, one panel per model,
    coloured by patient when ``scores`` has a ``patient`` column; the panel title gives the PK.
    The axes are not forced to the identity: a proxy is compared by rank, not by scale. Used in the
    real-tissue chapter."""
    n = len(names)
    ncols = min(n, ncols)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 3.0 * nrows), squeeze=False,
                             sharex=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    patients = scores["patient"].astype(str) if "patient" in scores else pd.Series([""] * len(scores))
    codes, _ = pd.factorize(patients)
    for ax, name in zip(axes.flat, names):
        ax.scatter(proxy, scores[name], c=codes, cmap="tab20", s=14, alpha=0.8)
        ax.set_xlim(-0.02, 1.02)
        title = name if not pks or name not in pks else f"{name}\nPK {pks[name]:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(proxy_label, fontsize=8)
        ax.set_ylabel("predicted cellularity", fontsize=8)
    fig.tight_layout()
    return fig


def message_figure(text: str) -> plt.Figure:
    """A small figure that only says ``text``: stands in for a figure whose data are missing, so
    the page still builds and says why. Used in the real-H&E and stain-shift chapters through
    :func:`glue_skipped`."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    ax.axis("off")
    return fig


def label_comparison(real: Sequence[float], synthetic: Sequence[float],
                     ks: float | None = None) -> plt.Figure:
    """The real BreastPathQ cellularity labels beside the synthetic ones (paper Fig. 6 for both):
    histograms as shares of each set (left) and the two empirical CDFs (right), whose largest
    vertical gap is the two-sample KS statistic ``ks``. Used in chapter 1."""
    real = np.asarray(real, dtype=float)
    synthetic = np.asarray(synthetic, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
    bins = np.linspace(0, 1, 21)
    for values, name, colour in ((real, f"real BreastPathQ (n={len(real)})", "#4c72b0"),
                                 (synthetic, f"synthetic (n={len(synthetic)})", "#dd8452")):
        axes[0].hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)),
                     histtype="step", lw=1.8, color=colour, label=name)
        xs = np.sort(values)
        axes[1].step(np.concatenate([[0], xs, [1]]),
                     np.concatenate([[0], np.arange(1, len(xs) + 1) / len(xs), [1]]),
                     where="post", color=colour, label=name)
    axes[0].set_xlabel("cellularity (0-1)")
    axes[0].set_ylabel("share of patches")
    axes[1].set_xlabel("cellularity (0-1)")
    axes[1].set_ylabel("share of patches at or below")
    axes[0].legend(fontsize=8)
    if ks is not None:
        axes[1].set_title(f"two-sample KS statistic {ks:.3f}", fontsize=10)
    for ax in axes:
        ax.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def robustness_curves(summary: pd.DataFrame, routes: dict[str, Sequence[str]],
                      mean_mse: float | None = None, shift_names: dict[str, str] | None = None,
                      metrics: Sequence[str] = ("mse", "icc")) -> plt.Figure:
    """MSE and ICC of every model against shift strength, one panel per shift kind and metric (the
    table of :func:`cellulib.reporting.robustness.shift_summary`; kind ``none`` is the point at strength 0).
    Models of the segmentation route are drawn solid in blues, the direct models dashed in oranges;
    the mean predictor's MSE is the grey dotted line (its ICC is 0). ``scale`` is drawn against the
    magnification factor on a log axis. Used in the stain-shift chapter."""
    kinds = [k for k in pd.unique(summary["kind"]) if k != "none"]
    ncols = 3
    per_metric = int(np.ceil(len(kinds) / ncols))
    nrows = per_metric * len(metrics)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.1 * ncols, 3.0 * nrows), squeeze=False)
    palettes = {route: sns.color_palette("Blues_d" if i == 0 else "Oranges_d", len(models))
                for i, (route, models) in enumerate(routes.items())}
    styles = {route: "-" if i == 0 else "--" for i, route in enumerate(routes)}
    labels = {"mse": "validation MSE (log scale)", "icc": "validation ICC(2,1)"}
    for m, metric in enumerate(metrics):
        clean = summary[summary["kind"] == "none"].set_index("model")[metric]
        block = axes[m * per_metric:(m + 1) * per_metric].flat
        for ax, kind in zip(block, kinds):
            for route, models in routes.items():
                for colour, model in zip(palettes[route], models):
                    part = summary[(summary["model"] == model) & (summary["kind"] == kind)]
                    x = np.concatenate([[0.0], part["strength"].to_numpy()])
                    y = np.concatenate([[clean[model]], part[metric].to_numpy()])
                    order = np.argsort(x)
                    x = 2.0 ** x if kind == "scale" else x
                    ax.plot(x[order], y[order], styles[route], marker="o", ms=3.5, color=colour,
                            label=f"{model} ({route})")
            if metric == "mse" and mean_mse is not None:
                ax.axhline(mean_mse, color="grey", ls=":", lw=1.2, label="mean predictor")
            if kind == "scale":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("magnification relative to training (x)")
            else:
                ax.set_xlabel("shift strength (0 = none, 1 = strongest)")
            ax.set_title(f"{(shift_names or {}).get(kind, kind)}: {metric.upper()}", fontsize=10)
            if metric == "mse":
                ax.set_yscale("log")
            else:
                ax.set_ylim(min(0.0, float(summary[metric].min())) - 0.02, 1.02)
            ax.set_ylabel(labels.get(metric, metric), fontsize=9)
        for ax in list(block)[len(kinds):]:
            ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.05 if len(names) > 4 else 0.03, 1, 1))
    return fig


def estimate_whiskers(table: pd.DataFrame, xlabel: str, title: str = "") -> plt.Figure:
    """Estimates with their 95% CIs as dots and whiskers, one row per line of ``table`` (columns
    ``label``, ``group``, ``value``, ``ci_low``, ``ci_high``), groups side by side in colour, with
    the zero line. Used in the stain-shift chapter (changes in detection F and in MSE)."""
    labels = list(pd.unique(table["label"]))
    groups = list(pd.unique(table["group"]))
    colours = sns.color_palette("colorblind", len(groups))
    fig, ax = plt.subplots(figsize=(9.6, 0.42 * len(labels) + 1.2))
    offsets = np.linspace(-0.18, 0.18, len(groups)) if len(groups) > 1 else [0.0]
    for colour, group, off in zip(colours, groups, offsets):
        part = table[table["group"] == group]
        y = np.array([labels.index(lab) for lab in part["label"]]) + off
        ax.errorbar(part["value"], y, xerr=[part["value"] - part["ci_low"],
                                            part["ci_high"] - part["value"]],
                    fmt="o", ms=4, capsize=2.5, color=colour, label=group)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
               col_labels: Sequence[str], size: float = 2.4) -> plt.Figure:
    """Images in rows and columns with labels (e.g. real H&E before and after stain
    normalisation). Used in the stain-shift chapter."""
    nrows, ncols = len(images), len(images[0])
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=9)
    fig.tight_layout()
    return fig
