"""Reading and writing volumes with their exact geometry; input validation.

* :func:`load_volume` reads NIfTI, NRRD, MetaImage and DICOM series through SimpleITK, checks
  everything a model would later trip over, and returns a :class:`~TransferSegLib.volume.Volume`.
  Header-level problems (dimension, components, size, memory) are caught from the header
  alone, before any voxel is allocated.
* :func:`save_volume`, :func:`save_labelmap`, :func:`save_scalar` and :func:`save_segmentation`
  write on the reference volume's geometry.  Every write goes to a temporary file in the
  target folder and is renamed into place (:func:`atomic_output`): an existing file is only
  ever replaced by a complete one, and a failed or cancelled write leaves nothing behind.
  :func:`atomic_output_folder` does the same for a set of files: all of them or none.

ITK works in LPS; the library works in RAS.  The conversion negates the first two rows of
the direction matrix and the first two origin coordinates, which is exact in floating point.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import struct
import sys
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import SimpleITK as sitk

from .volume import TransferSegError, Volume, _check_geometry, _describe_shape, label_counts

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "atomic_output",
    "atomic_output_folder",
    "available_memory_bytes",
    "check_output_folder",
    "load_volume",
    "native_stderr_silenced",
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


def full_suffix(path) -> str:
    """'.nii.gz' for 'ct.nii.gz', '.seg.nrrd' for 'a.seg.nrrd', else the last suffix (lower case)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if name.endswith(double):
            return double
    return Path(name).suffix


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt and cancellation) the temporary file is
    removed and ``path`` is left exactly as it was.  The parent folder is created if missing.
    """
    path = Path(path)
    if path.is_dir():
        raise TransferSegError(f"cannot write {path}: it is an existing folder; give a file name, or move the folder away")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.partial-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise TransferSegError(f"writing {path} produced no file")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_output_folder(folder, names=(), input_path=None) -> Path:
    """Return ``folder`` as a Path if it is a folder or can be created as one; else raise
    :class:`TransferSegError` (cheap: call it before a long run, not only when writing).

    With ``input_path``, also refuse a folder where one of ``names`` (the files the run writes,
    relative to ``folder``) is the input file itself."""
    folder = Path(folder).expanduser()
    if input_path is not None:
        source = Path(input_path).expanduser().resolve()
        for name in names:
            if (folder / name).resolve() == source:
                raise TransferSegError(
                    f"the output {folder / name} would overwrite the input; choose another output folder")
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise TransferSegError(
            f"the output folder {folder} is an existing file; give the name of a folder (it is created if "
            "missing), or move the file away"
        )
    for nearest in [folder, *folder.parents]:
        if nearest.exists():
            if not nearest.is_dir():
                raise TransferSegError(f"cannot create the output folder {folder}: {nearest} is a file, not a folder")
            if not os.access(nearest, os.W_OK | os.X_OK):
                raise TransferSegError(f"cannot write the output folder {folder}: permission denied in {nearest}; "
                                       "choose a folder you may write to")
            break
    return folder


def _relative_names(names) -> list:
    names = [PurePosixPath(n) for n in names]
    for name in names:
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ValueError(f"output names must be relative paths inside the folder; got {str(name)!r}")
    if len(set(names)) != len(names):
        raise ValueError("output names must be unique")
    return names


@contextlib.contextmanager
def atomic_output_folder(folder, names):
    """Yield an empty staging folder; move the files ``names`` (relative paths, e.g.
    ``views/axial.nii.gz``) from it into ``folder`` only when the block has written every one.

    A new ``folder`` is staged beside it and renamed into place in one step.  An existing one
    is staged in a hidden subfolder (the same filesystem even if ``folder`` is a mount point,
    and no need to write in its parent) and the files are moved in one by one with
    ``os.replace``; its other files are never touched.  On any exception (including
    KeyboardInterrupt and cancellation), or if the block wrote other files than ``names``,
    the staging folder is removed and ``folder`` is left exactly as it was.
    """
    folder = check_output_folder(folder)
    names = _relative_names(names)
    existed = folder.is_dir()
    for name in names:  # before any writing: nothing a rename at the end would trip over
        target = folder / name
        blocked = [folder / p for p in name.parents[:-1] if (folder / p).exists() and not (folder / p).is_dir()]
        blocked += [target] if target.is_dir() else []
        if blocked:
            raise TransferSegError(f"cannot write {target}: {blocked[0]} is in the way; move it away")
    created = [p for p in folder.parents if not p.exists()]  # deepest first
    token = secrets.token_hex(4)
    if existed:
        staging = folder / f".transferseg.tmp-{token}"
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{folder.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
        written = sorted(PurePosixPath(p.relative_to(staging).as_posix()) for p in staging.rglob("*")
                         if not p.is_dir())
        if written != sorted(names):
            raise RuntimeError(f"expected to write {sorted(map(str, names))} but wrote {list(map(str, written))}")
        moved = False
        if not existed:
            try:
                os.rename(staging, folder)
                moved = True
            except OSError:  # the folder appeared meanwhile: move file by file as below
                if not folder.is_dir():
                    raise
        if not moved:
            # Safe: every file is complete before the first rename, and os.replace swaps a whole file on one filesystem.
            for name in names:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(staging / name, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # folders made only to hold the staging folder
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)  # what is left of it: empty subfolders


def available_memory_bytes() -> int:
    """Memory the OS can give us now (MemAvailable), or a conservative guess off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


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
    return list(files)


