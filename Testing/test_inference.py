"""The sliding-window inferer: equal to whole-volume application, padding, OOM fallback, progress, cancel, ROI.

Networks here are small nn.Conv3d stacks: a 1×1×1 conv is a per-voxel op, so any correct
tiling and blending must reproduce the network applied to the whole volume exactly.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import DIRECTIONS_LPS
from torch import nn

from TransferSegLib.devices import resolve_device
from TransferSegLib.inference import InferenceResult, blending_weights, sliding_window_inference, window_starts
from TransferSegLib.progress import Cancelled, CancelToken
from TransferSegLib.volume import TransferSegError, Volume, roi_from_ras

SHAPE = (20, 37, 41)  # odd sizes: windows must be padded or overlap unevenly


def _volume(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _pointwise(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Conv3d(1, classes, kernel_size=1)


def _whole(network, array, activation="softmax"):
    """The network applied once to the whole volume: the reference any tiling must reproduce."""
    with torch.no_grad():
        out = network(torch.from_numpy(array)[None, None]).float()[0]
    return {"softmax": out.softmax(0), "sigmoid": out.sigmoid(), "none": out}[activation].numpy()


def _encoded(probabilities):
    return np.round(probabilities * 255).astype(np.int64)


class OOMAbove(nn.Module):
    """Fault injection: raises CUDA's out-of-memory error when windows × voxels in a batch exceed a limit."""

    def __init__(self, network, max_voxels, only_cuda=False):
        super().__init__()
        self.network, self.max_voxels, self.only_cuda = network, max_voxels, only_cuda
        self.size_multiple = getattr(network, "size_multiple", 1)
        self.seen = []

    def forward(self, x):
        voxels = x.shape[0] * x[0, 0].numel()
        self.seen.append((x.shape[0], tuple(x.shape[2:]), x.device.type))
        if voxels > self.max_voxels and (x.is_cuda or not self.only_cuda):
            raise torch.cuda.OutOfMemoryError("injected")
        return self.network(x)


# --- equivalence ----------------------------------------------------------------------------
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("patch,batch,overlap", [
    *[((8, 16, 16), 3, overlap) for overlap in (0.0, 0.25, 0.5, 0.75)],
    ((7, 9, 11), 1, 0.0), ((7, 9, 11), 1, 0.5),                    # odd patch sizes
    ((64, 64, 64), 2, 0.5),                                         # patch larger than the volume
    ((20, 10, 41), 8, 0.25), ((20, 10, 41), 8, 0.8),                # batches of several windows
    ((4, 37, 41), 3, 0.5),                                          # batches that span several k-rows
])
def test_pointwise_network_equals_whole_volume(blend, overlap, patch, batch):
    array, network = _volume(), _pointwise()
    reference = _whole(network, array)
    result = sliding_window_inference(array, network, patch_size=patch, overlap=overlap, blend=blend,
                                      batch_size=batch, device="cpu", return_probabilities=True)
    assert result.labels.dtype == np.uint8 and result.labels.shape == SHAPE
    assert result.probabilities.dtype == np.uint8 and result.probabilities.shape == (3,) + SHAPE
    np.testing.assert_array_equal(result.labels, reference.argmax(0))
    assert np.abs(result.probabilities.astype(np.int64) - _encoded(reference)).max() <= 1
    assert result.patch_size == tuple(min(p, s) for p, s in zip(patch, SHAPE))
    assert result.fallbacks == [] and result.device == torch.device("cpu")


def _clean_mask(length, patch, overlap, reach):
    """Voxels no window covers within `reach` of an edge that is inside the volume (where zero padding differs)."""
    clean = np.ones(length, dtype=bool)
    for start in window_starts(length, patch, overlap):
        stop = start + patch
        if start > 0:
            clean[start:start + reach] = False
        if stop < length:
            clean[stop - reach:stop] = False
    return clean


def test_3x3x3_network_constant_blend_equals_whole_volume_away_from_window_edges():
    torch.manual_seed(1)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1))
    array, patch, overlap = _volume(seed=2), (12, 16, 20), 0.5
    reference = _whole(network, array)
    result = sliding_window_inference(array, network, patch_size=patch, overlap=overlap, blend="constant",
                                      device="cpu", return_probabilities=True)
    masks = [_clean_mask(n, p, overlap, reach=2) for n, p in zip(SHAPE, patch)]
    clean = masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]
    assert 0.1 < clean.mean() < 0.9
    difference = np.abs(result.probabilities.astype(np.int64) - _encoded(reference)).max(axis=0)
    assert difference[clean].max() <= 1
    np.testing.assert_array_equal(result.labels[clean], reference.argmax(0)[clean])
    assert difference[~clean].max() > 1  # the mask matters: window edges do see zero padding


