"""Reading and writing volumes with their exact geometry; input validation.

* :func:`load_volume` reads NIfTI, NRRD, MetaImage and DICOM series through SimpleITK, and an enhanced
  multi-frame DICOM file (breast tomosynthesis, Enhanced CT) through :mod:`TransferSegLib.dicom_file`,
  checks everything a model would later trip over, and returns a :class:`~TransferSegLib.volume.Volume`.
  Header-level problems (dimension, components, size, memory, and what
  :mod:`TransferSegLib.headers` checks in each format's own header) are caught from the header
  alone, before any voxel is allocated.
* :func:`save_volume`, :func:`save_labelmap`, :func:`save_scalar` and :func:`save_segmentation`
  write on the reference volume's geometry, each through :func:`~TransferSegLib.atomic.atomic_output`
  (re-exported here with the rest of :mod:`TransferSegLib.atomic`, the one way files are written).

ITK works in LPS; the library works in RAS.  The conversion negates the first two rows of
the direction matrix and the first two origin coordinates, which is exact in floating point.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import (atomic_output, atomic_output_folder, available_memory_bytes, check_output_folder,
                     check_path_encoding, full_suffix, remove_stale_temporaries)
from .dicom_file import MultiframeHeader, enhanced_dataset, has_dicom_preamble, read_dataset, read_header, read_voxels
from .headers import (check_detached_data_file, check_header_numbers, check_meta_data_size, check_nifti_header,
                      check_nifti_voxels, check_slice_positions, file_chunks, gzip_chunks, itk_reason, nifti_header,
                      shown_name, special_kind, text_header)
from .terminology import entry_from_card
from .volume import TransferSegError, Volume, as_float32, check_geometry, describe_shape, label_counts

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "atomic_output",
    "atomic_output_folder",
    "available_memory_bytes",
    "check_output_folder",
    "check_path_encoding",
    "load_volume",
    "native_stderr_silenced",
    "remove_stale_temporaries",
    "save_labelmap",
    "save_scalar",
    "save_segmentation",
    "save_volume",
]

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
_LPS = np.array([-1.0, -1.0, 1.0])

# Bytes per voxel while loading: the file's own pixels plus the float32 array we keep.
_FLOAT32_BYTES = 4


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def native_stderr_silenced():
    """Silence what native code (ITK's MetaImage and GDCM readers) prints to the C stderr for the
    block: their complaints about a file say less than our error does, and GDCM's about every
    file that is not DICOM, when a folder is searched for a series, are noise.

    The C stderr is file descriptor 2 whatever Python's ``sys.stderr`` has been replaced by."""
    fd = 2
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr at all
        yield
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):  # e.g. Slicer's console object
        sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _dicom_series_files(folder: Path) -> list[str]:
    for entry in os.scandir(folder):  # GDCM opens every file in the folder: a FIFO would block it for ever
        kind = None if entry.is_file() or entry.is_dir() else special_kind(Path(entry.path))
        if kind:
            raise TransferSegError(f"{folder}: {shown_name(entry.name)} in the folder is {kind}, not a file; "
                                   "move it out of the DICOM folder")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids and (full_suffix(folder) in READ_SUFFIXES or folder.name.lower().endswith(".dcm")):
        raise TransferSegError(f"{folder}: this is a folder, not an image file; give the image file itself "
                               "(or a folder of DICOM slices)")
    if not ids:
        raise TransferSegError(
            f"{folder}: the folder holds no DICOM image series; give a folder of .dcm slices or an image file "
            f"({', '.join(READ_SUFFIXES)})"
        )
    # Several series in one folder (e.g. scout + axial): take the one with the most slices.
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids), key=len)
    for file in files:  # SimpleITK aborts the process on a name that is not UTF-8
        check_path_encoding(file, "a DICOM file of the series")
    return list(files)


