"""The Volumetric Fusion Net (Xia et al. 2018, "Bridging the gap between 2D and 3D organ
segmentation with Volumetric Fusion Net", sec. 2.2, fig. 1): a shallow 3D network that fuses
three per-view 2D segmentations, and the image they came from, into one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..volume import TransferSegError
from .registry import register

__all__ = ["VFN"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _deconv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # 4×4×4, stride 2, padding 1: exactly doubles each axis
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


@register("vfn")
class VFN(nn.Module):
    """(N, in_channels, D, H, W) → (N, out_channels, D, H, W) logits.

    The input is the image and the three views' predictions, each in [0, 1] (paper: 4 channels,
    the CT and three organ probabilities; for liver and tumor, 1 + 3 · 2 channels, each view's
    P(label ≥ 1) and P(label ≥ 2)).  Three down stages, each two 3×3×3 convs and a 2×2×2
    max-pool (stride 2), with ``channels`` 16, 32, 64; three up stages, each one 4×4×4 stride-2
    deconv; every conv and deconv is followed by BatchNorm and ReLU.  Three additive highway
    connections join the same scales (official model): the first up stage's output is added to
    the third down stage's features, the second's to the second's, and the last up stage
    returns to ``in_channels`` and is added to the raw input itself, so the 2D predictions pass
    straight through and the network learns a correction.  Then BatchNorm + ReLU and a 1×1×1
    conv to ``out_channels`` (1: a sigmoid organ map, as in the paper; K: softmax classes).

    D, H and W must each be a multiple of 8 (three 2× poolings); the paper trains on 64³
    patches, where an output voxel sees at most ~50³ input voxels.  All weights start as random
    noise (paper sec. 2.3).

    ``view_prior`` (deviation, off at paper settings): the log of the three views' mean class
    probabilities is added to the output logits, so the network starts from the views' soft vote
    and learns a correction; it needs the input laid out by :func:`fusion.fusion_input` (the last
    3 (K − 1) channels are each view's P(label ≥ c)).  Why: with a small tumor class and a few
    hundred CPU iterations (the paper: 30,000 at batch 16), the plain network never raised the
    tumor above 0.2 (tumor Dice 0), with SGD + Dice as in the paper or Adam + CE + Dice.

    Args: in_channels (paper 4), out_channels (paper 1), channels (paper (16, 32, 64)), view_prior.
    """

    size_multiple = (8, 8, 8)

    def __init__(self, in_channels: int = 4, out_channels: int = 1, channels=(16, 32, 64), view_prior: bool = False):
        super().__init__()
        channels = tuple(channels)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise TransferSegError(f"VFN {name} must be a positive whole number; got {value!r}")
        if len(channels) != 3 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise TransferSegError(f"VFN channels are three positive whole numbers (paper 16, 32, 64); got {channels!r}")
        c1, c2, c3 = channels
        if not isinstance(view_prior, bool):
            raise TransferSegError(f"VFN view_prior is true or false; got {view_prior!r}")
        if view_prior and (out_channels < 2 or in_channels < 3 * (out_channels - 1)):
            raise TransferSegError(f"VFN view_prior needs K ≥ 2 output classes and the three views' K − 1 nested "
                                   f"probabilities as the last 3 (K − 1) input channels; got in_channels "
                                   f"{in_channels}, out_channels {out_channels}")
        self.in_channels, self.out_channels, self.view_prior = in_channels, out_channels, view_prior
        self.down1 = nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1))
        self.down2 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2))
        self.down3 = nn.Sequential(_conv_bn_relu(c2, c3), _conv_bn_relu(c3, c3))
        self.pool = nn.MaxPool3d(2, stride=2)
        self.up3 = _deconv_bn_relu(c3, c3)  # 1/8 → 1/4, + down3 features
        self.up2 = _deconv_bn_relu(c3, c2)  # 1/4 → 1/2, + down2 features
        self.up1 = _deconv_bn_relu(c2, in_channels)  # 1/2 → 1, + the raw input
        self.head = nn.Sequential(nn.BatchNorm3d(in_channels), nn.ReLU(inplace=True),
                                  nn.Conv3d(in_channels, out_channels, 1))
        self.config = dict(in_channels=in_channels, out_channels=out_channels, channels=list(channels))
        if view_prior:
            self.config["view_prior"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise TransferSegError(f"VFN expects (N, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        bad = [n for n in x.shape[2:] if n % 8]
        if bad:
            raise TransferSegError(f"VFN needs D, H and W to be multiples of 8 (three 2× poolings); got "
                                   f"{' × '.join(str(n) for n in x.shape[2:])}: pad or crop the input")
        f1 = self.down1(x)  # full size
        f2 = self.down2(self.pool(f1))  # 1/2
        f3 = self.down3(self.pool(f2))  # 1/4
        bottom = self.pool(f3)  # 1/8
        y = self.up3(bottom) + f3
        y = self.up2(y) + f2
        y = self.up1(y) + x
        logits = self.head(y)
        if self.view_prior:
            logits = logits + self._log_view_mean(x)
        return logits

    def _log_view_mean(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mean over the three views of their class probabilities, from each view's
        nested P(label ≥ c), c = 1 … K − 1 (the last 3 (K − 1) input channels)."""
        k = self.out_channels
        views = x[:, -3 * (k - 1):].float().clamp(0.0, 1.0).reshape(x.shape[0], 3, k - 1, *x.shape[2:])
        at_least = torch.cat([torch.ones_like(views[:, :, :1]), views, torch.zeros_like(views[:, :, :1])], dim=2)
        at_least = torch.cummin(at_least, dim=2).values  # nested: P(≥ c) never grows with c
        classes = (at_least[:, :, :-1] - at_least[:, :, 1:]).mean(dim=1)
        return torch.log(classes.clamp_min(1e-3))
