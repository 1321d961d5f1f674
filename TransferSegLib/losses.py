"""Training losses: focal loss in its L2 (AH-Net eq. 4) and cross-entropy (Lin et al.) forms,
soft Dice, weighted cross-entropy and L2, and :func:`build_loss` from a config dict.

Every loss is called as ``loss(output, target)`` with

* ``output``: (N, C, D, H, W) raw network outputs (logits); any number of spatial axes;
* ``target``: integer class labels (N, D, H, W), or a float map with the output's shape
  (N, C, D, H, W) for the regression losses (``l2``, ``focal_l2``; a lesion heatmap).
  The regression losses one-hot encode an integer target to C channels.

Every loss is a mean over the batch items of a per-item value (voxel losses: the mean over all
voxels; Dice: one value per item), so a batch split evenly across DistributedDataParallel ranks
averages to exactly the loss of the whole batch.  For the same reason the class-weighted
cross-entropy divides by the number of voxels, not by the sum of the weights as
``F.cross_entropy(weight=...)`` does.

``build_loss`` specs (JSON-able)::

    {"name": "ce", "class_weights": [0.78, 0.65, 8.57]}
    {"name": "focal", "gamma": 2.0, "alpha": [0.25, 0.75, 0.75]}     # or "alpha": 0.25 (Lin's binary α)
    {"name": "focal_l2", "gamma": 2.0, "d_max": 100.0, "scale": 1.0, "activation": "none"}
    {"name": "l2", "activation": "none"}                              # or "softmax" / "sigmoid"
    {"name": "l2", "normalise_by_target": 64}   # (focal_l2 too) each item ÷ max(Σ target, 64)
    {"name": "dice", "include_background": false, "smooth": 1e-5}
    {"name": "ce+dice", "class_weights": null, "ce_weight": 1.0, "dice_weight": 1.0}
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .volume import TransferSegError

__all__ = ["CrossEntropy", "DiceLoss", "FocalLossCE", "FocalLossL2", "L2", "LOSSES", "build_loss"]

ACTIVATIONS = ("none", "softmax", "sigmoid")


def _class_vector(values, name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    try:
        vector = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise TransferSegError(f"{name} must be a list of numbers, one per class; got {values!r}") from None
    if vector.numel() == 0 or torch.any(vector < 0) or not torch.all(torch.isfinite(vector)):
        raise TransferSegError(f"{name} must be non-negative numbers, one per class; got {values!r}")
    return vector


def _check_classes(output: torch.Tensor, target: torch.Tensor, vector: Optional[torch.Tensor], name: str) -> None:
    if target.shape != output.shape[:1] + output.shape[2:]:
        raise TransferSegError(
            f"the labels have shape {tuple(target.shape)} but the network output has {tuple(output.shape)}; "
            "expected labels (N, D, H, W) for an output (N, C, D, H, W)"
        )
    if vector is not None and vector.numel() != output.shape[1]:
        raise TransferSegError(f"{name} has {vector.numel()} values but the network has {output.shape[1]} classes")


def _activate(output: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(output, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output)
    return output


def _regression_target(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A float target with the output's shape; integer labels are one-hot encoded."""
    if not target.is_floating_point():
        if target.shape != output.shape[:1] + output.shape[2:]:
            raise TransferSegError(f"labels of shape {tuple(target.shape)} do not fit an output of {tuple(output.shape)}")
        one_hot = F.one_hot(target.long(), output.shape[1])  # (N, D, H, W, C)
        return one_hot.movedim(-1, 1).to(output.dtype)
    if target.shape != output.shape:
        raise TransferSegError(f"the target map has shape {tuple(target.shape)} but the output has {tuple(output.shape)}")
    return target.to(output.dtype)


