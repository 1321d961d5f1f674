"""Nodes in the scene: a volume node to and from a :class:`~TransferSegLib.volume.Volume` with its exact
geometry, segmentations with named, coloured segments and terminology, and the terminology context."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import get_vtk_array_type, vtk_to_numpy

from TransferSegLib.terminology import TerminologyContext, entry_from_card, entry_to_string, read_context
from TransferSegLib.volume import TransferSegError, Volume, check_geometry

#: segment tag holding the model card's label value of a segment (exported label maps use it)
LABEL_VALUE_TAG = "TransferSeg.LabelValue"
#: our terminology context (liver, neoplasm, lesion): Slicer's General Anatomy list has no Neoplasm.
#: Resources/ sits beside this package in the source tree, the build tree and the installed module.
TERMINOLOGY_FILE = Path(__file__).resolve().parents[1] / "Resources" / "TransferSeg.term.json"


@functools.lru_cache(maxsize=1)
def terminology_context() -> TerminologyContext | None:
    """The shipped context (the GUI loads the same file into Slicer at startup), None if unreadable."""
    try:
        return read_context(TERMINOLOGY_FILE)
    except TransferSegError as e:  # the segments then name Slicer's General Anatomy list
        logging.warning(f"TransferSeg: {e}")
        return None


def terminology_string(terminology) -> str:
    """Slicer's TerminologyEntry string for a model card's terminology, naming our context where it
    holds the segment's category and type (so Slicer resolves e.g. Neoplasm)."""
    return entry_to_string(entry_from_card(terminology, terminology_context()))


# --------------------------------------------------------------------------------------
# Volumes and segmentations
# --------------------------------------------------------------------------------------
def check_input_node(volume_node) -> tuple:
    """``(shape (k, j, i), geometry)`` of a scalar volume node a model can run on, else :class:`TransferSegError`.
    Reads no voxel: cheap enough for the GUI thread."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise TransferSegError("select an input volume that holds image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise TransferSegError(f"'{volume_node.GetName()}' is a colour or vector volume; select a grey-scale volume")
    if volume_node.GetParentTransformNode() is not None:
        # The network sees voxels; a non-linear or unhardened transform would silently move the output.
        raise TransferSegError(
            f"'{volume_node.GetName()}' is under a transform; harden the transform (Transforms module) first"
        )
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if 0 in shape:
        raise TransferSegError(f"'{volume_node.GetName()}' holds no voxels; select an input volume that holds image data")
    geometry = node_geometry(volume_node)
    check_geometry(np.asarray(geometry["spacing"]), geometry["directions"], np.asarray(geometry["origin"]))
    return shape, geometry


def volume_from_node(volume_node) -> Volume:
    """A :class:`Volume` copy of a scalar volume node: array (k, j, i), spacing, directions, origin."""
    _, geometry = check_input_node(volume_node)
    array = np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True)
    volume = Volume(array, **geometry)
    volume.check_finite()
    return volume


def grid_of(volume_node) -> Volume:
    """The node's grid as a :class:`Volume` whose voxels are one broadcast zero (no memory): outputs are
    checked against it and placed on it."""
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    return Volume(np.broadcast_to(np.float32(0), shape), **node_geometry(volume_node))


def node_geometry(volume_node) -> dict:
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    return dict(spacing=tuple(volume_node.GetSpacing())[::-1], directions=directions,
                origin=tuple(volume_node.GetOrigin()))


def set_geometry(node, volume: Volume) -> None:
    node.SetSpacing(*volume.spacing[::-1])
    node.SetOrigin(*volume.origin)
    node.SetIJKToRASDirections(volume.directions)


def add_volume_node(scene, volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode",
                    array: np.ndarray | None = None):
    """Add a volume node holding ``array`` (default ``volume.array``) on ``volume``'s exact geometry."""
    node = scene.AddNewNodeByClass(class_name, name)
    try:
        set_geometry(node, volume)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array if array is None else array))
    except Exception:
        scene.RemoveNode(node)  # no half-built node is left behind
        raise
    return node


