"""Hostile volumes, round 2: inputs that ITK reads without a word into something wrong, or that crash it.

Five kinds, each of which ran with exit 0 or a traceback before: (1) a detached header whose data
file lies outside the header's folder, is a FIFO or is missing; (2) silently wrong geometry: a
sheared or scaled direction matrix, a NIfTI sform that is not a rotation times pixdim, a NIfTI
pixdim of 0 or NaN, a DICOM series with a missing, repeated or unevenly spaced slice; (3) a file
or folder name that is not UTF-8, on which SimpleITK aborts the process; (4) a NIfTI vox_offset
that is not a number or points outside the file; (5) float64 voxels beyond float32's range.

Every case must end with exit status 2 and exactly one stderr line, ``transferseg: error: …``,
naming the problem; nothing in the case folder or the models' folders is created or changed, so
every input is byte-for-byte what it was.  The harness is test_hostile_inputs.py's; the positive
controls at the end check that what is valid still loads with the right geometry.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DIRECTIONS_LPS, write_dicom_series, write_image
from test_hostile_inputs import (SMALL, Case, _nrrd_header, _signal_handlers_restored,  # noqa: F401 (fixtures)
                                 assert_one_clear_line, ct_source)

from TransferSegLib.cli import main
from TransferSegLib.io import load_volume
from TransferSegLib.volume import TransferSegError, Volume

NOT_UTF8 = b"\xff\xfe"  # bytes that no UTF-8 name holds
CAN_NAME_NOT_UTF8 = sys.platform.startswith("linux")  # macOS and Windows refuse such names themselves
REAL_DICOM = Path.home() / ".cache/transferseg/real-ct/totalsegmentator/example_ct_dicom"


def _state(*roots) -> dict:
    """What test_hostile_inputs' ``_snapshot`` records (every folder, every file's sha256), except that a FIFO
    is recorded as one and never opened (reading it would block), and a link as its target."""
    state = {}
    for root in map(Path, roots):
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                key = str(path.relative_to(root.parent))
                if path.is_symlink():
                    state[key] = f"<link to {os.readlink(path)}>"
                elif path.is_fifo():
                    state[key] = "<fifo>"
                elif path.is_dir():
                    state[key] = "<folder>"
                else:
                    state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# --- (1) detached data files ------------------------------------------------------------------
def _secret(c: Case) -> Path:
    """A file of the right size for the headers here, beside the case's input folder (every case has it):
    ITK read it as voxels."""
    return c.root / "secret.raw"


def _nhdr(c: Case, data_line: str, name: str = "scan.nhdr", folder: Path | None = None, extra: str = "") -> Path:
    """A detached NRRD header (float 10 × 9 × 8) whose data-file line is ``data_line``."""
    header = _nrrd_header(c, "template.nhdr", {}, detached="x").read_text(encoding="latin-1")
    c.path("template.nhdr").unlink()
    header = header.replace("data file: x\n", data_line + "\n" + extra)
    path = (folder or c.dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode("latin-1"))
    return path


def _mhd(c: Case, data_value: str, name: str = "scan.mhd", key: str = "ElementDataFile") -> Path:
    """A detached MetaImage header (float 10 × 9 × 8) whose data file is ``data_value``."""
    good = write_image(SMALL, c.root / "template.mhd", spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    text = good.read_text(encoding="latin-1")
    good.unlink()
    (c.root / "template.raw").unlink()
    path = c.path(name)
    path.write_bytes(re.sub(r"ElementDataFile = .*", lambda m: f"{key} = {data_value}", text).encode("latin-1"))
    return path


def _etc_passwd(c: Case) -> list:
    path = _nrrd_header(c, "passwd.nhdr", {"type: float": "type: uchar", "sizes: 10 9 8": "sizes: 4 4 2"},
                        detached="/etc/passwd")
    return ["info", str(path)]


def _symlink_out(c: Case) -> Path:
    (c.dir / "scan.raw").symlink_to(_secret(c))
    return _nhdr(c, "data file: scan.raw")


def _symlinked_folder_out(c: Case) -> Path:
    outside = c.root / "elsewhere"
    outside.mkdir()
    shutil.copy(_secret(c), outside / "scan.raw")
    (c.dir / "data").symlink_to(outside, target_is_directory=True)
    return _mhd(c, "data/scan.raw")


def _fifo(c: Case, make_header) -> Path:
    os.mkfifo(c.dir / "scan.raw")
    return make_header(c)


# --- (2) geometry ---------------------------------------------------------------------------------
def _nifti(c: Case, name: str, **fields) -> Path:
    """An uncompressed NIfTI-1 of SMALL (spacing 0.71, 0.83, 3.3 mm) with header fields overwritten:
    ``o<byte offset>=(struct format, values)``; ``gz`` gzips the result."""
    gz = fields.pop("gz", False)
    path = write_image(SMALL, c.path(name.removesuffix(".gz")), compress=False)
    raw = bytearray(path.read_bytes())
    for offset, (fmt, values) in fields.items():
        struct.pack_into(fmt, raw, int(offset[1:]), *values)
    if gz:
        path.unlink()
        path = c.path(name)
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    return path


NO_QFORM_NO_SFORM = ("<hh", (0, 0))  # at byte 252: qform_code, sform_code


def _mha_with_matrix(c: Case, name: str, matrix: str) -> Path:
    """A MetaImage whose TransformMatrix (nine numbers, as MetaIO writes them) is ``matrix``."""
    path = write_image(SMALL, c.path(name), spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    raw = path.read_bytes()
    assert b"TransformMatrix = 1 0 0 0 1 0 0 0 1\n" in raw
    path.write_bytes(raw.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1\n", f"TransformMatrix = {matrix}\n".encode()))
    return path


def _dicom_series(folder: Path, positions, cosines=(1, 0, 0, 0, 1, 0)) -> Path:
    """A CT series of 9 × 10 int16 slices, one file per (x, y, z) position in mm (ImagePositionPatient),
    every slice with ImageOrientationPatient ``cosines`` (one tuple, or one per slice)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    per_slice = cosines if isinstance(cosines[0], tuple) else [cosines] * len(positions)
    for k, (position, orientation) in enumerate(zip(positions, per_slice)):
        image = sitk.GetImageFromArray((SMALL[k % 8, :, :] * 100 + 40).astype(np.int16))
        image.SetSpacing((0.8, 0.8))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.77",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.78", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0018|0050": "3", "0028|1052": "0", "0028|1053": "1",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(image)
    return folder


