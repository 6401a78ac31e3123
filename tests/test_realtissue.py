"""Cellularity models on real tissue (`cellulib.reporting.realtissue`): rank agreement with CIs over patients on
hand-made cases, the route comparison, the detector baseline's counting, the BreastPathQ patch's
truth, and the proxy's image filter."""

import numpy as np
import pandas as pd
import pytest

from cellulib.metrics.agreement import prediction_probability
from cellulib.reporting import realtissue
from cellulib.reporting.statistics import Estimate

ROUTES = {"segmentation": ("A",), "direct": ("B",)}


def _windows(n_patients=6, per=4, seed=0):
    rng = np.random.default_rng(seed)
    count = rng.uniform(0, 1, n_patients * per)
    return pd.DataFrame({"path": [f"w{i}.png" for i in range(count.size)],
                         "patient": np.repeat([f"P{i}" for i in range(n_patients)], per),
                         "count": count, "area": count / 3})


def test_a_perfect_ranking_has_pk_1_and_the_mean_predictor_half():
    w = _windows()
    scores = pd.DataFrame({"path": w.path, "A": w["count"] * 0.2 + 0.4,   # same order, other scale
                           "B": 1 - w["count"]})                          # reversed
    t = realtissue.rank_table(scores, w, ROUTES, {"A": 0.9}, n_boot=200)
    assert t.loc["A", "pk"] == 1.0 and t.loc["A", "pk_area"] == 1.0
    assert (t.loc["A", "pk_low"], t.loc["A", "pk_high"]) == (1.0, 1.0)
    assert t.loc["B", "pk"] == 0.0 and not t.loc["B", "above_chance"]
    assert t.loc["A", "above_chance"] and t.loc["A", "synthetic ICC"] == 0.9
    assert t.loc["Mean predictor", "pk"] == 0.5 and t.loc["A", "route"] == "segmentation"
    assert t.loc["A", "PK (count)"] == "1.000 [1.000-1.000]"


def test_pk_by_hand_with_a_tie_and_the_baseline_left_out_where_undefined():
    # truth 0.1 < 0.2 < 0.3 < 0.4; A scores 1, 3, 2, 2: pairs (1,2)C (1,3)C (1,4)C (2,3)D (2,4)D
    # (3,4)T -> PK = (3 + 0.5) / 6
    w = pd.DataFrame({"path": list("abcd"), "patient": ["P1", "P1", "P2", "P2"],
                      "count": [0.1, 0.2, 0.3, 0.4], "area": [0.1, 0.2, 0.3, 0.4]})
    scores = pd.DataFrame({"path": w.path, "A": [1, 3, 2, 2.0], "B": [1, 2, 3, 4.0]})
    base = pd.DataFrame({"path": w.path, "n_detected": [0, 5, 5, 5], "share": [np.nan, 0.1, 0.5, 0.9]})
    t = realtissue.rank_table(scores, w, ROUTES, baseline=base, n_boot=50)
    assert t.loc["A", "pk"] == pytest.approx(3.5 / 6)
    assert t.loc[realtissue.BASELINE, "pk"] == 1.0 and t.loc[realtissue.BASELINE, "n"] == 3


def test_the_bootstrap_resamples_whole_patients():
    # within each patient the model ranks perfectly; between patients it is reversed, so which
    # patients are drawn moves PK: the interval is wide, not the single value a window bootstrap
    # of a perfect within-patient order would suggest
    w = pd.DataFrame({"path": [f"w{i}" for i in range(6)], "patient": ["P1"] * 2 + ["P2"] * 2 + ["P3"] * 2,
                      "count": [0.1, 0.2, 0.4, 0.5, 0.7, 0.8], "area": 0.0})
    w["area"] = w["count"]
    scores = pd.DataFrame({"path": w.path, "A": [0.8, 0.9, 0.5, 0.6, 0.1, 0.2], "B": 0.5})
    t = realtissue.rank_table(scores, w, ROUTES, n_boot=300, seed=1)
    assert t.loc["A", "pk"] == pytest.approx(prediction_probability(w["count"], scores["A"]))
    assert t.loc["A", "pk"] == pytest.approx(0.2)  # 3 concordant pairs within patients, 12 discordant
    assert t.loc["A", "pk_high"] == 1.0 and t.loc["A", "pk_low"] <= 0.25


