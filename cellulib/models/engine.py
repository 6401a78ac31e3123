"""The hardware side of training and inference: device, mixed precision, memory layout.

One place decides how a batch runs on this machine, for training (fastai callbacks) and for
inference (:func:`autocast`), so the book, ``cellulib train`` and ``cellulib predict``
compute the same way:

- **CUDA**: automatic mixed precision (bf16 where the GPU supports it, else fp16 with a gradient
  scaler; fastai's ``MixedPrecision``), channels-last layout.
- **CPU with native bf16** (AVX-512 BF16 or AMX): bf16 autocast and channels-last, measured 2.4x
  faster than float32 NCHW for ResNet-34 training on this project's 2-core machines. fastai's own
  ``MixedPrecision`` autocasts on CUDA only, hence :class:`CPUAutocast`.
- **Anything else**: float32, and on CUDA without TF32 (:func:`full_float32`), so that
  ``precision="float32"`` computes what the CPU computes.

``precision`` is ``"auto"`` (the above), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"float32"``;
``$CELLULIB_PRECISION`` overrides ``"auto"``. Used by :mod:`cellulib.training.train` (chapters 2-4),
:mod:`cellulib.inference.predict` and :mod:`cellulib.bench.suite`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgLoss, AvgSmoothLoss
from fastai.torch_core import find_bs, to_detach

PRECISIONS = ("auto", "bf16", "fp16", "float32")


def resolve_device(device: Any = None) -> torch.device:
    """``device`` as a torch device; None picks CUDA when available, else the CPU.

    Raises
    ------
    ValueError
        A string that names no torch device (``"gpu"``).

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device 'gpu' is not a torch device: give cpu, cuda or cuda:N
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a torch device: give cpu, cuda or "
                         "cuda:N") from None


def usable_device(device: Any = None) -> torch.device:
    """:func:`resolve_device`, refusing a CUDA device this machine does not have with a
    ValueError that says which there are (instead of torch's error at the first tensor moved
    there). What ``cellulib predict``, ``detect`` and ``slide`` run on (``--device``)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device that torch "
                             "can use; give cpu, or leave the device out")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return dev


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast pays."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    try:  # other platforms: ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not flags
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: Any = None, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` under ``precision``, or None for float32.

    Examples
    --------
    >>> amp_dtype("cpu", "float32") is None
    True
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = os.environ.get("CELLULIB_PRECISION", "auto") or "auto"
        if precision not in PRECISIONS:
            raise ValueError(f"$CELLULIB_PRECISION must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
    dev = resolve_device(device)
    if precision == "float32":
        return None
    if precision == "fp16":
        if dev.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA GPU; use bf16 or float32 on a CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """The `PRECISIONS` name of an autocast dtype from :func:`amp_dtype`: ``float32`` (None),
    ``bf16`` or ``fp16``; what ``predict`` and ``detect`` report in their sidecars.

    >>> precision_name(torch.bfloat16), precision_name(None)
    ('bf16', 'float32')
    """
    return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def precision_label(dtype, channels_last: bool | None = None) -> str:
    """How a pass computes, e.g. ``bf16 autocast + channels-last`` or ``float32``.

    ``channels_last`` defaults to what this module does: channels-last exactly when it autocasts.
    Printed by :mod:`cellulib.bench.suite` and the book's status page.
    """
    name = "float32" if dtype is None else f"{precision_name(dtype)} autocast"
    if channels_last is None:
        channels_last = dtype is not None
    return name + (" + channels-last" if channels_last else "")


def autocast(device: Any = None, dtype: torch.dtype | None = None):
    """``torch.autocast`` to ``dtype`` on ``device``; for ``None``, float32 (:func:`full_float32`).

    Used by :class:`cellulib.inference.predict.Predictor` with the dtype :func:`amp_dtype` resolved once.
    """
    if dtype is None:
        return full_float32(device)
    return torch.autocast(device_type=resolve_device(device).type, dtype=dtype)


@contextlib.contextmanager
def full_float32(device: Any = None):
    """float32 that is float32 on CUDA too: convolutions and matrix products without TF32.

    PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) by default on Ampere and later
    GPUs, so a "float32" pass there is not the CPU's: on an H200 the float32 scores of the test
    suite's (deliberately sensitive) models moved by up to 0.0095 against the CPU's. Inside this
    context both flags are off, and restored afterwards; on other devices it changes nothing.
    """
    if resolve_device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout when it is a 4-d image batch (else unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


#: The module types whose weights :func:`precast_weights` may store in the autocast dtype: exactly
#: these classes (not subclasses, which may use their weights in other ops), whose forward is one
#: op that autocast runs in the lower precision, casting every floating-point argument.
PRECAST_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear)


def precast_weights(model: torch.nn.Module, example: torch.Tensor, device: Any = None,
                    dtype: torch.dtype | None = None, *, copy: bool = False) -> torch.nn.Module:
    """Store, once, the weights that autocast would cast to ``dtype`` on every forward pass.

    Under ``torch.autocast`` a convolution or linear layer casts its float32 weight and bias to
    ``dtype`` at each call; the cast is cached only until the autocast context closes, so an
    inference loop that enters the context per batch (or per image, as detection does) pays it
    every time: 3-6 ms a batch of 16 for a ResNet-34 at 96 px on a 2-core Intel Xeon with AMX,
    10-18% of the forward pass. A dry forward pass of ``example`` under :func:`autocast` finds
    the layers of :data:`PRECAST_TYPES` that run with autocast on (a head that switches autocast
    off, as the direct models' float32 head and the GBT route's segmentation do, is left alone),
    and their parameters are stored in ``dtype``. Autocast's cast of an already-``dtype`` tensor is the
    tensor itself, so the outputs are bit for bit those of the float32 weights under autocast.
    A parameter shared with a layer that runs without autocast, or with any other module, stays
    float32. Used by :func:`inference_model`.

    Afterwards the model must only run under autocast to ``dtype``. With ``dtype`` None (float32)
    nothing happens.

    Parameters
    ----------
    copy : bool
        Cast a deep copy (made only when there is something to cast) and leave ``model`` as it
        was; otherwise ``model`` is changed in place.

    Returns
    -------
    torch.nn.Module
        The model with the weights cast: ``model`` itself, or its copy.
    """
    if dtype is None:
        return model
    device_type = resolve_device(device).type
    states: dict[int, set[bool]] = {}
    hooked = [m for m in model.modules() if type(m) in PRECAST_TYPES]

    def record(module: torch.nn.Module, args: Any) -> None:
        states.setdefault(id(module), set()).add(torch.is_autocast_enabled(device_type))

    handles = [m.register_forward_pre_hook(record) for m in hooked]
    try:
        with torch.inference_mode(), autocast(device, dtype):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    names = [name for name, param in model.named_parameters()
             if param.dtype == torch.float32 and all(
                 type(m) in PRECAST_TYPES and states.get(id(m)) == {True}
                 for m in owners[id(param)])]
    if not names:
        return model
    if copy:
        import copy as copy_module

        model = copy_module.deepcopy(model)
    for name in names:
        param = model.get_parameter(name)
        param.data = param.data.to(dtype)
    return model


def inference_model(model: torch.nn.Module, device: Any, dtype: torch.dtype | None, side: int, *,
                    layout_channels_last: bool = True, copy: bool = False,
                    name: str = "the model") -> torch.nn.Module:
    """``model`` ready to score under :func:`autocast` to ``dtype``: in eval mode on ``device``,
    in channels-last layout when asked, and its weights cast once (:func:`precast_weights`,
    the dry pass on a zero ``side`` x ``side`` image; ``copy`` as there). A network that fails
    on that image raises a RuntimeError naming ``name`` (its file). The set-up of
    :class:`cellulib.inference.predict.Predictor` and of ``cellulib detect``'s model."""
    model = model.eval().to(device)
    if layout_channels_last:
        model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, side, side, device=device)
    if layout_channels_last:
        example = channels_last(example)
    try:
        return precast_weights(model, example, device, dtype, copy=copy)
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: the network fails on a {side}x{side} image: "
                           f"{' '.join(str(exc).split())}") from exc