def _check_header(name: str, dim: int, ncomp: int, size: tuple, pixel_bytes: int,
                  spacing_ijk: tuple = (1.0, 1.0, 1.0), direction_lps: tuple = tuple(np.eye(3).ravel())) -> None:
    """Everything that can be checked from the header alone, before any voxel is allocated."""
    if ncomp > 1:
        raise TransferSegError(
            f"{name}: the image has {ncomp} components per voxel (a colour or vector image); "
            "TransferSeg needs a single-component (grey-scale) 3D volume"
        )
    if dim == 4 and size[3] != 1:
        raise TransferSegError(
            f"{name}: the image is 4D ({_describe_shape(size)}, {size[3]} volumes, e.g. a time series); "
            "TransferSeg needs one 3D volume: extract the volume you want to segment first"
        )
    if dim < 3:
        raise TransferSegError(
            f"{name}: input is 2D ({_describe_shape(size[::-1])}); TransferSeg needs a 3D volume"
        )
    if dim > 4:
        raise TransferSegError(f"{name}: the image has {dim} dimensions; TransferSeg needs a 3D volume")
    if 0 in size[:3]:
        raise TransferSegError(f"{name}: the image has a zero-size axis ({_describe_shape(size[:3][::-1])}); it holds no voxels")
    n = int(round(len(direction_lps) ** 0.5))
    direction = np.array(direction_lps, dtype=np.float64).reshape(n, n)[:3, :3]
    try:
        _check_geometry(np.array(spacing_ijk[:3], dtype=np.float64)[::-1], _LPS[:, None] * direction,
                        np.zeros(3))
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    voxels = int(np.prod(size[:3], dtype=np.int64))
    needed = voxels * (pixel_bytes + _FLOAT32_BYTES)
    available = available_memory_bytes()
    if needed > available:
        raise TransferSegError(
            f"{name}: the volume ({_describe_shape(size[:3][::-1])} voxels) needs about {needed / 2**30:.1f} GiB "
            f"to load but only {available / 2**30:.1f} GiB of memory is free; crop or downsample it first, "
            "or use a machine with more memory"
        )


def _pixel_bytes(pixel_id: int) -> int:
    return {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkFloat32: 4,
    }.get(pixel_id, 8)


