"""What a file's header says, checked before a single voxel is read.

SimpleITK's readers accept much that they then get wrong without a word (each case measured
with ITK 5.4 and written beside its check): a detached data file outside the header's folder, a
NIfTI pixdim of 0 read as 1 mm, a NIfTI pair header read as its own voxels, a MetaImage
``HeaderSize`` past the data, NaN in an NRRD or MetaImage header read as 0, a DICOM series with
a missing slice stacked at one average spacing.  :mod:`TransferSegLib.io` runs these checks on
every file it reads:

* NRRD and MetaImage text headers: :func:`text_header`, :func:`check_detached_data_file`,
  :func:`check_header_numbers`, :func:`check_meta_data_size`;
* NIfTI: :func:`nifti_header`, :func:`check_nifti_header`, and :func:`check_nifti_voxels` over
  the file's bytes (:func:`file_chunks`, :func:`gzip_chunks`);
* DICOM series: :func:`check_slice_positions` (and, for the frames of one multi-frame file,
  :mod:`TransferSegLib.dicom_file` with :func:`slice_step_tolerance` and :func:`uneven_slices`).

Each problem is one :class:`~TransferSegLib.volume.TransferSegError` that names it.  Imports
nothing above :mod:`TransferSegLib.volume`.
"""
from __future__ import annotations

import itertools
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .volume import GEOMETRY_LIMIT_MM, TransferSegError, describe_shape, direction_problem

__all__ = ["check_detached_data_file", "check_header_numbers", "check_meta_data_size", "check_nifti_header",
           "check_nifti_voxels", "check_slice_positions", "file_chunks", "gzip_chunks", "itk_reason", "nifti_header",
           "shown_name", "slice_step_tolerance", "special_kind", "text_header", "uneven_slices"]


def shown_name(name) -> str:
    """A file name fit for a message: bytes that are not UTF-8 appear as \\x escapes."""
    return os.fsencode(os.fspath(name)).decode("utf-8", "backslashreplace")


def special_kind(path: Path) -> str | None:
    """What a path is when it is neither a regular file nor a folder (after links): reading one blocks or
    never ends."""
    if path.is_fifo():
        return "a FIFO (named pipe)"
    if path.is_socket():
        return "a socket"
    if path.is_char_device() or path.is_block_device():
        return "a device"
    return None


# tag → (keyword, how many numbers): the geometry each slice of a series must state.  Without one, GDCM (ITK 5.4,
# measured) puts a guess in its place: PixelSpacing missing, 0\\0 or NaN → 1 mm, a negative one flips its axis;
# ImagePositionPatient missing → 1 mm slices from origin 0; ImageOrientationPatient missing or zero → axial.
_DICOM_GEOMETRY = {"0020|0032": ("ImagePositionPatient", 3), "0020|0037": ("ImageOrientationPatient", 6),
                   "0028|0030": ("PixelSpacing", 2)}


def _dicom_numbers(name: str, file: str, reader, tag: str) -> np.ndarray:
    """The numbers of geometry ``tag`` in one slice file (read by ``reader``); a missing tag or one that does not
    hold its count of finite numbers is refused."""
    keyword, count = _DICOM_GEOMETRY[tag]
    text = reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    try:
        values = np.array([float(v) for v in text.split("\\")])
    except ValueError:
        values = np.array([])
    if values.size != count or not np.all(np.isfinite(values)):
        what = f"reads '{text}', not {count} finite numbers" if text else "is missing"
        raise TransferSegError(f"{name}: the {keyword} ({tag}) of {shown_name(Path(file).name)} {what}, so ITK would guess "
                               "the geometry; export the series again with its geometry tags")
    return values


