"""Mass candidates in DBT, rescored by a learned classifier.

The AH-Net's heatmap (:mod:`TransferSegLib.methods.dbt`) is smooth at about 8 mm: a 5 mm mass
plainly visible in its slice gets a low response while dense tissue gets a higher one.  This
stage looks again, on the same working grid, in three steps:

1. **Candidates**: the heatmap's own peaks (down to ``heatmap_floor``) and the peaks of a blob
   filter: per slice, the scale-normalised Laplacian of Gaussian at :data:`SCALES_MM` (a disc of
   radius r answers most at σ ≈ r / √2), smoothed over neighbouring slices; at each scale, a
   voxel that is the largest response within σ (at least ``nms_mm``) in-plane and ±2 slices,
   and at least ``margin_mm`` inside the breast, is a candidate of that scale (so a small mass
   beside a large dense patch stays one).  The ``max_candidates`` strongest are kept.
2. **Features** (:data:`FEATURES`), measured in mm so any pixel size reads alike: the heatmap
   there, the blob responses at every scale, the radial intensity profile at fractions of the
   blob's own radius (a mass has a plateau and an edge; tissue fades), how round it is, how
   sharp its edge is, how it fades across slices, how busy the tissue around it is and how far
   it lies from the skin line, and how dense it is against the breast's own dense levels (its
   95th and 99th percentiles: a mass is denser than glandular tissue, while a small glandular
   island does not reach the dense level) and against the densest candidates of the same breast.
   Intensities are relative to the breast's own reference (its 90th percentile), so the scale of
   the input does not matter.  Features are only ever appended: a classifier fitted on fewer
   reads the first ones.
3. **Classifier**: a small MLP (:class:`TransferSegLib.nets.SpeckClassifier`, the same network
   the calcification stage uses, fitted by the ``mass_candidates`` recipe) gives each
   candidate the probability that it is a mass; the most probable candidate within
   ``merge_mm`` of others stands for them, and those at least ``threshold`` likely are reported.

:func:`detect_masses` runs all three; :func:`mass_candidates`, :func:`mass_features` and
:func:`select_masses` are the steps a recipe or a test calls on their own.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from .calcifications import checked_settings, reference_intensity, speck_probabilities
from .heatmaps import Detection
from .progress import CancelToken, check_cancel
from .volume import TransferSegError, Volume

__all__ = ["DEFAULTS", "FEATURES", "KIND", "SCALES_MM", "MassCandidates", "detect_masses", "mass_candidates",
           "mass_features", "select_masses"]

KIND = "mass"
#: σ of the blob filter in mm: discs of about 1.5–10 mm radius (masses are 5–20 mm across)
SCALES_MM = (1.0, 1.5, 2.25, 3.4, 5.0, 7.0)
DEFAULTS = {
    "heatmap_floor": 0.02,      # heatmap peaks at least this high are candidates
    "nms_mm": 3.0,              # a blob candidate is the strongest within this distance in-plane
    "min_blob": 0.005,          # blob candidates answer at least this (relative to the breast's reference)
    "margin_mm": 2.0,           # candidates at least this far inside the breast's air edge
    "max_candidates": 600,      # per volume, the strongest blobs first (heatmap peaks always kept)
    "merge_mm": 5.0,            # of candidates this close in-plane (and within 3 mm across slices) one stands
    "max_detections": 20,
    "threshold": 0.5,           # masses at least this probable are reported (0: all, for a FROC)
}
#: the features of a candidate, in the classifier's input order
_PROFILE = (0.0, 0.5, 0.8, 1.0, 1.25, 1.6, 2.0)      # radii as fractions of the blob's radius
FEATURES = (
    ("heatmap", "heatmap_near")
    + tuple(f"blob_{s:g}" for s in SCALES_MM)
    + ("log_radius_mm", "log_contrast", "log_relative")
    + tuple(f"ring_{f:g}" for f in _PROFILE[1:])
    + ("round_1", "round_1.6", "spikes_1.25", "edge_sharpness", "slice_2", "slice_4", "busy", "edge_mm",
       "from_heatmap")
    + tuple(f"grid_{a}_{b}" for a in range(7) for b in range(7))
    # how dense it is against the breast's own densest tissue, and against the other candidates of
    # the same breast (a mass is denser than glandular tissue; a small glandular island does not
    # reach the dense level); appended, so a classifier fitted on the first 75 still reads them
    + ("peak", "centre_vs_dense95", "centre_vs_dense99", "peak_vs_dense99", "inner_vs_dense75", "dense95", "dense99",
       "dense50", "inner_median_vs_dense95", "inner_above_dense95", "peak_vs_top", "inner_median_vs_top",
       "centre_vs_top", "log_peak_rank")
)
#: the grid of in-plane samples (fractions of the blob's radius) the last features read: the
#: candidate's picture, scaled to its own size, for shapes the profile does not describe
_GRID = np.linspace(-2.0, 2.0, 7)
_ANGLES = 16
_FAR_MM = 20.0


def _settings(settings: Optional[dict]) -> dict:
    s = checked_settings(settings, DEFAULTS, "mass")
    for key in ("max_candidates", "max_detections"):
        if int(s[key]) != s[key] or s[key] < 1:
            raise TransferSegError(f"mass setting {key} must be a whole number ≥ 1; got {s[key]!r}")
    return s


# --- 1. candidates ----------------------------------------------------------------------------------
@dataclass
class MassCandidates:
    """Candidate positions (n, 3) int (k, j, i) on the working grid; each one's blob radius in mm,
    whether it came from the heatmap (1) or the blob filter (0), and its distance from the air
    edge in mm; the per-scale blob responses (len(SCALES_MM), *shape) and the reference."""

    kji: np.ndarray
    radius_mm: np.ndarray
    from_heatmap: np.ndarray
    edge_mm: np.ndarray
    blobs: np.ndarray
    reference: float

    def __len__(self) -> int:
        return len(self.kji)


def _blob_responses(image: np.ndarray, spacing, scale: float = 1.0) -> np.ndarray:
    """(scales, *shape) float32: −σ² ∇²(G_σ * image · ``scale``) in-plane per slice (σ and ∇² in
    pixels), after a light blur across slices; positive on bright blobs.  The Laplacian is the
    second difference of the smoothed slice (σ is at least 2 pixels of the 0.5 mm grid, where it
    matches the Gaussian's own derivative to a few per cent, at half the cost)."""
    sk, sj, si = (float(v) for v in spacing)
    out = np.empty((len(SCALES_MM),) + image.shape, np.float32)
    across = ndimage.gaussian_filter1d(image, sigma=max(0.5, 1.0 / sk), axis=0, mode="nearest")
    across *= np.float32(scale)
    second = np.array([-1.0, 2.0, -1.0], np.float32)

    def one_scale(n):
        pj, pi = SCALES_MM[n] / sj, SCALES_MM[n] / si
        smooth = ndimage.gaussian_filter(across, sigma=(0.0, pj, pi), mode="nearest")
        ndimage.correlate1d(smooth, second * np.float32(pj ** 2), axis=1, output=out[n], mode="nearest")
        out[n] += ndimage.correlate1d(smooth, second * np.float32(pi ** 2), axis=2, mode="nearest")

    _each_scale(one_scale)
    return out


def _each_scale(work) -> None:
    """``work(n)`` for every scale, on as many threads as torch may use (the filters release the GIL;
    each scale writes only its own slot, so the result does not depend on the threads)."""
    workers = max(1, min(len(SCALES_MM), torch.get_num_threads()))
    if workers == 1:
        for n in range(len(SCALES_MM)):
            work(n)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(len(SCALES_MM))))