def test_window_starts_cover_evenly_with_at_least_the_overlap():
    for length, patch, overlap in [(300, 64, 0.5), (37, 16, 0.25), (41, 11, 0.0), (20, 20, 0.5), (10, 16, 0.5)]:
        starts = window_starts(length, patch, overlap)
        assert starts[0] == 0 and starts[-1] == max(length - patch, 0)
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.all(steps <= patch * (1 - overlap) + 0.5)
        assert steps.size == 0 or steps.max() - steps.min() <= 1


def test_gaussian_weights_are_the_separable_nnunet_gaussian():
    weights = blending_weights((8, 16, 12))
    assert weights.shape == (8, 16, 12) and weights.dtype == torch.float32
    assert float(weights.max()) == pytest.approx(1.0, abs=1e-6) and float(weights.min()) > 0  # never 0: every voxel counts
    x = np.arange(16) - 7.5
    along_j = np.exp(-0.5 * (x / 2.0) ** 2)  # sigma = 16 / 8
    profile = weights[3, :, 5].numpy() / weights[3, 7, 5].numpy()
    np.testing.assert_allclose(profile, along_j / along_j[7], rtol=1e-5)
    assert torch.equal(blending_weights((4, 5, 6), "constant"), torch.ones(4, 5, 6))


# --- padding ----------------------------------------------------------------------------------
class NeedsMultiple(nn.Module):
    size_multiple = (4, 8, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(1, 3, 1)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[2:]))
        assert all(s % m == 0 for s, m in zip(x.shape[2:], self.size_multiple)), x.shape
        return self.conv(x)


@pytest.mark.parametrize("patch", [(10, 20, 30), (64, 64, 64), (8, 16, 16)])
def test_padding_to_the_network_size_multiple(patch):
    array, network = _volume(), NeedsMultiple()
    result = sliding_window_inference(array, network, patch_size=patch, device="cpu", return_probabilities=True)
    reference = _whole(network.conv, array)
    np.testing.assert_array_equal(result.labels, reference.argmax(0))
    assert np.abs(result.probabilities.astype(np.int64) - _encoded(reference)).max() <= 1
    assert all(s % m == 0 for s, m in zip(result.patch_size, (4, 8, 8)))
    if patch == (64, 64, 64):  # larger than the volume: one window, the volume rounded up to the multiple
        assert result.patch_size == (20, 40, 48) and result.windows == 1


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.conv(x)


def test_pad_modes_edge_and_constant_minimum():
    array = _volume(shape=(5, 6, 7))
    recorder = Recorder()
    sliding_window_inference(array, recorder, patch_size=8, device="cpu", min_patch=1)
    assert [tuple(x.shape[2:]) for x in recorder.inputs] == [(5, 6, 7)]  # multiple 1: no padding at all
    recorder = Recorder()
    recorder.size_multiple = (8, 8, 8)
    sliding_window_inference(array, recorder, patch_size=8, device="cpu", pad_mode="constant")
    window = recorder.inputs[0][0, 0].numpy()
    np.testing.assert_array_equal(window[:5, :6, :7], array)
    assert np.all(window[5:] == array.min()) and np.all(window[:, 6:] == array.min())
    recorder = Recorder()
    recorder.size_multiple = (8, 8, 8)
    sliding_window_inference(array, recorder, patch_size=8, device="cpu", pad_mode="edge")
    window = recorder.inputs[0][0, 0].numpy()
    np.testing.assert_array_equal(window[:5, :6, :7], array)
    np.testing.assert_array_equal(window[5:, :6, :7], np.broadcast_to(array[4:5], (3, 6, 7)))
    np.testing.assert_array_equal(window[:5, :6, 7:], np.broadcast_to(array[:, :, 6:7], (5, 6, 1)))


