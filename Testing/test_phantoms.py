"""Tests for TransferSegLib.phantoms: determinism, realism of the CT and DBT phantoms, the ACS shapes.

Each property is measured from the generated data itself (HU statistics, label geometry,
power spectra, voxel counts against closed-form volumes), so a generator that drifts from
the specification fails here.
"""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from TransferSegLib import phantoms
from TransferSegLib.io import load_volume
from TransferSegLib.phantoms import common as phantom_common
from TransferSegLib.phantoms import ct as phantom_ct
from TransferSegLib.phantoms import dbt as phantom_dbt
from TransferSegLib.phantoms import tissues as phantom_tissues
from TransferSegLib.volume import TransferSegError, orientation_name

CT_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def ct_cases():
    """Three default-size CT phantoms with four tumors each, and their tissue maps."""
    return {seed: phantoms.ct_phantom(seed, tumors=4, with_tissues=True) for seed in CT_SEEDS}


def _ras_centroid(volume, mask):
    return volume.ijk_to_ras_points(np.argwhere(mask).mean(axis=0)[None])[0]


def _best_interval_dice(values, target, lo=-300, hi=400, step=5):
    """Best Dice of any single intensity interval [a, b) against ``target`` (exhaustive on a grid)."""
    bins = np.arange(lo, hi + step, step)
    hit, _ = np.histogram(values[target], bins)
    total, _ = np.histogram(values, bins)
    cum_hit = np.concatenate([[0], np.cumsum(hit)])
    cum_all = np.concatenate([[0], np.cumsum(total)])
    inside = cum_hit[None, :] - cum_hit[:, None]            # [a, b) for a < b
    selected = cum_all[None, :] - cum_all[:, None]
    dice = 2.0 * inside / (target.sum() + selected)
    return float(np.where(np.triu(np.ones_like(dice), 1) > 0, dice, 0.0).max())


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("make", [
    lambda seed: phantoms.ct_phantom(seed, (12, 64, 64)),
    lambda seed: phantoms.dbt_phantom(seed, (12, 96, 64)),
], ids=["ct", "dbt"])
def test_volume_phantoms_repeat_for_a_seed_and_differ_between_seeds(make):
    (a, extra_a), (b, extra_b), (c, _) = make(5), make(5), make(6)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing == b.spacing
    np.testing.assert_array_equal(a.origin, b.origin)
    np.testing.assert_array_equal(a.directions, b.directions)
    if isinstance(extra_a, np.ndarray):
        np.testing.assert_array_equal(extra_a, extra_b)
    else:
        assert extra_a == extra_b
    assert not np.array_equal(a.array, c.array)
    assert not np.array_equal(a.origin, c.origin)


@pytest.mark.parametrize("make", [phantoms.shapes_2d, phantoms.shapes_3d], ids=["2d", "3d"])
def test_shapes_repeat_for_a_seed_and_differ_between_seeds(make):
    images, labels = make(3, 4, size=32)
    again_images, again_labels = make(3, 4, size=32)
    other_images, other_labels = make(4, 4, size=32)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)
    assert not np.array_equal(labels, other_labels)


def test_generators_draw_no_global_random_state():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    phantoms.ct_phantom(1, (8, 48, 48))
    phantoms.dbt_phantom(1, (8, 64, 64))
    phantoms.shapes_3d(1, 1, size=24)
    assert np.random.random() == before


# --------------------------------------------------------------------------- CT
def test_ct_geometry_is_an_lps_axial_ct_with_a_real_origin(ct_cases):
    for volume, labels, _ in ct_cases.values():
        assert volume.shape == phantoms.CT_DEFAULT_SHAPE
        assert orientation_name(volume.directions) == "LPS axial"
        assert np.all(np.abs(volume.origin) > 1.0)
        assert labels.dtype == np.uint8 and labels.shape == volume.shape
        a = volume.array
        assert a.min() >= -1024 and a.max() <= 3071
        assert np.all(a == np.round(a))                       # whole HU, as stored by a scanner
        assert abs(np.median(a[:, :3, :]) + 1000) <= 25      # air in front of the patient


def test_ct_spacing_is_clinical_at_clinical_matrix_sizes():
    for seed in range(40):
        for nk in (40, 64, 200):
            scan = phantom_ct._ct_scan(np.random.default_rng([seed, 0]), nk, 512, 512)
            s_k, s_j, s_i = scan.spacing
            assert 0.6 <= s_i == s_j <= 1.0
            assert 1.0 <= s_k <= 5.0
    volume, labels = phantoms.ct_phantom(7, (6, 512, 512), tumors=0)
    assert volume.spacing == phantom_ct._ct_scan(np.random.default_rng([7, 0]), 6, 512, 512).spacing
    assert 0.6 <= volume.spacing[2] <= 1.0 and 1.0 <= volume.spacing[0] <= 5.0
    assert volume.spacing[0] > 2 * volume.spacing[2]                  # anisotropic: thick slices
    assert np.count_nonzero(labels == 1) > 10_000                     # a few slices through the liver


def test_ct_anatomy_lies_where_it_does_in_a_patient(ct_cases):
    for volume, labels, tissues in ct_cases.values():
        body = ~np.isin(tissues, [phantom_tissues.AIR, phantom_tissues.TABLE_SHELL, phantom_tissues.TABLE_FOAM])
        r_body, a_body, _ = _ras_centroid(volume, body)
        r_liver, _, _ = _ras_centroid(volume, labels > 0)
        r_spleen, _, _ = _ras_centroid(volume, tissues == phantom_tissues.SPLEEN)
        _, a_canal, _ = _ras_centroid(volume, tissues == phantom_tissues.CSF)
        body_a = volume.ijk_to_ras_points(np.argwhere(body))[:, 1]
        assert r_liver > r_body + 20          # liver in the patient's right upper abdomen
        assert r_spleen < r_body - 40         # spleen on the left
        assert a_canal < a_body - 25          # spine at the back: its canal in the posterior third
        assert (a_canal - body_a.min()) / np.ptp(body_a) < 0.36
        kidney_r = volume.ijk_to_ras_points(np.argwhere(tissues == phantom_tissues.KIDNEY_CORTEX))[:, 0]
        assert (kidney_r > r_body + 30).sum() > 20 and (kidney_r < r_body - 30).sum() > 20   # one each side
        ribs = tissues == phantom_tissues.BONE_CORTEX
        rib_r = volume.ijk_to_ras_points(np.argwhere(ribs))[:, 0]
        assert (np.abs(rib_r - r_body) > 100).sum() > 50      # ribs far lateral, not only the spine


