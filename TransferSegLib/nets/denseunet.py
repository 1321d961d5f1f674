"""The 2D DenseUNet-167 and the 3D DenseUNet-65 of H-DenseUNet, and the DenseNet-161 weights for the 2D encoder.

Li et al. 2018, "H-DenseUNet: Hybrid Densely Connected UNet for Liver and Tumor Segmentation
from CT Volumes", IEEE TMI: sec. III-A (2D DenseUNet), sec. III-B (3D counterpart), Table I.

* :class:`DenseUNet2D` -- a DenseNet-161 encoder (torchvision's layout and module names, so
  :func:`load_densenet161_encoder` loads its ImageNet weights by name) and a decoder of five
  upsampling layers: bilinear ×2, UNet summation with an encoder feature, a 3×3 conv.
* :class:`DenseUNet3D` -- the same network in 3D with fewer micro-blocks, pooling only in-plane
  after the stem.

Both are one builder (:class:`DenseUNet`) with one dense layer; small configurations for tests
and demos are the same classes with smaller arguments. Notation: Table I writes 3D sizes as
x × y × z with z between slices; the code uses torch's (D, H, W) with D = z. Comments say
"paper" or "torch": paper 2×2×1 pooling = torch (1, 2, 2).
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from ..volume import TransferSegError
from ..weights import read_state_dict
from .checks import check_input, check_positive
from .registry import register
from .unet import SliceStack2D

__all__ = ["DenseUNet", "DenseUNet2D", "DenseUNet2DSlices", "DenseUNet3D", "load_densenet161_encoder"]


def _layers(dims: int):
    """(Conv, BatchNorm, MaxPool, AvgPool) for 2 or 3 spatial dimensions."""
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d


class _DenseLayer(nn.Module):
    """Micro-block (Table I, fig. 2(c)): BN-ReLU-conv 1×1 to bn_size·k, BN-ReLU-conv 3×3 to k.

    Module names are torchvision's (norm1, conv1, norm2, conv2), so DenseNet weights load by
    name. With ``memory_efficient`` the concatenation and the bottleneck are recomputed in the
    backward pass instead of stored (torchvision's option; Pleiss et al. 2017).
    """

    def __init__(self, dims: int, cin: int, growth: int, bn_size: int, memory_efficient: bool):
        super().__init__()
        conv, norm, _, _ = _layers(dims)
        self.norm1, self.relu1 = norm(cin), nn.ReLU(inplace=True)
        self.conv1 = conv(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = norm(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth, growth, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def _bottleneck(self, features, update_stats: bool = True) -> torch.Tensor:
        x = torch.cat(features, 1)
        norm = self.norm1
        if update_stats or not norm.training or norm.running_mean is None:
            x = norm(x)
        else:  # the same batch statistics and op; copies of the running statistics absorb the update
            x = F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias, True,
                             norm.momentum or 0.0, norm.eps)
        return self.conv1(self.relu1(x))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(f.requires_grad for f in features):
            # The backward pass runs the bottleneck again; only its first run may update
            # BatchNorm's running statistics (torchvision's checkpointing updates them twice).
            calls = []

            def bottleneck(*inputs):
                calls.append(None)
                return self._bottleneck(inputs, update_stats=len(calls) == 1)

            x = cp.checkpoint(bottleneck, *features, use_reentrant=False)
        else:
            x = self._bottleneck(features)
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    """``layers`` micro-blocks; each sees the concatenation of the block input and all earlier
    outputs; returns that concatenation with the last output (cin + layers·k channels)."""

    def __init__(self, dims, layers, cin, growth, bn_size, memory_efficient):
        super().__init__()
        for i in range(layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(dims, cin + i * growth, growth, bn_size, memory_efficient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """Transition layer (sec. III-A): BN-ReLU-conv 1×1 with compression, then 2×2 average pool
    (3D: paper 2×2×1 = torch (1, 2, 2), no pooling between slices)."""

    def __init__(self, dims, cin, cout):
        conv, norm, _, avgpool = _layers(dims)
        pool = (2, 2) if dims == 2 else (1, 2, 2)
        super().__init__(OrderedDict(norm=norm(cin), relu=nn.ReLU(inplace=True), conv=conv(cin, cout, 1, bias=False),
                                     pool=avgpool(pool, stride=pool)))


class DenseUNet(nn.Module):
    """The DenseUNet body shared by :class:`DenseUNet2D` and :class:`DenseUNet3D` (Table I).

    ``encoder`` is torchvision's DenseNet ``features`` layout: conv0 (7×7(×7), stride 2), norm0,
    relu0, pool0 (3×3(×3) max, stride 2), denseblock1, transition1, …, denseblockB, norm5 (then
    a ReLU). The decoder has B + 1 upsampling layers: level l upsamples ×2 (bilinear/trilinear),
    adds the UNet skip (dense block B - l's output, and last the stem's relu0 output; level
    B + 1 has none), and applies conv 3×3(×3) → BN → ReLU. Where a skip's channels differ from
    the upsampled map's, a 1×1(×1) conv projects the skip (``skip_projections``; the official
    code's ``line0`` for DenseUNet-167's first level). ``head`` is a 1×1(×1) conv to
    ``out_channels`` logits (none when out_channels = 0).

    Every conv is preceded by BN-ReLU (sec. III-A): the decoder is written conv → BN → ReLU per
    level, as in the official code, so the features that reach the next conv, the head, and
    H-DenseUNet's fusion (X2d, X3d) are post-activation.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, init_channels: int, growth_rate: int,
                 block_layers, decoder_channels, bn_size: int, compression: float, dropout: float,
                 unet_connections: bool, memory_efficient: bool):
        super().__init__()
        name = type(self).__name__
        self.config = dict(in_channels=in_channels, out_channels=out_channels, init_channels=init_channels,
                           growth_rate=growth_rate, block_layers=list(block_layers),
                           decoder_channels=list(decoder_channels), bn_size=bn_size, compression=compression,
                           dropout=dropout, unet_connections=bool(unet_connections),
                           memory_efficient=bool(memory_efficient))
        block_layers, decoder_channels = list(block_layers), list(decoder_channels)
        check_positive(name, in_channels=in_channels, init_channels=init_channels, growth_rate=growth_rate,
                       bn_size=bn_size)
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 0:
            raise TransferSegError(f"{name}: out_channels must be a whole number ≥ 0 (0: no classifier), "
                                   f"got {out_channels!r}")
        if not block_layers:
            raise TransferSegError(f"{name}: block_layers must list at least one dense block")
        check_positive(name, **{f"block_layers[{i}]": n for i, n in enumerate(block_layers)})
        if len(decoder_channels) != len(block_layers) + 1:
            raise TransferSegError(
                f"{name}: decoder_channels needs one entry per upsampling layer, len(block_layers) + 1 = "
                f"{len(block_layers) + 1}; got {len(decoder_channels)} ({decoder_channels})"
            )
        check_positive(name, **{f"decoder_channels[{i}]": n for i, n in enumerate(decoder_channels)})
        if not 0 < compression <= 1:
            raise TransferSegError(f"{name}: compression must be in (0, 1] (paper 0.5), got {compression!r}")
        if not 0 <= dropout < 1:
            raise TransferSegError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        conv, norm, maxpool, _ = _layers(dims)
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels
        self.unet_connections = bool(unet_connections)

        layers = OrderedDict(conv0=conv(in_channels, init_channels, 7, stride=2, padding=3, bias=False),
                             norm0=norm(init_channels), relu0=nn.ReLU(inplace=True),
                             pool0=maxpool(3, stride=2, padding=1))
        channels, skips = init_channels, [init_channels]  # skips: relu0, then each dense block but the last
        for i, n in enumerate(block_layers):
            layers[f"denseblock{i + 1}"] = _DenseBlock(dims, n, channels, growth_rate, bn_size, memory_efficient)
            channels += n * growth_rate
            if i < len(block_layers) - 1:
                skips.append(channels)
                out = int(channels * compression)  # as torchvision and the official code: floor
                layers[f"transition{i + 1}"] = _Transition(dims, channels, out)
                channels = out
        layers["norm5"] = norm(channels)
        self.encoder = nn.Sequential(layers)
        self._skip_names = {"relu0", *(f"denseblock{i + 1}" for i in range(len(block_layers) - 1))}
        self.encoder_channels = channels

        self.skip_projections = nn.ModuleDict()
        self.decoder = nn.ModuleList()
        for level, cout in enumerate(decoder_channels):
            if level < len(skips) and skips[-1 - level] != channels:
                self.skip_projections[str(level)] = conv(skips[-1 - level], channels, 1, bias=False)
            # no bias: the BatchNorm after it cancels one (the official Keras convs carry one)
            self.decoder.append(nn.Sequential(conv(channels, cout, 3, padding=1, bias=False), norm(cout),
                                              nn.ReLU(inplace=True)))
            channels = cout
        self.feature_channels = channels
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = conv(channels, out_channels, 1) if out_channels else None

        # Inputs halve B + 1 times in-plane (conv0, pool0, B - 1 transitions) and twice between
        # slices in 3D (conv0, pool0; paper 2×2×1 transitions keep the slices).
        inplane = 2 ** (len(block_layers) + 1)
        self.size_multiple = (inplane, inplane) if dims == 2 else (4, inplane, inplane)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder": the DenseNet part (ImageNet-initialised in 2D), "decoder": upsampling layers,
        skip projections and the head (randomly initialised, sec. III-C)}."""
        decoder = [*self.skip_projections.parameters(), *self.decoder.parameters()]
        if self.head is not None:
            decoder += list(self.head.parameters())
        return {"encoder": list(self.encoder.parameters()), "decoder": decoder}

    def _check(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        check_input(name, x, self.in_channels, self.dims)
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % m for s, m in zip(spatial, self.size_multiple)):
            raise TransferSegError(
                f"{name} input spatial size {'×'.join(map(str, spatial))} is not a multiple of "
                f"{'×'.join(map(str, self.size_multiple))} (torch order); pad it (the sliding-window inferer does) "
                f"or crop it"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last upsampling layer's output (N, feature_channels, *spatial): X2d / X3d of sec. III-B."""
        self._check(x)
        skips = []
        for name, module in self.encoder.named_children():
            x = module(x)
            if name in self._skip_names:
                skips.append(x)
        x = F.relu(x)  # after norm5, as torchvision's DenseNet.forward and the official code
        mode = "bilinear" if self.dims == 2 else "trilinear"
        for level, up in enumerate(self.decoder):
            skip = skips[-1 - level] if level < len(skips) else None
            # the last level, past the stem's stride-2 conv, doubles every axis
            size = skip.shape[2:] if skip is not None else tuple(2 * s for s in x.shape[2:])
            x = F.interpolate(x, size=size, mode=mode, align_corners=False)
            if skip is not None and self.unet_connections:
                key = str(level)
                x = x + (self.skip_projections[key](skip) if key in self.skip_projections else skip)
            x = up(x)
        return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, *spatial) → (N, out_channels, *spatial) logits (the features when out_channels = 0)."""
        x = self.features(x)
        return self.head(x) if self.head is not None else x


@register("denseunet2d")
class DenseUNet2D(DenseUNet):
    """2D DenseUNet-167 (H-DenseUNet sec. III-A, Table I): (N, in_channels, H, W) → (N, out_channels, H, W) logits.

    Encoder: DenseNet-161 (96 initial channels, growth rate 48, dense blocks 6/12/36/24 of
    BN-ReLU-conv1×1(192)-BN-ReLU-conv3×3(48), transitions with compression 0.5 and 2×2 average
    pooling). Decoder: five upsampling layers of 768, 384, 96, 96 and 64 channels summed with
    dense blocks 3, 2, 1 and the stem (Table I), then a 1×1 conv to ``out_channels``. For
    volumes, three adjacent slices are the channels: see ``hdenseunet.to_adjacent_slices``.

    The paper configuration (in 3, out 3) has 49,524,227 parameters (paper: "around 40M"): the
    encoder is exactly torchvision's densenet161 ``features`` (26,472,000, loadable with
    :func:`load_densenet161_encoder`), the decoder 23,052,227, of which 4,663,296 are the skip
    projection below. H and W must be
    multiples of 2**(len(block_layers) + 1) (32 for the paper); see ``size_multiple``.

    Deviations: the first level's skip (dense block 3, 2112 channels) reaches the upsampled
    2208 channels through a 1×1 conv (official code's ``line0``; Table I is silent); bilinear
    upsampling as the paper says (the official code upsamples nearest); no conv bias before BN.

    Args: in_channels (3 adjacent slices), out_channels (paper 3: background, liver, tumor; 0: no
    classifier); init_channels (96), growth_rate (48), block_layers ([6, 12, 36, 24]),
    decoder_channels ([768, 384, 96, 96, 64]), bn_size (4: bottleneck = 4·k), compression (0.5);
    dropout after the last upsampling layer (0; the official 2D training code used 0.3);
    unet_connections (True; False for the warm-up of sec. III-C, same weights);
    memory_efficient (False; True recomputes each micro-block's bottleneck in backward).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, init_channels: int = 96, growth_rate: int = 48,
                 block_layers=(6, 12, 36, 24), decoder_channels=(768, 384, 96, 96, 64), bn_size: int = 4,
                 compression: float = 0.5, dropout: float = 0.0, unet_connections: bool = True,
                 memory_efficient: bool = False):
        super().__init__(2, in_channels, out_channels, init_channels, growth_rate, block_layers, decoder_channels,
                         bn_size, compression, dropout, unet_connections, memory_efficient)


@register("denseunet2d_slices")
class DenseUNet2DSlices(SliceStack2D):
    """The 2D DenseUNet on a volume, slice by slice, each slice seeing itself and its two
    neighbours (edge slices repeated): H-DenseUNet's first stage and the "2D DenseUNet" of
    Table II. Same arguments as :class:`DenseUNet2D` (``in_channels`` = 3 adjacent slices)
    plus ``slice_batch``; the 2D network is ``net`` (an H-DenseUNet takes it as ``net2d``).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, slice_batch: int = 16, **config):
        super().__init__(DenseUNet2D(in_channels=in_channels, out_channels=out_channels, **config),
                         slice_batch=slice_batch)
        self.config = dict(self.net.config, slice_batch=slice_batch)


@register("denseunet3d")
class DenseUNet3D(DenseUNet):
    """3D DenseUNet-65 (H-DenseUNet sec. III-B, Table I): (N, in_channels, D, H, W) → (N, out_channels, D, H, W) logits.

    Stem: conv 7×7×7, 96, stride 2 and 3×3×3 max pool, stride 2 (all axes); dense blocks 3/4/12/8
    of BN-ReLU-conv1×1×1(128)-BN-ReLU-conv3×3×3(32) (growth rate 32); transitions with
    compression 0.5 and paper 2×2×1 = torch (1, 2, 2) average pooling. Decoder: upsampling
    layers of 504, 224, 192, 96 and 64 channels, paper 2×2×1 (torch (1, 2, 2)) for the first
    three and 2×2×2 for the last two, each summed with dense block 3, 2, 1 and the stem, then a
    1×1×1 conv. In H-DenseUNet it sees the image and the 2D network's scaled logits (in 4).

    The paper configuration (in 4, out 3) has 16,400,707 parameters: the paper's "around 40M"
    does not follow from Table I's channels (its decoder convs alone are 11.7 M). D must be a
    multiple of 4 and H, W of 2**(len(block_layers) + 1) (32); see ``size_multiple``.

    Deviations: every skip reaches the upsampled map through a 1×1×1 conv, as Table I's skip
    channels (496, 224, 192, 96) never equal the upsampled ones (504, 504, 224, 192) (the
    official code has no 3D skips at all); trilinear upsampling; no conv bias before BN.

    Args: as :class:`DenseUNet2D`; defaults in_channels 1, init_channels 96, growth_rate 32,
    block_layers [3, 4, 12, 8], decoder_channels [504, 224, 192, 96, 64].
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, init_channels: int = 96, growth_rate: int = 32,
                 block_layers=(3, 4, 12, 8), decoder_channels=(504, 224, 192, 96, 64), bn_size: int = 4,
                 compression: float = 0.5, dropout: float = 0.0, unet_connections: bool = True,
                 memory_efficient: bool = False):
        super().__init__(3, in_channels, out_channels, init_channels, growth_rate, block_layers, decoder_channels,
                         bn_size, compression, dropout, unet_connections, memory_efficient)


