"""The 2D → 3D transfer models on held-out clinical-grid CT phantoms: the 2D network against the
3D network it became, the shipped model end to end, and its speed (a benchmark run by hand, not
a test).

The models come from the ``transfer`` recipe (``Resources/configs/ct-liver-tumor-{ahnet,acs}.json``):

* ``ahnet``: the MC-GCN on three neighbouring axial slices, then the 3D AH-Net whose encoder is
  the MC-GCN's made 3D (AH-Net sec. 4.2, Table 5: GCN against 3D AH-Net);
* ``acs``: a 2D U-Net on axial slices, then the same network converted to ACS convolutions and
  fine-tuned in 3D (ACS sec. 3.2: pretrained 2D weights kept in 3D).

Parts (``--parts``, default all):

* ``table``: the 2D network (the recipe's ``source`` model, run slice by slice) and the shipped 3D
  network on the first N clinical grids of ``common.ct_cases`` (512², 0.6–1.0 mm pixels,
  1–5 mm slices, stored LPS axial, RAS-flipped, oblique or as sagittal slices), beside the default
  3D U-Net; the same pipeline (working grid, post-processing) for all, Dice on the input grid:
  liver (1 ∪ 2) per case, tumor (2) global, seconds per volume.
* ``quality``: the shipped path end to end (``common.ct_part``, also real_size.py's CT part: a
  fresh process per case reads the file, runs ``pipeline.run``, writes the result), Dice on the
  input grid.
* ``speed``: a 512×512×100 CT (~0.7 mm pixels) end to end in a fresh process, the model and the
  default 3D U-Net side by side.

    .venv/bin/python bench/transfer.py --model acs --json runs/acs_bench.json
    .venv/bin/python bench/transfer.py --model ahnet --ship Resources/models --json runs/ahnet_bench.json
    .venv/bin/python bench/transfer.py --model acs --quick        # a smoke run, not a result

``--ship DIR`` copies the run's model into DIR with the run's numbers in its card's ``metrics``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL

from common import (ROOT, compare_part, ct100_side_by_side, heldout_protocol, json_saver, merge_parts,
                    part_arguments, quality_part, selected_parts, ship_card)

PARTS = ("table", "quality", "speed")
MODELS = {"ahnet": ("ct-liver-tumor-ahnet", "MC-GCN (2D)", "AH-Net (3D)"),
          "acs": ("ct-liver-tumor-acs", "2D U-Net", "ACS U-Net (3D)")}


def ship(name: str, model: Path, results: dict, folder: Path) -> Path:
    """The model's card and weights into ``folder``, with the run's numbers in ``metrics``."""
    metrics = {}
    if "table" in results:
        metrics["heldout_clinical_2d_vs_3d"] = {
            "protocol": heldout_protocol(len(results["table"]["cases"]), "the same pipeline for every network"),
            **results["table"]["summary"]}
    if "speed" in results:
        metrics["speed_cpu_2_threads"] = {k: results["speed"][k] for k in (name, "unet3d") if k in results["speed"]}
    return ship_card(model, metrics, folder, results.get("quality"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--run", default=None, help="the transfer recipe's output folder (default runs/NAME)")
    part_arguments(parser, PARTS)
    parser.add_argument("--cases", type=int, default=6, help="held-out phantoms in the 2D / 3D comparison")
    parser.add_argument("--figure", default=None, help="PNG of the first held-out case: truth and every network")
    args = parser.parse_args(argv)
    name, row_2d, row_3d = MODELS[args.model]
    run = Path(args.run or ROOT / "runs" / name)
    model = run / "model" / f"{name}.json"
    parts = selected_parts(args.parts, PARTS)
    results = {"run": str(run), "threads": args.threads, "quick": args.quick}

    save = json_saver(results, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "table" in parts:
            print(f"{row_2d} against {row_3d} (the same pipeline; Dice on the input grid):", flush=True)
            compare_part({row_2d: run / "source" / "model" / f"{name}-source.json", row_3d: model,
                          "3D U-Net (default)": DEFAULT_SEGMENTATION_MODEL},
                         args.threads, args.quick, args.cases, results.setdefault("table", {}), save,
                         figure=args.figure)
        if "quality" in parts:
            quality_part(model, work, args.threads, args.quick, results, save)
        if "speed" in parts:
            print("\nspeed:", flush=True)
            speed = results.setdefault("speed", {})
            _, path = ct100_side_by_side({args.model: model, "unet3d": DEFAULT_SEGMENTATION_MODEL}, args.threads,
                                         args.quick, work, speed, save)
            path.unlink()
    save()
    merge_parts(results, args.merge, PARTS)
    if args.ship:
        ship(args.model, model, results, Path(args.ship))
    return 0


if __name__ == "__main__":
    sys.exit(main())