def _breast_distance(image: np.ndarray, spacing, reference: float) -> np.ndarray:
    """Distance in mm from each voxel to the air in its slice (the volume's own edges count as breast:
    the chest wall runs along column 0), capped at _FAR_MM."""
    inside = ndimage.uniform_filter(image, size=(1, 3, 3)) >= 0.3 * reference
    out = np.empty(image.shape, np.float32)
    for k in range(image.shape[0]):
        if inside[k].all():
            out[k] = _FAR_MM
            continue
        d = ndimage.distance_transform_edt(np.pad(inside[k], 1, constant_values=True), sampling=spacing[1:])
        out[k] = np.minimum(d[1:-1, 1:-1], _FAR_MM)
    return out


def mass_candidates(volume: Volume, heatmap: np.ndarray, settings: Optional[dict] = None) -> MassCandidates:
    """Step 1: heatmap peaks and blob peaks on the working grid (see the module's docstring)."""
    s = _settings(settings)
    image = np.asarray(volume.array, np.float32)
    heatmap = np.asarray(heatmap, np.float32)
    if image.ndim != 3 or heatmap.shape != image.shape:
        raise TransferSegError(f"mass candidates need a 3D volume and its heatmap of the same shape; got "
                               f"{image.shape} and {heatmap.shape}")
    spacing = tuple(float(v) for v in volume.spacing)
    reference = reference_intensity(image)
    blobs = _blob_responses(image, spacing, 1.0 / reference)
    edge = _breast_distance(image, spacing, reference)
    inside = edge >= s["margin_mm"]
    # peaks per scale (a small mass beside a large dense patch is a peak of its own scale only)
    found, response, scales = [None] * len(SCALES_MM), [None] * len(SCALES_MM), [None] * len(SCALES_MM)

    def peaks_of(n):
        reach_mm = max(s["nms_mm"], SCALES_MM[n])
        reach = (2, max(1, round(reach_mm / spacing[1])), max(1, round(reach_mm / spacing[2])))
        peak = blobs[n] >= ndimage.maximum_filter(blobs[n], size=tuple(2 * r + 1 for r in reach), mode="nearest")
        peak &= (blobs[n] >= s["min_blob"]) & inside
        found[n] = np.argwhere(peak)
        response[n] = blobs[n][peak]
        scales[n] = np.full(len(found[n]), n)

    _each_scale(peaks_of)
    blob_kji, response, blob_scale = np.concatenate(found), np.concatenate(response), np.concatenate(scales)
    order = np.sort(np.argsort(-response, kind="stable")[: int(s["max_candidates"])])
    blob_kji, blob_scale = blob_kji[order], blob_scale[order]
    hreach = (2, max(1, round(2.0 / spacing[1])), max(1, round(2.0 / spacing[2])))
    hpeak = heatmap >= ndimage.maximum_filter(heatmap, size=tuple(2 * r + 1 for r in hreach), mode="nearest")
    hpeak &= heatmap >= s["heatmap_floor"]
    heat_kji = np.argwhere(hpeak)
    heat_kji = heat_kji[np.argsort(-heatmap[hpeak], kind="stable")[:100]]
    kji = np.concatenate([blob_kji, heat_kji]).astype(np.int64).reshape(-1, 3)
    # a heatmap peak reads at the scale that answers most there
    heat_scale = blobs[(slice(None),) + tuple(heat_kji.T)].argmax(axis=0) if len(heat_kji) else np.zeros(0, int)
    scale = np.concatenate([blob_scale, heat_scale]).astype(int)
    radius = np.asarray(SCALES_MM)[scale] * math.sqrt(2.0)
    source = np.concatenate([np.zeros(len(blob_kji)), np.ones(len(heat_kji))]).astype(np.float32)
    return MassCandidates(kji, radius.astype(np.float32), source, edge[tuple(kji.T)] if len(kji) else np.zeros(0, np.float32),
                          blobs, reference)


