"""PNG overviews of a volume: axial, coronal and sagittal slices with overlays.

Views are anatomical (chosen from the direction matrix with :func:`anatomical_axes`, not by
array axis) and shown in radiological orientation: axial and coronal with the patient's
right on the image's left, axial with anterior at the top, coronal and sagittal with
superior at the top, sagittal with anterior on the left.  Pixels keep their physical aspect
ratio.  Matplotlib's Agg canvas is used directly: no screen, no pyplot global state.

:func:`save_overview_png` draws one volume, :func:`save_gallery_png` several (one row each);
:func:`save_views_side_by_side_png` several label maps on one slice (e.g. a multi-view model's
view networks), :func:`save_scalar_overlay_png` a scalar map with a colorbar (the views'
disagreement), :func:`save_detections_png` a lesion heatmap with its detections and the
annotated lesions, :func:`save_froc_png` FROC curves.  Every slice is drawn by
:func:`draw_plane`, and every PNG is written atomically.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text

from .atomic import atomic_output
from .heatmaps import box_contains
from .labels import CT_LABEL_NAMES
from .metrics import FROC_RATES
from .volume import TransferSegError, Volume, anatomical_axes, label_counts

__all__ = ["LABEL_COLORS", "anatomical_views", "draw_plane", "figure_png", "save_detections_png", "save_froc_png",
           "save_gallery_png", "save_overview_png", "save_scalar_overlay_png", "save_views_side_by_side_png"]

CT_WINDOW = (-200.0, 250.0)
# Label value → RGB: 1 liver reddish brown, 2 tumor yellow-green, then distinct hues.
LABEL_COLORS = {
    1: (0.80, 0.38, 0.22), 2: (0.55, 0.95, 0.15), 3: (0.20, 0.55, 1.00), 4: (1.00, 0.80, 0.10),
    5: (0.85, 0.30, 0.90), 6: (0.10, 0.85, 0.85), 7: (1.00, 0.45, 0.60), 8: (0.60, 0.60, 1.00),
}
_BOX_COLORS = {"mass": "#00e5ff", "calcification_cluster": "#ff4dff"}
_PANEL_INCHES = 3.4
_TITLE_CHARS = 48  # characters per line of a row's title (8 pt beside a 3.4-inch slice)
_DPI = 110


def _label_color(value: int):
    if value in LABEL_COLORS:
        return LABEL_COLORS[value]
    hue = (value * 0.618034) % 1.0   # golden-ratio hues for values beyond the table
    return tuple(hsv_to_rgb((hue, 0.8, 0.95)))


def anatomical_views(volume: Volume):
    """For axial, coronal, sagittal: (name, normal axis, row axis, column axis, flip rows, flip columns, letters).

    Rows and columns are array axes; a flip makes the display run in the radiological direction.
    Letters are the patient directions at the (left, right, top, bottom) edges of the image.
    """
    axes = anatomical_axes(volume.directions)
    d = volume.directions

    def points_to(array_axis: int, patient: str) -> bool:
        """Whether increasing the index along ``array_axis`` moves towards R, A or S."""
        return d["RAS".index(patient), 2 - array_axis] > 0

    r, a, s = axes["R"], axes["A"], axes["S"]
    return [
        # axial: anterior at the top, patient's right on the left
        ("axial", s, a, r, points_to(a, "A"), points_to(r, "R"), ("R", "L", "A", "P")),
        # coronal: superior at the top, patient's right on the left
        ("coronal", a, s, r, points_to(s, "S"), points_to(r, "R"), ("R", "L", "S", "I")),
        # sagittal: superior at the top, anterior on the left
        ("sagittal", r, s, a, points_to(s, "S"), points_to(a, "A"), ("A", "P", "S", "I")),
    ]


def _plane(array: np.ndarray, normal: int, index: int, row_axis: int, col_axis: int, flip_r: bool, flip_c: bool):
    plane = np.take(array, index, axis=normal)
    remaining = [ax for ax in range(3) if ax != normal]
    if remaining.index(row_axis) != 0:
        plane = plane.T
    if flip_r:
        plane = plane[::-1]
    if flip_c:
        plane = plane[:, ::-1]
    return plane


def _auto_window(array: np.ndarray):
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [1.0, 99.5])
    if lo <= -500 and sample.max() >= 100:      # air at about −1000 and tissue above: HU
        return CT_WINDOW
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _focus(volume: Volume, labels, heatmap, boxes):
    """The voxel the three slices pass through: label centre, first box, heatmap peak or centre."""
    if labels is not None and np.any(labels):
        return [int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0)]
    if boxes:
        k0, j0, i0, k1, j1, i1 = boxes[0]["box_kji"]
        return [(k0 + k1 - 1) // 2, (j0 + j1 - 1) // 2, (i0 + i1 - 1) // 2]
    if heatmap is not None and np.any(heatmap > 0):
        return [int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)]
    return [n // 2 for n in volume.shape]


def _check_overlay(name, array, volume):
    if array is None:
        return None
    array = np.asarray(array)
    if array.shape != volume.shape:
        raise TransferSegError(
            f"the {name} ({'×'.join(map(str, array.shape))}) does not match the volume "
            f"({'×'.join(map(str, volume.shape))}); it must have the same shape"
        )
    return array


def _label_colormap(values):
    """``(colormap, top)`` drawing each label value in ``values`` as its colour, 45 % opaque."""
    top = max(values)
    colors = np.zeros((top + 1, 4))
    for v in values:
        colors[v] = (*_label_color(v), 0.45)
    return ListedColormap(colors), top


def _present_labels(labels) -> list:
    return [] if labels is None else [int(v) for v in np.flatnonzero(label_counts(labels)) if v != 0]


def _display_point(volume: Volume, view, position_kji):
    """Where a (k, j, i) voxel lands in a view's image: (row, column)."""
    _, _, row_ax, col_ax, flip_r, flip_c, _ = view
    row, col = float(position_kji[row_ax]), float(position_kji[col_ax])
    if flip_r:
        row = volume.shape[row_ax] - 1 - row
    if flip_c:
        col = volume.shape[col_ax] - 1 - col
    return row, col


