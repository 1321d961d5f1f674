"""The shipped default models on real-size phantoms, end to end (a benchmark run by hand, not a test).

Every measurement is one fresh subprocess (``measure.measure``) that reads the input file, runs
``pipeline.run`` with the model given by name or card path (so the model load is inside the time)
and writes the result with ``Result.write``; it reports its seconds and its peak resident set size
(``VmHWM`` of the child's own memory map, so one measurement's peak never mixes with another's
or with the bench's).  The inputs are made and written beforehand by this process: CT as int16
NIfTI (what a DICOM series holds), DBT as float32 NIfTI.

Parts (``--parts``, default all):

* ``ct``: held-out clinical-grid CT phantoms ``ct_phantom(seed, shape=(nk, 512, 512))``, seeds
  5000+, nk 40…180 (slices about 1–5 mm), stored as the phantom gives them (LPS axial), RAS-
  flipped, oblique (the same voxels under a rotated direction matrix) and as sagittal slices
  (``resample.to_orientation``; labels transformed alike).  Per case: liver Dice (labels 1∪2),
  tumor voxels for the global tumor Dice (label 2, pooled over cases), and whether the written
  label map lies on the input's exact grid (size, origin, spacing and direction read back with
  SimpleITK from ``labelmap.nii.gz`` and ``segmentation.seg.nrrd`` equal the input file's).
  Then the same on the small native grid (``ct_phantom(seed)``), today's ground, and on 8 clinical
  grids drawn as real scans vary (``varied``: seeds 5400+, :data:`common.VARIED` — contrast phases, tumor
  kinds, coverage, reconstruction; what the CT models train on since the real-CT work).
* ``speed``: a 512×512×100 CT at about 0.7 mm (seconds, goal < 60 s; peak RSS, goal < 3 GiB),
  a 512×512×300 CT (peak RSS, goal < 4 GiB), a 40×1024×768 DBT at 0.1 mm (seconds, goal
  < 60 s); and the CT model without its working spacing (a card copy with
  ``working_spacing_mm`` removed) on the 512×512×100 CT, as the ratio the working spacing buys
  (if it runs past ``--no-ws-limit`` seconds, both are measured on a central crop instead, and
  the table says so).
* ``dbt``: held-out DBT FROC (:func:`dbt_froc`) at the default grid (``dbt_phantom(seed)``,
  32×256×192 at 0.4 mm) and at the clinical grid (40×1024×768 at 0.1 mm), for the shipped
  detector and any ``--dbt-model`` given beside it.

``--ship DIR`` (with ``--parts dbt`` and one ``--dbt-model``) writes that detector into DIR with its
held-out FROC at both grids in the card's ``metrics`` (:func:`ship_detector`); the shipped
``dbt-lesion-ahnet`` was made so.

``--quick`` runs every part on one or two tiny cases (a smoke test of about a minute, not a
result).  ``--json PATH`` also writes every number.  ``--threads`` sets torch's CPU threads in
every run (default 2, the machine's cores).

    .venv/bin/python bench/real_size.py --quick --json /tmp/real_size_quick.json
    .venv/bin/python bench/real_size.py --parts dbt,speed --json runs/real_size.json \\
        --dbt-model runs/dbt-lesion-ahnet-v1/dbt-lesion-ahnet.json
    .venv/bin/python bench/real_size.py --parts dbt --dbt-model runs/dbt-lesion-ahnet/model/dbt-lesion-ahnet.json \
        --ship Resources/models --training-time '{"machine": "2-core CPU", "cpu_minutes": 22}'
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from TransferSegLib import pipeline
from TransferSegLib.heatmaps import box_contains
from TransferSegLib.metrics import FROC_RATES, found_by_kind, froc
from TransferSegLib.models import (DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, find_model, load_model,
                                   save_model)
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.volume import Volume

from common import (QUICK_SPEED_INPUTS, SPEED_INPUTS, ct_part, evaluation_model, grid_text, json_saver, repo_relative,
                    shape_text, speed_input, write_ct)
from measure import measure

PARTS = ("ct", "speed", "dbt")
# DBT grids: the phantom's default (the field of view at 0.4 mm) and a clinical detector at 0.1 mm
DBT_GRIDS = {"default": {}, "clinical": {"shape": [40, 1024, 768], "pixel_mm": 0.1}}
FROC_PROTOCOL = ("AH-Net sec. 4.1: a peak inside a lesion's 3D box is a true positive (once per box); peaks are "
                 "pipeline.run's detections (found on the working grid with the card's min_distance, threshold 0, "
                 "at most 50 per volume) mapped back to the input grid")


# --- speed and memory ------------------------------------------------------------------------
SPEED_CASES = ("dbt", "ct100", "ct300")


def speed_part(ct_model, dbt_model, work: Path, threads: int, quick: bool, no_ws_limit: float,
               rows: dict, save=lambda: None, cases=SPEED_CASES) -> dict:
    """The speed and memory measurements named in ``cases``, into ``rows`` (``save()`` after each)."""
    sizes = {"ct300": (30, 128, 128)} if quick else {"ct300": (300, 512, 512)}

    def report(name, what, run, goal=None):
        rows[name] = {"what": what, **{k: run[k] for k in ("seconds", "peak_rss_gib", "timings_s", "shape")}, "goal": goal}
        print(f"  {what:<58} {run['seconds']:6.1f} s  peak RSS {run['peak_rss_gib']:.2f} GiB"
              f"{'  (goal ' + goal + ')' if goal else ''}", flush=True)
        print(f"      stages: {', '.join(f'{k} {v:.1f}' for k, v in run['timings_s'].items())} s; "
              f"reading the input {run['load_input_s']:.1f} s", flush=True)
        save()

    if "dbt" in cases:
        volume, boxes, dbt = speed_input("dbt", work, quick, name="dbt")
        del volume
        run = measure(dbt, dbt_model, work / "out-dbt", threads)
        hits = sum(any(box_contains(b, d["position_kji"]) for d in run["detections"]) for b in boxes)
        options = (QUICK_SPEED_INPUTS if quick else SPEED_INPUTS)["dbt"][1]
        report("dbt", f"DBT {shape_text(options['shape'])} at {options['pixel_mm']} mm", run, "< 60 s")
        rows["dbt"].update({"lesions": len(boxes), "lesions_hit_by_a_detection": hits,
                            "detections": len(run["detections"]), "overview": str(work / "out-dbt" / "overview.png")})
        print(f"      {len(run['detections'])} detection(s) above the card's threshold; {hits} of {len(boxes)} "
              f"lesion(s) hold one; overview: {work / 'out-dbt' / 'overview.png'}", flush=True)
        save()
        dbt.unlink()

    if "ct100" in cases:
        volume, _, ct100 = speed_input("ct", work, quick, name="ct100")
        report("ct100", f"CT {grid_text(volume.shape, volume.spacing)}",
               measure(ct100, ct_model, work / "out-ct100", threads), "< 60 s, < 3 GiB")
        working_spacing_ratio(ct_model, volume, ct100, work, threads, no_ws_limit, rows)
        save()
        del volume
        ct100.unlink()

    if "ct300" in cases:
        volume, _ = ct_phantom(5201, shape=sizes["ct300"])
        ct300 = write_ct(volume, work / "ct300.nii.gz")
        what = f"CT {grid_text(sizes['ct300'], volume.spacing)}"
        del volume
        report("ct300", what, measure(ct300, ct_model, work / "out-ct300", threads), "< 4 GiB")
        ct300.unlink()
    return rows


def working_spacing_ratio(ct_model, volume, path: Path, work: Path, threads: int, no_ws_limit: float,
                          rows: dict) -> None:
    """The CT model without its working spacing on the CT ``volume`` (file ``path``) against
    ``rows["ct100"]``, into ``rows["ct100_without_working_spacing"]``; on a central crop, both
    measured again, when the full size runs past ``no_ws_limit`` seconds."""
    card = load_model(ct_model).card
    if not card.get("working_spacing_mm"):
        rows["ct100_without_working_spacing"] = {"what": f"n/a: {card['name']} has no working spacing"}
        print(f"  ratio: n/a, the shipped {card['name']} has no working spacing", flush=True)
        return
    plain = without_working_spacing(ct_model, work / "no-working-spacing")
    run = measure(path, plain, work / "out-ct100-plain", threads, timeout=no_ws_limit)
    crop = None
    if run is None:  # too slow at full size: compare both on a central crop
        k, j, i = volume.shape
        box = (slice(0, k), slice(j // 4, j // 4 + j // 2), slice(i // 4, i // 4 + i // 2))
        origin = volume.ijk_to_ras_points(np.array([[0, j // 4, i // 4]], float))[0]
        cropped = Volume(volume.array[box], volume.spacing, volume.directions, origin)
        crop_path = write_ct(cropped, work / "ct100-crop.nii.gz")
        crop = list(cropped.shape)
        with_ws = measure(crop_path, ct_model, work / "out-crop", threads)
        run = measure(crop_path, plain, work / "out-crop-plain", threads)
    else:
        with_ws = rows["ct100"]
    rows["ct100_without_working_spacing"] = {
        "what": "the same CT model without working_spacing_mm", "seconds": run["seconds"],
        "peak_rss_gib": run["peak_rss_gib"], "timings_s": run["timings_s"], "crop": crop,
        "ratio_seconds": run["seconds"] / with_ws["seconds"],
        "ratio_peak_rss": run["peak_rss_gib"] / with_ws["peak_rss_gib"]}
    r = rows["ct100_without_working_spacing"]
    where = (f"on a central {shape_text(crop)} crop (full size ran past {no_ws_limit:.0f} s)"
             if crop else "same CT")
    print(f"  {'without its working spacing, ' + where:<58} {r['seconds']:6.1f} s  peak RSS "
          f"{r['peak_rss_gib']:.2f} GiB  → the working spacing is {r['ratio_seconds']:.1f}× faster, "
          f"{r['ratio_peak_rss']:.1f}× less memory", flush=True)


def without_working_spacing(model, folder: Path) -> Path:
    """A copy of ``model``'s card (and weights) with ``working_spacing_mm`` removed."""
    card_path = find_model(model)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.pop("working_spacing_mm", None)
    folder.mkdir(parents=True, exist_ok=True)
    weights = card_path.parent / card["weights"]["file"]
    target = folder / weights.name
    if not target.exists():
        os.symlink(weights.resolve(), target)
    copy_path = folder / card_path.name
    copy_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return copy_path


