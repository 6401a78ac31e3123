"""Loss and Jaccard metrics of the weak segmentation (Rakhlin et al. 2019, section 3.1, eq. 1-3).

:class:`BCEJaccardLoss` is the paper's per-class weighted sum of binary cross-entropy and soft
Jaccard; :func:`jaccard_per_class` and :class:`JaccardMetric` give the hard IoU at threshold 0.5
reported in Table 1 (per class and the mean of the three nucleus classes). All of them take the
segmentation network's logits ``(B, C, H, W)`` and a 0/1 target of the same shape, channels in the
order of :data:`cellulib.constants.CLASSES`. The metric objects plug into a fastai
``Learner(metrics=...)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellulib.constants import CLASSES, NUCLEUS_CHANNELS

try:  # fastai only decides whether the metrics are recognised as fastai metrics
    from fastai.learner import Metric as _MetricBase
except ImportError:  # pragma: no cover - fastai is a dependency, this keeps the loss usable
    _MetricBase = object

__all__ = [
    "BCEJaccardLoss",
    "jaccard_per_class",
    "JaccardMetric",
    "jaccard_metrics",
    "SoftBinCrossEntropy",
]



def _plain(x: torch.Tensor) -> torch.Tensor:
    # fastai passes TensorImage/TensorMask subclasses; mixing them in one op can fail to dispatch
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    for name, t in (("prediction", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.ndim < 2:
        raise ValueError(f"{what}: expected (B, C, H, W) logits, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(pred.shape)} and target shape "
                         f"{tuple(target.shape)} differ; the target needs one 0/1 map per class "
                         f"(B, C, H, W)")


class BCEJaccardLoss(nn.Module):
    """Weighted per-class sum of BCE and soft Jaccard, the segmentation loss (paper 3.1, eq. 1-3).

    For each class ``c`` over all pixels ``i`` of the batch, with ``p = sigmoid(logit)``:
    ``BCE_c = mean_i BCE(p_i, y_i)`` (computed from the logits, numerically stable),
    ``J_c = sum_i y_i p_i / (sum_i (y_i + p_i - y_i p_i) + eps)`` (ratio of sums, as the authors
    and Iglovikov et al. compute it; the paper's eq. 2 prints the ratio inside the sum),
    ``L_c = (1 - alpha) BCE_c - alpha J_c`` (eq. 1) and ``L = sum_c v_c L_c / sum_c v_c`` (eq. 3).
    A perfect confident prediction gives ``L = -alpha``. Used in chapter 2 through
    :func:`cellulib.training.train.train_seg` (weak segmentation).

    Works as a fastai ``loss_func``: :meth:`activation` (sigmoid) and :meth:`decodes` (> 0.5) are
    what ``Learner.get_preds`` and ``show_results`` call.

    Parameters
    ----------
    alpha : float
        Weight of the Jaccard term (0.15 in the paper).
    weights : sequence of float
        Class weights ``v_c`` in channel order (1, 1, 4, 1: malignant counts four times; the
        authors' code used 0 for background).
    eps : float
        Added to the Jaccard denominator.
    reduction : {"mean", "none"}
        "mean": the batch loss above. "none": one loss per image (each over its own pixels), what
        fastai asks for with ``get_preds(with_loss=True)``.

    Examples
    --------
    >>> target = torch.zeros(1, 4, 2, 2); target[:, 3] = 1
    >>> round(BCEJaccardLoss()(torch.where(target > 0, 50.0, -50.0), target).item(), 4)
    -0.0214
    """

    def __init__(self, alpha: float = 0.15, weights: Sequence[float] = (1, 1, 4, 1),
                 eps: float = 1e-7, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        weights = tuple(float(w) for w in weights)
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.alpha = float(alpha)
        self.weights = weights
        self.eps = float(eps)
        self.reduction = reduction
        self._weight_tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._checked: set[torch.device] = set()  # devices whose targets passed the range check

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, weights={self.weights}, eps={self.eps}"

    def per_class(self, logits: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(BCE_c, J_c)``, each ``(C,)`` (or ``(B, C)`` with reduction "none")."""
        logits, target = self._prepare(logits, target)
        dims = (0, *range(2, logits.ndim)) if self.reduction == "mean" else tuple(
            range(2, logits.ndim))
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
        probs = torch.sigmoid(logits)
        inter = (target * probs).sum(dims)
        union = (target + probs - target * probs).sum(dims)
        return bce, inter / (union + self.eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce, jac = self.per_class(logits, target)
        loss_c = (1 - self.alpha) * bce - self.alpha * jac
        v = self._weight_tensor(loss_c.device, loss_c.dtype)
        return (loss_c * v).sum(-1) / v.sum()

    def _weight_tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # made once per device: a copy to a GPU at every batch would wait for the GPU
        key = (device, dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self.weights, dtype=dtype, device=device)
        return self._weight_tensors[key]

    def _prepare(self, logits: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(logits, target, "BCEJaccardLoss")
        if logits.shape[1] != len(self.weights):
            raise ValueError(f"BCEJaccardLoss: {len(self.weights)} class weights but the logits "
                             f"have {logits.shape[1]} channels (shape {tuple(logits.shape)})")
        logits, target = _plain(logits), _plain(target)
        if not torch.is_floating_point(logits):
            raise ValueError(f"BCEJaccardLoss: logits must be float, got {logits.dtype}")
        target = target.to(logits.dtype)
        # The range check reads a value back: on a GPU that waits for everything queued, so off
        # the CPU only the first call on each device checks (the batches of one loader are alike).
        if target.device.type == "cpu" or target.device not in self._checked:
            if bool(((target < 0) | (target > 1)).any()):
                raise ValueError("BCEJaccardLoss: target values must lie in [0, 1] (0/1 masks), "
                                 f"got range [{target.min().item()}, {target.max().item()}]")
            self._checked.add(target.device)
        return logits, target

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits (fastai calls this in ``get_preds``)."""
        return torch.sigmoid(x)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        """Binary masks from probabilities (fastai calls this to decode predictions)."""
        return x > 0.5


def _binarise(pred: torch.Tensor, threshold: float, from_logits: bool | None) -> torch.Tensor:
    if from_logits is None:
        # probabilities live in [0, 1]; logits of a real network almost surely leave it
        from_logits = bool(((pred < 0) | (pred > 1)).any())
    probs = torch.sigmoid(pred.float()) if from_logits else pred
    return probs > threshold


def _iou_counts(pred: torch.Tensor, target: torch.Tensor, threshold: float,
                from_logits: bool | None, what: str, cpu: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class intersection and union pixel counts (int64) over the batch, on the CPU or, with
    ``cpu=False``, where ``pred`` is."""
    _check_pair(pred, target, what)
    pred, target = _plain(pred).detach(), _plain(target).detach()
    pred_bin = _binarise(pred, threshold, from_logits)
    target_bin = target > 0.5
    dims = (0, *range(2, pred.ndim))
    inter = (pred_bin & target_bin).sum(dims)
    union = (pred_bin | target_bin).sum(dims)
    if cpu:
        inter, union = inter.cpu(), union.cpu()
    return inter.long(), union.long()


def jaccard_per_class(logits_or_probs: torch.Tensor, target: torch.Tensor,
                      threshold: float = 0.5, from_logits: bool | None = None) -> torch.Tensor:
    """Hard Jaccard index (IoU) per class over the whole batch, at a probability threshold.

    Paper 3.1 and Table 1 (Jaccard at 0.5). ``IoU_c = |P_c & Y_c| / |P_c | Y_c|`` with ``P_c`` the
    pixels whose probability exceeds ``threshold`` and ``Y_c`` the pixels whose target is 1, both
    counted over every image of the batch. The hard IoU behind Table 1 (weak segmentation).

    Parameters
    ----------
    logits_or_probs : torch.Tensor
        ``(B, C, H, W)`` network logits or sigmoid probabilities.
    target : torch.Tensor
        ``(B, C, H, W)`` 0/1 masks.
    threshold : float
        Probability threshold.
    from_logits : bool, optional
        Whether the prediction holds logits (a sigmoid is applied) or probabilities. None guesses:
        logits when any value lies outside [0, 1]. Pass it explicitly for network outputs, whose
        logits could all fall in [0, 1] by chance.

    Returns
    -------
    torch.Tensor
        ``(C,)`` float64 IoU per class; NaN for a class absent from both prediction and target.

    Examples
    --------
    >>> probs = torch.tensor([[[[0.9, 0.9, 0.1, 0.1]]]])
    >>> target = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])
    >>> jaccard_per_class(probs, target)  # 1 shared pixel of 3 in the union
    tensor([0.3333], dtype=torch.float64)
    """
    inter, union = _iou_counts(logits_or_probs, target, threshold, from_logits,
                               "jaccard_per_class")
    return _ratio(inter, union)


def _ratio(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    inter, union = inter.double(), union.double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, torch.nan))


class JaccardMetric(_MetricBase):
    """fastai metric: Jaccard (IoU) accumulated over the whole validation set (paper Table 1).

    Intersections and unions are summed over all validation batches before dividing, so the value
    is the IoU of the validation set, not a mean of batch means. With several classes the value is
    the mean of their IoUs (Table 1 reports the mean over normal, lymphocyte and malignant).
    Build the four of the book with :func:`jaccard_metrics`. Used in chapter 2 through
    :func:`cellulib.training.train.train_seg`.

    Parameters
    ----------
    classes : int or sequence of int
        Channel index, or indices whose IoUs are averaged.
    name : str
        Column name in fastai's training table.
    threshold : float
        Probability threshold.
    from_logits : bool
        Whether ``learn.pred`` holds logits (True for :func:`cellulib.models.networks.seg_model`).
    """

    def __init__(self, classes: int | Sequence[int], name: str, threshold: float = 0.5,
                 from_logits: bool = True) -> None:
        self.classes = (int(classes),) if isinstance(classes, int) else tuple(map(int, classes))
        if not self.classes:
            raise ValueError("JaccardMetric needs at least one class index")
        self._name = name
        self.threshold = float(threshold)
        self.from_logits = from_logits
        self.reset()

    def reset(self) -> None:
        """Forget the counts of the previous epoch."""
        self.inter: torch.Tensor | None = None
        self.union: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch's per-class intersections and unions."""
        # the counts stay on the device until `value`: a copy per batch would wait for a GPU
        inter, union = _iou_counts(pred, target, self.threshold, self.from_logits,
                                   f"JaccardMetric {self._name}", cpu=False)
        if max(self.classes) >= inter.numel():
            raise ValueError(f"JaccardMetric {self._name}: class index {max(self.classes)} but "
                             f"the prediction has {inter.numel()} channels")
        self.inter = inter if self.inter is None else self.inter + inter
        self.union = union if self.union is None else self.union + union

    def accumulate(self, learn) -> None:
        """fastai hook: update with ``learn.pred`` and the first target of ``learn.yb``."""
        self.update(learn.pred, learn.yb[0])

    @property
    def value(self) -> float | None:
        """Mean IoU of the selected classes so far (None before any batch)."""
        if self.inter is None:
            return None
        iou = _ratio(self.inter.cpu(), self.union.cpu())[list(self.classes)]
        return float(iou.nanmean()) if bool((~torch.isnan(iou)).any()) else float("nan")

    @property
    def name(self) -> str:
        return self._name


def jaccard_metrics(threshold: float = 0.5, from_logits: bool = True) -> list[JaccardMetric]:
    """The four Jaccard columns of the book: normal, lymphocyte, malignant and their mean.

    Paper Table 1 (the mean of the three nucleus classes at threshold 0.5). Used in chapter 2
    through :func:`cellulib.training.train.train_seg`.

    Returns
    -------
    list of JaccardMetric
        ``jaccard_normal``, ``jaccard_lymphocyte``, ``jaccard_malignant``, ``jaccard_nuclei``.
    """
    metrics = [JaccardMetric(i, f"jaccard_{CLASSES[i]}", threshold, from_logits)
               for i in NUCLEUS_CHANNELS]
    metrics.append(JaccardMetric(NUCLEUS_CHANNELS, "jaccard_nuclei", threshold, from_logits))
    return metrics


class SoftBinCrossEntropy(nn.Module):
    """Cross-entropy of the 101-bin cellularity classifier against a Gaussian over the bins.

    Paper section 3.4 trains Xception (C) with cross-entropy on the one-hot bin of the label
    (``sigma=0``, exactly ``F.cross_entropy``). With ``sigma`` > 0 (in bins) the target spreads over
    the neighbouring bins, ``q_k ~ exp(-(k - t)^2 / (2 sigma^2))``, which says that bin 41 is a
    near miss for a label of 0.40 and bin 90 a gross one: label-distribution learning (Gao et al.
    2017). With a few hundred labels, one per ~1-2 bins, hard targets give each bin almost no
    examples; this is the ``cls_sigma`` setting of the quick profile. Takes logits ``(B, 101)`` and
    integer bins ``(B,)``. Used in chapter 4 through :func:`cellulib.training.train.train_direct`.

    Examples
    --------
    >>> logits, bins = torch.randn(4, 101), torch.tensor([0, 40, 41, 100])
    >>> bool(torch.isclose(SoftBinCrossEntropy(0)(logits, bins), F.cross_entropy(logits, bins)))
    True
    """

    def __init__(self, sigma: float = 0.0, n_bins: int = 101) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0 (bins), got {sigma}")
        self.sigma, self.n_bins = float(sigma), int(n_bins)

    def targets(self, bins: torch.Tensor) -> torch.Tensor:
        """``(B, n_bins)`` target distributions of integer bins ``(B,)``."""
        bins = _plain(bins).long().reshape(-1)
        if self.sigma == 0:
            return F.one_hot(bins, self.n_bins).float()
        k = torch.arange(self.n_bins, device=bins.device, dtype=torch.float32)
        q = torch.exp(-0.5 * ((k[None] - bins[:, None].float()) / self.sigma) ** 2)
        return q / q.sum(dim=1, keepdim=True)

    def forward(self, logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        logits = _plain(logits).float()
        if logits.ndim != 2 or logits.shape[1] != self.n_bins:
            raise ValueError(f"SoftBinCrossEntropy expects logits (B, {self.n_bins}), got "
                             f"{tuple(logits.shape)}")
        return -(self.targets(bins) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    # fastai calls these to turn outputs into predictions (Learner.get_preds, show_results)
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)
