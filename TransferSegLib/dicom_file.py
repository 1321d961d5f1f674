"""One DICOM file as a volume: an enhanced multi-frame object read with the geometry its functional groups state.

Real DBT arrives as one Breast Tomosynthesis Image object (and a modern CT may arrive as one Enhanced CT
object): every frame is a slice, and where each lies is stated per frame in the Shared and Per-frame
Functional Groups (PS3.3 C.7.6.16): Plane Position (Patient), Plane Orientation (Patient), Pixel Measures,
Pixel Value Transformation.  :func:`read_header` reads and checks all of it from the header alone;
:func:`read_voxels` then decodes the frames one at a time (pydicom) into the one float32 array a
:class:`~TransferSegLib.volume.Volume` keeps, sorted along the slice normal.  The geometry is what
SimpleITK gives for the same slices written as a classic series (origin: the first slice along the normal;
directions: row, column, row × column; slice spacing: first to last over n − 1), in ITK's LPS, so that
:mod:`TransferSegLib.io` converts it to RAS as it converts every other image.

Laterality and view (e.g. R CC) are kept in :attr:`MultiframeHeader.meta`, which ``io`` hands on as
:attr:`Volume.meta`.  A one-frame file is a 2D input (a mammogram, or one slice of a series) and is refused
as such, as is every file that cannot be read in full: each problem is one
:class:`~TransferSegLib.volume.TransferSegError` that names it.  pydicom is an optional dependency, imported
only when a DICOM file is read.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .headers import slice_step_tolerance, uneven_slices
from .volume import TransferSegError, describe_shape

__all__ = ["MultiframeHeader", "SOP_CLASSES", "enhanced_dataset", "has_dicom_preamble", "read_dataset", "read_header",
           "read_voxels"]

# The enhanced objects whose frames are the slices of one volume.
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
}
# Digital Mammography X-Ray (for presentation, for processing), Breast Projection X-Ray (both): 2D by nature.
_MAMMOGRAPHY_2D = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.13.1.4",
                   "1.2.840.10008.5.1.4.1.1.13.1.5"}
_BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"

# CID 4014 "View for Mammography": SNOMED CT code, its SNOMED-RT code (older files), code meaning → the ACR
# abbreviation a radiologist reads (PS3.16).
_VIEWS = {
    ("399162004", "R-10242", "cranio-caudal"): "CC",
    ("399368009", "R-10226", "medio-lateral oblique"): "MLO",
    ("399260004", "R-10224", "medio-lateral"): "ML",
    ("399352003", "R-10228", "latero-medial"): "LM",
    ("399099002", "R-10230", "latero-medial oblique"): "LMO",
    ("399196006", "R-10244", "caudo-cranial (from below)"): "FB",
    ("399188001", "R-102D0", "superolateral to inferomedial oblique"): "SIO",
    ("441555000", "R-40AAA", "inferomedial to superolateral oblique"): "ISO",
    ("399192008", "R-1024A", "cranio-caudal exaggerated laterally"): "XCCL",
    ("399101009", "R-1024B", "cranio-caudal exaggerated medially"): "XCCM",
}
_VIEW_BY_CODE = {code: abbreviation for codes, abbreviation in _VIEWS.items() for code in codes[:2]}


def _squeezed(meaning: str) -> str:
    """A code meaning as vendors vary it ("Cranio-Caudal", "craniocaudal"): lower case, no hyphens or spaces."""
    return meaning.lower().replace("-", "").replace(" ", "")


_VIEW_BY_MEANING = {_squeezed(codes[2]): abbreviation for codes, abbreviation in _VIEWS.items()}

# Pixel data elements larger than this stay in the file while the header is read (the frames are read later).
_DEFER_BYTES = 1 << 16
_PIXEL_DATA = 0x7FE00010
_READ_AGAIN = "export it again from the workstation that made it"


@dataclass(eq=False)
class MultiframeHeader:
    """What a multi-frame file's header says, checked: enough to allocate the volume and decode its frames.

    Geometry is ITK's (LPS, (i, j, k) order), as :class:`SimpleITK.ImageFileReader` reports it.
    """

    path: Path
    rows: int
    columns: int
    frames: int
    pixel_bytes: int
    spacing_ijk: tuple
    direction_lps: np.ndarray  # 3×3, column n = IJK axis n
    origin_lps: np.ndarray
    slice_of_frame: np.ndarray  # the array slice k each frame (in file order) goes to
    rescale: np.ndarray  # (frames, 2): slope and intercept of each frame, in file order
    meta: dict = field(default_factory=dict)


def has_dicom_preamble(path: Path) -> bool:
    """Whether the file starts as a DICOM file does (128 bytes, then ``DICM``), whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom(required: bool = True):
    """pydicom, or (``required``) a clear error where it is not installed, else None."""
    try:
        # optional dependency (not needed for NIfTI, NRRD, MetaImage or a series), its import (about half a
        # second) kept out of every other read
        import pydicom
        import pydicom.pixels  # noqa: F401  (the frame decoders)
    except ImportError:
        if not required:
            return None
        raise TransferSegError("reading a single DICOM file (e.g. a breast tomosynthesis object) needs pydicom; "
                               "install it (pip install pydicom) or give a folder of DICOM slices") from None
    return pydicom


