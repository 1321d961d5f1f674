"""Reproduction of the AH-Net paper's DBT lesion detection (sec. 4.1, Table 4, Fig. 6) on phantoms.

What runs, all with the one trainer (``TransferSegLib.training.train``) and the configs in
``Resources/configs/``:

1. and 2. the shipped detector's ``transfer`` recipe (``dbt-lesion-ahnet.json``, through
   ``training.recipes.run_recipe``): its ``source``, the MC-GCN (ResNet18, 3-slice stacks, heatmap
   regression), then its ``target``, the AH-Net whose encoder is that MC-GCN's: decoder only with the
   encoder locked, then jointly; the table scores the two parts' models (OUT/source/model and
   OUT/target/model of the recipe's folder);
3. the 2D U-Net on 3-slice stacks (``dbt-lesion-unet2d.json``) and 4. the 3D U-Net (``dbt-lesion-unet3d.json``).

Data: synthetic DBT phantoms (``phantoms.dbt_phantom``), training seeds 1000-1119 (120 volumes,
the configs' ``data``): the U-Nets train at 32 slices × 128 × 96 pixels of 1.0 × 0.8 × 0.8 mm
(the default field of view at half the in-plane resolution); the MC-GCN and the AH-Net on
grids drawn at 0.085-0.6 mm pixels, resampled to their 1 × 0.5 × 0.5 mm working spacing.
Held-out test seeds 5000-5019 (20 volumes, 33 lesions: masses and calcification clusters) at
the U-Nets' 0.8 mm grid (:data:`TEST_OPTIONS`), which the working-spacing networks resample.
Targets: AH-Net eq. (5) heatmaps.
Sizes and steps are the configs' (batches of 2 patches: MC-GCN 3000 and 2D U-Net 800 steps on
8×64×64, AH-Net 300 decoder-only + 2000 joint and 3D U-Net 300 on 32×64×64; the recipe's 240
phantoms), about an hour on two otherwise idle CPU cores; ``--quick`` trains 4 steps per stage on 4 volumes
and tests on 3 (a smoke test of the whole run, 2-5 minutes).

Evaluation: every network runs through ``pipeline.run`` (the product path: the card's
preprocessing and the sliding-window inferer) with one window covering the whole 32×128×96
phantom (the paper forwards whole volumes; the slice-wise networks then see true neighbours
everywhere but at the volume's ends; a card's own ``inference.patch_size`` on its working grid
wins); peaks are ``pipeline.run``'s detections (NMS on the network's grid with the card's
``min_distance``, every local maximum above 0, at most 50 per volume, mapped back to the
input grid: ``common.evaluation_model``); FROC by
``metrics.froc`` as in the paper (a peak inside a lesion's 3D box is a true positive, once per
box; others are false positives).

Outputs in ``--out`` (default runs/ahnet_dbt): the recipe's folder ``dbt-lesion-ahnet/`` and one
training run folder per U-Net (a rerun resumes or reuses them), ``froc.json``, ``froc.png`` (the
curves, matplotlib Agg) and the Table-4-style table on stdout. ``--ship DIR`` writes the recipe's
fp16 AH-Net (the target's weights) as ``DIR/dbt-lesion-ahnet.safetensors`` + ``.json`` with its
held-out FROC in the card's ``metrics`` and the evaluation's window (32×128×96) as the card's
``patch_size``, so that ``pipeline.run`` with the shipped card is the evaluated path.

    .venv/bin/python bench/ahnet_dbt.py --quick
    .venv/bin/python bench/ahnet_dbt.py --ship /tmp/ship
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from TransferSegLib.datasets import phantom_cases
from TransferSegLib.metrics import FROC_RATES, froc
from TransferSegLib.models import Component, LoadedModel, component_specs, load_model, save_model
from TransferSegLib.pipeline import run
from TransferSegLib.training import load_config, train
from TransferSegLib.training.recipes import run_recipe

from common import ROOT, evaluation_model, repo_relative

CONFIGS = ROOT / "Resources" / "configs"
RECIPE = ("dbt-lesion-ahnet.json", {"source": "MC-GCN", "target": "AH-Net"})  # the recipe's parts as table rows
BASELINES = [("2D U-Net", "dbt-lesion-unet2d.json"), ("3D U-Net", "dbt-lesion-unet3d.json")]
TEST_SEED = 5000
TEST_OPTIONS = {"shape": [32, 128, 96], "pixel_mm": 0.8}  # the grid the U-Nets train on
PAPER_TABLE_4 = {  # AH-Net paper, Table 4 (TPR at 0.01 … 0.25 FP per volume), real DBT
    "2D U-Net": [0.4238, 0.4767, 0.5181, 0.5723, 0.6166, 0.6506],
    "3D U-Net": [0.2448, 0.3877, 0.4381, 0.5592, 0.5738, 0.5733],
    "MC-GCN": [0.3385, 0.6727, 0.6727, 0.6909, 0.7018, 0.7272],
    "AH-Net": [0.4931, 0.6000, 0.7272, 0.7454, 0.7818, 0.7818],
}


def shrink(config: dict) -> None:
    """--quick: 4 steps per stage, a loss switch after 2 steps without progress, no checkpoints."""
    for stage in config["stages"]:
        stage["steps"] = 4
        switch = stage["loss"].get("switch")
        if switch and "on_plateau" in switch:
            switch["on_plateau"] = {"patience": 2, "min_delta": 0.0, "window": 1}
    config["checkpoint_every"] = 1000


def trained_run(name: str, run_dir: Path, card_path: Path, steps: list) -> tuple:
    """(card path, training seconds over all sessions: the run log's cumulative ``elapsed_s``, steps)."""
    with (run_dir / "log.csv").open(encoding="utf-8", newline="") as log:
        rows = list(csv.DictReader(log))
    seconds = float(rows[-1]["elapsed_s"]) if rows else 0.0
    loss = float(rows[-1]["loss"]) if rows else float("nan")
    print(f"  trained {name:<9} {'+'.join(map(str, steps)):>8} steps in {seconds:6.0f} s "
          f"(final loss {loss:.4g}) -> {card_path}", flush=True)
    return card_path, seconds, steps


def train_all(out: Path, threads: int, is_quick: bool) -> tuple:
    """Train the recipe (MC-GCN, then the AH-Net from it) and the U-Nets; a rerun with the same
    ``out`` resumes unfinished runs and reuses finished ones.  Returns ({table name: (card path,
    seconds, steps per stage)}, the recipe's shipped card)."""
    file, parts = RECIPE
    config = load_config(CONFIGS / file)
    if is_quick:
        config["data"]["count"] = 4
    config["threads"] = threads
    for part in parts:
        if is_quick:
            shrink(config[part])
        config[part]["progress_bar"] = False
    recipe_dir = out / config["name"]
    shipped = run_recipe(config, recipe_dir)
    trained = {name: trained_run(name, recipe_dir / part,
                                 recipe_dir / part / "model" / f"{config['name']}-{part}.json",
                                 [s["steps"] for s in config[part]["stages"]])
               for part, name in parts.items()}
    for name, file in BASELINES:
        config = load_config(CONFIGS / file)
        if is_quick:
            config["data"]["count"] = 4
            shrink(config)
        config["threads"] = threads
        config["progress_bar"] = False
        result = train(config, out / config["name"])
        trained[name] = trained_run(name, out / config["name"], result.card_path,
                                    [s["steps"] for s in config["stages"]])
    return trained, shipped


def evaluate(card_path: Path, boxes, volumes, window) -> dict:
    """FROC of one model on the held-out phantoms (see the module docstring)."""
    loaded = evaluation_model(card_path)
    card = dict(loaded.card, patch_size=list(window))  # one whole-volume window for every network
    spec = component_specs(card)["network"]
    model = LoadedModel(card, loaded.path, {"network": Component("network", loaded.network, spec)}, loaded.method)
    detections, seconds = [], 0.0
    for volume in volumes:
        start = time.perf_counter()
        result = run(volume, model, device="cpu")
        seconds += time.perf_counter() - start
        detections.append(result.detections)
    curve = froc(detections, boxes)
    curve["seconds_per_volume"] = seconds / len(volumes)
    curve["peaks"] = card["peaks"]
    return curve


def draw_froc(curves: dict, path: Path, title: str) -> None:
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.step(curve["fp_per_volume"], curve["tpr"], where="post", label=name, lw=1.5)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positives per volume")
    ax.set_ylabel("true positive rate (lesions detected)")
    ax.set_title(title, fontsize=9)
    for rate in FROC_RATES:
        ax.axvline(rate, color="0.85", lw=0.6, zorder=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def relative(value):
    """Absolute paths in a card's training record (the recipe's parts, its case cache, the
    transferred model) made relative to the repository, or cut to their last name outside it."""
    if isinstance(value, dict):
        return {key: relative(v) for key, v in value.items()}
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return repo_relative(value)
    return value


def ship(card_path: Path, curve: dict, test_spec: dict, window, folder: Path) -> Path:
    """Write the recipe's fp16 AH-Net as a model with its held-out FROC in ``metrics`` and the
    evaluated inference window as ``patch_size``; local paths made relative."""
    loaded = load_model(card_path)
    card = copy.deepcopy(loaded.card)
    card.pop("weights", None)
    card["patch_size"] = list(window)
    card["training"] = relative(card["training"])
    card["metrics"] = {
        "froc_heldout": {
            "tpr_at_fp_per_volume": {f"{rate:g}": curve["tpr_at"][rate] for rate in FROC_RATES},
            "lesions": curve["lesions"], "volumes": curve["volumes"], "data": test_spec,
            "peaks": curve["peaks"],
            "protocol": "AH-Net sec. 4.1: a peak inside a lesion's 3D box is a true positive (once per box)",
        }
    }
    return save_model(loaded.network, card, folder, storage_dtype="float16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="AH-Net paper sec. 4.1 / Table 4 on DBT phantoms")
    parser.add_argument("--quick", action="store_true", help="a few steps on 4 volumes, 3 test volumes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ahnet_dbt", help="run folder")
    parser.add_argument("--ship", type=Path, help="write the trained AH-Net model (safetensors + card) here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--test-count", type=int, default=None, help="held-out phantoms (default 20; --quick 3)")
    args = parser.parse_args(argv)
    if args.quick and args.out == parser.get_default("out"):
        args.out = ROOT / "runs" / "ahnet_dbt_quick"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()

    print(f"training on {args.threads} thread(s) into {args.out}", flush=True)
    trained, shipped = train_all(args.out, args.threads, args.quick)

    count = args.test_count or (3 if args.quick else 20)
    test_spec = {"phantom": "dbt", "count": count, "seed": TEST_SEED, "options": TEST_OPTIONS}
    cases = phantom_cases("dbt", count, TEST_SEED, **TEST_OPTIONS)
    volumes = [case.load()[0] for case in cases]
    boxes = [case.boxes for case in cases]
    print(f"testing on {count} held-out phantoms (seeds {TEST_SEED}-{TEST_SEED + count - 1}), "
          f"{sum(map(len, boxes))} lesions", flush=True)
    window = [int(max(v.shape[axis] for v in volumes)) for axis in range(3)]
    curves = {}
    for name, (card_path, _, _) in trained.items():
        curves[name] = evaluate(card_path, boxes, volumes, window)
        print(f"  {name:<9} {curves[name]['seconds_per_volume']:.2f} s per volume", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = {name: [curves[name]["tpr_at"][rate] for rate in FROC_RATES] for name in curves}
    payload = {"test": test_spec, "networks": {
        name: {"tpr_at": dict(zip(map(str, FROC_RATES), rows[name])), "lesions": curves[name]["lesions"],
               "volumes": curves[name]["volumes"], "fp_per_volume": curves[name]["fp_per_volume"],
               "tpr": curves[name]["tpr"], "train_seconds": trained[name][1], "steps": trained[name][2],
               "seconds_per_volume": curves[name]["seconds_per_volume"]} for name in curves},
        "quick": args.quick, "total_seconds": time.perf_counter() - started}
    (args.out / "froc.json").write_text(json.dumps(payload, indent=1) + "\n")
    title = (f"FROC on {count} held-out DBT phantoms ({curves['AH-Net']['lesions']} lesions)"
             + (" — quick smoke run" if args.quick else ""))
    draw_froc(curves, args.out / "froc.png", title)

    header = "".join(f"{f'FP={rate:g}':>9}" for rate in FROC_RATES)
    print(f"\nTPR at false positives per volume ({count} held-out phantoms, "
          f"{curves['AH-Net']['lesions']} lesions){' — QUICK: a smoke test, not a result' if args.quick else ''}")
    print(f"{'network':<10}{header}   train s")
    for name in curves:
        print(f"{name:<10}" + "".join(f"{v:>9.4f}" for v in rows[name]) + f"   {trained[name][1]:>7.0f}")
    print("paper Table 4 (real DBT, 131 test volumes, 72 lesions):")
    for name, values in PAPER_TABLE_4.items():
        print(f"{name:<10}" + "".join(f"{v:>9.4f}" for v in values))
    print(f"curves: {args.out / 'froc.png'}; numbers: {args.out / 'froc.json'}; "
          f"total {time.perf_counter() - started:.0f} s")
    if args.ship:
        card = ship(shipped, curves["AH-Net"], test_spec, window, args.ship)
        print(f"shipped the AH-Net: {card} and {card.with_suffix('.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
