"""TransferSeg: the 3D Slicer module (GUI only, no math).

Module / Widget / Test as in Slicer's scripted-module template.  The Widget reads the
parameter node, asks for and installs missing Python packages on first use, starts a run
(:class:`TransferSegModuleLib.logic.SegmentJob`: the model runs in a child process, so the GUI
never freezes) or a batch of them (:class:`TransferSegModuleLib.batch.BatchJob`: checked volumes, or every
item of a sequence), follows its progress, offers Cancel, and shows and exports the results.  All
scene logic is the Qt-free :class:`TransferSegLogic` (TransferSegModuleLib/logic.py), tested
headless on slicer-core.
"""
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
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

from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL, find_model, model_dirs  # noqa: E402
from TransferSegLib.volume import TransferSegError  # noqa: E402
from TransferSegModuleLib import dependencies, widget_state  # noqa: E402
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib.batch import BATCH_MODES, BatchJob, batch_inputs  # noqa: E402
from TransferSegModuleLib.jobs import SegmentJob  # noqa: E402
from TransferSegModuleLib.logic import (DISPLAY_PARAMETERS, FUSIONS, TERMINOLOGY_FILE, VIEW_NAMES,  # noqa: E402
                                        GpuQuery, TransferSegLogic, terminology_context)
from TransferSegModuleLib.results import shows_in_3d  # noqa: E402
from TransferSegModuleLib.widget_state import TASKS, PanelRun, PanelState  # noqa: E402

TASK_TEXTS = {"ct": _("CT: liver and liver tumor"), "dbt": _("DBT: lesion heatmap and detections")}
#: the library's own user folder (``$TRANSFERSEG_MODELS``): the models folder until the user picks another
DEFAULT_MODELS_FOLDER = model_dirs()[0]


def _installedCards(folder=None) -> list:
    """Model cards (cards are small JSON: cheap when Slicer loads the module, and on Rescan)."""
    try:
        return TransferSegLogic.installedModels(folder)
    except Exception as e:  # a broken models folder must not stop Slicer from loading the module
        logging.warning(f"TransferSeg: could not list the models: {e}")
        return []


# The combo boxes' values.  The lists are changed in place (Rescan, the device query): the parameter node's
# Choice validators hold these very lists, and each connectGui fills the combos from them.
MODEL_NAMES, DEFAULT_MODEL = widget_state.model_choices(_installedCards())
DEVICES = widget_state.device_choices(mps=False)
#: the parameters bound to combo boxes: name -> (choices, default); a saved scene may name others
CHOICES = {"task": (list(TASKS), "ct"), "model": (MODEL_NAMES, DEFAULT_MODEL), "device": (DEVICES, "auto"),
           "fusion": (list(FUSIONS), "vfn"), "batch": (list(BATCH_MODES), "off")}


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


class TransferSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TransferSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TransferSeg developers (TransferSeg project)"]
        self.parent.helpText = _(
            "Segment the liver and liver tumors on CT, or find lesions on DBT, with 2D-to-3D transfer networks "
            "(AH-Net, ACS convolutions, H-DenseUNet, Volumetric Fusion Net). Select a volume and a task, click "
            "Segment. Multi-view models also show each view network's prediction and where the views disagree. "
            "The shipped models are demonstrations trained on synthetic phantoms, not for clinical use."
        )
        self.parent.acknowledgementText = _("Built on PyTorch, SimpleITK and 3D Slicer. Licensed under Apache-2.0.")
        # at startup, not when the module is opened: a scene loaded before that has our segments too
        slicer.app.connect("startupCompleted()", loadTerminology)


