"""Honest comparisons (SPEC 5.1): the mean predictor, "learned", the paired bootstrap of an MSE
difference and the verdicts, checked on hand-computed cases and against brute-force references."""

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cellulib.metrics import agreement, detection
from cellulib.reporting import paper, scoring, sentences, statistics, tables, verdicts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frame(y_true, y_pred, paths=None):
    y_true = np.asarray(y_true, float)
    paths = paths if paths is not None else [f"p{i}.tif" for i in range(len(y_true))]
    return pd.DataFrame({"path": paths, "y_true": y_true, "y_pred": np.asarray(y_pred, float)})


@pytest.fixture(scope="module")
def truth():
    return np.random.default_rng(0).uniform(0.0, 1.0, 60).round(2)


@pytest.fixture(scope="module")
def preds(truth):
    """Six models of known quality on 60 patches: perfect-ish, good, and uninformed."""
    rng = np.random.default_rng(1)

    def noisy(sd):
        return np.clip(truth + rng.normal(0, sd, truth.size), 0, 1)

    return {
        "GBT": _frame(truth, noisy(0.20)),
        "ResNet34 (SR)": _frame(truth, noisy(0.03)),
        "ResNet34 (R)": _frame(truth, noisy(0.10)),
        "ResNet50 (R)": _frame(truth, np.full(truth.size, 0.5)),  # uninformed: no better than mean
        "Xception (R)": _frame(truth, noisy(0.10)),
        "Xception (C)": _frame(truth, noisy(0.02)),
    }


# ---------------------------------------------------------------------------------------------
# mean predictor and learned