def check_slice_positions(name: str, files: list) -> None:
    """ITK stacks a series' slices at their average spacing (its warning goes unseen), so a missing slice, a
    change of slice spacing, a slice given twice or slices offset sideways (a tilted gantry) would misplace
    the slices without a word.  Checked from each file's ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing, which every slice must state (see _DICOM_GEOMETRY); a multi-frame file is left to ITK."""
    positions, normals = [], []
    reader = sitk.ImageFileReader()
    for file in files:
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise TransferSegError(f"{name}: {shown_name(Path(file).name)} cannot be read ({itk_reason(e)})") from None
        if len(reader.GetSize()) > 2 and reader.GetSize()[2] > 1:
            return  # its geometry is stated per frame, which GDCM reads itself
        position, cosines, pixel = (_dicom_numbers(name, file, reader, tag) for tag in _DICOM_GEOMETRY)
        if np.any(pixel <= 0):
            raise TransferSegError(f"{name}: the PixelSpacing (0028|0030) of {shown_name(Path(file).name)} reads "
                                   f"'{reader.GetMetaData('0028|0030').strip()}', not two positive numbers of mm (ITK "
                                   "would take 1 mm for a 0 and flip the axis of a negative one); export the series "
                                   "again")
        normal = np.cross(cosines[:3], cosines[3:])
        if np.linalg.norm(normal) < 1e-6:
            raise TransferSegError(f"{name}: the ImageOrientationPatient (0020|0037) of {shown_name(Path(file).name)} "
                                   f"reads '{reader.GetMetaData('0020|0037').strip()}': its row and column directions "
                                   "are zero or parallel, so ITK would guess the orientation; export the series again")
        positions.append(position)
        normals.append(normal)
    normals = np.array(normals)
    normals /= np.linalg.norm(normals, axis=1)[:, None]
    count, normal = len(files), normals[0]
    turned = np.flatnonzero(np.linalg.norm(normals - normal, axis=1) > 1e-3)
    if turned.size:
        k = int(turned[0])
        raise TransferSegError(f"{name}: slice {k + 1} of {count} ({shown_name(Path(files[k]).name)}) is oriented "
                               f"differently from slice 1 ({shown_name(Path(files[0]).name)}) (ImageOrientationPatient); "
                               "export the slices of one orientation as their own series")
    positions = np.array(positions)
    along = positions @ normal  # mm along the slice normal
    steps = np.diff(along)
    if not steps.size:
        return
    same = np.flatnonzero(np.abs(steps) <= 0.01)
    if same.size:
        k = int(same[0])
        raise TransferSegError(
            f"{name}: slices {k + 1} and {k + 2} of {count} ({shown_name(Path(files[k]).name)}, "
            f"{shown_name(Path(files[k + 1]).name)}) lie at the same position ({along[k]:g} mm along the slice normal): "
            "the series holds a slice twice, or two acquisitions share its series UID; remove the duplicates or "
            "export the series again"
        )
    step = float(np.median(steps))
    tolerance = slice_step_tolerance(step)
    odd = np.flatnonzero(np.abs(steps - step) > tolerance)
    if odd.size:
        raise TransferSegError(f"{name}: {uneven_slices(along, steps, step, tolerance, odd)}; ITK would stack the "
                               "slices at one average spacing and misplace them: export the complete series, or "
                               "resample it onto one slice spacing first (e.g. in 3D Slicer)")
    sideways = np.linalg.norm(np.diff(positions, axis=0) - np.outer(steps, normal), axis=1)
    if np.any(sideways > tolerance):
        raise TransferSegError(
            f"{name}: each slice is offset {float(sideways.max()):.3g} mm sideways from the one before (a tilted "
            "gantry or a sheared stack), which ITK would stack straight; resample the series onto a regular grid "
            "first (e.g. in 3D Slicer)"
        )


def slice_step_tolerance(step: float) -> float:
    """How far (mm) a slice may lie from its place in an evenly spaced stack of ``step`` mm slices: 1 %, at least
    0.01 mm (headers state positions to a few decimals)."""
    return max(0.01, 0.01 * abs(step))


