"""Multi-frame DICOM in: breast tomosynthesis and Enhanced CT objects written with pydicom in the shape vendors
write them, read through `load_volume` with the geometry of the same slices as a classic series, laterality and
view kept, and every file that cannot be read refused in one line."""
from __future__ import annotations

import copy
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DIRECTIONS_LPS, sha256
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, SegmentationStorage,
                         generate_uid)

from TransferSegLib.dicom_file import SOP_CLASSES
from TransferSegLib.io import load_volume
from TransferSegLib.volume import TransferSegError, Volume, orientation_name

BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
DIGITAL_MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
# A cranio-caudal view (LPS): rows run from the chest wall to the nipple (anterior), columns to the left, and
# the slices stack from the detector up (superior), along the compression.  Columns: row, column, normal.
CC_ORIENTATION = np.column_stack([(0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
VIEWS = {  # (scheme, code, meaning): SNOMED CT as current files write it, SNOMED-RT as older ones do
    "CC": ("SCT", "399162004", "cranio-caudal"),
    "MLO": ("SRT", "R-10226", "medio-lateral oblique"),
}


def _item(**elements) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _ds(values) -> list:
    """Decimal strings of at most 16 characters, as DICOM's DS holds them."""
    return [f"{float(v):.10g}" for v in values]


def _code(scheme, value, meaning) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _file_meta(sop: str, syntax=ExplicitVRLittleEndian) -> tuple:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    return ds


def _pixel_module(ds: Dataset, array: np.ndarray, bits_stored: int) -> None:
    ds.Rows, ds.Columns = array.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(array.dtype.kind == "i")
    ds.PixelData = np.ascontiguousarray(array).tobytes()


def _positions(origin_lps, orientation, spacing_kji, frames) -> np.ndarray:
    """ImagePositionPatient of slice k: the origin plus k slice steps along the normal (column 2)."""
    return np.asarray(origin_lps, float) + np.outer(np.arange(frames) * spacing_kji[0], orientation[:, 2])


def write_multiframe(path, array, *, vendor="hologic", sop=BREAST_TOMOSYNTHESIS, spacing_kji=(1.0, 0.1, 0.1),
                     origin_lps=(12.5, -40.0, 31.0), orientation=CC_ORIENTATION, laterality="R", view="CC",
                     rescale=None, file_order=None, syntax=ExplicitVRLittleEndian, edit=None) -> Path:
    """Write ``array`` (slices (k, j, i) in order along the normal) as one multi-frame object.

    ``vendor`` picks where the file states things, as the two DBT vendors do: "hologic" puts the geometry, the
    laterality (Frame Anatomy) and the rescale in the Shared Functional Groups and the frames in order;
    "siemens" repeats them in every frame's Per-frame Functional Groups, states the laterality as Image
    Laterality, codes the view in SNOMED-RT and stores the frames from the last slice to the first.
    ``rescale`` is one (slope, intercept) per slice; ``file_order`` the slice each stored frame holds;
    ``edit(ds)`` breaks the dataset before it is written.
    """
    array = np.asarray(array)
    frames = len(array)
    if file_order is None:
        file_order = list(range(frames))[::-1] if vendor == "siemens" else list(range(frames))
    ds = _file_meta(sop)
    ds.Modality = "CT" if sop == ENHANCED_CT else "MG"
    ds.Manufacturer = {"hologic": "HOLOGIC, Inc.", "siemens": "Siemens Healthineers"}[vendor]
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "NONE"] if ds.Modality == "MG" else ["ORIGINAL", "PRIMARY"]
    ds.NumberOfFrames = frames
    if view:
        ds.ViewCodeSequence = [_code(*VIEWS[view])]
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    orientation_item = _item(ImageOrientationPatient=_ds(np.concatenate([orientation[:, 0], orientation[:, 1]])))
    measures = _item(PixelSpacing=_ds(spacing_kji[1:]), SliceThickness=_ds(spacing_kji[:1])[0])
    anatomy = _item(AnatomicRegionSequence=[_code("SCT", "76752008", "Breast")], FrameLaterality=laterality or "U")
    positions = _positions(origin_lps, orientation, spacing_kji, frames)
    rescale = rescale if rescale is not None else [(1.0, 0.0)] * frames
    shared = Dataset()
    per_frame = []
    for f, k in enumerate(file_order):
        group = _item(PlanePositionSequence=[_item(ImagePositionPatient=_ds(positions[k]))],
                      FrameContentSequence=[_item(DimensionIndexValues=[1, f + 1], StackID="1",
                                                  InStackPositionNumber=f + 1)])
        if vendor == "siemens":
            group.PlaneOrientationSequence = [copy.deepcopy(orientation_item)]
            group.PixelMeasuresSequence = [copy.deepcopy(measures)]
            group.PixelValueTransformationSequence = [_item(RescaleSlope=_ds(rescale[k][:1])[0],
                                                            RescaleIntercept=_ds(rescale[k][1:])[0], RescaleType="US")]
        per_frame.append(group)
    if vendor == "hologic":
        shared.PlaneOrientationSequence = [orientation_item]
        shared.PixelMeasuresSequence = [measures]
        if laterality:
            shared.FrameAnatomySequence = [anatomy]
        if len(set(rescale)) == 1:
            shared.PixelValueTransformationSequence = [_item(RescaleSlope=_ds(rescale[0][:1])[0],
                                                             RescaleIntercept=_ds(rescale[0][1:])[0], RescaleType="US")]
        else:
            for f, k in enumerate(file_order):
                per_frame[f].PixelValueTransformationSequence = [_item(
                    RescaleSlope=_ds(rescale[k][:1])[0], RescaleIntercept=_ds(rescale[k][1:])[0], RescaleType="US")]
    elif laterality:
        ds.ImageLaterality = laterality
    shared.FrameVOILUTSequence = [_item(WindowCenter="512", WindowWidth="1024")]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _pixel_module(ds, array[file_order], bits_stored=16 if array.dtype.kind == "i" else 12)
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == JPEGLosslessSV1:  # a valid frame stream is not needed: the file must be refused unread
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"] * frames)
    if edit:
        edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_classic_series(folder, array, *, spacing_kji, origin_lps, orientation, rescale) -> Path:
    """The same slices as a classic CT series: one single-frame file per slice, as a scanner writes them."""
    folder = Path(folder)
    folder.mkdir()
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    positions = _positions(origin_lps, orientation, spacing_kji, len(array))
    for k, slice_k in enumerate(array):
        ds = _file_meta(CTImageStorage)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.ImagePositionPatient = _ds(positions[k])
        ds.ImageOrientationPatient = _ds(np.concatenate([orientation[:, 0], orientation[:, 1]]))
        ds.PixelSpacing, ds.SliceThickness = _ds(spacing_kji[1:]), _ds(spacing_kji[:1])[0]
        ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[:1])[0], _ds(rescale[1:])[0]
        _pixel_module(ds, slice_k, bits_stored=16)
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder


def _slices(shape=(5, 12, 10), dtype=np.uint16, seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 1000, size=shape).astype(dtype)
    array[2, 3:7, 4:8] = 1023  # a bright mass, off centre: a flipped or shuffled axis shows
    return array


# --- reading what vendors write -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", ["hologic", "siemens"])
def test_vendor_dbt_reads_with_its_geometry_laterality_and_view(tmp_path, vendor):
    slices = _slices()
    laterality, view = ("R", "CC") if vendor == "hologic" else ("L", "MLO")
    path = write_multiframe(tmp_path / "dbt.dcm", slices, vendor=vendor, laterality=laterality, view=view)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, slices.astype(np.float32))  # sorted along the normal
    assert volume.spacing == pytest.approx((1.0, 0.1, 0.1), abs=1e-12)
    np.testing.assert_allclose(volume.directions, LPS_TO_RAS[:, None] * CC_ORIENTATION, atol=1e-12)
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS * np.array([12.5, -40.0, 31.0]), atol=1e-9)
    assert orientation_name(volume.directions) == "ALS axial"  # i → anterior, j → left, k → superior
    assert volume.meta["laterality"] == laterality and volume.meta["view"] == view
    assert volume.meta["sop_class"] == "Breast Tomosynthesis Image" and volume.meta["modality"] == "MG"
    scheme, value, meaning = VIEWS[view]
    assert volume.meta["view_code"] == {"scheme": scheme, "value": value, "meaning": meaning}


