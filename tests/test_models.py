"""Tests of cellulib.models.networks: architecture (paper 3.1, Fig. 2), weights loading, SR cascade, direct
models. Tiny CPU inputs, no network, random weights only."""
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cellulib.data.transforms import bins_target
from cellulib.models import losses, networks
from cellulib.models.networks import (
    decode_bins,
    direct_model,
    load_imagenet_resnet,
    seg_model,
    sr_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tv_resnet34_file(tmp_path_factory):
    """A randomly initialised torchvision resnet34 saved as if it were an ImageNet weights file."""
    torch.manual_seed(123)
    state = torchvision.models.resnet34(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet34-random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, so that nothing the user downloaded leaks into the tests."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


# ------------------------------------------------------------------------------ segmentation


@pytest.mark.parametrize("decoder", ["fpn", "unet"])
def test_seg_model_output_shape_and_dtype(decoder):
    torch.manual_seed(0)
    model = seg_model(decoder).eval()
    with torch.no_grad():
        for size in (64, 256):
            out = model(torch.rand(2, 3, size, size) * 2 - 1)
            assert out.shape == (2, 4, size, size)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()
        out = model(torch.zeros(1, 3, 64, 96))  # non-square
    assert out.shape == (1, 4, 64, 96)


@pytest.mark.parametrize("decoder", ["fpn", "unet"])
def test_seg_model_rejects_bad_input(decoder):
    model = seg_model(decoder).eval()
    with pytest.raises(ValueError, match=r"image size 100x96 is not divisible by 32"):
        model(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 4"):
        model(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"dtype torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 64, 64))


def test_seg_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decoder"):
        seg_model("linknet")
    with pytest.raises(ValueError, match="dropout"):
        seg_model(dropout=1.5)


def test_encoder_has_resnet34_layout_with_elu_only():
    enc = networks.ResNetELUEncoder()
    assert not any(isinstance(m, nn.ReLU) for m in enc.modules())
    assert any(isinstance(m, nn.ELU) for m in enc.modules())
    # 3-4-6-3 basic blocks, 64/128/256/512 maps, as ResNet-34 (He et al. 2016, Table 1)
    assert [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    feats = enc(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]  # strides 4, 8, 16, 32
    # same number of parameters as torchvision's resnet34 without its 1000-class fc
    tv = torchvision.models.resnet34(weights=None)
    n_tv = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in enc.parameters()) == n_tv


def test_whole_seg_model_has_no_relu():
    for decoder in ("fpn", "unet"):
        assert not any(isinstance(m, nn.ReLU) for m in seg_model(decoder).modules())


def test_conv_elu_bn_order_by_forward_hooks():
    """Every convolution of the main path is followed by ELU then BN (paper 3.1)."""
    model = seg_model("fpn").eval()
    calls = []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    convs = [k for k, (name, m) in enumerate(calls) if isinstance(m, nn.Conv2d)
             and "downsample" not in name and "lateral" not in name and "head" not in name]
    assert len(convs) == 1 + 2 * 16 + 4  # stem, 16 blocks x 2, 4 FPN levels
    for k in convs:
        name = calls[k][0]
        assert isinstance(calls[k + 1][1], nn.ELU), name
        assert isinstance(calls[k + 2][1], nn.BatchNorm2d), name
    names = [name for name, _ in calls]
    block = [n.removeprefix("encoder.layer1.0.") for n in names if n.startswith("encoder.layer1.0.")]
    assert block == ["conv1", "act1", "bn1", "conv2", "act2", "bn2"]
    assert names[:4] == ["encoder.conv1", "encoder.act", "encoder.bn1", "encoder.maxpool"]


def test_fpn_concatenates_256_maps_into_spatial_dropout():
    model = seg_model("fpn")
    drop = model.decoder.dropout
    assert isinstance(drop, nn.Dropout2d) and drop.p == 0.5
    assert seg_model("fpn", dropout=0.3).decoder.dropout.p == 0.3
    seen = {}
    drop.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].shape))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 3, 128, 64))
    assert tuple(seen["inp"]) == (2, 256, 32, 16)  # 4 levels x 64 maps at stride 4
    assert model.decoder.head.out_channels == 4


def test_spatial_dropout_drops_whole_maps_in_training():
    torch.manual_seed(0)
    model = seg_model("fpn").train()
    seen = {}
    model.decoder.dropout.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model(torch.rand(2, 3, 64, 64))
    per_map_max = seen["out"].abs().amax(dim=(2, 3))
    zero_maps = (per_map_max == 0).float().mean().item()
    assert 0.3 < zero_maps < 0.7  # about half of the 2 x 256 maps dropped entirely


