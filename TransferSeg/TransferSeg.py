"""TransferSeg: the 3D Slicer module (GUI only, no math).

Module / Widget / Test as in Slicer's scripted-module template.  The Widget reads the
parameter node, starts a :class:`TransferSegLogic.SegmentJob` (the network runs in a child
process, so the GUI never freezes), shows its progress and offers Cancel.  All scene logic
lives in TransferSegLogic.py, which is tested headless on slicer-core.
"""
import logging
import os
import shutil
import sys

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The library is installed beside this file (see CMakeLists.txt); make it importable.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import TransferSegLogic  # noqa: E402
from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL, list_models  # noqa: E402


class TransferSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TransferSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TransferSeg developers"]
        self.parent.helpText = _(
            "Segment liver and liver tumors on CT, or find lesions on DBT, with 2D-to-3D transfer networks "
            "(AH-Net, ACS convolutions, H-DenseUNet, Volumetric Fusion Net). Select a volume and click Segment."
        )
        self.parent.acknowledgementText = _("Built on PyTorch, SimpleITK and 3D Slicer.")


@parameterNodeWrapper
class TransferSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    model: str = DEFAULT_SEGMENTATION_MODEL
    device: str = "auto"


class TransferSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TransferSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TransferSegModuleLogic()
        for card in list_models():
            self.ui.modelComboBox.addItem(f"{card['name']} (v{card['version']})", card["name"])
        for device in ("auto", "cpu", "cuda"):
            self.ui.deviceComboBox.addItem(device)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk_modified_event(), self._checkCanApply)
            self._checkCanApply()

    def _onModelChanged(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def _checkCanApply(self, caller=None, event=None):
        busy = self._job is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume) and self.ui.modelComboBox.count > 0
        self.ui.segmentButton.enabled = ready and not busy
        self.ui.segmentButton.toolTip = _("Segment the selected volume") if ready else _(
            "Select an input volume (and install a model)")

    def onSegmentButton(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start segmentation."), waitCursor=True):
            python = shutil.which("PythonSlicer") or sys.executable
            self._job = TransferSegLogic.SegmentJob(
                slicer.mrmlScene, self._parameterNode.inputVolume, self._parameterNode.model,
                self.ui.deviceComboBox.currentText, python=python)
            self._job.start()
            self.ui.cancelButton.enabled = True
            self._checkCanApply()
            self._timer.start()

    def onCancelButton(self):
        if self._job is not None:
            self._job.cancel()

    def _onTimer(self):
        job = self._job
        state = job.poll()
        self.ui.progressBar.setValue(int(round(job.fraction * 100)))
        self.ui.statusLabel.text = f"{state}: {job.stage}" if state == job.SEGMENTING else f"{state}. {job.message}"
        if state in (job.DONE, job.CANCELLED, job.FAILED):
            self._timer.stop()
            self._job = None
            self.ui.cancelButton.enabled = False
            self._checkCanApply()
            if state == job.DONE:
                slicer.util.setSliceViewerLayers(background=job.input_node)
                job.segmentation_node.GetDisplayNode().SetOpacity2DFill(0.4)
            elif state == job.FAILED:
                slicer.util.errorDisplay(_("Segmentation failed: {message}").format(message=job.message))


def vtk_modified_event():
    import vtk

    return vtk.vtkCommand.ModifiedEvent


class TransferSegModuleLogic(ScriptedLoadableModuleLogic):
    """Holds the parameter node; everything else is in TransferSegLogic.py (Qt-free)."""

    def getParameterNode(self):
        return TransferSegParameterNode(super().getParameterNode())


class TransferSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a CT phantom is segmented through the child process and imported."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom()

    def test_segment_phantom(self):
        from TransferSegLib.phantoms import ct_phantom

        volume, labels = ct_phantom(seed=5)
        node = TransferSegLogic.add_volume_node(slicer.mrmlScene, volume, "CT phantom")
        job = TransferSegLogic.SegmentJob(slicer.mrmlScene, node, DEFAULT_SEGMENTATION_MODEL, "cpu",
                                          python=shutil.which("PythonSlicer") or sys.executable)
        job.start()
        self.assertEqual(job.wait(timeout=600), job.DONE, job.message)
        segmentation = job.segmentation_node.GetSegmentation()
        self.assertTrue(segmentation.GetSegmentIdBySegmentName("liver"))
        liver = TransferSegLogic.segment_array(job.segmentation_node, "liver", volume)
        from TransferSegLib.metrics import dice

        self.assertGreater(dice(liver, labels >= 1), 0.5)
        logging.info("TransferSeg self-test passed")