def _check_header(name: str, dim: int, ncomp: int, size: tuple, pixel_bytes: int,
                  spacing_ijk: tuple = (1.0, 1.0, 1.0), direction_lps: tuple = tuple(np.eye(3).ravel()),
                  origin_lps: tuple = (0.0, 0.0, 0.0)) -> None:
    """Everything that can be checked from the header alone, before any voxel is allocated."""
    if ncomp > 1:
        raise TransferSegError(
            f"{name}: the image has {ncomp} components per voxel (a colour or vector image); "
            "TransferSeg needs a single-component (grey-scale) 3D volume"
        )
    if dim == 4 and size[3] != 1:
        raise TransferSegError(
            f"{name}: the image is 4D ({describe_shape(size)}, {size[3]} volumes, e.g. a time series); "
            "TransferSeg needs one 3D volume: extract the volume you want to segment first"
        )
    if dim < 3:
        raise TransferSegError(
            f"{name}: input is 2D ({describe_shape(size[::-1])}); TransferSeg needs a 3D volume"
        )
    if dim > 4:
        raise TransferSegError(f"{name}: the image has {dim} dimensions; TransferSeg needs a 3D volume")
    if 0 in size[:3]:
        raise TransferSegError(f"{name}: the image has a zero-size axis ({describe_shape(size[:3][::-1])}); it holds no voxels")
    n = int(round(len(direction_lps) ** 0.5))
    direction = np.array(direction_lps, dtype=np.float64).reshape(n, n)[:3, :3]
    try:
        check_geometry(np.array(spacing_ijk[:3], dtype=np.float64)[::-1], _LPS[:, None] * direction,
                        _LPS * np.array(origin_lps[:3], dtype=np.float64))
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    voxels = int(np.prod(size[:3], dtype=np.int64))
    needed = voxels * (pixel_bytes + _FLOAT32_BYTES)
    available = available_memory_bytes()
    if needed > available:
        raise TransferSegError(
            f"{name}: the volume ({describe_shape(size[:3][::-1])} voxels) needs about {needed / 2**30:.1f} GiB "
            f"to load but only {available / 2**30:.1f} GiB of memory is free; crop or downsample it first, "
            "or use a machine with more memory"
        )


def _pixel_bytes(pixel_id: int) -> int:
    return {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkFloat32: 4,
    }.get(pixel_id, 8)


def _read_volume(path: Path) -> Volume:
    name = str(path)
    if path.is_dir():
        files = _dicom_series_files(path)
        if len(files) == 1:  # one file: an enhanced multi-frame object is read with its functional groups
            dataset = enhanced_dataset(Path(files[0]))
            if dataset is not None:
                return _volume_from_multiframe(read_header(Path(files[0]), dataset), name)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise TransferSegError(f"{name}: the DICOM files cannot be read ({itk_reason(e)})") from None
        slice_size = reader.GetSize()
        size = (slice_size[0], slice_size[1], len(files))
        _check_header(name, 3, reader.GetNumberOfComponents(), size, _pixel_bytes(reader.GetPixelID()))
        check_slice_positions(name, files)
        series = sitk.ImageSeriesReader()
        series.SetFileNames(files)
        return _volume_from_image(_execute(series, name), name)

    suffix = full_suffix(path)
    if path.name.lower().endswith(".dcm") or (suffix not in READ_SUFFIXES and has_dicom_preamble(path)):
        return _read_dicom_file(path)
    if suffix not in READ_SUFFIXES:
        raise TransferSegError(
            f"{name}: unsupported file type '{suffix or path.name}'; give a NIfTI, NRRD or MetaImage file "
            f"({', '.join(READ_SUFFIXES)}), a DICOM series folder or a multi-frame DICOM file"
        )
    if path.stat().st_size == 0:
        raise TransferSegError(f"{name}: the file is empty (0 bytes)")
    header_lines = text_header(path, suffix)
    if header_lines is not None:
        check_detached_data_file(path, suffix, header_lines)
        check_header_numbers(path, suffix, header_lines)
    nifti = nifti_header(path, suffix) if suffix in (".nii", ".nii.gz") else None
    if nifti:
        check_nifti_header(name, nifti)
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        if "size is zero" in str(e):
            raise TransferSegError(f"{name}: the image has a zero-size axis; it holds no voxels") from None
        raise TransferSegError(
            f"{name}: not a readable {suffix} image (the header is damaged or it is another kind of file: "
            f"{itk_reason(e)})"
        ) from None
    _check_header(name, reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(),
                  _pixel_bytes(reader.GetPixelID()), reader.GetSpacing(), reader.GetDirection(), reader.GetOrigin())
    if header_lines is not None and suffix in (".mha", ".mhd"):
        check_meta_data_size(path, header_lines, int(np.prod(reader.GetSize(), dtype=np.int64))
                              * reader.GetNumberOfComponents() * _pixel_bytes(reader.GetPixelID()))
    if suffix in (".nii", ".nii.gz"):
        check_nifti_voxels(name, gzip_chunks(path) if suffix == ".nii.gz" else file_chunks(path), nifti)
    return _volume_from_image(_execute(reader, name), name)


