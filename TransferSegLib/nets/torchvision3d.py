"""3D-aware subclasses of modules whose own ``forward`` is 2D-specific (torchvision's segmentation
heads, DenseNet, MobileNetV2, MNASNet, ShuffleNetV2, ConvNeXt's CNBlock, and our UNet2D): the
converter (:mod:`.convert`) swaps them onto a converted copy; their state dicts are unchanged."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torchvision.models import convnext, densenet, mnasnet, mobilenetv2, shufflenetv2
from torchvision.models.segmentation import deeplabv3, fcn, lraspp

from .unet import UNet2D

__all__ = ["FORWARDS_3D"]


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
