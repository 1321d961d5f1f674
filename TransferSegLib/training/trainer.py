"""One trainer for every stage of every method: frozen parameter groups, per-group learning rates,
loss switches, on-the-fly patch sampling with augmentation, resumable checkpoints, torchrun/DDP.

It serves the AH-Net recipe (paper sec. 3.4 and 4): a first stage with the transferred encoder
locked and only the decoder trained, then joint fine-tuning; Adam (β = 0.9, 0.999, ε = 1e-8);
70 % of the patches containing a lesion; L2 (or cross-entropy) replaced by the focal loss when
it stops decreasing.  The same config language describes the U-Net baselines and the other
methods' stages.

Run it::

    python -m TransferSegLib.training CONFIG.json [--output DIR] [--max-steps N]
    torchrun --nproc_per_node=2 -m TransferSegLib.training CONFIG.json --output DIR
    transferseg train CONFIG.json -o DIR

or from Python: ``train(load_config(path), output_dir, progress=callback, cancel=token)``.
Running the same command again on the same output folder resumes from the last checkpoint
(after a crash, a kill or ``--max-steps``) and reproduces, on the same machine, the losses
the uninterrupted run would have had.

Config schema (JSON; ``*`` = required; unknown keys are errors, keys starting with ``_`` are
comments)::

    name*            plain model name (no "/"); the model is written as OUT/model/NAME.{safetensors,json}
    version          "1.0.0";  task: "segmentation" (default, integer labels) | "heatmap" (float targets)
    description      free text
    seed             0: network initialisation, data split, patch sampling and augmentation
    architecture*    {"name": "unet3d", "config": {...}, "module": "my.package"}: built with
                     nets.build_network(name, config); "module" (optional) is imported first so a
                     network defined outside TransferSeg can register itself
    init_weights     null | path to a .safetensors file or a model (card path or name) to start from;
                     {"path": ..., "strict": true, "prefix": "", "source_prefix": ""}: the weights'
                     keys under "source_prefix" (that prefix removed) are loaded into the submodule
                     "prefix" (e.g. "net." → "net2d." takes a denseunet2d_slices model's 2D network
                     into an H-DenseUNet);
                     strict false allows a partial match; either way the run writes
                     OUT/init_weights.json (keys loaded, and those not matched on either side), and
                     a load that matches nothing is an error;
                     {"transfer_from": MC-GCN model (card path or name)} for an "ahnet" architecture:
                     its encoder is the MC-GCN's made 3D (AH-Net sec. 3.2, nets.transfer_mcgcn_to_ahnet;
                     an "mcgcn_multislice" model is unwrapped), its decoder fresh from ``seed``;
                     architecture.config must name the MC-GCN's backbone and stem_slices = its slices;
                     {"convert_from": 2D model (card path or name)} for a "converted" architecture
                     ({"source": "unet2d", "config": {...}, "to": "acs"}): the trained 2D network
                     (a "…_multislice" model's is unwrapped) converted by nets.convert, weights kept
                     (ACS paper sec. 3.2); source and config must be the 2D model's
    labels           [{"name": "liver", "label": 1, "color": [r, g, b], "terminology": {...}}, ...];
                     segmentation: values 1…n, and the network has n + 1 output channels
    data*            {"root": "path"} (MSD, LiTS or phantom folder; relative to the config file;
                     "limit": N takes the first N cases) or {"phantom": "ct", "count": 8, "seed": 1000,
                     "options": {...ct_phantom keyword arguments}} or, for task "heatmap",
                     {"phantom": "dbt", ..., "options": {...dbt_phantom keyword arguments}} (targets:
                     eq. (5) heatmaps of the lesion boxes, datasets.DBTPhantomCase); phantoms take
                     "vary": {"slices": [36, 180], "rows": [200, 340]} (CT) or {"pixel_mm": [0.085, 0.4],
                     "extent_mm": [100, 75], "slices": [30, 50]} (DBT) to draw each case's grid, and
                     "workers": N processes to generate them; "cache": folder (relative to the config file) | false
                     | null (OUT/cases):
                     cases on the working grid are kept there as .npz, so a resumed or repeated run
                     does not generate them again;
                     or {"stacks": folder}: .npz cases already on their working grid and preprocessed
                     (image (C, k, j, i) in [0, 1], target, spacing; training.write_stack), e.g. a CT
                     plus three views' predictions for a fusion network; "channels": [1, 2, 3] keeps
                     those channels only; "crop_to_foreground": 32 cuts each case to its foreground
                     box padded by 32 voxels (VFN sec. 2.3); preprocessing must then be empty.
                     Every data source takes "select": [case names] to train on those cases only
    validation       {"fraction": 0.2, "every": 0}: held-out share of the cases (seeded split);
                     Dice per label with the sliding-window inferer at the end, and every N steps if N > 0
    preprocessing    preprocessing.preprocess spec, e.g. {"hu_window": [-200, 250]}
    working_spacing_mm  null | [k, j, i] mm: every case is resampled to it (resample.to_spacing, the
                     pipeline's own function) before training, and the card carries it, so the
                     pipeline runs the model on the same grid whatever the input's spacing
    working_orientation  null | e.g. "LPS": cases are first turned (exactly) so that i, j, k point there
    expected_spacing_mm  null | [k, j, i]: the input spacing the model is meant for (the pipeline warns
                     when an input is more than 2× off it); default: the working spacing
    patch_size*      [k, j, i], each a multiple of the network's size_multiple (with "view": [slices,
                     rows, columns] of the view's slice stack)
    view             null | "axial" | "coronal" | "sagittal": train a slice-stack 2D network on this
                     anatomical view (views.to_view of each working case; needs working_orientation)
    batch_size       2: the global batch (split evenly across torchrun processes)
    positive_fraction  0.5 (AH-Net: 0.7): share of patches centred on a positive voxel
    positive_labels  null (every label > 0) | [2]: the label values that make a patch positive
    positive_threshold  0.5: heatmap task only, target ≥ this is positive
    positive_jitter  0.5: a positive patch's centre is the chosen voxel moved by up to
                     ±jitter · patch / 2 per axis (then clipped to the volume)
    positive_sampling  "voxel": a positive patch is centred on a random positive voxel of a random
                     positive case (large objects dominate) | "component": on a random voxel of a
                     random connected positive region of all cases, every region equally often
                     (e.g. a 0.3 mL calcification cluster as often as a 10 mL mass)
    augmentation     {"flip_axes": [1, 2],        axes (k=0, j=1, i=2) each flipped with p = 0.5
                      "rot90_axes": [[1, 2]],    planes generating the 90° rotations drawn from
                                                 (all three planes of a cube patch: the 24 rotations;
                                                 only in-plane [[1, 2]] for anisotropic data)
                      "rotate_deg": 10, "rotate_axes": [[1, 2]],   small rotations in these planes
                      "scale": [0.9, 1.1],        isotropic zoom factor range
                      "probability": 0.5,         chance of a 90° rotation, and of a rotation/zoom
                      "image_order": 1}           interpolation of the image (labels: always 0)
    stages*          [{"name": "decoder", "steps": 100,
                       "frozen": ["encoder"], "freeze_bn": false,   frozen groups get requires_grad
                                                 False; freeze_bn also keeps their BatchNorms in eval
                       "heads": {"hff": 1.0, "net2d": 0.5},   null: the loss of the network's output;
                                                 else the weighted sum of the loss over these named
                                                 outputs of network(x, heads=(names)) (H-DenseUNet
                                                 sec. III-C: L = λ·L(2D) + L(HFF))
                       "network": {"net2d.unet_connections": false},   attributes set for this stage
                                                 (others keep their built values), e.g. a warm-up
                                                 without the UNet connections
                       "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8,
                                     "weight_decay": 0, "amsgrad": false}
                                  | {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": false,
                                     "dampening": 0, "weight_decay": 0},
                       "group_lr": {"decoder": 0.001},        per-group learning rate (else optimizer.lr)
                       "schedule": {"name": "constant"} | {"name": "step", "step_size": 50, "gamma": 0.1}
                                 | {"name": "poly", "power": 0.9}
                                 | {"name": "multistep", "milestones": [0.667, 0.833], "gamma": 0.1},
                                                 lr = base · factor(t), t = stage step
                       "loss": {"name": "ce", ...losses.build_loss parameters...,
                                "switch": {"to": "focal" | {"name": "focal", "gamma": 2},
                                           "at_step": 50 | "at_epoch": 2 |
                                           "on_plateau": {"patience": 20, "min_delta": 0.001, "window": 1}}}}]
    steps_per_epoch  null: ceil(training cases / batch_size); only names epochs in the log and at_epoch
    checkpoint_every 100 steps (and at the end of training); keep_checkpoints: 1
    log_every        1: a row of OUT/log.csv every N steps
    inference        card inference settings, default {"overlap": 0.5, "activation": "softmax"}
                     ("none" for heatmaps); used for validation too
    postprocessing, evaluation   copied into the model card
    peaks            task "heatmap" only: {"threshold": 0.1, "min_distance": [2, 8, 8], "max_peaks": 100},
                     heatmaps.find_peaks settings for the detections, copied into the model card
    threads          null | torch CPU threads per process;  workers: 0 | threads sampling patches
    device           "auto" | "cpu" | "cuda" | "cuda:N" (torchrun: cuda:LOCAL_RANK when CUDA exists)
    deterministic    true: torch.use_deterministic_algorithms (restored afterwards)
    progress_bar     true: tqdm on stderr when it is a terminal
    storage_dtype    null | "float16": the final model's floating-point weights stored in half precision
                     (half the file; loading casts them back to float32)

What a run writes into OUT (rank 0 only, every file atomically): ``log.csv`` (step, epoch,
stage, stage_name, loss, loss_name, lr per group, validation Dice per label, elapsed_s),
``curves.png`` (at each checkpoint and the end), ``checkpoint-NNNNNNNN/`` (weights.safetensors,
optimizer.safetensors + optimizer.json, state.json with the sha256 of each), ``checkpoint.json``
(the latest complete checkpoint), ``model/NAME.safetensors`` + ``NAME.json`` (the model card) and
``result.json`` when training has finished.  No pickle: weights and optimizer tensors are
safetensors, everything else JSON.

Reproducibility, and why no RNG state is checkpointed: the patches of step s are drawn with
``numpy.random.default_rng([seed, s, item])`` and torch is reseeded from (seed, s, rank) before
each step, so the random stream of every step is a function of the step number: a resumed run
needs only the step, and a torchrun run with W processes, where rank r computes items
r, r + W, … of the same global batch, sees exactly the patches of a one-process run.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib
import io as _io
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..distributed import Processes
from ..atomic import atomic_output, check_output_folder
from ..losses import LOSSES, REGRESSION_LOSSES, build_loss
from ..progress import CancelToken, ProgressCallback, check_cancel
from ..volume import TransferSegError

__all__ = ["PatchSampler", "PlateauTracker", "LossSchedule", "StackCase", "TrainResult", "TrainingCase",
           "learning_rate_factor", "load_config", "main", "parameter_groups", "rotations90", "train",
           "validate_config", "write_stack"]

CHECKPOINT_FORMAT = "transferseg-checkpoint-1"
# keys that change how a run is executed or reported, not what it computes: a resumed run may change them
RUNTIME_KEYS = ("threads", "workers", "device", "progress_bar", "checkpoint_every", "keep_checkpoints", "log_every")
OPTIMIZERS = {"adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
              "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
POSITIVE_SAMPLING = ("voxel", "component")
SCHEDULES = {"constant": (), "step": ("step_size", "gamma"), "poly": ("power",), "multistep": ("milestones", "gamma")}


# --- config ---------------------------------------------------------------------------------
def _fail(key: str, message: str):
    raise TransferSegError(f"training config: {key}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, key, minimum=None):
    if not _is_int(value) or (minimum is not None and value < minimum):
        _fail(key, f"must be a whole number{'' if minimum is None else f' ≥ {minimum}'}; got {value!r}")
    return value


def _number(value, key, low=None, high=None):
    if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = " in " + f"[{low}, {high}]" if low is not None and high is not None else \
            f" ≥ {low}" if low is not None else f" ≤ {high}" if high is not None else ""
        _fail(key, f"must be a number{bounds}; got {value!r}")
    return float(value)


def _section(value, key, allowed, required=()) -> dict:
    if not isinstance(value, dict):
        _fail(key, f"must be a JSON object; got {value!r}")
    unknown = [k for k in value if k not in allowed and not str(k).startswith("_")]
    if unknown:
        _fail(f"{key}.{unknown[0]}" if key else unknown[0],
              f"unknown key; {key or 'the config'} takes {', '.join(allowed)}")
    for k in required:
        if k not in value:
            _fail(f"{key}.{k}" if key else k, "is required")
    return value


def _axes_list(value, key, pairs=False) -> list:
    if not isinstance(value, list):
        _fail(key, f"must be a list; got {value!r}")
    for n, item in enumerate(value):
        if pairs:
            if not (isinstance(item, list) and len(item) == 2 and all(_is_int(a) and 0 <= a <= 2 for a in item)
                    and item[0] != item[1]):
                _fail(f"{key}[{n}]", f"must be a plane [a, b] of two different axes 0…2 (k, j, i); got {item!r}")
        elif not (_is_int(item) and 0 <= item <= 2):
            _fail(f"{key}[{n}]", f"must be an axis 0, 1 or 2 (k, j, i); got {item!r}")
    return [list(v) for v in value] if pairs else list(value)


def _check_loss(spec, key: str) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in LOSSES:
        _fail(f"{key}.name", f"must be one of {', '.join(LOSSES)}; got {spec.get('name') if isinstance(spec, dict) else spec!r}")
    try:
        build_loss(spec)
    except TransferSegError as e:
        _fail(key, str(e))
    return spec


def _check_stage(stage, n: int) -> dict:
    key = f"stages[{n}]"
    _section(stage, key, ("name", "steps", "frozen", "freeze_bn", "optimizer", "group_lr", "schedule", "loss",
                          "heads", "network"),
             required=("steps", "optimizer", "loss"))
    out = {"name": stage.get("name", f"stage{n}"), "steps": _int(stage["steps"], f"{key}.steps", 1)}
    if not isinstance(out["name"], str) or not out["name"]:
        _fail(f"{key}.name", f"must be a non-empty string; got {out['name']!r}")
    frozen = stage.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(g, str) for g in frozen):
        _fail(f"{key}.frozen", f"must be a list of parameter group names; got {frozen!r}")
    out["frozen"] = list(frozen)
    if not isinstance(stage.get("freeze_bn", False), bool):
        _fail(f"{key}.freeze_bn", f"must be true or false; got {stage['freeze_bn']!r}")
    out["freeze_bn"] = stage.get("freeze_bn", False)
    heads = stage.get("heads")
    if heads is not None and not (isinstance(heads, dict) and heads and all(
            isinstance(k, str) and _is_number(v) and v >= 0 for k, v in heads.items())):
        _fail(f"{key}.heads", f"must be {{output head: loss weight}}, e.g. {{\"hff\": 1.0, \"net2d\": 0.5}}; "
              f"got {heads!r}")
    out["heads"] = dict(heads) if heads else None
    options = stage.get("network", {})
    if not (isinstance(options, dict) and all(isinstance(k, str) and k and isinstance(v, (bool, int, float, str))
                                              for k, v in options.items())):
        _fail(f"{key}.network", f"must be {{module.attribute: value}}, e.g. {{\"net2d.unet_connections\": false}}; "
              f"got {options!r}")
    out["network"] = dict(options)

    opt = dict(stage["optimizer"]) if isinstance(stage["optimizer"], dict) else stage["optimizer"]
    if not isinstance(opt, dict) or opt.get("name") not in OPTIMIZERS:
        _fail(f"{key}.optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}; "
              f"got {opt.get('name') if isinstance(opt, dict) else opt!r}")
    _section(opt, f"{key}.optimizer", ("name",) + OPTIMIZERS[opt["name"]], required=("lr",))
    _number(opt["lr"], f"{key}.optimizer.lr", 0.0)
    for name in ("eps", "weight_decay", "momentum", "dampening"):
        if name in opt:
            _number(opt[name], f"{key}.optimizer.{name}", 0.0)
    if "betas" in opt and not (isinstance(opt["betas"], list) and len(opt["betas"]) == 2
                               and all(_is_number(b) and 0 <= b < 1 for b in opt["betas"])):
        _fail(f"{key}.optimizer.betas", f"must be [β1, β2] in [0, 1); got {opt['betas']!r}")
    for name in ("amsgrad", "nesterov"):
        if name in opt and not isinstance(opt[name], bool):
            _fail(f"{key}.optimizer.{name}", f"must be true or false; got {opt[name]!r}")
    out["optimizer"] = opt

    group_lr = stage.get("group_lr", {})
    if not isinstance(group_lr, dict):
        _fail(f"{key}.group_lr", f"must be an object {{group: lr}}; got {group_lr!r}")
    for group, lr in group_lr.items():
        _number(lr, f"{key}.group_lr.{group}", 0.0)
    out["group_lr"] = dict(group_lr)

    schedule = stage.get("schedule", {"name": "constant"})
    if not isinstance(schedule, dict) or schedule.get("name") not in SCHEDULES:
        _fail(f"{key}.schedule.name", f"must be one of {', '.join(SCHEDULES)}; "
              f"got {schedule.get('name') if isinstance(schedule, dict) else schedule!r}")
    _section(schedule, f"{key}.schedule", ("name",) + SCHEDULES[schedule["name"]], required=SCHEDULES[schedule["name"]])
    if schedule["name"] == "step":
        _int(schedule["step_size"], f"{key}.schedule.step_size", 1)
        _number(schedule["gamma"], f"{key}.schedule.gamma", 0.0)
    if schedule["name"] == "poly":
        _number(schedule["power"], f"{key}.schedule.power", 0.0)
    if schedule["name"] == "multistep":
        milestones = schedule["milestones"]
        if not (isinstance(milestones, list) and milestones and all(_is_number(m) and 0 < m < 1 for m in milestones)
                and milestones == sorted(milestones)):
            _fail(f"{key}.schedule.milestones", f"must be increasing fractions of the stage's steps in (0, 1), "
                  f"e.g. [0.667, 0.833]; got {milestones!r}")
        _number(schedule["gamma"], f"{key}.schedule.gamma", 0.0)
    out["schedule"] = dict(schedule)

    loss = stage["loss"] if isinstance(stage["loss"], dict) else {"name": stage["loss"]}
    loss = dict(loss)
    switch = loss.get("switch")
    _check_loss({k: v for k, v in loss.items() if k != "switch"}, f"{key}.loss")
    if switch is not None:
        skey = f"{key}.loss.switch"
        _section(switch, skey, ("to", "at_step", "at_epoch", "on_plateau"), required=("to",))
        switch = dict(switch, to=_check_loss(switch["to"], f"{skey}.to"))
        triggers = [t for t in ("at_step", "at_epoch", "on_plateau") if t in switch]
        if len(triggers) != 1:
            _fail(skey, f"needs exactly one of at_step, at_epoch, on_plateau; got {triggers or 'none'}")
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
    out["loss"] = loss
    return out


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
        _fail("name", f"must be a plain model name without slashes; got {c['name']!r}")
    c.setdefault("version", "1.0.0")
    c.setdefault("task", "segmentation")
    if c["task"] not in ("segmentation", "heatmap"):
        _fail("task", f"must be 'segmentation' or 'heatmap'; got {c['task']!r}")
    c["seed"] = _int(c.get("seed", 0), "seed", 0)

    arch = _section(c["architecture"], "architecture", ("name", "config", "module"), required=("name",))
    if not isinstance(arch["name"], str):
        _fail("architecture.name", f"must be a string; got {arch['name']!r}")
    arch.setdefault("config", {})
    if not isinstance(arch["config"], dict):
        _fail("architecture.config", f"must be a JSON object; got {arch['config']!r}")

    init = c.setdefault("init_weights", None)
    if init is not None:
        init = {"path": init} if isinstance(init, str) else init
        key = next((k for k in TRANSFER_INITS if isinstance(init, dict) and k in init), None)
        if key:  # a 2D model carried into the 3D network it becomes
            source, target, verb = TRANSFER_INITS[key]
            _section(init, "init_weights", (key,))
            if not isinstance(init[key], str) or not init[key]:
                _fail(f"init_weights.{key}", f"must be {source} (card path or name); got {init!r}")
            if arch["name"] != target:
                _fail(f"init_weights.{key}", f"{verb} {source} into a {target!r} architecture, not {arch['name']!r}")
        else:
            _section(init, "init_weights", ("path", "strict", "prefix", "source_prefix"), required=("path",))
            init.setdefault("strict", True)
            init.setdefault("prefix", "")
            init.setdefault("source_prefix", "")
            if not isinstance(init["path"], str) or not isinstance(init["strict"], bool):
                _fail("init_weights", f"must be a path, or {{\"path\": ..., \"strict\": true|false, \"prefix\": "
                      f"\"net2d.\"}}; got {init!r}")
            for key in ("prefix", "source_prefix"):
                if not isinstance(init[key], str) or (init[key] and not init[key].endswith(".")):
                    _fail(f"init_weights.{key}", f"must be a module path ending in '.', e.g. \"net2d.\"; "
                          f"got {init[key]!r}")
        c["init_weights"] = init

    labels = c.setdefault("labels", [])
    if not isinstance(labels, list):
        _fail("labels", f"must be a list of {{name, label, color, terminology}}; got {labels!r}")
    for n, entry in enumerate(labels):
        _section(entry, f"labels[{n}]", ("name", "label", "color", "terminology"), required=("name", "label"))
        if not isinstance(entry["name"], str) or not entry["name"]:
            _fail(f"labels[{n}].name", f"must be a non-empty string; got {entry['name']!r}")
        if not (_is_int(entry["label"]) and 1 <= entry["label"] <= 255):
            _fail(f"labels[{n}].label", f"must be a label value 1…255; got {entry['label']!r}")
        if "color" in entry and not (isinstance(entry["color"], list) and len(entry["color"]) == 3
                                     and all(_is_number(v) and 0 <= v <= 1 for v in entry["color"])):
            _fail(f"labels[{n}].color", f"must be [r, g, b] in [0, 1]; got {entry['color']!r}")
    values = sorted(entry["label"] for entry in labels)
    if c["task"] == "segmentation" and values != list(range(1, len(values) + 1)):
        _fail("labels", f"segmentation label values must be 1…n without gaps or repeats; got {values}")
    if c["task"] == "segmentation" and not labels:
        _fail("labels", "a segmentation model needs at least one label")

    data = c["data"]
    if isinstance(data, dict) and "stacks" in data:
        _section(data, "data", ("stacks", "select", "channels", "crop_to_foreground"))
        if not isinstance(data["stacks"], str):
            _fail("data.stacks", f"must be a folder of .npz stacks; got {data['stacks']!r}")
        channels = data.setdefault("channels", None)
        if channels is not None and not (isinstance(channels, list) and channels
                                         and all(_is_int(v) and v >= 0 for v in channels)):
            _fail("data.channels", f"must be null (all) or a list of channel indices; got {channels!r}")
        margin = data.setdefault("crop_to_foreground", None)
        if margin is not None:
            _int(margin, "data.crop_to_foreground", 0)
        if c.get("preprocessing"):
            _fail("preprocessing", "stacks are stored preprocessed (every channel in [0, 1]); leave preprocessing empty")
    elif isinstance(data, dict) and "root" in data:
        _section(data, "data", ("root", "limit", "select"))
        if not isinstance(data["root"], str):
            _fail("data.root", f"must be a folder path; got {data['root']!r}")
        if "limit" in data:
            _int(data["limit"], "data.limit", 1)
    elif isinstance(data, dict) and "phantom" in data:
        _section(data, "data", ("phantom", "count", "seed", "options", "vary", "workers", "cache", "select"),
                 required=("count",))
        if data["phantom"] not in ("ct", "dbt"):
            _fail("data.phantom", f"must be 'ct' or 'dbt'; got {data['phantom']!r}")
        if data["phantom"] == "dbt" and c["task"] != "heatmap":
            _fail("data.phantom", "'dbt' phantoms give lesion heatmaps; they need task \"heatmap\"")
        _int(data["count"], "data.count", 1)
        data["seed"] = _int(data.get("seed", 0), "data.seed", 0)
        if not isinstance(data.setdefault("options", {}), dict):
            _fail("data.options", f"must be a JSON object of {data['phantom']}_phantom arguments; got {data['options']!r}")
        from ..datasets import _check_vary

        try:
            _check_vary(data["phantom"], data.setdefault("vary", {}))
        except TransferSegError as e:
            _fail("data.vary", str(e))
        data["workers"] = _int(data.get("workers", 0), "data.workers", 0)
        cache = data.setdefault("cache", None)
        if cache is not None and cache is not False and not isinstance(cache, str):
            _fail("data.cache", f"must be a folder, false (no cache) or null (OUT/cases); got {cache!r}")
    else:
        _fail("data", f"must be {{\"root\": folder}}, {{\"stacks\": folder}} or {{\"phantom\": \"ct\" | \"dbt\", "
              f"\"count\": N, \"seed\": S}}; got {data!r}")
    select = data.setdefault("select", None)
    if select is not None and not (isinstance(select, list) and select and all(isinstance(n, str) for n in select)):
        _fail("data.select", f"must be null (every case) or a list of case names; got {select!r}")

    val = c.setdefault("validation", {})
    _section(val, "validation", ("fraction", "every"))
    val["fraction"] = _number(val.get("fraction", 0.2), "validation.fraction", 0.0, 0.95)
    val["every"] = _int(val.get("every", 0), "validation.every", 0)

    if not isinstance(c.setdefault("preprocessing", {}), dict):
        _fail("preprocessing", f"must be a JSON object such as {{\"hu_window\": [-200, 250]}}; got {c['preprocessing']!r}")
    try:
        from ..preprocessing import preprocess

        preprocess(np.zeros((1, 1, 1), np.float32), c["preprocessing"])
    except TransferSegError as e:
        _fail("preprocessing", str(e))
    for key in ("working_spacing_mm", "expected_spacing_mm"):
        spacing = c.setdefault(key, None)
        if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                        and all(_is_number(v) and v > 0 for v in spacing)):
            _fail(key, f"must be null or [k, j, i] in mm; got {spacing!r}")
    if c["expected_spacing_mm"] is None:
        c["expected_spacing_mm"] = c["working_spacing_mm"]
    orientation = c.setdefault("working_orientation", None)
    if orientation is not None:
        from ..resample import to_orientation
        from ..volume import Volume

        try:
            to_orientation(Volume(np.zeros((1, 1, 1), np.float32)), orientation)
        except TransferSegError as e:
            _fail("working_orientation", str(e))

    patch = c["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(_is_int(p) and p >= 1 for p in patch)):
        _fail("patch_size", f"must be [k, j, i], three positive whole numbers; got {patch!r}")
    view = c.setdefault("view", None)
    if view is not None:
        from ..views import VIEWS

        if view not in VIEWS:
            _fail("view", f"must be null or one of {', '.join(VIEWS)}; got {view!r}")
        if c["working_orientation"] is None:
            _fail("view", "a view is anatomical: set working_orientation (e.g. \"LPS\") so every case is turned the same way")
    c["batch_size"] = _int(c.get("batch_size", 2), "batch_size", 1)
    c["positive_fraction"] = _number(c.get("positive_fraction", 0.5), "positive_fraction", 0.0, 1.0)
    positive = c.setdefault("positive_labels", None)
    if positive is not None:
        if not (isinstance(positive, list) and positive and all(_is_int(v) and v >= 1 for v in positive)):
            _fail("positive_labels", f"must be null or a list of label values ≥ 1; got {positive!r}")
        unknown = sorted(set(positive) - set(values))
        if c["task"] == "segmentation" and unknown:
            _fail("positive_labels", f"names label value(s) {unknown} that are not in labels")
    c["positive_threshold"] = _number(c.get("positive_threshold", 0.5), "positive_threshold")
    c["positive_jitter"] = _number(c.get("positive_jitter", 0.5), "positive_jitter", 0.0, 1.0)
    c["positive_sampling"] = c.get("positive_sampling", "voxel")
    if c["positive_sampling"] not in POSITIVE_SAMPLING:
        _fail("positive_sampling",
              f"must be {' or '.join(map(repr, POSITIVE_SAMPLING))}; got {c['positive_sampling']!r}")

    aug = c.setdefault("augmentation", {})
    _section(aug, "augmentation", ("flip_axes", "rot90_axes", "rotate_deg", "rotate_axes", "scale", "probability",
                                   "image_order"))
    aug["flip_axes"] = _axes_list(aug.get("flip_axes", []), "augmentation.flip_axes")
    aug["rot90_axes"] = _axes_list(aug.get("rot90_axes", []), "augmentation.rot90_axes", pairs=True)
    for n, (a, b) in enumerate(aug["rot90_axes"]):
        if patch[a] != patch[b]:
            _fail(f"augmentation.rot90_axes[{n}]", f"a 90° rotation in plane [{a}, {b}] needs patch_size[{a}] == "
                  f"patch_size[{b}]; the patch is {patch} (use in-plane rotations only for anisotropic patches)")
    aug["rotate_deg"] = _number(aug.get("rotate_deg", 0.0), "augmentation.rotate_deg", 0.0, 180.0)
    aug["rotate_axes"] = _axes_list(aug.get("rotate_axes", [[1, 2]]), "augmentation.rotate_axes", pairs=True)
    scale = aug.setdefault("scale", None)
    if scale is not None and not (isinstance(scale, list) and len(scale) == 2 and all(_is_number(s) and s > 0 for s in scale)
                                  and scale[0] <= scale[1]):
        _fail("augmentation.scale", f"must be null or [low, high] with 0 < low ≤ high; got {scale!r}")
    aug["probability"] = _number(aug.get("probability", 0.5), "augmentation.probability", 0.0, 1.0)
    aug["image_order"] = aug.get("image_order", 1)
    if aug["image_order"] not in (0, 1):
        _fail("augmentation.image_order", f"must be 0 (nearest) or 1 (linear); got {aug['image_order']!r}")

    stages = c["stages"]
    if not isinstance(stages, list) or not stages:
        _fail("stages", "must be a non-empty list of training stages")
    c["stages"] = [_check_stage(stage, n) for n, stage in enumerate(stages)]
    if c["task"] == "heatmap":
        for n, stage in enumerate(c["stages"]):
            for spec in (stage["loss"], (stage["loss"].get("switch") or {}).get("to")):
                if spec is not None and spec["name"] not in REGRESSION_LOSSES:
                    _fail(f"stages[{n}].loss", f"a heatmap task trains with {' or '.join(REGRESSION_LOSSES)}; "
                          f"got {spec['name']!r}")

    spe = c.setdefault("steps_per_epoch", None)
    if spe is not None:
        _int(spe, "steps_per_epoch", 1)
    c["checkpoint_every"] = _int(c.get("checkpoint_every", 100), "checkpoint_every", 1)
    c["keep_checkpoints"] = _int(c.get("keep_checkpoints", 1), "keep_checkpoints", 1)
    c["log_every"] = _int(c.get("log_every", 1), "log_every", 1)
    inference = c.setdefault("inference", {})
    if not isinstance(inference, dict):
        _fail("inference", f"must be a JSON object of inference settings; got {inference!r}")
    inference.setdefault("overlap", 0.5)
    inference.setdefault("activation", "softmax" if c["task"] == "segmentation" else "none")
    peaks = c.setdefault("peaks", None)
    if peaks is not None:
        _section(peaks, "peaks", ("threshold", "min_distance", "max_peaks"))
        if c["task"] != "heatmap":
            _fail("peaks", "peak finding (detections) is for task \"heatmap\"")
        if "threshold" in peaks:
            _number(peaks["threshold"], "peaks.threshold")
        distance = peaks.get("min_distance", 0)
        if not (_is_int(distance) and distance >= 0 or isinstance(distance, list) and len(distance) == 3
                and all(_is_int(d) and d >= 0 for d in distance)):
            _fail("peaks.min_distance", f"must be voxels ≥ 0, one number or [k, j, i]; got {distance!r}")
        if "max_peaks" in peaks:
            _int(peaks["max_peaks"], "peaks.max_peaks", 1)
    threads = c.setdefault("threads", None)
    if threads is not None:
        _int(threads, "threads", 1)
    c["workers"] = _int(c.get("workers", 0), "workers", 0)
    if not isinstance(c.setdefault("device", "auto"), str):
        _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {c['device']!r}")
    for name in ("deterministic", "progress_bar"):
        if not isinstance(c.setdefault(name, True), bool):
            _fail(name, f"must be true or false; got {c[name]!r}")
    if c.setdefault("storage_dtype", None) not in (None, "float16"):
        _fail("storage_dtype",
              f"must be null (float32) or \"float16\" (half the file size); got {c['storage_dtype']!r}")
    return c


def load_config(path) -> dict:
    """Read a JSON training config; relative ``data.root`` and ``init_weights`` paths are taken
    relative to the config file.  The config is validated (errors name the key) and returned as
    written, with those paths made absolute."""
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
    init = config.get("init_weights")
    key = next((k for k in TRANSFER_INITS if isinstance(init, dict) and k in init), "path")
    init_path = init.get(key) if isinstance(init, dict) else init
    if isinstance(init_path, str) and (os.sep in init_path or init_path.endswith((".json", ".safetensors"))):
        resolved = str((base / Path(init_path).expanduser()).resolve())
        if isinstance(init, dict):
            init[key] = resolved
        else:
            config["init_weights"] = resolved
    if "recipe" in config:
        from .recipes import validate_recipe

        validate_recipe(config)
    else:
        validate_config(config)
    return config


# --- data and patches -------------------------------------------------------------------------
@dataclass
class TrainingCase:
    """One preprocessed case held in memory for patch sampling."""

    name: str
    image: np.ndarray  # float32 (k, j, i), preprocessed, padded to at least the patch
    target: np.ndarray  # uint8 labels, or float32 heatmap, same shape
    pad_value: float
    positives: np.ndarray  # flat indices of the positive voxels (grouped by connected region)
    source_spacing: tuple = ()  # the case's own spacing (working orientation), before resampling
    regions: np.ndarray = None  # start of each connected positive region in ``positives``, then its end


@dataclass
class StackCase:
    """A case already on its working grid and preprocessed, as an .npz of arrays: ``image``
    (C, k, j, i) float32 in [0, 1] (e.g. the CT and three views' predictions, for a fusion
    network), ``target`` (k, j, i) and ``spacing`` (k, j, i) mm."""

    name: str
    path: Path

    def arrays(self) -> tuple:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                image, target = stored["image"], stored["target"]
                spacing = tuple(stored["spacing"].tolist()) if "spacing" in stored else ()
        except (OSError, ValueError, KeyError) as e:
            raise TransferSegError(f"{self.path}: not a readable stack (.npz with image, target): {e}") from None
        if image.ndim != 4 or image.shape[1:] != target.shape:
            raise TransferSegError(f"{self.path}: a stack's image is (C, k, j, i) and its target (k, j, i); got "
                                   f"{image.shape} and {target.shape}")
        return image, target, spacing


def write_stack(path, image: np.ndarray, target: np.ndarray, spacing) -> None:
    """Write a :class:`StackCase` file (atomically)."""
    with atomic_output(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, image=np.asarray(image, np.float32), target=np.asarray(target), spacing=np.asarray(spacing))


def _cases_from_spec(data: dict) -> list:
    from ..datasets import find_cases, phantom_cases

    if "stacks" in data:
        folder = Path(data["stacks"])
        if not folder.is_dir():
            raise TransferSegError(f"data.stacks: {folder} is not a folder")
        cases = [StackCase(p.name[: -len(".npz")], p) for p in sorted(folder.glob("*.npz"))]
        if not cases:
            raise TransferSegError(f"data.stacks: {folder} holds no .npz stacks")
    elif "root" in data:
        cases = find_cases(data["root"])
        cases = cases[: data["limit"]] if data.get("limit") else cases
    else:
        cases = phantom_cases(data["phantom"], data["count"], data["seed"], vary=data.get("vary"),
                              **data.get("options", {}))
    if data.get("select"):
        by_name = {case.name: case for case in cases}
        missing = [name for name in data["select"] if name not in by_name]
        if missing:
            raise TransferSegError(f"data.select names case(s) the data does not have: {', '.join(missing[:5])}")
        cases = [by_name[name] for name in data["select"]]
    return cases


def _working_case(case, spacing, orientation, heatmap: bool):
    """``case`` loaded and put on the working grid with the pipeline's own resampling:
    ``(image array, target array, source spacing)``."""
    from ..resample import labels_to_spacing, to_orientation, to_spacing

    volume, target = case.load()
    if target is None:
        raise TransferSegError(f"case {case.name} has no label map; training needs labelled data")
    if np.shape(target) != volume.shape:
        raise TransferSegError(f"case {case.name}: the target has shape {np.shape(target)} but the image {volume.shape}")
    volume, turn = to_orientation(volume, orientation)
    source_spacing = volume.spacing
    target = turn.apply(np.asarray(target))
    if spacing is not None:
        working = to_spacing(volume, spacing)
        if heatmap:
            target = to_spacing(volume.with_array(target), spacing, antialias=False).array  # keep the peaks
        else:
            target = labels_to_spacing(target, volume, working)
        volume = working
    return volume.array, target, source_spacing


def _cache_key(case, config: dict) -> str:
    import hashlib

    what = {"case": case.name, "image": str(getattr(case, "image_path", None)), "seed": getattr(case, "seed", None),
            "options": getattr(case, "options", None), "spacing": config["working_spacing_mm"],
            "orientation": config["working_orientation"], "task": config["task"], "version": 2}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.name)}-{digest}.npz"


def _cached_working_case(case, config: dict, cache: Optional[Path]):
    """_working_case through an .npz cache (arrays only; read with allow_pickle=False)."""
    if isinstance(case, StackCase):
        return case.arrays()
    path = cache / _cache_key(case, config) if cache is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return stored["image"], stored["target"], tuple(stored["spacing"].tolist())
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is made again
    image, target, spacing = _working_case(case, config["working_spacing_mm"], config["working_orientation"],
                                           config["task"] == "heatmap")
    if path is not None:
        from ..atomic import atomic_output

        cache.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, image=image, target=target, spacing=np.asarray(spacing))
    return image, target, spacing


def _load_cases(cases: list, config: dict, cache: Optional[Path], workers: int, report=None) -> list:
    """Every case as a :class:`TrainingCase`; ``workers`` processes generate / resample them."""
    if workers > 1 and len(cases) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_cached_working_case, case, config, cache) for case in cases]
            loaded = []
            for n, future in enumerate(futures):
                loaded.append(future.result())
                if report:
                    report(n + 1, len(cases))
    else:
        loaded = []
        for n, case in enumerate(cases):
            loaded.append(_cached_working_case(case, config, cache))
            if report:
                report(n + 1, len(cases))
    return [_load_case(case, config, data) for case, data in zip(cases, loaded)]


def _load_case(case, config: dict, loaded=None) -> TrainingCase:
    from ..preprocessing import preprocess

    if loaded is None:
        loaded = _cached_working_case(case, config, None)
    array, target, _ = loaded
    data = config["data"]
    if isinstance(case, StackCase):
        image = np.asarray(array, np.float32)
        if data.get("channels") is not None:
            if max(data["channels"]) >= image.shape[0]:
                raise TransferSegError(f"case {case.name}: data.channels {data['channels']} but the stack has "
                                       f"{image.shape[0]} channels")
            image = image[data["channels"]]
        if data.get("crop_to_foreground") is not None:
            image, target = _crop_to_foreground(image, np.asarray(target), data["crop_to_foreground"])
    else:
        image = preprocess(array, config["preprocessing"])
    if config["view"] is not None:  # the view's slice stack: (slice, row, column)
        from ..views import directions_of, to_view, view_permutation

        permutation = view_permutation(directions_of(config["working_orientation"]), config["view"])
        image, target = to_view(image, permutation), to_view(np.asarray(target), permutation)
    if config["task"] == "segmentation":
        target = np.asarray(target)
        if target.dtype.kind == "f" and not np.array_equal(target, np.round(target)):
            raise TransferSegError(f"case {case.name}: the label map holds non-integer values")
        target = target.astype(np.uint8)
        extra = sorted(set(np.unique(target).tolist()) - {0} - {e["label"] for e in config["labels"]})
        if extra:
            raise TransferSegError(
                f"case {case.name}: the label map holds value(s) {extra} that the config's labels do not name"
            )
        positive = config["positive_labels"] or [e["label"] for e in config["labels"]]
        is_positive = np.isin(target, positive)
    else:
        target = np.asarray(target, dtype=np.float32)
        is_positive = target >= config["positive_threshold"]
    pad_value = float(image.min())
    patch = config["patch_size"]
    padding = [(0, max(0, p - s)) for p, s in zip(patch, image.shape[-3:])]
    if any(after for _, after in padding):  # a volume smaller than the patch
        image = np.pad(image, [(0, 0)] * (image.ndim - 3) + padding, constant_values=pad_value)
        target = np.pad(target, padding)
        is_positive = np.pad(is_positive, padding)
    positives, regions = _positive_voxels(is_positive, config.get("positive_sampling", "voxel") == "component")
    return TrainingCase(case.name, np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target),
                        pad_value, positives, tuple(float(v) for v in loaded[2]), regions)


def _positive_voxels(is_positive: np.ndarray, by_region: bool) -> tuple:
    """(flat indices of the positive voxels, region bounds): with ``by_region`` the indices are
    grouped by 26-connected region and ``bounds[r]:bounds[r + 1]`` are region r's; else None."""
    if not by_region:
        return np.flatnonzero(is_positive), None
    regions, count = ndimage.label(is_positive, structure=np.ones((3, 3, 3), bool))
    flat = regions.ravel()
    positives = np.flatnonzero(flat)
    order = np.argsort(flat[positives], kind="stable")
    sizes = np.bincount(flat[positives], minlength=count + 1)[1:]
    return positives[order], np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _crop_to_foreground(image: np.ndarray, target: np.ndarray, margin: int) -> tuple:
    """(image, target) cut to the box of the target's foreground padded by ``margin`` voxels
    (VFN sec. 2.3: the region of interest); a case without foreground is kept whole."""
    found = np.nonzero(target)
    if not found[0].size:
        return image, target
    box = tuple(slice(max(0, int(f.min()) - margin), int(f.max()) + 1 + margin) for f in found)
    return np.ascontiguousarray(image[(Ellipsis,) + box]), np.ascontiguousarray(target[box])


