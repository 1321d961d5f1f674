"""Folder and multi-input inference (TransferSegLib.batch, `transferseg segment|detect DIR`), also under torchrun."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sha256, write_dicom_series, write_image

from TransferSegLib.batch import find_cases, run_batch
from TransferSegLib.io import load_volume, save_volume
from TransferSegLib.models import load_model
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.pipeline import run
from TransferSegLib.progress import CancelToken, Cancelled
from TransferSegLib.volume import TransferSegError

SEGMENT_FILES = ["labelmap.nii.gz", "lesions.csv", "overview.png", "report.html", "result.json",
                 "segmentation.seg.nrrd"]
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, torchrun=0):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *launcher, "-m", "TransferSegLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=300, env=env)


def _ct_cases(folder, seeds, suffixes=(".nii.gz",)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, seed in enumerate(seeds):
        volume, _ = ct_phantom(seed=seed, shape=(8, 32, 32))
        paths.append(save_volume(volume, folder / f"ct_{seed:03d}{suffixes[n % len(suffixes)]}"))
    return paths


def _summary(path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_runs_every_case_and_reports_the_bad_ones_without_stopping(tmp_path, tiny_model):
    cases = tmp_path / "cases"
    _ct_cases(cases, [1, 2, 3], suffixes=(".nii.gz", ".nrrd", ".mha"))
    write_dicom_series(ct_phantom(seed=4, shape=(8, 32, 32))[0].array, cases / "series_4")
    write_image(np.zeros((10, 12), np.int16), cases / "flat.nii.gz", spacing_ijk=(1, 1), origin_lps=(0, 0),
                direction_lps=np.eye(2))
    good = (cases / "ct_001.nii.gz").read_bytes()
    (cases / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    (cases / "notes.txt").write_text("not a volume", encoding="utf-8")  # neither is a case
    (cases / "other").mkdir()
    before = _tree(cases)

    out = tmp_path / "out"
    result = _cli("segment", cases, "-o", out, "--model", tiny_model, "--device", "cpu")

    assert result.returncode == 2, result.stderr
    assert f"2 of 6 cases failed; see {out / 'summary.csv'}" in result.stderr
    assert _tree(cases) == before  # the inputs are only read
    rows = _summary(out / "summary.csv")
    assert [r["case"] for r in rows] == ["ct_001", "ct_002", "ct_003", "cut", "flat", "series_4"]
    assert list(rows[0]) == ["case", "input", "status", "error", "output", "seconds", "warnings", "liver mL",
                             "liver tumor mL"]
    status = {r["case"]: r["status"] for r in rows}
    assert status == {"ct_001": "ok", "ct_002": "ok", "ct_003": "ok", "cut": "failed", "flat": "failed",
                      "series_4": "ok"}
    failed = {r["case"]: r for r in rows if r["status"] == "failed"}
    assert "truncated" in failed["cut"]["error"] and "input is 2D (10×12)" in failed["flat"]["error"]
    assert all(r["output"] == "" and r["liver mL"] == "" for r in failed.values())
    assert sorted(p.name for p in out.iterdir()) == ["ct_001", "ct_002", "ct_003", "series_4", "summary.csv"]
    for row in rows:
        if row["status"] != "ok":
            continue
        folder = out / row["case"]
        assert row["output"] == str(folder) and row["error"] == "" and float(row["seconds"]) > 0
        assert sorted(p.name for p in folder.iterdir()) == SEGMENT_FILES
        written = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        assert written["input"]["shape_kji"] == list(load_volume(row["input"]).shape)
        for name, ml in written["volumes_ml"].items():
            assert float(row[f"{name} mL"]) == pytest.approx(ml)
        assert f"{row['case']}: ok in " in result.stdout


def test_several_inputs_each_to_its_own_folder_with_progress(tmp_path, tiny_model):
    first = _ct_cases(tmp_path / "a", [5])
    second = _ct_cases(tmp_path / "b", [6], suffixes=(".mha",))
    out = tmp_path / "out"
    result = _cli("segment", first[0], second[0], "-o", out, "--model", tiny_model, "--device", "cpu",
                  "--progress-lines")
    assert result.returncode == 0, result.stderr
    rows = _summary(out / "summary.csv")
    assert [(r["case"], r["input"], r["status"]) for r in rows] == [("ct_005", str(first[0]), "ok"),
                                                                     ("ct_006", str(second[0]), "ok")]
    assert all(sorted(p.name for p in (out / r["case"]).iterdir()) == SEGMENT_FILES for r in rows)
    fractions = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PROGRESS ")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("ct_006 (2/2)" in line for line in result.stdout.splitlines() if line.startswith("PROGRESS "))
    assert f"2 case(s) done; see {out / 'summary.csv'}" in result.stdout


def test_detect_on_a_folder_counts_each_case_detections(tmp_path, tiny_heatmap_model):
    cases = tmp_path / "dbt"
    cases.mkdir()
    for seed in (1, 2):
        save_volume(dbt_phantom(seed=seed, shape=(8, 48, 40))[0], cases / f"dbt_{seed:03d}.nii.gz")
    out = tmp_path / "out"
    result = _cli("detect", cases, "-o", out, "--model", tiny_heatmap_model, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = _summary(out / "summary.csv")
    assert [r["case"] for r in rows] == ["dbt_001", "dbt_002"] and "liver mL" not in rows[0]
    for row in rows:
        detections = json.loads((out / row["case"] / "detections.json").read_text(encoding="utf-8"))["detections"]
        assert int(row["detections"]) == len(detections) >= 1


def test_torchrun_splits_the_cases_between_ranks_each_done_once(tmp_path, tiny_model):
    cases = tmp_path / "cases"
    _ct_cases(cases, [11, 12, 13, 14, 15])
    out = tmp_path / "out"
    result = _cli("segment", cases, "-o", out, "--model", tiny_model, "--device", "cpu", torchrun=2)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _summary(out / "summary.csv")
    names = [f"ct_{seed:03d}" for seed in (11, 12, 13, 14, 15)]
    assert [r["case"] for r in rows] == names and all(r["status"] == "ok" for r in rows)
    assert [r["rank"] for r in rows] == ["0", "1", "0", "1", "0"]  # cases[rank::world_size]
    assert sorted(p.name for p in out.iterdir()) == names + ["summary.csv"]
    assert all(sorted(p.name for p in (out / name).iterdir()) == SEGMENT_FILES for name in names)
    assert result.stdout.count("5 case(s) done") == 1  # rank 0 alone prints the summary
    assert all(result.stdout.count(f"{name}: ok in ") == 1 for name in names)


def test_python_api_loads_the_model_once_and_matches_a_single_run(tmp_path, tiny_model, monkeypatch):
    import TransferSegLib.batch as batch
    import TransferSegLib.models as models
    import TransferSegLib.pipeline as pipeline

    paths = _ct_cases(tmp_path / "cases", [21, 22, 23])
    calls = []
    for module in (models, pipeline, batch):  # whoever loads it, once per batch
        monkeypatch.setattr(module, "load_model", lambda *a, **k: calls.append(a) or load_model(*a, **k))
    rows = run_batch(tmp_path / "cases", tmp_path / "out", model=tiny_model, device="cpu")
    assert len(calls) == 1 and [r["status"] for r in rows] == ["ok"] * 3
    expected = run(load_volume(paths[1]), model=load_model(tiny_model), device="cpu").labels
    written = load_volume(tmp_path / "out" / "ct_022" / "labelmap.nii.gz").array
    np.testing.assert_array_equal(written, expected)


def test_cancel_stops_the_batch_keeping_only_finished_cases(tmp_path, tiny_model):
    _ct_cases(tmp_path / "cases", [31, 32, 33])
    out = tmp_path / "out"
    token = CancelToken()
    with pytest.raises(Cancelled, match="after 1 of 3 case"):
        run_batch(tmp_path / "cases", out, model=load_model(tiny_model), device="cpu", cancel=token,
                  on_case=lambda row: token.cancel())
    assert sorted(p.name for p in out.iterdir()) == ["ct_031"]  # no summary, no staging folder left
    assert sorted(p.name for p in (out / "ct_031").iterdir()) == SEGMENT_FILES


def test_name_clashes_are_refused_before_anything_runs(tmp_path, tiny_model):
    first = _ct_cases(tmp_path / "a", [41])
    second = _ct_cases(tmp_path / "b", [41], suffixes=(".nrrd",))
    with pytest.raises(TransferSegError, match="would both be written to the output folder 'ct_041'"):
        run_batch([first[0], second[0]], tmp_path / "out", model=tiny_model, device="cpu")
    assert not (tmp_path / "out").exists()
    _ct_cases(tmp_path / "a", [41], suffixes=(".mha",))  # beside ct_041.nii.gz in one folder
    with pytest.raises(TransferSegError, match="ct_041.mha and .*ct_041.nii.gz would both"):
        find_cases([tmp_path / "a"])
