"""A run's results in view, on slicer-core's real MRML scene (no mocks): the findings table measured from
a label map (a result without a report has it; test_slicer_findings_report.py checks the report's table)
against that label map, a table row jumping the slice views there, the segmentation in 3D, and a run
written into an output segmentation the user picked (twice: the same nodes, the same segments).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib import results  # noqa: E402
from TransferSegModuleLib.logic import TransferSegLogic  # noqa: E402

from TransferSegLib.volume import Volume  # noqa: E402

from conftest import LIVER_TUMOR_SEGMENTS as SEGMENTS  # noqa: E402
from test_slicer_logic import add_input, new_scene, oblique, run_job  # noqa: E402


@pytest.fixture
def scene():
    scene = new_scene()
    for name in ("Red", "Yellow", "Green"):  # the slice views' nodes, as the desktop's layout has them
        node = slicer.vtkMRMLSliceNode()
        node.SetLayoutName(name)
        scene.AddNode(node)
    yield scene
    scene.Clear(1)


def ijk_to_ras(node) -> np.ndarray:
    """The node's own IJK→RAS matrix, from MRML (not from the module's Volume)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def centre_ras(node, kji_points) -> np.ndarray:
    kji = np.asarray(kji_points, float).mean(axis=0)
    return (ijk_to_ras(node) @ np.r_[kji[::-1], 1.0])[:3]


def table_rows(table) -> list:
    return [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())]
            for r in range(table.GetNumberOfRows())]


@pytest.fixture
def labelled(scene):
    """A liver with three tumors on an oblique, anisotropic grid: two boxes apart, and two boxes that touch
    only at a corner (one component: the model's clean-up counts 26-connected components)."""
    labels = np.zeros((20, 40, 44), np.uint8)
    labels[2:18, 4:36, 4:40] = 1
    tumors = {"big": (slice(4, 8), slice(6, 12), slice(6, 11)),  # 4 × 6 × 5 = 120 voxels
              "small": (slice(12, 14), slice(25, 28), slice(30, 33)),  # 2 × 3 × 3 = 18 voxels
              "corner a": (slice(8, 10), slice(20, 22), slice(10, 12)),  # 8 voxels
              "corner b": (slice(10, 12), slice(22, 24), slice(12, 14))}  # 8 more, touching at one corner
    for box in tumors.values():
        labels[box] = 2
    volume = oblique(Volume(np.zeros(labels.shape, np.float32), (1.0, 1.0, 1.0), np.eye(3), (0.0, 0.0, 0.0)),
                     spacing=(2.5, 0.9, 0.8))
    node, _ = add_input(scene, volume, "CT")
    segmentation = L.add_segmentation_node(scene, labels, volume, SEGMENTS, "CT TransferSeg", reference_node=node)
    return scene, node, volume, segmentation, labels, tumors


def test_the_findings_table_lists_the_liver_and_each_tumor_component_as_the_label_map_holds_them(labelled):
    scene, node, volume, segmentation, labels, tumors = labelled
    rows = results.segment_rows(segmentation, {"labels": SEGMENTS}, volume)
    table = TransferSegLogic(scene).findingsTable(rows, "CT TransferSeg findings")
    voxel_ml = 2.5 * 0.9 * 0.8 / 1000.0
    boxes = {name: np.argwhere(np.pad(np.ones([s.stop - s.start for s in box], bool),
                                      [(s.start, n - s.stop) for s, n in zip(box, labels.shape)]))
             for name, box in tumors.items()}
    expected = [("liver", (labels == 1).sum(), np.argwhere(labels == 1)),
                ("liver tumor 1", 120, boxes["big"]),
                ("liver tumor 2", 18, boxes["small"]),  # 18 > 16: the two corner boxes come last, as one
                ("liver tumor 3", 16, np.concatenate([boxes["corner a"], boxes["corner b"]]))]
    found = table_rows(table)
    assert [title for title in (table.GetColumnName(c) for c in range(table.GetNumberOfColumns()))] == \
        list(results.SEGMENT_COLUMNS)
    assert [row[0] for row in found] == [name for name, _, _ in expected]
    assert [row[1] for row in found] == ["liver", "liver tumor", "liver tumor", "liver tumor"]
    for row, (name, voxels, kji) in zip(found, expected):
        assert float(row[2]) == pytest.approx(voxels * voxel_ml, abs=1e-3), name
        assert [float(v) for v in row[3:6]] == pytest.approx(centre_ras(node, kji), abs=0.05), name
    assert table.GetUseColumnTitleAsColumnHeader() and table.GetColumnUnitLabel("R") == "mm"
    assert table.GetLocked()
    # an empty segmentation: an empty table, no error
    empty = L.add_segmentation_node(scene, np.zeros_like(labels), volume, SEGMENTS, "empty", reference_node=node)
    assert results.segment_rows(empty, {"labels": SEGMENTS}, volume) == []