def uneven_slices(along: np.ndarray, steps: np.ndarray, step: float, tolerance: float, odd: np.ndarray) -> str:
    """Where the slice positions ``along`` the normal (sorted) stop being evenly ``step`` apart, in words."""
    count = len(along)
    multiples = np.round(steps / step)
    odd_set = set(odd.tolist())
    isolated = [k for k in odd_set if k - 1 not in odd_set and k + 1 not in odd_set]
    gaps = [k for k in isolated
            if multiples[k] >= 2 and abs(steps[k] - multiples[k] * step) <= tolerance * multiples[k]]
    if len(gaps) == len(odd):  # isolated gaps that are whole steps: slices left out
        k = min(gaps)
        missing = int(multiples[k]) - 1
        what = "a slice is" if missing == 1 else f"{missing} slices are"
        more = f" (and {len(gaps) - 1} more gap(s))" if len(gaps) > 1 else ""
        return (f"{what} missing between positions {along[k]:g} mm and {along[k + 1]:g} mm (slices {k + 1} and "
                f"{k + 2} of {count}, {abs(steps[k]):g} mm apart where the others are {abs(step):g} mm){more}")
    changes = np.flatnonzero(np.abs(np.diff(steps)) > tolerance)
    k = int(changes[0]) + 1 if changes.size else int(odd[0])
    return (f"the slice spacing changes from {abs(steps[k - 1]):g} mm to {abs(steps[k]):g} mm after slice {k + 1} "
            f"of {count} (at {along[k]:g} mm)")


# A text header longer than this is not one we can check for the files it names.
_HEADER_LIMIT = 1 << 20


# NRRD's "data file:" (teem takes the key in any case, with or without the space) and MetaImage's
# "ElementDataFile =" (MetaIO: this case only, "=" or ":"; matched in any case here, to be safe).
_NRRD_DATA_FILE = re.compile(r"\s*data\s?file\s*: (.*)", re.I)


_META_DATA_FILE = re.compile(r"\s*ElementDataFile\s*[=:]\s*(.*?)\s*", re.I)


def text_header(path: Path, suffix: str) -> list[str] | None:
    """The lines of a NRRD or MetaImage text header (latin-1, so that each byte of a file name survives as it
    is; ``"\r"`` kept), the NRRD magic line first; None for another kind of file, or a .nrrd that is not NRRD
    (ITK says what it is).  A NRRD header ends at its first blank line, a MetaImage header with its
    ElementDataFile line (an .mha's voxels follow that line's end)."""
    if suffix not in (".nhdr", ".nrrd", ".mhd", ".mha"):
        return None
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT)
    lines = head.decode("latin-1").split("\n")
    nrrd = suffix in (".nhdr", ".nrrd")
    if nrrd and not lines[0].startswith("NRRD"):
        return None
    for n, line in enumerate(lines[1:] if nrrd else lines, start=1 if nrrd else 0):
        if nrrd and not line.rstrip("\r"):
            return lines[:n]
        if not nrrd and re.match(r"\s*ElementDataFile\s*[=:]", line):  # MetaIO's header ends with it
            return lines[:n + 1]
    if len(head) == _HEADER_LIMIT:
        raise TransferSegError(f"{path}: the header runs on past {_HEADER_LIMIT >> 20} MiB; it is damaged or not "
                               "an image header: export the image again")
    return lines


def check_detached_data_file(path: Path, suffix: str, lines: list[str]) -> None:
    """The voxel data file that a detached header (NRRD ``data file:``, MetaImage ``ElementDataFile =``)
    names must be a regular file in the header's folder or below it.  ITK would read any file the header
    names (``/etc/passwd``, ``../../x``, a link out of the folder) as voxels, block for ever on a FIFO, and
    call a missing file a damaged header.  The multi-file forms (``LIST``, a ``%d`` pattern, whose pattern
    is also handed to the readers' sprintf) are refused outright."""
    nrrd = suffix in (".nhdr", ".nrrd")
    names = []
    for line in lines[1:] if nrrd else lines:
        match = (_NRRD_DATA_FILE if nrrd else _META_DATA_FILE).fullmatch(line.rstrip("\r"))
        if match:
            names.append(match.group(1).lstrip(" \t") if nrrd else match.group(1))
    for data in names:
        if not nrrd and data in ("LOCAL", "Local", "local"):  # the voxels follow the header in the file itself
            continue
        if data.startswith("LIST") or "%" in data:
            raise TransferSegError(
                f"{path}: the header spreads the voxel data over several files ({shown_name(data.encode('latin-1'))}); "
                "TransferSeg reads an image in one file or a header with one data file: export it as one file "
                "(.nrrd, .nii.gz)"
            )
        _check_data_file(path, _data_file_name(data))


