"""Lesion heatmaps (AH-Net eq. 5), peak finding by non-maximum suppression, detections.

Boxes everywhere are ``box_kji = [k0, j0, i0, k1, j1, i1]``, half-open voxel indices in array
order, as :func:`TransferSegLib.phantoms.dbt_phantom` returns them.

AH-Net Sec. 4.1, eq. (5): the training target is a sum of 3D Gaussians, one per annotated
lesion, centred on the box centre µᵢ with a covariance Σᵢ "determined by the height, width
and depth of the 3D bounding box".  We take Σᵢ diagonal with σ = extent / 4 per axis (the box
spans ±2σ, 95 % of each marginal).  Two deliberate deviations, each for a reason:

* eq. (5) is printed with Σᵢ in the exponent; a Gaussian density needs Σᵢ⁻¹ there, which we use;
* eq. (5) normalises each Gaussian as a density (÷ √det(2πΣᵢ)); a 20 mm mass then peaks near
  1e-4 while a 5 mm one peaks far higher, which makes a poor regression target for an L2 or
  focal-L2 loss.  ``normalise="peak"`` (default) scales each Gaussian to peak 1 instead;
  ``normalise="density"`` is the formula as printed.  The lesions are summed as in eq. (5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .volume import TransferSegError, Volume

__all__ = ["Detection", "box_contains", "find_peaks", "gaussian_heatmap"]


def _box(box) -> tuple:
    values = box["box_kji"] if isinstance(box, dict) else box
    if len(values) != 6:
        raise TransferSegError(f"a box needs six values [k0, j0, i0, k1, j1, i1]; got {values}")
    k0, j0, i0, k1, j1, i1 = (float(v) for v in values)
    if not (k1 > k0 and j1 > j0 and i1 > i0):
        raise TransferSegError(f"box {list(values)} is empty: each upper bound must exceed its lower bound")
    return k0, j0, i0, k1, j1, i1


def gaussian_heatmap(shape: Sequence[int], boxes, normalise: str = "peak", sigma_fraction: float = 0.25,
                     dtype=np.float32, min_sigma=0.5) -> np.ndarray:
    """AH-Net eq. (5): the sum over lesions of 3D Gaussians fitted to their boxes.

    Args:
        shape: the volume shape (k, j, i).
        boxes: a list of ``box_kji`` lists, or of dicts holding ``"box_kji"``.
        normalise: ``"peak"`` (each Gaussian peaks at 1) or ``"density"`` (÷ √det(2πΣ), eq. 5 as printed).
        sigma_fraction: σ per axis as a fraction of the box extent on that axis (0.25: box = ±2σ).
        min_sigma: the smallest σ in voxels, one value or one per axis (k, j, i): a floor that
            gives small lesions a target wide enough to learn (see :class:`DBTPhantomCase`).

    Each Gaussian is evaluated inside its ±4σ box only (beyond it it is below 3.4e-4 of its peak).
    """
    if normalise not in ("peak", "density"):
        raise TransferSegError(f"normalise must be 'peak' or 'density'; got {normalise!r}")
    shape = tuple(int(s) for s in shape)
    heatmap = np.zeros(shape, dtype=np.float64)
    for box in boxes:
        k0, j0, i0, k1, j1, i1 = _box(box)
        lo, hi = np.array([k0, j0, i0]), np.array([k1, j1, i1])
        centre = (lo + hi - 1.0) / 2.0  # voxel centres of a half-open box
        sigma = np.maximum((hi - lo) * sigma_fraction, np.maximum(np.broadcast_to(min_sigma, (3,)), 0.5))
        start = np.maximum(np.floor(centre - 4 * sigma), 0).astype(int)
        stop = np.minimum(np.ceil(centre + 4 * sigma) + 1, shape).astype(int)
        if np.any(stop <= start):
            continue  # the lesion lies wholly outside the volume
        axes = [np.exp(-0.5 * ((np.arange(a, b) - c) / s) ** 2) for a, b, c, s in zip(start, stop, centre, sigma)]
        gauss = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        if normalise == "density":
            gauss = gauss / np.sqrt(np.prod(2 * np.pi * sigma**2))
        heatmap[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] += gauss
    return heatmap.astype(dtype)


def box_contains(box, point_kji) -> bool:
    """Whether a (continuous or integer) voxel position lies inside a half-open box."""
    k0, j0, i0, k1, j1, i1 = _box(box)
    k, j, i = (float(v) for v in point_kji)
    return k0 <= k < k1 and j0 <= j < j1 and i0 <= i < i1


@dataclass
class Detection:
    """One detection: where, how confident, its box, and its kind.

    ``kind`` is ``"lesion"`` for a plain heatmap's peak, or what a composed detector found:
    ``"mass"`` or ``"calcification_cluster"`` (the DBT phantoms' kinds).
    """

    position_kji: list
    position_ras: Optional[list]
    confidence: float
    box_kji: list
    kind: str = "lesion"

    def to_dict(self) -> dict:
        return asdict(self)


def find_peaks(heatmap: np.ndarray, volume: Optional[Volume] = None, threshold: float = 0.1,
               min_distance: Sequence[int] | int = (2, 8, 8), max_peaks: int = 100) -> list:
    """Non-maximum suppression on a heatmap (AH-Net Sec. 4.1): local maxima as detections.

    A voxel is a peak if it is the maximum of its ``(2·d + 1)`` neighbourhood (``min_distance``
    d per axis, array order) and its value is at least ``threshold``; a flat top counts once
    (at its centre of mass, snapped to its highest voxel).  Confidence is the response at the
    peak.  The box is the extent of the connected region around the peak where the response is
    at least half the peak (half maximum).  Detections come sorted by confidence, at most
    ``max_peaks``.  With ``volume``, positions are also given in RAS millimetres.
    """
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 3:
        raise TransferSegError(f"find_peaks needs a 3D heatmap; got shape {heatmap.shape}")
    if volume is not None and volume.shape != heatmap.shape:
        raise TransferSegError(f"heatmap shape {heatmap.shape} does not match the volume's {volume.shape}")
    d = np.broadcast_to(np.asarray(min_distance, dtype=int), (3,))
    size = tuple(int(2 * x + 1) for x in d)
    local_max = ndimage.maximum_filter(heatmap, size=size, mode="constant", cval=-np.inf)
    candidates = (heatmap >= local_max) & (heatmap >= threshold)
    plateaus, count = ndimage.label(candidates, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    centres = ndimage.center_of_mass(candidates, plateaus, index)
    values = ndimage.maximum(heatmap, plateaus, index)
    order = np.argsort(-np.asarray(values), kind="stable")[:max_peaks]
    reach = np.maximum(4 * d, 16)
    detections = []
    for n in order:
        centre = np.asarray(centres[n])
        # snap a plateau's centre of mass to its nearest voxel that belongs to the plateau
        members = np.argwhere(plateaus == index[n])
        peak = members[np.argmin(((members - centre) ** 2).sum(axis=1))]
        peak_value = float(heatmap[tuple(peak)])
        # the half-maximum region, searched in a window around the peak (lesions are bounded)
        lo = np.maximum(peak - reach, 0)
        hi = np.minimum(peak + reach + 1, heatmap.shape)
        window = heatmap[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] >= 0.5 * peak_value
        region, _ = ndimage.label(window, structure=np.ones((3, 3, 3), bool))
        where = np.argwhere(region == region[tuple(peak - lo)]) + lo
        box = [int(v) for v in where.min(axis=0)] + [int(v) + 1 for v in where.max(axis=0)]
        ras = volume.ijk_to_ras_points(peak[None].astype(float))[0].round(3).tolist() if volume is not None else None
        detections.append(Detection([int(v) for v in peak], ras, peak_value, box))
    return detections
