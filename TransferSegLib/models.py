"""Model cards and the safetensors model registry.

A model is two files side by side: ``NAME.safetensors`` (weights only, never pickle) and
``NAME.json``, its card.  A card of one network::

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

A composed card (several networks that one method runs together) says how, and keeps each
network's part of the card under its component name::

    {
      "name": ..., "version": ..., "task": ..., "labels": [...],
      "method": {"name": "multiview", "config": {"fusion": "majority"}},
      "components": {"axial": {"architecture": {...}, "preprocessing": {...}, "patch_size": [...],
                               "inference": {...}, "view": "axial"}, "coronal": {...}, ...},
      "training": {"composed_from": {...}}, "weights": {"file": ..., "sha256": ...}
    }

All components' weights sit in the one safetensors file under prefixed keys (``axial.…``):
one sha256, one strict load per component.  A card without ``method`` is read as method
``single`` with one component, ``network``, built from the card's top-level keys, whose keys
have no prefix, so cards written before compositions load unchanged.  The method's name is
only stored here; the methods themselves are looked up by name in a registry, and a card
never names code to import.

Every card is checked when it is read (:func:`TransferSegLib.cards.check_card`: every value the
pipeline uses later, before any volume is read), and a card file far larger or deeper than a
card is refused before it is parsed.  :func:`load_model` verifies the sha256 before it reads a
tensor and refuses, with an error a user can act on: a checksum mismatch, a malformed
safetensors header, a pickle / ``.pt`` / ``.pth`` file (never unpickled),
a card naming an unknown architecture, weights that do not fit the architecture (checked
against the file's header before any network is allocated, so an absurd config is refused
at once), tensors that belong to no component, and a truncated file.  Models are looked up
by name in the user folder (``$TRANSFERSEG_MODELS``, default ``~/.transferseg/models``) and
then in the models shipped with TransferSeg.  :func:`compose_models` assembles separately
trained models into one composed model (``transferseg compose``).
"""
from __future__ import annotations

import copy
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_output, same_file
from .cards import COMPONENT_NAME, VIEWS, check_card, is_composed
from .progress import one_line
from .volume import TransferSegError
from .weights import read_header, read_state_dict, refuse_pickle_suffix, save_state_dict

__all__ = ["Component", "LoadedModel", "DEFAULT_DETECTION_MODEL", "DEFAULT_SEGMENTATION_MODEL", "component_specs",
           "compose_models", "find_model", "list_models", "load_model", "method_of", "model_dirs", "read_card",
           "save_model"]

DEFAULT_SEGMENTATION_MODEL = "ct-liver-tumor-unet3d"
DEFAULT_DETECTION_MODEL = "dbt-lesion-ahnet"
#: the keys of a card that describe one network (a component's spec); also every ``patch_…`` key
_SPEC_KEYS = ("architecture", "preprocessing", "patch_size", "expected_spacing_mm", "working_spacing_mm",
              "inference", "view")
_SINGLE_COMPONENT = "network"
#: a card is a few KB of JSON; anything far larger is not a card, and is refused before it is parsed
_MAX_CARD_BYTES = 16 * 2**20


@dataclass
class Component:
    """One network of a model: its name in the card, the network (eval mode) and its spec
    (the component's part of the card: architecture, preprocessing, patch_size, inference, …)."""

    name: str
    network: object
    spec: dict


@dataclass
class LoadedModel:
    """A model's networks in eval mode, with its card, method and where it came from."""

    card: dict
    path: Path
    components: dict  # name -> Component
    method: dict  # {"name": ..., "config": {...}}

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def network(self):
        """The network of a single-network model (a composed model has one per component)."""
        if len(self.components) != 1:
            raise TransferSegError(
                f"{self.name} is a composed model ({self.method['name']}: components "
                f"{', '.join(self.components)}); take a network from .components[NAME].network"
            )
        return next(iter(self.components.values())).network


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


# --- cards: one network, or method + components (checked by cards.check_card) ------------------
def method_of(card: dict) -> dict:
    """``{"name", "config"}`` of a card; a card without ``method`` is ``single``."""
    method = card.get("method") or {"name": "single"}
    return {"name": method["name"], "config": copy.deepcopy(method.get("config") or {})}


