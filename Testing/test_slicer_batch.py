"""Batch runs (TransferSegModuleLib/batch.py): several volumes, or every item of a sequence, segmented in one
run with one progress fraction, on slicer-core's real MRML scene and through the module's real child process
(the shipped default CT model on small CT phantoms), no mocks.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slicer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib import widget_state as W  # noqa: E402
from TransferSegModuleLib.batch import (OUTPUT_ATTRIBUTE, BatchJob, batch_inputs, volume_inputs,  # noqa: E402
                                        volume_sequence)
from TransferSegModuleLib.logic import TransferSegLogic  # noqa: E402

from TransferSegLib.volume import TransferSegError, Volume  # noqa: E402

from test_slicer_logic import (_LOGICS, CT_MODEL, add_input, assert_on_grid, new_scene, oblique,  # noqa: E402
                               scene)  # the shared fixture


@pytest.fixture(scope="module")
def volumes():
    """Two small CT phantoms on different oblique grids (a follow-up scan is never on the first one's grid)."""
    from TransferSegLib.phantoms import ct_phantom

    first = oblique(ct_phantom(5, shape=(24, 80, 80))[0], spacing=(4.0, 4.4, 3.8))
    second = ct_phantom(6, shape=(24, 80, 80))[0]
    second = Volume(second.array, spacing=(4.0, 4.3, 3.9), directions=first.directions,
                    origin=tuple(np.asarray(first.origin) + [6.0, -4.0, 12.0]))
    return first, second


def start(logic, inputs) -> BatchJob:
    return BatchJob(logic, inputs, CT_MODEL, device="cpu", python=sys.executable)


def names(scene) -> list:
    return [scene.GetNthNode(n).GetName() or "" for n in range(scene.GetNumberOfNodes())]


def ids(scene) -> set:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def of_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(n, class_name) for n in range(scene.GetNumberOfNodesByClass(class_name))]


# --- a list of volumes ------------------------------------------------------------------------------------
def test_a_list_of_two_volumes_gives_two_segmentations_behind_one_rising_fraction(scene, volumes):
    first, firstStudy = add_input(scene, volumes[0], "CT 1")
    second, secondStudy = add_input(scene, volumes[1], "CT 2")
    batch = start(TransferSegLogic(scene), volume_inputs([first, second, first]))  # a node listed twice runs once
    assert len(batch.inputs) == 2 and batch.status.startswith("Volume 1/2: ")
    seen = []  # (fraction, status) at every poll
    deadline = time.monotonic() + 600
    while batch.poll() == batch.SEGMENTING and time.monotonic() < deadline:
        seen.append((batch.fraction, batch.status))
        time.sleep(0.05)
    assert batch.state == batch.DONE, batch.message + "\n" + "\n".join(batch.log[-20:])
    fractions = [f for f, _ in seen] + [batch.fraction]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the first volume fills the first half of the bar, the second the rest
    assert all(f <= 0.5 for f, status in seen if status.startswith("Volume 1/2: "))
    assert all(0.5 <= f <= 1.0 for f, status in seen if status.startswith("Volume 2/2: "))
    assert any(0.0 < f < 0.5 for f in fractions) and any(0.5 < f < 1.0 for f in fractions)
    statuses = {status for _, status in seen}  # "Volume k/2: " and the run's own stage
    assert {"Volume 1/2: Initializing", "Volume 2/2: Initializing"} <= statuses, statuses
    assert batch.status.startswith("Done — 2 volumes in ") and not batch.failures
    assert batch.segmented == ["CT 1", "CT 2"]
    # each volume's own segmentation and findings, on its own grid, under its own study
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node, volume, study in ((first, volumes[0], firstStudy), (second, volumes[1], secondStudy)):
        (seg,) = [n for n in of_class(scene, "vtkMRMLSegmentationNode")
                  if n.GetName() == f"{node.GetName()} TransferSeg"]
        assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is node
        assert_on_grid(seg, volume)
        assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
        assert f"{node.GetName()} TransferSeg findings" in names(scene)
    assert batch.outputs.segmentation.GetName() == "CT 2 TransferSeg"  # the panel shows the last one
    with pytest.raises(TransferSegError):
        L.segment_array(batch.outputs.segmentation, "liver", volumes[0])  # not on the first volume's grid
    # the log names each volume before its run's lines, and ends with the batch's status
    assert batch.log[0] == "Volume 1/2: CT 1" and "Volume 2/2: CT 2" in batch.log
    assert batch.log[-1] == batch.status


