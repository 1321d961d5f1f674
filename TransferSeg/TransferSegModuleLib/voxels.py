"""Voxels between the scene and the child's files: off the GUI thread, in their own type, with no
full-size copies (the input written as NRRD from the node's buffer; outputs read into the buffers their
nodes keep)."""
from __future__ import annotations

import gzip
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from TransferSegLib.volume import TransferSegError, Volume
from .scene import new_image


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
    on ``geometry`` (``node_geometry``'s form).  LPS, as Slicer and ITK write NRRD; every number as ``repr``
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
    # SimpleITK (through TransferSegLib.io) loads when a run starts, not when Slicer loads the module
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


def _header(path: Path):
    import SimpleITK as sitk  # bundled with Slicer; imported when a run ends, not when the module loads

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise TransferSegError(f"{path.name} cannot be read ({str(e).strip().splitlines()[-1]})") from None
    return reader


def _file_on_grid(path: Path, reference: Volume) -> int:
    """Check from its header alone that an output image lies exactly on ``reference``'s grid; returns its
    number of components."""
    reader = _header(path)
    _check_on_grid(path.name, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                   reference)
    return reader.GetNumberOfComponents()


def file_grid_over(path: Path, reference: Volume) -> Volume:
    """The grid of an output image stored on a grid of its own (a heatmap on the model's working grid), as
    a :class:`Volume` of one broadcast zero; checked from its header to cover exactly ``reference``'s box
    with ``reference``'s directions, so that Slicer lays it over the input where the model saw it."""
    reader = _header(path)
    if reader.GetNumberOfComponents() != 1:
        raise TransferSegError(f"{path.name} has several components; a single one was expected")
    grid = Volume(np.broadcast_to(np.float32(0), tuple(reader.GetSize())[::-1]), tuple(reader.GetSpacing())[::-1],
                  _LPS[:, None] * np.asarray(reader.GetDirection()).reshape(3, 3), _LPS * np.asarray(reader.GetOrigin()))
    corners = [[-0.5, -0.5, -0.5], [n - 0.5 for n in grid.shape]], [[-0.5, -0.5, -0.5], [n - 0.5 for n in reference.shape]]
    same = (np.allclose(grid.directions, reference.directions, atol=1e-6)
            and np.allclose(grid.ijk_to_ras_points(np.array(corners[0])), reference.ijk_to_ras_points(np.array(corners[1])),
                            atol=1e-3))
    if not same:
        raise TransferSegError(f"{path.name} does not cover the input volume's box")
    return grid


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


def read_heatmap_output(path: Path, reference: Volume, stop: threading.Event):
    """``(image, grid)``: a heatmap stored on the model's working grid (:func:`file_grid_over`), read as
    :func:`read_scalar_output` reads an image on the input's grid."""
    grid = file_grid_over(path, reference)
    return read_scalar_output(path, grid, stop), grid


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
