"""DICOM out: a Segmentation for `segment`, a Comprehensive 3D SR for `detect`, when the input was DICOM.

A PACS keeps what a run found only as DICOM objects that point at the images it came from.  When the
input was a DICOM series (a folder of single-frame files) or one enhanced multi-frame object (breast
tomosynthesis, Enhanced CT), :func:`dicom_outputs` reads the source's headers again (no pixel data) and
builds, with highdicom:

* ``segmentation.dcm``: a DICOM Segmentation (BINARY, the type every SEG reader and PACS knows)
  whose frames lie exactly on the source frames (highdicom copies each source frame's position,
  orientation and pixel spacing) and reference them by SOP Instance UID (and frame number); one
  segment per label of the model card, coded with the card's terminology (SNOMED CT), and the
  algorithm named with the model's name, version and weights' sha256.
* ``detections-sr.dcm``: a TID 1500 Measurement Report in a Comprehensive 3D SR: per detection its
  kind (the finding type), its confidence (Certainty of Finding) and its position as a SCOORD3D
  POINT in the source's frame of reference, the source images as evidence.

Which array slice a source frame is comes from matching each frame's ImagePositionPatient against the
volume's grid, never from a sort order; a source whose frames do not lie on the volume's grid gets no
DICOM output.  The library is in RAS, DICOM in LPS: x and y change sign.  Study and patient attributes
come from the source; each file is a new series.  Nothing here raises for a source it cannot describe:
the output is then not written, and :attr:`DicomOutputs.note` says why in one line (``result.json``).
pydicom and highdicom are imported only for a DICOM input.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_output, full_suffix
from .dicom_file import has_dicom_preamble
from .terminology import entry_from_card
from .volume import TransferSegError, Volume

__all__ = ["DETECTIONS_SR_NAME", "SEGMENTATION_NAME", "DicomOutputs", "DicomSource", "dicom_output_name",
           "dicom_outputs"]

SEGMENTATION_NAME = "segmentation.dcm"
DETECTIONS_SR_NAME = "detections-sr.dcm"
_MANUFACTURER = "TransferSeg"
_SEG_SERIES_NUMBER, _SR_SERIES_NUMBER = 901, 902
_LPS = np.array([-1.0, -1.0, 1.0])  # RAS ↔ LPS: x and y change sign
_FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
            ".mhd": "MetaImage"}
# codes as the model card writes them: [coding scheme, code value, code meaning]
_TISSUE = ("SCT", "85756007", "Tissue")  # a segment whose card has no terminology: DCMQI's neutral code
_AI_FAMILY = ("DCM", "123110", "Artificial Intelligence")
_CERTAINTY = ("DCM", "111012", "Certainty of Finding")  # as mammography CAD reports state a finding's confidence
_NO_UNITS = ("UCUM", "1", "no units")
_CENTER = ("DCM", "111010", "Center")
_NONE = ("SCT", "260413007", "None")
_LATERALITY = {"R": ("SCT", "24028007", "Right"), "L": ("SCT", "7771000", "Left")}
_PROCEDURES = {"CT": ("LN", "25045-6", "CT unspecified body region"), "MG": ("SCT", "71651007", "Mammography")}
_IMAGING_PROCEDURE = ("SCT", "363679005", "Imaging procedure")
# Detection.kind → finding type (SNOMED CT)
_FINDING_TYPES = {"mass": ("SCT", "4147007", "Mass"),
                  "calcification_cluster": ("SCT", "129769006", "Calcification Cluster"),
                  "lesion": ("SCT", "52988006", "Lesion")}
# the patient and study attributes a SEG or SR copies from its source, which the source must hold (type 2)
_TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName")
# how far (in voxels) a frame may lie from the grid and still be that slice: DICOM's decimal strings
# hold 16 characters, so positions are rounded, never shifted by a tenth of a voxel
_ON_GRID = 0.1


def dicom_output_name(task: str) -> str:
    """The DICOM file a run of ``task`` writes for a DICOM input."""
    return DETECTIONS_SR_NAME if task == "heatmap" else SEGMENTATION_NAME


@dataclass
class DicomSource:
    """The DICOM images a volume was read from: their headers (no pixel data) and where each frame lies.

    ``datasets`` are a series' files (in file-name order) or the one multi-frame object; frame n (the
    n-th file, or the n-th frame of the object) is array slice ``slice_of_frame[n]``."""

    datasets: list
    slice_of_frame: np.ndarray
    description: str

    @property
    def multiframe(self) -> bool:
        return len(self.datasets) == 1 and int(self.datasets[0].get("NumberOfFrames", 1) or 1) > 1


@dataclass
class DicomOutputs:
    """The DICOM files of a run, built and ready to save (``datasets``: file name → dataset), and the one
    line ``result.json`` says about them (``note``: "written: …" or "not written: …")."""

    datasets: dict = field(default_factory=dict)
    note: str = ""

    @property
    def names(self) -> list:
        return list(self.datasets)

    def save(self, folder) -> None:
        for name, ds in self.datasets.items():
            with atomic_output(Path(folder) / name) as tmp:
                ds.save_as(tmp, enforce_file_format=True)


def dicom_outputs(input_path, volume: Volume, card: dict, labels=None, detections=None) -> DicomOutputs:
    """The DICOM output of a run on ``volume`` (read from ``input_path``): a SEG of ``labels`` (the
    segmentation task) or an SR of ``detections`` (the heatmap task), or none and why."""
    name = dicom_output_name(card.get("task", "segmentation"))
    if input_path is None:
        return DicomOutputs(note="not written: the input was given as a volume, not as a file")
    path = Path(input_path).expanduser()
    kind = _input_format(path)
    if kind:
        return DicomOutputs(note=f"not written: the input is not DICOM ({kind})")
    libraries = _dicom_libraries()
    if libraries is None:
        return DicomOutputs(note="not written: highdicom is not installed (pip install highdicom)")
    pydicom, hd = libraries
    try:
        source = _read_source(path, volume, pydicom)
        with warnings.catch_warnings():  # highdicom's notes on the source (e.g. a missing type 2 attribute)
            warnings.simplefilter("ignore")
            if name == SEGMENTATION_NAME:
                ds = _segmentation(hd, source, labels, card)
            else:
                ds = _detections_sr(hd, source, detections or [], volume, card)
    except TransferSegError as e:
        return DicomOutputs(note=f"not written: {e}")
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # highdicom refusing the source
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        return DicomOutputs(note=f"not written: highdicom could not describe the source ({reason})")
    return DicomOutputs({name: ds}, f"written: {name}, referencing {source.description}")


def _input_format(path: Path):
    """None for a DICOM input (a series folder, a .dcm or preamble'd file), else the format's name."""
    if path.is_dir() or path.name.lower().endswith(".dcm") or has_dicom_preamble(path):
        return None
    return _FORMATS.get(full_suffix(path), full_suffix(path) or path.name)


def _dicom_libraries():
    try:
        # optional dependencies, needed only for a DICOM input: about 2 s of imports kept out of every other run
        import highdicom
        import pydicom
    except ImportError:
        return None
    return pydicom, highdicom


# --- the source ------------------------------------------------------------------------------------------------
def _read_source(path: Path, volume: Volume, pydicom) -> DicomSource:
    """The DICOM images ``volume`` was read from (``path``: a series folder or one multi-frame file), with
    each frame matched to its array slice; :class:`TransferSegError` when none lies on the volume's grid."""
    headers = _headers([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()), pydicom)
    if len(headers) == 1 and "PerFrameFunctionalGroupsSequence" in headers[0]:
        return _match(headers, volume)
    series = {}
    for ds in headers:
        if "ImagePositionPatient" in ds:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    candidates = [files for files in series.values() if len(files) == volume.shape[0]]
    problems = []
    for files in candidates:
        try:
            return _match(files, volume)
        except TransferSegError as e:
            problems.append(str(e))
    if problems:
        raise TransferSegError(problems[0])
    raise TransferSegError(f"no series of {volume.shape[0]} DICOM images in {path} (one per slice of the volume)")


def _headers(files, pydicom) -> list:
    headers = []
    for file in files:
        try:
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception:  # noqa: BLE001  (not DICOM, or damaged: not one of the source's files)
            continue
        if "SOPInstanceUID" in ds and "Rows" in ds:
            for keyword in _TYPE_2_COPIED:  # as the source's IOD has them (type 2): present, maybe empty
                if keyword not in ds:
                    setattr(ds, keyword, None)
            headers.append(ds)
    return headers


def _frames(datasets: list) -> tuple:
    """Each frame's ImagePositionPatient (n, 3), and the first frame's ImageOrientationPatient, PixelSpacing."""
    if len(datasets) == 1 and "PerFrameFunctionalGroupsSequence" in datasets[0]:
        ds = datasets[0]
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]

        def item(group, sequence):
            for where in (group, shared):
                if where is not None and where.get(sequence):
                    return where.get(sequence)[0]
            raise TransferSegError(f"the multi-frame object has no {sequence} for one of its frames")

        groups = ds.PerFrameFunctionalGroupsSequence
        positions = [item(g, "PlanePositionSequence").ImagePositionPatient for g in groups]
        orientation = item(groups[0], "PlaneOrientationSequence").ImageOrientationPatient
        spacing = item(groups[0], "PixelMeasuresSequence").PixelSpacing
        orientations = [item(g, "PlaneOrientationSequence").ImageOrientationPatient for g in groups]
    else:
        positions = [ds.ImagePositionPatient for ds in datasets]
        orientations = [ds.ImageOrientationPatient for ds in datasets]
        orientation, spacing = datasets[0].ImageOrientationPatient, datasets[0].PixelSpacing
    if np.any(np.abs(np.asarray(orientations, float) - np.asarray(orientation, float)) > 1e-4):
        raise TransferSegError("the DICOM frames are not all oriented alike")
    return np.asarray(positions, float), np.asarray(orientation, float), np.asarray(spacing, float)


