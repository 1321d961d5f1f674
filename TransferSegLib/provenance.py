"""How a result was made: versions, model, device, command and times (``result.json["provenance"]``),
and the switch that makes a run repeatable byte for byte (``--deterministic``)."""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

__all__ = ["command_line", "git_commit", "now", "provenance", "use_deterministic"]

SEED = 0


def now() -> str:
    """The time now, UTC, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def git_commit(folder: Optional[Path] = None) -> Optional[str]:
    """The commit checked out where the library's source lives (a source checkout or an editable
    install), read from ``.git`` without running git; None for an installed package."""
    folder = Path(folder or Path(__file__).resolve().parents[1])
    git = folder / ".git"
    if git.is_file():  # a worktree: "gitdir: PATH"
        text = git.read_text(encoding="utf-8").strip()
        git = Path(text.split(":", 1)[1].strip()) if text.startswith("gitdir:") else git
    head = git / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text(encoding="utf-8").strip()
    if not ref.startswith("ref:"):
        return ref or None
    name = ref.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():  # a worktree keeps its refs in the main repository
        common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (git, common):
        if (base / name).is_file():
            return (base / name).read_text(encoding="utf-8").strip()
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                if line.endswith(" " + name):
                    return line.split()[0]
    return None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(card: dict, device: str, started: str, ended: str, deterministic: bool,
               command: Optional[list] = None) -> dict:
    """The record of one run, for ``result.json["provenance"]``.  ``command`` is the exact command
    line when the run came from ``transferseg`` (None: the Python API)."""
    return {
        "transferseg": _version("transferseg"),
        "git_commit": git_commit(),
        "model": {"name": card["name"], "version": card["version"], "sha256": card["weights"].get("sha256")},
        "torch": torch.__version__,
        "simpleitk": sitk.Version.VersionString(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": device,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": list(command) if command is not None else None,
        "deterministic": bool(deterministic),
        "started": started,
        "ended": ended,
    }


def use_deterministic() -> None:
    """Make the rest of this process repeatable: fixed seeds, PyTorch's deterministic algorithms
    (an operation without one raises instead of running nondeterministically), no cuDNN autotuning.
    On the CPU the same thread count gives the same result; CUDA needs the cuBLAS workspace setting
    before its first use, which is set here."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def command_line() -> list:
    """The command as typed: the program's name and its arguments."""
    return [Path(sys.argv[0]).name] + sys.argv[1:]