def rotations90(planes) -> list:
    """The rotations by multiples of 90° generated by quarter turns in ``planes`` ([[a, b], ...]),
    each as (axis permutation, axes to flip) to apply to a (k, j, i) array.  One plane gives 4
    rotations; two or three planes of a cube give all 24.  ``[]`` for no planes."""
    if not planes:
        return []
    generators = []
    for a, b in planes:
        m = np.eye(3, dtype=int)
        m[a, a], m[a, b], m[b, a], m[b, b] = 0, -1, 1, 0
        generators.append(m)
    seen = {tuple(np.eye(3, dtype=int).ravel())}
    frontier = [np.eye(3, dtype=int)]
    while frontier:
        current = frontier.pop()
        for g in generators:
            product = g @ current
            key = tuple(product.ravel())
            if key not in seen:
                seen.add(key)
                frontier.append(product)
    rotations = []
    for key in sorted(seen):
        m = np.array(key).reshape(3, 3)
        perm = tuple(int(np.flatnonzero(row)[0]) for row in m)
        flips = tuple(i for i, row in enumerate(m) if row[perm[i]] < 0)
        rotations.append((perm, flips))
    return rotations


def _rotation_in_plane(a: int, b: int, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return m


class PatchSampler:
    """Draws training patches on the fly: item ``index`` of step ``step`` is a pure function of
    (seed, step, index), so any process can draw any share of a global batch.

    A patch is positive with probability ``positive_fraction`` (if any case has positive voxels):
    it is centred on a random positive voxel of a random positive case (``positive_sampling``
    "voxel") or of a random connected positive region of all cases ("component"), moved by a
    uniform jitter of up to ± ``positive_jitter`` · patch / 2 per axis (the voxel stays inside
    the patch) and clipped to the volume; otherwise it lies uniformly at random in a random
    case.  Then, in this order: a small rotation and isotropic zoom about the patch centre (one
    affine resampling straight from the volume: image with ``image_order``, labels nearest,
    outside the volume the image's minimum and label 0), a random 90° rotation from
    :func:`rotations90`, and flips.
    """

    def __init__(self, cases: list, config: dict, workers: int = 0):
        if not cases:
            raise TransferSegError("no training cases: every case went to validation; lower validation.fraction")
        self.cases, self.seed = cases, config["seed"]
        self.patch = np.array(config["patch_size"])
        self.positive_fraction, self.jitter = config["positive_fraction"], config["positive_jitter"]
        self.aug = config["augmentation"]
        self.heatmap = config["task"] == "heatmap"
        self.rot90 = rotations90(self.aug["rot90_axes"])
        self.positive_cases = [n for n, c in enumerate(cases) if c.positives.size]
        self.regions = None  # with positive_sampling "component": (case, first, end) of every region
        if config.get("positive_sampling", "voxel") == "component":
            self.regions = [(n, int(a), int(b)) for n, c in enumerate(cases) if c.regions is not None
                            for a, b in zip(c.regions[:-1], c.regions[1:])]
        self.pool = ThreadPoolExecutor(workers) if workers else None

    def item(self, step: int, index: int):
        """(image float32, target) patches of shape ``patch_size``."""
        rng = np.random.default_rng([self.seed, step, index])
        patch = self.patch
        if self.positive_cases and rng.random() < self.positive_fraction:
            if self.regions:
                n, first, end = self.regions[rng.integers(len(self.regions))]
                case, flat = self.cases[n], self.cases[n].positives[rng.integers(first, end)]
            else:
                case = self.cases[self.positive_cases[rng.integers(len(self.positive_cases))]]
                flat = case.positives[rng.integers(case.positives.size)]
            voxel = np.array(np.unravel_index(flat, case.target.shape))
            half = patch // 2
            jitter = np.round(rng.uniform(-1.0, 1.0, 3) * self.jitter * patch / 2).astype(int)
            jitter = np.clip(jitter, half - patch + 1, half)  # keep the voxel inside the patch
            start = voxel + jitter - half
        else:
            case = self.cases[rng.integers(len(self.cases))]
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(case.target.shape, patch)])
        start = np.clip(start, 0, np.array(case.target.shape) - patch)
        return self._augmented(case, start, rng)

    def _augmented(self, case: TrainingCase, start: np.ndarray, rng: np.random.Generator):
        aug = self.aug
        matrix = None
        if (aug["rotate_deg"] > 0 or aug["scale"]) and rng.random() < aug["probability"]:
            matrix = np.eye(3)
            for a, b in aug["rotate_axes"]:
                matrix = _rotation_in_plane(a, b, rng.uniform(-aug["rotate_deg"], aug["rotate_deg"])) @ matrix
            if aug["scale"]:
                matrix = matrix / rng.uniform(*aug["scale"])  # output → input: zoom in by the factor
        rotation = None
        if self.rot90 and rng.random() < aug["probability"]:
            rotation = self.rot90[rng.integers(len(self.rot90))]
        flips = [axis for axis in aug["flip_axes"] if rng.random() < 0.5]

        target_order = 1 if self.heatmap else 0
        channels = case.image.ndim == 4  # (C, k, j, i): every channel moves with the others
        if matrix is None:
            box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            image, target = case.image[(Ellipsis,) + box], case.target[box]
        else:
            centre_out = (self.patch - 1) / 2.0
            offset = start + centre_out - matrix @ centre_out
            shape = tuple(int(p) for p in self.patch)
            planes = case.image if channels else case.image[None]
            image = np.stack([ndimage.affine_transform(plane, matrix, offset, shape, output=np.float32,
                                                       order=aug["image_order"], mode="constant", cval=case.pad_value,
                                                       prefilter=False) for plane in planes])
            image = image if channels else image[0]
            target = ndimage.affine_transform(case.target, matrix, offset, shape, output=case.target.dtype,
                                              order=target_order, mode="constant", cval=0, prefilter=False)
        lead = 1 if channels else 0
        if rotation is not None:
            perm, axes = rotation
            image = np.transpose(image, tuple(range(lead)) + tuple(lead + p for p in perm))
            target = np.transpose(target, perm)
            if axes:
                image, target = np.flip(image, tuple(lead + a for a in axes)), np.flip(target, axes)
        if flips:
            image, target = np.flip(image, tuple(lead + a for a in flips)), np.flip(target, flips)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target)

    def batch(self, step: int, indices) -> tuple:
        """Tensors (n, C, k, j, i) float32 (C = 1 for a plain image) and (n, k, j, i) int64 labels or
        (n, 1, k, j, i) float32 heatmaps."""
        indices = list(indices)
        if self.pool is not None:
            items = list(self.pool.map(lambda i: self.item(step, i), indices))
        else:
            items = [self.item(step, i) for i in indices]
        images = torch.from_numpy(np.stack([image for image, _ in items]))
        images = images[:, None] if images.ndim == 4 else images
        targets = torch.from_numpy(np.stack([target for _, target in items]))
        targets = targets[:, None].float() if self.heatmap else targets.long()
        return images, targets

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# --- parameter groups, optimizers, schedules, loss switches -----------------------------------
def parameter_groups(network: nn.Module) -> dict:
    """{name: [parameters]}: the network's ``parameter_groups()``, or {"all": ...} without it.
    Parameters that the network's groups leave out form a group "other"."""
    if hasattr(network, "parameter_groups"):
        groups = {name: list(params) for name, params in network.parameter_groups().items()}
    else:
        groups = {"all": list(network.parameters())}
    owner = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in owner and owner[id(p)] != name:
                raise TransferSegError(
                    f"{type(network).__name__}.parameter_groups() puts a parameter in both {owner[id(p)]!r} and {name!r}"
                )
            owner[id(p)] = name
    rest = [p for p in network.parameters() if id(p) not in owner]
    if rest:
        groups["other"] = rest
    return groups


