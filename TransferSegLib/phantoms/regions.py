"""CT phantoms of body regions without a liver: the head, the neck and the thighs (:func:`region_phantom`).

They exist so that a liver model can be shown scans that are not its own: each one is a CT in
HU with the geometry of :func:`~TransferSegLib.phantoms.ct_phantom` (LPS axial, non-zero origin)
and an all-zero label map.  The anatomy is coarse but has what a network could mistake for a
liver or a tumor: brain and muscle at liver-like HU, enhancing vessels, fatty marrow, the table.
"""
from __future__ import annotations

import numpy as np

from ..volume import TransferSegError, Volume
from .common import check_seed, check_shape, stream, unit_noise
from .geometry import FineGrid, capsule, ellipsoid
from .tissues import (AIR, AORTA, BONE_CORTEX, BONE_MARROW, CSF, FAT_SC, FAT_VISC, GAS, GREY_MATTER, MUSCLE, SKIN,
                      TABLE_FOAM, TABLE_SHELL, THYROID, TRACHEA, VEIN, WHITE_MATTER)

#: region -> (field of view mm, z coverage mm) ranges
CT_REGIONS = {
    "head": ((220.0, 260.0), (120.0, 170.0)),
    "neck": ((220.0, 300.0), (90.0, 140.0)),
    "legs": ((400.0, 500.0), (200.0, 350.0)),
}


def region_phantom(seed: int, region: str, shape=(40, 96, 96)):
    """A CT of ``region`` ("head", "neck" or "legs"): ``(volume, labels)``, the labels all 0.

    ``shape`` (slices, rows, columns) sets the resolution; the field of view and coverage are drawn
    from :data:`CT_REGIONS`, so ``(100, 512, 512)`` gives a clinical grid.  Noise 8–20 HU.
    """
    seed = check_seed(seed)
    if region not in CT_REGIONS:
        raise TransferSegError(f"region must be one of {', '.join(CT_REGIONS)}; got {region!r}")
    nk, nj, ni = check_shape(shape, (40, 96, 96), (1, 32, 32), "region phantom")
    rng = stream(seed, 0)
    (fov_lo, fov_hi), (cov_lo, cov_hi) = CT_REGIONS[region]
    s_ip = rng.uniform(fov_lo, fov_hi) / ni
    s_k = float(np.clip(rng.uniform(cov_lo, cov_hi) / nk, 0.6, 5.0))
    x = (np.arange(ni) - (ni - 1) / 2.0) * -s_ip          # patient's right is +x, i runs to the left
    y = (np.arange(nj) - (nj - 1) / 2.0) * -s_ip + 20.0   # anterior +y, j runs posterior
    z = (np.arange(nk) - (nk - 1) / 2.0) * s_k            # superior +z
    grid = FineGrid(x.astype(np.float32), y.astype(np.float32), z.astype(np.float32))
    hu = _PAINTERS[region](grid, rng)
    _paint_table(grid, rng, float(grid.y[np.flatnonzero((grid.cls != AIR).any(axis=(0, 2)))[-1]]))
    hu.update({AIR: -1000.0, TABLE_SHELL: rng.uniform(150, 300), TABLE_FOAM: rng.uniform(-920, -850)})
    table = np.zeros(256, np.float32)
    for tissue, value in hu.items():
        table[tissue] = value
    nrng = stream(seed, 2)
    texture = rng.uniform(3.0, 6.0) * unit_noise(nrng, grid.cls.shape, (0.4, 1.5, 1.5))
    array = table[grid.cls] + texture * (grid.cls != AIR)
    array += nrng.uniform(8.0, 20.0) * unit_noise(nrng, grid.cls.shape, (0.0, 0.8, 0.8))
    array = np.clip(np.round(array), -1024, 3071).astype(np.float32)
    # RAS origin of voxel (0, 0, 0): x and y as painted, z where a scanner's table might put it
    z_offset = {"head": 1300.0, "neck": 1150.0, "legs": 300.0}[region]
    volume = Volume(array, spacing=(s_k, s_ip, s_ip), directions=np.diag([-1.0, -1.0, 1.0]),
                    origin=(float(x[0]), float(y[0]), float(z[0]) + z_offset))
    return volume, np.zeros(array.shape, np.uint8)


def _paint_table(grid, rng, y_back: float) -> None:
    y_top = y_back - rng.uniform(0.0, 3.0)
    half = min(0.47 * float(np.ptp(grid.x)), 230.0)
    big = 1e4

    def slab(lo_off, hi_off):
        return lambda X, Y, Z: (np.abs(X) <= half) & (Y <= y_top - lo_off) & (Y >= y_top - hi_off)

    box = (-half, y_top - 60, -big), (half, y_top + 5, big)
    grid.paint(TABLE_SHELL, slab(0.0, 40.0), *box, into=(AIR,))
    grid.paint(TABLE_FOAM, slab(3.0, 37.0), *box, into=(TABLE_SHELL,))


def _paint_head(grid, rng) -> dict:
    """Scalp, skull (cortex around diploe), grey and white matter, ventricles; the vertex at the top."""
    semi = np.array([rng.uniform(68, 78), rng.uniform(88, 100), rng.uniform(80, 95)])   # x (LR), y (AP), z
    centre = np.array([0.0, 10.0, float(grid.z.min()) + semi[2] * rng.uniform(0.55, 0.8)])
    for cls, shrink in ((SKIN, 0.0), (FAT_SC, 2.0), (BONE_CORTEX, 6.0), (BONE_MARROW, 8.0), (BONE_CORTEX, 10.5),
                        (CSF, 12.5), (GREY_MATTER, 14.0), (WHITE_MATTER, 18.0)):
        grid.paint(cls, *ellipsoid(centre, semi - shrink))
    for side in (-1.0, 1.0):   # lateral ventricles
        grid.paint(CSF, *ellipsoid(centre + [side * 9.0, 5.0, 5.0], [6.0, 28.0, 12.0]), into=(WHITE_MATTER,))
    return {SKIN: rng.uniform(20, 50), FAT_SC: rng.uniform(-110, -80), BONE_CORTEX: rng.uniform(1000, 1600),
            BONE_MARROW: rng.uniform(400, 700), CSF: rng.uniform(2, 12), GREY_MATTER: rng.uniform(35, 45),
            WHITE_MATTER: rng.uniform(24, 32)}


