"""H-DenseUNet: the 2D DenseUNet on adjacent slices, the 3D DenseUNet, and their hybrid feature fusion (HFF).

Li et al. 2018, "H-DenseUNet: Hybrid Densely Connected UNet for Liver and Tumor Segmentation
from CT Volumes", IEEE TMI, sec. III-A (the transformation F and its inverse), sec. III-B
(HFF, fig. 2(a)); the choices the paper leaves open follow the official Keras code
(``hybridnet.py``): the 2D logits enter the 3D network multiplied by 250, and the fusion is
conv 3×3×3 → dropout 0.3 → BN → ReLU → conv 1×1×1.

* :func:`to_adjacent_slices` (F) and :func:`from_adjacent_slices` (F⁻¹).
* :class:`HDenseUNet` -- (N, 1, D, H, W) → (N, 3, D, H, W) HFF logits; ``heads=True`` also
  gives the 2D network's logits, for the joint loss L_total = λ·L(2D) + L(HFF) (sec. III-C).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..volume import TransferSegError
from .registry import register
from . import denseunet
from .denseunet import *  # noqa: F401,F403  (re-exported: nets/__init__ star-imports this module only)
from .checks import check_input
from .denseunet import DenseUNet2D, DenseUNet3D

__all__ = ["HDenseUNet", "to_adjacent_slices", "from_adjacent_slices", *denseunet.__all__]


def to_adjacent_slices(x: torch.Tensor) -> torch.Tensor:
    """F (sec. III-A, fig. 2(b)): (N, 1, D, H, W) → (N·D, 3, H, W), row n·D + d = slices d-1, d, d+1
    of volume n as channels; at the ends the edge slice repeats: (s0, s0, s1) … (s[D-2], s[D-1], s[D-1])
    (official code)."""
    check_input("to_adjacent_slices", x, 1, 3)
    depth = x.shape[2]
    centre = torch.arange(depth, device=x.device)
    neighbours = torch.stack([(centre - 1).clamp(min=0), centre, (centre + 1).clamp(max=depth - 1)], 1)
    stacks = x[:, 0, neighbours]  # (N, D, 3, H, W)
    return stacks.reshape(-1, 3, *x.shape[3:])


def from_adjacent_slices(y: torch.Tensor, batch: int) -> torch.Tensor:
    """F⁻¹ (sec. III-B): (N·D, C, H, W) → (N, C, D, H, W), undoing :func:`to_adjacent_slices`' order."""
    if y.ndim != 4:
        raise TransferSegError(f"from_adjacent_slices expects (N·D, C, H, W), got shape {tuple(y.shape)}")
    if not isinstance(batch, int) or batch < 1 or y.shape[0] % batch:
        raise TransferSegError(f"from_adjacent_slices: {y.shape[0]} slices are not {batch!r} volumes of equal depth")
    return y.reshape(batch, y.shape[0] // batch, *y.shape[1:]).transpose(1, 2)


@register("hdenseunet")
class HDenseUNet(nn.Module):
    """H-DenseUNet (sec. III-B, fig. 2(a)): (N, 1, D, H, W) → (N, out_channels, D, H, W) HFF logits.

    The volume goes through F to the 2D DenseUNet (``net2d``, three adjacent slices per slice),
    whose features X2d and logits come back through F⁻¹. The 3D DenseUNet (``net3d``, no
    classifier) sees the image concatenated with ``logit_scale`` × the 2D logits (official code:
    250, for images in HU minus a mean; rescale for inputs in [0, 1]) and gives X3d. HFF: Z = X2d + X3d,
    then conv 3×3×3 (``hff_channels``) → dropout → BN → ReLU → conv 1×1×1 to ``out_channels``.

    ``forward(x)`` returns the HFF logits (what inference uses); ``forward(x, heads=True)`` returns
    ``{"hff": HFF logits, "net2d": 2D logits as a volume}``, both (N, out_channels, D, H, W).
    ``parameter_groups()`` gives "net2d", "net3d" and "hff" (the paper trains net2d first, then
    net3d + hff with net2d frozen, then all three, sec. III-C).

    The paper configuration has 49,524,227 (2D) + 16,400,512 (3D, no classifier) + 110,915 (HFF)
    = 66,035,654 parameters. D must be a multiple of 4 and H, W of 32 (the 3D network's ``size_multiple``;
    the 2D one needs H, W of 32).

    Args: out_channels (paper 3); net2d, net3d: keyword configs of :class:`DenseUNet2D` and
    :class:`DenseUNet3D` (paper defaults; small ones for tests; their in/out channels are set
    here); hff_channels (64; must equal both networks' last decoder channels); dropout (0.3);
    logit_scale (250.0).
    """

    def __init__(self, out_channels: int = 3, net2d: dict | None = None, net3d: dict | None = None,
                 hff_channels: int = 64, dropout: float = 0.3, logit_scale: float = 250.0):
        super().__init__()
        net2d, net3d = dict(net2d or {}), dict(net3d or {})
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise TransferSegError(f"HDenseUNet: out_channels must be a positive integer, got {out_channels!r}")
        for name, config, fixed in (("net2d", net2d, dict(in_channels=3, out_channels=out_channels)),
                                    ("net3d", net3d, dict(in_channels=1 + out_channels, out_channels=0))):
            clash = {k: (config[k], v) for k, v in fixed.items() if k in config and config[k] != v}
            if clash:
                raise TransferSegError(
                    f"HDenseUNet: {name} {', '.join(f'{k}={a!r}' for k, (a, _) in clash.items())} cannot be chosen: "
                    f"H-DenseUNet sets {', '.join(f'{k}={b!r}' for k, (_, b) in clash.items())}"
                )
            config.update(fixed)
        self.net2d, self.net3d = DenseUNet2D(**net2d), DenseUNet3D(**net3d)
        for name, net in (("net2d", self.net2d), ("net3d", self.net3d)):
            if net.feature_channels != hff_channels:
                raise TransferSegError(
                    f"HDenseUNet: HFF sums 2D and 3D features of hff_channels={hff_channels} channels, but {name}'s "
                    f"last decoder layer has {net.feature_channels}"
                )
        if not 0 <= dropout < 1:
            raise TransferSegError(f"HDenseUNet: dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.out_channels, self.logit_scale = 1, out_channels, float(logit_scale)
        # no conv bias before BN (the official code has one; BN cancels it)
        self.hff = nn.Sequential(nn.Conv3d(hff_channels, hff_channels, 3, padding=1, bias=False), nn.Dropout(dropout),
                                 nn.BatchNorm3d(hff_channels), nn.ReLU(inplace=True),
                                 nn.Conv3d(hff_channels, out_channels, 1))
        self.size_multiple = tuple(math.lcm(a, b) for a, b in zip((1, *self.net2d.size_multiple),
                                                                   self.net3d.size_multiple))
        self.config = dict(out_channels=out_channels, net2d=self.net2d.config, net3d=self.net3d.config,
                           hff_channels=hff_channels, dropout=dropout, logit_scale=self.logit_scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"net2d": list(self.net2d.parameters()), "net3d": list(self.net3d.parameters()),
                "hff": list(self.hff.parameters())}

    HEADS = ("hff", "net2d")

    def forward(self, x: torch.Tensor, heads=False):
        """HFF logits; ``heads=True`` (or a tuple of names from ``HEADS``) gives a dict of those
        outputs, and ``heads=("net2d",)`` runs the 2D network alone (the paper's first stage)."""
        check_input("HDenseUNet", x, 1, 3)
        wanted = self.HEADS if heads is True else tuple(heads or ())
        unknown = [name for name in wanted if name not in self.HEADS]
        if unknown:
            raise TransferSegError(f"HDenseUNet has output heads {', '.join(self.HEADS)}, not {unknown[0]!r}")
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % m for s, m in zip(spatial, self.size_multiple)):
            raise TransferSegError(
                f"HDenseUNet input size {'×'.join(map(str, spatial))} (D×H×W) is not a multiple of "
                f"{'×'.join(map(str, self.size_multiple))}; pad it (the sliding-window inferer does) or crop it"
            )
        features2d = self.net2d.features(to_adjacent_slices(x))
        logits2d = from_adjacent_slices(self.net2d.head(features2d), x.shape[0])
        if heads and "hff" not in wanted:
            return {"net2d": logits2d}
        features2d = from_adjacent_slices(features2d, x.shape[0])
        features3d = self.net3d(torch.cat([x, self.logit_scale * logits2d], 1))  # out_channels 0: features
        logits = self.hff(features2d + features3d)
        if not heads:
            return logits
        return {name: value for name, value in (("hff", logits), ("net2d", logits2d)) if name in wanted}
