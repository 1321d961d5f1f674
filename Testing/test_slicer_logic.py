"""The module's Qt-free logic on slicer-core's real MRML scene (no mocks).

The runs go through the logic's real child-process path (``slicer.util.launchConsoleProcess`` →
``python -m TransferSegLib.cli``) with the shipped default CT model, a tiny multi-view model
and the shipped DBT detector, from a scene holding a CT volume node with an oblique direction
and anisotropic spacing, placed under a patient and a study in the subject hierarchy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib.scene import grid_of  # noqa: E402
from TransferSegModuleLib.logic import TransferSegLogic  # noqa: E402
from TransferSegModuleLib import results  # noqa: E402

from TransferSegLib.io import load_volume, save_volume  # noqa: E402
from TransferSegLib.volume import TransferSegError, Volume  # noqa: E402

from conftest import LIVER_TUMOR_SEGMENTS as SEGMENTS, tiny_multiview_recipe  # noqa: E402

CT_MODEL = "ct-liver-tumor-unet3d"
DBT_MODEL = "dbt-lesion-ahnet"


# --- the scene, as the desktop has it ------------------------------------------------------------
_LOGICS = []  # module logics stay alive as long as their scenes


def new_scene():
    """A scene with what the desktop always has: default colour tables, the Segmentations
    module's logic (it registers the segment representations) and three slice views."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    _LOGICS.append(segmentations)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    colors.SetMRMLScene(None)
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    return scene


@pytest.fixture
def scene():
    scene = new_scene()
    yield scene
    scene.Clear(1)


def oblique(volume: Volume, spacing=(2.5, 0.9, 0.8)) -> Volume:
    """The same voxels on an oblique grid with anisotropic spacing."""
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    directions = rz @ rx @ np.diag([-1.0, -1.0, 1.0])
    return Volume(volume.array, spacing=spacing, directions=directions, origin=(12.0, -7.5, 30.25))


def add_input(scene, volume: Volume, name: str):
    """The volume node, under Patient → Study in the subject hierarchy."""
    node = L.add_volume_node(scene, volume, name)
    node.CreateDefaultDisplayNodes()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    item = sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemParent(item, study)
    return node, study


@pytest.fixture(scope="module")
def ct_volume():
    from TransferSegLib.phantoms import ct_phantom

    volume, _ = ct_phantom(5, shape=(24, 80, 80))
    return oblique(volume, spacing=(4.0, 4.4, 3.8))  # an adult-sized body: 35 × 30 cm


def geometry_of(node) -> tuple:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return (tuple(slicer.util.arrayFromVolume(node).shape),
            np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]))


def assert_on_grid(seg_node, volume: Volume):
    """Every segment's labelmap lies on the input's exact grid."""
    segmentation = seg_node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        L.segment_array(seg_node, segmentation.GetNthSegment(n).GetName(), volume)  # raises when off the grid


def run_job(logic, node, model, **kwargs):
    job = logic.startSegmentation(node, str(model), device="cpu", python=sys.executable, **kwargs)
    assert job.state == job.SEGMENTING
    assert job.wait(timeout=300) == job.DONE, job.message + "\n" + "\n".join(job.log[-20:])
    return job


def cli(command, path, out, model, *extra):
    done = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", command, str(path), "-o", str(out),
                           "--model", str(model), "--device", "cpu", *extra], capture_output=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    return json.loads((out / "result.json").read_text(encoding="utf-8"))


def tag(segment, name):
    value = vtk.mutable("")
    segment.GetTag(name, value)
    return str(value)


# --- geometry and segmentations --------------------------------------------------------------------
def test_volume_node_round_trip_is_exact(scene, ct_volume):
    node = L.add_volume_node(scene, ct_volume, "CT")
    back = L.volume_from_node(node)
    np.testing.assert_array_equal(back.array, ct_volume.array)
    assert back.spacing == ct_volume.spacing
    np.testing.assert_array_equal(back.origin, ct_volume.origin)
    np.testing.assert_allclose(back.directions, ct_volume.directions, atol=1e-15)
    np.testing.assert_allclose(geometry_of(node)[1], ct_volume.ijk_to_ras, atol=1e-12)  # Slicer's own IJK→RAS


def test_segmentation_node_keeps_card_labels_names_colours_and_terminology(scene, ct_volume):
    labels = np.zeros(ct_volume.shape, np.uint8)
    labels[3:9, 20:40, 20:50] = 1
    labels[5, 25:30, 30:35] = 2
    segments = [dict(SEGMENTS[0], label=3), dict(SEGMENTS[1], label=7)]  # non-contiguous card labels
    ref_node = L.add_volume_node(scene, ct_volume, "CT")
    card_labels = np.select([labels == 1, labels == 2], [3, 7], 0).astype(np.uint8)
    seg_node = L.add_segmentation_node(scene, card_labels, ct_volume, segments, "result", reference_node=ref_node)
    segmentation = seg_node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["liver", "liver tumor"]
    assert segmentation.GetNthSegment(0).GetColor() == pytest.approx(SEGMENTS[0]["color"])
    assert "SCT^10200004^Liver" in tag(segmentation.GetNthSegment(0), "TerminologyEntry")
    np.testing.assert_array_equal(L.segment_array(seg_node, "liver", ct_volume), labels == 1)
    np.testing.assert_array_equal(L.segment_array(seg_node, "liver tumor", ct_volume), labels == 2)
    exported = TransferSegLogic(scene).labelmapArray(seg_node, ref_node)
    np.testing.assert_array_equal(exported, card_labels)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # temporary nodes are gone