# --- 2. features ------------------------------------------------------------------------------------
def _sample(array, k, jj, ii) -> np.ndarray:
    coords = np.stack([np.broadcast_to(k, jj.shape).astype(np.float64), jj, ii]).reshape(3, -1)
    return ndimage.map_coordinates(array, coords, output=np.float32, order=1, mode="nearest",
                                   prefilter=False).reshape(jj.shape)


def mass_features(volume: Volume, heatmap: np.ndarray, candidates: MassCandidates) -> np.ndarray:
    """Step 2: the :data:`FEATURES` of each candidate, (n, len(FEATURES)) float32."""
    n = len(candidates)
    if n == 0:
        return np.zeros((0, len(FEATURES)), np.float32)
    image = np.asarray(volume.array, np.float32) / candidates.reference
    heatmap = np.asarray(heatmap, np.float32)
    sk, sj, si = (float(v) for v in volume.spacing)
    nk = image.shape[0]
    k, j, i = (candidates.kji[:, a] for a in range(3))
    radius = candidates.radius_mm.astype(np.float64)
    near = ndimage.maximum_filter(heatmap, size=(3, 2 * max(1, round(2.0 / sj)) + 1, 2 * max(1, round(2.0 / si)) + 1),
                                  mode="nearest")
    angles = np.arange(_ANGLES) * (2 * np.pi / _ANGLES)
    cos, sin = np.cos(angles), np.sin(angles)

    def ring(kk, fraction):   # (n, angles) samples on a circle of fraction × the radius
        r = radius[:, None] * fraction
        return _sample(image, np.clip(kk, 0, nk - 1)[:, None], j[:, None] + r * sin / sj, i[:, None] + r * cos / si)

    def disc(kk, fraction=0.5):   # the mean over the inner disc
        return np.mean([ring(kk, f).mean(axis=1) for f in (0.0, fraction / 2, fraction)], axis=0)

    outer = ring(k, 2.6)
    background = np.median(outer, axis=1)
    centre = disc(k)
    contrast = np.maximum(centre - background, 1e-4)
    profile = np.stack([(ring(k, f).mean(axis=1) - background) / contrast for f in _PROFILE[1:]], axis=1)
    at_1, at_16, at_125 = ring(k, 1.0), ring(k, 1.6), ring(k, 1.25)
    half = _ANGLES // 2

    def roundness(samples):   # spread over directions (a direction and its opposite averaged)
        lines = 0.5 * (samples[:, :half] + samples[:, half:])
        return (lines.max(axis=1) - lines.min(axis=1)) / contrast

    inner, out_ = ring(k, 0.8).mean(axis=1), ring(k, 1.25).mean(axis=1)
    sharp = (inner - out_) / contrast
    slices = []
    for d in (2, 4):
        c = 0.5 * ((disc(k + d) - np.median(ring(k + d, 2.6), axis=1)) + (disc(k - d) - np.median(ring(k - d, 2.6), axis=1)))
        slices.append(c / contrast)
    columns = [
        heatmap[k, j, i], near[k, j, i],
        *candidates.blobs[:, k, j, i],
        np.log(radius),
        np.log(contrast),
        np.log(np.maximum(contrast / np.maximum(background, 1e-3), 1e-4)),
        *profile.T,
        roundness(at_1), roundness(at_16),
        np.std(at_125, axis=1) / contrast,
        sharp,
        *slices,
        np.log(np.maximum(np.std(outer, axis=1) / contrast, 1e-4)),
        np.minimum(candidates.edge_mm, _FAR_MM),
        candidates.from_heatmap,
    ]
    gj, gi = np.meshgrid(_GRID, _GRID, indexing="ij")
    grid = _sample(image, k[:, None], j[:, None] + radius[:, None] * gj.ravel() / sj,
                   i[:, None] + radius[:, None] * gi.ravel() / si)
    columns += list(((grid - background[:, None]) / contrast[:, None]).T)
    columns += _density_columns(image, (sk, sj, si), k, j, i, np.concatenate([ring(k, f) for f in (0.2, 0.4, 0.6)], axis=1))
    return np.clip(np.stack(columns, axis=1), -20.0, 20.0).astype(np.float32)