def test_mean_predictor_is_the_training_mean_for_every_patch():
    frame = statistics.mean_predictor_predictions(_frame([0.1, 0.5, 0.9], [0, 0, 0]), 0.4)
    assert frame.columns.tolist() == ["path", "y_true", "y_pred"]
    assert frame.y_pred.tolist() == [0.4, 0.4, 0.4]
    # its MSE by hand: (0.09 + 0.01 + 0.25) / 3
    assert agreement.mse(frame.y_true, frame.y_pred) == pytest.approx(0.35 / 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        statistics.mean_predictor_predictions([0.1], 40.0)


def test_training_mean_prefers_the_model_record_and_never_guesses(tmp_path):
    assert statistics.training_mean(result=SimpleNamespace(meta={"train_mean": 0.3})) == 0.3
    with pytest.raises(ValueError, match="no train_mean"):
        statistics.training_mean(result=SimpleNamespace(meta={}))


def test_training_mean_from_the_training_split(tmp_path):
    from cellulib.data import synthset

    root = synthset.make_breastpathq(tmp_path, n_train=6, n_val=2, n_cells=1, size=64, seed=0,
                                  progress=False)
    labels = pd.read_csv(root / "datasets" / "train_labels.csv")
    assert len(labels) == 6
    assert statistics.training_mean(root) == pytest.approx(labels["y"].mean())


def test_a_perfect_model_learned_and_a_constant_at_the_mean_did_not(truth):
    mean = float(truth.mean())
    preds = {"perfect": _frame(truth, truth), "constant": _frame(truth, np.full(truth.size, mean))}
    summary = statistics.mse_summary(preds, train_mean=mean, n_boot=500)
    assert summary.loc["perfect", "mse"] == 0 and summary.loc["perfect", "ci_high"] == 0
    assert summary.loc["perfect", "learned"] is True
    # the constant IS the mean predictor: its CI straddles its own MSE, so it cannot be below it
    assert summary.loc["constant", "mse"] == pytest.approx(summary.loc["Mean predictor", "mse"])
    assert summary.loc["constant", "learned"] is False
    assert summary.loc["Mean predictor", "learned"] is None
    assert summary.loc["Mean predictor", "mse"] == pytest.approx(np.mean((truth - mean) ** 2))


def test_learned_is_strict_and_needs_enough_patches():
    assert statistics.learned(0.0399, 0.04)
    assert not statistics.learned(0.04, 0.04)
    assert not statistics.learned(float("nan"), 0.04)
    assert not statistics.learned(0.0, 0.04, n=statistics.MIN_PATCHES - 1)
    assert statistics.learned(0.0, 0.04, n=statistics.MIN_PATCHES)


def test_mse_ci_is_the_metrics_bootstrap(truth):
    y_pred = np.clip(truth + 0.1, 0, 1)
    est = statistics.mse_ci(truth, y_pred, n_boot=300, seed=3)
    lo, hi = agreement.bootstrap_ci(agreement.mse, truth, y_pred, n_boot=300, seed=3)
    assert (est.ci_low, est.ci_high) == (lo, hi)
    assert est.value == pytest.approx(agreement.mse(truth, y_pred))


# ---------------------------------------------------------------------------------------------
# paired difference and verdicts


def test_paired_difference_of_identical_predictions_is_exactly_zero(truth):
    a = _frame(truth, np.clip(truth + 0.05, 0, 1))
    assert statistics.paired_mse_difference(a, a.copy(), n_boot=200) == (0.0, 0.0, 0.0)


def test_paired_difference_equals_a_brute_force_loop(truth):
    rng = np.random.default_rng(5)
    a = _frame(truth, np.clip(truth + rng.normal(0, 0.05, truth.size), 0, 1))
    b = _frame(truth, np.clip(truth + rng.normal(0, 0.08, truth.size), 0, 1))
    est = statistics.paired_mse_difference(a, b, n_boot=400, seed=7)
    idx = np.random.default_rng(7).integers(0, truth.size, (400, truth.size))
    boot = [agreement.mse(truth[i], a.y_pred.to_numpy()[i]) - agreement.mse(truth[i], b.y_pred.to_numpy()[i])
            for i in idx]
    assert est.value == pytest.approx(agreement.mse(truth, a.y_pred) - agreement.mse(truth, b.y_pred))
    assert est.ci_low == pytest.approx(np.quantile(boot, 0.025))
    assert est.ci_high == pytest.approx(np.quantile(boot, 0.975))


def test_paired_difference_matches_by_path_not_row_order(truth):
    a = _frame(truth, np.clip(truth + 0.05, 0, 1))
    b = a.iloc[::-1].reset_index(drop=True)
    assert statistics.paired_mse_difference(a, b, n_boot=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same patches"):
        statistics.paired_mse_difference(a, a.iloc[:10], n_boot=50)


def test_a_clear_difference_holds(preds):
    mean = float(preds["GBT"].y_true.mean())
    cmp = verdicts.compare(preds, "ResNet34 (SR)", "GBT", mean, n_boot=500)
    assert cmp["difference"].ci_high < 0
    assert cmp["learned_better"] and cmp["learned_worse"]
    assert cmp["verdict"] == "holds" and cmp["phrase"] == "beats"
    assert cmp["sentence"].startswith("ResNet34 (SR) beats GBT (MSE ")
    # the claim the other way round is refuted, not merely undecided
    back = verdicts.compare(preds, "GBT", "ResNet34 (SR)", mean, n_boot=500)
    assert back["verdict"] == "does not hold" and back["phrase"] == "does worse than"


def test_undecided_when_one_model_did_not_learn_even_if_its_mse_is_lower():
    truth = np.linspace(0, 1, 40)
    mean = 0.5
    # A: slightly better than the mean predictor, but not with 95% confidence
    a = _frame(truth, 0.95 * np.full(truth.size, mean) + 0.05 * truth)
    b = _frame(truth, np.full(truth.size, mean))  # the mean itself: worse than A on every patch
    preds = {"A": a, "B": b}
    summary = statistics.mse_summary(preds, train_mean=mean, n_boot=500)
    assert summary.loc["A", "mse"] < summary.loc["B", "mse"]
    assert not summary.loc["A", "learned"] and not summary.loc["B", "learned"]
    cmp = verdicts.compare(preds, "A", "B", mean, n_boot=500, summary=summary)
    assert cmp["difference"].ci_high < 0  # A is better on the same patches, with confidence...
    assert cmp["verdict"] == "undecided"  # ...but neither has learned
    assert cmp["phrase"] == "cannot be ranked against" and "not learned" in cmp["detail"]


def test_verdict_when_the_interval_includes_zero():
    assert verdicts.verdict(statistics.Estimate(-0.001, -0.003, 0.001), True, True) == "undecided"
    assert verdicts.verdict(statistics.Estimate(0.004, 0.002, 0.006), True, True) == "does not hold"
    assert verdicts.verdict(statistics.Estimate(0.004, 0.002, 0.006), True, True,
                          lower_is_better=False) == "holds"


# ---------------------------------------------------------------------------------------------
# tables and sentences


def test_results_table_has_the_mean_predictor_row_and_learned(preds):
    mean = float(preds["GBT"].y_true.mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", agreement.MetricWarning)
        table = tables.results_table(preds, n_boot=100, seed=0, train_mean=mean)
        plain = tables.results_table(preds, n_boot=100, seed=0)
    assert "Mean predictor" in table.index and "learned" in table.columns
    assert table.loc["ResNet34 (SR)", "learned"] == "yes"
    assert table.loc["ResNet50 (R)", "learned"] == "no"
    assert table.loc["Mean predictor", "learned"] == "-"
    expected = np.mean((preds["GBT"].y_true - mean) ** 2)
    assert table.loc["Mean predictor", "MSE (ours)"].startswith(f"{expected:.3f} [")
    # without a training mean the table is as before
    assert "Mean predictor" not in plain.index and "learned" not in plain.columns


def test_findings_verdicts_follow_the_intervals(preds):
    mean = float(preds["GBT"].y_true.mean())
    importance = pd.Series({"malignant_activation_0.50": 9.0, "normal_area_0.02": 1.0})
    table = verdicts.findings(preds, mean, importance=importance, n_boot=500)
    assert set(table["verdict"]) <= set(verdicts.VERDICTS)
    assert table.loc["SR beats GBT (Table 2)", "verdict"] == "holds"
    # best direct (Xception C, sd 0.02) vs best segmentation route (SR, sd 0.03): close
    assert table.loc["Xception (C) beats Xception (R) (random init)", "verdict"] == "holds"
    # GBT learned (sd 0.2 on uniform labels is better than the mean), so Fig. 9 is decided
    top = "the top GBT feature is from the malignant channel (Fig. 9)"
    assert table.loc[top, "verdict"] == "holds"
    assert table.loc["SR beats GBT (Table 2)", "paper"] == "MSE 0.013 vs 0.023 (random init)"


def test_every_finding_is_undecided_when_nothing_learned(truth):
    mean = float(truth.mean())
    rng = np.random.default_rng(2)
    names = list(paper.PAPER_ROWS)
    preds = {n: _frame(truth, np.clip(mean + rng.normal(0, 0.01, truth.size), 0, 1)) for n in names}
    importance = pd.Series({"malignant_activation_0.50": 9.0, "normal_area_0.02": 1.0})
    table = verdicts.findings(preds, mean, importance=importance, n_boot=300)
    assert len(table) == 4 and (table["verdict"] == "undecided").all()
    summary = statistics.mse_summary(preds, mean, n_boot=300)
    sentence = sentences.regression_to_mean_sentence(preds, summary)
    assert sentence.startswith("None of the models has learned")
    assert "has not learned" in sentences.learned_sentence(summary, ["GBT"])


def test_bias_by_bin_by_hand():
    p = _frame([0.1, 0.2, 0.9, 0.8], [0.3, 0.3, 0.7, 0.8])
    bias = statistics.bias_by_bin({"m": p})
    assert bias.loc["m"].iloc[0] == pytest.approx((0.2 + 0.1) / 2)
    assert np.isnan(bias.loc["m"].iloc[1]) and np.isnan(bias.loc["m"].iloc[2])
    assert bias.loc["m"].iloc[3] == pytest.approx((-0.2 + 0.0) / 2)


def test_mse_summary_figure(preds):
    from cellulib.reporting import plots

    summary = statistics.mse_summary(preds, float(preds["GBT"].y_true.mean()), n_boot=100)
    fig = plots.mse_summary(summary)
    ax = fig.axes[0]
    assert "MSE" in ax.get_xlabel() and ax.get_ylabel() == "model"
    assert [t.get_text() for t in ax.get_yticklabels()] == list(preds)
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("mean predictor") for label in labels)
    assert "paper, random init" in labels and "paper, ImageNet" in labels


# ---------------------------------------------------------------------------------------------
# segmentation: per-image Jaccard


def test_jaccard_summary_and_difference_by_hand():
    def counts(rows):
        return pd.DataFrame(rows, columns=["image", "cls", "intersection", "union", "target",
                                           "pixels"])

    # two images, one class: pooled IoU (2 + 1) / (4 + 2) = 0.5; baseline (4 + 2) / (10 + 10)
    a = counts([("i1", "malignant", 2, 4, 4, 10), ("i2", "malignant", 1, 2, 2, 10)])
    b = counts([("i1", "malignant", 1, 4, 4, 10), ("i2", "malignant", 1, 2, 2, 10)])
    js = statistics.jaccard_summary({"a": a, "b": b}, n_boot=200)
    assert js.loc["a", "jaccard"] == pytest.approx(0.5)
    assert js.loc["b", "jaccard"] == pytest.approx(2 / 6)
    assert js.loc["a", "baseline"] == pytest.approx(0.3)
    assert not js.loc["a", "learned"]  # two images are too few to show anything
    diff = statistics.paired_jaccard_difference(a, b, n_boot=200)
    assert diff.value == pytest.approx(0.5 - 2 / 6)
    assert statistics.paired_jaccard_difference(a, a, n_boot=50) == (0.0, 0.0, 0.0)


def test_segmentation_counts_reproduce_the_training_jaccard(tmp_path):
    """Pooled over images, the per-image counts give the Jaccard the fastai metric reports."""
    import torch

    from cellulib.data import breastpathq, synthset
    from cellulib.models import losses, networks

    root = synthset.make_breastpathq(tmp_path, n_train=2, n_val=1, n_cells=10, size=128, seed=0,
                                  progress=False)
    torch.manual_seed(0)
    model = networks.seg_model("fpn").eval()
    settings = {"crop": 64, "downscale": 2, "disc_diameter": 15.0}
    seg = SimpleNamespace(model=model, settings=settings, meta={"params": {"seed": 0}})
    counts = scoring.segmentation_counts(seg, root)
    assert counts["image"].nunique() == 2  # round(0.2 * 10) validation patches
    dls = breastpathq.seg_dataloaders(root, size=64, downscale=2, bs=2, diameter=15.0, seed=0,
                               device="cpu")
    metric = losses.JaccardMetric((0, 1, 2), "jaccard_nuclei")  # the nucleus channels
    with torch.inference_mode():
        for xb, yb in dls.valid:
            metric.update(model(xb), yb)
    js = statistics.jaccard_summary({"fpn": counts}, n_boot=20)
    assert js.loc["fpn", "jaccard"] == pytest.approx(metric.value)


def test_paired_detection_difference_by_hand():
    from cellulib.reporting.statistics import paired_detection_difference

    def counts(tps):
        return pd.DataFrame({"image": [f"i{k}" for k in range(len(tps))], "class": "detection",
                             "tp": tps, "fp": 2, "fn": 2})

    # the same counts: no difference in any resample
    same = paired_detection_difference(counts([8, 8, 8, 8, 8]), counts([8, 8, 8, 8, 8]), n_boot=200)
    assert tuple(same) == (0.0, 0.0, 0.0)
    # A finds 8 of 10 nuclei per image with 2 FP (F 0.8), B 3 with 2 FP and 2 FN (F 0.6)
    diff = paired_detection_difference(counts([8] * 5), counts([3] * 5), n_boot=200)
    assert diff.value == pytest.approx(0.8 - 0.6)
    assert diff.ci_low == pytest.approx(0.2) and diff.ci_high == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same images"):
        paired_detection_difference(counts([1, 2]), counts([1, 2, 3]))


def test_detection_table_puts_the_published_f_beside_ours():
    table = pd.DataFrame({"precision": [0.5, 0.8, 0.4, 0.7], "recall": [0.6, 0.7, 0.5, 0.9],
                          "f1": [0.545, 0.747, 0.444, 0.788]},
                         index=["lymphocyte", "malignant", "normal", "detection"])
    out = tables.detection_table({"FPN": table}, references=paper.PUBLISHED_F)
    # the values issue 22 quotes from the two papers, stromal dots under "normal"
    assert out["MCSpatNet F (test)"].tolist() == [0.649, 0.792, 0.548, 0.851]
    assert out["DeNuC F (test)"].tolist() == [0.697, 0.851, 0.611, 0.875]
    assert out["FPN F"].tolist() == [0.545, 0.747, 0.444, 0.788]
    assert verdicts.floors_missed(table) == {"lymphocyte": 0.545, "malignant": 0.747,
                                           "normal": 0.444, "detection": 0.788}
    assert verdicts.floors_missed(table.assign(f1=[0.55, 0.75, 0.55, 0.82])) == {}
    # a reference with a value for one row only (a floor on pooled F) leaves the others blank
    floor = tables.detection_table({"FPN": table}, reference={"detection": 0.6}, reference_name="floor")
    assert floor["floor"].tolist() == ["", "", "", 0.6]


def test_all_learned_leaves_the_mean_predictor_out():
    table = pd.DataFrame({"learned": [True, True, False]}, index=["A", "B", statistics.MEAN_PREDICTOR])
    assert statistics.all_learned(table) is True
    table.loc["B", "learned"] = False
    assert statistics.all_learned(table) is False
    assert statistics.all_learned(table.drop(index=statistics.MEAN_PREDICTOR).drop(index="B")) is True


# --------------------------------------------------------------------------------------------------
# the real-H&E chapter's sentences and tables, on hand-made inputs
def test_claim_words():
    assert [verdicts.claim_words(v) for v in verdicts.VERDICTS] == ["holds", "does not hold", "is undecided"]
    assert [verdicts.claim_words(v, "helps", "hurts", "undecided") for v in verdicts.VERDICTS] == [
        "helps", "hurts", "undecided"]
    with pytest.raises(ValueError, match="a verdict is one of"):
        verdicts.claim_words("maybe")


def _brca_cells() -> pd.DataFrame:
    # patient 0001 has an image in the official train and one in the official val split
    return pd.DataFrame({
        "name": ["TCGA-AA-0001-01Z_a", "TCGA-AA-0001-01Z_b", "TCGA-AA-0002-01Z_c", "TCGA-AA-0003-01Z_d",
                 "TCGA-AA-0004-01Z_e"],
        "split": ["train", "val", "train", "val", "test"],
        "n_lymphocyte": [1, 2, 3, 4, 5], "n_malignant": [10, 20, 30, 40, 50], "n_normal": [0, 1, 0, 1, 0]})


def test_brca_m2c_table_and_sentence_by_hand():
    cells = _brca_cells()
    table = tables.brca_m2c_table(cells, [0, 1, 2], [3])
    assert table.index.name == "used for"
    assert table.reset_index().to_dict("list") == {
        "used for": ["training", "validation (held-out patients)", "official test"],
        "images": [3, 1, 1], "patients": [2, 1, 1], "lymphocyte": [6, 4, 5],
        "tumour/epithelial": [60, 40, 50], "stromal": [1, 1, 0]}
    text = sentences.brca_m2c_sentence(cells, [0, 1, 2], [3], "test")
    assert text.startswith("This copy holds 5 images.")
    assert ("**patients it has not seen**: 1 of the 4 training and validation images, 1 whole "
            "patients") in text
    assert "would share 1 patients (TCGA-AA-0001) with the official training split" in text
    assert text.endswith("The official test split (patients in neither) is present: the results below "
                         "are on it; validation only chooses between the decoders, when both are "
                         "trained.")
    assert sentences.brca_m2c_sentence(cells, [0, 1, 2], [3], "patient-disjoint validation").endswith(
        "The README says how to get the full dataset.")


def test_pixel_scale_and_training_sentences_by_hand():
    # median spacing 14, its 5th percentile 10 + 0.05 * 4 * 2 = 10.4; 4 of 5 neighbours beyond 11
    # px; a median nucleus of 10 px spans 10 / 4 = 2.5 cells of the FPN's stride-4 grid
    text = sentences.pixel_scale_sentence([10, 12, 14, 16, 18], [8, 10, 12], 11, 1)
    assert text == (
        "Neighbouring nuclei sit a median 14.0 px apart (5% of them closer than 10.4 px), and nuclei "
        "segmented from the haematoxylin channel measure a median 10.0 px across. The discs here are "
        "therefore **11 px** across, about one nucleus and less than the distance between 80% of "
        "neighbours, so that most discs do not touch. The images are **not downscaled**: the FPN "
        "predicts on a grid 4 times coarser than its input, where a 10 px nucleus spans 2.5 cells at "
        "full size and half that after a x2 downscale, and the detection protocol below asks for "
        "centres within 6 px of the dot.")
    assert "**downscaled x2**" in sentences.pixel_scale_sentence([10, 12], [8, 10], 15, 2)
    settings = {"seg_epochs": 30, "patches_per_epoch": 4, "crop": 256, "seg_schedule": "one_cycle",
                "seg_lr": 0.001}
    assert sentences.training_sentence(settings, "quick", 150) == (
        "The quick profile trains each network for 30 epochs of 4 random 256-pixel crops per image "
        "(one-cycle schedule, peak rate 0.001); the two took 2.5 minutes together.")
    # the FPN alone (the quick profile's default): one network's time, and how to add the U-Net
    assert sentences.training_sentence(settings, "quick", 90, ["FPN"]) == (
        "The quick profile trains the FPN for 30 epochs of 4 random 256-pixel crops per image "
        "(one-cycle schedule, peak rate 0.001), in 1.5 minutes. It leaves the U-Net decoder out to "
        "save its training time; `-p compare_decoders True` (the paper profile's default) trains it "
        "beside the FPN and tests the paper's ranking of the decoders on real nuclei.")


def _f1(lymphocyte, malignant, normal, detection) -> pd.DataFrame:
    return pd.DataFrame({"f1": [lymphocyte, malignant, normal, detection]},
                        index=["lymphocyte", "malignant", "normal", "detection"])


def test_decoder_sentence_and_finding_by_hand():
    # FPN meets every floor (0.55, 0.75, 0.55, 0.82); U-Net misses three; FPN - U-Net +0.05 [0.02, 0.08]
    val = {"FPN": _f1(0.62, 0.8, 0.58, 0.85), "U-Net": _f1(0.5, 0.7, 0.6, 0.8)}
    text = sentences.decoder_sentence(val, "FPN", 0.3, "test", 30, statistics.Estimate(0.05, 0.02, 0.08))
    assert text.startswith("The held-out patients pick the **FPN** decoder by the mean of pooled and "
                           "tumour F,")
    assert "(pooled / tumour F: FPN 0.850 / 0.800, U-Net 0.800 / 0.700; threshold 0.3)" in text
    assert ("On the test split (30 images), FPN minus U-Net in pooled F is +0.050 (95% CI +0.020 to "
            "+0.080, paired bootstrap over images): the paper's ranking of the decoders (FPN ahead) "
            "holds here for detection.") in text
    assert ("F at least lymphocyte 0.55, tumour/epithelial 0.75, stromal 0.55, detection (all classes) "
            "0.82 on the held-out patients, are **met** by FPN and **not met** by U-Net (lymphocyte "
            "0.500, tumour/epithelial 0.700, detection (all classes) 0.800).") in text
    assert "with a 12 px radius" in text
    undecided = sentences.decoder_sentence(val, "FPN", 0.3, "test", 30, statistics.Estimate(0.01, -0.02, 0.04))
    assert "(FPN ahead) is undecided here" in undecided
    # the FPN alone (the quick profile's default): its F and floors, no ranking of the decoders
    alone = sentences.decoder_sentence({"FPN": val["FPN"]}, "FPN", 0.3, "test", 30, None)
    assert alone.startswith(
        "This build trains one decoder on real nuclei, the **FPN** (pooled / tumour F on the "
        "held-out patients 0.850 / 0.800; threshold 0.3), so it does not test the paper's ranking "
        "of the decoders here; chapter 2 does on synthetic patches. This book's floors for real "
        "H&E, F at least lymphocyte 0.55,")
    assert "are **met** by FPN." in alone and "U-Net" not in alone and "CI" not in alone
    assert sentences.real_he_finding("FPN", val["FPN"], 12.4, 72, "test") == (
        "Trained for 12 minutes on 72 real BRCA-M2C patches, the FPN network detects nuclei with F "
        "0.85 and tumour nuclei with F 0.80 on the test split (MCSpatNet on the test split: 0.85 and "
        "0.79); its weakest classes are stromal (F 0.58) and lymphocyte (F 0.62).")


def test_decoder_sentence_says_which_classes_a_network_never_predicts():
    # U-Net found nuclei but classed none as lymphocyte or stromal (no detection of them: tp = fp = 0)
    counts = {"FPN": {"lymphocyte": (60, 40, 40), "malignant": (70, 30, 30), "normal": (30, 20, 50),
                      "detection": (160, 40, 40)},
              "U-Net": {"lymphocyte": (0, 0, 100), "malignant": (80, 120, 20), "normal": (0, 0, 80),
                        "detection": (150, 50, 50)}}
    val = {name: detection.scores_from_counts(pd.DataFrame(c, index=["tp", "fp", "fn"]).T)
           for name, c in counts.items()}
    assert val["U-Net"].loc["lymphocyte", "precision"] == 1.0  # MCSpatNet's empty-denominator rule
    text = sentences.decoder_sentence(val, "FPN", 0.3, "validation", 18, statistics.Estimate(0.05, 0.02, 0.08))
    assert (" U-Net classes no nucleus as lymphocyte or stromal: it did not learn those classes in "
            "this run, so its F for them is no result about the decoder.") in text
    assert "FPN classes no nucleus" not in text
    one = {**val, "U-Net": val["U-Net"].assign(fp=[0, 120, 3, 50], tp=[0, 80, 1, 150])}
    assert ("U-Net classes no nucleus as lymphocyte: it did not learn that class in this run, so "
            "its F there is no result") in sentences.decoder_sentence(
                one, "FPN", 0.3, "validation", 18, statistics.Estimate(0.05, 0.02, 0.08))
    # the tables of F alone (no counts) say nothing of it
    assert "classes no nucleus" not in sentences.decoder_sentence(
        {"FPN": _f1(0.62, 0.8, 0.58, 0.85), "U-Net": _f1(0.0, 0.7, 0.0, 0.8)}, "FPN", 0.3, "test", 30,
        statistics.Estimate(0.05, 0.02, 0.08))


def test_command_line_sentence_by_hand():
    book = _f1(0.62, 0.68, 0.28, 0.80)
    recipe = {"epochs": 96, "seg_weights": (4.0, 4.0, 4.0, 1.0)}
    head = ("`cellulib train seg --data <BRCA-M2C folder>` trains a longer recipe than this chapter's "
            "32 epochs: 96 epochs with the class weights 4, 4, 4, 1 (stromal, lymphocyte, tumour, "
            "background) (`profiles.BRCA_M2C_COMMAND_LINE`), which takes longer than the book can spend.")
    missing = sentences.command_line_sentence(recipe, "quick", 32, book)
    assert missing.startswith(head) and "is not in this build's cache" in missing
    assert "`-p cli_recipe True`" in missing
    # stromal and tumour under their floors (0.55, 0.75); 1420 s is 24 minutes
    text = sentences.command_line_sentence(recipe, "quick", 32, book, _f1(0.8, 0.733, 0.52, 0.819), 1420)
    assert text == head + (
        " Its FPN, trained in 24 minutes, reaches on the held-out patients F lymphocyte 0.800, "
        "tumour/epithelial 0.733, stromal 0.520, detection (all classes) 0.819 against 0.620, 0.680, "
        "0.280, 0.800 for this chapter's FPN: floors **not met**: tumour/epithelial 0.733 (floor "
        "0.75), stromal 0.520 (floor 0.55), detection (all classes) 0.819 (floor 0.82).")
    met = sentences.command_line_sentence({"epochs": 1}, "quick", 1, book, _f1(0.6, 0.8, 0.6, 0.9))
    assert "than this chapter's 1 epoch: 1 epoch (" in met and met.endswith("every floor is **met**.")
    assert sentences.command_line_sentence({"epochs": None}, "paper", 150, book) == (
        "In the paper profile `cellulib train seg` trains the recipe of this chapter.")


def test_confusion_jaccard_fraction_and_dots_sentences_by_hand():
    classes = ["lymphocyte", "malignant", "normal"]
    confusion = pd.DataFrame([[8, 1, 1, 3], [2, 16, 2, 4], [0, 4, 6, 1], [5, 6, 7, 0]],
                             index=classes + ["unmatched"], columns=classes + ["unmatched"])
    # 30 of the 40 matched nuclei on the diagonal; the largest off-diagonal cell: 4 stromal as tumour
    assert sentences.confusion_sentence(confusion) == (
        "Of the matched nuclei, 75% get their annotated class (lymphocyte 80%, tumour/epithelial 80%, "
        "stromal 60%). The largest confusion is stromal nuclei called tumour/epithelial: 4 of 10.")
    # a tiny model that matched no stromal nucleus (a 0/0 share), then one that matched nothing
    none = pd.DataFrame([[3, 1, 0, 3], [0, 5, 0, 4], [0, 0, 0, 9], [5, 6, 7, 0]],
                        index=classes + ["unmatched"], columns=classes + ["unmatched"])
    assert sentences.confusion_sentence(none) == (
        "Of the matched nuclei, 89% get their annotated class (lymphocyte 75%, tumour/epithelial "
        "100%, stromal none matched). The largest confusion is lymphocyte nuclei called "
        "tumour/epithelial: 1 of 4.")
    diagonal = none.copy()
    diagonal.loc["lymphocyte", "malignant"] = 0
    assert sentences.confusion_sentence(diagonal).endswith(
        "(lymphocyte 100%, tumour/epithelial 100%, stromal none matched). No matched nucleus is "
        "called another class.")
    nothing = none * 0
    assert sentences.confusion_sentence(nothing) == (
        "No detected nucleus was matched to an annotated one, so no class can be compared.")
    jaccard = pd.DataFrame({"FPN": [0.4123], "U-Net": [0.3456]}, index=["mean (nuclei)"])
    assert sentences.jaccard_sentence(jaccard).startswith(
        "The mean over the three classes is 0.412 for FPN and 0.346 for U-Net (the paper, BreastPathQ "
        "with random initialisation: FPN 0.47, U-Net 0.35).")
    assert sentences.jaccard_sentence(jaccard[["FPN"]]).startswith(
        "The mean over the three classes is 0.412 for FPN (the paper, BreastPathQ with random "
        "initialisation: FPN 0.47, U-Net 0.35).")
    # ICC(2,1) by hand: MSR 12.5 / 3, MSC 0.5, MSE 0.5 / 3 -> (MSR - MSE) / (MSR + MSE + 2 (MSC -
    # MSE) / 4) = 4 / 4.5 = 0.89; the absolute differences 0, 1, 0, 1
    fr = pd.DataFrame({"annotated": [1.0, 2, 3, 4], "detected": [1.0, 3, 3, 5]})
    text = sentences.fraction_sentence(fr)
    assert text.startswith("Over 4 images the agreement is ICC(2,1) 0.89 (95% CI ")
    assert text.endswith("); the mean absolute difference is 0.500.")
    cells = pd.DataFrame({"name": ["a", "b", "c"], "n_malignant": [9, 1, 2],
                          "n_lymphocyte": [0, 7, 1], "n_normal": [5, 0, 1]})
    assert sentences.dot_examples(cells) == ["a", "b"]
    fractions = pd.DataFrame({"image": ["a", "b", "c"], "n_annotated": [10, 5, 1], "n_detected": [9, 7, 0]})
    assert sentences.dots_sentence(fractions, ["b", "a"]) == (
        "Dots and detections per image: (a) 5 vs 7; (b) 10 vs 9. A nucleus the annotators did not mark "
        "counts as a false positive when it is found.")


def test_transfer_table_sentence_and_summary_by_hand():
    def scored(detection, malignant, truth=None, n_pred=0):
        table = _f1(0.5, malignant, 0.5, detection)
        return SimpleNamespace(scores=lambda: table, truth=truth, pred=pd.DataFrame(index=range(n_pred)))

    # three synthetic dots 10, 10 and 20 px from their nearest neighbour: a median of 10 px, 5 px
    # after the x2 downscale
    dots = pd.DataFrame({"image": ["s"] * 3, "x": [0.0, 10, 0], "y": [0.0, 0, 20]})
    transfer = {("synthetic", "synthetic"): scored(0.31, 0.52, dots, 1),
                ("synthetic", "BRCA-M2C"): scored(0.42, 0.6),
                ("BRCA-M2C", "synthetic"): scored(0.55, 0.7),
                ("BRCA-M2C", "BRCA-M2C"): scored(0.8, 0.75)}
    table = tables.transfer_table(transfer)
    assert table.to_dict("list") == {
        "trained on": ["synthetic", "synthetic", "BRCA-M2C", "BRCA-M2C"],
        "scored on": ["synthetic", "BRCA-M2C", "synthetic", "BRCA-M2C"],
        "detection F": [0.31, 0.42, 0.55, 0.8], "tumour F": [0.52, 0.6, 0.7, 0.75]}
    text = sentences.transfer_sentence(transfer, {"disc_diameter": 15.0, "downscale": 2})
    assert text.startswith(
        "Trained on synthetic patches, the network finds real nuclei with pooled F 0.42 against 0.80 "
        "for the real-trained one; trained on real patches, it finds synthetic nuclei with F 0.55 "
        "against 0.31 for the synthetic-trained one.")
    assert ("the paper's 15 px discs after a x2 downscale, where neighbouring synthetic nuclei sit a "
            "median 5.0 px apart at that scale") in text and "(it finds 1 centres for 3 dots)" in text
    summary = sentences.real_he_summary([10, 12, 14], [8, 10], {"disc_diameter": 11, "downscale": 1},
                                     "FPN", 12.4, _f1(0.62, 0.8, 0.58, 0.85), "test", transfer)
    assert summary.split("\n") == [
        "- Real nuclei need their own pixel scale: at 20x, with nuclei a median 9 px across and "
        "neighbours 12 px apart, BRCA-M2C is segmented at full size with 11 px discs, where the "
        "paper's x2 downscale and 15 px discs would merge neighbours.",
        "- Chapter 2's weakly supervised FPN network, trained for 12 minutes on real dots, detects "
        "nuclei with F 0.85 on the test split, against 0.85 for MCSpatNet, a dedicated detector, on "
        "the test split. Telling stromal nuclei from the others is the hard part.",
        "- Across datasets: the real-trained network finds synthetic nuclei with F 0.55 (real ones: "
        "0.80); the synthetic-trained one, whose large discs make it segment tumour area rather than "
        "count nuclei, reaches 0.31 on its own data and 0.42 on real nuclei."]


# --------------------------------------------------------------------------------------------------
# chapter 1: labels and stains beside real ones
def test_kappa_bin_counts_by_hand():
    table = statistics.kappa_bin_counts([0.0, 0.25, 0.26, 0.5, 0.9, 1.0])
    assert list(table.index) == ["[0, 0.25]", "(0.25, 0.5]", "(0.5, 0.75]", "(0.75, 1]"]
    assert table.iloc[:, 0].tolist() == [2, 2, 0, 2]
    assert table.columns.tolist() == ["patches (the 4 bins of Cohen's kappa)"]


def test_labels_sentence_by_hand():
    gap = {"zeros_real": 0.28, "zeros_synthetic": 0.1, "ks": 0.1234, "p": 0.00123, "n_synthetic": 200}
    law = {"n_synthetic": 200000, "ks": 0.0456}
    assert sentences.labels_sentence([0.0, 0.2, 0.5], [0.1, 0.3], gap, law) == (
        "28% of the real labels are 0 and 10% of the synthetic ones; the medians are 0.20 and 0.20. "
        "The two-sample KS statistic is 0.123 (p = 0.0012, 200 synthetic labels): part of the gap is "
        "the size of the synthetic set, part is that pathologists score in steps of 0.05, which a "
        "smooth law does not copy (200,000 draws of the law sit at KS 0.05).")


def test_stain_sources_sentence_by_hand():
    stats = pd.DataFrame({"source": ["synthetic", "synthetic", "BRCA-M2C", "BRCA-M2C"],
                          "H": [0.1, 0.3, 0.5, 0.7], "E": [0.1, 0.1, 0.2, 0.2]})
    assert sentences.stain_sources_sentence(stats) == (
        "Mean optical densities per source: BRCA-M2C H 0.600, E 0.200; synthetic H 0.200, E 0.100. "
        "The BRCA-M2C patches are stained 3.0 times as dark in haematoxylin as the synthetic ones: "
        "staining differs between labs and scanners, and the generator sits at the pale end of what "
        "these real images span.")
    assert sentences.stain_sources_sentence(stats[stats.source == "synthetic"]) == (
        "Mean optical densities per source: synthetic H 0.200, E 0.100. ")


def test_learned_count_importance_caveat_and_schedule_text():
    summary = pd.DataFrame({"learned": [True, False, False]}, index=["GBT", "SR", statistics.MEAN_PREDICTOR])
    assert sentences.learned_count(summary, ["GBT", "SR"], "routes") == "1 of the 2 routes learned (GBT)"
    assert sentences.learned_count(summary, ["SR"], "routes") == "0 of the 1 routes learned"
    assert sentences.importance_caveat(summary) == (
        "GBT has learned, so this ranking says what its predictions rest on.")
    assert sentences.importance_caveat(summary, "SR").startswith("SR has not learned at this budget")
    assert sentences.schedule_text({"direct_lr": 0.001, "direct_schedule": "one_cycle"}) == (
        "a one-cycle schedule (peak learning rate 0.001)")
    assert sentences.schedule_text({"direct_lr": 1e-4, "direct_schedule": "decay"}) == (
        "a learning rate decaying from 0.0001 to 1e-05")


def test_route_cost_sentence_by_hand():
    cost = {"difference": statistics.Estimate(0.0041, 0.0012, 0.00705), "verdict": "does not hold"}
    assert sentences.route_cost_sentence(cost) == (
        "Here the interpretable route costs 0.0041 in MSE (95% CI 0.0012 to 0.0070).")
    assert sentences.route_cost_sentence({**cost, "verdict": "holds"}).endswith("it is the more accurate one.")
    assert sentences.route_cost_sentence({**cost, "verdict": "undecided"}).startswith(
        "Whether the interpretable route costs accuracy cannot be told")


def test_choose_detector_keeps_the_best_mean_of_pooled_and_tumour_f(monkeypatch):
    from cellulib import constants
    from cellulib.inference import detect

    tables = {"a.pt": _f1(0.6, 0.7, 0.6, 0.9), "b.pt": _f1(0.6, 0.8, 0.6, 0.85)}  # means 0.8, 0.825
    calls = []

    def score_annotated(model, cells, threshold, progress=True):
        calls.append((model, threshold, progress))
        return SimpleNamespace(scores=lambda: tables[model])

    monkeypatch.setattr(detect, "score_annotated", score_annotated)
    best, scores = scoring.choose_detector({"FPN": "a.pt", "U-Net": "b.pt"}, pd.DataFrame())
    assert best == "U-Net" and list(scores) == ["FPN", "U-Net"] and scores["FPN"] is tables["a.pt"]
    assert calls == [("a.pt", constants.DETECTION_THRESHOLD, False), ("b.pt", constants.DETECTION_THRESHOLD, False)]
    assert scoring.choose_detector({"FPN": "a.pt"}, pd.DataFrame(), 0.5)[0] == "FPN" and calls[-1][1] == 0.5
