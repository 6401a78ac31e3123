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
