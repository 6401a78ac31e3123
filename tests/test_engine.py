"""The hardware side (cellulib.models.engine): which dtype each precision gives on each device, and that
"float32" on CUDA turns TF32 off and back on again. The flags are plain settings, so the CUDA
cases run on a machine without a GPU too; `.ci/gpu-check` runs the suite on one."""

import pytest
import torch

from cellulib.models import engine


@pytest.fixture
def tf32_on():
    """Both TF32 flags on (PyTorch's default for cuDNN), restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("device, precision, expected", [
    ("cpu", "float32", None),
    ("cpu", "bf16", torch.bfloat16),
    ("cuda", "fp16", torch.float16),
    ("cuda", "bf16", torch.bfloat16),
    ("cuda", "float32", None),
])
def test_named_precisions_give_their_dtype(device, precision, expected, monkeypatch):
    monkeypatch.delenv("CELLULIB_PRECISION", raising=False)
    assert engine.amp_dtype(device, precision) is expected


def test_auto_follows_the_environment_and_fp16_needs_cuda(monkeypatch):
    monkeypatch.setenv("CELLULIB_PRECISION", "float32")
    assert engine.amp_dtype("cpu") is None and engine.amp_dtype("cuda") is None
    monkeypatch.setenv("CELLULIB_PRECISION", "fp32")
    with pytest.raises(ValueError, match="CELLULIB_PRECISION"):
        engine.amp_dtype("cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        engine.amp_dtype("cpu", "fp16")


def test_float32_on_cuda_runs_without_tf32_and_restores_the_flags(tf32_on):
    with engine.autocast("cuda", None):
        assert _flags() == (False, False)
    assert _flags() == (True, True)
    with pytest.raises(RuntimeError), engine.full_float32("cuda:0"):
        assert _flags() == (False, False)
        raise RuntimeError("a failed pass")
    assert _flags() == (True, True)  # restored after an error too
    with engine.autocast("cpu", None):
        assert _flags() == (True, True)  # nothing to change off CUDA


def test_float32_training_on_cuda_gets_the_callback_that_turns_tf32_off(tf32_on):
    assert engine.training_callbacks("cpu", "float32") == []
    (cb,) = engine.training_callbacks("cuda", "float32")
    assert isinstance(cb, engine.Float32)
    cb.before_fit()
    assert _flags() == (False, False)
    cb.after_cancel_fit()  # a cancelled fit restores them too
    assert _flags() == (True, True)
    cb.after_fit()  # once only
    assert _flags() == (True, True)
    names = [type(c).__name__ for c in engine.training_callbacks("cuda", "bf16")]
    assert names == ["ChannelsLast", "MixedPrecision"]


# ----------------------------------------------------------------------------------------------
# precast_weights: the weights autocast casts at every pass, cast once, with the same outputs


class _Head(torch.nn.Module):
    """Conv + BN + ReLU under autocast, then a linear head that switches autocast off (as the
    direct models' float32 head does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        h = self.mid(h)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(h.float())


class _ScaledConv(torch.nn.Conv2d):
    """A subclass that uses its weight in another op: never cast."""

    def forward(self, x):
        return self._conv_forward(x, self.weight / self.weight.norm(), self.bias)


def _net(seed=0):
    torch.manual_seed(seed)
    net = _Head()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_precast_weights_gives_the_same_outputs_bit_for_bit_and_leaves_float32_layers():
    x = torch.randn(4, 3, 16, 16)
    reference = _net()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)  # plain autocast over float32 weights
    net = engine.precast_weights(_net(), x[:1], "cpu", torch.bfloat16)
    assert net.conv.weight.dtype == net.conv.bias.dtype == torch.bfloat16
    assert net.mid.weight.dtype == torch.bfloat16
    # the head runs with autocast off, BN is not a cast layer: both stay float32
    assert net.head.weight.dtype == torch.float32 and net.bn.weight.dtype == torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)