def _along_z(zs) -> list:
    return [(0.0, 0.0, float(z)) for z in zs]


def _nifti_pair_as_nii(c: Case, name: str) -> Path:
    """The 348-byte header of a NIfTI-1 .hdr/.img pair (magic 'ni1') under a single-file name, the .img beside it."""
    nib.save(nib.Nifti1Pair(SMALL.transpose(2, 1, 0), np.diag([0.8, 0.8, 3.0, 1.0])), c.path("pair.hdr"))
    header = c.path("pair.hdr").read_bytes()
    c.path(Path(name.removesuffix(".gz")).with_suffix(".img").name).write_bytes(c.path("pair.img").read_bytes())
    c.path(name).write_bytes(gzip.compress(header) if name.endswith(".gz") else header)
    return c.path(name)


def _mhd_header_size(c: Case, header_size, data: bytes = b"J" * 28 + SMALL.tobytes()) -> Path:
    """A detached MetaImage of SMALL whose HeaderSize is ``header_size`` and whose data file holds ``data``."""
    c.path("scan.raw").write_bytes(data)
    path = _mhd(c, "scan.raw")
    text = path.read_text(encoding="latin-1")
    if header_size is not None:
        text = text.replace("ElementDataFile", f"HeaderSize = {header_size}\nElementDataFile")
    path.write_text(text, encoding="latin-1")
    return path


