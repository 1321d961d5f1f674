"""Qt-free scene logic of the TransferSeg module: MRML nodes in, MRML nodes out.

Imports no qt, ctk or slicer.app, so it runs (and is tested) on slicer-core's real MRML scene
without the desktop.  The GUI (TransferSeg.py) only reads the parameter node, calls these
functions and shows progress.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from TransferSegLib.volume import TransferSegError, Volume


def volume_from_node(volume_node) -> Volume:
    """A :class:`Volume` copy of a scalar volume node: array (k, j, i), spacing, directions, origin."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise TransferSegError("select an input volume that holds image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise TransferSegError(f"'{volume_node.GetName()}' is a colour or vector volume; select a grey-scale volume")
    if volume_node.GetParentTransformNode() is not None:
        # The network sees voxels; a non-linear or unhardened transform would silently move the output.
        raise TransferSegError(
            f"'{volume_node.GetName()}' is under a transform; harden the transform (Transforms module) first"
        )
    array = np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True)
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    volume = Volume(array, spacing=tuple(volume_node.GetSpacing())[::-1], directions=directions,
                    origin=volume_node.GetOrigin())
    volume.check_finite()
    return volume


def _set_geometry(node, volume: Volume) -> None:
    node.SetSpacing(*volume.spacing[::-1])
    node.SetOrigin(*volume.origin)
    node.SetIJKToRASDirections(volume.directions)


def add_volume_node(scene, volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode",
                    array: np.ndarray | None = None):
    """Add a volume node holding ``array`` (default ``volume.array``) on ``volume``'s exact geometry."""
    node = scene.AddNewNodeByClass(class_name, name)
    try:
        _set_geometry(node, volume)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array if array is None else array))
    except Exception:
        scene.RemoveNode(node)  # no half-built node is left behind
        raise
    return node


def _remove_nodes(scene, nodes) -> None:
    """Remove nodes together with their display and storage nodes."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
            if hasattr(node, getter):
                kind = "Display" if "Display" in getter else "Storage"
                for n in range(getattr(node, getter)() - 1, -1, -1):
                    child = getattr(node, f"GetNth{kind}Node")(n)
                    if child is not None:
                        scene.RemoveNode(child)
        scene.RemoveNode(node)


def add_segmentation_node(scene, labels: np.ndarray, reference: Volume, segments: list, name: str,
                          reference_node=None):
    """A segmentation node with one named, coloured segment per label value (0 = background).

    ``segments`` uses the model-card form: ``[{"name", "label", "color", optional "terminology"}]``;
    a segment whose label is absent from ``labels`` is still created, empty.  If anything fails,
    every node created here is removed again: no half-built node is left in the scene.
    """
    from slicer import vtkSlicerSegmentationsModuleLogic
    from slicerio.segmentation import terminology_entry_to_string

    from TransferSegLib.io import _terminology_entry

    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise TransferSegError(f"label map shape {labels.shape} does not match the volume's {reference.shape}")
    created = []
    try:
        # Validate every segment description before building anything.
        described = []
        for seg in segments:
            terminology = seg.get("terminology")
            described.append((str(seg["name"]), int(seg["label"]), [float(c) for c in seg["color"]],
                              terminology_entry_to_string(_terminology_entry(terminology)) if terminology else None))
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name + " colors")
        created.append(colors)
        colors.SetTypeToUser()
        colors.SetNumberOfColors(max([label for _, label, _, _ in described], default=0) + 1)
        for seg_name, label, color, _ in described:
            colors.SetColor(label, seg_name, *color, 1.0)
        labelmap_node = add_volume_node(scene, reference, name + " labels", "vtkMRMLLabelMapVolumeNode",
                                        labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16))
        created.append(labelmap_node)
        labelmap_node.CreateDefaultDisplayNodes()
        labelmap_node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        created.append(seg_node)
        seg_node.CreateDefaultDisplayNodes()
        if reference_node is not None:
            seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        if not vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, seg_node):
            raise TransferSegError("Slicer could not import the label map as a segmentation")
        segmentation = seg_node.GetSegmentation()
        for seg_name, label, color, terminology in described:
            segment_id = segmentation.GetSegmentIdBySegmentName(seg_name)
            if not segment_id:  # the label is absent from the map: keep an empty segment
                segment_id = segmentation.AddEmptySegment("", seg_name)
            segment = segmentation.GetSegment(segment_id)
            segment.SetColor(*color)
            if terminology:
                segment.SetTag("TerminologyEntry", terminology)
        _remove_nodes(scene, [labelmap_node, colors])
        return seg_node
    except Exception:
        _remove_nodes(scene, created)
        raise


def segment_array(seg_node, segment_name: str, reference: Volume) -> np.ndarray:
    """The binary mask (k, j, i) of one segment, on ``reference``'s grid (for tests and export)."""
    from vtk.util.numpy_support import vtk_to_numpy

    segmentation = seg_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise TransferSegError(f"no segment named '{segment_name}'")
    labelmap = segmentation.GetSegment(segment_id).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    if not np.allclose(image_to_world, reference.ijk_to_ras, atol=1e-6):
        raise TransferSegError("the segment does not lie on the reference volume's grid")
    full = np.zeros(reference.shape, dtype=bool)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0]:
        return full
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
    full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = (
        values == segmentation.GetSegment(segment_id).GetLabelValue())
    return full