def test_failure_leaves_no_node(scene, ct_volume):
    labels = np.zeros(ct_volume.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    count = scene.GetNumberOfNodes()
    with pytest.raises(KeyError):  # no colour: refused before anything is built
        L.add_segmentation_node(scene, labels, ct_volume, [dict(SEGMENTS[0]), {"name": "broken", "label": 2}], "x")
    with pytest.raises(TransferSegError, match="does not match"):
        L.add_segmentation_node(scene, labels[:-1], ct_volume, SEGMENTS, "x")
    assert scene.GetNumberOfNodes() == count


def test_bad_nodes_get_clear_errors(scene):
    with pytest.raises(TransferSegError, match="select an input volume"):
        L.volume_from_node(None)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(TransferSegError, match="select an input volume"):
        L.volume_from_node(node)


def test_parameter_node_is_a_tagged_singleton(scene):
    logic = TransferSegLogic(scene)
    node = logic.getParameterNode()
    assert node.GetAttribute("ModuleName") == "TransferSeg" and node.GetSingletonTag() == "TransferSeg"
    assert logic.getParameterNode() is node and scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_models_are_listed_with_method_and_description():
    cards = {c["name"]: c for c in TransferSegLogic.installedModels()}
    assert {CT_MODEL, DBT_MODEL} <= set(cards)
    text = TransferSegLogic.modelSummary(cards[CT_MODEL])
    assert text.startswith(f"{CT_MODEL} v") and "liver tumor" in text and "unet3d" in text
    assert cards[CT_MODEL]["description"] in text
    assert "heatmap" in TransferSegLogic.modelSummary(cards[DBT_MODEL])
    assert not TransferSegLogic.isMultiview(cards[CT_MODEL])


def test_progress_status_and_failure_messages():
    assert L.parse_progress_line("PROGRESS 0.4200 inference") == (0.42, "inference")
    assert L.parse_progress_line("PROGRESS 1.5 done") == (1.0, "done")
    assert L.parse_progress_line("liver: 12 mL") is None
    assert L.parse_progress_line("PROGRESS x y") is None
    assert L.status_text(0.0, "loading model", True) == "Initializing"
    assert L.status_text(0.05, "axial", True) == "View 1/3 (axial)"
    assert L.status_text(0.04 + 0.86 * 0.5, "x", True) == "View 2/3 (coronal)"
    assert L.status_text(0.04 + 0.86 * 0.8, "x", True) == "View 3/3 (sagittal)"
    assert L.status_text(0.8, "fusing (vfn)", True) == "Fusing"
    assert L.status_text(0.5, "inference", False) == "Segmenting"
    assert "ran out of memory" in L.failure_message(-9, ["PROGRESS 0.5 x"])
    assert "ran out of memory" in L.failure_message(1, ["RuntimeError: CUDA out of memory. Tried to allocate"])
    assert L.failure_message(2, ["transferseg: error: no model named 'x'"]) == "no model named 'x'"


# --- the real runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, ct_volume):
    """The default CT model through the logic, and the CLI on the same file."""
    scene = new_scene()
    node, study = add_input(scene, ct_volume, "CT oblique")
    start = time.perf_counter()
    job = run_job(TransferSegLogic(scene), node, CT_MODEL)
    seconds = time.perf_counter() - start
    folder = tmp_path_factory.mktemp("ct-cli")
    path = save_volume(L.volume_from_node(node), folder / "ct.nrrd")
    result = cli("segment", path, folder / "out", CT_MODEL)
    yield scene, node, study, job, folder, result, seconds
    scene.Clear(1)


def test_a_scan_without_a_liver_gives_an_empty_segmentation_and_says_why_in_the_status(tmp_path):
    from test_scope import _head_ct

    scene = new_scene()
    node, _ = add_input(scene, _head_ct(), "head")
    job = run_job(TransferSegLogic(scene), node, CT_MODEL)
    assert job.status.startswith(("Done: no liver found", "Done: no plausible liver found")), job.status
    assert job.status.endswith(": liver 0.0 mL, liver tumor 0.0 mL")  # the warning, then the time and volumes
    assert job.result["volumes_ml"] == {"liver": 0.0, "liver tumor": 0.0}
    assert job.outputs.findings.GetNumberOfRows() == 0  # nothing found: an empty table
    scene.Clear(1)


def test_ct_run_builds_the_fused_segmentation_under_the_study(ct_run, ct_volume):
    scene, node, study, job, folder, _, seconds = ct_run
    print(f"CT run through the logic: {seconds:.1f} s")
    seg = job.outputs.segmentation
    assert seg.GetName() == "CT oblique TransferSeg"
    # the status line: the time taken, then each segment's volume as the child measured it
    volumes = job.result["volumes_ml"]
    assert job.status == L.done_status(job.seconds, job.result) == (
        f"Done — {job.seconds:.1f} s: liver {volumes['liver']:.1f} mL, liver tumor {volumes['liver tumor']:.1f} mL")
    assert 0 < job.seconds <= seconds
    # the findings table: the liver, then each tumor component; their volumes add up to the child's
    table = job.outputs.findings
    assert table.GetName() == "CT oblique TransferSeg findings"
    rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())]
            for r in range(table.GetNumberOfRows())]
    assert rows[0][:2] == ["liver", "liver"] and float(rows[0][2]) == pytest.approx(volumes["liver"], abs=1e-3)
    tumors = [row for row in rows if row[1] == "liver tumor"]
    assert [row[0] for row in tumors] == [f"liver tumor {n}" for n in range(1, len(tumors) + 1)]
    assert sum(float(row[2]) for row in tumors) == pytest.approx(volumes["liver tumor"], abs=2e-3)
    card = json.loads((ROOT / "Resources" / "models" / f"{CT_MODEL}.json").read_text(encoding="utf-8"))
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == \
        [s["name"] for s in card["labels"]]
    for n, described in enumerate(card["labels"]):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetColor() == pytest.approx(described["color"])
        entry = tag(segment, "TerminologyEntry")
        assert "^".join(described["terminology"]["type"]) in entry
        assert "^".join(described["terminology"]["category"]) in entry
    assert_on_grid(seg, ct_volume)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == node.GetID()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert sh.GetItemLevel(study) == "Study"
    assert job.outputs.views == {} and job.outputs.disagreement is None  # a single-network model
    for composite in (scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode") for n in range(3)):
        assert composite.GetBackgroundVolumeID() == node.GetID()


def test_ct_run_label_counts_equal_the_cli_and_exports_round_trip(ct_run, ct_volume, tmp_path):
    import slicerio

    scene, node, _, job, folder, result, _ = ct_run
    cli_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "out" / "labelmap.nii.gz")))
    logic = TransferSegLogic(scene)
    count = scene.GetNumberOfNodes()
    scene_labels = logic.labelmapArray(job.outputs.segmentation, node)
    assert np.bincount(scene_labels.ravel(), minlength=3).tolist() == \
        np.bincount(cli_labels.ravel(), minlength=3).tolist()
    assert np.bincount(cli_labels.ravel(), minlength=3)[1] > 0  # the model found liver: the test can fail
    np.testing.assert_array_equal(scene_labels, cli_labels)

    paths = {kind: logic.export(job.outputs.segmentation, node, tmp_path, kind)
             for kind in ("labelmap-nrrd", "labelmap-nifti", "segmentation")}
    assert scene.GetNumberOfNodes() == count  # exporting adds nothing to the scene
    assert paths["labelmap-nifti"].name == "CT oblique TransferSeg-labels.nii.gz".replace(" ", "_")
    for kind in ("labelmap-nrrd", "labelmap-nifti"):
        image = sitk.ReadImage(str(paths[kind]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), cli_labels)
        back = load_volume(paths[kind])
        assert back.spacing == pytest.approx(ct_volume.spacing, abs=1e-6)
        np.testing.assert_allclose(back.ijk_to_ras, ct_volume.ijk_to_ras, atol=1e-5)
    seg = slicerio.read_segmentation(str(paths["segmentation"]))
    names = {s["name"]: s for s in seg["segments"]}
    assert set(names) == {"liver", "liver tumor"}
    assert "10200004" in json.dumps(names["liver"]["terminology"])
    voxels = np.asarray(seg["voxels"])
    assert (voxels == names["liver"]["labelValue"]).sum() == (cli_labels == 1).sum()
    assert list(tmp_path.glob(".*partial*")) == []  # atomic: no temporary file is left

    with pytest.raises(FileExistsError):  # the GUI asks before replacing
        logic.export(job.outputs.segmentation, node, tmp_path, "labelmap-nrrd")
    before = paths["labelmap-nrrd"].stat().st_mtime_ns
    time.sleep(0.01)
    logic.export(job.outputs.segmentation, node, tmp_path, "labelmap-nrrd", overwrite=True)
    assert paths["labelmap-nrrd"].stat().st_mtime_ns != before