def learning_rate_factor(schedule: dict, t: int, steps: int) -> float:
    """The factor on the base learning rate at stage step ``t`` (0-based) of ``steps``:
    constant 1; step γ^⌊t / step_size⌋; poly (1 − t / steps)^power; multistep γ^(milestones
    passed), a milestone m at step round(m · steps) (VFN sec. 2.3: 0.01, ÷10 at 2/3 and 5/6)."""
    name = schedule["name"]
    if name == "step":
        return schedule["gamma"] ** (t // schedule["step_size"])
    if name == "poly":
        return (1.0 - t / steps) ** schedule["power"]
    if name == "multistep":
        return schedule["gamma"] ** sum(t >= round(m * steps) for m in schedule["milestones"])
    return 1.0


def _build_optimizer(groups: dict, stage: dict):
    """A fresh optimizer over the stage's unfrozen groups; returns it and the base lr per group."""
    opt = dict(stage["optimizer"])
    name, lr = opt.pop("name"), opt.pop("lr")
    param_groups = [{"params": params, "lr": stage["group_lr"].get(group, lr), "group": group}
                    for group, params in groups.items() if group not in stage["frozen"] and params]
    if not param_groups:
        raise TransferSegError(f"training stage {stage['name']!r} freezes every parameter group; nothing to train")
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    optimizer = cls(param_groups, lr=lr, **opt)
    return optimizer, [g["lr"] for g in param_groups]


class PlateauTracker:
    """Says when a loss has stopped improving: after ``patience`` consecutive steps in which the
    mean of the last ``window`` losses did not fall below the best mean so far by more than
    ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0, window: int = 1):
        self.patience, self.min_delta, self.window = patience, min_delta, window
        self.best, self.wait, self.recent = math.inf, 0, []

    def update(self, value: float) -> bool:
        self.recent = (self.recent + [float(value)])[-self.window:]
        if len(self.recent) < self.window:
            return False
        mean = sum(self.recent) / self.window
        if mean < self.best - self.min_delta:
            self.best, self.wait = mean, 0
        else:
            self.wait += 1
        return self.wait >= self.patience

    def state(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best, "wait": self.wait, "recent": self.recent}

    def load_state(self, state: dict) -> None:
        self.best = math.inf if state["best"] is None else state["best"]
        self.wait, self.recent = state["wait"], list(state["recent"])


class LossSchedule:
    """A stage's loss and its optional switch (``at_step``, ``at_epoch`` or ``on_plateau``)."""

    def __init__(self, spec: dict, steps_per_epoch: int, device):
        spec = dict(spec)
        self.switch = spec.pop("switch", None)
        self.first = (spec["name"], build_loss(spec).to(device))
        self.second = None
        self.at_step, self.tracker = None, None
        if self.switch:
            self.second = (self.switch["to"]["name"], build_loss(self.switch["to"]).to(device))
            if "at_step" in self.switch:
                self.at_step = self.switch["at_step"]
            elif "at_epoch" in self.switch:
                self.at_step = self.switch["at_epoch"] * steps_per_epoch
            else:
                plateau = self.switch["on_plateau"]
                self.tracker = PlateauTracker(plateau["patience"], plateau["min_delta"], plateau["window"])
        self.switched_at = None  # the first stage step that uses the second loss

    def current(self, t: int):
        """(name, loss module) for stage step ``t``."""
        if self.switched_at is None and self.at_step is not None and t >= self.at_step:
            self.switched_at = t
        return self.second if self.switched_at is not None else self.first

    def observe(self, t: int, value: float) -> None:
        """Feed the (global-batch) loss of stage step ``t``; a plateau switches from step t + 1."""
        if self.tracker is not None and self.switched_at is None and self.tracker.update(value):
            self.switched_at = t + 1

    def state(self) -> dict:
        return {"switched_at": self.switched_at, "tracker": self.tracker.state() if self.tracker else None}

    def load_state(self, state: dict) -> None:
        self.switched_at = state["switched_at"]
        if self.tracker is not None and state.get("tracker"):
            self.tracker.load_state(state["tracker"])


def _freeze(network: nn.Module, groups: dict, stage: dict) -> list:
    """requires_grad per the stage; returns the BatchNorm modules to keep in eval (``freeze_bn``)."""
    frozen_ids = set()
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name not in stage["frozen"])
            if name in stage["frozen"]:
                frozen_ids.add(id(p))
    if not stage["freeze_bn"]:
        return []
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(True for _ in m.parameters()) and all(id(p) in frozen_ids for p in m.parameters())]