def test_ct_liver_hu_and_the_organs_that_overlap_it(ct_cases):
    for volume, labels, tissues in ct_cases.values():
        a = volume.array
        liver = labels == 1
        p10, median, p90 = np.percentile(a[liver], [10, 50, 90])
        assert 50 <= median <= 70
        for organ in (phantom_tissues.SPLEEN, phantom_tissues.KIDNEY_CORTEX, phantom_tissues.MUSCLE):
            core = ndimage.binary_erosion(tissues == organ)
            assert core.sum() > 30
            assert p10 <= np.median(a[core]) <= p90, phantoms.CT_TISSUE_NAMES[organ]


def test_ct_noise_sigma_measured_in_the_liver_is_10_to_25_hu(ct_cases):
    for volume, labels, _ in ct_cases.values():
        core = ndimage.binary_erosion(labels == 1, iterations=1)
        values = volume.array[core]
        sigma = 1.4826 * np.median(np.abs(values - np.median(values)))   # robust to vessels
        assert 10 <= sigma <= 25
    volume, labels = phantoms.ct_phantom(0, tumors=4, noise_sigma=0.0)
    core = ndimage.binary_erosion(labels == 1, iterations=1)
    quiet = 1.4826 * np.median(np.abs(volume.array[core] - np.median(volume.array[core])))
    assert quiet < 8                          # the spread above is noise, not built-in texture
    # the noise is correlated in-plane (Gaussian-filtered), not white
    noisy = ct_cases[0][0].array - volume.array
    lag0 = np.mean(noisy[:, :, :-1] * noisy[:, :, :-1])
    lag1 = np.mean(noisy[:, :, :-1] * noisy[:, :, 1:])
    assert lag1 / lag0 > 0.2


def test_ct_tumors_lie_inside_the_liver_and_have_low_contrast_and_realistic_size(ct_cases):
    measured = 0
    for seed, (volume, labels, _) in ct_cases.items():
        assert set(np.unique(labels)) == {0, 1, 2}
        # tumors and noise come from their own random streams: without tumors the liver is the same
        _, without = phantoms.ct_phantom(seed, tumors=0)
        assert not np.any(without == 2)
        np.testing.assert_array_equal(labels > 0, without > 0)
        assert np.all(without[labels == 2] == 1)
        a = volume.array
        liver_mean = a[labels == 1].mean()
        components, n = ndimage.label(labels == 2)
        assert n >= 2
        voxel_mm3 = float(np.prod(volume.spacing))
        for c in range(1, n + 1):
            tumor = components == c
            diameter = (6.0 * tumor.sum() * voxel_mm3 / math.pi) ** (1 / 3)   # equal-volume sphere
            assert 4.0 <= diameter <= 40.0 + max(volume.spacing)
            core = ndimage.binary_erosion(tumor, structure=np.ones((1, 3, 3)))
            if core.sum() >= 30:                                            # enough voxels to beat the noise
                contrast = a[core].mean() - liver_mean
                assert 10.0 <= abs(contrast) <= 40.0
                measured += 1
    assert measured >= 3


def test_ct_thick_slices_average_the_anatomy():
    for seed in (0, 1):
        volume, _, tissues = phantoms.ct_phantom(seed, tumors=0, noise_sigma=0.0, with_tissues=True)
        # voxels centred in the diaphragm or liver right under the lung (in-plane well inside it):
        # a thick slice also holds some of the lung above, so they read far below soft tissue
        lung_inside = ndimage.binary_erosion(tissues == phantom_tissues.LUNG, structure=np.ones((1, 5, 5)))
        under_lung = np.zeros_like(lung_inside)
        under_lung[:-1] = lung_inside[1:] & np.isin(tissues[:-1], [phantom_tissues.MUSCLE, phantom_tissues.LIVER])
        assert under_lung.sum() > 50
        assert np.median(volume.array[under_lung]) < -100


def test_ct_a_single_hu_interval_does_not_segment_the_liver(ct_cases):
    for volume, labels, _ in ct_cases.values():
        assert _best_interval_dice(volume.array, labels == 1) < 0.85


@pytest.mark.parametrize("phase", list(phantoms.CT_PHASES))
def test_ct_contrast_phases_enhance_the_liver_and_vessels_together(phase):
    """The liver's own HU (median of its parenchyma, noise included) and the aorta's follow the phase."""
    ranges = phantoms.CT_PHASES[phase]
    for seed in (11, 12):
        volume, labels, tissues = phantoms.ct_phantom(seed, shape=(24, 128, 128), phase=phase, with_tissues=True)
        liver = np.median(volume.array[(tissues == phantom_tissues.LIVER) & (labels == 1)])
        aorta = np.median(volume.array[tissues == phantom_tissues.AORTA])
        low, high = ranges[phantom_tissues.LIVER]
        assert low - 8 <= liver <= high + 8, (phase, seed, liver)  # a median of noisy, partial-volume voxels
        low, high = ranges[phantom_tissues.AORTA]
        assert low - 15 <= aorta <= high + 15, (phase, seed, aorta)


def test_ct_phase_random_is_one_phase_per_seed_and_a_bad_phase_is_refused():
    first = phantoms.ct_phantom(21, shape=(12, 64, 64), phase="random")[0].array
    assert np.array_equal(first, phantoms.ct_phantom(21, shape=(12, 64, 64), phase="random")[0].array)
    drawn = {phantom_ct._phase_of(seed, "random") for seed in range(40)}
    assert drawn == set(phantoms.CT_PHASES)
    with pytest.raises(TransferSegError, match="phase must be one of non-contrast, arterial, portal, delayed"):
        phantoms.ct_phantom(1, shape=(12, 64, 64), phase="venous")


