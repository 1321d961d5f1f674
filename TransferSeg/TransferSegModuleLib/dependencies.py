"""What TransferSeg needs in Slicer's Python beyond what Slicer bundles (numpy, scipy, SimpleITK).

Qt-free: it only says what is missing or too old.  The GUI asks the user and installs on first
use, never at import time: torch through the PyTorch extension (``PyTorchUtils``, which picks the
build that fits the computer's GPU driver), everything else through ``slicer.util.pip_install``.
Nothing here imports torch: importing it in Slicer's GUI process takes seconds, and on Windows an
imported torch holds its files, so an upgrade could not replace them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import re
from pathlib import Path

#: torch floor, not a pin: the oldest torch the test suite passes on (bench/old_torch.sh runs it). The one
#: place it is set: pyproject.toml, README.md and docs/setup.md say the same (Testing/test_dependencies.py).
TORCH_MINIMUM = (2, 2)
TORCH_REQUIREMENT = ">=" + ".".join(map(str, TORCH_MINIMUM))
#: the last torch built for Intel Macs; built against NumPy 1.x, it cannot exchange arrays with NumPy 2
MAC_INTEL_LAST_TORCH = "2.2.2"
#: import name -> pip requirement; the child process needs the first four, the GUI psutil (Cancel)
PIP_PACKAGES = {
    "safetensors": "safetensors>=0.4",
    "slicerio": "slicerio>=1.1",
    "matplotlib": "matplotlib>=3.7",
    "tqdm": "tqdm",
    "psutil": "psutil>=5.9",
}
#: what :func:`torch_status` says
TORCH_MISSING, TORCH_OUTDATED, TORCH_OK = "missing", "outdated", "ok"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_installed() -> bool:
    """torch is importable (at any version; :func:`torch_status` checks the version)."""
    return _installed("torch")


def torch_version() -> str | None:
    """The installed torch's version, without importing it: from its package metadata, else from
    the ``torch/version.py`` it ships (a source build has no metadata); None if not installed."""
    importlib.invalidate_caches()  # an install earlier in this session must be seen
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.M)
        if match:
            return match.group(1)
    return None


def version_at_least(version: str, minimum: tuple) -> bool:
    """Whether a version string (PEP 440, e.g. ``"2.4.0+cu121"``) is at least ``minimum``, numerically.

    A pre-release of the minimum itself (``"2.4.0rc1"``) is below it; a local build tag
    (``"+cu121"``) does not count.  An unreadable version is not enough.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)", version or "")
    if not match:
        return False
    release = tuple(int(part) for part in match.group(1).split("."))
    rest = match.group(2).split("+", 1)[0].lower()
    prerelease = bool(re.match(r"[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)", rest))
    width = max(len(release), len(minimum))
    release, minimum = release + (0,) * (width - len(release)), tuple(minimum) + (0,) * (width - len(minimum))
    return release > minimum or (release == minimum and not prerelease)


def torch_status() -> str:
    """``"missing"``, ``"outdated"`` (below :data:`TORCH_REQUIREMENT`) or ``"ok"``."""
    if not torch_installed():
        return TORCH_MISSING
    version = torch_version()
    if version is None:  # importable but no version to read: the child process will say if it is too old
        return TORCH_OK
    return TORCH_OK if version_at_least(version, TORCH_MINIMUM) else TORCH_OUTDATED


def missing_pip_packages() -> list:
    """pip requirements of the packages that are not importable, in a fixed order."""
    return [requirement for name, requirement in PIP_PACKAGES.items() if not _installed(name)]


def numpy_version() -> str | None:
    """The installed NumPy's version, from its package metadata (without importing it); None if missing."""
    try:
        return importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None


def no_torch_wheel(system: str | None = None, machine: str | None = None,
                   numpy: str | None = None) -> str | None:
    """Why no PyTorch build that meets :data:`TORCH_REQUIREMENT` can run on this computer, in one line,
    or None where one can.  ``system``, ``machine`` and ``numpy`` (a version) default to this computer's
    (``platform.system()``, ``platform.machine()``, :func:`numpy_version`).  PyTorch built no macOS
    Intel (x86_64) wheels after 2.2, and 2.2 needs NumPy 1.x: where Slicer's Python has NumPy 2, no
    torch can run there."""
    system = platform.system() if system is None else system
    machine = (platform.machine() if machine is None else machine).lower()
    numpy = numpy_version() if numpy is None else numpy
    if system == "Darwin" and machine in ("x86_64", "amd64", "i386") and version_at_least(numpy or "", (2,)):
        return (f"The last PyTorch for Intel Macs ({MAC_INTEL_LAST_TORCH}) works only with NumPy 1.x, and this "
                f"Python has NumPy {numpy}, so TransferSeg cannot run its models here; use a Mac with Apple "
                "silicon, Linux or Windows, or run the transferseg command in a Python with "
                f"torch {MAC_INTEL_LAST_TORCH} and numpy<2, and load its outputs into Slicer")
    return None
