"""The calcification-cluster detector (TransferSegLib.calcifications), its speck classifier and recipe.

A classifier is fitted once per module on small phantoms (seeds 1000+, about 10 s), then: a
cluster painted on a phantom without lesions is found where it was painted, as a calcification
cluster, at two pixel sizes and at the same place in mm; phantoms without clusters give at most
one false cluster; the clustering rules; the classifier through a model card; cancel.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import ndimage

from TransferSegLib.calcifications import (DEFAULTS, FEATURES, KIND, detect_calcification_clusters, group_specks,
                                           speck_candidates, speck_features)
from conftest import save_tiny_mass_ahnet
from TransferSegLib.heatmaps import Detection, box_contains
from TransferSegLib.models import load_model, save_model
from TransferSegLib.nets import SpeckClassifier, build_network
from TransferSegLib.phantoms import dbt_phantom
from TransferSegLib.progress import CancelToken, Cancelled
from TransferSegLib.training.specks import choose_threshold, fit_classifier, label_candidates, validate_specks
from TransferSegLib.volume import TransferSegError

SHAPE_MM = (32, 102.4, 76.8)   # slices, and the default phantom's field of view in mm


def _grid(pixel_mm: float) -> tuple:
    return (SHAPE_MM[0], round(SHAPE_MM[1] / pixel_mm), round(SHAPE_MM[2] / pixel_mm))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    features, labels = [], []
    for n, pixel in enumerate((0.4, 0.3, 0.5, 0.4, 0.25, 0.6, 0.35, 0.45, 0.3, 0.4, 0.5, 0.2)):
        volume, boxes = dbt_phantom(1000 + n, _grid(pixel), pixel_mm=pixel, calcification_clusters=2)
        candidates = speck_candidates(volume)
        features.append(speck_features(volume, candidates))
        labels.append(label_candidates(candidates.kji, boxes, volume.spacing, 0.35))
    settings = {"hidden": [16], "steps": 600, "batch_size": 256, "lr": 0.01, "weight_decay": 0.0}
    return fit_classifier(np.concatenate(features), np.concatenate(labels), settings, seed=0)


def _paint_cluster(volume, centre_mm, offsets_mm, contrast=0.3, size_mm=0.4):
    """Add round specks (Gaussian, ``size_mm`` across) at ``centre_mm`` + offsets (k, j, i mm), each on
    its slice with the echoes a limited-angle sweep leaves on the slices around it (smeared along j
    over 2·d·tan 7.5° mm, fading with the distance d), as the DBT phantom's acquisition does."""
    spacing = np.asarray(volume.spacing, float)
    specks = np.zeros(volume.shape, np.float32)
    jj, ii = np.mgrid[0:volume.shape[1], 0:volume.shape[2]]
    sigma = max(size_mm / 2 / spacing[1], 0.6)
    for offset in offsets_mm:
        k, j, i = np.rint((np.asarray(centre_mm) + offset) / spacing).astype(int)
        specks[k] = np.maximum(specks[k], np.exp(-((jj - j) ** 2 + (ii - i) ** 2) / (2 * sigma**2)))
    painted = specks.copy()
    for d in (1, 2, 3):
        length = max(1, int(round(2 * d * spacing[0] * np.tan(np.radians(7.5)) / spacing[1])) | 1)
        echo = 0.25 * np.exp(-d / 2) * ndimage.uniform_filter1d(specks, length, axis=1)
        painted[d:] += echo[:-d]
        painted[:-d] += echo[d:]
    return volume.with_array(np.clip(volume.array + contrast * painted, 0, 1).astype(np.float32))


CLUSTER_MM = [(0, 0, 0), (0, 1.5, 0.5), (1, -1.0, 1.2), (0, 0.4, -1.6), (-1, -1.8, -0.7), (1, 2.2, 1.9)]


CENTRE_MM = (16.0, 50.0, 30.0)   # inside the breast, about 30 mm from the chest wall


