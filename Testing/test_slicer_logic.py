"""The module's scene logic on slicer-core's real MRML scene (no mocks)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "TransferSeg"))
import TransferSegLogic as logic  # noqa: E402

from TransferSegLib.volume import TransferSegError, Volume  # noqa: E402

from conftest import LIVER_TUMOR_SEGMENTS as SEGMENTS  # noqa: E402


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


@pytest.fixture
def oblique_volume():
    angle = np.deg2rad(17.0)
    directions = np.array([[-np.cos(angle), 0.0, np.sin(angle)], [0.0, -1.0, 0.0], [np.sin(angle), 0.0, np.cos(angle)]])
    array = np.random.default_rng(3).normal(50, 20, size=(5, 7, 9)).astype(np.float32)
    return Volume(array, spacing=(2.5, 0.8, 0.7), directions=directions, origin=(12.0, -7.5, 30.25))


def test_volume_node_round_trip_is_exact(scene, oblique_volume):
    node = logic.add_volume_node(scene, oblique_volume, "CT")
    back = logic.volume_from_node(node)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert back.spacing == oblique_volume.spacing
    np.testing.assert_array_equal(back.origin, oblique_volume.origin)
    np.testing.assert_allclose(back.directions, oblique_volume.directions, atol=1e-15)
    matrix = slicer.vtkMRMLScalarVolumeNode()  # Slicer's own IJK→RAS agrees with ours
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)],
                               oblique_volume.ijk_to_ras, atol=1e-12)
    del matrix


def test_segmentation_node_has_named_coloured_segments_on_the_volume_grid(scene, oblique_volume):
    labels = np.zeros(oblique_volume.shape, np.uint8)
    labels[1:4, 2:6, 2:8] = 1
    labels[2, 3:5, 4:6] = 2
    ref_node = logic.add_volume_node(scene, oblique_volume, "CT")
    seg_node = logic.add_segmentation_node(scene, labels, oblique_volume, SEGMENTS, "result", reference_node=ref_node)
    segmentation = seg_node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["liver", "liver tumor"]
    assert segmentation.GetNthSegment(0).GetColor() == pytest.approx(SEGMENTS[0]["color"])
    import vtk
    tag = vtk.mutable("")
    segmentation.GetNthSegment(0).GetTag("TerminologyEntry", tag)
    assert "SCT^10200004^Liver" in str(tag)
    for seg in SEGMENTS:
        np.testing.assert_array_equal(logic.segment_array(seg_node, seg["name"], oblique_volume),
                                      labels == seg["label"])
    # the temporary label-map node is gone: only the CT and the segmentation remain
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_empty_segment_is_kept_and_failure_leaves_no_node(scene, oblique_volume, monkeypatch):
    labels = np.zeros(oblique_volume.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    seg_node = logic.add_segmentation_node(scene, labels, oblique_volume, SEGMENTS, "no tumor")
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 2
    assert not logic.segment_array(seg_node, "liver tumor", oblique_volume).any()
    count = scene.GetNumberOfNodes()
    bad_segments = [dict(SEGMENTS[0]), {"name": "broken", "label": 2}]  # no colour: refused before building
    with pytest.raises(KeyError):
        logic.add_segmentation_node(scene, labels, oblique_volume, bad_segments, "broken")
    assert scene.GetNumberOfNodes() == count

    class CancelledImport:  # fault injection: the import fails after nodes were created
        @staticmethod
        def ImportLabelmapToSegmentationNode(*args):
            raise RuntimeError("cancelled")

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", CancelledImport)
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.add_segmentation_node(scene, labels, oblique_volume, SEGMENTS, "cancelled")
    assert scene.GetNumberOfNodes() == count


def test_bad_nodes_get_clear_errors(scene):
    with pytest.raises(TransferSegError, match="select an input volume"):
        logic.volume_from_node(None)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(TransferSegError, match="select an input volume"):
        logic.volume_from_node(node)


# --- the child-process job behind the Segment button -----------------------------------
def test_segment_job_imports_a_named_segmentation_on_the_input_grid(scene, oblique_volume, tiny_model):
    node = logic.add_volume_node(scene, oblique_volume, "CT")
    job = logic.SegmentJob(scene, node, str(tiny_model), device="cpu", python=sys.executable)
    job.start()
    assert job.state == job.SEGMENTING
    assert job.wait(timeout=300) == job.DONE, job.message
    assert job.fraction == 1.0 and job.result["model"]["name"] == "tiny-unet3d"
    segmentation = job.segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "liver tumor"]
    masks = [logic.segment_array(job.segmentation_node, name, oblique_volume) for name in names]
    assert not (masks[0] & masks[1]).any()  # one label per voxel, on the CT's own grid
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationStorageNode") == 0  # no link to a deleted temp file


def test_segment_job_cancel_and_failure_leave_nothing_behind(scene, oblique_volume, tiny_model):
    node = logic.add_volume_node(scene, oblique_volume, "CT")
    count = scene.GetNumberOfNodes()
    job = logic.SegmentJob(scene, node, str(tiny_model), device="cpu", python=sys.executable)
    job.start()
    folder = job._folder
    job.cancel()
    assert job.state == job.CANCELLED and not folder.exists()
    assert scene.GetNumberOfNodes() == count

    job = logic.SegmentJob(scene, node, "no-such-model", device="cpu", python=sys.executable)
    job.start()
    assert job.wait(timeout=300) == job.FAILED
    assert "no model named 'no-such-model'" in job.message
    assert scene.GetNumberOfNodes() == count


def test_progress_lines_are_parsed():
    assert logic.parse_progress_line("PROGRESS 0.4200 inference") == (0.42, "inference")
    assert logic.parse_progress_line("PROGRESS 1.5 done") == (1.0, "done")
    assert logic.parse_progress_line("liver: 12 mL") is None
    assert logic.parse_progress_line("PROGRESS x y") is None
