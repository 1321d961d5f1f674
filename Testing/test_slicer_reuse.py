"""Running again reuses the nodes of the run before, on slicer-core's real MRML scene and through the module's
real child process with the shipped DBT detector on small DBT phantoms (no mocks).

- A detection run into its point list (the output the panel picks after a run) replaces the points in place,
  keeps the node and the display the user set, and swaps the heatmap and the table linked to it; a cancelled
  rerun and an import that fails leave the earlier run's nodes as they were.
- A batch again on the same sequence replaces the output sequences of the batch before, once it is done; a
  cancelled one leaves them as they were.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slicer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib import results  # noqa: E402
from TransferSegModuleLib import widget_state as W  # noqa: E402
from TransferSegModuleLib.batch import INPUT_SEQUENCE_ROLE, OUTPUT_ATTRIBUTE, BatchJob, batch_inputs  # noqa: E402
from TransferSegModuleLib.jobs import ResultImport  # noqa: E402
from TransferSegModuleLib.logic import TransferSegLogic  # noqa: E402

from TransferSegLib.io import save_volume  # noqa: E402
from TransferSegLib.models import find_model  # noqa: E402

from test_slicer_batch import of_class, sequence_scene  # noqa: E402
from test_slicer_logic import DBT_MODEL, add_input, cli, run_job, scene  # noqa: E402  (scene: the shared fixture)

SHAPE = (16, 128, 96)  # as the other DBT tests: a run takes about 10 s, most of it the child's start


@pytest.fixture(scope="module")
def phantoms():
    """Two DBT phantoms on one grid, with lesions in different places: a rerun's points differ from the first's."""
    from TransferSegLib.phantoms import dbt_phantom

    first = dbt_phantom(3, shape=SHAPE, masses=2)[0]
    second = dbt_phantom(8, shape=SHAPE, masses=2)[0]
    return first, second


def points_of(markups) -> list:
    return [(markups.GetNthControlPointLabel(n), list(markups.GetNthControlPointPositionWorld(n)))
            for n in range(markups.GetNumberOfControlPoints())]


def counts(scene) -> dict:
    return {name: scene.GetNumberOfNodesByClass(name) for name in (
        "vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLTableNode", "vtkMRMLSequenceNode")}


# --- a detection run into its point list ----------------------------------------------------------------
def test_a_detection_rerun_into_its_point_list_replaces_it_in_place_and_a_cancelled_one_changes_nothing(
        scene, phantoms):
    node, study = add_input(scene, phantoms[0], "DBT")
    logic = TransferSegLogic(scene)
    first = run_job(logic, node, DBT_MODEL).outputs
    points, heatmap, table = first.detections, first.heatmap, first.findings
    assert points.GetNumberOfControlPoints() > 0, "the detector found nothing: nothing to replace"
    assert results.companions(points) == {"heatmap": heatmap, "findings": table}
    assert points.GetNodeReference(results.INPUT_ROLE) is node
    # the user's choices on the point list: its name, colour and glyph size, and a point of their own
    points.SetName("my detections")
    display = points.GetDisplayNode()
    display.SetSelectedColor(0.1, 0.9, 0.2)
    display.SetGlyphScale(5.5)
    points.SetLocked(False)
    points.AddControlPoint(0.0, 0.0, 0.0, "mine")
    before = counts(scene), scene.GetNumberOfNodes()
    slicer.util.updateVolumeFromArray(node, phantoms[1].array)  # new voxels, the same grid: other lesions

    second = run_job(logic, node, DBT_MODEL, outputDetections=points).outputs
    assert second.detections is points and points.GetName() == "my detections"
    assert points.GetDisplayNode() is display and display.GetGlyphScale() == 5.5
    assert display.GetSelectedColor() == pytest.approx((0.1, 0.9, 0.2))
    assert heatmap.GetScene() is None and table.GetScene() is None  # the first run's companions gave way
    assert second.heatmap is not heatmap and second.findings is not table
    assert results.companions(points) == {"heatmap": second.heatmap, "findings": second.findings}
    assert (counts(scene), scene.GetNumberOfNodes()) == before  # running again adds no node
    # the points are the second run's, as its table lists them (the user's point is gone)
    rows = second.findings.GetNumberOfRows()
    assert points.GetNumberOfControlPoints() == rows and "mine" not in [label for label, _ in points_of(points)]
    for n in range(rows):
        ras = [float(second.findings.GetCellText(n, second.findings.GetColumnIndex(axis))) for axis in "RAS"]
        assert points.GetNthControlPointPositionWorld(n) == pytest.approx(ras, abs=0.05)
    assert len(TransferSegLogic.confidences(points)) == rows and points.GetLocked()
    composites = of_class(scene, "vtkMRMLSliceCompositeNode")
    assert all(c.GetForegroundVolumeID() == second.heatmap.GetID() for c in composites)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in (points, second.heatmap, second.findings)} == {study}
    assert TransferSegLogic.setConfidenceThreshold(points, 1.01) == 0  # the live threshold reads the new points

    # a rerun cancelled while the model runs: the point list, its heatmap and table stay as they were
    kept, linked, nodes = points_of(points), results.companions(points), scene.GetNumberOfNodes()
    job = logic.startSegmentation(node, DBT_MODEL, device="cpu", python=sys.executable, outputDetections=points)
    deadline = time.monotonic() + 120
    while job.poll() == job.SEGMENTING and job.fraction == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == job.SEGMENTING, job.message
    job.cancel()
    assert job.wait(timeout=60) == job.CANCELLED
    assert points_of(points) == kept and results.companions(points) == linked
    assert scene.GetNumberOfNodes() == nodes and points.GetDisplayNode() is display

    # the panel: a DBT model offers the point list; another input volume lets go of it
    cards = {card["name"]: card for card in TransferSegLogic.installedModels()}
    state = W.PanelState()
    state.connected({}, node.GetID())
    assert state.parameter_changed("dbt", DBT_MODEL, {}, cards, node, None, points).output == "detections"
    other = L.add_volume_node(scene, phantoms[0], "other DBT")
    reaction = state.parameter_changed("dbt", DBT_MODEL, {}, cards, other, None, points)
    assert reaction.set == {"outputDetections": None}
    assert W.output_fits(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "placed by hand"), other)


def test_a_detection_import_that_fails_leaves_the_point_list_and_its_companions_as_they_were(
        scene, phantoms, tmp_path):
    """The point list is written into only in the import's last step: a detections file that cannot be read
    leaves the earlier run's points, heatmap and table, and the scene, as they were."""
    node, _ = add_input(scene, phantoms[0], "DBT")
    cli("detect", save_volume(L.volume_from_node(node), tmp_path / "dbt.nrrd"), tmp_path / "out", DBT_MODEL)
    result = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    card = json.loads(find_model(DBT_MODEL).read_text(encoding="utf-8"))
    logic = TransferSegLogic(scene)
    first = logic.importResult(node, tmp_path / "out", result, card)
    points, linked = first.detections, results.companions(first.detections)
    assert set(linked) == {"heatmap", "findings"}
    kept, nodes = points_of(points), scene.GetNumberOfNodes()
    shutil.copytree(tmp_path / "out", tmp_path / "broken")
    (tmp_path / "broken" / "detections.json").write_text("{not json", encoding="utf-8")  # read after the heatmap
    importer = ResultImport(logic, node, tmp_path / "broken", result, card, target=points)
    with pytest.raises(json.JSONDecodeError):
        while not importer.step():
            importer.wait()
    assert scene.GetNumberOfNodes() == nodes and points.GetScene() is scene
    assert points_of(points) == kept and results.companions(points) == linked
    # the same files once more, readable: written into the point list, its companions replaced
    again = ResultImport(logic, node, tmp_path / "out", result, card, target=points)
    while not again.step():
        again.wait()
    assert again.outputs.detections is points and points_of(points) == kept
    assert scene.GetNumberOfNodes() == nodes and all(n.GetScene() is None for n in linked.values())