def _mha_field(c: Case, name: str, old: bytes, new: bytes) -> Path:
    """An inline MetaImage of SMALL (spacing 1, origin 0, identity matrix) with header text ``old`` replaced."""
    path = write_image(SMALL, c.path(name), spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    return path


def _mha_header_size(c: Case, name: str, header_size: str) -> Path:
    return _mha_field(c, name, b"ElementDataFile = LOCAL", f"HeaderSize = {header_size}\nElementDataFile = LOCAL".encode())


def _dicom_tag(folder: Path, tag: str, value: str | None = None, slices=None) -> Path:
    """Each slice file (or those numbered in ``slices``) of a series written by write_dicom_series (implicit VR
    little endian) with ``tag``'s value replaced by ``value``, or, for None, the tag renumbered to a retired one
    that no reader takes for it (0020|0030 for 0020|0032, ...): the tag is gone."""
    group, element = (int(x, 16) for x in tag.split("|"))
    key = struct.pack("<HH", group, element)
    for k, file in enumerate(sorted(folder.iterdir())):
        if slices is not None and k not in slices:
            continue
        raw = bytearray(file.read_bytes())
        at = raw.index(key)
        length = struct.unpack_from("<I", raw, at + 4)[0]
        if value is None:
            struct.pack_into("<HH", raw, at, group, element - 2)
        else:
            text = value.encode() + b" " * (len(value) % 2)
            raw[at + 4:at + 8 + length] = struct.pack("<I", len(text)) + text
        file.write_bytes(bytes(raw))
    return folder


def _series(c: Case) -> Path:
    return write_dicom_series((SMALL * 100).astype(np.int16), c.path("series"), spacing_ijk=(0.8, 0.8, 3.0),
                              origin_lps=(5.0, 6.0, 7.0))


# --- (3) names that are not UTF-8 ---------------------------------------------------------------
def _not_utf8(c: Case, name: bytes, folder: bytes | None = None) -> Path:
    """A copy of the good CT under a name (and optionally in a folder) whose bytes are not UTF-8."""
    holder = c.dir / os.fsdecode(folder) if folder else c.dir
    holder.mkdir(exist_ok=True)
    return Path(shutil.copy(c._ct_source, holder / os.fsdecode(name)))


def _dicom_with_a_not_utf8_file(c: Case) -> Path:
    folder = _dicom_series(c.path("series"), _along_z(3.0 * k for k in range(12)))
    (folder / "IM0005.dcm").rename(folder / os.fsdecode(NOT_UTF8 + b"IM0005.dcm"))
    return folder


def _nrrd_spacings(c: Case, spacings: str) -> Path:
    """An attached NRRD of SMALL with per-axis ``spacings`` and no space directions."""
    path = write_image(SMALL, c.path("spacings.nrrd"), spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    head, data = path.read_bytes().split(b"\n\n", 1)
    lines = [ln for ln in head.split(b"\n") if not ln.startswith((b"space", b"space directions", b"space origin"))]
    path.write_bytes(b"\n".join(lines) + f"\nspacings: {spacings}\n\n".encode() + data)
    return path


def info(source) -> list:
    return ["info", str(source)]


# name → (build the argv in the case folder, the words of the message that name the problem)
CASES = {
    # (1) detached data files
    "NRRD data file /etc/passwd (info)": (_etc_passwd, r"outside its own folder \(/etc/passwd\)"),
    "NRRD data file at an absolute path": (lambda c: c.segment(_nhdr(c, f"data file: {_secret(c)}")),
                                           r"voxel data file outside its own folder \(/"),
    "NRRD data file ../ out of the folder": (
        lambda c: c.segment(_nhdr(c, "data file: ../secret.raw"), command="detect"),
        r"outside its own folder \(\.\./secret\.raw\)"),
    "NRRD data file ../../ from a subfolder": (
        lambda c: info(_nhdr(c, "data file: ../../secret.raw", folder=c.dir / "sub")),
        r"outside its own folder \(\.\./\.\./secret\.raw\)"),
    "NRRD key in capitals: DATA FILE": (lambda c: c.segment(_nhdr(c, "DATA FILE: ../secret.raw")),
                                        r"outside its own folder \(\.\./secret\.raw\)"),
    "NRRD key spelt datafile": (lambda c: info(_nhdr(c, f"DataFile: {_secret(c)}")), "outside its own folder"),
    "NRRD data file through a symlink": (lambda c: c.segment(_symlink_out(c)), r"scan\.raw, a link to .*secret\.raw"),
    "MetaImage data file through a symlinked folder": (lambda c: info(_symlinked_folder_out(c)),
                                                        r"data/scan\.raw, a link to .*elsewhere"),
    "NRRD data file '-' (standard input)": (lambda c: c.segment(_nhdr(c, "data file: -")),
                                            r"outside its own folder \(-\)"),
    "NRRD data file that is a FIFO": (lambda c: c.segment(_fifo(c, lambda c: _nhdr(c, "data file: scan.raw"))),
                                      r"scan\.raw, is a FIFO \(named pipe\), not a regular file"),
    "MetaImage data file that is a FIFO": (lambda c: info(_fifo(c, lambda c: _mhd(c, "scan.raw"))), "is a FIFO"),
    "NRRD data file with spaces, missing": (lambda c: c.segment(_nhdr(c, "data file: my scan 2.raw"), command="detect"),
                                            r"voxel data file, my scan 2\.raw, and it is missing"),
    "MetaImage quoted data file with spaces": (
        lambda c: info((c.path("my scan.raw").write_bytes(SMALL.tobytes()), _mhd(c, '"my scan.raw"'))[1]),
        r"\"my scan\.raw\", and it is missing \(the reader takes the name literally"),
    "MetaImage data file at an absolute path": (lambda c: c.segment(_mhd(c, str(_secret(c)))),
                                                r"outside its own folder \(/.*secret\.raw\)"),
    "MetaImage data file ../": (lambda c: c.segment(_mhd(c, "../secret.raw"), command="detect"),
                                r"outside its own folder \(\.\./secret\.raw\)"),
    "MetaImage key in lower case": (lambda c: info(_mhd(c, f"{_secret(c)}\nElementDataFile = LOCAL",
                                                        key="elementdatafile")), "outside its own folder"),
    "NRRD data file LIST": (lambda c: c.segment(_nhdr(c, "data file: LIST 3", extra="../secret.raw\n")),
                            r"spreads the voxel data over several files \(LIST 3\)"),
    "NRRD data file %d pattern": (lambda c: info(_nhdr(c, "data file: ../slice%03d.raw 1 8 1 2")),
                                  r"several files \(\.\./slice%03d\.raw 1 8 1 2\)"),
    "MetaImage ElementDataFile LIST": (lambda c: c.segment(_mhd(c, "LIST 2D\n../a.raw\n../b.raw"), command="detect"),
                                       r"several files \(LIST 2D\)"),
    "MetaImage ElementDataFile %d pattern": (lambda c: info(_mhd(c, "slice%s%n%d.raw 1 8 1")), r"several files"),
    # (2) geometry
    "NRRD sheared space directions": (
        lambda c: c.segment(_nrrd_header(c, "shear.nrrd", {"(0,1,0)": "(0.5,1,0)"})),
        r"not orthonormal: its i and j axes are 63\.43° apart, not 90° \(a shear\)"),
    "MetaImage TransformMatrix with a scale": (
        lambda c: c.segment(_mha_with_matrix(c, "scaled.mha", "2 0 0 0 1 0 0 0 1"), command="detect"),
        r"not orthonormal: its i axis has length 2, not 1 \(a scale\)"),
    "MetaImage TransformMatrix with a shear": (
        lambda c: info(_mha_with_matrix(c, "sheared.mha", "1 0 0 0.2 1 0 0 0 1")),
        r"its i and j axes are 78\.\d+° apart"),
    "NIfTI sform with a shear (qform kept)": (
        lambda c: info(_nifti(c, "shear.nii", o280=("<4f", (-0.71, 0.4, 0.0, 12.5)))),
        r"NIfTI sform .* not a rotation times the voxel spacing \(pixdim\): its i and j axes .*\(a shear\)"),
    "NIfTI sform scale that pixdim does not hold": (
        lambda c: c.segment(_nifti(c, "scale.nii.gz", o280=("<f", (-1.42,)), gz=True)),
        r"NIfTI sform .* its i axis has length 2, not 1 \(a scale\)"),
    "NIfTI sform only, sheared": (
        lambda c: c.segment(_nifti(c, "sform_only.nii", o252=("<hh", (0, 1)),
                                   o296=("<4f", (0.3, -0.83, 0.0, -33.25))), command="detect"),
        r"NIfTI sform .*a shear"),
    "NIfTI qform and sform 1000 mm apart": (
        lambda c: c.segment(_nifti(c, "two_origins.nii", o292=("<f", (1012.5,)))),
        r"gives two geometries that disagree \(qform and sform: their origins lie 1e\+03 mm apart\)"),
    "NIfTI qform and sform 5 mm apart, gzipped": (
        lambda c: info(_nifti(c, "five_mm.nii.gz", o308=("<f", (-28.25,)), gz=True)),
        r"qform and sform: their origins lie 5 mm apart"),
    "NIfTI sform with its k axis reversed from the qform's": (
        lambda c: c.segment(_nifti(c, "reversed.nii", o312=("<4f", (0.0, 0.0, -3.3, 101.1))), command="detect"),
        r"qform and sform: their axes point different ways"),
    "NIfTI pixdim 0, no qform or sform": (
        lambda c: c.segment(_nifti(c, "pixdim0.nii", o252=NO_QFORM_NO_SFORM, o80=("<f", (0.0,)))),
        r"\(pixdim 0, 0\.83, 3\.3 mm\) is zero, negative or not a number"),
    "NIfTI pixdim NaN, no qform or sform": (
        lambda c: info(_nifti(c, "pixdim_nan.nii.gz", o252=NO_QFORM_NO_SFORM, o84=("<f", (float("nan"),)), gz=True)),
        r"\(pixdim 0\.71, nan, 3\.3 mm\) is zero, negative"),
    "NIfTI pixdim infinite": (lambda c: c.segment(_nifti(c, "pixdim_inf.nii", o88=("<f", (float("inf"),))),
                                                  command="detect"), r"\(pixdim 0\.71, 0\.83, inf mm\)"),
    "DICOM series with a slice missing": (
        lambda c: c.segment(_dicom_series(c.path("series"), _along_z(3.0 * k for k in range(24) if k != 12))),
        r"a slice is missing between positions 33 mm and 39 mm \(slices 12 and 13 of 23"),
    "DICOM series with two slices missing": (
        lambda c: info(_dicom_series(c.path("series"), _along_z(2.5 * k for k in range(20) if k not in (5, 6)))),
        r"2 slices are missing between positions 10 mm and 17\.5 mm"),
    "DICOM series whose spacing changes": (
        lambda c: c.segment(_dicom_series(c.path("series"), _along_z([3.0 * k for k in range(12)]
                                                                      + [33.0 + 6.0 * k for k in range(1, 13)])),
                            command="detect"),
        r"slice spacing changes from 3 mm to 6 mm after slice 12 of 24 \(at 33 mm\)"),
    "DICOM series with a slice given twice": (
        lambda c: info(_dicom_series(c.path("series"), _along_z(sorted([3.0 * k for k in range(16)] + [21.0])))),
        r"slices 8 and 9 of 17 \(IM000[78]\.dcm, IM000[78]\.dcm\) lie at the same position \(21 mm"),
    "DICOM series from a tilted gantry": (
        lambda c: c.segment(_dicom_series(c.path("series"), [(0.0, 0.5 * k, 3.0 * k) for k in range(12)])),
        r"offset 0\.5 mm sideways"),
    "DICOM series of two orientations": (
        lambda c: info(_dicom_series(c.path("series"), _along_z(3.0 * k for k in range(10)),
                                     cosines=tuple([(1, 0, 0, 0, 1, 0)] * 6 + [(0, 1, 0, 1, 0, 0)] * 4))),
        r"slice \d+ of 10 \(IM000\d\.dcm\) is oriented differently from slice 1 \(IM000\d\.dcm\)"),
    # (3) names that are not UTF-8
    "file name not UTF-8 (info)": (lambda c: info(_not_utf8(c, NOT_UTF8 + b"case.nii.gz")),
                                   r"\\xff\\xfecase\.nii\.gz: the name of the file is not valid UTF-8"),
    "folder name not UTF-8": (lambda c: c.segment(_not_utf8(c, b"ct.nii.gz", folder=b"patient" + NOT_UTF8)),
                              r"patient\\xff\\xfe: the name of the folder is not valid UTF-8"),
    "DICOM folder name not UTF-8": (
        lambda c: c.segment(_dicom_series(c.path("series"), _along_z(range(0, 30, 3))).rename(
            c.dir / os.fsdecode(b"series" + NOT_UTF8)), command="detect"),  # SimpleITK cannot write there itself
        r"series\\xff\\xfe: the name of the folder is not valid UTF-8"),
    "a DICOM file of the series not UTF-8": (lambda c: info(_dicom_with_a_not_utf8_file(c)),
                                             r"\\xff\\xfeIM0005\.dcm: the name of a DICOM file of the series"),
    # (4) NIfTI vox_offset and dims
    "NIfTI vox_offset NaN": (lambda c: c.segment(_nifti(c, "off_nan.nii", o108=("<f", (float("nan"),)))),
                             r"vox_offset \(nan\) is not a number"),
    "NIfTI vox_offset infinite (.gz)": (
        lambda c: info(_nifti(c, "off_inf.nii.gz", o108=("<f", (float("inf"),)), gz=True)),
        r"vox_offset \(inf\) is not a number"),
    "NIfTI vox_offset negative": (
        lambda c: c.segment(_nifti(c, "off_neg.nii", o108=("<f", (-352.0,))), command="detect"),
        r"vox_offset \(-352\) points into the header \(before byte 352\)"),
    "NIfTI vox_offset 0": (lambda c: info(_nifti(c, "off_zero.nii", o108=("<f", (0.0,)))),
                           r"vox_offset \(0\) points into the header"),
    "NIfTI vox_offset beyond the file": (lambda c: c.segment(_nifti(c, "off_far.nii", o108=("<f", (1e9,)))),
                                         r"truncated: its header says the voxels run to byte 1,000,002,880 but there "
                                         r"are only 3,232 bytes"),
    "NIfTI vox_offset huge (.gz)": (lambda c: info(_nifti(c, "off_huge.nii.gz", o108=("<f", (3e38,)), gz=True)),
                                    r"truncated: its header says the voxels run to byte"),
    "NIfTI more slices declared than stored": (
        lambda c: c.segment(_nifti(c, "short.nii", o46=("<h", (9,))), command="detect"),
        r"voxels run to byte 3,592 but there are only 3,232 bytes"),
    "NIfTI negative dim": (lambda c: info(_nifti(c, "dim_neg.nii", o42=("<h", (-10,)))),
                           r"NIfTI header is damaged \(its dim field reads \[3, -10, 9, 8"),
    # (5) float64 beyond float32's range
    "float64 voxels at 1e300 (NRRD)": (
        lambda c: c.segment(write_image(np.where(SMALL > 1.5, 1e300, SMALL.astype(np.float64)), c.path("big.nrrd"))),
        rf"{int((SMALL > 1.5).sum())} voxel\(s\) are beyond ±3\.4e38, outside the float32 range"),
    "float64 voxels at -1e300 (NIfTI)": (
        lambda c: info(write_image(np.where(SMALL < -1.5, -1e300, SMALL.astype(np.float64)), c.path("big.nii.gz"))),
        rf"{int((SMALL < -1.5).sum())} voxel\(s\) are beyond ±3\.4e38"),
    # (6) headers whose geometry or voxels ITK silently replaces
    "NIfTI pair header as .nii": (lambda c: info(_nifti_pair_as_nii(c, "scan.nii")),
                                  r"header of a two-file NIfTI pair \(magic 'ni1'\), whose voxels are in a separate"),
    "NIfTI pair header as .nii.gz": (lambda c: c.segment(_nifti_pair_as_nii(c, "scan.nii.gz")),
                                     r"scan\.nii\.gz: the file is the header of a two-file NIfTI pair"),
    "NIfTI magic neither n+1 nor ni1": (lambda c: info(_nifti(c, "nomagic.nii", o344=("4s", (b"abc\0",)))),
                                        r"not a single-file NIfTI \(its magic is b'abc\\x00'"),
    "NIfTI-2 file": (lambda c: info((nib.save(nib.Nifti2Image(SMALL.transpose(2, 1, 0), np.eye(4)), c.path("n2.nii")),
                                     c.path("n2.nii"))[1]),
                     r"NIfTI-2 files are not supported by the reader; save it as NIfTI-1"),
    "NIfTI-2 file (.gz, segment)": (
        lambda c: c.segment((nib.save(nib.Nifti2Image(SMALL.transpose(2, 1, 0), np.eye(4)), c.path("n2.nii.gz")),
                             c.path("n2.nii.gz"))[1]), r"NIfTI-2 files are not supported"),
    "NIfTI-2 pair header as .nii": (
        lambda c: info((nib.save(nib.Nifti2Pair(SMALL.transpose(2, 1, 0), np.eye(4)), c.path("p2.hdr")),
                        shutil.copy(c.path("p2.hdr"), c.path("p2.nii")))[1]), r"NIfTI-2 files are not supported"),
    "MetaImage HeaderSize beyond the data file": (lambda c: info(_mhd_header_size(c, 10**12)),
                                                  r"HeaderSize \(1,000,000,000,000 bytes\) leaves no room for the voxels: "
                                                  r"its data file, scan\.raw, holds 2,908 bytes and the voxels need 2,880"),
    "MetaImage HeaderSize negative": (lambda c: c.segment(_mhd_header_size(c, -5)),
                                      r"HeaderSize \(-5\) is negative \(only -1"),
    "MetaImage HeaderSize 2^63": (lambda c: info(_mhd_header_size(c, 2**63)), r"HeaderSize \(9,223,372,036,854,775,808"),
    "MetaImage HeaderSize not whole": (lambda c: info(_mhd_header_size(c, "28.5")), r"HeaderSize \(28\.5\) is not a whole"),
    "MetaImage data file too short": (lambda c: c.segment(_mhd_header_size(c, None, SMALL.tobytes()[:-4]), command="detect"),
                                      r"truncated: its data file, scan\.raw, holds 2,876 bytes but the voxels need 2,880"),
    "MetaImage HeaderSize -1, data file too short": (lambda c: info(_mhd_header_size(c, -1, SMALL.tobytes()[:100])),
                                                     r"truncated: its data file, scan\.raw, holds 100 bytes"),
    "MetaImage .mha HeaderSize into its header": (lambda c: info(_mha_header_size(c, "into.mha", "10")),
                                                  r"HeaderSize \(10\) points into the header, which ends at byte"),
    "MetaImage .mha truncated": (lambda c: c.segment(_mha_field(c, "short.mha", b"DimSize = 10 9 8", b"DimSize = 10 9 9")),
                                 r"short\.mha: the file is truncated: the file holds [\d,]+ bytes but the voxels need "
                                 r"3,240 bytes after its"),
    "MetaImage .mha HeaderSize past the end": (lambda c: info(_mha_header_size(c, "far.mha", "100000")),
                                               r"HeaderSize \(100,000 bytes\) leaves no room"),
    "NRRD origin 1e300": (lambda c: info(_nrrd_header(c, "far.nrrd", {"space origin: (0,0,0)": "space origin: (1e300,0,0)"})),
                          r"space origin \(\(1e300,0,0\)\) holds 1e\+300 mm, beyond ±1e\+30 mm"),
    "NRRD spacing 1e300 (ITK: 1 mm)": (
        lambda c: c.segment(_nrrd_header(c, "wide.nrrd", {"(1,0,0)": "(1e300,0,0)"})),
        r"space directions \(\(1e300,0,0\) .*\) holds 1e\+300 mm, beyond"),
    "NRRD spacings NaN (ITK: 1 mm)": (lambda c: info(_nrrd_spacings(c, "nan 1 1")), r"spacings \(nan 1 1\) holds nan"),
    "MetaImage origin 1.7e308": (lambda c: c.segment(_mha_field(c, "far.mha", b"Offset = 0 0 0", b"Offset = 1.7e308 0 0"),
                                                     command="detect"), r"Offset \(1\.7e308 0 0\) holds 1\.7e\+308 mm"),
    "MetaImage spacing 1e300": (lambda c: info(_mha_field(c, "wide.mha", b"ElementSpacing = 1 1 1",
                                                          b"ElementSpacing = 1 1e300 1")),
                                r"ElementSpacing \(1 1e300 1\) holds 1e\+300 mm"),
    "MetaImage Offset NaN": (lambda c: info(_mha_field(c, "nan.mha", b"Offset = 0 0 0", b"Offset = nan 0 0")),
                             r"Offset \(nan 0 0\) holds nan, not a finite number; ITK would read 0 for the whole field"),
    "MetaImage Origin inf": (lambda c: c.segment(_mha_field(c, "inf.mha", b"Offset = 0 0 0", b"Origin = 0 inf 0")),
                             r"Origin \(0 inf 0\) holds inf"),
    "MetaImage Offset 1e400": (lambda c: info(_mha_field(c, "big.mha", b"Offset = 0 0 0", b"Offset = 0 0 1e400")),
                               r"Offset \(0 0 1e400\) holds 1e400, not a finite number"),
    "MetaImage ElementSpacing NaN": (lambda c: info(_mha_field(c, "nansp.mha", b"ElementSpacing = 1 1 1",
                                                               b"ElementSpacing = nan 1 1")),
                                     r"ElementSpacing \(nan 1 1\) holds nan, a voxel spacing that is zero, negative or "
                                     r"not a number"),
    "MetaImage ElementSpacing -inf": (lambda c: c.segment(_mha_field(c, "infsp.mha", b"ElementSpacing = 1 1 1",
                                                                     b"ElementSpacing = 1 1 -inf"), command="detect"),
                                      r"ElementSpacing \(1 1 -inf\) holds -inf"),
    "MetaImage TransformMatrix NaN": (lambda c: info(_mha_with_matrix(c, "nanm.mha", "1 0 0 0 nan 0 0 0 1")),
                                      r"TransformMatrix \(1 0 0 0 nan 0 0 0 1\) holds nan"),
    "DICOM series PixelSpacing 0\\0": (lambda c: info(_dicom_tag(_series(c), "0028|0030", "0\\0")),
                                       r"PixelSpacing \(0028\|0030\) of IM0000\.dcm reads '0\\0', not two positive"),
    "DICOM series PixelSpacing negative": (lambda c: c.segment(_dicom_tag(_series(c), "0028|0030", "-0.8\\0.8")),
                                           r"PixelSpacing \(0028\|0030\) .* reads '-0\.8\\0\.8'"),
    "DICOM series PixelSpacing one number": (lambda c: info(_dicom_tag(_series(c), "0028|0030", "0.8")),
                                             r"PixelSpacing \(0028\|0030\) of IM0000\.dcm reads '0\.8', not 2 finite"),
    "DICOM series without PixelSpacing": (lambda c: info(_dicom_tag(_series(c), "0028|0030")),
                                          r"PixelSpacing \(0028\|0030\) of IM0000\.dcm is missing"),
    "DICOM series without ImagePositionPatient": (
        lambda c: c.segment(_dicom_tag(_series(c), "0020|0032"), command="detect"),
        r"ImagePositionPatient \(0020\|0032\) of IM0000\.dcm is missing"),
    "DICOM series, one slice without ImagePositionPatient": (
        lambda c: info(_dicom_tag(_series(c), "0020|0032", slices=[3])),
        r"ImagePositionPatient \(0020\|0032\) of IM0003\.dcm is missing"),
    "DICOM series without ImageOrientationPatient": (lambda c: info(_dicom_tag(_series(c), "0020|0037")),
                                                     r"ImageOrientationPatient \(0020\|0037\) of IM0000\.dcm is missing"),
    "DICOM series ImageOrientationPatient zero": (
        lambda c: c.segment(_dicom_tag(_series(c), "0020|0037", "0\\0\\0\\0\\0\\0")),
        r"ImageOrientationPatient \(0020\|0037\) .* its row and column directions are zero or parallel"),
    "float64 voxels at 1e39 (MetaImage)": (
        lambda c: c.segment(write_image(np.where(SMALL > 2.0, 1e39, SMALL.astype(np.float64)), c.path("big.mha")),
                            command="detect"), r"voxel\(s\) are beyond ±3\.4e38"),
}


class _Timeout(Exception):
    pass


def _unblock_fifos_and_fail(folder: Path):
    """SIGALRM handler: a reader blocked on a FIFO in ``folder`` gets an empty stream (a writer opens and
    closes it), and the case fails instead of hanging the test run."""
    def handler(signum, frame):
        for fifo in (p for p in folder.rglob("*") if p.is_fifo()):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        raise _Timeout("the command blocked for 60 s (reading a FIFO?)")
    return handler


def _case_param(name: str):
    """A case, skipped only where the machine cannot hold its input (checked at collection)."""
    marks = [pytest.mark.skipif("UTF-8" in name and not CAN_NAME_NOT_UTF8,
                                reason="this file system refuses names that are not UTF-8"),
             pytest.mark.skipif("/etc/passwd" in name and not Path("/etc/passwd").is_file(),
                                reason="no /etc/passwd here")]
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_case_param(name) for name in CASES])
def test_a_hostile_volume_gets_one_clear_line_and_exit_2(name, tmp_path, tiny_model, tiny_heatmap_model, ct_source,
                                                         monkeypatch, capfd):
    build, fragment = CASES[name]
    monkeypatch.chdir(tmp_path)  # a stray relative write shows up in the snapshot
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    case = Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)
    _secret(case).write_bytes(SMALL.tobytes())
    argv = build(case)
    watched = (tmp_path, tiny_model.parent, tiny_heatmap_model.parent)
    before = _state(*watched)
    capfd.readouterr()
    previous = signal.signal(signal.SIGALRM, _unblock_fifos_and_fail(tmp_path))
    signal.alarm(60)
    try:
        status = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capfd.readouterr()
    assert_one_clear_line(name, status, out, err, fragment)
    if argv[0] == "info":
        assert out == "", f"{name}: info printed\n{out}"  # e.g. nothing of /etc/passwd
    after = _state(*watched)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"{name}: files created, changed or removed: {changed}"