def test_deterministic_given_seed():
    torch.manual_seed(7)
    a = seg_model("unet")
    torch.manual_seed(7)
    b = seg_model("unet")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = seg_model("fpn")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    model(torch.rand(2, 3, 64, 64)).mean().backward()  # move weights and BN statistics
    opt.step()
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    torch.manual_seed(1)
    fresh = seg_model("fpn")
    fresh.load_state_dict(torch.load(tmp_path / "seg.pth", weights_only=True))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_one_batch_overfit_with_bce_jaccard():
    """30 Adam steps on one synthetic disc image drive the paper's loss down (a sanity check).

    Dropout is off so that the check measures fitting, not regularisation."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    target = torch.zeros(2, 4, 64, 64)
    img = torch.full((2, 3, 64, 64), -0.5)
    centres = [((20, 20), 2), ((44, 40), 0), ((18, 48), 1)]  # malignant, normal, lymphocyte
    for (cy, cx), cls in centres:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 7.5 ** 2
        target[:, cls][:, disc] = 1
        img[:, cls % 3][:, disc] = 0.8
    target[:, 3] = 1 - target[:, :3].amax(dim=1)
    model = seg_model("fpn", dropout=0.0).train()
    loss_fn = losses.BCEJaccardLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        loss = loss_fn(model(img), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-3:]) < 0.5 * history[0], history


# ------------------------------------------------------------------------------ weights files


def test_torchvision_resnet34_weights_load_strictly(tv_resnet34_file):
    path, state = tv_resnet34_file
    model = seg_model("fpn", pretrained=path)
    enc_state = model.encoder.state_dict()
    expected = [k for k in state if not k.startswith("fc.")]
    assert list(enc_state) == expected  # same names, same order: strict key matching
    for key in expected:
        assert torch.equal(enc_state[key], state[key]), key
    loaded = load_imagenet_resnet("resnet34", path)
    assert set(loaded) == set(state)  # the loader returns the whole file, fc included


def test_weights_without_num_batches_tracked_still_load(tmp_path, tv_resnet34_file):
    """Old torchvision files (resnet34-333f7ec4.pth) lack the BN counters."""
    _, state = tv_resnet34_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = seg_model("unet", pretrained=tmp_path / "old.pth")
    assert torch.equal(model.encoder.layer4[2].conv2.weight, state["layer4.2.conv2.weight"])


def test_missing_weights_file_names_the_path(tmp_path, empty_hub):
    missing = tmp_path / "nowhere" / "resnet34.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        seg_model("fpn", pretrained=missing)
    with pytest.raises(FileNotFoundError) as err:
        seg_model("fpn", pretrained="imagenet")
    msg = str(err.value)
    assert str(empty_hub) in msg and "resnet34-b627a593.pth" in msg and "pretrained=" in msg
    with pytest.raises(FileNotFoundError, match="xception-43020ad28.pth"):
        load_imagenet_resnet("xception")
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        direct_model("resnet50", pretrained="imagenet")


def test_imagenet_found_in_hub_cache(empty_hub, tv_resnet34_file):
    path, state = tv_resnet34_file
    empty_hub.mkdir(parents=True)
    torch.save(state, empty_hub / "resnet34-b627a593.pth")
    model = direct_model("resnet34", pretrained="imagenet")
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])


def test_wrong_weights_file_gives_clear_error(tmp_path):
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"r50\.pth: weights do not fit"):
        seg_model("fpn", pretrained=tmp_path / "r50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: cannot read weights"):
        seg_model("fpn", pretrained=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown arch"):
        load_imagenet_resnet("vgg16")


# ------------------------------------------------------------------------------ direct models


@pytest.mark.parametrize("arch", ["resnet34", "resnet50", "xception"])
def test_direct_models_shapes_and_ranges(arch):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    reg = direct_model(arch, "regression").eval()
    with torch.no_grad():
        y = reg(x)
    assert y.shape == (2, 1) and ((y >= 0) & (y <= 1)).all()
    cls = direct_model(arch, "classification").eval()
    with torch.no_grad():
        logits = cls(x)
    assert logits.shape == (2, 101) and torch.isfinite(logits).all()
    assert cls.to_cellularity(logits).shape == (2,)
    with pytest.raises(ValueError, match="too small"):
        cls(torch.zeros(2, 3, 16, 16))


def test_direct_model_trains_with_cross_entropy_on_bins():
    torch.manual_seed(0)
    model = direct_model("resnet34", "classification").train()
    y = torch.tensor([0.12, 0.87])
    loss = nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), bins_target(y))
    loss.backward()
    assert math.isfinite(loss.item()) and model.body.conv1.weight.grad.abs().sum() > 0
    # untrained: close to uniform over 101 classes, so cross-entropy near log(101)
    assert abs(loss.item() - math.log(101)) < 1.5


def test_direct_model_loads_local_weights(tmp_path, tv_resnet34_file):
    path, state = tv_resnet34_file
    model = direct_model("resnet34", "regression", pretrained=path)
    assert torch.equal(model.body.layer3[5].bn2.running_var, state["layer3.5.bn2.running_var"])
    assert model.head.out_features == 1
    import timm

    torch.manual_seed(3)
    xstate = timm.create_model("legacy_xception", pretrained=False).state_dict()
    torch.save(xstate, tmp_path / "xception.pth")
    xmodel = direct_model("xception", "classification", pretrained=tmp_path / "xception.pth")
    assert torch.equal(xmodel.body.conv1.weight, xstate["conv1.weight"])
    assert xmodel.head.out_features == 101


def test_xception_found_in_huggingface_cache(tmp_path, monkeypatch, empty_hub):
    """timm >= 0.9 caches legacy_xception from the Hugging Face hub as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(4)
    xstate = timm.create_model("legacy_xception", pretrained=False).state_dict()
    snap = tmp_path / "hf" / "models--timm--legacy_xception.tf_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in xstate.items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    loaded = load_imagenet_resnet("xception")
    assert set(loaded) == set(xstate)
    assert torch.equal(loaded["block12.skip.weight"], xstate["block12.skip.weight"])