# --- checkpoints --------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    from ..weights import sha256_file

    return sha256_file(path)


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _optimizer_to_files(state_dict: dict):
    """Split an optimizer state_dict into safetensors tensors and a JSON-able rest."""
    tensors, state = {}, {}
    for index, entries in state_dict["state"].items():
        state[str(index)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                key = f"state.{index}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                state[str(index)][name] = {"tensor": key}
            else:
                state[str(index)][name] = {"value": value}
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {}
    for index, entries in meta["state"].items():
        state[int(index)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, payload) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _save_checkpoint(out: Path, step: int, network: nn.Module, optimizer, state: dict, keep: int) -> Path:
    """Write checkpoint-<step>/ file by file (each atomically), then point checkpoint.json at it."""
    from safetensors.torch import save_file

    folder = out / f"checkpoint-{step:08d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
    files = {}
    for name, tensors in (("weights.safetensors", weights), ("optimizer.safetensors", opt_tensors)):
        with atomic_output(folder / name) as tmp:
            save_file(tensors, str(tmp))
            files[name] = _sha256(tmp)
    with atomic_output(folder / "optimizer.json") as tmp:
        tmp.write_text(json.dumps(opt_meta, default=_json_default) + "\n", encoding="utf-8")
        files["optimizer.json"] = _sha256(tmp)
    _write_json(folder / "state.json", dict(state, format=CHECKPOINT_FORMAT, step=step, files=files))
    _write_json(out / "checkpoint.json", {"latest": folder.name, "step": step})
    # older ones beyond ``keep``, and leftovers of a killed run past this step, are not pointed at
    folders = sorted(f for f in out.glob("checkpoint-[0-9]*") if f.is_dir() and f.name[11:].isdigit())
    older = [f for f in folders if int(f.name[11:]) < step]
    for old in older[: max(0, len(older) - (keep - 1))] + [f for f in folders if int(f.name[11:]) > step]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _load_checkpoint(out: Path) -> Optional[dict]:
    """The latest complete checkpoint's state (with its folder), its files' checksums verified."""
    pointer = out / "checkpoint.json"
    if not pointer.exists():
        return None
    try:
        folder = out / json.loads(pointer.read_text(encoding="utf-8"))["latest"]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, ValueError) as e:
        raise TransferSegError(f"{pointer}: the checkpoint cannot be read ({e}); delete {out} to start afresh") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TransferSegError(f"{folder}: not a TransferSeg checkpoint of format {CHECKPOINT_FORMAT}")
    for name, digest in state["files"].items():
        if not (folder / name).exists() or _sha256(folder / name) != digest:
            raise TransferSegError(f"{folder / name}: missing or damaged (checksum mismatch); delete {folder.name} "
                                   "and checkpoint.json to restart from scratch")
    state["folder"] = folder
    return state


