"""Segmentation metrics: Dice (per case and global), VOE, RVD, ASD, RMSD and LiTS tumor burden.

Definitions follow the LiTS challenge and the 3DIRCADb evaluation used by the H-DenseUNet
paper (Sec. IV-B):

* ``dice``      2·|P∩R| / (|P| + |R|).
* ``dice_per_case`` / ``dice_global``  LiTS: the mean of per-volume Dice, and one Dice over
  all volumes pooled, 2·Σ|P∩R| / (Σ|P| + Σ|R|).
* ``voe``       volumetric overlap error, 1 − |P∩R| / |P∪R| (1 − Jaccard).
* ``rvd``       relative volume difference, (|P| − |R|) / |R|, signed: > 0 over-segments.
* ``asd``       average symmetric surface distance (mm): the mean of the *pooled* set of
  distances from every surface voxel of P to the surface of R and from every surface voxel
  of R to the surface of P (MONAI's ``compute_average_surface_distance(symmetric=True)``
  and medpy ≥ 0.5 ``assd`` agree on this pooling; it is not the mean of the two directional
  means).
* ``rmsd``      root-mean-square symmetric surface distance (mm), the same pooling.
* ``tumor_burden_rmse``  LiTS: tumor burden = tumor volume / liver volume (liver including
  tumor), one fraction per case; RMSE over cases of predicted − reference burden.

Masks: boolean or integer arrays, nonzero = foreground; ``label=`` picks one value of a
multi-label map instead. Floating-point arrays are accepted only if every value is a whole
number (a label map that went through a float32 ``Volume``); a probability map is refused.

Surface: the foreground voxels with at least one 6-connected (face) background neighbour;
voxels outside the array count as background, so foreground touching the array border is
surface. This is MONAI's ``get_mask_edges`` (``mask ^ scipy.ndimage.binary_erosion(mask)``,
whose default structuring element is the 6-connected cross and whose border value is 0).
Distances are Euclidean between voxel centres, in mm, with ``spacing`` in ARRAY-AXIS order
(k, j, i) like every spacing in TransferSegLib (DESIGN.md).

Empty masks (P = prediction, R = reference; "empty" = no foreground voxel):

==================  ===================  ==================  ==================
metric              P and R both empty   only P empty        only R empty
==================  ===================  ==================  ==================
dice                1.0                  0.0                 0.0
dice_global         1.0 (all cases)      pooled formula      pooled formula
voe                 0.0                  1.0                 1.0
rvd                 0.0                  −1.0                +inf
asd, rmsd           0.0                  inf                 inf
tumor burden        empty liver → burden 0.0 (no liver, no tumor)
==================  ===================  ==================  ==================

``dice_per_case`` averages ``dice`` and so inherits its row. ``rvd`` returns +inf rather
than nan when only R is empty so that a mean over cases cannot silently drop the case.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .heatmaps import box_contains
from .volume import TransferSegError, describe_shape

__all__ = [
    "asd",
    "dice",
    "dice_global",
    "froc",
    "dice_per_case",
    "FROC_RATES",
    "rmsd",
    "rvd",
    "tumor_burden",
    "tumor_burden_rmse",
    "voe",
]

# 6-connected (face) neighbourhood, MONAI's and medpy's surface convention.
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _as_mask(array, label: int | None, name: str) -> np.ndarray:
    """A boolean foreground mask: ``array == label`` if a label is given, else ``array != 0``."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise TransferSegError(
            f"the {name} holds non-integer values (a probability map?); threshold it into a label map first"
        )
    if array.dtype.kind not in "biuf":
        raise TransferSegError(f"the {name} must be a boolean or integer mask; got dtype {array.dtype}")
    if label is not None:
        return array == label
    return array if array.dtype == bool else array != 0


def _mask_pair(pred, ref, label: int | None) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise TransferSegError(
            f"prediction shape {describe_shape(p.shape)} does not match reference shape "
            f"{describe_shape(r.shape)} (axes k, j, i); both must lie on the same voxel grid"
        )
    return _as_mask(p, label, "prediction"), _as_mask(r, label, "reference")


def _check_spacing(spacing) -> tuple[float, float, float]:
    values = np.asarray(spacing, dtype=float).ravel() if spacing is not None else np.array([])
    if values.shape != (3,):
        raise TransferSegError(f"spacing must have 3 values in array-axis order (k, j, i); got {spacing!r}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise TransferSegError(
            f"voxel spacing {tuple(float(v) for v in values)} mm (k, j, i) is zero, negative or not a number"
        )
    return tuple(float(v) for v in values)


