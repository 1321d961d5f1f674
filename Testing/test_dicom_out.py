"""DICOM out: a DICOM input's SEG (segment) and SR (detect), read back with pydicom and highdicom and checked,
reference by reference and voxel by voxel, against the run's own outputs and the source's headers; an
independent validator (dciodvfy) finds no error in them; other inputs get none and say so."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DIRECTIONS_LPS, LIVER_TUMOR_SEGMENTS
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from test_dicom_multiframe import ENHANCED_CT, write_classic_series, write_multiframe

from TransferSegLib import cli
from TransferSegLib.heatmaps import Detection
from TransferSegLib.io import load_volume, save_volume
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.pipeline import Result, run
from TransferSegLib.progress import CancelToken

LPS = np.array([-1.0, -1.0, 1.0])
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "TS-0042", "PatientBirthDate": "19600229", "PatientSex": "F",
           "StudyDate": "20250102", "StudyTime": "101500", "AccessionNumber": "ACC-7", "StudyID": "S7",
           "ReferringPhysicianName": "Who^Doctor"}
TUMOR_TERMS = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
               "type": ["SCT", "108369006", "Neoplasm"], "anatomicRegion": ["SCT", "10200004", "Liver"]}
CT_CARD = {"name": "test-liver", "version": "1.2.3", "task": "segmentation", "weights": {"sha256": "ab" * 32},
           "labels": [LIVER_TUMOR_SEGMENTS[0], dict(LIVER_TUMOR_SEGMENTS[1], terminology=TUMOR_TERMS)]}
LESION_TERMS = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                "type": ["SCT", "52988006", "Lesion"], "anatomicRegion": ["SCT", "76752008", "Breast"]}
DBT_CARD = {"name": "test-dbt", "version": "0.4.0", "task": "heatmap", "weights": {"sha256": "cd" * 32},
            "labels": [{"name": "lesion", "label": 1, "color": [1.0, 0.85, 0.1], "terminology": LESION_TERMS}]}
KINDS = {"mass": "4147007", "calcification_cluster": "129769006", "lesion": "52988006"}  # SNOMED CT finding types


# --- sources ------------------------------------------------------------------------------------------------------
def _add_patient(ds) -> None:
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)


def ct_series(folder: Path, shape=(6, 20, 16), direction="oblique", seed=0) -> Path:
    """A CT series as a scanner writes it (patient and study attributes too), its files named in an order that
    is not the slices' order."""
    full = ct_phantom(seed=seed, shape=(shape[0], max(32, shape[1]), max(32, shape[2])))[0].array
    j0, i0 = (full.shape[1] - shape[1]) // 2, (full.shape[2] - shape[2]) // 2  # a rectangle: a swapped axis shows
    array = full[:, j0:j0 + shape[1], i0:i0 + shape[2]].round().astype(np.int16)
    write_classic_series(folder, array, spacing_kji=(2.5, 0.7, 0.8), origin_lps=(-31.5, 12.25, 80.0),
                         orientation=DIRECTIONS_LPS[direction], rescale=(1.0, 0.0))
    order = np.random.default_rng(seed).permutation(shape[0])
    for k, file in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(file)
        _add_patient(ds)
        ds.save_as(file, enforce_file_format=True)
        file.rename(folder / f"tmp{order[k]:03d}")
    for file in folder.iterdir():
        file.rename(folder / f"CT{file.name[3:]}.dcm")
    return folder


def multiframe(path: Path, shape=(5, 24, 20), sop="1.2.840.10008.5.1.4.1.1.13.1.3", vendor="siemens") -> Path:
    """One multi-frame object; "siemens" stores the frames last slice first, with the geometry per frame."""
    array = np.random.default_rng(5).integers(0, 4000, size=shape).astype(np.uint16)
    return write_multiframe(path, array, vendor=vendor, sop=sop, edit=_add_patient)


