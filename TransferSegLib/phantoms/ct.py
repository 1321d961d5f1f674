"""The CT phantom: an axial abdominal CT in HU with liver and liver-tumor labels (:func:`ct_phantom`).

The scan (build, field of view, slices, coverage), the contrast phase, the tumors and the
reconstruction are drawn here; :mod:`.anatomy` paints the organs.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from ..volume import TransferSegError, Volume
from .anatomy import paint_anatomy
from .common import block_mean, check_seed, check_shape, random_rotation, stream, unit_noise
from .geometry import FineGrid, Waves, capsule, ellipsoid
from .tissues import (AIR, AORTA, BLOOD, BONE_CORTEX, BONE_MARROW, FAT_SC, GAS, HALO0, KIDNEY_CORTEX, LIVER,
                      LIVER_HEPATIC, LIVER_PORTAL, LIVER_TISSUE, LUNG, MUSCLE, PORTAL, RIM0, SKIN, SPLEEN, TABLE_FOAM,
                      TABLE_SHELL, TUMOR0, VEIN)

CT_DEFAULT_SHAPE = (40, 96, 96)


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
        return str(stream(seed, 4).choice(list(CT_PHASES)))
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
#: and the share of cases in ``coverage="random"``.  "chest" (the lower chest: heart and lungs; the liver
#: stays 4 mm under the dome) has share 0 and comes last, so "random" never draws it and draws the others
#: as before; it and :func:`~TransferSegLib.phantoms.region_phantom` are scans without a liver, for scope
#: tests.  Its top stays at 150 mm at most, within the chest the phantom paints (lungs, spine, chest wall; the
#: heart reaches about 85 mm above the dome, the aorta 70 mm, the ribs 50 mm).
CT_COVERAGE = {
    "liver": (0.4, None),                                # dome of the diaphragm to the kidneys, as before
    "abdomen": (0.3, ((-5.0, 40.0), (-260.0, -200.0))),
    "chest-abdomen": (0.3, ((70.0, 160.0), (-250.0, -120.0))),
    "chest": (0.0, ((90.0, 150.0), (15.0, 40.0))),      # only when asked for
}


def _draw_tumor(rng, phase: str, liver_hu: float, kind=None) -> dict:
    """One tumor of a random kind (:data:`TUMOR_KINDS`), or of ``kind``: its core HU and, for some, a
    rim's HU and width."""
    if kind is None:
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


def _soften(rng, tumor: dict, phase: str, liver_hu: float) -> None:
    """Give a metastasis, a subtle tumor or a washed-out one (in place, seven in ten) the look of real
    metastases: a margin that fades into the liver over 25–60 % of its radius (two shells, at 25–45 % and
    55–80 % of the core's contrast; labelled tumor, as annotators draw them), an uneven inside (coarse
    texture 6–14 HU) and a lobulated outline.  Tumors with a rim or a capsule and cysts are kept."""
    washed_out = tumor["kind"] == "hyperenhancing" and phase in ("portal", "delayed")
    if tumor["rim"] is not None or not (tumor["kind"] in ("metastasis", "subtle") or washed_out):
        return
    if rng.uniform() >= 0.7:
        return
    contrast = tumor["hu"] - liver_hu
    outer, inner = rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.25)
    tumor["halo"] = ((liver_hu + rng.uniform(0.25, 0.45) * contrast, outer),
                     (liver_hu + rng.uniform(0.55, 0.8) * contrast, inner))
    tumor["texture"] = (tumor["texture"][0], rng.uniform(6.0, 14.0))
    tumor["waves"] = rng.uniform(0.08, 0.18)


def _coverage(seed: int, coverage, scan, nk: int) -> None:
    """Move the scan's z range (in place) to one of :data:`CT_COVERAGE`, drawn from its own stream."""
    if coverage is None:
        return
    rng = stream(seed, 7)
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
    rng = stream(seed, 8)
    fixed = {AIR, GAS, LUNG, TABLE_SHELL, TABLE_FOAM}
    for tissue in range(TUMOR0):
        if tissue in fixed:
            continue
        bound = 0.15 * abs(float(hu[tissue])) if hu[tissue] > 300 else 12.0
        hu[tissue] += rng.uniform(-bound, bound)