def _check_cases(preds, refs) -> tuple[list, list]:
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise TransferSegError(f"{len(preds)} predictions but {len(refs)} references; give one of each per case")
    if not preds:
        raise TransferSegError("no cases given; the metric needs at least one prediction and reference")
    return preds, refs


def dice(pred, ref, *, label: int | None = None) -> float:
    """Dice coefficient 2·|P∩R| / (|P| + |R|).

    Both empty → 1.0 (nothing to find, nothing found); exactly one empty → 0.0.
    """
    p, r = _mask_pair(pred, ref, label)
    size = np.count_nonzero(p) + np.count_nonzero(r)
    if size == 0:
        return 1.0
    return 2.0 * np.count_nonzero(p & r) / size


def dice_per_case(preds: Sequence, refs: Sequence, *, label: int | None = None) -> float:
    """LiTS "Dice per case": the mean of :func:`dice` over the cases (empty cases as in :func:`dice`)."""
    preds, refs = _check_cases(preds, refs)
    return float(np.mean([dice(p, r, label=label) for p, r in zip(preds, refs)]))


def dice_global(preds: Sequence, refs: Sequence, *, label: int | None = None) -> float:
    """LiTS "Dice global": 2·Σ|P∩R| / (Σ|P| + Σ|R|), all cases pooled into one.

    Large cases weigh more than small ones, unlike :func:`dice_per_case`.
    Every case empty in both → 1.0.
    """
    preds, refs = _check_cases(preds, refs)
    overlap = size = 0
    for pred, ref in zip(preds, refs):
        p, r = _mask_pair(pred, ref, label)
        overlap += np.count_nonzero(p & r)
        size += np.count_nonzero(p) + np.count_nonzero(r)
    if size == 0:
        return 1.0
    return 2.0 * overlap / size


def voe(pred, ref, *, label: int | None = None) -> float:
    """Volumetric overlap error 1 − |P∩R| / |P∪R| (= 1 − Jaccard), 0 is perfect.

    Both empty → 0.0; exactly one empty → 1.0.
    """
    p, r = _mask_pair(pred, ref, label)
    union = np.count_nonzero(p | r)
    if union == 0:
        return 0.0
    return 1.0 - np.count_nonzero(p & r) / union


def rvd(pred, ref, *, label: int | None = None) -> float:
    """Relative volume difference (|P| − |R|) / |R|, signed: positive when P is larger.

    Reference empty: 0.0 if the prediction is empty too, else +inf. Prediction empty and
    reference not: −1.0 (the formula).
    """
    p, r = _mask_pair(pred, ref, label)
    n_pred, n_ref = np.count_nonzero(p), np.count_nonzero(r)
    if n_ref == 0:
        return 0.0 if n_pred == 0 else math.inf
    return (n_pred - n_ref) / n_ref