def read_dataset(path: Path, required: bool = True):
    """The file's DICOM header as pydicom reads it (pixel data left in the file), or None when pydicom cannot
    tell it is DICOM (no ``DICM`` preamble and not parseable) or, unless ``required``, is not installed: the
    caller then says what it can."""
    pydicom = _pydicom(required)
    if pydicom is None:
        return None
    with warnings.catch_warnings(record=True) as caught:  # pydicom warns (on stderr) where it should stop
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path), defer_size=_DEFER_BYTES)
        except Exception as e:  # noqa: BLE001  (a damaged file raises anything from struct.error to KeyError)
            if not has_dicom_preamble(path):
                return None
            raise TransferSegError(f"{path}: not a readable DICOM file (the header is damaged or the file is "
                                   f"truncated: {type(e).__name__}: {_reason(e)})") from None
    if any("end of file" in str(w.message).lower() for w in caught):
        raise TransferSegError(f"{path}: the file ends in the middle of its data; it is probably truncated (e.g. an "
                               "interrupted copy or download)")
    return ds


def enhanced_dataset(path: Path):
    """The header of ``path`` when it is a multi-frame object with functional groups (one we read, or one we
    refuse by name), else None; also None without pydicom, leaving a series folder to SimpleITK as before."""
    try:
        ds = read_dataset(path, required=False)
    except TransferSegError:
        return None
    if ds is None or _int(ds, "NumberOfFrames", 1) <= 1 or "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    return ds


def read_header(path: Path, dataset=None) -> MultiframeHeader:
    """Check a single DICOM file and return what reading it as a volume needs.

    Refuses, one line each: a one-frame file (a 2D mammogram or one slice of a series), a multi-frame object
    other than those in :data:`SOP_CLASSES`, missing or contradicting functional groups, frames of several
    orientations, at one position or unevenly spaced, zero spacing, colour or MONOCHROME1 pixels, pixel data
    that is missing or ends early, and a transfer syntax this installation cannot decode.
    """
    name = str(path)
    ds = dataset if dataset is not None else read_dataset(path)
    if ds is None:
        raise TransferSegError(f"{name}: not a DICOM file pydicom can read")
    with warnings.catch_warnings():  # e.g. a number pydicom reads leniently: checked here, said in our words
        warnings.simplefilter("ignore")
        return _read_header(name, ds)