@functools.lru_cache(maxsize=None)
def _blank(pixel_mm: float):
    """One breast (seed 1200) without lesions, the same in mm at each pixel size."""
    volume, boxes = dbt_phantom(1200, _grid(pixel_mm), pixel_mm=pixel_mm, masses=0, calcification_clusters=0)
    assert boxes == []
    return volume


def _painted(pixel_mm: float):
    return _paint_cluster(_blank(pixel_mm), CENTRE_MM, CLUSTER_MM), CENTRE_MM


def test_a_painted_cluster_is_found_where_it_was_painted_at_two_pixel_sizes(classifier):
    found = {}
    for pixel in (0.4, 0.2):
        volume, centre_mm = _painted(pixel)
        detections = detect_calcification_clusters(volume, classifier)
        assert len(detections) == 1, (pixel, [d.to_dict() for d in detections])
        d = detections[0]
        assert d.kind == KIND == "calcification_cluster" and 0.0 <= d.confidence <= 1.0
        spacing = np.asarray(volume.spacing)
        lo = (np.asarray(centre_mm) + np.min(CLUSTER_MM, axis=0)) / spacing
        hi = (np.asarray(centre_mm) + np.max(CLUSTER_MM, axis=0)) / spacing + 1
        assert box_contains([*np.floor(lo), *np.ceil(hi)], d.position_kji), (pixel, d.to_dict())
        assert all(isinstance(v, int) for v in d.position_kji) and len(d.box_kji) == 6
        assert np.allclose(d.position_ras, volume.ijk_to_ras_points(np.array([d.position_kji], float))[0], atol=1e-3)
        # the specks' box in mm (first and last voxel centres)
        found[pixel] = np.concatenate([np.multiply(d.box_kji[:3], spacing), np.multiply(np.subtract(d.box_kji[3:], 1), spacing)])
    # the same cluster in mm whatever the pixel size: its specks' box agrees within a coarse pixel or so
    assert np.abs(found[0.4] - found[0.2]).max() <= 0.6, found


def test_the_speck_features_are_measured_in_mm():
    """One 0.6 mm speck at 0.4 and 0.2 mm pixels: its radial profile (sampled in mm) is the same."""
    rings = [n for n, name in enumerate(FEATURES) if name.startswith("ring_")]
    profiles = []
    for pixel in (0.4, 0.2):
        volume = _paint_cluster(_blank(pixel), CENTRE_MM, [(0, 0, 0)], size_mm=0.6)
        candidates = speck_candidates(volume)
        at = np.rint(np.asarray(CENTRE_MM) / np.asarray(volume.spacing))
        [n] = np.flatnonzero(np.all(np.abs(candidates.kji - at) <= [0, 1, 1], axis=1))
        profiles.append(speck_features(volume, candidates)[n, rings])
    assert np.all(np.diff(profiles[0]) < 0) and profiles[0][0] > 0.6 and profiles[0][-1] < 0.2, profiles
    assert np.abs(profiles[0] - profiles[1]).max() < 0.15, profiles


def test_phantoms_without_clusters_give_at_most_one_false_cluster(classifier):
    for seed in (1300, 1301, 1302):
        volume, boxes = dbt_phantom(seed, calcification_clusters=0)
        assert all(b["kind"] == "mass" for b in boxes)
        detections = detect_calcification_clusters(volume, classifier)
        assert len(detections) <= 1, (seed, [d.to_dict() for d in detections])


def test_phantom_specks_lie_in_their_cluster_box_and_are_bright():
    volume, boxes = dbt_phantom(3, calcification_clusters=2)
    clusters = [b for b in boxes if b["kind"] == KIND]
    assert len(clusters) == 2
    for box in clusters:
        assert 5 <= len(box["specks_kji"]) == len(box["speck_sizes_mm"]) <= 20
        inside = [(k, j, i) for k, j, i in box["specks_kji"] if 0 <= j < volume.shape[1] and 0 <= i < volume.shape[2]]
        assert len(inside) >= len(box["specks_kji"]) - 2      # a speck centred just off the grid is kept in part
        for k, j, i in inside:
            assert box_contains(box, (k, j, i))
            patch = volume.array[k, max(j - 6, 0):j + 7, max(i - 6, 0):i + 7]
            assert volume.array[k, j, i] > np.median(patch) + 0.05


