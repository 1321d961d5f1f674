"""The organs of the CT phantom, painted as tissue classes onto a fine grid, and their HU per patient."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .common import random_rotation, rotation_z
from .geometry import Ellipsoid, Waves, capsule, ellipsoid, paint_path, vessel_tree
from .tissues import (AIR, AORTA, BILE, BLOOD, BONE_CORTEX, BONE_MARROW, BOWEL_WALL, CARTILAGE, CSF, DISC,
                      FAT_SC, FAT_VISC, FLUID, GAS, KIDNEY_CORTEX, KIDNEY_MEDULLA, LIVER, LIVER_HEPATIC,
                      LIVER_PORTAL, LUNG, MUSCLE, MYOCARDIUM, PANCREAS, PORTAL, RENAL_SINUS, SKIN, SPLEEN,
                      STOOL, TABLE_FOAM, TABLE_SHELL, VEIN)


def paint_anatomy(grid, rng, a, b, fat, muscle_w, organ, fov, pixel_mm, left_lobe: float = 1.0, fissures=None,
                  diaphragm=None, stomach=None, beaver_tail=None):
    """Paint the abdomen into ``grid``, one organ system after another from one random stream (the
    order is the phantoms' seed contract); return per-class HU and texture-amplitude tables.
    ``left_lobe`` scales the liver's left lobe across the body (1: as before; real ones reach from
    the midline to the spleen).  ``fissures``: None (as before) or a random stream of its own that
    draws the liver's fat-filled fissures (:func:`_paint_liver_fissures`).  ``diaphragm``: None (as
    before) or a random stream of its own that draws the diaphragm's costal part
    (:func:`_paint_costal_diaphragm`).  ``stomach``: None (as before) or a random stream of its own that
    varies the stomach's size, place and contents (:func:`_paint_spleen_and_stomach`).  ``beaver_tail``: None
    (as before) or a random stream of its own that gives some livers a thin plate atop the left lobe and a
    tail from it back towards the spleen (:func:`_paint_liver`), over a lower stomach."""
    body = SimpleNamespace(a=a, b=b, fat=fat, muscle_w=muscle_w, organ=organ, fov=fov, pixel_mm=pixel_mm,
                           left_lobe=left_lobe, fissures=fissures, diaphragm=diaphragm, stomach=stomach,
                           stomach_room=0.0, beaver_tail=beaver_tail, plate_height=None)
    for painter in (_paint_body, _paint_table, _paint_chest, _paint_costal_diaphragm, _paint_spine, _paint_aorta,
                    _paint_kidneys,
                    _paint_spleen_and_stomach, _paint_liver, _paint_liver_fissures, _paint_liver_vessels,
                    _paint_gallbladder, _paint_bowel, _paint_ribs):
        painter(grid, rng, body)
    return _tissue_table(rng)


def _paint_body(grid, rng, body) -> None:
    """The body outline (a superellipse, rounder in front, flatter at the back, with ripples): skin, fat, muscle."""
    a, b, fat, muscle_w = body.a, body.b, body.fat, body.muscle_w
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
    body.__dict__.update(ac=ac, bc=bc, big=big, everywhere=everywhere, g=g, r_mean=r_mean, rho2=rho2, rho_cav=rho_cav,
                         rho_fat=rho_fat, ripple_back=ripple_back)


def _paint_table(grid, rng, body) -> None:
    """The patient table (carbon shell, foam core) under the back."""
    b, big, fov, pixel_mm, ripple_back = body.b, body.big, body.fov, body.pixel_mm, body.ripple_back
    y_top = -b * ripple_back - rng.uniform(0.0, 3.0)       # the back rests on the table
    table_half = min(0.47 * fov, 230.0)

    shell = max(3.0, 2.0 * pixel_mm)      # at least two pixels thick, so that it does not alias into dashes

    def table(lo_off, hi_off):
        return lambda X, Y, Z: (np.abs(X) <= table_half) & (Y <= y_top + 0.0006 * X ** 2 - lo_off) & \
            (Y >= y_top + 0.0006 * X ** 2 - hi_off)

    table_box = (-table_half, y_top - 50, -big), (table_half, y_top + 40, big)
    grid.paint(TABLE_SHELL, table(0.0, 45.0), *table_box, into=(AIR,))
    grid.paint(TABLE_FOAM, table(shell, 45.0 - shell), *table_box, into=(TABLE_SHELL,))


def _paint_chest(grid, rng, body) -> None:
    """Diaphragm domes, lungs and heart; where the vertebral bodies lie."""
    ac, b, bc, everywhere, fat, organ = body.ac, body.b, body.bc, body.everywhere, body.fat, body.organ
    left_drop = rng.uniform(10.0, 25.0)
    apex_y = -0.05 * bc

    def dome(X, Y):
        right = -55.0 * ((X - 0.45 * ac) / (0.7 * ac)) ** 2
        left = -left_drop - 55.0 * ((X + 0.45 * ac) / (0.7 * ac)) ** 2
        return np.maximum(right, left) - 45.0 * ((Y - apex_y) / (0.9 * bc)) ** 2

    def below_dome(margin):
        return lambda X, Y, Z: Z < dome(X, Y) - margin

    heart = Ellipsoid((-0.12 * ac, 0.3 * bc, 35.0), (0.42 * ac, 0.5 * bc, 50.0))
    pericardium = Ellipsoid(heart.c, heart.semi + 6.0)
    # lungs fill the chest above the domes, except the heart with its fat and the strip of
    # posterior mediastinum (aorta, oesophagus) in front of the spine
    y_vb = -b + 0.5 * fat + rng.uniform(70.0, 80.0) * organ   # vertebral body centre
    grid.paint(LUNG, lambda X, Y, Z: (Z > dome(X, Y)) & ~pericardium.inside(X, Y, Z)
               & ~((np.abs(X + 8.0) < 22.0) & (Y < y_vb + 50.0)), *everywhere, into=(FAT_VISC,))
    grid.paint(MUSCLE, lambda X, Y, Z: (Z <= dome(X, Y)) & (Z > dome(X, Y) - 4.0), *everywhere, into=(FAT_VISC,))
    grid.paint(MYOCARDIUM, lambda X, Y, Z: heart.inside(X, Y, Z) & (Z > dome(X, Y)), heart.lo, heart.hi,
               into=(LUNG, FAT_VISC))
    blood_in, lo, hi = ellipsoid(heart.c, heart.semi - 9.0)
    grid.paint(BLOOD, blood_in, lo, hi, into=(MYOCARDIUM,))
    body.__dict__.update(below_dome=below_dome, dome=dome, left_drop=left_drop, y_vb=y_vb)


def _angle_from_spine(body, x, y):
    """The angle (radians) around the body's axis of the points (x, y) mm: 0 at the spine, π at the front,
    on the body's own ellipse (so the same on either side)."""
    return np.arccos(np.clip(-(y / body.b) / np.maximum(np.hypot(x / body.a, y / body.b), 1e-9), -1.0, 1.0))


