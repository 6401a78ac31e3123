"""Reporting: the paper's tables with ours beside them.

Used in chapters 3, 4 and 5.
"""

from __future__ import annotations

import pandas as pd

#: Rows of the paper's Tables 2 and 3, in the paper's order.
PAPER_ROWS = ("GBT", "ResNet34 (SR)", "ResNet34 (R)", "ResNet50 (R)", "Xception (R)", "Xception (C)")


def results_table(preds: dict[str, pd.DataFrame], n_boot: int = 2000, seed: int = 0,
                  all_paper_rows: bool = False) -> pd.DataFrame:
    """Tables 2 and 3 of the paper with ours beside them: MSE, kappa, ICC(2,1) and PK with 95% CIs.

    ``preds`` maps a model name (the paper's row names, e.g. ``"GBT"``, ``"Xception (C)"``) to its
    validation predictions (``y_true``, ``y_pred``; see :func:`predictions`). Our models are trained
    from random initialisation, so our MSE sits beside the paper's random-init column and the
    paper's ImageNet column is shown for reference; the paper's kappa and ICC are ImageNet-only.
    With ``all_paper_rows`` every row of the paper appears, "not run" where we have no model.
    Paper section 3.5; SPEC 5. Used in chapters 3, 4 and 5.
    """
    from cellulib.metrics import PAPER, evaluate, format_ci

    paper = PAPER.set_index(["table", "model", "init", "metric"])["text"]

    def paper_text(table, model, init, metric):
        key = (table, model, init, metric)
        return paper[key] if key in paper.index else "-"

    names = list(PAPER_ROWS) if all_paper_rows else []
    names += [n for n in preds if n not in names]
    rows = []
    for name in names:
        row = {"model": name}
        if name in preds:
            table = evaluate(preds[name].y_true, preds[name].y_pred, n_boot=n_boot, seed=seed)
            for metric, label in (("MSE", "MSE"), ("kappa", "kappa"), ("ICC(2,1)", "ICC"),
                                  ("PK", "PK")):
                r = table.loc[metric]
                row[f"{label} (ours)"] = format_ci(r.value, r.ci_low, r.ci_high)
        else:
            for label in ("MSE", "kappa", "ICC", "PK"):
                row[f"{label} (ours)"] = "not run"
        row["MSE (paper, random)"] = paper_text("Table 2", name, "random", "MSE")
        row["MSE (paper, ImageNet)"] = paper_text("Table 2", name, "imagenet", "MSE")
        row["kappa (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "kappa")
        row["ICC (paper, ImageNet)"] = paper_text("Table 3", name, "imagenet", "ICC")
        rows.append(row)
    order = ["model", "MSE (ours)", "MSE (paper, random)", "MSE (paper, ImageNet)", "kappa (ours)",
             "kappa (paper, ImageNet)", "ICC (ours)", "ICC (paper, ImageNet)", "PK (ours)"]
    return pd.DataFrame(rows)[order].set_index("model")