def test_each_kind_has_at_least_three_cases():
    kinds = {"detached": ("data file", "ElementDataFile"), "names": ("UTF-8",), "range": ("float64",),
             "geometry": ("sform", "pixdim", "DICOM series", "sheared", "TransformMatrix"),
             "two geometries": ("qform and sform", "from the qform"),
             "offsets": ("vox_offset", "negative dim", "declared"), "pair": ("pair header", "magic"),
             "nifti2": ("NIfTI-2",), "header size": ("HeaderSize", "too short", "truncated"),
             "far geometry": ("1e300", "1.7e308"), "non-finite header": ("NaN", "inf", "1e400"),
             "DICOM geometry tags": ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")}
    for kind, words in kinds.items():
        assert sum(any(w in name for w in words) for name in CASES) >= 3, kind


@pytest.mark.skipif(not CAN_NAME_NOT_UTF8, reason="this file system refuses names that are not UTF-8")
def test_a_not_utf8_name_in_a_real_process_exits_2_not_by_a_signal(tmp_path, ct_source):
    """In-process an abort would take pytest with it; here it would show as a negative return code."""
    source = Path(shutil.copy(ct_source, tmp_path / os.fsdecode(NOT_UTF8 + b"case.nii.gz")))
    result = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "info", os.fsencode(source)],
                            capture_output=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, f"exit {result.returncode}\n{stderr}"
    assert stderr.count("\n") == 1 and stderr.startswith("transferseg: error: ") and "not valid UTF-8" in stderr, stderr
    assert result.stdout == b""


