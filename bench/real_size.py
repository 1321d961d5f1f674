"""The shipped default models on real-size phantoms, end to end (a benchmark run by hand, not a test).

Every measurement is one fresh subprocess that reads the input file, runs ``pipeline.run`` with
the model given by name or card path (so the model load is inside the time) and writes the
result with ``Result.write``; it reports its seconds and its peak resident set size
(``VmHWM`` of the child's own memory map, so one measurement's peak never mixes with another's
or with the bench's).  The inputs are
made and written beforehand by this process: CT as int16 NIfTI (what a DICOM series holds),
DBT as float32 NIfTI.

Parts (``--parts``, default all):

* ``ct``: held-out clinical-grid CT phantoms ``ct_phantom(seed, shape=(nk, 512, 512))``, seeds
  5000+, nk 40…180 (slices about 1–5 mm), stored as the phantom gives them (LPS axial), RAS-
  flipped, oblique (the same voxels under a rotated direction matrix) and as sagittal slices
  (``resample.to_orientation``; labels transformed alike).  Per case: liver Dice (labels 1∪2),
  tumor voxels for the global tumor Dice (label 2, pooled over cases), and whether the written
  label map lies on the input's exact grid (size, origin, spacing and direction read back with
  SimpleITK from ``labelmap.nii.gz`` and ``segmentation.seg.nrrd`` equal the input file's).
  Then the same on the small native grid (``ct_phantom(seed)``), today's ground, and on 8 clinical
  grids drawn as real scans vary (``varied``: seeds 5400+, :data:`VARIED` — contrast phases, tumor
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
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from TransferSegLib.metrics import FROC_RATES, dice, found_by_kind, froc  # noqa: E402
from TransferSegLib.models import DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, find_model, load_model  # noqa: E402

PARTS = ("ct", "speed", "dbt")
GIB = float(1 << 30)
# DBT grids: the phantom's default (the field of view at 0.4 mm) and a clinical detector at 0.1 mm
DBT_GRIDS = {"default": {}, "clinical": {"shape": [40, 1024, 768], "pixel_mm": 0.1}}
FROC_PROTOCOL = ("AH-Net sec. 4.1: a peak inside a lesion's 3D box is a true positive (once per box); peaks are "
                 "pipeline.run's detections (found on the working grid with the card's min_distance, threshold 0, "
                 "at most 50 per volume) mapped back to the input grid")
# held-out phantoms drawn as real scans vary: the phantom options the default CT model trains with, read from its config
VARIED = json.loads((ROOT / "Resources" / "configs" / "ct-liver-tumor-unet3d.json").read_text(encoding="utf-8")
                    )["data"]["options"]
CT_STORAGE = ("as generated (LPS axial)", "RAS-flipped", "oblique", "sagittal")


# --- one measurement in a fresh process ------------------------------------------------------
def _peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM of its memory map).  Not ``getrusage``: on Linux its
    ru_maxrss carries over the parent's RSS at fork, so every child would report the bench's own."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(spec: dict) -> dict:
    """Runs in the subprocess: read the input → pipeline.run (the model load inside, its time in
    ``timings_s["load_model"]``) → Result.write, each timed, with the peak RSS (and, on a GPU, the
    peak memory torch allocated there)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from TransferSegLib.io import load_volume
    from TransferSegLib.pipeline import run

    device = spec.get("device", "cpu")
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is made before the clock starts
    start = time.perf_counter()
    volume = load_volume(spec["input"])
    loaded = time.perf_counter() - start
    result = run(volume, spec["model"], device=device)
    ran = time.perf_counter()
    result.write(spec["output"], input_path=spec["input"])
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "load_input_s": loaded, "run_s": ran - start - loaded,
           "write_s": seconds - (ran - start), "timings_s": result.timings, "device": str(result.device),
           "peak_rss_gib": _peak_rss_bytes() / GIB,
           "warnings": result.warnings, "shape": list(volume.shape)}
    if device.startswith("cuda"):
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(torch.device(device)) / GIB
    if result.task == "heatmap":
        out["detections"] = [d.to_dict() for d in result.detections]
    return out


