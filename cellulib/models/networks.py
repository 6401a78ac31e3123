"""Networks of the study: the ELU ResNet-34 encoder with FPN / U-Net decoders, the SR cascade and
the direct cellularity models (Rakhlin et al. 2019, sections 3.1, 3.2 and 3.4).

Everything here is plain PyTorch (torchvision for the ResNets, timm for Xception); the fastai
Learners are built on top of these modules elsewhere. No function in this module ever downloads:
ImageNet initialisation reads weights from a local file or from the torch hub cache, and a clear
``FileNotFoundError`` says where to put the file when it is absent.

Conventions shared by every model:

- input: a float batch ``(B, 3, H, W)`` of RGB pixels scaled from [0, 255] to [-1, 1];
- the segmentation output has 4 channels in the order of :data:`cellulib.constants.CLASSES`
  (normal, lymphocyte, malignant, background) and holds logits (apply a sigmoid for probabilities);
- each model carries a ``config`` dict with the arguments that rebuild it, so a checkpoint can
  store weights and configuration together.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cellulib.constants import CLASSES, N_BINS, STRIDE
from cellulib.data.transforms import normalize_image

__all__ = [
    "IMAGENET_FILES",
    "BasicBlockELU",
    "ResNetELUEncoder",
    "FPNDecoder",
    "UNetDecoder",
    "SegmentationModel",
    "DirectModel",
    "SRModel",
    "seg_model",
    "direct_model",
    "sr_model",
    "decode_bins",
    "load_imagenet_resnet",
]

#: File names of the ImageNet weights as torch hub caches them, in order of preference, and the
#: address a user can fetch them from on a machine with internet access.
IMAGENET_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet34": (
        ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
        "https://download.pytorch.org/models/resnet34-b627a593.pth",
    ),
    "resnet50": (
        ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth"),
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ),
    "xception": (
        ("xception-43020ad28.pth",),
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/"
        "xception-43020ad28.pth",
    ),
}

_DIRECT_ARCHS = ("resnet34", "resnet50", "xception")
_SR_ARCHS = ("resnet34", "resnet50")
_MIN_DIRECT_SIZE = 32

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# input checks


def _check_images(
    x: torch.Tensor, what: str, *, channels: int = 3, multiple: int | None = None,
    min_size: int | None = None,
) -> None:
    """Raise a ValueError that says what is wrong with a batch of images before torch does."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor batch (B, {channels}, H, W), "
                         f"got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a batch of images shaped (B, {channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{what}: expected float pixels scaled to [-1, 1], got dtype {x.dtype}; "
                         "convert with x.float() / 127.5 - 1")
    if x.shape[1] != channels:
        raise ValueError(f"{what}: expected {channels} input channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); convert greyscale or RGBA images to RGB")
    h, w = x.shape[-2:]
    if multiple is not None and (h % multiple or w % multiple):
        raise ValueError(f"image size {h}x{w} is not divisible by {multiple}; crop or pad to a "
                         f"multiple of {multiple}")
    if min_size is not None and (h < min_size or w < min_size):
        raise ValueError(f"image size {h}x{w} is too small for {what}; use at least "
                         f"{min_size}x{min_size} pixels")


def _plain(x: torch.Tensor) -> torch.Tensor:
    # fastai hands over TensorImage subclasses; plain tensors skip its type dispatch on every op
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


# --------------------------------------------------------------------------------------------
# building blocks


def _conv_elu_bn(in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv -> ELU -> BN, the unit the paper uses throughout (section 3.1)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        act=nn.ELU(inplace=True),
        bn=nn.BatchNorm2d(out_ch),
    ))


def _he_init(module: nn.Module) -> None:
    """He (kaiming) normal init for every conv, BN to identity; as torchvision's ResNet."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlockELU(nn.Module):
    """ResNet basic block with ELU and the order conv -> ELU -> BN (paper 3.1).

    ``out = bn2(elu(conv2(bn1(elu(conv1(x)))))) + shortcut(x)``. The parameter names (``conv1``,
    ``bn1``, ``conv2``, ``bn2``, ``downsample.0``, ``downsample.1``) are torchvision's, so its
    ImageNet weights load unchanged. The residual sum gets no activation afterwards: with the
    activation moved before BN, every branch already ends in a normalised, activated map, and the
    identity path stays linear as in pre-activation ResNets (He et al. 2016). Used in chapter 2
    through :func:`cellulib.models.networks.seg_model`
    (weak segmentation).

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output feature maps.
    stride : int
        Stride of the first convolution (2 halves the resolution).
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.act1 = nn.ELU(inplace=True)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.act2 = nn.ELU(inplace=True)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.act1(self.conv1(x)))
        out = self.bn2(self.act2(self.conv2(out)))
        return out + identity