def _read_dicom_file(path: Path) -> Volume:
    """One DICOM file: an enhanced multi-frame object is a volume; a single slice or a mammogram is 2D."""
    if path.stat().st_size == 0:
        raise TransferSegError(f"{path}: the file is empty (0 bytes)")
    dataset = read_dataset(path, required=False)
    if dataset is None:  # not DICOM to pydicom (or no pydicom): say what SimpleITK sees
        _refuse_single_dicom_file(path)
    return _volume_from_multiframe(read_header(path, dataset), str(path))


def _refuse_single_dicom_file(path: Path) -> None:
    """One .dcm file is one slice of a series (a 2D input), or a file we cannot tell apart from one."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()
    except RuntimeError:
        size = ()
    if len(size) == 2 or (len(size) == 3 and size[2] == 1):
        raise TransferSegError(
            f"{path}: input is 2D ({describe_shape(size[:2])}, a single DICOM slice); TransferSeg needs a 3D "
            "volume: give the folder that holds the whole series"
        )
    if len(size) == 3:  # several frames, and pydicom missing: it reads their functional groups
        read_dataset(path)  # raises the error that says to install it
    raise TransferSegError(f"{path}: this is a single DICOM file; give the folder that holds the whole series instead")


def _execute(reader, name: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as e:
        reason = itk_reason(e)
        if "spacing" in reason.lower() or "direction" in reason.lower() or "singular" in reason.lower():
            raise TransferSegError(f"{name}: the image geometry is invalid ({reason}); fix the image header") from None
        raise TransferSegError(
            f"{name}: the voxel data cannot be read; the file is probably truncated or corrupt "
            f"(e.g. an interrupted copy or download): {reason}"
        ) from None


def _volume_from_image(image: sitk.Image, name: str) -> Volume:
    if image.GetDimension() == 4:  # a 4D image with a single volume (checked in the header)
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise TransferSegError(f"{name}: the image is not single-component")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise TransferSegError(f"{name}: the image holds complex numbers; TransferSeg needs real voxel values")
    spacing_ijk = np.array(image.GetSpacing(), dtype=np.float64)
    direction_lps = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin_lps = np.array(image.GetOrigin(), dtype=np.float64)
    try:
        # A real copy: a view would point into memory that SimpleITK frees with `image`.
        array = as_float32(sitk.GetArrayViewFromImage(image), copy=True)
        volume = Volume(array, spacing=tuple(spacing_ijk[::-1]), directions=_LPS[:, None] * direction_lps,
                        origin=_LPS * origin_lps)
        volume.check_finite()
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    return volume


def _volume_from_multiframe(header: MultiframeHeader, name: str) -> Volume:
    """The frames of a multi-frame DICOM file on the geometry its header states (LPS → RAS as for ITK images)."""
    _check_header(name, 3, 1, (header.columns, header.rows, header.frames), header.pixel_bytes, header.spacing_ijk,
                  tuple(header.direction_lps.ravel()), tuple(header.origin_lps))
    array = read_voxels(header)
    try:
        volume = Volume(array, spacing=tuple(header.spacing_ijk[::-1]), directions=_LPS[:, None] * header.direction_lps,
                        origin=_LPS * header.origin_lps, meta=header.meta)
        volume.check_finite()
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    return volume


def _check_path_names(path: Path) -> None:
    """Every name along ``path``, the folders' as much as the file's, must be valid UTF-8 before SimpleITK
    sees it (see :func:`check_path_encoding`)."""
    for n in range(1, len(path.parts) + 1):
        part = Path(*path.parts[:n])
        check_path_encoding(part, "the file" if n == len(path.parts) and not path.is_dir() else "the folder")


def load_volume(path) -> Volume:
    """Read a 3D scalar volume: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd),
    a folder holding a DICOM series (the largest series if there are several), or one enhanced
    multi-frame DICOM file (Breast Tomosynthesis, Enhanced CT or MR; named .dcm or anything, or alone
    in a folder): see :mod:`TransferSegLib.dicom_file`.

    Returns a :class:`Volume` (float32, axes (k, j, i), spacing in the same order, RAS geometry).
    CT intensities stay in HU (DICOM rescale slope/intercept applied, per frame for a multi-frame
    file).  A multi-frame file's laterality and view (e.g. ``{"laterality": "R", "view": "CC"}``)
    are in :attr:`Volume.meta`.

    Raises :class:`TransferSegError` with an actionable message for a missing, unreadable,
    truncated or non-image file; a file name that is not UTF-8; a detached header whose data file
    lies outside its folder, is missing or is not a regular file; a 2D, 4D or multi-component
    image; a zero-size axis; NaN or infinite voxels, or finite ones beyond float32's range; zero,
    negative or non-finite spacing; a singular, sheared or scaled direction matrix (a NIfTI sform
    included); a DICOM series or multi-frame file with a missing, repeated or unevenly spaced slice;
    a single DICOM slice or one-frame mammogram (2D); a multi-frame file without its functional
    groups or in a transfer syntax that cannot be decoded here; and a volume too
    large for the memory available (estimated from the header, before reading the voxels).  The
    input file is only read, never modified.
    """
    path = Path(path).expanduser()
    _check_path_names(path)
    if not path.exists():
        raise TransferSegError(f"{path}: no such file or folder")
    kind = special_kind(path)
    if kind:
        raise TransferSegError(f"{path}: this is {kind}, not an image file")
    if not os.access(path, os.R_OK):
        raise TransferSegError(f"{path}: permission denied; check that you may read this file")
    with native_stderr_silenced():
        return _read_volume(path)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _check_suffix(path: Path, allowed) -> str:
    suffix = full_suffix(path)
    if suffix not in allowed:
        raise TransferSegError(f"{path}: cannot write '{suffix or path.name}' files; use one of {', '.join(allowed)}")
    return suffix


def image_on(array: np.ndarray, reference: Volume, channels: bool = False) -> sitk.Image:
    """A (k, j, i) array, or with ``channels`` a (C, k, j, i) one as C components, on ``reference``'s geometry."""
    if array.shape[int(channels):] != reference.shape:
        raise TransferSegError(
            f"the array to write is {describe_shape(array.shape)} but the reference volume is "
            f"{describe_shape(reference.shape)}; they must match voxel for voxel"
        )
    if channels:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(reference.spacing)))
    image.SetOrigin(tuple(_LPS * reference.origin))
    image.SetDirection(tuple((_LPS[:, None] * reference.directions).reshape(-1)))
    return image


