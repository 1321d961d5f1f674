"""MC-GCN: the multi-channel 2D global convolutional network whose encoder AH-Net inherits.

Liu et al. 2018, "3D Anisotropic Hybrid Network: Transferring Convolutional Features from 2D
Images to 3D Anisotropic Volumes" (AH-Net), sec. 3.1 and fig. 2; the GCN module and the
boundary refinement block are from Peng et al. 2017, "Large Kernel Matters -- Improve Semantic
Segmentation by Global Convolutional Network", sec. 3.1-3.2 and fig. 2.

* :class:`MCGCN` -- a torchvision ResNet (18/34/50/101, ``weights=None``) fed with three
  neighbouring slices as RGB channels, plus a light decoder of GCN modules, boundary
  refinement blocks and 1×1-conv + bilinear upsampling modules.
* :class:`GlobalConvolution` -- a K×K kernel simulated by 1×K + K×1 and K×1 + 1×K branches.
* :class:`BoundaryRefinement` -- two 3×3 convs with a ReLU between and a residual.
* :class:`MultiSliceMCGCN` -- an MC-GCN run slice by slice on (N, 1, D, H, W) volumes
  (:class:`~TransferSegLib.nets.unet.SliceStack2D`), so the shared trainer and inferer use it.

Kernel notation here is torch's (kH, kW): "K×1" is kernel (K, 1), i.e. K rows tall.
The encoder is the submodule ``encoder`` with torchvision's own names (``encoder.conv1``,
``encoder.layer3.5.bn2``, ...), so torchvision/ImageNet weights load by name
(:meth:`MCGCN.load_resnet_weights`) and :func:`TransferSegLib.nets.ahnet.transfer_mcgcn_to_ahnet`
finds every 3D counterpart by the same name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..volume import TransferSegError
from ..weights import read_state_dict
from .checks import check_input, check_positive
from .registry import register
from .unet import SliceStack2D

__all__ = ["MCGCN", "MultiSliceMCGCN", "GlobalConvolution", "BoundaryRefinement", "RESNET_BACKBONES"]

#: backbone name -> (residual blocks per stage, bottleneck?) -- He et al. 2016, table 1.
RESNET_BACKBONES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}

#: AH-Net sec. 3.1: GCN kernel sizes, one per encoder output in order conv1, max pool,
#: layer1 (res-1), layer2, layer3, layer4 -- the larger kernels at the finer resolutions.
PAPER_KERNEL_SIZES = (63, 31, 15, 9, 7, 5)


def check_backbone(name: str, backbone) -> None:
    if backbone not in RESNET_BACKBONES:
        raise TransferSegError(
            f"{name}: backbone must be one of {', '.join(RESNET_BACKBONES)}, got {backbone!r}"
        )


def encoder_channels(backbone: str) -> tuple[int, ...]:
    """Channels of the six encoder outputs (conv1, max pool, layer1 … layer4) of a ResNet."""
    expansion = 4 if RESNET_BACKBONES[backbone][1] else 1
    return (64, 64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)


def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, ...]) -> torch.Tensor:
    """Pad the trailing spatial axes on their high side up to a multiple, replicating the
    border voxels (as the sliding-window inferer's default ``pad_mode="edge"`` does)."""
    spatial = x.shape[-len(multiple):]
    extra = [-s % m for s, m in zip(spatial, multiple)]
    if not any(extra):
        return x
    pads = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pads += [0, e]
    return F.pad(x, pads, mode="replicate")


class GlobalConvolution(nn.Module):
    """GCN module (Peng et al. sec. 3.1, fig. 2(b)): a K×K receptive field from two 1D-kernel
    branches, (K×1 then 1×K) + (1×K then K×1), summed; ``padding = K // 2`` keeps the size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        k, p = kernel_size, kernel_size // 2
        self.left = nn.Sequential(nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, 0)),
                                  nn.Conv2d(out_channels, out_channels, (1, k), padding=(0, p)))
        self.right = nn.Sequential(nn.Conv2d(in_channels, out_channels, (1, k), padding=(0, p)),
                                   nn.Conv2d(out_channels, out_channels, (k, 1), padding=(p, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefinement(nn.Module):
    """Boundary refinement (Peng et al. sec. 3.2, fig. 2(c); AH-Net sec. 3.1): x + conv3×3(ReLU(conv3×3(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class _Up(nn.Module):
    """Fig. 2's "Up": a 1×1 conv projection, then bilinear upsampling to ``size``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=tuple(size), mode="bilinear", align_corners=False)


class ResNetEncoder2D(nn.Module):
    """A torchvision ResNet without its classifier, returning its six resolution levels:
    conv1 (after BN + ReLU, 1/2), max pool (1/4), layer1 (1/4), layer2 (1/8), layer3 (1/16),
    layer4 (1/32). Submodule names are torchvision's."""

    def __init__(self, backbone: str, in_channels: int):
        super().__init__()
        resnet = getattr(torchvision.models, backbone)(weights=None)
        if in_channels != 3:
            # Same init as torchvision's conv1; only the number of stacked slices differs.
            resnet.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        conv_x = self.relu(self.bn1(self.conv1(x)))
        features = [conv_x, self.maxpool(conv_x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            features.append(layer(features[-1]))
        return features


@register("mcgcn")
class MCGCN(nn.Module):
    """MC-GCN (AH-Net sec. 3.1, fig. 2): (N, in_channels, H, W) -> (N, out_channels, H, W) logits.

    The input is ``in_channels`` neighbouring slices stacked as channels (3: slices k-1, k, k+1
    as R, G, B), so an ImageNet ResNet is used unchanged. Decoder, from the deepest level up:
    each of the six encoder outputs (conv1, max pool, layer1 … layer4) goes through a GCN with
    kernel ``kernel_sizes[i]`` (paper 63, 31, 15, 9, 7, 5 in that order) to ``gcn_channels``
    maps and a boundary refinement (BR) block; from the second-deepest level on, it is summed
    with the "Up" (1×1 conv + bilinear) of the level below and refined by a second BR; a last
    Up (1×1 conv to ``out_channels``, bilinear) returns to the input size. So there are 6 GCN,
    11 BR and 6 Up modules.

    Size: any H, W works; inputs are edge-padded on the high side to ``size_multiple`` (32, 32)
    inside ``forward`` and the output is cropped back, so feature grids line up with AH-Net's.

    Parameters: the ResNet50 configuration with one output map (the DBT heatmap network) has
    23,572,292 and 105 conv layers (paper Table 2: 23,576,758 and 94, which is exactly the
    authors' code: five K = 7 GCNs (no GCN on layer1), ten refinement blocks with BatchNorm,
    Up without the 1×1 conv of fig. 2's caption, and an unused 256→64 conv).

    Args:
        in_channels: stacked slices, odd (paper 3 = RGB).
        out_channels: classes (or 1 for a heatmap).
        backbone: "resnet18", "resnet34", "resnet50" (paper) or "resnet101".
        kernel_sizes: six odd GCN kernel sizes (paper 63, 31, 15, 9, 7, 5); small ones for demos.
        gcn_channels: maps per GCN/BR; None = ``out_channels`` (paper: "the same number of output
            maps as the final outputs").
        pretrained_backbone: path to a safetensors file holding a torchvision ResNet state dict
            (e.g. ImageNet weights converted once); loaded at construction. Not kept in
            ``config``: a trained network's card carries all its weights.
    """

    size_multiple = (32, 32)

    def __init__(self, in_channels: int = 3, out_channels: int = 2, backbone: str = "resnet50",
                 kernel_sizes=PAPER_KERNEL_SIZES, gcn_channels: int | None = None,
                 pretrained_backbone: str | None = None):
        super().__init__()
        check_backbone("MCGCN", backbone)
        check_positive("MCGCN", in_channels=in_channels, out_channels=out_channels)
        if in_channels % 2 == 0:
            raise TransferSegError(
                f"MCGCN: in_channels (stacked slices) must be odd, centred on the predicted slice; got {in_channels}")
        kernel_sizes = list(kernel_sizes)
        if len(kernel_sizes) != 6 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise TransferSegError(
                f"MCGCN: kernel_sizes must be six odd positive integers (paper 63, 31, 15, 9, 7, 5); got {kernel_sizes}")
        if gcn_channels is not None:
            check_positive("MCGCN", gcn_channels=gcn_channels)
        width = out_channels if gcn_channels is None else gcn_channels
        self.in_channels, self.out_channels, self.backbone = in_channels, out_channels, backbone
        self.config = dict(in_channels=in_channels, out_channels=out_channels, backbone=backbone,
                           kernel_sizes=kernel_sizes, gcn_channels=gcn_channels)

        self.encoder = ResNetEncoder2D(backbone, in_channels)
        channels = encoder_channels(backbone)
        self.gcn = nn.ModuleList(GlobalConvolution(c, width, k) for c, k in zip(channels, kernel_sizes))
        self.refine = nn.ModuleList(BoundaryRefinement(width) for _ in channels)
        self.fuse_refine = nn.ModuleList(BoundaryRefinement(width) for _ in channels[:-1])
        self.up = nn.ModuleList(_Up(width, width) for _ in channels[:-1])
        self.head = _Up(width, out_channels)
        if pretrained_backbone is not None:
            self.load_resnet_weights(read_state_dict(pretrained_backbone))

    def load_resnet_weights(self, state_dict: dict) -> None:
        """Load a torchvision ResNet state dict (its ``fc.*`` classifier is ignored) into the encoder, strictly."""
        state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        try:
            self.encoder.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise TransferSegError(
                f"these weights are not a torchvision {self.backbone} with {self.in_channels} input channels: {detail}"
            ) from None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": the ResNet backbone, "decoder": GCN, BR and Up modules}."""
        encoder = list(self.encoder.parameters())
        decoder = [p for m in (self.gcn, self.refine, self.fuse_refine, self.up, self.head) for p in m.parameters()]
        return {"encoder": encoder, "decoder": decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("MCGCN", x, self.in_channels, dims=2)
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_multiple)
        features = self.encoder(x)
        # The deepest level has no lower level to sum with, hence no second BR (as Peng et al. fig. 2).
        y = self.refine[-1](self.gcn[-1](features[-1]))
        for i in reversed(range(len(features) - 1)):
            lateral = self.refine[i](self.gcn[i](features[i]))
            y = self.fuse_refine[i](lateral + self.up[i](y, features[i].shape[2:]))
        y = self.head(y, x.shape[2:])
        return y[..., : size[0], : size[1]]


@register("mcgcn_multislice")
class MultiSliceMCGCN(SliceStack2D):
    """:class:`MCGCN` over stacks of ``in_channels`` neighbouring slices, callable on
    (N, 1, D, H, W) volumes (see :class:`~TransferSegLib.nets.unet.SliceStack2D`): slice d's
    output comes from slices d - 1, d, d + 1 as R, G, B (AH-Net sec. 3.1), clamped at the ends.
    Same arguments as :class:`MCGCN` plus ``slice_batch``; ``size_multiple`` is (1, 32, 32).
    The MC-GCN is the submodule ``net``, which :func:`~TransferSegLib.nets.ahnet.transfer_mcgcn_to_ahnet` takes.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, backbone: str = "resnet50",
                 kernel_sizes=PAPER_KERNEL_SIZES, gcn_channels: int | None = None,
                 pretrained_backbone: str | None = None, slice_batch: int = 16):
        super().__init__(MCGCN(in_channels, out_channels, backbone, kernel_sizes, gcn_channels, pretrained_backbone),
                         slice_batch=slice_batch)
        self.config = dict(self.net.config, slice_batch=slice_batch)
