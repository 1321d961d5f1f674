"""AH-Net: the 3D anisotropic hybrid network, and the transfer of an MC-GCN encoder into it.

Liu et al. 2018, "3D Anisotropic Hybrid Network: Transferring Convolutional Features from 2D
Images to 3D Anisotropic Volumes", sec. 3.2 (transfer, eqs. (1)-(3), fig. 4), sec. 3.3
(decoder, fig. 3), Table 2 (parameter counts).

* :class:`AHNet` -- the ResNet encoder made 3D with in-plane kernels, AH-downsampling, a
  decoder of densely connected anisotropic blocks with LinkNet-style summed skips, and
  pyramid volumetric pooling.
* :func:`transfer_mcgcn_to_ahnet` -- builds an AH-Net whose encoder is a trained
  :class:`~TransferSegLib.nets.mcgcn.MCGCN`'s encoder, every weight and every BatchNorm
  running statistic copied (the original code and MONAI copy only BN weight and bias).

Notation: the paper writes kernels and strides as x × y × z with z between slices; the code
uses torch's (D, H, W) with D = z. Comments say "paper" or "torch" where they give sizes, e.g.
paper 3×3×1 = torch (1, 3, 3); paper 1×1×3 = torch (3, 1, 1); paper /(2, 2, 1) = torch (1, 2, 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..volume import TransferSegError
from .checks import check_input, check_positive
from .mcgcn import MCGCN, RESNET_BACKBONES, check_backbone, encoder_channels, pad_to_multiple
from .registry import register

__all__ = ["AHNet", "transfer_mcgcn_to_ahnet"]

PAPER_PSP_SIZES = (64, 32, 16, 8)


class _Conv3d(nn.Conv3d):
    """An ``nn.Conv3d`` whose spatial kernels always run oneDNN on the CPU (float32). Performance
    only: PyTorch picks its im2col fallback when N·C·D·H ≤ 20480 (a rule written for NCHW),
    which, with D before H, hits every in-plane conv of a batch-1 volume below the first level:
    2-4× slower (bench/ahnet.py). 1×1×1 kernels keep PyTorch's choice (a plain matrix product,
    faster than oneDNN there). Same weights, same results, autograd included."""

    def _conv_forward(self, x, weight, bias):
        if (self.kernel_size != (1, 1, 1) and x.device.type == "cpu" and x.dtype == torch.float32
                and self.padding_mode == "zeros"
                and torch.backends.mkldnn.is_available() and not _cpu_autocast_enabled()):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation,
                                                     self.groups)
        return super()._conv_forward(x, weight, bias)


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def _conv_bn(conv: nn.Conv3d, bn: nn.BatchNorm3d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode one convolution with the BatchNorm folded into its weights
    (performance only: the same affine map, one pass over the feature map fewer)."""
    if bn.training or bn.running_var is None:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1, 1), shift)


class _ZPool(nn.Module):
    """AH-Net sec. 3.2.2-3.2.3: paper MaxPool 1×1×2/(1, 1, 2) = torch (2, 1, 1), the max over slice
    pairs (2d, 2d + 1), an odd last slice dropped as ``nn.MaxPool3d`` does; an elementwise
    maximum, several times faster on the CPU than max_pool3d's indexed kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even = x.shape[2] - x.shape[2] % 2
        return torch.maximum(x[:, :, 0:even:2], x[:, :, 1:even:2])


def _z_pool() -> _ZPool:
    return _ZPool()


class _MaxPool3Stride2(nn.Module):
    """``nn.MaxPool3d(3, stride=2, padding=1)`` (paper MaxPool 3×3×3/(2, 2, 2)) computed as three
    1D passes of elementwise maxima, one per axis (a box maximum is separable); the same values,
    about 3× faster on the CPU than max_pool3d's indexed kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dim in (2, 3, 4):
            pad = [0] * 6
            pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1  # F.pad lists the last axis first
            padded = F.pad(x, pad, value=float("-inf"))
            n = (x.shape[dim] - 1) // 2 + 1

            def window(offset):
                index = [slice(None)] * 5
                index[dim] = slice(offset, offset + 2 * n - 1, 2)
                return padded[tuple(index)]

            x = torch.maximum(torch.maximum(window(0), window(1)), window(2))
        return x


