"""The book's computed sentences: what a table, a verdict or a measurement says, in English, so
the chapters glue words that code wrote. Used in chapters 1, 3, 4 and 5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellulib.reporting.paper import DENUC_RADIUS_PX, MCSPATNET_F, book_numbers
from cellulib.reporting.statistics import MEAN_PREDICTOR, MIN_PATCHES, Estimate, bias_by_bin
from cellulib.reporting.tables import BRCA_M2C_NAMES
from cellulib.reporting.verdicts import REAL_FLOORS, claim_words, floors_missed, verdict

__all__ = [
    "cache_sentence",
    "importance_caveat",
    "learned_count",
    "route_cost_sentence",
    "schedule_text",
    "minutes_text",
    "labels_sentence",
    "stain_sources_sentence",
    "brca_m2c_sentence",
    "pixel_scale_sentence",
    "training_sentence",
    "decoder_sentence",
    "real_he_finding",
    "confusion_sentence",
    "jaccard_sentence",
    "fraction_sentence",
    "dot_examples",
    "dots_sentence",
    "transfer_sentence",
    "real_he_summary",
    "SCORE_STEP",
    "learned_sentence",
    "regression_to_mean_sentence",
    "calibration_sentence",
]


def cache_sentence(n_models: int, n_cached: int, where: str = "earlier chapters") -> str:
    """How many of a chapter's models came from the cache and how many it trained itself.

    Used in chapter 5, whose models come from the cache of chapters 2-4 unless those have not run.

    >>> cache_sentence(8, 8)
    'All 8 models below came from the cache of earlier chapters.'
    >>> cache_sentence(8, 5)
    'Of the 8 models below, 5 came from the cache of earlier chapters and 3 were trained here.'
    >>> cache_sentence(8, 0)
    'All 8 models below were trained here (none was in the cache of earlier chapters).'
    >>> cache_sentence(2, 1)
    'Of the 2 models below, 1 came from the cache of earlier chapters and 1 was trained here.'
    """
    if not 0 <= n_cached <= n_models:
        raise ValueError(f"{n_cached} cached models out of {n_models}")
    if n_cached == n_models:
        return f"All {n_models} models below came from the cache of {where}."
    if n_cached == 0:
        return f"All {n_models} models below were trained here (none was in the cache of {where})."
    trained = n_models - n_cached
    return (f"Of the {n_models} models below, {n_cached} came from the cache of {where} and "
            f"{trained} {'was' if trained == 1 else 'were'} trained here.")


def learned_sentence(summary: pd.DataFrame, names: Sequence[str] | None = None) -> str:
    """One clause per model saying whether it learned, with the numbers that decide it.

    E.g. "GBT has learned (95% CI of its MSE 0.0081-0.0120, below the mean predictor's 0.0402)".
    ``summary`` is :func:`cellulib.reporting.statistics.mse_summary` with a mean predictor. SPEC
    5.1; used in chapters 3 and 4.
    """
    if MEAN_PREDICTOR not in summary.index:
        return "no mean predictor was given, so whether the models learned is not known"
    base = summary.loc[MEAN_PREDICTOR, "mse"]
    names = [n for n in (names or summary.index) if n != MEAN_PREDICTOR]
    parts = []
    for name in names:
        row = summary.loc[name]
        ci = f"95% CI of its MSE {row['ci_low']:.4f}-{row['ci_high']:.4f}"
        if row["learned"]:
            parts.append(f"{name} has learned ({ci}, below the mean predictor's {base:.4f})")
        elif row["n"] < MIN_PATCHES:
            parts.append(f"{name} cannot be shown to have learned (only {row['n']} validation "
                         "patches)")
        else:
            parts.append(f"{name} has not learned ({ci} reaches the mean predictor's {base:.4f})")
    return "; ".join(parts)


def learned_count(summary: pd.DataFrame, names: Sequence[str], what: str) -> str:
    """How many of the models ``names`` learned
    (:func:`cellulib.reporting.statistics.mse_summary`), and which:
    ``"2 of the 2 segmentation routes learned (GBT, ResNet34 (SR))"``, ``what`` naming the
    models. Used in chapter 3."""
    ok = [name for name in names if summary.loc[name, "learned"]]
    return (f"{len(ok)} of the {len(names)} {what} learned"
            + (f" ({', '.join(ok)})" if ok else ""))


def importance_caveat(summary: pd.DataFrame, model: str = "GBT") -> str:
    """What a feature ranking of ``model`` says, given whether the model learned
    (:func:`cellulib.reporting.statistics.mse_summary`): what its predictions rest on, or mostly
    noise. Used in chapter 3."""
    if summary.loc[model, "learned"]:
        return f"{model} has learned, so this ranking says what its predictions rest on."
    return (f"{model} has not learned at this budget (the 95% CI of its MSE reaches the mean "
            "predictor's), so this ranking reflects noise more than what predicts cellularity.")


def minutes_text(seconds: float) -> str:
    """A training time as every computed sentence of the book writes it: minutes with one decimal
    under 10 minutes, whole minutes from there, so one time reads the same wherever a page states it.
    The sentences of the real-H&E chapter (:func:`training_sentence`, :func:`real_he_finding`,
    :func:`real_he_summary`, :func:`command_line_sentence` and
    :func:`cellulib.reporting.realtissue.synthetic_detector_sentence`) write their training times
    with it.

    >>> minutes_text(270), minutes_text(60), minutes_text(1420)
    ('4.5 minutes', '1.0 minutes', '24 minutes')
    """
    minutes = seconds / 60
    return f"{minutes:.1f} minutes" if round(minutes, 1) < 10 else f"{minutes:.0f} minutes"


def schedule_text(settings: Mapping[str, Any], prefix: str = "direct") -> str:
    """The learning-rate schedule of a profile's ``{prefix}`` models in words
    (``{prefix}_schedule``, ``{prefix}_lr``): one-cycle with its peak, or a rate decaying tenfold.
    Used in chapter 4."""
    lr = settings[f"{prefix}_lr"]
    if settings[f"{prefix}_schedule"] == "one_cycle":
        return f"a one-cycle schedule (peak learning rate {lr:g})"
    return f"a learning rate decaying from {lr:g} to {lr / 10:g}"


def route_cost_sentence(comparison: Mapping[str, Any]) -> str:
    """What the interpretable route costs in accuracy, from
    :func:`cellulib.reporting.verdicts.compare` of the best
    segmentation-route model (``better``) against the best direct one: nothing (it is the more
    accurate), its paired MSE difference with the CI, or that the numbers cannot tell. Used in
    chapter 5."""
    diff = comparison["difference"]
    return {"holds": "Here the interpretable route costs no accuracy: it is the more accurate one.",
            "does not hold": (f"Here the interpretable route costs {diff.value:.4f} in MSE (95% CI "
                              f"{diff.ci_low:.4f} to {diff.ci_high:.4f})."),
            "undecided": ("Whether the interpretable route costs accuracy cannot be told from these "
                          "numbers.")}[comparison["verdict"]]


def regression_to_mean_sentence(preds: Mapping[str, pd.DataFrame], summary: pd.DataFrame) -> str:
    """What the errors by bin say about regression to the mean, for the models that learned only.

    A model that has not learned has not told low from high cellularity apart, so its errors by
    bin would show "regression to the mean" (or its opposite) without meaning anything; such
    models are left out, and when none learned the sentence says so. Used in chapter 4.
    """
    if MEAN_PREDICTOR not in summary.index:
        return "Without a mean predictor we cannot tell which models learned, so this is not analysed."
    ok = [n for n in preds if summary.loc[n, "learned"]]
    if not ok:
        return ("None of the models has learned (every MSE's 95% CI reaches the mean predictor's "
                f"{summary.loc[MEAN_PREDICTOR, 'mse']:.4f}), so their errors by bin cannot "
                "show regression to the mean here.")
    bias = bias_by_bin({n: preds[n] for n in ok})
    low, high = bias.columns[0], bias.columns[-1]
    parts = []
    for name, row in bias.iterrows():
        lo_txt = "no patch" if math.isnan(row[low]) else f"{row[low]:+.3f}"
        hi_txt = "no patch" if math.isnan(row[high]) else f"{row[high]:+.3f}"
        sign = (not math.isnan(row[low]) and not math.isnan(row[high]) and row[low] > 0 > row[high])
        parts.append(f"{name}: {lo_txt} in the lowest bin and {hi_txt} in the highest"
                     + (" (the signature)" if sign else ""))
    skipped = [n for n in preds if n not in ok]
    tail = (f" {', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} left out: "
            f"{'it has' if len(skipped) == 1 else 'they have'} not learned.") if skipped else ""
    return "Mean error by bin for the models that learned: " + "; ".join(parts) + "." + tail


def brca_m2c_sentence(cells: pd.DataFrame, train_idx, val_idx, report_split: str) -> str:
    """How the real-H&E chapter splits a BRCA-M2C copy, in words: the held-out patients, the
    patients the official validation split would share with training, and which split the results
    are on (``report_split``, :func:`cellulib.reporting.realtissue.report_images`). Used in the real-H&E
    chapter."""
    from cellulib.data.breastpathq import patient_code

    patient = cells["name"].map(patient_code)
    official = cells["split"].to_numpy()
    shared = sorted(set(patient[official == "train"]) & set(patient[official == "val"]))
    return (
        f"This copy holds {len(cells)} images. Their names start with the TCGA patient code "
        "(`TCGA-A7-A0DB`, ...), and images of one patient share staining, scanning and tissue, so "
        f"a network is validated here on **patients it has not seen**: {len(val_idx)} of the "
        f"{len(train_idx) + len(val_idx)} training and validation images, "
        f"{patient.iloc[val_idx].nunique()} whole patients (`cellulib.data.breastpathq.patient_split`; the "
        "same patients for every seed, so runs compare on one set). The official validation split "
        f"would share {len(shared)} patients ({', '.join(shared)}) with the official training split "
        "and flatter the network. "
        + ("The official test split (patients in neither) is present: the results below are on it; "
           "validation only chooses between the decoders, when both are trained."
           if report_split == "test" else
           "The official test split (images of other patients) is not in this copy, so the results "
           "below are on the held-out patients, which also choose between the decoders when both "
           "are trained. The "
           "README says how to get the full dataset."))


def pixel_scale_sentence(nn_distance, diameters, disc: float, factor: float,
                         low_pct: int = 5) -> str:
    """Why a dataset's disc diameter and downscale suit its nuclei, in words: the distances to the
    nearest annotated neighbour (``nn_distance``, px), the nuclei's diameters (px), the disc and
    the downscale chosen, the FPN's stride and the detection radius. Used in the real-H&E
    chapter."""
    from cellulib.metrics.detection import DETECTION_RADIUS

    nn_distance, diameters = np.asarray(nn_distance, float), np.asarray(diameters, float)
    stride, size = book_numbers()["fpn_stride"], np.median(diameters)
    return (
        f"Neighbouring nuclei sit a median {np.median(nn_distance):.1f} px apart ({low_pct}% of "
        f"them closer than {np.percentile(nn_distance, low_pct):.1f} px), and nuclei segmented from "
        f"the haematoxylin channel measure a median {size:.1f} px across. The discs here are "
        f"therefore **{disc:g} px** across, about one nucleus and less than the distance between "
        f"{100 * np.mean(nn_distance > disc):.0f}% of neighbours, so that most discs do not touch. "
        f"The images are **{'not downscaled' if factor == 1 else f'downscaled x{factor:g}'}**: "
        f"the FPN predicts on a grid {stride} times coarser than its input, where a {size:.0f} px "
        f"nucleus spans {size / stride:.1f} cells at full size and half that after a x2 downscale, "
        f"and the detection protocol below asks for centres within {DETECTION_RADIUS:g} px of the "
        "dot.")


def training_sentence(settings: Mapping[str, Any], profile: str, seconds: float,
                      networks: Sequence[str] = ("FPN", "U-Net")) -> str:
    """How a profile's segmentation ``networks`` were trained (``settings``,
    :func:`cellulib.data.profiles.brca_m2c_profile`), and how long they took. With the FPN alone
    (the quick profile's default, :data:`cellulib.data.profiles.BRCA_M2C_COMPARE_DECODERS`) it says
    how to train the U-Net beside it. Used in the real-H&E chapter."""
    recipe = (f"{settings['seg_epochs']} epochs of {settings['patches_per_epoch']} random "
              f"{settings['crop']}-pixel crops per image "
              f"({settings['seg_schedule'].replace('_', '-')} schedule, peak rate "
              f"{settings['seg_lr']:g})")
    if len(networks) == 1:
        return (f"The {profile} profile trains the {networks[0]} for {recipe}, in "
                f"{minutes_text(seconds)}. It leaves the U-Net decoder out to save its training "
                "time; `-p compare_decoders True` (the paper profile's default) trains it beside "
                "the FPN and tests the paper's ranking of the decoders on real nuclei.")
    return (f"The {profile} profile trains each network for {recipe}; the two took "
            f"{minutes_text(seconds)} together.")


def decoder_sentence(val_scores: Mapping[str, pd.DataFrame], best: str, threshold: float,
                     report_split: str, n_images: int, difference: Estimate | None) -> str:
    """The real-H&E chapter's choice of decoder and its test of the paper's ranking, in words:
    pooled and tumour F of FPN and U-Net on the held-out patients (``val_scores``,
    :func:`cellulib.metrics.detection.detection_scores` tables), the decoder
    :func:`cellulib.reporting.scoring.best_detector` keeps,
    FPN minus U-Net in pooled F on the reported split (``difference``,
    :func:`cellulib.reporting.statistics.paired_detection_difference`) with its
    :func:`cellulib.reporting.verdicts.verdict`, and the floors
    (:data:`cellulib.reporting.verdicts.REAL_FLOORS`,
    :func:`cellulib.reporting.verdicts.floors_missed`). With the FPN alone (``val_scores`` of one
    network, ``difference`` None; the quick profile's default) it gives that network's F and
    floors, and no ranking. Used in the real-H&E chapter."""
    names = BRCA_M2C_NAMES
    f = {name: (t.loc["detection", "f1"], t.loc["malignant", "f1"]) for name, t in val_scores.items()}
    missed = {name: floors_missed(t) for name, t in val_scores.items()}
    # a class a network never predicts (no detection of it at all) was not learned: say so
    silent = {name: [c for c in names if c != "detection" and c in t.index
                     and t.loc[c, "tp"] + t.loc[c, "fp"] == 0]
              for name, t in val_scores.items() if {"tp", "fp"} <= set(t.columns)}
    unlearned = "".join(
        f" {name} classes no nucleus as {' or '.join(names[c] for c in cls)}: it did not learn "
        f"{'that class' if len(cls) == 1 else 'those classes'} in this run, so its F "
        f"{'there is' if len(cls) == 1 else 'for them is'} no result about the decoder."
        for name, cls in silent.items() if cls)
    if difference is None or len(val_scores) == 1:
        choice = (
            f"This build trains one decoder on real nuclei, the **{best}** (pooled / tumour F on "
            f"the held-out patients {f[best][0]:.3f} / {f[best][1]:.3f}; threshold "
            f"{threshold:g}), so it does not test the paper's ranking of the decoders here; "
            "chapter 2 does on synthetic patches.")
    else:
        ranking = claim_words(verdict(difference, True, True, lower_is_better=False))
        choice = (
            f"The held-out patients pick the **{best}** decoder by the mean of pooled and tumour "
            "F, because cellularity rests on the tumour nuclei while the other classes only need "
            f"to be found (pooled / tumour F: FPN {f['FPN'][0]:.3f} / {f['FPN'][1]:.3f}, U-Net "
            f"{f['U-Net'][0]:.3f} / {f['U-Net'][1]:.3f}; threshold {threshold:g}). On the "
            f"{report_split} split ({n_images} images), FPN minus U-Net in pooled F is "
            f"{difference.value:+.3f} (95% CI {difference.ci_low:+.3f} to "
            f"{difference.ci_high:+.3f}, paired bootstrap over images): the paper's ranking of the "
            f"decoders (FPN ahead) {ranking} here for detection.")
    return (
        f"{choice}{unlearned} This book's floors for real H&E, F at least "
        + ", ".join(f"{names[c]} {v:g}" for c, v in REAL_FLOORS.items())
        + " on the held-out patients, are "
        + " and ".join(f"**met** by {name}" if not m else f"**not met** by {name} ("
                       + ", ".join(f"{names[c]} {v:.3f}" for c, v in m.items()) + ")"
                       for name, m in missed.items()) + ". "
        "DeNuC pairs a small detector with a pathology foundation model (UNI2-h) to class the "
        f"nuclei and is scored at 40x with a {DENUC_RADIUS_PX} px radius, close to this protocol "
        "but not identical to it.")


def command_line_sentence(recipe: Mapping[str, Any], profile: str, book_epochs: int,
                          book_val: pd.DataFrame, cli_val: pd.DataFrame | None = None,
                          seconds: float | None = None, threshold: float | None = None,
                          threshold_images: int | None = None) -> str:
    """What ``cellulib train seg --data <BRCA-M2C folder>`` trains, beside the book's FPN: its
    ``recipe`` (:func:`cellulib.data.profiles.command_line_seg`), and, when its model was found
    in the cache or trained (``cli_val``: its :func:`cellulib.metrics.detection.detection_scores`
    on the held-out patients, trained in ``seconds``, detecting at ``threshold``, the one its file
    records, chosen on ``threshold_images`` training images), its F against the book's FPN
    (``book_val``, ``book_epochs`` epochs) and the floors; when not, how to add it. Used in the
    real-H&E chapter through :func:`cellulib.reporting.realtissue.command_line_section`.

    Examples
    --------
    >>> command_line_sentence({"epochs": None}, "paper", 150, None)
    'In the paper profile `cellulib train seg` trains the recipe of this chapter.'
    >>> t = pd.DataFrame({"f1": [0.81, 0.76, 0.56, 0.84]},
    ...                  index=["lymphocyte", "malignant", "normal", "detection"])
    >>> s = command_line_sentence({"epochs": 128}, "quick", 32, t, t, 2400, 0.6, 72)
    >>> s[s.index(" Its FPN"):s.index(" reaches")]
    ' Its FPN, trained in 40 minutes and detecting at the threshold its file records (0.6, chosen on its 72 training images),'
    """
    extra = {k: v for k, v in recipe.items() if k != "epochs"}
    if recipe.get("epochs") is None and not extra:
        return f"In the {profile} profile `cellulib train seg` trains the recipe of this chapter."
    names = BRCA_M2C_NAMES
    def epochs(n: int) -> str:
        return f"{n} epoch{'' if n == 1 else 's'}"

    what = epochs(recipe["epochs"])
    if "seg_weights" in extra:
        w = [float(v) for v in extra.pop("seg_weights")]
        what += (f" with the class weights {', '.join(f'{v:g}' for v in w)} (stromal, lymphocyte, "
                 "tumour, background)")
    what += "".join(f", {k} {v}" for k, v in extra.items())
    head = (f"`cellulib train seg --data <BRCA-M2C folder>` trains a longer recipe than this "
            f"chapter's {epochs(book_epochs)}: {what} (`profiles.BRCA_M2C_COMMAND_LINE`), which "
            "takes longer than the book can spend.")
    if cli_val is None:
        return (head + " Its model is not in this build's cache, so its numbers are not shown: "
                "train it with that command and this build's `CELLULIB_HOME` (or re-execute this chapter with "
                "`-p cli_recipe True`) and this section compares it with the FPN above.")
    classes = list(REAL_FLOORS)
    missed = floors_missed(cli_val)
    parts = [] if seconds is None else [f"trained in {minutes_text(seconds)}"]
    if threshold is not None:
        parts.append(f"detecting at the threshold its file records ({threshold:g}"
                     + ("" if threshold_images is None
                        else f", chosen on its {threshold_images} training images") + ")")
    time = f", {' and '.join(parts)}," if parts else ""
    return (head + f" Its FPN{time} reaches on the held-out patients F "
            + ", ".join(f"{names[c]} {cli_val.loc[c, 'f1']:.3f}" for c in classes)
            + " against " + ", ".join(f"{book_val.loc[c, 'f1']:.3f}" for c in classes)
            + " for this chapter's FPN: "
            + ("every floor is **met**." if not missed else "floors **not met**: "
               + ", ".join(f"{names[c]} {v:.3f} (floor {REAL_FLOORS[c]:g})"
                           for c, v in missed.items()) + "."))


def _weakest(scores: pd.DataFrame) -> pd.Series:
    return scores.drop(index="detection")["f1"].nsmallest(2)


def real_he_finding(best: str, scores: pd.DataFrame, minutes: float, n_train: int,
                    report_split: str) -> str:
    """The real-H&E chapter's one-line finding: the kept network's pooled and tumour F on the
    reported split (``scores``) beside MCSpatNet's, and its two weakest classes. Used in the
    real-H&E chapter."""
    names = BRCA_M2C_NAMES
    return (f"Trained for {minutes_text(minutes * 60)} on {n_train} real BRCA-M2C patches, the {best} "
            f"network detects nuclei with F {scores.loc['detection', 'f1']:.2f} and tumour nuclei "
            f"with F {scores.loc['malignant', 'f1']:.2f} on the {report_split} split (MCSpatNet on "
            f"the test split: {MCSPATNET_F['detection']:.2f} and {MCSPATNET_F['malignant']:.2f}); "
            "its weakest classes are "
            + " and ".join(f"{names[c]} (F {v:.2f})" for c, v in _weakest(scores).items()) + ".")


def confusion_sentence(confusion: pd.DataFrame) -> str:
    """A :func:`cellulib.metrics.detection.class_confusion` table in words: the share of matched nuclei given
    their annotated class, per class, and the largest confusion. A class none of whose annotated
    nuclei was matched has no share ("none matched"), and a table without matched nuclei says so.
    Used in the real-H&E chapter."""
    from cellulib.metrics.detection import DETECTION_CLASSES

    names, classes = BRCA_M2C_NAMES, list(DETECTION_CLASSES)
    matched = confusion.loc[classes, classes]
    total = int(matched.to_numpy().sum())
    if total == 0:
        return "No detected nucleus was matched to an annotated one, so no class can be compared."
    rows = matched.sum(axis=1)
    shares = ", ".join(f"{names[c]} {100 * matched.loc[c, c] / rows[c]:.0f}%" if rows[c]
                       else f"{names[c]} none matched" for c in classes)
    text = (f"Of the matched nuclei, {100 * np.trace(matched.to_numpy()) / total:.0f}% get their "
            f"annotated class ({shares}).")
    off = matched.where(~np.eye(len(classes), dtype=bool)).stack()
    (worst_true, worst_called), n_worst = off.idxmax(), int(off.max())
    if n_worst == 0:
        return text + " No matched nucleus is called another class."
    return (text + f" The largest confusion is {names[worst_true]} nuclei called "
            f"{names[worst_called]}: {n_worst} of {int(rows[worst_true])}.")


def jaccard_sentence(jaccard: pd.DataFrame) -> str:
    """The mean Jaccard of the FPN and U-Net columns of ``jaccard`` (either may be absent; rows named as in
    :data:`cellulib.reporting.tables.BRCA_M2C_NAMES`) beside the paper's Table 1, in words. Used in
    the real-H&E chapter."""
    numbers = book_numbers()
    ours = " and ".join(f"{jaccard.loc['mean (nuclei)', name]:.3f} for {name}"
                        for name in ("FPN", "U-Net") if name in jaccard.columns)
    return (f"The mean over the three classes is {ours} (the paper, BreastPathQ with random "
            f"initialisation: FPN {numbers['paper_j_fpn']}, U-Net {numbers['paper_j_unet']}). "
            "A detector can count nuclei well with a modest Jaccard: a disc is not a nucleus, and "
            "only the centre matters for detection.")


def fraction_sentence(fractions: pd.DataFrame) -> str:
    """Agreement of the detected with the annotated tumour share per image (columns ``annotated``
    and ``detected``): ICC(2,1) with its 95% CI and the mean absolute difference. Used in the
    real-H&E chapter."""
    from cellulib.metrics.agreement import icc, icc_ci

    ratings = fractions[["annotated", "detected"]].to_numpy()
    lo, hi = icc_ci(ratings, "ICC2")
    return (f"Over {len(fractions)} images the agreement is ICC(2,1) {icc(ratings, 'ICC2'):.2f} "
            f"(95% CI {lo:.2f} to {hi:.2f}); the mean absolute difference is "
            f"{np.mean(np.abs(fractions['annotated'] - fractions['detected'])):.3f}.")


def dot_examples(cells: pd.DataFrame) -> list[str]:
    """The images to show of a BRCA-M2C split: the one with the most tumour dots, the most
    lymphocytes and the most stromal dots (each once). Used in the real-H&E chapter."""
    by_name = cells.set_index("name")
    return list(dict.fromkeys(by_name[c].idxmax() for c in ("n_malignant", "n_lymphocyte", "n_normal")))


def dots_sentence(fractions: pd.DataFrame, images: Sequence[str]) -> str:
    """Dots against detections per shown image, (a), (b), ... in the order of ``images``
    (``fractions``: :attr:`cellulib.inference.detect.AnnotatedScores.fractions`). Used in the real-H&E
    chapter."""
    per_image = fractions.set_index("image").loc[list(images), ["n_annotated", "n_detected"]]
    return ("Dots and detections per image: " + "; ".join(
        f"({chr(97 + i)}) {int(r.n_annotated)} vs {int(r.n_detected)}"
        for i, r in enumerate(per_image.itertuples()))
        + ". A nucleus the annotators did not mark counts as a false positive when it is found.")


def _transfer_f(scored: Mapping[tuple[str, str], Any]) -> dict[tuple[str, str], float]:
    return {k: s.scores().loc["detection", "f1"] for k, s in scored.items()}


def transfer_sentence(scored: Mapping[tuple[str, str], Any], settings: Mapping[str, Any]) -> str:
    """A :func:`cellulib.reporting.tables.transfer_table` of the synthetic- and the
    BRCA-M2C-trained network in words, with
    why the synthetic one does not count nuclei (its disc and downscale, ``settings``, against the
    spacing of the synthetic nuclei). Used in the real-H&E chapter."""
    from cellulib.data.annotations import nearest_dot_distances

    f = _transfer_f(scored)
    own = scored[("synthetic", "synthetic")]
    spacing = np.median(nearest_dot_distances(own.truth)) / settings["downscale"]
    return (
        f"Trained on synthetic patches, the network finds real nuclei with pooled F "
        f"{f[('synthetic', 'BRCA-M2C')]:.2f} against {f[('BRCA-M2C', 'BRCA-M2C')]:.2f} for the "
        "real-trained one; trained on real patches, it finds synthetic nuclei with F "
        f"{f[('BRCA-M2C', 'synthetic')]:.2f} against {f[('synthetic', 'synthetic')]:.2f} for the "
        "synthetic-trained one. That last figure is low on its own data: the synthetic-trained "
        f"network keeps chapter 2's setting, the paper's {settings['disc_diameter']:g} px discs "
        f"after a x{settings['downscale']:g} downscale, where neighbouring synthetic nuclei sit a "
        f"median {spacing:.1f} px apart at that scale, so its discs merge into blobs that hold "
        f"several nuclei (it finds {len(own.pred)} centres for {len(own.truth)} dots). Such a "
        "network segments tumour area, which is what cellularity needs, but it does not count "
        "nuclei. Neither dataset stands in for the other: numbers measured on synthetic data say "
        "how the methods compare, not how well they do on real tissue.")


def real_he_summary(nn_distance, diameters, settings: Mapping[str, Any], best: str,
                    minutes: float, scores: pd.DataFrame, report_split: str,
                    scored: Mapping[tuple[str, str], Any]) -> str:
    """The real-H&E chapter's summary, one bullet each: the pixel scale (``settings`` of the
    BRCA-M2C networks), the kept network against MCSpatNet (``scores`` on the reported split) and
    the transfer between datasets (``scored``, as
    :func:`cellulib.reporting.tables.transfer_table`). Used in the real-H&E
    chapter."""
    from cellulib.constants import DISC_DIAMETER, SEG_DOWNSCALE

    f = _transfer_f(scored)
    disc, factor = settings["disc_diameter"], settings["downscale"]
    lines = [
        f"Real nuclei need their own pixel scale: at 20x, with nuclei a median "
        f"{np.median(diameters):.0f} px across and neighbours {np.median(nn_distance):.0f} px "
        f"apart, BRCA-M2C is segmented "
        f"{'at full size' if factor == 1 else f'after a x{factor:g} downscale'} with {disc:g} px "
        f"discs, where the paper's x{SEG_DOWNSCALE:g} downscale and {DISC_DIAMETER:g} px discs would "
        "merge neighbours.",
        f"Chapter 2's weakly supervised {best} network, trained for {minutes_text(minutes * 60)} on real "
        f"dots, detects nuclei with F {scores.loc['detection', 'f1']:.2f} on the {report_split} "
        f"split, against {MCSPATNET_F['detection']:.2f} for MCSpatNet, a dedicated detector, on "
        "the test split" + (" (different images: compare with care)." if report_split != "test"
                            else ".")
        + f" Telling {BRCA_M2C_NAMES[_weakest(scores).index[0]]} nuclei from the others is the "
        "hard part.",
        f"Across datasets: the real-trained network finds synthetic nuclei with F "
        f"{f[('BRCA-M2C', 'synthetic')]:.2f} (real ones: {f[('BRCA-M2C', 'BRCA-M2C')]:.2f}); the "
        "synthetic-trained one, whose large discs make it segment tumour area rather than count "
        f"nuclei, reaches {f[('synthetic', 'synthetic')]:.2f} on its own data and "
        f"{f[('synthetic', 'BRCA-M2C')]:.2f} on real nuclei.",
    ]
    return "\n".join(f"- {line}" for line in lines)


#: BreastPathQ's pathologists score cellularity in steps of this size.
SCORE_STEP = 0.05


def labels_sentence(real, synthetic, gap: Mapping[str, Any], law: Mapping[str, Any],
                    score_step: float = SCORE_STEP) -> str:
    """The real BreastPathQ labels beside the synthetic ones, in words: zeros, medians and the
    two-sample KS statistic (``gap``, :func:`cellulib.data.measure.label_distance`), and how close the
    generator's law itself comes (``law``, :func:`cellulib.data.measure.law_distance`). Used in chapter
    1."""
    return (f"{100 * gap['zeros_real']:.0f}% of the real labels are 0 and "
            f"{100 * gap['zeros_synthetic']:.0f}% of the synthetic ones; the medians are "
            f"{np.median(real):.2f} and {np.median(synthetic):.2f}. The two-sample KS statistic is "
            f"{gap['ks']:.3f} (p = {gap['p']:.2g}, {gap['n_synthetic']} synthetic labels): part of "
            "the gap is the size of the synthetic set, part is that pathologists score in steps of "
            f"{score_step:g}, which a smooth law does not copy ({law['n_synthetic']:,} draws of the "
            f"law sit at KS {law['ks']:.2f}).")


def stain_sources_sentence(stats: pd.DataFrame) -> str:
    """Mean H and E optical density per source of :func:`cellulib.data.measure.compare_stains`, in words,
    and how much darker in haematoxylin the BRCA-M2C patches are than the synthetic ones when
    they are there. Used in chapter 1."""
    od = stats.groupby("source")[["H", "E"]].mean()
    return ("Mean optical densities per source: "
            + "; ".join(f"{src} H {row.H:.3f}, E {row.E:.3f}" for src, row in od.iterrows()) + ". "
            + (f"The BRCA-M2C patches are stained {od.loc['BRCA-M2C', 'H'] / od.loc['synthetic', 'H']:.1f} "
               "times as dark in haematoxylin as the synthetic ones: staining differs between labs "
               "and scanners, and the generator sits at the pale end of what these real images span."
               if "BRCA-M2C" in od.index else ""))


def calibration_sentence(table: pd.DataFrame, default: str = "default generator",
                         calibrated: str = "calibrated generator", n_worst: int = 3) -> str:
    """A :func:`cellulib.data.measure.generator_calibration` table in words: the default
    generator's largest gaps to real tissue (by KS, with the ratio of medians), how far the
    calibrated generator moved each of them, and on how many statistics it is closer. Used in
    chapter 1."""
    ks_d, ks_c = table[f"KS ({default})"], table[f"KS ({calibrated})"]
    worst = ks_d.sort_values(ascending=False).index[:n_worst]
    gaps = "; ".join(f"{name} ({table.loc[name, f'ratio ({default})']:.2f} times the real median, "
                     f"KS {ks_d[name]:.2f} -> {ks_c[name]:.2f})" for name in worst)
    closer = int((ks_c < ks_d).sum())
    return (f"The default generator's largest gaps to real tissue are: {gaps}. The calibrated "
            f"generator is closer on {closer} of the {len(table)} statistics (median KS "
            f"{ks_d.median():.2f} -> {ks_c.median():.2f}).")
