"""Tests for TransferSegLib.metrics, each metric checked against an independent implementation.

What MONAI 1.6.1 does (read in monai/metrics/utils.py and surface_distance.py, and pinned by
the MONAI tests below):
* surface = ``mask ^ scipy.ndimage.binary_erosion(mask)``: scipy's default structuring
  element is the 6-connected (face) cross and its border value is 0, so voxels outside the
  array are background -- the same convention as ours;
* spacing is multiplied onto ``np.argwhere`` coordinates, i.e. it is in the array's own
  axis order, like our (k, j, i);
* ``compute_average_surface_distance(symmetric=True)`` concatenates both directions'
  distances and takes one mean (pooled), not (mean_a + mean_b) / 2;
* it returns float32, hence the 1e-5 relative tolerance against it; both empty gives nan,
  one empty inf (we return 0.0 and inf).
Hausdorff distance is not part of this module, so ``compute_hausdorff_distance`` is not used.
"""
import math
import time

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice
from monai.metrics.utils import get_edge_surface_distance, get_mask_edges
from scipy import ndimage

from TransferSegLib import metrics
from TransferSegLib.volume import TransferSegError

# MONAI's own get_edge_surface_distance passes its deprecated always_return_as_numpy argument.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")

# --------------------------------------------------------------------------- references


def brute_surface(mask):
    """Foreground voxels with a face neighbour that is background or outside the array."""
    surface = np.zeros_like(mask, dtype=bool)
    shape = mask.shape
    for k, j, i in zip(*np.nonzero(mask)):
        for dk, dj, di in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            n = (k + dk, j + dj, i + di)
            if not all(0 <= n[a] < shape[a] for a in range(3)) or not mask[n]:
                surface[k, j, i] = True
                break
    return surface


def brute_directed(from_surface, to_surface, spacing):
    """Distance (mm) from each voxel of from_surface to the nearest of to_surface, all pairs."""
    a = np.argwhere(from_surface) * np.asarray(spacing, float)
    b = np.argwhere(to_surface) * np.asarray(spacing, float)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def brute_asd_rmsd(pred, ref, spacing):
    sp, sr = brute_surface(pred), brute_surface(ref)
    d = np.concatenate([brute_directed(sp, sr, spacing), brute_directed(sr, sp, spacing)])
    return d.mean(), math.sqrt((d**2).mean())


def voxel_set(mask):
    return set(map(tuple, np.argwhere(mask)))


