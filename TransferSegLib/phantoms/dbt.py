"""The DBT phantom: a compressed breast with masses and calcification clusters (:func:`dbt_phantom`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..volume import TransferSegError, Volume
from .common import check_seed, check_shape, random_rotation, stream, unit_noise
from .geometry import Ellipsoid, Waves

DBT_DEFAULT_SHAPE = (32, 256, 192)


def _power_law_field(rng, shape, spacing, beta, f0=0.02) -> np.ndarray:
    """A 3D Gaussian random field whose 2D slices have power spectrum ∝ 1/f^β.

    The 3D spectrum falls as f^-(β+1): integrating it over the slice-normal frequency gives
    f^-β in the slice (projection-slice theorem).  ``f0`` (cycles/mm) flattens the lowest
    frequencies so the field is not dominated by one blob.
    """
    # in this order, and in place, so a clinical-size volume (50 × 3584 × 2816) holds as few
    # full-size float64 arrays at once as the transforms need; the values are the same
    spectrum = np.fft.rfftn(rng.standard_normal(shape))
    fk = np.fft.fftfreq(shape[0], spacing[0])[:, None, None]
    fj = np.fft.fftfreq(shape[1], spacing[1])[None, :, None]
    fi = np.fft.rfftfreq(shape[2], spacing[2])[None, None, :]
    spectrum *= (fk ** 2 + fj ** 2 + fi ** 2 + f0 ** 2) ** (-(beta + 1.0) / 4.0)
    field = np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2))
    del spectrum
    field = field.astype(np.float32)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _tomosynthesis_blur(volume, slice_mm, pixel_mm, sweep_deg, leak=0.25, decay_slices=2.0, reach=8):
    """Limited-angle out-of-plane blur: each slice sees its neighbours smeared along the sweep.

    An object ``d`` slices away is spread over a line of length 2·d·slice·tan(sweep_deg) along
    j (the tube sweeps ±sweep_deg parallel to the chest wall), with a weight that decays with d.
    Large (low-frequency) structures survive the smear and so leak into neighbouring
    slices; small ones are spread thin: the blur along k grows as the in-plane frequency falls.
    """
    nk = volume.shape[0]
    out = volume.copy()
    total = 1.0
    for d in range(1, min(reach, nk - 1) + 1):
        weight = leak * math.exp(-d / decay_slices)
        length = 2.0 * d * slice_mm * math.tan(math.radians(sweep_deg)) / pixel_mm
        size = max(1, int(round(length)) | 1)
        for sign in (-1, 1):
            idx = np.clip(np.arange(nk) + sign * d, 0, nk - 1)
            out += weight * ndimage.uniform_filter1d(volume[idx], size, axis=1, mode="nearest")
            total += weight
    out /= total
    return out


def _check_options(pixel_mm, slice_mm, masses, calcification_clusters) -> None:
    for name, value in (("pixel_mm", pixel_mm), ("slice_mm", slice_mm)):
        if not value > 0:
            raise TransferSegError(f"{name} must be positive; got {value}")
    for name, value in (("masses", masses), ("calcification_clusters", calcification_clusters)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise TransferSegError(f"{name} must be a whole number ≥ 0 or None; got {value!r}")


def _diameter_range(value) -> tuple:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TransferSegError(f"mass_diameter_mm must be two numbers (low, high) in mm; got {value!r}") from None
    if not 0.0 < low <= high:
        raise TransferSegError(f"mass_diameter_mm must have 0 < low ≤ high; got {value!r}")
    return low, high


@dataclass
class _Breast:
    """The compressed breast's shape and tissue constants (all drawn from stream 10, in this order)."""

    half_height: float   # mm, along the chest wall
    depth: float         # mm, chest wall to nipple
    yc: float
    thickness: float
    zc: float
    rho0: float          # where the rounded, uncompressed edge starts
    skin: float
    beta: float
    fibroglandular: float
    mu_fat: float
    mu_gland: float
    rho: np.ndarray = None   # (rows, columns) normalised in-plane radius
    z: np.ndarray = None     # (slices, 1, 1) mm

    def mask(self, shrink: float) -> np.ndarray:
        """The breast ``shrink`` mm inside its outer surface, (slices, rows, columns) bool."""
        r = self.rho * self.depth / max(self.depth - shrink, 1e-6)
        edge = np.maximum(r - self.rho0, 0.0) / (1.0 - self.rho0)
        return (edge[None] ** 2 + ((self.z - self.zc) / (self.thickness / 2.0 - shrink)) ** 2 <= 1.0) & (r <= 1.0)[None]


