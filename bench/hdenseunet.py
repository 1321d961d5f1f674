"""H-DenseUNet on held-out clinical-grid CT phantoms: the paper's Table II comparison, the shipped
model end to end, and its speed (a benchmark run by hand, not a test).

Parts (``--parts``, default all):

* ``table2``: 2D DenseUNet, 3D DenseUNet and H-DenseUNet (Li et al. 2018, Table II; paper
  order H-DenseUNet > 2D > 3D).  All three run in the same cascade (the recipe's coarse liver
  box, 8-slice windows at stride 2, thresholds 0.5 / 0.9, the same post-processing), so only
  the network differs: the recipe's ``net2d`` run (stage 1), its ``net3d`` run (the 3D
  DenseUNet alone, as many steps as stages 2 + 3) and the shipped hybrid.  Held-out phantoms:
  the first N clinical grids of ``common.ct_cases`` (512², 0.6–1.0 mm pixels, 1–5 mm
  slices, stored LPS axial, RAS-flipped, oblique or as sagittal slices), Dice on the input
  grid: liver (1 ∪ 2) per case, tumor (2) global; seconds per volume; each network also with
  the tumor threshold at 0.5 (the same probabilities; the paper's is 0.9).
* ``quality``: the shipped path end to end (``common.ct_part``, also real_size.py's CT part: a
  fresh process per case reads the file, runs ``pipeline.run``, writes the result), Dice on the
  input grid.
* ``speed``: a 512×512×100 CT (~0.7 mm pixels) end to end in a fresh process, H-DenseUNet and
  the default 3D U-Net side by side.

    .venv/bin/python bench/hdenseunet.py --run runs/ct-liver-tumor-hdenseunet --json runs/hd_bench.json
    .venv/bin/python bench/hdenseunet.py --quick        # a smoke run, not a result
    .venv/bin/python bench/hdenseunet.py --run runs/ct-liver-tumor-hdenseunet --ship Resources/models \\
        --json runs/hd_bench.json

``--ship DIR`` copies the run's model into DIR with the run's numbers in its card's ``metrics``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from TransferSegLib import pipeline
from TransferSegLib.methods.cascade import nested_threshold_labels
from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL, compose_models, load_model

from common import (ROOT, compare_part, ct100_side_by_side, heldout_protocol, json_saver, merge_parts,
                    part_arguments, quality_part, selected_parts, ship_card)

PARTS = ("table2", "quality", "speed")
NAME = "ct-liver-tumor-hdenseunet"


def variants(run: Path, work: Path) -> dict:
    """{row name: model card}: the coarse network with each fine network, in the shipped method."""
    shipped = run / "model" / f"{NAME}.json"
    method = load_model(shipped).method
    models = {}
    for name, part in (("2D DenseUNet", "net2d"), ("3D DenseUNet", "net3d")):
        models[name] = compose_models({"coarse": run / "coarse" / "model" / f"{NAME}-coarse.json",
                                       "fine": run / part / "model" / f"{NAME}-{part}.json"},
                                      work / part, name=f"{NAME}-{part}-cascade", method="cascade",
                                      method_config=method["config"], labels_from="fine")
    models["H-DenseUNet"] = shipped
    return models


def table2_part(run: Path, work: Path, threads: int, quick: bool, count: int, out: dict, save=lambda: None) -> dict:
    def tumor_at_half(name, model, result):  # the same probabilities at the tumor threshold 0.5 (the paper's: 0.9)
        lower = nested_threshold_labels(result.probabilities, [0.5, 0.5]).numpy()
        return {f"{name}, tumor ≥ 0.5": pipeline.postprocess(lower, model.card.get("postprocessing"))}

    return compare_part(variants(run, work), threads, quick, count, out, save, extra=tumor_at_half)


def speed_part(model, threads: int, quick: bool, work: Path, out: dict, save=lambda: None) -> dict:
    _, path = ct100_side_by_side({"hdenseunet": model, "unet3d": DEFAULT_SEGMENTATION_MODEL}, threads, quick, work,
                                 out, save)
    out["hdenseunet_vs_unet3d_seconds"] = out["hdenseunet"]["seconds"] / out["unet3d"]["seconds"]
    path.unlink()
    return out


def ship(model: Path, results: dict, folder: Path) -> Path:
    """The model's card and weights into ``folder``, with the run's numbers in ``metrics``."""
    metrics = {}
    if "table2" in results:
        metrics["heldout_clinical_table2"] = {
            "protocol": heldout_protocol(len(results["table2"]["cases"]), "every network in the same cascade"),
            **results["table2"]["summary"]}
    if "speed" in results:
        metrics["speed_cpu_2_threads"] = {k: results["speed"][k] for k in ("hdenseunet", "unet3d")
                                          if k in results["speed"]}
    return ship_card(model, metrics, folder, results.get("quality"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "runs" / NAME), help="the cascade recipe's output folder")
    part_arguments(parser, PARTS)
    parser.add_argument("--cases", type=int, default=8, help="held-out phantoms in the Table II comparison")
    args = parser.parse_args(argv)
    run = Path(args.run)
    model = run / "model" / f"{NAME}.json"
    parts = selected_parts(args.parts, PARTS)
    results = {"run": str(run), "threads": args.threads, "quick": args.quick}

    save = json_saver(results, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "table2" in parts:
            print("Table II (same cascade, only the network differs; Dice on the input grid):", flush=True)
            table2_part(run, work, args.threads, args.quick, args.cases, results.setdefault("table2", {}), save)
        if "quality" in parts:
            quality_part(model, work, args.threads, args.quick, results, save)
        if "speed" in parts:
            print("\nspeed:", flush=True)
            speed_part(model, args.threads, args.quick, work, results.setdefault("speed", {}), save)
    save()
    merge_parts(results, args.merge, PARTS)
    if args.ship:
        ship(model, results, Path(args.ship))
    return 0


if __name__ == "__main__":
    sys.exit(main())
