"""The main job end to end on phantoms, scored against their truth: ``transferseg demo`` and ``make demo``.

:func:`run_demo` makes a CT phantom on a clinical grid and a handful of DBT phantoms at their
default grid, runs the shipped models on them through :func:`~TransferSegLib.pipeline.run`
(the default CT model, the multi-view VFN model with its per-view predictions and their
disagreement, the default DBT detector), scores them against the phantoms' own truth
(:func:`~TransferSegLib.metrics.dice`, :func:`~TransferSegLib.metrics.froc`), writes every
result and picture under one folder, a subfolder per step, and returns a summary;
:func:`format_summary` is the table the command prints.  A shipped model that is missing is
reported in one line and its step skipped.

The tests run the same function on smaller grids (``ct_shape``, ``dbt_shape``, ``dbt_volumes``).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .atomic import atomic_output, check_output_folder
from .heatmaps import find_peaks
from .io import save_labelmap, save_volume
from .metrics import FROC_RATES, dice, froc
from .models import DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, LoadedModel, find_model, load_model
from .phantoms import CT_LABEL_NAMES, ct_phantom, dbt_phantom
from .pipeline import VIEW_NAMES, run
from .progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from .render import (save_detections_png, save_froc_png, save_overview_png, save_scalar_overlay_png,
                     save_views_side_by_side_png)
from .volume import TransferSegError

__all__ = ["DEMO_CT_SHAPE", "DEMO_DBT_VOLUMES", "DEMO_MODELS", "format_summary", "run_demo"]

# The phantom's z coverage is fixed (165–200 mm), so 72 slices give 2.6 mm slices; with seed 0
# the field of view makes 0.78 mm pixels: a clinical abdominal CT grid.
DEMO_CT_SHAPE = (72, 512, 512)
DEMO_DBT_VOLUMES = 8
DEMO_MODELS = {"ct-unet3d": DEFAULT_SEGMENTATION_MODEL, "ct-vfn": "ct-liver-tumor-vfn",
               "dbt-ahnet": DEFAULT_DETECTION_MODEL}
# The FROC sweeps every local maximum of the heatmap (the card's peak spacing, threshold 0), as
# the shipped detector's held-out FROC was measured; the default threshold is one point of it.
FROC_MAX_PEAKS = 50
DISAGREEMENT_SHOWN_FROM = 0.1  # below it the views' soft probabilities differ a little nearly everywhere
_LAYOUT = {
    "ct": "the CT phantom (ct.nii.gz, HU), its truth (truth.nii.gz: 1 liver, 2 liver tumor) and truth.png",
    "ct-unet3d": "the default CT model's result, as `transferseg segment` writes it",
    "ct-vfn": "the multi-view model's result (+ views/, disagreement.nii.gz), views-side-by-side.png, "
              "disagreement.png",
    "dbt": "the DBT phantom (dbt.nii.gz) and its lesions (lesions.json)",
    "dbt-ahnet": "the detector's result, as `transferseg detect` writes it, and detections.png",
    "froc": "froc.json and froc.png over every DBT phantom",
}


def _peak_defaults() -> dict:
    """find_peaks' own defaults, for a card whose ``peaks`` leaves one out."""
    parameters = inspect.signature(find_peaks).parameters
    return {name: parameters[name].default for name in ("threshold", "min_distance", "max_peaks")}


def _dice_pair(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Liver including tumor (labels ≥ 1) and tumor (label 2) Dice against the phantom's truth."""
    return {"liver": float(dice(labels >= 1, truth >= 1)), "tumor": float(dice(labels == 2, truth == 2))}


def _operating_point(detections_per_volume, boxes_per_volume) -> dict:
    """Lesions found and false positives of a fixed set of detections, counted by :func:`metrics.froc`."""
    curve = froc(detections_per_volume, boxes_per_volume)
    volumes, lesions = curve["volumes"], curve["lesions"]
    return {"found": int(round(curve["tpr"][-1] * lesions)), "lesions": lesions,
            "false_positives": int(round(curve["fp_per_volume"][-1] * volumes)),
            "fp_per_volume": curve["fp_per_volume"][-1], "tpr": curve["tpr"][-1], "volumes": volumes}


def _focus(truth: np.ndarray, labels: np.ndarray) -> Optional[list]:
    """The voxel the CT pictures pass through: the middle of the largest cross-section of the true
    tumors (where the views differ most visibly), else the segmentation's centre, else None."""
    tumor = truth == 2
    if tumor.any():
        k = int(np.argmax(np.count_nonzero(tumor, axis=(1, 2))))
        j, i = np.argwhere(tumor[k]).mean(axis=0)
        return [k, int(round(j)), int(round(i))]
    if labels.any():
        return [int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0)]
    return None


