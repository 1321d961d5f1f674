"""The findings table is the run's report, on slicer-core's real MRML scene (no mocks): a CT run through
the module's job and a DBT run through the real child process, each table read cell by cell against the
``lesions.csv`` the child wrote (and its rows against report.html's numbers), the organ row from the label
map, a lesion row jumping the slice views to the report's centre, and the table of a result written before
runs had reports.
"""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "TransferSeg"))
from TransferSegModuleLib import logic as L  # noqa: E402
from TransferSegModuleLib import results  # noqa: E402
from TransferSegModuleLib.jobs import ResultImport  # noqa: E402
from TransferSegModuleLib.logic import TransferSegLogic  # noqa: E402

from TransferSegLib.io import save_volume  # noqa: E402
from TransferSegLib.models import read_card  # noqa: E402
from TransferSegLib.phantoms import ct_phantom, dbt_phantom  # noqa: E402
from TransferSegLib.report import describe_detections, lesions_csv  # noqa: E402
from TransferSegLib.volume import Volume  # noqa: E402

from test_slicer_logic import CT_MODEL, DBT_MODEL, add_input, cli, new_scene, oblique, run_job  # noqa: E402

# the table's columns (as a radiologist reads them) → lesions.csv's; None: no lesions.csv column
CT_COLUMNS = {"Finding": None, "Segment": "label", "Volume (mL)": "volume_ml", "Longest axial (mm)": "longest_axial_mm",
              "Perpendicular (mm)": "perpendicular_mm", "R": "centre_r_mm", "A": "centre_a_mm", "S": "centre_s_mm",
              "Mean (HU)": "mean_hu", "SD (HU)": "sd_hu", "To surface (mm)": "surface_distance_mm",
              "Measured at S (mm)": "axial_slice_s_mm"}
DBT_COLUMNS = {"Finding": None, "Kind": "kind", "Confidence": "confidence", "Size (mm)": "size_mm",
               "Depth (mm)": "depth_mm", "R": "position_r_mm", "A": "position_a_mm", "S": "position_s_mm",
               "Side": "laterality", "Clock": "clock_face", "To nipple (mm)": "nipple_distance_mm"}
TEXT = {"Finding", "Segment", "Kind", "Side", "Clock"}


def scene_with_slice_views():
    scene = new_scene()
    for name in ("Red", "Yellow", "Green"):  # the slice views' nodes, as the desktop's layout has them
        node = slicer.vtkMRMLSliceNode()
        node.SetLayoutName(name)
        scene.AddNode(node)
    return scene


def read_csv(path: Path) -> list:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def column_names(table) -> list:
    return [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]


def cell(table, row: int, name: str):
    """A cell as the table holds it: the text of a text column, or the number of a vtkDoubleArray."""
    column = table.GetTable().GetColumnByName(name)
    if name in TEXT or column.IsA("vtkStringArray"):
        return table.GetCellText(row, table.GetColumnIndex(name))
    return float(column.GetValue(row))


def assert_lesion_rows_equal_the_csv(table, first: int, lines: list, columns: dict, name_of) -> None:
    """Rows ``first``… of the table are lesions.csv's lines in order: every text equal, every number equal
    to the CSV's (written to its decimals: the table's number is that decimal); a column with an empty cell
    anywhere holds the CSV's text (Slicer's table view would show NaN)."""
    assert table.GetNumberOfRows() == first + len(lines)
    for n, line in enumerate(lines):
        row = first + n
        assert cell(table, row, "Finding") == f"{name_of(line)} {line['lesion']}"  # report.html's number
        for title, key in columns.items():
            if key is None:
                continue
            value, text = cell(table, row, title), line[key]
            if isinstance(value, str):
                assert value == (text.replace("_", " ") if key == "kind" else text), (row, title)
            else:
                assert text != "" and value == float(text), (row, title, text)  # the CSV's decimal, exactly


def html_rows(path: Path) -> dict:
    """{lesion number: {column: text}} of report.html's lesion table."""
    page = path.read_text(encoding="utf-8")
    rows = {}
    for number, cells in re.findall(r'<tr data-lesion="(\d+)">(.*?)</tr>', page):
        rows[int(number)] = {c: re.sub(r"<[^>]+>", "", v) for c, v in re.findall(
            r'<td data-column="(\w+)"[^>]*>(.*?)</td>', cells)}
    return rows