# --- a batch again on the same sequence -------------------------------------------------------------------
def test_a_batch_again_on_a_sequence_replaces_its_output_sequences_once_done_and_a_cancelled_one_keeps_them(
        phantoms):
    scene, sequence, browser = sequence_scene(phantoms[:1])  # one DBT item, and one without voxels (fails at once)
    logic = TransferSegLogic(scene)

    def batch():
        return BatchJob(logic, batch_inputs(logic, "sequence", [], browser), DBT_MODEL, device="cpu",
                        python=sys.executable)

    def outputs() -> dict:
        return {n.GetAttribute(OUTPUT_ATTRIBUTE): n for n in of_class(scene, "vtkMRMLSequenceNode")
                if n.GetAttribute(OUTPUT_ATTRIBUTE)}

    def stored_points(output) -> list:
        item = output.GetNthDataNode(0)
        return [list(item.GetNthControlPointPositionWorld(n)) for n in range(item.GetNumberOfControlPoints())]

    first = batch()
    assert first.wait(timeout=300) == first.DONE, first.message + "\n" + "\n".join(first.log[-20:])
    earlier = outputs()
    assert set(earlier) == {"heatmap", "detections", "findings"}
    assert all(s.GetNodeReference(INPUT_SEQUENCE_ROLE) is sequence for s in earlier.values())
    stored = stored_points(earlier["detections"])
    assert stored, "the detector found nothing: the comparisons below would be empty"
    proxies = [browser.GetProxyNode(s) for s in earlier.values()]
    before = counts(scene), scene.GetNumberOfNodes()

    # done: one output sequence per role again, the new batch's, in the browser; the earlier ones are gone
    second = batch()
    assert second.wait(timeout=300) == second.DONE, second.message + "\n" + "\n".join(second.log[-20:])
    replaced = outputs()
    assert set(replaced) == set(earlier) and not set(replaced.values()) & set(earlier.values())
    assert all(node.GetScene() is None for node in list(earlier.values()) + proxies)
    assert (counts(scene), scene.GetNumberOfNodes()) == before
    for role, output in replaced.items():
        assert browser.IsSynchronizedSequenceNodeID(output.GetID(), False), role
        assert [output.GetNthIndexValue(n) for n in range(output.GetNumberOfDataNodes())] == ["0"]
    assert second.outputs.detections is browser.GetProxyNode(replaced["detections"])
    np.testing.assert_allclose(stored_points(replaced["detections"]), stored, atol=1e-6)  # the same item and model
    composites = of_class(scene, "vtkMRMLSliceCompositeNode")
    heatmap = second.outputs.heatmap
    assert all(c.GetForegroundVolumeID() == heatmap.GetID() for c in composites)

    # the sequence grows an item; a batch cancelled once it has stored the first one keeps the output sequences
    # as they were and leaves none of its own
    frame = L.add_volume_node(scene, phantoms[1], "frame")
    sequence.SetDataNodeAtValue(frame, "1.25")
    scene.RemoveNode(frame)
    proxies = {role: browser.GetProxyNode(s) for role, s in replaced.items()}
    before = counts(scene), scene.GetNumberOfNodes()
    cancelled = batch()
    deadline = time.monotonic() + 300
    while cancelled.poll() == cancelled.SEGMENTING and not cancelled.segmented and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled.state == cancelled.SEGMENTING and cancelled.segmented, cancelled.message
    assert len(outputs()) == 3 and len(of_class(scene, "vtkMRMLSequenceNode")) == 7  # its own, while it runs
    cancelled.cancel()
    assert cancelled.wait(timeout=60) == cancelled.CANCELLED
    assert outputs() == replaced and (counts(scene), scene.GetNumberOfNodes()) == before
    assert {role: browser.GetProxyNode(s) for role, s in replaced.items()} == proxies
    assert all(browser.IsSynchronizedSequenceNodeID(s.GetID(), False) for s in replaced.values())
    assert replaced["detections"].GetNumberOfDataNodes() == 1  # no item of the cancelled batch
    np.testing.assert_allclose(stored_points(replaced["detections"]), stored, atol=1e-6)
    assert all(c.GetForegroundVolumeID() == heatmap.GetID() for c in composites)  # the views show them again
    scene.Clear(1)