def test_route_difference_and_its_verdict():
    w = _windows(n_patients=10, per=6, seed=2)
    rng = np.random.default_rng(3)
    good = w["count"] + rng.normal(0, 0.05, len(w))
    fair = w["count"] + rng.normal(0, 0.4, len(w))
    scores = pd.DataFrame({"path": w.path, "A": good, "B": fair})
    diff, verdict = realtissue.route_difference(scores, w, ["A"], ["B"], n_boot=300)
    expected = prediction_probability(w["count"], good) - prediction_probability(w["count"], fair)
    assert diff.value == pytest.approx(expected) and diff.ci_low > 0
    assert verdict == "holds"
    swapped, v2 = realtissue.route_difference(scores, w, ["B"], ["A"], n_boot=300)
    assert swapped.value == pytest.approx(-expected) and v2 == "does not hold"
    # a route at chance cannot decide the claim
    scores["C"] = 0.5
    d3, v3 = realtissue.route_difference(scores, w, ["A"], ["C"], n_boot=300)
    assert v3 == "undecided" and d3.ci_low > 0
    assert "excludes 0, but a route does not rank above chance" in realtissue.route_sentence(d3, v3)
    assert "the CI includes 0" in realtissue.route_sentence(Estimate(0.01, -0.02, 0.04), "undecided")


def test_detector_share_counts_detections_by_window(monkeypatch, tmp_path):
    import cellulib.inference.detect as detect

    found = pd.DataFrame({"path": ["img.png"] * 4 + ["other.png"],
                          "x": [1.0, 2.0, 12.0, 30.0, 1.0], "y": [1.0, 3.0, 1.0, 1.0, 1.0],
                          "class": ["malignant", "lymphocyte", "malignant", "malignant", "malignant"],
                          "probability": 0.9, "error": ""})
    monkeypatch.setattr(detect, "detect_nuclei", lambda *a, **k: found)
    w = pd.DataFrame({"path": ["w0", "w1", "w2"], "image_path": ["img.png"] * 3,
                      "x": [0, 10, 40], "y": [0, 0, 0], "size": [10, 10, 10]})
    share = realtissue.detector_share(("net", {}), w, cache=False)
    assert share["n_detected"].tolist() == [2, 1, 0]
    assert share["share"].iloc[:2].tolist() == [0.5, 1.0] and np.isnan(share["share"].iloc[2])


def test_breastpathq_truth(tmp_path):
    from cellulib.data import paths

    labels = tmp_path / "labels.csv"
    labels.write_text("slide,rid,y\n99788,1,0.97\n99788,2,0.8\n")
    assert realtissue.breastpathq_truth(labels) == 0.97
    assert realtissue.breastpathq_truth(labels, rid=2) == 0.8
    with pytest.raises(KeyError, match="slide 1, region 1"):
        realtissue.breastpathq_truth(labels, slide=1)
    # the project's copy of the real labels: its README gives 0.97 for 99788_1 (SOURCES.md)
    real_dir = paths.real_dir()
    if real_dir is not None and (real_dir / "breastpathq_train_labels.csv").is_file():
        real = real_dir / "breastpathq_train_labels.csv"
        assert realtissue.breastpathq_truth(real) == 0.97


def test_floors_and_sentences():
    w = _windows()
    scores = pd.DataFrame({"path": w.path, "A": w["count"], "B": 0.5 + 0 * w["count"]})
    t = realtissue.rank_table(scores, w, ROUTES, n_boot=100)
    # synthetic floor: ICC >= 0.90 and MSE <= 0.25 x the mean predictor's (hand-made values)
    synth = pd.DataFrame({"icc": [0.95, 0.95, 0.85], "mse": [0.01, 0.04, 0.01], "mean_mse": 0.13},
                         index=["A", "B", "C"])
    f = realtissue.floors_table(t, ["A"], pd.Series({"A": 0.9, "B": 0.6}), synth)
    assert f["met"].tolist() == [True, True, True, False]
    assert f["by"].tolist() == ["A", "A", "A", "B, C"]  # B: 0.04 > 0.25 x 0.13; C: ICC 0.85
    f2 = realtissue.floors_table(t, ["B"], pd.Series({"A": 0.6, "B": 0.7}))
    assert f2["met"].tolist() == [False, True, False] and f2["measured"].iloc[2] == "0.700"
    text = realtissue.rank_sentence(t, ROUTES)
    assert text.startswith("1 of the 2 cellularity models") and "A at PK 1.000" in text
    assert "meets the floor" in realtissue.patch_sentence(pd.Series({"A": 0.9}), 0.97)
    assert realtissue.summary_sentence(f, {"as trained": "holds"}, None).startswith(
        "3 of 4 floors are met; not met: every model on the synthetic")
    assert realtissue.with_levers({"s": ("A",), "d": ("B",)}, {"A2": "A"}) == {"s": ("A", "A2"), "d": ("B",)}


