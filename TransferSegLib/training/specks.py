"""The ``specks`` recipe: the speck classifier of the calcification detector, fitted on DBT phantoms.

:mod:`TransferSegLib.calcifications` finds bright specks at a volume's own resolution; this
recipe labels the candidates of phantom volumes (a candidate is a speck when it lies on a
phantom speck's slice, within ``match_mm`` in-plane of its centre), fits
:class:`~TransferSegLib.nets.SpeckClassifier` to them, picks the cluster threshold on validation
phantoms (0.5, or the lowest confidence with at most ``target_fp_per_volume`` false clusters
per volume where that is higher), scores held-out phantoms and writes the model::

    {"recipe": "specks", "name": "dbt-calcifications", "version": "1.0.0", "task": "heatmap",
     "description": "...", "seed": 0, "labels": [...], "threads": 1,
     "data": {"phantom": "dbt", "count": 400, "seed": 1000, "vary": {...}, "options": {...}},
     "validation": {"count": 40, "seed": 4000, "vary": {...}},
     "test": [{"name": "default grid", "count": 40, "seed": 5000, "options": {}}, ...],
     "classifier": {"hidden": [32, 16], "steps": 4000, "batch_size": 512, "lr": 0.003,
                    "weight_decay": 0.0001},
     "detector": {...calcifications.DEFAULTS but threshold...}, "match_mm": 0.35,
     "target_fp_per_volume": 0.25, "expected_spacing_mm": [1.0, 0.1, 0.1]}

Training and validation seeds stay below 5000 (5000 and up are held out for testing).  What a
run writes into OUT: ``cases/<set>/<seed>.npz`` (each phantom's candidates: positions,
features, labels, cluster boxes and seconds; a rerun reuses them), ``result.json`` and
``model/NAME.{safetensors,json}`` (the card's ``calcifications`` holds the detector settings
with the chosen threshold, ``metrics`` the validation and test FROCs).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_output, check_output_folder
from ..calcifications import (CANDIDATE_SETTINGS, DEFAULTS, FEATURES, KIND, group_specks, speck_candidates, speck_features,
                              speck_probabilities)
from ..datasets import phantom_cases
from ..metrics import froc
from ..models import save_model
from ..nets import SpeckClassifier
from ..phantoms import dbt_phantom
from ..progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from ..volume import TransferSegError

__all__ = ["SPECKS_KEYS", "check_classifier_and_detector", "check_phantom_set", "choose_threshold", "fit_classifier",
           "label_candidates", "run_in_folder", "specks", "validate_specks"]

SPECKS_KEYS = ("recipe", "name", "version", "task", "description", "seed", "labels", "threads", "data", "validation",
               "test", "classifier", "detector", "match_mm", "target_fp_per_volume", "expected_spacing_mm")
CLASSIFIER = {"hidden": [32, 16], "steps": 4000, "batch_size": 512, "lr": 0.003, "weight_decay": 0.0001}
HELD_OUT_SEED = 5000
RATES = (0.1, 0.25, 0.5, 1.0)


def _fail(key: str, message: str):
    raise TransferSegError(f"recipe config: {key}: {message}")


def check_phantom_set(spec, key: str, held_out_ok: bool, lesions: str = "calcification_clusters") -> None:
    """Checks a phantom set {"count", "seed", "vary", "options", "name"}: training and validation seeds
    below the held-out ones, and phantoms that may hold the ``lesions`` a stage learns."""
    if not isinstance(spec, dict) or set(spec) - {"count", "seed", "vary", "options", "name"}:
        _fail(key, 'must be {"count": N, "seed": S, "vary": {...}, "options": {...}}')
    for part in ("count", "seed"):
        value = spec.get(part)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if part == "count" else 0):
            _fail(f"{key}.{part}", f"must be a whole number ≥ {1 if part == 'count' else 0}; got {value!r}")
    if not held_out_ok and spec["seed"] + spec["count"] > HELD_OUT_SEED:
        _fail(key, f"seeds {spec['seed']}…{spec['seed'] + spec['count'] - 1} reach the held-out seeds "
                   f"({HELD_OUT_SEED} and up): train and validate below {HELD_OUT_SEED}")
    if spec.get("options", {}).get(lesions) == 0:
        _fail(f"{key}.options", f"phantoms without {lesions.replace('_', ' ')} teach the classifier nothing")
    phantom_cases("dbt", 1, spec["seed"], vary=spec.get("vary"), **spec.get("options", {}))  # checks vary


def validate_specks(config: dict) -> dict:
    """A checked copy of a specks recipe config, defaults filled in."""
    unknown = sorted(set(config) - set(SPECKS_KEYS) - {k for k in config if k.startswith("_")})
    if unknown:
        _fail(unknown[0], f"unknown key; a specks recipe has {', '.join(SPECKS_KEYS)}")
    for key in ("name", "labels", "data", "validation"):
        if key not in config:
            _fail(key, "required")
    c = copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")})
    data = c["data"]
    if not isinstance(data, dict) or data.get("phantom") != "dbt":
        _fail("data", 'the speck classifier trains on DBT phantoms: {"phantom": "dbt", "count": N, "seed": S, …}')
    check_phantom_set({k: v for k, v in data.items() if k not in ("phantom", "workers")}, "data", False)
    check_phantom_set(c["validation"], "validation", False)
    c.setdefault("test", [])
    if not isinstance(c["test"], list):
        _fail("test", "must be a list of phantom sets")
    for n, spec in enumerate(c["test"]):
        check_phantom_set(spec, f"test[{n}]", True)
    check_classifier_and_detector(c, DEFAULTS, "calcification")
    for key, default in (("match_mm", 0.35), ("target_fp_per_volume", 0.25), ("seed", 0), ("threads", 1),
                         ("version", "1.0.0"), ("task", "heatmap"), ("expected_spacing_mm", [1.0, 0.1, 0.1])):
        c.setdefault(key, default)
    return c


def check_classifier_and_detector(c: dict, defaults: dict, what: str) -> None:
    """A classifier recipe's ``classifier`` (filled in from :data:`CLASSIFIER`) and ``detector`` (the
    stage's settings, ``defaults``, all but the threshold, which the recipe picks), checked in place."""
    classifier = dict(CLASSIFIER, **c.get("classifier", {}))
    if set(classifier) != set(CLASSIFIER):
        _fail("classifier", f"the classifier's settings are {', '.join(CLASSIFIER)}")
    c["classifier"] = classifier
    detector = c.setdefault("detector", {})
    if not isinstance(detector, dict) or set(detector) - (set(defaults) - {"threshold"}):
        _fail("detector", f"must hold {what} settings but threshold (the recipe picks it): "
                          f"{', '.join(k for k in defaults if k != 'threshold')}")