def _inplane_max_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.max_pool3d(x, (1, s, s), stride=(1, s, s), ceil_mode=True)`` for s = ``size``: pad H and W
    with -inf to multiples of s, then a max over W-windows and over H-windows (faster on the CPU)."""
    n, c, d, h, w = x.shape
    pad_h, pad_w = -h % size, -w % size
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=float("-inf"))
    x = x.reshape(n, c, d, h + pad_h, (w + pad_w) // size, size).amax(dim=-1)
    return x.reshape(n, c, d, (h + pad_h) // size, size, (w + pad_w) // size).amax(dim=-2)


def _inplane_conv(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    # Eq. (3): a 2D 3×3 conv becomes paper 3×3×1 / torch (1, 3, 3), stride paper (s, s, 1) / torch (1, s, s).
    return _Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)


def _ah_downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The shortcut's AH-Downsample (sec. 3.2.3, fig. 3): paper Conv 1×1×1/(2, 2, 1), BN, then
    MaxPool 1×1×2/(1, 1, 2); indices 0 and 1 are torchvision's ``downsample.0`` and ``.1``.
    BN sits before the z pool (the original code pools first) so the transferred conv + BN pair
    stays intact; both orders agree whenever the BN scale is positive."""
    if stride == 1 and cin == cout:
        return None
    layers = [_Conv3d(cin, cout, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(cout)]
    return nn.Sequential(*layers, _z_pool()) if stride != 1 else nn.Sequential(*layers)


class _AHBlock(nn.Module):
    """A torchvision ResNet block made 3D by eqs. (2)-(3): 1×1 -> 1×1×1, 3×3 -> paper 3×3×1.

    Bottleneck (ResNet50/101): conv1 1×1×1, conv2 3×3×1 (strided in-plane, as torchvision
    v1.5), conv3 1×1×1; basic (ResNet18/34): conv1 3×3×1 (strided), conv2 3×3×1. A
    downsampling block halves z as well (sec. 3.2.3): its main path ends in the 1×1×2 max pool
    before the residual sum (as in the authors' code), its shortcut is the AH-Downsample.
    So each branch is the 2D branch applied slice by slice, then a max over slice pairs.
    """

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1 = _Conv3d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm3d(planes)
            self.conv2 = _inplane_conv(planes, planes, stride)
            self.bn2 = nn.BatchNorm3d(planes)
            self.conv3 = _Conv3d(planes, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm3d(cout)
        else:
            self.conv1 = _inplane_conv(cin, planes, stride)
            self.bn1 = nn.BatchNorm3d(planes)
            self.conv2 = _inplane_conv(planes, planes)
            self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _ah_downsample(cin, cout, stride)
        self.zpool = _z_pool() if stride != 1 else None
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(_conv_bn(self.conv1, self.bn1, x))
        out = _conv_bn(self.conv2, self.bn2, out)
        if self.bottleneck:
            out = _conv_bn(self.conv3, self.bn3, self.relu(out))
        if self.zpool is not None:
            out = self.zpool(out)
        identity = x
        if self.downsample is not None:
            identity = _conv_bn(self.downsample[0], self.downsample[1], x)
            for pool in self.downsample[2:]:
                identity = pool(identity)
        out += identity  # in place, as torchvision's blocks: no backward needs ``out`` itself
        return self.relu(out)


class AHEncoder3D(nn.Module):
    """The AH-Net encoder (sec. 3.2, fig. 3), with torchvision's submodule names so that every
    2D module has its 3D counterpart under the same name.

    Input layer, sec. 3.2.2: paper Conv 7×7×3/(2, 2, 1) = torch kernel (S, 7, 7), stride
    (1, 2, 2), padding (S//2, 3, 3) with S = ``stem_slices`` (paper 3), BN, ReLU, paper MaxPool
    1×1×2/(1, 1, 2) = torch (2, 1, 1), then paper MaxPool 3×3×3/(2, 2, 2) = torch (3, 3, 3),
    stride 2, padding 1. BN + ReLU come before the z pool (the original code pools first) so the
    transferred conv1 + bn1 unit is unchanged; max commutes with ReLU and with a BN of positive scale.

    ``forward`` returns the six levels conv1 (1/2 in z, y, x), max pool (1/4), layer1 (1/4),
    layer2 (1/8), layer3 (1/16), layer4 (1/32): z is halved exactly as often as x and y.
    """

    def __init__(self, backbone: str, in_channels: int, stem_slices: int):
        super().__init__()
        blocks, bottleneck = RESNET_BACKBONES[backbone]
        self.conv1 = _Conv3d(in_channels, 64, (stem_slices, 7, 7), stride=(1, 2, 2),
                             padding=(stem_slices // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.zpool = _z_pool()
        self.maxpool = _MaxPool3Stride2()
        cin = 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layer = []
            for b in range(n):
                layer.append(_AHBlock(cin, planes, 2 if (i > 0 and b == 0) else 1, bottleneck))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        conv_x = self.zpool(self.relu(_conv_bn(self.conv1, self.bn1, x)))
        features = [conv_x, self.maxpool(conv_x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            features.append(layer(features[-1]))
        return features


def _pre_activated(cin: int, cout: int, kernel=1, padding=0) -> nn.Sequential:
    """BN, ReLU, conv (the decoder's order, as DenseNet's; the paper's figures hide BN and ReLU)."""
    return nn.Sequential(nn.BatchNorm3d(cin), nn.ReLU(inplace=True),
                         _Conv3d(cin, cout, kernel, padding=padding, bias=False))


class _AnisotropicLayer(nn.Module):
    """One anisotropic convolution block of the AH-Net decoder (sec. 3.3, fig. 3).

    Exact wiring, g = ``growth_rate``, b = ``bottleneck_factor`` (paper g = 20, b = 4):

        h = conv 3×3×1 (b·g -> g) of conv 1×1×1 (C -> b·g) of x       xy bottleneck, part 1
        h = h + conv 1×1×3 (g -> g) of h                               "summed with itself"
        new = conv 1×1×1 (g -> g) of h                                 closes both bottlenecks
        return concat(x, new)                                          dense connection

    (paper notation; torch kernels (1, 1, 1), (1, 3, 3), (3, 1, 1), (1, 1, 1); each conv is
    preceded by BN + ReLU). "Summed with itself" is a residual around the z conv: the 1×1×3
    conv's output is added to its own input, the 3×3×1 features, so the in-plane features pass
    on intact and the z conv only adds between-slice context. The xy bottleneck (3×3×1 between
    two 1×1×1) and the z bottleneck (1×1×3 in the middle) share the closing 1×1×1: four convs
    per block, as Table 2's 123 conv layers require (53 encoder + 15 × 4 + 5 projections + 4
    pyramid + 1 final) and as the authors' code has.
    """

    def __init__(self, cin: int, growth_rate: int, bottleneck_factor: int):
        super().__init__()
        width = bottleneck_factor * growth_rate
        self.reduce = _pre_activated(cin, width)                                      # paper 1×1×1
        self.inplane = _pre_activated(width, growth_rate, (1, 3, 3), (0, 1, 1))       # paper 3×3×1
        self.between = _pre_activated(growth_rate, growth_rate, (3, 1, 1), (1, 0, 0))  # paper 1×1×3
        self.expand = _pre_activated(growth_rate, growth_rate)                         # paper 1×1×1

    def new_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inplane(self.reduce(x))
        z = self.between(h)
        z += h  # h + between(h), in place on the conv output (which no backward needs)
        return self.expand(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.new_features(x)], dim=1)


def _dense_block(layers: nn.Sequential, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``layers(y + skip)`` for densely connected :class:`_AnisotropicLayer` blocks. Without
    autograd (inference), the sum and each layer's new maps are written once into one buffer
    instead of concatenating everything again after every layer (performance only)."""
    if torch.is_grad_enabled():
        y += skip  # in place on a fresh conv or interpolation output
        return layers(y)
    channels, growth = y.shape[1], layers[0].expand[-1].out_channels
    out = y.new_empty((y.shape[0], channels + len(layers) * growth, *y.shape[2:]))
    torch.add(y, skip, out=out[:, :channels])
    for layer in layers:
        out[:, channels:channels + growth] = layer.new_features(out[:, :channels])
        channels += growth
    return out


class _PyramidVolumetricPooling(nn.Module):
    """Sec. 3.3: paper MaxPool s×s×1 (torch (1, s, s), stride (1, s, s)) for each s in ``sizes``
    (paper 64, 32, 16, 8), a 1×1×1 conv to one channel, trilinear interpolation back to the
    input's size; returns the responses concatenated (one channel per size).
    Windows overhanging the border are clipped (``ceil_mode``; unspecified in the paper): the
    authors' code drops the remainder (a 96-wide map meets one 64 window, its last 32 columns
    none) and a map smaller than a window gives no output at all; clipped, every voxel counts.
    A window size that a smaller one divides is pooled from that one's output (the clipped
    windows nest exactly), so the full-resolution map is read once.
    """

    def __init__(self, cin: int, sizes):
        super().__init__()
        self.sizes = list(sizes)
        self.projections = nn.ModuleList(_Conv3d(cin, 1, 1) for _ in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = {}
        for s in sorted(set(self.sizes)):
            finer = max((p for p in pooled if s % p == 0), default=None)
            pooled[s] = _inplane_max_pool(x, s) if finer is None else _inplane_max_pool(pooled[finer], s // finer)
        return torch.cat([F.interpolate(proj(pooled[s]), size=x.shape[2:], mode="trilinear", align_corners=False)
                          for s, proj in zip(self.sizes, self.projections)], dim=1)


@register("ahnet")
class AHNet(nn.Module):
    """3D AH-Net (sec. 3.2-3.3, fig. 3): (N, in_channels, D, H, W) -> (N, out_channels, D, H, W) logits.

    Encoder: :class:`AHEncoder3D` (the MC-GCN's ResNet with eqs. (1)-(3) and AH-Downsample).
    Decoder, from layer4 up (sec. 3.3): at each of the five finer encoder levels (layer3,
    layer2, layer1, max pool, conv1) the decoder features are projected by a 1×1×1 conv to the
    level's channels, trilinearly upsampled to its size (LinkNet style; no upsampling between
    layer1 and the max pool, which share a resolution), summed with the encoder features and
    passed through ``dense_layers`` densely connected :class:`_AnisotropicLayer` blocks (paper
    3). Then pyramid volumetric pooling (:class:`_PyramidVolumetricPooling`) is concatenated
    with the features, and a final 1×1×1 projection to ``out_channels`` is trilinearly
    upsampled from the conv1 level (1/2) to the input size.

    Size: the encoder halves D, H and W five times each, so ``size_multiple`` is (32, 32, 32);
    ``forward`` edge-pads any other size on the high side to it and crops the output back.

    Parameters: ResNet50 with one output map (DBT heatmap) has 27,084,476 -- the paper's
    Table 2 27,085,500 minus 1,024 because the final projection here is 1×1×1 as sec. 3.3 says
    (the authors' code, which Table 2 counts, uses a 3×3×1 conv: 128 · (9 - 1) · 1 more).

    Args:
        in_channels: volume channels (1 for CT/DBT; must be 1 for :func:`transfer_mcgcn_to_ahnet`).
        out_channels: classes (or 1 for a heatmap).
        backbone: "resnet18", "resnet34", "resnet50" (paper) or "resnet101"; the MC-GCN's.
        stem_slices: depth of the input-layer kernel = the MC-GCN's stacked slices (paper 3).
        growth_rate, dense_layers, bottleneck_factor: the anisotropic blocks' new channels per
            layer, layers per resolution and 1×1×1 widening (paper 20, 3, 4).
        psp_sizes: in-plane pyramid pooling windows (paper 64, 32, 16, 8); [] for none.
    """

    size_multiple = (32, 32, 32)

    def __init__(self, in_channels: int = 1, out_channels: int = 2, backbone: str = "resnet50",
                 stem_slices: int = 3, growth_rate: int = 20, dense_layers: int = 3,
                 bottleneck_factor: int = 4, psp_sizes=PAPER_PSP_SIZES):
        super().__init__()
        check_backbone("AHNet", backbone)
        check_positive("AHNet", in_channels=in_channels, out_channels=out_channels, stem_slices=stem_slices,
                       growth_rate=growth_rate, dense_layers=dense_layers, bottleneck_factor=bottleneck_factor)
        if stem_slices % 2 == 0:
            raise TransferSegError(f"AHNet: stem_slices must be odd (centred on the output slice), got {stem_slices}")
        psp_sizes = list(psp_sizes)
        check_positive("AHNet", **{f"psp_sizes[{i}]": s for i, s in enumerate(psp_sizes)})
        self.in_channels, self.out_channels, self.backbone = in_channels, out_channels, backbone
        self.config = dict(in_channels=in_channels, out_channels=out_channels, backbone=backbone,
                           stem_slices=stem_slices, growth_rate=growth_rate, dense_layers=dense_layers,
                           bottleneck_factor=bottleneck_factor, psp_sizes=psp_sizes)

        self.encoder = AHEncoder3D(backbone, in_channels, stem_slices)
        channels = encoder_channels(backbone)
        self.project = nn.ModuleList()
        self.dense = nn.ModuleList()
        cin = channels[-1]
        for skip in reversed(channels[:-1]):
            self.project.append(_pre_activated(cin, skip))
            layers = [_AnisotropicLayer(skip + i * growth_rate, growth_rate, bottleneck_factor)
                      for i in range(dense_layers)]
            self.dense.append(nn.Sequential(*layers))
            cin = skip + dense_layers * growth_rate
        self.pyramid = _PyramidVolumetricPooling(cin, psp_sizes) if psp_sizes else None
        self.final = _pre_activated(cin + len(psp_sizes), out_channels)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": the transferred ResNet (frozen in the first training stage, sec. 3.4),
        "decoder": projections, anisotropic blocks, pyramid pooling and final projection}."""
        decoder = [p for name, p in self.named_parameters() if not name.startswith("encoder.")]
        return {"encoder": list(self.encoder.parameters()), "decoder": decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("AHNet", x, self.in_channels, dims=3)
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_multiple)
        features = self.encoder(x)
        y = features[-1]
        for skip, project, dense in zip(reversed(features[:-1]), self.project, self.dense):
            y = project(y)
            if y.shape[2:] != skip.shape[2:]:
                y = F.interpolate(y, size=skip.shape[2:], mode="trilinear", align_corners=False)
            y = _dense_block(dense, y, skip)
        if self.pyramid is not None:
            y = torch.cat([self.pyramid(y), y], dim=1)
        y = F.interpolate(self.final(y), size=x.shape[2:], mode="trilinear", align_corners=False)
        return y[..., : size[0], : size[1], : size[2]]


def transfer_mcgcn_to_ahnet(mcgcn: MCGCN, **ahnet_kwargs) -> AHNet:
    """A new :class:`AHNet` (``ahnet_kwargs`` as its arguments; backbone and stem_slices from
    the MC-GCN) whose encoder is ``mcgcn``'s encoder made 3D (sec. 3.2, fig. 4), matched by name:

    * input layer, eq. (1), P(1,*,3,4,2): the 2D weight (64, S, 7, 7) becomes torch
      (64, 1, S, 7, 7) -- the 2D input channel c becomes kernel depth c -- so on a volume it
      equals the 2D conv1 on the stacks of slices d - S//2 … d + S//2 (zeros beyond the ends);
    * every other conv, eqs. (2)-(3): (n, m, k, k) -> torch (n, m, 1, k, k) = paper k×k×1;
    * every BatchNorm2d -> BatchNorm3d with weight, bias, running_mean, running_var and
      num_batches_tracked (so eval-mode outputs match, unlike the original code and MONAI).

    The decoder stays freshly initialised; the result has ``mcgcn``'s train/eval mode.
    """
    if not isinstance(mcgcn, MCGCN):
        raise TransferSegError(f"transfer_mcgcn_to_ahnet needs an MCGCN, got {type(mcgcn).__name__}")
    fixed = {"backbone": mcgcn.backbone, "stem_slices": mcgcn.in_channels}
    for key, value in fixed.items():
        if key in ahnet_kwargs and ahnet_kwargs[key] != value:
            raise TransferSegError(
                f"the AH-Net's {key} must be the MC-GCN's ({value!r}), got {ahnet_kwargs[key]!r}")
    if ahnet_kwargs.get("in_channels", 1) != 1:
        raise TransferSegError("eq. (1) turns the MC-GCN's stacked slices into kernel depth; the AH-Net needs in_channels=1")
    ahnet = AHNet(**{**ahnet_kwargs, **fixed})
    targets = dict(ahnet.encoder.named_modules())
    copied = set()
    with torch.no_grad():
        for name, m2 in mcgcn.encoder.named_modules():
            if isinstance(m2, nn.Conv2d):
                m3 = targets.get(name)
                if not isinstance(m3, nn.Conv3d) or m3.stride[1:] != m2.stride or m3.padding[1:] != m2.padding:
                    raise TransferSegError(f"MC-GCN conv {name!r} has no matching AH-Net conv")
                # Eq. (1) for the input layer (channels -> depth), eqs. (2)-(3) for the rest (depth 1).
                weight = m2.weight.unsqueeze(1) if name == "conv1" else m2.weight.unsqueeze(2)
                if m3.weight.shape != weight.shape:
                    raise TransferSegError(
                        f"{name}: 2D weight {tuple(m2.weight.shape)} does not fit AH-Net's {tuple(m3.weight.shape)}")
                m3.weight.copy_(weight)
                copied.add(name)
            elif isinstance(m2, nn.BatchNorm2d):
                m3 = targets.get(name)
                if not isinstance(m3, nn.BatchNorm3d) or m3.eps != m2.eps:
                    raise TransferSegError(f"MC-GCN BatchNorm {name!r} has no matching AH-Net BatchNorm")
                m3.load_state_dict(m2.state_dict(), strict=True)
                copied.add(name)
    missed = [n for n, m in targets.items() if isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) and n not in copied]
    if missed:
        raise TransferSegError(f"AH-Net encoder modules without a 2D source: {', '.join(missed)}")
    return ahnet.train(mcgcn.training)