# --- out of memory --------------------------------------------------------------------------
def test_oom_halves_the_batch_and_keeps_the_result(caplog):
    array, network = _volume(), _pointwise()
    plain = sliding_window_inference(array, network, patch_size=(8, 16, 16), batch_size=4, device="cpu",
                                     return_probabilities=True)
    limited = OOMAbove(network, max_voxels=2 * 8 * 16 * 16)
    with caplog.at_level(logging.WARNING, logger="TransferSegLib.inference"):
        result = sliding_window_inference(array, limited, patch_size=(8, 16, 16), batch_size=4, device="cpu",
                                          return_probabilities=True)
    assert result.batch_size == 2 and result.patch_size == (8, 16, 16)
    assert len(result.fallbacks) == 1 and "out of memory" in result.fallbacks[0]
    assert "4 window(s)" in result.fallbacks[0] and "retrying with 2" in result.fallbacks[0]
    assert result.fallbacks[0] in caplog.text
    np.testing.assert_array_equal(result.labels, plain.labels)
    np.testing.assert_array_equal(result.probabilities, plain.probabilities)


class OOMOnCall(nn.Module):
    """Fault injection: the n-th forward pass (counting from 1) runs out of memory, the others run."""

    def __init__(self, network, call):
        super().__init__()
        self.network, self.call, self.calls = network, call, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.call:
            raise torch.cuda.OutOfMemoryError("injected")
        return self.network(x)


def test_oom_in_the_middle_of_a_run_continues_with_half_the_batch():
    array, network = _volume(), _pointwise()
    plain = sliding_window_inference(array, network, patch_size=(4, 16, 16), batch_size=4, device="cpu",
                                     return_probabilities=True)
    failing = OOMOnCall(network, call=7)  # after 6 batches = 24 windows: the first k-row (20 windows) is finished
    result = sliding_window_inference(array, failing, patch_size=(4, 16, 16), batch_size=4, device="cpu",
                                      return_probabilities=True)
    assert result.batch_size == 2 and len(result.fallbacks) == 1
    assert failing.calls == 6 + 1 + (result.windows - 24 + 1) // 2  # resumed, not restarted
    np.testing.assert_array_equal(result.labels, plain.labels)
    np.testing.assert_array_equal(result.probabilities, plain.probabilities)


def test_oom_shrinks_the_patch_and_keeps_the_result():
    array, network = _volume(), _pointwise()
    reference = _whole(network, array)
    plain = sliding_window_inference(array, network, patch_size=16, batch_size=2, device="cpu",
                                     return_probabilities=True)
    limited = OOMAbove(network, max_voxels=8 ** 3)
    result = sliding_window_inference(array, limited, patch_size=16, batch_size=2, device="cpu",
                                      return_probabilities=True, min_patch=4)
    assert result.batch_size == 1 and result.patch_size == (8, 8, 8)
    assert len(result.fallbacks) == 2
    assert "retrying with 1 window(s)" in result.fallbacks[0]
    assert "16×16×16" in result.fallbacks[1] and "retrying with 8×8×8-voxel windows" in result.fallbacks[1]
    assert (1, (8, 8, 8), "cpu") in limited.seen
    np.testing.assert_array_equal(result.labels, plain.labels)
    np.testing.assert_array_equal(result.labels, reference.argmax(0))
    assert np.abs(result.probabilities.astype(np.int64) - plain.probabilities).max() <= 1


def test_oom_shrinks_only_the_largest_axes_and_stops_at_min_patch():
    array, network = _volume(), _pointwise()
    limited = OOMAbove(network, max_voxels=8 * 16 * 16)
    result = sliding_window_inference(array, limited, patch_size=(8, 32, 32), batch_size=1, device="cpu")
    assert result.patch_size == (8, 16, 16)
    with pytest.raises(TransferSegError, match="out of memory.*nothing smaller to try"):
        sliding_window_inference(array, OOMAbove(network, max_voxels=100), patch_size=16, device="cpu", min_patch=8)


# --- progress, cancel, caller's objects -------------------------------------------------------
def test_progress_is_monotonic_and_ends_at_one():
    calls = []
    result = sliding_window_inference(_volume(), _pointwise(), patch_size=(8, 16, 16), batch_size=2, device="cpu",
                                      progress=lambda fraction, stage: calls.append((fraction, stage)))
    fractions = [f for f, _ in calls]
    assert len(calls) >= result.windows // 2
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0 and {s for _, s in calls} == {"inference"}


def test_progress_stays_monotonic_across_a_fallback_restart():
    calls = []
    sliding_window_inference(_volume(), OOMAbove(_pointwise(), max_voxels=8 ** 3 + 1), patch_size=16, batch_size=1,
                             device="cpu", min_patch=4, progress=lambda f, s: calls.append(f))
    assert all(b >= a for a, b in zip(calls, calls[1:])) and calls[-1] == 1.0


