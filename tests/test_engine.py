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