def _remove_partial_files(out: Path) -> None:
    """Temporary files of io.atomic_output that a killed run left behind (never a finished file)."""
    if out.is_dir():
        for path in list(out.glob(".*.partial-*")) + list(out.glob("checkpoint-*/.*.partial-*")) \
                + list(out.glob("model/.*.partial-*")):
            path.unlink(missing_ok=True)


def _check_same_run(saved: dict, config: dict, out: Path) -> None:
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RUNTIME_KEYS and saved.get(k) != config.get(k))
    if differ:
        raise TransferSegError(
            f"{out} holds a run of a different config (differs in {', '.join(differ)}); "
            "use another output folder, or delete this one to start afresh"
        )


# --- logs and curves ------------------------------------------------------------------------------
def _label_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


class RunLog:
    """Rows of OUT/log.csv kept in memory and rewritten atomically at checkpoints and the end."""

    def __init__(self, path: Path, groups: list, labels: list):
        self.path = path
        self.lr_columns = [f"lr_{g}" for g in groups]
        self.val_columns = [f"val_dice_{_label_key(e['name'])}" for e in labels]
        self.columns = (["step", "epoch", "stage", "stage_name", "loss", "loss_name"] + self.lr_columns
                        + self.val_columns + ["elapsed_s"])
        self.rows: list = []

    def restore(self, up_to_step: int) -> None:
        """Keep the rows of an interrupted run up to its checkpoint."""
        if not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            self.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]

    def add(self, row: dict) -> None:
        self.rows.append({c: "" if row.get(c) is None else row[c] for c in self.columns})

    def write(self) -> None:
        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_output(self.path) as tmp:
            tmp.write_text(buffer.getvalue(), encoding="utf-8")

    def plot(self, path: Path, title: str) -> None:
        """Loss (per stage and loss), learning rates and validation Dice against the step."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        def column(name):
            return np.array([float(r[name]) if r.get(name) not in ("", None) else np.nan for r in self.rows])

        steps = column("step")
        has_val = any(r.get(c) not in ("", None) for r in self.rows for c in self.val_columns)
        panels = 3 if has_val else 2
        fig = Figure(figsize=(7, 2.6 * panels), dpi=90)
        FigureCanvasAgg(fig)
        axes = fig.subplots(panels, 1, sharex=True)
        loss = column("loss")
        for key in dict.fromkeys((r["stage_name"], r["loss_name"]) for r in self.rows):
            mask = np.array([(r["stage_name"], r["loss_name"]) == key for r in self.rows])
            axes[0].plot(steps[mask], loss[mask], lw=0.8, label=f"{key[0]}: {key[1]}")
        if self.rows and np.all(loss[np.isfinite(loss)] > 0):
            axes[0].set_yscale("log")
        axes[0].set_ylabel("loss")
        axes[0].set_title(title)
        for c in self.lr_columns:
            axes[1].plot(steps, column(c), lw=0.8, label=c[3:])
        axes[1].set_ylabel("learning rate")
        if has_val:
            for c in self.val_columns:
                values = column(c)
                mask = np.isfinite(values)
                axes[2].plot(steps[mask], values[mask], "o-", ms=3, label=c[9:])
            axes[2].set_ylabel("validation Dice")
            axes[2].set_ylim(0, 1)
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")


# --- the trainer ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns."""

    output_dir: Path
    steps: int  # optimizer steps done
    total_steps: int
    final_loss: Optional[float] = None
    metrics: dict = field(default_factory=dict)
    card_path: Optional[Path] = None  # None until training has finished
    resumed_from: Optional[int] = None  # the checkpoint step this run started from
    log_path: Optional[Path] = None
    curves_path: Optional[Path] = None

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps and self.card_path is not None

    def summary(self) -> str:
        lines = [f"trained {self.steps}/{self.total_steps} steps in {self.output_dir}"
                 + (f" (resumed from step {self.resumed_from})" if self.resumed_from else "")]
        if self.final_loss is not None:
            lines.append(f"final loss: {self.final_loss:.6g}")
        for name, value in (self.metrics.get("validation_dice") or {}).items():
            lines.append(f"validation Dice {name}: {value:.4f}")
        lines.append(f"model: {self.card_path}" if self.card_path else
                     "not finished: run the same command again to resume")
        return "\n".join(lines)


