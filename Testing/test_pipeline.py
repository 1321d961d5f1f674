"""The pipeline and the CLI end to end: segment, evaluate, models, progress lines, ROI, cancel."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from TransferSegLib.io import load_volume, save_labelmap, save_volume
from TransferSegLib.models import load_model
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.heatmaps import Detection
from TransferSegLib.pipeline import _detections_title, postprocess, run
from TransferSegLib.progress import CancelToken, Cancelled
from TransferSegLib.volume import TransferSegError

@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    for n in range(2):
        volume, labels = ct_phantom(seed=40 + n, shape=(12, 40, 40))
        save_volume(volume, folder / f"ct_{n:03d}.nii.gz")
        save_labelmap(labels, volume, folder / f"ct_{n:03d}_label.nii.gz")
    return folder


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "TransferSegLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_segment_cli_writes_every_output_on_the_input_grid(tmp_path, tiny_model, phantom_dir):
    source = phantom_dir / "ct_000.nii.gz"
    result = _cli("segment", source, "-o", tmp_path / "out", "--model", tiny_model, "--device", "cpu",
                  "--progress-lines")
    assert result.returncode == 0, result.stderr
    progress = [ln.split() for ln in result.stdout.splitlines() if ln.startswith("PROGRESS ")]
    fractions = [float(p[1]) for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3
    out = tmp_path / "out"
    files = ["segmentation.seg.nrrd", "labelmap.nii.gz", "overview.png", "lesions.csv", "report.html", "result.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["files"] == files
    assert result.stdout.splitlines()[-len(files):] == [str(out / name) for name in files]
    reference = sitk.ReadImage(str(source))
    for name in ("labelmap.nii.gz", "segmentation.seg.nrrd"):
        image = sitk.ReadImage(str(out / name))
        np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelmap.nii.gz")))
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000
    assert summary["volumes_ml"]["liver"] == pytest.approx((labels == 1).sum() * voxel_ml, abs=1e-3)
    assert summary["model"]["name"] == "tiny-unet3d" and summary["device"] == "cpu"
    assert {"load_model", "resample", "inference", "resample_back", "postprocess", "write"} <= set(summary["timings_s"])


def test_segment_refuses_to_overwrite_its_input(tmp_path, tiny_model):
    volume, _ = ct_phantom(seed=3, shape=(8, 32, 32))
    source = save_volume(volume, tmp_path / "labelmap.nii.gz")
    before = source.read_bytes()
    result = _cli("segment", source, "-o", tmp_path, "--model", tiny_model, "--device", "cpu", "--progress-lines")
    assert result.returncode == 2 and "would overwrite the input" in result.stderr
    assert "PROGRESS" not in result.stdout  # refused before the model was loaded, let alone run
    assert source.read_bytes() == before


def test_roi_outputs_stay_aligned_to_the_full_volume(tiny_model):
    volume, _ = ct_phantom(seed=7, shape=(16, 48, 48))
    model = load_model(tiny_model)
    full = run(volume, model, device="cpu")
    roi = (0, 8, 8, 16, 40, 40)
    boxed = run(volume, model, device="cpu", roi=roi)
    assert boxed.labels.shape == volume.shape
    outside = np.ones(volume.shape, bool)
    outside[0:16, 8:40, 8:40] = False
    assert not boxed.labels[outside].any()
    assert boxed.roi_kji == roi
    # inside, away from the box edges where the windows differ, the answers agree
    inner = (slice(0, 16), slice(16, 32), slice(16, 32))
    assert (boxed.labels[inner] == full.labels[inner]).mean() > 0.95


def test_cancel_raises_and_writes_nothing(tmp_path, tiny_model):
    volume, _ = ct_phantom(seed=8, shape=(16, 48, 48))
    token = CancelToken()

    def cancel_after_start(fraction, stage):
        if stage == "inference" and fraction > 0.06:
            token.cancel()

    with pytest.raises(Cancelled):
        run(volume, tiny_model, device="cpu", progress=cancel_after_start, cancel=token)
    assert not list(tmp_path.iterdir())


def test_evaluate_cli_prints_and_writes_the_metrics_table(tmp_path, tiny_model, phantom_dir):
    csv_path = tmp_path / "metrics.csv"
    result = _cli("evaluate", "--model", tiny_model, "--data", phantom_dir, "-o", csv_path, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "ct_001" in result.stdout
    lits = result.stdout.index("LiTS: Dice per case, Dice global, tumor burden RMSE")
    assert lits < result.stdout.index("3DIRCADb: VOE, RVD, ASD, RMSD, Dice")
    rows = csv_path.read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,region,dice,voe,rvd,asd_mm,rmsd_mm")
    assert sum(r.startswith("ct_00") for r in rows) == 4  # 2 cases × 2 regions (liver incl. tumor, tumor)
    # the tumor burden RMSE again from the volumes: tumor ml / liver ml (the liver region includes the tumor)
    table = {(r["case"], r["region"]): r for r in csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8")))}

    def burden(case, kind):
        liver_ml = float(table[case, "liver"][kind])
        return float(table[case, "liver tumor"][kind]) / liver_ml if liver_ml else 0.0

    errors = [burden(case, "pred_ml") - burden(case, "ref_ml") for case in ("ct_000", "ct_001")]
    assert max(burden(case, "ref_ml") for case in ("ct_000", "ct_001")) > 0  # the phantoms have tumors
    rmse = float(np.sqrt(np.mean(np.square(errors))))
    assert float(table["ALL (tumor burden RMSE)", "liver tumor"]["burden_rmse"]) == pytest.approx(rmse, rel=1e-4)
    assert f"tumor burden RMSE {rmse:.4f}" in result.stdout[lits:]


def test_models_cli_lists_cards(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tiny_model.parent))
    result = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "models"], capture_output=True, text=True, encoding="utf-8",
                            timeout=120, env={**__import__("os").environ})
    assert result.returncode == 0 and "tiny-unet3d" in result.stdout and "unet3d" in result.stdout


def test_postprocess_keeps_the_largest_organ_and_tumors_inside_it():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:6, 1:6, 1:6] = 1
    labels[2:4, 2:4, 2:4] = 2
    labels[8:10, 8:10, 8:10] = 1  # a stray island
    labels[0, 9, 0] = 2  # a tumor outside the liver
    cleaned = postprocess(labels, {"largest_component": [1, 2], "inside": {"2": [1, 2]}})
    assert not cleaned[8:10, 8:10, 8:10].any() and cleaned[0, 9, 0] == 0
    assert (cleaned[2:4, 2:4, 2:4] == 2).all() and labels[8, 8, 8] == 1  # input untouched


def test_postprocess_fills_the_liver_holes_but_not_a_cavity_open_to_the_edge():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[0:10, 2:10, 2:10] = 1  # a liver touching the k = 0 face
    labels[3:5, 3:5, 3:5] = 2
    labels[6:8, 6:8, 6:8] = 0  # an enclosed hole
    labels[7, 7, 7] = 3  # another structure inside the hole
    labels[0:3, 5:7, 5:7] = 0  # a cavity open at k = 0: no hole
    cleaned = postprocess(labels, {"fill_holes": [1, 2]})
    hole = np.zeros(labels.shape, bool)
    hole[6:8, 6:8, 6:8] = True
    hole[7, 7, 7] = False
    assert (cleaned[hole] == 1).all() and cleaned[7, 7, 7] == 3
    np.testing.assert_array_equal(cleaned[~hole], labels[~hole])  # the cavity, the tumor, the rest unchanged
    assert (labels[hole] == 0).all()  # input untouched


def test_postprocess_fill_holes_in_the_bounding_box_equals_the_whole_volume():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    labels = (ndimage.gaussian_filter(rng.random((30, 40, 50)), 2) > 0.47).astype(np.uint8)
    labels[(labels == 1) & (rng.random(labels.shape) < 0.3)] = 2  # many holes walled partly by tumor
    labels[(labels == 0) & (rng.random(labels.shape) < 0.01)] = 3
    labels[:, :3] = 0
    labels[:, :, 42:] = 0  # the region's box lies inside the volume on these sides, at its edge on the others
    expected = labels.copy()
    filled = ndimage.binary_fill_holes(np.isin(labels, [1, 2]))
    expected[filled & (labels == 0)] = 1
    np.testing.assert_array_equal(postprocess(labels, {"fill_holes": [1, 2]}), expected)
    assert (expected != labels).sum() > 10 and (filled & (labels == 3)).any()  # holes, and label 3 inside some


def test_loaded_phantom_runs_through_the_python_api(tmp_path, tiny_model, phantom_dir):
    volume = load_volume(phantom_dir / "ct_001.nii.gz")
    result = run(volume, tiny_model, device="cpu")
    paths = result.write(tmp_path / "api")
    assert list(paths) == result.outputs() and all(p.exists() for p in paths.values())
    assert set(result.volumes_ml()) == {"liver", "liver tumor"}


def test_detect_cli_writes_heatmap_and_detections(tmp_path, tiny_heatmap_model):
    from TransferSegLib.phantoms import dbt_phantom

    volume, _ = dbt_phantom(seed=1, shape=(8, 48, 40))
    source = save_volume(volume, tmp_path / "dbt.nii.gz")
    result = _cli("detect", source, "-o", tmp_path / "out", "--model", tiny_heatmap_model, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    files = ["heatmap.nii.gz", "detections.json", "detections.csv", "overview.png", "lesions.csv", "report.html",
             "result.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["files"] == files
    detections = json.loads((out / "detections.json").read_text(encoding="utf-8"))["detections"]
    assert 1 <= len(detections) <= 5
    heatmap = load_volume(out / "heatmap.nii.gz")
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert list(heatmap.shape) == summary["heatmap_grid"]["shape"] and 0.0 <= heatmap.array.min()
    assert heatmap.array.max() <= 1.0
    top = detections[0]
    assert top["kind"] == "lesion" and summary["detections_by_kind"] == {"lesion": len(detections)}
    # the reported confidence is the heatmap's value at the reported peak (found on the heatmap's grid),
    # and positions agree in RAS
    assert heatmap.array.max() == pytest.approx(top["confidence"], abs=summary["heatmap_grid"]["quantum"] / 2)
    assert np.array_equal(np.round(heatmap.array * 1024), heatmap.array * 1024)  # stored in steps of 1/1024
    np.testing.assert_allclose(volume.ijk_to_ras_points([top["position_kji"]])[0], top["position_ras"], atol=1e-3)
    csv_rows = (out / "detections.csv").read_text(encoding="utf-8").splitlines()
    assert csv_rows[0].startswith("rank,kind,confidence,k,j,i") and len(csv_rows) == len(detections) + 1
    assert csv_rows[1].split(",")[1] == "lesion"


def test_postprocess_in_the_bounding_box_equals_the_whole_volume():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    labels = (ndimage.gaussian_filter(rng.random((30, 40, 50)), 2) > 0.52).astype(np.uint8)
    labels[(labels == 1) & (rng.random(labels.shape) < 0.05)] = 2
    labels[12:18, 15:25, 20:30] = 2  # tumor with a hole-free shell or not, wherever it falls
    labels[0, :, :3] = 2  # tumors touching the border
    spec = {"largest_component": [1, 2], "inside": {"2": [1, 2]}}
    expected = labels.copy()
    mask = np.isin(expected, [1, 2])
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    expected[mask & (components != sizes.argmax())] = 0
    region = ndimage.binary_fill_holes(np.isin(expected, [1, 2]))
    expected[(expected == 2) & ~region] = 0
    np.testing.assert_array_equal(postprocess(labels, spec), expected)
    assert count > 1 and (expected != labels).any()


def test_postprocess_min_volume_relabels_small_components_with_their_surroundings():
    from scipy import ndimage

    rng = np.random.default_rng(6)
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:18, 3:27, 3:27] = 1
    blobs = ndimage.gaussian_filter(rng.random(labels.shape), 1.5) > 0.53
    labels[blobs & (labels == 1)] = 2  # tumors of many sizes inside the liver
    labels[0, 0, :2] = 2  # a speck in the background, outside the liver
    spacing = (2.0, 0.8, 0.8)
    below = 0.02  # mL: 15.6 voxels of 1.28 mm³
    # independently: over the whole volume, one component at a time, its 6-neighbours outside it
    expected = labels.copy()
    components, count = ndimage.label(labels == 2, structure=np.ones((3, 3, 3), bool))
    for index in range(1, count + 1):
        component = components == index
        if component.sum() * np.prod(spacing) / 1000.0 >= below:
            continue
        around = labels[ndimage.binary_dilation(component) & ~component]
        around = around[around != 2]
        expected[component] = np.bincount(around).argmax() if around.size else 0
    before = labels.copy()
    cleaned = postprocess(labels, {"min_volume_ml": {"2": below}}, spacing)
    np.testing.assert_array_equal(cleaned, expected)
    np.testing.assert_array_equal(labels, before)  # input untouched
    sizes = np.bincount(components.ravel())[1:] * np.prod(spacing) / 1000.0
    assert (sizes < below).sum() >= 3 and (sizes >= below).sum() >= 1  # some removed, some kept
    assert cleaned[0, 0, 0] == 0 and (cleaned[(labels == 2) & (cleaned != 2)] == 1).sum() > 0
    with pytest.raises(TransferSegError, match="spacing"):
        postprocess(labels, {"min_volume_ml": {"2": below}})


@pytest.mark.parametrize("postprocessing, message", [
    ({"largest_componnet": [1, 2]}, "largest_componnet is not a post-processing step"),
    ({"min_volume_ml": {"2": -1}}, "min_volume_ml must look like"),
    ({"min_volume_ml": {"tumor": 0.5}}, "min_volume_ml must look like"),
    ({"inside": {"2": []}}, "inside must look like"),
    ({"fill_holes": [0]}, "fill_holes must look like"),
    ([1, 2], "postprocessing must be an object"),
])
def test_a_card_with_a_bad_postprocessing_step_is_refused_when_read(tmp_path, tiny_model, postprocessing, message):
    from TransferSegLib.models import read_card

    folder = tmp_path / "bad"
    folder.mkdir()
    card = json.loads(tiny_model.read_text(encoding="utf-8"))
    card["postprocessing"] = postprocessing
    (folder / tiny_model.name).write_text(json.dumps(card), encoding="utf-8")
    (folder / card["weights"]["file"]).symlink_to(tiny_model.parent / card["weights"]["file"])
    with pytest.raises(TransferSegError, match=message):
        read_card(folder / tiny_model.name)


def test_the_overview_title_counts_each_kind_in_words():
    def found(kind):
        return Detection([0, 0, 0], None, 0.5, [0, 0, 0, 1, 1, 1], kind=kind)

    assert _detections_title([found("mass")] * 10 + [found("calcification_cluster")]) == \
        "1 calcification cluster, 10 masses"
    assert _detections_title([found("mass"), found("calcification_cluster")] * 2) == "2 calcification clusters, 2 masses"
    assert _detections_title([found("lesion")] * 3) == "3 detection(s)"