# torchvision's pre-0.3 densenet files name layer parameters "norm.1.weight" for "norm1.weight".
_OLD_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_densenet161_encoder(model: DenseUNet2D, path) -> dict:
    """Load torchvision's densenet161 ``features.*`` weights from the safetensors file ``path``
    into ``model.encoder`` (weights and BatchNorm running statistics); returns
    ``{"loaded": [...], "missing": [...], "unexpected": [...]}`` by key.

    "missing" lists encoder keys the file lacks (they keep their initial values), "unexpected"
    the file's keys that have no place in the encoder (the ImageNet classifier is always there).
    The file is read with :func:`TransferSegLib.weights.read_state_dict` (never unpickled).
    Refused with a clear error: a file with no encoder key at all, or one whose shapes do not fit
    (e.g. a small configuration, or another DenseNet).
    """
    if not isinstance(model, DenseUNet) or model.dims != 2:
        raise TransferSegError(f"DenseNet-161 weights load into a DenseUNet2D encoder, not {type(model).__name__}")
    source = read_state_dict(path)
    target = model.encoder.state_dict()
    mapped, unexpected = {}, []
    for key, tensor in source.items():
        if not key.startswith("features."):
            unexpected.append(key)
            continue
        name = key[len("features."):]
        old = _OLD_LAYER_KEY.match(name)
        name = old.group(1) + old.group(2) if old else name
        if name in target:
            mapped[name] = tensor
        else:
            unexpected.append(key)
    if not mapped:
        raise TransferSegError(
            f"{path}: no torchvision DenseNet 'features.*' weight fits this DenseUNet2D encoder; "
            f"the file has {len(source)} tensors (e.g. {', '.join(list(source)[:3])})"
        )
    wrong = [f"{k}: file {tuple(t.shape)}, encoder {tuple(target[k].shape)}"
             for k, t in mapped.items() if t.shape != target[k].shape]
    if wrong:
        raise TransferSegError(
            f"{path}: {len(wrong)} weights do not fit the encoder (is it densenet161 and the paper "
            f"configuration?): {'; '.join(wrong[:3])}"
        )
    model.encoder.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "missing": sorted(set(target) - set(mapped)), "unexpected": sorted(unexpected)}
