"""Training configs: reading one and checking it whole before anything runs (:func:`validate_config`;
the schema is in :mod:`.trainer`'s docstring)."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np

from ..datasets import check_heatmap_target, check_vary, negative_cases
from ..labels import VIEWS
from ..losses import LOSSES, REGRESSION_LOSSES, build_loss
from ..preprocessing import preprocess
from ..resample import to_orientation
from ..volume import TransferSegError, Volume

OPTIMIZERS = {"adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
              "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
POSITIVE_SAMPLING = ("voxel", "component")
SCHEDULES = {"constant": (), "step": ("step_size", "gamma"), "poly": ("power",), "multistep": ("milestones", "gamma")}


def config_error(key: str, message: str):
    raise TransferSegError(f"training config: {key}: {message}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, key, minimum=None):
    if not is_int(value) or (minimum is not None and value < minimum):
        config_error(key, f"must be a whole number{'' if minimum is None else f' ≥ {minimum}'}; got {value!r}")
    return value


def _number(value, key, low=None, high=None):
    if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = " in " + f"[{low}, {high}]" if low is not None and high is not None else \
            f" ≥ {low}" if low is not None else f" ≤ {high}" if high is not None else ""
        config_error(key, f"must be a number{bounds}; got {value!r}")
    return float(value)


def _section(value, key, allowed, required=()) -> dict:
    if not isinstance(value, dict):
        config_error(key, f"must be a JSON object; got {value!r}")
    unknown = [k for k in value if k not in allowed and not str(k).startswith("_")]
    if unknown:
        config_error(f"{key}.{unknown[0]}" if key else unknown[0],
              f"unknown key; {key or 'the config'} takes {', '.join(allowed)}")
    for k in required:
        if k not in value:
            config_error(f"{key}.{k}" if key else k, "is required")
    return value


def _axes_list(value, key, pairs=False) -> list:
    if not isinstance(value, list):
        config_error(key, f"must be a list; got {value!r}")
    for n, item in enumerate(value):
        if pairs:
            if not (isinstance(item, list) and len(item) == 2 and all(is_int(a) and 0 <= a <= 2 for a in item)
                    and item[0] != item[1]):
                config_error(f"{key}[{n}]", f"must be a plane [a, b] of two different axes 0…2 (k, j, i); got {item!r}")
        elif not (is_int(item) and 0 <= item <= 2):
            config_error(f"{key}[{n}]", f"must be an axis 0, 1 or 2 (k, j, i); got {item!r}")
    return [list(v) for v in value] if pairs else list(value)


def _check_loss(spec, key: str) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in LOSSES:
        config_error(f"{key}.name", f"must be one of {', '.join(LOSSES)}; got {spec.get('name') if isinstance(spec, dict) else spec!r}")
    try:
        build_loss(spec)
    except TransferSegError as e:
        config_error(key, str(e))
    return spec


def _check_stage(stage, n: int) -> dict:
    """One training stage, checked key by key, with its defaults filled in."""
    key = f"stages[{n}]"
    _section(stage, key, ("name", "steps", "frozen", "freeze_bn", "optimizer", "group_lr", "schedule", "loss",
                          "heads", "network"),
             required=("steps", "optimizer", "loss"))
    out = {"name": stage.get("name", f"stage{n}"), "steps": _int(stage["steps"], f"{key}.steps", 1)}
    if not isinstance(out["name"], str) or not out["name"]:
        config_error(f"{key}.name", f"must be a non-empty string; got {out['name']!r}")
    out.update(_check_stage_network(stage, key))
    out["optimizer"] = _check_optimizer(stage["optimizer"], f"{key}.optimizer")
    group_lr = stage.get("group_lr", {})
    if not isinstance(group_lr, dict):
        config_error(f"{key}.group_lr", f"must be an object {{group: lr}}; got {group_lr!r}")
    for group, lr in group_lr.items():
        _number(lr, f"{key}.group_lr.{group}", 0.0)
    out["group_lr"] = dict(group_lr)
    out["schedule"] = _check_schedule(stage.get("schedule", {"name": "constant"}), f"{key}.schedule")
    out["loss"] = _check_stage_loss(stage["loss"], f"{key}.loss")
    return out


def _check_stage_network(stage: dict, key: str) -> dict:
    """What a stage does to the network: frozen groups (and their BatchNorms), trained heads, attributes set."""
    frozen = stage.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(g, str) for g in frozen):
        config_error(f"{key}.frozen", f"must be a list of parameter group names; got {frozen!r}")
    if not isinstance(stage.get("freeze_bn", False), bool):
        config_error(f"{key}.freeze_bn", f"must be true or false; got {stage['freeze_bn']!r}")
    heads = stage.get("heads")
    if heads is not None and not (isinstance(heads, dict) and heads and all(
            isinstance(k, str) and _is_number(v) and v >= 0 for k, v in heads.items())):
        config_error(f"{key}.heads", f"must be {{output head: loss weight}}, e.g. {{\"hff\": 1.0, \"net2d\": 0.5}}; "
              f"got {heads!r}")
    options = stage.get("network", {})
    if not (isinstance(options, dict) and all(isinstance(k, str) and k and isinstance(v, (bool, int, float, str))
                                              for k, v in options.items())):
        config_error(f"{key}.network", f"must be {{module.attribute: value}}, e.g. {{\"net2d.unet_connections\": false}}; "
              f"got {options!r}")
    return {"frozen": list(frozen), "freeze_bn": stage.get("freeze_bn", False), "heads": dict(heads) if heads else None,
            "network": dict(options)}


def _check_optimizer(spec, key: str) -> dict:
    opt = dict(spec) if isinstance(spec, dict) else spec
    if not isinstance(opt, dict) or opt.get("name") not in OPTIMIZERS:
        config_error(f"{key}.name", f"must be one of {', '.join(OPTIMIZERS)}; "
              f"got {opt.get('name') if isinstance(opt, dict) else opt!r}")
    _section(opt, key, ("name",) + OPTIMIZERS[opt["name"]], required=("lr",))
    _number(opt["lr"], f"{key}.lr", 0.0)
    for name in ("eps", "weight_decay", "momentum", "dampening"):
        if name in opt:
            _number(opt[name], f"{key}.{name}", 0.0)
    if "betas" in opt and not (isinstance(opt["betas"], list) and len(opt["betas"]) == 2
                               and all(_is_number(b) and 0 <= b < 1 for b in opt["betas"])):
        config_error(f"{key}.betas", f"must be [β1, β2] in [0, 1); got {opt['betas']!r}")
    for name in ("amsgrad", "nesterov"):
        if name in opt and not isinstance(opt[name], bool):
            config_error(f"{key}.{name}", f"must be true or false; got {opt[name]!r}")
    return opt


def _check_schedule(schedule, key: str) -> dict:
    if not isinstance(schedule, dict) or schedule.get("name") not in SCHEDULES:
        config_error(f"{key}.name", f"must be one of {', '.join(SCHEDULES)}; "
              f"got {schedule.get('name') if isinstance(schedule, dict) else schedule!r}")
    _section(schedule, key, ("name",) + SCHEDULES[schedule["name"]], required=SCHEDULES[schedule["name"]])
    if schedule["name"] == "step":
        _int(schedule["step_size"], f"{key}.step_size", 1)
        _number(schedule["gamma"], f"{key}.gamma", 0.0)
    if schedule["name"] == "poly":
        _number(schedule["power"], f"{key}.power", 0.0)
    if schedule["name"] == "multistep":
        milestones = schedule["milestones"]
        if not (isinstance(milestones, list) and milestones and all(_is_number(m) and 0 < m < 1 for m in milestones)
                and milestones == sorted(milestones)):
            config_error(f"{key}.milestones", f"must be increasing fractions of the stage's steps in (0, 1), "
                  f"e.g. [0.667, 0.833]; got {milestones!r}")
        _number(schedule["gamma"], f"{key}.gamma", 0.0)
    return dict(schedule)


def _check_stage_loss(spec, key: str) -> dict:
    """A stage's loss and the switch to another one (at a step, an epoch or on a plateau)."""
    loss = dict(spec if isinstance(spec, dict) else {"name": spec})
    switch = loss.get("switch")
    _check_loss({k: v for k, v in loss.items() if k != "switch"}, key)
    if switch is None:
        return loss
    skey = f"{key}.switch"
    _section(switch, skey, ("to", "at_step", "at_epoch", "on_plateau"), required=("to",))
    switch = dict(switch, to=_check_loss(switch["to"], f"{skey}.to"))
    triggers = [t for t in ("at_step", "at_epoch", "on_plateau") if t in switch]
    if len(triggers) != 1:
        config_error(skey, f"needs exactly one of at_step, at_epoch, on_plateau; got {triggers or 'none'}")
    if "at_step" in switch:
        _int(switch["at_step"], f"{skey}.at_step", 0)
    if "at_epoch" in switch:
        _int(switch["at_epoch"], f"{skey}.at_epoch", 0)
    if "on_plateau" in switch:
        plateau = dict(switch["on_plateau"]) if isinstance(switch["on_plateau"], dict) else switch["on_plateau"]
        _section(plateau, f"{skey}.on_plateau", ("patience", "min_delta", "window"), required=("patience",))
        _int(plateau["patience"], f"{skey}.on_plateau.patience", 1)
        plateau.setdefault("min_delta", 0.0)
        plateau.setdefault("window", 1)
        _number(plateau["min_delta"], f"{skey}.on_plateau.min_delta", 0.0)
        _int(plateau["window"], f"{skey}.on_plateau.window", 1)
        switch["on_plateau"] = plateau
    loss["switch"] = switch
    return loss