def test_ct_phase_none_leaves_the_unenhanced_liver_of_the_older_phantoms():
    volume, labels, tissues = phantoms.ct_phantom(11, shape=(24, 128, 128), with_tissues=True)
    assert 45 <= np.median(volume.array[(tissues == phantom_tissues.LIVER) & (labels == 1)]) <= 72


REAL = {"phase": "random", "tumor_kinds": "mixed", "coverage": "random", "reconstruction": "random", "randomise": True}


def test_ct_coverage_liver_and_the_options_off_are_the_default_phantom_bit_for_bit():
    """Each realism option draws from a stream of its own: off, or at its default value, nothing moves."""
    volume, labels = phantoms.ct_phantom(5, shape=(16, 64, 64))
    same, same_labels = phantoms.ct_phantom(5, shape=(16, 64, 64), coverage="liver", tumor_kinds=None,
                                            reconstruction=None, randomise=False)
    assert np.array_equal(volume.array, same.array) and np.array_equal(labels, same_labels)
    assert volume.spacing == same.spacing


@pytest.mark.parametrize("option", [{"reconstruction": "random"}, {"randomise": True}])
def test_ct_reconstruction_and_intensity_randomisation_change_the_image_not_the_labels(option):
    for seed in (3, 4):
        plain, labels = phantoms.ct_phantom(seed, shape=(16, 96, 96), phase="portal")
        varied, varied_labels = phantoms.ct_phantom(seed, shape=(16, 96, 96), phase="portal", **option)
        assert np.array_equal(labels, varied_labels) and varied.spacing == plain.spacing
        difference = np.abs(varied.array - plain.array)[labels == 1]
        assert difference.mean() > 2.0, (seed, option)
        # within the bounds: kernel, dose and per-tissue shifts keep a liver a liver
        assert abs(np.median(varied.array[labels == 1]) - np.median(plain.array[labels == 1])) <= 30.0


def test_ct_reconstruction_random_spans_smooth_quiet_and_sharp_noisy_scans():
    """The noise (the scan less the same scan without noise) varies ≥ 2× from seed to seed, within 5–35 HU."""
    spreads = []
    for seed in range(8):
        noisy = phantoms.ct_phantom(seed, shape=(12, 96, 96), reconstruction="random")[0].array
        quiet = phantoms.ct_phantom(seed, shape=(12, 96, 96), reconstruction="random", noise_sigma=0.0)[0].array
        body = quiet > -500
        spreads.append(float(np.std((noisy - quiet)[body])))
    assert max(spreads) > 2.0 * min(spreads), spreads
    assert 5.0 <= min(spreads) and max(spreads) <= 35.0, spreads


def test_ct_coverage_chest_to_abdomen_reaches_above_the_liver_into_the_lungs():
    for seed in range(30):
        if phantom_common.stream(seed, 7).choice(3, p=[0.4, 0.3, 0.3]) == 2:
            break
    volume, labels, tissues = phantoms.ct_phantom(seed, shape=(60, 96, 96), coverage="random", with_tissues=True)
    liver_slices = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    assert volume.spacing[0] * volume.shape[0] >= 190.0
    above = volume.shape[0] - 1 - liver_slices.max()          # k runs superior
    assert above * volume.spacing[0] >= 40.0, (seed, above, volume.spacing)
    assert (tissues[liver_slices.max() + 1:] == phantom_tissues.LUNG).mean() > 0.1
    refusal = "coverage must be one of liver, abdomen, chest-abdomen, chest or random"
    with pytest.raises(TransferSegError, match=refusal):
        phantoms.ct_phantom(1, shape=(12, 64, 64), coverage="head")


def test_ct_coverage_random_draws_what_it_drew_before_the_chest_was_added():
    """'chest' has share 0 and comes last: for every seed, "random" moves the scan as the three older
    coverages did (recomputed here from their shares and ranges), and never to the chest."""
    before = {"liver": None, "abdomen": ((-5.0, 40.0), (-260.0, -200.0)),
              "chest-abdomen": ((70.0, 160.0), (-250.0, -120.0))}
    weights = np.array([0.4, 0.3, 0.3])
    drawn = set()
    for seed in range(200):
        scan = SimpleNamespace(spacing=(4.5, 0.8, 0.8), origin=np.array([100.0, 90.0, -300.0]),
                               body_centre=(3.0, -8.0, -1.0))
        phantom_ct._coverage(seed, "random", scan, 40)
        rng = phantom_common.stream(seed, 7)
        name = list(before)[int(rng.choice(3, p=weights / weights.sum()))]
        drawn.add(name)
        s_k, centre_z = 4.5, -1.0
        if before[name] is not None:
            top, bottom = (rng.uniform(*r) for r in before[name])
            s_k = float(np.clip((top - bottom) / 40, 1.0, 5.0))
            centre_z = -300.0 + 39 * s_k - top
        assert scan.spacing == (s_k, 0.8, 0.8) and scan.body_centre == (3.0, -8.0, centre_z), (seed, name)
    assert drawn == set(before)


def test_ct_coverage_chest_is_the_lower_chest_in_hu_without_a_liver():
    for seed in (0, 3):
        volume, labels, tissues = phantoms.ct_phantom(seed, shape=(24, 128, 128), coverage="chest", phase="random",
                                                      tumor_kinds="mixed", anatomy="random", with_tissues=True)
        assert not labels.any() and not np.isin(tissues, phantom_tissues.LIVER_TISSUE).any()
        assert orientation_name(volume.directions) == "LPS axial"
        array = volume.array
        lung = ndimage.binary_erosion(tissues == phantom_tissues.LUNG, np.ones((1, 3, 3)))
        assert lung.mean() > 0.1 and -900 <= np.median(array[lung]) <= -780, seed
        assert np.median(array[tissues == phantom_tissues.AIR]) < -900
        heart = np.isin(tissues, [phantom_tissues.MYOCARDIUM, phantom_tissues.BLOOD])
        muscle = ndimage.binary_erosion(tissues == phantom_tissues.MYOCARDIUM, np.ones((1, 3, 3)))
        assert heart.any(axis=(1, 2)).mean() > 0.3 and 30 <= np.median(array[muscle]) <= 100, seed   # liver-like HU
        assert (array > 500).mean() > 0.002                                                 # the spine