# --- what is valid still loads, with the right geometry ------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_an_oblique_orthonormal_volume_still_loads(tmp_path, suffix, capfd):
    direction = DIRECTIONS_LPS["oblique"]
    path = write_image(SMALL, tmp_path / f"oblique{suffix}", spacing_ijk=(0.71, 0.83, 3.3), direction_lps=direction)
    capfd.readouterr()
    volume = load_volume(path)
    assert capfd.readouterr().err == ""
    assert volume.spacing == pytest.approx((3.3, 0.83, 0.71), rel=1e-6)
    np.testing.assert_allclose(volume.directions, np.array([-1.0, -1.0, 1.0])[:, None] * direction, atol=1e-6)


def test_a_uniform_dicom_series_still_loads_with_its_spacing(tmp_path, capfd):
    folder = _dicom_series(tmp_path / "series", [(-20.0, 11.0, -40.0 + 2.5 * k) for k in range(16)])
    capfd.readouterr()
    volume = load_volume(folder)
    assert capfd.readouterr().err == ""  # GDCM's and ITK's own complaints are silenced
    assert volume.shape == (16, 9, 10)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.8))
    np.testing.assert_allclose(volume.origin, [20.0, -11.0, -40.0])


def test_an_oblique_dicom_series_stepping_along_its_normal_loads(tmp_path):
    rotation = DIRECTIONS_LPS["oblique"]
    row, col, normal = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    positions = [tuple(np.array([5.0, -3.0, 12.0]) + 4.0 * k * normal) for k in range(10)]
    folder = _dicom_series(tmp_path / "series", positions, cosines=tuple(row) + tuple(col))
    volume = load_volume(folder)
    assert volume.spacing == pytest.approx((4.0, 0.8, 0.8), rel=1e-5)