def measure(input_path: Path, model, output: Path, threads: int, timeout: float = None, device: str = "cpu") -> dict:
    """One end-to-end run in a fresh subprocess (:func:`_child`); ``None`` when it ran past ``timeout`` seconds."""
    spec = {"input": str(input_path), "model": str(model), "output": str(output), "threads": threads,
            "device": device}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"measurement of {input_path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- inputs ----------------------------------------------------------------------------------
def write_ct(volume, path: Path) -> Path:
    """A CT volume as int16 NIfTI (its HU are whole numbers), the geometry exact."""
    import SimpleITK as sitk

    from TransferSegLib.io import image_on

    sitk.WriteImage(image_on(np.round(volume.array).astype(np.int16), volume), str(path), useCompression=True)
    return path


def write_float(volume, path: Path) -> Path:
    from TransferSegLib.io import save_volume

    return save_volume(volume, path)


def stored_as(volume, labels, storage: str):
    """The same phantom stored another way: flipped to RAS, oblique or as sagittal slices (exact)."""
    from TransferSegLib.resample import to_orientation
    from TransferSegLib.volume import Volume

    if storage == CT_STORAGE[0]:
        return volume, labels
    if storage == "oblique":  # the same voxels under a direction matrix rotated 12° about S and 8° about R
        a, b = np.radians(12.0), np.radians(8.0)
        about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        return Volume(volume.array, volume.spacing, about_r @ about_s @ volume.directions, volume.origin), labels
    code = {"RAS-flipped": "RAS", "sagittal": "PIL"}[storage]  # sagittal: i → P, j → I, k → L
    turned, turn = to_orientation(volume, code)
    return turned, turn.apply(labels)


def grid_matches(input_path: Path, output_paths) -> dict:
    """Size, origin, spacing and direction of each written file against the input file's (SimpleITK)."""
    import SimpleITK as sitk

    def header(path):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader

    ref = header(input_path)
    worst, same = 0.0, True
    for path in output_paths:
        out = header(path)
        same &= out.GetDimension() == ref.GetDimension() == 3 and out.GetSize() == ref.GetSize()
        for a, b in ((out.GetOrigin(), ref.GetOrigin()), (out.GetSpacing(), ref.GetSpacing()),
                     (out.GetDirection(), ref.GetDirection())):
            worst = max(worst, float(np.max(np.abs(np.subtract(a, b)))) if len(a) == len(b) else np.inf)
    return {"same_grid": bool(same and worst < 1e-4), "max_geometry_difference": worst}


def read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


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
    copy = folder / card_path.name
    copy.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return copy


# --- CT --------------------------------------------------------------------------------------
def ct_cases(quick: bool) -> list:
    """(seed, shape, storage): clinical 512² grids with 1–5 mm slices, each storage three times."""
    if quick:
        return [(5000, (24, 128, 128), CT_STORAGE[0]), (5001, (20, 128, 128), "oblique")]
    slices = (40, 180, 64, 140, 96, 56, 160, 80, 120, 48, 110, 72)
    return [(5000 + n, (nk, 512, 512), CT_STORAGE[n % 4]) for n, nk in enumerate(slices)]