# --- DBT FROC --------------------------------------------------------------------------------
def dbt_froc(models: dict, grid: str, count: int, seed: int, quick: bool = False) -> dict:
    """Held-out FROC of each model ({label: name or card path}) on ``count`` DBT phantoms (seeds
    ``seed``…) at ``grid`` (:data:`DBT_GRIDS`), through ``pipeline.run``: the card's resampling,
    network and peaks, with the detections mapped back to the input grid.  Each phantom is made
    once and every model runs on it."""
    options = dict(DBT_GRIDS[grid])
    if quick and grid == "clinical":
        options = {"shape": [8, 256, 192], "pixel_mm": 0.4}
    loaded = {label: evaluation_model(model) for label, model in models.items()}
    detections = {label: [] for label in models}
    seconds = {label: 0.0 for label in models}
    boxes = []
    for n in range(count):
        volume, lesions = dbt_phantom(seed + n, **options)
        boxes.append(lesions)
        for label, model in loaded.items():
            start = time.perf_counter()
            result = pipeline.run(volume, model, device="cpu")
            seconds[label] += time.perf_counter() - start
            detections[label].append(result.detections)
        del volume
    out = {}
    for label in models:
        out[label] = _froc_entry(detections[label], boxes, seed, options, loaded[label].card["peaks"])
        out[label].update({"model": str(models[label]), "seconds_per_volume": seconds[label] / count,
                           "_detections": detections[label], "_boxes": boxes})
    return out


