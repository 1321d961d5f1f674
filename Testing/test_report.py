"""Per-lesion measurements with known answers (volume, RECIST diameters on oblique and sagittally
stored grids, distance to the surface, burden), the DBT clock face and nipple, and the files a run writes."""
from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import LIVER_TUMOR_SEGMENTS
from TransferSegLib import report
from TransferSegLib.heatmaps import Detection
from TransferSegLib.models import read_card
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.pipeline import Result
from TransferSegLib.volume import Volume

CARD = read_card("ct-liver-tumor-unet3d")
OBLIQUE = Rotation.from_euler("xyz", [12.0, -21.0, 33.0], degrees=True).as_matrix()  # RAS columns i, j, k
SAGITTAL = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]) @ np.diag([1.0, -1.0, 1.0])  # k → L


def _grid(shape, spacing, directions, origin=(5.0, -3.0, 10.0)) -> tuple:
    """A Volume of uniform 60 HU and every voxel centre's RAS offset from the volume's centre voxel."""
    volume = Volume(np.full(shape, 60.0, np.float32), spacing, directions, origin)
    kji = np.indices(shape).reshape(3, -1).T
    centre = volume.ijk_to_ras_points([[(n - 1) / 2 for n in shape]])[0]
    return volume, (volume.ijk_to_ras_points(kji) - centre).reshape(*shape, 3), centre


def _ellipsoid(offsets, semi_axes, angle_deg: float) -> np.ndarray:
    """Inside an ellipsoid with semi-axes (long, short, height) mm: long and short in the axial plane (the
    long one ``angle_deg`` from R towards A), height along S."""
    t = math.radians(angle_deg)
    u, v = np.array([math.cos(t), math.sin(t), 0.0]), np.array([-math.sin(t), math.cos(t), 0.0])
    a, b, c = semi_axes
    return (offsets @ u / a) ** 2 + (offsets @ v / b) ** 2 + (offsets[..., 2] / c) ** 2 <= 1.0


def _surface_points(semi_axes, angle_deg: float = 30.0) -> np.ndarray:
    """Points on the surface of :func:`_ellipsoid`'s ellipsoid (centred on 0), finely spaced."""
    polar, azimuth = np.meshgrid(np.linspace(0, np.pi, 181), np.linspace(0, 2 * np.pi, 361), indexing="ij")
    t = math.radians(angle_deg)
    a, b, c = semi_axes
    x, y = a * np.sin(polar) * np.cos(azimuth), b * np.sin(polar) * np.sin(azimuth)
    return np.stack([x * math.cos(t) - y * math.sin(t), x * math.sin(t) + y * math.cos(t), c * np.cos(polar)],
                    axis=-1).reshape(-1, 3)


@pytest.mark.parametrize("directions, spacing", [(OBLIQUE, (1.7, 0.9, 1.1)), (SAGITTAL, (1.2, 0.8, 0.8)),
                                                 (np.diag([-1.0, -1.0, 1.0]), (2.5, 0.7, 0.7))],
                         ids=["oblique", "sagittally-stored", "axial-LPS"])