def ct_part(model, work: Path, threads: int, quick: bool, out: dict, save=lambda: None) -> dict:
    """The CT accuracy runs into ``out`` (``save()`` after each case)."""
    from TransferSegLib.phantoms import ct_phantom

    rows = out.setdefault("cases", [])
    out["model"] = str(model)
    grids = {"clinical": ct_cases(quick), "native": [(5100 + n, None, CT_STORAGE[0]) for n in range(1 if quick else 5)],
             "varied": [(5400 + n, (nk, 512, 512), CT_STORAGE[0])
                        for n, nk in enumerate((60, 100, 150, 80, 120, 48, 90, 200)[:1 if quick else 8])]}
    for grid, cases in grids.items():
        for seed, shape, storage in cases:
            volume, labels = ct_phantom(seed, shape=shape, **(VARIED if grid == "varied" else {}))
            volume, labels = stored_as(volume, labels, storage)
            path = write_ct(volume, work / f"ct-{seed}.nii.gz")
            del volume
            folder = work / f"ct-{seed}-out"
            run = measure(path, model, folder, threads)
            predicted = read_labels(folder / "labelmap.nii.gz")
            truth_tumor, tumor = labels == 2, predicted == 2
            row = {"grid": grid, "seed": seed, "shape": run["shape"], "storage": storage,
                   "spacing_mm": _spacing(path),
                   "liver_dice": float(dice(predicted > 0, labels > 0)),
                   "tumor_overlap2": 2 * int((tumor & truth_tumor).sum()),
                   "tumor_voxels": int(tumor.sum() + truth_tumor.sum()),
                   "seconds": run["seconds"], "peak_rss_gib": run["peak_rss_gib"],
                   **grid_matches(path, [folder / "labelmap.nii.gz", folder / "segmentation.seg.nrrd"])}
            rows.append(row)
            save()
            print(f"  {grid:<8} seed {seed} {'×'.join(map(str, row['shape'])):>12} "
                  f"{'×'.join(f'{s:.2f}' for s in row['spacing_mm'])} mm  {storage:<24} liver Dice "
                  f"{row['liver_dice']:.3f}  tumor voxels {row['tumor_voxels']:>7}  same grid {row['same_grid']}  "
                  f"{row['seconds']:5.1f} s  {row['peak_rss_gib']:.2f} GiB", flush=True)
            path.unlink()
            shutil.rmtree(folder)
    summary = {}
    for grid in grids:
        part = [r for r in rows if r["grid"] == grid]
        worst = min(part, key=lambda r: r["liver_dice"])
        summary[grid] = {"cases": len(part), "liver_dice_mean": float(np.mean([r["liver_dice"] for r in part])),
                         "liver_dice_worst": {"seed": worst["seed"], "storage": worst["storage"],
                                              "dice": worst["liver_dice"]},
                         "tumor_dice_global": sum(r["tumor_overlap2"] for r in part)
                         / max(sum(r["tumor_voxels"] for r in part), 1),
                         "all_on_input_grid": all(r["same_grid"] for r in part),
                         "seconds_mean": float(np.mean([r["seconds"] for r in part]))}
        s = summary[grid]
        print(f"  {grid}: {s['cases']} cases, liver Dice mean {s['liver_dice_mean']:.3f} (worst "
              f"{s['liver_dice_worst']['dice']:.3f}: seed {s['liver_dice_worst']['seed']}, "
              f"{s['liver_dice_worst']['storage']}), tumor Dice (global) {s['tumor_dice_global']:.3f}, "
              f"all outputs on the input grid: {s['all_on_input_grid']}, {s['seconds_mean']:.1f} s per case",
              flush=True)
    out["summary"] = summary
    save()
    return out


def _spacing(path: Path) -> list:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return list(reversed(reader.GetSpacing()))  # (k, j, i)


# --- speed and memory ------------------------------------------------------------------------
SPEED_CASES = ("dbt", "ct100", "ct300")
# the clinical-size inputs of the speed runs: (seed, phantom options); tiny ones with --quick
SPEED_INPUTS = {"ct": (5200, {"shape": (100, 512, 512)}), "dbt": (5300, {"shape": (40, 1024, 768), "pixel_mm": 0.1})}
QUICK_SPEED_INPUTS = {"ct": (5200, {"shape": (20, 128, 128)}), "dbt": (5300, {"shape": (8, 256, 192), "pixel_mm": 0.4})}