def test_direct_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch"):
        direct_model("vgg16")
    with pytest.raises(ValueError, match="task"):
        direct_model("resnet34", task="ordinal")


def test_decode_bins_hand_cases():
    logits = torch.full((3, 101), -1e4)
    logits[0, 37] = 0.0  # all mass in the bin 0.37
    logits[1, 20] = logits[1, 40] = 0.0  # half in 0.20, half in 0.40
    logits[2] = 0.0  # uniform: mean of 0.00..1.00
    expected = torch.tensor([0.37, 0.30, 0.50])
    assert torch.allclose(decode_bins(logits), expected, atol=1e-6)
    assert torch.allclose(decode_bins(logits, "argmax")[:2], torch.tensor([0.37, 0.20]))
    # softmax weights computed by hand: logits log(1), log(3) on bins 0.10 and 0.90
    two = torch.full((1, 101), -1e4)
    two[0, 10], two[0, 90] = 0.0, math.log(3)
    assert decode_bins(two).item() == pytest.approx(0.25 * 0.10 + 0.75 * 0.90, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 101\)"):
        decode_bins(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="method"):
        decode_bins(logits, "median")


def test_bins_target_rounding_and_range():
    y = [0.0, 0.004, 0.006, 0.29, 0.57, 0.994, 1.0]
    assert bins_target(y).tolist() == [0, 0, 1, 29, 57, 99, 100]
    assert bins_target(y).dtype == torch.int64
    rng = np.random.default_rng(0)
    labels = np.round(rng.uniform(0, 1, 500), 2)  # labels as written to the CSV: two decimals
    assert bins_target(labels).numpy().tolist() == np.rint(labels * 100).astype(int).tolist()
    assert bins_target(torch.tensor(0.5)).item() == 50
    for bad in ([0.2, 1.01], [-0.01], [float("nan")]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            bins_target(bad)


# ------------------------------------------------------------------------------ SR cascade


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_sr_model_frozen_stage_then_end_to_end():
    torch.manual_seed(0)
    model = sr_model(seg_model("fpn"))
    assert model.head.conv1.in_channels == 4  # normal, lymphocyte, malignant, background
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([[0.2], [0.7]])
    # stage 1: an optimiser over every parameter (as fastai builds it) must not move the seg net
    model.train()
    assert not model.seg.training and model.head.training
    seg_before, head_before = _params(model.seg), _params(model.head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        out = model(x)
        assert out.shape == (2, 1) and ((out >= 0) & (out <= 1)).all()
        loss = nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.seg.state_dict().items():  # weights and BN statistics, bit for bit
        assert torch.equal(v, seg_before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    # stage 2: unfrozen, the segmentation weights train too
    model.unfreeze_seg()
    model.train()
    assert model.seg.training
    assert all(p.requires_grad for p in model.seg.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    w = model.seg.encoder.conv1.weight
    assert not torch.equal(w, seg_before["encoder.conv1.weight"])
    model.freeze_seg()
    assert not model.seg.training and not any(p.requires_grad for p in model.seg.parameters())


def test_sr_model_imagenet_variant_uses_three_channels(tv_resnet34_file):
    path, state = tv_resnet34_file
    model = sr_model(seg_model("fpn"), pretrained=path).eval()
    assert model.head.conv1.in_channels == 3 and model.drop_background
    assert torch.equal(model.head.conv1.weight, state["conv1.weight"])
    seen = {}
    model.head.conv1.register_forward_hook(lambda m, i, o: seen.update(inp=i[0]))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
        probs = torch.sigmoid(model.seg(torch.rand(1, 3, 64, 64)))
    assert out.shape == (2, 1)
    assert seen["inp"].shape[1] == 3 and seen["inp"].min() >= 0 and seen["inp"].max() <= 1
    assert probs.shape[1] == 4
    with pytest.raises(ValueError, match="3-channel stem"):
        sr_model(seg_model("fpn"), pretrained=path, drop_background=False)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 3, 50, 64))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_direct_model_overfits_one_batch(task):
    """Regression (MSE) and 101-bin classification (cross-entropy) both fit a fixed batch: the loss
    falls and the decoded cellularity moves towards the labels."""
    torch.manual_seed(0)
    model = direct_model("resnet34", task).train()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    y = torch.tensor([0.05, 0.3, 0.62, 0.95])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn():
        out = model(x)
        if task == "regression":
            return nn.functional.mse_loss(out.reshape(-1), y)
        return nn.functional.cross_entropy(out, bins_target(y))

    first = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model.to_cellularity(model(x))
    assert loss.item() < 0.3 * first
    assert float(((pred - y) ** 2).mean()) < 0.02
