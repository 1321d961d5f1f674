"""`transferseg evaluate`: run a model over a labelled folder and tabulate the paper metrics.

Two groups, as the papers report them (H-DenseUNet Sec. IV-B, Tables II–IV):

* LiTS: Dice per case, Dice global (per region), and the tumor burden RMSE;
* 3DIRCADb: VOE, RVD, ASD, RMSD and Dice, each a mean over the cases (per region).

Regions: by default each card label is scored on its own (``labels == L``).  A card may name
regions made of several labels, e.g. LiTS scores the liver including its tumors:
``"evaluation": {"regions": {"liver": [1, 2], "liver tumor": [2]}}``.

Tumor burden (LiTS): tumor volume / liver volume, the liver including its tumor
(:func:`TransferSegLib.metrics.tumor_burden`).  A card names the two regions as
``"evaluation": {"tumor_burden": {"tumor": "liver tumor", "liver": "liver"}}``; without that
key, regions named "liver tumor" and "liver" are used when both exist, and no burden is
reported otherwise.
"""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path
from typing import Optional

import numpy as np

from . import metrics
from .atomic import atomic_output, check_output_folder, same_file
from .datasets import find_cases
from .models import load_model
from .pipeline import run
from .progress import CancelToken, StageProgress, check_cancel, one_line
from .volume import TransferSegError

COLUMNS = ["case", "region", "dice", "voe", "rvd", "asd_mm", "rmsd_mm", "ref_ml", "pred_ml",
           "ref_burden", "pred_burden", "burden_rmse"]


def regions_of(card: dict) -> dict:
    regions = (card.get("evaluation") or {}).get("regions")
    if regions:
        return {name: [int(v) for v in values] for name, values in regions.items()}
    return {seg["name"]: [int(seg["label"])] for seg in card["labels"]}


def tumor_burden_regions(card: dict, regions: dict) -> Optional[dict]:
    """``{"tumor": name, "liver": name}``: the regions whose LiTS tumor burden is reported, or None.

    From the card's ``evaluation.tumor_burden``; by default "liver tumor" in "liver" when both
    regions exist.
    """
    named = (card.get("evaluation") or {}).get("tumor_burden")
    if named is None:
        return {"tumor": "liver tumor", "liver": "liver"} if {"liver tumor", "liver"} <= set(regions) else None
    if not isinstance(named, dict) or set(named) != {"tumor", "liver"}:
        raise TransferSegError(f'the card\'s evaluation.tumor_burden must be {{"tumor": REGION, "liver": REGION}}; '
                               f"got {named!r}")
    missing = [name for name in named.values() if name not in regions]
    if missing:
        raise TransferSegError(f"the card's evaluation.tumor_burden names region(s) {', '.join(map(repr, missing))}; "
                               f"its regions are {', '.join(map(repr, regions))}")
    return {"tumor": named["tumor"], "liver": named["liver"]}


def evaluate(model, data, device: str = "auto", csv_path=None, progress=None,
             cancel: Optional[CancelToken] = None, limit: Optional[int] = None) -> dict:
    """Metrics per case and region, the per-region LiTS and 3DIRCADb summaries, the tumor burden RMSE.

    Returns a dict:

    * ``rows``: one per case and region: ``dice``, ``voe``, ``rvd`` (fractions), ``asd_mm``,
      ``rmsd_mm``, ``ref_ml``, ``pred_ml``, and ``ref_burden`` / ``pred_burden`` (fractions)
      on the tumor region's rows, None elsewhere;
    * ``summary``: one per region: ``dice_per_case``, ``dice_global`` (LiTS) and ``mean_voe``,
      ``mean_rvd``, ``mean_asd_mm``, ``mean_rmsd_mm`` (3DIRCADb; the distances over the
      ``distance_cases`` where they are finite: one empty mask makes them infinite);
    * ``tumor_burden``: the ``{"tumor", "liver"}`` regions (see :func:`tumor_burden_regions`),
      and ``tumor_burden_rmse``: over the cases, or None when the card has no such regions.

    Writes the rows, summary and RMSE to ``csv_path`` (atomically) when given.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TransferSegError(f"limit is the number of cases to evaluate (1 or more); got {limit!r}")
    if csv_path:  # before the run: a wrong table path must not cost the whole evaluation
        csv_path = _check_table_path(csv_path)
    loaded = load_model(model, device="cpu")
    cases = find_cases(data)
    if limit:
        cases = cases[:limit]
    if csv_path:
        _check_not_an_input(csv_path, loaded, data, cases)
    unlabelled = [case.name for case in cases if case._make is None and case.label_path is None]
    if unlabelled:
        raise TransferSegError(f"{data}: {len(unlabelled)} case(s) have no label map ({', '.join(unlabelled[:3])}"
                               f"{' …' if len(unlabelled) > 3 else ''}); evaluation needs labelled data")
    regions = regions_of(loaded.card)
    burden = tumor_burden_regions(loaded.card, regions)
    report = StageProgress(progress)
    rows, pooled = [], {name: ([], []) for name in regions}
    for n, case in enumerate(cases):
        check_cancel(cancel)
        volume, reference = case.load()
        if reference is None:
            raise TransferSegError(f"case {case.name} has no label map; evaluation needs labelled data")
        result = run(volume, loaded, device=device, cancel=cancel,
                     progress=report.sub(n / len(cases), (n + 1) / len(cases)))
        rows += _case_rows(case.name, result.labels, reference, volume, regions, burden, pooled)
    burden_rmse = None
    if burden:
        burden_rmse = metrics.tumor_burden_rmse(*pooled[burden["tumor"]], *pooled[burden["liver"]])
    table = {"model": loaded.card["name"], "rows": rows, "summary": _summary(regions, rows, pooled),
             "tumor_burden": burden, "tumor_burden_rmse": burden_rmse}
    if csv_path:
        _write_csv(table, Path(csv_path))
    return table


def _check_table_path(csv_path) -> Path:
    """The metrics table's path, refused when it is a folder or cannot be written."""
    csv_path = Path(csv_path).expanduser()
    if csv_path.is_dir():
        raise TransferSegError(f"the metrics table {csv_path} is an existing folder; give a file name, "
                               f"e.g. {csv_path / 'metrics.csv'}")
    check_output_folder(csv_path.parent)
    return csv_path