def test_the_best_model_floor_asks_for_the_pk_and_the_lower_end_of_its_ci():
    """Issue 23: the best cellularity model's PK >= 0.75 and its CI's lower end >= 0.60, the
    baselines (the detector's share, the mean predictor) left out; hand-made rank rows."""
    def ranks(rows):
        t = pd.DataFrame(rows, columns=["model", "route", "pk", "pk_low"]).set_index("model")
        t["PK (count)"] = [f"{p:.3f} [{lo:.3f}-1.000]" for p, lo in zip(t["pk"], t["pk_low"])]
        return t

    def row(t):
        f = realtissue.floors_table(t, ["S"], None)
        return f.loc[f.index.str.startswith("best cellularity model")].iloc[0]

    base = [("tumour share of detections", "baseline", 0.95, 0.90), ("Mean predictor", "baseline", 0.5, 0.5)]
    # the highest PK has too wide a CI (0.59 < 0.60); the next one meets both ends
    r = row(ranks([("S", "segmentation", 0.80, 0.59), ("D", "direct", 0.76, 0.61), *base]))
    assert bool(r["met"]) and r["by"] == "D" and r["measured"].startswith("0.760")
    # PK 0.749 misses by 0.001 even with a tight CI; the baseline's 0.95 does not count
    r = row(ranks([("S", "segmentation", 0.749, 0.70), ("D", "direct", 0.70, 0.65), *base]))
    assert not bool(r["met"]) and r["by"] == "S"
    # exactly on both floors meets them
    assert bool(row(ranks([("S", "segmentation", 0.75, 0.60), *base]))["met"])


def test_synthetic_floors_by_hand():
    p = pd.DataFrame({"y_true": [0.0, 0.5, 1.0], "y_pred": [0.1, 0.5, 0.9]})
    f = realtissue.synthetic_floors({"A": p}, train_mean=0.5)
    assert f.loc["A", "mse"] == pytest.approx(0.02 / 3)
    assert f.loc["A", "mean_mse"] == pytest.approx(0.5 / 3)


def test_windows_of_real_held_out_patients(brca_dir, tmp_path):
    split, images = realtissue.report_images(brca_dir)
    w = realtissue.windows(brca_dir, tmp_path / "crops", 256, images["name"])
    held_out = set(images["name"].map(lambda n: n.split("-01Z")[0][:12]))
    assert split == "patient-disjoint validation"
    assert set(w["patient"]) <= held_out and w["count"].between(0, 1).all()
    assert (w["area"] <= w["tissue_fraction"] + 1e-9).all()
    assert w["image_path"].map(lambda p: p.endswith(".png")).all()


def test_validation_images_are_the_held_out_patients(brca_dir):
    # the README's numbers: 18 of the 90 train/val images, of 15 patients no training image shares
    from cellulib.data import breastpathq

    held_out = realtissue.validation_images(brca_dir)
    cells = breastpathq.read_cells(brca_dir)
    patients = held_out["name"].map(breastpathq.patient_code)
    rest = cells[~cells["name"].isin(held_out["name"])]["name"].map(breastpathq.patient_code)
    assert (len(cells), len(held_out), patients.nunique()) == (90, 18, 15)
    assert not set(patients) & set(rest)
    assert list(realtissue.report_images(brca_dir)[1]["name"]) == list(held_out["name"])