def test_precast_weights_copies_when_asked_and_leaves_shared_and_subclassed_weights():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cast = engine.precast_weights(net, torch.zeros(1, 3, 8, 8), "cpu", torch.bfloat16, copy=True)
    assert cast is not net and cast.conv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # float32 (dtype None) changes nothing and copies nothing
    assert engine.precast_weights(net, torch.zeros(1, 3, 8, 8), "cpu", None, copy=True) is net

    shared = _net()
    shared.head.weight = shared.mid.weight  # one parameter, run with autocast on and off
    shared.head.bias = shared.mid.bias
    shared = engine.precast_weights(shared, torch.zeros(1, 3, 8, 8), "cpu", torch.bfloat16)
    assert shared.mid.weight.dtype == torch.float32 and shared.conv.weight.dtype == torch.bfloat16

    odd = _net()
    odd.conv = _ScaledConv(3, 8, 3, padding=1)
    odd = engine.precast_weights(odd, torch.zeros(1, 3, 8, 8), "cpu", torch.bfloat16)
    assert odd.conv.weight.dtype == torch.float32 and odd.mid.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# asynchronous: fastai's per-batch reads of the loss, which make the host wait for a GPU


def _reg_learner(seed=0, n_trn=12):
    from fastai.test_utils import synth_learner
    from fastai.torch_core import set_seed

    set_seed(seed)
    return synth_learner(n_trn=n_trn, lr=1e-2)


class _Learn:
    """What the loss averages read from a Learner: the loss and the targets of a batch."""

    def __init__(self, loss, yb):
        self.loss, self.yb = loss, yb

    def to_detach(self, b, cpu=True, gather=True):  # fastai's Learner.to_detach, no DataLoader
        from fastai.torch_core import to_detach

        return to_detach(b, cpu, gather)


def test_device_loss_averages_never_copy_to_the_cpu():
    """fastai's averages copy each batch's loss to the CPU (on a GPU: wait for it). A meta tensor
    has no values, so any copy of it raises: fastai's own averages fail here, ours do not."""
    from fastai.learner import AvgLoss, AvgSmoothLoss

    loss, yb = torch.ones(4, device="meta"), (torch.zeros(4, 1, device="meta"),)
    for fastai_avg in (AvgLoss(), AvgSmoothLoss()):
        fastai_avg.reset()
        with pytest.raises((NotImplementedError, RuntimeError)):
            fastai_avg.accumulate(_Learn(loss, yb))
    for ours in (engine.DeviceAvgLoss(), engine.DeviceAvgSmoothLoss()):
        ours.reset()
        for _ in range(3):
            ours.accumulate(_Learn(loss, yb))
        assert ours.value.device.type == "meta"


def test_device_loss_averages_compute_what_fastai_computes():
    from fastai.learner import AvgLoss, AvgSmoothLoss

    losses = [torch.tensor([0.5, 0.7]), torch.tensor([0.2, 0.4, 0.9]), torch.tensor([1.5])]
    pairs = ((AvgLoss(), engine.DeviceAvgLoss()), (AvgSmoothLoss(0.9), engine.DeviceAvgSmoothLoss(0.9)))
    for theirs, ours in pairs:
        theirs.reset(), ours.reset()
        for loss in losses:
            for avg in (theirs, ours):
                avg.accumulate(_Learn(loss, (torch.zeros(len(loss)),)))
        assert float(ours.value) == float(theirs.value)
    # by hand: the batch-size-weighted mean of the batch means
    assert float(pairs[0][1].value) == pytest.approx((1.2 + 1.5 + 1.5) / 6)


def test_asynchronous_learner_records_the_same_losses_as_fastai():
    """Same seed, same data: fastai's plain Recorder and ours record the same per-batch and
    per-epoch losses; ours as floats, copied once per epoch."""
    plain, ours = _reg_learner(), engine.asynchronous(_reg_learner())
    for learn in (plain, ours):
        with learn.no_logging():
            learn.fit(2)
    assert [type(cb).__name__ for cb in ours.cbs].count("Progress") == 1
    assert not any(type(cb).__name__ == "ProgressCallback" for cb in ours.cbs)
    assert len(ours.recorder.losses) == len(plain.recorder.losses) == 24
    assert all(type(v) is float for v in ours.recorder.losses)
    assert ours.recorder.losses == [float(v) for v in plain.recorder.losses]
    assert ours.recorder.values == plain.recorder.values


