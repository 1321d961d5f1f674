"""The network a config describes, and the weights it starts from (a file, a transferred MC-GCN
encoder, a converted 2D model)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..models import load_model
from ..nets import MCGCN, SliceStack2D, build_network, transfer_mcgcn_to_ahnet
from ..nets.convert import convert
from ..volume import TransferSegError
from ..weights import read_state_dict
from .config import config_error


def _import_architecture(arch: dict) -> None:
    if arch.get("module"):
        try:
            importlib.import_module(arch["module"])
        except ImportError as e:
            raise TransferSegError(f"training config: architecture.module: cannot import {arch['module']!r} ({e})") from None


def network_from_config(config: dict, device) -> tuple:
    """``(network on device, the init_weights report or None)``."""
    arch = config["architecture"]
    _import_architecture(arch)
    torch.manual_seed(config["seed"])  # the same initial weights in every process and run
    network = build_network(arch["name"], arch["config"])
    multiple = getattr(network, "size_multiple", 1)
    multiple = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    bad = [p for p, m in zip(config["patch_size"], multiple) if p % m]
    if bad:
        config_error("patch_size", f"{config['patch_size']} must be a multiple of {list(multiple)} per axis for "
              f"{arch['name']} (its size_multiple)")
    for n, stage in enumerate(config["stages"]):
        for path in stage["network"]:
            stage_attribute(network, path, f"stages[{n}].network")
    init, report = config["init_weights"], None
    if init and "transfer_from" in init:
        network.load_state_dict(_transferred_weights(init["transfer_from"], network, config["seed"]), strict=True)
    elif init and "convert_from" in init:
        state = _converted_weights(init["convert_from"], arch["config"])
        report = load_weights_into(network, state, "", True, source=init["convert_from"])
        report["converted_to"] = network.config["to"]
    elif init:
        state = {key[len(init["source_prefix"]):]: value for key, value in _initial_weights(init["path"]).items()
                 if key.startswith(init["source_prefix"])}
        report = load_weights_into(network, state, init["prefix"], init["strict"], source=init["path"])
        report["source_prefix"] = init["source_prefix"]
    return network.to(device), report


def stage_attribute(network: nn.Module, path: str, key: str) -> tuple:
    """(module, attribute name) of a stage's ``network`` option, e.g. "net2d.unet_connections"."""
    *modules, attribute = path.split(".")
    owner = network
    for name in modules:
        owner = getattr(owner, name, None)
        if not isinstance(owner, nn.Module):
            config_error(key, f"{path!r}: the network has no submodule {'.'.join(modules)!r}")
    if not hasattr(owner, attribute) or isinstance(getattr(owner, attribute), (nn.Module, torch.Tensor)):
        config_error(key, f"{path!r}: {type(owner).__name__} has no plain attribute {attribute!r}")
    return owner, attribute


def apply_stage_options(network: nn.Module, stage: dict, built: dict) -> None:
    """Set the stage's ``network`` attributes; those another stage names go back to their built values."""
    for path, value in {**built, **stage["network"]}.items():
        owner, attribute = stage_attribute(network, path, "network")
        setattr(owner, attribute, value)


