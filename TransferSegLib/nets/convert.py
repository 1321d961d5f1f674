"""Convert any 2D torchvision-style network into a 3D one that keeps its (pretrained) weights.

Yang et al., "Reinventing 2D Convolutions for 3D Images", IEEE JBHI 2021 (ACS paper), sec. III
and Table II; the 2.5D (AH-Net-like) and 3D (I3D, Carreira & Zisserman 2017) counterparts of
its sec. III-B.

:func:`convert` returns a **deep copy**: the 2D model is left untouched and shares no tensor
with the result.  ``to`` picks the 3D operator that every ``Conv2d`` becomes:

=============  ==================================================================================
``"acs"``      :class:`~TransferSegLib.nets.acs.ACSConv` (kernel split by output channel); 1×1 → Conv3d 1×1×1 (Table II)
``"mean_acs"`` :class:`~TransferSegLib.nets.acs.MeanACSConv`; 1×1 → Conv3d 1×1×1
``"soft_acs"`` :class:`~TransferSegLib.nets.acs.SoftACSConv` (adds ``view_weights``, 3 per output channel); 1×1 → Conv3d 1×1×1
``"2.5d"``     Conv3d (1, kH, kW), stride (1, sH, sW), padding (0, pH, pW), dilation (1, dH, dW)
``"3d"``       Conv3d (K, K, K), I3D inflation: the 2D kernel repeated K times along depth, ÷ K
=============  ==================================================================================

The other operators (Table II where it speaks; torch kernel notation (kD, kH, kW) throughout):

* ConvTranspose2d → "2.5d": ConvTranspose3d (1, K, K); "3d": ConvTranspose3d (K, K, K), I3D
  inflated; ACS variants: :class:`InflatedConvTranspose3d`, the same I3D inflation with the K
  depth taps tied to the one stored 2D kernel, so the parameter count stays the 2D one (Table
  III).  Not an ACS split: a strided transposed conv whose view kernel has size 1 along an axis
  writes only every s-th plane along it, leaving empty planes in each third of the channels.
  Transposed I3D weights are divided by ceil(K / s), the number of depth taps that overlap at
  an output voxel (÷ K is the stride-1 case); exact on constant-depth inputs when s divides K.
* BatchNorm2d → BatchNorm3d and InstanceNorm2d → InstanceNorm3d with every buffer and setting;
  GroupNorm, nn.LayerNorm, Linear, PReLU, … (dimension-agnostic) are kept; torchvision's channel
  ``LayerNorm2d`` (ConvNeXt) → :class:`LayerNorm3d`.
* Max/Avg/LP pool 2D → 3D: "2.5d" (1, K, K); "acs"/"3d" K×K×K (the paper's ``{1, K}×K×K``: 1 for
  2.5D, K for ACS and 3D, as in the authors' converter), with ceil_mode, count_include_pad,
  divisor_override, dilation and return_indices kept.  MaxUnpool2d and the 2D padding modules
  follow the same rule.
* Adaptive pools: output (h, w) → (1, h, w) in every mode.  The depth is always pooled to 1 so
  that the number of outputs per channel — what a following ``flatten`` + ``Linear`` expects —
  stays h·w (acsconv's (7, 7) → (7, 7, 7) breaks VGG/AlexNet heads); (1, 1) → (1, 1, 1).
* Upsample: bilinear → trilinear, nearest stays nearest; scale (f, f) → (f, f, f), or (1, f, f)
  for "2.5d".  Dropout2d → Dropout3d.
* Modules whose ``forward`` is 2D-specific get a 3D-aware subclass with the same state dict
  (:data:`FORWARDS_3D`): torchvision's DeepLabV3, FCN, LRASPP (+ head) and ASPPPooling (bilinear →
  trilinear to ``x.shape[-3:]``), DenseNet, MobileNetV2, MNASNet, ShuffleNetV2 (global pooling),
  ConvNeXt's CNBlock (layer scale), and our :class:`~TransferSegLib.nets.unet.UNet2D`.
  Nothing in ``torch.nn.functional`` is patched.

1×1 convs become plain Conv3d 1×1×1 in every ACS variant (Table II): the three views of a 1×1
kernel coincide, so Soft-ACS view weights on them would only rescale the output.

Guarantees: a real ``nn.Module`` (state_dict, ``.to()``, DDP); each module keeps its train/eval
flag and each parameter its ``requires_grad``; the weights are checked **strictly** — the 2D
state dict is transformed key by key, its keys and shapes must equal the 3D model's exactly
(a missing, unexpected or misshapen tensor is an error; only Soft-ACS's ``view_weights`` are
new), and the replaced layers are filled with ``load_state_dict``.  What cannot be converted is refused
with :class:`~TransferSegLib.volume.TransferSegError` naming the module (non-square or
anisotropic kernels for ACS/3D, Conv1d, 2D-only layers such as PixelShuffle, unknown modules
that hold parameters or buffers directly, and — a best-effort source scan — custom modules
whose own methods call 2D-only functions such as ``F.avg_pool2d`` or interpolate "bilinear").
Module attributes (``conv.stride`` …) are read, never constructor argument lists.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import skip_init
from torchvision.models import convnext, densenet, mnasnet, mobilenetv2, shufflenetv2
from torchvision.models.segmentation import deeplabv3, fcn, lraspp
from torchvision.ops import misc as tv_misc

from ..volume import TransferSegError
from ..weights import read_state_dict, refuse_pickle_suffix, save_state_dict, sha256_file
from . import register
from .unet import SliceStack2D, UNet2D

__all__ = ["CONVERSION_MODES", "FORWARDS_3D", "InflatedConvTranspose3d", "LayerNorm3d", "convert", "converted_network",
           "convert_from_source", "load_converted", "save_converted"]

#: ``to`` value -> the name used in messages.
CONVERSION_MODES = {"acs": "ACS", "mean_acs": "Mean-ACS", "soft_acs": "Soft-ACS", "2.5d": "2.5D", "3d": "3D (I3D)"}
_ACS_MODES = ("acs", "mean_acs", "soft_acs")


class _CannotConvert(Exception):
    """Raised by a converter: ``what`` describes the module, ``why`` says what stands in the way."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what, self.why = what, why