def _froc_entry(detections, boxes, seed, options, peaks) -> dict:
    curve = froc(detections, boxes)
    by_kind = found_by_kind(detections, boxes, rate=FROC_RATES[-1])["kinds"]
    return {"tpr_at_fp_per_volume": {f"{rate:g}": curve["tpr_at"][rate] for rate in FROC_RATES},
            f"found_by_kind_at_{FROC_RATES[-1]:g}": by_kind,
            "lesions": curve["lesions"], "volumes": curve["volumes"],
            "data": {"phantom": "dbt", "count": len(boxes), "seed": seed, "options": options},
            "peaks": peaks, "protocol": FROC_PROTOCOL, "fp_per_volume": curve["fp_per_volume"], "tpr": curve["tpr"]}


def dbt_part(models: dict, counts: dict, quick: bool, keep: bool = False) -> dict:
    out = {}
    for grid in DBT_GRIDS:
        out[grid] = dbt_froc(models, grid, counts[grid], 5000, quick)
        first = next(iter(out[grid].values()))
        shape = shape_text(first["data"]["options"].get("shape", [32, 256, 192]))
        print(f"  {grid} grid ({shape} at {first['data']['options'].get('pixel_mm', 0.4)} mm), {first['volumes']} "
              f"held-out phantoms (seeds 5000-{5000 + first['volumes'] - 1}), {first['lesions']} lesions; "
              "TPR at FP/volume:", flush=True)
        print(f"    {'model':<44}" + "".join(f"{rate:>7g}" for rate in FROC_RATES) + "   s/volume   found at "
              f"{FROC_RATES[-1]:g} FP/volume")
        for label, curve in out[grid].items():
            kinds = curve[f"found_by_kind_at_{FROC_RATES[-1]:g}"]
            print(f"    {label:<44}" + "".join(f"{v:>7.3f}" for v in curve["tpr_at_fp_per_volume"].values())
                  + f"   {curve['seconds_per_volume']:7.1f}   "
                  + ", ".join(f"{k} {v['found']}/{v['lesions']}" for k, v in sorted(kinds.items())), flush=True)
    for curves in out.values():  # the per-volume detections stay out of the JSON (kept for --ship)
        for curve in curves.values():
            if not keep:
                curve.pop("_detections"), curve.pop("_boxes")
    return out


