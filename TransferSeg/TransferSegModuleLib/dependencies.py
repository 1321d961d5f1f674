"""What TransferSeg needs in Slicer's Python beyond what Slicer bundles (numpy, scipy, SimpleITK).

Qt-free: it only says what is missing.  The GUI asks the user and installs on first use, never
at import time: torch through the PyTorch extension (``PyTorchUtils``, which picks the build
that fits the computer's GPU driver), everything else through ``slicer.util.pip_install``.
"""
from __future__ import annotations

import importlib.util

#: torch floor, not a pin: TransferSegLib calls torch.is_autocast_enabled(device_type), new in 2.4
TORCH_REQUIREMENT = ">=2.4"
#: import name -> pip requirement; the child process needs the first four, the GUI psutil (Cancel)
PIP_PACKAGES = {
    "safetensors": "safetensors>=0.4",
    "slicerio": "slicerio>=1.1",
    "matplotlib": "matplotlib>=3.7",
    "tqdm": "tqdm",
    "psutil": "psutil>=5.9",
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_installed() -> bool:
    return _installed("torch")


def missing_pip_packages() -> list:
    """pip requirements of the packages that are not importable, in a fixed order."""
    return [requirement for name, requirement in PIP_PACKAGES.items() if not _installed(name)]