def _paint_costal_diaphragm(grid, rng, body) -> None:
    """The diaphragm's costal part: a sheet of muscle (2.5–6 mm) lining the body wall on the inside, from
    the dome down to the costal margin (higher in front than at the back), with 0–4 mm of extraperitoneal
    fat between it and the wall, as on every real upper-abdominal CT; the liver and the spleen lie inside
    it, so the tissue between a liver and the ribs is not liver.  Drawn from ``body.diaphragm``, a stream
    of its own (None: the wall's muscle, with the ribs in it, touches the organs directly, as before).
    Left out for 0.12 π around the spine (the crura) and in front of the xiphoid."""
    draw = body.diaphragm
    if draw is None:
        return
    g, r_mean, rho2, rho_cav, dome = body.g, body.r_mean, body.rho2, body.rho_cav, body.dome
    thick, gap = draw.uniform(2.5, 6.0), draw.uniform(0.0, 4.0)
    wobble, wobble_phase = draw.uniform(0.0, 0.3), draw.uniform(0.0, 2.0 * np.pi)
    z_back, z_front = draw.uniform(-190.0, -140.0), draw.uniform(-110.0, -60.0)   # the costal margin
    front_end = draw.uniform(0.85, 0.95) * np.pi
    cls = grid.cls
    jj, ii = np.nonzero((rho_cav - rho2 / g.max()) * r_mean >= -2.0)    # the cavity and a little more
    depth = (rho_cav - rho2[jj, ii][None, :] / g[:, None]) * r_mean       # mm inside the cavity's edge
    near = np.nonzero(((depth >= 0.0) & (depth < gap + thick * (1.0 + wobble))).any(axis=0))[0]
    jj, ii, depth = jj[near], ii[near], depth[:, near]
    xr, yr = grid.x[ii], grid.y[jj]
    phi = _angle_from_spine(body, xr, yr)
    local = thick * (1.0 + wobble * np.sin(2.0 * phi + wobble_phase))
    z_margin = z_back + (z_front - z_back) * (phi / np.pi) ** 1.5
    zz = grid.z[:, None]
    sheet = (depth >= gap) & (depth < gap + local[None, :]) & (zz < dome(xr, yr)[None, :]) \
        & (zz > z_margin[None, :]) & ((phi > 0.12 * np.pi) & (phi < front_end))[None, :]
    ring = cls[:, jj, ii]
    ring[sheet & (ring == FAT_VISC)] = MUSCLE
    cls[:, jj, ii] = ring


