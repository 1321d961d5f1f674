"""CT phantoms of body regions without a liver: the head, the neck, the pelvis and the thighs (:func:`region_phantom`).

They exist so that a liver model can be shown scans that are not its own: each one is a CT in
HU with the geometry of :func:`~TransferSegLib.phantoms.ct_phantom` (LPS axial, non-zero origin)
and an all-zero label map.  The anatomy is coarse but has what a network could mistake for a
liver or a tumor: brain and muscle at liver-like HU, enhancing vessels, fatty marrow, a bladder
of urine near water, bowel with gas, fluid and stool, the table.  (The chest above the diaphragm
is ``ct_phantom(..., coverage="chest")``.)
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..volume import TransferSegError, Volume
from .common import check_seed, check_shape, random_rotation, stream, unit_noise
from .geometry import FineGrid, capsule, ellipsoid, paint_path
from .tissues import (AIR, AORTA, BONE_CORTEX, BONE_MARROW, BOWEL_WALL, CSF, DISC, FAT_SC, FAT_VISC, FLUID, GAS,
                      GREY_MATTER, MUSCLE, SKIN, STOOL, TABLE_FOAM, TABLE_SHELL, THYROID, TRACHEA, URINE, VEIN,
                      WHITE_MATTER)

#: region -> (field of view mm, z coverage mm) ranges
CT_REGIONS = {
    "head": ((220.0, 260.0), (120.0, 170.0)),
    "neck": ((220.0, 300.0), (90.0, 140.0)),
    "pelvis": ((340.0, 480.0), (120.0, 200.0)),
    "legs": ((400.0, 500.0), (200.0, 350.0)),
}


def region_phantom(seed: int, region: str, shape=(40, 96, 96)):
    """A CT of ``region`` ("head", "neck", "pelvis" or "legs"): ``(volume, labels)``, the labels all 0.

    The pelvis reaches from the iliac wings (sometimes the crests and L5) to below the femoral heads:
    the hip bones, sacrum and femoral heads and necks (cortex around cancellous bone), gluteal,
    iliopsoas and obturator muscle, the bladder (urine 0–20 HU), rectum, sigmoid, caecum and small
    bowel (gas, fluid, stool), a prostate or uterus, the iliac arteries and veins (enhanced in 60 %).

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
    z_offset = {"head": 1300.0, "neck": 1150.0, "pelvis": 600.0, "legs": 300.0}[region]
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


def _paint_pelvis(grid, rng) -> dict:
    """From the iliac crests to below the hips: skin and fat around muscle (gluteal, iliopsoas, obturator),
    the pelvic cavity's fat, the bones, the bladder, rectum, sigmoid and small bowel, the iliac vessels."""
    size = rng.uniform(0.85, 1.2)
    k = size ** 0.5                                                            # the skeleton's scale
    hx = rng.uniform(80.0, 92.0) * k                                           # the hip joints at x = ±hx
    fat = rng.uniform(10.0, 30.0) * size ** 2
    # half width (the hips are 7 % wider): room for the trochanters (hx + 55k) under the fat, inside the field
    a = min(max(rng.uniform(150.0, 175.0) * size, (hx + 55.0 * k + fat + 12.0) / 1.07), 0.46 * float(np.ptp(grid.x)))
    fat = min(fat, max(5.0, 1.07 * a - hx - 55.0 * k - 12.0))
    b = a * rng.uniform(0.62, 0.74)                                            # half depth
    wall = rng.uniform(10.0, 16.0)                                             # muscle of the abdominal wall
    z0 = float(grid.z.min()) + rng.uniform(0.2, 0.45) * float(np.ptp(grid.z))  # the femoral heads' centres
    r_mean = (a + b) / 2.0

    def outline(X, Y, Z):   # 1 on the skin; rounder in front, flatter behind, widest at the trochanters
        p = np.where(Y > 0, 2.0, 2.5)
        hips = 1.0 + 0.07 * np.exp(-((Z - z0 + 15.0) / 50.0) ** 2)
        return ((np.abs(X) / a) ** p + (np.abs(Y) / b) ** p) ** (1.0 / p) / hips

    big = 1e4
    for cls, level in ((SKIN, 1.0), (FAT_SC, 1.0 - 2.0 / r_mean), (MUSCLE, 1.0 - (2.0 + fat) / r_mean)):
        grid.paint(cls, lambda X, Y, Z, lv=level: outline(X, Y, Z) <= lv, (-big, -big, -big), (big, big, big))
    pelvis = _pelvic_frame(rng, a, b, fat, k, hx, z0)
    pelvis.inner = lambda X, Y, Z: outline(X, Y, Z) <= 1.0 - (2.0 + fat + wall) / r_mean
    _paint_pelvic_cavity(grid, pelvis)
    _paint_pelvic_bones(grid, pelvis)
    _paint_pelvic_organs(grid, rng, pelvis)
    _paint_iliac_vessels(grid, rng, pelvis)
    enhanced = rng.uniform() < 0.6
    return {SKIN: rng.uniform(20, 50), FAT_SC: rng.uniform(-115, -90), MUSCLE: rng.uniform(45, 60),
            FAT_VISC: rng.uniform(-110, -80), BONE_CORTEX: rng.uniform(700, 1200), BONE_MARROW: rng.uniform(150, 300),
            DISC: rng.uniform(70, 95), CSF: rng.uniform(5, 15), BOWEL_WALL: rng.uniform(35, 55),
            FLUID: rng.uniform(5, 30), GAS: -995.0, STOOL: rng.uniform(-60, 20), URINE: rng.uniform(0, 20),
            AORTA: rng.uniform(150, 300) if enhanced else 45.0, VEIN: rng.uniform(100, 180) if enhanced else 40.0}