# --------------------------------------------------------------------------------------
# 3D modules that have no torch.nn counterpart
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# 3D-aware forwards for modules whose own forward is 2D-specific (same state dict)
# --------------------------------------------------------------------------------------
def _simple_segmentation_forward_3d(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """torchvision ``_SimpleSegmentationModel.forward`` with depth: logits resized to ``x.shape[-3:]``."""
    input_shape = x.shape[-3:]
    features = self.backbone(x)
    result = OrderedDict()
    y = self.classifier(features["out"])
    result["out"] = F.interpolate(y, size=input_shape, mode="trilinear", align_corners=False)
    if self.aux_classifier is not None:
        y = self.aux_classifier(features["aux"])
        result["aux"] = F.interpolate(y, size=input_shape, mode="trilinear", align_corners=False)
    return result


class DeepLabV3For3D(deeplabv3.DeepLabV3):
    forward = _simple_segmentation_forward_3d


class FCNFor3D(fcn.FCN):
    forward = _simple_segmentation_forward_3d


class ASPPPoolingFor3D(deeplabv3.ASPPPooling):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-3:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class LRASPPFor3D(lraspp.LRASPP):
    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = self.classifier(self.backbone(x))
        return OrderedDict(out=F.interpolate(out, size=x.shape[-3:], mode="trilinear", align_corners=False))


class LRASPPHeadFor3D(lraspp.LRASPPHead):
    def forward(self, features: dict) -> torch.Tensor:
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-3:], mode="trilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class DenseNetFor3D(densenet.DenseNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool3d(out, 1), 1))


class MobileNetV2For3D(mobilenetv2.MobileNetV2):
    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool3d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MNASNetFor3D(mnasnet.MNASNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean([2, 3, 4]))


def _channel_shuffle_3d(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class ShuffleNetInvertedResidualFor3D(shufflenetv2.InvertedResidual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle_3d(out, 2)


class ShuffleNetV2For3D(shufflenetv2.ShuffleNetV2):
    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3, 4]))