def remove_nodes(scene, nodes) -> None:
    """Remove nodes together with their display and storage nodes."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        for kind in ("Display", "Storage"):
            if hasattr(node, f"GetNumberOf{kind}Nodes"):
                for n in range(getattr(node, f"GetNumberOf{kind}Nodes")() - 1, -1, -1):
                    child = getattr(node, f"GetNth{kind}Node")(n)
                    if child is not None and child.GetScene() is not None:
                        scene.RemoveNode(child)
        scene.RemoveNode(node)


def new_image(shape, dtype, oriented: bool = False):
    """``(image, voxels)``: a new vtkImageData (a vtkOrientedImageData with ``oriented``) of ``shape`` (k, j, i)
    and ``dtype``, and a numpy view of its voxels: filling the view fills the image, with no copy."""
    image = slicer.vtkOrientedImageData() if oriented else vtk.vtkImageData()
    image.SetDimensions(*reversed(shape))
    image.AllocateScalars(get_vtk_array_type(np.dtype(dtype).newbyteorder("=")), 1)
    return image, vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def add_segmentation_node(scene, labels, reference: Volume, segments: list, name: str, reference_node=None):
    """A segmentation node with one named, coloured segment per label value (0 = background).

    ``labels``: a (k, j, i) array, or a vtkOrientedImageData whose extent lies in ``reference``'s grid
    (e.g. :func:`read_view_labels`' box), which the segmentation then shares: no full-size copy is made.
    ``segments`` uses the model-card form: ``[{"name", "label", "color", optional "terminology"}]``;
    a segment whose label is absent from ``labels`` is still created, empty.  If anything fails,
    the node is removed again: no half-built node is left in the scene.
    """
    # Slicer adds the Segmentations module's classes once that module has loaded (after this file is imported)
    from slicer import vtkSlicerSegmentationsModuleLogic

    if isinstance(labels, vtk.vtkImageData):
        image, extent = labels, labels.GetExtent()
        if not all(0 <= extent[2 * n] and extent[2 * n + 1] < reference.shape[2 - n] for n in range(3)):
            raise TransferSegError(f"the label map's extent {extent} lies outside the volume's {reference.shape}")
    else:
        labels, image = np.asarray(labels), None
        if labels.shape != reference.shape:
            raise TransferSegError(f"label map shape {labels.shape} does not match the volume's {reference.shape}")
    # Validate every segment description before building anything.
    described = {}
    for seg in segments:
        terminology = seg.get("terminology")
        described[int(seg["label"])] = (str(seg["name"]), [float(c) for c in seg["color"]],
                                        terminology_string(terminology) if terminology else None)
    if image is None:
        image, voxels = new_image(labels.shape, np.uint8 if labels.max(initial=0) <= 255 else np.uint16, oriented=True)
        voxels[...] = labels
    image.SetGeometryFromImageToWorldMatrix(_matrix(reference.ijk_to_ras))
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        seg_node.CreateDefaultDisplayNodes()
        if reference_node is not None:
            seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        # The image overload shares the voxels (the label-map-node overload deep-copies them first).
        if not vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, seg_node, name, ""):
            raise TransferSegError("Slicer could not import the label map as a segmentation")
        segmentation = seg_node.GetSegmentation()
        present = {segmentation.GetNthSegment(n).GetLabelValue(): segmentation.GetNthSegmentID(n)
                   for n in range(segmentation.GetNumberOfSegments())}
        for label, (seg_name, _, _) in described.items():
            if label not in present:  # absent from the map: keep it, empty
                present[label] = segmentation.AddEmptySegment("", seg_name)
        for label, (seg_name, color, terminology) in described.items():
            segment = segmentation.GetSegment(present[label])
            segment.SetName(seg_name)
            segment.SetColor(*color)
            segment.SetTag(LABEL_VALUE_TAG, str(label))  # an export may renumber label values
            if terminology:
                segment.SetTerminology(terminology)
        return seg_node
    except Exception:
        remove_nodes(scene, [seg_node])
        raise


def segment_array(seg_node, segment_name: str, reference: Volume) -> np.ndarray:
    """The binary mask (k, j, i) of one segment, on ``reference``'s grid (for tests and export)."""
    segmentation = seg_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise TransferSegError(f"no segment named '{segment_name}'")
    labelmap = segmentation.GetSegment(segment_id).GetRepresentation("Binary labelmap")
    full = np.zeros(reference.shape, dtype=bool)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return full  # an empty segment has no grid of its own
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    if not np.allclose(image_to_world, reference.ijk_to_ras, atol=1e-6):
        raise TransferSegError("the segment does not lie on the reference volume's grid")
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
    full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = (
        values == segmentation.GetSegment(segment_id).GetLabelValue())
    return full


def segment_label_value(segment, default: int) -> int:
    """The model card's label value of a segment (its tag), else Slicer's own, else ``default``."""
    tag = vtk.mutable("")
    if segment.GetTag(LABEL_VALUE_TAG, tag) and str(tag).isdigit():
        return int(str(tag))
    return segment.GetLabelValue() if segment.GetLabelValue() > 0 else default
