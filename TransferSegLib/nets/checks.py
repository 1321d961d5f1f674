"""The checks every network shares: an input tensor's rank, channels and spatial size, and a
config's positive whole numbers, each one clear error that names the network, never a traceback
from inside torch."""
from __future__ import annotations

import torch

from ..volume import TransferSegError

__all__ = ["check_input", "check_positive", "describe_size"]


def describe_size(sizes) -> str:
    """A shape as the error messages write it, e.g. ``16×30×32``."""
    return "×".join(str(int(s)) for s in sizes)


def check_input(name: str, x: torch.Tensor, in_channels: int, dims: int, multiple: tuple[int, ...] | None = None,
                remedy: str = "crop it") -> None:
    """Clear errors for a tensor that is not (N, C, H, W) (``dims`` 2) or (N, C, D, H, W) (``dims`` 3),
    has another channel count, or, with ``multiple`` (one int per spatial axis), a spatial size
    that is not a multiple of it; ``remedy`` ends that last message."""
    if x.ndim != dims + 2:
        axes = "N, C, D, H, W" if dims == 3 else "N, C, H, W"
        raise TransferSegError(f"{name} expects a {dims + 2}D tensor ({axes}), got shape {describe_size(x.shape)}")
    if x.shape[1] != in_channels:
        raise TransferSegError(f"{name} expects {in_channels} input channel(s), got {x.shape[1]}")
    spatial = tuple(x.shape[2:])
    if multiple is not None and any(s % m for s, m in zip(spatial, multiple)):
        raise TransferSegError(f"{name} input spatial size {describe_size(spatial)} is not a multiple of "
                               f"{describe_size(multiple)}; pad it (the sliding-window inferer does) or {remedy}")


def check_positive(name: str, **values) -> None:
    """Each keyword argument a whole number ≥ 1 (not a bool)."""
    for arg, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TransferSegError(f"{name}: {arg} must be a positive integer, got {value!r}")
