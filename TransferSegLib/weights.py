"""The one place that reads and writes weight files: safetensors only, never a pickle.

Models (:mod:`TransferSegLib.models`), converted networks (:mod:`TransferSegLib.nets.convert`)
and the trainer's initial weights all come through here, so every weight file TransferSeg
opens is refused the same way when it is a pickle (by suffix and by content), truncated, or
not safetensors at all, and every checksum is computed by one function.

A safetensors file is an 8-byte little-endian header length, that much JSON (each tensor's
dtype, shape and byte range, plus ``__metadata__``), then the raw data.  :func:`read_header`
reads only the JSON, so a card's architecture can be checked against the file's shapes
before a single tensor (or network) is allocated.  It checks the whole header as the format
requires (known dtypes, byte ranges that fit their shapes and tile the data exactly), so a
forged file is one clear error, even when a card's sha256 vouches for it, never a traceback
from inside safetensors or torch.

Imports nothing above :mod:`TransferSegLib.atomic` and :mod:`TransferSegLib.volume` (``nets/`` imports
this module), and torch only when a tensor is read or written.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .atomic import atomic_output
from .volume import TransferSegError

__all__ = ["PICKLE_SUFFIXES", "read_header", "read_state_dict", "refuse_pickle_suffix", "save_state_dict",
           "sha256_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")

_MAX_HEADER_BYTES = 100 * 2**20
#: bytes per element of each dtype safetensors stores that torch can load
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
               "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
               "U64": 8, "I64": 8, "F64": 8, "C64": 8}
_REWRITE = "the file is damaged or was not written by safetensors; install the model again"


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
    """The header JSON of a safetensors file; pickles, non-safetensors, truncated files and malformed
    headers refused."""
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
    except RecursionError:  # a forged header of lists in lists, thousands deep
        raise TransferSegError(f"{path}: not a safetensors file (its header is nested too deeply); "
                               f"{_REWRITE}") from None
    if not isinstance(header, dict):
        raise TransferSegError(f"{path}: not a safetensors file (unreadable header)")
    _check_entries(header, size, header_len, path)
    return header


def _check_entry(key: str, entry, path: Path) -> tuple:
    """``(begin, end)`` of one tensor's header entry, after checking its dtype, shape and byte range."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise TransferSegError(f"{path}: tensor {key!r} needs dtype, shape and data_offsets in the header, e.g. "
                               f"{{\"dtype\": \"F32\", \"shape\": [16, 8], \"data_offsets\": [0, 512]}}; {_REWRITE}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEM_BYTES:
        raise TransferSegError(f"{path}: tensor {key!r} has unknown dtype {str(dtype)[:20]!r}, e.g. F32, F16, I64 "
                               f"({', '.join(_ITEM_BYTES)}); {_REWRITE}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise TransferSegError(f"{path}: tensor {key!r} has shape {json.dumps(shape)[:60]}; a shape is a list of "
                               f"whole numbers ≥ 0, e.g. [16, 8]; {_REWRITE}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise TransferSegError(f"{path}: tensor {key!r} has data_offsets {json.dumps(offsets)[:60]}; they must be "
                               f"[begin, end] whole numbers with 0 ≤ begin ≤ end, e.g. [0, 512]; {_REWRITE}")
    needs = math.prod(shape) * _ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != needs:
        raise TransferSegError(f"{path}: tensor {key!r} is {dtype} of shape {shape} ({needs} bytes), but its "
                               f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; {_REWRITE}")
    return offsets[0], offsets[1]


def _check_entries(header: dict, size: int, header_len: int, path: Path) -> None:
    """Every tensor entry well formed, and their byte ranges tile the data buffer from 0 to its end
    without gaps or overlaps (as the safetensors format requires); ``__metadata__`` flat str → str."""
    data_bytes = size - 8 - header_len
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TransferSegError(f"{path}: the header's __metadata__ must map names to strings, e.g. "
                               f"{{\"format\": \"pt\"}}; {_REWRITE}")
    ranges = sorted((*_check_entry(key, entry, path), key) for key, entry in header.items() if key != "__metadata__")
    end, last = 0, None
    for begin, stop, key in ranges:
        if begin != end:
            where = f"after tensor {last!r}" if last else "at the start of the data"
            problem = f"overlaps tensor {last!r}" if begin < end else f"leaves {begin - end} unused bytes {where}"
            raise TransferSegError(f"{path}: tensor {key!r} at bytes {begin}–{stop} {problem}; the tensors must "
                                   f"fill the data exactly, one after another; {_REWRITE}")
        end, last = stop, key
    if end > data_bytes:
        raise TransferSegError(f"{path}: the weights file is truncated ({size} bytes, needs "
                               f"{size - data_bytes + end}); copy or download it again")
    if end < data_bytes:
        raise TransferSegError(f"{path}: the last {data_bytes - end} bytes of the data belong to no tensor (the "
                               f"tensors must fill the data exactly); {_REWRITE}")


def read_header(path) -> dict:
    """``{key: (dtype, shape)}`` of a safetensors file, without reading a tensor.

    ``dtype`` is safetensors' name (``"F32"``, ``"I64"``, …) and ``shape`` a tuple.  Pickles
    (by suffix and by content) and truncated files are refused like :func:`read_state_dict`.
    """
    path = Path(path).expanduser()
    refuse_pickle_suffix(path)
    if not path.is_file():
        what = "is not a regular file (a pipe, a device or a folder)" if path.exists() else "no such weights file"
        raise TransferSegError(f"{path}: {what}")
    header = _read_raw_header(path)  # every entry checked
    return {key: (entry["dtype"], tuple(entry["shape"])) for key, entry in header.items() if key != "__metadata__"}


def read_state_dict(path, sha256: str | None = None) -> dict:
    """A state dict from a safetensors file: pickles are refused by name and by content, never
    unpickled; a truncated or forged file is refused before safetensors reads it.

    The file is read once and loaded from memory, so any file name works and, with ``sha256``,
    the bytes loaded are exactly the bytes verified (no second read for a swapped file to slip into)."""
    from safetensors.torch import load  # imports torch: reading a header (and a model card) stays torch-free

    path = Path(path).expanduser()
    read_header(path)
    data = path.read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise TransferSegError(
                f"{path}: checksum mismatch (card says {sha256[:12]}…, file is {actual[:12]}…); "
                "the file is damaged or not the one this card describes — reinstall the model"
            )
    return load(data)


def save_state_dict(state: dict, path, metadata: dict | None = None) -> str:
    """Write ``state`` (name → tensor) to ``path`` as safetensors, atomically; returns its sha256.

    Tensors are moved to the CPU and made contiguous; a tensor that shares storage with an
    earlier one (a module used twice) is written as its own copy, which safetensors requires.
    ``metadata`` is a flat str → str dict stored in the header.  The file is mode 0644.
    """
    from safetensors.torch import save_file  # imports torch: see read_state_dict

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