def training_callbacks(device: Any = None, precision: str = "auto") -> list:
    """fastai callbacks that train with mixed precision and channels-last on ``device``.

    Used by every Learner of :mod:`cellulib.training.train` (chapters 2-4) and by ``cellulib.bench.suite``.
    """
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.fp16 import MixedPrecision

    dev = resolve_device(device)
    dtype = amp_dtype(dev, precision)
    if dtype is None:
        return [Float32()] if dev.type == "cuda" else []
    if dev.type == "cuda":
        return [ChannelsLast(), MixedPrecision("bf16" if dtype == torch.bfloat16 else "fp16")]
    return [ChannelsLast(), CPUAutocast(dtype)]


#: Seconds between two updates of the loss shown beside a training progress bar (:class:`Progress`).
PROGRESS_COMMENT_EVERY_S = 1.0


def asynchronous(learn: Any) -> Any:
    """Let ``learn`` (a fastai Learner) queue batch after batch on a GPU without waiting for it.

    Reading a number computed on a GPU makes the host wait until the GPU has finished everything
    queued before it. fastai does that at every training batch: its Recorder copies the running
    loss to the CPU (``to_detach``) and its progress bar prints that loss. While the host waits,
    the GPU has nothing queued, and while the GPU then computes, the host does the next batch's
    Python work: the two take turns instead of overlapping (issue 21 measured an H200 at 0.65-0.76
    of a plain loop). Here the running losses stay on the device (:class:`DeviceLosses`, copied to
    the CPU once per epoch) and the bar shows the loss at most once per
    `PROGRESS_COMMENT_EVERY_S` (:class:`Progress`). Nothing computed changes: on a CPU the same
    numbers, in the same order. Used by :func:`cellulib.training.train.learner`, so by every
    Learner of the book and of ``cellulib.bench.suite``.
    """
    if not any(isinstance(cb, DeviceLosses) for cb in learn.cbs):
        learn.add_cb(DeviceLosses())
    for cb in list(learn.cbs):
        if type(cb) is ProgressCallback:
            learn.remove_cb(cb)
            learn.add_cb(Progress())
    return learn