TOP_LEVEL = ("name", "version", "task", "description", "seed", "architecture", "init_weights", "labels", "data",
             "validation", "preprocessing", "expected_spacing_mm", "working_spacing_mm", "working_orientation",
             "patch_size", "view", "batch_size", "positive_fraction", "positive_labels", "positive_threshold",
             "positive_jitter", "positive_sampling", "augmentation", "stages", "steps_per_epoch",
             "checkpoint_every", "keep_checkpoints", "log_every", "inference", "postprocessing", "evaluation",
             "peaks", "expects", "threads", "workers", "device", "deterministic", "progress_bar", "storage_dtype")


#: init_weights key -> (the 2D model it reads, the architecture it fills, the verb for messages)
TRANSFER_INITS = {"transfer_from": ("an MC-GCN model", "ahnet", "transfers"),
                  "convert_from": ("a 2D model", "converted", "converts")}


def validate_config(config: dict) -> dict:
    """A checked deep copy of ``config`` with every default filled in (schema: module docstring).

    Raises :class:`TransferSegError` naming the offending key, e.g.
    ``training config: stages[1].optimizer.name: must be one of adam, sgd; got 'adamw'``.
    """
    if not isinstance(config, dict):
        raise TransferSegError(f"a training config is a JSON object; got {type(config).__name__}")
    _section(config, "", TOP_LEVEL, required=("name", "architecture", "data", "patch_size", "stages"))
    c = copy.deepcopy(config)
    if not isinstance(c["name"], str) or not c["name"] or "/" in c["name"] or "\\" in c["name"]:
        config_error("name", f"must be a plain model name without slashes; got {c['name']!r}")
    c.setdefault("version", "1.0.0")
    c.setdefault("task", "segmentation")
    if c["task"] not in ("segmentation", "heatmap"):
        config_error("task", f"must be 'segmentation' or 'heatmap'; got {c['task']!r}")
    c["seed"] = _int(c.get("seed", 0), "seed", 0)

    _check_architecture(c)
    values = _check_labels(c)
    _check_data(c)
    _check_grid(c)
    _check_sampling(c, values)
    _check_augmentation(c)
    _check_stages(c)
    _check_runtime(c)
    return c