def test_a_sphere_and_an_ellipsoid_have_their_volume_and_diameters_within_a_voxel(directions, spacing):
    shape = tuple(int(70 / s) for s in spacing)
    volume, offsets, centre = _grid(shape, spacing, directions)
    radius, semi_axes = 9.0, (15.0, 8.0, 6.0)
    liver = np.linalg.norm(offsets, axis=-1) <= 34.5
    sphere = np.linalg.norm(offsets - [-16.0, 12.0, 0.0], axis=-1) <= radius
    ellipsoid = _ellipsoid(offsets - [10.0, -6.0, 3.0], semi_axes, angle_deg=30.0)
    assert not np.any(sphere & ellipsoid)
    labels = np.where(liver, 1, 0).astype(np.uint8)
    labels[sphere | ellipsoid] = 2
    result = report.measure_lesions(labels, volume, CARD)
    voxel = max(spacing)
    assert len(result["rows"]) == 2
    truth = {"sphere": (4 / 3 * math.pi * radius ** 3, 2 * radius, 2 * radius, [-16.0, 12.0, 0.0]),
             "ellipsoid": (4 / 3 * math.pi * np.prod(semi_axes), 2 * semi_axes[0], 2 * semi_axes[1], [10.0, -6.0, 3.0])}
    for name, (volume_mm3, longest, perpendicular, where) in truth.items():
        row = min(result["rows"], key=lambda r: abs(r["volume_ml"] - volume_mm3 / 1000))
        assert row["volume_ml"] == pytest.approx(volume_mm3 / 1000, rel=0.03), name
        assert abs(row["longest_axial_mm"] - longest) <= voxel, (name, row)
        assert abs(row["perpendicular_mm"] - perpendicular) <= voxel, (name, row)
        assert abs(row["axial_slice_s_mm"] - (centre[2] + where[2])) <= voxel, (name, row)
        np.testing.assert_allclose([row["centre_r_mm"], row["centre_a_mm"], row["centre_s_mm"]], centre + where,
                                   atol=0.5 * voxel)
        assert row["mean_hu"] == 60.0 and row["sd_hu"] == 0.0
        farthest = np.linalg.norm(where + _surface_points(semi_axes if name == "ellipsoid" else (radius,) * 3), axis=1)
        assert row["surface_distance_mm"] == pytest.approx(34.5 - farthest.max(), abs=voxel), name
    assert [r["lesion"] for r in result["rows"]] == [1, 2]  # largest first, numbered from 1
    assert result["rows"][0]["voxels"] > result["rows"][1]["voxels"]


def test_diameters_turn_with_the_lesion_not_with_the_grid():
    """The same ellipsoid at several angles in the axial plane, on one oblique grid: the same two diameters."""
    volume, offsets, _ = _grid((36, 40, 40), (1.5, 1.0, 1.0), OBLIQUE)
    measured = [report.axial_diameters(_ellipsoid(offsets, (12.0, 5.0, 5.0), angle), volume)[:2]
                for angle in (0.0, 25.0, 45.0, 70.0, 120.0)]
    for longest, perpendicular in measured:
        assert abs(longest - 24.0) <= 1.5 and abs(perpendicular - 10.0) <= 1.5


