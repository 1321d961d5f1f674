"""The pipeline on a model's working grid: resample in, run the method, resample back, labels last."""
from __future__ import annotations

import json

import numpy as np
import pytest

from TransferSegLib.inference import sliding_window_inference
from TransferSegLib.methods import METHODS, MethodOutput, get_method, register_method
from TransferSegLib.models import load_model, save_model
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.pipeline import run, spacing_warnings
from TransferSegLib.preprocessing import preprocess
from TransferSegLib.resample import back_to, to_orientation, to_spacing
from TransferSegLib.volume import TransferSegError, Volume


def _card_variant(tiny_model, tmp_path, **changes):
    """A copy of the tiny model's card (same weights file) with some fields changed."""
    card = json.loads(tiny_model.read_text(encoding="utf-8"))
    card.update(changes)
    target = tmp_path / "variant.json"
    target.write_text(json.dumps(card), encoding="utf-8")
    (tmp_path / card["weights"]["file"]).symlink_to(tiny_model.parent / card["weights"]["file"])
    return load_model(target)


def _composed(tiny_model, tmp_path, method, **changes):
    """The tiny model's network as the one component ("image") of a composed model run by ``method``."""
    card = json.loads(tiny_model.read_text(encoding="utf-8"))
    spec = {key: card[key] for key in ("architecture", "preprocessing", "patch_size", "inference")}
    composed = {key: card[key] for key in ("version", "task", "labels")}
    composed.update(name="composed", method={"name": method}, components={"image": spec}, **changes)
    return load_model(save_model({"image": load_model(tiny_model).network}, composed, tmp_path))


@pytest.fixture(scope="module")
def clinical_like():
    volume, labels = ct_phantom(seed=21, shape=(24, 160, 160))  # about 2.4 mm pixels, 7.5 mm slices
    return volume, labels


def test_outputs_come_back_on_the_input_grid_from_the_working_grid(tiny_model, tmp_path, clinical_like):
    volume, _ = clinical_like
    model = _card_variant(tiny_model, tmp_path, working_spacing_mm=[6.0, 4.0, 4.0])
    result = run(volume, model, device="cpu", return_probabilities=True)
    assert result.labels.shape == volume.shape and result.volume is volume
    assert result.probabilities.shape == (3,) + volume.shape and result.probabilities.dtype == np.uint8
    # the same computed by hand: resample, infer, bring the probabilities back, argmax
    working = to_spacing(volume, [6.0, 4.0, 4.0])
    assert working.shape != volume.shape
    spec = model.card
    inferred = sliding_window_inference(preprocess(working.array, spec["preprocessing"]), model.network,
                                        patch_size=spec["patch_size"], overlap=0.25, device="cpu",
                                        return_probabilities=True)
    expected = back_to(inferred.probabilities, working, volume, kind="argmax")
    np.testing.assert_array_equal(result.labels, expected)
    # the returned probabilities are those the labels came from (uint8 rounding aside)
    assert (result.probabilities.argmax(0) == result.labels).mean() > 0.99
    assert "resample" in result.timings and "resample_back" in result.timings


def test_a_card_without_a_working_spacing_runs_on_the_input_grid(tiny_model, clinical_like):
    volume, _ = clinical_like
    model = load_model(tiny_model)
    result = run(volume, model, device="cpu")
    direct = sliding_window_inference(preprocess(volume.array, model.card["preprocessing"]), model.network,
                                      patch_size=model.card["patch_size"], overlap=0.25, device="cpu")
    np.testing.assert_array_equal(result.labels, direct.labels)


def test_a_flipped_file_gives_the_same_segmentation_turned_back(tiny_model, tmp_path, clinical_like):
    volume, _ = clinical_like
    model = _card_variant(tiny_model, tmp_path, working_spacing_mm=[6.0, 4.0, 4.0], working_orientation="LPS")
    flipped, turn = to_orientation(volume, "RAS")  # the same patient stored the other way round
    assert not turn.identity
    lps = run(volume, model, device="cpu")
    ras = run(flipped, model, device="cpu")
    np.testing.assert_array_equal(ras.labels, turn.apply(lps.labels))
    assert lps.labels.any()


def test_roi_on_the_working_grid_stays_inside_the_box(tiny_model, tmp_path, clinical_like):
    volume, _ = clinical_like
    model = _card_variant(tiny_model, tmp_path, working_spacing_mm=[6.0, 4.0, 4.0])
    box = (4, 30, 40, 20, 130, 150)
    result = run(volume, model, device="cpu", roi=box, return_probabilities=True)
    outside = np.ones(volume.shape, bool)
    outside[4:20, 30:130, 40:150] = False
    assert not result.labels[outside].any() and result.labels[~outside].any()
    assert np.all(result.probabilities[0][outside] == 255) and not result.probabilities[1:, outside].any()
    crop = Volume(volume.array[4:20, 30:130, 40:150], volume.spacing, volume.directions,
                  volume.ijk_to_ras_points(np.array([[4, 30, 40]], float))[0])
    alone = run(crop, model, device="cpu")
    np.testing.assert_array_equal(result.labels[4:20, 30:130, 40:150], alone.labels)


