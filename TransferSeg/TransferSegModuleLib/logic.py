"""Qt-free scene logic of the TransferSeg module: MRML nodes in, MRML nodes out.

Imports no qt, ctk or slicer.app, so it runs (and is tested) on slicer-core's real MRML scene
without the desktop.  The GUI (TransferSeg.py) reads the parameter node, calls
:class:`TransferSegLogic` and shows progress; it never touches a node itself.

What a run puts in the scene (every file comes from ``result.json["files"]``):

- ``<volume> TransferSeg``: the fused segmentation (named, coloured segments with terminology,
  the input as reference geometry), under the input's study in the subject hierarchy;
- ``<volume> TransferSeg axial|coronal|sagittal``: each view network's own label map, shown as
  outlines in a tint of its view (multi-view models);
- ``<volume> view disagreement``: a scalar volume shown as the foreground layer (multi-view);
- ``<volume> lesion heatmap`` and ``<volume> detections`` (a point list, one point per
  detection, labelled with its confidence) for heatmap models (DBT);
- a findings table: ``<volume> TransferSeg findings`` (each organ, and each tumor component with its
  volume and centre) or ``<volume> detections table`` (each detection: kind, confidence, position).

Run into an output segmentation the user picked, a segmentation run replaces its segments (the node
stays) and the nodes an earlier run linked to it (views, disagreement, findings); run into an output point
list, a detection run replaces its points (the node and its display stay) and its heatmap and table:
running again adds no node.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import slicer
import vtk

from TransferSegLib.models import component_specs, list_models, method_of, read_card
from TransferSegLib.volume import TransferSegError, Volume
from . import results
from .devices import query_gpus
from .jobs import VIEW_NAMES, ResultImport, SegmentJob, TransferSegOutputs, alive
from .scene import (LABEL_VALUE_TAG, add_segmentation_node, node_geometry, remove_nodes, segment_label_value,
                    set_geometry, terminology_string)
# The module's API for the GUI and the tests, from the modules that hold each part (see __all__)
from .devices import GpuQuery, query_mps  # noqa: F401,E402
from .jobs import (DISAGREEMENT_COLORS, FUSIONS, done_status, failure_message, parse_progress_line,  # noqa: F401,E402
                   status_text)
from .scene import (TERMINOLOGY_FILE, add_volume_node, segment_array, terminology_context,  # noqa: F401,E402
                    volume_from_node)
from .voxels import Stopped, read_heatmap_output, read_scalar_output, read_view_labels  # noqa: F401,E402

__all__ = ["DISAGREEMENT_COLORS", "DISPLAY_PARAMETERS", "FUSIONS", "MODULE_NAME", "TERMINOLOGY_FILE", "VIEW_NAMES",
           "GpuQuery", "Stopped", "TransferSegLogic", "TransferSegOutputs", "add_segmentation_node", "add_volume_node",
           "done_status", "failure_message", "parse_progress_line", "query_mps", "read_heatmap_output", "read_scalar_output",
           "read_view_labels", "remove_nodes", "segment_array", "status_text", "terminology_context",
           "terminology_string", "volume_from_node"]

MODULE_NAME = "TransferSeg"
#: each view's outline tint (mixed half and half with the segment's own colour)
VIEW_TINTS = {"axial": (1.0, 1.0, 0.0), "coronal": (0.0, 1.0, 1.0), "sagittal": (1.0, 0.0, 1.0)}
#: the parameters that only change how results are shown (the others must not touch the slice views)
DISPLAY_PARAMETERS = ("showAxial", "showCoronal", "showSagittal", "showOverlay", "overlayOpacity",
                      "confidenceThreshold")


class TransferSegLogic:
    """The TransferSeg module's logic, Qt-free: parameter node, models, runs, the scene, export.

    Named ``<module>Logic`` as Slicer expects; its parameter node is tagged ``TransferSeg``.
    """

    def __init__(self, scene=None, temporaryFolder=None):
        """``temporaryFolder``: where runs keep their files (the GUI passes Slicer's own temporary
        folder, which the user can set; None: the system's)."""
        self._scene = scene
        self.moduleName = MODULE_NAME
        self.temporaryFolder = temporaryFolder

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # --- parameter node (as ScriptedLoadableModuleLogic.getParameterNode, singleton) --------
    def getParameterNode(self):
        node = self.scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(self.scene.GenerateUniqueName(self.moduleName))
            node = self.scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != self.moduleName:  # restored after a scene close
            node.SetAttribute("ModuleName", self.moduleName)
        return node

    # --- models and devices -----------------------------------------------------------------
    @staticmethod
    def installedModels(userFolder=None) -> list:
        """Cards of every model, read afresh (a rescan): those in ``userFolder`` (e.g. where the user saves
        models they trained) first, then the installed ones (``$TRANSFERSEG_MODELS``, then the shipped ones).
        A model name found twice is the first one's; a file there that is no model card is skipped.  Each
        card's ``_path`` is the card file: a run is started from it."""
        cards, seen = [], set()
        folder = Path(userFolder).expanduser() if userFolder else None
        if folder is not None and folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                try:
                    card = read_card(path)
                except TransferSegError as e:
                    logging.info(f"TransferSeg: {path} is not a model card: {e}")
                    continue
                if card["name"] not in seen:
                    seen.add(card["name"])
                    cards.append({**card, "_path": str(path)})
        return cards + [card for card in list_models() if card["name"] not in seen]

    @staticmethod
    def modelSummary(card: dict) -> str:
        """One line for a model: its method (and the views' networks), task, labels and description."""
        method = method_of(card)
        specs = component_specs(card)
        if method["name"] == "multiview":
            views = ", ".join(f"{v} {specs[v]['architecture']['name']}" for v in VIEW_NAMES if v in specs)
            how = f"multi-view ({views}; fusion {method['config'].get('fusion', 'vfn')})"
        else:
            how = ", ".join(spec["architecture"]["name"] for spec in specs.values())
        labels = ", ".join(seg["name"] for seg in card.get("labels", []))
        task = "lesion heatmap and detections" if card.get("task") == "heatmap" else "segmentation"
        text = f"{card['name']} v{card['version']}: {task} of {labels}; {how}."
        if card.get("description"):
            text += " " + card["description"]
        return text

    @staticmethod
    def isMultiview(card: dict | None) -> bool:
        return bool(card) and method_of(card)["name"] == "multiview"

    @staticmethod
    def gpus(timeout: float = 5.0) -> list:
        """``[(index, name, memory_mib)]`` of the NVIDIA GPUs ``nvidia-smi`` reports (:func:`query_gpus`)."""
        return query_gpus(timeout)

    # --- the parameter node's choices -----------------------------------------------------------
    @staticmethod
    def repairChoices(parameterNode, choices: dict) -> list:
        """Reset each parameter whose value is not one of its choices to its default.

        ``choices``: name -> (allowed values, default).  A saved scene may name a model that is not
        installed here; Slicer's combo box connector raises on a value it does not list, so the GUI
        repairs the node before connecting it.  Returns ``[(name, old value, new value)]``.
        """
        repaired = [(name, parameterNode.GetParameter(name), default)
                    for name, (allowed, default) in choices.items()
                    if parameterNode.HasParameter(name) and parameterNode.GetParameter(name) not in allowed]
        if repaired:
            wasModifying = parameterNode.StartModify()  # one Modified event for all of them
            for name, _, default in repaired:
                parameterNode.SetParameter(name, str(default))
            parameterNode.EndModify(wasModifying)
        return repaired

    @staticmethod
    def displayParameters(parameterNode) -> dict:
        """The values of the display parameters (:data:`DISPLAY_PARAMETERS`), as the node stores them:
        the GUI applies display changes only when these changed."""
        return {name: parameterNode.GetParameter(name) for name in DISPLAY_PARAMETERS}

    # --- running ----------------------------------------------------------------------------
    def startSegmentation(self, inputNode, model: str, device: str = "auto", roiNode=None, fusion=None,
                          python: str | None = None, outputSegmentation=None, outputDetections=None) -> SegmentJob:
        """Start a run in a child process and return its job (poll it).  ``model``: a name or a card's path.
        ``outputSegmentation``: a segmentation node a segmentation model writes into; ``outputDetections``: a
        point list a detection model writes into (None: a new one).  Invalid input raises
        :class:`TransferSegError` before any process starts."""
        return SegmentJob(self, inputNode, model, device=device, roi_node=roiNode, fusion=fusion, python=python,
                          output_segmentation=outputSegmentation, output_detections=outputDetections)

    # --- the scene --------------------------------------------------------------------------
    def importResult(self, inputNode, folder, result: dict, card: dict) -> TransferSegOutputs:
        """Put every file a run wrote (``result["files"]``) into the scene, all of it or nothing, and wait
        for it (a job does the same without waiting: :class:`ResultImport`)."""
        importer = ResultImport(self, inputNode, folder, result, card)
        while not importer.step():
            importer.wait()
        return importer.outputs

    def readSegmentation(self, path: Path, name: str, inputNode, card: dict):
        """The model's .seg.nrrd through Slicer's own reader; names, colours and terminology from the card."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        storage = slicer.vtkMRMLSegmentationStorageNode()  # not added to the scene: no link to a temp file
        storage.SetFileName(str(path))
        try:
            if not storage.ReadData(node):
                raise TransferSegError("Slicer could not read the segmentation the model wrote")
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
            segmentation = node.GetSegmentation()
            for n in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(n)
                described = next((s for s in card.get("labels", []) if int(s["label"]) == segment.GetLabelValue()),
                                 None)
                if described is None:
                    continue
                segment.SetName(described["name"])
                segment.SetTag(LABEL_VALUE_TAG, str(int(described["label"])))
                segment.SetColor(*[float(c) for c in described["color"]])
                if described.get("terminology"):
                    segment.SetTerminology(terminology_string(described["terminology"]))
        except Exception:
            remove_nodes(self.scene, [node])
            raise
        return node

    def viewSegmentation(self, labels, view: str, reference: Volume, inputNode, card: dict):
        """One view network's label map (:func:`read_view_labels`), as outlines in its tint."""
        tint = np.asarray(VIEW_TINTS[view])
        segments = [dict(s, name=f"{s['name']} ({view})",
                         color=list(0.5 * np.asarray(s["color"], float) + 0.5 * tint)) for s in card["labels"]]
        node = add_segmentation_node(self.scene, labels, reference, segments,
                                     f"{inputNode.GetName()} TransferSeg {view}", reference_node=inputNode)
        display = node.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(1)
        display.SetVisibility3D(False)
        return node

    def _colorNodeID(self, candidates) -> str | None:
        for node_id in candidates:
            if self.scene.GetNodeByID(node_id) is not None:
                return node_id
        return None

    def scalarOverlay(self, image, name: str, reference: Volume, colors, lower: float):
        """A probability volume (:func:`read_scalar_output`: in [0, 1], or × 255 when stored as uint8) on
        ``reference``'s grid (the input's, or a heatmap's working grid), coloured, transparent below ``lower``.  The node takes ``image`` over, in its own type."""
        scale = 255.0 if image.GetScalarType() == vtk.VTK_UNSIGNED_CHAR else 1.0
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        try:
            set_geometry(node, reference)
            node.CreateDefaultDisplayNodes()  # before the voxels: no automatic window/level pass over them
            display = node.GetDisplayNode()
            color = self._colorNodeID(colors)
            if color:
                display.SetAndObserveColorNodeID(color)
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0.0, scale)
            display.SetAutoThreshold(False)
            display.SetApplyThreshold(True)  # below the threshold the foreground is transparent
            display.SetThreshold(lower * scale, max(scale, float(image.GetPointData().GetScalars().GetRange()[1])))
            node.SetAndObserveImageData(image)  # taken over, not copied
        except Exception:
            remove_nodes(self.scene, [node])
            raise
        return node

    def addDetections(self, path: Path, name: str, card: dict):
        """A locked point list, one point per detection at its RAS position, labelled with its confidence, after
        its kind when a model finds several (:func:`results.point_label`: "mass 0.58", "calc 1.00")."""
        detections = json.loads(path.read_text(encoding="utf-8"))["detections"]
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        try:
            node.CreateDefaultDisplayNodes()
            for n, d in enumerate(detections, 1):
                index = node.AddControlPoint(*[float(v) for v in d["position_ras"]], results.point_label(d))
                kind = str(d.get("kind") or "lesion").replace("_", " ")
                node.SetNthControlPointDescription(index, f"detection {n} ({kind}): confidence {d['confidence']:.4f}, "
                                                          f"box (k, j, i) {d['box_kji']}")
            node.SetAttribute("TransferSeg.Confidences", json.dumps([float(d["confidence"]) for d in detections]))
            node.SetLocked(True)
            color = next((s["color"] for s in card.get("labels", [])), (1.0, 0.85, 0.1))
            node.GetDisplayNode().SetSelectedColor(*[float(c) for c in color])
            node.GetDisplayNode().SetColor(*[float(c) for c in color])
        except Exception:
            remove_nodes(self.scene, [node])
            raise
        return node

    def findingsTable(self, rows: list, name: str, detections: bool = False, report: dict | None = None):
        """A table node listing a run's findings: :func:`results.report_rows` of the run's ``report``
        (result.json's "lesions"), or without one :func:`results.segment_rows` or :func:`results.detection_rows`."""
        node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        try:
            results.fill_findings_table(node, rows, detections, report)
        except Exception:
            remove_nodes(self.scene, [node])
            raise
        return node

    def jumpToRow(self, tableNode, viewRow: int):
        """Centre every slice view on the finding in row ``viewRow`` of a table view showing ``tableNode``;
        returns the RAS position, None for a row without one (e.g. the header)."""
        position = results.row_position(tableNode, results.table_row(tableNode, viewRow)) if alive(tableNode) else None
        if position is not None:
            results.jump_slices(self.scene, position)
        return position

    @staticmethod
    def show3D(segmentationNode, visible: bool = True) -> bool:
        """Show the segmentation in 3D (its closed surface, made if missing) or hide it there."""
        return results.show_3d(segmentationNode, visible)

    def placeUnderStudy(self, inputNode, nodes) -> None:
        """Parent each node under the input's study (or its parent item) in the subject hierarchy."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if sh is None:
            return
        inputItem = sh.GetItemByDataNode(inputNode)
        parent = sh.GetItemParent(inputItem) if inputItem else sh.GetSceneItemID()
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, parent)
            else:
                sh.CreateItem(parent, node)

    # --- display ----------------------------------------------------------------------------
    def _sliceCompositeNodes(self) -> list:
        return [self.scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
                for n in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]

    def setSliceLayers(self, background=None, foreground=None, foregroundOpacity: float | None = None) -> None:
        """Background / foreground volume and foreground opacity in every slice view."""
        for composite in self._sliceCompositeNodes():
            if background is not None:
                composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            if foregroundOpacity is not None:
                composite.SetForegroundOpacity(float(foregroundOpacity))

    def showResult(self, inputNode, outputs: TransferSegOutputs, overlayOpacity: float = 0.5) -> None:
        """The input as background, the heatmap or the disagreement as foreground, the fused
        segmentation filled, the view overlays as outlines."""
        if outputs.segmentation is not None:
            outputs.segmentation.GetDisplayNode().SetOpacity2DFill(0.4)
        overlay = outputs.heatmap or outputs.disagreement
        self.setSliceLayers(inputNode, overlay, overlayOpacity if overlay is not None else None)

    @staticmethod
    def setViewOverlayVisible(outputs: TransferSegOutputs, view: str, visible: bool) -> None:
        node = outputs.views.get(view)
        if alive(node) and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(bool(visible))

    def setOverlay(self, overlayNode, visible: bool, opacity: float) -> None:
        """Show or hide a scalar overlay (disagreement, heatmap) as the foreground, with its opacity."""
        if not alive(overlayNode):
            return
        for composite in self._sliceCompositeNodes():
            current = composite.GetForegroundVolumeID()
            if visible:
                composite.SetForegroundVolumeID(overlayNode.GetID())
                composite.SetForegroundOpacity(float(opacity))
            elif current == overlayNode.GetID():
                composite.SetForegroundVolumeID(None)

    @staticmethod
    def confidences(markupsNode) -> list:
        return json.loads(markupsNode.GetAttribute("TransferSeg.Confidences") or "[]")

    @classmethod
    def setConfidenceThreshold(cls, markupsNode, threshold: float) -> int:
        """Show the detections with confidence ≥ ``threshold``, hide the rest; returns how many show."""
        shown = 0
        if not alive(markupsNode):
            return shown
        for n, confidence in enumerate(cls.confidences(markupsNode)[:markupsNode.GetNumberOfControlPoints()]):
            visible = confidence >= threshold
            markupsNode.SetNthControlPointVisibility(n, visible)
            shown += visible
        return shown

    # --- export -----------------------------------------------------------------------------
    EXPORT_SUFFIXES = {"labelmap-nrrd": ".nrrd", "labelmap-nifti": ".nii.gz", "segmentation": ".seg.nrrd"}

    def exportPath(self, segmentationNode, folder, kind: str) -> Path:
        """Where :meth:`export` writes ``kind`` (labelmap-nrrd, labelmap-nifti, segmentation)."""
        if kind not in self.EXPORT_SUFFIXES:
            raise TransferSegError(f"unknown export {kind!r}; one of {', '.join(self.EXPORT_SUFFIXES)}")
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in segmentationNode.GetName()).strip("._")
        if kind.startswith("labelmap"):
            stem += "-labels"
        return Path(folder) / f"{stem or 'segmentation'}{self.EXPORT_SUFFIXES[kind]}"

    def export(self, segmentationNode, referenceNode, folder, kind: str, overwrite: bool = False) -> Path:
        """Write the segmentation as a label map (.nrrd / .nii.gz, the card's label values, on the
        reference volume's grid) or as a .seg.nrrd, atomically.  An existing file is replaced only
        with ``overwrite`` (the GUI asks first)."""
        # SimpleITK (through TransferSegLib.io) loads on the first export, not when Slicer starts
        from TransferSegLib.io import atomic_output, save_labelmap

        if segmentationNode is None:
            raise TransferSegError("there is no segmentation to export; run Segment first")
        path = self.exportPath(segmentationNode, folder, kind)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists")
        if kind == "segmentation":
            with atomic_output(path) as tmp:
                storage = slicer.vtkMRMLSegmentationStorageNode()
                storage.SetFileName(str(tmp))
                storage.SetUseCompression(True)
                if not storage.WriteData(segmentationNode):
                    raise TransferSegError(f"Slicer could not write {path}")
            return path
        labels = self.labelmapArray(segmentationNode, referenceNode)
        reference = Volume(np.zeros(labels.shape, np.uint8), **node_geometry(referenceNode))
        return save_labelmap(labels, reference, path)

    def labelmapArray(self, segmentationNode, referenceNode) -> np.ndarray:
        """The segmentation as a label map (k, j, i) on ``referenceNode``'s grid, each segment with
        its own label value (the model card's), later segments drawn over earlier ones."""
        # Slicer adds the Segmentations module's classes once that module has loaded (after this file is imported)
        from slicer import vtkSegmentation, vtkSlicerSegmentationsModuleLogic

        segmentation = segmentationNode.GetSegmentation()
        ids = vtk.vtkStringArray()
        values = []
        for n in range(segmentation.GetNumberOfSegments()):
            ids.InsertNextValue(segmentation.GetNthSegmentID(n))
            values.append(segment_label_value(segmentation.GetNthSegment(n), n + 1))
        before = {self.scene.GetNthNode(n).GetID() for n in range(self.scene.GetNumberOfNodes())}
        labelmapNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmapNode, referenceNode, vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                raise TransferSegError("Slicer could not turn the segmentation into a label map")
            exported = slicer.util.arrayFromVolume(labelmapNode)
            lookup = np.zeros(len(values) + 1, np.uint16)
            lookup[1:] = values
            labels = lookup[exported]
        finally:  # the label map and what the export added for it (display node, colour table)
            added = [self.scene.GetNthNode(n) for n in range(self.scene.GetNumberOfNodes())]
            remove_nodes(self.scene, [labelmapNode] + [n for n in added if n.GetID() not in before])
        return labels.astype(np.uint8) if labels.max(initial=0) <= 255 else labels
