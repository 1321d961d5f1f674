"""Recipes: several trainer runs assembled into one model, resumable as a whole.

``multiview`` (the Volumetric Fusion Net, Xia et al. 2018, sec. 2.3) trains three 2D networks,
one per anatomical view, then a fusion network on the views' predictions for cases those 2D
networks did not see, and composes them into one model (method ``multiview``)::

    {"recipe": "multiview", "name": "ct-liver-tumor-vfn", "version": "1.0.0", "description": "...",
     "seed": 0, "labels": [...], "data": {...any trainer data source...},
     "preprocessing": {...}, "working_spacing_mm": [3, 2, 2], "working_orientation": "LPS",
     "expected_spacing_mm": [...], "postprocessing": {...}, "evaluation": {...},
     "views": {...trainer keys for each 2D network: architecture, patch_size, stages, ...},
     "fusion": {...trainer keys for the VFN: architecture, patch_size, stages, ...},
     "fusion_data": {"split": 0.33} | {"cross": 4},
     "ablation_no_image": true,
     "method": {"fusion": "vfn", ...methods.multiview settings}}

``fusion_data``: ``split`` keeps a seeded share of the cases away from the 2D networks and
predicts them for the VFN (the paper's own data set); ``cross`` is cross-cross-augmentation
with K folds: for each fold k the three 2D networks are trained on the other folds and predict
fold k, so every case trains the VFN and the final 2D networks train on every case — K extra
sets of view networks (over a K-fold cross-validation that is the paper's K(K − 1)/2 extra
models per view).  ``ablation_no_image`` also trains a VFN without the image channel (the
paper's ablation); it ships as the component ``fusion_noimage``.  To fine-tune a trained
multiview model, give ``views`` an ``init_weights`` whose ``source_prefix`` is ``"{view}."`` (each
view network starts from its own view's tensors) and ``fusion`` one with ``"{fusion}."`` (the VFN
from ``fusion.``, the VFN without the image from ``fusion_noimage.``).

What a run writes into OUT: ``cases/`` (the working-grid cache every run shares),
``views/<view>/`` and with ``cross`` ``views-fold<k>/<view>/`` (trainer runs), ``stacks/``
(one .npz per fusion case: the image and the views' P(label ≥ c), each in [0, 1]),
``fusion/`` and ``fusion-noimage/`` (trainer runs), ``model/NAME.{safetensors,json}``.
Running it again resumes: a finished trainer run and an existing stack are not redone.

``cascade`` (H-DenseUNet, Li et al. 2018) trains a coarse liver network and the H-DenseUNet in
its three stages, and composes them into one model (method ``cascade``); see :func:`cascade`::

    {"recipe": "cascade", ...the shared keys above..., "coarse": {...trainer keys, with its own
     working_spacing_mm; "data": {"count": 40} changes the shared data for this part...},
     "net2d": {...}, "hybrid": {...}, "net3d": {...} | null,
     "method": {...methods.cascade settings}}

``transfer`` (AH-Net sec. 3.2, ACS sec. 3.2) trains a 2D network on slices (``source``), then
the 3D network that starts from it (``target``: an "ahnet" or a "converted" architecture), and
ships the target as one fp16 model; see :func:`transfer`.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_output, check_output_folder
from ..fusion import fusion_input
from ..labels import VIEWS
from ..methods.cascade import DEFAULTS
from ..models import compose_models, load_model, save_model
from ..preprocessing import preprocess
from ..progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from ..views import directions_of, predict_view
from ..volume import TransferSegError
from .config import validate_config
from .sampling import cached_working_case, cases_from_spec, write_stack
from .mass_candidates import mass_candidates_recipe, validate_mass_candidates
from .specks import specks, validate_specks
from .trainer import train

__all__ = ["RECIPES", "cascade", "fusion_channels", "is_recipe", "multiview", "run_recipe", "transfer",
           "validate_recipe"]

COMMON = ("name", "version", "task", "description", "seed", "labels", "data", "preprocessing", "working_spacing_mm",
          "working_orientation", "expected_spacing_mm", "postprocessing", "evaluation", "peaks", "expects", "threads",
          "device")
MULTIVIEW_KEYS = COMMON + ("recipe", "views", "fusion", "fusion_data", "ablation_no_image", "method")


def is_recipe(config: dict) -> bool:
    return isinstance(config, dict) and "recipe" in config


def _fail(key: str, message: str):
    raise TransferSegError(f"recipe config: {key}: {message}")


def _sub_config(config: dict, part: dict, **changes) -> dict:
    sub = {key: copy.deepcopy(config[key]) for key in COMMON if key in config}
    sub.update(copy.deepcopy(part))
    sub.update(changes)
    return sub


def _checked_copy(config: dict, recipe: str, keys: tuple, required: tuple) -> dict:
    """A copy of ``config`` without its "_" comments, after checking its keys against ``keys``."""
    unknown = sorted(set(config) - set(keys) - {k for k in config if k.startswith("_")})
    if unknown:
        _fail(unknown[0], f"unknown key; a {recipe} recipe has {', '.join(keys)}")
    for key in required:
        if key not in config:
            _fail(key, "required")
    return copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")})


def _part_config(config: dict, part: str, out: Path, data: dict = None, **changes) -> dict:
    """The trainer config of a recipe's ``part``: the shared keys, the part's own, its data (the
    shared data changed by the part's, e.g. the count) cached in OUT/cases, named NAME-part."""
    data = dict(config["data"], **config[part].get("data", {})) if data is None else data
    if "stacks" not in data and data.get("cache") is not False:
        data["cache"] = str(out / "cases")
    return _sub_config(config, config[part], **{"name": f"{config['name']}-{part}", "data": data, **changes})


def _view_config(config: dict, view: str, names: list, out: Path, suffix: str = "") -> dict:
    sub = _part_config(config, "views", out, data=dict(config["data"], select=list(names)),
                       name=f"{config['name']}-{view}{suffix}", view=view)
    init = sub.get("init_weights")
    if isinstance(init, dict) and "{view}" in str(init.get("source_prefix", "")):
        # fine-tuning a composed multiview model: each view network starts from its own view's tensors
        sub["init_weights"] = dict(init, source_prefix=init["source_prefix"].replace("{view}", view))
    return sub


def _fusion_config(config: dict, out: Path, num_classes: int, image: bool) -> dict:
    fusion = copy.deepcopy(config["fusion"])
    arch = fusion.setdefault("architecture", {"name": "vfn"})
    channels = fusion_channels(num_classes)
    arch.setdefault("config", {})
    arch["config"] = dict(arch["config"], in_channels=channels - (0 if image else 1), out_channels=num_classes)
    data = {"stacks": str(out / "stacks"), "crop_to_foreground": config["fusion_data"].get("roi_margin", 32)}
    if not image:
        data["channels"] = list(range(1, channels))
    init = fusion.get("init_weights")
    if isinstance(init, dict) and "{fusion}" in str(init.get("source_prefix", "")):
        # fine-tuning a composed multiview model: each VFN from its own component's tensors
        fusion["init_weights"] = dict(init, source_prefix=init["source_prefix"].replace(
            "{fusion}", "fusion" if image else "fusion_noimage"))
    return _sub_config(config, fusion, name=f"{config['name']}-fusion" + ("" if image else "-noimage"),
                       data=data, preprocessing={})


def fusion_channels(num_classes: int) -> int:
    """Input channels of the fusion network: the image and, per view, P(label ≥ c) for c = 1 … K − 1."""
    return 1 + 3 * (num_classes - 1)


def validate_multiview(config: dict) -> dict:
    """A checked copy of a multiview recipe config; every sub-config is checked by the trainer."""
    c = _checked_copy(config, "multiview", MULTIVIEW_KEYS, ("name", "labels", "data", "views", "fusion"))
    if c.get("working_orientation") is None:
        _fail("working_orientation", "views are anatomical: name the working orientation, e.g. \"LPS\"")
    fd = c.setdefault("fusion_data", {"split": 0.33})
    if not isinstance(fd, dict) or len(set(fd) & {"split", "cross"}) != 1 or set(fd) - {"split", "cross", "roi_margin"}:
        _fail("fusion_data", f"must be {{\"split\": fraction}} or {{\"cross\": K folds}} (+ \"roi_margin\"); got {fd!r}")
    if "split" in fd and not (isinstance(fd["split"], (int, float)) and 0 < fd["split"] < 1):
        _fail("fusion_data.split", f"must be a fraction in (0, 1); got {fd['split']!r}")
    if "cross" in fd and not (isinstance(fd["cross"], int) and fd["cross"] >= 2):
        _fail("fusion_data.cross", f"must be a number of folds ≥ 2; got {fd['cross']!r}")
    if not isinstance(c.setdefault("ablation_no_image", False), bool):
        _fail("ablation_no_image", "must be true or false")
    method = c.setdefault("method", {})
    if not isinstance(method, dict):
        _fail("method", "must be a JSON object of methods.multiview settings")
    num_classes = len(c["labels"]) + 1
    # the trainer checks every part; its messages name the key inside the part
    _check_part(_view_config(c, "axial", ["x"], Path(".")), "views", c["views"])
    _check_part(dict(_fusion_config(c, Path("."), num_classes, True), data={"stacks": "."}), "fusion", c["fusion"])
    return c


def _check_part(sub: dict, part: str, written: dict) -> None:
    try:
        validate_config(sub)
    except TransferSegError as e:
        message = str(e).removeprefix("training config: ")
        key = message.split(":", 1)[0].split(".")[0].split("[")[0]
        where = part if key in written else "the recipe's shared keys"
        raise TransferSegError(f"recipe config: {part + '.' if key in written else ''}{message}"
                               + ("" if key in written else f" (in {where})")) from None


def _split(names: list, config: dict) -> list:
    """[(names that train the view networks, names they predict for the fusion net, folder suffix)]."""
    rng = np.random.default_rng([config.get("seed", 0), 11])
    order = [names[i] for i in rng.permutation(len(names))]
    fd = config["fusion_data"]
    if "split" in fd:
        n = max(1, round(fd["split"] * len(order)))
        if n >= len(order):
            raise TransferSegError(f"fusion_data.split {fd['split']} leaves no case for the view networks "
                                   f"({len(order)} cases)")
        return [(sorted(order[n:]), sorted(order[:n]), "")]
    folds = [sorted(f.tolist()) for f in np.array_split(np.array(order, dtype=object), fd["cross"])]
    if any(not f for f in folds):
        raise TransferSegError(f"fusion_data.cross {fd['cross']} folds need at least as many cases; there are {len(order)}")
    groups = [(sorted(n for j, f in enumerate(folds) if j != k for n in f), folds[k], f"-fold{k}")
              for k in range(len(folds))]
    return groups


def _train_once(config: dict, out: Path, progress, cancel, max_steps=None):
    if (out / "result.json").exists():
        return None
    return train(config, out, progress=progress, cancel=cancel, max_steps=max_steps)


def _predict_stack(case, view_models: dict, config: dict, path: Path, cancel) -> None:
    sub = validate_config(_view_config(config, "axial", [case.name], path.parent.parent))
    array, target, spacing = cached_working_case(case, sub, Path(sub["data"]["cache"]) if sub["data"].get("cache") else None)
    image = preprocess(array, config.get("preprocessing"))
    directions = directions_of(config["working_orientation"])
    num_classes = len(config["labels"]) + 1
    views = [predict_view(view_models[view].network, image, directions, view, num_classes=num_classes,
                          batch_size=16, cancel=cancel) for view in VIEWS]
    write_stack(path, fusion_input(image, views), target, spacing)


def multiview(config: dict, output_dir, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None, max_steps: Optional[int] = None) -> Path:
    """Run the multiview recipe into ``output_dir``; returns the composed model's card path."""
    c = validate_multiview(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")
    cases = cases_from_spec(c["data"])
    names = [case.name for case in cases]
    by_name = {case.name: case for case in cases}
    groups = _split(names, c)
    num_classes = len(c["labels"]) + 1
    runs = [(suffix, view, train_names) for train_names, _, suffix in groups for view in VIEWS]
    if "cross" in c["fusion_data"]:
        runs += [("", view, sorted(names)) for view in VIEWS]  # the final view networks see every case
    fusion_runs = [True] + ([False] if c["ablation_no_image"] else [])
    total = len(runs) + 1 + len(fusion_runs)
    timings = {}

    def part(n):
        return StageProgress(progress, n / total, (n + 1) / total) if progress else None

    tic = time.perf_counter()
    for n, (suffix, view, train_names) in enumerate(runs):
        check_cancel(cancel)
        _train_once(_view_config(c, view, train_names, out, suffix), out / f"views{suffix}" / view, part(n), cancel,
                    max_steps)
    timings["views_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    stacks = out / "stacks"
    stacks.mkdir(exist_ok=True)
    for _, fusion_names, suffix in groups:
        view_models = {view: load_model(out / f"views{suffix}" / view / "model" / f"{c['name']}-{view}{suffix}.json")
                       for view in VIEWS}
        for name in fusion_names:
            check_cancel(cancel)
            path = stacks / f"{name}.npz"
            if not path.exists():
                _predict_stack(by_name[name], view_models, c, path, cancel)
    timings["stacks_s"] = time.perf_counter() - tic
    if progress:
        progress((len(runs) + 1) / total, "fusion data")

    tic = time.perf_counter()
    for n, image in enumerate(fusion_runs):
        check_cancel(cancel)
        _train_once(_fusion_config(c, out, num_classes, image), out / ("fusion" if image else "fusion-noimage"),
                    part(len(runs) + 1 + n), cancel, max_steps)
    timings["fusion_s"] = time.perf_counter() - tic

    components = {view: out / "views" / view / "model" / f"{c['name']}-{view}.json" for view in VIEWS}
    components["fusion"] = out / "fusion" / "model" / f"{c['name']}-fusion.json"
    if c["ablation_no_image"]:
        components["fusion_noimage"] = out / "fusion-noimage" / "model" / f"{c['name']}-fusion-noimage.json"
    missing = [str(p) for p in components.values() if not p.exists()]
    if missing:  # stopped early (max_steps): rerun to resume
        return None
    method = dict(c["method"])
    method.setdefault("fusion", "vfn")
    card = compose_models(components, out / "model", name=c["name"], method="multiview", method_config=method,
                          labels_from="axial", version=c.get("version", "1.0.0"), description=c.get("description"),
                          storage_dtype="float16")
    stored = json.loads(card.read_text(encoding="utf-8"))
    stored["training"]["recipe"] = {"config": c, "splits": [{"views": t, "fusion": f} for t, f, _ in groups],
                                    "seconds": {k: round(v, 1) for k, v in timings.items()}}
    with atomic_output(card) as tmp:
        tmp.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    return card


CASCADE_PARTS = ("coarse", "net2d", "hybrid", "net3d")
CASCADE_KEYS = COMMON + ("recipe", "method") + CASCADE_PARTS


def _cascade_config(config: dict, part: str, out: Path) -> dict:
    sub = _part_config(config, part, out)
    if part == "hybrid" and not config["hybrid"].get("init_weights"):
        # the 2D network of stage 1 goes into the H-DenseUNet's net2d
        sub["init_weights"] = {"path": str(out / "net2d" / "model" / f"{config['name']}-net2d.json"),
                               "prefix": "net2d.", "source_prefix": "net.", "strict": True}
    return sub


def validate_cascade(config: dict) -> dict:
    """A checked copy of a cascade recipe config; every part is checked by the trainer.  A
    ``hybrid`` with its own ``init_weights`` (fine-tuning a trained cascade, e.g. from the
    ``fine.`` tensors of a shipped model) needs no ``net2d`` stage."""
    fine_tune = isinstance(config.get("hybrid"), dict) and bool(config["hybrid"].get("init_weights"))
    c = _checked_copy(config, "cascade", CASCADE_KEYS,
                      ("name", "labels", "data", "coarse", "hybrid") + (() if fine_tune else ("net2d",)))
    if not isinstance(c.setdefault("method", {}), dict):
        _fail("method", "must be a JSON object of methods.cascade settings")
    unknown = sorted(set(c["method"]) - set(DEFAULTS))
    if unknown:
        _fail(f"method.{unknown[0]}", f"is not a cascade setting; there are {', '.join(DEFAULTS)}")
    for part in CASCADE_PARTS:
        if c.get(part) is None:
            continue
        sub = _cascade_config(c, part, Path("."))
        if part == "hybrid" and not fine_tune:
            sub["init_weights"] = None  # the stage-1 model does not exist yet
        _check_part(sub, part, c[part])
    return c


def cascade(config: dict, output_dir, progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None, max_steps: Optional[int] = None) -> Path:
    """Run the cascade recipe (H-DenseUNet, Li et al. 2018, sec. III-C) into ``output_dir``.

    Parts, each a trainer run in its own folder: ``coarse`` (the liver locator on its own
    coarse working grid), ``net2d`` (stage 1: the 2D DenseUNet on adjacent slices; its
    stages may warm up without the UNet connections), ``hybrid`` (stages 2 and 3: the
    H-DenseUNet with ``net2d`` initialised from stage 1; 3D net + HFF with the 2D net and its
    BatchNorm frozen, then jointly with the λ-weighted 2D loss), and optionally ``net3d`` (the
    3D DenseUNet alone, Table II's third row; not shipped).  The coarse and hybrid networks are
    composed into one fp16 model, method ``cascade``.  Running it again resumes.
    """
    c = validate_cascade(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")
    parts = [part for part in CASCADE_PARTS if c.get(part) is not None]
    timings = {}
    for n, part in enumerate(parts):
        check_cancel(cancel)
        tic = time.perf_counter()
        _train_once(_cascade_config(c, part, out), out / part,
                    StageProgress(progress, n / len(parts), (n + 1) / len(parts)) if progress else None,
                    cancel, max_steps)
        timings[f"{part}_s"] = time.perf_counter() - tic
    components = {"coarse": out / "coarse" / "model" / f"{c['name']}-coarse.json",
                  "fine": out / "hybrid" / "model" / f"{c['name']}-hybrid.json"}
    if any(not p.exists() for p in components.values()):  # stopped early (max_steps): rerun to resume
        return None
    card = compose_models(components, out / "model", name=c["name"], method="cascade", method_config=c["method"],
                          labels_from="fine", version=c.get("version", "1.0.0"), description=c.get("description"),
                          storage_dtype="float16")
    stored = json.loads(card.read_text(encoding="utf-8"))
    stored["training"]["recipe"] = {"config": c, "seconds": {k: round(v, 1) for k, v in timings.items()}}
    with atomic_output(card) as tmp:
        tmp.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    return card


TRANSFER_PARTS = ("source", "target")
TRANSFER_KEYS = COMMON + ("recipe",) + TRANSFER_PARTS
#: target architecture -> the init_weights key that carries the trained 2D network into it
TRANSFER_INIT = {"ahnet": "transfer_from", "converted": "convert_from"}


def _transfer_config(config: dict, part: str, out: Path) -> dict:
    sub = _part_config(config, part, out)
    if part == "target":
        key = TRANSFER_INIT.get(sub.get("architecture", {}).get("name"))
        if key is None:
            _fail("target.architecture.name",
                  f"must be an architecture the 2D network transfers into: {', '.join(TRANSFER_INIT)}")
        sub["init_weights"] = {key: str(out / "source" / "model" / f"{config['name']}-source.json")}
    return sub


def validate_transfer(config: dict) -> dict:
    """A checked copy of a transfer recipe config; both parts are checked by the trainer."""
    c = _checked_copy(config, "transfer", TRANSFER_KEYS, ("name", "labels", "data", "source", "target"))
    for part in TRANSFER_PARTS:
        if not isinstance(c[part], dict):
            _fail(part, "must be a JSON object of trainer keys")
        if "init_weights" in c[part] and part == "target":
            _fail("target.init_weights", "is set by the recipe: the source part's model")
        sub = _transfer_config(c, part, Path("."))
        if part == "target":
            sub["init_weights"] = None  # the source model does not exist yet
        _check_part(sub, part, c[part])
    return c


def transfer(config: dict, output_dir, progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, max_steps: Optional[int] = None) -> Path:
    """Run the transfer recipe into ``output_dir``: a 2D network, then the 3D network it becomes.

    ``source`` trains the 2D network on slices; ``target`` trains the 3D network that starts
    from it: an "ahnet" whose encoder is the MC-GCN's made 3D (AH-Net sec. 3.2,
    ``init_weights.transfer_from``) or a "converted" network, the 2D one converted by
    ``nets.convert`` (ACS sec. 3.2, ``init_weights.convert_from``)::

        {"recipe": "transfer", ...the shared keys above..., "source": {...trainer keys...},
         "target": {...trainer keys...}}

    The target is written as the fp16 model ``NAME`` (OUT/model), its card naming both runs and
    their times.  Running it again resumes; a finished part is not redone.
    """
    c = validate_transfer(config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")
    timings = {}
    for n, part in enumerate(TRANSFER_PARTS):
        check_cancel(cancel)
        tic = time.perf_counter()
        _train_once(_transfer_config(c, part, out), out / part,
                    StageProgress(progress, n / 2, (n + 1) / 2) if progress else None, cancel, max_steps)
        timings[f"{part}_s"] = round(time.perf_counter() - tic, 1)
    target = out / "target" / "model" / f"{c['name']}-target.json"
    if not target.exists():  # stopped early (max_steps): rerun to resume
        return None
    loaded = load_model(target, device="cpu")
    card = {k: v for k, v in loaded.card.items() if k not in ("weights", "_path")}
    card.update(name=c["name"], version=c.get("version", card.get("version", "1.0.0")))
    if c.get("description"):
        card["description"] = c["description"]
    card["training"] = dict(card.get("training", {}), recipe={"config": c, "seconds": timings, "parts": {
        part: str(out / part / "model" / f"{c['name']}-{part}.json") for part in TRANSFER_PARTS}})
    return save_model(loaded.network, card, out / "model", storage_dtype="float16")


RECIPES = {"multiview": multiview, "cascade": cascade, "transfer": transfer, "specks": specks,
           "mass_candidates": mass_candidates_recipe}


VALIDATORS = {"multiview": validate_multiview, "cascade": validate_cascade, "transfer": validate_transfer,
              "specks": validate_specks, "mass_candidates": validate_mass_candidates}


def validate_recipe(config: dict) -> dict:
    name = config.get("recipe")
    if name not in RECIPES:
        raise TransferSegError(f"recipe config: recipe: unknown recipe {name!r}; there is {', '.join(RECIPES)}")
    return VALIDATORS[name](config)


def run_recipe(config: dict, output_dir, **kwargs):
    """Run the recipe a config names; returns the model's card path (None when stopped early)."""
    validate_recipe(config)
    check_output_folder(output_dir)  # as train does: an -o that is a file, or lies under one, is named clearly
    return RECIPES[config["recipe"]](config, output_dir, **kwargs)