def test_synthetic_detector_sentence_by_hand():
    t = pd.DataFrame({"precision": [0.267, 0.519, 0.114, 0.499], "recall": [0.006, 0.437, 0.51, 0.764],
                      "f1": [0.012, 0.475, 0.186, 0.604]},
                     index=["lymphocyte", "malignant", "normal", "detection"])
    settings = {"disc_diameter": 11.0, "downscale": 1, "seg_epochs": 32}
    assert realtissue.synthetic_detector_sentence(t, settings, 350, "calibrated", 0.08, "test") == (
        "Trained only on synthetic patches of the generator calibrated to real tissue (chapter 1), "
        "at full size with 11 px discs for 32 epochs (5.8 minutes), the FPN finds the nuclei of the "
        "held-out patients with pooled precision 0.499, recall 0.764 and F 0.604, where chapter 2's "
        "network, trained at the paper's scale, reaches F 0.080 on the test split; the floor for "
        "such a detector (0.60) is **met**. Its weakest class is lymphocyte (F 0.012).")
    below = t.assign(f1=[0.012, 0.475, 0.186, 0.599])
    text = realtissue.synthetic_detector_sentence(below, {**settings, "downscale": 2}, 60, "default")
    assert "of the default generator, after a x2 downscale with 11 px discs" in text
    assert "for 32 epochs (1.0 minutes), the FPN" in text
    assert "F 0.599; the floor for such a detector (0.60) is **not met**." in text
    jittered = realtissue.synthetic_detector_sentence(t, {**settings, "stain_augment": "hed"}, 150,
                                                      "calibrated")
    assert "at full size with 11 px discs and HED stain jitter for 32 epochs (2.5 minutes)" in jittered
    assert "none stain" not in realtissue.synthetic_detector_sentence(
        t, {**settings, "stain_augment": "none"}, 150, "calibrated")


def test_normalisation_table_and_sentence_by_hand():
    # four windows of two patients, truth 0.1 < 0.2 < 0.3 < 0.4. Without normalisation A ranks
    # them perfectly (PK 1) and B scores 1, 3, 2, 2 (PK 3.5 / 6, as above); normalised, A keeps its
    # order and B gets 4, 3, 2, 1 (PK 0). Mean PK: (1 + 3.5/6) / 2 before, (1 + 0) / 2 after.
    w = pd.DataFrame({"path": list("abcd"), "patient": ["P1", "P1", "P2", "P2"],
                      "count": [0.1, 0.2, 0.3, 0.4], "area": [0.1, 0.2, 0.3, 0.4]})
    plain = pd.DataFrame({"path": w.path, "A": [1, 2, 3, 4.0], "B": [1, 3, 2, 2.0]})
    normed = pd.DataFrame({"path": w.path, "A": [0.1, 0.5, 0.6, 0.9], "B": [4, 3, 2, 1.0]})
    patch = {"none": pd.Series({"A": 0.8, "B": 0.6}), "macenko": pd.Series({"A": 0.7, "B": 0.9})}
    per, summary = realtissue.normalisation_table(plain, {"macenko": normed}, w, ["A", "B"], patch,
                                                  n_boot=200)
    assert per.loc["A", "PK, none"] == 1.0 and per.loc["B", "PK, none"] == pytest.approx(3.5 / 6)
    assert per.loc["A", "PK, macenko"] == 1.0 and per.loc["B", "PK, macenko"] == 0.0
    assert per.loc["mean of the 2", "PK, none"] == pytest.approx((1 + 3.5 / 6) / 2)
    assert per.loc["mean of the 2", "PK, macenko"] == pytest.approx(0.5)
    assert per.loc["B", "patch, macenko"] == 0.9 and per.loc["A", "patch, none"] == 0.8
    assert per.loc["mean of the 2", "patch, macenko"] == pytest.approx(0.8)
    row = summary.loc["macenko"]
    assert row["diff"] == pytest.approx(0.5 - (1 + 3.5 / 6) / 2)
    assert (row["raised"], row["lowered"]) == (0, 1)
    # the paired CI and verdict are route_difference's on the same windows
    both = pd.concat([plain[["A", "B"]], normed[["A", "B"]].add_suffix(" [macenko]")], axis=1)
    est, say = realtissue.route_difference(both, w, ["A [macenko]", "B [macenko]"], ["A", "B"], n_boot=200)
    assert (row["diff_low"], row["diff_high"], row["verdict"]) == (est.ci_low, est.ci_high, say)
    assert row["pk_low"] <= row["pk"] <= row["pk_high"]
    text = realtissue.normalisation_sentence(per, summary)
    assert text.startswith("Macenko moves the mean PK of the 2 models from 0.792")
    assert "it lowers 1 of them and raises none (most lowered: B, 0.58 to 0.00)" in text
    assert "the best score of the BreastPathQ patch goes from 0.80 to 0.90" in text
    # a normalisation that leaves every model at chance cannot decide the comparison
    flat = normed.assign(A=0.5, B=0.5)
    per2, summary2 = realtissue.normalisation_table(plain, {"reinhard": flat}, w, ["A", "B"], n_boot=200)
    assert summary2.loc["reinhard", "verdict"] == "undecided"
    assert not summary2.loc["reinhard", "above_chance"]
    flat_text = realtissue.normalisation_sentence(per2, summary2)
    assert "no longer rank above chance" in flat_text and "it lowers all 2 (most lowered: A, 1.00 to 0.50)" in flat_text
    both = pd.concat([summary, summary2])
    floors = pd.DataFrame({"met": [True], "measured": ["0.8"], "required": ["0.7"]}, index=["f"])
    assert realtissue.summary_sentence(floors, {}, None, both).endswith(
        "Normalising the stain at inference changes the models' mean PK by Macenko "
        "-0.292 [-0.500 to -0.250] and Reinhard -0.292 [-0.500 to -0.250]: none raised it with a "
        "CI above 0.")
    assert "patch" not in realtissue.normalisation_sentence(per2, summary2)