def test_cancel_during_the_second_volume_keeps_the_first_and_leaves_nothing_of_the_second(scene, volumes):
    first, _ = add_input(scene, volumes[0], "CT 1")
    second, _ = add_input(scene, volumes[1], "CT 2")
    batch = start(TransferSegLogic(scene), volume_inputs([first, second]))
    after_first = None
    deadline = time.monotonic() + 600
    while batch.poll() == batch.SEGMENTING and time.monotonic() < deadline:
        if batch.current == 1 and after_first is None:
            after_first = ids(scene)  # the first volume's results are in; the second's run has started
        if batch.current == 1 and batch.job.fraction > 0:
            break  # the child is running the model on the second volume
        time.sleep(0.05)
    assert batch.state == batch.SEGMENTING and batch.current == 1, batch.message
    job = batch.job
    folder, pid = job._folder, job._process.pid
    started = time.perf_counter()
    batch.cancel()
    assert time.perf_counter() - started < 0.5  # Cancel does not block the GUI
    assert batch.status == "Cancelling"
    assert batch.wait(timeout=60) == batch.CANCELLED
    assert batch.status == batch.message == "Cancelled after 1 of 2 volumes"
    assert job.state == job.CANCELLED and not folder.exists()
    import psutil  # the test's own check that the child is gone

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert ids(scene) == after_first  # nothing of the second run, nothing removed of the first
    assert "CT 1 TransferSeg" in names(scene) and "CT 1 TransferSeg findings" in names(scene)
    assert not [name for name in names(scene) if name.startswith("CT 2 ")]
    assert batch.poll() == batch.CANCELLED and batch.segmented == ["CT 1"]


def test_a_failing_volume_is_named_at_the_end_and_does_not_stop_the_others(scene, volumes):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # refused at the start: no voxels
    nan = volumes[0].array.astype(np.float32)
    nan[3, 10, 10] = np.nan  # refused while its voxels are handed to the child
    broken, _ = add_input(scene, Volume(nan, spacing=volumes[0].spacing, directions=volumes[0].directions,
                                        origin=volumes[0].origin), "NaN CT")
    good, _ = add_input(scene, volumes[1], "CT")
    batch = start(TransferSegLogic(scene), volume_inputs([empty, broken, good]))
    assert batch.wait(timeout=600) == batch.DONE, batch.message
    assert [name for name, _ in batch.failures] == ["empty", "NaN CT"]
    assert "holds no voxels" in batch.failures[0][1] or "image data" in batch.failures[0][1]
    assert "NaN" in batch.failures[1][1] or "finite" in batch.failures[1][1], batch.failures[1][1]
    assert batch.status.startswith("Done — 1 of 3 volumes in ") and batch.fraction == 1.0
    assert "failed: empty (" in batch.status and "; NaN CT (" in batch.status
    assert batch.segmented == ["CT"] and batch.outputs.segmentation.GetName() == "CT TransferSeg"
    assert not [name for name in names(scene) if name.startswith(("empty ", "NaN CT "))]
    assert "Volume 2/3 (NaN CT) failed: " in "\n".join(batch.log)
    # what the panel hears: done, with the failures to name
    run = W.PanelRun()
    nothing = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")
    run.start(BatchJob(TransferSegLogic(scene), volume_inputs([nothing]), CT_MODEL, device="cpu",
                       python=sys.executable))
    _, finished = run.poll()
    assert finished.state == "Failed" and finished.batch and [n for n, _ in finished.failures] == ["nothing"]
    assert finished.status.startswith("Failed: no volume was segmented: nothing (")