def ship_detector(card_path, froc_results: dict, label: str, training_time: dict, folder: Path,
                  check_count: int = 10) -> Path:
    """Write the detector at ``card_path`` into ``folder`` (weights + card, sha256 recomputed) with
    its held-out FROC in ``metrics``: ``froc_heldout`` (default grid), ``froc_heldout_clinical``
    (0.1 mm) and ``froc_heldout_check`` (the first ``check_count`` default-grid volumes, which the
    shipped-model test recomputes quickly), and ``training_time`` as given."""
    loaded = load_model(card_path)
    card = copy.deepcopy(loaded.card)
    card.pop("weights", None)
    init = card["training"]["config"].get("init_weights") or {}
    if "transfer_from" in init:  # no local absolute paths in a shipped card
        init["transfer_from"] = repo_relative(init["transfer_from"])
    compact = ("tpr_at_fp_per_volume", f"found_by_kind_at_{FROC_RATES[-1]:g}", "lesions", "volumes", "data", "peaks",
               "protocol")
    default, clinical = froc_results["default"][label], froc_results["clinical"][label]
    check = _froc_entry(default["_detections"][:check_count], default["_boxes"][:check_count],
                        default["data"]["seed"], default["data"]["options"], default["peaks"])
    card["metrics"] = {"froc_heldout": {k: default[k] for k in compact},
                       "froc_heldout_clinical": {k: clinical[k] for k in compact},
                       "froc_heldout_check": {k: check[k] for k in compact},
                       "training_time": training_time}
    # stored as the run stored it (an fp16 detector stays fp16: the card's weights.dtype says so)
    return save_model(loaded.network, card, folder, storage_dtype=loaded.card["weights"].get("dtype"))