def _check_architecture(c: dict) -> None:
    """The architecture and the weights it starts from."""
    arch = _section(c["architecture"], "architecture", ("name", "config", "module"), required=("name",))
    if not isinstance(arch["name"], str):
        config_error("architecture.name", f"must be a string; got {arch['name']!r}")
    arch.setdefault("config", {})
    if not isinstance(arch["config"], dict):
        config_error("architecture.config", f"must be a JSON object; got {arch['config']!r}")

    init = c.setdefault("init_weights", None)
    if init is not None:
        init = {"path": init} if isinstance(init, str) else init
        key = next((k for k in TRANSFER_INITS if isinstance(init, dict) and k in init), None)
        if key:  # a 2D model carried into the 3D network it becomes
            source, target, verb = TRANSFER_INITS[key]
            _section(init, "init_weights", (key,))
            if not isinstance(init[key], str) or not init[key]:
                config_error(f"init_weights.{key}", f"must be {source} (card path or name); got {init!r}")
            if arch["name"] != target:
                config_error(f"init_weights.{key}", f"{verb} {source} into a {target!r} architecture, not {arch['name']!r}")
        else:
            _section(init, "init_weights", ("path", "strict", "prefix", "source_prefix"), required=("path",))
            init.setdefault("strict", True)
            init.setdefault("prefix", "")
            init.setdefault("source_prefix", "")
            if not isinstance(init["path"], str) or not isinstance(init["strict"], bool):
                config_error("init_weights", f"must be a path, or {{\"path\": ..., \"strict\": true|false, \"prefix\": "
                      f"\"net2d.\"}}; got {init!r}")
            for key in ("prefix", "source_prefix"):
                if not isinstance(init[key], str) or (init[key] and not init[key].endswith(".")):
                    config_error(f"init_weights.{key}", f"must be a module path ending in '.', e.g. \"net2d.\"; "
                          f"got {init[key]!r}")
        c["init_weights"] = init