def _draw_breast(rng, shape, sk, p, beta) -> _Breast:
    nk, nj, ni = shape
    b = _Breast(
        half_height=nj * p * rng.uniform(0.38, 0.46),
        depth=ni * p * rng.uniform(0.62, 0.9),
        yc=nj * p * rng.uniform(0.46, 0.54),
        thickness=(nk - rng.uniform(1.0, 3.0)) * sk,
        zc=(nk - 1) * sk / 2.0 + rng.uniform(-0.3, 0.3) * sk,
        rho0=rng.uniform(0.55, 0.75),
        skin=rng.uniform(1.2, 2.0),
        beta=rng.uniform(2.8, 3.2) if beta is None else float(beta),
        fibroglandular=rng.uniform(0.15, 0.45),
        mu_fat=rng.uniform(0.22, 0.3),
        mu_gland=0.0,
    )
    b.mu_gland = b.mu_fat + rng.uniform(0.2, 0.3)
    x = (np.arange(ni) + 0.5) * p                          # mm from the chest wall
    y = np.arange(nj) * p
    b.z = np.arange(nk)[:, None, None] * sk
    theta = np.arctan2((y[:, None] - b.yc) / b.half_height, x[None, :] / b.depth)
    ripple = 1.0 + sum(rng.uniform(0.0, 0.03) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4))
    b.rho = np.hypot((y[:, None] - b.yc) / b.half_height, x[None, :] / b.depth) / ripple
    return b


def _breast_tissue(rng, breast: _Breast, shape, sk, p) -> np.ndarray:
    """Fat and fibroglandular tissue (a thresholded power-law field), skin, air: float32 in [0, 1]."""
    inside = breast.mask(0.0)
    interior = breast.mask(breast.skin)
    field = _power_law_field(rng, shape, (sk, p, p), breast.beta)
    field += 0.4 * np.clip(1.0 - breast.rho, 0.0, 1.0)[None]      # denser tissue towards the centre
    threshold = np.quantile(field[interior], 1.0 - breast.fibroglandular) if interior.any() else 0.0
    gland = 1.0 / (1.0 + np.exp(-(field - threshold) / 0.15))
    vol = (breast.mu_fat + (breast.mu_gland - breast.mu_fat) * gland).astype(np.float32)
    vol[inside & ~interior] = breast.mu_gland                      # skin
    vol[~inside] = 0.0
    return vol


def _add_lesions(vol, seed, breast: _Breast, spacing, masses, calcification_clusters, mass_diameter_mm) -> list:
    """Masses blended into ``vol``, then calcification clusters on top; their box dicts."""
    boxes = []
    mrng = stream(seed, 11)
    n_masses = int(stream(seed, 14).choice(3, p=[0.4, 0.4, 0.2])) if masses is None else int(masses)
    interior_kji = np.argwhere(breast.mask(breast.skin + 3.0))
    for _ in range(n_masses):
        boxes.append(_add_mass(vol, mrng, interior_kji, spacing, breast.mu_gland, breast.depth, breast.thickness,
                               mass_diameter_mm))
    crng = stream(seed, 12)
    n_clusters = int(stream(seed, 15).choice(3, p=[0.5, 0.35, 0.15])) if calcification_clusters is None \
        else int(calcification_clusters)
    calc = np.zeros_like(vol)
    for _ in range(n_clusters):
        boxes.append(_add_calcification_cluster(calc, crng, interior_kji, spacing))
    vol += calc * (1.0 - vol)
    return boxes


