"""Tests of cellulib.models.losses: the paper's BCE-Jaccard loss (eq. 1-3) against hand-computed values,
the hard Jaccard against scikit-learn, and the fastai metric objects."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from cellulib.constants import CLASSES
from cellulib.models.losses import BCEJaccardLoss, JaccardMetric, jaccard_metrics, jaccard_per_class


def _reference_loss(logits, target, alpha=0.15, weights=(1, 1, 4, 1), eps=1e-7):
    """Eq. 1-3 with Python floats and math.log/math.exp only (no torch)."""
    n_classes = len(logits[0])
    total = 0.0
    for c in range(n_classes):
        zs = [z for img in logits for z in np.ravel(img[c])]
        ys = [y for img in target for y in np.ravel(img[c])]
        ps = [1 / (1 + math.exp(-z)) for z in zs]
        bce = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for p, y in zip(ps, ys)) / len(ps)
        inter = sum(y * p for p, y in zip(ps, ys))
        union = sum(y + p - y * p for p, y in zip(ps, ys))
        total += weights[c] * ((1 - alpha) * bce - alpha * inter / (union + eps))
    return total / sum(weights)


def test_loss_closed_form_at_zero_logits():
    """All logits 0 (p = 0.5): BCE_c = ln 2; J = 1/3, 1/2, 0, 1/3 by hand."""
    target = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 1.0]]]])  # 1x4x1x2
    loss = BCEJaccardLoss()(torch.zeros(1, 4, 1, 2, dtype=torch.float64), target)
    # sum_c v_c J_c = 1/3 + 1/2 + 4 * 0 + 1/3 = 7/6; over V = 7: 1/6
    expected = 0.85 * math.log(2) - 0.15 * (7 / 6) / 7
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_loss_hand_computed_1x4x1x2():
    logits = [[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 1.2]], [[0.7, -2.0]]]
    target = [[[1, 0]], [[0, 1]], [[1, 1]], [[0, 0]]]
    expected = _reference_loss([logits], [target])
    got = BCEJaccardLoss()(torch.tensor([logits], dtype=torch.float64),
                           torch.tensor([target], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_loss_matches_reference_on_random_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 4, 3, 5))
    target = (rng.random((2, 4, 3, 5)) < 0.3).astype(float)
    for alpha, weights in ((0.15, (1, 1, 4, 1)), (0.5, (1, 1, 4, 0)), (0.0, (2, 1, 1, 1))):
        expected = _reference_loss(logits.tolist(), target.tolist(), alpha, weights)
        got = BCEJaccardLoss(alpha, weights)(torch.tensor(logits), torch.tensor(target))
        assert got.item() == pytest.approx(expected, rel=1e-9)


def test_confident_correct_prediction_gives_minus_alpha():
    target = torch.zeros(2, 4, 8, 8)
    target[:, 0, :2] = 1
    target[:, 1, 2:4] = 1
    target[:, 2, 4:6] = 1
    target[:, 3, 6:] = 1
    logits = torch.where(target > 0, 30.0, -30.0)
    assert BCEJaccardLoss()(logits, target).item() == pytest.approx(-0.15, abs=1e-6)
    assert BCEJaccardLoss(alpha=0.4)(logits, target).item() == pytest.approx(-0.4, abs=1e-6)


def test_malignant_weight_is_four():
    """Two predictions differing only in the malignant channel: the loss difference scales with
    v_malignant / V, i.e. 4/7 with weights (1, 1, 4, 1) against 1/4 with equal weights."""
    torch.manual_seed(0)
    target = (torch.rand(2, 4, 6, 6) < 0.4).float()
    a = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    b = a.clone()
    b[:, 2] = torch.randn(2, 6, 6, dtype=torch.float64)
    paper, equal = BCEJaccardLoss(), BCEJaccardLoss(weights=(1, 1, 1, 1))
    diff_paper = (paper(a, target) - paper(b, target)).item()
    diff_equal = (equal(a, target) - equal(b, target)).item()
    assert diff_paper == pytest.approx(diff_equal * (4 / 7) / (1 / 4), rel=1e-9)
    only_malignant = BCEJaccardLoss(weights=(0, 0, 1, 0))
    assert (diff_paper == pytest.approx(
        (only_malignant(a, target) - only_malignant(b, target)).item() * 4 / 7, rel=1e-9))


def test_gradient_flows_and_is_finite_for_extreme_logits():
    target = torch.zeros(1, 4, 4, 4)
    target[:, 3] = 1
    logits = torch.tensor([-200.0, 0.0, 200.0, 3.0]).view(1, 4, 1, 1).repeat(1, 1, 4, 4)
    logits.requires_grad_(True)
    loss = BCEJaccardLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2].abs().sum() > 0  # a confident false positive is pushed down
    assert (logits.grad[0, 2] > 0).all()


def test_reduction_none_gives_one_loss_per_image():
    torch.manual_seed(1)
    logits, target = torch.randn(3, 4, 5, 5), (torch.rand(3, 4, 5, 5) < 0.5).float()
    per_image = BCEJaccardLoss(reduction="none")(logits, target)
    assert per_image.shape == (3,)
    for i in range(3):
        ref = _reference_loss(logits[i:i + 1].tolist(), target[i:i + 1].tolist())
        assert per_image[i].item() == pytest.approx(ref, rel=1e-5)


def test_loss_rejects_bad_input():
    loss = BCEJaccardLoss()
    with pytest.raises(ValueError, match=r"shape \(1, 4, 8, 8\) and target shape \(1, 8, 8\)"):
        loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="4 class weights but the logits have 3 channels"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss(torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 255.0))
    for kwargs in ({"alpha": 1.5}, {"weights": (1, -1, 4, 1)}, {"reduction": "sum"}):
        with pytest.raises(ValueError):
            BCEJaccardLoss(**kwargs)


def test_fastai_activation_and_decodes():
    loss = BCEJaccardLoss()
    x = torch.tensor([-2.0, 0.0, 2.0])
    assert torch.allclose(loss.activation(x), 1 / (1 + torch.exp(-x)))
    assert loss.decodes(torch.tensor([0.2, 0.5, 0.7])).tolist() == [False, False, True]


# ------------------------------------------------------------------------------ Jaccard


def test_jaccard_hand_case():
    probs = torch.tensor([[[[0.9, 0.9, 0.1, 0.1]], [[0.2, 0.8, 0.8, 0.8]]]])  # 1x2x1x4
    target = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]], [[0.0, 1.0, 1.0, 1.0]]]])
    iou = jaccard_per_class(probs, target)
    # class 0: predicted {0, 1}, true {0, 3}: 1 / 3; class 1: predicted = true = {1, 2, 3}: 1
    assert iou.tolist() == pytest.approx([1 / 3, 1.0])
    assert jaccard_per_class(probs, target, threshold=0.85).tolist() == pytest.approx([1 / 3, 0])
    # "at 0.5" means p > 0.5: a probability of exactly 0.5 (logit 0) is not a positive pixel
    half = torch.tensor([[[[0.5, 0.9]]]])
    assert jaccard_per_class(half, torch.tensor([[[[1.0, 1.0]]]])).item() == pytest.approx(0.5)
    zero_logit = torch.tensor([[[[0.0, 3.0]]]])
    assert jaccard_per_class(zero_logit, torch.tensor([[[[1.0, 1.0]]]]), from_logits=True
                             ).item() == pytest.approx(0.5)


def test_jaccard_matches_sklearn():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 4, 16, 16))
    target = (rng.random((3, 4, 16, 16)) < 0.3).astype(np.float32)
    iou = jaccard_per_class(torch.tensor(probs), torch.tensor(target), from_logits=False)
    for c in range(4):
        ref = jaccard_score(target[:, c].ravel() > 0.5, probs[:, c].ravel() > 0.5)
        assert iou[c].item() == pytest.approx(ref, abs=1e-12)
    logits = torch.logit(torch.tensor(probs))
    assert torch.allclose(jaccard_per_class(logits, torch.tensor(target), from_logits=True), iou)
    assert torch.allclose(jaccard_per_class(logits, torch.tensor(target)), iou)  # guessed


def test_jaccard_empty_class_is_nan_and_bad_shapes_fail():
    iou = jaccard_per_class(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), from_logits=False)
    assert torch.isnan(iou).all()
    with pytest.raises(ValueError, match="differ"):
        jaccard_per_class(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2))


def test_metric_accumulates_over_the_whole_set_not_batch_means():
    """Two batches with IoU 1 (1 pixel) and 0.1 (10-pixel union): pooled 2/11, not 0.55."""
    t1 = torch.zeros(1, 4, 1, 10)
    t1[0, 2, 0, 0] = 1
    p1 = t1.clone()
    t2 = torch.zeros(1, 4, 1, 10)
    t2[0, 2] = 1
    p2 = torch.zeros(1, 4, 1, 10)
    p2[0, 2, 0, 0] = 1
    metric = JaccardMetric(2, "jaccard_malignant", from_logits=False)
    metric.reset()
    for p, t in ((p1, t1), (p2, t2)):
        metric.accumulate(SimpleNamespace(pred=p, yb=(t,)))
    assert metric.value == pytest.approx(2 / 11)
    ref = jaccard_score(torch.cat([t1, t2])[:, 2].ravel().numpy() > 0.5,
                        torch.cat([p1, p2])[:, 2].ravel().numpy() > 0.5)
    assert metric.value == pytest.approx(ref)
    metric.reset()
    assert metric.value is None


def test_jaccard_metrics_against_sklearn_and_fastai():
    from fastai.learner import Metric

    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(0, 1, (4, 4, 8, 8)), dtype=torch.float32)
    target = torch.tensor(rng.random((4, 4, 8, 8)) < 0.4, dtype=torch.float32)
    metrics = jaccard_metrics()
    assert [m.name for m in metrics] == [
        "jaccard_normal", "jaccard_lymphocyte", "jaccard_malignant", "jaccard_nuclei"]
    assert all(isinstance(m, Metric) for m in metrics)
    for m in metrics:
        m.reset()
        for sl in (slice(0, 1), slice(1, 4)):  # uneven batches
            m.accumulate(SimpleNamespace(pred=logits[sl], yb=(target[sl],)))
    pred = (torch.sigmoid(logits) > 0.5).numpy()
    refs = [jaccard_score(target[:, c].numpy().ravel() > 0.5, pred[:, c].ravel())
            for c in range(3)]
    values = [m.value for m in metrics]
    assert values[:3] == pytest.approx(refs)
    assert values[3] == pytest.approx(np.mean(refs))  # Table 1: mean of the nucleus classes
    assert CLASSES[:3] == ("normal", "lymphocyte", "malignant")


def test_loss_and_metrics_inside_a_fastai_learner():
    """fastai recognises the metric objects and calls the loss, also with get_preds(with_loss)."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    y = (torch.rand(6, 4, 8, 8) < 0.5).float()
    items = list(zip(x, y))
    dls = DataLoaders(DataLoader(items, bs=4), DataLoader(items, bs=4), device="cpu")
    model = nn.Conv2d(3, 4, 1)
    learn = Learner(dls, model, loss_func=BCEJaccardLoss(), metrics=jaccard_metrics())
    with torch.no_grad():
        logits = model(x)
    loss, *values = learn.validate()
    refs = [jaccard_score(y[:, c].numpy().ravel() > 0.5,
                          (torch.sigmoid(logits[:, c]) > 0.5).numpy().ravel()) for c in range(3)]
    assert values[:3] == pytest.approx(refs, abs=1e-6)
    assert values[3] == pytest.approx(np.mean(refs), abs=1e-6)
    # fastai averages batch losses weighted by batch size: batches of 4 and 2
    batch = BCEJaccardLoss()
    expected = (4 * batch(logits[:4], y[:4]) + 2 * batch(logits[4:], y[4:])) / 6
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    probs, _, per_image = learn.get_preds(with_loss=True)
    assert per_image.shape == (6,)
    assert torch.allclose(probs, torch.sigmoid(logits), atol=1e-6)