def test_progress_reads_the_loss_once_a_second_not_every_batch(monkeypatch):
    """The bar's comment reads the running loss (on a GPU: waits for it). Over 30 fast batches it
    reads it at the first and the last batch of each phase only."""
    import fastai.callback.progress  # noqa: F401  (the bar's module, for the test's counting)

    learn = engine.asynchronous(_reg_learner(n_trn=30))
    reads = []
    real_item = torch.Tensor.item

    def item(self):
        caller = __import__("sys")._getframe(1)
        while caller is not None and caller.f_code.co_filename.endswith("_tensor.py"):
            caller = caller.f_back  # fastai's tensor subclasses dispatch through torch_function
        if caller is not None and caller.f_code is engine.Progress.after_batch.__code__:
            reads.append(caller.f_locals["self"].iter)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(engine, "PROGRESS_COMMENT_EVERY_S", 3600.0)
    learn.fit(1)
    assert reads == [0, 29, 0, 1]  # training: first and last of 30; validation: its 2 batches
    monkeypatch.setattr(engine, "PROGRESS_COMMENT_EVERY_S", 0.0)
    reads.clear()
    learn.fit(1)
    assert len(reads) == 32  # every batch when the interval is 0: the comment works


def test_a_quiet_fit_keeps_the_learners_own_bar():
    """`fit(progress=False)` hides the bar for that fit; fastai's `no_bar` would put back its
    plain ProgressCallback afterwards, which reads the loss at every batch."""
    from cellulib.training.train import fit

    learn = engine.asynchronous(_reg_learner())
    bar = learn.progress
    fit(learn, 1, 1e-2, progress=False)
    assert learn.progress is bar and isinstance(bar, engine.Progress)
    assert not any(type(cb).__name__ == "ProgressCallback" for cb in learn.cbs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_batches_do_not_wait_for_the_gpu(tmp_path):
    """On a GPU, no training batch between the first and the last reads a value back from the
    device or copies to it synchronously (``torch.cuda.set_sync_debug_mode``): the book's own
    loaders (workers, pinned memory) and Learner let the host queue batch after batch."""
    import warnings

    from fastai.callback.core import Callback

    from cellulib.data import breastpathq
    from cellulib.data.synthset import make_breastpathq
    from cellulib.training.train import seg_learner

    class Watch(Callback):
        order = -1000

        def before_batch(self):
            middle = self.training and 0 < self.iter < self.n_iter - 1
            torch.cuda.set_sync_debug_mode("warn" if middle else 0)

        def after_fit(self):
            torch.cuda.set_sync_debug_mode(0)

    root = make_breastpathq(tmp_path / "data", n_train=16, n_val=2, n_cells=6, size=128,
                            seed=0, progress=False)
    dls = breastpathq.seg_dataloaders(root, size=64, bs=4, seed=0, patches_per_epoch=32,
                                      device="cuda")
    learn = seg_learner(dls)
    learn.add_cb(Watch())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learn.fit(1, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        breastpathq.close_workers(dls)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, f"{len(syncs)} waits for the GPU in 6 training batches: {syncs[:3]}"


def test_lr_find_still_gets_its_losses_as_numbers(tmp_path):
    """`lr_find` cancels the fit during training, so no training phase ends: the losses it
    recorded are copied at the end of the fit, and fastai's suggestion works on them."""
    import fastai.callback.schedule  # noqa: F401  (adds Learner.lr_find)

    learn = engine.asynchronous(_reg_learner(n_trn=40))
    learn.path = tmp_path  # lr_find keeps its temporary weights under path/models
    with learn.no_logging():
        found = learn.lr_find(num_it=30, show_plot=False)
    assert all(type(v) is float for v in learn.recorder.losses)
    assert 0 < found.valley < 10