def _spec_of(card: dict) -> dict:
    """The part of a (single-network) card that describes its network."""
    return {k: copy.deepcopy(v) for k, v in card.items() if k in _SPEC_KEYS or k.startswith("patch_")}


def component_specs(card: dict) -> dict:
    """Component name -> spec.  A card without ``method`` has one component, ``network``,
    whose spec is the card's top-level architecture, preprocessing, patch_size, inference, …"""
    if is_composed(card):
        return copy.deepcopy(card["components"])
    return {_SINGLE_COMPONENT: _spec_of(card)}


def _read_card(card_path: Path) -> dict:
    try:
        info = card_path.stat()
        size = info.st_size
        if not stat.S_ISREG(info.st_mode):  # a FIFO would hang the read, /dev/zero would fill the memory
            raise TransferSegError(f"{card_path}: the model card is not a regular file (a pipe, a device or a "
                                   "folder); give the model's NAME.json")
        if size > _MAX_CARD_BYTES:
            raise TransferSegError(f"{card_path}: the model card is {size / 2**20:.0f} MiB; a card is a few KB of "
                                   "JSON (give the model's NAME.json, or install the model again)")
        card = json.loads(card_path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no reason to refuse
    except FileNotFoundError:
        raise TransferSegError(f"{card_path}: the model card is missing; a model is NAME.safetensors with its "
                               "card NAME.json beside it (give the card, or install the model again)") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an integer of 5,000 digits
        raise TransferSegError(f"{card_path}: the model card is not valid JSON ({one_line(e)})") from None
    except RecursionError:  # lists in lists, thousands deep: no card looks like that
        raise TransferSegError(f"{card_path}: the model card is nested too deeply to be a model card; give the "
                               "model's NAME.json, or install the model again") from None
    check_card(card, str(card_path))
    return card


def read_card(name_or_path) -> dict:
    """The checked card of a model given by name, card path, weights path or folder, without
    reading its weights (cheap: what a command checks before it loads and runs the model)."""
    return _read_card(find_model(name_or_path))


# --- loading ----------------------------------------------------------------------------------
def _key_prefix(card: dict, component: str) -> str:
    return f"{component}." if is_composed(card) else ""


def _split_keys(card: dict, header: dict, weights_path: Path) -> dict:
    """Component name -> {key in the network: key in the file}; every file key in exactly one."""
    if not is_composed(card):
        return {_SINGLE_COMPONENT: {key: key for key in header}}
    groups = {name: {} for name in card["components"]}
    leftover = []
    for key in header:
        component, _, rest = key.partition(".")
        if component in groups and rest:
            groups[component][rest] = key
        else:
            leftover.append(key)
    if leftover:
        raise TransferSegError(
            f"{weights_path}: {len(leftover)} tensor(s) belong to no component of the card "
            f"({_some(leftover)}); a composed model's keys start with one of: "
            f"{', '.join(name + '.' for name in groups)}"
        )
    return groups


def _some(keys, n=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _shape(shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _check_fits(component: str, spec: dict, keys: dict, header: dict, weights_path: Path, prefix: str) -> None:
    """Compare the file's keys and shapes with the architecture's, built on the meta device (no
    memory), so an absurd config is refused at once instead of dying in the allocator."""
    # torch and the networks load with a model's weights, not with this module: reading cards
    # (`transferseg models`, the Slicer module's model list before torch is installed) stays torch-free
    import torch
    from .nets import build_network  # imports torch too

    arch = spec["architecture"]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_network(arch.get("name"), arch.get("config", {}))
                    .state_dict().items()}
    missing = [prefix + k for k in expected if k not in keys]
    unexpected = [keys[k] for k in keys if k not in expected]
    misshapen = [f"{keys[k]} is {_shape(header[keys[k]][1])} in the file but the config needs {_shape(shape)}"
                 for k, shape in expected.items() if k in keys and header[keys[k]][1] != shape]
    parts = ([f"missing {_some(missing)}"] if missing else []) + \
            ([f"unexpected {_some(unexpected)}"] if unexpected else []) + misshapen[:3] + \
            ([f"and {len(misshapen) - 3} more misshapen"] if len(misshapen) > 3 else [])
    if parts:
        whose = f"component {component!r}: " if prefix else ""
        raise TransferSegError(
            f"{weights_path}: the weights do not fit {whose}architecture {arch.get('name')!r} with config "
            f"{arch.get('config')}: {'; '.join(parts)}"
        )


def load_model(name_or_path, device="cpu") -> LoadedModel:
    """Load a model by name or path: card checked, sha256 verified, the file's shapes checked
    against every component's architecture, weights loaded strictly, eval mode."""
    import torch  # not at the top: see _check_fits
    from .nets import build_network  # imports torch too

    card_path = find_model(name_or_path)
    card = _read_card(card_path)
    file_name = card["weights"].get("file", card_path.with_suffix(".safetensors").name)
    if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
        # a card from a stranger must not point at files outside its own folder
        raise TransferSegError(f"{card_path}: weights.file must be a file name beside the card, not {file_name!r}")
    weights_path = card_path.parent / file_name
    if not weights_path.exists():
        raise TransferSegError(f"{card_path}: the weights file {weights_path.name} is missing beside the card")
    header = read_header(weights_path)  # refuses pickles and truncated files before hashing
    expected = card["weights"].get("sha256")
    if not isinstance(expected, str) or not expected:
        raise TransferSegError(f"{card_path}: the card has no weights.sha256, so its weights cannot be verified; "
                               "reinstall the model (or write it again with save_model)")
    state = read_state_dict(weights_path, sha256=expected)  # the bytes verified are the bytes loaded
    specs = component_specs(card)
    groups = _split_keys(card, header, weights_path)
    for name, spec in specs.items():
        _check_fits(name, spec, groups[name], header, weights_path, _key_prefix(card, name))
    target = torch.device(device) if isinstance(device, str) else device
    components = {}
    for name, spec in specs.items():
        arch = spec["architecture"]
        network = build_network(arch.get("name"), arch.get("config", {}))
        try:
            network.load_state_dict({k: state.pop(key) for k, key in groups[name].items()}, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "shapes differ"
            raise TransferSegError(
                f"{weights_path}: the weights do not fit architecture {arch.get('name')!r} with config "
                f"{arch.get('config')}: {first}"
            ) from None
        network.eval()
        network.to(target)
        components[name] = Component(name, network, spec)
    return LoadedModel(card, card_path, components, method_of(card))


# --- writing ----------------------------------------------------------------------------------
def save_model(network_or_components, card: dict, folder, storage_dtype: str | None = None) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` (with the weights' sha256) into ``folder``, atomically.

    ``network_or_components`` is one network with a card of one network, or a dict component
    name -> network with a composed card (``method`` + ``components`` with the same names),
    whose weights are written under the keys ``NAME.…``.  ``card`` needs every key of its
    form except ``weights``.  ``storage_dtype="float16"`` stores floating-point tensors in half
    precision (loading casts them back to the network's float32).  Returns the card path.
    """
    folder = Path(folder)
    card = dict(card)
    name = card.get("name")
    if not name or "/" in name:
        raise TransferSegError(f"a model needs a plain name; got {name!r}")
    check_card({**card, "weights": {}}, f"model card for {name}")
    if isinstance(network_or_components, dict):
        if not is_composed(card) or set(network_or_components) != set(card["components"]):
            given = ", ".join(network_or_components)
            raise TransferSegError(f"model {name}: networks {given} need a composed card whose components are "
                                   f"exactly {given}; the card has {', '.join(card.get('components') or []) or 'none'}")
        state = {f"{component}.{key}": tensor for component, network in network_or_components.items()
                 for key, tensor in network.state_dict().items()}
    else:
        if is_composed(card):
            raise TransferSegError(f"model {name}: a composed card takes a dict of networks, one per component "
                                   f"({', '.join(card['components'])})")
        state = network_or_components.state_dict()
    if storage_dtype not in (None, "float16"):
        raise TransferSegError(f"storage_dtype is None or 'float16'; got {storage_dtype!r}")
    if storage_dtype == "float16":
        state = {key: t.half() if t.is_floating_point() else t for key, t in state.items()}
    weights = folder / f"{name}.safetensors"
    digest = save_state_dict(state, weights, metadata={"name": name, "format": "pt"})
    card["weights"] = {"file": weights.name, "sha256": digest, "bytes": weights.stat().st_size}
    if storage_dtype:
        card["weights"]["dtype"] = storage_dtype
    card_path = folder / f"{name}.json"
    with atomic_output(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card_path


def compose_models(components: dict, folder, *, name: str, method: str, method_config: dict | None = None,
                   labels_from: str | None = None, version: str = "1.0.0", description: str | None = None,
                   storage_dtype: str | None = None) -> Path:
    """Assemble separately trained models into one composed model; returns its card path.

    ``components`` maps a component name to a model (name, card path, weights path or
    folder); each must hold one network.  Each component's spec is its source's architecture,
    preprocessing, patch size, spacing and inference settings, with ``view`` = the component
    name for axial / coronal / sagittal.  Task, labels (and the evaluation regions, peaks,
    post-processing and working grid that go with them) come from ``labels_from`` (default:
    the first component); all sources must share the task.  ``training`` records every source model and
    its sha256.  The weights are written once, under prefixed keys, with one sha256.
    """
    if not components:
        raise TransferSegError("compose needs at least one component, e.g. axial=MODEL")
    for component in components:
        if not COMPONENT_NAME.fullmatch(str(component)):
            raise TransferSegError(f"component name {component!r} may hold only letters, digits, '_' and '-'")
    if not isinstance(method, str) or not method:
        raise TransferSegError("compose needs a method name, e.g. multiview")
    from .methods import METHODS, get_method  # the methods import torch; this module stays torch-free (see _check_fits)

    try:
        get_method(method)
    except TransferSegError:
        raise TransferSegError(f"method {method!r} is not one of the methods: {', '.join(sorted(METHODS))}") from None
    if method_config is not None and not isinstance(method_config, dict):
        raise TransferSegError(f"the method config must be a JSON object, not "
                               f"{json.dumps(method_config, default=str)}")
    labels_from = labels_from or next(iter(components))
    if labels_from not in components:
        raise TransferSegError(f"labels from {labels_from!r}: no such component (components: "
                               f"{', '.join(components)})")
    sources, specs = {}, {}
    for component, source in components.items():
        loaded = load_model(source)  # sha256 verified, loaded strictly
        if len(loaded.components) != 1:
            raise TransferSegError(f"{loaded.path}: {loaded.name} is itself composed ({', '.join(loaded.components)}); "
                                   "compose takes models of one network")
        spec = copy.deepcopy(next(iter(loaded.components.values())).spec)
        if component in VIEWS:
            if spec.get("view", component) != component:
                raise TransferSegError(f"{loaded.path}: {loaded.name} was made for the {spec['view']} view, "
                                       f"not {component}")
            spec["view"] = component
        sources[component], specs[component] = loaded, spec
    written = [Path(folder) / f"{name}.json", Path(folder) / f"{name}.safetensors"]
    for loaded in sources.values():
        weights = loaded.card["weights"].get("file", f"{loaded.path.stem}.safetensors")
        if any(same_file(a, b) for a in written for b in (loaded.path, loaded.path.with_name(weights))):
            raise TransferSegError(f"composing {name} into {folder} would overwrite its component {loaded.path}; "
                                   "choose another output folder or name")
    tasks = {component: loaded.card["task"] for component, loaded in sources.items()}
    if len(set(tasks.values())) > 1:
        raise TransferSegError("the components disagree on the task (" + ", ".join(
            f"{component}: {task}" for component, task in tasks.items()) + "); a composed model has one task")
    first = sources[labels_from].card
    card = {"name": name, "version": version, "task": first["task"], "labels": copy.deepcopy(first["labels"])}
    if description:
        card["description"] = description
    card["method"] = {"name": method, "config": copy.deepcopy(method_config or {})}
    card["components"] = specs
    # the pipeline resamples once, to the model's grid: that of the labels' source (a method may
    # resample further for a component whose spec names its own working spacing)
    for key in ("evaluation", "postprocessing", "peaks", "expects", "working_spacing_mm", "working_orientation",
                "trained_spacing_mm", "expected_spacing_mm"):
        if first.get(key) is not None:
            card[key] = copy.deepcopy(first[key])
    card["training"] = {"composed_from": {
        component: {"model": loaded.name, "version": loaded.card.get("version"), "card": str(loaded.path),
                    "sha256": loaded.card["weights"]["sha256"]}
        for component, loaded in sources.items()}}
    return save_model({component: loaded.network for component, loaded in sources.items()}, card, folder,
                      storage_dtype=storage_dtype)


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