def _paint_spine(grid, rng, body) -> None:
    """Spine, paraspinal muscles, psoas."""
    big, organ, y_vb = body.big, body.organ, body.y_vb
    vb_a, vb_b = 21.0 * organ, 15.0 * organ
    y_canal = y_vb - vb_b - 10.0
    period = rng.uniform(30.0, 36.0)
    disc = rng.uniform(7.0, 10.0)
    phase = rng.uniform(0.0, period)

    def in_vertebra(Z, lo=0.0, hi=None):
        t = np.mod(Z - phase, period)
        return (t >= lo) & (t < (period - disc if hi is None else hi))

    for side in (-1.0, 1.0):
        para, lo, hi = ellipsoid((side * 32.0 * organ, y_canal - 12.0, 0.0), (29.0 * organ, 17.0 * organ, 1e4))
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
    body.__dict__.update(vb_b=vb_b)


def _paint_aorta(grid, rng, body) -> None:
    """The aorta."""
    organ, vb_b, y_vb = body.organ, body.vb_b, body.y_vb
    r_ao = rng.uniform(10.0, 13.0) * organ
    aorta = [(-25.0, y_vb + 2.0, 60.0), (-20.0, y_vb + vb_b + r_ao, -40.0), (-14.0, y_vb + vb_b + r_ao + 2, -260.0)]
    paint_path(grid, AORTA, aorta, [r_ao] * 3, into=(FAT_VISC, LUNG, MUSCLE))
    body.__dict__.update(r_ao=r_ao)


def _paint_kidneys(grid, rng, body) -> None:
    """Kidneys (painted before the liver: the liver takes their impression) and the left renal vein."""
    ac, organ, r_ao, vb_b, y_vb = body.ac, body.organ, body.r_ao, body.vb_b, body.y_vb
    kidney_z = -rng.uniform(95.0, 115.0)
    right_lower = rng.uniform(10.0, 25.0)
    for side, z_c in ((-1.0, kidney_z), (1.0, kidney_z - right_lower)):
        centre = np.array([side * 0.5 * ac, y_vb - 4.0, z_c])
        rot = rotation_z(side * -rng.uniform(25.0, 40.0)) @ random_rotation(rng, 10.0)
        semi = np.array([26.0, 21.0, 52.0]) * organ * rng.uniform(0.9, 1.1, size=3)
        grid.paint(KIDNEY_CORTEX, *ellipsoid(centre, semi, rot), into=(FAT_VISC,))
        grid.paint(KIDNEY_MEDULLA, *ellipsoid(centre, semi * [0.62, 0.62, 0.75], rot), into=(KIDNEY_CORTEX,))
        medial = centre + rot @ np.array([-side * 0.55 * semi[0], 0.0, 0.0])
        grid.paint(RENAL_SINUS, *ellipsoid(medial, semi * [0.45, 0.4, 0.5], rot), into=(KIDNEY_CORTEX, KIDNEY_MEDULLA))
        if side < 0:   # left renal vein crosses in front of the aorta into the IVC
            paint_path(grid, VEIN, [medial, (-5.0, y_vb + vb_b + 2 * r_ao + 4.0, z_c + 5.0), (22.0, y_vb + 26.0, z_c + 8)],
                        [5.0, 4.5, 5.0], into=(FAT_VISC,))


