"""AH-Net eq. (5) heatmaps, NMS peak finding and the paper's FROC, against hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest

from TransferSegLib.heatmaps import box_contains, find_peaks, gaussian_heatmap
from TransferSegLib.metrics import froc
from TransferSegLib.volume import TransferSegError, Volume


def test_heatmap_peaks_at_the_box_centre_with_sigma_from_its_extent():
    box = [4, 10, 20, 8, 30, 28]  # extents 4, 20, 8 voxels; centre (5.5, 19.5, 23.5)
    h = gaussian_heatmap((12, 40, 40), [box])
    top = np.unravel_index(np.argmax(h), h.shape)
    assert top in {(5, 19, 23), (5, 19, 24), (5, 20, 23), (5, 20, 24), (6, 19, 23), (6, 20, 24), (6, 19, 24),
                   (6, 20, 23)}
    # along j the profile is exp(-x²/2σ²) with σ = 20/4 = 5: one σ from the centre it falls to e^-1/2
    j = np.arange(40)
    profile = np.exp(-0.5 * ((j - 19.5) / 5.0) ** 2)
    k_i = np.exp(-0.5 * ((5 - 5.5) / 1.0) ** 2) * np.exp(-0.5 * ((23 - 23.5) / 2.0) ** 2)
    np.testing.assert_allclose(h[5, :, 23], profile * k_i, atol=1e-6)
    assert h.max() <= 1.0 and h.dtype == np.float32


def test_density_normalisation_integrates_to_one_and_lesions_sum():
    box = [10, 10, 10, 22, 26, 30]
    h = gaussian_heatmap((32, 40, 40), [box], normalise="density", dtype=np.float64)
    assert h.sum() == pytest.approx(1.0, rel=1e-3)
    two = gaussian_heatmap((32, 40, 40), [box, [0, 0, 0, 4, 4, 4]])
    one = gaussian_heatmap((32, 40, 40), [box])
    other = gaussian_heatmap((32, 40, 40), [[0, 0, 0, 4, 4, 4]])
    np.testing.assert_allclose(two, one + other, atol=1e-6)  # eq. (5) sums over lesions
    with pytest.raises(TransferSegError, match="empty"):
        gaussian_heatmap((4, 4, 4), [[2, 2, 2, 2, 3, 3]])


def test_find_peaks_suppresses_neighbours_and_reports_ras_and_half_max_box():
    h = np.zeros((10, 40, 40), np.float32)
    h += gaussian_heatmap(h.shape, [[3, 8, 8, 7, 16, 16]]) * 0.9
    h += gaussian_heatmap(h.shape, [[3, 25, 25, 7, 33, 33]]) * 0.6
    h[5, 12, 14] += 0.01  # a bump beside the first peak: not a separate detection
    volume = Volume(np.zeros(h.shape), spacing=(1.0, 0.5, 0.5), directions=np.diag([-1.0, -1.0, 1.0]),
                    origin=(10.0, 20.0, -5.0))
    peaks = find_peaks(h, volume, threshold=0.2, min_distance=(2, 4, 4))
    assert len(peaks) == 2
    assert peaks[0].confidence > peaks[1].confidence
    assert box_contains([3, 8, 8, 7, 16, 16], peaks[0].position_kji)
    assert box_contains([3, 25, 25, 7, 33, 33], peaks[1].position_kji)
    k, j, i = peaks[0].position_kji
    np.testing.assert_allclose(peaks[0].position_ras, [10.0 - 0.5 * i, 20.0 - 0.5 * j, -5.0 + k])
    # half maximum of exp(-x²/2σ²) is at x = σ·√(2 ln 2) ≈ 1.18σ: for σ = 2 voxels a box ~ 2·2.35 wide
    k0, j0, i0, k1, j1, i1 = peaks[1].box_kji
    assert 4 <= j1 - j0 <= 6 and 4 <= i1 - i0 <= 6
    assert find_peaks(h, threshold=0.95) == []


def test_flat_top_counts_once():
    h = np.zeros((5, 9, 9), np.float32)
    h[2, 3:6, 3:6] = 1.0
    peaks = find_peaks(h, threshold=0.5, min_distance=1)
    assert len(peaks) == 1 and peaks[0].position_kji == [2, 4, 4]


def _det(position, confidence):
    return {"position_kji": position, "confidence": confidence}


def test_froc_matches_a_hand_computed_example():
    boxes = [[[0, 0, 0, 4, 4, 4], [10, 10, 10, 14, 14, 14]], [[0, 0, 0, 4, 4, 4]]]  # 3 lesions, 2 volumes
    detections = [
        [_det([1, 1, 1], 0.9), _det([2, 2, 2], 0.8), _det([20, 20, 20], 0.7), _det([11, 11, 11], 0.3)],
        [_det([30, 30, 30], 0.6), _det([1, 2, 3], 0.5)],
    ]
    result = froc(detections, boxes)
    # thresholds 0.9: TP lesion A (TPR 1/3, FP 0); 0.8: second peak in A, not counted again;
    # 0.7: FP 1 → 0.5/vol; 0.6: FP 2 → 1.0/vol; 0.5: lesion C → 2/3; 0.3: lesion B → 3/3
    assert result["tpr"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1.0])
    assert result["fp_per_volume"] == pytest.approx([0, 0, 0, 0.5, 1.0, 1.0, 1.0])
    assert result["tpr_at"][0.01] == pytest.approx(1 / 3)
    assert result["tpr_at"][0.25] == pytest.approx(1 / 3)
    assert result["lesions"] == 3 and result["volumes"] == 2


def test_froc_brute_force_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        boxes = [[[int(a), int(b), int(c), int(a) + 3, int(b) + 3, int(c) + 3]
                  for a, b, c in rng.integers(0, 8, size=(rng.integers(0, 4), 3))] for _ in range(4)]
        detections = [[_det(list(rng.integers(0, 15, size=3)), float(rng.random())) for _ in range(rng.integers(0, 6))]
                      for _ in range(4)]
        result = froc(detections, boxes)
        n_lesions = sum(len(b) for b in boxes)
        for t, fp, tpr in zip(result["thresholds"][1:], result["fp_per_volume"][1:], result["tpr"][1:]):
            kept = [[d for d in dets if d["confidence"] >= t] for dets in detections]
            hit = sum(any(box_contains(b, d["position_kji"]) for d in dets) for dets, bs in zip(kept, boxes) for b in bs)
            false = sum(not any(box_contains(b, d["position_kji"]) for b in bs) for dets, bs in zip(kept, boxes)
                        for d in dets)
            assert fp == pytest.approx(false / 4)
            assert tpr == pytest.approx(hit / n_lesions if n_lesions else 0.0)


def test_froc_refuses_mismatched_lists():
    with pytest.raises(TransferSegError, match="one detection list per volume"):
        froc([[]], [[], []])


def test_found_by_kind_counts_the_lesions_of_the_froc_operating_point():
    from TransferSegLib.metrics import found_by_kind

    mass = {"kind": "mass", "box_kji": [0, 0, 0, 4, 4, 4]}
    cluster = {"kind": "calcification_cluster", "box_kji": [10, 10, 10, 14, 14, 14]}
    boxes = [[mass, cluster], [dict(mass)], [dict(cluster)], []]
    detections = [
        [_det([1, 1, 1], 0.9), _det([20, 20, 20], 0.8), _det([11, 11, 11], 0.4)],
        [_det([2, 2, 2], 0.7)],
        [_det([30, 30, 30], 0.6), _det([12, 12, 12], 0.5)],
        [],
    ]
    # peaks by confidence: 0.9 mass (TP), 0.8 FP (0.25/vol), 0.7 mass (TP), 0.6 FP (0.5/vol), ...
    result = found_by_kind(detections, boxes, rate=0.25)
    assert result["threshold"] == pytest.approx(0.7)
    assert result["kinds"] == {"mass": {"found": 2, "lesions": 2}, "calcification_cluster": {"found": 0, "lesions": 2}}
    curve = froc(detections, boxes, rates=(0.25, 1.0))
    found = sum(k["found"] for k in result["kinds"].values())
    assert found / 4 == pytest.approx(curve["tpr_at"][0.25])  # the same operating point as the FROC's
    everything = found_by_kind(detections, boxes, rate=1.0)["kinds"]
    assert everything["calcification_cluster"] == {"found": 2, "lesions": 2}
    assert found_by_kind([[_det([1, 1, 1], 0.9)]], [[[0, 0, 0, 2, 2, 2]]])["kinds"] == {"lesion": {"found": 1, "lesions": 1}}


def test_min_sigma_widens_only_the_axes_below_the_floor():
    box = [4, 10, 20, 8, 30, 28]  # σ from the box: 1, 5, 2 voxels
    h = gaussian_heatmap((12, 40, 40), [box], min_sigma=[0.5, 3.0, 4.0])  # floors: k and j keep theirs, i widens
    k, j, i = np.arange(12), np.arange(40), np.arange(40)
    expected = (np.exp(-0.5 * ((k - 5.5) / 1.0) ** 2)[:, None, None] * np.exp(-0.5 * ((j - 19.5) / 5.0) ** 2)[None, :, None]
                * np.exp(-0.5 * ((i - 23.5) / 4.0) ** 2)[None, None, :])
    inside = expected >= np.exp(-0.5 * 16)  # each Gaussian is drawn within ±4σ
    np.testing.assert_allclose(h[inside], expected[inside], atol=1e-6)
    np.testing.assert_array_equal(gaussian_heatmap((12, 40, 40), [box], min_sigma=0.5), gaussian_heatmap((12, 40, 40), [box]))
