"""The shipped DBT detector, ``dbt-lesion-ahnet`` 2.x: its stages composed, its mass threshold
chosen, and its FROC per kind on held-out phantoms, written into its card.

Stages (each trained by its own config in ``Resources/configs/``):

* masses: the 3D AH-Net of ``dbt-masses-ahnet.json`` (fine-tuned from the ``transfer`` recipe's
  ``dbt-lesion-ahnet.json`` on masses only), a heatmap on the 1 × 0.5 × 0.5 mm working grid;
* calcification clusters: ``dbt-calcifications.json``, specks at the input's own resolution,
  a learned speck classifier, specks grouped within about 1 cm².

What runs:

1. ``models.compose_models`` puts them behind one card (method ``dbt_lesions``, half-precision
   weights), with the speck and mass stages' settings as the method's config.
2. The mass threshold is chosen on tuning phantoms (seeds 3000+, drawn as the training cases are,
   0.085–0.6 mm pixels; no training or held-out seed): the lowest peak threshold at which masses
   and clusters together give at most ``--fp-budget`` false positives per volume.  The cluster
   threshold is the speck stage's own.
3. Held-out phantoms (seeds no training case had): 40 at ``dbt_phantom``'s default grid (5000+),
   10 at a clinical 0.1 mm grid (6000+), 10 with breasts of clinical size (1.8–2.6 times the
   usual 100 × 75 mm, up to 260 × 195 mm) at 0.3–0.6 mm pixels (6100+), and with ``--large`` one
   at each clinical size
   (Hologic-like 50 × 2457 × 1890 at 0.1 mm, Siemens-like 50 × 3584 × 2816 at 0.085 mm).  Every
   volume runs through ``pipeline.run`` (the product path) with every mass peak (threshold 0, at
   most 50) and every cluster (threshold 0), so a FROC can sweep them; the FROC is AH-Net
   sec. 4.1's (a detection in a lesion's 3D box is a true positive, once per box), over all
   lesions and per kind (a kind's detections against that kind's boxes); at the card's default
   thresholds it counts the lesions found and the false positives per volume.

``--ship DIR`` writes the composed model with these numbers in its card's ``metrics`` (and
``froc_heldout_check``: the first 10 default-grid volumes with clusters at the card's threshold,
what ``Testing/test_shipped_models.py`` recomputes).

    .venv/bin/python bench/dbt_lesions.py --quick
    .venv/bin/python bench/dbt_lesions.py --masses runs/dbt-masses-ahnet/model/dbt-masses-ahnet.json \\
        --calcifications runs/dbt-calcifications/model/dbt-calcifications.json \\
        --mass-candidates runs/dbt-mass-candidates/model/dbt-mass-candidates.json --ship Resources/models
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from TransferSegLib.datasets import phantom_cases
from TransferSegLib.heatmaps import box_contains
from TransferSegLib.metrics import FROC_RATES, froc, found_by_kind
from TransferSegLib.models import compose_models, load_model
from TransferSegLib.phantoms import dbt_phantom
from TransferSegLib.pipeline import run

from common import ROOT, write_json

KINDS = ("mass", "calcification_cluster")
VARY = {"pixel_mm": [0.085, 0.6], "extent_mm": [100, 75], "slices": [30, 50]}  # as the training cases
#: breasts up to a clinical detector's size (1.8-2.6 times 100 x 75 mm), at pixels cheap enough to draw many
VARY_LARGE = {"pixel_mm": [0.3, 0.6], "extent_mm": [100, 75], "extent_scale": [1.8, 2.6], "slices": [30, 55]}
TUNING = {"seed": 3000, "count": 20}
HELD_OUT = {"froc_heldout": {"seed": 5000, "count": 40, "options": {}},
            "froc_heldout_clinical": {"seed": 6000, "count": 10, "options": {"shape": [40, 1024, 768], "pixel_mm": 0.1}},
            "froc_heldout_large_breasts": {"seed": 6100, "count": 10, "options": {},
                                           "vary": VARY_LARGE}}
LARGE = {"hologic": {"seed": 5400, "count": 1, "options": {"shape": [50, 2457, 1890], "pixel_mm": 0.1}},
         "siemens": {"seed": 5401, "count": 1, "options": {"shape": [50, 3584, 2816], "pixel_mm": 0.085}}}
QUICK = {"tuning": 2, "froc_heldout": 3, "froc_heldout_clinical": 1, "froc_heldout_large_breasts": 1}
SWEEP = {"threshold": 0.0, "max_peaks": 50}  # every mass peak, for the FROC
MASS_SWEEP = {"threshold": 0.0, "max_detections": 50}  # every rescored mass candidate that stands, for the FROC
CHECK_COUNT = 10
#: the detector's label: the transfer recipe's "lesion" (SNOMED CT Lesion of the breast), for masses and clusters alike
LABELS = json.loads((ROOT / "Resources" / "configs" / "dbt-lesion-ahnet.json").read_text(encoding="utf-8"))["labels"]
DESCRIPTION = ("DBT masses (3D AH-Net heatmap, ResNet18 encoder transferred from the MC-GCN, on a 1 × 0.5 × 0.5 mm "
               "working grid; its peaks and blob candidates rescored by a learned classifier) and calcification clusters (bright specks at the input's own resolution, a learned "
               "speck classifier, specks grouped within about 1 cm²), each detection with its kind; trained on "
               "synthetic DBT phantoms only (a demo, not for clinical use)")
PROTOCOL = ("AH-Net sec. 4.1: a detection inside a lesion's 3D box is a true positive (once per box); 'all': every "
            "detection against every box; per kind: that kind's detections against that kind's boxes. Swept over "
            "every confidence (masses at threshold 0, at most 50; clusters at threshold 0) through pipeline.run; "
            "default_threshold: the card's mass threshold and cluster threshold")


def rescored(model) -> bool:
    """Whether the masses are rescored candidates (a ``mass_candidates`` component), not the heatmap's peaks."""
    return "mass_candidates" in model.components


