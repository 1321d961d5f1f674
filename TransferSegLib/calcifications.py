"""Calcification clusters in DBT, found at the input's own resolution.

A calcification is a bright speck of 0.1–1 mm: on the 0.5 mm working grid of the mass network
it is one or two pixels diluted into its background and no longer stands out, so this detector
never resamples.  It works in four steps, each a section below:

1. **Candidates** (slice by slice, the input's own pixels): the pixel less the mean of a box
   of ±``background_mm`` around it (a white top-hat made of one box filter) is the speck's
   contrast; a robust noise estimate per tile of ``tile_mm`` (the median absolute contrast)
   turns it into a contrast-to-noise ratio.  A candidate is a voxel whose ratio is at least
   ``min_cnr``, that is the brightest within ±``nms_mm`` in-plane and brighter than the same
   pixel on the two neighbouring slices (a speck's out-of-plane echo is dimmer than the speck),
   and that lies at least ``margin_mm`` inside the breast (the skin line against air is a
   bright edge).  A pixel of 0.085 mm and one of 0.6 mm see the same millimetres.
2. **Features** (:data:`FEATURES`): sampled at fixed distances in mm around each candidate
   (bilinear), so the same classifier reads 0.085 mm and 0.6 mm pixels alike: contrast and
   contrast-to-noise, the radial profile (size and sharpness), anisotropy (a speck is round, a
   spicule or a tissue edge is a line), the profile across the neighbouring slices and how busy
   the tissue around it is, and the distance from the skin line.
3. **Classifier**: a small network (:class:`TransferSegLib.nets.SpeckClassifier`, trained by
   the ``specks`` recipe on phantoms) gives each candidate the probability that it is a speck.
4. **Clusters**, as radiologists define them (BI-RADS: several calcifications within about
   1 cm²): specks of probability ≥ ``speck_probability`` linked when within ``link_mm`` in-plane
   and ``link_depth_mm`` between slices (single linkage), a group of ``min_specks`` or more is a
   cluster.  Its confidence is the probability that at least ``min_specks`` of its specks are
   real (the specks taken as independent), so it grows with every speck and with each speck's
   probability, and a FROC can sweep it.

:func:`detect_calcification_clusters` runs all four; :func:`speck_candidates` and
:func:`group_specks` are the steps a recipe or a test calls on their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .heatmaps import Detection
from .progress import CancelToken, ProgressCallback, check_cancel
from .volume import TransferSegError, Volume

__all__ = ["CANDIDATE_SETTINGS", "DEFAULTS", "FEATURES", "KIND", "Candidates", "checked_settings", "detect_calcification_clusters",
           "group_specks", "reference_intensity",
           "speck_candidates", "speck_features", "speck_probabilities"]

KIND = "calcification_cluster"
#: the settings that change the candidates (the others only group them)
CANDIDATE_SETTINGS = ("background_mm", "nms_mm", "min_cnr", "tile_mm", "breast_fraction", "margin_mm", "max_candidates")
STAGE = "calcifications"

DEFAULTS = {
    "background_mm": 1.0,       # half side of the background box
    "nms_mm": 0.3,              # a candidate is the brightest within this distance in-plane
    "min_cnr": 4.5,             # candidate: contrast ≥ this × the local noise
    "tile_mm": 8.0,             # side of the tiles the noise is estimated in
    "breast_fraction": 0.3,     # breast: 1 mm block mean ≥ this × the volume's 90th percentile
    "margin_mm": 1.5,           # candidates at least this far inside the breast's air edge
    "max_candidates": 20000,    # per volume, the highest contrast-to-noise first
    "speck_probability": 0.5,   # a candidate at least this likely is a speck
    "link_mm": 6.0,             # specks within this distance in-plane …
    "link_depth_mm": 5.0,       # … and this distance between slices are linked
    "min_specks": 3,            # a cluster has at least this many specks
    "threshold": 0.5,           # clusters at least this confident are reported (0: all, for a FROC)
}

#: the features of a candidate, in the classifier's input order
FEATURES = (
    "log_cnr",              # log of contrast / local noise
    "log_contrast",         # log of contrast / the breast's reference intensity
    "log_relative",         # log of contrast / local background
    "ring_0.15", "ring_0.3", "ring_0.45", "ring_0.6", "ring_0.8",   # radial profile, 1 at the centre
    "line_0.3", "line_0.6",  # max − min over directions of the profile at that radius
    "slice_1", "slice_2",    # the contrast 1 and 2 slices away, relative to the centre
    "slice_asymmetry",       # |above − below| one slice away, relative
    "busy",                  # spread of the background ring / local noise
    "edge_mm",               # distance from the breast's air edge (skin line), capped at 10 mm
)
_RADII_MM = (0.15, 0.3, 0.45, 0.6, 0.8)
_BACKGROUND_RADII_MM = (1.1, 1.4)
_ANGLES = 12
_TILE_SAMPLES = 16
_FAR_MM = 20.0   # distances from the air edge are capped here
_MEDOID_OF = 512   # a cluster's centre is chosen among its most likely specks


def checked_settings(settings: Optional[dict], defaults: dict, what: str) -> dict:
    """``defaults`` updated by ``settings``, every key known and every value a number ≥ 0 (a stage's
    settings: ``what`` names the stage in the message)."""
    s = dict(defaults)
    unknown = sorted(set(settings or {}) - set(defaults))
    if unknown:
        raise TransferSegError(f"{what} setting {unknown[0]!r} is not one of {', '.join(defaults)}")
    s.update(settings or {})
    for key, value in s.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise TransferSegError(f"{what} setting {key} must be a number ≥ 0; got {value!r}")
    return s


def _settings(settings: Optional[dict]) -> dict:
    s = checked_settings(settings, DEFAULTS, "calcification")
    if s["min_specks"] < 2 or int(s["min_specks"]) != s["min_specks"]:
        raise TransferSegError(f"calcification setting min_specks must be a whole number ≥ 2; got {s['min_specks']!r}")
    return s


# --- 1. candidates ----------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Bright specks found in a volume: voxel positions (n, 3) int (k, j, i); their contrast, local
    noise, contrast-to-noise ratio and distance from the breast's air edge in mm (each (n,)); and
    the breast's reference intensity."""

    kji: np.ndarray
    contrast: np.ndarray
    noise: np.ndarray
    cnr: np.ndarray
    edge_mm: np.ndarray
    reference: float

    def __len__(self) -> int:
        return len(self.kji)


