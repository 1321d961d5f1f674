"""The mass stage of the DBT detector (TransferSegLib/masses.py): blob and heatmap candidates on
the working grid, their features in mm, the most probable of neighbours kept, and the
``mass_candidates`` recipe's labels and config checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import save_tiny_mass_ahnet
from TransferSegLib.heatmaps import box_contains
from TransferSegLib.masses import (DEFAULTS, FEATURES, KIND, SCALES_MM, detect_masses, mass_candidates, mass_features,
                                   select_masses)
from TransferSegLib.models import save_model
from TransferSegLib.nets import SpeckClassifier
from TransferSegLib.training.mass_candidates import label_mass_candidates, validate_mass_candidates
from TransferSegLib.volume import TransferSegError, Volume

CENTRE_MM = (12.0, 20.0, 24.0)


def _breast(pixel_mm: float, radius_mm: float = 4.0, seed: int = 0) -> Volume:
    """A 24 × 40 × 48 mm block of even tissue (0.3, mild noise) with one brighter ball (0.6) of
    ``radius_mm`` in-plane (two thirds of it across slices) at CENTRE_MM."""
    rng = np.random.default_rng(seed)
    shape = (24, round(40 / pixel_mm), round(48 / pixel_mm))
    k, j, i = np.meshgrid(np.arange(shape[0]) * 1.0, np.arange(shape[1]) * pixel_mm, np.arange(shape[2]) * pixel_mm,
                          indexing="ij")
    r = np.sqrt(((k - CENTRE_MM[0]) * 1.5) ** 2 + (j - CENTRE_MM[1]) ** 2 + (i - CENTRE_MM[2]) ** 2)
    ball = np.clip((radius_mm - r) / pixel_mm + 0.5, 0.0, 1.0)
    array = (0.3 + 0.3 * ball + rng.normal(0.0, 0.01, shape)).astype(np.float32)
    return Volume(array, spacing=(1.0, pixel_mm, pixel_mm))


def _inside_the_ball(kji, volume: Volume, radius_mm: float = 4.0) -> bool:
    d = (np.asarray(kji) - np.asarray(CENTRE_MM) / np.asarray(volume.spacing)) * np.asarray(volume.spacing)
    return bool(np.hypot(d[1], d[2]) < radius_mm and abs(d[0]) * 1.5 < radius_mm)


def _centre_voxel(volume: Volume) -> np.ndarray:
    return np.round(np.asarray(CENTRE_MM) / np.asarray(volume.spacing)).astype(int)


def test_a_ball_is_a_candidate_at_its_centre_at_the_scale_of_its_size():
    """The blob filter answers most at σ ≈ r / √2: a 2.5 mm and a 6 mm ball each get a candidate
    at their centre whose radius (σ√2 of its scale) is within a scale step (1.5 times) of their own."""
    for radius in (2.5, 6.0):
        volume = _breast(0.5, radius)
        candidates = mass_candidates(volume, np.zeros(volume.shape, np.float32))
        centre = _centre_voxel(volume)
        distance = np.linalg.norm((candidates.kji - centre) * np.asarray(volume.spacing), axis=1)
        near = distance <= 1.0
        assert near.any(), (radius, candidates.kji[np.argsort(distance)[:3]])
        ratio = candidates.radius_mm[near] / radius
        assert ((ratio >= 1 / 1.5) & (ratio <= 1.5)).any(), (radius, candidates.radius_mm[near])
        assert np.isclose(candidates.radius_mm[:, None] / math.sqrt(2), np.asarray(SCALES_MM)[None], rtol=1e-5).any(axis=1).all()
        assert (candidates.from_heatmap == 0).all()  # no heatmap peak above the floor in an all-zero heatmap


def test_heatmap_peaks_are_candidates_too():
    volume = _breast(0.5)
    heatmap = np.zeros(volume.shape, np.float32)
    heatmap[5, 10, 10] = 0.4      # a peak far from the ball, in even tissue
    candidates = mass_candidates(volume, heatmap)
    assert [5, 10, 10] in candidates.kji[candidates.from_heatmap == 1].tolist()


def test_the_features_are_measured_in_mm():
    """The same ball at 0.5 and 0.25 mm pixels: its candidate's profile, shape and contrast agree."""
    rows = {}
    for pixel in (0.5, 0.25):
        volume = _breast(pixel, 4.0)
        candidates = mass_candidates(volume, np.zeros(volume.shape, np.float32))
        features = mass_features(volume, np.zeros(volume.shape, np.float32), candidates)
        assert features.shape == (len(candidates), len(FEATURES)) and np.isfinite(features).all()
        distance = np.linalg.norm((candidates.kji - _centre_voxel(volume)) * np.asarray(volume.spacing), axis=1)
        best = np.flatnonzero(distance <= 1.0)
        best = best[np.argmin(np.abs(candidates.radius_mm[best] - 4.0))]     # at the scale nearest the ball's
        rows[pixel] = dict(zip(FEATURES, features[best]))
    for name in ("log_radius_mm", "log_contrast", "ring_0.5", "ring_1", "ring_1.6", "edge_sharpness", "slice_2"):
        assert abs(rows[0.5][name] - rows[0.25][name]) <= 0.15, (name, rows[0.5][name], rows[0.25][name])
    # a mass's plateau and edge: bright inside, background outside
    assert rows[0.5]["ring_0.5"] > 0.8 and rows[0.5]["ring_2"] < 0.2


