"""Anatomical views of a volume: slicing along the axial, coronal and sagittal planes, running a
2D network over every slice of a view, and stacking its predictions back into a volume.

A view is named by the patient axis its slices are normal to — axial: S, coronal: A,
sagittal: R — and the array axis closest to that patient axis is found from the direction
matrix (:func:`TransferSegLib.volume.anatomical_axes`), never from the axis index, so a CT
stored as sagittal slices has the same axial view as one stored axially.  Inside a slice the
rows and columns follow the patient axes in a fixed order (axial: A then R; coronal: S then R;
sagittal: S then A), so a network sees every view the same way up whatever the file's axis
order; the pipeline's working orientation (e.g. ``"LPS"``) fixes the signs.

The pixels of a coronal or sagittal slice of a 3 × 2 × 2 mm grid are 3 × 2 mm; the 2D networks
are trained on those rectangular pixels, cut from the same working grid they run on (see
docs/reproduction.md, "Multi-view segmentation", for the measurement behind that choice).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .labels import VIEWS
from .progress import CancelToken, ProgressCallback, check_cancel
from .volume import TransferSegError, anatomical_axes

__all__ = ["VIEWS", "NORMALS", "view_permutation", "to_view", "from_view", "directions_of", "predict_view"]

NORMALS = {"axial": "S", "coronal": "A", "sagittal": "R"}
# patient axes along a slice's rows, then its columns
_IN_PLANE = {"axial": ("A", "R"), "coronal": ("S", "R"), "sagittal": ("S", "A")}
_LETTERS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise TransferSegError(f"a view is one of {', '.join(VIEWS)}; got {view!r}")


def view_permutation(directions: np.ndarray, view: str) -> tuple:
    """The axis order that turns a (k, j, i) array into ``view``'s slice stack: (normal axis,
    row axis, column axis), decided from the direction matrix (rows R, A, S; columns i, j, k)."""
    _check_view(view)
    axes = anatomical_axes(directions)
    rows, cols = _IN_PLANE[view]
    return axes[NORMALS[view]], axes[rows], axes[cols]


def directions_of(code: str) -> np.ndarray:
    """The direction matrix (rows R, A, S; columns i, j, k) of an orientation code such as "LPS"."""
    text = str(code).upper()
    if len(text) != 3 or set(text) - set(_LETTERS) or len({_LETTERS[c][0] for c in text}) != 3:
        raise TransferSegError(f"an orientation is three letters from R/L, A/P, S/I, one per axis (e.g. 'LPS'); got {code!r}")
    d = np.zeros((3, 3))
    for column, letter in enumerate(text):
        row, sign = _LETTERS[letter]
        d[row, column] = sign
    return d


def to_view(array: np.ndarray, permutation) -> np.ndarray:
    """``array`` (..., k, j, i) as the view's slice stack (..., slice, row, column): a transposed view, no copy."""
    lead = tuple(range(array.ndim - 3))
    return np.transpose(array, lead + tuple(len(lead) + p for p in permutation))


def from_view(stack: np.ndarray, permutation) -> np.ndarray:
    """Undo :func:`to_view`: (..., slice, row, column) back to (..., k, j, i)."""
    lead = tuple(range(stack.ndim - 3))
    inverse = np.argsort(permutation)
    return np.transpose(stack, lead + tuple(len(lead) + int(p) for p in inverse))


def _two_d(network: torch.nn.Module) -> tuple:
    """(2D network, slices per input stack, size multiple (H, W)) of a slice-stack network."""
    # the networks package brings torchvision (seconds): loaded when a view network runs, not with `methods`
    from .nets.unet import SliceStack2D

    if isinstance(network, SliceStack2D):
        return network.net, network.n_slices, network.size_multiple[-2:]
    n = getattr(network, "in_channels", 1)
    multiple = getattr(network, "size_multiple", (1, 1))
    multiple = (multiple,) * 2 if isinstance(multiple, int) else tuple(multiple)[-2:]
    return network, n, multiple


def predict_view(network: torch.nn.Module, image: np.ndarray, directions: np.ndarray, view: str, *,
                 num_classes: int, batch_size: int = 16, device="cpu",
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 progress_span=(0.0, 1.0)) -> np.ndarray:
    """Run a 2D network over every slice of ``view`` of ``image`` (preprocessed, (k, j, i)) and
    stack its softmax outputs into class probabilities on the image's own grid.

    ``network`` is a slice-stack network (e.g. ``unet2d_multislice``): slice s is predicted
    from slices s - n//2 … s + n//2 of the view (clamped at the ends), ``batch_size`` slices per
    forward pass.  Slices are padded (edge values) to the network's size multiple and cropped
    back.  Returns uint8 (K, k, j, i), probability × 255.
    """
    image = np.asarray(image)
    if image.ndim != 3 or 0 in image.shape:
        raise TransferSegError(f"a view is cut from a 3D volume (k, j, i); got shape {image.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TransferSegError(f"batch_size must be a positive whole number; got {batch_size!r}")
    device = torch.device(device)
    permutation = view_permutation(directions, view)
    stack = to_view(image, permutation)
    depth, height, width = stack.shape
    net, n_slices, multiple = _two_d(network)
    pad_h, pad_w = (-height) % multiple[0], (-width) % multiple[1]
    padded = np.pad(stack, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge") if pad_h or pad_w else stack
    out = np.empty((num_classes, depth, height, width), np.uint8)
    offsets = np.arange(n_slices) - n_slices // 2
    was_training = net.training
    net.eval().to(device)
    low, high = progress_span
    try:
        with torch.inference_mode():
            for start in range(0, depth, batch_size):
                check_cancel(cancel)
                index = np.arange(start, min(start + batch_size, depth))
                neighbours = np.clip(index[:, None] + offsets, 0, depth - 1)
                x = torch.from_numpy(np.ascontiguousarray(padded[neighbours], dtype=np.float32)).to(device)
                logits = net(x)
                if logits.shape[1] != num_classes:
                    raise TransferSegError(f"the {view} network gives {logits.shape[1]} channels; the model's labels "
                                           f"need {num_classes}")
                probabilities = torch.softmax(logits.float(), dim=1)[:, :, :height, :width]
                values = (probabilities * 255.0).round_().to(torch.uint8).cpu().numpy()
                out[:, index[0]:index[-1] + 1] = values.transpose(1, 0, 2, 3)
                if progress is not None:
                    progress(low + (high - low) * (index[-1] + 1) / depth, f"{view} view")
    finally:
        net.train(was_training)
    return np.ascontiguousarray(from_view(out, permutation))