# --- multi-view --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multiview_model(tmp_path_factory):
    """A tiny multi-view model trained by the multiview recipe (as Testing/test_multiview.py does)."""
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    folder = tmp_path_factory.mktemp("mv-recipe")
    config = tiny_multiview_recipe()
    (folder / "recipe.json").write_text(json.dumps(config), encoding="utf-8")
    return run_recipe(load_config(folder / "recipe.json"), folder / "out")


def test_multiview_run_shows_views_disagreement_and_fusion(scene, multiview_model, tmp_path):
    from TransferSegLib.phantoms import ct_phantom

    volume = oblique(ct_phantom(4321, shape=(20, 40, 44))[0], spacing=(3.0, 1.4, 1.2))
    node, study = add_input(scene, volume, "CT mv")
    logic = TransferSegLogic(scene)
    card = json.loads(Path(multiview_model).read_text(encoding="utf-8"))
    assert logic.isMultiview(card) and "multi-view" in logic.modelSummary(card)
    job = run_job(logic, node, multiview_model, fusion="majority")
    out = job.outputs
    assert set(out.views) == {"axial", "coronal", "sagittal"}
    assert out.segmentation.GetName() == "CT mv TransferSeg"
    assert out.views["coronal"].GetName() == "CT mv TransferSeg coronal"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for n in out.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(n)) == study
    # the CLI on the same file, same fusion: same labels, same per-view label maps
    path = save_volume(L.volume_from_node(node), tmp_path / "mv.nrrd")
    cli("segment", path, tmp_path / "out", multiview_model, "--fusion", "majority")
    cli_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "labelmap.nii.gz")))
    np.testing.assert_array_equal(logic.labelmapArray(out.segmentation, node), cli_labels)
    for view, seg_node in out.views.items():
        assert_on_grid(seg_node, volume)
        display = seg_node.GetDisplayNode()
        assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
        segment = seg_node.GetSegmentation().GetNthSegment(0)
        assert segment.GetName() == f"liver ({view})"
        probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "views" / f"{view}.nii.gz")))
        expected = np.moveaxis(probabilities, -1, 0).argmax(axis=0)
        np.testing.assert_array_equal(logic.labelmapArray(seg_node, node), expected)
        logic.setViewOverlayVisible(out, view, False)
        assert not display.GetVisibility()
        logic.setViewOverlayVisible(out, view, True)
        assert display.GetVisibility()
    # the disagreement: a foreground overlay on the input's grid, with a colour map
    disagreement = out.disagreement
    assert geometry_of(disagreement)[0] == geometry_of(node)[0]
    np.testing.assert_allclose(geometry_of(disagreement)[1], geometry_of(node)[1], atol=1e-9)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "disagreement.nii.gz")))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(disagreement), expected, atol=1e-6)
    display = disagreement.GetDisplayNode()
    assert display.GetColorNodeID() in L.DISAGREEMENT_COLORS and display.GetApplyThreshold()
    composites = [scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode") for n in range(3)]
    assert all(c.GetForegroundVolumeID() == disagreement.GetID() for c in composites)
    logic.setOverlay(disagreement, True, 0.8)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.8) for c in composites)
    logic.setOverlay(disagreement, False, 0.8)
    assert all(c.GetForegroundVolumeID() is None for c in composites)