class CNBlockFor3D(convnext.CNBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_scale is stored (C, 1, 1) as in 2D; one more axis broadcasts it over depth.
        result = self.stochastic_depth(self.layer_scale.unsqueeze(-1) * self.block(x))
        return result + x


class UNet2DFor3D(UNet2D):
    """A converted :class:`UNet2D`: (N, in_channels, D, H, W) -> (N, out_channels, D, H, W) logits.

    D must be a multiple of ``depth_multiple``: 1 for "2.5d" (its pools keep depth), else
    2**(levels - 1) like H and W.
    """

    depth_multiple = 1

    def _prepare_for_3d(self, mode: str) -> None:
        self.dims = 3
        self.depth_multiple = 1 if mode == "2.5d" else 2 ** (len(self.encoder) - 1)

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        plane = 2 ** (len(self.encoder) - 1)
        return (self.depth_multiple, plane, plane)


#: 2D class -> its 3D-aware subclass (swapped onto the converted copy; the state dict is unchanged).
FORWARDS_3D = {
    deeplabv3.DeepLabV3: DeepLabV3For3D,
    fcn.FCN: FCNFor3D,
    deeplabv3.ASPPPooling: ASPPPoolingFor3D,
    lraspp.LRASPP: LRASPPFor3D,
    lraspp.LRASPPHead: LRASPPHeadFor3D,
    densenet.DenseNet: DenseNetFor3D,
    mobilenetv2.MobileNetV2: MobileNetV2For3D,
    mnasnet.MNASNet: MNASNetFor3D,
    shufflenetv2.InvertedResidual: ShuffleNetInvertedResidualFor3D,
    shufflenetv2.ShuffleNetV2: ShuffleNetV2For3D,
    convnext.CNBlock: CNBlockFor3D,
    UNet2D: UNet2DFor3D,
}

#: Modules known not to work in 3D, with the reason.
_UNSUPPORTED = {
    SliceStack2D: "it already runs a 2D network slice by slice on volumes; convert its .net instead",
}


# --------------------------------------------------------------------------------------
# Leaf converters: (2D module, mode) -> (3D module, transform of the module's own 2D state dict)
# --------------------------------------------------------------------------------------
def _factory(module: nn.Module) -> dict:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _same(state: dict) -> dict:
    return dict(state)


def _unsqueeze_weight(state: dict) -> dict:
    return {k: v.unsqueeze(2) if k == "weight" else v for k, v in state.items()}


def _inflate_weight(k: int, scale: float):
    def transform(state: dict) -> dict:
        return {n: v.unsqueeze(2).repeat(1, 1, k, 1, 1) * scale if n == "weight" else v for n, v in state.items()}
    return transform


def _isotropic(module: nn.Module, mode: str, *attributes: str, given: dict | None = None) -> dict:
    """The (h == w) value of each attribute (read from ``module`` unless ``given``); refuse
    anisotropic ones (ACS/3D need a cube)."""
    values = {}
    for attribute in attributes:
        value = given[attribute] if given else getattr(module, attribute)
        if isinstance(value, str):  # padding "same" / "valid"
            values[attribute] = value
            continue
        value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
        if value[0] != value[1]:
            if attribute == "kernel_size" and mode in _ACS_MODES:
                why = "ACS splits a square K×K kernel into axial, coronal and sagittal kernels; convert to 2.5D instead"
            elif attribute == "kernel_size":
                why = "I3D inflation repeats a square K×K kernel K times along depth; convert to 2.5D instead"
            else:
                why = f"a 3D {attribute.replace('_', ' ')} must be the same along depth, rows and columns; convert to 2.5D instead"
            raise _CannotConvert(f"{type(module).__name__} with {attribute.replace('_size', '')} {value}", why)
        values[attribute] = value[0]
    return values


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _convert_conv(conv: nn.Conv2d, mode: str):
    common = dict(groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, **_factory(conv))
    if mode == "2.5d":
        padding = conv.padding if isinstance(conv.padding, str) else (0, *conv.padding)
        new = skip_init(nn.Conv3d, conv.in_channels, conv.out_channels, (1, *conv.kernel_size),
                        stride=(1, *conv.stride), padding=padding, dilation=(1, *conv.dilation), **common)
        return new, _unsqueeze_weight
    iso = _isotropic(conv, mode, "kernel_size", "stride", "padding", "dilation")
    k = iso["kernel_size"]
    if mode == "3d" or k == 1:  # Table II: Conv2D 1×1 -> Conv3D 1×1×1 (for ACS too)
        new = skip_init(nn.Conv3d, conv.in_channels, conv.out_channels, k, stride=iso["stride"],
                        padding=iso["padding"], dilation=iso["dilation"], **common)
        return new, _inflate_weight(k, 1.0 / k)
    return _convert_conv_acs(conv, mode)


def _convert_conv_acs(conv: nn.Conv2d, mode: str):
    try:
        from . import acs
    except ImportError as e:  # pragma: no cover - acs.py ships with this package
        raise _CannotConvert("Conv2d", f"ACS convolutions are not available ({e})") from None
    cls = {"acs": acs.ACSConv, "mean_acs": acs.MeanACSConv, "soft_acs": acs.SoftACSConv}[mode]
    new = cls.from_conv2d(conv)
    new_state = new.state_dict()

    def transform(state: dict) -> dict:
        # The 2D tensors keep their 2D shapes; view weights a variant adds (Soft-ACS) keep the
        # values it initialised them with.
        return {**new_state, **state}
    return new, transform


def _convert_conv_transpose(conv: nn.ConvTranspose2d, mode: str):
    common = dict(groups=conv.groups, bias=conv.bias is not None, **_factory(conv))
    if mode == "2.5d":
        new = skip_init(nn.ConvTranspose3d, conv.in_channels, conv.out_channels, (1, *conv.kernel_size),
                        stride=(1, *conv.stride), padding=(0, *conv.padding),
                        output_padding=(0, *conv.output_padding), dilation=(1, *conv.dilation), **common)
        return new, _unsqueeze_weight
    iso = _isotropic(conv, mode, "kernel_size", "stride", "padding", "output_padding", "dilation")
    args = (conv.in_channels, conv.out_channels, iso["kernel_size"])
    kwargs = dict(stride=iso["stride"], padding=iso["padding"], output_padding=iso["output_padding"],
                  dilation=iso["dilation"], **common)
    if mode == "3d":
        k, s = iso["kernel_size"], iso["stride"]
        return skip_init(nn.ConvTranspose3d, *args, **kwargs), _inflate_weight(k, 1.0 / math.ceil(k / s))
    return skip_init(InflatedConvTranspose3d, *args, **kwargs), _same


def _convert_batch_norm(norm: nn.BatchNorm2d, mode: str):
    new = skip_init(nn.BatchNorm3d, norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                    track_running_stats=norm.track_running_stats, **_factory(norm))
    return new, _same


def _convert_instance_norm(norm: nn.InstanceNorm2d, mode: str):
    new = skip_init(nn.InstanceNorm3d, norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                    track_running_stats=norm.track_running_stats, **_factory(norm))
    return new, _same


def _convert_channel_layer_norm(norm: nn.LayerNorm, mode: str):
    new = skip_init(LayerNorm3d, norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                    bias=norm.bias is not None, **_factory(norm))
    return new, _same


def _pool_geometry(pool: nn.Module, mode: str, attributes: tuple[str, ...]) -> dict:
    """Pool kernel/stride/padding/dilation in 3D: (1, h, w)-style for 2.5D, K×K×K for ACS and 3D."""
    given = {a: getattr(pool, a) for a in attributes}
    if given.get("stride", 0) is None:  # LPPool2d keeps stride=None (= kernel_size)
        given["stride"] = given["kernel_size"]
    if mode == "2.5d":
        empty = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}
        return {a: (empty[a], *_pair(v)) for a, v in given.items()}
    return {a: (v,) * 3 for a, v in _isotropic(pool, mode, *attributes, given=given).items()}


