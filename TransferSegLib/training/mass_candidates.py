"""The ``mass_candidates`` recipe: the mass stage's candidate classifier, fitted on DBT phantoms.

:mod:`TransferSegLib.masses` rescores heatmap peaks and blob candidates on the mass network's
working grid; this recipe runs a heatmap model (``heatmap_model``: a card whose heatmap is the
mass network's, e.g. the shipped ``dbt-lesion-ahnet``) over phantoms the network never trained
on, labels each candidate (a mass when it lies in a phantom mass's box, mapped onto the working
grid; near its centre, see :func:`label_mass_candidates`), fits :class:`~TransferSegLib.nets.SpeckClassifier` to them, picks the threshold on
validation phantoms (0.5, raised where needed to keep at most ``target_fp_per_volume`` false
masses per volume), scores held-out phantoms and writes the model::

    {"recipe": "mass_candidates", "name": "dbt-mass-candidates", "version": "1.0.0", "task": "heatmap",
     "description": "...", "seed": 0, "labels": [...], "threads": 1,
     "heatmap_model": "Resources/models/dbt-lesion-ahnet.json",
     "data": [{"phantom": "dbt", "count": 200, "seed": 2000, "vary": {...}}, ...],
     "validation": {"count": 40, "seed": 4000, "vary": {...}},
     "test": [{"name": "default grid", "count": 40, "seed": 5000, "options": {}}, ...],
     "classifier": {"hidden": [32, 16], "steps": 4000, "batch_size": 512, "lr": 0.003, "weight_decay": 0.0001},
     "detector": {...masses.DEFAULTS but threshold...}, "target_fp_per_volume": 0.5}

Training and validation seeds stay below 5000 (5000 and up are held out).  What a run writes into
OUT: ``cases/<set>/<case>-<key>.npz`` (each phantom on the working grid: image, heatmap, mass
boxes; the key changes with the phantom's options and the heatmap model's weights; a rerun
reuses them), ``result.json`` and ``model/NAME.{safetensors,json}`` (the card's ``masses``
holds the detector settings with the chosen threshold, ``metrics`` the validation and test FROCs,
scored on the working grid; ``bench/dbt_lesions.py`` scores the composed detector on the input's grid).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_output
from ..calcifications import speck_probabilities
from ..datasets import phantom_cases
from ..masses import DEFAULTS, FEATURES, KIND, mass_candidates, mass_features, select_masses
from ..metrics import froc
from ..models import load_model, save_model
from ..pipeline import run as run_pipeline
from ..progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from ..volume import TransferSegError, Volume
from .specks import RATES, check_classifier_and_detector, check_phantom_set, choose_threshold, fit_classifier, run_in_folder

__all__ = ["MASS_KEYS", "label_mass_candidates", "mass_candidates_recipe", "validate_mass_candidates"]

MASS_KEYS = ("recipe", "name", "version", "task", "description", "seed", "labels", "threads", "heatmap_model", "data",
             "validation", "test", "classifier", "detector", "target_fp_per_volume", "expected_spacing_mm")
SWEEP = {"threshold": 0.0, "max_detections": 50}   # every candidate that survives merging, for a FROC


def _fail(key: str, message: str):
    raise TransferSegError(f"recipe config: {key}: {message}")


def _sets(value, key: str) -> list:
    sets = value if isinstance(value, list) else [value]
    if not sets or not all(isinstance(s, dict) for s in sets):
        _fail(key, 'must be a phantom set {"phantom": "dbt", "count": N, "seed": S, …} or a list of them')
    return sets


def validate_mass_candidates(config: dict) -> dict:
    """A checked copy of a mass_candidates recipe config, defaults filled in."""
    unknown = sorted(set(config) - set(MASS_KEYS) - {k for k in config if k.startswith("_")})
    if unknown:
        _fail(unknown[0], f"unknown key; a mass_candidates recipe has {', '.join(MASS_KEYS)}")
    for key in ("name", "labels", "heatmap_model", "data", "validation"):
        if key not in config:
            _fail(key, "required")
    c = copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")})
    c["data"] = _sets(c["data"], "data")
    for n, spec in enumerate(c["data"]):
        if spec.get("phantom") != "dbt":
            _fail(f"data[{n}]", 'the mass classifier trains on DBT phantoms: {"phantom": "dbt", "count": N, "seed": S, …}')
        check_phantom_set({k: v for k, v in spec.items() if k != "phantom"}, f"data[{n}]", False, "masses")
    check_phantom_set(c["validation"], "validation", False, "masses")
    c.setdefault("test", [])
    if not isinstance(c["test"], list):
        _fail("test", "must be a list of phantom sets")
    for n, spec in enumerate(c["test"]):
        check_phantom_set(spec, f"test[{n}]", True, "masses")
    if not isinstance(c["heatmap_model"], str) or not c["heatmap_model"]:
        _fail("heatmap_model", "must name a heatmap model's card, e.g. Resources/models/dbt-lesion-ahnet.json")
    check_classifier_and_detector(c, DEFAULTS, "mass")
    for key, default in (("target_fp_per_volume", 0.5), ("seed", 0), ("threads", 1), ("version", "1.0.0"),
                         ("task", "heatmap"), ("expected_spacing_mm", [1.0, 0.1, 0.1])):
        c.setdefault(key, default)
    return c


# --- cases: each phantom on the working grid -------------------------------------------------------
def label_mass_candidates(kji: np.ndarray, masses: list, spacing) -> np.ndarray:
    """Per candidate (working voxel): 1 near a phantom mass's centre (within half its diameter, at
    least 2 mm, in-plane and across slices), −1 elsewhere in its box (a spicule or the mass's
    edge: left out of training, though a detection there finds the mass), 0 outside every box.
    ``masses``: per mass [k0, j0, i0, k1, j1, i1, centre k, j, i, diameter mm] on the working grid."""
    kji = np.asarray(kji, float).reshape(-1, 3)
    labels = np.zeros(len(kji), np.float32)
    spacing = np.asarray(spacing, float)
    for mass in masses:
        lo, hi, centre, size = np.asarray(mass[:3]), np.asarray(mass[3:6]), np.asarray(mass[6:9]), float(mass[9])
        inside = np.all((kji >= lo) & (kji < hi), axis=1)
        d = (kji - centre) * spacing
        reach = max(2.0, 0.5 * size)
        near = (np.hypot(d[:, 1], d[:, 2]) <= reach) & (np.abs(d[:, 0]) <= reach)
        labels = np.where(near, 1.0, np.where(inside & (labels == 0), -1.0, labels)).astype(np.float32)
    return labels


def _working_masses(boxes: list, native: Volume, working: Volume) -> list:
    """Each phantom mass on the working grid: the continuous box its voxels cover (half-open test
    on working voxels), its centre and its diameter in mm."""
    out = []
    for box in boxes:
        if box["kind"] != KIND:
            continue
        k0, j0, i0, k1, j1, i1 = box["box_kji"]
        corners = np.array([[k, j, i] for k in (k0 - 0.5, k1 - 0.5) for j in (j0 - 0.5, j1 - 0.5)
                            for i in (i0 - 0.5, i1 - 0.5)] + [box["center_kji"]], float)
        on = working.ras_to_ijk_points(native.ijk_to_ras_points(corners))
        out.append([round(float(v), 3) for v in np.concatenate([on[:8].min(axis=0), on[:8].max(axis=0), on[8]])]
                   + [float(box["size_mm"])])
    return out


def _case_file(case, folder: Path, model, model_key: str) -> Path:
    key = json.dumps({"options": case.options, "model": model_key}, sort_keys=True, default=list)
    path = folder / f"{case.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"
    if path.exists():
        return path
    volume, _ = case.load()
    tic = time.perf_counter()
    result = run_pipeline(volume, model, device="cpu")
    working = result.working
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=np.asarray(working.array, np.float32), heatmap=result.heatmap.array.astype(np.float16),
                 spacing=np.asarray(working.spacing, float), origin=np.asarray(working.origin, float),
                 directions=np.asarray(working.directions, float),
                 masses=np.array(_working_masses(case.boxes, volume, working), float).reshape(-1, 10),
                 seconds=np.array([time.perf_counter() - tic]))
    return path


def _load_set(specs: list, folder: Path, model, model_key: str, detector: dict, report, cancel) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    cases = [case for spec in specs for case in
             phantom_cases("dbt", spec["count"], spec["seed"], vary=spec.get("vary"), **spec.get("options", {}))]
    loaded = []
    for n, case in enumerate(cases):
        check_cancel(cancel)
        with np.load(_case_file(case, folder, model, model_key), allow_pickle=False) as z:
            volume = Volume(z["image"], spacing=tuple(z["spacing"]), directions=z["directions"], origin=z["origin"])
            heatmap = z["heatmap"].astype(np.float32)
            candidates = mass_candidates(volume, heatmap, detector)
            loaded.append({"kji": candidates.kji, "radius_mm": candidates.radius_mm, "spacing": volume.spacing,
                           "features": mass_features(volume, heatmap, candidates),
                           "labels": label_mass_candidates(candidates.kji, z["masses"].tolist(), volume.spacing),
                           "masses": [m[:6] for m in z["masses"].tolist()], "seconds": z["seconds"]})
        if report:
            report((n + 1) / len(cases), f"candidates {folder.name}")
    return loaded


# --- detections and their FROC ---------------------------------------------------------------------
def _detections(network, cases: list, detector: dict) -> list:
    settings = dict(detector, **SWEEP)
    return [select_masses(case["kji"], speck_probabilities(network, case["features"]), case["radius_mm"], case["spacing"],
                          settings) for case in cases]


def _score(detections: list, cases: list, threshold: float) -> dict:
    boxes = [case["masses"] for case in cases]
    curve = froc(detections, boxes, rates=RATES)
    point = froc([[d for d in dets if d.confidence >= threshold] for dets in detections], boxes, rates=(1e9,))
    return {"volumes": len(cases), "masses": curve["lesions"],
            "tpr_at_fp_per_volume": {str(r): round(v, 4) for r, v in curve["tpr_at"].items()},
            "at_threshold": {"threshold": threshold, "tpr": round(point["tpr"][-1], 4),
                             "fp_per_volume": round(point["fp_per_volume"][-1], 4)},
            "candidates_per_volume": round(float(np.mean([len(c["kji"]) for c in cases])), 1),
            "candidate_recall": round(float(np.mean([np.all((c["kji"] >= b[:3]) & (c["kji"] < b[3:]), axis=1).any()
                                                     for c in cases for b in c["masses"]] or [0.0])), 4)}


# --- the recipe ------------------------------------------------------------------------------------
def mass_candidates_recipe(config: dict, output_dir, progress: Optional[ProgressCallback] = None,
                           cancel: Optional[CancelToken] = None, max_steps: Optional[int] = None) -> Optional[Path]:
    """Run the mass_candidates recipe into ``output_dir``; returns the model's card path (None when
    ``max_steps`` stopped the classifier early: rerun to finish; the cases are kept)."""
    return run_in_folder(validate_mass_candidates(config), output_dir, _run, progress, cancel, max_steps)


def _run(c: dict, out: Path, report: StageProgress, cancel, max_steps) -> Optional[Path]:
    model = load_model(c["heatmap_model"])
    model_key = model.card.get("weights", {}).get("sha256") or model.name
    detector = dict(c["detector"])
    tic = time.perf_counter()
    sets = [("train", c["data"]), ("validation", [c["validation"]])] + [(f"test{n}", [s]) for n, s in enumerate(c["test"])]
    loaded = {}
    for n, (name, specs) in enumerate(sets):
        loaded[name] = _load_set(specs, out / "cases" / name, model, model_key, detector,
                                 report.sub(0.9 * n / len(sets), 0.9 * (n + 1) / len(sets)), cancel)
    timings = {"this_run_cases_s": round(time.perf_counter() - tic, 1),
               "heatmaps_s": round(sum(float(case["seconds"][0]) for case in loaded["train"] + loaded["validation"]), 1)}
    tic = time.perf_counter()
    train = loaded["train"]
    features = np.concatenate([case["features"] for case in train])
    labels = np.concatenate([case["labels"] for case in train])
    used = labels >= 0       # candidates in a mass's box but off its centre teach nothing either way
    features, labels = features[used], labels[used]
    network = fit_classifier(features, labels, c["classifier"], c["seed"], max_steps, cancel)
    timings["fit_s"] = round(time.perf_counter() - tic, 1)
    if max_steps is not None and max_steps < c["classifier"]["steps"]:
        return None
    report(0.95, "masses")
    found = _detections(network, loaded["validation"], detector)
    threshold = choose_threshold(found, loaded["validation"], c["target_fp_per_volume"], key="masses")
    metrics = {"validation": _score(found, loaded["validation"], threshold)}
    for n, spec in enumerate(c["test"]):
        cases = loaded[f"test{n}"]
        metrics[spec.get("name", f"seeds {spec['seed']}+")] = dict(
            _score(_detections(network, cases, detector), cases, threshold), phantoms={k: spec[k] for k in spec if k != "name"})
    settings = dict(DEFAULTS, **detector, threshold=threshold)
    card = {
        "name": c["name"], "version": c["version"], "task": c["task"], "labels": c["labels"],
        "architecture": {"name": "speck_classifier", "config": {"in_features": network.in_features,
                                                               "hidden": list(c["classifier"]["hidden"])}},
        "preprocessing": {}, "patch_size": [1, 1, 1],     # one candidate's features at a time, not a patch
        "expected_spacing_mm": c["expected_spacing_mm"], "working_spacing_mm": None,
        "masses": {"settings": settings, "features": list(FEATURES)},
        "training": {"recipe": {"config": c, "seconds": timings}, "heatmap_model": {"name": model.name,
                     "version": model.card.get("version"), "sha256": model_key},
                     "candidates": int(len(labels)), "mass_candidates": int(labels.sum()), "phantoms": len(train),
                     "on": f"{platform.machine()}, {os.cpu_count()} CPUs, {c['threads']} torch thread(s)"},
        "metrics": metrics,
    }
    if c.get("description"):
        card["description"] = c["description"]
    path = save_model(network, card, out / "model")
    with atomic_output(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"card": str(path.relative_to(out)), "metrics": metrics, "seconds": timings},
                                  indent=2) + "\n", encoding="utf-8")
    report(1.0, "done")
    return path
