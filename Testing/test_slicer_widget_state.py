"""The panel's decisions (TransferSegModuleLib/widget_state.py), which the Qt widget only applies: what a
parameter change does, what the buttons enable, what closing the scene or Slicer does to a run, the
model list (rescan, a user models folder) and the device list (Apple's GPU, asked of torch in a child).

Everything runs on slicer-core's real MRML scene and the module's real child-process runs, no mocks.
"""
from __future__ import annotations

import json
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import widget_state as W  # noqa: E402
from TransferSegModuleLib.devices import GpuQuery, query_mps  # noqa: E402
from TransferSegModuleLib.jobs import TransferSegOutputs  # noqa: E402
from TransferSegModuleLib.logic import DISPLAY_PARAMETERS, TransferSegLogic  # noqa: E402
from TransferSegModuleLib.results import shows_in_3d  # noqa: E402

from test_slicer_logic import CT_MODEL, DBT_MODEL, add_input, scene  # noqa: E402  (scene: the shared fixture)

MULTIVIEW_MODEL = "ct-liver-tumor-vfn"


@pytest.fixture(scope="module")
def cards():
    return {card["name"]: card for card in TransferSegLogic.installedModels()}


def display(**changed) -> dict:
    values = {"showAxial": "true", "showCoronal": "true", "showSagittal": "true", "showOverlay": "true",
              "overlayOpacity": "0.5", "confidenceThreshold": "0.25"}
    return {**values, **changed}


def connected_state(cards: dict, task="ct", model=CT_MODEL, input_node=None) -> W.PanelState:
    """A panel as just connected to a parameter node holding ``task`` and ``model``."""
    state = W.PanelState()
    state.connected(display(), input_node.GetID() if input_node is not None else None)
    reaction = state.parameter_changed(task, model, display(), cards, input_node)
    assert reaction.set == {} and not reaction.again
    return state


# --- what a parameter change does ------------------------------------------------------------------
def test_a_new_task_picks_its_default_model_and_a_new_model_sets_its_task(cards):
    assert {CT_MODEL, DBT_MODEL} <= set(cards)
    state = connected_state(cards=cards)
    reaction = state.parameter_changed("dbt", CT_MODEL, display(), cards)  # the user picks the DBT task
    assert reaction.set == {"model": DBT_MODEL} and reaction.again  # the widget sets it; the change fires again
    again = state.parameter_changed("dbt", DBT_MODEL, display(), cards)
    assert again.set == {} and not again.again and not again.multiview
    reaction = state.parameter_changed("dbt", CT_MODEL, display(), cards)  # the user picks a CT model
    assert reaction.set == {"task": "ct"} and reaction.again
    assert state.parameter_changed("ct", CT_MODEL, display(), cards).set == {}


def test_a_multiview_model_shows_the_fusion_choice_and_selects_its_cards_fusion(cards):
    card = cards[MULTIVIEW_MODEL]
    assert W.is_multiview(card) and not W.is_multiview(cards[CT_MODEL])
    state = connected_state(cards=cards)
    reaction = state.parameter_changed("ct", MULTIVIEW_MODEL, display(), cards)
    assert reaction.set == {"fusion": card["method"]["config"]["fusion"]} and not reaction.again
    assert reaction.multiview
    # the fusion the user then picks stays: the model did not change
    assert state.parameter_changed("ct", MULTIVIEW_MODEL, display(), cards).set == {}


def test_only_a_changed_display_parameter_touches_the_slice_views(cards):
    state = connected_state(cards=cards)
    # device, fusion, ROI …: not in the display values, so nothing to apply
    assert state.parameter_changed("ct", CT_MODEL, display(), cards).display_changed == frozenset()
    reaction = state.parameter_changed("ct", CT_MODEL, display(overlayOpacity="0.8"), cards)
    assert reaction.display_changed == {"overlayOpacity"}
    assert state.parameter_changed("ct", CT_MODEL, display(overlayOpacity="0.8"), cards).display_changed == set()
    assert set(display()) == set(DISPLAY_PARAMETERS)


