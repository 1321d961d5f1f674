"""What every phantom generator shares: seeded random streams, argument checks, rotations, noise."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..volume import TransferSegError


def stream(seed: int, stream: int) -> np.random.Generator:
    """An independent stream per purpose, so e.g. adding a tumor does not move the noise."""
    return np.random.default_rng([int(seed), stream])


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TransferSegError(f"seed must be a non-negative whole number; got {seed!r}")
    return int(seed)


def check_shape(shape, default, minimum, what) -> tuple:
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


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation by at most ``max_deg`` degrees about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def unit_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def block_mean(fine: np.ndarray, factors) -> np.ndarray:
    """Average non-overlapping blocks: the partial-volume effect of a coarse voxel."""
    out = fine.astype(np.float32, copy=False)
    for axis, f in enumerate(factors):
        if f > 1:
            shape = out.shape
            out = out.reshape(shape[:axis] + (shape[axis] // f, f) + shape[axis + 1:]).sum(axis=axis + 1)
    return out / np.float32(np.prod(factors))
