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
import math
import re
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torch.nn.utils import skip_init
from torchvision.models import convnext
from torchvision.ops import misc as tv_misc

from ..volume import TransferSegError
from .acs import ACSConv, MeanACSConv, SoftACSConv
from .layers3d import InflatedConvTranspose3d, LayerNorm3d, LPPool3d
from .registry import build_network, register
from .torchvision3d import FORWARDS_3D
from .unet import SliceStack2D

__all__ = ["CONVERSION_MODES", "FORWARDS_3D", "InflatedConvTranspose3d", "LayerNorm3d", "convert", "converted_network"]

#: ``to`` value -> the name used in messages.
CONVERSION_MODES = {"acs": "ACS", "mean_acs": "Mean-ACS", "soft_acs": "Soft-ACS", "2.5d": "2.5D", "3d": "3D (I3D)"}
_ACS_MODES = ("acs", "mean_acs", "soft_acs")


class _CannotConvert(Exception):
    """Raised by a converter: ``what`` describes the module, ``why`` says what stands in the way."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what, self.why = what, why


#: Modules known not to work in 3D, with the reason.
_UNSUPPORTED = {
    SliceStack2D: "it already runs a 2D network slice by slice on volumes; convert its .net instead",
}


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
    cls = {"acs": ACSConv, "mean_acs": MeanACSConv, "soft_acs": SoftACSConv}[mode]
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
    lp_pool3d = getattr(nn, "LPPool3d", LPPool3d)  # ours on torch < 2.3
    return lp_pool3d(pool.norm_type, **geometry, ceil_mode=pool.ceil_mode), _same


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
                       nn.Embedding, nn.MultiheadAttention, nn.BatchNorm1d,
                       *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))  # nn.RMSNorm: torch >= 2.4
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


def check_mode(to: str) -> str:
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
    conversion in its ``transferseg_conversion`` dict (which
    :func:`TransferSegLib.conversion.save_converted` writes into its model card).

    Raises TransferSegError naming each module that cannot be converted, e.g.
    "cannot convert features.3 (Conv2d with kernel (3, 1)) to ACS: …".
    """
    mode = check_mode(to)
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


def config_2d(architecture: str, num_classes: int | None, config: dict | None) -> dict:
    """``config`` with the output size ``num_classes`` (when given) under the name ``architecture``
    takes it by: torchvision's ``num_classes``, a TransferSeg network's ``out_channels``."""
    config = dict(config or {})
    if num_classes is not None:
        config["num_classes" if architecture.startswith("torchvision:") else "out_channels"] = num_classes
    return config


def build_2d(architecture: str, num_classes: int | None, config: dict | None) -> nn.Module:
    """A randomly initialised 2D network: ``torchvision:NAME`` or a TransferSeg architecture name."""
    config = config_2d(architecture, num_classes, config)
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
        try:
            return builder(**config)
        except (TypeError, ValueError) as e:
            raise TransferSegError(f"torchvision {name} cannot be built with {config}: {e}") from None
    return build_network(architecture.removeprefix("transferseg:"), config)


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
    model3d = convert(build_2d(source, None, config), to)
    model3d.config = {"source": source, "config": dict(config or {}), "to": check_mode(to)}
    return model3d
