"""Verdicts on the paper's findings (SPEC 5.1): a finding *holds* here only when both models
compared have learned and the 95% paired-bootstrap CI of their MSE difference excludes 0 on the
side the paper claims; it *does not hold* when both learned and the CI excludes 0 on the other
side; otherwise it is *undecided*. Also the floors a real-tissue detector must reach and the
detector a chapter keeps. Used in chapters 2-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from cellulib.data.profiles import DECODER_NAMES
from cellulib.reporting.paper import PAPER
from cellulib.reporting.scoring import segmentation_counts
from cellulib.reporting.statistics import (
    MEAN_PREDICTOR,
    MIN_PATCHES,
    Estimate,
    _not_learned,
    jaccard_summary,
    mse_summary,
    paired_jaccard_difference,
    paired_mse_difference,
)

__all__ = [
    "claim_words",
    "REAL_FLOORS",
    "floors_missed",
    "VERDICTS",
    "compare",
    "findings",
    "verdict",
]


#: The three verdicts a paper finding can get here (SPEC 5.1).
VERDICTS = ("holds", "does not hold", "undecided")

_DIRECT = ("ResNet34 (R)", "ResNet50 (R)", "Xception (R)", "Xception (C)")
_SEGMENTATION = ("GBT", "ResNet34 (SR)")

#: This book's floors for the real-H&E detector (issue 22): F per class and pooled on the
#: patient-disjoint validation split (:func:`cellulib.data.breastpathq.patient_split`), with the default recipe
#: of ``cellulib train seg --data <BRCA-M2C folder>`` (CPU, no pretrained weights, seed 0).
REAL_FLOORS = {"lymphocyte": 0.55, "malignant": 0.75, "normal": 0.55, "detection": 0.82}


def floors_missed(table: pd.DataFrame, floors: Mapping[str, float] | None = None) -> dict[str, float]:
    """The rows of a :func:`cellulib.metrics.detection.detection_scores` table whose F is under its floor
    (`REAL_FLOORS` by default), with that F; empty when every floor is met. Used in the real-H&E
    chapter through :func:`cellulib.reporting.sentences.decoder_sentence`.

    Examples
    --------
    >>> t = pd.DataFrame({"f1": [0.6, 0.7, 0.5, 0.85]},
    ...                  index=["lymphocyte", "malignant", "normal", "detection"])
    >>> floors_missed(t)
    {'malignant': 0.7, 'normal': 0.5}
    """
    floors = REAL_FLOORS if floors is None else floors
    return {c: float(table.loc[c, "f1"]) for c, floor in floors.items()
            if float(table.loc[c, "f1"]) < floor}


def verdict(difference: Estimate, learned_a: bool, learned_b: bool,
            lower_is_better: bool = True) -> str:
    """The verdict on the paper's claim "A is better than B" (SPEC 5.1).

    ``difference`` is A minus B with its CI
    (:func:`cellulib.reporting.statistics.paired_mse_difference`: lower is better).
    "holds" when both learned and the CI lies entirely on A's side of 0, "does not hold" when both
    learned and it lies entirely on B's side, else "undecided". Used in chapter 5, and in chapters 3
    and 4 through :func:`cellulib.reporting.verdicts.compare`.

    Examples
    --------
    >>> verdict(Estimate(-0.004, -0.006, -0.002), True, True)
    'holds'
    >>> verdict(Estimate(-0.004, -0.006, -0.002), True, False)
    'undecided'
    """
    if not (learned_a and learned_b):
        return "undecided"
    lo, hi = (difference.ci_low, difference.ci_high) if lower_is_better else (
        -difference.ci_high, -difference.ci_low)
    if hi < 0:
        return "holds"
    if lo > 0:
        return "does not hold"
    return "undecided"


def compare(preds: Mapping[str, pd.DataFrame], better: str, worse: str, train_mean: float,
            n_boot: int = 2000, seed: int = 0, summary: pd.DataFrame | None = None
            ) -> dict[str, Any]:
    """Test the paper's claim that model ``better`` has a lower MSE than model ``worse``.

    Combines :func:`cellulib.reporting.statistics.mse_summary` (who learned),
    :func:`cellulib.reporting.statistics.paired_mse_difference` and :func:`verdict`
    into the pieces of a sentence a chapter glues: ``phrase`` is "beats", "does worse than",
    "cannot be told apart from" or "cannot be ranked against" (when one of them has not learned);
    ``detail`` gives the MSEs and the CI of the difference; ``sentence`` is
    ``f"{better} {phrase} {worse} ({detail})"``. SPEC 5.1; used in chapters 4 and 5.

    Returns
    -------
    dict
        ``better``, ``worse``, ``mse_better``, ``mse_worse``, ``difference``
        (:class:`cellulib.reporting.statistics.Estimate`,
        better minus worse), ``learned_better``, ``learned_worse``, ``verdict``, ``phrase``,
        ``detail``, ``sentence``.
    """
    if summary is None or MEAN_PREDICTOR not in summary.index:
        summary = mse_summary(preds, train_mean, n_boot=n_boot, seed=seed)
    diff = paired_mse_difference(preds[better], preds[worse], n_boot=n_boot, seed=seed)
    la, lb = bool(summary.loc[better, "learned"]), bool(summary.loc[worse, "learned"])
    result = verdict(diff, la, lb)
    detail = (f"MSE {summary.loc[better, 'mse']:.4f} vs {summary.loc[worse, 'mse']:.4f}, "
              f"difference {diff.value:+.4f}, 95% CI {diff.ci_low:+.4f} to {diff.ci_high:+.4f}")
    stuck = _not_learned(summary, (better, worse))
    if stuck:
        phrase = "cannot be ranked against"
        who = " and ".join(stuck)
        detail += (f"; {who} {'has' if len(stuck) == 1 else 'have'} not learned: the 95% CI "
                   f"of the MSE reaches the mean predictor's "
                   f"{summary.loc[MEAN_PREDICTOR, 'mse']:.4f}")
    else:
        phrase = claim_words(result, "beats", "does worse than", "cannot be told apart from")
        detail += ", which includes 0" if result == "undecided" else ""
    return {"better": better, "worse": worse, "mse_better": float(summary.loc[better, "mse"]),
            "mse_worse": float(summary.loc[worse, "mse"]), "difference": diff,
            "learned_better": la, "learned_worse": lb, "verdict": result, "phrase": phrase,
            "detail": detail, "sentence": f"{better} {phrase} {worse} ({detail})"}


def _paper_value(table: str, model: str, init: str, metric: str) -> float:
    sel = PAPER[(PAPER.table == table) & (PAPER.model == model) & (PAPER.init == init)
                & (PAPER.metric == metric)]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def _mse_finding(label: str, paper: str, preds, better: str, worse: str, train_mean: float,
                 summary: pd.DataFrame, n_boot: int, seed: int, note: str = "") -> dict:
    cmp = compare(preds, better, worse, train_mean, n_boot=n_boot, seed=seed, summary=summary)
    why = {"holds": "both learned; the CI of the difference excludes 0",
           "does not hold": "both learned; the CI of the difference excludes 0 on the other side",
           }.get(cmp["verdict"])
    if why is None:
        stuck = _not_learned(summary, (better, worse))
        why = (f"{' and '.join(stuck)} did not learn" if stuck
               else "the CI of the difference includes 0")
    return {"paper's finding": label, "verdict": cmp["verdict"],
            "ours": f"{better} vs {worse}: {cmp['detail']}", "paper": paper,
            "why": why + (f"; {note}" if note else "")}


def decoder_finding(seg, root=None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The paper's Table 1 finding "the FPN decoder beats the U-Net decoder", decided by a CI.

    ``seg`` maps ``"fpn"`` and ``"unet"`` to their training results (random init). With ``root``
    the per-image Jaccard (:func:`cellulib.reporting.scoring.segmentation_counts`) gives a paired
    bootstrap CI of the
    difference (:func:`cellulib.reporting.statistics.paired_jaccard_difference`) and each network's
    "learned" verdict
    (:func:`cellulib.reporting.statistics.jaccard_summary`); without it the finding stays
    undecided. Returns one row of
    :func:`findings` (``paper's finding``, ``verdict``, ``ours``, ``paper``, ``why``). SPEC 5.1;
    used in chapter 2, and in chapter 5 through :func:`cellulib.reporting.verdicts.findings`.
    """
    j = {d: _paper_value("Table 1", f"{n} decoder", "random", "Jaccard")
         for d, n in DECODER_NAMES.items()}
    row = {"paper's finding": "FPN decoder beats U-Net decoder (Table 1)",
           "paper": f"Jaccard {j['fpn']:.2f} vs {j['unet']:.2f} (random init)"}
    if root is None:
        fpn, unet = seg["fpn"].scores["jaccard_nuclei"], seg["unet"].scores["jaccard_nuclei"]
        return row | {"verdict": "undecided", "ours": f"Jaccard {fpn:.3f} vs {unet:.3f}",
                      "why": "no per-image Jaccard, so no confidence interval"}
    counts = {d: segmentation_counts(seg[d], root) for d in ("fpn", "unet")}
    js = jaccard_summary(counts, n_boot=n_boot, seed=seed)
    diff = paired_jaccard_difference(counts["fpn"], counts["unet"], n_boot=n_boot, seed=seed)
    result = verdict(diff, js.loc["fpn", "learned"], js.loc["unet", "learned"],
                     lower_is_better=False)
    stuck = [DECODER_NAMES[d] for d in ("fpn", "unet") if not js.loc[d, "learned"]]
    if result == "holds":
        why = "both learned; the CI of the difference excludes 0"
    elif result == "does not hold":
        why = "both learned; the CI of the difference excludes 0 on the other side"
    elif js.loc["fpn", "n"] < MIN_PATCHES:
        why = f"only {js.loc['fpn', 'n']} validation image(s), too few for a confidence interval"
    elif stuck:
        why = (f"{' and '.join(stuck)} did not learn: the Jaccard's CI does not clear "
               f"the all-pixels baseline ({js.loc['fpn', 'baseline']:.3f})")
    else:
        why = "the CI of the difference includes 0"
    ours = (f"Jaccard {js.loc['fpn', 'jaccard']:.3f} vs {js.loc['unet', 'jaccard']:.3f}, "
            f"difference {diff.value:+.3f}, 95% CI {diff.ci_low:+.3f} to {diff.ci_high:+.3f} "
            f"over {js.loc['fpn', 'n']} validation image(s)")
    return row | {"verdict": result, "ours": ours, "why": why}


