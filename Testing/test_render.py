"""Tests for TransferSegLib.render: anatomical orientation, aspect ratio, overlays, atomic PNG writes."""
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from scipy import ndimage

from TransferSegLib import phantoms, render
from TransferSegLib.volume import TransferSegError, Volume

LPS = np.diag([-1.0, -1.0, 1.0])      # i → left, j → posterior, k → superior (DICOM axial)
RAS = np.eye(3)


@pytest.fixture(scope="module")
def ct():
    return phantoms.ct_phantom(2, (24, 64, 64), tumors=2)


def _marked_volume(directions):
    """Background 0 with a bright block on the patient's right-anterior-superior side."""
    volume = Volume(np.zeros((20, 30, 40), dtype=np.float32), spacing=(3.0, 1.0, 1.0), directions=directions)
    voxels = np.argwhere(np.ones(volume.shape, dtype=bool))
    ras = volume.ijk_to_ras_points(voxels)
    centre = ras.mean(axis=0)
    marker = (ras[:, 0] > centre[0] + 5) & (ras[:, 1] > centre[1] + 3) & (ras[:, 2] > centre[2] + 10)
    volume.array[tuple(voxels[marker].T)] = 1.0
    return volume


@pytest.mark.parametrize("directions", [LPS, RAS, np.diag([1.0, -1.0, -1.0])], ids=["LPS", "RAS", "RPI"])
def test_views_are_anatomical_and_radiological(directions):
    volume = _marked_volume(directions)
    planes = {}
    for name, normal, row_ax, col_ax, flip_r, flip_c, _ in render.anatomical_views(volume):
        index = int(np.argwhere(volume.array > 0).mean(axis=0)[normal].round())
        planes[name] = render._plane(volume.array, normal, index, row_ax, col_ax, flip_r, flip_c)
    rows, cols = planes["axial"].shape
    marked = np.argwhere(planes["axial"] > 0).mean(axis=0)
    assert marked[1] < cols / 2          # patient's right on the image's left
    assert marked[0] < rows / 2          # anterior at the top
    marked = np.argwhere(planes["coronal"] > 0).mean(axis=0)
    assert planes["coronal"].shape == (20, 40)
    assert marked[1] < planes["coronal"].shape[1] / 2 and marked[0] < planes["coronal"].shape[0] / 2  # right, superior
    marked = np.argwhere(planes["sagittal"] > 0).mean(axis=0)
    assert marked[1] < planes["sagittal"].shape[1] / 2 and marked[0] < planes["sagittal"].shape[0] / 2  # anterior, superior


def test_a_slice_keeps_its_physical_aspect_ratio():
    volume = Volume(np.random.default_rng(0).normal(size=(10, 32, 32)).astype(np.float32),
                    spacing=(5.0, 0.8, 0.8), directions=LPS)
    fig = Figure()
    axes = fig.subplots(1, 3)
    render._draw_case(axes, volume)
    assert axes[0].get_aspect() == pytest.approx(1.0)            # axial: 0.8 × 0.8 mm
    assert axes[1].get_aspect() == pytest.approx(5.0 / 0.8)      # coronal: 5 mm rows, 0.8 mm columns
    assert axes[2].get_aspect() == pytest.approx(5.0 / 0.8)


def test_the_window_is_a_ct_window_for_hu_and_a_percentile_window_otherwise(ct):
    volume, _ = ct
    assert render._auto_window(volume.array) == render.CT_WINDOW
    lo, hi = render._auto_window(np.linspace(0.0, 1.0, 1000).reshape(10, 10, 10))
    assert 0.0 <= lo < 0.05 and 0.95 < hi <= 1.0


def _png(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    return image[..., :3]


def test_overview_png_exists_is_not_blank_and_leaves_no_temporary_file(ct, tmp_path):
    volume, labels = ct
    path = render.save_overview_png(volume, tmp_path / "ct.png", labels=labels, title="ct")
    assert path == tmp_path / "ct.png"
    assert [p.name for p in tmp_path.iterdir()] == ["ct.png"]
    pixels = _png(path)
    assert pixels.std() > 0.1


def test_overlays_change_the_picture(ct, tmp_path):
    volume, labels = ct
    heat = np.zeros(volume.shape, dtype=np.float32)
    centre = tuple(np.argwhere(labels == 1).mean(axis=0).round().astype(int))
    heat[centre] = 1.0
    heat = ndimage.gaussian_filter(heat, 3.0)
    box = {"kind": "mass", "box_kji": [centre[0] - 2, centre[1] - 5, centre[2] - 5,
                                       centre[0] + 3, centre[1] + 6, centre[2] + 6]}
    render.save_overview_png(volume, tmp_path / "plain.png")
    render.save_overview_png(volume, tmp_path / "labels.png", labels=labels)
    render.save_overview_png(volume, tmp_path / "heat.png", heatmap=heat)
    render.save_overview_png(volume, tmp_path / "box.png", boxes=[box])
    plain = _png(tmp_path / "plain.png")
    for name in ("labels", "heat", "box"):
        other = _png(tmp_path / f"{name}.png")
        assert other.shape == plain.shape
        changed = np.any(np.abs(other - plain) > 0.05, axis=-1).mean()
        assert changed > 0.002, name
    # label colours: liver reddish, tumor green, as the legend says
    assert render.LABEL_COLORS[1][0] > render.LABEL_COLORS[1][1]
    assert render.LABEL_COLORS[2][1] > render.LABEL_COLORS[2][0]


def test_gallery_has_one_row_per_case(ct, tmp_path):
    volume, labels = ct
    render.save_gallery_png([{"volume": volume, "labels": labels, "title": "a"}], tmp_path / "one.png")
    render.save_gallery_png([{"volume": volume, "labels": labels, "title": "a"},
                             {"volume": volume, "title": "b"}], tmp_path / "two.png")
    one, two = _png(tmp_path / "one.png"), _png(tmp_path / "two.png")
    assert two.shape[0] == pytest.approx(2 * one.shape[0], rel=0.05)
    assert two.shape[1] == one.shape[1]


def test_a_failed_render_writes_nothing(ct, tmp_path):
    volume, labels = ct
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(TransferSegError, match="same shape"):
        render.save_overview_png(volume, target, labels=labels[:-1])
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(TransferSegError, match="at least one case"):
        render.save_gallery_png([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