def _share_frame_geometry(ds) -> None:
    """In our copy of a multi-frame header: the orientation and pixel spacing that every frame repeats (one
    vendor's way, read as such), stated once in the Shared Functional Groups, where highdicom reads them."""
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = [type(ds.PerFrameFunctionalGroupsSequence[0])()]
    shared = ds.SharedFunctionalGroupsSequence[0]
    for sequence in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if not shared.get(sequence):
            setattr(shared, sequence, copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[0].get(sequence)))


def _match(datasets: list, volume: Volume) -> DicomSource:
    """Which array slice each frame of ``datasets`` is: its ImagePositionPatient on the volume's grid
    (i = j = 0 and a whole k), its rows, columns, orientation and pixel spacing the volume's."""
    ds = datasets[0]
    if len({str(d.get("FrameOfReferenceUID", "")) for d in datasets}) != 1 or not ds.get("FrameOfReferenceUID"):
        raise TransferSegError("the DICOM images have no (single) Frame of Reference UID, which a DICOM SEG or SR "
                               "needs to place its content")
    positions, orientation, spacing = _frames(datasets)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if (rows, columns) != volume.shape[1:] or len(positions) != volume.shape[0]:
        raise TransferSegError(f"the DICOM images are {len(positions)} frames of {rows}×{columns} pixels; the volume "
                               f"is {'×'.join(map(str, volume.shape))} voxels")
    row_ras, column_ras = orientation[:3] * _LPS, orientation[3:] * _LPS
    if (np.abs(row_ras - volume.directions[:, 0]).max() > 1e-4 or np.abs(column_ras - volume.directions[:, 1]).max()
            > 1e-4 or not np.allclose(spacing, volume.spacing[1:], rtol=1e-4, atol=0)):
        raise TransferSegError("the DICOM images' orientation or pixel spacing is not the volume's")
    kji = volume.ras_to_ijk_points(positions * _LPS)
    k = np.round(kji[:, 0]).astype(int)
    off = np.abs(kji - np.column_stack([k, np.zeros((len(k), 2))])).max(axis=0)
    if off.max() > _ON_GRID or k.min() < 0 or k.max() >= volume.shape[0] or len(set(k.tolist())) != len(k):
        raise TransferSegError("the DICOM images' positions (ImagePositionPatient) do not lie on the volume's slices")
    if len(datasets) == 1:
        what = f"the {ds.get('Modality', '')} {_sop_name(ds)} object {ds.SOPInstanceUID}".replace("  ", " ")
    else:
        what = f"{len(datasets)} {ds.get('Modality', '')} images of series {ds.SeriesInstanceUID}".replace("  ", " ")
    return DicomSource(datasets, k, what)