def reference_intensity(array: np.ndarray) -> float:
    """The 90th percentile of a sparse sample: about the dense tissue's level, whatever the scale."""
    step = max(1, int(round((array.size / 2e5) ** (1 / 3))))
    sample = array[::step, ::step, ::step]
    value = float(np.percentile(sample, 90)) if sample.size else 0.0
    return value if value > 0 else 1.0


class _SliceFilter:
    """The per-slice contrast map and where candidates may lie; sizes fixed in mm."""

    def __init__(self, pixel_mm: tuple, reference: float, s: dict):
        pj, pi = pixel_mm
        self.background = (2 * max(1, round(s["background_mm"] / pj)) + 1, 2 * max(1, round(s["background_mm"] / pi)) + 1)
        self.block = (max(1, round(1.0 / pj)), max(1, round(1.0 / pi)))           # ~1 mm blocks for the mask
        self.block_mm = (self.block[0] * pj, self.block[1] * pi)
        self.margin_mm = s["margin_mm"]
        # a tile is _TILE_SAMPLES² samples, one every tile_step pixels
        self.tile_step = (max(1, round(s["tile_mm"] / pj / _TILE_SAMPLES)), max(1, round(s["tile_mm"] / pi / _TILE_SAMPLES)))
        self.tile = (self.tile_step[0] * _TILE_SAMPLES, self.tile_step[1] * _TILE_SAMPLES)
        self.breast_level = s["breast_fraction"] * reference

    def contrast(self, image: np.ndarray) -> np.ndarray:
        """The pixel less the mean of its background box (float32)."""
        image = image.astype(np.float32, copy=False)
        background = ndimage.uniform_filter(image, self.background, mode="reflect")
        return np.subtract(image, background, out=background)

    def breast(self, image: np.ndarray) -> np.ndarray:
        """On a ~1 mm block grid, the distance in mm from each block to the air (0 outside the breast)."""
        bj, bi = self.block
        if image.shape[0] < bj or image.shape[1] < bi:   # a slice smaller than one block
            image = np.pad(image, ((0, max(0, bj - image.shape[0])), (0, max(0, bi - image.shape[1]))), mode="edge")
        nj, ni = image.shape[0] // bj * bj, image.shape[1] // bi * bi
        blocks = image[:nj, :ni].reshape(nj // bj, bj, ni // bi, bi).mean(axis=(1, 3))
        inside = blocks >= self.breast_level
        # the volume's own edges are not air (the chest wall runs along column 0): pad with breast
        if inside.all():
            return np.full(inside.shape, _FAR_MM, np.float32)
        distance = ndimage.distance_transform_edt(np.pad(inside, 1, constant_values=True), sampling=self.block_mm)
        return np.minimum(distance[1:-1, 1:-1], _FAR_MM).astype(np.float32)

    def noise(self, contrast: np.ndarray, breast: np.ndarray) -> np.ndarray:
        """Robust noise per tile: 1.4826 × the median |contrast| over a sparse sample of the tile's
        breast pixels (one value per tile; the slice's value where a tile holds too little breast)."""
        (tj, ti), (sj, si) = self.tile, self.tile_step
        sample = np.abs(contrast[::sj, ::si])
        jj = np.minimum(np.arange(sample.shape[0]) * sj // self.block[0], breast.shape[0] - 1)
        ii = np.minimum(np.arange(sample.shape[1]) * si // self.block[1], breast.shape[1] - 1)
        inside = breast[jj][:, ii] > 0
        values = sample[inside]
        fallback = 1.4826 * float(np.median(values if values.size else sample))
        n = _TILE_SAMPLES
        rows, cols = -(-sample.shape[0] // n), -(-sample.shape[1] // n)
        padded = np.full((rows * n, cols * n), np.nan, np.float32)
        padded[:sample.shape[0], :sample.shape[1]] = np.where(inside, sample, np.nan)
        tiles = np.sort(padded.reshape(rows, n, cols, n).transpose(0, 2, 1, 3).reshape(rows, cols, n * n), axis=2)
        count = np.isfinite(tiles).sum(axis=2)
        lo = np.take_along_axis(tiles, np.maximum((count - 1) // 2, 0)[..., None], axis=2)[..., 0]
        hi = np.take_along_axis(tiles, np.maximum(count // 2, 0)[..., None], axis=2)[..., 0]
        sigma = np.where(count >= n * n // 8, 1.4826 * 0.5 * (lo + hi), fallback).astype(np.float32)
        return np.maximum(sigma, max(fallback, 1e-6) * 1e-3)


def _local_maxima(contrast_stack, k: int, jj, ii, radius: tuple) -> np.ndarray:
    """Which of the pixels (jj, ii) of slice ``k`` of ``contrast_stack`` (slices k − 1 … k + 1, None
    where the volume ends) are at least as bright as every neighbour within ``radius`` on their
    slice and as the same pixel on the two neighbouring slices."""
    centre = contrast_stack[1]
    value = centre[jj, ii]
    keep = np.ones(len(jj), bool)
    nj, ni = centre.shape
    for d, plane in enumerate(contrast_stack):
        if plane is None:
            continue
        # on the neighbouring slices only the same pixel: a speck one slice away and a pixel aside is
        # another speck (the classifier tells a speck's out-of-plane echo from a speck)
        reach = radius if d == 1 else (0, 0)
        for dj in range(-reach[0], reach[0] + 1):
            for di in range(-reach[1], reach[1] + 1):
                if d == 1 and dj == 0 and di == 0:
                    continue
                neighbour = plane[np.clip(jj + dj, 0, nj - 1), np.clip(ii + di, 0, ni - 1)]
                keep &= value >= neighbour
                # ties on the slice itself: keep the first in raster order only
                if d == 1 and (dj < 0 or (dj == 0 and di < 0)):
                    keep &= value > neighbour
    return keep


def speck_candidates(volume: Volume, settings: Optional[dict] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, reference: Optional[float] = None) -> Candidates:
    """Step 1: bright specks at the volume's own resolution (see the module's docstring).

    Works one slice at a time (the contrast of three slices held at once), so the extra memory is
    a few slices whatever the volume's size.  ``progress(fraction, "calcifications")`` after each
    slice; ``cancel`` is checked before each slice.
    """
    s = _settings(settings)
    array = volume.array
    if array.ndim != 3:
        raise TransferSegError(f"calcification detection needs a 3D volume; got shape {array.shape}")
    nk = array.shape[0]
    ref = reference_intensity(array) if reference is None else float(reference)
    filt = _SliceFilter((float(volume.spacing[1]), float(volume.spacing[2])), ref, s)
    radius = (max(1, round(s["nms_mm"] / float(volume.spacing[1]))), max(1, round(s["nms_mm"] / float(volume.spacing[2]))))
    found = {"kji": [], "contrast": [], "noise": [], "cnr": [], "edge_mm": []}
    planes = [None, None, None]   # contrast of slices k − 1, k, k + 1
    masks = [None, None, None]

    def load(k):
        if k >= nk:
            return None, None
        check_cancel(cancel)
        image = np.asarray(array[k], dtype=np.float32)
        contrast = filt.contrast(image)
        breast = filt.breast(image)
        return contrast, (breast, filt.noise(contrast, breast))

    planes[2], masks[2] = load(0)
    for k in range(nk):
        planes = [planes[1], planes[2], None]
        masks = [masks[1], masks[2], None]
        planes[2], masks[2] = load(k + 1)
        _slice_candidates(planes, masks[1], k, filt, radius, s["min_cnr"], found)
        if progress is not None:
            progress((k + 1) / nk, STAGE)
    kji = np.array(found["kji"], dtype=np.int64).reshape(-1, 3) if found["kji"] else np.zeros((0, 3), np.int64)
    out = Candidates(kji, *(np.concatenate(found[key]) if found[key] else np.zeros(0, np.float32)
                            for key in ("contrast", "noise", "cnr", "edge_mm")), ref)
    if len(out) > s["max_candidates"]:
        keep = np.sort(np.argsort(-out.cnr, kind="stable")[: int(s["max_candidates"])])
        out = Candidates(out.kji[keep], out.contrast[keep], out.noise[keep], out.cnr[keep], out.edge_mm[keep], ref)
    return out


def _slice_candidates(planes, mask, k: int, filt: _SliceFilter, radius, min_cnr: float, found: dict) -> None:
    contrast = planes[1]
    breast, sigma = mask
    floor = min_cnr * float(sigma.min())
    jj, ii = np.nonzero(contrast >= floor)
    if jj.size == 0:
        return
    bj = np.minimum(jj // filt.block[0], breast.shape[0] - 1)
    bi = np.minimum(ii // filt.block[1], breast.shape[1] - 1)
    noise = sigma[jj // filt.tile[0], ii // filt.tile[1]]
    value = contrast[jj, ii]
    edge = breast[bj, bi]
    ok = (edge >= filt.margin_mm) & (value >= min_cnr * noise)
    jj, ii, value, noise, edge = jj[ok], ii[ok], value[ok], noise[ok], edge[ok]
    if jj.size == 0:
        return
    peak = _local_maxima(planes, k, jj, ii, radius)
    jj, ii, value, noise, edge = jj[peak], ii[peak], value[peak], noise[peak], edge[peak]
    found["kji"].extend([k, int(j), int(i)] for j, i in zip(jj, ii))
    found["contrast"].append(value.astype(np.float32))
    found["noise"].append(noise.astype(np.float32))
    found["cnr"].append((value / noise).astype(np.float32))
    found["edge_mm"].append(edge.astype(np.float32))


# --- 2. features ------------------------------------------------------------------------------------
def _ring_offsets(radii_mm, pixel_mm) -> np.ndarray:
    """(len(radii), _ANGLES, 2) in-plane offsets in pixels (j, i) of points on circles of radii in mm."""
    angles = np.arange(_ANGLES) * (2 * np.pi / _ANGLES)
    r = np.asarray(radii_mm, float)[:, None]
    return np.stack([r * np.sin(angles) / pixel_mm[0], r * np.cos(angles) / pixel_mm[1]], axis=-1)


def _sample(array: np.ndarray, k: np.ndarray, jj: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """Bilinear in-plane samples of ``array`` at slices ``k`` (whole numbers) and fractional (j, i)."""
    coords = np.stack([np.broadcast_to(k, jj.shape).astype(np.float64), jj, ii]).reshape(3, -1)
    return ndimage.map_coordinates(array, coords, output=np.float32, order=1, mode="nearest",
                                   prefilter=False).reshape(jj.shape)


def speck_features(volume: Volume, candidates: Candidates, chunk: int = 4096) -> np.ndarray:
    """Step 2: the :data:`FEATURES` of each candidate, (n, len(FEATURES)) float32."""
    n = len(candidates)
    out = np.zeros((n, len(FEATURES)), np.float32)
    array = volume.array
    pixel = (float(volume.spacing[1]), float(volume.spacing[2]))
    rings = _ring_offsets(_RADII_MM, pixel)
    background = _ring_offsets(_BACKGROUND_RADII_MM, pixel).reshape(-1, 2)
    nk = array.shape[0]
    for start in range(0, n, chunk):
        c = slice(start, min(start + chunk, n))
        k, j, i = (candidates.kji[c, axis] for axis in range(3))
        out[c] = _features_of(array, nk, k, j.astype(float), i.astype(float), rings, background,
                              candidates.contrast[c], candidates.noise[c], candidates.reference)
        out[c, -1] = np.minimum(candidates.edge_mm[c], 10.0)
    return out


def _features_of(array, nk, k, j, i, rings, background, contrast, noise, reference) -> np.ndarray:
    # the background: median of the outer rings on each of the slices k − 2 … k + 2
    levels, centres = {}, {}
    for d in (-2, -1, 0, 1, 2):
        kd = np.clip(k + d, 0, nk - 1)[:, None]
        ring = _sample(array, kd, j[:, None] + background[None, :, 0], i[:, None] + background[None, :, 1])
        levels[d] = np.median(ring, axis=1)
        centres[d] = _sample(array, kd[:, 0], j, i)
        if d == 0:
            busy = ring.std(axis=1)
    peak = np.maximum(centres[0] - levels[0], 1e-6)
    k0 = k[:, None, None]
    profile = _sample(array, k0, j[:, None, None] + rings[None, ..., 0], i[:, None, None] + rings[None, ..., 1])
    profile = (profile - levels[0][:, None, None]) / peak[:, None, None]        # (n, radii, angles)
    half = _ANGLES // 2
    lines = 0.5 * (profile[..., :half] + profile[..., half:])                # a direction and its opposite
    above = (centres[1] - levels[1]) / peak
    below = (centres[-1] - levels[-1]) / peak
    two = 0.5 * ((centres[2] - levels[2]) + (centres[-2] - levels[-2])) / peak
    columns = [
        np.log(np.maximum(contrast / noise, 1e-3)),
        np.log(np.maximum(contrast / reference, 1e-6)),
        np.log(np.maximum(contrast / np.maximum(levels[0], 1e-3 * reference), 1e-6)),
        *(profile[:, r].mean(axis=1) for r in range(len(_RADII_MM))),
        lines[:, 1].max(axis=1) - lines[:, 1].min(axis=1),
        lines[:, 3].max(axis=1) - lines[:, 3].min(axis=1),
        0.5 * (above + below),
        two,
        np.abs(above - below),
        np.log(np.maximum(busy / noise, 1e-3)),
        np.zeros_like(contrast),   # edge_mm, filled in by the caller
    ]
    return np.clip(np.stack(columns, axis=1), -20.0, 20.0).astype(np.float32)


# --- 3. the classifier -----------------------------------------------------------------------------
def speck_probabilities(classifier: torch.nn.Module, features: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Step 3: the classifier's probability that each candidate is a speck, (n,) float32."""
    expected = getattr(classifier, "in_features", len(FEATURES))
    if features.shape[1] != expected:
        raise TransferSegError(f"the speck classifier reads {expected} features; this version computes "
                               f"{features.shape[1]} ({', '.join(FEATURES)})")
    if len(features) == 0:
        return np.zeros(0, np.float32)
    device = next(iter(classifier.parameters()), torch.zeros(0)).device
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch):
            x = torch.from_numpy(np.ascontiguousarray(features[start:start + batch])).to(device)
            out.append(torch.sigmoid(classifier(x).float()).reshape(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


# --- 4. clusters -----------------------------------------------------------------------------------
def _at_least(probabilities: np.ndarray, m: int) -> float:
    """P(at least ``m`` of independent events with these probabilities happen) (Poisson binomial)."""
    dist = np.zeros(m + 1)       # dist[c]: P(exactly c so far), c = m lumps "m or more"
    dist[0] = 1.0
    for p in probabilities:
        moved = dist * p
        dist = dist * (1.0 - p)
        dist[1:] += moved[:-1]
        dist[m] += moved[m]
    return float(dist[m])


def group_specks(kji: np.ndarray, probabilities: np.ndarray, spacing, settings: Optional[dict] = None,
                 volume: Optional[Volume] = None) -> list:
    """Step 4: specks (voxel positions (n, 3) and probabilities) into clusters, most confident first.

    Specks of probability ≥ ``speck_probability`` are linked when within ``link_mm`` in-plane and
    ``link_depth_mm`` between slices; each connected group of ``min_specks`` or more is a
    :class:`~TransferSegLib.heatmaps.Detection` of kind ``"calcification_cluster"`` at its central
    speck (the probability-weighted medoid), with the box of its specks (half-open) and the
    confidence that at least ``min_specks`` of them are real.  Clusters below ``threshold`` are left out.
    """
    s = _settings(settings)
    kji = np.asarray(kji, dtype=np.int64).reshape(-1, 3)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(kji) != len(probabilities):
        raise TransferSegError(f"group_specks: {len(kji)} positions but {len(probabilities)} probabilities")
    chosen = probabilities >= s["speck_probability"]
    kji, probabilities = kji[chosen], probabilities[chosen]
    m = int(s["min_specks"])
    if len(kji) < m:
        return []
    sk, sj, si = (float(v) for v in spacing)
    depth_scale = s["link_mm"] / max(s["link_depth_mm"], 1e-6)
    points = np.stack([kji[:, 0] * sk * depth_scale, kji[:, 1] * sj, kji[:, 2] * si], axis=1)
    pairs = cKDTree(points).query_pairs(r=s["link_mm"], output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(kji), len(kji)))
    count, labels = connected_components(graph, directed=False)
    detections = []
    for label in range(count):
        members = np.flatnonzero(labels == label)
        if len(members) < m:
            continue
        confidence = _at_least(probabilities[members], m)
        if confidence < s["threshold"]:
            continue
        where, weight = kji[members], probabilities[members]
        # the centre is the speck with the least probability-weighted distance to the others (a
        # medoid): always on a speck, even when two clusters touch or one speck lies far out
        top = np.argsort(-weight, kind="stable")[:_MEDOID_OF]
        mm = where[top] * np.array([sk, sj, si])
        spread = (np.linalg.norm(mm[:, None] - mm[None], axis=2) * weight[top][None]).sum(axis=1)
        centre = where[top[int(np.argmin(spread))]]
        ras = volume.ijk_to_ras_points(centre[None].astype(float))[0].round(3).tolist() if volume is not None else None
        box = [int(v) for v in where.min(axis=0)] + [int(v) + 1 for v in where.max(axis=0)]
        detections.append(Detection([int(v) for v in centre], ras, round(confidence, 6), box, kind=KIND))
    detections.sort(key=lambda d: -d.confidence)
    return detections


# --- all four --------------------------------------------------------------------------------------
def detect_calcification_clusters(volume: Volume, classifier: torch.nn.Module, settings: Optional[dict] = None,
                                  progress: Optional[ProgressCallback] = None,
                                  cancel: Optional[CancelToken] = None) -> list:
    """Calcification clusters in a DBT volume at its own resolution (see the module's docstring).

    Args:
        volume: a DBT volume (k = slices); intensities on any scale where calcium is bright
            (the breast's own 90th percentile is the reference for contrast).
        classifier: the speck classifier (``SpeckClassifier``, eval mode), e.g. a model card's
            network.
        settings: :data:`DEFAULTS` overridden (``threshold`` 0 returns every cluster, for a FROC).
        progress: ``callable(fraction, "calcifications")``; cancel: a CancelToken, checked
            before every slice.

    Returns a list of :class:`~TransferSegLib.heatmaps.Detection` of kind
    ``"calcification_cluster"``, positions on the volume's own grid, most confident first.
    """
    s = _settings(settings)
    candidates = speck_candidates(volume, s, progress=(lambda f, stage: progress(0.9 * f, stage)) if progress else None,
                                  cancel=cancel)
    check_cancel(cancel)
    probabilities = speck_probabilities(classifier, speck_features(volume, candidates))
    check_cancel(cancel)
    detections = group_specks(candidates.kji, probabilities, volume.spacing, s, volume=volume)
    if progress is not None:
        progress(1.0, STAGE)
    return detections