def _read_header(name: str, ds) -> MultiframeHeader:
    sop = str(ds.get("SOPClassUID", "")).strip()
    if _PIXEL_DATA not in ds:
        described = _pydicom().uid.UID(sop).name if sop else ""
        if described not in ("", sop) and "Image" not in described and "Rows" not in ds:  # e.g. a report
            raise TransferSegError(f"{name}: the DICOM file holds no image (it is a {_sop_name(sop)} object); give an "
                                   "image: a multi-frame object or a folder of DICOM slices")
        raise TransferSegError(f"{name}: the file ends before its pixel data; it is probably truncated (e.g. an "
                               "interrupted copy or download)")
    meta = _meta(ds)
    frames = _int(ds, "NumberOfFrames", 1)
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if frames <= 1:
        _refuse_2d(name, ds, sop, rows, columns, meta)
    if sop not in SOP_CLASSES:
        raise TransferSegError(
            f"{name}: a multi-frame {_sop_name(sop)} object ({frames} frames) is not read as a volume; TransferSeg "
            f"reads {', '.join(sorted(set(SOP_CLASSES.values())))} objects, NIfTI, NRRD, MetaImage and DICOM series "
            "folders"
        )
    _check_pixels(name, ds, frames, rows, columns)
    per_frame, shared = _functional_groups(name, ds, frames)
    geometry = _frame_geometry(name, per_frame, shared, frames)
    return MultiframeHeader(path=Path(name), rows=rows, columns=columns, frames=frames,
                            pixel_bytes=max(1, _int(ds, "BitsAllocated", 16) // 8), **geometry,
                            rescale=_rescale(name, ds, per_frame, shared), meta=meta)


def read_voxels(header: MultiframeHeader) -> np.ndarray:
    """The frames as one float32 (k, j, i) array, slice k the k-th along the normal, rescale applied.

    Frames are decoded one at a time straight from the file: the peak is the float32 array plus one frame."""
    pydicom = _pydicom()
    name = str(header.path)
    out = np.empty((header.frames, header.rows, header.columns), np.float32)
    done = 0
    try:
        with open(header.path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index, frame in enumerate(pydicom.pixels.iter_pixels(f)):
                if index >= header.frames:
                    break
                if frame.shape != out.shape[1:]:
                    raise ValueError(f"frame {index + 1} decodes to {describe_shape(frame.shape)} pixels, not "
                                     f"{describe_shape(out.shape[1:])}")
                slope, intercept = header.rescale[index]
                k = header.slice_of_frame[index]
                if slope == 1.0 and intercept == 0.0:
                    out[k] = frame
                else:  # in float64 and then rounded once, as ITK's rescaler does
                    out[k] = frame.astype(np.float64) * slope + intercept
                done += 1
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (decoders raise anything on damaged data)
        raise TransferSegError(f"{name}: the pixel data of frame {done + 1} of {header.frames} cannot be read; the "
                               f"file is probably truncated or damaged (e.g. an interrupted copy): {_reason(e)}"
                               ) from None
    if done < header.frames:
        raise TransferSegError(f"{name}: the pixel data holds {done} of {header.frames} frames; the file is probably "
                               "truncated (e.g. an interrupted copy or download)")
    return out


# --- what the file is -----------------------------------------------------------------------------------------
def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _int(ds, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def _sop_name(sop: str) -> str:
    pydicom = _pydicom()
    known = SOP_CLASSES.get(sop)
    if known:
        return known
    described = pydicom.uid.UID(sop).name if sop else ""
    return described.removesuffix(" Storage") if described and described != sop else f"SOP class '{sop or '?'}'"


def _refuse_2d(name: str, ds, sop: str, rows: int, columns: int, meta: dict) -> None:
    if sop in _MAMMOGRAPHY_2D or sop == _BREAST_TOMOSYNTHESIS or str(ds.get("Modality", "")) == "MG":
        view = " ".join(v for v in (meta.get("laterality"), meta.get("view")) if v)
        raise TransferSegError(
            f"{name}: input is 2D ({describe_shape((rows, columns))}, a mammogram{f' ({view})' if view else ''}, "
            "one frame); TransferSeg needs a 3D volume: give the breast tomosynthesis (DBT) reconstruction of the view"
        )
    # The order SimpleITK reports a slice's size in (columns × rows), as this message has always said it.
    raise TransferSegError(
        f"{name}: input is 2D ({describe_shape((columns, rows))}, a single DICOM slice); TransferSeg needs a 3D "
        "volume: give the folder that holds the whole series"
    )


def _check_pixels(name: str, ds, frames: int, rows: int, columns: int) -> None:
    """Pixels that decode to one grey value per voxel, all of them in the file, in a syntax we can decode."""
    pydicom = _pydicom()
    if rows <= 0 or columns <= 0:
        raise TransferSegError(f"{name}: the image has a zero-size axis ({describe_shape((frames, rows, columns))}); "
                               "it holds no voxels")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise TransferSegError(f"{name}: the image has {samples} components per voxel (a colour or vector image); "
                               "TransferSeg needs a single-component (grey-scale) 3D volume")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric != "MONOCHROME2":
        inverted = " (inverted: bright is low)" if photometric == "MONOCHROME1" else ""
        raise TransferSegError(f"{name}: the pixels are stored as {photometric}{inverted}, not MONOCHROME2 as models "
                               f"expect; {_READ_AGAIN} as MONOCHROME2")
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "")
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except (NotImplementedError, ValueError):
        decoder = None
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian or decoder is None or not decoder.is_available:
        raise TransferSegError(
            f"{name}: the pixel data is encoded as {syntax.name or 'an unstated transfer syntax'} ({syntax or '?'}), "
            "which this installation cannot decode; write it uncompressed first (e.g. gdcmconv --raw IN.dcm OUT.dcm, "
            "or DCMTK's dcmdjpeg / dcmdjp2k), or install pydicom's decoders (pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg)"
        )
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if not syntax.is_encapsulated:
        needed = frames * rows * columns * _int(ds, "BitsAllocated", 16) // 8
        length = element.length if element.length != 0xFFFFFFFF else 0
        ends = (element.value_tell or 0) + length
        if length < needed or ends > Path(name).stat().st_size:
            raise TransferSegError(
                f"{name}: the pixel data holds {min(length, Path(name).stat().st_size - (element.value_tell or 0))} "
                f"bytes of the {needed} that {frames} frames of {rows}×{columns} need; the file is probably truncated "
                "(e.g. an interrupted copy or download)"
            )
    elif not _ends_its_fragments(Path(name), element.value_tell or 0):
        raise TransferSegError(f"{name}: the compressed pixel data has no end (its sequence delimiter is missing); the "
                               "file is probably truncated (e.g. an interrupted copy or download)")


_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) with length 0: encapsulated pixel data ends


def _ends_its_fragments(path: Path, start: int, chunk: int = 1 << 20) -> bool:
    """Whether the encapsulated pixel data that starts at byte ``start`` is closed by its sequence
    delimiter: pydicom decodes frames cut just inside the delimiter without a word.  The tail is read
    first (pixel data is nearly always the last element); the rest only if the tail lacks it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(start, size - chunk))
        if _SEQUENCE_END in f.read():
            return True
        f.seek(start)
        carry = b""
        while block := f.read(chunk):
            if _SEQUENCE_END in carry + block:
                return True
            carry = block[-(len(_SEQUENCE_END) - 1):]
    return False


# --- geometry from the functional groups ----------------------------------------------------------------------
def _functional_groups(name: str, ds, frames: int) -> tuple:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    if not per_frame:
        raise TransferSegError(
            f"{name}: the {frames} frames carry no Per-frame Functional Groups (5200,9230), so where each frame lies "
            f"is not stated; {_READ_AGAIN} with its functional groups, or as a series of single-frame slices"
        )
    if len(per_frame) != frames:
        raise TransferSegError(f"{name}: the file has {frames} frames but {len(per_frame)} Per-frame Functional "
                               f"Groups; it is damaged: {_READ_AGAIN}")
    return per_frame, (shared_sequence[0] if shared_sequence else None)


def _group_item(frame_group, shared, sequence: str):
    """The first item of a functional group macro, stated for this frame or else for all frames."""
    for group in (frame_group, shared):
        items = group.get(sequence) if group is not None else None
        if items:
            return items[0]
    return None


def _numbers(name: str, item, keyword: str, count: int, where: str) -> np.ndarray:
    """``keyword``'s ``count`` finite numbers in ``item``, or a clear error naming what is missing where."""
    raw = item.get(keyword) if item is not None else None
    try:
        values = np.array([float(v) for v in (raw if raw is not None else [])], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.array([])
    if values.size != count or not np.all(np.isfinite(values)):
        said = f"reads '{raw}', not {count} finite numbers" if raw not in (None, "") else "is not stated"
        raise TransferSegError(f"{name}: the {keyword} of {where} {said}, so where its voxels lie is unknown; "
                               f"{_READ_AGAIN} with its geometry")
    return values


def _dicom_text(values) -> str:
    """Numbers as a DICOM header writes them: ``0.1\\0.1``."""
    return "'" + "\\".join(f"{v:g}" for v in values) + "'"


def _frame_geometry(name: str, per_frame, shared, frames: int) -> dict:
    positions, cosines, pixels = [], [], []
    for f, group in enumerate(per_frame):
        where = f"frame {f + 1} of {frames}"
        positions.append(_numbers(name, _group_item(group, shared, "PlanePositionSequence"),
                                  "ImagePositionPatient", 3, where))
        cosines.append(_numbers(name, _group_item(group, shared, "PlaneOrientationSequence"),
                                "ImageOrientationPatient", 6, where))
        pixels.append(_numbers(name, _group_item(group, shared, "PixelMeasuresSequence"), "PixelSpacing", 2, where))
    positions, cosines, pixels = np.array(positions), np.array(cosines), np.array(pixels)
    if np.any(pixels <= 0):
        f = int(np.flatnonzero(np.any(pixels <= 0, axis=1))[0])
        raise TransferSegError(f"{name}: the PixelSpacing of frame {f + 1} of {frames} reads {_dicom_text(pixels[f])}, "
                               f"not two positive numbers of mm; {_READ_AGAIN}")
    changed = np.flatnonzero(np.any(np.abs(pixels - pixels[0]) > 1e-6 * pixels[0], axis=1))
    if changed.size:
        f = int(changed[0])
        raise TransferSegError(f"{name}: frame {f + 1} of {frames} has pixels of {pixels[f][0]:g}×{pixels[f][1]:g} mm "
                               f"where frame 1 has {pixels[0][0]:g}×{pixels[0][1]:g} mm; one volume needs one size")
    turned = np.flatnonzero(np.any(np.abs(cosines - cosines[0]) > 1e-4, axis=1))
    if turned.size:
        f = int(turned[0])
        raise TransferSegError(f"{name}: frame {f + 1} of {frames} is oriented differently from frame 1 "
                               "(ImageOrientationPatient); one volume needs one orientation: export the frames of "
                               "each orientation as their own object")
    row, column = cosines[0][:3], cosines[0][3:]
    normal = np.cross(row, column)
    if np.linalg.norm(normal) < 1e-6:
        raise TransferSegError(f"{name}: the ImageOrientationPatient reads {_dicom_text(cosines[0])}: its row and "
                               f"column directions are zero or parallel, so the orientation is unknown; {_READ_AGAIN}")
    order = _stack_order(name, positions, normal / np.linalg.norm(normal))
    slice_of_frame = np.empty(frames, np.int64)
    slice_of_frame[order] = np.arange(frames)
    first, last = positions[order[0]], positions[order[-1]]
    return {
        # ITK's ImageSeriesReader: the slice spacing is the first-to-last distance over n - 1
        "spacing_ijk": (float(pixels[0][1]), float(pixels[0][0]), float(np.linalg.norm(last - first) / (frames - 1))),
        "direction_lps": np.column_stack([row, column, normal]),
        "origin_lps": first.copy(),
        "slice_of_frame": slice_of_frame,
    }


def _stack_order(name: str, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The frames' order along ``normal``, once they are checked to form one evenly spaced, straight stack."""
    frames = len(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]
    steps = np.diff(along_sorted)
    same = np.flatnonzero(np.abs(steps) <= 0.01)
    if same.size:
        k = int(same[0])
        a, b = sorted((int(order[k]) + 1, int(order[k + 1]) + 1))
        raise TransferSegError(
            f"{name}: frames {a} and {b} of {frames} lie at the same position ({along_sorted[k]:g} mm along the slice "
            "normal), so the slice spacing is zero: the file holds more than one stack (e.g. several reconstructions, "
            "echoes or phases); export the stack you want as its own object"
        )
    step = float(np.median(steps))
    tolerance = slice_step_tolerance(step)
    odd = np.flatnonzero(np.abs(steps - step) > tolerance)
    if odd.size:
        raise TransferSegError(f"{name}: {uneven_slices(along_sorted, steps, step, tolerance, odd)}; one volume "
                               "needs evenly spaced slices: export the reconstruction again, or resample it onto one "
                               "slice spacing first (e.g. in 3D Slicer)")
    sideways = np.linalg.norm(np.diff(positions[order], axis=0) - np.outer(steps, normal), axis=1)
    if np.any(sideways > tolerance):
        raise TransferSegError(
            f"{name}: each frame is offset {float(sideways.max()):.3g} mm sideways from the one before (a sheared "
            "stack), which a volume on a regular grid cannot hold; resample it onto a regular grid first (e.g. in "
            "3D Slicer)"
        )
    return order


def _rescale(name: str, ds, per_frame, shared) -> np.ndarray:
    """Each frame's (slope, intercept): its Pixel Value Transformation, or the classic top-level pair, or (1, 0)."""
    values = np.empty((len(per_frame), 2), np.float64)
    for f, group in enumerate(per_frame):
        item = _group_item(group, shared, "PixelValueTransformationSequence")
        source = item if item is not None and "RescaleSlope" in item else ds
        slope = source.get("RescaleSlope", 1.0)
        intercept = source.get("RescaleIntercept", 0.0)
        try:
            values[f] = float(slope), float(intercept)
        except (TypeError, ValueError):
            values[f] = np.nan
        if not np.all(np.isfinite(values[f])) or values[f, 0] == 0:
            raise TransferSegError(f"{name}: the rescale slope and intercept of frame {f + 1} of {len(per_frame)} read "
                                   f"'{slope}' and '{intercept}', not a non-zero slope and a number; {_READ_AGAIN}")
    return values


# --- laterality and view --------------------------------------------------------------------------------------
def _meta(ds) -> dict:
    """What a radiologist reads off the film: the breast (R / L) and the view (CC, MLO, …), with what the file is."""
    sop = str(ds.get("SOPClassUID", "")).strip()
    meta = {"sop_class": _sop_name(sop) if sop else "", "sop_class_uid": sop}
    for key, keyword in (("modality", "Modality"), ("manufacturer", "Manufacturer")):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            meta[key] = value
    laterality = _laterality(ds)
    if laterality:
        meta["laterality"] = laterality
    view, code = _view(ds)
    if view:
        meta["view"] = view
    if code:
        meta["view_code"] = code
    return {key: value for key, value in meta.items() if value}


def _laterality(ds) -> str | None:
    """R, L, B (both) or U (unpaired): the frames' own Frame Laterality first, then the image's, then the series'."""
    candidates = []
    groups = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for group in list(groups[:1]) + list(per_frame[:1]):
        for anatomy in group.get("FrameAnatomySequence") or []:
            candidates.append(anatomy.get("FrameLaterality"))
    candidates += [ds.get("ImageLaterality"), ds.get("Laterality")]
    for value in candidates:
        text = str(value or "").strip().upper()
        if text in ("R", "L", "B", "U"):
            return text
    return None


def _view(ds) -> tuple:
    """The view's ACR abbreviation and its code (from View Code Sequence), or the View Position's text."""
    for item in ds.get("ViewCodeSequence") or []:
        value, scheme = str(item.get("CodeValue", "")).strip(), str(item.get("CodingSchemeDesignator", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).strip()
        abbreviation = _VIEW_BY_CODE.get(value) or _VIEW_BY_MEANING.get(_squeezed(meaning))
        code = {"scheme": scheme, "value": value, "meaning": meaning}
        return abbreviation or meaning or None, {k: v for k, v in code.items() if v}
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    return (position or None), None