@pytest.mark.parametrize("phase", ["arterial", "portal"])
def test_ct_tumor_kinds_look_as_they_should_in_each_phase(phase):
    """Drawn kinds: cysts near water, metastases hypodense, hyperenhancing tumors bright only when arterial."""
    rng = np.random.default_rng(0)
    liver = 115.0 if phase == "portal" else 78.0
    drawn = [phantom_ct._draw_tumor(rng, phase, liver) for _ in range(400)]
    kinds = {d["kind"] for d in drawn}
    assert kinds == set(phantoms.TUMOR_KINDS)
    for d in drawn:
        if d["kind"] == "cyst":
            assert 0.0 <= d["hu"] <= 20.0 and d["rim"] is None
        elif d["kind"] == "metastasis":
            assert d["hu"] <= liver - 25.0
        elif d["kind"] == "hyperenhancing":
            assert (d["hu"] >= liver + 30.0) if phase == "arterial" else (d["hu"] <= liver - 6.0)
    assert any(d["rim"] is not None for d in drawn if d["kind"] == "metastasis")


def test_ct_mixed_tumors_are_visible_labelled_and_kept_off_the_large_vessels():
    """Every tumor component differs from its liver; where tumors sit, the same anatomy without them has
    (almost) no intrahepatic vessel: tumors are placed off the portal and hepatic veins."""
    vessels = (phantom_tissues.LIVER_PORTAL, phantom_tissues.LIVER_HEPATIC, phantom_tissues.VEIN, phantom_tissues.PORTAL)
    checked = 0
    for seed in (40, 41, 42):
        volume, labels = phantoms.ct_phantom(seed, shape=(40, 160, 160), tumors=4, phase="portal", tumor_kinds="mixed")
        _, _, tissues = phantoms.ct_phantom(seed, shape=(40, 160, 160), tumors=0, phase="portal", with_tissues=True)
        components, n = ndimage.label(labels == 2)
        assert n >= 2, seed
        liver = np.median(volume.array[ndimage.binary_erosion(labels == 1, iterations=2)])
        for c in range(1, n + 1):
            inside = components == c
            if inside.sum() < 20:
                continue
            assert abs(np.median(volume.array[inside]) - liver) >= 5.0, (seed, c)
            assert np.isin(tissues[inside], vessels).mean() <= 0.12, (seed, c)
            checked += 1
    assert checked >= 6
    with pytest.raises(TransferSegError, match="tumor_kinds must be None or 'mixed'"):
        phantoms.ct_phantom(1, shape=(12, 64, 64), tumor_kinds="real")


def test_ct_arms_and_metal_change_the_image_where_they_should_and_never_the_labels():
    """Arms lie outside the trunk (more body at the sides); metal is ≥ 2,000 HU with streaks around it."""
    arms_seed = next(s for s in range(40) if phantom_common.stream(s, 10).uniform() < 0.5)
    metal_seed = next(s for s in range(40) if phantom_common.stream(s, 11).uniform() < 0.25)
    for seed, option in ((arms_seed, "arms"), (metal_seed, "metal")):
        plain, labels = phantoms.ct_phantom(seed, shape=(24, 128, 128))
        varied, varied_labels = phantoms.ct_phantom(seed, shape=(24, 128, 128), **{option: True})
        assert np.array_equal(labels, varied_labels), option
        changed = plain.array != varied.array
        if option == "arms":
            body_plain, body_arms = plain.array > -300, varied.array > -300
            assert body_arms.sum() > 1.05 * body_plain.sum() and body_plain[changed].mean() < 0.1
        else:
            assert (varied.array >= 2000).any() and not (plain.array >= 2000).any()
            slices = np.flatnonzero((varied.array >= 2000).any(axis=(1, 2)))
            assert changed[slices].mean() > 0.1 and not changed[np.setdiff1d(np.arange(24), slices)].any()


def test_ct_anatomy_random_reaches_the_left_lobe_further_across_the_body():
    """With a left-lobe factor over 1 the liver reaches further to the patient's left (i grows to the left)."""
    seed = next(s for s in range(40) if phantom_common.stream(s, 12).uniform(0.8, 1.7) > 1.4)
    _, plain = phantoms.ct_phantom(seed, shape=(30, 128, 128), tumors=0)
    _, varied = phantoms.ct_phantom(seed, shape=(30, 128, 128), tumors=0, anatomy="random")
    leftmost = lambda labels: np.flatnonzero((labels > 0).any(axis=(0, 1))).max()  # noqa: E731
    assert leftmost(varied) >= leftmost(plain) + 3 and (varied > 0).sum() > (plain > 0).sum()
    with pytest.raises(TransferSegError, match="anatomy must be None or 'random'"):
        phantoms.ct_phantom(1, shape=(12, 64, 64), anatomy="big")


