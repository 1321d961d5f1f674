"""The ACS convolutions paper's proof-of-concept shapes (Section IV-A): :func:`shapes_2d`, :func:`shapes_3d`."""
from __future__ import annotations

import math

import numpy as np

from ..volume import TransferSegError
from .common import check_seed, random_rotation, stream, unit_noise

SHAPES_2D = ("circle", "square", "triangle")
SHAPES_3D = ("sphere", "cube", "cylinder", "cone", "pyramid")


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
    seed = check_seed(seed)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise TransferSegError(f"the number of samples must be a whole number ≥ 1; got {n!r}")
    if isinstance(size, bool) or int(size) != size or size < 24:
        raise TransferSegError(f"size must be a whole number ≥ 24; got {size!r}")
    n, size = int(n), int(size)
    rng = stream(seed, 20 + ndim)
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
        image = 0.5 + 0.12 * unit_noise(rng, shape, 3.0 * scale) + 0.1 * unit_noise(rng, shape, 0.7)
        sample_params = []
        count = int(rng.integers(1, 4))
        for s in range(count):
            # the first shapes of consecutive samples cycle through the classes: every class appears
            label = (first_class + m) % len(names) + 1 if s == 0 else int(rng.integers(1, len(names) + 1))
            name = names[label - 1]
            p = _shape_params(rng, name, scale)
            reach = _bounding_radius(p)
            rot = random_rotation(rng, 15.0) if ndim == 3 else None
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