def test_the_spacing_warning_fires_far_outside_the_trained_range():
    card = {"trained_spacing_mm": {"min": [1.0, 0.9, 0.9], "max": [5.0, 2.5, 2.5]}, "working_orientation": "LPS"}
    lps = np.diag([-1.0, -1.0, 1.0])
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (3.0, 0.7, 0.7), lps), card) == []
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (1.0, 0.45, 0.45), lps), card) == []
    coarse = spacing_warnings(Volume(np.zeros((2, 2, 2)), (12.0, 0.7, 0.7), lps), card)
    assert len(coarse) == 1 and "12" in coarse[0] and "far outside" in coarse[0]
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (3.0, 0.3, 0.3), lps), card)
    # a sagittal file: its 12 mm axis is i, which is k once turned to LPS
    sagittal = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # i→S, j→P, k→L
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (0.7, 0.7, 3.0), sagittal), card) == []
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (0.7, 0.7, 12.0), sagittal), card)
    # older cards: within 2× of expected_spacing_mm
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (4.0, 4.0, 4.0)), {"expected_spacing_mm": [4.4, 4.4, 4.4]}) == []
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (2.5, 0.7, 0.7)), {"expected_spacing_mm": [4.4, 4.4, 4.4]})
    assert spacing_warnings(Volume(np.zeros((2, 2, 2)), (2.5, 0.7, 0.7)), {}) == []


def test_the_warning_reaches_the_result(tiny_model, tmp_path, clinical_like):
    volume, _ = clinical_like
    model = _card_variant(tiny_model, tmp_path, trained_spacing_mm={"min": [1, 0.9, 0.9], "max": [3, 1.2, 1.2]})
    assert run(volume, model, device="cpu").warnings  # 2.4 mm pixels > 2 × 1.2 mm


@pytest.fixture
def blob_method():
    """A method whose 'network' is the image itself: a heatmap peaking where the image does."""

    @register_method("test-image-as-heatmap")
    def image_as_heatmap(context):
        return MethodOutput(heatmap=context.volume.array / context.volume.array.max(), device="cpu")

    yield "test-image-as-heatmap"
    METHODS.pop("test-image-as-heatmap")


def test_detections_on_the_working_grid_land_on_the_input_grid(tiny_model, tmp_path, blob_method):
    shape = (40, 300, 220)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.array([17, 201, 64])
    spacing = (1.0, 0.1, 0.1)
    blob = np.exp(-0.5 * (((k - centre[0]) * spacing[0] / 2.0) ** 2 + ((j - centre[1]) * spacing[1] / 2.0) ** 2
                          + ((i - centre[2]) * spacing[2] / 2.0) ** 2))
    directions = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    volume = Volume(blob.astype(np.float32), spacing, directions, origin=(10.0, 20.0, -30.0))
    model = _composed(tiny_model, tmp_path, blob_method, task="heatmap", working_spacing_mm=[1.0, 0.5, 0.5],
                      peaks={"threshold": 0.5, "min_distance": [2, 4, 4]})
    result = run(volume, model, device="cpu")
    # the heatmap stays on the working grid (40 × 60 × 44 voxels of 1 × 0.5 × 0.5 mm), covering the input's box exactly
    assert result.heatmap.shape == (40, 60, 44) and result.heatmap.array.dtype == np.float32
    np.testing.assert_allclose(result.heatmap.spacing, (1.0, 0.5, 0.5))
    np.testing.assert_allclose(result.heatmap.directions, volume.directions)
    corner = volume.ijk_to_ras_points(np.array([[-0.5, -0.5, -0.5]]))
    np.testing.assert_allclose(result.heatmap.ijk_to_ras_points(np.array([[-0.5, -0.5, -0.5]])), corner, atol=1e-6)
    # its peak is the blob's centre in RAS, and brought back onto the input grid it peaks at the blob
    peak = np.unravel_index(np.argmax(result.heatmap.array), result.heatmap.shape)
    centre_ras = volume.ijk_to_ras_points(centre[None].astype(float))[0]
    assert np.linalg.norm(result.heatmap.ijk_to_ras_points(np.array([peak], float))[0] - centre_ras) < 0.5
    back = result.heatmap_on_input()
    assert back.shape == shape and back.dtype == np.float32
    assert np.all(np.abs(np.array(np.unravel_index(np.argmax(back), shape)) - centre) <= [0, 3, 3])
    assert len(result.detections) == 1
    found = result.detections[0]
    assert np.all(np.abs(np.asarray(found.position_kji) - centre) <= [0, 3, 3])  # within a working voxel
    k0, j0, i0, k1, j1, i1 = found.box_kji
    assert k0 <= centre[0] < k1 and j0 <= centre[1] < j1 and i0 <= centre[2] < i1
    np.testing.assert_allclose(found.position_ras, volume.ijk_to_ras_points(np.asarray(found.position_kji)[None])[0],
                               atol=1e-3)


def test_an_unknown_method_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(TransferSegError, match="method 'no-such-method'.*single"):
        get_method("no-such-method")
    model = _composed(tiny_model, tmp_path, "no-such-method")
    with pytest.raises(TransferSegError, match="no-such-method"):
        run(Volume(np.zeros((8, 32, 32))), model, device="cpu")