def test_ct_fissures_cut_fat_clefts_into_the_liver_and_change_nothing_else():
    """fissures=True turns thin liver voxels into visceral fat (never labelled liver), at fat's HU; away from
    the clefts the case is the same voxel for voxel (no tumors: their placement follows the liver)."""
    cut_cases = 0
    for seed in (2003, 2011):
        plain, plain_labels = phantoms.ct_phantom(seed, shape=(40, 256, 256), tumors=0, phase="portal")
        cut, labels, tissues = phantoms.ct_phantom(seed, shape=(40, 256, 256), tumors=0, phase="portal",
                                                   fissures=True, with_tissues=True)
        removed = (plain_labels > 0) & (labels == 0)
        assert not ((labels > 0) & (plain_labels == 0)).any(), seed       # only ever less liver
        near = ndimage.binary_dilation((plain_labels > 0) != (labels > 0), iterations=3)
        assert np.array_equal(plain.array[~near], cut.array[~near]), seed
        if removed.any():
            cut_cases += 1
            clefts = removed & (tissues == phantom_tissues.FAT_VISC)
            assert clefts.sum() > 0.5 * removed.sum(), seed
            # a cleft of fat, 1.5-4 mm wide, in a portal-venous liver of 100-130 HU
            assert np.median(cut.array[clefts]) < np.median(cut.array[labels == 1]) - 40, seed
            assert removed.sum() < 0.02 * (plain_labels > 0).sum(), seed   # clefts, not lobes
    assert cut_cases == 2


def test_ct_diaphragm_lines_the_wall_with_muscle_between_liver_and_ribs_and_changes_nothing_else():
    """diaphragm=True turns what lies just inside the body wall (visceral fat, and the liver and spleen
    painted after it) into muscle, at muscle's HU, on the liver's slices; nothing else moves (no tumors)."""
    for seed in (2003, 2011):
        plain, plain_labels, plain_tissues = phantoms.ct_phantom(seed, shape=(40, 128, 128), tumors=0,
                                                                 phase="portal", with_tissues=True)
        lined, labels, tissues = phantoms.ct_phantom(seed, shape=(40, 128, 128), tumors=0, phase="portal",
                                                     diaphragm=True, with_tissues=True)
        assert not ((labels > 0) & (plain_labels == 0)).any(), seed       # only ever less liver
        changed = tissues != plain_tissues
        wall = [getattr(phantom_tissues, name) for name in ("AIR", "SKIN", "FAT_SC", "BONE_CORTEX", "BONE_MARROW",
                                                            "CARTILAGE", "LUNG", "MUSCLE")]
        assert not np.isin(plain_tissues[changed], wall).any(), seed       # the wall and the chest are kept
        sheet = changed & (tissues == phantom_tissues.MUSCLE)
        assert sheet.sum() == changed.sum() and sheet.sum() > 200, seed
        near = ndimage.binary_dilation(changed | ((plain_labels > 0) != (labels > 0)), iterations=3)
        assert np.array_equal(plain.array[~near], lined.array[~near]), seed
        # a portal-venous liver (100-130 HU) against muscle (40-60 HU): the sheet reads as muscle
        assert np.median(lined.array[sheet]) < np.median(lined.array[labels == 1]) - 30, seed
        # on the liver's slices, the sheet lies outside the liver, between it and the wall
        liver_slices = np.nonzero(labels.any(axis=(1, 2)))[0]
        assert sheet[liver_slices].sum() > 0.5 * sheet.sum(), seed
        assert (sheet & (labels > 0)).sum() < 0.05 * sheet.sum(), seed   # (labels: half a voxel; tissues: its centre)


def test_ct_tumor_margins_fade_metastases_into_the_liver_and_keep_the_liver():
    """tumor_margins=True (with the mixed kinds): a metastasis gets two shells between its core and the
    liver, in that order of HU; cysts and rimmed tumors are kept; the liver's outline (labels 1 ∪ 2) does
    not move; one liver in five holds many more tumors."""
    from TransferSegLib.phantoms import ct as ct_module

    rng = np.random.default_rng(0)
    softened = 0
    for _ in range(40):
        tumor = ct_module._draw_tumor(rng, "portal", 110.0, "metastasis")
        before = dict(tumor)
        ct_module._soften(rng, tumor, "portal", 110.0)
        if before["rim"] is not None:
            assert "halo" not in tumor
        elif "halo" in tumor:
            softened += 1
            (outer_hu, outer), (inner_hu, inner) = tumor["halo"]
            assert tumor["hu"] < inner_hu < outer_hu < 110.0 and 0.25 <= outer + inner <= 0.6
    assert 10 <= softened <= 35
    cyst = ct_module._draw_tumor(rng, "portal", 110.0, "cyst")
    ct_module._soften(rng, cyst, "portal", 110.0)
    assert "halo" not in cyst
    with pytest.raises(TransferSegError, match="tumor_kinds"):
        phantoms.ct_phantom(0, tumor_margins=True)
    more = 0
    for seed in range(3000, 3012):
        _, plain = phantoms.ct_phantom(seed, shape=(24, 64, 64), tumor_kinds="mixed", phase="portal")
        _, soft = phantoms.ct_phantom(seed, shape=(24, 64, 64), tumor_kinds="mixed", phase="portal",
                                      tumor_margins=True)
        assert np.array_equal(plain > 0, soft > 0), seed
        count = [ndimage.label(labels == 2)[1] for labels in (plain, soft)]
        more += count[1] >= count[0] + 4
    assert more >= 1


def test_ct_realistic_options_still_label_every_tumor_inside_the_liver():
    for seed in (7, 8):
        _, labels = phantoms.ct_phantom(seed, shape=(30, 96, 96), tumors=3, **REAL)
        tumor = labels == 2
        grown = ndimage.binary_dilation(labels > 0, iterations=1)
        assert tumor.any() and grown[tumor].all()


def test_ct_rejects_bad_arguments():
    with pytest.raises(TransferSegError, match="shape"):
        phantoms.ct_phantom(0, (10, 8, 8))
    with pytest.raises(TransferSegError, match="tumors"):
        phantoms.ct_phantom(0, tumors=-1)
    with pytest.raises(TransferSegError, match="seed"):
        phantoms.ct_phantom(-3)