@pytest.mark.parametrize("vendor", ["hologic", "siemens"])
def test_each_frame_gets_its_own_rescale_and_frames_in_any_order_are_sorted(tmp_path, vendor):
    slices = _slices(shape=(6, 8, 9))
    rescale = [(1.0, -100.0 * k) for k in range(6)]
    order = [3, 0, 5, 1, 4, 2]
    path = write_multiframe(tmp_path / "dbt.dcm", slices, vendor=vendor, rescale=rescale, file_order=order)
    volume = load_volume(path)
    want = slices.astype(np.float64) - 100.0 * np.arange(6)[:, None, None]
    np.testing.assert_array_equal(volume.array, want.astype(np.float32))
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS * np.array([12.5, -40.0, 31.0]), atol=1e-9)


@pytest.mark.parametrize("rescale", [(1.0, -1024.0), (0.5, -1024.25)], ids=["integer", "fractional"])
@pytest.mark.parametrize("direction", sorted(DIRECTIONS_LPS))
def test_a_multiframe_file_equals_the_same_slices_as_a_classic_series(tmp_path, direction, rescale):
    """SimpleITK reads the classic series (and io its geometry from that): the multi-frame file must give the
    same array, spacing, directions and origin."""
    slices = _slices(shape=(5, 11, 9), dtype=np.int16)
    orientation = np.asarray(DIRECTIONS_LPS[direction], float)
    geometry = {"spacing_kji": (2.5, 0.7, 0.8), "origin_lps": (-120.5, 33.25, 80.0), "orientation": orientation}
    series = load_volume(write_classic_series(tmp_path / "series", slices, rescale=rescale, **geometry))
    multiframe = load_volume(write_multiframe(tmp_path / "ct.dcm", slices, sop=ENHANCED_CT, laterality=None, view=None,
                                              rescale=[rescale] * len(slices), **geometry))
    np.testing.assert_array_equal(multiframe.array, series.array)
    assert multiframe.array.dtype == series.array.dtype == np.float32
    np.testing.assert_allclose(multiframe.spacing, series.spacing, rtol=0, atol=1e-9)
    np.testing.assert_allclose(multiframe.directions, series.directions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(multiframe.origin, series.origin, rtol=0, atol=1e-9)
    assert "laterality" not in multiframe.meta and multiframe.meta["sop_class"] == "Enhanced CT Image"


def test_a_folder_holding_one_multiframe_file_and_a_file_without_suffix(tmp_path):
    slices = _slices()
    folder = tmp_path / "export"
    folder.mkdir()
    write_multiframe(folder / "1.2.3.4", slices, vendor="siemens", laterality="L", view="MLO")
    for source in (folder, folder / "1.2.3.4"):  # PACS exports name files by UID, with no suffix
        volume = load_volume(source)
        np.testing.assert_array_equal(volume.array, slices.astype(np.float32))
        assert (volume.meta["laterality"], volume.meta["view"]) == ("L", "MLO")


def test_compressed_frames_that_pydicom_decodes_read_the_same(tmp_path):
    slices = _slices()
    plain = load_volume(write_multiframe(tmp_path / "plain.dcm", slices))
    rle = load_volume(write_multiframe(tmp_path / "rle.dcm", slices, syntax=RLELossless))
    np.testing.assert_array_equal(rle.array, plain.array)
    np.testing.assert_array_equal(rle.ijk_to_ras, plain.ijk_to_ras)


def test_frames_are_read_one_at_a_time(tmp_path):
    """The peak is the float32 volume plus a frame or two: no copy of the file's pixels, no float64 volume."""
    slices = _slices(shape=(24, 256, 192))
    path = write_multiframe(tmp_path / "dbt.dcm", slices, vendor="siemens",
                            rescale=[(1.0, -50.0)] * len(slices))  # a rescale: the float64 step is per frame
    tracemalloc.start()
    try:
        volume = load_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    frame = slices[0].size * 8
    assert volume.nbytes == slices.size * 4
    assert peak < volume.nbytes + 4 * frame, (peak, volume.nbytes)


def test_volume_meta_is_optional_and_kept_by_with_array():
    plain = Volume(np.zeros((2, 3, 4)))
    assert plain.meta == {}
    tagged = Volume(np.zeros((2, 3, 4)), meta={"laterality": "R", "view": "CC"})
    assert tagged.with_array(np.ones((2, 3, 4))).meta == {"laterality": "R", "view": "CC"}


# --- what is refused ----------------------------------------------------------------------------------------------
def _truncated(tmp_path, fraction):
    path = write_multiframe(tmp_path / "whole.dcm", _slices())
    raw = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    return cut


def _drop(keyword, frame=None):
    def edit(ds):
        groups = ds.PerFrameFunctionalGroupsSequence if frame is not None else ds
        delattr(groups[frame] if frame is not None else groups, keyword)
    return edit


def _set(**elements):
    def edit(ds):
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
    return edit


def _turn_frame(ds):
    turned = ds.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence[0]
    turned.ImageOrientationPatient = _ds([1, 0, 0, 0, 0, -1])


def _move_frame(position):
    def edit(ds):
        ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0].ImagePositionPatient = _ds(position)
    return edit