def _reconstruct(seed: int, array: np.ndarray, kernel: bool, bias: bool) -> None:
    """What a scanner's reconstruction adds (in place): with ``kernel`` a soft kernel's in-plane blur,
    with ``bias`` a smooth additive field (beam hardening, scatter) of up to ±15 HU."""
    rng = stream(seed, 6)
    blur = rng.uniform(0.0, 0.9)                # pixels
    if kernel and blur > 0.05:
        array[...] = ndimage.gaussian_filter(array, (0.0, blur, blur))
    if bias:
        amplitude = rng.uniform(0.0, 15.0)
        field = unit_noise(rng, tuple(max(1, n // 8) for n in array.shape), (1.0, 2.0, 2.0))
        zoom = [n / m for n, m in zip(array.shape, field.shape)]
        array += amplitude * ndimage.zoom(field, zoom, order=1)[tuple(slice(0, n) for n in array.shape)]


def _paint_arms(grid, rng, scan) -> None:
    """In half the cases, the arms down beside the body: skin, fat, muscle around the humerus."""
    if rng.uniform() >= 0.5:
        return
    big = 1e4
    for side in (-1.0, 1.0):
        r = rng.uniform(38.0, 55.0) * scan.organ
        cx = side * (scan.a + rng.uniform(5.0, 30.0) + r)
        cy = rng.uniform(-0.3, 0.3) * scan.b
        fat = rng.uniform(4.0, 14.0)
        for cls, radius in ((SKIN, r), (FAT_SC, r - 2.0), (MUSCLE, r - 2.0 - fat)):
            grid.paint(cls, *capsule((cx, cy, -big), (cx, cy, big), radius), into=(AIR, SKIN, FAT_SC))
        bone = (cx + side * 0.1 * r, cy, 0.0)
        grid.paint(BONE_CORTEX, *capsule((bone[0], bone[1], -big), (bone[0], bone[1], big), 10.0), into=(MUSCLE,))
        grid.paint(BONE_MARROW, *capsule((bone[0], bone[1], -big), (bone[0], bone[1], big), 6.0), into=(BONE_CORTEX,))


def _metal_streaks(rng, array: np.ndarray, spacing) -> None:
    """In one case in four, a small metal object (2,000–3,071 HU) in a few slices, with the streaks
    it casts: alternating dark and bright lines through it at a handful of angles, fading with distance."""
    if rng.uniform() >= 0.25:
        return
    s_k, s_ip = spacing[0], spacing[2]
    nk, nj, ni = array.shape
    body = np.argwhere(array[:, ::4, ::4] > -200.0)
    if body.size == 0:
        return
    k, j, i = body[rng.integers(len(body))] * [1, 4, 4]
    slab = max(1, int(round(rng.uniform(3.0, 25.0) / s_k)))
    radius = rng.uniform(1.5, 6.0) / s_ip
    jj, ii = np.mgrid[0:nj, 0:ni].astype(np.float32)
    dj, di = jj - j, ii - i
    distance = np.hypot(dj, di)
    streaks = np.zeros((nj, ni), np.float32)
    for angle in rng.uniform(0.0, np.pi, size=int(rng.integers(3, 9))):
        across = np.abs(dj * np.cos(angle) - di * np.sin(angle))          # pixels from the line through the metal
        streaks += rng.choice([-1.0, 1.0]) * np.exp(-(across / rng.uniform(0.8, 2.5)) ** 2)
    streaks *= rng.uniform(100.0, 400.0) / (1.0 + distance * s_ip / 40.0)
    for n in range(max(0, k - slab // 2), min(nk, k + slab // 2 + 1)):
        array[n] += streaks
        array[n][distance <= radius] = rng.uniform(2000.0, 3071.0)


def ct_phantom(seed: int, shape=None, tumors=None, *, noise_sigma=None, tumor_diameter_mm=(4.0, 40.0),
               with_tissues: bool = False, phase=None, tumor_kinds=None, coverage=None, reconstruction=None,
               randomise: bool = False, arms: bool = False, metal: bool = False, anatomy=None,
               fissures: bool = False, diaphragm: bool = False, tumor_margins: bool = False, stomach: bool = False,
               beaver_tail: bool = False):
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
        tumor_kinds: ``"mixed"`` draws each tumor's kind from :data:`TUMOR_KINDS` (hypodense
            metastases, some with an enhancing rim; arterially hyperenhancing tumors that wash out,
            some with a capsule; cysts at 0–20 HU; subtle ones), one case in five with 4–10 small
            ones, each kept off the large vessels; None keeps the older hypo/hyper-dense tumors.
        tumor_margins: with ``tumor_kinds="mixed"``, give seven in ten metastases, subtle and washed-out
            tumors the look of real metastases: a margin fading into the liver over 25–60 % of the radius
            (labelled tumor, as annotators draw it), an uneven inside and a lobulated outline; and one liver
            in five 6–15 metastases more (as livers full of them are).  Without it every tumor is sharp-edged
            and even inside, and networks trained so call only the dark, sharp cores of real metastases.
        coverage: ``"random"`` draws how far the scan reaches (:data:`CT_COVERAGE`: the dome to
            the kidneys, the whole abdomen, the chest to the abdomen), or name one; None: the first.
            ``"chest"`` (never drawn by ``"random"``) is the lower chest, 90–150 mm down to 15–40 mm
            above the dome: heart and lungs, all-zero labels.  Slices are at least 1 mm, so past
            50 slices it may reach lower; up to 90 slices it holds no liver voxel.
        reconstruction: ``"random"`` draws a kernel's blur and the noise (σ 6–32 HU, grain
            0.5–1.8 pixels) per case; None: σ 11–20 HU, grain 0.6–1.1 pixels, no blur.
        randomise: move every tissue's HU within bounds and add a smooth bias field (SynthSeg-style
            intensity randomisation, for training).
        arms: draw per case whether the arms are down beside the body (half the cases), in the
            field of view or cut by its edge, as in trauma and many outpatient scans.
        anatomy: ``"random"`` draws how far the liver's left lobe reaches across the body (0.8–1.7 × the
            older phantoms' lobe, which ends near the midline; real ones often reach the spleen).
        fissures: cut the liver's fat-filled fissures into it (the umbilical fissure, four cases in five;
            the ligamentum venosum's in front of the caudate lobe, three in five; 1.5–4 mm wide; the fat
            is not liver), as real livers have: without them every fat line a network meets is a liver's end;
            the tumors, placed inside the liver, may then fall elsewhere.
        diaphragm: line the body wall with the diaphragm's costal part (muscle 2.5–6 mm thick, 0–4 mm of
            fat outside it, from the dome down to the costal margin), as real scans show it between the
            liver and the ribs: without it the liver touches the wall's muscle and ribs, and a network
            learns to take the muscle there for liver.  The liver and its tumors then sit a little inward.
        stomach: draw the stomach as real ones vary (0.45–1 times as large; a small one lies further back,
            and the liver's left lobe, deeper, fills the front of the left upper abdomen in its place; half
            of them collapsed: all wall, soft tissue, no gas), as on real scans where the left lobe lies
            against a small stomach of nearly its own HU: without it the stomach always fills the front
            left with gas over fluid, and a network learns that the liver ends before it.
        beaver_tail: give six livers in ten the left lobe of many real upper-abdominal CTs: a thin plate
            (16–32 mm high) at the left lobe's top, under the heart, reaching further across, and from its end
            a lobe as thin back along the left ribs towards the spleen (the "beaver tail" liver, a common
            normal variant), draped over a stomach that lies 16–42 mm lower; without it every left lobe is a
            thick ellipsoid, and networks leave out the far part of a real one.
        metal: draw per case (one in four) a metal object — a spinal screw, surgical clips, an
            embolisation coil — with the dark and bright streaks it casts across the slices it is in.

    Every option off (the default) gives the phantoms of earlier versions bit for bit; each draws
    from a random stream of its own, so turning one on moves nothing else.

    Returns:
        ``(volume, labels)``: a :class:`Volume` in HU (air −1000, clipped to [−1024, 3071],
        whole numbers) with the geometry a DICOM series would give — LPS axial: i towards
        the patient's left, j posterior, k superior (RAS directions diag(−1, −1, 1)) and a
        non-zero origin — and a uint8 label map (0 background, 1 liver, 2 liver tumor).

    The anatomy is built on a grid finer than the output (2 × 2 sub-pixels for pixels over 1.2 mm;
    sub-slices of at most 1.25 mm or one sub-pixel, up to 5 per slice) and averaged over each output
    voxel, so thick slices show partial-volume effects.  A voxel is labelled tumor when at least half
    of it is tumor, else liver when at least half of it is liver (intrahepatic vessel branches included).
    """
    seed = check_seed(seed)
    nk, nj, ni = check_shape(shape, CT_DEFAULT_SHAPE, (1, 32, 32), "CT phantom")
    diameters = _check_options(tumors, tumor_diameter_mm, tumor_kinds, reconstruction)
    if tumor_margins and tumor_kinds != "mixed":
        raise TransferSegError("tumor_margins=True changes the tumors that tumor_kinds='mixed' draws; give both")
    phase_name = None if phase is None else _phase_of(seed, phase)
    rng = stream(seed, 0)
    scan = _ct_scan(rng, nk, nj, ni)
    _coverage(seed, coverage, scan, nk)
    grid, factors = _fine_grid(scan, nk, nj, ni)
    tables = _paint_body(seed, grid, rng, scan, anatomy, arms, phase_name, randomise, fissures, diaphragm, stomach,
                        beaver_tail)
    placed = _add_tumors(seed, grid, factors, scan, tables, tumors, tumor_kinds, diameters, phase_name,
                         tumor_margins)
    array = _voxel_intensities(seed, grid, factors, scan, tables, noise_sigma, reconstruction, randomise, metal)
    volume = Volume(array, spacing=scan.spacing, directions=np.diag([-1.0, -1.0, 1.0]), origin=scan.origin)
    labels = _labels(grid.cls, factors, placed)
    if with_tissues:  # the tissue at each output voxel's centre, every tumor as TUMOR0
        centres = tuple(slice(f // 2, None, f) for f in factors)
        return volume, labels, np.ascontiguousarray(np.minimum(grid.cls[centres], TUMOR0))
    return volume, labels


def _check_options(tumors, tumor_diameter_mm, tumor_kinds, reconstruction) -> tuple:
    """Refuse a wrong tumor count, diameter range, tumor kind or reconstruction; the diameters (low, high)."""
    if tumors is not None and (isinstance(tumors, bool) or int(tumors) != tumors or tumors < 0):
        raise TransferSegError(f"tumors must be a whole number ≥ 0 or None; got {tumors!r}")
    d_lo, d_hi = (float(v) for v in tumor_diameter_mm)
    if not 0 < d_lo <= d_hi:
        raise TransferSegError(f"tumor_diameter_mm must be (low, high) with 0 < low ≤ high; got {tumor_diameter_mm}")
    if tumor_kinds not in (None, "mixed"):
        raise TransferSegError(f"tumor_kinds must be None or 'mixed'; got {tumor_kinds!r}")
    if reconstruction not in (None, "random"):
        raise TransferSegError(f"reconstruction must be None or 'random'; got {reconstruction!r}")
    return d_lo, d_hi


def _fine_grid(scan, nk: int, nj: int, ni: int) -> tuple:
    """The grid the anatomy is painted on, and its sub-voxels per output voxel (k, j, i): 2 × 2 per pixel
    over 1.2 mm, sub-slices of at most 1.25 mm or one sub-pixel (up to 5)."""
    s_k, s_ip, origin = scan.spacing[0], scan.spacing[2], scan.origin
    ss_ip = 2 if s_ip > 1.2 else 1
    ss_k = int(np.clip(math.ceil(s_k / max(s_ip / ss_ip, 1.25) - 1e-6), 1, 5))
    sub_ip = (np.arange(ss_ip) + 0.5) / ss_ip - 0.5
    sub_k = (np.arange(ss_k) + 0.5) / ss_k - 0.5
    fi = (np.arange(ni)[:, None] + sub_ip[None, :]).ravel()
    fj = (np.arange(nj)[:, None] + sub_ip[None, :]).ravel()
    fk = (np.arange(nk)[:, None] + sub_k[None, :]).ravel()
    cx, cy, cz = scan.body_centre
    grid = FineGrid(*(np.asarray(c, dtype=np.float32) for c in (
        origin[0] - fi * s_ip - cx, origin[1] - fj * s_ip - cy, origin[2] + fk * s_k - cz)))
    return grid, (ss_k, ss_ip, ss_ip)


def _paint_body(seed: int, grid, rng, scan, anatomy, arms: bool, phase_name, randomise: bool,
                fissures: bool = False, diaphragm: bool = False, stomach: bool = False,
                beaver_tail: bool = False) -> tuple:
    """Paint the organs (and the arms), then set the tissues' HU for the phase; the tissue tables
    ``(hu, tex_fine, tex_coarse)``: HU and fine and coarse texture amplitude, indexed by tissue value."""
    if anatomy not in (None, "random"):
        raise TransferSegError(f"anatomy must be None or 'random'; got {anatomy!r}")
    left_lobe = 1.0 if anatomy is None else float(stream(seed, 12).uniform(0.8, 1.7))
    hu, tex_fine, tex_coarse = paint_anatomy(grid, rng, scan.a, scan.b, scan.fat, scan.muscle_w, scan.organ,
                                             scan.fov, scan.spacing[2], left_lobe=left_lobe,
                                             fissures=stream(seed, 17) if fissures else None,
                                             diaphragm=stream(seed, 18) if diaphragm else None,
                                             stomach=stream(seed, 20) if stomach else None,
                                             beaver_tail=stream(seed, 21) if beaver_tail else None)
    if arms:
        _paint_arms(grid, stream(seed, 10), scan)
    if phase_name is not None:  # after the anatomy's own draws, from a stream of its own: phase=None is unchanged
        _enhance(hu, phase_name, stream(seed, 3))
    if randomise:
        _randomise_intensities(seed, hu)
    return hu, tex_fine, tex_coarse


def _liver_table() -> np.ndarray:
    """1 for each liver tissue (intrahepatic vessels included), by tissue value."""
    is_liver = np.zeros(256, dtype=np.float32)
    is_liver[list(LIVER_TISSUE)] = 1.0
    return is_liver


def _add_tumors(seed: int, grid, factors, scan, tables, tumors, tumor_kinds, diameters, phase_name,
                margins: bool = False) -> int:
    """Draw how many tumors and of which kinds, and paint them (into ``grid`` and the tissue ``tables``),
    centred in the liver as the output grid sees it; how many fit."""
    hu, tex_fine, tex_coarse = tables
    d_lo, d_hi = diameters
    s_k, s_ip = scan.spacing[0], scan.spacing[2]
    trng = stream(seed, 1)
    n_tumors = int(trng.choice(6, p=[0.15, 0.25, 0.25, 0.15, 0.1, 0.1])) if tumors is None else int(tumors)
    kinds = None
    if tumor_kinds == "mixed":
        krng = stream(seed, 5)
        if tumors is None and krng.uniform() < 0.2:       # many small ones (miliary metastases)
            n_tumors = int(krng.integers(4, 11))
            d_hi = min(d_hi, max(d_lo, 15.0))
        kinds = [_draw_tumor(krng, phase_name or "non-contrast", float(hu[LIVER])) for _ in range(n_tumors)]
        if margins:  # from a stream of its own: without it the tumors are drawn as before
            mrng = stream(seed, 19)
            if tumors is None and mrng.uniform() < 0.2:       # a liver full of metastases
                extra = int(mrng.integers(6, 16))
                kinds += [_draw_tumor(mrng, phase_name or "non-contrast", float(hu[LIVER]), "metastasis")
                          for _ in range(extra)]
                n_tumors += extra
            for kind in kinds:
                _soften(mrng, kind, phase_name or "non-contrast", float(hu[LIVER]))
    liver_frac = block_mean(_liver_table()[grid.cls], factors)
    d_lo = max(d_lo, 1.5 * max(s_k, s_ip))
    d_hi = max(d_hi, d_lo)
    return _place_tumors(grid, factors, trng, n_tumors, liver_frac >= 0.5, (s_k, s_ip, s_ip), (d_lo, d_hi),
                         hu, tex_fine, tex_coarse, kinds)


def _voxel_intensities(seed: int, grid, factors, scan, tables, noise_sigma, reconstruction, randomise: bool,
                       metal: bool) -> np.ndarray:
    """Average each output voxel, add texture, the reconstruction's effects, metal and noise: HU as whole
    numbers in [−1024, 3071]."""
    hu, tex_fine, tex_coarse = tables
    s_k, s_ip = scan.spacing[0], scan.spacing[2]
    cls = grid.cls
    array = block_mean(hu[cls], factors)
    nrng = stream(seed, 2)
    array += block_mean(tex_fine[cls], factors) * unit_noise(nrng, array.shape, (0.4, 0.8, 0.8))
    array += block_mean(tex_coarse[cls], factors) * unit_noise(nrng, array.shape, (1.0, 6.0 / s_ip, 6.0 / s_ip))
    sigma = nrng.uniform(11.0, 20.0) if noise_sigma is None else float(noise_sigma)
    corr = nrng.uniform(0.6, 1.1)  # noise correlation length in pixels, in-plane only (per-slice reconstruction)
    if reconstruction == "random" or randomise:
        _reconstruct(seed, array, reconstruction == "random", randomise)
    if reconstruction == "random":   # kernels and doses: sharp and noisy to smooth and quiet
        drng = stream(seed, 9)
        corr = drng.uniform(0.5, 1.8)
        if noise_sigma is None:
            sigma = drng.uniform(6.0, 32.0)
    if metal:
        _metal_streaks(stream(seed, 11), array, (s_k, s_ip, s_ip))
    array += sigma * unit_noise(nrng, array.shape, (0.0, corr, corr))
    return np.clip(np.round(array), -1024, 3071).astype(np.float32)


def _labels(cls: np.ndarray, factors, placed: int) -> np.ndarray:
    """Tumor (2) where at least half a voxel is tumor or rim, else liver (1) where at least half is liver
    (its tumors included), else 0."""
    is_liver = _liver_table()
    is_tumor = np.zeros(256, dtype=np.float32)
    for first in (TUMOR0, RIM0, HALO0):
        is_tumor[first:first + placed] = 1.0
        is_liver[first:first + placed] = 1.0
    tumor_frac = block_mean(is_tumor[cls], factors)
    liver_frac = block_mean(is_liver[cls], factors)
    return np.where(tumor_frac >= 0.5, 2, np.where(liver_frac >= 0.5, 1, 0)).astype(np.uint8)


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
        rot = random_rotation(rng, 180.0)
        kind = None if kinds is None else kinds[n]
        if kind is not None and kind["elongation"] != 0.1:   # cysts: rounder, smoother
            axes = np.exp(np.log(axes) * kind["elongation"] / 0.1)
        waves = Waves(rng, 5, (diameter, 3.0 * diameter), 0.06 if kind is None else kind["waves"])
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
                shape = ellipsoid(centre, r * axes, rot, waves)
                if kind is not None and grid.fraction(*shape, (LIVER_PORTAL, LIVER_HEPATIC, VEIN, PORTAL)) > 0.05:
                    continue
                cls = TUMOR0 + placed
                grid.paint(cls, *shape, into=LIVER_TISSUE)
                if kind is None:
                    hu[cls] = liver_hu + sign * contrast
                    tex_f[cls], tex_c[cls] = 5.0, 3.0
                else:
                    hu[cls] = kind["hu"]
                    tex_f[cls], tex_c[cls] = kind["texture"]
                    if kind["rim"] is not None:       # an enhancing rim around the core
                        rim_hu, width = kind["rim"]
                        shells = [(RIM0 + placed, rim_hu, width, (5.0, 2.0))]
                    elif kind.get("halo"):            # outer shell, inner shell, core: a margin fading outwards
                        (outer_hu, outer), (inner_hu, inner) = kind["halo"]
                        shells = [(HALO0 + placed, outer_hu, outer, kind["texture"]),
                                  (RIM0 + placed, inner_hu, inner, kind["texture"])]
                    else:
                        shells = []
                    # The whole tumor is the outermost shell first, then each shell and the core inside the last.
                    outside, scale = cls, 1.0
                    for shell, shell_hu, width, texture in shells:
                        grid.paint(shell, *ellipsoid(centre, r * axes * scale, rot, waves), into=(outside,))
                        hu[shell] = shell_hu
                        tex_f[shell], tex_c[shell] = texture
                        outside, scale = shell, scale - width
                    if shells:
                        grid.paint(cls, *ellipsoid(centre, r * axes * scale, rot, waves), into=(outside,))
                centres.append((centre, r))
                placed += 1
                break
    return placed
