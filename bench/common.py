"""What the benchmarks share: their inputs, the held-out CT evaluation, their options and JSON
files, and shipping a measured model.

Run every bench script from the repository root as ``.venv/bin/python bench/NAME.py``: Python puts
the script's folder, bench/, first on the module path, so ``from common import ...`` finds this
file, and ``TransferSegLib`` comes from the editable install (``pip install -e .``).  Measuring a
process (memory, children, one end-to-end run in a fresh process) is in ``measure.py``.

Held-out data: CT phantoms from seed 5000 on clinical grids (:func:`ct_cases`: 512², 0.6–1.0 mm
pixels, 1–5 mm slices, stored as the phantom gives them, RAS-flipped, oblique or as sagittal
slices), the small native grid (seeds 5100+) and grids drawn as real scans vary (seeds 5400+,
:data:`VARIED`); the clinical-size speed inputs, CT seed 5200 and DBT seed 5300.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from TransferSegLib import pipeline
from TransferSegLib.io import atomic_output, image_on
from TransferSegLib.metrics import dice
from TransferSegLib.models import load_model
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.render import save_gallery_png
from TransferSegLib.resample import to_orientation
from TransferSegLib.volume import Volume

from measure import measure

ROOT = Path(__file__).resolve().parents[1]
# held-out phantoms drawn as real scans vary: the phantom options the default CT model trains with, read from its config
VARIED = json.loads((ROOT / "Resources" / "configs" / "ct-liver-tumor-unet3d.json").read_text(encoding="utf-8")
                    )["data"]["options"]
CT_STORAGE = ("as generated (LPS axial)", "RAS-flipped", "oblique", "sagittal")
# the clinical-size inputs of the speed runs: (seed, phantom options); tiny ones with --quick
SPEED_INPUTS = {"ct": (5200, {"shape": (100, 512, 512)}), "dbt": (5300, {"shape": (40, 1024, 768), "pixel_mm": 0.1})}
# clinical DBT reconstructions: a Hologic-sized one (232 M voxels) and a Siemens-sized one (505 M voxels)
DBT_SIZES = {"speed": SPEED_INPUTS["dbt"],
             "hologic": (5301, {"shape": (50, 2457, 1890), "pixel_mm": 0.1}),
             "siemens": (5302, {"shape": (50, 3584, 2816), "pixel_mm": 0.085})}
QUICK_SPEED_INPUTS = {"ct": (5200, {"shape": (20, 128, 128)}), "dbt": (5300, {"shape": (8, 256, 192), "pixel_mm": 0.4})}


def shape_text(shape) -> str:
    """``100×512×512``."""
    return "×".join(map(str, shape))


def grid_text(shape, spacing) -> str:
    """``100×512×512 (1.87×0.63×0.63 mm)``."""
    return f"{shape_text(shape)} ({'×'.join(f'{s:.2f}' for s in spacing)} mm)"


# --- options and JSON files ------------------------------------------------------------------
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


def selected_parts(text: str, parts) -> list:
    """The known parts named in ``--parts`` (``none``: only --merge and --ship)."""
    return [p for p in text.split(",") if p in parts]


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


def json_saver(results: dict, path):
    """``save()`` for a bench's ``--json PATH`` (a no-op without one): every number so far, rewritten."""
    def save():
        if path:
            write_json(path, results)
    return save


def merge_parts(results: dict, paths, parts) -> None:
    """Parts measured by earlier runs (their --json files) that ``results`` lacks."""
    for path in paths:
        for part, values in json.loads(Path(path).read_text(encoding="utf-8")).items():
            if part in parts and part not in results:
                results[part] = values


# --- inputs: phantoms written as files --------------------------------------------------------
def write_ct(volume, path: Path) -> Path:
    """A CT volume as int16 NIfTI (its HU are whole numbers), the geometry exact."""
    sitk.WriteImage(image_on(np.round(volume.array).astype(np.int16), volume), str(path), useCompression=True)
    return path


#: a DBT phantom's [0, 1] intensities as a detector's reconstruction stores them: 12-bit whole numbers
DBT_LEVELS = 4095