def load_weights_into(network: nn.Module, state: dict, prefix: str = "", strict: bool = True,
                      source: str = "the weights") -> dict:
    """Load ``state`` into ``network`` under ``prefix``; returns the report of what matched.

    Strict: every source key must land on a network key of the same shape, and every network
    key under the prefix must be covered.  Not strict: what matches (name and shape) is loaded.
    Either way a load that matches nothing is an error, never a silent no-op.
    """
    target = network.state_dict()
    mapped = {prefix + key: value for key, value in state.items()}
    under = [key for key in target if key.startswith(prefix)]
    matched = [key for key in mapped if key in target and tuple(target[key].shape) == tuple(mapped[key].shape)]
    shapes = [key for key in mapped if key in target and key not in set(matched)]
    unexpected = [key for key in mapped if key not in target]
    missing = [key for key in under if key not in mapped]
    report = {"source": source, "prefix": prefix, "strict": strict, "loaded": len(matched),
              "network_keys_under_prefix": len(under), "shape_mismatch": shapes,
              "not_in_network": unexpected, "not_in_weights": missing}
    where = f"under {prefix!r}" if prefix else ""
    if not matched:
        config_error("init_weights", f"{source}: none of its {len(mapped)} tensors matches the network {where} (its keys look "
              f"like {', '.join(list(state)[:3]) or 'nothing'}; the network's like {', '.join(under[:3]) or 'nothing'}); "
              "check the file and init_weights.prefix")
    if strict and (shapes or unexpected or missing):
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (
            ("with another shape", shapes), ("not in the network", unexpected), ("of the network not in the weights",
                                                                               missing)) if v]
        config_error("init_weights", f"{source} does not match the network {where}: {'; '.join(problems)}; set "
              "\"strict\": false to load what matches")
    network.load_state_dict({key: mapped[key] for key in matched}, strict=False)
    return report


def _transferred_weights(mcgcn_model: str, ahnet: nn.Module, seed: int) -> dict:
    """The state of an AH-Net like ``ahnet`` whose encoder is the MC-GCN model's (AH-Net sec. 3.2),
    built after reseeding so that its fresh decoder equals ``ahnet``'s own initialisation."""
    mcgcn = load_model(mcgcn_model, device="cpu").network
    if isinstance(mcgcn, SliceStack2D):
        mcgcn = mcgcn.net
    if not isinstance(mcgcn, MCGCN):
        config_error("init_weights.transfer_from", f"{mcgcn_model} holds a {type(mcgcn).__name__}, not an MC-GCN")
    for key, value in (("backbone", mcgcn.backbone), ("stem_slices", mcgcn.in_channels)):
        if ahnet.config[key] != value:
            config_error("architecture.config", f"{key} is {ahnet.config[key]!r} but the MC-GCN in {mcgcn_model} has {value!r}")
    torch.manual_seed(seed)
    return transfer_mcgcn_to_ahnet(mcgcn, **ahnet.config).state_dict()


def _converted_weights(model_2d: str, arch_config: dict) -> dict:
    """The state of the trained 2D model converted as ``arch_config`` says (a "converted" architecture)."""
    loaded = load_model(model_2d, device="cpu")
    network = loaded.network.net if isinstance(loaded.network, SliceStack2D) else loaded.network
    name = loaded.card["architecture"]["name"]
    if name.removesuffix("_multislice") != arch_config["source"].removeprefix("transferseg:"):
        config_error("init_weights.convert_from", f"{model_2d} holds a {name!r} network; architecture.config.source is "
              f"{arch_config['source']!r}")
    expected = build_network(arch_config["source"].removeprefix("transferseg:"), arch_config.get("config")).config
    given = {k: v for k, v in getattr(network, "config", {}).items() if k in expected}
    if given != expected:
        differ = [k for k in expected if given.get(k) != expected[k]]
        config_error("architecture.config.config", f"{differ[0]} is {expected[differ[0]]!r} but the 2D network in {model_2d} "
              f"has {given.get(differ[0])!r}")
    return convert(network, arch_config.get("to", "acs")).state_dict()


def _initial_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        file = Path(path).expanduser()
        if not file.exists():
            config_error("init_weights", f"{file}: no such file")
        return read_state_dict(file)
    loaded = load_model(path, device="cpu")
    if len(loaded.components) == 1:
        return loaded.network.state_dict()
    # a composed model (e.g. a cascade's coarse and fine networks): COMPONENT.key, as its file stores them;
    # init_weights.source_prefix picks one component
    return {f"{name}.{key}": value for name, component in loaded.components.items()
            for key, value in component.network.state_dict().items()}
