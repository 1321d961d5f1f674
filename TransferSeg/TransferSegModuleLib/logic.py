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
  detection, labelled with its confidence) for heatmap models (DBT).
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import struct
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from TransferSegLib.terminology import TerminologyContext, entry_from_card, entry_to_string, read_context
from TransferSegLib.volume import TransferSegError, Volume, check_geometry

MODULE_NAME = "TransferSeg"
VIEW_NAMES = ("axial", "coronal", "sagittal")
#: each view's outline tint (mixed half and half with the segment's own colour)
VIEW_TINTS = {"axial": (1.0, 1.0, 0.0), "coronal": (0.0, 1.0, 1.0), "sagittal": (1.0, 0.0, 1.0)}
#: colour maps, first one present in the scene wins (the desktop loads the file-based ones)
DISAGREEMENT_COLORS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron",
                       "vtkMRMLColorTableNodeRainbow")
HEATMAP_COLORS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
FUSIONS = ("vfn", "vfn-noimage", "majority", "staple")
#: ``transferseg`` exit status for a cancelled run (SIGINT/SIGTERM handled between windows)
EXIT_INTERRUPTED = 130
#: segment tag holding the model card's label value of a segment (exported label maps use it)
LABEL_VALUE_TAG = "TransferSeg.LabelValue"
#: our terminology context (liver, neoplasm, lesion): Slicer's General Anatomy list has no Neoplasm.
#: Resources/ sits beside this package in the source tree, the build tree and the installed module.
TERMINOLOGY_FILE = Path(__file__).resolve().parents[1] / "Resources" / f"{MODULE_NAME}.term.json"
#: the parameters that only change how results are shown (the others must not touch the slice views)
DISPLAY_PARAMETERS = ("showAxial", "showCoronal", "showSagittal", "showOverlay", "overlayOpacity",
                      "confidenceThreshold")


# --------------------------------------------------------------------------------------
# Terminology
# --------------------------------------------------------------------------------------
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
    geometry = _geometry(volume_node)
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
    return Volume(np.broadcast_to(np.float32(0), shape), **_geometry(volume_node))


def _geometry(volume_node) -> dict:
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    return dict(spacing=tuple(volume_node.GetSpacing())[::-1], directions=directions,
                origin=tuple(volume_node.GetOrigin()))


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
    from vtk.util.numpy_support import get_vtk_array_type, vtk_to_numpy

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
        _remove_nodes(scene, [seg_node])
        raise


def segment_array(seg_node, segment_name: str, reference: Volume) -> np.ndarray:
    """The binary mask (k, j, i) of one segment, on ``reference``'s grid (for tests and export)."""
    from vtk.util.numpy_support import vtk_to_numpy

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


# --------------------------------------------------------------------------------------
# Voxels between the scene and the child's files: off the GUI thread, in their own type, no full-size copies
# --------------------------------------------------------------------------------------
#: numpy dtype name → NRRD type
NRRD_TYPES = {"int8": "signed char", "uint8": "uchar", "int16": "short", "uint16": "ushort", "int32": "int",
              "uint32": "uint", "int64": "longlong", "uint64": "ulonglong", "float32": "float", "float64": "double"}
#: NIfTI-1 datatype code → numpy dtype (without byte order)
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
#: bytes moved per step: a worker thread checks for Cancel this often, and a temporary is never larger
CHUNK_BYTES = 1 << 23
_LPS = np.array([-1.0, -1.0, 1.0])  # ITK files are LPS, Slicer's scene is RAS


class Stopped(Exception):
    """A worker thread saw its stop flag (the user cancelled)."""


class BackgroundCall:
    """``function(*args, stop)`` on a worker thread; the GUI thread polls :attr:`done` and takes
    :meth:`result` (which raises the function's error).  ``stop`` is a :class:`threading.Event` the
    function checks between chunks."""

    def __init__(self, function, *args):
        self.stop = threading.Event()
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self._thread.start()

    def _run(self, function, args) -> None:
        try:
            self._result = function(*args, self.stop)
        except BaseException as e:  # handed to the GUI thread by result()
            self._error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