def phantom_file(kind: str, path: Path, seed: int, **options) -> tuple:
    """A ``ct_phantom`` (written as int16, gzip) or ``dbt_phantom`` written to ``path``:
    ``(volume, truth, path)``, truth being the label map or the lesion boxes.  A DBT goes to an
    uncompressed ``.nii`` of 12-bit values in uint16 (``path``'s ``.nii.gz`` becomes ``.nii``), the
    size and type of a vendor's 16-bit reconstruction (a 50 × 3584 × 2816 one is 1 GB)."""
    volume, truth = (ct_phantom if kind == "ct" else dbt_phantom)(seed, **options)
    if kind == "ct":
        return volume, truth, write_ct(volume, path)
    path = path.with_name(path.name.removesuffix(".gz"))
    sitk.WriteImage(image_on(np.round(volume.array * DBT_LEVELS).astype(np.uint16), volume), str(path),
                    useCompression=False)
    return volume, truth, path


def speed_input(kind: str, work: Path, quick: bool = False, name: str = None) -> tuple:
    """The speed runs' clinical-size input (:data:`SPEED_INPUTS`): a 512×512×100 CT (seed 5200,
    0.63 mm pixels, 1.87 mm slices) or a 40×1024×768 DBT at 0.1 mm (seed 5300), written into
    ``work``: ``(volume, truth, path)``."""
    seed, options = (QUICK_SPEED_INPUTS if quick else SPEED_INPUTS)[kind]
    return phantom_file(kind, work / f"{name or kind + '-speed'}.nii.gz", seed, **options)


def stored_as(volume, labels, storage: str):
    """The same phantom stored another way: flipped to RAS, oblique or as sagittal slices (exact)."""
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


def ct_cases(quick: bool) -> list:
    """(seed, shape, storage): clinical 512² grids with 1–5 mm slices, each storage three times."""
    if quick:
        return [(5000, (24, 128, 128), CT_STORAGE[0]), (5001, (20, 128, 128), "oblique")]
    slices = (40, 180, 64, 140, 96, 56, 160, 80, 120, 48, 110, 72)
    return [(5000 + n, (nk, 512, 512), CT_STORAGE[n % 4]) for n, nk in enumerate(slices)]