# --------------------------------------------------------------------------------------------
# the classifier's cross-entropy over the 101 bins


def test_soft_bin_cross_entropy_with_zero_width_is_plain_cross_entropy():
    import torch.nn.functional as F

    from cellulib.models.losses import SoftBinCrossEntropy

    gen = torch.Generator().manual_seed(0)
    logits, bins = torch.randn(6, 101, generator=gen), torch.tensor([0, 1, 37, 50, 99, 100])
    assert torch.isclose(SoftBinCrossEntropy(0.0)(logits, bins), F.cross_entropy(logits, bins))


def test_soft_bin_targets_are_a_normalised_gaussian_over_the_bins():
    import math

    from cellulib.models.losses import SoftBinCrossEntropy

    q = SoftBinCrossEntropy(2.0).targets(torch.tensor([50, 0]))
    assert torch.allclose(q.sum(1), torch.ones(2))
    # hand-computed ratios: exp(-d^2 / (2 * 2^2)) for d = 1 and d = 2
    assert float(q[0, 51] / q[0, 50]) == pytest.approx(math.exp(-1 / 8), rel=1e-5)
    assert float(q[0, 48] / q[0, 50]) == pytest.approx(math.exp(-4 / 8), rel=1e-5)
    assert int(q[1].argmax()) == 0 and float(q[1, 100]) < 1e-12  # truncated at the edge