def nrrd_header(shape, dtype, geometry: dict) -> bytes:
    """The header of an uncompressed NRRD holding (k, j, i) voxels of ``dtype`` in this machine's byte order,
    on ``geometry`` (``_geometry``'s form).  LPS, as Slicer and ITK write NRRD; every number as ``repr``
    writes it, which reads back to the same double."""
    spacing_ijk = geometry["spacing"][::-1]
    directions = np.asarray(geometry["directions"], dtype=np.float64)

    def vector(values) -> str:
        return "(" + ",".join(repr(float(v)) for v in values) + ")"

    dtype = np.dtype(dtype)
    lines = ["NRRD0004", f"type: {NRRD_TYPES[dtype.name]}", "dimension: 3", "space: left-posterior-superior",
             "sizes: " + " ".join(str(int(n)) for n in reversed(shape)),
             "space directions: " + " ".join(vector(_LPS * directions[:, n] * spacing_ijk[n]) for n in range(3)),
             "kinds: domain domain domain"]
    if dtype.itemsize > 1:
        lines.append(f"endian: {sys.byteorder}")
    lines += ["encoding: raw", "space origin: " + vector(_LPS * np.asarray(geometry["origin"], dtype=np.float64))]
    return ("\n".join(lines) + "\n\n").encode("ascii")


class NodeVoxels:
    """A volume node's own voxel buffer (a view, no copy) and what tells whether it changed since.

    Holding the image data and its scalars keeps the buffer alive even if the node gets new voxels or
    is deleted while a worker thread reads it."""

    def __init__(self, volume_node):
        from vtk.util.numpy_support import vtk_to_numpy

        self.name = volume_node.GetName()
        self.image = volume_node.GetImageData()
        self.scalars = self.image.GetPointData().GetScalars()
        self.modified = self.scalars.GetMTime()
        self.array = vtk_to_numpy(self.scalars).reshape(tuple(reversed(self.image.GetDimensions())))
        if self.array.dtype.name not in NRRD_TYPES:
            raise TransferSegError(f"'{self.name}' holds {self.array.dtype} voxels; convert it to a numeric type "
                                   "(e.g. Volumes module: Cast Scalar Volume) first")

    def changed(self, volume_node) -> bool:
        """Whether the node's voxels were replaced or edited (Slicer marks edited scalars Modified)."""
        return (volume_node is None or volume_node.GetImageData() is not self.image
                or self.image.GetPointData().GetScalars() is not self.scalars
                or self.scalars.GetMTime() != self.modified)