def _convert_max_pool(pool: nn.MaxPool2d, mode: str):
    geometry = _pool_geometry(pool, mode, ("kernel_size", "stride", "padding", "dilation"))
    return nn.MaxPool3d(**geometry, return_indices=pool.return_indices, ceil_mode=pool.ceil_mode), _same


def _convert_avg_pool(pool: nn.AvgPool2d, mode: str):
    geometry = _pool_geometry(pool, mode, ("kernel_size", "stride", "padding"))
    return nn.AvgPool3d(**geometry, ceil_mode=pool.ceil_mode, count_include_pad=pool.count_include_pad,
                        divisor_override=pool.divisor_override), _same


def _convert_lp_pool(pool: nn.LPPool2d, mode: str):
    geometry = _pool_geometry(pool, mode, ("kernel_size", "stride"))
    return nn.LPPool3d(pool.norm_type, **geometry, ceil_mode=pool.ceil_mode), _same


def _convert_max_unpool(pool: nn.MaxUnpool2d, mode: str):
    return nn.MaxUnpool3d(**_pool_geometry(pool, mode, ("kernel_size", "stride", "padding"))), _same


def _adaptive_size(pool: nn.Module) -> tuple:
    # Depth pooled to 1: a following flatten + Linear still gets h·w values per channel.
    return (1, *_pair(pool.output_size))


def _convert_adaptive_avg_pool(pool: nn.AdaptiveAvgPool2d, mode: str):
    return nn.AdaptiveAvgPool3d(_adaptive_size(pool)), _same


def _convert_adaptive_max_pool(pool: nn.AdaptiveMaxPool2d, mode: str):
    return nn.AdaptiveMaxPool3d(_adaptive_size(pool), return_indices=pool.return_indices), _same


_PAD_3D = {nn.ConstantPad2d: nn.ConstantPad3d, nn.ZeroPad2d: nn.ConstantPad3d, nn.ReflectionPad2d: nn.ReflectionPad3d,
           nn.ReplicationPad2d: nn.ReplicationPad3d, nn.CircularPad2d: nn.CircularPad3d}


def _convert_pad(pad: nn.Module, mode: str):
    left, right, top, bottom = pad.padding
    if mode == "2.5d":
        padding = (left, right, top, bottom, 0, 0)
    elif len({left, right, top, bottom}) == 1:
        padding = (left,) * 6
    else:
        raise _CannotConvert(f"{type(pad).__name__} with padding {pad.padding}",
                             "uneven padding has no isotropic 3D counterpart; convert to 2.5D instead")
    cls = next(_PAD_3D[c] for c in type(pad).__mro__ if c in _PAD_3D)
    return (cls(padding, pad.value) if cls is nn.ConstantPad3d else cls(padding)), _same


def _convert_upsample(up: nn.Upsample, mode: str):
    modes = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "trilinear", "trilinear": "trilinear"}
    what = f"{type(up).__name__} with mode {up.mode!r}"
    if up.mode not in modes:
        raise _CannotConvert(what, "only nearest and bilinear upsampling have 3D counterparts")
    if up.size is not None:
        raise _CannotConvert(f"{type(up).__name__} with size {up.size}",
                             "a fixed output size says nothing about depth; use scale_factor")
    scale = _pair(up.scale_factor)
    if mode == "2.5d":
        scale = (1.0, *scale)
    elif scale[0] != scale[1]:
        raise _CannotConvert(f"{type(up).__name__} with scale_factor {up.scale_factor}",
                             "an anisotropic scale has no isotropic 3D counterpart; convert to 2.5D instead")
    else:
        scale = scale[0]
    return nn.Upsample(scale_factor=scale, mode=modes[up.mode], align_corners=up.align_corners,
                       recompute_scale_factor=up.recompute_scale_factor), _same


def _convert_dropout(dropout: nn.Dropout2d, mode: str):
    return nn.Dropout3d(dropout.p, inplace=dropout.inplace), _same


_PERMUTE_3D = {(0, 2, 3, 1): [0, 2, 3, 4, 1], (0, 3, 1, 2): [0, 4, 1, 2, 3]}