# --- written files read back -----------------------------------------------------------------
def file_header(path: Path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def grid_matches(input_path: Path, output_paths) -> dict:
    """Size, origin, spacing and direction of each written file against the input file's (SimpleITK)."""
    ref = file_header(input_path)
    worst, same = 0.0, True
    for path in output_paths:
        out = file_header(path)
        same &= out.GetDimension() == ref.GetDimension() == 3 and out.GetSize() == ref.GetSize()
        for a, b in ((out.GetOrigin(), ref.GetOrigin()), (out.GetSpacing(), ref.GetSpacing()),
                     (out.GetDirection(), ref.GetDirection())):
            worst = max(worst, float(np.max(np.abs(np.subtract(a, b)))) if len(a) == len(b) else np.inf)
    return {"same_grid": bool(same and worst < 1e-4), "max_geometry_difference": worst}


def spacing_kji(path: Path) -> list:
    return list(reversed(file_header(path).GetSpacing()))  # (k, j, i)


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- Dice: liver per case, tumor pooled over cases ----------------------------------------------
def liver_and_tumor(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Liver Dice (labels 1 ∪ 2) of one case, and its share of the global tumor Dice (label 2):
    twice the overlap and the voxels predicted plus true, to be pooled by :func:`pooled_tumor_dice`."""
    tumor, true_tumor = predicted == 2, truth == 2
    return {"liver": float(dice(predicted > 0, truth > 0)), "tumor_overlap2": 2 * int((tumor & true_tumor).sum()),
            "tumor_voxels": int(tumor.sum() + true_tumor.sum())}


def pooled_tumor_dice(scores) -> float:
    """The global tumor Dice of the cases' :func:`liver_and_tumor` scores."""
    scores = list(scores)
    return sum(s["tumor_overlap2"] for s in scores) / max(sum(s["tumor_voxels"] for s in scores), 1)


def dice_summary(rows: list, names) -> dict:
    """Per name: liver Dice mean and worst over the rows, tumor Dice pooled over them (global)."""
    summary = {}
    for name in names:
        liver = [r["dice"][name]["liver"] for r in rows]
        summary[name] = {"liver_dice_mean": float(np.mean(liver)), "liver_dice_worst": float(np.min(liver)),
                         "tumor_dice_global": pooled_tumor_dice(r["dice"][name] for r in rows)}
    return summary


def print_dice_table(summary: dict, column: str, cell) -> None:
    """The summary as a table, with one more column ``column`` whose text is ``cell(entry)``."""
    width = max(14, *(len(name) for name in summary))
    print(f"\n  {'':<{width}} {'liver Dice mean':>16} {'worst':>7} {'tumor Dice (global)':>20} {column:>14}")
    for name, s in summary.items():
        print(f"  {name:<{width}} {s['liver_dice_mean']:>16.3f} {s['liver_dice_worst']:>7.3f} "
              f"{s['tumor_dice_global']:>20.3f} {cell(s):>14}", flush=True)


# --- held-out CT end to end: a fresh process per case ---------------------------------------------
def ct_part(model, work: Path, threads: int, quick: bool, out: dict, save=lambda: None) -> dict:
    """The CT accuracy runs into ``out`` (``save()`` after each case): the clinical grids of
    :func:`ct_cases`, the native grid and the varied grids, each file → ``pipeline.run`` → files
    in a fresh process (:func:`measure.measure`), Dice and the written grid checked on the input grid."""
    rows = out.setdefault("cases", [])
    out["model"] = str(model)
    grids = {"clinical": ct_cases(quick), "native": [(5100 + n, None, CT_STORAGE[0]) for n in range(1 if quick else 5)],
             "varied": [(5400 + n, (nk, 512, 512), CT_STORAGE[0])
                        for n, nk in enumerate((60, 100, 150, 80, 120, 48, 90, 200)[:1 if quick else 8])]}
    for grid, cases in grids.items():
        for seed, shape, storage in cases:
            rows.append(_ct_case(model, work, threads, grid, seed, shape, storage))
            save()
    summary = {}
    for grid in grids:
        part = [r for r in rows if r["grid"] == grid]
        worst = min(part, key=lambda r: r["liver_dice"])
        summary[grid] = {"cases": len(part), "liver_dice_mean": float(np.mean([r["liver_dice"] for r in part])),
                         "liver_dice_worst": {"seed": worst["seed"], "storage": worst["storage"],
                                              "dice": worst["liver_dice"]},
                         "tumor_dice_global": pooled_tumor_dice(part),
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


def _ct_case(model, work: Path, threads: int, grid: str, seed: int, shape, storage: str) -> dict:
    """One held-out CT phantom written to a file and segmented end to end: its row of :func:`ct_part`."""
    volume, labels = ct_phantom(seed, shape=shape, **(VARIED if grid == "varied" else {}))
    volume, labels = stored_as(volume, labels, storage)
    path = write_ct(volume, work / f"ct-{seed}.nii.gz")
    del volume
    folder = work / f"ct-{seed}-out"
    run = measure(path, model, folder, threads)
    scores = liver_and_tumor(read_labels(folder / "labelmap.nii.gz"), labels)
    row = {"grid": grid, "seed": seed, "shape": run["shape"], "storage": storage,
           "spacing_mm": spacing_kji(path),
           "liver_dice": scores["liver"], "tumor_overlap2": scores["tumor_overlap2"],
           "tumor_voxels": scores["tumor_voxels"],
           "seconds": run["seconds"], "peak_rss_gib": run["peak_rss_gib"],
           **grid_matches(path, [folder / "labelmap.nii.gz", folder / "segmentation.seg.nrrd"])}
    print(f"  {grid:<8} seed {seed} {shape_text(row['shape']):>12} "
          f"{'×'.join(f'{s:.2f}' for s in row['spacing_mm'])} mm  {storage:<24} liver Dice "
          f"{row['liver_dice']:.3f}  tumor voxels {row['tumor_voxels']:>7}  same grid {row['same_grid']}  "
          f"{row['seconds']:5.1f} s  {row['peak_rss_gib']:.2f} GiB", flush=True)
    path.unlink()
    shutil.rmtree(folder)
    return row


def quality_part(model, work: Path, threads: int, quick: bool, results: dict, save=lambda: None) -> dict:
    """A model's ``quality`` part: :func:`ct_part` into ``results["quality"]``, under its heading."""
    print("\nquality end to end (fresh process per case, Dice on the input grid):", flush=True)
    return ct_part(model, work, threads, quick, results.setdefault("quality", {}), save)


def ct100_side_by_side(models: dict, threads: int, quick: bool, work: Path, out: dict, save=lambda: None) -> tuple:
    """The 512×512×100 CT of :func:`speed_input` end to end in a fresh process per model
    ({name: model}), each into ``out[name]``; returns ``(volume, path of the CT file)``."""
    volume, _, path = speed_input("ct", work, quick, name="ct100")
    for name, which in models.items():
        run = measure(path, which, work / f"out-{name}", threads)
        out[name] = {k: run[k] for k in ("seconds", "peak_rss_gib", "timings_s", "shape")}
        print(f"  CT {grid_text(volume.shape, volume.spacing)}, {name:<10} {run['seconds']:6.1f} s  "
              f"peak RSS {run['peak_rss_gib']:.2f} GiB  stages: "
              + ", ".join(f"{k} {v:.1f}" for k, v in run["timings_s"].items()), flush=True)
        save()
    return volume, path


# --- held-out CT in this process: several models side by side --------------------------------------
def compare_part(models: dict, threads: int, quick: bool, count: int, out: dict, save=lambda: None,
                 extra=None, figure=None) -> dict:
    """Several models ({row name: model}) on the first ``count`` clinical grids of :func:`ct_cases`,
    in this process (each model loaded once, the same pipeline for all), Dice on the input grid:
    liver (1 ∪ 2) per case, tumor (2) global, and seconds per volume.  ``extra(name, model,
    result)`` may give more {row name: labels} from the same run (e.g. another threshold).
    ``figure``: a PNG of the first case, the truth and each model's labels, one row each."""
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
                row["dice"][key] = liver_and_tumor(predicted, labels)
            if figure and not rows:
                if name == next(iter(loaded)):
                    panels = [dict(volume=volume, labels=labels, title=f"truth (seed {seed}, {storage})")]
                panels.append(dict(volume=volume, labels=result.labels,
                                   title=f"{name}: liver Dice {row['dice'][name]['liver']:.3f}"))
        if figure and not rows:
            focus = tuple(int(v) for v in np.argwhere(labels == 2).mean(0)) if (labels == 2).any() else None
            save_gallery_png([dict(p, focus=focus) for p in panels], figure)
        rows.append(row)
        save()
        print(f"  seed {seed} {shape_text(row['shape']):>12} {storage:<24} " + "  ".join(
            f"{name} {row['dice'][name]['liver']:.3f} ({row['seconds'][name]:.1f} s)" for name in loaded), flush=True)
    summary = dice_summary(rows, rows[0]["dice"])
    for name in loaded:
        summary[name]["seconds_mean"] = float(np.mean([r["seconds"][name] for r in rows]))
    out["summary"] = summary
    save()
    print_dice_table(summary, "s / volume", lambda s: f"{s['seconds_mean']:.1f}" if "seconds_mean" in s else "")
    return out


# --- DBT detection --------------------------------------------------------------------------------
def evaluation_model(model):
    """``model`` loaded, its card's peaks made the FROC's: every local maximum (threshold 0), at
    most 50 per volume, the card's ``min_distance`` (working voxels)."""
    loaded = load_model(model)
    distance = (loaded.card.get("peaks") or {}).get("min_distance", [2, 8, 8])
    peaks = {"threshold": 0.0, "min_distance": list(distance), "max_peaks": 50}
    return dataclasses.replace(loaded, card=dict(loaded.card, peaks=peaks))


# --- shipping a measured model --------------------------------------------------------------------
def heldout_protocol(cases: int, how: str) -> str:
    """The card's protocol line for a comparison on the first ``cases`` of :func:`ct_cases`."""
    return (f"{cases} held-out 512² phantoms (seeds from 5000, 0.6–1.0 mm pixels, 1–5 mm slices, stored LPS axial, "
            f"RAS-flipped, oblique or sagittal); {how}; Dice on the input grid: liver (1 ∪ 2) per case, tumor (2) "
            "global")


def repo_relative(path) -> str:
    """A local path as a shipped card may hold it: relative to the repository, or its last name outside it."""
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def training_seconds(out: Path) -> dict:
    """Wall seconds of each trainer run under a recipe's output folder (each run's own log.csv,
    its last elapsed_s) and, for a multiview recipe, the span of the fusion stacks' write times."""
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
    """Copy a model (weights unchanged, so their sha256 too) into ``folder`` with ``metrics`` added
    to its card's, the end-to-end ``quality`` summary (:func:`ct_part`) when given, and the training
    time read from the run folder the model was written into."""
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    metrics = {**(card.get("metrics") or {}), **metrics}
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