def _check_labels(c: dict) -> list:
    """The label list; returns the label values, sorted."""
    labels = c.setdefault("labels", [])
    if not isinstance(labels, list):
        config_error("labels", f"must be a list of {{name, label, color, terminology}}; got {labels!r}")
    for n, entry in enumerate(labels):
        _section(entry, f"labels[{n}]", ("name", "label", "color", "terminology"), required=("name", "label"))
        if not isinstance(entry["name"], str) or not entry["name"]:
            config_error(f"labels[{n}].name", f"must be a non-empty string; got {entry['name']!r}")
        if not (is_int(entry["label"]) and 1 <= entry["label"] <= 255):
            config_error(f"labels[{n}].label", f"must be a label value 1…255; got {entry['label']!r}")
        if "color" in entry and not (isinstance(entry["color"], list) and len(entry["color"]) == 3
                                     and all(_is_number(v) and 0 <= v <= 1 for v in entry["color"])):
            config_error(f"labels[{n}].color", f"must be [r, g, b] in [0, 1]; got {entry['color']!r}")
    values = sorted(entry["label"] for entry in labels)
    if c["task"] == "segmentation" and values != list(range(1, len(values) + 1)):
        config_error("labels", f"segmentation label values must be 1…n without gaps or repeats; got {values}")
    if c["task"] == "segmentation" and not labels:
        config_error("labels", "a segmentation model needs at least one label")
    return values


def _check_data(c: dict) -> None:
    """Where the cases come from: a data set folder, preprocessed stacks or phantoms."""
    data = c["data"]
    if isinstance(data, dict) and "stacks" in data:
        _section(data, "data", ("stacks", "select", "channels", "crop_to_foreground"))
        if not isinstance(data["stacks"], str):
            config_error("data.stacks", f"must be a folder of .npz stacks; got {data['stacks']!r}")
        channels = data.setdefault("channels", None)
        if channels is not None and not (isinstance(channels, list) and channels
                                         and all(is_int(v) and v >= 0 for v in channels)):
            config_error("data.channels", f"must be null (all) or a list of channel indices; got {channels!r}")
        margin = data.setdefault("crop_to_foreground", None)
        if margin is not None:
            _int(margin, "data.crop_to_foreground", 0)
        if c.get("preprocessing"):
            config_error("preprocessing", "stacks are stored preprocessed (every channel in [0, 1]); leave preprocessing empty")
    elif isinstance(data, dict) and "root" in data:
        _section(data, "data", ("root", "limit", "select"))
        if not isinstance(data["root"], str):
            config_error("data.root", f"must be a folder path; got {data['root']!r}")
        if "limit" in data:
            _int(data["limit"], "data.limit", 1)
    elif isinstance(data, dict) and "phantom" in data:
        _section(data, "data", ("phantom", "count", "seed", "options", "vary", "target", "workers", "cache",
                                 "select", "negatives"),
                 required=("count",))
        if data["phantom"] not in ("ct", "dbt"):
            config_error("data.phantom", f"must be 'ct' or 'dbt'; got {data['phantom']!r}")
        if data["phantom"] == "dbt" and c["task"] != "heatmap":
            config_error("data.phantom", "'dbt' phantoms give lesion heatmaps; they need task \"heatmap\"")
        _int(data["count"], "data.count", 1)
        data["seed"] = _int(data.get("seed", 0), "data.seed", 0)
        if not isinstance(data.setdefault("options", {}), dict):
            config_error("data.options", f"must be a JSON object of {data['phantom']}_phantom arguments; got {data['options']!r}")
        try:
            check_vary(data["phantom"], data.setdefault("vary", {}))
        except TransferSegError as e:
            config_error("data.vary", str(e))
        if data.get("target") is not None:
            if data["phantom"] != "dbt":
                config_error("data.target", "shapes DBT phantoms' heatmaps; CT phantoms have label maps")
            try:
                check_heatmap_target(data["target"])
            except TransferSegError as e:
                config_error("data.target", str(e))
        if data.get("negatives") is not None:
            if data["phantom"] != "ct" or not isinstance(data["negatives"], dict):
                config_error("data.negatives", "adds CT phantoms without a liver: {\"count\": N, \"seed\": S, "
                             f"\"regions\": [\"pelvis\", \"chest\", ...]}} with CT phantoms; got {data['negatives']!r}")
            _section(data["negatives"], "data.negatives", ("count", "seed", "regions"), required=("count", "regions"))
            try:
                negative_cases(data["negatives"], vary=data["vary"])
            except TransferSegError as e:
                config_error("data.negatives", str(e))
        data["workers"] = _int(data.get("workers", 0), "data.workers", 0)
        cache = data.setdefault("cache", None)
        if cache is not None and cache is not False and not isinstance(cache, str):
            config_error("data.cache", f"must be a folder, false (no cache) or null (OUT/cases); got {cache!r}")
    else:
        config_error("data", f"must be {{\"root\": folder}}, {{\"stacks\": folder}} or {{\"phantom\": \"ct\" | \"dbt\", "
              f"\"count\": N, \"seed\": S}}; got {data!r}")
    select = data.setdefault("select", None)
    if select is not None and not (isinstance(select, list) and select and all(isinstance(n, str) for n in select)):
        config_error("data.select", f"must be null (every case) or a list of case names; got {select!r}")