def _read_image(path: Path) -> sitk.Image:
    name = str(path)
    if path.is_dir():
        files = _dicom_series_files(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise TransferSegError(f"{name}: the DICOM files cannot be read ({_itk_reason(e)})") from None
        slice_size = reader.GetSize()
        size = (slice_size[0], slice_size[1], len(files))
        _check_header(name, 3, reader.GetNumberOfComponents(), size, _pixel_bytes(reader.GetPixelID()))
        series = sitk.ImageSeriesReader()
        series.SetFileNames(files)
        return _execute(series, name)

    suffix = full_suffix(path)
    if path.name.lower().endswith(".dcm"):
        _refuse_single_dicom_file(path)
    if suffix not in READ_SUFFIXES:
        raise TransferSegError(
            f"{name}: unsupported file type '{suffix or path.name}'; give a NIfTI, NRRD or MetaImage file "
            f"({', '.join(READ_SUFFIXES)}) or a DICOM series folder"
        )
    if path.stat().st_size == 0:
        raise TransferSegError(f"{name}: the file is empty (0 bytes)")
    _check_detached_data_file(path, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        if "size is zero" in str(e):
            raise TransferSegError(f"{name}: the image has a zero-size axis; it holds no voxels") from None
        raise TransferSegError(
            f"{name}: not a readable {suffix} image (the header is damaged or it is another kind of file: "
            f"{_itk_reason(e)})"
        ) from None
    _check_header(name, reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(),
                  _pixel_bytes(reader.GetPixelID()), reader.GetSpacing(), reader.GetDirection())
    if suffix in (".nii", ".nii.gz"):
        chunks = _gzip_chunks(path) if suffix == ".nii.gz" else _file_chunks(path)
        bad = _nonfinite_nifti_voxels(chunks)
        if bad:
            raise TransferSegError(
                f"{name}: the volume has {bad} voxel(s) that are NaN or infinite; repair or mask them (e.g. set "
                "them to the background value) and try again"
            )
    return _execute(reader, name)


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
            f"{path}: input is 2D ({_describe_shape(size[:2])}, a single DICOM slice); TransferSeg needs a 3D "
            "volume: give the folder that holds the whole series"
        )
    raise TransferSegError(f"{path}: this is a single DICOM file; give the folder that holds the whole series instead")


def _check_detached_data_file(path: Path, suffix: str) -> None:
    """A detached header (NRRD ``data file:``, MetaImage ``ElementDataFile =``) whose voxel file is missing
    gets its own message: ITK reports it as a damaged header or a corrupt file."""
    if suffix not in (".nhdr", ".nrrd", ".mhd", ".mha"):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    if suffix in (".nhdr", ".nrrd"):
        match = re.search(r"^data ?file: *(\S+) *$", head.split("\n\n", 1)[0], re.M)
    else:
        match = re.search(r"^ElementDataFile *= *(\S+) *$", head, re.M)
    data = match.group(1) if match else None
    if data is None or data in ("LOCAL", "LIST") or "%" in data:  # inline data, or a list of slice files
        return
    if not (path.parent / data).is_file():
        raise TransferSegError(
            f"{path}: the header names a separate voxel data file, {data}, and it is missing; copy it beside "
            "the header (such an image is two files), or export the image as one file (.nrrd, .nii.gz)"
        )


def _itk_reason(error: Exception) -> str:
    """The useful part of an ITK/teem exception, without the C++ file, line and object noise."""
    text = str(error).replace("sitk::ERROR: ", "")
    match = re.search(r"ITK ERROR: [^:]*\): (.*)", text, re.S)
    if match:
        text = match.group(1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Reason:")]
    teem = [ln for ln in lines if ln.startswith("[nrrd]")]
    if teem:
        return teem[-1]
    return " ".join(ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK"))[:240] or "unknown reason"


def _file_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            yield chunk


def _gzip_chunks(path: Path):
    """The decompressed bytes of a .gz file, read to its end: ITK's NIfTI reader silently zero-fills a
    truncated .gz file, so a truncated or corrupt stream raises here instead."""
    decompressor = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as f:
            while not decompressor.eof and (chunk := f.read(1 << 22)):
                yield decompressor.decompress(chunk, 1 << 24)
                while decompressor.unconsumed_tail and not decompressor.eof:
                    yield decompressor.decompress(decompressor.unconsumed_tail, 1 << 24)
    except zlib.error as e:
        raise TransferSegError(f"{path}: the compressed data is corrupt ({e}); copy or export the file again") from None
    if not decompressor.eof:
        raise TransferSegError(
            f"{path}: the file is truncated (the compressed data ends early, e.g. an interrupted copy or "
            "download); copy or export it again"
        )


def _nifti_float_layout(head: bytes):
    """``(dtype, data offset, voxel count)`` from a NIfTI-1 or NIfTI-2 header of float data; None otherwise."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack_from(endian + "i", head, 0)[0] == 348:
            datatype = struct.unpack_from(endian + "h", head, 70)[0]
            dims = struct.unpack_from(endian + "8h", head, 40)
            offset = int(struct.unpack_from(endian + "f", head, 108)[0])
            break
        if len(head) >= 540 and struct.unpack_from(endian + "i", head, 0)[0] == 540:
            datatype = struct.unpack_from(endian + "h", head, 12)[0]
            dims = struct.unpack_from(endian + "8q", head, 16)
            offset = struct.unpack_from(endian + "q", head, 168)[0]
            break
    else:
        return None
    kind = {16: "f4", 64: "f8"}.get(datatype)
    if kind is None or not 1 <= dims[0] <= 7:
        return None
    count = int(np.prod([max(int(n), 1) for n in dims[1:dims[0] + 1]], dtype=np.int64))
    return np.dtype(endian + kind), offset, count


def _nonfinite_nifti_voxels(chunks) -> int:
    """NaN and ±inf voxels of a single-file NIfTI given as byte chunks (read to the end), 0 for integer
    data: ITK's NIfTI reader turns them into 0 without a word, so they are counted in the file itself."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 540:
            break
    layout = _nifti_float_layout(head)
    if layout is None:
        for _ in chunks:  # to the end all the same: a .gz stream is checked there
            pass
        return 0
    dtype, start, count = layout
    stop = start + count * dtype.itemsize
    position, carry, bad = 0, b"", 0
    for chunk in itertools.chain([head], chunks):
        lo, hi = max(start - position, 0), min(stop - position, len(chunk))
        position += len(chunk)
        if hi <= lo:
            continue
        data = carry + chunk[lo:hi]
        usable = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data, dtype, count=usable // dtype.itemsize)
        bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        carry = data[usable:]
    return bad


def _execute(reader, name: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as e:
        reason = _itk_reason(e)
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
    # A real copy: a view would point into memory that SimpleITK frees with `image`.
    array = np.array(sitk.GetArrayViewFromImage(image), dtype=np.float32, copy=True)
    try:
        volume = Volume(array, spacing=tuple(spacing_ijk[::-1]), directions=_LPS[:, None] * direction_lps,
                        origin=_LPS * origin_lps)
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    try:
        volume.check_finite()
    except TransferSegError as e:
        raise TransferSegError(f"{name}: {e}") from None
    return volume


def load_volume(path) -> Volume:
    """Read a 3D scalar volume: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd),
    or a folder holding a DICOM series (the largest series if there are several).

    Returns a :class:`Volume` (float32, axes (k, j, i), spacing in the same order, RAS geometry).
    CT intensities stay in HU (DICOM rescale slope/intercept applied by SimpleITK).

    Raises :class:`TransferSegError` with an actionable message for a missing, unreadable,
    truncated or non-image file; a 2D, 4D or multi-component image; a zero-size axis; NaN or
    infinite voxels; zero, negative or non-finite spacing; a singular direction matrix; and
    a volume too large for the memory available (estimated from the header, before reading
    the voxels).  The input file is only read, never modified.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TransferSegError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise TransferSegError(f"{path}: permission denied; check that you may read this file")
    with native_stderr_silenced():
        image = _read_image(path)
    return _volume_from_image(image, str(path))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _check_suffix(path: Path, allowed) -> str:
    suffix = full_suffix(path)
    if suffix not in allowed:
        raise TransferSegError(f"{path}: cannot write '{suffix or path.name}' files; use one of {', '.join(allowed)}")
    return suffix


def _image_on(array: np.ndarray, reference: Volume, channels: bool = False) -> sitk.Image:
    """A (k, j, i) array, or with ``channels`` a (C, k, j, i) one as C components, on ``reference``'s geometry."""
    if array.shape[int(channels):] != reference.shape:
        raise TransferSegError(
            f"the array to write is {_describe_shape(array.shape)} but the reference volume is "
            f"{_describe_shape(reference.shape)}; they must match voxel for voxel"
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
            sitk.WriteImage(image, str(tmp), useCompression=full_suffix(path) != ".nii")
        except RuntimeError as e:
            raise TransferSegError(f"{path}: could not write the file ({_itk_reason(e)})") from None
    return path


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
    return _write_image(_image_on(volume.array, volume), path)


def save_labelmap(labels: np.ndarray, reference: Volume, path) -> Path:
    """Write an integer label map (axes (k, j, i)) on ``reference``'s geometry (.nii.gz, .nrrd, …).

    Stored as uint8 (uint16 if a label exceeds 255).
    """
    return _write_image(_image_on(_as_labels(labels), reference), path)


def save_scalar(values: np.ndarray, reference: Volume, path) -> Path:
    """Write a probability or heatmap volume on ``reference``'s geometry.

    Stored as float32, or as uint8 when given uint8 (probability × 255).  A (C, k, j, i) array
    (e.g. one probability per class) is written as one image with C components.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.uint8):
        values = values.astype(np.float32)
    return _write_image(_image_on(values, reference, channels=values.ndim == 4), path)


def _terminology_entry(terminology) -> dict:
    """slicerio's terminology dict from a Slicer TerminologyEntry string or a dict of
    [coding scheme, code value, code meaning] triples (e.g. SNOMED CT: ["SCT", "10200004", "Liver"])."""
    from slicerio.segmentation import terminology_entry_from_string

    if isinstance(terminology, str):
        if terminology.count("~") < 2:
            raise TransferSegError(f"terminology string {terminology!r} is not a Slicer TerminologyEntry")
        return terminology_entry_from_string(terminology)
    entry = dict(terminology)
    for key in ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier"):
        if key in entry and (len(entry[key]) != 3 or not all(isinstance(x, str) for x in entry[key])):
            raise TransferSegError(f"terminology '{key}' must be [coding scheme, code value, code meaning] strings")
    for key in ("category", "type"):
        if key not in entry:
            raise TransferSegError(f"terminology needs '{key}' as [coding scheme, code value, code meaning]")
    entry.setdefault("contextName", "Segmentation category and type - 3D Slicer General Anatomy list")
    if "anatomicRegion" in entry:
        entry.setdefault("anatomicContextName", "Anatomic codes - DICOM master list")
    return entry


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
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise TransferSegError(f"{path}: a segmentation file must end in .seg.nrrd")
    labels = _as_labels(labels)
    if labels.shape != reference.shape:
        _image_on(labels, reference)  # raises the shape error
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
            entry["terminology"] = _terminology_entry(seg["terminology"])
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
    return path