def _paint_spleen_and_stomach(grid, rng, body) -> None:
    """Spleen (crescent) and stomach (gas over fluid), under the left dome.

    With ``body.stomach`` (a stream of its own) the stomach is drawn as real ones vary: 0.45–1 times as
    large, a smaller one lying further back (towards the spleen and the crura), and half of them collapsed
    (all wall: soft tissue close to an unenhanced liver's HU, no gas); ``body.stomach_room`` (0–0.55) then
    tells the liver how much of the front of the left upper abdomen is free for its left lobe.  With
    ``body.beaver_tail`` (a stream of its own), six in ten stomachs lie 16–42 mm lower, under the plate of
    the liver's left lobe that :func:`_paint_liver` then draws (``body.plate_height``, else None)."""
    ac, bc, below_dome, left_drop, organ = body.ac, body.bc, body.below_dome, body.left_drop, body.organ
    spleen_c = np.array([-0.7 * ac, -0.3 * bc, -45.0 - left_drop - rng.uniform(0.0, 15.0)])
    spleen_rot = rotation_z(45.0 + rng.uniform(-10.0, 10.0))   # long axis along the ribs
    spleen_semi = np.array([22.0, 52.0, 45.0]) * organ * rng.uniform(0.85, 1.15, size=3)
    s_in, lo, hi = ellipsoid(spleen_c, spleen_semi, spleen_rot)
    hollow, _, _ = ellipsoid(spleen_c + spleen_rot @ [0.9 * spleen_semi[0], 0, 0], spleen_semi * [0.8, 0.85, 0.8], spleen_rot)
    grid.paint(SPLEEN, lambda X, Y, Z: s_in(X, Y, Z) & ~hollow(X, Y, Z) & below_dome(4.0)(X, Y, Z), lo, hi, into=(FAT_VISC,))

    st_c = np.array([-0.38 * ac, 0.12 * bc, -40.0 - left_drop])
    st_rot = rotation_z(rng.uniform(15.0, 40.0))
    st_semi = np.array([40.0, 33.0, 55.0]) * organ * rng.uniform(0.8, 1.2, size=3)
    fill = rng.uniform(-0.2, 0.7)                               # the gas-fluid level, as a fraction of the semi-axis
    collapsed = False
    if body.stomach is not None:
        size = body.stomach.uniform(0.45, 1.0)
        st_semi = st_semi * size
        st_c = st_c - np.array([0.0, (1.0 - size) * body.stomach.uniform(0.4, 0.8) * bc, 0.0])
        collapsed = bool(body.stomach.uniform() < 0.5)
        body.stomach_room = 1.0 - size
    tail = body.beaver_tail
    if tail is not None and tail.uniform() < 0.6:   # the left lobe's plate lies over the stomach: it sits lower
        body.plate_height = tail.uniform(8.0, 16.0)
        st_c = st_c - np.array([0.0, 0.0, 2.0 * body.plate_height + tail.uniform(0.0, 10.0)])
    wall_in, lo, hi = ellipsoid(st_c, st_semi, st_rot)
    grid.paint(BOWEL_WALL, lambda X, Y, Z: wall_in(X, Y, Z) & below_dome(4.0)(X, Y, Z), lo, hi, into=(FAT_VISC,))
    if collapsed:
        return
    lumen_in, lo, hi = ellipsoid(st_c, st_semi - 4.0, st_rot)
    level = st_c[1] + fill * st_semi[1]
    grid.paint(FLUID, lumen_in, lo, hi, into=(BOWEL_WALL,))
    grid.paint(GAS, lambda X, Y, Z: lumen_in(X, Y, Z) & (Y > level), lo, hi, into=(FLUID,))


