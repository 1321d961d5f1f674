"""What a run found, in view: a findings table (the organs, then each lesion of the run's report with the
report's measurements, or each detection), jumping the slice views to a row, the segmentation in 3D, and a
run written into an output node the user picked (an output segmentation's segments, or a detection run's
output point list's points, replaced; its companion nodes swapped for the new run's)."""
from __future__ import annotations

from typing import Collection, Optional

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from TransferSegLib.lesion_table import HEADINGS, TEXT_COLUMNS, decimals, shown_columns, shown_text
from TransferSegLib.volume import Volume

#: a segment whose terminology category is this is a finding (a tumor, a lesion): one table row per component
ALTERED_STRUCTURE = "49755003"  # SCT "Morphologically Altered Structure"
#: the findings table of a result without a report (result.json before "lesions"): (key, column, unit)
SEGMENT_TABLE = (("finding", "Finding", ""), ("segment", "Segment", ""), ("volume_ml", "Volume (mL)", "mL"),
                 ("r", "R", "mm"), ("a", "A", "mm"), ("s", "S", "mm"))
DETECTION_TABLE = (("finding", "Finding", ""), ("kind", "Kind", ""), ("confidence", "Confidence", ""),
                   ("r", "R", "mm"), ("a", "A", "mm"), ("s", "S", "mm"))
#: columns of the findings table without a report
SEGMENT_COLUMNS = tuple(title for _, title, _ in SEGMENT_TABLE)
DETECTION_COLUMNS = tuple(title for _, title, _ in DETECTION_TABLE)
#: a report's centre columns are named R, A, S in the table, as without a report: :func:`row_position` reads them
CENTRE_COLUMNS = {"centre_r_mm": "R", "centre_a_mm": "A", "centre_s_mm": "S",
                  "position_r_mm": "R", "position_a_mm": "A", "position_s_mm": "S"}
#: node-reference roles from a run's output node (its segmentation, or a detection run's point list) to the
#: other nodes of its run
COMPANION_ROLES = {"axial": "TransferSeg.view.axial", "coronal": "TransferSeg.view.coronal",
                   "sagittal": "TransferSeg.view.sagittal", "disagreement": "TransferSeg.disagreement",
                   "heatmap": "TransferSeg.heatmap", "findings": "TransferSeg.findings"}
#: node-reference role from a detection run's output point list to the volume the run read (a segmentation
#: names it as its reference geometry)
INPUT_ROLE = "TransferSeg.input"


def is_finding(described: dict) -> bool:
    """Whether a model card's label is a finding (listed by connected component) rather than an organ."""
    terminology = described.get("terminology") or {}
    category = terminology.get("category") or []
    if category:
        return len(category) > 1 and str(category[1]) == ALTERED_STRUCTURE
    return any(word in described["name"].lower() for word in ("tumor", "tumour", "lesion"))


#: voxels compared at a time when a segment is measured: the temporaries stay this small
CHUNK_VOXELS = 1 << 23


def segment_labelmap(segmentation, segment_id: str):
    """``(voxels, label value, origin kji)``: a view of the labelmap that holds a segment (shared with other
    segments, cropped to its extent: no copy) and where it starts on the reference grid; None when empty."""
    segment = segmentation.GetSegment(segment_id)
    labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return None
    e = labelmap.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4]:
        return None
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(e[5] - e[4] + 1, e[3] - e[2] + 1,
                                                                        e[1] - e[0] + 1)
    return voxels, segment.GetLabelValue(), np.array([e[4], e[2], e[0]])