# --- cases: candidates, features and labels --------------------------------------------------------
def label_candidates(kji: np.ndarray, boxes: list, spacing, match_mm: float) -> np.ndarray:
    """1 for a candidate on a phantom speck's slice within ``match_mm`` (at least 1.5 pixels) in-plane."""
    labels = np.zeros(len(kji), np.float32)
    specks = np.array([s for box in boxes if box["kind"] == KIND for s in box["specks_kji"]], float).reshape(-1, 3)
    if not len(specks) or not len(kji):
        return labels
    sj, si = float(spacing[1]), float(spacing[2])
    reach = max(match_mm, 1.5 * max(sj, si))
    for k in np.unique(kji[:, 0]):
        on = kji[:, 0] == k
        here = specks[specks[:, 0] == k]
        if not len(here):
            continue
        d = np.hypot((kji[on, 1, None] - here[None, :, 1]) * sj, (kji[on, 2, None] - here[None, :, 2]) * si)
        labels[on] = (d <= reach).any(axis=1)
    return labels


def _case_file(case, folder: Path, detector: dict, match_mm: float) -> Path:
    """The candidates of one phantom, computed once into ``folder/<seed>-<key>.npz`` (the key
    changes with the phantom's options, the settings that change candidates and the features)."""
    settings = {k: v for k, v in dict(DEFAULTS, **detector).items() if k in CANDIDATE_SETTINGS}
    key = json.dumps({"options": case.options, "candidates": settings, "match_mm": match_mm, "features": FEATURES},
                     sort_keys=True, default=list)
    path = folder / f"{case.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"
    if path.exists():
        return path
    tic = time.perf_counter()
    volume, boxes = dbt_phantom(case.seed, **case.options)
    generated = time.perf_counter() - tic
    candidates = speck_candidates(volume, detector)
    features = speck_features(volume, candidates)
    clusters = [b["box_kji"] for b in boxes if b["kind"] == KIND]
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, kji=candidates.kji, features=features, labels=label_candidates(candidates.kji, boxes, volume.spacing, match_mm),
                 clusters=np.array(clusters, np.int64).reshape(-1, 6), spacing=np.asarray(volume.spacing, float),
                 shape=np.asarray(volume.shape, np.int64), seconds=np.array([time.perf_counter() - tic - generated]))
    return path