def test_detached_data_below_the_header_folder_loads(tmp_path):
    """A data file in a subfolder (its name with spaces), or a link that stays inside the folder, is fine."""
    (tmp_path / "raw data").mkdir()
    (tmp_path / "raw data" / "scan 1.raw").write_bytes(SMALL.tobytes())
    header = write_image(SMALL, tmp_path / "t.nrrd", spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    text = header.read_bytes().split(b"\n\n", 1)[0]
    header.unlink()
    (tmp_path / "scan.nhdr").write_bytes(text + b"\ndata file: raw data/scan 1.raw\n")
    np.testing.assert_array_equal(load_volume(tmp_path / "scan.nhdr").array, SMALL)
    (tmp_path / "link.raw").symlink_to(tmp_path / "raw data" / "scan 1.raw")
    (tmp_path / "link.nhdr").write_bytes(text + b"\nDATA FILE: link.raw\n")
    np.testing.assert_array_equal(load_volume(tmp_path / "link.nhdr").array, SMALL)


def test_the_nrrd_header_ends_at_its_first_blank_line(tmp_path):
    """An attached NRRD whose voxel bytes happen to read 'data file: /etc/passwd' is not a detached header."""
    text = b"\ndata file: /etc/passwd\n"
    array = np.frombuffer(text.ljust(4 * 5 * 6, b"\n"), np.uint8).reshape(4, 5, 6)
    path = write_image(array, tmp_path / "bytes.nrrd", compress=False)
    np.testing.assert_array_equal(load_volume(path).array, array.astype(np.float32))


def test_inline_metaimage_data_loads(tmp_path):
    path = write_image(SMALL, tmp_path / "inline.mha", compress=False)
    assert b"ElementDataFile = LOCAL" in path.read_bytes()
    np.testing.assert_array_equal(load_volume(path).array, SMALL)


def test_float64_voxels_within_float32_range_load(tmp_path):
    array = np.where(SMALL > 1.5, 1e30, SMALL.astype(np.float64))
    volume = load_volume(write_image(array, tmp_path / "large.nrrd"))
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, array.astype(np.float32), rtol=1e-7)
    with pytest.raises(TransferSegError, match=r"beyond ±3\.4e38"):
        Volume(np.full((2, 3, 4), -1e300))  # the same check for an array given to Volume directly