def source_frames(source: Path) -> dict:
    """(SOP Instance UID, frame number or None) → (ImagePositionPatient, ImageOrientationPatient, PixelSpacing)
    of every source frame, read straight from the files."""
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    frames = {}
    for file in files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" not in ds:
            frames[(ds.SOPInstanceUID, None)] = (ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)
            continue
        shared = ds.SharedFunctionalGroupsSequence[0]
        for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
            def item(name, group=group):
                return (group.get(name) or shared.get(name))[0]
            frames[(ds.SOPInstanceUID, n)] = (item("PlanePositionSequence").ImagePositionPatient,
                                              item("PlaneOrientationSequence").ImageOrientationPatient,
                                              item("PixelMeasuresSequence").PixelSpacing)
    return frames


def source_header(source: Path):
    return pydicom.dcmread(sorted(source.iterdir())[0] if source.is_dir() else source, stop_before_pixels=True)


def designed_labels(shape) -> np.ndarray:
    """Labels that differ from slice to slice and are not symmetric: a flipped or shuffled axis shows."""
    labels = np.zeros(shape, np.uint8)
    for k in range(1, shape[0] - 1):
        labels[k, 2 + k:shape[1] - 3, 1:shape[2] // 2 + k] = 1
        labels[k, 4 + k:7 + k, 2:4 + k] = 2
    return labels


# --- checks ---------------------------------------------------------------------------------------------------
def check_common(ds, source: Path, *also) -> None:
    """Patient and study (and ``also``) copied from the source, and a new series."""
    first = source_header(source)
    for keyword in [*PATIENT, "StudyInstanceUID", *also]:
        assert ds[keyword].value == first[keyword].value, keyword
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID != first.SOPInstanceUID


def check_seg(out: Path, source: Path, card: dict) -> None:
    """segmentation.dcm against labelmap.nii.gz (the run's own output) and the source: every frame on a source
    frame's exact position, orientation and spacing, referencing it, holding that slice's label; no label of
    the label map left out; the segments coded as the card says."""
    ds = pydicom.dcmread(out / "segmentation.dcm")
    assert ds.SOPClassUID == SegmentationStorage and ds.SegmentationType == "BINARY"
    check_common(ds, source, "FrameOfReferenceUID")
    frames = source_frames(source)
    first = source_header(source)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {uid for uid, _ in frames}

    for number, (segment, item) in enumerate(zip(card["labels"], ds.SegmentSequence), start=1):
        terms = segment.get("terminology") or {"category": ["SCT", "85756007", "Tissue"],
                                               "type": ["SCT", "85756007", "Tissue"]}
        assert item.SegmentNumber == number and item.SegmentLabel == segment["name"]
        for key, sequence in (("category", "SegmentedPropertyCategoryCodeSequence"),
                              ("type", "SegmentedPropertyTypeCodeSequence"),
                              ("anatomicRegion", "AnatomicRegionSequence")):
            code = item.get(sequence)
            assert ([code[0].CodingSchemeDesignator, code[0].CodeValue, code[0].CodeMeaning] if code else None) == \
                terms.get(key), (segment["name"], key)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (card["name"], card["version"])
        assert card["weights"]["sha256"] in algorithm.AlgorithmParameters
    assert len(ds.SegmentSequence) == len(card["labels"])

    labelmap = sitk.ReadImage(str(out / "labelmap.nii.gz"))
    labels = sitk.GetArrayFromImage(labelmap)
    value_of = {n: s["label"] for n, s in enumerate(card["labels"], start=1)}
    shared = ds.SharedFunctionalGroupsSequence[0]
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seen = set()
    for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        position, orientation, spacing = frames[(ref.ReferencedSOPInstanceUID, ref.get("ReferencedFrameNumber"))]
        assert list(group.PlanePositionSequence[0].ImagePositionPatient) == list(position)  # the source's, exactly
        assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(orientation)
        assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(spacing)
        index = np.array(labelmap.TransformPhysicalPointToContinuousIndex([float(v) for v in position]))
        np.testing.assert_allclose(index, np.round(index), atol=1e-3)
        assert index[0] == pytest.approx(0, abs=1e-3) and index[1] == pytest.approx(0, abs=1e-3)
        k = int(round(index[2]))
        np.testing.assert_array_equal(pixels[n].astype(bool), labels[k] == value_of[number], err_msg=f"frame {n}")
        seen.add((number, k))
    for number, value in value_of.items():
        for k in range(labels.shape[0]):
            assert (number, k) in seen or not np.any(labels[k] == value), (number, k)

    # highdicom reads the same label of each source frame back
    seg = hd.seg.segread(out / "segmentation.dcm")
    keys = sorted(frames)
    if keys[0][1] is None:
        got = seg.get_pixels_by_source_instance([uid for uid, _ in keys], combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    else:
        got = seg.get_pixels_by_source_frame(keys[0][0], [n for _, n in keys], combine_segments=True,
                                             assert_missing_frames_are_empty=True)
    for (uid, frame), values in zip(keys, got):
        index = labelmap.TransformPhysicalPointToIndex([float(v) for v in frames[(uid, frame)][0]])
        expected = np.zeros(labels.shape[1:], np.uint8)
        for number, value in value_of.items():
            expected[labels[index[2]] == value] = number
        np.testing.assert_array_equal(values, expected)


def check_sr(out: Path, source: Path, card: dict, volume) -> list:
    """detections-sr.dcm against detections.json (the run's own output) and the source: one finding per
    detection in rank order, its kind, confidence and point (LPS; RAS with x, y negated), the point where the
    source's own geometry puts the detection's voxel; the source images as evidence."""
    ds = pydicom.dcmread(out / "detections-sr.dcm")
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    check_common(ds, source)  # its frame of reference: each point's own (below)
    frames = source_frames(source)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source_header(source).StudyInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence} == \
        {uid for uid, _ in frames}

    detections = json.loads((out / "detections.json").read_text(encoding="utf-8"))["detections"]
    sr = hd.sr.srread(out / "detections-sr.dcm")
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(detections)
    frame_of_reference = source_header(source).FrameOfReferenceUID
    # where the source puts voxel (k, j, i): the position of the frame that is slice k, plus j rows and i columns
    by_slice = {}
    for position, orientation, spacing in frames.values():
        k = int(round(volume.ras_to_ijk_points(np.asarray(position, float) * LPS)[0][0]))
        by_slice[k] = (np.asarray(position, float), np.asarray(orientation, float), np.asarray(spacing, float))
    for rank, (group, detection) in enumerate(zip(groups, detections), start=1):
        assert group.tracking_identifier == f"detection {rank}"
        assert group.finding_type.value == KINDS[detection["kind"]]
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert group.roi.frame_of_reference_uid == frame_of_reference
        point = group.roi.value[0]
        np.testing.assert_allclose(point, np.asarray(detection["position_ras"]) * LPS, atol=1e-4)
        k, j, i = detection["position_kji"]
        position, orientation, spacing = by_slice[k]
        row, column = orientation[:3], orientation[3:]  # i runs along a row, j down a column
        np.testing.assert_allclose(point, position + i * spacing[1] * row + j * spacing[0] * column, atol=2e-3)
        (certainty,) = group.get_measurements()
        assert certainty.name.value == "111012" and certainty.unit.value == "1"
        assert certainty.value == pytest.approx(detection["confidence"], rel=1e-6)
    return groups


# --- segment ------------------------------------------------------------------------------------------------------
def test_segment_on_a_ct_series_writes_a_seg_on_its_frames(tmp_path, tiny_model, monkeypatch):
    source = ct_series(tmp_path / "series")
    monkeypatch.setattr(cli, "_cancel_on_signals", CancelToken)  # keep pytest's own Ctrl-C handler
    assert cli.main(["segment", str(source), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert "segmentation.dcm" in summary["files"] and (tmp_path / "out" / "segmentation.dcm").is_file()
    assert summary["dicom"].startswith("written: segmentation.dcm, referencing 6 CT images of series ")
    card = json.loads(Path(tiny_model).read_text(encoding="utf-8"))
    check_seg(tmp_path / "out", source, card)


@pytest.mark.parametrize("direction", ["oblique", "coronal_acquired", "ras_flipped"])
def test_seg_frames_hold_each_source_slice_label_in_any_orientation(tmp_path, direction):
    source = ct_series(tmp_path / "series", direction=direction, seed=3)
    volume = load_volume(source)
    result = Result(volume=volume, labels=designed_labels(volume.shape), card=dict(CT_CARD), device="cpu",
                    timings={})
    result.write(tmp_path / "out", input_path=source)
    check_seg(tmp_path / "out", source, CT_CARD)


def test_seg_of_a_multiframe_ct_with_frames_stored_last_slice_first(tmp_path):
    source = multiframe(tmp_path / "enhanced.dcm", sop=ENHANCED_CT, vendor="siemens")
    volume = load_volume(source)
    result = Result(volume=volume, labels=designed_labels(volume.shape), card=dict(CT_CARD), device="cpu",
                    timings={})
    result.write(tmp_path / "out", input_path=source)
    check_seg(tmp_path / "out", source, CT_CARD)
    ds = pydicom.dcmread(tmp_path / "out" / "segmentation.dcm")
    assert ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source_header(source).SOPInstanceUID


def test_an_empty_segmentation_still_references_every_frame(tmp_path):
    source = ct_series(tmp_path / "series", shape=(4, 12, 10))
    volume = load_volume(source)
    Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=dict(CT_CARD), device="cpu",
           timings={}).write(tmp_path / "out", input_path=source)
    check_seg(tmp_path / "out", source, CT_CARD)


# --- detect -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", ["hologic", "siemens"])
def test_detect_on_a_dbt_object_writes_an_sr_with_a_point_per_detection(tmp_path, tiny_heatmap_model, vendor):
    source = multiframe(tmp_path / "dbt.dcm", shape=(6, 40, 32), vendor=vendor)
    volume = load_volume(source)
    result = run(volume, tiny_heatmap_model, device="cpu")
    assert result.detections
    result.write(tmp_path / "out", input_path=source)
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert "detections-sr.dcm" in summary["files"]
    assert summary["dicom"].startswith("written: detections-sr.dcm, referencing the MG Breast Tomosynthesis Image")
    card = json.loads(Path(tiny_heatmap_model).read_text(encoding="utf-8"))
    groups = check_sr(tmp_path / "out", source, card, volume)
    assert not groups[0].finding_sites  # the card names no region: no finding site made up


def test_sr_codes_each_kind_on_a_ct_series_and_the_breast_side(tmp_path):
    source = ct_series(tmp_path / "series", shape=(5, 16, 14))
    volume = load_volume(source)
    volume.meta["laterality"] = "L"
    detections = []
    places = [("mass", (3, 5, 9)), ("calcification_cluster", (1, 12, 2)), ("lesion", (0, 0, 13))]
    for n, (kind, kji) in enumerate(places):
        ras = volume.ijk_to_ras_points(np.array([kji], float))[0].round(3).tolist()
        detections.append(Detection(list(kji), ras, 0.9 - 0.2 * n, [*kji, *(v + 1 for v in kji)], kind))
    result = Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=dict(DBT_CARD), device="cpu",
                    timings={}, heatmap=np.zeros(volume.shape, np.float32), detections=detections)
    result.write(tmp_path / "out", input_path=source)
    groups = check_sr(tmp_path / "out", source, DBT_CARD, volume)
    assert [g.finding_type.meaning for g in groups] == ["Mass", "Calcification Cluster", "Lesion"]
    site = groups[0].finding_sites[0]
    assert site.value.value == "76752008" and site.laterality.meaning == "Left"


def test_an_sr_without_detections_says_none_were_found(tmp_path):
    source = ct_series(tmp_path / "series", shape=(4, 12, 10))
    volume = load_volume(source)
    Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=dict(DBT_CARD), device="cpu", timings={},
           heatmap=np.zeros(volume.shape, np.float32), detections=[]).write(tmp_path / "out", input_path=source)
    sr = hd.sr.srread(tmp_path / "out" / "detections-sr.dcm")
    assert not sr.content.get_planar_roi_measurement_groups()
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "no detections"
    assert (group.finding_type.scheme_designator, group.finding_type.value) == ("SCT", "260413007")  # None


