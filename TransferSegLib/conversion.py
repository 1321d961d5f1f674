"""2D models converted to 3D from where they come from — a torchvision builder, a TransferSeg
architecture, a 2D safetensors checkpoint or a model card — and saved as a model like any other
(the ``transferseg convert`` command): ``NAME.safetensors`` and its card ``NAME.json``, whose
architecture is ``"converted"`` (:func:`TransferSegLib.nets.convert.converted_network`) and whose
``training.converted_from`` records the conversion, so :func:`TransferSegLib.models.load_model`
reads it back (sha256 checked, loaded strictly).  The conversion itself is
:func:`TransferSegLib.nets.convert.convert`."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torchvision
from torch import nn

from .models import load_model, save_model
from .nets.convert import CONVERSION_MODES, build_2d, check_mode, config_2d, convert
from .volume import TransferSegError
from .weights import read_state_dict, refuse_pickle_suffix, sha256_file

__all__ = ["convert_from_source", "save_converted"]

#: what a card needs that a bare 2D network does not say; a model card source gives its own
_CARD_PLACEHOLDERS = {"task": "segmentation", "labels": [], "preprocessing": {}, "patch_size": [1, 1, 1]}


def _load_2d_weights(model: nn.Module, path: Path, architecture: str, num_classes: int | None) -> list[str]:
    """Load ``path`` into the 2D ``model`` strictly; with ``num_classes`` a classifier head whose
    output count differs (first dimension = num_classes in the model) is left re-initialised.
    Returns the re-initialised keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    head = [k for k in own if k in state and own[k].shape != state[k].shape]
    refit = [k for k in head if num_classes is not None and own[k].ndim >= 1 and own[k].shape[0] == num_classes
             and own[k].shape[1:] == state[k].shape[1:]]
    wrong = [k for k in head if k not in refit]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", wrong)) if keys]
        raise TransferSegError(f"{path}: these weights do not fit {architecture}"
                               f"{f' with {num_classes} classes' if num_classes else ''} ({'; '.join(parts)})")
    model.load_state_dict({**state, **{k: own[k] for k in refit}}, strict=True)
    return refit


def convert_from_source(source: str, to: str = "acs", num_classes: int | None = None, *,
                        weights_path=None, architecture: str | None = None, config: dict | None = None):
    """Build or load a 2D network and :func:`convert` it; returns ``(model3d, info)``.

    ``source`` is one of
      * ``"torchvision:NAME"`` — any torchvision classification or segmentation builder
        (``weights=None``, ``weights_backbone=None``: nothing is downloaded); ``weights_path``
        optionally names a local safetensors file with its 2D state dict (e.g. ImageNet weights
        converted once), loaded strictly before conversion;
      * ``"transferseg:NAME"`` — a TransferSeg 2D architecture (``config`` = its keyword config);
      * a path to a 2D ``.safetensors`` checkpoint, with ``architecture`` = ``"torchvision:NAME"``
        or a TransferSeg name (+ ``config``), or a TransferSeg model card beside it.
    ``num_classes`` sets the classifier size; with pretrained weights of another size, the
    head tensors (first dimension = num_classes) are left freshly initialised and listed in
    ``info["reinitialised"]``; every other tensor must fit exactly.  Pickle files are refused.

    ``info`` (JSON-serialisable) says source, architecture, config, mode, num_classes, the 2D
    weights' path and sha256, parameter counts and re-initialised keys, and ``card``: a model card
    source's task, labels, preprocessing and patch size (else None); :func:`save_converted` writes
    it into the converted model's card.
    """

    mode = check_mode(to)
    for given in (source, weights_path):
        if given is not None:
            refuse_pickle_suffix(str(given))
    pretrained = Path(weights_path).expanduser() if weights_path is not None else None
    card_network, card = None, None
    if source.startswith(("torchvision:", "transferseg:")):
        architecture = source
    else:
        path = Path(source).expanduser()
        if pretrained is not None:
            raise TransferSegError(f"source {source} is already a weights file; do not also pass weights_path")
        pretrained = path
        if architecture is None:
            if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
                loaded = load_model(path)
                card_network = loaded.network
                architecture = loaded.card["architecture"]["name"]
                config = loaded.card["architecture"].get("config", {})
                card = {key: loaded.card[key] for key in _CARD_PLACEHOLDERS}
            else:
                raise TransferSegError(
                    f"{source}: say which 2D architecture these weights belong to, e.g. "
                    "architecture='torchvision:resnet50' (or --architecture on the command line)")
    if card_network is not None:
        if num_classes is not None:
            raise TransferSegError(f"{source}: num_classes cannot change a TransferSeg model's output size")
        model2d, reinitialised = card_network, []
    else:
        model2d = build_2d(architecture, num_classes, config)
        reinitialised = _load_2d_weights(model2d, pretrained, architecture, num_classes) if pretrained else []
    model3d = convert(model2d, mode)
    info = {
        "source": source,
        "architecture": architecture,
        "config": {k: v for k, v in (config or {}).items()},
        "num_classes": num_classes,
        "mode": mode,
        "pretrained_weights": None if pretrained is None else {"path": str(pretrained), "sha256": sha256_file(pretrained)},
        "reinitialised": reinitialised,
        "parameters_2d": model3d.transferseg_conversion["parameters_2d"],
        "parameters_3d": model3d.transferseg_conversion["parameters_3d"],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "card": card,
    }
    model3d.transferseg_conversion = {**model3d.transferseg_conversion, **info}
    return model3d, info


def save_converted(model3d: nn.Module, path, info: dict | None = None) -> Path:
    """Write ``model3d`` as a model: ``path`` (.safetensors) and its card beside it (``path`` with
    ``.json``), atomically (:func:`TransferSegLib.models.save_model`); returns the card's path.

    The card is named ``path``'s stem; its architecture is ``{"name": "converted", "config":
    {"source", "config", "to"}}``, so :func:`TransferSegLib.models.load_model` rebuilds the network
    and loads the weights strictly, and ``training.converted_from`` holds ``info`` (default: the
    model's ``transferseg_conversion``, set by :func:`convert_from_source`: source, architecture,
    mode, parameter counts, re-initialised keys, …).  Task, labels, preprocessing and patch size
    come from the source's model card; a network from elsewhere gets placeholders (a segmentation
    without labels or preprocessing, patch [1, 1, 1]) until it is trained into a model.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TransferSegError(f"{path}: converted models are written as .safetensors (never pickle)")
    record = dict(info if info is not None else getattr(model3d, "transferseg_conversion", {}))
    if "mode" not in record:
        raise TransferSegError("save_converted: this model does not say how it was converted; pass info=")
    architecture = record.get("architecture")
    if architecture is None:
        raise TransferSegError(f"{path}: this model was converted from an in-memory "
                               f"{record.get('from_class', 'model')}, and a model card must say how to rebuild its "
                               "network; convert it with convert_from_source (a torchvision:, transferseg: or file "
                               "source)")
    fields = record.pop("card", None)
    description = f"{record.get('source', architecture)} converted to 3D ({CONVERSION_MODES[record['mode']]})"
    if fields is None:
        fields = copy.deepcopy(_CARD_PLACEHOLDERS)
        description += "; not yet a model to run: its labels, preprocessing and patch size are placeholders"
    config = {"source": architecture.removeprefix("transferseg:"),
              "config": config_2d(architecture, record.get("num_classes"), record.get("config")), "to": record["mode"]}
    card = {"name": path.stem, "version": "1.0.0", "description": description, **fields,
            "architecture": {"name": "converted", "config": config}, "training": {"converted_from": record}}
    return save_model(model3d, card, path.parent)
