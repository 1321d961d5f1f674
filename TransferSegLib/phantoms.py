"""Synthetic, seed-deterministic data: a CT abdomen, a DBT breast and the ACS proof-of-concept shapes.

Every generator takes a ``seed`` and draws only from ``np.random.default_rng`` streams derived
from it (no global random state), so the same seed always gives the same voxels and geometry.
The data are meant to be hard enough that a threshold does not solve them:

* :func:`ct_phantom` — an axial abdominal CT in HU with labels 0 background, 1 liver,
  2 liver tumor (the project's CT label convention).  Liver, spleen, kidney and muscle HU
  overlap; tumors have low contrast; noise is spatially correlated; thick slices average the
  anatomy (partial volume).
* :func:`dbt_phantom` — a Digital Breast Tomosynthesis volume: compressed breast, power-law
  (1/f^β, β ≈ 3) fibroglandular texture, masses and calcification clusters with 3D boxes,
  and limited-angle out-of-plane blur.
* :func:`shapes_2d`, :func:`shapes_3d` — the ACS convolutions paper's proof-of-concept data
  (Section IV-A): 2D circles, squares and triangles; 3D spheres, cubes, cylinders, cones and
  pyramids on textured backgrounds.

:func:`write_phantoms` writes a set of cases and a ``gallery.png`` (the ``transferseg phantom``
command).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from .volume import TransferSegError, Volume

__all__ = [
    "CT_DEFAULT_SHAPE",
    "CT_LABEL_NAMES",
    "CT_PHASES",
    "CT_TISSUE_NAMES",
    "DBT_DEFAULT_SHAPE",
    "PHANTOM_KINDS",
    "SHAPES_2D",
    "SHAPES_3D",
    "ct_phantom",
    "dbt_phantom",
    "shapes_2d",
    "shapes_3d",
    "write_phantoms",
]

CT_DEFAULT_SHAPE = (40, 96, 96)
DBT_DEFAULT_SHAPE = (32, 256, 192)
CT_LABEL_NAMES = {1: "liver", 2: "liver tumor"}
SHAPES_2D = ("circle", "square", "triangle")
SHAPES_3D = ("sphere", "cube", "cylinder", "cone", "pyramid")


# ======================================================================================
# Shared helpers
# ======================================================================================
def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent stream per purpose, so e.g. adding a tumor does not move the noise."""
    return np.random.default_rng([int(seed), stream])


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TransferSegError(f"seed must be a non-negative whole number; got {seed!r}")
    return int(seed)