# --- what gets none -----------------------------------------------------------------------------------------------
def test_a_nifti_input_gets_no_dicom_output_and_says_so(tmp_path, tiny_model, monkeypatch):
    source = save_volume(ct_phantom(seed=2, shape=(6, 32, 32))[0], tmp_path / "ct.nii.gz")
    monkeypatch.setattr(cli, "_cancel_on_signals", CancelToken)
    assert cli.main(["segment", str(source), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert summary["dicom"] == "not written: the input is not DICOM (NIfTI)"
    assert summary["files"] == ["segmentation.seg.nrrd", "labelmap.nii.gz", "overview.png", "lesions.csv",
                                "report.html", "result.json"]
    assert not list((tmp_path / "out").glob("*.dcm"))


def test_a_volume_off_the_source_grid_gets_no_dicom_output_and_the_rest_is_written(tmp_path):
    source = ct_series(tmp_path / "series", shape=(4, 12, 10))
    volume = load_volume(source)
    shifted = type(volume)(volume.array, volume.spacing, volume.directions,
                           volume.origin + volume.directions[:, 2] * volume.spacing[0] * 0.5)
    result = Result(volume=shifted, labels=designed_labels(volume.shape), card=dict(CT_CARD), device="cpu",
                    timings={})
    result.write(tmp_path / "out", input_path=source)
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert summary["dicom"].startswith("not written: ") and "positions" in summary["dicom"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(summary["files"]) == sorted(
        ["segmentation.seg.nrrd", "labelmap.nii.gz", "overview.png", "lesions.csv", "report.html", "result.json"])
    # written from a volume in memory: no file to reference
    result.write(tmp_path / "again")
    summary = json.loads((tmp_path / "again" / "result.json").read_text(encoding="utf-8"))
    assert summary["dicom"] == "not written: the input was given as a volume, not as a file"


# --- an independent validator ------------------------------------------------------------------------------------
def test_dciodvfy_finds_no_error_in_the_seg_and_the_sr(tmp_path):
    """David Clunie's dciodvfy (Debian's dicom3tools) checks each file against the IOD: no "Error" line;
    its warnings are printed (pytest -s shows them)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    written = []
    for name, source in (("series", ct_series(tmp_path / "series", shape=(4, 12, 10))),
                         ("dbt", multiframe(tmp_path / "dbt.dcm", shape=(4, 12, 10), vendor="hologic")),
                         ("enhanced", multiframe(tmp_path / "enhanced.dcm", shape=(4, 12, 10), sop=ENHANCED_CT))):
        volume = load_volume(source)
        Result(volume=volume, labels=designed_labels(volume.shape), card=dict(CT_CARD), device="cpu",
               timings={}).write(tmp_path / name / "seg", input_path=source)
        detection = Detection([1, 2, 3], volume.ijk_to_ras_points(np.array([[1, 2, 3]], float))[0].tolist(), 0.75,
                              [1, 2, 3, 2, 3, 4], "mass")
        Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=dict(DBT_CARD), device="cpu", timings={},
               heatmap=np.zeros(volume.shape, np.float32), detections=[detection]).write(tmp_path / name / "sr",
                                                                                        input_path=source)
        written += [tmp_path / name / "seg" / "segmentation.dcm", tmp_path / name / "sr" / "detections-sr.dcm"]
    for path in written:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (report.stdout + report.stderr).splitlines()
        print(f"dciodvfy {path.relative_to(tmp_path)}:", *lines, sep="\n  ")
        assert not [line for line in lines if line.startswith("Error")], lines
