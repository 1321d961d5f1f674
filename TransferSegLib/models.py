"""Model cards and the safetensors model registry.

A model is two files side by side: ``NAME.safetensors`` (weights only, never pickle) and
``NAME.json``, its card::

    {
      "name": "ct-liver-tumor-unet3d", "version": "1.0.0", "task": "segmentation" | "heatmap",
      "labels": [{"name": "liver", "label": 1, "color": [r, g, b], "terminology": {...}}, ...],
      "architecture": {"name": "unet3d", "config": {...}},
      "preprocessing": {"hu_window": [-200, 250]},
      "patch_size": [k, j, i], "expected_spacing_mm": [k, j, i] | null,
      "inference": {"overlap": 0.5, "activation": "softmax", ...},
      "training": {"data": ..., "seed": ..., "config": ...},
      "metrics": {...held-out results...},
      "weights": {"file": "NAME.safetensors", "sha256": "..."}
    }

:func:`load_model` verifies the sha256 before it reads a tensor and refuses, with an error a
user can act on: a checksum mismatch, a pickle / ``.pt`` / ``.pth`` file (never unpickled),
a card naming an unknown architecture, weights that do not fit the architecture, and a
truncated file.  Models are looked up by name in the user folder (``$TRANSFERSEG_MODELS``,
default ``~/.transferseg/models``) and then in the models shipped with TransferSeg.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .volume import TransferSegError

__all__ = ["LoadedModel", "DEFAULT_DETECTION_MODEL", "DEFAULT_SEGMENTATION_MODEL", "find_model", "list_models", "load_model",
           "model_dirs", "read_state_dict", "save_model", "sha256_file"]

DEFAULT_SEGMENTATION_MODEL = "ct-liver-tumor-unet3d"
DEFAULT_DETECTION_MODEL = "dbt-lesion-ahnet"
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
_REQUIRED_CARD_KEYS = ("name", "version", "task", "labels", "architecture", "preprocessing", "patch_size", "weights")

# safetensors: an 8-byte little-endian header length, then that much JSON, then the data.
_SAFETENSORS_MAX_HEADER = 100 * 2**20


@dataclass
class LoadedModel:
    """A network in eval mode with its card and where it came from."""

    network: object
    card: dict
    path: Path

    @property
    def name(self) -> str:
        return self.card["name"]


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_dirs() -> list[Path]:
    """Where models are looked up, in order: the user folder, then the shipped models."""
    user = Path(os.environ.get("TRANSFERSEG_MODELS", "~/.transferseg/models")).expanduser()
    package = Path(__file__).resolve().parent
    shipped = [package.parent / "Resources" / "models",  # source checkout / editable install
               package / "Resources" / "models"]  # installed into Slicer beside the module
    return [user] + [d for d in shipped if d.is_dir()]


def _card_path_for(path: Path) -> Path:
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    if path.is_dir():
        cards = sorted(path.glob("*.json"))
        if len(cards) != 1:
            raise TransferSegError(f"{path}: expected one model card (.json) in the folder, found {len(cards)}")
        return cards[0]
    return path


def find_model(name_or_path) -> Path:
    """The card path of a model given by name, card path, weights path or folder."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise TransferSegError(
            f"{path}: refusing to load a PyTorch pickle ({path.suffix}) file: unpickling can run arbitrary code. "
            "Convert the weights to safetensors with a model card (see README, 'Model cards')"
        )
    if path.exists() or os.sep in text or text.endswith((".json", ".safetensors")):
        if not path.exists():
            raise TransferSegError(f"{path}: no such model file")
        return _card_path_for(path)
    for folder in model_dirs():
        card = folder / f"{text}.json"
        if card.exists():
            return card
    known = ", ".join(sorted(c["name"] for c in list_models())) or "none"
    raise TransferSegError(f"no model named {text!r}; installed models: {known} (see `transferseg models`)")