def _paint_neck(grid, rng) -> dict:
    """Skin, fat and muscle around the cervical spine, trachea, oesophagus, thyroid, carotids and jugulars."""
    big = 1e4
    a, b = rng.uniform(55, 70), rng.uniform(50, 62)
    grid.paint(SKIN, lambda X, Y, Z: (X / a) ** 2 + ((Y - 5) / b) ** 2 <= 1, (-a, 5 - b, -big), (a, 5 + b, big))
    grid.paint(FAT_SC, lambda X, Y, Z: (X / (a - 2)) ** 2 + ((Y - 5) / (b - 2)) ** 2 <= 1, (-a, 5 - b, -big),
               (a, 5 + b, big))
    grid.paint(MUSCLE, lambda X, Y, Z: (X / (a - 9)) ** 2 + ((Y - 5) / (b - 9)) ** 2 <= 1, (-a, 5 - b, -big),
               (a, 5 + b, big))
    y_vb = 5 - 0.25 * b
    grid.paint(BONE_CORTEX, *capsule((0, y_vb, -big), (0, y_vb, big), 9.0))
    grid.paint(BONE_MARROW, *capsule((0, y_vb, -big), (0, y_vb, big), 7.0))
    grid.paint(CSF, *capsule((0, y_vb - 16, -big), (0, y_vb - 16, big), 6.0))
    grid.paint(BONE_CORTEX, *capsule((0, y_vb - 23, -big), (0, y_vb - 23, big), 3.5))
    y_tr = 5 + 0.45 * b
    grid.paint(TRACHEA, *capsule((0, y_tr, -big), (0, y_tr, big), rng.uniform(7, 10)))
    grid.paint(FAT_VISC, *capsule((0, y_tr - 14, -big), (0, y_tr - 14, big), 5.0))
    grid.paint(GAS, *capsule((0, y_tr - 14, -big), (0, y_tr - 14, big), 2.0))
    for side in (-1.0, 1.0):
        grid.paint(THYROID, *ellipsoid((side * 16, y_tr - 2, 0.0), (9.0, 9.0, 22.0)), into=(MUSCLE,))
        grid.paint(AORTA, *capsule((side * 25, y_tr - 10, -big), (side * 25, y_tr - 10, big), 3.5))
        grid.paint(VEIN, *capsule((side * 33, y_tr - 8, -big), (side * 33, y_tr - 8, big), rng.uniform(4, 7)))
    enhanced = rng.uniform() < 0.6
    return {SKIN: rng.uniform(20, 50), FAT_SC: rng.uniform(-110, -80), MUSCLE: rng.uniform(45, 60),
            BONE_CORTEX: rng.uniform(600, 900), BONE_MARROW: rng.uniform(200, 300), CSF: rng.uniform(5, 15),
            TRACHEA: -990.0, GAS: -990.0, FAT_VISC: rng.uniform(-100, -70),
            THYROID: rng.uniform(100, 140) if enhanced else rng.uniform(80, 100),
            AORTA: rng.uniform(250, 400) if enhanced else 45.0, VEIN: rng.uniform(120, 200) if enhanced else 40.0}


def _paint_legs(grid, rng) -> dict:
    """Two thighs: skin, fat, muscle, the femur (cortex around fatty marrow), the femoral vessels."""
    big = 1e4
    gap = rng.uniform(10.0, 40.0)
    for side in (-1.0, 1.0):
        r = rng.uniform(65.0, 90.0)
        cx = side * (r + gap / 2.0)
        fat = rng.uniform(8.0, 25.0)
        grid.paint(SKIN, *capsule((cx, 0, -big), (cx, 0, big), r))
        grid.paint(FAT_SC, *capsule((cx, 0, -big), (cx, 0, big), r - 2.0))
        grid.paint(MUSCLE, *capsule((cx, 0, -big), (cx, 0, big), r - 2.0 - fat))
        fx = cx + side * 0.1 * r
        grid.paint(BONE_CORTEX, *capsule((fx, -0.05 * r, -big), (fx, -0.05 * r, big), 13.0))
        grid.paint(BONE_MARROW, *capsule((fx, -0.05 * r, -big), (fx, -0.05 * r, big), 8.0))
        grid.paint(AORTA, *capsule((cx - side * 0.3 * r, 0.35 * r, -big), (cx - side * 0.3 * r, 0.35 * r, big), 4.0))
        grid.paint(VEIN, *capsule((cx - side * 0.22 * r, 0.38 * r, -big), (cx - side * 0.22 * r, 0.38 * r, big), 5.0))
    enhanced = rng.uniform() < 0.5
    return {SKIN: rng.uniform(20, 50), FAT_SC: rng.uniform(-115, -90), MUSCLE: rng.uniform(45, 60),
            BONE_CORTEX: rng.uniform(1000, 1500), BONE_MARROW: rng.uniform(-80, 20),
            AORTA: rng.uniform(150, 300) if enhanced else 45.0, VEIN: rng.uniform(100, 180) if enhanced else 40.0}


_PAINTERS = {"head": _paint_head, "neck": _paint_neck, "legs": _paint_legs}