def _data_file_name(data: str) -> str:
    """A data file's name as the readers take it: they hold it as a C string, which ends at a NUL byte."""
    return os.fsdecode(data.encode("latin-1").split(b"\0", 1)[0])


def _check_data_file(header: Path, data: str) -> None:
    """One data file named by a detached header: inside the header's folder, there, a regular file, readable."""
    folder, shown = header.parent, shown_name(data)
    inside = folder.resolve()
    # The name as the reader takes it (quotes and spaces included), and as a person may have meant it.
    for name in dict.fromkeys([data, data.strip(), data.strip().strip("\"'")]):
        target = folder / name
        try:
            resolved = target.resolve()
        except (OSError, RuntimeError):  # a loop of links
            raise TransferSegError(f"{header}: the header's voxel data file, {shown_name(name)}, is a loop of symbolic "
                                   "links; export the image as one file (.nrrd, .nii.gz)") from None
        # teem reads "-" as standard input and a name with ":" second as a path of its own (a Windows drive)
        if name == "-" or name[1:2] == ":" or (resolved != inside and inside not in resolved.parents):
            lexical = Path(os.path.abspath(target))
            via = (f", a link to {shown_name(resolved)}" if lexical.is_relative_to(os.path.abspath(folder))
                   and name != "-" and name[1:2] != ":" else "")
            raise TransferSegError(
                f"{header}: the header names a voxel data file outside its own folder ({shown_name(name)}{via}); "
                "TransferSeg reads a detached header's voxels only from the header's folder or below it: move the "
                "data file beside the header, or export the image as one file (.nrrd, .nii.gz)"
            )
    target = folder / data
    if not target.exists():
        literal = any((folder / n).is_file() for n in {data.strip(), data.strip().strip("\"'")} - {data})
        hint = " (the reader takes the name literally, quotes and spaces included: write it bare)" if literal else ""
        raise TransferSegError(
            f"{header}: the header names a separate voxel data file, {shown}, and it is missing{hint}; copy it "
            "beside the header (such an image is two files), or export the image as one file (.nrrd, .nii.gz)"
        )
    kind = special_kind(target) or ("a folder" if target.is_dir() else None)
    if kind:
        raise TransferSegError(f"{header}: the header's voxel data file, {shown}, is {kind}, not a regular file; "
                               "export the image as one file (.nrrd, .nii.gz)")
    if not os.access(target, os.R_OK):
        raise TransferSegError(f"{header}: permission denied for its voxel data file, {shown}; check that you may "
                               "read it")


# The geometry fields of the text headers.  What ITK 5.4 makes of a value that is not a finite number (measured):
# MetaIO reads the whole field as 0 (an origin of 0, a spacing of 0, a matrix of 0); teem takes a NaN spacing
# as "unknown", ITK as 1 mm; and a NRRD space direction longer than ~1e154 mm becomes a 1 mm spacing.
_META_GEOMETRY = re.compile(r"\s*(Offset|Origin|Position|ElementSpacing|ElementSize|TransformMatrix|Rotation"
                            r"|Orientation)\s*[=:](.*)", re.I)


_NRRD_GEOMETRY = re.compile(r"(space directions|space origin|spacings|kinds)\s*:(?!=)(.*)", re.I)


_MILLIMETRES = ("offset", "origin", "position", "elementspacing", "elementsize", "space directions", "space origin",
                "spacings")


