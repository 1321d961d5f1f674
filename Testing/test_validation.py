"""Every bad input gets a TransferSegError a clinician can act on, and the CLI turns it into one line + exit 2."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import sha256, write_image

from TransferSegLib.cli import main
from TransferSegLib.io import available_memory_bytes, load_volume
from TransferSegLib.volume import TransferSegError, Volume

ARRAY = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)


def _nrrd_with_header(tmp_path, name, replace=None, array=ARRAY):
    """A raw NRRD whose header line `old` is replaced by `new` (bad geometry that ITK would not write)."""
    good = write_image(array, tmp_path / "good.nrrd", spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    header, data = good.read_bytes().split(b"\n\n", 1)
    for old, new in (replace or {}).items():
        assert old.encode() in header, old
        header = header.replace(old.encode(), new.encode())
    path = tmp_path / name
    path.write_bytes(header + b"\n\n" + data)
    return path


def _mha_with_spacing(tmp_path, spacing_text):
    good = write_image(ARRAY, tmp_path / "good.mha", spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    raw = good.read_bytes()
    assert b"ElementSpacing = 1 1 1" in raw
    path = tmp_path / "bad_spacing.mha"
    path.write_bytes(raw.replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing_text}".encode()))
    return path


def _truncated(tmp_path, suffix, compress):
    good = write_image(ARRAY, tmp_path / f"good{suffix}", compress=compress)
    raw = good.read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path


CASES = {
    "missing file": (lambda t: t / "nope.nii.gz", "no such file"),
    "empty file": (lambda t: (t / "empty.nii.gz").write_bytes(b"") or t / "empty.nii.gz", "empty"),
    "text file named .nii.gz": (
        lambda t: Path(gzip.open(t / "notes.nii.gz", "wb").write(b"patient notes\n" * 40) and t / "notes.nii.gz"),
        "not a readable"),
    "text file named .nrrd": (lambda t: (t / "x.nrrd").write_text("hello\n" * 30, encoding="utf-8") and t / "x.nrrd", "not a readable"),
    "unsupported type": (lambda t: (t / "photo.png").write_bytes(b"\x89PNG....") and t / "photo.png",
                         "unsupported file type"),
    "single DICOM file": (lambda t: (t / "IM0001.dcm").write_bytes(b"\0" * 200) and t / "IM0001.dcm",
                          "give the folder"),
    "folder without DICOM": (lambda t: (t / "empty_dir").mkdir() or t / "empty_dir", "no DICOM image series"),
    "truncated nii.gz": (lambda t: _truncated(t, ".nii.gz", True), "truncated"),
    "truncated raw nrrd": (lambda t: _truncated(t, ".nrrd", False), "truncated"),
    "truncated gzip nrrd": (lambda t: _truncated(t, ".nrrd", True), "truncated"),
    "truncated mha": (lambda t: _truncated(t, ".mha", False), "truncated"),
    "2D image": (lambda t: write_image(ARRAY[0], t / "slice.nii.gz", spacing_ijk=(1, 1), origin_lps=(0, 0),
                                       direction_lps=np.eye(2)), r"input is 2D \(9×10\)"),
    "4D image": (lambda t: Path(sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ARRAY)] * 3),
                                                str(t / "t.nii.gz")) or t / "t.nii.gz"), r"4D .*3 volumes"),
    "RGB image": (lambda t: Path(sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8),
                                                                        isVector=True), str(t / "rgb.nrrd"))
                                 or t / "rgb.nrrd"), "3 components per voxel"),
    "zero-size axis": (lambda t: _detached_header(t, "sizes: 10 0 8"), "zero-size axis"),
    "NaN voxels": (lambda t: write_image(np.where(ARRAY > 2.0, np.nan, ARRAY), t / "nan.nrrd"), "NaN or infinite"),
    "inf voxels": (lambda t: write_image(np.where(ARRAY > 2.0, np.inf, ARRAY), t / "inf.mha"), "NaN or infinite"),
    "zero spacing": (lambda t: _nrrd_with_header(t, "zero.nrrd", {"(0,0,1)": "(0,0,0)"}), "zero, negative"),
    "negative spacing": (lambda t: _mha_with_spacing(t, "1 -2 1"), "zero, negative"),
    "non-finite spacing": (lambda t: _mha_with_spacing(t, "nan 1 1"), "zero, negative or not a number"),
    "singular direction": (lambda t: _nrrd_with_header(t, "singular.nrrd", {"(0,0,1)": "(0,1,0)"}), "singular"),
    "too large for memory": (lambda t: _detached_header(t, "sizes: 5000 5000 5000"), "GiB of memory is free"),
}


def _detached_header(tmp_path, sizes_line):
    """A .nhdr header with an empty data file: header checks must answer before any voxel is read."""
    good = write_image(ARRAY, tmp_path / "good.nrrd", compress=False)
    header = good.read_bytes().split(b"\n\n", 1)[0].decode()
    header = header.replace("sizes: 10 9 8", sizes_line).replace("encoding: raw", "encoding: raw\ndata file: data.raw")
    (tmp_path / "data.raw").write_bytes(b"")
    path = tmp_path / "header.nhdr"
    path.write_text(header + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error(tmp_path, case):
    make, message = CASES[case]
    path = make(tmp_path)
    before = sha256(path) if path.is_file() else None
    with pytest.raises(TransferSegError, match=message) as err:
        load_volume(path)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text and "itk::" not in text.lower()
    if before is not None:
        assert sha256(path) == before  # the input is never modified


def test_the_too_large_case_really_exceeds_this_machine():
    voxels = 5000**3
    assert voxels * 8 > available_memory_bytes()  # the case above really exceeds this machine's memory


def test_volume_constructor_validates_arrays_from_slicer_nodes():
    with pytest.raises(TransferSegError, match=r"input is 2D \(4×5\)"):
        Volume(np.zeros((4, 5)))
    with pytest.raises(TransferSegError, match="zero-size axis"):
        Volume(np.zeros((0, 5, 6)))
    with pytest.raises(TransferSegError, match="zero, negative"):
        Volume(np.zeros((2, 3, 4)), spacing=(1.0, -1.0, 1.0))
    with pytest.raises(TransferSegError, match="singular"):
        Volume(np.zeros((2, 3, 4)), directions=[[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    with pytest.raises(TransferSegError, match="NaN or infinite"):
        Volume(np.full((2, 3, 4), np.nan)).check_finite()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    result = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "info", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferseg: error: ") and str(bad) in lines[0], result.stderr


def test_cli_info_and_version(tmp_path, capsys):
    path = write_image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), tmp_path / "v.nrrd",
                       spacing_ijk=(0.7, 0.7, 2.5), direction_lps=np.eye(3))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "6 × 5 × 4 voxels" in out and "0.7 × 0.7 × 2.5 mm" in out
    assert "LPS axial" in out and "0 … 119" in out and "MiB" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "transferseg 0." in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.nrrd")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "transferseg"
    assert script.exists(), "the `transferseg` console command is missing; run `make test` to install the package"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0
    for command in ("info", "phantom", "demo"):
        assert command in result.stdout