# --- DBT --------------------------------------------------------------------------------------------
def test_dbt_run_shows_heatmap_and_detections_with_a_live_threshold(scene, tmp_path):
    from TransferSegLib.phantoms import dbt_phantom

    volume = dbt_phantom(3, shape=(16, 128, 96), masses=2)[0]
    volume = Volume(volume.array, volume.spacing, volume.directions, volume.origin)
    node, study = add_input(scene, volume, "DBT")
    logic = TransferSegLogic(scene)
    job = run_job(logic, node, DBT_MODEL)
    out = job.outputs
    assert out.segmentation is None and out.views == {}  # a heatmap run writes no .seg.nrrd
    path = save_volume(L.volume_from_node(node), tmp_path / "dbt.nrrd")
    cli("detect", path, tmp_path / "out", DBT_MODEL)
    detections = json.loads((tmp_path / "out" / "detections.json").read_text(encoding="utf-8"))["detections"]
    assert detections, "the detector found nothing: the markups checks below would be empty"
    heatmap = out.heatmap
    assert heatmap.GetName() == "DBT lesion heatmap"
    # the heatmap keeps the model's working grid (1 × 0.5 × 0.5 mm, not the input's 0.4 mm pixels) over the input's box
    written = load_volume(tmp_path / "out" / "heatmap.nii.gz")
    shown, grid = grid_of(heatmap), grid_of(node)
    assert shown.shape == written.shape != volume.shape
    np.testing.assert_allclose(shown.spacing, written.spacing, atol=1e-9)
    np.testing.assert_allclose(shown.directions, grid.directions, atol=1e-9)
    box = np.array([[-0.5, -0.5, -0.5], [n - 0.5 for n in shown.shape]])
    whole = np.array([[-0.5, -0.5, -0.5], [n - 0.5 for n in volume.shape]])
    np.testing.assert_allclose(shown.ijk_to_ras_points(box), grid.ijk_to_ras_points(whole), atol=1e-4)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "heatmap.nii.gz")))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), expected, atol=1e-6)
    assert heatmap.GetDisplayNode().GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    composites = [scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode") for n in range(3)]
    assert all(c.GetForegroundVolumeID() == heatmap.GetID() and c.GetBackgroundVolumeID() == node.GetID()
               for c in composites)

    points = out.detections
    assert points.GetName() == "DBT detections" and points.GetNumberOfControlPoints() == len(detections)
    for n, d in enumerate(detections):
        np.testing.assert_allclose(points.GetNthControlPointPositionWorld(n), d["position_ras"], atol=1e-4)
        assert points.GetNthControlPointLabel(n) == results.point_label(d)  # its kind, then its confidence
        assert points.GetNthControlPointLabel(n) == {"mass": "mass ", "calcification_cluster": "calc "}.get(
            d["kind"], "") + f"{d['confidence']:.2f}"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(points)) == study
    # the status line counts the lesions with their confidences; the table lists each detection where it is
    confidences = ", ".join(f"{d['confidence']:.2f}" for d in detections[:5]) + (", …" if len(detections) > 5 else "")
    lesions = f"{len(detections)} lesion{'' if len(detections) == 1 else 's'}"
    assert job.status.endswith(f"{lesions} (confidence {confidences})")
    table = out.findings
    assert table.GetName() == "DBT detections table" and table.GetNumberOfRows() == len(detections)
    assert sh.GetItemParent(sh.GetItemByDataNode(table)) == study
    for n, d in enumerate(detections):
        kind = d.get("kind") or "detection"
        assert table.GetCellText(n, 0) == f"{kind} {n + 1}" and table.GetCellText(n, 1) == (d.get("kind") or "")
        assert float(table.GetCellText(n, 2)) == pytest.approx(d["confidence"], abs=5e-4)
        assert [float(table.GetCellText(n, table.GetColumnIndex(axis))) for axis in "RAS"] == pytest.approx(
            d["position_ras"], abs=0.05)

    confidences = sorted(d["confidence"] for d in detections)
    threshold = confidences[len(confidences) // 2]
    shown = logic.setConfidenceThreshold(points, threshold)
    assert shown == sum(c >= threshold for c in confidences)
    assert [points.GetNthControlPointVisibility(n) for n in range(len(detections))] == \
        [d["confidence"] >= threshold for d in detections]
    assert logic.setConfidenceThreshold(points, 0.0) == len(detections)
    assert logic.setConfidenceThreshold(points, 1.01) == 0
    scene.RemoveNode(heatmap)  # the user deletes outputs: the display controls do nothing, without errors
    scene.RemoveNode(points)
    logic.setOverlay(heatmap, True, 0.5)
    assert logic.setConfidenceThreshold(points, 0.5) == 0
    assert all(c.GetForegroundVolumeID() is None for c in composites)


# --- cancel and start errors --------------------------------------------------------------------------
def test_cancel_mid_run_leaves_the_scene_as_it_was(scene, ct_volume):
    node, _ = add_input(scene, ct_volume, "CT")
    count = scene.GetNumberOfNodes()
    logic = TransferSegLogic(scene)
    job = logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    folder = job._folder
    deadline = time.monotonic() + 120
    while job.poll() == job.SEGMENTING and job.fraction == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the first PROGRESS line: the child is running the model
    assert job.state == job.SEGMENTING, job.message
    pid = job._process.pid
    start = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - start < 0.5  # Cancel does not block the GUI
    assert job.wait(timeout=60) == job.CANCELLED and job.status == "Cancelled"
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not folder.exists()
    assert scene.GetNumberOfNodes() == count


def test_start_errors_leave_nothing_behind_and_a_later_run_works(scene, ct_volume, tiny_model):
    node, _ = add_input(scene, ct_volume, "CT")
    count = scene.GetNumberOfNodes()
    logic = TransferSegLogic(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(TransferSegError, match="harden the transform"):
        logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    node.SetAndObserveTransformNodeID(None)
    scene.RemoveNode(transform)
    with pytest.raises(TransferSegError, match="no model named 'no-such-model'"):
        logic.startSegmentation(node, "no-such-model", device="cpu", python=sys.executable)
    assert scene.GetNumberOfNodes() == count
    job = logic.startSegmentation(node, str(tiny_model), device="no-such-device", python=sys.executable)
    assert job.wait(timeout=120) == job.FAILED and "device" in job.message.lower()
    assert job.status.startswith("Failed: ") and scene.GetNumberOfNodes() == count
    job = run_job(logic, node, tiny_model)  # the next run works
    assert job.outputs.segmentation.GetName() == "CT TransferSeg"


@pytest.mark.skipif(sys.platform == "win32", reason="the wrapper is a POSIX shell script")
def test_a_child_that_closes_its_output_before_it_exits_still_finishes(scene, ct_volume, tiny_model, tmp_path):
    """The reader sees the end of the output before the exit status is there: the job must still end."""
    import stat

    wrapper = tmp_path / "python-then-linger"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\ncode=$?\nexec 1>&- 2>&-\nsleep 0.5\nexit $code\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    node, _ = add_input(scene, ct_volume, "CT")
    job = TransferSegLogic(scene).startSegmentation(node, str(tiny_model), device="cpu", python=str(wrapper))
    assert job.wait(timeout=120) == job.DONE, job.message


@pytest.mark.skipif(sys.platform == "win32", reason="the interrupted child is killed by signal")
def test_closing_slicer_mid_run_removes_the_temporary_folder_at_once(scene, ct_volume, tmp_path):
    """Slicer closes during a run: close() kills the child and removes its folder, with no poll after it."""
    node, _ = add_input(scene, ct_volume, "CT")
    count = scene.GetNumberOfNodes()
    slicer_temp = tmp_path / "Slicer temp"  # Slicer's own temporary folder (may not exist yet)
    logic = TransferSegLogic(scene, temporaryFolder=str(slicer_temp))
    job = logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    folder = job._folder
    assert folder.parent == slicer_temp
    deadline = time.monotonic() + 120
    while job.poll() == job.SEGMENTING and job.fraction == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the child is running the model
    assert job.state == job.SEGMENTING, job.message
    assert (folder / "input.nrrd").is_file()
    pid = job._process.pid
    job.close()
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert job.state == job.CANCELLED and not folder.exists() and list(slicer_temp.iterdir()) == []
    assert job.poll() == job.CANCELLED and scene.GetNumberOfNodes() == count
    job.close()  # a second close (or one after the job ended) does nothing


# --- large volumes: what the GUI thread waits for, and the memory a run takes inside Slicer -------------
def process_memory(key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since :func:`reset_peak_memory`) of this process, in bytes."""
    import re

    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def int16_ct_node(scene, shape, name="CT"):
    """A CT-sized int16 volume node built from a numpy array (as a DICOM CT loads), on an oblique grid."""
    grid = oblique(Volume(np.broadcast_to(np.float32(0), shape)), spacing=(1.25, 0.703125, 0.703125))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*grid.spacing[::-1])
    node.SetOrigin(*grid.origin)
    node.SetIJKToRASDirections(grid.directions)
    voxels = np.random.default_rng(11).integers(-1024, 3072, shape, dtype=np.int16)
    slicer.util.updateVolumeFromArray(node, voxels)
    return node, grid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak memory from /proc")
def test_a_segment_click_on_a_large_ct_returns_at_once_and_the_child_reads_its_exact_voxels(scene, tmp_path):
    """The click used to copy the volume to float32 and gzip-write it on the GUI thread (this CT: 5.6 s,
    700 MB extra).  Now it only validates; a worker writes the voxels as they are and the child starts
    on the complete file."""
    node, grid = int16_ct_node(scene, (300, 512, 512))
    voxels = slicer.util.arrayFromVolume(node)
    count = scene.GetNumberOfNodes()
    temp = tmp_path / "Slicer temp"
    logic = TransferSegLogic(scene, temporaryFolder=str(temp))
    reset_peak_memory()
    before = process_memory("VmRSS")
    start = time.perf_counter()
    job = logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    blocked = time.perf_counter() - start
    folder, gaps, last = job._folder, [], time.perf_counter()
    while job.poll() == job.SEGMENTING and job._process is None:  # the GUI's timer, while the worker writes
        time.sleep(0.01)
        gaps.append(time.perf_counter() - last)
        last = time.perf_counter()
    extra = process_memory("VmHWM") - before
    print(f"Segment click on a {voxels.nbytes / 2**20:.0f} MB int16 CT: the GUI thread waited {blocked:.3f} s; "
          f"input written in {sum(gaps):.2f} s, longest GUI pause {max(gaps):.3f} s; extra peak {extra / 2**20:.1f} MB")
    assert job.state == job.SEGMENTING and job._process is not None, job.message
    assert blocked < 0.5
    assert max(gaps) < 0.5  # the worker does not hold the GUI thread
    assert extra < 0.1 * voxels.nbytes  # no copy of the voxels
    # what the child reads (its own reader): the voxels in their own type, uncompressed, on the exact grid
    import SimpleITK as sitk

    path = folder / "input.nrrd"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetPixelID() == sitk.sitkInt16 and voxels.nbytes < path.stat().st_size < voxels.nbytes + 4096
    back = load_volume(path)
    np.testing.assert_array_equal(back.array, voxels)
    assert back.spacing == pytest.approx(grid.spacing, rel=1e-14)
    np.testing.assert_allclose(back.origin, grid.origin, rtol=0, atol=1e-13)
    np.testing.assert_allclose(back.directions, grid.directions, rtol=0, atol=1e-15)
    del back
    pid = job._process.pid
    job.close()  # the network is not needed here
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not folder.exists() and list(temp.iterdir()) == [] and scene.GetNumberOfNodes() == count

    # Cancel while the worker writes: no child starts, no file is left
    job = logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    job.cancel()
    assert job.wait(timeout=60) == job.CANCELLED and job._process is None
    # the volume edited while it is handed over: refused, rather than segmenting a mix of old and new voxels
    job = logic.startSegmentation(node, CT_MODEL, device="cpu", python=sys.executable)
    voxels[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(node)
    assert job.wait(timeout=60) == job.FAILED and "changed" in job.message and job._process is None
    assert list(temp.iterdir()) == [] and scene.GetNumberOfNodes() == count


def test_a_volume_with_nan_voxels_fails_with_a_clear_message_before_any_child_starts(scene, ct_volume, tmp_path):
    """The worker that writes the input refuses NaN as the float copy used to (the click itself reads no voxel)."""
    array = ct_volume.array.copy()
    array[3, 4, 5] = np.nan
    node, _ = add_input(scene, Volume(array, ct_volume.spacing, ct_volume.directions, ct_volume.origin), "CT")
    count = scene.GetNumberOfNodes()
    job = TransferSegLogic(scene, temporaryFolder=str(tmp_path)).startSegmentation(node, CT_MODEL, device="cpu",
                                                                                   python=sys.executable)
    assert job.wait(timeout=60) == job.FAILED and job._process is None
    assert "1 voxel(s) that are NaN or infinite" in job.message and "'CT'" in job.message
    assert list(tmp_path.iterdir()) == [] and scene.GetNumberOfNodes() == count


IMPORT_MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
import numpy as np, slicer
from TransferSegModuleLib import logic as L
from test_slicer_logic import int16_ct_node, process_memory, reset_peak_memory

folder, card, shape = Path(sys.argv[1]), json.loads(sys.argv[2]), tuple(json.loads(sys.argv[3]))
scene = slicer.vtkMRMLScene()
slicer.mrmlScene = scene
segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
segmentations.SetMRMLScene(scene)
node, grid = int16_ct_node(scene, shape)
logic = L.TransferSegLogic(scene)
views = ["segmentation.seg.nrrd"] + [f"views/{v}.nii.gz" for v in ("axial", "coronal", "sagittal")]
measured = {"input": slicer.util.arrayFromVolume(node).nbytes}
for phase, files in (("views", views), ("disagreement", ["disagreement.nii.gz"])):
    reset_peak_memory()
    before = process_memory("VmRSS")
    outputs = logic.importResult(node, folder, {"files": files}, card)
    peak = process_memory("VmHWM") - before
    held = outputs.disagreement.GetImageData().GetPointData().GetScalars() if outputs.disagreement else None
    measured[phase] = {"peak": peak, "held": held.GetNumberOfValues() * held.GetDataTypeSize() if held else 0,
                       "liver": int(L.segment_array(outputs.views["axial"], "liver (axial)", grid).sum())
                       if outputs.views else None,
                       "dtype": held.GetDataTypeAsString() if held else None}
    L.remove_nodes(scene, outputs.nodes())
print(json.dumps(measured))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak memory from /proc")
def test_importing_a_large_multiview_result_takes_less_extra_memory_than_the_input(tmp_path):
    """The import used to make an int64 argmax per view, float copies and a second copy into each node
    (512 × 512 × 200: 939 MB extra peak for a 100 MB input).  Now each file streams, in its own type, into
    the buffer its node keeps; a view's labels go to Slicer as their non-empty box."""
    from TransferSegLib.io import save_scalar, save_segmentation

    shape = (200, 512, 512)
    grid = oblique(Volume(np.broadcast_to(np.float32(0), shape)), spacing=(1.25, 0.703125, 0.703125))
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    inside = ((k - 100) / 70.0) ** 2 + ((j - 230) / 120.0) ** 2 + ((i - 180) / 110.0) ** 2  # a liver-sized blob
    labels = (inside < 1).astype(np.uint8)
    labels[inside < 0.05] = 2
    del inside
    (tmp_path / "views").mkdir()
    probabilities = np.where(labels == np.arange(3, dtype=np.uint8)[:, None, None, None], 230, 12).astype(np.uint8)
    save_scalar(probabilities, grid, tmp_path / "views" / "axial.nii.gz")  # as the child writes them
    del probabilities
    for view in ("coronal", "sagittal"):
        (tmp_path / "views" / f"{view}.nii.gz").write_bytes((tmp_path / "views" / "axial.nii.gz").read_bytes())
    save_scalar(np.where(labels > 0, np.float32(1 / 3), np.float32(0)), grid, tmp_path / "disagreement.nii.gz")
    save_segmentation(labels, grid, tmp_path / "segmentation.seg.nrrd", SEGMENTS)
    card = {"name": "test", "labels": SEGMENTS}
    done = subprocess.run([sys.executable, "-c", IMPORT_MEMORY_PROBE, str(tmp_path), json.dumps(card), json.dumps(shape)],
                          capture_output=True, encoding="utf-8", cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "TransferSeg"),
                                                                            str(ROOT / "Testing")])})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    size, views, disagreement = measured["input"], measured["views"], measured["disagreement"]
    print(f"import of a {size / 2**20:.0f} MB int16 CT's multi-view result: segmentation + 3 views "
          f"{views['peak'] / 2**20:.0f} MB extra peak; disagreement {disagreement['peak'] / 2**20:.0f} MB extra peak, "
          f"of which its node keeps {disagreement['held'] / 2**20:.0f} MB")
    assert views["liver"] == int((labels == 1).sum())  # the argmax is right
    assert disagreement["dtype"] == "float"  # kept in its stored type
    assert views["peak"] < size
    assert disagreement["peak"] - disagreement["held"] < size


