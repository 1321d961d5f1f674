"""The Volumetric Fusion Net reproduction on held-out clinical-grid CT phantoms, and its speed
(a benchmark run by hand, not a test).

Parts (``--parts``, default all):

* ``repro``: the paper's Table 1 comparison.  For each held-out phantom (the same 12
  clinical grids as ``common.ct_cases``: 512², 0.6–1.0 mm pixels, 1–5 mm slices, stored
  LPS axial, RAS-flipped, oblique or as sagittal slices) the three view networks run once on
  the model's working grid, and every fusion is applied to the same three predictions:
  majority vote, STAPLE, the VFN and the VFN without the image.  Dice against the truth
  taken to the working grid (labels_to_spacing, as in training): liver (labels 1 ∪ 2) per
  case, tumor (label 2) global; per view and per fusion.  Times of the views and of each fusion.
* ``quality``: the shipped path end to end (``common.ct_part``, also real_size.py's CT part, with
  the VFN model: a fresh process per case reads the file, runs ``pipeline.run``, writes the result),
  Dice on the input grid, and whether every output lies on the input's exact grid.
* ``speed``: a 512×512×100 CT (~0.7 mm pixels) end to end in a fresh process for the VFN model
  and for the default 3D U-Net (side by side), with the fusion's time as a share of the three
  views' (paper ≈ 10 %, goal ≤ 15 %); and the pixel choice for the coronal and sagittal views:
  the three views on the working grid's rectangular 3 × 2 mm pixels against the same networks
  on square 2 × 2 mm slices (the grid resampled to 2 mm along k).

    .venv/bin/python bench/vfn.py --json runs/vfn_bench.json
    .venv/bin/python bench/vfn.py --quick        # a one-minute smoke run, not a result
    .venv/bin/python bench/vfn.py --model runs/ct-liver-tumor-vfn/model/ct-liver-tumor-vfn.json \
        --ship Resources/models --json runs/vfn_bench.json

``--ship DIR`` copies the model into DIR with every number of the run in its card's ``metrics``
(the weights, and so their sha256, unchanged); the shipped ``ct-liver-tumor-vfn`` was made so.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from TransferSegLib.methods import MethodContext
from TransferSegLib.methods.multiview import fuse, predict_views
from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL, find_model, load_model
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.resample import labels_to_spacing, to_orientation, to_spacing
from TransferSegLib.views import VIEWS

from common import (ROOT, ct100_side_by_side, ct_cases, dice_summary, json_saver, liver_and_tumor, merge_parts,
                    part_arguments, print_dice_table, quality_part, selected_parts, shape_text, ship_card, stored_as)

MODEL = ROOT / "Resources" / "models" / "ct-liver-tumor-vfn.json"
FUSIONS = ("majority", "staple", "vfn", "vfn-noimage")
PARTS = ("repro", "quality", "speed")


def _context(volume, loaded, threads):
    torch.set_num_threads(threads)
    oriented, turn = to_orientation(volume, loaded.card.get("working_orientation"))
    working = to_spacing(oriented, loaded.card["working_spacing_mm"])
    return MethodContext(working, loaded, torch.device("cpu")), oriented, turn


def repro_part(model, threads: int, quick: bool, out: dict, save=lambda: None) -> dict:
    loaded = load_model(model)
    rows = out.setdefault("cases", [])
    for seed, shape, storage in ct_cases(quick):
        volume, labels = ct_phantom(seed, shape=shape)
        volume, labels = stored_as(volume, labels, storage)
        context, oriented, turn = _context(volume, loaded, threads)
        truth = labels_to_spacing(turn.apply(labels), oriented, context.volume)
        del volume, labels, oriented
        row = {"seed": seed, "shape": list(shape), "storage": storage, "working_shape": list(truth.shape),
               "dice": {}, "seconds": {}}
        tic = time.perf_counter()
        views = predict_views(context)
        row["seconds"]["views"] = time.perf_counter() - tic
        predictions = {view: p.argmax(axis=0).astype(np.uint8) for view, p in zip(VIEWS, views)}
        for fusion in FUSIONS:
            tic = time.perf_counter()
            predictions[fusion] = fuse(context, views, fusion)[0]
            row["seconds"][fusion] = time.perf_counter() - tic
        for name, labels in predictions.items():
            row["dice"][name] = liver_and_tumor(labels, truth)
        rows.append(row)
        save()
        print(f"  seed {seed} {shape_text(shape):>12} {storage:<24} liver "
              + " ".join(f"{n} {row['dice'][n]['liver']:.3f}" for n in predictions)
              + f"  views {row['seconds']['views']:.1f} s", flush=True)
    names = list(VIEWS) + list(FUSIONS)
    summary = dice_summary(rows, names)
    views_s = float(np.mean([r["seconds"]["views"] for r in rows]))
    for fusion in FUSIONS:
        summary[fusion]["seconds_mean"] = float(np.mean([r["seconds"][fusion] for r in rows]))
        summary[fusion]["share_of_views"] = summary[fusion]["seconds_mean"] / views_s
    out["summary"] = summary
    out["views_seconds_mean"] = views_s
    save()
    print_dice_table(summary, "time vs views",
                     lambda s: f"{100 * s['share_of_views']:.1f} %" if "share_of_views" in s else "")
    return out


def speed_part(model, threads: int, quick: bool, work: Path, out: dict, save=lambda: None) -> dict:
    volume, path = ct100_side_by_side({"vfn": model, "unet3d": DEFAULT_SEGMENTATION_MODEL}, threads, quick, work,
                                      out, save)
    t = out["vfn"]["timings_s"]
    out["fusion_share_of_views"] = t["inference_fusion"] / t["inference_views"]
    out["vfn_vs_unet3d_seconds"] = out["vfn"]["seconds"] / out["unet3d"]["seconds"]
    print(f"  fusion (VFN) = {100 * out['fusion_share_of_views']:.1f} % of the three views' time (paper ≈ 10 %, "
          f"goal ≤ 15 %); the multi-view model takes {out['vfn_vs_unet3d_seconds']:.2f}× the 3D U-Net's time",
          flush=True)

    # rectangular (the working grid's) against square pixels for the coronal and sagittal views
    loaded = load_model(model)
    context, _, _ = _context(volume, loaded, threads)
    tic = time.perf_counter()
    predict_views(context)
    rectangular = time.perf_counter() - tic
    k, j, i = context.volume.spacing
    square_volume = to_spacing(context.volume, [j, j, i])
    square = MethodContext(square_volume, loaded, context.device)
    tic = time.perf_counter()
    predict_views(square)
    squared = time.perf_counter() - tic
    out["pixels"] = {"working_grid": list(context.volume.shape), "square_grid": list(square_volume.shape),
                     "rectangular_s": rectangular, "square_s": squared, "ratio": squared / rectangular}
    print(f"  three views on the working grid {shape_text(context.volume.shape)} (3 × 2 mm coronal/"
          f"sagittal pixels): {rectangular:.1f} s; on square 2 × 2 mm pixels "
          f"{shape_text(square_volume.shape)}: {squared:.1f} s ({squared / rectangular:.2f}×)", flush=True)
    save()
    path.unlink()
    return out


def ship(model, results: dict, folder: Path) -> Path:
    """The model's card and weights into ``folder``, with the held-out numbers in ``metrics``."""
    card_path = find_model(model)
    metrics = {}
    if "repro" in results:
        metrics["heldout_clinical_fusions"] = {
            "protocol": "12 held-out 512² phantoms (seeds 5000–5011, 0.6–1.0 mm pixels, 1–5 mm slices, stored LPS "
                        "axial, RAS-flipped, oblique or sagittal); the three views once, every fusion on the same "
                        "predictions; Dice on the working grid: liver (1 ∪ 2) per case, tumor (2) global",
            **results["repro"]["summary"]}
    if "speed" in results:
        metrics["speed_cpu_2_threads"] = {k: results["speed"][k] for k in
                                          ("vfn", "fusion_share_of_views", "pixels") if k in results["speed"]}
    return ship_card(card_path, metrics, folder, results.get("quality"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    part_arguments(parser, PARTS)
    args = parser.parse_args(argv)
    parts = selected_parts(args.parts, PARTS)
    results = {"model": args.model, "threads": args.threads, "quick": args.quick}

    save = json_saver(results, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "repro" in parts:
            print("reproduction (working grid; views once, every fusion on the same predictions):", flush=True)
            repro_part(args.model, args.threads, args.quick, results.setdefault("repro", {}), save)
        if "quality" in parts:
            quality_part(args.model, work, args.threads, args.quick, results, save)
        if "speed" in parts:
            print("\nspeed:", flush=True)
            speed_part(args.model, args.threads, args.quick, work, results.setdefault("speed", {}), save)
    save()
    merge_parts(results, args.merge, PARTS)
    if args.ship:
        ship(args.model, results, Path(args.ship))
    return 0


if __name__ == "__main__":
    sys.exit(main())