def _pelvic_frame(rng, a, b, fat, k, hx, z0) -> SimpleNamespace:
    """Where the bones lie: the hip joints (x ±hx, y yh, z z0), the iliac crests (z0 + crest) and the sacrum,
    whose centre y, half width and half depth are functions of z (from the coccyx up to the promontory)."""
    crest = rng.uniform(125.0, 150.0) * k
    z_lo, z_hi = z0 - 25.0, z0 + crest - 25.0

    def s(Z):   # 0 at the coccyx's tip, 1 at the sacral promontory
        return np.clip((Z - z_lo) / (z_hi - z_lo), 0.0, 1.0)

    def half_d(Z):
        return 9.0 + 9.0 * s(Z)

    def centre_y(Z):
        return -b + fat + 24.0 + half_d(Z) + 15.0 * s(Z)

    return SimpleNamespace(a=a, b=b, k=k, hx=hx, z0=z0, yh=rng.uniform(-5.0, 10.0), crest=crest,
                           sacrum_z=(z_lo, z_hi), sacrum_w=lambda Z: 14.0 + 40.0 * s(Z), sacrum_d=half_d,
                           sacrum_y=centre_y, sacrum_front=lambda Z: centre_y(Z) + half_d(Z))


def _paint_pelvic_cavity(grid, pelvis) -> None:
    """The fat of the pelvic cavity: between the iliac wings above the hips, between the obturator muscles
    (the muscle left at the side walls) below, from the sacrum to the abdominal wall or the pubis."""
    a, b, hx, yh, z0 = pelvis.a, pelvis.b, pelvis.hx, pelvis.yh, pelvis.z0
    knots = np.array([-60.0, -30.0, 10.0, 40.0, 80.0]) + z0
    half_width = [20.0, 32.0, hx - 36.0, hx - 22.0, 0.62 * a]
    front = [yh + 25.0, yh + 40.0, yh + 48.0, b, b]     # behind the pubis low down, the abdominal wall above

    def inside(X, Y, Z):   # a rounded box (superellipse) from the sacrum to the front, inside the walls
        back, ahead = pelvis.sacrum_front(Z) + 4.0, np.interp(Z, knots, front)
        u = X / np.interp(Z, knots, half_width)
        v = (2.0 * Y - back - ahead) / np.maximum(ahead - back, 1.0)
        return pelvis.inner(X, Y, Z) & (np.abs(u) ** 3 + np.abs(v) ** 3 <= 1.0)

    big = 1e4
    grid.paint(FAT_VISC, inside, (-big, -big, z0 - 60.0), (big, big, big), into=(MUSCLE,))


