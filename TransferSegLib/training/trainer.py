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
                     "extent_mm": [100, 75], "slices": [30, 50], "extent_scale": [1, 2.5]} (DBT) to draw each
                     case's grid; CT phantoms take "negatives": {"count": 36, "seed": 2500, "regions":
                     ["pelvis", "chest", "head", "neck", "legs"]}: scans without a liver (all-zero labels),
                     the regions in turn, their grids drawn from "vary" (datasets.negative_cases); and
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
                      "probability": 0.5,         chance of a 90° rotation, of a rotation/zoom, of a deformation
                      "elastic": {"magnitude": [0.5, 3, 3],   smooth random deformation (null: none): the
                                  "spacing": [8, 24, 24]},    displacement's s.d. at control points this far
                                                 apart, voxels along k, j, i (magnitude ≤ spacing / 6)
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

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..atomic import check_output_folder
from ..datasets import split_cases
from ..inference import sliding_window_inference
from ..metrics import dice
from ..models import save_model
from ..progress import CancelToken, ProgressCallback, check_cancel
from ..volume import TransferSegError
from .checkpoints import (check_same_run, load_checkpoint, remove_partial_files, restore_network, restore_optimizer,
                          save_checkpoint, write_json)
from .config import config_error, is_int, validate_config
from .distributed import Processes
from .logs import RunLog, label_key
from .networks import apply_stage_options, network_from_config, stage_attribute
from .optim import LossSchedule, PlateauTracker, build_optimizer, freeze_groups, learning_rate_factor, parameter_groups
from .sampling import PatchSampler, StackCase, TrainingCase, cases_from_spec, load_cases, rotations90, write_stack

__all__ = ["PatchSampler", "PlateauTracker", "LossSchedule", "StackCase", "TrainResult", "TrainingCase",
           "learning_rate_factor", "parameter_groups", "rotations90", "train",
           "validate_config", "write_stack"]


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


def _check_heads(outputs, stage: dict) -> None:
    if not isinstance(outputs, dict):
        config_error("stages.heads", f"stage {stage['name']!r} trains heads {', '.join(stage['heads'])}, but the network "
              "gives one output for heads=...; name no heads for it")
    missing = [name for name in stage["heads"] if name not in outputs]
    if missing:
        config_error("stages.heads", f"stage {stage['name']!r}: the network has no output head {missing[0]!r} "
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


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1, np.uint64)[0]) >> 1  # NumPy 1.x too


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
    if max_steps is not None and (not is_int(max_steps) or max_steps < 0):
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
    total = sum(s["steps"] for s in config["stages"])
    if config["batch_size"] % procs.world:
        config_error("batch_size", f"{config['batch_size']} does not split evenly over {procs.world} processes; "
              "use a multiple of the process count")
    finished = _finished_run(config, out, total)
    if finished is not None:
        return finished
    if procs.main:
        remove_partial_files(out)
    state = load_checkpoint(out)
    if state is not None:
        check_same_run(state["config"], config, out)
    data_spec = config["data"] if cases is None else {"cases": [c.name for c in cases]}
    train_data, val_data = _prepare_cases(config, out, procs, progress, cases)
    network, groups, built = _prepare_network(config, out, procs, progress, state)
    loop = _Loop(config, out, procs, progress, cancel, network, groups, built, train_data, val_data, state, max_steps)
    try:
        loop.run(state)
        if loop.step < total:  # stopped by max_steps
            procs.barrier()
            return TrainResult(out, loop.step, total, loop.final_loss, {}, None, loop.resumed_from, out / "log.csv",
                               out / "curves.png")
        metrics, card_path = {}, None
        if procs.main:
            loop.report(0.95, "validating")
            metrics = _validate(network, val_data, config, procs.device) or {}
            card_path = _save_final_model(network, config, out, data_spec, total, procs.world, metrics,
                                          loop.final_loss, trained_spacing(train_data))
        procs.barrier()
        loop.report(1.0, "done")
        return TrainResult(out, loop.step, total, loop.final_loss, metrics, card_path, loop.resumed_from,
                           out / "log.csv", out / "curves.png")
    finally:
        loop.close()


def _finished_run(config: dict, out: Path, total: int) -> Optional[TrainResult]:
    """The result of a run of this config that has finished in ``out`` (its model still there), else None."""
    result_file = out / "result.json"
    if not result_file.exists():
        return None
    finished = json.loads(result_file.read_text(encoding="utf-8"))
    check_same_run(finished["config"], config, out)
    card = out / finished["card"]
    if not card.exists():
        return None
    return TrainResult(out, finished["steps"], total, finished["final_loss"], finished["metrics"], card,
                       None, out / "log.csv", out / "curves.png")


def _prepare_cases(config: dict, out: Path, procs: Processes, progress, cases) -> tuple[list, list]:
    """The training and validation cases, split by the seed and loaded on their working grid (the
    validation cases by rank 0 only, which validates)."""
    all_cases = cases_from_spec(config["data"]) if cases is None else list(cases)
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

    loaded = load_cases(train_cases + (val_cases if procs.main else []), config, cache, data.get("workers", 0),
                        loading)
    return loaded[:len(train_cases)], loaded[len(train_cases):]