def sweeping(model):
    """``model`` with every mass peak and every cluster kept (the FROC sweeps them)."""
    config = dict(model.method.get("config") or {})
    config["calcifications"] = dict(config.get("calcifications") or {}, threshold=0.0)
    if rescored(model):
        config["masses"] = dict(config.get("masses") or {}, **MASS_SWEEP)
    return dataclasses.replace(model, card=dict(model.card, peaks=dict(model.card.get("peaks") or {}, **SWEEP)),
                               method=dict(model.method, config=config))


def detect(model, volumes) -> tuple:
    """Per volume: (detections as dicts, lesion boxes), and the seconds each run took."""
    found, seconds = [], []
    for name, volume, boxes in volumes:
        start = time.perf_counter()
        result = run(volume, model, device="cpu")
        seconds.append(time.perf_counter() - start)
        found.append(([d.to_dict() for d in result.detections], boxes))
        kinds = {k: sum(d.kind == k for d in result.detections) for k in KINDS}
        print(f"  {name}: {len(boxes)} lesions, {kinds} candidates, {seconds[-1]:.1f} s", flush=True)
    return found, seconds


def phantoms(spec: dict, count: int):
    """(name, volume, boxes) of ``count`` phantoms of ``spec`` (``vary``: drawn as the training cases)."""
    if spec.get("vary"):
        for case in phantom_cases("dbt", count, spec["seed"], vary=spec["vary"]):
            volume, _ = case.load()
            yield case.name, volume, case.boxes
        return
    for seed in range(spec["seed"], spec["seed"] + count):
        volume, boxes = dbt_phantom(seed, **spec["options"])
        yield f"seed {seed}", volume, boxes


def kept(detections: list, thresholds: dict) -> list:
    return [d for d in detections if d["confidence"] >= thresholds[d["kind"]]]


def at_thresholds(found: list, thresholds: dict) -> dict:
    """Lesions found per kind and false positives per volume with detections at ``thresholds`` (per kind)."""
    counts = {kind: {"found": 0, "lesions": 0} for kind in KINDS}
    false = 0
    for detections, boxes in found:
        detections = kept(detections, thresholds)
        for box in boxes:
            counts[box["kind"]]["lesions"] += 1
            counts[box["kind"]]["found"] += any(box_contains(box, d["position_kji"]) for d in detections)
        false += sum(not any(box_contains(b, d["position_kji"]) for b in boxes) for d in detections)
    return {"fp_per_volume": round(false / max(len(found), 1), 3),
            "found": {kind: f"{c['found']} of {c['lesions']}" for kind, c in counts.items()}}