def test_outputs_are_read_as_simpleitk_reads_them_in_their_own_type(tmp_path, ct_volume):
    """The streaming readers against SimpleITK: argmax ties, a label map's box, NRRD (through SimpleITK),
    float voxels bit for bit; a file off the grid, a truncated file and a cancel."""
    import threading

    from TransferSegLib.io import save_scalar
    from vtk.util.numpy_support import vtk_to_numpy

    def full(image):
        e = image.GetExtent()
        out = np.zeros(ct_volume.shape, np.uint8)
        out[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        return out, e

    rng = np.random.default_rng(3)
    probabilities = (rng.integers(0, 3, (3,) + ct_volume.shape) * 100).astype(np.uint8)  # ties: the first class wins
    probabilities[0, :, :5] = 255  # background only there: the box is smaller than the grid
    probabilities[0, :2] = 255
    go = threading.Event()
    for name in ("view.nii.gz", "view.nrrd"):
        save_scalar(probabilities, ct_volume, tmp_path / name)
        expected = np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), -1, 0).argmax(axis=0)
        labels, extent = full(L.read_view_labels(tmp_path / name, ct_volume, go))
        np.testing.assert_array_equal(labels, expected)
        assert extent == (0, 79, 5, 79, 2, 23)
    save_scalar(probabilities[1], ct_volume, tmp_path / "one.nii.gz")  # one component: thresholded at half
    np.testing.assert_array_equal(full(L.read_view_labels(tmp_path / "one.nii.gz", ct_volume, go))[0],
                                  probabilities[1] >= 128)
    values = rng.random(ct_volume.shape, dtype=np.float32)
    for name in ("values.nii.gz", "values.nrrd"):
        save_scalar(values, ct_volume, tmp_path / name)
        image = L.read_scalar_output(tmp_path / name, ct_volume, go)
        assert image.GetScalarType() == vtk.VTK_FLOAT
        np.testing.assert_array_equal(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ct_volume.shape), values)
    with pytest.raises(TransferSegError, match="does not lie on the input volume's grid"):
        L.read_scalar_output(tmp_path / "values.nii.gz", oblique(ct_volume, spacing=(4.0, 4.4, 3.9)), go)
    data = (tmp_path / "values.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(TransferSegError, match="cut.nii.gz cannot be read"):
        L.read_scalar_output(tmp_path / "cut.nii.gz", ct_volume, go)
    go.set()
    with pytest.raises(L.Stopped):
        L.read_view_labels(tmp_path / "view.nii.gz", ct_volume, go)


# --- terminology (no slicerio in Slicer's GUI process) ------------------------------------------------
def _slicer_entry(text: str):
    """Slicer's own reading of a TerminologyEntry string."""
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic().DeserializeTerminologyEntry(text, entry), text
    return entry


def test_terminology_strings_round_trip_through_slicers_own_serialiser():
    from TransferSegLib.terminology import entry_from_card, entry_from_string, entry_to_string

    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    # the string Slicer itself writes on every new segment (vtkSegment's default: Tissue)
    default = slicer.vtkSegment().GetTerminology()
    entry = entry_from_string(default)
    assert entry == {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
                     "category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"],
                     "anatomicContextName": "Anatomic codes - DICOM master list"}
    assert entry_to_string(entry) == default
    # an entry with every code, built and written by Slicer
    built = slicer.vtkSlicerTerminologyEntry()
    built.SetTerminologyContextName("ctx")
    built.SetRegionContextName("regions")
    for code, (scheme, value, meaning) in (
            (built.GetCategoryObject(), ("SCT", "49755003", "Morphologically Altered Structure")),
            (built.GetTypeObject(), ("SCT", "4147007", "Mass")), (built.GetTypeModifierObject(), ("SCT", "1", "M")),
            (built.GetRegionObject(), ("SCT", "64033007", "Kidney")),
            (built.GetRegionModifierObject(), ("SCT", "24028007", "Right"))):
        code.SetCodingSchemeDesignator(scheme)
        code.SetCodeValue(value)
        code.SetCodeMeaning(meaning)
    written = terminologies.SerializeTerminologyEntry(built)
    entry = entry_from_string(written)
    assert entry["typeModifier"] == ["SCT", "1", "M"]
    assert entry["anatomicRegionModifier"] == ["SCT", "24028007", "Right"]
    assert entry_to_string(entry) == written
    # what we write from every shipped card, Slicer reads and writes back unchanged, with the card's codes
    cards = [c for c in TransferSegLogic.installedModels()] + [{"labels": SEGMENTS}]
    for described in (s for card in cards for s in card["labels"] if s.get("terminology")):
        text = L.terminology_string(described["terminology"])
        assert terminologies.SerializeTerminologyEntry(_slicer_entry(text)) == text
        entry = entry_from_string(text)
        for key, code in described["terminology"].items():
            assert entry[key] == code
        assert entry_from_card(text) == entry  # a string in a card is read as it is
    # a colour table's string (Slicer's own test, vtkMRMLColorTableNodeTest1) ends in "~": the same entry
    entry = entry_from_string("~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^~~"
                              "SCT^64033007^Kidney~SCT^24028007^Right~")
    assert entry["contextName"] == "" and entry["anatomicRegion"][2] == "Kidney" and "typeModifier" not in entry
    for bad in ("~~", "context~^^~^^", "a~b", "c~SCT^1^x~SCT^2", "c~SCT^1^x~SCT^2^y~^^~~^^~^^~extra"):
        with pytest.raises(TransferSegError):
            entry_from_string(bad)
    with pytest.raises(TransferSegError, match="needs 'type'"):
        entry_from_card({"category": ["SCT", "49755003", "Morphologically Altered Structure"]})