def test_a_ball_denser_than_the_densest_tissue_tops_the_density_features():
    """Two balls as bright as each other against their surround: one in fat (0.3 → 0.6), one in
    dense tissue at 0.6 that reaches 0.68 (a mass a little denser than glandular tissue). Only the
    second is denser than the breast's dense level, and it tops the breast's candidates."""
    rng = np.random.default_rng(3)
    shape, p = (24, 100, 120), 0.5
    k, j, i = np.meshgrid(np.arange(shape[0]) * 1.0, np.arange(shape[1]) * p, np.arange(shape[2]) * p, indexing="ij")
    array = np.full(shape, 0.3, np.float32)
    array[:, :, 60:] = 0.6                                                      # dense tissue on the right half

    def ball(cj, ci):
        r = np.sqrt(((k - 12.0) * 1.5) ** 2 + (j - cj) ** 2 + (i - ci) ** 2)
        return np.clip((4.0 - r) / p + 0.5, 0.0, 1.0)

    fat_ball, dense_ball = ball(25.0, 15.0), ball(25.0, 45.0)
    array = array * (1 - fat_ball) + 0.6 * fat_ball
    array = array * (1 - dense_ball) + 0.68 * dense_ball
    volume = Volume((array + rng.normal(0.0, 0.005, shape)).astype(np.float32), spacing=(1.0, p, p))
    candidates = mass_candidates(volume, np.zeros(shape, np.float32))
    features = mass_features(volume, np.zeros(shape, np.float32), candidates)
    column = {name: features[:, n] for n, name in enumerate(FEATURES)}
    distance = {name: np.linalg.norm((candidates.kji - np.array([12, 50, c])) * np.asarray(volume.spacing), axis=1)
                for name, c in (("fat", 30), ("dense", 90))}
    at = {name: int(np.argmin(d)) for name, d in distance.items()}
    assert all(distance[name][at[name]] <= 1.0 for name in at), distance
    dense, fat = at["dense"], at["fat"]
    assert column["peak_vs_dense99"][dense] > 0 > column["peak_vs_dense99"][fat] - 0.02
    assert column["centre_vs_dense95"][dense] > column["centre_vs_dense95"][fat] + 0.05
    assert column["peak_vs_top"][dense] == 0.0 and column["log_peak_rank"][dense] == 0.0
    assert column["inner_above_dense95"][dense] == 1.0
    # the breast's levels are the same for every candidate
    assert np.ptp(column["dense95"]) == 0 and np.ptp(column["dense50"]) == 0


def test_the_local_peak_equals_a_uniform_then_a_maximum_filter_over_the_whole_volume():
    """The density features read each candidate's block only; the edges are the volume's own
    (mode "nearest"), corners and faces included."""
    from scipy import ndimage

    from TransferSegLib.masses import _local_peak

    image = np.random.default_rng(4).random((12, 40, 30)).astype(np.float32)
    k, j, i = np.array([0, 5, 11, 6, 11]), np.array([0, 20, 39, 1, 38]), np.array([0, 15, 29, 28, 1])
    for mean_size, reach in (((1, 3, 3), (3, 5, 5)), ((1, 5, 3), (3, 3, 7))):
        whole = ndimage.maximum_filter(ndimage.uniform_filter(image, size=mean_size, mode="nearest"), size=reach,
                                       mode="nearest")
        np.testing.assert_allclose(_local_peak(image, k, j, i, mean_size, reach), whole[k, j, i], atol=1e-6)
    assert _local_peak(image, k[:0], j[:0], i[:0], (1, 3, 3), (3, 5, 5)).shape == (0,)