def _import_architecture(arch: dict) -> None:
    if arch.get("module"):
        try:
            importlib.import_module(arch["module"])
        except ImportError as e:
            raise TransferSegError(f"training config: architecture.module: cannot import {arch['module']!r} ({e})") from None


def _build_network(config: dict, device) -> tuple:
    """``(network on device, the init_weights report or None)``."""
    from ..nets import build_network

    arch = config["architecture"]
    _import_architecture(arch)
    torch.manual_seed(config["seed"])  # the same initial weights in every process and run
    network = build_network(arch["name"], arch["config"])
    multiple = getattr(network, "size_multiple", 1)
    multiple = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    bad = [p for p, m in zip(config["patch_size"], multiple) if p % m]
    if bad:
        _fail("patch_size", f"{config['patch_size']} must be a multiple of {list(multiple)} per axis for "
              f"{arch['name']} (its size_multiple)")
    for n, stage in enumerate(config["stages"]):
        for path in stage["network"]:
            _stage_attribute(network, path, f"stages[{n}].network")
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


def _stage_attribute(network: nn.Module, path: str, key: str) -> tuple:
    """(module, attribute name) of a stage's ``network`` option, e.g. "net2d.unet_connections"."""
    *modules, attribute = path.split(".")
    owner = network
    for name in modules:
        owner = getattr(owner, name, None)
        if not isinstance(owner, nn.Module):
            _fail(key, f"{path!r}: the network has no submodule {'.'.join(modules)!r}")
    if not hasattr(owner, attribute) or isinstance(getattr(owner, attribute), (nn.Module, torch.Tensor)):
        _fail(key, f"{path!r}: {type(owner).__name__} has no plain attribute {attribute!r}")
    return owner, attribute