def test_soft_bin_cross_entropy_is_smallest_at_the_target_distribution():
    from cellulib.models.losses import SoftBinCrossEntropy

    loss = SoftBinCrossEntropy(3.0)
    bins = torch.tensor([20, 70])
    q = loss.targets(bins)
    logits = q.clamp_min(1e-30).log()
    at_target = loss(logits, bins)
    entropy = -torch.special.xlogy(q, q).sum(1).mean()  # a cross-entropy's minimum: the entropy
    assert float(at_target) == pytest.approx(float(entropy), rel=1e-4)
    assert float(loss(logits + 0.3 * torch.randn(2, 101), bins)) > float(at_target)


def test_loss_checks_every_cpu_batch_and_makes_its_weights_once_per_device():
    """On the CPU every call checks the target range, also after good batches (off the CPU the
    first call per device does: reading the answer back would wait for a GPU at every batch).
    The class-weight tensor is made once per device and dtype, not copied at every batch."""
    loss = BCEJaccardLoss()
    logits, good = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    first = loss(logits, good)
    assert torch.equal(loss(logits, good), first)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        loss(logits, good * 255)
    v = loss._weight_tensor(torch.device("cpu"), torch.float32)
    assert v is loss._weight_tensor(torch.device("cpu"), torch.float32)
    assert v.tolist() == [1.0, 1.0, 4.0, 1.0]
    assert loss._weight_tensor(torch.device("cpu"), torch.float64).dtype == torch.float64