def _paint_pelvic_bones(grid, pelvis) -> None:
    """The sacrum (and L5 above it), the iliac wings, the acetabula, pubis and ischia, the femoral heads and
    necks: cortex around cancellous bone."""
    hx, yh, z0, k = pelvis.hx, pelvis.yh, pelvis.z0, pelvis.k
    z_lo, z_hi = pelvis.sacrum_z
    big = 1e4

    def sacrum(shrink):
        return lambda X, Y, Z: ((X / (pelvis.sacrum_w(Z) - shrink)) ** 2
                                + ((Y - pelvis.sacrum_y(Z)) / (pelvis.sacrum_d(Z) - shrink)) ** 2 <= 1.0)

    box = (-60.0, -big, z_lo), (60.0, big, z_hi)
    grid.paint(BONE_CORTEX, sacrum(0.0), *box)
    grid.paint(BONE_MARROW, sacrum(2.5), *box)
    y5 = float(pelvis.sacrum_y(z_hi)) + 6.0                                    # L5 above the promontory
    grid.paint(DISC, *ellipsoid((0.0, y5, z_hi + 5.0), (24.0, 17.0, 5.0)))
    grid.paint(BONE_CORTEX, *capsule((0.0, y5, z_hi + 10.0), (0.0, y5, big), 24.0))
    grid.paint(BONE_MARROW, *capsule((0.0, y5, z_hi + 12.0), (0.0, y5, big), 22.0))
    grid.paint(BONE_CORTEX, *capsule((0.0, y5 - 32.0, z_hi + 10.0), (0.0, y5 - 32.0, big), 11.0))   # the arch
    grid.paint(CSF, *capsule((0.0, y5 - 30.0, z_hi + 10.0), (0.0, y5 - 30.0, big), 7.0))
    grid.paint(CSF, lambda X, Y, Z: (X / 9.0) ** 2 + ((Y - pelvis.sacrum_y(Z) + 0.45 * pelvis.sacrum_d(Z)) / 4.0) ** 2
               <= 1.0, (-10.0, -big, z_lo + 20.0), (10.0, big, z_hi), into=(BONE_MARROW,))   # the sacral canal
    for side in (-1.0, 1.0):
        _paint_hip_bone(grid, pelvis, side)
        head = np.array([side * hx, yh, z0])
        neck_end = head + [side * 34.0 * k, -8.0, -30.0]
        trochanter = head + [side * 40.0 * k, -12.0, -22.0]
        shaft_end = head + [side * 26.0 * k, 0.0, -400.0]
        for cls, shrink in ((BONE_CORTEX, 0.0), (BONE_MARROW, 3.0)):
            grid.paint(cls, *ellipsoid(head, [23.0 * k - shrink] * 3))
            grid.paint(cls, *capsule(head, neck_end, 13.0 * k - shrink, 14.0 * k - shrink))
            grid.paint(cls, *ellipsoid(trochanter, np.array([13.0, 18.0, 22.0]) * k - shrink))
            grid.paint(cls, *capsule(neck_end, shaft_end, 14.0 * k - shrink, 12.0 * k - shrink))