class ResNetELUEncoder(nn.Module):
    """ResNet-34 encoder with ELU and conv -> ELU -> BN order (paper 3.1, Fig. 2; SPEC 2).

    Stem: 7x7 conv stride 2 -> ELU -> BN -> 3x3 max-pool stride 2, then four stages of 3, 4, 6, 3
    basic blocks with 64, 128, 256, 512 maps. Random He init. Parameter names follow torchvision's
    ``resnet34`` (without ``fc``) so its ImageNet state dict loads with strict key matching. Used in
    chapter 2 through :func:`cellulib.models.networks.seg_model` (weak segmentation).

    Parameters
    ----------
    layers : sequence of int
        Blocks per stage; (3, 4, 6, 3) is ResNet-34.
    in_channels : int
        Input channels of the stem.

    Examples
    --------
    >>> enc = ResNetELUEncoder()
    >>> [tuple(f.shape) for f in enc(torch.zeros(1, 3, 64, 64))]
    [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    """

    channels: tuple[int, ...] = (64, 128, 256, 512)
    strides: tuple[int, ...] = (4, 8, 16, 32)

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.act = nn.ELU(inplace=True)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (n_blocks, out_ch) in enumerate(zip(layers, self.channels)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlockELU(in_ch, out_ch, stride)]
            blocks += [BasicBlockELU(out_ch, out_ch) for _ in range(1, n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = out_ch
        _he_init(self)

    def forward_with_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stride-2 stem map (64 maps, before max-pooling) and the four stage maps."""
        stem = self.bn1(self.act(self.conv1(x)))
        c2 = self.layer1(self.maxpool(stem))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return stem, [c2, c3, c4, c5]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage maps at strides 4, 8, 16 and 32."""
        return self.forward_with_stem(x)[1]


class FPNDecoder(nn.Module):
    """Feature Pyramid Network decoder of the paper (section 3.1, Fig. 2; SPEC 2).

    Top-down pathway (Lin et al. 2017): 1x1 lateral convs bring the four encoder stages to
    ``pyramid_channels`` maps; each coarser level is upsampled x2 (nearest) and added to the next
    finer lateral. Each pyramid level then goes through a 3x3 conv with 64 maps followed by ELU and
    BN (the encoder's conv -> ELU -> BN unit, so the four maps arrive on a common scale) and is
    upsampled bilinearly x8, x4, x2, x1 to the stride-4 level. The 4 x 64 = 256 maps are
    concatenated, passed through ``nn.Dropout2d`` (SpatialDropout2D: drops whole maps, rate 0.5 in
    the paper) and a 1x1 conv to ``n_classes`` logits at stride 4. Used in chapter 2 through
    :func:`cellulib.models.networks.seg_model`.

    Parameters
    ----------
    encoder_channels : sequence of int
        Maps of the four encoder stages, finest first.
    pyramid_channels : int
        Maps of the top-down pathway (256 as in Lin et al.).
    segmentation_channels : int
        Maps per pyramid level after its 3x3 conv (64 in the paper).
    dropout : float
        Spatial dropout rate after the concatenation.
    n_classes : int
        Output channels.
    """

    def __init__(
        self, encoder_channels: Sequence[int] = (64, 128, 256, 512), pyramid_channels: int = 256,
        segmentation_channels: int = 64, dropout: float = 0.5, n_classes: int = 4,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            [nn.Conv2d(c, pyramid_channels, 1) for c in encoder_channels])
        self.levels = nn.ModuleList(
            [_conv_elu_bn(pyramid_channels, segmentation_channels) for _ in encoder_channels])
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(segmentation_channels * len(encoder_channels), n_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits at the resolution of the finest (stride-4) encoder map."""
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        pyramid = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            pyramid.insert(0, lat + F.interpolate(pyramid[0], size=lat.shape[-2:], mode="nearest"))
        size = pyramid[0].shape[-2:]
        maps = []
        for level, p in zip(self.levels, pyramid):
            m = level(p)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return self.head(self.dropout(torch.cat(maps, dim=1)))


class UNetDecoder(nn.Module):
    """Standard U-Net decoder for the decoder ablation of Table 1 (paper 4.2; SPEC 2).

    Five stages from stride 32 to the input size: nearest x2 upsampling, concatenation with the
    encoder map of the same stride (stages 16, 8, 4 and the stride-2 stem; none at full size), two
    3x3 conv -> ELU -> BN units. ``decoder_channels`` (256, 128, 64, 32, 16) as in
    segmentation_models.pytorch. The same spatial dropout as the FPN sits before the 1x1 head, so
    that the ablation changes the decoder only. Used in chapter 2 through
    :func:`cellulib.models.networks.seg_model`.

    Parameters
    ----------
    encoder_channels : sequence of int
        Maps of the stem and of the four encoder stages, finest first.
    decoder_channels : sequence of int
        Output maps of the five decoder stages.
    dropout : float
        Spatial dropout rate before the head.
    n_classes : int
        Output channels.
    """

    def __init__(
        self, encoder_channels: Sequence[int] = (64, 64, 128, 256, 512),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), dropout: float = 0.5,
        n_classes: int = 4,
    ) -> None:
        super().__init__()
        skips = list(encoder_channels[-2::-1]) + [0]  # strides 16, 8, 4, 2, then no skip
        in_ch = encoder_channels[-1]
        blocks = []
        for skip_ch, out_ch in zip(skips, decoder_channels):
            blocks.append(nn.Sequential(_conv_elu_bn(in_ch + skip_ch, out_ch),
                                        _conv_elu_bn(out_ch, out_ch)))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(in_ch, n_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits at twice the resolution of the finest map given (the stem): the input size."""
        x = feats[-1]
        skips = list(feats[-2::-1]) + [None]
        for block, skip in zip(self.blocks, skips):
            size = (x.shape[-2] * 2, x.shape[-1] * 2) if skip is None else skip.shape[-2:]
            x = F.interpolate(x, size=size, mode="nearest")
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return self.head(self.dropout(x))


class SegmentationModel(nn.Module):
    """Encoder-decoder nucleus segmentation network (paper 3.1, Fig. 2; SPEC 2).

    ``(B, 3, H, W)`` float images in [-1, 1], H and W multiples of 32 -> ``(B, n_classes, H, W)``
    logits, channels in the order of :data:`cellulib.constants.CLASSES`. Build it with
    :func:`seg_model`. Submodules ``encoder`` and ``decoder`` (for a fastai splitter). Used in chapter 2 through
    :func:`cellulib.models.networks.seg_model`, and in chapter 3 through :func:`cellulib.training.train.train_seg`.
    """

    def __init__(self, encoder: ResNetELUEncoder, decoder: nn.Module, config: dict) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "the segmentation model", multiple=STRIDE)
        x = _plain(x)
        if isinstance(self.decoder, UNetDecoder):
            stem, feats = self.encoder.forward_with_stem(x)
            logits = self.decoder([stem, *feats])
        else:
            logits = self.decoder(self.encoder(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


# --------------------------------------------------------------------------------------------
# ImageNet weights (local only)


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_xception_files() -> list[Path]:
    """Where timm >= 0.9 would have cached legacy_xception from the Hugging Face hub."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "hub"
    else:
        root = Path.home() / ".cache" / "huggingface" / "hub"
    snaps = root / "models--timm--legacy_xception.tf_in1k" / "snapshots"
    if not snaps.is_dir():
        return []
    return sorted(p for name in ("model.safetensors", "pytorch_model.bin")
                  for p in snaps.glob(f"*/{name}"))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (torch pickle or safetensors) into a flat state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: cannot read weights from this file "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), "
                         f"got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_imagenet_resnet(arch: str = "resnet34", path: PathLike | None = None
                         ) -> dict[str, torch.Tensor]:
    """ImageNet weights of torchvision's ResNet-34/50 or timm's legacy Xception, never downloaded.

    Implements the ImageNet initialisation of paper 3.1 and 4.2-4.4 (SPEC 2, 4). The weights are
    read from ``path`` when given, else from the torch hub cache
    (``torch.hub.get_dir()/checkpoints/``: ``resnet34-b627a593.pth``, ``resnet50-0676ba61.pth`` or
    ``resnet50-11ad3fa6.pth``, ``xception-43020ad28.pth``) or, for Xception, from timm's Hugging
    Face cache (``models--timm--legacy_xception.tf_in1k``). Used in chapters 2 and 4 through
    :func:`cellulib.training.train.imagenet_status` (ImageNet
    rows of Tables 1-3).

    Parameters
    ----------
    arch : {"resnet34", "resnet50", "xception"}
        Which network the weights belong to.
    path : str or PathLike, optional
        A local weights file (a state dict saved with ``torch.save``, or ``.safetensors``).

    Returns
    -------
    dict of str to torch.Tensor
        The state dict, including the 1000-class ImageNet head (``fc.*``).

    Raises
    ------
    FileNotFoundError
        When the file is absent; the message names the expected location and the download address.
    ValueError
        When ``arch`` is unknown or the file is not a readable state dict.
    """
    if arch not in IMAGENET_FILES:
        raise ValueError(f"unknown arch {arch!r} for ImageNet weights; choose one of "
                         f"{', '.join(IMAGENET_FILES)}")
    names, url = IMAGENET_FILES[arch]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights file for {arch} not found: {path}")
        return _read_state_dict(path)
    candidates = [_hub_checkpoint_dir() / name for name in names]
    if arch == "xception":
        candidates += _hf_xception_files()
    for cand in candidates:
        if cand.is_file():
            return _read_state_dict(cand)
    raise FileNotFoundError(
        f"ImageNet weights for {arch} not found at {candidates[0]} (cellulib never downloads). "
        f"On a machine with internet access fetch {url} and copy it to {_hub_checkpoint_dir()}/, "
        f"or pass the file explicitly: pretrained='/path/to/{names[0]}'.")


def _resolve_pretrained(pretrained: PathLike | None, arch: str) -> dict[str, torch.Tensor] | None:
    """None -> None; "imagenet" -> hub cache; anything else -> a local weights file."""
    if pretrained is None or pretrained is False:
        return None
    if isinstance(pretrained, str) and pretrained.lower() == "imagenet":
        return load_imagenet_resnet(arch)
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be None, 'imagenet' or a path to a weights file, "
                         f"got {pretrained!r}")
    return load_imagenet_resnet(arch, pretrained)


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a readable error naming the source file."""
    own = module.state_dict()
    # BN's loader fills in num_batches_tracked when old files lack it, so it is not "missing"
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch (file vs model)", wrong)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{source}: weights do not fit this network; {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def _without_head(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "last_linear."))}


def _source(pretrained: PathLike | None, arch: str) -> str:
    return f"ImageNet {arch} weights" if str(pretrained).lower() == "imagenet" else str(pretrained)


def seg_model(
    decoder: str = "fpn", pretrained: PathLike | None = None, dropout: float = 0.5,
    n_classes: int = 4,
) -> SegmentationModel:
    """The nucleus segmentation network: ELU ResNet-34 encoder with an FPN or U-Net decoder.

    Paper 3.1 and Fig. 2; SPEC 2; the decoder and initialisation ablation of Table 1. Used in
    chapter 2 (weak segmentation) and, through the SR cascade and the 81 features, in chapter 3.

    Parameters
    ----------
    decoder : {"fpn", "unet"}
        FPN (the paper's model) or the standard U-Net decoder of the ablation.
    pretrained : None, "imagenet" or path
        None: random He init. "imagenet": torchvision ``resnet34`` ImageNet weights from the torch
        hub cache. A path: a local torchvision ``resnet34`` weights file. The weights fill the
        encoder (strict key matching; the ImageNet ``fc`` head is dropped). They were trained with
        conv -> BN -> ReLU, so with the conv -> ELU -> BN order they are a starting point for
        fine-tuning, as in the paper, not a ready feature extractor.
    dropout : float
        Spatial dropout rate before the head (0.5 in the paper; the authors' code used 0.3).
    n_classes : int
        Output channels (4: normal, lymphocyte, malignant, background).

    Returns
    -------
    SegmentationModel
        ``(B, 3, H, W)`` images in [-1, 1], H and W multiples of 32 -> ``(B, n_classes, H, W)``
        logits.

    Examples
    --------
    >>> model = seg_model("fpn").eval()
    >>> model(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 4, 64, 64])
    """
    if decoder not in ("fpn", "unet"):
        raise ValueError(f"decoder must be 'fpn' or 'unet', got {decoder!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    encoder = ResNetELUEncoder()
    if decoder == "fpn":
        dec: nn.Module = FPNDecoder(encoder.channels, dropout=dropout, n_classes=n_classes)
    else:
        dec = UNetDecoder((64, *encoder.channels), dropout=dropout, n_classes=n_classes)
    _he_init(dec)
    # the 1x1 head keeps PyTorch's default (fan-in) init: He init on 256 -> 4 maps starts with
    # logits of tens, i.e. saturated sigmoids and a huge initial BCE
    dec.head.reset_parameters()
    nn.init.zeros_(dec.head.bias)
    state = _resolve_pretrained(pretrained, "resnet34")
    if state is not None:
        _load_strict(encoder, _without_head(state), _source(pretrained, "resnet34"))
    config = {"kind": "seg", "decoder": decoder, "dropout": float(dropout),
              "n_classes": int(n_classes)}
    return SegmentationModel(encoder, dec, config)


# --------------------------------------------------------------------------------------------
# direct models (paper 3.4)


def _backbone(arch: str) -> tuple[nn.Module, int]:
    """A headless ImageNet-style classifier returning pooled features, and their number."""
    if arch in ("resnet34", "resnet50"):
        body = getattr(torchvision.models, arch)(weights=None)
        n_features = body.fc.in_features
        body.fc = nn.Identity()
        return body, n_features
    if arch == "xception":
        import timm  # imported here: it is slow to import and only Xception needs it

        body = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
        return body, body.num_features
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_DIRECT_ARCHS)}")


class DirectModel(nn.Module):
    """Cellularity straight from the image: a CNN body and a linear head (paper 3.4; SPEC 4).

    Regression: ``(B, 1)`` values in [0, 1] (the linear output passes through a sigmoid, since
    cellularity is bounded; train with MSE). Classification: ``(B, 101)`` logits over the bins
    0.00, 0.01, ..., 1.00 (train with cross-entropy on :func:`bins_target`, decode with
    :func:`decode_bins`). Submodules ``body`` and ``head`` (for a fastai splitter). Build it with
    :func:`direct_model`. Used in chapter 4 through :func:`cellulib.training.train.train_direct` (direct
    models).
    """

    def __init__(self, body: nn.Module, n_features: int, task: str, config: dict) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(n_features, 1 if task == "regression" else N_BINS)
        # Start near the uninformed answer (0.5, or equal bin probabilities): with a random body the
        # pooled features of ResNet-50/Xception are large, and a default-initialised head saturates
        # the sigmoid at 0 or 1, where the gradient vanishes and training never starts. Small (not
        # zero) weights keep a gradient flowing into the body from the first step.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        self.task = task
        self.config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, f"{self.config['arch']} ({self.task})", min_size=_MIN_DIRECT_SIZE)
        features = self.body(_plain(x))
        # the head in float32 even under autocast: a bf16 sigmoid moves in steps of 1/256
        with torch.autocast(features.device.type, enabled=False):
            out = self.head(features.float())
        return torch.sigmoid(out) if self.task == "regression" else out

    def to_cellularity(self, output: torch.Tensor, method: str = "expectation") -> torch.Tensor:
        """``(B,)`` cellularity from this model's output (sigmoid value or decoded bins)."""
        if self.task == "regression":
            return output.reshape(-1)
        return decode_bins(output, method)


def direct_model(arch: str, task: str = "regression", pretrained: PathLike | None = None
                 ) -> DirectModel:
    """A ResNet-34, ResNet-50 or Xception that predicts cellularity from the image (paper 3.4).

    SPEC 4: ResNet34 (R), ResNet50 (R), Xception (R), Xception (C) of Tables 2 and 3. Torchvision
    ``resnet34``/``resnet50`` (``weights=None``) and timm ``legacy_xception``
    (``pretrained=False``), with a new head. Random init by default. Images are scaled to [-1, 1]
    everywhere in cellulib, which is Xception's own ImageNet normalisation; the ResNets were
    trained with mean/std normalisation, a small shift that fine-tuning absorbs. All three have
    stride 32 and global pooling, so any size from 32x32 up works (Xception does not need its
    nominal 299x299; at 64x64 its last map is 2x2). Used in chapter 4 through
    :func:`cellulib.training.train.train_direct` (direct models).

    Parameters
    ----------
    arch : {"resnet34", "resnet50", "xception"}
        The network.
    task : {"regression", "classification"}
        One sigmoid output, or 101 logits for 0.00..1.00.
    pretrained : None, "imagenet" or path
        ImageNet weights from the torch hub cache ("imagenet") or a local file; never downloaded.

    Returns
    -------
    DirectModel
        ``(B, 3, H, W)`` -> ``(B, 1)`` in [0, 1] or ``(B, 101)`` logits.

    Examples
    --------
    >>> direct_model("resnet34", "classification").eval()(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 101])
    """
    if arch not in _DIRECT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_DIRECT_ARCHS)}")
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    body, n_features = _backbone(arch)
    state = _resolve_pretrained(pretrained, arch)
    if state is not None:
        _load_strict(body, _without_head(state), _source(pretrained, arch))
    return DirectModel(body, n_features, task, {"kind": "direct", "arch": arch, "task": task})


