"""The speck classifier of the calcification detector (:mod:`TransferSegLib.calcifications`):
a candidate's features in, the logit that it is a calcification speck out.

A multilayer perceptron on standardised features: the training set's mean and standard
deviation of each feature are buffers (stored with the weights, so a model card holds
everything the classifier needs), then ``hidden`` fully connected layers with ReLU and one
output.  ``hidden=()`` is logistic regression.
"""
from __future__ import annotations

import torch
from torch import nn

from ..volume import TransferSegError
from .registry import register

__all__ = ["SpeckClassifier"]


@register("speck_classifier")
class SpeckClassifier(nn.Module):
    """(N, in_features) features → (N,) logits.

    Args:
        in_features: how many features a candidate has (the detector's ``FEATURES``).
        hidden: the widths of the hidden layers, e.g. (32, 16); () for logistic regression.
    """

    def __init__(self, in_features: int = 15, hidden=(32, 16)):
        super().__init__()
        hidden = tuple(hidden)
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise TransferSegError(f"SpeckClassifier in_features must be a positive whole number; got {in_features!r}")
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise TransferSegError(f"SpeckClassifier hidden widths must be positive whole numbers; got {hidden!r}")
        self.in_features = in_features
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Take the mean and standard deviation of each feature from training features (N, in_features)."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[1] != self.in_features or features.shape[0] < 2:
            raise TransferSegError(f"standardisation needs (N ≥ 2, {self.in_features}) features; got {tuple(features.shape)}")
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise TransferSegError(f"SpeckClassifier expects (N, {self.in_features}) features; got {tuple(x.shape)}")
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.layers(x).squeeze(1)