@parameterNodeWrapper
class TransferSegParameterNode:
    """Every control of the module's GUI (bound by SlicerParameterName in Resources/UI/TransferSeg.ui)."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(list(TASKS))] = "ct"
    model: Annotated[str, Choice(MODEL_NAMES)] = DEFAULT_MODEL
    device: Annotated[str, Choice(DEVICES)] = "auto"
    roi: slicer.vtkMRMLMarkupsROINode
    fusion: Annotated[str, Choice(list(FUSIONS))] = "vfn"
    modelsFolder: Path = DEFAULT_MODELS_FOLDER
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    outputDetections: slicer.vtkMRMLMarkupsFiducialNode
    show3DWhenDone: bool = False
    showAxial: bool = True
    showCoronal: bool = True
    showSagittal: bool = True
    showOverlay: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.25
    exportFolder: Path = Path.home()
    batch: Annotated[str, Choice(list(BATCH_MODES))] = "off"
    batchSequence: slicer.vtkMRMLSequenceBrowserNode


class TransferSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Reads the parameter node, asks :mod:`TransferSegModuleLib.widget_state` what to do and applies it to the
    controls; every scene change goes through :class:`TransferSegLogic`."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cards = {}
        self._run = PanelRun()
        self._state = PanelState()
        self._deviceQuery = None
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
        # nvidia-smi and torch (for Apple's GPU) may take seconds: the device list changes when they answer
        self._deviceQuery = GpuQuery()
        qt.QTimer.singleShot(200, self._onDeviceQueryTimer)
        loadTerminology()  # already loaded at startup, unless the module was added later

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.rescanModelsButton.connect("clicked(bool)", self.onRescanModels)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        self.ui.exportNrrdButton.connect("clicked(bool)", lambda: self.onExport("labelmap-nrrd"))
        self.ui.exportNiftiButton.connect("clicked(bool)", lambda: self.onExport("labelmap-nifti"))
        self.ui.exportSegmentationButton.connect("clicked(bool)", lambda: self.onExport("segmentation"))
        # the checked volumes live in the combo box only (a parameter node cannot bind a list of nodes to it)
        self.ui.batchVolumesSelector.connect("checkedNodesChanged()", self._checkCanApply)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def _onDeviceQueryTimer(self):
        query = self._deviceQuery
        if query is None:
            return
        if not query.done:
            qt.QTimer.singleShot(200, self._onDeviceQueryTimer)
            return
        devices = widget_state.device_choices(query.mps)
        if devices != DEVICES:
            DEVICES[:] = devices
            self._reconnectGui()
        elif self._parameterNode:
            self._relabelDevices()

    def _relabelCombos(self):
        """Readable item texts and tool tips (the parameter node binds combos by item index)."""
        for index, key in enumerate(TASKS):
            self.ui.taskComboBox.setItemText(index, TASK_TEXTS[key])
        combo = self.ui.modelComboBox
        for index, name in enumerate(MODEL_NAMES):
            card = self._cards.get(name)
            if card:
                method = "multi-view" if widget_state.is_multiview(card) else "single network"
                combo.setItemText(index, f"{name} (v{card['version']}, {method})")
                combo.setItemData(index, TransferSegLogic.modelSummary(card), qt.Qt.ToolTipRole)
        self._relabelDevices()
        names = {"vfn": _("VFN (Volumetric Fusion Net)"), "vfn-noimage": _("VFN without the image"),
                 "majority": _("Majority vote"), "staple": _("STAPLE")}
        for index, fusion in enumerate(FUSIONS):
            self.ui.fusionComboBox.setItemText(index, names[fusion])
        batches = {"off": _("The input volume"), "volumes": _("Each checked volume"),
                   "sequence": _("Every item of a sequence")}
        for index, mode in enumerate(BATCH_MODES):
            self.ui.batchComboBox.setItemText(index, batches[mode])

    def _relabelDevices(self):
        """The device items, the CUDA one with the GPU nvidia-smi named once it has answered."""
        query = self._deviceQuery
        gpus = query.result if query is not None and query.done else None
        texts = {"auto": _("Auto (the GPU if there is one, else the CPU)"), "cpu": _("CPU"),
                 "mps": _("MPS (Apple GPU)")}
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
        self._run.app_closing()  # no timer will poll the job again: it removes its files now
        self._deviceQuery = None  # its pending relabel finds no widget to update
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event):
        self._run.scene_closing()
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

    def _disconnectParameterNode(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._repairChoices)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

    def setParameterNode(self, inputParameterNode):
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._loadModels()
            self._repairChoices()  # before connecting: the combo connector raises on a value it does not list
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._relabelCombos()
            # ahead of the GUI update (higher priority): a scene imported later may name an unknown model too
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._repairChoices,
                             priority=10.0)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            # the slice views already show these settings: entering the module again must not reset them
            self._state.connected(TransferSegLogic.displayParameters(self._parameterNode.parameterNode),
                                  self._parameterNode.inputVolume.GetID() if self._parameterNode.inputVolume else None)
            self._onParameterChanged()

    def _reconnectGui(self):
        """The combos' choices changed (Rescan, the device query): fill them again from the lists."""
        p = self._parameterNode
        if not p:
            return
        p.disconnectGui(self._parameterNodeGuiTag)
        self._repairChoices()
        self._parameterNodeGuiTag = p.connectGui(self.ui)
        self._relabelCombos()
        self._onParameterChanged()

    def _loadModels(self):
        """Read the model cards (installed, and in the models folder) into the model choices, in place."""
        p = self._parameterNode
        cards = _installedCards(p.modelsFolder if p else None)
        names, default = widget_state.model_choices(cards)
        MODEL_NAMES[:] = names
        CHOICES["model"] = (MODEL_NAMES, default)
        self._cards = {card["name"]: card for card in cards}

    def onRescanModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to read the models."), waitCursor=True):
            self._loadModels()
            self._reconnectGui()
            self.ui.statusLabel.text = _("{count} models found.").format(count=len(self._cards))

    def _repairChoices(self, caller=None, event=None):
        """A saved scene naming a model that is not installed here: the default model, with a message."""
        if not self._parameterNode:
            return
        for name, old, new in TransferSegLogic.repairChoices(self._parameterNode.parameterNode, CHOICES):
            message = widget_state.repair_message(name, old, new)
            logging.warning(f"TransferSeg: {message}")
            self.ui.statusLabel.text = message

    # --- reacting to the parameter node -----------------------------------------------------------
    def _onParameterChanged(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        reaction = self._state.parameter_changed(p.task, p.model, TransferSegLogic.displayParameters(p.parameterNode),
                                                 self._cards, p.inputVolume, p.outputSegmentation, p.outputDetections)
        for name, value in reaction.set.items():
            setattr(p, name, value)  # fires this again
        if reaction.again:
            return
        card = self._cards.get(p.model)
        self.ui.fusionLabel.visible = self.ui.fusionComboBox.visible = reaction.multiview
        detections = reaction.output == "detections"  # a heatmap model writes a point list, no segmentation
        self.ui.outputLabel.visible = self.ui.outputSelector.visible = not detections
        self.ui.outputDetectionsLabel.visible = self.ui.outputDetectionsSelector.visible = detections
        self.ui.modelDescriptionLabel.text = TransferSegLogic.modelSummary(card) if card else _(
            "No model is installed.")
        self._updateDisplayControls()
        if reaction.display_changed:  # only a display parameter touches the slice views
            self._applyDisplay(reaction.display_changed)
        self._checkCanApply()

    def _runPlan(self):
        """What a click on Segment runs (the input volume, the checked volumes or a sequence's items)."""
        p = self._parameterNode
        if p is None:
            return widget_state.run_plan("off", None, [], None)
        return widget_state.run_plan(p.batch, p.inputVolume, self.ui.batchVolumesSelector.checkedNodes(),
                                     p.batchSequence)

    def _checkCanApply(self):
        p = self._parameterNode
        plan = self._runPlan()
        installed = bool(p) and p.model in self._cards
        buttons = widget_state.buttons(plan.count > 0, installed, self._run.busy, bool(p and p.outputSegmentation))
        self.ui.segmentButton.enabled = buttons.segment
        self.ui.cancelButton.enabled = buttons.cancel
        self.ui.segmentButton.text = plan.button
        self.ui.segmentButton.toolTip = plan.hint if installed or not plan.count else _("Install a model first")
        mode = p.batch if p else "off"
        self.ui.batchVolumesSelector.enabled = mode == "volumes"
        self.ui.batchSequenceSelector.enabled = mode == "sequence"
        # a batch makes new nodes for each volume
        self.ui.outputSelector.enabled = self.ui.outputDetectionsSelector.enabled = not plan.batch
        for button in (self.ui.exportNrrdButton, self.ui.exportNiftiButton, self.ui.exportSegmentationButton):
            button.enabled = buttons.export
        self.ui.show3DButton.enabled = buttons.show3d
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = bool(p) and shows_in_3d(p.outputSegmentation)
        self.ui.show3DButton.blockSignals(wasBlocked)

    def _updateDisplayControls(self):
        """Enable the display controls that the current results have (no scene change)."""
        outputs = self._run.outputs
        controls = widget_state.display_controls(outputs)
        for view, box in zip(VIEW_NAMES, (self.ui.showAxialCheckBox, self.ui.showCoronalCheckBox,
                                          self.ui.showSagittalCheckBox)):
            box.enabled = controls.views[view]
        self.ui.showOverlayCheckBox.enabled = self.ui.overlayOpacitySlider.enabled = controls.overlay
        self.ui.showOverlayCheckBox.text = _("Show the lesion heatmap") if controls.heatmap else _(
            "Show where the views disagree")
        self.ui.confidenceThresholdSlider.enabled = controls.threshold
        if not outputs:
            self.ui.detectionsLabel.text = ""
        table = outputs.findings if controls.findings else None
        if self.ui.findingsTableView.mrmlTableNode() is not table:
            self.ui.findingsTableView.setMRMLTableNode(table)

    def _applyDisplay(self, changed=DISPLAY_PARAMETERS):
        """Apply the ``changed`` display parameters to the results, live: per-view overlays, the
        disagreement / heatmap overlay and the confidence filter.  The others stay as the user left them."""
        p, outputs = self._parameterNode, self._run.outputs
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
            self.ui.detectionsLabel.text = widget_state.detections_text(
                shown, len(TransferSegLogic.confidences(detections)), p.confidenceThreshold)

    def onShow3D(self, checked):
        p = self._parameterNode
        if p is not None and self.logic.show3D(p.outputSegmentation, checked):
            self._resetThreeDView()

    @staticmethod
    def _resetThreeDView():
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def onFindingSelected(self):
        """A click on a findings row centres the slice views on it."""
        view = self.ui.findingsTableView
        indexes = view.selectionModel().selectedIndexes() if view.selectionModel() else []
        if indexes:  # the view sorts through a proxy model: the row of the table model behind it
            self.logic.jumpToRow(view.mrmlTableNode(), view.sortFilterProxyModel().mapToSource(indexes[0]).row())

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
                import PyTorchUtils  # the PyTorch extension's module: missing until the user installs it
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
                card = self._cards.get(p.model) or {}
                model = card.get("_path") or p.model
                fusion = p.fusion if widget_state.is_multiview(card) else None
                if self._runPlan().batch:
                    inputs = batch_inputs(self.logic, p.batch, self.ui.batchVolumesSelector.checkedNodes(),
                                          p.batchSequence)
                    job = BatchJob(self.logic, inputs, model, device=p.device, roi_node=p.roi, fusion=fusion)
                else:
                    job = self.logic.startSegmentation(p.inputVolume, model, device=p.device, roiNode=p.roi,
                                                       fusion=fusion, outputSegmentation=p.outputSegmentation,
                                                       outputDetections=p.outputDetections)
                self._run.start(job)
                self.ui.logTextEdit.clear()
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = job.status
                self._timer.start()
            finally:
                self._checkCanApply()  # a start error leaves Segment usable

    def onCancelButton(self):
        if self._run.job is not None:
            self._run.cancel()  # returns at once; the timer sees the process end
            self.ui.statusLabel.text = self._run.job.status

    def _onTimer(self):
        job, p = self._run.job, self._parameterNode
        if job is None:
            self._timer.stop()
            return
        lines, finished = self._run.poll(show3d_when_done=bool(p and p.show3DWhenDone))
        for line in lines:
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.setValue(int(round(job.fraction * 100)))
        self.ui.statusLabel.text = job.status  # on Done: the time taken and what was found
        if finished is None:
            return
        self._timer.stop()
        if p is None:  # the scene was closed during the run
            self._checkCanApply()
            return
        if finished.outputs is not None:
            if finished.outputs.detections is not None and not finished.batch:
                p.outputDetections = finished.outputs.detections  # the next detection run writes into it
            if finished.outputs.segmentation is not None:
                if not finished.batch:  # a batch made one segmentation per volume: none is the next run's output
                    p.outputSegmentation = finished.outputs.segmentation  # the next run writes into it
                if p.show3DWhenDone:
                    self._resetThreeDView()
            slicer.util.resetSliceViews()
            if finished.failures:
                self.ui.logCollapsibleButton.collapsed = False
                slicer.util.warningDisplay(_("Some volumes could not be segmented:\n\n{failures}").format(
                    failures="\n".join(f"{name}: {message}" for name, message in finished.failures)))
        elif finished.state == SegmentJob.FAILED:
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(_("The segmentation failed: {message}").format(message=finished.message))
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
        folder = Path(slicer.util.tempDirectory("TransferSegTest-"))  # in Slicer's own temporary folder
        try:
            self._segmentAndExport(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _segmentAndExport(self, folder: Path):
        # only the self-test needs these: Slicer's start-up does not load scipy (phantoms, metrics) or SimpleITK
        import SimpleITK as sitk
        from TransferSegLib.metrics import dice
        from TransferSegLib.phantoms import ct_phantom

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
            self.assertGreater(dice(liver, truth >= 1), 0.5)
            self.assertIsNotNone(job.outputs.findings)  # the findings table: liver, and each tumor component
        else:
            self.delayDisplay(f"torch ({dependencies.TORCH_REQUIREMENT}) is not installed: testing the scene "
                              "logic only (no segmentation run)")
            segmentation = L.add_segmentation_node(slicer.mrmlScene, truth, volume, card["labels"],
                                                   "CT phantom TransferSeg", reference_node=node)
            np.testing.assert_array_equal(logic.labelmapArray(segmentation, node), truth)
        # every segment names our terminology context, which Slicer has loaded (at startup; a no-op here then)
        loadTerminology()
        context = terminology_context().name
        self.assertTrue(slicer.modules.terminologies.logic().IsTerminologyContextLoaded(context))
        for n in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            self.assertTrue(segmentation.GetSegmentation().GetNthSegment(n).GetTerminology().startswith(context + "~"))
        # the segmentation in 3D
        self.assertTrue(logic.show3D(segmentation))
        self.assertTrue(shows_in_3d(segmentation))
        # export round trip, read back with SimpleITK
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
