"""``cascade``: H-DenseUNet's liver → tumor cascade (Li et al. 2018, sec. III-D; the official
code's inference settings).

Components: ``coarse`` -- a liver locator on its own coarse working grid (its spec's
``working_spacing_mm``; a slice network when its spec names a ``view``); ``fine`` -- the
H-DenseUNet on the model's working grid.

1. The coarse network's foreground (P(label ≥ 1) ≥ 0.5), its largest component, gives the
   liver box, taken to the working grid through patient coordinates and grown by
   ``box_margin_mm``.
2. The fine network runs inside the box only, in windows of ``slices`` slices at ``stride``
   (the sliding-window inferer with overlap 1 − stride/slices) whose ``margin`` edge slices
   are dropped (weight 0) except at the box's own ends.
3. Labels from nested thresholds: label c where P(label ≥ c) ≥ ``thresholds[c - 1]`` (paper:
   liver 0.5, tumor 0.9), on the working grid and again after the probabilities are brought
   back to the input grid (``MethodOutput.decide``).  The largest liver component, its holes
   filled and the tumors kept inside it are the card's ``postprocessing``.

Method config (card ``method.config``; defaults in brackets): thresholds [0.5, 0.9], slices [8],
stride [2], margin [2], box_margin_mm [12], batch_size [1].
"""
from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from ..inference import sliding_window_inference
from ..preprocessing import preprocess
from ..progress import StageProgress, check_cancel
from ..resample import to_spacing
from ..views import predict_view
from ..volume import TransferSegError
from .registry import MethodContext, MethodOutput, register_method
from .single import run_component

DEFAULTS = {"thresholds": [0.5, 0.9], "slices": 8, "stride": 2, "margin": 2, "box_margin_mm": 12.0, "batch_size": 1}


def nested_threshold_labels(probabilities, thresholds, scale: float = 255.0) -> torch.Tensor:
    """uint8 labels from class probabilities (K, …) on a 0…``scale`` scale: label c (1 ≤ c < K)
    where P(label ≥ c) ≥ thresholds[c - 1] · scale and label c − 1 holds (nested regions)."""
    p = torch.as_tensor(probabilities).float()
    if len(thresholds) != p.shape[0] - 1:
        raise TransferSegError(f"cascade: {len(thresholds)} thresholds for {p.shape[0] - 1} labels; give one per label")
    labels = torch.zeros(p.shape[1:], dtype=torch.uint8)
    at_least = p[1:].sum(0)  # P(label ≥ 1)
    inside = torch.ones(p.shape[1:], dtype=torch.bool)
    for c, threshold in enumerate(thresholds, start=1):
        inside &= at_least >= float(threshold) * scale - 1e-3  # uint8 rounding: 0.5 · 255 is stored as 128
        labels[inside] = c
        at_least -= p[c]
    return labels


def _settings(context: MethodContext) -> dict:
    config = {**DEFAULTS, **(context.model.method.get("config") or {})}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise TransferSegError(f"{context.model.name}: method.config.{unknown[0]} is not a cascade setting; "
                               f"there are {', '.join(DEFAULTS)}")
    thresholds = config["thresholds"]
    if not (isinstance(thresholds, list) and len(thresholds) == context.num_classes - 1
            and all(isinstance(t, (int, float)) and 0 < t <= 1 for t in thresholds)):
        raise TransferSegError(f"{context.model.name}: method.config.thresholds must be {context.num_classes - 1} "
                               f"probabilities in (0, 1], one per label; got {thresholds!r}")
    slices, stride, margin = (int(config[k]) for k in ("slices", "stride", "margin"))
    if not (slices >= 1 and 1 <= stride and 0 <= margin and stride <= slices - 2 * margin):
        raise TransferSegError(f"{context.model.name}: windows of {slices} slices at stride {stride} with {margin} "
                               "edge slices dropped do not cover the volume; need stride ≤ slices − 2·margin")
    return config