def test_a_findings_row_jumps_the_slice_views_there(labelled):
    scene, node, volume, segmentation, labels, tumors = labelled
    logic = TransferSegLogic(scene)
    table = logic.findingsTable(results.segment_rows(segmentation, {"labels": SEGMENTS}, volume), "findings")
    target = [float(table.GetCellText(2, c)) for c in (3, 4, 5)]  # the second tumor
    assert logic.jumpToRow(table, 2) == pytest.approx(target)
    slices = [scene.GetNthNodeByClass(n, "vtkMRMLSliceNode") for n in range(3)]
    for slice_node in slices:  # centred: each view's slice plane passes through the tumor, at its middle
        m = slice_node.GetSliceToRAS()
        assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(target, abs=1e-6)
    # a table view without column titles as header shows them in its first row: that row is no finding
    table.SetUseColumnTitleAsColumnHeader(False)
    assert results.table_row(table, 0) == -1 and logic.jumpToRow(table, 0) is None
    assert logic.jumpToRow(table, 3) == pytest.approx(target)
    assert logic.jumpToRow(table, 99) is None
    scene.RemoveNode(table)
    assert logic.jumpToRow(table, 1) is None  # the user deleted the table: nothing happens


def test_show_3d_makes_the_closed_surface_and_shows_it(labelled):
    scene, node, volume, segmentation, labels, tumors = labelled
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert not segmentation.GetSegmentation().ContainsRepresentation(surface)
    segmentation.GetDisplayNode().SetVisibility3D(False)
    assert TransferSegLogic.show3D(segmentation) and results.shows_in_3d(segmentation)
    assert segmentation.GetSegmentation().ContainsRepresentation(surface)
    for n in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        polydata = segmentation.GetSegmentation().GetNthSegment(n).GetRepresentation(surface)
        assert polydata.GetNumberOfPoints() > 0
        bounds = np.array(polydata.GetBounds())  # the surface lies where the voxels are, on the oblique grid
        corners = np.array([[i, j, k, 1.0] for i in (0, labels.shape[2] - 1) for j in (0, labels.shape[1] - 1)
                            for k in (0, labels.shape[0] - 1)]) @ ijk_to_ras(node).T
        assert np.all(bounds[0::2] >= corners[:, :3].min(axis=0) - 3) and np.all(bounds[1::2] <= corners[:, :3].max(
            axis=0) + 3)
    assert segmentation.GetDisplayNode().GetVisibility3D()
    assert not TransferSegLogic.show3D(segmentation, False) and not results.shows_in_3d(segmentation)
    assert not segmentation.GetDisplayNode().GetVisibility3D()
    scene.RemoveNode(segmentation)
    assert not TransferSegLogic.show3D(segmentation)  # deleted meanwhile: nothing happens