def test_segments_name_the_shipped_context_and_slicer_finds_their_types_in_it(scene, ct_volume):
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    name = terminologies.LoadTerminologyFromFile(str(L.TERMINOLOGY_FILE))  # as the module does at startup
    assert name == L.terminology_context().name == "Segmentation category and type - TransferSeg"
    cards = {c["name"]: c for c in TransferSegLogic.installedModels()}
    for described in cards[CT_MODEL]["labels"] + cards[DBT_MODEL]["labels"]:
        entry = _slicer_entry(L.terminology_string(described["terminology"]))
        assert entry.GetTerminologyContextName() == name
        category, found = entry.GetCategoryObject(), slicer.vtkSlicerTerminologyType()
        types = []
        for n in range(terminologies.GetNumberOfTypesInTerminologyCategory(name, category)):
            assert terminologies.GetNthTypeInTerminologyCategory(name, category, n, found)
            types.append(found.GetCodeValue())
        assert entry.GetTypeObject().GetCodeValue() in types, described["name"]
    # a type our context does not hold names Slicer's General Anatomy list
    kidney = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"]}
    assert L.terminology_string(kidney).startswith("Segmentation category and type - 3D Slicer General Anatomy list~")
    # and the segments the logic builds carry it
    labels = np.zeros(ct_volume.shape, np.uint8)
    labels[3:9, 20:40, 20:50] = 1
    seg = L.add_segmentation_node(scene, labels, ct_volume, cards[CT_MODEL]["labels"], "result")
    tumor = seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("liver tumor"))
    assert tumor.GetTerminology() == L.terminology_string(cards[CT_MODEL]["labels"][1]["terminology"])
    assert _slicer_entry(tumor.GetTerminology()).GetRegionObject().GetCodeMeaning() == "Liver"