def _zero_pixel_spacing(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = ["0", "0"]


def _colour(ds):
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = ds.PixelData * 3


REFUSED = {
    "one-frame DBT object": (lambda t: write_multiframe(t / "one.dcm", _slices()[:1]),
                             r"input is 2D \(12×10, a mammogram \(R CC\), one frame\); TransferSeg needs a 3D volume"),
    "2D mammogram": (lambda t: write_multiframe(t / "mg.dcm", _slices()[:1], sop=DIGITAL_MAMMOGRAPHY, vendor="siemens",
                                                laterality="L", view="MLO", edit=_drop("NumberOfFrames")),
                     r"input is 2D \(12×10, a mammogram \(L MLO\), one frame\)"),
    "truncated in the pixel data": (lambda t: _truncated(t, 0.8), "truncated"),
    "truncated in the header": (lambda t: _truncated(t, 0.2), "truncated"),
    "no per-frame functional groups": (lambda t: write_multiframe(
        t / "x.dcm", _slices(), edit=_drop("PerFrameFunctionalGroupsSequence")), r"no Per-frame Functional Groups"),
    "a frame without its position": (lambda t: write_multiframe(
        t / "x.dcm", _slices(), edit=_drop("PlanePositionSequence", frame=2)),
        r"ImagePositionPatient of frame 3 of 5 is not stated"),
    "no orientation": (lambda t: write_multiframe(
        t / "x.dcm", _slices(), edit=lambda ds: delattr(ds.SharedFunctionalGroupsSequence[0],
                                                        "PlaneOrientationSequence")),
        r"ImageOrientationPatient of frame 1 of 5 is not stated"),
    "frames of mixed orientations": (lambda t: write_multiframe(t / "x.dcm", _slices(), vendor="siemens",
                                                                edit=_turn_frame), "oriented differently from frame 1"),
    "zero pixel spacing": (lambda t: write_multiframe(t / "x.dcm", _slices(), edit=_zero_pixel_spacing),
                           r"PixelSpacing of frame 1 of 5 reads '0\\0', not two positive numbers"),
    "two frames at one position": (lambda t: write_multiframe(
        t / "x.dcm", _slices(), edit=_move_frame(_positions((12.5, -40.0, 31.0), CC_ORIENTATION, (1.0,), 5)[2])),
        r"frames 3 and 4 of 5 lie at the same position .*slice spacing is zero"),
    "a missing slice": (lambda t: write_multiframe(
        t / "x.dcm", _slices(), edit=_move_frame(_positions((12.5, -40.0, 31.0), CC_ORIENTATION, (1.0,), 6)[5])),
        r"a slice is missing between"),
    "JPEG lossless without a decoder": (lambda t: write_multiframe(t / "x.dcm", _slices(), syntax=JPEGLosslessSV1),
                                        r"JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70.*gdcmconv --raw"),
    "a segmentation object": (lambda t: write_multiframe(t / "x.dcm", _slices(), sop=SegmentationStorage),
                              r"a multi-frame Segmentation object \(5 frames\) is not read as a volume"),
    "colour frames": (lambda t: write_multiframe(t / "x.dcm", _slices(), edit=_colour), "3 components per voxel"),
    "MONOCHROME1": (lambda t: write_multiframe(t / "x.dcm", _slices(),
                                               edit=_set(PhotometricInterpretation="MONOCHROME1")), "MONOCHROME1"),
    "zero rescale slope": (lambda t: write_multiframe(t / "x.dcm", _slices(), rescale=[(0.0, 0.0)] * 5),
                           "not a non-zero slope"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_read_is_refused_in_one_line(tmp_path, case):
    make, pattern = REFUSED[case]
    path = make(tmp_path)
    before = sha256(path)
    with pytest.raises(TransferSegError, match=pattern) as error:
        load_volume(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert sha256(path) == before  # inputs are only read


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["native", "RLE"])
def test_a_file_cut_anywhere_is_refused_in_one_line(tmp_path, syntax):
    raw = write_multiframe(tmp_path / "whole.dcm", _slices(), vendor="siemens", syntax=syntax).read_bytes()
    cut = tmp_path / "cut.dcm"
    # from the end of the preamble through the frames, and every cut inside the last 8 bytes (the
    # compressed data's sequence delimiter, without which pydicom still decodes every frame)
    for length in [*range(132, len(raw), 37), *range(len(raw) - 8, len(raw))]:
        cut.write_bytes(raw[:length])
        with pytest.raises(TransferSegError) as error:
            load_volume(cut)
        assert "\n" not in str(error.value) and ("truncated" in str(error.value) or "damaged" in str(error.value)), (
            length, str(error.value))


def test_a_classic_slice_keeps_its_message(tmp_path):
    folder = write_classic_series(tmp_path / "series", _slices(dtype=np.int16), spacing_kji=(2.0, 0.7, 0.7),
                                  origin_lps=(0.0, 0.0, 0.0), orientation=np.eye(3), rescale=(1.0, 0.0))
    with pytest.raises(TransferSegError, match=r"input is 2D \(10×12, a single DICOM slice\).*give the folder"):
        load_volume(folder / "IM0000.dcm")


def test_without_pydicom_a_multiframe_file_says_to_install_it_and_series_read_as_before(tmp_path, monkeypatch):
    path = write_multiframe(tmp_path / "dbt.dcm", _slices())
    folder = write_classic_series(tmp_path / "series", _slices(dtype=np.int16), spacing_kji=(2.0, 0.7, 0.7),
                                  origin_lps=(0.0, 0.0, 0.0), orientation=np.eye(3), rescale=(1.0, 0.0))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # what `import pydicom` meets where it is not installed
    with pytest.raises(TransferSegError, match=r"needs pydicom; install it \(pip install pydicom\)"):
        load_volume(path)
    with pytest.raises(TransferSegError, match=r"input is 2D \(10×12, a single DICOM slice\)"):
        load_volume(folder / "IM0000.dcm")
    assert load_volume(folder).shape == (5, 12, 10)


def test_the_supported_classes_are_the_enhanced_volume_objects():
    assert {BREAST_TOMOSYNTHESIS, ENHANCED_CT} <= set(SOP_CLASSES)
    assert pydicom.uid.UID(BREAST_TOMOSYNTHESIS).name == "Breast Tomosynthesis Image Storage"