def test_a_new_input_lets_go_of_an_output_made_for_another_volume(scene, cards):
    from TransferSegLib.phantoms import ct_phantom

    volume = ct_phantom(5, shape=(8, 32, 32))[0]
    first, _ = add_input(scene, volume, "first")
    second, _ = add_input(scene, volume, "second")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "first TransferSeg")
    output.SetReferenceImageGeometryParameterFromVolumeNode(first)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made by the user")  # no reference volume yet
    state = connected_state(cards=cards, input_node=first)
    assert state.parameter_changed("ct", CT_MODEL, display(), cards, first, output).set == {}
    reaction = state.parameter_changed("ct", CT_MODEL, display(), cards, second, output)
    assert reaction.set == {"outputSegmentation": None}  # the next run makes a new one for the second volume
    # the user then picks an output on purpose: it stays (the input did not change again)
    assert state.parameter_changed("ct", CT_MODEL, display(), cards, second, output).set == {}
    assert W.output_fits(empty, second) and W.output_fits(output, first) and not W.output_fits(output, second)
    assert state.parameter_changed("ct", CT_MODEL, display(), cards, first, empty).set == {}


def test_the_buttons_follow_input_model_run_and_output():
    idle = W.buttons(has_input=True, model_installed=True, busy=False, has_segmentation=True)
    assert (idle.segment, idle.cancel, idle.export, idle.show3d, idle.ready) == (True, False, True, True, True)
    running = W.buttons(has_input=True, model_installed=True, busy=True, has_segmentation=True)
    assert (running.segment, running.cancel, running.export, running.show3d) == (False, True, False, False)
    assert not W.buttons(False, True, False, False).segment and not W.buttons(True, False, False, False).ready
    nothing = W.buttons(True, True, False, has_segmentation=False)
    assert not nothing.export and not nothing.show3d


def test_the_display_controls_follow_what_the_results_hold(scene):
    none = W.display_controls(None)
    assert not any(none.views.values()) and not none.overlay and not none.threshold and not none.findings
    heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heatmap")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "detections")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "findings")
    dbt = W.display_controls(TransferSegOutputs(heatmap=heatmap, detections=points, findings=table))
    assert dbt.overlay and dbt.heatmap and dbt.threshold and dbt.findings and not any(dbt.views.values())
    axial = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "axial")
    disagreement = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "disagreement")
    mv = W.display_controls(TransferSegOutputs(views={"axial": axial}, disagreement=disagreement))
    assert mv.views == {"axial": True, "coronal": False, "sagittal": False} and mv.overlay and not mv.heatmap
    scene.RemoveNode(table)  # the user deleted the table: no rows to click
    assert not W.display_controls(TransferSegOutputs(findings=table)).findings
    assert W.detections_text(2, 5, 0.5) == "2 of 5 detections at confidence ≥ 0.50"
    assert W.repair_message("model", "x", CT_MODEL) == (
        f"The scene's model 'x' is not available here; using '{CT_MODEL}'.")


# --- the run: done, closing the scene, closing Slicer ------------------------------------------------
def test_a_finished_run_hands_back_its_results_and_shows_them_in_3d_when_asked(scene, tiny_model):
    from TransferSegLib.phantoms import ct_phantom

    node, _ = add_input(scene, ct_phantom(7, shape=(12, 40, 40))[0], "CT")
    run = W.PanelRun()
    run.start(TransferSegLogic(scene).startSegmentation(node, str(tiny_model), device="cpu", python=sys.executable))
    assert run.busy
    lines, finished = [], None
    deadline = time.monotonic() + 120
    while finished is None and time.monotonic() < deadline:
        new, finished = run.poll(show3d_when_done=True)
        lines += new
        time.sleep(0.05)
    assert finished is not None and finished.state == "Done", finished and finished.message
    assert not run.busy and run.outputs is finished.outputs and finished.outputs.findings is not None
    assert finished.status.startswith("Done — ") and " mL" in finished.status
    segmentation = finished.outputs.segmentation
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2 and shows_in_3d(segmentation)
    assert run.poll() == ([], None)  # nothing runs any more


def test_closing_the_scene_cancels_the_run_and_closing_slicer_removes_its_files_at_once(scene, tiny_model,
                                                                                       tmp_path):
    from TransferSegLib.phantoms import ct_phantom

    node, _ = add_input(scene, ct_phantom(7, shape=(12, 40, 40))[0], "CT")
    count = scene.GetNumberOfNodes()
    logic = TransferSegLogic(scene, temporaryFolder=str(tmp_path / "Slicer temp"))
    run = W.PanelRun()
    run.start(logic.startSegmentation(node, str(tiny_model), device="cpu", python=sys.executable))
    run.scene_closing()  # returns at once; the next polls see the job end
    assert run.outputs is None
    finished, deadline = None, time.monotonic() + 60
    while finished is None and time.monotonic() < deadline:
        finished = run.poll()[1]
        time.sleep(0.05)
    assert finished.state == "Cancelled" and finished.outputs is None and scene.GetNumberOfNodes() == count

    run.start(logic.startSegmentation(node, str(tiny_model), device="cpu", python=sys.executable))
    folder = run.job._folder
    assert folder.is_dir()
    run.app_closing()  # Slicer closes: no poll will follow
    assert not folder.exists() and not run.busy and list((tmp_path / "Slicer temp").iterdir()) == []
    assert scene.GetNumberOfNodes() == count