def test_cancel_from_the_progress_callback_stops_after_the_first_batch():
    token, network = CancelToken(), _pointwise()
    network.train()
    calls = []

    def progress(fraction, stage):
        calls.append(fraction)
        token.cancel()

    with pytest.raises(Cancelled):
        sliding_window_inference(_volume(), network, patch_size=(8, 16, 16), device="cpu", progress=progress, cancel=token)
    assert len(calls) == 1 and calls[0] < 1.0
    assert network.training  # restored even when cancelled


def test_network_mode_parameters_and_input_are_left_as_they_were():
    torch.manual_seed(4)
    network = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4), nn.Dropout3d(0.5), nn.Conv3d(4, 3, 1))
    network.train()
    network[1].eval()  # a deliberately frozen BatchNorm inside a training model must stay frozen
    before = {k: v.clone() for k, v in network.state_dict().items()}
    array = _volume()
    array.setflags(write=False)
    copy = array.copy()
    first = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu")
    second = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu")
    np.testing.assert_array_equal(first.labels, second.labels)  # dropout was off: eval mode during the run
    assert [m.training for m in network] == [True, False, True, True]
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm running statistics untouched
    np.testing.assert_array_equal(array, copy)
    network(torch.zeros(1, 1, 2, 2, 2)).sum().backward()  # parameters are still ordinary trainable tensors


# --- ROI --------------------------------------------------------------------------------------
def test_roi_outputs_are_aligned_to_the_full_volume():
    array, network = _volume(), _pointwise()
    full = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu", return_probabilities=True)
    roi = (3, 5, 7, 15, 30, 33)
    result = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu", return_probabilities=True, roi=roi)
    box = np.s_[3:15, 5:30, 7:33]
    inside = np.zeros(SHAPE, dtype=bool)
    inside[box] = True
    assert result.labels.shape == SHAPE and not result.labels[~inside].any()
    np.testing.assert_array_equal(result.labels[box], full.labels[box])
    assert np.all(result.probabilities[0][~inside] == 255) and not result.probabilities[1:, ~inside].any()
    assert np.abs(result.probabilities[(slice(None),) + box].astype(int) - full.probabilities[(slice(None),) + box]).max() <= 1
    with pytest.raises(TransferSegError, match="roi"):
        sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu", roi=(0, 0, 0, 25, 5, 5))