def _paint_liver(grid, rng, body) -> None:
    """The liver: a smooth union of lobes, lobulated by a smooth field.

    Where :func:`_paint_spleen_and_stomach` drew a plate (``body.plate_height``; six livers in ten with
    ``body.beaver_tail``, a stream of its own), the liver gets the left lobe of many real
    upper-abdominal CTs: a thin plate (16–32 mm high) at the left lobe's top, under the heart, reaching
    further across, and from its end a lobe as thin back along the left ribs towards the spleen (the
    "beaver tail" liver, a common normal variant); the liver fills only the fat there, so it drapes over
    the stomach and wraps around it and the spleen."""
    ac, bc, dome, organ, left, room = body.ac, body.bc, body.dome, body.organ, body.left_lobe, body.stomach_room
    lobes = [  # (centre as fractions of the cavity / mm in z, semi-axes mm)
        ((0.42, 0.0, -62.0), (0.5 * ac, 0.78 * bc, 68.0)),          # right lobe
        ((-0.18 - 0.25 * (left - 1.0), 0.42 - 0.3 * room, -38.0),   # left lobe: deeper where the stomach is small
         (0.45 * ac * left, (0.38 + 0.3 * room) * bc, 34.0)),
        ((0.58, 0.05, -118.0), (0.27 * ac, 0.5 * bc, 40.0)),        # inferior tip of the right lobe
        ((0.07, -0.3, -52.0), (0.15 * ac, 0.26 * bc, 34.0)),        # caudate lobe
    ]
    liver_scale = organ * rng.uniform(0.9, 1.1)
    lobe_shapes = [
        Ellipsoid(np.array([fx * ac, fy * bc, z]) + rng.uniform(-8.0, 8.0, size=3),
                   np.asarray(semi) * liver_scale * rng.uniform(0.88, 1.12, size=3), random_rotation(rng, 12.0))
        for (fx, fy, z), semi in lobes
    ]
    waves = Waves(rng, 8, (50.0, 120.0), 0.12)
    tail, height = body.beaver_tail, body.plate_height
    if height is not None:
        lobe = lobe_shapes[1]
        semi = np.array([tail.uniform(0.3, 0.45) * ac, lobe.semi[1], height])
        centre = lobe.c + [-tail.uniform(0.2, 0.4) * ac, 0.0, lobe.semi[2] - height]
        plate = Ellipsoid(centre, semi, lobe.rot)
        lobe_shapes.append(plate)
        end = plate.c[0] - 0.6 * plate.semi[0]                              # towards the plate's end
        centre = np.array([end - tail.uniform(0.05, 0.2) * ac, tail.uniform(-0.2, 0.2) * bc,
                           plate.c[2] + tail.uniform(-6.0, 4.0)])
        semi = np.array([tail.uniform(0.25, 0.4) * ac, tail.uniform(0.18, 0.3) * bc, plate.semi[2]])
        lobe_shapes.append(Ellipsoid(centre, semi, rotation_z(tail.uniform(30.0, 60.0))))
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
    body.liver_lobes, body.liver_box = lobe_shapes, (lo_all, hi_all)