def _convert_permute(permute: tv_misc.Permute, mode: str):
    dims = _PERMUTE_3D.get(tuple(permute.dims))
    if dims is None:
        raise _CannotConvert(f"Permute with dims {list(permute.dims)}",
                             "only the channels-last permutations (0, 2, 3, 1) and (0, 3, 1, 2) are known in 3D")
    return tv_misc.Permute(dims), _same


def _refuse_1d(module: nn.Module, mode: str):
    raise _CannotConvert(type(module).__name__, "a 1D convolution inside a 2D network has no 3D counterpart")


#: 2D class -> converter.  A subclass is converted like its base only if it keeps the base's forward.
_LEAF_CONVERTERS = {
    nn.Conv2d: _convert_conv,
    nn.ConvTranspose2d: _convert_conv_transpose,
    nn.BatchNorm2d: _convert_batch_norm,
    nn.InstanceNorm2d: _convert_instance_norm,
    convnext.LayerNorm2d: _convert_channel_layer_norm,
    nn.MaxPool2d: _convert_max_pool,
    nn.AvgPool2d: _convert_avg_pool,
    nn.LPPool2d: _convert_lp_pool,
    nn.MaxUnpool2d: _convert_max_unpool,
    nn.AdaptiveAvgPool2d: _convert_adaptive_avg_pool,
    nn.AdaptiveMaxPool2d: _convert_adaptive_max_pool,
    nn.ConstantPad2d: _convert_pad,
    nn.ReflectionPad2d: _convert_pad,
    nn.ReplicationPad2d: _convert_pad,
    nn.CircularPad2d: _convert_pad,
    nn.Upsample: _convert_upsample,
    nn.Dropout2d: _convert_dropout,
    tv_misc.Permute: _convert_permute,
    nn.Conv1d: _refuse_1d,
    nn.ConvTranspose1d: _refuse_1d,
}

#: torch.nn classes that hold parameters and work on any number of spatial axes (or on flat features).
_DIMENSION_AGNOSTIC = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm, nn.PReLU,
                       nn.Embedding, nn.MultiheadAttention, nn.BatchNorm1d, nn.RMSNorm)
_NO_3D_COUNTERPART = (nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold, nn.Unfold, nn.FractionalMaxPool2d)

# Best-effort scan of a custom module's own methods for 2D-only operations.
_2D_ONLY_SOURCE = re.compile(
    r"\b(?:F|functional|torch)\.\w+2d\("  # F.avg_pool2d(, nn.functional.adaptive_avg_pool2d(, torch.conv2d(
    r"|['\"]bi(?:linear|cubic)['\"]"  # F.interpolate(..., mode="bilinear")
    r"|(?:\.shape|\.size\(\))\[-2:\]"  # sizes of the last two axes only
    r"|\.(?:mean|sum|amax|amin|std|var)\((?:dim=)?[\[(]-?2, ?-?[13][\])]"  # x.mean([2, 3])
)
_SOURCE_CHECKED: dict = {}


def _leaf_converter(cls: type):
    for base in cls.__mro__:
        if base in _LEAF_CONVERTERS:
            return base, _LEAF_CONVERTERS[base]
    return None, None


def _two_d_only_use(cls: type) -> str | None:
    """The first 2D-only expression in the methods (other than __init__) a custom class defines."""
    if cls not in _SOURCE_CHECKED:
        found = None
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch.") or klass in (nn.Module, object) or found:
                continue
            for name, member in vars(klass).items():
                if name == "__init__" or not inspect.isfunction(member):
                    continue
                try:
                    source = inspect.getsource(member)
                except (OSError, TypeError):
                    continue
                code = "\n".join(line.split("#")[0] for line in source.splitlines())
                match = _2D_ONLY_SOURCE.search(code)
                if match:
                    use = match.group(0).strip()
                    use = f"calls {use[:-1]}" if use.endswith("(") else f"uses {use}"
                    found = f"{klass.__name__}.{name} {use}"
                    break
        _SOURCE_CHECKED[cls] = found
    return _SOURCE_CHECKED[cls]


def _why_not_convertible(module: nn.Module):
    """None if ``module`` can be kept (its children converted), else a _CannotConvert."""
    cls = type(module)
    name = cls.__name__
    for klass, why in _UNSUPPORTED.items():
        if isinstance(module, klass):
            return _CannotConvert(name, why)
    if cls in FORWARDS_3D:
        return None
    if isinstance(module, _NO_3D_COUNTERPART):
        return _CannotConvert(name, "it rearranges the two image axes and has no 3D counterpart in torch")
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if cls.__module__.startswith("torch.nn."):
        if isinstance(module, _DIMENSION_AGNOSTIC) or "3d" in name or not own:
            if "2d" in name or "2D" in name:
                return _CannotConvert(name, "TransferSeg has no 3D counterpart for this 2D layer")
            return None
        return _CannotConvert(name, "TransferSeg does not know its 3D counterpart")
    if own:
        return _CannotConvert(f"{name} holding {', '.join(own)}",
                              "it holds parameters or buffers directly and TransferSeg does not know how its forward "
                              "uses them in 3D; build it from standard layers or add a 3D version to FORWARDS_3D")
    use = _two_d_only_use(cls)
    if use:
        return _CannotConvert(name, f"its forward is 2D-only: {use}; add a 3D version to FORWARDS_3D")
    return None