def _acquire(vol, seed, sk, p, sweep_deg) -> np.ndarray:
    """The acquisition: limited-angle blur and quantum noise, clipped to [0, 1]."""
    vol = _tomosynthesis_blur(vol, sk, p, sweep_deg)
    nrng = stream(seed, 13)
    vol += nrng.uniform(0.012, 0.025) * unit_noise(nrng, vol.shape, (0.0, 0.6, 0.6))
    np.clip(vol, 0.0, 1.0, out=vol)
    return vol


def _placed(vol, seed, spacing, boxes) -> Volume:
    """The volume in RAS (i → anterior, j → left, k → superior); each box gains ``box_ras_mm``."""
    directions = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # columns: i→A, j→L, k→S
    geo = stream(seed, 16)
    origin = np.array([geo.uniform(60.0, 140.0), geo.uniform(60.0, 110.0), geo.uniform(-60.0, -20.0)])
    volume = Volume(vol, spacing=spacing, directions=directions, origin=origin)
    for box in boxes:
        k0, j0, i0, k1, j1, i1 = box["box_kji"]
        corners = np.array([[k, j, i] for k in (k0 - 0.5, k1 - 0.5) for j in (j0 - 0.5, j1 - 0.5)
                            for i in (i0 - 0.5, i1 - 0.5)])
        ras = volume.ijk_to_ras_points(corners)
        box["box_ras_mm"] = [round(float(v), 3) for v in np.concatenate([ras.min(axis=0), ras.max(axis=0)])]
    return volume


def dbt_phantom(seed: int, shape=None, *, masses=None, calcification_clusters=None,
                pixel_mm: float = 0.4, slice_mm: float = 1.0, sweep_deg: float = 7.5, beta: float | None = None,
                mass_diameter_mm=(5.0, 20.0)):
    """A synthetic Digital Breast Tomosynthesis volume (cranio-caudal view) with lesion boxes.

    Args:
        seed: breast shape, texture, lesions and noise follow from it (each from its own
            stream: changing the number of masses leaves texture, calcifications and noise alone).
        shape: (slices, rows, columns); default :data:`DBT_DEFAULT_SHAPE` (32, 256, 192), about
            0.5 s.  Rows run along the chest wall, columns from the chest wall (column 0)
            towards the nipple, slices from the detector up to the compression paddle.
        masses: number of masses (round or spiculated, 5–20 mm unless ``mass_diameter_mm`` says, 0–0.08 denser than
            fibroglandular tissue); None draws 0–2.
        calcification_clusters: number of clusters of 5–20 bright specks (0.15–0.6 mm)
            within 2.5–7 mm; None draws 0–2.
        pixel_mm, slice_mm: in-plane and slice spacing.  The breast fills the field of view,
            so its size in mm scales with ``pixel_mm``; the compressed thickness is the
            slice count times ``slice_mm`` less 1–3 slices.
        sweep_deg: half the tube's angular range (±7.5° by default) for the out-of-plane blur.
        beta: exponent of the texture's power spectrum 1/f^β; None draws 2.8–3.2.
        mass_diameter_mm: (low, high) the masses' diameters are drawn from, uniformly (the high
            end capped by the breast's depth and thickness as always); e.g. (5, 8) for small
            masses only.  The default draws every seed's masses as before.

    Returns:
        ``(volume, boxes)``.  ``volume`` holds intensities in [0, 1] (air 0, fat ≈ 0.25,
        fibroglandular ≈ 0.5, calcifications up to 1), directions i → anterior, j → left,
        k → superior.  ``boxes`` has one dict per lesion: ``kind`` ("mass" or
        "calcification_cluster"), ``subtype`` ("round", "spiculated" or "cluster"),
        ``box_kji`` [k0, j0, i0, k1, j1, i1] (voxel indices, half-open, of the lesion before
        the out-of-plane blur), ``center_kji`` (float voxel indices of the lesion centre),
        ``box_ras_mm`` [R0, A0, S0, R1, A1, S1] (the box's outer voxel faces in RAS mm) and
        ``size_mm`` (mass diameter or cluster diameter); a cluster's dict also holds
        ``specks_kji`` (each speck's centre voxel [k, j, i], the pixel its peak sits on) and
        ``speck_sizes_mm`` (each speck's diameter), in the order they were drawn.
    """
    seed = check_seed(seed)
    shape = check_shape(shape, DBT_DEFAULT_SHAPE, (4, 32, 32), "DBT phantom")
    _check_options(pixel_mm, slice_mm, masses, calcification_clusters)
    mass_diameter_mm = _diameter_range(mass_diameter_mm)
    p, sk = float(pixel_mm), float(slice_mm)
    rng = stream(seed, 10)
    breast = _draw_breast(rng, shape, sk, p, beta)
    vol = _breast_tissue(rng, breast, shape, sk, p)
    boxes = _add_lesions(vol, seed, breast, (sk, p, p), masses, calcification_clusters, mass_diameter_mm)
    vol = _acquire(vol, seed, sk, p, sweep_deg)
    return _placed(vol, seed, (sk, p, p), boxes), boxes