def _box_liver(shape=(12, 30, 30)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[1:-1, 3:-3, 3:-3] = 1  # liver from j, i = 3 to 26
    return labels


def test_a_tumor_touching_the_surface_is_at_distance_zero_and_one_inside_at_its_depth():
    spacing = (3.0, 0.8, 0.8)
    volume = Volume(np.zeros((12, 30, 30), np.float32), spacing)
    labels = _box_liver()
    labels[4:7, 3:6, 10:13] = 2   # touches the liver's edge at j = 3 (outside at j = 2)
    labels[4:7, 10:13, 18:21] = 2  # liver at j = 3..9 before it (7 voxels of 0.8 mm), i = 21..26 after (6 voxels)
    labels[9:11, 20:22, 5:7] = 2   # in the liver's last slice (k = 10; outside at k = 11)
    rows = sorted(report.measure_lesions(labels, volume, CARD)["rows"], key=lambda r: r["j0"])
    assert [r["surface_distance_mm"] for r in rows] == [0.0, pytest.approx(6 * 0.8, abs=0.05), 0.0]


def test_no_outside_voxel_gives_no_surface_distance_and_a_card_without_an_organ_gives_no_burden():
    volume = Volume(np.zeros((6, 10, 10), np.float32), (2.0, 1.0, 1.0))
    labels = np.ones((6, 10, 10), np.uint8)  # the liver fills the volume
    labels[2:4, 4:6, 4:6] = 2
    result = report.measure_lesions(labels, volume, CARD)
    assert result["rows"][0]["surface_distance_mm"] is None
    tumor_only = {"labels": [{"name": "tumor", "label": 2}]}
    summary = report.measure_lesions(labels, volume, tumor_only)["summary"]
    assert summary["organ"] is None and summary["burden_percent"] is None and summary["lesions"] == 1


def test_burden_is_the_tumor_volume_over_the_whole_liver():
    volume = Volume(np.zeros((10, 10, 20), np.float32), (2.0, 1.0, 0.5))  # 1 mm³ voxels
    labels = np.zeros((10, 10, 20), np.uint8)
    labels.reshape(-1)[:1250] = 1
    labels.reshape(-1)[:250] = 2  # 250 of the whole liver's 1,250 voxels
    summary = report.measure_lesions(labels, volume, CARD)["summary"]
    assert summary == {"organ": "liver", "organ_volume_ml": 1.25, "lesion_volume_ml": 0.25, "burden_percent": 20.0,
                       "lesions": 1, "lesion_labels": ["liver tumor"]}
    assert report.burden_percent(0.25, 0.0) is None and report.burden_percent(1.0, 3.0) == 33.33


def test_lesion_labels_are_read_from_the_card_not_hard_coded():
    assert [(a["name"], b["name"]) for a, b in report.lesion_segments(CARD)] == [("liver tumor", "liver")]
    # the test card names its tumor but gives it no terminology: found by name
    assert [(a["label"], b["label"]) for a, b in report.lesion_segments({"labels": LIVER_TUMOR_SEGMENTS})] == [(2, 1)]
    renumbered = json.loads(json.dumps(CARD))
    renumbered["labels"][0]["label"], renumbered["labels"][1]["label"] = 5, 3  # liver 5, tumor 3
    renumbered["labels"][1]["name"] = "hepatic mass"  # found by its SNOMED category and region, not its name
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[1:5, 2:10, 2:10] = 5
    labels[2:4, 4:6, 4:6] = 3
    labels[0, 0, 0] = 2  # label 2 means nothing to this card
    result = report.measure_lesions(labels, Volume(np.zeros(labels.shape, np.float32)), renumbered)
    assert [r["voxels"] for r in result["rows"]] == [8] and result["rows"][0]["label"] == "hepatic mass"
    assert result["summary"]["organ"] == "liver"
    assert result["summary"]["organ_volume_ml"] == pytest.approx(0.256, abs=0.005)


@pytest.mark.parametrize("laterality, right_mm, superior_mm, expected", [
    ("R", 30.0, 0.0, "9:00"),     # lateral in the right breast
    ("R", -30.0, 0.0, "3:00"),    # medial
    ("R", 20.0, 20.0, "10:30"),   # upper outer quadrant
    ("R", -20.0, -20.0, "4:30"),  # lower inner
    ("L", -30.0, 0.0, "3:00"),    # lateral in the left breast
    ("L", -20.0, 20.0, "1:30"),   # upper outer quadrant
    ("L", 20.0, -20.0, "7:30"),   # lower inner
    ("L", 0.0, 25.0, "12:00"),
    ("L", 0.0, -25.0, "6:00"),
])
def test_the_clock_face_of_a_cc_view_as_radiologists_read_it(laterality, right_mm, superior_mm, expected):
    nipple = np.array([10.0, 80.0, -20.0])
    position = nipple + [right_mm, -35.0, superior_mm]  # 35 mm behind the nipple
    assert report.clock_face(position, nipple, laterality, "CC") == expected


def test_no_clock_face_without_a_side_a_cc_view_or_off_the_nipple_axis():
    nipple, position = np.zeros(3), np.array([20.0, -30.0, 20.0])
    assert report.clock_face(position, nipple, "R", "MLO") is None
    assert report.clock_face(position, nipple, None, "CC") is None
    assert report.clock_face(position, nipple, "B", "CC") is None
    assert report.clock_face(np.array([2.0, -30.0, 3.0]), nipple, "R", "CC") is None  # right behind the nipple


def _phantom_detections(volume, lesions) -> list:
    found = []
    for n, lesion in enumerate(lesions):
        centre = [int(round(v)) for v in lesion["center_kji"]]
        found.append(Detection(centre, volume.ijk_to_ras_points([centre])[0].round(3).tolist(), 0.9 - 0.1 * n,
                               lesion["box_kji"], lesion["kind"]))
    return found


def test_dbt_detections_get_their_size_nipple_distance_and_clock_face():
    volume, lesions = dbt_phantom(seed=1, shape=(16, 96, 72))
    volume.meta.update(laterality="L", view="CC")
    detections = _phantom_detections(volume, lesions)
    result = report.describe_detections(detections, volume)
    # the nipple is the breast's most anterior point: the phantom's i runs towards it
    breast = np.argwhere(volume.array > 0.3)  # tissue; the air's blur and noise stay below 0.15
    front = volume.ijk_to_ras_points(breast[breast[:, 2] == breast[:, 2].max()]).mean(axis=0)
    nipple = np.array(result["summary"]["nipple_ras_mm"])
    assert abs(nipple[1] - front[1]) <= 2 * max(volume.spacing) and np.linalg.norm(nipple - front) < 10.0
    assert len(result["rows"]) == len(lesions) > 0
    for row, lesion, detection in zip(result["rows"], lesions, detections):
        k0, j0, i0, k1, j1, i1 = lesion["box_kji"]
        assert row["kind"] == lesion["kind"] and row["laterality"] == "L"
        assert row["size_mm"] == round(max((j1 - j0) * volume.spacing[1], (i1 - i0) * volume.spacing[2]), 1)
        assert row["depth_mm"] == round((k1 - k0) * volume.spacing[0], 1)
        position = np.array(detection.position_ras)
        assert row["nipple_distance_mm"] == pytest.approx(np.linalg.norm(position - nipple), abs=0.15)
        assert row["clock_face"] == report.clock_face(position, nipple, "L", "CC")
    volume.meta.clear()
    plain = report.describe_detections(detections, volume)  # no side, and a model that does not say breast
    assert plain["summary"]["nipple_ras_mm"] is None and {r["clock_face"] for r in plain["rows"]} == {None}
    assert "not given" in plain["summary"]["clock_face"]
    shipped = report.describe_detections(detections, volume, read_card("dbt-lesion-ahnet"))  # a breast model
    assert shipped["summary"]["nipple_ras_mm"] is not None and {r["clock_face"] for r in shipped["rows"]} == {None}


def test_csv_json_and_page_agree_and_the_page_needs_nothing_outside_itself(tmp_path):
    volume, labels = ct_phantom(seed=3)
    card = json.loads(json.dumps(CARD))
    card["name"] = "a <b>model</b> & co"
    result = Result(volume=volume, labels=labels, card=card, device="cpu", timings={},
                    warnings=["check <this>"])
    names = [p.name for p in report.write_report_files(result, tmp_path)]
    assert names == ["lesions.csv", "report.html"]
    lesions = result.lesions()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "lesions.csv").read_text(encoding="utf-8"))))
    assert len(rows) == len(lesions["rows"]) >= 1
    for written, row in zip(rows, lesions["rows"]):
        assert list(written) == report.SEGMENTATION_COLUMNS
        for column, value in row.items():
            if value is None or isinstance(value, str):
                assert written[column] == (value or ""), column
            else:  # the same number, written with a fixed number of decimals
                assert float(written[column]) == value and len(written[column].partition(".")[2]) == (
                    0 if isinstance(value, int) else 3 if column.endswith("_ml") else 1), column
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "a &lt;b&gt;model&lt;/b&gt; &amp; co" in page and "<b>model" not in page and "check &lt;this&gt;" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(?i)<script|<link|<iframe|@import|url\(|https?:|//[a-z]|src=\"[^\"]", text)
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(lesions["rows"]) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert page.count("<tr data-lesion=") == len(lesions["rows"])


def test_a_run_lists_and_writes_the_report_and_puts_the_lesions_in_result_json(tmp_path):
    volume, labels = ct_phantom(seed=3, shape=(20, 64, 64))
    result = Result(volume=volume, labels=labels, card=CARD, device="cpu", timings={})
    assert result.outputs()[-3:] == ["lesions.csv", "report.html", "result.json"]
    result.write(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert summary["files"] == result.outputs()
    assert summary["lesions"] == json.loads(json.dumps(result.lesions()))
    with open(tmp_path / "out" / "lesions.csv", encoding="utf-8", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(summary["lesions"]["rows"]) == summary["lesions"]["summary"]["lesions"]
    heatmap = Result(volume=volume, labels=np.zeros(volume.shape, np.uint8),
                     card={**CARD, "task": "heatmap", "labels": [{"name": "lesion", "label": 1}]}, device="cpu",
                     timings={}, heatmap=np.zeros(volume.shape, np.float32),
                     detections=[Detection([10, 32, 32], None, 0.5, [8, 28, 28, 12, 36, 36])])
    assert heatmap.lesions()["rows"][0]["size_mm"] == round(8 * volume.spacing[2], 1)