def _dense_levels(image: np.ndarray) -> np.ndarray:
    """The breast's 50th, 75th, 95th and 99th percentiles (tissue: above 0.3 × the reference),
    from a sparse sample of at most about 2 million voxels."""
    step = max(1, int(round((image.size / 2e6) ** (1 / 3))))
    sample = image[::step, ::step, ::step]
    tissue = sample[sample > 0.3]
    return np.percentile(tissue, [50, 75, 95, 99]) if tissue.size else np.ones(4)


def _local_peak(image: np.ndarray, k, j, i, mean_size, reach) -> np.ndarray:
    """At each candidate: the largest mean over ``mean_size`` voxels within ``reach`` of it (both
    odd, (slices, rows, columns); indices beyond the volume read its edge): what a uniform then a
    maximum filter over the whole volume (mode "nearest") give there, reading only a few voxels."""
    if len(k) == 0:
        return np.zeros(0, np.float32)
    means = []
    for c, m, r, n in zip((k, j, i), mean_size, reach, image.shape):
        q = np.clip(np.asarray(c)[:, None] + np.arange(-(r // 2), r // 2 + 1)[None], 0, n - 1)       # (n, r)
        means.append(np.clip(q[:, :, None] + np.arange(-(m // 2), m // 2 + 1)[None, None], 0, n - 1))  # (n, r, m)
    mk, mj, mi = means
    values = image[mk[:, :, None, None, :, None, None], mj[:, None, :, None, None, :, None],
                   mi[:, None, None, :, None, None, :]]                # (n, rk, rj, ri, mk, mj, mi)
    return values.mean(axis=(4, 5, 6), dtype=np.float64).reshape(len(values), -1).max(axis=1).astype(np.float32)


def _density_columns(image: np.ndarray, spacing, k, j, i, inner: np.ndarray) -> list:
    """The last 14 :data:`FEATURES`: the candidate's density (``image`` in units of the breast's
    reference) against the breast's dense levels and against the densest of its candidates.
    ``inner``: (n, samples) on circles inside the blob (0.2–0.6 × its radius)."""
    sk, sj, si = spacing
    d50, d75, d95, d99 = _dense_levels(image)
    mean_size = (1, max(1, round(1.5 / sj)) | 1, max(1, round(1.5 / si)) | 1)                # about 1.5 mm, odd
    reach = (3, 2 * max(1, round(1.0 / sj)) + 1, 2 * max(1, round(1.0 / si)) + 1)            # ±1 slice, ±1 mm
    peak = _local_peak(image, k, j, i, mean_size, reach)
    centre = image[k, j, i]
    n = len(k)
    top, median, at_centre = peak - d99, np.median(inner, axis=1) - d95, centre - d95
    rank = n - np.searchsorted(np.sort(top), top, side="right")      # candidates denser than this one
    return [peak, at_centre, centre - d99, top, inner.mean(axis=1) - d75, np.full(n, d95), np.full(n, d99), np.full(n, d50),
            median, (inner >= d95).mean(axis=1), top - top.max(), median - median.max(), at_centre - at_centre.max(),
            np.log1p(rank)]


# --- 3. the classifier and the detections -----------------------------------------------------------
def select_masses(kji: np.ndarray, probabilities: np.ndarray, radius_mm: np.ndarray, spacing,
                  settings: Optional[dict] = None, volume: Optional[Volume] = None) -> list:
    """Step 3's second half: the most probable candidate stands for those within ``merge_mm``
    in-plane and 3 mm across slices; at most ``max_detections`` of at least ``threshold``, as
    :class:`~TransferSegLib.heatmaps.Detection` of kind ``"mass"`` with a box of the blob's radius."""
    s = _settings(settings)
    kji = np.asarray(kji, np.int64).reshape(-1, 3)
    probabilities = np.asarray(probabilities, np.float64).reshape(-1)
    sk, sj, si = (float(v) for v in spacing)
    order = np.argsort(-probabilities, kind="stable")
    kept = []
    for n in order:
        if probabilities[n] < s["threshold"] or len(kept) >= s["max_detections"]:
            break
        p = kji[n]
        if any(abs(p[0] - q[0]) * sk <= 3.0 and math.hypot((p[1] - q[1]) * sj, (p[2] - q[2]) * si) <= s["merge_mm"]
               for q in (kji[m] for m in kept)):
            continue
        kept.append(n)
    detections = []
    for n in kept:
        centre = kji[n]
        r = float(radius_mm[n])
        half = np.array([max(1, round(r / sk)), max(1, round(r / sj)), max(1, round(r / si))])
        box = [int(v) for v in centre - half] + [int(v) + 1 for v in centre + half]
        ras = volume.ijk_to_ras_points(centre[None].astype(float))[0].round(3).tolist() if volume is not None else None
        detections.append(Detection([int(v) for v in centre], ras, round(float(probabilities[n]), 6), box, kind=KIND))
    return detections


def detect_masses(volume: Volume, heatmap: np.ndarray, classifier: torch.nn.Module,
                  settings: Optional[dict] = None, cancel: Optional[CancelToken] = None) -> list:
    """Masses in a DBT volume on the working grid, from the mass network's heatmap and the
    candidate classifier (see the module's docstring); most probable first.  ``cancel`` is
    checked before each step."""
    s = _settings(settings)
    check_cancel(cancel)
    candidates = mass_candidates(volume, heatmap, s)
    check_cancel(cancel)
    features = mass_features(volume, heatmap, candidates)
    reads = int(getattr(classifier, "in_features", len(FEATURES)))
    if reads > len(FEATURES):
        raise TransferSegError(f"the mass classifier reads {reads} features; this version computes {len(FEATURES)}: "
                               "update TransferSeg to use this model")
    probabilities = speck_probabilities(classifier, features[:, :reads])   # features are only ever appended
    check_cancel(cancel)
    return select_masses(candidates.kji, probabilities, candidates.radius_mm, volume.spacing, s, volume=volume)