# --------------------------------------------------------------------------- DBT
def test_dbt_geometry_intensities_and_box_records():
    volume, boxes = phantoms.dbt_phantom(1)
    assert volume.shape == phantoms.DBT_DEFAULT_SHAPE
    s_k, s_j, s_i = volume.spacing
    assert s_j == s_i < s_k / 2                      # much finer in-plane than between slices
    assert orientation_name(volume.directions).endswith("axial")   # slices are the high-resolution plane
    assert volume.array.min() >= 0.0 and volume.array.max() <= 1.0
    assert volume.array[:, :, -3:].mean() < 0.05     # air beyond the nipple
    assert boxes and {b["kind"] for b in boxes} <= {"mass", "calcification_cluster"}
    for box in boxes:
        k0, j0, i0, k1, j1, i1 = box["box_kji"]
        assert 0 <= k0 < k1 <= volume.shape[0] and 0 <= j0 < j1 <= volume.shape[1] and 0 <= i0 < i1 <= volume.shape[2]
        centre = np.array(box["center_kji"])
        assert np.all(centre >= np.array([k0, j0, i0]) - 1) and np.all(centre <= np.array([k1, j1, i1]))
        ras = volume.ijk_to_ras_points(centre[None])[0]
        lo, hi = np.array(box["box_ras_mm"][:3]), np.array(box["box_ras_mm"][3:])
        assert np.all(lo - 1e-6 <= ras) and np.all(ras <= hi + 1e-6)
    json.dumps(boxes)                                  # plain JSON types only


@pytest.mark.parametrize("kind, arguments", [
    ("mass", {"masses": 1, "calcification_clusters": 0}),
    ("calcification_cluster", {"masses": 0, "calcification_clusters": 1}),
])
def test_dbt_boxes_contain_their_lesion(kind, arguments):
    for seed in (2, 3):
        with_lesion, boxes = phantoms.dbt_phantom(seed, **arguments)
        without, none = phantoms.dbt_phantom(seed, masses=0, calcification_clusters=0)
        assert none == [] and [b["kind"] for b in boxes] == [kind]
        k0, j0, i0, k1, j1, i1 = boxes[0]["box_kji"]
        difference = np.abs(with_lesion.array - without.array)    # background and noise are identical
        strong = difference >= 0.5 * difference.max()
        inside = np.zeros_like(strong)
        inside[k0:k1, j0:j1, i0:i1] = True
        assert strong.any() and not np.any(strong & ~inside)
        # the lesion fills its box rather than sitting in a corner of a huge one
        assert difference[k0:k1, j0:j1, i0:i1].sum() > 0.5 * difference.sum()


def test_dbt_mass_diameter_range_draws_small_masses_and_leaves_the_rest_alone():
    small = [b for seed in range(4) for b in phantoms.dbt_phantom(seed, masses=3, mass_diameter_mm=(5, 7))[1]
             if b["kind"] == "mass"]
    assert len(small) == 12 and all(5.0 <= b["size_mm"] <= 7.0 for b in small)
    default = [b for seed in range(4) for b in phantoms.dbt_phantom(seed, masses=3)[1] if b["kind"] == "mass"]
    assert max(b["size_mm"] for b in default) > 9.0  # the default range is wider
    # the default range, spelt out, is the default: every seed draws what it drew before
    a, boxes_a = phantoms.dbt_phantom(5, masses=2)
    b, boxes_b = phantoms.dbt_phantom(5, masses=2, mass_diameter_mm=(5.0, 20.0))
    assert np.array_equal(a.array, b.array) and boxes_a == boxes_b
    assert [box["size_mm"] for box in boxes_a] == [9.82, 16.7]  # as drawn before the option existed
    # no masses: nothing else depends on the range
    assert np.array_equal(phantoms.dbt_phantom(6, masses=0)[0].array,
                          phantoms.dbt_phantom(6, masses=0, mass_diameter_mm=(5, 6))[0].array)
    for bad in ((8, 5), (0, 5), "big", (5,)):
        with pytest.raises(TransferSegError, match="mass_diameter_mm"):
            phantoms.dbt_phantom(0, mass_diameter_mm=bad)


def test_dbt_out_of_plane_blur_smears_along_the_sweep():
    point = np.zeros((21, 41, 41), dtype=np.float32)
    point[10, 20, 20] = 1.0
    blurred = phantom_dbt._tomosynthesis_blur(point, slice_mm=1.0, pixel_mm=0.1, sweep_deg=7.5)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-5)                  # no signal made or lost
    peaks = [blurred[10 + d].max() for d in range(0, 9)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))                   # weaker further from focus
    assert blurred[10, 20, 20] > 0.4                                      # the in-focus plane dominates
    for d in (2, 4, 8):
        ghost = blurred[10 + d]
        rows, cols = np.nonzero(ghost > 0)
        expected = 2 * d * 1.0 * math.tan(math.radians(7.5)) / 0.1        # the tube's sweep seen from d mm away
        assert abs((np.ptp(rows) + 1) - expected) <= 1.5                  # a line along j ...
        assert np.ptp(cols) == 0                                           # ... and none across it
        np.testing.assert_allclose(ghost, blurred[10 - d])                # symmetric above and below
    # in a phantom: a calcification leaks into neighbouring slices, weaker than in focus
    with_calc, _ = phantoms.dbt_phantom(4, masses=0, calcification_clusters=1)
    without, _ = phantoms.dbt_phantom(4, masses=0, calcification_clusters=0)
    diff = np.abs(with_calc.array - without.array).reshape(with_calc.shape[0], -1).max(axis=1)
    k = int(np.argmax(diff))
    assert 0.005 < diff[min(k + 5, len(diff) - 1)] < 0.5 * diff[k]


def _radial_power_slope(image, pixel_mm, band=(0.05, 0.5)):
    image = image - image.mean()
    window = np.outer(np.hanning(image.shape[0]), np.hanning(image.shape[1]))
    power = np.abs(np.fft.fft2(image * window)) ** 2
    f = np.hypot(np.fft.fftfreq(image.shape[0], pixel_mm)[:, None], np.fft.fftfreq(image.shape[1], pixel_mm)[None, :])
    edges = np.geomspace(band[0], band[1], 16)
    which = np.digitize(f.ravel(), edges)
    freq, mean_power = [], []
    for b in range(1, len(edges)):
        sel = which == b
        if sel.any():
            freq.append(f.ravel()[sel].mean())
            mean_power.append(power.ravel()[sel].mean())
    return -np.polyfit(np.log(freq), np.log(mean_power), 1)[0]