def _write_image(image: sitk.Image, path) -> Path:
    path = Path(path)
    _check_suffix(path, WRITE_SUFFIXES)
    with atomic_output(path) as tmp:
        try:
            with native_stderr_silenced():  # e.g. the NIfTI writer's own "** ERROR: NWAD" on a full disk
                sitk.WriteImage(image, str(tmp), useCompression=full_suffix(path) != ".nii")
        except RuntimeError as e:
            raise TransferSegError(f"{path}: could not write the file ({itk_reason(e)})") from None
        if full_suffix(path) in (".nii", ".nii.gz") and not _nifti_complete(tmp, image):
            raise TransferSegError(f"{path}: the file could not be written whole (is the disk full?); free some space "
                                   "and run again")
    return path


def _nifti_complete(path: Path, image: sitk.Image) -> bool:
    """Whether the NIfTI writer wrote every byte: on a full disk it may stop short without an error
    (a .nii.gz then ends mid-stream).  Cheap: the file size, or the gzip trailer's length field."""
    voxels = int(np.prod(image.GetSize(), dtype=np.int64)) * image.GetNumberOfComponentsPerPixel()
    data = voxels * image.GetSizeOfPixelComponent()
    sizes = {data + 352, data + 544}  # NIfTI-1 or NIfTI-2 header, with the 4-byte extension flag
    if full_suffix(path) == ".nii":
        return path.stat().st_size in sizes
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return False
        f.seek(-4, os.SEEK_END)
        length = int.from_bytes(f.read(4), "little")  # gzip's ISIZE: the data's length modulo 2**32
    return length in {n % 2**32 for n in sizes}


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise TransferSegError("a label map must hold whole numbers (0 = background, 1, 2, … = segments)")
    lo, hi = (labels.min(), labels.max()) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise TransferSegError(f"label values must lie in 0…65535; got {lo}…{hi}")
    return labels.astype(np.uint8 if hi <= 255 else np.uint16, copy=False)


def save_volume(volume: Volume, path) -> Path:
    """Write ``volume`` (float32) to .nii/.nii.gz/.nrrd/.mha with its geometry; returns the path."""
    return _write_image(image_on(volume.array, volume), path)