# --------------------------------------------------------------------------------------
# Segmenting in a child process (the GUI stays responsive; Cancel kills the process tree)
# --------------------------------------------------------------------------------------
def parse_progress_line(line: str):
    """``"PROGRESS 0.4200 inference"`` → ``(0.42, "inference")``; any other line → None."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != "PROGRESS":
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), (parts[2] if len(parts) > 2 else "")


class SegmentJob:
    """One segmentation run: Idle → Segmenting → Importing → Done | Cancelled | Failed.

    The network runs in ``python -m TransferSegLib.cli segment … --progress-lines``, a child
    process that never imports Slicer; :meth:`poll` (called from a GUI timer, or :meth:`wait`)
    reads its progress and, when it has finished, imports ``segmentation.seg.nrrd`` as a
    segmentation node under the input's geometry.  :meth:`cancel` stops the whole process group;
    a cancelled or failed job leaves no node in the scene and no file behind.
    """

    IDLE, SEGMENTING, IMPORTING, DONE, CANCELLED, FAILED = (
        "Idle", "Segmenting", "Importing", "Done", "Cancelled", "Failed")

    def __init__(self, scene, input_node, model: str, device: str = "auto", python: str | None = None):
        import sys

        self.scene, self.input_node, self.model, self.device = scene, input_node, model, device
        self.python = python or sys.executable
        self.state, self.fraction, self.stage, self.message = self.IDLE, 0.0, "", ""
        self.segmentation_node = None
        self.result = None
        self._process = None
        self._lines = None
        self._stderr = []
        self._folder = None

    def start(self) -> None:
        import os
        import queue
        import subprocess
        import tempfile
        import threading
        from pathlib import Path

        from TransferSegLib.io import save_volume

        volume = volume_from_node(self.input_node)  # validated before any process starts
        self._folder = Path(tempfile.mkdtemp(prefix="transferseg-"))
        input_path = save_volume(volume, self._folder / "input.nrrd")
        library_root = str(Path(__import__("TransferSegLib").__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [library_root, env.get("PYTHONPATH")]))
        command = [self.python, "-m", "TransferSegLib.cli", "segment", str(input_path), "-o",
                   str(self._folder / "out"), "--model", self.model, "--device", self.device, "--progress-lines"]
        env["PYTHONIOENCODING"] = "utf-8"
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         encoding="utf-8", errors="replace", env=env, start_new_session=True)
        self._lines = queue.Queue()

        def pump(stream, sink):
            for line in stream:
                sink(line.rstrip("\n"))

        threading.Thread(target=pump, args=(self._process.stdout, self._lines.put), daemon=True).start()
        threading.Thread(target=pump, args=(self._process.stderr, self._stderr.append), daemon=True).start()
        self.state, self.stage = self.SEGMENTING, "starting"

    def poll(self) -> str:
        """Advance the state machine; returns the state."""
        import queue

        if self.state != self.SEGMENTING:
            return self.state
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            parsed = parse_progress_line(line)
            if parsed:
                self.fraction, self.stage = parsed
        code = self._process.poll()
        if code is None:
            return self.state
        self._process.wait()
        if code == 0:
            self._import()
        elif code in (130, -2, -15, -9):
            self._finish(self.CANCELLED, "cancelled")
        else:
            errors = [ln for ln in self._stderr if ln.strip()]
            self._finish(self.FAILED, errors[-1] if errors else f"segmentation process exited with code {code}")
        return self.state

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> str:
        import time

        deadline = time.monotonic() + timeout
        while self.poll() == self.SEGMENTING:
            if time.monotonic() > deadline:
                self.cancel()
                self._finish(self.FAILED, f"timed out after {timeout:.0f} s")
                break
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        import os
        import signal

        if self.state != self.SEGMENTING:
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=10)
        except ProcessLookupError:
            pass
        except Exception:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._finish(self.CANCELLED, "cancelled")

    def _import(self) -> None:
        import json

        self.state, self.stage = self.IMPORTING, "importing"
        out = self._folder / "out"
        node = storage = None
        try:
            self.result = json.loads((out / "result.json").read_text(encoding="utf-8"))
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                f"{self.input_node.GetName()} {self.result['model']['name']}")
            storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            storage.SetFileName(str(out / "segmentation.seg.nrrd"))
            if not storage.ReadData(node):
                raise TransferSegError("Slicer could not read the segmentation the model wrote")
            self.scene.RemoveNode(storage)
            storage = None
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.input_node)
            self.segmentation_node = node
            self._finish(self.DONE, "done")
            self.fraction = 1.0
        except Exception as e:
            _remove_nodes(self.scene, [node, storage])
            self._finish(self.FAILED, f"importing the result failed: {e}")

    def _finish(self, state: str, message: str) -> None:
        import shutil

        self.state, self.message = state, message
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