def test_a_batch_refuses_an_unknown_model_and_an_empty_list_before_anything_starts(scene, volumes):
    node, _ = add_input(scene, volumes[0], "CT")
    count = scene.GetNumberOfNodes()
    logic = TransferSegLogic(scene)
    with pytest.raises(TransferSegError, match="no model named 'no-such-model'"):
        BatchJob(logic, volume_inputs([node]), "no-such-model", device="cpu", python=sys.executable)
    with pytest.raises(TransferSegError, match="check the volumes"):
        batch_inputs(logic, "volumes", [], None)
    with pytest.raises(TransferSegError, match="select a sequence"):
        batch_inputs(logic, "sequence", [], None)
    assert scene.GetNumberOfNodes() == count


# --- a sequence -------------------------------------------------------------------------------------------
def sequence_scene(volumes):
    """A scene as the desktop has it with a CT sequence loaded: Slicer's Sequences logic (it makes and updates
    the browser's proxy nodes), a sequence of the volumes (on different grids) and one item without voxels,
    and its browser."""
    scene = new_scene()
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    _LOGICS.append(sequences)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "CT-Sequence")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    sequence.SetIndexType(sequence.NumericIndex)
    for n, volume in enumerate(volumes):
        frame = L.add_volume_node(scene, volume, f"frame {n}")
        sequence.SetDataNodeAtValue(frame, f"{2.5 * n:g}")  # the sequence keeps a copy
        scene.RemoveNode(frame)
    sequence.SetDataNodeAtValue(slicer.vtkMRMLScalarVolumeNode(), f"{2.5 * len(volumes):g}")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "CT browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    return scene, sequence, browser


