"""Shapes painted onto a fine grid of tissue classes: ellipsoids, smooth random fields, tubes, vessel trees."""
from __future__ import annotations

import numpy as np

from .common import random_rotation
from .tissues import AIR


class FineGrid:
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


class Ellipsoid:
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


def ellipsoid(center, semi, rot=None, waves=None):
    """``(inside, lo, hi)`` of an :class:`Ellipsoid`, the arguments :meth:`FineGrid.paint` takes."""
    e = Ellipsoid(center, semi, rot, waves)
    return e.inside, e.lo, e.hi


class Waves:
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


def capsule(p0, p1, r0, r1=None):
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


def paint_path(grid, cls, points, radii, into):
    for n in range(len(points) - 1):
        grid.paint(cls, *capsule(points[n], points[n + 1], radii[n], radii[n + 1]), into=into)


def vessel_tree(rng, start, end, radius, depth, out):
    """Segments of a branching tree: each branch splits in two, shorter and thinner."""
    out.append((np.asarray(start, float), np.asarray(end, float), radius))
    if depth == 0:
        return
    direction = np.asarray(end, float) - np.asarray(start, float)
    length = np.linalg.norm(direction)
    for _ in range(2):
        new_dir = random_rotation(rng, 40.0) @ (direction / length)
        child_end = end + new_dir * length * rng.uniform(0.55, 0.8)
        vessel_tree(rng, end, child_end, radius * 0.7, depth - 1, out)