def _write_json(path: Path, data) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


class _Demo:
    """One run: the output folder, the files written, the step times and the log."""

    def __init__(self, out: Path, log: Optional[Callable[[str], None]]):
        self.out, self.log = out, log or (lambda line: None)
        self.files, self.steps, self.rows = [], {}, []

    def wrote(self, *paths) -> None:
        self.files += [Path(p).relative_to(self.out).as_posix() for p in paths]

    def model_or_skip(self, step: str, name: str) -> Optional[str]:
        """The model's name when it is installed; else one line said and a skipped row in the table."""
        try:
            find_model(name)
        except TransferSegError as e:
            self.rows.append({"step": step, "model": str(name), "task": None, "skipped": str(e)})
            self.log(f"{step}: model {name} is not installed; step skipped (`transferseg models` lists what is)")
            return None
        return name

    def done(self, step: str, start: float, what: str) -> None:
        self.steps[step] = time.perf_counter() - start
        self.log(f"{step:<10} {self.steps[step]:6.1f} s  {what}")


def run_demo(output_dir, seed: int = 0, device: str = "auto", progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, *, ct_shape=DEMO_CT_SHAPE, dbt_shape=None,
             dbt_volumes: int = DEMO_DBT_VOLUMES, models: Optional[dict] = None,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the demo into ``output_dir`` and return its summary (also written as summary.json / .txt).

    Steps, each into its own subfolder: ``ct`` (a CT phantom, ``ct_phantom(seed, ct_shape)``),
    ``ct-unet3d`` and ``ct-vfn`` (the CT segmented by each model; Dice of liver including tumor
    and of tumor against the truth; for the multi-view model also each view network's Dice, a
    side-by-side picture of the view networks' label maps and a picture of their disagreement),
    ``dbt`` (``dbt_phantom(seed, dbt_shape)``), ``dbt-ahnet`` (its detections at the detector's
    default threshold, drawn over the heatmap with the true lesions) and ``froc`` (the detector on
    ``dbt_volumes`` DBT phantoms, seeds ``seed``…, the first being the ``dbt`` one: the FROC
    curve over every heatmap peak and the default threshold's lesions found and false positives).

    Args:
        ct_shape, dbt_shape: the phantoms' grids (default: 512×512×72 CT at about 0.8 × 0.8 ×
            2.6 mm; the DBT phantom's default grid).
        models: {step: model name or path} replacing :data:`DEMO_MODELS` entries.
        log: ``callable(line)`` told when each step is done (and when one is skipped).

    A model that is not installed skips its step (said through ``log`` and in the summary's
    ``skipped``); the phantoms are always made.
    """
    out = check_output_folder(output_dir)
    if isinstance(dbt_volumes, bool) or int(dbt_volumes) != dbt_volumes or dbt_volumes < 1:
        raise TransferSegError(f"dbt_volumes must be a whole number ≥ 1; got {dbt_volumes!r}")
    chosen = dict(DEMO_MODELS, **(models or {}))
    unknown = sorted(set(chosen) - set(DEMO_MODELS))
    if unknown:
        raise TransferSegError(f"the demo's models are {', '.join(DEMO_MODELS)}; got {', '.join(unknown)}")
    demo = _Demo(out, log)
    report = StageProgress(progress)
    started = time.perf_counter()
    rows = demo.rows

    ct, truth, ct_path, ct_info = _ct_step(demo, seed, ct_shape, report.sub(0.0, 0.12))
    check_cancel(cancel)
    for step, span in (("ct-unet3d", (0.12, 0.3)), ("ct-vfn", (0.3, 0.6))):
        name = demo.model_or_skip(step, chosen[step])
        if name is not None:
            rows.append(_segment_step(demo, step, name, ct, truth, ct_path, device, report.sub(*span), cancel))
        check_cancel(cancel)
    del ct, truth

    dbt, lesions, dbt_path = _dbt_step(demo, seed, dbt_shape, report.sub(0.6, 0.64))
    check_cancel(cancel)
    name = demo.model_or_skip("dbt-ahnet", chosen["dbt-ahnet"])
    if name is None:
        rows.append(dict(rows[-1], step="froc"))  # the FROC needs the detector too
    else:
        rows += _detect_steps(demo, name, dbt, lesions, dbt_path, seed, dbt_shape, int(dbt_volumes), device,
                              report.sub(0.64, 0.98), cancel)
    del dbt

    summary = {
        "output": str(out), "seed": int(seed), "ct": ct_info,
        "dbt": {"shape": list(dbt_shape) if dbt_shape else None, "lesions": len(lesions), "volumes": int(dbt_volumes)},
        "rows": rows, "steps_s": {k: round(v, 3) for k, v in demo.steps.items()},
        "skipped": [row["step"] for row in rows if row.get("skipped")],
        "layout": {step: text for step, text in _LAYOUT.items()
                   if any(name.startswith(step + "/") for name in demo.files)},
        "total_s": round(time.perf_counter() - started, 3),
    }
    summary["files"] = sorted(demo.files + ["summary.json", "summary.txt"])
    with atomic_output(out / "summary.txt") as tmp:
        tmp.write_text(format_summary(summary) + "\n", encoding="utf-8")
    _write_json(out / "summary.json", summary)
    report(1.0, "done")
    return summary


def _ct_step(demo: _Demo, seed: int, shape, report) -> tuple:
    start = time.perf_counter()
    report(0.0, "CT phantom")
    volume, truth = ct_phantom(seed, shape=shape)
    report(0.6, "writing the CT phantom")
    folder = demo.out / "ct"
    ct_path = save_volume(volume, folder / "ct.nii.gz")
    truth_path = save_labelmap(truth, volume, folder / "truth.nii.gz")
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    truth_ml = {name: round(float(np.count_nonzero(truth == value)) * voxel_ml, 3)
                for value, name in CT_LABEL_NAMES.items()}
    png = save_overview_png(volume, folder / "truth.png", labels=truth,
                            title=f"CT phantom, seed {seed}: truth — " + ", ".join(
                                f"{k} {v:.1f} mL" for k, v in truth_ml.items()))
    demo.wrote(ct_path, truth_path, png)
    info = {"shape": list(volume.shape), "spacing_mm": [round(s, 4) for s in volume.spacing], "truth_ml": truth_ml}
    grid = "×".join(map(str, reversed(volume.shape)))
    demo.done("ct", start, f"CT phantom {grid} at {' × '.join(f'{s:.2f}' for s in reversed(volume.spacing))} mm "
                           f"→ {folder}")
    return volume, truth, ct_path, info


def _segment_step(demo: _Demo, step: str, model: str, volume, truth, ct_path, device, report, cancel) -> dict:
    """One CT model: segment, write, score; for a multi-view model also each view's label map."""
    start = time.perf_counter()
    result = run(volume, model=model, device=device, progress=report.sub(0.0, 0.8), cancel=cancel)
    segmented = time.perf_counter()
    report(0.8, "writing")
    folder = demo.out / step
    written = result.write(folder, input_path=ct_path)
    demo.wrote(*written.values())
    row = {"step": step, "model": result.card["name"], "task": "segmentation", "device": result.device,
           "dice": _dice_pair(result.labels, truth), "volumes_ml": result.volumes_ml()}
    if result.views:
        label_names = {seg["label"]: seg["name"] for seg in result.segments}
        view_labels = {view: np.asarray(result.views[view]).argmax(axis=0).astype(np.uint8)
                       for view in VIEW_NAMES if view in result.views}
        row["views_dice"] = {view: _dice_pair(labels, truth) for view, labels in view_labels.items()}
        fusion = result.method_summary.get("fusion", "fused")
        panels = {f"{view} network (liver {row['views_dice'][view]['liver']:.3f}, "
                  f"tumor {row['views_dice'][view]['tumor']:.3f})": labels for view, labels in view_labels.items()}
        panels[f"fused: {fusion} (liver {row['dice']['liver']:.3f}, tumor {row['dice']['tumor']:.3f})"] = result.labels
        panels["phantom truth"] = truth
        focus = _focus(truth, result.labels)
        pictures = [save_views_side_by_side_png(
            volume, panels, folder / "views-side-by-side.png", view="axial", focus=focus, label_names=label_names,
            title=f"{result.card['name']}: each view network's label map (argmax, before clean-up), the fused one "
                  "and the truth on one axial slice (through the largest true tumor); Dice against the truth")]
        del view_labels, panels
        if result.disagreement is not None:
            pictures.append(save_scalar_overlay_png(
                volume, result.disagreement, folder / "disagreement.png",
                colorbar_label="view disagreement (0 agree, 1 all differ)", contours=result.labels,
                label_names=label_names, focus=focus, floor=DISAGREEMENT_SHOWN_FROM,
                title=f"{result.card['name']}: where its axial, coronal and sagittal networks disagree "
                      f"(shown from {DISAGREEMENT_SHOWN_FROM:g}; two one-hot views against one give 0.58)\n"
                      "outlines: the fused segmentation"))
            row["disagreement"] = {k: result.method_summary[k] for k in
                                   ("mean_disagreement", "share_views_differ") if k in result.method_summary}
        demo.wrote(*pictures)
    end = time.perf_counter()
    load = float(result.timings.get("load_model", 0.0))
    row["timings_s"] = {"load": load, "segment": segmented - start - load, "write": end - segmented,
                        "total": end - start}
    report(1.0, "done")
    demo.done(step, start, f"{result.card['name']}: Dice liver {row['dice']['liver']:.3f}, "
                           f"tumor {row['dice']['tumor']:.3f} → {folder}")
    return row


def _dbt_step(demo: _Demo, seed: int, shape, report) -> tuple:
    start = time.perf_counter()
    report(0.0, "DBT phantom")
    volume, lesions = dbt_phantom(seed, shape=shape)
    folder = demo.out / "dbt"
    dbt_path = save_volume(volume, folder / "dbt.nii.gz")
    lesions_path = _write_json(folder / "lesions.json", {"seed": int(seed), "lesions": lesions})
    demo.wrote(dbt_path, lesions_path)
    grid = "×".join(map(str, reversed(volume.shape)))
    demo.done("dbt", start, f"DBT phantom {grid} at {' × '.join(f'{s:g}' for s in reversed(volume.spacing))} mm, "
                            f"{len(lesions)} lesion(s) → {folder}")
    return volume, lesions, dbt_path


@dataclasses.dataclass(frozen=True)
class _Detector:
    """The detector as the demo runs it: ``sweep`` keeps every heatmap peak (for the FROC); the
    detections at the card's threshold are the first of them (:meth:`at_threshold`)."""

    loaded: LoadedModel
    sweep: LoadedModel
    threshold: float
    max_peaks: int
    load_s: float

    @classmethod
    def load(cls, model: str) -> "_Detector":
        start = time.perf_counter()
        loaded = load_model(model)
        load_s = time.perf_counter() - start
        peaks = dict(_peak_defaults(), **(loaded.card.get("peaks") or {}))
        threshold, max_peaks = float(peaks["threshold"]), int(peaks["max_peaks"])
        sweep = dataclasses.replace(loaded, card=dict(loaded.card, peaks=dict(
            peaks, threshold=0.0, max_peaks=max(FROC_MAX_PEAKS, max_peaks))))
        return cls(loaded, sweep, threshold, max_peaks, load_s)

    @property
    def name(self) -> str:
        return self.loaded.card["name"]

    def at_threshold(self, detections) -> list:
        return [d for d in detections if d.confidence >= self.threshold][:self.max_peaks]


def _detect_steps(demo: _Demo, model: str, volume, lesions, dbt_path, seed, shape, count, device, report,
                  cancel) -> list:
    """The detector on the ``dbt`` phantom (written, drawn) and on ``count - 1`` more (the FROC)."""
    start = time.perf_counter()
    detector = _Detector.load(model)
    share = 1.0 / count
    row, peaks = _detect_step(demo, detector, volume, lesions, dbt_path, device, report.sub(0.0, 0.8 * share),
                              cancel, start)
    check_cancel(cancel)
    froc_row = _froc_step(demo, detector, peaks, lesions, seed, shape, count, device, report, cancel)
    report(1.0, "done")
    return [row, froc_row]


def _detect_step(demo: _Demo, detector: _Detector, volume, lesions, dbt_path, device, progress, cancel,
                 start: float) -> tuple:
    """The ``dbt-ahnet`` step: its row, and every heatmap peak of the ``dbt`` phantom (for the FROC);
    the detections at the detector's threshold are written and drawn over the heatmap."""
    name, threshold = detector.name, detector.threshold
    result = run(volume, detector.sweep, device=device, progress=progress, cancel=cancel)
    detected = time.perf_counter()
    peaks = result.detections
    result = dataclasses.replace(result, card=detector.loaded.card, detections=detector.at_threshold(peaks))
    folder = demo.out / "dbt-ahnet"
    written = result.write(folder, input_path=dbt_path)
    point = _operating_point([result.detections], [lesions])
    picture = save_detections_png(
        volume, result.heatmap_on_input(), result.detections, lesions, folder / "detections.png",
        title=f"{name} at its threshold {threshold:g}: {point['found']} of {point['lesions']} "
              f"lesion(s) found, {point['false_positives']} false positive(s); lesion boxes dashed")
    demo.wrote(*written.values(), picture)
    end = time.perf_counter()
    load = detector.load_s
    row = {"step": "dbt-ahnet", "model": name, "task": "heatmap", "device": result.device,
           "threshold": threshold, "lesions_found": point,
           "timings_s": {"load": load, "segment": detected - start - load, "write": end - detected,
                         "total": end - start}}
    demo.done("dbt-ahnet", start, f"{name}: {point['found']} of {point['lesions']} lesion(s) found, "
                                  f"{point['false_positives']} false positive(s) at threshold {threshold:g} "
                                  f"→ {folder}")
    return row, peaks


def _froc_step(demo: _Demo, detector: _Detector, first_peaks, first_lesions, seed, shape, count, device, report,
               cancel) -> dict:
    """The ``froc`` step over ``count`` DBT phantoms, seeds ``seed``…: the first one's peaks are given
    (the ``dbt`` phantom), the others are made and run here; its row."""
    name, threshold = detector.name, detector.threshold
    start = time.perf_counter()
    seconds = 0.0
    share = 1.0 / count
    all_peaks, boxes = [first_peaks], [first_lesions]
    for n in range(1, count):
        report(n * share, f"DBT phantom {n + 1} of {count}")
        other, other_lesions = dbt_phantom(seed + n, shape=shape)
        began = time.perf_counter()
        found = run(other, detector.sweep, device=device, progress=report.sub(n * share, (n + 1) * share),
                    cancel=cancel)
        seconds += time.perf_counter() - began
        all_peaks.append(found.detections)
        boxes.append(other_lesions)
        del other, found
    detected = time.perf_counter()
    curve = froc(all_peaks, boxes)
    point = _operating_point([detector.at_threshold(d) for d in all_peaks], boxes)
    folder = demo.out / "froc"
    data = {"model": name, "seeds": list(range(seed, seed + count)), "dbt_shape": shape,
            "peaks": detector.sweep.card["peaks"], "default_threshold": dict(point, threshold=threshold),
            "tpr_at_fp_per_volume": {f"{rate:g}": curve["tpr_at"][rate] for rate in FROC_RATES},
            "lesions": curve["lesions"], "volumes": curve["volumes"], "fp_per_volume": curve["fp_per_volume"],
            "tpr": curve["tpr"], "thresholds": [None if np.isinf(t) else t for t in curve["thresholds"]],
            "protocol": "AH-Net sec. 4.1 (metrics.froc): a peak inside a lesion's 3D box is a true positive "
                        "(once per box), other peaks are false positives; peaks are every local maximum of "
                        "pipeline.run's heatmap at the card's min_distance"}
    json_path = _write_json(folder / "froc.json", data)
    png = save_froc_png({name: curve}, folder / "froc.png",
                        title=f"FROC of {name} on {count} DBT phantom(s) (seeds {seed}–{seed + count - 1})",
                        points={f"threshold {threshold:g}: {point['found']} of {point['lesions']} found, "
                                f"{point['false_positives']} FP": (point["fp_per_volume"], point["tpr"])})
    demo.wrote(json_path, png)
    end = time.perf_counter()
    demo.done("froc", start, f"{count} DBT phantoms, {curve['lesions']} lesions: TPR "
                             f"{curve['tpr_at'][max(FROC_RATES)]:.2f} at {max(FROC_RATES):g} FP/volume → {folder}")
    return {"step": "froc", "model": name, "task": "heatmap", "threshold": threshold,
            "volumes": count, "lesions_found": point,
            "tpr_at_fp_per_volume": data["tpr_at_fp_per_volume"],
            "timings_s": {"load": 0.0, "segment": seconds, "write": end - detected, "total": end - start}}


def _lesions_text(point: dict) -> str:
    return f"{point['found']}/{point['lesions']}"


def format_summary(summary: dict) -> str:
    """The table the command prints: per model Dice or lesions found, and the timings."""
    ct = summary["ct"]
    grid = "×".join(map(str, reversed(ct["shape"])))
    spacing = " × ".join(f"{s:.2f}" for s in reversed(ct["spacing_mm"]))
    truth = ", ".join(f"{k} {v:.1f} mL" for k, v in ct["truth_ml"].items())
    lines = [f"TransferSeg demo (seed {summary['seed']}) → {summary['output']}",
             f"CT phantom {grid} at {spacing} mm; truth: {truth}", "",
             f"{'step':<20}{'model':<24}{'Dice liver':>11}{'Dice tumor':>11}{'lesions found':>15}{'FP':>5}"
             f"{'FP/vol':>8}{'load s':>8}{'segment s':>10}{'write s':>9}{'total s':>9}"]

    def timing(row):
        t = row["timings_s"]
        load = "–" if row["step"] == "froc" else f"{t['load']:.1f}"
        return f"{load:>8}{t['segment']:>10.1f}{t['write']:>9.1f}{t['total']:>9.1f}"

    for row in summary["rows"]:
        if row.get("skipped"):
            lines.append(f"{row['step']:<20}{row['model']:<24}skipped: the model is not installed")
        elif row["task"] == "segmentation":
            d = row["dice"]
            lines.append(f"{row['step']:<20}{row['model']:<24}{d['liver']:>11.3f}{d['tumor']:>11.3f}"
                         f"{'–':>15}{'–':>5}{'–':>8}{timing(row)}")
            for view, vd in (row.get("views_dice") or {}).items():
                lines.append(f"{'  ' + view + ' network':<20}{'(argmax, no clean-up)':<24}{vd['liver']:>11.3f}"
                             f"{vd['tumor']:>11.3f}")
        else:
            p = row["lesions_found"]
            step = row["step"] if row["step"] != "froc" else f"froc ({row['volumes']} DBT)"
            lines.append(f"{step:<20}{row['model']:<24}{'–':>11}{'–':>11}{_lesions_text(p):>15}"
                         f"{p['false_positives']:>5}{p['fp_per_volume']:>8.2f}{timing(row)}")
            if row["step"] == "froc":
                rates = ", ".join(f"{v:.2f} at {k}" for k, v in row["tpr_at_fp_per_volume"].items())
                lines.append(f"{'':<20}TPR at FP/volume: {rates}")
    thresholds = sorted({f"{row['threshold']:g}" for row in summary["rows"] if "threshold" in row})
    if thresholds:
        lines.append(f"(lesions found: true positives of the truth lesions, and FP, at the detector's default "
                     f"threshold {', '.join(thresholds)})")
    lines.append("steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["steps_s"].items())
                 + f"; total {summary['total_s']:.1f} s")
    return "\n".join(lines)