def test_windows_normalised_to_the_models_training_stain(real_dir, tmp_path):
    """score_windows(stain_norm=...) scores each window after normalising it to the stain the
    model file stores, the same as normalising the window by hand and scoring it plainly."""
    import cv2
    import torch

    from cellulib import save_model
    from cellulib.data.stain import StainNormalizer
    from cellulib.files.imageio import read_image
    from cellulib.models import networks

    source = real_dir / "breastpathq_99788_1.tif"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    img = read_image(source)
    tiles = [img[y:y + 256, x:x + 256] for y in (0, 256) for x in (0, 256)]
    paths = []
    for i, t in enumerate(tiles):
        paths.append(tmp_path / f"w{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(t, cv2.COLOR_RGB2BGR))
    # the training stain: the patch with its haematoxylin and eosin swapped in strength
    reference = StainNormalizer("macenko").fit(img[::-1, :, ::-1].copy()).reference()
    torch.manual_seed(0)
    model = tmp_path / "direct.pt"
    save_model(networks.direct_model("resnet34"), model, stain={"macenko": reference},
               preprocess={"input_size": 64, "normalize": "minus_one_one"})
    table = pd.DataFrame({"path": [str(p) for p in paths]})
    normed = realtissue.score_windows({"A": model}, table, cache=False, stain_norm="macenko")
    by_hand = []
    norm = StainNormalizer.from_reference(reference)
    for i, t in enumerate(tiles):
        by_hand.append(tmp_path / f"n{i}.png")
        cv2.imwrite(str(by_hand[-1]), cv2.cvtColor(norm.normalize(t), cv2.COLOR_RGB2BGR))
    expected = realtissue.score_windows({"A": model}, pd.DataFrame({"path": [str(p) for p in by_hand]}),
                                        cache=False)
    np.testing.assert_allclose(normed["A"], expected["A"], atol=1e-6)
    plain = realtissue.score_windows({"A": model}, table, cache=False)
    assert not np.allclose(plain["A"], normed["A"], atol=1e-4)


def test_discussion_sentence_reads_the_floors_and_the_normalisation():
    w = _windows()
    scores = pd.DataFrame({"path": w.path, "A": w["count"], "B": 1 - w["count"]})
    ranks = realtissue.rank_table(scores, w, ROUTES, n_boot=100)
    floors = realtissue.floors_table(ranks, ["A"], pd.Series({"A": 0.9, "B": 0.6}))
    normed = scores.assign(B=w["count"])  # normalised, B ranks as A does: mean PK 0.5 -> 1
    per, summary = realtissue.normalisation_table(scores, {"macenko": normed}, w, ["A", "B"], n_boot=100)
    result = realtissue.RealTissue("val", 256, w, scores, None, ranks, None, [], {}, {"as trained": "holds"},
                                   None, None, None, floors)
    text = realtissue.discussion_sentence(result, ROUTES)
    assert text.endswith("On the val split of BRCA-M2C (24 windows of 6 patients), 3 of 3 of the "
                         "real-tissue chapter's floors are met.")
    result.normalisation_summary = summary
    # B is reversed without normalisation, so the six (here two) are at chance as a group before:
    # a gain of 0.5 that SPEC 5.1 does not let the CI decide
    assert summary.loc["macenko", "diff"] == pytest.approx(0.5)
    assert realtissue.discussion_sentence(result, ROUTES).endswith(
        "Normalising real tissue to the stain the models trained on moves their mean PK by "
        f"{summary.loc['macenko', 'difference']} with Macenko (without it the models do not rank "
        "above chance as a group, so the CI cannot decide it).")
