"""The two U-Net baselines of the AH-Net paper, and an adapter that runs a 2D network on a volume.

* :class:`UNet3D` -- Çiçek et al. 2016, "3D U-Net: Learning Dense Volumetric Segmentation from
  Sparse Annotation", section 2 and fig. 1.
* :class:`UNet2D` -- Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical
  Image Segmentation", section 2 and fig. 1, fed with neighbouring slices stacked as channels.
* :class:`SliceStack2D` -- makes any 2D network with ``in_channels = n_slices`` callable on
  (N, 1, D, H, W) volumes; :class:`MultiSliceUNet2D` is it around a :class:`UNet2D`.

Both U-Nets share one builder (:class:`_UNet`) and one block factory (:func:`_double_conv`);
they differ only in their channel scheme. Every class is built from JSON-serialisable keyword
arguments only (``cls(**config)``, see :func:`TransferSegLib.nets.build_network`), and the
paper configuration is the default; small configurations for tests and demos use the same
arguments. ``size_multiple`` is a tuple with one int per spatial axis: every input size along
that axis must be a multiple of it (the sliding-window inferer pads to it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..volume import TransferSegError
from .checks import check_input
from .registry import register

__all__ = ["UNet3D", "UNet2D", "SliceStack2D", "MultiSliceUNet2D"]

NORMS = ("batch", "instance", "group")


def _norm(dims: int, norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2](channels)
    if norm == "instance":
        return (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2](channels, affine=True)
    # gcd keeps small configurations valid (8 channels -> 8 groups of 1).
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _double_conv(dims: int, cin: int, cmid: int, cout: int, norm: str) -> nn.Sequential:
    """Two 3×3(×3) convs, each followed by a norm and ReLU (3D U-Net sec. 2; U-Net sec. 2).

    padding=1 ("same") instead of the papers' valid convs, so that outputs align voxel-for-voxel
    with inputs and sliding windows tile without cropping.
    """
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    return nn.Sequential(
        conv(cin, cmid, 3, padding=1), _norm(dims, norm, cmid), nn.ReLU(inplace=True),
        conv(cmid, cout, 3, padding=1), _norm(dims, norm, cout), nn.ReLU(inplace=True),
    )


def _check_config(name: str, norm: str, **positive: int) -> None:
    if norm not in NORMS:
        raise TransferSegError(f"{name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    for arg, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise TransferSegError(f"{name}: {arg} must be a positive integer, got {value!r}")


class _Up(nn.Module):
    """Synthesis step: 2×2(×2) up-convolution, concatenation with the skip, double conv."""

    def __init__(self, dims: int, cin: int, cup: int, cskip: int, cout: int, norm: str):
        super().__init__()
        self.up = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2](cin, cup, 2, stride=2)
        self.conv = _double_conv(dims, cup + cskip, cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Skip first, as in both papers' figures (concatenation order fixes the weight layout).
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class _UNet(nn.Module):
    """Shared U-Net body: ``encoder[i]`` is level i (the last one is the bottom), each followed
    by a 2×2(×2) max pool except the bottom; ``decoder[i]`` climbs from the bottom to level
    ``levels - 2 - i``; ``head`` is the final 1×1(×1) conv to ``out_channels`` logits.

    ``encoder_channels`` lists (mid, out) per level; ``halve_up`` says whether the
    up-convolution halves its channels (2D U-Net) or keeps them (3D U-Net).
    """

    def __init__(self, dims, in_channels, out_channels, encoder_channels, halve_up, norm):
        super().__init__()
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels
        self.encoder = nn.ModuleList()
        cin = in_channels
        for cmid, cout in encoder_channels:
            self.encoder.append(_double_conv(dims, cin, cmid, cout, norm))
            cin = cout
        self.pool = (nn.MaxPool2d, nn.MaxPool3d)[dims - 2](2, stride=2)
        self.decoder = nn.ModuleList()
        for _, cskip in reversed(encoder_channels[:-1]):
            cup = cin // 2 if halve_up else cin
            self.decoder.append(_Up(dims, cin, cup, cskip, cskip, norm))
            cin = cskip
        self.head = (nn.Conv2d, nn.Conv3d)[dims - 2](cin, out_channels, 1)

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """Per spatial axis: inputs must be divisible by 2**(levels - 1) (one halving per pool)."""
        return (2 ** (len(self.encoder) - 1),) * self.dims

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": analysis path incl. bottom, "decoder": synthesis path incl. head}."""
        decoder = [*self.decoder.parameters(), *self.head.parameters()]
        return {"encoder": list(self.encoder.parameters()), "decoder": decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, self.in_channels, self.dims, self.size_multiple,
                    remedy="choose fewer levels")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x) if i else x)
            skips.append(x)
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)


