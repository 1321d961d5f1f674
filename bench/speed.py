"""Speed of every shipped model on a clinical-size phantom, one table (a benchmark run by hand, not a test).

Which models: every card that ``TransferSegLib.models.list_models()`` finds in the shipped model
folders (``Resources/models``), so a newly shipped model is measured without editing this
script; ``--models NAME …`` picks some (any installed model, user models included).  A card's
method (single, multiview, cascade) makes no difference here: every model runs through
``pipeline.run`` as the product runs it.

Inputs: the clinical-size phantoms of ``bench/common.py`` (``speed_input``), written to disk
beforehand: a segmentation model gets the 100×512×512 CT (``ct_phantom(5200)``: 0.63 mm pixels,
1.87 mm slices; int16 NIfTI) and ``transferseg segment``; a detection model (card task
``heatmap``) gets the 40×1024×768 DBT at 0.1 mm pixels, 1 mm slices (``dbt_phantom(5300)``;
float32 NIfTI) and ``transferseg detect``.  Shapes are written k × j × i (slices × rows ×
columns), spacings likewise.

What is timed, each in a fresh process (``measure.measure``: read the file, ``pipeline.run``
with the model's card, ``Result.write``):

* load s: the model load from disk inside ``pipeline.run`` (card, sha256, networks built,
  weights loaded strictly: its ``timings["load_model"]``);
* segment s: the rest of ``pipeline.run`` (to the working spacing, the card's method, back to
  the input grid, labels and post-processing, or the heatmap's peaks);
* write s: ``Result.write`` (every output file, atomically);
* end-to-end s: a whole ``transferseg segment|detect`` process (interpreter start, imports,
  reading the file, the run, the files), timed from outside; with ``--no-cli``, the measuring
  process's read + load + segment + write instead;
* peak RSS: the measuring process's own VmHWM (a fresh process per model and repeat, so peaks
  of different models never mix with each other or with this script's);
* native: the same model on the same phantom seed generated directly on the model's working
  grid (``working_spacing_mm``; the same field of view), an input the pipeline need not
  resample.  clinical/native is segment s on the clinical input ÷ segment s on the native one:
  what the clinical grid still costs when the model works at its working spacing (resampling
  there and back, labels at full size).  Beside it, the clinical input's voxels ÷ the working
  grid's: roughly what the networks would cost more if they ran on the clinical grid itself.
* GPU segment s (with ``--device cuda``): segment s with ``pipeline.run`` on the GPU, the CUDA
  context made before the clock starts; the CPU columns stay on the CPU.

Each time is the best of ``--repeat`` runs (the run least disturbed by other work on the
cores), peak RSS the largest; a repeat runs the clinical input, the CLI and the native input in
turn, so that every column samples the same spells of load.  Goals, end to end on 2 CPU cores:
CT < 90 s, DBT < 60 s; on a GPU, segment < 5 s.  ``--threads`` sets torch's CPU threads and
OMP_NUM_THREADS in every process (default 2).  ``--json PATH`` writes every number, each run
included.

    OMP_NUM_THREADS=2 .venv/bin/python bench/speed.py --repeat 3 --json runs/speed.json  # about 8 minutes a repeat
    .venv/bin/python bench/speed.py --models ct-liver-tumor-vfn dbt-lesion-ahnet --repeat 3
    .venv/bin/python bench/speed.py --device cuda --json runs/speed-gpu.json
    .venv/bin/python bench/speed.py --models dbt-lesion-ahnet --dbt-size hologic   # a clinical DBT (also: siemens)
    .venv/bin/python bench/speed.py --quick      # tiny inputs: a smoke test of the script, not a result
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from TransferSegLib.models import list_models, method_of, model_dirs
from TransferSegLib.resample import grid_shape

from common import (DBT_SIZES, QUICK_SPEED_INPUTS, SPEED_INPUTS, file_header, grid_text, json_saver, phantom_file,
                    speed_input)
from measure import measure

GOALS_S = {"ct": 90.0, "dbt": 60.0}  # end to end on 2 CPU cores
GPU_GOAL_S = 5.0  # segment s on a GPU
KINDS = {"ct": ("CT", "segment"), "dbt": ("DBT", "detect")}  # phantom kind: (name, transferseg command)


def kind_of(card: dict) -> str:
    """The phantom a model is measured on: DBT for a detector (heatmap task), CT otherwise."""
    return "dbt" if card.get("task") == "heatmap" else "ct"


def machine(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": metadata.version("torch"), "threads": threads,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": list(os.getloadavg()),
           "python": platform.python_version()}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else None
    return out


def shipped_cards(names) -> list:
    """The cards to measure: those named (any installed model), else every shipped one."""
    cards = list_models()
    if names:
        by_name = {card["name"]: card for card in cards}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise SystemExit(f"speed.py: no installed model named {', '.join(unknown)}; "
                             f"installed: {', '.join(sorted(by_name))}")
        return [by_name[name] for name in names]
    shipped = [folder.resolve() for folder in model_dirs()[1:]]  # model_dirs()[0] is the user folder
    return [card for card in cards if Path(card["_path"]).resolve().parent in shipped]


def transferseg_command() -> list:
    """The installed ``transferseg`` command beside this interpreter, else the CLI module."""
    script = Path(sys.executable).parent / "transferseg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "TransferSegLib.cli"]


def cli_run(kind: str, input_path: Path, card_path: str, output: Path, threads: int) -> dict:
    """A whole ``transferseg segment|detect`` process on the CPU, timed from outside: its seconds
    and the stage times it prints."""
    command = transferseg_command() + [KINDS[kind][1], str(input_path), "-o", str(output), "--model", card_path,
                                       "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    stages = next((line for line in done.stdout.splitlines() if line.startswith("device:")), "")
    return {"seconds": seconds, "stages": stages}


def best(runs: list) -> dict:
    """Each time the best of the runs (:func:`measure.end_to_end`'s numbers), peak RSS the largest."""
    out = {"load_s": min(r["timings_s"]["load_model"] for r in runs),
           "segment_s": min(r["run_s"] - r["timings_s"]["load_model"] for r in runs),
           "write_s": min(r["write_s"] for r in runs), "read_input_s": min(r["load_input_s"] for r in runs),
           "in_process_s": min(r["seconds"] for r in runs),
           "peak_rss_gib": float(max(r["peak_rss_gib"] for r in runs))}
    if "gpu_peak_gib" in runs[0]:
        out["gpu_peak_gib"] = float(max(r["gpu_peak_gib"] for r in runs))
    return out


class Inputs:
    """The phantom files, each made once: the clinical-size input per kind, and the same seed on
    each working grid asked for (``native``)."""

    def __init__(self, work: Path, quick: bool, dbt_size: str = "speed"):
        self.work, self.quick, self.made = work, quick, {}
        self.names = {"ct": "ct-speed", "dbt": f"dbt-{dbt_size}" + ("-quick" if quick else "")}

    def clinical(self, kind: str) -> dict:
        if kind not in self.made:
            start = time.perf_counter()
            made = sorted(self.work.glob(f"{self.names[kind]}.nii*"))
            if made:  # made by an earlier run into the same --work folder: a clinical DBT takes minutes to draw
                header = file_header(made[0])
                shape, spacing = list(header.GetSize())[::-1], list(header.GetSpacing())[::-1]
                print(f"  reused the {KINDS[kind][0]} input {made[0]}", flush=True)
            else:
                volume, _, path = speed_input(kind, self.work, self.quick, name=self.names[kind])
                made, shape, spacing = [path], list(volume.shape), list(volume.spacing)
                print(f"  made the {KINDS[kind][0]} input {grid_text(shape, spacing)} in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            self.made[kind] = {"path": made[0], "shape": shape, "spacing_mm": spacing}
        return self.made[kind]

    def native(self, kind: str, spacing) -> dict:
        """The clinical input's phantom seed with its field of view on ``spacing``, or None when
        the clinical input already lies on that grid (nothing to resample)."""
        clinical = self.clinical(kind)
        shape = grid_shape(clinical["shape"], clinical["spacing_mm"], spacing)
        if list(shape) == clinical["shape"]:
            return None
        key = (kind, tuple(shape), tuple(spacing))
        if key not in self.made:
            seed, options = (QUICK_SPEED_INPUTS if self.quick else SPEED_INPUTS)[kind]
            options = dict(options, shape=shape)
            if kind == "dbt":  # the DBT phantom's field of view is its shape times its spacing
                options.update(pixel_mm=float(spacing[1]), slice_mm=float(spacing[0]))
            path = self.work / f"{kind}-native-{len(self.made)}.nii.gz"
            volume, _, path = phantom_file(kind, path, seed, **options)
            resampled = tuple(grid_shape(volume.shape, volume.spacing, spacing)) != tuple(volume.shape)
            self.made[key] = {"path": path, "shape": list(volume.shape), "spacing_mm": list(volume.spacing),
                              "resampled_by_the_pipeline": resampled}
        return self.made[key]


def measure_model(card: dict, inputs: Inputs, args, work: Path) -> dict:
    """Every number of one model, each run in a fresh process.  A repeat runs the clinical input,
    the CLI, the native input (and the GPU) in turn, so that every column samples the same spells
    of load on shared cores."""
    name, card_path, kind = card["name"], card["_path"], kind_of(card)
    clinical = inputs.clinical(kind)
    spacing = card.get("working_spacing_mm")
    native = inputs.native(kind, spacing) if spacing else None
    gpu = args.device.startswith("cuda")
    out = {"card": card_path, "version": card.get("version"), "weights_sha256": card["weights"].get("sha256"),
           "method": method_of(card)["name"], "task": card.get("task", "segmentation"),
           "kind": kind, "input": {k: clinical[k] for k in ("shape", "spacing_mm")}, "working_spacing_mm": spacing}
    runs = {"clinical": [], "cli": [], "native": [], "gpu": []}
    for n in range(args.repeat):
        run = measure(clinical["path"], card_path, work / f"out-{name}", args.threads)
        runs["clinical"].append(run)
        print(f"  {name} [{n + 1}/{args.repeat}]: load {run['timings_s']['load_model']:.1f} s, segment "
              f"{run['run_s'] - run['timings_s']['load_model']:.1f} s, write {run['write_s']:.1f} s, peak RSS "
              f"{run['peak_rss_gib']:.2f} GiB; stages: "
              + ", ".join(f"{k} {v:.1f}" for k, v in run["timings_s"].items()), flush=True)
        if not args.no_cli:
            runs["cli"].append(cli_run(kind, clinical["path"], card_path, work / f"cli-{name}", args.threads))
            print(f"  {name} [{n + 1}/{args.repeat}]: transferseg {KINDS[kind][1]} end to end "
                  f"{runs['cli'][-1]['seconds']:.1f} s ({runs['cli'][-1]['stages']})", flush=True)
        if native is not None:
            runs["native"].append(measure(native["path"], card_path, work / f"native-{name}", args.threads))
            run = runs["native"][-1]
            print(f"  {name} [{n + 1}/{args.repeat}]: native {grid_text(native['shape'], native['spacing_mm'])}: "
                  f"segment {run['run_s'] - run['timings_s']['load_model']:.1f} s", flush=True)
        if gpu:
            runs["gpu"].append(measure(clinical["path"], card_path, work / f"gpu-{name}", args.threads,
                                       device=args.device))
            run = runs["gpu"][-1]
            print(f"  {name} [{n + 1}/{args.repeat}]: on {run['device']} segment "
                  f"{run['run_s'] - run['timings_s']['load_model']:.2f} s", flush=True)

    b = best(runs["clinical"])
    out["clinical"] = {"best": b, "runs": runs["clinical"]}
    if args.no_cli:
        out["end_to_end"] = {"how": "in-process: read + load + segment + write", "seconds": b["in_process_s"]}
    else:
        out["end_to_end"] = {"how": f"a whole `transferseg {KINDS[kind][1]}` process",
                             "seconds": min(r["seconds"] for r in runs["cli"]), "runs": runs["cli"]}
    out["goal_s"] = GOALS_S[kind]
    out["pass"] = out["end_to_end"]["seconds"] < GOALS_S[kind]
    if native is None:
        out["native"] = {"what": "n/a: " + ("no working spacing (never resampled)" if not spacing
                                            else "the input lies on the working grid")}
    else:
        nb = best(runs["native"])
        out["native"] = {"input": {k: native[k] for k in ("shape", "spacing_mm", "resampled_by_the_pipeline")},
                         "best": nb, "runs": runs["native"],
                         "ratio_segment_s": b["segment_s"] / nb["segment_s"],
                         "ratio_peak_rss": b["peak_rss_gib"] / nb["peak_rss_gib"],
                         "ratio_voxels": float(np.prod(clinical["shape"]) / np.prod(native["shape"]))}
    if gpu:
        out["gpu"] = {"best": best(runs["gpu"]), "runs": runs["gpu"], "device": runs["gpu"][0]["device"],
                      "goal_s": GPU_GOAL_S}
        out["gpu"]["pass"] = out["gpu"]["best"]["segment_s"] < GPU_GOAL_S
    for path in work.glob(f"*-{name}"):
        shutil.rmtree(path, ignore_errors=True)
    return out


def table(results: dict) -> list:
    """The results as Markdown table lines (also readable as printed)."""
    gpu = any("gpu" in r for r in results["models"].values())
    head = ["model", "method", "input (k×j×i)", "load s", "segment s", "write s", "end-to-end s", "goal",
            "peak RSS GiB", "native grid", "native segment s", "clinical/native"]
    if gpu:
        head += ["GPU segment s", "GPU goal"]
    rows = []
    for name, r in results["models"].items():
        if "error" in r:
            rows.append([name, r["method"], "failed (the error is printed above and in --json)"]
                        + [""] * (len(head) - 3))
            continue
        b, native = r["clinical"]["best"], r["native"]
        kind = KINDS[r["kind"]][0]
        row = [name, r["method"], f"{kind} {grid_text(r['input']['shape'], r['input']['spacing_mm'])}",
               f"{b['load_s']:.1f}", f"{b['segment_s']:.1f}", f"{b['write_s']:.1f}",
               f"{r['end_to_end']['seconds']:.1f}", f"< {r['goal_s']:.0f} s: {'pass' if r['pass'] else 'FAIL'}",
               f"{b['peak_rss_gib']:.2f}"]
        if "best" in native:
            voxels = native["ratio_voxels"]
            row += [grid_text(native["input"]["shape"], native["input"]["spacing_mm"])
                    + (" (not on it: resampled)" if native["input"]["resampled_by_the_pipeline"] else ""),
                    f"{native['best']['segment_s']:.1f}",
                    f"{native['ratio_segment_s']:.2f}× (voxels {voxels:.{0 if voxels >= 10 else 1}f}×)"]
        else:
            row += ["—", "—", native["what"]]
        if gpu:
            g = r.get("gpu")
            row += [f"{g['best']['segment_s']:.2f}", f"< {GPU_GOAL_S:.0f} s: {'pass' if g['pass'] else 'FAIL'}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these models (default: every shipped one)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N to add a GPU column (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is reported (default 1)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--no-cli", action="store_true",
                        help="end to end = read + load + segment + write in the measuring process, no CLI run")
    parser.add_argument("--quick", action="store_true", help="tiny inputs: a smoke test of the script, not a result")
    parser.add_argument("--dbt-size", choices=tuple(DBT_SIZES), default="speed",
                        help="the DBT input: speed (40×1024×768 at 0.1 mm, default), hologic (50×2457×1890 at 0.1 mm) "
                        "or siemens (50×3584×2816 at 0.085 mm)")
    parser.add_argument("--work", type=Path, help="folder for inputs and outputs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be at least 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N; got {args.device!r}")
    SPEED_INPUTS["dbt"] = DBT_SIZES[args.dbt_size]  # the DBT input every detection model gets
    cards = shipped_cards(args.models)
    if not cards:
        parser.error("no models found")
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="speed-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine(args.threads, args.device), "repeat": args.repeat, "device": args.device,
               "goals": {"ct_end_to_end_s": GOALS_S["ct"], "dbt_end_to_end_s": GOALS_S["dbt"],
                         "gpu_segment_s": GPU_GOAL_S}, "models": {}}
    m = results["machine"]
    print(f"speed of every model{' — QUICK: a smoke test, not a result' if args.quick else ''}", flush=True)
    print(f"machine: {m['cpu']}, {m['cores']} cores (load average {m['load_average_at_start'][0]:.1f} at start), "
          f"torch {m['torch']}, {args.threads} thread(s) (OMP_NUM_THREADS={m['omp_num_threads']})"
          + (f", GPU {m.get('gpu')}" if "gpu" in m else ""), flush=True)
    print(f"models: {', '.join(card['name'] for card in cards)}; work folder {work}", flush=True)

    save = json_saver(results, args.json)

    inputs = Inputs(work, args.quick, args.dbt_size)
    for card in cards:
        try:
            results["models"][card["name"]] = measure_model(card, inputs, args, work)
        except RuntimeError as error:  # one model failing still leaves the others' numbers
            print(f"  {card['name']}: FAILED\n{error}", flush=True)
            results["models"][card["name"]] = {"error": str(error), "method": method_of(card)["name"]}
        save()
    results["total_seconds"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    save()
    print(f"\nEach time is the best of {args.repeat} run(s) in fresh processes; peak RSS is the measuring "
          "process's own (VmHWM).")
    print("load s: model load from disk; segment s: the rest of pipeline.run; write s: Result.write; "
          "end-to-end s: " + ("read + load + segment + write in one process." if args.no_cli else
                              "a whole `transferseg segment|detect` process, timed from outside."))
    print(f"goal: end to end on {args.threads} CPU thread(s), CT < {GOALS_S['ct']:.0f} s, DBT < {GOALS_S['dbt']:.0f} s"
          + (f"; GPU segment < {GPU_GOAL_S:.0f} s." if args.device.startswith("cuda") else "."))
    print("native grid: the same phantom seed generated on the model's working spacing, which the pipeline runs "
          "without resampling.\nclinical/native: segment s on the clinical input ÷ on the native one, i.e. what the "
          "clinical grid still costs with the working spacing (resampling there and back, full-size labels); "
          "voxels: the clinical input's ÷ the working grid's, roughly what the networks would cost more "
          "on the clinical grid itself.\n")
    for text in table(results):
        print(text)
    print(f"\ndone in {results['total_seconds']:.0f} s (load average {os.getloadavg()[0]:.1f} at the end)"
          + (f"; numbers in {args.json}" if args.json else ""))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