def check_header_numbers(path: Path, suffix: str, lines: list[str]) -> None:
    """Each number of a NRRD or MetaImage header's geometry fields must be finite, and a length in mm within
    ±GEOMETRY_LIMIT_MM; ITK would put a guess in the place of what is not (see above).  A NRRD axis whose
    kind is not spatial (a list, a time axis) may have a NaN spacing: teem's "unknown"."""
    nrrd = suffix in (".nhdr", ".nrrd")
    fields = [m.groups() for m in map((_NRRD_GEOMETRY if nrrd else _META_GEOMETRY).fullmatch,
                                      (ln.rstrip("\r") for ln in lines)) if m]
    kinds = next((value.split() for key, value in fields if key.lower() == "kinds"), [])
    for key, value in fields:
        if key.lower() == "kinds":
            continue
        for axis, token in enumerate(t for t in re.split(r"[\s(),]+", value) if t):
            try:
                number = float(token)
            except ValueError:
                continue  # "none" (a NRRD axis without a direction) or a word ITK refuses itself
            if (key.lower() == "spacings" and np.isnan(number) and axis < len(kinds)
                    and kinds[axis].lower() not in ("domain", "space")):
                continue
            header = f"{path}: the {'NRRD' if nrrd else 'MetaImage'} header's {key} ({' '.join(value.split())})"
            if not np.isfinite(number):
                replaced = ("a guess (1 mm, or 0)" if nrrd else "0 for the whole field")
                what = ("a voxel spacing that is zero, negative or not a number" if "spac" in key.lower()
                        or "size" in key.lower() or "directions" in key.lower() else "not a finite number")
                raise TransferSegError(f"{header} holds {token}, {what}; ITK would read {replaced} without a "
                                       "word: fix the header or export the image again")
            if key.lower() in _MILLIMETRES and abs(number) > GEOMETRY_LIMIT_MM:
                raise TransferSegError(f"{header} holds {number:g} mm, beyond ±{GEOMETRY_LIMIT_MM:g} mm: that "
                                       "describes no scan, and a NIfTI file cannot store it; fix the header or "
                                       "export the image again")


def check_meta_data_size(path: Path, lines: list[str], voxel_bytes: int) -> None:
    """An uncompressed MetaImage's voxels must lie inside its data file.  MetaIO (ITK 5.4, measured) reads from
    byte 0 of a separate data file when HeaderSize is beyond the file or negative (other than -1, "the voxels
    end the file"), reads an .mha's own header text as voxels when HeaderSize (there a byte offset from the
    start of the file) points into it, and calls a data file too short for the voxels missing."""
    fields = {}
    for line in lines:
        match = re.fullmatch(r"\s*(\w+)\s*[=:]\s*(.*?)\s*", line.rstrip("\r"))
        if match:
            fields.setdefault(match.group(1).lower(), match.group(2))
    if fields.get("compresseddata", "False").lower() in ("true", "1") or "elementdatafile" not in fields:
        return  # a compressed stream's length is zlib's to check
    data = fields["elementdatafile"]
    local = data in ("LOCAL", "Local", "local")
    target = path if local else path.parent / _data_file_name(data)
    header_end = sum(len(line) + 1 for line in lines) if local else 0
    try:
        size = target.stat().st_size
    except OSError:
        return  # the data file check above said what is wrong with it
    text = fields.get("headersize", "0")
    if not re.fullmatch(r"[+-]?\d+", text):
        raise TransferSegError(f"{path}: the MetaImage HeaderSize ({text}) is not a whole number of bytes; fix the "
                               "header or export the image again")
    skip = int(text)
    where = "the file" if local else f"its data file, {shown_name(target.name)},"
    if skip < -1:
        raise TransferSegError(f"{path}: the MetaImage HeaderSize ({skip}) is negative (only -1, \"the voxels end "
                               "the file\", is allowed), and ITK would read the voxels from the wrong place; fix "
                               "the header or export the image again")
    if local and 0 < skip < header_end:
        raise TransferSegError(f"{path}: the MetaImage HeaderSize ({skip}) points into the header, which ends at "
                               f"byte {header_end}, so ITK would read header text as voxels; fix the header or "
                               "export the image again")
    start = {-1: size - voxel_bytes, 0: header_end}.get(skip, skip)
    if skip > 0 and start + voxel_bytes > size:
        raise TransferSegError(
            f"{path}: the MetaImage HeaderSize ({skip:,} bytes) leaves no room for the voxels: {where} holds "
            f"{size:,} bytes and the voxels need {voxel_bytes:,} after the header, so ITK would read them from the "
            "wrong place; fix the HeaderSize or export the image again")
    if start < header_end or start + voxel_bytes > size:
        raise TransferSegError(
            f"{path}: the file is truncated: {where} holds {size:,} bytes but the voxels need {voxel_bytes:,} "
            f"bytes{f' after its {header_end:,}-byte header' if local else ''} (e.g. an interrupted copy or "
            "download); copy or export it again")


def itk_reason(error: Exception) -> str:
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