def _prepare_network(config: dict, out: Path, procs: Processes, progress, state: Optional[dict]) -> tuple:
    """``(network, its parameter groups, the built values of the attributes stages set)``: the network
    with its initial weights (reported in OUT/init_weights.json), or the checkpoint's when resuming."""
    network, init_report = network_from_config(config, procs.device)
    if init_report is not None and procs.main:
        write_json(out / "init_weights.json", init_report)
        skipped = len(init_report["shape_mismatch"]) + len(init_report["not_in_network"])
        report_text = (f"initial weights: {init_report['loaded']} tensors loaded into {init_report['prefix'] or 'the network'}"
                       + (f", {skipped} not matched (see init_weights.json)" if skipped else ""))
        if progress is not None:
            progress(0.0, report_text)
    stages = config["stages"]
    built = {path: getattr(*stage_attribute(network, path, "network"))
             for stage in stages for path in stage["network"]}
    groups = parameter_groups(network)
    for n, stage in enumerate(stages):
        for key in ("frozen", "group_lr"):
            unknown = [g for g in stage[key] if g not in groups]
            if unknown:
                config_error(f"stages[{n}].{key}", f"names parameter group {unknown[0]!r}, but {config['architecture']['name']} "
                      f"has {', '.join(groups)}")
    if state is not None:
        restore_network(state, network, procs.device)
    return network, groups, built