def test_grouping_rules():
    spacing = (1.0, 0.1, 0.1)

    def specks(*mm):   # (k, j mm, i mm) → voxels
        return np.array([[k, round(j / 0.1), round(i / 0.1)] for k, j, i in mm])

    sure = lambda n: np.full(n, 0.95)
    two = specks((10, 50, 50), (10, 51, 50))
    assert group_specks(two, sure(2), spacing, {"threshold": 0}) == []
    three = specks((10, 50, 50), (10, 53, 50), (11, 50, 54))       # 3 and 4 mm apart: linked
    [cluster] = group_specks(three, sure(3), spacing, {"threshold": 0})
    assert cluster.kind == "calcification_cluster"
    assert cluster.box_kji == [10, 500, 500, 12, 531, 541] and box_contains(cluster.box_kji, cluster.position_kji)
    gap = DEFAULTS["link_mm"] + 0.5
    spread = specks((10, 50, 50), (10, 50 + gap, 50), (10, 50 + 2 * gap, 50))     # beyond the link: none
    assert group_specks(spread, sure(3), spacing, {"threshold": 0}) == []
    deep = specks((10, 50, 50), (16, 50, 51), (22, 50, 52))        # 1 mm apart in-plane, 6 slices apart
    assert group_specks(deep, sure(3), spacing, {"threshold": 0, "link_depth_mm": 5}) == []
    far = np.concatenate([three, three + [0, 300, 0]])              # the same 3 cm further on
    clusters = group_specks(far, sure(6), spacing, {"threshold": 0})
    assert len(clusters) == 2 and {c.position_kji[1] // 100 for c in clusters} == {5, 8}
    # unlikely specks do not count; more and surer specks make a more confident cluster
    assert group_specks(three, np.array([0.95, 0.95, 0.2]), spacing, {"threshold": 0}) == []
    four = specks((10, 50, 50), (10, 53, 50), (11, 50, 54), (10, 52, 52))
    c3 = group_specks(three, np.full(3, 0.7), spacing, {"threshold": 0})[0].confidence
    c4 = group_specks(four, np.full(4, 0.7), spacing, {"threshold": 0})[0].confidence
    c3_sure = group_specks(three, np.full(3, 0.9), spacing, {"threshold": 0})[0].confidence
    assert c3 == pytest.approx(0.7 ** 3) and c4 > c3 and c3_sure > c3
    assert group_specks(three, np.full(3, 0.7), spacing, {"threshold": 0.5}) == []   # 0.343 < 0.5
    with pytest.raises(TransferSegError, match="min_specks"):
        group_specks(three, sure(3), spacing, {"min_specks": 1})
    with pytest.raises(TransferSegError, match="not one of"):
        group_specks(three, sure(3), spacing, {"linkage": 5})


def test_the_classifier_round_trips_through_a_model_card(tmp_path, classifier):
    card = {"name": "specks-test", "version": "1.0.0", "task": "heatmap",
            "labels": [{"name": "calcification cluster", "label": 1}],
            "architecture": {"name": "speck_classifier", "config": {"in_features": len(FEATURES), "hidden": [16]}},
            "preprocessing": {}, "patch_size": [1, 1, 1], "working_spacing_mm": None}
    path = save_model(classifier, card, tmp_path)
    assert (tmp_path / "specks-test.safetensors").exists() and not list(tmp_path.glob("*.pt"))
    loaded = load_model(path).network
    assert isinstance(loaded, SpeckClassifier) and not loaded.training
    x = torch.randn(64, len(FEATURES)) * 3
    assert torch.equal(loaded(x), classifier(x))
    assert torch.equal(loaded.mean, classifier.mean) and not torch.equal(loaded.mean, torch.zeros(len(FEATURES)))
    with pytest.raises(TransferSegError, match="features"):
        loaded(torch.zeros(3, len(FEATURES) + 1))
    with pytest.raises(TransferSegError, match="hidden"):
        build_network("speck_classifier", {"in_features": 4, "hidden": [0]})


def test_cancel_stops_between_slices(classifier):
    volume, _ = dbt_phantom(1201)
    token, calls = CancelToken(), []

    def progress(fraction, stage):
        calls.append((fraction, stage))
        if len(calls) == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        detect_calcification_clusters(volume, classifier, progress=progress, cancel=token)
    assert len(calls) == 3 and all(stage == "calcifications" for _, stage in calls)


def test_the_recipe_keeps_held_out_seeds_out_of_training():
    base = {"recipe": "specks", "name": "x", "labels": [{"name": "calcification cluster", "label": 1}],
            "data": {"phantom": "dbt", "count": 10, "seed": 1000}, "validation": {"count": 5, "seed": 4000}}
    assert validate_specks(base)["classifier"]["steps"] > 0
    with pytest.raises(TransferSegError, match="held-out"):
        validate_specks(dict(base, data={"phantom": "dbt", "count": 10, "seed": 4995}))
    with pytest.raises(TransferSegError, match="held-out"):
        validate_specks(dict(base, validation={"count": 5, "seed": 6000}))
    with pytest.raises(TransferSegError, match="threshold"):
        validate_specks(dict(base, detector={"threshold": 0.3}))


def test_the_threshold_is_one_half_unless_false_clusters_need_more():
    box = [0, 0, 0, 5, 10, 10]
    cases = [{"clusters": np.array([box])} for _ in range(4)]

    def at(confidence, inside=True):
        return Detection([1, 1, 1] if inside else [3, 50, 50], None, confidence, box, kind=KIND)

    assert choose_threshold([[at(0.9)], [at(0.8)], [at(0.3, False)], []], cases, 0.25) == 0.5
    # false clusters at 0.9 and 0.7 in 4 volumes: 0.7 makes 0.5 per volume, so the threshold rises
    # to the lowest confidence above it (0.8, a true cluster), where there is 0.25 per volume
    assert choose_threshold([[at(0.95), at(0.9, False)], [at(0.8)], [at(0.7, False)], []], cases, 0.25) == 0.8


def test_one_card_one_method_detects_masses_and_clusters_each_with_its_kind(tmp_path, classifier):
    """The dbt_lesions method behind one composed card: masses from a heatmap network on its working
    grid (a small AH-Net here; the shipped detector is this composition), clusters from the speck
    classifier at the input's own 0.2 mm pixels; each detection has its kind, lands on the input
    grid, and the painted cluster is found where it was painted."""
    from TransferSegLib.models import compose_models
    from TransferSegLib.pipeline import run

    card = {"name": "specks-test", "version": "1.0.0", "task": "heatmap",
            "labels": [{"name": "calcification cluster", "label": 1}],
            "architecture": {"name": "speck_classifier", "config": {"in_features": len(FEATURES), "hidden": [16]}},
            "preprocessing": {}, "patch_size": [1, 1, 1], "working_spacing_mm": None}
    specks = save_model(classifier, card, tmp_path / "specks")
    masses = save_tiny_mass_ahnet(tmp_path / "masses")
    composed = compose_models({"masses": str(masses), "calcifications": str(specks)}, tmp_path / "composed",
                              name="dbt-two-kinds", method="dbt_lesions", labels_from="masses",
                              method_config={"calcifications": dict(DEFAULTS)})
    volume, centre_mm = _painted(0.2)
    result = run(volume, str(composed), device="cpu")
    assert result.heatmap.spacing != volume.spacing  # the masses' heatmap stays on the working grid
    kinds = {d.kind for d in result.detections}
    assert "calcification_cluster" in kinds and kinds <= {"mass", "calcification_cluster"}
    centre = np.asarray(centre_mm) / np.asarray(volume.spacing)
    clusters = [d for d in result.detections if d.kind == KIND]
    assert any(box_contains(d.box_kji, centre) for d in clusters), [d.box_kji for d in clusters]
    assert all(0 <= p < n for d in result.detections for p, n in zip(d.position_kji, volume.shape))
    assert result.summary()["detections_by_kind"][KIND] == len(clusters)