def test_every_item_of_a_sequence_is_segmented_into_an_output_sequence_in_the_same_browser(volumes):
    scene, sequence, browser = sequence_scene(volumes)
    volume_proxy = browser.GetProxyNode(sequence)
    assert volume_proxy is not None and volume_sequence(browser) is sequence
    assert W.run_plan("sequence", None, [], browser) == W.RunPlan(
        3, "Segment 3 sequence items", "Run the model on every item of the sequence, one after the other", True)
    logic = TransferSegLogic(scene)
    batch = start(logic, batch_inputs(logic, "sequence", [], browser))
    assert [item.name for item in batch.inputs] == [
        "CT-Sequence [time = 0 s]", "CT-Sequence [time = 2.5 s]", "CT-Sequence [time = 5 s]"]
    copies = set()  # the volume nodes each run reads: hidden copies of the items, never shown in node lists
    deadline = time.monotonic() + 600
    while batch.poll() == batch.SEGMENTING and time.monotonic() < deadline:
        copies |= {n for n in of_class(scene, "vtkMRMLScalarVolumeNode") if n is not volume_proxy}
        time.sleep(0.05)
    assert batch.state == batch.DONE, batch.message + "\n" + "\n".join(batch.log[-20:])
    assert len(copies) == 2 and all(n.GetHideFromEditors() for n in copies)
    assert batch.status.startswith("Done — 2 of 3 volumes in ")
    assert [name for name, _ in batch.failures] == ["CT-Sequence [time = 5 s]"]  # the item without voxels
    outputs = {n.GetAttribute(OUTPUT_ATTRIBUTE): n for n in of_class(scene, "vtkMRMLSequenceNode")
               if n.GetAttribute(OUTPUT_ATTRIBUTE)}
    assert set(outputs) == {"segmentation", "findings"}
    segmentations = outputs["segmentation"]
    assert segmentations.GetName() == "CT-Sequence TransferSeg"
    assert outputs["findings"].GetName() == "CT-Sequence TransferSeg findings"
    for output in outputs.values():  # each item at the index value of the volume it came from, in the browser
        assert [output.GetNthIndexValue(n) for n in range(output.GetNumberOfDataNodes())] == ["0", "2.5"]
        assert (output.GetIndexName(), output.GetIndexUnit()) == ("time", "s")
        assert browser.IsSynchronizedSequenceNodeID(output.GetID(), False)
    # each item's segmentation lies on its own volume's grid (the two grids differ), with the card's segments
    for n, volume in enumerate(volumes):
        item = segmentations.GetNthDataNode(n)
        assert_on_grid(item, volume)
        with pytest.raises(TransferSegError):
            L.segment_array(item, "liver", volumes[1 - n])
        assert [item.GetSegmentation().GetNthSegment(k).GetName() for k in range(2)] == ["liver", "liver tumor"]
        assert L.segment_array(item, "liver", volume).any()  # the model found liver: the comparison can fail
        assert outputs["findings"].GetNthDataNode(n).GetNumberOfRows() >= 1
    # scrubbing shows each item's segmentation in the proxy, which the panel shows
    proxy = browser.GetProxyNode(segmentations)
    assert batch.outputs.segmentation is proxy and batch.outputs.findings is browser.GetProxyNode(outputs["findings"])
    assert proxy.GetNodeReference(proxy.GetReferenceImageGeometryReferenceRole()) is volume_proxy
    for n in (1, 0):
        browser.SetSelectedItemNumber(n)
        item = segmentations.GetNthDataNode(n)
        np.testing.assert_array_equal(L.segment_array(proxy, "liver", volumes[n]),
                                      L.segment_array(item, "liver", volumes[n]))
    browser.SetSelectedItemNumber(2)  # the item that failed: an empty segmentation, not another item's
    assert proxy.GetSegmentation().GetNumberOfSegments() == 0
    browser.SetSelectedItemNumber(0)
    assert proxy.GetSegmentation().GetNumberOfSegments() == 2
    # the hidden copies the runs read are gone; the slice views show the browser's volume
    assert [n.GetID() for n in of_class(scene, "vtkMRMLScalarVolumeNode")] == [volume_proxy.GetID()]
    assert of_class(scene, "vtkMRMLSegmentationNode") == [proxy]  # the items' nodes live in the sequences only
    assert of_class(scene, "vtkMRMLTableNode") == [batch.outputs.findings]
    for composite in of_class(scene, "vtkMRMLSliceCompositeNode"):
        assert composite.GetBackgroundVolumeID() == volume_proxy.GetID()
    # a second batch reads the volume sequence again, never an output one
    assert volume_sequence(browser) is sequence
    scene.Clear(1)


# --- the panel's decisions ----------------------------------------------------------------------------------
def test_the_segment_button_says_what_a_click_runs(scene, volumes):
    first, _ = add_input(scene, volumes[0], "CT 1")
    second, _ = add_input(scene, volumes[1], "CT 2")
    assert W.run_plan("off", first, [second], None) == W.RunPlan(1, "Segment", "Run the model on the selected volume",
                                                                 False)
    assert W.run_plan("off", None, [first], None).count == 0
    plan = W.run_plan("volumes", first, [first, second, first], None)
    assert (plan.count, plan.button, plan.batch) == (2, "Segment 2 volumes", True)
    assert W.run_plan("volumes", first, [second], None).button == "Segment 1 volume"
    plan = W.run_plan("volumes", first, [], None)
    assert plan.count == 0 and "Check the volumes" in plan.hint
    plan = W.run_plan("sequence", first, [], None)
    assert plan.count == 0 and "Select a sequence" in plan.hint
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "no volumes")  # no sequence of volumes
    assert W.run_plan("sequence", first, [], browser).count == 0
    buttons = W.buttons(bool(W.run_plan("volumes", first, [], None).count), True, False, False)
    assert not buttons.segment and not buttons.ready