@pytest.mark.parametrize("name", ["identity", "oblique", "ras_flipped", "coronal_acquired"])
def test_roi_from_ras_encloses_every_voxel_centre_in_the_box(name):
    lps = DIRECTIONS_LPS[name]
    volume = Volume(np.zeros((14, 17, 19), np.float32), spacing=(2.5, 0.8, 0.9),
                    directions=np.diag([-1.0, -1.0, 1.0]) @ lps, origin=(10.0, -20.0, 5.0))
    # a RAS box spanned by two voxel centres well inside the volume
    corners = volume.ijk_to_ras_points(np.array([[3, 4, 5], [9, 12, 13]]))
    ras_min, ras_max = corners.min(axis=0), corners.max(axis=0)
    box = roi_from_ras(volume, ras_max, ras_min)  # corner order does not matter
    k0, j0, i0, k1, j1, i1 = box
    assert 0 <= k0 < k1 <= 14 and 0 <= j0 < j1 <= 17 and 0 <= i0 < i1 <= 19
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = volume.ijk_to_ras_points(grid)
    in_ras_box = np.all((ras >= ras_min - 1e-9) & (ras <= ras_max + 1e-9), axis=1)
    inside = grid[in_ras_box]
    assert len(inside) > 0 and np.all(inside >= box[:3]) and np.all(inside < box[3:])
    # the box is tight: every face touches a mapped corner of the RAS box (within one voxel)
    all_corners = np.array([[(ras_min, ras_max)[a][0], (ras_min, ras_max)[b][1], (ras_min, ras_max)[c][2]]
                            for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    kji = volume.ras_to_ijk_points(all_corners)
    assert np.all(kji.min(0) >= np.array(box[:3]) - 1e-6) and np.all(kji.min(0) < np.array(box[:3]) + 1)
    expected_stop = np.minimum(np.ceil(kji.max(0) - 1e-6) + 1, volume.shape)
    np.testing.assert_array_equal(box[3:], expected_stop)
    if name in ("identity", "ras_flipped", "coronal_acquired"):  # axis-aligned: exactly the two voxels' box
        assert box == (3, 4, 5, 10, 13, 14)


def test_roi_from_ras_outside_the_volume_is_a_clear_error():
    volume = Volume(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(TransferSegError, match="does not overlap the volume"):
        roi_from_ras(volume, (100, 100, 100), (120, 120, 120))


# --- single-output networks and argument checks -----------------------------------------------
def test_single_channel_sigmoid_and_regression_give_a_heatmap():
    array, network = _volume(), _pointwise(classes=1, seed=5)
    result = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu", activation="sigmoid")
    reference = _whole(network, array, "sigmoid")[0]
    assert result.heatmap.dtype == np.float32
    np.testing.assert_allclose(result.heatmap, reference, atol=1e-5)
    np.testing.assert_array_equal(result.labels, reference >= 0.5)
    raw = sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu", activation="none",
                                   heatmap_dtype=np.float16)
    assert raw.labels is None and raw.heatmap.dtype == np.float16
    np.testing.assert_allclose(raw.heatmap, _whole(network, array, "none")[0], atol=2e-3)
    with pytest.raises(TransferSegError, match="one output channel"):
        sliding_window_inference(array, network, patch_size=(8, 16, 16), device="cpu")


def test_multichannel_input_and_bad_arguments():
    array = np.random.default_rng(6).normal(size=(2, 9, 10, 11)).astype(np.float32)
    torch.manual_seed(6)
    network = nn.Conv3d(2, 3, 1)
    result = sliding_window_inference(array, network, patch_size=4, device="cpu")
    with torch.no_grad():
        expected = network(torch.from_numpy(array)[None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(result.labels, expected)
    assert isinstance(result, InferenceResult)
    with pytest.raises(TransferSegError, match="3D array"):
        sliding_window_inference(np.zeros((4, 5)), network, patch_size=4, device="cpu")
    with pytest.raises(TransferSegError, match="num_classes"):
        sliding_window_inference(array, network, patch_size=4, device="cpu", num_classes=2)
    with pytest.raises(TransferSegError, match="overlap"):
        sliding_window_inference(array, network, patch_size=4, device="cpu", overlap=1.0)
    with pytest.raises(TransferSegError, match="spatial size"):
        sliding_window_inference(array, nn.Conv3d(2, 3, 3), patch_size=4, device="cpu")


# --- devices ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_resolve_device_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:1", "CUDA:0"):
        with pytest.raises(TransferSegError, match="choose device 'cpu'"):
            resolve_device(spec)
    with pytest.raises(TransferSegError, match="cuda"):
        sliding_window_inference(_volume(), _pointwise(), patch_size=8, device="cuda")


def test_resolve_device_rejects_unknown_names():
    with pytest.raises(TransferSegError, match="unknown device 'gpu'.*'cuda:N'"):
        resolve_device("gpu")


def test_mps_is_chosen_by_name_only_where_torch_has_it():
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps" and resolve_device("auto").type in ("cuda", "cpu")
    else:
        with pytest.raises(TransferSegError, match="device 'MPS' was requested but .* no Apple GPU.*'cpu'"):
            resolve_device("MPS")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; runs on a GPU machine")
def test_cuda_autocast_matches_cpu_and_oom_falls_back_to_cpu():
    array, network = _volume(), _pointwise()
    cpu = sliding_window_inference(array, network, patch_size=16, device="cpu", return_probabilities=True)
    gpu = sliding_window_inference(array, network, patch_size=16, device="cuda", return_probabilities=True)
    assert gpu.device.type == "cuda" and next(network.parameters()).device.type == "cpu"
    assert (gpu.labels != cpu.labels).mean() < 0.01  # bf16/fp16 autocast may flip near-ties
    assert np.abs(gpu.probabilities.astype(int) - cpu.probabilities).max() <= 8
    limited = OOMAbove(network, max_voxels=0, only_cuda=True)
    result = sliding_window_inference(array, limited, patch_size=16, device="cuda", return_probabilities=True)
    assert result.device == torch.device("cpu") and "CPU instead" in result.fallbacks[-1]
    np.testing.assert_array_equal(result.labels, cpu.labels)
    assert next(network.parameters()).device.type == "cpu"