def test_a_classifier_fitted_on_fewer_features_reads_the_first_ones():
    """Features are only ever appended: the 2.1.0 classifier (75 features) runs on this version;
    one reading more features than this version computes is a clear error."""
    volume = _breast(0.5, 4.0)
    heatmap = np.zeros(volume.shape, np.float32)
    full, first = _contrast_classifier(), SpeckClassifier(75, ())
    with torch.no_grad():
        first.layers[0].weight.copy_(full.layers[0].weight[:, :75])
        first.layers[0].bias.copy_(full.layers[0].bias)
    assert FEATURES.index("log_contrast") < 75
    same = [d.to_dict() for d in detect_masses(volume, heatmap, full, {"threshold": 0.5})]
    assert same and [d.to_dict() for d in detect_masses(volume, heatmap, first, {"threshold": 0.5})] == same
    with pytest.raises(TransferSegError, match=f"reads {len(FEATURES) + 1} features"):
        detect_masses(volume, heatmap, SpeckClassifier(len(FEATURES) + 1, ()), {"threshold": 0.5})


def test_the_most_probable_of_neighbours_stands_for_them():
    kji = np.array([[5, 20, 20], [5, 24, 20], [5, 60, 60], [12, 20, 20], [5, 90, 90]])
    probabilities = np.array([0.9, 0.95, 0.6, 0.7, 0.2])
    found = select_masses(kji, probabilities, np.full(5, 3.0), (1.0, 0.5, 0.5), {"threshold": 0.5, "merge_mm": 5.0})
    # [5, 24, 20] (0.95) stands for [5, 20, 20] 2 mm away; 7 slices up is another mass; 0.2 is below threshold
    assert [d.position_kji for d in found] == [[5, 24, 20], [12, 20, 20], [5, 60, 60]]
    assert [d.confidence for d in found] == [0.95, 0.7, 0.6] and {d.kind for d in found} == {KIND}
    assert all(box_contains(d.box_kji, d.position_kji) for d in found)
    assert len(select_masses(kji, probabilities, np.full(5, 3.0), (1.0, 0.5, 0.5), {"threshold": 0.0, "max_detections": 2})) == 2


def test_mass_settings_are_checked():
    for bad, match in (({"merge": 3}, "not one of"), ({"merge_mm": -1}, "≥ 0"), ({"max_detections": 2.5}, "whole number"),
                       ({"threshold": float("nan")}, "≥ 0")):
        with pytest.raises(TransferSegError, match=match):
            select_masses(np.zeros((0, 3)), np.zeros(0), np.zeros(0), (1, 1, 1), bad)
    volume = _breast(0.5)
    with pytest.raises(TransferSegError, match="same shape"):
        mass_candidates(volume, np.zeros((2, 2, 2), np.float32))


def test_candidates_are_labelled_by_the_mass_near_whose_centre_they_lie():
    # a 10 mm mass at (10, 40, 40) on a 1 × 0.5 × 0.5 mm grid: box, centre, diameter
    masses = [[6, 30, 30, 15, 51, 51, 10.0, 40.0, 40.0, 10.0]]
    kji = np.array([[10, 40, 40], [10, 46, 40], [10, 49, 49], [10, 70, 70], [3, 40, 40]])
    labels = label_mass_candidates(kji, masses, (1.0, 0.5, 0.5))
    # at the centre and 3 mm from it: a mass; in its box but 6.4 mm out: not used; outside: not a mass
    assert labels.tolist() == [1.0, 1.0, -1.0, 0.0, 0.0]


def test_the_recipe_config_is_checked():
    base = {"recipe": "mass_candidates", "name": "m", "labels": [{"name": "mass", "label": 1}],
            "heatmap_model": "Resources/models/dbt-lesion-ahnet.json",
            "data": {"phantom": "dbt", "count": 4, "seed": 2000}, "validation": {"count": 2, "seed": 4000}}
    checked = validate_mass_candidates(base)
    assert checked["data"] == [base["data"]] and checked["target_fp_per_volume"] == 0.5
    with pytest.raises(TransferSegError, match="held-out"):
        validate_mass_candidates(dict(base, validation={"count": 5, "seed": 5000}))
    with pytest.raises(TransferSegError, match="masses teach"):
        validate_mass_candidates(dict(base, data={"phantom": "dbt", "count": 4, "seed": 2000, "options": {"masses": 0}}))
    with pytest.raises(TransferSegError, match="threshold"):
        validate_mass_candidates(dict(base, detector={"threshold": 0.3}))
    with pytest.raises(TransferSegError, match="unknown key"):
        validate_mass_candidates(dict(base, epochs=3))


def _contrast_classifier() -> SpeckClassifier:
    """Logistic regression on the contrast alone: the brightest blob is the most probable mass."""
    network = SpeckClassifier(len(FEATURES), ())
    with torch.no_grad():
        network.layers[0].weight.zero_()
        network.layers[0].weight[0, FEATURES.index("log_contrast")] = 4.0
        network.layers[0].bias.fill_(4.0 * 2.5)     # contrast 0.3 of the reference 0.6: log ≈ −0.7
    return network.eval()


