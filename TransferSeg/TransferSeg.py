"""TransferSeg: the 3D Slicer module (GUI only, no math).

Module / Widget / Test as in Slicer's scripted-module template.  The Widget reads the
parameter node, asks for and installs missing Python packages on first use, starts a run
(:class:`TransferSegModuleLib.logic.SegmentJob`: the model runs in a child process, so the GUI
never freezes), follows its progress, offers Cancel, and shows and exports the results.  All
scene logic is the Qt-free :class:`TransferSegLogic` (TransferSegModuleLib/logic.py), tested
headless on slicer-core.
"""
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, \
    ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

# The library sits beside this file once built or installed, one folder up in a source checkout.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_path, "TransferSegLib")) and _path not in sys.path:
        sys.path.append(_path)

from TransferSegLib.models import DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL  # noqa: E402
from TransferSegLib.volume import TransferSegError  # noqa: E402
from TransferSegModuleLib import dependencies  # noqa: E402
from TransferSegModuleLib.logic import (DISPLAY_PARAMETERS, FUSIONS, TERMINOLOGY_FILE, VIEW_NAMES,  # noqa: E402
                                        GpuQuery, TransferSegLogic, terminology_context)

#: task -> (shown text, model-card task, default model)
TASKS = {
    "ct": (_("CT: liver and liver tumor"), "segmentation", DEFAULT_SEGMENTATION_MODEL),
    "dbt": (_("DBT: lesion heatmap and detections"), "heatmap", DEFAULT_DETECTION_MODEL),
}
DEVICES = ("auto", "cpu", "cuda")


def _installedModelNames() -> list:
    """Model names for the model combo (read once, when Slicer loads the module: cards are small JSON)."""
    try:
        names = [card["name"] for card in TransferSegLogic.installedModels()]
    except Exception as e:  # a broken models folder must not stop Slicer from loading the module
        logging.warning(f"TransferSeg: could not list the installed models: {e}")
        names = []
    return names or [DEFAULT_SEGMENTATION_MODEL]


MODEL_NAMES = _installedModelNames()
DEFAULT_MODEL = DEFAULT_SEGMENTATION_MODEL if DEFAULT_SEGMENTATION_MODEL in MODEL_NAMES else MODEL_NAMES[0]
#: the parameters bound to combo boxes: name -> (choices, default); a saved scene may name others
CHOICES = {"task": (list(TASKS), "ct"), "model": (MODEL_NAMES, DEFAULT_MODEL), "device": (list(DEVICES), "auto"),
           "fusion": (list(FUSIONS), "vfn")}


def loadTerminology() -> None:
    """Load our terminology context (liver, neoplasm, lesion) into Slicer, once: the segments the
    module creates name it, and Slicer resolves a segment's entry only in a loaded context."""
    try:
        terminologies = slicer.modules.terminologies.logic()
        expected = terminology_context()
        if expected is not None and terminologies.IsTerminologyContextLoaded(expected.name):
            return
        name = terminologies.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
        if not name or (expected is not None and name != expected.name):
            logging.warning(f"TransferSeg: Slicer loaded the terminology {TERMINOLOGY_FILE} as {name!r}")
    except Exception as e:  # the segments keep their codes; only the terminology selector lacks them
        logging.warning(f"TransferSeg: could not load the terminology file: {e}")


def _taskOf(card):
    """The task key ("ct" or "dbt") of a model card, None without a card."""
    if not card:
        return None
    return "dbt" if card.get("task") == "heatmap" else "ct"


class TransferSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TransferSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TransferSeg developers"]
        self.parent.helpText = _(
            "Segment the liver and liver tumors on CT, or find lesions on DBT, with 2D-to-3D transfer networks "
            "(AH-Net, ACS convolutions, H-DenseUNet, Volumetric Fusion Net). Select a volume and a task, click "
            "Segment. Multi-view models also show each view network's prediction and where the views disagree. "
            "The shipped models are demonstrations trained on synthetic phantoms, not for clinical use."
        )
        self.parent.acknowledgementText = _("Built on PyTorch, SimpleITK and 3D Slicer.")
        # at startup, not when the module is opened: a scene loaded before that has our segments too
        slicer.app.connect("startupCompleted()", loadTerminology)