def test_the_module_logic_needs_no_slicerio(ct_volume, tmp_path):
    """Slicer does not bundle slicerio: building segments and importing a run's .seg.nrrd work without it."""
    from TransferSegLib.io import save_segmentation

    card = {c["name"]: c for c in TransferSegLogic.installedModels()}[CT_MODEL]
    labels = np.zeros(ct_volume.shape, np.uint8)
    labels[3:9, 20:40, 20:50] = 1
    labels[5, 25:30, 30:35] = 2
    save_segmentation(labels, ct_volume, tmp_path / "segmentation.seg.nrrd", card["labels"])  # the child's part
    save_volume(ct_volume, tmp_path / "ct.nrrd")
    code = f"""
import json, sys
sys.modules["slicerio"] = None  # any import of it raises
import numpy as np, slicer
from TransferSegModuleLib import logic as L
from TransferSegLib.io import load_volume
scene = slicer.vtkMRMLScene()
slicer.mrmlScene = scene
segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
segmentations.SetMRMLScene(scene)
card = json.loads({json.dumps(json.dumps(card))})
volume = load_volume({str(tmp_path / "ct.nrrd")!r})
node = L.add_volume_node(scene, volume, "CT")
built = L.add_segmentation_node(scene, (volume.array > 1e9).astype(np.uint8), volume, card["labels"], "built")
out = L.TransferSegLogic(scene).importResult(node, {str(tmp_path)!r}, {{"files": ["segmentation.seg.nrrd"]}}, card)
for seg in (built, out.segmentation):
    segmentation = seg.GetSegmentation()
    print([(segmentation.GetNthSegment(n).GetName(), segmentation.GetNthSegment(n).GetTerminology())
           for n in range(segmentation.GetNumberOfSegments())])
print(int(L.segment_array(out.segmentation, "liver tumor", volume).sum()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "TransferSeg")])})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    expected = repr([(s["name"], L.terminology_string(s["terminology"])) for s in card["labels"]])
    assert lines[-3] == lines[-2] == expected
    assert int(lines[-1]) == (labels == 2).sum()


# --- saved scenes, display, devices --------------------------------------------------------------------
def test_a_saved_scene_naming_a_model_that_is_not_installed_falls_back_to_the_default(tmp_path):
    """Slicer's combo box connector raises on a value it does not list: the GUI repairs the node first."""
    scene = new_scene()
    node = TransferSegLogic(scene).getParameterNode()
    for name, value in (("task", "ct"), ("model", "liver-model-from-another-computer"), ("device", "mps"),
                        ("fusion", "staple"), ("overlayOpacity", "0.7")):
        node.SetParameter(name, value)
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Commit()
    scene.Clear(1)
    loaded = new_scene()
    loaded.SetURL(str(tmp_path / "saved.mrml"))
    assert loaded.Connect()
    node = TransferSegLogic(loaded).getParameterNode()
    assert node.GetParameter("model") == "liver-model-from-another-computer"  # as saved
    models = [c["name"] for c in TransferSegLogic.installedModels()]
    choices = {"task": (["ct", "dbt"], "ct"), "model": (models, CT_MODEL), "device": (["auto", "cpu", "cuda"], "auto"),
               "fusion": (list(L.FUSIONS), "vfn")}
    events = []
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: events.append(event))
    repaired = TransferSegLogic.repairChoices(node, choices)
    assert repaired == [("model", "liver-model-from-another-computer", CT_MODEL), ("device", "mps", "auto")]
    assert len(events) == 1  # one Modified event: the GUI updates once
    assert [node.GetParameter(n) for n in ("task", "model", "device", "fusion", "overlayOpacity")] == \
        ["ct", CT_MODEL, "auto", "staple", "0.7"]  # valid values stay
    assert TransferSegLogic.repairChoices(node, choices) == []
    loaded.Clear(1)