def mass_threshold(found: list, cluster_threshold: float, budget: float) -> float:
    """The lowest mass peak threshold at which all detections give at most ``budget`` FP per volume."""
    candidates = sorted({round(d["confidence"], 4) for detections, _ in found for d in detections
                         if d["kind"] == "mass"} | {1.0})
    for threshold in candidates:
        fp = at_thresholds(found, {"mass": threshold, "calcification_cluster": cluster_threshold})["fp_per_volume"]
        if fp <= budget:
            return float(threshold)
    return 1.0


def froc_by_kind(found: list, spec: dict, count: int, seconds: list) -> dict:
    """The FROC over all lesions and per kind, with its data."""
    out = {}
    for kind in ("all",) + KINDS:
        detections = [[d for d in ds if kind == "all" or d["kind"] == kind] for ds, _ in found]
        boxes = [[b for b in bs if kind == "all" or b["kind"] == kind] for _, bs in found]
        curve = froc(detections, boxes)
        out[kind] = {"tpr_at_fp_per_volume": {str(r): round(v, 4) for r, v in curve["tpr_at"].items()},
                     "lesions": curve["lesions"]}
    out["tpr_at_fp_per_volume"] = out["all"]["tpr_at_fp_per_volume"]
    out["lesions"], out["volumes"] = out["all"]["lesions"], len(found)
    out["data"] = {"phantom": "dbt", "seed": spec["seed"], "count": count, "options": spec.get("options", {})}
    if spec.get("vary"):
        out["data"]["vary"] = spec["vary"]
    out["seconds_per_volume"] = round(float(np.median(seconds)), 2)
    out["protocol"] = PROTOCOL
    return out


def check_entry(found: list, card: dict, model) -> dict:
    """``froc_heldout_check``: the first default-grid volumes as the shipped-model test recomputes them."""
    cluster = card["method"]["config"]["calcifications"]["threshold"]
    config = dict(card["method"]["config"])
    if rescored(model):
        config["masses"] = dict(config["masses"], **MASS_SWEEP)
    first = [(kept(ds, {"mass": 0.0, "calcification_cluster": cluster}), bs) for ds, bs in found[:CHECK_COUNT]]
    curve = froc([ds for ds, _ in first], [bs for _, bs in first])
    kinds = found_by_kind([ds for ds, _ in first], [bs for _, bs in first], rate=0.25)["kinds"]
    return {"data": {"phantom": "dbt", "seed": HELD_OUT["froc_heldout"]["seed"], "count": len(first), "options": {}},
            "peaks": dict(card["peaks"], **SWEEP), "method_config": config,
            "tpr_at_fp_per_volume": {str(r): v for r, v in curve["tpr_at"].items()},
            "lesions": curve["lesions"], "volumes": curve["volumes"],
            "found_by_kind_at_0.25": {k: {"found": v["found"], "lesions": v["lesions"]} for k, v in kinds.items()},
            "protocol": "as froc_heldout, its first volumes, every mass (peaks and method_config as here), clusters "
                        "at the card's threshold: what Testing/test_shipped_models.py recomputes"}