def random_blobs(rng, shape, fraction):
    """Smoothed noise thresholded to about `fraction` foreground, plus a few lone voxels."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.2)
    mask = noise > np.quantile(noise, 1 - fraction)
    mask[tuple(rng.integers(0, n, 3) for n in shape)] = True
    return mask


def random_spacing(rng):
    return tuple(float(v) for v in rng.uniform(0.4, 3.0, 3))


def monai_pair(pred, ref):
    as_tensor = lambda m: torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return as_tensor(pred), as_tensor(ref)


# --------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", range(6))
def test_asd_rmsd_match_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (7, 9, 11)
    pred, ref = random_blobs(rng, shape, 0.3), random_blobs(rng, shape, 0.25)
    spacing = (2.5, 0.7, 0.9) if seed == 0 else random_spacing(rng)
    want_asd, want_rmsd = brute_asd_rmsd(pred, ref, spacing)
    assert metrics.asd(pred, ref, spacing) == pytest.approx(want_asd, rel=1e-9, abs=1e-9)
    assert metrics.rmsd(pred, ref, spacing) == pytest.approx(want_rmsd, rel=1e-9, abs=1e-9)


def test_surface_of_a_mask_filling_the_array_is_its_border():
    # Outside the array counts as background: a full block has its outer shell as surface.
    full = np.ones((4, 5, 6), bool)
    ref = np.zeros_like(full)
    ref[1:3, 1:4, 1:5] = True
    spacing = (1.5, 0.8, 0.6)
    want_asd, want_rmsd = brute_asd_rmsd(full, ref, spacing)
    assert metrics.asd(full, ref, spacing) == pytest.approx(want_asd, rel=1e-9)
    assert metrics.rmsd(full, ref, spacing) == pytest.approx(want_rmsd, rel=1e-9)
    # Were the outside foreground, the full block would have no surface and asd would differ.
    assert want_asd > 0.5


@pytest.mark.parametrize("seed", range(4))
def test_overlap_metrics_match_set_arithmetic(seed):
    rng = np.random.default_rng(100 + seed)
    pred, ref = random_blobs(rng, (7, 9, 11), 0.3), random_blobs(rng, (7, 9, 11), 0.2)
    p, r = voxel_set(pred), voxel_set(ref)
    assert metrics.dice(pred, ref) == pytest.approx(2 * len(p & r) / (len(p) + len(r)), rel=1e-12)
    assert metrics.voe(pred, ref) == pytest.approx(1 - len(p & r) / len(p | r), rel=1e-12)
    assert metrics.rvd(pred, ref) == pytest.approx((len(p) - len(r)) / len(r), rel=1e-12)
    # Jaccard = Dice / (2 - Dice): an identity the two implementations must agree on.
    d = metrics.dice(pred, ref)
    assert metrics.voe(pred, ref) == pytest.approx(1 - d / (2 - d), rel=1e-12)


# --------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize("seed", range(3))
def test_asd_and_dice_match_monai(seed):
    rng = np.random.default_rng(200 + seed)
    shape = (16, 20, 24)
    pred, ref = random_blobs(rng, shape, 0.2), random_blobs(rng, shape, 0.15)
    spacing = random_spacing(rng)
    y_pred, y = monai_pair(pred, ref)
    want = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=list(spacing))
    assert metrics.asd(pred, ref, spacing) == pytest.approx(float(want[0, 0]), rel=1e-5)
    want_dice = compute_dice(y_pred, y, include_background=True)
    assert metrics.dice(pred, ref) == pytest.approx(float(want_dice[0, 0]), rel=1e-6)


def test_rmsd_matches_monai_surface_distances():
    rng = np.random.default_rng(300)
    shape = (16, 20, 24)
    pred, ref = random_blobs(rng, shape, 0.2), random_blobs(rng, shape, 0.15)
    spacing = (3.0, 0.75, 0.6)
    _, (to_ref, to_pred), _ = get_edge_surface_distance(
        torch.from_numpy(pred), torch.from_numpy(ref), spacing=spacing, symmetric=True
    )
    pooled = torch.cat([to_ref, to_pred]).double()
    assert metrics.rmsd(pred, ref, spacing) == pytest.approx(float(pooled.square().mean().sqrt()), rel=1e-5)
    assert metrics.asd(pred, ref, spacing) == pytest.approx(float(pooled.mean()), rel=1e-5)


def test_monai_symmetric_asd_pools_both_directions():
    # A large box around a small one: the two directions have very different surface counts,
    # so pooling and averaging the two directional means disagree by a lot.
    pred = np.zeros((12, 14, 16), bool)
    pred[1:11, 1:13, 1:15] = True
    ref = np.zeros_like(pred)
    ref[5:7, 6:8, 7:9] = True
    spacing = (2.0, 1.0, 0.5)
    to_ref = brute_directed(brute_surface(pred), brute_surface(ref), spacing)
    to_pred = brute_directed(brute_surface(ref), brute_surface(pred), spacing)
    pooled = np.concatenate([to_ref, to_pred]).mean()
    mean_of_means = (to_ref.mean() + to_pred.mean()) / 2
    assert abs(pooled - mean_of_means) > 0.5
    y_pred, y = monai_pair(pred, ref)
    monai_asd = float(compute_average_surface_distance(y_pred, y, True, True, spacing=list(spacing))[0, 0])
    assert monai_asd == pytest.approx(pooled, rel=1e-5)
    assert metrics.asd(pred, ref, spacing) == pytest.approx(pooled, rel=1e-9)


def test_monai_surface_is_six_connected_with_background_outside():
    rng = np.random.default_rng(400)
    pred, ref = random_blobs(rng, (7, 9, 11), 0.4), random_blobs(rng, (7, 9, 11), 0.4)
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    np.testing.assert_array_equal(edges_pred, brute_surface(pred))
    np.testing.assert_array_equal(edges_ref, brute_surface(ref))


# --------------------------------------------------------------------------- spacing


def test_spacing_is_in_array_axis_order():
    # Two full planes 3 voxels apart along k: every voxel is surface and lies 3 k-steps away.
    pred = np.zeros((6, 5, 7), bool)
    ref = np.zeros_like(pred)
    pred[1], ref[4] = True, True
    spacing = (2.5, 0.7, 0.9)
    assert metrics.asd(pred, ref, spacing) == pytest.approx(3 * 2.5, rel=1e-12)
    assert metrics.rmsd(pred, ref, spacing) == pytest.approx(3 * 2.5, rel=1e-12)
    assert metrics.asd(pred, ref, spacing[::-1]) == pytest.approx(3 * 0.9, rel=1e-12)
    # The same along i (the last array axis).
    pred, ref = np.zeros((6, 5, 7), bool), np.zeros((6, 5, 7), bool)
    pred[:, :, 1], ref[:, :, 5] = True, True
    assert metrics.asd(pred, ref, spacing) == pytest.approx(4 * 0.9, rel=1e-12)


def ball(shape, spacing, radius):
    centre = [(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    axes = np.meshgrid(*[np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre)], indexing="ij")
    return np.sqrt(sum(x * x for x in axes)) <= radius


@pytest.mark.parametrize("radius, gap", [(10.0, 3.0), (9.0, 4.0)])
def test_concentric_spheres_sampled_anisotropically(radius, gap):
    spacing, shape = (2.0, 0.8, 0.6), (17, 45, 60)
    inner, outer = ball(shape, spacing, radius), ball(shape, spacing, radius + gap)
    assert metrics.asd(inner, inner, spacing) == 0.0
    assert metrics.rmsd(inner, inner, spacing) == 0.0
    # Surface voxels sit up to a voxel inside the true sphere; 0.5 mm covers that here.
    assert metrics.asd(inner, outer, spacing) == pytest.approx(gap, abs=0.5)
    assert metrics.rmsd(inner, outer, spacing) == pytest.approx(gap, abs=0.5)
    # Reading the spacing in the wrong order measures squashed spheres and misses the gap.
    assert abs(metrics.asd(inner, outer, spacing[::-1]) - gap) > 0.5


def test_small_lesion_in_a_large_volume_is_fast_and_exact():
    spacing = (2.5, 0.7, 0.8)
    pred = np.zeros((300, 512, 512), np.uint8)
    ref = np.zeros_like(pred)
    pred[100:108, 200:215, 300:318] = 1
    ref[102:109, 203:216, 297:316] = 1
    window = (slice(95, 115), slice(190, 230), slice(290, 330))
    start = time.perf_counter()
    got = metrics.asd(pred, ref, spacing), metrics.rmsd(pred, ref, spacing)
    elapsed = time.perf_counter() - start
    want = metrics.asd(pred[window], ref[window], spacing), metrics.rmsd(pred[window], ref[window], spacing)
    assert got == pytest.approx(want, rel=1e-12)
    # Distance transforms over all 79 M voxels take tens of seconds; the cropped ones do not.
    assert elapsed < 8.0


# --------------------------------------------------------------------------- hand-computed


def masks_from_counts(size, pred_only, ref_only, both):
    """Flat-indexed masks with the given counts of voxels in P only, R only and both."""
    pred, ref = np.zeros(size, bool), np.zeros(size, bool)
    pred[:both], ref[:both] = True, True
    pred[both : both + pred_only] = True
    ref[both + pred_only : both + pred_only + ref_only] = True
    return pred.reshape(1, 1, size), ref.reshape(1, 1, size)


def test_dice_global_and_per_case_differ_as_computed_by_hand():
    small = masks_from_counts(20, pred_only=2, ref_only=2, both=2)  # |P| = |R| = 4, overlap 2: Dice 0.5
    large = masks_from_counts(200, pred_only=0, ref_only=0, both=100)  # Dice 1
    preds, refs = [small[0], large[0]], [small[1], large[1]]
    assert metrics.dice(*small) == 0.5
    assert metrics.dice_per_case(preds, refs) == pytest.approx(0.75)
    assert metrics.dice_global(preds, refs) == pytest.approx(2 * 102 / 208)


def test_voe_and_rvd_by_hand():
    pred, ref = masks_from_counts(20, pred_only=2, ref_only=2, both=2)  # union 6, overlap 2
    assert metrics.voe(pred, ref) == pytest.approx(1 - 2 / 6)
    larger, ref4 = masks_from_counts(20, pred_only=2, ref_only=0, both=4)
    assert metrics.rvd(larger, ref4) == pytest.approx(0.5)  # 6 vs 4 voxels: over-segmented
    smaller, ref4 = masks_from_counts(20, pred_only=0, ref_only=2, both=2)
    assert metrics.rvd(smaller, ref4) == pytest.approx(-0.5)  # 2 vs 4 voxels: under-segmented


def label_map(n_liver, n_tumor, size=30):
    labels = np.zeros(size, np.uint8)
    labels[:n_liver] = 1
    labels[n_liver : n_liver + n_tumor] = 2
    return labels.reshape(1, 2, size // 2)


def test_tumor_burden_rmse_by_hand():
    # case 1: reference 2 / 10 = 0.2, prediction 1 / 10 = 0.1; case 2: reference 0, prediction 3 / 12.
    refs = [label_map(8, 2), label_map(12, 0)]
    preds = [label_map(9, 1), label_map(9, 3)]
    want = math.sqrt(((0.1 - 0.2) ** 2 + (0.25 - 0.0) ** 2) / 2)
    assert metrics.tumor_burden(refs[0]) == pytest.approx(0.2)
    assert metrics.tumor_burden_rmse(preds, refs) == pytest.approx(want, rel=1e-12)
    # The same cases as separate tumor and liver masks; the liver may or may not include the tumor.
    tumors = lambda maps: [m == 2 for m in maps]
    livers_without_tumor = lambda maps: [m == 1 for m in maps]
    livers_with_tumor = lambda maps: [m > 0 for m in maps]
    for livers in (livers_without_tumor, livers_with_tumor):
        got = metrics.tumor_burden_rmse(tumors(preds), tumors(refs), livers(preds), livers(refs))
        assert got == pytest.approx(want, rel=1e-12)
    # Another tumor value through tumor_label.
    relabelled = [np.where(m == 2, 5, m) for m in preds], [np.where(m == 2, 5, m) for m in refs]
    assert metrics.tumor_burden_rmse(*relabelled, tumor_label=5) == pytest.approx(want, rel=1e-12)


def test_label_picks_one_value_and_nonzero_is_foreground():
    rng = np.random.default_rng(500)
    pred = rng.integers(0, 3, (6, 7, 8)).astype(np.uint8)
    ref = rng.integers(0, 3, (6, 7, 8)).astype(np.int32)
    spacing = (1.2, 0.9, 0.7)
    for fn in (metrics.dice, metrics.voe, metrics.rvd):
        assert fn(pred, ref, label=2) == fn(pred == 2, ref == 2)
        assert fn(pred, ref) == fn(pred > 0, ref > 0)
    assert metrics.asd(pred, ref, spacing, label=2) == pytest.approx(brute_asd_rmsd(pred == 2, ref == 2, spacing)[0])
    assert metrics.rmsd(pred, ref, spacing) == pytest.approx(brute_asd_rmsd(pred > 0, ref > 0, spacing)[1])
    # A label map that went through a float32 Volume is still a label map.
    assert metrics.dice(pred.astype(np.float32), ref, label=2) == metrics.dice(pred == 2, ref == 2)


# --------------------------------------------------------------------------- empty masks


EMPTY = np.zeros((4, 5, 6), bool)
SOME = EMPTY.copy()
SOME[1:3, 2:4, 2:5] = True
SPACING = (2.0, 1.0, 0.5)


@pytest.mark.parametrize(
    "name, both_empty, only_pred_empty, only_ref_empty",
    [
        ("dice", 1.0, 0.0, 0.0),
        ("voe", 0.0, 1.0, 1.0),
        ("rvd", 0.0, -1.0, math.inf),
        ("asd", 0.0, math.inf, math.inf),
        ("rmsd", 0.0, math.inf, math.inf),
    ],
)
def test_empty_masks(name, both_empty, only_pred_empty, only_ref_empty):
    fn = getattr(metrics, name)
    args = (SPACING,) if name in ("asd", "rmsd") else ()
    assert fn(EMPTY, EMPTY, *args) == both_empty
    assert fn(EMPTY, SOME, *args) == only_pred_empty
    assert fn(SOME, EMPTY, *args) == only_ref_empty


def test_empty_cases_in_lists():
    assert metrics.dice_global([EMPTY, EMPTY], [EMPTY, EMPTY]) == 1.0
    assert metrics.dice_per_case([EMPTY, EMPTY], [EMPTY, EMPTY]) == 1.0
    # An all-empty case adds nothing to the pooled sums but counts 1.0 per case.
    assert metrics.dice_global([EMPTY, SOME], [EMPTY, SOME]) == 1.0
    assert metrics.dice_per_case([EMPTY, SOME], [SOME, SOME]) == 0.5
    assert metrics.dice_global([EMPTY, SOME], [SOME, SOME]) == pytest.approx(2 * 12 / 36)
    # No liver → burden 0; then a case without liver in both counts as a perfect estimate.
    assert metrics.tumor_burden(np.zeros((2, 3, 4), np.uint8)) == 0.0
    no_liver = np.zeros((1, 2, 15), np.uint8)
    assert metrics.tumor_burden_rmse([no_liver], [no_liver]) == 0.0
    assert metrics.tumor_burden_rmse([label_map(8, 2)], [no_liver]) == pytest.approx(0.2)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["dice", "voe", "rvd", "asd", "rmsd"])
def test_shape_mismatch_names_both_shapes(name):
    args = (SPACING,) if name in ("asd", "rmsd") else ()
    with pytest.raises(TransferSegError, match="4×5×6.*4×5×7"):
        getattr(metrics, name)(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool), *args)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, math.nan, 1.0), (math.inf, 1, 1), None])
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(TransferSegError, match="spacing"):
        metrics.asd(SOME, SOME, spacing)


def test_bad_inputs_are_refused():
    with pytest.raises(TransferSegError, match="probability"):
        metrics.dice(np.full((2, 3, 4), 0.3, np.float32), np.ones((2, 3, 4), bool))
    with pytest.raises(TransferSegError, match="3D"):
        metrics.asd(np.ones((5, 6), bool), np.ones((5, 6), bool), (1.0, 1.0, 1.0))
    with pytest.raises(TransferSegError, match="2 predictions but 1 references"):
        metrics.dice_global([SOME, SOME], [SOME])
    with pytest.raises(TransferSegError, match="no cases"):
        metrics.dice_per_case([], [])
    with pytest.raises(TransferSegError, match="both livers_pred and livers_ref"):
        metrics.tumor_burden_rmse([SOME], [SOME], livers_pred=[SOME])
