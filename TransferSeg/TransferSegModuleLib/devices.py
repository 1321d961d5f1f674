"""Which devices this computer offers a model, asked off the GUI thread: the NVIDIA GPUs ``nvidia-smi``
lists, and whether torch can use Apple's GPU (MPS), asked of torch in a child process."""
from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import sys
import threading

from .dependencies import torch_installed


def child_python() -> str:
    """The Python that runs the model: PythonSlicer in Slicer (the same packages, not the GUI's process)."""
    return shutil.which("PythonSlicer") or sys.executable


class GpuQuery:
    """:func:`query_gpus` and :func:`query_mps` on a worker thread: opening the module never waits for
    ``nvidia-smi`` (up to 5 s) or for torch to load in a child process.  ``done`` says whether both
    answered; ``result`` is the GPUs ``nvidia-smi`` listed, ``mps`` whether torch can use Apple's GPU.
    ``python``, ``system`` and ``machine`` go to :func:`query_mps`."""

    def __init__(self, timeout: float = 5.0, python: str | None = None, system: str | None = None,
                 machine: str | None = None):
        self.result = None
        self.mps = False
        self._thread = threading.Thread(target=self._ask, args=(timeout, python, system, machine), daemon=True)
        self._thread.start()

    def _ask(self, timeout: float, python, system, machine) -> None:
        try:
            self.result = query_gpus(timeout)
        except Exception as e:  # the device list then says no GPU was found
            logging.warning(f"TransferSeg: could not list the GPUs: {e}")
            self.result = []
        try:
            self.mps = query_mps(python, system=system, machine=machine)
        except Exception as e:  # the device list then offers no MPS
            logging.warning(f"TransferSeg: could not ask PyTorch about Apple's GPU: {e}")

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> list | None:
        self._thread.join(timeout)
        return self.result


#: what the child process runs to ask torch about Apple's GPU
MPS_QUESTION = "import torch; print('MPS', int(torch.backends.mps.is_available()))"


def query_mps(python: str | None = None, timeout: float = 120.0, system: str | None = None,
              machine: str | None = None) -> bool:
    """Whether torch can use Apple's GPU (MPS) on this computer, asked of torch in a child process
    (``python``, default :func:`child_python`): importing torch takes seconds and, on Windows, holds its
    files, so Slicer's own process never imports it.  Only an Apple-silicon Mac (``system`` Darwin,
    ``machine`` arm64; default this computer's) with torch installed is asked; elsewhere False at once."""
    system = platform.system() if system is None else system
    machine = (platform.machine() if machine is None else machine).lower()
    if system != "Darwin" or machine not in ("arm64", "aarch64") or not torch_installed():
        return False
    try:
        lines = subprocess.run([python or child_python(), "-c", MPS_QUESTION], capture_output=True, text=True,
                               timeout=timeout, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.strip() == "MPS 1" for line in lines)


def query_gpus(timeout: float = 5.0) -> list:
    """``[(index, name, memory_mib)]`` of the NVIDIA GPUs ``nvidia-smi`` reports (no torch needed).

    Takes up to ``timeout`` s: the GUI asks through :class:`GpuQuery`, off its thread."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    # no console window flashing up on Windows
    flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
    try:
        text = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=timeout, check=True,
                              creationflags=flags).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            try:
                found.append((int(parts[0]), parts[1], int(float(parts[2]))))
            except ValueError:
                continue
    return found
