"""The module's results as Slicer's views draw them, rendered offscreen with trame-slicer.

The scene is built by the module's own logic (real child-process runs of the shipped default CT
model, a multi-view model and the shipped DBT detector); trame-slicer renders the axial, coronal
and sagittal slice views, centred by a click on a findings-table row (the module's jump), and the
3D view of the segmentation's closed surface (Show 3D) to PNG with Slicer's own displayable
managers; the findings tables' rows are drawn as text.  The test checks that the overlays and the
surface really reach the pixels; run as a script it also writes the README / extension
screenshot::

    python Testing/test_slicer_render.py OUTPUT_FOLDER [--multiview-model CARD] [--screenshot PNG]
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

    @property
    def scene(self):
        return self.app.scene

    def snapshot(self, orientation: str, path: Path, center_ras=None) -> np.ndarray:
        """Render one view (centred on ``center_ras`` if given) to ``path``; returns its RGB pixels."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        view = self.views[orientation]
        view.fit_view_to_content()
        if center_ras is not None and orientation != "3d":
            view.get_view_node().JumpSliceByCentering(*[float(v) for v in center_ras])
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

    out.mkdir(parents=True, exist_ok=True)
    r = renderer or Renderer()
    logic = L.TransferSegLogic(r.scene)
    shots = {}

    def shoot(name, orientation, centre):
        path = out / f"{name}.png"
        shots[name] = (path, r.snapshot(orientation, path, centre))

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
    fused = job.outputs
    # Show 3D: the segmentation's closed surface in the 3D view
    assert logic.show3D(fused.segmentation)
    shoot("ct-3d", "3d", None)  # fitted to the surface, seen from the front
    logic.show3D(fused.segmentation, False)

    # multi-view: each view network's outlines and the views' disagreement over the input
    if multiview_model is not None:
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
    shots["_outputs"] = job.outputs
    return shots


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--multiview-model", default=None, help="multi-view model card (e.g. the shipped VFN)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs the models (needs torch)")
    parser.add_argument("--screenshot", type=Path, default=None, help="also write a montage here")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