def _load_set(spec: dict, folder: Path, detector: dict, match_mm: float, report, cancel) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in spec.items() if k in ("vary", "options")}
    cases = phantom_cases("dbt", spec["count"], spec["seed"], vary=data.get("vary"), **data.get("options", {}))
    loaded = []
    for n, case in enumerate(cases):
        check_cancel(cancel)
        with np.load(_case_file(case, folder, detector, match_mm), allow_pickle=False) as z:
            loaded.append({key: z[key] for key in z.files})
        if report:
            report((n + 1) / len(cases), f"candidates {folder.name}")
    return loaded


# --- the classifier --------------------------------------------------------------------------------
def fit_classifier(features: np.ndarray, labels: np.ndarray, settings: dict, seed: int,
                   max_steps: Optional[int] = None, cancel: Optional[CancelToken] = None) -> SpeckClassifier:
    """A :class:`SpeckClassifier` fitted by Adam on binary cross-entropy (minibatches drawn with a
    seeded generator, so a rerun gives the same weights); probabilities stay calibrated (no class
    weights), which the clusters' confidence needs."""
    if len(features) < 2 or labels.min() == labels.max():
        raise TransferSegError("the training phantoms gave candidates of one class only; add phantoms with clusters")
    torch.manual_seed(seed)
    network = SpeckClassifier(features.shape[1], tuple(settings["hidden"]))
    network.set_standardisation(torch.from_numpy(features))
    optimizer = torch.optim.Adam(network.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    rng = np.random.default_rng([seed, 23])
    steps = settings["steps"] if max_steps is None else min(settings["steps"], max_steps)
    network.train()
    for step in range(steps):
        if step % 100 == 0:
            check_cancel(cancel)
        lr = settings["lr"] * 0.5 * (1 + np.cos(np.pi * step / settings["steps"]))   # cosine decay to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.from_numpy(rng.integers(0, len(x), settings["batch_size"]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(network(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


# --- clusters and their FROC -----------------------------------------------------------------------
def _clusters(network, cases: list, detector: dict, threshold: float) -> list:
    settings = dict(detector, threshold=threshold)
    out = []
    for case in cases:
        probabilities = speck_probabilities(network, case["features"])
        out.append(group_specks(case["kji"], probabilities, case["spacing"], settings))
    return out


def _score(detections: list, cases: list, threshold: float) -> dict:
    """FROC of the clusters (boxes: the phantoms' clusters only; any other detection is a false
    positive), and the operating point at ``threshold``."""
    boxes = [[list(map(int, b)) for b in case["clusters"]] for case in cases]
    curve = froc(detections, boxes, rates=RATES)
    at = [[d for d in dets if d.confidence >= threshold] for dets in detections]
    point = froc(at, boxes, rates=(1e9,))
    return {"volumes": len(cases), "clusters": curve["lesions"],
            "tpr_at_fp_per_volume": {str(r): round(v, 4) for r, v in curve["tpr_at"].items()},
            "at_threshold": {"threshold": threshold, "tpr": round(point["tpr"][-1], 4),
                             "fp_per_volume": round(point["fp_per_volume"][-1], 4)},
            "candidates_per_volume": round(float(np.mean([len(c["kji"]) for c in cases])), 1),
            "candidate_seconds_per_volume": round(float(np.mean([c["seconds"][0] for c in cases])), 3)}


def choose_threshold(detections: list, cases: list, target_fp: float, floor: float = 0.5, key: str = "clusters") -> float:
    """The detection threshold: ``floor`` (a cluster more likely than not), raised to the lowest
    confidence that keeps the false positives per volume at most ``target_fp`` where the
    validation cases need it (their lesion boxes under ``key``)."""
    boxes = [[list(b) for b in case[key]] for case in cases]
    curve = froc(detections, boxes, rates=(target_fp,))
    over = [t for f, t in zip(curve["fp_per_volume"], curve["thresholds"]) if f > target_fp + 1e-12]
    if not over or max(over) < floor:
        return floor
    allowed = [t for f, t in zip(curve["fp_per_volume"], curve["thresholds"]) if f <= target_fp + 1e-12 and t > max(over)]
    finite = [t for t in allowed if np.isfinite(t)]
    return math.floor(float(min(finite)) * 1e4) / 1e4 if finite else 1.0   # rounded down: the point stays in


# --- the recipe ------------------------------------------------------------------------------------
def specks(config: dict, output_dir, progress: Optional[ProgressCallback] = None,
           cancel: Optional[CancelToken] = None, max_steps: Optional[int] = None) -> Optional[Path]:
    """Run the specks recipe into ``output_dir``; returns the model's card path (None when
    ``max_steps`` stopped the classifier early: rerun to finish; the candidates are kept)."""
    return run_in_folder(validate_specks(config), output_dir, _run, progress, cancel, max_steps)


def run_in_folder(c: dict, output_dir, run, progress=None, cancel=None, max_steps=None):
    """A checked classifier recipe ``c`` run by ``run(c, out, report, cancel, max_steps)`` into
    ``output_dir`` (checked, created, the config written as recipe.json) on ``c["threads"]`` torch
    threads, restored after."""
    out = Path(output_dir)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(c["threads"]))
    try:
        return run(c, out, StageProgress(progress), cancel, max_steps)
    finally:
        torch.set_num_threads(previous)


