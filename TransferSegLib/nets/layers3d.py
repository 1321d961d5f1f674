"""3D modules that torch.nn lacks, which the 2D→3D converter (:mod:`.convert`) builds: a transposed
convolution inflated from a 2D one with any kernel, a channels-first LayerNorm for 3D, and, for torch
< 2.3 only, the LPPool3d those versions lack."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..volume import TransferSegError

__all__ = ["InflatedConvTranspose3d", "LayerNorm3d", "LPPool3d"]


class InflatedConvTranspose3d(nn.Module):
    """A 3D transposed convolution whose K depth taps all use one 2D kernel (I3D inflation, tied).

    ``weight`` is stored 2D-shaped (in_channels, out_channels / groups, K, K), exactly as in
    ``ConvTranspose2d``, and inflated on the fly to (…, K, K, K) ÷ ceil(K / stride): the number
    of depth taps that overlap at an output voxel, so a constant-depth input gives the 2D
    output (exact when the stride divides K).  Same parameter count as the 2D layer.  The
    kernel, stride, padding, output padding and dilation are isotropic ints; ``forward`` takes
    no ``output_size``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, output_padding: int = 0, groups: int = 1, bias: bool = True,
                 dilation: int = 1, device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise TransferSegError(f"InflatedConvTranspose3d: channels {in_channels}→{out_channels} "
                                   f"are not divisible by groups={groups}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels // groups, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ConvTranspose2d's own initialisation, so a randomly initialised 3D model matches 2D.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size**2
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def depth_scale(self) -> float:
        return 1.0 / math.ceil(self.kernel_size / self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        weight = self.weight.unsqueeze(2).expand(-1, -1, k, -1, -1) * self.depth_scale
        return F.conv_transpose3d(x, weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, D, H, W) tensors (torchvision's ``LayerNorm2d`` for 5D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 4, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class LPPool3d(nn.Module):
    """``nn.LPPool3d`` for torch < 2.3, which lacks it: the formula of torch 2.3's ``F.lp_pool3d``."""

    def __init__(self, norm_type: float, kernel_size, stride=None, ceil_mode: bool = False):
        super().__init__()
        self.norm_type, self.kernel_size, self.stride, self.ceil_mode = norm_type, kernel_size, stride, ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (self.kernel_size,) * 3 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        out = F.avg_pool3d(x.pow(self.norm_type), kernel, self.stride, 0, self.ceil_mode)
        return (torch.sign(out) * F.relu(torch.abs(out))).mul(math.prod(kernel)).pow(1.0 / self.norm_type)