def file_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            yield chunk


def gzip_chunks(path: Path):
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


# header size → field → (struct format, byte offset): the NIfTI-1 and NIfTI-2 fields checked here.
_NIFTI_FIELDS = {
    348: {"dims": ("8h", 40), "datatype": ("h", 70), "bitpix": ("h", 72), "pixdim": ("8f", 76),
          "vox_offset": ("f", 108), "qform_code": ("h", 252), "sform_code": ("h", 254), "quatern": ("6f", 256),
          "srow": ("12f", 280), "magic": ("4s", 344)},
    540: {"magic": ("8s", 4), "datatype": ("h", 12), "bitpix": ("h", 14), "dims": ("8q", 16),
          "pixdim": ("8d", 104), "vox_offset": ("q", 168), "sform_code": ("i", 348), "srow": ("12d", 400)},
}


_NIFTI_ONE_FILE = (b"n+1\0", b"n+2\0\r\n\x1a\n")  # magic of a .nii that holds its own voxels


def nifti_header(path: Path, suffix: str) -> dict | None:
    """The fields of a NIfTI-1 or NIfTI-2 header that are checked here (plus ``size``, the header's length);
    None if the file does not start with one (ITK then says what it is)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if suffix == ".nii.gz":
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 540)
        except zlib.error:
            return None
    for endian, size in itertools.product("<>", _NIFTI_FIELDS):
        if len(head) >= size and struct.unpack_from(endian + "i", head, 0)[0] == size:
            fields = {key: struct.unpack_from(endian + fmt, head, offset)
                      for key, (fmt, offset) in _NIFTI_FIELDS[size].items()}
            header = {key: value if len(value) > 1 else value[0] for key, value in fields.items()}
            return {**header, "size": size, "endian": endian}
    return None


def check_nifti_header(name: str, header: dict) -> None:
    """What ITK's NIfTI reader would otherwise replace without a word (measured, ITK 5.4): a pixdim that is 0
    or not a number becomes 1 mm, a negative one flips its axis; a sform that is not a rotation times pixdim
    gives way to the qform; a vox_offset that is not a number or points into the header reads the voxels
    from byte 348."""
    if header["size"] == 540:  # ITK 5.4's NIfTI reader takes NIfTI-1 only (measured: "not recognized as a NIFTI file")
        raise TransferSegError(f"{name}: NIfTI-2 files are not supported by the reader; save it as NIfTI-1 (e.g. "
                               "nibabel.Nifti1Image) or NRRD")
    magic = header["magic"]
    if magic not in _NIFTI_ONE_FILE:  # ITK reads such a .nii's own bytes (header included) as voxels, zero-filled
        what = ("the header of a two-file NIfTI pair (magic 'ni1'), whose voxels are in a separate .img file"
                if magic == b"ni1\0" else f"not a single-file NIfTI (its magic is {magic!r}, not b'n+1\\x00')")
        raise TransferSegError(f"{name}: the file is {what}; TransferSeg reads single-file NIfTI (.nii, .nii.gz): "
                               "save the .hdr/.img pair as one .nii file (e.g. nibabel.save(nibabel.load('x.hdr'), "
                               "'x.nii'))")
    dims = header["dims"]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or min(dims[1:ndim + 1]) < 0:
        raise TransferSegError(f"{name}: the NIfTI header is damaged (its dim field reads {list(dims)}); export "
                               "the image again")
    if 0 in dims[1:ndim + 1]:
        raise TransferSegError(f"{name}: the image has a zero-size axis ({describe_shape(dims[1:ndim + 1][::-1])}); "
                               "it holds no voxels")
    offset = header["vox_offset"]
    if header["magic"] in _NIFTI_ONE_FILE and not (np.isfinite(offset) and offset >= header["size"] + 4):
        where = ("is not a number" if not np.isfinite(offset)
                 else f"points into the header (before byte {header['size'] + 4})")
        raise TransferSegError(f"{name}: the NIfTI header's vox_offset ({offset:g}) {where}, so its voxels cannot be "
                               "found; the header is damaged: export the image again")
    if ndim < 3:
        return  # 2D: the header check says so
    pixdim = np.array(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise TransferSegError(
            f"{name}: the voxel spacing in the NIfTI header (pixdim {', '.join(f'{p:g}' for p in pixdim)} mm) is "
            "zero, negative or not a number, which ITK would replace by a guess; fix the spacing in the image "
            "header and save it again"
        )
    if header["sform_code"] > 0:
        problem = direction_problem(np.array(header["srow"], dtype=np.float64).reshape(3, 4)[:, :3] / pixdim)
        if problem:
            raise TransferSegError(
                f"{name}: the NIfTI sform (voxel-to-world matrix) is not a rotation times the voxel spacing "
                f"(pixdim): {problem}; ITK would read another geometry instead: resample the image onto a "
                "regular grid or fix its header"
            )
        if header.get("qform_code", 0) > 0:
            _check_qform_matches_sform(name, header, pixdim)


def _check_qform_matches_sform(name: str, header: dict, pixdim: np.ndarray) -> None:
    """A NIfTI-1 with both a qform and an sform says where its voxels are twice; ITK takes one of them
    without a word (measured: the qform), so two that disagree are refused: which one is right is the
    user's to say."""
    b, c, d, *offset = (float(v) for v in header["quatern"])
    a = np.sqrt(max(1.0 - (b * b + c * c + d * d), 0.0))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if header["pixdim"][0] < 0 else 1.0  # NIfTI-1: the sign of pixdim[0] flips the k axis
    qform = np.column_stack([rotation * (pixdim * [1.0, 1.0, qfac]), offset])
    sform = np.array(header["srow"], dtype=np.float64).reshape(3, 4)
    moved = float(np.linalg.norm(qform[:, 3] - sform[:, 3]))
    turned = float(np.abs(qform[:, :3] - sform[:, :3]).max() / pixdim.max())
    if moved > 0.1 or turned > 1e-3:
        what = f"their origins lie {moved:.3g} mm apart" if moved > 0.1 else "their axes point different ways"
        raise TransferSegError(f"{name}: the NIfTI header gives two geometries that disagree (qform and sform: {what}) "
                               "and a reader takes one of them silently; save the image again with the right one "
                               "(e.g. in 3D Slicer, or nibabel with set_qform/set_sform)")


