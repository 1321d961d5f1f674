"""fusion.py: majority vote and STAPLE against SimpleITK, the disagreement's exact values and a
whole-array computation with scipy, the summary on a hand-built case, errors that name the problem."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import entropy

from TransferSegLib import fusion
from TransferSegLib.fusion import (disagreement_summary, majority_vote, staple, view_disagreement, view_labels,
                                   view_probabilities)
from TransferSegLib.volume import TransferSegError

SHAPE = (5, 7, 6)
TWO_AGREE = entropy([2 / 3, 1 / 3], base=2) / np.log2(3)  # ≈ 0.579


def _images(arrays):
    return [sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.uint8)) for a in arrays]


def _soft(rng, num_classes, shape=SHAPE):
    """Random class probabilities (K, k, j, i), float32, summing to 1."""
    p = rng.random((num_classes,) + shape) ** 3
    return (p / p.sum(axis=0)).astype(np.float32)


def _box(shape=(8, 12, 12), low=(2, 3, 3), high=(6, 9, 9)):
    mask = np.zeros(shape, np.uint8)
    mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = 1
    return mask


# --- one view -------------------------------------------------------------------------------
def test_view_labels_and_probabilities_of_each_form():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, SHAPE).astype(np.int16)
    one_hot = view_probabilities(labels, 3)
    assert one_hot.dtype == np.float32 and one_hot.shape == (3,) + SHAPE
    assert np.array_equal(np.argmax(one_hot, axis=0), labels) and np.all(one_hot.sum(axis=0) == 1)
    assert view_labels(labels).dtype == np.uint8 and np.array_equal(view_labels(labels), labels)

    p = rng.random(SHAPE).astype(np.float32)
    p[0, 0, :3] = [0.5, np.nextafter(np.float32(0.5), np.float32(0)), 1.0]
    assert np.array_equal(view_labels(p), p >= 0.5)
    assert view_labels(p)[0, 0, :3].tolist() == [1, 0, 1]
    assert np.allclose(view_probabilities(p, 2), np.stack([1 - p, p]))

    scaled = (_soft(rng, 3) * 255).round().astype(np.uint8)
    assert np.allclose(view_probabilities(scaled, 3), scaled / 255.0)
    assert np.array_equal(view_labels(scaled), np.argmax(scaled, axis=0))


# --- majority vote --------------------------------------------------------------------------
def test_majority_vote_of_binary_masks_equals_label_voting_and_sum():
    rng = np.random.default_rng(1)
    masks = [rng.random(SHAPE) < 0.5 for _ in range(3)]
    fused = majority_vote(masks)
    voted = sitk.GetArrayFromImage(sitk.LabelVoting(_images(masks)))
    assert fused.dtype == np.uint8 and fused.shape == SHAPE
    assert np.array_equal(fused, voted)
    assert np.array_equal(fused, sum(m.astype(int) for m in masks) >= 2)


def test_majority_vote_of_three_class_maps_equals_label_voting_and_nests_ties():
    rng = np.random.default_rng(2)
    maps = [rng.integers(0, 3, SHAPE).astype(np.uint8) for _ in range(3)]
    fused = majority_vote(maps)
    voting = sitk.LabelVotingImageFilter()
    voting.SetLabelForUndecidedPixels(255)
    voted = sitk.GetArrayFromImage(voting.Execute(_images(maps)))
    decided = voted != 255
    tie = ~decided
    assert decided.any() and tie.any()
    assert np.array_equal(fused[decided], voted[decided])
    assert np.all(fused[tie] == 1)  # 0, 1, 2: two views reach ≥ 1, one reaches ≥ 2
    assert majority_vote([np.full((1, 1, 1), v, np.uint8) for v in (2, 0, 1)]).item() == 1
    assert majority_vote([np.full((1, 1, 1), v, np.uint8) for v in (2, 2, 0)]).item() == 2


def test_majority_vote_of_probabilities_equals_vote_of_their_labels():
    rng = np.random.default_rng(3)
    binary = rng.random(SHAPE).astype(np.float32)
    binary[0, 0, :2] = [0.5, 0.49]  # p ≥ 0.5 is foreground
    two = _soft(rng, 2)
    views = [binary, (two * 255).round().astype(np.uint8), _soft(rng, 2).astype(np.float64)]
    masks = [binary >= 0.5, np.argmax(views[1], axis=0), np.argmax(views[2], axis=0)]
    assert np.array_equal(majority_vote(views), majority_vote(masks))
    assert np.array_equal(majority_vote(views), sum(m.astype(int) for m in masks) >= 2)

    views = [(_soft(rng, 3) * 255).round().astype(np.uint8), _soft(rng, 3), rng.integers(0, 3, SHAPE)]
    maps = [np.argmax(views[0], axis=0), np.argmax(views[1], axis=0), views[2]]
    assert np.array_equal(majority_vote(views), np.median(np.stack(maps), axis=0))


# --- STAPLE ---------------------------------------------------------------------------------
def test_staple_of_identical_masks_gives_the_mask():
    mask = _box()
    labels, probabilities = staple([mask, mask.copy(), mask.astype(bool)])
    assert labels.dtype == np.uint8 and probabilities.dtype == np.float32 and probabilities.shape == (2,) + mask.shape
    assert np.array_equal(labels, mask)
    assert probabilities[1][mask == 1].min() > 0.99 and probabilities[0][mask == 0].min() > 0.99
    assert np.array_equal(staple([mask] * 3, threshold=1.0)[0], mask)  # p ≥ threshold, and p is 1 there


def test_staple_with_one_view_off_equals_the_majority():
    mask = _box()
    more = mask.copy()
    more[1] = mask[2]  # one slice too many
    less = mask.copy()
    less[2:6, 3:5, 3:9] = 0  # two rows missing
    labels, probabilities = staple([mask, more, less])
    assert np.array_equal(labels, mask)
    assert np.array_equal(labels, majority_vote([mask, more, less]))
    assert np.allclose(probabilities.sum(axis=0), 1, atol=1e-6)


def test_staple_equals_simpleitk_staple_on_binary_masks():
    rng = np.random.default_rng(4)
    mask = _box(shape=(10, 16, 16), low=(2, 3, 4), high=(8, 12, 13))
    masks = [np.where(rng.random(mask.shape) < 0.08, 1 - mask, mask).astype(np.uint8) for _ in range(3)]
    direct = sitk.GetArrayFromImage(sitk.STAPLE(_images(masks), 1.0))
    labels, probabilities = staple(masks)
    assert np.allclose(probabilities[1], direct, atol=1e-6)
    assert np.allclose(probabilities[0], 1 - direct, atol=1e-6)
    assert np.array_equal(labels, direct >= 0.5)
    labels, _ = staple(masks, threshold=0.9)
    assert np.array_equal(labels, direct >= 0.9)


def test_staple_of_nested_labels_runs_per_region_and_keeps_tumor_inside_liver():
    rng = np.random.default_rng(5)
    truth = _box(shape=(10, 16, 16), low=(1, 2, 2), high=(9, 14, 14)).astype(np.uint8)
    truth[4:7, 5:9, 6:10] = 2
    views = []
    for n in range(3):  # views that miss voxels more and more, and see tumor less and less
        view = truth.copy()
        view[rng.random(truth.shape) < 0.05 * (n + 1)] = 0
        view[(rng.random(truth.shape) < 0.1 * (3 - n)) & (truth >= 1)] = 2
        views.append(view)
    labels, probabilities = staple(views)
    at_least = [sitk.GetArrayFromImage(sitk.STAPLE(_images([v >= c for v in views]), 1.0)) for c in (1, 2)]
    assert np.any(at_least[1] > at_least[0] + 1e-3)  # raw STAPLE is not monotone here
    at_least[1] = np.minimum(at_least[1], at_least[0])
    expected = np.stack([1 - at_least[0], at_least[0] - at_least[1], at_least[1]])
    assert probabilities.shape == (3,) + truth.shape
    assert np.allclose(probabilities, expected, atol=1e-6)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert np.array_equal(labels, (at_least[0] >= 0.5).astype(int) + (at_least[1] >= 0.5))
    assert not np.any((labels == 2) & (truth == 0)) and np.mean(labels == truth) > 0.9


def test_staple_of_empty_or_full_regions_gives_no_nan():
    zeros = np.zeros((4, 5, 6), np.uint8)
    labels, probabilities = staple([zeros] * 3)
    assert not np.isnan(probabilities).any()
    assert np.all(labels == 0) and np.all(probabilities[0] == 1) and np.all(probabilities[1] == 0)
    labels, probabilities = staple([zeros + 1] * 3)
    assert np.all(labels == 1) and np.all(probabilities[1] == 1) and np.all(probabilities[0] == 0)

    liver = _box()
    no_tumor = np.stack([1 - liver, liver, np.zeros_like(liver)]).astype(np.float32)  # K = 3, tumor empty
    labels, probabilities = staple([liver, no_tumor, liver])
    assert probabilities.shape[0] == 3 and not np.isnan(probabilities).any()
    assert np.array_equal(labels, liver) and np.all(probabilities[2] == 0)


# --- disagreement ---------------------------------------------------------------------------
def test_disagreement_is_zero_where_views_agree():
    rng = np.random.default_rng(6)
    maps = rng.integers(0, 3, SHAPE).astype(np.uint8)
    assert np.all(view_disagreement([maps, maps.copy(), maps.astype(np.int64)]) == 0)
    soft = _soft(rng, 3)
    disagreement = view_disagreement([soft, soft.copy(), soft.copy()])
    assert disagreement.dtype == np.float32 and disagreement.shape == SHAPE and np.all(disagreement == 0)


def test_disagreement_of_one_hot_views_takes_three_values():
    a = np.array([[[0, 1, 2, 2]]], np.uint8)
    b = np.array([[[0, 1, 0, 2]]], np.uint8)
    c = np.array([[[0, 1, 1, 0]]], np.uint8)
    disagreement = view_disagreement([a, b, c])
    assert np.allclose(disagreement[0, 0], [0, 0, 1, TWO_AGREE], atol=1e-6)
    assert abs(TWO_AGREE - 0.5794) < 1e-4


def test_disagreement_of_soft_views_lies_in_zero_one():
    rng = np.random.default_rng(7)
    views = [_soft(rng, 4) for _ in range(3)]
    views[0][:, 0] = np.eye(4)[:, :1, None]  # sharp distributions: log 0 terms
    disagreement = view_disagreement(views)
    assert np.isfinite(disagreement).all() and disagreement.min() >= 0 and disagreement.max() <= 1
    assert disagreement.max() > 0.1


def test_disagreement_slab_by_slab_equals_whole_array_scipy(monkeypatch):
    monkeypatch.setattr(fusion, "_SLAB_VOXELS", 200)  # one k per slab
    rng = np.random.default_rng(8)
    views = [_soft(rng, 3), (_soft(rng, 3) * 255).round().astype(np.uint8), rng.integers(0, 3, SHAPE)]
    p = np.stack([views[0].astype(np.float64), views[1] / 255.0, np.eye(3)[views[2]].transpose(3, 0, 1, 2)])
    p /= p.sum(axis=1, keepdims=True)
    expected = (entropy(p.mean(axis=0), base=2, axis=0) - entropy(p, base=2, axis=1).mean(axis=0)) / np.log2(3)
    assert len(list(fusion._slabs(SHAPE[0], 3 * 3 * SHAPE[1] * SHAPE[2]))) == SHAPE[0]
    assert np.allclose(view_disagreement(views), expected, atol=1e-6)


# --- summary --------------------------------------------------------------------------------
def _hand_case():
    a = np.array([[[0, 1, 1, 1], [2, 2, 0, 0]]], np.uint8)
    b = np.array([[[0, 1, 1, 0], [2, 1, 0, 0]]], np.uint8)
    c = np.array([[[0, 1, 2, 0], [2, 0, 0, 0]]], np.uint8)
    return [a, b, c]


def test_disagreement_summary_on_a_hand_built_case():
    views = _hand_case()
    fused = majority_vote(views)
    assert fused.tolist() == [[[0, 1, 1, 0], [2, 1, 0, 0]]]
    summary = disagreement_summary(views, fused)
    # inside: (0,1) 1 1 1 agree; (0,2) 1 1 2 two agree; (1,0) 2 2 2 agree; (1,1) 2 1 0 all differ;
    # outside, (0,3) 1 0 0 differs but is not counted
    assert summary["fused_voxels"] == 4
    assert summary["share_views_differ"] == pytest.approx(0.5)
    assert summary["mean_disagreement"] == pytest.approx((TWO_AGREE + 1) / 4, abs=1e-6)
    assert summary["share_disagreement_above"] == pytest.approx(0.5)
    assert summary["threshold"] == 0.5
    assert summary["per_label"] == {"1": {"voxels": 3, "share_views_differ": pytest.approx(2 / 3)},
                                    "2": {"voxels": 1, "share_views_differ": 0.0}}
    given = disagreement_summary(views, fused, view_disagreement(views), threshold=0.9)
    assert given["share_disagreement_above"] == pytest.approx(0.25)
    assert given["mean_disagreement"] == pytest.approx(summary["mean_disagreement"], abs=1e-6)
    three_way = float(view_disagreement(views)[0, 1, 1])
    assert disagreement_summary(views, fused, threshold=three_way)["share_disagreement_above"] == 0  # strictly above
    assert json.loads(json.dumps(given)) == given
    assert type(given["fused_voxels"]) is int and type(given["mean_disagreement"]) is float


def test_disagreement_summary_of_an_empty_segmentation_is_zeros():
    views = _hand_case()
    summary = disagreement_summary(views, np.zeros((1, 2, 4), np.uint8))
    assert summary == {"fused_voxels": 0, "share_views_differ": 0.0, "mean_disagreement": 0.0,
                       "share_disagreement_above": 0.0, "threshold": 0.5, "per_label": {}}


# --- errors ---------------------------------------------------------------------------------
def _with_nan():
    p = np.full(SHAPE, 0.2, np.float32)
    p[1, 2, 3] = np.nan
    return p


@pytest.mark.parametrize("views, message", [
    ([np.zeros(SHAPE, np.uint8)] * 2, "got 2 views; fusion needs exactly three"),
    ([np.zeros(SHAPE, np.uint8)] * 4, "got 4 views"),
    ([np.zeros(SHAPE, np.uint8), np.zeros((2,) + SHAPE, np.float32), np.zeros((5, 7, 7), np.uint8)],
     "spatial shapes differ (5×7×6, 5×7×6, 5×7×7)"),
    ([np.zeros(SHAPE, np.float32), _with_nan(), np.zeros(SHAPE, np.float32)], "view 2 of 3 holds NaN"),
    ([np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32), np.full(SHAPE, 2.0)],
     "view 3 of 3 is a float probability with values above 1 (max 2)"),
    ([np.zeros((3,) + SHAPE, np.float32) + 1.5] + [np.zeros(SHAPE, np.uint8)] * 2, "values above 1"),
    ([np.zeros((7, 6), np.uint8)] * 3, "view 1 of 3 is 2D (7×6)"),
    ([np.full(SHAPE, -1, np.int32)] + [np.zeros(SHAPE, np.uint8)] * 2, "negative values"),
    (np.zeros((3,) + SHAPE, np.uint8), "views is a list of three views"),
])
def test_bad_views_raise_a_clear_error(views, message):
    for function in (majority_vote, staple, view_disagreement):
        with pytest.raises(TransferSegError) as error:
            function(views)
        assert message in str(error.value)


def test_bad_single_views_and_arguments_raise_a_clear_error():
    with pytest.raises(TransferSegError, match="binary foreground probability"):
        view_probabilities(np.zeros(SHAPE, np.float32), 3)
    with pytest.raises(TransferSegError, match="value 3 above 2"):
        view_labels(np.full(SHAPE, 3, np.uint8), num_classes=3)
    with pytest.raises(TransferSegError, match="2 class channels .* but num_classes is 3"):
        view_probabilities(np.zeros((2,) + SHAPE, np.uint8), 3)
    with pytest.raises(TransferSegError, match="different numbers of class channels"):
        view_disagreement([np.zeros((2,) + SHAPE, np.uint8), np.zeros((3,) + SHAPE, np.uint8),
                           np.zeros(SHAPE, np.uint8)])
    with pytest.raises(TransferSegError, match="threshold is a number in"):
        staple([np.zeros(SHAPE, np.uint8)] * 3, threshold=0)
    with pytest.raises(TransferSegError, match="the fused segmentation is 5×7×7 but the views are 5×7×6"):
        disagreement_summary([np.zeros(SHAPE, np.uint8)] * 3, np.zeros((5, 7, 7), np.uint8))