class DeviceAvgLoss(AvgLoss):
    """fastai's ``AvgLoss`` (the validation loss) with its sum kept on the loss's device."""

    def accumulate(self, learn: Any) -> None:
        bs = find_bs(learn.yb)
        self.total += to_detach(learn.loss.mean(), cpu=False) * bs
        self.count += bs


class DeviceAvgSmoothLoss(AvgSmoothLoss):
    """fastai's ``AvgSmoothLoss`` (the running training loss) with its value kept on the loss's
    device."""

    def accumulate(self, learn: Any) -> None:
        self.count += 1
        loss = to_detach(learn.loss.mean(), cpu=False)
        # fastai starts the value as a CPU tensor: moved once, at the first batch of a fit
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class DeviceLosses(Callback):
    """fastai callback: the Recorder's running losses stay on the device during an epoch.

    fastai's Recorder copies each batch's loss to the CPU, which makes the host wait for the GPU
    (:func:`asynchronous`). Before each fit this puts :class:`DeviceAvgLoss` and
    :class:`DeviceAvgSmoothLoss` in the place of its two loss averages (the same arithmetic on
    the same values); after each training phase the per-batch losses it recorded
    (``recorder.losses``) are copied to the CPU together, as floats; so are those of a fit
    cancelled during training (``lr_find``), at its end.
    """

    order = 49  # before the Recorder (50), so that it resets the new averages

    def before_fit(self) -> None:
        rec = getattr(self.learn, "recorder", None)
        if rec is None:
            return
        # set in the Recorder's __dict__: its `loss` shadows the Learner's by fastai's design
        if type(rec.loss) is AvgLoss:
            rec.__dict__["loss"] = DeviceAvgLoss()
        if type(rec.smooth_loss) is AvgSmoothLoss:
            rec.__dict__["smooth_loss"] = DeviceAvgSmoothLoss(beta=rec.smooth_loss.beta)

    def after_train(self) -> None:
        self._copy_losses()

    def after_fit(self) -> None:  # also after a cancelled fit (lr_find), where no after_train ran
        self._copy_losses()

    def _copy_losses(self) -> None:
        losses = getattr(getattr(self.learn, "recorder", None), "losses", None)
        if not losses:
            return
        start = len(losses)  # the losses recorded since the last copy: the tensors at the end
        while start and isinstance(losses[start - 1], torch.Tensor):
            start -= 1
        if start < len(losses):
            # one copy to the CPU per epoch instead of one per batch
            losses[start:] = torch.stack([v.detach().float().reshape(()) for v in losses[start:]]
                                         ).cpu().tolist()


class Progress(ProgressCallback):
    """fastai's progress bar, with the running loss beside it updated at most once per
    `PROGRESS_COMMENT_EVERY_S` seconds and at the end of each phase, since printing it reads the
    loss from the device (:func:`asynchronous`). Keeps fastai's name: ``learn.progress``."""

    @property
    def name(self) -> str:
        return "progress"

    def _launch_pbar(self) -> None:
        self._shown = -float("inf")
        super()._launch_pbar()

    def after_batch(self) -> None:
        self.pbar.update(self.iter + 1)
        now = time.monotonic()
        if hasattr(self, "smooth_loss") and (now - self._shown >= PROGRESS_COMMENT_EVERY_S
                                             or self.iter + 1 >= self.n_iter):
            self.pbar.comment = f"{self.smooth_loss.item():.4f}"
            self._shown = now


class Float32(Callback):
    """fastai callback: a fit in :func:`full_float32` (no TF32 on CUDA), flags restored after it."""

    def __init__(self) -> None:
        self._ctx = None

    def before_fit(self) -> None:
        self._ctx = full_float32("cuda")
        self._ctx.__enter__()

    def after_fit(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    after_cancel_fit = after_fit


class CPUAutocast(Callback):
    """fastai callback: bf16 autocast on the CPU, inputs in channels-last layout.

    bf16 has float32's range, so no gradient scaler is needed. The prediction is cast back to
    float32 before the loss, as fastai's ``MixedPrecision`` does on CUDA.
    """

    order = 10

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self._ctx = None

    def before_batch(self) -> None:
        self.learn.xb = tuple(channels_last(x) for x in self.learn.xb)
        self._ctx = autocast("cpu", self.dtype)
        self._ctx.__enter__()

    def after_pred(self) -> None:
        pred = self.learn.pred
        if isinstance(pred, torch.Tensor) and pred.is_floating_point():
            self.learn.pred = pred.float()

    def after_loss(self) -> None:
        self._exit()

    def after_batch(self) -> None:  # also reached when a batch is cancelled before its loss
        self._exit()

    def _exit(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