def test_validation_metrics_keep_their_sums_on_the_device():
    """The Jaccard counts and the cellularity MSE are summed where the predictions are, and read
    once in `value`: a read per validation batch would wait for a GPU. A meta tensor has no
    values, so any read or copy of it raises; accumulating meta batches must not."""
    from cellulib.training.train import CellularityMSE

    logits = torch.zeros(2, 4, 3, 3, device="meta")
    jac = JaccardMetric([0, 1, 2], "jaccard_nuclei")
    mse = CellularityMSE()
    model = SimpleNamespace(to_cellularity=lambda x: x)
    for _ in range(3):
        jac.accumulate(SimpleNamespace(pred=logits, yb=(logits,)))
        mse.accumulate(SimpleNamespace(pred=torch.zeros(2, 1, device="meta"),
                                       yb=(torch.zeros(2, 1, device="meta"),), model=model))
    assert jac.inter.device.type == "meta" and mse.sq.device.type == "meta" and mse.n == 6


def test_cellularity_mse_by_hand_for_scores_and_bins():
    """Regression targets are scores, classification targets bin indices (percent)."""
    from cellulib.training.train import CellularityMSE

    model = SimpleNamespace(to_cellularity=lambda x: x)
    mse = CellularityMSE()
    mse.reset()
    assert mse.value is None
    mse.accumulate(SimpleNamespace(pred=torch.tensor([[0.5], [0.25]]),
                                   yb=(torch.tensor([[0.0], [0.25]]),), model=model))
    mse.accumulate(SimpleNamespace(pred=torch.tensor([0.1]), yb=(torch.tensor([40]),),
                                   model=model))  # bin 40 is cellularity 0.40
    assert mse.value == pytest.approx((0.25 + 0.0 + 0.09) / 3)
    assert type(mse.value) is float
