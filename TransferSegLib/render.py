"""PNG overviews of a volume: axial, coronal and sagittal slices with overlays.

Views are anatomical (chosen from the direction matrix with :func:`anatomical_axes`, not by
array axis) and shown in radiological orientation: axial and coronal with the patient's
right on the image's left, axial with anterior at the top, coronal and sagittal with
superior at the top, sagittal with anterior on the left.  Pixels keep their physical aspect
ratio.  Matplotlib's Agg canvas is used directly: no screen, no pyplot global state.

:func:`save_overview_png` draws one volume, :func:`save_gallery_png` several (one row each);
both go through :func:`_draw_case` and are written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .io import atomic_output
from .phantoms import CT_LABEL_NAMES
from .volume import TransferSegError, Volume, anatomical_axes, label_counts

__all__ = ["LABEL_COLORS", "save_gallery_png", "save_overview_png"]

CT_WINDOW = (-200.0, 250.0)
# Label value → RGB: 1 liver reddish brown, 2 tumor yellow-green, then distinct hues.
LABEL_COLORS = {
    1: (0.80, 0.38, 0.22), 2: (0.55, 0.95, 0.15), 3: (0.20, 0.55, 1.00), 4: (1.00, 0.80, 0.10),
    5: (0.85, 0.30, 0.90), 6: (0.10, 0.85, 0.85), 7: (1.00, 0.45, 0.60), 8: (0.60, 0.60, 1.00),
}
_BOX_COLORS = {"mass": "#00e5ff", "calcification_cluster": "#ff4dff"}
_PANEL_INCHES = 3.4
_DPI = 110


def _label_color(value: int):
    if value in LABEL_COLORS:
        return LABEL_COLORS[value]
    hue = (value * 0.618034) % 1.0   # golden-ratio hues for values beyond the table
    return tuple(hsv_to_rgb((hue, 0.8, 0.95)))


def _views(volume: Volume):
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


def _draw_case(axes_row, volume: Volume, labels=None, heatmap=None, boxes=None, title=None, window=None,
               label_names=None, focus=None, heat_max=None) -> None:
    """Draw one case into three matplotlib axes (axial, coronal, sagittal)."""
    labels = _check_overlay("label map", labels, volume)
    heatmap = _check_overlay("heatmap", heatmap, volume)
    lo, hi = _auto_window(volume.array) if window is None else (float(window[0]), float(window[1]))
    focus = _focus(volume, labels, heatmap, boxes) if focus is None else [int(v) for v in focus]
    values = [] if labels is None else [int(v) for v in np.flatnonzero(label_counts(labels)) if v != 0]
    names = CT_LABEL_NAMES if label_names is None else dict(label_names)
    if values:
        top = max(values)
        colors = np.zeros((top + 1, 4))
        for v in values:
            colors[v] = (*_label_color(v), 0.45)
        label_cmap = ListedColormap(colors)
    if heat_max is None:
        heat_max = float(heatmap.max()) if heatmap is not None and heatmap.size else 0.0
    elif heatmap is None:
        heat_max = 0.0
    spacing = volume.spacing

    for ax, (name, normal, row_ax, col_ax, flip_r, flip_c, letters) in zip(axes_row, _views(volume)):
        index = int(np.clip(focus[normal], 0, volume.shape[normal] - 1))
        plane_args = (normal, index, row_ax, col_ax, flip_r, flip_c)
        aspect = spacing[row_ax] / spacing[col_ax]
        ax.imshow(_plane(volume.array, *plane_args), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
        if values:
            lab = _plane(labels, *plane_args).astype(np.int64)
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=label_cmap, vmin=0, vmax=top, aspect=aspect,
                      interpolation="nearest")
            for v in values:
                # contour needs a 2×2 grid: a one-slice (or one-row) volume shows the fill alone
                if min(lab.shape) >= 2 and np.any(lab == v) and np.any(lab != v):
                    ax.contour(lab == v, levels=[0.5], colors=[_label_color(v)], linewidths=0.8)
        if heat_max > 0:
            heat = _plane(heatmap, *plane_args).astype(np.float32) / heat_max
            ax.imshow(np.ma.masked_less(heat, 0.05), cmap="hot", vmin=0.0, vmax=1.0, alpha=0.55, aspect=aspect,
                      interpolation="bilinear")
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
                                   edgecolor=_BOX_COLORS.get(box.get("kind"), "#00ff00")))
        left, right, top_letter, bottom = letters
        edges = [(left, (0.01, 0.5), "left", "center"), (right, (0.99, 0.5), "right", "center")]
        if volume.shape[row_ax] > 1:  # a one-voxel-thin strip has no room for a top and a bottom letter
            edges += [(top_letter, (0.5, 0.99), "center", "top"), (bottom, (0.5, 0.01), "center", "bottom")]
        if volume.shape[col_ax] == 1:
            edges = edges[2:]
        for text, xy, ha, va in edges:
            ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="#ffd24d", fontsize=7)
        ax.set_title(f"{name} {index}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    if title:
        axes_row[0].set_ylabel(title, fontsize=8)
    handles = [Patch(facecolor=_label_color(v), label=f"{v} {names.get(v, 'label')}") for v in values]
    kinds = sorted({box.get("kind", "box") for box in boxes or []})
    handles += [Patch(facecolor="none", edgecolor=_BOX_COLORS.get(k, "#00ff00"), label=k.replace("_", " "))
                for k in kinds]
    if heat_max > 0:
        handles.append(Patch(facecolor=(1.0, 0.5, 0.0), label="heatmap"))
    if handles:
        axes_row[-1].legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.7)


def _save(fig: Figure, path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
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