def _read_card(card_path: Path) -> dict:
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferSegError(f"{card_path}: the model card is not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise TransferSegError(f"{card_path}: the model card must be a JSON object")
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise TransferSegError(f"{card_path}: the model card lacks {', '.join(missing)}")
    return card


def _check_safetensors_file(path: Path) -> None:
    """Refuse pickles and truncated files before handing the bytes to safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05") or head[:1] == b"\x80":
            raise TransferSegError(
                f"{path}: this is a PyTorch pickle/zip checkpoint, not safetensors; refusing to unpickle it. "
                "Convert it once in a trusted environment with safetensors.torch.save_file"
            )
        if len(head) < 8:
            raise TransferSegError(f"{path}: the weights file is truncated ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or header_len > min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise TransferSegError(f"{path}: not a safetensors file, or truncated (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransferSegError(f"{path}: not a safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise TransferSegError(
            f"{path}: the weights file is truncated ({size} bytes, needs {8 + header_len + end}); "
            "copy or download it again"
        )


def read_state_dict(path) -> dict:
    """A state dict from a safetensors file: pickles are refused by name and by content, never
    unpickled; a truncated file is refused before safetensors reads it."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise TransferSegError(
            f"{path}: refusing to load a PyTorch pickle ({path.suffix}): unpickling can run arbitrary code. "
            "Convert it once, in a trusted environment, with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        )
    if not path.is_file():
        raise TransferSegError(f"{path}: no such weights file")
    _check_safetensors_file(path)
    return load_file(str(path), device="cpu")


def load_model(name_or_path, device="cpu") -> LoadedModel:
    """Load a model by name or path: card checked, sha256 verified, weights loaded strictly, eval mode."""
    import torch

    from .nets import build_network

    card_path = find_model(name_or_path)
    card = _read_card(card_path)
    weights_path = card_path.parent / card["weights"].get("file", card_path.with_suffix(".safetensors").name)
    if not weights_path.exists():
        raise TransferSegError(f"{card_path}: the weights file {weights_path.name} is missing beside the card")
    if weights_path.suffix.lower() in _PICKLE_SUFFIXES:
        raise TransferSegError(f"{weights_path}: refusing to load a pickle file; weights must be .safetensors")
    _check_safetensors_file(weights_path)
    expected = card["weights"].get("sha256")
    actual = sha256_file(weights_path)
    if expected != actual:
        raise TransferSegError(
            f"{weights_path}: checksum mismatch (card says {str(expected)[:12]}…, file is {actual[:12]}…); "
            "the file is damaged or not the one this card describes — reinstall the model"
        )
    arch = card["architecture"]
    network = build_network(arch.get("name"), arch.get("config", {}))
    state = read_state_dict(weights_path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shapes differ"
        raise TransferSegError(
            f"{weights_path}: the weights do not fit architecture {arch.get('name')!r} with config "
            f"{arch.get('config')}: {first}"
        ) from None
    network.eval()
    network.to(torch.device(device) if isinstance(device, str) else device)
    return LoadedModel(network, card, card_path)


def save_model(network, card: dict, folder) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` (with the weights' sha256) into ``folder``, atomically.

    Returns the card path.  ``card`` needs every key of a model card except ``weights``.
    """
    from safetensors.torch import save_file

    from .io import atomic_output

    folder = Path(folder)
    card = dict(card)
    name = card.get("name")
    if not name or "/" in name:
        raise TransferSegError(f"a model needs a plain name; got {name!r}")
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    weights = folder / f"{name}.safetensors"
    with atomic_output(weights) as tmp:
        save_file(state, str(tmp), metadata={"name": name, "format": "pt"})
        tmp.chmod(0o644)  # safetensors writes 0600; a model is meant to be shared
        digest = sha256_file(tmp)
    card["weights"] = {"file": weights.name, "sha256": digest, "bytes": weights.stat().st_size}
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise TransferSegError(f"model card for {name} lacks {', '.join(missing)}")
    card_path = folder / f"{name}.json"
    with atomic_output(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card_path


def list_models() -> list[dict]:
    """Cards of every installed model (user folder first; a user model shadows a shipped one)."""
    seen, cards = set(), []
    for folder in model_dirs():
        if not folder.is_dir():
            continue
        for card_path in sorted(folder.glob("*.json")):
            try:
                card = _read_card(card_path)
            except TransferSegError:
                continue
            if card["name"] in seen:
                continue
            seen.add(card["name"])
            cards.append({**card, "_path": str(card_path)})
    return cards