class CrossEntropy(nn.Module):
    """Softmax cross-entropy, optionally class-weighted: mean over voxels of w_y · (−log p_y).

    Without weights this is ``F.cross_entropy``; with weights it divides by the voxel count
    (not by Σ w_y), so it is a plain per-voxel mean (see the module docstring).  H-DenseUNet's
    liver/tumor weights are [0.78, 0.65, 8.57].
    """

    def __init__(self, class_weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.register_buffer("class_weights", _class_vector(class_weights, "class_weights"), persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_classes(output, target, self.class_weights, "class_weights")
        losses = F.cross_entropy(output, target.long(), weight=self.class_weights, reduction="none")
        return losses.mean()


class FocalLossCE(nn.Module):
    """Multi-class focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", eq. 5):
    mean over voxels of −α_y · (1 − p_y)^γ · log p_y, p = softmax(output).

    ``gamma`` = 0 without ``alpha`` is the cross-entropy.  ``alpha``: a list with one weight per
    class, or one number α for Lin's binary convention (α for every foreground class, 1 − α
    for class 0); None for no weighting.  This is the form the AH-Net paper uses for CT (sec. 3.4).
    """

    def __init__(self, gamma: float = 2.0, alpha=None):
        super().__init__()
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
            raise TransferSegError(f"focal loss gamma must be a number ≥ 0; got {gamma!r}")
        self.gamma = float(gamma)
        self.binary_alpha = None
        vector = None
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            if not 0.0 <= alpha <= 1.0:
                raise TransferSegError(f"focal loss alpha must be in [0, 1] or a list per class; got {alpha!r}")
            self.binary_alpha = float(alpha)
        else:
            vector = _class_vector(alpha, "alpha")
        self.register_buffer("alpha", vector, persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_classes(output, target, self.alpha, "alpha")
        target = target.long()
        log_p = torch.log_softmax(output, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        losses = -log_p
        if self.gamma:
            # clamp: (1 − p)^γ has an infinite slope at p = 1 for γ < 1
            losses = losses * (1.0 - log_p.exp()).clamp(min=1e-12) ** self.gamma
        if self.alpha is not None:
            losses = losses * self.alpha[target]
        elif self.binary_alpha is not None:
            losses = losses * torch.where(target > 0, self.binary_alpha, 1.0 - self.binary_alpha)
        return losses.mean()


def _check_floor(value) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise TransferSegError(f"normalise_by_target must be null or a number of voxels > 0; got {value!r}")
    return float(value)


def _reduce(per_voxel: torch.Tensor, target: torch.Tensor, floor: Optional[float]) -> torch.Tensor:
    """The mean over voxels; with ``floor``, each item's summed loss ÷ max(Σ target, floor), then
    the mean over items: an item weighs by its lesions' share of the error, not their volume."""
    if floor is None:
        return per_voxel.mean()
    axes = tuple(range(1, per_voxel.ndim))
    return (per_voxel.sum(dim=axes) / target.sum(dim=axes).clamp(min=floor)).mean()


class L2(nn.Module):
    """Squared error between ``activation(output)`` and the target map (one-hot labels): its mean
    over voxels, or with ``normalise_by_target`` = F each item's sum ÷ max(Σ target, F).

    A heatmap's plain L2 grows with the lesion's volume, so a 10 mL mass outweighs a
    calcification cluster's few hundred target voxels.  Dividing each item by its target's sum
    weighs a patch by the share of its lesions it misses; F (e.g. the sum of one speck's
    Gaussian, ~60 voxels) bounds the weight of a patch without lesions.  (On the DBT detector
    it did not help: docs/reproduction.md.)
    """

    def __init__(self, activation: str = "none", normalise_by_target: Optional[float] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise TransferSegError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        self.activation, self.floor = activation, _check_floor(normalise_by_target)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _regression_target(output, target)
        if self.floor is None:
            return F.mse_loss(_activate(output, self.activation), target)
        return _reduce((_activate(output, self.activation) - target) ** 2, target, self.floor)


class FocalLossL2(nn.Module):
    """The L2 form of the focal loss, AH-Net (Liu et al. 2018) sec. 3.4, eq. (4):

        FL(y, ŷ) = (ln D(y, ŷ) / ln D_max)^γ · D(y, ŷ),

    with D = ``scale`` · (ŷ − y)² the squared error of each voxel, ``d_max`` the largest D
    expected and γ the focusing parameter; the loss is the mean of FL over the voxels.
    With ``scale`` = 1 (default) this is eq. (4) exactly.

    The weight (ln D / ln D_max)^γ lies in [0, 1] and grows with D for 1 ≤ D ≤ D_max, which is
    what down-weights the easy voxels; for D < 1 the logarithm is negative (the weight would be
    negative or complex), so D < 1 counts as fully easy: we use ln max(D, 1), giving weight 0.
    Hence ``d_max`` must be > 1, and the target's scale matters: a heatmap in [0, 1] has
    D ≤ 1 everywhere, so either scale the heatmap up or set ``scale`` (e.g. 100: errors above
    0.1 count) so that the errors worth learning exceed 1.  The paper switches from L2 to this
    loss "when the L2 loss barely decreases" (a loss switch on a plateau in the trainer).
    ``normalise_by_target`` reduces as in :class:`L2`.
    """

    def __init__(self, gamma: float = 2.0, d_max: float = 100.0, scale: float = 1.0, activation: str = "none",
                 normalise_by_target: Optional[float] = None):
        super().__init__()
        self.floor = _check_floor(normalise_by_target)
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
            raise TransferSegError(f"focal_l2 gamma must be a number ≥ 0; got {gamma!r}")
        if not isinstance(d_max, (int, float)) or isinstance(d_max, bool) or not d_max > 1:
            raise TransferSegError(f"focal_l2 d_max must be a number > 1 (ln d_max divides); got {d_max!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise TransferSegError(f"focal_l2 scale must be a number > 0; got {scale!r}")
        if activation not in ACTIVATIONS:
            raise TransferSegError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        self.gamma, self.d_max, self.scale, self.activation = float(gamma), float(d_max), float(scale), activation

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _regression_target(output, target)
        d = self.scale * (_activate(output, self.activation) - target) ** 2
        weight = (torch.log(d.clamp(min=1.0)) / math.log(self.d_max)) ** self.gamma
        return _reduce(weight * d, target, self.floor)


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss on softmax probabilities, one value per item then averaged:

        1 − mean_c (2 Σ p_c g_c + s) / (Σ p_c + Σ g_c + s)

    over the classes c (class 0 only if ``include_background``), sums over the item's voxels,
    g the one-hot labels, s = ``smooth``.  A class absent from both prediction and labels
    scores 1, so a perfect prediction gives 0.
    """

    def __init__(self, include_background: bool = False, smooth: float = 1e-5):
        super().__init__()
        if not isinstance(smooth, (int, float)) or isinstance(smooth, bool) or smooth <= 0:
            raise TransferSegError(f"dice smooth must be a number > 0; got {smooth!r}")
        self.include_background, self.smooth = bool(include_background), float(smooth)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_classes(output, target, None, "")
        probs = torch.softmax(output, dim=1)
        one_hot = F.one_hot(target.long(), output.shape[1]).movedim(-1, 1).to(probs.dtype)
        first = 0 if self.include_background or output.shape[1] == 1 else 1
        probs, one_hot = probs[:, first:], one_hot[:, first:]
        axes = tuple(range(2, probs.ndim))
        overlap = (probs * one_hot).sum(axes)
        total = probs.sum(axes) + one_hot.sum(axes)
        dice = (2.0 * overlap + self.smooth) / (total + self.smooth)  # (N, C)
        return (1.0 - dice.mean(dim=1)).mean()


class CEPlusDice(nn.Module):
    """``ce_weight`` · cross-entropy + ``dice_weight`` · Dice loss."""

    def __init__(self, class_weights=None, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 include_background: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.ce, self.dice = CrossEntropy(class_weights), DiceLoss(include_background, smooth)
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce_weight * self.ce(output, target) + self.dice_weight * self.dice(output, target)


LOSSES = {
    "ce": CrossEntropy,
    "focal": FocalLossCE,
    "focal_l2": FocalLossL2,
    "l2": L2,
    "dice": DiceLoss,
    "ce+dice": CEPlusDice,
}
# the names the regression losses compare against: a float map, not class labels
REGRESSION_LOSSES = ("l2", "focal_l2")


def build_loss(spec) -> nn.Module:
    """A loss module from ``{"name": ..., **parameters}`` (or just the name); see the module docstring.

    Unknown names and parameters raise a :class:`TransferSegError` naming them.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise TransferSegError(f"a loss is {{\"name\": ..., parameters}} with name one of {', '.join(LOSSES)}; got {spec!r}")
    params = {k: v for k, v in spec.items() if k not in ("name", "switch")}
    name = spec["name"]
    if name not in LOSSES:
        raise TransferSegError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TransferSegError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; it takes {', '.join(allowed) or 'none'}"
        )
    return cls(**params)