def write_input(voxels: NodeVoxels, geometry: dict, path: Path, stop: threading.Event) -> Path:
    """Write a node's voxels as they are (their own type, uncompressed) with exact geometry to ``path``,
    atomically: the child starts only on a complete file.  Runs on a worker thread; float voxels that
    are NaN or infinite are refused, as :meth:`Volume.check_finite` would."""
    from TransferSegLib.io import atomic_output

    flat = voxels.array.reshape(-1)
    step = max(1, CHUNK_BYTES // flat.itemsize)
    bad = 0
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(nrrd_header(voxels.array.shape, flat.dtype, geometry))
        for start in range(0, flat.size, step):
            if stop.is_set():
                raise Stopped()
            part = flat[start:start + step]
            if flat.dtype.kind == "f":
                bad += part.size - int(np.count_nonzero(np.isfinite(part)))
            f.write(memoryview(part).cast("B"))
        if bad:
            raise TransferSegError(f"'{voxels.name}' has {bad} voxel(s) that are NaN or infinite; repair or mask "
                                   "them (e.g. set them to the background value) and try again")
    return path


def _check_on_grid(name: str, size_ijk, spacing, origin, direction, reference: Volume) -> None:
    same = (tuple(size_ijk)[::-1] == tuple(reference.shape)
            and np.allclose(spacing, reference.spacing[::-1], rtol=1e-5, atol=1e-6)
            and np.allclose(_LPS * np.asarray(origin), reference.origin, atol=1e-4)
            and np.allclose(_LPS[:, None] * np.asarray(direction).reshape(3, 3), reference.directions, atol=1e-6))
    if not same:
        raise TransferSegError(f"{name} does not lie on the input volume's grid")


def _file_on_grid(path: Path, reference: Volume) -> int:
    """Check from its header alone that an output image lies exactly on ``reference``'s grid; returns its
    number of components."""
    import SimpleITK as sitk  # bundled with Slicer; imported when a run ends, not when the module loads

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise TransferSegError(f"{path.name} cannot be read ({str(e).strip().splitlines()[-1]})") from None
    _check_on_grid(path.name, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                   reference)
    return reader.GetNumberOfComponents()


def nifti_layout(path: Path):
    """``(dtype, components, first voxel byte)`` of a single-file NIfTI-1 whose voxels are stored as they
    are (no scl scaling; components one after the other, as ITK writes a vector image), or None: such a
    file is read through SimpleITK instead."""
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    endian = next((e for e in "<>" if len(head) == 348 and struct.unpack_from(e + "i", head, 0)[0] == 348), None)
    if endian is None or head[344:348] != b"n+1\0":
        return None
    dims = struct.unpack_from(endian + "8h", head, 40)
    datatype = struct.unpack_from(endian + "h", head, 70)[0]
    offset, slope, intercept = struct.unpack_from(endian + "3f", head, 108)
    if (datatype not in NIFTI_DTYPES or not 3 <= dims[0] <= 5 or (dims[0] >= 4 and dims[4] != 1)
            or slope not in (0.0, 1.0) or intercept != 0.0 or not offset >= 352):
        return None
    return np.dtype(endian + NIFTI_DTYPES[datatype]), (dims[5] if dims[0] == 5 else 1), int(offset)


class VoxelStream:
    """An output file's bytes from ``start`` on, read into the caller's buffers (a .gz file is decompressed
    as it is read: no full-size temporary)."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self._file = (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb")
        try:
            self._skip(start)
        except BaseException:
            self._file.close()
            raise

    def _skip(self, count: int) -> None:
        if not self.path.name.lower().endswith(".gz"):
            self._file.seek(count)
            return
        scratch = bytearray(min(count, CHUNK_BYTES))
        while count > 0:
            count -= self.read_into(memoryview(scratch)[:min(count, len(scratch))])

    def read_into(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        try:
            while got < len(view):
                n = self._file.readinto(view[got:])
                if not n:
                    raise EOFError("the file ends early")
                got += n
        except (OSError, EOFError, zlib.error) as e:
            raise TransferSegError(f"{self.path.name} cannot be read ({e}); the run's files are damaged") from None
        return got

    def close(self) -> None:
        self._file.close()


def _sitk_voxels(path: Path):
    """(image, voxels): a file SimpleITK reads, and a view into its image ((k, j, i) or (k, j, i, C)), valid
    while the image lives."""
    import SimpleITK as sitk  # bundled with Slicer; imported when a run ends, not when the module loads

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayViewFromImage(image)


def read_scalar_output(path: Path, reference: Volume, stop: threading.Event):
    """A one-component output image (disagreement, heatmap) as a new vtkImageData in the file's own type,
    its voxels decompressed straight into the image's buffer.  Checked to lie on ``reference``'s grid."""
    if _file_on_grid(path, reference) != 1:
        raise TransferSegError(f"{path.name} has several components; a single one was expected")
    layout = nifti_layout(path)
    if layout is None:  # not a plain NIfTI: SimpleITK reads it (one full-size copy more)
        _itk_image, voxels = _sitk_voxels(path)
        image, values = new_image(reference.shape, voxels.dtype)
        values[...] = voxels
    else:
        dtype, _, offset = layout
        image, values = new_image(reference.shape, dtype)
        flat = values.reshape(-1)
        step = max(1, CHUNK_BYTES // flat.itemsize)
        stream = VoxelStream(path, offset)
        try:
            for start in range(0, flat.size, step):
                if stop.is_set():
                    raise Stopped()
                stream.read_into(flat[start:start + step])
        finally:
            stream.close()
        if not dtype.isnative:
            values.byteswap(inplace=True)
    image.GetPointData().GetScalars().GetRange()  # computed here, not on the GUI thread: the display asks for it
    return image


def read_view_labels(path: Path, reference: Volume, stop: threading.Event):
    """A view network's label map from its class probabilities (K components, or one thresholded at half),
    as a uint8 vtkOrientedImageData of its non-empty box (:func:`non_empty_box`).  The K components are read side by side, chunk by chunk, and the
    argmax goes straight into the image: no int64 index array, no full-size probability array."""
    components = _file_on_grid(path, reference)
    labels = np.empty(reference.shape, np.uint8)
    flat = labels.reshape(-1)
    layout = nifti_layout(path)
    if layout is None:  # not a plain NIfTI: SimpleITK reads it (its probabilities stay in memory meanwhile)
        _itk_image, voxels = _sitk_voxels(path)
        voxels = voxels.reshape((-1, components))  # a view: voxel by voxel, the components side by side
        layout_dtype, streams = voxels.dtype, None
    else:
        layout_dtype, _, offset = layout
        # component c starts c voxel counts into the data: one stream per component, read in lockstep
        streams = []
    step = max(1, CHUNK_BYTES // (components * max(layout_dtype.itemsize, 8)))  # argmax makes an intp chunk
    half = 128 if layout_dtype == np.uint8 else 0.5
    try:
        if streams is not None:
            for c in range(components):
                streams.append(VoxelStream(path, offset + c * flat.size * layout_dtype.itemsize))
        chunk = np.empty((components, step), layout_dtype)
        for start in range(0, flat.size, step):
            if stop.is_set():
                raise Stopped()
            stop_at = min(start + step, flat.size)
            part = chunk[:, :stop_at - start]
            if streams is None:
                part[...] = voxels[start:stop_at].T
            else:
                for c, stream in enumerate(streams):
                    stream.read_into(part[c])
            if components > 1:
                flat[start:stop_at] = part.argmax(axis=0)
            else:
                np.greater_equal(part[0], half, out=flat[start:stop_at], casting="unsafe")
    finally:
        for stream in streams or []:
            stream.close()
    return non_empty_box(labels)


def non_empty_box(labels: np.ndarray):
    """The box of a label map that holds labels, as its own vtkOrientedImageData (its extent says where it
    lies; one zero voxel if there are none).  Slicer keeps a segment's voxels cropped like this anyway: the
    GUI thread then goes over the box only, and the full-size map is freed here."""
    from vtk.util.numpy_support import vtk_to_numpy

    along_k = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if along_k.size == 0:
        box = [0, 0, 0, 0, 0, 0]
    else:
        slab = labels[along_k[0]:along_k[-1] + 1]
        along_j, along_i = np.flatnonzero(slab.any(axis=(0, 2))), np.flatnonzero(slab.any(axis=(0, 1)))
        box = [int(along_i[0]), int(along_i[-1]), int(along_j[0]), int(along_j[-1]), int(along_k[0]), int(along_k[-1])]
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*box)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        box[5] - box[4] + 1, box[3] - box[2] + 1, box[1] - box[0] + 1)
    voxels[...] = labels[box[4]:box[5] + 1, box[2]:box[3] + 1, box[0]:box[1] + 1]
    return image


# --------------------------------------------------------------------------------------
# Running a model in a child process
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


def status_text(fraction: float, stage: str, multiview: bool) -> str:
    """What the status line says while the child runs: Initializing → view k/3 → Fusing → …"""
    stage = (stage or "").strip()
    if not stage or stage.startswith(("starting", "loading", "resampling")) and fraction < 0.04:
        return "Initializing"
    if stage.startswith("fusing"):
        return "Fusing"
    if multiview and 0.04 <= fraction < 0.04 + 0.86 * 0.85:
        # the multi-view method spends its first 85 % on the three view networks, in order
        view = min(int((fraction - 0.04) / (0.86 * 0.85) * 3), 2)
        return f"View {view + 1}/3 ({VIEW_NAMES[view]})"
    if stage.startswith("resampling back") or stage.startswith("post-processing"):
        return "Finishing"
    if stage == "done":
        return "Writing results"
    return "Segmenting" if 0.04 <= fraction < 0.9 else stage[:1].upper() + stage[1:]


class SegmentJob:
    """One run of a model: Segmenting → Importing → Done | Cancelled | Failed.

    Nothing slow runs on the GUI thread.  Starting only validates the node: a worker thread writes
    its voxels as they are (own type, uncompressed, exact geometry) and the child starts when that
    file is complete.  The model runs in ``python -m TransferSegLib.cli segment|detect …
    --progress-lines``, a child process started by ``slicer.util.launchConsoleProcess`` (no console
    window on Windows) that never imports Slicer.  :meth:`poll` (a GUI timer calls it; tests call
    :meth:`wait`) reads the child's output and, once it has finished, puts every file of
    ``result.json["files"]`` into the scene (:class:`ResultImport`: files read on a worker thread,
    nodes built on the GUI thread).  :meth:`cancel` stops the writing, kills the whole process tree
    with psutil or stops the import, and returns at once; a cancelled or failed job leaves the scene
    as it was and no file behind.  Its files live in a folder under ``logic.temporaryFolder``
    (Slicer's own temporary folder in the GUI); :meth:`close` removes it at once, for when Slicer
    closes and nothing will poll again.
    """

    SEGMENTING, IMPORTING, DONE, CANCELLED, FAILED = "Segmenting", "Importing", "Done", "Cancelled", "Failed"

    def __init__(self, logic: "TransferSegLogic", input_node, model: str, device: str = "auto", roi_node=None,
                 fusion: str | None = None, python: str | None = None):
        self.logic, self.input_node, self.model, self.device = logic, input_node, model, device
        self.roi_node, self.fusion, self.python = roi_node, fusion, python
        self.state, self.fraction, self.stage, self.message = self.SEGMENTING, 0.0, "starting", ""
        self.status = "Initializing"
        self.log: list[str] = []
        self.outputs: TransferSegOutputs | None = None
        self.result: dict | None = None
        self.card: dict | None = None
        self._process = None
        self._lines = None
        self._folder = None
        self._command_line = None
        self._input = None  # the node's voxels while the worker writes them
        self._writing = None  # the worker writing input.nrrd
        self._importer = None
        self._cancel_requested = False
        self._output_done = False  # the reader has seen the end of the child's output
        self._start()

    # --- starting -------------------------------------------------------------------------
    def _command(self, input_path: Path) -> list:
        from TransferSegLib.models import find_model, method_of

        card_path = find_model(self.model)  # a wrong name fails here, before any process starts
        self.card = json.loads(card_path.read_text(encoding="utf-8"))
        heatmap = self.card.get("task") == "heatmap"
        command = [self.python, "-m", "TransferSegLib.cli", "detect" if heatmap else "segment", str(input_path),
                   "-o", str(self._folder / "out"), "--model", str(card_path), "--device", self.device or "auto",
                   "--progress-lines"]
        if self.roi_node is not None:
            bounds = [0.0] * 6
            self.roi_node.GetRASBounds(bounds)
            if not bounds[0] < bounds[1] or not bounds[2] < bounds[3] or not bounds[4] < bounds[5]:
                raise TransferSegError(f"the ROI '{self.roi_node.GetName()}' is empty; place it on the volume")
            command += ["--roi-ras", ",".join(f"{v:.6f}" for v in bounds[0::2] + bounds[1::2])]
        if self.fusion and method_of(self.card)["name"] == "multiview" and not heatmap:
            if self.fusion not in FUSIONS:
                raise TransferSegError(f"fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}")
            command += ["--fusion", self.fusion]
        return command

    def _start(self) -> None:
        """On the GUI thread: validate, then hand the voxels to a worker thread (no copy, no conversion)."""
        import os
        import tempfile

        _, geometry = check_input_node(self.input_node)  # validated before any thread or process starts
        parent = self.logic.temporaryFolder
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._folder = Path(tempfile.mkdtemp(prefix="transferseg-", dir=parent or None))
        try:
            self._command_line = self._command(self._folder / "input.nrrd")
            self._input = NodeVoxels(self.input_node)
            self._writing = BackgroundCall(write_input, self._input, geometry, self._folder / "input.nrrd")
        except BaseException:
            self._cleanup()
            raise

    def _launch(self) -> None:
        """Start the child on the complete input file, and a thread that reads its output lines."""
        import locale
        import os
        import queue
        import shutil

        command = self._command_line
        if not self.python:
            self.python = shutil.which("PythonSlicer") or sys.executable
        command[0] = self.python
        library_root = str(Path(__import__("TransferSegLib").__file__).resolve().parents[1])
        # launchConsoleProcess reads the child's output in the locale's encoding: the child writes in it,
        # replacing what that encoding cannot hold (e.g. "×" under an ASCII locale) instead of failing.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [library_root, os.environ.get("PYTHONPATH")])),
               "PYTHONIOENCODING": locale.getpreferredencoding(False) + ":replace", "PYTHONUNBUFFERED": "1"}
        # Slicer's own environment (not the launcher-stripped startup one): PythonSlicer needs it.
        self._process = slicer.util.launchConsoleProcess(command, useStartupEnvironment=False, updateEnvironment=env)
        self._lines = queue.Queue()

        def pump(stream, sink):
            try:
                while True:
                    try:
                        line = stream.readline()
                    except UnicodeDecodeError:  # one undecodable line must not stop the reading
                        continue
                    if not line:
                        break
                    sink(line.rstrip("\r\n"))
            finally:
                sink(None)  # end of output: poll may finish the job

        threading.Thread(target=pump, args=(self._process.stdout, self._lines.put), daemon=True).start()

    # --- running --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state in (self.SEGMENTING, self.IMPORTING)

    def poll(self) -> str:
        """Advance the state machine; returns the state.  Never blocks."""
        if self.state == self.IMPORTING:
            self._poll_import()
        elif self.state == self.SEGMENTING:
            if self._process is None:
                self._poll_writing()
            else:
                self._poll_child()
        return self.state

    def _poll_writing(self) -> None:
        if not self._writing.done:
            return
        if self._cancel_requested:
            self._finish(self.CANCELLED, "Cancelled")
            return
        try:
            self._writing.result()
            if self._input.changed(self.input_node):  # edited while the worker read it: the file may mix both
                raise TransferSegError("the input volume changed while it was handed to the model; "
                                       "run Segment again")
            self._input = None
            self._launch()
        except Exception as e:
            self._finish(self.FAILED, str(e))

    def _poll_child(self) -> None:
        import queue

        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._output_done = True
                break
            parsed = parse_progress_line(line)
            if parsed:
                self.fraction, self.stage = parsed
                self.status = status_text(self.fraction, self.stage, self._multiview)
            elif line.strip():
                self.log.append(line)
        code = self._process.poll()
        if code is None or not (self._output_done or self._cancel_requested):
            return
        if self._cancel_requested:
            self._finish(self.CANCELLED, "Cancelled")
        elif code == 0:
            self._import()
        elif code == EXIT_INTERRUPTED:
            self._finish(self.CANCELLED, "Cancelled")
        else:
            self._finish(self.FAILED, failure_message(code, self.log))

    @property
    def _multiview(self) -> bool:
        from TransferSegLib.models import method_of

        return bool(self.card) and method_of(self.card)["name"] == "multiview"

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> str:
        import time

        deadline = time.monotonic() + timeout
        while self.poll() in (self.SEGMENTING, self.IMPORTING):
            if time.monotonic() > deadline:
                self.close()
                self.message = f"timed out after {timeout:.0f} s"
                self.state, self.status = self.FAILED, f"Failed: {self.message}"
                break
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Stop the input's writing, kill the child and everything it started (psutil: the same on
        Windows, macOS and Linux), or stop the import and remove what it built.

        Returns at once; the next :meth:`poll` sees the work stopped and reports Cancelled.
        """
        if not self.running:
            return
        self._cancel_requested = True
        self.status = "Cancelling"
        if self._writing is not None:
            self._writing.stop.set()
        if self._process is not None and self.state == self.SEGMENTING:
            kill_process_tree(self._process.pid)
        if self._importer is not None:
            self._importer.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel a running job and remove its folder now, without waiting for :meth:`poll`
        (Slicer is closing: no timer will poll again).  Waits at most ``timeout`` s for the
        killed child and the worker threads to let go of its files (Windows cannot delete a file
        a process holds open)."""
        import subprocess

        if self.running:
            self.cancel()
            if self._process is not None:
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self._writing is not None:
                self._writing.join(timeout)
            if self._importer is not None:
                self._importer.wait(timeout)
            self._finish(self.CANCELLED, "Cancelled")
        self._cleanup()

    def _import(self) -> None:
        self.state, self.status = self.IMPORTING, "Importing"
        out = self._folder / "out"
        try:
            self.result = json.loads((out / "result.json").read_text(encoding="utf-8"))
            self._importer = ResultImport(self.logic, self.input_node, out, self.result, self.card)
        except Exception as e:
            self._finish(self.FAILED, f"importing the result failed: {e}")
            return
        self._poll_import()

    def _poll_import(self) -> None:
        if self._cancel_requested:
            if self._importer.idle:  # its worker no longer reads the folder
                self._finish(self.CANCELLED, "Cancelled")
            return
        try:
            if not self._importer.step():
                return
        except Exception as e:
            self._finish(self.FAILED, f"importing the result failed: {e}")
            return
        self.outputs = self._importer.outputs
        self.fraction = 1.0
        warnings = self.result.get("warnings") or []  # e.g. "no liver found: …": the status line says it
        self._finish(self.DONE, "Done: " + "; ".join(warnings) if warnings else "Done")

    def _finish(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.status = f"Failed: {message}" if state == self.FAILED else message if state == self.DONE else state
        self._input = None
        self._cleanup()

    def _cleanup(self) -> None:
        import shutil

        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class ResultImport:
    """Puts the files of one run into the scene, one file at a time, all of them or none.

    Each file's voxels are read on a worker thread, in the file's own type, straight into the buffer
    its node then takes over (:func:`read_view_labels`, :func:`read_scalar_output`); the node is built
    on the GUI thread when the read is done.  Only the .seg.nrrd goes through Slicer's own reader, on
    the GUI thread (one uint8 label map: about 0.1 s for 512 × 512 × 200).  :meth:`step` never
    blocks; :meth:`cancel` and any error remove every node built so far."""

    def __init__(self, logic: "TransferSegLogic", inputNode, folder, result: dict, card: dict):
        self.logic, self.inputNode, self.card = logic, inputNode, card
        self.reference = grid_of(inputNode)  # outputs are checked against and placed on this grid
        self.outputs = TransferSegOutputs()
        files, folder = list(result["files"]), Path(folder)
        # (reader on a worker thread, or None: the builder reads; file; builder(file, what was read))
        self._steps = []
        if "segmentation.seg.nrrd" in files:
            self._steps.append((None, folder / "segmentation.seg.nrrd", self._segmentation))
        for view in VIEW_NAMES:
            if f"views/{view}.nii.gz" in files:
                self._steps.append((read_view_labels, folder / "views" / f"{view}.nii.gz",
                                    functools.partial(self._view, view)))
        if "disagreement.nii.gz" in files:
            self._steps.append((read_scalar_output, folder / "disagreement.nii.gz", self._disagreement))
        if "heatmap.nii.gz" in files:
            self._steps.append((read_scalar_output, folder / "heatmap.nii.gz", self._heatmap))
        if "detections.json" in files:
            self._steps.append((None, folder / "detections.json", self._detections))
        self._reading = None  # (BackgroundCall, builder, file)
        self._finished = False

    # --- the builders, on the GUI thread --------------------------------------------------
    def _segmentation(self, path: Path, _) -> None:
        self.outputs.segmentation = self.logic._readSegmentation(path, f"{self.inputNode.GetName()} TransferSeg",
                                                                 self.inputNode, self.card)

    def _view(self, view: str, path: Path, labels) -> None:
        self.outputs.views[view] = self.logic._viewSegmentation(labels, view, self.reference, self.inputNode, self.card)

    def _disagreement(self, path: Path, image) -> None:
        self.outputs.disagreement = self.logic._scalarOverlay(
            image, f"{self.inputNode.GetName()} view disagreement", self.reference, DISAGREEMENT_COLORS, lower=0.05)

    def _heatmap(self, path: Path, image) -> None:
        self.outputs.heatmap = self.logic._scalarOverlay(
            image, f"{self.inputNode.GetName()} lesion heatmap", self.reference, HEATMAP_COLORS, lower=0.05)

    def _detections(self, path: Path, _) -> None:
        self.outputs.detections = self.logic._detections(path, f"{self.inputNode.GetName()} detections", self.card)

    @property
    def idle(self) -> bool:
        """No worker is reading a file."""
        return self._reading is None or self._reading[0].done

    def step(self) -> bool:
        """Build what has been read and start reading the next file; True once every node is in the
        scene.  Never waits for a file."""
        try:
            while not self._finished:
                if self._reading is not None:
                    reading, build, path = self._reading
                    if not reading.done:
                        return False
                    self._reading = None
                    build(path, reading.result())  # one file's voxels, handed over to its node
                    del reading
                    continue
                if not self._steps:
                    self.logic._placeUnderStudy(self.inputNode, self.outputs.nodes())
                    self.logic.showResult(self.inputNode, self.outputs)
                    self._finished = True
                    break
                read, path, build = self._steps.pop(0)
                if read is None:
                    build(path, None)
                else:
                    self._reading = (BackgroundCall(read, path, self.reference), build, path)
        except Exception:
            self.cancel()
            raise
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Wait at most ``timeout`` s for the file being read."""
        if self._reading is not None:
            self._reading[0].join(timeout)

    def cancel(self) -> None:
        """Stop reading and remove every node built so far: the scene is as it was."""
        if self._reading is not None:
            self._reading[0].stop.set()
        self._steps = []
        _remove_nodes(self.logic.scene, self.outputs.nodes())
        self.outputs = TransferSegOutputs()


def kill_process_tree(pid: int) -> None:
    """Kill a process and all its descendants, children first; never waits."""
    import psutil

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in children + [parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def failure_message(code: int, log: list) -> str:
    """The child's own error line, or what its exit status says (an out-of-memory kill says so)."""
    errors = [line for line in log if line.strip()]
    text = "\n".join(errors[-20:])
    # SIGKILL that the user did not ask for: on Linux the kernel's out-of-memory killer.
    if code in (-9, 137) or "MemoryError" in text or "out of memory" in text.lower():
        return ("the computer ran out of memory (the segmentation process was stopped by the system); "
                "choose a smaller ROI, close other programs, or use the CPU if the GPU ran out")
    for line in reversed(errors):
        if line.startswith(("transferseg: error: ", "transferseg: interrupted")):
            return line[len("transferseg: "):].removeprefix("error: ")
    return errors[-1] if errors else f"the segmentation process exited with code {code}"


class GpuQuery:
    """:meth:`TransferSegLogic.gpus` on a worker thread: opening the module never waits for
    ``nvidia-smi`` (up to 5 s).  ``done`` says whether it answered; ``result`` is its answer."""

    def __init__(self, timeout: float = 5.0):
        self.result = None
        self._thread = threading.Thread(target=self._ask, args=(timeout,), daemon=True)
        self._thread.start()

    def _ask(self, timeout: float) -> None:
        try:
            self.result = TransferSegLogic.gpus(timeout)
        except Exception as e:  # the device list then says no GPU was found
            logging.warning(f"TransferSeg: could not list the GPUs: {e}")
            self.result = []

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> list | None:
        self._thread.join(timeout)
        return self.result


def _alive(node) -> bool:
    """The node exists and is still in a scene (the user may have deleted it)."""
    return node is not None and node.GetScene() is not None


# --------------------------------------------------------------------------------------
# The module logic
# --------------------------------------------------------------------------------------
@dataclass
class TransferSegOutputs:
    """The nodes one run added to the scene (any of them may be None)."""

    segmentation: object = None
    views: dict = field(default_factory=dict)  # view name -> segmentation node
    disagreement: object = None
    heatmap: object = None
    detections: object = None

    def nodes(self) -> list:
        return [n for n in [self.segmentation, *self.views.values(), self.disagreement, self.heatmap,
                            self.detections] if n is not None]


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
    def installedModels() -> list:
        """Cards of every installed model (user folder first, then the shipped ones)."""
        from TransferSegLib.models import list_models

        return list_models()

    @staticmethod
    def modelSummary(card: dict) -> str:
        """One line for a model: its method (and the views' networks), task, labels and description."""
        from TransferSegLib.models import component_specs, method_of

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
        from TransferSegLib.models import method_of

        return bool(card) and method_of(card)["name"] == "multiview"

    @staticmethod
    def gpus(timeout: float = 5.0) -> list:
        """``[(index, name, memory_mib)]`` of the NVIDIA GPUs ``nvidia-smi`` reports (no torch needed).

        Takes up to ``timeout`` s: the GUI asks through :class:`GpuQuery`, off its thread."""
        import shutil
        import subprocess
        import sys

        smi = shutil.which("nvidia-smi")
        if not smi:
            return []
        # no console window flashing up on Windows
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        try:
            text = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=timeout, check=True,
                                  creationflags=flags).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        found = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[0].isdigit():
                try:
                    found.append((int(parts[0]), parts[1], int(float(parts[2]))))
                except ValueError:
                    continue
        return found

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
                          python: str | None = None) -> SegmentJob:
        """Start a run in a child process and return its job (poll it).  Invalid input raises
        :class:`TransferSegError` before any process starts."""
        return SegmentJob(self, inputNode, model, device=device, roi_node=roiNode, fusion=fusion, python=python)

    # --- the scene --------------------------------------------------------------------------
    def importResult(self, inputNode, folder, result: dict, card: dict) -> TransferSegOutputs:
        """Put every file a run wrote (``result["files"]``) into the scene, all of it or nothing, and wait
        for it (a job does the same without waiting: :class:`ResultImport`)."""
        importer = ResultImport(self, inputNode, folder, result, card)
        while not importer.step():
            importer.wait()
        return importer.outputs

    def _readSegmentation(self, path: Path, name: str, inputNode, card: dict):
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
            _remove_nodes(self.scene, [node])
            raise
        return node

    def _viewSegmentation(self, labels, view: str, reference: Volume, inputNode, card: dict):
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

    def _scalarOverlay(self, image, name: str, reference: Volume, colors, lower: float):
        """A probability volume (:func:`read_scalar_output`: in [0, 1], or × 255 when stored as uint8) on the
        input's grid, coloured, transparent below ``lower``.  The node takes ``image`` over, in its own type."""
        scale = 255.0 if image.GetScalarType() == vtk.VTK_UNSIGNED_CHAR else 1.0
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        try:
            _set_geometry(node, reference)
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
            _remove_nodes(self.scene, [node])
            raise
        return node

    def _detections(self, path: Path, name: str, card: dict):
        """A locked point list, one point per detection at its RAS position, labelled with its confidence."""
        detections = json.loads(path.read_text(encoding="utf-8"))["detections"]
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        try:
            node.CreateDefaultDisplayNodes()
            for n, d in enumerate(detections, 1):
                index = node.AddControlPoint(*[float(v) for v in d["position_ras"]], f"{d['confidence']:.2f}")
                node.SetNthControlPointDescription(index, f"detection {n}: confidence {d['confidence']:.4f}, "
                                                          f"box (k, j, i) {d['box_kji']}")
            node.SetAttribute("TransferSeg.Confidences", json.dumps([float(d["confidence"]) for d in detections]))
            node.SetLocked(True)
            color = next((s["color"] for s in card.get("labels", [])), (1.0, 0.85, 0.1))
            node.GetDisplayNode().SetSelectedColor(*[float(c) for c in color])
            node.GetDisplayNode().SetColor(*[float(c) for c in color])
        except Exception:
            _remove_nodes(self.scene, [node])
            raise
        return node

    def _placeUnderStudy(self, inputNode, nodes) -> None:
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
        if _alive(node) and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(bool(visible))

    def setOverlay(self, overlayNode, visible: bool, opacity: float) -> None:
        """Show or hide a scalar overlay (disagreement, heatmap) as the foreground, with its opacity."""
        if not _alive(overlayNode):
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
        if not _alive(markupsNode):
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
        from TransferSegLib.io import atomic_output

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
        from TransferSegLib.io import save_labelmap

        labels = self.labelmapArray(segmentationNode, referenceNode)
        reference = Volume(np.zeros(labels.shape, np.uint8), **_geometry(referenceNode))
        return save_labelmap(labels, reference, path)

    def labelmapArray(self, segmentationNode, referenceNode) -> np.ndarray:
        """The segmentation as a label map (k, j, i) on ``referenceNode``'s grid, each segment with
        its own label value (the model card's), later segments drawn over earlier ones."""
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
            _remove_nodes(self.scene, [labelmapNode] + [n for n in added if n.GetID() not in before])
        return labels.astype(np.uint8) if labels.max(initial=0) <= 255 else labels
