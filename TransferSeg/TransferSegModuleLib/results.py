"""What a run found, in view: a findings table (each tumor component, or each detection), jumping the
slice views to a row, the segmentation in 3D, and a run written into an output segmentation the user
picked (its segments replaced, its companion nodes swapped for the new run's)."""
from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from TransferSegLib.volume import Volume

#: a segment whose terminology category is this is a finding (a tumor, a lesion): one table row per component
ALTERED_STRUCTURE = "49755003"  # SCT "Morphologically Altered Structure"
#: columns of the findings table
SEGMENT_COLUMNS = ("Finding", "Segment", "Volume (mL)", "R", "A", "S")
DETECTION_COLUMNS = ("Finding", "Kind", "Confidence", "R", "A", "S")
#: node-reference roles from an output segmentation to the other nodes of its run
COMPANION_ROLES = {"axial": "TransferSeg.view.axial", "coronal": "TransferSeg.view.coronal",
                   "sagittal": "TransferSeg.view.sagittal", "disagreement": "TransferSeg.disagreement",
                   "findings": "TransferSeg.findings"}


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


def segment_rows(segmentation_node, card: dict, reference: Volume) -> list:
    """Findings-table rows of a segmentation on ``reference``'s grid: an organ is one row, a finding (tumor)
    one row per 26-connected component (as the card's largest-component clean-up counts them), largest first.
    Each row: ``{"finding", "segment", "volume_ml", "ras"}`` (the centre of the voxels, in RAS mm).
    Only a finding's own box is labelled; an organ is measured a slab at a time."""
    from scipy import ndimage  # bundled with Slicer; loaded when a run ends, not when Slicer starts (about 0.7 s)

    segmentation = segmentation_node.GetSegmentation()
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    findings = {s["name"]: is_finding(s) for s in card.get("labels", [])}
    rows = []
    for n in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(n).GetName()
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


def detection_rows(detections: list) -> list:
    """Findings-table rows of ``detections.json``'s detections, as ranked there (by confidence)."""
    return [{"finding": f"{d.get('kind') or 'detection'} {n}", "kind": d.get("kind") or "",
             "confidence": float(d["confidence"]), "ras": [float(v) for v in d["position_ras"]]}
            for n, d in enumerate(detections, 1) if d.get("position_ras") is not None]


def fill_findings_table(table, rows: list, detections: bool) -> None:
    """Replace a table node's columns with ``rows`` (:func:`segment_rows` or :func:`detection_rows`)."""
    columns = DETECTION_COLUMNS if detections else SEGMENT_COLUMNS
    data = vtk.vtkTable()
    for title in columns:
        array = vtk.vtkStringArray() if title in ("Finding", "Segment", "Kind") else vtk.vtkDoubleArray()
        array.SetName(title)
        data.AddColumn(array)
    for row in rows:
        values = [row["finding"], row["kind"] if detections else row["segment"],
                  row["confidence"] if detections else row["volume_ml"], *row["ras"]]
        for c, value in enumerate(values):
            array = data.GetColumn(c)
            if isinstance(array, vtk.vtkStringArray):
                array.InsertNextValue(str(value))
            else:
                array.InsertNextValue(round(float(value), 3 if c == 2 else 1))
    modifying = table.StartModify()
    table.SetAndObserveTable(data)
    table.SetUseColumnTitleAsColumnHeader(True)  # the titles are the header, not a first row
    if not detections:
        table.SetColumnUnitLabel("Volume (mL)", "mL")
    for axis in "RAS":
        table.SetColumnUnitLabel(axis, "mm")
    table.SetAttribute("TransferSeg.Findings", "detections" if detections else "segments")
    table.SetLocked(True)  # a record of the run: not edited in the table views
    table.EndModify(modifying)


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


def companions(segmentation_node) -> dict:
    """``{key: node}`` of the nodes a run linked to its output segmentation (:data:`COMPANION_ROLES`)."""
    found = {}
    for key, role in COMPANION_ROLES.items():
        node = segmentation_node.GetNodeReference(role)
        if node is not None and node.GetScene() is not None:
            found[key] = node
    return found


def link_companions(segmentation_node, nodes: dict) -> list:
    """Reference ``nodes`` (key → node or None) from the output segmentation; returns the nodes an earlier
    run had linked that these replace (the caller removes them)."""
    replaced = []
    for key, role in COMPANION_ROLES.items():
        old, new = segmentation_node.GetNodeReference(role), nodes.get(key)
        if old is not None and old is not new and old.GetScene() is not None:
            replaced.append(old)
        segmentation_node.SetNodeReferenceID(role, new.GetID() if new is not None else None)
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