def test_only_display_parameters_count_as_a_display_change(scene):
    node = TransferSegLogic(scene).getParameterNode()
    for name, value in (("device", "auto"), ("model", CT_MODEL), ("showAxial", "True"), ("overlayOpacity", "0.5")):
        node.SetParameter(name, value)
    before = TransferSegLogic.displayParameters(node)
    for name, value in (("device", "cpu"), ("model", DBT_MODEL), ("task", "dbt"), ("fusion", "majority")):
        node.SetParameter(name, value)
        assert TransferSegLogic.displayParameters(node) == before, name  # the user's slice views stay
    node.SetParameter("overlayOpacity", "0.8")
    after = TransferSegLogic.displayParameters(node)
    assert {n for n in after if after[n] != before[n]} == {"overlayOpacity"}


@pytest.mark.skipif(sys.platform == "win32", reason="the slow nvidia-smi is a POSIX shell script")
def test_the_gpu_query_does_not_wait_for_a_slow_nvidia_smi(tmp_path, monkeypatch):
    import stat

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nsleep 1\necho "0, NVIDIA Test GPU, 24576"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    query = L.GpuQuery()
    assert time.perf_counter() - start < 0.3 and not query.done and query.result is None  # the GUI goes on
    assert query.wait(timeout=10) == [(0, "NVIDIA Test GPU", 24576)] and query.done
    smi.write_text('#!/bin/sh\nsleep 3\n')  # hangs past the timeout: no GPU, no error
    assert L.GpuQuery(timeout=0.5).wait(timeout=10) == []
