"""The module's results as Slicer's views draw them, rendered offscreen with trame-slicer.

The scene is built by the module's own logic (real child-process runs of the shipped default CT
model, a multi-view model and the shipped DBT detector); trame-slicer renders the axial, coronal
and sagittal slice views, centred by a click on a findings-table row (the module's jump), and the
3D view of the segmentation's closed surface (Show 3D) to PNG with Slicer's own displayable
managers; the findings tables' rows are drawn as text.  The test checks that the overlays and the
surface really reach the pixels, and composes the module's screenshot (the views beside the findings
tables, drawn with matplotlib from the table nodes' cells: trame-slicer renders VTK views, not Qt
widgets).  Run as a script (about a minute and a half: two model runs) it writes the screenshots::

    python Testing/test_slicer_render.py OUTPUT_FOLDER [--multiview-model CARD] [--screenshot PNG]
                                         [--slicer-screenshot Resources/Screenshots/slicer.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "TransferSeg"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# trame-slicer[standalone] pins the slicer-core it was built against (with slicer-layer-dm)
trame_views = pytest.importorskip("trame_slicer.views", exc_type=ImportError,
                                  reason="needs trame-slicer[standalone] to render the slice views")


class Renderer:
    """A Slicer application core (trame-slicer) with three offscreen slice views."""

    def __init__(self, size=(360, 360)):
        import slicer
        from trame_slicer.core import SlicerApp

        self.app = SlicerApp()
        slicer.mrmlScene = self.app.scene
        self.app.view_manager.register_factory(trame_views.DirectViewFactory(do_render_offscreen=True))
        definitions = trame_views.ViewLayoutDefinition
        self.views = {name: self.app.view_manager.create_view(make())
                      for name, make in (("axial", definitions.axial_view), ("coronal", definitions.coronal_view),
                                         ("sagittal", definitions.sagittal_view), ("3d", definitions.threed_view))}
        for view in self.views.values():
            view.render_window().SetSize(*size)
        # Slicer draws translucent surfaces with depth peeling, which needs alpha bit planes and no multisampling:
        # without them an offscreen window leaves a surface of 3D opacity below 1 out altogether
        self.views["3d"].render_window().SetAlphaBitPlanes(1)
        self.views["3d"].render_window().SetMultiSamples(0)

    @property
    def scene(self):
        return self.app.scene

    def snapshot(self, orientation: str, path: Path, center_ras=None, zoom: float = 1.0) -> np.ndarray:
        """Render one view (centred on ``center_ras`` if given, closer by ``zoom``: a slice view's field of
        view divided by it, the 3D view's camera zoomed) to ``path``; returns its RGB pixels."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        view = self.views[orientation]
        view.fit_view_to_content()
        if orientation == "3d" and zoom != 1.0:
            view.render_window().GetRenderers().GetFirstRenderer().GetActiveCamera().Zoom(zoom)
        elif orientation != "3d":
            slice_node = view.get_view_node()
            if zoom != 1.0:
                fov = slice_node.GetFieldOfView()
                slice_node.SetFieldOfView(fov[0] / zoom, fov[1] / zoom, fov[2])
            if center_ras is not None:
                slice_node.JumpSliceByCentering(*[float(v) for v in center_ras])
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.SetInputBufferTypeToRGB()  # what the screen shows, not the layers' alpha
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1]


def _centre_of(logic_module, seg_node, reference_node, label: int):
    """RAS centre of the voxels of one label of a segmentation (to put the slices through it)."""
    from TransferSegModuleLib.logic import TransferSegLogic, volume_from_node

    labels = TransferSegLogic(reference_node.GetScene()).labelmapArray(seg_node, reference_node)
    kji = np.argwhere(labels == label)
    if not len(kji):
        kji = np.argwhere(labels > 0)
    if not len(kji):
        return None
    return volume_from_node(reference_node).ijk_to_ras_points(kji.mean(axis=0)[None])[0]