class _Loop:
    """The training loop over the stages, and what it carries from step to step: the step, the last
    loss, the log, the progress bar and the patch sampler.  Every rank runs it; rank 0 alone writes."""

    def __init__(self, config, out, procs, progress, cancel, network, groups, built, train_data, val_data,
                 state, max_steps):
        self.config, self.out, self.procs, self.progress, self.cancel = config, out, procs, progress, cancel
        self.network, self.groups, self.built, self.val_data = network, groups, built, val_data
        self.device = procs.device
        stages = config["stages"]
        self.total = sum(s["steps"] for s in stages)
        self.starts = np.cumsum([0] + [s["steps"] for s in stages]).tolist()  # each stage's first step
        self.stop = self.total if max_steps is None else min(self.total, max_steps)
        self.steps_per_epoch = config["steps_per_epoch"] or max(1, math.ceil(len(train_data) / config["batch_size"]))
        self.step = state["step"] if state else 0
        self.log = RunLog(out / "log.csv", list(groups), config["labels"])
        if procs.main and state is not None:
            self.log.restore(self.step)
        self.resumed_from = self.step if state is not None else None
        self.started = time.perf_counter() - (float(self.log.rows[-1]["elapsed_s"]) if self.log.rows else 0.0)
        self.bar = None
        if procs.main:
            self.bar = tqdm(total=self.total, initial=self.step, desc=config["name"], file=sys.stderr,
                            dynamic_ncols=True, disable=not (config["progress_bar"] and sys.stderr.isatty()))
        self.last_flush = time.perf_counter()
        self.final_loss = float(self.log.rows[-1]["loss"]) if self.log.rows else None
        self.checked_output = False
        self.sampler = PatchSampler(train_data, config, config["workers"])

    def report(self, fraction: float, text: str) -> None:
        if self.progress is not None and self.procs.main:
            self.progress(fraction, text)

    def close(self) -> None:
        self.sampler.close()
        if self.bar is not None:
            self.bar.close()

    def run(self, state: Optional[dict]) -> None:
        """Train from the current step up to the stop, stage by stage; ``state`` is the checkpoint
        resumed from (its optimizer and loss schedule restored in the stage it was written in)."""
        stages, starts = self.config["stages"], self.starts
        stage_index = next((i for i in range(len(stages)) if self.step < starts[i + 1]), len(stages))
        while self.step < self.stop:
            model, optimizer, base_lrs, losses = self._start_stage(stage_index, state)
            state = None
            while self.step < min(starts[stage_index + 1], self.stop):
                self._train_step(stage_index, model, optimizer, base_lrs, losses)
            if self.step >= starts[stage_index + 1]:
                stage_index += 1
        if self.bar is not None:
            self.bar.close()

    def _start_stage(self, stage_index: int, state: Optional[dict]) -> tuple:
        """``(model, optimizer, base learning rates, loss schedule)`` of a stage: its groups frozen and
        network options set, the model wrapped in DDP under torchrun."""
        stage = self.config["stages"][stage_index]
        bn_eval = freeze_groups(self.network, self.groups, stage)
        apply_stage_options(self.network, stage, self.built)
        self.checked_output = False  # each stage's heads are checked at its first step
        self.network.train()
        for module in bn_eval:
            module.eval()
        model = self.network
        if self.procs.world > 1:
            model = DistributedDataParallel(self.network,
                                            device_ids=[self.device] if self.device.type == "cuda" else None)
        optimizer, base_lrs = build_optimizer(self.groups, stage)
        losses = LossSchedule(stage["loss"], self.steps_per_epoch, self.device)
        if state is not None and state["stage"] == stage_index:
            restore_optimizer(state, optimizer, self.device)
            losses.load_state(state["loss"])
        return model, optimizer, base_lrs, losses

    def _train_step(self, stage_index: int, model, optimizer, base_lrs: list, losses: LossSchedule) -> None:
        """One optimizer step on this rank's share of the global batch of the step."""
        config, stage, rank, world = self.config, self.config["stages"][stage_index], self.procs.rank, self.procs.world
        check_cancel(self.cancel)
        t = self.step - self.starts[stage_index]
        factor = learning_rate_factor(stage["schedule"], t, stage["steps"])
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        loss_name, loss_fn = losses.current(t)
        torch.manual_seed(step_seed(config["seed"], self.step, rank))
        images, targets = self.sampler.batch(self.step, range(rank, config["batch_size"], world))
        images, targets = images.to(self.device), targets.to(self.device)
        loss = self._loss(model, images, targets, stage, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = self.procs.mean(loss)
        if not math.isfinite(value):
            raise TransferSegError(
                f"the {loss_name} loss became {value} at step {self.step + 1} (stage {stage['name']!r}); "
                "lower the learning rate or check the data"
            )
        losses.observe(t, value)
        self.step += 1
        self.final_loss = value
        self._after_step(stage_index, optimizer, losses, loss_name, value)

    def _loss(self, model, images: torch.Tensor, targets: torch.Tensor, stage: dict, loss_fn) -> torch.Tensor:
        """The loss of the network's output, or the weighted sum over the stage's heads; the outputs
        are checked against the targets at a stage's first step."""
        if stage["heads"]:
            outputs = model(images, heads=tuple(stage["heads"]))
            if not self.checked_output:
                _check_heads(outputs, stage)
            pairs = [(outputs[name], weight) for name, weight in stage["heads"].items()]
        else:
            pairs = [(model(images), 1.0)]
        if not self.checked_output:
            for output, _ in pairs:
                _check_output(output, targets, self.config)
            self.checked_output = True
        return sum(weight * loss_fn(output, targets) for output, weight in pairs)

    def _after_step(self, stage_index: int, optimizer, losses: LossSchedule, loss_name: str, value: float) -> None:
        """Validation every N steps, the log row, the progress bar and report, a checkpoint when due."""
        config, stage, step = self.config, self.config["stages"][stage_index], self.step
        validation = None
        if config["validation"]["every"] and step % config["validation"]["every"] == 0:
            if self.procs.main and self.val_data:
                validation = _validate(self.network, self.val_data, config, self.device)
            self.procs.barrier()
        if self.procs.main and (step % config["log_every"] == 0 or step == self.stop or validation):
            lrs = {f"lr_{g['group']}": repr(g["lr"]) for g in optimizer.param_groups}
            dice = {f"val_dice_{label_key(k)}": repr(v)
                    for k, v in ((validation or {}).get("validation_dice") or {}).items()}
            self.log.add({"step": step, "epoch": (step - 1) // self.steps_per_epoch, "stage": stage_index,
                          "stage_name": stage["name"], "loss": repr(value), "loss_name": loss_name, **lrs, **dice,
                          "elapsed_s": f"{time.perf_counter() - self.started:.3f}"})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{stage['name']} {loss_name} {value:.4g}", refresh=False)
        self.report(0.95 * step / self.total, f"training {stage['name']}")
        if step % config["checkpoint_every"] == 0 or step == self.stop:
            self._checkpoint(stage_index, optimizer, losses)
            self.last_flush = time.perf_counter()
        elif self.procs.main and time.perf_counter() - self.last_flush > 60:
            self.log.write()
            self.last_flush = time.perf_counter()

    def _checkpoint(self, stage_index: int, optimizer, losses: LossSchedule) -> None:
        if not self.procs.main:
            return
        self.log.write()  # before the checkpoint: a resumed run must find every row up to its checkpoint
        state = {"stage": stage_index, "epochs_done": self.step // self.steps_per_epoch, "loss": losses.state(),
                 "config": self.config, "processes": self.procs.world, "seed": self.config["seed"]}
        save_checkpoint(self.out, self.step, self.network, optimizer, state, self.config["keep_checkpoints"])
        self.log.plot(self.out / "curves.png", self.config["name"])


def _save_final_model(network, config, out, data_spec, total, world, metrics, final_loss, spacing_range=None) -> Path:
    card = _model_card(config, data_spec, total, world, metrics, spacing_range)
    card_path = save_model(network, card, out / "model", storage_dtype=config.get("storage_dtype"))
    write_json(out / "result.json", {"steps": total, "final_loss": final_loss, "metrics": metrics,
                                      "card": str(card_path.relative_to(out)), "config": config})
    return card_path