# --------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------
class _Conversion:
    def __init__(self, mode: str):
        self.mode = mode
        self.memo: dict = {}  # id(module) -> (first name, its 3D module)
        self.transforms: dict = {}  # qualified name of a replaced leaf -> transform of its state dict
        self.refusals: list = []

    def convert(self, module: nn.Module, name: str) -> nn.Module:
        if id(module) in self.memo:  # a module used twice: one 3D module, state under both names
            first_name, new = self.memo[id(module)]
            if first_name in self.transforms:
                self.transforms[name] = self.transforms[first_name]
            return new
        new = self._convert(module, name)
        self.memo[id(module)] = (name, new)
        return new

    def _convert(self, module: nn.Module, name: str) -> nn.Module:
        base, converter = _leaf_converter(type(module))
        try:
            if converter is not None:
                if type(module).forward is not base.forward:
                    raise _CannotConvert(type(module).__name__,
                                         f"it subclasses {base.__name__} with its own forward, which TransferSeg "
                                         "cannot follow into 3D")
                if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
                    raise _CannotConvert(type(module).__name__, "it is a lazy module: run one forward pass first")
                return self._replace_leaf(module, name, converter)
            refusal = _why_not_convertible(module)
            if refusal is not None:
                raise refusal
        except _CannotConvert as e:
            self.refusals.append((name or "the model", e))
            return module
        for child_name, child in list(module._modules.items()):  # not named_children: it skips repeats
            if child is None:
                continue
            new_child = self.convert(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        replacement = FORWARDS_3D.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            if hasattr(module, "_prepare_for_3d"):
                module._prepare_for_3d(self.mode)
        return module

    def _replace_leaf(self, module: nn.Module, name: str, converter) -> nn.Module:
        new, transform = converter(module, self.mode)
        new.train(module.training)
        for param_name, param in new.named_parameters(recurse=False):
            old = getattr(module, param_name, None)
            if isinstance(old, torch.Tensor):
                param.requires_grad_(old.requires_grad)
        self.transforms[name] = transform
        return new


def _check_mode(to: str) -> str:
    if to not in CONVERSION_MODES:
        raise TransferSegError(f"unknown conversion {to!r}; choose one of {', '.join(map(repr, CONVERSION_MODES))}")
    return to


def _copy_for_conversion(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, except the tensors of layers about to be replaced: the copy
    borrows those (the converters only read them, then drop them), saving one pass of copying."""
    memo: dict = {}
    for module in model.modules():
        if _leaf_converter(type(module))[1] is not None:
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def _shares_storage(model: nn.Module, model3d: nn.Module) -> bool:
    original = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()) if t.numel()}
    return any(t.numel() and t.untyped_storage().data_ptr() in original
               for t in (*model3d.parameters(), *model3d.buffers()))


def _load_converted_weights(model: nn.Module, model3d: nn.Module, transforms: dict, label: str) -> None:
    """Put the 2D weights into ``model3d`` and verify strictly that its state dict is exactly the
    2D one with every replaced layer's tensors transformed (no key missing, unexpected or misshapen)."""
    state2d = model.state_dict()
    kept, transformed, grouped = {}, OrderedDict(), {}
    transformed._metadata = getattr(state2d, "_metadata", None)  # per-module versions (MNASNet checks its own)
    for key, value in state2d.items():
        owner, _, local = key.rpartition(".")
        if owner in transforms:
            grouped.setdefault(owner, {})[local] = value
        else:
            kept[key] = value
    for owner, local_state in grouped.items():
        prefix = f"{owner}." if owner else ""
        transformed.update({prefix + k: v for k, v in transforms[owner](local_state).items()})
    expected = {**kept, **transformed}
    actual = model3d.state_dict()
    problems = [(what, sorted(keys)) for what, keys in (
        ("missing", actual.keys() - expected.keys()), ("unexpected", expected.keys() - actual.keys()),
        ("misshapen", {k for k in expected.keys() & actual.keys() if expected[k].shape != actual[k].shape}))
        if keys]
    if problems:  # a converter bug, never the user's: say so plainly
        detail = "; ".join(f"{what} {', '.join(keys[:4])}" for what, keys in problems)
        raise TransferSegError(f"converting to {label} produced a state dict that differs from the 2D one: {detail}")
    # Kept tensors already are deep copies of the 2D ones; the replaced layers' are filled here.
    model3d.load_state_dict(transformed, strict=False)


def convert(model: nn.Module, to: str = "acs") -> nn.Module:
    """A 3D copy of the 2D ``model`` with its weights: see the module docstring for every rule.

    Returns a **deep copy**; ``model`` itself is not modified and shares no parameter or buffer
    with the result.  ``to`` is one of ``"acs"``, ``"mean_acs"``, ``"soft_acs"``, ``"2.5d"``,
    ``"3d"``.  The copy keeps every module's train/eval flag and every parameter's
    ``requires_grad``, holds exactly the 2D state dict's keys with the replaced layers' tensors
    transformed (checked strictly; Soft-ACS adds its ``view_weights``), and records the
    conversion in its ``transferseg_conversion`` dict (read by :func:`save_converted`).

    Raises TransferSegError naming each module that cannot be converted, e.g.
    "cannot convert features.3 (Conv2d with kernel (3, 1)) to ACS: …".
    """
    mode = _check_mode(to)
    label = CONVERSION_MODES[mode]
    if not isinstance(model, nn.Module):
        raise TransferSegError(f"convert needs a torch.nn.Module, got {type(model).__name__}")
    conversion = _Conversion(mode)
    model3d = conversion.convert(_copy_for_conversion(model), "")
    if conversion.refusals:
        name, first = conversion.refusals[0]
        more = conversion.refusals[1:]
        extra = f" (and {len(more)} more: {', '.join(n for n, _ in more[:5])}{', …' if len(more) > 5 else ''})" if more else ""
        raise TransferSegError(f"cannot convert {name} ({first.what}) to {label}: {first.why}{extra}")
    if _shares_storage(model, model3d):  # a tensor tied between a replaced and a kept layer
        conversion = _Conversion(mode)
        model3d = conversion.convert(copy.deepcopy(model), "")
    _load_converted_weights(model, model3d, conversion.transforms, label)
    n2d, n3d = (sum(p.numel() for p in m.parameters()) for m in (model, model3d))
    model3d.transferseg_conversion = {"mode": mode, "from_class": f"{type(model).__module__}.{type(model).__qualname__}",
                                      "parameters_2d": n2d, "parameters_3d": n3d}
    return model3d


# --------------------------------------------------------------------------------------
# Sources, saving and loading
# --------------------------------------------------------------------------------------
def _build_2d(architecture: str, num_classes: int | None, config: dict | None) -> nn.Module:
    """A randomly initialised 2D network: ``torchvision:NAME`` or a TransferSeg architecture name."""
    from . import build_network

    config = dict(config or {})
    if architecture.startswith("torchvision:"):
        name = architecture.split(":", 1)[1]
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            raise TransferSegError(f"torchvision has no model named {name!r} "
                                   "(see torchvision.models.list_models())") from None
        parameters = inspect.signature(builder).parameters
        config["weights"] = None  # never download; pretrained weights come from a local safetensors file
        if "weights_backbone" in parameters:
            config["weights_backbone"] = None
        if num_classes is not None:
            config["num_classes"] = num_classes
        try:
            return builder(**config)
        except (TypeError, ValueError) as e:
            raise TransferSegError(f"torchvision {name} cannot be built with {config}: {e}") from None
    name = architecture.split(":", 1)[1] if architecture.startswith("transferseg:") else architecture
    if num_classes is not None:
        config["out_channels"] = num_classes
    return build_network(name, config)


def _load_2d_weights(model: nn.Module, path: Path, architecture: str, num_classes: int | None) -> list[str]:
    """Load ``path`` into the 2D ``model`` strictly; with ``num_classes`` a classifier head whose
    output count differs (first dimension = num_classes in the model) is left re-initialised.
    Returns the re-initialised keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    head = [k for k in own if k in state and own[k].shape != state[k].shape]
    refit = [k for k in head if num_classes is not None and own[k].ndim >= 1 and own[k].shape[0] == num_classes
             and own[k].shape[1:] == state[k].shape[1:]]
    wrong = [k for k in head if k not in refit]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", wrong)) if keys]
        raise TransferSegError(f"{path}: these weights do not fit {architecture}"
                               f"{f' with {num_classes} classes' if num_classes else ''} ({'; '.join(parts)})")
    model.load_state_dict({**state, **{k: own[k] for k in refit}}, strict=True)
    return refit


def convert_from_source(source: str, to: str = "acs", num_classes: int | None = None, *,
                        weights_path=None, architecture: str | None = None, config: dict | None = None):
    """Build or load a 2D network and :func:`convert` it; returns ``(model3d, info)``.

    ``source`` is one of
      * ``"torchvision:NAME"`` — any torchvision classification or segmentation builder
        (``weights=None``, ``weights_backbone=None``: nothing is downloaded); ``weights_path``
        optionally names a local safetensors file with its 2D state dict (e.g. ImageNet weights
        converted once), loaded strictly before conversion;
      * ``"transferseg:NAME"`` — a TransferSeg 2D architecture (``config`` = its keyword config);
      * a path to a 2D ``.safetensors`` checkpoint, with ``architecture`` = ``"torchvision:NAME"``
        or a TransferSeg name (+ ``config``), or a TransferSeg model card beside it.
    ``num_classes`` sets the classifier size; with pretrained weights of another size, the
    head tensors (first dimension = num_classes) are left freshly initialised and listed in
    ``info["reinitialised"]``; every other tensor must fit exactly.  Pickle files are refused.

    ``info`` (JSON-serialisable) says source, architecture, config, mode, num_classes, the 2D
    weights' path and sha256, parameter counts and re-initialised keys; :func:`save_converted`
    writes it as the sidecar and :func:`load_converted` rebuilds the network from it.
    """

    mode = _check_mode(to)
    for given in (source, weights_path):
        if given is not None:
            refuse_pickle_suffix(str(given))
    pretrained = Path(weights_path).expanduser() if weights_path is not None else None
    card_network = None
    if source.startswith(("torchvision:", "transferseg:")):
        architecture = source
    else:
        path = Path(source).expanduser()
        if pretrained is not None:
            raise TransferSegError(f"source {source} is already a weights file; do not also pass weights_path")
        pretrained = path
        if architecture is None:
            if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
                from ..models import load_model

                loaded = load_model(path)
                card_network = loaded.network
                architecture = loaded.card["architecture"]["name"]
                config = loaded.card["architecture"].get("config", {})
            else:
                raise TransferSegError(
                    f"{source}: say which 2D architecture these weights belong to, e.g. "
                    "architecture='torchvision:resnet50' (or --architecture on the command line)")
    if card_network is not None:
        if num_classes is not None:
            raise TransferSegError(f"{source}: num_classes cannot change a TransferSeg model's output size")
        model2d, reinitialised = card_network, []
    else:
        model2d = _build_2d(architecture, num_classes, config)
        reinitialised = _load_2d_weights(model2d, pretrained, architecture, num_classes) if pretrained else []
    model3d = convert(model2d, mode)
    info = {
        "source": source,
        "architecture": architecture,
        "config": {k: v for k, v in (config or {}).items()},
        "num_classes": num_classes,
        "mode": mode,
        "pretrained_weights": None if pretrained is None else {"path": str(pretrained), "sha256": sha256_file(pretrained)},
        "reinitialised": reinitialised,
        "parameters_2d": model3d.transferseg_conversion["parameters_2d"],
        "parameters_3d": model3d.transferseg_conversion["parameters_3d"],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    model3d.transferseg_conversion = {**model3d.transferseg_conversion, **info}
    return model3d, info


@register("converted")
def converted_network(source: str, config: dict | None = None, to: str = "acs") -> nn.Module:
    """The 2D architecture ``source`` (a TransferSeg name or ``torchvision:NAME``) built with
    ``config`` and converted ``to`` 3D, freshly initialised: how a model card names a converted
    network (``{"name": "converted", "config": {"source": "unet2d", "config": {...}, "to": "acs"}}``).
    A card's weights, or a trainer's ``init_weights.convert_from`` (the trained 2D model,
    converted), are loaded into it afterwards.
    """
    if not isinstance(source, str) or not source or source == "converted":
        raise TransferSegError(f"converted: source must name a 2D architecture, e.g. \"unet2d\"; got {source!r}")
    model3d = convert(_build_2d(source, None, config), to)
    model3d.config = {"source": source, "config": dict(config or {}), "to": _check_mode(to)}
    return model3d


def save_converted(model3d: nn.Module, path, info: dict | None = None) -> Path:
    """Write ``model3d``'s state dict to ``path`` (.safetensors) and a JSON sidecar beside it.

    Both files are written atomically (``TransferSegLib.io.atomic_output``).  The sidecar
    (``path`` with ``.json``) holds ``info`` (default: the model's ``transferseg_conversion``,
    set by :func:`convert` / :func:`convert_from_source`: source, architecture, mode, …) plus
    ``weights``: file name, sha256 and size.  Returns the sidecar's path.
    """
    from ..atomic import atomic_output

    path = Path(path)
    if path.suffix != ".safetensors":
        raise TransferSegError(f"{path}: converted models are written as .safetensors (never pickle)")
    record = dict(info if info is not None else getattr(model3d, "transferseg_conversion", {}))
    if "mode" not in record:
        raise TransferSegError("save_converted: this model does not say how it was converted; pass info=")
    digest = save_state_dict(model3d.state_dict(), path,
                             metadata={"format": "pt", "transferseg_conversion": record["mode"]})
    record["weights"] = {"file": path.name, "sha256": digest, "bytes": path.stat().st_size}
    sidecar = path.with_suffix(".json")
    with atomic_output(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sidecar


def load_converted(path) -> tuple[nn.Module, dict]:
    """Rebuild a model written by :func:`save_converted` and load its weights strictly (sha256 checked)."""

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise TransferSegError(f"{path}: the conversion record {sidecar.name} is missing beside the weights")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        mode = info["mode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferSegError(f"{sidecar}: not a TransferSeg conversion record ({e})") from None
    architecture = info.get("architecture")
    if architecture is None:
        raise TransferSegError(f"{sidecar}: this model was converted from an in-memory {info.get('from_class', 'model')}; "
                               f"convert that model again and load {path.name} into it with load_state_dict")
    state = read_state_dict(path)
    expected = info.get("weights", {}).get("sha256")
    if expected != sha256_file(path):
        raise TransferSegError(f"{path}: checksum mismatch with {sidecar.name}; the file is damaged or not this model's")
    model3d = convert(_build_2d(architecture, info.get("num_classes"), info.get("config")), mode)
    try:
        model3d.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TransferSegError(f"{path}: the weights do not fit {architecture} converted to "
                               f"{CONVERSION_MODES[mode]}: {str(e).splitlines()[0]}") from None
    model3d.transferseg_conversion = {**model3d.transferseg_conversion, **info}
    return model3d, info