def draw_plane(ax, volume: Volume, view, index: int, window, labels=None, label_values=(), heatmap=None,
               heat_max=0.0, heat_cmap="hot", heat_floor=0.05, heat_alpha=0.55, boxes=None, markers=None,
               contours_only=False, title=None):
    """Draw one anatomical slice (``view`` from :func:`_views`, slice ``index`` along its normal) into ``ax``.

    Labels are a transparent fill plus a contour per value (``contours_only``: the contour alone);
    the heatmap is divided by ``heat_max`` and hidden below ``heat_floor``; boxes are drawn where
    they cross the slice; markers (dicts with ``position_kji``, optional ``box_kji``, ``text``
    and ``color``) where their box crosses it (without a box: on the slice itself).  Returns
    the heatmap's image (for a colorbar), or None.
    """
    name, normal, row_ax, col_ax, flip_r, flip_c, letters = view
    plane_args = (normal, index, row_ax, col_ax, flip_r, flip_c)
    aspect = volume.spacing[row_ax] / volume.spacing[col_ax]
    ax.imshow(_plane(volume.array, *plane_args), cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect,
              interpolation="nearest")
    if label_values:
        lab = _plane(labels, *plane_args).astype(np.int64)
        if not contours_only:
            label_cmap, top = _label_colormap(label_values)
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=label_cmap, vmin=0, vmax=top, aspect=aspect,
                      interpolation="nearest")
        for v in label_values:
            # contour needs a 2×2 grid: a one-slice (or one-row) volume shows the fill alone
            if min(lab.shape) >= 2 and np.any(lab == v) and np.any(lab != v):
                ax.contour(lab == v, levels=[0.5], colors=[_label_color(v)], linewidths=0.8)
    heat_image = None
    if heat_max > 0:
        heat = _plane(heatmap, *plane_args).astype(np.float32) / heat_max
        heat_image = ax.imshow(np.ma.masked_less(heat, heat_floor), cmap=heat_cmap, vmin=0.0, vmax=1.0,
                               alpha=heat_alpha, aspect=aspect, interpolation="bilinear")
    for box in boxes or []:
        b = box["box_kji"]
        if not b[normal] <= index < b[3 + normal]:
            continue
        edges = []
        for axis, flip in ((row_ax, flip_r), (col_ax, flip_c)):
            start, stop = b[axis] - 0.5, b[3 + axis] - 0.5
            if flip:
                n = volume.shape[axis]
                start, stop = n - 1 - stop, n - 1 - start
            edges.append((start, stop))
        (r0, r1), (c0, c1) = edges
        ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, linewidth=1.0,
                               edgecolor=_BOX_COLORS.get(box.get("kind"), "#00ff00"),
                               linestyle=box.get("linestyle", "solid")))
    for marker in markers or []:
        b = marker.get("box_kji")
        crosses = b[normal] <= index < b[3 + normal] if b is not None else marker["position_kji"][normal] == index
        if not crosses:
            continue
        row, col = _display_point(volume, view, marker["position_kji"])
        color = marker.get("color", "#00ff00")
        ax.plot([col], [row], marker="+", markersize=9, markeredgewidth=1.6, color=color)
        if marker.get("text"):
            ax.annotate(marker["text"], (col, row), xytext=(4, 4), textcoords="offset points", color=color,
                        fontsize=7, fontweight="bold")
    left, right, top_letter, bottom = letters
    edges = [(left, (0.01, 0.5), "left", "center"), (right, (0.99, 0.5), "right", "center")]
    if volume.shape[row_ax] > 1:  # a one-voxel-thin strip has no room for a top and a bottom letter
        edges += [(top_letter, (0.5, 0.99), "center", "top"), (bottom, (0.5, 0.01), "center", "bottom")]
    if volume.shape[col_ax] == 1:
        edges = edges[2:]
    for text, xy, ha, va in edges:
        ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="#ffd24d", fontsize=7)
    ax.set_title(f"{name} {index}" if title is None else title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return heat_image


def _draw_case(axes_row, volume: Volume, labels=None, heatmap=None, boxes=None, title=None, window=None,
               label_names=None, focus=None, heat_max=None, markers=None, legend: bool = True) -> list:
    """Draw one case into three matplotlib axes (axial, coronal, sagittal); return the legend's
    handles (drawn in the last axes when ``legend``)."""
    labels = _check_overlay("label map", labels, volume)
    heatmap = _check_overlay("heatmap", heatmap, volume)
    window = _auto_window(volume.array) if window is None else (float(window[0]), float(window[1]))
    focus = _focus(volume, labels, heatmap, boxes) if focus is None else [int(v) for v in focus]
    values = _present_labels(labels)
    names = CT_LABEL_NAMES if label_names is None else dict(label_names)
    if heat_max is None:
        heat_max = float(heatmap.max()) if heatmap is not None and heatmap.size else 0.0
    elif heatmap is None:
        heat_max = 0.0

    for ax, view in zip(axes_row, anatomical_views(volume)):
        index = int(np.clip(focus[view[1]], 0, volume.shape[view[1]] - 1))
        draw_plane(ax, volume, view, index, window, labels=labels, label_values=values, heatmap=heatmap,
                   heat_max=heat_max, boxes=boxes, markers=markers)

    if title:  # wrapped: a long title beside a short slice would run off the figure
        axes_row[0].set_ylabel(textwrap.fill(title, _TITLE_CHARS), fontsize=8)
    handles = [Patch(facecolor=_label_color(v), label=f"{v} {names.get(v, 'label')}") for v in values]
    kinds = sorted({box.get("kind", "box") for box in boxes or []})
    handles += [Patch(facecolor="none", edgecolor=_BOX_COLORS.get(k, "#00ff00"), label=k.replace("_", " "))
                for k in kinds]
    if heat_max > 0:
        handles.append(Patch(facecolor=(1.0, 0.5, 0.0), label="heatmap"))
    marker_legend = {m["legend"]: m.get("color", "#00ff00") for m in markers or [] if m.get("legend")}
    handles += [Line2D([], [], marker="+", linestyle="none", color=color, label=text)
                for text, color in marker_legend.items()]
    if handles and legend:
        axes_row[-1].legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.7)
    return handles


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes, drawn the way every PNG here is (e.g. for embedding in a page)."""
    FigureCanvasAgg(fig)
    for text in fig.findobj(Text):  # a "$" in a card's name or a file name is a dollar, not TeX to parse
        text.set_parse_math(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def _save(fig: Figure, path) -> Path:
    data = figure_png(fig)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_gallery_png(cases, path) -> Path:
    """Write one PNG with a row of axial, coronal and sagittal slices per case; return its path.

    ``cases``: a list of dicts with the keys of :func:`save_overview_png` (``volume`` required;
    ``labels``, ``heatmap``, ``boxes``, ``title``, ``window``, ``label_names`` optional), and
    ``focus`` (the (k, j, i) voxel every slice passes through, e.g. the same for every row) and
    ``heat_max`` (the heatmap value drawn at full colour; default its maximum).
    """
    cases = list(cases)
    if not cases:
        raise TransferSegError("the gallery needs at least one case")
    fig = Figure(figsize=(3 * _PANEL_INCHES, _PANEL_INCHES * len(cases)), layout="constrained")
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for row, case in zip(axes, cases):
        case = dict(case)
        volume = case.pop("volume")
        _draw_case(row, volume, **case)
    return _save(fig, path)


def save_overview_png(volume: Volume, path, labels=None, heatmap=None, boxes=None, title=None, window=None,
                      label_names=None) -> Path:
    """Write a PNG of three orthogonal anatomical slices of ``volume`` with optional overlays; return its path.

    Args:
        labels: integer label map on the volume's grid, drawn as a transparent fill and a
            contour per value (1 reddish brown, 2 yellow-green, …) with a legend.
        heatmap: non-negative scores on the volume's grid, drawn semi-transparent ('hot').
        boxes: lesion dicts with ``box_kji`` [k0, j0, i0, k1, j1, i1] (half-open voxel indices),
            drawn where they cross a slice; optional ``kind`` picks the colour.
        title: text beside the row.
        window: (low, high) display range; default [−200, 250] HU when the data look like CT,
            else the 1st–99.5th percentile.
        label_names: {value: name} for the legend; default the CT convention {1: liver, 2: liver tumor}.

    The slices pass through the labels' centre of mass (else the first box, else the heatmap
    peak, else the volume centre).  The file is written atomically.
    """
    case = dict(volume=volume, labels=labels, heatmap=heatmap, boxes=boxes, title=title, window=window,
                label_names=label_names)
    return save_gallery_png([case], path)


def _labels_centre(label_maps) -> list | None:
    """The (k, j, i) centre of every labelled voxel of the first label map that has any; None if all are empty."""
    for labels in label_maps:
        if labels is not None and np.any(labels):
            return [int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0)]
    return None


def _view_named(volume: Volume, view: str):
    views = {v[0]: v for v in anatomical_views(volume)}
    if view not in views:
        raise TransferSegError(f"view must be one of {', '.join(views)}; got {view!r}")
    return views[view]


def save_views_side_by_side_png(volume: Volume, label_maps: dict, path, view: str = "axial", focus=None,
                                label_names=None, title=None, zoom: bool = True) -> Path:
    """Write one PNG with a panel per label map, all on the same slice of one anatomical view; return its path.

    Args:
        label_maps: {panel title: integer label map on the volume's grid}, e.g. the axial, coronal
            and sagittal networks' label maps and the fused one; drawn left to right.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        focus: the (k, j, i) voxel the slice passes through; default the centre of the first
            non-empty label map.
        zoom: show only the labelled part of the slice (the box of every panel's labels, grown
            by 15 %), the same box in every panel so that they line up.
    """
    maps = {name: _check_overlay(f"label map {name!r}", labels, volume) for name, labels in label_maps.items()}
    if not maps:
        raise TransferSegError("side-by-side views need at least one label map")
    chosen = _view_named(volume, view)
    normal = chosen[1]
    if focus is None:
        focus = _labels_centre(maps.values()) or [n // 2 for n in volume.shape]
    index = int(np.clip(int(focus[normal]), 0, volume.shape[normal] - 1))
    window = _auto_window(volume.array)
    values = sorted({v for labels in maps.values() for v in _present_labels(labels)})
    names = CT_LABEL_NAMES if label_names is None else dict(label_names)

    aspect = volume.spacing[chosen[2]] / volume.spacing[chosen[3]]
    fig = Figure(figsize=(_PANEL_INCHES * len(maps), _PANEL_INCHES * min(max(aspect, 0.5), 1.6) + 0.5),
                 layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    args = chosen[1:6]
    union = np.zeros(_plane(volume.array, normal, index, *args[1:]).shape, bool)
    for ax, (name, labels) in zip(axes, maps.items()):
        draw_plane(ax, volume, chosen, index, window, labels=labels, label_values=_present_labels(labels),
                   title=f"{name}\n{view} {index}")
        union |= _plane(labels, normal, index, *args[1:]) > 0
    if zoom and union.any():
        rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
        margin = max(8, int(0.15 * max(rows[-1] - rows[0], cols[-1] - cols[0])))
        r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin, union.shape[0] - 1)
        c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin, union.shape[1] - 1)
        for ax in axes:
            ax.set_xlim(c0 - 0.5, c1 + 0.5)
            ax.set_ylim(r1 + 0.5, r0 - 0.5)
    handles = [Patch(facecolor=_label_color(v), label=f"{v} {names.get(v, 'label')}") for v in values]
    if handles:
        axes[-1].legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_scalar_overlay_png(volume: Volume, values, path, colorbar_label: str, vmax: float = 1.0, cmap="turbo",
                            floor: float = 0.05, contours=None, label_names=None, focus=None, title=None) -> Path:
    """Write a PNG of the three anatomical views with a scalar map (e.g. the views' disagreement) in
    colour over the grey image, with a colorbar; return its path.

    Args:
        values: non-negative values on the volume's grid, drawn from 0 to ``vmax`` in ``cmap``,
            hidden (plain image) below ``floor`` × ``vmax``.
        colorbar_label: what the colour means, written beside the colorbar.
        contours: an optional label map drawn as outlines only (e.g. the fused segmentation).
        focus: the (k, j, i) voxel the slices pass through; default the contours' centre, else
            the maximum of ``values``.
    """
    values = _check_overlay("map", values, volume)
    contours = _check_overlay("label map", contours, volume)
    if not vmax > 0:
        raise TransferSegError(f"vmax must be positive; got {vmax}")
    if focus is None:
        focus = _labels_centre([contours]) or _focus(volume, None, values, None)
    window = _auto_window(volume.array)
    label_values = _present_labels(contours)
    names = CT_LABEL_NAMES if label_names is None else dict(label_names)
    fig = Figure(figsize=(3 * _PANEL_INCHES + 0.8, _PANEL_INCHES), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, view in zip(axes, anatomical_views(volume)):
        index = int(np.clip(int(focus[view[1]]), 0, volume.shape[view[1]] - 1))
        draw_plane(ax, volume, view, index, window, labels=contours, label_values=label_values, heatmap=values,
                   heat_max=float(vmax), heat_cmap=cmap, heat_floor=floor, heat_alpha=0.8, contours_only=True)
    fig.colorbar(ScalarMappable(Normalize(0.0, float(vmax)), cmap=cmap), ax=list(axes), shrink=0.85,
                 label=colorbar_label)
    handles = [Line2D([], [], color=_label_color(v), label=f"{names.get(v, 'label')} outline") for v in label_values]
    if handles:
        axes[-1].legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_detections_png(volume: Volume, heatmap, detections, lesions, path, title=None, max_rows: int = 5) -> Path:
    """Write a PNG of a lesion heatmap with its detections and the annotated lesions; return its path.

    One row (axial, coronal, sagittal) through each annotated lesion's centre, then one through
    the strongest detection that lies in no lesion's box (the worst false positive), at most
    ``max_rows``.  Lesion boxes are dashed; each detection is a cross numbered by rank, green
    inside a lesion's box, red outside, drawn where its half-maximum box crosses the slice.

    Args:
        detections: :class:`~TransferSegLib.heatmaps.Detection` objects or their dicts, by rank.
        lesions: the truth: dicts with ``box_kji`` (and optional ``kind``, ``center_kji``), as
            :func:`TransferSegLib.phantoms.dbt_phantom` returns them.
    """
    heatmap = _check_overlay("heatmap", heatmap, volume)
    rows_of = [d if isinstance(d, dict) else d.to_dict() for d in detections]
    boxes = [dict(kind=lesion.get("kind", "lesion"), box_kji=lesion["box_kji"], linestyle="dashed")
             for lesion in lesions]
    markers = []
    for rank, d in enumerate(rows_of, 1):
        inside = any(box_contains(box, d["position_kji"]) for box in boxes)
        markers.append(dict(position_kji=d["position_kji"], box_kji=d["box_kji"], text=f"{rank}",
                            color="#39ff14" if inside else "#ff3030",
                            legend="detection in a lesion's box" if inside else "detection outside (false positive)"))
    heat_max = float(heatmap.max()) if heatmap.size else 0.0
    cases = []
    for n, lesion in enumerate(lesions, 1):
        b = lesion["box_kji"]
        centre = lesion.get("center_kji") or [(b[a] + b[3 + a] - 1) / 2.0 for a in range(3)]
        found = [m["text"] for m in markers if box_contains(lesion, m["position_kji"])]
        what = lesion.get("kind", "lesion").replace("_", " ")
        cases.append(dict(focus=[int(round(c)) for c in centre],
                          title=f"{what} {n}: " + (f"found by #{', #'.join(found)}" if found else "missed")))
    false_positive = next((m for m in markers if m["color"] == "#ff3030"), None)
    if false_positive is not None:
        rank = int(false_positive["text"])
        cases.append(dict(focus=false_positive["position_kji"],
                          title=f"strongest false positive #{rank} ({rows_of[rank - 1]['confidence']:.2f})"))
    if not cases:
        cases.append(dict(focus=None, title="no lesion, no detection"))
    cases = cases[:max_rows]
    fig = Figure(figsize=(3 * _PANEL_INCHES, _PANEL_INCHES * len(cases) + 0.3 + (0.3 if title else 0.0)),
                 layout="constrained")
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for row, case in zip(axes, cases):
        handles = _draw_case(row, volume, heatmap=heatmap, boxes=boxes, heat_max=heat_max, markers=markers,
                             legend=False, **case)
        row[0].yaxis.label.set_fontsize(9)
    if handles:  # one legend for every row, below them, so that it hides no slice
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_froc_png(curves: dict, path, title=None, points=None, rates=None) -> Path:
    """Write a FROC plot (true positive rate against false positives per volume); return its path.

    Args:
        curves: {name: what :func:`TransferSegLib.metrics.froc` returns}, each drawn as a step curve.
        points: optional {label: (false positives per volume, true positive rate)} operating
            points, e.g. the detector's default threshold, drawn as markers.
        rates: false-positive rates marked by thin vertical lines (default the paper's,
            :data:`TransferSegLib.metrics.FROC_RATES`).

    The false-positive axis is logarithmic, so that the paper's rates (0.01–0.25) and the whole
    curve both show; zero false positives are drawn at its left edge (half the smallest rate).
    """
    if not curves:
        raise TransferSegError("a FROC plot needs at least one curve")
    rates = list(FROC_RATES if rates is None else rates)
    left = 0.5 * min(rates) if rates else 0.005
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    right = 1.0
    for name, curve in curves.items():
        fps = np.maximum(np.asarray(curve["fp_per_volume"], float), left)
        right = max(right, float(fps[-1]) * 1.5)
        ax.step(fps, curve["tpr"], where="post", lw=1.6,
                label=f"{name} ({curve['lesions']} lesions, {curve['volumes']} volumes)")
    for label, (fp, tpr) in (points or {}).items():
        ax.plot([max(fp, left)], [tpr], marker="o", markersize=7, linestyle="none", label=label)
    for n, rate in enumerate(rates):
        ax.axvline(rate, color="0.75", lw=0.7, ls=":", zorder=0,
                   label=f"{min(rates):g}–{max(rates):g} FP/volume (AH-Net paper's operating points)" if n == 0 else None)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false positives per volume (log scale)")
    ax.set_ylabel("true positive rate (lesions detected)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
