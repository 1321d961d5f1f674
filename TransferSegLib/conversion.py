"""2D models converted to 3D from where they come from — a torchvision builder, a TransferSeg
architecture, a 2D safetensors checkpoint or a model card — and the converted weights saved and
read back with a JSON record (the ``transferseg convert`` command).  The conversion itself is
:func:`TransferSegLib.nets.convert.convert`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from torch import nn

from .atomic import atomic_output
from .models import load_model
from .nets.convert import CONVERSION_MODES, build_2d, check_mode, convert
from .volume import TransferSegError
from .weights import read_state_dict, refuse_pickle_suffix, save_state_dict, sha256_file

__all__ = ["convert_from_source", "load_converted", "save_converted"]


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
    weights' path and sha256, parameter counts and re-initialised keys; :func:`save_converted`
    writes it as the sidecar and :func:`load_converted` rebuilds the network from it.
    """

    mode = check_mode(to)
    for given in (source, weights_path):
        if given is not None:
            refuse_pickle_suffix(str(given))
    pretrained = Path(weights_path).expanduser() if weights_path is not None else None
    card_network = None
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
    }
    model3d.transferseg_conversion = {**model3d.transferseg_conversion, **info}
    return model3d, info


def save_converted(model3d: nn.Module, path, info: dict | None = None) -> Path:
    """Write ``model3d``'s state dict to ``path`` (.safetensors) and a JSON sidecar beside it.

    Both files are written atomically (``TransferSegLib.io.atomic_output``).  The sidecar
    (``path`` with ``.json``) holds ``info`` (default: the model's ``transferseg_conversion``,
    set by :func:`convert` / :func:`convert_from_source`: source, architecture, mode, …) plus
    ``weights``: file name, sha256 and size.  Returns the sidecar's path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TransferSegError(f"{path}: converted models are written as .safetensors (never pickle)")
    record = dict(info if info is not None else getattr(model3d, "transferseg_conversion", {}))
    if "mode" not in record:
        raise TransferSegError("save_converted: this model does not say how it was converted; pass info=")
    digest = save_state_dict(model3d.state_dict(), path,
                             metadata={"format": "pt", "transferseg_conversion": record["mode"]})
    record["weights"] = {"file": path.name, "sha256": digest, "bytes": path.stat().st_size}
    sidecar = path.with_suffix(".json")
    with atomic_output(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sidecar


def load_converted(path) -> tuple[nn.Module, dict]:
    """Rebuild a model written by :func:`save_converted` and load its weights strictly (sha256 checked)."""

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise TransferSegError(f"{path}: the conversion record {sidecar.name} is missing beside the weights")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        mode = info["mode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferSegError(f"{sidecar}: not a TransferSeg conversion record ({e})") from None
    architecture = info.get("architecture")
    if architecture is None:
        raise TransferSegError(f"{sidecar}: this model was converted from an in-memory {info.get('from_class', 'model')}; "
                               f"convert that model again and load {path.name} into it with load_state_dict")
    state = read_state_dict(path)
    expected = info.get("weights", {}).get("sha256")
    if expected != sha256_file(path):
        raise TransferSegError(f"{path}: checksum mismatch with {sidecar.name}; the file is damaged or not this model's")
    model3d = convert(build_2d(architecture, info.get("num_classes"), info.get("config")), mode)
    try:
        model3d.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TransferSegError(f"{path}: the weights do not fit {architecture} converted to "
                               f"{CONVERSION_MODES[mode]}: {str(e).splitlines()[0]}") from None
    model3d.transferseg_conversion = {**model3d.transferseg_conversion, **info}
    return model3d, info