def phantom_file(kind: str, path: Path, seed: int, **options) -> tuple:
    """A ``ct_phantom`` (written as int16) or ``dbt_phantom`` (float32) written to ``path``:
    ``(volume, truth, path)``, truth being the label map or the lesion boxes."""
    from TransferSegLib.phantoms import ct_phantom, dbt_phantom

    volume, truth = (ct_phantom if kind == "ct" else dbt_phantom)(seed, **options)
    return volume, truth, (write_ct if kind == "ct" else write_float)(volume, path)


def speed_input(kind: str, work: Path, quick: bool = False, name: str = None) -> tuple:
    """The speed runs' clinical-size input (:data:`SPEED_INPUTS`): a 512×512×100 CT (seed 5200,
    0.63 mm pixels, 1.87 mm slices) or a 40×1024×768 DBT at 0.1 mm (seed 5300), written into
    ``work``: ``(volume, truth, path)``."""
    seed, options = (QUICK_SPEED_INPUTS if quick else SPEED_INPUTS)[kind]
    return phantom_file(kind, work / f"{name or kind + '-speed'}.nii.gz", seed, **options)


def speed_part(ct_model, dbt_model, work: Path, threads: int, quick: bool, no_ws_limit: float,
               rows: dict, save=lambda: None, cases=SPEED_CASES) -> dict:
    """The speed and memory measurements named in ``cases``, into ``rows`` (``save()`` after each)."""
    from TransferSegLib.phantoms import ct_phantom

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
        hits = sum(any(_inside(d["position_kji"], b["box_kji"]) for d in run["detections"]) for b in boxes)
        options = (QUICK_SPEED_INPUTS if quick else SPEED_INPUTS)["dbt"][1]
        report("dbt", f"DBT {'×'.join(map(str, options['shape']))} at {options['pixel_mm']} mm", run, "< 60 s")
        rows["dbt"].update({"lesions": len(boxes), "lesions_hit_by_a_detection": hits,
                            "detections": len(run["detections"]), "overview": str(work / "out-dbt" / "overview.png")})
        print(f"      {len(run['detections'])} detection(s) above the card's threshold; {hits} of {len(boxes)} "
              f"lesion(s) hold one; overview: {work / 'out-dbt' / 'overview.png'}", flush=True)
        save()
        dbt.unlink()

    if "ct100" in cases:
        volume, _, ct100 = speed_input("ct", work, quick, name="ct100")
        spacing = "×".join(f"{s:.2f}" for s in volume.spacing)
        report("ct100", f"CT {'×'.join(map(str, volume.shape))} ({spacing} mm)",
               measure(ct100, ct_model, work / "out-ct100", threads), "< 60 s, < 3 GiB")
        card = load_model(ct_model).card
        if card.get("working_spacing_mm"):
            plain = without_working_spacing(ct_model, work / "no-working-spacing")
            run = measure(ct100, plain, work / "out-ct100-plain", threads, timeout=no_ws_limit)
            crop = None
            if run is None:  # too slow at full size: compare both on a central crop
                from TransferSegLib.volume import Volume

                k, j, i = volume.shape
                box = (slice(0, k), slice(j // 4, j // 4 + j // 2), slice(i // 4, i // 4 + i // 2))
                origin = volume.ijk_to_ras_points(np.array([[0, j // 4, i // 4]], float))[0]
                cropped = Volume(volume.array[box], volume.spacing, volume.directions, origin)
                path = write_ct(cropped, work / "ct100-crop.nii.gz")
                crop = list(cropped.shape)
                with_ws = measure(path, ct_model, work / "out-crop", threads)
                run = measure(path, plain, work / "out-crop-plain", threads)
            else:
                with_ws = rows["ct100"]
            rows["ct100_without_working_spacing"] = {
                "what": "the same CT model without working_spacing_mm", "seconds": run["seconds"],
                "peak_rss_gib": run["peak_rss_gib"], "timings_s": run["timings_s"], "crop": crop,
                "ratio_seconds": run["seconds"] / with_ws["seconds"],
                "ratio_peak_rss": run["peak_rss_gib"] / with_ws["peak_rss_gib"]}
            r = rows["ct100_without_working_spacing"]
            where = (f"on a central {'×'.join(map(str, crop))} crop (full size ran past {no_ws_limit:.0f} s)"
                     if crop else "same CT")
            print(f"  {'without its working spacing, ' + where:<58} {r['seconds']:6.1f} s  peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB  → the working spacing is {r['ratio_seconds']:.1f}× faster, "
                  f"{r['ratio_peak_rss']:.1f}× less memory", flush=True)
        else:
            rows["ct100_without_working_spacing"] = {"what": f"n/a: {card['name']} has no working spacing"}
            print(f"  ratio: n/a, the shipped {card['name']} has no working spacing", flush=True)
        save()
        del volume
        ct100.unlink()

    if "ct300" in cases:
        volume, _ = ct_phantom(5201, shape=sizes["ct300"])
        ct300 = write_ct(volume, work / "ct300.nii.gz")
        spacing = "×".join(f"{s:.2f}" for s in volume.spacing)
        del volume
        report("ct300", f"CT {'×'.join(map(str, sizes['ct300']))} ({spacing} mm)",
               measure(ct300, ct_model, work / "out-ct300", threads), "< 4 GiB")
        ct300.unlink()
    return rows


def _inside(position, box) -> bool:
    return all(lo <= p < hi for p, lo, hi in zip(position, box[:3], box[3:]))


# --- DBT FROC --------------------------------------------------------------------------------
def evaluation_model(model):
    """``model`` loaded, its card's peaks made the FROC's: every local maximum (threshold 0), at
    most 50 per volume, the card's ``min_distance`` (working voxels)."""
    loaded = load_model(model)
    distance = (loaded.card.get("peaks") or {}).get("min_distance", [2, 8, 8])
    peaks = {"threshold": 0.0, "min_distance": list(distance), "max_peaks": 50}
    return dataclasses.replace(loaded, card=dict(loaded.card, peaks=peaks))


def dbt_froc(models: dict, grid: str, count: int, seed: int, quick: bool = False) -> dict:
    """Held-out FROC of each model ({label: name or card path}) on ``count`` DBT phantoms (seeds
    ``seed``…) at ``grid`` (:data:`DBT_GRIDS`), through ``pipeline.run``: the card's resampling,
    network and peaks, with the detections mapped back to the input grid.  Each phantom is made
    once and every model runs on it."""
    from TransferSegLib.phantoms import dbt_phantom
    from TransferSegLib.pipeline import run

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
            result = run(volume, model, device="cpu")
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
        shape = "×".join(map(str, first["data"]["options"].get("shape", [32, 256, 192])))
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
    import copy

    from TransferSegLib.models import save_model

    loaded = load_model(card_path)
    card = copy.deepcopy(loaded.card)
    card.pop("weights", None)
    init = card["training"]["config"].get("init_weights") or {}
    if "transfer_from" in init:  # no local absolute paths in a shipped card
        path = Path(init["transfer_from"])
        init["transfer_from"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
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


def ct100_side_by_side(models: dict, threads: int, quick: bool, work: Path, out: dict, save=lambda: None) -> tuple:
    """The 512×512×100 CT of :func:`speed_input` end to end in a fresh process per model
    ({name: model}), each into ``out[name]``; returns ``(volume, path of the CT file)``."""
    volume, _, path = speed_input("ct", work, quick, name="ct100")
    shape = volume.shape
    spacing = "×".join(f"{s:.2f}" for s in volume.spacing)
    for name, which in models.items():
        run = measure(path, which, work / f"out-{name}", threads)
        out[name] = {k: run[k] for k in ("seconds", "peak_rss_gib", "timings_s", "shape")}
        print(f"  CT {'×'.join(map(str, shape))} ({spacing} mm), {name:<10} {run['seconds']:6.1f} s  "
              f"peak RSS {run['peak_rss_gib']:.2f} GiB  stages: "
              + ", ".join(f"{k} {v:.1f}" for k, v in run["timings_s"].items()), flush=True)
        save()
    return volume, path


def dice_summary(rows: list, names) -> dict:
    """Per name: liver Dice mean and worst over the rows, tumor Dice pooled over them (global)."""
    summary = {}
    for name in names:
        liver = [r["dice"][name]["liver"] for r in rows]
        summary[name] = {"liver_dice_mean": float(np.mean(liver)), "liver_dice_worst": float(np.min(liver)),
                         "tumor_dice_global": sum(r["dice"][name]["tumor_overlap2"] for r in rows)
                         / max(sum(r["dice"][name]["tumor_voxels"] for r in rows), 1)}
    return summary


def print_dice_table(summary: dict, column: str, cell) -> None:
    """The summary as a table, with one more column ``column`` whose text is ``cell(entry)``."""
    width = max(14, *(len(name) for name in summary))
    print(f"\n  {'':<{width}} {'liver Dice mean':>16} {'worst':>7} {'tumor Dice (global)':>20} {column:>14}")
    for name, s in summary.items():
        print(f"  {name:<{width}} {s['liver_dice_mean']:>16.3f} {s['liver_dice_worst']:>7.3f} "
              f"{s['tumor_dice_global']:>20.3f} {cell(s):>14}", flush=True)


def compare_part(models: dict, threads: int, quick: bool, count: int, out: dict, save=lambda: None,
                 extra=None, figure=None) -> dict:
    """Several models ({row name: model}) on the first ``count`` clinical grids of :func:`ct_cases`,
    in this process (each model loaded once, the same pipeline for all), Dice on the input grid:
    liver (1 ∪ 2) per case, tumor (2) global, and seconds per volume.  ``extra(name, model,
    result)`` may give more {row name: labels} from the same run (e.g. another threshold).
    ``figure``: a PNG of the first case, the truth and each model's labels, one row each."""
    import torch

    from TransferSegLib import pipeline
    from TransferSegLib.models import load_model
    from TransferSegLib.phantoms import ct_phantom

    torch.set_num_threads(threads)
    loaded = {name: load_model(model) for name, model in models.items()}
    rows = out.setdefault("cases", [])
    for seed, shape, storage in ct_cases(quick)[:count]:
        volume, labels = ct_phantom(seed, shape=shape)
        volume, labels = stored_as(volume, labels, storage)
        row = {"seed": seed, "shape": list(volume.shape), "storage": storage, "dice": {}, "seconds": {}}
        for name, model in loaded.items():
            tic = time.perf_counter()
            result = pipeline.run(volume, model, device="cpu", return_probabilities=extra is not None)
            row["seconds"][name] = time.perf_counter() - tic
            for key, predicted in {name: result.labels, **(extra(name, model, result) if extra else {})}.items():
                truth, tumor = labels == 2, predicted == 2
                row["dice"][key] = {"liver": float(dice(predicted > 0, labels > 0)),
                                    "tumor_overlap2": 2 * int((tumor & truth).sum()),
                                    "tumor_voxels": int(tumor.sum() + truth.sum())}
            if figure and not rows:
                panels = [dict(volume=volume, labels=labels, title=f"truth (seed {seed}, {storage})")] \
                    if name == next(iter(loaded)) else panels
                panels.append(dict(volume=volume, labels=result.labels,
                                   title=f"{name}: liver Dice {row['dice'][name]['liver']:.3f}"))
        if figure and not rows:
            from TransferSegLib.render import save_gallery_png

            focus = tuple(int(v) for v in np.argwhere(labels == 2).mean(0)) if (labels == 2).any() else None
            save_gallery_png([dict(p, focus=focus) for p in panels], figure)
        rows.append(row)
        save()
        print(f"  seed {seed} {'×'.join(map(str, row['shape'])):>12} {storage:<24} " + "  ".join(
            f"{name} {row['dice'][name]['liver']:.3f} ({row['seconds'][name]:.1f} s)" for name in loaded), flush=True)
    summary = dice_summary(rows, rows[0]["dice"])
    for name in loaded:
        summary[name]["seconds_mean"] = float(np.mean([r["seconds"][name] for r in rows]))
    out["summary"] = summary
    save()
    print_dice_table(summary, "s / volume", lambda s: f"{s['seconds_mean']:.1f}" if "seconds_mean" in s else "")
    return out


def json_saver(results: dict, path):
    """``save()`` for a bench's ``--json PATH`` (a no-op without one): every number so far, rewritten."""
    def save():
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    return save


def part_arguments(parser, parts) -> None:
    """The options every part-structured benchmark takes: --parts, --threads, --quick, --json,
    --ship and --merge."""
    parser.add_argument("--parts", default=",".join(parts))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--ship", default=None, help="copy the model into this folder with the run's numbers")
    parser.add_argument("--merge", action="append", default=[],
                        help="a --json file of an earlier run whose parts this run did not measure (for --ship)")


def merge_parts(results: dict, paths, parts) -> None:
    """Parts measured by earlier runs (their --json files) that ``results`` lacks."""
    for path in paths:
        for part, values in json.loads(Path(path).read_text(encoding="utf-8")).items():
            if part in parts and part not in results:
                results[part] = values


def training_seconds(out: Path) -> dict:
    """Wall seconds of each trainer run under a recipe's output folder (each run's own log.csv,
    its last elapsed_s) and, for a multiview recipe, the span of the fusion stacks' write times."""
    import csv

    seconds = {}
    for log in sorted(Path(out).rglob("log.csv")):
        with open(log, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and rows[-1].get("elapsed_s"):
            seconds[str(log.parent.relative_to(out))] = round(float(rows[-1]["elapsed_s"]), 1)
    stacks = sorted(p.stat().st_mtime for p in (Path(out) / "stacks").glob("*.npz"))
    if len(stacks) > 1:  # the first stack's own time is not counted
        seconds["stacks"] = round(stacks[-1] - stacks[0], 1)
    return seconds


def ship_card(card_path: Path, metrics: dict, folder: Path, quality: dict = None) -> Path:
    """Copy a model (weights unchanged, so their sha256 too) into ``folder`` with ``metrics`` in its
    card, the end-to-end ``quality`` summary (:func:`ct_part`) when given, and the training time
    read from the run folder the model was written into."""
    import shutil

    from TransferSegLib.io import atomic_output

    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    metrics = dict(metrics)
    if quality:
        metrics["heldout_clinical"] = dict(quality["summary"]["clinical"],
                                           protocol="end to end: file → pipeline.run → files, Dice on the input grid")
        metrics["heldout_native"] = quality["summary"]["native"]
    seconds = training_seconds(Path(card_path).parent.parent)
    if seconds:
        metrics["training_time"] = {"machine": "2-core CPU (shared with the benchmarks and tests), 2 threads",
                                    "cpu_minutes": round(sum(seconds.values()) / 60.0, 1), "parts_s": seconds}
    card["metrics"] = metrics
    folder = Path(folder)
    weights = Path(card_path).parent / card["weights"]["file"]
    with atomic_output(folder / weights.name) as tmp:
        shutil.copyfile(weights, tmp)
    target = folder / Path(card_path).name
    with atomic_output(target) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"shipped {target}")
    return target


# --- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.ship and ("dbt" not in parts or len(args.dbt_model) != 1):
        parser.error("--ship needs --parts with dbt and exactly one --dbt-model (the detector to ship)")
    import torch

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