def check_nifti_voxels(name: str, chunks, header: dict | None) -> None:
    """Read a single-file NIfTI given as byte chunks to its end (a .gz stream is checked there): voxel data
    that would run past the end (ITK zero-fills it) or float voxels that are NaN or ±inf (ITK turns them into
    0 without a word) are refused."""
    layout = _nifti_voxel_layout(header)
    if layout is None:
        for _ in chunks:
            pass
        return
    start, stop, dtype = layout
    position, carry, bad = 0, b"", 0
    for chunk in chunks:
        lo, hi = max(start - position, 0), min(stop - position, len(chunk))
        position += len(chunk)
        if dtype is None or hi <= lo:
            continue
        data = carry + chunk[lo:hi]
        usable = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data, dtype, count=usable // dtype.itemsize)
        bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        carry = data[usable:]
    if position < stop:
        raise TransferSegError(
            f"{name}: the file is truncated: its header says the voxels run to byte {stop:,} but there are only "
            f"{position:,} bytes (e.g. an interrupted copy or download); copy or export it again"
        )
    if bad:
        raise TransferSegError(
            f"{name}: the volume has {bad} voxel(s) that are NaN or infinite; repair or mask them (e.g. set "
            "them to the background value) and try again"
        )


def _nifti_voxel_layout(header: dict | None):
    """``(first byte, end byte, dtype or None)`` of a single-file NIfTI's voxels (the dtype for float data, whose
    NaN are counted); None if the file does not hold its voxels itself."""
    if header is None or header["magic"] not in _NIFTI_ONE_FILE or header["bitpix"] <= 0 or header["bitpix"] % 8:
        return None
    ndim = header["dims"][0]
    count = int(np.prod([int(n) for n in header["dims"][1:ndim + 1]], dtype=object))  # Python ints: no overflow
    start = int(header["vox_offset"])
    kind = {16: "f4", 64: "f8"}.get(header["datatype"])
    return start, start + count * header["bitpix"] // 8, np.dtype(header["endian"] + kind) if kind else None