def init_output(model: nn.Module, y_train) -> nn.Module:
    """Start a cellularity model at the uninformed answer of its training labels.

    Regression heads (a sigmoid output: direct (R) and SR) get the bias ``logit(mean(y_train))``, so
    the untrained model predicts the training mean, the mean predictor of SPEC 5.1; the 101-bin
    classifier gets the log label prior (bin counts + 0.5). The first steps then learn the image,
    not the label distribution. Returns ``model``. Used in chapters 3 and 4 through
    :mod:`cellulib.training.train`.

    Examples
    --------
    >>> m = init_output(direct_model("resnet34"), [0.2, 0.4]).eval()
    >>> round(float(m(torch.zeros(1, 3, 64, 64))), 2)
    0.3
    """
    y = np.clip(np.asarray(y_train, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if y.size == 0:
        raise ValueError("init_output needs at least one training label")
    head = model.head.fc if isinstance(model, SRModel) else model.head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"init_output: no linear output layer found in {type(model).__name__}")
    with torch.no_grad():
        head.weight.zero_()  # the output is exactly the uninformed answer; Adam's first step moves it
        if head.out_features == 1:
            mean = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
            head.bias.fill_(float(np.log(mean / (1 - mean))))
        elif head.out_features == N_BINS:
            counts = np.bincount(np.rint(y * (N_BINS - 1)).astype(int), minlength=N_BINS) + 0.5
            head.bias.copy_(torch.from_numpy(np.log(counts / counts.sum())).float())
        else:
            raise ValueError(f"init_output: unexpected output size {head.out_features}")
    return model


def decode_bins(logits: torch.Tensor, method: str = "expectation") -> torch.Tensor:
    """Cellularity from the 101 class logits: expectation over the bins, or the argmax bin.

    Paper 3.4 (classification into 0.00, 0.01, ..., 1.00); SPEC 4 (score = expectation, argmax as
    an option). ``expectation`` returns ``sum_k softmax(logits)_k * k / 100``. Used in chapter 4.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, 101)`` class logits.
    method : {"expectation", "argmax"}
        How to turn the distribution into one value.

    Returns
    -------
    torch.Tensor
        ``(B,)`` cellularity in [0, 1].

    Examples
    --------
    >>> logits = torch.full((1, 101), -1e4); logits[0, 37] = 0
    >>> decode_bins(logits)
    tensor([0.3700])
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != N_BINS:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"decode_bins expects logits shaped (B, {N_BINS}), got {shape}")
    logits = _plain(logits)
    if method == "expectation":
        bins = torch.arange(N_BINS, device=logits.device, dtype=torch.float32) / (N_BINS - 1)
        # float32 even under autocast, which would run the product in bf16 (3 significant digits)
        with torch.autocast(logits.device.type, enabled=False):
            return torch.softmax(logits.float(), dim=1) @ bins
    if method == "argmax":
        return logits.argmax(dim=1).float() / (N_BINS - 1)
    raise ValueError(f"method must be 'expectation' or 'argmax', got {method!r}")


# --------------------------------------------------------------------------------------------
# segmentation -> regression cascade (paper 3.2, 4.3)


class SRModel(nn.Module):
    """Segmentation -> regression cascade (paper 3.2 and 4.3; SPEC 3.1).

    ``seg`` maps the image to 4 logit maps; their sigmoid probabilities (without the background
    channel in the ImageNet variant) feed ``head``, a torchvision ResNet whose stem takes 4 (or 3)
    channels and whose sigmoid output is the cellularity ``(B, 1)`` in [0, 1].

    Two training stages: with :meth:`freeze_seg` (the default) the segmentation net runs under
    ``torch.no_grad`` with ``requires_grad=False`` and stays in eval mode even when the model is
    put in train mode (BN statistics and dropout frozen), so only the regressor learns; after
    :meth:`unfreeze_seg` both train end to end. Use these methods rather than fastai's
    ``Learner.freeze``, which keeps BN layers trainable. Used in chapter 3 through
    :func:`cellulib.training.train.train_sr`.
    """

    def __init__(self, seg: nn.Module, head: nn.Module, drop_background: bool, config: dict,
                 freeze_seg: bool = True) -> None:
        super().__init__()
        self.seg = seg
        self.head = head
        self.drop_background = bool(drop_background)
        self.config = dict(config)
        self.seg_frozen = False
        if freeze_seg:
            self.freeze_seg()

    def freeze_seg(self) -> SRModel:
        """Stage 1: fix the segmentation weights, BN statistics and dropout."""
        self.seg_frozen = True
        self.seg.requires_grad_(False)
        self.seg.eval()
        return self

    def unfreeze_seg(self) -> SRModel:
        """Stage 2: train segmentation and regression end to end."""
        self.seg_frozen = False
        self.seg.requires_grad_(True)
        self.seg.train(self.training)
        return self

    def train(self, mode: bool = True) -> SRModel:
        super().train(mode)
        if self.seg_frozen:
            self.seg.eval()
        return self

    def seg_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid maps that enter the regressor (4 channels, or 3 without background)."""
        _check_images(x, "the SR cascade", multiple=STRIDE)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.seg_frozen):
            probs = torch.sigmoid(self.seg(_plain(x)))
        return probs[:, :3] if self.drop_background else probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.seg_probs(x)))

    def to_cellularity(self, output: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cellularity from this model's ``(B, 1)`` output."""
        return output.reshape(-1)


def sr_model(
    seg: nn.Module, arch: str = "resnet34", pretrained: PathLike | None = None,
    freeze_seg: bool = True, drop_background: bool | None = None,
) -> SRModel:
    """Cascade a trained segmentation net with a ResNet regressor on its probability maps.

    Paper 3.2 and 4.3; SPEC 3.1 (the "ResNet34 (SR)" rows of Tables 2 and 3). Random init: a
    4-channel stem over normal, lymphocyte, malignant and background probabilities. ImageNet init:
    the background channel is dropped to fit the vanilla 3-channel stem. Used in chapter 3 through
    :func:`cellulib.training.train.train_sr`.

    Parameters
    ----------
    seg : nn.Module
        A trained segmentation network, ``(B, 3, H, W)`` -> ``(B, 4, H, W)`` logits (see
        :func:`seg_model`). It becomes part of the cascade (not copied): pass
        ``copy.deepcopy(seg)`` to keep the original untouched by fine-tuning.
    arch : {"resnet34", "resnet50"}
        The regressor (the paper uses ResNet-34).
    pretrained : None, "imagenet" or path
        ImageNet weights for the regressor (local only, see :func:`load_imagenet_resnet`).
    freeze_seg : bool
        Start in stage 1 (segmentation frozen); call ``unfreeze_seg()`` for stage 2.
    drop_background : bool, optional
        Feed 3 channels instead of 4. Default: True exactly when ``pretrained`` is given.

    Returns
    -------
    SRModel
        ``(B, 3, H, W)`` images -> ``(B, 1)`` cellularity in [0, 1].
    """
    if not isinstance(seg, nn.Module):
        raise ValueError(f"seg must be a segmentation nn.Module, got {type(seg).__name__}")
    if arch not in _SR_ARCHS:
        raise ValueError(f"unknown arch {arch!r} for the SR regressor; choose one of "
                         f"{', '.join(_SR_ARCHS)}")
    if drop_background is None:
        drop_background = pretrained is not None
    n_seg = int(getattr(seg, "config", {}).get("n_classes", len(CLASSES)))
    in_ch = 3 if drop_background else n_seg
    if pretrained is not None and in_ch != 3:
        raise ValueError("ImageNet weights need a 3-channel stem: use drop_background=True "
                         "(the paper's choice) or pretrained=None")
    head = getattr(torchvision.models, arch)(weights=None)
    n_features = head.fc.in_features
    head.fc = nn.Identity()
    state = _resolve_pretrained(pretrained, arch)
    if state is not None:
        _load_strict(head, _without_head(state), _source(pretrained, arch))
    if in_ch != 3:
        head.conv1 = nn.Conv2d(in_ch, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(head.conv1.weight, mode="fan_out", nonlinearity="relu")
    head.fc = nn.Linear(n_features, 1)
    config = {"kind": "sr", "arch": arch, "drop_background": bool(drop_background),
              "seg": dict(getattr(seg, "config", {}))}
    return SRModel(seg, head, drop_background, config, freeze_seg=freeze_seg)


# --------------------------------------------------------------------------------------------
# architecture summary (chapter 2)


def layer_table(model: nn.Module, size: int = 256) -> pd.DataFrame:
    """The model's main blocks in the order they run, with output shapes and parameter counts.

    Runs one ``(1, 3, size, size)`` zero image through ``model`` (in eval mode, no gradients) with
    forward hooks on the children of its ``encoder`` and ``decoder`` (the members of module lists
    one by one). Used in chapter 2 to print the architecture of paper Fig. 2.

    Returns
    -------
    pd.DataFrame
        Columns ``block``, ``type``, ``output`` (shape without the batch axis) and ``parameters``.
    """
    rows: list[dict] = []
    hooks = []

    def add(name: str, module: nn.Module) -> None:
        def hook(mod, _inp, out):
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else "-"
            rows.append({"block": name, "type": type(mod).__name__, "output": shape,
                         "parameters": sum(p.numel() for p in mod.parameters(recurse=True))})
        hooks.append(module.register_forward_hook(hook))

    parts = [(n, getattr(model, n)) for n in ("encoder", "decoder") if hasattr(model, n)]
    for part_name, part in parts or [("model", model)]:
        for name, child in part.named_children():
            if isinstance(child, nn.ModuleList):
                for i, member in enumerate(child):
                    add(f"{part_name}.{name}.{i}", member)
            else:
                add(f"{part_name}.{name}", child)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pd.DataFrame(rows)


def segment(model: nn.Module, img: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Sigmoid probability maps of a segmentation model for one RGB uint8 image.

    The image is scaled to [-1, 1] as in training (paper 4.2), reflect-padded to a multiple of 32
    and the maps cropped back, so any image size works. Used in chapters 2 and 3 (Figs. 4, 5, 7).

    Returns
    -------
    np.ndarray
        ``(4, H, W)`` float32 probabilities (normal, lymphocyte, malignant, background).
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"segment expects an (H, W, 3) RGB image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    x = torch.from_numpy(normalize_image(arr)).permute(2, 0, 1)[None]
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = torch.sigmoid(model(x.to(device)))[0, :, :h, :w]
    finally:
        model.train(was_training)
    return probs.float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# segmentation -> 81 features -> LightGBM, as one model (paper 3.3)


class GBTModel(nn.Module):
    """The GBT route as one model: segmentation net -> 81 features -> LightGBM (paper 3.3, 4.3).

    ``forward`` takes the same ``(B, 3, H, W)`` images in [-1, 1] as the other families and returns
    ``(B, 1)`` cellularity in [0, 1], so prediction treats every family alike. The booster is not
    trainable by gradient; fit it with :func:`cellulib.models.features.fit_gbt`. Used in chapter 3 through
    :func:`cellulib.training.train.train_gbt` and by
    ``cellulib predict``.
    """

    def __init__(self, seg: nn.Module, booster) -> None:
        super().__init__()
        self.seg = seg.eval()
        self.booster = booster
        self.config = {"kind": "gbt", "seg": dict(getattr(seg, "config", {}))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from cellulib.models.features import extract_features, predict_gbt

        _check_images(x, "the GBT model", multiple=STRIDE)
        self.seg.eval()
        # the features were computed from float32 maps at training: no autocast here
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            probs = torch.sigmoid(self.seg(_plain(x).float())).float().cpu().numpy()
        table = pd.DataFrame([extract_features(p) for p in probs])
        return torch.from_numpy(predict_gbt(self.booster, table).astype(np.float32)).reshape(-1, 1)

    def to_cellularity(self, output: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cellularity from this model's ``(B, 1)`` output."""
        return output.reshape(-1)
