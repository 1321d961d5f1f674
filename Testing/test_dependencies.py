"""TransferSeg/TransferSegModuleLib/dependencies.py: the torch floor, the one-line message where no torch can
run, the places that state the floor, and the library's stand-in for what torch at the floor lacks.
Qt- and Slicer-free, so it runs in any Python with the library (bench/old_torch.sh runs it at the floor)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from TransferSegLib.nets.layers3d import LPPool3d

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ROOT / "TransferSeg" / "TransferSegModuleLib" / "dependencies.py"
# Loaded from its file: the package's __init__ imports Slicer, which dependencies.py does not need.
_spec = importlib.util.spec_from_file_location("dependencies", DEPENDENCIES)
dependencies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dependencies)
MAC_INTEL_LAST_TORCH, TORCH_MINIMUM, TORCH_REQUIREMENT = (
    dependencies.MAC_INTEL_LAST_TORCH, dependencies.TORCH_MINIMUM, dependencies.TORCH_REQUIREMENT)
no_torch_wheel, version_at_least = dependencies.no_torch_wheel, dependencies.version_at_least

#: "torch>=2.2", "torch >= 2.2", "torch (>= 2.2)": a floor written out anywhere
_STATED_FLOOR = re.compile(r"\btorch\s*\(?\s*>=\s*(\d+(?:\.\d+)*)")


def test_torch_version_floor_is_compared_as_numbers():
    assert TORCH_REQUIREMENT == ">=2.2" and TORCH_MINIMUM == (2, 2)
    for version in ("2.2", "2.2.0", "2.2.2", "2.4.1+cu121", "2.2.0+cpu", "2.5.0a0+git1234", "2.10.0", "2.14.1",
                    "3.0", "2.2.0.post1"):
        assert version_at_least(version, TORCH_MINIMUM), version
    for version in ("2.1.2", "2.1.2+cu118", "1.13.1", "2.2.0rc1", "2.2.0.dev20231201", "2", "0.4.1", "", "nightly"):
        assert not version_at_least(version, TORCH_MINIMUM), version


def test_the_floor_is_stated_the_same_everywhere():
    """pyproject.toml keeps its development pin and states the floor in a comment; README.md, the docs and the
    Slicer module say the same floor; bench/old_torch.sh tests that floor."""
    floor = TORCH_REQUIREMENT[2:]
    stated = {}
    files = [ROOT / "pyproject.toml", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "TransferSeg").rglob("*.py"))]
    for path in files:
        for found in _STATED_FLOOR.findall(path.read_text(encoding="utf-8")):
            stated.setdefault(found, []).append(str(path.relative_to(ROOT)))
    assert set(stated) == {floor}, stated
    for must_say in ("pyproject.toml", "README.md", "docs/setup.md"):
        assert must_say in stated[floor], must_say
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8")).group(1)
    assert version_at_least(pin, TORCH_MINIMUM), pin
    script = (ROOT / "bench" / "old_torch.sh").read_text(encoding="utf-8")
    tested = re.search(r"^TORCH=\$\{TORCH:-(\d+)\.(\d+)\.\d+\}", script, re.M)
    assert tested and (int(tested.group(1)), int(tested.group(2))) == TORCH_MINIMUM, tested
    assert "old_torch.sh" in (ROOT / "docs" / "setup.md").read_text(encoding="utf-8")


def test_an_intel_mac_with_numpy_2_gets_one_line_saying_no_torch_runs_there():
    """The last torch for Intel Macs meets the floor but needs NumPy 1.x; Slicer's Python has NumPy 2."""
    assert version_at_least(MAC_INTEL_LAST_TORCH, TORCH_MINIMUM)
    said = no_torch_wheel("Darwin", "x86_64", numpy="2.3.4")
    assert said and "\n" not in said and "Intel Mac" in said and MAC_INTEL_LAST_TORCH in said and "2.3.4" in said
    for numpy in ("1.26.4", "1.24.0"):  # the 2.2 build runs: PyTorchUtils may install it
        assert no_torch_wheel("Darwin", "x86_64", numpy=numpy) is None, numpy
    for system, machine in (("Darwin", "arm64"), ("Linux", "x86_64"), ("Linux", "aarch64"), ("Windows", "AMD64")):
        assert no_torch_wheel(system, machine, numpy="2.3.4") is None, (system, machine)
    assert no_torch_wheel() is None  # this machine (Linux x86_64) has wheels
    numpy = importlib.metadata.version("numpy")  # by default, this Python's NumPy
    said = no_torch_wheel("Darwin", "x86_64")
    assert (numpy in said) if version_at_least(numpy, (2,)) else said is None


def test_torch_status_reads_the_installed_version_without_importing_torch():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('dependencies', {str(DEPENDENCIES)!r})\n"
            "d = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(d)\n"
            "print(d.torch_status(), d.torch_version(), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", importlib.metadata.version("torch"), "False"]


def test_the_lppool3d_for_old_torch_equals_torchs():
    """nn.LPPool3d is new in torch 2.3; below it the converter builds layers3d.LPPool3d instead."""
    x = torch.randn(2, 3, 7, 9, 8, generator=torch.Generator().manual_seed(0))
    # a one-slice-deep kernel is nn.LPPool2d on every slice, in any torch
    flat = LPPool3d(2, (1, 3, 2), stride=(1, 2, 2), ceil_mode=True)(x)
    slices = nn.LPPool2d(2, (3, 2), stride=2, ceil_mode=True)(x.transpose(1, 2).flatten(0, 1))
    torch.testing.assert_close(flat, slices.unflatten(0, (2, 7)).transpose(1, 2))
    # every window's p-norm, summed by hand over unfolded windows (any torch)
    for norm_type, kernel, stride in ((2, (3, 3, 3), (3, 3, 3)), (1.5, (1, 3, 2), (1, 2, 2)), (3, (2, 2, 3), (1, 1, 1))):
        windows = x.abs().unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).unfold(4, kernel[2], stride[2])
        by_hand = windows.pow(norm_type).sum(dim=(-3, -2, -1)).pow(1.0 / norm_type)
        torch.testing.assert_close(LPPool3d(norm_type, kernel, stride=stride)(x.abs()), by_hand)
        if hasattr(nn, "LPPool3d"):  # and torch's own, where this torch has it (2.3 and later)
            torch.testing.assert_close(LPPool3d(norm_type, kernel, stride=stride)(x), nn.LPPool3d(
                norm_type, kernel, stride=stride)(x), equal_nan=True)