def _run(c: dict, out: Path, report: StageProgress, cancel, max_steps) -> Optional[Path]:
    detector = dict(c["detector"])
    timings = {}
    tic = time.perf_counter()
    train = _load_set(c["data"], out / "cases" / "train", detector, c["match_mm"], report.sub(0.0, 0.6), cancel)
    valid = _load_set(c["validation"], out / "cases" / "validation", detector, c["match_mm"], report.sub(0.6, 0.7), cancel)
    tests = [_load_set(spec, out / "cases" / f"test{n}", detector, c["match_mm"],
                       report.sub(0.7 + 0.2 * n / len(c["test"]), 0.7 + 0.2 * (n + 1) / len(c["test"])), cancel)
             for n, spec in enumerate(c["test"])]
    timings["this_run_candidates_s"] = round(time.perf_counter() - tic, 1)   # 0 where the cases were cached
    timings["candidates_s"] = round(sum(float(case["seconds"][0]) for case in train + valid), 1)   # phantoms aside
    tic = time.perf_counter()
    features = np.concatenate([case["features"] for case in train])
    labels = np.concatenate([case["labels"] for case in train])
    network = fit_classifier(features, labels, c["classifier"], c["seed"], max_steps, cancel)
    timings["fit_s"] = round(time.perf_counter() - tic, 1)
    if max_steps is not None and max_steps < c["classifier"]["steps"]:
        return None
    report(0.95, "clusters")
    found = _clusters(network, valid, detector, 0.0)
    threshold = choose_threshold(found, valid, c["target_fp_per_volume"])
    metrics = {"validation": _score(found, valid, threshold)}
    for spec, cases in zip(c["test"], tests):
        metrics[spec.get("name", f"seeds {spec['seed']}+")] = dict(_score(_clusters(network, cases, detector, 0.0),
                                                                          cases, threshold),
                                                                   phantoms={k: spec[k] for k in spec if k != "name"})
    settings = dict(DEFAULTS, **detector, threshold=threshold)
    card = _card(c, network, settings, metrics, train, labels, timings)
    path = save_model(network, card, out / "model")
    with atomic_output(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"card": str(path.relative_to(out)), "metrics": metrics, "seconds": timings},
                                  indent=2) + "\n", encoding="utf-8")
    report(1.0, "done")
    return path


def _card(c: dict, network, settings: dict, metrics: dict, train: list, labels: np.ndarray, timings: dict) -> dict:
    pixels = [float(case["spacing"][1]) for case in train]
    slices = [float(case["spacing"][0]) for case in train]
    card = {
        "name": c["name"], "version": c["version"], "task": c["task"], "labels": c["labels"],
        "architecture": {"name": "speck_classifier", "config": {"in_features": network.in_features,
                                                               "hidden": list(c["classifier"]["hidden"])}},
        "preprocessing": {}, "patch_size": [1, 1, 1],     # one candidate's features at a time, not a patch
        "expected_spacing_mm": c["expected_spacing_mm"], "working_spacing_mm": None,   # the input's own grid
        "trained_spacing_mm": {"min": [min(slices), min(pixels), min(pixels)],
                               "max": [max(slices), max(pixels), max(pixels)]},
        "calcifications": {"settings": settings, "features": list(FEATURES)},
        "training": {"recipe": {"config": c, "seconds": timings}, "candidates": int(len(labels)),
                     "specks": int(labels.sum()), "phantoms": len(train),
                     "on": f"{platform.machine()}, {os.cpu_count()} CPUs, {c['threads']} torch thread(s)"},
        "metrics": metrics,
    }
    if c.get("description"):
        card["description"] = c["description"]
    return card
