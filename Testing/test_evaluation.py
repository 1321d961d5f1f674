"""`evaluate`: the LiTS tumor burden RMSE against numbers worked out by hand, and its table and CSV."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_image

from TransferSegLib import evaluation
from TransferSegLib.evaluation import evaluate, format_table, tumor_burden_regions
from TransferSegLib.volume import TransferSegError

SHAPE = (3, 4, 5)


def label_map(n_liver, n_tumor):
    """``n_liver`` voxels of liver (1) then ``n_tumor`` of tumor (2), in array order."""
    labels = np.zeros(int(np.prod(SHAPE)), np.uint8)
    labels[:n_liver] = 1
    labels[n_liver:n_liver + n_tumor] = 2
    return labels.reshape(SHAPE)


# (reference, prediction) per case; burden = tumor / (liver + tumor)
CASES = [
    (label_map(8, 2), label_map(9, 1)),    # 2/10 = 0.2 vs 1/10 = 0.1
    (label_map(12, 0), label_map(9, 3)),   # 0 vs 3/12 = 0.25
    (label_map(6, 4), label_map(0, 0)),    # 4/10 = 0.4 vs no liver: 0
]
BURDENS = [(0.2, 0.1), (0.0, 0.25), (0.4, 0.0)]
RMSE = math.sqrt(((0.1 - 0.2) ** 2 + (0.25 - 0.0) ** 2 + (0.0 - 0.4) ** 2) / 3)


@pytest.fixture
def hand_cases(tmp_path, monkeypatch):
    """A phantom-layout folder of the CASES; the model's "prediction" is the case's chosen one.

    Each image holds its case number, so the stand-in for ``pipeline.run`` knows the case.
    """
    for n, (reference, _) in enumerate(CASES):
        write_image(np.full(SHAPE, n, np.int16), tmp_path / f"ct_{n:03d}.nii.gz")
        write_image(reference, tmp_path / f"ct_{n:03d}_label.nii.gz")
    monkeypatch.setattr(evaluation, "run", lambda volume, model, **kwargs: SimpleNamespace(
        labels=CASES[int(volume.array.flat[0])][1]))
    return tmp_path


def test_evaluate_reports_the_tumor_burden_rmse_worked_out_by_hand(hand_cases, tiny_model, tmp_path):
    csv_path = tmp_path / "metrics.csv"
    table = evaluate(tiny_model, hand_cases, device="cpu", csv_path=csv_path)
    assert table["tumor_burden"] == {"tumor": "liver tumor", "liver": "liver"}
    assert table["tumor_burden_rmse"] == pytest.approx(RMSE, rel=1e-12)
    tumor_rows = [r for r in table["rows"] if r["region"] == "liver tumor"]
    np.testing.assert_allclose([(r["ref_burden"], r["pred_burden"]) for r in tumor_rows], BURDENS, rtol=1e-12)
    assert all(r["ref_burden"] is None for r in table["rows"] if r["region"] == "liver")
    # the existing fields are still there, e.g. the liver region counts the tumor: 10 + 12 + 10 reference voxels
    liver = next(s for s in table["summary"] if s["region"] == "liver")
    assert liver["dice_global"] == pytest.approx(2 * (10 + 12 + 0) / (32 + 22))

    printed = format_table(table)
    lits, ircadb = printed.index("LiTS: Dice per case, Dice global, tumor burden RMSE"), printed.index("3DIRCADb:")
    assert lits < printed.index(f"tumor burden RMSE {RMSE:.4f}") < ircadb
    assert "3DIRCADb: VOE, RVD, ASD, RMSD, Dice" in printed

    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(next(r for r in rows if r["case"] == "ALL (tumor burden RMSE)")["burden_rmse"]) == pytest.approx(RMSE)
    burdens = [(float(r["ref_burden"]), float(r["pred_burden"])) for r in rows
               if r["case"].startswith("ct_") and r["region"] == "liver tumor"]
    np.testing.assert_allclose(burdens, BURDENS, rtol=1e-5)


def test_tumor_burden_regions_from_the_card_or_by_name():
    lits = {"liver": [1, 2], "liver tumor": [2]}
    assert tumor_burden_regions({}, lits) == {"tumor": "liver tumor", "liver": "liver"}
    assert tumor_burden_regions({}, {"kidney": [1], "kidney tumor": [2]}) is None
    kidney = {"evaluation": {"tumor_burden": {"tumor": "kidney tumor", "liver": "kidney"}}}
    assert tumor_burden_regions(kidney, {"kidney": [1, 2], "kidney tumor": [2]}) == {"tumor": "kidney tumor",
                                                                                     "liver": "kidney"}
    with pytest.raises(TransferSegError, match="'kidney tumor'"):
        tumor_burden_regions(kidney, lits)
    with pytest.raises(TransferSegError, match="must be"):
        tumor_burden_regions({"evaluation": {"tumor_burden": ["liver tumor", "liver"]}}, lits)


def test_a_card_without_tumor_and_liver_regions_reports_no_burden(hand_cases, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "regions_of", lambda card: {"liver": [1], "tumor": [2]})
    table = evaluate(tiny_model, hand_cases, device="cpu", csv_path=tmp_path / "metrics.csv")
    assert table["tumor_burden"] is None and table["tumor_burden_rmse"] is None
    assert "tumor burden RMSE: not computed" in format_table(table)
    assert "ALL (tumor burden RMSE)" not in (tmp_path / "metrics.csv").read_text(encoding="utf-8")
