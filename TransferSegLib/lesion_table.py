"""The lesion table as every reader of a run shows it: ``lesions.csv``, ``report.html`` and the Slicer
module's findings table.  The columns of a report (:mod:`~TransferSegLib.report` measures them), the
heading and unit of each column a table shows, which columns those are for a report, and a cell's text.

Plain Python (no numpy, no matplotlib): Slicer's GUI process imports it to fill its table node.
"""
from __future__ import annotations

import math

__all__ = ["DETECTION_COLUMNS", "HEADINGS", "SEGMENTATION_COLUMNS", "TEXT_COLUMNS", "cell_text", "decimals",
           "shown_columns", "shown_text"]

SEGMENTATION_COLUMNS = ["lesion", "label", "volume_ml", "longest_axial_mm", "perpendicular_mm", "axial_slice_s_mm",
                        "centre_r_mm", "centre_a_mm", "centre_s_mm", "mean_hu", "sd_hu", "surface_distance_mm",
                        "voxels", "k", "j", "i", "k0", "j0", "i0", "k1", "j1", "i1"]
DETECTION_COLUMNS = ["lesion", "kind", "confidence", "size_mm", "depth_mm", "position_r_mm", "position_a_mm",
                     "position_s_mm", "laterality", "clock_face", "nipple_distance_mm", "k", "j", "i",
                     "k0", "j0", "i0", "k1", "j1", "i1"]

# The table's columns, in the order shown (the rest are in lesions.csv only): heading and unit.
HEADINGS = {
    "lesion": ("#", ""), "label": ("Label", ""), "volume_ml": ("Volume", "mL"),
    "longest_axial_mm": ("Longest axial", "mm"), "perpendicular_mm": ("Perpendicular", "mm"),
    "centre_r_mm": ("Centre R", "mm"), "centre_a_mm": ("A", "mm"), "centre_s_mm": ("S", "mm"),
    "mean_hu": ("Mean", "HU"), "sd_hu": ("SD", "HU"), "surface_distance_mm": ("To surface", "mm"),
    "axial_slice_s_mm": ("Measured at S", "mm"),
    "kind": ("Kind", ""), "confidence": ("Confidence", ""), "size_mm": ("Size", "mm"), "depth_mm": ("Depth", "mm"),
    "position_r_mm": ("Position R", "mm"), "position_a_mm": ("A", "mm"), "position_s_mm": ("S", "mm"),
    "laterality": ("Side", ""), "clock_face": ("Clock", ""), "nipple_distance_mm": ("To nipple", "mm"),
}
TEXT_COLUMNS = ("label", "kind", "laterality", "clock_face")  # the others hold numbers


def shown_columns(report: dict) -> list:
    """The columns a table of ``report`` (:func:`~TransferSegLib.report.measure_lesions` or
    :func:`~TransferSegLib.report.describe_detections`) shows, in :data:`HEADINGS`' order; a segmentation's
    label only when it has more than one lesion label."""
    columns = [c for c in HEADINGS if c in report["columns"]]
    if report["kind"] == "segmentation" and len(report["summary"]["lesion_labels"]) <= 1:
        columns.remove("label")
    return columns


def decimals(column: str) -> int:
    """The decimals a number of ``column`` is written with: 3 for mL and confidences, 1 for mm and HU."""
    return 3 if column.endswith("_ml") or column == "confidence" else 1


def cell_text(value, column: str = "") -> str:
    """A cell as lesions.csv writes it: a float with :func:`decimals` (never "-0.0"), empty for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        text = f"{value:.{decimals(column)}f}"
        return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.0"
    return str(value)


def shown_text(value, column: str = "") -> str:
    """A cell as a table shows it: :func:`cell_text`, a detection's kind in words ("calcification cluster")."""
    text = cell_text(value, column)
    return text.replace("_", " ") if column == "kind" else text