def _check_grid(c: dict) -> None:
    """Validation, preprocessing, the working grid, the patch and the view."""
    val = c.setdefault("validation", {})
    _section(val, "validation", ("fraction", "every"))
    val["fraction"] = _number(val.get("fraction", 0.2), "validation.fraction", 0.0, 0.95)
    val["every"] = _int(val.get("every", 0), "validation.every", 0)

    if not isinstance(c.setdefault("preprocessing", {}), dict):
        config_error("preprocessing", f"must be a JSON object such as {{\"hu_window\": [-200, 250]}}; got {c['preprocessing']!r}")
    try:
        preprocess(np.zeros((1, 1, 1), np.float32), c["preprocessing"])
    except TransferSegError as e:
        config_error("preprocessing", str(e))
    for key in ("working_spacing_mm", "expected_spacing_mm"):
        spacing = c.setdefault(key, None)
        if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                        and all(_is_number(v) and v > 0 for v in spacing)):
            config_error(key, f"must be null or [k, j, i] in mm; got {spacing!r}")
    if c["expected_spacing_mm"] is None:
        c["expected_spacing_mm"] = c["working_spacing_mm"]
    orientation = c.setdefault("working_orientation", None)
    if orientation is not None:
        try:
            to_orientation(Volume(np.zeros((1, 1, 1), np.float32)), orientation)
        except TransferSegError as e:
            config_error("working_orientation", str(e))

    patch = c["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(is_int(p) and p >= 1 for p in patch)):
        config_error("patch_size", f"must be [k, j, i], three positive whole numbers; got {patch!r}")
    view = c.setdefault("view", None)
    if view is not None:
        if view not in VIEWS:
            config_error("view", f"must be null or one of {', '.join(VIEWS)}; got {view!r}")
        if c["working_orientation"] is None:
            config_error("view", "a view is anatomical: set working_orientation (e.g. \"LPS\") so every case is turned the same way")


def _check_sampling(c: dict, values: list) -> None:
    """Batches and where patches are centred."""
    c["batch_size"] = _int(c.get("batch_size", 2), "batch_size", 1)
    c["positive_fraction"] = _number(c.get("positive_fraction", 0.5), "positive_fraction", 0.0, 1.0)
    positive = c.setdefault("positive_labels", None)
    if positive is not None:
        if not (isinstance(positive, list) and positive and all(is_int(v) and v >= 1 for v in positive)):
            config_error("positive_labels", f"must be null or a list of label values ≥ 1; got {positive!r}")
        unknown = sorted(set(positive) - set(values))
        if c["task"] == "segmentation" and unknown:
            config_error("positive_labels", f"names label value(s) {unknown} that are not in labels")
    c["positive_threshold"] = _number(c.get("positive_threshold", 0.5), "positive_threshold")
    c["positive_jitter"] = _number(c.get("positive_jitter", 0.5), "positive_jitter", 0.0, 1.0)
    c["positive_sampling"] = c.get("positive_sampling", "voxel")
    if c["positive_sampling"] not in POSITIVE_SAMPLING:
        config_error("positive_sampling",
              f"must be {' or '.join(map(repr, POSITIVE_SAMPLING))}; got {c['positive_sampling']!r}")


def _check_augmentation(c: dict) -> None:
    """Flips, rotations and zooms; 90° rotations only in square planes of the patch."""
    patch = c["patch_size"]
    aug = c.setdefault("augmentation", {})
    _section(aug, "augmentation", ("flip_axes", "rot90_axes", "rotate_deg", "rotate_axes", "scale", "probability",
                                   "image_order", "elastic"))
    aug["flip_axes"] = _axes_list(aug.get("flip_axes", []), "augmentation.flip_axes")
    aug["rot90_axes"] = _axes_list(aug.get("rot90_axes", []), "augmentation.rot90_axes", pairs=True)
    for n, (a, b) in enumerate(aug["rot90_axes"]):
        if patch[a] != patch[b]:
            config_error(f"augmentation.rot90_axes[{n}]", f"a 90° rotation in plane [{a}, {b}] needs patch_size[{a}] == "
                  f"patch_size[{b}]; the patch is {patch} (use in-plane rotations only for anisotropic patches)")
    aug["rotate_deg"] = _number(aug.get("rotate_deg", 0.0), "augmentation.rotate_deg", 0.0, 180.0)
    aug["rotate_axes"] = _axes_list(aug.get("rotate_axes", [[1, 2]]), "augmentation.rotate_axes", pairs=True)
    scale = aug.setdefault("scale", None)
    if scale is not None and not (isinstance(scale, list) and len(scale) == 2 and all(_is_number(s) and s > 0 for s in scale)
                                  and scale[0] <= scale[1]):
        config_error("augmentation.scale", f"must be null or [low, high] with 0 < low ≤ high; got {scale!r}")
    aug["probability"] = _number(aug.get("probability", 0.5), "augmentation.probability", 0.0, 1.0)
    aug["elastic"] = _elastic(aug.get("elastic"))
    aug["image_order"] = aug.get("image_order", 1)
    if aug["image_order"] not in (0, 1):
        config_error("augmentation.image_order", f"must be 0 (nearest) or 1 (linear); got {aug['image_order']!r}")


def _elastic(elastic):
    """``null`` or ``{"magnitude": [k, j, i], "spacing": [k, j, i]}`` in voxels of the working grid: the
    displacements' standard deviation per axis (≥ 0, at most a sixth of the spacing so the patch
    never folds) and the control points' spacing (≥ 2)."""
    if elastic is None:
        return None
    where = "augmentation.elastic"
    if not isinstance(elastic, dict):
        config_error(where, f"must be null or {{\"magnitude\": [k, j, i], \"spacing\": [k, j, i]}} in voxels; got {elastic!r}")
    _section(elastic, where, ("magnitude", "spacing"))
    out = {}
    for key, low in (("magnitude", 0.0), ("spacing", 2.0)):
        value = elastic.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) and v >= low for v in value)):
            config_error(f"{where}.{key}", f"must be three numbers ≥ {low:g} (voxels along k, j, i); got {value!r}")
        out[key] = [float(v) for v in value]
    for axis, (m, s) in enumerate(zip(out["magnitude"], out["spacing"])):
        if m > s / 6.0:
            config_error(f"{where}.magnitude[{axis}]", f"{m:g} voxels is more than a sixth of the control points' "
                         f"spacing ({s:g}): the patch would fold; lower it or space the points further apart")
    return out