@register("unet3d")
class UNet3D(_UNet):
    """3D U-Net (Çiçek et al. 2016, sec. 2, fig. 1): (N, in_channels, D, H, W) -> (N, out_channels, D, H, W) logits.

    Analysis level i (0-based) has convs base·2^i then base·2^(i+1) (paper: 32→64, 64→128,
    128→256, bottom 256→512), each conv + norm + ReLU, then a 2×2×2 max pool; synthesis: a
    2×2×2 up-convolution that keeps its channels, concatenation with the skip, two convs to the
    skip's channels (paper: 256+512→256→256, 128+256→128→128, 64+128→64→64), and a final
    1×1×1 conv. The paper configuration (in 3, out 3) has 19,075,523 parameters: the paper's
    19,069,955 plus 896 up-conv biases plus 4,672 BatchNorm weights and biases.

    D, H and W must each be a multiple of 2**(levels - 1) (8 for the paper); see ``size_multiple``.
    Deviation: padding=1 convs instead of valid ones, so outputs align voxel-for-voxel with
    inputs for sliding windows.

    Args: in_channels, out_channels; base_channels (paper 32); levels: resolution levels
    including the bottom (paper 4); norm: "batch" (paper), "instance" or "group".
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, base_channels: int = 32,
                 levels: int = 4, norm: str = "batch"):
        _check_config("UNet3D", norm, in_channels=in_channels, out_channels=out_channels,
                      base_channels=base_channels, levels=levels)
        channels = [(base_channels * 2**i, base_channels * 2 ** (i + 1)) for i in range(levels)]
        super().__init__(3, in_channels, out_channels, channels, halve_up=False, norm=norm)
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           base_channels=base_channels, levels=levels, norm=norm)


@register("unet2d")
class UNet2D(_UNet):
    """2D U-Net (Ronneberger et al. 2015, sec. 2, fig. 1): (N, in_channels, H, W) -> (N, out_channels, H, W) logits.

    For volumes, ``in_channels`` neighbouring slices are stacked as channels (3: slices k-1, k,
    k+1) and the network predicts the centre slice; :class:`MultiSliceUNet2D` does the
    stacking. Level i has two convs of base·2^i channels (paper 64, 128, 256, 512, 1024), each
    conv + norm + ReLU, a 2×2 max pool between levels, 2×2 up-convolutions that halve the
    channels, concatenation with the skip, two convs, and a final 1×1 conv. The paper
    configuration has 31,030,658 parameters for 1 input and 2 classes without norms
    (31,043,651 with in 3, out 3 and BatchNorm).

    H and W must each be a multiple of 2**(levels - 1) (16 for the paper); see ``size_multiple``.
    Deviations: padding=1 convs instead of valid ones (outputs align pixel-for-pixel with
    inputs); a norm after every conv (the 2015 paper had none; it trains faster and steadier).

    Args: in_channels (slices per stack), out_channels; base_channels (paper 64); levels
    (paper 5); norm: "batch", "instance" or "group".
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64,
                 levels: int = 5, norm: str = "batch"):
        _check_config("UNet2D", norm, in_channels=in_channels, out_channels=out_channels,
                      base_channels=base_channels, levels=levels)
        channels = [(base_channels * 2**i,) * 2 for i in range(levels)]
        super().__init__(2, in_channels, out_channels, channels, halve_up=True, norm=norm)
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           base_channels=base_channels, levels=levels, norm=norm)


class SliceStack2D(nn.Module):
    """Run a 2D network slice by slice on a volume: (N, 1, D, H, W) -> (N, K, D, H, W) logits.

    For every slice d the 2D network ``net`` sees slices d - n//2 … d + n//2 as channels
    (n = ``n_slices``, odd), with the indices clamped to the volume, so the first stack is
    (s0, s0, s1) and the last (s[D-2], s[D-1], s[D-1]) for n = 3 (as in H-DenseUNet's code).
    Stacks are built and run ``slice_batch`` at a time to bound memory; in training mode
    BatchNorm statistics are therefore per chunk of slices. The 2D network is the submodule
    ``net`` (state_dict keys ``net.…``).

    ``size_multiple`` is (1, m_H, m_W) from the 2D network's own ``size_multiple`` (1, 1 if it
    has none). ``parameter_groups`` delegates to the 2D network, or gives {"network": all}.
    """

    def __init__(self, net: nn.Module, n_slices: int | None = None, slice_batch: int = 16):
        super().__init__()
        n_slices = getattr(net, "in_channels", None) if n_slices is None else n_slices
        if not isinstance(n_slices, int) or n_slices < 1 or n_slices % 2 == 0:
            raise TransferSegError(
                f"SliceStack2D needs an odd number of slices centred on the predicted one, got {n_slices!r}"
            )
        if not isinstance(slice_batch, int) or slice_batch < 1:
            raise TransferSegError(f"slice_batch must be a positive integer, got {slice_batch!r}")
        self.net, self.n_slices, self.slice_batch = net, n_slices, slice_batch

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        multiple = getattr(self.net, "size_multiple", (1, 1))
        multiple = (multiple,) * 2 if isinstance(multiple, int) else tuple(multiple)
        return (1, *multiple[-2:])

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        if hasattr(self.net, "parameter_groups"):
            return self.net.parameter_groups()
        return {"network": list(self.net.parameters())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, 1, 3, self.size_multiple, remedy="choose fewer levels")
        n, _, depth, height, width = x.shape
        half = self.n_slices // 2
        offsets = torch.arange(-half, half + 1, device=x.device)
        # Flat index f = sample * depth + slice; chunked so only slice_batch stacks exist at once.
        outputs = []
        for start in range(0, n * depth, self.slice_batch):
            flat = torch.arange(start, min(start + self.slice_batch, n * depth), device=x.device)
            sample, centre = flat // depth, flat % depth
            neighbours = (centre[:, None] + offsets).clamp(0, depth - 1)
            outputs.append(self.net(x[sample[:, None], 0, neighbours]))
        y = torch.cat(outputs)
        return y.reshape(n, depth, *y.shape[1:]).transpose(1, 2)


@register("unet2d_multislice")
class MultiSliceUNet2D(SliceStack2D):
    """:class:`UNet2D` over stacks of ``in_channels`` neighbouring slices, callable on
    (N, 1, D, H, W) volumes (see :class:`SliceStack2D`); same arguments as :class:`UNet2D` plus
    ``slice_batch``. H and W must be multiples of 2**(levels - 1); D is free.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64,
                 levels: int = 5, norm: str = "batch", slice_batch: int = 16):
        super().__init__(UNet2D(in_channels, out_channels, base_channels, levels, norm),
                         slice_batch=slice_batch)
        self.config = dict(self.net.config, slice_batch=slice_batch)