def _paint_hip_bone(grid, pelvis, side: float) -> None:
    """One hip bone: the iliac wing (a curved plate, thick above the acetabulum, thin at the crest), the
    acetabulum around the femoral head, the pubic rami to the symphysis and the ischium."""
    hx, yh, z0, crest = pelvis.hx, pelvis.yh, pelvis.z0, pelvis.crest
    z_base, k = z0 + 25.0, pelvis.k

    def wing(lo, hi, first=-100.0):   # offsets from the plate's mid-surface between lo and hi: (× half, + mm)
        def inside(X, Y, Z):
            t = np.clip((Z - z_base) / (crest - 25.0), 0.0, 1.0)     # 0 above the acetabulum, 1 at the crest
            xc, yc = hx - 25.0 + (60.0 * k - hx + 25.0) * t, -5.0 + 15.0 * t
            sx, sy = (32.0 + 33.0 * t) * k, (40.0 + 30.0 * t) * k
            u, v = (side * X - xc) / sx, (Y - yc) / sy
            offset, half = (np.hypot(u, v) - 1.0) * (sx + sy) / 2.0, 7.0 - 4.0 * t   # mm outwards; half thickness
            angle = np.degrees(np.arctan2(v, u))
            return ((offset >= lo[0] * half + lo[1]) & (offset <= hi[0] * half + hi[1])
                    & (angle >= first) & (angle <= 40.0))
        return inside

    big = 1e4
    box = (min(0.0, side * big), -big, z_base), (max(0.0, side * big), big, z0 + crest)
    grid.paint(MUSCLE, wing((-1.0, -16.0 * k), (-1.0, 0.0), -70.0), *box, into=(FAT_VISC,))   # iliacus
    grid.paint(BONE_CORTEX, wing((-1.0, 0.0), (1.0, 0.0)), *box)
    grid.paint(BONE_MARROW, wing((-1.0, 2.0), (1.0, -2.0)), *box)
    head = np.array([side * hx, yh, z0])
    r_cup = 23.0 * k + 9.0
    pubis = head + [side * -18.0, 18.0, 2.0], np.array([side * 6.0, yh + 60.0, z0 - 12.0])
    ischium = head + [side * -12.0, -22.0, -5.0], head + [side * -35.0, -38.0, -48.0]
    inferior = ischium[1], np.array([side * 8.0, yh + 56.0, z0 - 28.0])
    for cls, shrink in ((BONE_CORTEX, 0.0), (BONE_MARROW, 2.5)):
        cup, lo, hi = ellipsoid(head + [side * -5.0, 0.0, 5.0], [r_cup - shrink] * 3)
        grid.paint(cls, lambda X, Y, Z: cup(X, Y, Z) & (side * X <= hx + 6.0) & (Z >= z0 - 12.0), lo, hi)
        grid.paint(cls, *capsule(head + [side * -8.0, -10.0, 10.0], (side * (hx - 20.0), -5.0, z_base + 10.0),
                                 20.0 - shrink))
        grid.paint(cls, *capsule(*pubis, 10.0 - shrink, 8.0 - shrink))
        grid.paint(cls, *capsule(*ischium, 14.0 - shrink, 12.0 - shrink))
        grid.paint(cls, *capsule(*inferior, 8.0 - shrink, 7.0 - shrink))
    grid.paint(MUSCLE, *ellipsoid(head, [23.0 * k + 2.0] * 3), into=(BONE_CORTEX, BONE_MARROW))   # joint space


def _paint_pelvic_organs(grid, rng, pelvis) -> None:
    """The iliopsoas, the rectum and sigmoid, the caecum, the prostate or uterus, the bladder, small bowel."""
    a, b, hx, yh, z0, k = pelvis.a, pelvis.b, pelvis.hx, pelvis.yh, pelvis.z0, pelvis.k
    y5 = float(pelvis.sacrum_y(pelvis.sacrum_z[1]))
    for side in (-1.0, 1.0):   # psoas beside L5, along the pelvic brim to the lesser trochanter
        points = [(side * 45.0, y5 + 5.0, 1e3), (side * 55.0, y5 + 12.0, z0 + 80.0),
                  (side * (hx - 22.0), yh + 24.0, z0 + 20.0), (side * (hx - 10.0), yh + 28.0, z0 - 20.0),
                  (side * (hx + 5.0), yh + 5.0, z0 - 70.0)]
        radius = rng.uniform(15.0, 21.0) * k
        paint_path(grid, MUSCLE, points, [radius * 0.8, radius, radius, 0.8 * radius, 0.6 * radius], into=(FAT_VISC,))
    r = rng.uniform(13.0, 19.0, size=6)
    ys = [float(pelvis.sacrum_front(z)) + r[n] + 4.0 for n, z in enumerate((z0 - 60.0, z0 - 15.0, z0 + 30.0))]
    colon = [(0.0, ys[0], z0 - 60.0), (0.0, ys[1], z0 - 15.0), (rng.uniform(-10, 10), ys[2], z0 + 30.0),
             (-35.0, yh + rng.uniform(10, 40), z0 + 60.0), (-0.35 * a, yh + rng.uniform(20, 50), z0 + 90.0),
             (-0.45 * a, yh + rng.uniform(0, 30), z0 + 170.0)]
    _paint_gut(grid, rng, colon, r)
    caecum = [(0.45 * a, yh + rng.uniform(15, 35), z0 + rng.uniform(60, 90)), (0.5 * a, yh + 15.0, z0 + 220.0)]
    _paint_gut(grid, rng, caecum, rng.uniform(18.0, 26.0, size=2))
    if rng.uniform() < 0.5:   # a uterus above and behind the bladder, else a prostate below it: soft tissue
        uterus = ellipsoid((rng.uniform(-10, 10), yh, z0 + 35.0), (30.0, 22.0, 38.0), random_rotation(rng, 20.0))
        grid.paint(MUSCLE, *uterus, into=(FAT_VISC,))
    else:
        grid.paint(MUSCLE, *ellipsoid((0.0, yh + 22.0, z0 - 35.0), (20.0, 16.0, 18.0)), into=(FAT_VISC,))
    semi = np.array([rng.uniform(25.0, 50.0), rng.uniform(20.0, 40.0), rng.uniform(20.0, 45.0)])
    bladder = (rng.uniform(-8.0, 8.0), yh + 46.0 - semi[1], z0 - 22.0 + semi[2])
    grid.paint(BOWEL_WALL, *ellipsoid(bladder, semi), into=(FAT_VISC,))
    grid.paint(URINE, *ellipsoid(bladder, semi - 2.5), into=(BOWEL_WALL,))
    for _ in range(int(rng.integers(10, 21))):   # small bowel fills the false pelvis above the bladder
        centre = (rng.uniform(-0.45, 0.45) * a, rng.uniform(-0.1, 0.6) * b,
                  z0 + rng.uniform(35.0, pelvis.crest + 40.0))
        semi = rng.uniform(11.0, 20.0, size=3) * k
        rot = random_rotation(rng, 90.0)
        grid.paint(BOWEL_WALL, *ellipsoid(centre, semi, rot), into=(FAT_VISC,))
        grid.paint(GAS if rng.uniform() < 0.25 else FLUID, *ellipsoid(centre, semi - 2.5, rot), into=(BOWEL_WALL,))


