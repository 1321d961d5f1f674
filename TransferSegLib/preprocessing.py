"""Intensity preprocessing named by a model card, e.g. ``{"hu_window": [-200, 250]}`` → [0, 1].

One function serves training, inference, the CLI and Slicer, so a model always sees what it
was trained on.
"""
from __future__ import annotations

import numpy as np

from .volume import TransferSegError


def preprocess(array: np.ndarray, spec: dict | None) -> np.ndarray:
    """Return a new float32 array; ``array`` is never modified.

    ``spec`` keys:
      * ``hu_window: [lo, hi]`` — clip to the window and scale to [0, 1] (CT);
      * ``normalise: "zscore"`` — subtract the mean and divide by the std (after the window, if any);
      * ``normalise: "minmax"`` — scale the 0.5–99.5 percentile range to [0, 1] (DBT, MR).
    An empty spec returns a float32 copy.
    """
    spec = dict(spec or {})
    out = np.array(array, dtype=np.float32, copy=True)
    window = spec.pop("hu_window", None)
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise TransferSegError(f"preprocessing hu_window {window} must be [low, high] with low < high")
        np.clip(out, lo, hi, out=out)
        out -= lo
        out /= hi - lo
    mode = spec.pop("normalise", None)
    if mode == "zscore":
        mean, std = float(out.mean(dtype=np.float64)), float(out.std(dtype=np.float64))
        out -= mean
        out /= std if std > 0 else 1.0
    elif mode == "minmax":
        lo, hi = np.percentile(out, [0.5, 99.5])
        out -= lo
        out /= (hi - lo) if hi > lo else 1.0
        np.clip(out, 0.0, 1.0, out=out)
    elif mode is not None:
        raise TransferSegError(f"unknown preprocessing normalise {mode!r}; use 'zscore' or 'minmax'")
    if spec:
        raise TransferSegError(f"unknown preprocessing keys {sorted(spec)}")
    return out
