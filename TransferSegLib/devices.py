"""Where torch runs: a device from its name (CUDA when asked and present, else a clear error), and the
out-of-memory and synchronisation helpers the inferer and the trainer share."""
from __future__ import annotations

import re

import torch

from .volume import TransferSegError

__all__ = ["empty_cache", "is_out_of_memory", "resolve_device", "synchronize"]


def resolve_device(spec="auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` → a torch.device.

    Raises TransferSegError, saying what to choose instead, when a GPU is asked for but
    PyTorch cannot use one.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":  # Apple's GPU; chosen explicitly ('auto' keeps to CUDA or the CPU)
        if not torch.backends.mps.is_available():
            raise TransferSegError(f"device '{spec}' was requested but this PyTorch build finds no Apple GPU (MPS needs "
                                   "an Apple-silicon Mac and macOS 12.3 or later); choose device 'cpu' or 'auto'")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise TransferSegError(f"unknown device '{spec}'; use 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU number) "
                               "or 'mps' (Apple GPU)")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = "this PyTorch build has no CUDA support (a CPU-only build)"
        else:
            why = f"this PyTorch build (CUDA {torch.version.cuda}) finds no usable NVIDIA GPU or driver"
        raise TransferSegError(
            f"device '{spec}' was requested but {why}; choose device 'cpu', or 'auto' to use a GPU only "
            "when there is one (or install an NVIDIA driver and a CUDA build of PyTorch)"
        )
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= count:
        raise TransferSegError(
            f"device '{spec}' was requested but this machine has {count} GPU(s) (cuda:0 … cuda:{count - 1}); "
            "choose one of those, 'auto' or 'cpu'"
        )
    return torch.device("cuda", index)


#: torch >= 2.4 raises torch.OutOfMemoryError on any device; before, only CUDA had a class for it
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (_OUT_OF_MEMORY, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)  # PyTorch's CPU allocator


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
