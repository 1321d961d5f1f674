"""What a run writes: Result.outputs() is the one list, written all or none, and awkward inputs end cleanly."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from matplotlib.image import imread
from torch import nn

from conftest import LIVER_TUMOR_SEGMENTS
from TransferSegLib import cli, pipeline, render
from TransferSegLib.heatmaps import find_peaks
from TransferSegLib.io import atomic_output_folder, load_volume, save_volume
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.pipeline import Result, run
from TransferSegLib.progress import CancelToken, Cancelled
from TransferSegLib.volume import TransferSegError, Volume

SEGMENTATION_FILES = ["segmentation.seg.nrrd", "labelmap.nii.gz", "overview.png", "lesions.csv", "report.html",
                      "result.json"]
HEATMAP_FILES = ["heatmap.nii.gz", "detections.json", "detections.csv", "overview.png", "lesions.csv", "report.html",
                 "result.json"]
CARD = {"name": "test-card", "version": "0.0.1", "task": "segmentation", "labels": LIVER_TUMOR_SEGMENTS,
        "weights": {"sha256": None}}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "TransferSegLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def _on_disk(folder) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _segmentation_result(seed=0, shape=(6, 32, 32)) -> Result:
    volume, labels = ct_phantom(seed=seed, shape=shape)
    return Result(volume=volume, labels=labels, card=dict(CARD), device="cpu", timings={})


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory):
    """A U-Net whose weights carry the windowed CT straight to the head: liver where it is brighter than
    mid-window, background elsewhere.  Unlike an untrained net, its label map is never uniform."""
    from TransferSegLib.models import save_model
    from TransferSegLib.nets import build_network

    config = {"in_channels": 1, "out_channels": 3, "base_channels": 4, "levels": 2}
    net = build_network("unet3d", config).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                m.weight.zero_()
                m.bias.zero_()
        centre = (0, 0, 1, 1, 1)  # a 3×3×3 kernel that copies channel 0 through
        for conv in (net.encoder[0][0], net.encoder[0][3], net.decoder[-1].conv[0], net.decoder[-1].conv[3]):
            conv.weight[centre] = 1.0  # the last _Up puts the level-0 skip first, so channel 0 is the input
        net.head.weight[1, 0] = 40.0
        net.head.bias[1] = -20.0
        net.head.bias[2] = -100.0
    card = {"name": "threshold-unet3d", "version": "0.0.1", "task": "segmentation", "labels": LIVER_TUMOR_SEGMENTS,
            "architecture": {"name": "unet3d", "config": config}, "preprocessing": {"hu_window": [-200, 250]},
            "patch_size": [8, 32, 32], "inference": {"overlap": 0.25}}
    return save_model(net, card, tmp_path_factory.mktemp("threshold_model"))


def test_outputs_are_the_files_on_disk_and_in_result_json(tmp_path, tiny_model):
    volume, _ = ct_phantom(seed=4, shape=(8, 32, 32))
    result = run(volume, tiny_model, device="cpu")
    assert result.outputs() == SEGMENTATION_FILES
    paths = result.write(tmp_path / "out")
    assert list(paths) == result.outputs() and all(p.is_file() for p in paths.values())
    assert _on_disk(tmp_path / "out") == sorted(result.outputs())
    assert json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))["files"] == result.outputs()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_the_heatmap_task_lists_and_writes_its_files(tmp_path):
    volume, _ = dbt_phantom(seed=1, shape=(8, 48, 40))
    heatmap = np.zeros(volume.shape, np.float32)
    heatmap[4, 20, 18] = 1.0
    heatmap[2, 36, 30] = 0.6
    detections = find_peaks(heatmap, volume, threshold=0.1, min_distance=(2, 6, 6))
    card = dict(CARD, task="heatmap", labels=[{"name": "lesion", "label": 1, "color": [1.0, 0.8, 0.1]}])
    result = Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=card, device="cpu", timings={},
                    heatmap=heatmap, detections=detections)
    assert result.outputs() == HEATMAP_FILES
    result.write(tmp_path)
    assert _on_disk(tmp_path) == sorted(HEATMAP_FILES)
    assert json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))["files"] == HEATMAP_FILES
    assert len(json.loads((tmp_path / "detections.json").read_text(encoding="utf-8"))["detections"]) == 2


def test_views_and_disagreement_are_listed_and_written_on_the_input_grid(tmp_path):
    result = _segmentation_result()
    shape = result.volume.shape
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)  # (K, k, j, i) class probabilities × 255
    foreground = rng.integers(0, 256, size=shape, dtype=np.uint8)
    result.views = {"sagittal": foreground, "axial": classes}  # any insertion order: the list order is fixed
    result.disagreement = rng.random(shape).astype(np.float32)
    expected = ["segmentation.seg.nrrd", "labelmap.nii.gz", "views/axial.nii.gz", "views/sagittal.nii.gz",
                "disagreement.nii.gz", "overview.png", "views.png", "lesions.csv", "report.html", "result.json"]
    assert result.outputs() == expected
    result.write(tmp_path / "out")
    out = tmp_path / "out"
    assert _on_disk(out) == sorted(expected)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["files"] == expected
    reference = sitk.ReadImage(str(out / "labelmap.nii.gz"))
    for name, values in (("views/axial.nii.gz", np.moveaxis(classes, 0, -1)), ("views/sagittal.nii.gz", foreground),
                         ("disagreement.nii.gz", result.disagreement)):
        image = sitk.ReadImage(str(out / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values)
        assert image.GetOrigin() == reference.GetOrigin() and image.GetSpacing() == reference.GetSpacing()
        assert image.GetDirection() == reference.GetDirection()
    assert imread(out / "views.png").shape[0] > imread(out / "overview.png").shape[0]  # a row per view + disagreement


def test_unknown_view_names_are_refused():
    result = _segmentation_result()
    result.views = {"../axial": np.zeros(result.volume.shape, np.uint8)}
    with pytest.raises(ValueError, match="axial, coronal, sagittal"):
        result.outputs()


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt(), Cancelled()],
                         ids=["error", "interrupt", "cancel"])
def test_a_failure_while_writing_leaves_a_new_target_absent(tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "save_overview_png", fail)  # after the .seg.nrrd and the label map
    with pytest.raises(type(error)):
        _segmentation_result().write(tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []  # no target, no staging folder, no parents made for them


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt(), Cancelled()],
                         ids=["error", "interrupt", "cancel"])
def test_a_failure_while_writing_leaves_an_existing_target_exactly_as_it_was(tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    _segmentation_result(seed=1).write(out)  # a previous run
    (out / "notes.txt").write_text("the radiologist's notes\n", encoding="utf-8")
    (out / "views").mkdir()
    (out / "views" / "mine.txt").write_text("not ours\n", encoding="utf-8")
    before = _snapshot(out)
    entries = sorted(p.name for p in out.iterdir())

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "save_overview_png", fail)
    second = _segmentation_result(seed=2)
    second.views = {"axial": np.zeros(second.volume.shape, np.uint8)}
    with pytest.raises(type(error)):
        second.write(out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == entries  # no hidden staging folder either
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_second_run_replaces_the_files_and_keeps_unrelated_ones(tmp_path):
    out = tmp_path / "out"
    first = _segmentation_result(seed=1)
    first.write(out)
    (out / "notes.txt").write_text("keep me\n", encoding="utf-8")
    second = _segmentation_result(seed=2)
    assert not np.array_equal(first.labels, second.labels)
    second.write(out)
    assert _on_disk(out) == sorted([*SEGMENTATION_FILES, "notes.txt"])
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me\n"
    np.testing.assert_array_equal(load_volume(out / "labelmap.nii.gz").array, second.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not [p for p in out.iterdir() if p.name[0] == "."]


def test_a_staging_folder_that_holds_other_files_than_promised_moves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="expected to write"):
        with atomic_output_folder(out, ["a.txt", "b.txt"]) as staging:
            (staging / "a.txt").write_text("a", encoding="utf-8")
    assert list(tmp_path.iterdir()) == []


def test_a_name_taken_by_a_folder_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    (out / "overview.png").mkdir(parents=True)
    with pytest.raises(TransferSegError, match="overview.png"):
        _segmentation_result().write(out)
    assert _on_disk(out) == [] and sorted(p.name for p in out.iterdir()) == ["overview.png"]


def test_a_one_slice_volume_renders_with_its_labels(tmp_path):
    volume, labels = ct_phantom(seed=1, shape=(1, 128, 128))
    path = render.save_overview_png(volume, tmp_path / "one.png", labels=labels, title="one slice")
    assert imread(path).std() > 0.05
    row = dict(volume=volume, labels=labels, heatmap=volume.array - volume.array.min(),
               boxes=[{"box_kji": [0, 40, 40, 1, 80, 80], "kind": "mass"}])
    render.save_gallery_png([row, dict(row, volume=volume)], tmp_path / "gallery.png")


@pytest.mark.parametrize("shape", [(24, 1, 64), (24, 64, 1), (1, 1, 64), (1, 1, 1)],
                         ids=["row", "column", "line", "voxel"])
def test_one_voxel_thin_volumes_render(tmp_path, shape):
    volume, labels = ct_phantom(seed=1, shape=(24, 64, 64))
    cut = tuple(slice(n // 2, n // 2 + 1) if s == 1 else slice(None) for n, s in zip(volume.shape, shape))
    thin = Volume(volume.array[cut].copy(), spacing=volume.spacing, directions=volume.directions, origin=volume.origin)
    render.save_overview_png(thin, tmp_path / "thin.png", labels=labels[cut], heatmap=thin.array - thin.array.min())
    assert (tmp_path / "thin.png").is_file()


def test_a_one_slice_ct_through_the_cli_writes_every_file(tmp_path, threshold_model):
    volume, _ = ct_phantom(seed=1, shape=(1, 128, 128))
    source = save_volume(volume, tmp_path / "one_slice.nii.gz")
    result = _cli("segment", source, "-o", tmp_path / "out", "--model", threshold_model, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert _on_disk(out) == sorted(SEGMENTATION_FILES)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["files"] == SEGMENTATION_FILES
    labels = load_volume(out / "labelmap.nii.gz").array
    assert set(np.unique(labels)) == {0, 1}  # a mixed label map: the overview has outlines to draw
    assert [ln for ln in result.stdout.splitlines() if ln.startswith(str(out))] == [
        str(out / name) for name in SEGMENTATION_FILES]


def test_an_output_that_is_an_existing_file_exits_2_before_the_model_runs(tmp_path, monkeypatch, capsys):
    volume, _ = ct_phantom(seed=1, shape=(4, 32, 32))
    source = save_volume(volume, tmp_path / "ct.nii.gz")
    target = tmp_path / "results"
    target.write_text("a file, not a folder\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr("TransferSegLib.pipeline.run", no_model)
    assert cli.main(["segment", str(source), "-o", str(target), "--model", "no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(target) in err and "existing file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert target.read_text(encoding="utf-8") == "a file, not a folder\n"
    # inside a file: also refused up front
    assert cli.main(["segment", str(source), "-o", str(target / "sub"), "--model", "no-such-model"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_the_cli_refuses_an_existing_file_as_output_in_a_real_process(tmp_path, tiny_model):
    volume, _ = ct_phantom(seed=1, shape=(4, 32, 32))
    source = save_volume(volume, tmp_path / "ct.nii.gz")
    (tmp_path / "results").write_bytes(b"x")
    result = _cli("segment", source, "-o", tmp_path / "results", "--model", tiny_model, "--device", "cpu")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "results"]


def test_a_system_error_while_writing_is_one_line_and_writes_nothing(tmp_path, tiny_model, monkeypatch, capsys):
    import errno

    volume, _ = ct_phantom(seed=1, shape=(4, 32, 32))
    source = save_volume(volume, tmp_path / "ct.nii.gz")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "overview.png"))

    monkeypatch.setattr(pipeline, "save_overview_png", disk_full)
    monkeypatch.setattr(cli, "_cancel_on_signals", CancelToken)  # keep pytest's own Ctrl-C handler
    assert cli.main(["segment", str(source), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