def label_extent(voxels: np.ndarray, label: int):
    """``(count, centre kji, box)`` of the voxels equal to ``label``, compared a slab at a time (no full-size
    mask); None when there are none.  The centre is the mean voxel index; the box a tuple of slices."""
    slab = max(1, CHUNK_VOXELS // max(1, voxels[0].size))
    along = [np.zeros(n, np.int64) for n in voxels.shape]  # how many voxels of the label per k, per j, per i
    for k0 in range(0, voxels.shape[0], slab):
        mask = voxels[k0:k0 + slab] == label
        along[0][k0:k0 + slab] = mask.sum(axis=(1, 2))
        along[1] += mask.sum(axis=(0, 2))
        along[2] += mask.sum(axis=(0, 1))
    count = int(along[0].sum())
    if not count:
        return None
    centre = np.array([np.dot(np.arange(len(a)), a) / count for a in along])
    box = tuple(slice(int(np.flatnonzero(a)[0]), int(np.flatnonzero(a)[-1]) + 1) for a in along)
    return count, centre, box


def segment_rows(segmentation_node, card: dict, reference: Volume, skip: Collection[str] = ()) -> list:
    """Findings-table rows of a segmentation on ``reference``'s grid: an organ is one row, a finding (tumor)
    one row per 26-connected component (as the card's largest-component clean-up counts them), largest first.
    Each row: ``{"finding", "segment", "volume_ml", "ras"}`` (the centre of the voxels, in RAS mm).
    Segments named in ``skip`` (those the run's report lists lesion by lesion) are left out.
    Only a finding's own box is labelled; an organ is measured a slab at a time."""
    from scipy import ndimage  # bundled with Slicer; loaded when a run ends, not when Slicer starts (about 0.7 s)

    segmentation = segmentation_node.GetSegmentation()
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    findings = {s["name"]: is_finding(s) for s in card.get("labels", [])}
    rows = []
    for n in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(n).GetName()
        if name in skip:
            continue
        held = segment_labelmap(segmentation, segmentation.GetNthSegmentID(n))
        extent = label_extent(held[0], held[1]) if held is not None else None
        if extent is None:
            continue
        (voxels, label, origin), (count, centre, box) = held, extent
        if not findings.get(name):
            ras = reference.ijk_to_ras_points(centre + origin)[0]
            rows.append({"finding": name, "segment": name, "volume_ml": count * voxel_ml,
                         "ras": [float(v) for v in ras]})
            continue
        mask = voxels[box] == label
        components, number = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        index = np.arange(1, number + 1)
        sizes = np.bincount(components.ravel(), minlength=number + 1)[1:]
        centres = np.asarray(ndimage.center_of_mass(mask, components, index), dtype=np.float64).reshape(-1, 3)
        ras = reference.ijk_to_ras_points(centres + origin + [s.start for s in box])
        for rank, c in enumerate(np.argsort(-sizes, kind="stable"), 1):
            rows.append({"finding": f"{name} {rank}", "segment": name, "volume_ml": float(sizes[c]) * voxel_ml,
                         "ras": [float(v) for v in ras[c]]})
    return rows


#: a detection's kind as its markups point's label shows it (a plain heatmap's "lesion": the confidence alone)
POINT_KINDS = {"mass": "mass", "calcification_cluster": "calc"}


def point_label(detection: dict) -> str:
    """The label of a detection's markups point: its confidence, after its kind for a model of several kinds."""
    kind = POINT_KINDS.get(detection.get("kind") or "lesion")
    confidence = f"{float(detection['confidence']):.2f}"
    return f"{kind} {confidence}" if kind else confidence


def detection_rows(detections: list) -> list:
    """Findings-table rows of ``detections.json``'s detections, as ranked there (by confidence)."""
    return [{"finding": f"{d.get('kind') or 'detection'} {n}", "kind": d.get("kind") or "",
             "confidence": float(d["confidence"]), "ras": [float(v) for v in d["position_ras"]]}
            for n, d in enumerate(detections, 1) if d.get("position_ras") is not None]


# --- a run's report as the findings table ----------------------------------------------------------
def run_report(result: dict, kind: str) -> Optional[dict]:
    """``result.json``'s lesion report (``"lesions"``) when it is one of ``kind`` ("segmentation" or
    "detections"); None for a result written before runs had reports."""
    report = (result or {}).get("lesions")
    if not isinstance(report, dict) or report.get("kind") != kind or not {"columns", "rows"} <= report.keys():
        return None
    return report


def report_columns(report: dict) -> list:
    """``[(key, column, unit)]`` of the findings table of a run's report: the finding's name (its segment or
    kind and its number in the report, e.g. "liver tumor 3" for report.html's # 3), a segmentation's segment,
    then the columns report.html shows (:func:`~TransferSegLib.lesion_table.shown_columns`) under its headings,
    the unit in brackets; the centre's columns are R, A, S (mm), as in every findings table."""
    columns = [("finding", "Finding", "")]
    if report["kind"] == "segmentation":
        columns.append(("label", "Segment", ""))  # the lesion's label; an organ row's own segment
    for key in shown_columns(report):
        if key in ("lesion", "label"):  # in the finding's name, and in Segment
            continue
        heading, unit = HEADINGS[key]
        columns.append((key, CENTRE_COLUMNS.get(key) or (f"{heading} ({unit})" if unit else heading), unit))
    return columns


def report_rows(report: dict, organs=()) -> list:
    """Rows ``{key: value}`` of :func:`report_columns`: ``organs`` (:func:`segment_rows` without the report's
    lesion labels: volume and centre) then one row per lesion of the report, in its order and with its numbers."""
    centre = [key for key in CENTRE_COLUMNS if key in report["columns"]]
    rows = [{"finding": organ["finding"], "label": organ["segment"], "volume_ml": organ["volume_ml"],
             **dict(zip(centre, organ["ras"]))} for organ in organs]
    for lesion in report["rows"]:
        kind = shown_text(lesion.get("kind"), "kind") or "detection"  # in words, as report.html shows it
        what = lesion["label"] if report["kind"] == "segmentation" else kind
        rows.append({**lesion, "finding": f"{what} {lesion['lesion']}"})
    return rows


def fill_findings_table(table, rows: list, detections: bool = False, report: Optional[dict] = None) -> None:
    """Replace a table node's columns with ``rows``: with ``report`` (:func:`run_report`), those of
    :func:`report_rows` under :func:`report_columns`; without, :func:`segment_rows` or :func:`detection_rows`
    under :data:`SEGMENT_COLUMNS` or :data:`DETECTION_COLUMNS`.  Numbers stay numbers, rounded as lesions.csv
    writes them; a column that some row has no value for (an organ's diameters, a clock face the geometry
    does not allow) holds text, empty there, as lesions.csv writes it: Slicer's table view would show NaN."""
    if report is not None:
        columns, detections = report_columns(report), report["kind"] == "detections"
    else:
        columns = DETECTION_TABLE if detections else SEGMENT_TABLE
        rows = [dict(row, **dict(zip("ras", row["ras"]))) for row in rows]
    data = vtk.vtkTable()
    for key, name, _ in columns:
        text = _is_text(key) or any(row.get(key) is None for row in rows)
        array = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        array.SetName(name)
        for row in rows:
            value = row.get(key)
            if text:  # a report's cells as report.html shows them; without one, as before reports
                array.InsertNextValue(shown_text(value, key) if report is not None else str(value))
            else:
                array.InsertNextValue(round(float(value), decimals(key)))
        data.AddColumn(array)
    modifying = table.StartModify()
    table.SetAndObserveTable(data)
    table.SetUseColumnTitleAsColumnHeader(True)  # the titles are the header, not a first row
    for _, name, unit in columns:
        if unit:
            table.SetColumnUnitLabel(name, unit)
    table.SetAttribute("TransferSeg.Findings", "detections" if detections else "segments")
    table.SetLocked(True)  # a record of the run: not edited in the table views
    table.EndModify(modifying)


def _is_text(key: str) -> bool:
    return key in TEXT_COLUMNS or key in ("finding", "segment")


def table_row(table, model_row: int) -> int:
    """The table's row shown at ``model_row`` of a table view (Slicer's qMRMLTableModel::mrmlTableRowIndex:
    without column titles as header, the view's first row holds them)."""
    return model_row if table.GetUseColumnTitleAsColumnHeader() else model_row - 1


def row_position(table, row: int):
    """The RAS position (R, A, S columns) of a findings-table row, None outside the table."""
    data = table.GetTable() if table is not None else None
    if data is None or not 0 <= row < data.GetNumberOfRows():
        return None
    columns = [data.GetColumnByName(axis) for axis in "RAS"]
    if any(column is None for column in columns):
        return None
    return [float(column.GetValue(row)) for column in columns]


def jump_slices(scene, ras) -> None:
    """Centre every slice view on ``ras``, as the Markups module's JumpSlicesToLocation(centered) does."""
    r, a, s = (float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def show_3d(segmentation_node, visible: bool = True) -> bool:
    """Show the segmentation in the 3D views (its closed-surface representation, made if missing) or hide it
    there; returns whether it shows."""
    if segmentation_node is None or segmentation_node.GetScene() is None:
        return False
    if visible and not segmentation_node.CreateClosedSurfaceRepresentation():
        return False
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility3D(bool(visible))
    if visible:
        display.SetVisibility(True)
    return bool(visible)


def shows_in_3d(segmentation_node) -> bool:
    """Whether the segmentation shows in the 3D views (visible, with its closed surface)."""
    if segmentation_node is None or segmentation_node.GetScene() is None or segmentation_node.GetDisplayNode() is None:
        return False
    display = segmentation_node.GetDisplayNode()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    return bool(display.GetVisibility() and display.GetVisibility3D()
                and segmentation_node.GetSegmentation().ContainsRepresentation(surface))


def companions(output_node) -> dict:
    """``{key: node}`` of the nodes a run linked to its output node (:data:`COMPANION_ROLES`)."""
    found = {}
    for key, role in COMPANION_ROLES.items():
        node = output_node.GetNodeReference(role)
        if node is not None and node.GetScene() is not None:
            found[key] = node
    return found


def link_companions(output_node, nodes: dict) -> list:
    """Reference ``nodes`` (key → node or None) from a run's output node (the segmentation, or a detection
    run's point list); returns the nodes an earlier run had linked that these replace (the caller removes them)."""
    replaced = []
    for key, role in COMPANION_ROLES.items():
        old, new = output_node.GetNodeReference(role), nodes.get(key)
        if old is not None and old is not new and old.GetScene() is not None:
            replaced.append(old)
        output_node.SetNodeReferenceID(role, new.GetID() if new is not None else None)
    return replaced


def write_segments_into(target, source, reference_node) -> None:
    """Replace the segments of ``target`` (the user's output segmentation) by those of ``source``, keeping the
    target node (its ID, name and place in the scene).  Slicer's DeepCopy keeps the segment IDs and the
    shared labelmap layers; the caller then removes ``source``."""
    modifying = target.StartModify()
    try:
        target.GetSegmentation().DeepCopy(source.GetSegmentation())
        target.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
    finally:
        target.EndModify(modifying)


def write_points_into(target, source) -> None:
    """Replace the control points of ``target`` (the user's output point list) by those of ``source`` (a
    detection run's points, their labels, descriptions, confidences and lock), keeping the target node (its
    ID, name, place in the scene) and its display node: the colours and glyph sizes the user chose stay.
    The caller then removes ``source``."""
    modifying = target.StartModify()
    try:
        target.CopyContent(source, True)  # Slicer's copy of a node's content: not its name, references or display
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
    finally:
        target.EndModify(modifying)