def _paint_liver_fissures(grid, rng, body) -> None:
    """Fat-filled clefts cut into the liver from its surface, as real livers have and the lobes' smooth
    union lacks, so that a network does not take every fat line for the liver's end: the umbilical
    fissure (between the left lateral and the medial segments, in from the anterior surface, four cases
    in five) and the fissure of the ligamentum venosum (in front of the caudate lobe, three in five),
    each 1.5–4 mm wide.  Drawn from ``body.fissures``, a stream of its own (None: no fissures)."""
    draw = body.fissures
    if draw is None:
        return
    _, left, _, caudate = body.liver_lobes[:4]   # a plate and a tail, if any, come after
    lo_all, hi_all = body.liver_box
    if draw.uniform() < 0.8:  # umbilical fissure: a near-sagittal plane through the left lobe's right part
        width = draw.uniform(1.5, 4.0)
        point = left.c + np.array([draw.uniform(0.15, 0.45) * left.semi[0], 0.0, 0.0])
        normal = rotation_z(draw.uniform(-25.0, 25.0)) @ np.array([1.0, 0.0, draw.uniform(-0.3, 0.3)])
        normal /= np.linalg.norm(normal)
        y_from = left.c[1] - draw.uniform(-0.2, 0.7) * left.semi[1]      # how deep it cuts in from the front
        z_to = left.c[2] + draw.uniform(0.0, 0.8) * left.semi[2]          # up to how high it reaches

        def umbilical(X, Y, Z):
            along = (X - point[0]) * normal[0] + (Y - point[1]) * normal[1] + (Z - point[2]) * normal[2]
            return (np.abs(along) < width / 2) & (Y > y_from) & (Z < z_to)

        grid.paint(FAT_VISC, umbilical, lo_all, hi_all, into=(LIVER,))
    if draw.uniform() < 0.6:  # ligamentum venosum: a near-coronal plane in front of the caudate lobe
        width = draw.uniform(1.5, 3.0)
        point = caudate.c + np.array([0.0, draw.uniform(0.5, 0.9) * caudate.semi[1], 0.0])
        normal = rotation_z(draw.uniform(-30.0, 30.0)) @ np.array([0.0, 1.0, 0.0])
        x_to = caudate.c[0] + draw.uniform(0.3, 0.9) * caudate.semi[0]   # from the left lobe to past the caudate
        z_lo, z_hi = caudate.c[2] - 0.8 * caudate.semi[2], caudate.c[2] + 0.8 * caudate.semi[2]

        def venosum(X, Y, Z):
            along = (X - point[0]) * normal[0] + (Y - point[1]) * normal[1]
            return (np.abs(along) < width / 2) & (X < x_to) & (Z > z_lo) & (Z < z_hi)

        grid.paint(FAT_VISC, venosum, lo_all, hi_all, into=(LIVER,))


def _paint_liver_vessels(grid, rng, body) -> None:
    """The IVC behind the liver, the portal vein (trunk outside, branches inside) and the hepatic veins."""
    ac, bc, organ, y_vb = body.ac, body.bc, body.organ, body.y_vb
    # IVC: behind the liver into the right atrium; carves the liver
    r_ivc = rng.uniform(9.0, 12.0) * organ
    ivc = [(22.0, y_vb + 20.0, -260.0), (24.0, y_vb + 26.0, -100.0), (18.0, y_vb + 34.0, -20.0), (8.0, y_vb + 48.0, 20.0)]
    paint_path(grid, VEIN, ivc, [r_ivc] * 4, into=(FAT_VISC, LIVER, MUSCLE, LUNG, MYOCARDIUM))

    # portal vein: trunk outside the liver, branches inside (labelled liver)
    hilum = np.array([0.2 * ac, -0.05 * bc, -78.0])
    r_pv = rng.uniform(6.0, 7.5) * organ
    segments = [(np.array([0.03 * ac, y_vb + 42.0, -112.0]), hilum, r_pv)]
    vessel_tree(rng, hilum, np.array([0.58 * ac, 0.0, -72.0]), 0.8 * r_pv, 2, segments)
    vessel_tree(rng, hilum, np.array([-0.2 * ac, 0.35 * bc, -55.0]), 0.7 * r_pv, 2, segments)
    for p0, p1, r in segments:
        inside, lo, hi = capsule(p0, p1, r, 0.85 * r)
        grid.paint(LIVER_PORTAL, inside, lo, hi, into=(LIVER,))
        grid.paint(PORTAL, inside, lo, hi, into=(FAT_VISC,))
    # hepatic veins converge on the IVC at the top of the liver
    junction = np.array([14.0, y_vb + 40.0, -14.0])
    hepatic = []
    for target in ((0.75 * ac, -0.1 * bc, -62.0), (0.25 * ac, 0.5 * bc, -72.0), (-0.32 * ac, 0.4 * bc, -36.0)):
        vessel_tree(rng, junction, np.asarray(target) + rng.uniform(-8, 8, size=3), 5.5 * organ, 1, hepatic)
    for p0, p1, r in hepatic:
        grid.paint(LIVER_HEPATIC, *capsule(p0, p1, r, 0.7 * r), into=(LIVER,))