def _check_stages(c: dict) -> None:
    """The training stages; a heatmap task trains with a regression loss."""
    stages = c["stages"]
    if not isinstance(stages, list) or not stages:
        config_error("stages", "must be a non-empty list of training stages")
    c["stages"] = [_check_stage(stage, n) for n, stage in enumerate(stages)]
    if c["task"] == "heatmap":
        for n, stage in enumerate(c["stages"]):
            for spec in (stage["loss"], (stage["loss"].get("switch") or {}).get("to")):
                if spec is not None and spec["name"] not in REGRESSION_LOSSES:
                    config_error(f"stages[{n}].loss", f"a heatmap task trains with {' or '.join(REGRESSION_LOSSES)}; "
                          f"got {spec['name']!r}")


def _check_runtime(c: dict) -> None:
    """Epochs, checkpoints, logs, inference settings, peaks, threads, device and storage."""
    spe = c.setdefault("steps_per_epoch", None)
    if spe is not None:
        _int(spe, "steps_per_epoch", 1)
    c["checkpoint_every"] = _int(c.get("checkpoint_every", 100), "checkpoint_every", 1)
    c["keep_checkpoints"] = _int(c.get("keep_checkpoints", 1), "keep_checkpoints", 1)
    c["log_every"] = _int(c.get("log_every", 1), "log_every", 1)
    inference = c.setdefault("inference", {})
    if not isinstance(inference, dict):
        config_error("inference", f"must be a JSON object of inference settings; got {inference!r}")
    inference.setdefault("overlap", 0.5)
    inference.setdefault("activation", "softmax" if c["task"] == "segmentation" else "none")
    peaks = c.setdefault("peaks", None)
    if peaks is not None:
        _section(peaks, "peaks", ("threshold", "min_distance", "max_peaks"))
        if c["task"] != "heatmap":
            config_error("peaks", "peak finding (detections) is for task \"heatmap\"")
        if "threshold" in peaks:
            _number(peaks["threshold"], "peaks.threshold")
        distance = peaks.get("min_distance", 0)
        if not (is_int(distance) and distance >= 0 or isinstance(distance, list) and len(distance) == 3
                and all(is_int(d) and d >= 0 for d in distance)):
            config_error("peaks.min_distance", f"must be voxels ≥ 0, one number or [k, j, i]; got {distance!r}")
        if "max_peaks" in peaks:
            _int(peaks["max_peaks"], "peaks.max_peaks", 1)
    threads = c.setdefault("threads", None)
    if threads is not None:
        _int(threads, "threads", 1)
    c["workers"] = _int(c.get("workers", 0), "workers", 0)
    if not isinstance(c.setdefault("device", "auto"), str):
        config_error("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {c['device']!r}")
    for name in ("deterministic", "progress_bar"):
        if not isinstance(c.setdefault(name, True), bool):
            config_error(name, f"must be true or false; got {c[name]!r}")
    if c.setdefault("storage_dtype", None) not in (None, "float16"):
        config_error("storage_dtype",
              f"must be null (float32) or \"float16\" (half the file size); got {c['storage_dtype']!r}")