def table_png(table, path: Path, title: str) -> Path:
    """The rows of a findings table node as a small PNG (the module shows them in a qMRMLTableView)."""
    from PIL import Image, ImageDraw, ImageFont

    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = [[table.GetCellText(r, c) for c in range(len(columns))] for r in range(table.GetNumberOfRows())]
    widths = [max(len(text) for text in [name] + [row[c] for row in rows]) + 2 for c, name in enumerate(columns)]
    lines = [title, "".join(name.ljust(w) for name, w in zip(columns, widths))]
    lines += ["".join(text.ljust(w) for text, w in zip(row, widths)) for row in rows[:16]]
    try:  # a monospaced font keeps the columns aligned; Pillow's own font where it is missing
        font = ImageFont.truetype("DejaVuSansMono.ttf", 12)
    except OSError:
        font = ImageFont.load_default()
    image = Image.new("RGB", (12 + 8 * max(len(line) for line in lines), 14 + 16 * len(lines)), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        draw.text((6, 6 + 16 * n), line, fill=(20, 20, 20) if n != 1 else (30, 60, 160), font=font)
    image.save(path)
    return path


def render_all(out: Path, multiview_model, python: str = sys.executable, renderer: Renderer | None = None) -> dict:
    """Run the three models through the module's logic and render their slice views; {name: (path, pixels)}."""
    from TransferSegLib.phantoms import ct_phantom, dbt_phantom
    from TransferSegModuleLib import logic as L
    from TransferSegModuleLib.results import is_finding

    out.mkdir(parents=True, exist_ok=True)
    r = renderer or Renderer()
    logic = L.TransferSegLogic(r.scene)
    shots = {}

    def shoot(name, orientation, centre, zoom=1.0):
        path = out / f"{name}.png"
        shots[name] = (path, r.snapshot(orientation, path, centre, zoom))

    # CT, default model: the fused segmentation in the three views
    volume, _ = ct_phantom(5, shape=(40, 96, 96))
    ct = L.add_volume_node(r.scene, volume, "CT")
    ct.CreateDefaultDisplayNodes()
    job = logic.startSegmentation(ct, "ct-liver-tumor-unet3d", device="cpu", python=python)
    assert job.wait(timeout=300) == job.DONE, job.message
    shots["_ct_status"] = job.status
    table = job.outputs.findings
    shots["ct-findings-table"] = (table_png(table, out / "ct-findings-table.png", job.status), None)
    # a click on the largest tumor's row (the liver is row 0) centres the views on it
    tumor_rows = [r for r in range(table.GetNumberOfRows()) if table.GetCellText(r, 1) == "liver tumor"]
    centre = logic.jumpToRow(table, tumor_rows[0]) if tumor_rows else _centre_of(L, job.outputs.segmentation, ct, 2)
    # trame-slicer's offscreen views blend a segment's fill with black instead of the image below it
    # (the desktop blends with the image); outlines show the same segmentation without that artefact
    display = job.outputs.segmentation.GetDisplayNode()
    display.SetVisibility2DFill(False)
    display.SetSliceIntersectionThickness(2)
    for orientation in ("axial", "coronal", "sagittal"):
        shoot(f"ct-{orientation}", orientation, centre)
    shots["_ct_table"] = table
    fused = job.outputs
    _shoot_close_and_3d(shoot, logic, fused, [s["name"] for s in job.card["labels"] if not is_finding(s)], centre)
    if multiview_model is not None:
        _shoot_multiview(shoot, logic, ct, multiview_model, python, centre, fused)

    # DBT: the lesion heatmap (hot colour map) and the detections as points labelled with confidence
    fused.segmentation.GetDisplayNode().SetVisibility(False)
    volume, _ = dbt_phantom(3, shape=(24, 192, 144), masses=2)
    dbt = L.add_volume_node(r.scene, volume, "DBT")
    dbt.CreateDefaultDisplayNodes()
    job = logic.startSegmentation(dbt, "dbt-lesion-ahnet", device="cpu", python=python)
    assert job.wait(timeout=300) == job.DONE, job.message
    logic.setOverlay(job.outputs.heatmap, True, 0.5)
    shots["_dbt_status"] = job.status
    shots["dbt-detections-table"] = (table_png(job.outputs.findings, out / "dbt-detections-table.png", job.status),
                                     None)
    top = logic.jumpToRow(job.outputs.findings, 0)  # a click on the most confident detection's row
    shoot("dbt-axial-heatmap-detections", "axial", top)
    shoot("dbt-sagittal-heatmap-detections", "sagittal", top)
    points = job.outputs.detections.GetDisplayNode()
    scale = points.GetTextScale()
    points.SetTextScale(1.5 * scale)  # the module's screenshot shows the views smaller: the confidences stay legible
    shoot("dbt-axial-zoomed", "axial", top, zoom=1.3)
    shoot("dbt-sagittal-zoomed", "sagittal", top, zoom=1.3)
    points.SetTextScale(scale)
    shots["_outputs"] = job.outputs
    return shots


def _shoot_close_and_3d(shoot, logic, outputs, organ_names: list, centre) -> None:
    """The CT views of the module's screenshot: closer, on the tumor, the tumors filled opaque (no blending to go
    wrong) and the organs outlined; then Show 3D: the closed surface, opaque and with the organs see-through (their
    3D opacity, as the Segmentations module sets it) so that the tumors inside show."""
    display, segments = outputs.segmentation.GetDisplayNode(), outputs.segmentation.GetSegmentation()
    organs = [segments.GetSegmentIdBySegmentName(name) for name in organ_names]
    display.SetSliceIntersectionThickness(3)
    display.SetVisibility2DFill(True)
    display.SetOpacity2DFill(1.0)
    for organ in organs:
        display.SetSegmentVisibility2DFill(organ, False)
    for orientation in ("axial", "coronal"):
        shoot(f"ct-{orientation}-zoomed", orientation, centre, zoom=1.6)
    display.SetVisibility2DFill(False)
    display.SetSliceIntersectionThickness(2)
    assert logic.show3D(outputs.segmentation)
    shoot("ct-3d", "3d", None)  # fitted to the surface, seen from the front
    for organ in organs:
        display.SetSegmentOpacity3D(organ, 0.4)
    shoot("ct-3d-see-through", "3d", None, zoom=1.15)
    for organ in organs:
        display.SetSegmentOpacity3D(organ, 1.0)
    logic.show3D(outputs.segmentation, False)


def _shoot_multiview(shoot, logic, ct, multiview_model, python: str, centre, fused) -> None:
    """A multi-view model's run: one view network's outlines over the views' disagreement."""
    fused.segmentation.GetDisplayNode().SetVisibility(False)
    job = logic.startSegmentation(ct, str(multiview_model), device="cpu", python=python)
    assert job.wait(timeout=600) == job.DONE, job.message
    mv = job.outputs
    mv.segmentation.GetDisplayNode().SetVisibility(False)
    for view in ("coronal", "sagittal"):  # one per-view overlay
        logic.setViewOverlayVisible(mv, view, False)
    logic.setOverlay(mv.disagreement, True, 0.6)
    shoot("multiview-axial-view-and-disagreement", "axial", centre)
    logic.setOverlay(mv.disagreement, False, 0.6)
    for node in mv.views.values():
        node.GetDisplayNode().SetVisibility(False)
    fused.segmentation.GetDisplayNode().SetVisibility(True)


# --- the module's screenshot: views and findings tables in one figure --------------------------------------
#: the findings-table columns the screenshot shows (the panel's table view scrolls to the others)
CT_TABLE_COLUMNS = ("Finding", "Volume (mL)", "Longest axial (mm)", "Perpendicular (mm)", "R", "A", "S",
                    "Mean (HU)", "To surface (mm)")
DBT_TABLE_COLUMNS = ("Finding", "Confidence", "Size (mm)", "Depth (mm)", "R", "A", "S", "To nipple (mm)")


def table_cells(table, columns, max_rows: int) -> tuple:
    """``(headers, rows, hidden)`` of a findings table node: the cells of those of ``columns`` it has (a column
    empty in every row left out), its first ``max_rows`` rows and how many rows are left out."""
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = table.GetNumberOfRows()
    shown = [names.index(name) for name in columns if name in names
             and any(table.GetCellText(r, names.index(name)).strip() for r in range(rows))]
    cells = [[table.GetCellText(r, c) for c in shown] for r in range(min(rows, max_rows))]
    return [names[c] for c in shown], cells, max(0, rows - max_rows)


def _draw_table(ax, table, columns, max_rows: int, font_size: float) -> None:
    headers, cells, hidden = table_cells(table, columns, max_rows)
    ax.axis("off")
    cells = cells or [["(none)"] + [""] * (len(headers) - 1)]
    if hidden:  # the table view would scroll: say so in a last row
        cells.append([f"+ {hidden} more"] + [""] * (len(headers) - 1))
    headers = [name.replace(" (", "\n(") for name in headers]  # units on a second line
    drawn = ax.table(cellText=cells, colLabels=headers, loc="upper center", cellLoc="right", colLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(font_size)
    drawn.scale(1.0, 1.3)
    for (row, column), cell in drawn.get_celld().items():
        cell.set_edgecolor("#c8c8c8")
        if row == 0:
            cell.set_height(cell.get_height() * 1.7)
            cell.set_facecolor("#e8ecf4")
            cell.set_text_props(weight="bold")
        elif column == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.04
        if hidden and row == len(cells):
            cell.set_text_props(color="#666666", style="italic")
    drawn.auto_set_column_width(list(range(len(headers))))


def compose_slicer_screenshot(shots: dict, path: Path) -> Path:
    """The module's screenshot from :func:`render_all`'s renders: a CT run (the slice views on its largest
    tumor, the 3D view of the closed surface, the findings table) and a DBT run (its heatmap and detections,
    the detections table), each under its status line.  A PNG of at most a few hundred KB."""
    # matplotlib and Pillow: needed by this screenshot only, not by the module or the render test's checks
    import matplotlib
    from PIL import Image

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure = plt.figure(figsize=(14.0, 6.9), dpi=100, facecolor="white")
    ct, dbt = figure.subfigures(1, 2, width_ratios=[3.05, 2.0], wspace=0.01)
    for part, title, status in ((ct, "CT: liver and liver tumor (ct-liver-tumor-unet3d)", shots["_ct_status"]),
                                (dbt, "DBT: lesion heatmap and detections (dbt-lesion-ahnet)", shots["_dbt_status"])):
        part.suptitle(f"{title}\n{status}", fontsize=12.5, x=0.015, ha="left", y=0.995, va="top")
    tiles = {ct: [("ct-axial-zoomed", "Axial, on liver tumor 1 (row clicked)"), ("ct-coronal-zoomed", "Coronal"),
                  ("ct-3d-see-through", "3D view (Show 3D), liver see-through")],
             dbt: [("dbt-axial-zoomed", "Axial: heatmap and detections"), ("dbt-sagittal-zoomed", "Sagittal")]}
    for part, table, columns in ((ct, shots["_ct_table"], CT_TABLE_COLUMNS),
                                 (dbt, shots["_outputs"].findings, DBT_TABLE_COLUMNS)):
        grid = part.add_gridspec(2, len(tiles[part]), height_ratios=[1.0, 0.83], left=0.01, right=0.99,
                                 top=0.865, bottom=0.0, hspace=0.1, wspace=0.03)
        for n, (name, caption) in enumerate(tiles[part]):
            ax = part.add_subplot(grid[0, n])
            ax.imshow(Image.open(shots[name][0]).convert("RGB"))
            ax.set_title(caption, fontsize=11, pad=4)
            ax.set_xticks([])
            ax.set_yticks([])
        _draw_table(part.add_subplot(grid[1, :]), table, columns, max_rows=8, font_size=10.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor="white")
    plt.close(figure)
    # 256 colours (a median cut over the whole figure): the renders' noise keeps a full-colour PNG large
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)
    return path


def montage(shots: dict, names: list, path: Path, columns: int = 3) -> Path:
    """Tile renders into one PNG (the README / extension screenshot)."""
    from PIL import Image

    tiles = [Image.open(shots[name][0]).convert("RGB") for name in names]
    w, h = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (w * columns + 4 * (columns - 1), h * rows + 4 * (rows - 1)), (40, 40, 40))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % columns) * (w + 4), (n // columns) * (h + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


# --- the test ------------------------------------------------------------------------------------
def _near(pixels: np.ndarray, rgb, tolerance: float = 60.0) -> int:
    return int((np.abs(pixels.astype(float) - np.asarray(rgb, float) * 255).sum(axis=-1) < tolerance).sum())


def test_slice_views_show_segmentation_heatmap_and_detections(tmp_path):
    import json

    shots = render_all(tmp_path, multiview_model=None)
    card = json.loads((ROOT / "Resources" / "models" / "ct-liver-tumor-unet3d.json").read_text(encoding="utf-8"))
    liver = np.asarray(card["labels"][0]["color"])
    for orientation in ("axial", "coronal", "sagittal"):
        pixels = shots[f"ct-{orientation}"][1]
        assert pixels.std() > 10, f"{orientation}: the view is blank"
        # the liver's outline is drawn in its own colour, fully opaque
        assert _near(pixels, liver) > 50, f"{orientation}: no liver outline in the slice view"
    heat = shots["dbt-axial-heatmap-detections"][1].astype(int)
    hot = (heat[..., 0] - heat[..., 2] > 80) & (heat[..., 0] > 150)  # red/orange/yellow, not grey
    assert hot.sum() > 20, "the heatmap does not reach the slice view"
    outputs = shots["_outputs"]
    assert outputs.detections.GetNumberOfControlPoints() > 0
    assert outputs.findings.GetNumberOfRows() == outputs.detections.GetNumberOfControlPoints()
    # Show 3D: the surface is lit in the liver's colour (shaded: a hue, not an exact value)
    surface = shots["ct-3d"][1].astype(int)
    reddish = (surface[..., 0] - surface[..., 2] > 40) & (surface[..., 0] > 80)
    assert reddish.sum() > 500, "no liver surface in the 3D view"
    assert shots["ct-findings-table"][0].is_file() and shots["dbt-detections-table"][0].is_file()
    # the liver see-through (its 3D opacity below 1: depth peeling in the offscreen window) and the tumors in it
    through = shots["ct-3d-see-through"][1].astype(int)
    assert ((through[..., 0] - through[..., 2] > 40) & (through[..., 0] > 80)).sum() > 500, "no see-through liver"
    greenish = (through[..., 1] - through[..., 0] > 10) & (through[..., 1] > 60)
    # the opaque liver hides its tumors: only the tips of those that reach its surface show (looked at: the
    # default 3.2.0's labels on this phantom show 40 such pixels against 642 seen through; an opacity that did
    # not apply would show about as many as the see-through view)
    hidden = (surface[..., 1] - surface[..., 0] > 10) & (surface[..., 1] > 60)
    assert greenish.sum() > 50 and hidden.sum() < 0.15 * greenish.sum(), (greenish.sum(), hidden.sum())
    # the module's screenshot composes: views and both findings tables, small enough for the README
    from PIL import Image  # Pillow comes with matplotlib, which the screenshot needs

    sheet = compose_slicer_screenshot(shots, tmp_path / "slicer.png")
    assert sheet.stat().st_size <= 400_000 and Image.open(sheet).size == (1400, 690)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--multiview-model", default=None, help="multi-view model card (e.g. the shipped VFN)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs the models (needs torch)")
    parser.add_argument("--screenshot", type=Path, default=None, help="also write a montage here")
    parser.add_argument("--slicer-screenshot", type=Path, default=None,
                        help="also write the module's screenshot here (views and findings tables)")
    args = parser.parse_args(argv)
    shots = render_all(args.output, args.multiview_model, python=args.python)
    for name, (path, _) in ((k, v) for k, v in shots.items() if not k.startswith("_")):
        print(path)
    print(shots["_ct_status"], shots["_dbt_status"], sep="\n")
    if args.screenshot:
        names = ["ct-axial", "ct-coronal", "ct-sagittal"]
        names += [n for n in ("multiview-axial-view-and-disagreement",) if n in shots]
        names += ["dbt-axial-heatmap-detections", "dbt-sagittal-heatmap-detections"]
        print(montage(shots, names[:6], args.screenshot))
    if args.slicer_screenshot:
        print(compose_slicer_screenshot(shots, args.slicer_screenshot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