def test_detect_masses_finds_the_ball():
    volume = _breast(0.5, 4.0)
    found = detect_masses(volume, np.zeros(volume.shape, np.float32), _contrast_classifier(), {"threshold": 0.5})
    assert found and found[0].kind == KIND
    assert _inside_the_ball(found[0].position_kji, volume), found[0].to_dict()


def test_the_composed_detector_rescores_its_masses_with_a_third_component(tmp_path):
    """dbt_lesions with ``mass_candidates``: masses come from the candidate stage (its settings in
    the method's config), land on the input grid, and the ball is the most probable."""
    from TransferSegLib.calcifications import DEFAULTS as CALCIFICATIONS
    from TransferSegLib.calcifications import FEATURES as SPECK_FEATURES
    from TransferSegLib.models import compose_models
    from TransferSegLib.pipeline import run

    classifier = {"preprocessing": {}, "patch_size": [1, 1, 1], "working_spacing_mm": None, "version": "1.0.0",
                  "task": "heatmap", "labels": [{"name": "lesion", "label": 1}]}
    specks = save_model(SpeckClassifier(len(SPECK_FEATURES), (4,)), dict(
        classifier, name="specks-test", architecture={"name": "speck_classifier",
                                                      "config": {"in_features": len(SPECK_FEATURES), "hidden": [4]}}),
        tmp_path / "specks")
    rescorer = save_model(_contrast_classifier(), dict(
        classifier, name="masses-rescore", architecture={"name": "speck_classifier",
                                                         "config": {"in_features": len(FEATURES), "hidden": []}}),
        tmp_path / "rescore")
    masses = save_tiny_mass_ahnet(tmp_path / "masses")
    composed = compose_models({"masses": str(masses), "calcifications": str(specks), "mass_candidates": str(rescorer)},
                              tmp_path / "composed", name="dbt-rescored", method="dbt_lesions", labels_from="masses",
                              method_config={"calcifications": dict(CALCIFICATIONS, threshold=1.0),
                                             "masses": dict(DEFAULTS, threshold=0.5)})
    volume = _breast(0.25, 4.0)
    result = run(volume, str(composed), device="cpu")
    found = [d for d in result.detections if d.kind == KIND]
    assert found, [d.to_dict() for d in result.detections]
    top = max(found, key=lambda d: d.confidence)
    assert _inside_the_ball(top.position_kji, volume), top.to_dict()
    assert all(0 <= p < n for d in result.detections for p, n in zip(d.position_kji, volume.shape))


def test_the_recipe_fits_a_classifier_on_the_shipped_heatmaps_and_reuses_its_cases(tmp_path):
    """Three training and two validation phantoms (two masses each) through the shipped detector's
    heatmap: the recipe writes a loadable classifier with its threshold and metrics, and a rerun
    reads the cached heatmaps instead of running the network again."""
    from pathlib import Path

    from TransferSegLib.models import DEFAULT_DETECTION_MODEL, find_model, load_model
    from TransferSegLib.training.mass_candidates import mass_candidates_recipe

    config = {"recipe": "mass_candidates", "name": "masses-tiny", "labels": [{"name": "mass", "label": 1}],
              "heatmap_model": str(find_model(DEFAULT_DETECTION_MODEL)),
              "data": {"phantom": "dbt", "count": 3, "seed": 2000, "options": {"masses": 2}},
              "validation": {"count": 2, "seed": 4000, "options": {"masses": 2}},
              "classifier": {"steps": 60}}
    card_path = mass_candidates_recipe(config, tmp_path / "run")
    loaded = load_model(card_path)
    assert loaded.card["architecture"] == {"name": "speck_classifier", "config": {"in_features": len(FEATURES), "hidden": [32, 16]}}
    assert isinstance(loaded.network, SpeckClassifier)
    card = loaded.card
    assert card["masses"]["features"] == list(FEATURES) and card["masses"]["settings"]["threshold"] >= 0.5
    assert card["training"]["mass_candidates"] > 0 and card["training"]["phantoms"] == 3
    validation = card["metrics"]["validation"]
    assert validation["masses"] == 4 and validation["volumes"] == 2 and 0 <= validation["tpr_at_fp_per_volume"]["1.0"] <= 1
    cached = sorted(Path(tmp_path / "run" / "cases").rglob("*.npz"))
    assert len(cached) == 5
    stamps = [p.stat().st_mtime_ns for p in cached]
    mass_candidates_recipe(config, tmp_path / "run")
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_a_cancelled_mass_stage_stops():
    from TransferSegLib.progress import CancelToken, Cancelled

    volume = _breast(0.5)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        detect_masses(volume, np.zeros(volume.shape, np.float32), _contrast_classifier(), cancel=token)