# --- models: rescan and a user models folder ---------------------------------------------------------
def test_rescan_reads_a_user_models_folder_first_and_skips_what_is_not_a_model(tmp_path, tiny_model):
    shipped = [card["name"] for card in TransferSegLogic.installedModels()]
    assert W.model_choices(TransferSegLogic.installedModels()) == (shipped, CT_MODEL)
    assert W.model_choices([]) == ([CT_MODEL], CT_MODEL)  # never an empty combo
    folder = tmp_path / "my models"
    folder.mkdir()
    (folder / "training-config.json").write_text(json.dumps({"epochs": 3}), encoding="utf-8")  # not a card
    (folder / "broken.json").write_text("{", encoding="utf-8")
    assert [c["name"] for c in TransferSegLogic.installedModels(folder)] == shipped
    # the user saves a model they trained into the folder; Rescan lists it, first, started from its path
    card = json.loads(Path(tiny_model).read_text(encoding="utf-8"))
    shutil.copy(Path(tiny_model).with_suffix(".safetensors"), folder / "my-liver.safetensors")
    (folder / "my-liver.json").write_text(json.dumps({**card, "name": "my-liver"}), encoding="utf-8")
    cards = TransferSegLogic.installedModels(folder)
    assert [c["name"] for c in cards] == ["my-liver"] + shipped
    assert Path(cards[0]["_path"]) == folder / "my-liver.json"
    names, default = W.model_choices(cards)
    assert names[0] == "my-liver" and default == CT_MODEL
    # a user model named like a shipped one shadows it
    (folder / "shadow.json").write_text(json.dumps({**card, "name": CT_MODEL}), encoding="utf-8")
    cards = TransferSegLogic.installedModels(folder)
    assert [c["name"] for c in cards].count(CT_MODEL) == 1
    assert Path(next(c for c in cards if c["name"] == CT_MODEL)["_path"]) == folder / "shadow.json"
    assert TransferSegLogic.installedModels(tmp_path / "no such folder") == TransferSegLogic.installedModels()


# --- devices: Apple's GPU, asked of torch in a child process ----------------------------------------
def test_the_device_list_offers_mps_only_where_torch_reports_it(tmp_path):
    import torch  # the test process may import torch; the module never does

    assert W.device_choices(False) == ["auto", "cpu", "cuda"]
    assert W.device_choices(True) == ["auto", "cpu", "cuda", "mps"]
    start = time.perf_counter()
    assert query_mps(sys.executable, system="Linux", machine="x86_64") is False  # not asked: no child starts
    assert query_mps(sys.executable, system="Darwin", machine="x86_64") is False  # an Intel Mac has no MPS
    assert time.perf_counter() - start < 0.5
    # asked for real: the child imports torch and answers what torch reports here
    assert query_mps(sys.executable, system="Darwin", machine="arm64") is torch.backends.mps.is_available()
    if sys.platform == "win32":
        return
    apple = tmp_path / "python-on-apple-silicon"  # a Python whose torch reports MPS
    apple.write_text("#!/bin/sh\necho 'MPS 1'\n")
    apple.chmod(apple.stat().st_mode | stat.S_IEXEC)
    assert query_mps(str(apple), system="Darwin", machine="arm64") is True
    broken = tmp_path / "python-that-fails"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    assert query_mps(str(broken), system="Darwin", machine="arm64") is False


@pytest.mark.skipif(sys.platform == "win32", reason="the slow Python is a POSIX shell script")
def test_the_device_query_asks_torch_off_the_gui_thread(tmp_path):
    slow = tmp_path / "python-slow-torch"
    slow.write_text("#!/bin/sh\nsleep 1\necho 'MPS 1'\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    start = time.perf_counter()
    query = GpuQuery(python=str(slow), system="Darwin", machine="arm64")
    assert time.perf_counter() - start < 0.3 and not query.done  # the GUI goes on
    query.wait(timeout=30)
    assert query.done and query.mps is True
    assert W.device_choices(query.mps)[-1] == "mps"