def save_labelmap(labels: np.ndarray, reference: Volume, path) -> Path:
    """Write an integer label map (axes (k, j, i)) on ``reference``'s geometry (.nii.gz, .nrrd, …).

    Stored as uint8 (uint16 if a label exceeds 255).
    """
    return _write_image(image_on(_as_labels(labels), reference), path)


def save_scalar(values: np.ndarray, reference: Volume, path) -> Path:
    """Write a probability or heatmap volume on ``reference``'s geometry.

    Stored as float32, or as uint8 when given uint8 (probability × 255).  A (C, k, j, i) array
    (e.g. one probability per class) is written as one image with C components.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.uint8):
        values = values.astype(np.float32)
    return _write_image(image_on(values, reference, channels=values.ndim == 4), path)


def _segment_extent(mask: np.ndarray) -> list:
    """Slicer's Segment_Extent: [i0, i1, j0, j1, k0, k1] inclusive, or an empty extent."""
    if not mask.any():
        return [0, -1, 0, -1, 0, -1]
    extent = []
    for axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        extent += [int(nz[0]), int(nz[-1])]
    return extent


def save_segmentation(labels: np.ndarray, reference: Volume, path, segments: list) -> Path:
    """Write a Slicer segmentation (.seg.nrrd) with named, coloured segments and terminology.

    Args:
        labels: integer label map, axes (k, j, i), same shape as ``reference``.
        segments: one dict per label value: ``{"name": str, "label": int, "color": (r, g, b) in 0–1,
            "terminology": optional, a Slicer TerminologyEntry string or a dict
            {"category": [scheme, code, meaning], "type": [...], optional "typeModifier",
            "anatomicRegion", "anatomicRegionModifier"}}``.

    Every non-zero value in ``labels`` must have a segment.  The file opens in 3D Slicer
    (Segmentations) and reads back with ``slicerio.read_segmentation``.
    """
    import slicerio  # not bundled with Slicer, whose module imports this one: only a .seg.nrrd write needs it

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise TransferSegError(f"{path}: a segmentation file must end in .seg.nrrd")
    labels = _as_labels(labels)
    if labels.shape != reference.shape:
        image_on(labels, reference)  # raises the shape error
    if labels.dtype != np.uint8:
        raise TransferSegError("a .seg.nrrd segmentation here holds label values 1…255")
    seen_labels, seen_names, out_segments = set(), set(), []
    for n, seg in enumerate(segments):
        try:
            name, value, color = str(seg["name"]), int(seg["label"]), [float(c) for c in seg["color"]]
        except (KeyError, TypeError, ValueError):
            raise TransferSegError(f"segment {n} needs 'name', 'label' (1…255) and 'color' (r, g, b in 0–1)") from None
        if not name or name in seen_names:
            raise TransferSegError(f"segment names must be unique and non-empty; got {name!r} twice or empty")
        if not 1 <= value <= 255 or value in seen_labels:
            raise TransferSegError(f"segment {name!r}: label {value} must be unique and in 1…255")
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise TransferSegError(f"segment {name!r}: color must be three numbers in 0–1; got {color}")
        seen_labels.add(value)
        seen_names.add(name)
        entry = {
            "id": f"Segment_{value}",
            "name": name,
            "labelValue": value,
            "layer": 0,
            "color": color,
            "extent": _segment_extent(labels == value),
        }
        if seg.get("terminology"):
            entry["terminology"] = entry_from_card(seg["terminology"])
        out_segments.append(entry)
    present = set(np.flatnonzero(label_counts(labels)).tolist()) - {0}
    missing = sorted(present - seen_labels)
    if missing:
        raise TransferSegError(f"label value(s) {missing} in the label map have no segment description")

    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference.ijk_to_ras
    segmentation = {
        "voxels": labels,
        "ijkToLPS": ijk_to_lps,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": out_segments,
    }
    with atomic_output(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, index_order="C")
        _drop_write_time(Path(tmp))
    return path


def _drop_write_time(path: Path) -> None:
    """The NRRD writer stamps the time of writing into a header comment: dropped, so that the same
    segmentation always gives the same bytes (``--deterministic``)."""
    data = path.read_bytes()
    end = data.find(b"\n\n")
    header = re.sub(rb"# on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\(GMT\)\.\n", b"", data[:end], count=1)
    if len(header) != end:
        path.write_bytes(header + data[end:])