def _paint_gallbladder(grid, rng, body) -> None:
    """The gallbladder under the liver (absent after cholecystectomy in a fifth of patients)."""
    ac, bc, organ = body.ac, body.bc, body.organ
    if rng.uniform() < 0.8:   # gallbladder under the liver (absent after cholecystectomy)
        gb_in, lo, hi = ellipsoid((0.22 * ac, 0.42 * bc, -100.0), np.array([14.0, 16.0, 32.0]) * organ, random_rotation(rng, 25.0))
        grid.paint(BILE, gb_in, lo, hi, into=(LIVER, FAT_VISC, LIVER_PORTAL, LIVER_HEPATIC))


def _paint_bowel(grid, rng, body) -> None:
    """Pancreas, colon, small bowel."""
    ac, bc, organ, y_vb = body.ac, body.bc, body.organ, body.y_vb
    pancreas = [(0.14 * ac, y_vb + 30.0, -112.0), (0.0, y_vb + 46.0, -100.0), (-0.25 * ac, y_vb + 40.0, -92.0),
                (-0.5 * ac, y_vb + 12.0, -82.0)]
    paint_path(grid, PANCREAS, pancreas, np.array([13.0, 10.0, 9.0, 8.0]) * organ, into=(FAT_VISC,))
    colon = [(0.64 * ac, 0.05 * bc, -260.0), (0.62 * ac, 0.1 * bc, -118.0), (0.2 * ac, 0.62 * bc, -124.0),
             (-0.3 * ac, 0.58 * bc, -112.0), (-0.66 * ac, 0.05 * bc, -88.0), (-0.68 * ac, -0.1 * bc, -260.0)]
    colon = [np.asarray(c) + rng.uniform(-6, 6, size=3) for c in colon]
    r_colon = rng.uniform(14.0, 20.0, size=len(colon)) * organ
    paint_path(grid, BOWEL_WALL, colon, r_colon, into=(FAT_VISC,))
    for n in range(len(colon) - 1):
        content = GAS if rng.uniform() < 0.5 else STOOL
        grid.paint(content, *capsule(colon[n], colon[n + 1], r_colon[n] - 3.0, r_colon[n + 1] - 3.0), into=(BOWEL_WALL,))
    for _ in range(int(rng.integers(6, 13))):
        centre = (rng.uniform(-0.5, 0.5) * ac, rng.uniform(-0.1, 0.75) * bc, rng.uniform(-260.0, -105.0))
        semi = rng.uniform(9.0, 18.0, size=3) * organ
        rot = random_rotation(rng, 90.0)
        grid.paint(BOWEL_WALL, *ellipsoid(centre, semi, rot), into=(FAT_VISC,))
        grid.paint(GAS if rng.uniform() < 0.25 else FLUID, *ellipsoid(centre, semi - 2.5, rot), into=(BOWEL_WALL,))


def _paint_ribs(grid, rng, body) -> None:
    """Ribs: bands that descend from the spine towards the front."""
    g, r_mean, rho2 = body.g, body.r_mean, body.rho2
    rho_cav, rho_fat = body.rho_cav, body.rho_fat
    cls = grid.cls
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
    phi = _angle_from_spine(body, xr, yr)[None, :]
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


def _tissue_table(rng):
    """HU and texture amplitudes per class (drawn per patient)."""
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