def liver_box(context: MethodContext, component, margin_mm: float, report=None):
    """``(box, coarse foreground volume in mL)``: the coarse network's largest foreground component
    as a (k0, j0, i0, k1, j1, i1) box on the working grid, grown by ``margin_mm``; None if empty."""
    spec = component.spec
    volume = context.volume
    spacing = spec.get("working_spacing_mm")
    coarse = to_spacing(volume, spacing) if spacing and not np.allclose(spacing, volume.spacing) else volume
    image = preprocess(coarse.array, spec.get("preprocessing"))
    if spec.get("view"):
        batch = int((spec.get("inference") or {}).get("batch_size", 16))
        probabilities = predict_view(component.network, image, coarse.directions, spec["view"],
                                     num_classes=context.num_classes, batch_size=batch, device=context.device,
                                     cancel=context.cancel, progress=report)
    else:
        probabilities = run_component(context, component, image, progress=report).probabilities
    foreground = probabilities[1:].sum(0, dtype=np.int32) >= 128
    components, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return None, 0.0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(sizes.argmax())
    hits = [np.flatnonzero(np.any(largest, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([h[0] for h in hits], float) - 0.5  # voxel corners of the box
    hi = np.array([h[-1] for h in hits], float) + 0.5
    corners = np.array([[k, j, i] for k in (lo[0], hi[0]) for j in (lo[1], hi[1]) for i in (lo[2], hi[2])])
    kji = volume.ras_to_ijk_points(coarse.ijk_to_ras_points(corners))
    grow = margin_mm / np.asarray(volume.spacing, float)
    start = np.clip(np.floor(kji.min(0) + 0.5 - grow), 0, volume.shape).astype(int)
    stop = np.clip(np.ceil(kji.max(0) + 0.5 + grow), 0, volume.shape).astype(int)
    if np.any(stop <= start):
        return None, 0.0
    ml = float(sizes.max()) * float(np.prod(coarse.spacing)) / 1000.0
    return tuple(int(v) for v in (*start, *stop)), ml


@register_method("cascade")
def run(context: MethodContext) -> MethodOutput:
    if context.task != "segmentation":
        raise TransferSegError("method 'cascade' segments; the model's task is " + repr(context.task))
    missing = [name for name in ("coarse", "fine") if name not in context.model.components]
    if missing:
        raise TransferSegError(f"method 'cascade' needs components coarse and fine; {context.model.name} lacks "
                               f"{', '.join(missing)}")
    config = _settings(context)
    thresholds = [float(t) for t in config["thresholds"]]
    report = StageProgress(context.progress)
    timings = {}

    tic = time.perf_counter()
    report(0.0, "finding the liver (coarse)")
    box, coarse_ml = liver_box(context, context.model.components["coarse"], float(config["box_margin_mm"]),
                               report.sub(0.0, 0.15))
    timings["coarse"] = time.perf_counter() - tic
    check_cancel(context.cancel)
    shape = context.volume.shape
    summary = {"thresholds": thresholds, "coarse_foreground_ml": round(coarse_ml, 1),
               "liver_box_kji": list(box) if box else None}

    def decide(probabilities):
        return nested_threshold_labels(probabilities, thresholds)

    if box is None:  # nothing to segment: background everywhere
        probabilities = np.zeros((context.num_classes,) + shape, np.uint8)
        probabilities[0] = 255
        summary["note"] = "the coarse network found no liver"
        return MethodOutput(probabilities=probabilities, labels=np.zeros(shape, np.uint8), device=str(context.device),
                            summary=summary, timings=timings, decide=decide)

    tic = time.perf_counter()
    fine = context.model.components["fine"]
    image = preprocess(context.volume.array, fine.spec.get("preprocessing"))
    in_plane = tuple((fine.spec.get("inference") or {}).get("patch_size") or fine.spec["patch_size"])[1:]
    slices, stride = int(config["slices"]), int(config["stride"])
    result = sliding_window_inference(
        image, fine.network, patch_size=(slices, *in_plane), num_classes=context.num_classes,
        overlap=1.0 - stride / slices, margin=(int(config["margin"]), 0, 0), batch_size=int(config["batch_size"]),
        device=context.device, activation="softmax", return_probabilities=True, roi=box,
        progress=report.sub(0.15, 1.0), cancel=context.cancel)
    timings["fine"] = time.perf_counter() - tic
    labels = decide(result.probabilities).numpy()
    return MethodOutput(probabilities=result.probabilities, labels=labels, device=str(result.device),
                        fallbacks=list(result.fallbacks), summary=summary, timings=timings, decide=decide)