def _box_of(mask, offset) -> list:
    nz = np.argwhere(mask)
    lo = nz.min(axis=0) + offset
    hi = nz.max(axis=0) + 1 + offset
    return [int(v) for v in lo] + [int(v) for v in hi]


def _add_mass(vol, rng, interior_kji, spacing, mu_gland, depth, thickness, diameter_mm=(5.0, 20.0)) -> dict:
    """Blend a round or spiculated mass into ``vol``; return its box dict."""
    sk, p, _ = spacing
    spiculated = rng.uniform() < 0.5
    low, high = diameter_mm
    diameter = rng.uniform(low, max(low, min(high, 0.45 * depth, thickness - 4.0)))
    r = diameter / 2.0
    centre_idx = interior_kji[rng.integers(len(interior_kji))].astype(float)
    centre_idx += rng.uniform(-0.5, 0.5, size=3)
    centre_mm = centre_idx * np.array(spacing)
    intensity = mu_gland + rng.uniform(0.0, 0.08)         # as dense as glandular tissue, or a little denser
    axes = np.exp(rng.normal(0.0, 0.12, size=3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    core = Ellipsoid(centre_mm, (0.6 if spiculated else 1.0) * r * axes, random_rotation(rng, 180.0),
                      Waves(rng, 6, (0.5 * diameter, 2.0 * diameter), 0.18 if spiculated else 0.05))
    spicules = []
    if spiculated:
        for _ in range(int(rng.integers(12, 25))):
            direction = rng.normal(size=3) * [0.1, 1.0, 1.0]      # mostly in-plane, as seen in the slices
            direction /= np.linalg.norm(direction)
            length = 0.7 * r + rng.uniform(0.8, 1.8) * r
            spicules.append((direction * length, max(0.6, 1.5 * p)))
    reach = r * 1.3 + (2.6 * r if spiculated else 0.0) + 2.0 * p
    lo = np.maximum(np.floor((centre_mm - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre_mm + reach) / spacing).astype(int) + 1, vol.shape)
    Z = (np.arange(lo[0], hi[0]) * sk)[:, None, None]
    Y = (np.arange(lo[1], hi[1]) * p)[None, :, None]
    X = (np.arange(lo[2], hi[2]) * p)[None, None, :]
    edge = max(0.5, p)                                     # a soft margin about one pixel wide
    scale = float(np.min(core.semi))
    occupancy = np.clip((1.0 - core.radius(Z, Y, X)) * scale / edge + 0.5, 0.0, 1.0)
    for offset, radius in spicules:
        d = offset
        dd = float(d @ d)
        t = np.clip(((Z - centre_mm[0]) * d[0] + (Y - centre_mm[1]) * d[1] + (X - centre_mm[2]) * d[2]) / dd, 0.0, 1.0)
        dist = np.sqrt((Z - centre_mm[0] - t * d[0]) ** 2 + (Y - centre_mm[1] - t * d[1]) ** 2
                       + (X - centre_mm[2] - t * d[2]) ** 2)
        taper = radius * (1.0 - 0.7 * t)
        occupancy = np.maximum(occupancy, np.clip((taper - dist) / edge + 0.5, 0.0, 1.0) * 0.9)
    sub = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    inside_breast = sub > 0
    occupancy = occupancy * inside_breast
    sub[...] = sub * (1.0 - occupancy) + intensity * occupancy
    return {
        "kind": "mass",
        "subtype": "spiculated" if spiculated else "round",
        "box_kji": _box_of(occupancy >= 0.25, lo),
        "center_kji": [round(float(v), 2) for v in centre_idx],
        "size_mm": round(float(diameter), 2),
    }


def _add_calcification_cluster(calc, rng, interior_kji, spacing) -> dict:
    """Add a cluster of sub-millimetre bright specks to ``calc`` (0–1 blend weights)."""
    sk, p, _ = spacing
    radius = rng.uniform(2.5, 7.0)
    centre_idx = interior_kji[rng.integers(len(interior_kji))].astype(float)
    centre_mm = centre_idx * np.array(spacing)
    touched = np.zeros(calc.shape, dtype=bool)
    specks, sizes = [], []
    for _ in range(int(rng.integers(5, 21))):
        offset = rng.normal(0.0, radius / 2.0, size=3) * [0.5, 1.0, 1.0]
        if np.linalg.norm(offset) > radius:
            offset *= radius / np.linalg.norm(offset)
        pos = (centre_mm + offset) / spacing
        k = int(np.clip(round(pos[0]), 0, calc.shape[0] - 1))
        size_mm = rng.uniform(0.15, 0.6)
        peak = float(np.clip(0.5 + 0.8 * size_mm, 0.6, 1.0))      # calcium: the brightest thing in the breast
        sigma = max(size_mm / 2.0 / p, 0.6)                          # pixels
        half = int(math.ceil(3 * sigma))
        j0, i0 = int(round(pos[1])), int(round(pos[2]))                 # centred on a pixel: its peak is not lost
        js = np.arange(max(j0 - half, 0), min(j0 + half + 1, calc.shape[1]))
        is_ = np.arange(max(i0 - half, 0), min(i0 + half + 1, calc.shape[2]))
        if js.size == 0 or is_.size == 0:
            continue
        g = peak * np.exp(-((js[:, None] - j0) ** 2 + (is_[None, :] - i0) ** 2) / (2 * sigma ** 2))
        patch = calc[k, js[0]:js[-1] + 1, is_[0]:is_[-1] + 1]
        np.maximum(patch, g, out=patch)
        touched[k, js[0]:js[-1] + 1, is_[0]:is_[-1] + 1] |= g >= 0.2 * peak
        specks.append([k, j0, i0])
        sizes.append(round(float(size_mm), 3))
    if not touched.any():
        k, j, i = (int(round(v)) for v in centre_idx)
        touched[k, j, i] = True
    return {
        "kind": "calcification_cluster",
        "subtype": "cluster",
        "box_kji": _box_of(touched, np.zeros(3, dtype=int)),
        "center_kji": [round(float(v), 2) for v in centre_idx],
        "size_mm": round(2.0 * radius, 2),
        "specks_kji": specks,
        "speck_sizes_mm": sizes,
    }