def read_config(path) -> dict:
    """Read a JSON training config; relative ``data.root`` and ``init_weights`` paths are taken
    relative to the config file.  Returned as written, with those paths made absolute, not yet
    validated (:func:`TransferSegLib.training.load_config` validates it as a trainer or recipe config)."""
    path = Path(path).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TransferSegError(f"{path}: no such training config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TransferSegError(f"{path}: cannot read the training config ({e})") from None
    except json.JSONDecodeError as e:
        raise TransferSegError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(config, dict):
        raise TransferSegError(f"{path}: a training config is a JSON object")
    base = path.resolve().parent
    data = config.get("data")
    for key in ("root", "cache", "stacks"):  # folders named in a config are relative to the config file
        if isinstance(data, dict) and isinstance(data.get(key), str):
            data[key] = str((base / Path(data[key]).expanduser()).resolve())
    # the config's own init_weights and a recipe part's (e.g. a cascade part fine-tuned from a shipped model)
    for holder in [config] + [part for part in config.values() if isinstance(part, dict) and "init_weights" in part]:
        _resolve_init_weights(holder, base)
    return config


def _resolve_init_weights(holder: dict, base: Path) -> None:
    init = holder.get("init_weights")
    key = next((k for k in TRANSFER_INITS if isinstance(init, dict) and k in init), "path")
    init_path = init.get(key) if isinstance(init, dict) else init
    if isinstance(init_path, str) and (os.sep in init_path or init_path.endswith((".json", ".safetensors"))):
        resolved = str((base / Path(init_path).expanduser()).resolve())
        if isinstance(init, dict):
            init[key] = resolved
        else:
            holder["init_weights"] = resolved
