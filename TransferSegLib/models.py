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

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .volume import TransferSegError
from .weights import read_header, read_state_dict, refuse_pickle_suffix, save_state_dict, sha256_file

__all__ = ["LoadedModel", "DEFAULT_DETECTION_MODEL", "DEFAULT_SEGMENTATION_MODEL", "find_model", "list_models", "load_model",
           "model_dirs", "save_model"]

DEFAULT_SEGMENTATION_MODEL = "ct-liver-tumor-unet3d"
DEFAULT_DETECTION_MODEL = "dbt-lesion-ahnet"
_REQUIRED_CARD_KEYS = ("name", "version", "task", "labels", "architecture", "preprocessing", "patch_size", "weights")


@dataclass
class LoadedModel:
    """A network in eval mode with its card and where it came from."""

    network: object
    card: dict
    path: Path

    @property
    def name(self) -> str:
        return self.card["name"]


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
    refuse_pickle_suffix(path)
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


def load_model(name_or_path, device="cpu") -> LoadedModel:
    """Load a model by name or path: card checked, sha256 verified, weights loaded strictly, eval mode."""
    import torch

    from .nets import build_network

    card_path = find_model(name_or_path)
    card = _read_card(card_path)
    weights_path = card_path.parent / card["weights"].get("file", card_path.with_suffix(".safetensors").name)
    if not weights_path.exists():
        raise TransferSegError(f"{card_path}: the weights file {weights_path.name} is missing beside the card")
    read_header(weights_path)  # refuses pickles and truncated files before hashing
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
    from .io import atomic_output

    folder = Path(folder)
    card = dict(card)
    name = card.get("name")
    if not name or "/" in name:
        raise TransferSegError(f"a model needs a plain name; got {name!r}")
    weights = folder / f"{name}.safetensors"
    digest = save_state_dict(network.state_dict(), weights, metadata={"name": name, "format": "pt"})
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
