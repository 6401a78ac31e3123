"""Honest comparisons (SPEC 5.1): the mean predictor, "learned", the paired bootstrap of an MSE
difference and the verdicts, checked on hand-computed cases and against brute-force references."""

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cellulib import metrics, report

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
    frame = report.mean_predictor_predictions(_frame([0.1, 0.5, 0.9], [0, 0, 0]), 0.4)
    assert frame.columns.tolist() == ["path", "y_true", "y_pred"]
    assert frame.y_pred.tolist() == [0.4, 0.4, 0.4]
    # its MSE by hand: (0.09 + 0.01 + 0.25) / 3
    assert metrics.mse(frame.y_true, frame.y_pred) == pytest.approx(0.35 / 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report.mean_predictor_predictions([0.1], 40.0)


def test_training_mean_prefers_the_model_record_and_never_guesses(tmp_path):
    assert report.training_mean(result=SimpleNamespace(meta={"train_mean": 0.3})) == 0.3
    with pytest.raises(ValueError, match="no train_mean"):
        report.training_mean(result=SimpleNamespace(meta={}))


def test_training_mean_from_the_training_split(tmp_path):
    from cellulib import synth

    root = synth.make_breastpathq(tmp_path, n_train=6, n_val=2, n_cells=1, size=64, seed=0,
                                  progress=False)
    labels = pd.read_csv(root / "datasets" / "train_labels.csv")
    assert len(labels) == 6
    assert report.training_mean(root) == pytest.approx(labels["y"].mean())


def test_a_perfect_model_learned_and_a_constant_at_the_mean_did_not(truth):
    mean = float(truth.mean())
    preds = {"perfect": _frame(truth, truth), "constant": _frame(truth, np.full(truth.size, mean))}
    summary = report.mse_summary(preds, train_mean=mean, n_boot=500)
    assert summary.loc["perfect", "mse"] == 0 and summary.loc["perfect", "ci_high"] == 0
    assert summary.loc["perfect", "learned"] is True
    # the constant IS the mean predictor: its CI straddles its own MSE, so it cannot be below it
    assert summary.loc["constant", "mse"] == pytest.approx(summary.loc["Mean predictor", "mse"])
    assert summary.loc["constant", "learned"] is False
    assert summary.loc["Mean predictor", "learned"] is None
    assert summary.loc["Mean predictor", "mse"] == pytest.approx(np.mean((truth - mean) ** 2))


def test_learned_is_strict_and_needs_enough_patches():
    assert report.learned(0.0399, 0.04)
    assert not report.learned(0.04, 0.04)
    assert not report.learned(float("nan"), 0.04)
    assert not report.learned(0.0, 0.04, n=report.MIN_PATCHES - 1)
    assert report.learned(0.0, 0.04, n=report.MIN_PATCHES)


def test_mse_ci_is_the_metrics_bootstrap(truth):
    y_pred = np.clip(truth + 0.1, 0, 1)
    est = report.mse_ci(truth, y_pred, n_boot=300, seed=3)
    lo, hi = metrics.bootstrap_ci(metrics.mse, truth, y_pred, n_boot=300, seed=3)
    assert (est.ci_low, est.ci_high) == (lo, hi)
    assert est.value == pytest.approx(metrics.mse(truth, y_pred))


# ---------------------------------------------------------------------------------------------
# paired difference and verdicts


def test_paired_difference_of_identical_predictions_is_exactly_zero(truth):
    a = _frame(truth, np.clip(truth + 0.05, 0, 1))
    assert report.paired_mse_difference(a, a.copy(), n_boot=200) == (0.0, 0.0, 0.0)


def test_paired_difference_equals_a_brute_force_loop(truth):
    rng = np.random.default_rng(5)
    a = _frame(truth, np.clip(truth + rng.normal(0, 0.05, truth.size), 0, 1))
    b = _frame(truth, np.clip(truth + rng.normal(0, 0.08, truth.size), 0, 1))
    est = report.paired_mse_difference(a, b, n_boot=400, seed=7)
    idx = np.random.default_rng(7).integers(0, truth.size, (400, truth.size))
    boot = [metrics.mse(truth[i], a.y_pred.to_numpy()[i]) - metrics.mse(truth[i], b.y_pred.to_numpy()[i])
            for i in idx]
    assert est.value == pytest.approx(metrics.mse(truth, a.y_pred) - metrics.mse(truth, b.y_pred))
    assert est.ci_low == pytest.approx(np.quantile(boot, 0.025))
    assert est.ci_high == pytest.approx(np.quantile(boot, 0.975))


def test_paired_difference_matches_by_path_not_row_order(truth):
    a = _frame(truth, np.clip(truth + 0.05, 0, 1))
    b = a.iloc[::-1].reset_index(drop=True)
    assert report.paired_mse_difference(a, b, n_boot=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same patches"):
        report.paired_mse_difference(a, a.iloc[:10], n_boot=50)


def test_a_clear_difference_holds(preds):
    mean = float(preds["GBT"].y_true.mean())
    cmp = report.compare(preds, "ResNet34 (SR)", "GBT", mean, n_boot=500)
    assert cmp["difference"].ci_high < 0
    assert cmp["learned_better"] and cmp["learned_worse"]
    assert cmp["verdict"] == "holds" and cmp["phrase"] == "beats"
    assert cmp["sentence"].startswith("ResNet34 (SR) beats GBT (MSE ")
    # the claim the other way round is refuted, not merely undecided
    back = report.compare(preds, "GBT", "ResNet34 (SR)", mean, n_boot=500)
    assert back["verdict"] == "does not hold" and back["phrase"] == "does worse than"


def test_undecided_when_one_model_did_not_learn_even_if_its_mse_is_lower():
    truth = np.linspace(0, 1, 40)
    mean = 0.5
    # A: slightly better than the mean predictor, but not with 95% confidence
    a = _frame(truth, 0.95 * np.full(truth.size, mean) + 0.05 * truth)
    b = _frame(truth, np.full(truth.size, mean))  # the mean itself: worse than A on every patch
    preds = {"A": a, "B": b}
    summary = report.mse_summary(preds, train_mean=mean, n_boot=500)
    assert summary.loc["A", "mse"] < summary.loc["B", "mse"]
    assert not summary.loc["A", "learned"] and not summary.loc["B", "learned"]
    cmp = report.compare(preds, "A", "B", mean, n_boot=500, summary=summary)
    assert cmp["difference"].ci_high < 0  # A is better on the same patches, with confidence...
    assert cmp["verdict"] == "undecided"  # ...but neither has learned
    assert cmp["phrase"] == "cannot be ranked against" and "not learned" in cmp["detail"]


def test_verdict_when_the_interval_includes_zero():
    assert report.verdict(report.Estimate(-0.001, -0.003, 0.001), True, True) == "undecided"
    assert report.verdict(report.Estimate(0.004, 0.002, 0.006), True, True) == "does not hold"
    assert report.verdict(report.Estimate(0.004, 0.002, 0.006), True, True,
                          lower_is_better=False) == "holds"


# ---------------------------------------------------------------------------------------------
# tables and sentences


def test_results_table_has_the_mean_predictor_row_and_learned(preds):
    mean = float(preds["GBT"].y_true.mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        table = report.results_table(preds, n_boot=100, seed=0, train_mean=mean)
        plain = report.results_table(preds, n_boot=100, seed=0)
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
    table = report.findings(preds, mean, importance=importance, n_boot=500)
    assert set(table["verdict"]) <= set(report.VERDICTS)
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
    names = list(report.PAPER_ROWS)
    preds = {n: _frame(truth, np.clip(mean + rng.normal(0, 0.01, truth.size), 0, 1)) for n in names}
    importance = pd.Series({"malignant_activation_0.50": 9.0, "normal_area_0.02": 1.0})
    table = report.findings(preds, mean, importance=importance, n_boot=300)
    assert len(table) == 4 and (table["verdict"] == "undecided").all()
    summary = report.mse_summary(preds, mean, n_boot=300)
    sentence = report.regression_to_mean_sentence(preds, summary)
    assert sentence.startswith("None of the models has learned")
    assert "has not learned" in report.learned_sentence(summary, ["GBT"])


def test_bias_by_bin_by_hand():
    p = _frame([0.1, 0.2, 0.9, 0.8], [0.3, 0.3, 0.7, 0.8])
    bias = report.bias_by_bin({"m": p})
    assert bias.loc["m"].iloc[0] == pytest.approx((0.2 + 0.1) / 2)
    assert np.isnan(bias.loc["m"].iloc[1]) and np.isnan(bias.loc["m"].iloc[2])
    assert bias.loc["m"].iloc[3] == pytest.approx((-0.2 + 0.0) / 2)


def test_mse_summary_figure(preds):
    from cellulib import plots

    summary = report.mse_summary(preds, float(preds["GBT"].y_true.mean()), n_boot=100)
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
    js = report.jaccard_summary({"a": a, "b": b}, n_boot=200)
    assert js.loc["a", "jaccard"] == pytest.approx(0.5)
    assert js.loc["b", "jaccard"] == pytest.approx(2 / 6)
    assert js.loc["a", "baseline"] == pytest.approx(0.3)
    assert not js.loc["a", "learned"]  # two images are too few to show anything
    diff = report.paired_jaccard_difference(a, b, n_boot=200)
    assert diff.value == pytest.approx(0.5 - 2 / 6)
    assert report.paired_jaccard_difference(a, a, n_boot=50) == (0.0, 0.0, 0.0)


def test_segmentation_counts_reproduce_the_training_jaccard(tmp_path):
    """Pooled over images, the per-image counts give the Jaccard the fastai metric reports."""
    import torch

    from cellulib import data, losses, models, synth

    root = synth.make_breastpathq(tmp_path, n_train=2, n_val=1, n_cells=10, size=128, seed=0,
                                  progress=False)
    torch.manual_seed(0)
    model = models.seg_model("fpn").eval()
    settings = {"crop": 64, "downscale": 2, "disc_diameter": 15.0}
    seg = SimpleNamespace(model=model, settings=settings, meta={"params": {"seed": 0}})
    counts = report.segmentation_counts(seg, root)
    assert counts["image"].nunique() == 2  # round(0.2 * 10) validation patches
    dls = data.seg_dataloaders(root, size=64, downscale=2, bs=2, diameter=15.0, seed=0,
                               device="cpu")
    metric = losses.JaccardMetric((0, 1, 2), "jaccard_nuclei")  # the nucleus channels
    with torch.inference_mode():
        for xb, yb in dls.valid:
            metric.update(model(xb), yb)
    js = report.jaccard_summary({"fpn": counts}, n_boot=20)
    assert js.loc["fpn", "jaccard"] == pytest.approx(metric.value)


def test_paired_detection_difference_by_hand():
    from cellulib.report import paired_detection_difference

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
    out = report.detection_table({"FPN": table}, references=report.PUBLISHED_F)
    # the values issue 22 quotes from the two papers, stromal dots under "normal"
    assert out["MCSpatNet F (test)"].tolist() == [0.649, 0.792, 0.548, 0.851]
    assert out["DeNuC F (test)"].tolist() == [0.697, 0.851, 0.611, 0.875]
    assert out["FPN F"].tolist() == [0.545, 0.747, 0.444, 0.788]
    assert report.floors_missed(table) == {"lymphocyte": 0.545, "malignant": 0.747,
                                           "normal": 0.444, "detection": 0.788}
    assert report.floors_missed(table.assign(f1=[0.55, 0.75, 0.55, 0.82])) == {}


def test_all_learned_leaves_the_mean_predictor_out():
    table = pd.DataFrame({"learned": [True, True, False]}, index=["A", "B", report.MEAN_PREDICTOR])
    assert report.all_learned(table) is True
    table.loc["B", "learned"] = False
    assert report.all_learned(table) is False
    assert report.all_learned(table.drop(index=report.MEAN_PREDICTOR).drop(index="B")) is True