def _sop_name(ds) -> str:
    name = getattr(ds.SOPClassUID, "name", "") or "image"
    return name.removesuffix(" Storage")


# --- the segmentation ------------------------------------------------------------------------------------------
def _segmentation(hd, source: DicomSource, labels: np.ndarray, card: dict):
    """A BINARY DICOM Segmentation of ``labels`` (k, j, i) on ``source``'s frames: one segment per label of
    the card (segment n is the card's n-th label), frames left out where a segment is empty."""
    segments = card["labels"]
    lookup = np.zeros(max(int(labels.max(initial=0)), max(int(s["label"]) for s in segments)) + 1, np.uint8)
    for number, segment in enumerate(segments, start=1):
        lookup[int(segment["label"])] = number
    # frame n of the SEG array is source frame n: array slice slice_of_frame[n]
    frames = lookup[labels[source.slice_of_frame]]
    if source.multiframe:
        _share_frame_geometry(source.datasets[0])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=card["name"][:64], version=str(card["version"])[:64], source=_MANUFACTURER,
        family=_code(hd, _AI_FAMILY), parameters={"weights sha256": _sha256(card)})
    descriptions = [_segment_description(hd, number, segment, algorithm)
                    for number, segment in enumerate(segments, start=1)]
    return hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER,
        manufacturer_model_name=card["name"][:64], software_versions=[__version__, str(card["version"])[:64]],
        device_serial_number=_sha256(card), content_label="TRANSFERSEG",
        content_description=f"{card['name']} {card['version']}"[:64],
        series_description=f"{card['name']} segmentation"[:64],
        omit_empty_frames=bool(frames.any()))  # no labels at all: every frame, empty (a SEG needs one)