def _apply_stage_options(network: nn.Module, stage: dict, built: dict) -> None:
    """Set the stage's ``network`` attributes; those another stage names go back to their built values."""
    for path, value in {**built, **stage["network"]}.items():
        owner, attribute = _stage_attribute(network, path, "network")
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
        _fail("init_weights", f"{source}: none of its {len(mapped)} tensors matches the network {where} (its keys look "
              f"like {', '.join(list(state)[:3]) or 'nothing'}; the network's like {', '.join(under[:3]) or 'nothing'}); "
              "check the file and init_weights.prefix")
    if strict and (shapes or unexpected or missing):
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (
            ("with another shape", shapes), ("not in the network", unexpected), ("of the network not in the weights",
                                                                               missing)) if v]
        _fail("init_weights", f"{source} does not match the network {where}: {'; '.join(problems)}; set "
              "\"strict\": false to load what matches")
    network.load_state_dict({key: mapped[key] for key in matched}, strict=False)
    return report


def _transferred_weights(mcgcn_model: str, ahnet: nn.Module, seed: int) -> dict:
    """The state of an AH-Net like ``ahnet`` whose encoder is the MC-GCN model's (AH-Net sec. 3.2),
    built after reseeding so that its fresh decoder equals ``ahnet``'s own initialisation."""
    from ..models import load_model
    from ..nets import MCGCN, SliceStack2D, transfer_mcgcn_to_ahnet

    mcgcn = load_model(mcgcn_model, device="cpu").network
    if isinstance(mcgcn, SliceStack2D):
        mcgcn = mcgcn.net
    if not isinstance(mcgcn, MCGCN):
        _fail("init_weights.transfer_from", f"{mcgcn_model} holds a {type(mcgcn).__name__}, not an MC-GCN")
    for key, value in (("backbone", mcgcn.backbone), ("stem_slices", mcgcn.in_channels)):
        if ahnet.config[key] != value:
            _fail("architecture.config", f"{key} is {ahnet.config[key]!r} but the MC-GCN in {mcgcn_model} has {value!r}")
    torch.manual_seed(seed)
    return transfer_mcgcn_to_ahnet(mcgcn, **ahnet.config).state_dict()


def _converted_weights(model_2d: str, arch_config: dict) -> dict:
    """The state of the trained 2D model converted as ``arch_config`` says (a "converted" architecture)."""
    from ..models import load_model
    from ..nets import SliceStack2D, build_network
    from ..nets.convert import convert

    loaded = load_model(model_2d, device="cpu")
    network = loaded.network.net if isinstance(loaded.network, SliceStack2D) else loaded.network
    name = loaded.card["architecture"]["name"]
    if name.removesuffix("_multislice") != arch_config["source"].removeprefix("transferseg:"):
        _fail("init_weights.convert_from", f"{model_2d} holds a {name!r} network; architecture.config.source is "
              f"{arch_config['source']!r}")
    expected = build_network(arch_config["source"].removeprefix("transferseg:"), arch_config.get("config")).config
    given = {k: v for k, v in getattr(network, "config", {}).items() if k in expected}
    if given != expected:
        differ = [k for k in expected if given.get(k) != expected[k]]
        _fail("architecture.config.config", f"{differ[0]} is {expected[differ[0]]!r} but the 2D network in {model_2d} "
              f"has {given.get(differ[0])!r}")
    return convert(network, arch_config.get("to", "acs")).state_dict()


def _initial_weights(path: str) -> dict:
    from ..models import load_model
    from ..weights import read_state_dict

    if path.endswith(".safetensors"):
        file = Path(path).expanduser()
        if not file.exists():
            _fail("init_weights", f"{file}: no such file")
        return read_state_dict(file)
    return load_model(path, device="cpu").network.state_dict()


def _check_heads(outputs, stage: dict) -> None:
    if not isinstance(outputs, dict):
        _fail("stages.heads", f"stage {stage['name']!r} trains heads {', '.join(stage['heads'])}, but the network "
              "gives one output for heads=...; name no heads for it")
    missing = [name for name in stage["heads"] if name not in outputs]
    if missing:
        _fail("stages.heads", f"stage {stage['name']!r}: the network has no output head {missing[0]!r} "
              f"(it has {', '.join(outputs)})")


def _check_output(output: torch.Tensor, targets: torch.Tensor, config: dict) -> None:
    """Clear errors for a network whose output does not fit the labels (checked once)."""
    if output.shape[2:] != targets.shape[-3:]:
        raise TransferSegError(f"the network's output {tuple(output.shape)} does not cover the patch "
                               f"{tuple(targets.shape[-3:])}; its outputs must align with its inputs")
    if config["task"] == "segmentation" and output.shape[1] != len(config["labels"]) + 1:
        raise TransferSegError(
            f"training config: architecture.config: the network has {output.shape[1]} output channels but "
            f"{len(config['labels'])} labels need {len(config['labels']) + 1} (background + one per label)"
        )
    if config["task"] == "heatmap" and output.shape[1] != 1:
        raise TransferSegError(f"training config: architecture.config: a heatmap network needs 1 output channel, "
                               f"not {output.shape[1]}")


def _validate(network: nn.Module, cases: list, config: dict, device) -> Optional[dict]:
    """Dice per label of the sliding-window predictions on the validation cases."""
    try:
        from ..inference import sliding_window_inference
    except ImportError:
        return None
    from ..metrics import dice

    if not cases or config["task"] != "segmentation":
        return {"validation_cases": len(cases)} if cases else None
    settings = config["inference"]
    scores = {e["name"]: [] for e in config["labels"]}
    for case in cases:
        result = sliding_window_inference(
            case.image, network, patch_size=tuple(config["patch_size"]), num_classes=len(config["labels"]) + 1,
            overlap=settings.get("overlap", 0.5), blend=settings.get("blend", "gaussian"),
            batch_size=settings.get("batch_size", 2), device=device,
            activation=settings.get("activation", "softmax"))
        for e in config["labels"]:
            scores[e["name"]].append(dice(result.labels, case.target, label=e["label"]))
    return {"validation_dice": {name: float(np.mean(v)) for name, v in scores.items()},
            "validation_cases": len(cases)}


def trained_spacing(cases: list) -> Optional[dict]:
    """``{"min": [k, j, i], "max": [k, j, i]}`` of the training cases' own spacings: the range the
    pipeline warns outside of."""
    spacings = np.array([c.source_spacing for c in cases if len(c.source_spacing) == 3])
    if not len(spacings):
        return None
    return {"min": spacings.min(axis=0).round(4).tolist(), "max": spacings.max(axis=0).round(4).tolist()}


def _model_card(config: dict, data_spec, total: int, world: int, metrics: dict, spacing_range=None) -> dict:
    card = {
        "name": config["name"], "version": config["version"], "task": config["task"],
        "labels": config["labels"],
        "architecture": {k: config["architecture"][k] for k in ("name", "config", "module") if k in config["architecture"]},
        "preprocessing": config["preprocessing"], "patch_size": config["patch_size"],
        "expected_spacing_mm": config["expected_spacing_mm"], "working_spacing_mm": config["working_spacing_mm"],
        "working_orientation": config["working_orientation"], "trained_spacing_mm": spacing_range,
        "inference": config["inference"],
        "training": {"data": data_spec, "seed": config["seed"], "steps": total, "processes": world, "config": config},
        "metrics": metrics,
    }
    for key in ("description", "postprocessing", "evaluation", "peaks", "expects", "view"):
        if config.get(key) is not None:
            card[key] = config[key]
    return card


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1, np.uint64)[0] >> 1)


