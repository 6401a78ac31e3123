"""The book's tables, ours beside the paper's: Table 1 (segmentation), Tables 2 and 3 (MSE,
kappa, ICC, PK with 95% CIs and the mean predictor), nucleus detection, the BRCA-M2C split and the
cross-dataset transfer. Used in chapters 2-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from cellulib.data.profiles import DECODER_NAMES
from cellulib.reporting.paper import PAPER, PAPER_ROWS
from cellulib.reporting.statistics import (
    MEAN_PREDICTOR,
    _first_truth,
    learned,
    mean_predictor_predictions,
)

__all__ = [
    "brca_m2c_table",
    "transfer_table",
    "BRCA_M2C_NAMES",
    "detection_table",
    "table1",
    "results_table",
]


def table1(results: Mapping[tuple[str, str], Any]) -> pd.DataFrame:
    """Paper Table 1 with ours beside it: mean nuclear Jaccard, {random, ImageNet} x {U-Net, FPN}.

    ``results`` maps ``(init, decoder)`` (init in ``random``/``imagenet``, decoder in
    ``unet``/``fpn``) to a training result (:class:`cellulib.training.train.TrainResult`), or to None for a run that was not made (shown as
    "not run", never as a number). Used in chapters 2 and 5.
    """
    paper = PAPER[PAPER.table == "Table 1"].set_index(["init", "model"])["value"]
    rows = []
    for init, label in (("random", "Random"), ("imagenet", "ImageNet")):
        row = {"initialisation": label}
        for dec in ("unet", "fpn"):
            res = results.get((init, dec))
            short = DECODER_NAMES[dec]
            row[f"{short} (paper)"] = f"{paper[(init, f'{short} decoder')]:.2f}"
            row[f"{short} (ours)"] = "not run" if res is None else f"{res.scores['jaccard_nuclei']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("initialisation")


def results_table(preds: dict[str, pd.DataFrame], n_boot: int = 2000, seed: int = 0,
                  all_paper_rows: bool = False, train_mean: float | None = None) -> pd.DataFrame:
    """Tables 2 and 3 of the paper with ours beside them: MSE, kappa, ICC(2,1) and PK with 95% CIs.

    ``preds`` maps a model name (the paper's row names, e.g. ``"GBT"``, ``"Xception (C)"``) to its
    validation predictions (``y_true``, ``y_pred``; see :func:`cellulib.training.train.predictions`). Our
    models are trained from random initialisation, so our MSE sits beside the paper's random-init
    column and the paper's ImageNet column is shown for reference; the paper's kappa and ICC are
    ImageNet-only. With ``all_paper_rows`` every row of the paper appears, "not run" where we have
    no model. With ``train_mean`` (the training labels' mean) a
    :data:`cellulib.reporting.statistics.MEAN_PREDICTOR` row is
    scored like a model and a ``learned`` column says "yes" when the upper end of a model's MSE CI
    is below the mean predictor's MSE (SPEC 5.1). Paper section 3.5; SPEC 5. Used in chapters 3,
    4 and 5.
    """
    from cellulib.metrics.agreement import evaluate, format_ci

    paper = PAPER.set_index(["table", "model", "init", "metric"])["text"]

    def paper_text(table, model, init, metric):
        key = (table, model, init, metric)
        return paper[key] if key in paper.index else "-"

    scored = dict(preds)
    if train_mean is not None:
        scored[MEAN_PREDICTOR] = mean_predictor_predictions(_first_truth(preds), train_mean)
    names = list(PAPER_ROWS) if all_paper_rows else []
    names += [n for n in scored if n not in names]
    tables = {n: evaluate(p.y_true, p.y_pred, n_boot=n_boot, seed=seed) for n, p in scored.items()}
    mean_mse = tables[MEAN_PREDICTOR].loc["MSE", "value"] if train_mean is not None else None
    rows = []
    for name in names:
        row = {"model": name}
        if name in tables:
            table = tables[name]
            for metric, label in (("MSE", "MSE"), ("kappa", "kappa"), ("ICC(2,1)", "ICC"),
                                  ("PK", "PK")):
                r = table.loc[metric]
                row[f"{label} (ours)"] = format_ci(r.value, r.ci_low, r.ci_high)
            if mean_mse is not None and name != MEAN_PREDICTOR:
                ok = learned(table.loc["MSE", "ci_high"], mean_mse, len(scored[name]))
                row["learned"] = "yes" if ok else "no"
        else:
            for label in ("MSE", "kappa", "ICC", "PK"):
                row[f"{label} (ours)"] = "not run"
        row.setdefault("learned", "-")
        row["MSE (paper, random)"] = paper_text("Table 2", name, "random", "MSE")
        row["MSE (paper, ImageNet)"] = paper_text("Table 2", name, "imagenet", "MSE")
        row["kappa (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "kappa")
        row["ICC (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "ICC")
        rows.append(row)
    order = ["model", "MSE (ours)", "MSE (paper, random)", "MSE (paper, ImageNet)", "kappa (ours)",
             "kappa (paper, ImageNet)", "ICC (ours)", "ICC (paper, ImageNet)", "PK (ours)"]
    if train_mean is not None:
        order.insert(2, "learned")
    return pd.DataFrame(rows)[order].set_index("model")


#: Display names of the detection classes on BRCA-M2C (SPEC 1.4): channel 0 ("normal", normal
#: epithelium in BreastPathQ) holds its stromal nuclei.
BRCA_M2C_NAMES = {"lymphocyte": "lymphocyte", "malignant": "tumour/epithelial",
                  "normal": "stromal", "detection": "detection (all classes)"}


def detection_table(scores: Mapping[str, pd.DataFrame], reference: Mapping[str, float] | None = None,
                    reference_name: str = "MCSpatNet F (test)",
                    names: Mapping[str, str] | None = None,
                    references: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """Precision, recall and F per class (and pooled) of several detectors side by side, with
    published F beside them: ``reference`` in the column ``reference_name``, and each of
    ``references`` (column name -> F by class, e.g. `PUBLISHED_F`); a class a reference has no
    value for is left blank. ``scores`` maps a detector's name to its
    :func:`cellulib.metrics.detection.detection_scores` table. Used in the real-H&E chapter."""
    names = dict(BRCA_M2C_NAMES if names is None else names)
    first = next(iter(scores.values()))
    out = pd.DataFrame(index=[names.get(c, c) for c in first.index])
    for model, table in scores.items():
        for col, short in (("precision", "P"), ("recall", "R"), ("f1", "F")):
            out[f"{model} {short}"] = [round(float(v), 3) for v in table[col]]
    published = dict(references or {})
    if reference is not None:
        published = {reference_name: reference, **published}
    for column, values in published.items():
        out[column] = [values.get(c, "") for c in first.index]
    out.index.name = "class"
    return out


def _roles(cells: pd.DataFrame, train_idx, val_idx) -> pd.Series:
    role = pd.Series("official test", index=cells.index)
    role.iloc[train_idx], role.iloc[val_idx] = "training", "validation (held-out patients)"
    return role


def brca_m2c_table(cells: pd.DataFrame, train_idx, val_idx,
                   names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Images, patients and annotated nuclei per class of a BRCA-M2C copy
    (:func:`cellulib.data.breastpathq.read_cells`), by what they are used for: training and validation
    (``train_idx``, ``val_idx``, :func:`cellulib.data.breastpathq.cells_split`), the rest the official test
    split. Used in the real-H&E chapter."""
    from cellulib.data.breastpathq import patient_code

    names = BRCA_M2C_NAMES if names is None else names
    role, patient = _roles(cells, train_idx, val_idx), cells["name"].map(patient_code)
    counts = (cells.groupby(role, sort=False)[["n_lymphocyte", "n_malignant", "n_normal"]].sum()
              .rename(columns=lambda c: names[c[2:]]))
    counts.insert(0, "patients", patient.groupby(role, sort=False).nunique())
    counts.insert(0, "images", role.value_counts(sort=False))
    counts.index.name = "used for"
    return counts


def transfer_table(scored: Mapping[tuple[str, str], Any]) -> pd.DataFrame:
    """Pooled and tumour F of networks trained on one dataset and scored on another
    (``{(trained on, scored on): AnnotatedScores}``). Used in the real-H&E chapter."""
    return pd.DataFrame([
        {"trained on": a, "scored on": b, "detection F": s.scores().loc["detection", "f1"],
         "tumour F": s.scores().loc["malignant", "f1"]} for (a, b), s in scored.items()]).round(3)
