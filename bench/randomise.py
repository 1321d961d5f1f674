"""Intensity randomisation in CT training, on and off (a benchmark run by hand, not a test).

The default CT model's recipe (``Resources/configs/ct-liver-tumor-unet3d.json``) draws its
phantoms with ``data.options.randomise`` on: every tissue's HU moved within bounds and a smooth
bias field (the SynthSeg idea).  This trains the same recipe twice, shortened (``--cases``
phantoms, ``--steps`` steps, from scratch, one thread each, one after the other), once with
``randomise`` on and once off, everything else equal (same seeds, same phantoms apart from
their intensities, same patches), and scores both

* on the real CT scans of ``bench/real_ct.py`` (liver Dice, mL of tumor in tumor-free livers;
  evaluation only, never trained or tuned on), the network's labels as they come (the card's
  scope checks off, so a short run's small liver is not withheld), and
* on held-out phantoms drawn as the recipe draws them, with randomisation off (seeds 5400+),

so the table says what randomisation buys on real scans for what it costs on phantoms.  The runs
are resumable (``--out`` keeps them).

    .venv/bin/python bench/randomise.py --out runs/randomise
    .venv/bin/python bench/randomise.py --quick          # a smoke test, not a result
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from TransferSegLib.metrics import dice
from TransferSegLib.models import load_model
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.pipeline import run
from TransferSegLib.training import train

from common import ROOT, VARIED, write_json
from real_ct import default_cache, load_scans

RECIPE = ROOT / "Resources" / "configs" / "ct-liver-tumor-unet3d.json"
REAL = ("chest-ct", "dicom-series", "abdomen-ct")
HELD_OUT_SEED = 5400


def configs(cases: int, steps: int) -> dict:
    """The default recipe, shortened, with ``randomise`` on and off."""
    base = json.loads(RECIPE.read_text(encoding="utf-8"))
    out = {}
    for setting in (True, False):
        c = copy.deepcopy(base)
        c["name"] = f"randomise-{'on' if setting else 'off'}"
        c["version"] = "0.0.1"
        c["data"].update(count=cases, workers=1, cache=None)
        c["data"]["options"] = dict(c["data"]["options"], randomise=setting)
        c["validation"] = {"fraction": 0.0, "every": 0}
        c["stages"][0]["steps"] = steps
        c["stages"][0]["loss"]["switch"]["on_plateau"]["patience"] = max(steps // 8, 10)
        c["checkpoint_every"] = max(steps // 10, 1)
        c["threads"] = 1
        out[c["name"]] = c
    return out


def held_out(count: int, shape) -> list:
    options = dict(VARIED, randomise=False)
    return [ct_phantom(HELD_OUT_SEED + n, shape=shape, **options) for n in range(count)]


def score(card: Path, scans: dict, phantoms: list) -> dict:
    # the networks are compared, not the scope checks: a short run's liver may fall under the card's
    # plausibility floors, which would withhold its labels and hide the difference
    loaded = load_model(card)
    loaded = dataclasses.replace(loaded, card={k: v for k, v in loaded.card.items() if k != "expects"})
    row = {}
    for name, (volume, liver, _) in scans.items():
        result = run(volume, model=loaded, device="cpu")
        ml = float(np.prod(volume.spacing)) / 1000.0
        row[name] = {"liver_dice": round(float(dice(result.labels > 0, liver)), 3),
                     "tumor_ml": round(float((result.labels == 2).sum()) * ml, 1), "warnings": result.warnings}
        print(f"  {name:<14} liver Dice {row[name]['liver_dice']:.3f}  tumor {row[name]['tumor_ml']:6.1f} mL", flush=True)
    livers, tumors = [], ([], [])
    for volume, truth in phantoms:
        labels = run(volume, model=loaded, device="cpu").labels
        livers.append(float(dice(labels > 0, truth > 0)))
        tumors[0].append(labels == 2)
        tumors[1].append(truth == 2)
    pred, truth = np.concatenate([t.ravel() for t in tumors[0]]), np.concatenate([t.ravel() for t in tumors[1]])
    row["phantoms"] = {"liver_dice": round(float(np.mean(livers)), 3), "tumor_dice_global": round(float(dice(pred, truth)), 3)}
    print(f"  held-out phantoms: liver Dice {row['phantoms']['liver_dice']:.3f}, tumor Dice (global) "
          f"{row['phantoms']['tumor_dice_global']:.3f}", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=default_cache(), help="the real scans (bench/real_ct.py --fetch)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "randomise")
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test, not a result")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.steps, args.held_out = 3, 4, 1
    torch.set_num_threads(1)
    scans = load_scans(args.cache, REAL)
    phantoms = held_out(args.held_out, (48, 160, 160) if args.quick else (80, 320, 320))
    results = {}
    for name, config in configs(args.cases, args.steps).items():
        start = time.perf_counter()
        trained = train(config, args.out / name)
        print(f"{name}: trained {trained.steps} steps ({time.perf_counter() - start:.0f} s here)", flush=True)
        results[name] = score(trained.card_path, scans, phantoms)
    write_json(args.out / "randomise.json", {"cases": args.cases, "steps": args.steps, "results": results})
    print(f"\n| randomise | {' | '.join(REAL)} | held-out phantoms: liver / tumor (global) |")
    for name, row in results.items():
        cells = [f"{row[s]['liver_dice']:.3f} / {row[s]['tumor_ml']:.1f} mL{' (warned)' if row[s]['warnings'] else ''}"
                 for s in REAL]
        print(f"| {name.split('-')[1]} | {' | '.join(cells)} | {row['phantoms']['liver_dice']:.3f} / "
              f"{row['phantoms']['tumor_dice_global']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