def test_slicer_ijk_to_ras_with_float_rounding_passes_and_a_shear_is_named():
    spacing_ijk = np.array([0.71, 0.83, 3.3])
    m = np.eye(4)
    m[:3, :3] = DIRECTIONS_LPS["oblique"] * spacing_ijk
    m[:3, 3] = (-12.5, 33.25, 101.1)
    rounded = m.astype(np.float32).astype(np.float64)  # a matrix that went through float32 on its way
    volume = Volume.from_ijk_to_ras(np.zeros((2, 3, 4)), rounded)
    np.testing.assert_allclose(volume.spacing, spacing_ijk[::-1], rtol=1e-6)
    sheared = rounded.copy()
    sheared[:3, 1] += 0.2 * sheared[:3, 0]
    with pytest.raises(TransferSegError, match=r"IJK→RAS is not a rotation times the voxel spacing: its i and j axes "
                                               r"are [\d.]+° apart, not 90° \(a shear\)"):
        Volume.from_ijk_to_ras(np.zeros((2, 3, 4)), sheared)
    with pytest.raises(TransferSegError, match=r"not orthonormal: its j axis has length 1\.5, not 1 \(a scale\)"):
        Volume(np.zeros((2, 3, 4)), directions=np.diag([1.0, 1.5, 1.0]))