def _paint_gut(grid, rng, points, radii) -> None:
    """Large bowel along ``points``: a wall, and in each segment gas or stool with bubbles of gas."""
    paint_path(grid, BOWEL_WALL, points, radii, into=(FAT_VISC, MUSCLE))
    for n in range(len(points) - 1):
        inside = capsule(points[n], points[n + 1], radii[n] - 3.0, radii[n + 1] - 3.0)
        if rng.uniform() < 0.35:
            grid.paint(GAS, *inside, into=(BOWEL_WALL,))
            continue
        grid.paint(STOOL, *inside, into=(BOWEL_WALL,))
        for _ in range(int(rng.integers(2, 7))):
            t = rng.uniform()
            centre = (1.0 - t) * np.asarray(points[n]) + t * np.asarray(points[n + 1]) + rng.uniform(-6, 6, size=3)
            grid.paint(GAS, *ellipsoid(centre, [rng.uniform(2.0, 5.0)] * 3), into=(STOOL,))


def _paint_iliac_vessels(grid, rng, pelvis) -> None:
    """Common, external and internal iliac arteries and veins (the veins medial and behind), to the femorals."""
    hx, yh, z0 = pelvis.hx, pelvis.yh, pelvis.z0
    y5 = float(pelvis.sacrum_y(pelvis.sacrum_z[1]))
    r_a, r_v = rng.uniform(4.0, 6.0), rng.uniform(6.0, 8.5)
    for side in (-1.0, 1.0):
        artery = [(side * 12.0, y5 + 35.0, 1e3), (side * 35.0, y5 + 32.0, z0 + 90.0),
                  (side * (hx - 38.0), yh + 40.0, z0 + 30.0), (side * (hx - 20.0), yh + 48.0, z0 - 5.0),
                  (side * (hx - 14.0), yh + 50.0, z0 - 90.0)]
        vein = [np.asarray(p) + [side * -12.0, -6.0, 0.0] for p in artery]
        paint_path(grid, AORTA, artery, [r_a] * 5, into=(FAT_VISC, MUSCLE))
        paint_path(grid, VEIN, vein, [r_v] * 5, into=(FAT_VISC, MUSCLE))
        internal = [artery[1], (side * 50.0, float(pelvis.sacrum_front(z0 + 40.0)) + 15.0, z0 + 40.0)]
        paint_path(grid, AORTA, internal, [0.7 * r_a] * 2, into=(FAT_VISC,))


_PAINTERS = {"head": _paint_head, "neck": _paint_neck, "pelvis": _paint_pelvis, "legs": _paint_legs}