# --- CT: the module's job, and the child's files on the same input ----------------------------------
@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    scene = scene_with_slice_views()
    volume = oblique(ct_phantom(5, shape=(24, 80, 80))[0], spacing=(4.0, 4.4, 3.8))
    node, _ = add_input(scene, volume, "CT")
    job = run_job(TransferSegLogic(scene), node, CT_MODEL)
    folder = tmp_path_factory.mktemp("ct-report")
    result = cli("segment", save_volume(L.volume_from_node(node), folder / "ct.nrrd"), folder / "out", CT_MODEL)
    yield scene, node, job, folder / "out", result
    scene.Clear(1)


def test_the_ct_findings_table_is_the_liver_then_lesions_csv_cell_by_cell(ct):
    scene, node, job, out, result = ct
    table = job.outputs.findings
    lines = read_csv(out / "lesions.csv")
    assert len(lines) >= 2, "the model found fewer than two tumors: the rows below would prove little"
    assert column_names(table) == list(CT_COLUMNS)
    assert [table.GetColumnUnitLabel(name) for name in CT_COLUMNS] == [
        "", "", "mL", "mm", "mm", "mm", "mm", "mm", "HU", "HU", "mm", "mm"]
    assert table.GetUseColumnTitleAsColumnHeader() and table.GetLocked()
    assert_lesion_rows_equal_the_csv(table, 1, lines, CT_COLUMNS, lambda line: line["label"])
    # the organ row, from the label map the child wrote: the liver label's volume and centre; no lesion cells
    liver = np.argwhere(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelmap.nii.gz"))) == 1)
    grid = L.volume_from_node(node)
    assert cell(table, 0, "Finding") == "liver" and cell(table, 0, "Segment") == "liver"
    assert cell(table, 0, "Volume (mL)") == round(len(liver) * float(np.prod(grid.spacing)) / 1000.0, 3)
    assert cell(table, 0, "Volume (mL)") == pytest.approx(result["volumes_ml"]["liver"], abs=1e-3)
    centre = grid.ijk_to_ras_points(liver.mean(axis=0)[None])[0]
    assert [cell(table, 0, axis) for axis in "RAS"] == pytest.approx(centre, abs=0.051)
    for title in list(CT_COLUMNS)[3:]:
        if title not in ("R", "A", "S"):
            assert cell(table, 0, title) == "", title  # shown empty, not NaN
    # the numbers are report.html's: the same lesion, the same measurements
    page = html_rows(out / "report.html")
    assert sorted(page) == [int(line["lesion"]) for line in lines]
    for n, line in enumerate(lines, 1):
        assert page[int(line["lesion"])]["volume_ml"] == line["volume_ml"]
        assert table.GetCellText(n, 0) == f"liver tumor {line['lesion']}"


def test_a_lesion_row_jumps_the_slice_views_to_the_reports_centre(ct):
    scene, node, job, out, result = ct
    logic = TransferSegLogic(scene)
    table = job.outputs.findings
    for line_number, line in enumerate(read_csv(out / "lesions.csv")[:2], start=1):
        centre = [float(line[key]) for key in ("centre_r_mm", "centre_a_mm", "centre_s_mm")]
        assert logic.jumpToRow(table, line_number) == centre  # the table's row 0 is the liver
        for n in range(3):
            m = scene.GetNthNodeByClass(n, "vtkMRMLSliceNode").GetSliceToRAS()
            assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(centre, abs=1e-6)


def test_a_result_without_a_report_gets_the_table_of_the_label_map(ct):
    """A result.json written before runs had reports (no "lesions"): the liver and each tumor component,
    measured from the label map, with volume and centre."""
    _, _, _, out, result = ct
    scene = scene_with_slice_views()
    node, _ = add_input(scene, L.volume_from_node(ct[1]), "CT")  # the same CT, in a scene of its own
    older = {k: v for k, v in result.items() if k != "lesions"}
    importer = ResultImport(TransferSegLogic(scene), node, out, older, read_card(CT_MODEL))
    while not importer.step():
        importer.wait()
    table = importer.outputs.findings
    lines = read_csv(out / "lesions.csv")
    assert column_names(table) == list(results.SEGMENT_COLUMNS)
    assert [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())] == ["liver"] + [
        f"liver tumor {n}" for n in range(1, len(lines) + 1)]
    volumes = sorted(float(table.GetCellText(r, 2)) for r in range(1, table.GetNumberOfRows()))
    assert volumes == pytest.approx(sorted(float(line["volume_ml"]) for line in lines), abs=1e-3)
    assert TransferSegLogic(scene).jumpToRow(table, 1) == pytest.approx(
        [float(lines[0][key]) for key in ("centre_r_mm", "centre_a_mm", "centre_s_mm")], abs=0.051)
    scene.Clear(1)