@parameterNodeWrapper
class TransferSegParameterNode:
    """Every control of the module's GUI (bound by SlicerParameterName in Resources/UI/TransferSeg.ui)."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(list(TASKS))] = "ct"
    model: Annotated[str, Choice(MODEL_NAMES)] = DEFAULT_MODEL
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    roi: slicer.vtkMRMLMarkupsROINode
    fusion: Annotated[str, Choice(list(FUSIONS))] = "vfn"
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    showAxial: bool = True
    showCoronal: bool = True
    showSagittal: bool = True
    showOverlay: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.25
    exportFolder: Path = Path.home()


class TransferSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cards = {}
        self._job = None
        self._outputs = None
        self._gpuQuery = None
        self._lastDisplay = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._onTimer)

    # --- set-up -------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TransferSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # runs keep their files in Slicer's own temporary folder (Application Settings > General)
        self.logic = TransferSegLogic(temporaryFolder=slicer.app.temporaryPath)
        self._cards = {card["name"]: card for card in TransferSegLogic.installedModels()}
        self._gpuQuery = GpuQuery()  # nvidia-smi may take seconds: the device list is relabelled when it answers
        qt.QTimer.singleShot(200, self._onGpuQueryTimer)
        loadTerminology()  # already loaded at startup, unless the module was added later

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportNrrdButton.connect("clicked(bool)", lambda: self.onExport("labelmap-nrrd"))
        self.ui.exportNiftiButton.connect("clicked(bool)", lambda: self.onExport("labelmap-nifti"))
        self.ui.exportSegmentationButton.connect("clicked(bool)", lambda: self.onExport("segmentation"))
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def _onGpuQueryTimer(self):
        if self._gpuQuery is None:
            return
        if not self._gpuQuery.done:
            qt.QTimer.singleShot(200, self._onGpuQueryTimer)
            return
        if self._parameterNode:
            self._relabelDevices()

    def _relabelCombos(self):
        """Readable item texts and tool tips (the parameter node binds combos by item index)."""
        combo = self.ui.taskComboBox
        for index, key in enumerate(TASKS):
            combo.setItemText(index, TASKS[key][0])
        combo = self.ui.modelComboBox
        for index, name in enumerate(MODEL_NAMES):
            card = self._cards.get(name)
            if card:
                method = "multi-view" if TransferSegLogic.isMultiview(card) else "single network"
                combo.setItemText(index, f"{name} (v{card['version']}, {method})")
                combo.setItemData(index, TransferSegLogic.modelSummary(card), qt.Qt.ToolTipRole)
        self._relabelDevices()
        names = {"vfn": _("VFN (Volumetric Fusion Net)"), "vfn-noimage": _("VFN without the image"),
                 "majority": _("Majority vote"), "staple": _("STAPLE")}
        for index, fusion in enumerate(FUSIONS):
            self.ui.fusionComboBox.setItemText(index, names[fusion])

    def _relabelDevices(self):
        """The device items, the CUDA one with the GPU nvidia-smi named once it has answered."""
        gpus = self._gpuQuery.result if self._gpuQuery is not None and self._gpuQuery.done else None
        texts = {"auto": _("Auto (the GPU if there is one, else the CPU)"), "cpu": _("CPU")}
        if gpus:
            index, name, memory = gpus[0]
            texts["cuda"] = _("CUDA: {name} ({memory:.0f} GiB)").format(name=name, memory=memory / 1024)
        elif gpus is None:
            texts["cuda"] = _("CUDA (looking for an NVIDIA GPU…)")
        else:
            texts["cuda"] = _("CUDA (no NVIDIA GPU found)")
        for index, device in enumerate(DEVICES):
            self.ui.deviceComboBox.setItemText(index, texts[device])

    def cleanup(self):
        # Slicer is closing: no timer will poll the job again, so it removes its files now
        if self._job is not None:
            self._job.close()
            self._job = None
        self._gpuQuery = None  # its pending relabel finds no widget to update
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._repairChoices)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
        self._outputs = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(TransferSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._repairChoices)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._repairChoices()  # before connecting: the combo connector raises on a value it does not list
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._relabelCombos()
            # ahead of the GUI update (higher priority): a scene imported later may name an unknown model too
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._repairChoices,
                             priority=10.0)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            # the slice views already show these settings: entering the module again must not reset them
            self._lastDisplay = TransferSegLogic.displayParameters(self._parameterNode.parameterNode)
            self._onParameterChanged()

    def _repairChoices(self, caller=None, event=None):
        """A saved scene naming a model that is not installed here: the default model, with a message."""
        if not self._parameterNode:
            return
        for name, old, new in TransferSegLogic.repairChoices(self._parameterNode.parameterNode, CHOICES):
            message = _("The scene's {name} '{old}' is not available here; using '{new}'.").format(
                name=name, old=old, new=new)
            logging.warning(f"TransferSeg: {message}")
            self.ui.statusLabel.text = message

    # --- reacting to the parameter node -----------------------------------------------------------
    def _onParameterChanged(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        card = self._cards.get(p.model)
        # Task and model stay consistent: a new task picks its default model, a new model sets its task.
        if self._lastTask is not None and p.task != self._lastTask:
            self._lastTask = p.task
            if _taskOf(card) != p.task:
                candidates = [n for n in MODEL_NAMES if _taskOf(self._cards.get(n)) == p.task]
                if candidates:
                    default = TASKS[p.task][2]
                    p.model = default if default in candidates else candidates[0]  # fires this again
                    return
        elif p.model != self._lastModel:
            self._lastModel = p.model
            if _taskOf(card) and _taskOf(card) != p.task:
                self._lastTask = _taskOf(card)
                p.task = _taskOf(card)  # fires this again
                return
            if TransferSegLogic.isMultiview(card):
                p.fusion = (card.get("method", {}).get("config") or {}).get("fusion", "vfn")
        self._lastTask, self._lastModel = p.task, p.model
        multiview = TransferSegLogic.isMultiview(card)
        self.ui.fusionLabel.visible = self.ui.fusionComboBox.visible = multiview
        self.ui.modelDescriptionLabel.text = TransferSegLogic.modelSummary(card) if card else _(
            "No model is installed.")
        self._updateDisplayControls()
        # only a display parameter touches the slice views: a new device must not reset the user's layers
        display = TransferSegLogic.displayParameters(p.parameterNode)
        changed = {name for name in DISPLAY_PARAMETERS if display[name] != (self._lastDisplay or {}).get(name)}
        self._lastDisplay = display
        if changed:
            self._applyDisplay(changed)
        self._checkCanApply()

    _lastTask = None
    _lastModel = None

    def _checkCanApply(self):
        busy = self._job is not None
        p = self._parameterNode
        ready = bool(p and p.inputVolume) and p.model in self._cards
        self.ui.segmentButton.enabled = ready and not busy
        self.ui.cancelButton.enabled = busy
        self.ui.segmentButton.toolTip = _("Run the model on the selected volume") if ready else _(
            "Select an input volume (and install a model)")
        hasSegmentation = bool(p and p.outputSegmentation)
        for button in (self.ui.exportNrrdButton, self.ui.exportNiftiButton, self.ui.exportSegmentationButton):
            button.enabled = hasSegmentation and not busy

    def _updateDisplayControls(self):
        """Enable the display controls that the current results have (no scene change)."""
        outputs = self._outputs
        hasViews = bool(outputs and outputs.views)
        overlay = outputs and (outputs.heatmap or outputs.disagreement)
        for view, box in zip(VIEW_NAMES, (self.ui.showAxialCheckBox, self.ui.showCoronalCheckBox,
                                          self.ui.showSagittalCheckBox)):
            box.enabled = hasViews and view in outputs.views
        self.ui.showOverlayCheckBox.enabled = self.ui.overlayOpacitySlider.enabled = bool(overlay)
        self.ui.showOverlayCheckBox.text = _("Show the lesion heatmap") if outputs and outputs.heatmap else _(
            "Show where the views disagree")
        self.ui.confidenceThresholdSlider.enabled = bool(outputs) and outputs.detections is not None
        if not outputs:
            self.ui.detectionsLabel.text = ""

    def _applyDisplay(self, changed=DISPLAY_PARAMETERS):
        """Apply the ``changed`` display parameters to the results, live: per-view overlays, the
        disagreement / heatmap overlay and the confidence filter.  The others stay as the user left them."""
        p, outputs = self._parameterNode, self._outputs
        if not outputs or p is None:
            return
        overlay = outputs.heatmap or outputs.disagreement
        detections = outputs.detections
        for view, shown in zip(VIEW_NAMES, ("showAxial", "showCoronal", "showSagittal")):
            if shown in changed:
                TransferSegLogic.setViewOverlayVisible(outputs, view, getattr(p, shown))
        if overlay and {"showOverlay", "overlayOpacity"} & set(changed):
            self.logic.setOverlay(overlay, p.showOverlay, p.overlayOpacity)
        if "confidenceThreshold" in changed and detections is not None and detections.GetScene() is not None:
            shown = TransferSegLogic.setConfidenceThreshold(detections, p.confidenceThreshold)
            total = len(TransferSegLogic.confidences(detections))
            self.ui.detectionsLabel.text = _("{shown} of {total} detections at confidence ≥ {t:.2f}").format(
                shown=shown, total=total, t=p.confidenceThreshold)

    # --- running ----------------------------------------------------------------------------------
    def ensureDependencies(self) -> bool:
        """torch (installed or upgraded) through the PyTorch extension, the rest through pip, each after
        asking; False if declined."""
        status = dependencies.torch_status()
        if status != dependencies.TORCH_OK:
            no_wheel = dependencies.no_torch_wheel()
            if no_wheel:
                raise TransferSegError(no_wheel)
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise TransferSegError(_("TransferSeg needs the PyTorch extension: install 'PyTorch' from the "
                                         "Extensions Manager, restart Slicer and click Segment again."))
            outdated = status == dependencies.TORCH_OUTDATED
            if outdated and not slicer.util.confirmOkCancelDisplay(
                    _("TransferSeg needs PyTorch {requirement}, but version {version} is installed.\n\n"
                      "Upgrade PyTorch now? This takes a few minutes; other modules that use PyTorch get the new "
                      "version too.").format(requirement=dependencies.TORCH_REQUIREMENT,
                                             version=dependencies.torch_version()),
                    _("Upgrade PyTorch")):
                return False
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=not outdated, torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
            if torch is None:
                return False
            if dependencies.torch_status() != dependencies.TORCH_OK:  # e.g. its files were in use (Windows)
                raise TransferSegError(_("PyTorch {version} is still installed; TransferSeg needs {requirement}. "
                                         "Restart Slicer, uninstall PyTorch in the PyTorch Utils module, restart "
                                         "again and click Segment.").format(
                    version=dependencies.torch_version(), requirement=dependencies.TORCH_REQUIREMENT))
        missing = dependencies.missing_pip_packages()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("TransferSeg needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                      "Install them now? This takes a minute or two.").format(packages="\n".join(missing)),
                    _("Install Python packages")):
                return False
            slicer.util.pip_install(missing)
        return True

    def onSegmentButton(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            try:
                if not self.ensureDependencies():
                    self.ui.statusLabel.text = _("Not started: the required packages were not installed.")
                    return
                self._job = self.logic.startSegmentation(
                    p.inputVolume, p.model, device=p.device, roiNode=p.roi,
                    fusion=p.fusion if TransferSegLogic.isMultiview(self._cards.get(p.model)) else None)
                self.ui.logTextEdit.clear()
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = self._job.status
                self._timer.start()
            finally:
                self._checkCanApply()  # a start error leaves Segment usable

    def onCancelButton(self):
        if self._job is not None:
            self._job.cancel()  # returns at once; the timer sees the process end
            self.ui.statusLabel.text = self._job.status

    def _onTimer(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        logged = len(job.log)
        state = job.poll()
        for line in job.log[logged:]:
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.setValue(int(round(job.fraction * 100)))
        self.ui.statusLabel.text = job.status
        if job.running:
            return
        self._timer.stop()
        self._job = None
        if self._parameterNode is None:  # the scene was closed during the run
            self._checkCanApply()
            return
        if state == job.DONE:
            self._outputs = job.outputs
            if job.outputs.segmentation is not None:
                self._parameterNode.outputSegmentation = job.outputs.segmentation
            slicer.util.resetSliceViews()
        elif state == job.FAILED:
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(_("The segmentation failed: {message}").format(message=job.message))
        self._updateDisplayControls()
        self._applyDisplay()  # new results: every display setting applies to them
        self._checkCanApply()

    # --- export -----------------------------------------------------------------------------------
    def onExport(self, kind: str):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            segmentation = p.outputSegmentation
            reference = p.inputVolume
            role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
            if segmentation is not None and segmentation.GetNodeReference(role):
                reference = segmentation.GetNodeReference(role)
            if reference is None:
                raise TransferSegError(_("Select the input volume whose grid the label map should have."))
            path = self.logic.exportPath(segmentation, p.exportFolder, kind)
            if path.exists() and not slicer.util.confirmYesNoDisplay(
                    _("{path} exists. Replace it?").format(path=path), _("Replace file")):
                return
            written = self.logic.export(segmentation, reference, p.exportFolder, kind, overwrite=True)
            self.ui.statusLabel.text = _("Wrote {path}").format(path=written)


class TransferSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest): a small CT phantom, no download.  With torch it segments on the CPU through
    the same child-process path as the headless tests; without torch it says so and tests the scene logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_TransferSeg()

    def test_TransferSeg(self):
        import shutil

        folder = Path(slicer.util.tempDirectory("TransferSegTest-"))  # in Slicer's own temporary folder
        try:
            self._segmentAndExport(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _segmentAndExport(self, folder: Path):
        import json

        import numpy as np

        from TransferSegLib.models import find_model
        from TransferSegLib.phantoms import ct_phantom
        from TransferSegModuleLib import logic as L

        volume, truth = ct_phantom(5, shape=(24, 80, 80))
        node = L.add_volume_node(slicer.mrmlScene, volume, "CT phantom")
        logic = TransferSegLogic(temporaryFolder=slicer.app.temporaryPath)
        card = json.loads(find_model(DEFAULT_SEGMENTATION_MODEL).read_text(encoding="utf-8"))
        withTorch = dependencies.torch_status() == dependencies.TORCH_OK and not dependencies.missing_pip_packages()
        if withTorch:
            self.delayDisplay("Segmenting a CT phantom on the CPU")
            job = logic.startSegmentation(node, DEFAULT_SEGMENTATION_MODEL, device="cpu")
            self.assertEqual(job.wait(timeout=600), job.DONE, job.message)
            segmentation = job.outputs.segmentation
            names = [segmentation.GetSegmentation().GetNthSegment(n).GetName()
                     for n in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(names, [s["name"] for s in card["labels"]])
            liver = L.segment_array(segmentation, "liver", volume)
            from TransferSegLib.metrics import dice

            self.assertGreater(dice(liver, truth >= 1), 0.5)
        else:
            self.delayDisplay("torch (>= 2.4) is not installed: testing the scene logic only (no segmentation run)")
            segmentation = L.add_segmentation_node(slicer.mrmlScene, truth, volume, card["labels"],
                                                   "CT phantom TransferSeg", reference_node=node)
            np.testing.assert_array_equal(logic.labelmapArray(segmentation, node), truth)
        # every segment names our terminology context, which Slicer has loaded (at startup; a no-op here then)
        loadTerminology()
        context = terminology_context().name
        self.assertTrue(slicer.modules.terminologies.logic().IsTerminologyContextLoaded(context))
        for n in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            self.assertTrue(segmentation.GetSegmentation().GetNthSegment(n).GetTerminology().startswith(context + "~"))
        # export round trip, read back with SimpleITK
        import SimpleITK as sitk

        path = logic.export(segmentation, node, folder, "labelmap-nifti")
        exported = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        np.testing.assert_array_equal(exported, logic.labelmapArray(segmentation, node))
        with self.assertRaises(FileExistsError):
            logic.export(segmentation, node, folder, "labelmap-nifti")
        # detections and the confidence filter (no model needed)
        (folder / "detections.json").write_text(json.dumps({"detections": [
            {"position_ras": [1.0, 2.0, 3.0], "confidence": 0.9, "box_kji": [0, 0, 0, 1, 1, 1]},
            {"position_ras": [4.0, 5.0, 6.0], "confidence": 0.3, "box_kji": [0, 0, 0, 1, 1, 1]}]}), encoding="utf-8")
        points = logic.addDetections(folder / "detections.json", "detections", card)
        self.assertEqual(logic.setConfidenceThreshold(points, 0.5), 1)
        self.assertFalse(points.GetNthControlPointVisibility(1))
        self.delayDisplay("TransferSeg self-test passed" + ("" if withTorch else " (scene logic only)"))