def _case_rows(case: str, labels: np.ndarray, reference: np.ndarray, volume, regions: dict, burden: Optional[dict],
               pooled: dict) -> list:
    """One case's row per region; each region's (predicted, reference) masks are added to ``pooled``."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    masks = {name: (np.isin(labels, values), np.isin(reference, values)) for name, values in regions.items()}
    burdens = {}  # region → (reference, predicted) tumor burden of this case
    if burden:
        (tumor_pred, tumor_ref), (liver_pred, liver_ref) = masks[burden["tumor"]], masks[burden["liver"]]
        burdens[burden["tumor"]] = (metrics.tumor_burden(tumor_ref, liver_ref),
                                    metrics.tumor_burden(tumor_pred, liver_pred))
    rows = []
    for name, (pred, ref) in masks.items():
        pooled[name][0].append(pred)
        pooled[name][1].append(ref)
        ref_burden, pred_burden = burdens.get(name, (None, None))
        rows.append({
            "case": case, "region": name,
            "dice": metrics.dice(pred, ref), "voe": metrics.voe(pred, ref), "rvd": metrics.rvd(pred, ref),
            "asd_mm": metrics.asd(pred, ref, volume.spacing), "rmsd_mm": metrics.rmsd(pred, ref, volume.spacing),
            "ref_ml": float(ref.sum()) * voxel_ml, "pred_ml": float(pred.sum()) * voxel_ml,
            "ref_burden": ref_burden, "pred_burden": pred_burden,
        })
    return rows


def _summary(regions: dict, rows: list, pooled: dict) -> list:
    """Per region: the LiTS Dice per case and global, and the 3DIRCADb means over the cases."""
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
    return summary


def _check_not_an_input(csv_path: Path, loaded, data, cases) -> None:
    """Refuse a metrics table that is one of the inputs (the model's card or weights, the data set's
    dataset.json, an image or a label map), by name, through links, or as a hard link of one."""
    weights = loaded.card["weights"].get("file", f"{loaded.path.stem}.safetensors")
    inputs = [loaded.path, loaded.path.with_name(weights), Path(data).expanduser() / "dataset.json"]
    inputs += [path for case in cases for path in (case.image_path, case.label_path) if path is not None]
    for path in inputs:
        if same_file(csv_path, Path(path)):
            raise TransferSegError(f"the metrics table {csv_path} would overwrite the input {path}; "
                                   "give another file name")


def _finite_mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _write_csv(table: dict, path: Path) -> None:
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
    if table.get("tumor_burden_rmse") is not None:
        writer.writerow({"case": "ALL (tumor burden RMSE)", "region": table["tumor_burden"]["tumor"],
                         "burden_rmse": f"{table['tumor_burden_rmse']:.6g}"})
    with atomic_output(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def format_table(table: dict) -> str:
    """The per-case rows, then the LiTS group and the 3DIRCADb group, each labelled."""
    burden = table.get("tumor_burden")
    lines = [f"model {one_line(table['model'])}",
             f"{'case':<22}{'region':<14}{'Dice':>7}{'VOE':>7}{'RVD':>8}{'ASD mm':>9}{'RMSD mm':>9}"
             + (f"{'burden ref':>12}{'pred':>8}" if burden else "")]
    for r in table["rows"]:
        line = (f"{one_line(r['case']):<22}{one_line(r['region']):<14}{r['dice']:7.3f}{r['voe']:7.3f}{r['rvd']:8.3f}"
                f"{r['asd_mm']:9.2f}{r['rmsd_mm']:9.2f}")
        if r.get("ref_burden") is not None:
            line += f"{r['ref_burden']:12.4f}{r['pred_burden']:8.4f}"
        lines.append(line)
    cases = table["summary"][0]["cases"] if table["summary"] else 0

    lines += ["", f"LiTS: Dice per case, Dice global, tumor burden RMSE ({cases} cases)",
              f"{'region':<14}{'Dice per case':>15}{'Dice global':>13}"]
    for s in table["summary"]:
        lines.append(f"{one_line(s['region']):<14}{s['dice_per_case']:15.3f}{s['dice_global']:13.3f}")
    if burden:
        lines.append(f"tumor burden RMSE {table['tumor_burden_rmse']:.4f}"
                     f"   ({one_line(burden['tumor'])} / {one_line(burden['liver'])}, as fractions)")
    else:
        lines.append("tumor burden RMSE: not computed (the card names no tumor and liver regions)")

    lines += ["", f"3DIRCADb: VOE, RVD, ASD, RMSD, Dice (means over {cases} cases; VOE and RVD as fractions)",
              f"{'region':<14}{'VOE':>7}{'RVD':>8}{'ASD mm':>9}{'RMSD mm':>9}{'Dice':>7}"]
    for s in table["summary"]:
        lines.append(f"{one_line(s['region']):<14}{s['mean_voe']:7.3f}{s['mean_rvd']:8.3f}{s['mean_asd_mm']:9.2f}"
                     f"{s['mean_rmsd_mm']:9.2f}{s['dice_per_case']:7.3f}"
                     f"   (distances over {s['distance_cases']} cases)")
    return "\n".join(lines)