# --- DBT: the child's detections, imported as the module imports them ----------------------------------
def test_the_dbt_findings_table_is_lesions_csv_cell_by_cell(tmp_path):
    scene = scene_with_slice_views()
    volume = dbt_phantom(3, shape=(16, 128, 96), masses=2)[0]
    node, _ = add_input(scene, Volume(volume.array, volume.spacing, volume.directions, volume.origin), "DBT")
    result = cli("detect", save_volume(L.volume_from_node(node), tmp_path / "dbt.nrrd"), tmp_path / "out", DBT_MODEL)
    importer = ResultImport(TransferSegLogic(scene), node, tmp_path / "out", result, read_card(DBT_MODEL))
    while not importer.step():
        importer.wait()
    table = importer.outputs.findings
    lines = read_csv(tmp_path / "out" / "lesions.csv")
    assert lines, "the detector found nothing: the rows below would be empty"
    assert table.GetName() == "DBT detections table" and column_names(table) == list(DBT_COLUMNS)
    assert table.GetAttribute("TransferSeg.Findings") == "detections"
    assert_lesion_rows_equal_the_csv(table, 0, lines, DBT_COLUMNS, lambda line: line["kind"].replace("_", " "))
    top = [float(lines[0][key]) for key in ("position_r_mm", "position_a_mm", "position_s_mm")]
    assert TransferSegLogic(scene).jumpToRow(table, 0) == top
    # the markups and the table count the same detections
    assert importer.outputs.detections.GetNumberOfControlPoints() == table.GetNumberOfRows()
    scene.Clear(1)


def test_a_cc_view_of_a_known_side_fills_the_side_and_clock_columns():
    """Side and clock face (text) and the nipple distance, as a DICOM DBT of a left CC view gives them."""
    volume = dbt_phantom(3, shape=(16, 128, 96), masses=2)[0]
    volume.meta.update(laterality="L", view="CC")
    detections = [{"box_kji": [2, 10, 10, 8, 40, 30], "position_kji": [5, 20, 20], "confidence": 0.812,
                   "kind": "calcification_cluster"},
                  {"box_kji": [3, 60, 50, 9, 90, 80], "position_kji": [6, 70, 60], "confidence": 0.4, "kind": "mass"}]
    report = describe_detections(detections, volume, read_card(DBT_MODEL))
    scene = new_scene()
    table = TransferSegLogic(scene).findingsTable(results.report_rows(report), "table", detections=True,
                                                  report=report)
    lines = list(csv.DictReader(lesions_csv(report).splitlines()))
    assert [line["laterality"] for line in lines] == ["L", "L"] and lines[0]["clock_face"]  # the test can fail
    assert column_names(table) == list(DBT_COLUMNS)
    assert_lesion_rows_equal_the_csv(table, 0, lines, DBT_COLUMNS, lambda line: line["kind"].replace("_", " "))
    assert table.GetCellText(0, 0) == "calcification cluster 1" and table.GetCellText(1, 1) == "mass"
    scene.Clear(1)


def test_the_findings_table_imports_no_plotting_and_no_torch():
    """Slicer's GUI process has no matplotlib (report.py draws with it): the table takes the report's columns
    from lesion_table, which imports neither."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import TransferSegModuleLib.results; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'TransferSegLib.report') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "TransferSeg")], capture_output=True,
                          encoding="utf-8", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