def findings(preds: Mapping[str, pd.DataFrame], train_mean: float,
             importance: pd.Series | None = None, seg: Mapping[str, Any] | None = None,
             root=None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The paper's findings, each with a verdict decided by our confidence intervals (SPEC 5.1).

    Rows, where their inputs are given:

    - FPN decoder beats U-Net decoder (Table 1): paired bootstrap over validation images of the
      mean nuclear Jaccard (``seg`` maps ``"fpn"``/``"unet"`` to segmentation results, ``root``
      is their data; :func:`cellulib.reporting.scoring.segmentation_counts`,
      :func:`cellulib.reporting.statistics.jaccard_summary`);
    - SR beats GBT (Table 2), the best direct model beats both segmentation routes, and
      Xception (C) beats Xception (R): :func:`compare` on the MSE;
    - the top GBT feature is from the malignant channel (Fig. 9; ``importance`` is the gain per
      feature): decided only when GBT has learned, since a model that has not learned ranks
      features by noise.

    A verdict is "holds" only when both models learned and the CI of the difference excludes 0
    on the paper's side, "does not hold" when both learned and it excludes 0 on the other side,
    else "undecided". Used in chapter 5.

    Returns
    -------
    pandas.DataFrame
        Index ``paper's finding``; columns ``verdict`` (one of :data:`VERDICTS`), ``ours`` (our
        numbers with CIs), ``paper`` (the paper's numbers) and ``why``.
    """
    summary = mse_summary(preds, train_mean, n_boot=n_boot, seed=seed)
    rows = []
    if seg is not None and {"fpn", "unet"} <= set(seg):
        rows.append(decoder_finding(seg, root, n_boot=n_boot, seed=seed))
    if {"GBT", "ResNet34 (SR)"} <= set(preds):
        paper = (f"MSE {_paper_value('Table 2', 'ResNet34 (SR)', 'random', 'MSE'):.3f} vs "
                 f"{_paper_value('Table 2', 'GBT', 'random', 'MSE'):.3f} (random init)")
        rows.append(_mse_finding("SR beats GBT (Table 2)", paper, preds, "ResNet34 (SR)", "GBT",
                                 train_mean, summary, n_boot, seed))
    direct = [n for n in _DIRECT if n in preds]
    segm = [n for n in _SEGMENTATION if n in preds]
    if direct and segm:
        best_d = min(direct, key=lambda n: summary.loc[n, "mse"])
        best_s = min(segm, key=lambda n: summary.loc[n, "mse"])
        p_d = min(_paper_value("Table 2", n, "random", "MSE") for n in _DIRECT)
        p_s = min(_paper_value("Table 2", n, "random", "MSE") for n in _SEGMENTATION)
        p_di = min(_paper_value("Table 2", n, "imagenet", "MSE") for n in _DIRECT)
        p_si = min(_paper_value("Table 2", n, "imagenet", "MSE") for n in _SEGMENTATION)
        paper = (f"best MSE {p_d:.3f} vs {p_s:.3f} (random init), {p_di:.3f} vs {p_si:.3f} "
                 "(ImageNet)")
        rows.append(_mse_finding("the best direct model beats both segmentation routes", paper,
                                 preds, best_d, best_s, train_mean, summary, n_boot, seed,
                                 note="each side's best is picked by its MSE on these patches"))
    if {"Xception (C)", "Xception (R)"} <= set(preds):
        paper = (f"MSE {_paper_value('Table 2', 'Xception (C)', 'random', 'MSE'):.3f} vs "
                 f"{_paper_value('Table 2', 'Xception (R)', 'random', 'MSE'):.3f} (random init)")
        rows.append(_mse_finding("Xception (C) beats Xception (R) (random init)", paper, preds,
                                 "Xception (C)", "Xception (R)", train_mean, summary, n_boot,
                                 seed))
    if importance is not None and len(importance):
        top = pd.Series(importance).sort_values(ascending=False).index[0]
        gbt_learned = "GBT" in summary.index and bool(summary.loc["GBT", "learned"])
        if gbt_learned:
            result = "holds" if str(top).startswith("malignant") else "does not hold"
            why = "GBT learned; the ranking is that of the fitted trees"
        else:
            result = "undecided"
            why = "GBT did not learn, so its feature ranking carries no information"
        rows.append({"paper's finding": "the top GBT feature is from the malignant channel "
                     "(Fig. 9)", "verdict": result, "ours": str(top),
                     "paper": "malignant_activation_0.50", "why": why})
    out = pd.DataFrame(rows, columns=["paper's finding", "verdict", "ours", "paper", "why"])
    return out.set_index("paper's finding")


def claim_words(verdict_: str, holds: str = "holds", does_not_hold: str = "does not hold",
                undecided: str = "is undecided") -> str:
    """A :func:`verdict` in words: by default the verb of a sentence on one of the paper's claims
    ("holds", "does not hold", "is undecided"), or the words a table or sentence uses for each
    verdict (a comparison's "beats", "does worse than", "cannot be told apart from"; a remedy's
    "helps", "hurts", "undecided"). The one place where a verdict becomes words. Used in chapter 2,
    and in the real-H&E chapter through :func:`cellulib.reporting.sentences.decoder_sentence`.

    Examples
    --------
    >>> claim_words("undecided"), claim_words("holds", "helps", "hurts", "undecided")
    ('is undecided', 'helps')
    """
    words = {"holds": holds, "does not hold": does_not_hold, "undecided": undecided}
    if verdict_ not in words:
        raise ValueError(f"a verdict is one of {VERDICTS}, got {verdict_!r}")
    return words[verdict_]