def _code(hd, triple):
    scheme, value, meaning = triple
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _sha256(card: dict) -> str:
    return str((card.get("weights") or {}).get("sha256") or "unknown")


def _segment_description(hd, number: int, segment: dict, algorithm):
    """Segment ``number``: the card label's name, colour and terminology (category, type and its modifier,
    anatomic region and its modifier), made by the model (AUTOMATIC)."""
    terminology = segment.get("terminology") or {}
    entry = entry_from_card(terminology) if terminology else {"category": _TISSUE, "type": _TISSUE}
    region = entry.get("anatomicRegion")
    rgb = [int(round(255 * float(c))) for c in segment.get("color", (1.0, 1.0, 1.0))]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=str(segment["name"])[:64],
        segmented_property_category=_code(hd, entry["category"]), segmented_property_type=_code(hd, entry["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_uid=hd.UID(), tracking_id=str(segment["name"])[:64],
        anatomic_regions=[_code(hd, region)] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*rgb))
    if entry.get("typeModifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(hd, entry["typeModifier"])]
    if region and entry.get("anatomicRegionModifier"):
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            _code(hd, entry["anatomicRegionModifier"])]
    return description


# --- the detections --------------------------------------------------------------------------------------------
def _detections_sr(hd, source: DicomSource, detections: list, volume: Volume, card: dict):
    """A Comprehensive 3D SR holding a TID 1500 Measurement Report: one Planar ROI finding per detection (in
    rank order, as detections.csv lists them), with its kind as the finding type, its confidence as
    Certainty of Finding (no units) and its position as a SCOORD3D POINT (LPS) in the source's frame of
    reference; the source images are the evidence."""
    ds = source.datasets[0]
    algorithm = hd.sr.AlgorithmIdentification(name=card["name"][:64], version=str(card["version"])[:64],
                                              parameters=[f"weights sha256 {_sha256(card)}"])
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=card["name"][:64], manufacturer_name=_MANUFACTURER, model_name=card["name"][:64]))
    site = _finding_site(hd, card, volume)
    findings = []
    for rank, detection in enumerate(detections, start=1):
        ras = detection.position_ras
        if ras is None:
            ras = volume.ijk_to_ras_points(np.asarray(detection.position_kji, float)[None])[0]
        point = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                    graphic_data=(np.asarray(ras, float) * _LPS)[None],
                                    frame_of_reference_uid=ds.FrameOfReferenceUID)
        certainty = hd.sr.Measurement(name=_code(hd, _CERTAINTY), value=float(detection.confidence),
                                      unit=_code(hd, _NO_UNITS), algorithm_id=algorithm)
        kind = _FINDING_TYPES.get(detection.kind, _FINDING_TYPES["lesion"])
        findings.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"detection {rank}"),
            referenced_region=point, finding_type=_code(hd, kind),
            algorithm_id=algorithm, finding_sites=[site] if site is not None else None, measurements=[certainty],
            geometric_purpose=_code(hd, _CENTER)))
    if not findings:  # the model ran and found nothing: an image-level group whose finding is "None"
        findings.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no detections"),
            finding_type=_code(hd, _NONE), algorithm_id=algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code(hd, _PROCEDURES.get(str(ds.get("Modality", "")), _IMAGING_PROCEDURE)),
        imaging_measurements=findings)
    return hd.sr.Comprehensive3DSR(
        evidence=source.datasets, content=report[0], series_instance_uid=hd.UID(), series_number=_SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER, is_complete=True,
        series_description=f"{card['name']} detections"[:64])


def _finding_site(hd, card: dict, volume: Volume):
    """Where the findings are: the anatomic region of the card's first label (e.g. the breast), with the
    laterality the source states (e.g. R), or None."""
    terminology = (card.get("labels") or [{}])[0].get("terminology")
    region = entry_from_card(terminology).get("anatomicRegion") if terminology else None
    if not region:
        return None
    laterality = _LATERALITY.get(str(volume.meta.get("laterality", "")))
    return hd.sr.FindingSite(anatomic_location=_code(hd, region),
                             laterality=_code(hd, laterality) if laterality else None)
