"""ACS convolutions: 2D kernels that see a volume from its axial, coronal and sagittal views.

Yang et al., "Reinventing 2D Convolutions for 3D Images", IEEE JBHI 2021, section III:

* :class:`ACSConv` -- section III-A, eqs. (1)-(3): the output channels of a 2D kernel
  ``W (Co, Ci/groups, K, K)`` are split (a, c, s) (:func:`acs_channel_split`, the rule of the
  ``acsconv`` package, so weights interchange); the first ``a`` kernels run in the axial plane,
  the next ``c`` in the coronal plane, the last ``s`` in the sagittal plane; the three outputs
  are concatenated along channels. It is exactly ``F.conv3d`` with every 2D kernel embedded in a
  zero K×K×K kernel, in the middle plane (index K // 2) orthogonal to its view.
* :class:`MeanACSConv` -- section III-C.1, eq. (4): every kernel in all three views, averaged.
* :class:`SoftACSConv` -- section III-C.2, eq. (5): a learned weighted sum of the three views.

Kernel orientation, torch (D, H, W) order (DESIGN.md, "Views"): axial (1, K, K), coronal
(K, 1, K), sagittal (K, K, 1); the 2D kernel's (row, column) axes lie along (H, W), (D, W) and
(D, H) respectively -- ``weight.unsqueeze(2)``, ``unsqueeze(3)``, ``unsqueeze(4)`` as in acsconv.

Arguments are those of ``nn.Conv2d``. ``stride``, ``padding`` and ``dilation`` given as an int
or a square pair ``(v, v)`` apply to all three axes; a triple gives per-axis (D, H, W) values.
``padding`` may also be ``'same'`` (stride 1 only, as in ``nn.Conv2d``; an even kernel pads one
more on the right) or ``'valid'``. ``padding_mode`` is one of ``zeros``, ``reflect``,
``replicate``, ``circular`` and pads all three axes, as ``nn.Conv3d`` does, before the views read
it. Inputs are (N, C, D, H, W) or unbatched (C, D, H, W).

How it runs: each view is one ``F.conv3d`` with the view's kernel ``(1, K, K)``, ``(K, 1, K)``
or ``(K, K, 1)`` on one channels-last copy of the input (channels_last_3d), so oneDNN / cuDNN
read it without a per-view layout change; the output comes back channels_last_3d too, so a
network of ACS layers never converts again (values and shape are those of an NCDHW output).
With ``groups > 1`` a view's output channels can cut a group in two; each view is then run as
pieces that each lie in one group or cover whole groups (depthwise is one piece per view).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import VIEWS
from ..volume import TransferSegError
from .checks import describe_size

__all__ = ["ACSConv", "MeanACSConv", "SoftACSConv", "acs_channel_split", "VIEWS", "PADDING_MODES"]

# VIEWS: view i has kernel size 1 along spatial axis i of (D, H, W)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def acs_channel_split(out_channels: int) -> tuple[int, int, int]:
    """Output channels per view (axial, coronal, sagittal): Co // 3 each, the remainder going to
    axial first, then coronal -- the ``acsconv`` 0.1.1 rule (5 -> (2, 2, 1), 4 -> (2, 1, 1))."""
    base, rem = divmod(int(out_channels), 3)
    return base + (rem >= 1), base + (rem == 2), base


# ---------------------------------------------------------------------------------------------
# argument checking


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kernel(name: str, kernel_size) -> int:
    if _is_int(kernel_size):
        k = kernel_size
    elif isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 and all(map(_is_int, kernel_size)):
        if kernel_size[0] != kernel_size[1]:
            raise TransferSegError(
                f"{name}: kernel_size {tuple(kernel_size)} is not square; an ACS convolution turns one "
                f"K×K kernel into (1,K,K), (K,1,K) and (K,K,1) kernels, so it needs equal sides"
            )
        k = kernel_size[0]
    else:
        raise TransferSegError(f"{name}: kernel_size must be an int or a square pair (K, K), got {kernel_size!r}")
    if k < 1:
        raise TransferSegError(f"{name}: kernel_size must be at least 1, got {k}")
    return k


def _triple(name: str, arg: str, value, minimum: int) -> tuple[int, int, int]:
    """An int or a square pair -> the same value on all three axes; a triple -> per axis (D, H, W)."""
    if _is_int(value):
        values = (value,) * 3
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3) and all(map(_is_int, value)):
        if len(value) == 2 and value[0] != value[1]:
            raise TransferSegError(
                f"{name}: {arg}={tuple(value)} differs between the two 2D axes, and an ACS convolution "
                f"uses each 2D axis along two 3D axes; give an int, a square pair or a (D, H, W) triple"
            )
        values = tuple(value) if len(value) == 3 else (value[0],) * 3
    else:
        raise TransferSegError(f"{name}: {arg} must be an int, a square pair or a (D, H, W) triple, got {value!r}")
    if min(values) < minimum:
        raise TransferSegError(f"{name}: {arg} must be at least {minimum} on every axis, got {value!r}")
    return values


def _padding(name: str, padding, stride) -> str | tuple[int, int, int]:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise TransferSegError(f"{name}: padding must be an int, a pair, a triple, 'same' or 'valid', got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            # nn.Conv2d refuses this too: 'same' has no single meaning with a stride.
            raise TransferSegError(f"{name}: padding='same' is not supported for strided convolutions (stride {stride})")
        return padding
    return _triple(name, "padding", padding, 0)


# ---------------------------------------------------------------------------------------------
# the shared base: parameters, from_conv2d and the three view convolutions


class _ACSConvNd(nn.Module):
    """Parameters and view convolutions shared by :class:`ACSConv`, :class:`MeanACSConv` and
    :class:`SoftACSConv`; subclasses say which kernels run in which view and how views combine."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not _is_int(value) or value < 1:
                raise TransferSegError(f"{name}: {arg} must be a positive integer, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise TransferSegError(
                f"{name}: groups={groups} must divide both in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        if padding_mode not in PADDING_MODES:
            raise TransferSegError(f"{name}: padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        k = _kernel(name, kernel_size)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (k, k)  # the 2D kernel, as stored in ``weight``
        self.stride = _triple(name, "stride", stride, 1)
        self.dilation = _triple(name, "dilation", dilation, 1)
        self.padding = _padding(name, padding, self.stride)
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels // groups, k, k), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d`` (the 2D fan-in: the kernel is a 2D kernel)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d):
        """The ACS counterpart of ``conv`` with its weights copied (not shared), on its device and
        dtype, in its train/eval mode and with its parameters' ``requires_grad`` flags."""
        if not isinstance(conv, nn.Conv2d):
            raise TransferSegError(f"{cls.__name__}.from_conv2d needs an nn.Conv2d, got {type(conv).__name__}")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            module.weight.requires_grad_(conv.weight.requires_grad)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
                module.bias.requires_grad_(conv.bias.requires_grad)
        return module.train(conv.training)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s

    # -- the view convolutions ----------------------------------------------------------------

    def _pads(self) -> list[tuple[int, int]]:
        """(left, right) padding per axis (D, H, W) of the equivalent K×K×K conv3d."""
        k = self.kernel_size[0]
        if self.padding == "valid":
            return [(0, 0)] * 3
        if self.padding == "same":  # as nn.Conv3d: the odd one out goes right
            return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d in self.dilation]
        return [(p, p) for p in self.padding]

    def _prepare(self, x: torch.Tensor):
        """Check ``x``; return it padded (non-zero modes) and channels-last, its per-axis pads
        still to apply, the output size and whether a batch axis was added."""
        name = type(self).__name__
        unbatched = x.dim() == 4
        if x.dim() not in (4, 5):
            raise TransferSegError(
                f"{name} expects a 5D tensor (N, C, D, H, W) or an unbatched (C, D, H, W), got shape {describe_size(x.shape)}"
            )
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.in_channels:
            raise TransferSegError(f"{name} expects {self.in_channels} input channel(s), got {x.shape[1]}")
        k, pads = self.kernel_size[0], self._pads()
        out_size = [(n + l + r - d * (k - 1) - 1) // s + 1
                    for n, (l, r), d, s in zip(x.shape[2:], pads, self.dilation, self.stride)]
        if min(out_size) < 1 or min(x.shape[2:]) < 1:
            raise TransferSegError(
                f"{name}: input {describe_size(x.shape[2:])} (D×H×W) is too small for a {k}×{k}×{k} kernel with "
                f"dilation {self.dilation} and padding {self.padding!r}"
            )
        if self.padding_mode in ("reflect", "circular"):
            limit = {"reflect": "smaller than", "circular": "at most"}[self.padding_mode]
            for n, (l, r) in zip(x.shape[2:], pads):
                if max(l, r) > n - (self.padding_mode == "reflect"):
                    raise TransferSegError(
                        f"{name}: padding_mode={self.padding_mode!r} needs the padding {self.padding!r} to be "
                        f"{limit} the input size {describe_size(x.shape[2:])} on every axis"
                    )
        if self.padding_mode != "zeros" and any(l or r for l, r in pads):
            # nn.Conv3d pads all three axes in the mode first; so do we, and then pad nothing.
            flat = [p for l, r in reversed(pads) for p in (l, r)]
            x = F.pad(x, flat, mode=self.padding_mode)
            pads = [(0, 0)] * 3
        if not x.is_contiguous(memory_format=torch.channels_last_3d):
            # empty_like + copy_ transposes about a third faster than .contiguous(memory_format=...)
            x = torch.empty_like(x, memory_format=torch.channels_last_3d).copy_(x)
        return x, pads, out_size, unbatched

    def _view_conv(self, x: torch.Tensor, view: int, weight: torch.Tensor, bias, channels: range,
                   pads, out_size) -> torch.Tensor:
        """Output channels ``channels`` of the conv3d whose kernels are ``weight`` (those channels'
        2D kernels) embedded in the middle plane orthogonal to ``view``."""
        k = self.kernel_size[0]
        conv_padding, keep = [], []  # conv3d padding per axis; the output (start, length) to keep
        for axis, ((left, right), d, s, n_out) in enumerate(zip(pads, self.dilation, self.stride, out_size)):
            if axis != view:
                # In-plane: conv3d pads symmetrically; an asymmetric ('same', even K, stride 1)
                # pad is the larger one on both sides with the surplus output cropped.
                p = max(left, right)
                conv_padding.append(p)
                keep.append((p - left, n_out))
                continue
            # Orthogonal axis: the kernel is 1 wide and output z reads input z*s + offset (the
            # one non-zero plane sits at K // 2, i.e. (K // 2)*d into the dilated kernel). The
            # conv reads a slab from max(offset, 0); its symmetric padding p may be more than the
            # left needs, which shifts the wanted outputs right by (p - p_left) / s.
            n_in = x.shape[2 + axis]
            offset = (k // 2) * d - left
            last = offset + (n_out - 1) * s
            p_left, p_right = max(0, -offset), max(0, last - (n_in - 1))
            p, start = max(p_left, p_right), max(offset, 0)
            if (p - p_left) % s or start >= n_in or last < 0:
                # Rare (even kernels with strides, reads only from padding): pad this axis explicitly.
                x = F.pad(x, [0, 0] * (2 - axis) + [p_left, p_right])
                n_in, start, last = n_in + p_left + p_right, offset + p_left, last + p_left
                p = p_left = 0
            length = min(n_in, last + 1) - start
            if length != n_in:  # a full-length narrow would still cost a zero-fill in backward
                x = x.narrow(2 + axis, start, length)
            conv_padding.append(p)
            keep.append(((p - p_left) // s, n_out))
        kernel = weight.unsqueeze(2 + view)
        outputs = []
        for lo, hi, in_lo, in_hi, n_groups in _group_pieces(channels, self.out_channels, self.in_channels, self.groups):
            xi = x if (in_lo, in_hi) == (0, self.in_channels) else x[:, in_lo:in_hi]
            w = kernel[lo - channels.start:hi - channels.start]
            b = None if bias is None else bias[lo - channels.start:hi - channels.start]
            outputs.append(F.conv3d(xi, w, b, self.stride, conv_padding, self.dilation, n_groups))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        for axis, (start, length) in enumerate(keep):
            if start or y.shape[2 + axis] != length:
                y = y.narrow(2 + axis, start, length)
        return y


def _group_pieces(channels: range, out_channels: int, in_channels: int, groups: int):
    """Split output channels ``channels`` into pieces that conv3d can run in one call: a part of
    one group (groups=1 on that group's inputs) or a run of whole groups (groups=their number).
    Yields (out_lo, out_hi, in_lo, in_hi, groups)."""
    per_out, per_in = out_channels // groups, in_channels // groups
    o = channels.start
    while o < channels.stop:
        g = o // per_out
        whole = (channels.stop - o) // per_out if o % per_out == 0 else 0
        if whole:
            yield o, o + whole * per_out, g * per_in, (g + whole) * per_in, whole
            o += whole * per_out
        else:
            end = min(channels.stop, (g + 1) * per_out)
            yield o, end, g * per_in, (g + 1) * per_in, 1
            o = end


# ---------------------------------------------------------------------------------------------
# the three operators


class ACSConv(_ACSConvNd):
    """ACS convolution (ACS paper, section III-A, eqs. (1)-(3)): output channels split
    (axial, coronal, sagittal) by :func:`acs_channel_split`, each part's 2D kernels run in its
    view, outputs concatenated. Parameters: exactly those of the ``nn.Conv2d`` it replaces.
    """

    @property
    def channel_split(self) -> tuple[int, int, int]:
        return acs_channel_split(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pads, out_size, unbatched = self._prepare(x)
        parts, start = [], 0
        for view, n in enumerate(self.channel_split):
            if n:
                channels = range(start, start + n)
                bias = None if self.bias is None else self.bias[start:start + n]
                parts.append(self._view_conv(x, view, self.weight[start:start + n], bias, channels, pads, out_size))
            start += n
        del x  # the channels-last copy: freed before the output is allocated (a lower peak)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y.squeeze(0) if unbatched else y


class MeanACSConv(_ACSConvNd):
    """Mean-ACS convolution (ACS paper, section III-C.1, eq. (4)): every 2D kernel runs in all
    three views and the three outputs are averaged (bias added once, after the mean)."""

    def _combine(self, views: list[torch.Tensor]) -> torch.Tensor:
        return (views[0] + views[1] + views[2]) / 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pads, out_size, unbatched = self._prepare(x)
        everything = range(self.out_channels)
        views = [self._view_conv(x, view, self.weight, None, everything, pads, out_size) for view in range(3)]
        del x
        y = self._combine(views)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1, 1)
        return y.squeeze(0) if unbatched else y


class SoftACSConv(MeanACSConv):
    """Soft-ACS convolution (ACS paper, section III-C.2, eq. (5)): X = α(a) X'(a) + α(c) X'(c)
    + α(s) X'(s), the views of Mean-ACS weighted by learned reals.

    ``view_weights`` (Co, 3) holds (α(a), α(c), α(s)) per output channel -- Table III counts
    C_o(C_i K² + 3) parameters -- used as they are, with no softmax (eq. (5) has none; acsconv
    applies a softmax to its ``soft_w_core``: ``view_weights = soft_w_core.softmax(-1)``
    converts). They start at 1/3, so a fresh Soft-ACS equals Mean-ACS (the paper gives no
    initialisation; acsconv draws them at random).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.view_weights = nn.Parameter(torch.full((self.out_channels, 3), 1 / 3, device=self.weight.device,
                                                    dtype=self.weight.dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "view_weights"):
            nn.init.constant_(self.view_weights, 1 / 3)

    def _combine(self, views: list[torch.Tensor]) -> torch.Tensor:
        alpha = self.view_weights.t().reshape(3, 1, -1, 1, 1, 1)
        return views[0] * alpha[0] + views[1] * alpha[1] + views[2] * alpha[2]