def train(config: dict, output_dir=None, progress: Optional[ProgressCallback] = None,
          cancel: Optional[CancelToken] = None, *, max_steps: Optional[int] = None, cases=None) -> TrainResult:
    """Train (or resume training) the model that ``config`` describes; see the module docstring.

    Args:
        config: a training config dict (``load_config`` reads one from JSON); validated here.
        output_dir: the run folder (default ``runs/<name>``); an existing checkpoint of the same
            config in it is resumed, one of a different config is an error.
        progress: ``callable(fraction, stage)``; cancel: a :class:`CancelToken` checked every step
            (a cancelled run raises :class:`Cancelled`; its last checkpoint stays resumable).
        max_steps: stop after this many optimizer steps in all (a checkpoint is written there).
        cases: :class:`~TransferSegLib.datasets.Case` objects to use instead of ``config["data"]``.

    Under torchrun every process calls this; only rank 0 writes files.
    """
    config = validate_config(config)
    out = Path(output_dir) if output_dir is not None else Path("runs") / config["name"]
    check_output_folder(out)  # a file in the way is named now, not by a failed mkdir deep inside the run
    if max_steps is not None and (not _is_int(max_steps) or max_steps < 0):
        raise TransferSegError(f"max_steps must be a whole number ≥ 0; got {max_steps!r}")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_num_threads())
    procs = Processes(config["device"])
    try:
        if config["threads"]:
            torch.set_num_threads(config["threads"])
        if config["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA ≥ 10.2)
            torch.use_deterministic_algorithms(True, warn_only=True)
        return _run(config, out, procs, progress, cancel, max_steps, cases)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        procs.close()


def _run(config, out, procs, progress, cancel, max_steps, cases):
    from torch.nn.parallel import DistributedDataParallel

    stages = config["stages"]
    total = sum(s["steps"] for s in stages)
    starts = np.cumsum([0] + [s["steps"] for s in stages]).tolist()
    world, rank = procs.world, procs.rank
    if config["batch_size"] % world:
        _fail("batch_size", f"{config['batch_size']} does not split evenly over {world} processes; "
              "use a multiple of the process count")

    # a finished run: nothing to do
    result_file = out / "result.json"
    if result_file.exists():
        finished = json.loads(result_file.read_text(encoding="utf-8"))
        _check_same_run(finished["config"], config, out)
        card = out / finished["card"]
        if card.exists():
            return TrainResult(out, finished["steps"], total, finished["final_loss"], finished["metrics"], card,
                                     None, out / "log.csv", out / "curves.png")

    if procs.main:
        _remove_partial_files(out)
    state = _load_checkpoint(out)
    if state is not None:
        _check_same_run(state["config"], config, out)
    step = state["step"] if state else 0

    data_spec = config["data"] if cases is None else {"cases": [c.name for c in cases]}
    all_cases = _cases_from_spec(config["data"]) if cases is None else list(cases)
    from ..datasets import split_cases

    train_cases, val_cases = split_cases(all_cases, config["validation"]["fraction"], config["seed"])
    if config["validation"]["fraction"] == 0:
        train_cases, val_cases = all_cases, []
    data = config["data"]
    cache = None
    if data.get("cache") is not False and "phantom" in data:
        cache = Path(data["cache"]).expanduser() if data.get("cache") else out / "cases"

    def loading(done, count):
        if progress is not None and procs.main:
            progress(0.0, f"preparing cases {done}/{count}")

    loaded = _load_cases(train_cases + (val_cases if procs.main else []), config, cache, data.get("workers", 0),
                         loading)
    train_data, val_data = loaded[:len(train_cases)], loaded[len(train_cases):]
    steps_per_epoch = config["steps_per_epoch"] or max(1, math.ceil(len(train_data) / config["batch_size"]))

    device = procs.device
    network, init_report = _build_network(config, device)
    if init_report is not None and procs.main:
        _write_json(out / "init_weights.json", init_report)
        skipped = len(init_report["shape_mismatch"]) + len(init_report["not_in_network"])
        report_text = (f"initial weights: {init_report['loaded']} tensors loaded into {init_report['prefix'] or 'the network'}"
                       + (f", {skipped} not matched (see init_weights.json)" if skipped else ""))
        if progress is not None:
            progress(0.0, report_text)
    built = {path: getattr(*_stage_attribute(network, path, "network"))
             for stage in stages for path in stage["network"]}
    groups = parameter_groups(network)
    for n, stage in enumerate(stages):
        for key in ("frozen", "group_lr"):
            unknown = [g for g in stage[key] if g not in groups]
            if unknown:
                _fail(f"stages[{n}].{key}", f"names parameter group {unknown[0]!r}, but {config['architecture']['name']} "
                      f"has {', '.join(groups)}")
    if state is not None:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(state["folder"] / "weights.safetensors"), device=str(device)))

    log = RunLog(out / "log.csv", list(groups), config["labels"])
    if procs.main and state is not None:
        log.restore(step)
    resumed_from = step if state is not None else None
    started = time.perf_counter() - (float(log.rows[-1]["elapsed_s"]) if log.rows else 0.0)
    bar = None
    if procs.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=config["name"], file=sys.stderr, dynamic_ncols=True,
                   disable=not (config["progress_bar"] and sys.stderr.isatty()))
    last_flush = time.perf_counter()
    final_loss = float(log.rows[-1]["loss"]) if log.rows else None
    checked_output = False
    stop = total if max_steps is None else min(total, max_steps)

    def report(fraction, text):
        if progress is not None and procs.main:
            progress(fraction, text)

    def checkpoint(stage_index, optimizer, losses):
        if not procs.main:
            return
        log.write()  # before the checkpoint: a resumed run must find every row up to its checkpoint
        state = {"stage": stage_index, "epochs_done": step // steps_per_epoch, "loss": losses.state(),
                 "config": config, "processes": world, "seed": config["seed"]}
        _save_checkpoint(out, step, network, optimizer, state, config["keep_checkpoints"])
        log.plot(out / "curves.png", config["name"])

    sampler = PatchSampler(train_data, config, config["workers"])
    try:
        stage_index = next((i for i in range(len(stages)) if step < starts[i + 1]), len(stages))
        while step < stop:
            stage = stages[stage_index]
            bn_eval = _freeze(network, groups, stage)
            _apply_stage_options(network, stage, built)
            checked_output = False  # each stage's heads are checked at its first step
            network.train()
            for module in bn_eval:
                module.eval()
            model = network
            if world > 1:
                model = DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
            optimizer, base_lrs = _build_optimizer(groups, stage)
            losses = LossSchedule(stage["loss"], steps_per_epoch, device)
            if state is not None and state["stage"] == stage_index:
                from safetensors.torch import load_file

                tensors = load_file(str(state["folder"] / "optimizer.safetensors"), device=str(device))
                meta = json.loads((state["folder"] / "optimizer.json").read_text(encoding="utf-8"))
                optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
                losses.load_state(state["loss"])
            state = None

            while step < min(starts[stage_index + 1], stop):
                check_cancel(cancel)
                t = step - starts[stage_index]
                factor = learning_rate_factor(stage["schedule"], t, stage["steps"])
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                loss_name, loss_fn = losses.current(t)
                torch.manual_seed(_step_seed(config["seed"], step, rank))
                images, targets = sampler.batch(step, range(rank, config["batch_size"], world))
                images, targets = images.to(device), targets.to(device)
                if stage["heads"]:
                    outputs = model(images, heads=tuple(stage["heads"]))
                    if not checked_output:
                        _check_heads(outputs, stage)
                    pairs = [(outputs[name], weight) for name, weight in stage["heads"].items()]
                else:
                    pairs = [(model(images), 1.0)]
                if not checked_output:
                    for output, _ in pairs:
                        _check_output(output, targets, config)
                    checked_output = True
                loss = sum(weight * loss_fn(output, targets) for output, weight in pairs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = procs.mean(loss)
                if not math.isfinite(value):
                    raise TransferSegError(
                        f"the {loss_name} loss became {value} at step {step + 1} (stage {stage['name']!r}); "
                        "lower the learning rate or check the data"
                    )
                losses.observe(t, value)
                step += 1
                final_loss = value

                validation = None
                if config["validation"]["every"] and step % config["validation"]["every"] == 0:
                    if procs.main and val_data:
                        validation = _validate(network, val_data, config, device)
                    procs.barrier()
                if procs.main and (step % config["log_every"] == 0 or step == stop or validation):
                    lrs = {f"lr_{g['group']}": repr(g["lr"]) for g in optimizer.param_groups}
                    dice = {f"val_dice_{_label_key(k)}": repr(v)
                            for k, v in ((validation or {}).get("validation_dice") or {}).items()}
                    log.add({"step": step, "epoch": (step - 1) // steps_per_epoch, "stage": stage_index,
                             "stage_name": stage["name"], "loss": repr(value), "loss_name": loss_name, **lrs, **dice,
                             "elapsed_s": f"{time.perf_counter() - started:.3f}"})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{stage['name']} {loss_name} {value:.4g}", refresh=False)
                report(0.95 * step / total, f"training {stage['name']}")
                if step % config["checkpoint_every"] == 0 or step == stop:
                    checkpoint(stage_index, optimizer, losses)
                    last_flush = time.perf_counter()
                elif procs.main and time.perf_counter() - last_flush > 60:
                    log.write()
                    last_flush = time.perf_counter()
            if step >= starts[stage_index + 1]:
                stage_index += 1
        if bar is not None:
            bar.close()

        if step < total:  # stopped by max_steps
            procs.barrier()
            return TrainResult(out, step, total, final_loss, {}, None, resumed_from, out / "log.csv",
                                        out / "curves.png")
        metrics, card_path = {}, None
        if procs.main:
            report(0.95, "validating")
            metrics = _validate(network, val_data, config, device) or {}
            card_path = _save_final_model(network, config, out, data_spec, total, world, metrics, final_loss,
                                          trained_spacing(train_data))
        procs.barrier()
        report(1.0, "done")
        return TrainResult(out, step, total, final_loss, metrics, card_path, resumed_from,
                                    out / "log.csv", out / "curves.png")
    finally:
        sampler.close()
        if bar is not None:
            bar.close()


def _save_final_model(network, config, out, data_spec, total, world, metrics, final_loss, spacing_range=None) -> Path:
    from ..models import save_model

    card = _model_card(config, data_spec, total, world, metrics, spacing_range)
    card_path = save_model(network, card, out / "model", storage_dtype=config.get("storage_dtype"))
    _write_json(out / "result.json", {"steps": total, "final_loss": final_loss, "metrics": metrics,
                                      "card": str(card_path.relative_to(out)), "config": config})
    return card_path


def main(argv=None) -> int:
    """``python -m TransferSegLib.training CONFIG [--output DIR] [--max-steps N]`` (also under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m TransferSegLib.training",
                                     description="Train a TransferSeg model from a JSON config; rerun to resume.")
    parser.add_argument("config", help="training config (JSON); see Resources/configs/")
    parser.add_argument("-o", "--output", default=None, help="run folder (default: runs/<name>)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if "recipe" in config:
            from .recipes import run_recipe

            card = run_recipe(config, args.output or Path("runs") / config["name"], max_steps=args.max_steps)
            print(f"model: {card}" if card else "stopped early; run the same command again to resume")
            return 0
        result = train(config, args.output, max_steps=args.max_steps)
    except TransferSegError as e:
        print(f"training: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
