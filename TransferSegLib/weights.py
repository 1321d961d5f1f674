"""The one place that reads and writes weight files: safetensors only, never a pickle.

Models (:mod:`TransferSegLib.models`), converted networks (:mod:`TransferSegLib.nets.convert`)
and the trainer's initial weights all come through here, so every weight file TransferSeg
opens is refused the same way when it is a pickle (by suffix and by content), truncated, or
not safetensors at all, and every checksum is computed by one function.

A safetensors file is an 8-byte little-endian header length, that much JSON (each tensor's
dtype, shape and byte range, plus ``__metadata__``), then the raw data.  :func:`read_header`
reads only the JSON, so a card's architecture can be checked against the file's shapes
before a single tensor (or network) is allocated.

Imports nothing above :mod:`TransferSegLib.volume` (``nets/`` imports this module).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .volume import TransferSegError

__all__ = ["PICKLE_SUFFIXES", "read_header", "read_state_dict", "refuse_pickle_suffix", "save_state_dict",
           "sha256_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")

_MAX_HEADER_BYTES = 100 * 2**20


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_pickle_suffix(path) -> None:
    """Refuse a path named like a PyTorch pickle before anything opens it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TransferSegError(
            f"{path}: refusing to load a PyTorch pickle ({path.suffix}): unpickling can run arbitrary code. "
            "Convert it once, in a trusted environment, with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        )


def _read_raw_header(path: Path) -> dict:
    """The header JSON of a safetensors file; pickles, non-safetensors and truncated files refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little")
        fits = len(head) == 8 and 0 < header_len <= min(_MAX_HEADER_BYTES, size - 8)
        raw = f.read(header_len) if fits else b""
    if not raw.startswith(b"{"):
        # only now the magic bytes: a real header length may well start with 0x80 or "PK"
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle's PROTO opcode
            raise TransferSegError(
                f"{path}: this is a PyTorch pickle/zip checkpoint, not safetensors; refusing to unpickle it. "
                "Convert it once in a trusted environment with safetensors.torch.save_file"
            )
        if len(head) < 8:
            raise TransferSegError(f"{path}: the weights file is truncated ({size} bytes)")
        if not fits:
            raise TransferSegError(f"{path}: not a safetensors file, or truncated (bad header length)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TransferSegError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise TransferSegError(f"{path}: not a safetensors file (unreadable header)")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        raise TransferSegError(f"{path}: not a safetensors file (unreadable header)") from None
    if 8 + header_len + end > size:
        raise TransferSegError(
            f"{path}: the weights file is truncated ({size} bytes, needs {8 + header_len + end}); "
            "copy or download it again"
        )
    return header


def read_header(path) -> dict:
    """``{key: (dtype, shape)}`` of a safetensors file, without reading a tensor.

    ``dtype`` is safetensors' name (``"F32"``, ``"I64"``, …) and ``shape`` a tuple.  Pickles
    (by suffix and by content) and truncated files are refused like :func:`read_state_dict`.
    """
    path = Path(path).expanduser()
    refuse_pickle_suffix(path)
    if not path.is_file():
        raise TransferSegError(f"{path}: no such weights file")
    header = _read_raw_header(path)
    try:
        return {key: (entry["dtype"], tuple(int(n) for n in entry["shape"]))
                for key, entry in header.items() if key != "__metadata__"}
    except (KeyError, TypeError, ValueError):
        raise TransferSegError(f"{path}: not a safetensors file (unreadable header)") from None


def read_state_dict(path) -> dict:
    """A state dict from a safetensors file: pickles are refused by name and by content, never
    unpickled; a truncated file is refused before safetensors reads it."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    read_header(path)
    return load_file(str(path), device="cpu")


def save_state_dict(state: dict, path, metadata: dict | None = None) -> str:
    """Write ``state`` (name → tensor) to ``path`` as safetensors, atomically; returns its sha256.

    Tensors are moved to the CPU and made contiguous; a tensor that shares storage with an
    earlier one (a module used twice) is written as its own copy, which safetensors requires.
    ``metadata`` is a flat str → str dict stored in the header.  The file is mode 0644.
    """
    from safetensors.torch import save_file

    from .io import atomic_output

    path = Path(path)
    if path.suffix != ".safetensors":
        raise TransferSegError(f"{path}: weights are written as .safetensors (never pickle)")
    tensors, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)
        tmp.chmod(0o644)  # safetensors writes 0600; weights are meant to be shared
        digest = sha256_file(tmp)
    return digest
