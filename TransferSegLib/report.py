"""Per-lesion measurements and the report a run writes: ``lesions.csv``, ``result.json["lesions"]``
and ``report.html``.

Segmentation (:func:`measure_lesions`): which labels are lesions, and of which organ, is read from
the model card (a segment in SNOMED CT's "Morphologically Altered Structure" category, or named
"… tumor" / "… lesion"; its organ is the segment whose type is the lesion's anatomic region, or
whose name is the lesion's without its last word).  Every 26-connected component of a lesion
label is one lesion: its volume, RECIST 1.1's longest axial diameter and the longest diameter
perpendicular to it (:func:`axial_diameters`: on axial planes of the patient, reformatted from
the volume's RAS geometry, so oblique and sagittally stored volumes are measured as a viewer's
axial reformat shows them), its centre (RAS), mean HU and standard deviation, and the distance
from it to the organ's surface; the organ's whole volume (with its lesions) and the burden.

Detections (:func:`describe_detections`, e.g. DBT): kind, confidence, size from the box, and
where the geometry allows the laterality, the clock face (:func:`clock_face`) and the distance
from the nipple (:func:`find_nipple`, the breast's most anterior point).

:func:`report_html` writes one self-contained page (no network: images are ``data:`` URIs, the
style sheet is inline) with the summary, the lesion table and a crop of each lesion in three
views with its outline; :func:`lesions_csv` the same rows as CSV.  :func:`lesion_report` and
:func:`write_report_files` take a :class:`~TransferSegLib.pipeline.Result`.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage
from scipy.spatial import ConvexHull, cKDTree

from .atomic import atomic_output
from .lesion_table import (DETECTION_COLUMNS, HEADINGS, SEGMENTATION_COLUMNS, TEXT_COLUMNS, cell_text,
                           shown_columns, shown_text)
from .render import CT_WINDOW, LABEL_COLORS, anatomical_views, draw_plane, figure_png
from .volume import TransferSegError, Volume, anatomical_axes, describe_shape, label_counts, orientation_name

__all__ = ["SEGMENTATION_COLUMNS", "DETECTION_COLUMNS", "axial_diameters", "clock_face", "describe_detections",
           "find_nipple", "lesion_report", "lesion_segments", "lesions_csv", "measure_lesions", "report_html",
           "write_report_files"]

MORPHOLOGICALLY_ALTERED = "49755003"  # SNOMED CT category of tumors and lesions
BREAST = "76752008"  # SNOMED CT: breast structure
_LESION_WORDS = ("tumor", "tumour", "lesion")
CC_VIEWS = ("CC", "XCCL", "XCCM")  # cranio-caudal views: slices stacked from the detector (inferior) up
RETROAREOLAR_MM = 5.0  # closer than this to the nipple (coronal plane) a lesion is behind it: no clock face
MAX_CROPS = 20  # lesions drawn in report.html (the largest, or the most confident); the table lists all


# --- which labels are lesions -------------------------------------------------------------------
def _code(segment: dict, key: str) -> Optional[str]:
    value = (segment.get("terminology") or {}).get(key) or []
    return str(value[1]) if len(value) > 1 else None


def lesion_segments(card: dict) -> list:
    """``[(lesion segment, its organ's segment or None)]`` for every lesion label of the card's ``labels``."""
    segments = card.get("labels") or []
    pairs = []
    for segment in segments:
        words = str(segment.get("name", "")).lower().split()
        if _code(segment, "category") == MORPHOLOGICALLY_ALTERED or (words and words[-1] in _LESION_WORDS):
            pairs.append((segment, _organ_of(segment, segments)))
    return pairs


def _organ_of(lesion: dict, segments: list) -> Optional[dict]:
    others = [s for s in segments if s is not lesion]
    region = _code(lesion, "anatomicRegion")
    by_code = [s for s in others if region and _code(s, "type") == region]
    stem = " ".join(str(lesion.get("name", "")).lower().split()[:-1])
    by_name = [s for s in others if stem and str(s.get("name", "")).lower() == stem]
    found = by_code or by_name
    return found[0] if found else None


# --- segmentation: one row per connected lesion ---------------------------------------------------
def measure_lesions(labels: np.ndarray, volume: Volume, card: dict) -> dict:
    """Measure every 26-connected component of each lesion label of ``card`` in ``labels`` (on ``volume``'s grid).

    Returns ``{"kind": "segmentation", "summary": {...}, "columns": SEGMENTATION_COLUMNS, "rows": [...]}``,
    the rows largest first, numbered from 1.  The summary gives the organ's whole volume (its own label
    and its lesions'), the lesions' volume and the burden (lesions / whole organ, %).
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise TransferSegError(f"the label map ({describe_shape(labels.shape)}) does not match the volume "
                               f"({describe_shape(volume.shape)}); it must have the same shape")
    pairs = lesion_segments(card)
    organ = next((o for _, o in pairs if o is not None), None)
    lesion_values = [int(s["label"]) for s, _ in pairs]
    organ_values = [int(organ["label"])] + [int(s["label"]) for s, o in pairs if o is organ] if organ else []
    counts = label_counts(labels)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    boxes = ndimage.find_objects(labels) if counts[1:].any() else []
    surface = _Surface(labels, organ_values, volume, boxes) if organ_values and counts[lesion_values].any() else None
    rows = []
    for segment, _ in pairs:
        value = int(segment["label"])
        for where, mask in _components(labels, value, boxes):
            rows.append(_measure(mask, where, volume, segment["name"], voxel_ml, surface))
    rows.sort(key=lambda row: (-row["voxels"], row["k"], row["j"], row["i"]))
    for n, row in enumerate(rows, 1):
        row["lesion"] = n
    organ_ml = float(counts[organ_values].sum()) * voxel_ml if organ_values else None
    lesion_ml = float(counts[lesion_values].sum()) * voxel_ml
    summary = {
        "organ": organ["name"] if organ else None,
        "organ_volume_ml": round(organ_ml, 2) if organ_ml is not None else None,
        "lesion_volume_ml": round(lesion_ml, 2),
        "burden_percent": burden_percent(lesion_ml, organ_ml),
        "lesions": len(rows),
        "lesion_labels": [s["name"] for s, _ in pairs],
    }
    return {"kind": "segmentation", "summary": summary, "columns": list(SEGMENTATION_COLUMNS),
            "rows": [{c: row[c] for c in SEGMENTATION_COLUMNS} for row in rows]}


def burden_percent(lesion_ml: float, organ_ml: Optional[float]) -> Optional[float]:
    """Lesions as a percentage of the whole organ (which holds them), to 0.01 %; None without an organ."""
    if not organ_ml:
        return None
    return round(100.0 * lesion_ml / organ_ml, 2)


def _components(labels: np.ndarray, value: int, boxes: list):
    """``(slices, mask)`` of each 26-connected component of ``value``, the mask on its own bounding box."""
    if value < 1 or value > len(boxes) or boxes[value - 1] is None:
        return
    box = boxes[value - 1]
    found, _ = ndimage.label(labels[box] == value, structure=np.ones((3, 3, 3), bool))
    for index, where in enumerate(ndimage.find_objects(found), start=1):
        if where is None:
            continue
        yield (tuple(slice(b.start + w.start, b.start + w.stop) for b, w in zip(box, where)),
               found[where] == index)


def _measure(mask: np.ndarray, where: tuple, volume: Volume, name: str, voxel_ml: float, surface) -> dict:
    offset = np.array([s.start for s in where])
    kji = np.argwhere(mask) + offset
    ras = volume.ijk_to_ras_points(kji)
    centre = ras.mean(axis=0)
    inside = kji[int(np.argmin(((ras - centre) ** 2).sum(axis=1)))]  # the lesion's voxel nearest its centre
    values = volume.array[where][mask].astype(np.float64)
    longest, perpendicular, slice_s = axial_diameters(mask, volume, offset)
    distance = surface.distance(mask, offset) if surface is not None else None
    return {
        "lesion": 0, "label": name, "volume_ml": round(len(kji) * voxel_ml, 3),
        "longest_axial_mm": round(longest, 1), "perpendicular_mm": round(perpendicular, 1),
        "axial_slice_s_mm": round(slice_s, 1),
        "centre_r_mm": round(float(centre[0]), 1), "centre_a_mm": round(float(centre[1]), 1),
        "centre_s_mm": round(float(centre[2]), 1),
        "mean_hu": round(float(values.mean()), 1), "sd_hu": round(float(values.std()), 1),
        "surface_distance_mm": round(distance, 1) if distance is not None else None,
        "voxels": int(len(kji)), "k": int(inside[0]), "j": int(inside[1]), "i": int(inside[2]),
        **{key: int(v) for key, v in zip(("k0", "j0", "i0"), offset)},
        **{key: int(s.stop) for key, s in zip(("k1", "j1", "i1"), where)},
    }


class _Surface:
    """Distances from lesions to the organ's surface: from the lesion's edge voxels to the organ's
    surface voxels (those that share a face with a voxel outside it), centre to centre.  Both
    centres lie about half a voxel inside their own outlines, so this is the gap between the two
    outlines; a lesion voxel that is itself a surface voxel touches the outside: 0.  The surface
    voxels go into a k-d tree once, in millimetres along the array axes (the directions are
    orthonormal, so these are patient millimetres)."""

    def __init__(self, labels: np.ndarray, organ_values: list, volume: Volume, boxes: list):
        spans = [boxes[v - 1] for v in organ_values if v <= len(boxes) and boxes[v - 1] is not None]
        self.spacing, self.tree = np.asarray(volume.spacing), None
        if not spans:
            return
        box = tuple(slice(max(min(s[a].start for s in spans) - 1, 0), min(max(s[a].stop for s in spans) + 1, n))
                    for a, n in enumerate(labels.shape))
        organ = np.isin(labels[box], organ_values)
        layer = organ & ndimage.binary_dilation(~organ, ndimage.generate_binary_structure(3, 1))
        points = (np.argwhere(layer) + [s.start for s in box]) * self.spacing
        self.tree = cKDTree(points) if len(points) else None

    def distance(self, mask: np.ndarray, offset) -> Optional[float]:
        """The gap (mm) between the lesion and the organ's surface: 0 when they touch; None when the
        organ fills the volume (the volume's edge is no surface)."""
        if self.tree is None:
            return None
        edge = mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1))
        gaps, _ = self.tree.query((np.argwhere(edge) + offset) * self.spacing)
        return float(gaps.min())


# --- RECIST: the axial diameters -------------------------------------------------------------------
def axial_diameters(mask: np.ndarray, volume: Volume, offset=(0, 0, 0)) -> tuple:
    """RECIST 1.1's axial measurements of one lesion: ``(longest_mm, perpendicular_mm, s_mm)``.

    ``mask`` holds the lesion's voxels on a box of ``volume``'s grid that starts at voxel ``offset``
    (k, j, i).  The lesion is resliced on axial planes of the patient (constant S in RAS, whatever
    the volume's orientation): its mask interpolated linearly and cut at 0.5 (the outline halfway
    between inside and outside voxel centres, as marching cubes draws it), on square pixels of half
    the volume's finest spacing; the planes lie on the voxel centres along the array axis closest
    to S, so an axially acquired volume is measured on its own slices.  On each plane the longest
    diameter is the largest distance between two of the lesion's edge pixels, and the perpendicular
    the longest chord at right angles to it; both from pixel edge to edge (centres plus one pixel).
    The plane with the largest longest diameter is taken (``s_mm`` is its S).  A lesion too thin to
    reach 0.5 on any plane (one oblique voxel) is measured where the interpolated mask is above 0.
    (0, 0, nan) for an empty mask.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0, 0.0, float("nan")
    offset = np.asarray(offset, float)
    to_ras = volume.directions[:, ::-1] * np.asarray(volume.spacing)  # columns: one step along k, j, i in RAS
    to_kji = np.linalg.inv(to_ras)
    half = 0.5 * np.abs(to_ras).sum(axis=1)  # a voxel's half extent along R, A, S
    centres = volume.ijk_to_ras_points(np.argwhere(mask) + offset)
    low, high = centres.min(axis=0) - half, centres.max(axis=0) + half
    pixel = max(min(volume.spacing) / 2, float(max(high[:2] - low[:2])) / 400)  # at most 400 × 400 pixels a plane
    s_step = abs(to_ras[2, anatomical_axes(volume.directions)["S"]])
    s0 = volume.origin[2]
    planes = s0 + s_step * np.arange(math.floor((low[2] - s0) / s_step), math.ceil((high[2] - s0) / s_step) + 1)
    r = low[0] + pixel * (np.arange(max(int(math.ceil((high[0] - low[0]) / pixel)), 1)) + 0.5)
    a = low[1] + pixel * (np.arange(max(int(math.ceil((high[1] - low[1]) / pixel)), 1)) + 0.5)
    grid_a, grid_r = np.meshgrid(a, r, indexing="ij")
    flat = np.stack([grid_r.ravel(), grid_a.ravel()], axis=1)
    padded = np.pad(mask.astype(np.float32), 1)
    best = (0.0, 0.0, float("nan"))
    for above in (0.5, 0.0):
        for s in planes:
            ras = np.column_stack([flat, np.full(len(flat), s)])
            kji = (ras - volume.origin) @ to_kji.T - offset + 1.0  # + 1: the padding
            hit = ndimage.map_coordinates(padded, kji.T, order=1, mode="constant", cval=0.0)
            hit = hit >= above if above else hit > 0.0
            if not hit.any():
                continue
            image = hit.reshape(grid_r.shape)
            edge = image & ~ndimage.binary_erosion(image)
            longest, perpendicular = _diameters_in_plane(flat[image.ravel()], flat[edge.ravel()], pixel)
            if longest > best[0]:
                best = (longest, perpendicular, float(s))
        if best[0] > 0:
            break
    return best


def _diameters_in_plane(points: np.ndarray, edge: np.ndarray, pixel: float) -> tuple:
    """``(longest, perpendicular)`` of a set of square pixels (centres ``points``, its edge pixels ``edge``)."""
    if len(edge) < 2:
        return pixel, pixel
    ends = edge if len(edge) <= 64 else edge[ConvexHull(edge, qhull_options="QJ").vertices]
    gaps = np.linalg.norm(ends[:, None, :] - ends[None, :, :], axis=2)
    first, second = np.unravel_index(int(np.argmax(gaps)), gaps.shape)
    longest = float(gaps[first, second])
    along = (ends[second] - ends[first]) / longest
    across = np.array([-along[1], along[0]])
    bins = np.rint(points @ along / pixel).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    bins, positions = bins[order], (points @ across)[order]
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    chords = np.maximum.reduceat(positions, starts) - np.minimum.reduceat(positions, starts)
    return longest + pixel, float(chords.max()) + pixel


# --- detections: kind, size and position in the breast ----------------------------------------------
def describe_detections(detections, volume: Volume, card: Optional[dict] = None) -> dict:
    """One row per detection (:class:`~TransferSegLib.heatmaps.Detection` on ``volume``'s grid), in their order.

    Size is the box's largest extent across the slices (j, i) and depth its extent along k (mm).
    Where the input is a breast (``volume.meta`` gives a laterality R or L, or the card's lesions lie in
    the breast) the nipple is found (:func:`find_nipple`) and each row gets its distance from it (3D,
    mm) and, for a cranio-caudal view of a known side, its clock face (:func:`clock_face`).
    """
    laterality = volume.meta.get("laterality") if volume.meta.get("laterality") in ("R", "L") else None
    view = volume.meta.get("view")
    breast = laterality is not None or any(_code(s, "anatomicRegion") == BREAST for s in (card or {}).get("labels", []))
    nipple = find_nipple(volume) if breast and detections else None
    rows = []
    for n, detection in enumerate(detections, 1):
        d = detection if isinstance(detection, dict) else detection.to_dict()
        box, spacing = [int(v) for v in d["box_kji"]], volume.spacing
        extent = [(box[3 + a] - box[a]) * spacing[a] for a in range(3)]
        ras = d.get("position_ras")
        ras = np.asarray(ras if ras is not None else volume.ijk_to_ras_points([d["position_kji"]])[0], float)
        clock = clock_face(ras, nipple, laterality, view) if nipple is not None else None
        rows.append({
            "lesion": n, "kind": d.get("kind", "lesion"), "confidence": round(float(d["confidence"]), 3),
            "size_mm": round(max(extent[1], extent[2]), 1), "depth_mm": round(extent[0], 1),
            "position_r_mm": round(float(ras[0]), 1), "position_a_mm": round(float(ras[1]), 1),
            "position_s_mm": round(float(ras[2]), 1), "laterality": laterality, "clock_face": clock,
            "nipple_distance_mm": round(float(np.linalg.norm(ras - nipple)), 1) if nipple is not None else None,
            **{key: int(v) for key, v in zip("kji", d["position_kji"])},
            **{key: v for key, v in zip(("k0", "j0", "i0", "k1", "j1", "i1"), box)},
        })
    kinds = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    summary = {"detections": len(rows), "by_kind": kinds, "laterality": laterality, "view": view,
               "nipple_ras_mm": [round(float(v), 1) for v in nipple] if nipple is not None else None,
               "clock_face": _why_no_clock(breast, nipple, laterality, view, bool(rows))}
    return {"kind": "detections", "summary": summary, "columns": list(DETECTION_COLUMNS), "rows": rows}


def _why_no_clock(breast, nipple, laterality, view, any_rows) -> str:
    if not any_rows:
        return "no detections"
    if not breast:
        return "not given: the input does not say it is a breast (no laterality, and the model is not a breast model)"
    if nipple is None:
        return "not given: no breast outline (and so no nipple) was found in the image"
    if laterality is None or view not in CC_VIEWS:
        return (f"not given: the clock face needs a cranio-caudal view of a known side; the input says "
                f"laterality {laterality or 'unknown'}, view {view or 'unknown'}")
    return f"given for each detection more than {RETROAREOLAR_MM:g} mm from the nipple (closer: behind it)"


def clock_face(position_ras, nipple_ras, laterality: Optional[str], view: Optional[str]) -> Optional[str]:
    """Where a point lies in the breast on the clock face, to the half hour (``"10:30"``), or None.

    The clock is read as radiologists do, facing the patient: 12 o'clock superior, 6 inferior,
    3 o'clock towards the patient's left and 9 towards their right, so the outer (lateral) half of
    the right breast runs from 6 to 12 through 9 and that of the left breast through 3.  The hands
    point from the nipple to the point, projected on the coronal plane (R and S of the volume's
    patient geometry).  None unless ``laterality`` is R or L and ``view`` is cranio-caudal (on a
    DBT's CC view the slices give the height and the image the side; an oblique view's geometry
    rarely says how the breast lay), or when the point lies within 5 mm of the nipple's axis.
    """
    if laterality not in ("R", "L") or view not in CC_VIEWS or nipple_ras is None:
        return None
    offset = np.asarray(position_ras, float) - np.asarray(nipple_ras, float)
    left, superior = -offset[0], offset[2]
    if math.hypot(left, superior) < RETROAREOLAR_MM:
        return None
    half_hours = int(round(math.degrees(math.atan2(left, superior)) / 15.0)) % 24
    hour, half = divmod(half_hours, 2)
    return f"{hour or 12}:{'30' if half else '00'}"


def find_nipple(volume: Volume) -> Optional[np.ndarray]:
    """The breast's most anterior point (RAS mm), or None when no breast is seen.

    The breast is the largest 26-connected region brighter than Otsu's threshold, on a copy of
    the volume thinned to about two million voxels; the nipple is the centre of its voxels
    within one (thinned) voxel of its most anterior one.
    """
    strides = [1, 1, 1]
    while np.prod([math.ceil(n / s) for n, s in zip(volume.shape, strides)]) > 2_000_000:
        axis = int(np.argmax([n / s for n, s in zip(volume.shape, strides)]))
        strides[axis] += 1
    thin = volume.array[::strides[0], ::strides[1], ::strides[2]]
    threshold = _otsu(thin)
    if threshold is None:
        return None
    found, count = ndimage.label(thin > threshold, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(found.ravel())[1:])) + 1
    kji = np.argwhere(found == largest) * strides
    ras = volume.ijk_to_ras_points(kji)
    reach = max(s * n for s, n in zip(volume.spacing, strides))
    return ras[ras[:, 1] >= ras[:, 1].max() - reach].mean(axis=0)


def _otsu(values: np.ndarray) -> Optional[float]:
    """Otsu's threshold of ``values`` (256 bins); None when they are all the same."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() == finite.max():
        return None
    counts, edges = np.histogram(finite, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - mean * total) ** 2 / (weight * (total - weight))
    return float(edges[int(np.nanargmax(between[:-1])) + 1])


# --- from a pipeline Result ----------------------------------------------------------------------------
def lesion_report(result) -> dict:
    """The lesion rows and summary of a :class:`~TransferSegLib.pipeline.Result`: :func:`describe_detections`
    for a heatmap model, else :func:`measure_lesions`."""
    if result.task == "heatmap":
        return describe_detections(result.detections, result.volume, result.card)
    return measure_lesions(result.labels, result.volume, result.card)


def write_report_files(result, folder, report: Optional[dict] = None) -> list:
    """Write ``lesions.csv`` and ``report.html`` of a Result into ``folder`` (each atomically); return their paths."""
    report = lesion_report(result) if report is None else report
    folder = Path(folder)
    page = report_html(report, result.volume, result.card, labels=result.labels if result.task != "heatmap" else None,
                       warnings=result.warnings)
    written = []
    for name, text in (("lesions.csv", lesions_csv(report)), ("report.html", page)):
        with atomic_output(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


# --- lesions.csv --------------------------------------------------------------------------------------
def lesions_csv(report: dict) -> str:
    """The report's rows as CSV text, one line per lesion under a header of its columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(report["columns"])
    for row in report["rows"]:
        writer.writerow([cell_text(row[c], c) for c in report["columns"]])
    return out.getvalue()


# --- report.html ----------------------------------------------------------------------------------------
_STYLE = """
:root { color-scheme: light; --ink: #1b1f24; --muted: #5b6470; --line: #d5dae0; --band: #f3f5f7; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 1.55em; margin: 0 0 2px; }
h2 { font-size: 1.15em; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p.meta, .note { color: var(--muted); margin: 0 0 4px; font-size: .9em; }
.warnings { border-left: 4px solid #c77700; background: #fff6e5; padding: 8px 12px; margin: 14px 0; }
.warnings li { margin: 2px 0; }
.summary { display: flex; flex-wrap: wrap; gap: 10px; margin: 16px 0 4px; padding: 0; }
.summary div { background: var(--band); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
               min-width: 150px; }
.summary dt { font-size: .8em; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.summary dd { margin: 0; font-size: 1.25em; font-weight: 600; font-variant-numeric: tabular-nums; }
.summary dd small { display: block; font-size: .62em; font-weight: 400; color: var(--muted); }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: auto; font-size: .88em; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { text-align: right; vertical-align: bottom; background: var(--band); font-weight: 600; }
th small { display: block; font-weight: 400; color: var(--muted); }
td { text-align: right; }
th.text, td.text { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td a { color: var(--accent); text-decoration: none; }
figure.lesion { margin: 0 0 22px; }
figure.lesion img { display: block; width: 100%; max-width: 900px; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .9em; margin: 4px 0 0; }
p.method { margin-top: 10px; font-size: .82em; max-width: 62em; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { font-size: 9.5pt; }
  main { max-width: none; padding: 0; }
  .table-wrap { overflow: visible; }
  table { font-size: 8pt; }
  th, td { padding: 2px 4px; }
  thead { display: table-header-group; }
  tr, .summary div, .warnings { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  section.crops { break-before: page; page-break-before: always; }
  figure.lesion { break-inside: avoid; page-break-inside: avoid; }
  figure.lesion img { max-width: 100%; max-height: 120mm; width: auto; }
  td a { color: inherit; }
}
"""


def report_html(report: dict, volume: Volume, card: dict, labels: Optional[np.ndarray] = None, warnings=(),
                max_crops: int = MAX_CROPS) -> str:
    """One self-contained HTML page of ``report`` (:func:`measure_lesions` or :func:`describe_detections`):
    the summary, the lesion table (the same text as :func:`lesions_csv`) and, for the first ``max_crops``
    lesions, a crop in three views through the lesion with its outline (from ``labels``, the label map
    the rows were measured on) or a detection's box, embedded as PNG ``data:`` URIs.  Nothing is
    fetched from anywhere."""
    rows = report["rows"]
    title = f"{'Lesion' if report['kind'] == 'segmentation' else 'Detection'} report — {card.get('name', 'model')}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>", "<main>",
        f"<header><h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(_input_line(volume, card))}</p>',
        "</header>",
    ]
    if warnings:
        parts.append('<section class="warnings"><strong>Warnings</strong><ul>'
                     + "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings) + "</ul></section>")
    parts.append('<dl class="summary">' + "".join(
        f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(v)}" + (f"<small>{html.escape(n)}</small>" if n else "")
        + "</dd></div>" for k, v, n in _summary_items(report)) + "</dl>")
    parts += _table(report, max_crops)
    parts.append(f'<p class="note method">{html.escape(_method_note(report["kind"]))}</p>')
    if report["kind"] == "detections" and rows:
        parts.append(f'<p class="note">Clock face: {html.escape(report["summary"]["clock_face"])}.</p>')
    shown = rows[:max_crops]
    if shown:
        what = "lesion" if report["kind"] == "segmentation" else "detection"
        parts.append(f'<section class="crops"><h2>Each {what}, through its centre</h2>')
        if len(rows) > len(shown):
            parts.append(f'<p class="note">The first {len(shown)} of {len(rows)} are drawn; lesions.csv lists all.</p>')
        for row in shown:
            png = (_segmentation_crop(volume, labels, row, card) if report["kind"] == "segmentation"
                   else _detection_crop(volume, row))
            caption = _caption(report["kind"], row)
            parts.append(f'<figure class="lesion" id="lesion-{row["lesion"]}"><img alt="{html.escape(caption)}" '
                         f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _input_line(volume: Volume, card: dict) -> str:
    spacing = " × ".join(f"{s:.3g}" for s in volume.spacing)
    side = " ".join(str(volume.meta[k]) for k in ("laterality", "view") if volume.meta.get(k))
    return (f"Model {card.get('name', '?')} {card.get('version', '')} · input {describe_shape(volume.shape)} voxels "
            f"(k × j × i) of {spacing} mm, {orientation_name(volume.directions)}" + (f" · {side}" if side else ""))


def _summary_items(report: dict) -> list:
    s = report["summary"]
    if report["kind"] == "segmentation":
        organ = s["organ"] or "organ"
        lesion = (s["lesion_labels"] or ["lesion"])[0]
        items = []
        if s["organ_volume_ml"] is not None:
            items.append((f"{organ} volume", f"{s['organ_volume_ml']:,.1f} mL",
                          f"whole {organ}, {_plural(lesion)} included"))
        items.append((f"{lesion} volume", f"{s['lesion_volume_ml']:,.2f} mL", "all of them"))
        if s["burden_percent"] is not None:
            items.append((f"{lesion} burden", f"{s['burden_percent']:.2f} %", f"{_plural(lesion)} / whole {organ}"))
        items.append((_plural(lesion), str(s["lesions"]), "connected regions"))
        return items
    items = [("detections", str(s["detections"]), "")]
    items += [(_plural(kind.replace("_", " ")), str(n), "") for kind, n in sorted(s["by_kind"].items())]
    if s["laterality"] or s["view"]:
        side = {"R": "right", "L": "left"}.get(s["laterality"], "side unknown")
        items.append(("breast", side, f"{s['view'] or 'view unknown'} view"))
    items.append(("nipple", ", ".join(f"{v:g}" for v in s["nipple_ras_mm"]) if s["nipple_ras_mm"] else "not found",
                  "R, A, S (mm)" if s["nipple_ras_mm"] else "no distances from it"))
    return items


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _table(report: dict, max_crops: int) -> list:
    columns = shown_columns(report)
    head = "".join(f'<th scope="col" class="{"text" if c in TEXT_COLUMNS else "num"}">{html.escape(HEADINGS[c][0])}'
                   + (f"<small>{HEADINGS[c][1]}</small>" if HEADINGS[c][1] else "<small>&nbsp;</small>") + "</th>"
                   for c in columns)
    body = []
    for row in report["rows"]:
        cells = []
        for c in columns:
            value = html.escape(shown_text(row[c], c))
            if c == "lesion" and row["lesion"] <= max_crops:  # a link to its crop
                value = f'<a href="#lesion-{row["lesion"]}">{value}</a>'
            cells.append(f'<td data-column="{c}"{" class=text" if c in TEXT_COLUMNS else ""}>{value}</td>')
        body.append(f'<tr data-lesion="{row["lesion"]}">' + "".join(cells) + "</tr>")
    what = "Lesions" if report["kind"] == "segmentation" else "Detections"
    if not body:
        return [f"<section><h2>{what}</h2><p>None found.</p></section>"]
    return [f"<section><h2>{what}</h2>", '<div class="table-wrap"><table id="lesions">',
            f"<thead><tr>{head}</tr></thead>", "<tbody>", *body, "</tbody></table></div></section>"]


def _caption(kind: str, row: dict) -> str:
    cell = {c: cell_text(v, c) for c, v in row.items()}
    if kind == "segmentation":
        return (f"Lesion {row['lesion']} ({row['label']}): {cell['volume_ml']} mL, {cell['longest_axial_mm']} × "
                f"{cell['perpendicular_mm']} mm axially, mean {cell['mean_hu']} HU, "
                f"{cell['surface_distance_mm'] or '?'} mm from the surface; centre voxel (k, j, i) "
                f"{row['k']}, {row['j']}, {row['i']}")
    where = [f"{row['laterality']} breast" if row["laterality"] else "",
             f"{row['clock_face']} o'clock" if row["clock_face"] else "",
             f"{cell['nipple_distance_mm']} mm from the nipple" if cell["nipple_distance_mm"] else ""]
    where = ", ".join(w for w in where if w)
    return (f"Detection {row['lesion']}: {row['kind'].replace('_', ' ')}, confidence {cell['confidence']}, "
            f"{cell['size_mm']} mm" + (f"; {where}" if where else "") + f"; voxel (k, j, i) {row['k']}, {row['j']}, "
            f"{row['i']}")


def _method_note(kind: str) -> str:
    if kind == "segmentation":
        return ("Automatic measurements from the segmentation; check them on the images. Each lesion is a connected "
                "region of a lesion label. Diameters follow RECIST 1.1 on axial planes of the patient (resliced from "
                "the volume's geometry): the longest diameter on the plane where it is largest, and the longest "
                "chord at right angles to it on that plane. Distance to the surface: the gap between the lesion "
                "and the nearest voxel outside the organ (0 where it touches). Burden: lesions / whole organ "
                "(lesions included).")
    return ("Automatic detections; check them on the images. Size: the detection box's largest extent across the "
            "slices; depth: along the slices. The nipple is the breast's most anterior point; the clock face is "
            "read facing the patient (12 superior, 3 towards the patient's left) and given for cranio-caudal views "
            "of a known side only.")


def _crop_box(lower, upper, volume: Volume, margin_mm: float) -> tuple:
    return tuple(slice(max(int(lo) - math.ceil(margin_mm / s), 0), min(int(hi) + math.ceil(margin_mm / s), n))
                 for lo, hi, s, n in zip(lower, upper, volume.spacing, volume.shape))


def _sub_volume(volume: Volume, box: tuple) -> Volume:
    origin = volume.ijk_to_ras_points([[s.start for s in box]])[0]
    return Volume(volume.array[box], volume.spacing, volume.directions, origin)


def _segmentation_crop(volume: Volume, labels: np.ndarray, row: dict, card: dict) -> bytes:
    """Three views through the lesion's centre voxel, cropped around it, with the outlines of this
    lesion (label colour 2), the organ (1) and any other lesion (3)."""
    lower, upper = [row["k0"], row["j0"], row["i0"]], [row["k1"], row["j1"], row["i1"]]
    size = max((hi - lo) * s for lo, hi, s in zip(lower, upper, volume.spacing))
    box = _crop_box(lower, upper, volume, max(15.0, 0.5 * size))
    pairs = lesion_segments(card)
    organ = next((o for _, o in pairs if o is not None), None)
    crop = labels[box]
    lesions = np.isin(crop, [int(s["label"]) for s, _ in pairs])
    found, _ = ndimage.label(lesions, structure=np.ones((3, 3, 3), bool))
    seed = tuple(v - s.start for v, s in zip((row["k"], row["j"], row["i"]), box))
    outline = np.zeros(crop.shape, np.uint8)
    if organ is not None:
        outline[crop == int(organ["label"])] = 1
    outline[lesions] = 3
    outline[found == found[seed]] = 2
    window = tuple((card.get("preprocessing") or {}).get("hu_window") or CT_WINDOW)
    names = {1: organ["name"] if organ else "organ", 2: "this lesion", 3: "other lesions"}
    return _three_views(_sub_volume(volume, box), seed, box, window, outline=outline, names=names)


def _detection_crop(volume: Volume, row: dict) -> bytes:
    """Three views through the detection's voxel, cropped around its box, with the box and its number."""
    lower, upper = [row["k0"], row["j0"], row["i0"]], [row["k1"], row["j1"], row["i1"]]
    size = max((hi - lo) * s for lo, hi, s in zip(lower[1:], upper[1:], volume.spacing[1:]))
    box = _crop_box(lower, upper, volume, max(10.0, size))
    seed = [row[a] - s.start for a, s in zip("kji", box)]
    local = [v - s.start for v, s in zip(lower, box)] + [v - s.start for v, s in zip(upper, box)]
    sub = _sub_volume(volume, box)
    window = tuple(float(v) for v in np.percentile(sub.array[seed[0]], [1.0, 99.5]))  # the detection's own slice
    window = window if window[1] > window[0] else (window[0], window[0] + 1.0)
    return _three_views(sub, seed, box, window, boxes=[{"box_kji": local, "kind": row["kind"]}],
                        markers=[{"position_kji": seed, "text": str(row["lesion"]), "color": "#ffd24d"}])


def _three_views(sub: Volume, seed, box, window, outline=None, names=None, boxes=None, markers=None) -> bytes:
    views = anatomical_views(sub)
    # as tall as the tallest panel needs (a thin crop's coronal view is a strip)
    tallest = max(sub.shape[v[2]] * sub.spacing[v[2]] / (sub.shape[v[3]] * sub.spacing[v[3]]) for v in views)
    fig = Figure(figsize=(7.8, 2.5 * min(max(tallest, 0.4), 1.4) + 0.55), layout="constrained")
    axes = fig.subplots(1, 3)
    values = [v for v in (1, 3, 2) if outline is not None and np.any(outline == v)]  # this lesion's outline on top
    for ax, view in zip(axes, views):
        normal = view[1]
        draw_plane(ax, sub, view, int(seed[normal]), window, labels=outline, label_values=values,
                   contours_only=True, boxes=boxes, markers=markers,
                   title=f"{view[0]} {int(seed[normal]) + box[normal].start}")
    if values:
        handles = [Line2D([], [], color=LABEL_COLORS[v], label=names[v]) for v in sorted(values)]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    return figure_png(fig)
