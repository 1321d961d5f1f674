"""Volume IO: exact geometry on every path, voxel round trips, atomic writes, Slicer-readable segmentations."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import DIRECTIONS_LPS, sha256, write_dicom_series, write_image

from TransferSegLib.io import (
    atomic_output,
    load_volume,
    save_labelmap,
    save_scalar,
    save_segmentation,
    save_volume,
)
from TransferSegLib.volume import TransferSegError, Volume, anatomical_axes, orientation_name

LIVER_TERMINOLOGY = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
SEGMENTS = [
    {"name": "liver", "label": 1, "color": (0.85, 0.45, 0.35), "terminology": LIVER_TERMINOLOGY},
    {"name": "liver tumor", "label": 2, "color": (0.2, 0.9, 0.3),
     "terminology": "Segmentation category and type - 3D Slicer General Anatomy list"
                    "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^~"
                    "Anatomic codes - DICOM master list~SCT^10200004^Liver~^^"},
]


def _geometry(image: sitk.Image):
    return np.array(image.GetOrigin()), np.array(image.GetSpacing()), np.array(image.GetDirection())


# NIfTI stores its geometry (qform/sform) in float32, so a NIfTI output can only match to float32
# precision; NRRD and MetaImage store doubles as text and must match to the last bits.
def _tolerance(suffix):
    return 2e-6 if suffix.startswith(".nii") else 1e-12


@pytest.mark.parametrize("direction", sorted(DIRECTIONS_LPS))
@pytest.mark.parametrize("in_suffix", [".nii.gz", ".nrrd", ".mha"])
def test_outputs_keep_the_input_geometry(tmp_path, ct_like, direction, in_suffix):
    src = write_image(ct_like, tmp_path / f"ct{in_suffix}", direction_lps=DIRECTIONS_LPS[direction])
    reference = sitk.ReadImage(str(src))
    volume = load_volume(src)
    labels = (volume.array > 100).astype(np.uint8) + (volume.array < -500)
    outputs = {
        save_labelmap(labels, volume, tmp_path / "labels.nii.gz"): labels,
        save_labelmap(labels, volume, tmp_path / "labels.nrrd"): labels,
        save_scalar(volume.array / 1000.0, volume, tmp_path / "prob.mha"): (volume.array / 1000.0).astype(np.float32),
        save_segmentation(labels, volume, tmp_path / "seg.seg.nrrd", SEGMENTS): labels,
        save_volume(volume, tmp_path / "copy.nii"): volume.array,
    }
    tol = _tolerance(in_suffix)
    want_origin, want_spacing, want_direction = _geometry(reference)
    for path, values in outputs.items():
        back = sitk.ReadImage(str(path))
        origin, spacing, direction_back = _geometry(back)
        out_tol = max(tol, _tolerance(path.name[path.name.index("."):]))
        np.testing.assert_allclose(origin, want_origin, rtol=0, atol=out_tol * 100, err_msg=str(path))
        np.testing.assert_allclose(spacing, want_spacing, rtol=0, atol=out_tol, err_msg=str(path))
        np.testing.assert_allclose(direction_back, want_direction, rtol=0, atol=out_tol, err_msg=str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values, err_msg=str(path))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_double_precision_formats_round_trip_bit_for_bit(tmp_path, ct_like, suffix):
    # Spacing and origin that float32 cannot hold: any float32 detour would show.
    src = write_image(ct_like, tmp_path / f"ct{suffix}", spacing_ijk=(0.7123456789012345, 0.8, 2.5),
                      origin_lps=(-123.45678901234567, 10.1, 7.7), direction_lps=np.diag([1.0, 1.0, 1.0]))
    volume = load_volume(src)
    out = save_volume(volume, tmp_path / f"out{suffix}")
    assert _geometry(sitk.ReadImage(str(out)))[0].tolist() == _geometry(sitk.ReadImage(str(src)))[0].tolist()
    assert _geometry(sitk.ReadImage(str(out)))[1].tolist() == _geometry(sitk.ReadImage(str(src)))[1].tolist()


def test_ijk_to_ras_matches_itk_physical_points(tmp_path, ct_like):
    src = write_image(ct_like, tmp_path / "ct.nrrd", direction_lps=DIRECTIONS_LPS["oblique"])
    image = sitk.ReadImage(str(src))
    volume = load_volume(src)
    rng = np.random.default_rng(1)
    for _ in range(5):
        ijk = rng.uniform(0, 5, size=3)
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(ijk)))
        ras = volume.ijk_to_ras @ np.append(ijk, 1.0)
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
        # and the array-order helpers invert each other
        kji = ijk[::-1]
        np.testing.assert_allclose(volume.ras_to_ijk_points(volume.ijk_to_ras_points(kji)), [kji], atol=1e-9)


def test_volume_spacing_is_in_array_axis_order(tmp_path, ct_like):
    src = write_image(ct_like, tmp_path / "ct.nrrd", spacing_ijk=(0.7, 0.8, 3.0))
    volume = load_volume(src)
    assert volume.spacing == (3.0, 0.8, 0.7)
    assert volume.array.dtype == np.float32 and volume.shape == ct_like.shape
    np.testing.assert_array_equal(volume.array, ct_like.astype(np.float32))  # CT stays in HU


def test_from_ijk_to_ras_round_trip():
    m = np.array([[-0.7, 0.0, 0.0, 10.0], [0.0, 0.0, 2.5, -3.0], [0.0, -0.8, 0.0, 4.0], [0, 0, 0, 1.0]])
    volume = Volume.from_ijk_to_ras(np.zeros((4, 5, 6)), m)
    np.testing.assert_allclose(volume.ijk_to_ras, m, atol=1e-12)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7))
    # k runs along A: a coronal acquisition; R, A, S found from the matrix, not the axis index.
    assert anatomical_axes(volume.directions) == {"R": 2, "A": 0, "S": 1}
    assert orientation_name(volume.directions) == "LIA coronal"


def test_orientation_names():
    assert orientation_name(np.diag([-1.0, -1.0, 1.0])) == "LPS axial"
    assert orientation_name(np.eye(3)) == "RAS axial"
    oblique = Volume(np.zeros((2, 2, 2)), directions=np.array(
        [[0.98, 0.0, 0.199], [0.0, 1.0, 0.0], [-0.199, 0.0, 0.98]]) / np.array([1.0, 1.0, 1.0]))
    assert orientation_name(oblique.directions).endswith("axial (oblique)")
    assert "-ish" in orientation_name(oblique.directions)


def test_dicom_series_folder(tmp_path, ct_like):
    folder = write_dicom_series(ct_like, tmp_path / "dicom", spacing_ijk=(0.75, 0.75, 2.5),
                                origin_lps=(-100.0, -120.0, 50.0))
    volume = load_volume(folder)
    np.testing.assert_array_equal(volume.array, ct_like.astype(np.float32))
    assert volume.spacing == pytest.approx((2.5, 0.75, 0.75))
    np.testing.assert_allclose(volume.origin, [100.0, 120.0, 50.0])  # LPS → RAS
    assert orientation_name(volume.directions) == "LPS axial"


def test_segmentation_reads_back_in_slicerio(tmp_path, ct_like):
    volume = load_volume(write_image(ct_like, tmp_path / "ct.nrrd", direction_lps=DIRECTIONS_LPS["oblique"]))
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:5, 2:8, 3:10] = 1
    labels[2:4, 4:6, 5:7] = 2
    path = save_segmentation(labels, volume, tmp_path / "out.seg.nrrd", SEGMENTS)
    seg = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(seg) == ["liver", "liver tumor"]
    liver = slicerio.segment_from_name(seg, "liver")
    assert liver["labelValue"] == 1 and liver["color"] == pytest.approx([0.85, 0.45, 0.35])
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    tumor = slicerio.segment_from_name(seg, "liver tumor")
    assert tumor["terminology"]["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    voxels = seg["voxels"].transpose(2, 1, 0)  # slicerio reads in (i, j, k) order
    np.testing.assert_array_equal(voxels, labels)
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ seg["ijkToLPS"], volume.ijk_to_ras, atol=1e-12)


def test_segmentation_reads_back_in_slicer_mrml(tmp_path, ct_like):
    slicer = pytest.importorskip("slicer")  # slicer-core is a declared test dependency
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    volume = load_volume(write_image(ct_like, tmp_path / "ct.nrrd", direction_lps=DIRECTIONS_LPS["ras_flipped"]))
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:5, 2:8, 3:10] = 1
    labels[2:4, 4:6, 5:7] = 2
    path = save_segmentation(labels, volume, tmp_path / "out.seg.nrrd", SEGMENTS)

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for n, expected in enumerate(SEGMENTS):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == expected["name"]
        assert segment.GetLabelValue() == expected["label"]
        assert segment.GetColor() == pytest.approx(expected["color"])
        tag = vtk.mutable("")
        assert segment.GetTag("TerminologyEntry", tag)
        assert ("10200004" in str(tag)) and (expected["name"] != "liver tumor" or "108369006" in str(tag))
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(image_to_world, volume.ijk_to_ras, atol=1e-9)
        extent = labelmap.GetExtent()
        dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
        values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
        full = np.zeros(volume.shape, values.dtype)
        full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values
        np.testing.assert_array_equal(full == expected["label"], labels == expected["label"])


def test_segmentation_refuses_unlabelled_values_and_bad_segments(tmp_path, ct_like):
    volume = load_volume(write_image(ct_like, tmp_path / "ct.nrrd"))
    labels = np.zeros(volume.shape, np.uint8)
    labels[0, 0, 0] = 3
    with pytest.raises(TransferSegError, match=r"label value\(s\) \[3\]"):
        save_segmentation(labels, volume, tmp_path / "a.seg.nrrd", SEGMENTS)
    with pytest.raises(TransferSegError, match="color"):
        save_segmentation(labels * 0, volume, tmp_path / "a.seg.nrrd", [{"name": "x", "label": 1, "color": (2, 0, 0)}])
    with pytest.raises(TransferSegError, match="unique"):
        save_segmentation(labels * 0, volume, tmp_path / "a.seg.nrrd", SEGMENTS + [SEGMENTS[0]])
    with pytest.raises(TransferSegError, match="does not match|must match"):
        save_labelmap(labels[:-1], volume, tmp_path / "a.nii.gz")
    with pytest.raises(TransferSegError, match="whole numbers"):
        save_labelmap(labels + 0.5, volume, tmp_path / "a.nii.gz")
    with pytest.raises(TransferSegError, match="cannot write"):
        save_labelmap(labels, volume, tmp_path / "a.png")
    assert not list(tmp_path.glob("a.*")) and not list(tmp_path.glob(".a*"))


def test_labelmap_dtype_widens_beyond_255(tmp_path):
    volume = Volume(np.zeros((3, 4, 5)))
    labels = np.zeros(volume.shape, np.int64)
    labels[1, 1, 1] = 300
    back = sitk.ReadImage(str(save_labelmap(labels, volume, tmp_path / "l.nrrd")))
    assert back.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayFromImage(back)[1, 1, 1] == 300
    back = sitk.ReadImage(str(save_labelmap(labels.clip(0, 2), volume, tmp_path / "m.nrrd")))
    assert back.GetPixelID() == sitk.sitkUInt8


def test_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    volume = Volume(np.ones((3, 4, 5)), spacing=(2.0, 1.0, 1.0))
    target = save_scalar(volume.array, volume, tmp_path / "heat.nii.gz")
    before = sha256(target)

    real_write = sitk.WriteImage

    def write_half_then_fail(image, path, *args, **kwargs):  # fault injection: a crash mid-write
        real_write(image, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_scalar(volume.array * 5, volume, target)
    assert sha256(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz"]


def test_atomic_output_renames_only_on_success(tmp_path):
    target = tmp_path / "sub" / "x.seg.nrrd"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".seg.nrrd") and tmp != target
        tmp.write_bytes(b"complete")
        assert not target.exists()
    assert target.read_bytes() == b"complete"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("cancelled")
    assert target.read_bytes() == b"complete" and len(list(target.parent.iterdir())) == 1


def test_loading_never_modifies_the_input(tmp_path, ct_like):
    paths = [write_image(ct_like, tmp_path / f"ct{s}") for s in (".nii.gz", ".nrrd", ".mha")]
    hashes = [sha256(p) for p in paths]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    for p in paths:
        volume = load_volume(p)
        volume.array[:] = 0  # the caller's array is its own, not a view of anything on disk
    assert [sha256(p) for p in paths] == hashes
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_float32_volume_round_trip_keeps_every_voxel(tmp_path, suffix):
    rng = np.random.default_rng(5)
    volume = Volume(rng.normal(size=(7, 8, 9)).astype(np.float32) * 1000, spacing=(2.0, 0.5, 0.75),
                    directions=np.diag([-1.0, -1.0, 1.0]), origin=(1.0, 2.0, 3.0))
    loaded = load_volume(save_volume(volume, tmp_path / f"v{suffix}"))
    import gc

    gc.collect()  # the array must own its memory, not view a freed SimpleITK image
    _ = [np.ones(10_000) for _ in range(50)]
    np.testing.assert_array_equal(loaded.array, volume.array)
    assert loaded.array.flags.owndata or loaded.array.base is not None and loaded.array.base.flags.owndata