def _check_shape(shape, default, minimum, what) -> tuple:
    shape = default if shape is None else shape
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TransferSegError(f"{what} shape must be three whole numbers (k, j, i); got {shape!r}") from None
    if len(shape) != 3 or any(s < m for s, m in zip(shape, minimum)):
        raise TransferSegError(
            f"{what} shape must be three numbers (slices, rows, columns) of at least "
            f"{'×'.join(map(str, minimum))}; got {shape!r}"
        )
    return shape


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation by at most ``max_deg`` degrees about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _unit_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _block_mean(fine: np.ndarray, factors) -> np.ndarray:
    """Average non-overlapping blocks: the partial-volume effect of a coarse voxel."""
    out = fine.astype(np.float32, copy=False)
    for axis, f in enumerate(factors):
        if f > 1:
            shape = out.shape
            out = out.reshape(shape[:axis] + (shape[axis] // f, f) + shape[axis + 1:]).sum(axis=axis + 1)
    return out / np.float32(np.prod(factors))


# ======================================================================================
# CT abdomen
# ======================================================================================
# Tissue classes painted on the fine grid; each gets an HU value and texture amplitudes.
(AIR, SKIN, FAT_SC, MUSCLE, FAT_VISC, LUNG, LIVER, LIVER_PORTAL, LIVER_HEPATIC, SPLEEN,
 KIDNEY_CORTEX, KIDNEY_MEDULLA, RENAL_SINUS, AORTA, VEIN, PORTAL, BONE_CORTEX, BONE_MARROW,
 DISC, CSF, CARTILAGE, BOWEL_WALL, FLUID, GAS, STOOL, BILE, MYOCARDIUM, BLOOD, PANCREAS,
 TABLE_SHELL, TABLE_FOAM) = range(31)
_TUMOR0 = 64  # tumor n is class _TUMOR0 + n
_RIM0 = 128   # the enhancing rim or capsule of tumor n is class _RIM0 + n (labelled tumor too)
_LIVER_TISSUE = (LIVER, LIVER_PORTAL, LIVER_HEPATIC)
#: Names of the values in the tissue map that ``ct_phantom(..., with_tissues=True)`` returns.
CT_TISSUE_NAMES = {
    AIR: "air", SKIN: "skin", FAT_SC: "subcutaneous fat", MUSCLE: "muscle", FAT_VISC: "visceral fat",
    LUNG: "lung", LIVER: "liver", LIVER_PORTAL: "portal vein branch (in liver)",
    LIVER_HEPATIC: "hepatic vein (in liver)", SPLEEN: "spleen", KIDNEY_CORTEX: "kidney cortex",
    KIDNEY_MEDULLA: "kidney medulla", RENAL_SINUS: "renal sinus fat", AORTA: "aorta",
    VEIN: "inferior vena cava / renal vein", PORTAL: "portal vein", BONE_CORTEX: "cortical bone",
    BONE_MARROW: "cancellous bone", DISC: "intervertebral disc", CSF: "spinal canal", CARTILAGE: "costal cartilage",
    BOWEL_WALL: "bowel / stomach wall", FLUID: "bowel / stomach fluid", GAS: "bowel / stomach gas",
    STOOL: "stool", BILE: "gallbladder", MYOCARDIUM: "myocardium", BLOOD: "heart blood pool",
    PANCREAS: "pancreas", TABLE_SHELL: "table shell", TABLE_FOAM: "table foam", _TUMOR0: "liver tumor",
}


class _FineGrid:
    """Tissue classes on a grid finer than the output, in body-frame millimetres.

    Body frame: x towards the patient's right, y anterior, z superior, (0, 0) the body centre
    in-plane and z = 0 the top of the right diaphragm dome.  The output directions are
    axis-aligned, so x depends on the column only, y on the row only, z on the slice only.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.cls = np.full((len(z), len(y), len(x)), AIR, dtype=np.uint8)

    @staticmethod
    def _range(coord: np.ndarray, lo: float, hi: float) -> slice:
        hits = np.flatnonzero((coord >= lo) & (coord <= hi))
        return slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0)

    def paint(self, cls: int, inside, lo, hi, into=None) -> None:
        """Set ``cls`` where ``inside(X, Y, Z)`` holds within the box [lo, hi] (x, y, z mm).

        ``into``: the classes that may be overwritten (None: all).
        """
        sk = self._range(self.z, lo[2], hi[2])
        sj = self._range(self.y, lo[1], hi[1])
        si = self._range(self.x, lo[0], hi[0])
        if sk.stop == sk.start or sj.stop == sj.start or si.stop == si.start:
            return
        X = self.x[si][None, None, :]
        Y = self.y[sj][None, :, None]
        Z = self.z[sk][:, None, None]
        mask = np.broadcast_to(inside(X, Y, Z), (sk.stop - sk.start, sj.stop - sj.start, si.stop - si.start))
        sub = self.cls[sk, sj, si]
        if into is not None:
            allowed = np.zeros(256, dtype=bool)
            allowed[list(into)] = True
            mask = mask & allowed[sub]
        sub[mask] = cls

    def fraction(self, inside, lo, hi, classes) -> float:
        """The share of the voxels where ``inside`` holds that are one of ``classes`` now (0 if none)."""
        sk = self._range(self.z, lo[2], hi[2])
        sj = self._range(self.y, lo[1], hi[1])
        si = self._range(self.x, lo[0], hi[0])
        mask = np.broadcast_to(inside(self.x[si][None, None, :], self.y[sj][None, :, None], self.z[sk][:, None, None]),
                               (sk.stop - sk.start, sj.stop - sj.start, si.stop - si.start))
        total = int(mask.sum())
        if total == 0:
            return 0.0
        return float(np.isin(self.cls[sk, sj, si][mask], list(classes)).sum()) / total


class _Ellipsoid:
    """A (rotated, optionally lobulated) ellipsoid: normalised radius, inside-test and box.

    ``rot`` columns are the ellipsoid's axes in the body frame; ``waves`` perturbs the
    normalised radius so that the outline is smooth but irregular.
    """

    def __init__(self, center, semi, rot=None, waves=None):
        self.c = np.asarray(center, float)
        self.semi = np.asarray(semi, float)
        self.rot = np.eye(3) if rot is None else np.asarray(rot, float)
        self.waves = waves
        margin = 1.0 + (0.0 if waves is None else waves.amplitude)
        extent = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1)) * margin
        self.lo, self.hi = self.c - extent, self.c + extent

    def radius(self, X, Y, Z):
        # r² = dᵀ M d with M = R diag(1/semi²) Rᵀ, grouped so that the 1D coordinate arrays
        # combine into 2D terms first and only two operations run on the full 3D box.
        m = (self.rot / self.semi ** 2) @ self.rot.T
        d0, d1, d2 = (np.asarray(v - c, dtype=np.float32) for v, c in zip((X, Y, Z), self.c))
        plane = m[0, 0] * d0 ** 2 + m[1, 1] * d1 ** 2 + 2 * m[0, 1] * d0 * d1
        cross = 2 * m[0, 2] * d0 + 2 * m[1, 2] * d1
        r = np.sqrt(np.maximum(plane + d2 * cross + m[2, 2] * d2 ** 2, 0.0))
        return r if self.waves is None else r - self.waves(X, Y, Z)

    def inside(self, X, Y, Z):
        return self.radius(X, Y, Z) <= 1.0


def _ellipsoid(center, semi, rot=None, waves=None):
    """``(inside, lo, hi)`` of an :class:`_Ellipsoid`, the arguments :meth:`_FineGrid.paint` takes."""
    e = _Ellipsoid(center, semi, rot, waves)
    return e.inside, e.lo, e.hi


class _Waves:
    """A smooth random field: a sum of plane waves (amplitude bounds its absolute value)."""

    def __init__(self, rng, n, wavelength_mm, amplitude):
        self.k = rng.normal(size=(n, 3))
        self.k *= (2 * np.pi / rng.uniform(*wavelength_mm, size=n) / np.linalg.norm(self.k, axis=1))[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        self.weight = rng.uniform(0.5, 1.0, size=n)
        self.weight *= amplitude / self.weight.sum()
        self.amplitude = float(amplitude)

    def __call__(self, X, Y, Z):
        # Σ w sin(k·p + φ) = Im Σ w e^{i(kx x + φ)} e^{i ky y} e^{i kz z}: for coordinates that
        # each vary along one axis this is one small matrix product instead of 3D sines.
        shapes = [np.shape(v) for v in (X, Y, Z)]
        axes = [next((n for n, s in enumerate(sh) if s > 1), None) for sh in shapes]
        if len({len(sh) for sh in shapes}) == 1 and None not in axes and len(set(axes)) == 3:
            coords = [np.ravel(v).astype(np.float64) for v in (X, Y, Z)]
            order = np.argsort(axes)               # which of x, y, z runs along array axes 0, 1, 2
            first, rest = order[0], order[1:]
            e = [np.exp(1j * (np.outer(self.k[:, n], coords[n]) + (self.phase[:, None] if n == first else 0.0)))
                 for n in range(3)]
            a = (self.weight[:, None] * e[first]).T.astype(np.complex64)                          # (n0, waves)
            b = (e[rest[0]][:, :, None] * e[rest[1]][:, None, :]).reshape(len(self.k), -1).astype(np.complex64)
            out = (a @ b).imag.reshape(len(coords[first]), len(coords[rest[0]]), len(coords[rest[1]]))
            return out
        total = 0.0
        for (kx, ky, kz), p, w in zip(self.k, self.phase, self.weight):
            total = total + w * np.sin(kx * X + ky * Y + kz * Z + p)
        return total


def _capsule(p0, p1, r0, r1=None):
    """Inside-test and box of a tube from p0 to p1 whose radius tapers from r0 to r1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    r1 = r0 if r1 is None else r1
    d = p1 - p0
    dd = max(float(d @ d), 1e-9)

    def inside(X, Y, Z):
        t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / dd, 0.0, 1.0)
        dist2 = (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
        return dist2 <= (r0 + t * (r1 - r0)) ** 2

    r = max(r0, r1)
    return inside, np.minimum(p0, p1) - r, np.maximum(p0, p1) + r


def _paint_path(grid, cls, points, radii, into):
    for n in range(len(points) - 1):
        grid.paint(cls, *_capsule(points[n], points[n + 1], radii[n], radii[n + 1]), into=into)


def _vessel_tree(rng, start, end, radius, depth, out):
    """Segments of a branching tree: each branch splits in two, shorter and thinner."""
    out.append((np.asarray(start, float), np.asarray(end, float), radius))
    if depth == 0:
        return
    direction = np.asarray(end, float) - np.asarray(start, float)
    length = np.linalg.norm(direction)
    for _ in range(2):
        new_dir = _rotation(rng, 40.0) @ (direction / length)
        child_end = end + new_dir * length * rng.uniform(0.55, 0.8)
        _vessel_tree(rng, end, child_end, radius * 0.7, depth - 1, out)


def _ct_scan(rng, nk: int, nj: int, ni: int) -> SimpleNamespace:
    """Draw the patient's build and the acquisition: spacing, origin, where the body lies."""
    size = rng.uniform(0.85, 1.2)
    a = rng.uniform(140.0, 165.0) * size             # body half width (left-right), mm
    b = a * rng.uniform(0.64, 0.76)                   # body half depth (antero-posterior)
    fat = rng.uniform(8.0, 24.0) * size ** 2          # subcutaneous fat
    muscle_w = rng.uniform(7.0, 12.0)
    fov = float(np.clip(rng.uniform(2.12 * a + 15.0, 2.12 * a + 70.0), 310.0, 500.0))
    coverage = rng.uniform(165.0, 200.0)              # dome of the diaphragm to the kidneys
    dome_margin = rng.uniform(15.0, 35.0)
    recon_offset_y = rng.uniform(-15.0, 15.0)
    z_table = rng.uniform(-450.0, -150.0)
    pos_x, pos_y = rng.uniform(-1.0, 1.0, size=2)
    s_ip = fov / ni
    s_k = float(np.clip(coverage / nk, 1.0, 5.0))
    z_top = dome_margin if nk * s_k >= 150.0 else -70.0 + nk * s_k / 2.0   # body-frame z of the last slice
    slack = max(0.0, (fov - 2.12 * a) / 2.0 - 5.0)
    origin = np.array([(ni - 1) * s_ip / 2.0, (nj - 1) * s_ip / 2.0 + recon_offset_y, z_table])
    body_centre = (0.5 * slack * pos_x, 0.3 * slack * pos_y - 10.0, origin[2] + (nk - 1) * s_k - z_top)
    return SimpleNamespace(a=a, b=b, fat=fat, muscle_w=muscle_w, organ=size ** 0.5, fov=fov,
                           spacing=(s_k, s_ip, s_ip), origin=origin, body_centre=body_centre)


#: contrast phase -> tissue -> HU range it is drawn from (portal-venous and arterial values as reported for
#: abdominal CT: liver about 55–65 HU unenhanced, 100–130 HU in the portal venous phase)
CT_PHASES = {
    "non-contrast": {LIVER: (55, 65), SPLEEN: (45, 55), KIDNEY_CORTEX: (30, 40), AORTA: (35, 50), VEIN: (35, 50),
                     PORTAL: (35, 50), LIVER_PORTAL: (35, 50), LIVER_HEPATIC: (35, 50), BLOOD: (35, 50)},
    "arterial": {LIVER: (70, 85), SPLEEN: (90, 120), KIDNEY_CORTEX: (150, 200), AORTA: (250, 350), VEIN: (50, 80),
                 PORTAL: (100, 150), LIVER_PORTAL: (90, 140), LIVER_HEPATIC: (45, 70), BLOOD: (250, 350)},
    "portal": {LIVER: (100, 130), SPLEEN: (110, 130), KIDNEY_CORTEX: (150, 190), AORTA: (150, 200), VEIN: (130, 170),
               PORTAL: (160, 200), LIVER_PORTAL: (150, 200), LIVER_HEPATIC: (150, 190), BLOOD: (150, 200)},
    "delayed": {LIVER: (85, 105), SPLEEN: (90, 110), KIDNEY_CORTEX: (110, 140), AORTA: (110, 140), VEIN: (110, 140),
                PORTAL: (110, 140), LIVER_PORTAL: (110, 140), LIVER_HEPATIC: (110, 140), BLOOD: (110, 140)},
}


def _phase_of(seed: int, phase: str) -> str:
    """``phase`` itself, or for ``"random"`` one drawn from the seed (its own stream)."""
    if phase == "random":
        return str(_rng(seed, 4).choice(list(CT_PHASES)))
    if phase not in CT_PHASES:
        raise TransferSegError(f"phase must be one of {', '.join(CT_PHASES)} or random; got {phase!r}")
    return phase


def _enhance(hu: np.ndarray, phase: str, rng) -> None:
    """Set the enhancing tissues' HU (in place) to one draw of ``phase``'s ranges."""
    for tissue, (low, high) in CT_PHASES[phase].items():
        hu[tissue] = rng.uniform(low, high)


#: tumor kind -> (weight, phase -> (low, high) HU relative to the liver of that phase), as liver lesions
#: look on CT: hypodense metastases (a third with an enhancing rim), arterially hyperenhancing tumors
#: that wash out later (with a capsule), cysts near water (absolute HU) and subtle hypodense ones.
TUMOR_KINDS = {
    "metastasis": (0.45, {"non-contrast": (-30, -12), "arterial": (-60, -25), "portal": (-70, -30), "delayed": (-55, -25)}),
    "hyperenhancing": (0.2, {"non-contrast": (-20, -6), "arterial": (30, 70), "portal": (-25, -6), "delayed": (-30, -10)}),
    "cyst": (0.2, None),
    "subtle": (0.15, {"non-contrast": (-20, -10), "arterial": (-20, -10), "portal": (-22, -10), "delayed": (-20, -10)}),
}
#: how far the scan reaches, in body-frame mm (z = 0 the right diaphragm's dome): (top, bottom) ranges
#: and the share of cases; "chest" and the neck/head/legs have no liver and are scope-test phantoms.
CT_COVERAGE = {
    "liver": (0.4, None),                                # dome of the diaphragm to the kidneys, as before
    "abdomen": (0.3, ((-5.0, 40.0), (-260.0, -200.0))),
    "chest-abdomen": (0.3, ((70.0, 160.0), (-250.0, -120.0))),
}


def _draw_tumor(rng, phase: str, liver_hu: float) -> dict:
    """One tumor of a random kind (:data:`TUMOR_KINDS`): its core HU and, for some, a rim's HU and width."""
    names = list(TUMOR_KINDS)
    weights = np.array([TUMOR_KINDS[n][0] for n in names])
    kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    out = {"kind": kind, "rim": None, "texture": (5.0, 3.0), "waves": 0.06, "elongation": 0.1}
    if kind == "cyst":
        out.update(hu=rng.uniform(0.0, 20.0), texture=(1.5, 0.0), waves=0.02, elongation=0.05)
        return out
    low, high = TUMOR_KINDS[kind][1][phase]
    out["hu"] = liver_hu + rng.uniform(low, high)
    enhancing = phase in ("arterial", "portal", "delayed")
    if kind == "metastasis" and enhancing and rng.uniform() < 0.35:          # a viable enhancing rim
        out["rim"] = (liver_hu + rng.uniform(-5.0, 30.0), rng.uniform(0.12, 0.25))
        out["texture"] = (7.0, 5.0)
    elif kind == "hyperenhancing" and phase in ("portal", "delayed") and rng.uniform() < 0.5:   # capsule
        out["rim"] = (liver_hu + rng.uniform(10.0, 25.0), rng.uniform(0.06, 0.12))
    return out


def _coverage(seed: int, coverage, scan, nk: int) -> None:
    """Move the scan's z range (in place) to one of :data:`CT_COVERAGE`, drawn from its own stream."""
    if coverage is None:
        return
    rng = _rng(seed, 7)
    if coverage == "random":
        names = list(CT_COVERAGE)
        weights = np.array([CT_COVERAGE[n][0] for n in names])
        coverage = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if coverage not in CT_COVERAGE:
        raise TransferSegError(f"coverage must be one of {', '.join(CT_COVERAGE)} or random; got {coverage!r}")
    ranges = CT_COVERAGE[coverage][1]
    if ranges is None:
        return
    top, bottom = (rng.uniform(*r) for r in ranges)
    s_k = float(np.clip((top - bottom) / nk, 1.0, 5.0))
    cx, cy, _ = scan.body_centre
    scan.spacing = (s_k, scan.spacing[1], scan.spacing[2])
    scan.body_centre = (cx, cy, scan.origin[2] + (nk - 1) * s_k - top)


def _randomise_intensities(seed: int, hu: np.ndarray) -> None:
    """SynthSeg-style: every tissue's HU moved by a random amount within bounds (in place).

    Air, gas, lung and the table keep theirs (the HU window clips them anyway); soft tissue moves
    by up to ±12 HU, bone by up to ±15 %.
    """
    rng = _rng(seed, 8)
    fixed = {AIR, GAS, LUNG, TABLE_SHELL, TABLE_FOAM}
    for tissue in range(_TUMOR0):
        if tissue in fixed:
            continue
        bound = 0.15 * abs(float(hu[tissue])) if hu[tissue] > 300 else 12.0
        hu[tissue] += rng.uniform(-bound, bound)


def _reconstruct(seed: int, array: np.ndarray, kernel: bool, bias: bool) -> None:
    """What a scanner's reconstruction adds (in place): with ``kernel`` a soft kernel's in-plane blur,
    with ``bias`` a smooth additive field (beam hardening, scatter) of up to ±15 HU."""
    rng = _rng(seed, 6)
    blur = rng.uniform(0.0, 0.9)                # pixels
    if kernel and blur > 0.05:
        array[...] = ndimage.gaussian_filter(array, (0.0, blur, blur))
    if bias:
        amplitude = rng.uniform(0.0, 15.0)
        field = _unit_noise(rng, tuple(max(1, n // 8) for n in array.shape), (1.0, 2.0, 2.0))
        zoom = [n / m for n, m in zip(array.shape, field.shape)]
        array += amplitude * ndimage.zoom(field, zoom, order=1)[tuple(slice(0, n) for n in array.shape)]


def ct_phantom(seed: int, shape=None, tumors=None, *, noise_sigma=None, tumor_diameter_mm=(4.0, 40.0),
               with_tissues: bool = False, phase=None, tumor_kinds=None, coverage=None, reconstruction=None,
               randomise: bool = False):
    """A synthetic axial abdominal CT (HU) with liver and liver-tumor labels.

    Args:
        seed: the whole case — patient size and position, field of view, slice spacing,
            anatomy, tumors, texture and noise — follows from it.
        shape: output (slices, rows, columns); default :data:`CT_DEFAULT_SHAPE` (40, 96, 96),
            about 0.5 s on one core.  The field of view (310–500 mm, fitted to the patient)
            and the z coverage (165–200 mm, dome of the diaphragm to the kidneys) do not
            depend on ``shape``, so ``shape`` sets the resolution: (64, 512, 512) gives a
            clinical grid with 0.6–1.0 mm pixels and 2.6–3.1 mm slices (about 15 s).  Slice
            spacing is kept within 1–5 mm; with few slices the scan covers the centre of the
            liver.  The default's pixels are coarser (3.2–5.2 mm) than a clinical CT's.
        tumors: number of liver tumors; None draws 0–5.  Each tumor is 4–40 mm in diameter
            (``tumor_diameter_mm``; the lower bound is raised to 1.5 voxels so that every
            tumor appears in the label), hypo- (65 %) or hyper-dense by 14–32 HU, about a
            third of them at the liver edge.  Tumors that do not fit are left out.
        noise_sigma: standard deviation of the correlated noise in HU; None draws 11–20.
        with_tissues: also return a uint8 map of the tissue at each voxel's centre (values
            and names in :data:`CT_TISSUE_NAMES`; every tumor is 64), e.g. to find the spleen
            and kidneys or to make multi-organ labels.
        phase: the contrast phase, as real scans have them (:data:`CT_PHASES`): ``"non-contrast"``
            (liver 55–65 HU), ``"arterial"`` (aorta 250–350, liver 70–85), ``"portal"`` (liver
            100–130, portal and hepatic veins 150–200) or ``"delayed"`` (liver 85–105), the
            liver, spleen, kidneys and vessels enhancing together; ``"random"`` draws one per seed.
            None (the default) keeps the older phantoms bit for bit: vessels enhanced by a random
            amount in an unenhanced liver, which no real scan shows.  Tumors keep their contrast
            relative to the liver they sit in.

    Returns:
        ``(volume, labels)``: a :class:`Volume` in HU (air −1000, clipped to [−1024, 3071],
        whole numbers) with the geometry a DICOM series would give — LPS axial: i towards
        the patient's left, j posterior, k superior (RAS directions diag(−1, −1, 1)) and a
        non-zero origin — and a uint8 label map (0 background, 1 liver, 2 liver tumor).

    The anatomy is built on a grid finer than the output (2 × 2 sub-pixels for pixels over
    1.2 mm; sub-slices of at most 1.25 mm or one sub-pixel, up to 5 per slice) and averaged
    over each output voxel, so thick slices show partial-volume effects.  A voxel is labelled tumor when at least half of it is tumor,
    else liver when at least half of it is liver (intrahepatic vessel branches included).
    """
    seed = _check_seed(seed)
    nk, nj, ni = _check_shape(shape, CT_DEFAULT_SHAPE, (1, 32, 32), "CT phantom")
    if tumors is not None and (isinstance(tumors, bool) or int(tumors) != tumors or tumors < 0):
        raise TransferSegError(f"tumors must be a whole number ≥ 0 or None; got {tumors!r}")
    d_lo, d_hi = (float(v) for v in tumor_diameter_mm)
    if not 0 < d_lo <= d_hi:
        raise TransferSegError(f"tumor_diameter_mm must be (low, high) with 0 < low ≤ high; got {tumor_diameter_mm}")

    if tumor_kinds not in (None, "mixed"):
        raise TransferSegError(f"tumor_kinds must be None or 'mixed'; got {tumor_kinds!r}")
    if reconstruction not in (None, "random"):
        raise TransferSegError(f"reconstruction must be None or 'random'; got {reconstruction!r}")
    phase_name = None if phase is None else _phase_of(seed, phase)

    rng = _rng(seed, 0)
    scan = _ct_scan(rng, nk, nj, ni)
    _coverage(seed, coverage, scan, nk)
    s_k, s_ip, origin = scan.spacing[0], scan.spacing[2], scan.origin

    # --- fine grid -----------------------------------------------------------------------
    ss_ip = 2 if s_ip > 1.2 else 1
    ss_k = int(np.clip(math.ceil(s_k / max(s_ip / ss_ip, 1.25) - 1e-6), 1, 5))   # sub-slices of ≤ 1.25 mm or a fine pixel
    sub_ip = (np.arange(ss_ip) + 0.5) / ss_ip - 0.5
    sub_k = (np.arange(ss_k) + 0.5) / ss_k - 0.5
    fi = (np.arange(ni)[:, None] + sub_ip[None, :]).ravel()
    fj = (np.arange(nj)[:, None] + sub_ip[None, :]).ravel()
    fk = (np.arange(nk)[:, None] + sub_k[None, :]).ravel()
    cx, cy, cz = scan.body_centre
    grid = _FineGrid(*(np.asarray(c, dtype=np.float32) for c in (
        origin[0] - fi * s_ip - cx, origin[1] - fj * s_ip - cy, origin[2] + fk * s_k - cz)))

    hu, tex_fine, tex_coarse = _paint_ct_anatomy(grid, rng, scan.a, scan.b, scan.fat, scan.muscle_w, scan.organ,
                                                 scan.fov, s_ip)
    if phase_name is not None:  # after the anatomy's own draws, from a stream of its own: phase=None is unchanged
        _enhance(hu, phase_name, _rng(seed, 3))
    if randomise:
        _randomise_intensities(seed, hu)

    # --- tumors: centres drawn from the liver as the output grid sees it ---------------------
    trng = _rng(seed, 1)
    n_tumors = int(trng.choice(6, p=[0.15, 0.25, 0.25, 0.15, 0.1, 0.1])) if tumors is None else int(tumors)
    kinds = None
    if tumor_kinds == "mixed":
        krng = _rng(seed, 5)
        if tumors is None and krng.uniform() < 0.2:       # many small ones (miliary metastases)
            n_tumors = int(krng.integers(4, 11))
            d_hi = min(d_hi, max(d_lo, 15.0))
        kinds = [_draw_tumor(krng, phase_name or "non-contrast", float(hu[LIVER])) for _ in range(n_tumors)]
    factors = (ss_k, ss_ip, ss_ip)
    is_liver = np.zeros(256, dtype=np.float32)
    is_liver[list(_LIVER_TISSUE)] = 1.0
    liver_frac = _block_mean(is_liver[grid.cls], factors)
    d_lo = max(d_lo, 1.5 * max(s_k, s_ip))
    d_hi = max(d_hi, d_lo)
    placed = _place_tumors(grid, factors, trng, n_tumors, liver_frac >= 0.5, (s_k, s_ip, s_ip), (d_lo, d_hi),
                           hu, tex_fine, tex_coarse, kinds)

    # --- average each output voxel, add texture and noise -----------------------------------
    cls = grid.cls
    array = _block_mean(hu[cls], factors)
    nrng = _rng(seed, 2)
    array += _block_mean(tex_fine[cls], factors) * _unit_noise(nrng, array.shape, (0.4, 0.8, 0.8))
    array += _block_mean(tex_coarse[cls], factors) * _unit_noise(nrng, array.shape, (1.0, 6.0 / s_ip, 6.0 / s_ip))
    sigma = nrng.uniform(11.0, 20.0) if noise_sigma is None else float(noise_sigma)
    corr = nrng.uniform(0.6, 1.1)  # noise correlation length in pixels, in-plane only (per-slice reconstruction)
    if reconstruction == "random" or randomise:
        _reconstruct(seed, array, reconstruction == "random", randomise)
    if reconstruction == "random":   # kernels and doses: sharp and noisy to smooth and quiet
        drng = _rng(seed, 9)
        corr = drng.uniform(0.5, 1.8)
        if noise_sigma is None:
            sigma = drng.uniform(6.0, 32.0)
    array += sigma * _unit_noise(nrng, array.shape, (0.0, corr, corr))
    array = np.clip(np.round(array), -1024, 3071).astype(np.float32)

    is_tumor = np.zeros(256, dtype=np.float32)
    for first in (_TUMOR0, _RIM0):
        is_tumor[first:first + placed] = 1.0
        is_liver[first:first + placed] = 1.0
    tumor_frac = _block_mean(is_tumor[cls], factors)
    liver_frac = _block_mean(is_liver[cls], factors)
    labels = np.where(tumor_frac >= 0.5, 2, np.where(liver_frac >= 0.5, 1, 0)).astype(np.uint8)

    volume = Volume(array, spacing=(s_k, s_ip, s_ip), directions=np.diag([-1.0, -1.0, 1.0]), origin=origin)
    if with_tissues:
        tissues = np.minimum(cls[ss_k // 2::ss_k, ss_ip // 2::ss_ip, ss_ip // 2::ss_ip], _TUMOR0)
        return volume, labels, np.ascontiguousarray(tissues)
    return volume, labels


def _paint_ct_anatomy(grid, rng, a, b, fat, muscle_w, organ, fov, pixel_mm):
    """Paint the abdomen into ``grid``; return per-class HU and texture-amplitude tables."""
    x2 = grid.x[None, :]
    y2 = grid.y[:, None]
    # --- body outline: a superellipse, rounder in front, flatter at the back, with ripples --
    p = np.where(y2 > 0, 2.0, 2.6)
    rho2 = ((np.abs(x2) / a) ** p + (np.abs(y2) / b) ** p) ** (1.0 / p)
    theta = np.arctan2(y2 / b, x2 / a)
    ripple, ripple_back = 1.0, 1.0
    for m in range(2, 6):
        amp, ph = rng.uniform(0.0, 0.025), rng.uniform(0, 2 * np.pi)
        ripple = ripple + amp * np.cos(m * theta + ph)
        ripple_back += amp * math.cos(-m * np.pi / 2 + ph)
    rho2 = rho2 / ripple
    rho2 = rho2.astype(np.float32)
    taper = rng.uniform(-0.04, 0.04)
    g = (1.0 + taper * (grid.z + 90.0) / 100.0).astype(np.float32)   # the outline widens or narrows slowly with z
    r_mean = (a + b) / 2.0
    rho_skin = 1.0 - 2.0 / r_mean
    rho_fat = rho_skin - fat / r_mean
    rho_cav = rho_fat - muscle_w / r_mean
    cls = grid.cls
    depth = np.zeros(cls.shape, dtype=np.uint8)          # how many outline shells a voxel lies inside
    rho = rho2[None, :, :] / g[:, None, None]
    for level in (1.0, rho_skin, rho_fat, rho_cav):
        depth += rho <= level
    del rho
    cls[...] = np.array([AIR, SKIN, FAT_SC, MUSCLE, FAT_VISC], dtype=np.uint8)[depth]
    del depth
    ac, bc = a * rho_cav, b * rho_cav                    # the abdominal cavity's half axes
    big = 1e4
    everywhere = (-big, -big, -big), (big, big, big)

    # --- patient table (carbon shell, foam core) under the back -------------------------------
    y_top = -b * ripple_back - rng.uniform(0.0, 3.0)       # the back rests on the table
    table_half = min(0.47 * fov, 230.0)

    shell = max(3.0, 2.0 * pixel_mm)      # at least two pixels thick, so that it does not alias into dashes

    def table(lo_off, hi_off):
        return lambda X, Y, Z: (np.abs(X) <= table_half) & (Y <= y_top + 0.0006 * X ** 2 - lo_off) & \
            (Y >= y_top + 0.0006 * X ** 2 - hi_off)

    table_box = (-table_half, y_top - 50, -big), (table_half, y_top + 40, big)
    grid.paint(TABLE_SHELL, table(0.0, 45.0), *table_box, into=(AIR,))
    grid.paint(TABLE_FOAM, table(shell, 45.0 - shell), *table_box, into=(TABLE_SHELL,))

    # --- diaphragm domes, lungs and heart ----------------------------------------------------
    left_drop = rng.uniform(10.0, 25.0)
    apex_y = -0.05 * bc

    def dome(X, Y):
        right = -55.0 * ((X - 0.45 * ac) / (0.7 * ac)) ** 2
        left = -left_drop - 55.0 * ((X + 0.45 * ac) / (0.7 * ac)) ** 2
        return np.maximum(right, left) - 45.0 * ((Y - apex_y) / (0.9 * bc)) ** 2

    def below_dome(margin):
        return lambda X, Y, Z: Z < dome(X, Y) - margin

    heart = _Ellipsoid((-0.12 * ac, 0.3 * bc, 35.0), (0.42 * ac, 0.5 * bc, 50.0))
    pericardium = _Ellipsoid(heart.c, heart.semi + 6.0)
    # lungs fill the chest above the domes, except the heart with its fat and the strip of
    # posterior mediastinum (aorta, oesophagus) in front of the spine
    y_vb = -b + 0.5 * fat + rng.uniform(70.0, 80.0) * organ   # vertebral body centre
    grid.paint(LUNG, lambda X, Y, Z: (Z > dome(X, Y)) & ~pericardium.inside(X, Y, Z)
               & ~((np.abs(X + 8.0) < 22.0) & (Y < y_vb + 50.0)), *everywhere, into=(FAT_VISC,))
    grid.paint(MUSCLE, lambda X, Y, Z: (Z <= dome(X, Y)) & (Z > dome(X, Y) - 4.0), *everywhere, into=(FAT_VISC,))
    grid.paint(MYOCARDIUM, lambda X, Y, Z: heart.inside(X, Y, Z) & (Z > dome(X, Y)), heart.lo, heart.hi,
               into=(LUNG, FAT_VISC))
    blood_in, lo, hi = _ellipsoid(heart.c, heart.semi - 9.0)
    grid.paint(BLOOD, blood_in, lo, hi, into=(MYOCARDIUM,))

    # --- spine, paraspinal muscles, psoas ----------------------------------------------------
    vb_a, vb_b = 21.0 * organ, 15.0 * organ
    y_canal = y_vb - vb_b - 10.0
    period = rng.uniform(30.0, 36.0)
    disc = rng.uniform(7.0, 10.0)
    phase = rng.uniform(0.0, period)

    def in_vertebra(Z, lo=0.0, hi=None):
        t = np.mod(Z - phase, period)
        return (t >= lo) & (t < (period - disc if hi is None else hi))

    for side in (-1.0, 1.0):
        para, lo, hi = _ellipsoid((side * 32.0 * organ, y_canal - 12.0, 0.0), (29.0 * organ, 17.0 * organ, 1e4))
        grid.paint(MUSCLE, para, lo, hi, into=(FAT_VISC, FAT_SC, LUNG))
        psoas_x = side * (vb_a + 10.0)
        grid.paint(MUSCLE, lambda X, Y, Z, px=psoas_x: (Z < -95.0) & (
            (X - px) ** 2 + (Y - y_vb - 2.0) ** 2 <= np.minimum(22.0 * organ, 4.0 + (-95.0 - Z) * 0.25) ** 2),
            (psoas_x - 25, y_vb - 25, -big), (psoas_x + 25, y_vb + 25, -95.0), into=(FAT_VISC,))
    spine_box = (-60.0, y_canal - 60.0, -big), (60.0, y_vb + vb_b + 2.0, big)
    grid.paint(BONE_CORTEX, lambda X, Y, Z: ((X / vb_a) ** 2 + ((Y - y_vb) / vb_b) ** 2 <= 1.0) & in_vertebra(Z),
               *spine_box)
    grid.paint(BONE_MARROW, lambda X, Y, Z: ((X / (vb_a - 2)) ** 2 + ((Y - y_vb) / (vb_b - 2)) ** 2 <= 1.0)
               & in_vertebra(Z, 1.5, period - disc - 1.5), *spine_box)
    grid.paint(DISC, lambda X, Y, Z: ((X / vb_a) ** 2 + ((Y - y_vb) / vb_b) ** 2 <= 1.0) & ~in_vertebra(Z),
               *spine_box)
    spinous_end = y_canal - rng.uniform(22.0, 30.0) * organ
    grid.paint(BONE_CORTEX, lambda X, Y, Z: in_vertebra(Z, 2.0) & (
        ((np.hypot(X, Y - y_canal) <= 14.0) & (Y <= y_canal + 3.0))              # lamina and pedicles
        | ((np.abs(X) <= 4.0) & (Y <= y_canal) & (Y >= spinous_end))            # spinous process
        | (in_vertebra(Z, 0.25 * period, 0.6 * period) & (np.abs(X) <= 36.0 * organ)
           & (np.abs(Y - y_canal - 6.0) <= 4.0))),                                # transverse processes
        *spine_box)
    grid.paint(CSF, lambda X, Y, Z: np.hypot(X, Y - y_canal) <= 8.5, *spine_box)

    # --- aorta, IVC ----------------------------------------------------------------------------
    r_ao = rng.uniform(10.0, 13.0) * organ
    aorta = [(-25.0, y_vb + 2.0, 60.0), (-20.0, y_vb + vb_b + r_ao, -40.0), (-14.0, y_vb + vb_b + r_ao + 2, -260.0)]
    _paint_path(grid, AORTA, aorta, [r_ao] * 3, into=(FAT_VISC, LUNG, MUSCLE))

    # --- kidneys (painted before the liver: the liver takes their impression) -----------------
    kidney_z = -rng.uniform(95.0, 115.0)
    right_lower = rng.uniform(10.0, 25.0)
    for side, z_c in ((-1.0, kidney_z), (1.0, kidney_z - right_lower)):
        centre = np.array([side * 0.5 * ac, y_vb - 4.0, z_c])
        rot = _rot_z(side * -rng.uniform(25.0, 40.0)) @ _rotation(rng, 10.0)
        semi = np.array([26.0, 21.0, 52.0]) * organ * rng.uniform(0.9, 1.1, size=3)
        grid.paint(KIDNEY_CORTEX, *_ellipsoid(centre, semi, rot), into=(FAT_VISC,))
        grid.paint(KIDNEY_MEDULLA, *_ellipsoid(centre, semi * [0.62, 0.62, 0.75], rot), into=(KIDNEY_CORTEX,))
        medial = centre + rot @ np.array([-side * 0.55 * semi[0], 0.0, 0.0])
        grid.paint(RENAL_SINUS, *_ellipsoid(medial, semi * [0.45, 0.4, 0.5], rot), into=(KIDNEY_CORTEX, KIDNEY_MEDULLA))
        if side < 0:   # left renal vein crosses in front of the aorta into the IVC
            _paint_path(grid, VEIN, [medial, (-5.0, y_vb + vb_b + 2 * r_ao + 4.0, z_c + 5.0), (22.0, y_vb + 26.0, z_c + 8)],
                        [5.0, 4.5, 5.0], into=(FAT_VISC,))

    # --- spleen (crescent), stomach (gas over fluid), under the left dome ---------------------
    spleen_c = np.array([-0.7 * ac, -0.3 * bc, -45.0 - left_drop - rng.uniform(0.0, 15.0)])
    spleen_rot = _rot_z(45.0 + rng.uniform(-10.0, 10.0))   # long axis along the ribs
    spleen_semi = np.array([22.0, 52.0, 45.0]) * organ * rng.uniform(0.85, 1.15, size=3)
    s_in, lo, hi = _ellipsoid(spleen_c, spleen_semi, spleen_rot)
    hollow, _, _ = _ellipsoid(spleen_c + spleen_rot @ [0.9 * spleen_semi[0], 0, 0], spleen_semi * [0.8, 0.85, 0.8], spleen_rot)
    grid.paint(SPLEEN, lambda X, Y, Z: s_in(X, Y, Z) & ~hollow(X, Y, Z) & below_dome(4.0)(X, Y, Z), lo, hi, into=(FAT_VISC,))

    st_c = np.array([-0.38 * ac, 0.12 * bc, -40.0 - left_drop])
    st_rot = _rot_z(rng.uniform(15.0, 40.0))
    st_semi = np.array([40.0, 33.0, 55.0]) * organ * rng.uniform(0.8, 1.2, size=3)
    wall_in, lo, hi = _ellipsoid(st_c, st_semi, st_rot)
    grid.paint(BOWEL_WALL, lambda X, Y, Z: wall_in(X, Y, Z) & below_dome(4.0)(X, Y, Z), lo, hi, into=(FAT_VISC,))
    lumen_in, lo, hi = _ellipsoid(st_c, st_semi - 4.0, st_rot)
    level = st_c[1] + rng.uniform(-0.2, 0.7) * st_semi[1]
    grid.paint(FLUID, lumen_in, lo, hi, into=(BOWEL_WALL,))
    grid.paint(GAS, lambda X, Y, Z: lumen_in(X, Y, Z) & (Y > level), lo, hi, into=(FLUID,))

    # --- liver: smooth union of lobes, lobulated by a smooth field ------------------------------
    lobes = [  # (centre as fractions of the cavity / mm in z, semi-axes mm)
        ((0.42, 0.0, -62.0), (0.5 * ac, 0.78 * bc, 68.0)),          # right lobe
        ((-0.18, 0.42, -38.0), (0.45 * ac, 0.38 * bc, 34.0)),       # left lobe, over the stomach
        ((0.58, 0.05, -118.0), (0.27 * ac, 0.5 * bc, 40.0)),        # inferior tip of the right lobe
        ((0.07, -0.3, -52.0), (0.15 * ac, 0.26 * bc, 34.0)),        # caudate lobe
    ]
    liver_scale = organ * rng.uniform(0.9, 1.1)
    lobe_shapes = [
        _Ellipsoid(np.array([fx * ac, fy * bc, z]) + rng.uniform(-8.0, 8.0, size=3),
                   np.asarray(semi) * liver_scale * rng.uniform(0.88, 1.12, size=3), _rotation(rng, 12.0))
        for (fx, fy, z), semi in lobes
    ]
    waves = _Waves(rng, 8, (50.0, 120.0), 0.12)
    sharpness = 8.0

    def liver_inside(X, Y, Z):
        # smooth maximum of the lobes' (1 - normalised radius), lobulated by a smooth field
        total = 0.0
        for lobe in lobe_shapes:
            total = total + np.exp(sharpness * (1.0 - lobe.radius(X, Y, Z)))
        return (np.log(total) / sharpness + waves(X, Y, Z) > 0.0) & (Z < dome(X, Y) - 4.0)

    lo_all = np.min([lobe.lo for lobe in lobe_shapes], axis=0) - 15.0
    hi_all = np.max([lobe.hi for lobe in lobe_shapes], axis=0) + 15.0
    grid.paint(LIVER, liver_inside, lo_all, hi_all, into=(FAT_VISC,))

    # IVC: behind the liver into the right atrium; carves the liver
    r_ivc = rng.uniform(9.0, 12.0) * organ
    ivc = [(22.0, y_vb + 20.0, -260.0), (24.0, y_vb + 26.0, -100.0), (18.0, y_vb + 34.0, -20.0), (8.0, y_vb + 48.0, 20.0)]
    _paint_path(grid, VEIN, ivc, [r_ivc] * 4, into=(FAT_VISC, LIVER, MUSCLE, LUNG, MYOCARDIUM))

    # portal vein: trunk outside the liver, branches inside (labelled liver)
    hilum = np.array([0.2 * ac, -0.05 * bc, -78.0])
    r_pv = rng.uniform(6.0, 7.5) * organ
    segments = [(np.array([0.03 * ac, y_vb + 42.0, -112.0]), hilum, r_pv)]
    _vessel_tree(rng, hilum, np.array([0.58 * ac, 0.0, -72.0]), 0.8 * r_pv, 2, segments)
    _vessel_tree(rng, hilum, np.array([-0.2 * ac, 0.35 * bc, -55.0]), 0.7 * r_pv, 2, segments)
    for p0, p1, r in segments:
        inside, lo, hi = _capsule(p0, p1, r, 0.85 * r)
        grid.paint(LIVER_PORTAL, inside, lo, hi, into=(LIVER,))
        grid.paint(PORTAL, inside, lo, hi, into=(FAT_VISC,))
    # hepatic veins converge on the IVC at the top of the liver
    junction = np.array([14.0, y_vb + 40.0, -14.0])
    hepatic = []
    for target in ((0.75 * ac, -0.1 * bc, -62.0), (0.25 * ac, 0.5 * bc, -72.0), (-0.32 * ac, 0.4 * bc, -36.0)):
        _vessel_tree(rng, junction, np.asarray(target) + rng.uniform(-8, 8, size=3), 5.5 * organ, 1, hepatic)
    for p0, p1, r in hepatic:
        grid.paint(LIVER_HEPATIC, *_capsule(p0, p1, r, 0.7 * r), into=(LIVER,))

    if rng.uniform() < 0.8:   # gallbladder under the liver (absent after cholecystectomy)
        gb_in, lo, hi = _ellipsoid((0.22 * ac, 0.42 * bc, -100.0), np.array([14.0, 16.0, 32.0]) * organ, _rotation(rng, 25.0))
        grid.paint(BILE, gb_in, lo, hi, into=(LIVER, FAT_VISC, LIVER_PORTAL, LIVER_HEPATIC))

    # --- pancreas, colon, small bowel --------------------------------------------------------------
    pancreas = [(0.14 * ac, y_vb + 30.0, -112.0), (0.0, y_vb + 46.0, -100.0), (-0.25 * ac, y_vb + 40.0, -92.0),
                (-0.5 * ac, y_vb + 12.0, -82.0)]
    _paint_path(grid, PANCREAS, pancreas, np.array([13.0, 10.0, 9.0, 8.0]) * organ, into=(FAT_VISC,))
    colon = [(0.64 * ac, 0.05 * bc, -260.0), (0.62 * ac, 0.1 * bc, -118.0), (0.2 * ac, 0.62 * bc, -124.0),
             (-0.3 * ac, 0.58 * bc, -112.0), (-0.66 * ac, 0.05 * bc, -88.0), (-0.68 * ac, -0.1 * bc, -260.0)]
    colon = [np.asarray(c) + rng.uniform(-6, 6, size=3) for c in colon]
    r_colon = rng.uniform(14.0, 20.0, size=len(colon)) * organ
    _paint_path(grid, BOWEL_WALL, colon, r_colon, into=(FAT_VISC,))
    for n in range(len(colon) - 1):
        content = GAS if rng.uniform() < 0.5 else STOOL
        grid.paint(content, *_capsule(colon[n], colon[n + 1], r_colon[n] - 3.0, r_colon[n + 1] - 3.0), into=(BOWEL_WALL,))
    for _ in range(int(rng.integers(6, 13))):
        centre = (rng.uniform(-0.5, 0.5) * ac, rng.uniform(-0.1, 0.75) * bc, rng.uniform(-260.0, -105.0))
        semi = rng.uniform(9.0, 18.0, size=3) * organ
        rot = _rotation(rng, 90.0)
        grid.paint(BOWEL_WALL, *_ellipsoid(centre, semi, rot), into=(FAT_VISC,))
        grid.paint(GAS if rng.uniform() < 0.25 else FLUID, *_ellipsoid(centre, semi - 2.5, rot), into=(BOWEL_WALL,))

    # --- ribs: bands that descend from the spine towards the front ------------------------------
    # Evaluated only on the pixels of a ring around the body, for every slice at once.
    n_ribs = 8
    rib_gap = rng.uniform(24.0, 30.0)
    rib_top = rng.uniform(25.0, 45.0)
    drop = rng.uniform(55.0, 85.0)
    rho_rib = (rho_fat + rho_cav) / 2.0
    rib_t = rng.uniform(3.0, 4.0)                           # radial half thickness, mm
    rib_h = rng.uniform(4.0, 5.0)                           # half height along z, mm
    jj, ii = np.nonzero(np.abs(rho2 - rho_rib) * r_mean <= rib_t + 10.0)
    radial = np.abs(rho2[jj, ii][None, :] / g[:, None] - rho_rib) * r_mean        # (slices, ring pixels)
    xr, yr = grid.x[ii], grid.y[jj]
    phi = np.arccos(np.clip(-(yr / b) / np.maximum(np.hypot(xr / a, yr / b), 1e-9), -1.0, 1.0))[None, :]  # 0 at the spine
    zz = grid.z[:, None]
    cortex = np.zeros(radial.shape, dtype=bool)
    marrow = np.zeros(radial.shape, dtype=bool)
    for n in range(n_ribs):
        end = 0.88 * np.pi if n < 5 else (0.62 - 0.08 * (n - 5)) * np.pi   # floating ribs end laterally
        dz = np.abs(zz - (rib_top - n * rib_gap - drop * (phi / np.pi) ** 1.2))
        on = (phi > 0.13 * np.pi) & (phi < end)
        cortex |= on & (radial <= rib_t) & (dz <= rib_h)
        marrow |= on & (radial <= rib_t - 1.2) & (dz <= rib_h - 1.2)
    ring = cls[:, jj, ii]
    ok = np.zeros(256, dtype=bool)
    ok[[FAT_SC, MUSCLE, FAT_VISC, LUNG, SKIN]] = True
    cortex &= ok[ring]
    ring[cortex] = BONE_CORTEX
    ring[cortex & marrow] = BONE_MARROW
    ring[cortex & (phi > 0.72 * np.pi)] = CARTILAGE        # costal cartilage in front
    cls[:, jj, ii] = ring

    # --- HU and texture per class (drawn per patient) ----------------------------------------------
    enh = rng.uniform(0.0, 1.0)          # how much contrast agent has reached the vessels
    liver_hu = rng.uniform(54.0, 64.0)
    hu = np.zeros(256, dtype=np.float32)
    tex_f = np.zeros(256, dtype=np.float32)   # fine-grained texture amplitude (HU)
    tex_c = np.zeros(256, dtype=np.float32)   # coarse (≈6 mm) texture amplitude (HU)
    table = {
        AIR: (-1000, 0, 0), SKIN: (rng.uniform(20, 50), 4, 2), FAT_SC: (rng.uniform(-115, -90), 10, 6),
        MUSCLE: (rng.uniform(42, 58), 5, 3), FAT_VISC: (rng.uniform(-110, -80), 14, 8),
        LUNG: (rng.uniform(-880, -820), 45, 20), LIVER: (liver_hu, 3, 4),
        LIVER_PORTAL: (42 + 110 * enh, 4, 0), LIVER_HEPATIC: (40 + 70 * enh, 4, 0),
        SPLEEN: (liver_hu + rng.uniform(-12, 10), 3, 4),
        KIDNEY_CORTEX: (liver_hu + rng.uniform(-8, 8) + 20 * enh, 4, 3),
        KIDNEY_MEDULLA: (liver_hu - rng.uniform(5, 20), 4, 3), RENAL_SINUS: (rng.uniform(-80, -50), 15, 5),
        AORTA: (45 + 150 * enh, 3, 0), VEIN: (42 + 80 * enh, 3, 0), PORTAL: (42 + 110 * enh, 3, 0),
        BONE_CORTEX: (rng.uniform(650, 950), 40, 20), BONE_MARROW: (rng.uniform(170, 260), 25, 15),
        DISC: (rng.uniform(70, 95), 5, 3), CSF: (rng.uniform(5, 15), 3, 0),
        CARTILAGE: (rng.uniform(110, 220), 20, 10), BOWEL_WALL: (rng.uniform(35, 55), 5, 3),
        FLUID: (rng.uniform(5, 30), 4, 3), GAS: (-995, 5, 0), STOOL: (rng.uniform(-60, 20), 35, 60),
        BILE: (rng.uniform(0, 20), 2, 0), MYOCARDIUM: (50 + 30 * enh, 4, 3), BLOOD: (45 + 130 * enh, 3, 0),
        PANCREAS: (rng.uniform(35, 50), 8, 4), TABLE_SHELL: (rng.uniform(150, 300), 0, 0),
        TABLE_FOAM: (rng.uniform(-920, -850), 0, 0),
    }
    for c, (v, f, co) in table.items():
        hu[c], tex_f[c], tex_c[c] = v, f, co
    return hu, tex_f, tex_c


def _place_tumors(grid, factors, rng, count, liver_mask, spacing, diameter_range, hu, tex_f, tex_c, kinds=None) -> int:
    """Paint up to ``count`` non-overlapping tumors inside the liver; return how many fit.

    Centres are drawn from the output-grid liver mask: about a third at the edge (centre
    0.3–0.6 radii inside the surface, so the liver cuts the tumor), the rest inside.
    ``kinds`` (one :func:`_draw_tumor` per tumor, or None for the older hypo/hyper-dense tumors)
    sets each one's HU, rim and texture; such tumors are also kept off the large vessels (at most
    5 % of a tumor may be vessel), as Hu et al. (CVPR 2023) place synthetic tumors.
    """
    if count == 0 or not liver_mask.any():
        return 0
    depth = ndimage.distance_transform_edt(liver_mask, sampling=spacing)   # mm to the liver surface
    xo = grid.x.reshape(-1, factors[2]).mean(axis=1)
    yo = grid.y.reshape(-1, factors[1]).mean(axis=1)
    zo = grid.z.reshape(-1, factors[0]).mean(axis=1)
    steps = np.array([zo[1] - zo[0] if len(zo) > 1 else spacing[0], yo[1] - yo[0], xo[1] - xo[0]])
    d_lo, d_hi = diameter_range
    voxel = max(spacing)
    liver_hu = float(hu[LIVER])
    centres, placed = [], 0
    for n in range(count):
        diameter = math.exp(rng.uniform(math.log(d_lo), math.log(d_hi)))
        edge = rng.uniform() < 0.33
        sign = -1.0 if rng.uniform() < 0.65 else 1.0
        contrast = rng.uniform(14.0, 32.0)
        axes = np.exp(rng.normal(0.0, 0.1, size=3))
        axes /= np.prod(axes) ** (1.0 / 3.0)                  # equal volume to a sphere of this diameter
        rot = _rotation(rng, 180.0)
        kind = None if kinds is None else kinds[n]
        if kind is not None and kind["elongation"] != 0.1:   # cysts: rounder, smoother
            axes = np.exp(np.log(axes) * kind["elongation"] / 0.1)
        waves = _Waves(rng, 5, (diameter, 3.0 * diameter), 0.06 if kind is None else kind["waves"])
        for _attempt in range(30):
            r = diameter / 2.0
            if edge:
                ok = (depth >= 0.3 * r) & (depth <= 0.6 * r + 0.5 * voxel)
            else:
                ok = depth >= 0.9 * r + 0.5 * voxel
            candidates = np.flatnonzero(ok)
            if candidates.size == 0:
                if diameter * 0.85 < d_lo:
                    break
                diameter *= 0.85
                continue
            k, j, i = np.unravel_index(candidates[rng.integers(candidates.size)], liver_mask.shape)
            jitter = rng.uniform(-0.5, 0.5, size=3) * steps
            centre = np.array([xo[i] + jitter[2], yo[j] + jitter[1], zo[k] + jitter[0]])
            if all(np.linalg.norm(centre - c) >= r + rc + 3.0 for c, rc in centres):
                shape = _ellipsoid(centre, r * axes, rot, waves)
                if kind is not None and grid.fraction(*shape, (LIVER_PORTAL, LIVER_HEPATIC, VEIN, PORTAL)) > 0.05:
                    continue
                cls = _TUMOR0 + placed
                grid.paint(cls, *shape, into=_LIVER_TISSUE)
                if kind is None:
                    hu[cls] = liver_hu + sign * contrast
                    tex_f[cls], tex_c[cls] = 5.0, 3.0
                else:
                    hu[cls] = kind["hu"]
                    tex_f[cls], tex_c[cls] = kind["texture"]
                    if kind["rim"] is not None:       # the whole tumor is rim first, then its core inside
                        rim_hu, width = kind["rim"]
                        grid.paint(_RIM0 + placed, *shape, into=(cls,))
                        grid.paint(cls, *_ellipsoid(centre, r * axes * (1.0 - width), rot, waves), into=(_RIM0 + placed,))
                        hu[_RIM0 + placed] = rim_hu
                        tex_f[_RIM0 + placed], tex_c[_RIM0 + placed] = 5.0, 2.0
                centres.append((centre, r))
                placed += 1
                break
    return placed


# ======================================================================================
# DBT breast
# ======================================================================================
def _power_law_field(rng, shape, spacing, beta, f0=0.02) -> np.ndarray:
    """A 3D Gaussian random field whose 2D slices have power spectrum ∝ 1/f^β.

    The 3D spectrum falls as f^-(β+1): integrating it over the slice-normal frequency gives
    f^-β in the slice (projection-slice theorem).  ``f0`` (cycles/mm) flattens the lowest
    frequencies so the field is not dominated by one blob.
    """
    fk = np.fft.fftfreq(shape[0], spacing[0])[:, None, None]
    fj = np.fft.fftfreq(shape[1], spacing[1])[None, :, None]
    fi = np.fft.rfftfreq(shape[2], spacing[2])[None, None, :]
    amplitude = (fk ** 2 + fj ** 2 + fi ** 2 + f0 ** 2) ** (-(beta + 1.0) / 4.0)
    spectrum = np.fft.rfftn(rng.standard_normal(shape)) * amplitude
    field = np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2)).astype(np.float32)
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


def dbt_phantom(seed: int, shape=None, *, masses=None, calcification_clusters=None,
                pixel_mm: float = 0.4, slice_mm: float = 1.0, sweep_deg: float = 7.5, beta: float | None = None):
    """A synthetic Digital Breast Tomosynthesis volume (cranio-caudal view) with lesion boxes.

    Args:
        seed: breast shape, texture, lesions and noise follow from it (each from its own
            stream: changing the number of masses leaves texture, calcifications and noise alone).
        shape: (slices, rows, columns); default :data:`DBT_DEFAULT_SHAPE` (32, 256, 192), about
            0.5 s.  Rows run along the chest wall, columns from the chest wall (column 0)
            towards the nipple, slices from the detector up to the compression paddle.
        masses: number of masses (round or spiculated, 5–20 mm, 0–0.08 denser than
            fibroglandular tissue); None draws 0–2.
        calcification_clusters: number of clusters of 5–20 bright specks (0.15–0.6 mm)
            within 2.5–7 mm; None draws 0–2.
        pixel_mm, slice_mm: in-plane and slice spacing.  The breast fills the field of view,
            so its size in mm scales with ``pixel_mm``; the compressed thickness is the
            slice count times ``slice_mm`` less 1–3 slices.
        sweep_deg: half the tube's angular range (±7.5° by default) for the out-of-plane blur.
        beta: exponent of the texture's power spectrum 1/f^β; None draws 2.8–3.2.

    Returns:
        ``(volume, boxes)``.  ``volume`` holds intensities in [0, 1] (air 0, fat ≈ 0.25,
        fibroglandular ≈ 0.5, calcifications up to 1), directions i → anterior, j → left,
        k → superior.  ``boxes`` has one dict per lesion: ``kind`` ("mass" or
        "calcification_cluster"), ``subtype`` ("round", "spiculated" or "cluster"),
        ``box_kji`` [k0, j0, i0, k1, j1, i1] (voxel indices, half-open, of the lesion before
        the out-of-plane blur), ``center_kji`` (float voxel indices of the lesion centre),
        ``box_ras_mm`` [R0, A0, S0, R1, A1, S1] (the box's outer voxel faces in RAS mm) and
        ``size_mm`` (mass diameter or cluster diameter).
    """
    seed = _check_seed(seed)
    nk, nj, ni = _check_shape(shape, DBT_DEFAULT_SHAPE, (4, 32, 32), "DBT phantom")
    for name, value in (("pixel_mm", pixel_mm), ("slice_mm", slice_mm)):
        if not value > 0:
            raise TransferSegError(f"{name} must be positive; got {value}")
    for name, value in (("masses", masses), ("calcification_clusters", calcification_clusters)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise TransferSegError(f"{name} must be a whole number ≥ 0 or None; got {value!r}")
    p, sk = float(pixel_mm), float(slice_mm)
    rng = _rng(seed, 10)
    # --- the compressed breast -------------------------------------------------------------------
    half_height = nj * p * rng.uniform(0.38, 0.46)        # along the chest wall
    depth = ni * p * rng.uniform(0.62, 0.9)                # chest wall to nipple
    yc = nj * p * rng.uniform(0.46, 0.54)
    thickness = (nk - rng.uniform(1.0, 3.0)) * sk
    zc = (nk - 1) * sk / 2.0 + rng.uniform(-0.3, 0.3) * sk
    rho0 = rng.uniform(0.55, 0.75)                         # where the rounded, uncompressed edge starts
    skin = rng.uniform(1.2, 2.0)
    beta = rng.uniform(2.8, 3.2) if beta is None else float(beta)
    fibroglandular = rng.uniform(0.15, 0.45)
    mu_fat = rng.uniform(0.22, 0.3)
    mu_gland = mu_fat + rng.uniform(0.2, 0.3)
    x = (np.arange(ni) + 0.5) * p                          # mm from the chest wall
    y = np.arange(nj) * p
    z = np.arange(nk)[:, None, None] * sk
    theta = np.arctan2((y[:, None] - yc) / half_height, x[None, :] / depth)
    ripple = 1.0 + sum(rng.uniform(0.0, 0.03) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4))
    rho = np.hypot((y[:, None] - yc) / half_height, x[None, :] / depth) / ripple     # (rows, columns)

    def breast(shrink):
        r = rho * depth / max(depth - shrink, 1e-6)
        edge = np.maximum(r - rho0, 0.0) / (1.0 - rho0)
        return (edge[None] ** 2 + ((z - zc) / (thickness / 2.0 - shrink)) ** 2 <= 1.0) & (r <= 1.0)[None]

    inside = breast(0.0)
    interior = breast(skin)
    field = _power_law_field(rng, (nk, nj, ni), (sk, p, p), beta)
    field += 0.4 * np.clip(1.0 - rho, 0.0, 1.0)[None]      # denser tissue towards the centre
    threshold = np.quantile(field[interior], 1.0 - fibroglandular) if interior.any() else 0.0
    gland = 1.0 / (1.0 + np.exp(-(field - threshold) / 0.15))
    vol = (mu_fat + (mu_gland - mu_fat) * gland).astype(np.float32)
    vol[inside & ~interior] = mu_gland                      # skin
    vol[~inside] = 0.0

    # --- lesions --------------------------------------------------------------------------------
    boxes = []
    mrng = _rng(seed, 11)
    n_masses = int(_rng(seed, 14).choice(3, p=[0.4, 0.4, 0.2])) if masses is None else int(masses)
    interior_kji = np.argwhere(breast(skin + 3.0))
    for _ in range(n_masses):
        boxes.append(_add_mass(vol, mrng, interior_kji, (sk, p, p), mu_gland, depth, thickness))
    crng = _rng(seed, 12)
    n_clusters = int(_rng(seed, 15).choice(3, p=[0.5, 0.35, 0.15])) if calcification_clusters is None \
        else int(calcification_clusters)
    calc = np.zeros_like(vol)
    for _ in range(n_clusters):
        boxes.append(_add_calcification_cluster(calc, crng, interior_kji, (sk, p, p)))
    vol += calc * (1.0 - vol)

    # --- acquisition: limited-angle blur and quantum noise -----------------------------------------
    vol = _tomosynthesis_blur(vol, sk, p, sweep_deg)
    nrng = _rng(seed, 13)
    vol += nrng.uniform(0.012, 0.025) * _unit_noise(nrng, vol.shape, (0.0, 0.6, 0.6))
    np.clip(vol, 0.0, 1.0, out=vol)

    directions = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # columns: i→A, j→L, k→S
    geo = _rng(seed, 16)
    origin = np.array([geo.uniform(60.0, 140.0), geo.uniform(60.0, 110.0), geo.uniform(-60.0, -20.0)])
    volume = Volume(vol, spacing=(sk, p, p), directions=directions, origin=origin)
    for box in boxes:
        k0, j0, i0, k1, j1, i1 = box["box_kji"]
        corners = np.array([[k, j, i] for k in (k0 - 0.5, k1 - 0.5) for j in (j0 - 0.5, j1 - 0.5)
                            for i in (i0 - 0.5, i1 - 0.5)])
        ras = volume.ijk_to_ras_points(corners)
        box["box_ras_mm"] = [round(float(v), 3) for v in np.concatenate([ras.min(axis=0), ras.max(axis=0)])]
    return volume, boxes


def _box_of(mask, offset) -> list:
    nz = np.argwhere(mask)
    lo = nz.min(axis=0) + offset
    hi = nz.max(axis=0) + 1 + offset
    return [int(v) for v in lo] + [int(v) for v in hi]


def _add_mass(vol, rng, interior_kji, spacing, mu_gland, depth, thickness) -> dict:
    """Blend a round or spiculated mass into ``vol``; return its box dict."""
    sk, p, _ = spacing
    spiculated = rng.uniform() < 0.5
    diameter = rng.uniform(5.0, max(5.0, min(20.0, 0.45 * depth, thickness - 4.0)))
    r = diameter / 2.0
    centre_idx = interior_kji[rng.integers(len(interior_kji))].astype(float)
    centre_idx += rng.uniform(-0.5, 0.5, size=3)
    centre_mm = centre_idx * np.array(spacing)
    intensity = mu_gland + rng.uniform(0.0, 0.08)         # as dense as glandular tissue, or a little denser
    axes = np.exp(rng.normal(0.0, 0.12, size=3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    core = _Ellipsoid(centre_mm, (0.6 if spiculated else 1.0) * r * axes, _rotation(rng, 180.0),
                      _Waves(rng, 6, (0.5 * diameter, 2.0 * diameter), 0.18 if spiculated else 0.05))
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
    if not touched.any():
        k, j, i = (int(round(v)) for v in centre_idx)
        touched[k, j, i] = True
    return {
        "kind": "calcification_cluster",
        "subtype": "cluster",
        "box_kji": _box_of(touched, np.zeros(3, dtype=int)),
        "center_kji": [round(float(v), 2) for v in centre_idx],
        "size_mm": round(2.0 * radius, 2),
    }


# ======================================================================================
# ACS proof-of-concept shapes (ACS convolutions paper, Section IV-A)
# ======================================================================================
def _shape_inside(name: str, u: np.ndarray, p: dict) -> np.ndarray:
    """Inside-test in the shape's own frame; ``u[..., 0]`` is its height axis (k in 3D, rows in 2D).

    Cones and pyramids have their apex towards index 0 (the top of the image / volume).
    """
    h = u[..., 0]
    if name in ("circle", "sphere"):
        return (u ** 2).sum(axis=-1) <= p["radius"] ** 2
    if name in ("square", "cube"):
        return np.abs(u).max(axis=-1) <= p["side"] / 2.0
    along = np.clip((h + p["height"] / 2.0) / p["height"], 0.0, 1.0)   # 0 at the apex, 1 at the base
    within = np.abs(h) <= p["height"] / 2.0
    if name == "triangle":
        return within & (np.abs(u[..., 1]) <= along * p["base"] / 2.0)
    if name == "cylinder":
        return within & ((u[..., 1:] ** 2).sum(axis=-1) <= p["radius"] ** 2)
    if name == "cone":
        return within & (np.sqrt((u[..., 1:] ** 2).sum(axis=-1)) <= along * p["radius"])
    if name == "pyramid":
        return within & (np.abs(u[..., 1:]).max(axis=-1) <= along * p["base"] / 2.0)
    raise ValueError(name)


def _shape_params(rng, name: str, scale: float) -> dict:
    if name in ("circle", "sphere"):
        return {"radius": rng.uniform(6.0, 11.0) * scale}
    if name in ("square", "cube"):
        return {"side": rng.uniform(11.0, 19.0) * scale}
    if name == "triangle":
        return {"base": rng.uniform(14.0, 24.0) * scale, "height": rng.uniform(13.0, 22.0) * scale}
    if name == "cylinder":
        return {"radius": rng.uniform(5.5, 9.0) * scale, "height": rng.uniform(12.0, 22.0) * scale}
    if name == "cone":
        return {"radius": rng.uniform(7.0, 11.0) * scale, "height": rng.uniform(14.0, 24.0) * scale}
    return {"base": rng.uniform(14.0, 22.0) * scale, "height": rng.uniform(14.0, 24.0) * scale}   # pyramid


def _bounding_radius(p: dict) -> float:
    if "side" in p:
        return p["side"] * math.sqrt(3) / 2.0
    half_h = p.get("height", 0.0) / 2.0
    across = p.get("radius", p.get("base", 0.0) / math.sqrt(2))
    return math.hypot(half_h, across) if half_h else across


def _shapes(seed: int, n: int, size: int, ndim: int, names: tuple, with_params: bool):
    seed = _check_seed(seed)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise TransferSegError(f"the number of samples must be a whole number ≥ 1; got {n!r}")
    if isinstance(size, bool) or int(size) != size or size < 24:
        raise TransferSegError(f"size must be a whole number ≥ 24; got {size!r}")
    n, size = int(n), int(size)
    rng = _rng(seed, 20 + ndim)
    scale = size / 48.0
    shape = (size,) * ndim
    images = np.empty((n,) + shape, dtype=np.float32)
    labels = np.zeros((n,) + shape, dtype=np.uint8)
    supersample = 5 if ndim == 2 else 3    # odd: a voxel is never exactly half covered, so ≥ 0.5 is unbiased
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    all_params = []
    first_class = int(rng.integers(len(names)))
    for m in range(n):
        # background: smooth blotches plus fine noise; foreground: a modest offset plus its own
        # fine texture, so intensities overlap and only shape and texture separate the classes
        image = 0.5 + 0.12 * _unit_noise(rng, shape, 3.0 * scale) + 0.1 * _unit_noise(rng, shape, 0.7)
        sample_params = []
        count = int(rng.integers(1, 4))
        for s in range(count):
            # the first shapes of consecutive samples cycle through the classes: every class appears
            label = (first_class + m) % len(names) + 1 if s == 0 else int(rng.integers(1, len(names) + 1))
            name = names[label - 1]
            p = _shape_params(rng, name, scale)
            reach = _bounding_radius(p)
            rot = _rotation(rng, 15.0) if ndim == 3 else None
            angle = rng.uniform(-15.0, 15.0)
            for _attempt in range(20):
                centre = rng.uniform(reach + 1.0, size - 1.0 - reach, size=ndim) if size - 2 > 2 * reach + 2 \
                    else np.full(ndim, (size - 1) / 2.0)
                if all(np.linalg.norm(centre - np.asarray(q["center"])) > reach + q["reach"] + 2.0 for q in sample_params):
                    break
            else:
                continue
            lo = np.maximum(np.floor(centre - reach - 1).astype(int), 0)
            hi = np.minimum(np.ceil(centre + reach + 2).astype(int), size)
            axes = [np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)]
            grids = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) - centre       # (..., ndim)
            if ndim == 2:
                c, s_ = math.cos(math.radians(angle)), math.sin(math.radians(angle))
                rot = np.array([[c, -s_], [s_, c]])
            coverage = np.zeros(grids.shape[:-1], dtype=np.float32)
            for sub in np.stack(np.meshgrid(*([offsets] * ndim), indexing="ij"), axis=-1).reshape(-1, ndim):
                coverage += _shape_inside(name, (grids + sub) @ rot, p)
            coverage /= supersample ** ndim
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            fine = 0.1 * rng.standard_normal(coverage.shape).astype(np.float32)
            image[box] += coverage * (rng.uniform(0.18, 0.28) + fine)
            mask = coverage >= 0.5
            labels[m][box][mask] = label
            sample_params.append({"label": label, "name": name, "center": [round(float(v), 3) for v in centre],
                                  "rotation": np.round(rot, 6).tolist(), "reach": reach,
                                  **{k: round(float(v), 3) for k, v in p.items()}})
        images[m] = image
        for q in sample_params:
            q.pop("reach")
        all_params.append(sample_params)
    if with_params:
        return images, labels, all_params
    return images, labels


def shapes_2d(seed: int, n: int, size: int = 48, *, with_params: bool = False):
    """2D proof-of-concept images: circles, squares and triangles on textured backgrounds.

    Each image holds 1–3 non-overlapping shapes (sizes scale with ``size``/48, rotated by at
    most ±15°); the first shapes of consecutive images cycle through the classes, so every
    class appears once ``n`` ≥ 3.  Foreground = background + 0.18–0.28 + its own fine texture: a threshold
    cannot segment it.

    Returns ``(images (n, size, size) float32, labels (n, size, size) uint8)`` with labels
    0 background and 1…3 = :data:`SHAPES_2D` (circle, square, triangle); with
    ``with_params=True`` also a list per image of dicts (label, name, center (row, column),
    rotation, radius / side / base and height in pixels).
    """
    return _shapes(seed, n, size, 2, SHAPES_2D, with_params)


def shapes_3d(seed: int, n: int, size: int = 48, *, with_params: bool = False):
    """3D proof-of-concept volumes: spheres, cubes, cylinders, cones and pyramids.

    As :func:`shapes_2d` in 3D: 1–3 shapes per volume, rotated by at most 15° from upright (so
    that their axial, coronal and sagittal views are the 2D classes), cones and pyramids with
    the apex towards k = 0.  Labels 1…5 = :data:`SHAPES_3D`.  Returns ``(volumes (n, size,
    size, size) float32, labels uint8)`` and, with ``with_params=True``, the shape parameters
    (center (k, j, i), rotation, radius / side / base and height in voxels).
    """
    return _shapes(seed, n, size, 3, SHAPES_3D, with_params)


# ======================================================================================
# Writing a set of cases (the `transferseg phantom` command)
# ======================================================================================
PHANTOM_KINDS = ("ct", "dbt", "shapes")
_GALLERY_ROWS = 12


def write_phantoms(kind: str, out_dir, seed: int, count: int = 1, progress=None) -> list:
    """Write ``count`` phantom cases of ``kind`` ("ct", "dbt" or "shapes") and a gallery.png.

    Case ``n`` uses seed ``seed + n``, so any case can be regenerated on its own.

    * ct: ``ct_NNN.nii.gz`` (HU) and ``ct_NNN_label.nii.gz`` (0 background, 1 liver, 2 tumor);
    * dbt: ``dbt_NNN.nii.gz`` and ``dbt_NNN_boxes.json`` (``{"volume", "seed", "lesions": [...]}``
      with the boxes of :func:`dbt_phantom`);
    * shapes: ``shapes3d_NNN.nii.gz`` / ``shapes3d_NNN_label.nii.gz`` (one 48³ volume each) and
      one stack of 16 × ``count`` 2D images, ``shapes2d.nii.gz`` / ``shapes2d_label.nii.gz``
      (image m is slice k = m), plus ``shapes_classes.json`` naming the label values.
      Shapes are stored with 1 mm spacing and LPS directions, so that the axial view shows
      the array as stored.

    ``gallery.png`` shows three orthogonal slices of each case (the first 12) with its labels
    or boxes.  The files are written all together or not at all
    (:func:`~TransferSegLib.atomic.atomic_output_folder`: an interrupted run leaves ``out_dir`` as
    it was).  ``progress(fraction, stage)`` is called after each case.  Returns the written paths.
    """
    from .atomic import atomic_output_folder

    if kind not in PHANTOM_KINDS:
        raise TransferSegError(f"unknown phantom kind {kind!r}; choose one of {', '.join(PHANTOM_KINDS)}")
    seed = _check_seed(seed)
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise TransferSegError(f"count must be a whole number ≥ 1; got {count!r}")
    count = int(count)
    with atomic_output_folder(out_dir, _phantom_names(kind, count)) as staging:
        written = _write_phantom_files(kind, staging, seed, count, progress)
    return [Path(out_dir) / path.relative_to(staging) for path in written]


def _phantom_names(kind: str, count: int) -> list:
    """The files :func:`write_phantoms` writes, in its order."""
    per_case = {"ct": ("ct_{:03d}.nii.gz", "ct_{:03d}_label.nii.gz"),
                "dbt": ("dbt_{:03d}.nii.gz", "dbt_{:03d}_boxes.json"),
                "shapes": ("shapes3d_{:03d}.nii.gz", "shapes3d_{:03d}_label.nii.gz")}[kind]
    names = [pattern.format(n) for n in range(count) for pattern in per_case]
    if kind == "shapes":
        names += ["shapes2d.nii.gz", "shapes2d_label.nii.gz", "shapes_classes.json"]
    return names + ["gallery.png"]


def _write_phantom_files(kind: str, out: Path, seed: int, count: int, progress) -> list:
    from .atomic import atomic_output
    from .io import save_labelmap, save_volume
    from .render import save_gallery_png  # render imports this module

    written, cases = [], []

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done / (count + 1), stage)

    def write_json(path: Path, data) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        written.append(path)

    for n in range(count):
        case_seed = seed + n
        if kind == "ct":
            volume, labels = ct_phantom(case_seed)
            written.append(save_volume(volume, out / f"ct_{n:03d}.nii.gz"))
            written.append(save_labelmap(labels, volume, out / f"ct_{n:03d}_label.nii.gz"))
            cases.append({"volume": volume, "labels": labels, "title": f"ct_{n:03d} (seed {case_seed})",
                          "label_names": CT_LABEL_NAMES})
        elif kind == "dbt":
            volume, boxes = dbt_phantom(case_seed)
            name = f"dbt_{n:03d}.nii.gz"
            written.append(save_volume(volume, out / name))
            write_json(out / f"dbt_{n:03d}_boxes.json", {"volume": name, "seed": case_seed, "lesions": boxes})
            cases.append({"volume": volume, "boxes": boxes, "title": f"dbt_{n:03d} (seed {case_seed})"})
        else:
            images, labels = shapes_3d(case_seed, 1)
            volume = Volume(images[0], spacing=(1.0, 1.0, 1.0), directions=np.diag([-1.0, -1.0, 1.0]))
            written.append(save_volume(volume, out / f"shapes3d_{n:03d}.nii.gz"))
            written.append(save_labelmap(labels[0], volume, out / f"shapes3d_{n:03d}_label.nii.gz"))
            cases.append({"volume": volume, "labels": labels[0], "title": f"shapes3d_{n:03d} (seed {case_seed})",
                          "label_names": dict(enumerate(SHAPES_3D, start=1))})
        report(n + 1, f"{kind} case {n + 1}/{count}")

    if kind == "shapes":
        images, labels = shapes_2d(seed, 16 * count)
        stack = Volume(images, spacing=(1.0, 1.0, 1.0), directions=np.diag([-1.0, -1.0, 1.0]))
        written.append(save_volume(stack, out / "shapes2d.nii.gz"))
        written.append(save_labelmap(labels, stack, out / "shapes2d_label.nii.gz"))
        write_json(out / "shapes_classes.json", {
            "shapes2d": {str(v): name for v, name in enumerate(SHAPES_2D, start=1)},
            "shapes3d": {str(v): name for v, name in enumerate(SHAPES_3D, start=1)},
        })
    gallery = out / "gallery.png"
    save_gallery_png(cases[:_GALLERY_ROWS], gallery)
    written.append(gallery)
    report(count + 1, "gallery")
    return written