def test_running_twice_into_the_same_output_keeps_its_nodes_and_segments(scene, tiny_model):
    from TransferSegLib.phantoms import ct_phantom

    node, study = add_input(scene, ct_phantom(7, shape=(12, 40, 40))[0], "CT")
    logic = TransferSegLogic(scene)
    first = run_job(logic, node, tiny_model)
    output = first.outputs.segmentation
    nodes, segments = scene.GetNumberOfNodes(), output.GetSegmentation().GetNumberOfSegments()
    assert results.companions(output) == {"findings": first.outputs.findings}
    first_labels = logic.labelmapArray(output, node)
    output.SetName("my liver result")  # the user renames it; a run into it keeps the name
    second = run_job(logic, node, tiny_model, outputSegmentation=output)
    assert second.outputs.segmentation is output and output.GetName() == "my liver result"
    assert output.GetSegmentation().GetNumberOfSegments() == segments and scene.GetNumberOfNodes() == nodes
    assert [output.GetSegmentation().GetNthSegment(n).GetName() for n in range(segments)] == [
        s["name"] for s in SEGMENTS]
    assert first.outputs.findings.GetScene() is None  # the first run's table gave way to the second's
    assert results.companions(output) == {"findings": second.outputs.findings}
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    # the segments are the second run's, on the input's grid (the same seeded model: the same labels)
    np.testing.assert_array_equal(logic.labelmapArray(output, node), first_labels)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(output)) == study


def test_a_segmentation_the_user_made_is_written_into_and_its_own_segments_replaced(scene, tiny_model):
    from TransferSegLib.phantoms import ct_phantom

    volume = ct_phantom(7, shape=(12, 40, 40))[0]
    node, _ = add_input(scene, volume, "CT")
    logic = TransferSegLogic(scene)
    fresh = run_job(logic, node, tiny_model)  # into a new node, for the labels to compare with
    expected = logic.labelmapArray(fresh.outputs.segmentation, node)
    L.remove_nodes(scene, fresh.outputs.nodes())
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("", "a note of mine")
    count = scene.GetNumberOfNodes()
    job = run_job(logic, node, tiny_model, outputSegmentation=mine)
    assert job.outputs.segmentation is mine and mine.GetID() == job.outputs.segmentation.GetID()
    names = [mine.GetSegmentation().GetNthSegment(n).GetName()
             for n in range(mine.GetSegmentation().GetNumberOfSegments())]
    assert names == [s["name"] for s in SEGMENTS]  # replaced, not added to
    assert scene.GetNumberOfNodes() == count + 1  # the findings table; no second segmentation
    role = mine.GetReferenceImageGeometryReferenceRole()
    assert mine.GetNodeReference(role).GetID() == node.GetID()
    np.testing.assert_array_equal(logic.labelmapArray(mine, node), expected)
    L.segment_array(mine, "liver", volume)  # raises when off the input's grid


def test_an_import_that_fails_leaves_the_output_as_it_was(scene, tiny_model, tmp_path):
    """The output segmentation is written into only in the import's last step: a file that cannot be read
    before it leaves the user's segments and the scene as they were."""
    import json

    from TransferSegLib.io import save_volume
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.volume import TransferSegError
    from TransferSegModuleLib.jobs import ResultImport
    from test_slicer_logic import cli

    node, _ = add_input(scene, ct_phantom(7, shape=(12, 40, 40))[0], "CT")
    path = save_volume(L.volume_from_node(node), tmp_path / "ct.nrrd")
    cli("segment", path, tmp_path / "out", tiny_model)
    (tmp_path / "out" / "disagreement.nii.gz").write_bytes(b"not an image")  # read after the segmentation
    result = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    result["files"].append("disagreement.nii.gz")
    card = json.loads(Path(tiny_model).read_text(encoding="utf-8"))
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine.GetSegmentation().AddEmptySegment("", "a note of mine")
    count = scene.GetNumberOfNodes()
    importer = ResultImport(TransferSegLogic(scene), node, tmp_path / "out", result, card, target=mine)
    with pytest.raises(TransferSegError, match="disagreement.nii.gz"):
        while not importer.step():
            importer.wait()
    assert scene.GetNumberOfNodes() == count and mine.GetScene() is scene
    assert [mine.GetSegmentation().GetNthSegment(n).GetName()
            for n in range(mine.GetSegmentation().GetNumberOfSegments())] == ["a note of mine"]