def _union_box(p: np.ndarray, r: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The bounding box of P ∪ R grown by ``margin`` voxels (clipped to the array)."""
    union = p | r
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, union.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    # border_value=0: voxels outside the array are background, so the border is surface.
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def _pooled_surface_distances(pred, ref, spacing, label) -> np.ndarray:
    """Distances (mm) from P's surface voxels to R's surface and from R's to P's, pooled.

    The distance to an empty surface is inf; two empty masks give no distance at all.
    """
    spacing = _check_spacing(spacing)
    p, r = _mask_pair(pred, ref, label)
    if p.ndim != 3:
        raise TransferSegError(
            f"surface distances need 3D masks (k, j, i); got {p.ndim}D ({describe_shape(p.shape)})"
        )
    has_p, has_r = p.any(), r.any()
    if not (has_p and has_r):
        return np.array([math.inf]) if (has_p or has_r) else np.empty(0)
    # Both surfaces lie inside the union's box, so cropping changes no distance; it only makes
    # a small lesion in a 512×512×300 volume cheap.
    box = _union_box(p, r)
    surface_p, surface_r = _surface(p[box]), _surface(r[box])
    to_r = ndimage.distance_transform_edt(~surface_r, sampling=spacing)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_r]
    return np.concatenate([to_r, to_p])


def asd(pred, ref, spacing, *, label: int | None = None) -> float:
    """Average symmetric surface distance in mm, pooled over both directions.

    ``(Σ d(s, ∂R) for s in ∂P + Σ d(s, ∂P) for s in ∂R) / (|∂P| + |∂R|)`` where ∂ is the
    6-connected surface (module docstring) and ``spacing`` is in array-axis order (k, j, i).
    Both empty → 0.0; exactly one empty → inf (no surface to measure to).
    """
    distances = _pooled_surface_distances(pred, ref, spacing, label)
    return float(distances.mean()) if distances.size else 0.0


def rmsd(pred, ref, spacing, *, label: int | None = None) -> float:
    """Root-mean-square symmetric surface distance in mm, pooled over both directions.

    ``sqrt((Σ d² over ∂P→∂R + Σ d² over ∂R→∂P) / (|∂P| + |∂R|))``; ``spacing`` in (k, j, i).
    Both empty → 0.0; exactly one empty → inf.
    """
    distances = _pooled_surface_distances(pred, ref, spacing, label)
    return float(np.sqrt(np.square(distances).mean())) if distances.size else 0.0


def tumor_burden(tumor, liver=None, *, tumor_label: int = 2) -> float:
    """LiTS tumor burden of one case: tumor voxels / liver voxels, a fraction in [0, 1].

    Without ``liver``, ``tumor`` is a label map (0 background, 1 liver, ``tumor_label``
    tumor) and the liver is every nonzero voxel, i.e. liver *including* tumor, as LiTS's
    scoring code counts it (``count(label == 2) / count(label >= 1)``). With ``liver``,
    ``tumor`` and ``liver`` are masks (nonzero = foreground) and the liver is their union.
    Voxel counts suffice: the spacing cancels. An empty liver gives 0.0.
    """
    if liver is None:
        labels = np.asarray(tumor)
        tumor_mask = _as_mask(labels, tumor_label, "label map")
        liver_mask = _as_mask(labels, None, "label map")
    else:
        tumor_mask, liver_mask = _mask_pair(tumor, liver, None)
        liver_mask = liver_mask | tumor_mask
    n_liver = np.count_nonzero(liver_mask)
    if n_liver == 0:
        return 0.0
    return np.count_nonzero(tumor_mask) / n_liver


def tumor_burden_rmse(
    preds: Sequence,
    refs: Sequence,
    livers_pred: Sequence | None = None,
    livers_ref: Sequence | None = None,
    *,
    tumor_label: int = 2,
) -> float:
    """LiTS tumor-burden RMSE: sqrt(mean over cases of (burden(pred) − burden(ref))²).

    As H-DenseUNet (Sec. IV-B) reports it after the LiTS evaluation: burden is a fraction
    (not a percentage) per case, see :func:`tumor_burden`. Without ``livers_*``, ``preds``
    and ``refs`` are label maps (1 liver, ``tumor_label`` tumor); with them, ``preds`` and
    ``refs`` are tumor masks and ``livers_*`` the matching liver masks (give both or neither).
    LiTS also lists the maximum error; it is ``max |difference|`` of the same per-case values.
    """
    preds, refs = _check_cases(preds, refs)
    if (livers_pred is None) != (livers_ref is None):
        raise TransferSegError("give both livers_pred and livers_ref, or neither (then preds and refs are label maps)")
    if livers_pred is None:
        burdens = [
            (tumor_burden(p, tumor_label=tumor_label), tumor_burden(r, tumor_label=tumor_label))
            for p, r in zip(preds, refs)
        ]
    else:
        livers_pred, livers_ref = list(livers_pred), list(livers_ref)
        if not len(livers_pred) == len(livers_ref) == len(preds):
            raise TransferSegError(
                f"{len(preds)} cases but {len(livers_pred)} predicted and {len(livers_ref)} reference liver masks"
            )
        burdens = []
        for p, r, lp, lr in zip(preds, refs, livers_pred, livers_ref):
            _mask_pair(p, r, None)  # same grid for prediction and reference
            burdens.append((tumor_burden(p, lp), tumor_burden(r, lr)))
    differences = np.array([bp - br for bp, br in burdens], dtype=float)
    return float(np.sqrt(np.mean(np.square(differences))))


FROC_RATES = (0.01, 0.05, 0.10, 0.15, 0.20, 0.25)


def _peak(detection) -> tuple:
    """``(position_kji, confidence)`` of a detection given as a dict or as a ``Detection``."""
    if isinstance(detection, dict):
        return detection["position_kji"], float(detection["confidence"])
    return detection.position_kji, float(detection.confidence)


def froc(detections_per_volume, boxes_per_volume, rates=FROC_RATES) -> dict:
    """Free-response ROC as in the AH-Net paper (Sec. 4.1).

    Args:
        detections_per_volume: per volume, a list of detections — dicts or objects with
            ``position_kji`` and ``confidence`` (what :func:`TransferSegLib.heatmaps.find_peaks` returns).
        boxes_per_volume: per volume, the annotated lesions' ``box_kji`` (half-open voxel boxes, or
            dicts holding ``"box_kji"``).

    At a confidence threshold t: a peak (confidence ≥ t) inside an annotated box is a true
    positive and the box counts as detected; further peaks in an already-hit box are not
    counted again (neither TP nor FP); peaks in no box are false positives.  TPR = detected
    boxes / all boxes; FP rate = false positives / number of volumes.  Sweeping t over every
    confidence gives the curve.  ``tpr_at[r]`` is the best TPR with at most r FP per volume.

    Returns ``{"fp_per_volume": [...], "tpr": [...], "thresholds": [...], "tpr_at": {r: tpr},
    "lesions": n, "volumes": n}``.  With no annotated lesion at all, TPR is defined as 0.
    """
    if len(detections_per_volume) != len(boxes_per_volume):
        raise TransferSegError(
            f"froc needs one detection list per volume: {len(detections_per_volume)} detection lists "
            f"but {len(boxes_per_volume)} box lists"
        )
    n_volumes = len(boxes_per_volume)
    if n_volumes == 0:
        raise TransferSegError("froc needs at least one volume")
    # Every peak as (confidence, volume, indices of the boxes it falls in).
    peaks = []
    lesion_ids = []
    for v, (detections, boxes) in enumerate(zip(detections_per_volume, boxes_per_volume)):
        lesion_ids += [(v, b) for b in range(len(boxes))]
        for det in detections:
            position, confidence = _peak(det)
            hits = [b for b, box in enumerate(boxes) if box_contains(box, position)]
            peaks.append((confidence, v, hits))
    peaks.sort(key=lambda p: -p[0])
    n_lesions = len(lesion_ids)
    detected, false_positives = set(), 0
    fps, tprs, thresholds = [0.0], [0.0], [float("inf")]
    for n, (confidence, v, hits) in enumerate(peaks):
        if not hits:
            false_positives += 1
        detected.update((v, b) for b in hits)  # overlapping boxes are all detected by one peak
        # one operating point per distinct confidence (ties are decided together)
        if n + 1 == len(peaks) or peaks[n + 1][0] != confidence:
            fps.append(false_positives / n_volumes)
            tprs.append(len(detected) / n_lesions if n_lesions else 0.0)
            thresholds.append(confidence)
    tpr_at = {}
    for rate in rates:
        allowed = [t for f, t in zip(fps, tprs) if f <= rate + 1e-12]
        tpr_at[float(rate)] = max(allowed) if allowed else 0.0
    return {"fp_per_volume": fps, "tpr": tprs, "thresholds": thresholds, "tpr_at": tpr_at,
            "lesions": n_lesions, "volumes": n_volumes}


def found_by_kind(detections_per_volume, boxes_per_volume, rate: float = 0.25) -> dict:
    """Which lesions the FROC's operating point at ``rate`` FP per volume finds, by kind.

    The operating point is the curve's last one with at most ``rate`` false positives per
    volume (the one whose TPR is :func:`froc`'s ``tpr_at[rate]``); a lesion is found when a peak
    at or above its threshold lies in its box.  A box's kind is its dict's ``"kind"`` (a plain
    box is a ``"lesion"``).  Returns ``{"threshold": t, "kinds": {kind: {"found": n, "lesions": m}}}``.
    """
    curve = froc(detections_per_volume, boxes_per_volume, rates=(rate,))
    last = max(n for n, fp in enumerate(curve["fp_per_volume"]) if fp <= rate + 1e-12)
    threshold = curve["thresholds"][last]
    kinds = {}
    for detections, boxes in zip(detections_per_volume, boxes_per_volume):
        kept = [position for position, confidence in map(_peak, detections) if confidence >= threshold]
        for box in boxes:
            kind = box.get("kind", "lesion") if isinstance(box, dict) else "lesion"
            counts = kinds.setdefault(kind, {"found": 0, "lesions": 0})
            counts["lesions"] += 1
            counts["found"] += int(any(box_contains(box, position) for position in kept))
    return {"threshold": threshold, "kinds": kinds}
