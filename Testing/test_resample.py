"""resample.py: the working grid, SimpleITK agreement, round trips, orientation, exact geometry."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from TransferSegLib.resample import (Reorientation, back_to, grid_shape, labels_to_spacing, to_orientation,
                                     to_spacing)
from TransferSegLib.volume import TransferSegError, Volume, orientation_name


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "lps-axial": (np.diag([-1.0, -1.0, 1.0]), (2.5, 0.7, 0.7)),
    "ras-flipped": (np.eye(3), (3.0, 0.8, 0.8)),
    "oblique": (_rotation(0.2, -0.15, 0.35), (1.7, 0.9, 0.6)),
    "sagittal": (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (0.7, 0.7, 2.0)),
}


def _volume(name, shape=(11, 37, 29), seed=0):
    directions, spacing = GEOMETRIES[name]
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    array = (100 * np.sin(3 * k + 2 * j) + 50 * np.cos(5 * i) + rng.normal(0, 5, shape)).astype(np.float32)
    return Volume(array, spacing, directions, origin=(12.5, -40.0, 7.25))


def _sitk_image(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    lps = np.diag([-1.0, -1.0, 1.0])
    image.SetSpacing(tuple(volume.spacing[::-1]))
    image.SetDirection(tuple((lps @ volume.directions).ravel()))
    image.SetOrigin(tuple(lps @ volume.origin))
    return image


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_to_spacing_agrees_with_simpleitk_on_the_same_grid(name):
    volume = _volume(name)
    working = to_spacing(volume, (1.9, 1.6, 1.1), antialias=False)
    assert working.shape != volume.shape
    reference = sitk.Resample(_sitk_image(volume), _sitk_image(working), sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    np.testing.assert_allclose(working.array, sitk.GetArrayFromImage(reference), rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_working_grid_covers_the_same_box_with_the_same_direction(name):
    volume = _volume(name)
    working = to_spacing(volume, (2.0, 1.5, 1.5))
    np.testing.assert_array_equal(working.directions, volume.directions)
    for grid in (volume, working):
        np.testing.assert_allclose(np.asarray(grid.shape) * grid.spacing,
                                   np.asarray(volume.shape) * volume.spacing, rtol=1e-12)
    # the outer corners of the two grids are the same RAS points
    for corner in (np.full(3, -0.5), np.asarray(volume.shape) - 0.5):
        inner = corner if corner[0] < 0 else np.asarray(working.shape) - 0.5
        np.testing.assert_allclose(working.ijk_to_ras_points(inner[None]), volume.ijk_to_ras_points(corner[None]),
                                   atol=1e-9)
    assert working.shape == grid_shape(volume.shape, volume.spacing, (2.0, 1.5, 1.5))
    # each axis within half a working voxel over the extent of the target
    assert np.all(np.abs(np.asarray(working.spacing) - (2.0, 1.5, 1.5)) <= np.asarray((2.0, 1.5, 1.5)) * 0.5)


def test_axes_already_at_the_working_spacing_are_untouched():
    volume = _volume("lps-axial")
    same = to_spacing(volume, (2.5 * 1.03, 0.7, 0.7))
    assert same is volume
    half = to_spacing(volume, (2.5, 1.4, 0.7), antialias=False)
    assert half.shape == (11, 18, 29)  # round(37 × 0.7 / 1.4) = round(18.5) = 18 (banker's rounding)
    # j: output row 5 lies at input row (5 + 0.5) · 37 / 18 − 0.5, between rows 10 and 11
    x = 5.5 * 37 / 18 - 0.5
    expected = (11 - x) * volume.array[:, 10] + (x - 10) * volume.array[:, 11]
    np.testing.assert_allclose(half.array[:, 5], expected, rtol=1e-5, atol=1e-3)
    assert half.spacing[0] == volume.spacing[0] and half.spacing[2] == volume.spacing[2]


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_back_to_returns_the_exact_original_grid_and_round_trips(name):
    volume = _volume(name, shape=(20, 64, 48))
    # a smooth field survives a down/up round trip closely; labels of blocks survive exactly at 2x
    working = to_spacing(volume, np.asarray(volume.spacing) * 2)
    smooth = volume.with_array(np.asarray(np.meshgrid(*(np.linspace(0, 1, n) for n in volume.shape),
                                                      indexing="ij")).sum(0) * 100)
    there = to_spacing(smooth, np.asarray(volume.spacing) * 2, antialias=False)
    back = back_to(there.array, there, smooth)
    assert back.shape == volume.shape and back.dtype == np.float32
    interior = (slice(1, -1),) * 3
    np.testing.assert_allclose(back[interior], smooth.array[interior], atol=1e-3)
    labels = np.zeros(volume.shape, np.uint8)
    labels[4:12, 10:40, 8:30] = 1
    labels[12:16, 20:30, 30:40] = 2
    coarse = labels_to_spacing(labels, volume, working)
    np.testing.assert_array_equal(back_to(coarse, working, volume, kind="nearest"), labels)
    # geometry: the result is placed on the original Volume itself
    placed = volume.with_array(back)
    np.testing.assert_array_equal(placed.ijk_to_ras, volume.ijk_to_ras)


def test_argmax_back_equals_argmax_of_linear_back_without_a_full_float_copy():
    volume = _volume("oblique", shape=(30, 50, 40))
    working = to_spacing(volume, (3.4, 1.8, 1.2))
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3,) + working.shape)
    p = np.exp(logits) / np.exp(logits).sum(0)
    encoded = np.round(p * 255).astype(np.uint8)
    probabilities = np.zeros((3,) + volume.shape, np.uint8)
    labels = back_to(encoded, working, volume, kind="argmax", probabilities_out=probabilities)
    linear = back_to(encoded.astype(np.float32), working, volume)
    np.testing.assert_array_equal(labels, linear.argmax(0))
    np.testing.assert_array_equal(probabilities, np.clip(np.round(linear), 0, 255).astype(np.uint8))
    # uint8 in, uint8 out for the linear kind
    assert back_to(encoded, working, volume).dtype == np.uint8


def test_back_to_refuses_a_grid_that_does_not_cover_the_original():
    volume = _volume("lps-axial")
    working = to_spacing(volume, (2.0, 1.5, 1.5))
    shifted = Volume(working.array, working.spacing, working.directions, working.origin + 1.0)
    with pytest.raises(TransferSegError, match="does not cover"):
        back_to(shifted.array, shifted, volume)
    with pytest.raises(TransferSegError, match="working grid"):
        back_to(volume.array, working, volume)


def test_input_is_never_modified():
    volume = _volume("oblique")
    before = volume.array.copy()
    to_spacing(volume, (1.0, 1.0, 1.0))
    to_orientation(volume, "LPS")
    np.testing.assert_array_equal(volume.array, before)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_to_orientation_is_exact_and_keeps_every_voxel_in_place(name):
    volume = _volume(name)
    turned, turn = to_orientation(volume, "LPS")
    assert orientation_name(turned.directions).startswith("LPS")
    # every voxel keeps its RAS position: compare voxel centres of matching values
    rng = np.random.default_rng(1)
    for kji in rng.integers(0, turned.shape, size=(20, 3)):
        ras = turned.ijk_to_ras_points(kji[None])
        source = np.round(volume.ras_to_ijk_points(ras)[0]).astype(int)
        assert turned.array[tuple(kji)] == volume.array[tuple(source)]
    np.testing.assert_array_equal(turn.undo(turned.array), volume.array)
    np.testing.assert_array_equal(turn.undo(turn.apply(np.stack([volume.array] * 2))), np.stack([volume.array] * 2))


def test_orientation_codes_are_checked():
    with pytest.raises(TransferSegError, match="three letters"):
        to_orientation(_volume("lps-axial"), "LRS")
    volume = _volume("lps-axial")
    same, turn = to_orientation(volume, "LPS")
    assert same is volume and turn == Reorientation()


def test_a_clinical_grid_resamples_in_seconds_with_bounded_memory():
    import resource
    import time

    volume = Volume(np.random.default_rng(0).normal(0, 100, (100, 512, 512)).astype(np.float32), (2.5, 0.7, 0.7))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    working = to_spacing(volume, (3.0, 1.5, 1.5))
    probabilities = np.full((3,) + working.shape, 85, np.uint8)
    labels = back_to(probabilities, working, volume, kind="argmax")
    seconds = time.perf_counter() - tic
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert labels.shape == volume.shape and working.shape == (83, 239, 239)
    assert seconds < 30
    assert grown_mib < 400  # a full-size float copy per class alone would be 300 MiB more


def test_antialiasing_averages_the_noise_away_like_a_coarser_scan():
    rng = np.random.default_rng(5)
    noise = Volume(rng.normal(0, 10, (8, 400, 400)).astype(np.float32), (1.0, 0.1, 0.1))
    plain = to_spacing(noise, (1.0, 0.5, 0.5), antialias=False)
    smooth = to_spacing(noise, (1.0, 0.5, 0.5))
    assert plain.shape == smooth.shape == (8, 80, 80)
    assert plain.array.std() > 8  # one pixel in 25 picked: the noise passes through
    assert smooth.array.std() < 4  # averaged over about the 5 × 5 pixels each coarse pixel covers
    # upsampling and untouched axes are not smoothed
    np.testing.assert_array_equal(to_spacing(noise, (1.0, 0.05, 0.05)).array,
                                  to_spacing(noise, (1.0, 0.05, 0.05), antialias=False).array)


def test_antialiasing_slab_by_slab_equals_smoothing_the_whole_volume(monkeypatch):
    from scipy.ndimage import gaussian_filter

    import TransferSegLib.resample as resample

    rng = np.random.default_rng(9)
    volume = Volume(rng.normal(0, 10, (40, 60, 50)).astype(np.float32), (1.0, 0.5, 0.4))
    monkeypatch.setattr(resample, "_SLAB_VOXELS", 3000)  # many small slabs
    sliced = to_spacing(volume, (3.0, 1.6, 1.0))
    shape = sliced.shape
    sigmas = [(n / m - 1) / 2 for n, m in zip(volume.shape, shape)]
    whole = gaussian_filter(volume.array, sigmas, mode="nearest", truncate=3.0)
    reference = to_spacing(volume.with_array(whole), (3.0, 1.6, 1.0), antialias=False)
    np.testing.assert_allclose(sliced.array, reference.array, rtol=1e-5, atol=1e-4)