def print_table(metrics: dict) -> None:
    rates = [str(r) for r in FROC_RATES]
    print(f"\n{'set':28s} {'kind':22s} {'lesions':>7s} " + " ".join(f"{r:>6s}" for r in rates)
          + "   default thresholds")
    for key, entry in metrics.items():
        if not isinstance(entry, dict) or "all" not in entry:
            continue
        for kind in ("all",) + KINDS:
            row = entry[kind]
            default = entry["default_threshold"]
            note = (f"FP/vol {default['fp_per_volume']}" if kind == "all" else f"found {default['found'][kind]}")
            print(f"{key:28s} {kind:22s} {row['lesions']:7d} "
                  + " ".join(f"{row['tpr_at_fp_per_volume'][r]:6.3f}" for r in rates) + f"   {note}")
    print("(TPR at the FP-per-volume rates of the header)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masses", default=str(ROOT / "runs" / "dbt-masses-ahnet" / "model" / "dbt-masses-ahnet.json"))
    parser.add_argument("--calcifications",
                        default=str(ROOT / "runs" / "dbt-calcifications" / "model" / "dbt-calcifications.json"))
    parser.add_argument("--mass-candidates",
                        default=str(ROOT / "runs" / "dbt-mass-candidates" / "model" / "dbt-mass-candidates.json"),
                        help="the mass candidates' classifier (recipe mass_candidates), or 'none': the heatmap's peaks")
    parser.add_argument("--fp-budget", type=float, default=0.8,
                        help="false positives per tuning volume allowed at the default thresholds (default 0.8)")
    parser.add_argument("--large", action="store_true", help="also one phantom of each clinical size (minutes each)")
    parser.add_argument("--quick", action="store_true", help="a few volumes: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dbt_lesions")
    parser.add_argument("--ship", type=Path, help="write the composed model with its metrics into this folder")
    parser.add_argument("--version", default="2.1.0", help="the composed model's version (default 2.1.0, the shipped one)")
    args = parser.parse_args(argv)
    calc = json.loads(Path(args.calcifications).read_text(encoding="utf-8"))
    components = {"masses": args.masses, "calcifications": args.calcifications}
    method_config = {"calcifications": calc["calcifications"]["settings"]}
    if args.mass_candidates != "none":
        components["mass_candidates"] = args.mass_candidates
        method_config["masses"] = json.loads(Path(args.mass_candidates).read_text(encoding="utf-8"))["masses"]["settings"]
    work = Path(tempfile.mkdtemp(prefix="dbt-lesions-"))
    card_path = compose_models(components, work, name="dbt-lesion-ahnet", method="dbt_lesions", labels_from="masses",
                               version=args.version, method_config=method_config, description=DESCRIPTION,
                               storage_dtype="float16")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["labels"] = LABELS  # both kinds: a lesion of the breast (the mass stage's own label is "mass")
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    model = load_model(card_path)
    cluster = float(model.method["config"]["calcifications"]["threshold"])
    count = (lambda key, n: QUICK.get(key, 1) if args.quick else n)

    print(f"tuning: {count('tuning', TUNING['count'])} phantoms drawn as the training cases", flush=True)
    tuning, _ = detect(sweeping(model), phantoms(dict(TUNING, vary=VARY), count("tuning", TUNING["count"])))
    threshold = mass_threshold(tuning, cluster, args.fp_budget)
    thresholds = {"mass": threshold, "calcification_cluster": cluster}
    print(f"mass threshold {threshold:.4f} (cluster threshold {cluster}): {at_thresholds(tuning, thresholds)}")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if rescored(model):
        card["method"]["config"]["masses"]["threshold"] = round(threshold, 4)
    else:
        card["peaks"] = dict(card.get("peaks") or {}, threshold=round(threshold, 4))
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    model = load_model(card_path)

    metrics = {"tuning": {"data": {"phantom": "dbt", "seed": TUNING["seed"], "count": len(tuning), "vary": VARY},
                          "fp_budget_per_volume": args.fp_budget, "mass_threshold": round(threshold, 4),
                          "default_threshold": at_thresholds(tuning, thresholds)}}
    sets = dict(HELD_OUT, **(LARGE if args.large else {}))
    for key, spec in sets.items():
        n = count(key, spec["count"])
        print(f"{key}: {n} held-out phantoms {spec.get('vary') or spec['options'] or '(default grid)'}", flush=True)
        found, seconds = detect(sweeping(model), phantoms(spec, n))
        metrics[key] = dict(froc_by_kind(found, spec, n, seconds), default_threshold=at_thresholds(found, thresholds))
        if key == "froc_heldout":
            metrics["froc_heldout_check"] = check_entry(found, card, model)
    print_table(metrics)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "dbt_lesions.json", metrics)
    if args.ship:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["metrics"] = dict(metrics, calcification_stage=calc.get("metrics", {}))
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        shipped = compose_models(components, args.ship,
                                 name="dbt-lesion-ahnet", method="dbt_lesions", labels_from="masses",
                                 version=args.version, method_config=card["method"]["config"], description=DESCRIPTION,
                                 storage_dtype="float16")
        final = json.loads(shipped.read_text(encoding="utf-8"))
        final.update(labels=LABELS, peaks=card["peaks"], metrics=card["metrics"])
        shipped.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {shipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