def test_dbt_texture_has_a_power_law_spectrum_with_beta_about_3():
    for seed in (0, 1, 2):
        volume, _ = phantoms.dbt_phantom(seed, masses=0, calcification_clusters=0)
        a, pixel = volume.array, volume.spacing[1]
        nk, nj, _ = a.shape
        patch = (slice(nj // 2 - 48, nj // 2 + 48), slice(8, 104))     # inside the breast, near the chest wall
        assert a[nk // 2][patch].min() > 0.1
        slopes = [_radial_power_slope(a[k][patch], pixel) for k in range(nk // 2 - 4, nk // 2 + 4)]
        assert 2.3 <= np.mean(slopes) <= 3.7
    flat, _ = phantoms.dbt_phantom(0, masses=0, calcification_clusters=0, beta=1.5)
    slope = np.mean([_radial_power_slope(flat.array[k][patch], pixel) for k in range(nk // 2 - 4, nk // 2 + 4)])
    assert slope < 2.3                                # the measurement can tell a different exponent


# --------------------------------------------------------------------------- ACS shapes
def _closed_form_volume(p):
    name = p["name"]
    if name == "sphere":
        return 4 / 3 * math.pi * p["radius"] ** 3
    if name == "cube":
        return p["side"] ** 3
    if name == "cylinder":
        return math.pi * p["radius"] ** 2 * p["height"]
    if name == "cone":
        return math.pi * p["radius"] ** 2 * p["height"] / 3
    if name == "pyramid":
        return p["base"] ** 2 * p["height"] / 3
    if name == "circle":
        return math.pi * p["radius"] ** 2
    if name == "square":
        return p["side"] ** 2
    return p["base"] * p["height"] / 2                 # triangle


@pytest.mark.parametrize("make, names", [(phantoms.shapes_2d, phantoms.SHAPES_2D),
                                         (phantoms.shapes_3d, phantoms.SHAPES_3D)], ids=["2d", "3d"])
def test_shapes_every_class_present_and_labels_match_the_shape(make, names):
    n = 2 * len(names)
    images, labels, params = make(11, n, with_params=True)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.shape == labels.shape == (n,) + (48,) * (labels.ndim - 1)
    assert set(np.unique(labels)) == set(range(len(names) + 1))
    checked = 0
    for sample, shapes in enumerate(params):
        components, _ = ndimage.label(labels[sample] > 0)
        for p in shapes:
            assert p["name"] == names[p["label"] - 1]
            centre = tuple(int(round(c)) for c in p["center"])
            component = components == components[centre]
            assert components[centre] > 0 and np.all(labels[sample][component] == p["label"])
            expected = _closed_form_volume(p)
            assert abs(component.sum() - expected) <= 0.10 * expected, p
            checked += 1
    assert checked >= n


def test_shapes_are_not_solved_by_a_threshold():
    for make in (phantoms.shapes_2d, phantoms.shapes_3d):
        images, labels = make(2, 8)
        foreground = labels > 0
        best = max(2 * np.count_nonzero((images > t) & foreground) / (np.count_nonzero(images > t) + foreground.sum())
                   for t in np.quantile(images, np.linspace(0.02, 0.98, 49)))
        assert best < 0.7
        # yet the foreground is brighter on average: learnable, not noise
        assert images[foreground].mean() > images[~foreground].mean() + 0.1


# --------------------------------------------------------------------------- write_phantoms
@pytest.mark.parametrize("kind", phantoms.PHANTOM_KINDS)
def test_write_phantoms_writes_loadable_cases_and_a_gallery(kind, tmp_path):
    calls = []
    paths = phantoms.write_phantoms(kind, tmp_path / "out", seed=3, count=1, progress=lambda f, s: calls.append(f))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)   # no temporary files left
    assert (out / "gallery.png").stat().st_size > 10_000
    assert calls[-1] == 1.0 and calls == sorted(calls)
    if kind == "ct":
        volume, labels = phantoms.ct_phantom(3)
        loaded = load_volume(out / "ct_000.nii.gz")
        np.testing.assert_array_equal(loaded.array, volume.array)
        np.testing.assert_allclose(loaded.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
        np.testing.assert_array_equal(load_volume(out / "ct_000_label.nii.gz").array, labels)
    elif kind == "dbt":
        volume, boxes = phantoms.dbt_phantom(3)
        loaded = load_volume(out / "dbt_000.nii.gz")
        np.testing.assert_array_equal(loaded.array, volume.array)
        record = json.loads((out / "dbt_000_boxes.json").read_text(encoding="utf-8"))
        assert record["volume"] == "dbt_000.nii.gz" and record["seed"] == 3 and record["lesions"] == boxes
    else:
        images, labels = phantoms.shapes_3d(3, 1)
        np.testing.assert_array_equal(load_volume(out / "shapes3d_000.nii.gz").array, images[0])
        np.testing.assert_array_equal(load_volume(out / "shapes3d_000_label.nii.gz").array, labels[0])
        stack = load_volume(out / "shapes2d_label.nii.gz").array
        assert stack.shape == (16, 48, 48) and set(np.unique(stack)) == {0, 1, 2, 3}
        names = json.loads((out / "shapes_classes.json").read_text(encoding="utf-8"))
        assert names["shapes3d"]["5"] == "pyramid"


def test_write_phantoms_rejects_an_unknown_kind(tmp_path):
    with pytest.raises(TransferSegError, match="unknown phantom kind"):
        phantoms.write_phantoms("mri", tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("region", list(phantoms.CT_REGIONS))
def test_region_phantoms_are_ct_in_hu_without_a_liver(region):
    volume, labels = phantoms.region_phantom(2, region, shape=(20, 128, 128))
    again, _ = phantoms.region_phantom(2, region, shape=(20, 128, 128))
    assert np.array_equal(volume.array, again.array) and not labels.any()
    assert orientation_name(volume.directions) == "LPS axial"
    body = volume.array > -300
    assert -1024 <= volume.array.min() and np.median(volume.array[~body]) < -900      # air
    soft = volume.array[body & (volume.array < 150)]
    assert 0 <= np.median(soft) <= 80                                                  # brain or muscle
    assert (volume.array > 500).mean() > 0.002                                          # bone
    low, high = phantoms.CT_REGIONS[region][0]
    assert low <= volume.spacing[2] * 128 <= high
    with pytest.raises(TransferSegError, match="region must be one of head, neck, pelvis, legs"):
        phantoms.region_phantom(2, "abdomen")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_pelvis_has_bone_a_bladder_near_water_and_bowel_gas(seed):
    volume, _ = phantoms.region_phantom(seed, "pelvis", shape=(32, 128, 128))
    array = volume.array
    ml = float(np.prod(volume.spacing)) / 1000.0
    body = np.stack([ndimage.binary_fill_holes(s) for s in array > -300])
    assert (array[body] > 300).mean() > 0.02, seed                                # hip bones, sacrum, femora
    gas = ndimage.binary_erosion(body, np.ones((1, 5, 5))) & (array < -900)
    assert gas.sum() * ml > 1.0, seed                                              # in the rectum and bowel
    smooth = ndimage.gaussian_filter(array, (0.0, 1.5, 1.5))
    water, n = ndimage.label(ndimage.binary_opening((smooth > -10) & (smooth < 30), np.ones((1, 5, 5))))
    sizes = ndimage.sum(np.ones_like(water), water, range(1, n + 1)) * ml
    bladder = water == 1 + int(np.argmax(sizes))
    x_mm = volume.ijk_to_ras_points(np.argwhere(bladder))[:, 0]
    assert sizes.max() >= 20.0 and abs(np.median(x_mm) - float(np.median(
        volume.ijk_to_ras_points(np.argwhere(body))[:, 0]))) < 30.0, (seed, sizes.max())
    assert -5 <= np.median(array[bladder]) <= 25, seed


def test_ct_stomach_varies_the_stomach_and_gives_its_room_to_the_left_lobe():
    """stomach=True draws the stomach smaller (0.45-1 times), further back when small, half of them
    collapsed (wall only, no gas); the liver's left lobe grows into the room, on the patient's left; the
    right of the body holds the same tissues voxel for voxel."""
    T = phantom_tissues
    stomach_classes = (T.BOWEL_WALL, T.FLUID, T.GAS)
    collapsed = smaller = 0
    for seed in (2003, 2011, 2017, 2029):
        plain, plain_labels, plain_tissues = phantoms.ct_phantom(seed, shape=(40, 128, 128), tumors=0,
                                                                 phase="portal", with_tissues=True)
        varied, labels, tissues = phantoms.ct_phantom(seed, shape=(40, 128, 128), tumors=0, phase="portal",
                                                      stomach=True, with_tissues=True)
        # the stomach is the large component of its classes on the patient's left (high i: LPS columns)
        left = np.zeros(tissues.shape, bool)
        left[:, :, 64:] = True
        before = np.isin(plain_tissues, stomach_classes) & left
        after = np.isin(tissues, stomach_classes) & left
        smaller += after.sum() < 0.9 * before.sum()
        gas_before, gas_after = (plain_tissues == T.GAS) & left, (tissues == T.GAS) & left
        collapsed += gas_before.sum() > 50 and gas_after.sum() < 0.1 * gas_before.sum()
        # more liver, all of it on the patient's left of the right lobe (where the moved stomach sits the
        # liver may lose a little)
        gained, lost = (labels > 0) & (plain_labels == 0), (plain_labels > 0) & (labels == 0)
        assert gained.sum() > 300 and lost.sum() < 0.15 * gained.sum(), seed
        assert not gained[:, :, :48].any(), seed
        assert np.array_equal(plain_tissues[:, :, :40], tissues[:, :, :40]), seed
    assert smaller >= 3 and collapsed >= 1


def test_ct_beaver_tail_drapes_a_thin_left_lobe_over_the_stomach_back_towards_the_spleen():
    """beaver_tail=True gives six livers in ten a thin plate at the left lobe's top reaching further
    across, and a tail from it back along the left ribs; their stomach lies lower, under the plate. The
    other livers are the same phantom voxel for voxel, and the right of the body holds the same tissues."""
    T = phantom_tissues
    stomach_classes = (T.BOWEL_WALL, T.FLUID, T.GAS)
    tails = plain_cases = 0
    for seed in (1011, 1012, 1015, 1016):
        options = dict(shape=(48, 128, 128), tumors=0, phase="arterial", anatomy="random", stomach=True,
                       fissures=True, diaphragm=True, with_tissues=True)
        _, plain_labels, plain_tissues = phantoms.ct_phantom(seed, **options)
        _, labels, tissues = phantoms.ct_phantom(seed, beaver_tail=True, **options)
        if np.array_equal(plain_tissues, tissues):
            plain_cases += 1
            assert np.array_equal(plain_labels, labels), seed
            continue
        tails += 1
        gained, lost = (labels > 0) & (plain_labels == 0), (plain_labels > 0) & (labels == 0)
        assert gained.sum() > 500 and lost.sum() < 0.15 * gained.sum(), seed
        # all of it on the patient's left of the right lobe (high i: LPS columns), in the liver's upper half
        assert not gained[:, :, :48].any(), seed
        liver_slices = np.flatnonzero((labels > 0).any(axis=(1, 2)))
        middle = (liver_slices[0] + liver_slices[-1]) / 2.0
        assert gained[int(np.ceil(middle)):].sum() > 0.9 * gained.sum(), seed
        assert np.array_equal(plain_tissues[:, :, :40], tissues[:, :, :40]), seed

        def stomach_top(tissue):
            left = np.isin(tissue[:, :, 64:], stomach_classes).any(axis=(1, 2))
            return np.flatnonzero(left)[-1]
        assert stomach_top(tissues) < stomach_top(plain_tissues), seed
    assert tails >= 2 and plain_cases >= 1
