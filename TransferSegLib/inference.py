"""Sliding-window inference: the one inferer every TransferSeg network runs through.

A network maps ``(N, C_in, D, H, W)`` → ``(N, K, D, H, W)`` logits (2D networks are wrapped
into a 3D-callable adapter elsewhere).  :func:`sliding_window_inference` tiles a 3D array
with overlapping windows, runs them ``batch_size`` at a time, blends the per-window
probabilities and returns compact outputs aligned to the full array::

    from TransferSegLib.devices import resolve_device
    from TransferSegLib.inference import sliding_window_inference
    from TransferSegLib.volume import roi_from_ras

    result = sliding_window_inference(array, network, patch_size=(64, 128, 128),
                                      device="auto", return_probabilities=True,
                                      progress=callback, cancel=token)
    result.labels          # uint8 (k, j, i), argmax of the blended probabilities
    result.probabilities   # uint8 (K, k, j, i), round(probability × 255)
    result.fallbacks       # e.g. ["out of memory on cuda:0 with 4 windows of 64×128×128 …; retrying with 2"]

Choices, and why:

* **Layout.** Windows are spread evenly so that the first starts at 0, the last ends at the
  array's end and neighbours overlap by at least ``overlap`` (nnU-Net's step rule).
  ``overlap`` defaults to 0.5 (nnU-Net): with Gaussian blending every voxel then gets a
  window in which it lies near the centre; 0.25 (MONAI's default) is ~2.4× cheaper in 3D
  and is a reasonable choice for quick previews.
* **Blending.** ``"gaussian"`` weights each window by a separable Gaussian with
  sigma = patch / 8 per axis (nnU-Net), built as an outer product of 1D Gaussians;
  ``"constant"`` averages windows equally.  What is blended is the *activated* output
  (softmax / sigmoid probabilities), so every blended value stays in [0, 1] and the uint8
  encoding is exact to 1/255; with ``activation="none"`` the raw outputs are blended.
* **Padding.** The patch is rounded up to the network's ``size_multiple`` (an attribute:
  an int or a tuple of 3 ints, 1 if absent) and shrunk per axis to the array's size rounded
  up to that multiple, so a small volume runs in one small window.  Only windows that reach
  past the array's end are padded (on their high side), so the full array is never copied.
  ``pad_mode="edge"`` (default) replicates the border voxels: the network sees values from
  its input distribution whatever the preprocessing (a constant can be far from it, and CT
  scans are often cut through the body along k).  ``pad_mode="constant"`` pads with
  ``pad_value``, default the minimum of the whole input (air in CT).
* **Memory.** Weighted sums are kept in float32, but only for a slab of rows along k: the
  windows run k-row by k-row, and as soon as no remaining window touches a row it is turned
  into its uint8 outputs and its float memory is reused.  The slab is at most about
  ``patch_k + step_k`` rows deep (plus the k-rows one batch spans), so for a 300×512×512 CT
  with a 64-row patch, 2 windows per batch and K = 3 it holds 94 rows, 0.30 GB: less than a
  full-size float16 K-channel buffer (0.47 GB plus a weight map), and exact, where float16 running sums of up to 8 overlapping windows are spaced 2⁻⁸ apart, a
  whole uint8 step.  The weight map is never stored: the weights are separable and the windows
  form a grid, so the total weight at a voxel is a product of three 1D sums.  No float64 or full-size float32 K-channel array is ever made; the
  outputs are uint8 (labels, probabilities) or the K = 1 heatmap.
* **Devices.** ``"auto" | "cpu" | "cuda" | "cuda:N"`` (:func:`resolve_device`).  On CUDA:
  ``torch.inference_mode``, autocast in bfloat16 where the GPU supports it, else float16
  (``amp=False`` to disable), and channels_last_3d input tensors (dropped, and recorded, if
  the network refuses them).  On CPU the network runs in float32.
* **Out of memory** (``torch.OutOfMemoryError`` on any device, since wrappers may raise it,
  and PyTorch's CPU allocator failure): first halve the windows per batch down to 1, then
  halve the largest patch axes (not below ``min_patch``, default 16, nor the size multiple),
  then, on a GPU, start again on the CPU with the requested patch and batch size.  Each
  step is logged as a WARNING on the ``"TransferSegLib.inference"`` logger and recorded in
  ``InferenceResult.fallbacks``; the CUDA cache is emptied between tries.  When nothing is
  left to try, a :class:`TransferSegError` says what to do.
* **ROI.** ``roi=(k0, j0, i0, k1, j1, i1)`` (half-open, array order) runs the network on
  that box only, treated as if it were the whole input (windows do not read outside it).
  Outputs still have the full array's shape: outside the box labels are 0, heatmaps 0 and
  probabilities 0, except channel 0 of a softmax output (background), which is 255, so the
  probabilities still sum to 255 everywhere.  :func:`roi_from_ras` turns a RAS box into one.
* **Progress / cancel.** ``progress(fraction, "inference")`` after every batch, never
  decreasing (after a fallback restart it waits until the new run catches up) and ending
  at 1.0; ``cancel`` is checked before every batch and raises :class:`Cancelled`.
* **The caller's objects.** The network is put in eval mode for the run and every module's
  train/eval flag is restored afterwards; it is moved to the compute device and back to
  where it was; its parameters are not changed.  The input array is only read.

A K = 1 network with ``activation="sigmoid"`` or ``"none"`` (a lesion heatmap or a
regression) gives ``heatmap`` (float32 by default, ``heatmap_dtype=np.float16`` to halve it);
its ``labels`` are ``heatmap >= 0.5`` for sigmoid and ``None`` for ``"none"``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .progress import CancelToken, ProgressCallback, check_cancel
from .devices import empty_cache, is_out_of_memory, resolve_device, synchronize
from .volume import TransferSegError, check_roi

__all__ = [
    "InferenceResult",
    "blending_weights",
    "sliding_window_inference",
    "window_starts",
]

logger = logging.getLogger("TransferSegLib.inference")

ACTIVATIONS = ("softmax", "sigmoid", "none")
BLENDS = ("gaussian", "constant")
PAD_MODES = ("edge", "constant")
DEFAULT_MIN_PATCH = 16
STAGE = "inference"
FINISH_ROWS = 8


# --- layout and weights ---------------------------------------------------------------------
def window_starts(length: int, patch: int, overlap: float) -> list:
    """Start indices of windows of size ``patch`` covering ``[0, max(length, patch))``.

    Neighbours overlap by at least ``overlap × patch``; the windows are spread evenly between
    0 and ``length - patch`` (nnU-Net's rule), so the last one ends exactly at the array's end.
    """
    if length <= patch:
        return [0]
    step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((length - patch) / step - 1e-9) + 1
    spacing = (length - patch) / (count - 1)
    return [int(math.floor(spacing * n + 0.5)) for n in range(count)]


def _axis_weights(patch: Sequence[int], blend: str) -> list:
    """One float64 weight profile per axis: ones, or a Gaussian (sigma = size / 8) centred on the patch, maximum 1."""
    if blend == "constant":
        return [torch.ones(size, dtype=torch.float64) for size in patch]
    profiles = []
    for size in patch:
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        profile = torch.exp(-0.5 * (x / (size / 8.0)) ** 2)  # smallest: about exp(-8) at the ends, never 0
        profiles.append(profile / profile.max())
    return profiles


def blending_weights(patch: Sequence[int], blend: str = "gaussian") -> torch.Tensor:
    """float32 weights of shape ``patch``: ones, or a Gaussian (sigma = patch / 8 per axis, nnU-Net) with maximum 1.

    The Gaussian is the outer product of three 1D Gaussians centred on the patch.  Because
    the weights are separable and the windows form a grid, the sum of the weights of all
    windows at a voxel is the product of three 1D sums, so no weight map is accumulated.
    """
    wk, wj, wi = _axis_weights(patch, blend)
    return (wk[:, None, None] * wj[None, :, None] * wi[None, None, :]).to(torch.float32)


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // int(multiple)) * int(multiple)


def _as_triple(value, name: str) -> tuple:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        triple = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise TransferSegError(f"{name} must be an integer or 3 integers (k, j, i); got {value!r}") from None
    if len(triple) != 3 or min(triple) < 1:
        raise TransferSegError(f"{name} must be 3 positive integers (k, j, i); got {value!r}")
    return triple


def _size_multiple(network: nn.Module) -> tuple:
    return _as_triple(getattr(network, "size_multiple", 1), "the network's size_multiple")


def _fmt(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


@dataclass(frozen=True)
class _Layout:
    patch: tuple         # the patch actually run (a multiple of size_multiple, ≤ the array's size rounded up)
    padded: tuple        # the frame the windows tile: max(array size, patch) per axis
    starts: np.ndarray   # (N, 3) window starts, sorted by k (k-row by k-row)
    margin: tuple = (0, 0, 0)  # voxels dropped at each window edge, per axis, except at the frame's edges

    @classmethod
    def make(cls, shape, patch, multiple, overlap, margin=(0, 0, 0)) -> "_Layout":
        patch = tuple(min(p, _round_up(s, m)) for s, p, m in zip(shape, patch, multiple))
        padded = tuple(max(s, p) for s, p in zip(shape, patch))
        per_axis = [window_starts(s, p, overlap) for s, p in zip(shape, patch)]
        for axis, (starts, p, m) in enumerate(zip(per_axis, patch, margin)):
            kept = p - 2 * m
            if m and (kept < 1 or max(np.diff(starts), default=0) > kept):
                raise TransferSegError(
                    f"a margin of {m} voxels per window edge on axis {'kji'[axis]} leaves {max(kept, 0)} of a "
                    f"{p}-voxel window, which the windows (overlap {overlap:g}) do not tile; raise the overlap to at "
                    f"least {2 * m / p:g} or lower the margin"
                )
        grid = np.meshgrid(*per_axis, indexing="ij")
        return cls(patch, padded, np.stack([g.ravel() for g in grid], axis=1), tuple(margin))

    def profiles(self, blend: str) -> list:
        """Per axis, {window start: its 1D weight profile (float64)}: the blend's profile with
        ``margin`` voxels zeroed at each edge that is not the frame's edge."""
        out = []
        for axis, profile in enumerate(_axis_weights(self.patch, blend)):
            m, size, by_start = self.margin[axis], self.patch[axis], {}
            for start in np.unique(self.starts[:, axis]).tolist():
                weights = profile.clone()
                if m and start > 0:
                    weights[:m] = 0.0
                if m and start + size < self.padded[axis]:
                    weights[size - m:] = 0.0
                by_start[start] = weights
            out.append(by_start)
        return out

    def weight_sums(self, blend: str) -> list:
        """Per axis, the sum over the windows' 1D weights at every position of the padded frame (float64)."""
        sums = []
        for axis, by_start in enumerate(self.profiles(blend)):
            total = torch.zeros(self.padded[axis], dtype=torch.float64)
            for start, weights in by_start.items():
                total[start:start + self.patch[axis]] += weights
            sums.append(total)
        return sums

    def slab_depth(self, batch_size: int) -> int:
        """Rows along k that a batch of windows can touch while older rows are still open."""
        ks = self.starts[:, 0]
        last = np.minimum(np.arange(len(ks)) + batch_size - 1, len(ks) - 1)
        return int(min(np.max(ks[last] - ks) + self.patch[0], self.padded[0]))


def _shrink(patch: tuple, minimum: tuple, multiple: tuple) -> Optional[tuple]:
    """Halve the largest shrinkable axes (rounded up to the size multiple); None when none can shrink."""
    candidates = {}
    for axis, (p, lo, m) in enumerate(zip(patch, minimum, multiple)):
        smaller = max(lo, _round_up(p // 2, m))
        if smaller < p:
            candidates[axis] = smaller
    if not candidates:
        return None
    largest = max(patch[a] for a in candidates)
    return tuple(candidates[a] if a in candidates and patch[a] == largest else p for a, p in enumerate(patch))


# --- result ---------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    """What :func:`sliding_window_inference` returns; every array has the full input's (k, j, i) shape.

    Attributes:
        labels: uint8 argmax of the blended probabilities (None for a K = 1 ``"none"`` network).
        probabilities: uint8 (K, k, j, i), round(probability × 255), when requested.
        heatmap: float32/float16 (k, j, i) for a K = 1 sigmoid / regression network.
        device: the device the result was computed on (after any fallback).
        patch_size, batch_size: what was actually run, after rounding and fallbacks.
        fallbacks: one readable line per out-of-memory retry or dropped optimisation.
        seconds: wall time: ``total``, ``network`` (forward passes) and ``blending``.
        windows: number of windows in the final layout.
    """

    labels: Optional[np.ndarray]
    probabilities: Optional[np.ndarray] = None
    heatmap: Optional[np.ndarray] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    patch_size: tuple = ()
    batch_size: int = 1
    fallbacks: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    windows: int = 0


# --- the run --------------------------------------------------------------------------------
class _Accumulator:
    """Weighted float32 sums over a slab of rows along k; rows no window touches any more are finished."""

    def __init__(self, layout: _Layout, channels: int, depth: int, profiles: list, finish):
        _, pj, pi = layout.padded
        device = next(iter(profiles[0].values())).device
        self.sums = torch.zeros((channels, depth, pj, pi), dtype=torch.float32, device=device)
        self.profiles, self.patch, self.finish = profiles, layout.patch, finish
        self.low = 0   # padded-frame row held in slab row 0
        self.high = 0  # one past the last slab row written

    def add(self, values: torch.Tensor, start) -> None:
        k, j, i = (int(s) for s in start)
        pk, pj, pi = self.patch
        r = k - self.low
        wk, wj, wi = (self.profiles[axis][s] for axis, s in enumerate((k, j, i)))  # this window's profiles
        weights = wk[:, None, None] * wj[None, :, None] * wi[None, None, :]
        self.sums[:, r:r + pk, j:j + pj, i:i + pi].addcmul_(values, weights)
        self.high = max(self.high, r + pk)

    def finish_rows_below(self, row: int) -> None:
        done = row - self.low
        if done <= 0:
            return
        self.finish(self.low, self.sums[:, :done])
        keep = max(self.high - done, 0)
        for row_start in range(0, keep, done):  # move open rows down in blocks of `done` rows: no overlap, no temporary
            rows = slice(row_start, min(row_start + done, keep))
            source = slice(rows.start + done, rows.stop + done)
            self.sums[:, rows] = self.sums[:, source]
        self.sums[:, keep:self.high].zero_()
        self.low, self.high = row, keep


class _Run:
    """One call of sliding_window_inference: the state that survives fallbacks."""

    def __init__(self, array, network, *, patch, multiple, min_patch, overlap, blend, batch_size, device,
                 activation, num_classes, return_probabilities, roi, shape, pad_mode, pad_value, progress,
                 cancel, amp, channels_last, heatmap_dtype, margin):
        self.array, self.network = array, network  # array: (C, k, j, i), already the ROI box
        self.margin = margin
        self.requested_patch, self.patch, self.multiple, self.min_patch = patch, patch, multiple, min_patch
        self.overlap, self.blend = overlap, blend
        self.requested_batch, self.batch_size = batch_size, batch_size
        self.device, self.activation, self.num_classes = device, activation, num_classes
        self.return_probabilities, self.roi, self.shape = return_probabilities, roi, shape
        self.pad_mode, self.pad_value = pad_mode, pad_value
        self.progress, self.cancel, self.amp = progress, cancel, amp
        self.channels_last_request, self.heatmap_dtype = channels_last, heatmap_dtype
        self.fallbacks: list = []
        self.seconds = {"network": 0.0, "blending": 0.0}
        self.reported = 0.0
        self.outputs: dict = {}

    # -- helpers --
    def _report(self, fraction: float) -> None:
        if self.progress is not None and fraction >= self.reported:
            self.reported = fraction
            self.progress(float(fraction), STAGE)

    def _fallback(self, message: str) -> None:
        logger.warning(message)
        self.fallbacks.append(message)

    def _window(self, start, patch) -> np.ndarray:
        box = tuple(slice(int(s), min(int(s) + p, n)) for s, p, n in zip(start, patch, self.array.shape[1:]))
        block = self.array[(slice(None),) + box]
        pads = [(0, int(s) + p - b.stop) for s, p, b in zip(start, patch, box)]
        if any(after for _, after in pads):
            pads = [(0, 0)] + pads
            if self.pad_mode == "edge":
                block = np.pad(block, pads, mode="edge")
            else:
                block = np.pad(block, pads, mode="constant", constant_values=self.pad_value)
        return block

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            out = self.network(x)
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                out = self.network(x)
        if isinstance(out, (tuple, list)):  # deep supervision: the full-resolution head comes first
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 5 or out.shape[0] != x.shape[0] \
                or tuple(out.shape[2:]) != tuple(x.shape[2:]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TransferSegError(
                f"the network returned {got} for an input of {tuple(x.shape)}; sliding-window inference needs "
                "(N, K, D, H, W) outputs of the input's spatial size"
            )
        out = out.float()
        if self.activation == "softmax":
            return out.softmax(dim=1)
        if self.activation == "sigmoid":
            return out.sigmoid()
        return out

    # -- outputs --
    def _allocate_outputs(self, channels: int) -> None:
        if self.num_classes is not None and channels != self.num_classes:
            raise TransferSegError(f"the network gives {channels} output channel(s) but num_classes={self.num_classes}")
        if channels == 1 and self.activation == "softmax":
            raise TransferSegError(
                "the network has one output channel, so softmax would always give 1; use activation='sigmoid' "
                "for a one-class probability or heatmap, or 'none' for a regression output"
            )
        if self.return_probabilities and self.activation == "none" and channels > 1:
            raise TransferSegError("probabilities need activation 'softmax' or 'sigmoid'; with 'none' only labels are given")
        if self.outputs.get("channels") == channels:
            return  # a restart after a fallback overwrites every row again
        self.outputs = {"channels": channels}
        if channels == 1:
            self.outputs["heatmap"] = np.zeros(self.shape, dtype=self.heatmap_dtype)
            if self.activation == "sigmoid":
                self.outputs["labels"] = np.zeros(self.shape, dtype=np.uint8)
        else:
            self.outputs["labels"] = np.zeros(self.shape, dtype=np.uint8)
        if self.return_probabilities and self.activation != "none":
            probabilities = np.zeros((channels,) + tuple(self.shape), dtype=np.uint8)
            if self.activation == "softmax":
                probabilities[0] = 255  # outside the ROI everything is background
            self.outputs["probabilities"] = probabilities

    def _finish(self, low: int, sums: torch.Tensor) -> None:
        """Turn finished rows [low, low + n) of the padded frame into uint8 / heatmap outputs, a few rows at a time."""
        size_k, size_j, size_i = self.array.shape[1:]
        rows = min(sums.shape[1], size_k - low)
        k0, j0, i0 = self.roi[:3]
        wk, wj, wi = self.weight_sums
        for first in range(0, max(rows, 0), FINISH_ROWS):  # small steps keep the int64 argmax temporary small
            last = min(first + FINISH_ROWS, rows)
            mean = sums[:, first:last, :size_j, :size_i]
            mean.div_(wk[low + first:low + last, None, None]).div_(wj[:size_j, None]).div_(wi[:size_i])  # in place
            box = (slice(k0 + low + first, k0 + low + last), slice(j0, j0 + size_j), slice(i0, i0 + size_i))
            if "heatmap" in self.outputs:
                self.outputs["heatmap"][box] = mean[0].cpu().numpy()
                if "labels" in self.outputs:
                    self.outputs["labels"][box] = (mean[0] >= 0.5).cpu().numpy()
            else:
                self.outputs["labels"][box] = mean.argmax(dim=0).to(torch.uint8).cpu().numpy()
            if "probabilities" in self.outputs:
                encoded = mean.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
                self.outputs["probabilities"][(slice(None),) + box] = encoded.cpu().numpy()

    # -- one layout on one device --
    def _run_windows(self, layout: _Layout) -> None:
        starts, total = layout.starts, len(layout.starts)
        while self.index < total:
            check_cancel(self.cancel)
            self.resumable = True  # until the sums are touched, a failed batch can simply be run again
            stop = min(self.index + self.batch_size, total)
            batch = np.stack([self._window(s, layout.patch) for s in starts[self.index:stop]])
            tic = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            out = self._forward(x)
            synchronize(self.device)
            tac = time.perf_counter()
            self.seconds["network"] += tac - tic
            self.resumable = False
            if self.accumulator is None:
                self._allocate_outputs(out.shape[1])
                self.accumulator = _Accumulator(layout, out.shape[1], layout.slab_depth(self.batch_size),
                                                self.profiles, self._finish)
            for values, start in zip(out, starts[self.index:stop]):
                self.accumulator.add(values, start)
            del out, x
            self.index = stop
            next_row = int(starts[self.index, 0]) if self.index < total else layout.padded[0]
            self.accumulator.finish_rows_below(next_row)
            synchronize(self.device)
            self.seconds["blending"] += time.perf_counter() - tac
            self._report(self.index / total)

    def _prepare_device(self) -> None:
        self.network.to(self.device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if cuda and self.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.channels_last = cuda and (self.amp_dtype is not None if self.channels_last_request is None
                                       else bool(self.channels_last_request))

    def run(self) -> None:
        layout = None
        while True:
            if layout is None:
                layout = _Layout.make(self.array.shape[1:], self.patch, self.multiple, self.overlap, self.margin)
                self.patch = layout.patch
                self.index, self.accumulator, self.resumable = 0, None, False
            failure, moving = None, True
            try:
                self._prepare_device()
                self.profiles = [{start: w.to(self.device, torch.float32) for start, w in by_start.items()}
                                 for by_start in layout.profiles(self.blend)]
                self.weight_sums = [w.to(self.device, torch.float32) for w in layout.weight_sums(self.blend)]
                moving = False
                with torch.inference_mode():
                    self._run_windows(layout)
                self.layout = layout
                return
            except Exception as error:  # noqa: BLE001 - out-of-memory is handled below, everything else re-raised
                if is_out_of_memory(error):
                    failure = (str(error).splitlines() or [""])[0][:200] or type(error).__name__
                elif self.channels_last and self.index == 0 and isinstance(error, RuntimeError):
                    failure = "channels_last"
                else:
                    raise
            # outside the except block, so the traceback no longer pins the failed batch's tensors
            if failure == "channels_last":
                self.channels_last_request, layout = False, None
                self._fallback(f"the network does not run on channels_last_3d tensors on {self.device}; "
                               "using contiguous tensors")
                continue
            empty_cache(self.device)
            where = f"on {self.device} with {self.batch_size} window(s) of {_fmt(self.patch)} voxels per batch ({failure})"
            if not moving and self.batch_size > 1:
                self.batch_size = max(1, self.batch_size // 2)
                self._fallback(f"out of memory {where}; retrying with {self.batch_size} window(s) per batch")
                if not self.resumable:
                    layout = None
                continue
            smaller = None if moving else _shrink(self.patch, self.min_patch, self.multiple)
            if smaller is not None:
                self._fallback(f"out of memory {where}; retrying with {_fmt(smaller)}-voxel windows")
                self.patch, layout = smaller, None
                continue
            if self.device.type != "cpu":
                self._fallback(f"out of memory {where}; running on the CPU instead (slower)")
                self.device, layout = torch.device("cpu"), None
                self.patch, self.batch_size = self.requested_patch, self.requested_batch
                continue
            raise TransferSegError(
                f"out of memory {where}, and there is nothing smaller to try; close other programs, "
                "segment a smaller region of interest, or use a machine with more memory"
            )


def _module_device(network: nn.Module) -> Optional[torch.device]:
    devices = {t.device for t in list(network.parameters()) + list(network.buffers())}
    if len(devices) > 1:
        raise TransferSegError(
            f"the network's weights are spread over several devices ({', '.join(sorted(map(str, devices)))}); "
            "move it to one device first"
        )
    return devices.pop() if devices else None


# --- the entry point ------------------------------------------------------------------------
def sliding_window_inference(array: np.ndarray, network: nn.Module, *, patch_size, num_classes: Optional[int] = None,
                             overlap: float = 0.5, blend: str = "gaussian", batch_size: int = 2,
                             device="auto", activation: str = "softmax", return_probabilities: bool = False,
                             roi: Optional[Sequence[int]] = None, progress: Optional[ProgressCallback] = None,
                             cancel: Optional[CancelToken] = None, amp: bool = True, min_patch=None,
                             pad_mode: str = "edge", pad_value: Optional[float] = None,
                             channels_last: Optional[bool] = None, heatmap_dtype=np.float32,
                             margin=0) -> InferenceResult:
    """Run ``network`` over ``array`` window by window and blend the outputs (see the module docstring).

    Args:
        array: the preprocessed volume, (k, j, i), or (C_in, k, j, i) for a multi-channel input;
            any real dtype (windows are cast to float32 one at a time).
        network: maps (N, C_in, D, H, W) → (N, K, D, H, W); may have ``size_multiple``.
        patch_size: window size (k, j, i), or one int for all three axes.
        num_classes: K, checked against the network's output when given.
        overlap: fraction in [0, 1) by which neighbouring windows overlap (default 0.5).
        blend: ``"gaussian"`` (default) or ``"constant"``.
        batch_size: windows per forward pass (halved on out-of-memory).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device.
        activation: ``"softmax"`` (default), ``"sigmoid"`` or ``"none"``.
        return_probabilities: also return uint8 probabilities (K, k, j, i).
        roi: (k0, j0, i0, k1, j1, i1), half-open, array order; None for the whole array.
        progress: ``callable(fraction, stage)``; cancel: a CancelToken.
        amp: autocast on CUDA (bfloat16 if supported, else float16); ignored on the CPU.
        min_patch: smallest patch (int or 3 ints) the out-of-memory fallback may shrink to
            (default 16 per axis, at least the size multiple, at most the requested patch).
        pad_mode: ``"edge"`` (default) or ``"constant"``; pad_value: the constant (default:
            the minimum of the whole input).
        channels_last: use channels_last_3d tensors on CUDA (default: when autocast is on).
        heatmap_dtype: np.float32 (default) or np.float16 for K = 1 outputs.
        margin: voxels (int or (k, j, i)) dropped at each window edge that is not the region's
            edge (weight 0), e.g. H-DenseUNet's 8-slice windows at stride 2 keep their middle
            4 slices: ``patch_size=(8, …), overlap=0.75, margin=(2, 0, 0)``.  The windows must
            still tile the region (overlap ≥ 2·margin / patch; checked).
    """
    tic = time.perf_counter()
    data = _checked_input(array, activation=activation, blend=blend, pad_mode=pad_mode, overlap=overlap,
                          batch_size=batch_size, heatmap_dtype=heatmap_dtype)
    shape = data.shape[1:]
    box = check_roi(roi, shape) if roi is not None else (0, 0, 0) + tuple(shape)
    region = data[:, box[0]:box[3], box[1]:box[4], box[2]:box[5]]
    multiple, patch, floor, margin = _window_sizes(network, patch_size, min_patch, margin)
    if pad_mode == "constant" and pad_value is None:
        pad_value = float(data.min())
    target = resolve_device(device)

    run = _Run(region, network, patch=patch, multiple=multiple, min_patch=floor, overlap=float(overlap), blend=blend,
               batch_size=int(batch_size), device=target, activation=activation, num_classes=num_classes,
               return_probabilities=return_probabilities, roi=box, shape=tuple(shape), pad_mode=pad_mode,
               pad_value=pad_value, progress=progress, cancel=cancel, amp=amp, channels_last=channels_last,
               heatmap_dtype=np.dtype(heatmap_dtype), margin=margin)
    _run_in_eval_mode(network, run)
    run._report(1.0)
    run.seconds["total"] = time.perf_counter() - tic
    return InferenceResult(
        labels=run.outputs.get("labels"), probabilities=run.outputs.get("probabilities"),
        heatmap=run.outputs.get("heatmap"), device=run.device, patch_size=run.layout.patch,
        batch_size=run.batch_size, fallbacks=run.fallbacks, seconds=run.seconds, windows=len(run.layout.starts),
    )


def _checked_input(array, *, activation, blend, pad_mode, overlap, batch_size, heatmap_dtype) -> np.ndarray:
    """The input as (C, k, j, i), once it and the options are checked."""
    data = np.asarray(array)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4 or 0 in data.shape:
        raise TransferSegError(
            f"sliding-window inference needs a 3D array (k, j, i) or (C, k, j, i); got shape {_fmt(np.shape(array))}"
        )
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise TransferSegError(f"the input array must hold numbers; got dtype {data.dtype}")
    if activation not in ACTIVATIONS:
        raise TransferSegError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if blend not in BLENDS:
        raise TransferSegError(f"blend must be one of {', '.join(BLENDS)}; got {blend!r}")
    if pad_mode not in PAD_MODES:
        raise TransferSegError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise TransferSegError(f"overlap must be a fraction in [0, 1); got {overlap}")
    if int(batch_size) < 1:
        raise TransferSegError(f"batch_size must be at least 1; got {batch_size}")
    if np.dtype(heatmap_dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TransferSegError(f"heatmap_dtype must be float32 or float16; got {heatmap_dtype}")
    return data


def _window_sizes(network: nn.Module, patch_size, min_patch, margin) -> tuple:
    """``(multiple, patch, floor, margin)``: the network's size multiple, the window rounded up to it,
    the smallest window the out-of-memory fallback may shrink to, and the margin as (k, j, i)."""
    multiple = _size_multiple(network)
    patch = tuple(_round_up(p, m) for p, m in zip(_as_triple(patch_size, "patch_size"), multiple))
    floor = _as_triple(DEFAULT_MIN_PATCH if min_patch is None else min_patch, "min_patch")
    floor = tuple(min(p, _round_up(max(f, m), m)) for p, f, m in zip(patch, floor, multiple))
    margin = (int(margin),) * 3 if isinstance(margin, (int, np.integer)) else tuple(int(m) for m in margin)
    if len(margin) != 3 or min(margin) < 0:
        raise TransferSegError(f"margin must be a non-negative integer or 3 of them (k, j, i); got {margin!r}")
    return multiple, patch, floor, margin


def _run_in_eval_mode(network: nn.Module, run: _Run) -> None:
    """Run with the network in eval mode, then give each module its own training flag back and the
    network the device it came on."""
    home = _module_device(network)
    modes = [(module, module.training) for module in network.modules()]
    try:
        network.eval()
        run.run()
    finally:
        for module, training in modes:
            module.training = training  # each module's own flag: a frozen BatchNorm stays in eval
        if home is not None:
            network.to(home)