def test_metaimage_header_sizes_that_are_right_still_load(tmp_path):
    """HeaderSize skips bytes of a detached data file, -1 takes its last bytes, and in an .mha it is the byte
    offset of the voxels from the start of the file (measured with ITK 5.4): each reads SMALL exactly."""
    c = Case(tmp_path, None, None, None)
    for header_size, data in ((28, b"J" * 28 + SMALL.tobytes()), (-1, b"J" * 28 + SMALL.tobytes()),
                              (0, SMALL.tobytes() + b"tail"), (None, SMALL.tobytes())):
        np.testing.assert_array_equal(load_volume(_mhd_header_size(c, header_size, data)).array, SMALL)
    inline = write_image(SMALL, tmp_path / "inline.mha", compress=False).read_bytes()
    end = inline.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    line = b"HeaderSize = %d\n"
    offset = end + len(line % 999) + 4  # the voxels after the header and 4 junk bytes
    (tmp_path / "skip.mha").write_bytes(inline[:end - 24] + line % offset + inline[end - 24:end] + b"JJJJ" + inline[end:])
    np.testing.assert_array_equal(load_volume(tmp_path / "skip.mha").array, SMALL)


def test_nrrd_spacings_and_far_but_finite_geometry_load(tmp_path):
    """Per-axis spacings load as given; a NaN spacing on a non-spatial axis (teem's "unknown") is no problem;
    an origin of 1e29 mm is within what a file stores."""
    c = Case(tmp_path, None, None, None)
    assert load_volume(_nrrd_spacings(c, "0.7 0.8 3.3")).spacing == pytest.approx((3.3, 0.8, 0.7))
    four = write_image(SMALL[None], tmp_path / "four.nrrd", compress=False)  # (1, 8, 9, 10): a 4D of one volume
    head, data = four.read_bytes().split(b"\n\n", 1)
    lines = [ln for ln in head.split(b"\n") if not ln.startswith((b"space", b"kinds"))]
    (tmp_path / "four.nrrd").write_bytes(b"\n".join(lines) + b"\nspacings: 1 1 2 nan\nkinds: domain domain domain list\n\n"
                                         + data)
    volume = load_volume(tmp_path / "four.nrrd")
    assert volume.shape == (8, 9, 10) and volume.spacing == pytest.approx((2.0, 1.0, 1.0))
    far = load_volume(write_image(SMALL, tmp_path / "far.nrrd", origin_lps=(1e29, 0, 0)))
    assert far.origin[0] == pytest.approx(-1e29)
    with pytest.raises(TransferSegError, match=r"origin \(2e\+30, 0\.0, 0\.0\) mm is beyond ±1e\+30 mm"):
        Volume(np.zeros((2, 3, 4)), origin=(2e30, 0, 0))  # the same check for an array given to Volume directly
    with pytest.raises(TransferSegError, match=r"spacing \(1e\+31, 1\.0, 1\.0\) mm \(k, j, i\) is beyond 1e\+30"):
        Volume(np.zeros((2, 3, 4)), spacing=(1e31, 1, 1))


def test_a_dicom_series_with_its_geometry_tags_loads(tmp_path):
    """The series write_dicom_series writes (as a scanner does) loads with its pixel spacing, slice spacing and
    origin; so does the real 20-slice CT series where the cache holds it."""
    folder = write_dicom_series((SMALL * 100).astype(np.int16), tmp_path / "series", spacing_ijk=(0.7, 0.9, 2.5),
                                origin_lps=(5.0, 6.0, 7.0))
    volume = load_volume(folder)
    assert volume.shape == (8, 9, 10)
    assert volume.spacing == pytest.approx((2.5, 0.9, 0.7))
    np.testing.assert_allclose(volume.origin, [-5.0, -6.0, 7.0])
    np.testing.assert_array_equal(volume.array, (SMALL * 100).astype(np.int16))


@pytest.mark.skipif(not REAL_DICOM.is_dir(), reason="the real CT cache is absent (e.g. in CI)")
def test_the_real_dicom_series_still_loads():
    volume = load_volume(REAL_DICOM)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625), rel=1e-6)
