"""`transferseg evaluate`: run a model over a labelled folder and tabulate the paper metrics.

Regions: by default each card label is scored on its own (``labels == L``).  A card may name
regions made of several labels, e.g. LiTS scores the liver including its tumors:
``"evaluation": {"regions": {"liver": [1, 2], "liver tumor": [2]}}``.
"""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path
from typing import Optional

import numpy as np

from . import metrics
from .datasets import find_cases
from .models import load_model
from .pipeline import run
from .progress import CancelToken, StageProgress, check_cancel
from .volume import TransferSegError

COLUMNS = ["case", "region", "dice", "voe", "rvd", "asd_mm", "rmsd_mm", "ref_ml", "pred_ml"]


def regions_of(card: dict) -> dict:
    regions = (card.get("evaluation") or {}).get("regions")
    if regions:
        return {name: [int(v) for v in values] for name, values in regions.items()}
    return {seg["name"]: [int(seg["label"])] for seg in card["labels"]}


def evaluate(model, data, device: str = "auto", csv_path=None, progress=None,
             cancel: Optional[CancelToken] = None, limit: Optional[int] = None) -> dict:
    """Metrics per case and region, plus per-region means and LiTS global Dice.

    Returns ``{"rows": [...], "summary": [...]}``; writes the rows and summary to ``csv_path``
    (atomically) when given.
    """
    loaded = load_model(model, device="cpu")
    cases = find_cases(data)
    if limit:
        cases = cases[:limit]
    regions = regions_of(loaded.card)
    report = StageProgress(progress)
    rows, pooled = [], {name: ([], []) for name in regions}
    for n, case in enumerate(cases):
        check_cancel(cancel)
        volume, reference = case.load()
        if reference is None:
            raise TransferSegError(f"case {case.name} has no label map; evaluation needs labelled data")
        result = run(volume, loaded, device=device, cancel=cancel,
                     progress=report.sub(n / len(cases), (n + 1) / len(cases)))
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        for name, values in regions.items():
            pred, ref = np.isin(result.labels, values), np.isin(reference, values)
            pooled[name][0].append(pred)
            pooled[name][1].append(ref)
            rows.append({
                "case": case.name, "region": name,
                "dice": metrics.dice(pred, ref), "voe": metrics.voe(pred, ref), "rvd": metrics.rvd(pred, ref),
                "asd_mm": metrics.asd(pred, ref, volume.spacing), "rmsd_mm": metrics.rmsd(pred, ref, volume.spacing),
                "ref_ml": float(ref.sum()) * voxel_ml, "pred_ml": float(pred.sum()) * voxel_ml,
            })
    summary = []
    for name in regions:
        region_rows = [r for r in rows if r["region"] == name]
        preds, refs = pooled[name]
        summary.append({
            "region": name, "cases": len(region_rows),
            "dice_per_case": metrics.dice_per_case(preds, refs), "dice_global": metrics.dice_global(preds, refs),
            **{f"mean_{k}": _finite_mean([r[k] for r in region_rows]) for k in ("voe", "rvd", "asd_mm", "rmsd_mm")},
            # surface distances are infinite where one mask is empty: say over how many cases the mean is
            "distance_cases": sum(math.isfinite(r["asd_mm"]) for r in region_rows),
        })
    table = {"model": loaded.card["name"], "rows": rows, "summary": summary}
    if csv_path:
        _write_csv(table, Path(csv_path))
    return table


def _finite_mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _write_csv(table: dict, path: Path) -> None:
    from .io import atomic_output

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table["rows"]:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    for row in table["summary"]:
        writer.writerow({"case": "ALL (per-case mean)", "region": row["region"], "dice": f"{row['dice_per_case']:.6g}",
                         "voe": f"{row['mean_voe']:.6g}", "rvd": f"{row['mean_rvd']:.6g}",
                         "asd_mm": f"{row['mean_asd_mm']:.6g}", "rmsd_mm": f"{row['mean_rmsd_mm']:.6g}"})
        writer.writerow({"case": "ALL (global Dice)", "region": row["region"], "dice": f"{row['dice_global']:.6g}"})
    with atomic_output(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def format_table(table: dict) -> str:
    lines = [f"model {table['model']}",
             f"{'case':<22}{'region':<14}{'Dice':>7}{'VOE':>7}{'RVD':>8}{'ASD mm':>9}{'RMSD mm':>9}"]
    for r in table["rows"]:
        lines.append(f"{r['case']:<22}{r['region']:<14}{r['dice']:7.3f}{r['voe']:7.3f}{r['rvd']:8.3f}"
                     f"{r['asd_mm']:9.2f}{r['rmsd_mm']:9.2f}")
    for s in table["summary"]:
        lines.append(f"{'mean of ' + str(s['cases']) + ' cases':<22}{s['region']:<14}{s['dice_per_case']:7.3f}"
                     f"{s['mean_voe']:7.3f}{s['mean_rvd']:8.3f}{s['mean_asd_mm']:9.2f}{s['mean_rmsd_mm']:9.2f}"
                     f"   (distances over {s['distance_cases']} cases)"
                     f"   global Dice {s['dice_global']:.3f}")
    return "\n".join(lines)