# --- main ------------------------------------------------------------------------------------
def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one or two tiny cases per part (a smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run (default 2)")
    parser.add_argument("--ct-model", default=DEFAULT_SEGMENTATION_MODEL)
    parser.add_argument("--dbt-model", action="append", default=[],
                        help="another detector (card path) to score beside the shipped one; repeatable")
    parser.add_argument("--dbt-volumes", type=int, default=40, help="held-out phantoms at the default grid")
    parser.add_argument("--dbt-clinical-volumes", type=int, default=10, help="held-out phantoms at 0.1 mm")
    parser.add_argument("--speed-cases", default=",".join(SPEED_CASES),
                        help=f"which speed measurements, comma-separated, of {', '.join(SPEED_CASES)}")
    parser.add_argument("--no-ws-limit", type=float, default=600.0,
                        help="seconds the CT model without working spacing may take before a crop is used")
    parser.add_argument("--ship", type=Path, help="with --parts dbt and one --dbt-model: write that detector "
                        "into this folder with its held-out FROC in the card")
    parser.add_argument("--training-time", default="{}",
                        help='with --ship: the card\'s metrics.training_time, JSON ({"machine": ..., "cpu_minutes": ...})')
    parser.add_argument("--work", type=Path, help="folder for inputs and outputs (default: a temporary one)")
    return parser


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.ship and ("dbt" not in parts or len(args.dbt_model) != 1):
        parser.error("--ship needs --parts with dbt and exactly one --dbt-model (the detector to ship)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="real_size-"))
    work.mkdir(parents=True, exist_ok=True)
    ct_model, dbt_model = str(find_model(args.ct_model)), str(find_model(DEFAULT_DETECTION_MODEL))
    results = {"quick": args.quick, "threads": args.threads, "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg(), "ct_model": ct_model, "dbt_model": dbt_model}
    print(f"real-size bench{' — QUICK: a smoke test, not a result' if args.quick else ''}: {args.threads} "
          f"thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; work folder {work}", flush=True)

    save = json_saver(results, args.json)

    if "dbt" in parts:
        print("DBT FROC (held out)", flush=True)
        models = {f"shipped {DEFAULT_DETECTION_MODEL}": dbt_model}
        models.update({str(path): str(path) for path in args.dbt_model})
        counts = {"default": 2 if args.quick else args.dbt_volumes,
                  "clinical": 1 if args.quick else args.dbt_clinical_volumes}
        results["dbt_froc"] = dbt_part(models, counts, args.quick, keep=bool(args.ship))
        if args.ship:
            card = ship_detector(args.dbt_model[0], results["dbt_froc"], str(args.dbt_model[0]),
                                 json.loads(args.training_time), args.ship)
            print(f"  shipped {card} and {card.with_suffix('.safetensors')}", flush=True)
            for curves in results["dbt_froc"].values():
                for curve in curves.values():
                    curve.pop("_detections"), curve.pop("_boxes")
        save()
    if "speed" in parts:
        print("speed and memory, end to end (load → run → write), each in a fresh process", flush=True)
        results["speed"] = {}
        speed_part(ct_model, dbt_model, work, args.threads, args.quick, args.no_ws_limit, results["speed"], save,
                   [c.strip() for c in args.speed_cases.split(",")])
        save()
    if "ct" in parts:
        print(f"CT accuracy ({Path(ct_model).stem}), end to end", flush=True)
        results["ct"] = {}
        ct_part(ct_model, work, args.threads, args.quick, results["ct"], save)
        save()
    results["total_seconds"] = time.perf_counter() - started
    save()
    print(f"done in {results['total_seconds']:.0f} s" + (f"; numbers in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
