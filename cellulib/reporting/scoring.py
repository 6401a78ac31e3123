"""Running trained networks for the report: the per-image Jaccard counts of a segmentation model
on a run's validation images, and the detector a chapter keeps. Used in the real-H&E chapter
and the stain-shift chapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = [
    "choose_detector",
    "best_detector",
    "segmentation_counts",
]


def segmentation_counts(seg, root, threshold: float = 0.5) -> pd.DataFrame:
    """Per validation image and nucleus class: intersection and union at ``threshold``.

    Rebuilds the validation patches on which the segmentation network was scored (the split of
    :func:`cellulib.data.breastpathq.cells_split` with the run's seed, centre crops of the run's ``crop`` after
    its ``downscale``, discs of its ``disc_diameter``) and counts, per image, the pixels of each
    nucleus class in the prediction, the weak mask, both, and either. Summed over all images and
    averaged over the classes they give the run's ``jaccard_nuclei`` (paper Table 1). Used in
    chapter 5 through :func:`cellulib.reporting.verdicts.findings` (the FPN-vs-U-Net finding).

    Parameters
    ----------
    seg : cellulib.training.train.TrainResult
        A trained segmentation network (``settings`` and ``meta["params"]["seed"]``).
    root : path
        The data folder it was trained on.

    Returns
    -------
    pandas.DataFrame
        One row per (image, class): ``image``, ``cls``, ``intersection``, ``union``, ``target``
        (mask pixels) and ``pixels`` (pixels of the crop).
    """
    import torch

    from cellulib.constants import NUCLEUS_CLASSES
    from cellulib.data import breastpathq

    settings = seg.settings
    params = seg.meta.get("params") or {}
    seed = int(params.get("seed", 0))
    cells = breastpathq.read_cells(root)
    _, valid_idx = breastpathq.cells_split(cells, seed=seed, root=root,
                                    validation=params.get("validation", "patients"))
    valid = cells.iloc[valid_idx]
    ds = breastpathq.SegDataset(valid["image_path"].tolist(), valid["xml_path"].tolist(),
                         size=settings["crop"], downscale=settings["downscale"],
                         diameter=settings["disc_diameter"], train=False)
    model = seg.model.eval()
    rows = []
    with torch.inference_mode():
        for i, name in enumerate(valid["name"]):
            x, mask = ds[i]
            pred = torch.sigmoid(model(x[None].float()))[0] > threshold
            target = mask > 0.5
            for c, cls in enumerate(NUCLEUS_CLASSES):
                p, t = pred[c], target[c]
                rows.append({"image": name, "cls": cls, "intersection": int((p & t).sum()),
                             "union": int((p | t).sum()), "target": int(t.sum()),
                             "pixels": int(t.numel())})
    return pd.DataFrame(rows)


def best_detector(scores: Mapping[str, pd.DataFrame]) -> str:
    """The detector to keep: the highest mean of pooled and tumour (``malignant``) F on the
    validation split. Cellularity rests on the tumour nuclei, and the other classes only need to be
    found. ``scores`` maps a name to its :func:`cellulib.metrics.detection.detection_scores` table. Used in the
    real-H&E and stain-shift chapters through :func:`choose_detector`."""
    if not scores:
        raise ValueError("best_detector needs at least one detector's scores")
    return max(scores, key=lambda name: float(scores[name].loc["detection", "f1"])
               + float(scores[name].loc["malignant", "f1"]))


def choose_detector(models: Mapping[str, Any], cells: pd.DataFrame,
                    threshold: float | None = None) -> tuple[str, dict[str, pd.DataFrame]]:
    """The real-H&E chapter's choice between segmentation networks: each model (name -> model
    file) detects the nuclei of the annotated images ``cells`` (the held-out patients,
    :func:`cellulib.inference.detect.score_annotated`, ``threshold`` None: the global
    :data:`cellulib.constants.DETECTION_THRESHOLD` for every model, so that they compare at one
    threshold, where ``cellulib detect`` uses each model file's own),
    and :func:`best_detector` keeps one. Returns its name and every model's
    :func:`cellulib.metrics.detection.detection_scores` table. Used in the real-H&E and stain-shift
    chapters."""
    from cellulib.constants import DETECTION_THRESHOLD
    from cellulib.inference.detect import score_annotated

    threshold = DETECTION_THRESHOLD if threshold is None else threshold
    scores = {name: score_annotated(model, cells, threshold, progress=False).scores()
              for name, model in models.items()}
    return best_detector(scores), scores
